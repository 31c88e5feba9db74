//! Faults: a crash loop of SIGKILLs, broker connections cut by a proxy, database sessions
//! terminated, and two replicas on one queue. Afterwards every node execution is decided
//! exactly once, the ledger reconciles and every ledger row's event was published.
//!
//! `CREDIT_WORKER_FAULT_KILLS` / `CREDIT_WORKER_FAULT_MESSAGES` scale the crash loop up.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use credit_worker::ledger::TxType;
use credit_worker::service::Worker;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::broadcast;

use crate::fixtures::*;
use crate::helpers::*;

const T: Duration = Duration::from_secs(60);

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The `users` users of a test: `u0`, `u1`, …
fn user_names(users: usize) -> impl Iterator<Item = String> {
    (0..users).map(|u| format!("u{u}"))
}

fn workload(users: usize, n: usize, prefix: &str) -> Vec<Vec<u8>> {
    (0..n)
        .map(|i| {
            body(&platform_gpt4(
                &format!("u{}", i % users),
                &format!("{prefix}-{i}"),
            ))
        })
        .collect()
}

/// Charged credits equal the balances' drop, including execution fees (every 100th
/// execution of a user today costs 1).
async fn assert_books_balance(env: &TestEnv, users: usize, balance: i64, per_user: &[i64]) {
    let fees: i64 = per_user.iter().map(|n| n / 100).sum();
    let charged: i64 = per_user.iter().sum::<i64>() * 10 + fees;
    let total = env
        .scalar_i64("SELECT sum(balance)::int8 FROM credit.balances")
        .await;
    assert_eq!(total, users as i64 * balance - charged);
    env.assert_audit_clean().await;
}

fn fees(per_user: &[i64]) -> usize {
    per_user.iter().map(|n| (n / 100) as usize).sum()
}

fn per_user_counts(users: usize, n: usize) -> Vec<i64> {
    (0..users)
        .map(|u| ((n + users - 1 - u) / users) as i64)
        .collect()
}

/// Every ledger row's balance.changed event reached the events exchange at least once, and
/// exactly once after deduplication by event_id.
async fn assert_events_complete(env: &TestEnv, tap: &mut EventTap, expected: usize) {
    let mut seen = std::collections::HashSet::new();
    while seen.len() < expected {
        for (_, mid, _) in tap.take(1, T).await {
            seen.insert(mid);
        }
    }
    let rows = env
        .scalar_i64("SELECT count(*) FROM credit.transactions")
        .await as usize;
    assert_eq!(seen.len(), rows);
}

#[tokio::test]
async fn crash_loop_of_sigkills_loses_and_doubles_nothing() {
    let kills = env_usize("CREDIT_WORKER_FAULT_KILLS", 20);
    let n = env_usize("CREDIT_WORKER_FAULT_MESSAGES", 20_000);
    let users = 100;
    let env = TestEnv::with(|s| s.refill.enabled = false).await;
    seed(&env, user_names(users), 1_000_000).await;
    let mut tap = env.event_tap().await;
    let mut vars = env.process_env();
    vars.push(("CREDIT_WORKER__REFILL__ENABLED".into(), "false".into()));
    env.publish(&workload(users, n, "crash")).await;

    // Kill at moments spread over the run: each once its worker decided something, and a
    // few more decisions than the last kill. The count's batches land in different phases of
    // the worker's next batch.
    let decided = "SELECT count(*) FROM credit.decisions";
    let mut at_kills = Vec::new();
    for k in 0..kills {
        let mut w = WorkerProcess::spawn(&vars, &["run"]);
        let before = env.scalar_i64(decided).await;
        let target = (((k + 1) * n / (kills + 2)) as i64).max(before + 1);
        at_kills.push(env.kill_when(&mut w, decided, target, T).await);
    }
    // Every kill hit a worker with work left (not an idle one, which would test nothing).
    assert!(
        at_kills.iter().all(|&d| d < n as i64),
        "a worker drained the queue before its kill: {at_kills:?} of {n}"
    );
    let mut w = WorkerProcess::spawn(&vars, &["run"]);
    env.wait_decisions(n as i64, T).await;
    assert_events_complete(&env, &mut tap, users + n + fees(&per_user_counts(users, n))).await;
    w.sigterm();
    assert_eq!(w.wait_exit(T).await, Some(0));

    assert_eq!(
        env.scalar_i64("SELECT count(*) FROM credit.decisions")
            .await,
        n as i64
    );
    assert_eq!(
        env.scalar_i64(
            "SELECT count(*) FROM credit.transactions WHERE transaction_key LIKE 'USAGE-%'"
        )
        .await,
        n as i64
    );
    assert_books_balance(&env, users, 1_000_000, &per_user_counts(users, n)).await;
    eprintln!("crash loop: {n} messages, {kills} SIGKILLs survived, 0 lost, 0 doubled");
    env.cleanup().await;
}

/// What a [`Proxy`] does with a connection while it refuses them.
type Refusal = fn(TcpStream) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// A TCP proxy in front of the broker or the database that can cut every open connection and
/// refuse new ones.
struct Proxy {
    port: u16,
    cut: broadcast::Sender<()>,
    refuse: Arc<AtomicBool>,
    connections: Arc<AtomicU64>,
}

impl Proxy {
    /// A proxy whose refusal closes the connection at once.
    async fn start(upstream: String) -> Proxy {
        Self::refusing_with(upstream, |mut inbound| {
            Box::pin(async move {
                let _ = inbound.shutdown().await;
            })
        })
        .await
    }

    /// A proxy that, while it refuses, hands each new connection to `refusal`.
    async fn refusing_with(upstream: String, refusal: Refusal) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (cut, _) = broadcast::channel(4);
        let refuse = Arc::new(AtomicBool::new(false));
        let connections = Arc::new(AtomicU64::new(0));
        let (cut2, refuse2, conns2) = (cut.clone(), refuse.clone(), connections.clone());
        tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    return;
                };
                if refuse2.load(Ordering::SeqCst) {
                    tokio::spawn(refusal(inbound));
                    continue;
                }
                conns2.fetch_add(1, Ordering::SeqCst);
                let mut cut_rx = cut2.subscribe();
                let upstream = upstream.clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(&upstream).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = cut_rx.recv() => {}
                    }
                });
            }
        });
        Proxy {
            port,
            cut,
            refuse,
            connections,
        }
    }

    fn cut_all(&self) {
        let _ = self.cut.send(());
    }
}

