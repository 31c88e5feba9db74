//! Decisions for a batch of node executions, in one database transaction: lock the users'
//! balance rows in user_id order, apply the entries in delivery order exactly as if they were
//! processed one at a time (lazy refill, price + execution fee, funds check, low-balance
//! crossing), then write decisions, ledger rows, balances and outbox rows set-based.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, NaiveDate, Utc};
use serde::Serialize;
use serde_json::json;
use sqlx::{PgPool, Row};

use crate::cost::{CostTable, Price};
use crate::events::{self, ExecutionRef};
use crate::ledger::{store, Changes, LedgerError, LedgerPolicy, TxType};
use crate::message::NodeExecutionEntry;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Charged,
    Free,
    Rejected,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Charged => "charged",
            Outcome::Free => "free",
            Outcome::Rejected => "rejected",
        }
    }
}

/// What happened to one entry of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// A new decision was stored.
    Decided {
        outcome: Outcome,
        cost: i64,
        fee: i64,
        balance: i64,
    },
    /// The node execution was decided before; nothing changed. `conflicting` when this
    /// delivery names another user or block than the stored decision.
    Duplicate { conflicting: bool },
    /// The entry cannot be priced (e.g. its cost overflows); it goes to the dead letters.
    Invalid { reason: String },
}

/// The execution fee of SPEC §4.
#[derive(Debug, Clone, Copy)]
pub struct FeePolicy {
    pub every: i64,
    pub amount: i64,
}

/// Everything a decision depends on besides the database.
#[derive(Debug, Clone)]
pub struct Pricing {
    pub costs: CostTable,
    pub ledger: LedgerPolicy,
    pub fee: FeePolicy,
}

