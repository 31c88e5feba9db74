//! The broker-only pipeline open loop: the ceiling's consumer (batching like the worker, one
//! `balance.changed` per message) and relay run for the whole search on the ceiling's queues,
//! and every step publishes into it at its offered rate.

use std::time::Instant;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::step::Pipeline;
use super::{Cursor, SearchSpec, Searched};
use crate::config::Settings;
use crate::events::NewEvent;
use crate::tools::bench::ceiling::{self, CeilingQueues};
use crate::tools::bench::traffic::{Sink, Traffic};
use crate::tools::scratch::Scratch;

type Task = JoinHandle<anyhow::Result<Option<Instant>>>;

/// The running consume → relay → sink pipeline.
struct BrokerPipeline {
    queues: CeilingQueues,
    sink: Sink,
    stop: CancellationToken,
    consumer: Task,
    relay: Task,
}

impl Pipeline for BrokerPipeline {
    fn input_queue(&self) -> &str {
        &self.queues.input
    }

    fn sink(&self) -> &Sink {
        &self.sink
    }

    /// One event per message: a start and a completion both yield one.
    fn events_per_execution(&self, slice: &Traffic, _: usize) -> u8 {
        if slice.is_pairs() {
            2
        } else {
            1
        }
    }

    fn check_alive(&mut self) -> anyhow::Result<()> {
        if self.consumer.is_finished() || self.relay.is_finished() {
            anyhow::bail!("the broker-only pipeline's consumer or relay stopped");
        }
        Ok(())
    }
}

/// Searches the broker-only pipeline's sustained rate; its queues are removed afterwards.
pub(crate) async fn run(
    settings: &Settings,
    scratch: &Scratch,
    base: &Traffic,
    spec: &SearchSpec,
) -> anyhow::Result<Searched> {
    let amqp = &settings.amqp;
    let conn = crate::amqp::connect(amqp, "credit-worker bench ceiling").await?;
    let ch = conn.create_channel().await?;
    let queues = ceiling::declare(&ch, settings, scratch).await?;
    let (pub_conn, publisher) = super::open_publisher(amqp).await?;
    let mut p = start(settings, base, queues).await?;
    let mut cursor = Cursor::default();
    let searched = super::search(&mut p, &publisher, base, &mut cursor, spec, "broker").await;
    let _ = crate::tools::close_connection(pub_conn, "done").await;
    p.stop.cancel();
    // The consumer's end closes the relay's channel, which ends the relay.
    let consumed = p.consumer.await;
    let relayed = p.relay.await;
    let _ = p.sink.finish().await;
    ceiling::remove(&ch, &p.queues).await;
    let _ = crate::tools::close_connection(conn, "done").await;
    let searched = searched?;
    consumed??;
    relayed??;
    Ok(searched)
}

async fn start(
    settings: &Settings,
    base: &Traffic,
    queues: CeilingQueues,
) -> anyhow::Result<BrokerPipeline> {
    let amqp = &settings.amqp;
    let sink = Sink::start(amqp, &queues.sink, base).await?;
    let (events_tx, events_rx) = mpsc::unbounded_channel::<Vec<NewEvent>>();
    let relay = tokio::spawn(ceiling::relay(
        amqp.clone(),
        queues.exchange.clone(),
        events_rx,
    ));
    let stop = CancellationToken::new();
    let consumer = tokio::spawn({
        let settings = settings.clone();
        let input = queues.input.clone();
        let stop = stop.clone();
        async move { ceiling::consume(&settings, &input, None, &stop, events_tx).await }
    });
    Ok(BrokerPipeline {
        queues,
        sink,
        stop,
        consumer,
        relay,
    })
}
