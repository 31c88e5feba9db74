//! Deployments that share a database or a broker (docs/contract.md §1): one database serves
//! one namespace, and one namespace one database. A worker of a second namespace on a
//! database, or of a second database on a namespace, stops with the reason and bills
//! nothing; `migrate --rebind-namespace` moves a ledger, and stops the workers it displaces.

use std::time::Duration;

use credit_worker::config::Settings;
use credit_worker::ledger::identity;
use credit_worker::service::Worker;

use crate::fixtures::*;
use crate::helpers::*;

const T: Duration = Duration::from_secs(30);

/// `env`'s settings with `other`'s database or namespace.
fn crossed(env: &TestEnv, database_of: &TestEnv, namespace_of: &TestEnv) -> Settings {
    let mut s = env.settings.clone();
    s.database = database_of.settings.database.clone();
    s.amqp.namespace = namespace_of.settings.amqp.namespace.clone();
    s
}

/// Runs `migrate --rebind-namespace --json` on `env`'s database under `namespace`.
fn rebind(env: &TestEnv, namespace: &str) -> serde_json::Value {
    let out = env
        .cli_command(&["migrate", "--rebind-namespace", "--json"])
        .env("CREDIT_WORKER__AMQP__NAMESPACE", namespace)
        .output()
        .expect("run the CLI");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "rebind failed: {stderr}");
    serde_json::from_slice(&out.stdout).expect("JSON")
}

/// The failure a worker on `settings` stops with by itself: its start passes, and the
/// broker refuses its sessions.
async fn stops_by_itself(settings: Settings) -> String {
    let worker = Worker::start(settings).await.expect("the start passes");
    let ended = tokio::time::timeout(T, worker.wait())
        .await
        .expect("it stops");
    format!("{:#}", ended.expect_err("a failure"))
}

/// Whether `queue` exists on the broker.
async fn queue_exists(env: &TestEnv, queue: &str) -> bool {
    let (conn, ch) = env.amqp_channel().await;
    let passive = lapin::options::QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    let found = ch
        .queue_declare(queue.into(), passive, Default::default())
        .await
        .is_ok();
    let _ = conn.close(200, "".into()).await;
    found
}

/// A staging worker pointed at the production database: refused at start, naming the ledger,
/// both namespaces and the way out, before it declares or consumes anything. Moved with
/// `migrate --rebind-namespace`, the ledger serves the new namespace, and a running worker
/// of the old one stops within its watch.
#[tokio::test]
async fn a_second_namespace_on_a_database_is_refused_and_a_move_stops_the_old_workers() {
    let prod = TestEnv::with(no_refill).await;
    let staging = TestEnv::with(no_refill).await;
    let (p, s) = (
        &prod.settings.amqp.namespace,
        &staging.settings.amqp.namespace,
    );
    let worker = Worker::start(prod.settings.clone()).await.expect("starts");
    worker.stop().await.expect("stops");
    let bound = identity::read(&prod.pool).await.expect("identity");
    assert_eq!(bound.namespace.as_deref(), Some(p.as_str()));

    let err = start_refused(crossed(&prod, &prod, &staging), "on another's database").await;
    let since = bound
        .bound_at
        .expect("bound")
        .format("%Y-%m-%d %H:%M:%S UTC");
    let expected = format!(
        "amqp.namespace: this database's ledger ({}) serves namespace {p:?} (since {since}), \
         and this worker is configured with {s:?}.",
        bound.ledger_id
    );
    assert!(err.starts_with(&expected), "{err}");
    assert!(
        err.contains("`credit-worker migrate --rebind-namespace`"),
        "{err}"
    );
    assert!(!queue_exists(&prod, &staging.names.input_queue).await);

    // A worker of prod runs while the ledger moves to staging's namespace: it stops.
    let mut vars = prod.process_env();
    vars.push(("CREDIT_WORKER__REFILL__ENABLED".into(), "false".into()));
    let (mut old, _http, log) = WorkerProcess::spawn_logged(
        &vars,
        &["run"],
        "warn,credit_worker::consumer=info,credit_worker::telemetry=info",
    );
    wait_for_line(&log, "consuming", T, "the old namespace's worker");
    let moved = rebind(&prod, s);
    assert_eq!(moved["before"], p.as_str());
    assert_eq!(moved["namespace"], s.as_str());
    // Moved to another namespace, the ledger gets an id of its own there.
    let now = identity::read(&prod.pool)
        .await
        .expect("identity")
        .ledger_id;
    assert_eq!(moved["ledger_id"], now.as_str());
    assert_ne!(now, bound.ledger_id);
    wait_for_line(
        &log,
        "this worker's ledger is not the database's any more",
        T,
        "the watch",
    );
    assert_eq!(old.wait_exit(T).await, Some(1));

    // The new namespace's workers start; the old one's are refused.
    let worker = Worker::start(crossed(&prod, &prod, &staging))
        .await
        .expect("starts");
    worker.stop().await.expect("stops");
    let err = start_refused(prod.settings.clone(), "after the move").await;
    assert!(err.contains(&format!("serves namespace {s:?}")), "{err}");
    staging.cleanup().await;
    prod.cleanup().await;
}

