//! Monthly refill (docs/contract.md §5): the cron schedule and the scheduler that runs the sweep at
//! each tick. The sweep itself writes the ledger, so it lives in [`crate::ledger::sweep`].

use std::str::FromStr;
use std::sync::Arc;

use chrono::{DateTime, SubsecRound, Utc};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::clock::Clock;
pub use crate::ledger::{sweep, sweep_asked, Month, MonthError, SweepReport, Sweeper};
use crate::ledger::{sweep_exclusive, RefillPolicy};

/// The cron schedule of the sweep, evaluated in UTC.
#[derive(Debug, Clone)]
pub struct Schedule(cron::Schedule);

impl Schedule {
    pub fn parse(expr: &str) -> Result<Self, cron::error::Error> {
        cron::Schedule::from_str(expr).map(Schedule)
    }

    /// The first tick strictly after `at`.
    pub(crate) fn next_after(&self, at: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.0.after(&at).next()
    }

    /// The latest tick at or before `at` within the same month, if any: a sweep that should
    /// already have run this month. Found by one step back from `at`, not by walking the
    /// month's ticks forward: a schedule of every second has millions of them by the month's
    /// end.
    pub(crate) fn due_this_month(&self, at: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let start = Month::of(at).first_day().and_hms_opt(0, 0, 0)?.and_utc();
        // Ticks fall on whole seconds: the latest one before the next second is at or before
        // `at`.
        let next_second = at.trunc_subsecs(0) + chrono::Duration::seconds(1);
        self.0
            .after(&next_second)
            .next_back()
            .filter(|tick| *tick >= start && *tick <= at)
    }
}

/// What the scheduler needs: where, what, and how often.
#[derive(Clone)]
pub(crate) struct Scheduler {
    pub pool: PgPool,
    pub policy: RefillPolicy,
    pub schedule: Schedule,
    pub chunk: i64,
    pub clock: Arc<dyn Clock>,
    /// The bound of a sweep statement's wait (`db::stall_bound`).
    pub stall: Option<std::time::Duration>,
}

impl Scheduler {
    /// Sleeps until each tick and sweeps that tick's month. At start it catches up a sweep of
    /// the current month whose tick has already passed. Replicas coordinate with an advisory
    /// lock; the ledger keys make a duplicate run harmless anyway.
    pub async fn run(self, stop: CancellationToken) {
        let mut after = self.clock.now();
        if let Some(tick) = self.schedule.due_this_month(after) {
            info!(%tick, "catching up this month's refill sweep");
            self.sweep(Month::of(tick), &stop).await;
        }
        loop {
            // From the last tick, not from now: a tick that passed while a sweep ran is run
            // next rather than skipped.
            let Some(next) = self.schedule.next_after(after) else {
                // No tick ever again: idle until shutdown rather than look like a crash.
                stop.cancelled().await;
                return;
            };
            tokio::select! {
                _ = self.clock.sleep_until(next) => {}
                _ = stop.cancelled() => return,
            }
            self.sweep(Month::of(next), &stop).await;
            after = next;
        }
    }

    async fn sweep(&self, month: Month, stop: &CancellationToken) {
        let mut delays = crate::retry::backoff();
        loop {
            let sweeper = crate::ledger::Sweeper {
                pool: &self.pool,
                stall: self.stall,
            };
            let swept = tokio::select! {
                swept = sweep_exclusive(sweeper, self.policy, month, self.chunk) => swept,
                // Ranges committed so far stay refilled; the next start catches up the rest.
                _ = stop.cancelled() => {
                    info!(%month, "refill sweep given up for shutdown; the next start completes it");
                    return;
                }
            };
            match swept {
                Ok(Some(r)) => {
                    info!(month = %r.month, users_refilled = r.users_refilled, credits_granted = r.credits_granted, users_evaluated = r.users_evaluated, duration_ms = r.duration_ms, "refill sweep done");
                    return;
                }
                // Another replica sweeps (or a command does). Tried again until the lock is
                // free: if its holder dies before the end, this month is still swept; if not,
                // the sweep after it finds everyone refilled and changes nothing.
                Ok(None) => {
                    info!(%month, "refill sweep running elsewhere; trying again when it ends");
                    if !crate::retry::pause(&mut delays, stop).await {
                        return;
                    }
                }
                Err(e) if e.may_clear() => {
                    warn!(error = %e, %month, "refill sweep failed; retrying");
                    if !crate::retry::pause(&mut delays, stop).await {
                        return;
                    }
                }
                // Every range that could be refilled was; retrying would only fail again (and
                // read every account each time). The rest waits for the fix and the next tick.
                Err(e) => {
                    error!(error = %e, %month, "refill sweep left users unrefilled; not retrying until the next tick");
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

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

    #[test]
    fn the_tick_due_this_month_is_found_at_once_for_any_schedule() {
        let at = Utc.with_ymd_and_hms(2027, 1, 30, 23, 0, 0).unwrap()
            + chrono::Duration::milliseconds(700);
        // Every second: millions of ticks since the month began, found in one step back.
        let every_second = Schedule::parse("* * * * * *").unwrap();
        assert_eq!(
            every_second.due_this_month(at),
            Some(Utc.with_ymd_and_hms(2027, 1, 30, 23, 0, 0).unwrap())
        );
        // A tick exactly at `at`, one earlier in the month, none since the month began, and
        // the first instant of a month.
        let daily = Schedule::parse("0 0 12 * * *").unwrap();
        let noon = Utc.with_ymd_and_hms(2027, 2, 3, 12, 0, 0).unwrap();
        assert_eq!(daily.due_this_month(noon), Some(noon));
        assert_eq!(
            daily.due_this_month(noon - chrono::Duration::seconds(1)),
            Some(Utc.with_ymd_and_hms(2027, 2, 2, 12, 0, 0).unwrap())
        );
        let first = Utc.with_ymd_and_hms(2027, 2, 1, 11, 59, 59).unwrap();
        assert_eq!(daily.due_this_month(first), None);
        let monthly = Schedule::parse("0 0 0 1 * *").unwrap();
        let midnight = Utc.with_ymd_and_hms(2027, 3, 1, 0, 0, 0).unwrap();
        assert_eq!(monthly.due_this_month(midnight), Some(midnight));
    }
}
