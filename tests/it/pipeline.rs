//! Decision transactions in flight together (`pipeline.in_flight`): a user's messages are
//! applied in delivery order whatever the batches' commit order, a batch that shared a user
//! with a failed earlier one is rolled back and decided again after it, and the consumer acks
//! in delivery order.

use chrono::{DateTime, Utc};
use credit_worker::cost::CostTable;
use credit_worker::decide::{self, DecideError, Outcome, Turn, Verdict};
use credit_worker::message::{self, NodeExecutionEntry};
use credit_worker::service::Worker;

use crate::fixtures::*;
use crate::helpers::*;

const T: std::time::Duration = std::time::Duration::from_secs(30);

fn entry_of(user: &str, id: &str) -> NodeExecutionEntry {
    message::decode(&body(&platform_gpt4(user, id))).unwrap()
}

fn charged(balance: i64) -> Verdict {
    Verdict::Decided {
        outcome: Outcome::Charged,
        cost: 10,
        fee: 0,
        uncollected: 0,
        balance,
    }
}

/// Decides `entries` in `turn` on a task of its own.
fn spawn_decide(
    env: &TestEnv,
    entries: Vec<NodeExecutionEntry>,
    turn: Turn,
    now: DateTime<Utc>,
) -> tokio::task::JoinHandle<Result<Vec<Verdict>, DecideError>> {
    let pricing = env.settings.pricing(CostTable::builtin().unwrap());
    let pool = env.pool.clone();
    tokio::spawn(async move { decide::decide_in_turn(&pool, &pricing, &entries, now, turn).await })
}

