//! `top_up` / `grant` {user_id, amount, key?, reason?} ⇒ {user_id, balance, transaction_key,
//! applied, seq}.
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
    /// Where `key` comes from.
    pub key_source: KeySource,
    pub reason: Option<String>,
}

/// Where a credit's key comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// The request's `key`.
    Given,
    /// Made up for a request without a key or message id.
    Generated,
    /// The `message_id` of the message that carried the request, sent by broker user
    /// `sender` ([`Request::key_by_message`]).
    Message { sender: String, id: String },
}

pub fn parse(tx_type: TxType, f: &Fields<'_>) -> Result<Request, ControlError> {
    let user_id = f.string("user_id")?.to_owned();
    crate::ledger::check_user_id(&user_id)?;
    let amount = f.amount("amount")?;
    // The key is fixed once per request, so a retry after an ambiguous commit cannot post
    // the credit twice.
    let (key, key_source) = match f.opt_string("key")? {
        Some(k) => (k.to_owned(), KeySource::Given),
        None => (crate::ledger::generated_key(tx_type), KeySource::Generated),
    };
    let reason = f.opt_string("reason")?.map(str::to_owned);
    Ok(Request {
        tx_type,
        user_id,
        amount,
        key,
        key_source,
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
        if self.key_source != KeySource::Generated || message_id.is_empty() {
            return Ok(());
        }
        let key = crate::ledger::message_key(self.tx_type, sender, message_id);
        if key.len() > crate::ledger::MAX_KEY_BYTES || key.contains('\0') {
            return Err(ControlError::bad_request(format!(
                "message_id: cannot key the credit (a key is 1 to {} bytes without NUL); \
                 give the command a key",
                crate::ledger::MAX_KEY_BYTES
            )));
        }
        self.key = key;
        self.key_source = KeySource::Message {
            sender: sender.to_owned(),
            id: message_id.to_owned(),
        };
        Ok(())
    }
}

pub async fn run(ctx: &Context, req: &Request) -> Result<Value, ControlError> {
    // The ledger reads the clock once it holds the account.
    let (ledger, reason, at) = (&ctx.ledger, req.reason.as_deref(), &*ctx.clock);
    let (tx, user, amount) = (req.tx_type, req.user_id.as_str(), req.amount);
    let mut posting = match &req.key_source {
        // The key has a form a caller's may not take: the ledger makes it.
        KeySource::Message { sender, id } => {
            ledger
                .credit_of_message(tx, user, amount, (sender, id), reason, at)
                .await?
        }
        KeySource::Given | KeySource::Generated => {
            ledger
                .credit(tx, user, amount, Some(&req.key), reason, at)
                .await?
        }
    };
    // A generated key is unique to this request: finding it means an earlier attempt of this
    // same request committed.
    posting.applied |= req.key_source == KeySource::Generated;
    to_result(&posting)
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
        assert_eq!(r.key, "GRANT-MSG-3:ops-m-1");
        let source = KeySource::Message {
            sender: "ops".into(),
            id: "m-1".into(),
        };
        assert_eq!(r.key_source, source);
        // A key of its own wins; an empty id is no id.
        let mut keyed = request(json!({"user_id": "u", "amount": 5, "key": "K"}));
        keyed.key_by_message("ops", "m-1").unwrap();
        assert_eq!(
            (keyed.key.as_str(), keyed.key_source),
            ("K", KeySource::Given)
        );
        let mut empty = request(json!({"user_id": "u", "amount": 5}));
        empty.key_by_message("ops", "").unwrap();
        assert_eq!(empty.key_source, KeySource::Generated);
        assert!(empty.key.starts_with("GRANT-"), "{}", empty.key);
    }

    #[test]
    fn senders_and_ids_that_read_alike_make_different_keys() {
        let key = |sender: &str, id: &str| crate::ledger::message_key(TxType::TopUp, sender, id);
        assert_ne!(key("ops", "x-1"), key("ops-x", "1"));
        assert_eq!(key("ops-x", "1"), "TOP-UP-MSG-5:ops-x-1");
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
            assert_eq!(r.key_source, KeySource::Generated);
        }
    }
}
