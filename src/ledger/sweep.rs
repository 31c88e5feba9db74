//! The monthly refill sweep (docs/contract.md §5): every account not yet evaluated for a month gets
//! topped up to the target, `chunk` users per transaction.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use futures::stream::{FuturesUnordered, StreamExt};
use serde::Serialize;
use sqlx::{Connection as _, PgPool};
use tracing::warn;

use super::account::{Changes, RefillPolicy};
use super::month::Month;
use super::store::{RefillGrant, RefillTotals};
use super::total::serialize_total;
use super::{check_user_id, store, LedgerError};

/// Totals of one sweep.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct SweepReport {
    pub month: String,
    pub users_refilled: i64,
    /// Wider than a balance: the sum of many refills may exceed what one balance can hold.
    #[serde(serialize_with = "serialize_total")]
    pub credits_granted: i128,
    pub users_evaluated: i64,
    pub duration_ms: u64,
}

impl SweepReport {
    fn tally(&mut self, granted: i64) {
        self.users_evaluated += 1;
        if granted > 0 {
            self.users_refilled += 1;
            self.credits_granted += i128::from(granted);
        }
    }

    fn add(&mut self, chunk: RefillTotals) {
        self.users_evaluated += chunk.evaluated;
        self.users_refilled += chunk.refilled;
        self.credits_granted += chunk.granted;
    }
}

/// Where a sweep writes: the pool, and the bound of each statement's wait (`db::stall_bound`):
/// a range whose connection went silent fails, as one that may clear, instead of holding the
/// sweep for ever.
#[derive(Clone, Copy)]
pub struct Sweeper<'a> {
    pub pool: &'a PgPool,
    pub stall: Option<Duration>,
}

impl<'a> Sweeper<'a> {
    /// On `pool`, with the stall bound of the database `settings`.
    pub fn new(pool: &'a PgPool, settings: &crate::db::DatabaseSettings) -> Self {
        Sweeper {
            pool,
            stall: crate::db::stall_bound(settings),
        }
    }
}

/// Refills every user for `month` (or only `user_id`), `chunk` users per transaction, by the
/// rule of [`RefillPolicy::grant`]: users evaluated for that month or a later one are
/// skipped. Safe to run concurrently: rows are locked in user_id order and re-checked after
/// the lock, so a user another sweep just refilled is skipped. `progress` sees the running
/// totals.
pub async fn sweep(
    sweeper: Sweeper<'_>,
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
        Some(user) => {
            let one = sweep_one(sweeper.pool, policy, month, user, &mut report);
            crate::db::bounded(sweeper.stall, one).await?
        }
        None => {
            let swept = sweep_all(sweeper, policy, month, chunk, &mut report, progress).await;
            if let Err(e) = &swept {
                // The error is what the caller reports; what the committed ranges granted
                // stays, and is said here.
                warn!(
                    %month,
                    error = %e,
                    users_refilled = report.users_refilled,
                    credits_granted = %report.credits_granted,
                    "refill sweep failed after committing part of it; running it again refills the rest"
                );
            }
            swept?
        }
    }
    report.duration_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    metrics::counter!("credit_refill_runs_total").increment(1);
    Ok(report)
}

/// [`sweep`] as an operator asked for it (a command, the CLI): of the month they `named`, or
/// else of the month of `now`. A named month is refilled by the same rule as any other: a
/// user evaluated for it or a later one gets nothing, so naming a month again changes
/// nothing.
pub async fn sweep_asked(
    sweeper: Sweeper<'_>,
    policy: RefillPolicy,
    named: Option<Month>,
    now: DateTime<Utc>,
    user_id: Option<&str>,
    chunk: i64,
    progress: impl FnMut(&SweepReport),
) -> Result<SweepReport, LedgerError> {
    let current = Month::of(now);
    let month = named.unwrap_or(current);
    if month > current {
        // Allowed (a test, or a month begun elsewhere already), but most likely a typo: the
        // users it refills are evaluated through that month, so no sweep or lazy refill
        // refills them again until then.
        warn!(%month, %current, "refilling a month after the current one: its users get no refill before it");
    }
    sweep(sweeper, policy, month, user_id, chunk, progress).await
}

