//! `top_up` / `grant` {user_id, amount, key?, reason?} ⇒ {user_id, balance, transaction_key,
//! applied}.
//!
//! With a `key` the credit is exactly-once whatever happens; without one it is once per
//! delivery (a request redelivered after a crash before its ack gets a fresh key).

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