/// Two first starts at once, of two namespaces, on a database not bound yet: one binds it,
/// the other is refused, however close together.
#[tokio::test]
async fn two_namespaces_binding_a_new_database_at_once_cannot_both_have_it() {
    let env = TestEnv::with(no_refill).await;
    for round in 0..20 {
        sqlx::query("UPDATE credit.ledger_identity SET namespace = NULL, bound_at = NULL")
            .execute(&env.pool)
            .await
            .expect("unbind");
        let (a, b) = tokio::join!(
            identity::bind(&env.pool, "first."),
            identity::bind(&env.pool, "second.")
        );
        assert!(a.is_ok() != b.is_ok(), "round {round}: {a:?} {b:?}");
    }
    env.cleanup().await;
}

/// A worker pointed at a second database (a new, empty one) on a namespace another ledger
/// serves: it stops before it takes a message, and the first ledger's worker bills them all.
/// `migrate --rebind-namespace` gives the namespace to the second database, and the first's
/// running worker stops once its next declaration is refused.
#[tokio::test]
async fn a_second_database_on_a_namespace_bills_nothing_and_a_takeover_stops_the_first() {
    let first = TestEnv::with(no_refill).await;
    let second = TestEnv::with(no_refill).await;
    seed(&first, ["u1"], 1_000).await;
    let worker = Worker::start(first.settings.clone()).await.expect("starts");
    worker.stop().await.expect("stops");
    let bodies: Vec<Vec<u8>> = (0..5)
        .map(|i| body(&platform_gpt4("u1", &format!("ne-{i}"))))
        .collect();
    first.publish(&bodies).await;

    let why = stops_by_itself(crossed(&first, &second, &first)).await;
    assert!(why.contains("ended unexpectedly"), "{why}");
    assert_eq!(
        second
            .scalar_i64("SELECT count(*) FROM credit.decisions")
            .await,
        0
    );
    assert_eq!(
        second
            .scalar_i64("SELECT count(*) FROM credit.outbox")
            .await,
        0
    );

    let mut vars = first.process_env();
    vars.push(("CREDIT_WORKER__REFILL__ENABLED".into(), "false".into()));
    let (mut owner, _http, log) =
        WorkerProcess::spawn_logged(&vars, &["run"], "warn,credit_worker::telemetry=info");
    first.wait_decisions(5, T).await;
    assert_eq!(first.outcome_of("ne-4").await.as_deref(), Some("charged"));

    let ns = &first.settings.amqp.namespace;
    let taken = rebind(&second, ns);
    let ledger = identity::read(&second.pool)
        .await
        .expect("identity")
        .ledger_id;
    assert_eq!(taken["ledger_id"], ledger.as_str());
    wait_for_line(
        &log,
        "is another database's ledger",
        T,
        "the first's worker",
    );
    assert_eq!(owner.wait_exit(T).await, Some(1));
    let why = stops_by_itself(first.settings.clone()).await;
    assert!(why.contains("ended unexpectedly"), "{why}");
    first.assert_audit_clean().await;
    second.cleanup().await;
    first.cleanup().await;
}

/// The log lines these tests wait for: warnings and errors, and the consumer's and the HTTP
/// server's start.
const LOGGED: &str = "warn,credit_worker::consumer=info,credit_worker::telemetry=info";

