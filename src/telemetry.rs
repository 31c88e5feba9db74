//! Logs (`tracing`, text or JSON), Prometheus metrics and the HTTP endpoints `/metrics`,
//! `/healthz` and `/readyz`.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;
use crate::health::Health;

/// Whether the installed subscriber writes JSON lines.
static JSON_LOGS: AtomicBool = AtomicBool::new(false);

/// Whether logs are JSON lines, so that a last word of the process must be one too.
pub(crate) fn logs_json() -> bool {
    JSON_LOGS.load(Ordering::Relaxed)
}

/// Installs the global subscriber; later calls are no-ops (tests start many workers).
/// `default` applies when RUST_LOG is unset.
///
/// Lines go to stderr through a thread of their own ([`crate::logs`]): a log reader that
/// stalls would otherwise block every task that logs, billing and the stop included.
pub(crate) fn init_logging(format: LogFormat, default: &str) {
    let set = std::env::var("RUST_LOG")
        .ok()
        .filter(|v| !v.trim().is_empty());
    let (filter, unread) = match set.as_deref().map(EnvFilter::try_new) {
        Some(Ok(filter)) => (filter, None),
        Some(Err(e)) => (EnvFilter::new(default), Some(e)),
        None => (EnvFilter::new(default), None),
    };
    // Colour only for a person: escape codes in a log file or a pipe are noise.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(|| crate::logs::Line)
        // Its report of a failed write goes to stderr, and panics when that fails too.
        .log_internal_errors(false);
    let installed = match format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Text => builder.try_init(),
    };
    if installed.is_ok() {
        JSON_LOGS.store(matches!(format, LogFormat::Json), Ordering::Relaxed);
        // Said, not only ignored: an operator who asked for debug lines would wait for them.
        if let Some(e) = unread {
            tracing::warn!(error = %e, default, "RUST_LOG is not a filter; logging at the default levels");
        }
        // A panic is logged like any other error, so it is a JSON line with `log.format =
        // json` rather than free text in the middle of the log.
        std::panic::set_hook(Box::new(|info| {
            let location = info.location().map(|l| l.to_string()).unwrap_or_default();
            tracing::error!(panic = %panic_text(info.payload()), %location, "panic");
        }));
    }
}

/// A panic's message, when it carries one.
pub(crate) fn panic_text(payload: &(dyn std::any::Any + Send)) -> &str {
    payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)")
}

/// The process-wide Prometheus recorder.
pub fn metrics_handle() -> Option<PrometheusHandle> {
    static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let buckets = [
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
            ];
            PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &buckets)
                .ok()?
                .set_buckets_for_metric(
                    Matcher::Full("credit_batch_size".into()),
                    &[1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0],
                )
                .ok()?
                .install_recorder()
                .ok()
                .inspect(spawn_upkeep)
                .inspect(|_| describe())
        })
        .clone()
}

