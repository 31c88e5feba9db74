//! The AMQP side of the input: deliveries from `node_execution` → batches →
//! [`process::process_batch`] → actions applied (dead-letter, then one multiple-ack).
//!
//! A collector task gathers deliveries into a batch (up to `pipeline.max_batch`, waiting at
//! most `pipeline.max_wait_ms` after the first, and growing further while the previous batch
//! is still being decided). Acks come only after the decision transaction committed; a
//! transient fault is retried with backoff and never produces a decision or an ack.

pub mod process;

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions,
};
use lapin::publisher_confirm::Confirmation;
use lapin::types::{AMQPValue, FieldTable};
use lapin::Channel;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn, Instrument};

use crate::config::Settings;
use crate::telemetry::Health;
use crate::topology::{self, Names};
use process::{process_batch, Action, DbDecider};

/// Header naming why a message was dead-lettered.
pub const ERROR_HEADER: &str = "x-credit-error";

#[derive(Clone)]
pub struct Consumer {
    pub settings: Arc<Settings>,
    pub decider: DbDecider,
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
        let bodies: Vec<&[u8]> = batch.iter().map(|d| d.data.as_slice()).collect();
        let Some(actions) = process_batch(&self.decider, &bodies, stop).await else {
            return Ok(false);
        };
        metrics::histogram!("credit_decide_transaction_seconds")
            .record(started.elapsed().as_secs_f64());
        for (d, (action, ids)) in batch.iter().zip(&actions) {
            if let Action::DeadLetter { reason } = action {
                let span = ids.span();
                dead_letter(dead_ch, names, d, reason)
                    .instrument(span)
                    .await?;
            }
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
