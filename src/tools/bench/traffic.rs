//! What the bench sends and receives: AutoGPT-shaped NodeExecutionEntry bodies, backlog and
//! paced publishing, and the event sink that times every `balance.changed`.

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use futures::StreamExt;
use lapin::options::BasicConsumeOptions;
use lapin::types::FieldTable;
use serde::Deserialize;
use serde_json::json;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::amqp::publisher::confirmed;
use crate::amqp::{PublishError, Publisher};
use crate::config::{AmqpSettings, Settings};
use crate::tools::publish::to_queue;

/// AITextGeneratorBlock with gpt-4-turbo and the platform's OpenAI credential: a paid
/// execution in the shipped cost table.
pub(crate) const BLOCK_ID: &str = "1f292d4a-41a4-4977-9684-7c8d560b9f91";
pub(crate) const PLATFORM_OPENAI_CREDENTIAL: &str = "53c25cb8-e3ee-465c-a4d1-e75a4c899c2a";

/// Messages published per confirm window.
pub(crate) const WINDOW: usize = 1000;

/// gpt-4-turbo's rates in the pairs' cost table, credits per 10⁶ tokens.
pub(crate) const INPUT_RATE: u64 = 1500;
pub(crate) const OUTPUT_RATE: u64 = 4500;
/// The pre-flight price of a pairs execution (the `tokens` entry's cost_amount).
pub(crate) const PAIRS_PREFLIGHT: i64 = 10;
/// A completion follows its start by this many starts.
const PAIR_LAG: usize = 5;

/// The cost table of `--pairs`: the bench's block as a `tokens` entry, so the run does not
/// depend on what the built-in table says about it.
pub(crate) fn pairs_cost_table() -> String {
    format!(
        "[[block]]\nid = \"{BLOCK_ID}\"\nname = \"AITextGeneratorBlock\"\n\
         costs = [ {{ cost_amount = {PAIRS_PREFLIGHT}, cost_type = \"tokens\", cost_filter = {{ \
         model = \"gpt-4-turbo\", credentials = {{ id = \"{PLATFORM_OPENAI_CREDENTIAL}\", \
         provider = \"openai\", type = \"api_key\" }} }} }} ]\n\n\
         [token_rates]\n\"gpt-4-turbo\" = {{ input = {INPUT_RATE}, output = {OUTPUT_RATE} }}\n"
    )
}

/// One published message of a pairs run: execution i's start or completion.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Slot {
    Start(usize),
    Completion(usize),
}

/// The publish order of a pairs run and, per execution, the slots of its later message and
/// of its completion.
#[derive(Debug)]
struct Schedule {
    slots: Vec<Slot>,
    last_slot: Vec<usize>,
    completion_slot: Vec<usize>,
}

impl Schedule {
    /// Completion i after start i + PAIR_LAG, so a batch holds both orders of neighbouring
    /// executions; every tenth completion (from PAIR_LAG on) PAIR_LAG starts before its own
    /// start, so the worker also sees completions that overtake their start.
    fn new(n: usize) -> Schedule {
        let mut slots = Vec::with_capacity(2 * n);
        for j in 0..n + PAIR_LAG {
            if j + PAIR_LAG < n && overtakes(j + PAIR_LAG) {
                slots.push(Slot::Completion(j + PAIR_LAG));
            }
            if j < n {
                slots.push(Slot::Start(j));
            }
            if j >= PAIR_LAG && !overtakes(j - PAIR_LAG) {
                slots.push(Slot::Completion(j - PAIR_LAG));
            }
        }
        let mut last_slot = vec![0; n];
        let mut completion_slot = vec![0; n];
        for (m, s) in slots.iter().enumerate() {
            if let Slot::Completion(i) = *s {
                completion_slot[i] = m;
            }
            let (Slot::Start(i) | Slot::Completion(i)) = *s;
            last_slot[i] = last_slot[i].max(m);
        }
        Schedule {
            slots,
            last_slot,
            completion_slot,
        }
    }
}

/// Whether execution i's completion is published before its start.
pub(crate) fn overtakes(i: usize) -> bool {
    i >= PAIR_LAG && i % 10 == 7
}

