//! `credit-worker bench` (docs/contract.md §10, docs/benchmarks.md): the worker's end-to-end throughput, latency and memory
//! against the broker-only ceiling of the same traffic, and (`--sweep-users`) the refill sweep.
//!
//! Every run works in a namespace `bench-<tag>.` and a database `credit_bench_<tag>` of its
//! own on the configured servers, and removes both at the end, so it never touches the
//! deployment's queues or ledger.

mod ceiling;
mod sustained;
mod sweep;
mod timeline;
mod traffic;
mod worker;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::json;

use crate::config::Settings;
use crate::tools::exit_code;
use crate::tools::scratch::Scratch;

/// Queues and exchanges the bench declares besides the worker's topology.
pub(crate) const CEILING_INPUT: &str = "bench.ceiling.node_execution";
pub(crate) const CEILING_EVENTS: &str = "bench.ceiling.events";
pub(crate) const CEILING_SINK: &str = "bench.ceiling.events.all";
pub(crate) const WORKER_SINK: &str = "bench.events.all";

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Messages to publish (with --pairs: two per execution, so messages / 2 executions).
    #[arg(long, default_value_t = 100_000)]
    pub messages: usize,
    /// Every execution as a start and a completion message, token-priced by the bench's own
    /// cost table, each settled once to its post-flight price.
    #[arg(long)]
    pub pairs: bool,
    /// Distinct users.
    #[arg(long, default_value_t = 1000)]
    pub users: usize,
    /// Override pipeline.max_batch for the worker under test and the broker-only pipeline.
    #[arg(long)]
    pub max_batch: Option<usize>,
    /// Open-loop publish rate in msgs/s (latency runs); default: as fast as possible.
    #[arg(long)]
    pub rate: Option<f64>,
    /// Instead of the message runs, time one refill sweep over this many fresh users.
    #[arg(long, value_name = "M")]
    pub sweep_users: Option<u64>,
    /// Find the highest open-loop rate the worker and the broker-only pipeline each hold
    /// with p99 latency within --max-p99-ms (ramp up, then bisect), then run the worker at
    /// half its rate.
    #[arg(long, conflicts_with_all = ["messages", "rate", "sweep_users"])]
    pub sustained: bool,
    /// Seconds each sustained step offers its rate.
    #[arg(long, default_value_t = 5.0, requires = "sustained")]
    pub step_seconds: f64,
    /// The p99 publish → event latency a sustained step must hold, in ms.
    #[arg(long, default_value_t = 100.0, requires = "sustained")]
    pub max_p99_ms: f64,
    /// The first rate a sustained search offers, msgs/s.
    #[arg(long, default_value_t = 500.0, requires = "sustained")]
    pub start_rate: f64,
    /// The highest rate a sustained search offers, msgs/s.
    #[arg(long, default_value_t = 100_000.0, requires = "sustained")]
    pub max_rate: f64,
    /// The search ends once the lowest rate failed is within this fraction above the
    /// highest rate held.
    #[arg(long, default_value_t = 0.05, requires = "sustained")]
    pub precision: f64,
    /// Write an SVG plot of p50 and p99 latency against the offered rate, worker and
    /// broker-only, with the bound drawn.
    #[arg(long, value_name = "FILE.svg", requires = "sustained")]
    pub plot: Option<PathBuf>,
    /// Write the worker's publish → event latency second by second as CSV (messages, p50,
    /// p99, max per second sent, with its UTC time), to find when a stall happened.
    #[arg(long, value_name = "FILE.csv", conflicts_with_all = ["sustained", "sweep_users"])]
    pub timeline: Option<PathBuf>,
}

/// Results of the message runs.
#[derive(Debug)]
struct Report {
    messages: usize,
    executions: usize,
    users: usize,
    max_batch: usize,
    prefetch: u16,
    rate: Option<f64>,
    ceiling: ceiling::CeilingResult,
    worker: worker::WorkerResult,
}