fn broker_host_port(amqp_url: &str) -> String {
    let after_at = amqp_url.rsplit('@').next().unwrap_or(amqp_url);
    let host = after_at.trim_start_matches("amqp://");
    host.split('/')
        .next()
        .unwrap_or("127.0.0.1:5672")
        .to_owned()
}

/// Ten users with 1,000,000 credits each, no refill, batches of 50, and a tap on the events.
async fn ten_funded_users() -> (TestEnv, usize, EventTap) {
    let env = TestEnv::with(|s| {
        s.refill.enabled = false;
        s.pipeline.max_batch = 50;
    })
    .await;
    let users = 10;
    seed(&env, user_names(users), 1_000_000).await;
    let tap = env.event_tap().await;
    (env, users, tap)
}

/// A stop while the broker is out, with nothing to publish, ends without waiting out the
/// relay's drain bound (10 s) and without warning of events left behind: the relay finds the
/// outbox published through instead of waiting to reach the broker.
#[tokio::test]
async fn a_stop_with_the_broker_out_and_nothing_to_publish_is_prompt() {
    let env = TestEnv::with(no_refill).await;
    let proxy = Proxy::start(broker_host_port(&env.settings.amqp.url)).await;
    proxy.refuse.store(true, Ordering::SeqCst);
    let mut vars = env.process_env();
    vars.retain(|(k, _)| k != "AMQP_URL");
    vars.push((
        "AMQP_URL".into(),
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", proxy.port),
    ));
    vars.push(("CREDIT_WORKER__REFILL__ENABLED".into(), "false".into()));
    let (mut worker, _, log) = WorkerProcess::spawn_logged(&vars, &["run"], "info");
    // The relay is waiting to reach the broker again.
    wait_for_line(
        &log,
        r#""session":"outbox relay""#,
        T,
        "the relay's failed connect",
    );
    worker.sigterm();
    assert_eq!(worker.wait_exit(Duration::from_secs(5)).await, Some(0));
    let lines: Vec<String> = log.try_iter().collect();
    assert!(
        !lines
            .iter()
            .any(|l| l.contains("outbox flush not confirmed")),
        "{lines:#?}"
    );
    env.cleanup().await;
}

/// A worker reaching the broker through a [`Proxy`], with its HTTP endpoints on a free port.
async fn worker_behind_proxy(env: &TestEnv) -> (Proxy, Worker, u16) {
    let proxy = Proxy::start(broker_host_port(&env.settings.amqp.url)).await;
    let mut settings = env.settings.clone();
    settings.amqp.url = format!("amqp://guest:guest@127.0.0.1:{}/%2f", proxy.port);
    settings.http.listen = any_port();
    let worker = Worker::start(settings).await.unwrap();
    let port = worker.http_addr().expect("http address").port();
    (proxy, worker, port)
}

#[tokio::test]
async fn broker_connections_cut_mid_stream_recover_without_loss() {
    let (env, users, mut tap) = ten_funded_users().await;
    let (proxy, worker, port) = worker_behind_proxy(&env).await;
    let n = 3000;
    env.publish(&workload(users, n, "cut")).await;
    for target in [500i64, 1500, 2500] {
        env.wait_decisions(target, T).await;
        proxy.cut_all();
        // While the broker is unreachable the worker says so.
        proxy.refuse.store(true, Ordering::SeqCst);
        wait_status(T, port, "/readyz", 503).await;
        proxy.refuse.store(false, Ordering::SeqCst);
        wait_status(T, port, "/readyz", 200).await;
    }
    env.wait_decisions(n as i64, T).await;
    assert_events_complete(&env, &mut tap, users + n + fees(&per_user_counts(users, n))).await;
    worker.stop().await.unwrap();
    assert!(proxy.connections.load(Ordering::SeqCst) >= 6, "reconnected");
    assert_eq!(
        env.scalar_i64("SELECT count(*) FROM credit.decisions")
            .await,
        n as i64
    );
    assert_books_balance(&env, users, 1_000_000, &per_user_counts(users, n)).await;
    env.cleanup().await;
}

/// `/readyz` reads the relay's broker connection when asked: one that dies while the relay
/// has nothing to publish (so its session has not noticed) shows at once, and clears once
/// the relay is connected again.
#[tokio::test]
async fn an_idle_relays_lost_connection_shows_in_readyz() {
    let env = TestEnv::with(no_refill).await;
    let (proxy, worker, port) = worker_behind_proxy(&env).await;
    let body = || async move { http_get(port, "/readyz").await.map(|(_, b)| b) };
    let connected = "database: up\nconsumer: consuming\n";
    wait_for(T, "ready", || async {
        body().await.as_deref() == Some(connected)
    })
    .await;
    proxy.refuse.store(true, Ordering::SeqCst);
    proxy.cut_all();
    let says =
        |line: &'static str| move || async move { body().await.is_some_and(|b| b.contains(line)) };
    wait_for(
        T,
        "the relay reconnecting",
        says("outbox relay: reconnecting\n"),
    )
    .await;
    proxy.refuse.store(false, Ordering::SeqCst);
    wait_for(T, "connected again", || async {
        body().await.as_deref() == Some(connected)
    })
    .await;
    worker.stop().await.unwrap();
    env.cleanup().await;
}

#[tokio::test]
async fn database_sessions_terminated_mid_stream_recover_without_loss() {
    // Its worker retries decisions while the database is away.
    let _retries = DECIDE_RETRIES.share().await;
    let (env, users, mut tap) = ten_funded_users().await;
    let mut settings = env.settings.clone();
    settings.http.listen = any_port();
    let worker = Worker::start(settings).await.unwrap();
    let port = worker.http_addr().expect("http address").port();
    let n = 3000;
    env.publish(&workload(users, n, "pgkill")).await;
    let admin = sqlx::PgPool::connect(&env.settings.database.url)
        .await
        .unwrap();
    for target in [500i64, 1500, 2500] {
        env.wait_decisions(target, T).await;
        let killed: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity
              WHERE datname = current_database() AND application_name = 'credit-worker'
                AND pid <> pg_backend_pid()) x",
        )
        .fetch_one(&admin)
        .await
        .unwrap();
        assert!(killed >= 1);
    }
    // An outage long enough to see: refuse new connections to the database for a while.
    let db = env.db_name.clone();
    let server_admin = sqlx::PgPool::connect(&env.settings.database.url.replace(&db, "postgres"))
        .await
        .unwrap();
    env.alter_database(&server_admin, "ALLOW_CONNECTIONS false")
        .await;
    env.end_worker_sessions(&server_admin).await;
    wait_status(T, port, "/readyz", 503).await;
    sqlx::query(&format!("ALTER DATABASE \"{db}\" ALLOW_CONNECTIONS true"))
        .execute(&server_admin)
        .await
        .unwrap();
    wait_status(T, port, "/readyz", 200).await;
    env.wait_decisions(n as i64, T).await;
    assert_events_complete(&env, &mut tap, users + n + fees(&per_user_counts(users, n))).await;
    worker.stop().await.unwrap();
    admin.close().await;
    server_admin.close().await;
    assert_books_balance(&env, users, 1_000_000, &per_user_counts(users, n)).await;
    env.cleanup().await;
}

