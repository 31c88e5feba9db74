//! Deliveries from `node_execution` → batches → one decision transaction → ack.
//!
//! A collector task gathers deliveries into a batch (up to `pipeline.max_batch`, waiting at
//! most `pipeline.max_wait_ms` after the first, and growing further while the previous batch
//! is still being decided). The decider decodes, dead-letters what is invalid, decides the rest
//! in one transaction, and only after the commit acks the batch with one multiple-ack.
//! Transient faults are retried with backoff and never produce a decision or an ack.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use futures::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions,
};
use lapin::publisher_confirm::Confirmation;
use lapin::types::{AMQPValue, FieldTable};
use lapin::Channel;
use sqlx::PgPool;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::config::Settings;
use crate::decide::{self, Outcome, Pricing, Verdict};
use crate::message::{self, NodeExecutionEntry};
use crate::telemetry::Health;
use crate::topology::{self, Names};

/// Header naming why a message was dead-lettered.
pub const ERROR_HEADER: &str = "x-credit-error";

#[derive(Clone)]
pub struct Consumer {
    pub settings: Arc<Settings>,
    pub pool: PgPool,
    pub pricing: Arc<Pricing>,
    pub health: Arc<Health>,
}

#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("broker: {0}")]
    Amqp(#[from] lapin::Error),
    #[error("broker: the consumer stream ended")]
    StreamEnded,
    #[error("broker: a dead-letter publish was not confirmed")]
    Nacked,
    #[error("decider stopped")]
    DeciderGone,
}

impl Consumer {
    /// Consumes until `stop` fires, reconnecting after broker faults. Returns once the batch
    /// in flight is decided and acked.
    pub async fn run(&self, stop: CancellationToken) {
        let mut delays = crate::retry::backoff();
        loop {
            if stop.is_cancelled() {
                return;
            }
            let started = Instant::now();
            match self.session(&stop).await {
                Ok(()) => return,
                Err(e) => {
                    self.health.set_consuming(false);
                    metrics::counter!("credit_broker_reconnects_total").increment(1);
                    warn!(error = %e, "consumer session ended; reconnecting");
                    if started.elapsed() > Duration::from_secs(30) {
                        delays = crate::retry::backoff();
                    }
                    if !crate::retry::pause(&mut delays, &stop).await {
                        return;
                    }
                }
            }
        }
    }

