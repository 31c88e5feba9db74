//! The block cost table: which executions cost what (AutoGPT `BLOCK_COSTS` semantics).
//!
//! A table maps a block id to an ordered list of entries; the first entry whose `cost_filter`
//! matches the execution's inputs sets the price. Pure data and arithmetic: the only I/O is
//! [`CostTable::load`]. The file format is documented at the top of
//! `config/block_costs.toml`.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use serde_json::{Map, Value};

mod estimates;
mod filter;
mod table;
pub use estimates::{Estimates, BUILTIN_ESTIMATES};
use filter::object_matches;
use table::{block_label, parse_table};

/// The AutoGPT cost table shipped with the binary (readable source: `config/block_costs.toml`).
pub const BUILTIN_TABLE: &str = include_str!("../../config/block_costs.toml");

/// Origin named in messages about [`BUILTIN_TABLE`].
const BUILTIN_ORIGIN: &str = "built-in config/block_costs.toml";

/// Everything that can go wrong loading a table or pricing an execution.
#[derive(Debug, thiserror::Error)]
pub enum CostError {
    /// The table file could not be read.
    #[error("{origin}: cannot read: {source}")]
    Read {
        origin: String,
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid in its format (TOML, or JSON for estimates); the message carries
    /// the line and column.
    #[error("{origin}: not valid {format}: {message}")]
    Syntax {
        origin: String,
        format: &'static str,
        message: String,
    },
    /// A well-formed TOML file that is not a valid table. `location` names the block (id and
    /// name) or shared list, and the entry as "entry N of M" (1-based) where one is concerned.
    #[error("{origin}: {location}: {message}")]
    Invalid {
        origin: String,
        location: String,
        message: String,
    },
    /// The price does not fit an i64; never clamped, a bill must be exact or refused.
    #[error(
        "{block} entry {entry}: cost overflow: {stat} {value} at cost_amount {amount} \
         exceeds {max}",
        max = i64::MAX
    )]
    Overflow {
        block: String,
        entry: usize,
        stat: &'static str,
        value: f64,
        amount: i64,
    },
    /// A stat passed to [`CostTable::price`] is negative, NaN or infinite.
    #[error("stats.{stat}: {value} is not a finite number ≥ 0")]
    InvalidStat { stat: &'static str, value: f64 },
}

/// A run's measurements (AutoGPT's `NodeExecutionStats`, the fields billing reads). Present
/// only post-flight: pricing without stats is pre-flight.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct Stats {
    /// Wall-clock run time in seconds (`second`).
    pub walltime: f64,
    /// Size of the input in bytes (`byte`).
    pub input_size: f64,
    /// Token counts (`tokens`).
    pub input_token_count: u64,
    pub output_token_count: u64,
    pub cache_read_token_count: u64,
    pub cache_creation_token_count: u64,
    /// What the provider reported (`items`, `cost_usd`), and in which unit.
    pub provider_cost: Option<f64>,
    pub provider_cost_type: Option<String>,
}

/// Credits per 10⁶ tokens of one model (AutoGPT's `TokenRate`).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(crate) struct TokenRate {
    pub input: f64,
    pub output: f64,
    pub cache_read: f64,
    pub cache_creation: f64,
}

/// The outcome of pricing one execution.
#[derive(Debug, Clone, PartialEq)]
pub struct Price {
    /// Credits to charge, ≥ 0.
    pub cost: i64,
    /// The filter of the entry that matched (AutoGPT records it as the ledger's `input`);
    /// `None` when nothing matched.
    pub matched_filter: Option<Value>,
    /// The matched entry prices the run by what it used (every type but `run`): an execution
    /// priced 0 before its run is still a paid one. False when nothing matched.
    pub metered: bool,
    /// The block's name from the table, when the block is listed and named.
    pub block_name: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CostType {
    Run,
    Second,
    Byte,
    Items,
    CostUsd,
    Tokens,
}

impl CostType {
    /// Every type by its name in a cost table (`cost_type`).
    const NAMED: [(&'static str, CostType); 6] = [
        ("run", CostType::Run),
        ("second", CostType::Second),
        ("byte", CostType::Byte),
        ("items", CostType::Items),
        ("cost_usd", CostType::CostUsd),
        ("tokens", CostType::Tokens),
    ];

    fn named(name: &str) -> Option<CostType> {
        Self::NAMED
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, t)| *t)
    }
}

#[derive(Debug, Clone)]
struct Entry {
    amount: i64,
    cost_type: CostType,
    /// ≥ 1; `second` and `items` only.
    divisor: i64,
    filter: Map<String, Value>,
}

