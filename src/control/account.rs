//! `account` {user_id} ⇒ {user_id, balance, seq, refill_month, auto_top_up, requests_made,
//! outstanding_request}; `not_found` for a user with no account. Read only: unlike `balance`,
//! it neither creates the account nor applies the month's refill.

use serde_json::Value;

use super::fields::Fields;
use super::{to_result, Context, ControlError};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub user_id: String,
}

pub fn parse(f: &Fields<'_>) -> Result<Request, ControlError> {
    let user_id = f.string("user_id")?.to_owned();
    crate::ledger::check_user_id(&user_id)?;
    Ok(Request { user_id })
}

pub async fn run(ctx: &Context, req: &Request) -> Result<Value, ControlError> {
    let view = ctx.ledger.account(&req.user_id, ctx.clock.now()).await?;
    to_result(&view)
}
