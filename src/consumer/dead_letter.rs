//! Invalid messages to the dead-letter exchange, each with its reason added: copied and
//! confirmed before their batch is acked, or, when a copy would not fit a frame, rejected to
//! the input queue's own dead-lettering.
//!
//! A dead-letter queue that refuses them (a nack: full, with `x-overflow: reject-publish`) is
//! waited for, the batch unacked meanwhile: billing waits behind the letter it refuses, and
//! `/readyz` says so. Ending the session instead would bring the deliveries back with their
//! delivery count raised, until the input queue's delivery limit dead-lettered valid messages
//! too.

use lapin::message::Delivery;
use lapin::options::BasicNackOptions;
use lapin::types::AMQPValue;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::process::MessageIds;
use super::{bounded, SessionError, DEAD_AT_HEADER, ERROR_HEADER};
use crate::amqp::topology::Names;
use crate::amqp::{self, Outgoing, PublishError, Publisher};
use crate::health::Health;

/// An invalid delivery with why it is invalid.
pub(super) type Letter<'a> = (&'a Delivery, &'a str, &'a MessageIds);

/// Who waits while the dead-letter queue refuses a letter: what `/readyz` reports, and the
/// stop that ends the wait (the batch then goes back unacked).
pub(super) type Waiting<'a> = (&'a Health, &'a CancellationToken);

/// Republishes the deliveries to the dead-letter exchange, each with its reason added, and
/// waits for the broker's confirms (a window at a time: a flood of invalid messages costs a
/// round trip per hundred) before the caller acks them; returns the tags of those rejected to
/// the broker's own dead-lettering instead, which are settled already; None when a stop came
/// while the dead-letter queue refused them. Body and properties are kept, except that a
/// producer's `user_id` other than the worker's own (`me`) moves into a header, which the
/// broker would otherwise refuse ([`amqp::producer`]).
pub(super) async fn dead_letter(
    dead: &Publisher,
    names: &Names,
    letters: &[Letter<'_>],
    me: Option<&str>,
    waiting: Waiting<'_>,
) -> Result<Option<Vec<u64>>, SessionError> {
    let (copied, too_large): (Vec<_>, Vec<_>) = letters
        .iter()
        .partition(|(d, _, _)| amqp::headers_len(&d.properties) <= COPIED_HEADERS_MAX);
    // In windows, each with its own confirm deadline: a whole batch of large messages could
    // outlast one on a slow link.
    for window in copied.chunks(DEAD_LETTER_WINDOW) {
        if !until_taken(dead, names, window, me, waiting).await? {
            return Ok(None);
        }
    }
    // A copy would not fit a frame with the worker's headers added: the broker would end the
    // connection, and the message, come back with its delivery count added, could no longer
    // be read, holding up every message behind it. The input queue's own dead-lettering
    // moves it instead, without the reason header (`x-death` says `rejected`).
    for (d, reason, _) in &too_large {
        let sent = bounded(d.acker.nack(BasicNackOptions {
            multiple: false,
            requeue: false,
        }))
        .await
        .transpose()?;
        if sent != Some(true) {
            return Err(SessionError::AckNotSent);
        }
        warn!(
            reason,
            delivery_tag = d.delivery_tag,
            "headers too large to copy with a reason; dead-lettered by the broker"
        );
    }
    // Counted once confirmed: a failed publish leaves the deliveries to come again.
    for (d, reason, ids) in letters {
        metrics::counter!("credit_messages_total", "outcome" => "invalid").increment(1);
        metrics::counter!("credit_dead_lettered_total").increment(1);
        ids.span().in_scope(|| {
            warn!(
                reason,
                delivery_tag = d.delivery_tag,
                "message dead-lettered"
            )
        });
    }
    Ok(Some(
        too_large.iter().map(|(d, _, _)| d.delivery_tag).collect(),
    ))
}

/// Publishes `window`, and while the broker refuses letters (a nack) publishes those again
/// after a pause (50 ms doubling to 5 s); false when `stop` fires first.
async fn until_taken(
    dead: &Publisher,
    names: &Names,
    window: &[Letter<'_>],
    me: Option<&str>,
    (health, stop): Waiting<'_>,
) -> Result<bool, SessionError> {
    let mut delays = crate::retry::backoff();
    let mut pending = window.to_vec();
    // Set while refused; cleared however the wait ends.
    let mut waiting = None;
    loop {
        let refused = publish_dead(dead, names, &pending, me).await?;
        // The others are confirmed: only the refused go again.
        pending = refused
            .iter()
            .filter_map(|&i| pending.get(i).copied())
            .collect();
        let Some(&(d, reason, ids)) = pending.first() else {
            return Ok(true);
        };
        metrics::counter!("credit_dead_letters_refused_total").increment(pending.len() as u64);
        if REFUSED_WARNING.ready() {
            ids.span().in_scope(|| {
                warn!(
                    reason,
                    delivery_tag = d.delivery_tag,
                    refused = pending.len(),
                    "the broker refused a dead letter (nack): the dead-letter queue is likely \
                     full and refusing publishes (x-overflow reject-publish); billing waits, \
                     the batch unacked, until it takes it"
                )
            });
        }
        waiting.get_or_insert_with(|| health.dead_letters_refused());
        if !crate::retry::pause(&mut delays, stop).await {
            return Ok(false);
        }
    }
}

/// A refused dead letter is warned of at most every 10 s; `credit_dead_letters_refused_total`
/// counts each refusal of each letter.
static REFUSED_WARNING: crate::throttle::Throttle =
    crate::throttle::Throttle::new(Duration::from_secs(10));

/// Dead letters published together, one wait for their confirms.
const DEAD_LETTER_WINDOW: usize = 100;

/// The most header bytes a dead letter's copy takes from its message: 8 KiB under the 128 KiB
/// frames a reading connection asks for, room for the reason and producer headers (each at
/// most a few hundred bytes) and the properties' other fields.
const COPIED_HEADERS_MAX: usize = 120 * 1024;

/// Publishes `letters`; the indexes of those the broker refused.
async fn publish_dead(
    dead: &Publisher,
    names: &Names,
    letters: &[Letter<'_>],
    me: Option<&str>,
) -> Result<Vec<usize>, PublishError> {
    let now = u64::try_from(chrono::Utc::now().timestamp()).unwrap_or_default();
    let messages = letters.iter().map(|(d, reason, _)| {
        // Without its TTL, as RabbitMQ's own dead-lettering does: the dead queue keeps it.
        let kept = amqp::without(&d.properties, &[amqp::Prop::Expiration]);
        let properties = amqp::producer::publishable_by(&kept, me);
        let mut headers = properties.headers().clone().unwrap_or_default();
        headers.insert(
            ERROR_HEADER.into(),
            AMQPValue::LongString((*reason).to_owned().into()),
        );
        headers.insert(DEAD_AT_HEADER.into(), AMQPValue::Timestamp(now));
        Outgoing {
            exchange: &names.dlx,
            routing_key: d.routing_key.as_str(),
            body: &d.data,
            properties: properties.with_headers(headers),
            mandatory: true,
        }
    });
    dead.publish_all_but_refused(messages).await
}
