//! `bench --sustained`: the highest open-loop rate the worker holds with its p99 publish →
//! event latency within a bound, the same for the broker-only pipeline, and the worker's
//! latency at half its sustained rate (docs/benchmarks.md).
//!
//! Each pipeline runs for the whole search; every step publishes fresh executions (a slice of
//! one run-wide id space) at its offered rate, drains, and is judged by `measure`.

mod broker;
mod measure;
mod plot;
mod report;
mod search;
mod step;
mod worker;

use std::process::ExitCode;
use std::time::Duration;

use crate::amqp::Publisher;
use crate::config::{AmqpSettings, Settings};
use crate::tools::bench::traffic::{self, Traffic};
use crate::tools::bench::BenchArgs;
use crate::tools::scratch::Scratch;

pub(crate) use report::SustainedReport;
use search::{RateSearch, SearchPlan};
use step::{Pipeline, Step, StepConfig};

/// Each ramp step doubles the rate.
const RAMP_FACTOR: f64 = 2.0;
/// No step offers less than this.
const MIN_RATE: f64 = 10.0;
/// Steps per pipeline at most.
const MAX_STEPS: usize = 30;
/// Idle time between steps, after the drain.
const PAUSE: Duration = Duration::from_millis(500);
/// Seconds of a pipeline's warm-up step (at most a step's), at the start rate, not judged: the
/// first messages through fresh connections, consumers and queues are not its steady state.
const WARM_UP_SECONDS: f64 = 1.0;
/// The worker's p99 target at half its sustained rate.
pub(crate) const HALF_RATE_TARGET_MS: f64 = 50.0;
/// Executions the run-wide id space holds (ids are only made for published ones).
const ID_SPACE: usize = 1 << 40;

/// What a search is asked to do.
#[derive(Debug, Clone)]
pub(crate) struct SearchSpec {
    pub plan: SearchPlan,
    pub step: StepConfig,
}

impl SearchSpec {
    pub(crate) fn of(args: &BenchArgs) -> SearchSpec {
        SearchSpec {
            plan: SearchPlan {
                start: args.start_rate,
                factor: RAMP_FACTOR,
                precision: args.precision,
                min_rate: MIN_RATE.min(args.start_rate),
                max_rate: args.max_rate,
                max_steps: MAX_STEPS,
            },
            step: StepConfig {
                seconds: args.step_seconds,
                max_p99_ms: args.max_p99_ms,
            },
        }
    }
}

/// The usage problem of the sustained options, if any.
pub(crate) fn usage_problem(args: &BenchArgs) -> Option<String> {
    let positive = |x: f64| x.is_finite() && x > 0.0;
    if !(positive(args.step_seconds) && (0.2..=3600.0).contains(&args.step_seconds)) {
        return Some("--step-seconds must be between 0.2 and 3600".into());
    }
    if !positive(args.max_p99_ms) {
        return Some("--max-p99-ms must be a positive number of milliseconds".into());
    }
    if !(positive(args.start_rate) && positive(args.max_rate) && args.start_rate <= args.max_rate) {
        return Some("--start-rate and --max-rate must be positive, start ≤ max".into());
    }
    // A step holds rate × seconds messages' timings in memory.
    if args.max_rate > super::MAX_RATE {
        return Some(format!("--max-rate must be at most {}", super::MAX_RATE));
    }
    if args.max_rate * args.step_seconds > super::MAX_MESSAGES as f64 {
        return Some(format!(
            "--max-rate × --step-seconds must be at most {} messages a step",
            super::MAX_MESSAGES
        ));
    }
    if !(args.precision > 0.0 && args.precision <= 1.0) {
        return Some("--precision must be in (0, 1]".into());
    }
    match &args.plot {
        Some(p) if p.extension().and_then(|e| e.to_str()) != Some("svg") => {
            Some("--plot writes SVG: give a path ending in .svg".into())
        }
        _ => None,
    }
}

/// Where the next step's executions start in the run-wide id space, and how many of those
/// published complete before they start.
#[derive(Debug, Default)]
pub(crate) struct Cursor {
    pub next: usize,
    pub overtaking: usize,
}

/// The steps of one pipeline's search and the highest rate it held.
#[derive(Debug, Clone, Default)]
pub(crate) struct Searched {
    pub steps: Vec<Step>,
    pub sustained: Option<f64>,
}

/// The run-wide traffic the steps are cut from.
fn id_space(run_id: u32, users: usize, pairs: bool) -> Traffic {
    Traffic::id_space(run_id, ID_SPACE, users, pairs)
}

