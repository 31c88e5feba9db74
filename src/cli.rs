//! The command line (docs/contract.md §9). Each command calls the library and prints human output or,
//! with `--json`, the same result objects as the control queue. Exit codes: 0 ok, 1 failure,
//! 2 usage error.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use chrono::Utc;
use clap::{Args, Parser, Subcommand};
use serde_json::json;

use crate::clock::SystemClock;
use crate::config::Settings;
use crate::ledger::{
    HistoryQuery, Ledger, LedgerError, Transaction, TxType, DEFAULT_HISTORY_LIMIT,
    MAX_HISTORY_LIMIT,
};
use crate::refill::Month;
use crate::signal::StopSignals;
use crate::tools::dead_letters::printable;
use crate::tools::NotFound;

#[derive(Debug, Parser)]
#[command(
    name = "credit-worker",
    version,
    about = "Bills AI-workflow node executions in credits"
)]
pub(crate) struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Args)]
pub(crate) struct Global {
    /// Configuration file (overrides the built-in defaults; env CREDIT_WORKER_CONFIG).
    #[arg(long, global = true, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Print machine-readable JSON.
    #[arg(long, global = true)]
    pub json: bool,
}

/// The page `history` prints (the control command's fields).
#[derive(Debug, Args)]
pub struct HistoryArgs {
    /// Rows per page, 1 to 1000.
    #[arg(long, default_value_t = DEFAULT_HISTORY_LIMIT,
          value_parser = clap::value_parser!(i64).range(1..=MAX_HISTORY_LIMIT))]
    limit: i64,
    /// Only rows older than this seq: the previous page's "next" hint.
    #[arg(long, value_parser = clap::value_parser!(i64).range(1..))]
    before_seq: Option<i64>,
    /// Only rows of this type.
    #[arg(long = "type", value_name = "TYPE",
          value_parser = ["TOP_UP", "USAGE", "GRANT", "REFUND"])]
    tx_type: Option<String>,
    /// Only rows of this graph execution (metadata.graph_exec_id).
    #[arg(long)]
    graph_exec_id: Option<String>,
}

impl HistoryArgs {
    fn query(self) -> anyhow::Result<HistoryQuery> {
        let tx_type = match self.tx_type {
            Some(name) => Some(
                name.parse::<TxType>()
                    .map_err(|e| anyhow::anyhow!("type: {e}"))?,
            ),
            None => None,
        };
        Ok(HistoryQuery {
            limit: self.limit,
            before_seq: self.before_seq,
            tx_type,
            graph_exec_id: self.graph_exec_id,
        })
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the service: consumer, outbox relay, scheduler, control queue, HTTP.
    Run,
    /// Apply database migrations (creating the database if needed).
    Migrate {
        /// Also make this database the ledger of the configured amqp.namespace, moving it
        /// from the namespace it served, and mark the namespace on the broker as its. Stop
        /// every worker of the old namespace first.
        #[arg(long)]
        rebind_namespace: bool,
        /// Also say that this database, gone back in time (a restore, or a failover to a
        /// standby behind), is the ledger from here on: the broker's record of how far its
        /// events were published is set back to the database's, so workers bill into it and
        /// publish its events again. Follow docs/reliability.md's "After a restore or a
        /// failover" first, every worker stopped.
        #[arg(long)]
        after_restore: bool,
    },
    /// Run one refill sweep, then exit.
    Sweep {
        /// Month to refill (YYYY-MM); default: the current month (UTC).
        #[arg(long)]
        month: Option<Month>,
        /// Refill only this user.
        #[arg(long)]
        user: Option<String>,
    },
    /// Print a user's balance.
    Balance { user: String },
    /// Print a user's account as it stands (balance, refill month, auto top-up and its
    /// outstanding request) without creating or refilling it; exit 1 when there is none.
    Account { user: String },
    /// Print a page of a user's ledger rows, newest first.
    History {
        user: String,
        #[command(flatten)]
        page: HistoryArgs,
    },
    /// Add purchased credits (TOP_UP).
    TopUp {
        user: String,
        #[arg(allow_negative_numbers = true, value_parser = parse_credits)]
        amount: Credits,
        /// Idempotency key: the same key again changes nothing.
        #[arg(long)]
        key: Option<String>,
    },
    /// Add granted credits (GRANT).
    Grant {
        user: String,
        #[arg(allow_negative_numbers = true, value_parser = parse_credits)]
        amount: Credits,
        /// Idempotency key: the same key again changes nothing.
        #[arg(long)]
        key: Option<String>,
        /// Why, kept in the ledger row's metadata.
        #[arg(long)]
        reason: Option<String>,
    },
    /// Take back credits of a purchase that was refunded or lost in a dispute (REFUND); the
    /// balance may fall below 0.
    Refund {
        user: String,
        #[arg(allow_negative_numbers = true, value_parser = parse_credits)]
        amount: Credits,
        /// The refund's or dispute's id: the same key again changes nothing.
        #[arg(long)]
        key: String,
        /// The key of the TOP_UP it refunds.
        #[arg(long)]
        top_up_key: String,
        /// Why, kept in the ledger row's metadata.
        #[arg(long)]
        reason: Option<String>,
    },
    /// Set or remove a user's auto top-up (a `top_up.requested` when the balance falls below
    /// the threshold).
    #[command(group(clap::ArgGroup::new("setting").required(true).args(["threshold", "off"])))]
    #[command(
        override_usage = "credit-worker auto-top-up <USER> (--threshold <N> --amount <M> | --off)"
    )]
    AutoTopUp {
        user: String,
        /// Request a top-up when the balance falls below this many credits.
        #[arg(long, value_name = "N", requires = "amount", allow_negative_numbers = true, value_parser = parse_credits)]
        threshold: Option<Credits>,
        /// Credits each request asks the payment side to add.
        #[arg(long, value_name = "M", requires = "threshold", allow_negative_numbers = true, value_parser = parse_credits)]
        amount: Option<Credits>,
        /// Remove the user's auto top-up.
        #[arg(long, conflicts_with_all = ["threshold", "amount"])]
        off: bool,
    },
    /// Print a node execution's decision and settlement; exit 1 when it has none yet.
    Outcome { node_exec_id: String },
    /// Reconcile ledger and balances; exit 1 on any mismatch.
    Audit,
    /// A month's report for the books: credits in and out by type, and what the accounts held
    /// and owed at its start and end.
    Report {
        /// Month (YYYY-MM, UTC); default: the current month, to date.
        #[arg(long)]
        month: Option<Month>,
    },
    /// Inspect or replay the dead-letter queue (`node_execution.dead`).
    DeadLetters {
        #[command(subcommand)]
        action: DeadLettersCommand,
    },
    /// Publish NodeExecutionEntry JSON lines (a file, or - for stdin) to the input queue.
    Publish { file: String },
    /// Send again events the outbox keeps (`outbox.retention_s`), for a subscriber that lost
    /// them.
    Events {
        #[command(subcommand)]
        action: EventsCommand,
    },
    /// End-to-end benchmark against the broker's own ceiling.
    Bench(crate::tools::bench::BenchArgs),
    /// A short realistic run in a scratch namespace and database, then a summary.
    Demo,
}

