//! `events republish`: sends the events the outbox still keeps (published ones, stamped from a
//! time on) again, for a subscriber that lost them: a queue deleted, purged or bound late.
//! Events keep their `event_id`, so subscribers that have them drop the copies.

use anyhow::Context as _;
use chrono::{DateTime, Utc};
use lapin::options::ExchangeDeclareOptions;
use lapin::types::FieldTable;
use serde::Serialize;

use crate::amqp::topology::{self, Names};
use crate::amqp::{producer, Publisher};
use crate::config::Settings;
use crate::ledger::store;
use crate::outbox::Route;

/// Outbox rows read per round (a round's events are published, then confirmed, together).
const ROWS: i64 = 500;

#[derive(Debug, Serialize)]
pub struct RepublishReport {
    /// How many events were (or, with `--dry-run`, would be) published.
    pub events: usize,
    /// Where to: the events exchange or a queue's name.
    pub to: String,
    /// The outbox ids sent, first and last; null when none.
    pub first_id: Option<i64>,
    pub last_id: Option<i64>,
    /// Events stamped before this may have been deleted past `outbox.retention_s` and cannot
    /// be sent; null while none has been.
    pub kept_since: Option<DateTime<Utc>>,
    pub dry_run: bool,
}

/// Publishes again the published events stamped at `since` or later, to `queue` or else to the
/// events exchange. Events not yet published are left to the relay.
pub async fn run(
    settings: &Settings,
    since: DateTime<Utc>,
    queue: Option<&str>,
    dry_run: bool,
) -> anyhow::Result<RepublishReport> {
    let pool = crate::db::connect_existing(&settings.database).await?;
    // Each read bounded as the worker's are: a database gone silent (a hung pooler, a lost
    // flow) ends the command, where the server, never sent the statement, cannot.
    let stall = crate::db::stall_bound(&settings.database);
    let mut conn = crate::db::bounded(stall, pool.acquire()).await?;
    let (first, watermark, kept_since) =
        crate::db::bounded(stall, store::republish_range(&mut conn, since)).await?;
    let names = Names::new(&settings.amqp.namespace);
    let conn_amqp = crate::amqp::connect(&settings.amqp, "credit-worker events")
        .await
        .map_err(crate::amqp::for_command)?;
    let route = match queue {
        Some(q) => Route::Queue(q),
        None => Route::Exchange(&names.events),
    };
    check_target(&conn_amqp, &route, &settings.amqp.namespace).await?;
    // This ledger's events go to the namespace it serves only, marked as its on the broker.
    let identity = crate::db::bounded(stall, crate::ledger::identity::read(&pool)).await?;
    identity.serves(&settings.amqp.namespace)?;
    if let Route::Exchange(_) = route {
        topology::declare_ledger_mark(&conn_amqp, &names, &identity.ledger_id).await?;
    }
    let publisher = Publisher::open(&conn_amqp).await?;
    let me = producer::own_user(&settings.amqp.url);
    let mut report = RepublishReport {
        events: 0,
        to: route.name().to_owned(),
        first_id: None,
        last_id: None,
        kept_since,
        dry_run,
    };
    let mut after = first.map_or(watermark, |f| f - 1);
    while after < watermark {
        let mut rows =
            crate::db::bounded(stall, store::events_after(&mut conn, after, ROWS)).await?;
        rows.retain(|r| r.id <= watermark);
        let Some(last) = rows.last().map(|r| r.id) else {
            break;
        };
        let sent = if dry_run {
            rows.iter().map(|r| r.events.max(1) as usize).sum()
        } else {
            crate::outbox::send(&publisher, &route, &rows, me.as_deref())
                .await
                .with_context(|| {
                    let before = match report.last_id {
                        Some(id) => format!("{} events (outbox rows through {id})", report.events),
                        None => "no event".to_owned(),
                    };
                    format!(
                        "{before} republished before the round that failed, and some of that \
                         round may have been"
                    )
                })?
        };
        report.events += sent;
        report.first_id = report.first_id.or(rows.first().map(|r| r.id));
        report.last_id = Some(last);
        after = last;
    }
    super::close_connection(conn_amqp, "republished").await?;
    Ok(report)
}

/// Refuses a target that is not there, naming it: a queue's events would be dropped unseen
/// by the default exchange, and a publish to a missing exchange only closes the channel.
async fn check_target(
    conn: &lapin::Connection,
    route: &Route<'_>,
    namespace: &str,
) -> anyhow::Result<()> {
    // A channel of its own: the broker closes the one a missing target was asked on.
    let ch = conn.create_channel().await?;
    let (checked, missing) = match route {
        Route::Queue(q) => (
            ch.queue_declare((*q).into(), topology::passive(), FieldTable::default())
                .await
                .map(drop),
            format!("to-queue: there is no queue {q:?} on this broker"),
        ),
        Route::Exchange(x) => (
            ch.exchange_declare(
                (*x).into(),
                lapin::ExchangeKind::Topic,
                ExchangeDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await,
            format!(
                "there is no exchange {x:?} on this broker: no worker has run with \
                 amqp.namespace {namespace:?} here (is it the namespace meant?)"
            ),
        ),
    };
    match checked {
        Ok(()) => {
            let _ = ch.close(200, "checked".into()).await;
            Ok(())
        }
        // A subscriber's exclusive queue: there, and the default exchange delivers to it.
        Err(e) if topology::locked(&e) => Ok(()),
        Err(e) if topology::not_found(&e) => Err(super::NotFound(missing).into()),
        Err(e) => Err(e.into()),
    }
}
