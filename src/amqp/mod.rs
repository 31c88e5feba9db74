//! The AMQP toolkit every part of credit-worker uses: one connect function (with a timeout),
//! the reconnecting session loop, the confirmed publisher, and the properties messages carry.

pub(crate) mod producer;
pub use producer::PRODUCER_HEADER;
pub mod publisher;
pub(crate) mod session;
pub mod topology;

use std::time::Duration;

use lapin::tcp::OwnedTLSConfig;
use lapin::uri::AMQPUri;
use lapin::{BasicProperties, Connect, Connection, ConnectionProperties};

use crate::config::AmqpSettings;

pub use publisher::{Outgoing, PublishError, Publisher};
pub(crate) use session::reconnecting;

/// How long one connection attempt may take (TCP, TLS and the AMQP handshake): a peer that
/// accepts TCP but never answers AMQP must not hang a session forever.
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

/// The largest frame asked for when the URL does not say (`?frame_max=`). lapin keeps a read
/// and a write buffer of 32 frames per connection, zeroed when it connects: at RabbitMQ's
/// default of 128 KiB that is 8 MiB resident per connection for messages of a few hundred
/// bytes; larger bodies are split into frames.
const FRAME_MAX: u32 = 32 * 1024;

/// Opens a connection to `amqp.url` on the current tokio runtime, giving up after
/// [`CONNECT_TIMEOUT`]. `amqps://` URLs verify the broker's certificate against the system's
/// roots and `amqp.tls_ca_file`. lapin's own automatic recovery stays off: the session loops
/// reconnect, re-declare and re-apply `basic_qos` themselves.
pub async fn connect(amqp: &AmqpSettings, name: &str) -> Result<Connection, lapin::Error> {
    let tls = OwnedTLSConfig {
        identity: None,
        // Read on every connect, so a rotated CA file is picked up by the next reconnect.
        cert_chain: amqp.tls_ca_pem().map_err(|why| {
            lapin::Error::from(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("amqp.tls_ca_file: {why}"),
            ))
        })?,
    };
    let mut uri: AMQPUri = amqp.url.parse().map_err(|why| {
        lapin::Error::from(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("amqp.url: {why}"),
        ))
    })?;
    uri.query.frame_max.get_or_insert(FRAME_MAX);
    let props = ConnectionProperties::default().with_connection_name(name.into());
    let runtime = lapin::runtime::default_runtime()?;
    let timeout = CONNECT_TIMEOUT;
    let connecting = uri.connect_with_config(props, tls, runtime);
    match tokio::time::timeout(timeout, connecting).await {
        Ok(result) => result,
        Err(_) => Err(lapin::Error::from(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("AMQP connect timed out after {timeout:?}"),
        ))),
    }
}

/// True when the broker's TLS certificate did not verify: retrying will not help.
pub(crate) fn is_certificate_error(e: &lapin::Error) -> bool {
    match e.kind() {
        lapin::ErrorKind::IOError(io) => {
            io.kind() == std::io::ErrorKind::InvalidData && io.to_string().contains("certificate")
        }
        _ => false,
    }
}

/// `props` without the headers named in `drop`; everything else kept.
pub(crate) fn without_headers(props: &BasicProperties, drop: &[&str]) -> BasicProperties {
    let Some(headers) = props.headers() else {
        return props.clone();
    };
    let mut kept = lapin::types::FieldTable::default();
    for (k, v) in headers.inner() {
        if !drop.contains(&k.as_str()) {
            kept.insert(k.clone(), v.clone());
        }
    }
    props.clone().with_headers(kept)
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
