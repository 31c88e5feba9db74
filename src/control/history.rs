//! `history` {user_id, limit?} ⇒ {transactions: [...]}, newest first.

use chrono::Utc;
use serde::Serialize;
use serde_json::Value;

use super::fields::Fields;
use super::{to_result, Context, ControlError};
use crate::ledger::Transaction;

pub(crate) const DEFAULT_LIMIT: i64 = 50;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub user_id: String,
    pub limit: i64,
}

#[derive(Debug, Serialize)]
struct Reply {
    transactions: Vec<Transaction>,
}

pub fn parse(f: &Fields<'_>) -> Result<Request, ControlError> {
    let user_id = f.string("user_id")?.to_owned();
    crate::ledger::check_user_id(&user_id)?;
    let limit = f.opt_integer("limit")?.unwrap_or(DEFAULT_LIMIT);
    Ok(Request { user_id, limit })
}

pub async fn run(ctx: &Context, req: &Request) -> Result<Value, ControlError> {
    let transactions = ctx
        .ledger
        .history(&req.user_id, req.limit, Utc::now())
        .await?;
    to_result(&Reply { transactions })
}
