//! The outbox relay: publishes committed events in id order from the relays' watermark
//! (`credit.outbox_relay`), persistently with pipelined publisher confirms, and moves the
//! watermark past them only after every confirm arrived. One relay leads at a time (a
//! session-level advisory lock; the other replicas' relays wait to take over), so a user's
//! events go out in order and a round costs one statement: the watermark's move and the read
//! of the next events. The lead is a lease: the server ends a leader's session left idle past
//! `db::lead_lease` (a frozen process), and a standby takes over. At-least-once: a crash
//! between confirm and the watermark's commit republishes the same `event_id`s.
//!
//! Ids are drawn in commit order (migration 0005), so an event never becomes visible below a
//! watermark the relay already moved past. A row may hold a run of events (migration 0009):
//! each goes out as a message of its own, and the watermark passes the row once all have.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use futures::FutureExt as _;
use serde::Deserialize;
use serde_json::value::RawValue;
use sqlx::postgres::PgListener;
use sqlx::{Connection, PgConnection, PgPool};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::amqp::topology;
use crate::amqp::{self, Outgoing, PublishError, Publisher};
use crate::config::Settings;
use crate::ledger;
use crate::ledger::store::{self, StoredEvent};

/// Events a relay round reads: the outbox rows that start within the next this many events
/// (a round holds fewer than this plus one run).
pub(crate) const BATCH: i64 = 1000;

