//! The AMQP side of the input: deliveries from `node_execution` → batches →
//! `process::attempt` on a task per batch → `process::finish` → actions applied (dead-letter,
//! then one multiple-ack).
//!
//! A collector gathers deliveries into a batch (up to `pipeline.max_batch`, waiting at most
//! `pipeline.max_wait_ms` after the first, and filling up to that bound while the decider is
//! busy; deliveries beyond it start the next batches);
//! the decider starts each batch's decision on a task of its own, up to
//! `pipeline.in_flight` at once in their [`Turn`]s, and acks them in delivery order. Acks come
//! only after the decision transaction committed; a transient fault is retried with backoff
//! and never produces a decision or an ack.

mod dead_letter;
mod oversized;
pub mod process;

use std::collections::VecDeque;
use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection};
use tokio::sync::mpsc;
use tokio::task::JoinError;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;
use tracing::info;

use crate::amqp::topology::{self, Names};
use crate::amqp::{self, PublishError, Publisher};
use crate::config::Settings;
use crate::decide::{Follow, Turn};
use crate::health::Health;
use dead_letter::dead_letter;
use oversized::OneAtATime;
use process::{producer_refusal, Action, Attempt, DbDecider, MessageIds};

/// Header naming why a message was dead-lettered.
pub(crate) const ERROR_HEADER: &str = "x-credit-error";
/// When the worker dead-lettered the message (an AMQP timestamp, as `x-death`'s `time`).
pub(crate) const DEAD_AT_HEADER: &str = "x-credit-dead-at";

/// The consumer's tag on the input queue.
const TAG: &str = "credit-worker";

#[derive(Clone)]
pub struct Consumer {
    pub settings: Arc<Settings>,
    pub decider: DbDecider,
    pub health: Arc<Health>,
    /// The broker user `amqp.url` connects as ([`amqp::producer::own_user`]).
    pub own_user: Option<String>,
    /// The database's ledger id, marked on the namespace ([`topology::declare_ledger_mark`]).
    pub ledger_id: Arc<str>,
}

