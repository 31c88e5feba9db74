//! The control queue's consumer: one command at a time from `credit.control`, executed,
//! answered to its `reply_to`, logged and counted, then acked; reconnecting after broker
//! faults.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel};
use serde_json::Value;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{execute, fields, reply_body, Context, ControlError, Origin, COMMANDS};
use crate::amqp::topology;
use crate::health::Health;

/// Deliveries the broker may push ahead of the one being handled. More than one: a command
/// returned to the queue goes back to its head, and with one delivery at a time it would come
/// straight back to the same consumer, holding every command behind it (answered ones
/// included) for as long as a database outage lasts. The cost: in a long outage, a command
/// waiting behind several unanswered ones, each retried for `control.unanswered_retry_s`, can
/// pass RabbitMQ's `consumer_timeout`; the broker then closes the channel, and every command
/// held comes again.
const PREFETCH: u16 = 16;

/// The metrics label of a body: its `command` when that is a known name.
fn label(body: &[u8]) -> &'static str {
    #[derive(serde::Deserialize)]
    struct Named<'a> {
        #[serde(borrow)]
        command: Option<std::borrow::Cow<'a, str>>,
    }
    serde_json::from_slice::<Named<'_>>(body)
        .ok()
        .and_then(|n| n.command)
        .and_then(|c| COMMANDS.iter().find(|k| **k == c).copied())
        .unwrap_or("unknown")
}

/// The most a reply carries: RabbitMQ 4's default `max_message_size`. The broker refuses a
/// larger message by closing the channel, so the command, never acked, would come back for
/// ever (the control queue has no delivery limit). History pages stay far below it
/// ([`crate::ledger::HISTORY_PAGE_BYTES`]).
const REPLY_MAX: usize = 16 << 20;

/// The reply's bytes, or an `internal` error in their place when they are more than `max`.
fn reply_bytes(result: &Result<Value, ControlError>, max: usize) -> Vec<u8> {
    let body = serde_json::to_vec(&reply_body(result)).unwrap_or_default();
    if body.len() <= max {
        return body;
    }
    let too_large = Err(ControlError::internal(format!(
        "a reply of {} bytes, more than the {max} a reply may carry",
        body.len()
    )));
    serde_json::to_vec(&reply_body(&too_large)).unwrap_or_default()
}

#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("broker: {0}")]
    Amqp(#[from] lapin::Error),
    #[error("broker: the consumer stream ended")]
    StreamEnded,
    #[error("broker: the channel closed before the command was acked")]
    AckNotSent,
}

impl crate::amqp::SessionFault for SessionError {
    fn is_permanent(&self) -> bool {
        matches!(self, SessionError::Amqp(e) if crate::amqp::topology::refuses_arguments(e))
    }
}

/// Answers control commands until `stop` fires, reconnecting after broker faults; `health`
/// knows whether it has a connection.
pub(crate) async fn serve(ctx: Context, health: Arc<Health>, stop: CancellationToken) {
    health.control_starting();
    crate::amqp::reconnecting("control", &stop, || session(&ctx, &health, &stop)).await;
}

async fn session(
    ctx: &Context,
    health: &Health,
    stop: &CancellationToken,
) -> Result<(), SessionError> {
    // A stop while connecting ends the session at once (see the consumer's).
    let (conn, ch, mut deliveries) = tokio::select! {
        opened = open(ctx) => opened?,
        _ = stop.cancelled() => return Ok(()),
    };
    let _connection = health.control_session(&conn);
    let result = async {
        loop {
            let next = tokio::select! {
                _ = stop.cancelled() => return Ok(()),
                d = deliveries.next() => d,
            };
            let delivery = match next {
                Some(Ok(d)) => d,
                Some(Err(e)) => return Err(e.into()),
                None => return Err(SessionError::StreamEnded),
            };
            if !handle(ctx, &ch, &delivery, stop).await? {
                // Abandoned on shutdown: closing the channel returns it to the queue.
                return Ok(());
            }
        }
    }
    .await;
    // Bounded: a broker that stopped answering would hold the stop until its heartbeat
    // timeout, past the 12 s the writers' stop allows.
    let deadline = tokio::time::Instant::now() + CLOSE;
    let _ = tokio::time::timeout_at(deadline, ch.close(200, "shutdown".into())).await;
    let _ = tokio::time::timeout_at(deadline, conn.close(200, "shutdown".into())).await;
    result
}

/// How long closing a session may wait on the broker.
const CLOSE: Duration = Duration::from_secs(5);

