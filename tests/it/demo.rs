//! `credit-worker demo` end to end: its story's exact figures, a clean audit, and its scratch
//! database removed afterwards, also when its report cannot be written.

use serde_json::Value;
use sqlx::PgPool;

use crate::helpers::*;

/// The two tests look at the same server's scratch databases: one at a time.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn demo(args: &[&str], stdout: std::process::Stdio, svc: &Services) -> std::process::Output {
    std::process::Command::new(binary())
        .arg("demo")
        .args(args)
        .env_remove("CREDIT_WORKER_CONFIG")
        .env("DATABASE_URL", format!("{}/postgres", svc.pg_base))
        .env("AMQP_URL", &svc.amqp)
        .env("RUST_LOG", "error")
        .stdout(stdout)
        .output()
        .expect("run the demo")
}

async fn scratch_databases(svc: &Services) -> Vec<String> {
    let admin = PgPool::connect(&format!("{}/postgres", svc.pg_base))
        .await
        .expect("connect to postgres");
    let names = sqlx::query_scalar(
        "SELECT datname::text FROM pg_database WHERE datname LIKE 'credit\\_demo\\_%'",
    )
    .fetch_all(&admin)
    .await
    .expect("list databases");
    admin.close().await;
    names
}

/// (user, balance, ledger rows) of a report's balance table.
fn balances(rows: &Value) -> Vec<(String, i64, i64)> {
    rows.as_array()
        .expect("balances")
        .iter()
        .map(|b| {
            let n = |k: &str| b[k].as_i64().unwrap_or(i64::MIN);
            (
                b["user_id"].as_str().unwrap_or("").to_owned(),
                n("balance"),
                n("ledger_rows"),
            )
        })
        .collect()
}

#[tokio::test]
async fn the_demo_tells_its_story_with_exact_figures_and_leaves_nothing() {
    let _one = ONE_AT_A_TIME.lock().await;
    let svc = services().await;
    let out = demo(&["--json"], std::process::Stdio::piped(), &svc);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let r: Value = serde_json::from_slice(&out.stdout).expect("the demo prints JSON");
    let published = &r["published"];
    assert_eq!(
        [
            &published["messages"],
            &published["node_executions"],
            &published["duplicates"],
            &published["invalid"],
            &published["completions"]
        ],
        [14, 9, 1, 1, 3]
    );
    let outcomes: Vec<&str> = r["decisions"]
        .as_array()
        .expect("decisions")
        .iter()
        .filter_map(|d| d["outcome"].as_str())
        .collect();
    assert_eq!(
        outcomes,
        [
            "charged", "charged", "free", "charged", "charged", "charged", "charged", "rejected",
            "charged"
        ]
    );
    let settled: Vec<(i64, i64, i64)> = r["settlements"]
        .as_array()
        .expect("settlements")
        .iter()
        .map(|s| {
            (
                s["pre"].as_i64().unwrap_or(0),
                s["post"].as_i64().unwrap_or(0),
                s["delta"].as_i64().unwrap_or(0),
            )
        })
        .collect();
    assert_eq!(settled, [(10, 24, 14), (9, 3, -6), (3, 98, 95)]);
    let user = |u: &str, b: i64, n: i64| (u.to_owned(), b, n);
    assert_eq!(
        balances(&r["balances"]),
        [
            user("alice", 870, 7),
            user("bob", 699, 2),
            user("carol", -12, 5)
        ]
    );
    assert_eq!(
        balances(&r["balances_after_refill"]),
        [
            user("alice", 870, 7),
            user("bob", 700, 3),
            user("carol", 700, 6)
        ]
    );
    assert_eq!(r["refill"]["users_refilled"], 2);
    assert_eq!(r["refill"]["credits_granted"], 713);
    assert_eq!(r["dead_letters"].as_array().map(Vec::len), Some(1));
    assert_eq!(r["events"].as_array().map(Vec::len), Some(19));
    let audit = &r["audit"];
    assert_eq!(
        [&audit["users"], &audit["transactions"], &audit["decisions"]],
        [3, 16, 9]
    );
    assert_eq!(audit["unpublished_events"], 0);
    assert_eq!(audit["mismatches"], serde_json::json!([]));
    let db = r["database"].as_str().expect("database").to_owned();
    assert!(
        !scratch_databases(&svc).await.contains(&db),
        "{db} left behind"
    );
}

/// A report that cannot be written (a full disk, a reader gone) is an error, exit 1, not a
/// panic; the scratch database is removed all the same. The JSON report is written at the end,
/// once the whole story ran in the scratch database.
#[tokio::test]
async fn a_demo_whose_report_cannot_be_written_fails_cleanly() {
    let _one = ONE_AT_A_TIME.lock().await;
    let svc = services().await;
    let before = scratch_databases(&svc).await;
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .expect("open /dev/full");
    let out = demo(&["--json"], full.into(), &svc);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("No space left on device"), "{stderr}");
    let left: Vec<String> = scratch_databases(&svc)
        .await
        .into_iter()
        .filter(|d| !before.contains(d))
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}
