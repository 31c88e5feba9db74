//! Published events past the retention leave the outbox (docs/contract.md §6).

use chrono::{DateTime, Utc};
use sqlx::PgConnection;

use super::store;

/// Rows deleted per statement: each is a short transaction that holds no writer up.
pub(crate) const ROWS_PER_STATEMENT: i64 = 10_000;

/// Deletes up to `max_rows` outbox rows that the relays have published and that were stamped
/// before `before`, oldest first, and moves the audit's horizon to `before`. Returns how many
/// rows went; it stops at the first stretch of published rows that are not due yet.
/// Unpublished events are never deleted, however old.
pub async fn prune_published(
    conn: &mut PgConnection,
    before: DateTime<Utc>,
    max_rows: i64,
) -> Result<i64, sqlx::Error> {
    let mut deleted = 0;
    loop {
        let limit = ROWS_PER_STATEMENT.min(max_rows - deleted);
        if limit <= 0 {
            return Ok(deleted);
        }
        let n = store::prune_published(conn, before, limit).await?;
        deleted += n;
        if n < limit {
            return Ok(deleted);
        }
    }
}