#[tokio::test]
async fn two_replicas_share_the_queue_without_duplicate_decisions() {
    let env = TestEnv::with(|s| s.refill.lazy = false).await;
    let users = 50;
    seed(&env, user_names(users), 1_000_000).await;
    let mut tap = env.event_tap().await;
    let mut vars = env.process_env();
    vars.push(("CREDIT_WORKER__REFILL__LAZY".into(), "false".into()));
    vars.push(("CREDIT_WORKER__PIPELINE__MAX_BATCH".into(), "20".into()));
    vars.push(("CREDIT_WORKER__AMQP__PREFETCH".into(), "40".into()));
    // Both replicas run the catch-up sweep of this month at start: one refill per user.
    let (mut w1, p1) = WorkerProcess::spawn_with_http(&vars, &["run"]);
    let (mut w2, p2) = WorkerProcess::spawn_with_http(&vars, &["run"]);
    for p in [p1, p2] {
        wait_status(T, p, "/readyz", 200).await;
    }
    let n = 4000;
    // Duplicates published on purpose: every 10th message twice.
    let mut bodies = workload(users, n, "rep");
    let dups: Vec<Vec<u8>> = bodies.iter().step_by(10).cloned().collect();
    bodies.extend(dups);
    env.publish(&bodies).await;
    env.wait_decisions(n as i64, T).await;
    assert_events_complete(&env, &mut tap, users + n + fees(&per_user_counts(users, n))).await;
    let (m1, m2) = (charged_by(p1).await, charged_by(p2).await);
    w1.sigterm();
    w2.sigterm();
    assert_eq!(w1.wait_exit(T).await, Some(0));
    assert_eq!(w2.wait_exit(T).await, Some(0));
    assert!(
        m1 > 0.0 && m2 > 0.0,
        "both replicas made progress: {m1} / {m2}"
    );
    assert_eq!(m1 + m2, n as f64);
    assert_eq!(
        env.scalar_i64("SELECT count(*) FROM credit.decisions")
            .await,
        n as i64
    );
    // Seeded users are above target: the sweeps of both replicas granted nothing twice.
    assert_eq!(
        env.scalar_i64("SELECT count(*) FROM credit.transactions WHERE type = 'GRANT' AND transaction_key LIKE 'MONTHLY%'")
            .await,
        0
    );
    assert_eq!(
        env.scalar_i64("SELECT count(*) FROM credit.balances WHERE refill_month IS NULL")
            .await,
        0
    );
    assert_books_balance(&env, users, 1_000_000, &per_user_counts(users, n)).await;
    env.cleanup().await;
}

async fn charged_by(port: u16) -> f64 {
    let (_, body) = http_get(port, "/metrics").await.unwrap_or_default();
    metric_value(&body, "credit_messages_total", &[("outcome", "charged")])
}

/// A TCP proxy in front of the broker that, once stalled, swallows what the connections it was
/// told of (by the names the worker gives them) send and answers nothing: a broker that
/// stopped answering them (or blocks their publishes for a resource alarm). Other connections
/// pass.
struct StallingProxy {
    port: u16,
    stalled: Arc<AtomicBool>,
    /// Bytes of the stalled connections swallowed while stalled.
    swallowed: Arc<AtomicU64>,
}

impl StallingProxy {
    async fn start(upstream: String, stall: &'static [&'static str]) -> StallingProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let stalled = Arc::new(AtomicBool::new(false));
        let swallowed = Arc::new(AtomicU64::new(0));
        let (st, sw) = (stalled.clone(), swallowed.clone());
        tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let Ok(outbound) = TcpStream::connect(&upstream).await else {
                    return;
                };
                let relay = Arc::new(AtomicBool::new(false));
                let (in_r, in_w) = inbound.into_split();
                let (out_r, out_w) = outbound.into_split();
                let up = Pump::new(&st, &sw, &relay, Some(stall));
                let down = Pump::new(&st, &sw, &relay, None);
                tokio::spawn(up.run(in_r, out_w));
                tokio::spawn(down.run(out_r, in_w));
            }
        });
        StallingProxy {
            port,
            stalled,
            swallowed,
        }
    }
}

/// One direction of a proxied connection.
struct Pump {
    stalled: Arc<AtomicBool>,
    swallowed: Arc<AtomicU64>,
    /// Whether this connection is one to stall.
    relay: Arc<AtomicBool>,
    /// The names of the connections to stall, on the client's side.
    from_client: Option<&'static [&'static str]>,
}

impl Pump {
    fn new(
        stalled: &Arc<AtomicBool>,
        swallowed: &Arc<AtomicU64>,
        relay: &Arc<AtomicBool>,
        from_client: Option<&'static [&'static str]>,
    ) -> Pump {
        Pump {
            stalled: stalled.clone(),
            swallowed: swallowed.clone(),
            relay: relay.clone(),
            from_client,
        }
    }

    async fn run(
        self,
        mut from: tokio::net::tcp::OwnedReadHalf,
        mut to: tokio::net::tcp::OwnedWriteHalf,
    ) {
        use tokio::io::AsyncReadExt;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match from.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            // The connection's name, in the client's handshake.
            let named = |name: &&str| buf[..n].windows(name.len()).any(|w| w == name.as_bytes());
            if self
                .from_client
                .is_some_and(|names| names.iter().any(named))
            {
                self.relay.store(true, Ordering::SeqCst);
            }
            if self.relay.load(Ordering::SeqCst) && self.stalled.load(Ordering::SeqCst) {
                if self.from_client.is_some() {
                    self.swallowed.fetch_add(n as u64, Ordering::SeqCst);
                }
                continue;
            }
            if to.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    }
}

