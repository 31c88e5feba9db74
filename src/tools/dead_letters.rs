//! The dead-letter queue for operators (docs/contract.md §9): list its messages without removing
//! them, and replay chosen ones to the input queue.
//!
//! Reading uses `basic.get` without ack and hands every message it keeps back with one
//! `basic.nack` (requeue), so nothing is removed. On a quorum queue each such return counts as a
//! delivery (`x-delivery-count` grows by one per read); the dead queue has no `x-delivery-limit`,
//! so on RabbitMQ 3.x that only changes the header (4.0–4.2 impose a default limit: README). A
//! replay removes a dead copy only after the broker confirmed its copy in the input queue: an
//! interruption leaves at worst a duplicate there, which the worker decides once per
//! `node_exec_id`.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use lapin::options::{BasicAckOptions, BasicGetOptions, BasicNackOptions};
use lapin::types::{AMQPValue, DeliveryTag, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection};
use serde::Serialize;

use crate::amqp::topology::{self, Names};
use crate::amqp::{producer, Outgoing, Publisher};
use crate::config::Settings;
use crate::consumer::DEAD_AT_HEADER;

/// The header naming why the worker dead-lettered a message.
pub(crate) const REASON_HEADER: &str = "x-credit-error";
/// Set by a quorum queue on delivery; a replayed copy starts its own count in the input queue.
const DELIVERY_COUNT_HEADER: &str = "x-delivery-count";
/// Characters of a body shown.
const EXCERPT_CHARS: usize = 120;
/// Messages replayed per batch of confirms.
const WINDOW: usize = 100;

/// One dead message, as shown to an operator.
#[derive(Debug, Clone, Serialize)]
pub struct DeadLetter {
    /// The `x-credit-error` header, else the broker's reason with ` (broker)`; empty when
    /// neither is there.
    pub reason: String,
    /// When it died ([`died_at`]): the later of the worker's `x-credit-dead-at` and the time
    /// of the newest `x-death` entry (seconds); None when neither is there.
    pub died_at: Option<DateTime<Utc>>,
    /// The body's `node_exec_id`, when the body is JSON with that field.
    pub node_exec_id: Option<String>,
    /// The broker user that published it, judged as the worker does with the tool's own
    /// broker user (the worker's, run with its configuration): its verified `user_id`, or the
    /// producer a copy of the worker's names. None for an anonymous message.
    pub producer: Option<String>,
    /// The body's first characters (lossy UTF-8).
    pub excerpt: String,
}

/// What `list` found.
#[derive(Debug, Clone, Serialize)]
pub struct ListReport {
    /// Messages ready in the dead queue when the listing started.
    pub depth: u32,
    pub messages: Vec<DeadLetter>,
}

/// Which dead messages a replay takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selection {
    All,
    NodeExecId(String),
}

/// What `replay` did (or, dry, would do).
#[derive(Debug, Clone, Default, Serialize)]
pub struct ReplayReport {
    pub replayed: usize,
    pub skipped: usize,
    /// With `--dry-run`: the messages a replay would take.
    pub would_replay: Vec<DeadLetter>,
}

/// How long one read of the dead queue may take; the broker answers at once.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// An open connection with a confirmed publisher and a channel for reading the dead queue.
struct Session {
    conn: Connection,
    publisher: Publisher,
    reader: Channel,
    names: Names,
    /// The broker user this session publishes as.
    user: Option<String>,
    /// Whether the dead queue had consumers before this session read it.
    others_consume: bool,
}

impl Session {
    async fn open(settings: &Settings) -> anyhow::Result<Session> {
        let conn = crate::amqp::connect(&settings.amqp, "credit-worker dead-letters")
            .await
            .map_err(crate::amqp::for_command)?;
        let publisher = Publisher::open(&conn).await?;
        // Not declared: a mistyped namespace would make an empty topology and report it empty.
        let names = Names::new(&settings.amqp.namespace);
        let reader = conn.create_channel().await?;
        let mut session = Session {
            conn,
            publisher,
            reader,
            names,
            user: producer::own_user(&settings.amqp.url),
            others_consume: false,
        };
        session.others_consume = match session.depth_and_consumers().await {
            Ok((_, consumers)) => consumers > 0,
            Err(e) if e.downcast_ref().is_some_and(topology::not_found) => {
                return Err(super::NotFound(format!(
                    "there is no queue {} on this broker: no worker has run with \
                     amqp.namespace {:?} here (is it the namespace meant?)",
                    session.names.dead_queue, settings.amqp.namespace
                ))
                .into())
            }
            Err(e) => return Err(e),
        };
        Ok(session)
    }

