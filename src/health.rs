//! What `/readyz` reports, as the tasks that know it set it, and how it says it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// What `/readyz` reports: set by the consumer as it connects and consumes, by the
/// supervisor while the outbox relay runs, and by each session while it has a connection.
#[derive(Debug, Default)]
pub struct Health {
    consuming: AtomicBool,
    relaying: AtomicBool,
    /// The broker connection of the outbox relay's session, while it has one: read when asked,
    /// so a connection that died while the relay was idle shows at once.
    relay_connection: Mutex<Option<lapin::ConnectionStatus>>,
    /// The consumer's session's connection, while it has one (blocked by the broker or not).
    consumer_connection: Mutex<Option<lapin::ConnectionStatus>>,
    /// The consumer waits for the dead-letter queue to take a dead letter it refuses.
    dead_letters_refused: AtomicBool,
    /// The control session's connection, while it has one, and since when control has had
    /// none (from its start, or its last session's end); None before it starts.
    control_connection: Mutex<Option<lapin::ConnectionStatus>>,
    control_lost: Mutex<Option<Instant>>,
    /// The relay's database session ended by a fault, and no new one has yet done its part
    /// (looked for the lead, or, leading, locked the watermark): its events wait meanwhile.
    relay_database_lost: AtomicBool,
    /// When the oldest batch in flight began, while one is: a batch that neither commits nor
    /// fails (a lock held elsewhere, a retry that never clears) holds every one behind it.
    oldest_batch: Mutex<Option<Instant>>,
    /// Why the consumer's last session ended, until it consumes again: a refusal it retries
    /// (rights taken away, a queue deleted) shows in `/readyz`, not only in the log.
    consumer_fault: Mutex<Option<String>>,
}

/// Holds a session's broker connection in [`Health`] while the session lives.
pub(crate) struct SessionConnection<'a> {
    slot: &'a Mutex<Option<lapin::ConnectionStatus>>,
    /// Since when the part has been without a connection: cleared while held, set at the end.
    lost: Option<&'a Mutex<Option<Instant>>>,
}

impl<'a> SessionConnection<'a> {
    fn hold(
        slot: &'a Mutex<Option<lapin::ConnectionStatus>>,
        conn: &lapin::Connection,
        lost: Option<&'a Mutex<Option<Instant>>>,
    ) -> Self {
        *lock(slot) = Some(conn.status().clone());
        if let Some(lost) = lost {
            *lock(lost) = None;
        }
        SessionConnection { slot, lost }
    }
}

impl Drop for SessionConnection<'_> {
    fn drop(&mut self) {
        *lock(self.slot) = None;
        if let Some(lost) = self.lost {
            *lock(lost) = Some(Instant::now());
        }
    }
}

/// Marks the consumer as waiting for the dead-letter queue while it lives.
pub(crate) struct DeadLettersRefused<'a>(&'a Health);

impl Drop for DeadLettersRefused<'_> {
    fn drop(&mut self) {
        self.0.dead_letters_refused.store(false, Ordering::SeqCst);
    }
}

