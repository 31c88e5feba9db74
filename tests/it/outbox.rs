//! The outbox relay's watermark: event ids are drawn in commit order, so the relay can publish
//! from a watermark without skipping an event that commits late; a relay that dies after its
//! events were confirmed but before the watermark moved publishes them again; of several
//! replicas one relay leads, and another takes over when it dies or stops making progress.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use credit_worker::ledger::TxType;
use sqlx::{Connection, PgConnection};

use crate::fixtures::*;
use crate::helpers::*;

const T: Duration = Duration::from_secs(30);

const INSERT_EVENT: &str = "INSERT INTO credit.outbox (event_id, routing_key, payload)
     VALUES ($1, 'balance.changed', '{}') RETURNING id";

async fn connect(env: &TestEnv) -> PgConnection {
    PgConnection::connect(&env.settings.database.url)
        .await
        .expect("connect")
}

async fn insert_event(conn: &mut PgConnection, event_id: &str) -> i64 {
    sqlx::query_scalar(INSERT_EVENT)
        .bind(event_id)
        .fetch_one(&mut *conn)
        .await
        .expect("insert event")
}

/// While a transaction holding outbox rows is open, no later transaction can draw an id: a
/// row never becomes visible below one that is already visible. A rolled-back id stays a gap.
#[tokio::test]
async fn outbox_ids_are_drawn_in_commit_order() {
    let env = TestEnv::with(no_refill).await;
    let mut first = connect(&env).await;
    sqlx::query("BEGIN").execute(&mut first).await.unwrap();
    let first_id = insert_event(&mut first, "t:first").await;

    let mut second = connect(&env).await;
    let later = tokio::spawn(async move {
        sqlx::query("BEGIN").execute(&mut second).await.unwrap();
        let id = insert_event(&mut second, "t:second").await;
        sqlx::query("COMMIT").execute(&mut second).await.unwrap();
        id
    });
    env.wait_for_one_lock_waiter(T, "the second writer to wait for the outbox's id lock")
        .await;
    assert!(
        !later.is_finished(),
        "a second writer drew an id while the first was open"
    );
    assert_eq!(
        env.scalar_i64("SELECT count(*) FROM credit.outbox").await,
        0
    );
    sqlx::query("COMMIT").execute(&mut first).await.unwrap();
    let second_id = tokio::time::timeout(T, later).await.unwrap().unwrap();
    assert!(second_id > first_id);

    let mut rolled_back = connect(&env).await;
    sqlx::query("BEGIN")
        .execute(&mut rolled_back)
        .await
        .unwrap();
    let gap = insert_event(&mut rolled_back, "t:rolled-back").await;
    sqlx::query("ROLLBACK")
        .execute(&mut rolled_back)
        .await
        .unwrap();
    let mut last = connect(&env).await;
    let last_id = insert_event(&mut last, "t:last").await;
    assert!(gap > second_id && last_id > gap);
    let ids: Vec<i64> = sqlx::query_scalar("SELECT id FROM credit.outbox ORDER BY id")
        .fetch_all(&env.pool)
        .await
        .unwrap();
    assert_eq!(ids, vec![first_id, second_id, last_id]);
    env.cleanup().await;
}

/// The first time the watermark is moved, the statement hangs: the relay has published and
/// had every confirm, but its transaction never commits.
const STALL_FIRST_ADVANCE: &str = "
CREATE SEQUENCE public.advances;
CREATE FUNCTION public.stall_first_advance() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF nextval('public.advances') = 1 THEN
        PERFORM pg_sleep(600);
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER stall_first_advance BEFORE UPDATE OF published_through ON credit.outbox_relay
    FOR EACH ROW EXECUTE FUNCTION public.stall_first_advance();";

/// Ends the stalled relay's database session, as the server does once its client is gone.
async fn end_stalled_session(env: &TestEnv) {
    let ended: i64 = sqlx::query_scalar(
        "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid))::int8 FROM pg_stat_activity
          WHERE datname = current_database() AND wait_event = 'PgSleep'",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!(
        ended, 1,
        "one relay session stalled in its watermark update"
    );
}

/// A relay killed after its events were confirmed but before its watermark committed: the
/// next relay publishes the same events again, in the same order, and then everything else.
#[tokio::test]
async fn a_relay_killed_between_publish_and_watermark_commit_republishes() {
    let env = TestEnv::with(no_refill).await;
    let ledger = env.ledger();
    for i in 0..12 {
        let user = format!("w{}", i % 3);
        ledger
            .credit(
                TxType::TopUp,
                &user,
                100,
                Some(&format!("T-{i}")),
                None,
                Utc::now(),
            )
            .await
            .unwrap();
    }
    sqlx::raw_sql(STALL_FIRST_ADVANCE)
        .execute(&env.pool)
        .await
        .unwrap();
    let mut tap = env.event_tap().await;
    let mut env_vars = env.process_env();
    env_vars.push(("CREDIT_WORKER__REFILL__ENABLED".into(), "false".into()));

    let mut w = WorkerProcess::spawn(&env_vars, &["run"]);
    let first: Vec<String> = tap.take(12, T).await.into_iter().map(|e| e.1).collect();
    // Published in id order (the batch's publishes are pipelined, not reordered).
    let stored: Vec<String> = stored_events(&env).await.into_iter().map(|e| e.0).collect();
    assert_eq!(first, stored, "events in outbox id order");
    wait_for(T, "the watermark update to stall", || async {
        env.scalar_i64(
            "SELECT count(*) FROM pg_stat_activity
              WHERE datname = current_database() AND wait_event = 'PgSleep'",
        )
        .await
            == 1
    })
    .await;
    assert_eq!(env.scalar_i64(UNPUBLISHED).await, 12);
    w.kill9();
    end_stalled_session(&env).await;

    let mut w = WorkerProcess::spawn(&env_vars, &["run"]);
    let again: Vec<String> = tap.take(12, T).await.into_iter().map(|e| e.1).collect();
    assert_eq!(again, first, "the same events again, in the same order");
    // Then the relay goes on from its watermark: new events, each once.
    env.publish(&[body(&platform_gpt4("w0", "after-1"))]).await;
    let next = tap.take(1, T).await;
    assert_eq!(next[0].2["transaction_key"], "USAGE-after-1");
    wait_count(&env, T, "outbox drained", UNPUBLISHED, &[], |n| n == 0).await;
    tap.assert_quiet(Duration::from_millis(500)).await;
    w.sigterm();
    assert_eq!(w.wait_exit(T).await, Some(0));
    env.assert_audit_clean().await;
    env.cleanup().await;
}

