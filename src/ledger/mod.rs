//! The only writer of balances and ledger rows. Each operation is one database transaction
//! that locks the user's balance row, applies the lazy monthly refill when due, posts the
//! rows, and writes their outbox events. Keys make every write idempotent.

pub(crate) mod account;
pub mod audit;
pub mod decision;
pub mod identity;
pub mod month;
pub(crate) mod privileges;
pub(crate) mod refund;
pub mod report;
pub mod retention;
pub(crate) mod runs;
pub mod seed;
pub(crate) mod store;
pub mod sweep;
pub(crate) mod total;

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::{json, Value};
use sqlx::PgPool;

#[cfg(test)]
pub(crate) use account::NewTransaction;
pub(crate) use account::{Account, Changes, Entry};
pub use account::{AccountView, AutoTopUpView, DebtTooDeep, RefillPolicy, RequestView};
pub use decision::Outcome;
pub(crate) use decision::{
    DecisionRecord, EarlierDecision, EarlierSettlement, NewDecision, NewSettlement,
};
pub use month::{Month, MonthError};
pub(crate) use sweep::sweep_exclusive;
pub use sweep::{sweep, sweep_asked, SweepReport, Sweeper};

use crate::clock::Stamp;
use crate::events::ExecutionRef;

/// User ids and node execution ids: at most this many bytes.
pub(crate) const MAX_USER_ID_BYTES: usize = 255;
pub(crate) const MAX_KEY_BYTES: usize = 512;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum TxType {
    /// A purchase (`top_up`, an auto top-up's fulfilment): credit in.
    TopUp,
    /// A block's run: its pre-flight debit, a completion-first charge, the execution fee, and
    /// a settlement (`SETTLE-…`), which is credit back (amount > 0) when the run cost less.
    Usage,
    /// Credits given: the monthly refill, `grant`.
    Grant,
    /// A purchase given back (`refund`): credit out.
    Refund,
}

impl TxType {
    pub(crate) const ALL: [TxType; 4] =
        [TxType::TopUp, TxType::Usage, TxType::Grant, TxType::Refund];

    pub fn as_str(self) -> &'static str {
        match self {
            TxType::TopUp => "TOP_UP",
            TxType::Usage => "USAGE",
            TxType::Grant => "GRANT",
            TxType::Refund => "REFUND",
        }
    }
}

/// The type named `name` (`TOP_UP`, `USAGE`, `GRANT`, `REFUND`); the error lists them.
impl std::str::FromStr for TxType {
    type Err = String;

    fn from_str(name: &str) -> Result<TxType, String> {
        TxType::ALL
            .into_iter()
            .find(|t| t.as_str() == name)
            .ok_or_else(|| {
                let names: Vec<&str> = TxType::ALL.iter().map(|t| t.as_str()).collect();
                format!("expected one of {}, got {name:?}", names.join(", "))
            })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    /// The message names the field (`amount`, `threshold`).
    #[error("{0}")]
    AmountOutOfRange(String),
    #[error("amount: balance {balance} of user {user_id} + {amount} overflows a 64-bit integer")]
    Overflow {
        user_id: String,
        balance: i64,
        amount: i64,
    },
    #[error(
        "refill: target {target} − balance {balance} of user {user_id} overflows a 64-bit \
         integer; a top-up must reduce the debt first"
    )]
    RefillOverflow {
        user_id: String,
        balance: i64,
        target: i64,
    },
    #[error("insufficient balance: user {user_id} has {balance}, needs {needed}")]
    InsufficientBalance {
        user_id: String,
        balance: i64,
        needed: i64,
    },
    #[error("{field}: {reason}")]
    InvalidArgument { field: &'static str, reason: String },
    /// What the request names is not there (the message names the field).
    #[error("{0}")]
    NotFound(String),
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
}

impl LedgerError {
    /// Whether trying again later can succeed: a transient fault (connection lost, deadlock),
    /// or a fault of the database's set-up (SQLSTATE class 42), which an operator fixes.
    /// Anything else fails the same way however often it is tried.
    pub(crate) fn may_clear(&self) -> bool {
        matches!(self, LedgerError::Db(e) if Self::may_clear_db(e))
    }

    /// [`Self::may_clear`] of a database error.
    pub(crate) fn may_clear_db(e: &sqlx::Error) -> bool {
        crate::db::is_transient(e) || crate::db::is_setup_fault(e)
    }
}

