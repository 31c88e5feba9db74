//! `credit-worker bench` end to end with small runs: a backlog (plain and pairs) and
//! `--sustained` with tiny steps (both searches and the half-rate step run), the worker's
//! ledger verified, the documented fields reported, the plot written and the scratch
//! database removed. Rates depend on the machine, so only the runs' counts, shape and
//! verification are checked.

use serde_json::Value;

use crate::helpers::*;

/// Runs `bench --sustained` with steps of 0.3 s between 300 and 600 msgs/s, plus `extra`.
async fn sustained(extra: &[&str]) -> (std::process::Output, Value) {
    let mut args = vec!["--sustained", "--users", "20"];
    args.extend([
        "--step-seconds",
        "0.3",
        "--start-rate",
        "300",
        "--max-rate",
        "600",
    ]);
    args.extend(extra);
    bench(&args).await
}

/// Runs `bench --json` with `args` against the local services.
async fn bench(args: &[&str]) -> (std::process::Output, Value) {
    let svc = services().await;
    let out = std::process::Command::new(binary())
        .args(["bench", "--json"])
        .args(args)
        .env_remove("CREDIT_WORKER_CONFIG")
        .env("DATABASE_URL", format!("{}/postgres", svc.pg_base))
        .env("AMQP_URL", &svc.amqp)
        .env("RUST_LOG", "error")
        .output()
        .expect("run the bench");
    let report: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "bench printed no JSON ({e}): {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out, report)
}

/// Every step of `search` published something and was judged.
fn assert_steps(search: &Value, what: &str) {
    let steps = search["steps"].as_array().expect(what);
    assert!(!steps.is_empty(), "{what}: no steps");
    for s in steps {
        assert!(s["messages"].as_u64().unwrap_or(0) > 0, "{what}: {s}");
        assert!(
            s["held"].is_boolean() && s["stopped_early"].is_boolean(),
            "{s}"
        );
        let rate = s["offered_msgs_per_s"].as_f64().unwrap_or(0.0);
        assert!((10.0..=600.0).contains(&rate), "{what}: {s}");
    }
}

#[tokio::test]
async fn sustained_runs_both_searches_verifies_and_plots() {
    let plot = std::env::temp_dir().join(format!("{}.svg", unique("bench_plot")));
    let plot_arg = plot.to_string_lossy().into_owned();
    let (out, r) = sustained(&["--plot", &plot_arg]).await;
    assert_eq!(out.status.code(), Some(0), "{r}");
    assert_eq!(r["mode"], "sustained");
    assert_eq!(r["verified"], true, "{r}");
    assert_steps(&r["broker"], "broker");
    assert_steps(&r["worker"], "worker");
    assert!(
        r["worker"]["peak_rss_mib"].as_f64().unwrap_or(0.0) > 0.0,
        "{r}"
    );
    let executions: u64 = r["worker"]["steps"]
        .as_array()
        .into_iter()
        .flatten()
        .chain(
            r["worker"]["half_rate"]
                .as_object()
                .map(|_| &r["worker"]["half_rate"]),
        )
        .filter_map(|s| s["executions"].as_u64())
        .sum();
    // The warm-up step's executions are verified too, but not reported.
    assert!(r["executions"].as_u64().unwrap_or(0) > executions, "{r}");
    // Verified already: an event per ledger row (charges, and any execution fees).
    assert!(
        r["events_received"].as_u64() >= r["executions"].as_u64(),
        "{r}"
    );
    let svg = std::fs::read_to_string(&plot).expect("the plot is written");
    let _ = std::fs::remove_file(&plot);
    assert!(svg.contains("<svg") && svg.contains("worker p99") && svg.contains("p99 bound"));
}

#[tokio::test]
async fn sustained_pairs_settle_every_execution() {
    let (out, r) = sustained(&["--pairs"]).await;
    assert_eq!(out.status.code(), Some(0), "{r}");
    assert_eq!(r["pairs"], true);
    assert_eq!(r["verified"], true, "{r}");
    let check = &r["pairs_check"];
    assert_eq!(check["settled"], r["executions"], "{r}");
    assert_eq!(check["charged_credits"], check["expected_credits"], "{r}");
    assert_steps(&r["worker"], "worker");
}

