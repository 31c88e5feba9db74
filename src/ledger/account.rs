//! The arithmetic of one user's account, applied in memory while its balance row is locked.
//! Every ledger write (single operations, batched decisions, the refill sweep) goes through
//! [`Account::post`], so seq, running balance, overflow and the balance.changed event are
//! computed in exactly one place.

use chrono::{DateTime, NaiveDate, Utc};
use serde_json::Value;

use super::month::Month;
use super::{LedgerError, TxType};
use crate::events::{self, ExecutionRef, NewEvent};

/// The prefix of an auto top-up request's id (`AUTO-TOP-UP-{user}-{n}`).
pub(crate) const AUTO_TOP_UP_PREFIX: &str = "AUTO-TOP-UP-";

/// A locked balance row.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub(crate) struct Account {
    pub user_id: String,
    pub balance: i64,
    pub last_seq: i64,
    pub refill_month: Option<NaiveDate>,
    pub fee_day: Option<NaiveDate>,
    pub fee_count: i64,
    /// Execution fees charged on `fee_day`; None on rows from before it was kept (migration
    /// 0012).
    pub fee_n: Option<i64>,
    /// Auto top-up: both set or both unset.
    pub auto_threshold: Option<i64>,
    pub auto_amount: Option<i64>,
    pub auto_requests: i64,
    pub auto_requested_at: Option<DateTime<Utc>>,
    /// Changed since it was read: written back with the batch.
    #[sqlx(skip)]
    pub(crate) dirty: bool,
}

/// An account as it stands, for a person or the payment side (`account`): read, never
/// locked, created or refilled.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct AccountView {
    pub user_id: String,
    pub balance: i64,
    /// The last ledger row's seq.
    pub seq: i64,
    /// The last month whose refill was evaluated for the account (`YYYY-MM`).
    pub refill_month: Option<String>,
    /// The auto top-up configuration; null when off.
    pub auto_top_up: Option<AutoTopUpView>,
    /// Auto top-up requests made so far.
    pub requests_made: i64,
    /// The request that holds back the next one, until it is fulfilled or expires.
    pub outstanding_request: Option<RequestView>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct AutoTopUpView {
    pub threshold: i64,
    pub amount: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RequestView {
    pub request_id: String,
    pub requested_at: DateTime<Utc>,
    /// When another request may be made if this one is not fulfilled.
    pub expires_at: DateTime<Utc>,
}

/// A ledger row to insert.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct NewTransaction {
    pub user_id: String,
    pub seq: i64,
    pub transaction_key: String,
    pub tx_type: TxType,
    pub amount: i64,
    pub running_balance: i64,
    pub metadata: Value,
}

/// One ledger row to post to an account: its type, key and signed amount, and what it
/// belongs to; the account gives it its seq and running balance.
pub(crate) struct Entry<'a> {
    pub tx_type: TxType,
    pub key: String,
    pub amount: i64,
    pub metadata: Value,
    pub exec: ExecutionRef<'a>,
    pub at: DateTime<Utc>,
}

/// Everything one database transaction will write besides the balance rows.
#[derive(Debug, Default, Clone, PartialEq)]
pub(crate) struct Changes {
    pub transactions: Vec<NewTransaction>,
    pub events: Vec<NewEvent>,
}

impl Changes {
    /// Counts the monthly refills among these rows (a lazy refill, on a user's first operation
    /// of the month) in the refill metrics the sweep also counts in. Called once committed.
    pub(crate) fn count_refills(&self) {
        let grants = self.transactions.iter().filter(|t| {
            t.tx_type == TxType::Grant
                && t.transaction_key
                    .starts_with(super::month::REFILL_KEY_PREFIX)
        });
        let (users, credits) = grants.fold((0u64, 0u64), |(n, c), t| {
            (n + 1, c.saturating_add(t.amount.unsigned_abs()))
        });
        if users > 0 {
            metrics::counter!("credit_refill_users_total").increment(users);
            metrics::counter!("credit_refill_credits_total").increment(credits);
        }
    }
}

/// A refill whose grant (target − balance) would overflow an i64.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DebtTooDeep;

/// The monthly refill policy (docs/contract.md §5).
#[derive(Debug, Clone, Copy)]
pub struct RefillPolicy {
    pub target: i64,
}