impl Health {
    pub fn new() -> Arc<Self> {
        Arc::new(Health::default())
    }
    /// Topology declared and basic.consume accepted (true), or the session ended (false).
    pub(crate) fn set_consuming(&self, on: bool) {
        if on {
            *lock(&self.consumer_fault) = None;
        }
        self.consuming.store(on, Ordering::SeqCst);
        metrics::gauge!("credit_consuming").set(if on { 1.0 } else { 0.0 });
    }
    /// The consumer's session ended by `fault`; it reconnects.
    pub(crate) fn set_consumer_fault(&self, fault: &str) {
        // Bounded: a body for a probe, not a log.
        let text: String = fault
            .chars()
            .filter(|c| !c.is_control())
            .take(300)
            .collect();
        *lock(&self.consumer_fault) = Some(text);
    }
    pub fn consuming(&self) -> bool {
        self.consuming.load(Ordering::SeqCst)
    }
    /// The oldest batch in flight began at `since`, or none is in flight.
    pub(crate) fn set_oldest_batch(&self, since: Option<Instant>) {
        *lock(&self.oldest_batch) = since;
    }
    /// How long the oldest batch in flight has waited for its decision and ack.
    pub(crate) fn oldest_batch_age(&self) -> Option<Duration> {
        lock(&self.oldest_batch).map(|since| since.elapsed())
    }
    /// The outbox relay task is running (true) or has ended (false).
    pub(crate) fn set_relaying(&self, on: bool) {
        self.relaying.store(on, Ordering::SeqCst);
    }
    pub(crate) fn relaying(&self) -> bool {
        self.relaying.load(Ordering::SeqCst)
    }
    /// The relay's session has `conn` and the events exchange, until the guard is dropped
    /// with the session.
    pub(crate) fn relay_session(&self, conn: &lapin::Connection) -> SessionConnection<'_> {
        self.set_relay_database(true);
        SessionConnection::hold(&self.relay_connection, conn, None)
    }
    /// The relay's database session works (true), or ended by a fault (false).
    pub(crate) fn set_relay_database(&self, working: bool) {
        self.relay_database_lost.store(!working, Ordering::SeqCst);
    }
    /// Whether the relay's session holds a live broker connection and a working database
    /// session.
    pub(crate) fn relay_connected(&self) -> bool {
        !self.relay_database_lost.load(Ordering::SeqCst)
            && self
                .relay_connection()
                .as_ref()
                .is_some_and(lapin::ConnectionStatus::connected)
    }
    /// Whether the broker blocks the relay's connection from publishing (`connection.blocked`:
    /// a memory or disk alarm), so that events wait in the outbox until it lifts the block.
    pub(crate) fn relay_blocked(&self) -> bool {
        blocked(&self.relay_connection)
    }
    fn relay_connection(&self) -> MutexGuard<'_, Option<lapin::ConnectionStatus>> {
        lock(&self.relay_connection)
    }
    /// The consumer's session has `conn`, until the guard is dropped with the session.
    pub(crate) fn consumer_session(&self, conn: &lapin::Connection) -> SessionConnection<'_> {
        SessionConnection::hold(&self.consumer_connection, conn, None)
    }
    /// Whether the broker blocks the consumer's connection (a memory or disk alarm met by a
    /// dead letter's publish): the broker then reads nothing from it, acks included.
    pub(crate) fn consumer_blocked(&self) -> bool {
        blocked(&self.consumer_connection)
    }
    /// The consumer waits for the dead-letter queue, which refuses a letter, until the guard
    /// is dropped.
    pub(crate) fn dead_letters_refused(&self) -> DeadLettersRefused<'_> {
        self.dead_letters_refused.store(true, Ordering::SeqCst);
        DeadLettersRefused(self)
    }
    pub(crate) fn dead_letters_waiting(&self) -> bool {
        self.dead_letters_refused.load(Ordering::SeqCst)
    }
    /// Control begins: without a connection until its first session holds one.
    pub(crate) fn control_starting(&self) {
        *lock(&self.control_lost) = Some(Instant::now());
    }
    /// The control session has `conn`, until the guard is dropped with the session.
    pub(crate) fn control_session(&self, conn: &lapin::Connection) -> SessionConnection<'_> {
        SessionConnection::hold(&self.control_connection, conn, Some(&self.control_lost))
    }
    /// How long control has been without a connection, since it began or its last session
    /// ended; None while a session holds one (a connection found dead counts from the
    /// session's end, a moment later) and before control begins.
    pub(crate) fn control_down_for(&self) -> Option<Duration> {
        if lock(&self.control_connection).is_some() {
            return None;
        }
        lock(&self.control_lost).map(|since| since.elapsed())
    }
}

/// Whether a session holds a live connection the broker blocks.
fn blocked(slot: &Mutex<Option<lapin::ConnectionStatus>>) -> bool {
    lock(slot)
        .as_ref()
        .is_some_and(|s| s.connected() && s.blocked())
}

/// A lock on what a task sets and the HTTP endpoints read: a value, valid whichever writer
/// panicked.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Health {
    /// `/readyz`'s answer from what the tasks set and whether the database answered: ready
    /// (200) or not (503), and the body. `stall_after` is `http.stall_s`.
    pub(crate) fn readiness(
        &self,
        database: bool,
        stall_after: Option<Duration>,
    ) -> (bool, String) {
        let relay = match (
            self.relaying(),
            self.relay_connected(),
            self.relay_blocked(),
        ) {
            (false, ..) => Relay::Down,
            (true, false, _) => Relay::Reconnecting,
            (true, true, true) => Relay::Blocked,
            (true, true, false) => Relay::Publishing,
        };
        let held = if self.dead_letters_waiting() {
            Some(Held::DeadLetterQueue)
        } else if self.consumer_blocked() {
            Some(Held::Broker)
        } else {
            None
        };
        readiness(&Probe {
            database,
            consumer: Consumer {
                fault: lock(&self.consumer_fault).clone(),
                consuming: self.consuming(),
                stalled: stalled(self.oldest_batch_age(), stall_after),
                held,
            },
            relay,
            control_down: self.control_down_for().filter(|d| *d >= CONTROL_GRACE),
        })
    }
}

/// How long control may be without a connection before `/readyz` says so: longer than a
/// reconnect takes, so a start or a broker's restart does not show.
const CONTROL_GRACE: Duration = Duration::from_secs(5);

