//! Publishing NodeExecutionEntry bodies to the input queue, persistently and with publisher
//! confirms: the `publish` command, the demo and the bench are small graph executors.

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::publisher_confirm::{Confirmation, PublisherConfirm};
use lapin::{BasicProperties, Channel};

use crate::config::Settings;
use crate::topology;

/// Confirms awaited together; bounds memory while keeping the broker busy.
const WINDOW: usize = 1000;

/// Publishes `bodies` to the default exchange with the input queue's name as routing key.
/// Returns how many the broker confirmed.
pub async fn publish_entries(settings: &Settings, bodies: &[Vec<u8>]) -> anyhow::Result<usize> {
    let conn = topology::connect(&settings.amqp.url, "credit-worker publish").await?;
    let ch = conn.create_channel().await?;
    let names = topology::declare(&ch, &settings.amqp).await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    let mut confirmed = 0;
    for chunk in bodies.chunks(WINDOW) {
        confirmed +=
            publish_window(&ch, &names.input_queue, chunk.iter().map(Vec::as_slice)).await?;
    }
    let _ = crate::tools::close_connection(conn, "done").await;
    Ok(confirmed)
}

/// Publishes one window of bodies and waits for all their confirms.
pub async fn publish_window<'a>(
    ch: &Channel,
    queue: &str,
    bodies: impl Iterator<Item = &'a [u8]>,
) -> anyhow::Result<usize> {
    let mut pending: Vec<PublisherConfirm> = Vec::new();
    for body in bodies {
        pending.push(
            ch.basic_publish(
                "",
                queue,
                BasicPublishOptions::default(),
                body,
                persistent(),
            )
            .await?,
        );
    }
    let n = pending.len();
    for c in pending {
        if let Confirmation::Nack(_) = c.await? {
            anyhow::bail!("the broker refused a message (nack)");
        }
    }
    Ok(n)
}

pub fn persistent() -> BasicProperties {
    BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type("application/json".into())
}
