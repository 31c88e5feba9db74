//! Decisions and settlements for a batch of node executions, in one database transaction,
//! as a pipeline of named stages over one state per entry:
//!
//! 1. **price** (pure): every entry priced from the cost table, pre-flight or post-flight;
//!    unpriceable ⇒ invalid, unless the look-up finds it a repeat (a duplicate).
//! 2. **lock** (ledger): the users' balance rows locked in user_id order; earlier decisions
//!    and settlements of the batch's node_exec_ids looked up ⇒ duplicates (for a batch of
//!    starts only, after its write found one: see [`decide_batch`]).
//! 3. **apply** (pure, [`apply`]): each remaining entry applied to its account in delivery
//!    order, exactly as if processed one at a time: a start decides (a later delivery of the
//!    same node_exec_id in the batch is a duplicate once one was decided), a completion
//!    settles the difference to its post-flight price, or decides itself when it overtook its
//!    start.
//! 4. **write** (ledger): decisions, settlements, ledger rows, balances and outbox rows in one
//!    statement.

mod apply;
mod batch;
#[cfg(test)]
mod memory;
mod turn;

use sqlx::PgPool;

use crate::clock::Stamp;
use crate::cost::CostTable;
pub use crate::ledger::Outcome;
use crate::ledger::{store, LedgerError, LedgerPolicy};
use crate::message::NodeExecutionEntry;
pub use apply::FeePolicy;
use batch::Batch;
#[cfg(test)]
pub(crate) use memory::MemoryLedger;
pub use turn::{Follow, Turn};

/// What happened to one entry of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// A new decision was stored.
    Decided {
        outcome: Outcome,
        cost: i64,
        fee: i64,
        /// Credits a completion that decided its execution could not collect
        /// (`settlement.allow_debt` = false), its fee's included; 0 for a start.
        uncollected: i64,
        balance: i64,
    },
    /// The node execution was decided before; nothing changed. `conflicting` when this
    /// delivery names another user or block than the stored decision.
    Duplicate { conflicting: bool },
    /// The entry cannot be priced or charged (e.g. its cost overflows); it goes to the dead
    /// letters.
    Invalid { reason: String },
    /// A completion settled its execution: `delta` = `post` − `pre` moved (less what was
    /// `uncollected`).
    Settled {
        pre: i64,
        post: i64,
        delta: i64,
        uncollected: i64,
        balance: i64,
    },
}

/// Everything a decision depends on besides the database.
#[derive(Debug, Clone)]
pub struct Pricing {
    pub costs: CostTable,
    pub ledger: LedgerPolicy,
    pub fee: FeePolicy,
    /// Whether a post-flight charge may take a balance below 0 (`settlement.allow_debt`).
    pub allow_debt: bool,
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
    /// An earlier batch in flight that shares a user with this one failed: this one rolled
    /// back, to be decided again after it ([`Turn`]).
    #[error("an earlier batch sharing a user failed; deciding again after it")]
    Reordered,
    /// Deciding panicked: a defect, caught so that it costs only the entry that meets it
    /// (see `consumer::process`). Nothing the attempt wrote stays.
    #[error("a defect: {0}")]
    Defect(String),
}

impl DecideError {
    pub(crate) fn is_transient(&self) -> bool {
        match self {
            // A fault of the database's set-up is not the batch's: it waits for the fix.
            DecideError::Db(e) => LedgerError::may_clear_db(e),
            DecideError::Ledger(e) => e.may_clear(),
            DecideError::Race | DecideError::Reordered => true,
            DecideError::Defect(_) => false,
        }
    }
}

/// Decides `entries` (in delivery order) in one transaction, at the time `at` gives once the
/// users' rows are held (the rows' stamps, fee day and refill month). Returns one verdict per
/// entry, in the same order. On error nothing was written.
///
/// A batch of starts only (the common case) is first written without looking for earlier
/// decisions: the decisions' primary key refuses a node execution decided before, and only
/// then is the batch decided again with the look-up. Duplicates are rare (a redelivery after
/// a crash, a producer's retry), so the look-up would cost every batch a statement to save
/// an occasional one.
pub async fn decide_batch(
    pool: &PgPool,
    pricing: &Pricing,
    entries: &[NodeExecutionEntry],
    at: impl Stamp,
) -> Result<Vec<Verdict>, DecideError> {
    decide_in_turn(pool, pricing, entries, at, Turn::alone()).await
}

