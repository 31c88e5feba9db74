//! The report of `bench --sustained`: per pipeline its steps and sustained rate, their ratio,
//! the worker at half its rate, its memory and the verification; as text or `--json`.

use std::path::Path;

use serde_json::json;

use super::plot::PlotData;
use super::step::Step;
use super::worker::WorkerSustained;
use super::{Searched, HALF_RATE_TARGET_MS};
use crate::config::Settings;
use crate::tools::bench::{round, BenchArgs};
use crate::tools::scratch::Scratch;

#[derive(Debug)]
pub(crate) struct SustainedReport {
    users: usize,
    pairs: bool,
    max_batch: usize,
    prefetch: u16,
    step_seconds: f64,
    max_p99_ms: f64,
    /// The search's cap: a pipeline that held it may hold more (its rate is a lower bound).
    max_rate: f64,
    broker: Searched,
    worker: WorkerSustained,
}

/// The run's first line: what is offered, with which settings, where.
pub(crate) fn print_header(
    settings: &Settings,
    args: &BenchArgs,
    scratch: &Scratch,
    cost: i64,
    max_batch: usize,
) -> std::io::Result<()> {
    outln!(
        "bench --sustained: open loop over {} users ({}), steps of {} s, p99 bound {} ms; prefetch {}, max_batch {max_batch}; namespace {}, database {}",
        args.users,
        if args.pairs {
            "start + completion pairs, token-priced".to_owned()
        } else {
            format!("cost {cost} each")
        },
        args.step_seconds,
        args.max_p99_ms,
        settings.amqp.prefetch,
        scratch.namespace,
        scratch.db_name,
    );
    Ok(())
}

impl SustainedReport {
    pub(crate) fn new(
        settings: &Settings,
        args: &BenchArgs,
        max_batch: usize,
        broker: Searched,
        worker: WorkerSustained,
    ) -> Self {
        SustainedReport {
            users: args.users,
            pairs: args.pairs,
            max_batch,
            prefetch: settings.amqp.prefetch,
            step_seconds: args.step_seconds,
            max_p99_ms: args.max_p99_ms,
            max_rate: args.max_rate,
            broker,
            worker,
        }
    }

    pub(crate) fn verified(&self) -> bool {
        self.worker.problems.is_empty()
    }

    /// Worker sustained / broker-only sustained.
    fn ratio(&self) -> Option<f64> {
        let (w, b) = (self.worker.searched.sustained?, self.broker.sustained?);
        (b > 0.0).then(|| w / b)
    }

    /// Whether `sustained` is the search's cap, so only a lower bound of the pipeline's rate
    /// (and a ratio with it in the denominator an upper bound).
    fn capped(&self, sustained: Option<f64>) -> bool {
        sustained.is_some_and(|r| r >= self.max_rate)
    }

    /// Executions per second at `msgs_per_s`.
    fn execs(&self, msgs_per_s: f64) -> f64 {
        if self.pairs {
            msgs_per_s / 2.0
        } else {
            msgs_per_s
        }
    }

    fn half_rate_met(&self) -> Option<bool> {
        let h = self.worker.half_rate.as_ref()?;
        Some(h.p99_ms < HALF_RATE_TARGET_MS)
    }

    pub(crate) fn plot(&self) -> PlotData {
        PlotData::new(
            &self.worker.searched.steps,
            &self.broker.steps,
            self.max_p99_ms,
        )
    }

    fn search_json(&self, s: &Searched) -> serde_json::Value {
        json!({
            "sustained_msgs_per_s": s.sustained,
            "sustained_execs_per_s": s.sustained.map(|r| self.execs(r)),
            "at_max_rate": self.capped(s.sustained),
            "steps": s.steps.iter().map(step_json).collect::<Vec<_>>(),
        })
    }

    pub(crate) fn to_json(&self, plot: Option<&Path>) -> serde_json::Value {
        let w = &self.worker;
        let mut worker = self.search_json(&w.searched);
        worker["half_rate"] = json!(w.half_rate.as_ref().map(step_json));
        worker["peak_rss_mib"] = json!(round(w.peak_rss_mib, 1));
        worker["breakdown"] = json!(w.breakdown);
        json!({
            "mode": "sustained",
            "pairs": self.pairs,
            "users": self.users,
            "max_batch": self.max_batch,
            "prefetch": self.prefetch,
            "step_seconds": self.step_seconds,
            "max_p99_ms": self.max_p99_ms,
            "broker": self.search_json(&self.broker),
            "worker": worker,
            "ratio": self.ratio().map(|r| round(r, 3)),
            "half_rate_p99_ms": w.half_rate.as_ref().map(|h| round(h.p99_ms, 2)),
            "half_rate_target_ms": HALF_RATE_TARGET_MS,
            "half_rate_target_met": self.half_rate_met(),
            "executions": w.executions,
            "events_received": w.events_received,
            "fees": w.fees,
            "pairs_check": w.pairs,
            "verified": self.verified(),
            "problems": w.problems,
            "plot": plot.map(|p| p.display().to_string()),
        })
    }

