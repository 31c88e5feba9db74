//! `credit-worker run`: the consumer, outbox relay, refill scheduler, control queue and HTTP
//! endpoints under one shutdown token. Shutdown order: stop consuming → finish and ack the
//! batch in flight → flush the outbox → exit.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use sqlx::PgPool;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::config::Settings;
use crate::consumer::Consumer;
use crate::cost::CostTable;
use crate::decide::Pricing;
use crate::ledger::{Ledger, LedgerPolicy};
use crate::outbox::Relay;
use crate::refill::{self, Month};
use crate::telemetry::Health;

/// Loads the cost table named by `cost.table`, or the built-in one.
pub fn load_costs(settings: &Settings) -> anyhow::Result<CostTable> {
    let table = match &settings.cost.table {
        None => CostTable::builtin()?,
        Some(path) => CostTable::load(path)?,
    };
    Ok(table)
}

/// Connects to PostgreSQL (creating and migrating the database), retrying transient failures
/// until `stop` fires.
pub async fn connect_db(settings: &Settings, stop: &CancellationToken) -> anyhow::Result<PgPool> {
    let mut delays = crate::retry::backoff();
    loop {
        match crate::db::connect_and_migrate(&settings.database).await {
            Ok(pool) => return Ok(pool),
            Err(e) if crate::db::is_transient(&e) || is_migrate_io(&e) => {
                warn!(error = %e, "database unreachable; retrying");
                if !crate::retry::pause(&mut delays, stop).await {
                    anyhow::bail!("stopped before the database was reachable");
                }
            }
            Err(e) => return Err(anyhow::anyhow!("database: {e}")),
        }
    }
}

fn is_migrate_io(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Migrate(m) if matches!(**m, sqlx::migrate::MigrateError::Execute(ref inner) if crate::db::is_transient(inner)))
}

/// A running worker.
pub struct Worker {
    pub shutdown: CancellationToken,
    pub pool: PgPool,
    pub health: Arc<Health>,
    task: JoinHandle<anyhow::Result<()>>,
}

impl Worker {
    /// Starts every part of the service. Fails early on a bad cost table or an unreachable
    /// HTTP address; waits for the database, retrying.
    pub async fn start(settings: Settings) -> anyhow::Result<Worker> {
        Self::start_with(settings, CancellationToken::new()).await
    }

    /// [`Worker::start`] under a caller's shutdown token, so a signal that arrives while the
    /// database is still unreachable stops the start-up too.
    pub async fn start_with(
        settings: Settings,
        shutdown: CancellationToken,
    ) -> anyhow::Result<Worker> {
        // Install the recorder before any part records, so no early metric is lost.
        crate::telemetry::metrics_handle();
        let settings = Arc::new(settings);
        let costs = load_costs(&settings)?;
        info!(blocks = costs.block_count(), "cost table loaded");
        let pool = connect_db(&settings, &shutdown).await?;
        let health = Health::new();
        let pricing = Arc::new(Pricing::from_settings(&settings, costs));
        let http_listener = match settings.http.listen {
            None => None,
            Some(addr) => Some(
                tokio::net::TcpListener::bind(addr)
                    .await
                    .map_err(|e| anyhow::anyhow!("http.listen: cannot bind {addr}: {e}"))?,
            ),
        };
        let task = tokio::spawn(supervise(
            settings,
            pool.clone(),
            pricing,
            health.clone(),
            shutdown.clone(),
            http_listener,
        ));
        Ok(Worker {
            shutdown,
            pool,
            health,
            task,
        })
    }

    /// Requests a graceful stop and waits for it.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        self.task.await?
    }

    /// Waits until the worker stops by itself or on `shutdown`.
    pub async fn wait(self) -> anyhow::Result<()> {
        self.task.await?
    }
}