/// Connects, declares the topology and starts consuming the control queue.
async fn open(
    ctx: &Context,
) -> Result<(lapin::Connection, Channel, lapin::Consumer), SessionError> {
    let amqp = &ctx.settings.amqp;
    let conn = crate::amqp::connect(amqp, "credit-worker control").await?;
    let ch = conn.create_channel().await?;
    let names = topology::declare(&ch, amqp).await?;
    topology::declare_ledger_mark(&conn, &names, &ctx.ledger_id).await?;
    ch.basic_qos(PREFETCH, BasicQosOptions::default()).await?;
    let deliveries = ch
        .basic_consume(
            names.control.as_str().into(),
            "credit-worker-control".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    info!(queue = %names.control, "control queue consuming");
    Ok((conn, ch, deliveries))
}

/// Runs, replies, acks. Ok(false) when abandoned unacked on shutdown.
async fn handle(
    ctx: &Context,
    ch: &Channel,
    d: &Delivery,
    stop: &CancellationToken,
) -> Result<bool, SessionError> {
    let props = &d.properties;
    // A message the worker republished (a dead letter routed here) carries the worker's own
    // user_id: its sender is the producer it names, as for billing, not the worker.
    let sender = crate::amqp::producer::producer(props, ctx.own_user.as_deref());
    let origin = Origin {
        sender: sender.as_deref(),
        message_id: props.message_id().as_ref().map(|m| m.as_str()),
    };
    let sender = origin.sender;
    let correlation_id = props.correlation_id().as_ref().map(|c| c.as_str());
    let reply_to = props
        .reply_to()
        .as_ref()
        .map(|r| r.as_str())
        .filter(|r| !r.is_empty());
    let command = label(&d.data);
    let started = Instant::now();
    let Some(result) = execute(ctx, origin, &d.data, reply_to.is_some(), stop).await else {
        if stop.is_cancelled() {
            // Abandoned on shutdown: closing the channel returns it to the queue.
            return Ok(false);
        }
        let requeue = BasicNackOptions {
            requeue: true,
            ..Default::default()
        };
        d.nack(requeue).await?;
        return Ok(true);
    };
    let seen = Seen {
        command,
        sender,
        correlation_id,
        reply_to,
        elapsed_ms: started.elapsed().as_millis() as u64,
    };
    seen.record(&d.data, &result);
    if let Some(reply_to) = reply_to {
        let me = ctx.own_user.as_deref();
        // A broker that blocks publishers (a resource alarm) holds the reply: a stop does not
        // wait for it. Unacked, the command comes again; a keyed one is answered `applied:
        // false`.
        tokio::select! {
            biased;
            sent = reply(ch, reply_to, (correlation_id, sender), me, &result) => sent?,
            _ = stop.cancelled() => return Ok(false),
        }
    }
    // false: the channel is gone; the command comes again (keyed commands are idempotent).
    if !d.ack(BasicAckOptions::default()).await? {
        return Err(SessionError::AckNotSent);
    }
    Ok(true)
}

/// A command as the log and the metrics tell of it.
struct Seen<'a> {
    command: &'static str,
    sender: Option<&'a str>,
    correlation_id: Option<&'a str>,
    reply_to: Option<&'a str>,
    elapsed_ms: u64,
}

impl Seen<'_> {
    /// Counts the command and logs it once: a failure of the worker's or a sender refused as
    /// a warning, and a credit with whose account it was, how much, under which key and
    /// whether it applied (false: the key was there before), so the log answers for money.
    fn record(&self, body: &[u8], result: &Result<Value, ControlError>) {
        let Seen {
            command,
            sender,
            correlation_id,
            reply_to,
            elapsed_ms,
        } = *self;
        let code = match result {
            Ok(_) => "ok",
            Err(e) => e.code(),
        };
        metrics::counter!("credit_control_commands_total", "command" => command, "result" => code)
            .increment(1);
        match result {
            Err(e @ ControlError::Internal { .. }) => {
                warn!(command, result = code, sender, correlation_id, reply_to, elapsed_ms, error = %e, "control command failed")
            }
            // A sender the configuration does not allow: worth an operator's look.
            Err(e @ ControlError::Forbidden(_)) => {
                warn!(command, result = code, sender, correlation_id, reply_to, elapsed_ms, error = %e, "control command refused")
            }
            Err(e) => {
                info!(command, result = code, sender, correlation_id, reply_to, elapsed_ms, error = %e, "control command refused")
            }
            Ok(done) => {
                let credit = Credit::of(command, body, done);
                info!(
                    command,
                    result = code,
                    sender,
                    correlation_id,
                    reply_to,
                    elapsed_ms,
                    user_id = credit.user_id,
                    amount = credit.amount,
                    transaction_key = credit.transaction_key,
                    applied = credit.applied,
                    "control command done"
                )
            }
        }
    }
}

