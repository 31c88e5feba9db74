//! Publishing NodeExecutionEntry bodies to the input queue, persistently and with publisher
//! confirms: the `publish` command, the demo and the bench are small graph executors.

use crate::amqp::topology;
use crate::amqp::{self, Outgoing, Publisher};
use crate::config::Settings;

/// Confirms awaited together; bounds memory while keeping the broker busy.
const WINDOW: usize = 1000;

/// Publishes `bodies` to the default exchange with the input queue's name as routing key.
/// Returns how many the broker confirmed.
pub async fn publish_entries(settings: &Settings, bodies: &[Vec<u8>]) -> anyhow::Result<usize> {
    let conn = crate::amqp::connect_publisher(&settings.amqp, "credit-worker publish").await?;
    let publisher = Publisher::open(&conn).await?;
    let names = topology::declare(publisher.channel(), &settings.amqp).await?;
    warn_if_unconsumed(&publisher, &names.input_queue).await?;
    // Signed with the broker user it connects as (RabbitMQ checks the property against it),
    // so a worker with `amqp.allowed_producers` bills them when that user is listed.
    let props = match crate::amqp::producer::own_user(&settings.amqp.url) {
        Some(user) => amqp::persistent_json().with_user_id(user.into()),
        None => amqp::persistent_json(),
    };
    let mut confirmed = 0;
    for chunk in bodies.chunks(WINDOW) {
        let messages = chunk.iter().map(|body| Outgoing {
            exchange: "",
            routing_key: &names.input_queue,
            body,
            properties: props.clone(),
            mandatory: true,
        });
        confirmed += publisher.publish_all(messages).await?;
    }
    let _ = crate::tools::close_connection(conn, "done").await;
    Ok(confirmed)
}

/// Says so when no worker consumes `queue`: the messages wait there, which is right before a
/// worker starts and a sign of a mistyped `amqp.namespace` otherwise.
async fn warn_if_unconsumed(publisher: &Publisher, queue: &str) -> anyhow::Result<()> {
    let passive = lapin::options::QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    let q = publisher
        .channel()
        .queue_declare(queue.into(), passive, Default::default())
        .await?;
    if q.consumer_count() == 0 {
        tracing::warn!(
            queue,
            "no worker consumes this queue now: the messages wait there until one does \
             (is amqp.namespace the one meant?)"
        );
    }
    Ok(())
}

/// Publishes one window of bodies and waits for all their confirms.
pub(crate) async fn publish_window<'a>(
    publisher: &Publisher,
    queue: &'a str,
    bodies: impl Iterator<Item = &'a [u8]>,
) -> anyhow::Result<usize> {
    Ok(publisher.publish_all(to_queue(queue, bodies)).await?)
}

/// Entry bodies as persistent messages to `queue` through the default exchange.
pub(crate) fn to_queue<'a>(
    queue: &'a str,
    bodies: impl Iterator<Item = &'a [u8]>,
) -> impl Iterator<Item = Outgoing<'a>> {
    bodies.map(move |body| Outgoing {
        exchange: "",
        routing_key: queue,
        body,
        properties: amqp::persistent_json(),
        mandatory: true,
    })
}
