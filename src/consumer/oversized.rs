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
    /// A session's prefetch or largest batch: 1 while deliveries are still to be read one at
    /// a time, else `full`.
    pub(super) fn limit<T: From<u8>>(&self, full: T) -> T {
        if self.active() {
            T::from(1)
        } else {
            full
        }
    }

    pub(super) fn active(&self) -> bool {
        self.0.load(Ordering::Relaxed) > 0
    }

    /// Counts `n` deliveries read alone, `fresh` when one of them had not been delivered
    /// before; whether reading alone is over. Those that went back with the oversized one
    /// are redelivered and come first: they are behind once a fresh one comes, or once as
    /// many as could have been in flight were read.
    pub(super) fn read(&self, n: usize, fresh: bool) -> bool {
        let left = if fresh {
            0
        } else {
            self.0.load(Ordering::Relaxed).saturating_sub(n)
        };
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

/// lapin's own refusal of a frame past the size agreed (not a broker's `FRAME_ERROR`).
fn is_oversized_frame(e: &lapin::Error) -> bool {
    matches!(e.kind(), lapin::ErrorKind::ProtocolError(amqp)
        if *amqp.kind() == AMQPErrorKind::Hard(AMQPHardError::FRAMEERROR)
            && amqp.get_message().as_str().starts_with("frame too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn after_an_oversized_delivery_as_many_as_were_in_flight_are_read_alone() {
        let alone = OneAtATime::default();
        assert_eq!((alone.limit(1000_u16), alone.limit(200_usize)), (1000, 200));
        alone.begin(3);
        assert_eq!((alone.limit(1000_u16), alone.limit(200_usize)), (1, 1));
        assert!(!alone.read(1, false));
        assert!(!alone.read(1, false));
        assert!(alone.read(1, false));
        assert_eq!((alone.limit(1000_u16), alone.limit(200_usize)), (1000, 200));
    }

    #[test]
    fn reading_alone_ends_at_the_first_delivery_not_delivered_before() {
        let alone = OneAtATime::default();
        alone.begin(1000);
        assert!(!alone.read(1, false));
        assert!(alone.read(1, true));
        assert_eq!(alone.limit(1000_u16), 1000);
    }

    #[test]
    fn only_lapins_refusal_of_a_large_frame_counts() {
        let error = |text: &str| {
            let amqp =
                lapin::protocol::AMQPError::new(AMQPHardError::FRAMEERROR.into(), text.into());
            lapin::Error::from(lapin::ErrorKind::ProtocolError(amqp))
        };
        assert!(is_oversized_frame(&error("frame too large: 131099 bytes")));
        assert!(!is_oversized_frame(&error(
            "FRAME_ERROR - type 2, all octets"
        )));
    }
}