    /// Refuses a replay into an input queue that is not there (deleted to change its
    /// arguments, say): every message would come back unroutable.
    async fn check_input_queue(&self) -> anyhow::Result<()> {
        // A channel of its own: the broker closes the one a missing queue was asked on.
        let ch = self.conn.create_channel().await?;
        let queue = self.names.input_queue.as_str();
        match ch
            .queue_declare(queue.into(), topology::passive(), FieldTable::default())
            .await
        {
            Ok(_) => {
                let _ = ch.close(200, "checked".into()).await;
                Ok(())
            }
            Err(e) if topology::not_found(&e) => Err(super::NotFound(format!(
                "there is no queue {queue} to replay into: start a worker (it declares its \
                 queues) first; the dead letters are kept"
            ))
            .into()),
            Err(e) => Err(e.into()),
        }
    }

    /// Messages ready in the dead queue now.
    async fn depth(&self) -> anyhow::Result<u32> {
        Ok(self.depth_and_consumers().await?.0)
    }

    /// Messages ready in the dead queue now, and its consumers.
    async fn depth_and_consumers(&self) -> anyhow::Result<(u32, u32)> {
        let q = self
            .reader
            .queue_declare(
                self.names.dead_queue.as_str().into(),
                topology::passive(),
                FieldTable::default(),
            )
            .await?;
        Ok((q.message_count(), q.consumer_count()))
    }

    /// Up to `max` dead messages, held unacknowledged on the reader channel. With `expected`
    /// (the queue's depth said there were `max`), an empty read is tried again for up to
    /// [`SHORTFALL_WAIT`]: a quorum queue counts a message returned just before (by the last
    /// list or replay) a moment before a read can have it, and neither its count nor an empty
    /// read is to be trusted at once.
    async fn take(
        &self,
        max: usize,
        expected: bool,
    ) -> anyhow::Result<Vec<lapin::message::Delivery>> {
        let mut out = Vec::new();
        let mut empty_since: Option<Instant> = None;
        while out.len() < max {
            let get = self.reader.basic_get(
                self.names.dead_queue.as_str().into(),
                BasicGetOptions { no_ack: false },
            );
            // A delivery the connection cannot read (its properties past the frame size)
            // ends the connection without an answer to the get: fail instead of waiting.
            let Ok(got) = tokio::time::timeout(READ_TIMEOUT, get).await else {
                anyhow::bail!(
                    "dead queue: no message read within {READ_TIMEOUT:?}; one whose headers \
                     exceed the connection's frame size (amqp.url's frame_max, else the \
                     broker's) cannot be read, and the messages this read held are back in \
                     the queue (README, \"A dead letter no client can read\", says how to \
                     read it)"
                );
            };
            let got = got?;
            match got {
                Some(m) => {
                    out.push(m.delivery);
                    empty_since = None;
                }
                None if expected
                    && empty_since.get_or_insert_with(Instant::now).elapsed() < SHORTFALL_WAIT =>
                {
                    tokio::time::sleep(SETTLE_POLL).await;
                }
                None => break,
            }
        }
        Ok(out)
    }

