//! The rule of one decision, applied to one locked account in memory: lazy refill, price +
//! execution fee, funds check, ledger rows, low-balance crossing. Pure: no database, no clock.

use chrono::{DateTime, NaiveDate, Utc};
use serde_json::json;

use super::Pricing;
use crate::cost::Price;
use crate::events::{self, ExecutionRef};
use crate::ledger::{Account, Changes, LedgerError, NewDecision, Outcome, TxType};
use crate::message::NodeExecutionEntry;

/// The execution fee (docs/contract.md §3): `amount` on every `every`-th execution of a user's day.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FeePolicy {
    pub every: i64,
    pub amount: i64,
}

impl FeePolicy {
    /// The fee the `count`-th execution of `user_id`'s `day` owes, if any: its key carries
    /// the fee's ordinal for the day.
    fn due(self, count: i64, user_id: &str, day: NaiveDate) -> Option<FeeDue> {
        let owed = self.every > 0 && self.amount > 0 && count % self.every == 0;
        owed.then(|| FeeDue {
            key: format!(
                "EXECUTION-FEE-{user_id}-{}-{}",
                day.format("%Y-%m-%d"),
                count / self.every
            ),
            amount: self.amount,
        })
    }
}

struct FeeDue {
    key: String,
    amount: i64,
}

/// Applies `e`, priced at `price`, to `account`. On error neither the account nor `changes`
/// has changed, so the entry can be dead-lettered alone.
pub(crate) fn apply(
    account: &mut Account,
    changes: &mut Changes,
    e: &NodeExecutionEntry,
    price: &Price,
    rules: &Pricing,
    now: DateTime<Utc>,
) -> Result<NewDecision, LedgerError> {
    let saved = (
        account.clone(),
        changes.transactions.len(),
        changes.events.len(),
    );
    let result = apply_unchecked(account, changes, e, price, rules, now);
    if result.is_err() {
        *account = saved.0;
        changes.transactions.truncate(saved.1);
        changes.events.truncate(saved.2);
    }
    result
}

fn apply_unchecked(
    account: &mut Account,
    changes: &mut Changes,
    e: &NodeExecutionEntry,
    price: &Price,
    rules: &Pricing,
    now: DateTime<Utc>,
) -> Result<NewDecision, LedgerError> {
    if let Some((policy, month)) = rules.ledger.lazy(now) {
        account.refill(changes, policy, month, now)?;
    }
    let day = now.date_naive();
    let count = if account.fee_day == Some(day) {
        account.fee_count + 1
    } else {
        1
    };
    let fee = rules.fee.due(count, &e.user_id, day);
    let fee_amount = fee.as_ref().map_or(0, |f| f.amount);
    let total = price.cost.checked_add(fee_amount).ok_or_else(|| {
        LedgerError::AmountOutOfRange(format!(
            "cost {} + execution fee {fee_amount} of node execution {} overflows a 64-bit integer",
            price.cost, e.node_exec_id
        ))
    })?;
    let before = account.balance;
    if total > before {
        changes.events.push(events::charge_rejected(
            &e.user_id,
            &e.node_exec_id,
            &e.graph_exec_id,
            total,
            before,
            now,
        ));
        return Ok(decision(e, Outcome::Rejected, price.cost, 0, None, None));
    }
    account.fee_day = Some(day);
    account.fee_count = count;
    account.dirty = true;
    let (transaction_key, fee_key) = post_charges(account, changes, e, price, fee, count, now)?;
    if transaction_key.is_some() || fee_key.is_some() {
        let threshold = rules.ledger.low_balance_threshold;
        let seq = account.last_seq;
        changes
            .events
            .extend(account.low_balance_crossing(before, seq, threshold, now));
    }
    let outcome = if price.cost > 0 {
        Outcome::Charged
    } else {
        Outcome::Free
    };
    Ok(decision(
        e,
        outcome,
        price.cost,
        fee_amount,
        transaction_key,
        fee_key,
    ))
}

/// Posts the block's cost and the fee (each only when > 0); returns their keys.
fn post_charges(
    account: &mut Account,
    changes: &mut Changes,
    e: &NodeExecutionEntry,
    price: &Price,
    fee: Option<FeeDue>,
    count: i64,
    now: DateTime<Utc>,
) -> Result<(Option<String>, Option<String>), LedgerError> {
    let exec = ExecutionRef {
        node_exec_id: Some(&e.node_exec_id),
        graph_exec_id: Some(&e.graph_exec_id),
    };
    let mut transaction_key = None;
    if price.cost > 0 {
        let key = format!("USAGE-{}", e.node_exec_id);
        let metadata = usage_metadata(e, price);
        account.post(
            changes,
            TxType::Usage,
            key.clone(),
            -price.cost,
            metadata,
            exec,
            now,
        )?;
        transaction_key = Some(key);
    }
    let mut fee_key = None;
    if let Some(f) = fee {
        let metadata = fee_metadata(e, count);
        account.post(
            changes,
            TxType::Usage,
            f.key.clone(),
            -f.amount,
            metadata,
            exec,
            now,
        )?;
        fee_key = Some(f.key);
    }
    Ok((transaction_key, fee_key))
}

fn decision(
    e: &NodeExecutionEntry,
    outcome: Outcome,
    cost: i64,
    fee: i64,
    transaction_key: Option<String>,
    fee_key: Option<String>,
) -> NewDecision {
    NewDecision {
        node_exec_id: e.node_exec_id.clone(),
        user_id: e.user_id.clone(),
        block_id: e.block_id.clone(),
        graph_exec_id: e.graph_exec_id.clone(),
        outcome,
        cost,
        fee,
        transaction_key,
        fee_key,
    }
}

fn fee_metadata(e: &NodeExecutionEntry, count: i64) -> serde_json::Value {
    json!({
        "reason": format!("Execution Cost for {count} blocks of ex_id:{} g_id:{}", e.graph_exec_id, e.graph_id),
        "input": {"execution_count": count, "charge": "Execution Cost"},
        "node_exec_id": e.node_exec_id,
        "graph_exec_id": e.graph_exec_id,
        "graph_id": e.graph_id,
    })
}

fn usage_metadata(e: &NodeExecutionEntry, price: &Price) -> serde_json::Value {
    let block = price.block_name.as_deref().unwrap_or(&e.block_id);
    json!({
        "reason": format!("Ran block {} {}", e.block_id, block),
        "block_id": e.block_id,
        "block": block,
        "node_id": e.node_id,
        "node_exec_id": e.node_exec_id,
        "graph_id": e.graph_id,
        "graph_exec_id": e.graph_exec_id,
        "input": price.matched_filter,
    })
}
