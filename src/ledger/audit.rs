//! Reconciliation: for every user Σ amount = balance = the last row's running balance, seq is
//! gap-free and each row's running balance follows from the previous one; every charged
//! decision has its USAGE row, every settlement that moved credits its SETTLE row and stands
//! on its execution's decision, and each of those rows (by its key's form) a decision or
//! settlement naming it; every
//! ledger row has its balance.changed event in the outbox (from the retention horizon on, before
//! which published events may have been deleted), and every such event still kept states a
//! ledger row as it is. Events after the relays' watermark are counted as unpublished.

use serde::Serialize;
use sqlx::{PgConnection, PgPool};

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Mismatch {
    pub user_id: String,
    pub problem: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct AuditReport {
    pub users: i64,
    pub transactions: i64,
    pub decisions: i64,
    pub unpublished_events: i64,
    /// `user_id` is empty for a problem of the outbox as a whole.
    pub mismatches: Vec<Mismatch>,
    /// A check found more mismatches than it lists (each lists at most 1,000).
    pub truncated: bool,
}

impl AuditReport {
    pub fn is_clean(&self) -> bool {
        self.mismatches.is_empty()
    }
}

const BALANCES_VS_LEDGER: &str = "
SELECT b.user_id, b.balance, b.last_seq,
       coalesce(t.total, 0)::text AS total, coalesce(t.n, 0)::int8 AS n,
       coalesce(t.max_seq, 0)::int8 AS max_seq, t.last_running
  FROM credit.balances b
  LEFT JOIN LATERAL (
        SELECT sum(amount) AS total, count(*) AS n, max(seq) AS max_seq,
               (array_agg(running_balance ORDER BY seq DESC))[1] AS last_running
          FROM credit.transactions WHERE user_id = b.user_id) t ON true
 WHERE b.balance <> coalesce(t.total, 0)
    OR b.last_seq <> coalesce(t.n, 0)
    OR coalesce(t.max_seq, 0) <> coalesce(t.n, 0)
    OR (t.n > 0 AND t.last_running <> b.balance)
 ORDER BY b.user_id LIMIT 1001";

const RUNNING_CHAIN: &str = "
SELECT user_id, seq, running_balance, expected::text AS expected FROM (
  SELECT user_id, seq, running_balance,
         coalesce(lag(running_balance) OVER w, 0)::numeric + amount AS expected
    FROM credit.transactions WINDOW w AS (PARTITION BY user_id ORDER BY seq)) x
 WHERE running_balance <> expected ORDER BY user_id, seq LIMIT 1001";

const ORPHAN_ROWS: &str = "
SELECT t.user_id, t.seq FROM credit.transactions t
 WHERE NOT EXISTS (SELECT 1 FROM credit.balances b WHERE b.user_id = t.user_id)
 LIMIT 1001";

const CHARGED_WITHOUT_ROW: &str = "
SELECT d.user_id, d.node_exec_id, d.transaction_key FROM credit.decisions d
 WHERE (d.outcome = 'charged' AND NOT EXISTS (
          SELECT 1 FROM credit.transactions t
           WHERE t.user_id = d.user_id AND t.transaction_key = d.transaction_key
             AND t.type = 'USAGE' AND t.amount = -d.cost))
    OR (d.fee > 0 AND NOT EXISTS (
          SELECT 1 FROM credit.transactions t
           WHERE t.user_id = d.user_id AND t.transaction_key = d.fee_key
             AND t.type = 'USAGE' AND t.amount = -d.fee))
 LIMIT 1001";

const SETTLED_WITHOUT_ROW: &str = "
SELECT s.user_id, s.node_exec_id FROM credit.settlements s
 WHERE s.delta - s.uncollected <> 0 AND NOT EXISTS (
          SELECT 1 FROM credit.transactions t
           WHERE t.user_id = s.user_id AND t.transaction_key = s.transaction_key
             AND t.type = 'USAGE' AND t.amount = -(s.delta - s.uncollected))
 LIMIT 1001";

/// A settlement stands on its execution's decision: the same user and block, and `pre` what
/// the decision charged (its cost when charged, else 0).
const SETTLEMENT_WITHOUT_DECISION: &str = "
SELECT s.user_id, s.node_exec_id FROM credit.settlements s
  LEFT JOIN credit.decisions d ON d.node_exec_id = s.node_exec_id
 WHERE d.node_exec_id IS NULL OR d.user_id <> s.user_id OR d.block_id <> s.block_id
    OR s.pre <> CASE WHEN d.outcome = 'charged' THEN d.cost ELSE 0 END
 LIMIT 1001";

/// The other way round: a worker's row (by its key's form, and USAGE, as every row the worker
/// writes under these keys is: a credit under such a key, which callers could give before
/// the prefixes were reserved, is not the worker's) with no decision or settlement naming it,
/// such as a debit whose decision was lost. A USAGE row under another key is the library's
/// `Ledger::spend`, which has no decision, unless its metadata names a node execution, as
/// the worker's debits do: then it is a debit of an execution under a key of no decision's
/// (a second charge written by hand, say). Each part is one hashed anti-join ([`hashed`]).
const ROW_WITHOUT_DECISION: &str = "
SELECT t.user_id, t.seq FROM credit.transactions t
 WHERE t.transaction_key LIKE 'USAGE-%' AND t.type = 'USAGE' AND NOT EXISTS (
          SELECT 1 FROM credit.decisions d
           WHERE d.user_id = t.user_id AND d.transaction_key = t.transaction_key)
UNION ALL
SELECT t.user_id, t.seq FROM credit.transactions t
 WHERE t.transaction_key LIKE 'EXECUTION-FEE-%' AND t.type = 'USAGE' AND NOT EXISTS (
          SELECT 1 FROM credit.decisions d
           WHERE d.user_id = t.user_id AND d.fee_key = t.transaction_key)
UNION ALL
SELECT t.user_id, t.seq FROM credit.transactions t
 WHERE t.transaction_key LIKE 'SETTLE-%' AND t.type = 'USAGE' AND NOT EXISTS (
          SELECT 1 FROM credit.settlements s
           WHERE s.user_id = t.user_id AND s.transaction_key = t.transaction_key)
UNION ALL
SELECT t.user_id, t.seq FROM credit.transactions t
 WHERE t.type = 'USAGE' AND t.transaction_key NOT LIKE 'USAGE-%'
   AND t.transaction_key NOT LIKE 'EXECUTION-FEE-%' AND t.transaction_key NOT LIKE 'SETTLE-%'
   AND t.metadata ? 'node_exec_id'
 LIMIT 1001";

/// A REFUND row names a TOP_UP of its user (`top_up_key` in its metadata), and the refunds of
/// a purchase, up to each, never take back more than it bought.
const REFUND_WITHOUT_PURCHASE: &str = "
SELECT r.user_id, r.seq FROM (
    SELECT user_id, seq, metadata->>'top_up_key' AS top_up_key,
           sum(-amount) OVER (PARTITION BY user_id, metadata->>'top_up_key' ORDER BY seq)
               AS refunded
      FROM credit.transactions WHERE type = 'REFUND') r
 WHERE NOT EXISTS (SELECT 1 FROM credit.transactions t
                    WHERE t.user_id = r.user_id AND t.transaction_key = r.top_up_key
                      AND t.type = 'TOP_UP' AND t.amount >= r.refunded)
 LIMIT 1001";

/// A ledger row's event is a row of its own (found by event_id) or an element of a run of
/// events (migration 0009), whose ids are read out of the runs. Its id is the one of
/// migrations 0013 and 0017 (`id_now`) or, for a row written before them, the one it had
/// then: the unbounded one of 0013 (`id_0013`), or the one with the user id as it is, from
/// before 0013 (`id_raw`). Each is looked up by equality, so each lookup is one hashed
/// anti-join. Rows stamped before the retention horizon (migration 0011) are not looked at:
/// their events may have been deleted once published. Events are stamped with their row's
/// time; the minute's margin covers rows written before that, whose events were stamped with
/// their transaction's start. Run [`hashed`].
const ROW_WITHOUT_EVENT: &str = "
WITH ids AS (
    SELECT event_id AS id FROM credit.outbox WHERE routing_key = 'balance.changed'
    UNION ALL
    SELECT e->>'event_id' FROM credit.outbox o, json_array_elements(o.run) e
     WHERE o.events > 1 AND o.routing_key = 'balance.changed')
SELECT t.user_id, t.seq
  FROM (SELECT user_id, seq, transaction_key,
               credit.balance_changed_id(user_id, transaction_key) AS id_now,
               'balance.changed:' || credit.event_user(user_id) || ':' || transaction_key
                   AS id_0013,
               'balance.changed:' || user_id || ':' || transaction_key AS id_raw
          FROM credit.transactions
         WHERE created_at >= (SELECT pruned_before FROM credit.outbox_relay)
                             + interval '1 minute') t
 WHERE NOT EXISTS (SELECT 1 FROM ids WHERE ids.id = t.id_now)
   AND NOT EXISTS (SELECT 1 FROM ids WHERE ids.id = t.id_0013)
   AND NOT EXISTS (SELECT 1 FROM ids WHERE ids.id = t.id_raw)
 LIMIT 1001";

/// The other way round: every `balance.changed` event still in the outbox (one in `payload`,
/// or a run in `run`, migration 0009) states a ledger row as it is: its user, seq, amount,
/// balance after it, type and key. Ledger rows are never deleted, so no horizon applies.
const EVENT_WITHOUT_ROW: &str = "
WITH events AS (
    SELECT payload AS e FROM credit.outbox WHERE events = 1 AND routing_key = 'balance.changed'
    UNION ALL
    SELECT e FROM credit.outbox o, json_array_elements(o.run) e
     WHERE o.events > 1 AND o.routing_key = 'balance.changed')
SELECT coalesce(e->>'user_id', '?') AS user_id, coalesce(e->>'event_id', '?') AS event_id
  FROM events
 WHERE NOT EXISTS (
       SELECT 1 FROM credit.transactions t
        WHERE t.user_id = e->>'user_id' AND t.seq = (e->>'seq')::int8
          AND t.amount = (e->>'amount')::int8 AND t.running_balance = (e->>'balance')::int8
          AND t.type::text = e->>'transaction_type' AND t.transaction_key = e->>'transaction_key')
 LIMIT 1001";

/// What the relays' state hides: a watermark past the last outbox id ever drawn (each event
/// written after it would count as published and never go out), or a retention horizon
/// further ahead of now than clock skew explains (no ledger row before it is checked for its
/// event, and the pruner only ever moves it on).
const RELAY_STATE: &str = "
SELECT published_through, pruned_before > now() + interval '1 hour' AS horizon_ahead,
       pruned_before::text AS pruned_before
  FROM credit.outbox_relay";

/// The most mismatches each check lists; its query asks for one more, to tell when there
/// are more.
const CHECK_LIMIT: usize = 1000;

const COUNTS: &str = "SELECT (SELECT count(*) FROM credit.balances) AS users,
       (SELECT count(*) FROM credit.transactions) AS transactions,
       (SELECT count(*) FROM credit.decisions) AS decisions,
       (SELECT coalesce(sum(events), 0)::int8 FROM credit.outbox
         WHERE id > (SELECT published_through FROM credit.outbox_relay)) AS unpublished";

#[derive(sqlx::FromRow)]
struct BalanceMismatch {
    user_id: String,
    balance: i64,
    last_seq: i64,
    /// Exact (text of a numeric): a corrupt ledger's sum may be past an i64.
    total: String,
    n: i64,
    max_seq: i64,
    last_running: Option<i64>,
}

#[derive(sqlx::FromRow)]
struct ChainBreak {
    user_id: String,
    seq: i64,
    running_balance: i64,
    /// Exact (text of a numeric), as `total` above.
    expected: String,
}

/// A ledger row (`seq`) or a decision (`node_exec_id`) missing its counterpart.
#[derive(sqlx::FromRow)]
struct Orphan {
    user_id: String,
    #[sqlx(default)]
    seq: i64,
    #[sqlx(default)]
    node_exec_id: String,
    #[sqlx(default)]
    event_id: String,
}

#[derive(sqlx::FromRow)]
struct RelayState {
    published_through: i64,
    /// [`super::store::last_outbox_id`].
    #[sqlx(skip)]
    last_id: i64,
    horizon_ahead: bool,
    pruned_before: String,
}

impl RelayState {
    /// The mismatches of the outbox as a whole (no user's: `user_id` is empty).
    fn problems(&self) -> Vec<Mismatch> {
        let mut out = Vec::new();
        if self.published_through > self.last_id {
            out.push(format!(
                "the relays' watermark {} is past the last outbox id drawn, {}: events \
                 written until the outbox's ids pass it are taken as published and never sent",
                self.published_through, self.last_id
            ));
        }
        if self.horizon_ahead {
            out.push(format!(
                "the outbox's retention horizon {} is in the future: no ledger row before it \
                 is checked for its event",
                self.pruned_before
            ));
        }
        out.into_iter()
            .map(|problem| Mismatch {
                user_id: String::new(),
                problem,
            })
            .collect()
    }
}

#[derive(sqlx::FromRow)]
struct Counts {
    users: i64,
    transactions: i64,
    decisions: i64,
    unpublished: i64,
}

async fn orphans(
    conn: &mut PgConnection,
    sql: &str,
    problem: impl Fn(&Orphan) -> String,
) -> Result<Vec<Mismatch>, sqlx::Error> {
    let rows: Vec<Orphan> = sqlx::query_as(sql).fetch_all(&mut *conn).await?;
    Ok(rows
        .iter()
        .map(|r| Mismatch {
            user_id: r.user_id.clone(),
            problem: problem(r),
        })
        .collect())
}

/// [`orphans`] for a query whose anti-joins have no index to look up (`ROW_WITHOUT_DECISION`,
/// `ROW_WITHOUT_EVENT`), planned without nested loops: on tables whose statistics are stale
/// (a restored or bulk-loaded ledger that autovacuum has not analysed yet) the planner may
/// otherwise rescan the inner table for each row, hours on millions of rows.
async fn hashed(
    conn: &mut PgConnection,
    sql: &str,
    problem: impl Fn(&Orphan) -> String,
) -> Result<Vec<Mismatch>, sqlx::Error> {
    sqlx::query("SET LOCAL enable_nestloop = off")
        .execute(&mut *conn)
        .await?;
    let found = orphans(&mut *conn, sql, problem).await?;
    sqlx::query("SET LOCAL enable_nestloop = on")
        .execute(&mut *conn)
        .await?;
    Ok(found)
}

pub async fn run(pool: &PgPool) -> Result<AuditReport, sqlx::Error> {
    // One snapshot for every check.
    let mut tx = super::store::long_read(pool).await?;
    let report = checks(&mut tx).await?;
    tx.rollback().await?;
    Ok(report)
}

/// Mismatches found so far, and whether a check found more than it returns.
#[derive(Default)]
struct Found {
    mismatches: Vec<Mismatch>,
    truncated: bool,
}

impl Found {
    fn add(&mut self, mut found: Vec<Mismatch>) {
        if found.len() > CHECK_LIMIT {
            found.truncate(CHECK_LIMIT);
            self.truncated = true;
        }
        self.mismatches.extend(found);
    }
}

async fn checks(conn: &mut PgConnection) -> Result<AuditReport, sqlx::Error> {
    let mut found = Found::default();
    found.add(balances_vs_ledger(&mut *conn).await?);
    found.add(running_chain(&mut *conn).await?);
    found.add(
        orphans(&mut *conn, ORPHAN_ROWS, |r| {
            format!("seq {} has no balance row", r.seq)
        })
        .await?,
    );
    links(&mut *conn, &mut found).await?;
    let mut relay: RelayState = sqlx::query_as(RELAY_STATE).fetch_one(&mut *conn).await?;
    relay.last_id = super::store::last_outbox_id(&mut *conn).await?;
    found.add(relay.problems());
    let c: Counts = sqlx::query_as(COUNTS).fetch_one(&mut *conn).await?;
    Ok(AuditReport {
        users: c.users,
        transactions: c.transactions,
        decisions: c.decisions,
        unpublished_events: c.unpublished,
        mismatches: found.mismatches,
        truncated: found.truncated,
    })
}

/// What ties the ledger's rows to decisions, settlements, purchases and events.
async fn links(conn: &mut PgConnection, found: &mut Found) -> Result<(), sqlx::Error> {
    found.add(
        orphans(&mut *conn, CHARGED_WITHOUT_ROW, |r| {
            format!("decision {} has no matching USAGE row", r.node_exec_id)
        })
        .await?,
    );
    found.add(
        orphans(&mut *conn, SETTLED_WITHOUT_ROW, |r| {
            format!("settlement {} has no matching SETTLE row", r.node_exec_id)
        })
        .await?,
    );
    found.add(
        orphans(&mut *conn, SETTLEMENT_WITHOUT_DECISION, |r| {
            let id = &r.node_exec_id;
            format!("settlement {id} does not match its decision (none, or another user, block or charge)")
        })
        .await?,
    );
    found.add(
        hashed(&mut *conn, ROW_WITHOUT_DECISION, |r| {
            format!(
                "seq {} (USAGE) has no decision or settlement naming it",
                r.seq
            )
        })
        .await?,
    );
    found.add(
        orphans(&mut *conn, REFUND_WITHOUT_PURCHASE, |r| {
            let seq = r.seq;
            format!("seq {seq} (REFUND) names no TOP_UP of the user with that much to refund")
        })
        .await?,
    );
    found.add(
        hashed(&mut *conn, ROW_WITHOUT_EVENT, |r| {
            format!("seq {} has no balance.changed event", r.seq)
        })
        .await?,
    );
    found.add(
        orphans(&mut *conn, EVENT_WITHOUT_ROW, |r| {
            let id = &r.event_id;
            format!("event {id} matches no ledger row (user, seq, amount, balance, type and key)")
        })
        .await?,
    );
    Ok(())
}

async fn balances_vs_ledger(conn: &mut PgConnection) -> Result<Vec<Mismatch>, sqlx::Error> {
    let rows: Vec<BalanceMismatch> = sqlx::query_as(BALANCES_VS_LEDGER)
        .fetch_all(&mut *conn)
        .await?;
    Ok(rows
        .into_iter()
        .map(|r| Mismatch {
            problem: format!(
                "balance {} / last_seq {} vs ledger sum {} over {} rows (max seq {}, last running balance {})",
                r.balance,
                r.last_seq,
                r.total,
                r.n,
                r.max_seq,
                r.last_running.map_or_else(|| "none".to_owned(), |v| v.to_string()),
            ),
            user_id: r.user_id,
        })
        .collect())
}

async fn running_chain(conn: &mut PgConnection) -> Result<Vec<Mismatch>, sqlx::Error> {
    let rows: Vec<ChainBreak> = sqlx::query_as(RUNNING_CHAIN).fetch_all(&mut *conn).await?;
    Ok(rows
        .into_iter()
        .map(|r| Mismatch {
            problem: format!(
                "seq {}: running balance {} but previous + amount = {}",
                r.seq, r.running_balance, r.expected
            ),
            user_id: r.user_id,
        })
        .collect())
}