    async fn session(&self, stop: &CancellationToken) -> Result<(), SessionError> {
        let amqp = &self.settings.amqp;
        let conn = topology::connect(&amqp.url, "credit-worker consumer").await?;
        let ch = conn.create_channel().await?;
        let names = topology::declare(&ch, amqp).await?;
        ch.basic_qos(amqp.prefetch, BasicQosOptions::default())
            .await?;
        let dead_ch = conn.create_channel().await?;
        dead_ch
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        let tag = "credit-worker";
        let mut deliveries = ch
            .basic_consume(
                &names.input_queue,
                tag,
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        self.health.set_consuming(true);
        info!(queue = %names.input_queue, "consuming");

        let (tx, rx) = mpsc::channel::<Vec<Delivery>>(1);
        // Cancelled on shutdown too: the batch in flight is still decided when the database
        // answers, and abandoned (left unacked) rather than retried forever when it does not.
        let decider_stop = stop.child_token();
        let decider = tokio::spawn(decide_loop(
            self.clone(),
            rx,
            ch.clone(),
            dead_ch,
            names.clone(),
            decider_stop.clone(),
        ));

        let max_batch = self.settings.pipeline.max_batch;
        let max_wait = Duration::from_millis(self.settings.pipeline.max_wait_ms);
        let result: Result<(), SessionError> = async {
            loop {
                let first = tokio::select! {
                    _ = stop.cancelled() => return Ok(()),
                    d = deliveries.next() => d,
                };
                let mut batch = vec![next_delivery(first)?];
                let deadline = tokio::time::Instant::now() + max_wait;
                while batch.len() < max_batch {
                    match tokio::time::timeout_at(deadline, deliveries.next()).await {
                        Ok(d) => batch.push(next_delivery(d)?),
                        Err(_) => break,
                    }
                }
                // While the decider is still busy with the previous batch, keep filling this
                // one: under load batches grow to max_batch, idle latency stays max_wait.
                loop {
                    tokio::select! {
                        biased;
                        permit = tx.reserve() => {
                            permit.map_err(|_| SessionError::DeciderGone)?.send(batch);
                            break;
                        }
                        d = deliveries.next(), if batch.len() < max_batch => {
                            batch.push(next_delivery(d)?);
                        }
                    }
                }
            }
        }
        .await;

        // Stop deliveries, let the decider finish (or abandon, on a broker fault) its batch.
        let _ = ch.basic_cancel(tag, BasicCancelOptions::default()).await;
        drop(tx);
        if result.is_err() {
            decider_stop.cancel();
        }
        let decided = decider.await.unwrap_or(Err(SessionError::DeciderGone));
        self.health.set_consuming(false);
        let _ = ch.close(200, "shutdown").await;
        let _ = conn.close(200, "shutdown").await;
        result.and(decided)
    }
}

fn next_delivery(d: Option<Result<Delivery, lapin::Error>>) -> Result<Delivery, SessionError> {
    match d {
        Some(Ok(d)) => Ok(d),
        Some(Err(e)) => Err(e.into()),
        None => Err(SessionError::StreamEnded),
    }
}

async fn decide_loop(
    c: Consumer,
    mut rx: mpsc::Receiver<Vec<Delivery>>,
    ch: Channel,
    dead_ch: Channel,
    names: Names,
    stop: CancellationToken,
) -> Result<(), SessionError> {
    while let Some(batch) = rx.recv().await {
        if !c.handle_batch(&batch, &ch, &dead_ch, &names, &stop).await? {
            // Abandoned (shutdown during a database outage): nothing acked, the broker
            // redelivers these messages.
            return Ok(());
        }
    }
    Ok(())
}

impl Consumer {
    /// Decides and acks one batch. Ok(false) when abandoned on `stop` before deciding.
    async fn handle_batch(
        &self,
        batch: &[Delivery],
        ch: &Channel,
        dead_ch: &Channel,
        names: &Names,
        stop: &CancellationToken,
    ) -> Result<bool, SessionError> {
        let started = Instant::now();
        metrics::histogram!("credit_batch_size").record(batch.len() as f64);
        let mut invalid: Vec<(usize, String)> = Vec::new();
        // Positions in the batch of the decoded entries, in delivery order.
        let mut positions: Vec<usize> = Vec::with_capacity(batch.len());
        let mut entries: Vec<NodeExecutionEntry> = Vec::with_capacity(batch.len());
        for (i, d) in batch.iter().enumerate() {
            match message::decode(&d.data) {
                Ok(e) => {
                    positions.push(i);
                    entries.push(e);
                }
                Err(e) => invalid.push((i, e.to_string())),
            }
        }
        let decide_started = Instant::now();
        let Some(verdicts) = self.decide_with_retry(&entries, stop).await else {
            return Ok(false);
        };
        metrics::histogram!("credit_decide_transaction_seconds")
            .record(decide_started.elapsed().as_secs_f64());
        for ((i, e), v) in positions.iter().zip(&entries).zip(&verdicts) {
            record(e, v);
            if let Verdict::Invalid { reason } = v {
                invalid.push((*i, reason.clone()));
            }
        }
        invalid.sort_unstable_by_key(|(i, _)| *i);
        for (i, reason) in &invalid {
            dead_letter(dead_ch, names, &batch[*i], reason).await?;
        }
        // The batch holds every unacked delivery up to its last tag (deliveries are batched in
        // order and batches are handled in order), so one multiple-ack covers it.
        if let Some(last) = batch.last() {
            let ack_started = Instant::now();
            ch.basic_ack(last.delivery_tag, BasicAckOptions { multiple: true })
                .await?;
            metrics::histogram!("credit_ack_seconds").record(ack_started.elapsed().as_secs_f64());
        }
        metrics::histogram!("credit_decide_seconds").record(started.elapsed().as_secs_f64());
        Ok(true)
    }

