//! The figures of one sustained-rate step, from when each unit (a message, or with `--pairs`
//! an execution) was due and when its last event arrived, both in seconds from the step's
//! start. Pure: the step's I/O is in `step`.

use crate::tools::bench::traffic::Latency;

/// Units a step may have late (latency above the bound) and still have its nearest-rank p99
/// within the bound: the p99 is the ⌈0.99·n⌉-th smallest latency.
pub(crate) fn late_allowance(units: usize) -> usize {
    units - p99_rank(units).min(units)
}

fn p99_rank(units: usize) -> usize {
    (units * 99).div_ceil(100)
}

/// Classifies units as on time or late as their due time plus the bound passes, so a step can
/// stop as soon as its p99 is certain to exceed the bound.
#[derive(Debug)]
pub(crate) struct LateCounter {
    /// (due, unit), earliest first.
    order: Vec<(f64, usize)>,
    cursor: usize,
    late: usize,
    allowed: usize,
}

impl LateCounter {
    /// `due[i]`: when unit i was due, seconds from the step's start.
    pub(crate) fn new(due: &[f64]) -> Self {
        let mut order: Vec<(f64, usize)> = due.iter().copied().zip(0..).collect();
        order.sort_by(|a, b| a.0.total_cmp(&b.0));
        LateCounter {
            order,
            cursor: 0,
            late: 0,
            allowed: late_allowance(due.len()),
        }
    }

    /// Classifies every unit due at least `bound` before `now` (a unit without an arrival by
    /// then is late); true once more units are late than the p99 allows.
    pub(crate) fn advance(
        &mut self,
        now: f64,
        bound: f64,
        arrived: impl Fn(usize) -> Option<f64>,
    ) -> bool {
        while let Some(&(due, unit)) = self.order.get(self.cursor) {
            if due + bound > now {
                break;
            }
            if arrived(unit).is_none_or(|a| a - due > bound) {
                self.late += 1;
            }
            self.cursor += 1;
        }
        self.exceeded()
    }

    pub(crate) fn exceeded(&self) -> bool {
        self.late > self.allowed
    }
}

/// One unit's timing, seconds from the step's start.
#[derive(Debug, Clone, Copy)]
pub(crate) struct UnitTiming {
    pub due: f64,
    pub arrived: Option<f64>,
    /// Messages the unit stands for (2 for a start + completion pair).
    pub messages: usize,
}

/// What a step measured.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct StepFigures {
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// Messages whose unit's events arrived by the end of publishing plus the bound, per
    /// second of publishing.
    pub delivered_msgs_per_s: f64,
    pub samples: usize,
}

/// The figures of a step that paced `paced` messages over `seconds`; None when no unit
/// arrived. Delivered counts at most the messages paced: after an early stop, the messages
/// that complete the pairs begun go out at once, and their units count as delivered, but
/// were never offered in the window.
pub(crate) fn figures(
    units: &[UnitTiming],
    seconds: f64,
    bound: f64,
    paced: usize,
) -> Option<StepFigures> {
    let mut ms: Vec<f64> = units
        .iter()
        .filter_map(|u| u.arrived.map(|a| (a - u.due).max(0.0) * 1e3))
        .collect();
    let latency = Latency::of_ms(&mut ms)?;
    let window = seconds + bound;
    let delivered: usize = units
        .iter()
        .filter(|u| u.arrived.is_some_and(|a| a <= window))
        .map(|u| u.messages)
        .sum::<usize>()
        .min(paced);
    Some(StepFigures {
        p50_ms: latency.p50_ms,
        p99_ms: latency.p99_ms,
        max_ms: latency.max_ms,
        delivered_msgs_per_s: delivered as f64 / seconds.max(1e-9),
        samples: latency.samples,
    })
}

/// Delivered rate at or above this share of the offered rate counts as keeping up.
pub(crate) const DELIVERED_SHARE: f64 = 0.95;

