//! The RabbitMQ permissions recipe in README.md ("RabbitMQ permissions"), applied as written to
//! users made for the test: the worker runs on its own rights, the executor's node executions
//! are billed, the payment side reads events and gets command replies, and the broker refuses
//! the executor what the recipe does not give it.

use std::time::Duration;

use credit_worker::service::Worker;
use futures::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicGetOptions, BasicNackOptions, BasicPublishOptions,
    ConfirmSelectOptions, QueueBindOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection};
use serde_json::{json, Value};

use crate::fixtures::*;
use crate::helpers::*;

const T: Duration = Duration::from_secs(30);

/// The recipe: the README's shell block that sets the permissions.
fn recipe() -> String {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("README.md");
    let start = readme
        .find("```sh\nworker=${WORKER")
        .expect("README: the permissions recipe");
    let body = &readme[start + "```sh\n".len()..];
    body[..body.find("```").expect("the recipe's end")].to_owned()
}

/// Broker users made for one test, deleted when it ends (passed or failed).
struct Users {
    worker: String,
    executor: String,
    payments: String,
}

const PASSWORD: &str = "access-test-password";

impl Users {
    /// Applies the recipe with `namespace` (regex-escaped). None when bash cannot be run; a
    /// recipe that fails (no `rabbitmqctl` on this host, say) fails the test.
    fn apply(namespace: &str) -> Option<Users> {
        let tag = unique("cw").replace('_', "-");
        let users = Users {
            worker: format!("{tag}-worker"),
            executor: format!("{tag}-executor"),
            payments: format!("{tag}-payments"),
        };
        let status = std::process::Command::new("bash")
            .arg("-euo")
            .arg("pipefail")
            .arg("-c")
            .arg(recipe())
            .env("WORKER", &users.worker)
            .env("EXECUTOR", &users.executor)
            .env("PAYMENTS", &users.payments)
            .env("NS", namespace.replace('.', "\\."))
            .env("WORKER_PASSWORD", PASSWORD)
            .env("EXECUTOR_PASSWORD", PASSWORD)
            .env("PAYMENTS_PASSWORD", PASSWORD)
            .stdout(std::process::Stdio::null())
            .status()
            .ok()?;
        assert!(status.success(), "the recipe failed: {status}");
        Some(users)
    }

    /// The recipe's users for `env`'s namespace; None, the test skipped, where the broker is
    /// not on this machine.
    fn here(env: &TestEnv) -> Option<Users> {
        let users = broker_is_local(&env.settings.amqp.url)
            .then(|| Users::apply(&env.settings.amqp.namespace))
            .flatten();
        if users.is_none() {
            skip("the broker is not on this machine");
        }
        users
    }

    /// The test broker's URL (its host, port and vhost) with `user` logging in.
    fn url(base: &str, user: &str) -> String {
        let mut url = url::Url::parse(base).expect("the test's AMQP URL");
        url.set_username(user).expect("a URL with a host");
        url.set_password(Some(PASSWORD)).expect("a URL with a host");
        url.to_string()
    }
}

impl Drop for Users {
    fn drop(&mut self) {
        for user in [&self.worker, &self.executor, &self.payments] {
            let _ = std::process::Command::new("rabbitmqctl")
                .args(["delete_user", user])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status();
        }
    }
}

async fn open(env: &TestEnv, user: &str) -> (Connection, Channel) {
    let mut amqp = env.settings.amqp.clone();
    amqp.url = Users::url(&env.settings.amqp.url, user);
    let conn = credit_worker::amqp::connect(&amqp, "access test")
        .await
        .unwrap_or_else(|e| panic!("{user} connects: {e}"));
    let ch = conn.create_channel().await.expect("channel");
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    (conn, ch)
}

/// Publishes with confirms as `user`; true when the broker acked.
async fn publish(
    ch: &Channel,
    exchange: &str,
    key: &str,
    body: &[u8],
    props: BasicProperties,
) -> bool {
    let Ok(confirm) = ch
        .basic_publish(
            exchange.into(),
            key.into(),
            BasicPublishOptions::default(),
            body,
            props,
        )
        .await
    else {
        return false;
    };
    matches!(confirm.await, Ok(c) if c.is_ack())
}

/// A server-named queue of `user`'s, consumed without acks.
async fn private_consumer(ch: &Channel) -> (String, lapin::Consumer) {
    let queue = credit_worker::amqp::topology::declare_private_queue(ch)
        .await
        .expect("a server-named queue");
    let opts = BasicConsumeOptions {
        no_ack: true,
        ..Default::default()
    };
    let consumer = ch
        .basic_consume(
            queue.as_str().into(),
            "".into(),
            opts,
            FieldTable::default(),
        )
        .await
        .expect("consume");
    (queue, consumer)
}