#[derive(Debug, Subcommand)]
pub enum DeadLettersCommand {
    /// Show dead messages (node_exec_id, reason, time of death, producer, body excerpt)
    /// without removing them.
    List {
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// Publish dead messages back to the input queue, removing each once the broker confirmed it.
    Replay(ReplayArgs),
}

#[derive(Debug, Subcommand)]
pub enum EventsCommand {
    /// Publish again the events already published and stamped at TIME or later, to every
    /// subscriber (the events exchange) or to one queue; each keeps its event_id.
    Republish {
        /// RFC 3339, e.g. 2026-12-07T00:00:00Z.
        #[arg(long, value_name = "TIME")]
        since: chrono::DateTime<Utc>,
        /// Send to this queue only (through the default exchange), not to every subscriber.
        #[arg(long, value_name = "QUEUE")]
        to_queue: Option<String>,
        /// Count what would be sent; send nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("which").required(true).args(["node_exec_id", "all"])))]
pub struct ReplayArgs {
    /// Replay the dead messages of this node execution.
    #[arg(long)]
    pub node_exec_id: Option<String>,
    /// Replay every dead message.
    #[arg(long)]
    pub all: bool,
    /// Print what would be replayed; change nothing.
    #[arg(long)]
    pub dry_run: bool,
}

/// Writes the log lines still queued when `main` ends, by a return or a panic (after the
/// runtime, declared later, is dropped).
struct FlushLogs;

impl Drop for FlushLogs {
    fn drop(&mut self) {
        crate::logs::flush();
    }
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let _logs = FlushLogs;
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            // A script that asked for JSON reads its failure as JSON too.
            if e.use_stderr() && std::env::args_os().any(|a| a == "--json") {
                let _ = writeln!(std::io::stdout(), "{}", usage_error_json(&e));
            }
            return if e.use_stderr() {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let json = cli.global.json;
    match runtime.block_on(execute(cli)) {
        Ok(code) => code,
        Err(e) => {
            last_word(&error_text(&e));
            if json {
                let error = json!({"code": error_code(&e), "message": error_text(&e)});
                let _ = writeln!(std::io::stdout(), "{}", json!({ "error": error }));
            }
            ExitCode::FAILURE
        }
    }
}

/// The error the process exits with, on stderr. Best effort: the exit code says it failed
/// even where nothing can be written. In a log of JSON lines, the last one is JSON too, and
/// written even when `RUST_LOG` filters the log out.
fn last_word(error: &str) {
    // Queued after every line the log holds (and, but through the log, never dropped for
    // want of room); written before the process ends (`FlushLogs`).
    if !crate::telemetry::logs_json() {
        crate::logs::last_line(format!("error: {error}\n"));
    } else if tracing::enabled!(tracing::Level::ERROR) {
        tracing::error!(error, "exiting");
    } else {
        let line = json!({"level": "ERROR", "message": "exiting", "error": error});
        crate::logs::last_line(format!("{line}\n"));
    }
}

/// A usage error as `--json` prints a failure: `bad_request`, with clap's message up to its
/// usage lines, on one line.
fn usage_error_json(e: &clap::Error) -> serde_json::Value {
    // clap prints the command's help for a missing subcommand: its first lines describe the
    // command, not what is wrong.
    if e.kind() == clap::error::ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
        let message = "a subcommand is required (see --help)";
        return json!({"error": {"code": "bad_request", "message": message}});
    }
    let text = e.to_string();
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .take_while(|l| !l.is_empty() && !l.starts_with("Usage:"))
        .collect();
    let joined = lines.join(" ");
    let message = joined.strip_prefix("error: ").unwrap_or(&joined);
    json!({"error": {"code": "bad_request", "message": message}})
}

/// A request the control queue would answer with `bad_request`.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct BadRequest(String);

/// A failed command's code as the control queue names it (SPEC §8), for `--json`.
fn error_code(e: &anyhow::Error) -> &'static str {
    if e.downcast_ref::<NotFound>().is_some() {
        return "not_found";
    }
    // An operator's mistake, not a defect: a configuration refused, a database not there or
    // not this build's, a server too old, a file that does not read.
    if e.downcast_ref::<BadRequest>().is_some()
        || e.downcast_ref::<crate::config::ConfigError>().is_some()
        || e.chain().any(|c| c.is::<crate::db::ServerTooOld>())
        || e.downcast_ref::<crate::amqp::Refused>().is_some()
    {
        return "bad_request";
    }
    match e.downcast_ref::<crate::db::NotReady>() {
        Some(crate::db::NotReady::Missing(_)) => return "not_found",
        Some(crate::db::NotReady::Sql(_)) | None => {}
        Some(_) => return "bad_request",
    }
    match e.downcast_ref::<LedgerError>() {
        Some(l) => crate::control::ControlError::code_of(l),
        None => "internal",
    }
}

/// An error and its causes for a person, each cause once. Many error types (this crate's,
/// sqlx's) put their source's text in their own message ("database: {0}") and also expose it
/// as `source()`, so `{:#}` would print such a cause twice ("database: X: X").
pub(crate) fn error_text(e: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in e.chain() {
        let message = cause.to_string();
        if message.is_empty() || text.contains(&message) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&message);
    }
    text
}

/// An integer amount of credits as given on the command line: its value, or its digits when
/// no i64 holds it (refused then as the control queue refuses it, not as a usage error).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credits(Result<i64, String>);

fn parse_credits(text: &str) -> Result<Credits, String> {
    if let Ok(v) = text.parse::<i64>() {
        return Ok(Credits(Ok(v)));
    }
    let digits = text.strip_prefix('-').unwrap_or(text);
    if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
        return Ok(Credits(Err(text.to_owned())));
    }
    Err(format!("{text:?} is not an integer"))
}

