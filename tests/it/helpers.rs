//! The harness: every test gets its own database and its own AMQP namespace on the real
//! PostgreSQL and RabbitMQ (`DATABASE_URL` / `AMQP_URL`, default: the local services; with the
//! `testcontainers` feature and a Docker engine, containers when those are unset).
//!
//! A `TestEnv` removes its database and namespace when dropped, so a failing test cleans up
//! too; the first `TestEnv` of a process also removes what killed runs left behind.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use credit_worker::amqp::topology::{self, Names};
use credit_worker::config::Settings;
use credit_worker::ledger::Ledger;
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, ExchangeDeleteOptions, QueueBindOptions,
    QueueDeleteOptions,
};
use lapin::types::FieldTable;
use serde_json::{json, Value};
use sqlx::PgPool;

pub const TEXT_GEN: &str = "1f292d4a-41a4-4977-9684-7c8d560b9f91";
pub const OPENAI_CRED: &str = "53c25cb8-e3ee-465c-a4d1-e75a4c899c2a";

/// Base URLs of the services (without a database name for PostgreSQL).
pub struct Services {
    pub pg_base: String,
    pub amqp: String,
}

#[cfg(feature = "testcontainers")]
async fn containers() -> Option<Services> {
    use testcontainers_modules::postgres::Postgres;
    use testcontainers_modules::rabbitmq::RabbitMq;
    use testcontainers_modules::testcontainers::runners::AsyncRunner;
    use testcontainers_modules::testcontainers::ImageExt;
    use tokio::sync::OnceCell;
    static CELL: OnceCell<Option<(String, String)>> = OnceCell::const_new();
    let v = CELL
        .get_or_init(|| async {
            // The modules' default images (PostgreSQL 11, RabbitMQ 3.8) are older than the
            // schema needs; these are the versions of docker-compose.yml.
            let pg = Postgres::default()
                .with_tag("15-alpine")
                .start()
                .await
                .ok()?;
            let mq = RabbitMq::default()
                .with_tag("3.13-management")
                .start()
                .await
                .ok()?;
            let pg_port = pg.get_host_port_ipv4(5432).await.ok()?;
            let mq_port = mq.get_host_port_ipv4(5672).await.ok()?;
            // The containers live for the whole test process.
            std::mem::forget(pg);
            std::mem::forget(mq);
            Some((
                format!("postgres://postgres:postgres@127.0.0.1:{pg_port}"),
                format!("amqp://guest:guest@127.0.0.1:{mq_port}/%2f"),
            ))
        })
        .await
        .clone()?;
    Some(Services {
        pg_base: v.0,
        amqp: v.1,
    })
}

pub async fn services() -> Services {
    let db = std::env::var("DATABASE_URL").ok().filter(|s| !s.is_empty());
    let amqp = std::env::var("AMQP_URL").ok().filter(|s| !s.is_empty());
    #[cfg(feature = "testcontainers")]
    if db.is_none() && amqp.is_none() && std::path::Path::new("/var/run/docker.sock").exists() {
        if let Some(s) = containers().await {
            return s;
        }
    }
    let pg_base = match db {
        // Strip the database name: each test creates its own.
        Some(url) => match url.rfind('/') {
            Some(i) if url[..i].contains("://") && i > url.find("://").unwrap_or(0) + 2 => {
                url[..i].to_owned()
            }
            _ => url,
        },
        None => "postgres://root@127.0.0.1:5432".to_owned(),
    };
    Services {
        pg_base,
        amqp: amqp.unwrap_or_else(|| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned()),
    }
}

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// The sessions of this test's database waiting for a lock.
pub const LOCK_WAITERS: &str = "SELECT count(*) FROM pg_stat_activity
    WHERE datname = current_database() AND wait_event_type = 'Lock'";