/// Execution i's token counts: deterministic, spread so that post-flight prices range over
/// about 4..18 credits around the pre-flight 10, and never equal it (each execution started
/// first then yields a SETTLE row: an extra charge or a refund).
pub(crate) fn tokens(i: usize) -> (u64, u64) {
    let input = 1000 + (i as u64 * 37) % 3000;
    let mut output = 500 + (i as u64 * 91) % 2000;
    if post_price(input, output) == PAIRS_PREFLIGHT {
        output += 250;
    }
    (input, output)
}

/// ceil((in × 1500 + out × 4500) / 10⁶) in integers: the bench's own post-flight price.
pub(crate) fn post_price(input: u64, output: u64) -> i64 {
    let micro = input * INPUT_RATE + output * OUTPUT_RATE;
    i64::try_from(micro.div_ceil(1_000_000)).unwrap_or(i64::MAX)
}

/// N executions round-robin over U users, with ids that map back to the execution index;
/// with `pairs`, each is a start and a completion message.
#[derive(Debug, Clone)]
pub(crate) struct Traffic {
    pub run_id: u32,
    /// Executions (node_exec_ids).
    pub messages: usize,
    pub users: usize,
    /// Execution 0's index in the id space this traffic is cut from (0 unless a slice).
    first: usize,
    schedule: Option<Arc<Schedule>>,
}

impl Traffic {
    pub fn new(run_id: u32, messages: usize, users: usize) -> Self {
        Traffic {
            run_id,
            messages,
            users,
            first: 0,
            schedule: None,
        }
    }

    /// An id space of `capacity` executions that is only cut into slices
    /// ([`Traffic::slice`]), never published whole.
    pub(crate) fn id_space(run_id: u32, capacity: usize, users: usize, pairs: bool) -> Self {
        Traffic {
            schedule: pairs.then(|| Arc::new(Schedule::new(0))),
            ..Self::new(run_id, capacity, users)
        }
    }

    /// Executions `first..first + executions` as a traffic of their own: indices from 0;
    /// ids, users and token counts those of the whole; with pairs, a schedule of their own.
    pub(crate) fn slice(&self, first: usize, executions: usize) -> Self {
        Traffic {
            run_id: self.run_id,
            messages: executions,
            users: self.users,
            first: self.first + first,
            schedule: self
                .schedule
                .as_ref()
                .map(|_| Arc::new(Schedule::new(executions))),
        }
    }

    /// Execution i's index in the whole id space.
    pub(crate) fn global_index(&self, i: usize) -> usize {
        self.first + i
    }

    /// The executions the first `sent` slots begin, and all before the last one begun: the
    /// executions published once [`Traffic::completing_slots`] are sent too.
    pub(crate) fn executions_begun(&self, sent: usize) -> usize {
        match &self.schedule {
            None => sent.min(self.messages),
            Some(s) => s
                .slots
                .iter()
                .take(sent)
                .map(|&(Slot::Start(i) | Slot::Completion(i))| i + 1)
                .max()
                .unwrap_or(0),
        }
    }

    /// After publishing stopped at `sent` slots: the later slots, in publish order, that
    /// complete the first [`Traffic::executions_begun`] executions, so that every execution
    /// published is whole (a start without its completion would never settle).
    pub(crate) fn completing_slots(&self, sent: usize) -> Vec<usize> {
        let Some(s) = &self.schedule else {
            return Vec::new();
        };
        let begun = self.executions_begun(sent);
        (sent..s.slots.len())
            .filter(|&m| matches!(s.slots[m], Slot::Start(i) | Slot::Completion(i) if i < begun))
            .collect()
    }

    /// `executions` start + completion pairs.
    pub fn pairs(run_id: u32, executions: usize, users: usize) -> Self {
        Traffic {
            schedule: Some(Arc::new(Schedule::new(executions))),
            ..Self::new(run_id, executions, users)
        }
    }

    pub(crate) fn is_pairs(&self) -> bool {
        self.schedule.is_some()
    }