/// What a credit command did, for its log line; every field None for other commands.
#[derive(Debug, Default, PartialEq)]
struct Credit<'a> {
    user_id: Option<&'a str>,
    amount: Option<i64>,
    transaction_key: Option<&'a str>,
    applied: Option<bool>,
}

impl<'a> Credit<'a> {
    /// `body` is the command (it parsed before, so it reads), `done` its result.
    fn of(command: &str, body: &[u8], done: &'a Value) -> Credit<'a> {
        if !matches!(command, "top_up" | "grant" | "refund") {
            return Credit::default();
        }
        // The result has all but the amount.
        let asked = serde_json::from_slice::<Value>(body).unwrap_or_default();
        Credit {
            user_id: done["user_id"].as_str(),
            amount: (asked["amount"].as_number()).and_then(|n| fields::integer(n).ok()),
            transaction_key: done["transaction_key"].as_str(),
            applied: done["applied"].as_bool(),
        }
    }
}

/// The reply's properties: its correlation id, the worker's own user, and the user whose
/// command it answers, so a requester can tell its own answers from those to commands that
/// others sent naming its queue (absent for a command without a user).
fn reply_properties(
    (correlation_id, requester): (Option<&str>, Option<&str>),
    me: Option<&str>,
) -> BasicProperties {
    let mut props = BasicProperties::default().with_content_type("application/json".into());
    if let Some(c) = correlation_id {
        props = props.with_correlation_id(c.into());
    }
    if let Some(user) = requester {
        let mut headers = FieldTable::default();
        headers.insert(REQUESTER_HEADER.into(), AMQPValue::LongString(user.into()));
        props = props.with_headers(headers);
    }
    crate::amqp::as_user(props, me)
}

/// A reply's header naming the (broker-verified) user whose command it answers.
pub const REQUESTER_HEADER: &str = "x-credit-requester";

/// Sends `result` to `reply_to` under the request's `correlation_id`, as the worker's broker
/// user `me` (the broker verifies it), so a requester can tell the worker's answer from one
/// another sender put in its queue.
async fn reply(
    ch: &Channel,
    reply_to: &str,
    request: (Option<&str>, Option<&str>),
    me: Option<&str>,
    result: &Result<Value, ControlError>,
) -> Result<(), SessionError> {
    let body = reply_bytes(result, REPLY_MAX);
    let props = reply_properties(request, me);
    // A reply to a queue that no longer exists is dropped by the broker, not an error.
    ch.basic_publish(
        "".into(),
        reply_to.into(),
        BasicPublishOptions::default(),
        &body,
        props,
    )
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_reply_too_large_for_the_broker_is_an_internal_error_instead() {
        let page: Result<Value, ControlError> = Ok(json!({"rows": "x".repeat(500)}));
        let sent: Value = serde_json::from_slice(&reply_bytes(&page, 1000)).unwrap();
        assert_eq!(sent["ok"], json!(true));
        let sent: Value = serde_json::from_slice(&reply_bytes(&page, 400)).unwrap();
        assert_eq!(sent["ok"], json!(false));
        assert_eq!(sent["error"]["code"], json!("internal"));
        let message = sent["error"]["message"].as_str().unwrap_or_default();
        assert!(
            message.contains("more than the 400 a reply may carry"),
            "{message}"
        );
    }

    #[test]
    fn a_credit_is_logged_with_its_account_amount_key_and_whether_it_applied() {
        let body = br#"{"command": "top_up", "user_id": "frank", "amount": 500, "key": "K"}"#;
        let done =
            json!({"user_id": "frank", "balance": 1500, "transaction_key": "K", "applied": false});
        assert_eq!(
            Credit::of("top_up", body, &done),
            Credit {
                user_id: Some("frank"),
                amount: Some(500),
                transaction_key: Some("K"),
                applied: Some(false),
            }
        );
        let balance = br#"{"command": "balance", "user_id": "frank"}"#;
        let done = json!({"user_id": "frank", "balance": 1500});
        assert_eq!(Credit::of("balance", balance, &done), Credit::default());
    }

    #[test]
    fn labels_are_bounded() {
        assert_eq!(label(br#"{"command": "grant"}"#), "grant");
        assert_eq!(label(br#"{"command": "rm -rf"}"#), "unknown");
        assert_eq!(label(b"\xff"), "unknown");
    }
}