#[tokio::test]
async fn a_broker_that_stops_answering_the_relay_holds_shutdown_only_for_the_drain_timeout() {
    let env = TestEnv::with(|s| s.refill.enabled = false).await;
    let upstream = broker_host_port(&env.settings.amqp.url);
    let proxy = StallingProxy::start(upstream, &["credit-worker outbox"]).await;
    let mut settings = env.settings.clone();
    settings.amqp.url = format!("amqp://guest:guest@127.0.0.1:{}/%2f", proxy.port);
    let worker = Worker::start(settings).await.unwrap();
    let mut tap = env.event_tap().await;
    let ledger = env.ledger();
    let top_up = |key: &'static str| {
        let ledger = ledger.clone();
        async move {
            ledger
                .credit(
                    TxType::TopUp,
                    "alice",
                    5,
                    Some(key),
                    None,
                    chrono::Utc::now(),
                )
                .await
                .unwrap()
        }
    };
    top_up("before").await;
    assert_eq!(tap.take(1, T).await.len(), 1, "the relay publishes");
    // The tap can hold the event before the relay has its confirm; stalling then would leave
    // `before` behind the watermark too, and the next worker would publish it again first.
    env.wait_published(T).await;
    proxy.stalled.store(true, Ordering::SeqCst);
    top_up("stalled").await;
    let swallowed = || async { proxy.swallowed.load(Ordering::SeqCst) > 0 };
    wait_for(T, "the relay's publish into the stall", swallowed).await;
    // Its confirm never comes (the publish would wait 30 s for it); the drain gives 10 s.
    let started = std::time::Instant::now();
    worker.stop().await.unwrap();
    let took = started.elapsed();
    assert!(took < Duration::from_secs(20), "stop took {took:?}");
    // The event stayed behind the watermark: the next worker publishes it.
    let worker = Worker::start(env.settings.clone()).await.unwrap();
    let events = tap.take(1, T).await;
    assert_eq!(events[0].1, "balance.changed:alice:stalled");
    worker.stop().await.unwrap();
    env.cleanup().await;
}

/// A broker that stops answering the consumer's and control's connections holds a stop only
/// for their cleanup's bound (10 s for the consumer's steps together, 5 s for control's
/// close), not until a heartbeat times out: both end within the 12 s the writers have, and
/// the stop is clean.
#[tokio::test]
async fn a_broker_that_stops_answering_the_consumer_and_control_holds_shutdown_only_briefly() {
    let env = TestEnv::with(no_refill).await;
    seed(&env, ["st"], 1_000).await;
    let upstream = broker_host_port(&env.settings.amqp.url);
    let stall = &["credit-worker consumer", "credit-worker control"];
    let proxy = StallingProxy::start(upstream, stall).await;
    let mut settings = env.settings.clone();
    settings.amqp.url = format!("amqp://guest:guest@127.0.0.1:{}/%2f", proxy.port);
    let worker = Worker::start(settings).await.unwrap();
    env.publish(&[body(&platform_gpt4("st", "st-0"))]).await;
    env.wait_decisions(1, T).await;
    proxy.stalled.store(true, Ordering::SeqCst);
    let started = std::time::Instant::now();
    worker.stop().await.expect("a clean stop");
    let took = started.elapsed();
    assert!(took < Duration::from_secs(20), "stop took {took:?}");
    env.assert_audit_clean().await;
    env.cleanup().await;
}

/// A stop while the consumer and control are still connecting to a broker that accepted TCP
/// but never answers (a connect gives up only after 15 s) ends their sessions at once: the
/// stop is clean, well within the 12 s the writers have.
#[tokio::test]
async fn a_stop_while_connecting_to_a_broker_that_never_answers_is_clean() {
    let env = TestEnv::with(no_refill).await;
    let upstream = broker_host_port(&env.settings.amqp.url);
    let stall = &["credit-worker consumer", "credit-worker control"];
    let proxy = StallingProxy::start(upstream, stall).await;
    proxy.stalled.store(true, Ordering::SeqCst);
    let mut settings = env.settings.clone();
    settings.amqp.url = format!("amqp://guest:guest@127.0.0.1:{}/%2f", proxy.port);
    let worker = Worker::start(settings).await.unwrap();
    let swallowed = || async { proxy.swallowed.load(Ordering::SeqCst) > 0 };
    wait_for(T, "a handshake into the stall", swallowed).await;
    let started = std::time::Instant::now();
    worker.stop().await.expect("a clean stop");
    let took = started.elapsed();
    assert!(took < Duration::from_secs(5), "stop took {took:?}");
    env.cleanup().await;
}

/// A stop while the database is away is clean: exit 0, the batches held go back to the queue
/// unacked, and no broker reconnect is logged for what is no fault of the broker's. The next
/// worker decides them, once.
#[tokio::test]
async fn a_stop_during_a_database_outage_is_clean() {
    let env = TestEnv::with(no_refill).await;
    seed(&env, ["out"], 1_000).await;
    let mut vars = env.process_env();
    vars.push(("CREDIT_WORKER__PIPELINE__MAX_BATCH".into(), "2".into()));
    let (mut w, _, log) = WorkerProcess::spawn_logged(&vars, &["run"], "info");
    env.publish(&[body(&platform_gpt4("out", "o-0"))]).await;
    env.wait_decisions(1, T).await;

    // The outage: no new sessions, and the worker's cut.
    let admin = sqlx::PgPool::connect(&format!("{}/postgres", services().await.pg_base))
        .await
        .expect("admin connection");
    let allow = |on: bool| format!("ALTER DATABASE \"{}\" ALLOW_CONNECTIONS {on}", env.db_name);
    sqlx::query(&allow(false))
        .execute(&admin)
        .await
        .expect("outage");
    sqlx::query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1")
        .bind(&env.db_name)
        .execute(&admin)
        .await
        .expect("cut the sessions");
    let more: Vec<Vec<u8>> = (1..=10)
        .map(|i| body(&platform_gpt4("out", &format!("o-{i}"))))
        .collect();
    env.publish(&more).await;
    let retrying = "decision transaction failed; retrying";
    wait_for_line(&log, retrying, T, "the decider meeting the outage");
    w.sigterm();
    let exit = w.wait_exit(T).await;
    sqlx::query(&allow(true))
        .execute(&admin)
        .await
        .expect("end the outage");
    admin.close().await;
    assert_eq!(exit, Some(0));
    let reconnects: Vec<String> = log
        .try_iter()
        // The relay's session is the database's too: it reconnects, rightly.
        .filter(|l| {
            l.contains("session ended by a fault") && l.contains("\"session\":\"consumer\"")
        })
        .collect();
    assert!(reconnects.is_empty(), "{reconnects:?}");

    let mut w = WorkerProcess::spawn(&vars, &["run"]);
    env.wait_decisions(11, T).await;
    w.sigterm();
    assert_eq!(w.wait_exit(T).await, Some(0));
    assert_decided_and_charged(&env, 11).await;
    env.assert_audit_clean().await;
    env.cleanup().await;
}

