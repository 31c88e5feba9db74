//! The confirmed publisher: messages go out pipelined on a channel in confirm mode, and
//! count as sent only once the broker confirmed every one of them (bounded by a timeout, so a
//! broker that stops answering cannot hold a caller forever).

use std::task::Poll;
use std::time::Duration;

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::ShortString;
use lapin::{BasicProperties, Channel, Connection, ConnectionStatus};
use lapin::{Confirmation, PublisherConfirm};

/// The longest wait for one confirm.
pub(crate) const CONFIRM_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("broker: {0}")]
    Amqp(#[from] lapin::Error),
    /// The broker refused the message at this index of the batch.
    #[error("broker: message {index} of the batch was refused (nack)")]
    Nacked { index: usize },
    /// A mandatory message no queue took (its queue deleted or unbound): not delivered. (The
    /// broker's return does not say which of a batch's messages it was.)
    #[error("broker: a message of the batch was returned: no queue took it")]
    Returned,
    /// Not written (a broker blocking publishers holds them), or not confirmed, in time.
    #[error("broker: not sent, or not confirmed, within {CONFIRM_TIMEOUT:?}")]
    Timeout,
    /// AMQP names are at most 255 bytes.
    #[error("{field}: longer than 255 bytes ({len} bytes)")]
    NameTooLong { field: &'static str, len: usize },
}

/// One message to publish.
#[derive(Debug, Clone)]
pub struct Outgoing<'a> {
    pub exchange: &'a str,
    pub routing_key: &'a str,
    pub body: &'a [u8],
    pub properties: BasicProperties,
    /// Sent to a queue that must take it (a dead letter, a replay): the broker returns it
    /// when none does, and [`confirmed`] counts that as a refusal.
    pub mandatory: bool,
}

/// A channel in confirm mode.
#[derive(Clone)]
pub struct Publisher {
    ch: Channel,
    /// Its connection's, when a block by the broker is waited out (see [`Self::open_patient`]).
    patient_on: Option<ConnectionStatus>,
}

impl Publisher {
    /// Opens a channel on `conn` and puts it in confirm mode. A publish that is not confirmed
    /// within [`CONFIRM_TIMEOUT`] fails.
    pub async fn open(conn: &Connection) -> Result<Self, lapin::Error> {
        let ch = conn.create_channel().await?;
        ch.confirm_select(ConfirmSelectOptions::default()).await?;
        Ok(Publisher {
            ch,
            patient_on: None,
        })
    }

    /// [`Self::open`], for the worker's own sessions: while the broker blocks the connection
    /// (`connection.blocked`: a memory or disk alarm), a publish waits past the timeout for as
    /// long as the block lasts. The broker holds publishes back on purpose then, and a new
    /// connection would only be blocked again at its first publish, leaving this one behind
    /// with its unacked deliveries (they would come back with their delivery count raised).
    pub(crate) async fn open_patient(conn: &Connection) -> Result<Self, lapin::Error> {
        let mut publisher = Self::open(conn).await?;
        publisher.patient_on = Some(conn.status().clone());
        Ok(publisher)
    }

    /// Whether the broker holds this publisher's messages back on purpose, now.
    fn held(&self) -> bool {
        self.patient_on
            .as_ref()
            .is_some_and(|s| s.connected() && s.blocked())
    }

    pub fn channel(&self) -> &Channel {
        &self.ch
    }

    /// Sends one message without waiting; await the confirm with [`confirmed`].
    pub async fn send(&self, m: Outgoing<'_>) -> Result<PublisherConfirm, PublishError> {
        let confirm = self
            .ch
            .basic_publish(
                short("exchange", m.exchange)?,
                short("routing_key", m.routing_key)?,
                BasicPublishOptions {
                    mandatory: m.mandatory,
                    ..Default::default()
                },
                m.body,
                m.properties,
            )
            .await?;
        Ok(confirm)
    }

