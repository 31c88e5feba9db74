//! `auto_top_up` {user_id, threshold, amount} or {user_id, off: true} ⇒ {user_id, threshold,
//! amount, requested}: a user's auto top-up (docs/contract.md §5); a request is published at
//! once when the balance is already below the threshold.

use serde_json::Value;

use super::fields::Fields;
use super::{to_result, Context, ControlError};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub user_id: String,
    /// `(threshold, amount)`, or `None` for `off`.
    pub config: Option<(i64, i64)>,
}

pub fn parse(f: &Fields<'_>) -> Result<Request, ControlError> {
    let user_id = f.string("user_id")?.to_owned();
    crate::ledger::check_user_id(&user_id)?;
    let off = match f.get("off") {
        None | Some(Value::Bool(false)) => false,
        Some(Value::Bool(true)) => true,
        Some(_) => return Err(ControlError::bad_request("off: expected true or false")),
    };
    let config = if off {
        if f.get("threshold").is_some() || f.get("amount").is_some() {
            return Err(ControlError::bad_request(
                "off: give either off: true or threshold and amount, not both",
            ));
        }
        None
    } else {
        Some((f.amount("threshold")?, f.amount("amount")?))
    };
    Ok(Request { user_id, config })
}

pub async fn run(ctx: &Context, req: &Request) -> Result<Value, ControlError> {
    let result = ctx
        .ledger
        .set_auto_top_up(&req.user_id, req.config, &*ctx.clock)
        .await?;
    to_result(&result)
}