/// The highest watermark the broker records for the ledger's events (queue
/// `credit.ledger.progress`), read without taking the records.
async fn recorded_progress(env: &TestEnv) -> Option<i64> {
    use lapin::options::{BasicGetOptions, BasicNackOptions};
    let (conn, ch) = env.amqp_channel().await;
    let (mut highest, mut last_tag) = (None, None);
    let queue = env.names.progress.as_str();
    while let Ok(Some(got)) = ch
        .basic_get(queue.into(), BasicGetOptions { no_ack: false })
        .await
    {
        let record: serde_json::Value = serde_json::from_slice(&got.delivery.data).expect("JSON");
        highest = highest.max(record["published_through"].as_i64());
        last_tag = Some(got.delivery.delivery_tag);
    }
    if let Some(tag) = last_tag {
        let back = BasicNackOptions {
            multiple: true,
            requeue: true,
        };
        ch.basic_nack(tag, back).await.expect("put back");
    }
    let _ = conn.close(200, "".into()).await;
    highest
}

/// The relays' watermark in `env`'s database.
async fn watermark(env: &TestEnv) -> i64 {
    env.scalar_i64("SELECT published_through FROM credit.outbox_relay")
        .await
}

/// Sets `env`'s watermark back by `by`, as a database restored from a backup, or a standby
/// promoted before it received the last commits, holds it.
async fn back_in_time(env: &TestEnv, by: i64) {
    sqlx::query("UPDATE credit.outbox_relay SET published_through = published_through - $1")
        .bind(by)
        .execute(&env.pool)
        .await
        .expect("set the watermark back");
}

/// What a worker of a database gone back in time says before it stops.
const BEHIND: &str = "is behind the";

