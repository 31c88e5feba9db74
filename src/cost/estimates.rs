//! Pre-flight estimates: what a `second`, `items` or `cost_usd` block is charged before it
//! runs, from its historical mean (AutoGPT's `block_preflight_estimates.json`, same format).

use std::collections::HashMap;
use std::path::Path;

use serde_json::Value;

use super::CostError;

/// AutoGPT's seeded estimates, built into the binary (readable source:
/// `config/block_preflight_estimates.json`).
pub const BUILTIN_ESTIMATES: &str = include_str!("../../config/block_preflight_estimates.json");

const BUILTIN_ORIGIN: &str = "built-in config/block_preflight_estimates.json";

/// Credits per block id.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Estimates(pub(crate) HashMap<String, i64>);

impl Estimates {
    pub fn builtin() -> Result<Self, CostError> {
        Self::from_json_str(BUILTIN_ESTIMATES, BUILTIN_ORIGIN)
    }

    pub fn load(path: &Path) -> Result<Self, CostError> {
        let (text, origin) = super::read_file(path)?;
        Self::from_json_str(&text, &origin)
    }

    /// Parses the file: `{"estimates": {block_id: {"mean_credits": number ≥ 0, …}, …}, …}`.
    /// Other keys (`version`, `generated_at`, `block_name`, `samples`, …) are not used. Each
    /// mean is rounded half to even, as Python's `round`.
    pub(crate) fn from_json_str(text: &str, origin: &str) -> Result<Self, CostError> {
        let invalid = |location: &str, message: String| CostError::Invalid {
            origin: origin.to_owned(),
            location: location.to_owned(),
            message,
        };
        let doc: Value = serde_json::from_str(text).map_err(|e| CostError::Syntax {
            origin: origin.to_owned(),
            format: "JSON",
            message: e.to_string(),
        })?;
        let Value::Object(mut root) = doc else {
            return Err(invalid("top level", "expected a JSON object".into()));
        };
        let entries = match root.remove("estimates") {
            // A misspelt key would make every estimate-priced block free before it runs.
            None => {
                return Err(invalid(
                    "top level",
                    "no `estimates` object (write \"estimates\": {} for none)".into(),
                ))
            }
            Some(Value::Object(m)) => m,
            Some(_) => return Err(invalid("estimates", "expected an object".into())),
        };
        let mut out = HashMap::with_capacity(entries.len());
        for (block_id, entry) in entries {
            let at = format!("estimates.{block_id}.mean_credits");
            let mean = entry.get("mean_credits").and_then(Value::as_f64);
            match mean {
                Some(m) if (0.0..9.0e18).contains(&m) => {
                    out.insert(block_id, m.round_ties_even() as i64);
                }
                _ => {
                    return Err(invalid(
                        &at,
                        format!(
                            "expected a number ≥ 0 and below 9e18, got {}",
                            entry
                                .get("mean_credits")
                                .map_or("nothing".into(), |v| v.to_string())
                        ),
                    ))
                }
            }
        }
        Ok(Estimates(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Estimates, String> {
        Estimates::from_json_str(text, "t.json").map_err(|e| e.to_string())
    }

    #[test]
    fn means_round_half_to_even_like_python() {
        let e = parse(
            r#"{"version": 1, "estimates": {
                "a": {"mean_credits": 2.6}, "b": {"mean_credits": 2.5},
                "c": {"mean_credits": 3.5}, "d": {"mean_credits": 7, "samples": 9}}}"#,
        )
        .unwrap();
        let get = |k: &str| e.0.get(k).copied();
        assert_eq!(
            (get("a"), get("b"), get("c"), get("d"), get("x")),
            (Some(3), Some(2), Some(4), Some(7), None)
        );
    }

    #[test]
    fn bad_entries_are_named() {
        assert_eq!(
            parse(r#"{"estimates": {"blk": {"mean_credits": -42}}}"#).unwrap_err(),
            "t.json: estimates.blk.mean_credits: expected a number ≥ 0 and below 9e18, got -42"
        );
        // The bound itself is out: every estimate fits an i64 with room for a fee.
        assert_eq!(
            parse(r#"{"estimates": {"blk": {"mean_credits": 9e18}}}"#).unwrap_err(),
            "t.json: estimates.blk.mean_credits: expected a number ≥ 0 and below 9e18, got 9e+18"
        );
        assert_eq!(
            parse(r#"{"estimates": {"blk": {"mean_credits": "oops"}}}"#).unwrap_err(),
            "t.json: estimates.blk.mean_credits: expected a number ≥ 0 and below 9e18, got \"oops\""
        );
        assert_eq!(
            parse("[1, 2, 3]").unwrap_err(),
            "t.json: top level: expected a JSON object"
        );
        assert!(parse("{nope")
            .unwrap_err()
            .starts_with("t.json: not valid JSON: "));
        assert_eq!(
            parse(r#"{"estimate": {"blk": {"mean_credits": 3}}}"#).unwrap_err(),
            r#"t.json: top level: no `estimates` object (write "estimates": {} for none)"#
        );
        assert_eq!(parse(r#"{"estimates": {}}"#).unwrap(), Estimates::default());
    }

    #[test]
    fn the_builtin_file_is_autogpts_seed() {
        let e = Estimates::builtin().unwrap();
        assert_eq!(e.0.len(), 9);
        assert_eq!(e.0["87840993-2053-44b7-8da4-187ad4ee518c"], 1); // SearchTheWebBlock
        assert_eq!(e.0["0b02b072-abe7-11ef-8372-fb5d162dd712"], 1); // ExecuteCodeBlock
        assert_eq!(e.0["3b191d9f-356f-482d-8238-ba04b6d18381"], 6); // OrchestratorBlock
    }
}
