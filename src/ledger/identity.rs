//! Which deployment a ledger is (migration 0024). One database serves one `amqp.namespace`,
//! and one namespace one database:
//! - on the database, the namespace the ledger serves, bound by the first `run`: the outbox
//!   holds every event of the ledger and the relay's leader publishes them to its own
//!   namespace, so a worker of another namespace on this database would take them;
//! - on the broker, the ledger's id on the namespace's mark ([`crate::amqp::topology`]): a
//!   second database on the namespace would bill part of its traffic again.
//!
//! Either mistake (a staging worker pointed at the production database, a database URL that
//! names a new, empty database) stops the worker with the reason, rather than bill in silence.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error};

use super::store;

/// The ledger's identity as the database records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// A UUID, made with the database's schema; a restored copy keeps it.
    pub ledger_id: String,
    /// The namespace it serves; None until the first `run`.
    pub namespace: Option<String>,
    pub bound_at: Option<DateTime<Utc>>,
}

#[derive(Debug, thiserror::Error)]
pub enum BindingError {
    #[error(
        "amqp.namespace: this database's ledger ({ledger_id}) serves namespace {bound:?} (since \
         {since}), and this worker is configured with {configured:?}. One database serves one \
         namespace, as its events go to that namespace's credit.events: set amqp.namespace to \
         {bound:?}, or move the ledger to {configured:?} with `credit-worker migrate \
         --rebind-namespace` once every worker of {bound:?} is stopped"
    )]
    OtherNamespace {
        ledger_id: String,
        bound: String,
        since: String,
        configured: String,
    },
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
}

impl Identity {
    /// Ok when the ledger serves `configured` (or no namespace yet).
    pub fn serves(&self, configured: &str) -> Result<(), BindingError> {
        match &self.namespace {
            Some(bound) if bound != configured => Err(BindingError::OtherNamespace {
                ledger_id: self.ledger_id.clone(),
                bound: bound.clone(),
                since: self
                    .bound_at
                    .map(|t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string())
                    .unwrap_or_default(),
                configured: configured.to_owned(),
            }),
            _ => Ok(()),
        }
    }
}

/// Binds the ledger to `namespace` if it serves none yet; an error when it serves another.
pub async fn bind(pool: &PgPool, namespace: &str) -> Result<Identity, BindingError> {
    let identity = store::bind_namespace(pool, namespace).await?;
    identity.serves(namespace)?;
    Ok(identity)
}

/// Binds the ledger to `namespace`, whichever it served; returns the namespace before.
pub async fn rebind(
    pool: &PgPool,
    namespace: &str,
) -> Result<(Identity, Option<String>), sqlx::Error> {
    store::rebind_namespace(pool, namespace).await
}

/// The ledger's identity as it stands.
pub async fn read(pool: &PgPool) -> Result<Identity, sqlx::Error> {
    let mut conn = pool.acquire().await?;
    store::read_identity(&mut conn).await
}

/// The broker's refusal of the namespace's mark, as an operator reads it.
pub(crate) fn other_ledger(namespace: &str, ledger_id: &str, broker: &str) -> String {
    format!(
        "namespace {namespace:?} on this broker is another database's ledger, and this \
         database is ledger {ledger_id} (the broker: {broker}). One namespace serves one \
         database, or its traffic is billed in both: point the database URL at that ledger's \
         database, or use another amqp.namespace; if that ledger is retired, `credit-worker \
         migrate --rebind-namespace` makes this database the namespace's"
    )
}

/// How often a running worker looks at the namespace its ledger serves.
const WATCH_EVERY: Duration = Duration::from_secs(10);

/// Returns, with the reason logged, once the ledger serves another namespace than
/// `namespace` (`migrate --rebind-namespace` moved it while this worker ran), so the worker
/// stops rather than bill that namespace's ledger from this one's queue; or at `stop`. A
/// database that does not answer is the other tasks' to report.
pub(crate) async fn watch(pool: PgPool, namespace: String, stop: CancellationToken) {
    let mut every =
        tokio::time::interval_at(tokio::time::Instant::now() + WATCH_EVERY, WATCH_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = every.tick() => {}
        }
        match read(&pool).await.map(|i| i.serves(&namespace)) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                error!(error = %e, "the ledger was moved to another namespace; stopping");
                return;
            }
            Err(e) => debug!(error = %e, "ledger identity not read"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bound(namespace: Option<&str>) -> Identity {
        Identity {
            ledger_id: "6f1c".into(),
            namespace: namespace.map(str::to_owned),
            bound_at: namespace.map(|_| DateTime::from_timestamp(1_796_000_000, 0).unwrap()),
        }
    }

    #[test]
    fn a_ledger_serves_its_own_namespace_or_one_not_bound_yet() {
        assert!(bound(Some("prod.")).serves("prod.").is_ok());
        assert!(bound(Some("")).serves("").is_ok());
        assert!(bound(None).serves("anything.").is_ok());
    }

    #[test]
    fn another_namespace_is_refused_naming_both_and_the_way_out() {
        let e = bound(Some("prod."))
            .serves("staging.")
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "amqp.namespace: this database's ledger (6f1c) serves namespace \"prod.\" (since \
             2026-11-30 00:53:20 UTC), and this worker is configured with \"staging.\". One \
             database serves one namespace, as its events go to that namespace's \
             credit.events: set amqp.namespace to \"prod.\", or move the ledger to \
             \"staging.\" with `credit-worker migrate --rebind-namespace` once every worker \
             of \"prod.\" is stopped"
        );
        // The empty namespace (the default) is another namespace too.
        assert!(bound(Some("")).serves("t1.").is_err());
        assert!(bound(Some("t1.")).serves("").is_err());
    }
}
