//! Publishing NodeExecutionEntry bodies to the input queue, persistently and with publisher
//! confirms: the `publish` command, the demo and the bench are small graph executors.

use crate::amqp::topology;
use crate::amqp::{self, Outgoing, PublishError, Publisher};
use crate::config::Settings;

/// Confirms awaited together; bounds memory while keeping the broker busy.
const WINDOW: usize = 1000;

/// Publishes `bodies` to the default exchange with the input queue's name as routing key.
/// Returns how many the broker confirmed.
pub async fn publish_entries(settings: &Settings, bodies: &[Vec<u8>]) -> anyhow::Result<usize> {
    let conn = crate::amqp::connect_publisher(&settings.amqp, "credit-worker publish")
        .await
        .map_err(crate::amqp::for_command)?;
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
        let window = publisher.publish_all(messages).await;
        confirmed +=
            window.map_err(|e| partly_published(&e, confirmed, chunk.len(), bodies.len()))?;
    }
    let _ = crate::tools::close_connection(conn, "done").await;
    Ok(confirmed)
}

/// What a failed window leaves published, counted over the whole input: confirms are awaited
/// in order, so a refusal says every message before it was published. Sending again from the
/// first one not known to be published duplicates nothing a worker bills twice.
fn partly_published(e: &PublishError, before: usize, window: usize, total: usize) -> anyhow::Error {
    let last = before + window;
    match e {
        PublishError::Nacked { index } => {
            let refused = before + index + 1;
            let unknown = if refused < last {
                format!(
                    ", and whether messages {} to {last} were is not known",
                    refused + 1
                )
            } else {
                String::new()
            };
            anyhow::anyhow!(
                "the first {} of {total} messages were published; message {refused} was refused \
                 by the broker (nack){unknown}",
                refused - 1
            )
        }
        other => anyhow::anyhow!(
            "the first {before} of {total} messages were published; whether messages {} to \
             {last} were is not known ({other})",
            before + 1
        ),
    }
}

/// Says so when no worker consumes `queue`: the messages wait there, which is right before a
/// worker starts and a sign of a mistyped `amqp.namespace` otherwise.
async fn warn_if_unconsumed(publisher: &Publisher, queue: &str) -> anyhow::Result<()> {
    let q = publisher
        .channel()
        .queue_declare(queue.into(), topology::passive(), Default::default())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_window_says_what_was_published_over_the_whole_input() {
        let text = |e: PublishError, before, window| {
            partly_published(&e, before, window, 3000).to_string()
        };
        assert_eq!(
            text(PublishError::Nacked { index: 799 }, 1000, 1000),
            "the first 1799 of 3000 messages were published; message 1800 was refused by the \
             broker (nack), and whether messages 1801 to 2000 were is not known"
        );
        assert_eq!(
            text(PublishError::Nacked { index: 999 }, 2000, 1000),
            "the first 2999 of 3000 messages were published; message 3000 was refused by the \
             broker (nack)"
        );
        assert_eq!(
            text(PublishError::Returned, 1000, 500),
            "the first 1000 of 3000 messages were published; whether messages 1001 to 1500 were \
             is not known (broker: a message of the batch was returned: no queue took it)"
        );
    }
}