/// The relays leading in this test's database: advisory locks are per database, and other
/// tests' workers (or any on the server) hold the same key in theirs.
const RELAY_LEADERS: &str = "SELECT count(*) FROM pg_locks
      WHERE locktype = 'advisory' AND classid = 1668441444 AND objid = 1919249505 AND granted
        AND database = (SELECT oid FROM pg_database WHERE datname = current_database())";

async fn published_by(port: u16) -> f64 {
    let (_, body) = http_get(port, "/metrics").await.unwrap_or_default();
    metric_value(&body, "credit_events_published_total", &[])
}

/// Of two replicas one relay leads and publishes everything; when it dies the other takes
/// over from the watermark: every event once, in outbox id order.
#[tokio::test]
async fn one_relay_leads_and_another_takes_over_when_it_dies() {
    let env = TestEnv::with(no_refill).await;
    seed(&env, ["l0", "l1"], 1_000_000).await;
    // The seed's own events go out first.
    let seeded = env.scalar_i64("SELECT count(*) FROM credit.outbox").await;
    assert_eq!(seeded, 2);
    let mut tap = env.event_tap().await;
    let mut vars = env.process_env();
    vars.push(("CREDIT_WORKER__REFILL__ENABLED".into(), "false".into()));
    let mut workers = [
        WorkerProcess::spawn_with_http(&vars, &["run"]),
        WorkerProcess::spawn_with_http(&vars, &["run"]),
    ];
    for (_, port) in &workers {
        wait_status(T, *port, "/readyz", 200).await;
    }
    wait_for(T, "a relay to lead", || async {
        env.scalar_i64(RELAY_LEADERS).await == 1
    })
    .await;
    let batch = |from: usize| -> Vec<Vec<u8>> {
        (from..from + 10)
            .map(|i| body(&platform_gpt4(&format!("l{}", i % 2), &format!("lead-{i}"))))
            .collect()
    };
    env.publish(&batch(0)).await;
    let first: Vec<String> = tap.take(12, T).await.into_iter().map(|e| e.1).collect();
    wait_count(&env, T, "outbox drained", UNPUBLISHED, &[], |n| n == 0).await;
    let counts = [
        published_by(workers[0].1).await,
        published_by(workers[1].1).await,
    ];
    let leader = usize::from(counts[1] > 0.0);
    assert_eq!(
        (counts[leader], counts[1 - leader]),
        (12.0, 0.0),
        "{counts:?}"
    );

    workers[leader].0.kill9();
    env.publish(&batch(10)).await;
    let next: Vec<String> = tap.take(10, T).await.into_iter().map(|e| e.1).collect();
    let survivor = workers[1 - leader].1;
    wait_count(&env, T, "outbox drained", UNPUBLISHED, &[], |n| n == 0).await;
    assert_eq!(published_by(survivor).await, 10.0);
    tap.assert_quiet(Duration::from_millis(500)).await;
    let stored: Vec<String> = stored_events(&env).await.into_iter().map(|e| e.0).collect();
    assert_eq!(
        [first, next].concat(),
        stored,
        "each event once, in outbox id order"
    );
    workers[1 - leader].0.sigterm();
    assert_eq!(workers[1 - leader].0.wait_exit(T).await, Some(0));
    env.assert_audit_clean().await;
    env.cleanup().await;
}

/// A leader frozen with its connection up (SIGSTOP: a paused VM, a stuck runtime) loses the
/// lead once its session has been idle past the lease (twice the statement timeout and a
/// second, 3 s here): the standby takes over and publishes while it stays frozen, and the
/// leader, resumed, finds its session ended and publishes nothing more.
#[tokio::test]
async fn a_frozen_leader_loses_the_lead_to_the_standby() {
    let env = TestEnv::with(no_refill).await;
    seed(&env, ["f0", "f1"], 1_000_000).await;
    let mut tap = env.event_tap().await;
    let mut vars = env.process_env();
    vars.push(("CREDIT_WORKER__REFILL__ENABLED".into(), "false".into()));
    vars.push((
        "CREDIT_WORKER__DATABASE__STATEMENT_TIMEOUT_MS".into(),
        "1000".into(),
    ));
    let mut workers = [
        WorkerProcess::spawn_with_http(&vars, &["run"]),
        WorkerProcess::spawn_with_http(&vars, &["run"]),
    ];
    for (_, port) in &workers {
        wait_status(T, *port, "/readyz", 200).await;
    }
    tap.take(2, T).await;
    wait_count(&env, T, "outbox drained", UNPUBLISHED, &[], |n| n == 0).await;
    let counts = [
        published_by(workers[0].1).await,
        published_by(workers[1].1).await,
    ];
    let leader = usize::from(counts[1] > 0.0);
    assert_eq!(
        (counts[leader], counts[1 - leader]),
        (2.0, 0.0),
        "{counts:?}"
    );
    let holder = "SELECT pid FROM pg_locks
      WHERE locktype = 'advisory' AND classid = 1668441444 AND objid = 1919249505 AND granted
        AND database = (SELECT oid FROM pg_database WHERE datname = current_database())";
    let frozen_pid = env
        .scalar_i64(&format!("SELECT pid::bigint FROM ({holder}) l"))
        .await;

    // Still frozen should the test fail: dropping the process kills it.
    workers[leader].0.signal("STOP");
    wait_for(T, "the standby to take the lead", || async {
        let now = env
            .scalar_i64(&format!(
                "SELECT coalesce(max(pid), 0)::bigint FROM ({holder}) l"
            ))
            .await;
        now != 0 && now != frozen_pid
    })
    .await;
    // Whichever worker decides it, only the new leader publishes its event.
    env.publish(&[body(&platform_gpt4("f0", "frozen-0"))]).await;
    workers[leader].0.signal("CONT");
    let survivor = workers[1 - leader].1;
    let ids: Vec<String> = tap.take(1, T).await.into_iter().map(|e| e.1).collect();
    wait_count(&env, T, "outbox drained", UNPUBLISHED, &[], |n| n == 0).await;
    assert_eq!(published_by(survivor).await, 1.0);
    // Resumed, the old leader keeps serving (its HTTP answers) but leads no more.
    wait_status(T, workers[leader].1, "/healthz", 200).await;
    assert_eq!(published_by(workers[leader].1).await, 2.0);
    tap.assert_quiet(Duration::from_millis(500)).await;
    let stored: Vec<String> = stored_events(&env).await.into_iter().map(|e| e.0).collect();
    assert_eq!(stored.last(), ids.last(), "the decision's event, once");
    for (w, _) in &workers {
        w.sigterm();
    }
    for (w, _) in &mut workers {
        assert_eq!(w.wait_exit(T).await, Some(0));
    }
    env.assert_audit_clean().await;
    env.cleanup().await;
}

