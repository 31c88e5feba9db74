//! Monthly refill (docs/contract.md §5): the cron schedule and the scheduler that runs the sweep at
//! each tick. The sweep itself writes the ledger, so it lives in [`crate::ledger::sweep`].

use std::str::FromStr;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use sqlx::PgPool;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

pub use crate::ledger::{sweep, sweep_asked, Month, MonthError, SweepReport};
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
    /// already have run this month.
    pub(crate) fn due_this_month(&self, at: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let month = Month::of(at);
        let start =
            month.first_day().and_hms_opt(0, 0, 0)?.and_utc() - chrono::Duration::seconds(1);
        self.0.after(&start).take_while(|t| *t <= at).last()
    }
}

/// Wall-clock time for the scheduler, injectable so tests need not wait for a real tick.
pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> DateTime<Utc>;
    /// Resolves once [`Clock::now`] has reached `at`.
    fn sleep_until(&self, at: DateTime<Utc>) -> BoxFuture<'_, ()>;
}

/// The system clock.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }

    fn sleep_until(&self, at: DateTime<Utc>) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            while let Some(nap) = nap_until(Utc::now(), at) {
                tokio::time::sleep(nap).await;
            }
        })
    }
}

/// The longest a wait for the wall clock to reach `at` sleeps before it looks again: the
/// runtime's timer is monotonic, so a wall clock stepped (NTP) or a machine suspended while a
/// month-long wait sleeps would otherwise fire that much late or early.
const NAP: std::time::Duration = std::time::Duration::from_secs(60);

/// How long to sleep at `now` on the way to `at`: none once there.
fn nap_until(now: DateTime<Utc>, at: DateTime<Utc>) -> Option<std::time::Duration> {
    (at - now)
        .to_std()
        .ok()
        .filter(|left| !left.is_zero())
        .map(|left| left.min(NAP))
}

/// A clock that only moves when told to ([`ManualClock::set`]).
#[derive(Debug)]
pub struct ManualClock(watch::Sender<DateTime<Utc>>);

impl ManualClock {
    pub fn new(at: DateTime<Utc>) -> Arc<Self> {
        Arc::new(ManualClock(watch::Sender::new(at)))
    }

    pub fn set(&self, at: DateTime<Utc>) {
        self.0.send_replace(at);
    }

    /// How many [`Clock::sleep_until`]s wait on it now: a test moves the clock once the
    /// sleeper it means to wake is asleep.
    pub fn sleepers(&self) -> usize {
        self.0.receiver_count()
    }
}

impl Clock for ManualClock {
    fn now(&self) -> DateTime<Utc> {
        *self.0.borrow()
    }

    fn sleep_until(&self, at: DateTime<Utc>) -> BoxFuture<'_, ()> {
        let mut rx = self.0.subscribe();
        Box::pin(async move {
            // The sender lives as long as `self`; an error means it is gone, so is the wait.
            let _ = rx.wait_for(|now| *now >= at).await;
        })
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
            let swept = tokio::select! {
                swept = sweep_exclusive(&self.pool, self.policy, month, self.chunk) => swept,
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
    fn the_system_clock_looks_again_at_least_every_minute() {
        let at = Utc.with_ymd_and_hms(2031, 2, 1, 0, 0, 0).unwrap();
        let secs = |s: i64| at - chrono::Duration::seconds(s);
        assert_eq!(nap_until(secs(30 * 86_400), at), Some(NAP));
        assert_eq!(nap_until(secs(61), at), Some(NAP));
        assert_eq!(
            nap_until(secs(2), at),
            Some(std::time::Duration::from_secs(2))
        );
        assert_eq!(nap_until(at, at), None);
        // A clock stepped past the tick while asleep: due at once.
        assert_eq!(nap_until(at + chrono::Duration::hours(3), at), None);
    }

    #[tokio::test]
    async fn a_manual_clock_wakes_sleepers_when_set() {
        let t0 = Utc.with_ymd_and_hms(2031, 1, 31, 23, 0, 0).unwrap();
        let clock = ManualClock::new(t0);
        let tick = t0 + chrono::Duration::hours(1);
        let sleeper = {
            let clock = clock.clone();
            tokio::spawn(async move { clock.sleep_until(tick).await })
        };
        while clock.sleepers() == 0 {
            tokio::task::yield_now().await;
        }
        // Not yet: the sleeper wakes, looks, and sleeps on.
        clock.set(tick - chrono::Duration::seconds(1));
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert!(!sleeper.is_finished(), "woken a second early");
        assert_eq!(clock.sleepers(), 1);
        clock.set(tick);
        tokio::time::timeout(std::time::Duration::from_secs(5), sleeper)
            .await
            .expect("woken")
            .expect("joined");
        assert_eq!(clock.now(), tick);
    }
}