#[derive(Debug, Clone)]
struct Block {
    name: Option<String>,
    /// Shared between blocks that use the same `[lists]` entry list.
    entries: Arc<[Entry]>,
}

/// A validated cost table. Cheap to clone: entry lists are shared.
#[derive(Debug, Clone)]
pub struct CostTable {
    blocks: HashMap<String, Block>,
    /// Per model name (the `model` of a `tokens` entry's filter).
    token_rates: Arc<HashMap<String, TokenRate>>,
    /// Pre-flight credits per block id for `second`, `items` and `cost_usd` entries.
    estimates: Arc<HashMap<String, i64>>,
}

impl CostTable {
    /// The table built into the binary.
    pub fn builtin() -> Result<Self, CostError> {
        Self::from_toml_str(BUILTIN_TABLE, BUILTIN_ORIGIN)
    }

    /// Parses and validates a table; `origin` (usually the file path) prefixes every message.
    pub fn from_toml_str(text: &str, origin: &str) -> Result<Self, CostError> {
        let doc: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| CostError::Syntax {
                origin: origin.to_owned(),
                format: "TOML",
                message: e.to_string().trim_end().to_owned(),
            })?;
        parse_table(doc).map_err(|(location, message)| CostError::Invalid {
            origin: origin.to_owned(),
            location,
            message,
        })
    }

    /// Reads and validates the table at `path`.
    pub fn load(path: &Path) -> Result<Self, CostError> {
        let (text, origin) = read_file(path)?;
        Self::from_toml_str(&text, &origin)
    }

    /// Whether input `key` of `block_id` can change its price: a cost filter of the block
    /// names it. [`Self::price`] reads no other input.
    pub(crate) fn reads_input(&self, block_id: &str, key: &str) -> bool {
        self.blocks
            .get(block_id)
            .is_some_and(|b| b.entries.iter().any(|e| e.filter.contains_key(key)))
    }

    /// Prices one execution of `block_id` with these inputs: post-flight with the run's
    /// `stats`, pre-flight without (docs/contract.md §4). Unknown block or no matching entry
    /// ⇒ cost 0 and no filter. Stats must be finite and ≥ 0 (checked even when the matching
    /// entry does not use them, so bad data never passes silently).
    pub fn price(
        &self,
        block_id: &str,
        inputs: &Map<String, Value>,
        stats: Option<&Stats>,
    ) -> Result<Price, CostError> {
        if let Some(s) = stats {
            check_stats(s)?;
        }
        let Some(block) = self.blocks.get(block_id) else {
            return Ok(Price {
                cost: 0,
                matched_filter: None,
                metered: false,
                block_name: None,
            });
        };
        for (i, entry) in block.entries.iter().enumerate() {
            if !object_matches(&entry.filter, inputs) {
                continue;
            }
            let at = || block_label(block_id, block.name.as_deref());
            let cost = match stats {
                None => self.preflight(block_id, entry),
                Some(s) => self.postflight(entry, s),
            }
            .map_err(|(stat, value)| CostError::Overflow {
                block: at(),
                entry: i + 1,
                stat,
                value,
                amount: entry.amount,
            })?;
            return Ok(Price {
                cost,
                matched_filter: Some(Value::Object(entry.filter.clone())),
                metered: entry.cost_type != CostType::Run,
                block_name: block.name.clone(),
            });
        }
        Ok(Price {
            cost: 0,
            matched_filter: None,
            metered: false,
            block_name: block.name.clone(),
        })
    }

    /// The price before the run: the flat amount, or the block's historical estimate for
    /// the types whose real cost is only known afterwards.
    fn preflight(&self, block_id: &str, e: &Entry) -> Result<i64, (&'static str, f64)> {
        Ok(match e.cost_type {
            CostType::Run | CostType::Tokens => e.amount,
            CostType::Byte => 0,
            CostType::Second | CostType::Items | CostType::CostUsd => {
                self.estimates.get(block_id).copied().unwrap_or(0)
            }
        })
    }

    /// The price of a run with `s` (AutoGPT's newest `block_usage_cost`, in f64 like its
    /// Python, so every figure matches to the credit). Err names the stat that overflowed.
    fn postflight(&self, e: &Entry, s: &Stats) -> Result<i64, (&'static str, f64)> {
        let per_unit = |stat: &'static str, x: f64| -> Result<i64, (&'static str, f64)> {
            if x <= 0.0 {
                return Ok(0);
            }
            ceil_i64(x / e.divisor as f64)
                .and_then(|units| units.checked_mul(e.amount))
                .ok_or((stat, x))
        };
        match e.cost_type {
            CostType::Run => Ok(e.amount),
            CostType::Byte => floor_mul(s.input_size, e.amount).ok_or(("input_size", s.input_size)),
            CostType::Second => per_unit("walltime", s.walltime),
            CostType::Items => {
                let items = match s.provider_cost_type.as_deref() {
                    Some("items") => s.provider_cost.unwrap_or(0.0).floor().max(0.0),
                    _ => 0.0,
                };
                per_unit("provider_cost", items)
            }
            CostType::CostUsd => match s.provider_cost_type.as_deref() {
                None | Some("") | Some("cost_usd") => {
                    let usd = s.provider_cost.unwrap_or(0.0).max(0.0);
                    ceil_i64(usd * e.amount as f64).ok_or(("provider_cost", usd))
                }
                Some(_) => Ok(0),
            },
            CostType::Tokens => self.token_credits(e, s),
        }
    }

    /// ceil(Σ tokens × rate / 10⁶) with the rates of the entry's model; the flat amount when
    /// the model has none.
    fn token_credits(&self, e: &Entry, s: &Stats) -> Result<i64, (&'static str, f64)> {
        let model = e.filter.get("model").and_then(Value::as_str);
        let Some(r) = model.and_then(|m| self.token_rates.get(m)) else {
            return Ok(e.amount);
        };
        let total = s.input_token_count as f64 * r.input
            + s.output_token_count as f64 * r.output
            + s.cache_read_token_count as f64 * r.cache_read
            + s.cache_creation_token_count as f64 * r.cache_creation;
        ceil_i64(total / 1e6).ok_or(("tokens", total))
    }

    /// Replaces the pre-flight estimates.
    pub(crate) fn with_estimates(mut self, estimates: Estimates) -> Self {
        self.estimates = Arc::new(estimates.0);
        self
    }

    /// Number of blocks with an entry list.
    pub(crate) fn block_count(&self) -> usize {
        self.blocks.len()
    }
}

