//! The running service through the real broker: charging, duplicates, rejections, dead
//! letters, events, graceful stop and SIGKILL restarts.

use std::collections::HashMap;
use std::time::Duration;

use chrono::{TimeZone, Utc};
use credit_worker::clock::ManualClock;
use credit_worker::ledger::TxType;
use credit_worker::service::Worker;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use crate::fixtures::*;
use crate::helpers::*;

const T: Duration = Duration::from_secs(30);

#[tokio::test]
async fn usage_through_the_queue_charges_10_and_own_key_is_free() {
    // Refill on with the default schedule: the worker's start-up catch-up sweeps.
    let _sweeps = SWEEPS.share().await;
    let env = TestEnv::new().await;
    let mut tap = env.event_tap().await;
    let worker = Worker::start(env.settings.clone()).await.unwrap();
    env.publish(&[
        body(&platform_gpt4("u1", "ne-1")),
        body(&own_key("u1", "ne-2")),
    ])
    .await;
    env.wait_decisions(2, T).await;
    let events = tap.take(2, T).await;
    // The lazy refill of a new user, then the charge.
    assert_eq!(events[0].0, "balance.changed");
    assert_eq!(events[0].2["transaction_type"], "GRANT");
    assert_eq!(events[0].2["balance"], 1000);
    let charge = &events[1].2;
    assert_eq!(events[1].0, "balance.changed");
    assert_eq!(charge["amount"], -10);
    assert_eq!(charge["balance"], 990);
    assert_eq!(charge["seq"], 2);
    assert_eq!(charge["transaction_type"], "USAGE");
    assert_eq!(charge["transaction_key"], "USAGE-ne-1");
    assert_eq!(charge["node_exec_id"], "ne-1");
    assert_eq!(charge["graph_exec_id"], "ge-ne-1");
    assert_eq!(charge["user_id"], "u1");
    assert_eq!(events[1].1, charge["event_id"].as_str().unwrap());
    assert!(chrono::DateTime::parse_from_rfc3339(charge["occurred_at"].as_str().unwrap()).is_ok());
    tap.assert_quiet(Duration::from_millis(500)).await;
    assert_eq!(env.outcome_of("ne-1").await.as_deref(), Some("charged"));
    assert_eq!(env.outcome_of("ne-2").await.as_deref(), Some("free"));
    assert_eq!(env.ledger().balance("u1", Utc::now()).await.unwrap(), 990);
    worker.stop().await.unwrap();
    env.assert_audit_clean().await;
    env.cleanup().await;
}