    /// Messages to publish.
    pub fn published(&self) -> usize {
        self.schedule
            .as_ref()
            .map_or(self.messages, |s| s.slots.len())
    }

    /// The body published in slot m.
    pub(crate) fn body_at(&self, m: usize) -> Vec<u8> {
        match self.schedule.as_ref().and_then(|s| s.slots.get(m)) {
            None => self.body(m),
            Some(Slot::Start(i)) => self.body(*i),
            Some(Slot::Completion(i)) => self.completion_body(*i),
        }
    }

    /// The slot of execution i's last message: the broker-only pipeline's latency is timed
    /// from it (each message yields an event).
    pub(crate) fn last_slot(&self, i: usize) -> usize {
        self.schedule
            .as_ref()
            .and_then(|s| s.last_slot.get(i).copied())
            .unwrap_or(i)
    }

    /// The slot of the message that yields execution i's last event in the worker: its later
    /// message, except for a completion that overtook its start (the start is then a
    /// duplicate and yields none). The worker's latency is timed from it.
    pub(crate) fn last_event_slot(&self, i: usize) -> usize {
        if !self.is_pairs() || !overtakes(i) {
            return self.last_slot(i);
        }
        self.schedule
            .as_ref()
            .and_then(|s| s.completion_slot.get(i).copied())
            .unwrap_or(i)
    }

    pub fn user_id(u: usize) -> String {
        format!("00000000-0000-4000-8000-{u:012x}")
    }

    fn node_prefix(&self) -> String {
        format!("{:08x}-0000-4000-9000-", self.run_id)
    }

    pub fn node_exec_id(&self, i: usize) -> String {
        format!("{}{:012x}", self.node_prefix(), self.first + i)
    }

    /// The message index of one of this run's node_exec_ids.
    pub(crate) fn index_of(&self, node_exec_id: &str) -> Option<usize> {
        let hex = node_exec_id.strip_prefix(&self.node_prefix())?;
        let i = usize::from_str_radix(hex, 16)
            .ok()?
            .checked_sub(self.first)?;
        (i < self.messages).then_some(i)
    }

    /// Message `i`: the shape and size (~600 bytes) of AutoGPT's executor messages.
    pub fn body(&self, i: usize) -> Vec<u8> {
        self.entry(i).to_string().into_bytes()
    }

    /// Execution i's completion: its start entry with the phase, status and token counts.
    pub(crate) fn completion_body(&self, i: usize) -> Vec<u8> {
        let mut entry = self.entry(i);
        let (input, output) = tokens(self.first + i);
        if let Some(e) = entry.as_object_mut() {
            e.insert("phase".into(), json!("completed"));
            e.insert("status".into(), json!("COMPLETED"));
            e.insert(
                "stats".into(),
                json!({
                    "input_token_count": input,
                    "output_token_count": output,
                    "walltime": 1.25,
                    "input_size": 240,
                }),
            );
        }
        entry.to_string().into_bytes()
    }

    /// The user execution `i` bills.
    pub(crate) fn user_of(&self, i: usize) -> String {
        Self::user_id((self.first + i) % self.users)
    }

    fn entry(&self, i: usize) -> serde_json::Value {
        let g = self.first + i;
        let user = self.user_of(i);
        json!({
            "user_id": user,
            "graph_exec_id": format!("{:08x}-0000-4000-a000-{:012x}", self.run_id, g / 10),
            "graph_id": format!("00000000-0000-4000-b000-{:012x}", (g / 10) % 50 + 1),
            "graph_version": 1,
            "node_exec_id": self.node_exec_id(i),
            "node_id": format!("00000000-0000-4000-c000-{:012x}", g % 7 + 1000),
            "block_id": BLOCK_ID,
            "inputs": {
                "prompt": "Write a haiku about credits.",
                "model": "gpt-4-turbo",
                "credentials": {
                    "id": PLATFORM_OPENAI_CREDENTIAL,
                    "provider": "openai",
                    "type": "api_key",
                },
            },
            "execution_context": {
                "user_id": user,
                "dry_run": false,
                "user_timezone": "UTC",
            },
        })
    }

