//! The outbox relay's statements: leading, the watermark, reading events after it,
//! republishing, pruning, and the backlog.

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgPool};

/// The relay leader's lock, held by its session for as long as it leads ("cred", "rela"):
/// one relay publishes at a time, so a user's events go out in order.
const LEAD_RELAY: &str = "SELECT pg_try_advisory_lock(1668441444, 1919249505)";

const WATERMARK: &str = "SELECT published_through FROM credit.outbox_relay";

/// The outbox rows after the watermark $1, in id order (= commit order, migration 0005), that
/// start within the next $2 events: at most $2 rows, and fewer where rows carry several
/// events (migration 0009), so a round holds less than $2 events plus one row's.
macro_rules! rows_after {
    () => {
        "SELECT id, event_id, routing_key, events, coalesce(payload, run)::text AS payload,
       created_at
  FROM (SELECT *, sum(events) OVER (ORDER BY id) - events AS before
          FROM (SELECT id, event_id, routing_key, events, payload, run, created_at
                  FROM credit.outbox WHERE id > $1 ORDER BY id LIMIT $2) o) r
 WHERE before < $2 ORDER BY id"
    };
}

const EVENTS_AFTER: &str = rows_after!();

/// What a republish starts from: the first outbox row stamped at $1 or later (ids follow
/// commit order, stamps the writers' clocks), the relays' watermark (rows past it are the
/// relay's to send), and the retention horizon (rows stamped before it may be deleted).
const REPUBLISH_RANGE: &str =
    "SELECT (SELECT min(id) FROM credit.outbox WHERE created_at >= $1) AS first,
       published_through,
       CASE WHEN isfinite(pruned_before) THEN pruned_before END AS pruned_before
  FROM credit.outbox_relay";

/// Moves the watermark to $1 (never back) and reads the next events after it: one round trip
/// and one commit per relay round.
const ADVANCE_AND_READ: &str = concat!(
    "WITH a AS (
    UPDATE credit.outbox_relay SET published_through = $1, updated_at = now()
     WHERE published_through < $1)
",
    rows_after!()
);

/// Of the $2 oldest published rows (lowest ids up to the watermark), deletes those stamped
/// before $1, and moves the audit's horizon to $1 (migration 0011). Returns how many went.
/// Ids follow commit order and stamps the writers' clocks, so the oldest rows come first
/// (rows a little out of order wait for a later prune); a statement reads the $2 lowest live
/// rows, with no index on the stamp, even when none is due (plus the index entries of rows
/// deleted and not yet vacuumed).
const PRUNE_PUBLISHED: &str = "WITH d AS (
    DELETE FROM credit.outbox WHERE id IN (
        SELECT id FROM (
            SELECT id, created_at FROM credit.outbox
             WHERE id <= (SELECT published_through FROM credit.outbox_relay)
             ORDER BY id LIMIT $2) oldest
         WHERE created_at < $1)
    RETURNING 1),
  h AS (
    UPDATE credit.outbox_relay SET pruned_before = $1 WHERE pruned_before < $1)
SELECT count(*) FROM d";

const UNPUBLISHED: &str = "SELECT coalesce(sum(events), 0)::int8 FROM credit.outbox
      WHERE id > (SELECT published_through FROM credit.outbox_relay)";

/// An outbox row: one event, or a run of `events` with the same routing key (then `payload`
/// is a JSON array of them, read from the row's `run`).
#[derive(Debug, sqlx::FromRow)]
pub(crate) struct StoredEvent {
    pub id: i64,
    pub event_id: String,
    pub routing_key: String,
    pub events: i32,
    pub payload: String,
    pub created_at: DateTime<Utc>,
}

/// Takes the relay leader's lock for this session if no other session holds it. It is held
/// until the session ends: `conn` must not go back to a pool.
pub(crate) async fn try_lead_relay(conn: &mut PgConnection) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar(LEAD_RELAY).fetch_one(&mut *conn).await
}

/// The id of the outbox's last row (0 when empty): every event committed so far is at or
/// below it.
pub(crate) async fn outbox_head(conn: &mut PgConnection) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT coalesce(max(id), 0) FROM credit.outbox")
        .fetch_one(&mut *conn)
        .await
}

/// The relays' watermark: every event up to it was published.
pub(crate) async fn watermark(conn: &mut PgConnection) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(WATERMARK).fetch_one(&mut *conn).await
}

/// [`watermark`], read with its row locked for the statement, which fails where the session
/// cannot write (`SELECT … FOR UPDATE` in a read-only transaction): the leader's first look.
pub(crate) async fn lead_watermark(conn: &mut PgConnection) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(LEAD_WATERMARK)
        .fetch_one(&mut *conn)
        .await
}

const LEAD_WATERMARK: &str = "SELECT published_through FROM credit.outbox_relay FOR UPDATE";

