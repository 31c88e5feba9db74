//! One step of the sustained-rate search: messages published open loop at a rate (slot m due
//! at start + m / rate), the events watched as they arrive, publishing stopped once the p99
//! is certain to exceed the bound, everything published drained, then measured.

use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use super::measure::{self, LateCounter, StepFigures, UnitTiming};
use crate::amqp::Publisher;
use crate::tools::bench::traffic::{self, Sink, SinkResult, Traffic};

/// A step fails when nothing new arrives for this long while it drains.
const STALL: Duration = Duration::from_secs(60);

/// The system under test, as a step sees it.
pub(crate) trait Pipeline {
    /// The queue the step publishes to.
    fn input_queue(&self) -> &str;
    /// The consumer of the pipeline's events.
    fn sink(&self) -> &Sink;
    /// The `balance.changed` events execution i of `slice` yields once decided.
    fn events_per_execution(&self, slice: &Traffic, i: usize) -> u8;
    /// The slot of the message that yields execution i's last event: its latency is timed
    /// from that message's due time.
    fn timed_slot(&self, slice: &Traffic, i: usize) -> usize {
        slice.last_slot(i)
    }
    /// Fails when the pipeline under test died.
    fn check_alive(&mut self) -> anyhow::Result<()>;
    /// Checks made once a step has drained, `executions` published so far.
    async fn after_step(&mut self, _executions: usize) -> anyhow::Result<()> {
        Ok(())
    }
}

/// How long a step offers its rate, and the latency bound it must hold.
#[derive(Debug, Clone, Copy)]
pub(crate) struct StepConfig {
    pub seconds: f64,
    pub max_p99_ms: f64,
}

/// One step's result.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Step {
    pub offered_msgs_per_s: f64,
    /// Messages published (all of them, or up to the early stop and what completes the
    /// executions begun).
    pub messages: usize,
    pub executions: usize,
    pub delivered_msgs_per_s: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// Publishing stopped once the p99 was certain to exceed the bound.
    pub stopped_early: bool,
    pub held: bool,
}

/// The executions of a step offering `rate` msgs/s for `seconds`.
pub(crate) fn executions_for(rate: f64, seconds: f64, pairs: bool) -> usize {
    let messages = (rate * seconds).round().max(1.0) as usize;
    if pairs {
        messages.div_ceil(2)
    } else {
        messages
    }
}

/// A step's schedule: per execution the events it yields and when it is due.
struct StepPlan<'a> {
    slice: &'a Traffic,
    expected: Vec<u8>,
    /// The slot of the message execution i is timed from ([`Pipeline::timed_slot`]).
    slots: Vec<usize>,
    /// Seconds from `start` at which that message is due.
    due: Vec<f64>,
    start: Instant,
}

impl StepPlan<'_> {
    /// When execution i's last event arrived (once all its events have), seconds from the
    /// start.
    fn arrival(&self, r: &SinkResult, i: usize) -> Option<f64> {
        let g = self.slice.global_index(i);
        if r.counts.get(g).copied().unwrap_or(0) < self.expected[i] {
            return None;
        }
        let at = r.settled.get(g).copied().flatten()?;
        Some(at.saturating_duration_since(self.start).as_secs_f64())
    }

    /// Each of the first `executions`' due time and arrival; those completed after an early
    /// stop (slot `paced` on, sent at once at `stop_at`) were due then.
    fn timings(
        &self,
        sink: &Sink,
        executions: usize,
        paced: usize,
        stop_at: f64,
    ) -> Vec<UnitTiming> {
        let messages = if self.slice.is_pairs() { 2 } else { 1 };
        sink.inspect(|r| {
            (0..executions)
                .map(|i| UnitTiming {
                    due: if self.slots[i] < paced {
                        self.due[i]
                    } else {
                        stop_at
                    },
                    arrived: self.arrival(r, i),
                    messages,
                })
                .collect()
        })
    }
}