impl RefillPolicy {
    /// The refill rule: what an account holding `balance`, whose refill was last evaluated for
    /// the month starting on `evaluated`, gets for `month`. `None` when that month (or a later
    /// one) was already evaluated; otherwise the grant that tops the balance up to the target,
    /// 0 when it is at or above the target. The sweep's SQL (`store::REFILL_CHUNK`) computes
    /// the same; a test holds the two to the same cases.
    pub fn grant(
        self,
        balance: i64,
        evaluated: Option<NaiveDate>,
        month: Month,
    ) -> Result<Option<i64>, DebtTooDeep> {
        if evaluated.is_some_and(|m| m >= month.first_day()) {
            return Ok(None);
        }
        self.top_up(balance).map(Some)
    }

    /// What tops `balance` up to the target; 0 at or above it. A debt so deep that the grant
    /// would not fit an i64 is refused: a smaller grant would leave the balance short of the
    /// target without a word.
    fn top_up(self, balance: i64) -> Result<i64, DebtTooDeep> {
        self.target
            .checked_sub(balance)
            .map(|grant| grant.max(0))
            .ok_or(DebtTooDeep)
    }

    /// The metadata of the ledger row of `month`'s refill grant.
    pub(crate) fn metadata(self, month: Month) -> Value {
        serde_json::json!({"reason": "monthly refill", "month": month.to_string(), "target": self.target})
    }
}

impl Account {
    /// A user without a balance row yet (as the database creates it).
    #[cfg(test)]
    pub(crate) fn new(user_id: String) -> Self {
        Account {
            user_id,
            balance: 0,
            last_seq: 0,
            refill_month: None,
            fee_day: None,
            fee_count: 0,
            fee_n: None,
            auto_threshold: None,
            auto_amount: None,
            auto_requests: 0,
            auto_requested_at: None,
            dirty: false,
        }
    }

    /// The balance after posting `amount`, or why it cannot be posted: a debit may not take
    /// the balance below 0 (a credit may leave a smaller debt).
    pub(crate) fn checked_balance(&self, amount: i64) -> Result<i64, LedgerError> {
        let next = self.balance_after(amount)?;
        if next < 0 && amount < 0 {
            return Err(LedgerError::InsufficientBalance {
                user_id: self.user_id.clone(),
                balance: self.balance,
                needed: amount.saturating_neg(),
            });
        }
        Ok(next)
    }

    fn balance_after(&self, amount: i64) -> Result<i64, LedgerError> {
        self.balance
            .checked_add(amount)
            .ok_or_else(|| LedgerError::Overflow {
                user_id: self.user_id.clone(),
                balance: self.balance,
                amount,
            })
    }

    /// Appends one ledger row and its balance.changed event. Nothing changes on error.
    pub(crate) fn post(
        &mut self,
        changes: &mut Changes,
        entry: Entry<'_>,
    ) -> Result<i64, LedgerError> {
        let balance = self.checked_balance(entry.amount)?;
        Ok(self.append(changes, entry, balance))
    }

    /// [`Account::post`] for a post-flight charge: the work was done, so it is taken even
    /// when it leaves a debt (the schema allows that only for such rows).
    pub(crate) fn post_debt(
        &mut self,
        changes: &mut Changes,
        entry: Entry<'_>,
    ) -> Result<i64, LedgerError> {
        let balance = self.balance_after(entry.amount)?;
        Ok(self.append(changes, entry, balance))
    }

    fn append(&mut self, changes: &mut Changes, entry: Entry<'_>, balance: i64) -> i64 {
        let Entry {
            tx_type,
            key: transaction_key,
            amount,
            metadata,
            exec,
            at,
        } = entry;
        let seq = self.last_seq + 1;
        if matches!(tx_type, TxType::TopUp | TxType::Grant)
            && self.fulfils_outstanding_request(&transaction_key)
        {
            self.auto_requested_at = None;
        }
        changes.events.push(events::balance_changed(
            &self.user_id,
            seq,
            amount,
            balance,
            tx_type.as_str(),
            &transaction_key,
            exec,
            at,
        ));
        changes.transactions.push(NewTransaction {
            user_id: self.user_id.clone(),
            seq,
            transaction_key,
            tx_type,
            amount,
            running_balance: balance,
            metadata,
        });
        self.balance = balance;
        self.last_seq = seq;
        self.dirty = true;
        seq
    }

