//! Which deployment a ledger is (migration 0024). One database serves one `amqp.namespace`,
//! and one namespace one database:
//! - on the database, the namespace the ledger serves, bound by the first `run`: the outbox
//!   holds every event of the ledger and the relay's leader publishes them to its own
//!   namespace, so a worker of another namespace on this database would take them;
//! - on the broker, the ledger's id on the namespace's mark (exchange `credit.ledger`): a
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
    #[error(
        "the database is now ledger {now}, and this worker started on ledger {started}: the \
         database URL leads to another database, or the ledger was moved to another namespace \
         and back; a restart binds it afresh"
    )]
    OtherLedger { started: String, now: String },
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

    /// Ok when this is ledger `ledger_id` and serves `namespace`: what a running worker bound
    /// at its start.
    pub(crate) fn still(&self, ledger_id: &str, namespace: &str) -> Result<(), BindingError> {
        self.serves(namespace)?;
        if self.ledger_id != ledger_id {
            return Err(BindingError::OtherLedger {
                started: ledger_id.to_owned(),
                now: self.ledger_id.clone(),
            });
        }
        Ok(())
    }
}

impl BindingError {
    /// Whether the database failed for a reason that clears by itself ([`crate::db::is_transient`]).
    pub(crate) fn is_transient(&self) -> bool {
        matches!(self, BindingError::Db(e) if crate::db::is_transient(e))
    }
}

/// Binds the ledger to `namespace` if it serves none yet; an error when it serves another.
pub async fn bind(pool: &PgPool, namespace: &str) -> Result<Identity, BindingError> {
    let identity = store::bind_namespace(pool, namespace).await?;
    identity.serves(namespace)?;
    Ok(identity)
}

/// Binds the ledger to `namespace`, whichever it served (a new ledger id when that was
/// another); returns the namespace before.
pub(crate) async fn rebind(
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

/// How often a running worker looks at the ledger it bound at start.
const WATCH_EVERY: Duration = Duration::from_secs(2);

/// What [`watch`] compares: the ledger and namespace bound at start.
pub(crate) struct Bound {
    pub ledger_id: std::sync::Arc<str>,
    pub namespace: String,
}

/// Returns, with the reason logged, once the database is no longer the ledger bound at start
/// serving `bound.namespace` (`migrate --rebind-namespace` moved it while this worker ran, or
/// the database URL now leads to another database), so the worker stops rather than bill
/// from this namespace's queue into a ledger that is not its own; or at `stop`. It cancels
/// `halt` first: the outbox relay then stops where it is, rather than flush the ledger's
/// events to this namespace. A database that does not answer is the other tasks' to report.
pub(crate) async fn watch(
    pool: PgPool,
    bound: Bound,
    halt: CancellationToken,
    stop: CancellationToken,
) {
    let mut every =
        tokio::time::interval_at(tokio::time::Instant::now() + WATCH_EVERY, WATCH_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = every.tick() => {}
        }
        match read(&pool)
            .await
            .map(|i| i.still(&bound.ledger_id, &bound.namespace))
        {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                error!(error = %e, "this worker's ledger is not the database's any more; stopping");
                halt.cancel();
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

    /// A running worker's ledger is the one it bound, serving its namespace; another id (the
    /// URL leads elsewhere, or the ledger moved and came back with a new one) is not.
    #[test]
    fn a_running_worker_checks_the_ledger_it_bound() {
        let ledger = bound(Some("prod."));
        assert!(ledger.still("6f1c", "prod.").is_ok());
        assert!(matches!(
            ledger.still("6f1c", "staging."),
            Err(BindingError::OtherNamespace { .. })
        ));
        assert_eq!(
            ledger.still("0a9b", "prod.").unwrap_err().to_string(),
            "the database is now ledger 6f1c, and this worker started on ledger 0a9b: the \
             database URL leads to another database, or the ledger was moved to another \
             namespace and back; a restart binds it afresh"
        );
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
