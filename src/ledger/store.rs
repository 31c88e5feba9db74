//! The SQL of the ledger: lock balance rows, write ledger rows, balances and outbox rows
//! set-based (`UNNEST`), one round trip per table whatever the number of rows.

use std::collections::HashMap;

use chrono::{DateTime, NaiveDate, Utc};
use sqlx::{PgConnection, Row};

use super::account::{Account, Changes};

/// Locks balance rows. `users` must be sorted and deduplicated: every writer locks in
/// user_id order, so replicas do not deadlock.
const LOCK_ACCOUNTS: &str = "SELECT user_id, balance, last_seq, refill_month, fee_day, fee_count
       FROM credit.balances WHERE user_id = ANY($1::text[])
      ORDER BY user_id FOR UPDATE";

/// Creates the balance rows of first-time users (sorted), then they are locked like the rest.
const CREATE_ACCOUNTS: &str = "INSERT INTO credit.balances (user_id)
     SELECT u FROM unnest($1::text[]) AS u
     ON CONFLICT (user_id) DO NOTHING";

/// Everything a transaction writes, in one statement (one round trip): decisions (when
/// given), ledger rows, balances, outbox rows, and a wake-up for the outbox relays. Returns
/// how many decisions were inserted, so the caller can detect a concurrent decision.
const WRITE: &str = "WITH
  d AS (
    INSERT INTO credit.decisions
        (node_exec_id, user_id, block_id, graph_exec_id, outcome, cost, fee, transaction_key,
         fee_key, decided_at)
    SELECT n, u, b, g, o, c, f, k, fk, $19
      FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::int8[],
                  $7::int8[], $8::text[], $9::text[]) AS x(n, u, b, g, o, c, f, k, fk)
    ON CONFLICT (node_exec_id) DO NOTHING
    RETURNING 1),
  t AS (
    INSERT INTO credit.transactions
        (user_id, seq, transaction_key, type, amount, running_balance, metadata, created_at)
    SELECT u, s, k, t::credit.transaction_type, a, r, m, $19
      FROM unnest($10::text[], $11::int8[], $12::text[], $13::text[], $14::int8[],
                  $15::int8[], $16::jsonb[]) AS x(u, s, k, t, a, r, m)),
  b AS (
    UPDATE credit.balances b
       SET balance = x.balance, last_seq = x.last_seq, refill_month = x.refill_month,
           fee_day = x.fee_day, fee_count = x.fee_count, updated_at = $19
      FROM unnest($20::text[], $21::int8[], $22::int8[], $23::date[], $24::date[], $25::int8[])
           AS x(user_id, balance, last_seq, refill_month, fee_day, fee_count)
     WHERE b.user_id = x.user_id),
  o AS (
    INSERT INTO credit.outbox (event_id, routing_key, payload)
    SELECT e, r, p::json FROM unnest($17::text[], $18::text[], $26::text[]) AS x(e, r, p))
SELECT (SELECT count(*) FROM d)::int8 AS decided,
       CASE WHEN cardinality($17::text[]) > 0 THEN pg_notify('credit_outbox', '') END AS woke";

/// Decision rows to write with [`write`], column by column.
#[derive(Debug, Default)]
pub struct DecisionRows<'a> {
    pub node_exec_id: Vec<&'a str>,
    pub user_id: Vec<&'a str>,
    pub block_id: Vec<&'a str>,
    pub graph_exec_id: Vec<&'a str>,
    pub outcome: Vec<&'static str>,
    pub cost: Vec<i64>,
    pub fee: Vec<i64>,
    pub transaction_key: Vec<Option<&'a str>>,
    pub fee_key: Vec<Option<&'a str>>,
}

impl DecisionRows<'_> {
    pub fn len(&self) -> usize {
        self.node_exec_id.len()
    }
    pub fn is_empty(&self) -> bool {
        self.node_exec_id.is_empty()
    }
}

pub(crate) fn account_from_row(row: &sqlx::postgres::PgRow) -> Result<Account, sqlx::Error> {
    Ok(Account {
        user_id: row.try_get("user_id")?,
        balance: row.try_get("balance")?,
        last_seq: row.try_get("last_seq")?,
        refill_month: row.try_get("refill_month")?,
        fee_day: row.try_get("fee_day")?,
        fee_count: row.try_get("fee_count")?,
        dirty: false,
    })
}

