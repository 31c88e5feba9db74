//! A delivery too large for the connection's frames. RabbitMQ accepts a message whose
//! properties fill a whole frame and adds its own headers when it delivers it (a quorum
//! queue's `x-delivery-count`, 26 bytes), so the delivery's header frame can exceed the
//! frame size the connection agreed, and the client then ends the connection (`FRAME-ERROR`).
//! Every delivery unacked on it goes back to the queue and counts towards its
//! `x-delivery-limit` with the oversized one, which comes first again at the next session.
//! So after such an end the consumer reads one delivery at a time until it has taken as
//! many as were in flight: the oversized one then ends a session alone, until the broker
//! dead-letters it at its delivery limit, and the others are decided one by one meanwhile.

use std::sync::atomic::{AtomicUsize, Ordering};

use futures::{FutureExt, Stream, StreamExt};
use lapin::protocol::{AMQPErrorKind, AMQPHardError};
use tracing::warn;

/// How many deliveries the consumer still takes one at a time.
#[derive(Default)]
pub(super) struct OneAtATime(AtomicUsize);

impl OneAtATime {
    /// The prefetch for a new session: 1 while deliveries are still to be read one at a time.
    pub(super) fn prefetch(&self, full: u16) -> u16 {
        if self.active() {
            1
        } else {
            full
        }
    }

    /// The largest batch: 1 while deliveries are still to be read one at a time.
    pub(super) fn max_batch(&self, full: usize) -> usize {
        if self.active() {
            1
        } else {
            full
        }
    }

    pub(super) fn active(&self) -> bool {
        self.0.load(Ordering::Relaxed) > 0
    }

    /// Counts `n` deliveries read; whether that was the last one to be read alone.
    pub(super) fn counted(&self, n: usize) -> bool {
        let left = self.0.load(Ordering::Relaxed).saturating_sub(n);
        self.0.store(left, Ordering::Relaxed);
        left == 0
    }

    /// After a session an oversized delivery ended: the next `in_flight` deliveries (those
    /// that went back to the queue with it, which the queue delivers first) are read alone.
    fn begin(&self, in_flight: u16) {
        self.0.store(usize::from(in_flight), Ordering::Relaxed);
    }

    /// At the end of a session with the connection's `events`: begins when an oversized
    /// delivery ended it (`prefetch` of them were in flight at most).
    pub(super) fn after_the_session(
        &self,
        events: &mut (impl Stream<Item = lapin::Event> + Unpin),
        prefetch: u16,
    ) {
        if ended_on_an_oversized_frame(events) {
            warn!(
                reading_alone = prefetch,
                "a delivery larger than the connection's frames (its properties) ended the \
                 session; the deliveries that came back with it are read one at a time, so \
                 that it alone reaches its x-delivery-limit and is dead-lettered by the broker"
            );
            self.begin(prefetch);
        }
    }
}

/// Whether the connection whose `events` these are ended on a frame larger than it agreed.
fn ended_on_an_oversized_frame(events: &mut (impl Stream<Item = lapin::Event> + Unpin)) -> bool {
    let mut oversized = false;
    while let Some(Some(event)) = events.next().now_or_never() {
        if let lapin::Event::Error(e) = event {
            oversized |= is_oversized_frame(&e);
        }
    }
    oversized
}

fn is_oversized_frame(e: &lapin::Error) -> bool {
    matches!(e.kind(), lapin::ErrorKind::ProtocolError(amqp)
        if *amqp.kind() == AMQPErrorKind::Hard(AMQPHardError::FRAMEERROR))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn after_an_oversized_delivery_as_many_as_were_in_flight_are_read_alone() {
        let alone = OneAtATime::default();
        assert_eq!((alone.prefetch(1000), alone.max_batch(200)), (1000, 200));
        alone.begin(3);
        assert_eq!((alone.prefetch(1000), alone.max_batch(200)), (1, 1));
        assert!(!alone.counted(1));
        assert!(!alone.counted(1));
        assert!(alone.counted(1));
        assert_eq!((alone.prefetch(1000), alone.max_batch(200)), (1000, 200));
    }
}
