//! The `dead-letters` commands against the real broker: `list` leaves the queue as it was,
//! `replay` gets an undecided message charged once, a decided one changes nothing, a second
//! replay finds nothing, and `--dry-run` changes nothing.

use std::time::Duration;

use chrono::Utc;
use credit_worker::service::Worker;
use credit_worker::tools::dead_letters;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable};
use serde_json::json;

use crate::fixtures::*;
use crate::helpers::*;

const T: Duration = Duration::from_secs(30);

/// Puts `body` straight into the dead queue with `reason`, as the worker would have.
async fn dead_letter(env: &TestEnv, body: &[u8], reason: &str) {
    let mut headers = FieldTable::default();
    headers.insert(
        "x-credit-error".into(),
        AMQPValue::LongString(reason.into()),
    );
    publish_with(env, &env.names.dead_queue, body, headers).await;
}

/// Publishes `body` to `queue` with `headers` and confirms, as a producer with lapin's
/// defaults (the broker's frame size) would.
async fn publish_with(env: &TestEnv, queue: &str, body: &[u8], headers: FieldTable) {
    let props = credit_worker::amqp::persistent_json().with_headers(headers);
    publish_props(env, queue, body, props).await;
}

/// Publishes `body` to `queue` with `props` and confirms.
async fn publish_props(env: &TestEnv, queue: &str, body: &[u8], props: lapin::BasicProperties) {
    let (_conn, ch) = confirming_channel(env).await;
    let confirm = ch
        .basic_publish(
            "".into(),
            queue.into(),
            BasicPublishOptions::default(),
            body,
            props,
        )
        .await
        .expect("publish");
    assert!(confirm.await.expect("confirm").is_ack(), "nacked");
}

/// A channel in confirm mode on the topology, as a producer with lapin's defaults (the
/// broker's frame size) would have.
async fn confirming_channel(env: &TestEnv) -> (lapin::Connection, lapin::Channel) {
    let conn = lapin::Connection::connect(
        &env.settings.amqp.url,
        lapin::ConnectionProperties::default(),
    )
    .await
    .expect("amqp");
    let ch = conn.create_channel().await.expect("channel");
    // Declared before publishing: the worker may not have declared the queue yet.
    credit_worker::amqp::topology::declare(&ch, &env.settings.amqp)
        .await
        .expect("declare");
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm mode");
    (conn, ch)
}

/// [`publish_with`] a header of `len` bytes.
async fn publish_with_headers(env: &TestEnv, queue: &str, body: &[u8], len: usize) {
    let mut headers = FieldTable::default();
    headers.insert(
        "x-trace".into(),
        AMQPValue::LongString("t".repeat(len).into()),
    );
    publish_with(env, queue, body, headers).await;
}

/// Every body in the dead queue, sorted (consumes them).
async fn drain_bodies(env: &TestEnv, n: usize) -> Vec<Vec<u8>> {
    let mut bodies: Vec<Vec<u8>> = env
        .dead_letters(n)
        .await
        .into_iter()
        .map(|(b, _)| b)
        .collect();
    bodies.sort();
    bodies
}