/// What `/readyz` is made of.
#[derive(Debug, Clone)]
struct Probe {
    database: bool,
    consumer: Consumer,
    relay: Relay,
    /// How long control has been without a connection, past [`CONTROL_GRACE`].
    control_down: Option<Duration>,
}

/// The consumer as `/readyz` tells of it.
#[derive(Debug, Clone)]
struct Consumer {
    consuming: bool,
    /// How long the oldest batch has waited, past `http.stall_s`.
    stalled: Option<Duration>,
    /// What holds its batches back, when the worker knows.
    held: Option<Held>,
    /// Why its last session ended, while it does not consume.
    fault: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Held {
    /// The broker blocks its connection (a memory or disk alarm).
    Broker,
    /// The dead-letter queue refuses a dead letter (full, `x-overflow: reject-publish`).
    DeadLetterQueue,
}

/// The outbox relay as `/readyz` tells of it.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Relay {
    /// Its task has ended.
    Down,
    /// Its session has no live broker connection or no working database session.
    Reconnecting,
    /// Connected, but the broker blocks its publishes (a resource alarm).
    Blocked,
    Publishing,
}

/// How long the oldest batch in flight has waited, when that is `stall_after` or longer.
fn stalled(age: Option<Duration>, stall_after: Option<Duration>) -> Option<Duration> {
    age.filter(|age| stall_after.is_some_and(|limit| *age >= limit))
}

/// Ready once the database answers, the consumer consumes with no batch stalled and the
/// outbox relay runs. What holds the consumer back, a relay not publishing and control
/// without a connection are named; only the first two of those can make it unready (the
/// consumer's through the stall).
fn readiness(p: &Probe) -> (bool, String) {
    let c = &p.consumer;
    let mut consumer = match (c.consuming, c.stalled) {
        (true, None) => "consuming".to_owned(),
        (_, Some(age)) => format!(
            "stalled (the oldest batch has waited {} s for its decision)",
            age.as_secs()
        ),
        (false, None) => match &c.fault {
            Some(fault) => format!("not consuming (reconnecting after: {fault})"),
            None => "not consuming".to_owned(),
        },
    };
    match c.held {
        Some(Held::Broker) => {
            consumer.push_str("; blocked by the broker (a memory or disk alarm)");
        }
        Some(Held::DeadLetterQueue) => consumer.push_str(
            "; waiting for the dead-letter queue, which refuses an invalid message \
             (full, with x-overflow reject-publish?)",
        ),
        None => {}
    }
    let mut body = format!("database: {}\nconsumer: {consumer}\n", up(p.database));
    // Only said when it matters: the relay runs for the whole life of the process, connected.
    match p.relay {
        Relay::Down => body.push_str("outbox relay: down\n"),
        // Still ready: decisions go on and their events wait in the outbox.
        Relay::Reconnecting => body.push_str("outbox relay: reconnecting\n"),
        Relay::Blocked => body.push_str(
            "outbox relay: blocked by the broker (a memory or disk alarm); events wait in the outbox\n",
        ),
        Relay::Publishing => {}
    }
    // Still ready: billing goes on, and commands wait in their queue.
    if let Some(down) = p.control_down {
        let secs = down.as_secs();
        body.push_str(&format!(
            "control: no broker connection for {secs} s; commands wait in their queue\n"
        ));
    }
    let ready = p.database && c.consuming && c.stalled.is_none() && p.relay != Relay::Down;
    (ready, body)
}

fn up(b: bool) -> &'static str {
    if b {
        "up"
    } else {
        "down"
    }
}

#[cfg(test)]
mod tests {
    use super::{readiness, Consumer, Held, Probe, Relay};
    use std::time::Duration;

    const OK: &str = "database: up\nconsumer: consuming\n";

    fn probe(database: bool, consuming: bool, relay: Relay) -> Probe {
        let consumer = Consumer {
            consuming,
            stalled: None,
            held: None,
            fault: None,
        };
        Probe {
            database,
            consumer,
            relay,
            control_down: None,
        }
    }