/// A ledger row found under a key: its type, amount and seq.
type KeyedRow = (String, i64, i64);

/// One user's account locked in a transaction of its own ([`Ledger::lock_one`]), and what
/// is to be posted on it.
struct OneAccount {
    tx: sqlx::Transaction<'static, sqlx::Postgres>,
    /// The operation's time, read once the row was held.
    at: DateTime<Utc>,
    accounts: std::collections::HashMap<String, Account>,
    changes: Changes,
}

impl OneAccount {
    /// The locked account of `user_id`, and the changes posted so far.
    fn parts(&mut self, user_id: &str) -> Result<(&mut Account, &mut Changes), LedgerError> {
        let account = self
            .accounts
            .get_mut(user_id)
            .ok_or(sqlx::Error::RowNotFound)?;
        Ok((account, &mut self.changes))
    }

    /// Writes what was posted (the lazy refill too) and commits.
    async fn commit(mut self) -> Result<(), LedgerError> {
        store::flush(&mut self.tx, self.accounts.values(), &self.changes, self.at).await?;
        self.tx.commit().await?;
        self.changes.count_refills();
        Ok(())
    }
}

/// The result of a credit or debit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Posting {
    pub user_id: String,
    /// False when the key already existed: nothing changed.
    pub applied: bool,
    pub balance: i64,
    pub transaction_key: String,
    /// The ledger row's `seq` (the existing row's when nothing changed).
    pub seq: i64,
}

/// A user's auto top-up after `auto_top_up`: `threshold` and `amount` null when off.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AutoTopUp {
    pub user_id: String,
    pub threshold: Option<i64>,
    pub amount: Option<i64>,
    /// A `top_up.requested` was published now.
    pub requested: bool,
}

/// One ledger row as read back.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct Transaction {
    pub seq: i64,
    pub transaction_key: String,
    #[serde(rename = "type")]
    #[sqlx(rename = "type")]
    pub tx_type: String,
    pub amount: i64,
    pub running_balance: i64,
    pub created_at: DateTime<Utc>,
    pub metadata: Value,
}

/// The most rows one history page returns.
pub(crate) const MAX_HISTORY_LIMIT: i64 = 1000;
pub(crate) const DEFAULT_HISTORY_LIMIT: i64 = 50;

/// Which ledger rows of a user a history page holds: keyset paging on `seq`, newest first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryQuery {
    /// 1..=[`MAX_HISTORY_LIMIT`] rows.
    pub limit: i64,
    /// Only rows with `seq < before_seq` (≥ 1): the previous page's `next_before_seq`.
    pub before_seq: Option<i64>,
    pub tx_type: Option<TxType>,
    /// Only rows whose `metadata.graph_exec_id` is this.
    pub graph_exec_id: Option<String>,
}

impl Default for HistoryQuery {
    fn default() -> Self {
        HistoryQuery {
            limit: DEFAULT_HISTORY_LIMIT,
            before_seq: None,
            tx_type: None,
            graph_exec_id: None,
        }
    }
}

impl HistoryQuery {
    /// The newest `limit` rows, unfiltered.
    pub fn newest(limit: i64) -> Self {
        HistoryQuery {
            limit,
            ..HistoryQuery::default()
        }
    }

    /// Refuses a limit or cursor out of range, naming the field.
    pub fn check(&self) -> Result<(), LedgerError> {
        if !(1..=MAX_HISTORY_LIMIT).contains(&self.limit) {
            return Err(LedgerError::InvalidArgument {
                field: "limit",
                reason: format!("must be between 1 and {MAX_HISTORY_LIMIT}"),
            });
        }
        if self.before_seq.is_some_and(|s| s < 1) {
            return Err(LedgerError::InvalidArgument {
                field: "before_seq",
                reason: "must be at least 1".into(),
            });
        }
        Ok(())
    }
}

/// The most a history page holds, in bytes of its rows' JSON (a first row longer than that
/// comes alone). Rows carry
/// metadata of any length (a grant's reason, a settlement's stats), and a page of 1,000 long
/// ones would make a control reply larger than the broker accepts (RabbitMQ 4's default
/// `max_message_size` is 16 MiB): it refuses one by closing the channel, and the command, never
/// acked, comes back for ever. A page cut short by it says where the next one starts.
pub const HISTORY_PAGE_BYTES: usize = 4 << 20;

