//! Sums of many balances (a sweep's grants, a month's movements, what all accounts hold): i128,
//! wider than one balance, and never rounded or capped on their way in or out.

use super::LedgerError;

/// A total of credits as JSON: a number, or past 2^64 (only absurd refill targets get there,
/// and JSON numbers here stop at 2^64) its exact digits as a string, never rounded or capped.
pub(crate) fn serialize_total<S: serde::Serializer>(total: &i128, s: S) -> Result<S::Ok, S::Error> {
    match (i64::try_from(*total), u64::try_from(*total)) {
        (Ok(v), _) => s.serialize_i64(v),
        (_, Ok(v)) => s.serialize_u64(v),
        _ => s.serialize_str(&total.to_string()),
    }
}

/// A sum the database computed exactly (numeric, read as text), or an error saying which sum
/// outgrew an i128 (more rows than a ledger can hold): never clamped.
pub(crate) fn parse_sum(sum: &str, what: &str) -> Result<i128, LedgerError> {
    sum.parse().map_err(|_| too_large(what))
}

pub(crate) fn too_large(what: &str) -> LedgerError {
    LedgerError::AmountOutOfRange(format!("{what} is beyond the 128-bit integer range"))
}