/// A database restored from a backup taken before its ledger's last events went out is
/// neither billed into nor published from: the worker stops (exit 1) before it consumes,
/// naming both watermarks and the way out, and the message waits in its queue. Once the
/// operator has said so (`migrate --after-restore`), the next worker bills it, and the events
/// after the restored watermark go out again.
#[tokio::test]
async fn a_database_gone_back_in_time_is_refused_until_an_operator_says_so() {
    let env = TestEnv::with(no_refill).await;
    seed(&env, ["bt"], 1_000).await;
    let mut vars = env.process_env();
    vars.push(("CREDIT_WORKER__REFILL__ENABLED".into(), "false".into()));
    let bodies: Vec<Vec<u8>> = (0..4)
        .map(|i| body(&platform_gpt4("bt", &format!("bt-{i}"))))
        .collect();
    let (mut worker, _http, _log) = WorkerProcess::spawn_logged(&vars, &["run"], LOGGED);
    env.publish(&bodies[..3]).await;
    env.wait_decisions(3, T).await;
    env.wait_published(T).await;
    worker.sigterm();
    assert_eq!(worker.wait_exit(T).await, Some(0));
    let through = watermark(&env).await;
    assert_eq!(recorded_progress(&env).await, Some(through));

    back_in_time(&env, 1).await;
    env.publish(&bodies[3..]).await;
    let (mut worker, _http, log) = WorkerProcess::spawn_logged(&vars, &["run"], LOGGED);
    wait_for_line(&log, BEHIND, T, "the refusal");
    assert_eq!(worker.wait_exit(T).await, Some(1));
    assert_eq!(env.outcome_of("bt-3").await, None, "billed into it");

    // With the namespace bound again too (here, the one it served): one JSON answer.
    let args = ["migrate", "--rebind-namespace", "--after-restore", "--json"];
    let out = env.cli(&args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let said: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    assert_eq!(said["migrated"], true);
    assert_eq!(said["namespace"], env.settings.amqp.namespace.as_str());
    assert_eq!(said["recorded"], through);
    assert_eq!(said["watermark"], through - 1);
    let (mut worker, _http, _log) = WorkerProcess::spawn_logged(&vars, &["run"], LOGGED);
    env.wait_decisions(4, T).await;
    assert_eq!(env.outcome_of("bt-3").await.as_deref(), Some("charged"));
    env.wait_published(T).await;
    worker.sigterm();
    assert_eq!(worker.wait_exit(T).await, Some(0));
    env.assert_audit_clean().await;
    env.cleanup().await;
}

/// A database that goes back in time under a running worker (a failover to a standby that
/// had not received the last commits) stops it as its relay takes the lead again on the new
/// server, before the relay publishes from there.
#[tokio::test]
async fn a_failover_to_a_database_behind_stops_the_worker() {
    let env = TestEnv::with(no_refill).await;
    seed(&env, ["fo"], 1_000).await;
    let mut vars = env.process_env();
    vars.push(("CREDIT_WORKER__REFILL__ENABLED".into(), "false".into()));
    let (mut worker, _http, log) = WorkerProcess::spawn_logged(&vars, &["run"], LOGGED);
    env.publish(&[body(&platform_gpt4("fo", "fo-1"))]).await;
    env.wait_decisions(1, T).await;
    env.wait_published(T).await;
    let through = watermark(&env).await;
    wait_for(T, "the watermark recorded", || async {
        recorded_progress(&env).await == Some(through)
    })
    .await;

    back_in_time(&env, 1).await;
    let admin = env.admin_pool().await;
    env.end_worker_sessions(&admin).await;
    wait_for_line(&log, BEHIND, T, "the relay's refusal");
    assert_eq!(worker.wait_exit(T).await, Some(1));
    admin.close().await;
    env.cleanup().await;
}

/// A PostgreSQL role of the test's, dropped with its privileges when the test ends.
struct Role {
    name: String,
    admin_url: String,
}

impl Role {
    async fn create(env: &TestEnv) -> Role {
        let name = unique("cw_role").replace(['-', '.'], "_");
        sqlx::query(&format!("CREATE ROLE {name} LOGIN"))
            .execute(&env.pool)
            .await
            .expect("create role");
        Role {
            name,
            admin_url: env.settings.database.url.clone(),
        }
    }

    /// The README's grants ("PostgreSQL roles") to this role, then the `revokes` (`"DELETE ON
    /// credit.outbox"`), with no role allowed to create in schema `public`.
    async fn grant(&self, env: &TestEnv, revokes: &[&str]) {
        let (r, db) = (&self.name, &env.db_name);
        let grants = [
            "REVOKE CREATE ON SCHEMA public FROM PUBLIC".to_owned(),
            format!("GRANT CONNECT ON DATABASE \"{db}\" TO {r}"),
            format!("GRANT USAGE ON SCHEMA credit TO {r}"),
            format!("GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA credit TO {r}"),
            format!("GRANT USAGE, SELECT, UPDATE ON ALL SEQUENCES IN SCHEMA credit TO {r}"),
            format!("GRANT SELECT ON public._sqlx_migrations TO {r}"),
        ];
        let revokes = revokes.iter().map(|what| format!("REVOKE {what} FROM {r}"));
        for statement in grants.into_iter().chain(revokes) {
            sqlx::query(&statement)
                .execute(&env.pool)
                .await
                .expect(&statement);
        }
    }

    /// A worker process's environment on `env` as this role, with no refill.
    fn worker_env(&self, env: &TestEnv) -> Vec<(String, String)> {
        let mut vars = env.process_env();
        vars.retain(|(k, _)| k != "DATABASE_URL");
        vars.push(("DATABASE_URL".into(), self.url(env)));
        vars.push(("CREDIT_WORKER__REFILL__ENABLED".into(), "false".into()));
        vars
    }

    /// `env`'s database URL with this role as the user.
    fn url(&self, env: &TestEnv) -> String {
        let mut url = url::Url::parse(&env.settings.database.url).expect("database URL");
        url.set_username(&self.name).expect("a user");
        url.to_string()
    }
}

impl Drop for Role {
    fn drop(&mut self) {
        // In the test's database (its grants go with it), then the role itself.
        let drop_owned = format!("DROP OWNED BY {}", self.name);
        let _ = std::process::Command::new("psql")
            .args([self.admin_url.as_str(), "-qc", drop_owned.as_str()])
            .output();
        // From another database: the test's may be gone already.
        let Ok(mut server) = url::Url::parse(&self.admin_url) else {
            return;
        };
        server.set_path("/postgres");
        let drop_role = format!("DROP ROLE IF EXISTS {}", self.name);
        let _ = std::process::Command::new("psql")
            .args([server.as_str(), "-qc", drop_role.as_str()])
            .output();
    }
}

/// A worker whose role may only read and write the ledger's tables (the database migrated by
/// its owner; no right to create in schema `public`, as PostgreSQL 15 gives no role by
/// default) starts and bills: with nothing to migrate it does not ask for the migrations'
/// table to be created.
#[tokio::test]
async fn a_role_that_may_only_read_and_write_the_ledger_runs_the_worker() {
    let env = TestEnv::with(no_refill).await;
    seed(&env, ["rw"], 100).await;
    let role = Role::create(&env).await;
    role.grant(&env, &[]).await;
    let (mut worker, http) = WorkerProcess::spawn_with_http(&role.worker_env(&env), &["run"]);
    wait_status(T, http, "/readyz", 200).await;
    env.publish(&[body(&platform_gpt4("rw", "rw-0"))]).await;
    env.wait_decisions(1, T).await;
    assert_eq!(env.outcome_of("rw-0").await.as_deref(), Some("charged"));
    worker.sigterm();
    assert_eq!(worker.wait_exit(T).await, Some(0));
    env.assert_audit_clean().await;
    env.cleanup().await;
    drop(role);
}

/// A role that lacks grants `run` needs (a grant script that left the outbox's pruning out,
/// a table an upgrade added and no one granted) is refused at start, with every missing grant
/// named, before it consumes anything: not one batch after another failing on the first.
/// The check asks for no more than `run` uses: without pruning, no `DELETE`.
#[tokio::test]
async fn a_role_without_a_grant_it_needs_is_refused_at_start_naming_each() {
    let env = TestEnv::with(no_refill).await;
    seed(&env, ["np"], 100).await;
    let role = Role::create(&env).await;
    role.grant(
        &env,
        &["DELETE ON credit.outbox", "INSERT ON credit.settlements"],
    )
    .await;
    env.publish(&[body(&platform_gpt4("np", "np-0"))]).await;
    let (mut worker, _, log) = WorkerProcess::spawn_logged(
        &role.worker_env(&env),
        &["run"],
        "warn,credit_worker::telemetry=info",
    );
    assert_eq!(worker.wait_exit(T).await, Some(1));
    let exit = log
        .try_iter()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(&line).ok())
        .find(|line| line["message"] == "exiting")
        .expect("the exit's reason logged");
    let refusal = format!(
        "database: the role \"{}\" lacks INSERT on credit.settlements, DELETE on credit.outbox:",
        role.name
    );
    let error = exit["error"].as_str().unwrap_or_default();
    assert!(error.starts_with(&refusal), "{exit}");
    assert_eq!(env.outcome_of("np-0").await, None);
    // Granted, it starts; and one that keeps every event needs no DELETE.
    let grant = format!("GRANT INSERT ON credit.settlements TO {}", role.name);
    sqlx::query(&grant).execute(&env.pool).await.expect(&grant);
    let mut vars = role.worker_env(&env);
    vars.push(("CREDIT_WORKER__OUTBOX__RETENTION_S".into(), "0".into()));
    let (mut worker, http) = WorkerProcess::spawn_with_http(&vars, &["run"]);
    wait_status(T, http, "/readyz", 200).await;
    env.wait_decisions(1, T).await;
    assert_eq!(env.outcome_of("np-0").await.as_deref(), Some("charged"));
    worker.sigterm();
    assert_eq!(worker.wait_exit(T).await, Some(0));
    env.cleanup().await;
    drop(role);
}

