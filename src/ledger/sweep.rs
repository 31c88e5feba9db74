//! The monthly refill sweep (docs/contract.md §5): every account not yet evaluated for a month gets
//! topped up to the target, `chunk` users per transaction.

use std::time::Instant;

use chrono::Utc;
use serde::Serialize;
use sqlx::PgPool;

use super::account::{Account, Changes, RefillPolicy};
use super::month::Month;
use super::{check_user_id, store, LedgerError};

/// Totals of one sweep.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct SweepReport {
    pub month: String,
    pub users_refilled: i64,
    pub credits_granted: i64,
    pub users_evaluated: i64,
    pub duration_ms: u64,
}

impl SweepReport {
    fn tally(&mut self, granted: i64) {
        self.users_evaluated += 1;
        if granted > 0 {
            self.users_refilled += 1;
            self.credits_granted += granted;
        }
    }
}

/// Refills every user for `month` (or only `user_id`), `chunk` users per transaction. Safe to
/// run concurrently: rows are locked in user_id order and re-checked after the lock, so a
/// user another sweep just refilled is skipped. `progress` sees the running totals.
pub async fn sweep(
    pool: &PgPool,
    policy: RefillPolicy,
    month: Month,
    user_id: Option<&str>,
    chunk: i64,
    progress: impl FnMut(&SweepReport),
) -> Result<SweepReport, LedgerError> {
    let started = Instant::now();
    let mut report = SweepReport {
        month: month.to_string(),
        ..Default::default()
    };
    match user_id {
        Some(user) => sweep_one(pool, policy, month, user, &mut report).await?,
        None => sweep_all(pool, policy, month, chunk, &mut report, progress).await?,
    }
    report.duration_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    metrics::counter!("credit_refill_runs_total").increment(1);
    metrics::counter!("credit_refill_users_total").increment(report.users_refilled as u64);
    metrics::counter!("credit_refill_credits_total").increment(report.credits_granted as u64);
    Ok(report)
}

/// [`sweep`] of everyone, unless another replica holds the sweep lock (then `None`).
pub(crate) async fn sweep_exclusive(
    pool: &PgPool,
    policy: RefillPolicy,
    month: Month,
    chunk: i64,
) -> Result<Option<SweepReport>, LedgerError> {
    let mut lock_conn = pool.acquire().await?;
    if !store::try_sweep_lock(&mut lock_conn).await? {
        return Ok(None);
    }
    let result = sweep(pool, policy, month, None, chunk, |_| {}).await;
    // Closing the session would release it too; unlocking keeps the pooled connection clean.
    let _ = store::sweep_unlock(&mut lock_conn).await;
    result.map(Some)
}

async fn sweep_one(
    pool: &PgPool,
    policy: RefillPolicy,
    month: Month,
    user: &str,
    report: &mut SweepReport,
) -> Result<(), LedgerError> {
    check_user_id(user)?;
    let mut tx = pool.begin().await?;
    let mut accounts = store::lock_accounts(&mut tx, &[user.to_owned()]).await?;
    let now = Utc::now();
    let mut changes = Changes::default();
    for a in accounts.values_mut() {
        report.tally(a.refill(&mut changes, policy, month, now)?);
    }
    store::flush(&mut tx, accounts.values(), &changes, now).await?;
    tx.commit().await?;
    Ok(())
}

async fn sweep_all(
    pool: &PgPool,
    policy: RefillPolicy,
    month: Month,
    chunk: i64,
    report: &mut SweepReport,
    mut progress: impl FnMut(&SweepReport),
) -> Result<(), LedgerError> {
    let mut cursor = String::new();
    loop {
        let now = Utc::now();
        let mut tx = pool.begin().await?;
        let mut accounts: Vec<Account> =
            store::lock_refill_chunk(&mut tx, &cursor, month.first_day(), chunk).await?;
        let Some(last) = accounts.last().map(|a| a.user_id.clone()) else {
            tx.rollback().await?;
            // Empty can also mean every picked row was refilled by a concurrent sweep while we
            // waited for its lock; look again before calling it done.
            if !store::refill_left(pool, &cursor, month.first_day()).await? {
                return Ok(());
            }
            continue;
        };
        let mut changes = Changes::default();
        for a in &mut accounts {
            report.tally(a.refill(&mut changes, policy, month, now)?);
        }
        store::flush(&mut tx, accounts.iter(), &changes, now).await?;
        tx.commit().await?;
        cursor = last;
        progress(report);
    }
}
