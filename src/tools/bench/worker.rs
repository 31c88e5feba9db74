//! The worker end to end: seed users, start `credit-worker run` as a separate process on the
//! bench's namespace and database, publish, wait for every `balance.changed`, stop it with
//! SIGTERM, then verify the ledger.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use lapin::options::{QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use sqlx::{PgPool, Row};
use tokio::task::JoinHandle;

use super::timeline;
use super::traffic::{self, Latency, Sink, SinkResult, Traffic};
use super::WORKER_SINK;
use crate::amqp::topology::{self, Names};
use crate::config::{AmqpSettings, Settings};
use crate::ledger::seed;
use crate::refill::Month;
use crate::tools::scratch::Scratch;

/// Each user's starting balance: no run can exhaust it, so every message is charged.
pub(crate) const SEED_BALANCE: i64 = 1_000_000_000_000;
pub(crate) const SEED_KEY: &str = "BENCH-SEED";

#[derive(Debug)]
pub(crate) struct WorkerResult {
    /// Messages / (worker's first delivery → last `balance.changed` received); in paced runs
    /// from the first publish instead.
    pub msgs_per_s: f64,
    /// Executions per second: msgs_per_s, or half of it with `--pairs`.
    pub execs_per_s: f64,
    pub seconds: f64,
    /// Messages / (process start → last event): includes connecting and migrating.
    pub msgs_per_s_total: f64,
    pub startup_ms: f64,
    pub latency: Option<Latency>,
    /// The latency second by second (`--timeline`).
    pub timeline: Vec<timeline::Second>,
    pub peak_rss_mib: f64,
    pub events_received: usize,
    pub fees: i64,
    pub breakdown: Option<Breakdown>,
    /// What `--pairs` verified.
    pub pairs: Option<PairsResult>,
    pub problems: Vec<String>,
}

/// The settlements of a `--pairs` run.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub(crate) struct PairsResult {
    pub settled: i64,
    /// Σ of USAGE and SETTLE rows per execution, as debits.
    pub charged_credits: i64,
    /// Σ of the post-flight prices the bench computed.
    pub expected_credits: i64,
    /// SETTLE rows: extra charges (post > pre) and refunds (post < pre).
    pub extra_charges: i64,
    pub refunds: i64,
    /// Executions whose completion was published before their start.
    pub overtaking: usize,
}

pub async fn run(
    settings: &Settings,
    scratch: &Scratch,
    t: &Traffic,
    cost: i64,
    max_batch: usize,
    rate: Option<f64>,
) -> anyhow::Result<WorkerResult> {
    let amqp = &settings.amqp;
    let pool = crate::db::connect_and_migrate(&scratch.database).await?;
    seed(&pool, t.users).await?;

    // The worker's topology, declared up front so the backlog can be published before the
    // worker starts, plus a queue catching every event.
    let conn = crate::amqp::connect(amqp, "credit-worker bench").await?;
    let ch = conn.create_channel().await?;
    let names = topology::declare(&ch, &scratch.amqp).await?;
    let sink = start_sink(amqp, scratch, t, &ch, &names).await?;

    let mut started = match rate {
        None => publish_then_start(settings, scratch, max_batch, t, &ch, &names).await?,
        Some(rate) => {
            start_then_publish(settings, scratch, max_batch, t, rate, &ch, &names).await?
        }
    };
    let mut stopped = match wait_then_stop(&sink, &mut started.proc, t, &pool).await {
        Ok(stopped) => stopped,
        // A run that stalls or fails keeps the worker's log for the diagnosis.
        Err(e) => {
            let log = started.proc.keep_log().display().to_string();
            anyhow::bail!("{e:#}; worker log: {log}");
        }
    };
    let (seen, ledger_rows) = drain_sink(&pool, sink).await?;
    // A pairs run ends with its executions' last event, a USAGE or a SETTLE one.
    let last = if t.is_pairs() {
        seen.last_any
    } else {
        seen.last
    };
    let last = last.unwrap_or_else(Instant::now);

    let problems = &mut stopped.problems;
    let (fees, pairs) =
        verify_run(settings, &pool, t, cost, seen.events, ledger_rows, problems).await?;
    check_queues_empty(&ch, &names, problems).await?;
    let _ = crate::tools::close_connection(conn, "done").await;
    pool.close().await;
    if !problems.is_empty() {
        problems.push(format!("worker log: {}", started.proc.keep_log().display()));
    }
    let mut r = measured(t, &started, last, &seen, stopped, fees);
    r.pairs = pairs;
    Ok(r)
}