/// An amount given on the command line, or `amount_out_of_range` when no balance holds it.
fn credits(name: &'static str, amount: Credits) -> anyhow::Result<i64> {
    amount.0.map_err(|digits| {
        ledger_error(LedgerError::AmountOutOfRange(format!(
            "{name}: {digits} is beyond the 64-bit integer range"
        )))
    })
}

fn ledger_error(e: LedgerError) -> anyhow::Error {
    anyhow::anyhow!(e)
}

async fn execute(cli: Cli) -> anyhow::Result<ExitCode> {
    // `run` catches SIGTERM and SIGINT from its first moment, before the configuration is
    // read: a stop during start-up is then a clean exit, not the signal's default action.
    // The other commands keep the default: caught, a Ctrl-C would be ignored where nothing
    // waits for it.
    let signals = matches!(cli.command, Command::Run).then(StopSignals::install);
    let settings = Settings::load(cli.global.config.as_deref())?;
    crate::telemetry::init_logging(settings.log.format, default_log_level(&cli.command));
    // The commands an upgrade is checked with (README): `run` checks them as it starts, and
    // the rest do not read them, so a host that only runs those need not hold the files.
    if matches!(
        cli.command,
        Command::Migrate { .. } | Command::Outcome { .. }
    ) {
        crate::service::check_inputs(&settings, crate::clock::wall_now())?;
    }
    let json = cli.global.json;
    match cli.command {
        Command::Run => run(settings, signals.unwrap_or_else(StopSignals::install)).await,
        Command::Migrate {
            rebind_namespace,
            after_restore,
        } => migrate(&settings, json, rebind_namespace, after_restore).await,
        Command::Sweep { month, user } => sweep(&settings, json, month, user).await,
        Command::Balance { user } => balance(&settings, json, &user).await,
        Command::Account { user } => account(&settings, json, &user).await,
        Command::History { user, page } => history(&settings, json, &user, page.query()?).await,
        Command::TopUp { user, amount, key } => {
            let amount = credits("amount", amount)?;
            credit(&settings, json, TxType::TopUp, &user, amount, key, None).await
        }
        Command::Grant {
            user,
            amount,
            key,
            reason,
        } => {
            let amount = credits("amount", amount)?;
            credit(&settings, json, TxType::Grant, &user, amount, key, reason).await
        }
        Command::Refund {
            user,
            amount,
            key,
            top_up_key,
            reason,
        } => {
            let amount = credits("amount", amount)?;
            let keys = (key.as_str(), top_up_key.as_str());
            refund(&settings, json, &user, amount, keys, reason).await
        }
        Command::AutoTopUp {
            user,
            threshold,
            amount,
            off: _,
        } => auto_top_up(&settings, json, &user, threshold.zip(amount)).await,
        Command::Outcome { node_exec_id } => outcome(&settings, json, &node_exec_id).await,
        Command::Audit => audit(&settings, json).await,
        Command::Report { month } => report(&settings, json, month).await,
        Command::DeadLetters { action } => dead_letters(&settings, json, action).await,
        Command::Publish { file } => publish(&settings, json, &file).await,
        Command::Events { action } => events(&settings, json, action).await,
        Command::Bench(args) => crate::tools::bench::run(settings, args, json).await,
        Command::Demo => crate::tools::demo::run(settings, json).await,
    }
}

/// Commands that print their own report keep the library's logs out of it: what the worker
/// warns about there (the demo's invalid body, slow bulk loads) is scripted or reported
/// anyway. The other one-shot commands report a broker's refusal in their own error, so the
/// AMQP client's log of it (a missing queue closes its channel) is left out. The worker
/// reports a returned message itself (the publish fails and says so); the client's own line
/// would print the whole message, body and headers, a prompt included. RUST_LOG still
/// applies.
fn default_log_level(command: &Command) -> &'static str {
    match command {
        Command::Demo | Command::Bench(_) => "error",
        Command::Run => "info,sqlx=warn,lapin::returned_messages=off",
        _ => "info,sqlx=warn,lapin=off",
    }
}