/// A history page built from its rows as they are read, newest first: at most `limit` rows,
/// and no more than `budget` bytes of their JSON unless the first alone is more. The row after
/// the page tells that another page follows; none after it need be read.
pub(crate) struct PageBuilder {
    limit: usize,
    budget: usize,
    rows: Vec<Transaction>,
    bytes: usize,
    more: bool,
}

impl PageBuilder {
    pub(crate) fn new(limit: usize, budget: usize) -> Self {
        PageBuilder {
            limit,
            budget,
            rows: Vec::new(),
            bytes: 0,
            more: false,
        }
    }

    /// Takes the next row; false once the page is complete.
    pub(crate) fn push(&mut self, t: Transaction) -> bool {
        let json = serde_json::to_vec(&t).map_or(usize::MAX, |v| v.len());
        let bytes = self.bytes.saturating_add(json);
        if self.rows.len() >= self.limit || (bytes > self.budget && !self.rows.is_empty()) {
            self.more = true;
            return false;
        }
        self.bytes = bytes;
        self.rows.push(t);
        true
    }

    pub(crate) fn finish(self) -> HistoryPage {
        let next_before_seq = self.rows.last().filter(|_| self.more).map(|t| t.seq);
        HistoryPage {
            transactions: self.rows,
            next_before_seq,
        }
    }
}

/// One page of history: `next_before_seq` continues it, `None` on the last page.
#[derive(Debug, Clone, Serialize)]
pub struct HistoryPage {
    pub transactions: Vec<Transaction>,
    pub next_before_seq: Option<i64>,
}

/// What the ledger needs from the configuration.
#[derive(Debug, Clone, Copy)]
pub struct LedgerPolicy {
    /// `Some` when refills are enabled.
    pub refill: Option<RefillPolicy>,
    /// Refill lazily on a user's first operation of a month.
    pub lazy_refill: bool,
    pub low_balance_threshold: i64,
    /// How long an auto top-up request stays outstanding before another may be made.
    pub auto_top_up_ttl: chrono::Duration,
}

impl LedgerPolicy {
    /// The refill to apply before an operation at `at`, if any.
    pub fn lazy(&self, at: DateTime<Utc>) -> Option<(RefillPolicy, Month)> {
        match self.refill {
            Some(p) if self.refills_lazily() => Some((p, Month::of(at))),
            _ => None,
        }
    }

    /// Whether an operation on a user may refill them first, whatever the month.
    fn refills_lazily(&self) -> bool {
        self.lazy_refill && self.refill.is_some()
    }
}

/// Handle to the ledger.
#[derive(Clone)]
pub struct Ledger {
    pool: PgPool,
    policy: LedgerPolicy,
}

pub(crate) fn check_user_id(user_id: &str) -> Result<(), LedgerError> {
    check_id("user_id", user_id)
}

pub(crate) fn check_node_exec_id(node_exec_id: &str) -> Result<(), LedgerError> {
    check_id("node_exec_id", node_exec_id)
}

/// An id as the ledger keeps them: 1 to [`MAX_USER_ID_BYTES`] bytes, no NUL.
fn check_id(field: &'static str, id: &str) -> Result<(), LedgerError> {
    if id.is_empty() || id.len() > MAX_USER_ID_BYTES {
        return Err(LedgerError::InvalidArgument {
            field,
            reason: format!("must be 1 to {MAX_USER_ID_BYTES} bytes"),
        });
    }
    if id.contains('\0') {
        return Err(LedgerError::InvalidArgument {
            field,
            reason: "contains a NUL character".into(),
        });
    }
    Ok(())
}

fn check_key(key: &str) -> Result<(), LedgerError> {
    if key.is_empty() || key.len() > MAX_KEY_BYTES {
        return Err(LedgerError::InvalidArgument {
            field: "key",
            reason: format!("must be 1 to {MAX_KEY_BYTES} bytes"),
        });
    }
    if key.contains('\0') {
        return Err(LedgerError::InvalidArgument {
            field: "key",
            reason: "contains a NUL character".into(),
        });
    }
    Ok(())
}

/// Prefixes of the keys of an unkeyed credit named by its message's id ([`message_key`]).
const MESSAGE_KEY_PREFIXES: [&str; 2] = ["TOP-UP-MSG-", "GRANT-MSG-"];