    /// Decides with retries on transient faults; a batch that fails for another reason is
    /// split so one bad entry cannot block the rest. None when `stop` fired during retries.
    async fn decide_with_retry(
        &self,
        entries: &[NodeExecutionEntry],
        stop: &CancellationToken,
    ) -> Option<Vec<Verdict>> {
        match self.decide_transient_retry(entries, stop).await? {
            Ok(v) => Some(v),
            Err(e) => {
                warn!(error = %e, size = entries.len(), "batch failed; deciding its entries one by one");
                let mut out = Vec::with_capacity(entries.len());
                for entry in entries {
                    match self
                        .decide_transient_retry(std::slice::from_ref(entry), stop)
                        .await?
                    {
                        Ok(mut v) => out.push(v.pop().unwrap_or(Verdict::Invalid {
                            reason: "internal: no verdict".into(),
                        })),
                        Err(e) => {
                            error!(node_exec_id = %entry.node_exec_id, user_id = %entry.user_id, error = %e, "entry cannot be decided; dead-lettering");
                            out.push(Verdict::Invalid {
                                reason: format!("internal: {e}"),
                            });
                        }
                    }
                }
                Some(out)
            }
        }
    }

    /// Ok/Err(permanent error); None when stopped during a transient outage.
    async fn decide_transient_retry(
        &self,
        entries: &[NodeExecutionEntry],
        stop: &CancellationToken,
    ) -> Option<Result<Vec<Verdict>, decide::DecideError>> {
        let mut delays = crate::retry::backoff();
        loop {
            match decide::decide_batch(&self.pool, &self.pricing, entries, Utc::now()).await {
                Ok(v) => return Some(Ok(v)),
                Err(e) if e.is_transient() => {
                    metrics::counter!("credit_decide_retries_total").increment(1);
                    warn!(error = %e, "decision transaction failed; retrying");
                    if !crate::retry::pause(&mut delays, stop).await {
                        return None;
                    }
                }
                Err(e) => return Some(Err(e)),
            }
        }
    }
}

fn record(e: &NodeExecutionEntry, v: &Verdict) {
    // Every log line about a message carries its ids through this span.
    let _span = tracing::info_span!(
        "message",
        node_exec_id = %e.node_exec_id,
        user_id = %e.user_id
    )
    .entered();
    match v {
        Verdict::Decided {
            outcome,
            cost,
            fee,
            balance,
        } => {
            metrics::counter!("credit_messages_total", "outcome" => outcome.as_str()).increment(1);
            if *outcome == Outcome::Charged || *fee > 0 {
                let charged = if *outcome == Outcome::Charged {
                    *cost
                } else {
                    0
                } + fee;
                metrics::counter!("credit_credits_charged_total").increment(charged as u64);
            }
            debug!(outcome = outcome.as_str(), cost, fee, balance, "decided");
        }
        Verdict::Duplicate { conflicting } => {
            metrics::counter!("credit_messages_total", "outcome" => "duplicate").increment(1);
            if *conflicting {
                metrics::counter!("credit_conflicting_duplicates_total").increment(1);
                warn!(block_id = %e.block_id, "conflicting duplicate: the first decision stands");
            } else {
                debug!("duplicate delivery ignored");
            }
        }
        Verdict::Invalid { reason } => {
            warn!(reason, "entry cannot be decided; dead-lettering");
        }
    }
}

/// Republishes the delivery unchanged to the dead-letter exchange with the reason added, and
/// waits for the broker's confirm before the caller acks it.
async fn dead_letter(
    ch: &Channel,
    names: &Names,
    d: &Delivery,
    reason: &str,
) -> Result<(), SessionError> {
    metrics::counter!("credit_messages_total", "outcome" => "invalid").increment(1);
    metrics::counter!("credit_dead_lettered_total").increment(1);
    warn!(
        reason,
        delivery_tag = d.delivery_tag,
        "invalid message dead-lettered"
    );
    let mut headers = d.properties.headers().clone().unwrap_or_default();
    headers.insert(
        ERROR_HEADER.into(),
        AMQPValue::LongString(reason.to_owned().into()),
    );
    let props = d.properties.clone().with_headers(headers);
    let confirm = ch
        .basic_publish(
            &names.dlx,
            d.routing_key.as_str(),
            BasicPublishOptions::default(),
            &d.data,
            props,
        )
        .await?
        .await?;
    match confirm {
        Confirmation::Nack(_) => Err(SessionError::Nacked),
        _ => Ok(()),
    }
}