/// How long after the first stop signal another one counts as a second request.
const SECOND_SIGNAL_AFTER: std::time::Duration = std::time::Duration::from_secs(1);

async fn run(settings: Settings, signals: StopSignals) -> anyhow::Result<ExitCode> {
    crate::telemetry::metrics_handle();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        let mut signals = signals;
        signals.recv().await;
        tracing::info!("signal received; shutting down (a second one stops at once)");
        stop.cancel();
        // One stop often arrives as two signals at once (Ctrl-C in a terminal and SIGTERM from
        // a process manager): only a signal a moment later is a second request.
        let first = std::time::Instant::now();
        loop {
            signals.recv().await;
            if first.elapsed() >= SECOND_SIGNAL_AFTER {
                break;
            }
        }
        // Nothing is lost by stopping at once: what is not acked is delivered again, and
        // the outbox keeps what is not published.
        tracing::error!("second signal: stopping at once, without draining");
        crate::logs::flush();
        std::process::exit(1);
    });
    let worker = match crate::service::Worker::start_with(settings, shutdown.clone()).await {
        Ok(w) => w,
        // Stopped by a signal while waiting for the database: a clean exit.
        Err(_) if shutdown.is_cancelled() => return Ok(ExitCode::SUCCESS),
        Err(e) => return Err(e),
    };
    worker.wait().await?;
    Ok(ExitCode::SUCCESS)
}

async fn migrate(
    settings: &Settings,
    json: bool,
    rebind: bool,
    after_restore: bool,
) -> anyhow::Result<ExitCode> {
    let database = crate::db::database_name(&settings.database);
    let pool = crate::db::connect_and_migrate(&settings.database)
        .await
        .map_err(|e| crate::db::NotReady::of(e, &database))?;
    // One answer for both parts: `--json` prints a single object.
    let mut out = serde_json::Map::from_iter([("migrated".to_owned(), json!(true))]);
    let mut text = vec!["migrations applied".to_owned()];
    // Each part bounded as the worker's statements are: a database gone silent ends it.
    let stall = crate::db::stall_bound(&settings.database);
    if rebind {
        let (fields, line) = crate::db::bounded(stall, rebind_namespace(settings, &pool)).await?;
        out.extend(fields);
        text.push(line);
    }
    if after_restore {
        let (fields, line) = crate::db::bounded(stall, resume_after_restore(settings, &pool))
            .await
            .map_err(|e| match rebind {
                true => e.context("the namespace was bound again; the restore's part failed"),
                false => e,
            })?;
        out.extend(fields);
        text.push(line);
    }
    print_out(json, &serde_json::Value::Object(out), || text.join("; "))?;
    Ok(ExitCode::SUCCESS)
}

/// A part of `migrate`'s answer: its JSON fields and its text.
type Part = (serde_json::Map<String, serde_json::Value>, String);

/// `migrate --rebind-namespace`'s part.
async fn rebind_namespace(settings: &Settings, pool: &sqlx::PgPool) -> anyhow::Result<Part> {
    let r = crate::tools::rebind::run(settings, pool).await?;
    let fields = json!({"ledger_id": r.ledger_id, "namespace": r.namespace, "before": r.before});
    let before = match &r.before {
        Some(b) if *b == r.namespace => format!("already {b:?}"),
        Some(b) => format!("was {b:?}"),
        None => "none before".to_owned(),
    };
    let text = format!(
        "ledger {} now serves namespace {:?} ({before}), marked so on the broker",
        r.ledger_id, r.namespace
    );
    Ok((object(fields), text))
}

/// `migrate --after-restore`'s part.
async fn resume_after_restore(settings: &Settings, pool: &sqlx::PgPool) -> anyhow::Result<Part> {
    let r = crate::tools::restored::run(settings, pool).await?;
    let fields =
        json!({"ledger_id": r.ledger_id, "recorded": r.recorded, "watermark": r.watermark});
    let recorded = match r.recorded {
        Some(n) => format!("the broker had recorded {n}"),
        None => "the broker had no record of it".to_owned(),
    };
    let text = format!(
        "ledger {} goes on from its outbox watermark {} ({recorded}): workers bill into it, \
         and its events after the watermark go out",
        r.ledger_id, r.watermark
    );
    Ok((object(fields), text))
}

/// The fields of a JSON object built with `json!`.
fn object(v: serde_json::Value) -> serde_json::Map<String, serde_json::Value> {
    match v {
        serde_json::Value::Object(m) => m,
        _ => serde_json::Map::new(),
    }
}