    /// The block cost of every message under the configured cost table; the verification
    /// needs it and a free message would measure nothing.
    pub(crate) fn expected_cost(&self, settings: &Settings) -> anyhow::Result<i64> {
        let costs = if self.is_pairs() {
            crate::cost::CostTable::from_toml_str(&pairs_cost_table(), "the pairs cost table")?
        } else {
            crate::service::load_costs(settings)?
        };
        let entry = crate::message::decode(&self.body(0))?;
        let price = costs.price(&entry.block_id, &entry.inputs, entry.stats.as_ref())?;
        if price.cost <= 0 {
            anyhow::bail!(
                "the cost table prices the bench's messages at {}; they must be charged",
                price.cost
            );
        }
        Ok(price.cost)
    }
}

/// Publishes every message to `queue` in confirmed windows, as fast as the broker takes
/// them. Returns each message's publish instant (its window's start: confirms are awaited
/// per window) and the publish rate.
pub(crate) async fn publish_backlog(
    amqp: &AmqpSettings,
    queue: &str,
    traffic: &Traffic,
    bar: &indicatif::ProgressBar,
) -> anyhow::Result<(Vec<Instant>, f64)> {
    let conn = crate::amqp::connect(amqp, "credit-worker bench publisher").await?;
    let publisher = Publisher::open(&conn).await?;
    let total = traffic.published();
    let mut published = Vec::with_capacity(total);
    let started = Instant::now();
    let mut start = 0;
    while start < total {
        let end = (start + WINDOW).min(total);
        let bodies: Vec<Vec<u8>> = (start..end).map(|m| traffic.body_at(m)).collect();
        let at = Instant::now();
        crate::tools::publish::publish_window(&publisher, queue, bodies.iter().map(Vec::as_slice))
            .await?;
        published.extend(std::iter::repeat_n(at, end - start));
        bar.set_position(end as u64);
        start = end;
    }
    let rate = total as f64 / started.elapsed().as_secs_f64().max(1e-9);
    let _ = crate::tools::close_connection(conn, "done").await;
    Ok((published, rate))
}

/// Publishes message i at `start + i / rate` on a connection of its own (see [`pace`]).
/// Returns `start`, from which each message's intended send time follows, so a publisher that
/// falls behind cannot hide queueing delay.
pub(crate) async fn publish_paced(
    amqp: &AmqpSettings,
    queue: &str,
    traffic: &Traffic,
    rate: f64,
    bar: &indicatif::ProgressBar,
) -> anyhow::Result<Instant> {
    let conn = crate::amqp::connect(amqp, "credit-worker bench publisher").await?;
    let publisher = Publisher::open(&conn).await?;
    let start = Instant::now();
    let never = CancellationToken::new();
    pace(&publisher, queue, traffic, rate, start, &never, bar).await?;
    let _ = crate::tools::close_connection(conn, "done").await;
    Ok(start)
}

/// Publishes slot m at `start + m / rate` until every slot is sent or `stop` is cancelled
/// (open loop: sends never wait for confirms or for the consumer; confirms are awaited per
/// window in the background). Returns the slots sent, all confirmed.
pub(crate) async fn pace(
    publisher: &Publisher,
    queue: &str,
    traffic: &Traffic,
    rate: f64,
    start: Instant,
    stop: &CancellationToken,
    bar: &indicatif::ProgressBar,
) -> anyhow::Result<usize> {
    let mut windows: Vec<JoinHandle<Result<usize, PublishError>>> = Vec::new();
    let mut pending = Vec::with_capacity(WINDOW);
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let total = traffic.published();
    let mut sent = 0;
    while sent < total && !stop.is_cancelled() {
        tick.tick().await;
        let due = ((start.elapsed().as_secs_f64() * rate) as usize + 1).min(total);
        // The tick's messages go out together (see `Publisher::send_all`), in windows of
        // confirms: the load generator shares the cores of the pipeline it measures, so it
        // must cost little.
        while sent < due {
            let upto = due.min(sent + WINDOW - pending.len());
            let bodies: Vec<Vec<u8>> = (sent..upto).map(|m| traffic.body_at(m)).collect();
            let messages = to_queue(queue, bodies.iter().map(Vec::as_slice));
            pending.extend(publisher.send_all(messages).await?);
            sent = upto;
            if pending.len() == WINDOW {
                windows.push(tokio::spawn(confirmed(std::mem::take(&mut pending))));
            }
        }
        bar.set_position(sent as u64);
    }
    windows.push(tokio::spawn(confirmed(pending)));
    for w in windows {
        w.await??;
    }
    Ok(sent)
}

