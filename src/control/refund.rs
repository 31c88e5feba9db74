//! `refund` {user_id, amount, key, top_up_key, reason?} ⇒ {user_id, balance, transaction_key,
//! applied, seq}: takes back credits of a purchase the payment side refunded, or lost a
//! dispute over ([`Ledger::refund`](crate::ledger::Ledger::refund)). The key (the payment
//! side's refund or dispute id) is required: a refund is money, and exactly once.

use serde_json::Value;

use super::fields::Fields;
use super::{to_result, Context, ControlError};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub user_id: String,
    pub amount: i64,
    pub key: String,
    /// The key of the TOP_UP row the refund is of.
    pub top_up_key: String,
    pub reason: Option<String>,
}

pub fn parse(f: &Fields<'_>) -> Result<Request, ControlError> {
    let user_id = f.string("user_id")?.to_owned();
    crate::ledger::check_user_id(&user_id)?;
    Ok(Request {
        user_id,
        amount: f.amount("amount")?,
        key: f.string("key")?.to_owned(),
        top_up_key: f.string("top_up_key")?.to_owned(),
        reason: f.opt_string("reason")?.map(str::to_owned),
    })
}

pub async fn run(ctx: &Context, req: &Request) -> Result<Value, ControlError> {
    let keys = (req.key.as_str(), req.top_up_key.as_str());
    let posting = ctx
        .ledger
        .refund(
            &req.user_id,
            req.amount,
            keys,
            req.reason.as_deref(),
            &*ctx.clock,
        )
        .await?;
    to_result(&posting)
}

#[cfg(test)]
mod tests {
    use serde_json::{json, Map, Value};

    use super::*;

    fn parsed(body: Value) -> Result<Request, String> {
        let Value::Object(map) = body else { panic!() };
        let map: Map<String, Value> = map;
        parse(&Fields::new(&map)).map_err(|e| e.to_string())
    }

    #[test]
    fn a_refund_needs_its_key_and_its_purchase() {
        let ok = parsed(json!({"user_id": "u", "amount": 5, "key": "re_1", "top_up_key": "pi_1"}));
        assert_eq!(
            ok,
            Ok(Request {
                user_id: "u".into(),
                amount: 5,
                key: "re_1".into(),
                top_up_key: "pi_1".into(),
                reason: None,
            })
        );
        let no_key = parsed(json!({"user_id": "u", "amount": 5, "top_up_key": "pi_1"}));
        assert!(no_key.is_err_and(|e| e.starts_with("key:")));
        let no_purchase = parsed(json!({"user_id": "u", "amount": 5, "key": "re_1"}));
        assert!(no_purchase.is_err_and(|e| e.starts_with("top_up_key:")));
        let negative = parsed(json!({"user_id": "u", "amount": -5, "key": "k", "top_up_key": "p"}));
        assert!(negative.is_err_and(|e| e.starts_with("amount:")));
    }
}
