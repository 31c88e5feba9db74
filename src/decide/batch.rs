//! One batch on its way through the stages: an entry's state moves from priced to decided.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};

use super::apply::apply;
use super::{Pricing, Verdict};
use crate::cost::{CostTable, Price};
use crate::ledger::{Account, Changes, EarlierDecision, NewDecision};
use crate::message::NodeExecutionEntry;

/// Where one entry stands.
#[derive(Debug, Clone)]
enum State {
    /// Priced and the first delivery of its node_exec_id in the batch: waits for its account.
    Pending(Price),
    /// Priced, but a later delivery of a node_exec_id already in the batch: a duplicate,
    /// unless the first cannot be charged (then this one is decided in its place).
    Repeat(Price),
    /// Nothing more to do.
    Done(Verdict),
}

impl State {
    fn price(&self) -> Option<&Price> {
        match self {
            State::Pending(p) | State::Repeat(p) => Some(p),
            State::Done(_) => None,
        }
    }
}

/// What the write stage stores.
#[derive(Debug, Default)]
pub(crate) struct Writes {
    pub decisions: Vec<NewDecision>,
    pub changes: Changes,
}

pub(crate) struct Batch<'a> {
    entries: &'a [NodeExecutionEntry],
    states: Vec<State>,
}

impl<'a> Batch<'a> {
    /// Stage 1: prices every entry. An unpriceable entry must not hold the others up.
    pub fn price(costs: &CostTable, entries: &'a [NodeExecutionEntry]) -> Self {
        let states = entries
            .iter()
            .map(
                |e| match costs.price(&e.block_id, &e.inputs, e.stats.as_ref()) {
                    Ok(p) => State::Pending(p),
                    Err(err) => State::Done(Verdict::Invalid {
                        reason: err.to_string(),
                    }),
                },
            )
            .collect();
        Batch { entries, states }
    }

    /// Stage 2: within the batch, the first delivery of a node_exec_id is the one that counts.
    pub(crate) fn dedupe(&mut self) {
        let mut seen: HashSet<&str> = HashSet::with_capacity(self.entries.len());
        for (e, state) in self.entries.iter().zip(self.states.iter_mut()) {
            if let State::Pending(price) = state {
                if !seen.insert(&e.node_exec_id) {
                    *state = State::Repeat(price.clone());
                }
            }
        }
    }

    fn pending(&self) -> impl Iterator<Item = &'a NodeExecutionEntry> + '_ {
        self.entries
            .iter()
            .zip(&self.states)
            .filter(|(_, s)| s.price().is_some())
            .map(|(e, _)| e)
    }

    /// The users whose accounts the pending entries need: sorted, unique (the lock order).
    pub fn users(&self) -> Vec<String> {
        let set: HashSet<&str> = self.pending().map(|e| e.user_id.as_str()).collect();
        let mut users: Vec<String> = set.into_iter().map(str::to_owned).collect();
        users.sort_unstable();
        users
    }

    pub(crate) fn pending_ids(&self) -> Vec<&'a str> {
        let set: HashSet<&str> = self.pending().map(|e| e.node_exec_id.as_str()).collect();
        set.into_iter().collect()
    }

    /// Stage 3 (after the lookup): entries decided before are duplicates.
    pub(crate) fn mark_earlier(&mut self, earlier: &[EarlierDecision]) {
        if earlier.is_empty() {
            return;
        }
        let by_id: HashMap<&str, &EarlierDecision> = earlier
            .iter()
            .map(|d| (d.node_exec_id.as_str(), d))
            .collect();
        for (e, state) in self.entries.iter().zip(self.states.iter_mut()) {
            if let (Some(_), Some(d)) = (state.price(), by_id.get(e.node_exec_id.as_str())) {
                let conflicting = is_conflict(e, &d.user_id, &d.block_id);
                *state = State::Done(Verdict::Duplicate { conflicting });
            }
        }
    }

    /// Stage 4: applies the pending entries to their accounts in delivery order. An entry
    /// whose account is missing or whose charge cannot be computed becomes invalid alone.
    pub(crate) fn apply(
        &mut self,
        accounts: &mut HashMap<String, Account>,
        pricing: &Pricing,
        now: DateTime<Utc>,
    ) -> Writes {
        let mut writes = Writes::default();
        // node_exec_id → the entry decided for it in this batch.
        let mut decided: HashMap<&str, &NodeExecutionEntry> = HashMap::new();
        for (e, state) in self.entries.iter().zip(self.states.iter_mut()) {
            let Some(price) = state.price() else {
                continue;
            };
            let verdict = if let Some(first) = decided.get(e.node_exec_id.as_str()) {
                Verdict::Duplicate {
                    conflicting: is_conflict(first, &e.user_id, &e.block_id),
                }
            } else {
                let v = apply_one(accounts, &mut writes, e, price, pricing, now);
                if matches!(v, Verdict::Decided { .. }) {
                    decided.insert(&e.node_exec_id, e);
                }
                v
            };
            *state = State::Done(verdict);
        }
        writes
    }

    /// One verdict per entry, in delivery order.
    pub fn verdicts(self) -> Vec<Verdict> {
        self.states
            .into_iter()
            .map(|s| match s {
                State::Done(v) => v,
                State::Pending(_) | State::Repeat(_) => Verdict::Invalid {
                    reason: "internal: entry left undecided".into(),
                },
            })
            .collect()
    }
}

fn is_conflict(first: &NodeExecutionEntry, user_id: &str, block_id: &str) -> bool {
    first.user_id != user_id || first.block_id != block_id
}

fn apply_one(
    accounts: &mut HashMap<String, Account>,
    writes: &mut Writes,
    e: &NodeExecutionEntry,
    price: &Price,
    pricing: &Pricing,
    now: DateTime<Utc>,
) -> Verdict {
    let Some(account) = accounts.get_mut(&e.user_id) else {
        return Verdict::Invalid {
            reason: format!("internal: no account locked for user {}", e.user_id),
        };
    };
    match apply(account, &mut writes.changes, e, price, pricing, now) {
        Ok(d) => {
            let v = Verdict::Decided {
                outcome: d.outcome,
                cost: d.cost,
                fee: d.fee,
                balance: account.balance,
            };
            writes.decisions.push(d);
            v
        }
        Err(err) => Verdict::Invalid {
            reason: err.to_string(),
        },
    }
}
