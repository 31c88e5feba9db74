//! RabbitMQ names and declarations (docs/contract.md §1, §6, §7). Every exchange and queue name carries
//! `amqp.namespace`; routing keys do not.

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, ExchangeKind};

use crate::config::{AmqpSettings, QueueType};

pub const INPUT: &str = "node_execution";
pub const INPUT_ROUTING_KEY: &str = "node_execution";
pub const DLX: &str = "node_execution.dlx";
pub const DEAD: &str = "node_execution.dead";
pub const EVENTS: &str = "credit.events";
pub const CONTROL: &str = "credit.control";
/// The namespace's mark: which ledger (database) it belongs to ([`declare_ledger_mark`]).
pub const LEDGER: &str = "credit.ledger";
/// The queue holding how far the ledger's events were published (src/progress.rs).
pub const PROGRESS: &str = "credit.ledger.progress";

/// Names in one namespace.
#[derive(Debug, Clone)]
pub struct Names {
    pub input_exchange: String,
    pub input_queue: String,
    pub dlx: String,
    pub dead_queue: String,
    pub events: String,
    pub control: String,
    pub ledger: String,
    pub progress: String,
}

impl Names {
    pub fn new(namespace: &str) -> Self {
        let n = |base: &str| format!("{namespace}{base}");
        Names {
            input_exchange: n(INPUT),
            input_queue: n(INPUT),
            dlx: n(DLX),
            dead_queue: n(DEAD),
            events: n(EVENTS),
            control: n(CONTROL),
            ledger: n(LEDGER),
            progress: n(PROGRESS),
        }
    }
}

fn durable() -> ExchangeDeclareOptions {
    ExchangeDeclareOptions {
        durable: true,
        ..Default::default()
    }
}

fn durable_queue() -> QueueDeclareOptions {
    QueueDeclareOptions {
        durable: true,
        ..Default::default()
    }
}

fn queue_args(settings: &AmqpSettings) -> FieldTable {
    let mut args = FieldTable::default();
    if settings.queue_type == QueueType::Quorum {
        args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString("quorum".into()),
        );
    }
    args
}

/// What a refusal of [`refuses_arguments`] means, and the way out, for the log line that ends
/// the session.
pub(crate) const REFUSED_ARGUMENTS: &str = "the broker refuses this configuration: a queue or \
     exchange exists with other arguments (amqp.queue_type, amqp.delivery_limit, …), which it \
     cannot change in place; keep the setting, or drain and delete it, or use a new \
     amqp.namespace";

/// Whether the broker refused a declaration because the queue or exchange exists with other
/// arguments (e.g. `amqp.delivery_limit` or `amqp.queue_type` changed): RabbitMQ cannot change
/// them in place, so every reconnect would be refused the same way.
pub(crate) fn refuses_arguments(e: &lapin::Error) -> bool {
    use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
    match e.kind() {
        lapin::ErrorKind::ProtocolError(amqp) => {
            *amqp.kind() == AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED)
                && amqp.get_message().as_str().contains("inequivalent arg")
        }
        _ => false,
    }
}

/// Options that only look a queue up (its counts), declaring nothing: a missing queue is a
/// `NOT_FOUND` (see [`not_found`]) that closes the channel.
pub(crate) fn passive() -> lapin::options::QueueDeclareOptions {
    lapin::options::QueueDeclareOptions {
        passive: true,
        ..Default::default()
    }
}

/// Whether the broker refused a passive declaration because the queue does not exist.
pub(crate) fn not_found(e: &lapin::Error) -> bool {
    use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
    matches!(e.kind(), lapin::ErrorKind::ProtocolError(amqp)
        if *amqp.kind() == AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND))
}

/// Whether the broker refused a passive declaration because another connection holds the
/// queue exclusively: it is there, and a publish to it is delivered.
pub(crate) fn locked(e: &lapin::Error) -> bool {
    use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
    matches!(e.kind(), lapin::ErrorKind::ProtocolError(amqp)
        if *amqp.kind() == AMQPErrorKind::Soft(AMQPSoftError::RESOURCELOCKED))
}

/// Declares the whole topology; idempotent.
pub async fn declare(ch: &Channel, settings: &AmqpSettings) -> Result<Names, lapin::Error> {
    let names = Names::new(&settings.namespace);
    exchange(ch, &names.dlx, ExchangeKind::Fanout).await?;
    queue(ch, &names.dead_queue, queue_args(settings)).await?;
    bind(ch, &names.dead_queue, &names.dlx, "").await?;

    exchange(ch, &names.input_exchange, ExchangeKind::Direct).await?;
    queue(ch, &names.input_queue, input_args(settings, &names)).await?;
    bind(
        ch,
        &names.input_queue,
        &names.input_exchange,
        INPUT_ROUTING_KEY,
    )
    .await?;

    exchange(ch, &names.events, ExchangeKind::Topic).await?;
    queue(ch, &names.control, FieldTable::default()).await?;
    Ok(names)
}