/// A TCP proxy in front of PostgreSQL that, once told to freeze, passes nothing more on the
/// connections open then, in either direction, and closes none of them: a server gone silent
/// (its host lost after acknowledging a query, a NAT that dropped the flow). Connections made
/// after that pass.
pub(crate) struct FreezingProxy {
    pub(crate) port: u16,
    /// Connections numbered below this are frozen.
    frozen_below: Arc<AtomicU64>,
    next: Arc<AtomicU64>,
    /// Frozen connections stay open to the server too, whose session then waits in its
    /// transaction until `idle_in_transaction_session_timeout` ends it.
    server_kept: Arc<AtomicBool>,
}

impl FreezingProxy {
    /// In front of the database of `url`.
    pub(crate) async fn before_database(url: &str) -> FreezingProxy {
        let u = url::Url::parse(url).expect("database URL");
        let upstream = format!(
            "{}:{}",
            u.host_str().unwrap_or("127.0.0.1"),
            u.port().unwrap_or(5432)
        );
        FreezingProxy::start(upstream).await
    }

    async fn start(upstream: String) -> FreezingProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let frozen_below = Arc::new(AtomicU64::new(0));
        let next = Arc::new(AtomicU64::new(0));
        let server_kept = Arc::new(AtomicBool::new(false));
        let (frozen, numbers, kept) = (frozen_below.clone(), next.clone(), server_kept.clone());
        tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let Ok(outbound) = TcpStream::connect(&upstream).await else {
                    return;
                };
                let number = numbers.fetch_add(1, Ordering::SeqCst);
                let (in_r, in_w) = inbound.into_split();
                let (out_r, out_w) = outbound.into_split();
                let ends = !kept.load(Ordering::SeqCst);
                tokio::spawn(freezable(in_r, out_w, number, frozen.clone(), ends));
                tokio::spawn(freezable(out_r, in_w, number, frozen.clone(), false));
            }
        });
        FreezingProxy {
            port,
            frozen_below,
            next,
            server_kept,
        }
    }

    /// Frozen connections made from now on are left open to the server (see `server_kept`).
    pub(crate) fn keep_the_server_side(&self) {
        self.server_kept.store(true, Ordering::SeqCst);
    }

    /// Every connection open now stops passing data, for good.
    pub(crate) fn freeze(&self) {
        let open = self.next.load(Ordering::SeqCst);
        self.frozen_below.store(open, Ordering::SeqCst);
    }

    /// Every connection, open now or made later, stops passing data: a server gone silent
    /// for good, or a network that drops every packet to it.
    pub(crate) fn silence_all(&self) {
        self.frozen_below.store(u64::MAX, Ordering::SeqCst);
    }
}

