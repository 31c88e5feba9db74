//! The rule of one decision, applied to one locked account in memory: lazy refill, price +
//! execution fee, funds check, ledger rows, low-balance crossing. Pure: no database, no clock.

use chrono::{DateTime, NaiveDate, Utc};
use serde_json::json;

use super::Pricing;
use crate::cost::Price;
use crate::events::{self, ExecutionRef};
use crate::ledger::{
    Account, Changes, Entry, LedgerError, NewDecision, NewSettlement, Outcome, TxType,
};
use crate::message::NodeExecutionEntry;

/// The execution fee (docs/contract.md §3): `amount` on every `every`-th execution of a user's day.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FeePolicy {
    pub every: i64,
    pub amount: i64,
}

impl FeePolicy {
    /// The fee the `count`-th execution of `user_id`'s `day` owes, if any, when `charged`
    /// fees were charged that day before: its key carries the fee's ordinal for the day
    /// (`charged` + 1, which stays right when `every` changed during the day).
    fn due(self, count: i64, charged: i64, user_id: &str, day: NaiveDate) -> Option<FeeDue> {
        let owed = self.every > 0 && self.amount > 0 && count % self.every == 0;
        let n = charged + 1;
        owed.then(|| FeeDue {
            key: format!("EXECUTION-FEE-{user_id}-{}-{n}", day.format("%Y-%m-%d")),
            amount: self.amount,
            n,
            every: self.every,
        })
    }

    /// The fee `account`'s `count`-th execution of `day` owes, if any.
    fn due_from(
        self,
        account: &Account,
        count: i64,
        user_id: &str,
        day: NaiveDate,
    ) -> Option<FeeDue> {
        self.due(count, account.fees_charged(day, self.every), user_id, day)
    }
}

struct FeeDue {
    key: String,
    amount: i64,
    /// Its ordinal for the day.
    n: i64,
    /// The executions it is the fee for (AutoGPT's metadata names the threshold, not the
    /// running count).
    every: i64,
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
    atomically(account, changes, |account, changes| {
        apply_unchecked(account, changes, e, price, rules, now)
    })
}

fn apply_unchecked(
    account: &mut Account,
    changes: &mut Changes,
    e: &NodeExecutionEntry,
    price: &Price,
    rules: &Pricing,
    now: DateTime<Utc>,
) -> Result<NewDecision, LedgerError> {
    account.refill_lazily(changes, rules.ledger.lazy(now), now)?;
    let day = account.counting_day(now.date_naive());
    let count = account.next_execution(day);
    let fee = rules.fee.due_from(account, count, &e.user_id, day);
    let fee_amount = fee.as_ref().map_or(0, |f| f.amount);
    let total = price
        .cost
        .checked_add(fee_amount)
        .ok_or_else(|| fee_overflow(e, price.cost, fee_amount))?;
    let before = account.balance;
    if refused_for_funds(total, price.metered, before) {
        changes.events.push(events::charge_rejected(
            &e.user_id,
            &e.node_exec_id,
            &e.graph_exec_id,
            total,
            before,
            now,
        ));
        // A user who can no longer afford a run makes no debit: without this, a request
        // whose payment failed would never be made again once its TTL passed.
        account.request_top_up(changes, rules.ledger.auto_top_up_ttl, now);
        return Ok(decision(e, Outcome::Rejected, price.cost, 0, None, None));
    }
    account.count_execution(day, count);
    let (transaction_key, fee_key) = post_charges(account, changes, e, price, fee, None, now)?;
    let debited = transaction_key.is_some() || fee_key.is_some();
    debit_events(account, changes, e, rules, (before, debited, 0), now);
    Ok(decision(
        e,
        paid_or_free(price.cost),
        price.cost,
        fee_amount,
        transaction_key,
        fee_key,
    ))
}