    /// The day an execution at UTC date `today` counts on: `today`, or the account's counting
    /// day when that is later (a replica whose clock lags across midnight). Counting on an
    /// earlier day would restart a day already counted, re-issuing its fees' keys.
    pub(crate) fn counting_day(&self, today: NaiveDate) -> NaiveDate {
        self.fee_day.map_or(today, |d| d.max(today))
    }

    /// The number this account's next execution on `day` has (1 on a new UTC day): the
    /// execution fee is due by it.
    pub(crate) fn next_execution(&self, day: NaiveDate) -> i64 {
        if self.fee_day == Some(day) {
            self.fee_count + 1
        } else {
            1
        }
    }

    /// Records that execution number `count` of `day` took place.
    pub(crate) fn count_execution(&mut self, day: NaiveDate, count: i64) {
        if self.fee_day != Some(day) {
            self.fee_n = Some(0);
        }
        self.fee_day = Some(day);
        self.fee_count = count;
        self.dirty = true;
    }

    /// The execution fees charged on `day` so far. A row from before they were counted took
    /// one on every `every`-th execution, so it has charged `fee_count / every`.
    pub(crate) fn fees_charged(&self, day: NaiveDate, every: i64) -> i64 {
        match (self.fee_day == Some(day), self.fee_n) {
            (false, _) => 0,
            (true, Some(n)) => n,
            (true, None) if every > 0 => self.fee_count / every,
            (true, None) => 0,
        }
    }

    /// Records that the `n`-th execution fee of the day was charged.
    pub(crate) fn count_fee(&mut self, n: i64) {
        self.fee_n = Some(n);
        self.dirty = true;
    }

    /// The `balance.low` event owed when the debits since the balance was `before` took it
    /// from at or above `threshold` to below it; `seq` is the last of those debits' rows.
    pub(crate) fn low_balance_crossing(
        &self,
        before: i64,
        seq: i64,
        threshold: i64,
        at: DateTime<Utc>,
    ) -> Option<NewEvent> {
        (before >= threshold && self.balance < threshold)
            .then(|| events::balance_low(&self.user_id, seq, self.balance, threshold, at))
    }

    /// The account as it stands at `now`, with requests outstanding for `ttl`.
    pub(crate) fn view(&self, ttl: chrono::Duration, now: DateTime<Utc>) -> AccountView {
        let auto_top_up = self
            .auto_threshold
            .zip(self.auto_amount)
            .map(|(threshold, amount)| AutoTopUpView { threshold, amount });
        let outstanding_request = self
            .auto_requested_at
            .filter(|at| now - *at < ttl)
            .map(|at| RequestView {
                request_id: self.request_id(self.auto_requests),
                requested_at: at,
                expires_at: at + ttl,
            });
        AccountView {
            user_id: self.user_id.clone(),
            balance: self.balance,
            seq: self.last_seq,
            refill_month: self.refill_month.map(|d| Month::of_day(d).to_string()),
            auto_top_up,
            requests_made: self.auto_requests,
            outstanding_request,
        }
    }

    /// The id of this account's `n`-th auto top-up request, the key its fulfilment carries.
    fn request_id(&self, n: i64) -> String {
        format!("{AUTO_TOP_UP_PREFIX}{}-{n}", self.user_id)
    }

    /// Whether `key` may name a posting of `tx_type` on this account as far as auto top-up
    /// goes: a key of a request's form must be the id of a request made for this account,
    /// fulfilled by a credit. Otherwise a caller could take the key of a request not yet made,
    /// and its fulfilment, the user's payment, would then be refused.
    pub(crate) fn may_use_key(&self, key: &str, tx_type: TxType) -> bool {
        if !key.starts_with(AUTO_TOP_UP_PREFIX) {
            return true;
        }
        self.issued_request(key) && matches!(tx_type, TxType::TopUp | TxType::Grant)
    }

    /// Whether `key` is the id of a request made for this account.
    fn issued_request(&self, key: &str) -> bool {
        key.strip_prefix(AUTO_TOP_UP_PREFIX)
            .and_then(|rest| rest.rsplit_once('-'))
            .and_then(|(_, n)| n.parse::<i64>().ok())
            .is_some_and(|n| (1..=self.auto_requests).contains(&n) && self.request_id(n) == key)
    }

