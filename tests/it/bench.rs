//! `credit-worker bench --sustained` end to end with tiny steps: both searches and the
//! half-rate step run, the worker's ledger is verified, the documented fields are reported,
//! the plot is written and the scratch database is removed. Which rates hold depends on the
//! machine, so only the run's shape and its verification are checked.

use serde_json::Value;

use crate::helpers::*;

/// Runs `bench --sustained` with steps of 0.3 s between 300 and 600 msgs/s, plus `extra`.
async fn sustained(extra: &[&str]) -> (std::process::Output, Value) {
    let svc = services().await;
    let out = std::process::Command::new(binary())
        .args(["bench", "--json", "--sustained", "--users", "20"])
        .args([
            "--step-seconds",
            "0.3",
            "--start-rate",
            "300",
            "--max-rate",
            "600",
        ])
        .args(extra)
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

#[test]
fn sustained_options_are_checked() {
    let run = |args: &[&str]| {
        std::process::Command::new(binary())
            .arg("bench")
            .args(args)
            .output()
            .expect("run the bench")
            .status
            .code()
    };
    assert_eq!(run(&["--sustained", "--plot", "x.png"]), Some(2));
    assert_eq!(run(&["--sustained", "--step-seconds", "0"]), Some(2));
    assert_eq!(run(&["--sustained", "--rate", "100"]), Some(2));
    assert_eq!(run(&["--step-seconds", "3"]), Some(2), "needs --sustained");
}
