//! What `/readyz` reports, as the tasks that know it set it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// What `/readyz` reports: set by the consumer as it connects and consumes, and by the
/// supervisor while the outbox relay runs.
#[derive(Debug, Default)]
pub struct Health {
    consuming: AtomicBool,
    relaying: AtomicBool,
    /// The broker connection of the outbox relay's session, while it has one: read when asked,
    /// so a connection that died while the relay was idle shows at once.
    relay_connection: Mutex<Option<lapin::ConnectionStatus>>,
    /// The relay's database session ended by a fault, and no new one has yet done its part
    /// (looked for the lead, or, leading, locked the watermark): its events wait meanwhile.
    relay_database_lost: AtomicBool,
    /// When the oldest batch in flight began, while one is: a batch that neither commits nor
    /// fails (a lock held elsewhere, a retry that never clears) holds every one behind it.
    oldest_batch: Mutex<Option<Instant>>,
}

/// Holds the outbox relay's session's connection in [`Health`] while the session lives.
pub(crate) struct RelaySession<'a>(&'a Health);

impl Drop for RelaySession<'_> {
    fn drop(&mut self) {
        *self.0.relay_connection() = None;
    }
}

impl Health {
    pub fn new() -> Arc<Self> {
        Arc::new(Health::default())
    }
    /// Topology declared and basic.consume accepted (true), or the session ended (false).
    pub(crate) fn set_consuming(&self, on: bool) {
        self.consuming.store(on, Ordering::SeqCst);
        metrics::gauge!("credit_consuming").set(if on { 1.0 } else { 0.0 });
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
    pub(crate) fn relay_session(&self, conn: &lapin::Connection) -> RelaySession<'_> {
        *self.relay_connection() = Some(conn.status().clone());
        self.set_relay_database(true);
        RelaySession(self)
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
        self.relay_connection()
            .as_ref()
            .is_some_and(lapin::ConnectionStatus::blocked)
    }
    fn relay_connection(&self) -> MutexGuard<'_, Option<lapin::ConnectionStatus>> {
        lock(&self.relay_connection)
    }
}

/// A lock on what a task sets and the HTTP endpoints read: a value, valid whichever writer
/// panicked.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}
