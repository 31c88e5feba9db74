//! The SQL of the ledger: lock balance rows, write ledger rows, balances and outbox rows
//! set-based (`UNNEST`), one round trip per table whatever the number of rows.

use std::collections::HashMap;

use chrono::{DateTime, NaiveDate, Utc};
use sqlx::{PgConnection, Row};

use super::account::{Account, Changes};

/// Creates missing balance rows, then locks all of them. `users` must be sorted and
/// deduplicated: every writer locks in user_id order, so replicas never deadlock.
const ENSURE_ACCOUNTS: &str = "INSERT INTO credit.balances (user_id)
     SELECT u FROM unnest($1::text[]) AS u
     ON CONFLICT (user_id) DO NOTHING";

const LOCK_ACCOUNTS: &str = "SELECT user_id, balance, last_seq, refill_month, fee_day, fee_count
       FROM credit.balances WHERE user_id = ANY($1::text[])
      ORDER BY user_id FOR UPDATE";

const INSERT_TRANSACTIONS: &str = "INSERT INTO credit.transactions
        (user_id, seq, transaction_key, type, amount, running_balance, metadata, created_at)
     SELECT u, s, k, t::credit.transaction_type, a, r, m, c
       FROM unnest($1::text[], $2::int8[], $3::text[], $4::text[], $5::int8[], $6::int8[],
                   $7::jsonb[], $8::timestamptz[]) AS x(u, s, k, t, a, r, m, c)";

const UPDATE_BALANCES: &str = "UPDATE credit.balances b
        SET balance = x.balance, last_seq = x.last_seq, refill_month = x.refill_month,
            fee_day = x.fee_day, fee_count = x.fee_count, updated_at = $7
       FROM unnest($1::text[], $2::int8[], $3::int8[], $4::date[], $5::date[], $6::int8[])
            AS x(user_id, balance, last_seq, refill_month, fee_day, fee_count)
      WHERE b.user_id = x.user_id";

const INSERT_OUTBOX: &str = "INSERT INTO credit.outbox (event_id, routing_key, payload)
     SELECT * FROM unnest($1::text[], $2::text[], $3::jsonb[])";

/// Wakes the outbox relays of every replica.
const NOTIFY_OUTBOX: &str = "SELECT pg_notify('credit_outbox', '')";

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
    sqlx::query(ENSURE_ACCOUNTS)
        .bind(users)
        .execute(&mut *conn)
        .await?;
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
    if !changes.transactions.is_empty() {
        let t = &changes.transactions;
        sqlx::query(INSERT_TRANSACTIONS)
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
            .bind(t.iter().map(|r| r.created_at).collect::<Vec<_>>())
            .execute(&mut *conn)
            .await?;
    }
    let dirty: Vec<&Account> = accounts.into_iter().filter(|a| a.dirty).collect();
    if !dirty.is_empty() {
        sqlx::query(UPDATE_BALANCES)
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
            .bind(at)
            .execute(&mut *conn)
            .await?;
    }
    if !changes.events.is_empty() {
        let e = &changes.events;
        sqlx::query(INSERT_OUTBOX)
            .bind(e.iter().map(|x| x.event_id.as_str()).collect::<Vec<_>>())
            .bind(e.iter().map(|x| x.routing_key).collect::<Vec<_>>())
            .bind(e.iter().map(|x| &x.payload).collect::<Vec<_>>())
            .execute(&mut *conn)
            .await?;
        sqlx::query(NOTIFY_OUTBOX).execute(&mut *conn).await?;
    }
    Ok(())
}
