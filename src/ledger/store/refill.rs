//! The monthly refill sweep's statements: a chunk of accounts at a time, in SQL.

use chrono::{DateTime, NaiveDate, Utc};
use sqlx::{PgConnection, PgPool};

use crate::ledger::runs::EVENTS_PER_ROW;

/// The upper end (inclusive) of the next sweep chunk: the `$2`-th user after `$1` in user_id
/// order, or the last one when fewer are left; NULL when none is. Reads only the primary key.
const REFILL_CHUNK_END: &str = "SELECT max(user_id) FROM (
        SELECT user_id FROM credit.balances WHERE user_id > $1 ORDER BY user_id LIMIT $2) c";

/// One chunk of the refill sweep, in one statement: locks the accounts in ($1, $2] not yet
/// evaluated for the month starting on $3 (user_id order; a row another transaction changed
/// meanwhile is re-checked after the wait, so one refilled concurrently is skipped), computes
/// each grant by the rule of `RefillPolicy::grant` (target $4), and writes what
/// `Account::refill` would: per granted user a GRANT ledger row
/// under key $5 with metadata $6 and its `balance.changed` event, whose payload is the text
/// `events::balance_changed`
/// serialises (keys in order, `occurred_at` = $8, the time $7 formatted); every evaluated
/// account gets refill_month = $3 unless it holds a later one. The events go into the outbox
/// $9 to a row, in user_id order (migration 0009). Wakes the outbox relays when it wrote
/// events.
const REFILL_CHUNK: &str = r#"WITH
  locked AS (
    SELECT user_id, balance, last_seq FROM credit.balances
     WHERE user_id > $1 AND user_id <= $2
       AND (refill_month IS NULL OR refill_month < $3)
     ORDER BY user_id FOR UPDATE),
  g AS (
    SELECT user_id, last_seq + 1 AS seq, balance,
           -- A grant that overflows fails the chunk (22003), as `RefillPolicy::grant` refuses it.
           CASE WHEN balance >= $4 THEN 0 ELSE $4 - balance END AS amount
      FROM locked),
  -- Unreferenced data-modifying CTEs run last-declared first: declared before u and t, the
  -- outbox insert runs after them, so its id-ordering lock (migration 0005) is held only
  -- from there to the commit and parallel chunks overlap for the rest.
  o AS (
    INSERT INTO credit.outbox (event_id, routing_key, events, payload, run, created_at)
    SELECT credit.balance_changed_id(min(user_id), $5), 'balance.changed', count(*),
           CASE WHEN count(*) = 1 THEN min(payload)::json END,
           CASE WHEN count(*) > 1
                THEN ('[' || string_agg(payload, ',' ORDER BY user_id) || ']')::json END, $7
      FROM (SELECT user_id, (row_number() OVER (ORDER BY user_id) - 1) / $9 AS part,
                   '{"amount":' || amount || ',"balance":' || (balance + amount)
                   || ',"event_id":' || to_json(credit.balance_changed_id(user_id, $5))::text
                   || ',"occurred_at":' || k.occurred_at || ',"seq":' || seq
                   || ',"transaction_key":' || k.key
                   || ',"transaction_type":"GRANT","type":"balance.changed","user_id":'
                   || to_json(user_id)::text || '}' AS payload
              FROM g, (SELECT to_json($5::text)::text AS key,
                              to_json($8::text)::text AS occurred_at) k
             WHERE amount > 0) e
     GROUP BY part),
  u AS (
    UPDATE credit.balances b
       SET balance = g.balance + g.amount,
           last_seq = CASE WHEN g.amount > 0 THEN g.seq ELSE g.seq - 1 END,
           refill_month = greatest(b.refill_month, $3),
           updated_at = $7
      FROM g
     WHERE b.user_id = g.user_id AND b.user_id > $1 AND b.user_id <= $2),
  t AS (
    INSERT INTO credit.transactions
        (user_id, seq, transaction_key, type, amount, running_balance, metadata, created_at)
    SELECT user_id, seq, $5, 'GRANT', amount, balance + amount, $6, $7
      FROM g WHERE amount > 0),
  n AS (
    SELECT count(*)::int8 AS evaluated, count(*) FILTER (WHERE amount > 0)::int8 AS refilled,
           coalesce(sum(amount), 0)::text AS granted
      FROM g)
