//! Operations (SPEC §9): the HTTP endpoints, readiness through a database outage without
//! losing a message, and the refill scheduler (its cron tick and the catch-up at start-up).
//!
//! The Prometheus recorder is process-wide. Workers here run without a scheduled sweep unless
//! a test is about the scheduler; those tests hold `SWEEPS` exclusively (every test of the
//! binary that sweeps shares it), so the refill-run counter moves only for the test reading
//! it. The outage test holds `DECIDE_RETRIES` the same way.

use std::time::Duration;

use chrono::{TimeZone, Utc};
use credit_worker::clock::ManualClock;
use credit_worker::ledger::TxType;
use credit_worker::refill::Month;
use credit_worker::service::Worker;
use sqlx::Connection as _;
use tokio_util::sync::CancellationToken;

use crate::fixtures::*;
use crate::helpers::*;

const T: Duration = Duration::from_secs(30);

fn refill_runs() -> f64 {
    metric_value(&metrics_now(), "credit_refill_runs_total", &[])
}

async fn monthly_grants(env: &TestEnv, user: &str, month: Month) -> Vec<(String, i64)> {
    sqlx::query_as(
        "SELECT transaction_key, amount FROM credit.transactions
          WHERE user_id = $1 AND type = 'GRANT' AND transaction_key = $2 ORDER BY seq",
    )
    .bind(user)
    .bind(month.refill_key())
    .fetch_all(&env.pool)
    .await
    .expect("grants")
}

/// A worker of its own for `user` (100 credits), refill off, whose log pipe is `closed` or
/// never read (see [`WorkerProcess::spawn_log_stuck`]); ready.
async fn worker_with_stuck_log(env: &TestEnv, user: &str, closed: bool) -> (WorkerProcess, u16) {
    seed(env, [user], 100).await;
    let mut vars = env.process_env();
    vars.push(("CREDIT_WORKER__REFILL__ENABLED".into(), "false".into()));
    let (worker, port) = WorkerProcess::spawn_log_stuck(&vars, &["run"], closed);
    wait_status(T, port, "/readyz", 200).await;
    (worker, port)
}

/// A log that can no longer be written (its reader gone: a log shipper that died, a pipe
/// closed) costs its lines, counted, and nothing else: the worker bills and stops as ever.
/// Before, the first line written to the closed pipe aborted the process (the log's own
/// report of the failed write panicked on the same stderr, inside the panic hook).
#[tokio::test]
async fn a_closed_log_pipe_costs_lines_not_the_worker() {
    let env = TestEnv::with(no_refill).await;
    let (mut worker, port) = worker_with_stuck_log(&env, "piped", true).await;
    // An invalid message is logged (a warning), the valid one after it billed.
    env.publish(&[b"not json".to_vec(), body(&platform_gpt4("piped", "lp-1"))])
        .await;
    env.wait_decisions(1, T).await;
    assert_eq!(env.outcome_of("lp-1").await.as_deref(), Some("charged"));
    wait_for(T, "the lost lines counted", || async {
        scraped(port, "credit_log_lines_lost_total", &[]).await >= 1.0
    })
    .await;
    assert_eq!(http_status(port, "/readyz").await, 200);
    worker.sigterm();
    assert_eq!(worker.wait_exit(T).await, Some(0));
    env.assert_audit_clean().await;
    env.cleanup().await;
}

/// A log reader that stalls (a pipe nobody reads: a log shipper that stopped reading) holds
/// up nothing: 9,000 invalid messages, each logged, all go to the dead letters (the pipe
/// takes about 250 of their lines, 8,192 wait, the rest are dropped and counted), the valid
/// one behind them is billed, and a SIGTERM stops the worker with exit 0, its last lines
/// given a second. Before, billing stopped at the line the pipe did not take, and the stop
/// with it.
#[tokio::test]
async fn a_stalled_log_reader_holds_up_nothing() {
    let env = TestEnv::with(no_refill).await;
    let (mut worker, port) = worker_with_stuck_log(&env, "stalled", false).await;
    let mut bodies: Vec<Vec<u8>> = (0..9000).map(|i| format!("bad-{i}").into_bytes()).collect();
    bodies.push(body(&platform_gpt4("stalled", "ls-1")));
    env.publish(&bodies).await;
    env.wait_decisions(1, T).await;
    assert_eq!(env.outcome_of("ls-1").await.as_deref(), Some("charged"));
    wait_for(T, "every invalid message dead-lettered", || async {
        scraped(port, "credit_dead_lettered_total", &[]).await == 9000.0
    })
    .await;
    assert!(scraped(port, "credit_log_lines_lost_total", &[]).await > 0.0);
    worker.sigterm();
    assert_eq!(worker.wait_exit(T).await, Some(0));
    env.assert_audit_clean().await;
    env.cleanup().await;
}

#[tokio::test]
async fn http_endpoints_report_health_readiness_and_metrics() {
    let env = TestEnv::new().await;
    let mut vars = env.process_env();
    vars.push((
        "CREDIT_WORKER__REFILL__SCHEDULE".into(),
        "0 0 0 1 1 * 2099".into(),
    ));
    // A process of its own: its metrics count this test's traffic alone.
    let (mut worker, port) = WorkerProcess::spawn_with_http(&vars, &["run"]);
    wait_status(T, port, "/healthz", 200).await;
    wait_status(T, port, "/readyz", 200).await;
    // Every part named, none missing (control, connecting beside the consumer, is named only
    // after 5 s without a connection).
    wait_for(T, "/readyz to say all is up", || async {
        let ready = http_get(port, "/readyz").await.map(|(_, body)| body);
        ready.as_deref() == Some("database: up\nconsumer: consuming\n")
    })
    .await;
    assert_eq!(http_status(port, "/nope").await, 404);

    let (status, before) = http_get(port, "/metrics").await.expect("metrics");
    assert_eq!(status, 200);
    env.publish(&[
        body(&platform_gpt4("ops-user", "ops-1")),
        body(&platform_gpt4("ops-user", "ops-2")),
        body(&own_key("ops-user", "ops-3")),
        b"nope".to_vec(),
    ])
    .await;
    env.wait_decisions(3, T).await;
    let dead = env.dead_letters(1).await;
    assert_eq!(dead[0].0, b"nope");

    let expected: [(&str, Labels, f64); 5] = [
        ("credit_messages_total", &[("outcome", "charged")], 2.0),
        ("credit_messages_total", &[("outcome", "free")], 1.0),
        ("credit_messages_total", &[("outcome", "invalid")], 1.0),
        ("credit_credits_charged_total", &[], 20.0),
        ("credit_dead_lettered_total", &[], 1.0),
    ];
    let grown = |now: &str, name: &str, labels: Labels| {
        metric_value(now, name, labels) - metric_value(&before, name, labels)
    };
    // Counted once the messages are acked, a moment after their commit.
    wait_for(T, "metrics to count the traffic", || async {
        let now = http_get(port, "/metrics")
            .await
            .map(|r| r.1)
            .unwrap_or_default();
        expected
            .iter()
            .all(|(name, labels, n)| grown(&now, name, labels) >= *n)
    })
    .await;
    let (_, after) = http_get(port, "/metrics").await.expect("metrics");
    for (name, labels, n) in expected {
        assert_eq!(grown(&after, name, labels), n, "{name} {labels:?}");
    }
    for series in [
        "credit_batch_size_count",
        "credit_decide_seconds_bucket",
        "\ncredit_consuming 1\n",
    ] {
        assert!(after.contains(series), "{series} missing from:\n{after}");
    }
    // The ledger agrees: two charges of 10 on top of the 1000 refill.
    assert_eq!(
        env.ledger()
            .balance("ops-user", Utc::now())
            .await
            .expect("balance"),
        980
    );
    worker.sigterm();
    assert_eq!(worker.wait_exit(T).await, Some(0));
    env.assert_audit_clean().await;
    env.cleanup().await;
}

