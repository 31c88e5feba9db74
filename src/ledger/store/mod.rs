//! The SQL of the ledger: every statement that writes `credit.*` tables (and the reads that
//! belong with them), one named function per statement. Writes are set-based (`UNNEST`), so a
//! transaction costs one round trip whatever the number of rows. Here: accounts and their
//! locks, decisions, settlements and a decision batch's write; a user's history, the refill
//! sweep and the outbox relay have modules of their own.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgPool, Postgres, Transaction};

use super::account::{Account, Changes, NewTransaction};
use super::decision::{
    DecisionRecord, EarlierDecision, EarlierSettlement, NewDecision, NewSettlement,
    SettlementRecord,
};
use super::runs::{runs, Run};

mod history;
mod identity;
mod outbox;
mod refill;
pub(crate) use history::{explain_history, history};
pub(crate) use identity::{bind_namespace, read_identity, rebind_namespace};
pub(crate) use outbox::{
    advance_and_read, backlog, events_after, last_outbox_id, lead_watermark, mend_outbox_ids,
    outbox_head, prune_published, republish_range, try_lead_relay, unpublished_events, watermark,
    StoredEvent,
};
pub(crate) use refill::{
    ping, range_middle, refill_chunk, refill_chunk_end, try_sweep_lock, RefillGrant, RefillTotals,
};

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
