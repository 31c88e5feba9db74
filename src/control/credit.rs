//! `top_up` / `grant` {user_id, amount, key?, reason?} ⇒ {user_id, balance, transaction_key,
//! applied}.
//!
//! With a `key` the credit is exactly-once whatever happens. Without one, the AMQP
//! `message_id` of the message that carried it keys it (scoped by the sender), so a
//! redelivery after a crash between commit and ack finds its credit; a message with neither
//! is credited once per delivery (each gets a fresh key).

use serde_json::Value;

use super::fields::Fields;
use super::{to_result, Context, ControlError};
use crate::ledger::TxType;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub tx_type: TxType,
    pub user_id: String,
    pub amount: i64,
    pub key: String,
    /// True when the request named no key and `key` was made up for it.
    pub key_generated: bool,
    pub reason: Option<String>,
}

pub fn parse(tx_type: TxType, f: &Fields<'_>) -> Result<Request, ControlError> {
    let user_id = f.string("user_id")?.to_owned();
    crate::ledger::check_user_id(&user_id)?;
    let amount = f.amount("amount")?;
    // The key is fixed once per request, so a retry after an ambiguous commit cannot post
    // the credit twice.
    let (key, key_generated) = match f.opt_string("key")? {
        Some(k) => (k.to_owned(), false),
        None => (generated_key(tx_type), true),
    };
    let reason = f.opt_string("reason")?.map(str::to_owned);
    Ok(Request {
        tx_type,
        user_id,
        amount,
        key,
        key_generated,
        reason,
    })
}

impl Request {
    /// Keys an unkeyed request by the `message_id` of the message that carried it, sent by
    /// `sender`: the broker hands a message out again, with the same id, when it was not
    /// acked. An explicit `key` wins; an empty id is no id.
    pub(crate) fn key_by_message(
        &mut self,
        sender: &str,
        message_id: &str,
    ) -> Result<(), ControlError> {
        if !self.key_generated || message_id.is_empty() {
            return Ok(());
        }
        let key = message_key(self.tx_type, sender, message_id);
        if key.len() > crate::ledger::MAX_KEY_BYTES || key.contains('\0') {
            return Err(ControlError::bad_request(format!(
                "message_id: cannot key the credit (a key is 1 to {} bytes without NUL); \
                 give the command a key",
                crate::ledger::MAX_KEY_BYTES
            )));
        }
        self.key = key;
        self.key_generated = false;
        Ok(())
    }
}

/// The key of an unkeyed credit carried by message `message_id` of `sender`.
pub(crate) fn message_key(tx_type: TxType, sender: &str, message_id: &str) -> String {
    let kind = tx_type.as_str().replace('_', "-");
    format!("{kind}-MSG-{sender}-{message_id}")
}

pub async fn run(ctx: &Context, req: &Request) -> Result<Value, ControlError> {
    let mut posting = ctx
        .ledger
        .credit(
            req.tx_type,
            &req.user_id,
            req.amount,
            Some(&req.key),
            req.reason.as_deref(),
            ctx.clock.now(),
        )
        .await?;
    // A generated key is unique to this request: finding it means an earlier attempt of this
    // same request committed.
    posting.applied |= req.key_generated;
    to_result(&posting)
}

fn generated_key(tx_type: TxType) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::{SystemTime, UNIX_EPOCH};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!(
        "{}-{nanos:x}-{:x}-{n:x}",
        tx_type.as_str().replace('_', "-"),
        std::process::id()
    )
}

#[cfg(test)]
mod tests {
    use serde_json::{json, Map, Value};

    use super::*;

    fn request(body: Value) -> Request {
        let Value::Object(map) = body else { panic!() };
        let map: Map<String, Value> = map;
        parse(TxType::Grant, &Fields::new(&map)).unwrap()
    }

    #[test]
    fn an_unkeyed_credit_takes_its_message_id_as_key() {
        let mut r = request(json!({"user_id": "u", "amount": 5}));
        r.key_by_message("ops", "m-1").unwrap();
        assert_eq!(
            (r.key.as_str(), r.key_generated),
            ("GRANT-MSG-ops-m-1", false)
        );
        // A key of its own wins; an empty id is no id.
        let mut keyed = request(json!({"user_id": "u", "amount": 5, "key": "K"}));
        keyed.key_by_message("ops", "m-1").unwrap();
        assert_eq!((keyed.key.as_str(), keyed.key_generated), ("K", false));
        let mut empty = request(json!({"user_id": "u", "amount": 5}));
        empty.key_by_message("ops", "").unwrap();
        assert!(empty.key_generated && empty.key.starts_with("GRANT-"));
    }

    #[test]
    fn a_message_id_that_cannot_make_a_key_is_a_bad_request() {
        // Both AMQP short strings at their longest make a key past the ledger's 512 bytes.
        let long = "x".repeat(255);
        for (sender, id) in [(long.as_str(), long.as_str()), ("ops", "a\0b")] {
            let mut r = request(json!({"user_id": "u", "amount": 5}));
            let e = r.key_by_message(sender, id).unwrap_err();
            assert_eq!(e.code(), "bad_request");
            assert!(e.to_string().starts_with("message_id: "), "{e}");
            assert!(r.key_generated);
        }
    }
}