async fn sweep(
    settings: &Settings,
    json: bool,
    month: Option<Month>,
    user: Option<String>,
) -> anyhow::Result<ExitCode> {
    if !settings.refill.enabled {
        return Err(BadRequest("refill is disabled (refill.enabled is false)".into()).into());
    }
    let pool = crate::db::connect_existing(&settings.database).await?;
    crate::clock::check_against_database(&pool).await?;
    let policy = crate::ledger::RefillPolicy {
        target: settings.refill.target,
    };
    let (user, chunk) = (user.as_deref(), settings.refill.chunk_size);
    let report = crate::refill::sweep_asked(
        crate::refill::Sweeper::new(&pool, &settings.database),
        policy,
        month,
        Utc::now(),
        user,
        chunk,
        |r| sweep_progress(json, r),
    )
    .await
    .map_err(ledger_error)?;
    // The `refill` command's result object (SPEC §8); the rest goes to the log.
    let result = json!({
        "month": report.month,
        "users_refilled": report.users_refilled,
        "credits_granted": crate::ledger::total::serialize_total(
            &report.credits_granted,
            serde_json::value::Serializer,
        )?,
    });
    if json {
        tracing::info!(
            users_evaluated = report.users_evaluated,
            duration_ms = report.duration_ms,
            "refill sweep done"
        );
    }
    print_out(json, &result, || {
        format!(
            "month {}: {} users refilled, {} credits granted ({} users evaluated, {} ms)",
            report.month,
            report.users_refilled,
            report.credits_granted,
            report.users_evaluated,
            report.duration_ms
        )
    })?;
    Ok(ExitCode::SUCCESS)
}

/// A sweep's running totals on stderr, for a person watching (not with `--json`).
fn sweep_progress(json: bool, r: &crate::refill::SweepReport) {
    // Through the log's queue: a stalled or closed stderr must not stop the sweep half-way.
    if !json {
        crate::logs::line(format!(
            "  … {} users evaluated, {} refilled, {} credits\n",
            r.users_evaluated, r.users_refilled, r.credits_granted
        ));
    }
}

async fn balance(settings: &Settings, json: bool, user: &str) -> anyhow::Result<ExitCode> {
    let ledger = open_ledger(settings).await?;
    let balance = within(settings, ledger.balance(user, SystemClock)).await?;
    print_out(json, &json!({"user_id": user, "balance": balance}), || {
        balance.to_string()
    })?;
    Ok(ExitCode::SUCCESS)
}

async fn account(settings: &Settings, json: bool, user: &str) -> anyhow::Result<ExitCode> {
    let ledger = open_ledger(settings).await?;
    let view = within(settings, ledger.account(user, Utc::now())).await?;
    print_out(json, &serde_json::to_value(&view)?, || account_text(&view))?;
    Ok(ExitCode::SUCCESS)
}

/// An account for a person: its balance line, then its auto top-up and request, if any.
fn account_text(a: &crate::ledger::AccountView) -> String {
    let time = |t: &chrono::DateTime<Utc>| t.format("%Y-%m-%d %H:%M:%S UTC").to_string();
    let refill = match &a.refill_month {
        Some(m) => format!(", refill evaluated for {m}"),
        None => String::new(),
    };
    let mut out = format!(
        "{}: balance {} at row {}{refill}",
        printable(&a.user_id),
        a.balance,
        a.seq
    );
    match &a.auto_top_up {
        Some(t) => out.push_str(&format!(
            "\nauto top-up: below {} asks for {} ({} made)",
            t.threshold,
            t.amount,
            match a.requests_made {
                1 => "1 request".to_owned(),
                n => format!("{n} requests"),
            }
        )),
        None => out.push_str("\nauto top-up: off"),
    }
    if let Some(r) = &a.outstanding_request {
        out.push_str(&format!(
            "\noutstanding request: {} since {}, until {}",
            printable(&r.request_id),
            time(&r.requested_at),
            time(&r.expires_at)
        ));
    }
    out
}

async fn history(
    settings: &Settings,
    json: bool,
    user: &str,
    query: HistoryQuery,
) -> anyhow::Result<ExitCode> {
    let ledger = open_ledger(settings).await?;
    let page = within(settings, ledger.history(user, &query, SystemClock)).await?;
    print_out(json, &serde_json::to_value(&page)?, || {
        let mut text = history_table(&page.transactions);
        if let Some(seq) = page.next_before_seq {
            text.push_str(&format!("\nnext: --before-seq {seq}"));
        }
        text
    })?;
    Ok(ExitCode::SUCCESS)
}

fn history_table(rows: &[Transaction]) -> String {
    let mut out = format!(
        "{:>6}  {:<8} {:>10} {:>12}  {:<25} {}",
        "seq", "type", "amount", "balance", "created_at (UTC)", "key"
    );
    for r in rows {
        out.push_str(&format!(
            "\n{:>6}  {:<8} {:>10} {:>12}  {:<25} {}",
            r.seq,
            r.tx_type,
            r.amount,
            r.running_balance,
            r.created_at.format("%Y-%m-%d %H:%M:%S%.3f"),
            // Keys carry producers' ids: one must not forge a line of the table.
            printable(&r.transaction_key)
        ));
    }
    out
}

async fn auto_top_up(
    settings: &Settings,
    json: bool,
    user: &str,
    config: Option<(Credits, Credits)>,
) -> anyhow::Result<ExitCode> {
    let config = match config {
        Some((t, a)) => Some((credits("threshold", t)?, credits("amount", a)?)),
        None => None,
    };
    let ledger = open_ledger(settings).await?;
    let r = within(settings, ledger.set_auto_top_up(user, config, SystemClock)).await?;
    print_out(json, &serde_json::to_value(&r)?, || {
        match (r.threshold, r.amount) {
            (Some(t), Some(a)) => format!(
                "{}: auto top-up of {a} below {t}{}",
                printable(user),
                if r.requested {
                    " (the balance is below it: requested now)"
                } else {
                    ""
                }
            ),
            _ => format!("{}: auto top-up off", printable(user)),
        }
    })?;
    Ok(ExitCode::SUCCESS)
}