/// Copies `from` to `to` until connection `number` is frozen, then swallows what comes, as
/// across a network that dropped the flow: the server's side is ended (`ends_server`, set on
/// the copy towards the server), as its keepalive would end it, or left waiting; the
/// client's hears nothing, not even that end.
async fn freezable(
    mut from: tokio::net::tcp::OwnedReadHalf,
    to: tokio::net::tcp::OwnedWriteHalf,
    number: u64,
    frozen_below: Arc<AtomicU64>,
    ends_server: bool,
) {
    use tokio::io::AsyncReadExt;
    let mut to = Some(to);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let frozen = || number < frozen_below.load(Ordering::SeqCst);
        let read = from.read(&mut buf);
        let n = tokio::select! {
            r = read => r,
            // Noticed without waiting for the client to send.
            _ = tokio::time::sleep(Duration::from_millis(50)), if ends_server && to.is_some() => {
                if frozen() {
                    to = None;
                }
                continue;
            }
        };
        let n = match n {
            Ok(0) | Err(_) if frozen() => {
                // The client's side stays open and silent.
                let _kept = to.take();
                std::future::pending::<()>().await;
                return;
            }
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if frozen() {
            if ends_server {
                to = None;
            }
            continue;
        }
        let Some(to) = to.as_mut() else { continue };
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// `url` with its host and port replaced by the local proxy on `port`.
pub(crate) fn through_proxy(url: &str, port: u16) -> String {
    let mut u = url::Url::parse(url).expect("database URL");
    u.set_host(Some("127.0.0.1")).expect("host");
    u.set_port(Some(port)).expect("port");
    u.to_string()
}

/// The database's server stops answering the worker's open connections mid-stream (they
/// neither answer nor close), one of them in a decision transaction: each batch and relay
/// round waiting on one is given up after the stall bound (two statement timeouts and a
/// second) and retried on a new connection, and the server ends the abandoned transaction
/// (idle past twice the bound) and its locks, instead of the consumer and the relay waiting
/// for ever.
#[tokio::test]
async fn a_database_that_goes_silent_costs_a_retry_not_the_stream() {
    let (env, users, mut tap) = ten_funded_users().await;
    let proxy = FreezingProxy::before_database(&env.settings.database.url).await;
    let mut settings = env.settings.clone();
    settings.database.url = through_proxy(&env.settings.database.url, proxy.port);
    settings.database.statement_timeout_ms = 500;
    let worker = Worker::start(settings).await.unwrap();
    env.publish(&workload(users, 200, "silent-a")).await;
    env.wait_decisions(200, T).await;
    // The server goes silent while a decision transaction is open: a batch waits for u0's
    // row, which the test holds on a connection of its own.
    let holder = env.hold_account("u0").await;
    env.publish(&workload(users, 200, "silent-b")).await;
    env.wait_for_one_lock_waiter(T, "a batch waiting for u0's row")
        .await;
    proxy.freeze();
    holder.commit().await.unwrap();
    env.wait_decisions(400, T).await;
    assert_events_complete(&env, &mut tap, users + 400).await;
    worker.stop().await.unwrap();
    assert_books_balance(&env, users, 1_000_000, &per_user_counts(users, 400)).await;
    env.cleanup().await;
}

/// While the database's server is silent, `/readyz` and `/metrics` still answer within a
/// second, Kubernetes' default probe timeout: `/readyz` 503 naming the database, instead of a
/// probe that times out with nothing said.
#[tokio::test]
async fn probes_answer_within_a_second_while_the_database_is_silent() {
    let env = TestEnv::with(|s| {
        quiet_scheduler(s);
        s.http.listen = any_port();
    })
    .await;
    let proxy = FreezingProxy::before_database(&env.settings.database.url).await;
    let mut settings = env.settings.clone();
    settings.database.url = through_proxy(&env.settings.database.url, proxy.port);
    settings.database.statement_timeout_ms = 500;
    let worker = Worker::start(settings).await.unwrap();
    let port = worker.http_addr().expect("http address").port();
    wait_status(T, port, "/readyz", 200).await;
    proxy.silence_all();
    for path in ["/readyz", "/metrics", "/readyz"] {
        let asked = std::time::Instant::now();
        let (status, body) = http_get(port, path).await.expect(path);
        let took = asked.elapsed();
        assert!(took < Duration::from_secs(1), "{path} took {took:?}");
        if path == "/readyz" {
            assert_eq!(status, 503, "{body}");
            assert!(body.contains("database: down"), "{body}");
        } else {
            assert_eq!(status, 200);
        }
    }
    worker.stop().await.unwrap();
    env.cleanup().await;
}

/// A SIGTERM while the start waits for another process's migration (its advisory lock held)
/// stops the worker at once, exit 0, instead of when that migration ends.
#[tokio::test]
async fn a_stop_while_another_process_migrates_is_clean() {
    let env = TestEnv::with(no_refill).await;
    use sqlx::Connection as _;
    let mut holder = sqlx::PgConnection::connect(&env.settings.database.url)
        .await
        .expect("lock holder");
    // The key of db::MIGRATING.
    sqlx::query("SELECT pg_advisory_lock($1)")
        .bind(0x6372_6564_6974_6d67_i64)
        .execute(&mut holder)
        .await
        .expect("hold the migration lock");
    // A migration pending, as after an upgrade: a database already up to date is not locked
    // for (the worker only reads which migrations it holds).
    sqlx::query(
        "DELETE FROM _sqlx_migrations WHERE version = (SELECT max(version) FROM _sqlx_migrations)",
    )
    .execute(&env.pool)
    .await
    .expect("a migration pending");
    let (mut w, _, log) = WorkerProcess::spawn_logged(&env.process_env(), &["run"], "info");
    let waiting = "waiting for another process to finish migrating the database";
    wait_for_line(&log, waiting, T, "the start waiting for the migration lock");
    w.sigterm();
    assert_eq!(w.wait_exit(Duration::from_secs(5)).await, Some(0));
    holder.close().await.expect("release the lock");
    env.cleanup().await;
}

/// Runs the CLI with `args` against the database at `url` and expects it to fail, exit 1, at
/// the connect bound, well within `within`.
async fn fails_at_the_connect_bound(env: &TestEnv, args: &[&str], url: &str, within: Duration) {
    let mut cmd = tokio::process::Command::from(env.cli_command(args));
    cmd.env("DATABASE_URL", url).kill_on_drop(true);
    let out = tokio::time::timeout(within, cmd.output())
        .await
        .unwrap_or_else(|_| panic!("{args:?} still waiting after {within:?}"))
        .expect("run the CLI");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
    assert!(
        stderr.contains("no answer from the database within 10s"),
        "{args:?}: {stderr}"
    );
}

/// A database server that accepts connections and then says nothing holds a command no
/// longer than the connect bound: it fails, exit 1, saying so, rather than hang; the worker's
/// start says so and retries.
#[tokio::test]
async fn a_command_against_a_silent_database_fails_rather_than_hang() {
    let env = TestEnv::with(no_refill).await;
    let silent = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = silent.local_addr().expect("address").port();
    let held = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((conn, _)) = silent.accept().await {
            open.push(conn);
        }
    });
    let url = format!("postgres://root@127.0.0.1:{port}/credit");
    for args in [&["balance", "u"][..], &["migrate"]] {
        fails_at_the_connect_bound(&env, args, &url, Duration::from_secs(30)).await;
    }
    // The worker's start says so and tries again, and a stop meanwhile is clean.
    let mut vars: Vec<(String, String)> = env
        .process_env()
        .into_iter()
        .filter(|(k, _)| k != "DATABASE_URL")
        .collect();
    vars.push(("DATABASE_URL".into(), url));
    let (mut w, _, log) = WorkerProcess::spawn_logged(&vars, &["run"], "info");
    let retrying = "no answer from the database within 10s; the connection is given up";
    wait_for_line(&log, retrying, T, "the start retrying a silent database");
    w.sigterm();
    assert_eq!(w.wait_exit(Duration::from_secs(5)).await, Some(0));
    held.abort();
    env.cleanup().await;
}

/// Creating a missing database connects to the maintenance database: a server that answers
/// the first connection and then says nothing to the next one fails the command at the
/// connect bound too, rather than hold it.
#[tokio::test]
async fn creating_the_database_through_a_server_gone_silent_fails_rather_than_hang() {
    let env = TestEnv::with(no_refill).await;
    let server = url::Url::parse(&env.settings.database.url).expect("the test's database URL");
    let upstream = format!(
        "{}:{}",
        server.host_str().unwrap_or("127.0.0.1"),
        server.port().unwrap_or(5432)
    );
    let proxy = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = proxy.local_addr().expect("address").port();
    // The first connection passes through; every later one is held open in silence.
    let held = tokio::spawn(async move {
        let mut silent = Vec::new();
        let mut first = true;
        while let Ok((mut conn, _)) = proxy.accept().await {
            if std::mem::take(&mut first) {
                let upstream = upstream.clone();
                tokio::spawn(async move {
                    if let Ok(mut up) = TcpStream::connect(upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut conn, &mut up).await;
                    }
                });
            } else {
                silent.push(conn);
            }
        }
    });
    let mut url = server.clone();
    url.set_port(Some(port)).expect("a URL with a host");
    url.set_host(Some("127.0.0.1")).expect("a URL with a host");
    url.set_path(&unique("cw_absent"));
    fails_at_the_connect_bound(&env, &["migrate"], url.as_str(), Duration::from_secs(40)).await;
    held.abort();
    env.cleanup().await;
}

