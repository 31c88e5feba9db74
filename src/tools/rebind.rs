//! `migrate --rebind-namespace`: makes this database the ledger of the configured
//! `amqp.namespace`, on the database and on the broker ([`crate::ledger::identity`]). For a
//! move to a new namespace (every worker of the old one stopped first), or a namespace whose
//! mark names a ledger that is retired.

use lapin::options::ExchangeDeleteOptions;
use serde::Serialize;

use crate::amqp::topology::{self, Names};
use crate::config::Settings;
use crate::ledger::identity;

#[derive(Debug, Serialize)]
pub struct Rebound {
    pub ledger_id: String,
    pub namespace: String,
    /// The namespace the ledger served before; null when none.
    pub before: Option<String>,
}

/// Binds the ledger to the configured namespace, then replaces the namespace's mark on the
/// broker with this ledger's. The database first: it is what a start checks, and a second
/// run mends a broker that was not reached.
pub async fn run(settings: &Settings, pool: &sqlx::PgPool) -> anyhow::Result<Rebound> {
    let namespace = &settings.amqp.namespace;
    let (bound, before) = identity::rebind(pool, namespace).await?;
    let marked = mark(settings, &bound.ledger_id).await;
    marked.map_err(|e| {
        anyhow::anyhow!(
            "the database's ledger {} now serves namespace {namespace:?}, but the broker's \
             mark was not replaced ({e}); run this again",
            bound.ledger_id
        )
    })?;
    Ok(Rebound {
        ledger_id: bound.ledger_id,
        namespace: namespace.clone(),
        before,
    })
}

/// Deletes the namespace's mark and declares it for `ledger_id`; each on a channel of its
/// own, as a refusal closes its channel.
async fn mark(settings: &Settings, ledger_id: &str) -> anyhow::Result<()> {
    let names = Names::new(&settings.amqp.namespace);
    let conn = crate::amqp::connect(&settings.amqp, "credit-worker migrate")
        .await
        .map_err(crate::amqp::for_command)?;
    let ch = conn.create_channel().await?;
    ch.exchange_delete(
        names.ledger.as_str().into(),
        ExchangeDeleteOptions::default(),
    )
    .await?;
    match topology::declare_ledger_mark(&conn, &names, ledger_id).await {
        Ok(true) => {}
        Ok(false) => anyhow::bail!(
            "the broker user may not declare {:?}: give it the rights the README's recipe lists",
            names.ledger
        ),
        Err(e) if topology::refuses_arguments(&e) => anyhow::bail!(
            "another database's workers still run on namespace {:?} and marked it again: \
             stop them first",
            settings.amqp.namespace
        ),
        Err(e) => return Err(e.into()),
    }
    super::close_connection(conn, "rebound").await?;
    Ok(())
}
