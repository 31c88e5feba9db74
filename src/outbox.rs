//! The outbox relay: claims unpublished events (`FOR UPDATE SKIP LOCKED`, so replicas share
//! the work), publishes them persistently with pipelined publisher confirms, and marks them
//! published only after every confirm arrived. At-least-once: a crash between confirm and
//! mark republishes the same `event_id`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::publisher_confirm::Confirmation;
use lapin::{BasicProperties, Channel};
use sqlx::postgres::PgListener;
use sqlx::{PgPool, Row};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::Settings;
use crate::topology;

const CLAIM: &str = "SELECT id, event_id, routing_key, payload::text AS payload, created_at
       FROM credit.outbox WHERE published_at IS NULL
      ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED";

const MARK: &str = "UPDATE credit.outbox SET published_at = now() WHERE id = ANY($1::int8[])";

const BACKLOG: &str = "SELECT count(*) AS n FROM credit.outbox WHERE published_at IS NULL";

/// Events published per transaction.
pub const BATCH: i64 = 1000;

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    #[error("broker: {0}")]
    Amqp(#[from] lapin::Error),
    #[error("broker: event {0} was not confirmed")]
    Nacked(String),
}

pub struct Relay {
    pub settings: Arc<Settings>,
    pub pool: PgPool,
}

impl Relay {
    /// Publishes until `drain` fires, then until the outbox is empty (bounded by
    /// `drain_timeout` so a dead broker cannot hold shutdown forever).
    pub async fn run(&self, drain: CancellationToken, drain_timeout: Duration) {
        let hard_stop = CancellationToken::new();
        let watchdog = {
            let hard_stop = hard_stop.clone();
            let drain = drain.clone();
            tokio::spawn(async move {
                drain.cancelled().await;
                tokio::time::sleep(drain_timeout).await;
                hard_stop.cancel();
            })
        };
        let mut delays = crate::retry::backoff();
        loop {
            match self.session(&drain, &hard_stop).await {
                Ok(()) => break,
                Err(e) => {
                    warn!(error = %e, "outbox relay interrupted; retrying");
                    if !crate::retry::pause(&mut delays, &hard_stop).await {
                        warn!("outbox not fully flushed at shutdown; the next start publishes the rest");
                        break;
                    }
                }
            }
        }
        watchdog.abort();
    }

    async fn session(
        &self,
        drain: &CancellationToken,
        hard_stop: &CancellationToken,
    ) -> Result<(), RelayError> {
        let conn = topology::connect(&self.settings.amqp.url, "credit-worker outbox").await?;
        let ch = conn.create_channel().await?;
        ch.confirm_select(ConfirmSelectOptions::default()).await?;
        let exchange = self.settings.name(topology::EVENTS);
        topology::declare_events_exchange(&ch, &exchange).await?;
        let mut listener = PgListener::connect_with(&self.pool).await?;
        listener.listen("credit_outbox").await?;
        loop {
            if hard_stop.is_cancelled() {
                return Ok(());
            }
            let n = publish_batch(&self.pool, &ch, &exchange, BATCH).await?;
            if n == BATCH as usize {
                continue;
            }
            if drain.is_cancelled() && n == 0 {
                info!("outbox flushed");
                let _ = conn.close(200, "shutdown").await;
                return Ok(());
            }
            if n > 0 {
                continue;
            }
            // Woken by NOTIFY from any writer; the timeout covers a lost notification.
            tokio::select! {
                r = listener.recv() => { r?; }
                _ = tokio::time::sleep(Duration::from_millis(500)) => {
                    let backlog: i64 = sqlx::query(BACKLOG).fetch_one(&self.pool).await?.try_get("n")?;
                    metrics::gauge!("credit_outbox_backlog").set(backlog as f64);
                }
                _ = drain.cancelled() => {}
                _ = hard_stop.cancelled() => {}
            }
        }
    }
}

/// Publishes up to `limit` events in one transaction; returns how many.
pub async fn publish_batch(
    pool: &PgPool,
    ch: &Channel,
    exchange: &str,
    limit: i64,
) -> Result<usize, RelayError> {
    let mut tx = pool.begin().await?;
    let rows = sqlx::query(CLAIM).bind(limit).fetch_all(&mut *tx).await?;
    if rows.is_empty() {
        tx.rollback().await?;
        return Ok(0);
    }
    let started = Instant::now();
    let mut ids = Vec::with_capacity(rows.len());
    let mut pending = Vec::with_capacity(rows.len());
    let now = chrono::Utc::now();
    for row in &rows {
        let id: i64 = row.try_get("id")?;
        let event_id: String = row.try_get("event_id")?;
        let routing_key: String = row.try_get("routing_key")?;
        let payload: String = row.try_get("payload")?;
        let created: chrono::DateTime<chrono::Utc> = row.try_get("created_at")?;
        let lag = (now - created).num_microseconds().unwrap_or(0) as f64 / 1e6;
        metrics::histogram!("credit_outbox_publish_lag_seconds").record(lag.max(0.0));
        let props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type("application/json".into())
            .with_message_id(event_id.as_str().into())
            .with_timestamp(u64::try_from(now.timestamp()).unwrap_or(0));
        let confirm = ch
            .basic_publish(
                exchange,
                &routing_key,
                BasicPublishOptions::default(),
                payload.as_bytes(),
                props,
            )
            .await?;
        pending.push((event_id, confirm));
        ids.push(id);
    }
    for (event_id, confirm) in pending {
        if let Confirmation::Nack(_) = confirm.await? {
            return Err(RelayError::Nacked(event_id));
        }
    }
    sqlx::query(MARK).bind(&ids).execute(&mut *tx).await?;
    tx.commit().await?;
    metrics::counter!("credit_events_published_total").increment(ids.len() as u64);
    metrics::histogram!("credit_outbox_publish_seconds").record(started.elapsed().as_secs_f64());
    Ok(ids.len())
}