/// The worker's sessions ask the server for TCP keepalive, so a session whose client vanished
/// ends (with its locks, the relay leader's among them) within about a minute.
#[tokio::test]
async fn database_sessions_use_tcp_keepalive() {
    let env = TestEnv::new().await;
    let pool = credit_worker::db::pool(&env.settings.database).expect("pool");
    let tcp: bool = sqlx::query_scalar("SELECT inet_client_addr() IS NOT NULL")
        .fetch_one(&pool)
        .await
        .expect("client address");
    if !tcp {
        // Over a Unix socket the server has no TCP settings to show.
        skip("the database is reached over a Unix socket");
        pool.close().await;
        return env.cleanup().await;
    }
    for (setting, value) in [
        ("tcp_keepalives_idle", "30"),
        ("tcp_keepalives_interval", "10"),
        ("tcp_keepalives_count", "3"),
        ("tcp_user_timeout", "60000"),
    ] {
        let shown: String = sqlx::query_scalar(&format!("SHOW {setting}"))
            .fetch_one(&pool)
            .await
            .expect("show");
        assert_eq!(shown, value, "{setting}");
    }
    pool.close().await;
    env.cleanup().await;
}

/// Started while the database refuses connections, the worker answers its probes at once
/// (`/healthz` 200, `/readyz` 503) instead of holding a port that never replies, and becomes
/// ready once the database is back.
#[tokio::test]
async fn probes_answer_while_the_database_is_down_at_start() {
    let env = TestEnv::with(quiet_scheduler).await;
    let admin = env.admin_pool().await;
    env.set_reachable(&admin, false).await;
    let mut env_vars = env.process_env();
    env_vars.push(("CREDIT_WORKER__REFILL__ENABLED".into(), "false".into()));
    // The port is read from the log line the endpoints write once they serve.
    let (mut w, port) = WorkerProcess::spawn_with_http(&env_vars, &["run"]);
    assert_eq!(http_status(port, "/healthz").await, 200);
    let (status, body) = http_get(port, "/readyz").await.expect("readyz");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("database: down"), "{body}");
    env.set_reachable(&admin, true).await;
    wait_status(T, port, "/readyz", 200).await;
    w.sigterm();
    assert_eq!(w.wait_exit(T).await, Some(0));
    env.cleanup().await;
}

#[tokio::test]
async fn readyz_follows_the_database_and_no_message_is_lost_in_an_outage() {
    // It waits for the retry counter to move to know its worker tried during the outage.
    let _retries = DECIDE_RETRIES.lock().await;
    let env = TestEnv::with(|s| {
        quiet_scheduler(s);
        s.http.listen = any_port();
    })
    .await;
    let admin = env.admin_pool().await;
    let worker = Worker::start(env.settings.clone()).await.expect("worker");
    let port = worker.http_addr().expect("http address").port();
    wait_status(T, port, "/readyz", 200).await;
    env.publish(&[body(&platform_gpt4("outage-user", "before"))])
        .await;
    env.wait_decisions(1, T).await;

    let retries = || metric_value(&metrics_now(), "credit_decide_retries_total", &[]);
    let retries_before = retries();
    env.set_reachable(&admin, false).await;
    wait_status(T, port, "/readyz", 503).await;
    let (_, body_503) = http_get(port, "/readyz").await.expect("readyz");
    assert!(body_503.contains("database: down"), "{body_503}");

    // Published while the database is refused: the worker must take it, fail to decide it,
    // and keep it (unacked, not dead-lettered) until the database is back.
    env.publish(&[body(&platform_gpt4("outage-user", "during"))])
        .await;
    let names = env.names.clone();
    wait_for(T, "the worker to attempt the message during the outage", || {
        let names = names.clone();
        let env = &env;
        async move {
            retries() > retries_before || queue_depth(env, &names.dead_queue).await > 0
        }
    })
    .await;
    let dead = queue_depth(&env, &names.dead_queue).await;
    if dead > 0 {
        let letters = env.dead_letters(dead as usize).await;
        let reasons: Vec<&str> = letters.iter().map(|(_, r)| r.as_str()).collect();
        panic!("dead-lettered while the database was unreachable: {reasons:?}");
    }

    env.set_reachable(&admin, true).await;
    wait_status(T, port, "/readyz", 200).await;
    env.wait_decisions(2, T).await;
    env.publish(&[body(&platform_gpt4("outage-user", "after"))])
        .await;
    env.wait_decisions(3, T).await;

    for id in ["before", "during", "after"] {
        assert_eq!(env.outcome_of(id).await.as_deref(), Some("charged"), "{id}");
    }
    assert_decided_and_charged(&env, 3).await;
    assert_eq!(
        env.ledger()
            .balance("outage-user", Utc::now())
            .await
            .expect("balance"),
        970
    );
    assert_eq!(queue_depth(&env, &names.input_queue).await, 0);
    assert_eq!(queue_depth(&env, &names.dead_queue).await, 0);

    worker.stop().await.expect("stop");
    admin.close().await;
    env.assert_audit_clean().await;
    env.cleanup().await;
}

/// Seeds `sched-a` at 0 (a bare balance row) and `sched-b` at 250; lazy refill is off, so
/// only a sweep tops them up: to 1000 with grants of 1000 and 750.
async fn seed_below_target(env: &TestEnv) {
    sqlx::query("INSERT INTO credit.balances (user_id) VALUES ('sched-a')")
        .execute(&env.pool)
        .await
        .expect("seed sched-a");
    env.ledger()
        .credit(
            TxType::TopUp,
            "sched-b",
            250,
            Some("SEED"),
            None,
            Utc::now(),
        )
        .await
        .expect("seed sched-b");
}

async fn assert_refilled_once(env: &TestEnv, month: Month) {
    let key = month.refill_key();
    assert_eq!(
        monthly_grants(env, "sched-a", month).await,
        vec![(key.clone(), 1000)]
    );
    assert_eq!(
        monthly_grants(env, "sched-b", month).await,
        vec![(key, 750)]
    );
    assert_eq!(
        env.scalar_i64("SELECT count(*) FROM credit.transactions WHERE type = 'GRANT'")
            .await,
        2
    );
}