/// [`sweep`] of everyone, unless another replica holds the sweep lock (then `None`).
pub(crate) async fn sweep_exclusive(
    sweeper: Sweeper<'_>,
    policy: RefillPolicy,
    month: Month,
    chunk: i64,
) -> Result<Option<SweepReport>, LedgerError> {
    // The lock is the session's, so the session is kept out of the pool: closed or dropped
    // (a sweep given up at shutdown), it ends and the lock with it, rather than going back
    // to the pool still holding it.
    let stall = sweeper.stall;
    let mut lock_conn = crate::db::bounded(stall, sweeper.pool.acquire())
        .await?
        .detach();
    if !crate::db::bounded(stall, store::try_sweep_lock(&mut lock_conn)).await? {
        let _ = lock_conn.close().await;
        return Ok(None);
    }
    let lease = stall.filter(|lease| lease.as_millis() <= i32::MAX as u128);
    if let Some(lease) = lease {
        crate::db::bounded(stall, crate::db::end_when_idle(&mut lock_conn, lease)).await?;
    }
    let swept = sweep(sweeper, policy, month, None, chunk, |_| {});
    let result = holding_the_lease(&mut lock_conn, lease, swept).await;
    let _ = lock_conn.close().await;
    match result {
        Some(swept) => swept.map(Some),
        None => {
            warn!(%month, "refill sweep: the sweep lock's session ended (idle past its lease: the process frozen?); the sweep stops, the ranges committed stay, and the month is left to whichever replica takes the lock");
            Ok(None)
        }
    }
}

/// `work`, while the sweep lock's session is pinged every quarter of `lease`, so the server
/// ends it only when the holder stops making progress (a frozen process), and the lock with
/// it: another replica's next try then sweeps the month, as the outbox relay's lead is handed
/// on. None when the session ended (or a ping went unanswered for a whole lease): the work is
/// stopped, its open range rolled back, rather than go on without the lock.
async fn holding_the_lease<T>(
    conn: &mut sqlx::PgConnection,
    lease: Option<Duration>,
    work: impl std::future::Future<Output = T>,
) -> Option<T> {
    let Some(lease) = lease else {
        return Some(work.await);
    };
    // Polled beside the work, never instead of it: a ping waiting on the server holds up
    // none of the ranges' transactions.
    let pinging = async {
        loop {
            tokio::time::sleep(lease / 4).await;
            match tokio::time::timeout(lease, store::ping(conn)).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) | Err(_) => return,
            }
        }
    };
    tokio::select! {
        done = work => Some(done),
        () = pinging => None,
    }
}

async fn sweep_one(
    pool: &PgPool,
    policy: RefillPolicy,
    month: Month,
    user: &str,
    report: &mut SweepReport,
) -> Result<(), LedgerError> {
    check_user_id(user)?;
    let (mut tx, mut accounts) = store::begin_locked(pool, &[user.to_owned()]).await?;
    let now = crate::clock::wall_now();
    let mut changes = Changes::default();
    for a in accounts.values_mut() {
        let granted = a.refill(&mut changes, policy, month, now)?;
        report.tally(granted);
    }
    store::flush(&mut tx, accounts.values(), &changes, now).await?;
    tx.commit().await?;
    changes.count_refills();
    Ok(())
}

/// Sweep chunks committed at once, each on its own connection over its own range of users.
const PARALLEL_CHUNKS: usize = 2;