/// Publishes `slots` of `traffic` at once and awaits their confirms.
pub(crate) async fn publish_slots(
    publisher: &Publisher,
    queue: &str,
    traffic: &Traffic,
    slots: &[usize],
) -> anyhow::Result<()> {
    if slots.is_empty() {
        return Ok(());
    }
    let bodies: Vec<Vec<u8>> = slots.iter().map(|&m| traffic.body_at(m)).collect();
    crate::tools::publish::publish_window(publisher, queue, bodies.iter().map(Vec::as_slice))
        .await?;
    Ok(())
}

/// Counts seen by the sink while it runs.
#[derive(Default)]
pub(crate) struct SinkProgress {
    /// Distinct node executions whose USAGE `balance.changed` arrived.
    pub charged: AtomicUsize,
    /// Every event received.
    pub events: AtomicUsize,
    /// Signalled once `charged` reaches the number of messages.
    pub complete: Notify,
}

/// What the sink saw (per execution, indexed as the traffic's `index_of` says; the vectors
/// grow as executions arrive).
#[derive(Debug, Default)]
pub(crate) struct SinkResult {
    /// Arrival of each message's USAGE `balance.changed`.
    pub received: Vec<Option<Instant>>,
    /// Arrival of the last new USAGE event.
    pub last: Option<Instant>,
    /// Arrival of each execution's latest USAGE or SETTLE `balance.changed`.
    pub settled: Vec<Option<Instant>>,
    /// Arrival of the last USAGE or SETTLE `balance.changed` of any execution.
    pub last_any: Option<Instant>,
    /// USAGE and SETTLE `balance.changed` events received per execution.
    pub counts: Vec<u8>,
    /// Distinct events received (by `message_id`): a redelivered one counts once, so a
    /// duplicate cannot stand in for an event that never came.
    pub events: usize,
    /// The `message_id`s received.
    ids: HashSet<String>,
}

impl SinkResult {
    /// Notes execution i's USAGE (or SETTLE) event arriving `now`; true when it is the
    /// execution's first USAGE event.
    fn record(&mut self, i: usize, usage: bool, now: Instant) -> bool {
        if self.settled.len() <= i {
            self.settled.resize(i + 1, None);
            self.received.resize(i + 1, None);
            self.counts.resize(i + 1, 0);
        }
        self.settled[i] = Some(now);
        self.counts[i] = self.counts[i].saturating_add(1);
        self.last_any = Some(now);
        if !usage {
            return false;
        }
        if self.received[i].is_some() {
            return false;
        }
        self.received[i] = Some(now);
        self.last = Some(now);
        true
    }
}

fn lock(seen: &Mutex<SinkResult>) -> MutexGuard<'_, SinkResult> {
    seen.lock().unwrap_or_else(PoisonError::into_inner)
}

pub(crate) struct Sink {
    pub progress: Arc<SinkProgress>,
    /// What it saw so far, read while it runs with [`Sink::inspect`].
    seen: Arc<Mutex<SinkResult>>,
    stop: CancellationToken,
    task: JoinHandle<anyhow::Result<()>>,
}

/// Only the fields the sink needs; the rest of the body is skipped.
#[derive(Deserialize)]
struct EventFields {
    #[serde(rename = "type")]
    kind: Option<String>,
    transaction_key: Option<String>,
    node_exec_id: Option<String>,
}