/// Runs the CLI `args` with a statement timeout of `statement_timeout_ms`, through a proxy to
/// the database that goes silent once the command waits for u0's row, which the returned
/// transaction holds; the command's output, within 30 s. The proxy is returned too: dropped,
/// it would end the frozen session early.
async fn frozen_behind_u0(
    env: &TestEnv,
    args: &[&str],
    statement_timeout_ms: &str,
) -> (
    std::process::Output,
    sqlx::Transaction<'static, sqlx::Postgres>,
    FreezingProxy,
) {
    let proxy = FreezingProxy::before_database(&env.settings.database.url).await;
    let holder = env.hold_account("u0").await;
    let mut cmd = tokio::process::Command::from(env.cli_command(args));
    cmd.env(
        "DATABASE_URL",
        through_proxy(&env.settings.database.url, proxy.port),
    )
    .env(
        "CREDIT_WORKER__DATABASE__STATEMENT_TIMEOUT_MS",
        statement_timeout_ms,
    )
    .kill_on_drop(true);
    let run = cmd.output();
    tokio::pin!(run);
    tokio::select! {
        _ = env.wait_for_one_lock_waiter(T, "the command waiting for u0's row") => {}
        out = &mut run => panic!("{args:?} ended before it waited: {out:?}"),
    }
    proxy.freeze();
    let out = tokio::time::timeout(Duration::from_secs(30), run)
        .await
        .unwrap_or_else(|_| panic!("{args:?} still waiting after 30 s"))
        .expect("run the CLI");
    (out, holder, proxy)
}

/// A sweep whose database connection goes silent while a range waits for a row fails at the
/// stall bound (two statement timeouts and a second), saying so, instead of waiting for ever;
/// run again, it refills every account once.
#[tokio::test]
async fn a_sweep_whose_database_goes_silent_fails_rather_than_hang() {
    let env = TestEnv::with(no_refill).await;
    seed(&env, user_names(10), 100).await;
    let (out, holder, _proxy) = frozen_behind_u0(&env, &["sweep"], "500").await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("no answer from the database within 2s"),
        "{stderr}"
    );
    holder.commit().await.expect("release u0's row");
    let report = env.cli_json(&["sweep"]);
    assert_eq!(
        (&report["users_refilled"], &report["credits_granted"]),
        (&serde_json::json!(10), &serde_json::json!(9000)),
        "{report}"
    );
    env.assert_audit_clean().await;
    env.cleanup().await;
}

/// A `top-up` whose database connection goes silent while it waits for the user's row fails
/// at the stall bound instead of hanging, says its outcome is unknown and how to learn it
/// (its key), and run again under that key the credit lands once.
#[tokio::test]
async fn a_top_up_whose_database_goes_silent_fails_and_names_its_key() {
    let env = TestEnv::with(no_refill).await;
    seed(&env, ["u0"], 100).await;
    let args = ["top-up", "u0", "7", "--key", "pay-7"];
    // 3 s: the freeze lands long before the server's cancel of the lock wait could reach the
    // command, whose one connection is taken by then (no pool wait comes first).
    let (out, holder, _proxy) = frozen_behind_u0(&env, &args, "3000").await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("whether it was applied is unknown: run it again with --key \"pay-7\""),
        "{stderr}"
    );
    assert!(
        stderr.contains("no answer from the database within 7s"),
        "{stderr}"
    );
    holder.commit().await.expect("release u0's row");
    // Once the abandoned transaction is ended by the server, the key lands once (after the
    // month's lazy refill to 1,000, which the command's own settings keep on).
    let again = env.cli_json(&args);
    assert_eq!(
        (&again["applied"], &again["balance"]),
        (&serde_json::json!(true), &serde_json::json!(1007)),
        "{again}"
    );
    let again = env.cli_json(&args);
    assert_eq!(
        (&again["applied"], &again["balance"]),
        (&serde_json::json!(false), &serde_json::json!(1007)),
        "{again}"
    );
    env.assert_audit_clean().await;
    env.cleanup().await;
}

/// The relay's listener, by its last statement: its process id.
async fn listener_pid(admin: &sqlx::PgPool, db: &str) -> Option<i32> {
    sqlx::query_scalar(
        "SELECT pid FROM pg_stat_activity
          WHERE datname = $1 AND application_name = 'credit-worker' AND query LIKE 'LISTEN %'",
    )
    .bind(db)
    .fetch_optional(admin)
    .await
    .unwrap()
}

/// A database whose administrator ends idle sessions after a second and cancels statements
/// after a millisecond, and a relay's listener whose session is ended again and again: the
/// worker's own settings (no statement timeout here) hold on its sessions, the listener is
/// made again on a connection of its own, and no decision fails for either.
#[tokio::test]
async fn a_databases_own_timeouts_and_a_lost_listener_cost_no_decision() {
    let _retries = DECIDE_RETRIES.lock().await;
    let (env, users, mut tap) = ten_funded_users().await;
    let admin = env.admin_pool().await;
    let db = env.db_name.clone();
    env.alter_database(&admin, "SET idle_session_timeout = '1s'")
        .await;
    env.alter_database(&admin, "SET statement_timeout = '1ms'")
        .await;
    let mut settings = env.settings.clone();
    settings.database.statement_timeout_ms = 0;
    let worker = Worker::start(settings).await.unwrap();
    let retries = || metric_value(&metrics_now(), "credit_decide_retries_total", &[]);
    let before = retries();
    wait_for(T, "the relay's listener", || async {
        listener_pid(&admin, &db).await.is_some()
    })
    .await;
    let first = listener_pid(&admin, &db).await;

    // A session on the database's settings is ended once idle for a second; the listener,
    // idle as long, is not.
    let probe_options = std::str::FromStr::from_str(&env.settings.database.url)
        .map(|o: sqlx::postgres::PgConnectOptions| o.application_name("idle-probe"))
        .unwrap();
    let _probe = sqlx::ConnectOptions::connect(&probe_options).await.unwrap();
    let probes = || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM pg_stat_activity
              WHERE datname = $1 AND application_name = 'idle-probe'",
        )
        .bind(&db)
        .fetch_one(&admin)
        .await
        .unwrap()
    };
    wait_for(T, "the idle probe to be ended", || async {
        probes().await == 0
    })
    .await;
    assert_eq!(listener_pid(&admin, &db).await, first);

    // The listener ended while events flow, so that it is made again between notifications.
    let (waves, per_wave) = (6, 1000);
    for wave in 0..waves {
        let prefix = format!("listen{wave}");
        env.publish(&workload(users, per_wave, &prefix)).await;
        env.wait_decisions((wave * per_wave + per_wave / 4) as i64, T)
            .await;
        let old = listener_pid(&admin, &db).await;
        sqlx::query("SELECT pg_terminate_backend($1)")
            .bind(old)
            .execute(&admin)
            .await
            .unwrap();
        wait_for(T, "a new listener", || async {
            matches!(listener_pid(&admin, &db).await, Some(pid) if Some(pid) != old)
        })
        .await;
        env.wait_decisions(((wave + 1) * per_wave) as i64, T).await;
    }
    let n = waves * per_wave;
    assert_events_complete(&env, &mut tap, users + n + fees(&per_user_counts(users, n))).await;
    assert_eq!(retries(), before, "decisions retried");
    worker.stop().await.unwrap();
    env.alter_database(&admin, "RESET ALL").await;
    admin.close().await;
    assert_books_balance(&env, users, 1_000_000, &per_user_counts(users, n)).await;
    env.cleanup().await;
}

