//! The worker under a sustained-rate search: one `credit-worker run` process (as in the other
//! modes: own namespace, database and configuration file) for every step and the half-rate
//! step; after each step its decisions are counted, after the run the whole ledger is
//! verified like the other modes.

use std::time::Instant;

use sqlx::PgPool;

use super::step::{Pipeline, Step};
use super::{Cursor, SearchSpec, Searched};
use crate::amqp::topology;
use crate::amqp::Publisher;
use crate::config::Settings;
use crate::tools::bench::traffic::{self, Sink, Traffic};
use crate::tools::bench::worker::{
    self as bench_worker, Awaiting, Breakdown, PairsResult, WorkerProcess,
};
use crate::tools::scratch::Scratch;

/// What the worker's search measured and verified.
#[derive(Debug)]
pub(crate) struct WorkerSustained {
    pub searched: Searched,
    /// One step at half the sustained rate.
    pub half_rate: Option<Step>,
    pub peak_rss_mib: f64,
    pub breakdown: Option<Breakdown>,
    pub executions: usize,
    pub events_received: usize,
    pub fees: i64,
    pub pairs: Option<PairsResult>,
    pub problems: Vec<String>,
}

struct WorkerPipeline {
    proc: WorkerProcess,
    queue: String,
    sink: Sink,
    pool: PgPool,
    problems: Vec<String>,
}

impl Pipeline for WorkerPipeline {
    fn input_queue(&self) -> &str {
        &self.queue
    }

    fn sink(&self) -> &Sink {
        &self.sink
    }

    /// A USAGE event; with pairs a SETTLE one too, unless the completion came first (then
    /// the execution is charged its post-flight price at once).
    fn events_per_execution(&self, slice: &Traffic, i: usize) -> u8 {
        if slice.is_pairs() && !traffic::overtakes(i) {
            2
        } else {
            1
        }
    }

    /// A start that comes after its completion yields no event: the completion is timed.
    fn timed_slot(&self, slice: &Traffic, i: usize) -> usize {
        slice.last_event_slot(i)
    }

    fn check_alive(&mut self) -> anyhow::Result<()> {
        self.proc.check_alive()
    }

    /// Every execution published so far is decided once.
    async fn after_step(&mut self, executions: usize) -> anyhow::Result<()> {
        let decided: i64 = sqlx::query_scalar("SELECT count(*) FROM credit.decisions")
            .fetch_one(&self.pool)
            .await?;
        if decided != executions as i64 {
            self.problems.push(format!(
                "{decided} decisions once {executions} executions were published and their events received"
            ));
        }
        Ok(())
    }
}

pub(crate) async fn run(
    settings: &Settings,
    scratch: &Scratch,
    base: &Traffic,
    cost: i64,
    max_batch: usize,
    spec: &SearchSpec,
) -> anyhow::Result<WorkerSustained> {
    let amqp = &settings.amqp;
    let pool = crate::db::connect_and_migrate(&scratch.database).await?;
    bench_worker::seed(&pool, base.users).await?;
    let conn = crate::amqp::connect(amqp, "credit-worker bench").await?;
    let ch = conn.create_channel().await?;
    let names = topology::declare(&ch, &scratch.amqp).await?;
    let sink = bench_worker::start_sink(amqp, scratch, base, &ch, &names).await?;
    let mut proc = WorkerProcess::spawn(settings, scratch, max_batch, base.is_pairs())?;
    let spawned = Instant::now();
    bench_worker::wait_for_worker(&ch, &names, &mut proc, spawned, Awaiting::Consumer).await?;
    let mut p = WorkerPipeline {
        proc,
        queue: names.input_queue.clone(),
        sink,
        pool: pool.clone(),
        problems: Vec::new(),
    };
    let (pub_conn, publisher) = super::open_publisher(amqp).await?;
    let mut cursor = Cursor::default();
    let measured = steps(&mut p, &publisher, base, &mut cursor, spec).await;
    let _ = crate::tools::close_connection(pub_conn, "done").await;
    let stopped = bench_worker::stop_worker(&mut p.proc).await;
    let (searched, half_rate) = measured?;
    bench_worker::check_queues_empty(&ch, &names, &mut p.problems).await?;
    let mut r = verify(settings, base, cost, &cursor, p, stopped).await?;
    let _ = crate::tools::close_connection(conn, "done").await;
    pool.close().await;
    r.searched = searched;
    r.half_rate = half_rate;
    Ok(r)
}

/// Once the worker stopped: collects its last events and verifies the whole run's ledger
/// (the first `cursor.next` executions of `base`) like the other modes.
async fn verify(
    settings: &Settings,
    base: &Traffic,
    cost: i64,
    cursor: &Cursor,
    mut p: WorkerPipeline,
    stopped: bench_worker::Stopped,
) -> anyhow::Result<WorkerSustained> {
    let mut problems = p.problems;
    problems.extend(stopped.problems);
    let (seen, ledger_rows) = bench_worker::drain_sink(&p.pool, p.sink).await?;
    let whole = if base.is_pairs() {
        Traffic::pairs(base.run_id, cursor.next, base.users)
    } else {
        Traffic::new(base.run_id, cursor.next, base.users)
    };
    let events = seen.events;
    let (fees, pairs) = bench_worker::verify_run(
        settings,
        &p.pool,
        &whole,
        cost,
        events,
        ledger_rows,
        &mut problems,
    )
    .await?;
    if !problems.is_empty() {
        problems.push(format!("worker log: {}", p.proc.keep_log().display()));
    }
    Ok(WorkerSustained {
        searched: Searched::default(),
        half_rate: None,
        peak_rss_mib: stopped.peak_kib as f64 / 1024.0,
        breakdown: stopped.breakdown,
        executions: cursor.next,
        events_received: events,
        fees,
        // Completions first are counted per step: each step has a schedule of its own.
        pairs: pairs.map(|r| PairsResult {
            overtaking: cursor.overtaking,
            ..r
        }),
        problems,
    })
}

/// The search, then one step at half the sustained rate.
async fn steps(
    p: &mut WorkerPipeline,
    publisher: &Publisher,
    base: &Traffic,
    cursor: &mut Cursor,
    spec: &SearchSpec,
) -> anyhow::Result<(Searched, Option<Step>)> {
    let searched = super::search(p, publisher, base, cursor, spec, "worker").await?;
    let Some(rate) = searched.sustained else {
        return Ok((searched, None));
    };
    let half = (rate / 2.0).round().max(1.0);
    let step = super::one_step(p, publisher, base, cursor, half, spec.step, "half").await?;
    Ok((searched, Some(step)))
}