async fn wait_refilled(env: &TestEnv, month: Month, within: Duration) {
    wait_count(
        env,
        within,
        &format!("the {month} refill"),
        "SELECT count(DISTINCT user_id) FROM credit.transactions WHERE transaction_key = $1",
        &[&month.refill_key()],
        |n| n == 2,
    )
    .await;
}

/// A schedule without a tick after the worker's start (a day no month has, a year gone by)
/// stops the start naming the key, rather than leave every month's sweep undone.
#[tokio::test]
async fn a_refill_schedule_that_never_fires_again_is_refused_at_start() {
    let now = Utc.with_ymd_and_hms(2031, 3, 10, 8, 0, 0).unwrap();
    let env = TestEnv::new().await;
    for (cron, refused) in [
        ("0 0 0 30 2 *", true),
        ("0 0 0 1 * * 2030", true),
        ("0 0 0 1 * * 2031", false),
    ] {
        let mut settings = env.settings.clone();
        settings.refill.schedule = cron.parse().expect("cron");
        let started =
            Worker::start_with_clock(settings, CancellationToken::new(), ManualClock::new(now))
                .await;
        match started {
            Ok(w) if !refused => w.stop().await.expect("stop"),
            Ok(w) => {
                let _ = w.stop().await;
                panic!("{cron}: started");
            }
            Err(e) => assert_eq!(
                (refused, format!("{e:#}")),
                (
                    true,
                    format!(
                        "refill.schedule: {cron:?} never fires after 2031-03-10 08:00:00 (UTC)"
                    )
                ),
            ),
        }
    }
    env.cleanup().await;
}

/// A mistake in the cost files or the schedule, which only `run` used to read, is named by
/// the upgrade's check commands before they write: the new build's `outcome none` or
/// `migrate` finds it before an upgrade, not the first replica to restart after one.
#[tokio::test]
async fn outcome_and_migrate_name_a_mistake_in_the_cost_files_or_the_schedule() {
    let env = TestEnv::new().await;
    let dir = TempDir::new("cw-inputs");
    let empty = dir.file("costs.toml", "");
    let misspelt = dir.file(
        "estimates.json",
        r#"{"estimate": {"b": {"mean_credits": 3}}}"#,
    );
    let cases = [
        (
            "CREDIT_WORKER__COST__TABLE",
            empty.as_str(),
            "no [[block]] in the table",
        ),
        (
            "CREDIT_WORKER__COST__PREFLIGHT_ESTIMATES",
            misspelt.as_str(),
            "no `estimates` object",
        ),
        (
            "CREDIT_WORKER__REFILL__SCHEDULE",
            "0 0 0 30 2 *",
            "never fires after",
        ),
    ];
    for (var, value, why) in cases {
        for command in [&["outcome", "none"][..], &["migrate"]] {
            let out = env
                .cli_command(command)
                .env(var, value)
                .output()
                .expect("the command ran");
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(1), "{command:?} {var}: {stderr}");
            assert!(stderr.contains(why), "{command:?} {var}: {stderr}");
            assert!(out.stdout.is_empty(), "{command:?} {var}");
        }
    }
    env.cleanup().await;
}

/// With `log.format = json` every line the process writes to its log is JSON, the error it
/// exits with included.
#[tokio::test]
async fn a_fatal_error_ends_a_json_log_with_a_json_line() {
    let env = TestEnv::new().await;
    // With the log filtered out too (RUST_LOG=off), the last word is still written.
    for filter in ["info", "off"] {
        let out = env
            .cli_command(&["run"])
            .env("CREDIT_WORKER__LOG__FORMAT", "json")
            .env("CREDIT_WORKER__REFILL__SCHEDULE", "0 0 0 30 2 *")
            .env("RUST_LOG", filter)
            .output()
            .expect("run");
        assert_eq!(out.status.code(), Some(1));
        let log = String::from_utf8_lossy(&out.stderr);
        let lines: Vec<serde_json::Value> = log
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l:?}")))
            .collect();
        let last = lines.last().expect("a log line");
        assert_eq!(
            (&last["level"], &last["message"]),
            (&"ERROR".into(), &"exiting".into())
        );
        let error = last["error"].as_str().unwrap_or_default();
        assert!(
            error.starts_with("refill.schedule: \"0 0 0 30 2 *\" never fires"),
            "{error}"
        );
    }
    env.cleanup().await;
}

#[tokio::test]
async fn scheduled_sweep_runs_at_its_cron_tick() {
    let _sweeps = SWEEPS.lock().await;
    // On the 15th at noon; the clock starts on the 10th, so nothing is due at start-up.
    let start = Utc.with_ymd_and_hms(2031, 3, 10, 8, 0, 0).unwrap();
    let tick = Utc.with_ymd_and_hms(2031, 3, 15, 12, 0, 0).unwrap();
    let next_tick = Utc.with_ymd_and_hms(2031, 4, 15, 12, 0, 0).unwrap();
    let env = TestEnv::with(|s| {
        s.refill.schedule = "0 0 12 15 * *".parse().expect("cron");
        s.refill.lazy = false;
    })
    .await;
    seed_below_target(&env).await;
    let runs_before = refill_runs();
    let clock = ManualClock::new(start);
    let worker = Worker::start_with_clock(
        env.settings.clone(),
        CancellationToken::new(),
        clock.clone(),
    )
    .await
    .expect("worker");
    // Nothing was due at start: the scheduler sleeps until the tick (rather than sweeping as
    // a catch-up, which a clock moved before it started would have it do).
    wait_for(T, "the scheduler to sleep until its tick", || async {
        clock.sleepers() == 1
    })
    .await;
    assert_eq!(
        env.scalar_i64("SELECT count(*) FROM credit.transactions WHERE type = 'GRANT'")
            .await,
        0
    );
    clock.set(tick);
    let month = Month::of(tick);
    wait_refilled(&env, month, T).await;
    assert_refilled_once(&env, month).await;

    // The next month's tick: only what was spent since is granted back.
    env.ledger()
        .spend("sched-a", 300, "SPEND-1", serde_json::json!({}), Utc::now())
        .await
        .expect("spend");
    clock.set(next_tick);
    let next_month = Month::of(next_tick);
    wait_count(
        &env,
        T,
        "the next month's refill",
        "SELECT count(*) FROM credit.transactions WHERE transaction_key = $1",
        &[&next_month.refill_key()],
        |n| n == 1,
    )
    .await;
    // The sweep ends a moment after its last range commits: a stop before would give it up.
    wait_for(T, "the second sweep to end", || async {
        refill_runs() - runs_before >= 2.0
    })
    .await;
    worker.stop().await.expect("stop");
    assert_eq!(
        monthly_grants(&env, "sched-a", next_month).await,
        vec![(next_month.refill_key(), 300)]
    );
    assert!(monthly_grants(&env, "sched-b", next_month).await.is_empty());
    assert_eq!(refill_runs() - runs_before, 2.0);
    env.assert_audit_clean().await;
    env.cleanup().await;
}

