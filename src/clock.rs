//! The wall clock, injectable: the system's, or one a test sets.

use std::sync::{Arc, Mutex, PoisonError};

use chrono::{DateTime, TimeDelta, Utc};
use futures::future::BoxFuture;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::throttle::Throttle;

/// Wall-clock time for whatever depends on the date (decisions' fee days and refill months,
/// control commands, the refill scheduler), injectable so that tests can pin it and need not
/// wait for a real tick.
pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> DateTime<Utc>;
    /// Resolves once [`Clock::now`] has reached `at`.
    fn sleep_until(&self, at: DateTime<Utc>) -> BoxFuture<'_, ()>;
}

/// Where a ledger write takes its time from, read once the write holds its accounts' locks:
/// a write that waited for another writer of the same user is stamped after that one, so a
/// user's rows are stamped in the order of their `seq` (the month report's positions at a
/// month's bounds are balances the account really had). A clock, or a fixed time (a test, a
/// back-fill).
pub trait Stamp: Send + Sync {
    fn stamp(&self) -> DateTime<Utc>;
}

impl Stamp for dyn Clock {
    fn stamp(&self) -> DateTime<Utc> {
        self.now()
    }
}

impl Stamp for SystemClock {
    fn stamp(&self) -> DateTime<Utc> {
        self.now()
    }
}

impl Stamp for DateTime<Utc> {
    fn stamp(&self) -> DateTime<Utc> {
        *self
    }
}

impl<T: Stamp + ?Sized> Stamp for &T {
    fn stamp(&self) -> DateTime<Utc> {
        (**self).stamp()
    }
}

impl<T: Stamp + ?Sized> Stamp for Arc<T> {
    fn stamp(&self) -> DateTime<Utc> {
        (**self).stamp()
    }
}

impl Stamp for ManualClock {
    fn stamp(&self) -> DateTime<Utc> {
        self.now()
    }
}

/// The system clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        wall_now()
    }

    fn sleep_until(&self, at: DateTime<Utc>) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            while let Some(nap) = nap_until(wall_now(), at) {
                tokio::time::sleep(nap).await;
            }
        })
    }
}

/// This host's clock when it last agreed with the database server's: the wall time then, and
/// the time since boot ([`since_boot`]) it was read at.
#[derive(Debug, Clone, Copy)]
struct Anchor {
    wall: DateTime<Utc>,
    at: std::time::Duration,
}

static ANCHOR: Mutex<Option<Anchor>> = Mutex::new(None);

/// The wall clock, held to its last agreement with the database server's. A wall clock that
/// has moved [`SKEW_REFUSED`] or more from where the boot clock ([`since_boot`]) puts it since
/// then (set by hand or stepped while the worker runs) is not used: until [`watch`] has
/// compared it with the database's (within 2 s) and stopped the worker, the time is the
/// agreement's advanced by the boot clock. Otherwise a decision in that window would mark its
/// user refilled for a month to come, or pin their fee day forward.
pub(crate) fn wall_now() -> DateTime<Utc> {
    let wall = Utc::now();
    let anchor = *ANCHOR.lock().unwrap_or_else(PoisonError::into_inner);
    let since = |a: Anchor| since_boot().saturating_sub(a.at);
    match anchor.and_then(|a| held(wall, a.wall, since(a))) {
        Some(expected) => {
            if STEPPED.ready() {
                tracing::error!(
                    "this host's clock moved {:.1} s from where it was when it last agreed with \
                     the database server's; that time is used until the next comparison",
                    (wall - expected).num_milliseconds() as f64 / 1000.0
                );
            }
            expected
        }
        None => wall,
    }
}

/// The time to use instead of `wall` when it is [`SKEW_REFUSED`] or more from `agreed`, the
/// wall time of the last agreement, advanced by `since` on the boot clock.
fn held(
    wall: DateTime<Utc>,
    agreed: DateTime<Utc>,
    since: std::time::Duration,
) -> Option<DateTime<Utc>> {
    let expected = agreed.checked_add_signed(TimeDelta::from_std(since).ok()?)?;
    (judge_skew(wall - expected) == Skew::Refuse).then_some(expected)
}