#[derive(Debug, thiserror::Error)]
pub(crate) enum RelayError {
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    #[error("broker: {0}")]
    Amqp(#[from] lapin::Error),
    #[error("event {event_id}: {source}")]
    Publish {
        event_id: String,
        source: PublishError,
    },
    /// The session's broker connection died while it had nothing to publish.
    #[error("broker: the connection was lost")]
    ConnectionLost,
    /// A row whose run of events cannot be read; the schema only lets arrays through, so this
    /// is a writer's bug, and the relay stops at the row rather than skip its events.
    #[error("outbox row {id}: {reason}")]
    Malformed { id: i64, reason: String },
    /// The ledger serves another namespace: its events are not this worker's to publish.
    #[error("{0}")]
    Binding(#[from] crate::ledger::identity::BindingError),
    /// The database is behind what the ledger's relays published, or that could not be read.
    #[error("{0}")]
    Progress(#[from] crate::progress::ProgressError),
}

impl crate::amqp::SessionFault for RelayError {
    fn is_permanent(&self) -> bool {
        match self {
            RelayError::Binding(_) => true,
            RelayError::Progress(e) => e.is_permanent(),
            RelayError::Amqp(e) => topology::refuses_arguments(e),
            _ => false,
        }
    }

    fn why_permanent(&self) -> &'static str {
        match self {
            RelayError::Progress(e) => e.why_permanent(),
            RelayError::Binding(_) => "the ledger is not this worker's",
            _ => crate::amqp::topology::REFUSED_ARGUMENTS,
        }
    }
}

pub(crate) struct Relay {
    pub settings: Arc<Settings>,
    pub pool: PgPool,
    /// The broker user the worker connects as, in every event's `user_id`.
    pub own_user: Option<String>,
    /// Told whether a session is connected, for `/readyz`.
    pub health: Arc<crate::health::Health>,
    /// The database's ledger id, marked on the namespace ([`topology::declare_ledger_mark`]).
    pub ledger_id: Arc<str>,
    /// Cancelled once the ledger is no longer this worker's ([`crate::ledger::identity::watch`]):
    /// the relay stops at once, without the drain's flush.
    pub halt: CancellationToken,
}

impl Relay {
    /// Publishes until `drain` fires, then until the outbox is empty (bounded by
    /// `drain_timeout` so a dead broker cannot hold shutdown forever).
    pub async fn run(&self, drain: CancellationToken, drain_timeout: Duration) {
        let hard_stop = self.halt.child_token();
        let watchdog = {
            let hard_stop = hard_stop.clone();
            let drain = drain.clone();
            tokio::spawn(async move {
                drain.cancelled().await;
                tokio::time::sleep(drain_timeout).await;
                hard_stop.cancel();
            })
        };
        // A session cut off by the hard stop ends without error, but not flushed. Whatever it
        // awaits then (a broker that stopped answering, or blocks publishers for a resource
        // alarm, holds a publish or its confirm), the hard stop ends it: the events it was
        // sending stay behind the watermark, for the next relay.
        let flushed = tokio::select! {
            flushed = amqp::reconnecting("outbox relay", &hard_stop, || {
                self.session(&drain, &hard_stop)
            }) => flushed && !hard_stop.is_cancelled(),
            () = self.published_through_drain(&drain) => true,
            _ = hard_stop.cancelled() => false,
        };
        if !flushed {
            // Also where the database could not be read: whether anything was left unknown.
            warn!(
                "outbox flush not confirmed at shutdown (the broker or the database did not \
                 answer in time); anything left unpublished goes out with the next relay"
            );
        }
        watchdog.abort();
    }

    /// Resolves once, after `drain`, every event in the outbox when it fired has gone out, by
    /// whichever replica's relay: a session that cannot reach the broker then has nothing left
    /// to send, and waiting for it would only hold the stop and warn of events that went out.
    /// The worker's own writers have stopped before the relay drains, so their events are in.
    async fn published_through_drain(&self, drain: &CancellationToken) {
        drain.cancelled().await;
        // A session that can publish ends by itself before this (its connections closed in
        // order, "outbox flushed" logged); this is for one that cannot reach the broker.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let within = Some(Duration::from_secs(2));
        let mut through = None;
        loop {
            let looked = async {
                let mut conn = self.pool.acquire().await?;
                published_through(&mut conn, &mut through).await
            };
            if let Ok(true) = crate::db::bounded(within, looked).await {
                return;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    async fn session(
        &self,
        drain: &CancellationToken,
        hard_stop: &CancellationToken,
    ) -> Result<(), RelayError> {
        let conn =
            crate::amqp::connect_publisher(&self.settings.amqp, "credit-worker outbox").await?;
        let publisher = Publisher::open_patient(&conn).await?;
        let exchange = self.settings.name(topology::EVENTS);
        topology::declare_events_exchange(publisher.channel(), &exchange).await?;
        let names = topology::Names::new(&self.settings.amqp.namespace);
        topology::declare_ledger_mark(&conn, &names, &self.ledger_id).await?;
        let _session = self.health.relay_session(&conn);
        // As the consumer's and control's sessions say "consuming": a reconnect shows in the log.
        info!(exchange = %exchange, "outbox relay connected");
        // A fault of the database ends its session only: the broker connection stays, and the
        // lead is sought again on a new session as soon as the database answers, rather than
        // after a new broker connection at every try and the broker's backoff.
        let mut delays = crate::retry::backoff_up_to(Duration::from_secs(1));
        let led = loop {
            match self
                .lead_on_new_session((&conn, &publisher), &exchange, drain, hard_stop)
                .await
            {
                Err(RelayError::Db(e)) if crate::db::is_transient(&e) => {
                    self.health.set_relay_database(false);
                    metrics::counter!("credit_broker_reconnects_total", "session" => "outbox relay")
                        .increment(1);
                    // Tried again up to every second while the database is down: the
                    // counter shows each, the log one in ten seconds (a different fault at
                    // once).
                    if SESSION_FAULT_LOGGED.ready_for(&e.to_string()) {
                        warn!(error = %e, "outbox relay: its database session ended by a fault; beginning another");
                    }
                    if !crate::retry::pause(&mut delays, hard_stop).await {
                        break Err(RelayError::Db(e));
                    }
                }
                other => break other,
            }
        };
        if led.is_ok() && drain.is_cancelled() {
            let _ = conn.close(200, "shutdown".into()).await;
        }
        led
    }

    /// Waits for the lead on a database session of its own, then publishes as the leader.
    async fn lead_on_new_session(
        &self,
        (broker, publisher): (&lapin::Connection, &Publisher),
        exchange: &str,
        drain: &CancellationToken,
        hard_stop: &CancellationToken,
    ) -> Result<(), RelayError> {
        // The leader's lock lives as long as this connection, which never returns to the pool.
        let mut db = self.pool.acquire().await?.detach();
        let led = match self.await_lead(&mut db, publisher, drain, hard_stop).await {
            Ok(true) => {
                self.lead(&mut db, (broker, publisher), exchange, drain, hard_stop)
                    .await
            }
            other => other.map(|_| ()),
        };
        // Ends the session, and with it the lead; bounded, as the database may be gone.
        let _ = tokio::time::timeout(Duration::from_secs(1), db.close()).await;
        led
    }

    /// Tries the leader's lock every 500 ms while another replica's relay leads (it has the
    /// outbox in hand, so a standby neither listens nor reads). Once draining, a standby ends
    /// when the leader has published every event up to the outbox's last when the drain
    /// began (this worker's among them), and keeps trying for the lead until then: when all
    /// replicas stop at once, the leader's last read may have come before this worker's last
    /// commit. False when it need not or cannot lead.
    async fn await_lead(
        &self,
        db: &mut PgConnection,
        publisher: &Publisher,
        drain: &CancellationToken,
        hard_stop: &CancellationToken,
    ) -> Result<bool, RelayError> {
        let bound = self.stall_bound();
        let mut ours_through = None;
        while !crate::db::bounded(bound, store::try_lead_relay(db)).await? {
            // A standby's part is done: it has nothing to write.
            self.health.set_relay_database(true);
            still_connected(publisher)?;
            if drain.is_cancelled() {
                let first = ours_through.is_none();
                let looked = published_through(db, &mut ours_through);
                if crate::db::bounded(bound, looked).await? {
                    return Ok(false);
                }
                if let Some(through) = ours_through.filter(|_| first) {
                    info!(
                        through,
                        "waiting for the leading relay to publish this worker's events"
                    );
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                _ = drain.cancelled(), if !drain.is_cancelled() => {}
                _ = hard_stop.cancelled() => return Ok(false),
            }
        }
        Ok(true)
    }

    /// Listens for new events, then holds the leader's session to its lease.
    async fn listen(&self, db: &mut PgConnection) -> Result<PgListener, RelayError> {
        // Listening before the first read: an event committed after it notifies.
        let bound = self.stall_bound();
        let own = crate::db::pool_of_one(&self.settings.database)?;
        let mut listener = PgListener::connect_with(&own).await?;
        crate::db::bounded(bound, listener.listen("credit_outbox")).await?;
        // The lease from here on: while the listener's connection was made (a wait for the
        // pool, a slow server), the leader's session was rightly idle.
        if let Some(lease) = self.lease() {
            crate::db::bounded(bound, crate::db::end_when_idle(db, lease)).await?;
        }
        Ok(listener)
    }

    /// The watermark a new leader starts from, and its listener, once the database is found
    /// still to be this worker's ledger ([`Self::still_bound`]). The watermark is read with its
    /// row locked for the statement: a session that cannot move the watermark (a database
    /// read-only after a failover) fails here, before it publishes a round that it would
    /// publish again at every try. A watermark behind what the broker records the ledger's
    /// relays published, read just before (a database gone back in time: `crate::progress`),
    /// ends the relay before it publishes anything.
    async fn take_up_lead(
        &self,
        db: &mut PgConnection,
        broker: &lapin::Connection,
    ) -> Result<(i64, PgListener), RelayError> {
        self.still_bound(db).await?;
        let bound = self.stall_bound();
        let queue = self.settings.name(topology::PROGRESS);
        let watermark = async {
            Ok::<_, RelayError>(crate::db::bounded(bound, store::lead_watermark(db)).await?)
        };
        let records = (queue.as_str(), self.own_user.as_deref());
        let watermark = crate::progress::check(broker, records, &self.ledger_id, watermark).await?;
        self.health.set_relay_database(true);
        let listener = self.listen(db).await?;
        Ok((watermark, listener))
    }

    /// Publishes as the leader until stopped; returns once drained (or on `hard_stop`).
    async fn lead(
        &self,
        db: &mut PgConnection,
        (broker, publisher): (&lapin::Connection, &Publisher),
        exchange: &str,
        drain: &CancellationToken,
        hard_stop: &CancellationToken,
    ) -> Result<(), RelayError> {
        let bound = self.stall_bound();
        let (mut watermark, mut listener) = self.take_up_lead(db, broker).await?;
        let mut recorded = Recorded::default();
        // Which worker publishes the ledger's events, and where, after a restart or a
        // failover: the replicas' logs say.
        info!(exchange = %exchange, "outbox relay leading");
        // Whether the last read started after drain: only such a read sees every event the
        // stopped writers committed, so only its finding none means the outbox is flushed.
        let mut read_in_drain = drain.is_cancelled();
        let mut read_at = Asked::now();
        let mut rows = crate::db::bounded(bound, store::events_after(db, watermark, BATCH)).await?;
        let mut pruner = Pruner::new(self.settings.outbox.retention());
        let mut pace = Pace::default();
        loop {
            if hard_stop.is_cancelled() {
                return Ok(());
            }
            if !drain.is_cancelled() {
                let pruned = async {
                    pruner.prune_if_due(db).await;
                    Ok::<_, RelayError>(())
                };
                crate::db::bounded(bound, pruned).await?;
            }
            if !rows.is_empty() {
                let started = Instant::now();
                let through = self
                    .publish_round(db, (publisher, exchange), &rows, &mut pace, read_at)
                    .await?;
                read_in_drain = drain.is_cancelled();
                read_at = Asked::now();
                rows = self.rows_after(db, through, &mut watermark).await?;
                self.record_progress(publisher, watermark, &mut recorded, false)
                    .await;
                metrics::histogram!("credit_outbox_publish_seconds")
                    .record(started.elapsed().as_secs_f64());
                // After the watermark moved past what went out.
                if pace.refused && !crate::retry::pause(&mut pace.delays, hard_stop).await {
                    return Ok(());
                }
                continue;
            }
            if read_in_drain {
                self.record_progress(publisher, watermark, &mut recorded, true)
                    .await;
                info!("outbox flushed");
                return Ok(());
            }
            self.record_progress(publisher, watermark, &mut recorded, false)
                .await;
            // Returns at once when draining.
            if !self.wait(&mut listener, drain, hard_stop).await? {
                return Ok(());
            }
            still_connected(publisher)?;
            read_in_drain = drain.is_cancelled();
            read_at = Asked::now();
            rows = crate::db::bounded(bound, store::events_after(db, watermark, BATCH)).await?;
        }
    }

    /// The rows after a round: past `through`, the last row that went out whole, moving the
    /// watermark there; with none, the same rows again.
    async fn rows_after(
        &self,
        db: &mut PgConnection,
        through: Option<i64>,
        watermark: &mut i64,
    ) -> Result<Vec<StoredEvent>, RelayError> {
        let bound = self.stall_bound();
        let Some(through) = through else {
            return Ok(
                crate::db::bounded(bound, store::events_after(db, *watermark, BATCH)).await?,
            );
        };
        let rows = crate::db::bounded(bound, store::advance_and_read(db, through, BATCH)).await?;
        *watermark = through;
        Ok(rows)
    }

    /// Publishes the next events of `rows` (from where `pace` resumes, at most its window) and
    /// returns the last row whose events are all confirmed now, for the watermark. A message
    /// the broker refuses (a nack: a queue bound to the events exchange that is full and set to
    /// `x-overflow: reject-publish`, say) ends the round there, not the session: the events
    /// confirmed before it count, and it and those after go out again after a pause, in a
    /// window of a little more than was taken, so a queue that drains slowly still gets every
    /// event and the other subscribers only a few copies (with the same `event_id`) each time.
    /// Until it takes events again, none goes past it to any subscriber: at least once for
    /// every subscriber means waiting for the one that refuses, as `reject-publish` asks.
    async fn publish_round(
        &self,
        db: &mut PgConnection,
        (publisher, exchange): (&Publisher, &str),
        rows: &[StoredEvent],
        pace: &mut Pace,
        read_at: Asked,
    ) -> Result<Option<i64>, RelayError> {
        let events = events_of(rows)?;
        let round = pace.round_of(rows, &events);
        let sent = self
            .publish_holding_lead(db, publisher, exchange, round, read_at)
            .await;
        let (confirmed, refused) = match sent {
            Ok(n) => (n, None),
            Err(RelayError::Publish {
                event_id,
                source: PublishError::Nacked { index },
            }) => (index, Some(event_id)),
            Err(e) => return Err(e),
        };
        metrics::counter!("credit_events_published_total").increment(confirmed as u64);
        let through = pace.confirmed(rows, confirmed, refused.is_some());
        record_lag(rows, through);
        if let Some(event_id) = refused {
            metrics::counter!("credit_events_refused_total").increment(1);
            if REFUSED_WARNING.ready() {
                warn!(
                    event_id,
                    confirmed,
                    "the broker refused an event (nack): a queue bound to the events exchange \
                     is likely full and refusing publishes (x-overflow reject-publish); it and \
                     the events after it are published again after a pause, those before it \
                     are confirmed"
                );
            }
        }
        Ok(through)
    }

    /// Publishes a round and keeps the leader's session from going idle past its lease while
    /// the confirms are awaited (a broker slow to confirm does not cost the lead). Rows read a
    /// while ago (the process was frozen since) go out only once the lead is found still held:
    /// a leader whose session the server ended meanwhile sends nothing its successor may have
    /// sent already.
    async fn publish_holding_lead(
        &self,
        db: &mut PgConnection,
        publisher: &Publisher,
        exchange: &str,
        events: &[Event<'_>],
        read_at: Asked,
    ) -> Result<usize, RelayError> {
        let me = self.own_user.as_deref();
        let route = Route::Exchange(exchange);
        let Some(lease) = self.lease() else {
            return send_events(publisher, &route, events, me).await;
        };
        let bound = self.stall_bound();
        if read_at.longer_ago_than(lease / 2) {
            crate::db::bounded(bound, db.ping()).await?;
        }
        let round = send_events(publisher, &route, events, me);
        tokio::pin!(round);
        loop {
            tokio::select! {
                published = &mut round => return published,
                () = tokio::time::sleep(lease / 4) => {
                    crate::db::bounded(bound, db.ping()).await?;
                }
            }
        }
    }

    /// How long the leader's session may be idle before the server ends it (`db::lead_lease`).
    fn lease(&self) -> Option<Duration> {
        crate::db::lead_lease(&self.settings.database)
    }

    /// Whether the database is still the ledger this worker bound, serving its namespace, as
    /// the lead is taken: the leader publishes every event of the ledger, and `migrate
    /// --rebind-namespace` may have moved it since this worker started.
    async fn still_bound(&self, db: &mut PgConnection) -> Result<(), RelayError> {
        let identity = crate::db::bounded(self.stall_bound(), store::read_identity(db)).await?;
        Ok(identity.still(&self.ledger_id, &self.settings.amqp.namespace)?)
    }

    /// Records `watermark` on the broker when due ([`Recorded::due`]; `now` at the flush). A
    /// record that fails is warned of and tried again a second later: it only weakens the
    /// check of a database gone back in time.
    async fn record_progress(
        &self,
        publisher: &Publisher,
        watermark: i64,
        recorded: &mut Recorded,
        now: bool,
    ) {
        if !recorded.due(watermark, now) {
            return;
        }
        recorded.at = Some(Instant::now());
        let queue = self.settings.name(topology::PROGRESS);
        let to = (queue.as_str(), self.own_user.as_deref());
        match crate::progress::record(publisher, to, &self.ledger_id, watermark).await {
            Ok(()) => recorded.through = Some(watermark),
            Err(e) if RECORD_WARNING.ready() => {
                warn!(error = %e, "could not record the outbox watermark on the broker")
            }
            Err(_) => {}
        }
    }

    /// How long a round's statement may go unanswered before the session is given up and
    /// begun again on a new connection (`db::stall_bound`).
    fn stall_bound(&self) -> Option<Duration> {
        crate::db::stall_bound(&self.settings.database)
    }

    /// Waits for a NOTIFY from any writer (a writer that committed during the last look has
    /// its notification waiting already), for drain, or at most 500 ms, which covers a lost
    /// notification. False on `hard_stop`.
    async fn wait(
        &self,
        listener: &mut PgListener,
        drain: &CancellationToken,
        hard_stop: &CancellationToken,
    ) -> Result<bool, RelayError> {
        tokio::select! {
            r = listener.recv() => {
                r?;
                // Those that piled up while this relay published (already in the socket's
                // buffer): one read answers them all, committed before they were sent.
                while let Some(Ok(Some(_))) = listener.try_recv().now_or_never() {}
            }
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            _ = drain.cancelled() => {}
            _ = hard_stop.cancelled() => return Ok(false),
        }
        Ok(true)
    }
}

/// When the leader last recorded its watermark on the broker (`crate::progress`).
#[derive(Default)]
struct Recorded {
    through: Option<i64>,
    at: Option<Instant>,
}

/// How often a leader records its watermark on the broker while it moves.
const RECORD_EVERY: Duration = Duration::from_secs(1);

impl Recorded {
    /// Whether `watermark` is to be recorded now: past the last record, and a second after it
    /// (or at once, `now`).
    fn due(&self, watermark: i64, now: bool) -> bool {
        let past = self.through.is_none_or(|through| through < watermark);
        past && (now || self.at.is_none_or(|at| at.elapsed() >= RECORD_EVERY))
    }
}

/// A database session of the relay's that a fault ended, warned of at most every 10 s per
/// fault.
static SESSION_FAULT_LOGGED: crate::throttle::Throttle =
    crate::throttle::Throttle::new(Duration::from_secs(10));

/// A record of the watermark that failed, warned of at most every minute.
static RECORD_WARNING: crate::throttle::Throttle =
    crate::throttle::Throttle::new(Duration::from_secs(60));

/// Ends an idle session whose broker connection died, so it reconnects now rather than at
/// the next event (and `/readyz` shows the relay connected only while it is).
fn still_connected(publisher: &Publisher) -> Result<(), RelayError> {
    if publisher.channel().status().connected() {
        Ok(())
    } else {
        Err(RelayError::ConnectionLost)
    }
}

/// Whether every event the outbox held at the first look (its last id, kept in `through`)
/// has been published, by whichever replica's relay.
async fn published_through(
    conn: &mut PgConnection,
    through: &mut Option<i64>,
) -> Result<bool, sqlx::Error> {
    let head = match *through {
        Some(head) => head,
        None => *through.insert(store::outbox_head(conn).await?),
    };
    Ok(store::watermark(conn).await? >= head)
}

/// When a read was asked for (before it was sent, so that a freeze while its answer came
/// counts): by the monotonic clock and by the wall clock, which, unlike the monotonic one,
/// also moves while the machine is suspended.
#[derive(Clone, Copy)]
struct Asked {
    at: Instant,
    wall: chrono::DateTime<Utc>,
}

impl Asked {
    fn now() -> Asked {
        Asked {
            at: Instant::now(),
            wall: Utc::now(),
        }
    }

    /// By either clock: a wall clock stepped forward costs only a ping.
    fn longer_ago_than(&self, span: Duration) -> bool {
        let wall = (Utc::now() - self.wall).to_std().unwrap_or_default();
        self.at.elapsed() >= span || wall >= span
    }
}

/// Deletes published events past the retention while this relay leads: at least once a
/// minute (more often when the retention is shorter), one statement between publishing
/// rounds, and again at the next round while a statement found a full window of due rows.
struct Pruner {
    retention: Option<Duration>,
    every: Duration,
    last: Option<Instant>,
    more: bool,
}

impl Pruner {
    fn new(retention: Option<Duration>) -> Pruner {
        let every = retention.map_or(Duration::MAX, |r| {
            (r / 2).clamp(Duration::from_secs(1), Duration::from_secs(60))
        });
        Pruner {
            retention,
            every,
            last: None,
            more: false,
        }
    }

    fn due(&self) -> bool {
        self.retention.is_some()
            && (self.more || self.last.is_none_or(|t| t.elapsed() >= self.every))
    }

    /// A failed prune is logged and counted, and publishing goes on: events are never held
    /// up by their own clean-up.
    async fn prune_if_due(&mut self, db: &mut PgConnection) {
        let Some(retention) = self.retention.filter(|_| self.due()) else {
            return;
        };
        self.last = Some(Instant::now());
        self.more = false;
        let keep = chrono::Duration::from_std(retention).unwrap_or(chrono::Duration::MAX);
        let Some(before) = crate::clock::wall_now().checked_sub_signed(keep) else {
            return;
        };
        // One statement's worth: a short pause between publishing rounds.
        let rows = ledger::retention::ROWS_PER_STATEMENT;
        match ledger::retention::prune_published(db, before, rows).await {
            Ok(deleted) => {
                self.more = deleted == rows;
                metrics::counter!("credit_outbox_pruned_total").increment(deleted as u64);
            }
            Err(e) => {
                metrics::counter!("credit_outbox_prune_errors_total").increment(1);
                warn!(error = %e, "deleting published events past the retention failed; retrying in {:?}", self.every);
            }
        }
    }
}

/// Records the publish lag of the events of `rows` up to `through`, now all confirmed: once
/// each, as their row is passed (a round refused in part publishes some of them again).
fn record_lag(rows: &[StoredEvent], through: Option<i64>) {
    let Some(through) = through else { return };
    let confirmed = Utc::now();
    for row in rows.iter().take_while(|r| r.id <= through) {
        let lag = (confirmed - row.created_at).num_microseconds().unwrap_or(0) as f64 / 1e6;
        metrics::histogram!("credit_outbox_publish_lag_seconds")
            .record_many(lag.max(0.0), row.events.max(1) as usize);
    }
}

/// A refused event is warned of at most every 10 s; `credit_events_refused_total` counts each.
static REFUSED_WARNING: crate::throttle::Throttle =
    crate::throttle::Throttle::new(Duration::from_secs(10));

/// The leader's pace through the outbox: where it resumes inside the row after its watermark,
/// how many events a round sends, and the pauses between rounds the broker refused.
struct Pace {
    /// The row after the watermark whose first `.1` events are confirmed.
    resume: Option<(i64, usize)>,
    /// Events per round: all that a read returns while the broker takes them (None), a
    /// little more than it took after a refusal (one event when it took none), doubling with
    /// each round taken whole until that is [`BATCH`].
    window: Option<usize>,
    /// Whether the last round was refused in part.
    refused: bool,
    delays: Box<dyn Iterator<Item = Duration> + Send>,
}

impl Default for Pace {
    fn default() -> Self {
        Pace {
            resume: None,
            window: None,
            refused: false,
            delays: Box::new(crate::retry::backoff()),
        }
    }
}

impl Pace {
    /// How many of `row`'s events went out already.
    fn done_in(&self, row: &StoredEvent) -> usize {
        match self.resume {
            Some((id, done)) if id == row.id => done,
            _ => 0,
        }
    }

    /// The events of the next round: `events` (those of `rows`) after the ones confirmed, at
    /// most a window of them.
    fn round_of<'e, 'a>(&self, rows: &[StoredEvent], events: &'e [Event<'a>]) -> &'e [Event<'a>] {
        let from = rows
            .first()
            .map_or(0, |r| self.done_in(r))
            .min(events.len());
        let to = self
            .window
            .map_or(events.len(), |w| events.len().min(from + w));
        &events[from..to]
    }

    /// Takes note that the first `confirmed` events of the round went out, and whether the
    /// broker refused the next; returns the last row whose events all went out.
    fn confirmed(&mut self, rows: &[StoredEvent], confirmed: usize, refused: bool) -> Option<i64> {
        let mut left = confirmed;
        let mut through = None;
        let mut resume = None;
        for row in rows {
            let done = self.done_in(row);
            let remaining = (row.events.max(1) as usize).saturating_sub(done);
            if left < remaining {
                resume = Some((row.id, done + left)).filter(|_| done + left > 0);
                break;
            }
            left -= remaining;
            through = Some(row.id);
        }
        self.resume = resume;
        self.window = match (refused, self.window) {
            // A little more than was taken: a queue drained meanwhile takes more.
            (true, _) => Some(confirmed + confirmed / 2 + 1),
            (false, Some(w)) => Some(w * 2).filter(|w| *w < BATCH as usize),
            (false, None) => None,
        };
        // The pauses grow only while nothing goes out; they are taken only after a refusal,
        // so only then can they have grown.
        if self.refused && (confirmed > 0 || !refused) {
            self.delays = Box::new(crate::retry::backoff());
        }
        self.refused = refused;
        through
    }
}

/// Where events go: to the events exchange under their routing keys (every subscriber), or,
/// republished, to one queue through the default exchange.
pub(crate) enum Route<'a> {
    Exchange(&'a str),
    Queue(&'a str),
}

impl Route<'_> {
    /// The exchange's or the queue's name.
    pub(crate) fn name(&self) -> &str {
        match self {
            Route::Exchange(name) | Route::Queue(name) => name,
        }
    }
}

/// Publishes the events of `rows` along `route`, in order, and waits for every confirm;
/// returns how many. Each carries its `event_id` as `message_id`, so a subscriber that has an
/// event (a republish sends it again) drops the copy.
pub(crate) async fn send(
    publisher: &Publisher,
    route: &Route<'_>,
    rows: &[StoredEvent],
    me: Option<&str>,
) -> Result<usize, RelayError> {
    send_events(publisher, route, &events_of(rows)?, me).await
}

/// Publishes `events` along `route`, in order, and waits for every confirm; returns how many.
async fn send_events(
    publisher: &Publisher,
    route: &Route<'_>,
    events: &[Event<'_>],
    me: Option<&str>,
) -> Result<usize, RelayError> {
    let now = Utc::now();
    let messages: Vec<Outgoing<'_>> = events
        .iter()
        .map(|e| {
            let (exchange, routing_key) = match route {
                Route::Exchange(x) => (*x, e.routing_key),
                Route::Queue(q) => ("", *q),
            };
            Outgoing {
                exchange,
                routing_key,
                body: e.body.as_bytes(),
                properties: amqp::event_properties(&e.event_id, now, me),
                // An event nobody subscribed to is not an error.
                mandatory: false,
            }
        })
        .collect();
    publisher
        .publish_all(messages)
        .await
        .map_err(|source| refused(events, source))?;
    Ok(events.len())
}

/// A failed publish of `events`, naming the event the broker refused (else the first).
fn refused(events: &[Event<'_>], source: PublishError) -> RelayError {
    let index = match &source {
        PublishError::Nacked { index } => *index,
        _ => 0,
    };
    RelayError::Publish {
        event_id: events
            .get(index)
            .map(|e| e.event_id.to_string())
            .unwrap_or_default(),
        source,
    }
}

/// One event to publish: a row's own, or one element of a row's run of events.
#[derive(Debug, PartialEq)]
struct Event<'a> {
    routing_key: &'a str,
    event_id: Cow<'a, str>,
    body: &'a str,
}

/// The element of a run of events whose `event_id` the message carries.
#[derive(Deserialize)]
struct Identified<'a> {
    #[serde(borrow)]
    event_id: Cow<'a, str>,
}

/// The events of `rows` in publication order: row by row, a run's elements in array order.
fn events_of(rows: &[StoredEvent]) -> Result<Vec<Event<'_>>, RelayError> {
    let mut out = Vec::with_capacity(rows.iter().map(|r| r.events.max(1) as usize).sum());
    for row in rows {
        if row.events == 1 {
            out.push(Event {
                routing_key: &row.routing_key,
                event_id: Cow::Borrowed(&row.event_id),
                body: &row.payload,
            });
            continue;
        }
        let malformed = |reason: String| RelayError::Malformed { id: row.id, reason };
        let run: Vec<&RawValue> =
            serde_json::from_str(&row.payload).map_err(|e| malformed(e.to_string()))?;
        if run.len() != row.events as usize {
            return Err(malformed(format!(
                "{} events, {} declared",
                run.len(),
                row.events
            )));
        }
        for element in run {
            let Identified { event_id } = serde_json::from_str(element.get())
                .map_err(|e| malformed(format!("an element's event_id: {e}")))?;
            out.push(Event {
                routing_key: &row.routing_key,
                event_id,
                body: element.get(),
            });
        }
    }
    Ok(out)
}

/// A backlog that cannot be read is warned of at most once a minute: every scrape tries.
static BACKLOG_WARNING: crate::throttle::Throttle =
    crate::throttle::Throttle::new(Duration::from_secs(60));

/// The outbox's gauges, read at each `/metrics` scrape, not by the relays: the figures are
/// wanted most when no relay can publish, and a standby summing the backlog every 500 ms only
/// loaded the database.
pub(crate) struct BacklogGauges {
    /// The last reading: when, and the oldest unpublished event's age then.
    last: std::sync::Mutex<(Instant, f64)>,
}

impl Default for BacklogGauges {
    /// Before the first reading the worker's start counts as one of 0, so a database that
    /// hides the outbox from the start still shows an age that grows.
    fn default() -> Self {
        BacklogGauges {
            last: std::sync::Mutex::new((Instant::now(), 0.0)),
        }
    }
}

impl BacklogGauges {
    /// Sets `credit_outbox_backlog` to the events not published yet, and
    /// `credit_outbox_oldest_unpublished_seconds` to how long the first of them has waited (by
    /// the database's clock, against its writer's stamp), read within `within`. A relay that
    /// runs but publishes nothing (the events exchange refused, a row it cannot send, a stuck
    /// leader on another replica) shows as an age that only grows; a backlog being published
    /// keeps it at seconds. When the database does not answer in time the age shown is the
    /// last reading's plus the time since: what it would be had nothing been published
    /// meanwhile, so that a stall hiding the outbox still shows (and alerts) even where
    /// nothing turns out to have waited. The backlog keeps its last value.
    pub(crate) async fn refresh(&self, pool: &PgPool, within: Duration) {
        let read = tokio::time::timeout(within, store::backlog(pool)).await;
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        let age = match read {
            Ok(Ok(backlog)) => {
                metrics::gauge!("credit_outbox_backlog").set(backlog.events as f64);
                *last = (Instant::now(), backlog.oldest_age_s);
                backlog.oldest_age_s
            }
            failed => {
                let error = match failed {
                    Ok(Err(e)) => e.to_string(),
                    _ => format!("no answer within {within:?}"),
                };
                if BACKLOG_WARNING.ready() {
                    warn!(%error, "reading the outbox backlog failed; its age is shown grown by the time since the last reading");
                }
                let (at, age) = *last;
                age + at.elapsed().as_secs_f64()
            }
        };
        metrics::gauge!("credit_outbox_oldest_unpublished_seconds").set(age);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prunes_every_minute_or_every_half_retention_but_not_more_than_each_second() {
        let every = |s: u64| Pruner::new(Some(Duration::from_secs(s))).every;
        assert_eq!(every(259_200), Duration::from_secs(60));
        assert_eq!(every(30), Duration::from_secs(15));
        assert_eq!(every(1), Duration::from_secs(1));
        assert_eq!(Pruner::new(None).every, Duration::MAX);
    }

    #[test]
    fn a_prune_is_due_at_first_then_after_its_interval_or_while_windows_come_back_full() {
        let mut p = Pruner::new(Some(Duration::from_secs(259_200)));
        assert!(p.due());
        p.last = Some(Instant::now());
        assert!(!p.due());
        p.more = true;
        assert!(p.due());
        p.more = false;
        // An interval that has passed (without depending on the host's uptime).
        p.every = Duration::ZERO;
        assert!(p.due());
        assert!(!Pruner::new(None).due());
    }

    /// Row `id` holding `events` events (a run when more than one).
    fn row(id: i64, events: i32) -> StoredEvent {
        let one = |n: i32| format!(r#"{{"event_id":"e{id}.{n}"}}"#);
        let payload = match events {
            1 => one(0),
            _ => format!("[{}]", (0..events).map(one).collect::<Vec<_>>().join(",")),
        };
        StoredEvent {
            id,
            event_id: format!("e{id}.0"),
            routing_key: "balance.changed".into(),
            events,
            payload,
            created_at: Utc::now(),
        }
    }

    fn ids(events: &[Event<'_>]) -> Vec<String> {
        events.iter().map(|e| e.event_id.to_string()).collect()
    }

    #[test]
    fn a_refused_round_resumes_at_the_refused_event_inside_a_run() {
        let mut pace = Pace::default();
        let rows = [row(1, 1), row(2, 3), row(3, 1)];
        let events = events_of(&rows).unwrap();
        assert_eq!(pace.round_of(&rows, &events).len(), 5, "a whole read");
        // The broker took the first two, refused the third (the run's second element).
        assert_eq!(pace.confirmed(&rows, 2, true), Some(1));
        assert_eq!(
            (pace.resume, pace.window, pace.refused),
            (Some((2, 1)), Some(4), true)
        );
        // The next read starts after the watermark, at the run.
        let rows = [row(2, 3), row(3, 1)];
        let events = events_of(&rows).unwrap();
        assert_eq!(ids(pace.round_of(&rows, &events)), ["e2.1", "e2.2", "e3.0"]);
        assert_eq!(
            pace.confirmed(&rows, 1, true),
            None,
            "the run is not whole yet"
        );
        assert_eq!(pace.resume, Some((2, 2)));
        assert_eq!(ids(pace.round_of(&rows, &events)), ["e2.2", "e3.0"]);
        assert_eq!(pace.confirmed(&rows, 2, false), Some(3));
        assert_eq!(
            (pace.resume, pace.window, pace.refused),
            (None, Some(4), false)
        );
    }

    #[test]
    fn a_round_refused_at_its_first_event_passes_nothing() {
        let mut pace = Pace::default();
        let rows = [row(7, 2), row(8, 1)];
        assert_eq!(pace.confirmed(&rows, 0, true), None);
        assert_eq!(pace.resume, None);
        let events = events_of(&rows).unwrap();
        assert_eq!(
            ids(pace.round_of(&rows, &events)),
            ["e7.0"],
            "one, until taken"
        );
        assert_eq!(pace.confirmed(&rows, 1, false), None);
        assert_eq!(ids(pace.round_of(&rows, &events)), ["e7.1", "e8.0"]);
    }

    #[test]
    fn after_a_refusal_rounds_send_a_little_more_than_was_taken_then_double_back() {
        let mut pace = Pace::default();
        let rows: Vec<StoredEvent> = (1..=100).map(|id| row(id, 1)).collect();
        assert_eq!(pace.confirmed(&rows, 20, true), Some(20));
        assert_eq!(pace.window, Some(31));
        let rest = &rows[20..];
        let events = events_of(rest).unwrap();
        let round = pace.round_of(rest, &events);
        assert_eq!((round.len(), ids(round)[0].as_str()), (31, "e21.0"));
        assert_eq!(pace.confirmed(rest, 31, false), Some(51));
        assert_eq!(pace.window, Some(62));
        for _ in 0..4 {
            pace.confirmed(&rows[60..61], 1, false);
        }
        assert_eq!(pace.window, Some(992));
        pace.confirmed(&rows[60..61], 1, false);
        assert_eq!(pace.window, None, "back to whole rounds");
    }
}
