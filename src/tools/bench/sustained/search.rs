//! The rate search of `bench --sustained`: the offered rate ramps up geometrically from a
//! start rate until a step fails (or down, when the start rate already fails), then bisects
//! between the highest rate held and the lowest rate failed until they are within a relative
//! precision of each other. A rate that fails is offered once more before its failure counts,
//! so one stall of a shared machine does not bound the search. Pure: the steps are run by the
//! caller.

/// How the search moves.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SearchPlan {
    /// The first rate tried, msgs/s.
    pub start: f64,
    /// Each ramp step multiplies (or divides) the rate by this (> 1).
    pub factor: f64,
    /// The search ends once lowest failed ≤ highest held × (1 + precision).
    pub precision: f64,
    /// No rate below this is tried; nothing held at it means nothing is sustained.
    pub min_rate: f64,
    /// No rate above this is tried; holding it ends the search.
    pub max_rate: f64,
    /// At most this many steps.
    pub max_steps: usize,
}

/// The search's state: the rates held and failed so far.
#[derive(Debug, Clone)]
pub(crate) struct RateSearch {
    plan: SearchPlan,
    /// The highest rate held.
    held: Option<f64>,
    /// The lowest rate failed (always above `held`).
    failed: Option<f64>,
    /// A rate that failed once and is offered again before its failure counts.
    retry: Option<f64>,
    steps: usize,
}

impl RateSearch {
    pub(crate) fn new(plan: SearchPlan) -> Self {
        RateSearch {
            plan,
            held: None,
            failed: None,
            retry: None,
            steps: 0,
        }
    }

    /// The next rate to offer (whole msgs/s), or None once the search is over.
    pub(crate) fn next_rate(&self) -> Option<f64> {
        let p = &self.plan;
        if self.steps >= p.max_steps {
            return None;
        }
        if self.retry.is_some() {
            return self.retry;
        }
        let rate = match (self.held, self.failed) {
            (None, None) => p.start.clamp(p.min_rate, p.max_rate),
            (Some(lo), None) if lo >= p.max_rate => return None,
            (Some(lo), None) => (lo * p.factor).min(p.max_rate),
            (None, Some(hi)) if hi <= p.min_rate => return None,
            (None, Some(hi)) => (hi / p.factor).max(p.min_rate),
            (Some(lo), Some(hi)) if hi <= lo * (1.0 + p.precision) => return None,
            (Some(lo), Some(hi)) => (lo * hi).sqrt(),
        }
        .round()
        .max(1.0);
        // Rounding may land on a rate already tried: then the bounds are as close as whole
        // rates get.
        let tried = |r: Option<f64>| r.is_some_and(|r| (r - rate).abs() < 0.5);
        (!tried(self.held) && !tried(self.failed)).then_some(rate)
    }

    /// Records the outcome of a step at `rate`.
    pub(crate) fn record(&mut self, rate: f64, held: bool) {
        self.steps += 1;
        // One stall (a checkpoint, the broker's garbage collection, another process) would
        // otherwise bound the search for good: a failure counts only when the same rate fails
        // twice in a row.
        let bounds = self.held.is_none_or(|h| rate > h);
        if !held && bounds && self.retry != Some(rate) {
            self.retry = Some(rate);
            return;
        }
        self.retry = None;
        if held {
            self.held = Some(self.held.map_or(rate, |h| h.max(rate)));
            // A held rate at or above a failed one (a noisy machine): the failure no longer
            // bounds the search from above.
            if self.failed.is_some_and(|f| f <= rate) {
                self.failed = None;
            }
        } else if self.held.is_none_or(|h| rate > h) {
            self.failed = Some(self.failed.map_or(rate, |f| f.min(rate)));
        }
    }

