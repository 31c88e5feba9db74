//! The control queue end to end (SPEC §8): a worker started in-process, commands published to
//! `credit.control` with a verified `user_id`, replies read from an exclusive reply queue.

use std::time::Duration;

use chrono::{Datelike, TimeZone, Utc};
use credit_worker::ledger::TxType;
use credit_worker::refill::Month;
use credit_worker::service::Worker;
use futures::StreamExt;
use lapin::options::{BasicConsumeOptions, BasicPublishOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::BasicProperties;
use serde_json::{json, Value};

use crate::fixtures::*;
use crate::helpers::*;

const REPLY_TIMEOUT: Duration = Duration::from_secs(20);

/// A control-queue client: publishes commands and waits for the matching reply.
struct Rpc {
    _conn: lapin::Connection,
    ch: lapin::Channel,
    control: String,
    reply_queue: String,
    replies: lapin::Consumer,
    next_id: u64,
    /// Replies that matched no awaited request.
    strays: usize,
    /// Each request's AMQP user, which its reply names back.
    senders: std::collections::HashMap<String, Option<String>>,
}

impl Rpc {
    async fn new(env: &TestEnv) -> Rpc {
        // amqp_channel declares the topology, so the control queue exists before the worker
        // has started consuming it.
        let (conn, ch) = env.amqp_channel().await;
        let reply_queue = credit_worker::amqp::topology::declare_private_queue(&ch)
            .await
            .expect("reply queue");
        let replies = ch
            .basic_consume(
                reply_queue.as_str().into(),
                "replies".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("consume replies");
        Rpc {
            _conn: conn,
            ch,
            control: env.names.control.clone(),
            reply_queue,
            replies,
            next_id: 0,
            strays: 0,
            senders: Default::default(),
        }
    }

    /// Publishes a raw body; returns its correlation id.
    async fn send(&mut self, body: &[u8], user_id: Option<&str>, reply: bool) -> String {
        self.send_as(body, user_id, reply, BasicProperties::default())
            .await
    }

    /// Publishes a raw body with `props` besides the request's own; returns its correlation id.
    async fn send_as(
        &mut self,
        body: &[u8],
        user_id: Option<&str>,
        reply: bool,
        props: BasicProperties,
    ) -> String {
        self.next_id += 1;
        let cid = format!("req-{}", self.next_id);
        let mut props = props
            .with_content_type("application/json".into())
            .with_correlation_id(cid.clone().into());
        if let Some(u) = user_id {
            props = props.with_user_id(u.into());
        }
        self.senders.insert(cid.clone(), user_id.map(str::to_owned));
        if reply {
            props = props.with_reply_to(self.reply_queue.clone().into());
        }
        self.ch
            .basic_publish(
                "".into(),
                self.control.as_str().into(),
                BasicPublishOptions::default(),
                body,
                props,
            )
            .await
            .expect("publish command");
        cid
    }

    /// The reply with correlation id `cid`.
    async fn reply(&mut self, cid: &str) -> Value {
        let deadline = tokio::time::Instant::now() + REPLY_TIMEOUT;
        loop {
            let d = tokio::time::timeout_at(deadline, self.replies.next())
                .await
                .unwrap_or_else(|_| panic!("no reply to {cid} in time"))
                .expect("reply stream")
                .expect("reply delivery");
            let got = d
                .properties
                .correlation_id()
                .as_ref()
                .map(|c| c.to_string());
            if got.as_deref() != Some(cid) {
                self.strays += 1;
                continue;
            }
            assert_eq!(
                d.properties.content_type().as_ref().map(|c| c.as_str()),
                Some("application/json")
            );
            // The worker's broker user, verified by the broker.
            assert_eq!(
                d.properties.user_id().as_ref().map(|u| u.as_str()),
                Some("guest")
            );
            // And the user whose command it answers.
            let requester = d.properties.headers().as_ref().and_then(|h| {
                match h.inner().get(credit_worker::control::REQUESTER_HEADER) {
                    Some(AMQPValue::LongString(u)) => Some(u.to_string()),
                    _ => None,
                }
            });
            assert_eq!(&requester, &self.senders[cid], "the requester of {cid}");
            return serde_json::from_slice(&d.data).expect("reply is JSON");
        }
    }

    async fn call_raw(&mut self, body: &[u8], user_id: Option<&str>) -> Value {
        let cid = self.send(body, user_id, true).await;
        self.reply(&cid).await
    }

    /// Sends `command` as `guest` in a message with id `message_id`; returns the result.
    async fn ok_with_id(&mut self, command: &Value, message_id: &str) -> Value {
        let props = BasicProperties::default().with_message_id(message_id.into());
        let cid = self
            .send_as(&body(command), Some("guest"), true, props)
            .await;
        let r = self.reply(&cid).await;
        assert_eq!(r["ok"], json!(true), "{command} ⇒ {r}");
        r["result"].clone()
    }

    /// Sends `command` as the broker user `guest` and returns the reply.
    async fn call(&mut self, command: Value) -> Value {
        self.call_raw(&body(&command), Some("guest")).await
    }

    /// The `result` of a successful reply.
    async fn ok(&mut self, command: Value) -> Value {
        let r = self.call(command.clone()).await;
        assert_eq!(r["ok"], json!(true), "{command} ⇒ {r}");
        assert_eq!(r.as_object().map(|o| o.len()), Some(2), "{r}");
        r["result"].clone()
    }

    /// (code, message) of a failed reply.
    async fn err_raw(&mut self, body: &[u8], user_id: Option<&str>) -> (String, String) {
        let r = self.call_raw(body, user_id).await;
        assert_eq!(
            r["ok"],
            json!(false),
            "{} ⇒ {r}",
            String::from_utf8_lossy(body)
        );
        let code = r["error"]["code"].as_str().expect("code").to_owned();
        let message = r["error"]["message"].as_str().expect("message").to_owned();
        (code, message)
    }

    async fn err(&mut self, command: Value) -> (String, String) {
        self.err_raw(&body(&command), Some("guest")).await
    }
}

async fn start(env: &TestEnv) -> Worker {
    Worker::start(env.settings.clone()).await.expect("worker")
}

async fn rows(env: &TestEnv, sql: &str, user: &str) -> Vec<(String, String, i64)> {
    sqlx::query_as(sql)
        .bind(user)
        .fetch_all(&env.pool)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
}

async fn grants(env: &TestEnv, user: &str) -> Vec<(String, String, i64)> {
    rows(
        env,
        "SELECT transaction_key, type::text, amount FROM credit.transactions
          WHERE user_id = $1 AND type = 'GRANT' ORDER BY seq",
        user,
    )
    .await
}

#[tokio::test]
async fn every_command_end_to_end() {
    // The `refill` command below is a sweep.
    let _sweeps = SWEEPS.share().await;
    // Installed before any traffic so the counters below are recorded.
    let before = metrics_now();
    let env = TestEnv::with(quiet_scheduler).await;
    let worker = start(&env).await;
    let mut rpc = Rpc::new(&env).await;
    let month = Month::of(Utc::now()).to_string();

    // balance: lazy refill makes a brand-new user start at the target.
    assert_eq!(
        rpc.ok(json!({"command": "balance", "user_id": "alice"}))
            .await,
        json!({"user_id": "alice", "balance": 1000})
    );
    // top_up with a key.
    assert_eq!(
        rpc.ok(
            json!({"command": "top_up", "user_id": "alice", "amount": 250, "key": "TU-alice-1"})
        )
        .await,
        json!({"user_id": "alice", "balance": 1250, "transaction_key": "TU-alice-1", "applied": true, "seq": 2})
    );
    // grant without a key, with a reason and an extra field that is ignored.
    let g = rpc
        .ok(json!({"command": "grant", "user_id": "alice", "amount": 100, "reason": "promo", "ticket": 7}))
        .await;
    assert_eq!(g["balance"], json!(1350));
    assert_eq!(g["applied"], json!(true));
    let grant_key = g["transaction_key"].as_str().expect("key").to_owned();
    assert!(grant_key.starts_with("GRANT-"), "{grant_key}");

    // history: newest first, limited.
    let h = rpc
        .ok(json!({"command": "history", "user_id": "alice", "limit": 2}))
        .await;
    let txs = h["transactions"].as_array().expect("transactions");
    assert_eq!(h.as_object().map(|o| o.len()), Some(2));
    assert_eq!(txs.len(), 2);
    // A full page: the next one starts below its last row.
    assert_eq!(h["next_before_seq"], json!(2));
    let pick = |t: &Value| {
        (
            t["seq"].as_i64(),
            t["transaction_key"].as_str().map(str::to_owned),
            t["type"].as_str().map(str::to_owned),
            t["amount"].as_i64(),
            t["running_balance"].as_i64(),
            t["metadata"].clone(),
        )
    };
    assert_eq!(
        pick(&txs[0]),
        (
            Some(3),
            Some(grant_key.clone()),
            Some("GRANT".into()),
            Some(100),
            Some(1350),
            json!({"reason": "promo"})
        )
    );
    assert_eq!(
        pick(&txs[1]),
        (
            Some(2),
            Some("TU-alice-1".into()),
            Some("TOP_UP".into()),
            Some(250),
            Some(1250),
            json!({})
        )
    );
    for t in txs {
        let at = t["created_at"].as_str().expect("created_at");
        chrono::DateTime::parse_from_rfc3339(at).expect("RFC 3339 created_at");
        assert_eq!(t.as_object().map(|o| o.len()), Some(7), "{t}");
    }
    // history with the default limit: all three rows, the refill grant last.
    let all = rpc
        .ok(json!({"command": "history", "user_id": "alice"}))
        .await;
    assert_eq!(
        all["next_before_seq"],
        Value::Null,
        "a short page is the last"
    );
    let all = all["transactions"]
        .as_array()
        .expect("transactions")
        .clone();
    assert_eq!(all.len(), 3);
    assert_eq!(
        (
            all[2]["seq"].as_i64(),
            all[2]["transaction_key"].as_str(),
            all[2]["amount"].as_i64()
        ),
        (
            Some(1),
            Some(format!("MONTHLY-CREDIT-TOP-UP-{month}").as_str()),
            Some(1000)
        )
    );

    // outcome: not_found before the decision, then the decision.
    let (code, message) = rpc
        .err(json!({"command": "outcome", "node_exec_id": "ne-charged"}))
        .await;
    assert_eq!(code, "not_found");
    assert!(message.contains("ne-charged"), "{message}");
    env.publish(&[
        body(&platform_gpt4("bob", "ne-charged")),
        body(&own_key("bob", "ne-free")),
    ])
    .await;
    env.wait_decisions(2, Duration::from_secs(20)).await;
    assert_eq!(
        rpc.ok(json!({"command": "outcome", "node_exec_id": "ne-charged"}))
            .await,
        json!({"user_id": "bob", "block_id": TEXT_GEN, "outcome": "charged", "cost": 10,
               "transaction_key": "USAGE-ne-charged", "fee": 0, "settlement": null})
    );
    assert_eq!(
        rpc.ok(json!({"command": "outcome", "node_exec_id": "ne-free"}))
            .await,
        json!({"user_id": "bob", "block_id": TEXT_GEN, "outcome": "free", "cost": 0, "fee": 0,
               "settlement": null})
    );
    assert_eq!(
        rpc.ok(json!({"command": "balance", "user_id": "bob"}))
            .await,
        json!({"user_id": "bob", "balance": 990})
    );

    // refill for the current month (the default): everyone was refilled lazily already.
    assert_eq!(
        rpc.ok(json!({"command": "refill"})).await,
        json!({"month": month, "users_refilled": 0, "credits_granted": 0})
    );

    let after = metrics_now();
    for (command, result, n) in [
        ("balance", "ok", 2.0),
        ("top_up", "ok", 1.0),
        ("grant", "ok", 1.0),
        ("history", "ok", 2.0),
        ("outcome", "ok", 2.0),
        ("outcome", "not_found", 1.0),
        ("refill", "ok", 1.0),
    ] {
        let labels = [("command", command), ("result", result)];
        let delta = metric_value(&after, "credit_control_commands_total", &labels)
            - metric_value(&before, "credit_control_commands_total", &labels);
        assert!(delta >= n, "{command}/{result}: +{delta}, expected ≥ {n}");
    }

    stop_audit_cleanup(env, worker).await;
}

#[tokio::test]
async fn refill_resets_users_below_target_once_per_month() {
    let _sweeps = SWEEPS.share().await;
    let env = TestEnv::with(|s| {
        quiet_scheduler(s);
        // Balances stay where the top-ups put them until the sweep.
        s.refill.lazy = false;
    })
    .await;
    let worker = start(&env).await;
    let mut rpc = Rpc::new(&env).await;

    assert_eq!(
        rpc.ok(json!({"command": "top_up", "user_id": "user-a", "amount": 400, "key": "SEED-A"}))
            .await["balance"],
        json!(400)
    );
    assert_eq!(
        rpc.ok(json!({"command": "top_up", "user_id": "user-b", "amount": 1100, "key": "SEED-B"}))
            .await["balance"],
        json!(1100)
    );
    assert_eq!(
        env.scalar_i64("SELECT count(*) FROM credit.balances").await,
        2
    );

    assert_eq!(
        rpc.ok(json!({"command": "refill", "month": "2031-05"}))
            .await,
        json!({"month": "2031-05", "users_refilled": 1, "credits_granted": 600})
    );
    assert_eq!(
        grants(&env, "user-a").await,
        vec![(
            "MONTHLY-CREDIT-TOP-UP-2031-05".to_owned(),
            "GRANT".to_owned(),
            600
        )]
    );
    assert_eq!(grants(&env, "user-b").await, vec![]);
    assert_eq!(
        rpc.ok(json!({"command": "balance", "user_id": "user-a"}))
            .await,
        json!({"user_id": "user-a", "balance": 1000})
    );
    assert_eq!(
        rpc.ok(json!({"command": "balance", "user_id": "user-b"}))
            .await,
        json!({"user_id": "user-b", "balance": 1100})
    );

    // The same month again: nothing.
    assert_eq!(
        rpc.ok(json!({"command": "refill", "month": "2031-05"}))
            .await,
        json!({"month": "2031-05", "users_refilled": 0, "credits_granted": 0})
    );
    assert_eq!(
        env.scalar_i64("SELECT count(*) FROM credit.transactions WHERE type = 'GRANT'")
            .await,
        1
    );

    // One user only: user-c at 300 gets 700; nobody else is touched.
    rpc.ok(json!({"command": "top_up", "user_id": "user-c", "amount": 300, "key": "SEED-C"}))
        .await;
    assert_eq!(
        rpc.ok(json!({"command": "refill", "month": "2031-06", "user_id": "user-c"}))
            .await,
        json!({"month": "2031-06", "users_refilled": 1, "credits_granted": 700})
    );
    assert_eq!(
        grants(&env, "user-c").await,
        vec![(
            "MONTHLY-CREDIT-TOP-UP-2031-06".to_owned(),
            "GRANT".to_owned(),
            700
        )]
    );
    assert_eq!(grants(&env, "user-a").await.len(), 1);

    stop_audit_cleanup(env, worker).await;
}

/// SPEC §6: any month may be named. With the lazy refill on, a user is evaluated for the
/// current month by their first operation; a month before it, named later, grants nothing,
/// for everyone or for that user: the user did not exist then, and "target − the balance now"
/// would be owed for no month.
#[tokio::test]
async fn a_past_month_named_after_the_lazy_refill_grants_nothing() {
    let _sweeps = SWEEPS.share().await;
    let env = TestEnv::with(quiet_scheduler).await;
    let worker = start(&env).await;
    let mut rpc = Rpc::new(&env).await;
    let ago = |months: u32| {
        let day = Utc::now().date_naive() - chrono::Months::new(months);
        day.format("%Y-%m").to_string()
    };
    let (current, back) = (ago(0), ago(2));
    // The first operation refills to 1000 for the current month; one execution costs 10.
    env.publish(&[body(&platform_gpt4("user-a", "bf-1"))]).await;
    env.wait_decisions(1, Duration::from_secs(30)).await;
    for cmd in [
        json!({"command": "refill", "month": back}),
        json!({"command": "refill", "month": back, "user_id": "user-a"}),
        json!({"command": "refill", "month": current}),
    ] {
        let month = cmd["month"].clone();
        assert_eq!(
            rpc.ok(cmd).await,
            json!({"month": month, "users_refilled": 0, "credits_granted": 0})
        );
    }
    let keys: Vec<String> = grants(&env, "user-a")
        .await
        .into_iter()
        .map(|(key, _, _)| key)
        .collect();
    assert_eq!(keys, [format!("MONTHLY-CREDIT-TOP-UP-{current}")]);
    let marked = env
        .scalar_i64(&format!(
            "SELECT count(*) FROM credit.balances
              WHERE user_id = 'user-a' AND refill_month = '{current}-01'"
        ))
        .await;
    assert_eq!(marked, 1, "the current month stays evaluated");
    assert_eq!(
        rpc.ok(json!({"command": "balance", "user_id": "user-a"}))
            .await,
        json!({"user_id": "user-a", "balance": 990})
    );
    stop_audit_cleanup(env, worker).await;
}

#[tokio::test]
async fn refill_when_disabled_is_a_bad_request() {
    let env = TestEnv::with(|s| s.refill.enabled = false).await;
    let worker = start(&env).await;
    let mut rpc = Rpc::new(&env).await;
    assert_eq!(
        rpc.err(json!({"command": "refill", "month": "2031-05"}))
            .await,
        ("bad_request".to_owned(), "refill is disabled".to_owned())
    );
    assert_eq!(
        env.scalar_i64("SELECT count(*) FROM credit.transactions")
            .await,
        0
    );
    stop_audit_cleanup(env, worker).await;
}

/// A dead letter is its producer's, not the worker's: a command sent to the input queue and
/// dead-lettered by the worker into a control queue bound to the dead letters' exchange goes
/// out under the worker's own user_id, allowed, but is refused as its producer's.
#[tokio::test]
async fn a_command_dead_lettered_into_control_is_its_producers() {
    use lapin::options::QueueBindOptions;
    use lapin::types::AMQPValue;

    let env = TestEnv::with(quiet_scheduler).await;
    let worker = start(&env).await;
    let mut rpc = Rpc::new(&env).await;
    rpc.ch
        .queue_bind(
            env.names.control.as_str().into(),
            env.names.dlx.as_str().into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("bind control to the dead letters");
    // What a producer `mallory` publishes looks like this once the worker's own user (guest
    // here) vouches for it: a dead letter copied by the worker carries the same.
    let mut headers = FieldTable::default();
    headers.insert(
        "x-credit-producer".into(),
        AMQPValue::LongString("mallory".into()),
    );
    let props = BasicProperties::default()
        .with_user_id("guest".into())
        .with_headers(headers)
        .with_correlation_id("laundered".into())
        .with_reply_to(rpc.reply_queue.clone().into());
    let grant = json!({"command": "grant", "user_id": "mallory", "amount": 1_000_000});
    rpc.ch
        .basic_publish(
            "".into(),
            env.names.input_queue.as_str().into(),
            BasicPublishOptions::default(),
            &body(&grant),
            props,
        )
        .await
        .expect("publish to the input queue");
    // Answered as mallory's command: the reply names the producer the copy carries.
    rpc.senders
        .insert("laundered".into(), Some("mallory".into()));
    let r = rpc.reply("laundered").await;
    assert_eq!(r["error"]["code"], json!("forbidden"), "{r}");
    let message = r["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("mallory"), "{r}");
    assert_eq!(
        env.scalar_i64("SELECT count(*) FROM credit.transactions")
            .await,
        0
    );
    stop_audit_cleanup(env, worker).await;
}

#[tokio::test]
async fn senders_outside_allowed_users_are_forbidden_and_change_nothing() {
    let env = TestEnv::with(|s| {
        quiet_scheduler(s);
        // The broker lets this connection claim only `guest`, which is now not allowed.
        s.control.allowed_users = vec!["ops".into()];
    })
    .await;
    let worker = start(&env).await;
    let mut rpc = Rpc::new(&env).await;

    let top_up = body(&json!({"command": "top_up", "user_id": "mallory", "amount": 500}));
    let (code, message) = rpc.err_raw(&top_up, Some("guest")).await;
    assert_eq!(code, "forbidden");
    assert!(message.contains("guest"), "{message}");
    let (code, _) = rpc.err_raw(&top_up, None).await;
    assert_eq!(code, "forbidden");
    let refill = body(&json!({"command": "refill", "month": "2031-05"}));
    assert_eq!(rpc.err_raw(&refill, Some("guest")).await.0, "forbidden");
    // Even a malformed body is refused as forbidden first, without being looked at.
    assert_eq!(rpc.err_raw(b"{nope", None).await.0, "forbidden");

    // Not even the balance row a lazy refill would create.
    assert_eq!(
        env.scalar_i64("SELECT count(*) FROM credit.balances").await,
        0
    );
    assert_eq!(
        env.scalar_i64("SELECT count(*) FROM credit.transactions")
            .await,
        0
    );
    stop_audit_cleanup(env, worker).await;
}

#[tokio::test]
async fn malformed_commands_get_bad_request_naming_the_field() {
    let env = TestEnv::with(quiet_scheduler).await;
    let worker = start(&env).await;
    let mut rpc = Rpc::new(&env).await;

    let (code, message) = rpc
        .err_raw(b"{\"command\": \"balance\",", Some("guest"))
        .await;
    assert_eq!(code, "bad_request");
    assert!(message.starts_with("malformed JSON"), "{message}");
    let (code, _) = rpc.err_raw(b"\xff\xfe", Some("guest")).await;
    assert_eq!(code, "bad_request");
    let (code, message) = rpc.err_raw(b"[\"balance\"]", Some("guest")).await;
    assert_eq!(code, "bad_request");
    assert!(message.contains("object"), "{message}");
    // Two amounts: which was meant is unknowable, so neither is credited.
    let twice = br#"{"command": "top_up", "user_id": "u2", "amount": 5, "amount": 7}"#;
    let (code, message) = rpc.err_raw(twice, Some("guest")).await;
    assert_eq!(
        (code.as_str(), message.as_str()),
        ("bad_request", "amount: given more than once")
    );
    assert_eq!(
        env.scalar_i64("SELECT count(*) FROM credit.transactions WHERE user_id = 'u2'")
            .await,
        0
    );

    let cases = [
        (json!({}), "command: missing"),
        (json!({"command": 3}), "command: expected a string"),
        (json!({"command": "balance"}), "user_id: missing"),
        (
            json!({"command": "balance", "user_id": null}),
            "user_id: missing",
        ),
        (
            json!({"command": "balance", "user_id": 42}),
            "user_id: expected a string",
        ),
        (
            json!({"command": "balance", "user_id": ""}),
            "user_id: must be 1 to 255 bytes",
        ),
        (
            json!({"command": "balance", "user_id": "u".repeat(256)}),
            "user_id: must be 1 to 255 bytes",
        ),
        (
            json!({"command": "top_up", "user_id": "u"}),
            "amount: missing",
        ),
        (
            json!({"command": "top_up", "user_id": "u", "amount": "100"}),
            "amount: expected an integer",
        ),
        (
            json!({"command": "grant", "user_id": "u", "amount": 1.5}),
            "amount: expected an integer (digits, without a fraction or exponent)",
        ),
        (
            json!({"command": "grant", "user_id": "u", "amount": 100.0}),
            "amount: expected an integer (digits, without a fraction or exponent)",
        ),
        (
            json!({"command": "top_up", "user_id": "u", "amount": 5, "key": 9}),
            "key: expected a string",
        ),
        (
            json!({"command": "top_up", "user_id": "u", "amount": 5, "key": ""}),
            "key: must be 1 to 512 bytes",
        ),
        (
            json!({"command": "history", "user_id": "u", "limit": "ten"}),
            "limit: expected an integer",
        ),
        (
            json!({"command": "history", "user_id": "u", "limit": 0}),
            "limit: must be between 1 and 1000",
        ),
        (json!({"command": "outcome"}), "node_exec_id: missing"),
        (
            json!({"command": "top_up", "user_id": "u", "amount": 5, "key": "USAGE-n1"}),
            "key: the prefix USAGE- is reserved for the worker's own ledger rows",
        ),
        (
            json!({"command": "grant", "user_id": "u", "amount": 5,
                   "key": "MONTHLY-CREDIT-TOP-UP-2031-05"}),
            "key: the prefix MONTHLY-CREDIT-TOP-UP- is reserved for the worker's own ledger rows",
        ),
        (
            json!({"command": "refill", "month": "2031-13"}),
            "month: expected YYYY-MM (e.g. 2026-12), got \"2031-13\"",
        ),
        (
            json!({"command": "refill", "month": 202105}),
            "month: expected a string",
        ),
        // PostgreSQL text cannot hold NUL, whichever field it is in.
        (
            json!({"command": "balance", "user_id": "a\u{0}b"}),
            "user_id: contains a NUL character",
        ),
        (
            json!({"command": "outcome", "node_exec_id": "n\u{0}"}),
            "node_exec_id: contains a NUL character",
        ),
        (
            json!({"command": "grant", "user_id": "u", "amount": 5, "reason": "\u{0}"}),
            "reason: contains a NUL character",
        ),
        (
            json!({"command": "history", "user_id": "u", "graph_exec_id": "g\u{0}"}),
            "graph_exec_id: contains a NUL character",
        ),
    ];
    for (command, expected) in cases {
        assert_eq!(
            rpc.err(command.clone()).await,
            ("bad_request".to_owned(), expected.to_owned()),
            "{command}"
        );
    }
    let (code, message) = rpc.err(json!({"command": "drop_tables"})).await;
    assert_eq!(code, "bad_request");
    assert!(
        message.starts_with("command: unknown command \"drop_tables\""),
        "{message}"
    );

    // The loop is still answering, and nothing was written (a `key: ""` top-up is refused
    // before the transaction commits).
    assert_eq!(
        env.scalar_i64("SELECT count(*) FROM credit.transactions")
            .await,
        0
    );
    assert_eq!(
        rpc.ok(json!({"command": "balance", "user_id": "still-here"}))
            .await,
        json!({"user_id": "still-here", "balance": 1000})
    );
    stop_audit_cleanup(env, worker).await;
}

#[tokio::test]
async fn amounts_out_of_range_are_refused() {
    let env = TestEnv::with(quiet_scheduler).await;
    let worker = start(&env).await;
    let mut rpc = Rpc::new(&env).await;

    for raw in [
        r#"{"command": "top_up", "user_id": "u", "amount": 0}"#,
        r#"{"command": "top_up", "user_id": "u", "amount": -5}"#,
        r#"{"command": "grant", "user_id": "u", "amount": 1e30}"#,
        r#"{"command": "grant", "user_id": "u", "amount": -1e30}"#,
        r#"{"command": "top_up", "user_id": "u", "amount": 99999999999999999999}"#,
        r#"{"command": "top_up", "user_id": "u", "amount": 9223372036854775808}"#,
    ] {
        let (code, message) = rpc.err_raw(raw.as_bytes(), Some("guest")).await;
        assert_eq!(code, "amount_out_of_range", "{raw}: {message}");
        assert!(message.starts_with("amount: "), "{raw}: {message}");
    }
    assert_eq!(
        env.scalar_i64("SELECT count(*) FROM credit.transactions")
            .await,
        0
    );

    // i64::MAX itself parses, but on top of the 1000 the user starts with it overflows.
    assert_eq!(
        rpc.ok(json!({"command": "balance", "user_id": "u"})).await["balance"],
        json!(1000)
    );
    let (code, message) = rpc
        .err(json!({"command": "top_up", "user_id": "u", "amount": i64::MAX, "key": "HUGE"}))
        .await;
    assert_eq!(code, "amount_out_of_range");
    assert!(message.contains("overflows"), "{message}");
    assert_eq!(
        rpc.ok(json!({"command": "balance", "user_id": "u"})).await["balance"],
        json!(1000)
    );
    assert_eq!(
        env.scalar_i64("SELECT count(*) FROM credit.transactions")
            .await,
        1,
        "only the refill grant"
    );
    stop_audit_cleanup(env, worker).await;
}

#[tokio::test]
async fn top_up_with_the_same_key_applies_once() {
    let env = TestEnv::with(quiet_scheduler).await;
    let worker = start(&env).await;
    let mut rpc = Rpc::new(&env).await;
    let cmd = json!({"command": "top_up", "user_id": "carol", "amount": 300, "key": "ORDER-17"});
    assert_eq!(
        rpc.ok(cmd.clone()).await,
        json!({"user_id": "carol", "balance": 1300, "transaction_key": "ORDER-17", "applied": true, "seq": 2})
    );
    assert_eq!(
        rpc.ok(cmd).await,
        json!({"user_id": "carol", "balance": 1300, "transaction_key": "ORDER-17", "applied": false, "seq": 2})
    );
    // The key names that top-up of 300: reused for another amount or type it is refused,
    // not answered as already applied.
    let reuse = "key: ORDER-17 already names a TOP_UP of 300 credits; this request is a";
    for (command, amount, asked) in [
        ("top_up", 301, "TOP_UP of 301"),
        ("grant", 300, "GRANT of 300"),
    ] {
        let (code, message) = rpc
            .err(json!({"command": command, "user_id": "carol", "amount": amount, "key": "ORDER-17"}))
            .await;
        assert_eq!(
            (code.as_str(), message.as_str()),
            (
                "bad_request",
                format!("{reuse} {asked}: give it a key of its own").as_str()
            )
        );
    }
    assert_eq!(
        rpc.ok(json!({"command": "balance", "user_id": "carol"}))
            .await["balance"],
        json!(1300)
    );
    assert_eq!(
        env.scalar_i64("SELECT count(*) FROM credit.transactions WHERE type = 'TOP_UP'")
            .await,
        1
    );
    stop_audit_cleanup(env, worker).await;
}

/// A refund (of a purchase refunded or lost in a dispute) takes back at most what the purchase
/// has left, once per key, even where the credits were spent (the balance falls below 0); it
/// names a TOP_UP of the user, and requests no auto top-up however low the balance falls.
#[tokio::test]
async fn a_refund_takes_back_a_purchase_once_and_never_more_than_it() {
    let env = TestEnv::with(quiet_scheduler).await;
    let worker = start(&env).await;
    let mut rpc = Rpc::new(&env).await;
    let top_up = json!({"command": "top_up", "user_id": "dave", "amount": 300, "key": "pi_1"});
    assert_eq!(rpc.ok(top_up).await["balance"], json!(1300));
    let auto =
        json!({"command": "auto_top_up", "user_id": "dave", "threshold": 1200, "amount": 500});
    assert_eq!(rpc.ok(auto).await["requested"], json!(false));
    let refund = |amount: i64, key: &str, top_up_key: &str| {
        json!({"command": "refund", "user_id": "dave", "amount": amount, "key": key,
               "top_up_key": top_up_key, "reason": "chargeback"})
    };
    let done = |balance: i64, key: &str, applied: bool, seq: i64| json!({"user_id": "dave", "balance": balance, "transaction_key": key, "applied": applied, "seq": seq});
    assert_eq!(
        rpc.ok(refund(200, "re_1", "pi_1")).await,
        done(1100, "re_1", true, 3)
    );
    assert_eq!(
        rpc.ok(refund(200, "re_1", "pi_1")).await,
        done(1100, "re_1", false, 3)
    );
    // A request's id is its fulfilment's only, even before it is issued.
    let (code, message) = rpc.err(refund(1, "AUTO-TOP-UP-dave-1", "pi_1")).await;
    assert_eq!(code, "bad_request");
    assert!(
        message.starts_with("key: AUTO-TOP-UP-dave-1 has the form"),
        "{message}"
    );
    // The same refund id for another purchase is a caller's mistake, not "already applied".
    let elsewhere = rpc.err(refund(200, "re_1", "pi_2")).await;
    assert_eq!(
        (elsewhere.0.as_str(), elsewhere.1.as_str()),
        (
            "bad_request",
            "top_up_key: re_1 already names a refund of pi_1; this request is one of pi_2: \
             give it a key of its own"
        )
    );
    let over = rpc.err(refund(101, "re_2", "pi_1")).await;
    let left =
        "amount: 101 is more than the 100 of TOP_UP pi_1 not yet refunded (200 of 300 refunded)";
    assert_eq!(
        (over.0.as_str(), over.1.as_str()),
        ("amount_out_of_range", left)
    );
    let grant = json!({"command": "grant", "user_id": "dave", "amount": 5, "key": "g_1"});
    rpc.ok(grant).await;
    let not_bought = rpc.err(refund(1, "re_2", "g_1")).await;
    assert_eq!(
        (not_bought.0.as_str(), not_bought.1.as_str()),
        (
            "bad_request",
            "top_up_key: g_1 names a GRANT; only a TOP_UP can be refunded"
        )
    );
    let unknown = rpc.err(refund(1, "re_2", "pi_9")).await;
    assert_eq!(
        (unknown.0.as_str(), unknown.1.as_str()),
        (
            "not_found",
            "top_up_key: the user has no ledger row under pi_9"
        )
    );
    let (code, _) = rpc
        .err(json!({"command": "refund", "user_id": "dave", "amount": 1, "top_up_key": "pi_1"}))
        .await;
    assert_eq!(code, "bad_request");
    // Spent down to 5, then the last 100 of the purchase refunded: a debt of 95.
    env.ledger()
        .spend("dave", 1100, "S-1", json!({}), Utc::now())
        .await
        .expect("spend");
    assert_eq!(
        rpc.ok(refund(100, "re_3", "pi_1")).await,
        done(-95, "re_3", true, 6)
    );
    let page = rpc
        .ok(json!({"command": "history", "user_id": "dave", "type": "REFUND"}))
        .await;
    let refunds: Vec<(&Value, &Value)> = page["transactions"]
        .as_array()
        .map(|t| t.iter().map(|r| (&r["amount"], &r["metadata"])).collect())
        .unwrap_or_default();
    let metadata = json!({"top_up_key": "pi_1", "reason": "chargeback"});
    assert_eq!(
        refunds,
        [(&json!(-100), &metadata), (&json!(-200), &metadata)]
    );
    // A refund that crosses the low-balance threshold (500) says so, as any debit does.
    let top_up = json!({"command": "top_up", "user_id": "erin", "amount": 300, "key": "pi_e"});
    rpc.ok(top_up).await;
    env.ledger()
        .spend("erin", 700, "S-1", json!({}), Utc::now())
        .await
        .expect("spend");
    let erin = json!({"command": "refund", "user_id": "erin", "amount": 200, "key": "re_e",
                      "top_up_key": "pi_e"});
    assert_eq!(rpc.ok(erin).await["balance"], json!(400));
    let low = env
        .scalar_i64(
            "SELECT count(*) FROM credit.outbox
              WHERE routing_key = 'balance.low' AND event_id = 'balance.low:erin:4'",
        )
        .await;
    assert_eq!(low, 1);
    // The spend's request only (made at its row, 5): neither refund asked for a top-up,
    // though the first took the balance below the threshold.
    let requests = env
        .scalar_i64(
            "SELECT coalesce(sum((payload->>'seq')::int8 * 100 + events), 0)::int8
               FROM credit.outbox WHERE routing_key = 'top_up.requested'",
        )
        .await;
    assert_eq!(requests, 5 * 100 + 1);
    stop_audit_cleanup(env, worker).await;
}

/// A message delivered twice (redelivered after a crash between commit and ack, or published
/// again by a producer whose confirm was lost) carries the same `message_id`: an unkeyed
/// credit is keyed by it, so it applies once.
#[tokio::test]
async fn an_unkeyed_credit_is_keyed_by_its_message_id() {
    let env = TestEnv::with(quiet_scheduler).await;
    let worker = start(&env).await;
    let mut rpc = Rpc::new(&env).await;
    let top_up = json!({"command": "top_up", "user_id": "erin", "amount": 250});
    let result = |balance: i64, key: &str, applied: bool, seq: i64| json!({"user_id": "erin", "balance": balance, "transaction_key": key, "applied": applied, "seq": seq});
    assert_eq!(
        rpc.ok_with_id(&top_up, "pay-7").await,
        result(1250, "TOP-UP-MSG-5:guest-pay-7", true, 2)
    );
    assert_eq!(
        rpc.ok_with_id(&top_up, "pay-7").await,
        result(1250, "TOP-UP-MSG-5:guest-pay-7", false, 2)
    );
    // Another message is another credit; a grant's key is its own; an explicit key wins.
    assert_eq!(
        rpc.ok_with_id(&top_up, "pay-8").await,
        result(1500, "TOP-UP-MSG-5:guest-pay-8", true, 3)
    );
    let grant = json!({"command": "grant", "user_id": "erin", "amount": 5});
    assert_eq!(
        rpc.ok_with_id(&grant, "pay-7").await,
        result(1505, "GRANT-MSG-5:guest-pay-7", true, 4)
    );
    let keyed = json!({"command": "top_up", "user_id": "erin", "amount": 1, "key": "K-1"});
    assert_eq!(
        rpc.ok_with_id(&keyed, "pay-7").await,
        result(1506, "K-1", true, 5)
    );
    // Without a message_id each delivery is credited (the documented limit of unkeyed).
    for balance in [1756, 2006] {
        let r = rpc.ok(top_up.clone()).await;
        assert_eq!(r["balance"], json!(balance), "{r}");
        assert_eq!(r["applied"], json!(true), "{r}");
    }
    // A caller's key may not take that form: it would answer for a later message's credit.
    for key in ["TOP-UP-MSG-guest-pay-9", "GRANT-MSG-guest-pay-9"] {
        let (code, message) = rpc
            .err(json!({"command": "top_up", "user_id": "erin", "amount": 4, "key": key}))
            .await;
        assert_eq!(code, "bad_request", "{key}: {message}");
        assert!(
            message.contains("key") && message.contains("reserved"),
            "{message}"
        );
    }
    // A message_id that cannot make a key is refused, naming it, and changes nothing.
    let props = BasicProperties::default().with_message_id("pay\u{0}9".into());
    let cid = rpc
        .send_as(&body(&top_up), Some("guest"), true, props)
        .await;
    let r = rpc.reply(&cid).await;
    assert_eq!(r["error"]["code"], json!("bad_request"), "{r}");
    assert!(
        r["error"]["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("message_id:")),
        "{r}"
    );
    assert_eq!(
        env.scalar_i64("SELECT count(*) FROM credit.transactions WHERE type = 'TOP_UP'")
            .await,
        5
    );
    stop_audit_cleanup(env, worker).await;
}

#[tokio::test]
async fn command_without_reply_to_is_still_executed() {
    let env = TestEnv::with(quiet_scheduler).await;
    let worker = start(&env).await;
    let mut rpc = Rpc::new(&env).await;
    rpc.send(
        &body(&json!({"command": "grant", "user_id": "dave", "amount": 70, "key": "NO-REPLY-1"})),
        Some("guest"),
        false,
    )
    .await;
    wait_count(
        &env,
        Duration::from_secs(20),
        "the grant without reply_to",
        "SELECT count(*) FROM credit.transactions WHERE transaction_key = 'NO-REPLY-1'",
        &[],
        |n| n == 1,
    )
    .await;
    assert_eq!(
        env.ledger()
            .balance("dave", Utc::now())
            .await
            .expect("balance"),
        1070
    );
    assert_eq!(
        rpc.ok(json!({"command": "balance", "user_id": "dave"}))
            .await,
        json!({"user_id": "dave", "balance": 1070})
    );
    // Nothing was sent back for it: the first reply on the queue was the balance's.
    assert_eq!(rpc.strays, 0);
    stop_audit_cleanup(env, worker).await;
}

#[tokio::test]
async fn database_outage_gets_internal_and_the_loop_carries_on() {
    let env = TestEnv::with(quiet_scheduler).await;
    let worker = start(&env).await;
    let mut rpc = Rpc::new(&env).await;
    assert_eq!(
        rpc.ok(json!({"command": "balance", "user_id": "erin"}))
            .await["balance"],
        json!(1000)
    );

    let admin = env.admin_pool().await;
    env.set_reachable(&admin, false).await;

    let top_up = json!({"command": "top_up", "user_id": "erin", "amount": 5, "key": "OUTAGE-1"});
    let (code, message) = rpc.err(top_up.clone()).await;
    assert_eq!(code, "internal");
    assert!(message.starts_with("database: "), "{message}");

    env.set_reachable(&admin, true).await;
    admin.close().await;
    // The failed request was acked (it is not redelivered behind our back) and the same
    // keyed command now applies exactly once.
    assert_eq!(
        rpc.ok(top_up.clone()).await,
        json!({"user_id": "erin", "balance": 1005, "transaction_key": "OUTAGE-1", "applied": true, "seq": 2})
    );
    assert_eq!(rpc.ok(top_up).await["applied"], json!(false));
    assert_eq!(rpc.strays, 0);
    stop_audit_cleanup(env, worker).await;
}

/// A refill command still running at SIGTERM (here waiting on a user's row lock) is given up,
/// as the scheduled sweep is: the worker stops at once, exit 0, and the command, not acked,
/// comes back at the next start, which completes and answers it.
#[tokio::test]
async fn a_refill_command_running_at_sigterm_is_given_up_and_answered_after_the_restart() {
    let env = TestEnv::with(no_refill).await;
    let users: Vec<String> = (0..20).map(|i| format!("rf-{i:02}")).collect();
    seed(&env, &users, 1).await;
    let mut vars = env.process_env();
    vars.push((
        "CREDIT_WORKER__REFILL__SCHEDULE".into(),
        "0 0 0 1 1 * 2099".into(),
    ));
    let held = env.hold_account("rf-10").await;
    let mut w = WorkerProcess::spawn(&vars, &["run"]);
    let mut rpc = Rpc::new(&env).await;
    let now = Utc::now();
    let next = match now.month() {
        12 => format!("{}-01", now.year() + 1),
        m => format!("{}-{:02}", now.year(), m + 1),
    };
    let refill = json!({"command": "refill", "month": next});
    let cid = rpc.send(&body(&refill), Some("guest"), true).await;
    env.wait_for_one_lock_waiter(REPLY_TIMEOUT, "the refill waiting on the lock")
        .await;
    w.sigterm();
    assert_eq!(w.wait_exit(Duration::from_secs(8)).await, Some(0));
    held.commit().await.expect("release the lock");

    let mut w = WorkerProcess::spawn(&vars, &["run"]);
    let reply = rpc.reply(&cid).await;
    assert_eq!(
        reply,
        json!({"ok": true, "result": {"credits_granted": 20 * 999, "month": next, "users_refilled": 20}})
    );
    w.sigterm();
    assert_eq!(w.wait_exit(REPLY_TIMEOUT).await, Some(0));
    env.assert_audit_clean().await;
    env.cleanup().await;
}

/// A top-up held up on its account's row lock at SIGTERM is given up within the stop's
/// bound, unacked, and the stop is clean (exit 0, as for a batch held the same way); after
/// the restart it comes again, lands once and is answered.
#[tokio::test]
async fn a_top_up_held_on_a_lock_at_sigterm_is_given_up_and_lands_once_after_the_restart() {
    let env = TestEnv::with(no_refill).await;
    seed(&env, ["hl"], 100).await;
    let mut vars = env.process_env();
    // No catch-up sweep, which would wait on the same row.
    vars.push(("CREDIT_WORKER__REFILL__ENABLED".into(), "false".into()));
    let held = env.hold_account("hl").await;
    let mut w = WorkerProcess::spawn(&vars, &["run"]);
    let mut rpc = Rpc::new(&env).await;
    let top_up = json!({"command": "top_up", "user_id": "hl", "amount": 50, "key": "TU-hl"});
    let cid = rpc.send(&body(&top_up), Some("guest"), true).await;
    env.wait_for_one_lock_waiter(REPLY_TIMEOUT, "the top-up waiting on the lock")
        .await;
    w.sigterm();
    assert_eq!(w.wait_exit(Duration::from_secs(11)).await, Some(0));
    held.commit().await.expect("release the lock");

    let mut w = WorkerProcess::spawn(&vars, &["run"]);
    assert_eq!(
        rpc.reply(&cid).await,
        json!({"ok": true, "result": {"user_id": "hl", "balance": 150, "transaction_key": "TU-hl", "applied": true, "seq": 2}})
    );
    w.sigterm();
    assert_eq!(w.wait_exit(REPLY_TIMEOUT).await, Some(0));
    env.assert_audit_clean().await;
    env.cleanup().await;
}

/// A command nobody awaits a reply to (no `reply_to`: a payment side's fire-and-forget
/// `top_up`) is retried through a database outage, past the attempts a waiting requester gets;
/// after `control.unanswered_retry_s` it goes back to the queue and comes again, and it lands
/// once the database is back.
#[tokio::test]
async fn a_command_without_reply_to_waits_out_a_database_outage() {
    let env = TestEnv::with(quiet_scheduler).await;
    let mut vars = env.process_env();
    vars.push((
        "CREDIT_WORKER__CONTROL__UNANSWERED_RETRY_S".into(),
        "1".into(),
    ));
    let (mut w, _port, log) =
        WorkerProcess::spawn_logged(&vars, &["run"], "warn,credit_worker::telemetry=info");
    let mut rpc = Rpc::new(&env).await;
    assert_eq!(
        rpc.ok(json!({"command": "balance", "user_id": "fay"}))
            .await["balance"],
        json!(1000)
    );
    let admin = env.admin_pool().await;
    env.set_reachable(&admin, false).await;
    let top_up = json!({"command": "top_up", "user_id": "fay", "amount": 5, "key": "PAY-1"});
    rpc.send(
        &serde_json::to_vec(&top_up).expect("json"),
        Some("guest"),
        false,
    )
    .await;
    // Past the attempts a requester waiting for a reply would get before `internal`, then
    // back to the queue, and taken again.
    let deadline = std::time::Instant::now() + REPLY_TIMEOUT;
    let (mut past_three, mut returned) = (false, 0);
    while returned < 2 {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let line = log.recv_timeout(left).expect("the worker logs the retries");
        let v: Value = serde_json::from_str(&line).unwrap_or_default();
        let retry = v["message"] == json!("control command failed; retrying");
        past_three |= retry && v["attempt"].as_i64() >= Some(3);
        if v["message"] == json!("control command still failing; returned to the queue") {
            returned += 1;
        }
        assert_ne!(
            v["message"],
            json!("control command failed"),
            "given up: {line}"
        );
    }
    assert!(past_three);
    env.set_reachable(&admin, true).await;
    admin.close().await;
    assert_eq!(
        rpc.ok(json!({"command": "balance", "user_id": "fay"}))
            .await["balance"],
        json!(1005)
    );
    assert_eq!(rpc.ok(top_up).await["applied"], json!(false));
    w.sigterm();
    assert_eq!(w.wait_exit(REPLY_TIMEOUT).await, Some(0));
    env.assert_audit_clean().await;
    env.cleanup().await;
}

/// Each operator command of the CLI (SPEC §2) run as the binary, with the exit codes 0, 1, 2.
#[tokio::test]
async fn the_cli_runs_each_operator_command() {
    let env = TestEnv::new().await;
    // A new user's first credit brings the month's refill (1,000) with it.
    let top_up = env.cli_json(&["top-up", "alice", "100", "--key", "k1"]);
    assert_eq!(
        top_up,
        json!({"applied": true, "balance": 1100, "seq": 2, "transaction_key": "k1", "user_id": "alice"})
    );
    let again = env.cli_json(&["top-up", "alice", "100", "--key", "k1"]);
    assert_eq!(again["applied"], json!(false));
    assert_eq!(again["balance"], json!(1100));
    let grant = env.cli_json(&["grant", "alice", "5", "--reason", "promo"]);
    assert_eq!(grant["balance"], json!(1105));
    assert_eq!(
        env.cli_json(&["balance", "alice"]),
        json!({"balance": 1105, "user_id": "alice"})
    );
    assert_eq!(
        env.cli_json(&[
            "auto-top-up",
            "alice",
            "--threshold",
            "50",
            "--amount",
            "20"
        ]),
        json!({"amount": 20, "requested": false, "threshold": 50, "user_id": "alice"})
    );
    assert_eq!(
        env.cli_json(&["auto-top-up", "alice", "--off"]),
        json!({"amount": null, "requested": false, "threshold": null, "user_id": "alice"})
    );
    let page = env.cli_json(&["history", "alice", "--limit", "2"]);
    let seqs: Vec<&Value> = page["transactions"]
        .as_array()
        .map(|t| t.iter().map(|r| &r["seq"]).collect())
        .unwrap_or_default();
    assert_eq!(seqs, [&json!(3), &json!(2)]);
    assert_eq!(page["next_before_seq"], json!(2));
    // Exactly the rows there are: the last page, with no cursor to an empty one.
    let page = env.cli_json(&["history", "alice", "--limit", "3"]);
    assert_eq!(page["transactions"].as_array().map(Vec::len), Some(3));
    assert_eq!(page["next_before_seq"], Value::Null);
    // The `refill` command's result object: alice at 1,105 is above the target.
    assert_eq!(
        env.cli_json(&["sweep", "--month", "2031-07"]),
        json!({"credits_granted": 0, "month": "2031-07", "users_refilled": 0})
    );
    let audit = env.cli_json(&["audit"]);
    assert_eq!(audit["mismatches"], json!([]));
    assert_eq!(audit["transactions"], json!(3));
    // 40 of k1's 100 refunded, once.
    let refund = [
        "refund",
        "alice",
        "40",
        "--key",
        "re-1",
        "--top-up-key",
        "k1",
        "--reason",
        "chargeback",
    ];
    assert_eq!(
        env.cli_json(&refund),
        json!({"applied": true, "balance": 1065, "seq": 4, "transaction_key": "re-1", "user_id": "alice"})
    );
    assert_eq!(
        env.cli_json(&refund),
        json!({"applied": false, "balance": 1065, "seq": 4, "transaction_key": "re-1", "user_id": "alice"})
    );
    let code = |args: &[&str]| env.cli(args).status.code();
    assert_eq!(code(&["outcome", "never-decided"]), Some(1));
    // With --json a failure is the control queue's error object too, on stdout.
    let long_id = "n".repeat(256);
    for (args, expected) in [
        (
            ["outcome", "never-decided", "--json"].as_slice(),
            "not_found",
        ),
        (&["top-up", "alice", "0", "--json"], "amount_out_of_range"),
        // Beyond any balance, as the control queue answers it (not a usage error).
        (
            &["grant", "alice", "9223372036854775808", "--json"],
            "amount_out_of_range",
        ),
        (
            &["top-up", "alice", "5", "--key", "USAGE-x", "--json"],
            "bad_request",
        ),
        // k1 names the top-up of 100 above.
        (
            &["top-up", "alice", "101", "--key", "k1", "--json"],
            "bad_request",
        ),
        // 60 of k1 are left to refund; no purchase is keyed pi-0.
        (
            &[
                "refund",
                "alice",
                "61",
                "--key",
                "re-2",
                "--top-up-key",
                "k1",
                "--json",
            ],
            "amount_out_of_range",
        ),
        (
            &[
                "refund",
                "alice",
                "1",
                "--key",
                "re-2",
                "--top-up-key",
                "pi-0",
                "--json",
            ],
            "not_found",
        ),
        (&["outcome", &long_id, "--json"], "bad_request"),
        (
            &["dead-letters", "replay", "--node-exec-id", "", "--json"],
            "bad_request",
        ),
        (
            &[
                "dead-letters",
                "replay",
                "--node-exec-id",
                &long_id,
                "--json",
            ],
            "bad_request",
        ),
        (
            &[
                "auto-top-up",
                "alice",
                "--threshold",
                "0",
                "--amount",
                "5",
                "--json",
            ],
            "amount_out_of_range",
        ),
    ] {
        let out = env.cli(args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let printed: Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        assert_eq!(printed["error"]["code"], expected, "{args:?}: {printed}");
        assert!(printed["error"]["message"].is_string(), "{printed}");
    }
    assert_eq!(code(&["auto-top-up", "alice", "--amount", "5"]), Some(2));
    assert_eq!(code(&["top-up", "alice"]), Some(2));
    // A usage error (exit 2) with --json prints a bad_request object too.
    let out = env.cli(&["top-up", "alice", "--json"]);
    assert_eq!(out.status.code(), Some(2));
    let printed: Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    assert_eq!(printed["error"]["code"], "bad_request", "{printed}");
    let message = printed["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("<AMOUNT>"), "{message}");
    // Output that cannot be written is a failure (exit 1), not a panic (101).
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .unwrap();
    let out = env
        .cli_command(&["balance", "alice", "--json"])
        .stdout(full)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("cannot write the output"), "{stderr}");
    env.cleanup().await;
}

/// The operator's commands use the database `database.url` names only as the worker's start
/// left it: they neither create one (a mistyped name would show a balance of 0, or take a
/// top-up into a ledger no worker reads) nor migrate one.
#[tokio::test]
async fn the_cli_refuses_a_database_that_is_missing_or_not_migrated() {
    let env = TestEnv::new().await;
    let admin = env.admin_pool().await;
    let (absent, empty) = (unique(DB_PREFIX), unique(DB_PREFIX));
    sqlx::query(&format!("CREATE DATABASE {empty}"))
        .execute(&admin)
        .await
        .unwrap();
    let at = |name: &str| {
        let base = env.settings.database.url.rsplit_once('/').map(|(b, _)| b);
        format!("{}/{name}", base.unwrap_or_default())
    };
    let run = |name: &str, args: &[&str]| {
        let out = env.cli_command(args).env("DATABASE_URL", at(name)).output();
        let out = out.expect("run the CLI");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let exists = |name: String| {
        let admin = admin.clone();
        async move {
            sqlx::query_scalar::<_, bool>(
                "SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)",
            )
            .bind(name)
            .fetch_one(&admin)
            .await
            .unwrap()
        }
    };

    for args in [
        &["balance", "alice"][..],
        &["top-up", "alice", "5"],
        &["audit"],
    ] {
        let (code, stderr) = run(&absent, args);
        assert_eq!(code, Some(1), "{args:?}: {stderr}");
        assert!(
            stderr.contains(&format!("database \"{absent}\" does not exist")),
            "{args:?}: {stderr}"
        );
        assert!(
            !exists(absent.clone()).await,
            "{args:?} created the database"
        );
    }

    let known = credit_worker::db::migrations();
    let (code, stderr) = run(&empty, &["top-up", "alice", "5"]);
    assert_eq!(code, Some(1), "{stderr}");
    let expected = format!("lacks {known} of this build's {known} migrations");
    assert!(stderr.contains(&expected), "{stderr}");
    assert!(stderr.contains("run `credit-worker migrate`"), "{stderr}");
    let pool = sqlx::PgPool::connect(&at(&empty)).await.unwrap();
    let migrated: bool = sqlx::query_scalar(
        "SELECT to_regnamespace('credit') IS NOT NULL
             OR to_regclass('public._sqlx_migrations') IS NOT NULL",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(!migrated, "the top-up migrated the database");

    // Once migrated, the same command goes through.
    assert_eq!(run(&empty, &["migrate"]).0, Some(0));
    let (code, stderr) = run(&empty, &["top-up", "alice", "5", "--key", "k"]);
    assert_eq!(code, Some(0), "{stderr}");
    let balance: i64 =
        sqlx::query_scalar("SELECT balance FROM credit.balances WHERE user_id = 'alice'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(balance, 1005);
    // A role that cannot see the migrations' table is told so, not sent to migrate again.
    let hidden = format!("{empty}?options=-c%20search_path%3Dcredit");
    let (code, stderr) = run(&hidden, &["balance", "alice"]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("cannot read which migrations it holds"),
        "{stderr}"
    );

    pool.close().await;
    for name in [&absent, &empty] {
        sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .execute(&admin)
            .await
            .unwrap();
    }
    admin.close().await;
    env.cleanup().await;
}

/// `account` reads an account as it stands: it neither creates one (`not_found`) nor applies
/// the month's refill, and shows the auto top-up and its outstanding request; the CLI prints
/// the same object.
#[tokio::test]
async fn the_account_command_reads_without_creating_or_refilling() {
    let env = TestEnv::with(quiet_scheduler).await;
    let worker = start(&env).await;
    let mut rpc = Rpc::new(&env).await;
    let (code, message) = rpc
        .err(json!({"command": "account", "user_id": "ghost"}))
        .await;
    assert_eq!(
        (code.as_str(), message.as_str()),
        ("not_found", "user_id: no account for \"ghost\"")
    );
    let ghosts = "SELECT count(*) FROM credit.balances WHERE user_id = 'ghost'";
    assert_eq!(env.scalar_i64(ghosts).await, 0);

    let november = chrono::Utc.with_ymd_and_hms(2025, 11, 20, 9, 0, 0).unwrap();
    let ledger = env.ledger();
    let top_up = ledger.credit(TxType::TopUp, "ann", 300, Some("pi_1"), None, november);
    assert_eq!(top_up.await.expect("top-up").balance, 1300);
    let account = json!({"command": "account", "user_id": "ann"});
    let as_it_was = json!({"user_id": "ann", "balance": 1300, "seq": 2,
        "refill_month": "2025-11", "auto_top_up": null, "requests_made": 0,
        "outstanding_request": null});
    assert_eq!(rpc.ok(account.clone()).await, as_it_was);
    let refilled = "SELECT refill_month::text FROM credit.balances WHERE user_id = 'ann'";
    let month: String = sqlx::query_scalar(refilled)
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert_eq!(month, "2025-11-01", "read, not refilled");

    let auto =
        json!({"command": "auto_top_up", "user_id": "ann", "threshold": 2000, "amount": 500});
    assert_eq!(rpc.ok(auto).await["requested"], json!(true));
    let now = rpc.ok(account).await;
    assert_eq!(
        now["auto_top_up"],
        json!({"threshold": 2000, "amount": 500})
    );
    assert_eq!(now["requests_made"], json!(1));
    let request = &now["outstanding_request"];
    assert_eq!(request["request_id"], json!("AUTO-TOP-UP-ann-1"));
    let time = |v: &serde_json::Value| {
        chrono::DateTime::parse_from_rfc3339(v.as_str().expect("a time")).expect("RFC 3339")
    };
    let ttl = (time(&request["expires_at"]) - time(&request["requested_at"])).num_seconds();
    assert_eq!(ttl, env.settings.auto_top_up.request_ttl_s as i64);
    assert_eq!(env.cli_json(&["account", "ann"]), now);
    let out = env.cli(&["account", "ghost", "--json"]);
    assert_eq!(out.status.code(), Some(1));
    let printed: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(printed["error"]["code"], "not_found");
    worker.stop().await.expect("stop");
    env.assert_audit_clean().await;
    env.cleanup().await;
}

/// A command whose connection goes silent mid-statement (a peer or a path that drops packets
/// without a reset) is given up at the stall bound (two statement timeouts and a second) and
/// run again on a new connection: answered, applied once, and the command behind it answered
/// too, instead of the control queue waiting for ever. The server's side of the silent
/// connection stays up, so its transaction keeps the user's row locked until the server ends
/// it as idle (twice the bound): the command is retried until then, not failed after three
/// tries for its own earlier one's lock.
#[tokio::test]
async fn a_command_whose_database_goes_silent_is_answered_from_a_new_connection() {
    use crate::faults::{through_proxy, FreezingProxy};
    let env = TestEnv::with(|s| s.refill.enabled = false).await;
    let proxy = FreezingProxy::before_database(&env.settings.database.url).await;
    proxy.keep_the_server_side();
    let mut settings = env.settings.clone();
    settings.database.url = through_proxy(&env.settings.database.url, proxy.port);
    settings.database.statement_timeout_ms = 500;
    let worker = Worker::start(settings).await.expect("start");
    let mut rpc = Rpc::new(&env).await;
    let top_up = |amount: i64, key: &str| json!({"command": "top_up", "user_id": "dave", "amount": amount, "key": key});
    assert_eq!(rpc.ok(top_up(100, "pi_1")).await["balance"], 100);
    // The server goes silent while the command waits for dave's row, held here.
    let holder = env.hold_account("dave").await;
    let body = serde_json::to_vec(&top_up(50, "pi_2")).expect("json");
    let cid = rpc.send(&body, Some("guest"), true).await;
    env.wait_for_one_lock_waiter(Duration::from_secs(30), "the top-up waiting for dave's row")
        .await;
    proxy.freeze();
    holder.commit().await.expect("release dave's row");
    let reply = rpc.reply(&cid).await;
    assert_eq!(reply["ok"], json!(true), "{reply}");
    assert_eq!(reply["result"]["balance"], 150, "{reply}");
    assert_eq!(reply["result"]["applied"], true, "{reply}");
    let behind = rpc
        .ok(json!({"command": "balance", "user_id": "dave"}))
        .await;
    assert_eq!(behind["balance"], 150);
    let rows = "SELECT count(*) FROM credit.transactions WHERE transaction_key = 'pi_2'";
    assert_eq!(env.scalar_i64(rows).await, 1);
    worker.stop().await.expect("stop");
    env.assert_audit_clean().await;
    env.cleanup().await;
}