/// A backlog of 2,000 messages over 50 users (40 each: no execution fee is due): every one
/// decided and charged, one distinct event per ledger row, each billed to its own user.
#[tokio::test]
async fn a_backlog_run_is_verified_with_exact_counts() {
    let (out, r) = bench(&["--messages", "2000", "--users", "50"]).await;
    assert_eq!(out.status.code(), Some(0), "{r}");
    assert_eq!(r["mode"], "backlog");
    assert_eq!(r["verified"], true, "{r}");
    assert_eq!(
        (r["messages"].as_u64(), r["executions"].as_u64()),
        (Some(2000), Some(2000))
    );
    assert_eq!(
        (r["fees"].as_i64(), r["events_received"].as_u64()),
        (Some(0), Some(2000))
    );
    assert_eq!(r["latency_ms"]["samples"], 2000, "{r}");
    for key in ["worker_msgs_per_s", "ceiling_msgs_per_s", "ratio"] {
        assert!(r[key].as_f64().is_some_and(|x| x > 0.0), "{key}: {r}");
    }
}

/// Pairs in backlog: 1,000 executions settled once at the bench's own post-flight prices; an
/// event per ledger row (1,000 USAGE, and a SETTLE for each of the 900 whose start came
/// first: a post-flight price never equals the pre-flight one).
#[tokio::test]
async fn a_pairs_backlog_settles_every_execution_once() {
    let (out, r) = bench(&["--pairs", "--messages", "2000", "--users", "50"]).await;
    assert_eq!(out.status.code(), Some(0), "{r}");
    assert_eq!(r["verified"], true, "{r}");
    let check = &r["pairs"];
    assert_eq!(
        (check["settled"].as_u64(), check["overtaking"].as_u64()),
        (Some(1000), Some(100))
    );
    assert_eq!(check["charged_credits"], check["expected_credits"], "{r}");
    assert_eq!(r["events_received"], 1900, "{r}");
    assert_eq!(r["latency_ms"]["samples"], 1000, "{r}");
}

/// `credit-worker bench ARGS`, as it ends.
fn run_bench(args: &[&str]) -> std::process::Output {
    std::process::Command::new(binary())
        .arg("bench")
        .args(args)
        .output()
        .expect("run the bench")
}

/// Paths and rates are refused before anything runs (exit 2, or 1 for an unwritable path).
#[test]
fn bad_rates_and_paths_are_refused_before_the_run() {
    let run = run_bench;
    assert_eq!(
        run(&["--rate", "1e300", "--messages", "10"]).status.code(),
        Some(2)
    );
    let rate = run(&["--sustained", "--max-rate", "2e6"]);
    assert_eq!(rate.status.code(), Some(2));
    let too_many = run(&["--sustained", "--max-rate", "1e6", "--step-seconds", "200"]);
    assert_eq!(too_many.status.code(), Some(2));
    let unwritable = run(&["--messages", "10", "--timeline", "/nonexistent/dir/t.csv"]);
    assert_eq!(unwritable.status.code(), Some(1));
    let err = String::from_utf8_lossy(&unwritable.stderr);
    assert!(err.contains("cannot write /nonexistent/dir/t.csv"), "{err}");
    assert!(unwritable.stdout.is_empty(), "nothing was run");
}

#[test]
fn sustained_options_are_checked() {
    let run = |args: &[&str]| run_bench(args).status.code();
    assert_eq!(run(&["--sustained", "--plot", "x.png"]), Some(2));
    assert_eq!(run(&["--sustained", "--step-seconds", "0"]), Some(2));
    assert_eq!(run(&["--sustained", "--rate", "100"]), Some(2));
    assert_eq!(run(&["--step-seconds", "3"]), Some(2), "needs --sustained");
}