/// A counter's label and its known values: a series of each is shown from the start.
type Known = Option<(&'static str, &'static [&'static str])>;

/// Every counter: its name, its `# HELP` text, and its label with the known values.
#[rustfmt::skip]
const COUNTERS: [(&str, &str, Known); 21] = [
    ("credit_messages_total", "Messages by outcome.",
     Some(("outcome", &["charged", "free", "rejected", "duplicate", "invalid", "settled"]))),
    ("credit_dead_lettered_total", "Messages moved to the dead letters.", None),
    ("credit_dead_letters_refused_total", "Dead letters the broker refused (nack), each published again after a pause while billing waits: the dead-letter queue full and refusing publishes, say.", None),
    ("credit_producers_refused_total", "Messages refused for their producer (amqp.allowed_producers).", None),
    ("credit_conflicting_duplicates_total", "Repeated node executions naming another user or block than the stored decision.", None),
    ("credit_credits_charged_total", "Credits debited by decisions, fees and settlements.", None),
    ("credit_credits_refunded_total", "Credits given back by settlements (runs that cost less than their pre-flight price); refunds of purchases are REFUND rows, not counted here.", None),
    ("credit_credits_uncollected_total", "Post-flight credits not collected (settlement.allow_debt = false).", None),
    ("credit_decide_retries_total", "Decision transactions retried after a fault that may clear.", None),
    ("credit_decide_reordered_total", "Batches rolled back and decided again after an earlier batch in flight that failed, or that names the same node executions for other users.", None),
    ("credit_defects_total", "Messages (dead-lettered) and commands (answered internal) lost to a caught panic, one each.",
     Some(("stage", &["decide", "control"]))),
    ("credit_events_published_total", "Events published by this worker's outbox relay.", None),
    ("credit_events_refused_total", "Events the broker refused (nack) to this worker's outbox relay, each published again after a pause: a queue bound to the events exchange full and refusing publishes, say.", None),
    ("credit_outbox_pruned_total", "Published outbox rows deleted past outbox.retention_s.", None),
    ("credit_outbox_prune_errors_total", "Outbox prunes that failed.", None),
    ("credit_refill_runs_total", "Refill sweeps completed.", None),
    ("credit_refill_users_total", "Monthly refill grants.", None),
    ("credit_refill_credits_total", "Credits granted by monthly refills.", None),
    ("credit_broker_reconnects_total", "Sessions (a failed connect included) ended by a fault of the broker or, for the outbox relay, the database, and retried, by session.",
     Some(("session", &["consumer", "control", "outbox relay"]))),
    ("credit_log_lines_lost_total", "Log lines lost: dropped while stderr stalled (8,192 waiting) or refused by it (closed); the worker goes on without them.", None),
    // Its command and result labels make too many series to show before they occur.
    ("credit_control_commands_total", "Control commands by command and result.",
     Some(("command", &[]))),
];

/// Every gauge and histogram: its name and `# HELP` text (those named `_seconds` in seconds);
/// a gauge also with its value until first set.
#[rustfmt::skip]
const GAUGES: [(&str, &str, f64); 5] = [
    ("credit_consuming", "1 while the input queue is consumed.", 0.0),
    // These four are read afresh before every scrape's render (the oldest batch's age from
    // `Health`, 0 when none is in flight). The backlog and the offset are unknown until the
    // database is first read: 0 would say "nothing waits" or "in sync" through an outage that
    // began before the worker did. The outbox's age grows from the start
    // (`outbox::BacklogGauges`).
    ("credit_oldest_batch_seconds", "How long the oldest batch in flight has waited for its decision and ack; 0 when none is. One that only grows means decisions stopped.", 0.0),
    ("credit_clock_offset_seconds", "This host's clock minus the database server's, read every 2 s; refill months and fee days are taken from this host's.", f64::NAN),
    ("credit_outbox_backlog", "Events not yet published.", f64::NAN),
    ("credit_outbox_oldest_unpublished_seconds", "How long the next event to publish has waited; one that only grows means events stopped.", 0.0),
];
#[rustfmt::skip]
const HISTOGRAMS: [(&str, &str); 6] = [
    ("credit_batch_size", "Messages per decision batch."),
    ("credit_decide_transaction_seconds", "A batch from the start of its decision to its commit."),
    ("credit_decide_seconds", "A batch from the start of its decision to its ack."),
    ("credit_ack_seconds", "A batch's acks."),
    ("credit_outbox_publish_lag_seconds", "An event from the ledger change that wrote it to the broker's confirm of its publish."),
    ("credit_outbox_publish_seconds", "One relay round's publish and confirms."),
];

/// Describes every metric (its `# HELP` line) and registers it, counters of known label
/// values at 0, so a scrape shows them from the start: a dashboard or an alert on `rate()`
/// sees 0 instead of no data until the first message. docs/contract.md §10 lists them.
fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    for (name, help, known) in COUNTERS {
        describe_counter!(name, help);
        match known {
            None => metrics::counter!(name).absolute(0),
            Some((label, values)) => {
                for &value in values {
                    metrics::counter!(name, label => value).absolute(0);
                }
            }
        }
    }
    for (name, help, initial) in GAUGES {
        match name.ends_with("_seconds") {
            true => describe_gauge!(name, Unit::Seconds, help),
            false => describe_gauge!(name, help),
        }
        metrics::gauge!(name).set(initial);
    }
    for (name, help) in HISTOGRAMS {
        match name.ends_with("_seconds") {
            true => describe_histogram!(name, Unit::Seconds, help),
            false => describe_histogram!(name, help),
        }
        let _ = metrics::histogram!(name);
    }
}

/// Upkeeps the recorder has run; see [`spawn_upkeep`].
static UPKEEPS: AtomicU64 = AtomicU64::new(0);

/// Drains the histograms' samples into their buckets every few seconds. The recorder keeps
/// every sample until a scrape or an upkeep takes it, so without this a worker that nobody
/// scrapes (`http.listen` empty, or no Prometheus) would grow by every batch it decides. A
/// plain thread: it needs no runtime, and metrics may be installed before one exists.
fn spawn_upkeep(handle: &PrometheusHandle) {
    let handle = handle.clone();
    let spawned = std::thread::Builder::new()
        .name("metrics-upkeep".into())
        .spawn(move || loop {
            handle.run_upkeep();
            UPKEEPS.fetch_add(1, Ordering::Relaxed);
            std::thread::sleep(Duration::from_secs(5));
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot start the metrics upkeep; histograms grow until scraped");
    }
}

#[derive(Clone)]
struct HttpState {
    health: Arc<Health>,
    /// `http.stall_s`: when the oldest batch in flight makes the consumer stalled.
    stall_after: Option<Duration>,
    pool: PgPool,
    /// `/readyz`'s own connection ([`crate::db::probe_pool`]).
    probe: PgPool,
    metrics: Option<PrometheusHandle>,
    backlog: Arc<crate::outbox::BacklogGauges>,
}

/// Serves the endpoints on a bound listener until `cancel` fires.
pub(crate) async fn serve_on(
    listener: tokio::net::TcpListener,
    (health, stall_after): (Arc<Health>, Option<Duration>),
    (pool, probe): (PgPool, PgPool),
    cancel: CancellationToken,
) -> anyhow::Result<()> {
    let state = HttpState {
        health,
        stall_after,
        pool,
        probe,
        metrics: metrics_handle(),
        backlog: Arc::default(),
    };
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(state);
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "http endpoints up");
    }
    crate::http::serve(listener, app, cancel).await;
    Ok(())
}

