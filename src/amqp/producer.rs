//! Who produced a message. RabbitMQ refuses a publish whose `user_id` property is not the
//! publishing connection's user (unless that user may impersonate), so a message the worker
//! dead-letters, or an operator replays, cannot keep a producer's `user_id` that is not theirs.
//! It is republished under the republisher's own `user_id`, with the producer in
//! [`PRODUCER_HEADER`]. Only the worker's own broker user vouches for that header: a message
//! whose verified `user_id` is the worker's counts as produced by the user the header names,
//! any other message as produced by its `user_id`, whatever header it carries. So a dead
//! letter replayed with the worker's credentials is billed as its producer's, and no other
//! user can pass for a producer by writing the header.

use lapin::types::{AMQPValue, FieldTable};
use lapin::uri::AMQPUri;
use lapin::BasicProperties;

/// Header holding the producer of a message republished by another broker user.
pub const PRODUCER_HEADER: &str = "x-credit-producer";

/// The broker user `url` connects as (AMQP's default, `guest`, when it names none). None when
/// the URL does not parse; connecting with it fails anyway.
pub(crate) fn own_user(url: &str) -> Option<String> {
    url.parse::<AMQPUri>()
        .ok()
        .map(|uri| uri.authority.userinfo.username)
}

/// The producer of a message with `props`, as the broker user `worker` sees it: the header's
/// user when the verified `user_id` is `worker`'s own, else the `user_id` (None: anonymous).
pub(crate) fn producer(props: &BasicProperties, worker: Option<&str>) -> Option<String> {
    let user_id = props.user_id().as_ref().map(|u| u.as_str());
    let vouched = user_id.is_some() && user_id == worker;
    let header = props.headers().as_ref().and_then(producer_header);
    match (vouched, header) {
        (true, Some(h)) => Some(h),
        _ => user_id.map(str::to_owned),
    }
}

/// `props` as broker user `me` may publish them: `user_id` = `me`, with the message's
/// [`producer`] (as `me` sees it) in [`PRODUCER_HEADER`] when that is another user. An
/// anonymous message stays as it is, whatever header it carries: anyone may write the
/// header, and a copy under `me`'s verified `user_id` would make it `me`'s (or, `me` being
/// the worker's user, the header's). Everything else is kept.
pub(crate) fn publishable_by(props: &BasicProperties, me: Option<&str>) -> BasicProperties {
    let kept = super::without_headers(props, &[PRODUCER_HEADER]);
    let Some(producer) = producer(props, me) else {
        return props.clone();
    };
    if me == Some(producer.as_str()) {
        return kept.with_user_id(producer.into());
    }
    let mut headers = kept.headers().clone().unwrap_or_default();
    headers.insert(
        PRODUCER_HEADER.into(),
        AMQPValue::LongString(producer.into()),
    );
    let kept = kept.with_headers(headers);
    match me {
        Some(me) => kept.with_user_id(me.into()),
        None => super::without(&kept, &[super::Prop::UserId]),
    }
}

fn producer_header(headers: &FieldTable) -> Option<String> {
    match headers.inner().get(PRODUCER_HEADER)? {
        AMQPValue::LongString(s) => Some(s.to_string()),
        AMQPValue::ShortString(s) => Some(s.to_string()),
        _ => None,
    }
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

    fn producer_in(p: &BasicProperties) -> Option<String> {
        p.headers().as_ref().and_then(producer_header)
    }

    #[test]
    fn a_dead_letter_goes_out_under_the_workers_user_id_with_its_producer() {
        let original = sent_by("executor");
        let dead = publishable_by(&original, Some("worker"));
        assert_eq!(dead.user_id().as_ref().map(|u| u.as_str()), Some("worker"));
        assert_eq!(header_keys(&dead), ["trace", PRODUCER_HEADER]);
        assert_eq!(producer_in(&dead).as_deref(), Some("executor"));
        // The worker's own user vouches for the header: the executor produced it.
        assert_eq!(producer(&dead, Some("worker")).as_deref(), Some("executor"));
        // Every other property is kept.
        let plain = crate::amqp::without_headers(&dead, &[PRODUCER_HEADER]);
        assert_eq!(plain.with_user_id("executor".into()), original);
        // Replayed with the worker's credentials it goes out as it is; replayed by the
        // executor, it is the executor's by its verified user_id.
        assert_eq!(publishable_by(&dead, Some("worker")), dead);
        let by_executor = publishable_by(&dead, Some("executor"));
        assert_eq!(
            producer(&by_executor, Some("worker")).as_deref(),
            Some("executor")
        );
    }

    #[test]
    fn only_the_workers_own_user_vouches_for_the_header() {
        // Anyone else's header is not believed: the producer is the verified user_id.
        let mut forged = sent_by("mallory");
        let mut h = forged.headers().clone().unwrap_or_default();
        h.insert(
            PRODUCER_HEADER.into(),
            AMQPValue::LongString("executor".into()),
        );
        forged = forged.with_headers(h);
        assert_eq!(
            producer(&forged, Some("worker")).as_deref(),
            Some("mallory")
        );
        let dead = publishable_by(&forged, Some("worker"));
        assert_eq!(producer_in(&dead).as_deref(), Some("mallory"));
        assert_eq!(producer(&dead, Some("worker")).as_deref(), Some("mallory"));
        // An anonymous message stays as it is, its header not believed, whoever republishes
        // it: the user the header names, or the worker's own user named by it.
        let anonymous = crate::amqp::without(&forged, &[crate::amqp::Prop::UserId]);
        assert_eq!(producer(&anonymous, Some("worker")), None);
        for me in ["worker", "executor", "operator"] {
            assert_eq!(publishable_by(&anonymous, Some(me)), anonymous, "{me}");
        }
        let mut h = anonymous.headers().clone().unwrap_or_default();
        h.insert(
            PRODUCER_HEADER.into(),
            AMQPValue::LongString("worker".into()),
        );
        let naming_the_worker = anonymous.clone().with_headers(h);
        let dead = publishable_by(&naming_the_worker, Some("worker"));
        assert_eq!(dead, naming_the_worker);
        assert_eq!(producer(&dead, Some("worker")), None);
        // Another user replaying the worker's dead letter is who sent the copy.
        let dead = publishable_by(&sent_by("executor"), Some("worker"));
        let by_operator = publishable_by(&dead, Some("operator"));
        assert_eq!(
            producer(&by_operator, Some("worker")).as_deref(),
            Some("operator")
        );
    }

    #[test]
    fn the_publishers_own_messages_are_kept() {
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