    /// Sends every message, then waits for all their confirms. Returns how many were sent.
    pub(crate) async fn publish_all<'a>(
        &self,
        messages: impl IntoIterator<Item = Outgoing<'a>>,
    ) -> Result<usize, PublishError> {
        let held = || self.held();
        let sent = patiently(self.send_all(messages), held).await??;
        confirmed_while(sent, held).await
    }

    /// Sends every message, then waits for all their confirms; returns the indexes of those
    /// the broker refused (nack), in order. A message returned, or a confirm not had in time,
    /// is the error.
    pub(crate) async fn publish_all_but_refused<'a>(
        &self,
        messages: impl IntoIterator<Item = Outgoing<'a>>,
    ) -> Result<Vec<usize>, PublishError> {
        let held = || self.held();
        let sent = patiently(self.send_all(messages), held).await??;
        refused_while(sent, held).await
    }

    /// Sends `messages` in order without waiting for their confirms.
    ///
    /// A publish queues its frames when first polled, then waits until the connection has
    /// written them. Polling every publish once, in order, before waiting on any queues the
    /// batch in order and lets the connection write it in a few writes, instead of a round
    /// of two thread wake-ups per message.
    pub(crate) async fn send_all<'a>(
        &self,
        messages: impl IntoIterator<Item = Outgoing<'a>>,
    ) -> Result<Vec<PublisherConfirm>, PublishError> {
        let mut sends: Vec<_> = messages
            .into_iter()
            .map(|m| Box::pin(self.send(m)))
            .collect();
        let mut first = Vec::with_capacity(sends.len());
        for s in &mut sends {
            first.push(futures::poll!(s.as_mut()));
        }
        let mut pending = Vec::with_capacity(sends.len());
        for (s, polled) in sends.into_iter().zip(first) {
            pending.push(match polled {
                Poll::Ready(sent) => sent?,
                Poll::Pending => s.await?,
            });
        }
        Ok(pending)
    }
}

/// An AMQP short string, or an error naming the field (lapin panics on a longer one).
pub fn short(field: &'static str, s: &str) -> Result<ShortString, PublishError> {
    ShortString::try_new(s).map_err(|_| PublishError::NameTooLong {
        field,
        len: s.len(),
    })
}

/// Waits for `pending` confirms in order; the first refusal or timeout is the error.
pub async fn confirmed(pending: Vec<PublisherConfirm>) -> Result<usize, PublishError> {
    confirmed_while(pending, || false).await
}

/// [`confirmed`], each confirm awaited [`patiently`] while `held`.
async fn confirmed_while(
    pending: Vec<PublisherConfirm>,
    held: impl Fn() -> bool,
) -> Result<usize, PublishError> {
    let n = pending.len();
    match refused_while(pending, held).await?.first() {
        Some(&index) => Err(PublishError::Nacked { index }),
        None => Ok(n),
    }
}

/// Awaits every one of `pending`'s confirms, each [`patiently`] while `held`: the indexes of
/// those refused (nack). A refusal does not end the wait, so no confirm is left behind
/// unawaited (the client would keep it until the channel closes).
async fn refused_while(
    pending: Vec<PublisherConfirm>,
    held: impl Fn() -> bool,
) -> Result<Vec<usize>, PublishError> {
    let mut refused = Vec::new();
    for (index, c) in pending.into_iter().enumerate() {
        match patiently(c, &held).await? {
            Err(e) => return Err(e.into()),
            Ok(Confirmation::Nack(_)) => refused.push(index),
            Ok(Confirmation::Ack(Some(_))) => return Err(PublishError::Returned),
            Ok(_) => {}
        }
    }
    Ok(refused)
}

/// A block waited out is warned of at most once a minute.
static HELD_WARNING: crate::throttle::Throttle =
    crate::throttle::Throttle::new(Duration::from_secs(60));

/// Awaits `fut` for [`CONFIRM_TIMEOUT`], and on for as long as `held` says the broker holds
/// publishes back on purpose; a timeout otherwise.
async fn patiently<F: std::future::Future>(
    fut: F,
    held: impl Fn() -> bool,
) -> Result<F::Output, PublishError> {
    tokio::pin!(fut);
    loop {
        match tokio::time::timeout(CONFIRM_TIMEOUT, &mut fut).await {
            Ok(out) => return Ok(out),
            Err(_) if held() => {
                if HELD_WARNING.ready() {
                    tracing::warn!(
                        "the broker blocks publishing on this connection (a memory or disk \
                         alarm): waiting for it to lift the block"
                    );
                }
            }
            Err(_) => return Err(PublishError::Timeout),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    #[tokio::test(start_paused = true)]
    async fn a_publish_the_broker_holds_back_waits_as_long_as_the_block_lasts() {
        let blocked = AtomicBool::new(true);
        let held = || blocked.load(Ordering::SeqCst);
        let confirm_at = |secs| tokio::time::sleep(Duration::from_secs(secs));
        let started = tokio::time::Instant::now();
        assert!(patiently(confirm_at(75), held).await.is_ok());
        assert_eq!(started.elapsed(), Duration::from_secs(75));
        blocked.store(false, Ordering::SeqCst);
        let started = tokio::time::Instant::now();
        let late = patiently(confirm_at(75), held).await;
        assert!(matches!(late, Err(PublishError::Timeout)), "{late:?}");
        assert_eq!(started.elapsed(), CONFIRM_TIMEOUT);
    }
}
