//! The AMQP toolkit every part of credit-worker uses: one connect function (with a timeout),
//! the reconnecting session loop, the confirmed publisher, and the properties messages carry.

pub(crate) mod producer;
pub use producer::PRODUCER_HEADER;
pub mod publisher;
pub(crate) mod session;
pub mod topology;

use std::time::Duration;

use lapin::tcp::OwnedTLSConfig;
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::uri::AMQPUri;
use lapin::{BasicProperties, Connect, Connection, ConnectionProperties};

use crate::config::AmqpSettings;

pub use publisher::{Outgoing, PublishError, Publisher};
pub(crate) use session::{reconnecting, SessionFault};

/// How long one connection attempt may take (TCP, TLS and the AMQP handshake): a peer that
/// accepts TCP but never answers AMQP must not hang a session forever.
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

/// The largest frame a connection that reads messages others published asks for when the
/// URL does not say (`?frame_max=`): RabbitMQ's default, so the largest a producer can send
/// there. A message's body is split into frames, its properties (headers) are not. Not the
/// broker's own value: a broker set to 0 (no limit) would have lapin allocate its buffers for
/// 4 GiB frames. A broker that allows larger frames needs `?frame_max=` to match.
const READ_FRAME_MAX: u32 = 128 * 1024;

/// At least how many bytes `props`'s headers take on the wire (a field table): what a copy
/// of the message carries besides the properties' other, short, fields.
pub(crate) fn headers_len(props: &BasicProperties) -> usize {
    props.headers().as_ref().map_or(0, table_len)
}

fn table_len(t: &FieldTable) -> usize {
    4 + t
        .inner()
        .iter()
        .map(|(k, v)| 1 + k.as_str().len() + value_len(v))
        .sum::<usize>()
}

fn value_len(v: &AMQPValue) -> usize {
    1 + match v {
        AMQPValue::LongString(s) => 4 + s.as_bytes().len(),
        AMQPValue::ShortString(s) => 1 + s.as_str().len(),
        AMQPValue::ByteArray(b) => 4 + b.as_slice().len(),
        AMQPValue::FieldTable(t) => table_len(t),
        AMQPValue::FieldArray(a) => 4 + a.as_slice().iter().map(value_len).sum::<usize>(),
        // Numbers, booleans, timestamps, decimals, void: at most eight bytes.
        _ => 8,
    }
}

/// The heartbeat a connection asks for when the URL does not say (`?heartbeat=`), in seconds:
/// a broker that stops answering with the connection up (a host frozen, a flow dropped by a
/// NAT) is noticed within two of them, and `/readyz` says 503, instead of after the broker's
/// 60 s offer twice over.
const HEARTBEAT_S: u16 = 10;

/// The largest frame a connection that only publishes asks for. lapin keeps a read and a
/// write buffer of 32 frames per connection, resident from the connect: 8 MiB at 128 KiB,
/// 2 MiB at this size.
const SMALL_FRAME_MAX: u32 = 32 * 1024;

/// Opens a connection to `amqp.url` on the current tokio runtime, giving up after
/// [`CONNECT_TIMEOUT`]. `amqps://` URLs verify the broker's certificate against the system's
/// roots and `amqp.tls_ca_file`. lapin's own automatic recovery stays off: the session loops
/// reconnect, re-declare and re-apply `basic_qos` themselves.
///
/// The connection asks for frames of [`READ_FRAME_MAX`] (unless the URL sets a size): it may
/// be handed any message a producer could publish, and a delivery whose properties do not fit
/// one frame ends the connection, which then takes the same message again, forever.
pub async fn connect(amqp: &AmqpSettings, name: &str) -> Result<Connection, lapin::Error> {
    open(amqp, name, READ_FRAME_MAX).await
}

/// [`connect`] for a connection that only publishes (what it reads are the broker's replies
/// and confirms): frames of [`SMALL_FRAME_MAX`], which saves its buffers most of their size.
pub(crate) async fn connect_publisher(
    amqp: &AmqpSettings,
    name: &str,
) -> Result<Connection, lapin::Error> {
    open(amqp, name, SMALL_FRAME_MAX).await
}