pub fn unique(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!(
        "{prefix}_{}_{:x}_{}",
        std::process::id(),
        nanos % 0xffff_ffff,
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// One test's world: a fresh database and namespace, removed when it is dropped.
pub struct TestEnv {
    pub settings: Settings,
    pub pool: PgPool,
    pub names: Names,
    pub db_name: String,
    /// Taken by `cleanup`; what `Drop` removes when the test ended without it (a panic).
    scratch: Option<Scratch>,
}

impl TestEnv {
    pub async fn new() -> TestEnv {
        Self::with(|_| {}).await
    }

    /// `tweak` adjusts the settings (e.g. refill off) before the database is created.
    pub async fn with(tweak: impl FnOnce(&mut Settings)) -> TestEnv {
        let svc = services().await;
        let admin_url = format!("{}/postgres", svc.pg_base);
        remove_stale_scratch(&admin_url, &svc.amqp).await;
        let db_name = unique(DB_PREFIX);
        let env = vec![
            (
                "DATABASE_URL".to_owned(),
                format!("{}/{}", svc.pg_base, db_name),
            ),
            ("AMQP_URL".to_owned(), svc.amqp.clone()),
            (
                "CREDIT_WORKER__AMQP__NAMESPACE".to_owned(),
                format!("{}.", unique(NAMESPACE_PREFIX)),
            ),
            ("CREDIT_WORKER__HTTP__LISTEN".to_owned(), String::new()),
        ];
        let mut settings = Settings::load_from(None, &env).expect("test settings");
        tweak(&mut settings);
        let names = Names::new(&settings.amqp.namespace);
        // Armed before the database exists, so a failed migration is cleaned up too.
        let scratch = Scratch {
            admin_url,
            db_name: db_name.clone(),
            amqp_url: settings.amqp.url.clone(),
            names: names.clone(),
        };
        let pool = match credit_worker::db::connect_and_migrate(&settings.database).await {
            Ok(pool) => pool,
            Err(e) => {
                scratch.remove().await;
                panic!("database: {e}");
            }
        };
        TestEnv {
            settings,
            pool,
            names,
            db_name,
            scratch: Some(scratch),
        }
    }

    pub fn ledger(&self) -> Ledger {
        Ledger::new(self.pool.clone(), self.settings.ledger_policy())
    }

    /// Environment for a worker process using this test's database and namespace.
    pub fn process_env(&self) -> Vec<(String, String)> {
        vec![
            ("DATABASE_URL".into(), self.settings.database.url.clone()),
            ("AMQP_URL".into(), self.settings.amqp.url.clone()),
            (
                "CREDIT_WORKER__AMQP__NAMESPACE".into(),
                self.settings.amqp.namespace.clone(),
            ),
            (
                "CREDIT_WORKER__HTTP__LISTEN".into(),
                self.settings
                    .http
                    .listen
                    .map(|a| a.to_string())
                    .unwrap_or_default(),
            ),
            (
                "CREDIT_WORKER__PIPELINE__MAX_BATCH".into(),
                self.settings.pipeline.max_batch.to_string(),
            ),
            ("RUST_LOG".into(), "warn".into()),
        ]
    }

    /// Runs the CLI with this test's environment; returns its output.
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        self.cli_command(args).output().expect("run the CLI")
    }

    /// The CLI with `args` in this test's database and namespace, not yet run.
    pub fn cli_command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(binary());
        cmd.args(args)
            .env_remove("CREDIT_WORKER_CONFIG")
            .stdin(Stdio::null());
        for (k, v) in self.process_env() {
            cmd.env(k, v);
        }
        cmd
    }

    /// Runs the CLI with `--json`, expects success, and parses its output.
    pub fn cli_json(&self, args: &[&str]) -> Value {
        let mut all = args.to_vec();
        all.push("--json");
        let out = self.cli(&all);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{args:?} failed: {stderr}");
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{args:?} output: {e}"))
    }

    /// Drops the database and the namespace's queues and exchanges now; dropping the
    /// `TestEnv` without this does the same (for a test that panicked).
    pub async fn cleanup(mut self) {
        self.pool.close().await;
        if let Some(scratch) = self.scratch.take() {
            scratch.remove().await;
        }
    }

    pub async fn amqp_channel(&self) -> (lapin::Connection, lapin::Channel) {
        let conn = credit_worker::amqp::connect(&self.settings.amqp, "test")
            .await
            .expect("amqp");
        let ch = conn.create_channel().await.expect("channel");
        topology::declare(&ch, &self.settings.amqp)
            .await
            .expect("declare");
        (conn, ch)
    }

    /// Publishes raw bodies to the input queue with confirms.
    pub async fn publish(&self, bodies: &[Vec<u8>]) {
        credit_worker::tools::publish::publish_entries(&self.settings, bodies)
            .await
            .expect("publish");
    }

    /// A queue bound to `credit.events` with `#`, declared before traffic starts.
    pub async fn event_tap(&self) -> EventTap {
        let (conn, ch) = self.amqp_channel().await;
        let q = topology::declare_private_queue(&ch)
            .await
            .expect("tap queue");
        ch.queue_bind(
            q.as_str().into(),
            self.names.events.as_str().into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("bind tap");
        let consumer = ch
            .basic_consume(
                q.as_str().into(),
                "tap".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("consume tap");
        EventTap {
            _conn: conn,
            consumer,
        }
    }

    /// Reads the dead-letter queue: (body, x-credit-error) pairs.
    pub async fn dead_letters(&self, expect: usize) -> Vec<(Vec<u8>, String)> {
        self.dead_messages(expect)
            .await
            .into_iter()
            .map(|(body, props)| {
                let reason = header_text(&props, "x-credit-error").unwrap_or_default();
                (body, reason)
            })
            .collect()
    }

    /// Takes `expect` messages off the dead queue (acked): bodies and properties.
    pub async fn dead_messages(&self, expect: usize) -> Vec<(Vec<u8>, lapin::BasicProperties)> {
        let (_conn, ch) = self.amqp_channel().await;
        let mut consumer = ch
            .basic_consume(
                self.names.dead_queue.as_str().into(),
                "dead-reader".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("consume dead");
        let mut out = Vec::new();
        while out.len() < expect {
            let d = tokio::time::timeout(Duration::from_secs(20), consumer.next())
                .await
                .expect("dead letter in time")
                .expect("stream")
                .expect("delivery");
            assert!(
                d.ack(BasicAckOptions::default()).await.expect("ack"),
                "ack not sent"
            );
            out.push((d.data.clone(), d.properties.clone()));
        }
        out
    }

    /// A pool on the server's `postgres` database, for what a test does to its own database
    /// from outside (refusing connections, ending sessions).
    pub async fn admin_pool(&self) -> sqlx::PgPool {
        let admin_url = match self.settings.database.url.rsplit_once('/') {
            Some((base, _)) => format!("{base}/postgres"),
            None => panic!("database url without a name"),
        };
        sqlx::PgPool::connect(&admin_url).await.expect("admin")
    }

    /// Lets connections to this test's database in again, or refuses new ones and ends its
    /// sessions (a database outage); `admin` is [`Self::admin_pool`]'s.
    pub async fn set_reachable(&self, admin: &sqlx::PgPool, reachable: bool) {
        let db = &self.db_name;
        self.alter_database(admin, &format!("ALLOW_CONNECTIONS {reachable}"))
            .await;
        if !reachable {
            sqlx::query(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                  WHERE datname = $1 AND pid <> pg_backend_pid()",
            )
            .bind(db)
            .execute(admin)
            .await
            .expect("terminate sessions");
        }
    }

    /// `ALTER DATABASE` of this test's database with `setting` (`SET x = y`, `RESET ALL`, …);
    /// `admin` is [`Self::admin_pool`]'s. A `SET` reaches sessions begun after it.
    pub async fn alter_database(&self, admin: &sqlx::PgPool, setting: &str) {
        let db = &self.db_name;
        sqlx::query(&format!("ALTER DATABASE \"{db}\" {setting}"))
            .execute(admin)
            .await
            .expect("alter database");
    }

    /// Ends every session of a worker (`application_name` credit-worker) on this test's
    /// database; `admin` is [`Self::admin_pool`]'s.
    pub async fn end_worker_sessions(&self, admin: &sqlx::PgPool) {
        sqlx::query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
              WHERE datname = $1 AND application_name = 'credit-worker'",
        )
        .bind(&self.db_name)
        .execute(admin)
        .await
        .expect("terminate sessions");
    }

    pub async fn scalar_i64(&self, sql: &str) -> i64 {
        sqlx::query_scalar::<_, i64>(sql)
            .fetch_one(&self.pool)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    /// Waits until one session of this test's database waits for a lock (`what` it is).
    pub async fn wait_for_one_lock_waiter(&self, within: Duration, what: &str) {
        wait_for(within, what, || async {
            self.scalar_i64(LOCK_WAITERS).await == 1
        })
        .await;
    }

    pub async fn outcome_of(&self, node_exec_id: &str) -> Option<String> {
        sqlx::query_scalar("SELECT outcome FROM credit.decisions WHERE node_exec_id = $1")
            .bind(node_exec_id)
            .fetch_optional(&self.pool)
            .await
            .expect("outcome")
    }

    /// Waits until `n` decisions exist.
    pub async fn wait_decisions(&self, n: i64, within: Duration) {
        let what = format!("{n} decisions");
        let sql = "SELECT count(*) FROM credit.decisions";
        crate::fixtures::wait_count(self, within, &what, sql, &[], |c| c >= n).await;
    }

    /// A transaction holding `user`'s account row (`FOR UPDATE`), as another writer would:
    /// whatever needs the row waits until the transaction ends.
    pub async fn hold_account(&self, user: &str) -> sqlx::Transaction<'static, sqlx::Postgres> {
        let mut held = self.pool.begin().await.expect("begin");
        sqlx::query("SELECT 1 FROM credit.balances WHERE user_id = $1 FOR UPDATE")
            .bind(user)
            .execute(&mut *held)
            .await
            .expect("hold the account's row");
        held
    }

    /// A session of this test's database that holds the outbox relay's lead, as a leader on
    /// another replica would, and publishes nothing; dropped or closed, it lets go.
    pub async fn hold_relay_lead(&self) -> sqlx::PgConnection {
        use sqlx::Connection as _;
        let mut leader = sqlx::PgConnection::connect(&self.settings.database.url)
            .await
            .expect("connect");
        let led: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock(1668441444, 1919249505)")
            .fetch_one(&mut leader)
            .await
            .expect("lead");
        assert!(led, "another session leads the relay");
        leader
    }

    /// Kills `w` with SIGKILL as soon as the count `sql` reaches `target`, and returns the
    /// count right after the kill. Polls every 5 ms rather than backing off, so that a fast
    /// worker gets little further than `target` before it dies.
    pub async fn kill_when(
        &self,
        w: &mut WorkerProcess,
        sql: &str,
        target: i64,
        within: Duration,
    ) -> i64 {
        let start = std::time::Instant::now();
        while self.scalar_i64(sql).await < target {
            assert!(
                start.elapsed() < within,
                "timed out waiting for {target}: {sql}"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        w.kill9();
        self.scalar_i64(sql).await
    }

    /// Waits until the relays' watermark has passed every outbox row: every event written so
    /// far has gone out.
    pub async fn wait_published(&self, within: Duration) {
        wait_for(within, "every event published", || async {
            self.scalar_i64(
                "SELECT count(*) FROM credit.outbox o, credit.outbox_relay r
                  WHERE o.id > r.published_through",
            )
            .await
                == 0
        })
        .await;
    }

    pub async fn assert_audit_clean(&self) {
        let report = credit_worker::ledger::audit::run(&self.pool)
            .await
            .expect("audit");
        assert!(report.is_clean(), "audit: {:?}", report.mismatches);
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        if let Some(scratch) = self.scratch.take() {
            scratch.remove_blocking();
        }
    }
}

/// Prefix of the test databases' names: `cwt_<pid>_<hex>_<n>`.
pub const DB_PREFIX: &str = "cwt";
/// Prefix of the test namespaces: `t_<pid>_<hex>_<n>.`.
const NAMESPACE_PREFIX: &str = "t";

/// What a test leaves on the services: its database and its namespace's queues and exchanges.
struct Scratch {
    admin_url: String,
    db_name: String,
    amqp_url: String,
    names: Names,
}

impl Scratch {
    /// Best effort: a service that is unreachable now keeps the leftovers for the sweep of a
    /// later run (`remove_stale_scratch`).
    async fn remove(&self) {
        drop_databases(&self.admin_url, std::slice::from_ref(&self.db_name)).await;
        let n = &self.names;
        delete_broker_objects(
            &self.amqp_url,
            &[&n.input_queue, &n.dead_queue, &n.control, &n.progress],
            &[&n.input_exchange, &n.dlx, &n.events, &n.ledger],
        )
        .await;
    }

    /// `remove` from synchronous code (`Drop`): on a thread of its own with its own runtime,
    /// since the test's runtime may be gone, or be running this very thread. Waits for it.
    fn remove_blocking(self) {
        let _ = std::thread::spawn(move || {
            block_on_own_runtime(async move {
                let _ = tokio::time::timeout(Duration::from_secs(60), self.remove()).await;
            })
        })
        .join();
    }
}

fn block_on_own_runtime(work: impl Future<Output = ()>) {
    if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        rt.block_on(work);
    }
}

/// `DROP DATABASE … WITH (FORCE)` for each name; failures are ignored.
async fn drop_databases(admin_url: &str, names: &[String]) {
    if names.is_empty() {
        return;
    }
    if let Ok(admin) = PgPool::connect(admin_url).await {
        for name in names {
            let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
                .execute(&admin)
                .await;
        }
        admin.close().await;
    }
}

/// Deletes the queues and exchanges; failures are ignored.
async fn delete_broker_objects(amqp_url: &str, queues: &[&str], exchanges: &[&str]) {
    let Ok(settings) = Settings::load_from(None, &[("AMQP_URL".into(), amqp_url.into())]) else {
        return;
    };
    let Ok(conn) = credit_worker::amqp::connect(&settings.amqp, "test cleanup").await else {
        return;
    };
    // A failed deletion closes its channel: each gets a fresh one.
    for q in queues {
        if let Ok(ch) = conn.create_channel().await {
            let _ = ch
                .queue_delete((*q).into(), QueueDeleteOptions::default())
                .await;
            let _ = ch.close(200, "".into()).await;
        }
    }
    for x in exchanges {
        if let Ok(ch) = conn.create_channel().await {
            let _ = ch
                .exchange_delete((*x).into(), ExchangeDeleteOptions::default())
                .await;
            let _ = ch.close(200, "".into()).await;
        }
    }
    let _ = conn.close(200, "".into()).await;
}

/// Once per process: drops the test databases, and deletes the test namespaces' queues and
/// exchanges, that earlier runs left behind when they were killed — those whose name carries
/// the id of a process that no longer runs. A database somebody is connected to is kept (its
/// owner may run in another PID namespace). Broker objects are listed with `rabbitmqctl`, on a
/// background thread, and only for a broker on this host; without it they stay, silently.
async fn remove_stale_scratch(admin_url: &str, amqp_url: &str) {
    static DONE: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();
    DONE.get_or_init(|| async {
        if !Path::new("/proc/self").exists() {
            return; // No way to tell a live process from a dead one here.
        }
        if let Ok(admin) = PgPool::connect(admin_url).await {
            let idle: Vec<String> = sqlx::query_scalar(
                "SELECT d.datname::text FROM pg_database d
                  WHERE d.datname LIKE $1
                    AND NOT EXISTS (SELECT 1 FROM pg_stat_activity a WHERE a.datname = d.datname)",
            )
            .bind(format!("{DB_PREFIX}\\_%"))
            .fetch_all(&admin)
            .await
            .unwrap_or_default();
            admin.close().await;
            let stale: Vec<String> = idle
                .into_iter()
                .filter(|name| left_by_a_dead_process(name, DB_PREFIX, false))
                .collect();
            drop_databases(admin_url, &stale).await;
        }
        if broker_is_local(amqp_url) {
            let amqp_url = amqp_url.to_owned();
            std::thread::spawn(move || remove_stale_broker_objects(&amqp_url));
        }
    })
    .await;
}

fn remove_stale_broker_objects(amqp_url: &str) {
    let vhost = vhost_of(amqp_url);
    let list = |what: &str| -> Vec<String> {
        let out = Command::new("rabbitmqctl")
            .args(["-q", "-p", &vhost, "--timeout", "20", what, "name"])
            .arg("--no-table-headers")
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output();
        match out {
            Ok(out) if out.status.success() => String::from_utf8_lossy(&out.stdout)
                .lines()
                .map(str::trim)
                .filter(|name| left_by_a_dead_process(name, NAMESPACE_PREFIX, true))
                .map(str::to_owned)
                .collect(),
            _ => Vec::new(),
        }
    };
    let (queues, exchanges) = (list("list_queues"), list("list_exchanges"));
    if queues.is_empty() && exchanges.is_empty() {
        return;
    }
    let queues: Vec<&str> = queues.iter().map(String::as_str).collect();
    let exchanges: Vec<&str> = exchanges.iter().map(String::as_str).collect();
    block_on_own_runtime(async {
        let work = delete_broker_objects(amqp_url, &queues, &exchanges);
        let _ = tokio::time::timeout(Duration::from_secs(60), work).await;
    });
}

/// Whether `name` was made by `unique(prefix)` (followed by `.<base>` for a namespaced
/// object) in a process that no longer runs.
fn left_by_a_dead_process(name: &str, prefix: &str, namespaced: bool) -> bool {
    let parsed = (|| {
        let rest = name.strip_prefix(prefix)?.strip_prefix('_')?;
        let mut parts = rest.splitn(3, '_');
        let pid: u32 = parts.next()?.parse().ok()?;
        let hex = parts.next()?;
        let tail = parts.next()?;
        let (counter, base) = match tail.split_once('.') {
            Some((counter, base)) => (counter, Some(base)),
            None => (tail, None),
        };
        let base_fits = match base {
            Some(base) => namespaced && !base.is_empty(),
            None => !namespaced,
        };
        let well_formed = base_fits
            && !hex.is_empty()
            && hex.chars().all(|c| c.is_ascii_hexdigit())
            && !counter.is_empty()
            && counter.chars().all(|c| c.is_ascii_digit());
        well_formed.then_some(pid)
    })();
    parsed.is_some_and(|pid| {
        pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists()
    })
}

#[test]
fn leftovers_are_recognised_by_name_and_dead_process() {
    // Far above any pid_max: never a live process.
    let dead = u32::MAX;
    let own = std::process::id();
    assert!(left_by_a_dead_process(
        &format!("cwt_{dead}_1f_0"),
        "cwt",
        false
    ));
    assert!(left_by_a_dead_process(
        &format!("t_{dead}_ab_12.credit.events"),
        "t",
        true
    ));
    for (name, prefix, namespaced) in [
        (format!("cwt_{own}_1f_0"), "cwt", false), // this process
        ("cwt_1_1f_0".to_owned(), "cwt", false),   // init: alive
        (format!("cwt_{dead}_1f_0x"), "cwt", false),
        (format!("cwt_{dead}_xyz_0"), "cwt", false),
        (format!("cwt_{dead}_1f_0.q"), "cwt", false),
        (format!("t_{dead}_ab_12"), "t", true),
        (format!("t_{dead}_ab_12."), "t", true),
        (format!("tx_{dead}_ab_12.q"), "t", true),
        ("probe4.dead".to_owned(), "t", true),
        ("amq.gen-0h_ffsRrpz4exCV".to_owned(), "t", true),
    ] {
        assert!(!left_by_a_dead_process(&name, prefix, namespaced), "{name}");
    }
    assert!(broker_is_local("amqp://guest:guest@127.0.0.1:5672/%2f"));
    assert!(broker_is_local("amqp://localhost"));
    assert!(!broker_is_local(
        "amqp://guest:guest@rabbit.internal:5672/%2f"
    ));
    assert_eq!(vhost_of("amqp://guest:guest@127.0.0.1:5672/%2f"), "/");
    assert_eq!(vhost_of("amqp://127.0.0.1:5672"), "/");
    assert_eq!(vhost_of("amqp://127.0.0.1/tests?heartbeat=10"), "tests");
}

/// Whether the AMQP URL names this host (where `rabbitmqctl` would list its queues).
pub fn broker_is_local(amqp_url: &str) -> bool {
    let authority = amqp_url
        .split_once("://")
        .map_or(amqp_url, |(_, rest)| rest)
        .split('/')
        .next()
        .unwrap_or("");
    let host_port = authority.rsplit('@').next().unwrap_or("");
    let host = match host_port.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => host_port.split(':').next().unwrap_or(""),
    };
    matches!(host, "localhost" | "::1") || host.starts_with("127.")
}

/// The virtual host of an AMQP URL (`/` when the URL names none).
pub fn vhost_of(amqp_url: &str) -> String {
    let path = amqp_url
        .split_once("://")
        .map_or(amqp_url, |(_, rest)| rest)
        .split_once('/')
        .map_or("", |(_, path)| path);
    let path = path.split('?').next().unwrap_or("");
    if path.is_empty() {
        "/".to_owned()
    } else {
        path.replace("%2f", "/").replace("%2F", "/")
    }
}

/// A broker policy on one of this test's queues, set with `rabbitmqctl` and cleared when
/// dropped (a failed test too). None where the broker is not on this machine.
pub struct Policy {
    name: String,
    vhost: String,
}

impl Policy {
    /// Applies `definition` (JSON) to the queue named `queue` alone.
    pub fn on_queue(amqp_url: &str, queue: &str, definition: &str) -> Option<Policy> {
        if !broker_is_local(amqp_url) {
            return None;
        }
        let policy = Policy {
            name: unique("cw-policy"),
            vhost: vhost_of(amqp_url),
        };
        let pattern = format!("^{}$", queue.replace('.', "\\."));
        let status = Command::new("rabbitmqctl")
            .args([
                "-q",
                "-p",
                &policy.vhost,
                "set_policy",
                "--apply-to",
                "queues",
            ])
            .args(["--priority", "100", &policy.name, &pattern, definition])
            .stdout(Stdio::null())
            .status();
        let set = status.as_ref().is_ok_and(|s| s.success());
        assert!(set, "rabbitmqctl set_policy failed: {status:?}");
        Some(policy)
    }
}

impl Drop for Policy {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl")
            .args(["-q", "-p", &self.vhost, "clear_policy", &self.name])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

pub struct EventTap {
    _conn: lapin::Connection,
    consumer: lapin::Consumer,
}

impl EventTap {
    /// The next `n` events as (routing key, message_id, body).
    pub async fn take(&mut self, n: usize, within: Duration) -> Vec<(String, String, Value)> {
        let deadline = tokio::time::Instant::now() + within;
        let mut out = Vec::new();
        while out.len() < n {
            let d = tokio::time::timeout_at(deadline, self.consumer.next())
                .await
                .unwrap_or_else(|_| panic!("only {} of {n} events arrived", out.len()))
                .expect("stream")
                .expect("delivery");
            let body: Value = serde_json::from_slice(&d.data).expect("event json");
            let mid = d
                .properties
                .message_id()
                .as_ref()
                .map(|s| s.to_string())
                .unwrap_or_default();
            // Every event is the worker's, as the broker verified.
            assert!(d.properties.user_id().is_some(), "an event without user_id");
            assert!(
                d.ack(BasicAckOptions::default()).await.expect("ack"),
                "ack not sent"
            );
            out.push((d.routing_key.to_string(), mid, body));
        }
        out
    }

    /// Asserts nothing more arrives within `quiet`.
    pub async fn assert_quiet(&mut self, quiet: Duration) {
        if let Ok(Some(Ok(d))) = tokio::time::timeout(quiet, self.consumer.next()).await {
            panic!(
                "unexpected event {}: {}",
                d.routing_key,
                String::from_utf8_lossy(&d.data)
            );
        }
    }
}

/// For a test that cannot run here (a local service or a tool it needs is missing): says so,
/// and the test passes, unless `CREDIT_WORKER_TEST_STRICT` is set (CI sets it), where it fails
/// instead: a test that cannot fail must not pass the suite that guards the project.
pub fn skip(why: &str) {
    assert!(
        std::env::var_os("CREDIT_WORKER_TEST_STRICT").is_none(),
        "cannot run here, and CREDIT_WORKER_TEST_STRICT is set: {why}"
    );
    eprintln!("skipped: {why}");
}

/// Reads `log` (a worker's lines) until one contains `needle`; panics, naming `what`, when none
/// does within `within` or the worker's log ends first.
pub fn wait_for_line(
    log: &std::sync::mpsc::Receiver<String>,
    needle: &str,
    within: Duration,
    what: &str,
) {
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match log.recv_timeout(left) {
            Ok(line) if line.contains(needle) => return,
            Ok(_) => {}
            Err(e) => panic!("{what}: no line with {needle:?} ({e})"),
        }
    }
}

/// Polls `cond` until true; panics after `within`.
pub async fn wait_for<F, Fut>(within: Duration, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = Instant::now();
    let mut delay = Duration::from_millis(10);
    while !cond().await {
        assert!(start.elapsed() < within, "timed out waiting for {what}");
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_millis(200));
    }
}

/// An AutoGPT-shaped NodeExecutionEntry for AITextGeneratorBlock.
pub fn entry(user: &str, node_exec_id: &str, inputs: Value) -> Value {
    json!({
        "user_id": user,
        "graph_exec_id": format!("ge-{node_exec_id}"),
        "graph_id": "test_graph",
        "graph_version": 1,
        "node_exec_id": node_exec_id,
        "node_id": "test_node",
        "block_id": TEXT_GEN,
        "inputs": inputs,
        "execution_context": {"user_timezone": "UTC"},
    })
}

/// gpt-4-turbo on the platform's OpenAI credential: costs 10.
pub fn platform_gpt4(user: &str, node_exec_id: &str) -> Value {
    entry(
        user,
        node_exec_id,
        json!({"model": "gpt-4-turbo", "prompt": "hi",
               "credentials": {"id": OPENAI_CRED, "provider": "openai", "type": "api_key",
                               "title": "Use Credits for OpenAI"}}),
    )
}

/// The user's own key: free.
pub fn own_key(user: &str, node_exec_id: &str) -> Value {
    entry(
        user,
        node_exec_id,
        json!({"model": "gpt-4-turbo", "api_key": "owned_api_key"}),
    )
}

pub fn body(v: &Value) -> Vec<u8> {
    serde_json::to_vec(v).expect("json")
}

/// The worker binary as a child process.
pub struct WorkerProcess {
    pub child: Child,
}

/// The error an in-process worker on `settings` stops its start with (all causes, `{:#}`);
/// panics, naming `why` it should not have started, when it starts.
pub async fn start_refused(settings: Settings, why: &str) -> String {
    match credit_worker::service::Worker::start(settings).await {
        Ok(w) => {
            let _ = w.stop().await;
            panic!("started {why}")
        }
        Err(e) => format!("{e:#}"),
    }
}

pub fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_credit-worker"))
}

