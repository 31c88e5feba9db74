//! The broker-only ceiling: the worker's broker traffic with the database taken out. N
//! messages wait on a queue declared like the worker's input queue; a consumer with the
//! worker's prefetch batches deliveries the way the worker does (max_batch / max_wait),
//! decodes them, hands one `balance.changed` per message to a relay on its own connection
//! (where the worker would commit to the outbox) and multiple-acks the batch; the relay
//! publishes up to 1000 events at a time with pipelined confirms, like the outbox relay.

use std::time::{Duration, Instant};

use chrono::Utc;
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicQosOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::traffic::{self, Sink, Traffic};
use super::{CEILING_EVENTS, CEILING_INPUT, CEILING_SINK};
use crate::amqp::topology;
use crate::amqp::{self, Outgoing, Publisher};
use crate::config::{AmqpSettings, QueueType, Settings};
use crate::events::{self, ExecutionRef, NewEvent};
use crate::tools::scratch::Scratch;

#[derive(Debug)]
pub(crate) struct CeilingResult {
    pub msgs_per_s: f64,
    pub seconds: f64,
    pub publish_msgs_per_s: f64,
}

/// Events handed from the consumer to the relay in one go, like one outbox claim.
const RELAY_BATCH: usize = 1000;

pub async fn run(
    settings: &Settings,
    scratch: &Scratch,
    t: &Traffic,
) -> anyhow::Result<CeilingResult> {
    let amqp = &settings.amqp;
    let conn = crate::amqp::connect(amqp, "credit-worker bench ceiling").await?;
    let ch = conn.create_channel().await?;
    let queues = declare(&ch, settings, scratch).await?;

    let n = t.published() as u64;
    let bar = super::progress(n, "publish");
    let (_, publish_rate) = traffic::publish_backlog(amqp, &queues.input, t, &bar).await?;
    bar.finish_and_clear();

    let seconds = consume_and_relay(settings, t, &queues).await?;

    // Free the broker before the worker run.
    remove(&ch, &queues).await;
    let _ = crate::tools::close_connection(conn, "done").await;
    Ok(CeilingResult {
        msgs_per_s: t.published() as f64 / seconds,
        seconds,
        publish_msgs_per_s: publish_rate,
    })
}

/// The ceiling's queues and exchange, namespaced.
#[derive(Debug)]
pub(crate) struct CeilingQueues {
    /// Declared like the worker's input queue.
    pub input: String,
    /// A topic exchange like the worker's events exchange.
    pub exchange: String,
    /// Bound to `exchange` with `#`, consumed by the sink.
    pub sink: String,
}

/// Declares the ceiling's input queue, events exchange and sink queue.
pub(crate) async fn declare(
    ch: &lapin::Channel,
    settings: &Settings,
    scratch: &Scratch,
) -> anyhow::Result<CeilingQueues> {
    let q = CeilingQueues {
        input: scratch.name(CEILING_INPUT),
        exchange: scratch.name(CEILING_EVENTS),
        sink: scratch.name(CEILING_SINK),
    };
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    let args = input_queue_args(settings);
    ch.queue_declare(q.input.as_str().into(), durable, args)
        .await?;
    topology::declare_events_exchange(ch, &q.exchange).await?;
    ch.queue_declare(q.sink.as_str().into(), durable, FieldTable::default())
        .await?;
    ch.queue_bind(
        q.sink.as_str().into(),
        q.exchange.as_str().into(),
        "#".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await?;
    Ok(q)
}

/// Deletes what [`declare`] declared (best effort: the scratch clean-up runs too).
pub(crate) async fn remove(ch: &lapin::Channel, q: &CeilingQueues) {
    for queue in [&q.input, &q.sink] {
        let _ = ch
            .queue_delete(
                queue.as_str().into(),
                lapin::options::QueueDeleteOptions::default(),
            )
            .await;
    }
    let _ = ch
        .exchange_delete(
            q.exchange.as_str().into(),
            lapin::options::ExchangeDeleteOptions::default(),
        )
        .await;
}

/// The worker's input-queue arguments, minus dead-lettering (nothing is rejected here).
fn input_queue_args(settings: &Settings) -> FieldTable {
    let mut args = FieldTable::default();
    if settings.amqp.queue_type == QueueType::Quorum {
        args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString("quorum".into()),
        );
        args.insert(
            "x-delivery-limit".into(),
            AMQPValue::LongLongInt(i64::from(settings.amqp.delivery_limit)),
        );
    }
    args
}

/// Consumes the backlog on the input queue and relays an event per message to the exchange
/// until the sink has them all; returns the seconds from the first delivery to the last event
/// or confirm.
async fn consume_and_relay(
    settings: &Settings,
    t: &Traffic,
    q: &CeilingQueues,
) -> anyhow::Result<f64> {
    let amqp = &settings.amqp;
    let n = t.messages as u64;
    let sink = Sink::start(amqp, &q.sink, t).await?;
    let (events_tx, events_rx) = mpsc::unbounded_channel::<Vec<NewEvent>>();
    let relay = tokio::spawn(relay(amqp.clone(), q.exchange.clone(), events_rx));

    let bar = super::progress(n, "ceiling");
    // Pairs runs relay a USAGE event per message too: the sink counts executions.
    let never = CancellationToken::new();
    let first = consume(settings, &q.input, Some(t.published()), &never, events_tx)
        .await?
        .ok_or_else(|| anyhow::anyhow!("nothing was consumed"))?;
    let stall = Duration::from_secs(60);
    sink.wait_complete(t.messages, &bar, stall, || Ok(()))
        .await?;
    let last_confirm = relay.await??;
    let seen = sink.finish().await?;
    bar.finish_and_clear();
    let end = match (seen.last, last_confirm) {
        (Some(a), Some(b)) => a.max(b),
        (a, b) => a.or(b).unwrap_or_else(Instant::now),
    };
    Ok(end.saturating_duration_since(first).as_secs_f64().max(1e-9))
}

