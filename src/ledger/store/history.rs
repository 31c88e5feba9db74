//! A user's history, a page at a time, newest first.

use futures::TryStreamExt as _;
use sqlx::PgPool;

use crate::ledger::{HistoryPage, HistoryQuery, PageBuilder, TxType};

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