/// The binary with `args` and this test's `env` (no config file), stdout discarded and
/// stderr as `stderr` says.
fn worker_command(env: &[(String, String)], args: &[&str], stderr: Stdio) -> Command {
    let mut cmd = Command::new(binary());
    cmd.args(args)
        .env_remove("CREDIT_WORKER_CONFIG")
        .stdout(Stdio::null())
        .stderr(stderr);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}

impl WorkerProcess {
    pub fn spawn(env: &[(String, String)], args: &[&str]) -> WorkerProcess {
        let mut cmd = worker_command(env, args, Stdio::inherit());
        WorkerProcess {
            child: cmd.spawn().expect("spawn worker"),
        }
    }

    /// Spawns a worker whose HTTP endpoints listen on a port the system picks (port 0), and
    /// returns that port as the worker logs it.
    pub fn spawn_with_http(env: &[(String, String)], args: &[&str]) -> (WorkerProcess, u16) {
        let (w, port, _log) = Self::spawn_logged(env, args, "warn,credit_worker::telemetry=info");
        (w, port)
    }

    /// [`Self::spawn_with_http`] logging at `filter` (JSON lines), each line also handed over
    /// on the returned channel.
    pub fn spawn_logged(
        env: &[(String, String)],
        args: &[&str],
        filter: &str,
    ) -> (WorkerProcess, u16, std::sync::mpsc::Receiver<String>) {
        let mut cmd = worker_command(env, args, Stdio::piped());
        cmd.env("CREDIT_WORKER__HTTP__LISTEN", "127.0.0.1:0")
            .env("CREDIT_WORKER__LOG__FORMAT", "json")
            .env("RUST_LOG", filter);
        // Owned by a `WorkerProcess` from here on, so a failed wait below kills it too.
        let mut w = WorkerProcess {
            child: cmd.spawn().expect("spawn worker"),
        };
        let stderr = w.child.stderr.take().expect("piped stderr");
        let (tx, rx) = std::sync::mpsc::channel();
        let (lines, log) = std::sync::mpsc::channel();
        // Echoes the worker's log to the test's, and hands over the bound port once logged.
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                eprintln!("{line}");
                if let Some(port) = logged_http_port(&line) {
                    let _ = tx.send(port);
                }
                let _ = lines.send(line);
            }
        });
        let port = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("the worker logs its HTTP address");
        (w, port, log)
    }

    /// A worker logging at `info` to a pipe whose reader is gone from the start (a log
    /// shipper that died, `closed`) or never reads (one that stalled), its HTTP endpoints on
    /// a port picked here.
    pub fn spawn_log_stuck(
        env: &[(String, String)],
        args: &[&str],
        closed: bool,
    ) -> (WorkerProcess, u16) {
        // Free when looked up: nothing else here takes ports it did not ask the system for.
        let free = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
        let addr = free.local_addr().expect("its address");
        drop(free);
        let mut cmd = worker_command(env, args, Stdio::piped());
        cmd.env("CREDIT_WORKER__HTTP__LISTEN", addr.to_string())
            .env("RUST_LOG", "info");
        let mut w = WorkerProcess {
            child: cmd.spawn().expect("spawn worker"),
        };
        // Unread, the pipe is held open with the child until the worker ends.
        if closed {
            drop(w.child.stderr.take());
        }
        (w, addr.port())
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends SIGTERM once the worker catches it. `run` installs its handler first thing, but
    /// a process spawned a moment ago may not have got there yet, and a SIGTERM before it
    /// ends the process by the default action: the test would then see that, not the stop.
    pub fn sigterm(&self) {
        self.signal("TERM");
    }

    /// [`Self::sigterm`] with another signal `run` catches (`INT`).
    pub fn signal(&self, name: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !catches_sigterm(self.child.id()) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
        }
        let _ = Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status();
    }

    /// Waits for exit; returns the exit code.
    pub async fn wait_exit(&mut self, within: Duration) -> Option<i32> {
        let start = Instant::now();
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            assert!(start.elapsed() < within, "worker did not exit in time");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Whether process `pid` has a handler for SIGTERM (signal 15: bit 14 of `SigCgt`), or is
/// gone (then there is nothing to wait for).
fn catches_sigterm(pid: u32) -> bool {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return true;
    };
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(str::trim)
    };
    if field("State:").is_some_and(|s| s.starts_with('Z')) {
        return true;
    }
    field("SigCgt:")
        .and_then(|mask| u64::from_str_radix(mask, 16).ok())
        .is_some_and(|mask| mask & (1 << 14) != 0)
}