    #[test]
    fn readiness_names_what_is_missing_and_a_relay_reconnecting_stays_ready() {
        let ready = |db, consuming, relay| readiness(&probe(db, consuming, relay));
        assert_eq!(ready(true, true, Relay::Publishing), (true, OK.into()));
        let reconnecting = format!("{OK}outbox relay: reconnecting\n");
        assert_eq!(ready(true, true, Relay::Reconnecting), (true, reconnecting));
        let blocked = format!(
            "{OK}outbox relay: blocked by the broker (a memory or disk alarm); events wait in the outbox\n"
        );
        assert_eq!(ready(true, true, Relay::Blocked), (true, blocked));
        let down = format!("{OK}outbox relay: down\n");
        assert_eq!(ready(true, true, Relay::Down), (false, down));
        let waiting = "database: down\nconsumer: not consuming\n";
        assert_eq!(
            ready(false, false, Relay::Publishing),
            (false, waiting.into())
        );
        // Why, when its last session ended by a fault; gone once it consumes again.
        let mut p = probe(true, false, Relay::Publishing);
        p.consumer.fault = Some("broker: ACCESS_REFUSED - access to queue 'q' refused".into());
        assert_eq!(
            readiness(&p).1,
            "database: up\nconsumer: not consuming (reconnecting after: broker: ACCESS_REFUSED \
             - access to queue 'q' refused)\n"
        );
        let h = super::Health::default();
        h.set_consumer_fault("line\nbreak");
        assert_eq!(
            h.consumer_fault.lock().unwrap().as_deref(),
            Some("linebreak")
        );
        h.set_consuming(true);
        assert_eq!(*h.consumer_fault.lock().unwrap(), None);
        // No session, no connection.
        assert!(!super::Health::default().relay_connected());
        assert!(!super::Health::default().relay_blocked());
    }

    #[test]
    fn a_batch_held_past_http_stall_s_makes_the_worker_unready() {
        let secs = Duration::from_secs;
        let limit = Some(secs(120));
        assert_eq!(super::stalled(None, limit), None);
        assert_eq!(super::stalled(Some(secs(119)), limit), None);
        assert_eq!(super::stalled(Some(secs(120)), limit), Some(secs(120)));
        assert_eq!(super::stalled(Some(secs(999_999)), None), None, "0 = never");
        let mut p = probe(true, true, Relay::Publishing);
        p.consumer.stalled = Some(secs(130));
        assert_eq!(
            readiness(&p),
            (
                false,
                "database: up\nconsumer: stalled (the oldest batch has waited 130 s for its decision)\n"
                    .into()
            )
        );
        let health = super::Health::default();
        assert_eq!(health.oldest_batch_age(), None);
        health.set_oldest_batch(Some(std::time::Instant::now() - secs(5)));
        assert!(health.oldest_batch_age().is_some_and(|a| a >= secs(5)));
    }

    /// What holds the consumer back is named beside its state, which alone (through the
    /// stall) decides readiness; control without a connection is named and still ready.
    #[test]
    fn readiness_names_what_holds_the_consumer_and_control_without_a_connection() {
        let mut p = probe(true, true, Relay::Publishing);
        p.consumer.held = Some(Held::DeadLetterQueue);
        let refused = "database: up\nconsumer: consuming; waiting for the dead-letter queue, \
                       which refuses an invalid message (full, with x-overflow reject-publish?)\n";
        assert_eq!(readiness(&p), (true, refused.into()));
        p.consumer.stalled = Some(Duration::from_secs(121));
        let (ready, body) = readiness(&p);
        assert!(!ready);
        assert!(body.contains("consumer: stalled (the oldest batch has waited 121 s for its decision); waiting for the dead-letter queue"), "{body}");
        let mut p = probe(true, true, Relay::Publishing);
        p.consumer.held = Some(Held::Broker);
        let blocked =
            "database: up\nconsumer: consuming; blocked by the broker (a memory or disk alarm)\n";
        assert_eq!(readiness(&p), (true, blocked.into()));
        let mut p = probe(true, true, Relay::Publishing);
        p.control_down = Some(Duration::from_millis(7_900));
        let control =
            format!("{OK}control: no broker connection for 7 s; commands wait in their queue\n");
        assert_eq!(readiness(&p), (true, control));
    }

    /// Control is without a connection from the start until its session holds one, and again
    /// once that session ends; the dead-letter wait lasts as long as its guard.
    #[test]
    fn health_tracks_control_and_the_dead_letter_wait() {
        let health = super::Health::default();
        assert_eq!(health.control_down_for(), None, "control not begun");
        health.control_starting();
        assert!(health.control_down_for().is_some());
        assert!(!health.dead_letters_waiting());
        let refused = health.dead_letters_refused();
        assert!(health.dead_letters_waiting());
        drop(refused);
        assert!(!health.dead_letters_waiting());
        assert!(!health.consumer_blocked());
        // Past the grace, a worker whose control never connected says so.
        *super::lock(&health.control_lost) =
            Some(std::time::Instant::now() - Duration::from_secs(6));
        let (ready, body) = health.readiness(true, None);
        assert!(
            body.contains("control: no broker connection for 6 s"),
            "{body}"
        );
        assert!(!ready, "not consuming");
    }
}