/// Prefixes of the keys the worker gives its own ledger rows (a charge, a settlement, an
/// execution fee, a monthly refill, a credit keyed by its message). A credit under one of them
/// would pass for that row: the row written later collides with it, or the credit is taken
/// for an earlier attempt of itself.
const RESERVED_KEY_PREFIXES: [&str; 6] = [
    "USAGE-",
    "SETTLE-",
    "EXECUTION-FEE-",
    month::REFILL_KEY_PREFIX,
    MESSAGE_KEY_PREFIXES[0],
    MESSAGE_KEY_PREFIXES[1],
];

/// A credit's key: a caller's, which may not take the form of the worker's own, or one the
/// worker made.
enum CreditKey {
    Callers(String),
    Own(String),
}

/// The key of a `TOP_UP` or `GRANT` that came without one, in message `message_id` of broker
/// user `sender`: a redelivery of that message finds it. The sender's length comes first, so
/// that no two (sender, id) pairs make one key (`ops` + `x-1`, `ops-x` + `1`).
pub(crate) fn message_key(tx_type: TxType, sender: &str, message_id: &str) -> String {
    let prefix = match tx_type {
        TxType::Grant => MESSAGE_KEY_PREFIXES[1],
        _ => MESSAGE_KEY_PREFIXES[0],
    };
    format!("{prefix}{}:{sender}-{message_id}", sender.len())
}

/// Refuses a caller's key for a credit (or a debit) that has the form of one of the worker's
/// own keys.
fn check_credit_key(key: &str) -> Result<(), LedgerError> {
    match RESERVED_KEY_PREFIXES.iter().find(|p| key.starts_with(*p)) {
        Some(prefix) => Err(LedgerError::InvalidArgument {
            field: "key",
            reason: format!("the prefix {prefix} is reserved for the worker's own ledger rows"),
        }),
        None => Ok(()),
    }
}

/// Refuses a key already used for a ledger row of another type or amount: a key names one
/// posting, and a request that reuses it for a different one is a caller's mistake that
/// answering "already applied" would hide. `amount` is signed as in the ledger.
fn check_key_reuse(
    key: &str,
    (row_type, row_amount): (&str, i64),
    (tx_type, amount): (TxType, i64),
) -> Result<(), LedgerError> {
    if row_type == tx_type.as_str() && row_amount == amount {
        return Ok(());
    }
    Err(LedgerError::InvalidArgument {
        field: "key",
        reason: format!(
            "{key} already names a {row_type} of {} credits; this request is a {} of {}: \
             give it a key of its own",
            row_amount.unsigned_abs(),
            tx_type.as_str(),
            amount.unsigned_abs()
        ),
    })
}