/// A file's text and its path as named in errors.
fn read_file(path: &Path) -> Result<(String, String), CostError> {
    let origin = path.display().to_string();
    match std::fs::read_to_string(path) {
        Ok(text) => Ok((text, origin)),
        Err(source) => Err(CostError::Read { origin, source }),
    }
}

fn check_stats(s: &Stats) -> Result<(), CostError> {
    check_stat("walltime", s.walltime)?;
    check_stat("input_size", s.input_size)?;
    if let Some(c) = s.provider_cost {
        check_stat("provider_cost", c)?;
    }
    Ok(())
}

/// ceil(x) as an i64 (0 for x ≤ 0), or `None` when it does not fit.
fn ceil_i64(x: f64) -> Option<i64> {
    // 2^63: the first f64 above i64::MAX; casts of f64 values below it are exact.
    const LIMIT: f64 = 9_223_372_036_854_775_808.0;
    if x.is_nan() {
        return None;
    }
    let c = x.ceil().max(0.0);
    (c < LIMIT).then_some(c as i64)
}

fn check_stat(stat: &'static str, value: f64) -> Result<(), CostError> {
    if value.is_finite() && value >= 0.0 {
        Ok(())
    } else {
        Err(CostError::InvalidStat { stat, value })
    }
}

/// floor(x × n) for finite x ≥ 0 and n ≥ 0, or `None` when it exceeds `i64::MAX`.
///
/// Like AutoGPT's `int(x * amount)`: one correctly rounded f64 product, then floor, so a
/// decimal stat gives the decimal answer (0.7 s × 10 ⇒ 7; the exact binary product of the
/// double nearest 0.7 would give 6). Integral stats (byte counts, whole seconds) use exact
/// integer arithmetic instead, as f64 cannot hold every i64.
fn floor_mul(x: f64, n: i64) -> Option<i64> {
    if !(x.is_finite() && x >= 0.0) || n < 0 {
        return None;
    }
    // 2^63: the first f64 above i64::MAX; casts of f64 values below it are exact.
    const LIMIT: f64 = 9_223_372_036_854_775_808.0;
    if x.fract() == 0.0 && x < LIMIT {
        return (x as i64).checked_mul(n);
    }
    let product = (x * n as f64).floor();
    (product < LIMIT).then_some(product as i64)
}

#[cfg(test)]
mod tests;

/// Every cost type against the figures of AutoGPT's own tests (its newest
/// `block_usage_cost_test.py` and `billing_reconciliation_test.py`), in the same f64
/// arithmetic as its Python.
#[cfg(test)]
mod autogpt_figures;