/// A directory of a test's files, removed when the test ends, failed or not.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(prefix: &str) -> Self {
        let dir = std::env::temp_dir().join(unique(prefix));
        std::fs::create_dir_all(&dir).expect("a temporary directory");
        TempDir(dir)
    }

    /// Writes `text` to `name` in the directory and returns its path as text.
    pub fn file(&self, name: &str, text: &str) -> String {
        let path = self.0.join(name);
        std::fs::write(&path, text).expect("a temporary file written");
        path.to_string_lossy().into_owned()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The port of a JSON log line `http endpoints up` (`addr` field).
fn logged_http_port(line: &str) -> Option<u16> {
    let v: Value = serde_json::from_str(line).ok()?;
    if v.get("message")?.as_str()? != "http endpoints up" {
        return None;
    }
    let addr: std::net::SocketAddr = v.get("addr")?.as_str()?.parse().ok()?;
    Some(addr.port())
}

/// An HTTP address on a port the system picks; read the bound one back from the worker.
pub fn any_port() -> Option<std::net::SocketAddr> {
    Some(([127, 0, 0, 1], 0).into())
}

/// GET over a fresh connection: (status, body).
pub async fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let exchange = async {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .ok()?;
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .ok()?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.ok()?;
        let text = String::from_utf8_lossy(&buf).into_owned();
        let status = text.split_whitespace().nth(1)?.parse().ok()?;
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default();
        Some((status, body))
    };
    tokio::time::timeout(Duration::from_secs(5), exchange)
        .await
        .ok()
        .flatten()
}