#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("broker: {0}")]
    Amqp(#[from] lapin::Error),
    #[error("dead letter: {0}")]
    DeadLetter(#[from] PublishError),
    #[error("broker: the consumer stream ended")]
    StreamEnded,
    #[error("decider stopped")]
    DeciderGone,
    #[error("broker: the channel closed before the batch was acked")]
    AckNotSent,
    #[error("{0}")]
    Progress(#[from] crate::progress::ProgressError),
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    /// The deliveries to be read one at a time after an oversized one have been: the next
    /// session reads at the full prefetch.
    #[error("read the deliveries that came back with an oversized one alone")]
    ReadAlone,
}

impl SessionError {
    /// What `/readyz` says of it: the broker's words, but of the database's only the kind, as
    /// a server's message may quote a row's values.
    fn probe_text(&self) -> String {
        match self {
            SessionError::Db(_) => "database: a fault (its message is in the log)".into(),
            other => other.to_string(),
        }
    }
}

impl crate::amqp::SessionFault for SessionError {
    fn is_permanent(&self) -> bool {
        match self {
            SessionError::Amqp(e) => crate::amqp::topology::refuses_arguments(e),
            SessionError::Progress(e) => e.is_permanent(),
            _ => false,
        }
    }

    fn why_permanent(&self) -> &'static str {
        match self {
            SessionError::Progress(e) => e.why_permanent(),
            _ => crate::amqp::topology::REFUSED_ARGUMENTS,
        }
    }

    fn resumes_at_once(&self) -> bool {
        matches!(self, SessionError::ReadAlone)
    }
}

/// One connection's worth of consuming.
struct Session {
    conn: Connection,
    ch: Channel,
    dead: Publisher,
    names: Names,
}

impl Consumer {
    /// Consumes until `stop` fires, reconnecting after broker faults. Returns once the batch
    /// in flight is decided and acked.
    pub async fn run(&self, stop: CancellationToken) {
        use amqp::SessionFault as _;
        let alone = OneAtATime::default();
        amqp::reconnecting("consumer", &stop, || async {
            let ended = self.session(&stop, &alone).await;
            // Only for a fault it reconnects from: not at the stop, nor at its last end.
            match &ended {
                Err(e) if !stop.is_cancelled() && !e.is_permanent() && !e.resumes_at_once() => {
                    self.health.set_consumer_fault(&e.probe_text());
                }
                _ => {}
            }
            ended
        })
        .await;
    }

    async fn open(&self, prefetch: u16) -> Result<Session, SessionError> {
        let amqp = &self.settings.amqp;
        let conn = crate::amqp::connect(amqp, "credit-worker consumer").await?;
        let ch = conn.create_channel().await?;
        let names = topology::declare(&ch, amqp).await?;
        topology::declare_ledger_mark(&conn, &names, &self.ledger_id).await?;
        self.check_progress(&conn, &names).await?;
        // Applied on every (re)connect: prefetch is per channel.
        ch.basic_qos(prefetch, BasicQosOptions::default()).await?;
        let dead = Publisher::open_patient(&conn).await?;
        Ok(Session {
            conn,
            ch,
            dead,
            names,
        })
    }

    async fn session(
        &self,
        stop: &CancellationToken,
        alone: &OneAtATime,
    ) -> Result<(), SessionError> {
        let prefetch = self.settings.amqp.prefetch;
        // A stop while connecting ends the session at once: a broker that accepts TCP but
        // never answers holds a connect for up to 15 s, past the 12 s the writers' stop allows.
        let s = tokio::select! {
            s = self.open(alone.limit(prefetch)) => s?,
            _ = stop.cancelled() => return Ok(()),
        };
        let mut events = Box::pin(s.conn.events_listener());
        let _connection = self.health.consumer_session(&s.conn);
        let mut deliveries =
            s.ch.basic_consume(
                s.names.input_queue.as_str().into(),
                TAG.into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        self.health.set_consuming(true);
        info!(queue = %s.names.input_queue, "consuming");

        let (tx, rx) = mpsc::channel::<Vec<Delivery>>(1);
        // Cancelled on shutdown too: the batches in flight are still decided when the database
        // answers, and abandoned (left unacked) rather than retried forever when it does not.
        let decider_stop = stop.child_token();
        // Aborted with the session: a consumer abandoned at shutdown leaves no decider behind
        // to commit after the outbox's last flush.
        let mut decider = AbortOnDropHandle::new(tokio::spawn(decide_loop(
            self.clone(),
            rx,
            s.dead.clone(),
            s.names.clone(),
            decider_stop.clone(),
        )));
        let result = tokio::select! {
            collected = self.collect(&mut deliveries, &tx, stop, alone) => collected,
            e = self.keep_declared(&s.conn) => Err(e),
        };
        // Not consuming from this moment (a fault or a stop), whatever the cleanup below takes.
        self.health.set_consuming(false);
        drop(tx);
        if result
            .as_ref()
            .is_err_and(|e| !matches!(e, SessionError::ReadAlone))
        {
            decider_stop.cancel();
        }
        let decided = self.wind_down(s, &mut decider).await;
        self.health.set_oldest_batch(None);
        alone.after_the_session(&mut events, prefetch);
        match (result, decided) {
            // The decider's own error says why it is gone, or what ended the last batch
            // read alone.
            (Err(SessionError::DeciderGone | SessionError::ReadAlone), Err(e)) => Err(e),
            (result, decided) => result.and(decided),
        }
    }

    /// Stops deliveries, lets the decider finish (or abandon, on a broker fault) its batch and
    /// closes the session. One deadline for every step: each may wait on a broker that stopped
    /// answering, and the writers' stop allows them 12 s in all.
    async fn wind_down(
        &self,
        s: Session,
        decider: &mut AbortOnDropHandle<Result<(), SessionError>>,
    ) -> Result<(), SessionError> {
        let deadline = tokio::time::Instant::now() + CLEANUP;
        let cancel = s.ch.basic_cancel(TAG.into(), BasicCancelOptions::default());
        let _ = tokio::time::timeout_at(deadline, cancel).await;
        let decided = match tokio::time::timeout_at(deadline, &mut *decider).await {
            Ok(ended) => joined(ended).and_then(|decided| decided),
            Err(_) => {
                // Stuck on a dead connection: nothing of its batch was acked, so the broker
                // redelivers it and the ledger's keys make the decisions idempotent.
                decider.abort();
                Err(SessionError::DeciderGone)
            }
        };
        self.health.set_consuming(false);
        let _ = tokio::time::timeout_at(deadline, s.ch.close(200, "shutdown".into())).await;
        let _ = tokio::time::timeout_at(deadline, s.conn.close(200, "shutdown".into())).await;
        decided
    }

    /// Gathers deliveries into batches and hands them to the decider, until `stop`.
    async fn collect(
        &self,
        deliveries: &mut lapin::Consumer,
        tx: &mpsc::Sender<Vec<Delivery>>,
        stop: &CancellationToken,
        alone: &OneAtATime,
    ) -> Result<(), SessionError> {
        let max_batch = alone.limit(self.settings.pipeline.max_batch);
        let max_wait = Duration::from_millis(self.settings.pipeline.max_wait_ms);
        // Deliveries that arrived while the previous batch was full: they start the next one.
        let mut carried: Vec<Delivery> = Vec::new();
        loop {
            // Checked here too: with a prefetch above (in_flight + 1) × max_batch, deliveries
            // may stay carried all through a backlog. Unacked, they go back to the queue.
            if stop.is_cancelled() {
                return Ok(());
            }
            let mut batch = take_carried(&mut carried, max_batch);
            if batch.is_empty() {
                match first_delivery(deliveries, tx, stop).await? {
                    Some(d) => batch.push(d),
                    None => return Ok(()),
                }
            }
            fill(deliveries, &mut batch, max_batch, max_wait, stop).await?;
            // Only while reading alone: nothing more per batch otherwise.
            let fresh = alone.active() && batch.iter().any(|d| !d.redelivered);
            let n = batch.len();
            let handed = hand_off(deliveries, tx, batch, &mut carried, max_batch, stop).await?;
            if handed.is_break() {
                return Ok(());
            }
            if alone.active() && alone.read(n, fresh) {
                return Err(SessionError::ReadAlone);
            }
        }
    }
}

impl Consumer {
    /// Declares the topology again every [`REDECLARE`], for as long as the session lasts, and
    /// checks the database is not behind its ledger's progress; returns the broker's refusal,
    /// or the database found behind. An exchange deleted while the worker runs (by hand, or by
    /// a tool that cleans up) is back within that, bound as before, rather than turning
    /// producers' publishes away until the next session: the consumer alone would not notice,
    /// as its queue stays. (Subscribers' own bindings to a deleted events exchange are theirs
    /// to make again.) A declaration refused for other arguments ends the session, and so the
    /// worker, as at its start: the namespace's mark among them, which another database's
    /// `migrate --rebind-namespace` has taken over. So does a database that went back in time
    /// under a running worker (a failover to a standby behind).
    async fn keep_declared(&self, conn: &Connection) -> SessionError {
        let amqp = &self.settings.amqp;
        let mut every =
            tokio::time::interval_at(tokio::time::Instant::now() + REDECLARE, REDECLARE);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Not asked again once the broker user may not (each refusal is an error in its log).
        let mut mark = true;
        loop {
            every.tick().await;
            // A channel a round: the client keeps every binding a channel made (to make them
            // again on its own recovery), so one channel kept would grow by a round's each time.
            let declared = async {
                let ch = conn.create_channel().await?;
                let names = topology::declare(&ch, amqp).await?;
                if mark {
                    mark = topology::declare_ledger_mark(conn, &names, &self.ledger_id).await?;
                }
                ch.close(200, "declared".into()).await.map(|()| names)
            };
            let names = match declared.await {
                Ok(names) => names,
                Err(e) => return e.into(),
            };
            // Only a database found behind ends the session here; a fault of the database's
            // or the broker's is the batches' to meet.
            match self.check_progress(conn, &names).await {
                Err(SessionError::Progress(e)) if e.is_permanent() => return e.into(),
                _ => {}
            }
        }
    }

    /// Fails when the database is behind what the ledger's relays published
    /// (`crate::progress`): a database gone back in time is not billed into.
    async fn check_progress(&self, conn: &Connection, names: &Names) -> Result<(), SessionError> {
        let watermark = async {
            let mut db = self.decider.pool.acquire().await?;
            Ok::<_, SessionError>(crate::ledger::store::watermark(&mut db).await?)
        };
        let watermark = crate::db::bounded(self.decider.stall, watermark);
        let records = (names.progress.as_str(), self.own_user.as_deref());
        crate::progress::check(conn, records, &self.ledger_id, watermark).await?;
        Ok(())
    }
}

/// How often a session declares the topology again (a few round trips each time).
const REDECLARE: Duration = Duration::from_secs(10);

/// The first delivery of a batch; None on a stop. A decider that died is noticed now, not
/// when the next delivery comes: its unacked batches go back to the queue only once this
/// session ends.
async fn first_delivery(
    deliveries: &mut lapin::Consumer,
    tx: &mpsc::Sender<Vec<Delivery>>,
    stop: &CancellationToken,
) -> Result<Option<Delivery>, SessionError> {
    let first = tokio::select! {
        biased;
        _ = stop.cancelled() => return Ok(None),
        _ = tx.closed() => return Err(SessionError::DeciderGone),
        d = deliveries.next() => d,
    };
    next_delivery(first).map(Some)
}

/// Adds deliveries to `batch` until it holds `max_batch` or `max_wait` has passed. A stop
/// ends the wait at once: the batch is decided and acked like any in flight when the decider
/// can take it, and goes back unacked when it cannot.
async fn fill(
    deliveries: &mut lapin::Consumer,
    batch: &mut Vec<Delivery>,
    max_batch: usize,
    max_wait: Duration,
    stop: &CancellationToken,
) -> Result<(), SessionError> {
    let deadline = tokio::time::Instant::now() + max_wait;
    // One waiter for the whole fill, not one per delivery.
    let stopped = stop.cancelled();
    tokio::pin!(stopped);
    while batch.len() < max_batch {
        tokio::select! {
            biased;
            _ = &mut stopped => break,
            d = tokio::time::timeout_at(deadline, deliveries.next()) => match d {
                Ok(d) => batch.push(next_delivery(d)?),
                Err(_) => break,
            },
        }
    }
    Ok(())
}

/// Hands `batch` to the decider; `Break` on a stop. While the decider is still busy with the
/// previous batch, keeps filling this one (under load batches grow to `max_batch`, idle
/// latency stays `max_wait`, and what does not fit is `carried` to the next), and keeps
/// reading the stream even when it is full, so a dead connection is noticed now rather than
/// after the decider's next broker call.
async fn hand_off(
    deliveries: &mut lapin::Consumer,
    tx: &mpsc::Sender<Vec<Delivery>>,
    mut batch: Vec<Delivery>,
    carried: &mut Vec<Delivery>,
    max_batch: usize,
    stop: &CancellationToken,
) -> Result<ControlFlow<()>, SessionError> {
    loop {
        tokio::select! {
            biased;
            permit = tx.reserve() => match permit {
                Ok(permit) => {
                    permit.send(batch);
                    return Ok(ControlFlow::Continue(()));
                }
                // A decider busy at the stop (waiting out a database outage, say) gives up
                // its batch and ends; this one goes back unacked too.
                Err(_) if stop.is_cancelled() => return Ok(ControlFlow::Break(())),
                Err(_) => return Err(SessionError::DeciderGone),
            },
            _ = stop.cancelled() => return Ok(ControlFlow::Break(())),
            d = deliveries.next() => {
                let d = next_delivery(d)?;
                if batch.len() < max_batch {
                    batch.push(d);
                } else {
                    carried.push(d);
                }
            }
        }
    }
}

/// The start of the next batch: at most `max` of the deliveries carried over, oldest first.
/// The rest stay carried for the batches after it (while the decider is busy, up to the
/// prefetch can pile up, and no batch may exceed `pipeline.max_batch`).
fn take_carried<T>(carried: &mut Vec<T>, max: usize) -> Vec<T> {
    let rest = carried.split_off(carried.len().min(max));
    std::mem::replace(carried, rest)
}

/// How long a session's cleanup (all its steps together), or an ack, may wait on a broker
/// that may be gone.
const CLEANUP: Duration = Duration::from_secs(10);

async fn bounded<T>(f: impl std::future::Future<Output = T>) -> Option<T> {
    tokio::time::timeout(CLEANUP, f).await.ok()
}

fn next_delivery(d: Option<Result<Delivery, lapin::Error>>) -> Result<Delivery, SessionError> {
    match d {
        Some(Ok(d)) => Ok(d),
        Some(Err(e)) => Err(e.into()),
        None => Err(SessionError::StreamEnded),
    }
}

/// What a task of the session returned. A panic is a defect, which reconnecting would only
/// repeat: it goes on up and ends the consumer's task, and with it the process (non-zero).
/// The batches it left unacked go back to the queue.
fn joined<T>(ended: Result<T, JoinError>) -> Result<T, SessionError> {
    match ended {
        Ok(t) => Ok(t),
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(_) => Err(SessionError::DeciderGone),
    }
}

/// A batch whose decision has begun, on a task of its own.
struct InFlight {
    started: Instant,
    follow: Follow,
    /// Aborted when dropped, with the decider that holds it.
    task: AbortOnDropHandle<Tried>,
}

/// A batch after its first try.
struct Tried {
    batch: Vec<Delivery>,
    refused: Vec<Option<String>>,
    attempt: Attempt,
    started: Instant,
}

/// Decides batches in delivery order, up to `pipeline.in_flight` at once, and acks each once
/// it and every batch before it are decided (see [`crate::decide::Turn`]).
async fn decide_loop(
    c: Consumer,
    mut rx: mpsc::Receiver<Vec<Delivery>>,
    dead: Publisher,
    names: Names,
    stop: CancellationToken,
) -> Result<(), SessionError> {
    let depth = c.settings.pipeline.in_flight;
    let mut in_flight: VecDeque<InFlight> = VecDeque::new();
    // Once the collector is gone (shutdown), what is in flight is still decided and acked.
    let mut open = true;
    while open || !in_flight.is_empty() {
        c.health
            .set_oldest_batch(in_flight.front().map(|f| f.started));
        tokio::select! {
            biased;
            batch = rx.recv(), if open && in_flight.len() < depth => match batch {
                Some(batch) => {
                    let started = c.start(batch, &in_flight);
                    in_flight.push_back(started);
                }
                None => open = false,
            },
            tried = oldest(&mut in_flight), if !in_flight.is_empty() => {
                in_flight.pop_front();
                if !c.complete(tried?, &mut in_flight, &dead, &names, &stop).await? {
                    return Ok(());
                }
            }
        }
    }
    Ok(())
}

/// The first try of the oldest batch in flight (which must exist).
async fn oldest(in_flight: &mut VecDeque<InFlight>) -> Result<Tried, SessionError> {
    match in_flight.front_mut() {
        Some(f) => joined((&mut f.task).await),
        None => Err(SessionError::DeciderGone),
    }
}

impl Consumer {
    /// Starts deciding `batch` after the batches `in_flight`.
    fn start(&self, batch: Vec<Delivery>, in_flight: &VecDeque<InFlight>) -> InFlight {
        let started = Instant::now();
        metrics::histogram!("credit_batch_size").record(batch.len() as f64);
        let (turn, follow) = Turn::after(in_flight.iter().map(|f| &f.follow));
        let c = self.clone();
        let task = AbortOnDropHandle::new(tokio::spawn(async move {
            // Messages of producers that may not bill are dead-lettered unread.
            let refused = c.refusals(&batch);
            let attempt = {
                let bodies: Vec<&[u8]> = batch
                    .iter()
                    .zip(&refused)
                    .filter(|(_, r)| r.is_none())
                    .map(|(d, _)| d.data.as_slice())
                    .collect();
                process::attempt(&c.decider, &bodies, turn).await
            };
            Tried {
                batch,
                refused,
                attempt,
                started,
            }
        }));
        InFlight {
            started,
            follow,
            task,
        }
    }

    /// Finishes and acks the oldest batch. When its first try failed, the later batches in
    /// flight end theirs first (they may hold locks it needs, or wait for its end), then each
    /// is finished in order. Ok(false) when abandoned on `stop` before deciding.
    async fn complete(
        &self,
        oldest: Tried,
        in_flight: &mut VecDeque<InFlight>,
        dead: &Publisher,
        names: &Names,
        stop: &CancellationToken,
    ) -> Result<bool, SessionError> {
        if !oldest.attempt.failed() {
            return self.finish_and_ack(oldest, dead, names, stop).await;
        }
        let mut tried = vec![oldest];
        for later in in_flight.drain(..) {
            tried.push(joined(later.task.await)?);
        }
        for t in tried {
            if !self.finish_and_ack(t, dead, names, stop).await? {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Decides what a batch's first try left undecided, then dead-letters and acks it.
    async fn finish_and_ack(
        &self,
        tried: Tried,
        dead: &Publisher,
        names: &Names,
        stop: &CancellationToken,
    ) -> Result<bool, SessionError> {
        let Tried {
            batch,
            refused,
            attempt,
            started,
        } = tried;
        let Some(decided) = process::finish(&self.decider, attempt, stop).await else {
            return Ok(false);
        };
        let producers_refused = refused.iter().flatten().count() as u64;
        let actions = merge_actions(&batch, refused, decided)?;
        metrics::histogram!("credit_decide_transaction_seconds")
            .record(started.elapsed().as_secs_f64());
        let letters: Vec<_> = batch
            .iter()
            .zip(&actions)
            .filter_map(|(d, (action, ids))| match action {
                Action::DeadLetter { reason } => Some((d, reason.as_str(), ids)),
                _ => None,
            })
            .collect();
        let me = self.own_user.as_deref();
        let waiting = (&*self.health, stop);
        let Some(rejected) = dead_letter(dead, names, &letters, me, waiting).await? else {
            return Ok(false);
        };
        // Counted once their dead letters are confirmed, as `invalid` is.
        metrics::counter!("credit_producers_refused_total").increment(producers_refused);
        // The batch holds every unacked delivery up to its last tag (deliveries are batched in
        // order and batches are acked in order), so one multiple-ack covers it: on the last
        // delivery not rejected already, whose acker is still unused (a rejected one's is
        // spent, and a multiple-ack of an earlier tag leaves the settled later ones alone).
        let last = batch
            .iter()
            .rev()
            .find(|d| !rejected.contains(&d.delivery_tag));
        if let Some(last) = last {
            let ack_started = Instant::now();
            // false: the channel is gone and nothing was sent; the broker redelivers the batch
            // (already decided: duplicates), so end the session rather than count it acked.
            let ack = bounded(last.acker.ack(BasicAckOptions { multiple: true })).await;
            if ack.transpose()? != Some(true) {
                return Err(SessionError::AckNotSent);
            }
            metrics::histogram!("credit_ack_seconds").record(ack_started.elapsed().as_secs_f64());
        }
        metrics::histogram!("credit_decide_seconds").record(started.elapsed().as_secs_f64());
        Ok(true)
    }
}

impl Consumer {
    /// Per delivery, why its producer may not bill (`amqp.allowed_producers`), if so.
    fn refusals(&self, batch: &[Delivery]) -> Vec<Option<String>> {
        let allowed = &self.settings.amqp.allowed_producers;
        if allowed.is_empty() {
            return vec![None; batch.len()];
        }
        // A dead letter replayed with the worker's own credentials is its producer's.
        let me = self.own_user.as_deref();
        batch
            .iter()
            .map(|d| {
                let producer = amqp::producer::producer(&d.properties, me);
                producer_refusal(allowed, producer.as_deref())
            })
            .collect()
    }
}

/// One action per delivery, in order: the refused ones dead-lettered, the rest as decided.
fn merge_actions(
    batch: &[Delivery],
    refused: Vec<Option<String>>,
    decided: Vec<(Action, MessageIds)>,
) -> Result<Vec<(Action, MessageIds)>, SessionError> {
    let mut decided = decided.into_iter();
    batch
        .iter()
        .zip(refused)
        .map(|(d, r)| match r {
            Some(reason) => Ok((Action::DeadLetter { reason }, MessageIds::peek(&d.data))),
            // Processing returns one action per body; a missing one must not be acked.
            None => decided.next().ok_or(SessionError::DeciderGone),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::{joined, take_carried, SessionError};
    use futures::FutureExt;

    #[tokio::test]
    async fn a_batch_task_that_panics_takes_its_panic_up_rather_than_end_the_session() {
        let task = tokio::spawn(async { panic!("a defect in a batch") });
        let ended = task.await;
        let caught = std::panic::AssertUnwindSafe(async move { joined::<()>(ended) })
            .catch_unwind()
            .await;
        let payload = caught
            .err()
            .map(|p| crate::telemetry::panic_text(p.as_ref()).to_owned());
        assert_eq!(payload.as_deref(), Some("a defect in a batch"));

        let task = tokio::spawn(std::future::pending::<()>());
        task.abort();
        assert!(matches!(joined(task.await), Err(SessionError::DeciderGone)));
    }

    #[test]
    fn a_batch_takes_at_most_max_batch_of_the_carried_deliveries_oldest_first() {
        let mut carried: Vec<u32> = (0..7).collect();
        assert_eq!(take_carried(&mut carried, 3), [0, 1, 2]);
        assert_eq!(carried, [3, 4, 5, 6]);
        assert_eq!(take_carried(&mut carried, 3), [3, 4, 5]);
        assert_eq!(take_carried(&mut carried, 3), [6]);
        assert!(carried.is_empty());
        assert!(take_carried(&mut carried, 3).is_empty());
    }
}