async fn outcome(settings: &Settings, json: bool, node_exec_id: &str) -> anyhow::Result<ExitCode> {
    let ledger = open_ledger(settings).await?;
    let Some(d) = within(settings, ledger.decision(node_exec_id)).await? else {
        let why = format!("node_exec_id: no decision for {node_exec_id:?} yet");
        return Err(NotFound(why).into());
    };
    print_out(json, &serde_json::to_value(&d)?, || {
        let settled = match &d.settlement {
            Some(s) => format!(
                "; settled {}: pre {} post {} delta {}{}",
                s.status,
                s.pre,
                s.post,
                s.delta,
                match (s.uncollected, s.fee_uncollected) {
                    (0, 0) => String::new(),
                    (u, 0) => format!(" ({u} uncollected)"),
                    (u, f) => format!(" ({u} uncollected, and an execution fee of {f} not taken)"),
                }
            ),
            None => "; not settled".into(),
        };
        let fee = match d.fee {
            0 => String::new(),
            fee => format!(" + execution fee {fee}"),
        };
        format!(
            "{} cost {}{fee} (user {}, block {}){settled}",
            d.outcome,
            d.cost,
            printable(&d.user_id),
            printable(&d.block_id)
        )
    })?;
    Ok(ExitCode::SUCCESS)
}

async fn audit(settings: &Settings, json: bool) -> anyhow::Result<ExitCode> {
    let pool = crate::db::connect_existing_for_audit(&settings.database).await?;
    let report = crate::ledger::audit::run(&pool).await?;
    print_out(json, &serde_json::to_value(&report)?, || {
        crate::tools::audit_text(&report, "clean")
    })?;
    Ok(crate::tools::exit_code(report.is_clean()))
}

async fn report(settings: &Settings, json: bool, month: Option<Month>) -> anyhow::Result<ExitCode> {
    let now = Utc::now();
    let month = month.unwrap_or_else(|| Month::of(now));
    // Reads the ledger up to the month's end, as the audit reads all of it.
    let pool = crate::db::connect_existing_for_audit(&settings.database).await?;
    let settle = crate::db::stall_bound(&settings.database);
    let report = crate::ledger::report::month(&pool, month, now, settle)
        .await
        .map_err(ledger_error)?;
    print_out(json, &serde_json::to_value(&report)?, || report.to_string())?;
    Ok(ExitCode::SUCCESS)
}

async fn publish(settings: &Settings, json: bool, file: &str) -> anyhow::Result<ExitCode> {
    let bodies = read_bodies(file)?;
    let n = crate::tools::publish::publish_entries(settings, &bodies).await?;
    print_out(json, &json!({"published": n}), || {
        format!("{n} messages published")
    })?;
    Ok(ExitCode::SUCCESS)
}

async fn events(
    settings: &Settings,
    json: bool,
    action: EventsCommand,
) -> anyhow::Result<ExitCode> {
    let EventsCommand::Republish {
        since,
        to_queue,
        dry_run,
    } = action;
    let r = crate::tools::republish::run(settings, since, to_queue.as_deref(), dry_run).await?;
    print_out(json, &serde_json::to_value(&r)?, || {
        let verb = if r.dry_run {
            "would be republished"
        } else {
            "republished"
        };
        let ids = match (r.first_id, r.last_id) {
            (Some(a), Some(b)) => format!(" (outbox rows {a} to {b})"),
            _ => String::new(),
        };
        let kept = match r.kept_since {
            Some(t) => format!(
                "; events stamped before {} are no longer kept",
                t.format("%Y-%m-%d %H:%M:%S UTC")
            ),
            None => String::new(),
        };
        format!("{} events {verb} to {}{ids}{kept}", r.events, r.to)
    })?;
    Ok(ExitCode::SUCCESS)
}