#[tokio::test]
async fn missed_tick_is_caught_up_exactly_once_at_start() {
    let _sweeps = SWEEPS.lock().await;
    let env = TestEnv::with(|s| {
        // The first of the month has passed (or is now): this month's sweep is due at start.
        s.refill.schedule = "0 0 0 1 * *".parse().expect("cron");
        s.refill.lazy = false;
    })
    .await;
    seed_below_target(&env).await;
    let runs_before = refill_runs();
    let month = Month::of(Utc::now());
    let worker = Worker::start(env.settings.clone()).await.expect("worker");
    wait_refilled(&env, month, T).await;
    // The sweep ends a moment after its last range commits: a stop before would give it up.
    wait_for(T, "the sweep to end", || async {
        refill_runs() - runs_before >= 1.0
    })
    .await;
    // Stopped before counting: no later sweep can slip in.
    worker.stop().await.expect("stop");

    assert_refilled_once(&env, month).await;
    assert_eq!(refill_runs() - runs_before, 1.0);
    env.assert_audit_clean().await;
    env.cleanup().await;
}

/// The scheduled sweep runs two chunks at once; with the smallest pool allowed (3
/// connections, one of them the outbox relay's listener) it must
/// still get through, reading each next range while a chunk is in flight, instead of waiting
/// on the connection that chunk holds.
#[tokio::test]
async fn the_scheduled_sweep_gets_through_on_the_smallest_pool() {
    let _sweeps = SWEEPS.lock().await;
    let env = TestEnv::with(|s| {
        s.refill.schedule = "0 0 0 1 * *".parse().expect("cron");
        s.refill.lazy = false;
        s.refill.chunk_size = 2;
        s.database.max_connections = 3;
    })
    .await;
    let users: Vec<String> = (0..12).map(|i| format!("small-pool-{i:02}")).collect();
    sqlx::query("INSERT INTO credit.balances (user_id) SELECT unnest($1::text[])")
        .bind(&users)
        .execute(&env.pool)
        .await
        .expect("seed");
    let month = Month::of(Utc::now());
    let worker = Worker::start(env.settings.clone()).await.expect("worker");
    wait_count(
        &env,
        T,
        "every user refilled",
        "SELECT count(DISTINCT user_id) FROM credit.transactions WHERE transaction_key = $1",
        &[&month.refill_key()],
        |n| n == 12,
    )
    .await;
    worker.stop().await.expect("stop");
    let granted = env
        .scalar_i64(
            "SELECT coalesce(sum(amount), 0)::int8 FROM credit.transactions WHERE type = 'GRANT'",
        )
        .await;
    assert_eq!(granted, 12 * 1000);
    env.assert_audit_clean().await;
    env.cleanup().await;
}