#[tokio::test]
async fn list_twice_leaves_the_queue_as_it_was() {
    let env = TestEnv::with(no_refill).await;
    let mut bodies = vec![
        body(&platform_gpt4("u1", "ne-list-1")),
        body(&platform_gpt4("u1", "ne-list-2")),
        b"not json \xff at all".to_vec(),
    ];
    for b in &bodies {
        dead_letter(&env, b, "user_id: missing").await;
    }
    let report = dead_letters::list(&env.settings, 10).await.expect("list");
    assert_eq!(report.depth, 3);
    let mut ids: Vec<_> = report
        .messages
        .iter()
        .map(|m| m.node_exec_id.clone())
        .collect();
    ids.sort();
    assert_eq!(
        ids,
        [None, Some("ne-list-1".into()), Some("ne-list-2".into())]
    );
    assert!(report
        .messages
        .iter()
        .all(|m| m.reason == "user_id: missing" && m.producer.is_none() && m.died_at.is_none()));
    // A copy the worker's user made names its producer in a header, which the list believes
    // from that user only.
    let copied = body(&platform_gpt4("u1", "ne-list-3"));
    let mut headers = FieldTable::default();
    for (k, v) in [
        ("x-credit-error", "block_id: missing"),
        ("x-credit-producer", "billing"),
    ] {
        headers.insert(k.into(), AMQPValue::LongString(v.into()));
    }
    let props = credit_worker::amqp::persistent_json()
        .with_user_id("guest".into())
        .with_headers(headers);
    publish_props(&env, &env.names.dead_queue, &copied, props).await;
    bodies.push(copied);
    let listed = env.cli_json(&["dead-letters", "list"]);
    assert_eq!(listed["depth"], 4);
    let producers: Vec<&serde_json::Value> = listed["messages"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| &m["producer"])
        .collect();
    assert_eq!(
        producers,
        [&json!(null), &json!(null), &json!(null), &json!("billing")]
    );
    let listed = env.cli_json(&["dead-letters", "list", "--limit", "2"]);
    assert_eq!(listed["depth"], 4);
    assert_eq!(listed["messages"].as_array().map(Vec::len), Some(2));
    assert_eq!(queue_depth(&env, &env.names.dead_queue).await, 4);
    bodies.sort();
    assert_eq!(drain_bodies(&env, 4).await, bodies);
    assert_eq!(queue_depth(&env, &env.names.dead_queue).await, 0);
    env.cleanup().await;
}

#[tokio::test]
async fn replay_charges_the_undecided_once_and_changes_nothing_twice() {
    let env = TestEnv::with(no_refill).await;
    seed(&env, ["u1"], 100).await;
    let worker = Worker::start(env.settings.clone()).await.expect("worker");
    let decided = body(&platform_gpt4("u1", "ne-decided"));
    env.publish(std::slice::from_ref(&decided)).await;
    env.wait_decisions(1, T).await;
    // As if dead-lettered during an outage: one already decided, one never seen.
    dead_letter(&env, &decided, "database: unreachable").await;
    let fresh = body(&platform_gpt4("u1", "ne-fresh"));
    dead_letter(&env, &fresh, "database: unreachable").await;
    let balance = || async {
        env.ledger()
            .balance("u1", Utc::now())
            .await
            .expect("balance")
    };
    let before = balance().await;

    let dry = env.cli_json(&["dead-letters", "replay", "--all", "--dry-run"]);
    assert_eq!(dry["would_replay"].as_array().map(Vec::len), Some(2));
    assert_eq!(queue_depth(&env, &env.names.dead_queue).await, 2);
    assert_eq!(env.outcome_of("ne-fresh").await, None);

    let one = ["dead-letters", "replay", "--node-exec-id", "ne-fresh"];
    let replayed = env.cli_json(&one);
    assert_eq!(replayed, serde_json::json!({"replayed": 1, "skipped": 1}));
    env.wait_decisions(2, T).await;
    assert_eq!(env.outcome_of("ne-fresh").await.as_deref(), Some("charged"));
    assert_eq!(balance().await, before - 10);
    assert_eq!(queue_depth(&env, &env.names.dead_queue).await, 1);

    let rest = env.cli_json(&["dead-letters", "replay", "--all"]);
    assert_eq!(rest, serde_json::json!({"replayed": 1, "skipped": 0}));
    let again = env.cli_json(&["dead-letters", "replay", "--all"]);
    assert_eq!(again, serde_json::json!({"replayed": 0, "skipped": 0}));
    // The duplicate is consumed and changes nothing.
    flush_users(&env, &["u1"]).await;
    assert_eq!(
        env.scalar_i64("SELECT count(*) FROM credit.decisions WHERE node_exec_id LIKE 'ne-%'")
            .await,
        2
    );
    assert_eq!(
        env.scalar_i64("SELECT count(*) FROM credit.transactions WHERE type = 'USAGE'")
            .await,
        2
    );
    assert_eq!(balance().await, before - 10);
    assert_eq!(queue_depth(&env, &env.names.dead_queue).await, 0);
    stop_audit_cleanup(env, worker).await;
}