/// Posts the block's cost and the fee (each only when > 0); returns their keys. Rows of a
/// decision made from a completion (`uncollected`: what of its price the balance could not
/// hold) may leave a debt and say so in their metadata (`phase: completed`), which the
/// schema requires of such rows.
fn post_charges(
    account: &mut Account,
    changes: &mut Changes,
    e: &NodeExecutionEntry,
    price: &Price,
    fee: Option<FeeDue>,
    uncollected: Option<i64>,
    now: DateTime<Utc>,
) -> Result<(Option<String>, Option<String>), LedgerError> {
    let mut post = |key: String, amount: i64, mut metadata: serde_json::Value| {
        if uncollected.is_some() {
            metadata["phase"] = "completed".into();
            account.post_debt(changes, usage(e, key, amount, metadata, now))
        } else {
            account.post(changes, usage(e, key, amount, metadata, now))
        }
    };
    let mut transaction_key = None;
    if price.cost > 0 {
        let key = format!("USAGE-{}", e.node_exec_id);
        let mut metadata = usage_metadata(e, price);
        if uncollected.is_some() {
            metadata["status"] = e.status.as_str().into();
        }
        if let Some(u) = uncollected.filter(|u| *u > 0) {
            // The row's amount is what the balance held; the price was this much more.
            metadata["uncollected"] = u.into();
        }
        post(key.clone(), -price.cost, metadata)?;
        transaction_key = Some(key);
    }
    let mut fee_key = None;
    if let Some(f) = fee {
        post(f.key.clone(), -f.amount, fee_metadata(e, f.every))?;
        account.count_fee(f.n);
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

fn fee_metadata(e: &NodeExecutionEntry, every: i64) -> serde_json::Value {
    json!({
        "reason": format!("Execution Cost for {every} blocks of ex_id:{} g_id:{}", e.graph_exec_id, e.graph_id),
        "input": {"execution_count": every, "charge": "Execution Cost"},
        "node_exec_id": e.node_exec_id,
        "graph_exec_id": e.graph_exec_id,
        "graph_id": e.graph_id,
    })
}

fn usage_metadata(e: &NodeExecutionEntry, price: &Price) -> serde_json::Value {
    let block = price.block_name.as_deref().unwrap_or(&e.block_id);
    let mut metadata = json!({
        "reason": format!("Ran block {} {}", e.block_id, block),
        "block_id": e.block_id,
        "block": block,
        "node_id": e.node_id,
        "node_exec_id": e.node_exec_id,
        "graph_id": e.graph_id,
        "graph_exec_id": e.graph_exec_id,
        "input": price.matched_filter,
    });
    // Priced post-flight: the measurements that priced it, as a settlement row keeps them.
    if let Some(stats) = &e.stats {
        metadata["stats"] = json!(stats);
    } else if price.metered {
        // Priced before a run whose use decides its price: the completion settles the rest.
        metadata["estimate"] = json!(true);
    }
    metadata
}

/// Runs `rule` on the account; on error the account and `changes` are as before.
fn atomically<T>(
    account: &mut Account,
    changes: &mut Changes,
    rule: impl FnOnce(&mut Account, &mut Changes) -> Result<T, LedgerError>,
) -> Result<T, LedgerError> {
    let saved = (
        account.clone(),
        changes.transactions.len(),
        changes.events.len(),
    );
    let result = rule(account, changes);
    if result.is_err() {
        *account = saved.0;
        changes.transactions.truncate(saved.1);
        changes.events.truncate(saved.2);
    }
    result
}

/// Settles a completion whose execution was decided with block cost `pre` (docs/contract.md
/// §3): the difference to the post-flight price `post` moves once, as `SETTLE-{id}`.
pub(crate) fn settle(
    account: &mut Account,
    changes: &mut Changes,
    e: &NodeExecutionEntry,
    post: &Price,
    pre: i64,
    rules: &Pricing,
    now: DateTime<Utc>,
) -> Result<NewSettlement, LedgerError> {
    atomically(account, changes, |account, changes| {
        account.refill_lazily(changes, rules.ledger.lazy(now), now)?;
        let delta = post
            .cost
            .checked_sub(pre)
            .ok_or_else(|| overflow(e, post.cost))?;
        let before = account.balance;
        let (moved, uncollected) = collectable(delta, before, rules.allow_debt);
        let mut key = None;
        if moved != 0 {
            let k = format!("SETTLE-{}", e.node_exec_id);
            let metadata = settle_metadata(e, post, (pre, delta, uncollected));
            account.post_debt(changes, usage(e, k.clone(), -moved, metadata, now))?;
            key = Some(k);
        }
        let debited = moved > 0;
        debit_events(
            account,
            changes,
            e,
            rules,
            (before, debited, uncollected),
            now,
        );
        Ok(settlement(e, pre, post.cost, uncollected, key))
    })
}

/// What of a settlement's `delta` moves now, and what of an extra charge stays uncollected:
/// everything moves when debt is allowed; otherwise an extra charge takes at most what the
/// balance holds. A refund always moves whole.
fn collectable(delta: i64, balance: i64, allow_debt: bool) -> (i64, i64) {
    if delta <= 0 || allow_debt {
        return (delta, 0);
    }
    let moved = delta.min(balance.max(0));
    (moved, delta - moved)
}

/// A completion that overtook its start decides the execution itself: charged (or free) at
/// its post-flight price plus the execution fee when due, with no funds check (the work was
/// done; the debt rules apply), and a settlement of delta 0 (or the uncollected part).
pub(crate) fn decide_from_completion(
    account: &mut Account,
    changes: &mut Changes,
    e: &NodeExecutionEntry,
    post: &Price,
    rules: &Pricing,
    now: DateTime<Utc>,
) -> Result<(NewDecision, NewSettlement, i64), LedgerError> {
    atomically(account, changes, |account, changes| {
        account.refill_lazily(changes, rules.ledger.lazy(now), now)?;
        let day = account.counting_day(now.date_naive());
        let count = account.next_execution(day);
        let due = rules.fee.due_from(account, count, &e.user_id, day);
        account.count_execution(day, count);
        let before = account.balance;
        let due_amount = due.as_ref().map_or(0, |f| f.amount);
        // Refused like a start whose cost and fee overflow, not capped to what fits.
        post.cost
            .checked_add(due_amount)
            .ok_or_else(|| fee_overflow(e, post.cost, due_amount))?;
        let available = if rules.allow_debt {
            i64::MAX
        } else {
            before.max(0)
        };
        let fee = due.filter(|f| f.amount <= available);
        let fee_amount = fee.as_ref().map_or(0, |f| f.amount);
        let cost = post.cost.min(available - fee_amount);
        let uncollected = post.cost - cost;
        // A fee the balance could not hold is reported with the cost's rest (it fits: cost +
        // fee was checked above).
        let reported = uncollected + (due_amount - fee_amount);
        let charged = Price {
            cost,
            ..post.clone()
        };
        let (transaction_key, fee_key) =
            post_charges(account, changes, e, &charged, fee, Some(uncollected), now)?;
        let debited = transaction_key.is_some() || fee_key.is_some();
        debit_events(account, changes, e, rules, (before, debited, reported), now);
        let d = decision(
            e,
            paid_or_free(cost),
            cost,
            fee_amount,
            transaction_key,
            fee_key,
        );
        let s = NewSettlement {
            fee_uncollected: due_amount - fee_amount,
            ..settlement(e, cost, post.cost, uncollected, None)
        };
        Ok((d, s, reported))
    })
}

/// Whether a start is refused for funds: its cost and fee exceed the balance, or a block
/// billed by what its run uses (a `metered` entry, priced 0 before the run: no estimate)
/// meets a balance of 0 or less, as AutoGPT's `charge_usage` refuses it: with nothing to pay
/// from, its run could only make or deepen a debt, and a debt "rejects every paid execution"
/// (SPEC §4.2). A `run` entry of 0 credits is free, whatever the balance, as SPEC's `free`
/// row has it (AutoGPT refuses that one too at 0 or below).
pub(super) fn refused_for_funds(total: i64, metered: bool, balance: i64) -> bool {
    if total > 0 {
        total > balance
    } else {
        metered && balance <= 0
    }
}

/// The outcome of an accepted execution: charged when its block cost anything.
fn paid_or_free(cost: i64) -> Outcome {
    if cost > 0 {
        Outcome::Charged
    } else {
        Outcome::Free
    }
}

/// The events a debit owes besides its rows: `balance.low` when it took the balance (`before`
/// it) across the threshold, an auto top-up request when due, `charge.uncollected` for what
/// a post-flight charge left.
fn debit_events(
    account: &mut Account,
    changes: &mut Changes,
    e: &NodeExecutionEntry,
    rules: &Pricing,
    (before, debited, uncollected): (i64, bool, i64),
    now: DateTime<Utc>,
) {
    if debited {
        let threshold = rules.ledger.low_balance_threshold;
        let seq = account.last_seq;
        changes
            .events
            .extend(account.low_balance_crossing(before, seq, threshold, now));
    }
    // A charge the balance could not hold asks for credits even when nothing was taken, as a
    // run refused for funds does: the user owes more than the balance holds.
    if debited || uncollected > 0 {
        account.request_top_up(changes, rules.ledger.auto_top_up_ttl, now);
    }
    if uncollected > 0 {
        changes.events.push(events::charge_uncollected(
            &e.user_id,
            &e.node_exec_id,
            &e.graph_exec_id,
            uncollected,
            account.balance,
            now,
        ));
    }
}

fn exec(e: &NodeExecutionEntry) -> ExecutionRef<'_> {
    ExecutionRef {
        node_exec_id: Some(&e.node_exec_id),
        graph_exec_id: Some(&e.graph_exec_id),
    }
}

/// A USAGE row of the execution `e` (a charge, a fee or a settlement).
fn usage(
    e: &NodeExecutionEntry,
    key: String,
    amount: i64,
    metadata: serde_json::Value,
    at: DateTime<Utc>,
) -> Entry<'_> {
    Entry {
        tx_type: TxType::Usage,
        key,
        amount,
        metadata,
        exec: exec(e),
        at,
    }
}