/// Passwords in the URLs never reach the log, also when connecting fails over and over.
#[tokio::test]
async fn passwords_in_urls_stay_out_of_the_log() {
    use std::io::BufRead;
    let env = TestEnv::with(quiet_scheduler).await;
    let db_url = env
        .settings
        .database
        .url
        .replacen("://root@", "://root:pg-s3cret@", 1);
    assert!(db_url.contains("pg-s3cret"), "{db_url}");
    let mut vars = env.process_env();
    vars.push(("DATABASE_URL".into(), db_url));
    // A broker that is not there: the consumer, relay and control sessions fail and retry.
    vars.push((
        "AMQP_URL".into(),
        "amqp://guest:mq-s3cret@127.0.0.1:1/%2f".into(),
    ));
    vars.push(("RUST_LOG".into(), "info".into()));
    let mut child = std::process::Command::new(binary())
        .arg("run")
        .env_remove("CREDIT_WORKER_CONFIG")
        .envs(vars)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    let mut lines = Vec::new();
    let deadline = std::time::Instant::now() + T;
    // Until every broker session has failed at least twice.
    while ["consumer", "outbox relay", "control"].iter().any(|s| {
        lines
            .iter()
            .filter(|l: &&String| l.contains("reconnecting") && l.contains(&format!("\"{s}\"")))
            .count()
            < 2
    }) {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => lines.push(line),
            Err(_) => panic!("the sessions did not retry in time:\n{}", lines.join("\n")),
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    for line in &lines {
        assert!(!line.contains("s3cret"), "a password in the log: {line}");
    }
    // Where the worker says what it connects to, the passwords are masked.
    let connecting = lines
        .iter()
        .find(|l| l.contains("connecting"))
        .unwrap_or_else(|| panic!("no start-up line naming the URLs:\n{}", lines.join("\n")));
    assert!(
        connecting.contains("amqp://guest:****@127.0.0.1:1/%2f"),
        "{connecting}"
    );
    assert!(connecting.contains("://root:****@"), "{connecting}");
    env.cleanup().await;
}

/// SIGTERM while the catch-up sweep waits on a row lock: the sweep is given up (its range
/// rolls back) rather than holding the stop for as long as the lock is held, the worker exits
/// 0 with nothing left unpublished, and the next start completes the month.
#[tokio::test]
async fn sigterm_during_a_sweep_gives_it_up_and_the_next_start_completes_it() {
    let env = TestEnv::with(no_refill).await;
    // Seeded with refill off: the start-up catch-up sweep refills every one of them.
    let users: Vec<String> = (0..50).map(|i| format!("sw-{i:02}")).collect();
    seed(&env, &users, 1).await;
    let held = env.hold_account("sw-25").await;
    let (mut w, _port) = WorkerProcess::spawn_with_http(&env.process_env(), &["run"]);
    env.wait_for_one_lock_waiter(T, "the sweep waiting on the lock")
        .await;
    w.sigterm();
    assert_eq!(w.wait_exit(T).await, Some(0));
    let refilled = "SELECT count(*) FROM credit.transactions
                     WHERE transaction_key LIKE 'MONTHLY-CREDIT-TOP-UP-%'";
    assert_eq!(env.scalar_i64(refilled).await, 0);
    assert_eq!(env.scalar_i64(UNPUBLISHED).await, 0);
    held.commit().await.expect("release the lock");

    let (mut w, _port) = WorkerProcess::spawn_with_http(&env.process_env(), &["run"]);
    wait_count(&env, T, "the month completed", refilled, &[], |n| n == 50).await;
    w.sigterm();
    assert_eq!(w.wait_exit(T).await, Some(0));
    assert_eq!(env.scalar_i64(refilled).await, 50);
    assert_eq!(env.scalar_i64(UNPUBLISHED).await, 0);
    env.assert_audit_clean().await;
    env.cleanup().await;
}

/// A queue that exists with other arguments than configured (here `amqp.delivery_limit`
/// changed) is refused by the broker on every reconnect: the worker says so and exits non-zero
/// rather than retry forever without consuming.
#[tokio::test]
async fn a_queue_declared_with_other_arguments_stops_the_worker_with_the_reason() {
    let env = TestEnv::with(no_refill).await;
    // Declares the topology as the test's settings have it (delivery limit 5).
    let (_conn, _ch) = env.amqp_channel().await;
    let mut vars = env.process_env();
    vars.push(("CREDIT_WORKER__AMQP__DELIVERY_LIMIT".into(), "7".into()));
    let (mut w, _port, log) =
        WorkerProcess::spawn_logged(&vars, &["run"], "warn,credit_worker::telemetry=info");
    let exit = w.wait_exit(T).await;
    assert!(matches!(exit, Some(code) if code != 0), "exit {exit:?}");
    // Every line: the sender goes once the exited process's stderr ends.
    let lines: Vec<String> = log.iter().collect();
    assert!(
        lines
            .iter()
            .any(|l| l.contains("refuses this configuration") && l.contains("x-delivery-limit")),
        "{lines:#?}"
    );
    env.cleanup().await;
}

/// `/metrics` reads the outbox backlog at each scrape: with the broker out of reach, the relay
/// cannot publish (nor refresh the gauge), and the backlog shows the events waiting.
#[tokio::test]
async fn the_outbox_backlog_is_read_at_each_scrape() {
    let env = TestEnv::with(no_refill).await;
    let mut vars = env.process_env();
    // A port nothing listens on: every broker session fails and reconnects.
    vars.push((
        "AMQP_URL".into(),
        "amqp://guest:guest@127.0.0.1:1/%2f".into(),
    ));
    // No refill of the seeded users by the worker: the backlog is their three events.
    vars.push(("CREDIT_WORKER__REFILL__ENABLED".into(), "false".into()));
    let (mut w, port) = WorkerProcess::spawn_with_http(&vars, &["run"]);
    seed(&env, ["m1", "m2", "m3"], 10).await;
    wait_for(T, "a backlog of 3", || async {
        let text = http_get(port, "/metrics").await.map(|(_, b)| b);
        let backlog = text.map(|t| metric_value(&t, "credit_outbox_backlog", &[]));
        backlog == Some(3.0)
    })
    .await;
    w.kill9();
    env.cleanup().await;
}

/// A replica that finds the sweep lock held (another replica, or a command, sweeping) tries
/// again until it is free, so the month is swept even if the holder never finishes.
#[tokio::test]
async fn a_sweep_waits_for_the_lock_rather_than_skip_the_month() {
    let env = TestEnv::with(no_refill).await;
    seed_below_target(&env).await;
    let mut holder = env.pool.acquire().await.expect("a connection");
    sqlx::query("SELECT pg_advisory_lock(x'637265646974'::int8)")
        .execute(&mut *holder)
        .await
        .expect("hold the sweep lock");
    let mut vars = env.process_env();
    vars.push(("CREDIT_WORKER__REFILL__LAZY".into(), "false".into()));
    let (mut w, _port, log) =
        WorkerProcess::spawn_logged(&vars, &["run"], "warn,credit_worker=info");
    let elsewhere = "refill sweep running elsewhere";
    wait_for_line(
        &log,
        elsewhere,
        T,
        "the worker finding the sweep's lock held",
    );
    sqlx::query("SELECT pg_advisory_unlock(x'637265646974'::int8)")
        .execute(&mut *holder)
        .await
        .expect("release the sweep lock");
    let month = Month::of(Utc::now());
    wait_count(
        &env,
        T,
        "this month's refill",
        "SELECT count(DISTINCT user_id) FROM credit.transactions WHERE transaction_key = $1",
        &[&month.refill_key()],
        |n| n == 2,
    )
    .await;
    w.sigterm();
    assert_eq!(w.wait_exit(T).await, Some(0));
    env.cleanup().await;
}

/// A replica frozen while it holds the sweep lock (SIGSTOP: a paused VM, a stuck runtime)
/// loses it once the lock's session has been idle past the lease (twice the statement
/// timeout and a second, 3 s here), as a frozen relay leader loses the lead: another replica
/// then sweeps the month while it stays frozen (once the frozen one's open range is ended
/// too, idle in its transaction past twice the lease), and the month is refilled once.
#[tokio::test]
async fn a_frozen_sweeper_loses_the_sweep_lock_to_another_replica() {
    let env = TestEnv::with(no_refill).await;
    // Seeded with refill off: the start-up catch-up sweep refills every one of them.
    let users: Vec<String> = (0..50).map(|i| format!("fz-{i:02}")).collect();
    seed(&env, &users, 1).await;
    let mut vars = env.process_env();
    vars.push(("CREDIT_WORKER__REFILL__LAZY".into(), "false".into()));
    vars.push((
        "CREDIT_WORKER__DATABASE__STATEMENT_TIMEOUT_MS".into(),
        "1000".into(),
    ));
    // The first replica's sweep waits on a user held here, then freezes with the lock.
    let held = env.hold_account("fz-25").await;
    let (frozen, _) = WorkerProcess::spawn_with_http(&vars, &["run"]);
    env.wait_for_one_lock_waiter(T, "the sweep waiting on the user")
        .await;
    // Still frozen should the test fail: dropping the process kills it.
    frozen.signal("STOP");
    held.commit().await.expect("release the user");
    let (mut other, _) = WorkerProcess::spawn_with_http(&vars, &["run"]);
    let refilled = "SELECT count(*) FROM credit.transactions
                     WHERE transaction_key LIKE 'MONTHLY-CREDIT-TOP-UP-%'";
    wait_count(
        &env,
        Duration::from_secs(60),
        "the month swept by the other",
        refilled,
        &[],
        |n| n == 50,
    )
    .await;
    frozen.signal("CONT");
    other.sigterm();
    assert_eq!(other.wait_exit(T).await, Some(0));
    frozen.sigterm();
    let mut frozen = frozen;
    assert_eq!(frozen.wait_exit(T).await, Some(0));
    assert_eq!(env.scalar_i64(refilled).await, 50);
    env.assert_audit_clean().await;
    env.cleanup().await;
}

/// A worker (its HTTP port) ready, with one seeded user's event waiting and the relay's lead
/// held by the connection returned, a session that publishes nothing (as a stuck leader on
/// another replica would).
async fn ready_behind_a_held_lead(env: &TestEnv) -> (WorkerProcess, u16, sqlx::PgConnection) {
    seed(env, ["st"], 100).await;
    let leader = env.hold_relay_lead().await;
    let mut vars = env.process_env();
    vars.push(("CREDIT_WORKER__REFILL__ENABLED".into(), "false".into()));
    let (w, port) = WorkerProcess::spawn_with_http(&vars, &["run"]);
    wait_status(T, port, "/readyz", 200).await;
    (w, port, leader)
}

fn oldest_age(metrics: &str) -> f64 {
    metric_value(metrics, "credit_outbox_oldest_unpublished_seconds", &[])
}

/// `credit_outbox_oldest_unpublished_seconds` tells when events stop going out although every
/// part runs: here the relay's lead is held by a session that publishes nothing, and the
/// event waiting was written a minute and a half ago. Once it lets go, the worker's relay
/// leads and publishes, and the age falls to 0.
#[tokio::test]
async fn metrics_report_how_long_the_next_event_has_waited() {
    let env = TestEnv::with(no_refill).await;
    let (mut w, port, leader) = ready_behind_a_held_lead(&env).await;
    sqlx::query("UPDATE credit.outbox SET created_at = now() - interval '90 seconds'")
        .execute(&env.pool)
        .await
        .expect("age the event");
    let (_, text) = http_get(port, "/metrics").await.expect("metrics");
    // 90 s, and the moments between the update and the scrape.
    assert!((90.0..120.0).contains(&oldest_age(&text)), "{text}");
    assert_eq!(metric_value(&text, "credit_outbox_backlog", &[]), 1.0);
    leader.close().await.expect("the leader goes");
    wait_for(T, "the event published", || async {
        let text = http_get(port, "/metrics")
            .await
            .map(|r| r.1)
            .unwrap_or_default();
        oldest_age(&text) == 0.0 && metric_value(&text, "credit_outbox_backlog", &[]) == 0.0
    })
    .await;
    assert_eq!(env.scalar_i64(UNPUBLISHED).await, 0);
    w.sigterm();
    assert_eq!(w.wait_exit(T).await, Some(0));
    env.cleanup().await;
}

/// A scrape that cannot read the outbox in time (its table locked here; a database that
/// stalls alike) shows the next event's age grown by the time since the last reading, rather
/// than the last reading as if it were current.
#[tokio::test]
async fn an_unreadable_outbox_shows_its_age_growing() {
    let env = TestEnv::with(no_refill).await;
    let (mut w, port, leader) = ready_behind_a_held_lead(&env).await;
    let (_, text) = http_get(port, "/metrics").await.expect("metrics");
    let read = oldest_age(&text);
    let mut locker = env.pool.begin().await.expect("a transaction");
    sqlx::query("LOCK TABLE credit.outbox IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *locker)
        .await
        .expect("lock the outbox");
    let (_, text) = http_get(port, "/metrics").await.expect("metrics");
    // The scrape waited 0.7 s for the database before giving up.
    assert!(oldest_age(&text) >= read + 0.7, "{read} then {text}");
    assert_eq!(metric_value(&text, "credit_outbox_backlog", &[]), 1.0);
    locker.rollback().await.expect("unlock");
    leader.close().await.expect("the leader goes");
    w.sigterm();
    assert_eq!(w.wait_exit(T).await, Some(0));
    env.cleanup().await;
}

/// A worker that starts while its database refuses connections has no reading of the outbox
/// to grow: its start counts as one of 0, so the age shown grows through the outage instead
/// of reading 0 ("nothing waits") until the database answers.
#[tokio::test]
async fn an_outbox_never_read_shows_its_age_growing_from_the_start() {
    let env = TestEnv::with(no_refill).await;
    let admin = env.admin_pool().await;
    env.set_reachable(&admin, false).await;
    let (mut w, port) = WorkerProcess::spawn_with_http(&env.process_env(), &["run"]);
    wait_status(T, port, "/readyz", 503).await;
    let age_now = || async {
        let text = http_get(port, "/metrics").await.map(|r| r.1);
        text.map_or(0.0, |t| oldest_age(&t))
    };
    let first = age_now().await;
    assert!(first > 0.0, "the age read 0 with the outbox never read");
    // The backlog and the clock's offset are unknown, not 0 ("nothing waits", "in sync").
    let (_, text) = http_get(port, "/metrics").await.expect("metrics");
    assert!(
        metric_value(&text, "credit_outbox_backlog", &[]).is_nan(),
        "{text}"
    );
    assert!(
        metric_value(&text, "credit_clock_offset_seconds", &[]).is_nan(),
        "{text}"
    );
    wait_for(T, "the age to grow", || async {
        age_now().await >= first + 1.0
    })
    .await;
    env.set_reachable(&admin, true).await;
    wait_for(T, "the outbox read: nothing waits", || async {
        let text = http_get(port, "/metrics").await.map(|r| r.1);
        text.is_some_and(|t| {
            oldest_age(&t) == 0.0 && metric_value(&t, "credit_outbox_backlog", &[]) == 0.0
        })
    })
    .await;
    w.sigterm();
    assert_eq!(w.wait_exit(T).await, Some(0));
    env.cleanup().await;
}

/// An HTTP request left half sent (a scraper that stalled) when the worker is told to stop is
/// dropped: the stop is clean, exit 0.
#[tokio::test]
async fn a_stop_with_an_unfinished_http_request_is_clean() {
    use tokio::io::AsyncWriteExt;
    let env = TestEnv::with(no_refill).await;
    let (mut w, port, log) = WorkerProcess::spawn_logged(&env.process_env(), &["run"], "info");
    wait_for_line(&log, "consuming", T, "the worker consuming");
    let mut scraper = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect to the HTTP port");
    scraper
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
        .await
        .expect("half a request");
    w.sigterm();
    assert_eq!(w.wait_exit(T).await, Some(0));
    drop(scraper);
    env.cleanup().await;
}

/// `publish` sends every line, confirmed, and says when no worker consumes the queue (before
/// one starts, or under a mistyped namespace): the messages wait there.
#[tokio::test]
async fn publish_says_when_no_worker_consumes_the_queue() {
    let env = TestEnv::with(no_refill).await;
    let lines: Vec<String> = ["p1", "p2"]
        .iter()
        .map(|id| String::from_utf8(body(&platform_gpt4("u", id))).expect("UTF-8"))
        .collect();
    let file = std::env::temp_dir().join(format!("{}.jsonl", unique("publish")));
    std::fs::write(&file, lines.join("\n")).expect("write the entries");
    let out = env.cli(&["publish", file.to_str().expect("a UTF-8 path")]);
    let _ = std::fs::remove_file(&file);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "2 messages published\n"
    );
    assert!(
        stderr.contains("no worker consumes this queue now"),
        "{stderr}"
    );
    assert_eq!(queue_depth(&env, &env.names.input_queue).await, 2);
    env.cleanup().await;
}

/// A login the database refuses (here a role that does not exist) stops the start naming the
/// key, rather than retrying what only the URL can fix.
#[tokio::test]
async fn a_login_the_database_refuses_stops_the_start() {
    let env = TestEnv::new().await;
    let mut settings = env.settings.clone();
    let mut url = url::Url::parse(&settings.database.url).expect("database url");
    url.set_username("credit_no_such_role").expect("a user");
    url.set_password(None).expect("no password");
    settings.database.url = url.to_string();
    let refused = start_refused(settings, "with a role the server does not know");
    let err = tokio::time::timeout(T, refused)
        .await
        .expect("refused at once, not retried");
    assert!(
        err.starts_with("database.url: the server refused the login"),
        "{err}"
    );
    assert!(err.contains("credit_no_such_role"), "{err}");
    // The commands say the same, as an operator's mistake (not `internal`).
    for args in [["migrate", "--json"], ["audit", "--json"]] {
        let out = env
            .cli_command(&args)
            .env("DATABASE_URL", url.as_str())
            .output()
            .expect("run the CLI");
        let printed: serde_json::Value =
            serde_json::from_slice(&out.stdout).expect("an error object");
        assert_eq!(
            printed["error"]["code"], "bad_request",
            "{args:?}: {printed}"
        );
        let message = printed["error"]["message"].as_str().unwrap_or_default();
        assert!(
            message.starts_with("database.url: the server refused the login"),
            "{args:?}: {message}"
        );
        assert_eq!(out.status.code(), Some(1));
    }
    env.cleanup().await;
}

/// `migrate` on a database another build migrated further, or whose migration was edited,
/// says so as the other commands do (`bad_request`), not as a database fault.
#[tokio::test]
async fn migrate_names_a_database_that_is_not_this_builds() {
    let env = TestEnv::new().await;
    for (sql, expected) in [
        (
            "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time)
             VALUES (9999, 'from a newer build', true, '\\x00', 0)",
            "holds migration 9999, which this build does not know: a newer build migrated it",
        ),
        (
            "DELETE FROM _sqlx_migrations WHERE version = 9999;
             UPDATE _sqlx_migrations SET checksum = '\\x00' WHERE version = 1",
            "migration 1 is not this build's (its checksum differs)",
        ),
    ] {
        sqlx::raw_sql(sql).execute(&env.pool).await.expect(sql);
        let out = env.cli(&["migrate", "--json"]);
        let printed: serde_json::Value =
            serde_json::from_slice(&out.stdout).expect("an error object");
        assert_eq!(printed["error"]["code"], "bad_request", "{printed}");
        let message = printed["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(expected), "{message}");
    }
    env.cleanup().await;
}

/// A password or a virtual host the broker refuses stops the start naming the key, and the
/// password is not in what it says.
#[tokio::test]
async fn a_login_or_vhost_the_broker_refuses_stops_the_start() {
    let env = TestEnv::new().await;
    let url = url::Url::parse(&env.settings.amqp.url).expect("amqp url");
    let mut wrong_password = url.clone();
    wrong_password
        .set_password(Some("credit-not-the-password"))
        .expect("a password");
    let mut no_such_vhost = url.clone();
    no_such_vhost.set_path("/credit-no-such-vhost");
    for (bad, refused) in [
        (wrong_password, "ACCESS_REFUSED"),
        (no_such_vhost, "vhost credit-no-such-vhost not found"),
    ] {
        let mut settings = env.settings.clone();
        settings.amqp.url = bad.to_string();
        let why = format!("with {refused}");
        let err = tokio::time::timeout(T, start_refused(settings, &why))
            .await
            .expect("refused at once, not retried");
        assert!(
            err.starts_with("amqp.url: the broker refused the login"),
            "{err}"
        );
        assert!(err.contains(refused), "{err}");
        assert!(!err.contains("credit-not-the-password"), "{err}");
        // The commands that use the broker say the same, as an operator's mistake.
        let out = env
            .cli_command(&["dead-letters", "list", "--json"])
            .env("AMQP_URL", bad.as_str())
            .output()
            .expect("run the CLI");
        let printed: serde_json::Value =
            serde_json::from_slice(&out.stdout).expect("an error object");
        assert_eq!(printed["error"]["code"], "bad_request", "{printed}");
        let message = printed["error"]["message"].as_str().unwrap_or_default();
        assert!(
            message.starts_with("amqp.url: the broker refused the login"),
            "{message}"
        );
        assert!(!message.contains("credit-not-the-password"), "{message}");
    }
    env.cleanup().await;
}

/// A batch that waits on a row lock held elsewhere (with no statement timeout, nothing retries
/// it) makes `/readyz` say `consumer: stalled` once it has waited `http.stall_s`, and shows in
/// `credit_oldest_batch_seconds`; once the lock goes, it is decided once and the worker is
/// ready again.
#[tokio::test]
async fn a_batch_held_by_a_lock_elsewhere_shows_as_a_stall() {
    let env = TestEnv::with(|s| {
        quiet_scheduler(s);
        s.http.listen = any_port();
        s.http.stall_s = 1;
        s.database.statement_timeout_ms = 0;
    })
    .await;
    let worker = Worker::start(env.settings.clone()).await.expect("worker");
    let port = worker.http_addr().expect("http address").port();
    wait_status(T, port, "/readyz", 200).await;
    env.publish(&[body(&platform_gpt4("held-user", "first"))])
        .await;
    env.wait_decisions(1, T).await;

    let holder = env.hold_account("held-user").await;
    env.publish(&[body(&platform_gpt4("held-user", "second"))])
        .await;
    env.wait_for_one_lock_waiter(T, "the batch waiting for the account")
        .await;
    let stalled = "consumer: stalled (the oldest batch has waited ";
    wait_for(T, "/readyz to say stalled", || async {
        http_get(port, "/readyz")
            .await
            .is_some_and(|(status, b)| status == 503 && b.contains(stalled))
    })
    .await;
    let (_, metrics) = http_get(port, "/metrics").await.expect("metrics");
    let age = metric_value(&metrics, "credit_oldest_batch_seconds", &[]);
    assert!(age >= 1.0, "credit_oldest_batch_seconds {age}");
    assert_eq!(
        env.outcome_of("second").await,
        None,
        "decided under the lock"
    );

    holder.rollback().await.expect("release");
    wait_status(T, port, "/readyz", 200).await;
    env.wait_decisions(2, T).await;
    assert_eq!(env.outcome_of("second").await.as_deref(), Some("charged"));
    let (_, metrics) = http_get(port, "/metrics").await.expect("metrics");
    assert_eq!(
        metric_value(&metrics, "credit_oldest_batch_seconds", &[]),
        0.0
    );
    let balance = env.ledger().balance("held-user", Utc::now()).await;
    assert_eq!(balance.expect("balance"), 980);
    worker.stop().await.expect("stop");
    env.assert_audit_clean().await;
    env.cleanup().await;
}

/// The worker under `ulimit LIMIT` (set by bash, which then becomes the worker), with this
/// test's environment.
fn under_ulimit(env: &TestEnv, limit: &str) -> std::process::Command {
    let mut cmd = std::process::Command::new("bash");
    cmd.arg("-c")
        .arg(format!("ulimit {limit} && exec \"$0\" run"))
        .arg(binary())
        .env_remove("CREDIT_WORKER_CONFIG")
        .envs(env.process_env())
        .env("CREDIT_WORKER__REFILL__ENABLED", "false")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null());
    cmd
}

/// A soft limit of open files as low as a shell's gives way to the hard one, and the worker
/// bills as usual (at 16 its broker connections failed one after another and it stalled); a
/// hard limit too low for the pool and the rest is refused at start, naming both numbers.
#[tokio::test]
async fn a_low_open_files_limit_is_raised_or_refused_at_start() {
    let env = TestEnv::with(no_refill).await;
    seed(&env, ["nf"], 1_000).await;
    let out = under_ulimit(&env, "-n 40").output().expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let said = "open files: the limit is 40 (its hard limit included), and the worker needs at \
                least 72 (database.max_connections 8 + 64)";
    assert!(stderr.contains(said), "{stderr}");

    let child = under_ulimit(&env, "-Sn 16").spawn().expect("spawn");
    let mut worker = WorkerProcess { child };
    env.publish(&[body(&platform_gpt4("nf", "nf-1"))]).await;
    env.wait_decisions(1, T).await;
    assert_eq!(env.outcome_of("nf-1").await.as_deref(), Some("charged"));
    worker.sigterm();
    assert_eq!(worker.wait_exit(T).await, Some(0));
    env.cleanup().await;
}

/// Reads `stream` until the worker closes it, within `within`: how long it took, or None when
/// it was still open.
async fn closed_within(stream: &mut tokio::net::TcpStream, within: Duration) -> Option<Duration> {
    use tokio::io::AsyncReadExt;
    let since = std::time::Instant::now();
    let mut rest = Vec::new();
    match tokio::time::timeout(within, stream.read_to_end(&mut rest)).await {
        Ok(_) => Some(since.elapsed()),
        Err(_) => None,
    }
}

/// Clients that connect and say nothing can neither keep a probe out nor hold the worker's
/// files: a connection beyond the 32 open closes the oldest at once, and one that has not sent
/// a request's head within 5 s is closed. Before, every connection was kept for as long as
/// its client wished (under `ulimit -n 64`, 80 silent ones kept `/readyz` out for 35 s).
#[tokio::test]
async fn silent_http_clients_cannot_keep_a_probe_out() {
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpStream;
    let env = TestEnv::with(|s| {
        no_refill(s);
        s.http.listen = any_port();
    })
    .await;
    let worker = Worker::start(env.settings.clone()).await.unwrap();
    let port = worker.http_addr().expect("http address").port();
    wait_status(T, port, "/readyz", 200).await;
    let mut silent = Vec::new();
    for _ in 0..40 {
        silent.push(
            TcpStream::connect(("127.0.0.1", port))
                .await
                .expect("connect"),
        );
    }
    let mut half = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    half.write_all(b"GET /readyz HTTP/1.1\r\nHo")
        .await
        .expect("half a head");
    let half_sent = std::time::Instant::now();

    let asked = std::time::Instant::now();
    let (status, body) = http_get(port, "/readyz").await.expect("readyz");
    assert_eq!(status, 200, "{body}");
    assert!(
        asked.elapsed() < Duration::from_secs(1),
        "{:?}",
        asked.elapsed()
    );
    // 42 connections in all, these two included: the 10 oldest made room.
    let first = closed_within(&mut silent[0], Duration::from_secs(1)).await;
    assert!(
        first.is_some(),
        "the oldest silent connection is still open"
    );
    let head = closed_within(&mut half, Duration::from_secs(10)).await;
    let waited = half_sent.elapsed();
    assert!(
        head.is_some(),
        "half a head kept its connection for {waited:?}"
    );
    assert!(
        waited >= Duration::from_millis(4_500),
        "closed after {waited:?}"
    );
    let last = silent.last_mut().expect("40");
    assert!(closed_within(last, Duration::from_secs(2)).await.is_some());
    worker.stop().await.unwrap();
    env.cleanup().await;
}

/// Makes this test's database answer `clock_timestamp()` `ahead_s` seconds ahead of the
/// server's own, for the sessions that start from now on: a function of that name first on
/// their search path before `pg_catalog` (the worker's statements name their tables' schema).
async fn database_clock_ahead(env: &TestEnv, ahead_s: i64) {
    let function = format!(
        "CREATE OR REPLACE FUNCTION skew.clock_timestamp() RETURNS timestamptz
           LANGUAGE sql VOLATILE AS
           $$ SELECT pg_catalog.clock_timestamp() + interval '{ahead_s} seconds' $$"
    );
    for statement in ["CREATE SCHEMA IF NOT EXISTS skew", function.as_str()] {
        sqlx::query(statement)
            .execute(&env.pool)
            .await
            .expect(statement);
    }
    let admin = env.admin_pool().await;
    env.alter_database(&admin, "SET search_path = public, skew, pg_catalog")
        .await;
    admin.close().await;
}

/// The worker's log lines a test waits for: warnings, and the consumer's and the HTTP
/// server's start.
const LOGGED: &str = "warn,credit_worker::consumer=info,credit_worker::telemetry=info";

/// A running worker whose clock comes to be a minute or more from the database server's stops
/// (exit 1), as its start is then refused: it takes refill months and fee days from its own
/// clock, and a host stepped a month ahead would mark the users it bills as refilled for a
/// month to come. Before, a running worker only warned, and only when scraped.
#[tokio::test]
async fn a_worker_whose_clock_comes_to_disagree_with_the_databases_stops() {
    let env = TestEnv::with(no_refill).await;
    seed(&env, ["ck"], 1_000).await;
    database_clock_ahead(&env, 0).await;
    let mut vars = env.process_env();
    vars.push(("CREDIT_WORKER__REFILL__ENABLED".into(), "false".into()));
    let (mut worker, _http, log) = WorkerProcess::spawn_logged(&vars, &["run"], LOGGED);
    wait_for_line(&log, "consuming", T, "the worker");
    env.publish(&[body(&platform_gpt4("ck", "ck-1"))]).await;
    env.wait_decisions(1, T).await;
    assert_eq!(env.outcome_of("ck-1").await.as_deref(), Some("charged"));

    database_clock_ahead(&env, 120).await;
    let said = "s behind the database server's; refill months and execution-fee days are \
                taken from it (set it right, e.g. with NTP); refused past 60 s; stopping";
    wait_for_line(&log, said, T, "the clock's watch");
    assert_eq!(worker.wait_exit(T).await, Some(1));
    let err = start_refused(env.settings.clone(), "with the clocks apart").await;
    assert!(err.contains("refused past 60 s"), "{err}");
    database_clock_ahead(&env, 0).await;
    env.assert_audit_clean().await;
    env.cleanup().await;
}

/// A migration that cannot have its table lock at once (a long read holds the table: a
/// `pg_dump`, an `audit`) gives up within a quarter of a second and is tried again later, so
/// the ledger's writers, queued behind its lock request, wait that long at most. It waited
/// 10 s before: 36 of 41 charges billed during such a read were held a second or more.
#[tokio::test]
async fn a_migration_behind_a_long_read_holds_the_ledgers_writers_briefly() {
    let env = TestEnv::with(no_refill).await;
    // Migration 23 again: its first statement alters the ledger's table.
    sqlx::query("DELETE FROM _sqlx_migrations WHERE version = 23")
        .execute(&env.pool)
        .await
        .expect("forget migration 23");
    let mut reader = env.pool.begin().await.expect("a reader");
    sqlx::query("LOCK TABLE credit.transactions IN ACCESS SHARE MODE")
        .execute(&mut *reader)
        .await
        .expect("a long read");
    let asked = std::time::Instant::now();
    let out = env.cli(&["migrate"]);
    let took = asked.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("lock timeout"), "{stderr}");
    assert!(took < Duration::from_secs(3), "migrate took {took:?}");
    reader.rollback().await.expect("the read ends");
    let out = env.cli(&["migrate"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    env.cleanup().await;
}
