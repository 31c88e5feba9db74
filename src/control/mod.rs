//! The control queue `credit.control` (docs/contract.md §7).
//!
//! Commands are JSON objects named by their `command` field. Each is parsed into a typed
//! request, authorised by the broker-verified AMQP `user_id`, run, answered on `reply_to` with
//! the request's `correlation_id`, and only then acked. Requests are handled one at a time, in
//! queue order. Nothing in a message can stop the loop: every failure becomes an error reply.

pub mod account;
pub mod auto_top_up;
pub mod balance;
pub mod credit;
mod error;
pub mod fields;
pub mod history;
pub mod outcome;
pub mod refill;
pub mod refund;

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{FutureExt as _, StreamExt};
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel};
use serde::Serialize;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::amqp::topology;
use crate::clock::Clock;
use crate::config::Settings;
use crate::ledger::{Ledger, TxType};

pub use error::ControlError;
use fields::Fields;

/// Larger bodies are refused unread: no command needs more.
pub(crate) const MAX_BODY_BYTES: usize = 1 << 20;

/// Attempts of a command that fails on a transient database fault before `internal`, when a
/// reply is awaited. Few: the requester is waiting for an answer and can resend (keyed
/// commands are idempotent). A command without `reply_to` is not given up, since no one
/// would learn that it failed: it is retried for `control.unanswered_retry_s`, then returned
/// to the queue to come again: well within RabbitMQ's `consumer_timeout`, after which the
/// broker would hand it to another consumer while this one still retried it (see
/// [`PREFETCH`] for the commands waiting behind it).
const ATTEMPTS: usize = 3;

/// Deliveries the broker may push ahead of the one being handled. More than one: a command
/// returned to the queue goes back to its head, and with one delivery at a time it would come
/// straight back to the same consumer, holding every command behind it (answered ones
/// included) for as long as a database outage lasts. The cost: in a long outage, a command
/// waiting behind several unanswered ones, each retried for `control.unanswered_retry_s`, can
/// pass RabbitMQ's `consumer_timeout`; the broker then closes the channel, and every command
/// held comes again.
const PREFETCH: u16 = 16;

/// Every command name; anything else is counted as "unknown" so metrics labels stay bounded.
/// [`Command::parse`] knows no other: a command left out of this list is unknown.
pub const COMMANDS: [&str; 9] = [
    "refill",
    "top_up",
    "grant",
    "refund",
    "balance",
    "account",
    "history",
    "outcome",
    "auto_top_up",
];

/// What the commands run against.
#[derive(Clone)]
pub struct Context {
    pub settings: Arc<Settings>,
    pub ledger: Ledger,
    /// What "now" is for the commands (the lazy refill, a default month).
    pub clock: Arc<dyn Clock>,
    /// The broker user the worker connects as (`producer::own_user`): a message under it
    /// with a producer header is that producer's.
    pub own_user: Option<String>,
}

/// A parsed command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Refill(refill::Request),
    /// `top_up` and `grant`; the request carries the transaction type.
    Credit(credit::Request),
    Refund(refund::Request),
    Balance(balance::Request),
    Account(account::Request),
    AutoTopUp(auto_top_up::Request),
    History(history::Request),
    Outcome(outcome::Request),
}

impl Command {
    /// Parses a message body.
    pub fn parse(body: &[u8]) -> Result<Command, ControlError> {
        if body.len() > MAX_BODY_BYTES {
            return Err(ControlError::bad_request(format!(
                "body: larger than {MAX_BODY_BYTES} bytes"
            )));
        }
        let value: Value = serde_json::from_slice(body)
            .map_err(|e| ControlError::bad_request(format!("malformed JSON: {e}")))?;
        let Value::Object(map) = value else {
            return Err(ControlError::bad_request(
                "body: expected a JSON object with a \"command\" field",
            ));
        };
        fields::check_fields_once(body)?;
        let f = Fields::new(&map);
        let name = f.string("command")?;
        if !COMMANDS.contains(&name) {
            return Err(unknown_command(name));
        }
        Ok(match name {
            "refill" => Command::Refill(refill::parse(&f)?),
            "top_up" => Command::Credit(credit::parse(TxType::TopUp, &f)?),
            "grant" => Command::Credit(credit::parse(TxType::Grant, &f)?),
            "refund" => Command::Refund(refund::parse(&f)?),
            "balance" => Command::Balance(balance::parse(&f)?),
            "account" => Command::Account(account::parse(&f)?),
            "auto_top_up" => Command::AutoTopUp(auto_top_up::parse(&f)?),
            "history" => Command::History(history::parse(&f)?),
            "outcome" => Command::Outcome(outcome::parse(&f)?),
            other => return Err(unknown_command(other)),
        })
    }