impl Ledger {
    pub fn new(pool: PgPool, policy: LedgerPolicy) -> Self {
        Ledger { pool, policy }
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    pub fn policy(&self) -> &LedgerPolicy {
        &self.policy
    }

    /// Runs `op` on the locked account of `user_id` (lazy refill applied first) and commits
    /// whatever it posted. An error from `op` rolls everything back, the refill included.
    async fn with_account<T>(
        &self,
        user_id: &str,
        at: &dyn Stamp,
        op: impl FnOnce(&mut Account, &mut Changes, DateTime<Utc>) -> Result<T, LedgerError>,
    ) -> Result<T, LedgerError> {
        self.with_account_key(user_id, None, at, |a, c, _, at| op(a, c, at))
            .await
    }

    /// [`Ledger::with_account`] that also gives `op` the type, amount and seq of the user's
    /// row under `key`, if there is one. The key is looked up under the balance-row lock, so two
    /// identical requests cannot both see it missing.
    async fn with_account_key<T>(
        &self,
        user_id: &str,
        key: Option<&str>,
        at: &dyn Stamp,
        op: impl FnOnce(
            &mut Account,
            &mut Changes,
            Option<KeyedRow>,
            DateTime<Utc>,
        ) -> Result<T, LedgerError>,
    ) -> Result<T, LedgerError> {
        let mut one = self.lock_one(user_id, at).await?;
        let found = match key {
            Some(k) => store::keyed_row(&mut one.tx, user_id, k).await?,
            None => None,
        };
        let at = one.at;
        let (account, changes) = one.parts(user_id)?;
        let out = op(account, changes, found, at)?;
        one.commit().await?;
        Ok(out)
    }

    /// Locks `user_id`'s account in a transaction of its own, takes the time from `at` once
    /// it holds the row (so the rows it writes are stamped after those of a writer it waited
    /// for), and applies the month's lazy refill; [`OneAccount::commit`] writes what is
    /// posted on it.
    async fn lock_one(&self, user_id: &str, at: &dyn Stamp) -> Result<OneAccount, LedgerError> {
        check_user_id(user_id)?;
        let users = [user_id.to_owned()];
        let (tx, accounts) = store::begin_locked(&self.pool, &users).await?;
        let at = at.stamp();
        let mut one = OneAccount {
            tx,
            at,
            accounts,
            changes: Changes::default(),
        };
        let (account, changes) = one.parts(user_id)?;
        account.refill_lazily(changes, self.policy.lazy(at), at)?;
        Ok(one)
    }

    /// Adds credits (`TOP_UP` or `GRANT`). The same key again changes nothing.
    pub async fn credit(
        &self,
        tx_type: TxType,
        user_id: &str,
        amount: i64,
        key: Option<&str>,
        reason: Option<&str>,
        at: impl Stamp,
    ) -> Result<Posting, LedgerError> {
        let key = match key {
            Some(k) => CreditKey::Callers(k.to_owned()),
            None => CreditKey::Own(generated_key(tx_type)),
        };
        self.credit_under(tx_type, user_id, amount, key, reason, &at)
            .await
    }

    /// Takes back `amount` (> 0) of the purchase under `top_up_key` as a REFUND row under
    /// `key` (the payment side's refund or dispute id): the same key again changes nothing.
    /// The balance may fall below 0 (the credits may have been spent). A crossing of the
    /// low-balance threshold sends `balance.low`, as any debit's does; no auto top-up is
    /// requested for it (that would charge the customer who was just refunded again).
    pub async fn refund(
        &self,
        user_id: &str,
        amount: i64,
        (key, top_up_key): (&str, &str),
        reason: Option<&str>,
        at: impl Stamp,
    ) -> Result<Posting, LedgerError> {
        refund::check_request(amount, key, top_up_key)?;
        let mut one = self.lock_one(user_id, &at).await?;
        let at = one.at;
        let (applied, seq) = match store::refund_row(&mut one.tx, user_id, key).await? {
            Some((row_type, row_amount, seq, named)) => {
                check_key_reuse(key, (&row_type, row_amount), (TxType::Refund, -amount))?;
                refund::check_same_purchase(key, named.as_deref(), top_up_key)?;
                (false, seq)
            }
            None => {
                let bought = store::purchase(&mut one.tx, user_id, top_up_key).await?;
                let purchase = refund::Purchase {
                    key: top_up_key,
                    row: bought.as_ref().map(|(t, a, _)| (t.as_str(), *a)),
                    refunded: bought.as_ref().map_or(0, |(_, _, refunded)| *refunded),
                };
                refund::check_refund(&purchase, amount)?;
                let refund = (key, top_up_key, reason);
                let (account, changes) = one.parts(user_id)?;
                let seq = self.post_refund(account, changes, amount, refund, at)?;
                (true, seq)
            }
        };
        let out = Posting {
            user_id: user_id.to_owned(),
            applied,
            balance: one.parts(user_id)?.0.balance,
            transaction_key: key.to_owned(),
            seq,
        };
        // Also when nothing was refunded: the month's lazy refill, if this brought it, stays.
        one.commit().await?;
        Ok(out)
    }

    /// Appends a checked refund's REFUND row (and a `balance.low` where it crosses the
    /// threshold); returns its `seq`.
    fn post_refund(
        &self,
        account: &mut Account,
        changes: &mut Changes,
        amount: i64,
        (key, top_up_key, reason): (&str, &str, Option<&str>),
        at: DateTime<Utc>,
    ) -> Result<i64, LedgerError> {
        let mut metadata = json!({ "top_up_key": top_up_key });
        if let Some(r) = reason {
            metadata["reason"] = r.into();
        }
        let entry = Entry {
            tx_type: TxType::Refund,
            key: key.to_owned(),
            amount: -amount,
            metadata,
            exec: ExecutionRef::default(),
            at,
        };
        let before = account.balance;
        let seq = account.post_debt(changes, entry)?;
        let threshold = self.policy.low_balance_threshold;
        changes
            .events
            .extend(account.low_balance_crossing(before, seq, threshold, at));
        Ok(seq)
    }

    /// [`Ledger::credit`] without a key, in message `message_id` of broker user `sender`:
    /// keyed by [`message_key`], so that a redelivery of the message changes nothing.
    pub(crate) async fn credit_of_message(
        &self,
        tx_type: TxType,
        user_id: &str,
        amount: i64,
        (sender, message_id): (&str, &str),
        reason: Option<&str>,
        at: impl Stamp,
    ) -> Result<Posting, LedgerError> {
        let key = CreditKey::Own(message_key(tx_type, sender, message_id));
        self.credit_under(tx_type, user_id, amount, key, reason, &at)
            .await
    }

    async fn credit_under(
        &self,
        tx_type: TxType,
        user_id: &str,
        amount: i64,
        key: CreditKey,
        reason: Option<&str>,
        at: &dyn Stamp,
    ) -> Result<Posting, LedgerError> {
        if !matches!(tx_type, TxType::TopUp | TxType::Grant) {
            return Err(LedgerError::InvalidArgument {
                field: "type",
                reason: "credits are TOP_UP or GRANT".into(),
            });
        }
        if amount <= 0 {
            return Err(LedgerError::AmountOutOfRange(format!(
                "amount: {amount} must be greater than 0"
            )));
        }
        let key = match key {
            CreditKey::Callers(k) => {
                check_key(&k)?;
                check_credit_key(&k)?;
                k
            }
            CreditKey::Own(k) => {
                check_key(&k)?;
                k
            }
        };
        let metadata = match reason {
            Some(r) => json!({ "reason": r }),
            None => json!({}),
        };
        self.post_keyed(user_id, tx_type, key, amount, metadata, at)
            .await
    }

    /// Debits `amount` (> 0) as `USAGE` under `key`; refuses to go below 0.
    pub async fn spend(
        &self,
        user_id: &str,
        amount: i64,
        key: &str,
        metadata: Value,
        at: impl Stamp,
    ) -> Result<Posting, LedgerError> {
        if amount <= 0 {
            return Err(LedgerError::AmountOutOfRange(format!(
                "amount: {amount} must be greater than 0"
            )));
        }
        check_key(key)?;
        check_credit_key(key)?;
        self.post_keyed(
            user_id,
            TxType::Usage,
            key.to_owned(),
            -amount,
            metadata,
            &at,
        )
        .await
    }

    async fn post_keyed(
        &self,
        user_id: &str,
        tx_type: TxType,
        key: String,
        amount: i64,
        metadata: Value,
        at: &dyn Stamp,
    ) -> Result<Posting, LedgerError> {
        let threshold = self.policy.low_balance_threshold;
        let ttl = self.policy.auto_top_up_ttl;
        let lookup = key.clone();
        self.with_account_key(user_id, Some(&lookup), at, |account, changes, row, at| {
            if let Some((row_type, row_amount, _)) = &row {
                check_key_reuse(&lookup, (row_type, *row_amount), (tx_type, amount))?;
            }
            // Only a new posting: the same request again answers as it always did.
            if row.is_none() && !account.may_use_key(&lookup, tx_type) {
                return Err(LedgerError::InvalidArgument {
                    field: "key",
                    reason: format!(
                        "{lookup} has the form of an auto top-up request's id, and no such \
                         request was made for {user_id}: only its fulfilment (a top_up or \
                         grant) may carry it"
                    ),
                });
            }
            let found = row.is_some();
            let seq = match row {
                Some((_, _, seq)) => seq,
                None => {
                    let before = account.balance;
                    let entry = Entry {
                        tx_type,
                        key: key.clone(),
                        amount,
                        metadata,
                        exec: ExecutionRef::default(),
                        at,
                    };
                    let seq = account.post(changes, entry)?;
                    changes
                        .events
                        .extend(account.low_balance_crossing(before, seq, threshold, at));
                    if amount < 0 {
                        account.request_top_up(changes, ttl, at);
                    }
                    seq
                }
            };
            Ok(Posting {
                user_id: user_id.to_owned(),
                applied: !found,
                balance: account.balance,
                transaction_key: key,
                seq,
            })
        })
        .await
    }

    /// The balance; with lazy refill on, this is the first operation of the month for a user
    /// and may grant (a brand-new user starts at the target).
    pub async fn balance(&self, user_id: &str, at: impl Stamp) -> Result<i64, LedgerError> {
        if self.policy.refills_lazily() {
            return self
                .with_account(user_id, &at, |a, _, _| Ok(a.balance))
                .await;
        }
        check_user_id(user_id)?;
        Ok(store::read_balance(&self.pool, user_id).await?)
    }

    /// The account as it stands: read only, so neither created nor refilled (an account not
    /// yet used this month shows its balance before the month's refill). `not_found` for a
    /// user with no account.
    pub async fn account(
        &self,
        user_id: &str,
        now: DateTime<Utc>,
    ) -> Result<AccountView, LedgerError> {
        check_user_id(user_id)?;
        let account = store::read_account(&self.pool, user_id).await?;
        let account = account
            .ok_or_else(|| LedgerError::NotFound(format!("user_id: no account for {user_id:?}")))?;
        Ok(account.view(self.policy.auto_top_up_ttl, now))
    }

    /// One page of a user's ledger rows, newest first (see [`HistoryQuery`]).
    pub async fn history(
        &self,
        user_id: &str,
        query: &HistoryQuery,
        at: impl Stamp,
    ) -> Result<HistoryPage, LedgerError> {
        query.check()?;
        if self.policy.refills_lazily() {
            self.with_account(user_id, &at, |_, _, _| Ok(())).await?;
        } else {
            check_user_id(user_id)?;
        }
        // The statement reads one row past the page when there is one.
        let limit = usize::try_from(query.limit).unwrap_or(usize::MAX);
        let page = PageBuilder::new(limit, HISTORY_PAGE_BYTES);
        Ok(store::history(&self.pool, user_id, query, page).await?)
    }

    /// The plan PostgreSQL picks for a history page (`EXPLAIN`), for checking that pages are
    /// served by an index rather than a scan of the user's whole ledger.
    pub async fn explain_history(
        &self,
        user_id: &str,
        query: &HistoryQuery,
    ) -> Result<Vec<String>, LedgerError> {
        query.check()?;
        check_user_id(user_id)?;
        Ok(store::explain_history(&self.pool, user_id, query).await?)
    }

    /// Sets (`Some((threshold, amount))`, both > 0) or removes (`None`) a user's auto top-up,
    /// and requests a top-up at once when the balance is already below the threshold.
    pub async fn set_auto_top_up(
        &self,
        user_id: &str,
        config: Option<(i64, i64)>,
        at: impl Stamp,
    ) -> Result<AutoTopUp, LedgerError> {
        if let Some((threshold, amount)) = config {
            for (field, v) in [("threshold", threshold), ("amount", amount)] {
                // The control queue's code for it (`amount_out_of_range`), whoever asks.
                if v <= 0 {
                    return Err(LedgerError::AmountOutOfRange(format!(
                        "{field}: {v} must be greater than 0"
                    )));
                }
            }
        }
        let ttl = self.policy.auto_top_up_ttl;
        self.with_account(user_id, &at, |account, changes, at| {
            account.auto_threshold = config.map(|c| c.0);
            account.auto_amount = config.map(|c| c.1);
            account.dirty = true;
            let requested = account.request_top_up(changes, ttl, at);
            Ok(AutoTopUp {
                user_id: user_id.to_owned(),
                threshold: account.auto_threshold,
                amount: account.auto_amount,
                requested,
            })
        })
        .await
    }

    /// The decision stored for a node execution, if any.
    pub async fn decision(
        &self,
        node_exec_id: &str,
    ) -> Result<Option<DecisionRecord>, LedgerError> {
        check_node_exec_id(node_exec_id)?;
        let Some(mut decision) = store::find_decision(&self.pool, node_exec_id).await? else {
            return Ok(None);
        };
        decision.settlement = store::find_settlement(&self.pool, node_exec_id).await?;
        Ok(Some(decision))
    }
}

/// A key for a credit given none: unique enough (nanoseconds, the process and a process-wide
/// counter) that finding it again means an earlier attempt of the same request committed.
pub(crate) fn generated_key(tx_type: TxType) -> String {
    use std::time::{SystemTime, UNIX_EPOCH};
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let kind = tx_type.as_str().replace('_', "-");
    format!("{kind}-{nanos:x}-{:x}-{n:x}", std::process::id())
}

/// Moves the outbox's sequence past every id in use ([`store::mend_outbox_ids`]), with a
/// warning when it was behind: after a restore, or a move by logical replication, that did
/// not carry it.
pub(crate) async fn mend_outbox_ids(db: &mut sqlx::PgConnection) -> Result<(), sqlx::Error> {
    if let Some((last_id, now)) = store::mend_outbox_ids(db).await? {
        tracing::warn!(
            last_id,
            now,
            "the outbox's sequence was behind the ids in use (a restore or a copy that did \
             not carry it); moved past them"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_reused_for_another_posting_is_refused() {
        assert!(check_key_reuse("k", ("TOP_UP", 5), (TxType::TopUp, 5)).is_ok());
        assert!(check_key_reuse("k", ("USAGE", -5), (TxType::Usage, -5)).is_ok());
        let err = |row, asked| check_key_reuse("k", row, asked).unwrap_err().to_string();
        assert_eq!(
            err(("TOP_UP", 5), (TxType::TopUp, 6)),
            "key: k already names a TOP_UP of 5 credits; this request is a TOP_UP of 6: \
             give it a key of its own"
        );
        assert_eq!(
            err(("TOP_UP", 5), (TxType::Grant, 5)),
            "key: k already names a TOP_UP of 5 credits; this request is a GRANT of 5: \
             give it a key of its own"
        );
        assert!(check_key_reuse("k", ("USAGE", -5), (TxType::Usage, -6)).is_err());
    }

    /// Rows newest first, seq `n` down to 1, each with a reason of `reason` bytes.
    fn rows(n: i64, reason: usize) -> Vec<Transaction> {
        (1..=n)
            .rev()
            .map(|seq| Transaction {
                seq,
                transaction_key: format!("k{seq}"),
                tx_type: "GRANT".into(),
                amount: 1,
                running_balance: seq,
                created_at: DateTime::UNIX_EPOCH,
                metadata: serde_json::json!({"reason": "r".repeat(reason)}),
            })
            .collect()
    }

    fn page_of(rows: Vec<Transaction>, limit: usize, budget: usize) -> HistoryPage {
        let mut page = PageBuilder::new(limit, budget);
        for row in rows {
            if !page.push(row) {
                break;
            }
        }
        page.finish()
    }

    fn seqs(page: &HistoryPage) -> (Vec<i64>, Option<i64>) {
        let seqs = page.transactions.iter().map(|t| t.seq).collect();
        (seqs, page.next_before_seq)
    }

    #[test]
    fn a_page_ends_at_its_limit_or_its_byte_budget_and_says_where_the_next_starts() {
        // Each row's JSON is a little over 1,000 bytes.
        let row = serde_json::to_vec(&rows(1, 1000)[0]).unwrap().len();
        assert!((1000..1200).contains(&row), "{row}");
        // The limit: 3 of 6 rows (the statement read one past the page: 4).
        let page = page_of(rows(6, 1000).into_iter().take(4).collect(), 3, 1 << 20);
        assert_eq!(seqs(&page), (vec![6, 5, 4], Some(4)));
        // The last page: fewer rows than the limit, nothing after it.
        assert_eq!(
            seqs(&page_of(rows(2, 1000), 3, 1 << 20)),
            (vec![2, 1], None)
        );
        // The budget: as many rows as fit in it, in all.
        let page = page_of(rows(6, 1000), 5, 3 * row + row / 2);
        assert_eq!(seqs(&page), (vec![6, 5, 4], Some(4)));
        assert_eq!(
            seqs(&page_of(rows(3, 1000), 5, 3 * row)),
            (vec![3, 2, 1], None)
        );
        // A first row longer than the budget comes alone.
        let page = page_of(rows(3, 1000), 5, row / 2);
        assert_eq!(seqs(&page), (vec![3], Some(3)));
    }

    #[test]
    fn a_credit_may_not_take_the_form_of_the_workers_own_keys() {
        let refill = "2027-01".parse::<Month>().unwrap().refill_key();
        for key in [
            "USAGE-n1",
            "SETTLE-n1",
            "EXECUTION-FEE-alice-2026-12-05-1",
            refill.as_str(),
        ] {
            let refused = check_credit_key(key).unwrap_err().to_string();
            assert!(refused.starts_with("key: the prefix "), "{refused}");
        }
        // The payment side fulfils an auto top-up request with its id as the key.
        for key in ["AUTO-TOP-UP-alice-3", "invoice-17", "usage-n1", "TOP-UP-1f"] {
            assert!(check_credit_key(key).is_ok(), "{key}");
        }
    }

    #[test]
    fn ids_and_keys_with_nul_are_refused_naming_the_field() {
        let user = check_user_id("a\0b").unwrap_err().to_string();
        assert_eq!(user, "user_id: contains a NUL character");
        let key = check_key("k\0").unwrap_err().to_string();
        assert_eq!(key, "key: contains a NUL character");
    }
}