#[tokio::test]
async fn replay_without_a_selection_is_a_usage_error() {
    let env = TestEnv::with(no_refill).await;
    let out = env.cli(&["dead-letters", "replay"]);
    assert_eq!(out.status.code(), Some(2));
    env.cleanup().await;
}

/// A dead letter the reading connection cannot take (its headers past the URL's frame_max)
/// fails the list, naming why, instead of leaving it waiting for ever.
#[tokio::test]
async fn a_dead_letter_past_the_frame_size_fails_the_list_instead_of_hanging() {
    let env = TestEnv::with(no_refill).await;
    publish_with_headers(&env, &env.names.dead_queue, b"{}", 60_000).await;
    let small = small_frames(&env);
    let listed = tokio::time::timeout(T, dead_letters::list(&small, 10)).await;
    let e = listed
        .expect("an answer, not a hang")
        .expect_err("unreadable");
    assert_eq!(
        e.to_string(),
        "dead queue: no message read within 10s; one whose headers exceed the connection's \
         frame size (amqp.url's frame_max, else the broker's) cannot be read, and the messages \
         this read held are back in the queue (README, \"A dead letter no client can read\", \
         says how to read it)"
    );
    // Read with the default frame size, it is there as it was.
    let report = dead_letters::list(&env.settings, 10).await.expect("list");
    assert_eq!(report.depth, 1);
    env.cleanup().await;
}

/// The test's settings with 32 KiB frames, which a message with 60,000 bytes of headers
/// does not fit.
fn small_frames(env: &TestEnv) -> credit_worker::config::Settings {
    let mut small = env.settings.clone();
    let sep = if small.amqp.url.contains('?') {
        '&'
    } else {
        '?'
    };
    small.amqp.url = format!("{}{sep}frame_max=32768", small.amqp.url);
    small
}

/// A replay that meets a dead letter it cannot read after moving others says how many it
/// moved: they are in the input queue, gone from the dead queue.
#[tokio::test]
async fn a_replay_stopped_by_an_unreadable_dead_letter_says_how_many_it_moved() {
    let env = TestEnv::with(no_refill).await;
    for i in 0..100 {
        let b = body(&platform_gpt4("u1", &format!("ne-moved-{i}")));
        dead_letter(&env, &b, "user_id: missing").await;
    }
    publish_with_headers(&env, &env.names.dead_queue, b"{}", 60_000).await;
    let small = small_frames(&env);
    let replayed = tokio::time::timeout(
        Duration::from_secs(60),
        dead_letters::replay(&small, &dead_letters::Selection::All, false),
    )
    .await;
    let e = replayed.expect("an answer").expect_err("unreadable");
    let text = format!("{e:#}");
    assert!(
        text.starts_with(
            "100 dead letters were replayed (and removed from the dead queue) before the \
             replay stopped, and the window it was moving may be in both queues (run it \
             again: a decided execution changes nothing): dead queue: no message read \
             within 10s"
        ),
        "{text}"
    );
    assert_eq!(queue_depth(&env, &env.names.input_queue).await, 100);
    assert_eq!(queue_depth(&env, &env.names.dead_queue).await, 1);
    env.cleanup().await;
}