    /// Whether a credit under `key` answers the outstanding auto top-up request: only that
    /// request's own fulfilment does. Any other credit (the user's own purchase, a grant, the
    /// monthly refill, the late fulfilment of an earlier request its TTL superseded) leaves it
    /// outstanding until its fulfilment lands or its TTL passes: taking it as answered would
    /// let a second request go out while the first may still be paid, charging the user twice.
    fn fulfils_outstanding_request(&self, key: &str) -> bool {
        self.auto_requested_at.is_some() && key == self.request_id(self.auto_requests)
    }

    /// Publishes a `top_up.requested` when the balance is below the user's auto top-up
    /// threshold and no request is outstanding (or the outstanding one is older than `ttl`).
    /// Returns whether it did.
    pub(crate) fn request_top_up(
        &mut self,
        changes: &mut Changes,
        ttl: chrono::Duration,
        now: DateTime<Utc>,
    ) -> bool {
        let (Some(threshold), Some(amount)) = (self.auto_threshold, self.auto_amount) else {
            return false;
        };
        let outstanding = self.auto_requested_at.is_some_and(|at| now - at < ttl);
        if self.balance >= threshold || outstanding {
            return false;
        }
        self.auto_requests += 1;
        self.auto_requested_at = Some(now);
        self.dirty = true;
        let request_id = self.request_id(self.auto_requests);
        changes.events.push(events::top_up_requested(
            &self.user_id,
            &request_id,
            self.last_seq,
            amount,
            self.balance,
            threshold,
            now,
        ));
        true
    }

    /// Applies the refill of `month` unless this account was already evaluated for it or a
    /// later month. Returns the credits granted (0 when at or above target).
    pub fn refill(
        &mut self,
        changes: &mut Changes,
        policy: RefillPolicy,
        month: Month,
        at: DateTime<Utc>,
    ) -> Result<i64, LedgerError> {
        let grant = policy.grant(self.balance, self.refill_month, month);
        self.apply_refill(changes, policy, month, grant, at)
    }

    /// The lazy refill before an operation ([`Account::refill`] of `lazy`, when on). A debt
    /// too deep to refill does not stop the operation, which may be the top-up or refund that
    /// reduces it: the refill is skipped with a warning and the month stays unevaluated, so
    /// the sweep goes on reporting the account and the first operation once the debt allows
    /// refills it.
    pub(crate) fn refill_lazily(
        &mut self,
        changes: &mut Changes,
        lazy: Option<(RefillPolicy, Month)>,
        at: DateTime<Utc>,
    ) -> Result<(), LedgerError> {
        let Some((policy, month)) = lazy else {
            return Ok(());
        };
        match self.refill(changes, policy, month, at) {
            Err(e @ LedgerError::RefillOverflow { .. }) => {
                tracing::warn!(error = %e, "lazy refill skipped");
                Ok(())
            }
            other => other.map(|_| ()),
        }
    }

