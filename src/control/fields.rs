//! Typed access to the fields of a command object. Every error names its field
//! (`"user_id: missing"`, `"amount: expected an integer"`); unknown fields are ignored.

use serde_json::{Map, Number, Value};

use super::ControlError;

/// Refuses a command object that gives a field more than once: of two amounts (or two
/// commands), which was meant is unknowable.
pub(crate) fn check_fields_once(body: &[u8]) -> Result<(), ControlError> {
    match crate::message::repeated_key(body, |_| true) {
        Some(field) => Err(ControlError::bad_request(format!(
            "{field}: given more than once"
        ))),
        None => Ok(()),
    }
}

/// Integral floats are exact only up to 2^53.
const MAX_EXACT_FLOAT: f64 = 9_007_199_254_740_992.0;
/// 2^63: the first float beyond i64.
const I64_BOUND: f64 = 9_223_372_036_854_775_808.0;

/// Why a number is not a usable i64.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IntError {
    /// Not a number, or a number with a fraction.
    NotInteger,
    /// An integral float between 2^53 and 2^63: it may already have been rounded.
    Inexact,
    /// Integral but beyond the 64-bit range.
    OutOfRange,
}

/// `n` as an i64. serde_json reads integer literals beyond u64 (and anything written with a
/// fraction or exponent) as f64, so those are judged by value.
pub fn integer(n: &Number) -> Result<i64, IntError> {
    if let Some(i) = n.as_i64() {
        return Ok(i);
    }
    if n.is_u64() {
        return Err(IntError::OutOfRange);
    }
    match n.as_f64() {
        Some(f) if f.is_finite() && f.fract() == 0.0 => {
            if f.abs() >= I64_BOUND {
                Err(IntError::OutOfRange)
            } else if f.abs() > MAX_EXACT_FLOAT {
                Err(IntError::Inexact)
            } else {
                // Exact: |f| ≤ 2^53.
                Ok(f as i64)
            }
        }
        _ => Err(IntError::NotInteger),
    }
}

pub struct Fields<'a>(&'a Map<String, Value>);

impl<'a> Fields<'a> {
    pub fn new(map: &'a Map<String, Value>) -> Self {
        Fields(map)
    }

    /// A field that is absent or `null` counts as missing.
    pub(crate) fn get(&self, name: &str) -> Option<&'a Value> {
        self.0.get(name).filter(|v| !v.is_null())
    }

    pub fn string(&self, name: &str) -> Result<&'a str, ControlError> {
        self.opt_string(name)?
            .ok_or_else(|| ControlError::bad_request(format!("{name}: missing")))
    }

    pub(crate) fn opt_string(&self, name: &str) -> Result<Option<&'a str>, ControlError> {
        match self.get(name) {
            None => Ok(None),
            // PostgreSQL text cannot hold NUL: refused here rather than by the database.
            Some(Value::String(s)) if s.contains('\0') => Err(ControlError::bad_request(format!(
                "{name}: contains a NUL character"
            ))),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(ControlError::bad_request(format!(
                "{name}: expected a string"
            ))),
        }
    }

    /// A credit amount: an integer > 0 that fits in 64 bits.
    pub fn amount(&self, name: &str) -> Result<i64, ControlError> {
        let v = self
            .get(name)
            .ok_or_else(|| ControlError::bad_request(format!("{name}: missing")))?;
        let n = match v {
            Value::Number(n) => n,
            _ => return Err(not_integer(name)),
        };
        match integer(n) {
            Ok(a) if a > 0 => Ok(a),
            Ok(a) => Err(ControlError::AmountOutOfRange(format!(
                "{name}: {a} must be greater than 0"
            ))),
            Err(IntError::OutOfRange) => Err(ControlError::AmountOutOfRange(format!(
                "{name}: {n} is beyond the 64-bit integer range"
            ))),
            Err(IntError::Inexact) => Err(inexact(name)),
            Err(IntError::NotInteger) => Err(not_integer(name)),
        }
    }

    /// An optional integer; anything beyond i64 is a bad request (it is not an amount).
    pub(crate) fn opt_integer(&self, name: &str) -> Result<Option<i64>, ControlError> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::Number(n)) => match integer(n) {
                Ok(i) => Ok(Some(i)),
                Err(IntError::OutOfRange) => Err(ControlError::bad_request(format!(
                    "{name}: {n} is beyond the 64-bit integer range"
                ))),
                Err(IntError::Inexact) => Err(inexact(name)),
                Err(IntError::NotInteger) => Err(not_integer(name)),
            },
            Some(_) => Err(not_integer(name)),
        }
    }
}

fn not_integer(name: &str) -> ControlError {
    ControlError::bad_request(format!("{name}: expected an integer"))
}

fn inexact(name: &str) -> ControlError {
    ControlError::bad_request(format!(
        "{name}: expected an integer (a float this large may be rounded; write the digits)"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn num(s: &str) -> Number {
        serde_json::from_str(s).unwrap()
    }

    #[test]
    fn integers_are_judged_by_value() {
        assert_eq!(integer(&num("42")), Ok(42));
        assert_eq!(integer(&num("-5")), Ok(-5));
        assert_eq!(integer(&num("5.0")), Ok(5));
        assert_eq!(integer(&num("9223372036854775807")), Ok(i64::MAX));
        assert_eq!(
            integer(&num("9223372036854775808")),
            Err(IntError::OutOfRange)
        );
        assert_eq!(
            integer(&num("99999999999999999999")),
            Err(IntError::OutOfRange)
        );
        assert_eq!(integer(&num("1e30")), Err(IntError::OutOfRange));
        assert_eq!(integer(&num("-1e30")), Err(IntError::OutOfRange));
        assert_eq!(integer(&num("1e18")), Err(IntError::Inexact));
        assert_eq!(integer(&num("1.5")), Err(IntError::NotInteger));
    }

    #[test]
    fn errors_name_the_field() {
        let map: Map<String, Value> = serde_json::from_str(
            r#"{"user_id": 5, "amount": "100", "zero": 0, "big": 1e30, "limit": 1.5, "none": null}"#,
        )
        .unwrap();
        let f = Fields::new(&map);
        assert_eq!(
            f.string("user_id").unwrap_err().to_string(),
            "user_id: expected a string"
        );
        assert_eq!(f.string("none").unwrap_err().to_string(), "none: missing");
        assert_eq!(
            f.amount("amount").unwrap_err().to_string(),
            "amount: expected an integer"
        );
        assert_eq!(f.amount("zero").unwrap_err().code(), "amount_out_of_range");
        assert_eq!(f.amount("big").unwrap_err().code(), "amount_out_of_range");
        assert_eq!(
            f.opt_integer("limit").unwrap_err().to_string(),
            "limit: expected an integer"
        );
        assert_eq!(f.opt_integer("absent"), Ok(None));
    }
}