async fn dead_letters(
    settings: &Settings,
    json: bool,
    action: DeadLettersCommand,
) -> anyhow::Result<ExitCode> {
    use crate::tools::dead_letters::{self as dl, Selection};
    match action {
        DeadLettersCommand::List { limit } => {
            let report = dl::list(settings, limit).await?;
            print_out(json, &serde_json::to_value(&report)?, || list_text(&report))?;
        }
        DeadLettersCommand::Replay(args) => {
            // clap's group guarantees one of the two.
            let selection = match args.node_exec_id {
                // Checked as the ledger checks it: an id no decision can have would read the
                // whole dead queue to match nothing.
                Some(id) => {
                    crate::ledger::check_node_exec_id(&id).map_err(ledger_error)?;
                    Selection::NodeExecId(id)
                }
                None => Selection::All,
            };
            let report = dl::replay(settings, &selection, args.dry_run).await?;
            print_replay(json, args.dry_run, &report)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn list_text(report: &crate::tools::dead_letters::ListReport) -> String {
    let mut out = format!(
        "{} dead messages, {} shown",
        report.depth,
        report.messages.len()
    );
    // A producer's bytes, printed for a person: escaped, so no escape sequence reaches the
    // terminal.
    for m in &report.messages {
        out.push_str(&format!(
            "\n  {} | {} | {} | {} | {}",
            printable(m.node_exec_id.as_deref().unwrap_or("-")),
            if m.reason.is_empty() {
                "-".into()
            } else {
                printable(&m.reason)
            },
            died_text(m),
            printable(m.producer.as_deref().unwrap_or("-")),
            printable(&m.excerpt)
        ));
    }
    out
}

/// When a dead letter died, to the second, or `-` when nothing says.
fn died_text(m: &crate::tools::dead_letters::DeadLetter) -> String {
    m.died_at.map_or_else(
        || "-".to_owned(),
        |t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
    )
}

fn print_replay(
    json: bool,
    dry_run: bool,
    report: &crate::tools::dead_letters::ReplayReport,
) -> anyhow::Result<()> {
    if dry_run {
        let value = json!({
            "dry_run": true,
            "would_replay": report.would_replay,
            "skipped": report.skipped,
        });
        return print_out(json, &value, || {
            let mut out = format!(
                "dry run: {} would be replayed, {} skipped",
                report.would_replay.len(),
                report.skipped
            );
            for m in &report.would_replay {
                let id = printable(m.node_exec_id.as_deref().unwrap_or("-"));
                let producer = printable(m.producer.as_deref().unwrap_or("-"));
                let excerpt = printable(&m.excerpt);
                let died = died_text(m);
                out.push_str(&format!("\n  {id} | {died} | {producer} | {excerpt}"));
            }
            out
        });
    }
    let value = json!({"replayed": report.replayed, "skipped": report.skipped});
    print_out(json, &value, || {
        format!("{} replayed, {} skipped", report.replayed, report.skipped)
    })
}

/// The non-blank lines of `file` (`-`: standard input), one message body each.
fn read_bodies(file: &str) -> anyhow::Result<Vec<Vec<u8>>> {
    let text = if file == "-" {
        std::io::read_to_string(std::io::stdin().lock())
            .map_err(|e| BadRequest(format!("standard input: {e}")))?
    } else {
        std::fs::read_to_string(file).map_err(|e| BadRequest(format!("{file}: {e}")))?
    };
    Ok(bodies_of(&text))
}

/// One body per non-blank line. A byte-order mark at the start (some editors write one) is
/// not part of the first body.
fn bodies_of(text: &str) -> Vec<Vec<u8>> {
    text.strip_prefix('\u{feff}')
        .unwrap_or(text)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.as_bytes().to_vec())
        .collect()
}

/// A ledger call bounded as the worker's are (twice the statement timeout and a second): a
/// database that stops answering (a hung pooler, a lost flow) ends the command with an error
/// rather than holding it for ever. The server, never sent the statement, cannot end it.
async fn within<T>(
    settings: &Settings,
    call: impl std::future::Future<Output = Result<T, LedgerError>>,
) -> anyhow::Result<T> {
    crate::db::bounded(crate::db::stall_bound(&settings.database), call)
        .await
        .map_err(ledger_error)
}

/// A posting's error where the connection was lost (the server may have committed before
/// it), rather than answered: whether it was applied is unknown, and its key tells.
fn unknown_outcome(e: anyhow::Error, key: &str) -> anyhow::Error {
    use sqlx::Error::{Io, Protocol, WorkerCrashed};
    let lost = matches!(
        e.downcast_ref::<LedgerError>(),
        Some(LedgerError::Db(Io(_) | Protocol(_) | WorkerCrashed))
    );
    if !lost {
        return e;
    }
    e.context(format!(
        "whether it was applied is unknown: run it again with --key {key:?}, which answers \
         `applied: false` if it was"
    ))
}

async fn open_ledger(settings: &Settings) -> anyhow::Result<Ledger> {
    let pool = crate::db::connect_existing(&settings.database).await?;
    crate::clock::check_against_database(&pool).await?;
    Ok(Ledger::new(pool, settings.ledger_policy()))
}

async fn credit(
    settings: &Settings,
    json: bool,
    tx_type: TxType,
    user: &str,
    amount: i64,
    key: Option<String>,
    reason: Option<String>,
) -> anyhow::Result<ExitCode> {
    let ledger = open_ledger(settings).await?;
    // Fixed before the call, as the control queue's: an outcome left unknown (the database
    // lost after its commit) can be looked up, and a retry under it applies it once.
    let key = key.unwrap_or_else(|| crate::ledger::generated_key(tx_type));
    let call = ledger.credit(
        tx_type,
        user,
        amount,
        Some(&key),
        reason.as_deref(),
        SystemClock,
    );
    let p = within(settings, call)
        .await
        .map_err(|e| unknown_outcome(e, &key))?;
    print_out(json, &serde_json::to_value(&p)?, || {
        posting_text(&p, || {
            let kind = tx_type.as_str();
            format!("{kind} {amount} credits to {}", printable(user))
        })
    })?;
    Ok(ExitCode::SUCCESS)
}

/// A credit's or refund's text: what it did (`done`, then its key, row and the balance), or
/// that its key had done it before.
fn posting_text(p: &crate::ledger::Posting, done: impl FnOnce() -> String) -> String {
    let (key, seq, balance) = (printable(&p.transaction_key), p.seq, p.balance);
    if p.applied {
        format!("{} ({key}, row {seq}); balance {balance}", done())
    } else {
        format!("key {key} already applied (row {seq}); nothing changed; balance {balance}")
    }
}

async fn refund(
    settings: &Settings,
    json: bool,
    user: &str,
    amount: i64,
    keys: (&str, &str),
    reason: Option<String>,
) -> anyhow::Result<ExitCode> {
    let ledger = open_ledger(settings).await?;
    let call = ledger.refund(user, amount, keys, reason.as_deref(), SystemClock);
    let p = within(settings, call)
        .await
        .map_err(|e| unknown_outcome(e, keys.0))?;
    print_out(json, &serde_json::to_value(&p)?, || {
        posting_text(&p, || {
            format!(
                "REFUND {amount} credits of {} from {}",
                printable(keys.1),
                printable(user)
            )
        })
    })?;
    Ok(ExitCode::SUCCESS)
}

/// Prints a command's result. A failed write (a closed pipe, a full disk) is the command's
/// failure (exit 1), not a panic.
fn print_out(
    json: bool,
    value: &serde_json::Value,
    human: impl FnOnce() -> String,
) -> anyhow::Result<()> {
    let text = if json { value.to_string() } else { human() };
    let mut out = std::io::stdout().lock();
    writeln!(out, "{text}")
        .and_then(|()| out.flush())
        .context("cannot write the output")
}

#[cfg(test)]
mod tests {
    use super::error_text;

    fn io(msg: &str) -> std::io::Error {
        std::io::Error::new(std::io::ErrorKind::NotFound, msg.to_owned())
    }

    #[test]
    fn each_cause_is_printed_once() {
        // Display already holds the source's text, and the source is exposed too.
        let e = anyhow::Error::from(crate::config::ConfigError::Read {
            path: "/etc/cw.toml".into(),
            source: io("no such file"),
        });
        assert_eq!(
            error_text(&e),
            "config: cannot read /etc/cw.toml: no such file"
        );
        let e = anyhow::Error::from(crate::ledger::LedgerError::Db(sqlx::Error::Io(io("reset"))));
        let text = error_text(&e);
        assert_eq!(text.matches("reset").count(), 1, "{text}");
        // A context whose message does not repeat its cause still shows the cause.
        let e = anyhow::Error::from(io("no such file")).context("reading the entries");
        assert_eq!(error_text(&e), "reading the entries: no such file");
    }
}

#[cfg(test)]
mod usage_tests {
    use clap::Parser;
    use serde_json::json;

    use super::{
        credits, error_code, error_text, parse_credits, usage_error_json, Cli, Command, Credits,
    };

    #[test]
    fn published_lines_lose_a_byte_order_mark_and_blank_lines() {
        let bodies = super::bodies_of("\u{feff}{\"a\":1}\r\n\n  \n{\"b\":2}\n");
        assert_eq!(bodies, [b"{\"a\":1}".to_vec(), b"{\"b\":2}".to_vec()]);
    }

    #[test]
    fn the_definition_is_consistent() {
        // Catches, among others, an argument group sharing an id with a global flag.
        <Cli as clap::CommandFactory>::command().debug_assert();
    }

    #[test]
    fn a_usage_error_in_json_is_a_bad_request_naming_what_is_wrong() {
        let e = Cli::try_parse_from(["credit-worker", "top-up", "alice", "--json"]).unwrap_err();
        assert_eq!(
            usage_error_json(&e),
            json!({"error": {"code": "bad_request", "message":
                "the following required arguments were not provided: <AMOUNT>"}})
        );
        let e = Cli::try_parse_from(["credit-worker", "balance", "--nope"]).unwrap_err();
        let m = usage_error_json(&e)["error"]["message"].to_string();
        assert!(m.starts_with("\"unexpected argument '--nope' found"), "{m}");
        // Without an argument after it, clap shows the command's help instead.
        let e = Cli::try_parse_from(["credit-worker", "--json", "dead-letters"]).unwrap_err();
        assert_eq!(
            usage_error_json(&e)["error"]["message"],
            json!("a subcommand is required (see --help)")
        );
    }

    #[test]
    fn an_amount_no_balance_holds_is_out_of_range() {
        let amount = |text: &str| {
            parse_credits(text).and_then(|c| {
                credits("amount", c).map_err(|e| format!("{}: {}", error_code(&e), error_text(&e)))
            })
        };
        assert_eq!(amount("5"), Ok(5));
        assert_eq!(amount("-5"), Ok(-5));
        for big in [
            "9223372036854775808",
            "-1234567890123456789012345678901234567890",
        ] {
            assert_eq!(
                amount(big),
                Err(format!(
                    "amount_out_of_range: amount: {big} is beyond the 64-bit integer range"
                ))
            );
        }
        for not in ["1.5", "", "-", "12a", "1e3"] {
            assert!(parse_credits(not).is_err(), "{not:?}");
        }
    }

    #[test]
    fn auto_top_up_takes_a_setting_or_off() {
        let parse = |args: &[&str]| {
            Cli::try_parse_from(["credit-worker", "auto-top-up", "u5"].iter().chain(args))
                .map(|c| c.command)
                .map_err(|e| e.exit_code())
        };
        assert!(matches!(
            parse(&["--threshold", "100", "--amount", "50"]),
            Ok(Command::AutoTopUp {
                threshold: Some(Credits(Ok(100))),
                amount: Some(Credits(Ok(50))),
                off: false,
                ..
            })
        ));
        assert!(matches!(
            parse(&["--off"]),
            Ok(Command::AutoTopUp {
                threshold: None,
                amount: None,
                off: true,
                ..
            })
        ));
        assert!(matches!(parse(&[]), Err(2)));
        assert!(matches!(parse(&["--amount", "5"]), Err(2)));
        assert!(matches!(
            parse(&["--off", "--threshold", "1", "--amount", "2"]),
            Err(2)
        ));
    }

    #[test]
    fn a_malformed_month_is_a_usage_error() {
        let e = Cli::try_parse_from(["credit-worker", "sweep", "--month", "2026-13"])
            .err()
            .map(|e| (e.exit_code(), e.to_string()));
        let (code, text) = e.unwrap_or_default();
        assert_eq!(code, 2);
        assert!(text.contains("expected YYYY-MM"), "{text}");
        let ok = Cli::try_parse_from(["credit-worker", "sweep", "--month", "2026-12"]);
        assert!(matches!(
            ok.map(|c| c.command),
            Ok(Command::Sweep { month: Some(m), .. }) if m.to_string() == "2026-12"
        ));
    }
}