/// A record of the watermark that another broker user sent (anyone who may publish to the
/// default exchange reaches the queue) is not the relays': one forged far ahead does not stop
/// the workers as if the database had gone back in time.
#[tokio::test]
async fn a_watermark_record_not_sent_by_the_workers_user_is_ignored() {
    let env = TestEnv::with(no_refill).await;
    seed(&env, ["pr"], 100).await;
    // A first start declares the records' queue.
    Worker::start(env.settings.clone())
        .await
        .expect("worker")
        .stop()
        .await
        .expect("stop");
    let ledger_id = identity::read(&env.pool).await.expect("identity").ledger_id;
    let forged = serde_json::json!({"ledger_id": ledger_id, "published_through": 999_999});
    let (_conn, ch) = env.amqp_channel().await;
    let confirm = ch
        .basic_publish(
            "".into(),
            env.names.progress.as_str().into(),
            lapin::options::BasicPublishOptions::default(),
            &serde_json::to_vec(&forged).expect("JSON"),
            credit_worker::amqp::persistent_json(),
        )
        .await
        .expect("publish");
    drop(confirm);
    wait_for(T, "the forged record on the queue", || async {
        recorded_progress(&env).await == Some(999_999)
    })
    .await;
    let worker = Worker::start(env.settings.clone()).await.expect("worker");
    env.publish(&[body(&platform_gpt4("pr", "pr-0"))]).await;
    env.wait_decisions(1, T).await;
    worker.stop().await.expect("stop");
    env.cleanup().await;
}