/// The last id the outbox's sequence has drawn (the one before its next, where it was never
/// called or was restarted): a watermark past it (a hand edit, a restore that reset the
/// sequence) would take every event written until the ids pass it as published.
pub(crate) async fn last_outbox_id(conn: &mut PgConnection) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT CASE WHEN is_called THEN last_value ELSE last_value - 1 END FROM credit.outbox_id_seq",
    )
    .fetch_one(&mut *conn)
    .await
}

/// Moves the outbox's sequence past every id in use: the outbox's rows and the relays'
/// watermark. A sequence behind them (a restore or a copy that did not carry its value, as
/// logical replication does not; a hand edit) would fail every event's insert on the key, or
/// have the relays take the events written until the ids pass the watermark as published.
/// Under the outbox's ordering lock, which every inserting transaction takes before it draws
/// an id, so nothing draws one meanwhile and the sequence only ever moves forward. Returns
/// (the last id drawn before, the last id now) when it moved.
pub(crate) async fn mend_outbox_ids(
    conn: &mut PgConnection,
) -> Result<Option<(i64, i64)>, sqlx::Error> {
    let mut tx = sqlx::Connection::begin(&mut *conn).await?;
    sqlx::query(OUTBOX_ORDERING_LOCK).execute(&mut *tx).await?;
    let (last, target): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT CASE WHEN is_called THEN last_value ELSE last_value - 1 END
                   FROM credit.outbox_id_seq),
                greatest((SELECT coalesce(max(id), 0) FROM credit.outbox),
                         (SELECT published_through FROM credit.outbox_relay))",
    )
    .fetch_one(&mut *tx)
    .await?;
    if target <= last {
        return Ok(None);
    }
    sqlx::query("SELECT setval('credit.outbox_id_seq', $1)")
        .bind(target)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(Some((last, target)))
}

/// The lock of migration 0005's trigger, taken before a statement draws outbox ids.
const OUTBOX_ORDERING_LOCK: &str = "SELECT pg_advisory_xact_lock(1668441444, 1869968482)";

/// The rows of the next `limit` events after `watermark`, in id order.
pub(crate) async fn events_after(
    conn: &mut PgConnection,
    watermark: i64,
    limit: i64,
) -> Result<Vec<StoredEvent>, sqlx::Error> {
    sqlx::query_as(EVENTS_AFTER)
        .bind(watermark)
        .bind(limit)
        .fetch_all(&mut *conn)
        .await
}

/// The first outbox id stamped at `since` or later (None when none is), the watermark, and
/// the retention horizon (None before the first prune).
pub(crate) async fn republish_range(
    conn: &mut PgConnection,
    since: DateTime<Utc>,
) -> Result<(Option<i64>, i64, Option<DateTime<Utc>>), sqlx::Error> {
    sqlx::query_as(REPUBLISH_RANGE)
        .bind(since)
        .fetch_one(&mut *conn)
        .await
}

/// Moves the watermark to `through` (committed on return: call it outside a transaction,
/// as the relay leader) and returns the rows of the next `limit` events after it.
pub(crate) async fn advance_and_read(
    conn: &mut PgConnection,
    through: i64,
    limit: i64,
) -> Result<Vec<StoredEvent>, sqlx::Error> {
    sqlx::query_as(ADVANCE_AND_READ)
        .bind(through)
        .bind(limit)
        .fetch_all(&mut *conn)
        .await
}

/// Deletes those of the `limit` oldest published outbox rows stamped before `before` (see
/// [`PRUNE_PUBLISHED`]); returns how many.
pub(crate) async fn prune_published(
    conn: &mut PgConnection,
    before: DateTime<Utc>,
    limit: i64,
) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(PRUNE_PUBLISHED)
        .bind(before)
        .bind(limit)
        .fetch_one(&mut *conn)
        .await
}

/// What the relays have still to publish: the events after the watermark, and how long ago
/// (in seconds) the first of them was written (0 when none waits).
#[derive(Debug, Clone, Copy, sqlx::FromRow)]
pub(crate) struct Backlog {
    pub events: i64,
    pub oldest_age_s: f64,
}

/// The watermark is read once, as a scalar: the outbox's key is then searched from it, where
/// a join would walk every row kept below it.
const BACKLOG: &str = "WITH w AS (SELECT published_through AS id FROM credit.outbox_relay)
SELECT (SELECT coalesce(sum(events), 0)::int8 FROM credit.outbox
         WHERE id > (SELECT id FROM w)) AS events,
       coalesce((SELECT greatest(extract(epoch FROM now() - created_at), 0)::float8
                   FROM credit.outbox WHERE id > (SELECT id FROM w) ORDER BY id LIMIT 1),
                0) AS oldest_age_s";

/// The outbox's [`Backlog`], in one statement.
pub(crate) async fn backlog(pool: &PgPool) -> Result<Backlog, sqlx::Error> {
    sqlx::query_as(BACKLOG).fetch_one(pool).await
}

/// Events after the watermark (counting each event of a row): not published yet.
pub(crate) async fn unpublished_events(pool: &PgPool) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(UNPUBLISHED).fetch_one(pool).await
}