/// Every account in user_id order, in ranges of `chunk` users, [`PARALLEL_CHUNKS`] ranges at a
/// time. A range is claimed from the shared cursor before its transaction starts, so ranges
/// never overlap and each is one transaction; accounts created behind the cursor meanwhile are
/// left to the lazy refill, as with any sweep that has passed them.
async fn sweep_all(
    sweeper: Sweeper<'_>,
    policy: RefillPolicy,
    month: Month,
    chunk: i64,
    report: &mut SweepReport,
    mut progress: impl FnMut(&SweepReport),
) -> Result<(), LedgerError> {
    let key = month.refill_key();
    let metadata = policy.metadata(month);
    let grant = RefillGrant {
        month_start: month.first_day(),
        key: &key,
        metadata: &metadata,
        target: policy.target,
    };
    let splits = AtomicUsize::new(RANGE_SPLITS);
    let mut cursor = Some(String::new());
    let mut running = FuturesUnordered::new();
    // A range that fails is reported at the end, after the ranges behind it were swept (and
    // its own accounts, in halves): one account that cannot be refilled holds up no one
    // else's refill.
    let mut failed = None;
    let mut finished = |done: Swept, report: &mut SweepReport| {
        if let Some(e) = done.count(report) {
            failed = Some(graver(failed.take(), e));
        }
        progress(report);
    };
    loop {
        let next = if running.len() < PARALLEL_CHUNKS {
            cursor.take()
        } else {
            None
        };
        let Some(after) = next else {
            let Some(done) = running.next().await else {
                break;
            };
            finished(done, report);
            continue;
        };
        let through = range_end(sweeper, &after, chunk, &mut running, |done| {
            finished(done, report)
        })
        .await?;
        if let Some(through) = through {
            cursor = Some(through.clone());
            running.push(sweep_range(sweeper, &grant, &splits, after, through));
        }
    }
    failed.map_or(Ok(()), Err)
}

/// Where the range after `after` ends (`None` past the last account). The ranges in flight
/// keep going while it is read: one left unpolled would hold its connection and its row locks
/// meanwhile, and with a small pool the read could wait for that very connection.
async fn range_end(
    sweeper: Sweeper<'_>,
    after: &str,
    chunk: i64,
    running: &mut (impl futures::Stream<Item = Swept> + Unpin),
    mut finished: impl FnMut(Swept),
) -> Result<Option<String>, LedgerError> {
    let end = crate::db::bounded(
        sweeper.stall,
        store::refill_chunk_end(sweeper.pool, after, chunk),
    );
    tokio::pin!(end);
    loop {
        tokio::select! {
            through = &mut end => return Ok(through?),
            Some(done) = running.next() => finished(done),
        }
    }
}

/// Which of two failures a sweep reports: one that may clear, so that a retry of the sweep
/// also retries the range it failed, over one that will not.
fn graver(earlier: Option<LedgerError>, later: LedgerError) -> LedgerError {
    match earlier {
        Some(e) if e.may_clear() || !later.may_clear() => e,
        _ => later,
    }
}

/// How many times a sweep may split a range that failed for good: enough to find a few
/// accounts that cannot be refilled (about log2 of the chunk's size each).
const RANGE_SPLITS: usize = 100;

/// What a range of the sweep did: what its committed parts granted, and why the rest failed.
struct Swept {
    totals: RefillTotals,
    failed: Option<LedgerError>,
}

impl Swept {
    /// Adds the range's totals to the report and the metrics, as each range commits (so a
    /// sweep that fails later still counts them); returns its failure, if any.
    fn count(self, report: &mut SweepReport) -> Option<LedgerError> {
        let totals = self.totals;
        metrics::counter!("credit_refill_users_total").increment(totals.refilled as u64);
        // A counter holds u64: a chunk's grants beyond it (absurd targets) count as its maximum.
        let credits = u64::try_from(totals.granted).unwrap_or(u64::MAX);
        metrics::counter!("credit_refill_credits_total").increment(credits);
        report.add(totals);
        self.failed
    }
}

