//! The decision stages against accounts, decisions and settlements held in memory: the same
//! pure stages as [`super::decide_batch`], with the store stages replaced by map lookups. Tests
//! and models use it to check the rules without a database.

use std::collections::HashMap;

use chrono::{DateTime, Utc};

use super::batch::Batch;
use super::{Pricing, Verdict};
use crate::events::NewEvent;
use crate::ledger::{
    Account, EarlierDecision, EarlierSettlement, NewDecision, NewSettlement, NewTransaction,
};
use crate::message::NodeExecutionEntry;

/// A ledger in memory: what the database would hold after the same decisions.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct MemoryLedger {
    pub accounts: HashMap<String, Account>,
    pub decisions: HashMap<String, NewDecision>,
    pub settlements: HashMap<String, NewSettlement>,
    pub transactions: Vec<NewTransaction>,
    pub events: Vec<NewEvent>,
}

impl MemoryLedger {
    /// Decides `entries` as one batch, exactly as [`super::decide_batch`] would.
    pub fn decide(
        &mut self,
        pricing: &Pricing,
        entries: &[NodeExecutionEntry],
        now: DateTime<Utc>,
    ) -> Vec<Verdict> {
        let mut batch = Batch::price(&pricing.costs, entries);
        for user in batch.users() {
            self.accounts
                .entry(user.clone())
                .or_insert_with(|| Account::new(user));
        }
        let ids = batch.pending_ids();
        let decided: Vec<EarlierDecision> = ids
            .iter()
            .filter_map(|id| self.decisions.get(*id))
            .map(|d| EarlierDecision {
                node_exec_id: d.node_exec_id.clone(),
                user_id: d.user_id.clone(),
                block_id: d.block_id.clone(),
                outcome: d.outcome.as_str().to_owned(),
                cost: d.cost,
            })
            .collect();
        let settled: Vec<EarlierSettlement> = ids
            .iter()
            .filter_map(|id| self.settlements.get(*id))
            .map(|s| EarlierSettlement {
                node_exec_id: s.node_exec_id.clone(),
                user_id: s.user_id.clone(),
                block_id: s.block_id.clone(),
            })
            .collect();
        batch.mark_earlier(decided, &settled);
        let writes = batch.apply(&mut self.accounts, pricing, now);
        // Nothing to write back: the maps are the store.
        for a in self.accounts.values_mut() {
            a.dirty = false;
        }
        for d in writes.written.decisions {
            self.decisions.insert(d.node_exec_id.clone(), d);
        }
        for s in writes.written.settlements {
            self.settlements.insert(s.node_exec_id.clone(), s);
        }
        self.transactions.extend(writes.changes.transactions);
        self.events.extend(writes.changes.events);
        batch.verdicts()
    }
}
