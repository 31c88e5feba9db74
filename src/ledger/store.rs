//! The SQL of the ledger: every statement that writes `credit.*` tables (and the reads that
//! belong with them), one named function per statement. Writes are set-based (`UNNEST`), so a
//! transaction costs one round trip whatever the number of rows.

use std::collections::HashMap;

use chrono::{DateTime, NaiveDate, Utc};
use futures::TryStreamExt as _;
use sqlx::{PgConnection, PgPool, Postgres, Transaction};

use super::account::{Account, Changes, NewTransaction};
use super::decision::{
    DecisionRecord, EarlierDecision, EarlierSettlement, NewDecision, NewSettlement,
    SettlementRecord,
};
use super::runs::{runs, Run, EVENTS_PER_ROW};
use super::{HistoryPage, HistoryQuery, PageBuilder, TxType};

/// The balance row's columns, as [`Account`] reads them.
macro_rules! select_account {
    () => {
        "SELECT user_id, balance, last_seq, refill_month, fee_day, fee_count,
            fee_n, auto_threshold, auto_amount, auto_requests, auto_requested_at
       FROM credit.balances "
    };
}

/// Locks balance rows. `users` must be sorted and deduplicated: every writer locks in
/// user_id order, so replicas do not deadlock.
const LOCK_ACCOUNTS: &str = concat!(
    select_account!(),
    "WHERE user_id = ANY($1::text[]) ORDER BY user_id FOR UPDATE"
);

/// One balance row as it stands, unlocked (`account`).
const READ_ACCOUNT: &str = concat!(select_account!(), "WHERE user_id = $1");

/// Creates the balance rows of first-time users ([`begin_locked`]).
const CREATE_ACCOUNTS: &str = "INSERT INTO credit.balances (user_id)
     SELECT u FROM unnest($1::text[]) AS u
     ON CONFLICT (user_id) DO NOTHING";

/// Everything a transaction writes, in one statement (one round trip): decisions (when
/// given), ledger rows, balances, outbox rows (a row per run of events, [`runs`]), and a
/// wake-up for the outbox relays.
///
/// Decisions and settlements are plain inserts, and run first: a node execution decided or
/// settled before (when the caller did not look, or another worker holding other users'
/// locks got there meanwhile) fails the statement at once with a unique violation
/// ([`decided_elsewhere`]). `ON CONFLICT DO NOTHING` would cost every row a speculative
/// insertion and its extra WAL record.
///
/// PostgreSQL runs the data-modifying CTEs the last declared first. The outbox insert is
/// declared first so that it runs last: it takes the lock that orders event ids (migration
/// 0005), held until commit, so a concurrent writer (another replica, a control command, a
/// sweep chunk) waits for it only from there to the commit, not through the ledger writes.
const WRITE: &str = "WITH
  o AS (
    INSERT INTO credit.outbox (event_id, routing_key, events, payload, run, created_at)
    SELECT e, r, n, CASE WHEN n = 1 THEN p::json END, CASE WHEN n > 1 THEN p::json END, $19
      FROM unnest($17::text[], $18::text[], $40::int4[], $26::text[]) AS x(e, r, n, p)),
  t AS (
    INSERT INTO credit.transactions
        (user_id, seq, transaction_key, type, amount, running_balance, metadata, created_at)
    SELECT u, s, k, t::credit.transaction_type, a, r, m, $19
      FROM unnest($10::text[], $11::int8[], $12::text[], $13::text[], $14::int8[],
                  $15::int8[], $16::jsonb[]) AS x(u, s, k, t, a, r, m)),
  u AS (
    UPDATE credit.balances b
       SET balance = x.balance, last_seq = x.last_seq, refill_month = x.refill_month,
           fee_day = x.fee_day, fee_count = x.fee_count, fee_n = x.fee_n,
           auto_threshold = x.at, auto_amount = x.aa, auto_requests = x.ar,
           auto_requested_at = x.ara, updated_at = $19
      FROM unnest($20::text[], $21::int8[], $22::int8[], $23::date[], $24::date[], $25::int8[],
                  $41::int8[], $36::int8[], $37::int8[], $38::int8[], $39::timestamptz[])
           AS x(user_id, balance, last_seq, refill_month, fee_day, fee_count, fee_n, at, aa, ar,
                ara)
     WHERE b.user_id = x.user_id),
  s AS (
    INSERT INTO credit.settlements
        (node_exec_id, user_id, block_id, status, pre, post, delta, uncollected,
         transaction_key, fee_uncollected, settled_at)
    SELECT n, u, b, st, pr, po, de, un, k, fu, $19
      FROM unnest($27::text[], $28::text[], $29::text[], $30::text[], $31::int8[], $32::int8[],
                  $33::int8[], $34::int8[], $35::text[], $42::int8[])
           AS x(n, u, b, st, pr, po, de, un, k, fu)),
  d AS (
    INSERT INTO credit.decisions
        (node_exec_id, user_id, block_id, graph_exec_id, outcome, cost, fee, transaction_key,
         fee_key, decided_at)
    SELECT n, u, b, g, o, c, f, k, fk, $19
      FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::int8[],
                  $7::int8[], $8::text[], $9::text[]) AS x(n, u, b, g, o, c, f, k, fk))