    /// Posts `grant` (when > 0) under `month`'s key and marks the month evaluated.
    fn apply_refill(
        &mut self,
        changes: &mut Changes,
        policy: RefillPolicy,
        month: Month,
        grant: Result<Option<i64>, DebtTooDeep>,
        at: DateTime<Utc>,
    ) -> Result<i64, LedgerError> {
        let Some(grant) = grant.map_err(|DebtTooDeep| LedgerError::RefillOverflow {
            user_id: self.user_id.clone(),
            balance: self.balance,
            target: policy.target,
        })?
        else {
            return Ok(0);
        };
        if grant > 0 {
            self.post(
                changes,
                Entry {
                    tx_type: TxType::Grant,
                    key: month.refill_key(),
                    amount: grant,
                    metadata: policy.metadata(month),
                    exec: ExecutionRef::default(),
                    at,
                },
            )?;
        }
        self.refill_month = self.refill_month.max(Some(month.first_day()));
        self.dirty = true;
        Ok(grant)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn month(s: &str) -> Month {
        s.parse().unwrap()
    }

    fn day(s: &str) -> Option<NaiveDate> {
        Some(month(s).first_day())
    }

    #[test]
    fn an_account_shows_its_request_outstanding_until_its_ttl_passes() {
        use chrono::TimeZone;
        let at = Utc.with_ymd_and_hms(2026, 12, 7, 2, 0, 0).unwrap();
        let ttl = chrono::Duration::seconds(3600);
        let mut a = Account::new("u".into());
        a.balance = 40;
        a.last_seq = 7;
        a.refill_month = NaiveDate::from_ymd_opt(2026, 11, 1);
        let off = a.view(ttl, at);
        assert_eq!(
            (
                off.auto_top_up,
                off.outstanding_request,
                off.refill_month.as_deref()
            ),
            (None, None, Some("2026-11"))
        );
        (a.auto_threshold, a.auto_amount) = (Some(50), Some(500));
        a.auto_requests = 3;
        a.auto_requested_at = Some(at);
        let request = RequestView {
            request_id: "AUTO-TOP-UP-u-3".into(),
            requested_at: at,
            expires_at: at + ttl,
        };
        let before_expiry = at + ttl - chrono::Duration::milliseconds(1);
        assert_eq!(
            a.view(ttl, before_expiry),
            AccountView {
                user_id: "u".into(),
                balance: 40,
                seq: 7,
                refill_month: Some("2026-11".into()),
                auto_top_up: Some(AutoTopUpView {
                    threshold: 50,
                    amount: 500
                }),
                requests_made: 3,
                outstanding_request: Some(request),
            }
        );
        // Expired: the next debit below the threshold may ask again.
        assert_eq!(a.view(ttl, at + ttl).outstanding_request, None);
    }

    #[test]
    fn committed_refills_are_counted_with_the_sweeps() {
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        let at = chrono::Utc::now();
        let mut changes = Changes::default();
        let mut a = Account::new("u".into());
        let granted = a.refill(
            &mut changes,
            RefillPolicy { target: 1000 },
            month("2026-12"),
            at,
        );
        assert_eq!(granted.ok(), Some(1000));
        let grant = a.post(
            &mut changes,
            Entry {
                tx_type: TxType::Grant,
                key: "promo".into(),
                amount: 5,
                metadata: Value::Null,
                exec: ExecutionRef::default(),
                at,
            },
        );
        assert!(grant.is_ok());
        metrics::with_local_recorder(&recorder, || changes.count_refills());
        let text = handle.render();
        assert!(text.contains("credit_refill_users_total 1\n"), "{text}");
        assert!(
            text.contains("credit_refill_credits_total 1000\n"),
            "{text}"
        );
    }

    #[test]
    fn an_auto_top_up_key_is_only_a_made_requests_fulfilment() {
        let mut a = Account::new("d-a-v-e".into());
        a.auto_requests = 2;
        for key in ["AUTO-TOP-UP-d-a-v-e-1", "AUTO-TOP-UP-d-a-v-e-2"] {
            assert!(a.may_use_key(key, TxType::TopUp), "{key}");
            assert!(a.may_use_key(key, TxType::Grant), "{key}");
            assert!(!a.may_use_key(key, TxType::Usage), "{key}");
        }
        // Not made yet, another user's, or not the id's own spelling.
        for key in [
            "AUTO-TOP-UP-d-a-v-e-3",
            "AUTO-TOP-UP-d-a-v-e-0",
            "AUTO-TOP-UP-d-a-v-e-01",
            "AUTO-TOP-UP-d-a-v-e-+1",
            "AUTO-TOP-UP-bob-1",
            "AUTO-TOP-UP-e-1",
            "AUTO-TOP-UP-",
        ] {
            assert!(!a.may_use_key(key, TxType::TopUp), "{key}");
        }
        for key in ["invoice-17", "auto-top-up-d-a-v-e-3"] {
            assert!(a.may_use_key(key, TxType::TopUp), "{key}");
        }
    }

    #[test]
    fn refill_tops_up_to_the_target_once_per_month() {
        let p = RefillPolicy { target: 1000 };
        let m = month("2026-12");
        // Never evaluated, or last evaluated for an earlier month: topped up to the target.
        assert_eq!(p.grant(0, None, m), Ok(Some(1000)));
        assert_eq!(p.grant(400, day("2026-11"), m), Ok(Some(600)));
        assert_eq!(p.grant(999, day("2025-12"), m), Ok(Some(1)));
        // A debt is topped up too.
        assert_eq!(p.grant(-250, None, m), Ok(Some(1250)));
        // At or above the target: evaluated, nothing granted.
        assert_eq!(p.grant(1000, None, m), Ok(Some(0)));
        assert_eq!(p.grant(1100, day("2026-11"), m), Ok(Some(0)));
        assert_eq!(p.grant(i64::MAX, None, m), Ok(Some(0)));
        // Already evaluated for this month or a later one: nothing to do.
        assert_eq!(p.grant(0, day("2026-12"), m), Ok(None));
        assert_eq!(p.grant(-5, day("2027-01"), m), Ok(None));
        // A debt too deep to top up in one grant is refused, not granted less.
        assert_eq!(p.grant(i64::MIN, None, m), Err(DebtTooDeep));
        assert_eq!(p.grant(-i64::MAX + 999, None, m), Err(DebtTooDeep));
        assert_eq!(p.grant(-i64::MAX + 1000, None, m), Ok(Some(i64::MAX)));
        assert_eq!(p.grant(-i64::MAX + 1001, None, m), Ok(Some(i64::MAX - 1)));
        // A zero target grants nothing to a positive balance.
        assert_eq!(RefillPolicy { target: 0 }.grant(5, None, m), Ok(Some(0)));
    }

    #[test]
    fn a_lazy_refill_skips_a_debt_too_deep_and_lets_the_operation_go_on() {
        let p = RefillPolicy { target: 1000 };
        let m = month("2026-12");
        let at = chrono::Utc::now();
        let mut a = Account::new("u".into());
        a.balance = -i64::MAX + 999;
        let mut changes = Changes::default();
        let refused = a.refill(&mut changes, p, m, at).unwrap_err();
        assert!(
            matches!(refused, LedgerError::RefillOverflow { .. }),
            "{refused}"
        );
        a.refill_lazily(&mut changes, Some((p, m)), at).unwrap();
        assert_eq!((a.balance, a.refill_month), (-i64::MAX + 999, None));
        assert!(changes.transactions.is_empty());
        // Once the debt allows, the next operation refills.
        a.balance = -5;
        a.refill_lazily(&mut changes, Some((p, m)), at).unwrap();
        assert_eq!((a.balance, a.refill_month), (1000, day("2026-12")));
    }

    #[test]
    fn a_month_before_the_last_evaluated_is_final() {
        // Evaluated for December at 1,200 (nothing granted), then down to 400: naming an
        // earlier month, or December again, grants nothing. Whether the account was evaluated
        // for that month cannot be told, and "target − the balance now" would be a grant for
        // no month's allowance (a user created later would get months before it existed).
        let p = RefillPolicy { target: 1000 };
        let at = chrono::Utc::now();
        let mut a = Account::new("u".into());
        a.balance = 1200;
        let mut changes = Changes::default();
        assert_eq!(a.refill(&mut changes, p, month("2026-12"), at).unwrap(), 0);
        a.balance = 400;
        for m in ["2026-10", "2026-11", "2026-12"] {
            assert_eq!(a.refill(&mut changes, p, month(m), at).unwrap(), 0, "{m}");
        }
        assert_eq!((a.balance, a.refill_month), (400, day("2026-12")));
        assert!(changes.transactions.is_empty());
        // The next month is refilled.
        assert_eq!(
            a.refill(&mut changes, p, month("2027-01"), at).unwrap(),
            600
        );
    }

    #[test]
    fn refill_posts_one_grant_and_marks_the_month() {
        let p = RefillPolicy { target: 1000 };
        let m = month("2026-12");
        let at = chrono::Utc::now();
        let mut a = Account::new("u".into());
        a.balance = 300;
        a.last_seq = 4;
        a.auto_requested_at = Some(at);
        let mut changes = Changes::default();
        assert_eq!(a.refill(&mut changes, p, m, at).unwrap(), 700);
        assert_eq!(
            (a.balance, a.last_seq, a.refill_month),
            (1000, 5, day("2026-12"))
        );
        // A refill does not answer an outstanding auto top-up request: only its fulfilment does.
        assert_eq!(a.auto_requested_at, Some(at));
        let row = &changes.transactions[0];
        assert_eq!((row.seq, row.amount, row.running_balance), (5, 700, 1000));
        assert_eq!(row.transaction_key, "MONTHLY-CREDIT-TOP-UP-2026-12");
        assert_eq!(row.metadata, p.metadata(m));
        assert_eq!(changes.events.len(), 1);
        // The same month again changes nothing.
        assert_eq!(a.refill(&mut changes, p, m, at).unwrap(), 0);
        assert_eq!((changes.transactions.len(), a.balance), (1, 1000));
        // At the target, the next month is evaluated without a row.
        let mut b = Account::new("v".into());
        b.balance = 1000;
        assert_eq!(b.refill(&mut changes, p, month("2027-01"), at).unwrap(), 0);
        assert_eq!((b.refill_month, b.dirty), (day("2027-01"), true));
        assert_eq!(changes.transactions.len(), 1);
    }
}