/// Checks the ledger after the run of `t` (see [`verify`] and [`verify_pairs`]) and that an
/// event arrived for every ledger row; returns the execution fees and what pairs verified.
pub(super) async fn verify_run(
    settings: &Settings,
    pool: &PgPool,
    t: &Traffic,
    cost: i64,
    events: usize,
    ledger_rows: i64,
    problems: &mut Vec<String>,
) -> anyhow::Result<(i64, Option<PairsResult>)> {
    let (fees, pairs) = if t.is_pairs() {
        let p = verify_pairs(settings, pool, t, problems).await?;
        (p.0, Some(p.1))
    } else {
        (verify(settings, pool, t, cost, problems).await?, None)
    };
    if (events as i64) != ledger_rows {
        problems.push(format!(
            "{events} events received for {ledger_rows} ledger rows"
        ));
    }
    check_users(pool, t, problems).await?;
    Ok((fees, pairs))
}

/// Every decision bills the user its execution was published for, with one USAGE row on
/// that user's ledger: totals alone would pass a charge to the wrong user.
async fn check_users(pool: &PgPool, t: &Traffic, problems: &mut Vec<String>) -> anyhow::Result<()> {
    let rows: Vec<(String, String, i64)> = sqlx::query_as(
        "SELECT d.node_exec_id, d.user_id,
                (SELECT count(*) FROM credit.transactions x
                  WHERE x.user_id = d.user_id AND x.transaction_key = 'USAGE-' || d.node_exec_id)
           FROM credit.decisions d",
    )
    .fetch_all(pool)
    .await?;
    let wrong: Vec<&str> = rows
        .iter()
        .filter(|(id, user, usage)| {
            *usage != 1 || t.index_of(id).is_none_or(|i| t.user_of(i) != *user)
        })
        .map(|(id, _, _)| id.as_str())
        .collect();
    if let Some(first) = wrong.first() {
        problems.push(format!(
            "{} decisions bill another user than their execution's, or lack its USAGE row (first: {first})",
            wrong.len()
        ));
    }
    Ok(())
}