SELECT CASE WHEN cardinality($17::text[]) > 0 THEN pg_notify('credit_outbox', '') END IS NULL
       AS woke";

const EARLIER_DECISIONS: &str = "SELECT node_exec_id, user_id, block_id, outcome, cost
       FROM credit.decisions WHERE node_exec_id = ANY($1::text[])";

const EARLIER_SETTLEMENTS: &str = "SELECT node_exec_id, user_id, block_id FROM credit.settlements
      WHERE node_exec_id = ANY($1::text[])";

const FIND_SETTLEMENT: &str = "SELECT status, pre, post, delta, uncollected, fee_uncollected,
       transaction_key FROM credit.settlements WHERE node_exec_id = $1";

const FIND_DECISION: &str = "SELECT user_id, block_id, outcome, cost, transaction_key, fee, \
            fee_key AS fee_transaction_key \
       FROM credit.decisions WHERE node_exec_id = $1";

const KEYED_ROW: &str = "SELECT type::text, amount, seq FROM credit.transactions \
     WHERE user_id = $1 AND transaction_key = $2";

const READ_BALANCE: &str = "SELECT balance FROM credit.balances WHERE user_id = $1";

/// A history page, newest first, by keyset on `seq` ($2 = before_seq, i64::MAX for the first
/// page). Each filter has its own statement so that even a generic plan walks the index made
/// for it backwards instead of filtering the user's whole ledger: the primary key
/// (user_id, seq) here, and the indexes of migration 0003 below.
const HISTORY: &str = "SELECT seq, transaction_key, type::text AS type, amount, running_balance,
            created_at, metadata
       FROM credit.transactions WHERE user_id = $1 AND seq < $2
      ORDER BY seq DESC LIMIT $3";

/// Served by (user_id, type, seq).
const HISTORY_BY_TYPE: &str = "SELECT seq, transaction_key, type::text AS type, amount,
            running_balance, created_at, metadata
       FROM credit.transactions
      WHERE user_id = $1 AND seq < $2 AND type = $4::text::credit.transaction_type
      ORDER BY seq DESC LIMIT $3";

/// Served by (user_id, (metadata->>'graph_exec_id'), seq), walked backwards; the optional type
/// ($5) is a filter on the run's rows. Planned anew for each page (not prepared): a generic
/// plan estimates a run's rows from the average run and, for a long one, reads and sorts all
/// of it for every page.
const HISTORY_BY_GRAPH: &str = "SELECT seq, transaction_key, type::text AS type, amount,
            running_balance, created_at, metadata
       FROM credit.transactions
      WHERE user_id = $1 AND seq < $2 AND (metadata->>'graph_exec_id') = $4
        AND ($5::text IS NULL OR type = $5::text::credit.transaction_type)
      ORDER BY seq DESC LIMIT $3";

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