/// How long `/readyz` and `/metrics` wait for the database: under a second, Kubernetes' default
/// probe timeout, so a database that does not answer is reported (`database: down`, the
/// metrics read before) rather than the probe timing out with nothing said.
const DATABASE_PROBE: Duration = Duration::from_millis(700);

async fn metrics(State(s): State<HttpState>) -> (StatusCode, String) {
    // Read now: the relay cannot refresh it while the broker is out, when it matters most.
    s.backlog.refresh(&s.pool, DATABASE_PROBE).await;
    let age = s.health.oldest_batch_age().unwrap_or_default();
    metrics::gauge!("credit_oldest_batch_seconds").set(age.as_secs_f64());
    metrics::counter!("credit_log_lines_lost_total").absolute(crate::logs::lines_lost());
    match &s.metrics {
        Some(h) => (StatusCode::OK, h.render()),
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            "no metrics recorder\n".into(),
        ),
    }
}

async fn readyz(State(s): State<HttpState>) -> (StatusCode, String) {
    let db = tokio::time::timeout(DATABASE_PROBE, crate::db::ping(&s.probe))
        .await
        .unwrap_or(false);
    match s.health.readiness(db, s.stall_after) {
        (true, body) => (StatusCode::OK, body),
        (false, body) => (StatusCode::SERVICE_UNAVAILABLE, body),
    }
}

#[cfg(test)]
mod tests {
    use super::panic_text;

    /// The recorder drains its histograms by itself, scraped or not.
    #[test]
    fn the_recorder_runs_its_upkeep_unscraped() {
        assert!(super::metrics_handle().is_some());
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while super::UPKEEPS.load(std::sync::atomic::Ordering::Relaxed) < 2 {
            assert!(std::time::Instant::now() < deadline, "no upkeep ran");
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    /// Every counter of a known label value shows from the start, described.
    #[test]
    fn metrics_show_from_the_start() {
        let text = super::metrics_handle().map(|h| h.render()).unwrap();
        for series in [
            "credit_messages_total{outcome=\"charged\"}",
            "credit_messages_total{outcome=\"settled\"}",
            "credit_credits_charged_total",
            "credit_refill_users_total",
            "credit_defects_total{stage=\"decide\"}",
            "credit_broker_reconnects_total{session=\"outbox relay\"}",
            "# HELP credit_decide_seconds A batch from the start of its decision to its ack.",
            "# HELP credit_outbox_backlog Events not yet published.",
            // No scrape here reads the database: unknown, not 0.
            "credit_outbox_backlog NaN\n",
            "credit_batch_size_bucket{le=\"1000\"}",
        ] {
            assert!(text.contains(series), "{series} missing from:\n{text}");
        }
    }

    #[test]
    fn a_panics_message_is_read_from_either_payload() {
        let caught = |f: fn()| std::panic::catch_unwind(f).unwrap_err();
        let literal = caught(|| panic!("plain"));
        assert_eq!(panic_text(literal.as_ref()), "plain");
        let formatted = caught(|| panic!("batch {}", 7));
        assert_eq!(panic_text(formatted.as_ref()), "batch 7");
        let other = caught(|| std::panic::panic_any(42_u8));
        assert_eq!(panic_text(other.as_ref()), "(no message)");
    }
}