/// The input queue's arguments: its dead letters go to the DLX, and a quorum queue gives up a
/// message redelivered `amqp.delivery_limit` times.
fn input_args(settings: &AmqpSettings, names: &Names) -> FieldTable {
    let mut args = queue_args(settings);
    args.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString(names.dlx.as_str().into()),
    );
    if settings.queue_type == QueueType::Quorum {
        args.insert(
            "x-delivery-limit".into(),
            AMQPValue::LongLongInt(i64::from(settings.delivery_limit)),
        );
    }
    args
}

async fn exchange(ch: &Channel, name: &str, kind: ExchangeKind) -> Result<(), lapin::Error> {
    ch.exchange_declare(name.into(), kind, durable(), FieldTable::default())
        .await
}

async fn queue(ch: &Channel, name: &str, args: FieldTable) -> Result<(), lapin::Error> {
    ch.queue_declare(name.into(), durable_queue(), args)
        .await
        .map(|_| ())
}

async fn bind(ch: &Channel, queue: &str, exchange: &str, key: &str) -> Result<(), lapin::Error> {
    ch.queue_bind(
        queue.into(),
        exchange.into(),
        key.into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
}

/// Declares the namespace's mark of `ledger_id`, the database's ledger id
/// (`ledger::identity`): an internal exchange (nothing can publish to it) whose
/// `alternate-exchange` argument names the ledger. RabbitMQ compares that argument at every
/// declaration of the exchange and refuses another value (`PRECONDITION_FAILED`), so of two
/// databases on one namespace the second is refused, whichever starts first and however
/// close together, and the mark outlives every worker. The exchange it names does not exist;
/// nothing is ever routed to it. Its name is in the namespace, as RabbitMQ asks for the right
/// to write to it (and to read the mark) of whoever declares the mark.
///
/// On a channel of its own, as a refusal closes it. A broker user without the rights (one
/// set up for a build before the mark) is warned of, once a process, and the worker runs
/// unguarded, rather than stop billing at an upgrade: false then.
pub(crate) async fn declare_ledger_mark(
    conn: &lapin::Connection,
    names: &Names,
    ledger_id: &str,
) -> Result<bool, lapin::Error> {
    let ch = conn.create_channel().await?;
    let mut args = FieldTable::default();
    args.insert(
        "alternate-exchange".into(),
        AMQPValue::LongString(format!("{}.{ledger_id}", names.ledger).into()),
    );
    let options = ExchangeDeclareOptions {
        durable: true,
        internal: true,
        ..Default::default()
    };
    let declared = ch
        .exchange_declare(
            names.ledger.as_str().into(),
            ExchangeKind::Fanout,
            options,
            args,
        )
        .await;
    match declared {
        Ok(()) => ch.close(200, "marked".into()).await.map(|()| true),
        Err(e) if refuses_arguments(&e) => {
            let namespace = names.ledger.strip_suffix(LEDGER).unwrap_or_default();
            let why = other_ledger(namespace, ledger_id, &e.to_string());
            tracing::error!("{why}");
            Err(e)
        }
        Err(e) if access_refused(&e) => {
            static WARNED: std::sync::Once = std::sync::Once::new();
            WARNED.call_once(|| {
                tracing::warn!(error = %e, mark = %names.ledger, "the broker user may not declare the namespace's mark, so a second database on this namespace would not be refused: give it the rights the README's recipe lists");
            });
            Ok(false)
        }
        Err(e) => Err(e),
    }
}

/// The broker's refusal of the namespace's mark, as an operator reads it.
fn other_ledger(namespace: &str, ledger_id: &str, broker: &str) -> String {
    format!(
        "namespace {namespace:?} on this broker is another database's ledger, and this \
         database is ledger {ledger_id} (the broker: {broker}). One namespace serves one \
         database, or its traffic is billed in both: point the database URL at that ledger's \
         database, or use another amqp.namespace; if that ledger is retired, `credit-worker \
         migrate --rebind-namespace` makes this database the namespace's"
    )
}

/// Whether the broker refused an operation for the user's rights (`ACCESS_REFUSED`).
pub(crate) fn access_refused(e: &lapin::Error) -> bool {
    use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
    matches!(e.kind(), lapin::ErrorKind::ProtocolError(amqp)
        if *amqp.kind() == AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED))
}

/// Declares a durable topic exchange for events (`credit.events`, or a bench's own).
pub(crate) async fn declare_events_exchange(ch: &Channel, name: &str) -> Result<(), lapin::Error> {
    exchange(ch, name, ExchangeKind::Topic).await
}

/// A server-named, exclusive, auto-deleted queue (RPC replies, event taps); returns its name.
pub async fn declare_private_queue(ch: &Channel) -> Result<String, lapin::Error> {
    let q = ch
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    Ok(q.name().to_string())
}