pub(crate) async fn run(
    settings: &Settings,
    args: &BenchArgs,
    scratch: &Scratch,
    json: bool,
) -> anyhow::Result<ExitCode> {
    if let Some(path) = &args.plot {
        super::writable(path)?;
    }
    let base = id_space(scratch.run_id, args.users, args.pairs);
    let cost = Traffic::new(scratch.run_id, 1, args.users).expected_cost(settings)?;
    let max_batch = args.max_batch.unwrap_or(settings.pipeline.max_batch);
    let spec = SearchSpec::of(args);
    if !json {
        report::print_header(settings, args, scratch, cost, max_batch)?;
    }
    let broker = broker::run(settings, scratch, &base, &spec).await?;
    let worker = worker::run(settings, scratch, &base, cost, max_batch, &spec).await?;
    let report = SustainedReport::new(settings, args, max_batch, broker, worker);
    // A plot that cannot be written fails the run, after the report.
    let plot = args
        .plot
        .as_deref()
        .map(|path| (path, report.plot().write(path)));
    let written = plot
        .as_ref()
        .and_then(|(path, r)| r.is_ok().then_some(*path));
    if json {
        outln!("{}", report.to_json(written));
    } else {
        report.print(written)?;
    }
    if let Some((_, Err(e))) = &plot {
        eprintln!("error: {e}");
    }
    let plotted = plot.is_none_or(|(_, r)| r.is_ok());
    Ok(crate::tools::exit_code(report.verified() && plotted))
}

/// Searches `p`'s sustained rate.
pub(crate) async fn search(
    p: &mut impl Pipeline,
    publisher: &Publisher,
    base: &Traffic,
    cursor: &mut Cursor,
    spec: &SearchSpec,
    label: &str,
) -> anyhow::Result<Searched> {
    let mut s = RateSearch::new(spec.plan);
    if let Some(rate) = s.next_rate() {
        let warm_up = StepConfig {
            seconds: WARM_UP_SECONDS.min(spec.step.seconds),
            ..spec.step
        };
        one_step(p, publisher, base, cursor, rate, warm_up, "warm-up").await?;
    }
    let mut steps = Vec::new();
    while let Some(rate) = s.next_rate() {
        let step = one_step(p, publisher, base, cursor, rate, spec.step, label).await?;
        s.record(rate, step.held);
        steps.push(step);
    }
    Ok(Searched {
        steps,
        sustained: s.sustained(),
    })
}

/// One step at `rate`, its executions taken from `cursor`.
pub(crate) async fn one_step(
    p: &mut impl Pipeline,
    publisher: &Publisher,
    base: &Traffic,
    cursor: &mut Cursor,
    rate: f64,
    cfg: StepConfig,
    label: &str,
) -> anyhow::Result<Step> {
    let n = step::executions_for(rate, cfg.seconds, base.is_pairs());
    let slice = base.slice(cursor.next, n);
    let step = step::run(p, publisher, &slice, rate, cfg, label).await?;
    cursor.next += step.executions;
    if slice.is_pairs() {
        cursor.overtaking += (0..step.executions)
            .filter(|&i| traffic::overtakes(i))
            .count();
    }
    p.after_step(cursor.next).await?;
    tokio::time::sleep(PAUSE).await;
    Ok(step)
}

/// A publisher on a connection of its own, for a pipeline's steps.
pub(crate) async fn open_publisher(
    amqp: &AmqpSettings,
) -> anyhow::Result<(lapin::Connection, Publisher)> {
    let conn = crate::amqp::connect(amqp, "credit-worker bench publisher").await?;
    let publisher = Publisher::open(&conn).await?;
    Ok((conn, publisher))
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::tools::bench::tests::{problem, Cli};

    #[test]
    fn sustained_options_are_checked() {
        assert_eq!(problem(&["--sustained"]), None);
        assert_eq!(
            problem(&["--sustained", "--plot", "docs/latency.svg"]),
            None
        );
        assert!(problem(&["--sustained", "--plot", "latency.png"]).is_some());
        assert!(problem(&["--sustained", "--step-seconds", "0.1"]).is_some());
        assert!(problem(&["--sustained", "--max-p99-ms=-1"]).is_some());
        assert!(problem(&["--sustained", "--start-rate", "900", "--max-rate", "800"]).is_some());
        assert!(problem(&["--sustained", "--precision", "0"]).is_some());
    }

    #[test]
    fn the_search_plan_follows_the_options() {
        let cli = Cli::try_parse_from(["bench", "--sustained", "--start-rate", "5"]).unwrap();
        let spec = SearchSpec::of(&cli.args);
        assert_eq!(spec.plan.start, 5.0);
        assert_eq!(
            spec.plan.min_rate, 5.0,
            "the minimum never exceeds the start"
        );
        assert_eq!(spec.step.max_p99_ms, 100.0);
        assert_eq!(spec.step.seconds, 5.0);
        assert!(Cli::try_parse_from(["bench", "--step-seconds", "2"]).is_err());
        assert!(Cli::try_parse_from(["bench", "--sustained", "--messages", "9"]).is_err());
    }
}
