//! Monthly refill (SPEC §6): month arithmetic, the chunked sweep and its cron schedule.

use std::fmt;
use std::str::FromStr;
use std::time::Instant;

use chrono::{DateTime, Datelike, NaiveDate, Utc};
use serde::Serialize;
use sqlx::PgPool;

use crate::ledger::{store, Changes, LedgerError, RefillPolicy};

/// A calendar month (UTC), written `YYYY-MM`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Month(NaiveDate);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("month: expected YYYY-MM (e.g. 2026-12), got {0:?}")]
pub struct MonthError(pub String);

impl Month {
    pub fn of(at: DateTime<Utc>) -> Self {
        Month(NaiveDate::from_ymd_opt(at.year(), at.month(), 1).unwrap_or(NaiveDate::MIN))
    }

    pub fn first_day(self) -> NaiveDate {
        self.0
    }

    /// The ledger key of this month's refill grant.
    pub fn refill_key(self) -> String {
        format!("MONTHLY-CREDIT-TOP-UP-{self}")
    }
}

impl FromStr for Month {
    type Err = MonthError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || MonthError(s.to_owned());
        let (y, m) = s.split_once('-').ok_or_else(err)?;
        if y.len() != 4 || m.len() != 2 {
            return Err(err());
        }
        let y: i32 = y.parse().map_err(|_| err())?;
        let m: u32 = m.parse().map_err(|_| err())?;
        NaiveDate::from_ymd_opt(y, m, 1).map(Month).ok_or_else(err)
    }
}

impl fmt::Display for Month {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04}-{:02}", self.0.year(), self.0.month())
    }
}

/// The cron schedule of the sweep, evaluated in UTC.
#[derive(Debug, Clone)]
pub struct Schedule(cron::Schedule);

impl Schedule {
    pub fn parse(expr: &str) -> Result<Self, cron::error::Error> {
        cron::Schedule::from_str(expr).map(Schedule)
    }

    /// The first tick strictly after `at`.
    pub fn next_after(&self, at: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.0.after(&at).next()
    }

    /// The latest tick at or before `at` within the same month, if any: a sweep that should
    /// already have run this month.
    pub fn due_this_month(&self, at: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let month = Month::of(at);
        let start =
            month.first_day().and_hms_opt(0, 0, 0)?.and_utc() - chrono::Duration::seconds(1);
        let mut last = None;
        for t in self.0.after(&start) {
            if t > at {
                break;
            }
            last = Some(t);
        }
        last
    }
}

/// Totals of one sweep.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct SweepReport {
    pub month: String,
    pub users_refilled: i64,
    pub credits_granted: i64,
    pub users_evaluated: i64,
    pub duration_ms: u64,
}

const PICK_CHUNK: &str = "SELECT user_id, balance, last_seq, refill_month, fee_day, fee_count
       FROM credit.balances
      WHERE user_id > $1 AND (refill_month IS NULL OR refill_month < $2)
      ORDER BY user_id LIMIT $3 FOR UPDATE";

const ANY_LEFT: &str = "SELECT 1 FROM credit.balances
      WHERE user_id > $1 AND (refill_month IS NULL OR refill_month < $2) LIMIT 1";

/// Refills every user for `month` (or only `user_id`), `chunk` users per transaction. Safe to
/// run concurrently: rows are locked in user_id order and re-checked after the lock, so a
/// user another sweep just refilled is skipped. `progress` sees the running totals.
pub async fn sweep(
    pool: &PgPool,
    policy: RefillPolicy,
    month: Month,
    user_id: Option<&str>,
    chunk: i64,
    mut progress: impl FnMut(&SweepReport),
) -> Result<SweepReport, LedgerError> {
    let started = Instant::now();
    let mut report = SweepReport {
        month: month.to_string(),
        ..Default::default()
    };
    if let Some(user) = user_id {
        crate::ledger::check_user_id(user)?;
        let mut tx = pool.begin().await?;
        let mut accounts = store::lock_accounts(&mut tx, &[user.to_owned()]).await?;
        let mut changes = Changes::default();
        let now = Utc::now();
        for a in accounts.values_mut() {
            tally(&mut report, a.refill(&mut changes, policy, month, now)?);
        }
        store::flush(&mut tx, accounts.values(), &changes, now).await?;
        tx.commit().await?;
    } else {
        let mut cursor = String::new();
        loop {
            let now = Utc::now();
            let mut tx = pool.begin().await?;
            let rows = sqlx::query(PICK_CHUNK)
                .bind(&cursor)
                .bind(month.first_day())
                .bind(chunk)
                .fetch_all(&mut *tx)
                .await?;
            if rows.is_empty() {
                tx.rollback().await?;
                // Empty can also mean every picked row was refilled by a concurrent sweep
                // while we waited for its lock; look again before calling it done.
                let left = sqlx::query(ANY_LEFT)
                    .bind(&cursor)
                    .bind(month.first_day())
                    .fetch_optional(pool)
                    .await?;
                if left.is_none() {
                    break;
                }
                continue;
            }
            let mut accounts = rows
                .iter()
                .map(store::account_from_row)
                .collect::<Result<Vec<_>, _>>()?;
            let mut changes = Changes::default();
            for a in &mut accounts {
                tally(&mut report, a.refill(&mut changes, policy, month, now)?);
            }
            store::flush(&mut tx, accounts.iter(), &changes, now).await?;
            tx.commit().await?;
            if let Some(last) = accounts.last() {
                cursor = last.user_id.clone();
            }
            progress(&report);
        }
    }
    report.duration_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    metrics::counter!("credit_refill_runs_total").increment(1);
    metrics::counter!("credit_refill_users_total").increment(report.users_refilled as u64);
    metrics::counter!("credit_refill_credits_total").increment(report.credits_granted as u64);
    Ok(report)
}

fn tally(report: &mut SweepReport, granted: i64) {
    report.users_evaluated += 1;
    if granted > 0 {
        report.users_refilled += 1;
        report.credits_granted += granted;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn months_parse_and_print() {
        assert_eq!("2026-12".parse::<Month>().unwrap().to_string(), "2026-12");
        assert_eq!(
            "2026-01".parse::<Month>().unwrap().refill_key(),
            "MONTHLY-CREDIT-TOP-UP-2026-01"
        );
        for bad in [
            "2026-13", "2026-1", "26-01", "2026/01", "", "2026-00", "abcd-ef",
        ] {
            assert!(bad.parse::<Month>().is_err(), "{bad}");
        }
        let at = Utc.with_ymd_and_hms(2026, 11, 25, 13, 0, 0).unwrap();
        assert_eq!(Month::of(at).to_string(), "2026-11");
    }

    #[test]
    fn schedule_ticks_in_utc() {
        let s = Schedule::parse("0 0 0 1 * *").unwrap();
        let at = Utc.with_ymd_and_hms(2026, 11, 25, 13, 0, 0).unwrap();
        assert_eq!(
            s.next_after(at),
            Some(Utc.with_ymd_and_hms(2026, 12, 1, 0, 0, 0).unwrap())
        );
        assert_eq!(
            s.due_this_month(at),
            Some(Utc.with_ymd_and_hms(2026, 11, 1, 0, 0, 0).unwrap())
        );
        let late = Schedule::parse("0 0 0 28 * *").unwrap();
        assert_eq!(late.due_this_month(at), None);
        assert!(Schedule::parse("every day").is_err());
    }
}