/// Begins a transaction holding the balance rows of `users` (sorted, unique), creating the
/// missing ones. Every writer locks in user_id order (the database's, `ORDER BY user_id`),
/// so writers cannot deadlock. When the first look locked nothing (a single user's
/// operation, say), the missing rows are created and locked in the transaction, so a failed
/// operation leaves no account behind. Otherwise a missing row may sort before a locked one
/// and be locked out of order: the locks are let go (the transaction rolled back), the
/// missing rows created on their own, holding nothing, and all locked again in order.
/// Accounts are never removed, so the second look finds them.
pub(crate) async fn begin_locked(pool: &PgPool, users: &[String]) -> Result<Locked, sqlx::Error> {
    debug_assert!(users.windows(2).all(|w| w[0] < w[1]));
    let mut tx = pool.begin().await?;
    let accounts = select_locked(&mut tx, users).await?;
    if accounts.len() == users.len() {
        return Ok((tx, accounts));
    }
    // Usually every user exists; only first-time users cost the extra round trips.
    let mut tx = if accounts.is_empty() {
        create_accounts(&mut *tx, users).await?;
        tx
    } else {
        let missing: Vec<String> = users
            .iter()
            .filter(|u| !accounts.contains_key(u.as_str()))
            .cloned()
            .collect();
        tx.rollback().await?;
        create_accounts(pool, &missing).await?;
        pool.begin().await?
    };
    let accounts = select_locked(&mut tx, users).await?;
    Ok((tx, accounts))
}

/// A transaction and the accounts it holds ([`begin_locked`]).
pub(crate) type Locked = (
    sqlx::Transaction<'static, sqlx::Postgres>,
    HashMap<String, Account>,
);

async fn create_accounts<'e>(
    conn: impl sqlx::PgExecutor<'e>,
    users: &[String],
) -> Result<(), sqlx::Error> {
    sqlx::query(CREATE_ACCOUNTS)
        .bind(users)
        .execute(conn)
        .await
        .map(|_| ())
}

async fn select_locked(
    conn: &mut PgConnection,
    users: &[String],
) -> Result<HashMap<String, Account>, sqlx::Error> {
    // Prepared once per connection (an unnamed statement costs a round trip more and a parse
    // per batch). Unlike the decisions' look-up, a plan made while the table was small cannot
    // go stale fast: accounts are added slowly, and the balance updates every batch makes
    // bring autovacuum's ANALYZE, which replans it, within about a minute.
    let rows: Vec<Account> = sqlx::query_as(LOCK_ACCOUNTS)
        .bind(users)
        .fetch_all(&mut *conn)
        .await?;
    Ok(rows.into_iter().map(|a| (a.user_id.clone(), a)).collect())
}

/// Earlier settlements of any of `node_exec_ids`.
pub(crate) async fn earlier_settlements(
    conn: &mut PgConnection,
    node_exec_ids: &[&str],
) -> Result<Vec<EarlierSettlement>, sqlx::Error> {
    sqlx::query_as(EARLIER_SETTLEMENTS)
        .bind(node_exec_ids)
        // Planned on every call (see `earlier_decisions`).
        .persistent(false)
        .fetch_all(&mut *conn)
        .await
}

/// The settlement of a node execution, if any.
pub(crate) async fn find_settlement(
    pool: &PgPool,
    node_exec_id: &str,
) -> Result<Option<SettlementRecord>, sqlx::Error> {
    sqlx::query_as(FIND_SETTLEMENT)
        .bind(node_exec_id)
        .fetch_optional(pool)
        .await
}

/// Earlier decisions of any of `node_exec_ids`.
pub(crate) async fn earlier_decisions(
    conn: &mut PgConnection,
    node_exec_ids: &[&str],
) -> Result<Vec<EarlierDecision>, sqlx::Error> {
    sqlx::query_as(EARLIER_DECISIONS)
        .bind(node_exec_ids)
        // Planned on every call: a cached plan made while the table was small stays a
        // sequential scan, which grows with every decision until autovacuum's next ANALYZE.
        .persistent(false)
        .fetch_all(&mut *conn)
        .await
}

/// The stored decision of a node execution, if any.
pub(crate) async fn find_decision(
    pool: &PgPool,
    node_exec_id: &str,
) -> Result<Option<DecisionRecord>, sqlx::Error> {
    sqlx::query_as(FIND_DECISION)
        .bind(node_exec_id)
        .fetch_optional(pool)
        .await
}

/// The type, amount and seq of the user's ledger row under `key`, if there is one.
pub(crate) async fn keyed_row(
    conn: &mut PgConnection,
    user_id: &str,
    key: &str,
) -> Result<Option<(String, i64, i64)>, sqlx::Error> {
    sqlx::query_as(KEYED_ROW)
        .bind(user_id)
        .bind(key)
        .fetch_optional(&mut *conn)
        .await
}

