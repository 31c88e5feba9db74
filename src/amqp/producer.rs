//! Who a republished message came from. RabbitMQ refuses a publish whose `user_id` property
//! is not the publishing connection's user (unless that user may impersonate), so a message
//! the worker dead-letters, or an operator replays, cannot keep a producer's `user_id` that is
//! not theirs: it travels in [`PRODUCER_HEADER`] instead, and goes back into the property
//! when the one republishing it is that producer.

use lapin::types::{AMQPValue, FieldTable};
use lapin::uri::AMQPUri;
use lapin::BasicProperties;

/// Header holding the producer's `user_id` of a message republished by another broker user.
pub const PRODUCER_HEADER: &str = "x-credit-producer";

/// The broker user `url` connects as (AMQP's default, `guest`, when it names none). None when
/// the URL does not parse; connecting with it fails anyway.
pub(crate) fn own_user(url: &str) -> Option<String> {
    url.parse::<AMQPUri>()
        .ok()
        .map(|uri| uri.authority.userinfo.username)
}

/// `props` as broker user `me` may publish them: a `user_id` that is not `me` moves into
/// [`PRODUCER_HEADER`], and one in that header that is `me` moves back into the property.
/// Everything else is kept.
pub(crate) fn publishable_by(props: &BasicProperties, me: Option<&str>) -> BasicProperties {
    let mut headers = props.headers().clone().unwrap_or_default();
    match props.user_id() {
        Some(producer) if Some(producer.as_str()) != me => {
            headers.insert(
                PRODUCER_HEADER.into(),
                AMQPValue::LongString(producer.as_str().into()),
            );
            without_user_id(props).with_headers(headers)
        }
        Some(_) => props.clone(),
        None => match (me, producer_header(&headers)) {
            (Some(me), Some(producer)) if producer == me => {
                super::without_headers(props, &[PRODUCER_HEADER]).with_user_id(me.into())
            }
            _ => props.clone(),
        },
    }
}

fn producer_header(headers: &FieldTable) -> Option<String> {
    match headers.inner().get(PRODUCER_HEADER)? {
        AMQPValue::LongString(s) => Some(s.to_string()),
        AMQPValue::ShortString(s) => Some(s.to_string()),
        _ => None,
    }
}

fn without_user_id(p: &BasicProperties) -> BasicProperties {
    super::without(p, &[super::Prop::UserId])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sent_by(user: &str) -> BasicProperties {
        let mut h = FieldTable::default();
        h.insert("trace".into(), AMQPValue::LongString("t1".into()));
        crate::amqp::persistent_json()
            .with_user_id(user.into())
            .with_headers(h)
            .with_message_id("m1".into())
            .with_correlation_id("c1".into())
            .with_timestamp(1_700_000_000)
            .with_app_id("executor".into())
            .with_priority(3)
    }

    fn header_keys(p: &BasicProperties) -> Vec<String> {
        let h = p.headers().clone().unwrap_or_default();
        h.inner().keys().map(|k| k.to_string()).collect()
    }

    #[test]
    fn another_producers_user_id_moves_into_the_header_and_back() {
        let original = sent_by("executor");
        let dead = publishable_by(&original, Some("worker"));
        assert_eq!(dead.user_id(), &None);
        assert_eq!(header_keys(&dead), ["trace", PRODUCER_HEADER]);
        assert_eq!(
            producer_header(&dead.headers().clone().unwrap_or_default()).as_deref(),
            Some("executor")
        );
        // Every other property is kept.
        assert_eq!(
            without_user_id(&original).with_headers(dead.headers().clone().unwrap()),
            dead
        );
        assert_eq!(dead.message_id().as_ref().map(|s| s.as_str()), Some("m1"));
        assert_eq!(dead.priority(), &Some(3));
        assert_eq!(dead.delivery_mode(), &Some(2));
        // The producer itself replays it: the message is as it first sent it.
        assert_eq!(publishable_by(&dead, Some("executor")), original);
        // Anyone else replays it as it is.
        assert_eq!(publishable_by(&dead, Some("operator")), dead);
        assert_eq!(publishable_by(&dead, None), dead);
    }

    #[test]
    fn the_publishers_own_user_id_and_its_absence_are_kept() {
        let own = sent_by("worker");
        assert_eq!(publishable_by(&own, Some("worker")), own);
        let none = crate::amqp::persistent_json();
        assert_eq!(publishable_by(&none, Some("worker")), none);
    }

    #[test]
    fn the_connection_user_is_read_from_the_url() {
        assert_eq!(own_user("amqp://w:pw@host:5672/%2f").as_deref(), Some("w"));
        assert_eq!(own_user("amqps://host/%2f").as_deref(), Some("guest"));
        assert_eq!(own_user("not a url"), None);
    }
}