impl Pricing {
    pub fn from_settings(s: &crate::config::Settings, costs: CostTable) -> Self {
        Pricing {
            costs,
            ledger: LedgerPolicy::from_settings(s),
            fee: FeePolicy {
                every: s.execution_fee.every,
                amount: s.execution_fee.amount,
            },
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DecideError {
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    /// Another worker stored a decision for one of these node executions after we looked.
    #[error("a concurrent decision for the same node_exec_id; retrying")]
    Race,
}

impl DecideError {
    pub fn is_transient(&self) -> bool {
        match self {
            DecideError::Db(e) => crate::db::is_transient(e),
            DecideError::Ledger(e) => e.is_transient(),
            DecideError::Race => true,
        }
    }
}

const EXISTING: &str = "SELECT node_exec_id, user_id, block_id FROM credit.decisions
      WHERE node_exec_id = ANY($1::text[])";

struct NewDecision<'a> {
    entry: &'a NodeExecutionEntry,
    outcome: Outcome,
    cost: i64,
    fee: i64,
    transaction_key: Option<String>,
    fee_key: Option<String>,
}

/// Decides `entries` (in delivery order) in one transaction. Returns one verdict per entry,
/// in the same order. On error nothing was written.
pub async fn decide_batch(
    pool: &PgPool,
    pricing: &Pricing,
    entries: &[NodeExecutionEntry],
    now: DateTime<Utc>,
) -> Result<Vec<Verdict>, DecideError> {
    let mut verdicts: Vec<Option<Verdict>> = vec![None; entries.len()];
    // Price first: pure, and an unpriceable entry must not hold the others up.
    let mut prices: Vec<Option<Price>> = Vec::with_capacity(entries.len());
    for (i, e) in entries.iter().enumerate() {
        match pricing.costs.price(&e.block_id, &e.inputs, e.stats) {
            Ok(p) => prices.push(Some(p)),
            Err(err) => {
                verdicts[i] = Some(Verdict::Invalid {
                    reason: err.to_string(),
                });
                prices.push(None);
            }
        }
    }
    // Within the batch, the first delivery of a node_exec_id is the one that counts.
    let mut first: HashMap<&str, usize> = HashMap::with_capacity(entries.len());
    for (i, e) in entries.iter().enumerate() {
        if verdicts[i].is_some() {
            continue;
        }
        if let Some(&j) = first.get(e.node_exec_id.as_str()) {
            verdicts[i] = Some(Verdict::Duplicate {
                conflicting: is_conflict(&entries[j], &e.user_id, &e.block_id),
            });
        } else {
            first.insert(e.node_exec_id.as_str(), i);
        }
    }
    if first.is_empty() {
        return Ok(verdicts.into_iter().map(finish).collect());
    }

    let mut users: Vec<String> = first
        .values()
        .map(|&i| entries[i].user_id.clone())
        .collect::<HashSet<_>>()
        .into_iter()
        .collect();
    users.sort_unstable();
    let ids: Vec<&str> = first.keys().copied().collect();

    let mut tx = pool.begin().await?;
    // Lock first, then look for earlier decisions: once we hold the users' rows, any decision
    // for these users committed by another worker is visible to the next statement.
    let mut accounts = store::lock_accounts(&mut tx, &users).await?;
    let existing = sqlx::query(EXISTING).bind(&ids).fetch_all(&mut *tx).await?;
    for row in &existing {
        let id: String = row.try_get("node_exec_id")?;
        let user: String = row.try_get("user_id")?;
        let block: String = row.try_get("block_id")?;
        if let Some(i) = first.remove(id.as_str()) {
            let e = &entries[i];
            verdicts[i] = Some(Verdict::Duplicate {
                conflicting: is_conflict(e, &user, &block),
            });
        }
    }

    let mut changes = Changes::default();
    let mut decisions: Vec<NewDecision<'_>> = Vec::with_capacity(first.len());
    let day = now.date_naive();
    let lazy = pricing.ledger.lazy(now);
    let threshold = pricing.ledger.low_balance_threshold;
    for (i, e) in entries.iter().enumerate() {
        if verdicts[i].is_some() || first.get(e.node_exec_id.as_str()) != Some(&i) {
            continue;
        }
        let Some(price) = prices[i].as_ref() else {
            continue;
        };
        let account = accounts
            .get_mut(&e.user_id)
            .ok_or(sqlx::Error::RowNotFound)?;
        if let Some((policy, month)) = lazy {
            account.refill(&mut changes, policy, month, now)?;
        }
        let count_today = if account.fee_day == Some(day) {
            account.fee_count
        } else {
            0
        };
        let count = count_today + 1;
        let fee_ordinal = fee_due(pricing.fee, count);
        let fee = if fee_ordinal.is_some() {
            pricing.fee.amount
        } else {
            0
        };
        let total = price
            .cost
            .checked_add(fee)
            .ok_or_else(|| LedgerError::Overflow {
                user_id: e.user_id.clone(),
                balance: account.balance,
                amount: price.cost,
            })?;
        let before = account.balance;
        let exec = ExecutionRef {
            node_exec_id: Some(&e.node_exec_id),
            graph_exec_id: Some(&e.graph_exec_id),
        };
        if total > before {
            changes.events.push(events::charge_rejected(
                &e.user_id,
                &e.node_exec_id,
                &e.graph_exec_id,
                total,
                before,
                now,
            ));
            verdicts[i] = Some(Verdict::Decided {
                outcome: Outcome::Rejected,
                cost: price.cost,
                fee: 0,
                balance: before,
            });
            decisions.push(NewDecision {
                entry: e,
                outcome: Outcome::Rejected,
                cost: price.cost,
                fee: 0,
                transaction_key: None,
                fee_key: None,
            });
            continue;
        }
        account.fee_day = Some(day);
        account.fee_count = count;
        account.dirty = true;
        let mut last_seq = None;
        let transaction_key = if price.cost > 0 {
            let key = format!("USAGE-{}", e.node_exec_id);
            last_seq = Some(account.post(
                &mut changes,
                TxType::Usage,
                key.clone(),
                -price.cost,
                usage_metadata(e, price),
                exec,
                now,
            )?);
            Some(key)
        } else {
            None
        };
        let fee_key = match fee_ordinal {
            Some(n) if fee > 0 => {
                let key = fee_key(&e.user_id, day, n);
                last_seq = Some(account.post(
                    &mut changes,
                    TxType::Usage,
                    key.clone(),
                    -fee,
                    json!({
                        "reason": format!("Execution Cost for {count} blocks of ex_id:{} g_id:{}", e.graph_exec_id, e.graph_id),
                        "input": {"execution_count": count, "charge": "Execution Cost"},
                        "node_exec_id": e.node_exec_id,
                        "graph_exec_id": e.graph_exec_id,
                        "graph_id": e.graph_id,
                    }),
                    exec,
                    now,
                )?);
                Some(key)
            }
            _ => None,
        };
        if let Some(seq) = last_seq {
            if before >= threshold && account.balance < threshold {
                changes.events.push(events::balance_low(
                    &e.user_id,
                    seq,
                    account.balance,
                    threshold,
                    now,
                ));
            }
        }
        let outcome = if price.cost > 0 {
            Outcome::Charged
        } else {
            Outcome::Free
        };
        verdicts[i] = Some(Verdict::Decided {
            outcome,
            cost: price.cost,
            fee: if fee_key.is_some() { fee } else { 0 },
            balance: account.balance,
        });
        decisions.push(NewDecision {
            entry: e,
            outcome,
            cost: price.cost,
            fee: if fee_key.is_some() { fee } else { 0 },
            transaction_key,
            fee_key,
        });
    }

    let mut rows = store::DecisionRows::default();
    for x in &decisions {
        rows.node_exec_id.push(&x.entry.node_exec_id);
        rows.user_id.push(&x.entry.user_id);
        rows.block_id.push(&x.entry.block_id);
        rows.graph_exec_id.push(&x.entry.graph_exec_id);
        rows.outcome.push(x.outcome.as_str());
        rows.cost.push(x.cost);
        rows.fee.push(x.fee);
        rows.transaction_key.push(x.transaction_key.as_deref());
        rows.fee_key.push(x.fee_key.as_deref());
    }
    let inserted = store::write(&mut tx, &rows, accounts.values(), &changes, now).await?;
    if inserted != rows.len() as u64 {
        // A worker holding other users' locks decided one of these ids meanwhile (a
        // conflicting duplicate). Roll back; the retry sees its decision.
        tx.rollback().await?;
        return Err(DecideError::Race);
    }
    tx.commit().await?;
    Ok(verdicts.into_iter().map(finish).collect())
}

fn finish(v: Option<Verdict>) -> Verdict {
    v.unwrap_or(Verdict::Invalid {
        reason: "internal: entry left undecided".into(),
    })
}

fn is_conflict(first: &NodeExecutionEntry, user_id: &str, block_id: &str) -> bool {
    first.user_id != user_id || first.block_id != block_id
}

/// The fee's ordinal for the day when the `count`-th execution owes it.
fn fee_due(fee: FeePolicy, count: i64) -> Option<i64> {
    (fee.every > 0 && count % fee.every == 0).then(|| count / fee.every)
}

fn fee_key(user_id: &str, day: NaiveDate, n: i64) -> String {
    format!("EXECUTION-FEE-{user_id}-{}-{n}", day.format("%Y-%m-%d"))
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