    pub(crate) fn print(&self, plot: Option<&Path>) -> std::io::Result<()> {
        let w = &self.worker;
        print_steps("broker-only pipeline", &self.broker.steps)?;
        print_steps("worker", &w.searched.steps)?;
        self.print_rate("broker-only sustained", self.broker.sustained)?;
        self.print_rate("worker sustained", w.searched.sustained)?;
        let bound = match (
            self.capped(w.searched.sustained),
            self.capped(self.broker.sustained),
        ) {
            (false, false) => "",
            (true, false) => " (at least: the worker held --max-rate)",
            (false, true) => " (at most: the broker-only pipeline held --max-rate)",
            (true, true) => " (both held --max-rate: raise it to compare)",
        };
        match self.ratio() {
            Some(r) => outln!("ratio worker/broker  {r:>9.3}{bound}"),
            None => outln!("ratio worker/broker        n/a"),
        }
        match (&w.half_rate, self.half_rate_met()) {
            (Some(h), Some(met)) => outln!(
                "worker at half rate  {:>9.0} msgs/s offered: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms (target p99 < {HALF_RATE_TARGET_MS} ms: {})",
                h.offered_msgs_per_s,
                h.p50_ms,
                h.p99_ms,
                h.max_ms,
                if met { "met" } else { "not met" }
            ),
            _ => outln!("worker at half rate        n/a (no rate held)"),
        }
        outln!("worker peak RSS      {:>9.1} MiB (VmHWM)", w.peak_rss_mib);
        if let Some(b) = &w.breakdown {
            outln!("worker breakdown     {b}");
        }
        self.print_verification()?;
        if let Some(p) = plot {
            outln!("plot                 {}", p.display());
        }
        Ok(())
    }

    fn print_rate(&self, what: &str, rate: Option<f64>) -> std::io::Result<()> {
        if self.capped(rate) {
            outln!(
                "{what:<21}{:>8.0} msgs/s held at --max-rate: the pipeline's rate is at least this",
                self.max_rate
            );
            return Ok(());
        }
        match rate {
            Some(r) if self.pairs => outln!(
                "{what:<21}{r:>8.0} msgs/s = {:.0} execs/s (p99 ≤ {} ms, delivered ≈ offered)",
                self.execs(r),
                self.max_p99_ms
            ),
            Some(r) => outln!(
                "{what:<21}{r:>8.0} msgs/s (p99 ≤ {} ms, delivered ≈ offered)",
                self.max_p99_ms
            ),
            None => outln!("{what:<21}     none (no step held)"),
        }
        Ok(())
    }

    fn print_verification(&self) -> std::io::Result<()> {
        let w = &self.worker;
        if !w.problems.is_empty() {
            outln!("verification         FAILED");
            for p in &w.problems {
                outln!("  - {p}");
            }
        } else if let Some(p) = &w.pairs {
            outln!(
                "verification         ok: {} executions settled once ({} extra charges, {} refunds, {} completions before their start); charged {} = Σ post-flight {}; {} execution fees, {} events, audit clean",
                p.settled, p.extra_charges, p.refunds, p.overtaking, p.charged_credits, p.expected_credits, w.fees, w.events_received
            );
        } else {
            outln!(
                "verification         ok: {} decisions, {} execution fees, {} events, audit clean",
                w.executions,
                w.fees,
                w.events_received
            );
        }
        Ok(())
    }
}

fn step_json(s: &Step) -> serde_json::Value {
    let ms = |x: f64| x.is_finite().then(|| round(x, 2));
    json!({
        "offered_msgs_per_s": s.offered_msgs_per_s,
        "delivered_msgs_per_s": round(s.delivered_msgs_per_s, 1),
        "messages": s.messages,
        "executions": s.executions,
        "p50_ms": ms(s.p50_ms),
        "p99_ms": ms(s.p99_ms),
        "max_ms": ms(s.max_ms),
        "stopped_early": s.stopped_early,
        "held": s.held,
    })
}

/// A pipeline's steps, in the order run.
fn print_steps(what: &str, steps: &[Step]) -> std::io::Result<()> {
    outln!("{what}");
    outln!("  step  offered msgs/s  delivered msgs/s   p50 ms    p99 ms    max ms  result");
    for (i, s) in steps.iter().enumerate() {
        outln!(
            "  {:>4}  {:>14.0}  {:>16.0}  {:>7.2}  {:>8.2}  {:>8.2}  {}",
            i + 1,
            s.offered_msgs_per_s,
            s.delivered_msgs_per_s,
            s.p50_ms,
            s.p99_ms,
            s.max_ms,
            match (s.held, s.stopped_early) {
                (true, _) => "held",
                (false, true) => "failed (stopped early)",
                (false, false) => "failed",
            }
        );
    }
    Ok(())
}