/// A worker started while its database is read-only (a standby not yet promoted after a
/// failover) waits, not ready, rather than exit, and starts once the server takes writes.
#[tokio::test]
async fn a_start_against_a_read_only_database_waits_for_it_to_take_writes() {
    let env = TestEnv::with(no_refill).await;
    let admin = env.admin_pool().await;
    env.alter_database(&admin, "SET default_transaction_read_only = on")
        .await;
    let (mut worker, port, log) = WorkerProcess::spawn_logged(
        &env.process_env(),
        &["run"],
        "warn,credit_worker::telemetry=info",
    );
    wait_for_line(
        &log,
        "read-only transaction",
        T,
        "the start to meet the read-only database",
    );
    wait_for_line(&log, "retrying", T, "the start to wait");
    // Probes at once, as many as the pool holds: each makes a connection while the database
    // is read-only, which keeps it so. Each must be replaced before a write uses it.
    let probes = (0..8).map(|_| http_status(port, "/readyz"));
    let statuses = futures::future::join_all(probes).await;
    assert_eq!(statuses, [503; 8]);
    env.alter_database(&admin, "RESET default_transaction_read_only")
        .await;
    wait_status(T, port, "/readyz", 200).await;
    env.publish(&[body(&platform_gpt4("reader", "after-failover"))])
        .await;
    env.wait_decisions(1, T).await;
    worker.sigterm();
    assert_eq!(worker.wait_exit(T).await, Some(0));
    admin.close().await;
    env.cleanup().await;
}

/// Reads a client's start (after declining TLS) and answers it as a full server.
async fn refuse_as_full(mut inbound: TcpStream) {
    use tokio::io::AsyncReadExt;
    const SSL_REQUEST: u32 = 80_877_103;
    loop {
        let mut head = [0u8; 8];
        if inbound.read_exact(&mut head).await.is_err() {
            return;
        }
        let [l0, l1, l2, l3, c0, c1, c2, c3] = head;
        if u32::from_be_bytes([c0, c1, c2, c3]) == SSL_REQUEST {
            if inbound.write_all(b"N").await.is_err() {
                return;
            }
            continue;
        }
        let len = u32::from_be_bytes([l0, l1, l2, l3]) as usize;
        let mut rest = vec![0u8; len.saturating_sub(8)];
        let _ = inbound.read_exact(&mut rest).await;
        break;
    }
    let mut fields = Vec::new();
    for (tag, value) in [
        (b'S', "FATAL"),
        (b'V', "FATAL"),
        (b'C', "53300"),
        (b'M', "sorry, too many clients already"),
    ] {
        fields.push(tag);
        fields.extend_from_slice(value.as_bytes());
        fields.push(0);
    }
    fields.push(0);
    let mut message = vec![b'E'];
    message.extend_from_slice(&((fields.len() + 4) as u32).to_be_bytes());
    message.extend_from_slice(&fields);
    let _ = inbound.write_all(&message).await;
}

/// A database whose connection slots other clients have taken, after the worker lost its
/// connections: the pool only says it timed out (it retries the server's refusal until then),
/// so the worker tries a connection of its own and warns with the server's reason. Once slots
/// free up, the message waiting is billed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_timeout_is_explained_with_the_servers_refusal() {
    let env = TestEnv::with(no_refill).await;
    seed(&env, ["sl"], 1_000).await;
    let db = url::Url::parse(&env.settings.database.url).expect("database URL");
    let upstream = format!(
        "{}:{}",
        db.host_str().unwrap_or("127.0.0.1"),
        db.port().unwrap_or(5432)
    );
    let proxy = Proxy::refusing_with(upstream, |s| Box::pin(refuse_as_full(s))).await;
    let mut vars = env.process_env();
    vars.retain(|(k, _)| k != "DATABASE_URL");
    let url = through_proxy(&env.settings.database.url, proxy.port);
    vars.push(("DATABASE_URL".into(), url));
    vars.push(("CREDIT_WORKER__REFILL__ENABLED".into(), "false".into()));
    let filter = "warn,credit_worker::consumer=info,credit_worker::telemetry=info";
    let (mut worker, _http, log) = WorkerProcess::spawn_logged(&vars, &["run"], filter);
    wait_for_line(&log, "consuming", T, "the worker");
    env.publish(&[body(&platform_gpt4("sl", "sl-1"))]).await;
    env.wait_decisions(1, T).await;

    proxy.refuse.store(true, Ordering::SeqCst);
    proxy.cut_all();
    env.publish(&[body(&platform_gpt4("sl", "sl-2"))]).await;
    wait_for_line(
        &log,
        "the server refuses a new one\",\"error\":\"error returned from database: sorry, too many clients already",
        T,
        "the explanation",
    );
    proxy.refuse.store(false, Ordering::SeqCst);
    env.wait_decisions(2, T).await;
    assert_eq!(env.outcome_of("sl-2").await.as_deref(), Some("charged"));
    worker.sigterm();
    assert_eq!(worker.wait_exit(T).await, Some(0));
    env.cleanup().await;
}