async fn supervise(
    settings: Arc<Settings>,
    pool: PgPool,
    pricing: Arc<Pricing>,
    health: Arc<Health>,
    shutdown: CancellationToken,
    http_listener: Option<tokio::net::TcpListener>,
) -> anyhow::Result<()> {
    let consumer = Consumer {
        settings: settings.clone(),
        pool: pool.clone(),
        pricing: pricing.clone(),
        health: health.clone(),
    };
    let consumer_task = tokio::spawn({
        let stop = shutdown.clone();
        async move { consumer.run(stop).await }
    });
    let drain = CancellationToken::new();
    let relay = Relay {
        settings: settings.clone(),
        pool: pool.clone(),
    };
    let relay_task = tokio::spawn({
        let drain = drain.clone();
        async move { relay.run(drain, Duration::from_secs(10)).await }
    });
    let ledger = Ledger::new(pool.clone(), LedgerPolicy::from_settings(&settings));
    let control_task = tokio::spawn(crate::control::serve(
        settings.clone(),
        ledger.clone(),
        shutdown.clone(),
    ));
    let scheduler_task = tokio::spawn(run_scheduler(
        settings.clone(),
        pool.clone(),
        shutdown.clone(),
    ));
    let http_stop = CancellationToken::new();
    let http_task = http_listener.map(|listener| {
        let app_state = (health.clone(), pool.clone(), http_stop.clone());
        tokio::spawn(async move {
            crate::telemetry::serve_on(listener, app_state.0, app_state.1, app_state.2).await
        })
    });

    let _ = consumer_task.await;
    info!("consumer stopped; flushing the outbox");
    drain.cancel();
    let _ = relay_task.await;
    let _ = control_task.await;
    scheduler_task.abort();
    http_stop.cancel();
    if let Some(t) = http_task {
        if let Ok(Err(e)) = t.await {
            error!(error = %e, "http server failed");
        }
    }
    pool.close().await;
    info!("stopped");
    Ok(())
}

/// Sleeps until each cron tick and runs the sweep for that tick's month. At start it catches
/// up a sweep of the current month whose tick has already passed. Replicas coordinate with an
/// advisory lock; the ledger keys make a duplicate run harmless anyway.
async fn run_scheduler(settings: Arc<Settings>, pool: PgPool, stop: CancellationToken) {
    if !settings.refill.enabled {
        return;
    }
    let schedule = settings.refill.schedule.parsed();
    if let Some(tick) = schedule.due_this_month(Utc::now()) {
        info!(%tick, "catching up this month's refill sweep");
        scheduled_sweep(&settings, &pool, Month::of(tick), &stop).await;
    }
    loop {
        let Some(next) = schedule.next_after(Utc::now()) else {
            return;
        };
        let wait = (next - Utc::now()).to_std().unwrap_or(Duration::ZERO);
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.cancelled() => return,
        }
        scheduled_sweep(&settings, &pool, Month::of(next), &stop).await;
    }
}

/// Key of the advisory lock that lets one replica sweep at a time.
const SWEEP_LOCK: i64 = 0x6372_6564_6974; // "credit"

async fn scheduled_sweep(
    settings: &Settings,
    pool: &PgPool,
    month: Month,
    stop: &CancellationToken,
) {
    let policy = crate::ledger::RefillPolicy {
        target: settings.refill.target,
    };
    let mut delays = crate::retry::backoff();
    loop {
        match sweep_once(pool, policy, month, settings.refill.chunk_size).await {
            Ok(Some(r)) => {
                info!(month = %r.month, users_refilled = r.users_refilled, credits_granted = r.credits_granted, users_evaluated = r.users_evaluated, duration_ms = r.duration_ms, "refill sweep done");
                return;
            }
            Ok(None) => {
                info!(%month, "refill sweep running on another replica; skipped");
                return;
            }
            Err(e) => {
                warn!(error = %e, %month, "refill sweep failed; retrying");
                if !crate::retry::pause(&mut delays, stop).await {
                    return;
                }
            }
        }
    }
}

async fn sweep_once(
    pool: &PgPool,
    policy: crate::ledger::RefillPolicy,
    month: Month,
    chunk: i64,
) -> Result<Option<refill::SweepReport>, crate::ledger::LedgerError> {
    let mut lock_conn = pool.acquire().await?;
    let got: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
        .bind(SWEEP_LOCK)
        .fetch_one(&mut *lock_conn)
        .await?;
    if !got {
        return Ok(None);
    }
    let result = refill::sweep(pool, policy, month, None, chunk, |_| {}).await;
    let _ = sqlx::query("SELECT pg_advisory_unlock($1)")
        .bind(SWEEP_LOCK)
        .execute(&mut *lock_conn)
        .await;
    result.map(Some)
}