    /// Returns every message still held (up to `last`, `held` of them) to the dead queue,
    /// and closes once the queue has taken back the returns and, when this session `removed`
    /// any, the removals. A quorum queue applies both after the channel has sent them: closed
    /// at once, the channel may lose removals (the dead copy of a replayed message stays), and
    /// returns still under way are not in the depth the next list or replay reads first (it
    /// would stop short of them).
    async fn finish(
        self,
        mut last: Option<DeliveryTag>,
        mut held: usize,
        removed: bool,
    ) -> anyhow::Result<()> {
        if removed {
            // A read, which the queue answers only after the removals sent before it; made
            // while the messages read are still held, it finds none of them (only one that
            // came meanwhile, returned with them).
            if let Some(d) = self.take(1, false).await?.first() {
                (last, held) = (last.max(Some(d.delivery_tag)), held + 1);
            }
        }
        let before = self.depth().await?;
        if let Some(tag) = last {
            let requeue = BasicNackOptions {
                multiple: true,
                requeue: true,
            };
            self.reader.basic_nack(tag, requeue).await?;
        }
        // Another consumer of the dead queue takes messages meanwhile: no count to wait for.
        // (This session's own reads count as a consumer of a quorum queue: the count taken
        // before it read is the one that tells.)
        if !self.others_consume {
            let returned = u32::try_from(held).unwrap_or(u32::MAX);
            self.await_depth(before.saturating_add(returned)).await?;
        }
        let _ = self.reader.close(200, "done".into()).await;
        let _ = crate::tools::close_connection(self.conn, "done").await;
        Ok(())
    }

    /// Waits, up to [`SETTLE_TIMEOUT`], until the dead queue holds at least `ready` messages.
    async fn await_depth(&self, ready: u32) -> anyhow::Result<()> {
        let start = Instant::now();
        loop {
            let now = self.depth().await?;
            if now >= ready {
                return Ok(());
            }
            if start.elapsed() >= SETTLE_TIMEOUT {
                tracing::warn!(
                    ready = now,
                    expected = ready,
                    "the dead queue has not taken back every message yet; a list or replay \
                     run now may not see them all"
                );
                return Ok(());
            }
            tokio::time::sleep(SETTLE_POLL).await;
        }
    }
}

/// How long a list or replay waits for the dead queue to take back what it returned.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(30);
/// How often it looks meanwhile.
const SETTLE_POLL: Duration = Duration::from_millis(50);
/// How long a read that finds fewer messages than the queue's depth promised keeps trying.
const SHORTFALL_WAIT: Duration = Duration::from_secs(5);

/// Lists up to `limit` dead messages, leaving them all in the queue.
pub async fn list(settings: &Settings, limit: usize) -> anyhow::Result<ListReport> {
    let session = Session::open(settings).await?;
    let depth = session.depth().await?;
    let held = session.take(limit.min(depth as usize), true).await?;
    let me = session.user.as_deref();
    let messages = held.iter().map(|d| describe(d, me)).collect();
    let last = held.last().map(|d| d.delivery_tag);
    session.finish(last, held.len(), false).await?;
    Ok(ListReport { depth, messages })
}

/// Replays the chosen dead messages to the input queue (or, `dry_run`, only reports them).
/// Reads at most the depth seen at the start, so a message that dies again during the replay
/// is not taken twice.
pub async fn replay(
    settings: &Settings,
    selection: &Selection,
    dry_run: bool,
) -> anyhow::Result<ReplayReport> {
    let session = Session::open(settings).await?;
    if !dry_run {
        session.check_input_queue().await?;
    }
    let mut report = ReplayReport::default();
    let last_held = match replay_each(&session, selection, dry_run, &mut report).await {
        Ok(last_held) => last_held,
        // A replay that stops after some were moved says so: they are in the input queue.
        Err(e) if report.replayed > 0 => {
            let moved = report.replayed;
            return Err(e.context(format!(
                "{moved} dead letters were replayed (and removed from the dead queue) before \
                 the replay stopped, and the window it was moving may be in both queues (run \
                 it again: a decided execution changes nothing)"
            )));
        }
        Err(e) => return Err(e),
    };
    // Held still: the skipped, and with --dry-run the chosen too.
    let held = report.skipped + report.would_replay.len();
    session
        .finish(last_held, held, !dry_run && report.replayed > 0)
        .await?;
    Ok(report)
}

