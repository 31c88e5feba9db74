//! Log lines for conditions that last, at most one per period.

use std::hash::{Hash, Hasher};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// At most one log line per period for a condition that lasts: each scrape (every 15 s, say)
/// would otherwise repeat it, while the metric shows it all along.
pub(crate) struct Throttle {
    every: Duration,
    /// A hash of what each recent line was about, with when it was let through.
    last: Mutex<Vec<(u64, Instant)>>,
}

/// How many different conditions a throttle keeps apart: a ninth replaces the oldest.
const KEPT: usize = 8;

impl Throttle {
    pub(crate) const fn new(every: Duration) -> Self {
        Throttle {
            every,
            last: Mutex::new(Vec::new()),
        }
    }

    /// Whether to log now: the first time, then once `every` has passed since the last.
    pub(crate) fn ready(&self) -> bool {
        self.ready_for("")
    }

    /// As `ready`, per condition: a line about something else (`what`, the fault's text,
    /// say) goes through at once, so a new fault is not hidden behind one logged before it,
    /// and two that alternate are each logged once per period.
    pub(crate) fn ready_for(&self, what: &str) -> bool {
        let key = {
            let mut h = std::collections::hash_map::DefaultHasher::new();
            what.hash(&mut h);
            h.finish()
        };
        let mut last = self.last.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        match last.iter_mut().find(|(k, _)| *k == key) {
            Some((_, at)) if now.duration_since(*at) < self.every => return false,
            Some((_, at)) => *at = now,
            None => {
                if last.len() >= KEPT {
                    last.sort_by_key(|(_, at)| *at);
                    last.remove(0);
                }
                last.push((key, now));
            }
        }
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
        // Alternating, each is still let through once per period.
        assert!(!t.ready_for("connection refused"));
        assert!(!t.ready_for("pool timed out"));
    }
}