/// A database slow to set up new connections (3 s, longer than the lead's lease: 1.2 s with a
/// statement timeout of 100 ms) costs a new leader nothing: its session's lease starts once
/// the listener's own connection is made, not while that connection is awaited. The worker's
/// sessions are ended while connections are slow, so the relay leads anew on new ones.
#[tokio::test]
async fn a_slow_new_connection_does_not_cost_the_lead() {
    let env = TestEnv::with(no_refill).await;
    seed(&env, ["s0"], 1_000_000).await;
    let mut tap = env.event_tap().await;
    let mut db = url::Url::parse(&env.settings.database.url).expect("database url");
    let upstream = format!(
        "{}:{}",
        db.host_str().unwrap_or("127.0.0.1"),
        db.port().unwrap_or(5432)
    );
    let proxy = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = proxy.local_addr().expect("address").port();
    let slow = Arc::new(AtomicBool::new(false));
    let delaying = slow.clone();
    // The client ports of the worker's sessions, as the server sees them.
    let ports = Arc::new(std::sync::Mutex::new(Vec::<i64>::new()));
    let seen = ports.clone();
    let proxied = tokio::spawn(async move {
        while let Ok((mut inbound, _)) = proxy.accept().await {
            let upstream = upstream.clone();
            let delay = delaying.load(Ordering::SeqCst);
            let seen = seen.clone();
            tokio::spawn(async move {
                if delay {
                    tokio::time::sleep(Duration::from_secs(3)).await;
                }
                if let Ok(mut outbound) = tokio::net::TcpStream::connect(&upstream).await {
                    if let Ok(local) = outbound.local_addr() {
                        seen.lock().unwrap().push(i64::from(local.port()));
                    }
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    });
    db.set_host(Some("127.0.0.1")).expect("host");
    db.set_port(Some(port)).expect("port");
    let mut vars = env.process_env();
    vars.retain(|(k, _)| k != "DATABASE_URL");
    vars.push(("DATABASE_URL".into(), db.to_string()));
    vars.push(("CREDIT_WORKER__REFILL__ENABLED".into(), "false".into()));
    vars.push((
        "CREDIT_WORKER__DATABASE__STATEMENT_TIMEOUT_MS".into(),
        "100".into(),
    ));
    let (mut worker, http) = WorkerProcess::spawn_with_http(&vars, &["run"]);
    wait_status(T, http, "/readyz", 200).await;
    assert_eq!(tap.take(1, T).await.len(), 1, "the seed's event");

    slow.store(true, Ordering::SeqCst);
    let worker_ports = ports.lock().unwrap().clone();
    let ended: i64 = sqlx::query_scalar(
        "SELECT count(pg_terminate_backend(pid))::int8 FROM pg_stat_activity
          WHERE datname = current_database() AND client_port = ANY($1)",
    )
    .bind(&worker_ports)
    .fetch_one(&env.pool)
    .await
    .expect("end the worker's sessions");
    assert!(ended >= 2, "the relay's sessions and the pool's: {ended}");
    wait_for(T, "a relay to listen again", || async {
        env.scalar_i64(
            "SELECT count(*) FROM pg_stat_activity
              WHERE datname = current_database() AND query = 'LISTEN \"credit_outbox\"'",
        )
        .await
            == 1
    })
    .await;
    slow.store(false, Ordering::SeqCst);
    env.publish(&[body(&platform_gpt4("s0", "slow-0"))]).await;
    assert_eq!(tap.take(1, T).await.len(), 1, "the decision's event");
    let reconnects = |text: &str| {
        metric_value(
            text,
            "credit_broker_reconnects_total",
            &[("session", "outbox relay")],
        )
    };
    let (_, metrics) = http_get(http, "/metrics").await.unwrap_or_default();
    assert_eq!(
        reconnects(&metrics),
        1.0,
        "one session ended by the test, none by its own lease"
    );
    worker.sigterm();
    assert_eq!(worker.wait_exit(T).await, Some(0));
    proxied.abort();
    env.assert_audit_clean().await;
    env.cleanup().await;
}

/// A run of `n` events `{prefix}-0`, … as a row's payload.
fn run_of(prefix: &str, n: usize) -> String {
    let events: Vec<serde_json::Value> = (0..n)
        .map(|i| serde_json::json!({"event_id": format!("{prefix}-{i}"), "type": "balance.changed", "i": i}))
        .collect();
    serde_json::Value::from(events).to_string()
}

/// A row holding a run of events goes out as one message per element, with the element's
/// event_id as message_id, in order among the single events; a relay round reads the rows of
/// about a thousand events, not a thousand rows. The schema refuses a run that is not an
/// array, and a single event that is not an object.
#[tokio::test]
async fn a_run_of_events_goes_out_one_message_per_event() {
    let env = TestEnv::with(no_refill).await;
    let single =
        |id: &str| serde_json::json!({"event_id": id, "type": "balance.changed"}).to_string();
    let rows = [
        ("single-a", 1, single("single-a")),
        ("big-0", 1000, run_of("big", 1000)),
        ("mid-0", 600, run_of("mid", 600)),
        ("single-b", 1, single("single-b")),
        ("single-c", 1, single("single-c")),
    ];
    let insert = "INSERT INTO credit.outbox (event_id, routing_key, events, payload, run)
                  VALUES ($1, 'balance.changed', $2, $3::json, $4::json)";
    for (id, events, payload) in &rows {
        let (one, run) = if *events == 1 {
            (Some(payload), None)
        } else {
            (None, Some(payload))
        };
        sqlx::query(insert)
            .bind(id)
            .bind(events)
            .bind(one)
            .bind(run)
            .execute(&env.pool)
            .await
            .unwrap();
    }
    // A run lives in `run` and is an array; a single event lives in `payload` and is an object.
    let refusals = [
        (2, Some(run_of("a", 2)), None),
        (2, None, Some(single("b"))),
        (1, Some(run_of("c", 1)), None),
        (1, Some(single("d")), Some(run_of("d", 2))),
        (1, None, None),
        (0, Some(single("e")), None),
    ];
    for (events, one, run) in refusals {
        let refused = sqlx::query(insert)
            .bind("refused")
            .bind(events)
            .bind(&one)
            .bind(&run)
            .execute(&env.pool)
            .await
            .unwrap_err();
        let constraint = refused.as_database_error().and_then(|d| d.constraint());
        assert_eq!(
            constraint,
            Some("outbox_events_check"),
            "{events} {one:?} {run:?}"
        );
    }
    assert_eq!(env.scalar_i64(UNPUBLISHED).await, 1603);
    // Large runs are compressed, with lz4 (migration 0010) on a server built with it.
    let compression: Option<String> = sqlx::query_scalar(
        "SELECT pg_column_compression(run) FROM credit.outbox WHERE event_id = 'big-0'",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    let lz4_built = sqlx::query("CREATE TEMP TABLE lz4_probe (x text COMPRESSION lz4)")
        .execute(&env.pool)
        .await
        .is_ok();
    let expected = if lz4_built { "lz4" } else { "pglz" };
    assert_eq!(compression.as_deref(), Some(expected));
    // The column's own setting, not the server's default_toast_compression.
    let setting: String = sqlx::query_scalar(
        "SELECT attcompression::text FROM pg_attribute
          WHERE attrelid = 'credit.outbox'::regclass AND attname = 'run'",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!(setting, if lz4_built { "l" } else { "" });

    let mut tap = env.event_tap().await;
    let mut vars = env.process_env();
    vars.push(("CREDIT_WORKER__REFILL__ENABLED".into(), "false".into()));
    let (mut w, port) = WorkerProcess::spawn_with_http(&vars, &["run"]);
    let got = tap.take(1603, T).await;
    let expected: Vec<String> = std::iter::once("single-a".to_owned())
        .chain((0..1000).map(|i| format!("big-{i}")))
        .chain((0..600).map(|i| format!("mid-{i}")))
        .chain(["single-b".to_owned(), "single-c".to_owned()])
        .collect();
    let ids: Vec<&str> = got.iter().map(|e| e.1.as_str()).collect();
    assert_eq!(ids, expected);
    assert!(got
        .iter()
        .all(|e| e.0 == "balance.changed" && e.2["event_id"] == e.1));
    assert_eq!(got[1001].2["i"], 0, "mid-0 is the body of its own element");
    assert_eq!(
        stored_events(&env)
            .await
            .into_iter()
            .map(|e| e.0)
            .collect::<Vec<_>>(),
        expected
    );
    wait_count(&env, T, "outbox drained", UNPUBLISHED, &[], |n| n == 0).await;
    let (_, metrics) = http_get(port, "/metrics").await.unwrap_or_default();
    assert_eq!(
        metric_value(&metrics, "credit_events_published_total", &[]),
        1603.0
    );
    // Round one: single-a and the run of 1000 (the run of 600 would start at event 1001).
    // Round two: the rest.
    assert_eq!(
        metric_value(&metrics, "credit_outbox_publish_seconds_count", &[]),
        2.0
    );
    tap.assert_quiet(Duration::from_millis(500)).await;
    w.sigterm();
    assert_eq!(w.wait_exit(T).await, Some(0));
    env.cleanup().await;
}

/// Moves the relays' watermark to `id`, as if they had published everything up to it.
async fn published_through(conn: &mut PgConnection, id: i64) {
    sqlx::query("UPDATE credit.outbox_relay SET published_through = $1")
        .bind(id)
        .execute(conn)
        .await
        .unwrap();
}

/// Credits `user` with a TOP_UP stamped `at` (its event is stamped the same).
async fn top_up_at(env: &TestEnv, user: &str, key: &str, at: chrono::DateTime<Utc>) {
    env.ledger()
        .credit(TxType::TopUp, user, 100, Some(key), None, at)
        .await
        .unwrap();
}

/// Pruning deletes published events stamped before the cutoff, oldest first and no more than
/// asked; an old event the relays have not published stays, as do newer ones. The audit looks
/// for events only from the horizon on, and still finds every later one.
#[tokio::test]
async fn published_events_past_the_retention_are_deleted() {
    let env = TestEnv::with(no_refill).await;
    let now = Utc::now();
    let old = now - chrono::Duration::days(2);
    for (i, at) in [old, old, old, now, now].into_iter().enumerate() {
        top_up_at(&env, &format!("p{i}"), "T", at).await;
    }
    let ids: Vec<i64> = sqlx::query_scalar("SELECT id FROM credit.outbox ORDER BY id")
        .fetch_all(&env.pool)
        .await
        .unwrap();
    // The relays published the first two old events.
    let mut conn = connect(&env).await;
    published_through(&mut conn, ids[1]).await;
    let cutoff = now - chrono::Duration::days(1);
    let prune = credit_worker::ledger::retention::prune_published;
    assert_eq!(prune(&mut conn, cutoff, 1).await.unwrap(), 1);
    assert_eq!(prune(&mut conn, cutoff, 100).await.unwrap(), 1);
    let left = |ids: &[usize]| -> Vec<String> {
        ids.iter()
            .map(|i| format!("balance.changed:p{i}:T"))
            .collect()
    };
    let events = || async {
        stored_events(&env)
            .await
            .into_iter()
            .map(|e| e.0)
            .collect::<Vec<_>>()
    };
    assert_eq!(
        events().await,
        left(&[2, 3, 4]),
        "p2 is old but not published yet"
    );
    // Now p2 and p3 are published too: p2 goes, p3 is newer than the cutoff.
    published_through(&mut conn, ids[3]).await;
    assert_eq!(prune(&mut conn, cutoff, 100).await.unwrap(), 1);
    assert_eq!(events().await, left(&[3, 4]));
    let horizon: chrono::DateTime<Utc> =
        sqlx::query_scalar("SELECT pruned_before FROM credit.outbox_relay")
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert_eq!(horizon.timestamp_micros(), cutoff.timestamp_micros());
    env.assert_audit_clean().await;
    // After the horizon a missing event is still found missing.
    sqlx::query("DELETE FROM credit.outbox WHERE event_id = 'balance.changed:p4:T'")
        .execute(&env.pool)
        .await
        .unwrap();
    let report = credit_worker::ledger::audit::run(&env.pool).await.unwrap();
    let users: Vec<&str> = report
        .mismatches
        .iter()
        .map(|m| m.user_id.as_str())
        .collect();
    assert_eq!(users, ["p4"]);
    env.cleanup().await;
}

/// With `outbox.retention_s`, the leading relay deletes what it published once it is older.
#[tokio::test]
async fn the_relay_prunes_what_it_published_after_the_retention() {
    let env = TestEnv::with(|s| {
        no_refill(s);
        s.outbox.retention_s = 1;
    })
    .await;
    let earlier = Utc::now() - chrono::Duration::seconds(10);
    for i in 0..3 {
        top_up_at(&env, &format!("r{i}"), "T", earlier).await;
    }
    let mut tap = env.event_tap().await;
    let worker = credit_worker::service::Worker::start(env.settings.clone())
        .await
        .unwrap();
    let ids: Vec<String> = tap.take(3, T).await.into_iter().map(|e| e.1).collect();
    assert_eq!(
        ids,
        [
            "balance.changed:r0:T",
            "balance.changed:r1:T",
            "balance.changed:r2:T"
        ]
    );
    wait_count(
        &env,
        T,
        "the published events pruned",
        "SELECT count(*) FROM credit.outbox",
        &[],
        |n| n == 0,
    )
    .await;
    tap.assert_quiet(Duration::from_millis(300)).await;
    stop_audit_cleanup(env, worker).await;
}

/// A prune goes over the published rows ten thousand at a time, up to the most it may delete,
/// and stops at the first window with rows not yet due.
#[tokio::test]
async fn a_prune_deletes_in_windows_up_to_its_limit() {
    let env = TestEnv::with(no_refill).await;
    let old = Utc::now() - chrono::Duration::days(2);
    sqlx::query(
        "INSERT INTO credit.outbox (event_id, routing_key, payload, created_at)
         SELECT 'e' || g, 'balance.changed', '{}', $1 FROM generate_series(1, 25000) g",
    )
    .bind(old)
    .execute(&env.pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO credit.outbox (event_id, routing_key, payload) VALUES ('new', 'balance.changed', '{}')",
    )
    .execute(&env.pool)
    .await
    .unwrap();
    sqlx::query(
        "UPDATE credit.outbox_relay SET published_through = (SELECT max(id) FROM credit.outbox)",
    )
    .execute(&env.pool)
    .await
    .unwrap();
    let mut conn = connect(&env).await;
    let cutoff = Utc::now() - chrono::Duration::days(1);
    let prune = credit_worker::ledger::retention::prune_published;
    assert_eq!(prune(&mut conn, cutoff, 15_000).await.unwrap(), 15_000);
    assert_eq!(prune(&mut conn, cutoff, 100_000).await.unwrap(), 10_000);
    assert_eq!(prune(&mut conn, cutoff, 100_000).await.unwrap(), 0);
    assert_eq!(
        env.scalar_i64("SELECT count(*) FROM credit.outbox WHERE event_id = 'new'")
            .await,
        1
    );
    assert_eq!(
        env.scalar_i64("SELECT count(*) FROM credit.outbox").await,
        1
    );
    env.cleanup().await;
}

/// A standby relay that is asked to stop while another leads does not leave its worker's
/// events behind: it keeps trying for the lead until they are published. Here the "leader"
/// is this test's session, which holds the lead and publishes nothing, then lets go.
#[tokio::test]
async fn a_stopping_standby_publishes_its_events_when_the_leader_is_gone() {
    let env = TestEnv::with(no_refill).await;
    seed(&env, ["sb"], 100).await;
    let leader = env.hold_relay_lead().await;
    let mut vars = env.process_env();
    vars.push(("CREDIT_WORKER__REFILL__ENABLED".into(), "false".into()));
    let (mut w, _, log) = WorkerProcess::spawn_logged(&vars, &["run"], "info");
    env.publish(&[body(&platform_gpt4("sb", "sb-1"))]).await;
    env.wait_decisions(1, T).await;
    assert_eq!(
        env.scalar_i64(UNPUBLISHED).await,
        2,
        "the seed's event and the charge's"
    );
    w.sigterm();
    let waiting = "waiting for the leading relay";
    wait_for_line(&log, waiting, T, "the standby waiting for its events");
    leader.close().await.expect("the leader goes");
    assert_eq!(w.wait_exit(T).await, Some(0));
    assert_eq!(env.scalar_i64(UNPUBLISHED).await, 0);
    env.cleanup().await;
}

/// `events republish` sends again the published events stamped from a time on, in order with
/// their event ids, to every subscriber or to one queue; not the older ones, nor those the
/// relay has yet to send. A queue that is not there is `not_found`.
#[tokio::test]
async fn kept_events_are_republished_for_a_subscriber_that_lost_them() {
    let env = TestEnv::with(no_refill).await;
    let mut tap = env.event_tap().await;
    let now = Utc::now();
    top_up_at(&env, "a", "old", now - chrono::Duration::hours(5)).await;
    top_up_at(&env, "a", "k1", now - chrono::Duration::minutes(5)).await;
    top_up_at(&env, "a", "k2", now - chrono::Duration::minutes(4)).await;
    let watermark = env.scalar_i64("SELECT max(id) FROM credit.outbox").await;
    top_up_at(&env, "a", "unsent", now).await;
    let mut conn = connect(&env).await;
    published_through(&mut conn, watermark).await;
    // The two before the watermark: k1's and k2's.
    let kept: Vec<(i64, String, String)> = sqlx::query_as(
        "SELECT * FROM (SELECT id, event_id, payload::text FROM credit.outbox
          WHERE id <= $1 ORDER BY id DESC LIMIT 2) k ORDER BY id",
    )
    .bind(watermark)
    .fetch_all(&env.pool)
    .await
    .unwrap();
    let since = (now - chrono::Duration::minutes(6)).to_rfc3339();

    let report = env.cli_json(&["events", "republish", "--since", &since]);
    assert_eq!(report["events"], 2);
    assert_eq!(report["to"], env.names.events.as_str());
    assert_eq!(
        (report["first_id"].as_i64(), report["last_id"].as_i64()),
        (Some(kept[0].0), Some(watermark))
    );
    assert_eq!(report["kept_since"], serde_json::Value::Null);
    let got = tap.take(2, T).await;
    for ((routing_key, message_id, body), (_, event_id, payload)) in got.iter().zip(&kept) {
        assert_eq!(
            (routing_key.as_str(), message_id),
            ("balance.changed", event_id)
        );
        let stored: serde_json::Value = serde_json::from_str(payload).unwrap();
        assert_eq!(body, &stored);
    }
    tap.assert_quiet(Duration::from_millis(500)).await;

    // A subscriber's exclusive queue (gone with its connection, whatever the test's end): the
    // broker refuses other connections a look at it, but delivers to it.
    let queue = format!("{}lost-subscriber", env.settings.amqp.namespace);
    let (_amqp, ch) = env.amqp_channel().await;
    let exclusive = lapin::options::QueueDeclareOptions {
        exclusive: true,
        ..Default::default()
    };
    ch.queue_declare(queue.as_str().into(), exclusive, Default::default())
        .await
        .expect("declare the subscriber's queue");
    let depth = || async {
        let passive = lapin::options::QueueDeclareOptions {
            passive: true,
            ..exclusive
        };
        let q = ch.queue_declare(queue.as_str().into(), passive, Default::default());
        q.await.expect("the queue's depth").message_count()
    };
    let to_queue = [
        "events",
        "republish",
        "--since",
        &since,
        "--to-queue",
        &queue,
    ];
    let dry = env.cli_json(&[&to_queue[..], &["--dry-run"]].concat());
    assert_eq!(
        (dry["events"].as_i64(), dry["dry_run"].as_bool()),
        (Some(2), Some(true))
    );
    assert_eq!(depth().await, 0);
    assert_eq!(env.cli_json(&to_queue)["events"], 2);
    wait_for(T, "two events in the queue", || async {
        depth().await == 2
    })
    .await;
    tap.assert_quiet(Duration::from_millis(200)).await;

    // A queue that refuses the second event: the error names it, and what went before.
    let small = format!("{}small-subscriber", env.settings.amqp.namespace);
    let mut limits = lapin::types::FieldTable::default();
    limits.insert("x-max-length".into(), lapin::types::AMQPValue::LongInt(1));
    limits.insert(
        "x-overflow".into(),
        lapin::types::AMQPValue::LongString("reject-publish".into()),
    );
    ch.queue_declare(small.as_str().into(), exclusive, limits)
        .await
        .expect("declare the small queue");
    let to_small = [
        "events",
        "republish",
        "--since",
        &since,
        "--to-queue",
        &small,
        "--json",
    ];
    let out = env.cli(&to_small);
    assert_eq!(out.status.code(), Some(1));
    let error: serde_json::Value = serde_json::from_slice(&out.stdout).expect("a JSON error");
    assert_eq!(
        error["error"]["message"],
        format!(
            "no event republished before the round that failed, and some of that round may \
             have been: event {}: broker: message 1 of the batch was refused (nack)",
            kept[1].1
        )
    );

    let missing = [
        "events",
        "republish",
        "--since",
        &since,
        "--to-queue",
        "no-such-queue",
        "--json",
    ];
    let out = env.cli(&missing);
    assert_eq!(out.status.code(), Some(1));
    let error: serde_json::Value = serde_json::from_slice(&out.stdout).expect("a JSON error");
    assert_eq!(error["error"]["code"], "not_found");
    // A namespace no worker ran in has no events exchange: named, not a closed channel.
    let elsewhere = format!("{}none.", env.settings.amqp.namespace);
    let out = env
        .cli_command(&["events", "republish", "--since", &since, "--json"])
        .env("CREDIT_WORKER__AMQP__NAMESPACE", &elsewhere)
        .output()
        .expect("run the CLI");
    let error: serde_json::Value = serde_json::from_slice(&out.stdout).expect("a JSON error");
    assert_eq!(error["error"]["code"], "not_found");
    let message = error["error"]["message"].as_str().unwrap_or_default();
    assert!(message.starts_with("there is no exchange"), "{message}");
    env.cleanup().await;
}

/// The leading relay's database sessions ended (a server restarting, an administrator): the
/// relay begins another database session on the broker connection it has, and the next
/// event goes out, without a broker reconnect.
#[tokio::test]
async fn a_relay_whose_database_session_ends_keeps_its_broker_connection() {
    let env = TestEnv::with(no_refill).await;
    seed(&env, ["s0"], 1_000_000).await;
    let mut tap = env.event_tap().await;
    let mut vars = env.process_env();
    vars.push(("CREDIT_WORKER__REFILL__ENABLED".into(), "false".into()));
    let (mut worker, http, log) =
        WorkerProcess::spawn_logged(&vars, &["run"], "warn,credit_worker=info");
    wait_status(T, http, "/readyz", 200).await;
    assert_eq!(tap.take(1, T).await.len(), 1, "the seed's event");
    // The leader's session (it holds the lead's advisory lock) and the listener's.
    let relay_sessions = "SELECT count(pg_terminate_backend(pid))::int8 FROM pg_stat_activity
          WHERE datname = current_database() AND pid <> pg_backend_pid()
            AND (query LIKE 'LISTEN %' OR pid IN (SELECT pid FROM pg_locks
                  WHERE locktype = 'advisory' AND granted
                    AND classid = 1668441444 AND objid = 1919249505 AND database =
                        (SELECT oid FROM pg_database WHERE datname = current_database())))";
    for round in 0..3 {
        let ended = env.scalar_i64(relay_sessions).await;
        assert_eq!(ended, 2, "the relay's sessions");
        let id = format!("relay-db-{round}");
        env.publish(&[body(&platform_gpt4("s0", &id))]).await;
        assert_eq!(tap.take(1, T).await.len(), 1, "{id}'s event");
    }
    wait_for(
        T,
        "three of the relay's sessions counted as ended",
        || async {
            let (_, metrics) = http_get(http, "/metrics").await.unwrap_or_default();
            let ended = metric_value(
                &metrics,
                "credit_broker_reconnects_total",
                &[("session", "outbox relay")],
            );
            ended >= 3.0
        },
    )
    .await;
    worker.sigterm();
    assert_eq!(worker.wait_exit(T).await, Some(0));
    let connected = log
        .try_iter()
        .filter(|l| l.contains("outbox relay connected"))
        .count();
    assert_eq!(connected, 1, "broker connections of the relay");
    env.assert_audit_clean().await;
    env.cleanup().await;
}

/// A database gone read-only (a failover to a standby not yet promoted) under a relay with
/// events to publish: the relay's new sessions fail before they publish, rather than send the
/// same round again at every try, `/readyz` names the relay as reconnecting, and once the
/// database takes writes every event goes out.
#[tokio::test]
async fn a_relay_on_a_read_only_database_publishes_nothing_twice() {
    let env = TestEnv::with(no_refill).await;
    seed(&env, ["r0", "r1"], 1_000_000).await;
    let mut tap = env.event_tap().await;
    let mut vars = env.process_env();
    vars.push(("CREDIT_WORKER__REFILL__ENABLED".into(), "false".into()));
    let (mut worker, http) = WorkerProcess::spawn_with_http(&vars, &["run"]);
    wait_status(T, http, "/readyz", 200).await;
    assert_eq!(tap.take(2, T).await.len(), 2, "the seed's events");
    wait_count(&env, T, "the watermark past them", UNPUBLISHED, &[], |n| {
        n == 0
    })
    .await;

    // The watermark held, so that the relay publishes a round it cannot record.
    let mut holder = connect(&env).await;
    sqlx::query("BEGIN").execute(&mut holder).await.unwrap();
    sqlx::query("SELECT 1 FROM credit.outbox_relay FOR UPDATE")
        .execute(&mut holder)
        .await
        .unwrap();
    let n = 20;
    let bodies: Vec<Vec<u8>> = (0..n)
        .map(|i| body(&platform_gpt4(&format!("r{}", i % 2), &format!("ro-{i}"))))
        .collect();
    env.publish(&bodies).await;
    env.wait_decisions(n as i64, T).await;
    // The round sent before the watermark: those committed when the relay read (a batch or
    // more of the 20), the rest left behind the watermark's update, which waits for the lock.
    let mut ids: std::collections::HashSet<String> =
        tap.take(1, T).await.into_iter().map(|e| e.1).collect();
    let admin = env.admin_pool().await;
    env.alter_database(&admin, "SET default_transaction_read_only = on")
        .await;
    env.end_worker_sessions(&admin).await;
    sqlx::query("ROLLBACK").execute(&mut holder).await.unwrap();

    let metric = |name: &'static str, labels: &'static [(&'static str, &'static str)]| async move {
        let (_, text) = http_get(http, "/metrics").await.unwrap_or_default();
        metric_value(&text, name, labels)
    };
    let relay = &[("session", "outbox relay")];
    wait_for(T, "the relay to find the database read-only", || async {
        http_get(http, "/readyz")
            .await
            .is_some_and(|(_, body)| body.contains("outbox relay: reconnecting"))
    })
    .await;
    let published = metric("credit_events_published_total", &[]).await;
    let tries = metric("credit_broker_reconnects_total", relay).await;
    wait_for(T, "three more tries of the relay", || async {
        metric("credit_broker_reconnects_total", relay).await >= tries + 3.0
    })
    .await;
    assert_eq!(
        metric("credit_events_published_total", &[]).await,
        published,
        "events published again while the watermark cannot move"
    );

    env.alter_database(&admin, "RESET default_transaction_read_only")
        .await;
    wait_for(T, "the relay to lead again", || async {
        http_get(http, "/readyz")
            .await
            .is_some_and(|(status, body)| status == 200 && !body.contains("outbox relay"))
    })
    .await;
    env.publish(&[body(&platform_gpt4("r0", "after-failover"))])
        .await;
    while !ids.iter().any(|id: &String| id.contains("after-failover")) {
        for (_, id, _) in tap.take(1, T).await {
            ids.insert(id);
        }
    }
    let decided = ids.iter().filter(|id| id.contains(":USAGE-ro-")).count();
    assert_eq!(decided, n, "every event of the 20: {ids:?}");
    worker.sigterm();
    assert_eq!(worker.wait_exit(T).await, Some(0));
    admin.close().await;
    env.assert_audit_clean().await;
    env.cleanup().await;
}

/// A subscriber's queue that is full and refuses publishes (`x-overflow: reject-publish`, a
/// length limit) gets every event once it drains, however slowly it takes them: the broker's
/// refusal (a nack) ends a round at the refused event, not the session, and the next rounds
/// resume there, inside a run of events too, sending a little more than the queue took. The
/// other subscribers wait for it (at least once for every subscriber), and get every event
/// with a few copies.
#[tokio::test]
async fn a_full_subscriber_queue_gets_every_event_as_it_drains() {
    use lapin::options::{BasicAckOptions, BasicGetOptions, QueueBindOptions, QueueDeclareOptions};
    use lapin::types::{AMQPValue, FieldTable};
    let (users, n) = (10usize, 200usize);
    let env = TestEnv::with(|s| {
        s.refill.enabled = false;
        s.pipeline.max_batch = 50;
    })
    .await;
    let mut tap = env.event_tap().await;
    // Exclusive: gone with its connection, whatever becomes of the test.
    let (_conn, ch) = env.amqp_channel().await;
    let mut args = FieldTable::default();
    args.insert("x-max-length".into(), AMQPValue::LongInt(5));
    args.insert(
        "x-overflow".into(),
        AMQPValue::LongString("reject-publish".into()),
    );
    let exclusive = QueueDeclareOptions {
        exclusive: true,
        ..Default::default()
    };
    let full = ch
        .queue_declare("".into(), exclusive, args)
        .await
        .expect("full queue");
    let (queue, events) = (full.name().as_str(), env.names.events.as_str());
    let bind = QueueBindOptions::default();
    ch.queue_bind(
        queue.into(),
        events.into(),
        "#".into(),
        bind,
        FieldTable::default(),
    )
    .await
    .expect("bind");
    seed(&env, (0..users).map(|u| format!("u{u}")), 1_000_000).await;
    let worker = credit_worker::service::Worker::start(env.settings.clone())
        .await
        .expect("worker");
    let workload: Vec<Vec<u8>> = (0..n)
        .map(|i| {
            body(&platform_gpt4(
                &format!("u{}", i % users),
                &format!("full-{i}"),
            ))
        })
        .collect();
    env.publish(&workload).await;
    env.wait_decisions(n as i64, T).await;
    let rows = env
        .scalar_i64("SELECT count(*) FROM credit.transactions")
        .await as usize;
    assert_eq!(rows, users + n);
    let refused = || metric_value(&metrics_now(), "credit_events_refused_total", &[]);
    wait_for(T, "the full queue to refuse an event", || async {
        refused() > 0.0
    })
    .await;

    // Drained as fast as it can be, five at a time.
    let deadline = std::time::Instant::now() + T;
    let mut got = std::collections::HashSet::new();
    while got.len() < rows {
        assert!(
            std::time::Instant::now() < deadline,
            "only {} of {rows} events in the full queue",
            got.len()
        );
        let taken = ch.basic_get(queue.into(), BasicGetOptions::default());
        match taken.await.expect("get") {
            Some(m) => {
                got.extend(m.properties.message_id().as_ref().map(|s| s.to_string()));
                m.ack(BasicAckOptions::default()).await.expect("ack");
            }
            // Polled as `wait_for` polls.
            None => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    let (mut seen, mut copies) = (std::collections::HashSet::new(), 0);
    while seen.len() < rows {
        let (_, id, _) = tap.take(1, T).await.remove(0);
        copies += usize::from(!seen.insert(id));
    }
    // About one a round, where ending the session at a refusal sent the whole round again
    // (about a thousand events) each time.
    assert!(copies < 2 * rows, "{copies} copies of {rows} events");
    worker.stop().await.expect("stop");
    assert_eq!(env.scalar_i64(UNPUBLISHED).await, 0);
    env.cleanup().await;
}

/// Sets the outbox's sequence back to its start, as a restore or a move by logical
/// replication that does not carry it leaves it.
async fn outbox_sequence_reset(env: &TestEnv) {
    sqlx::query("SELECT setval('credit.outbox_id_seq', 1)")
        .execute(&env.pool)
        .await
        .expect("setval");
}

/// An outbox sequence behind the ids in use is moved past them before an event takes one, at
/// start and while running, and every message is billed with its event published. Before,
/// where those ids were taken, each event's insert failed on the key and every valid message
/// was dead-lettered (`duplicate key … "outbox_pkey"`); where they were free (published rows
/// pruned), new events took ids at or below the watermark and were never published.
#[tokio::test]
async fn an_outbox_sequence_behind_its_rows_is_moved_on() {
    let env = TestEnv::with(no_refill).await;
    seed(&env, ["sq"], 1_000).await;
    let mut tap = env.event_tap().await;
    let bill = |ids: std::ops::Range<u32>| {
        let bodies: Vec<Vec<u8>> = ids
            .map(|i| body(&platform_gpt4("sq", &format!("sq-{i}"))))
            .collect();
        bodies
    };
    let worker = credit_worker::service::Worker::start(env.settings.clone())
        .await
        .unwrap();
    env.publish(&bill(0..3)).await;
    env.wait_decisions(3, T).await;
    worker.stop().await.unwrap();

    outbox_sequence_reset(&env).await;
    let worker = credit_worker::service::Worker::start(env.settings.clone())
        .await
        .unwrap();
    env.publish(&bill(3..5)).await;
    env.wait_decisions(5, T).await;
    outbox_sequence_reset(&env).await;
    env.publish(&bill(5..8)).await;
    env.wait_decisions(8, T).await;
    // The published rows pruned, so the ids below the watermark are free.
    env.wait_published(T).await;
    sqlx::query("DELETE FROM credit.outbox")
        .execute(&env.pool)
        .await
        .expect("prune");
    outbox_sequence_reset(&env).await;
    env.publish(&bill(8..10)).await;
    env.wait_decisions(10, T).await;
    for i in 0..10 {
        let outcome = env.outcome_of(&format!("sq-{i}")).await;
        assert_eq!(outcome.as_deref(), Some("charged"), "sq-{i}");
    }
    // The seed's grant (published once a worker runs) and a charge per message.
    let events = tap.take(11, T).await;
    let mut ids: Vec<&str> = events.iter().map(|(_, id, _)| id.as_str()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 11, "{ids:?}");
    tap.assert_quiet(Duration::from_millis(500)).await;
    worker.stop().await.unwrap();
    env.cleanup().await;
}
