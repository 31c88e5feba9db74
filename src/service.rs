//! `credit-worker run`: the composition root. It builds every part from the settings and
//! supervises their tasks in one place: the consumer, the outbox relay, the control queue, the
//! refill scheduler and the HTTP endpoints. Shutdown (SIGTERM, or the first task to end
//! unexpectedly) drains in one order: stop consuming → finish and ack the batches in flight →
//! flush the outbox → stop the rest. A task that ended unexpectedly makes the worker exit
//! non-zero, so a process manager restarts it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use tokio::task::{JoinError, JoinHandle};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::clock::{Clock, SystemClock};
use crate::config::Settings;
use crate::consumer::process::DbDecider;
use crate::consumer::Consumer;
use crate::cost::{CostTable, Estimates};
use crate::health::Health;
use crate::ledger::{identity, Ledger};
use crate::outbox::Relay;
use crate::refill::{Schedule, Scheduler};

/// Loads the cost table named by `cost.table`, or the built-in one.
pub(crate) fn load_costs(settings: &Settings) -> anyhow::Result<CostTable> {
    use anyhow::Context as _;
    let table = match &settings.cost.table {
        None => CostTable::builtin()?,
        Some(path) => CostTable::load(path).context("cost.table")?,
    };
    let estimates = match &settings.cost.preflight_estimates {
        None => Estimates::builtin()?,
        Some(path) => Estimates::load(path).context("cost.preflight_estimates")?,
    };
    Ok(table.with_estimates(estimates))
}

/// What a start reads besides the settings, checked: the cost table with its estimates, and a
/// refill schedule with a tick left after `now` (30 February, a past year would leave the
/// month's sweep silently undone). `run`, `outcome` and `migrate` check them, so the new
/// build's `outcome` or `migrate` names a mistake before an upgrade, not the first replica to
/// restart after it.
pub(crate) fn check_inputs(
    settings: &Settings,
    now: chrono::DateTime<chrono::Utc>,
) -> anyhow::Result<CostTable> {
    let costs = load_costs(settings)?;
    let schedule = settings.refill.schedule.parsed();
    if settings.refill.enabled && schedule.next_after(now).is_none() {
        anyhow::bail!(
            "refill.schedule: {:?} never fires after {} (UTC)",
            settings.refill.schedule.as_str(),
            now.format("%Y-%m-%d %H:%M:%S")
        );
    }
    Ok(costs)
}

/// Connects to PostgreSQL (creating and migrating the database), retrying transient failures
/// until `stop` fires.
pub(crate) async fn connect_db(
    settings: &Settings,
    stop: &CancellationToken,
) -> anyhow::Result<()> {
    let mut delays = crate::retry::backoff();
    loop {
        // A stop ends the wait: a server that does not answer, or another process's migration
        // holding the lock, may keep `prepare` waiting for longer than a stop may take.
        let prepared = tokio::select! {
            prepared = crate::db::prepare(&settings.database) => prepared,
            _ = stop.cancelled() => anyhow::bail!("stopped before the database was reachable"),
        };
        match prepared {
            Ok(()) => return Ok(()),
            // Before the retry: a refused login is transient to a running worker (a password
            // being rotated), a mistake in the URL at start.
            Err(e) if crate::db::is_login_refused(&e) => return Err(not_ready(e, settings)),
            Err(e) if crate::db::is_transient(&e) || is_passing_migration_fault(&e) => {
                warn!(error = %e, "database not ready (unreachable, read-only, short of resources, or a migration waiting for a lock); retrying");
                if !crate::retry::pause(&mut delays, stop).await {
                    anyhow::bail!("stopped before the database was reachable");
                }
            }
            Err(e) => return Err(not_ready(e, settings)),
        }
    }
}

/// A start's database error as an operator reads it: a refused login, a certificate, a
/// database not this build's named as such, anything else as the database's.
fn not_ready(e: sqlx::Error, settings: &Settings) -> anyhow::Error {
    match crate::db::NotReady::of(e, &crate::db::database_name(&settings.database)) {
        crate::db::NotReady::Sql(e) => anyhow::anyhow!("database: {e}"),
        named => named.into(),
    }
}