async fn next_json(consumer: &mut lapin::Consumer) -> Value {
    let d = tokio::time::timeout(T, consumer.next())
        .await
        .expect("a message in time")
        .expect("stream")
        .expect("delivery");
    serde_json::from_slice(&d.data).expect("JSON")
}

#[tokio::test]
async fn each_role_works_with_exactly_the_recipes_rights() {
    let env = TestEnv::with(no_refill).await;
    let Some(users) = Users::here(&env) else {
        return env.cleanup().await;
    };
    seed(&env, ["alice"], 100).await;
    let mut settings = env.settings.clone();
    settings.amqp.url = Users::url(&env.settings.amqp.url, &users.worker);
    settings.amqp.allowed_producers = vec![users.executor.clone()];
    settings.control.allowed_users = vec![users.payments.clone()];
    let worker = Worker::start(settings).await.expect("the worker starts");
    wait_for(T, "the worker consuming", || async {
        worker.health.consuming()
    })
    .await;
    // The seed's event out first, so that the payment side's queue gets alice's charge first.
    env.wait_published(T).await;

    // The payment side follows alice's balance on a queue of its own.
    let (_pconn, pch) = open(&env, &users.payments).await;
    let (events_queue, mut events) = private_consumer(&pch).await;
    pch.queue_bind(
        events_queue.as_str().into(),
        env.names.events.as_str().into(),
        "balance.changed".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("the payment side binds to credit.events");

    // The executor publishes to the input exchange under its own name, and is billed.
    let (_econn, ech) = open(&env, &users.executor).await;
    let entry = body(&platform_gpt4("alice", "access-1"));
    let as_executor =
        credit_worker::amqp::persistent_json().with_user_id(users.executor.as_str().into());
    let input = env.names.input_exchange.as_str();
    assert!(publish(&ech, input, "node_execution", &entry, as_executor.clone()).await);
    env.wait_decisions(1, T).await;
    let event = next_json(&mut events).await;
    assert_eq!(event["transaction_key"], "USAGE-access-1", "{event}");
    assert_eq!(event["balance"], 90, "{event}");

    // What the executor sends that cannot be billed is dead-lettered by the worker, which may
    // not publish the executor's user_id: the copy is the worker's, the executor named in a
    // header, and the rest is as sent.
    let with_trace = as_executor
        .clone()
        .with_message_id("bad-1".into())
        .with_headers(FieldTable::from(std::collections::BTreeMap::from([(
            "trace".into(),
            lapin::types::AMQPValue::LongString("t-1".into()),
        )])));
    assert!(publish(&ech, input, "node_execution", b"{nope", with_trace).await);
    let dead = env.dead_messages(1).await;
    let (body, props) = &dead[0];
    assert_eq!(body.as_slice(), b"{nope");
    assert_eq!(
        props.user_id().as_ref().map(|u| u.as_str()),
        Some(users.worker.as_str())
    );
    assert_eq!(
        header_text(props, credit_worker::amqp::PRODUCER_HEADER),
        Some(users.executor.clone())
    );
    assert_eq!(header_text(props, "trace").as_deref(), Some("t-1"));
    assert!(header_text(props, "x-credit-error").is_some_and(|r| r.starts_with("body: ")));
    assert_eq!(
        props.message_id().as_ref().map(|m| m.as_str()),
        Some("bad-1")
    );
    assert_eq!(props.delivery_mode(), &Some(2));

    // The payment side asks for alice's balance and gets the reply.
    let (reply_queue, mut replies) = private_consumer(&pch).await;
    let command =
        serde_json::to_vec(&json!({"command": "balance", "user_id": "alice"})).expect("json");
    let as_payments = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_user_id(users.payments.as_str().into())
        .with_reply_to(reply_queue.as_str().into())
        .with_correlation_id("access-balance".into());
    assert!(publish(&pch, "", &env.names.control, &command, as_payments).await);
    let reply = next_json(&mut replies).await;
    assert_eq!(reply["ok"], true, "{reply}");
    assert_eq!(reply["result"]["balance"], 90, "{reply}");

    // The executor has no right on the default exchange: it cannot reach the control queue
    // (nor the input queue that way); the broker closes its channel.
    assert!(!publish(&ech, "", &env.names.control, &command, as_executor).await);
    assert!(
        !ech.status().connected(),
        "the executor's channel is closed"
    );

    worker.stop().await.expect("the worker stops cleanly");
    replayed_dead_letters_are_billed_as_their_producers(&env, &users).await;
    env.assert_audit_clean().await;
    drop(users);
    env.cleanup().await;
}

/// A valid message of the executor's that the broker dead-letters (over the delivery limit,
/// as after a long outage) keeps the executor's user_id. Replayed with the worker's
/// credentials, as the runbook has it, the copy is the worker's with the executor named in
/// the header, which the worker's own user vouches for: it is billed.
async fn replayed_dead_letters_are_billed_as_their_producers(env: &TestEnv, users: &Users) {
    let (_econn, ech) = open(env, &users.executor).await;
    let late = body(&platform_gpt4("alice", "access-2"));
    let before = chrono::Utc::now();
    let as_executor =
        credit_worker::amqp::persistent_json().with_user_id(users.executor.as_str().into());
    let input = env.names.input_exchange.as_str();
    assert!(publish(&ech, input, "node_execution", &late, as_executor).await);
    // Returned until the broker gives up on it (amqp.delivery_limit = 5).
    let (_conn, ch) = env.amqp_channel().await;
    for _ in 0..20 {
        let get = BasicGetOptions { no_ack: false };
        let got = ch
            .basic_get(env.names.input_queue.as_str().into(), get)
            .await
            .expect("basic.get");
        let Some(m) = got else { break };
        let requeue = BasicNackOptions {
            requeue: true,
            ..Default::default()
        };
        m.delivery.nack(requeue).await.expect("nack");
    }
    // The broker moves it to the dead queue on its own time.
    let dead = env.names.dead_queue.clone();
    wait_for(T, "the dead letter", || {
        let dead = dead.clone();
        async move { queue_depth(env, &dead).await == 1 }
    })
    .await;
    let listed = credit_worker::tools::dead_letters::list(&env.settings, 10)
        .await
        .expect("list");
    assert_eq!(listed.messages[0].reason, "delivery_limit (broker)");
    assert_died_within(listed.messages[0].died_at, before, chrono::Utc::now());
    let mut replay = std::process::Command::new(binary());
    replay
        .args([
            "dead-letters",
            "replay",
            "--node-exec-id",
            "access-2",
            "--json",
        ])
        .env_remove("CREDIT_WORKER_CONFIG")
        .envs(env.process_env())
        .env(
            "AMQP_URL",
            Users::url(&env.settings.amqp.url, &users.worker),
        );
    let out = replay.output().expect("run the replay");
    let report: Value = serde_json::from_slice(&out.stdout).expect("the replay's report");
    assert_eq!(report["replayed"], 1, "{report}");
    let mut settings = env.settings.clone();
    settings.amqp.url = Users::url(&env.settings.amqp.url, &users.worker);
    settings.amqp.allowed_producers = vec![users.executor.clone()];
    let worker = Worker::start(settings).await.expect("the worker starts");
    env.wait_decisions(2, T).await;
    assert_eq!(env.outcome_of("access-2").await.as_deref(), Some("charged"));
    worker.stop().await.expect("the worker stops cleanly");
}

/// A broker user set up for a build before the namespace's mark (the recipe's rights
/// without `credit.ledger`): the worker warns and bills on, unguarded, rather than stop
/// billing at the upgrade.
#[tokio::test]
async fn a_worker_without_rights_on_the_mark_bills_on() {
    let env = TestEnv::with(no_refill).await;
    let Some(users) = Users::here(&env) else {
        return env.cleanup().await;
    };
    let ns = env.settings.amqp.namespace.replace('.', "\\.");
    let vhost = vhost_of(&env.settings.amqp.url);
    let status = std::process::Command::new("rabbitmqctl")
        .args(["set_permissions", "-p", &vhost, &users.worker])
        .arg(format!(
            "^{ns}(node_execution(\\.dlx|\\.dead)?|credit\\.(events|control))$"
        ))
        .arg(format!(
            "^(amq\\.default|{ns}(node_execution(\\.dlx|\\.dead)?|credit\\.events))$"
        ))
        .arg(format!(
            "^{ns}(node_execution(\\.dlx|\\.dead)?|credit\\.control)$"
        ))
        .stdout(std::process::Stdio::null())
        .status()
        .expect("rabbitmqctl");
    assert!(status.success());
    seed(&env, ["bob"], 100).await;
    let mut settings = env.settings.clone();
    settings.amqp.url = Users::url(&env.settings.amqp.url, &users.worker);
    let worker = Worker::start(settings).await.expect("the worker starts");
    env.publish(&[body(&platform_gpt4("bob", "unmarked-1"))])
        .await;
    env.wait_decisions(1, T).await;
    assert_eq!(
        env.outcome_of("unmarked-1").await.as_deref(),
        Some("charged")
    );
    assert!(worker.health.consuming());
    worker.stop().await.expect("stops cleanly");
    drop(users);
    env.cleanup().await;
}