async fn open(amqp: &AmqpSettings, name: &str, frame_max: u32) -> Result<Connection, lapin::Error> {
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
    uri.query.frame_max.get_or_insert(frame_max);
    uri.query.heartbeat.get_or_insert(HEARTBEAT_S);
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

/// The broker refused the URL (its login, virtual host or certificate): a mistake in
/// `amqp.url` or the broker's users, which no retry fixes.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct Refused(String);

/// `e`, met opening a connection, as [`Refused`] where the broker refused the URL.
pub(crate) fn refused(e: lapin::Error) -> Result<Refused, lapin::Error> {
    if is_certificate_error(&e) {
        return Ok(Refused(format!(
            "amqp.url: the broker's TLS certificate does not verify ({e}); amqp.tls_ca_file must \
             name the CA that signed it, and the URL's host must be a name in the certificate"
        )));
    }
    if is_login_refused(&e) {
        return Ok(Refused(format!(
            "amqp.url: the broker refused the login ({e}); check the user, password and \
             virtual host in the URL, and the user's permissions on that virtual host"
        )));
    }
    Err(e)
}

/// A connection's error for an operator's command: [`Refused`] where the broker refused the
/// URL, else as it is.
pub(crate) fn for_command(e: lapin::Error) -> anyhow::Error {
    match refused(e) {
        Ok(named) => named.into(),
        Err(e) => e.into(),
    }
}

/// True when the broker refused the login (`ACCESS_REFUSED`: the URL's user or password) or
/// its virtual host (`NOT_ALLOWED`: missing, or not the user's) while a connection opened.
/// A `NOT_ALLOWED` for a connection limit reached or a virtual host that is down is not one:
/// those clear by themselves.
pub(crate) fn is_login_refused(e: &lapin::Error) -> bool {
    use lapin::protocol::{AMQPErrorKind, AMQPHardError, AMQPSoftError};
    match e.kind() {
        lapin::ErrorKind::ProtocolError(amqp) => match amqp.kind() {
            AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED) => true,
            AMQPErrorKind::Hard(AMQPHardError::NOTALLOWED) => {
                vhost_refused(amqp.get_message().as_str())
            }
            _ => false,
        },
        lapin::ErrorKind::AuthProviderError(_) => true,
        _ => false,
    }
}

/// Whether RabbitMQ's `NOT_ALLOWED` text says the virtual host is missing or not the user's
/// ("vhost x not found", "access to vhost 'x' refused for user 'u'"), rather than a limit
/// reached ("…: connection limit (5) is reached") or a virtual host down ("vhost x is down").
fn vhost_refused(text: &str) -> bool {
    (text.contains("not found") || text.contains("refused for user")) && !text.contains("limit")
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

/// A property [`without`] can leave out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Prop {
    UserId,
    Expiration,
}

/// A copy of `p` without the properties in `drop` (lapin has no way to unset one field).
pub(crate) fn without(p: &BasicProperties, drop: &[Prop]) -> BasicProperties {
    fn set<T: Clone>(
        props: BasicProperties,
        v: &Option<T>,
        with: fn(BasicProperties, T) -> BasicProperties,
    ) -> BasicProperties {
        match v {
            Some(v) => with(props, v.clone()),
            None => props,
        }
    }
    let none = |prop| drop.contains(&prop);
    let q = BasicProperties::default();
    let q = set(q, p.content_type(), BasicProperties::with_content_type);
    let q = set(
        q,
        p.content_encoding(),
        BasicProperties::with_content_encoding,
    );
    let q = set(q, p.headers(), BasicProperties::with_headers);
    let q = set(q, p.delivery_mode(), BasicProperties::with_delivery_mode);
    let q = set(q, p.priority(), BasicProperties::with_priority);
    let q = set(q, p.correlation_id(), BasicProperties::with_correlation_id);
    let q = set(q, p.reply_to(), BasicProperties::with_reply_to);
    let q = if none(Prop::Expiration) {
        q
    } else {
        set(q, p.expiration(), BasicProperties::with_expiration)
    };
    let q = set(q, p.message_id(), BasicProperties::with_message_id);
    let q = set(q, p.timestamp(), BasicProperties::with_timestamp);
    let q = set(q, p.kind(), BasicProperties::with_type);
    let q = if none(Prop::UserId) {
        q
    } else {
        set(q, p.user_id(), BasicProperties::with_user_id)
    };
    let q = set(q, p.app_id(), BasicProperties::with_app_id);
    set::<ShortString>(q, p.cluster_id(), BasicProperties::with_cluster_id)
}