/// Declares the queue catching every event, binds it to the events exchange and starts
/// consuming it.
pub(super) async fn start_sink(
    amqp: &AmqpSettings,
    scratch: &Scratch,
    t: &Traffic,
    ch: &lapin::Channel,
    names: &Names,
) -> anyhow::Result<Sink> {
    let sink_queue = scratch.name(WORKER_SINK);
    ch.queue_declare(
        sink_queue.as_str().into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await?;
    ch.queue_bind(
        sink_queue.as_str().into(),
        names.events.as_str().into(),
        "#".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await?;
    Sink::start(amqp, &sink_queue, t).await
}

/// The worker process, and the instants the run is measured from.
struct Started {
    proc: WorkerProcess,
    spawned: Instant,
    /// The worker's first delivery (backlog) or the first publish (open loop).
    start_of_run: Instant,
    sent_at: SentAt,
}

/// Backlog mode: publishes every message, then starts the worker.
async fn publish_then_start(
    settings: &Settings,
    scratch: &Scratch,
    max_batch: usize,
    t: &Traffic,
    ch: &lapin::Channel,
    names: &Names,
) -> anyhow::Result<Started> {
    let amqp = &settings.amqp;
    let n = t.published();
    let bar = super::progress(n as u64, "publish");
    let (published, _) = traffic::publish_backlog(amqp, &names.input_queue, t, &bar).await?;
    bar.finish_and_clear();
    let mut proc = WorkerProcess::spawn(settings, scratch, max_batch, t.is_pairs())?;
    let spawned = Instant::now();
    wait_for_worker(ch, names, &mut proc, spawned, Awaiting::FirstDelivery(n)).await?;
    Ok(Started {
        proc,
        spawned,
        start_of_run: Instant::now(),
        sent_at: SentAt::Each(published),
    })
}

/// Open-loop mode: starts the worker, then publishes at `rate` to the idle, consuming worker.
async fn start_then_publish(
    settings: &Settings,
    scratch: &Scratch,
    max_batch: usize,
    t: &Traffic,
    rate: f64,
    ch: &lapin::Channel,
    names: &Names,
) -> anyhow::Result<Started> {
    let amqp = &settings.amqp;
    let n = t.published();
    let mut proc = WorkerProcess::spawn(settings, scratch, max_batch, t.is_pairs())?;
    let spawned = Instant::now();
    wait_for_worker(ch, names, &mut proc, spawned, Awaiting::Consumer).await?;
    let bar = super::progress(n as u64, "publish");
    let start = traffic::publish_paced(amqp, &names.input_queue, t, rate, &bar).await?;
    bar.finish_and_clear();
    Ok(Started {
        proc,
        spawned,
        start_of_run: start,
        sent_at: SentAt::Paced { start, rate },
    })
}

/// What the bench waits for on the input queue after starting the worker.
#[derive(Clone, Copy)]
pub(super) enum Awaiting {
    /// Its first delivery, which shows as the ready count dropping below N (prefetch takes a
    /// whole window at once); polled so the start-up is not counted as work.
    FirstDelivery(usize),
    /// Its consumer.
    Consumer,
}

/// Polls the input queue until the worker got as far as `awaiting`; fails when the worker
/// exits, or after 60 s.
pub(super) async fn wait_for_worker(
    ch: &lapin::Channel,
    names: &Names,
    proc: &mut WorkerProcess,
    spawned: Instant,
    awaiting: Awaiting,
) -> anyhow::Result<()> {
    let (poll, too_slow) = match awaiting {
        Awaiting::FirstDelivery(_) => (2, "the worker consumed nothing within 60 s"),
        Awaiting::Consumer => (20, "the worker did not start consuming within 60 s"),
    };
    let passive = crate::amqp::topology::passive();
    loop {
        let q = ch
            .queue_declare(
                names.input_queue.as_str().into(),
                passive,
                FieldTable::default(),
            )
            .await?;
        let reached = match awaiting {
            Awaiting::FirstDelivery(n) => (q.message_count() as usize) < n,
            Awaiting::Consumer => q.consumer_count() > 0,
        };
        if reached {
            return Ok(());
        }
        proc.check_alive()?;
        if spawned.elapsed() > Duration::from_secs(60) {
            anyhow::bail!("{too_slow}");
        }
        tokio::time::sleep(Duration::from_millis(poll)).await;
    }
}

/// The worker once stopped.
pub(super) struct Stopped {
    pub peak_kib: u64,
    pub breakdown: Option<Breakdown>,
    /// How it exited, unless cleanly; the checks after the run add theirs.
    pub problems: Vec<String>,
}

/// Waits until every message's event arrived (with `--pairs`: every execution settled and
/// its events received), then stops the worker with SIGTERM; a failed wait is returned once
/// the worker is stopped.
async fn wait_then_stop(
    sink: &Sink,
    proc: &mut WorkerProcess,
    t: &Traffic,
    pool: &PgPool,
) -> anyhow::Result<Stopped> {
    let n = t.messages;
    let bar = super::progress(n as u64, "worker");
    let stall = Duration::from_secs(60);
    let waited = if t.is_pairs() {
        wait_settled(pool, sink, n, &bar, stall, || proc.check_alive()).await
    } else {
        sink.wait_complete(n, &bar, stall, || proc.check_alive())
            .await
    };
    bar.finish_and_clear();
    let stopped = stop_worker(proc).await;
    waited?;
    Ok(stopped)
}

/// Reads the worker's peak RSS and its own timings, then stops it with SIGTERM.
pub(super) async fn stop_worker(proc: &mut WorkerProcess) -> Stopped {
    let peak_kib = proc.peak_kib();
    // The worker's own timings, when its HTTP endpoint answers (diagnostic only).
    let breakdown = settled_breakdown(proc.metrics_addr).await;
    let mut problems = Vec::new();
    match proc.stop().await {
        Ok(status) if status.success() => {}
        Ok(status) => problems.push(format!("the worker exited with {status} after SIGTERM")),
        Err(e) => problems.push(format!("stopping the worker: {e}")),
    }
    Stopped {
        peak_kib,
        breakdown,
        problems,
    }
}

/// Polls the ledger until `n` executions are settled and the sink has an event for every
/// ledger row but the seed's; fails when neither count moves for `stall`, or when `alive`
/// says the worker died.
async fn wait_settled(
    pool: &PgPool,
    sink: &Sink,
    n: usize,
    bar: &indicatif::ProgressBar,
    stall: Duration,
    mut alive: impl FnMut() -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let mut last_seen = (-1, 0);
    let mut last_change = Instant::now();
    loop {
        let (settled, rows): (i64, i64) = sqlx::query_as(
            "SELECT (SELECT count(*) FROM credit.settlements),
                    (SELECT count(*) FROM credit.transactions WHERE transaction_key <> $1)",
        )
        .bind(SEED_KEY)
        .fetch_one(pool)
        .await?;
        let events = sink.events() as i64;
        bar.set_position(settled.max(0) as u64);
        if settled >= n as i64 && events >= rows {
            return Ok(());
        }
        if sink.is_finished() {
            anyhow::bail!("the event consumer stopped after {events} events");
        }
        alive()?;
        if (settled, events) != last_seen {
            last_seen = (settled, events);
            last_change = Instant::now();
        } else if last_change.elapsed() > stall {
            anyhow::bail!(
                "no progress for {} s: {settled} of {n} executions settled, {events} of {rows} events received",
                stall.as_secs()
            );
        }
        // Polling is load on the database under test: a tenth of a second is enough.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Ends the sink once it has an event for every ledger row but the seed's (10 s at most);
/// returns what it saw and that number of ledger rows.
pub(super) async fn drain_sink(pool: &PgPool, sink: Sink) -> anyhow::Result<(SinkResult, i64)> {
    // The relay flushed the outbox at shutdown; collect the stragglers (execution-fee events).
    let ledger_rows: i64 =
        sqlx::query_scalar("SELECT count(*) FROM credit.transactions WHERE transaction_key <> $1")
            .bind(SEED_KEY)
            .fetch_one(pool)
            .await?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while (sink.events() as i64) < ledger_rows && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let seen = sink.finish().await?;
    Ok((seen, ledger_rows))
}

/// Notes the messages left on the input and dead-letter queues.
pub(super) async fn check_queues_empty(
    ch: &lapin::Channel,
    names: &Names,
    problems: &mut Vec<String>,
) -> anyhow::Result<()> {
    let passive = crate::amqp::topology::passive();
    for q in [&names.input_queue, &names.dead_queue] {
        let left = ch
            .queue_declare(q.as_str().into(), passive, FieldTable::default())
            .await?
            .message_count();
        if left != 0 {
            problems.push(format!("{left} messages left on {q}"));
        }
    }
    Ok(())
}

/// The result of `t` whose last event arrived at `last`.
fn measured(
    t: &Traffic,
    started: &Started,
    last: Instant,
    seen: &SinkResult,
    stopped: Stopped,
    fees: i64,
) -> WorkerResult {
    let seconds = last
        .saturating_duration_since(started.start_of_run)
        .as_secs_f64()
        .max(1e-9);
    let total_seconds = last
        .saturating_duration_since(started.spawned)
        .as_secs_f64()
        .max(1e-9);
    let n = t.published();
    // Pairs: from the message that yields each execution's last event to that event.
    let sent = |i: usize| {
        started.sent_at.at(if t.is_pairs() {
            t.last_event_slot(i)
        } else {
            i
        })
    };
    let arrived = if t.is_pairs() {
        &seen.settled
    } else {
        &seen.received
    };
    let latency = Latency::of(sent, arrived);
    let timeline = timeline::by_second(sent, arrived, (Instant::now(), Utc::now()));
    WorkerResult {
        msgs_per_s: n as f64 / seconds,
        execs_per_s: t.messages as f64 / seconds,
        seconds,
        msgs_per_s_total: n as f64 / total_seconds,
        startup_ms: started
            .start_of_run
            .saturating_duration_since(started.spawned)
            .as_secs_f64()
            * 1e3,
        latency,
        timeline,
        peak_rss_mib: stopped.peak_kib as f64 / 1024.0,
        events_received: seen.events,
        fees,
        breakdown: stopped.breakdown,
        pairs: None,
        problems: stopped.problems,
    }
}

/// When the message in publish slot i was sent.
enum SentAt {
    Each(Vec<Instant>),
    /// Intended send times of an open-loop run.
    Paced {
        start: Instant,
        rate: f64,
    },
}

impl SentAt {
    fn at(&self, i: usize) -> Instant {
        match self {
            SentAt::Each(v) => v.get(i).copied().unwrap_or_else(Instant::now),
            SentAt::Paced { start, rate } => *start + Duration::from_secs_f64(i as f64 / rate),
        }
    }
}

/// Users with one GRANT of [`SEED_BALANCE`] each (ledger row, balance and an already
/// published outbox event, so the audit holds), evaluated for this month's refill.
pub(super) async fn seed(pool: &PgPool, users: usize) -> Result<(), sqlx::Error> {
    let ids: Vec<String> = (0..users).map(Traffic::user_id).collect();
    let month = Month::of(Utc::now()).first_day();
    seed::seed_funded_users(pool, &ids, SEED_BALANCE, SEED_KEY, month).await?;
    seed::analyze_balances(pool).await
}

/// Checks the ledger after the run; returns the execution fees charged.
async fn verify(
    settings: &Settings,
    pool: &PgPool,
    t: &Traffic,
    cost: i64,
    problems: &mut Vec<String>,
) -> anyhow::Result<i64> {
    let n = t.messages as i64;
    let d = sqlx::query(
        "SELECT count(*) AS n, count(*) FILTER (WHERE outcome = 'charged') AS charged,
                coalesce(sum(cost), 0)::int8 AS cost, coalesce(sum(fee), 0)::int8 AS fee
           FROM credit.decisions",
    )
    .fetch_one(pool)
    .await?;
    let (decided, charged): (i64, i64) = (d.try_get("n")?, d.try_get("charged")?);
    let (cost_sum, fee_sum): (i64, i64) = (d.try_get("cost")?, d.try_get("fee")?);
    if decided != n || charged != n {
        problems.push(format!(
            "{decided} decisions ({charged} charged) for {n} messages"
        ));
    }
    let expected_fee = expected_fees(settings, pool).await?;
    if cost_sum != cost * n || fee_sum != expected_fee {
        problems.push(format!(
            "decisions record {cost_sum} cost + {fee_sum} fees; expected {} + {expected_fee}",
            cost * n
        ));
    }
    let debited: i64 = sqlx::query_scalar(
        "SELECT ($1::numeric * count(*) - coalesce(sum(balance), 0))::int8 FROM credit.balances",
    )
    .bind(SEED_BALANCE)
    .fetch_one(pool)
    .await?;
    if debited != cost * n + expected_fee {
        problems.push(format!(
            "balances debited by {debited}; expected {} ({cost} × {n} + {expected_fee} fees)",
            cost * n + expected_fee
        ));
    }
    check_audit(pool, problems).await?;
    Ok(fee_sum)
}

/// Checks a `--pairs` run's ledger: one charged decision and one settlement per execution,
/// each execution's USAGE + SETTLE rows and its settlement's `post` equal to the bench's own
/// post-flight price, balances debited by their sum plus the fees, audit clean. Returns the
/// fees charged and the totals.
async fn verify_pairs(
    settings: &Settings,
    pool: &PgPool,
    t: &Traffic,
    problems: &mut Vec<String>,
) -> anyhow::Result<(i64, PairsResult)> {
    let n = t.messages as i64;
    let d = sqlx::query(
        "SELECT count(*) AS n, count(*) FILTER (WHERE outcome = 'charged') AS charged,
                coalesce(sum(fee), 0)::int8 AS fee FROM credit.decisions",
    )
    .fetch_one(pool)
    .await?;
    let (decided, charged): (i64, i64) = (d.try_get("n")?, d.try_get("charged")?);
    let fee_sum: i64 = d.try_get("fee")?;
    if decided != n || charged != n {
        problems.push(format!(
            "{decided} decisions ({charged} charged) for {n} executions"
        ));
    }
    let expected: Vec<i64> = (0..t.messages)
        .map(|i| {
            let (input, output) = traffic::tokens(i);
            traffic::post_price(input, output)
        })
        .collect();
    let mut r = compare_executions(pool, t, &expected, problems).await?;
    r.overtaking = (0..t.messages).filter(|&i| traffic::overtakes(i)).count();
    let expected_fee = expected_fees(settings, pool).await?;
    if fee_sum != expected_fee {
        problems.push(format!(
            "decisions record {fee_sum} fees; expected {expected_fee}"
        ));
    }
    let debited: i64 = sqlx::query_scalar(
        "SELECT ($1::numeric * count(*) - coalesce(sum(balance), 0))::int8 FROM credit.balances",
    )
    .bind(SEED_BALANCE)
    .fetch_one(pool)
    .await?;
    if debited != r.expected_credits + expected_fee {
        problems.push(format!(
            "balances debited by {debited}; expected {} post-flight + {expected_fee} fees",
            r.expected_credits
        ));
    }
    check_audit(pool, problems).await?;
    Ok((fee_sum, r))
}

/// Per execution: the debits of its USAGE-{id} and SETTLE-{id} rows and its settlement's
/// `post` against `expected`; notes the first five differences and the totals'.
async fn compare_executions(
    pool: &PgPool,
    t: &Traffic,
    expected: &[i64],
    problems: &mut Vec<String>,
) -> anyhow::Result<PairsResult> {
    let rows = settled_rows(pool).await?;
    let mut r = PairsResult {
        expected_credits: expected.iter().sum(),
        ..PairsResult::default()
    };
    let mut seen = vec![false; expected.len()];
    let mut wrong = Vec::new();
    for (id, post, charged, settle_rows, settle) in rows {
        r.settled += 1;
        r.charged_credits += charged;
        match settle {
            Some(s) if s > 0 => r.extra_charges += 1,
            Some(s) if s < 0 => r.refunds += 1,
            _ => {}
        }
        let Some(i) = t.index_of(&id) else {
            wrong.push(format!("settlement of a foreign execution {id}"));
            continue;
        };
        seen[i] = true;
        if post != expected[i] || charged != expected[i] || settle_rows > 1 {
            wrong.push(format!(
                "execution {i}: post {post}, charged {charged} in {settle_rows} SETTLE rows; expected {}",
                expected[i]
            ));
        }
    }
    // The totals first: the per-execution list below is cut at five.
    if r.charged_credits != r.expected_credits {
        problems.push(format!(
            "executions charged {} in total; post-flight prices sum to {}",
            r.charged_credits, r.expected_credits
        ));
    }
    let unsettled = seen.iter().filter(|s| !**s).count();
    if unsettled != 0 {
        problems.push(format!("{unsettled} executions not settled"));
    }
    let more = wrong.len().saturating_sub(5);
    problems.extend(wrong.into_iter().take(5));
    if more > 0 {
        problems.push(format!("{more} more mismatches"));
    }
    Ok(r)
}

/// Per settlement: node_exec_id, post, the debits of its USAGE and SETTLE rows, the number
/// of SETTLE rows and their debit.
async fn settled_rows(pool: &PgPool) -> Result<Vec<SettledRow>, sqlx::Error> {
    sqlx::query_as(
        // The key's index leads with user_id: join on the id cut out of the key (a hash join).
        "WITH x AS (
           SELECT substr(transaction_key, strpos(transaction_key, '-') + 1) AS id, amount,
                  transaction_key LIKE 'SETTLE-%' AS settle
             FROM credit.transactions
            WHERE transaction_key LIKE 'USAGE-%' OR transaction_key LIKE 'SETTLE-%')
         SELECT s.node_exec_id, s.post, -coalesce(sum(x.amount), 0)::int8,
                count(*) FILTER (WHERE x.settle), (-sum(x.amount) FILTER (WHERE x.settle))::int8
           FROM credit.settlements s LEFT JOIN x ON x.id = s.node_exec_id
          GROUP BY s.node_exec_id, s.post",
    )
    .fetch_all(pool)
    .await
}

type SettledRow = (String, i64, i64, i64, Option<i64>);

/// The execution fees the decisions owe: every `every`-th execution of a user within a UTC
/// day.
async fn expected_fees(settings: &Settings, pool: &PgPool) -> anyhow::Result<i64> {
    let fee = &settings.execution_fee;
    if fee.every <= 0 {
        return Ok(0);
    }
    let owed: i64 = sqlx::query_scalar(
        "SELECT coalesce(sum(c / $1), 0)::int8 FROM (
           SELECT count(*) AS c FROM credit.decisions
            GROUP BY user_id, (decided_at AT TIME ZONE 'UTC')::date) x",
    )
    .bind(fee.every)
    .fetch_one(pool)
    .await?;
    Ok(owed * fee.amount)
}

/// Notes unpublished events and (the first five) audit mismatches.
async fn check_audit(pool: &PgPool, problems: &mut Vec<String>) -> anyhow::Result<()> {
    let audit = crate::ledger::audit::run(pool).await?;
    if audit.unpublished_events != 0 {
        problems.push(format!(
            "{} outbox events unpublished",
            audit.unpublished_events
        ));
    }
    for m in audit.mismatches.iter().take(5) {
        problems.push(format!("audit: {}: {}", m.user_id, m.problem));
    }
    if audit.mismatches.len() > 5 {
        problems.push(format!(
            "audit: {} more mismatches",
            audit.mismatches.len() - 5
        ));
    }
    Ok(())
}

/// `credit-worker run` in a child process, so its memory is its own.
pub(super) struct WorkerProcess {
    child: tokio::process::Child,
    pid: u32,
    log: PathBuf,
    /// Whether the log outlives the process: only when a message names it (a failed run).
    /// Otherwise it goes with the process, an interrupted run's included.
    keep_log: bool,
    metrics_addr: std::net::SocketAddr,
    peak_kib: Arc<AtomicU64>,
    sampler: JoinHandle<()>,
    /// Kept until the process is gone; the file is removed with it.
    _config: ConfigFile,
}

impl WorkerProcess {
    pub(super) fn spawn(
        settings: &Settings,
        scratch: &Scratch,
        max_batch: usize,
        pairs: bool,
    ) -> anyhow::Result<Self> {
        // A free port for the worker's /metrics, read once at the end of the run.
        let metrics_addr = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
        let exe = std::env::current_exe()?;
        let log = std::env::temp_dir().join(format!("{}worker.log", scratch.namespace));
        let out = std::fs::File::create(&log)?;
        let mut cmd = tokio::process::Command::new(exe);
        let config = ConfigFile::write(settings, scratch, max_batch, metrics_addr, pairs)?;
        cmd.arg("run")
            .arg("--config")
            .arg(&config.path)
            .stdin(std::process::Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .kill_on_drop(true);
        // The file is the whole configuration: nothing inherited may override it.
        for (var, _) in std::env::vars_os() {
            if overrides_config(&var) {
                cmd.env_remove(var);
            }
        }
        let child = cmd.spawn()?;
        let pid = child
            .id()
            .ok_or_else(|| anyhow::anyhow!("the worker exited at once; see {}", log.display()))?;
        let peak_kib = Arc::new(AtomicU64::new(0));
        let sampler = tokio::spawn({
            let peak = peak_kib.clone();
            async move {
                loop {
                    if let Some(kib) = vm_hwm_kib(pid) {
                        peak.fetch_max(kib, Ordering::Relaxed);
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        });
        Ok(WorkerProcess {
            child,
            pid,
            log,
            keep_log: false,
            metrics_addr,
            peak_kib,
            sampler,
            _config: config,
        })
    }

    pub(super) fn check_alive(&mut self) -> anyhow::Result<()> {
        match self.child.try_wait()? {
            None => Ok(()),
            Some(status) => anyhow::bail!(
                "the worker exited early ({status}); see {}",
                self.keep_log().display()
            ),
        }
    }

    /// The high-water mark of the resident set so far.
    fn peak_kib(&self) -> u64 {
        if let Some(kib) = vm_hwm_kib(self.pid) {
            self.peak_kib.fetch_max(kib, Ordering::Relaxed);
        }
        self.peak_kib.load(Ordering::Relaxed)
    }

    /// SIGTERM, then up to 30 s for the graceful shutdown (SIGKILL after that).
    async fn stop(&mut self) -> anyhow::Result<std::process::ExitStatus> {
        self.sampler.abort();
        if self.child.try_wait()?.is_none() {
            // No signal API in std; kill(1) is everywhere the worker runs.
            let sent = tokio::process::Command::new("kill")
                .args(["-TERM", &self.pid.to_string()])
                .status()
                .await?;
            if !sent.success() {
                anyhow::bail!("kill -TERM {} failed", self.pid);
            }
        }
        match tokio::time::timeout(Duration::from_secs(30), self.child.wait()).await {
            Ok(status) => Ok(status?),
            Err(_) => {
                let _ = self.child.kill().await;
                anyhow::bail!("the worker did not stop within 30 s of SIGTERM")
            }
        }
    }

    /// The log's path, kept after the process.
    pub(super) fn keep_log(&mut self) -> &std::path::Path {
        self.keep_log = true;
        &self.log
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        if !self.keep_log {
            let _ = std::fs::remove_file(&self.log);
        }
    }
}

/// The worker's configuration file: the bench's effective settings (so a `--config` file or
/// environment given to the bench applies to the worker too) with the bench's own namespace,
/// database, HTTP address and batch size, and with `--pairs` the bench's own cost table (in a
/// second file). Both removed on drop: the configuration may hold credentials.
struct ConfigFile {
    path: PathBuf,
    cost_table: Option<PathBuf>,
}

impl ConfigFile {
    fn write(
        settings: &Settings,
        scratch: &Scratch,
        max_batch: usize,
        metrics_addr: std::net::SocketAddr,
        pairs: bool,
    ) -> anyhow::Result<Self> {
        let mut guard = ConfigFile {
            path: std::env::temp_dir().join(format!("{}worker.toml", scratch.namespace)),
            cost_table: None,
        };
        let mut s = settings.clone();
        s.amqp = scratch.amqp.clone();
        s.database = scratch.database.clone();
        s.pipeline.max_batch = max_batch;
        s.http.listen = Some(metrics_addr);
        if pairs {
            let table = std::env::temp_dir().join(format!("{}costs.toml", scratch.namespace));
            write_new(&table, &traffic::pairs_cost_table())?;
            guard.cost_table = Some(table.clone());
            s.cost.table = Some(table);
        }
        write_new(&guard.path, &s.to_toml()?)?;
        Ok(guard)
    }
}

/// Creates `path` (never over an existing file), readable by its owner only.
fn write_new(path: &std::path::Path, text: &str) -> anyhow::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options
        .open(path)
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    std::io::Write::write_all(&mut file, text.as_bytes())?;
    Ok(())
}

impl Drop for ConfigFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
        if let Some(t) = &self.cost_table {
            let _ = std::fs::remove_file(t);
        }
    }
}

/// Whether the child would take `var` from the environment over its configuration file.
fn overrides_config(var: &std::ffi::OsStr) -> bool {
    var.to_str().is_some_and(|v| {
        v.starts_with("CREDIT_WORKER__")
            || matches!(v, "CREDIT_WORKER_CONFIG" | "DATABASE_URL" | "AMQP_URL")
    })
}

/// Means over the run from the worker's own metrics: where a message's time goes.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub(crate) struct Breakdown {
    pub batches: f64,
    pub mean_batch_size: f64,
    /// Decode + decision transaction + ack, per batch.
    pub mean_decide_ms: f64,
    /// Of which decode + decision transaction (up to its commit).
    pub mean_transaction_ms: f64,
    /// Of which the multiple-ack.
    pub mean_ack_ms: f64,
    pub outbox_rounds: f64,
    /// Publish + confirms + watermark update + commit, per outbox round.
    pub mean_outbox_round_ms: f64,
    pub decide_retries: f64,
}

impl Breakdown {
    fn parse(text: &str) -> Breakdown {
        let value = |name: &str| -> f64 {
            text.lines()
                .filter(|l| {
                    l.strip_prefix(name)
                        .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
                })
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                // An empty float sum is -0.0; start from +0.0.
                .fold(0.0, |a, b| a + b)
        };
        let per = |sum: f64, count: f64| if count > 0.0 { sum / count } else { 0.0 };
        let batches = value("credit_batch_size_count");
        let rounds = value("credit_outbox_publish_seconds_count");
        Breakdown {
            batches,
            mean_batch_size: per(value("credit_batch_size_sum"), batches),
            mean_decide_ms: per(
                value("credit_decide_seconds_sum"),
                value("credit_decide_seconds_count"),
            ) * 1e3,
            mean_transaction_ms: per(
                value("credit_decide_transaction_seconds_sum"),
                value("credit_decide_transaction_seconds_count"),
            ) * 1e3,
            mean_ack_ms: per(
                value("credit_ack_seconds_sum"),
                value("credit_ack_seconds_count"),
            ) * 1e3,
            outbox_rounds: rounds,
            mean_outbox_round_ms: per(value("credit_outbox_publish_seconds_sum"), rounds) * 1e3,
            decide_retries: value("credit_decide_retries_total"),
        }
    }
}

impl std::fmt::Display for Breakdown {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:.0} batches of {:.1} msgs, {:.2} ms each (decode + transaction {:.2} ms, ack \
             {:.2} ms); {:.0} outbox rounds of {:.2} ms; {:.0} retries",
            self.batches,
            self.mean_batch_size,
            self.mean_decide_ms,
            self.mean_transaction_ms,
            self.mean_ack_ms,
            self.outbox_rounds,
            self.mean_outbox_round_ms,
            self.decide_retries
        )
    }
}

/// The worker's breakdown once its last batch and outbox round are recorded: the last event
/// arrives before the worker times the ack and the round's commit, so it is read until two
/// reads 50 ms apart agree (at most half a second).
async fn settled_breakdown(addr: std::net::SocketAddr) -> Option<Breakdown> {
    let mut last = Breakdown::parse(&scrape(addr).await.ok()?);
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let Ok(text) = scrape(addr).await else { break };
        let now = Breakdown::parse(&text);
        let settled = (now.batches, now.outbox_rounds) == (last.batches, last.outbox_rounds);
        last = now;
        if settled && last.outbox_rounds > 0.0 {
            break;
        }
    }
    Some(last)
}

/// GET /metrics over a bare socket (one request; no HTTP client needed).
async fn scrape(addr: std::net::SocketAddr) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .await?;
    let mut body = String::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut body)).await??;
    Ok(body)
}

/// `VmHWM` (peak resident set) of a process, in KiB; None once it is gone.
fn vm_hwm_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}