/// [`keyed_row`] and the purchase the row names as a refund's (its `top_up_key`, if any).
pub(crate) async fn refund_row(
    conn: &mut PgConnection,
    user_id: &str,
    key: &str,
) -> Result<Option<(String, i64, i64, Option<String>)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT type::text, amount, seq, metadata->>'top_up_key' FROM credit.transactions
          WHERE user_id = $1 AND transaction_key = $2",
    )
    .bind(user_id)
    .bind(key)
    .fetch_optional(&mut *conn)
    .await
}

/// The type and amount of `user_id`'s row under `top_up_key`, and what the REFUND rows
/// naming it as their purchase took back.
pub(crate) async fn purchase(
    conn: &mut PgConnection,
    user_id: &str,
    top_up_key: &str,
) -> Result<Option<(String, i64, i64)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT t.type::text, t.amount,
                (SELECT coalesce(sum(-r.amount), 0)::int8 FROM credit.transactions r
                  WHERE r.user_id = t.user_id AND r.type = 'REFUND'
                    AND r.metadata->>'top_up_key' = t.transaction_key)
           FROM credit.transactions t WHERE t.user_id = $1 AND t.transaction_key = $2",
    )
    .bind(user_id)
    .bind(top_up_key)
    .fetch_optional(&mut *conn)
    .await
}

/// A user's balance row as it stands, None for a user without one.
pub(crate) async fn read_account(
    pool: &PgPool,
    user_id: &str,
) -> Result<Option<Account>, sqlx::Error> {
    sqlx::query_as(READ_ACCOUNT)
        .bind(user_id)
        .fetch_optional(pool)
        .await
}

/// The stored balance, 0 for a user without a row.
pub(crate) async fn read_balance(pool: &PgPool, user_id: &str) -> Result<i64, sqlx::Error> {
    let balance: Option<i64> = sqlx::query_scalar(READ_BALANCE)
        .bind(user_id)
        .fetch_optional(pool)
        .await?;
    Ok(balance.unwrap_or(0))
}

/// One page of a user's ledger rows, newest first: rows are read only until `page` is
/// complete, so the rows past it are not kept, however long they are.
pub(crate) async fn history(
    pool: &PgPool,
    user_id: &str,
    q: &HistoryQuery,
    mut page: PageBuilder,
) -> Result<HistoryPage, sqlx::Error> {
    let mut rows = history_query(history_sql(q), user_id, q).fetch(pool);
    while let Some(row) = rows.try_next().await? {
        if !page.push(row) {
            break;
        }
    }
    Ok(page.finish())
}

/// The plan of [`history`]'s statement for `q`, one line per row of `EXPLAIN`.
pub(crate) async fn explain_history(
    pool: &PgPool,
    user_id: &str,
    q: &HistoryQuery,
) -> Result<Vec<String>, sqlx::Error> {
    let sql = format!("EXPLAIN {}", history_sql(q));
    let rows: Vec<(String,)> = history_query(&sql, user_id, q).fetch_all(pool).await?;
    Ok(rows.into_iter().map(|(line,)| line).collect())
}

fn history_sql(q: &HistoryQuery) -> &'static str {
    match (&q.graph_exec_id, q.tx_type) {
        (Some(_), _) => HISTORY_BY_GRAPH,
        (None, Some(_)) => HISTORY_BY_TYPE,
        (None, None) => HISTORY,
    }
}

/// `sql` (one of the HISTORY statements) with `q`'s parameters bound.
fn history_query<'q, O>(
    sql: &'q str,
    user_id: &'q str,
    q: &'q HistoryQuery,
) -> sqlx::query::QueryAs<'q, sqlx::Postgres, O, sqlx::postgres::PgArguments>
where
    O: for<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow>,
{
    // One row more than the page: whether it comes tells if another page follows.
    let page = sqlx::query_as(sql)
        .persistent(q.graph_exec_id.is_none())
        .bind(user_id)
        .bind(q.before_seq.unwrap_or(i64::MAX))
        .bind(q.limit.saturating_add(1));
    let tx_type = q.tx_type.map(TxType::as_str);
    match (q.graph_exec_id.as_deref(), tx_type) {
        (Some(g), t) => page.bind(g).bind(t),
        (None, Some(t)) => page.bind(t),
        (None, None) => page,
    }
}

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