/// Moves the outbox's sequence past the ids in use, with a warning when it was behind
/// ([`crate::ledger::mend_outbox_ids`]). A failure is only logged: every statement that writes
/// events does the same first (migration 0025).
async fn mend_outbox_ids(pool: &PgPool) {
    let mended = async {
        let mut conn = pool.acquire().await?;
        crate::ledger::mend_outbox_ids(&mut conn).await
    };
    if let Err(e) = mended.await {
        warn!(error = %e, "could not check the outbox's sequence; the next event's insert will");
    }
}

/// The database made ready for the parts: reachable and migrated, its clock checked, and its
/// ledger bound to this worker's namespace (the first start binds it; one of another
/// namespace is refused here, before it consumes or publishes anything). Returns the ledger's
/// id.
async fn ready_database(
    settings: &Settings,
    pool: &PgPool,
    stop: &CancellationToken,
) -> anyhow::Result<Arc<str>> {
    connect_db(settings, stop).await?;
    crate::clock::check_against_database(pool).await?;
    refuse_without_privileges(pool, settings.outbox.retention_s > 0).await?;
    let mut delays = crate::retry::backoff();
    loop {
        match identity::bind(pool, &settings.amqp.namespace).await {
            Ok(identity) => {
                mend_outbox_ids(pool).await;
                return Ok(identity.ledger_id.into());
            }
            // A standby not yet promoted, a lost connection: waited out, as at the connect.
            Err(e) if e.is_transient() => {
                warn!(error = %e, "binding the ledger to the namespace failed; retrying");
                if !crate::retry::pause(&mut delays, stop).await {
                    anyhow::bail!("stopped before the database was reachable");
                }
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// A role without a grant `run` needs is refused here, with each one named. A check that
/// cannot run (a lost connection) is only logged: the statements that need the grants will
/// name a missing one.
async fn refuse_without_privileges(pool: &PgPool, prunes: bool) -> anyhow::Result<()> {
    match crate::ledger::privileges::refusal(pool, prunes).await {
        Ok(None) => Ok(()),
        Ok(Some(refusal)) => Err(anyhow::anyhow!(refusal)),
        Err(e) => {
            warn!(error = %e, "could not check the role's privileges on the ledger");
            Ok(())
        }
    }
}

/// A broker that refuses the URL's login or virtual host, or (`amqps://`) whose certificate
/// does not verify, stops the start, as the database's does: no retry will fix either. An
/// unreachable broker does not; the sessions retry. Once running, a refused login is retried
/// like any lost connection (credentials being rotated).
async fn check_broker(
    amqp: &crate::config::AmqpSettings,
    stop: &CancellationToken,
) -> anyhow::Result<()> {
    tokio::select! {
        checked = broker_accepts(amqp) => checked,
        _ = stop.cancelled() => anyhow::bail!("stopped before the broker answered"),
    }
}

/// How long the start check waits for the broker to close its connection: one that goes
/// silent after the login would otherwise hold the start.
const CHECK_CLOSE: Duration = Duration::from_secs(2);

async fn broker_accepts(amqp: &crate::config::AmqpSettings) -> anyhow::Result<()> {
    match crate::amqp::connect_publisher(amqp, "credit-worker start check").await {
        Ok(conn) => {
            let _ = tokio::time::timeout(CHECK_CLOSE, conn.close(200, "checked".into())).await;
            Ok(())
        }
        Err(e) => match crate::amqp::refused(e) {
            Ok(named) => Err(named.into()),
            Err(e) => {
                warn!(error = %e, "broker unreachable at start; retrying in the background");
                Ok(())
            }
        },
    }
}

/// Raises the soft limit of open files to the hard one, as a server should (a shell's default
/// soft limit can be as low as 256, and each connection, pooled session and HTTP client takes
/// one); refuses a start where even the hard limit leaves too few. Short of descriptors the
/// worker would not fail: its broker connections would fail to open one after another (the
/// AMQP client's I/O threads panic), it would report the database down, and stall.
fn open_files(settings: &Settings) -> anyhow::Result<()> {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => {
            enough_files(limit, settings.database.max_connections).map_err(|e| anyhow::anyhow!(e))
        }
        // Not raised, not known: the start goes on as before.
        Err(e) => {
            warn!(error = %e, "the open files limit could not be raised");
            Ok(())
        }
    }
}

/// Descriptors the worker needs besides its pooled database sessions: the relay's and a
/// sweep's sessions, four broker connections and their I/O threads, the HTTP listener and
/// its clients, the log, and room.
const FILES_BESIDES_POOL: u64 = 64;

/// Whether `limit` open files leave enough for `max_connections` pooled sessions.
fn enough_files(limit: u64, max_connections: u32) -> Result<(), String> {
    let needed = u64::from(max_connections) + FILES_BESIDES_POOL;
    if limit >= needed {
        return Ok(());
    }
    Err(format!(
        "open files: the limit is {limit} (its hard limit included), and the worker needs at \
         least {needed} (database.max_connections {max_connections} + {FILES_BESIDES_POOL}): \
         raise it (`ulimit -n`, LimitNOFILE= in a systemd unit, --ulimit nofile= for Docker)"
    ))
}

/// A migration that failed for a reason that clears (a lost connection, its 250 ms lock
/// timeout behind a long read): the start tries again.
fn is_passing_migration_fault(e: &sqlx::Error) -> bool {
    use sqlx::migrate::MigrateError;
    let sqlx::Error::Migrate(m) = e else {
        return false;
    };
    match &**m {
        MigrateError::Execute(inner) | MigrateError::ExecuteMigration(inner, _) => {
            crate::db::clears_by_itself(inner)
        }
        _ => false,
    }
}

/// A running worker.
pub struct Worker {
    pub shutdown: CancellationToken,
    pub pool: PgPool,
    pub health: Arc<Health>,
    http_addr: Option<SocketAddr>,
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
    pub(crate) async fn start_with(
        settings: Settings,
        shutdown: CancellationToken,
    ) -> anyhow::Result<Worker> {
        Self::start_with_clock(settings, shutdown, Arc::new(SystemClock)).await
    }

    /// [`Worker::start_with`] on `clock`: the decisions, the control commands and the refill
    /// scheduler take the date from it.
    pub async fn start_with_clock(
        settings: Settings,
        shutdown: CancellationToken,
        clock: Arc<dyn Clock>,
    ) -> anyhow::Result<Worker> {
        // Install the recorder before any part records, so no early metric is lost.
        crate::telemetry::metrics_handle();
        open_files(&settings)?;
        let costs = check_inputs(&settings, clock.now())?;
        info!(blocks = costs.block_count(), "cost table loaded");
        info!(
            database = %crate::redact::url(&settings.database.url),
            broker = %crate::redact::url(&settings.amqp.url),
            "connecting"
        );
        let schedule = settings.refill.schedule.parsed().clone();
        let pool = crate::db::pool(&settings.database)
            .map_err(|e| anyhow::anyhow!("database.url: {e}"))?;
        let health = Health::new();
        // Served from here on: while the database is still unreachable, /healthz answers and
        // /readyz says 503, instead of a bound port that never replies.
        let http = HttpServer::start(&settings, &health, &pool).await?;
        let http_addr = http.as_ref().map(|h| h.addr);
        // Side by side, and the first refusal ends the start: a broker that never answers
        // holds its check for the connect bound, and a database that does not answer holds
        // its connect until a stop.
        let database = ready_database(&settings, &pool, &shutdown);
        let ready = tokio::try_join!(check_broker(&settings.amqp, &shutdown), database);
        let ledger_id = match ready {
            Ok(((), ledger_id)) => ledger_id,
            Err(e) => {
                if let Some(h) = http {
                    h.stop().await;
                }
                return Err(e);
            }
        };
        let started = Started {
            pool: pool.clone(),
            health: health.clone(),
            http,
            ledger_id,
        };
        let parts = Parts::build(settings, costs, schedule, clock, started);
        let task = tokio::spawn(parts.supervise(shutdown.clone()));
        Ok(Worker {
            shutdown,
            pool,
            health,
            http_addr,
            task,
        })
    }

    /// The address the HTTP endpoints listen on (useful with port 0).
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http_addr
    }

    /// Requests a graceful stop and waits for it.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        self.task.await?
    }

    /// Waits until the worker stops by itself or on `shutdown`. An error when a task ended
    /// unexpectedly.
    pub async fn wait(self) -> anyhow::Result<()> {
        self.task.await?
    }
}

/// The HTTP endpoints, served on a task of their own from the start on.
struct HttpServer {
    addr: SocketAddr,
    task: JoinHandle<()>,
    stop: CancellationToken,
}

impl HttpServer {
    /// Binds `http.listen` (None when it is unset) and serves on it. `/readyz` reads the
    /// database on a connection of its own: on the pool, it waits behind the batches when
    /// every connection is busy, and says `database: down` of a database that is up.
    async fn start(
        settings: &Settings,
        health: &Arc<Health>,
        pool: &PgPool,
    ) -> anyhow::Result<Option<HttpServer>> {
        let Some(addr) = settings.http.listen else {
            return Ok(None);
        };
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| anyhow::anyhow!("http.listen: cannot bind {addr}: {e}"))?;
        let addr = listener.local_addr()?;
        let stop = CancellationToken::new();
        let probe = crate::db::probe_pool(&settings.database)?;
        let (h, p, s) = (health.clone(), (pool.clone(), probe), stop.clone());
        let stall = settings.http.stall_after();
        let task = tokio::spawn(async move {
            if let Err(e) = crate::telemetry::serve_on(listener, (h, stall), p, s).await {
                error!(error = %e, "http server failed");
            }
        });
        Ok(Some(HttpServer { addr, task, stop }))
    }

    async fn stop(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

/// What the start made ready for the parts.
struct Started {
    pool: PgPool,
    health: Arc<Health>,
    http: Option<HttpServer>,
    /// The database's ledger, bound to the configured namespace.
    ledger_id: Arc<str>,
}

/// Every part of the service, built once from the settings.
struct Parts {
    pool: PgPool,
    health: Arc<Health>,
    consumer: Consumer,
    relay: Relay,
    control: crate::control::Context,
    scheduler: Option<Scheduler>,
    http: Option<HttpServer>,
}

impl Parts {
    fn build(
        settings: Settings,
        costs: CostTable,
        schedule: Schedule,
        clock: Arc<dyn Clock>,
        started: Started,
    ) -> Parts {
        let Started {
            pool,
            health,
            http,
            ledger_id,
        } = started;
        let settings = Arc::new(settings);
        let ledger = Ledger::new(pool.clone(), settings.ledger_policy());
        let scheduler = settings.refill_policy().map(|policy| Scheduler {
            pool: pool.clone(),
            policy,
            schedule,
            chunk: settings.refill.chunk_size,
            clock: clock.clone(),
            stall: crate::db::stall_bound(&settings.database),
        });
        // Whose copies (dead letters, replays) carry the producer in a header.
        let own_user = crate::amqp::producer::own_user(&settings.amqp.url);
        Parts {
            pool: pool.clone(),
            health: health.clone(),
            consumer: Consumer {
                settings: settings.clone(),
                decider: DbDecider {
                    pool: pool.clone(),
                    pricing: Arc::new(settings.pricing(costs)),
                    clock: clock.clone(),
                    stall: crate::db::stall_bound(&settings.database),
                },
                health: health.clone(),
                own_user: own_user.clone(),
                ledger_id: ledger_id.clone(),
            },
            relay: Relay {
                settings: settings.clone(),
                pool: pool.clone(),
                own_user: own_user.clone(),
                health: health.clone(),
                ledger_id: ledger_id.clone(),
                halt: CancellationToken::new(),
            },
            control: crate::control::Context {
                settings,
                ledger,
                clock,
                own_user,
                ledger_id,
            },
            scheduler,
            http,
        }
    }

    /// Runs every task until `shutdown` fires or one ends by itself, then drains in order.
    async fn supervise(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let drain = CancellationToken::new();
        let (mut tasks, running) = self.spawn(&shutdown, &drain);
        let failure = tasks.first_exit(&shutdown, &running.health).await;
        if let Some(f) = &failure {
            error!(task = f.task, cause = %f.cause, "task ended unexpectedly; shutting down");
            shutdown.cancel();
        }
        let failure = failure.or(running.stop(tasks, drain).await);
        info!("stopped");
        match failure {
            Some(f) => Err(anyhow::anyhow!("{} {}: {}", f.task, f.when, f.cause)),
            None => Ok(()),
        }
    }

    /// Starts every task: the writers stop on `shutdown`, the relay once `drain` fires.
    fn spawn(self, shutdown: &CancellationToken, drain: &CancellationToken) -> (Tasks, Running) {
        let Parts {
            pool,
            health,
            consumer,
            relay,
            control,
            scheduler,
            http,
        } = self;
        let mut tasks = Tasks::default();
        let stop = shutdown.clone();
        tasks.spawn("consumer", async move { consumer.run(stop).await });
        health.set_relaying(true);
        let d = drain.clone();
        let halt = relay.halt.clone();
        tasks.spawn("outbox relay", async move {
            relay.run(d, RELAY_HARD_STOP).await
        });
        let bound = identity::Bound {
            namespace: control.settings.amqp.namespace.clone(),
            ledger_id: control.ledger_id.clone(),
        };
        let stop = shutdown.clone();
        tasks.spawn(
            "control",
            crate::control::serve(control, health.clone(), stop),
        );
        // Ends the worker once its ledger is not the database's any more.
        let stop = shutdown.clone();
        let watch = identity::watch(pool.clone(), bound, halt, stop);
        tasks.spawn("ledger binding", watch);
        // Ends the worker once this host's clock is a minute or more from the database's.
        let stop = shutdown.clone();
        tasks.spawn("clock", crate::clock::watch(pool.clone(), stop));
        if let Some(s) = scheduler {
            let stop = shutdown.clone();
            tasks.spawn("refill scheduler", s.run(stop));
        }
        let http_stop = http.as_ref().map(|h| h.stop.clone()).unwrap_or_default();
        if let Some(h) = http {
            tasks.adopt("http", h.task);
        }
        let running = Running {
            pool,
            health,
            http_stop,
        };
        (tasks, running)
    }
}

/// What the drain needs besides the tasks.
struct Running {
    pool: PgPool,
    health: Arc<Health>,
    http_stop: CancellationToken,
}

impl Running {
    /// The drain order: every writer of the outbox (the consumer finishes and acks its batch, a
    /// command under way commits, a sweep is given up with its range in flight) → the relay,
    /// which flushes what they wrote → HTTP. Each step is bounded, so a stop ends within an
    /// orchestrator's usual 30 s grace whatever a task waits for. Returns the first failure.
    async fn stop(self, mut tasks: Tasks, drain: CancellationToken) -> Option<Failure> {
        let health = &self.health;
        let writers_by = Instant::now() + WRITERS_STOP;
        let mut failure = tasks.join("consumer", health, writers_by).await;
        info!("consumer stopped; waiting for control and the refill scheduler before flushing the outbox");
        failure = failure.or(tasks.join("control", health, writers_by).await);
        failure = failure.or(tasks.join("refill scheduler", health, writers_by).await);
        info!("flushing the outbox");
        drain.cancel();
        let relay_by = Instant::now() + RELAY_HARD_STOP + Duration::from_secs(1);
        failure = failure.or(tasks.join("outbox relay", health, relay_by).await);
        self.http_stop.cancel();
        let http_by = Instant::now() + Duration::from_secs(2);
        // A scrape or probe still open loses nothing if cut.
        let http = tasks.join_or("http", health, http_by, Late::Drops).await;
        failure = failure.or(http);
        if tokio::time::timeout(Duration::from_secs(2), self.pool.close())
            .await
            .is_err()
        {
            warn!("database connections still closing after 2 s; leaving them");
        }
        failure
    }
}

/// How long the outbox's writers (the consumer, control, the refill scheduler) have to stop
/// once asked. With the relay's 11 s and HTTP's and the pool's 2 s each, a stop takes at most
/// 27 s, within the 30 s grace process managers commonly give.
const WRITERS_STOP: Duration = Duration::from_secs(12);

/// How long the relay flushes the outbox before it stops whatever is left.
const RELAY_HARD_STOP: Duration = Duration::from_secs(10);

/// Which task ended on its own or failed to stop, and why.
struct Failure {
    task: &'static str,
    /// "ended unexpectedly" or "failed while stopping".
    when: &'static str,
    cause: String,
}

/// The service's tasks by name.
#[derive(Default)]
struct Tasks(Vec<(&'static str, JoinHandle<()>)>);

impl Tasks {
    fn spawn(
        &mut self,
        name: &'static str,
        f: impl std::future::Future<Output = ()> + Send + 'static,
    ) {
        self.0.push((name, tokio::spawn(f)));
    }

    /// Supervises a task spawned before the others.
    fn adopt(&mut self, name: &'static str, task: JoinHandle<()>) {
        self.0.push((name, task));
    }

    /// Waits for `shutdown` or for the first task to end, whichever comes first.
    async fn first_exit(
        &mut self,
        shutdown: &CancellationToken,
        health: &Health,
    ) -> Option<Failure> {
        let ended = futures::future::select_all(self.0.iter_mut().map(|(_, h)| h));
        let (result, i, _) = tokio::select! {
            biased;
            _ = shutdown.cancelled() => return None,
            ended = ended => ended,
        };
        let (task, _) = self.0.remove(i);
        mark_down(task, health);
        // Tasks end on a shutdown request too; one that raced the request is no failure.
        if shutdown.is_cancelled() && result.is_ok() {
            return None;
        }
        Some(Failure {
            task,
            when: "ended unexpectedly",
            cause: cause(result),
        })
    }

    /// Waits until `by` for the task named `name`, if it is still there, and aborts it then.
    /// A panic or an abort is a failure: the process exits non-zero.
    async fn join(&mut self, name: &str, health: &Health, by: Instant) -> Option<Failure> {
        self.join_or(name, health, by, Late::Fails).await
    }

    /// [`Tasks::join`], where a task still at work at `by` is a failure or, `Late::Drops`,
    /// only dropped: one whose unfinished work loses nothing (an HTTP request still open).
    async fn join_or(
        &mut self,
        name: &str,
        health: &Health,
        by: Instant,
        late: Late,
    ) -> Option<Failure> {
        let i = self.0.iter().position(|(n, _)| *n == name)?;
        let (task, mut handle) = self.0.remove(i);
        let ended = tokio::time::timeout_at(by, &mut handle).await;
        mark_down(task, health);
        let cause = match ended {
            Ok(Ok(())) => return None,
            Ok(Err(e)) => cause(Err(e)),
            Err(_) if late == Late::Drops => {
                handle.abort();
                warn!(task, "still at work at the stop; dropped");
                return None;
            }
            Err(_) => {
                handle.abort();
                "did not stop in time; abandoned".to_owned()
            }
        };
        error!(task, %cause, "task failed while stopping");
        Some(Failure {
            task,
            when: "failed while stopping",
            cause,
        })
    }
}

/// What a task still at work when its stop's time is up is ([`Tasks::join_or`]).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Late {
    Fails,
    Drops,
}

fn mark_down(task: &str, health: &Health) {
    match task {
        "consumer" => health.set_consuming(false),
        "outbox relay" => health.set_relaying(false),
        _ => {}
    }
}

fn cause(result: Result<(), JoinError>) -> String {
    match result {
        // Such as a session the broker refuses for good, whose reason is logged as it ends.
        Ok(()) => "returned without a shutdown request (its reason is logged above)".into(),
        Err(e) if e.is_panic() => {
            let payload = e.into_panic();
            format!(
                "panicked: {}",
                crate::telemetry::panic_text(payload.as_ref())
            )
        }
        Err(e) => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A migration stopped by something that clears is retried at start, whichever way sqlx
    /// reports it; one whose SQL is wrong is not.
    #[test]
    fn a_migration_that_failed_for_a_passing_reason_is_retried() {
        use sqlx::migrate::MigrateError;
        let io = || sqlx::Error::Io(std::io::Error::other("connection reset"));
        let migrate = |m: MigrateError| sqlx::Error::Migrate(Box::new(m));
        assert!(is_passing_migration_fault(&migrate(MigrateError::Execute(
            io()
        ))));
        assert!(is_passing_migration_fault(&migrate(
            MigrateError::ExecuteMigration(io(), 19)
        )));
        let bad = MigrateError::ExecuteMigration(sqlx::Error::RowNotFound, 19);
        assert!(!is_passing_migration_fault(&migrate(bad)));
        let cannot_read = std::io::Error::new(std::io::ErrorKind::InvalidData, "certificate");
        let tls = MigrateError::Execute(sqlx::Error::Io(cannot_read));
        assert!(!is_passing_migration_fault(&migrate(tls)));
        assert!(!is_passing_migration_fault(&migrate(
            MigrateError::VersionMissing(19)
        )));
    }

    /// A limit of open files below the pool's sessions and the rest is refused, naming the
    /// numbers and how to raise it; one at the bound is enough.
    #[test]
    fn too_few_open_files_are_refused_with_the_way_to_raise_them() {
        assert_eq!(enough_files(72, 8), Ok(()));
        assert_eq!(enough_files(1 << 20, 10_000), Ok(()));
        assert_eq!(
            enough_files(71, 8),
            Err(
                "open files: the limit is 71 (its hard limit included), and the worker needs \
                 at least 72 (database.max_connections 8 + 64): raise it (`ulimit -n`, \
                 LimitNOFILE= in a systemd unit, --ulimit nofile= for Docker)"
                    .into()
            )
        );
    }

    /// A task that panics or hangs while the service stops makes the stop a failure (the
    /// process exits non-zero), and a hanging one is abandoned at its deadline.
    #[tokio::test]
    async fn a_task_that_fails_or_hangs_while_stopping_is_a_failure() {
        let health = Health::new();
        let mut tasks = Tasks::default();
        tasks.spawn("clean", async {});
        tasks.spawn("panics", async { panic!("boom") });
        tasks.spawn("hangs", std::future::pending());
        let soon = Instant::now() + Duration::from_millis(200);
        assert!(tasks.join("clean", &health, soon).await.is_none());
        let panicked = tasks.join("panics", &health, soon).await.map(|f| f.cause);
        assert_eq!(panicked.as_deref(), Some("panicked: boom"));
        let hung = tasks
            .join("hangs", &health, soon)
            .await
            .map(|f| (f.task, f.cause));
        assert_eq!(
            hung,
            Some(("hangs", "did not stop in time; abandoned".to_owned()))
        );
        assert!(Instant::now() >= soon);
        assert!(tasks.join("gone", &health, soon).await.is_none());
    }

    #[test]
    fn a_cost_file_that_cannot_be_read_is_named_by_its_key() {
        for (key, var) in [
            ("cost.table", "CREDIT_WORKER__COST__TABLE"),
            (
                "cost.preflight_estimates",
                "CREDIT_WORKER__COST__PREFLIGHT_ESTIMATES",
            ),
        ] {
            let env = [(var.to_owned(), "/nonexistent/costs".to_owned())];
            let settings = Settings::load_from(None, &env).expect("settings");
            let e = load_costs(&settings).expect_err("missing file");
            let text = format!("{e:#}");
            let expected = format!("{key}: /nonexistent/costs: cannot read: ");
            assert!(text.starts_with(&expected), "{text}");
        }
    }

    #[tokio::test]
    async fn the_first_task_to_end_is_named_with_its_cause() {
        let health = Health::new();
        health.set_consuming(true);
        health.set_relaying(true);
        let shutdown = CancellationToken::new();
        let mut tasks = Tasks::default();
        let stop = shutdown.clone();
        tasks.spawn("consumer", async move { stop.cancelled().await });
        tasks.spawn("outbox relay", async { panic!("boom") });
        let failure = tasks
            .first_exit(&shutdown, &health)
            .await
            .expect("a failure");
        assert_eq!(failure.task, "outbox relay");
        assert_eq!(failure.cause, "panicked: boom");
        assert!(!health.relaying());
        assert!(health.consuming());

        shutdown.cancel();
        let by = Instant::now() + Duration::from_secs(5);
        assert!(tasks.join("consumer", &health, by).await.is_none());
        assert!(!health.consuming());
        assert!(tasks.0.is_empty());
    }

    #[tokio::test]
    async fn a_task_returning_early_is_a_failure_and_shutdown_is_not() {
        let health = Health::new();
        let shutdown = CancellationToken::new();
        let mut tasks = Tasks::default();
        tasks.spawn("control", async {});
        let failure = tasks
            .first_exit(&shutdown, &health)
            .await
            .expect("a failure");
        assert_eq!(
            (failure.task, failure.cause.as_str()),
            (
                "control",
                "returned without a shutdown request (its reason is logged above)"
            )
        );

        let stop = shutdown.clone();
        tasks.spawn("control", async move { stop.cancelled().await });
        shutdown.cancel();
        assert!(tasks.first_exit(&shutdown, &health).await.is_none());
    }
}