/// Runs `slice` through `p` at `rate`.
pub(crate) async fn run(
    p: &mut impl Pipeline,
    publisher: &Publisher,
    slice: &Traffic,
    rate: f64,
    cfg: StepConfig,
    label: &str,
) -> anyhow::Result<Step> {
    let queue = p.input_queue().to_owned();
    let slots: Vec<usize> = (0..slice.messages)
        .map(|i| p.timed_slot(slice, i))
        .collect();
    let plan = StepPlan {
        slice,
        expected: (0..slice.messages)
            .map(|i| p.events_per_execution(slice, i))
            .collect(),
        due: slots.iter().map(|&m| m as f64 / rate).collect(),
        slots,
        start: Instant::now(),
    };
    let bar = crate::tools::bench::progress(slice.published() as u64, label);
    bar.set_message(format!("{rate:.0} msgs/s"));
    let stop = CancellationToken::new();
    let published = CancellationToken::new();
    let publish = async {
        let sent = traffic::pace(publisher, &queue, slice, rate, plan.start, &stop, &bar).await;
        published.cancel();
        sent
    };
    let watch = async {
        let w = watch(p, &plan, cfg, &published).await;
        // Stops publishing on an early stop and on a failure alike.
        stop.cancel();
        w
    };
    let (sent, stopped_early) = tokio::join!(publish, watch);
    let (sent, stopped_early) = (sent?, stopped_early?);
    let stop_at = plan.start.elapsed().as_secs_f64();
    // After an early stop, what completes the executions begun goes out at once.
    let rest = slice.completing_slots(sent);
    traffic::publish_slots(publisher, &queue, slice, &rest).await?;
    let executions = slice.executions_begun(sent);
    drain(p, &plan, executions, &bar)
        .await
        .with_context(|| format!("{label} step at {rate:.0} msgs/s"))?;
    let timings = plan.timings(p.sink(), executions, sent, stop_at);
    let figures = measure::figures(&timings, sent as f64 / rate, cfg.max_p99_ms / 1e3, sent);
    let all_published = sent == slice.published();
    let held = figures
        .as_ref()
        .is_some_and(|f| measure::held(f, rate, cfg.max_p99_ms, all_published));
    Ok(Step {
        messages: sent + rest.len(),
        executions,
        stopped_early,
        held,
        ..Step::measured(rate, figures.as_ref())
    })
}

impl Step {
    /// A step at `rate` with what it measured (NaN latencies when no event arrived).
    fn measured(rate: f64, figures: Option<&StepFigures>) -> Step {
        Step {
            offered_msgs_per_s: rate,
            messages: 0,
            executions: 0,
            delivered_msgs_per_s: figures.map_or(0.0, |f| f.delivered_msgs_per_s),
            p50_ms: figures.map_or(f64::NAN, |f| f.p50_ms),
            p99_ms: figures.map_or(f64::NAN, |f| f.p99_ms),
            max_ms: figures.map_or(f64::NAN, |f| f.max_ms),
            stopped_early: false,
            held: false,
        }
    }
}

/// Watches the events while the step publishes; true when it stopped the step early.
async fn watch(
    p: &mut impl Pipeline,
    plan: &StepPlan<'_>,
    cfg: StepConfig,
    published: &CancellationToken,
) -> anyhow::Result<bool> {
    let bound = cfg.max_p99_ms / 1e3;
    let mut late = LateCounter::new(&plan.due);
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    loop {
        tokio::select! {
            () = published.cancelled() => return Ok(false),
            _ = tick.tick() => {}
        }
        p.check_alive()?;
        let now = plan.start.elapsed().as_secs_f64();
        let over = p
            .sink()
            .inspect(|r| late.advance(now, bound, |i| plan.arrival(r, i)));
        if over {
            return Ok(true);
        }
    }
}

/// Waits until the first `executions` of the step have all their events.
async fn drain(
    p: &mut impl Pipeline,
    plan: &StepPlan<'_>,
    executions: usize,
    bar: &indicatif::ProgressBar,
) -> anyhow::Result<()> {
    let mut last = (0, Instant::now());
    loop {
        let done = p.sink().inspect(|r| {
            (0..executions)
                .filter(|&i| plan.arrival(r, i).is_some())
                .count()
        });
        if done >= executions {
            return Ok(());
        }
        p.check_alive()?;
        if done != last.0 {
            last = (done, Instant::now());
        } else if last.1.elapsed() > STALL {
            anyhow::bail!(
                "no progress for {} s: {done} of {executions} executions' events received",
                STALL.as_secs()
            );
        }
        bar.set_message(format!("draining {done}/{executions}"));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_step_publishes_rate_times_seconds_messages() {
        assert_eq!(executions_for(1000.0, 5.0, false), 5000);
        assert_eq!(executions_for(1000.0, 5.0, true), 2500);
        assert_eq!(executions_for(333.0, 0.5, true), 84);
        assert_eq!(executions_for(0.1, 1.0, false), 1);
    }
}
