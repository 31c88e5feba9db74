//! The arithmetic of one user's account, applied in memory while its balance row is locked.
//! Every ledger write (single operations, batched decisions, the refill sweep) goes through
//! [`Account::post`], so seq, running balance, overflow and the balance.changed event are
//! computed in exactly one place.

use chrono::{DateTime, NaiveDate, Utc};
use serde_json::Value;

use super::month::Month;
use super::{LedgerError, TxType};
use crate::events::{self, ExecutionRef, NewEvent};

/// A locked balance row.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub(crate) struct Account {
    pub user_id: String,
    pub balance: i64,
    pub last_seq: i64,
    pub refill_month: Option<NaiveDate>,
    pub fee_day: Option<NaiveDate>,
    pub fee_count: i64,
    /// Auto top-up: both set or both unset.
    pub auto_threshold: Option<i64>,
    pub auto_amount: Option<i64>,
    pub auto_requests: i64,
    pub auto_requested_at: Option<DateTime<Utc>>,
    /// Changed since it was read: written back with the batch.
    #[sqlx(skip)]
    pub(crate) dirty: bool,
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

/// Everything one database transaction will write besides the balance rows.
#[derive(Debug, Default, Clone, PartialEq)]
pub(crate) struct Changes {
    pub transactions: Vec<NewTransaction>,
    pub events: Vec<NewEvent>,
}

/// The monthly refill policy (docs/contract.md §5).
#[derive(Debug, Clone, Copy)]
pub struct RefillPolicy {
    pub target: i64,
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
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn post(
        &mut self,
        changes: &mut Changes,
        tx_type: TxType,
        transaction_key: String,
        amount: i64,
        metadata: Value,
        exec: ExecutionRef<'_>,
        at: DateTime<Utc>,
    ) -> Result<i64, LedgerError> {
        let balance = self.checked_balance(amount)?;
        Ok(self.append(
            changes,
            tx_type,
            transaction_key,
            amount,
            balance,
            metadata,
            exec,
            at,
        ))
    }

    /// [`Account::post`] for a post-flight charge: the work was done, so it is taken even
    /// when it leaves a debt (the schema allows that only for such rows).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn post_debt(
        &mut self,
        changes: &mut Changes,
        tx_type: TxType,
        transaction_key: String,
        amount: i64,
        metadata: Value,
        exec: ExecutionRef<'_>,
        at: DateTime<Utc>,
    ) -> Result<i64, LedgerError> {
        let balance = self.balance_after(amount)?;
        Ok(self.append(
            changes,
            tx_type,
            transaction_key,
            amount,
            balance,
            metadata,
            exec,
            at,
        ))
    }

    #[allow(clippy::too_many_arguments)]
    fn append(
        &mut self,
        changes: &mut Changes,
        tx_type: TxType,
        transaction_key: String,
        amount: i64,
        balance: i64,
        metadata: Value,
        exec: ExecutionRef<'_>,
        at: DateTime<Utc>,
    ) -> i64 {
        let seq = self.last_seq + 1;
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
        if matches!(tx_type, TxType::TopUp | TxType::Grant) {
            // A credit landed: the outstanding auto top-up request (if any) is answered.
            self.auto_requested_at = None;
        }
        self.balance = balance;
        self.last_seq = seq;
        self.dirty = true;
        seq
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
        let request_id = format!("AUTO-TOP-UP-{}-{}", self.user_id, self.auto_requests);
        changes.events.push(events::top_up_requested(
            &self.user_id,
            &request_id,
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
        if self.refill_month.is_some_and(|m| m >= month.first_day()) {
            return Ok(0);
        }
        let grant = policy.target.saturating_sub(self.balance).max(0);
        if grant > 0 {
            self.post(
                changes,
                TxType::Grant,
                month.refill_key(),
                grant,
                serde_json::json!({"reason": "monthly refill", "month": month.to_string(), "target": policy.target}),
                ExecutionRef::default(),
                at,
            )?;
        }
        self.refill_month = Some(month.first_day());
        self.dirty = true;
        Ok(grant)
    }
}