/// Consumes `limit` messages (without a limit: until `stop`), handing an event per message
/// to the relay; returns the instant of the first delivery.
pub(crate) async fn consume(
    settings: &Settings,
    queue: &str,
    limit: Option<usize>,
    stop: &CancellationToken,
    events_tx: mpsc::UnboundedSender<Vec<NewEvent>>,
) -> anyhow::Result<Option<Instant>> {
    let conn = crate::amqp::connect(&settings.amqp, "credit-worker bench consumer").await?;
    let ch = conn.create_channel().await?;
    ch.basic_qos(settings.amqp.prefetch, BasicQosOptions::default())
        .await?;
    let mut deliveries = ch
        .basic_consume(
            queue.into(),
            "credit-worker-bench-ceiling".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let max_batch = settings.pipeline.max_batch;
    let max_wait = Duration::from_millis(settings.pipeline.max_wait_ms);
    let mut first = None;
    let mut consumed = 0;
    let next = |d: Option<Result<lapin::message::Delivery, lapin::Error>>| match d {
        Some(Ok(d)) => Ok(d),
        Some(Err(e)) => Err(anyhow::Error::from(e)),
        None => Err(anyhow::anyhow!("the broker ended the consumer")),
    };
    let total = limit.unwrap_or(usize::MAX);
    while consumed < total {
        let delivery = tokio::select! {
            d = deliveries.next() => d,
            () = stop.cancelled() => break,
        };
        let mut batch = vec![next(delivery)?];
        first.get_or_insert_with(Instant::now);
        let deadline = tokio::time::Instant::now() + max_wait;
        while batch.len() < max_batch && consumed + batch.len() < total {
            match tokio::time::timeout_at(deadline, deliveries.next()).await {
                Ok(d) => batch.push(next(d)?),
                Err(_) => break,
            }
        }
        events_tx
            .send(usage_events(&batch)?)
            .map_err(|_| anyhow::anyhow!("the event relay stopped"))?;
        if let Some(last) = batch.last() {
            if !last.acker.ack(BasicAckOptions { multiple: true }).await? {
                anyhow::bail!("the bench channel closed before its batch was acked");
            }
        }
        consumed += batch.len();
    }
    let _ = crate::tools::close_connection(conn, "done").await;
    Ok(first)
}

/// The worker's CPU work minus the database: decode, build the event.
fn usage_events(batch: &[lapin::message::Delivery]) -> anyhow::Result<Vec<NewEvent>> {
    let now = Utc::now();
    let mut out = Vec::with_capacity(batch.len());
    for d in batch {
        let e = crate::message::decode(&d.data)?;
        // A completion's event has an id of its own, as the worker's SETTLE row has.
        let key = match e.phase {
            crate::message::Phase::Started => format!("USAGE-{}", e.node_exec_id),
            crate::message::Phase::Completed => format!("USAGE-{}-completed", e.node_exec_id),
        };
        out.push(events::balance_changed(
            &e.user_id,
            1,
            -10,
            0,
            "USAGE",
            &key,
            ExecutionRef {
                node_exec_id: Some(&e.node_exec_id),
                graph_exec_id: Some(&e.graph_exec_id),
            },
            now,
        ));
    }
    Ok(out)
}

/// Publishes what the consumer hands over; returns the instant of the last confirm.
pub(crate) async fn relay(
    amqp: AmqpSettings,
    exchange: String,
    mut rx: mpsc::UnboundedReceiver<Vec<NewEvent>>,
) -> anyhow::Result<Option<Instant>> {
    let conn = crate::amqp::connect(&amqp, "credit-worker bench relay").await?;
    let publisher = Publisher::open(&conn).await?;
    let me = crate::amqp::producer::own_user(&amqp.url);
    let mut last = None;
    while let Some(mut batch) = rx.recv().await {
        while batch.len() < RELAY_BATCH {
            match rx.try_recv() {
                Ok(more) => batch.extend(more),
                Err(_) => break,
            }
        }
        // The worker's own relay work per event: set the event's properties, publish with
        // confirms.
        let now = Utc::now();
        let messages: Vec<Outgoing<'_>> = batch
            .iter()
            .map(|ev| Outgoing {
                exchange: &exchange,
                routing_key: ev.routing_key,
                body: ev.payload.as_bytes(),
                properties: amqp::event_properties(&ev.event_id, now, me.as_deref()),
                mandatory: false,
            })
            .collect();
        publisher.publish_all(messages).await?;
        last = Some(Instant::now());
    }
    let _ = crate::tools::close_connection(conn, "done").await;
    Ok(last)
}