/// Persistent JSON: what the worker and its tools publish to the input queue.
pub fn persistent_json() -> BasicProperties {
    BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type("application/json".into())
}

/// The properties of an event: persistent JSON with the event's id as `message_id`, so
/// consumers can deduplicate a republished event. Ids are at most 255 bytes, as AMQP allows
/// (`events::bounded_id`); one written to the outbox before that bound is left out of the
/// properties, and the body always carries `event_id`. `user_id` is the worker's broker user
/// (`producer::own_user`), which the broker verifies: subscribers can tell the worker's events
/// from any other publisher's.
pub(crate) fn event_properties(
    event_id: &str,
    at: chrono::DateTime<chrono::Utc>,
    user_id: Option<&str>,
) -> BasicProperties {
    let props = persistent_json().with_timestamp(u64::try_from(at.timestamp()).unwrap_or(0));
    let props = as_user(props, user_id);
    match lapin::types::ShortString::try_new(event_id) {
        Ok(id) => props.with_message_id(id),
        Err(_) => props,
    }
}

/// `props` sent as broker user `user`: its `user_id`, which the broker checks against the
/// connection's user, so a receiver can tell who sent it.
pub(crate) fn as_user(props: BasicProperties, user: Option<&str>) -> BasicProperties {
    match user.and_then(|u| ShortString::try_new(u).ok()) {
        Some(user) => props.with_user_id(user),
        None => props,
    }
}

#[cfg(test)]
mod tests {
    use lapin::types::{AMQPValue, FieldTable};

    use super::*;

    #[test]
    fn a_missing_or_forbidden_vhost_is_a_refusal_and_a_limit_is_not() {
        assert!(vhost_refused("NOT_ALLOWED - vhost nosuch not found"));
        assert!(vhost_refused(
            "NOT_ALLOWED - access to vhost '/' refused for user 'u'"
        ));
        assert!(!vhost_refused(
            "NOT_ALLOWED - connection refused for user 'u': user connection limit (0) is reached"
        ));
        assert!(!vhost_refused(
            "NOT_ALLOWED - access to vhost '/' refused for user 'u': vhost connection limit (5) is reached"
        ));
        assert!(!vhost_refused("NOT_ALLOWED - vhost / is down"));
    }

    #[test]
    fn headers_are_measured_as_they_travel() {
        assert_eq!(headers_len(&BasicProperties::default()), 0);
        let mut inner = FieldTable::default();
        inner.insert("n".into(), AMQPValue::LongLongInt(7));
        let mut t = FieldTable::default();
        t.insert("k".into(), AMQPValue::LongString("x".repeat(100).into()));
        t.insert("t".into(), AMQPValue::FieldTable(inner));
        // 4 + (1 + 1 + 1 + 4 + 100) + (1 + 1 + 1 + (4 + 1 + 1 + 1 + 8)).
        assert_eq!(
            headers_len(&BasicProperties::default().with_headers(t)),
            129
        );
    }

    #[test]
    fn without_leaves_out_only_the_properties_named() {
        let mut h = FieldTable::default();
        h.insert("trace".into(), AMQPValue::LongString("t1".into()));
        let every = persistent_json()
            .with_content_encoding("identity".into())
            .with_headers(h)
            .with_priority(3)
            .with_correlation_id("c1".into())
            .with_reply_to("r1".into())
            .with_expiration("60000".into())
            .with_message_id("m1".into())
            .with_timestamp(1_700_000_000)
            .with_type("t".into())
            .with_user_id("executor".into())
            .with_app_id("a1".into())
            .with_cluster_id("k1".into());
        assert_eq!(without(&every, &[]), every);
        let dead = without(&every, &[Prop::Expiration]);
        assert_eq!(dead.expiration(), &None);
        assert_eq!(dead.clone().with_expiration("60000".into()), every);
        let anonymous = without(&every, &[Prop::UserId]);
        assert_eq!(anonymous.user_id(), &None);
        assert_eq!(anonymous.with_user_id("executor".into()), every);
    }
}
