//! The ledger's progress, kept on the broker as well as in the database: the watermark up to
//! which the relays have published the ledger's events, on queue `credit.ledger.progress`.
//! A database that went back in time holds a watermark below it: a restore from a backup, or a
//! failover to a standby that had not received the last commits. Its ledger has lost what it
//! committed since, which the broker does not deliver again, and its next events would reuse
//! ids that subscribers saw for other facts (an execution fee's ordinal, a `balance.low` seq).
//! Such a database is not billed into and its events are not published until an operator has
//! followed docs/reliability.md and said so (`credit-worker migrate --after-restore`).

use std::time::Duration;

use lapin::options::{BasicGetOptions, BasicNackOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::Connection;
use serde::{Deserialize, Serialize};

use crate::amqp::{Outgoing, PublishError, Publisher};

/// What the queue holds: the last watermark a relay recorded for a ledger.
#[derive(Debug, Serialize, Deserialize)]
struct Record {
    ledger_id: String,
    published_through: i64,
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum ProgressError {
    #[error("broker: {0}")]
    Amqp(#[from] lapin::Error),
    #[error("broker: {0}")]
    Publish(#[from] PublishError),
    #[error("{0}")]
    Behind(#[from] Behind),
    /// The broker did not answer the read in time (a connection it blocks for an alarm).
    #[error("broker: the ledger's progress not read within {0:?}")]
    Unanswered(Duration),
}

impl ProgressError {
    /// Whether waiting cannot clear it: a database behind waits for an operator.
    pub(crate) fn is_permanent(&self) -> bool {
        match self {
            ProgressError::Behind(_) => true,
            // The queue declared by hand with other arguments: every try is refused alike.
            ProgressError::Amqp(e) => crate::amqp::topology::refuses_arguments(e),
            ProgressError::Publish(_) | ProgressError::Unanswered(_) => false,
        }
    }

    /// What a permanent one is ([`crate::amqp::SessionFault::why_permanent`]).
    pub(crate) fn why_permanent(&self) -> &'static str {
        match self {
            ProgressError::Behind(_) => "the database is behind its ledger's published events",
            _ => crate::amqp::topology::REFUSED_ARGUMENTS,
        }
    }
}

/// A database behind what its ledger's relays already published.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "this database's outbox watermark, {database}, is behind the {recorded} up to which the \
     relays published ledger {ledger_id}'s events (recorded on the broker): the database went \
     back in time (a restore, or a failover to a standby that had not received the last \
     commits), so what it committed since is lost and its next events would reuse ids that \
     subscribers saw for other facts. Follow docs/reliability.md, \"After a restore or a \
     failover\", then run `credit-worker migrate --after-restore`"
)]
pub(crate) struct Behind {
    pub ledger_id: String,
    pub recorded: i64,
    pub database: i64,
}

/// The database's watermark, read by `database`, once found where the broker's record of
/// ledger `ledger_id` says it got to, or further; [`Behind`] otherwise. The record is read
/// first and the database after: a relay records only a watermark it has committed, so the
/// database read after it holds that one or a later one, unless it went back in time.
pub(crate) async fn check<E: From<ProgressError>>(
    conn: &Connection,
    (queue, me): (&str, Option<&str>),
    ledger_id: &str,
    database: impl std::future::Future<Output = Result<i64, E>>,
) -> Result<i64, E> {
    let recorded = recorded(conn, (queue, me), ledger_id).await?;
    let watermark = database.await?;
    judge(ledger_id, recorded, watermark).map_err(ProgressError::from)?;
    Ok(watermark)
}

/// Whether a database whose watermark is `database` is where the broker's record of ledger
/// `ledger_id` says it got to, or further; no record is no claim.
fn judge(ledger_id: &str, recorded: Option<i64>, database: i64) -> Result<(), Behind> {
    match recorded {
        Some(recorded) if recorded > database => Err(Behind {
            ledger_id: ledger_id.to_owned(),
            recorded,
            database,
        }),
        _ => Ok(()),
    }
}

/// One reader at a time in this process (the consumer's check and the relay's may come
/// together): a reader holds the records, unacked, while it reads them, and another would find
/// the queue empty meanwhile.
static READING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// How often an empty queue is looked at again, and after how long: another replica's reader
/// may hold the record for the moment its read takes.
const EMPTY_LOOKS: u32 = 2;
const LOOK_AGAIN: Duration = Duration::from_millis(50);

/// How long a read may take, its turn included: a connection the broker blocks (a memory or
/// disk alarm) answers nothing, and the read is tried again on another.
const READ_WITHIN: Duration = Duration::from_secs(5);

/// The highest watermark recorded for `ledger_id` by the broker user `me` (the worker's:
/// another who may publish to the default exchange, which reaches every queue, could
/// otherwise record any watermark), if any. Read without taking: the records go back to the
/// queue as they were.
pub(crate) async fn recorded(
    conn: &Connection,
    (queue, me): (&str, Option<&str>),
    ledger_id: &str,
) -> Result<Option<i64>, ProgressError> {
    tokio::time::timeout(READ_WITHIN, read_in_turn(conn, (queue, me), ledger_id))
        .await
        .unwrap_or(Err(ProgressError::Unanswered(READ_WITHIN)))
}

/// [`recorded`], unbounded.
async fn read_in_turn(
    conn: &Connection,
    (queue, me): (&str, Option<&str>),
    ledger_id: &str,
) -> Result<Option<i64>, ProgressError> {
    let _one = READING.lock().await;
    let ch = conn.create_channel().await?;
    if !declare(&ch, queue).await? {
        return Ok(None);
    }
    let mut looks = 0;
    let highest = loop {
        match read_all(&ch, (queue, me), ledger_id).await {
            Ok((highest, true)) => break highest,
            Ok((_, false)) if looks < EMPTY_LOOKS => looks += 1,
            Ok((_, false)) => break None,
            Err(e) if crate::amqp::topology::access_refused(&e) => {
                warn_unchecked(&e, queue);
                return Ok(None);
            }
            Err(e) => return Err(e.into()),
        }
        tokio::time::sleep(LOOK_AGAIN).await;
    };
    let _ = ch.close(200, "read".into()).await;
    Ok(highest)
}

/// Every record on the queue, put back once read: the highest for `ledger_id` sent by `me`,
/// and whether there was any record at all.
async fn read_all(
    ch: &lapin::Channel,
    (queue, me): (&str, Option<&str>),
    ledger_id: &str,
) -> Result<(Option<i64>, bool), lapin::Error> {
    let mut highest = None;
    let mut last_tag = None;
    while let Some(got) = ch
        .basic_get(queue.into(), BasicGetOptions { no_ack: false })
        .await?
    {
        last_tag = Some(got.delivery.delivery_tag);
        let sender = got
            .delivery
            .properties
            .user_id()
            .as_ref()
            .map(|u| u.as_str());
        let record = serde_json::from_slice::<Record>(&got.delivery.data).ok();
        let ours = |r: &Record| r.ledger_id == ledger_id && (me.is_none() || sender == me);
        if let Some(r) = record.filter(ours) {
            highest = highest.max(Some(r.published_through));
        }
    }
    if let Some(tag) = last_tag {
        let back = BasicNackOptions {
            multiple: true,
            requeue: true,
        };
        ch.basic_nack(tag, back).await?;
    }
    Ok((highest, last_tag.is_some()))
}

/// Records on the queue that the relays published ledger `ledger_id`'s events up to
/// `through`. The queue keeps the newest [`MAX_RECORDS`].
pub(crate) async fn record(
    publisher: &Publisher,
    (queue, me): (&str, Option<&str>),
    ledger_id: &str,
    through: i64,
) -> Result<(), PublishError> {
    let body = serde_json::to_vec(&Record {
        ledger_id: ledger_id.to_owned(),
        published_through: through,
    })
    .unwrap_or_default();
    let confirm = publisher
        .send(Outgoing {
            exchange: "",
            routing_key: queue,
            body: &body,
            properties: crate::amqp::as_user(crate::amqp::persistent_json(), me),
            mandatory: true,
        })
        .await?;
    crate::amqp::publisher::confirmed(vec![confirm])
        .await
        .map(|_| ())
}

/// How many records the queue keeps, the newest: readers take the highest, so a record put
/// back by a reader behind a newer one, or sent late by a leader that lost the lead, cannot
/// push the highest out alone.
const MAX_RECORDS: i64 = 16;

/// Declares the queue: durable, classic, keeping the newest [`MAX_RECORDS`]. False when the
/// broker user may not (warned of once).
async fn declare(ch: &lapin::Channel, queue: &str) -> Result<bool, lapin::Error> {
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("classic".into()),
    );
    args.insert("x-max-length".into(), AMQPValue::LongLongInt(MAX_RECORDS));
    args.insert(
        "x-overflow".into(),
        AMQPValue::LongString("drop-head".into()),
    );
    let options = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    match ch.queue_declare(queue.into(), options, args).await {
        Ok(_) => Ok(true),
        Err(e) if crate::amqp::topology::access_refused(&e) => {
            warn_unchecked(&e, queue);
            Ok(false)
        }
        Err(e) => Err(e),
    }
}

/// Warns, once, that the broker user may not use the queue.
fn warn_unchecked(e: &lapin::Error, queue: &str) {
    static WARNED: std::sync::Once = std::sync::Once::new();
    WARNED.call_once(|| {
        tracing::warn!(error = %e, queue, "the broker user may not use the ledger's progress queue, so a database gone back in time (a restore) would not be refused: give it the rights the README's recipe lists");
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_database_behind_its_ledgers_record_is_refused() {
        assert_eq!(judge("L", None, 0), Ok(()));
        assert_eq!(judge("L", Some(40), 40), Ok(()));
        assert_eq!(judge("L", Some(40), 41), Ok(()));
        let behind = judge("L", Some(40), 37).unwrap_err();
        assert_eq!((behind.recorded, behind.database), (40, 37));
        assert!(behind.to_string().starts_with(
            "this database's outbox watermark, 37, is behind the 40 up to which the relays \
             published ledger L's events"
        ));
    }

    #[test]
    fn a_record_reads_as_it_is_written() {
        let text = serde_json::to_string(&Record {
            ledger_id: "6f1c".into(),
            published_through: 12,
        })
        .unwrap();
        assert_eq!(text, r#"{"ledger_id":"6f1c","published_through":12}"#);
    }
}
