//! One batch on its way through the stages: an entry's state moves from priced to decided.
//! Started and completed messages of an execution travel together; per node execution there
//! is one decision and one settlement, whatever the order or the duplicates.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};

use super::apply::{apply, decide_from_completion, settle};
use super::{Pricing, Verdict};
use crate::cost::{CostTable, Price};
use crate::ledger::store::Written;
use crate::ledger::{Account, Changes, EarlierDecision, EarlierSettlement, Outcome};
use crate::message::{NodeExecutionEntry, Phase};

/// Where one entry stands.
#[derive(Debug, Clone)]
enum State {
    /// Priced: waits for its account.
    Pending(Price),
    /// Cannot be priced (the reason): invalid, unless its execution was decided (a start) or
    /// settled (a completion) before, which makes it a duplicate like any other repeat.
    Unpriced(String),
    /// Nothing more to do.
    Done(Verdict),
}

/// What the write stage stores.
#[derive(Debug, Default)]
pub(crate) struct Writes {
    pub written: Written,
    pub changes: Changes,
}

pub(crate) struct Batch<'a> {
    entries: &'a [NodeExecutionEntry],
    states: Vec<State>,
    /// Decisions stored before this batch, for the settlements of their completions.
    earlier: HashMap<String, EarlierDecision>,
}

impl<'a> Batch<'a> {
    /// Stage 1: prices every entry, post-flight when it carries stats (a completion always
    /// does: absent stats count as zero). An unpriceable entry must not hold the others up.
    pub fn price(costs: &CostTable, entries: &'a [NodeExecutionEntry]) -> Self {
        let zero = crate::cost::Stats::default();
        let states = entries
            .iter()
            .map(|e| {
                let stats = match e.phase {
                    Phase::Started => e.stats.as_ref(),
                    Phase::Completed => Some(e.stats.as_ref().unwrap_or(&zero)),
                };
                match costs.price(&e.block_id, &e.inputs, stats) {
                    Ok(p) => State::Pending(p),
                    Err(err) => State::Unpriced(err.to_string()),
                }
            })
            .collect();
        Batch {
            entries,
            states,
            earlier: HashMap::new(),
        }
    }

    /// The entries whose states `keep` selects.
    fn entries_where(
        &self,
        keep: fn(&State) -> bool,
    ) -> impl Iterator<Item = &'a NodeExecutionEntry> + '_ {
        self.entries
            .iter()
            .zip(&self.states)
            .filter(move |(_, s)| keep(s))
            .map(|(e, _)| e)
    }

    /// The entries still to decide: the priced ones, and the unpriced ones (a repeat of an
    /// earlier execution is a duplicate).
    fn undecided(&self) -> impl Iterator<Item = &'a NodeExecutionEntry> + '_ {
        self.entries_where(|s| matches!(s, State::Pending(_) | State::Unpriced(_)))
    }

    /// The users whose accounts the priced entries need: sorted, unique (the lock order).
    pub fn users(&self) -> Vec<String> {
        let priced = self.entries_where(|s| matches!(s, State::Pending(_)));
        let set: HashSet<&str> = priced.map(|e| e.user_id.as_str()).collect();
        let mut users: Vec<String> = set.into_iter().map(str::to_owned).collect();
        users.sort_unstable();
        users
    }

    /// The node executions still to decide: sorted, unique.
    pub(crate) fn pending_ids(&self) -> Vec<&'a str> {
        let mut ids: Vec<&str> = self.undecided().map(|e| e.node_exec_id.as_str()).collect();
        ids.sort_unstable();
        ids.dedup();
        ids
    }

    /// Whether any entry still to decide is a completion (only those need earlier
    /// settlements).
    pub(crate) fn has_completions(&self) -> bool {
        self.undecided().any(|e| e.phase == Phase::Completed)
    }

    /// Whether an entry could not be priced: only a look-up tells whether it is a repeat.
    pub(crate) fn has_unpriced(&self) -> bool {
        self.states.iter().any(|s| matches!(s, State::Unpriced(_)))
    }

    /// Stage 3 (after the look-ups): a start decided before and a completion settled before
    /// are duplicates; earlier decisions are kept for the settlements.
    pub(crate) fn mark_earlier(
        &mut self,
        decided: Vec<EarlierDecision>,
        settled: &[EarlierSettlement],
    ) {
        let settled: HashMap<&str, &EarlierSettlement> = settled
            .iter()
            .map(|s| (s.node_exec_id.as_str(), s))
            .collect();
        self.earlier = decided
            .into_iter()
            .map(|d| (d.node_exec_id.clone(), d))
            .collect();
        for (e, state) in self.entries.iter().zip(self.states.iter_mut()) {
            if !matches!(state, State::Pending(_) | State::Unpriced(_)) {
                continue;
            }
            let id = e.node_exec_id.as_str();
            let first = match e.phase {
                Phase::Started => self.earlier.get(id).map(|d| (&d.user_id, &d.block_id)),
                Phase::Completed => settled.get(id).map(|s| (&s.user_id, &s.block_id)),
            };
            if let Some((user, block)) = first {
                let conflicting = e.user_id != *user || e.block_id != *block;
                *state = State::Done(Verdict::Duplicate { conflicting });
            }
        }
    }

    /// Stage 4: applies the pending entries to their accounts in delivery order. An entry
    /// whose account is missing or whose charge cannot be computed becomes invalid alone.
    pub fn apply(
        &mut self,
        accounts: &mut HashMap<String, Account>,
        pricing: &Pricing,
        now: DateTime<Utc>,
    ) -> Writes {
        let mut run = Run {
            writes: Writes::default(),
            decided: HashMap::new(),
            settled: HashMap::new(),
            earlier: &self.earlier,
        };
        for (e, state) in self.entries.iter().zip(self.states.iter_mut()) {
            let verdict = match state {
                State::Pending(price) => match accounts.get_mut(&e.user_id) {
                    Some(account) => run.one(account, e, price, pricing, now),
                    None => Verdict::Invalid {
                        reason: format!("internal: no account locked for user {}", e.user_id),
                    },
                },
                // A repeat of one decided or settled earlier in this batch is a duplicate.
                State::Unpriced(reason) => run.repeat(e).unwrap_or_else(|| Verdict::Invalid {
                    reason: std::mem::take(reason),
                }),
                State::Done(_) => continue,
            };
            *state = State::Done(verdict);
        }
        run.writes
    }

    /// One verdict per entry, in delivery order.
    pub fn verdicts(self) -> Vec<Verdict> {
        self.states
            .into_iter()
            .map(|s| match s {
                State::Done(v) => v,
                State::Unpriced(reason) => Verdict::Invalid { reason },
                State::Pending(_) => Verdict::Invalid {
                    reason: "internal: entry left undecided".into(),
                },
            })
            .collect()
    }
}