    /// The highest rate held so far.
    pub(crate) fn sustained(&self) -> Option<f64> {
        self.held
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan() -> SearchPlan {
        SearchPlan {
            start: 500.0,
            factor: 2.0,
            precision: 0.05,
            min_rate: 10.0,
            max_rate: 200_000.0,
            max_steps: 30,
        }
    }

    /// Runs the search against a pipeline that holds every rate up to `capacity`.
    fn search(plan: SearchPlan, capacity: f64) -> (Option<f64>, Vec<f64>) {
        let mut s = RateSearch::new(plan);
        let mut tried = Vec::new();
        while let Some(rate) = s.next_rate() {
            tried.push(rate);
            s.record(rate, rate <= capacity);
        }
        (s.sustained(), tried)
    }

    #[test]
    fn a_failed_rate_is_tried_again_before_its_failure_counts() {
        let mut s = RateSearch::new(plan());
        assert_eq!(s.next_rate(), Some(500.0));
        s.record(500.0, false);
        assert_eq!(s.next_rate(), Some(500.0), "a second try of the start rate");
        s.record(500.0, true);
        assert_eq!(s.next_rate(), Some(1000.0));
        // A start that fails twice sends the search down.
        let mut s = RateSearch::new(plan());
        s.record(500.0, false);
        s.record(500.0, false);
        assert_eq!(s.next_rate(), Some(250.0));
        // Above the start too: one failure, then a hold, keeps the search going up.
        let mut s = RateSearch::new(plan());
        s.record(500.0, true);
        s.record(1000.0, false);
        assert_eq!(s.next_rate(), Some(1000.0), "a second try of 1000");
        s.record(1000.0, true);
        assert_eq!(s.next_rate(), Some(2000.0));
        s.record(2000.0, false);
        s.record(2000.0, false);
        assert_eq!(
            s.next_rate(),
            Some(1414.0),
            "bisects once 2000 failed twice"
        );
    }

    #[test]
    fn ramps_up_geometrically_then_bisects_to_the_precision() {
        let (held, tried) = search(plan(), 6_300.0);
        assert_eq!(
            &tried[..7],
            &[500.0, 1000.0, 2000.0, 4000.0, 8000.0, 8000.0, 5657.0]
        );
        let held = held.unwrap();
        assert!((6_300.0 / 1.05..=6_300.0).contains(&held), "{held}");
        assert!(tried.len() <= 16, "{tried:?}");
    }

    #[test]
    fn ramps_down_when_the_start_rate_fails() {
        let (held, tried) = search(plan(), 90.0);
        assert_eq!(
            &tried[..8],
            &[500.0, 500.0, 250.0, 250.0, 125.0, 125.0, 63.0, 89.0]
        );
        let held = held.unwrap();
        assert!((90.0 / 1.05..=90.0).contains(&held), "{held}");
    }

    #[test]
    fn nothing_held_ends_at_the_minimum_rate() {
        let (held, tried) = search(plan(), 5.0);
        assert_eq!(held, None);
        assert_eq!(tried.last(), Some(&10.0));
    }

    #[test]
    fn holding_the_maximum_rate_ends_the_search() {
        let p = SearchPlan {
            max_rate: 3000.0,
            ..plan()
        };
        let (held, tried) = search(p, 1e9);
        assert_eq!(held, Some(3000.0));
        assert_eq!(tried, vec![500.0, 1000.0, 2000.0, 3000.0]);
    }

    #[test]
    fn the_step_budget_ends_the_search() {
        let p = SearchPlan {
            max_steps: 3,
            ..plan()
        };
        let (held, tried) = search(p, 1e9);
        assert_eq!(tried.len(), 3);
        assert_eq!(held, Some(2000.0));
    }

    #[test]
    fn whole_rates_end_a_bisection_that_cannot_narrow() {
        let p = SearchPlan {
            start: 10.0,
            precision: 0.001,
            min_rate: 1.0,
            ..plan()
        };
        let (held, tried) = search(p, 13.5);
        assert_eq!(held, Some(13.0));
        // Only a failed rate is offered twice (its second try), and no rate more often.
        for r in &tried {
            let n = tried.iter().filter(|t| *t == r).count();
            assert!(
                n == 1 || (n == 2 && *r > 13.5),
                "{r} offered {n} times: {tried:?}"
            );
        }
    }

    #[test]
    fn a_noisy_failure_below_a_later_success_is_superseded() {
        let mut s = RateSearch::new(plan());
        s.record(500.0, true);
        s.record(1000.0, false);
        s.record(1000.0, false);
        assert_eq!(s.next_rate(), Some(707.0));
        // Failing below the highest rate held changes nothing.
        s.record(400.0, false);
        assert_eq!(s.next_rate(), Some(707.0));
        s.record(1000.0, true);
        assert_eq!(s.sustained(), Some(1000.0));
        assert_eq!(s.next_rate(), Some(2000.0));
    }
}