/// The execution a USAGE or SETTLE `balance.changed` belongs to, and whether it is the
/// USAGE one.
fn execution_event(traffic: &Traffic, ev: &EventFields) -> Option<(usize, bool)> {
    if ev.kind.as_deref() != Some(crate::events::BALANCE_CHANGED) {
        return None;
    }
    let key = ev.transaction_key.as_deref()?;
    let usage = key.starts_with("USAGE-");
    if !usage && !key.starts_with("SETTLE-") {
        return None;
    }
    let i = traffic.index_of(ev.node_exec_id.as_deref()?)?;
    Some((i, usage))
}

impl Sink {
    /// Consumes `queue` (auto-ack: the sink is measuring equipment, not a system under test).
    pub async fn start(
        amqp: &AmqpSettings,
        queue: &str,
        traffic: &Traffic,
    ) -> anyhow::Result<Sink> {
        let conn = crate::amqp::connect(amqp, "credit-worker bench sink").await?;
        let ch = conn.create_channel().await?;
        let deliveries = ch
            .basic_consume(
                queue.into(),
                "credit-worker-bench-sink".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
        let progress = Arc::new(SinkProgress::default());
        let seen = Arc::new(Mutex::new(SinkResult::default()));
        let stop = CancellationToken::new();
        let task = tokio::spawn(consume_events(
            deliveries,
            traffic.clone(),
            progress.clone(),
            seen.clone(),
            stop.clone(),
        ));
        let task = tokio::spawn(async move {
            let consumed = task.await;
            let _ = ch.close(200, "done".into()).await;
            let _ = crate::tools::close_connection(conn, "done").await;
            consumed?
        });
        Ok(Sink {
            progress,
            seen,
            stop,
            task,
        })
    }

    /// Reads what the sink has seen so far (briefly holding it up: keep `f` short).
    pub(crate) fn inspect<R>(&self, f: impl FnOnce(&SinkResult) -> R) -> R {
        f(&lock(&self.seen))
    }

    pub fn charged(&self) -> usize {
        self.progress.charged.load(Ordering::Relaxed)
    }

    pub fn events(&self) -> usize {
        self.progress.events.load(Ordering::Relaxed)
    }

    pub(crate) fn is_finished(&self) -> bool {
        self.task.is_finished()
    }

    /// Waits until every message's event arrived, updating `bar`. Fails when nothing new
    /// arrives for `stall`, or when `alive` says the producer side died.
    pub(crate) async fn wait_complete(
        &self,
        total: usize,
        bar: &indicatif::ProgressBar,
        stall: Duration,
        mut alive: impl FnMut() -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        let mut last_seen = 0;
        let mut last_change = Instant::now();
        loop {
            let done = tokio::select! {
                () = self.progress.complete.notified() => true,
                () = tokio::time::sleep(Duration::from_millis(100)) => false,
            };
            let seen = self.charged();
            bar.set_position(seen as u64);
            if done || seen >= total {
                return Ok(());
            }
            if self.is_finished() {
                anyhow::bail!("the event consumer stopped after {seen} of {total} events");
            }
            alive()?;
            if seen != last_seen {
                last_seen = seen;
                last_change = Instant::now();
            } else if last_change.elapsed() > stall {
                anyhow::bail!(
                    "no progress for {} s: {seen} of {total} balance.changed events received",
                    stall.as_secs()
                );
            }
        }
    }

    pub async fn finish(self) -> anyhow::Result<SinkResult> {
        self.stop.cancel();
        self.task.await??;
        Ok(std::mem::take(&mut *lock(&self.seen)))
    }
}

/// The sink's consumer: times every execution's events into `seen` until `stop`.
async fn consume_events(
    mut deliveries: lapin::Consumer,
    traffic: Traffic,
    progress: Arc<SinkProgress>,
    seen: Arc<Mutex<SinkResult>>,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let mut charged = 0;
    loop {
        let d = tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            d = deliveries.next() => d,
        };
        let d = match d {
            Some(Ok(d)) => d,
            Some(Err(e)) => return Err(e.into()),
            None => return Ok(()),
        };
        let now = Instant::now();
        let id = d.properties.message_id().as_ref().map(|id| id.to_string());
        let execution = serde_json::from_slice::<EventFields>(&d.data)
            .ok()
            .and_then(|ev| execution_event(&traffic, &ev));
        let (events, first_usage) = {
            let mut r = lock(&seen);
            // A redelivery of an event already received.
            if id.is_some_and(|id| !r.ids.insert(id)) {
                continue;
            }
            r.events += 1;
            let first = execution.is_some_and(|(i, usage)| r.record(i, usage, now));
            (r.events, first)
        };
        progress.events.store(events, Ordering::Relaxed);
        if first_usage {
            charged += 1;
            progress.charged.store(charged, Ordering::Relaxed);
            if charged == traffic.messages {
                progress.complete.notify_one();
            }
        }
    }
}

