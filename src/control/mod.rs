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
mod session;

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::FutureExt as _;
use serde::Serialize;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::clock::Clock;
use crate::config::Settings;
use crate::ledger::{Ledger, TxType};

pub use error::ControlError;
use fields::Fields;
pub(crate) use session::serve;
pub use session::REQUESTER_HEADER;

/// Larger bodies are refused unread: no command needs more.
pub(crate) const MAX_BODY_BYTES: usize = 1 << 20;

/// Attempts of a command that fails on a transient database fault before `internal`, when a
/// reply is awaited. Few: the requester is waiting for an answer and can resend (keyed
/// commands are idempotent). A command without `reply_to` is not given up, since no one
/// would learn that it failed: it is retried for `control.unanswered_retry_s`, then returned
/// to the queue to come again: well within RabbitMQ's `consumer_timeout`, after which the
/// broker would hand it to another consumer while this one still retried it (see
/// `session::PREFETCH` for the commands waiting behind it).
const ATTEMPTS: usize = 3;

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
    /// The database's ledger id, marked on the namespace
    /// ([`crate::amqp::topology::declare_ledger_mark`]).
    pub ledger_id: std::sync::Arc<str>,
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
    let db = &ctx.settings.database;
    let stall = crate::db::stall_bound(db);
    // Until when an answered command is retried past ATTEMPTS: a try that failed after the
    // stall bound was given up on a silent connection (or waited as long), and may hold its
    // row locks on the server until the server ends it as idle in its transaction (twice the
    // bound); each try meanwhile waits a statement timeout for them. Retried only ATTEMPTS
    // times, the command would fail for its own earlier try.
    let mut recovering_until = None;
    loop {
        let began = Instant::now();
        let ran = run_once(ctx, &command, stall, stop).await?;
        if let (Err(_), Some(bound)) = (&ran, stall) {
            if began.elapsed() >= bound {
                let statement = Duration::from_millis(db.statement_timeout_ms);
                recovering_until = Some(Instant::now() + bound * 2 + statement);
            }
        }
        let recovering = recovering_until.is_some_and(|t| Instant::now() < t);
        match ran {
            Err(e) if e.is_transient() && !answered && started.elapsed() >= horizon => {
                warn!(error = %e, attempt, "control command still failing; returned to the queue");
                return None;
            }
            Err(e) if e.is_transient() && (attempt < ATTEMPTS || !answered || recovering) => {
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

/// One run of `command`; None when `stop` ended a sweep.
async fn run_once(
    ctx: &Context,
    command: &Command,
    stall: Option<Duration>,
    stop: &CancellationToken,
) -> Option<Result<Value, ControlError>> {
    let run = guarded(command.run(ctx));
    if matches!(command, Command::Refill(_)) {
        // A sweep may take minutes: its statements are bounded each, and the sweep is given
        // up at shutdown as the scheduled one is. The ranges it committed stay, and the
        // command, not acked, comes back at the next start, which skips them.
        return tokio::select! {
            // A sweep that finished as the stop came is answered, not run again.
            biased;
            ran = run => Some(ran),
            _ = stop.cancelled() => None,
        };
    }
    // Other commands are short. One whose connection went silent (a peer or path that drops
    // packets without a reset) would hold it, and every command behind it, for ever: it is
    // given up at the bound a decision has, and tried again on a new one. At a stop, one held
    // up (on a row lock) is given up after FINISH, as the consumer gives up a batch: not
    // acked, it comes again, and its key answers `applied: false` if it had landed.
    tokio::select! {
        biased;
        ran = crate::db::bounded(stall, run) => Some(ran),
        _ = async {
            stop.cancelled().await;
            tokio::time::sleep(FINISH).await;
        } => None,
    }
}

/// How long a command under way at a stop may take to finish: with the 5 s that closing the
/// session may take, within the 12 s a stop gives control.
const FINISH: Duration = Duration::from_secs(5);

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

#[cfg(test)]
mod tests {
    use super::*;

    fn code(body: &str) -> (&'static str, String) {
        let e = Command::parse(body.as_bytes()).unwrap_err();
        (e.code(), e.to_string())
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
        let e = Command::parse(br#"{"command": "top_up", "": 1, "": 2}"#).unwrap_err();
        assert_eq!(e.to_string(), r#""": given more than once"#);
        // The same name inside a value is another object's.
        let ok =
            br#"{"command": "grant", "user_id": "u", "amount": 5, "reason": "{\"amount\": 1}"}"#;
        assert!(Command::parse(ok).is_ok());
    }

    #[test]
    fn a_repeat_behind_eighty_thousand_distinct_fields_is_found() {
        // A body near the 1 MiB limit: the check is linear in its keys, so a large command
        // does not hold the control queue for minutes.
        let mut body = String::from(r#"{"command": "balance", "user_id": "u""#);
        for i in 0..80_000 {
            body.push_str(&format!(r#","k{i}":0"#));
        }
        body.push_str(r#","k79999":1}"#);
        let e = Command::parse(body.as_bytes()).unwrap_err();
        assert_eq!(e, ControlError::bad_request("k79999: given more than once"));
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