/// [`sweep_chunk`] of (`after`, `through`], and, when it fails for good (an account whose
/// refill cannot be written), of its halves in turn, down to the account that fails: one
/// such account holds up no other's refill. A failure that may clear fails the whole range,
/// which the sweep's retry takes again.
fn sweep_range<'a>(
    sweeper: Sweeper<'a>,
    grant: &'a RefillGrant<'a>,
    splits: &'a AtomicUsize,
    after: String,
    through: String,
) -> BoxFuture<'a, Swept> {
    Box::pin(async move {
        let e = match sweep_chunk(sweeper, grant, after.clone(), through.clone()).await {
            Ok(totals) => {
                return Swept {
                    totals,
                    failed: None,
                }
            }
            Err(e) => e,
        };
        let failed = |e| Swept {
            totals: RefillTotals::default(),
            failed: Some(e),
        };
        // A failure of every account alike (a defect, not one account's data) would otherwise
        // cost each range as many failed transactions as it has accounts, several times over.
        let may_split = !e.may_clear()
            && splits
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
                .is_ok();
        if !may_split {
            return failed(e);
        }
        let middle = store::range_middle(sweeper.pool, &after, &through);
        let middle = match crate::db::bounded(sweeper.stall, middle).await {
            Ok(Some(middle)) => middle,
            // One account: it is the one that fails.
            Ok(None) => {
                splits.fetch_add(1, Ordering::Relaxed);
                return failed(e);
            }
            // Reported over the range's own failure when it may clear: the sweep's retry then
            // takes the range again.
            Err(m) => return failed(graver(Some(e), m.into())),
        };
        let first = sweep_range(sweeper, grant, splits, after, middle.clone()).await;
        let second = sweep_range(sweeper, grant, splits, middle, through).await;
        Swept {
            totals: first.totals.plus(second.totals),
            failed: match second.failed {
                Some(e) => Some(graver(first.failed, e)),
                None => first.failed,
            },
        }
    })
}

/// One range (`after`, `through`] in one transaction.
async fn sweep_chunk(
    sweeper: Sweeper<'_>,
    grant: &RefillGrant<'_>,
    after: String,
    through: String,
) -> Result<RefillTotals, LedgerError> {
    let chunk = async {
        let mut tx = sweeper.pool.begin().await?;
        let totals =
            store::refill_chunk(&mut tx, &after, &through, grant, crate::clock::wall_now()).await?;
        tx.commit().await?;
        Ok::<_, sqlx::Error>(totals)
    };
    let chunk = crate::db::bounded(sweeper.stall, chunk);
    chunk.await.map_err(LedgerError::from).inspect_err(|e| {
        warn!(error = %e, after = %after, through = %through, "refill of a range of users failed; sweeping on");
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lost() -> LedgerError {
        LedgerError::Db(sqlx::Error::Io(std::io::ErrorKind::ConnectionReset.into()))
    }

    fn for_good() -> LedgerError {
        LedgerError::Db(sqlx::Error::RowNotFound)
    }

    #[test]
    fn a_sweep_reports_a_failure_that_may_clear_over_one_that_will_not() {
        assert!(!graver(None, for_good()).may_clear());
        assert!(graver(Some(for_good()), lost()).may_clear());
        assert!(graver(Some(lost()), for_good()).may_clear());
        assert!(!graver(Some(for_good()), for_good()).may_clear());
    }

    #[test]
    fn a_sweeps_total_is_the_exact_sum_even_past_what_a_balance_holds() {
        let mut r = SweepReport::default();
        r.tally(i64::MAX);
        r.tally(0);
        r.add(RefillTotals {
            evaluated: 3,
            refilled: 2,
            granted: i128::from(i64::MAX),
        });
        assert_eq!(
            (r.users_evaluated, r.users_refilled, r.credits_granted),
            (5, 3, 2 * i128::from(i64::MAX))
        );
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["credits_granted"].to_string(), "18446744073709551614");
        // Past what a JSON number here holds: the exact digits, not an error or a cap.
        r.tally(i64::MAX);
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["credits_granted"], "27670116110564327421");
    }
}