/// The status of a GET, 0 when nothing answers.
pub async fn http_status(port: u16, path: &str) -> u16 {
    http_get(port, path).await.map(|r| r.0).unwrap_or(0)
}

/// Asserts a dead letter's time of death falls in `[from, to]`, to the second.
pub fn assert_died_within(
    died_at: Option<chrono::DateTime<chrono::Utc>>,
    from: chrono::DateTime<chrono::Utc>,
    to: chrono::DateTime<chrono::Utc>,
) {
    let secs = died_at.map(|t| t.timestamp());
    assert!(
        secs.is_some_and(|s| (from.timestamp()..=to.timestamp()).contains(&s)),
        "died at {died_at:?}, not within {from} ..= {to}"
    );
}

/// A header of text (a long or short string), if `props` has it.
pub fn header_text(props: &lapin::BasicProperties, name: &str) -> Option<String> {
    match props.headers().as_ref()?.inner().get(name)? {
        lapin::types::AMQPValue::LongString(s) => Some(s.to_string()),
        lapin::types::AMQPValue::ShortString(s) => Some(s.to_string()),
        other => Some(format!("{other:?}")),
    }
}

/// Prometheus label pairs.
pub type Labels<'a> = &'a [(&'a str, &'a str)];

/// The value of `name{labels…}` in Prometheus text, 0 when absent.
pub fn metric_value(text: &str, name: &str, labels: Labels) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (n, rest) = series.split_once('{').unwrap_or((series, ""));
            (n == name
                && labels
                    .iter()
                    .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\""))))
            .then(|| value.parse::<f64>().ok())
            .flatten()
        })
        .sum()
}