    async fn run(&self, ctx: &Context) -> Result<Value, ControlError> {
        match self {
            Command::Refill(r) => refill::run(ctx, r).await,
            Command::Credit(r) => credit::run(ctx, r).await,
            Command::Refund(r) => refund::run(ctx, r).await,
            Command::Balance(r) => balance::run(ctx, r).await,
            Command::Account(r) => account::run(ctx, r).await,
            Command::AutoTopUp(r) => auto_top_up::run(ctx, r).await,
            Command::History(r) => history::run(ctx, r).await,
            Command::Outcome(r) => outcome::run(ctx, r).await,
        }
    }
}

fn unknown_command(name: &str) -> ControlError {
    ControlError::bad_request(format!(
        "command: unknown command {name:?} (expected one of {})",
        COMMANDS.join(", ")
    ))
}

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

/// Serialises a command's result object.
pub(crate) fn to_result(v: &impl Serialize) -> Result<Value, ControlError> {
    serde_json::to_value(v).map_err(|e| ControlError::internal(format!("result: {e}")))
}

/// The reply body: `{"ok": true, "result": …}` or `{"ok": false, "error": {code, message}}`.
pub(crate) fn reply_body(result: &Result<Value, ControlError>) -> Value {
    match result {
        Ok(r) => json!({"ok": true, "result": r}),
        Err(e) => json!({"ok": false, "error": {"code": e.code(), "message": e.to_string()}}),
    }
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

/// The AMQP properties of a command's message that its handling reads.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Origin<'a> {
    /// `user_id`, verified by the broker against the connection's user.
    pub(crate) sender: Option<&'a str>,
    /// `message_id`: keys an unkeyed `top_up` or `grant` (see [`credit`]).
    pub(crate) message_id: Option<&'a str>,
}

/// Authorises, parses and runs one command. `answered`: whether a reply goes back (see
/// [`ATTEMPTS`]). None when a transient fault was still being retried when `stop` fired or
/// the retries of an unanswered command ran out: the caller returns the message to the
/// queue, so the broker hands it out again.
pub(crate) async fn execute(
    ctx: &Context,
    origin: Origin<'_>,
    body: &[u8],
    answered: bool,
    stop: &CancellationToken,
) -> Option<Result<Value, ControlError>> {
    let command = match admit(ctx, origin, body) {
        Ok(c) => c,
        Err(e) => return Some(Err(e)),
    };
    let mut delays = crate::retry::backoff();
    let mut attempt = 1;
    let started = Instant::now();
    let horizon = Duration::from_secs(ctx.settings.control.unanswered_retry_s);
    loop {
        let run = guarded(command.run(ctx));
        let ran = if matches!(command, Command::Refill(_)) {
            // A sweep may take minutes: given up at shutdown as the scheduled one is. The
            // ranges it committed stay, and the command, not acked, comes back at the next
            // start, which skips them. Other commands are too short to be worth cutting off.
            tokio::select! {
                // A sweep that finished as the stop came is answered, not run again.
                biased;
                ran = run => ran,
                _ = stop.cancelled() => return None,
            }
        } else {
            run.await
        };
        match ran {
            Err(e) if e.is_transient() && !answered && started.elapsed() >= horizon => {
                warn!(error = %e, attempt, "control command still failing; returned to the queue");
                return None;
            }
            Err(e) if e.is_transient() && (attempt < ATTEMPTS || !answered) => {
                warn!(error = %e, attempt, "control command failed; retrying");
                attempt += 1;
                if !crate::retry::pause(&mut delays, stop).await {
                    return None;
                }
            }
            other => return Some(other),
        }
    }
}

/// The command a message carries, once its sender is authorised; an unkeyed credit is keyed
/// by the message's id.
fn admit(ctx: &Context, origin: Origin<'_>, body: &[u8]) -> Result<Command, ControlError> {
    let allowed = &ctx.settings.control.allowed_users;
    let sender = match origin.sender {
        Some(u) if allowed.iter().any(|a| a == u) => u,
        Some(u) => {
            return Err(ControlError::Forbidden(format!(
                "user {u:?} is not in control.allowed_users"
            )))
        }
        None => {
            return Err(ControlError::Forbidden(
                "the message has no user_id property; control.allowed_users cannot be checked"
                    .into(),
            ))
        }
    };
    let mut command = Command::parse(body)?;
    if let (Command::Credit(r), Some(id)) = (&mut command, origin.message_id) {
        r.key_by_message(sender, id)?;
    }
    Ok(command)
}

