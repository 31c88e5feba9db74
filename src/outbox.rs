//! The outbox relay: publishes committed events in id order from the relays' watermark
//! (`credit.outbox_relay`, locked `FOR UPDATE SKIP LOCKED`, so replicas take turns and a
//! user's events go out in order), persistently with pipelined publisher confirms, and moves
//! the watermark past them only after every confirm arrived. At-least-once: a crash between
//! confirm and the watermark's commit republishes the same `event_id`s.
//!
//! Ids are drawn in commit order (migration 0005), so an event never becomes visible below a
//! watermark the relay already moved past.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use sqlx::postgres::PgListener;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::amqp::topology;
use crate::amqp::{self, Outgoing, PublishError, Publisher};
use crate::config::Settings;
use crate::ledger::store::{self, StoredEvent};

/// Events published per transaction.
pub(crate) const BATCH: i64 = 1000;

#[derive(Debug, thiserror::Error)]
pub(crate) enum RelayError {
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    #[error("broker: {0}")]
    Amqp(#[from] lapin::Error),
    #[error("event {event_id}: {source}")]
    Publish {
        event_id: String,
        source: PublishError,
    },
}

pub(crate) struct Relay {
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
        let flushed = amqp::reconnecting("outbox relay", &hard_stop, || {
            self.session(&drain, &hard_stop)
        })
        .await;
        if !flushed {
            warn!("outbox not fully flushed at shutdown; the next start publishes the rest");
        }
        watchdog.abort();
    }

    async fn session(
        &self,
        drain: &CancellationToken,
        hard_stop: &CancellationToken,
    ) -> Result<(), RelayError> {
        let conn = crate::amqp::connect(&self.settings.amqp, "credit-worker outbox").await?;
        let publisher = Publisher::open(&conn).await?;
        let exchange = self.settings.name(topology::EVENTS);
        topology::declare_events_exchange(publisher.channel(), &exchange).await?;
        let mut listener = PgListener::connect_with(&self.pool).await?;
        listener.listen("credit_outbox").await?;
        loop {
            if hard_stop.is_cancelled() {
                return Ok(());
            }
            let n = publish_batch(&self.pool, &publisher, &exchange, BATCH).await?;
            if n == BATCH as usize {
                continue;
            }
            if drain.is_cancelled() {
                // Draining: no notification is awaited; go on until the outbox is empty.
                if n == 0 {
                    info!("outbox flushed");
                    let _ = conn.close(200, "shutdown".into()).await;
                    return Ok(());
                }
                continue;
            }
            // Woken by NOTIFY from any writer. A writer that committed during this round has
            // its notification waiting already, so a round that found fewer than a batch need
            // not be followed by a look that usually finds nothing; the timeout covers a lost
            // notification.
            tokio::select! {
                r = listener.recv() => { r?; }
                _ = tokio::time::sleep(Duration::from_millis(500)) => {
                    let backlog = store::unpublished_events(&self.pool).await?;
                    metrics::gauge!("credit_outbox_backlog").set(backlog as f64);
                }
                _ = drain.cancelled() => {}
                _ = hard_stop.cancelled() => {}
            }
        }
    }
}

/// Publishes up to `limit` events after the watermark in one transaction and moves the
/// watermark past them; returns how many (0 also while another relay holds the watermark).
pub(crate) async fn publish_batch(
    pool: &PgPool,
    publisher: &Publisher,
    exchange: &str,
    limit: i64,
) -> Result<usize, RelayError> {
    let mut tx = pool.begin().await?;
    let Some(watermark) = store::lock_watermark(&mut tx).await? else {
        tx.rollback().await?;
        return Ok(0);
    };
    let rows = store::events_after(&mut tx, watermark, limit).await?;
    let Some(through) = rows.last().map(|r| r.id) else {
        tx.rollback().await?;
        return Ok(0);
    };
    let started = Instant::now();
    publish(publisher, exchange, &rows).await?;
    store::advance_watermark(&mut tx, through).await?;
    tx.commit().await?;
    metrics::counter!("credit_events_published_total").increment(rows.len() as u64);
    metrics::histogram!("credit_outbox_publish_seconds").record(started.elapsed().as_secs_f64());
    Ok(rows.len())
}

/// Publishes `rows` in order and waits for every confirm.
async fn publish(
    publisher: &Publisher,
    exchange: &str,
    rows: &[StoredEvent],
) -> Result<(), RelayError> {
    let now = Utc::now();
    for row in rows {
        let lag = (now - row.created_at).num_microseconds().unwrap_or(0) as f64 / 1e6;
        metrics::histogram!("credit_outbox_publish_lag_seconds").record(lag.max(0.0));
    }
    let messages: Vec<Outgoing<'_>> = rows
        .iter()
        .map(|row| Outgoing {
            exchange,
            routing_key: &row.routing_key,
            body: row.payload.as_bytes(),
            properties: amqp::event_properties(&row.event_id, now),
        })
        .collect();
    publisher.publish_all(messages).await.map_err(|source| {
        let index = match &source {
            PublishError::Nacked { index } => *index,
            _ => 0,
        };
        RelayError::Publish {
            event_id: rows
                .get(index)
                .map(|r| r.event_id.clone())
                .unwrap_or_default(),
            source,
        }
    })?;
    Ok(())
}