/// Takes the sweep's session-level advisory lock on `conn`; false when another holds it.
pub(crate) async fn try_sweep_lock(conn: &mut PgConnection) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
        .bind(SWEEP_LOCK)
        .fetch_one(&mut *conn)
        .await
}

/// Writes the ledger rows, the changed balance rows and the outbox rows.
pub(crate) async fn flush<'a>(
    conn: &mut PgConnection,
    accounts: impl IntoIterator<Item = &'a Account>,
    changes: &Changes,
    at: DateTime<Utc>,
) -> Result<(), sqlx::Error> {
    write(conn, &Written::default(), accounts, changes, at).await
}

/// The decisions and settlements of a batch.
#[derive(Debug, Default)]
pub(crate) struct Written {
    pub decisions: Vec<NewDecision>,
    pub settlements: Vec<NewSettlement>,
}

/// The write statement's query with its parameters bound so far.
type Write<'q> = sqlx::query::QueryScalar<'q, sqlx::Postgres, bool, sqlx::postgres::PgArguments>;

/// Writes decisions, settlements, ledger rows, changed balances and outbox rows in one
/// statement.
pub(crate) async fn write<'a>(
    conn: &mut PgConnection,
    written: &Written,
    accounts: impl IntoIterator<Item = &'a Account>,
    changes: &Changes,
    at: DateTime<Utc>,
) -> Result<(), sqlx::Error> {
    let dirty: Vec<&Account> = accounts.into_iter().filter(|a| a.dirty).collect();
    if written.decisions.is_empty()
        && written.settlements.is_empty()
        && dirty.is_empty()
        && changes.transactions.is_empty()
        && changes.events.is_empty()
    {
        return Ok(());
    }
    let rows = runs(&changes.events);
    // Parameters in the statement's numbering: $1–$9 decisions, $10–$16 ledger rows,
    // $17–$18 outbox rows, $19 the time, $20–$25 balances, $26 payloads, $27–$35 settlements,
    // $36–$39 auto top-up state, $40 events per outbox row, $41 fees charged on fee_day,
    // $42 settlements' uncollected fees.
    let q = bind_decisions(sqlx::query_scalar(WRITE), &written.decisions);
    let q = bind_rows(q, &changes.transactions);
    let q = bind_runs(q, &rows).bind(at);
    let q =
        bind_balances(q, &dirty).bind(rows.iter().map(|r| r.payload.as_ref()).collect::<Vec<_>>());
    let q = bind_settlements(q, &written.settlements);
    bind_auto_top_up(q, &dirty)
        .bind(rows.iter().map(|r| r.events).collect::<Vec<_>>())
        .bind(dirty.iter().map(|a| a.fee_n).collect::<Vec<_>>())
        .bind(
            written
                .settlements
                .iter()
                .map(|s| s.fee_uncollected)
                .collect::<Vec<_>>(),
        )
        .fetch_one(&mut *conn)
        .await?;
    Ok(())
}

/// True when [`write`] failed because another transaction committed a decision or a
/// settlement for one of the same node executions after the caller looked for them.
pub(crate) fn decided_elsewhere(e: &sqlx::Error) -> bool {
    e.as_database_error().is_some_and(|db| {
        db.is_unique_violation()
            && matches!(db.constraint(), Some("decisions_pkey" | "settlements_pkey"))
    })
}

fn bind_decisions<'q>(q: Write<'q>, d: &'q [NewDecision]) -> Write<'q> {
    let col = |f: fn(&NewDecision) -> &str| d.iter().map(f).collect::<Vec<_>>();
    q.bind(col(|x| &x.node_exec_id))
        .bind(col(|x| &x.user_id))
        .bind(col(|x| &x.block_id))
        .bind(col(|x| &x.graph_exec_id))
        .bind(col(|x| x.outcome.as_str()))
        .bind(d.iter().map(|x| x.cost).collect::<Vec<_>>())
        .bind(d.iter().map(|x| x.fee).collect::<Vec<_>>())
        .bind(
            d.iter()
                .map(|x| x.transaction_key.as_deref())
                .collect::<Vec<_>>(),
        )
        .bind(d.iter().map(|x| x.fee_key.as_deref()).collect::<Vec<_>>())
}

