//! The AMQP toolkit every part of credit-worker uses: one connect function (with a timeout),
//! the reconnecting session loop, the confirmed publisher, and the properties messages carry.

pub mod publisher;
pub(crate) mod session;
pub mod topology;

use std::time::Duration;

use lapin::{BasicProperties, Connection, ConnectionProperties};

pub use publisher::{Outgoing, PublishError, Publisher};
pub(crate) use session::reconnecting;

/// How long one connection attempt may take (TCP and the AMQP handshake): a peer that accepts
/// TCP but never answers AMQP must not hang a session forever.
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

/// Opens a connection on the current tokio runtime, giving up after
/// [`CONNECT_TIMEOUT`]. lapin's own automatic recovery stays off: the session
/// loops reconnect, re-declare and re-apply `basic_qos` themselves.
pub async fn connect(url: &str, name: &str) -> Result<Connection, lapin::Error> {
    let props = ConnectionProperties::default().with_connection_name(name.into());
    let timeout = CONNECT_TIMEOUT;
    match tokio::time::timeout(timeout, Connection::connect(url, props)).await {
        Ok(result) => result,
        Err(_) => Err(lapin::Error::from(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("AMQP connect timed out after {timeout:?}"),
        ))),
    }
}

/// Persistent JSON: what the worker and its tools publish to the input queue.
pub fn persistent_json() -> BasicProperties {
    BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type("application/json".into())
}

/// The properties of an event: persistent JSON with the event's id as `message_id`, so
/// consumers can deduplicate a republished event. An id over AMQP's 255 bytes (long user ids
/// and keys) is left out of the properties; the body always carries `event_id`.
pub fn event_properties(event_id: &str, at: chrono::DateTime<chrono::Utc>) -> BasicProperties {
    let props = persistent_json().with_timestamp(u64::try_from(at.timestamp()).unwrap_or(0));
    match lapin::types::ShortString::try_new(event_id) {
        Ok(id) => props.with_message_id(id),
        Err(_) => props,
    }
}
