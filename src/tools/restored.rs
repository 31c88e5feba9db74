//! `migrate --after-restore`: says that this database, gone back in time (a restore, or a
//! failover to a standby that had not received the last commits), is the ledger from here on.
//! The broker's record of how far the ledger's events were published (`crate::progress`) is
//! set back to the database's watermark, so that workers bill into it again and publish its
//! events from there. Run it once docs/reliability.md's "After a restore or a failover" is
//! done, every worker stopped.

use lapin::options::QueuePurgeOptions;
use serde::Serialize;

use crate::amqp::topology::Names;
use crate::amqp::Publisher;
use crate::config::Settings;
use crate::ledger::identity;

#[derive(Debug, Serialize)]
pub struct Restored {
    pub ledger_id: String,
    /// How far the broker recorded the ledger's events were published; null when it had no
    /// record of this ledger.
    pub recorded: Option<i64>,
    /// The database's watermark, which the broker records now.
    pub watermark: i64,
}

pub async fn run(settings: &Settings, pool: &sqlx::PgPool) -> anyhow::Result<Restored> {
    let ledger_id = identity::read(pool).await?.ledger_id;
    let watermark = {
        let mut conn = pool.acquire().await?;
        crate::ledger::store::watermark(&mut conn).await?
    };
    let queue = Names::new(&settings.amqp.namespace).progress;
    let conn = crate::amqp::connect(&settings.amqp, "credit-worker migrate")
        .await
        .map_err(crate::amqp::for_command)?;
    let me = crate::amqp::producer::own_user(&settings.amqp.url);
    let recorded = crate::progress::recorded(&conn, (&queue, me.as_deref()), &ledger_id).await?;
    let ch = conn.create_channel().await?;
    ch.queue_purge(queue.as_str().into(), QueuePurgeOptions::default())
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "{queue:?}: {e}; the broker user needs the rights the README's recipe lists"
            )
        })?;
    let publisher = Publisher::open(&conn).await?;
    crate::progress::record(&publisher, (&queue, me.as_deref()), &ledger_id, watermark).await?;
    super::close_connection(conn, "restored").await?;
    Ok(Restored {
        ledger_id,
        recorded,
        watermark,
    })
}