/// The apply stage's memory of what this batch decided and settled.
struct Run<'b, 'a> {
    writes: Writes,
    /// node_exec_id → the entry decided for it here, and the block cost it charged.
    decided: HashMap<&'a str, (&'a NodeExecutionEntry, i64)>,
    settled: HashMap<&'a str, &'a NodeExecutionEntry>,
    earlier: &'b HashMap<String, EarlierDecision>,
}

impl<'a> Run<'_, 'a> {
    fn one(
        &mut self,
        account: &mut Account,
        e: &'a NodeExecutionEntry,
        price: &Price,
        pricing: &Pricing,
        now: DateTime<Utc>,
    ) -> Verdict {
        if let Some(duplicate) = self.repeat(e) {
            return duplicate;
        }
        match e.phase {
            Phase::Started => self.start(account, e, price, pricing, now),
            Phase::Completed => self.complete(account, e, price, pricing, now),
        }
    }

    /// A duplicate when `e` repeats a start decided, or a completion settled, earlier in this
    /// batch.
    fn repeat(&self, e: &NodeExecutionEntry) -> Option<Verdict> {
        let id = e.node_exec_id.as_str();
        let first = match e.phase {
            Phase::Started => self.decided.get(id).map(|d| d.0),
            Phase::Completed => self.settled.get(id).copied(),
        }?;
        let conflicting = first.user_id != e.user_id || first.block_id != e.block_id;
        Some(Verdict::Duplicate { conflicting })
    }

    fn start(
        &mut self,
        account: &mut Account,
        e: &'a NodeExecutionEntry,
        price: &Price,
        pricing: &Pricing,
        now: DateTime<Utc>,
    ) -> Verdict {
        match apply(account, &mut self.writes.changes, e, price, pricing, now) {
            Ok(d) => {
                let charged = if d.outcome == Outcome::Charged {
                    d.cost
                } else {
                    0
                };
                self.decided.insert(&e.node_exec_id, (e, charged));
                let v = decided(&d, 0, account.balance);
                self.writes.written.decisions.push(d);
                v
            }
            Err(err) => invalid(err),
        }
    }

    fn complete(
        &mut self,
        account: &mut Account,
        e: &'a NodeExecutionEntry,
        price: &Price,
        pricing: &Pricing,
        now: DateTime<Utc>,
    ) -> Verdict {
        let id = e.node_exec_id.as_str();
        let decision = match self.decided.get(id) {
            Some((first, charged)) => {
                Some((first.user_id.as_str(), first.block_id.as_str(), *charged))
            }
            None => self
                .earlier
                .get(id)
                .map(|d| (d.user_id.as_str(), d.block_id.as_str(), d.charged())),
        };
        // A completion naming another user or block than its decision settles nothing.
        if let Some((user, block, _)) = decision {
            if user != e.user_id || block != e.block_id {
                return Verdict::Duplicate { conflicting: true };
            }
        }
        let pre = decision.map(|d| d.2);
        let changes = &mut self.writes.changes;
        let result = match pre {
            Some(pre) => settle(account, changes, e, price, pre, pricing, now).map(|s| (None, s)),
            // It overtook its start: it decides the execution itself.
            None => decide_from_completion(account, changes, e, price, pricing, now)
                .map(|(d, s, uncollected)| (Some((d, uncollected)), s)),
        };
        match result {
            Ok((decision, s)) => {
                let v = match &decision {
                    Some((d, uncollected)) => decided(d, *uncollected, account.balance),
                    None => Verdict::Settled {
                        pre: s.pre,
                        post: s.post,
                        delta: s.delta,
                        uncollected: s.uncollected,
                        balance: account.balance,
                    },
                };
                if let Some((d, _)) = decision {
                    self.decided.insert(&e.node_exec_id, (e, d.cost));
                    self.writes.written.decisions.push(d);
                }
                self.settled.insert(&e.node_exec_id, e);
                self.writes.written.settlements.push(s);
                v
            }
            Err(err) => invalid(err),
        }
    }
}

fn decided(d: &crate::ledger::NewDecision, uncollected: i64, balance: i64) -> Verdict {
    Verdict::Decided {
        outcome: d.outcome,
        cost: d.cost,
        fee: d.fee,
        uncollected,
        balance,
    }
}

fn invalid(err: crate::ledger::LedgerError) -> Verdict {
    Verdict::Invalid {
        reason: err.to_string(),
    }
}