/// Whether a step held its offered rate: every message published, p99 within the bound, and
/// the delivered rate about the offered rate.
pub(crate) fn held(f: &StepFigures, offered: f64, bound_ms: f64, all_published: bool) -> bool {
    all_published && f.p99_ms <= bound_ms && f.delivered_msgs_per_s >= DELIVERED_SHARE * offered
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_allowance_keeps_the_nearest_rank_p99_within_the_bound() {
        assert_eq!(late_allowance(1), 0);
        assert_eq!(late_allowance(99), 0);
        assert_eq!(late_allowance(100), 1);
        assert_eq!(late_allowance(150), 1);
        assert_eq!(late_allowance(200), 2);
        assert_eq!(late_allowance(10_000), 100);
        // With the allowance late and the rest on time, the p99 is on time.
        for n in [1, 7, 100, 101, 199, 1000] {
            let allowed = late_allowance(n);
            let mut ms: Vec<f64> = (0..n)
                .map(|i| if i < allowed { 500.0 } else { 1.0 })
                .collect();
            assert_eq!(Latency::of_ms(&mut ms).unwrap().p99_ms, 1.0, "{n}");
            let mut ms: Vec<f64> = (0..n)
                .map(|i| if i <= allowed { 500.0 } else { 1.0 })
                .collect();
            assert_eq!(Latency::of_ms(&mut ms).unwrap().p99_ms, 500.0, "{n}");
        }
    }

    #[test]
    fn late_units_are_counted_once_their_bound_has_passed() {
        // 200 units due every 10 ms; two may be late.
        let due: Vec<f64> = (0..200).map(|i| f64::from(i) * 0.01).collect();
        let mut c = LateCounter::new(&due);
        let arrived = |i: usize| match i {
            3 | 5 => Some(due[i] + 0.5),
            7 => None,
            _ => Some(due[i] + 0.02),
        };
        // Nothing is due a bound (0.1 s) before 0.05 s.
        assert!(!c.advance(0.05, 0.1, arrived));
        assert!(
            !c.advance(0.165, 0.1, arrived),
            "3 and 5 late, still allowed"
        );
        assert!(
            c.advance(0.175, 0.1, arrived),
            "7 has no event 0.1 s after it was due"
        );
        assert!(c.exceeded());
    }

    #[test]
    fn units_on_time_never_stop_a_step() {
        let due: Vec<f64> = (0..1000).map(|i| f64::from(i) * 0.001).collect();
        let mut c = LateCounter::new(&due);
        assert!(!c.advance(100.0, 0.1, |i| Some(due[i] + 0.099)));
    }

    #[test]
    fn figures_measure_from_the_due_time_and_count_delivered_messages() {
        let units: Vec<UnitTiming> = (0..100)
            .map(|i| UnitTiming {
                due: f64::from(i) * 0.01,
                arrived: (i != 99).then(|| f64::from(i) * 0.01 + 0.005 + f64::from(i) * 1e-4),
                messages: 2,
            })
            .collect();
        let f = figures(&units, 1.0, 0.1, 200).unwrap();
        assert_eq!(f.samples, 99);
        assert!((f.p50_ms - 9.9).abs() < 1e-6, "{}", f.p50_ms);
        assert!((f.max_ms - 14.8).abs() < 1e-6, "{}", f.max_ms);
        assert!((f.delivered_msgs_per_s - 198.0).abs() < 1e-9);
        assert!(held(&f, 200.0, 100.0, true));
        assert!(!held(&f, 200.0, 100.0, false));
        assert!(!held(&f, 200.0, 10.0, true));
        assert!(!held(&f, 300.0, 100.0, true));
        assert!(figures(&[], 1.0, 0.1, 0).is_none());
        // An early stop: 150 messages paced, the pairs they began completed at once after.
        let f = figures(&units, 0.75, 0.1, 150).unwrap();
        assert!(
            (f.delivered_msgs_per_s - 200.0).abs() < 1e-9,
            "{}",
            f.delivered_msgs_per_s
        );
    }

    #[test]
    fn events_after_the_window_do_not_count_as_delivered() {
        let units = [
            UnitTiming {
                due: 0.0,
                arrived: Some(0.05),
                messages: 1,
            },
            UnitTiming {
                due: 0.5,
                arrived: Some(2.0),
                messages: 1,
            },
        ];
        let f = figures(&units, 1.0, 0.1, 2).unwrap();
        assert!((f.delivered_msgs_per_s - 1.0).abs() < 1e-9);
        assert!((f.max_ms - 1500.0).abs() < 1e-6);
    }
}