/// A command's run, a panic turned into an `internal` error. A defect one command meets is
/// then answered and acked like any failure, instead of ending the worker: the command would
/// come back at every start (the control queue has no delivery limit), and billing with it.
/// Unwinding drops the command's transaction in progress (rolled back); a refill sweep keeps
/// the ranges it committed, which running it again skips.
async fn guarded(
    run: impl Future<Output = Result<Value, ControlError>>,
) -> Result<Value, ControlError> {
    match AssertUnwindSafe(run).catch_unwind().await {
        Ok(ran) => ran,
        Err(panic) => {
            metrics::counter!("credit_defects_total", "stage" => "control").increment(1);
            Err(ControlError::internal(format!(
                "a defect: {}",
                crate::telemetry::panic_text(panic.as_ref())
            )))
        }
    }
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

/// Answers control commands until `stop` fires, reconnecting after broker faults.
pub(crate) async fn serve(ctx: Context, stop: CancellationToken) {
    crate::amqp::reconnecting("control", &stop, || session(&ctx, &stop)).await;
}

async fn session(ctx: &Context, stop: &CancellationToken) -> Result<(), SessionError> {
    // A stop while connecting ends the session at once (see the consumer's).
    let (conn, ch, mut deliveries) = tokio::select! {
        opened = open(ctx) => opened?,
        _ = stop.cancelled() => return Ok(()),
    };
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
        reply(ch, reply_to, correlation_id, me, &result).await?;
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

/// Sends `result` to `reply_to` under the request's `correlation_id`, as the worker's broker
/// user `me` (the broker verifies it), so a requester can tell the worker's answer from one
/// another sender put in its queue.
async fn reply(
    ch: &Channel,
    reply_to: &str,
    correlation_id: Option<&str>,
    me: Option<&str>,
    result: &Result<Value, ControlError>,
) -> Result<(), SessionError> {
    let body = reply_bytes(result, REPLY_MAX);
    let mut props = BasicProperties::default().with_content_type("application/json".into());
    if let Some(c) = correlation_id {
        props = props.with_correlation_id(c.into());
    }
    let props = crate::amqp::as_user(props, me);
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

    fn code(body: &str) -> (&'static str, String) {
        let e = Command::parse(body.as_bytes()).unwrap_err();
        (e.code(), e.to_string())
    }

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

    /// Each listed name parses as a command of its own (or asks for its fields), so a
    /// command missing from the list or from `parse` is caught here.
    #[test]
    fn every_listed_command_is_known_to_parse() {
        for name in COMMANDS {
            let body = json!({ "command": name }).to_string();
            if let Err(e) = Command::parse(body.as_bytes()) {
                assert!(!e.to_string().contains("unknown command"), "{name}: {e}");
            }
        }
        let message = code(r#"{"command": "usage"}"#).1;
        assert!(message.ends_with(&format!("(expected one of {})", COMMANDS.join(", "))));
    }

    #[test]
    fn bad_requests_name_the_problem() {
        assert_eq!(code("{nope").0, "bad_request");
        assert!(code("{nope").1.starts_with("malformed JSON"));
        assert_eq!(code("[1]").0, "bad_request");
        assert_eq!(code("{}").1, "command: missing");
        assert_eq!(code(r#"{"command": 7}"#).1, "command: expected a string");
        assert!(code(r#"{"command": "explode"}"#)
            .1
            .starts_with("command: unknown command \"explode\""));
        assert_eq!(code(r#"{"command": "balance"}"#).1, "user_id: missing");
        assert_eq!(
            code(r#"{"command": "balance", "user_id": ""}"#).1,
            "user_id: must be 1 to 255 bytes"
        );
        assert_eq!(
            code(r#"{"command": "top_up", "user_id": "u", "amount": "5"}"#).1,
            "amount: expected an integer"
        );
        assert_eq!(
            code(r#"{"command": "grant", "user_id": "u", "amount": 0}"#).0,
            "amount_out_of_range"
        );
        assert_eq!(
            code(r#"{"command": "top_up", "user_id": "u", "amount": 99999999999999999999}"#),
            (
                "amount_out_of_range",
                "amount: the number given is beyond the 64-bit integer range".into()
            )
        );
        assert_eq!(
            code(r#"{"command": "top_up", "user_id": "u", "amount": 18446744073709551615}"#).1,
            "amount: 18446744073709551615 is beyond the 64-bit integer range"
        );
        // Money written as a float is refused, never rounded: its value no longer tells
        // what was sent (this one reads as 9007199254740992).
        for amount in ["100.0", "1e2", "99.999999999999999", "9007199254740993.0"] {
            let body = format!(r#"{{"command": "top_up", "user_id": "u", "amount": {amount}}}"#);
            assert_eq!(
                code(&body),
                (
                    "bad_request",
                    "amount: expected an integer (digits, without a fraction or exponent)".into()
                ),
                "{amount}"
            );
        }
        assert!(code(r#"{"command": "refill", "month": "2026-13"}"#)
            .1
            .starts_with("month:"));
        assert_eq!(
            code(r#"{"command": "outcome", "node_exec_id": ""}"#).1,
            "node_exec_id: must be 1 to 255 bytes"
        );
    }

    #[test]
    fn auto_top_up_configurations_are_checked() {
        let c = Command::parse(
            br#"{"command": "auto_top_up", "user_id": "u", "threshold": 100, "amount": 500}"#,
        )
        .unwrap();
        assert_eq!(
            c,
            Command::AutoTopUp(auto_top_up::Request {
                user_id: "u".into(),
                config: Some((100, 500))
            })
        );
        let off = Command::parse(br#"{"command": "auto_top_up", "user_id": "u", "off": true}"#);
        assert!(matches!(
            off,
            Ok(Command::AutoTopUp(auto_top_up::Request {
                config: None,
                ..
            }))
        ));
        assert_eq!(
            code(r#"{"command": "auto_top_up", "user_id": "u", "threshold": 100}"#).1,
            "amount: missing"
        );
        assert_eq!(
            code(r#"{"command": "auto_top_up", "user_id": "u", "threshold": 0, "amount": 5}"#).0,
            "amount_out_of_range"
        );
        assert_eq!(
            code(r#"{"command": "auto_top_up", "user_id": "u", "off": "yes"}"#).1,
            "off: expected true or false"
        );
        assert!(
            code(r#"{"command": "auto_top_up", "user_id": "u", "off": true, "amount": 5}"#)
                .1
                .starts_with("off: give either")
        );
    }

    #[test]
    fn a_field_given_twice_is_a_bad_request_naming_it() {
        for (body, field) in [
            (
                r#"{"command": "balance", "command": "top_up", "user_id": "u", "amount": 1}"#,
                "command",
            ),
            (
                r#"{"command": "top_up", "user_id": "u", "amount": 5, "amount": 7}"#,
                "amount",
            ),
        ] {
            let e = Command::parse(body.as_bytes()).unwrap_err();
            assert_eq!(
                e,
                ControlError::bad_request(format!("{field}: given more than once"))
            );
        }
        // The same name inside a value is another object's.
        let ok =
            br#"{"command": "grant", "user_id": "u", "amount": 5, "reason": "{\"amount\": 1}"}"#;
        assert!(Command::parse(ok).is_ok());
    }

    #[test]
    fn extra_fields_are_ignored() {
        let c = Command::parse(br#"{"command": "balance", "user_id": "u", "x": [1]}"#).unwrap();
        assert_eq!(
            c,
            Command::Balance(balance::Request {
                user_id: "u".into()
            })
        );
        let c = Command::parse(br#"{"command": "top_up", "user_id": "u", "amount": 5}"#).unwrap();
        let Command::Credit(r) = c else {
            panic!("{c:?}")
        };
        assert_eq!(r.key_source, credit::KeySource::Generated);
        assert!(r.key.starts_with("TOP-UP-"), "{}", r.key);
        assert_eq!((r.tx_type, r.amount), (TxType::TopUp, 5));
    }

    #[tokio::test]
    async fn a_command_that_panics_is_answered_internal() {
        let panics = async { panic!("a defect in a command") };
        let answer = guarded(panics).await;
        assert_eq!(
            reply_body(&answer),
            json!({"ok": false, "error": {"code": "internal",
                "message": "a defect: a defect in a command"}})
        );
        assert!(!answer.unwrap_err().is_transient());
        let fine = guarded(async { Ok(json!({"balance": 7})) }).await;
        assert_eq!(fine.unwrap(), json!({"balance": 7}));
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

    #[test]
    fn replies_have_the_spec_shape() {
        assert_eq!(
            reply_body(&Ok(json!({"balance": 5}))),
            json!({"ok": true, "result": {"balance": 5}})
        );
        assert_eq!(
            reply_body(&Err(ControlError::NotFound("x".into()))),
            json!({"ok": false, "error": {"code": "not_found", "message": "x"}})
        );
    }
}
