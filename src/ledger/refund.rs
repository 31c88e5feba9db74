//! Refunds of purchases (the `refund` command, docs/contract.md §8): the payment side gave a
//! customer's money back, or lost a dispute over it, and takes the credits back as a REFUND
//! row, as AutoGPT's `deduct_credits` does. A refund names the TOP_UP it is of, and the
//! refunds of one purchase never add up to more than it.

use super::LedgerError;

/// The purchase a refund names, as the ledger holds it: its row's type and amount.
pub(crate) struct Purchase<'a> {
    pub key: &'a str,
    /// `(type, amount)` of the user's row under `key`, if there is one.
    pub row: Option<(&'a str, i64)>,
    /// What the purchase's earlier refunds took back.
    pub refunded: i64,
}

/// A refund's own fields: an amount > 0, and keys a caller may give (the refund's may not
/// take the worker's prefixes).
pub(crate) fn check_request(amount: i64, key: &str, top_up_key: &str) -> Result<(), LedgerError> {
    if amount <= 0 {
        return Err(LedgerError::AmountOutOfRange(format!(
            "amount: {amount} must be greater than 0"
        )));
    }
    super::check_key(key)?;
    super::check_credit_key(key)?;
    // Taken by a refund, a request's id would have the payment that fulfils it refused.
    if key.starts_with(super::account::AUTO_TOP_UP_PREFIX) {
        return Err(LedgerError::InvalidArgument {
            field: "key",
            reason: format!(
                "{key} has the form of an auto top-up request's id: only its fulfilment (a \
                 top_up or grant) may carry it"
            ),
        });
    }
    super::check_key(top_up_key).map_err(|e| match e {
        LedgerError::InvalidArgument { reason, .. } => LedgerError::InvalidArgument {
            field: "top_up_key",
            reason,
        },
        other => other,
    })
}

/// A refund asked again under its key must name the purchase it named: a refund's id belongs
/// to one payment, and answering "already applied" to another would hide that one's refund.
pub(crate) fn check_same_purchase(
    key: &str,
    named: Option<&str>,
    top_up_key: &str,
) -> Result<(), LedgerError> {
    match named {
        Some(named) if named == top_up_key => Ok(()),
        named => Err(LedgerError::InvalidArgument {
            field: "top_up_key",
            reason: format!(
                "{key} already names a refund of {}; this request is one of {top_up_key}: \
                 give it a key of its own",
                named.unwrap_or("no purchase")
            ),
        }),
    }
}

/// Whether `amount` may be refunded of `purchase`: it must be a TOP_UP of the user with at
/// least `amount` not yet refunded. The credits may have been spent: the refund is taken
/// anyway (the balance may fall below 0), since the money went back.
pub(crate) fn check_refund(purchase: &Purchase<'_>, amount: i64) -> Result<(), LedgerError> {
    let key = purchase.key;
    let bought = match purchase.row {
        None => {
            return Err(LedgerError::NotFound(format!(
                "top_up_key: the user has no ledger row under {key}"
            )))
        }
        Some(("TOP_UP", bought)) => bought,
        Some((other, _)) => {
            return Err(LedgerError::InvalidArgument {
                field: "top_up_key",
                reason: format!("{key} names a {other}; only a TOP_UP can be refunded"),
            })
        }
    };
    let left = bought.saturating_sub(purchase.refunded);
    if amount > left {
        return Err(LedgerError::AmountOutOfRange(format!(
            "amount: {amount} is more than the {left} of TOP_UP {key} not yet refunded \
             ({} of {bought} refunded)",
            purchase.refunded
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn purchase(row: Option<(&str, i64)>, refunded: i64) -> Purchase<'_> {
        Purchase {
            key: "pi_1",
            row,
            refunded,
        }
    }

    #[test]
    fn a_refund_takes_at_most_what_its_purchase_has_left() {
        assert!(check_refund(&purchase(Some(("TOP_UP", 500)), 0), 500).is_ok());
        assert!(check_refund(&purchase(Some(("TOP_UP", 500)), 300), 200).is_ok());
        let over = check_refund(&purchase(Some(("TOP_UP", 500)), 300), 201);
        assert_eq!(
            over.map_err(|e| e.to_string()),
            Err(
                "amount: 201 is more than the 200 of TOP_UP pi_1 not yet refunded \
                 (300 of 500 refunded)"
                    .into()
            )
        );
        let spent = check_refund(&purchase(Some(("TOP_UP", 500)), 500), 1);
        assert!(matches!(spent, Err(LedgerError::AmountOutOfRange(_))));
    }

    #[test]
    fn a_refund_may_not_take_an_auto_top_up_requests_id() {
        let taken = check_request(50, "AUTO-TOP-UP-ivan-1", "pi_1");
        assert_eq!(
            taken.map_err(|e| e.to_string()),
            Err(
                "key: AUTO-TOP-UP-ivan-1 has the form of an auto top-up request's id: only its \
                 fulfilment (a top_up or grant) may carry it"
                    .into()
            )
        );
        // The purchase refunded may well be such a fulfilment.
        assert!(check_request(50, "re_1", "AUTO-TOP-UP-ivan-1").is_ok());
    }

    #[test]
    fn a_refund_asked_again_names_its_own_purchase() {
        assert!(check_same_purchase("re_1", Some("pi_1"), "pi_1").is_ok());
        let other = check_same_purchase("re_1", Some("pi_1"), "pi_2");
        assert_eq!(
            other.map_err(|e| e.to_string()),
            Err(
                "top_up_key: re_1 already names a refund of pi_1; this request is one of \
                 pi_2: give it a key of its own"
                    .into()
            )
        );
        assert!(check_same_purchase("re_1", None, "pi_1").is_err());
    }

    #[test]
    fn only_a_purchase_of_the_user_can_be_refunded() {
        let none = check_refund(&purchase(None, 0), 1);
        assert_eq!(
            none.map_err(|e| e.to_string()),
            Err("top_up_key: the user has no ledger row under pi_1".into())
        );
        let grant = check_refund(&purchase(Some(("GRANT", 500)), 0), 1);
        assert_eq!(
            grant.map_err(|e| e.to_string()),
            Err("top_up_key: pi_1 names a GRANT; only a TOP_UP can be refunded".into())
        );
    }
}
