//! Typed access to the fields of a command object. Every error names its field
//! (`"user_id: missing"`, `"amount: expected an integer"`); unknown fields are ignored.

use serde_json::{Map, Number, Value};

use super::ControlError;

/// Refuses a command object that gives a field more than once: of two amounts (or two
/// commands), which was meant is unknowable.
pub(crate) fn check_fields_once(body: &[u8]) -> Result<(), ControlError> {
    let Some(field) = crate::message::repeated_key(body, |_| true) else {
        return Ok(());
    };
    // A name no field has (empty, spaced) is quoted, so the message still reads.
    let plain = !field.is_empty()
        && field
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_');
    let name = if plain { field } else { format!("{field:?}") };
    Err(ControlError::bad_request(format!(
        "{name}: given more than once"
    )))
}

/// 2^63: the first float beyond i64.
const I64_BOUND: f64 = 9_223_372_036_854_775_808.0;

/// Why a number is not a usable i64.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IntError {
    /// Not a number, or one written with a fraction or an exponent.
    NotInteger,
    /// Beyond the 64-bit range.
    OutOfRange,
}

/// `n` as an i64: an integer literal only. serde_json reads anything written with a fraction
/// or exponent as f64, whose value no longer tells what was written (`99.999999999999999` and
/// `9007199254740993.0` read as whole numbers they are not), so a credit amount in that form
/// is refused rather than rounded; one too large for any i64 is out of range whatever its
/// form (integer literals beyond u64 read as f64 too).
pub fn integer(n: &Number) -> Result<i64, IntError> {
    if let Some(i) = n.as_i64() {
        return Ok(i);
    }
    if n.is_u64() {
        return Err(IntError::OutOfRange);
    }
    match n.as_f64() {
        Some(f) if f.is_finite() && f.abs() >= I64_BOUND => Err(IntError::OutOfRange),
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
                "{name}: {} is beyond the 64-bit integer range",
                shown(n)
            ))),
            Err(IntError::NotInteger) => Err(float_form(name)),
        }
    }

    /// An optional integer; anything beyond i64 is a bad request (it is not an amount).
    pub(crate) fn opt_integer(&self, name: &str) -> Result<Option<i64>, ControlError> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::Number(n)) => match integer(n) {
                Ok(i) => Ok(Some(i)),
                Err(IntError::OutOfRange) => Err(ControlError::bad_request(format!(
                    "{name}: {} is beyond the 64-bit integer range",
                    shown(n)
                ))),
                Err(IntError::NotInteger) => Err(float_form(name)),
            },
            Some(_) => Err(not_integer(name)),
        }
    }
}

fn not_integer(name: &str) -> ControlError {
    ControlError::bad_request(format!("{name}: expected an integer"))
}

fn float_form(name: &str) -> ControlError {
    ControlError::bad_request(format!(
        "{name}: expected an integer (digits, without a fraction or exponent)"
    ))
}

/// A number as an error quotes it: one read as a float (an integer literal beyond u64 too)
/// has lost the digits sent, so it is not quoted.
fn shown(n: &Number) -> String {
    if n.is_f64() {
        "the number given".to_owned()
    } else {
        n.to_string()
    }
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
        // Written as a float: its value no longer tells what was sent.
        for float in [
            "5.0",
            "1e2",
            "99.999999999999999",
            "9007199254740993.0",
            "1e18",
            "1.5",
        ] {
            assert_eq!(integer(&num(float)), Err(IntError::NotInteger), "{float}");
        }
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
        assert_eq!(integer(&num("9.3e18")), Err(IntError::OutOfRange));
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
        let big = f.amount("big").unwrap_err();
        assert_eq!(big.code(), "amount_out_of_range");
        assert_eq!(
            big.to_string(),
            "big: the number given is beyond the 64-bit integer range"
        );
        assert_eq!(
            f.opt_integer("limit").unwrap_err().to_string(),
            "limit: expected an integer (digits, without a fraction or exponent)"
        );
        assert_eq!(f.opt_integer("absent"), Ok(None));
    }
}
