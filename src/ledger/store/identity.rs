//! The ledger's identity (migration 0024): its id, and the namespace it serves.

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgPool};

use crate::ledger::identity::Identity;

/// Binds the ledger to $1 when no namespace holds it yet, and returns it as it stands: of two
/// workers binding at once, the second's update waits for the first's row and then sees its
/// namespace (an update re-reads a row changed under it; a separate read would not).
const BIND: &str = "UPDATE credit.ledger_identity
   SET namespace = coalesce(namespace, $1), bound_at = coalesce(bound_at, now())
RETURNING ledger_id::text, namespace, bound_at";

/// Binds the ledger to $1 whatever it served; returns the identity and the namespace before.
/// Moved to another namespace, the ledger gets a new id, so a copy of a database moved to
/// its own environment's namespace is told apart from the original on the broker.
const REBIND: &str = "UPDATE credit.ledger_identity i
   SET namespace = $1, bound_at = now(),
       ledger_id = CASE WHEN before.namespace <> $1 THEN gen_random_uuid() ELSE i.ledger_id END
  FROM (SELECT namespace FROM credit.ledger_identity FOR UPDATE) before
RETURNING i.ledger_id::text, i.namespace, i.bound_at, before.namespace AS before";

const READ: &str = "SELECT ledger_id::text, namespace, bound_at FROM credit.ledger_identity";

type Row = (String, Option<String>, Option<DateTime<Utc>>);

fn identity((ledger_id, namespace, bound_at): Row) -> Identity {
    Identity {
        ledger_id,
        namespace,
        bound_at,
    }
}

/// [`BIND`].
pub(crate) async fn bind_namespace(
    pool: &PgPool,
    namespace: &str,
) -> Result<Identity, sqlx::Error> {
    let row: Row = sqlx::query_as(BIND).bind(namespace).fetch_one(pool).await?;
    Ok(identity(row))
}

/// [`REBIND`].
pub(crate) async fn rebind_namespace(
    pool: &PgPool,
    namespace: &str,
) -> Result<(Identity, Option<String>), sqlx::Error> {
    let (ledger_id, namespace, bound_at, before): (
        String,
        Option<String>,
        Option<DateTime<Utc>>,
        Option<String>,
    ) = sqlx::query_as(REBIND)
        .bind(namespace)
        .fetch_one(pool)
        .await?;
    Ok((identity((ledger_id, namespace, bound_at)), before))
}

/// The identity as it stands.
pub(crate) async fn read_identity(conn: &mut PgConnection) -> Result<Identity, sqlx::Error> {
    let row: Row = sqlx::query_as(READ).fetch_one(&mut *conn).await?;
    Ok(identity(row))
}