/// A delivery's properties travel in one frame, which a producer may fill up to the broker's
/// frame size (128 KiB by default): a consumer that asked for smaller frames loses its
/// connection on it, and takes the same message again at every reconnect.
#[tokio::test]
async fn messages_whose_headers_fill_a_large_frame_are_decided_and_dead_lettered() {
    let env = TestEnv::with(no_refill).await;
    seed(&env, ["u1"], 100).await;
    let worker = Worker::start(env.settings.clone()).await.expect("worker");
    let before = Utc::now();
    let valid = body(&platform_gpt4("u1", "ne-big-headers"));
    let invalid = br#"{"node_exec_id": "ne-big-invalid"}"#.to_vec();
    for b in [&valid, &invalid] {
        publish_with_headers(&env, &env.names.input_queue, b, 60_000).await;
    }
    env.wait_decisions(1, T).await;
    assert_eq!(
        env.outcome_of("ne-big-headers").await.as_deref(),
        Some("charged")
    );
    wait_for(T, "the invalid one dead-lettered", || async {
        queue_depth(&env, &env.names.dead_queue).await == 1
    })
    .await;
    let listed = dead_letters::list(&env.settings, 10).await.expect("list");
    assert_eq!(listed.depth, 1);
    assert_eq!(listed.messages[0].reason, "user_id: missing");
    assert_eq!(
        listed.messages[0].node_exec_id.as_deref(),
        Some("ne-big-invalid")
    );
    assert_died_within(listed.messages[0].died_at, before, Utc::now());
    let dead = env.dead_messages(1).await;
    assert_eq!(dead[0].0, invalid);
    assert_eq!(
        header_text(&dead[0].1, "x-trace").map(|t| t.len()),
        Some(60_000)
    );
    worker.stop().await.expect("stop");
    assert_eq!(
        env.ledger()
            .balance("u1", Utc::now())
            .await
            .expect("balance"),
        90
    );
    env.cleanup().await;
}

/// A delivery past the frame size the consumer agreed: RabbitMQ takes a message whose
/// properties fill a frame to the byte (and a few bytes past it), and adds its own headers
/// when it delivers it, so the consumer's connection ends on it, and every delivery unacked
/// on it goes back to the queue with it, counted towards the delivery limit. Read one at a
/// time after that, the oversized one alone reaches the limit and is dead-lettered by the
/// broker; the 600 around it are billed, none dead-lettered.
#[tokio::test]
async fn a_delivery_past_the_frame_size_is_dead_lettered_alone() {
    let env = TestEnv::with(no_refill).await;
    let users: Vec<String> = (0..50).map(|u| format!("u{u}")).collect();
    seed(&env, &users, 10_000).await;
    let valid = |prefix: &str| -> Vec<Vec<u8>> {
        (0..300)
            .map(|i| body(&platform_gpt4(&users[i % 50], &format!("{prefix}-{i}"))))
            .collect()
    };
    env.publish(&valid("before")).await;
    // A 131,073-byte header frame (57 bytes besides the header's value).
    let oversized = body(&platform_gpt4("u0", "oversized"));
    publish_with_headers(&env, &env.names.input_queue, &oversized, 131_016).await;
    env.publish(&valid("after")).await;
    let worker = Worker::start(env.settings.clone()).await.expect("worker");
    env.wait_decisions(600, Duration::from_secs(120)).await;
    wait_for(T, "the oversized delivery dead-lettered", || async {
        queue_depth(&env, &env.names.dead_queue).await == 1
    })
    .await;
    // The first delivery not delivered before ends the reading one at a time.
    env.publish(&[body(&platform_gpt4("u0", "fresh"))]).await;
    env.wait_decisions(601, T).await;
    if broker_is_local(&env.settings.amqp.url) {
        let full = env.settings.amqp.prefetch.to_string();
        wait_for(T, "the consumer back at its full prefetch", || async {
            consumer_prefetch(&env).as_deref() == Some(full.as_str())
        })
        .await;
    }
    worker.stop().await.expect("stop");
    assert_eq!(queue_depth(&env, &env.names.input_queue).await, 0);
    assert_eq!(env.outcome_of("oversized").await, None);
    assert_eq!(
        env.scalar_i64("SELECT count(*) FROM credit.decisions WHERE outcome = 'charged'")
            .await,
        601
    );
    env.assert_audit_clean().await;
    env.cleanup().await;
}

/// The prefetch of the input queue's consumer, as the broker reports it.
fn consumer_prefetch(env: &TestEnv) -> Option<String> {
    let out = std::process::Command::new("rabbitmqctl")
        .args([
            "-q",
            "-p",
            &vhost_of(&env.settings.amqp.url),
            "list_consumers",
        ])
        .args(["queue_name", "prefetch_count", "--no-table-headers"])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        (fields.next() == Some(env.names.input_queue.as_str()))
            .then(|| fields.next().map(str::to_owned))
            .flatten()
    })
}

