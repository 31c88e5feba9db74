//! The error half of a control reply: a stable `code` and a message naming what was wrong.

use crate::ledger::LedgerError;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ControlError {
    /// Malformed JSON, unknown command, missing or ill-typed field.
    #[error("{0}")]
    BadRequest(String),
    /// The sender is not in `control.allowed_users`.
    #[error("{0}")]
    Forbidden(String),
    /// An amount ≤ 0 or one that would overflow.
    #[error("{0}")]
    AmountOutOfRange(String),
    #[error("{0}")]
    NotFound(String),
    /// A database or other failure; `transient` ones are worth a retry.
    #[error("{message}")]
    Internal { message: String, transient: bool },
}

impl ControlError {
    /// The `error.code` of the reply (docs/contract.md §7).
    pub fn code(&self) -> &'static str {
        match self {
            ControlError::BadRequest(_) => "bad_request",
            ControlError::Forbidden(_) => "forbidden",
            ControlError::AmountOutOfRange(_) => "amount_out_of_range",
            ControlError::NotFound(_) => "not_found",
            ControlError::Internal { .. } => "internal",
        }
    }

    pub(crate) fn is_transient(&self) -> bool {
        matches!(
            self,
            ControlError::Internal {
                transient: true,
                ..
            }
        )
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        ControlError::BadRequest(message.into())
    }

    pub fn internal(message: impl Into<String>) -> Self {
        ControlError::Internal {
            message: message.into(),
            transient: false,
        }
    }

    /// The code a command failing with `e` is answered with.
    pub(crate) fn code_of(e: &LedgerError) -> &'static str {
        answer_for(e)(String::new()).code()
    }
}

/// The kind of reply a command failing with `e` gets: one list for its code and its answer.
fn answer_for(e: &LedgerError) -> fn(String) -> ControlError {
    match e {
        LedgerError::AmountOutOfRange(_)
        | LedgerError::Overflow { .. }
        | LedgerError::RefillOverflow { .. } => ControlError::AmountOutOfRange,
        LedgerError::InvalidArgument { .. } | LedgerError::InsufficientBalance { .. } => {
            ControlError::BadRequest
        }
        LedgerError::NotFound(_) => ControlError::NotFound,
        LedgerError::Db(_) => |m| ControlError::internal(m),
    }
}

impl From<LedgerError> for ControlError {
    fn from(e: LedgerError) -> Self {
        match e {
            // Whether it may clear is the database error's to say.
            LedgerError::Db(db) => db.into(),
            e => answer_for(&e)(e.to_string()),
        }
    }
}

impl From<sqlx::Error> for ControlError {
    fn from(e: sqlx::Error) -> Self {
        ControlError::Internal {
            // As for decisions: a fault of the database's set-up waits for its fix.
            transient: LedgerError::may_clear_db(&e),
            message: format!("database: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ledger_failure_is_answered_with_the_code_the_cli_reports() {
        let cases = [
            (
                LedgerError::AmountOutOfRange("amount: 0".into()),
                "amount_out_of_range",
            ),
            (
                LedgerError::Overflow {
                    user_id: "u".into(),
                    balance: i64::MAX,
                    amount: 1,
                },
                "amount_out_of_range",
            ),
            (
                LedgerError::InvalidArgument {
                    field: "key",
                    reason: "empty".into(),
                },
                "bad_request",
            ),
            (LedgerError::NotFound("user_id: u".into()), "not_found"),
            (LedgerError::Db(sqlx::Error::RowNotFound), "internal"),
        ];
        for (e, code) in cases {
            let text = e.to_string();
            assert_eq!(ControlError::code_of(&e), code, "{text}");
            let answer = ControlError::from(e);
            assert_eq!((answer.code(), answer.to_string()), (code, text));
        }
    }

    #[test]
    fn a_command_meeting_a_fault_of_the_databases_set_up_waits_for_the_fix() {
        let expired = sqlx::Error::Io(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "invalid peer certificate: Expired",
        ));
        assert!(ControlError::from(expired).is_transient());
        assert!(ControlError::from(sqlx::Error::PoolTimedOut).is_transient());
        assert!(!ControlError::from(sqlx::Error::RowNotFound).is_transient());
    }
}