/// The node executions charged to `user`, in ledger order.
async fn usage_order(env: &TestEnv, user: &str) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT substr(transaction_key, 7) FROM credit.transactions
          WHERE user_id = $1 AND type = 'USAGE' ORDER BY seq",
    )
    .bind(user)
    .fetch_all(&env.pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn a_later_batch_sharing_a_user_waits_for_the_earlier_one() {
    let env = TestEnv::with(no_refill).await;
    seed(&env, ["u"], 15).await;
    seed(&env, ["v"], 100).await;
    let now = Utc::now();
    let (first, f1) = Turn::after([]);
    let (second, _) = Turn::after([&f1]);
    // The later batch starts first; its turn keeps it behind the earlier one, which alone
    // can pay for one charge of u's.
    let later = spawn_decide(
        &env,
        vec![entry_of("u", "b"), entry_of("v", "c")],
        second,
        now,
    );
    let earlier = spawn_decide(&env, vec![entry_of("u", "a")], first, now);
    assert_eq!(earlier.await.unwrap().unwrap(), vec![charged(5)]);
    let rejected = Verdict::Decided {
        outcome: Outcome::Rejected,
        cost: 10,
        fee: 0,
        uncollected: 0,
        balance: 5,
    };
    assert_eq!(later.await.unwrap().unwrap(), vec![rejected, charged(90)]);
    assert_eq!(usage_order(&env, "u").await, ["a"]);
    env.assert_audit_clean().await;
    env.cleanup().await;
}

#[tokio::test]
async fn a_batch_sharing_a_user_with_a_failed_earlier_one_is_rolled_back() {
    let env = TestEnv::with(no_refill).await;
    seed(&env, ["u", "w"], 100).await;
    let now = Utc::now();
    let pricing = env.settings.pricing(CostTable::builtin().unwrap());
    decide::decide_batch(&env.pool, &pricing, &[entry_of("u", "a")], now)
        .await
        .unwrap();

    let (first, f1) = Turn::after([]);
    let (second, f2) = Turn::after([&f1]);
    let (third, _) = Turn::after([&f1, &f2]);
    // In a pipeline the redelivered "a" fails the first batch (it is decided again alone);
    // the second took u's lock after the first rolled back, so it must roll back too; the
    // third shares no user with either and commits.
    let one = spawn_decide(
        &env,
        vec![entry_of("u", "a"), entry_of("u", "x")],
        first,
        now,
    );
    let two = spawn_decide(&env, vec![entry_of("u", "y")], second, now);
    let three = spawn_decide(&env, vec![entry_of("w", "z")], third, now);
    assert!(matches!(one.await.unwrap(), Err(DecideError::Race)));
    assert!(matches!(two.await.unwrap(), Err(DecideError::Reordered)));
    assert_eq!(three.await.unwrap().unwrap(), vec![charged(90)]);
    assert_eq!(usage_order(&env, "u").await, ["a"]);
    assert_eq!(env.ledger().balance("u", now).await.unwrap(), 90);

    // Decided again alone, in delivery order.
    let redo = [entry_of("u", "a"), entry_of("u", "x")];
    let v = decide::decide_batch(&env.pool, &pricing, &redo, now)
        .await
        .unwrap();
    assert_eq!(
        v,
        vec![Verdict::Duplicate { conflicting: false }, charged(80)]
    );
    let v = decide::decide_batch(&env.pool, &pricing, &[entry_of("u", "y")], now)
        .await
        .unwrap();
    assert_eq!(v, vec![charged(70)]);
    assert_eq!(usage_order(&env, "u").await, ["a", "x", "y"]);
    env.assert_audit_clean().await;
    env.cleanup().await;
}

/// Small batches, several in flight: each user's first ten messages in publish order are the
/// ones charged, whatever order the batches commit in.
#[tokio::test]
async fn through_the_queue_a_users_messages_are_decided_in_publish_order() {
    let env = TestEnv::with(|s| {
        no_refill(s);
        s.pipeline.max_batch = 4;
        s.pipeline.in_flight = 3;
        s.execution_fee.every = 0;
    })
    .await;
    let users = ["p", "q", "r"];
    seed(&env, users, 105).await;
    let worker = Worker::start(env.settings.clone()).await.unwrap();
    let ids: Vec<(String, String)> = (0..60)
        .map(|i| (users[i % 3].to_owned(), format!("m-{i:02}")))
        .collect();
    let bodies: Vec<Vec<u8>> = ids
        .iter()
        .map(|(u, id)| body(&platform_gpt4(u, id)))
        .collect();
    env.publish(&bodies).await;
    env.wait_decisions(60, T).await;
    worker.stop().await.unwrap();
    assert_eq!(queue_depth(&env, &env.names.input_queue).await, 0);
    for user in users {
        let mine: Vec<&str> = ids
            .iter()
            .filter(|(u, _)| u == user)
            .map(|(_, id)| id.as_str())
            .collect();
        assert_eq!(usage_order(&env, user).await, mine[..10]);
        for id in &mine[10..] {
            assert_eq!(
                env.outcome_of(id).await.as_deref(),
                Some("rejected"),
                "{id}"
            );
        }
        assert_eq!(env.ledger().balance(user, Utc::now()).await.unwrap(), 5);
    }
    env.assert_audit_clean().await;
    env.cleanup().await;
}

/// Redeliveries spread over small batches in flight: each failed try is decided again alone,
/// after the batches in flight with it, and every execution is charged once.
#[tokio::test]
async fn redeliveries_in_a_pipeline_are_duplicates_and_nothing_is_charged_twice() {
    let env = TestEnv::with(|s| {
        no_refill(s);
        s.pipeline.max_batch = 3;
        s.execution_fee.every = 0;
    })
    .await;
    let users = ["d", "e"];
    seed(&env, users, 1000).await;
    let worker = Worker::start(env.settings.clone()).await.unwrap();
    let first: Vec<Vec<u8>> = (0..20)
        .map(|i| body(&platform_gpt4(users[i % 2], &format!("n-{i:02}"))))
        .collect();
    env.publish(&first).await;
    env.wait_decisions(20, T).await;
    // Every old one again, each followed by a new one.
    let mixed: Vec<Vec<u8>> = (0..20)
        .flat_map(|i| {
            [
                body(&platform_gpt4(users[i % 2], &format!("n-{i:02}"))),
                body(&platform_gpt4(users[i % 2], &format!("n-{:02}", 20 + i))),
            ]
        })
        .collect();
    env.publish(&mixed).await;
    env.wait_decisions(40, T).await;
    // Every redelivery is acked too: once the worker's channel is closed, nothing comes back.
    wait_for(T, "the events of 40 charges", || async {
        env.scalar_i64(UNPUBLISHED).await == 0
            && env
                .scalar_i64("SELECT sum(events)::int8 FROM credit.outbox")
                .await
                == 42
    })
    .await;
    worker.stop().await.unwrap();
    assert_eq!(queue_depth(&env, &env.names.input_queue).await, 0);
    for user in users {
        assert_eq!(env.ledger().balance(user, Utc::now()).await.unwrap(), 800);
        let order = usage_order(&env, user).await;
        let parity = usize::from(user == "e");
        let expected: Vec<String> = (0..40)
            .filter(|i| i % 2 == parity)
            .map(|i| format!("n-{i:02}"))
            .collect();
        // The new ones in publish order after the old ones.
        assert_eq!(order, expected);
    }
    env.assert_audit_clean().await;
    env.cleanup().await;
}