SELECT evaluated, refilled, granted,
       CASE WHEN refilled > 0 THEN pg_notify('credit_outbox', '') END IS NULL AS woke
  FROM n"#;

/// Key of the advisory lock that lets one replica sweep at a time.
const SWEEP_LOCK: i64 = 0x6372_6564_6974; // "credit"

/// The upper end of the sweep chunk of up to `chunk` users after `cursor`; `None` when no user
/// comes after it.
pub(crate) async fn refill_chunk_end(
    pool: &PgPool,
    cursor: &str,
    chunk: i64,
) -> Result<Option<String>, sqlx::Error> {
    sqlx::query_scalar(REFILL_CHUNK_END)
        .bind(cursor)
        .bind(chunk)
        .fetch_one(pool)
        .await
}

/// The account in the middle of the range ($1, $2] of user ids, when it holds more than one:
/// the end of the range's first half.
const RANGE_MIDDLE: &str = "SELECT user_id FROM (
        SELECT user_id, row_number() OVER (ORDER BY user_id) AS n, count(*) OVER () AS total
          FROM credit.balances WHERE user_id > $1 AND user_id <= $2) r
     WHERE total > 1 AND n = total / 2";

/// The end of the first half of the range (`after`, `through`] of accounts; None when it holds
/// one account or none.
pub(crate) async fn range_middle(
    pool: &PgPool,
    after: &str,
    through: &str,
) -> Result<Option<String>, sqlx::Error> {
    sqlx::query_scalar(RANGE_MIDDLE)
        .bind(after)
        .bind(through)
        .fetch_optional(pool)
        .await
}

/// What one sweep chunk did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct RefillTotals {
    pub evaluated: i64,
    pub refilled: i64,
    /// Exact: many grants together may exceed what a balance holds.
    pub granted: i128,
}

/// A chunk's totals as the statement returns them: the credits' sum (a `numeric`) as text.
#[derive(sqlx::FromRow)]
struct ChunkTotals {
    evaluated: i64,
    refilled: i64,
    granted: String,
}

impl TryFrom<ChunkTotals> for RefillTotals {
    type Error = sqlx::Error;
    fn try_from(row: ChunkTotals) -> Result<Self, Self::Error> {
        let granted = row
            .granted
            .parse()
            .map_err(|e| sqlx::Error::Decode(format!("granted {:?}: {e}", row.granted).into()))?;
        Ok(RefillTotals {
            evaluated: row.evaluated,
            refilled: row.refilled,
            granted,
        })
    }
}

impl RefillTotals {
    /// Both ranges' totals.
    pub(crate) fn plus(self, other: RefillTotals) -> RefillTotals {
        RefillTotals {
            evaluated: self.evaluated + other.evaluated,
            refilled: self.refilled + other.refilled,
            granted: self.granted + other.granted,
        }
    }
}

/// The refill a sweep grants: the month, its ledger key and metadata, and the policy's target.
pub(crate) struct RefillGrant<'a> {
    pub month_start: NaiveDate,
    pub key: &'a str,
    pub metadata: &'a serde_json::Value,
    pub target: i64,
}

/// Refills the accounts in (`after`, `through`] not yet evaluated for the month (see
/// [`REFILL_CHUNK`]); `at` is the time of their rows and events.
pub(crate) async fn refill_chunk(
    conn: &mut PgConnection,
    after: &str,
    through: &str,
    grant: &RefillGrant<'_>,
    at: DateTime<Utc>,
) -> Result<RefillTotals, sqlx::Error> {
    sqlx::query_as(REFILL_CHUNK)
        .bind(after)
        .bind(through)
        .bind(grant.month_start)
        .bind(grant.target)
        .bind(grant.key)
        .bind(grant.metadata)
        .bind(at)
        .bind(crate::events::rfc3339(at))
        .bind(EVENTS_PER_ROW as i64)
        .fetch_one(&mut *conn)
        .await
        .and_then(|row: ChunkTotals| row.try_into())
}

/// A round trip on `conn`, which keeps its session from counting as idle.
pub(crate) async fn ping(conn: &mut PgConnection) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT 1").execute(&mut *conn).await?;
    Ok(())
}

/// Takes the sweep's session-level advisory lock on `conn`; false when another holds it.
pub(crate) async fn try_sweep_lock(conn: &mut PgConnection) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
        .bind(SWEEP_LOCK)
        .fetch_one(&mut *conn)
        .await
}