/// A list of the whole dead queue, then at once a replay of it all: the replay finds every
/// message the list returned (a quorum queue takes returns back after the channel sent them),
/// and leaves no dead copy of any (nor acks lost at its close).
#[tokio::test]
async fn a_replay_right_after_a_list_takes_every_message() {
    let env = TestEnv::with(no_refill).await;
    let n = 2000;
    let (conn, ch) = confirming_channel(&env).await;
    let mut confirms = Vec::new();
    for i in 0..n {
        let b = body(&platform_gpt4("u1", &format!("ne-bulk-{i}")));
        let props = credit_worker::amqp::persistent_json();
        let confirm = ch
            .basic_publish(
                "".into(),
                env.names.dead_queue.as_str().into(),
                BasicPublishOptions::default(),
                &b,
                props,
            )
            .await
            .expect("publish");
        confirms.push(confirm);
    }
    for c in confirms {
        assert!(c.await.expect("confirm").is_ack(), "nacked");
    }
    conn.close(200, "published".into()).await.expect("close");
    // In process, one right after the other: no process start between them.
    let listed = dead_letters::list(&env.settings, n).await.expect("list");
    assert_eq!(listed.messages.len(), n);
    let all = dead_letters::Selection::All;
    let replayed = dead_letters::replay(&env.settings, &all, false)
        .await
        .expect("replay");
    assert_eq!((replayed.replayed, replayed.skipped), (n, 0));
    assert_eq!(queue_depth(&env, &env.names.dead_queue).await, 0);
    assert_eq!(queue_depth(&env, &env.names.input_queue).await, n as u32);
    env.cleanup().await;
}

/// A namespace no worker ran under (a typo) is said so, exit 1, and nothing is declared in it:
/// an empty topology made there would answer "0 dead messages".
#[tokio::test]
async fn a_namespace_without_dead_letters_queue_is_refused_and_left_undeclared() {
    let env = TestEnv::with(no_refill).await;
    let namespace = format!("{}typo.", env.settings.amqp.namespace);
    // The CLI in the mistyped namespace.
    let run = |args: &[&str]| {
        env.cli_command(args)
            .env("CREDIT_WORKER__AMQP__NAMESPACE", &namespace)
            .output()
            .expect("run the CLI")
    };
    let list: &[&str] = &["dead-letters", "list"];
    for args in [list, &["dead-letters", "replay", "--all"]] {
        let out = run(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        let said = format!("there is no queue {namespace}node_execution.dead on this broker");
        assert!(stderr.contains(&said), "{args:?}: {stderr}");
    }
    let out = run(&["dead-letters", "list", "--json"]);
    let reply: serde_json::Value = serde_json::from_slice(&out.stdout).expect("a JSON error");
    assert_eq!(reply["error"]["code"], "not_found", "{reply}");
    let (_conn, ch) = env.amqp_channel().await;
    let passive = lapin::options::QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    let input = format!("{namespace}node_execution");
    let declared = ch
        .queue_declare(input.as_str().into(), passive, FieldTable::default())
        .await;
    assert!(declared.is_err(), "the input queue was declared");
    // A dead queue without its input queue (deleted to change its arguments): a replay is
    // refused before it takes anything.
    let (_conn, ch) = env.amqp_channel().await;
    let durable = lapin::options::QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    ch.queue_declare(
        format!("{namespace}node_execution.dead").as_str().into(),
        durable,
        FieldTable::default(),
    )
    .await
    .expect("declare the dead queue alone");
    let out = run(&["dead-letters", "replay", "--all"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let said = format!("there is no queue {namespace}node_execution to replay into");
    assert!(stderr.contains(&said), "{stderr}");
    // Not the test namespace's own, so not among what its cleanup deletes.
    ch.queue_delete(
        format!("{namespace}node_execution.dead").as_str().into(),
        lapin::options::QueueDeleteOptions::default(),
    )
    .await
    .expect("delete the dead queue");
    env.cleanup().await;
}
