//! Bulk loading for benchmarks and demos: many users at once, set-based, without going through
//! [`Account::post`](super::Account). Not used by the service; kept here so that every write
//! to `credit.*` lives in the ledger. The rows written keep the audit's invariants (Σ amount =
//! balance = last running balance, gap-free seq, one outbox event per ledger row).

use chrono::NaiveDate;
use sqlx::PgPool;

/// New users, each with one GRANT of `balance` under the ledger key `key` (ledger row, balance
/// and an already published `balance.changed` outbox event, so the relay has nothing to do and
/// the audit holds). `refill_month` (a first day of month) marks the month's refill as already
/// evaluated, so no refill interferes with what is measured. The users must not exist yet.
pub(crate) async fn seed_funded_users(
    pool: &PgPool,
    user_ids: &[String],
    balance: i64,
    key: &str,
    refill_month: NaiveDate,
) -> Result<(), sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::query(
        "INSERT INTO credit.balances (user_id, balance, last_seq, refill_month)
         SELECT u, $2, 1, $3 FROM unnest($1::text[]) AS u",
    )
    .bind(user_ids)
    .bind(balance)
    .bind(refill_month)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "INSERT INTO credit.transactions
                (user_id, seq, transaction_key, type, amount, running_balance, metadata)
         SELECT user_id, 1, $2, 'GRANT', balance, balance, '{\"reason\": \"seed\"}'
           FROM credit.balances WHERE user_id = ANY($1::text[])",
    )
    .bind(user_ids)
    .bind(key)
    .execute(&mut *tx)
    .await?;
    // The events count as published: the watermark moves past them, unless events written
    // before are still waiting for the relay (then these go out again: at least once).
    sqlx::query(
        "WITH e AS (
           INSERT INTO credit.outbox (event_id, routing_key, payload)
           SELECT credit.balance_changed_id(user_id, $2), 'balance.changed',
                  json_build_object('user_id', user_id, 'amount', balance, 'balance', balance,
                                    'seq', 1, 'transaction_type', 'GRANT',
                                    'transaction_key', $2::text)
             FROM credit.balances WHERE user_id = ANY($1::text[])
           RETURNING id)
         UPDATE credit.outbox_relay r
            SET published_through = (SELECT max(id) FROM e), updated_at = now()
          WHERE EXISTS (SELECT 1 FROM e)
            AND NOT EXISTS (SELECT 1 FROM credit.outbox o WHERE o.id > r.published_through)",
    )
    .bind(user_ids)
    .bind(key)
    .execute(&mut *tx)
    .await?;
    tx.commit().await
}

/// `count` new users `u1` … `u<count>` with balance 0 and no ledger rows, never refilled.
pub(crate) async fn seed_empty_users(pool: &PgPool, count: i64) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO credit.balances (user_id) SELECT 'u' || g FROM generate_series(1, $1::int8) g",
    )
    .bind(count)
    .execute(pool)
    .await?;
    Ok(())
}

/// `VACUUM ANALYZE` of the balances after a bulk load: a long-lived table is vacuumed and
/// analysed, a freshly loaded one is not yet, and the planner would guess from empty
/// statistics.
pub(crate) async fn analyze_balances(pool: &PgPool) -> Result<(), sqlx::Error> {
    sqlx::query("VACUUM ANALYZE credit.balances")
        .execute(pool)
        .await?;
    Ok(())
}

/// A `CHECKPOINT` after a bulk load, so that what the load wrote is flushed before a timed
/// run rather than during it. Needs a superuser or `pg_checkpoint`; false when refused.
pub(crate) async fn checkpoint(pool: &PgPool) -> bool {
    sqlx::query("CHECKPOINT").execute(pool).await.is_ok()
}
