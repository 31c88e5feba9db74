//! `balance` {user_id} ⇒ {user_id, balance}.

use serde::Serialize;
use serde_json::Value;

use super::fields::Fields;
use super::{to_result, Context, ControlError};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub user_id: String,
}

#[derive(Debug, Serialize)]
struct Reply<'a> {
    user_id: &'a str,
    balance: i64,
}

pub fn parse(f: &Fields<'_>) -> Result<Request, ControlError> {
    let user_id = f.string("user_id")?.to_owned();
    crate::ledger::check_user_id(&user_id)?;
    Ok(Request { user_id })
}

pub async fn run(ctx: &Context, req: &Request) -> Result<Value, ControlError> {
    let balance = ctx.ledger.balance(&req.user_id, &*ctx.clock).await?;
    to_result(&Reply {
        user_id: &req.user_id,
        balance,
    })
}