/// Records that this host's clock agrees with the database server's now.
fn agreed_now() {
    let anchor = Anchor {
        wall: Utc::now(),
        at: since_boot(),
    };
    *ANCHOR.lock().unwrap_or_else(PoisonError::into_inner) = Some(anchor);
}

/// Time since boot on a clock that is never set and, unlike `Instant`'s on Linux, counts the
/// time the machine was suspended: a machine resumed is not taken for a clock stepped.
#[cfg(target_os = "linux")]
fn since_boot() -> std::time::Duration {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Boottime);
    std::time::Duration::new(t.tv_sec as u64, t.tv_nsec as u32)
}

/// [`since_boot`] where there is no boot clock: the monotonic clock from the first reading.
#[cfg(not(target_os = "linux"))]
fn since_boot() -> std::time::Duration {
    static FIRST: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    FIRST.get_or_init(std::time::Instant::now).elapsed()
}

/// A clock found moved, logged at most every 10 s while it lasts.
static STEPPED: Throttle = Throttle::new(std::time::Duration::from_secs(10));
/// A skew past [`SKEW_WARNED`], logged at most every 5 minutes while it lasts.
static SKEWED: Throttle = Throttle::new(std::time::Duration::from_secs(300));

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

/// How far this host's clock may be from the database server's before a start or an
/// operator's command that writes the ledger is refused: the worker takes refill months and
/// fee days from its own clock, so a host minutes or months ahead would mark the accounts it
/// touches as refilled for a month to come, and pin their fee day forward.
pub(crate) const SKEW_REFUSED: chrono::TimeDelta = chrono::TimeDelta::seconds(60);
/// Past this the disagreement is logged as a warning (a month's first seconds may be decided
/// in the month before).
pub(crate) const SKEW_WARNED: chrono::TimeDelta = chrono::TimeDelta::seconds(2);

/// What an offset of this host's clock from the database's calls for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Skew {
    Agrees,
    Warn,
    Refuse,
}

/// `offset`: this host's clock minus the database server's (ahead when positive).
pub(crate) fn judge_skew(offset: chrono::TimeDelta) -> Skew {
    let size = offset.abs();
    if size >= SKEW_REFUSED {
        Skew::Refuse
    } else if size >= SKEW_WARNED {
        Skew::Warn
    } else {
        Skew::Agrees
    }
}

/// The offset said in words: "3.2 s ahead of the database server's".
pub(crate) fn describe_skew(offset: chrono::TimeDelta) -> String {
    let secs = offset.num_milliseconds() as f64 / 1000.0;
    let way = if secs >= 0.0 { "ahead of" } else { "behind" };
    format!(
        "this host's clock is {:.1} s {way} the database server's; refill months and \
         execution-fee days are taken from it (set it right, e.g. with NTP)",
        secs.abs()
    )
}

/// Compares this host's clock with the database server's: an error past [`SKEW_REFUSED`], a
/// warning past [`SKEW_WARNED`]. A failed reading is a warning only: the database's faults
/// are for the caller's own statements to meet.
pub(crate) async fn check_against_database(pool: &sqlx::PgPool) -> anyhow::Result<()> {
    let within = crate::db::CONNECT_TIMEOUT;
    let offset = match tokio::time::timeout(within, crate::db::clock_offset(pool)).await {
        Ok(Ok(offset)) => offset,
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "could not compare this host's clock with the database's");
            return Ok(());
        }
        Err(_) => {
            tracing::warn!("could not compare this host's clock with the database's: no answer within {within:?}");
            return Ok(());
        }
    };
    judge_reading(offset).map_err(anyhow::Error::msg)
}

