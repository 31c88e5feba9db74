//! Decision records: one per node execution, stored in the transaction that charged it.

use serde::Serialize;

/// What was decided for a node execution.
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

/// A decision to insert.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct NewDecision {
    pub node_exec_id: String,
    pub user_id: String,
    pub block_id: String,
    pub graph_exec_id: String,
    pub outcome: Outcome,
    /// Block cost without the execution fee.
    pub cost: i64,
    /// Execution fee posted with this execution (0 when none).
    pub fee: i64,
    pub transaction_key: Option<String>,
    pub fee_key: Option<String>,
}

/// An earlier decision: who it was for (to tell a redelivery from a conflicting one) and
/// what it charged (a settlement's `pre`).
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub(crate) struct EarlierDecision {
    pub node_exec_id: String,
    pub user_id: String,
    pub block_id: String,
    pub outcome: String,
    pub cost: i64,
}

impl EarlierDecision {
    /// The block cost it charged: its cost when charged, else 0.
    pub fn charged(&self) -> i64 {
        if self.outcome == Outcome::Charged.as_str() {
            self.cost
        } else {
            0
        }
    }
}

/// Who an earlier settlement was for.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub(crate) struct EarlierSettlement {
    pub node_exec_id: String,
    pub user_id: String,
    pub block_id: String,
}

/// A settlement to insert.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct NewSettlement {
    pub node_exec_id: String,
    pub user_id: String,
    pub block_id: String,
    pub status: &'static str,
    pub pre: i64,
    pub post: i64,
    pub delta: i64,
    pub uncollected: i64,
    /// An execution fee due that a completion-first decision could not take (the balance
    /// could not hold it with `settlement.allow_debt` false): reported, with `uncollected`,
    /// in `charge.uncollected`.
    pub fee_uncollected: i64,
    pub transaction_key: Option<String>,
}

/// A stored decision as the `outcome` command reports it, with its settlement (null until
/// the completion arrived).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct DecisionRecord {
    /// Whose execution it was decided as, and its block: with a conflicting duplicate (the
    /// same id for another user or block), the first decision's, which stands.
    pub user_id: String,
    pub block_id: String,
    pub outcome: String,
    pub cost: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub transaction_key: Option<String>,
    /// The execution fee posted with it (0 when none was posted: none due, or one a
    /// completion-first decision could not take, which its settlement keeps): debited
    /// besides `cost`.
    pub fee: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fee_transaction_key: Option<String>,
    #[sqlx(skip)]
    pub settlement: Option<SettlementRecord>,
}

/// A stored settlement as `outcome` reports it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct SettlementRecord {
    pub status: String,
    pub pre: i64,
    pub post: i64,
    pub delta: i64,
    pub uncollected: i64,
    pub fee_uncollected: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub transaction_key: Option<String>,
}