pub async fn run(settings: Settings, args: BenchArgs, json: bool) -> anyhow::Result<ExitCode> {
    if let Some(problem) = usage_problem(&args) {
        // As every command's usage error: `bad_request`, on stdout with `--json`.
        if json {
            let error = serde_json::json!({"error": {"code": "bad_request", "message": problem}});
            println!("{error}");
        } else {
            eprintln!("error: {problem}");
        }
        return Ok(ExitCode::from(2));
    }
    // Both pipelines batch alike: the broker-only ones read `pipeline.max_batch` too.
    let mut settings = settings;
    if let Some(b) = args.max_batch {
        settings.pipeline.max_batch = b;
    }
    let scratch = Scratch::new(&settings, "bench")?;
    // Ctrl-C still removes the scratch database and queues.
    let outcome = tokio::select! {
        r = run_in(&settings, &args, &scratch, json) => r,
        () = crate::signal::wait_for_signal() => Err(anyhow::anyhow!("interrupted")),
    };
    scratch
        .remove(
            &[CEILING_INPUT, CEILING_SINK, WORKER_SINK],
            &[CEILING_EVENTS],
        )
        .await;
    outcome
}

/// Fails at once when `path` cannot be written, rather than after a run of minutes. The file
/// is created empty and written when the run ends.
pub(crate) fn writable(path: &std::path::Path) -> anyhow::Result<()> {
    std::fs::File::create(path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

/// The most messages a run sends: 100 million, about ten times a long run's.
pub(crate) const MAX_MESSAGES: usize = 100_000_000;
/// The most users a run seeds: 100 million.
const MAX_USERS: usize = 100_000_000;
/// The highest offered rate, msgs/s: a hundred times what this broker takes, low enough that
/// a schedule's slot numbers and a step's messages (rate × seconds) stay exact and in memory.
pub(crate) const MAX_RATE: f64 = 1_000_000.0;

fn usage_problem(args: &BenchArgs) -> Option<String> {
    // Upper bounds: every message's timing is kept in memory, and a run is minutes at most.
    if !(1..=MAX_MESSAGES).contains(&args.messages) {
        return Some(format!("--messages must be between 1 and {MAX_MESSAGES}"));
    }
    if !(1..=MAX_USERS).contains(&args.users) {
        return Some(format!("--users must be between 1 and {MAX_USERS}"));
    }
    if let Some(b) = args.max_batch {
        if !(1..=10_000).contains(&b) {
            return Some("--max-batch must be between 1 and 10000".into());
        }
    }
    if let Some(r) = args.rate {
        if !(r.is_finite() && r > 0.0 && r <= MAX_RATE) {
            return Some(format!(
                "--rate must be a positive number of msgs/s, at most {MAX_RATE}"
            ));
        }
    }
    if args
        .sweep_users
        .is_some_and(|u| !(1..=MAX_USERS as u64).contains(&u))
    {
        return Some(format!("--sweep-users must be between 1 and {MAX_USERS}"));
    }
    if args.pairs && (args.messages < 2 || !args.messages.is_multiple_of(2)) {
        return Some("--pairs needs an even number of --messages (two per execution)".into());
    }
    if args.pairs && args.sweep_users.is_some() {
        return Some("--pairs and --sweep-users are separate runs".into());
    }
    if args.sustained {
        return sustained::usage_problem(args);
    }
    None
}

async fn run_in(
    settings: &Settings,
    args: &BenchArgs,
    scratch: &Scratch,
    json: bool,
) -> anyhow::Result<ExitCode> {
    if let Some(users) = args.sweep_users {
        let r = sweep::run(settings, scratch, users).await?;
        if json {
            outln!("{}", serde_json::to_value(&r)?);
        } else {
            r.print()?;
        }
        return Ok(exit_code(r.problems.is_empty()));
    }
    if args.sustained {
        return sustained::run(settings, args, scratch, json).await;
    }

    if let Some(path) = &args.timeline {
        writable(path)?;
    }
    let traffic = if args.pairs {
        traffic::Traffic::pairs(scratch.run_id, args.messages / 2, args.users)
    } else {
        traffic::Traffic::new(scratch.run_id, args.messages, args.users)
    };
    let cost = traffic.expected_cost(settings)?;
    let max_batch = args.max_batch.unwrap_or(settings.pipeline.max_batch);
    if !json {
        print_header(settings, args, scratch, cost, max_batch)?;
    }
    let ceiling = ceiling::run(settings, scratch, &traffic).await?;
    let worker = worker::run(settings, scratch, &traffic, cost, max_batch, args.rate).await?;
    let report = Report {
        messages: args.messages,
        executions: traffic.messages,
        users: args.users,
        max_batch,
        prefetch: settings.amqp.prefetch,
        rate: args.rate,
        ceiling,
        worker,
    };
    if json {
        outln!("{}", report.to_json());
    } else {
        report.print()?;
    }
    if let Some(path) = &args.timeline {
        timeline::write_csv(path, &report.worker.timeline)
            .with_context(|| format!("writing the timeline to {}", path.display()))?;
        if !json {
            outln!("timeline             {}", path.display());
        }
    }
    Ok(exit_code(report.worker.problems.is_empty()))
}

/// The run's first line: what is sent, with which settings, where.
fn print_header(
    settings: &Settings,
    args: &BenchArgs,
    scratch: &Scratch,
    cost: i64,
    max_batch: usize,
) -> std::io::Result<()> {
    outln!(
        "bench: {} messages over {} users ({}), prefetch {}, max_batch {max_batch}, {} queue; namespace {}, database {}",
        args.messages,
        args.users,
        if args.pairs {
            format!(
                "{} start + completion pairs, pre-flight {cost}, token-priced post-flight",
                args.messages / 2
            )
        } else {
            format!("cost {cost} each")
        },
        settings.amqp.prefetch,
        match settings.amqp.queue_type {
            crate::config::QueueType::Quorum => "quorum",
            crate::config::QueueType::Classic => "classic",
        },
        scratch.namespace,
        scratch.db_name,
    );
    Ok(())
}

/// A progress bar on stdout with the report (drawn only when stdout is a terminal), cleared
/// when dropped, so neither a report nor an error is printed under a stale bar.
struct Progress(ProgressBar);

impl std::ops::Deref for Progress {
    type Target = ProgressBar;
    fn deref(&self) -> &ProgressBar {
        &self.0
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.0.finish_and_clear();
    }
}

fn progress(len: u64, prefix: &str) -> Progress {
    let bar = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stdout())
        .with_prefix(prefix.to_owned());
    if let Ok(style) = ProgressStyle::with_template(
        "{prefix:>9} [{bar:32}] {pos:>8}/{len:8} {per_sec:>14} {elapsed:>4} {msg}",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    Progress(bar)
}

fn round(x: f64, digits: i32) -> f64 {
    let p = 10f64.powi(digits);
    (x * p).round() / p
}

impl Report {
    fn ratio(&self) -> Option<f64> {
        // Paced runs measure the offered rate, not capacity: no ratio.
        (self.rate.is_none() && self.ceiling.msgs_per_s > 0.0)
            .then(|| self.worker.msgs_per_s / self.ceiling.msgs_per_s)
    }

    fn to_json(&self) -> serde_json::Value {
        let w = &self.worker;
        json!({
            "messages": self.messages,
            "executions": self.executions,
            "pairs": w.pairs,
            "users": self.users,
            "max_batch": self.max_batch,
            "prefetch": self.prefetch,
            "mode": if self.rate.is_some() { "open-loop" } else { "backlog" },
            "rate": self.rate,
            "ceiling_msgs_per_s": round(self.ceiling.msgs_per_s, 1),
            "ceiling_seconds": round(self.ceiling.seconds, 3),
            "worker_msgs_per_s": round(w.msgs_per_s, 1),
            "worker_execs_per_s": round(w.execs_per_s, 1),
            "worker_seconds": round(w.seconds, 3),
            "worker_msgs_per_s_incl_startup": round(w.msgs_per_s_total, 1),
            "worker_startup_ms": round(w.startup_ms, 1),
            "ratio": self.ratio().map(|r| round(r, 3)),
            "latency_ms": w.latency.as_ref().map(|l| json!({
                "p50": round(l.p50_ms, 2),
                "p99": round(l.p99_ms, 2),
                "max": round(l.max_ms, 2),
                "samples": l.samples,
            })),
            "worker_peak_rss_mib": round(w.peak_rss_mib, 1),
            "events_received": w.events_received,
            "fees": w.fees,
            "worker_breakdown": w.breakdown,
            "verified": w.problems.is_empty(),
            "problems": w.problems,
        })
    }

    fn print_verification(&self) -> std::io::Result<()> {
        let w = &self.worker;
        if let (true, Some(p)) = (w.problems.is_empty(), &w.pairs) {
            outln!(
                "verification         ok: {} executions settled once ({} extra charges, {} refunds, {} completions before their start); charged {} = Σ post-flight {}; {} execution fees, {} events, audit clean",
                p.settled, p.extra_charges, p.refunds, p.overtaking, p.charged_credits, p.expected_credits, w.fees, w.events_received
            );
        } else if w.problems.is_empty() {
            outln!(
                "verification         ok: {} decisions, {} execution fees, {} events, audit clean",
                self.messages,
                w.fees,
                w.events_received
            );
        } else {
            outln!("verification         FAILED");
            for p in &w.problems {
                outln!("  - {p}");
            }
        }
        Ok(())
    }

    fn print(&self) -> std::io::Result<()> {
        let w = &self.worker;
        let c = &self.ceiling;
        outln!(
            "broker-only ceiling  {:>9.0} msgs/s  ({} msgs in {:.2} s; publish {:.0} msgs/s)",
            c.msgs_per_s,
            self.messages,
            c.seconds,
            c.publish_msgs_per_s
        );
        match self.rate {
            None => outln!(
                "worker end-to-end    {:>9.0} msgs/s  ({:.2} s from first delivery to last event; {:.0} msgs/s incl. {:.0} ms start-up)",
                w.msgs_per_s, w.seconds, w.msgs_per_s_total, w.startup_ms
            ),
            Some(r) => outln!(
                "worker end-to-end    {:>9.0} msgs/s  (open loop at {r:.0} msgs/s offered; {:.2} s from first publish to last event)",
                w.msgs_per_s, w.seconds
            ),
        }
        if w.pairs.is_some() {
            outln!(
                "worker executions    {:>9.0} execs/s ({} executions, 2 messages each)",
                w.execs_per_s,
                self.executions
            );
        }
        if let Some(ratio) = self.ratio() {
            outln!("ratio worker/ceiling {ratio:>9.3}");
        }
        match &w.latency {
            Some(l) => outln!(
                "latency              p50 {:.2} ms  p99 {:.2} ms  max {:.2} ms  ({}{})",
                l.p50_ms,
                l.p99_ms,
                l.max_ms,
                if w.pairs.is_some() {
                    "an execution's later message published → its last balance.changed received"
                } else {
                    "publish → balance.changed received"
                },
                if self.rate.is_none() {
                    "; backlog mode: mostly time spent queued behind earlier messages"
                } else {
                    ""
                }
            ),
            None => outln!("latency              n/a"),
        }
        outln!("worker peak RSS      {:>9.1} MiB (VmHWM)", w.peak_rss_mib);
        if let Some(b) = &w.breakdown {
            outln!("worker breakdown     {b}");
        }
        self.print_verification()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    /// `bench`'s options alone, as the CLI parses them.
    #[derive(Parser)]
    pub(in crate::tools::bench) struct Cli {
        #[command(flatten)]
        pub args: BenchArgs,
    }

    /// The usage problem of `bench` with `args`, if any.
    pub(in crate::tools::bench) fn problem(args: &[&str]) -> Option<String> {
        let cli = Cli::try_parse_from(std::iter::once("bench").chain(args.iter().copied()));
        usage_problem(&cli.unwrap().args)
    }

    #[test]
    fn sizes_past_what_a_run_can_hold_are_usage_errors() {
        assert_eq!(problem(&["--messages", "100000000", "--users", "7"]), None);
        assert_eq!(
            problem(&["--pairs", "--messages", "18446744073709551614"]).as_deref(),
            Some("--messages must be between 1 and 100000000")
        );
        assert_eq!(
            problem(&["--users", "0"]).as_deref(),
            Some("--users must be between 1 and 100000000")
        );
        assert_eq!(
            problem(&["--sweep-users", "100000001"]).as_deref(),
            Some("--sweep-users must be between 1 and 100000000")
        );
    }
}
