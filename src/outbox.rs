//! The outbox relay: claims unpublished events (`FOR UPDATE SKIP LOCKED`, so replicas share
//! the work), publishes them persistently with pipelined publisher confirms, and marks them
//! published only after every confirm arrived. At-least-once: a crash between confirm and
//! mark republishes the same `event_id`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use sqlx::postgres::PgListener;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::amqp::topology;
use crate::amqp::{self, Outgoing, PublishError, Publisher};
use crate::config::Settings;

const CLAIM: &str = "SELECT id, event_id, routing_key, payload::text AS payload, created_at
       FROM credit.outbox WHERE published_at IS NULL
      ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED";

const MARK: &str = "UPDATE credit.outbox SET published_at = now() WHERE id = ANY($1::int8[])";

const BACKLOG: &str = "SELECT count(*) AS n FROM credit.outbox WHERE published_at IS NULL";

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

/// An unpublished event as claimed.
#[derive(Debug, sqlx::FromRow)]
struct Claimed {
    id: i64,
    event_id: String,
    routing_key: String,
    payload: String,
    created_at: DateTime<Utc>,
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
            if drain.is_cancelled() && n == 0 {
                info!("outbox flushed");
                let _ = conn.close(200, "shutdown".into()).await;
                return Ok(());
            }
            if n > 0 {
                continue;
            }
            // Woken by NOTIFY from any writer; the timeout covers a lost notification.
            tokio::select! {
                r = listener.recv() => { r?; }
                _ = tokio::time::sleep(Duration::from_millis(500)) => {
                    let backlog: i64 = sqlx::query_scalar(BACKLOG).fetch_one(&self.pool).await?;
                    metrics::gauge!("credit_outbox_backlog").set(backlog as f64);
                }
                _ = drain.cancelled() => {}
                _ = hard_stop.cancelled() => {}
            }
        }
    }
}

/// Publishes up to `limit` events in one transaction; returns how many.
pub(crate) async fn publish_batch(
    pool: &PgPool,
    publisher: &Publisher,
    exchange: &str,
    limit: i64,
) -> Result<usize, RelayError> {
    let mut tx = pool.begin().await?;
    let rows: Vec<Claimed> = sqlx::query_as(CLAIM)
        .bind(limit)
        .fetch_all(&mut *tx)
        .await?;
    if rows.is_empty() {
        tx.rollback().await?;
        return Ok(0);
    }
    let started = Instant::now();
    let now = Utc::now();
    for row in &rows {
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
    let ids: Vec<i64> = rows.iter().map(|r| r.id).collect();
    sqlx::query(MARK).bind(&ids).execute(&mut *tx).await?;
    tx.commit().await?;
    metrics::counter!("credit_events_published_total").increment(ids.len() as u64);
    metrics::histogram!("credit_outbox_publish_seconds").record(started.elapsed().as_secs_f64());
    Ok(ids.len())
}