/// A counter's or gauge's value in the `/metrics` of the worker process on `port` (0 when it
/// does not answer or shows no such series).
pub async fn scraped(port: u16, name: &str, labels: Labels<'_>) -> f64 {
    let (_, metrics) = http_get(port, "/metrics").await.unwrap_or_default();
    metric_value(&metrics, name, labels)
}

/// This process's metrics, read directly (also installs the recorder).
pub fn metrics_now() -> String {
    credit_worker::telemetry::metrics_handle()
        .map(|h| h.render())
        .unwrap_or_default()
}

/// The Prometheus recorder is process-wide and every test of this binary shares it. A test
/// that reads how much a counter moved holds its gate with `lock`, and the tests that move
/// it as a side effect hold it with `share`: they run alongside each other, not alongside
/// the reader.
pub struct CounterGate(tokio::sync::RwLock<()>);

impl CounterGate {
    const fn new() -> Self {
        CounterGate(tokio::sync::RwLock::const_new(()))
    }

    /// For the test that counts: no test that moves the counter runs meanwhile.
    pub async fn lock(&self) -> tokio::sync::RwLockWriteGuard<'_, ()> {
        self.0.write().await
    }

    /// For a test that moves the counter.
    pub async fn share(&self) -> tokio::sync::RwLockReadGuard<'_, ()> {
        self.0.read().await
    }
}

/// `credit_refill_runs_total`: every refill sweep (scheduled, start-up catch-up, the control
/// command or `refill::sweep` called directly).
pub static SWEEPS: CounterGate = CounterGate::new();

/// `credit_decide_retries_total`: decisions retried by an in-process worker whose database
/// went away.
pub static DECIDE_RETRIES: CounterGate = CounterGate::new();