/// [`decide_batch`] while other batches may be in flight (see [`Turn`]). In a pipeline, a
/// batch of starts that finds an earlier decision fails with [`DecideError::Race`] instead of
/// being decided again within its turn: the caller decides it again alone, after the batches
/// in flight with it.
pub async fn decide_in_turn(
    pool: &PgPool,
    pricing: &Pricing,
    entries: &[NodeExecutionEntry],
    at: impl Stamp,
    turn: Turn,
) -> Result<Vec<Verdict>, DecideError> {
    let at: &dyn Stamp = &at;
    let batch = Batch::price(&pricing.costs, entries);
    // An unpriceable entry writes nothing that would find its earlier decision: look.
    if batch.has_completions() || batch.has_unpriced() {
        return decide_priced(pool, pricing, batch, Look::Earlier, at, turn).await;
    }
    let pipelined = turn.pipelined();
    match decide_priced(pool, pricing, batch, Look::Skip, at, turn).await {
        Err(DecideError::Race) if !pipelined => {
            let batch = Batch::price(&pricing.costs, entries);
            decide_priced(pool, pricing, batch, Look::Earlier, at, Turn::alone()).await
        }
        decided => decided,
    }
}

/// Whether a transaction looks for earlier decisions and settlements of its node executions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Look {
    Earlier,
    Skip,
}

async fn decide_priced(
    pool: &PgPool,
    pricing: &Pricing,
    mut batch: Batch<'_>,
    look: Look,
    at: &dyn Stamp,
    turn: Turn,
) -> Result<Vec<Verdict>, DecideError> {
    let users = batch.users();
    turn.wait_to_lock().await;
    // Nothing to lock and nothing to look up (no entry).
    if users.is_empty() && !batch.has_unpriced() {
        turn.committed();
        return Ok(batch.verdicts());
    }
    // Lock first, then look for earlier decisions: once we hold the users' rows, any decision
    // for these users committed by another worker is visible to the next statement.
    let (mut tx, mut accounts) = store::begin_locked(pool, &users).await?;
    // The batch's node executions: told to the batches after it, and looked up.
    let ids = if turn.pipelined() || look == Look::Earlier {
        batch.pending_ids()
    } else {
        Vec::new()
    };
    turn.locked(&users, &ids);
    if !turn.may_write(&users, &ids) {
        tx.rollback().await?;
        return Err(DecideError::Reordered);
    }
    if look == Look::Earlier {
        look_up_earlier(&mut tx, &mut batch, &ids).await?;
    }
    // Read with the users' rows held: a writer that had them first has committed, so these
    // rows are stamped after its.
    let now = at.stamp();
    let writes = batch.apply(&mut accounts, pricing, now);
    let written = store::write(
        &mut tx,
        &writes.written,
        accounts.values(),
        &writes.changes,
        now,
    )
    .await;
    race_or(written)?;
    if !turn.may_commit(&users).await {
        tx.rollback().await?;
        return Err(DecideError::Reordered);
    }
    tx.commit().await?;
    turn.committed();
    writes.changes.count_refills();
    Ok(batch.verdicts())
}

/// Marks the batch's entries that earlier transactions decided or settled.
async fn look_up_earlier(
    tx: &mut sqlx::PgConnection,
    batch: &mut Batch<'_>,
    ids: &[&str],
) -> Result<(), DecideError> {
    let decided = store::earlier_decisions(tx, ids).await?;
    // A batch of starts only needs no settlement look-up.
    let settled = if batch.has_completions() {
        store::earlier_settlements(tx, ids).await?
    } else {
        Vec::new()
    };
    batch.mark_earlier(decided, &settled);
    Ok(())
}

/// A write refused by a decision's key is a race, decided again; other errors stay errors.
fn race_or(written: Result<(), sqlx::Error>) -> Result<(), DecideError> {
    match written {
        // Without the look-up: a node execution decided before. With it: a worker holding
        // other users' locks decided one of these ids meanwhile (a conflicting duplicate).
        // The transaction is rolled back; the next attempt sees the decision.
        Err(e) if store::decided_elsewhere(&e) => Err(DecideError::Race),
        other => Ok(other?),
    }
}

#[cfg(test)]
mod tests;