fn fee_overflow(e: &NodeExecutionEntry, cost: i64, fee: i64) -> LedgerError {
    LedgerError::AmountOutOfRange(format!(
        "amount: cost {cost} + execution fee {fee} of node execution {} overflows a 64-bit integer",
        e.node_exec_id
    ))
}

fn overflow(e: &NodeExecutionEntry, amount: i64) -> LedgerError {
    LedgerError::AmountOutOfRange(format!(
        "amount: settlement of node execution {}: {amount} overflows a 64-bit integer",
        e.node_exec_id
    ))
}

fn settlement(
    e: &NodeExecutionEntry,
    pre: i64,
    post: i64,
    uncollected: i64,
    transaction_key: Option<String>,
) -> NewSettlement {
    NewSettlement {
        node_exec_id: e.node_exec_id.clone(),
        user_id: e.user_id.clone(),
        block_id: e.block_id.clone(),
        status: e.status.as_str(),
        pre,
        post,
        delta: post - pre,
        uncollected,
        fee_uncollected: 0,
        transaction_key,
    }
}

fn settle_metadata(
    e: &NodeExecutionEntry,
    post: &Price,
    (pre, delta, uncollected): (i64, i64, i64),
) -> serde_json::Value {
    let block = post.block_name.as_deref().unwrap_or(&e.block_id);
    let mut metadata = json!({
        "reason": format!("Settled block {} {}: {} ⇒ {}", e.block_id, block, pre, post.cost),
        "pre": pre,
        "post": post.cost,
        "delta": delta,
        "status": e.status.as_str(),
        "block_id": e.block_id,
        "block": block,
        "node_id": e.node_id,
        "node_exec_id": e.node_exec_id,
        "graph_id": e.graph_id,
        "graph_exec_id": e.graph_exec_id,
        "input": post.matched_filter,
        "stats": e.stats,
    });
    if uncollected > 0 {
        // The row moved delta less this: what the balance could not hold.
        metadata["uncollected"] = uncollected.into();
    }
    metadata
}