/// What a reading of this host's clock minus the database's means: an agreement (the clock's
/// new anchor), with a warning past [`SKEW_WARNED`] (every 5 minutes at most), or the refusal.
fn judge_reading(offset: TimeDelta) -> Result<(), String> {
    metrics::gauge!("credit_clock_offset_seconds").set(offset.num_milliseconds() as f64 / 1e3);
    match judge_skew(offset) {
        Skew::Agrees => {}
        Skew::Warn if SKEWED.ready() => tracing::warn!("{}", describe_skew(offset)),
        Skew::Warn => {}
        Skew::Refuse => {
            return Err(format!(
                "{}; refused past {} s",
                describe_skew(offset),
                SKEW_REFUSED.num_seconds()
            ))
        }
    }
    agreed_now();
    Ok(())
}

/// How often a running worker compares its clock with the database server's.
const WATCH_EVERY: std::time::Duration = std::time::Duration::from_secs(2);

/// Compares this host's clock with the database server's every 2 s, and returns, with the
/// reason logged, once they are [`SKEW_REFUSED`] or more apart, so that the worker stops as
/// its start would be refused; or at `stop`. Each agreement anchors [`wall_now`]. A reading
/// that fails is the other tasks' to report.
pub(crate) async fn watch(pool: sqlx::PgPool, stop: CancellationToken) {
    let first = tokio::time::Instant::now() + WATCH_EVERY;
    let mut every = tokio::time::interval_at(first, WATCH_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = every.tick() => {}
        }
        let read = tokio::time::timeout(WATCH_EVERY, crate::db::clock_offset(&pool)).await;
        let Ok(Ok(offset)) = read else { continue };
        if let Err(refused) = judge_reading(offset) {
            tracing::error!("{refused}; stopping");
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn a_clock_far_from_the_databases_is_refused_and_a_near_one_warned_of() {
        let ms = chrono::TimeDelta::milliseconds;
        assert_eq!(judge_skew(ms(0)), Skew::Agrees);
        assert_eq!(judge_skew(ms(1_999)), Skew::Agrees);
        assert_eq!(judge_skew(ms(-1_999)), Skew::Agrees);
        assert_eq!(judge_skew(ms(2_000)), Skew::Warn);
        assert_eq!(judge_skew(ms(-59_999)), Skew::Warn);
        assert_eq!(judge_skew(ms(60_000)), Skew::Refuse);
        assert_eq!(judge_skew(ms(-60_000)), Skew::Refuse);
        assert_eq!(judge_skew(chrono::TimeDelta::days(4 * 365)), Skew::Refuse);
        assert_eq!(
            describe_skew(ms(3_250)),
            "this host's clock is 3.2 s ahead of the database server's; refill months and \
             execution-fee days are taken from it (set it right, e.g. with NTP)"
        );
        assert!(describe_skew(ms(-90_000)).starts_with("this host's clock is 90.0 s behind"));
    }

    /// A wall clock within a minute of where the boot clock puts it since the last
    /// agreement is used; one a minute or more away, either way, is not.
    #[test]
    fn a_wall_clock_moved_a_minute_from_its_agreement_is_not_used() {
        let agreed = Utc.with_ymd_and_hms(2026, 12, 31, 23, 59, 0).unwrap();
        let since = std::time::Duration::from_secs(30);
        let expected = agreed + chrono::Duration::seconds(30);
        let wall = |s: i64| expected + chrono::Duration::milliseconds(s);
        assert_eq!(held(wall(0), agreed, since), None);
        assert_eq!(held(wall(59_999), agreed, since), None);
        assert_eq!(held(wall(-59_999), agreed, since), None);
        assert_eq!(held(wall(60_000), agreed, since), Some(expected));
        assert_eq!(held(wall(-60_000), agreed, since), Some(expected));
        // Stepped into next year: the time stays in this one.
        let stepped = Utc.with_ymd_and_hms(2027, 1, 1, 0, 1, 0).unwrap();
        assert_eq!(held(stepped, agreed, since), Some(expected));
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
