//! Which cost entry matches an execution's inputs: AutoGPT's `_is_cost_filter_match`, with
//! Python's truthiness and equality.

use serde_json::{Map, Number, Value};

/// AutoGPT `_is_cost_filter_match`: does `input` satisfy `filter`?
///
/// If either side is not an object: Python `==` (see [`py_eq`]). If both are: every filter
/// key k needs (input[k] falsy AND filter[k] falsy) OR (input[k] truthy AND input[k] matches
/// filter[k]); input keys the filter does not name are ignored.
pub(super) fn filter_matches(filter: &Value, input: &Value) -> bool {
    match (filter, input) {
        (Value::Object(f), Value::Object(i)) => object_matches(f, i),
        _ => py_eq(filter, input),
    }
}

pub(super) fn object_matches(filter: &Map<String, Value>, input: &Map<String, Value>) -> bool {
    filter.iter().all(|(key, want)| {
        let got = input.get(key);
        if is_falsy(got) {
            is_falsy(Some(want))
        } else {
            // `got` is Some here: a missing key is falsy.
            got.is_some_and(|got| filter_matches(want, got))
        }
    })
}

/// Python truthiness of an input value: missing, null, false, 0, 0.0, "", [] and {} are falsy.
pub(super) fn is_falsy(v: Option<&Value>) -> bool {
    match v {
        None | Some(Value::Null) => true,
        Some(Value::Bool(b)) => !b,
        Some(Value::Number(n)) => number_is_zero(n),
        Some(Value::String(s)) => s.is_empty(),
        Some(Value::Array(a)) => a.is_empty(),
        Some(Value::Object(o)) => o.is_empty(),
    }
}

fn number_is_zero(n: &Number) -> bool {
    match (n.as_i64(), n.as_u64(), n.as_f64()) {
        (Some(i), _, _) => i == 0,
        (_, Some(u), _) => u == 0,
        (_, _, Some(f)) => f == 0.0, // also -0.0
        _ => false,
    }
}

/// Python `==` on JSON values, as AutoGPT's filters are compared: numbers by value (1 == 1.0,
/// exact, no float rounding), and, like Python where bool is an int, true == 1 and
/// false == 0 (also 1.0 / 0.0). Lists compare element-wise in order and objects by equal key
/// sets, both recursively with this same equality.
fn py_eq(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Null, Value::Null) => true,
        (Value::String(x), Value::String(y)) => x == y,
        (Value::Bool(x), Value::Bool(y)) => x == y,
        (Value::Number(x), Value::Number(y)) => num_eq(x, y),
        (Value::Bool(x), Value::Number(n)) | (Value::Number(n), Value::Bool(x)) => {
            num_eq(n, &Number::from(u8::from(*x)))
        }
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(p, q)| py_eq(p, q))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| py_eq(v, w)))
        }
        _ => false,
    }
}

/// Exact numeric equality across serde_json's u64 / i64 / f64 representations.
fn num_eq(a: &Number, b: &Number) -> bool {
    match (as_int(a), as_int(b)) {
        (Some(x), Some(y)) => x == y,
        (Some(i), None) => b.as_f64().is_some_and(|f| float_eq_int(f, i)),
        (None, Some(i)) => a.as_f64().is_some_and(|f| float_eq_int(f, i)),
        (None, None) => match (a.as_f64(), b.as_f64()) {
            (Some(x), Some(y)) => x == y,
            _ => false,
        },
    }
}

fn as_int(n: &Number) -> Option<i128> {
    n.as_i64()
        .map(i128::from)
        .or_else(|| n.as_u64().map(i128::from))
}

/// Whether float `f` equals integer `i` exactly (Python compares int and float exactly).
fn float_eq_int(f: f64, i: i128) -> bool {
    // |f| < 2^64 is checked first so the cast is exact, not saturating.
    f.is_finite() && f.fract() == 0.0 && f.abs() < 18_446_744_073_709_551_616.0 && f as i128 == i
}