/// Publish → event latency percentiles.
#[derive(Debug, Clone)]
pub(crate) struct Latency {
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub samples: usize,
}

impl Latency {
    /// Nearest-rank percentiles over the messages whose event arrived.
    pub fn of(sent: impl Fn(usize) -> Instant, received: &[Option<Instant>]) -> Option<Latency> {
        let mut ms: Vec<f64> = received
            .iter()
            .enumerate()
            .filter_map(|(i, r)| {
                r.map(|r| r.saturating_duration_since(sent(i)).as_secs_f64() * 1e3)
            })
            .collect();
        Self::of_ms(&mut ms)
    }

    /// Nearest-rank percentiles of latencies in milliseconds (sorted in place).
    pub(crate) fn of_ms(ms: &mut [f64]) -> Option<Latency> {
        if ms.is_empty() {
            return None;
        }
        ms.sort_unstable_by(f64::total_cmp);
        let rank = |p: f64| ms[((p * ms.len() as f64).ceil() as usize).clamp(1, ms.len()) - 1];
        Some(Latency {
            p50_ms: rank(0.50),
            p99_ms: rank(0.99),
            max_ms: ms[ms.len() - 1],
            samples: ms.len(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_ids_map_back_and_bodies_are_valid_entries() {
        let t = Traffic::new(0xabcd, 2500, 7);
        for i in [0, 1, 999, 2499] {
            assert_eq!(t.index_of(&t.node_exec_id(i)), Some(i));
            let e = crate::message::decode(&t.body(i)).unwrap();
            assert_eq!(e.user_id, Traffic::user_id(i % 7));
            assert_eq!(e.node_exec_id, t.node_exec_id(i));
        }
        assert_eq!(t.index_of(&t.node_exec_id(2500)), None);
        assert_eq!(Traffic::new(1, 10, 1).index_of(&t.node_exec_id(0)), None);
        let len = t.body(0).len();
        assert!((550..700).contains(&len), "{len}");
    }

    #[test]
    fn pairs_publish_each_start_and_completion_once_in_both_orders() {
        let t = Traffic::pairs(7, 1000, 10);
        assert_eq!(t.published(), 2000);
        let s = t.schedule.as_ref().unwrap();
        let (mut starts, mut completions) = (vec![None; 1000], vec![None; 1000]);
        for (m, slot) in s.slots.iter().enumerate() {
            let seen = match *slot {
                Slot::Start(i) => &mut starts[i],
                Slot::Completion(i) => &mut completions[i],
            };
            assert!(seen.replace(m).is_none(), "{slot:?} twice");
        }
        for i in 0..1000 {
            let (st, c) = (starts[i].unwrap(), completions[i].unwrap());
            assert_eq!(overtakes(i), c < st, "{i}");
            assert_eq!(t.last_slot(i), st.max(c));
            // The worker's last event comes from the completion when it overtook its start.
            assert_eq!(t.last_event_slot(i), if c < st { c } else { st.max(c) });
        }
        assert_eq!((0..1000).filter(|&i| overtakes(i)).count(), 100);
    }

    #[test]
    fn the_pairs_table_prices_like_the_bench() {
        let table = crate::cost::CostTable::from_toml_str(&pairs_cost_table(), "t").unwrap();
        let t = Traffic::pairs(7, 3000, 10);
        let start = crate::message::decode(&t.body(0)).unwrap();
        let pre = table.price(&start.block_id, &start.inputs, None).unwrap();
        assert_eq!(pre.cost, PAIRS_PREFLIGHT);
        let (mut more, mut less) = (0, 0);
        for i in 0..3000 {
            let e = crate::message::decode(&t.completion_body(i)).unwrap();
            assert_eq!(e.phase, crate::message::Phase::Completed);
            assert_eq!(e.node_exec_id, t.node_exec_id(i));
            let price = table
                .price(&e.block_id, &e.inputs, e.stats.as_ref())
                .unwrap();
            let (input, output) = tokens(i);
            assert_eq!(price.cost, post_price(input, output), "{i}");
            assert_ne!(price.cost, PAIRS_PREFLIGHT);
            if price.cost > PAIRS_PREFLIGHT {
                more += 1;
            } else {
                less += 1;
            }
        }
        assert!(more > 500 && less > 500, "{more} {less}");
        assert_eq!(post_price(1000, 0), 2);
        assert_eq!(post_price(2000, 1000), 8);
    }

    #[test]
    fn slices_cut_one_id_space_and_map_their_events_back() {
        let whole = Traffic::new(9, 300, 7);
        let space = Traffic::id_space(9, 1 << 40, 7, false);
        let s = space.slice(120, 50);
        assert_eq!(s.published(), 50);
        assert_eq!(s.global_index(3), 123);
        assert_eq!(s.node_exec_id(3), whole.node_exec_id(123));
        assert_eq!(s.body(3), whole.body(123));
        assert_eq!(s.index_of(&whole.node_exec_id(123)), Some(3));
        assert_eq!(s.index_of(&whole.node_exec_id(119)), None);
        assert_eq!(s.index_of(&whole.node_exec_id(170)), None);
        assert_eq!(space.index_of(&whole.node_exec_id(170)), Some(170));
        assert_eq!(s.slice(10, 5).global_index(0), 130);
        assert!(s.completing_slots(20).is_empty());
        assert_eq!(s.executions_begun(20), 20);
    }

    #[test]
    fn pairs_slices_price_like_the_whole_run() {
        let whole = Traffic::pairs(9, 300, 7);
        let s = Traffic::id_space(9, 1 << 40, 7, true).slice(100, 40);
        assert_eq!(s.published(), 80);
        let e = crate::message::decode(&s.completion_body(5)).unwrap();
        assert_eq!(e.node_exec_id, whole.node_exec_id(105));
        assert_eq!(s.completion_body(5), whole.completion_body(105));
    }

    #[test]
    fn an_early_stop_completes_every_execution_begun() {
        let t = Traffic::pairs(3, 100, 4);
        let slots = &t.schedule.as_ref().unwrap().slots;
        for sent in [0, 1, 7, 23, 50, 101, 199, 200] {
            let rest = t.completing_slots(sent);
            let begun = t.executions_begun(sent);
            assert!(rest.iter().all(|&m| m >= sent));
            assert!(rest.windows(2).all(|w| w[0] < w[1]), "publish order");
            let mut count = vec![0; 100];
            for m in (0..sent).chain(rest.iter().copied()) {
                let (Slot::Start(i) | Slot::Completion(i)) = slots[m];
                count[i] += 1;
            }
            // The first `begun` executions whole, none after them.
            assert!(count[..begun].iter().all(|&c| c == 2), "{sent}");
            assert!(count[begun..].iter().all(|&c| c == 0), "{sent}");
        }
        assert_eq!(t.executions_begun(0), 0);
        assert_eq!(t.executions_begun(200), 100);
    }

    #[test]
    fn percentiles_use_nearest_rank() {
        let base = Instant::now();
        let received: Vec<Option<Instant>> = (1..=100)
            .map(|ms| Some(base + Duration::from_millis(ms)))
            .chain([None])
            .collect();
        let l = Latency::of(|_| base, &received).unwrap();
        assert_eq!(l.samples, 100);
        assert!((l.p50_ms - 50.0).abs() < 1e-6);
        assert!((l.p99_ms - 99.0).abs() < 1e-6);
        assert!((l.max_ms - 100.0).abs() < 1e-6);
        assert!(Latency::of(|_| base, &[None]).is_none());
    }
}