/// Ids of the longest a message may carry: the event id they would make is over AMQP's 255
/// bytes for `message_id`, so it is the digest form, the same in the body, the properties,
/// the outbox and the audit's reckoning.
#[tokio::test]
async fn the_longest_ids_make_an_event_id_that_fits_message_id() {
    use sha2::Digest;
    let env = TestEnv::with(no_refill).await;
    let (user, id) = ("u".repeat(255), "n".repeat(255));
    seed(&env, [user.as_str()], 100).await;
    let mut tap = env.event_tap().await;
    let worker = Worker::start(env.settings.clone()).await.unwrap();
    let mut entry = platform_gpt4(&user, &id);
    entry["graph_exec_id"] = "g".repeat(255).into();
    env.publish(&[body(&entry)]).await;
    let events = tap.take(2, T).await;
    let long = format!("balance.changed:{user}:USAGE-{id}");
    let digest: String = sha2::Sha256::digest(long.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let expected = format!("balance.changed:%sha256:{digest}");
    assert_eq!(events[1].2["transaction_key"], format!("USAGE-{id}"));
    assert_eq!(events[1].2["event_id"], expected.as_str());
    assert_eq!(events[1].1, expected);
    assert!(events
        .iter()
        .all(|e| e.1.len() <= 255 && e.1 == e.2["event_id"]));
    worker.stop().await.unwrap();
    env.assert_audit_clean().await;
    env.cleanup().await;
}

#[tokio::test]
async fn the_same_node_exec_id_five_times_charges_once() {
    let env = TestEnv::with(no_refill).await;
    seed(&env, ["dup"], 100).await;
    let mut tap = env.event_tap().await;
    let worker = Worker::start(env.settings.clone()).await.unwrap();
    let b = body(&platform_gpt4("dup", "ne-dup"));
    // Two publishes now, three more once the first decision exists (across batches).
    env.publish(&[b.clone(), b.clone()]).await;
    env.wait_decisions(1, T).await;
    env.publish(&[b.clone(), b.clone(), b.clone()]).await;
    // A conflicting duplicate: same id, another user. The first decision stands.
    env.publish(&[body(&platform_gpt4("someone-else", "ne-dup"))])
        .await;
    let events = tap.take(2, T).await;
    assert_eq!(events[0].2["transaction_key"], "SEED");
    assert_eq!(events[1].2["transaction_key"], "USAGE-ne-dup");
    flush_users(&env, &["dup", "someone-else"]).await;
    assert_eq!(
        env.scalar_i64("SELECT count(*) FROM credit.transactions WHERE type = 'USAGE'")
            .await,
        1
    );
    // No event beyond the two.
    assert_eq!(stored_events(&env).await.len(), 2);
    assert_eq!(env.ledger().balance("dup", Utc::now()).await.unwrap(), 90);
    assert_eq!(
        env.scalar_i64("SELECT count(*) FROM credit.transactions WHERE user_id = 'someone-else'")
            .await,
        0
    );
    worker.stop().await.unwrap();
    env.assert_audit_clean().await;
    env.cleanup().await;
}

#[tokio::test]
async fn balance_15_and_three_charges_of_10() {
    let env = TestEnv::with(no_refill).await;
    seed(&env, ["poor"], 15).await;
    let mut tap = env.event_tap().await;
    let worker = Worker::start(env.settings.clone()).await.unwrap();
    env.publish(&[
        body(&platform_gpt4("poor", "p-1")),
        body(&platform_gpt4("poor", "p-2")),
        body(&platform_gpt4("poor", "p-3")),
    ])
    .await;
    env.wait_decisions(3, T).await;
    assert_eq!(env.outcome_of("p-1").await.as_deref(), Some("charged"));
    assert_eq!(env.outcome_of("p-2").await.as_deref(), Some("rejected"));
    assert_eq!(env.outcome_of("p-3").await.as_deref(), Some("rejected"));
    let events = tap.take(4, T).await;
    let kinds: Vec<&str> = events.iter().map(|e| e.0.as_str()).collect();
    assert_eq!(
        kinds,
        [
            "balance.changed",
            "balance.changed",
            "charge.rejected",
            "charge.rejected"
        ]
    );
    assert_eq!(events[1].2["balance"], 5);
    for (i, id) in [(2, "p-2"), (3, "p-3")] {
        let e = &events[i].2;
        assert_eq!(e["node_exec_id"], id);
        assert_eq!(e["cost"], 10);
        assert_eq!(e["balance"], 5);
        assert_eq!(e["graph_exec_id"], format!("ge-{id}"));
        assert_eq!(events[i].1, format!("charge.rejected:{id}"));
    }
    tap.assert_quiet(Duration::from_millis(500)).await;
    assert_eq!(env.ledger().balance("poor", Utc::now()).await.unwrap(), 5);
    worker.stop().await.unwrap();
    env.assert_audit_clean().await;
    env.cleanup().await;
}

#[tokio::test]
async fn invalid_messages_are_dead_lettered_with_a_reason_and_the_next_is_processed() {
    let env = TestEnv::with(no_refill).await;
    seed(&env, ["v"], 100).await;
    let worker = Worker::start(env.settings.clone()).await.unwrap();
    let mut missing = platform_gpt4("v", "bad-2");
    missing.as_object_mut().unwrap().remove("user_id");
    let mut wrong_type = platform_gpt4("v", "bad-3");
    wrong_type["inputs"] = json!("a string");
    let mut oversize = platform_gpt4("v", "bad-4");
    oversize["inputs"]["prompt"] = json!("x".repeat(1024 * 1024 + 10));
    let bodies = vec![
        b"this is not json".to_vec(),
        body(&missing),
        body(&wrong_type),
        body(&oversize),
        body(&platform_gpt4("v", "good-1")),
    ];
    env.publish(&bodies).await;
    env.wait_decisions(1, T).await;
    let dead = env.dead_letters(4).await;
    let reasons: Vec<&str> = dead.iter().map(|(_, r)| r.as_str()).collect();
    assert!(
        reasons[0].starts_with("body: not valid JSON"),
        "{reasons:?}"
    );
    assert_eq!(reasons[1], "user_id: missing");
    assert!(
        reasons[2].starts_with("inputs: expected an object"),
        "{reasons:?}"
    );
    assert!(reasons[3].starts_with("body: "), "{reasons:?}");
    assert!(reasons[3].contains("1 MiB"), "{reasons:?}");
    // Bodies are unchanged.
    assert_eq!(dead[0].0, bodies[0]);
    assert_eq!(dead[3].0.len(), bodies[3].len());
    assert_eq!(env.outcome_of("good-1").await.as_deref(), Some("charged"));
    assert_eq!(
        env.scalar_i64("SELECT count(*) FROM credit.decisions")
            .await,
        1
    );
    worker.stop().await.unwrap();
    env.assert_audit_clean().await;
    env.cleanup().await;
}

/// The `publish` tool signs its messages with the broker user it connects as, so a worker
/// that bills only listed producers bills them when that user is listed.
#[tokio::test]
async fn the_publish_tool_is_a_producer_like_any_other() {
    let env = TestEnv::with(|s| {
        no_refill(s);
        let uri: lapin::uri::AMQPUri = s.amqp.url.parse().expect("AMQP URL");
        s.amqp.allowed_producers = vec![uri.authority.userinfo.username];
    })
    .await;
    seed(&env, ["p"], 100).await;
    let worker = Worker::start(env.settings.clone()).await.unwrap();
    env.publish(&[body(&platform_gpt4("p", "pt-1"))]).await;
    env.wait_decisions(1, T).await;
    assert_eq!(env.outcome_of("pt-1").await.as_deref(), Some("charged"));
    worker.stop().await.unwrap();
    env.cleanup().await;
}

/// An invalid message whose headers fill a frame, leaving no room for the reason, is
/// dead-lettered by the broker rather than copied: a copy would end the connection, and the
/// message, redelivered with its count added, could no longer be read, holding up every
/// message behind it until the delivery limit (tens of seconds). Last in its batch, it leaves
/// the batch's ack to the delivery before it: no session ends, nothing is delivered twice.
#[tokio::test]
async fn a_dead_letter_too_large_to_copy_is_left_to_the_broker() {
    use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
    use lapin::types::{AMQPValue, FieldTable};
    let env = TestEnv::with(no_refill).await;
    seed(&env, ["big"], 100).await;
    let mut vars = env.process_env();
    vars.push(("CREDIT_WORKER__REFILL__ENABLED".into(), "false".into()));
    let (mut worker, http) = WorkerProcess::spawn_with_http(&vars, &["run"]);
    wait_status(T, http, "/readyz", 200).await;
    let (_conn, ch) = env.amqp_channel().await;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm mode");
    // The properties fit RabbitMQ's 128 KiB frame with some 20 bytes to spare.
    let mut headers = FieldTable::default();
    headers.insert(
        "x-padding".into(),
        AMQPValue::LongString("p".repeat(130_990).into()),
    );
    let props = credit_worker::amqp::persistent_json()
        .with_headers(headers)
        .with_message_id("m-big".into());
    env.publish(&[body(&platform_gpt4("big", "before-big"))])
        .await;
    let confirm = ch
        .basic_publish(
            "".into(),
            env.names.input_queue.as_str().into(),
            BasicPublishOptions::default(),
            b"not json",
            props,
        )
        .await
        .expect("publish");
    assert!(confirm.await.expect("confirm").is_ack());
    env.publish(&[body(&platform_gpt4("big", "after-big"))])
        .await;
    // Decided at once, not after the delivery limit's round of reconnections.
    env.wait_decisions(2, Duration::from_secs(10)).await;
    // Not read back: with the broker's `x-death` added, its properties no longer fit a frame.
    wait_for(T, "the dead letter", || async {
        let q = ch
            .queue_declare(
                env.names.dead_queue.as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("dead queue");
        q.message_count() == 1
    })
    .await;
    let (_, metrics) = http_get(http, "/metrics").await.unwrap_or_default();
    let value = |name, labels| metric_value(&metrics, name, labels);
    assert_eq!(
        value("credit_broker_reconnects_total", &[("session", "consumer")]),
        0.0
    );
    assert_eq!(
        value("credit_messages_total", &[("outcome", "duplicate")]),
        0.0
    );
    assert_eq!(
        value("credit_messages_total", &[("outcome", "invalid")]),
        1.0
    );
    worker.sigterm();
    assert_eq!(worker.wait_exit(T).await, Some(0));
    env.cleanup().await;
}

/// A dead letter loses the TTL it was sent with (as RabbitMQ's own dead-lettering does), so it
/// stays in the dead queue; its other properties are kept.
#[tokio::test]
async fn a_dead_letter_does_not_expire_with_its_message_ttl() {
    use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
    let env = TestEnv::with(no_refill).await;
    let worker = Worker::start(env.settings.clone()).await.unwrap();
    let (_conn, ch) = env.amqp_channel().await;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm mode");
    let props = credit_worker::amqp::persistent_json()
        .with_expiration("60000".into())
        .with_message_id("m-ttl".into());
    let confirm = ch
        .basic_publish(
            "".into(),
            env.names.input_queue.as_str().into(),
            BasicPublishOptions::default(),
            b"not json",
            props,
        )
        .await
        .expect("publish");
    assert!(confirm.await.expect("confirm").is_ack());
    let dead = env.dead_messages(1).await;
    let (_, props) = &dead[0];
    assert_eq!(props.expiration(), &None);
    assert_eq!(
        props.message_id().as_ref().map(|m| m.as_str()),
        Some("m-ttl")
    );
    assert_eq!(props.delivery_mode(), &Some(2));
    worker.stop().await.unwrap();
    env.cleanup().await;
}

/// A dead-letter queue that refuses publishes when full (a policy: `max-length` 1 with
/// `overflow: reject-publish`) is waited for: the consumer keeps its session, `/readyz` names
/// the wait, each refusal is counted, and as the queue is given room every letter goes in
/// once and the valid message behind them is charged once. Ending the session at the
/// refusal, as before, brought the batch back with its delivery count raised, until the
/// delivery limit dead-lettered valid messages too.
#[tokio::test]
async fn a_full_dead_letter_queue_that_refuses_is_waited_for() {
    let env = TestEnv::with(no_refill).await;
    let limit = r#"{"max-length":1,"overflow":"reject-publish"}"#;
    let url = &env.settings.amqp.url;
    let Some(_policy) = Policy::on_queue(url, &env.names.dead_queue, limit) else {
        skip("the broker is not on this machine");
        return env.cleanup().await;
    };
    seed(&env, ["full"], 100).await;
    let mut vars = env.process_env();
    vars.push(("CREDIT_WORKER__REFILL__ENABLED".into(), "false".into()));
    let (mut worker, http) = WorkerProcess::spawn_with_http(&vars, &["run"]);
    wait_status(T, http, "/readyz", 200).await;
    let metric = |name, labels| scraped(http, name, labels);
    let waiting = "waiting for the dead-letter queue, which refuses an invalid message";
    let refusing = || async {
        let (_, ready) = http_get(http, "/readyz").await.unwrap_or_default();
        ready.contains(waiting)
    };
    // Invalid messages one at a time until the dead queue refuses one: a quorum queue takes
    // one past its limit before it refuses, a classic queue none.
    let mut sent = 0;
    while !refusing().await {
        assert!(
            sent < 5,
            "the dead queue took {sent} letters over a limit of one"
        );
        env.publish(&[format!("dead-{sent}").into_bytes()]).await;
        sent += 1;
        wait_for(T, "the letter, or its refusal", || async {
            metric("credit_dead_lettered_total", &[]).await == f64::from(sent) || refusing().await
        })
        .await;
    }
    env.publish(&[body(&platform_gpt4("full", "behind"))]).await;
    assert!(metric("credit_dead_letters_refused_total", &[]).await >= 1.0);
    // Room in the dead queue, again and again: the refused letters go in at the next tries.
    let (_conn, ch) = env.amqp_channel().await;
    let queue = env.names.dead_queue.as_str();
    let purged = std::cell::Cell::new(0);
    wait_for(T, "every dead letter", || async {
        let emptied = ch.queue_purge(queue.into(), Default::default()).await;
        purged.set(purged.get() + emptied.expect("purge"));
        metric("credit_dead_lettered_total", &[]).await == f64::from(sent)
    })
    .await;
    env.wait_decisions(1, T).await;
    assert_eq!(env.outcome_of("behind").await.as_deref(), Some("charged"));
    // Each letter went in once: none was published twice by a session that ended.
    let left = sent - purged.get();
    env.dead_letters(usize::try_from(left).unwrap()).await;
    let passive = lapin::options::QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    let dead = ch.queue_declare(queue.into(), passive, Default::default());
    assert_eq!(dead.await.expect("the dead queue").message_count(), 0);
    assert!(!refusing().await);
    let consumer = &[("session", "consumer")];
    assert_eq!(
        metric("credit_broker_reconnects_total", consumer).await,
        0.0
    );
    worker.sigterm();
    assert_eq!(worker.wait_exit(T).await, Some(0));
    env.assert_audit_clean().await;
    env.cleanup().await;
}

/// Deletes the dead queue, then publishes `body` straight to the input queue (the publish
/// tool would declare the dead queue again); the connection it used, to keep open.
async fn without_the_dead_queue_publish(env: &TestEnv, body: &[u8]) -> lapin::Connection {
    let (conn, ch) = env.amqp_channel().await;
    ch.queue_delete(
        env.names.dead_queue.as_str().into(),
        lapin::options::QueueDeleteOptions::default(),
    )
    .await
    .expect("delete the dead queue");
    ch.basic_publish(
        "".into(),
        env.names.input_queue.as_str().into(),
        lapin::options::BasicPublishOptions::default(),
        body,
        credit_worker::amqp::persistent_json(),
    )
    .await
    .expect("publish");
    conn
}

/// A dead letter no queue takes (the dead queue deleted while the worker runs) is returned by
/// the broker, not confirmed as delivered: the message stays unacked, and the next session,
/// which declares the dead queue again, dead-letters it.
#[tokio::test]
async fn a_dead_letter_whose_queue_is_gone_is_not_lost() {
    let env = TestEnv::with(no_refill).await;
    seed(&env, ["d"], 100).await;
    let worker = Worker::start(env.settings.clone()).await.unwrap();
    env.publish(&[body(&platform_gpt4("d", "dq-0"))]).await;
    env.wait_decisions(1, T).await;
    let _conn = without_the_dead_queue_publish(&env, b"not json").await;
    // Polled without declaring it (a get from a missing queue closes the channel).
    let deadline = std::time::Instant::now() + T;
    let dead = loop {
        let (_c, poll) = env.amqp_channel().await;
        let options = lapin::options::BasicGetOptions { no_ack: true };
        let got = poll
            .basic_get(env.names.dead_queue.as_str().into(), options)
            .await;
        if let Ok(Some(m)) = got {
            break m.delivery.data;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no dead letter in {T:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(dead, b"not json");
    worker.stop().await.unwrap();
    env.cleanup().await;
}

/// A refused producer's message whose dead letter no queue takes (the dead queue deleted) is
/// counted refused once, when the next session's dead letter is confirmed, as `invalid` is:
/// `credit_producers_refused_total` is a part of `invalid` and never exceeds it.
#[tokio::test]
async fn a_refused_producer_is_counted_once_its_dead_letter_is_confirmed() {
    let env = TestEnv::with(no_refill).await;
    let mut vars = env.process_env();
    vars.push(("CREDIT_WORKER__REFILL__ENABLED".into(), "false".into()));
    vars.push((
        "CREDIT_WORKER__AMQP__ALLOWED_PRODUCERS".into(),
        "executor".into(),
    ));
    let (mut worker, http) = WorkerProcess::spawn_with_http(&vars, &["run"]);
    wait_status(T, http, "/readyz", 200).await;
    let refused = body(&platform_gpt4("d", "refused-0"));
    let _conn = without_the_dead_queue_publish(&env, &refused).await;
    wait_for(T, "the dead letter confirmed", || async {
        scraped(http, "credit_dead_lettered_total", &[]).await == 1.0
    })
    .await;
    let consumer = &[("session", "consumer")];
    assert!(scraped(http, "credit_broker_reconnects_total", consumer).await >= 1.0);
    let invalid = &[("outcome", "invalid")];
    assert_eq!(scraped(http, "credit_messages_total", invalid).await, 1.0);
    assert_eq!(
        scraped(http, "credit_producers_refused_total", &[]).await,
        1.0
    );
    worker.sigterm();
    assert_eq!(worker.wait_exit(T).await, Some(0));
    env.cleanup().await;
}

/// A decider that fails (here: its dead letter has nowhere to go) ends the session at once,
/// idle queue or not: the new session declares the topology again and the held messages are
/// redelivered, so the invalid one reaches the dead queue without any further traffic.
#[tokio::test]
async fn a_failed_decider_ends_the_session_without_waiting_for_traffic() {
    let env = TestEnv::with(no_refill).await;
    seed(&env, ["d"], 100).await;
    let worker = Worker::start(env.settings.clone()).await.unwrap();
    // The session is open (its topology declared) once a message is decided.
    env.publish(&[body(&platform_gpt4("d", "dg-0"))]).await;
    env.wait_decisions(1, T).await;
    let (_conn, ch) = env.amqp_channel().await;
    ch.exchange_delete(
        env.names.dlx.as_str().into(),
        lapin::options::ExchangeDeleteOptions::default(),
    )
    .await
    .expect("delete the dead-letter exchange");
    // Straight to the queue: the publish tool would declare the exchange again. Nothing
    // follows the invalid message, so only the decider's own end can end the session.
    for b in [body(&platform_gpt4("d", "dg-1")), b"not json".to_vec()] {
        ch.basic_publish(
            "".into(),
            env.names.input_queue.as_str().into(),
            lapin::options::BasicPublishOptions::default(),
            &b,
            credit_worker::amqp::persistent_json(),
        )
        .await
        .expect("publish");
    }
    // Read without declaring anything. Only the worker's next session brings the dead letter,
    // with the invalid message's redelivery; the exchange is back by then (declared at the
    // session's start, or by the periodic declaration).
    let deadline = std::time::Instant::now() + T;
    let dead = loop {
        let got = ch
            .basic_get(
                env.names.dead_queue.as_str().into(),
                lapin::options::BasicGetOptions { no_ack: true },
            )
            .await
            .expect("basic.get");
        if let Some(m) = got {
            break Some(m.delivery.data);
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no dead letter in {T:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(dead.as_deref(), Some(&b"not json"[..]));
    env.wait_decisions(2, T).await;
    assert_eq!(env.ledger().balance("d", Utc::now()).await.unwrap(), 80);
    worker.stop().await.unwrap();
    env.assert_audit_clean().await;
    env.cleanup().await;
}

/// An input exchange deleted while the worker runs (by hand, or a tool cleaning up) is
/// declared again by the session, bound to the input queue, within its redeclare period
/// (10 s): a producer's publish through it is routed and billed again, with no restart.
#[tokio::test]
async fn an_input_exchange_deleted_while_running_is_declared_again() {
    let env = TestEnv::with(no_refill).await;
    seed(&env, ["x"], 100).await;
    let worker = Worker::start(env.settings.clone()).await.unwrap();
    env.publish(&[body(&platform_gpt4("x", "xd-0"))]).await;
    env.wait_decisions(1, T).await;
    let (conn, ch) = env.amqp_channel().await;
    let exchange = env.names.input_exchange.as_str();
    ch.exchange_delete(exchange.into(), Default::default())
        .await
        .expect("delete the input exchange");
    // Looked up without declaring it: a passive declaration of a missing exchange closes its
    // channel, so each look gets a channel of its own.
    let passive = lapin::options::ExchangeDeclareOptions {
        passive: true,
        ..Default::default()
    };
    let declared = || async {
        let Ok(look) = conn.create_channel().await else {
            return false;
        };
        let kind = lapin::ExchangeKind::Direct;
        let found = look.exchange_declare(exchange.into(), kind, passive, Default::default());
        found.await.is_ok()
    };
    assert!(!declared().await, "the exchange was deleted");
    wait_for(T, "the input exchange to be declared again", declared).await;
    // Through the exchange, as the executor publishes, mandatory: returned while the exchange
    // is not yet bound again (its binding follows its declaration), routed once it is.
    let publisher = conn.create_channel().await.expect("channel");
    publisher
        .confirm_select(Default::default())
        .await
        .expect("confirms");
    let message = body(&platform_gpt4("x", "xd-1"));
    wait_for(T, "a publish through the exchange to be routed", || async {
        let confirm = publisher
            .basic_publish(
                exchange.into(),
                credit_worker::amqp::topology::INPUT_ROUTING_KEY.into(),
                lapin::options::BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                &message,
                credit_worker::amqp::persistent_json(),
            )
            .await
            .expect("publish")
            .await
            .expect("confirm");
        matches!(confirm, lapin::Confirmation::Ack(None))
    })
    .await;
    env.wait_decisions(2, T).await;
    assert_eq!(env.outcome_of("xd-1").await.as_deref(), Some("charged"));
    worker.stop().await.unwrap();
    env.cleanup().await;
}

#[tokio::test]
async fn events_carry_gap_free_seq_and_the_ledger_balance() {
    let env = TestEnv::with(no_refill).await;
    seed(&env, ["e1", "e2", "e3"], 1000).await;
    let mut tap = env.event_tap().await;
    let worker = Worker::start(env.settings.clone()).await.unwrap();
    let bodies: Vec<Vec<u8>> = (0..60)
        .map(|i| {
            body(&platform_gpt4(
                &format!("e{}", i % 3 + 1),
                &format!("ev-{i}"),
            ))
        })
        .collect();
    env.publish(&bodies).await;
    env.wait_decisions(60, T).await;
    // 3 seeds + 60 charges + balance.low for each user crossing 500? 1000 - 20*10 = 800: none.
    let events = tap.take(63, T).await;
    tap.assert_quiet(Duration::from_millis(500)).await;
    let mut last_seq: HashMap<String, i64> = HashMap::new();
    for (rk, mid, e) in &events {
        assert_eq!(rk, "balance.changed");
        assert_eq!(mid, e["event_id"].as_str().unwrap());
        let user = e["user_id"].as_str().unwrap().to_owned();
        let seq = e["seq"].as_i64().unwrap();
        let prev = last_seq.insert(user.clone(), seq).unwrap_or(0);
        assert_eq!(seq, prev + 1, "seq of {user}");
        let running: i64 = sqlx::query_scalar(
            "SELECT running_balance FROM credit.transactions WHERE user_id = $1 AND seq = $2",
        )
        .bind(&user)
        .bind(seq)
        .fetch_one(&env.pool)
        .await
        .unwrap();
        assert_eq!(e["balance"].as_i64().unwrap(), running);
    }
    assert_eq!(last_seq.values().copied().collect::<Vec<_>>(), vec![21; 3]);
    worker.stop().await.unwrap();
    env.assert_audit_clean().await;
    env.cleanup().await;
}

#[tokio::test]
async fn balance_low_fires_once_on_crossing() {
    let env = TestEnv::with(no_refill).await;
    seed(&env, ["low"], 510).await;
    let mut tap = env.event_tap().await;
    let worker = Worker::start(env.settings.clone()).await.unwrap();
    env.publish(&[
        body(&platform_gpt4("low", "l-1")), // 510 -> 500: still >= 500
        body(&platform_gpt4("low", "l-2")), // 500 -> 490: crosses
        body(&platform_gpt4("low", "l-3")), // 490 -> 480: already below
    ])
    .await;
    env.wait_decisions(3, T).await;
    let events = tap.take(5, T).await;
    let kinds: Vec<&str> = events.iter().map(|e| e.0.as_str()).collect();
    assert_eq!(
        kinds,
        [
            "balance.changed",
            "balance.changed",
            "balance.changed",
            "balance.low",
            "balance.changed"
        ]
    );
    assert_eq!(events[3].2["balance"], 490);
    assert_eq!(events[3].2["threshold"], 500);
    tap.assert_quiet(Duration::from_millis(500)).await;
    worker.stop().await.unwrap();
    env.cleanup().await;
}

/// `execution_fee.every` changed during the day (a restart with a new configuration): the
/// next fee takes the day's next ordinal, where it took one already used and every later
/// execution of the user that day failed on the key.
/// A clock that stays at noon on 2031-03-10: the fee day cannot change under a test.
fn pinned() -> std::sync::Arc<ManualClock> {
    ManualClock::new(Utc.with_ymd_and_hms(2031, 3, 10, 12, 0, 0).unwrap())
}

#[tokio::test]
async fn execution_fee_ordinals_survive_a_change_of_every() {
    let env = TestEnv::with(|s| {
        s.refill.enabled = false;
        s.execution_fee.every = 2;
        s.execution_fee.amount = 1;
    })
    .await;
    seed(&env, ["ord"], 1_000).await;
    let run = |every: i64, from: usize, to: usize| {
        let mut settings = env.settings.clone();
        settings.execution_fee.every = every;
        let bodies: Vec<Vec<u8>> = (from..=to)
            .map(|i| body(&platform_gpt4("ord", &format!("o-{i}"))))
            .collect();
        let env = &env;
        async move {
            let worker = Worker::start_with_clock(settings, CancellationToken::new(), pinned())
                .await
                .unwrap();
            env.publish(&bodies).await;
            env.wait_decisions(to as i64, T).await;
            worker.stop().await.unwrap();
        }
    };
    run(2, 1, 4).await; // fees at executions 2 and 4
    run(4, 5, 12).await; // fees at executions 8 and 12
    let day = "2031-03-10";
    let fees: Vec<String> = sqlx::query_scalar(
        "SELECT transaction_key FROM credit.transactions
          WHERE user_id = 'ord' AND transaction_key LIKE 'EXECUTION-FEE-%' ORDER BY seq",
    )
    .fetch_all(&env.pool)
    .await
    .unwrap();
    let expected: Vec<String> = (1..=4)
        .map(|n| format!("EXECUTION-FEE-ord-{day}-{n}"))
        .collect();
    assert_eq!(fees, expected);
    assert_eq!(env.outcome_of("o-12").await.as_deref(), Some("charged"));
    assert_eq!(
        env.ledger().balance("ord", Utc::now()).await.unwrap(),
        1_000 - 12 * 10 - 4
    );
    env.assert_audit_clean().await;
    env.cleanup().await;
}

/// A write that waited for a user's row takes its time once it holds the row: one that began
/// before midnight at the end of March and got the row after it is stamped in April, as is a
/// top-up queued behind it, so the user's rows are stamped in the order of their `seq` and a
/// month report's positions are balances the account had.
#[tokio::test]
async fn a_write_that_waited_for_the_users_row_is_stamped_when_it_got_it() {
    let env = TestEnv::with(|s| s.refill.enabled = false).await;
    seed(&env, ["st"], 1_000).await;
    let march = Utc.with_ymd_and_hms(2031, 3, 31, 23, 59, 59).unwrap();
    let april = Utc.with_ymd_and_hms(2031, 4, 1, 0, 0, 1).unwrap();
    let clock = ManualClock::new(march);
    let worker = Worker::start_with_clock(
        env.settings.clone(),
        CancellationToken::new(),
        clock.clone(),
    )
    .await
    .unwrap();
    let held = env.hold_account("st").await;
    env.publish(&[body(&platform_gpt4("st", "st-1"))]).await;
    env.wait_for_one_lock_waiter(T, "the batch waiting for the row")
        .await;
    let ledger = env.ledger();
    let stamp: std::sync::Arc<dyn credit_worker::clock::Clock> = clock.clone();
    let top_up = tokio::spawn(async move {
        ledger
            .credit(TxType::TopUp, "st", 50, Some("TU-st"), None, stamp)
            .await
    });
    wait_count(&env, T, "two writers waiting", LOCK_WAITERS, &[], |n| {
        n == 2
    })
    .await;
    clock.set(april);
    held.commit().await.unwrap();
    assert_eq!(top_up.await.unwrap().unwrap().seq, 3);
    let rows: Vec<(i64, String, chrono::DateTime<Utc>)> = sqlx::query_as(
        "SELECT seq, type::text, created_at FROM credit.transactions
          WHERE user_id = 'st' AND seq > 1 ORDER BY seq",
    )
    .fetch_all(&env.pool)
    .await
    .unwrap();
    assert_eq!(
        rows,
        vec![
            (2, "USAGE".to_owned(), april),
            (3, "TOP_UP".to_owned(), april)
        ]
    );
    worker.stop().await.unwrap();
    env.assert_audit_clean().await;
    env.cleanup().await;
}

#[tokio::test]
async fn execution_fee_every_3rd_execution_including_free_ones() {
    let env = TestEnv::with(|s| {
        s.refill.enabled = false;
        s.execution_fee.every = 3;
        s.execution_fee.amount = 2;
    })
    .await;
    seed(&env, ["fee"], 100).await;
    let worker = Worker::start_with_clock(env.settings.clone(), CancellationToken::new(), pinned())
        .await
        .unwrap();
    env.publish(&[
        body(&own_key("fee", "f-1")),
        body(&platform_gpt4("fee", "f-2")),
        body(&own_key("fee", "f-3")), // 3rd: fee 1
        body(&platform_gpt4("fee", "f-4")),
        body(&platform_gpt4("fee", "f-5")),
        body(&platform_gpt4("fee", "f-6")), // 6th: fee 2
    ])
    .await;
    env.wait_decisions(6, T).await;
    let day = "2031-03-10";
    let keys: Vec<(String, i64)> = sqlx::query_as(
        "SELECT transaction_key, amount FROM credit.transactions WHERE user_id = 'fee' ORDER BY seq",
    )
    .fetch_all(&env.pool)
    .await
    .unwrap();
    assert_eq!(
        keys,
        vec![
            ("SEED".into(), 100),
            ("USAGE-f-2".into(), -10),
            (format!("EXECUTION-FEE-fee-{day}-1"), -2),
            ("USAGE-f-4".into(), -10),
            ("USAGE-f-5".into(), -10),
            ("USAGE-f-6".into(), -10),
            (format!("EXECUTION-FEE-fee-{day}-2"), -2),
        ]
    );
    assert_eq!(env.ledger().balance("fee", Utc::now()).await.unwrap(), 56);
    // `outcome` tells the fee apart from the block's cost, a free block's too.
    assert_eq!(
        env.cli_json(&["outcome", "f-3"]),
        json!({"user_id": "fee", "block_id": TEXT_GEN, "outcome": "free", "cost": 0, "fee": 2,
               "fee_transaction_key": format!("EXECUTION-FEE-fee-{day}-1"), "settlement": null})
    );
    let text = env.cli(&["outcome", "f-6"]);
    assert_eq!(
        String::from_utf8_lossy(&text.stdout),
        format!("charged cost 10 + execution fee 2 (user fee, block {TEXT_GEN}); not settled\n")
    );
    worker.stop().await.unwrap();
    env.assert_audit_clean().await;
    env.cleanup().await;
}

/// Ctrl-C in a terminal and a process manager's SIGTERM often arrive together: one stop,
/// drained and exit 0, not a second request to stop at once.
#[tokio::test]
async fn two_signals_at_once_are_one_stop() {
    let env = TestEnv::with(no_refill).await;
    seed(&env, ["both"], 100).await;
    let (mut w, port) = WorkerProcess::spawn_with_http(&env.process_env(), &["run"]);
    wait_status(T, port, "/readyz", 200).await;
    env.publish(&[body(&platform_gpt4("both", "b-1"))]).await;
    env.wait_decisions(1, T).await;
    w.signal("INT");
    w.signal("TERM");
    assert_eq!(w.wait_exit(T).await, Some(0));
    assert_eq!(env.scalar_i64(UNPUBLISHED).await, 0);
    env.cleanup().await;
}

/// A stop while a batch is still filling (its first delivery waiting `max_wait_ms` for more)
/// ends the wait: the batch is decided and acked at once, not after the writers' deadline.
#[tokio::test]
async fn sigterm_while_a_batch_fills_decides_it_at_once() {
    let env = TestEnv::with(no_refill).await;
    seed(&env, ["fill"], 1_000).await;
    let mut vars = env.process_env();
    vars.push((
        "CREDIT_WORKER__PIPELINE__MAX_WAIT_MS".into(),
        "10000".into(),
    ));
    let (mut w, port) = WorkerProcess::spawn_with_http(&vars, &["run"]);
    wait_status(T, port, "/readyz", 200).await;
    env.publish(&[body(&platform_gpt4("fill", "f-1"))]).await;
    // Delivered (no longer ready on the queue) and waiting in its batch.
    let (_conn, ch) = env.amqp_channel().await;
    let passive = lapin::options::QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    let deadline = std::time::Instant::now() + T;
    loop {
        let q = ch
            .queue_declare(
                env.names.input_queue.as_str().into(),
                passive,
                Default::default(),
            )
            .await
            .expect("input queue");
        if q.message_count() == 0 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "never delivered");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        env.scalar_i64("SELECT count(*) FROM credit.decisions")
            .await,
        0
    );
    let stopped = std::time::Instant::now();
    w.sigterm();
    assert_eq!(w.wait_exit(T).await, Some(0));
    assert!(
        stopped.elapsed() < Duration::from_secs(5),
        "{:?}",
        stopped.elapsed()
    );
    assert_eq!(
        env.scalar_i64("SELECT count(*) FROM credit.decisions")
            .await,
        1
    );
    assert_eq!(env.scalar_i64(UNPUBLISHED).await, 0);
    assert_eq!(env.ledger().balance("fill", Utc::now()).await.unwrap(), 990);
    env.cleanup().await;
}

#[tokio::test]
async fn sigterm_or_sighup_finishes_in_flight_work_and_exits_0() {
    let env = TestEnv::with(no_refill).await;
    seed(&env, ["term"], 1_000_000).await;
    // The prefetch (1000) holds more than the batches in flight and the one filling (3 × 50),
    // so deliveries are carried over all through the backlog: the stop must still be seen.
    let env_vars = small_batches(&env);
    let n = 10_000;
    let bodies: Vec<Vec<u8>> = (0..n)
        .map(|i| body(&platform_gpt4("term", &format!("t-{i}"))))
        .collect();
    env.publish(&bodies).await;
    let mut w = WorkerProcess::spawn(&env_vars, &["run"]);
    env.wait_decisions(1, T).await;
    // A hangup (a closed terminal, a supervisor's reload) stops it the same way.
    w.signal("HUP");
    assert_eq!(w.wait_exit(T).await, Some(0));
    let decided = env
        .scalar_i64("SELECT count(*) FROM credit.decisions")
        .await;
    // It stopped consuming rather than drain the backlog first.
    assert!((1..n).contains(&decided), "{decided} of {n} decided");
    // Whatever was decided was published before exit.
    assert_eq!(env.scalar_i64(UNPUBLISHED).await, 0);
    // The rest is still on the queue: restart and finish.
    let mut w = WorkerProcess::spawn(&env_vars, &["run"]);
    env.wait_decisions(n, T).await;
    w.sigterm();
    assert_eq!(w.wait_exit(T).await, Some(0));
    // An execution fee of 1 every 100 executions.
    assert_eq!(
        env.ledger().balance("term", Utc::now()).await.unwrap(),
        1_000_000 - n * 10 - n / 100
    );
    env.assert_audit_clean().await;
    env.cleanup().await;
}

#[tokio::test]
async fn sigkill_while_in_flight_then_restart_decides_everything_once() {
    let env = TestEnv::with(no_refill).await;
    let (users, n) = (20, 4000);
    backlog(&env, "k", users, n).await;
    let env_vars = small_batches(&env);
    let mut decided_at_kill = Vec::new();
    for target in [300, 1200, 2500] {
        let mut w = WorkerProcess::spawn(&env_vars, &["run"]);
        let decided = "SELECT count(*) FROM credit.decisions";
        decided_at_kill.push(env.kill_when(&mut w, decided, target, T).await);
    }
    // Each worker died with work left on the queue, so each kill hit a worker mid-backlog
    // (not an idle one, which would test nothing).
    assert!(
        decided_at_kill.iter().all(|&d| d < n),
        "a worker drained the backlog before its kill: {decided_at_kill:?} of {n}"
    );
    let mut w = WorkerProcess::spawn(&env_vars, &["run"]);
    env.wait_decisions(n, Duration::from_secs(60)).await;
    // Every event out, including those of batches whose relay was killed.
    wait_count(&env, T, "outbox drained", UNPUBLISHED, &[], |n| n == 0).await;
    w.sigterm();
    assert_eq!(w.wait_exit(T).await, Some(0));
    assert_decided_and_charged(&env, n).await;
    // Fees: every user ran n/users = 200 executions today ⇒ 2 fees of 1.
    let total: i64 = env
        .scalar_i64("SELECT sum(balance)::int8 FROM credit.balances")
        .await;
    assert_eq!(total, users * 1_000_000 - n * 10 - users * 2);
    env.assert_audit_clean().await;
    env.cleanup().await;
}

/// No batch holds more than `pipeline.max_batch` deliveries, also when a backlog piles up
/// while the batches before it are decided: deliveries beyond the bound start the next ones.
#[tokio::test]
async fn batches_hold_at_most_max_batch_deliveries() {
    let env = TestEnv::with(no_refill).await;
    let n = 3000;
    backlog(&env, "b", 20, n).await;
    let env_vars = small_batches(&env);
    let (mut w, port) = WorkerProcess::spawn_with_http(&env_vars, &["run"]);
    env.wait_decisions(n, Duration::from_secs(60)).await;
    let (_, metrics) = http_get(port, "/metrics").await.expect("metrics");
    let batches = metric_value(&metrics, "credit_batch_size_count", &[]);
    let within = metric_value(&metrics, "credit_batch_size_bucket", &[("le", "50")]);
    assert_eq!(
        metric_value(&metrics, "credit_batch_size_sum", &[]),
        n as f64
    );
    assert!(
        batches >= (n / 50) as f64,
        "{batches} batches for {n} deliveries"
    );
    assert_eq!(within, batches, "batches over 50 deliveries:\n{metrics}");
    w.sigterm();
    assert_eq!(w.wait_exit(T).await, Some(0));
    assert_decided_and_charged(&env, n).await;
    env.assert_audit_clean().await;
    env.cleanup().await;
}

/// A table missing (a migration half applied, a rename) is the database's fault, not the
/// messages': they wait on the queue, retried, and are billed once it is back, instead of
/// being dead-lettered one after another.
#[tokio::test]
async fn a_missing_table_holds_messages_on_the_queue_until_it_is_back() {
    let env = TestEnv::with(no_refill).await;
    seed(&env, ["gone"], 1_000).await;
    let mut env_vars = env.process_env();
    env_vars.push(("CREDIT_WORKER__REFILL__ENABLED".into(), "false".into()));
    let (mut w, port) = WorkerProcess::spawn_with_http(&env_vars, &["run"]);
    wait_status(T, port, "/readyz", 200).await;
    sqlx::query("ALTER TABLE credit.decisions RENAME TO decisions_away")
        .execute(&env.pool)
        .await
        .expect("rename");
    env.publish(&[body(&platform_gpt4("gone", "gone-1"))]).await;
    wait_for(T, "the worker retrying", || async {
        let metrics = http_get(port, "/metrics").await.unwrap_or_default().1;
        metric_value(&metrics, "credit_decide_retries_total", &[]) >= 2.0
    })
    .await;
    assert_eq!(dead_queue_depth(&env).await, 0);
    sqlx::query("ALTER TABLE credit.decisions_away RENAME TO decisions")
        .execute(&env.pool)
        .await
        .expect("rename back");
    env.wait_decisions(1, T).await;
    assert_eq!(env.outcome_of("gone-1").await.as_deref(), Some("charged"));
    assert_eq!(dead_queue_depth(&env).await, 0);
    w.sigterm();
    assert_eq!(w.wait_exit(T).await, Some(0));
    assert_eq!(env.ledger().balance("gone", Utc::now()).await.unwrap(), 990);
    env.assert_audit_clean().await;
    env.cleanup().await;
}

async fn dead_queue_depth(env: &TestEnv) -> u32 {
    let (_conn, ch) = env.amqp_channel().await;
    let passive = lapin::options::QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    ch.queue_declare(
        env.names.dead_queue.as_str().into(),
        passive,
        lapin::types::FieldTable::default(),
    )
    .await
    .expect("the dead queue")
    .message_count()
}

/// A worker process's environment: no refills, at most 50 deliveries a batch.
fn small_batches(env: &TestEnv) -> Vec<(String, String)> {
    let mut vars = env.process_env();
    vars.push(("CREDIT_WORKER__REFILL__ENABLED".into(), "false".into()));
    vars.push(("CREDIT_WORKER__PIPELINE__MAX_BATCH".into(), "50".into()));
    vars
}

/// Seeds users `{prefix}0`… with 10^6 credits each and queues `n` paid executions
/// (`{prefix}-{i}`) over them in turn.
async fn backlog(env: &TestEnv, prefix: &str, users: i64, n: i64) {
    seed(env, (0..users).map(|u| format!("{prefix}{u}")), 1_000_000).await;
    let bodies: Vec<Vec<u8>> = (0..n)
        .map(|i| {
            let user = format!("{prefix}{}", i % users);
            body(&platform_gpt4(&user, &format!("{prefix}-{i}")))
        })
        .collect();
    env.publish(&bodies).await;
}

/// Batches give exactly the one-at-a-time outcomes: same verdicts, ledger rows and events.
#[tokio::test]
async fn a_batch_decides_exactly_like_one_at_a_time() {
    use credit_worker::cost::CostTable;
    use credit_worker::decide::decide_batch;
    use credit_worker::message::decode;

    let batch_env = TestEnv::with(|s| s.execution_fee.every = 4).await;
    let single_env = TestEnv::with(|s| s.execution_fee.every = 4).await;
    let now = Utc::now();
    let mut entries: Vec<Value> = Vec::new();
    // One hot user running out of funds midway: 1000 / 10 ⇒ 100 charges, then rejections.
    for i in 0..120 {
        entries.push(platform_gpt4("hot", &format!("h-{i}")));
    }
    entries.push(platform_gpt4("hot", "h-5")); // duplicate inside the batch
    entries.push(platform_gpt4("other", "h-6")); // conflicting duplicate
    entries.push(own_key("cold", "c-1"));
    entries.push(platform_gpt4("cold", "c-2"));
    let mut decoded: Vec<_> = entries.iter().map(|v| decode(&body(v)).unwrap()).collect();
    // An entry that prices invalid (cost overflow through `byte` stats on a custom table).
    let table = CostTable::from_toml_str(
        &format!(
            "{}\n[[block]]\nid = \"bytes\"\nname = \"Bytes\"\ncosts = [{{ cost_amount = {}, cost_type = \"byte\", cost_filter = {{}} }}]\n",
            credit_worker::cost::BUILTIN_TABLE,
            i64::MAX
        ),
        "test",
    )
    .unwrap();
    let mut overflow = decode(&body(&platform_gpt4("cold", "c-3"))).unwrap();
    overflow.block_id = "bytes".into();
    overflow.stats = Some(credit_worker::cost::Stats {
        input_size: 1000.0,
        ..Default::default()
    });
    decoded.insert(50, overflow);

    let pricing_b = batch_env.settings.pricing(table.clone());
    let pricing_s = single_env.settings.pricing(table);
    let batch = decide_batch(&batch_env.pool, &pricing_b, &decoded, now)
        .await
        .unwrap();
    let mut single = Vec::new();
    for e in &decoded {
        single.extend(
            decide_batch(&single_env.pool, &pricing_s, std::slice::from_ref(e), now)
                .await
                .unwrap(),
        );
    }
    assert_eq!(batch, single);
    // A duplicate across batches changes nothing either.
    let again = decide_batch(&batch_env.pool, &pricing_b, &decoded[..3], now)
        .await
        .unwrap();
    assert!(again.iter().all(|v| matches!(
        v,
        credit_worker::decide::Verdict::Duplicate { conflicting: false }
    )));

    async fn snapshot(
        env: &TestEnv,
    ) -> (
        Vec<(String, i64, String, i64, i64)>,
        Vec<Value>,
        Vec<(String, String, i64)>,
    ) {
        let rows = sqlx::query_as(
            "SELECT user_id, seq, transaction_key, amount, running_balance FROM credit.transactions ORDER BY user_id, seq",
        )
        .fetch_all(&env.pool)
        .await
        .unwrap();
        let events: Vec<Value> = stored_events(env)
            .await
            .into_iter()
            .map(|e| serde_json::from_str(&e.2).unwrap())
            .collect();
        let decisions = sqlx::query_as(
            "SELECT node_exec_id, outcome, cost FROM credit.decisions ORDER BY node_exec_id",
        )
        .fetch_all(&env.pool)
        .await
        .unwrap();
        (rows, events, decisions)
    }
    let (b, s) = (snapshot(&batch_env).await, snapshot(&single_env).await);
    assert_eq!(b.0, s.0);
    assert_eq!(b.1, s.1);
    assert_eq!(b.2, s.2);
    let rejected = b.2.iter().filter(|d| d.1 == "rejected").count();
    // hot: refill 1000; 10 per charge and a fee of 1 every 4th execution ⇒ after 96
    // executions 16 are left, the 97th leaves 6, and the remaining 23 are rejected.
    assert_eq!(rejected, 23);
    assert!(matches!(
        batch[50],
        credit_worker::decide::Verdict::Invalid { .. }
    ));
    batch_env.assert_audit_clean().await;
    batch_env.cleanup().await;
    single_env.cleanup().await;
}

/// A start and its completion through the queue, with token prices: the completion settles
/// the difference once, a repeated completion changes nothing, and a completion that
/// overtakes its start decides the execution.
#[tokio::test]
async fn completions_through_the_queue_settle_once() {
    let (dir, table) = token_table();
    let env = TestEnv::with(|s| {
        no_refill(s);
        s.cost.table = Some(table.clone());
    })
    .await;
    seed(&env, ["tok"], 100).await;
    let worker = Worker::start(env.settings.clone()).await.unwrap();
    let completed = |id: &str, input: u64, output: u64| completed("tok", id, input, output);
    // 10 up front; 20,000 in + 1,000 out = 30 + 4.5 ⇒ 35 in all: 25 more.
    env.publish(&[body(&platform_gpt4("tok", "t-1"))]).await;
    env.wait_decisions(1, T).await;
    env.publish(&[completed("t-1", 20_000, 1_000), completed("t-1", 1, 1)])
        .await;
    // Overtaking: the completion (3,000 in ⇒ 5) before its start.
    env.publish(&[
        completed("t-2", 3_000, 0),
        body(&platform_gpt4("tok", "t-2")),
    ])
    .await;
    wait_count(
        &env,
        T,
        "two settlements",
        "SELECT count(*) FROM credit.settlements WHERE node_exec_id <> $1",
        &[""],
        |n| n == 2,
    )
    .await;
    // The repeated completion of t-1 was queued before t-2's messages, of the same user: it
    // has been decided by now.
    assert_eq!(
        env.ledger().balance("tok", Utc::now()).await.unwrap(),
        100 - 35 - 5
    );
    let keys: Vec<(String, i64)> = sqlx::query_as(
        "SELECT transaction_key, amount FROM credit.transactions WHERE user_id = 'tok' ORDER BY seq",
    )
    .fetch_all(&env.pool)
    .await
    .unwrap();
    assert_eq!(
        keys,
        vec![
            ("SEED".to_owned(), 100),
            ("USAGE-t-1".to_owned(), -10),
            ("SETTLE-t-1".to_owned(), -25),
            ("USAGE-t-2".to_owned(), -5),
        ]
    );
    stop_audit_cleanup(env, worker).await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// With `settlement.allow_debt = false`, completions that overtake their starts take the fee
/// first, then what the balance still holds; what they cannot take, a fee included, is in
/// `charge.uncollected` and in their settlements, so the database accounts for every credit.
#[tokio::test]
async fn without_debt_what_completions_leave_is_recorded_fee_included() {
    let (dir, table) = token_table();
    let env = TestEnv::with(|s| {
        no_refill(s);
        s.cost.table = Some(table.clone());
        s.settlement.allow_debt = false;
        s.execution_fee.every = 1;
        s.execution_fee.amount = 3;
    })
    .await;
    seed(&env, ["nd"], 8).await;
    let worker = Worker::start(env.settings.clone()).await.unwrap();
    // 35: the fee of 3, then 5 of 35. Then 5 on a balance of 0: neither it nor the fee.
    env.publish(&[completed("nd", "n-1", 20_000, 1_000)]).await;
    env.wait_decisions(1, T).await;
    env.publish(&[completed("nd", "n-2", 3_000, 0)]).await;
    env.wait_decisions(2, T).await;
    let settlements: Vec<(String, i64, i64, i64, i64, i64)> = sqlx::query_as(
        "SELECT node_exec_id, pre, post, delta, uncollected, fee_uncollected
           FROM credit.settlements ORDER BY node_exec_id",
    )
    .fetch_all(&env.pool)
    .await
    .unwrap();
    assert_eq!(
        settlements,
        vec![
            ("n-1".to_owned(), 5, 35, 30, 30, 0),
            ("n-2".to_owned(), 0, 5, 5, 5, 3),
        ]
    );
    let uncollected: Vec<i64> = stored_events(&env)
        .await
        .iter()
        .filter(|(_, key, _)| key == "charge.uncollected")
        .map(|(_, _, payload)| {
            serde_json::from_str::<Value>(payload).unwrap()["amount"]
                .as_i64()
                .unwrap()
        })
        .collect();
    assert_eq!(uncollected, [30, 8]);
    assert_eq!(
        env.cli_json(&["outcome", "n-2"]),
        json!({"user_id": "nd", "block_id": TEXT_GEN, "outcome": "free", "cost": 0, "fee": 0,
               "settlement": {
            "status": "COMPLETED", "pre": 0, "post": 5, "delta": 5, "uncollected": 5,
            "fee_uncollected": 3}})
    );
    assert_eq!(env.ledger().balance("nd", Utc::now()).await.unwrap(), 0);
    stop_audit_cleanup(env, worker).await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// A cost table where gpt-4-turbo (the test entries' model) costs 10 pre-flight and 1500 /
/// 4500 credits per 10⁶ input / output tokens; (its folder, its path).
fn token_table() -> (std::path::PathBuf, std::path::PathBuf) {
    let dir = std::env::temp_dir().join(unique("cw-costs"));
    std::fs::create_dir_all(&dir).unwrap();
    let table = dir.join("costs.toml");
    std::fs::write(
        &table,
        format!(
            "[token_rates]\n\"gpt-4-turbo\" = {{ input = 1500, output = 4500 }}\n\
             [[block]]\nid = \"{TEXT_GEN}\"\ncosts = [{{ cost_amount = 10, cost_type = \"tokens\", \
             cost_filter = {{ model = \"gpt-4-turbo\" }} }}]\n"
        ),
    )
    .unwrap();
    (dir, table)
}

/// The completion of `id`: the entry again with its run's token counts.
fn completed(user: &str, id: &str, input: u64, output: u64) -> Vec<u8> {
    let mut v = platform_gpt4(user, id);
    v["phase"] = "completed".into();
    v["stats"] = json!({"input_token_count": input, "output_token_count": output});
    body(&v)
}

/// Starts and completions in flight while the worker is SIGKILLed three times: every
/// execution ends up charged exactly its post-flight price, once.
#[tokio::test]
async fn sigkill_between_starts_and_completions_settles_everything_once() {
    let (dir, table) = token_table();
    let env = TestEnv::with(no_refill).await;
    let users = 10;
    seed(&env, (0..users).map(|u| format!("p{u}")), 1_000_000).await;
    let mut env_vars = small_batches(&env);
    env_vars.push(("CREDIT_WORKER__EXECUTION_FEE__EVERY".into(), "0".into()));
    env_vars.push((
        "CREDIT_WORKER__COST__TABLE".into(),
        table.display().to_string(),
    ));
    let n: i64 = 1500;
    // Execution i: 1000·(i % 7) input and 500·(i % 3) output tokens, so some cost more than
    // the 10 charged up front and some less. Its completion follows the start of i + 5.
    let post = |i: i64| ((i % 7) * 1000 * 1500 + (i % 3) * 500 * 4500 + 999_999) / 1_000_000;
    let mut bodies = Vec::new();
    for i in 0..n + 5 {
        if i < n {
            bodies.push(body(&platform_gpt4(
                &format!("p{}", i % users),
                &format!("p-{i}"),
            )));
        }
        let j = i - 5;
        if j >= 0 {
            let (input, output) = ((j % 7) as u64 * 1000, (j % 3) as u64 * 500);
            bodies.push(completed(
                &format!("p{}", j % users),
                &format!("p-{j}"),
                input,
                output,
            ));
        }
    }
    env.publish(&bodies).await;
    let settled = "SELECT count(*) FROM credit.settlements WHERE node_exec_id <> $1";
    let mut settled_at_kill = Vec::new();
    for target in [200, 700, 1200] {
        let mut w = WorkerProcess::spawn(&env_vars, &["run"]);
        let count = "SELECT count(*) FROM credit.settlements";
        settled_at_kill.push(env.kill_when(&mut w, count, target, T).await);
    }
    // Each kill hit a worker with settlements still to make.
    assert!(
        settled_at_kill.iter().all(|&s| s < n),
        "a worker settled everything before its kill: {settled_at_kill:?} of {n}"
    );
    // This one may find everything settled already: it is sent SIGTERM only once it is
    // ready, so the signal cannot arrive before the worker handles it.
    let (mut w, port) = WorkerProcess::spawn_with_http(&env_vars, &["run"]);
    wait_status(T, port, "/readyz", 200).await;
    wait_count(
        &env,
        Duration::from_secs(60),
        "all settled",
        settled,
        &[""],
        |c| c == n,
    )
    .await;
    wait_count(&env, T, "outbox drained", UNPUBLISHED, &[], |c| c == 0).await;
    w.sigterm();
    assert_eq!(w.wait_exit(T).await, Some(0));
    let expected: i64 = (0..n).map(post).sum();
    let total: i64 = env
        .scalar_i64("SELECT sum(balance)::int8 FROM credit.balances")
        .await;
    assert_eq!(users * 1_000_000 - total, expected);
    assert_eq!(
        env.scalar_i64("SELECT count(*) FROM credit.decisions")
            .await,
        n
    );
    env.assert_audit_clean().await;
    env.cleanup().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// With `amqp.allowed_producers`, only messages whose broker-verified `user_id` is listed are
/// billed; the others are dead-lettered with the producer named and change nothing.
#[tokio::test]
async fn only_allowed_producers_are_billed() {
    use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
    use lapin::BasicProperties;

    let env = TestEnv::with(|s| {
        no_refill(s);
        let uri: lapin::uri::AMQPUri = s.amqp.url.parse().expect("AMQP URL");
        s.amqp.allowed_producers = vec![uri.authority.userinfo.username];
    })
    .await;
    seed(&env, ["prod"], 100).await;
    let worker = Worker::start(env.settings.clone()).await.unwrap();
    let (_conn, ch) = env.amqp_channel().await;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let publish = |id: &str, user_id: Option<&str>| {
        let mut props = BasicProperties::default().with_delivery_mode(2);
        match user_id {
            Some(u) => props = props.with_user_id(u.into()),
            // An anonymous message naming the worker's own user as its producer: the header
            // is anyone's to write, so it must not make the message the worker's.
            None if id == "forged" => {
                let mut h = lapin::types::FieldTable::default();
                h.insert(
                    "x-credit-producer".into(),
                    lapin::types::AMQPValue::LongString("guest".into()),
                );
                props = props.with_headers(h);
            }
            None => {}
        }
        let ch = ch.clone();
        let queue = env.names.input_queue.clone();
        let b = body(&platform_gpt4("prod", id));
        async move {
            ch.basic_publish(
                "".into(),
                queue.as_str().into(),
                BasicPublishOptions::default(),
                &b,
                props,
            )
            .await
            .unwrap()
            .await
            .unwrap()
        }
    };
    // RabbitMQ checks the user_id property against the connection's user (guest here).
    publish("from-guest", Some("guest")).await;
    publish("anonymous", None).await;
    publish("forged", None).await;
    let dead_queue = env.names.dead_queue.clone();
    wait_for(T, "two dead letters", || async {
        queue_depth(&env, &dead_queue).await == 2
    })
    .await;
    // Replayed with the worker's credentials, both are still anonymous, and refused again.
    let replayed = env.cli_json(&["dead-letters", "replay", "--all"]);
    assert_eq!(replayed["replayed"], json!(2), "{replayed}");
    let dead = env.dead_messages(2).await;
    for (_, props) in &dead {
        let reason = header_text(props, "x-credit-error").unwrap_or_default();
        assert_eq!(
            reason,
            "user_id: the message has no user_id property; amqp.allowed_producers cannot be checked"
        );
        assert_eq!(props.user_id(), &None);
    }
    env.wait_decisions(1, T).await;
    assert_eq!(
        env.outcome_of("from-guest").await.as_deref(),
        Some("charged")
    );
    assert_eq!(env.outcome_of("anonymous").await, None);
    assert_eq!(env.outcome_of("forged").await, None);
    assert_eq!(env.ledger().balance("prod", Utc::now()).await.unwrap(), 90);
    stop_audit_cleanup(env, worker).await;
}
