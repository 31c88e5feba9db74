//! What tests set up and wait on: settings tweaks, users given balances, queue depths, and
//! waiting for a count in the test's database.

use std::time::Duration;

use chrono::Utc;
use credit_worker::config::Settings;
use credit_worker::ledger::TxType;
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;

use crate::helpers::{body, http_status, own_key, wait_for, TestEnv};

/// Refill off: no lazy refill, no sweep; balances are what the test gives.
pub fn no_refill(s: &mut Settings) {
    s.refill.enabled = false;
}

/// No scheduled sweep (the only tick is in 2099), so balances change only through what the
/// test does.
pub fn quiet_scheduler(s: &mut Settings) {
    s.refill.schedule = "0 0 0 1 1 * 2099".parse().expect("cron");
}

/// Gives each user `amount` credits: one GRANT keyed `SEED` per user, now.
pub async fn seed<U: AsRef<str>>(env: &TestEnv, users: impl IntoIterator<Item = U>, amount: i64) {
    let ledger = env.ledger();
    for user in users {
        let user = user.as_ref();
        ledger
            .credit(TxType::Grant, user, amount, Some("SEED"), None, Utc::now())
            .await
            .unwrap_or_else(|e| panic!("seed {user}: {e}"));
    }
}

/// Events the relay has not published yet: those after its watermark (each event of a row
/// that carries a run of them counts).
pub const UNPUBLISHED: &str = "SELECT coalesce(sum(events), 0)::int8 FROM credit.outbox
      WHERE id > (SELECT published_through FROM credit.outbox_relay)";

/// Every event in the outbox as (event_id, routing key, payload text), in publication order:
/// a row's own event, or each element of a row's run of events (migration 0009).
pub const EVENTS: &str = "SELECT CASE WHEN o.events > 1 THEN e->>'event_id' ELSE o.event_id END,
            o.routing_key, CASE WHEN o.events > 1 THEN e::text ELSE o.payload::text END
       FROM credit.outbox o
       LEFT JOIN LATERAL json_array_elements(o.run) WITH ORDINALITY AS x(e, n) ON true
      ORDER BY o.id, x.n";

/// [`EVENTS`], read.
pub async fn stored_events(env: &TestEnv) -> Vec<(String, String, String)> {
    sqlx::query_as(EVENTS)
        .fetch_all(&env.pool)
        .await
        .expect("outbox events")
}

/// Ready (not yet delivered) messages in `queue`.
pub async fn queue_depth(env: &TestEnv, queue: &str) -> u32 {
    let (_conn, ch) = env.amqp_channel().await;
    ch.queue_declare(
        queue.into(),
        QueueDeclareOptions {
            passive: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .map(|q| q.message_count())
    .unwrap_or_else(|e| panic!("{queue}: {e}"))
}

/// Polls the single count `sql` returns (with `binds` as $1, $2, …) in the test's database
/// until `done` accepts it; panics "timed out waiting for {what}" after `within`. A query that
/// fails (the database is away) counts as not done yet.
pub async fn wait_count(
    env: &TestEnv,
    within: Duration,
    what: &str,
    sql: &str,
    binds: &[&str],
    done: impl Fn(i64) -> bool,
) {
    let done = &done;
    wait_for(within, what, || async move {
        let mut query = sqlx::query_scalar::<_, i64>(sql);
        for b in binds {
            query = query.bind(*b);
        }
        query.fetch_one(&env.pool).await.is_ok_and(done)
    })
    .await;
}

/// The end of a test with an in-process worker: stop it, check the books, drop the scratch
/// database and namespace.
pub async fn stop_audit_cleanup(env: TestEnv, worker: credit_worker::service::Worker) {
    worker.stop().await.expect("stop");
    env.assert_audit_clean().await;
    env.cleanup().await;
}

/// Publishes one free entry (`flush-<user>`) per user behind everything published so far, and
/// waits for their decisions. A user's messages are decided in queue order, so from then on no
/// earlier message of these users is in flight: what it did, or did not do, is in the
/// database. (The input queue's depth says nothing of that: it counts only the messages not
/// yet delivered.)
pub async fn flush_users(env: &TestEnv, users: &[&str]) {
    let bodies: Vec<Vec<u8>> = users
        .iter()
        .map(|u| body(&own_key(u, &format!("flush-{u}"))))
        .collect();
    env.publish(&bodies).await;
    for u in users {
        let id = format!("flush-{u}");
        let sql = "SELECT count(*) FROM credit.decisions WHERE node_exec_id = $1";
        wait_count(env, Duration::from_secs(30), &id, sql, &[&id], |c| c == 1).await;
    }
}

/// Exactly `n` decisions and `n` USAGE rows of blocks (execution fees aside).
pub async fn assert_decided_and_charged(env: &TestEnv, n: i64) {
    assert_eq!(
        env.scalar_i64("SELECT count(*) FROM credit.decisions")
            .await,
        n
    );
    assert_eq!(
        env.scalar_i64(
            "SELECT count(*) FROM credit.transactions WHERE transaction_key LIKE 'USAGE-%'"
        )
        .await,
        n
    );
}

/// Waits until `GET path` answers `status`.
pub async fn wait_status(within: std::time::Duration, port: u16, path: &str, status: u16) {
    wait_for(within, &format!("{path} {status}"), || async move {
        http_status(port, path).await == status
    })
    .await;
}