fn bind_rows<'q>(q: Write<'q>, t: &'q [NewTransaction]) -> Write<'q> {
    q.bind(t.iter().map(|r| r.user_id.as_str()).collect::<Vec<_>>())
        .bind(t.iter().map(|r| r.seq).collect::<Vec<_>>())
        .bind(
            t.iter()
                .map(|r| r.transaction_key.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(t.iter().map(|r| r.tx_type.as_str()).collect::<Vec<_>>())
        .bind(t.iter().map(|r| r.amount).collect::<Vec<_>>())
        .bind(t.iter().map(|r| r.running_balance).collect::<Vec<_>>())
        .bind(t.iter().map(|r| &r.metadata).collect::<Vec<_>>())
}

fn bind_runs<'q>(q: Write<'q>, rows: &[Run<'q>]) -> Write<'q> {
    q.bind(rows.iter().map(|r| r.event_id).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.routing_key).collect::<Vec<_>>())
}

fn bind_balances<'q>(q: Write<'q>, dirty: &[&'q Account]) -> Write<'q> {
    q.bind(dirty.iter().map(|a| a.user_id.as_str()).collect::<Vec<_>>())
        .bind(dirty.iter().map(|a| a.balance).collect::<Vec<_>>())
        .bind(dirty.iter().map(|a| a.last_seq).collect::<Vec<_>>())
        .bind(dirty.iter().map(|a| a.refill_month).collect::<Vec<_>>())
        .bind(dirty.iter().map(|a| a.fee_day).collect::<Vec<_>>())
        .bind(dirty.iter().map(|a| a.fee_count).collect::<Vec<_>>())
}

fn bind_settlements<'q>(q: Write<'q>, st: &'q [NewSettlement]) -> Write<'q> {
    q.bind(
        st.iter()
            .map(|x| x.node_exec_id.as_str())
            .collect::<Vec<_>>(),
    )
    .bind(st.iter().map(|x| x.user_id.as_str()).collect::<Vec<_>>())
    .bind(st.iter().map(|x| x.block_id.as_str()).collect::<Vec<_>>())
    .bind(st.iter().map(|x| x.status).collect::<Vec<_>>())
    .bind(st.iter().map(|x| x.pre).collect::<Vec<_>>())
    .bind(st.iter().map(|x| x.post).collect::<Vec<_>>())
    .bind(st.iter().map(|x| x.delta).collect::<Vec<_>>())
    .bind(st.iter().map(|x| x.uncollected).collect::<Vec<_>>())
    .bind(
        st.iter()
            .map(|x| x.transaction_key.as_deref())
            .collect::<Vec<_>>(),
    )
}

fn bind_auto_top_up<'q>(q: Write<'q>, dirty: &[&'q Account]) -> Write<'q> {
    q.bind(dirty.iter().map(|a| a.auto_threshold).collect::<Vec<_>>())
        .bind(dirty.iter().map(|a| a.auto_amount).collect::<Vec<_>>())
        .bind(dirty.iter().map(|a| a.auto_requests).collect::<Vec<_>>())
        .bind(
            dirty
                .iter()
                .map(|a| a.auto_requested_at)
                .collect::<Vec<_>>(),
        )
}

// The outbox relay's statements.

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

/// A read-only transaction in one snapshot (REPEATABLE READ) for a read of the whole ledger
/// (`audit`, `report`), with no statement timeout: on a large ledger such a read runs longer
/// than the worker's statements may, and a timeout would read as a failure.
pub(crate) async fn long_read(
    pool: &PgPool,
) -> Result<Transaction<'static, Postgres>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .execute(&mut *tx)
        .await?;
    sqlx::query("SET LOCAL statement_timeout = 0")
        .execute(&mut *tx)
        .await?;
    // Without a time limit, a read whose caller went away (Ctrl-C, a cron job killed) is
    // ended by the server within seconds rather than at its end (PostgreSQL 14 and later).
    // Where the server lacks the setting (before 14) or refuses it (a platform without the
    // check), the read runs without it.
    sqlx::query(
        "DO $$ BEGIN
             PERFORM set_config('client_connection_check_interval', '5s', true);
         EXCEPTION WHEN OTHERS THEN NULL;
         END $$",
    )
    .execute(&mut *tx)
    .await?;
    Ok(tx)
}