/// Locks (creating where missing) the accounts of `users`, which must be sorted and unique.
pub async fn lock_accounts(
    conn: &mut PgConnection,
    users: &[String],
) -> Result<HashMap<String, Account>, sqlx::Error> {
    debug_assert!(users.windows(2).all(|w| w[0] < w[1]));
    let mut accounts = select_locked(conn, users).await?;
    if accounts.len() < users.len() {
        // Usually every user exists; only first-time users cost the extra round trips.
        let missing: Vec<&str> = users
            .iter()
            .filter(|u| !accounts.contains_key(u.as_str()))
            .map(String::as_str)
            .collect();
        sqlx::query(CREATE_ACCOUNTS)
            .bind(&missing)
            .execute(&mut *conn)
            .await?;
        let created = sqlx::query(LOCK_ACCOUNTS)
            .bind(&missing)
            .fetch_all(&mut *conn)
            .await?;
        for r in &created {
            let a = account_from_row(r)?;
            accounts.insert(a.user_id.clone(), a);
        }
    }
    Ok(accounts)
}

async fn select_locked(
    conn: &mut PgConnection,
    users: &[String],
) -> Result<HashMap<String, Account>, sqlx::Error> {
    let rows = sqlx::query(LOCK_ACCOUNTS)
        .bind(users)
        .fetch_all(&mut *conn)
        .await?;
    rows.iter()
        .map(|r| account_from_row(r).map(|a| (a.user_id.clone(), a)))
        .collect()
}

/// Writes the ledger rows, the changed balance rows and the outbox rows.
pub async fn flush<'a>(
    conn: &mut PgConnection,
    accounts: impl IntoIterator<Item = &'a Account>,
    changes: &Changes,
    at: DateTime<Utc>,
) -> Result<(), sqlx::Error> {
    write(conn, &DecisionRows::default(), accounts, changes, at)
        .await
        .map(|_| ())
}

/// Writes decisions, ledger rows, changed balances and outbox rows in one statement; returns
/// the number of decisions inserted (fewer than given when another worker decided some).
pub async fn write<'a>(
    conn: &mut PgConnection,
    decisions: &DecisionRows<'_>,
    accounts: impl IntoIterator<Item = &'a Account>,
    changes: &Changes,
    at: DateTime<Utc>,
) -> Result<u64, sqlx::Error> {
    let dirty: Vec<&Account> = accounts.into_iter().filter(|a| a.dirty).collect();
    if decisions.is_empty()
        && dirty.is_empty()
        && changes.transactions.is_empty()
        && changes.events.is_empty()
    {
        return Ok(0);
    }
    let d = decisions;
    let t = &changes.transactions;
    let e = &changes.events;
    let row = sqlx::query(WRITE)
        .bind(&d.node_exec_id)
        .bind(&d.user_id)
        .bind(&d.block_id)
        .bind(&d.graph_exec_id)
        .bind(&d.outcome)
        .bind(&d.cost)
        .bind(&d.fee)
        .bind(&d.transaction_key)
        .bind(&d.fee_key)
        .bind(t.iter().map(|r| r.user_id.as_str()).collect::<Vec<_>>())
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
        .bind(e.iter().map(|x| x.event_id.as_str()).collect::<Vec<_>>())
        .bind(e.iter().map(|x| x.routing_key).collect::<Vec<_>>())
        .bind(at)
        .bind(dirty.iter().map(|a| a.user_id.as_str()).collect::<Vec<_>>())
        .bind(dirty.iter().map(|a| a.balance).collect::<Vec<_>>())
        .bind(dirty.iter().map(|a| a.last_seq).collect::<Vec<_>>())
        .bind(
            dirty
                .iter()
                .map(|a| a.refill_month)
                .collect::<Vec<Option<NaiveDate>>>(),
        )
        .bind(
            dirty
                .iter()
                .map(|a| a.fee_day)
                .collect::<Vec<Option<NaiveDate>>>(),
        )
        .bind(dirty.iter().map(|a| a.fee_count).collect::<Vec<_>>())
        .bind(e.iter().map(|x| x.payload.to_string()).collect::<Vec<_>>())
        .fetch_one(&mut *conn)
        .await?;
    let decided: i64 = row.try_get("decided")?;
    Ok(u64::try_from(decided).unwrap_or(0))
}