/// Reads the dead queue window by window and replays (or, `dry_run`, lists) the chosen
/// letters, counting into `report`; the last delivery still held.
async fn replay_each(
    session: &Session,
    selection: &Selection,
    dry_run: bool,
    report: &mut ReplayReport,
) -> anyhow::Result<Option<DeliveryTag>> {
    let mut left = session.depth().await? as usize;
    let mut last_held = None;
    while left > 0 {
        let batch = session.take(left.min(WINDOW), true).await?;
        if batch.is_empty() {
            break;
        }
        left -= batch.len();
        let (chosen, skipped): (Vec<_>, Vec<_>) =
            batch.into_iter().partition(|d| selection.takes(d));
        report.skipped += skipped.len();
        last_held = max_tag(last_held, skipped.last());
        if dry_run {
            let me = session.user.as_deref();
            report
                .would_replay
                .extend(chosen.iter().map(|d| describe(d, me)));
            last_held = max_tag(last_held, chosen.last());
            continue;
        }
        report.replayed += move_batch(session, &chosen).await?;
    }
    Ok(last_held)
}

fn max_tag(a: Option<DeliveryTag>, d: Option<&lapin::message::Delivery>) -> Option<DeliveryTag> {
    match (a, d.map(|d| d.delivery_tag)) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    }
}

/// Publishes copies of `batch` to the input queue, waits for every confirm, then removes the
/// dead copies.
async fn move_batch(
    session: &Session,
    batch: &[lapin::message::Delivery],
) -> anyhow::Result<usize> {
    let queue = session.names.input_queue.as_str();
    let me = session.user.as_deref();
    let messages = batch.iter().map(|d| Outgoing {
        exchange: "",
        routing_key: queue,
        body: &d.data,
        properties: producer::publishable_by(&replay_properties(&d.properties), me),
        mandatory: true,
    });
    session.publisher.publish_all(messages).await?;
    for d in batch {
        d.ack(BasicAckOptions::default()).await?;
    }
    Ok(batch.len())
}

impl Selection {
    fn takes(&self, d: &lapin::message::Delivery) -> bool {
        match self {
            Selection::All => true,
            Selection::NodeExecId(id) => node_exec_id(&d.data).as_deref() == Some(id.as_str()),
        }
    }
}

/// The dead message's properties without the headers that describe its death or its
/// deliveries.
pub(crate) fn replay_properties(props: &BasicProperties) -> BasicProperties {
    crate::amqp::without_headers(
        props,
        &[REASON_HEADER, DEAD_AT_HEADER, DELIVERY_COUNT_HEADER],
    )
}

/// A dead message as an operator sees it; `me` is the broker user the tool connects as.
fn describe(d: &lapin::message::Delivery, me: Option<&str>) -> DeadLetter {
    DeadLetter {
        reason: reason(&d.properties),
        died_at: died_at(&d.properties),
        node_exec_id: node_exec_id(&d.data),
        producer: crate::amqp::producer::producer(&d.properties, me),
        excerpt: excerpt(&d.data),
    }
}

/// Why the message is dead: the worker's `x-credit-error`, else the broker's own reason for
/// its latest death (`delivery_limit` past the delivery limit, `rejected`, `expired`, …),
/// marked as the broker's; empty when neither is there.
pub fn reason(props: &BasicProperties) -> String {
    let headers = props.headers().as_ref().map(FieldTable::inner);
    let worker = headers.and_then(|h| h.get(REASON_HEADER)).map(header_text);
    match (worker, headers.and_then(latest_death_reason)) {
        (Some(worker), _) => worker,
        (None, Some(broker)) => format!("{broker} (broker)"),
        (None, None) => String::new(),
    }
}

/// When the message died: the later of the worker's stamp and the time of the newest entry
/// of `x-death` (RabbitMQ keeps the first time of each queue and reason, counting repeats),
/// so a stamp that came with the message does not hide a death after it.
pub fn died_at(props: &BasicProperties) -> Option<DateTime<Utc>> {
    let headers = props.headers().as_ref().map(FieldTable::inner)?;
    let stamped = timestamp(headers.get(DEAD_AT_HEADER));
    let broker = timestamp(latest_death(headers).and_then(|death| death.get("time")));
    stamped.max(broker)
}

fn timestamp(value: Option<&AMQPValue>) -> Option<DateTime<Utc>> {
    match value {
        Some(AMQPValue::Timestamp(secs)) => DateTime::from_timestamp(i64::try_from(*secs).ok()?, 0),
        _ => None,
    }
}

