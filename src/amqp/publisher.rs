//! The confirmed publisher: messages go out pipelined on a channel in confirm mode, and
//! count as sent only once the broker confirmed every one of them (bounded by a timeout, so a
//! broker that stops answering cannot hold a caller forever).

use std::task::Poll;
use std::time::Duration;

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::ShortString;
use lapin::{BasicProperties, Channel, Connection};
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
}

impl Publisher {
    /// Opens a channel on `conn` and puts it in confirm mode.
    pub async fn open(conn: &Connection) -> Result<Self, lapin::Error> {
        let ch = conn.create_channel().await?;
        ch.confirm_select(ConfirmSelectOptions::default()).await?;
        Ok(Publisher { ch })
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
        let sent = tokio::time::timeout(CONFIRM_TIMEOUT, self.send_all(messages))
            .await
            .map_err(|_| PublishError::Timeout)??;
        confirmed(sent).await
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
    let n = pending.len();
    for (index, c) in pending.into_iter().enumerate() {
        match tokio::time::timeout(CONFIRM_TIMEOUT, c).await {
            Err(_) => return Err(PublishError::Timeout),
            Ok(Err(e)) => return Err(e.into()),
            Ok(Ok(Confirmation::Nack(_))) => return Err(PublishError::Nacked { index }),
            Ok(Ok(Confirmation::Ack(Some(_)))) => return Err(PublishError::Returned),
            Ok(Ok(_)) => {}
        }
    }
    Ok(n)
}
