//! Log lines for conditions that last, at most one per period.

use std::hash::{Hash, Hasher};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// At most one log line per period for a condition that lasts: each scrape (every 15 s, say)
/// would otherwise repeat it, while the metric shows it all along.
pub(crate) struct Throttle {
    every: Duration,
    /// When the last line was let through, and a hash of what it was about.
    last: Mutex<Option<(Instant, u64)>>,
}

impl Throttle {
    pub(crate) const fn new(every: Duration) -> Self {
        Throttle {
            every,
            last: Mutex::new(None),
        }
    }

    /// Whether to log now: the first time, then once `every` has passed since the last.
    pub(crate) fn ready(&self) -> bool {
        self.ready_for("")
    }

    /// As `ready`, but a line about something else (`what`, the fault's text, say) goes
    /// through at once, so a new fault is not hidden behind the one logged before it.
    pub(crate) fn ready_for(&self, what: &str) -> bool {
        let key = {
            let mut h = std::collections::hash_map::DefaultHasher::new();
            what.hash(&mut h);
            h.finish()
        };
        let mut last = self.last.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        if last.is_some_and(|(t, k)| k == key && now.duration_since(t) < self.every) {
            return false;
        }
        *last = Some((now, key));
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_throttle_lets_one_line_through_per_period() {
        let t = Throttle::new(Duration::from_secs(3600));
        assert!(t.ready());
        assert!(!t.ready());
        let t = Throttle::new(Duration::ZERO);
        assert!(t.ready() && t.ready());
    }

    #[test]
    fn a_different_fault_is_let_through_at_once() {
        let t = Throttle::new(Duration::from_secs(3600));
        assert!(t.ready_for("connection refused"));
        assert!(!t.ready_for("connection refused"));
        assert!(t.ready_for("pool timed out"));
        assert!(!t.ready_for("pool timed out"));
        assert!(t.ready_for("connection refused"));
    }
}