/// The reason of the newest entry of RabbitMQ's `x-death`, else `x-first-death-reason`.
fn latest_death_reason(headers: &BTreeMap<ShortString, AMQPValue>) -> Option<String> {
    let from_x_death = latest_death(headers).and_then(|death| death.get("reason").map(header_text));
    from_x_death.or_else(|| headers.get("x-first-death-reason").map(header_text))
}

/// The newest entry of RabbitMQ's `x-death` (newest first; a replayed message keeps its
/// earlier deaths).
fn latest_death(
    headers: &BTreeMap<ShortString, AMQPValue>,
) -> Option<&BTreeMap<ShortString, AMQPValue>> {
    match headers.get("x-death") {
        Some(AMQPValue::FieldArray(deaths)) => match deaths.as_slice().first() {
            Some(AMQPValue::FieldTable(death)) => Some(death.inner()),
            _ => None,
        },
        _ => None,
    }
}

fn header_text(value: &AMQPValue) -> String {
    match value {
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        AMQPValue::ShortString(s) => s.to_string(),
        other => format!("{other:?}"),
    }
}

/// `text` safe to print on a terminal: control characters (a producer's body may carry
/// escape sequences, NUL) are written as escapes.
pub(crate) fn printable(text: &str) -> std::borrow::Cow<'_, str> {
    // Bidirectional overrides and marks too: they reorder what a terminal shows after them.
    let control = |c: char| {
        c.is_control()
            || matches!(c, '\u{061c}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
    };
    if !text.chars().any(control) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if control(c) {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    std::borrow::Cow::Owned(out)
}

/// The body's `node_exec_id`, when the body is a JSON object with that string field. Only
/// that field is built: the rest of a body the worker accepts may be nested past what a
/// whole-document parse takes.
pub fn node_exec_id(body: &[u8]) -> Option<String> {
    crate::consumer::process::MessageIds::peek(body).node_exec_id
}

/// The first [`EXCERPT_CHARS`] characters of `body`, lossy UTF-8, with `…` when cut.
pub(crate) fn excerpt(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let mut out: String = text.chars().take(EXCERPT_CHARS).collect();
    if text.chars().nth(EXCERPT_CHARS).is_some() {
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_for_a_terminal_has_its_control_characters_escaped() {
        assert_eq!(printable("plain é"), "plain é");
        assert_eq!(
            printable("\u{1b}]0;pwned\u{7}\u{1b}[2J x\u{0}\u{9b}"),
            "\\u{1b}]0;pwned\\u{7}\\u{1b}[2J x\\u{0}\\u{9b}"
        );
        assert_eq!(printable("id \u{202e}desrever"), "id \\u{202e}desrever");
    }

    #[test]
    fn the_reason_is_the_workers_else_the_brokers() {
        let with = |pairs: &[(&str, &str)]| {
            let mut h = FieldTable::default();
            for (k, v) in pairs {
                h.insert((*k).into(), AMQPValue::LongString((*v).into()));
            }
            reason(&BasicProperties::default().with_headers(h))
        };
        assert_eq!(
            with(&[("x-credit-error", "inputs: missing")]),
            "inputs: missing"
        );
        assert_eq!(
            with(&[
                ("x-credit-error", "inputs: missing"),
                ("x-first-death-reason", "rejected")
            ]),
            "inputs: missing"
        );
        assert_eq!(
            with(&[("x-first-death-reason", "delivery_limit")]),
            "delivery_limit (broker)"
        );
        assert_eq!(with(&[]), "");
        // Replayed once after a rejection, then dead past the delivery limit: the newest.
        let death = |reason: &str| {
            let mut t = FieldTable::default();
            t.insert("reason".into(), AMQPValue::LongString(reason.into()));
            AMQPValue::FieldTable(t)
        };
        let mut h = FieldTable::default();
        h.insert(
            "x-death".into(),
            AMQPValue::FieldArray(vec![death("delivery_limit"), death("rejected")].into()),
        );
        h.insert(
            "x-first-death-reason".into(),
            AMQPValue::LongString("rejected".into()),
        );
        assert_eq!(
            reason(&BasicProperties::default().with_headers(h)),
            "delivery_limit (broker)"
        );
    }

    #[test]
    fn node_exec_id_only_from_json_with_the_field() {
        assert_eq!(
            node_exec_id(br#"{"node_exec_id":"n1","user_id":"u"}"#).as_deref(),
            Some("n1")
        );
        assert_eq!(node_exec_id(br#"{"node_exec_id":7}"#), None);
        let deep = format!(
            r#"{{"inputs":{{"p":{}1{}}},"node_exec_id":"n2"}}"#,
            "[".repeat(500),
            "]".repeat(500)
        );
        assert_eq!(node_exec_id(deep.as_bytes()).as_deref(), Some("n2"));
        assert_eq!(node_exec_id(b"not json"), None);
        assert_eq!(node_exec_id(b"[1,2]"), None);
        assert_eq!(node_exec_id(br#"["n1","u1"]"#), None);
    }

    #[test]
    fn excerpt_is_lossy_and_cut() {
        assert_eq!(excerpt(b"short"), "short");
        assert_eq!(excerpt(&[b'a', 0xff, b'b']), "a\u{fffd}b");
        let long = "é".repeat(200);
        let e = excerpt(long.as_bytes());
        assert_eq!(e.chars().count(), EXCERPT_CHARS + 1);
        assert!(e.ends_with('…'));
    }

    #[test]
    fn replay_drops_only_the_death_headers() {
        let mut h = FieldTable::default();
        h.insert(REASON_HEADER.into(), AMQPValue::LongString("bad".into()));
        h.insert(DEAD_AT_HEADER.into(), AMQPValue::Timestamp(1_765_000_000));
        h.insert(DELIVERY_COUNT_HEADER.into(), AMQPValue::LongLongInt(3));
        h.insert("trace".into(), AMQPValue::LongString("t1".into()));
        let props = crate::amqp::persistent_json().with_headers(h);
        assert_eq!(reason(&props), "bad");
        let out = replay_properties(&props);
        let kept = out.headers().as_ref().map(|h| h.inner().clone());
        let keys: Vec<String> = kept
            .unwrap_or_default()
            .keys()
            .map(|k| k.to_string())
            .collect();
        assert_eq!(keys, ["trace"]);
        assert_eq!(out.delivery_mode(), &Some(2));
        assert_eq!(reason(&out), "");
        assert_eq!(died_at(&out), None);
    }

    #[test]
    fn the_time_of_death_is_the_workers_else_the_brokers_latest() {
        let at = |secs: i64| DateTime::from_timestamp(secs, 0);
        let death = |secs: u64| {
            let mut t = FieldTable::default();
            t.insert("reason".into(), AMQPValue::LongString("rejected".into()));
            t.insert("time".into(), AMQPValue::Timestamp(secs));
            AMQPValue::FieldTable(t)
        };
        let mut h = FieldTable::default();
        h.insert(
            "x-death".into(),
            AMQPValue::FieldArray(vec![death(1_765_000_300), death(1_765_000_100)].into()),
        );
        let broker = BasicProperties::default().with_headers(h.clone());
        assert_eq!(died_at(&broker), at(1_765_000_300));
        // Replayed after that death, then copied by the worker: the worker's stamp.
        h.insert(DEAD_AT_HEADER.into(), AMQPValue::Timestamp(1_765_000_900));
        let copied = BasicProperties::default().with_headers(h.clone());
        assert_eq!(died_at(&copied), at(1_765_000_900));
        // A stamp older than the broker's death (it came with the message): the death.
        h.insert(DEAD_AT_HEADER.into(), AMQPValue::Timestamp(978_307_200));
        let forged = BasicProperties::default().with_headers(h);
        assert_eq!(died_at(&forged), at(1_765_000_300));
        assert_eq!(died_at(&BasicProperties::default()), None);
        let mut odd = FieldTable::default();
        odd.insert(
            DEAD_AT_HEADER.into(),
            AMQPValue::LongString("yesterday".into()),
        );
        assert_eq!(died_at(&BasicProperties::default().with_headers(odd)), None);
        let mut far = FieldTable::default();
        far.insert(DEAD_AT_HEADER.into(), AMQPValue::Timestamp(u64::MAX));
        assert_eq!(died_at(&BasicProperties::default().with_headers(far)), None);
    }
}
