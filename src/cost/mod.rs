//! The block cost table: which executions cost what (AutoGPT `BLOCK_COSTS` semantics).
//!
//! A table maps a block id to an ordered list of entries; the first entry whose `cost_filter`
//! matches the execution's inputs sets the price. Pure data and arithmetic: the only I/O is
//! [`CostTable::load`]. The file format is documented at the top of
//! `config/block_costs.toml`.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use serde_json::{Map, Number, Value};

mod estimates;
pub use estimates::{Estimates, BUILTIN_ESTIMATES};

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

// ---------------------------------------------------------------------------------------------
// Filter matching

/// AutoGPT `_is_cost_filter_match`: does `input` satisfy `filter`?
///
/// If either side is not an object: Python `==` (see [`py_eq`]). If both are: every filter
/// key k needs (input[k] falsy AND filter[k] falsy) OR (input[k] truthy AND input[k] matches
/// filter[k]); input keys the filter does not name are ignored.
pub(crate) fn filter_matches(filter: &Value, input: &Value) -> bool {
    match (filter, input) {
        (Value::Object(f), Value::Object(i)) => object_matches(f, i),
        _ => py_eq(filter, input),
    }
}

fn object_matches(filter: &Map<String, Value>, input: &Map<String, Value>) -> bool {
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
pub(crate) fn is_falsy(v: Option<&Value>) -> bool {
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

// ---------------------------------------------------------------------------------------------
// Loading

/// (location, message) of a validation failure; the caller adds the origin.
type Problem = (String, String);

const TOP_KEYS: &str = "`block`, `lists` or `token_rates`";
const BLOCK_KEYS: &str = "id, name, costs, costs_from";
const ENTRY_KEYS: [&str; 4] = ["cost_amount", "cost_type", "cost_divisor", "cost_filter"];

/// `value` as a table whose keys are all in `allowed`.
fn table_of(value: toml::Value, allowed: &[&str]) -> Result<toml::Table, String> {
    let toml::Value::Table(t) = value else {
        return Err(format!("expected a table, got {}", toml_type(&value)));
    };
    match t.keys().find(|k| !allowed.contains(&k.as_str())) {
        Some(key) => Err(format!(
            "unknown key `{key}` (expected {})",
            allowed.join(", ")
        )),
        None => Ok(t),
    }
}

fn block_label(id: &str, name: Option<&str>) -> String {
    match name {
        Some(name) => format!("block {id} ({name})"),
        None => format!("block {id}"),
    }
}

fn toml_type(v: &toml::Value) -> &'static str {
    match v {
        toml::Value::String(_) => "string",
        toml::Value::Integer(_) => "integer",
        toml::Value::Float(_) => "float",
        toml::Value::Boolean(_) => "boolean",
        toml::Value::Datetime(_) => "datetime",
        toml::Value::Array(_) => "array",
        toml::Value::Table(_) => "table",
    }
}

/// The shared entry lists under `[lists]`, by name.
type Lists = HashMap<String, Arc<[Entry]>>;

fn parse_table(mut doc: toml::Table) -> Result<CostTable, Problem> {
    if let Some(key) = doc
        .keys()
        .find(|k| !matches!(k.as_str(), "block" | "lists" | "token_rates"))
    {
        return Err((
            "top level".into(),
            format!("unknown key `{key}` (expected {TOP_KEYS})"),
        ));
    }
    let lists = parse_lists(doc.remove("lists"))?;
    let token_rates = parse_token_rates(doc.remove("token_rates"))?;
    let blocks = block_array(doc.remove("block"))?;
    let total = blocks.len();
    let mut out: HashMap<String, Block> = HashMap::with_capacity(total);
    let mut first_seen: HashMap<String, usize> = HashMap::with_capacity(total);
    for (i, value) in blocks.into_iter().enumerate() {
        let position = format!("block #{} of {total}", i + 1);
        let (id, block) = parse_block(value, position, &lists)?;
        if let Some(first) = first_seen.get(&id) {
            return Err((
                block_label(&id, block.name.as_deref()),
                format!("duplicate block id (first defined by block #{first} of {total})"),
            ));
        }
        first_seen.insert(id.clone(), i + 1);
        out.insert(id, block);
    }
    Ok(CostTable {
        blocks: out,
        token_rates: Arc::new(token_rates),
        estimates: Arc::default(),
    })
}

/// `[token_rates]`: model name → `{ input, output, cache_read?, cache_creation? }`, credits per
/// 10⁶ tokens, each a number ≥ 0.
fn parse_token_rates(value: Option<toml::Value>) -> Result<HashMap<String, TokenRate>, Problem> {
    let table = match value {
        None => return Ok(HashMap::new()),
        Some(toml::Value::Table(t)) => t,
        Some(other) => {
            return Err((
                "token_rates".into(),
                format!("expected a table, got {}", toml_type(&other)),
            ))
        }
    };
    table
        .into_iter()
        .map(|(model, v)| {
            let at = format!("token_rates.{model}");
            token_rate(v).map(|r| (model, r)).map_err(|m| (at, m))
        })
        .collect()
}

fn token_rate(value: toml::Value) -> Result<TokenRate, String> {
    let mut t = table_of(value, &["input", "output", "cache_read", "cache_creation"])?;
    let mut rate = |key: &str, required: bool| -> Result<f64, String> {
        match t.remove(key) {
            None if required => Err(format!("{key}: missing")),
            None => Ok(0.0),
            Some(toml::Value::Integer(n)) if n >= 0 => Ok(n as f64),
            Some(toml::Value::Float(f)) if f.is_finite() && f >= 0.0 => Ok(f),
            Some(other) => Err(format!(
                "{key}: expected a number ≥ 0, got {}",
                match other {
                    toml::Value::Integer(n) => n.to_string(),
                    toml::Value::Float(f) => f.to_string(),
                    v => toml_type(&v).to_owned(),
                }
            )),
        }
    };
    Ok(TokenRate {
        input: rate("input", true)?,
        output: rate("output", true)?,
        cache_read: rate("cache_read", false)?,
        cache_creation: rate("cache_creation", false)?,
    })
}

fn parse_lists(value: Option<toml::Value>) -> Result<Lists, Problem> {
    let table = match value {
        None => toml::Table::new(),
        Some(toml::Value::Table(table)) => table,
        Some(other) => {
            return Err((
                "lists".into(),
                format!("expected a table, got {}", toml_type(&other)),
            ))
        }
    };
    let mut lists = Lists::new();
    for (name, value) in table {
        let location = format!("list `{name}`");
        let entries = parse_entries(value, &location)?;
        lists.insert(name, entries.into());
    }
    Ok(lists)
}

/// The `[[block]]` tables, not yet checked one by one.
fn block_array(value: Option<toml::Value>) -> Result<Vec<toml::Value>, Problem> {
    match value {
        None => Ok(Vec::new()),
        Some(toml::Value::Array(blocks)) => Ok(blocks),
        Some(other) => Err((
            "block".into(),
            format!(
                "expected an array of tables ([[block]]), got {}",
                toml_type(&other)
            ),
        )),
    }
}

/// One `[[block]]` table: its id and the block. `position` locates it until its id is known.
fn parse_block(
    value: toml::Value,
    position: String,
    lists: &Lists,
) -> Result<(String, Block), Problem> {
    let toml::Value::Table(mut block) = value else {
        return Err((
            position,
            format!("expected a table, got {}", toml_type(&value)),
        ));
    };
    let id = block_id(block.remove("id")).map_err(|message| (position, message))?;
    let name =
        block_name(block.remove("name")).map_err(|message| (block_label(&id, None), message))?;
    let label = block_label(&id, name.as_deref());
    if let Some(key) = block.keys().find(|k| *k != "costs" && *k != "costs_from") {
        return Err((
            label,
            format!("unknown key `{key}` (expected {BLOCK_KEYS})"),
        ));
    }
    let entries = block_entries(
        block.remove("costs"),
        block.remove("costs_from"),
        &label,
        lists,
    )?;
    Ok((id, Block { name, entries }))
}

fn block_id(value: Option<toml::Value>) -> Result<String, String> {
    match value {
        Some(toml::Value::String(id)) if !id.trim().is_empty() => Ok(id),
        Some(toml::Value::String(_)) => Err("id: must not be empty".into()),
        Some(other) => Err(format!("id: expected a string, got {}", toml_type(&other))),
        None => Err("id: missing".into()),
    }
}

fn block_name(value: Option<toml::Value>) -> Result<Option<String>, String> {
    match value {
        None => Ok(None),
        Some(toml::Value::String(name)) => Ok(Some(name)),
        Some(other) => Err(format!(
            "name: expected a string, got {}",
            toml_type(&other)
        )),
    }
}

/// A block's entries: its own `costs`, or the shared list its `costs_from` names.
fn block_entries(
    costs: Option<toml::Value>,
    costs_from: Option<toml::Value>,
    label: &str,
    lists: &Lists,
) -> Result<Arc<[Entry]>, Problem> {
    let at = |message: String| (label.to_owned(), message);
    match (costs, costs_from) {
        (Some(costs), None) => Ok(parse_entries(costs, label)?.into()),
        (None, Some(toml::Value::String(list))) => match lists.get(&list) {
            Some(entries) => Ok(Arc::clone(entries)),
            None => Err(at(format!("costs_from: no list `{list}` under [lists]"))),
        },
        (None, Some(other)) => Err(at(format!(
            "costs_from: expected a string, got {}",
            toml_type(&other)
        ))),
        (Some(_), Some(_)) => Err(at("give either `costs` or `costs_from`, not both".into())),
        (None, None) => Err(at("missing `costs` (or `costs_from`)".into())),
    }
}

fn parse_entries(value: toml::Value, owner: &str) -> Result<Vec<Entry>, Problem> {
    let toml::Value::Array(items) = value else {
        return Err((
            owner.to_owned(),
            format!(
                "costs: expected an array of entries, got {}",
                toml_type(&value)
            ),
        ));
    };
    let total = items.len();
    items
        .into_iter()
        .enumerate()
        .map(|(i, item)| {
            parse_entry(item)
                .map_err(|message| (format!("{owner} entry {} of {total}", i + 1), message))
        })
        .collect()
}

fn parse_entry(value: toml::Value) -> Result<Entry, String> {
    let mut table = table_of(value, &ENTRY_KEYS)?;
    let amount = match table.remove("cost_amount") {
        Some(toml::Value::Integer(n)) if n >= 0 => n,
        Some(toml::Value::Integer(n)) => return Err(format!("cost_amount: must be ≥ 0, got {n}")),
        Some(other) => {
            return Err(format!(
                "cost_amount: expected an integer, got {}",
                toml_type(&other)
            ))
        }
        None => return Err("cost_amount: missing".into()),
    };
    let cost_type = match table.remove("cost_type") {
        Some(toml::Value::String(s)) => match s.as_str() {
            "run" => CostType::Run,
            "second" => CostType::Second,
            "byte" => CostType::Byte,
            "items" => CostType::Items,
            "cost_usd" => CostType::CostUsd,
            "tokens" => CostType::Tokens,
            _ => {
                return Err(format!(
                    "cost_type: unknown variant `{s}`, expected one of `run`, `second`, \
                     `byte`, `items`, `cost_usd`, `tokens`"
                ))
            }
        },
        Some(other) => {
            return Err(format!(
                "cost_type: expected a string, got {}",
                toml_type(&other)
            ))
        }
        None => return Err("cost_type: missing".into()),
    };
    let filter = match table.remove("cost_filter") {
        Some(toml::Value::Table(t)) => table_to_json(t, "cost_filter")?,
        Some(other) => {
            return Err(format!(
                "cost_filter: expected a table, got {}",
                toml_type(&other)
            ))
        }
        None => {
            return Err(
                "cost_filter: missing (use `cost_filter = {}` to match every execution)".into(),
            )
        }
    };
    let divisor = divisor(table.remove("cost_divisor"), cost_type)?;
    if cost_type == CostType::Tokens && !filter.get("model").is_some_and(Value::is_string) {
        return Err(
            "cost_filter.model: a `tokens` entry needs the model its token rates are for".into(),
        );
    }
    Ok(Entry {
        amount,
        cost_type,
        divisor,
        filter,
    })
}

/// `cost_divisor`: an integer ≥ 1, default 1, for `second` and `items` entries only.
fn divisor(value: Option<toml::Value>, cost_type: CostType) -> Result<i64, String> {
    match value {
        None => Ok(1),
        Some(_) if !matches!(cost_type, CostType::Second | CostType::Items) => {
            Err("cost_divisor: only `second` and `items` entries take a divisor".into())
        }
        Some(toml::Value::Integer(n)) if n >= 1 => Ok(n),
        Some(toml::Value::Integer(n)) => Err(format!("cost_divisor: must be ≥ 1, got {n}")),
        Some(other) => Err(format!(
            "cost_divisor: expected an integer, got {}",
            toml_type(&other)
        )),
    }
}

/// Converts a filter to JSON, the form inputs arrive in. `path` locates errors.
fn toml_to_json(value: toml::Value, path: &str) -> Result<Value, String> {
    Ok(match value {
        toml::Value::String(s) => Value::String(s),
        toml::Value::Integer(n) => Value::from(n),
        toml::Value::Boolean(b) => Value::Bool(b),
        toml::Value::Float(f) => match Number::from_f64(f) {
            Some(n) => Value::Number(n),
            None => return Err(format!("{path}: {f} has no JSON equivalent")),
        },
        toml::Value::Datetime(_) => {
            return Err(format!(
                "{path}: TOML dates cannot appear in JSON inputs; write them as strings"
            ))
        }
        toml::Value::Array(items) => Value::Array(
            items
                .into_iter()
                .enumerate()
                .map(|(i, v)| toml_to_json(v, &format!("{path}[{i}]")))
                .collect::<Result<_, _>>()?,
        ),
        toml::Value::Table(table) => Value::Object(table_to_json(table, path)?),
    })
}

fn table_to_json(table: toml::Table, path: &str) -> Result<Map<String, Value>, String> {
    table
        .into_iter()
        .map(|(k, v)| {
            let sub = format!("{path}.{k}");
            toml_to_json(v, &sub).map(|v| (k, v))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    const OPENAI: &str = "53c25cb8-e3ee-465c-a4d1-e75a4c899c2a";
    const TEXT_GEN: &str = "1f292d4a-41a4-4977-9684-7c8d560b9f91";
    const LLM_BLOCKS: [&str; 7] = [
        "553ec5b8-6c45-4299-8d75-b394d05f72ff",
        "3b191d9f-356f-482d-8238-ba04b6d18381",
        "32a87eab-381e-4dd4-bdb8-4c47151be35a",
        "1f292d4a-41a4-4977-9684-7c8d560b9f91",
        "ed55ac19-356e-4243-a6cb-bc599e9b716f",
        "a0a69be1-4528-491c-a85a-a4ab6873e3f0",
        "9c0b0450-d199-458b-a731-072189dd6593",
    ];

    fn obj(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            other => panic!("test input is not an object: {other}"),
        }
    }

    fn table(text: &str) -> CostTable {
        match CostTable::from_toml_str(text, "test.toml") {
            Ok(t) => t,
            Err(e) => panic!("{e}"),
        }
    }

    fn invalid(text: &str) -> String {
        match CostTable::from_toml_str(text, "test.toml") {
            Ok(_) => panic!("accepted an invalid table:\n{text}"),
            Err(e) => e.to_string(),
        }
    }

    fn builtin() -> CostTable {
        match CostTable::builtin() {
            Ok(t) => t,
            Err(e) => panic!("{e}"),
        }
    }

    fn cost(t: &CostTable, block: &str, inputs: Value, stats: Stats) -> i64 {
        match t.price(block, &obj(inputs), Some(&stats)) {
            Ok(p) => p.cost,
            Err(e) => panic!("{e}"),
        }
    }

    fn m(filter: Value, input: Value) -> bool {
        filter_matches(&filter, &input)
    }

    // ---- filter rules -----------------------------------------------------------------------

    #[test]
    fn first_matching_entry_wins() {
        let t = table(
            r#"
            [[block]]
            id = "b"
            costs = [
              { cost_amount = 7, cost_type = "run", cost_filter = { model = "x" } },
              { cost_amount = 3, cost_type = "run", cost_filter = {} },
              { cost_amount = 9, cost_type = "run", cost_filter = { model = "x" } },
            ]"#,
        );
        assert_eq!(cost(&t, "b", json!({"model": "x"}), Stats::default()), 7);
        assert_eq!(cost(&t, "b", json!({"model": "y"}), Stats::default()), 3);
        let p = t.price("b", &obj(json!({"model": "y"})), None).ok();
        assert_eq!(p.and_then(|p| p.matched_filter), Some(json!({})));
    }

    #[test]
    fn extra_input_keys_are_ignored() {
        let filter = json!({"model": "m", "credentials": {"id": "c", "type": "api_key"}});
        let input = json!({"model": "m", "prompt": "hi",
                           "credentials": {"id": "c", "type": "api_key", "title": "Mine"}});
        assert!(m(filter.clone(), input));
        // ... but every filter key must be there.
        assert!(!m(
            filter,
            json!({"model": "m", "credentials": {"id": "c"}})
        ));
    }

    #[test]
    fn falsy_filter_values_match_every_falsy_input() {
        let falsy = [
            json!(null),
            json!(""),
            json!(0),
            json!(0.0),
            json!(-0.0),
            json!(false),
            json!({}),
            json!([]),
        ];
        for f in &falsy {
            assert!(m(json!({"k": f}), json!({})), "filter {f} vs missing key");
            for i in &falsy {
                assert!(
                    m(json!({"k": f}), json!({"k": i})),
                    "filter {f} vs input {i}"
                );
            }
        }
    }

    #[test]
    fn truthy_filter_never_matches_a_missing_or_falsy_input() {
        for f in [
            json!("a"),
            json!(1),
            json!(true),
            json!({"x": 1}),
            json!([0]),
            json!(0.5),
        ] {
            assert!(!m(json!({"k": f}), json!({})), "filter {f} vs missing key");
            assert!(
                !m(json!({"k": f}), json!({"k": null})),
                "filter {f} vs null"
            );
            assert!(!m(json!({"k": f}), json!({"k": 0})), "filter {f} vs 0");
        }
    }

    #[test]
    fn falsy_filter_does_not_match_a_truthy_input() {
        assert!(!m(
            json!({"raw_content": false}),
            json!({"raw_content": true})
        ));
        assert!(!m(json!({"n": 0}), json!({"n": 5})));
        assert!(!m(json!({"s": ""}), json!({"s": "x"})));
        // Except an empty-object filter: a truthy object input then matches it as a subset
        // (Python gives the same: all() over no keys is true).
        assert!(m(json!({"o": {}}), json!({"o": {"a": 1}})));
        assert!(!m(json!({"l": []}), json!({"l": [0]})));
        assert!(!m(json!({"z": null}), json!({"z": "x"})));
    }

    #[test]
    fn nested_objects_match_recursively() {
        let f = json!({"a": {"b": {"c": 1, "d": false}}});
        assert!(m(f.clone(), json!({"a": {"b": {"c": 1, "e": 2}}})));
        assert!(m(f.clone(), json!({"a": {"b": {"c": 1.0, "d": null}}})));
        assert!(!m(f.clone(), json!({"a": {"b": {"c": 2}}})));
        assert!(!m(f.clone(), json!({"a": {"b": "c"}})));
        assert!(!m(f, json!({"a": {}})));
    }

    #[test]
    fn numbers_compare_by_value() {
        assert!(m(json!(1), json!(1.0)));
        assert!(m(json!({"n": 1}), json!({"n": 1.0})));
        assert!(m(json!({"n": -3.0}), json!({"n": -3})));
        assert!(!m(json!({"n": 1}), json!({"n": 1.5})));
        assert!(m(json!(u64::MAX), json!(u64::MAX)));
        assert!(!m(json!(i64::MIN), json!(u64::MAX)));
        // Exact, not via f64: 2^53 + 1 is not the double 2^53.
        assert!(!m(
            json!(9_007_199_254_740_993_u64),
            json!(9_007_199_254_740_992.0)
        ));
        assert!(m(
            json!(9_007_199_254_740_992_u64),
            json!(9_007_199_254_740_992.0)
        ));
        assert!(!m(json!(u64::MAX), json!(18_446_744_073_709_551_616.0)));
        assert!(!m(json!("1"), json!(1)));
    }

    #[test]
    fn bools_equal_one_and_zero_like_python() {
        assert!(m(json!(true), json!(1)));
        assert!(m(json!(1.0), json!(true)));
        assert!(m(json!(false), json!(0)));
        assert!(!m(json!(true), json!(2)));
        assert!(m(json!({"flag": true}), json!({"flag": 1})));
        assert!(m(json!({"n": 1}), json!({"n": true})));
        assert!(m(json!([true, 0]), json!([1, false])));
        assert!(!m(json!(true), json!("true")));
    }

    #[test]
    fn lists_compare_deeply_and_in_order() {
        assert!(m(
            json!({"l": [1, "a", [2]]}),
            json!({"l": [1.0, "a", [2]]})
        ));
        assert!(!m(json!({"l": [1, 2]}), json!({"l": [2, 1]})));
        assert!(!m(json!({"l": [1, 2]}), json!({"l": [1, 2, 3]})));
        // Objects inside lists compare by equality (Python ==), not by subset.
        assert!(m(json!([{"a": 1}]), json!([{"a": 1.0}])));
        assert!(!m(json!([{"a": 1}]), json!([{"a": 1, "b": 2}])));
    }

    #[test]
    fn non_objects_use_equality() {
        assert!(m(json!("x"), json!("x")));
        assert!(!m(json!("x"), json!({"x": 1})));
        assert!(!m(json!({"x": 1}), json!("x")));
        assert!(m(json!(null), json!(null)));
        assert!(!m(json!(null), json!(false)));
        // Both objects at the top: subset rules, so the empty filter matches anything.
        assert!(m(json!({}), json!({"a": 1})));
    }

    #[test]
    fn falsiness() {
        for v in [
            json!(null),
            json!(false),
            json!(0),
            json!(0.0),
            json!(""),
            json!([]),
            json!({}),
        ] {
            assert!(is_falsy(Some(&v)), "{v}");
        }
        assert!(is_falsy(None));
        for v in [
            json!(true),
            json!(1),
            json!(-1),
            json!(0.1),
            json!(" "),
            json!([null]),
            json!({"a": null}),
        ] {
            assert!(!is_falsy(Some(&v)), "{v}");
        }
    }

    // ---- cost types -------------------------------------------------------------------------

    const TYPES: &str = r#"
        [[block]]
        id = "run"
        costs = [{ cost_amount = 4, cost_type = "run", cost_filter = {} }]
        [[block]]
        id = "sec"
        name = "Timed"
        costs = [{ cost_amount = 1, cost_type = "second", cost_filter = {} }]
        [[block]]
        id = "byte"
        costs = [{ cost_amount = 2, cost_type = "byte", cost_filter = {} }]
        [[block]]
        id = "sec10"
        costs = [{ cost_amount = 10, cost_type = "second", cost_filter = {} }]
        [[block]]
        id = "huge"
        name = "Huge"
        costs = [{ cost_amount = 9223372036854775807, cost_type = "second", cost_filter = {} }]
    "#;

    fn stats(walltime: f64, input_size: f64) -> Stats {
        Stats {
            walltime,
            input_size,
            ..Stats::default()
        }
    }

    #[test]
    fn run_second_and_byte_costs() {
        let t = table(TYPES);
        assert_eq!(cost(&t, "run", json!({}), stats(99.0, 99.0)), 4);
        // `second` bills every started second (the newest AutoGPT rounds up).
        assert_eq!(cost(&t, "sec", json!({}), stats(25.9, 0.0)), 26);
        assert_eq!(cost(&t, "sec", json!({}), Stats::default()), 0);
        assert_eq!(cost(&t, "byte", json!({}), stats(0.0, 10.6)), 21);
        assert_eq!(cost(&t, "byte", json!({}), stats(0.0, 4096.0)), 8192);
        assert_eq!(cost(&t, "sec10", json!({}), stats(0.7, 0.0)), 10);
        assert_eq!(cost(&t, "sec10", json!({}), stats(1.29, 0.0)), 20);
        // Whole numbers are exact up to i64::MAX.
        assert_eq!(cost(&t, "huge", json!({}), stats(1.0, 0.0)), i64::MAX);
        assert_eq!(cost(&t, "huge", json!({}), stats(0.0, 0.0)), 0);
    }

    #[test]
    fn overflow_is_an_error_naming_block_and_stat() {
        let t = table(TYPES);
        for (block, s) in [
            ("huge", stats(2.0, 0.0)),
            ("huge", stats(1.5, 0.0)),
            ("sec", stats(1e300, 0.0)),
            ("byte", stats(0.0, 4.7e18)),
        ] {
            match t.price(block, &Map::new(), Some(&s)) {
                Err(e @ CostError::Overflow { .. }) => {
                    let msg = e.to_string();
                    assert!(msg.contains(&format!("block {block}")), "{msg}");
                    assert!(
                        msg.contains("walltime") || msg.contains("input_size"),
                        "{msg}"
                    );
                    assert!(msg.contains("entry 1"), "{msg}");
                }
                other => panic!("{block}: expected overflow, got {other:?}"),
            }
        }
        let e = t
            .price("huge", &Map::new(), Some(&stats(2.0, 0.0)))
            .err()
            .map(|e| e.to_string());
        assert_eq!(
            e.as_deref(),
            Some("block huge (Huge) entry 1: cost overflow: walltime 2 at cost_amount 9223372036854775807 exceeds 9223372036854775807")
        );
    }

    #[test]
    fn bad_stats_are_errors() {
        let t = table(TYPES);
        for (s, stat) in [
            (stats(-1.0, 0.0), "walltime"),
            (stats(f64::NAN, 0.0), "walltime"),
            (stats(0.0, f64::INFINITY), "input_size"),
            (stats(0.0, -0.5), "input_size"),
        ] {
            match t.price("run", &Map::new(), Some(&s)) {
                Err(CostError::InvalidStat { stat: got, .. }) => assert_eq!(got, stat),
                other => panic!("{s:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn floor_mul_edges() {
        assert_eq!(floor_mul(0.0, i64::MAX), Some(0));
        assert_eq!(floor_mul(1e300, 0), Some(0));
        assert_eq!(
            floor_mul(4_611_686_018_427_387_904.0, 1),
            Some(4_611_686_018_427_387_904)
        );
        assert_eq!(floor_mul(4_611_686_018_427_387_904.0, 2), None);
        assert_eq!(floor_mul(9_223_372_036_854_775_808.0, 1), None);
        assert_eq!(floor_mul(0.5, 3), Some(1));
        assert_eq!(floor_mul(f64::MIN_POSITIVE, i64::MAX), Some(0));
        assert_eq!(floor_mul(-1.0, 1), None);
        assert_eq!(floor_mul(1.0, -1), None);
    }

    // ---- the shipped table ------------------------------------------------------------------

    fn platform_openai() -> Value {
        json!({"id": OPENAI, "provider": "openai", "type": "api_key", "title": "Use Credits for OpenAI"})
    }

    #[test]
    fn builtin_table_loads() {
        let t = builtin();
        assert_eq!(t.block_count(), 115);
        for id in LLM_BLOCKS {
            // 108 models of AutoGPT's MODEL_COST less its 5 Ollama models.
            assert_eq!(t.blocks.get(id).map(|b| b.entries.len()), Some(103), "{id}");
        }
    }

    /// Blocks AutoGPT prices outside BLOCK_COSTS: Exa by the SDK's base cost on the platform
    /// credentials only, the Ayrshare posts by their decorator on any key.
    #[test]
    fn exa_and_ayrshare_are_priced_as_in_autogpt() {
        let t = builtin();
        let exa_search = "996cec64-ac40-4dde-982f-b0dc60a5824d";
        let platform = json!({"credentials": {"id": "96153e04-9c6c-4486-895f-5bb683b1ecec",
            "provider": "exa", "type": "api_key", "title": "Use Credits for Exa search"}});
        let own = json!({"credentials": {"id": "my-own-exa-key", "provider": "exa"}});
        let usd = Stats {
            provider_cost: Some(0.05),
            provider_cost_type: Some("cost_usd".into()),
            ..Stats::default()
        };
        let cost = |block: &str, inputs: &Value, stats: Option<&Stats>| {
            t.price(block, &obj(inputs.clone()), stats)
                .map(|p| p.cost)
                .ok()
        };
        assert_eq!(cost(exa_search, &platform, Some(&usd)), Some(5));
        assert_eq!(cost(exa_search, &own, Some(&usd)), Some(0));
        let post_to_x = "9e8f844e-b4a5-4b25-80f2-9e1dd7d67625";
        assert_eq!(cost(post_to_x, &json!({"is_video": true}), None), Some(5));
        assert_eq!(cost(post_to_x, &json!({"post": "hi"}), None), Some(2));
    }

    #[test]
    fn gpt4_turbo_on_platform_credentials_costs_10() {
        let t = builtin();
        let inputs =
            json!({"prompt": "hi", "model": "gpt-4-turbo", "credentials": platform_openai()});
        let p = t.price(TEXT_GEN, &obj(inputs), None).ok();
        let expected = Price {
            cost: 10,
            matched_filter: Some(json!({"model": "gpt-4-turbo",
                "credentials": {"id": OPENAI, "provider": "openai", "type": "api_key"}})),
            metered: true,
            block_name: Some("AITextGeneratorBlock".into()),
        };
        assert_eq!(p, Some(expected));
    }

    #[test]
    fn own_api_keys_are_free() {
        let t = builtin();
        let p = t
            .price(
                TEXT_GEN,
                &obj(json!({"model": "gpt-4-turbo", "api_key": "owned_api_key"})),
                None,
            )
            .ok();
        assert_eq!(
            p,
            Some(Price {
                cost: 0,
                matched_filter: None,
                metered: false,
                block_name: Some("AITextGeneratorBlock".into())
            })
        );
        let mine = json!({"id": "0f0e0d0c-1111-2222-3333-444455556666", "provider": "openai", "type": "api_key", "title": "My key"});
        assert_eq!(
            cost(
                &t,
                TEXT_GEN,
                json!({"model": "gpt-4-turbo", "credentials": mine}),
                Stats::default()
            ),
            0
        );
        // The platform credential for another provider does not match either.
        let anthropic = json!({"id": "24e5d942-d9e3-4798-8151-90143ee55629", "provider": "anthropic", "type": "api_key"});
        assert_eq!(
            cost(
                &t,
                TEXT_GEN,
                json!({"model": "gpt-4-turbo", "credentials": anthropic}),
                Stats::default()
            ),
            0
        );
    }

    #[test]
    fn unknown_block_is_free() {
        let t = builtin();
        let p = t
            .price(
                "no-such-block",
                &obj(json!({"model": "gpt-4-turbo", "credentials": platform_openai()})),
                None,
            )
            .ok();
        assert_eq!(
            p,
            Some(Price {
                cost: 0,
                matched_filter: None,
                metered: false,
                block_name: None
            })
        );
    }

    /// Every type but `run` prices the run by what it used, so a start priced 0 on it is
    /// still paid; a `run` entry's price is final, 0 included.
    #[test]
    fn a_price_is_metered_for_every_type_but_run() {
        let table = r#"
            [token_rates]
            "m" = { input = 1, output = 1 }
            [[block]]
            id = "b"
            costs = [
                { cost_amount = 0, cost_type = "run", cost_filter = { t = "run" } },
                { cost_amount = 1, cost_type = "byte", cost_filter = { t = "byte" } },
                { cost_amount = 1, cost_type = "second", cost_filter = { t = "second" } },
                { cost_amount = 1, cost_type = "items", cost_filter = { t = "items" } },
                { cost_amount = 1, cost_type = "cost_usd", cost_filter = { t = "cost_usd" } },
                { cost_amount = 0, cost_type = "tokens", cost_filter = { t = "tokens", model = "m" } },
            ]
        "#;
        let t = CostTable::from_toml_str(table, "test").unwrap();
        let metered = |ty: &str| {
            let p = t
                .price("b", &obj(json!({ "t": ty, "model": "m" })), None)
                .unwrap();
            (p.cost, p.metered)
        };
        assert_eq!(metered("run"), (0, false));
        for ty in ["byte", "second", "items", "cost_usd", "tokens"] {
            assert_eq!(metered(ty), (0, true), "{ty}");
        }
        assert_eq!(metered("none"), (0, false));
    }

    #[test]
    fn every_llm_block_and_model_is_priced_with_its_credential() {
        let t = builtin();
        for id in LLM_BLOCKS {
            let Some(block) = t.blocks.get(id) else {
                panic!("{id} missing")
            };
            for entry in block.entries.iter() {
                assert!(entry.amount > 0);
                let mut inputs = entry.filter.clone();
                inputs.insert("prompt".into(), json!("hello"));
                if let Some(Value::Object(creds)) = inputs.get_mut("credentials") {
                    creds.insert("title".into(), json!("Use Credits"));
                }
                if entry.cost_type == CostType::Tokens {
                    // Pre-flight is MODEL_COST.
                    let p = t.price(id, &inputs, None).ok();
                    assert_eq!(
                        p.map(|p| p.cost),
                        Some(entry.amount),
                        "{id} {:?}",
                        entry.filter
                    );
                } else {
                    // OpenRouter: 150 credits per reported $; $0.01 => ceil(1.5) = 2.
                    assert_eq!(entry.cost_type, CostType::CostUsd, "{:?}", entry.filter);
                    assert_eq!(entry.amount, 150);
                    let usd = Stats {
                        provider_cost: Some(0.01),
                        ..Stats::default()
                    };
                    let p = t.price(id, &inputs, Some(&usd)).ok();
                    assert_eq!(p.map(|p| p.cost), Some(2), "{id} {:?}", entry.filter);
                }
            }
        }
        let groq = json!({"id": "4ec22295-8f97-4dd1-b42b-2c6957a02545", "provider": "groq", "type": "api_key"});
        let llama = json!({"model": "llama-3.3-70b-versatile", "credentials": groq});
        assert_eq!(
            t.price(LLM_BLOCKS[0], &obj(llama.clone()), None)
                .ok()
                .map(|p| p.cost),
            Some(1)
        );
        // 10^6 in + 10^6 out at 89 / 119 per 10^6.
        assert_eq!(
            cost(
                &t,
                LLM_BLOCKS[0],
                llama,
                super::autogpt_figures::tokens(1_000_000, 1_000_000, 0)
            ),
            208
        );
        let anthropic = json!({"id": "24e5d942-d9e3-4798-8151-90143ee55629", "provider": "anthropic", "type": "api_key"});
        let sonnet = json!({"model": "claude-sonnet-4-6", "credentials": anthropic.clone()});
        assert_eq!(
            t.price(LLM_BLOCKS[4], &obj(sonnet.clone()), None)
                .ok()
                .map(|p| p.cost),
            Some(9)
        );
        // AutoGPT's own example: 200k in, 50k out, 100k cache read => 90 + 112.5 + 4.5 = 207.
        assert_eq!(
            cost(
                &t,
                LLM_BLOCKS[4],
                sonnet,
                super::autogpt_figures::tokens(200_000, 50_000, 100_000)
            ),
            207
        );
        // Claude Opus 4.7 has no token rate: post-flight stays MODEL_COST.
        let opus = json!({"model": "claude-opus-4-7", "credentials": anthropic});
        assert_eq!(
            cost(
                &t,
                LLM_BLOCKS[3],
                opus,
                super::autogpt_figures::tokens(5_000_000, 0, 0)
            ),
            14
        );
        // gpt-4-turbo: 10,000 in / 2,000 out => ceil(15 + 9) = 24; GPT-5: 1 in / 1 out => 1.
        let turbo = json!({"model": "gpt-4-turbo", "credentials": platform_openai()});
        assert_eq!(
            cost(
                &t,
                TEXT_GEN,
                turbo,
                super::autogpt_figures::tokens(10_000, 2_000, 0)
            ),
            24
        );
        let gpt5 = json!({"model": "gpt-5-2025-08-07", "credentials": platform_openai()});
        assert_eq!(
            t.price(TEXT_GEN, &obj(gpt5.clone()), None)
                .ok()
                .map(|p| p.cost),
            Some(2)
        );
        assert_eq!(
            cost(&t, TEXT_GEN, gpt5, super::autogpt_figures::tokens(1, 1, 0)),
            1
        );
        // Models that left LlmModel are no longer priced.
        let old = json!({"model": "claude-3-5-sonnet-latest", "credentials": {"id": "24e5d942-d9e3-4798-8151-90143ee55629", "provider": "anthropic", "type": "api_key"}});
        assert_eq!(
            t.price(TEXT_GEN, &obj(old), None).ok().map(|p| p.cost),
            Some(0)
        );
    }

    #[test]
    fn other_blocks_charge_on_platform_credentials() {
        let t = builtin();
        let cred = |id: &str, provider: &str| json!({"id": id, "provider": provider, "type": "api_key", "title": "t"});
        let jina = cred("7f26de70-ba0d-494e-ba76-238e65e7b45f", "jina");
        let replicate = cred("6b9fc200-4726-4973-86c9-cd526f5ce5db", "replicate");
        let e2b = cred("78d19fd7-4d59-4a16-8277-3ce310acf2b7", "e2b");
        let apollo = cred("544c62b5-1d0f-4156-8fb4-9525f11656eb", "apollo");
        let usd = |dollars: f64| Stats {
            provider_cost: Some(dollars),
            provider_cost_type: Some("cost_usd".into()),
            ..Stats::default()
        };
        let items = |n: f64| Stats {
            provider_cost: Some(n),
            provider_cost_type: Some("items".into()),
            ..Stats::default()
        };
        let walltime = |secs: f64| Stats {
            walltime: secs,
            ..Stats::default()
        };
        // (block, credentials, post-flight stats, credits), per AutoGPT's BLOCK_COSTS.
        let cases = [
            (
                "98c6f503-8c47-4b1c-a96d-351fc7c87dab",
                cred("7f7b0654-c36b-4565-8fa7-9a52575dfae2", "d_id"),
                Stats::default(),
                100,
            ),
            // Jina search: $0.01 at 150 per $ => ceil(1.5) = 2.
            (
                "87840993-2053-44b7-8da4-187ad4ee518c",
                jina.clone(),
                usd(0.01),
                2,
            ),
            (
                "436c3984-57fd-4b85-8e9a-459b356883bd",
                jina.clone(),
                Stats::default(),
                1,
            ),
            (
                "6ab085e2-20b3-4055-bc3e-08036e01eca6",
                cred("760f84fc-b270-42de-91f6-08efe1b512d0", "ideogram"),
                Stats::default(),
                12,
            ),
            (
                "361697fb-0c4f-4feb-aed3-8320c88c771b",
                cred("fdb7f412-f519-48d1-9b5f-d2f73d0e01fe", "revid"),
                Stats::default(),
                307,
            ),
            (
                "90f8c45e-e983-4644-aa0b-b4ebe2f531bc",
                replicate.clone(),
                Stats::default(),
                10,
            ),
            // Replicate: 0.05 x 150 = 7.5 => 8.
            (
                "c40d75a2-d0ea-44c9-a4f6-634bb3bdab1a",
                replicate.clone(),
                usd(0.05),
                8,
            ),
            (
                "44f6c8ad-d75c-4ae1-8209-aad1c0326928",
                replicate,
                Stats::default(),
                11,
            ),
            (
                "7c56b3ab-62e7-43a2-a2dc-4ec4245660b6",
                jina.clone(),
                Stats::default(),
                12,
            ),
            (
                "4ff1ff6d-cc40-4caa-ae69-011daa20c378",
                cred("66f20754-1b81-48e4-91d0-f4f0dd82145f", "unreal_speech"),
                usd(0.2),
                30,
            ),
            // E2B: 45 s at 1 per started 10 s => 5 (AutoGPT's test).
            (
                "0b02b072-abe7-11ef-8372-fb5d162dd712",
                e2b.clone(),
                walltime(45.0),
                5,
            ),
            (
                "ff0861c9-1726-4aec-9e5b-bf53f3622112",
                e2b.clone(),
                walltime(1.0),
                1,
            ),
            (
                "82b59b8e-ea10-4d57-9161-8b169b0adba6",
                e2b,
                walltime(20.0),
                2,
            ),
            // FAL video: 8 s at 15 per s => 120 (AutoGPT's test).
            (
                "530cf046-2ce0-4854-ae2c-659db17c7a46",
                cred("6c0f5bd0-9008-4638-9d79-4b40b631803e", "fal"),
                walltime(8.0),
                120,
            ),
            // Apollo organisations: 45 records at 1 per 2 => 23.
            (
                "3d71270d-599e-4148-9b95-71b35d2f44f0",
                apollo,
                items(45.0),
                23,
            ),
            (
                "e3950439-fa0b-40e8-b19f-e0dca0bf5853",
                cred("63a6e279-2dc2-448e-bf57-85776f7176dc", "zerobounce"),
                usd(0.023),
                4,
            ),
        ];
        for (id, creds, stats, amount) in cases {
            assert_eq!(
                cost(&t, id, json!({"credentials": creds}), stats.clone()),
                amount,
                "{id}"
            );
            assert_eq!(
                cost(&t, id, json!({}), stats),
                0,
                "{id} without credentials"
            );
        }
        // Apollo people: 2 per person with e-mail enrichment, else 1.
        let people = "c2adb3aa-5aae-488d-8a6e-4eb8c23e2ed6";
        let apollo = cred("544c62b5-1d0f-4156-8fb4-9525f11656eb", "apollo");
        let enriched = json!({"enrich_info": true, "credentials": apollo.clone()});
        assert_eq!(cost(&t, people, enriched, items(10.0)), 20);
        let plain = json!({"enrich_info": false, "credentials": apollo});
        assert_eq!(cost(&t, people, plain, items(10.0)), 10);
        // Pinecone insert runs on the user's own key and still pays 1 per item.
        assert_eq!(
            cost(
                &t,
                "477f2168-cd91-475a-8146-9499a5982434",
                json!({}),
                items(7.0)
            ),
            7
        );
        // ExtractWebsiteContent: a raw scrape does not use Jina and is free.
        let extract = "436c3984-57fd-4b85-8e9a-459b356883bd";
        assert_eq!(
            cost(
                &t,
                extract,
                json!({"raw_content": false, "credentials": jina.clone()}),
                Stats::default()
            ),
            1
        );
        assert_eq!(
            cost(
                &t,
                extract,
                json!({"raw_content": true, "credentials": jina}),
                Stats::default()
            ),
            0
        );
    }

    // ---- validation -------------------------------------------------------------------------

    fn one_block(entries: &str) -> String {
        format!(
            "[[block]]\nid = \"1f292d4a\"\nname = \"AITextGeneratorBlock\"\ncosts = [\n  \
             {{ cost_amount = 1, cost_type = \"run\", cost_filter = {{}} }},\n  {entries}\n]\n"
        )
    }

    #[test]
    fn bad_cost_type_names_block_and_entry() {
        let msg = invalid(&one_block(
            r#"{ cost_amount = 1, cost_type = "minute", cost_filter = {} }"#,
        ));
        assert_eq!(
            msg,
            "test.toml: block 1f292d4a (AITextGeneratorBlock) entry 2 of 2: cost_type: unknown variant `minute`, \
             expected one of `run`, `second`, `byte`, `items`, `cost_usd`, `tokens`"
        );
    }

    #[test]
    fn bad_amounts_are_rejected() {
        let msg = invalid(&one_block(
            r#"{ cost_amount = -1, cost_type = "run", cost_filter = {} }"#,
        ));
        assert!(msg.ends_with("block 1f292d4a (AITextGeneratorBlock) entry 2 of 2: cost_amount: must be ≥ 0, got -1"), "{msg}");
        let msg = invalid(&one_block(
            r#"{ cost_amount = 1.5, cost_type = "run", cost_filter = {} }"#,
        ));
        assert!(
            msg.ends_with("entry 2 of 2: cost_amount: expected an integer, got float"),
            "{msg}"
        );
        let msg = invalid(&one_block(
            r#"{ cost_amount = "3", cost_type = "run", cost_filter = {} }"#,
        ));
        assert!(
            msg.ends_with("entry 2 of 2: cost_amount: expected an integer, got string"),
            "{msg}"
        );
        // Beyond i64: the TOML parser itself refuses it.
        let msg = invalid(&one_block(
            r#"{ cost_amount = 9223372036854775808, cost_type = "run", cost_filter = {} }"#,
        ));
        assert!(msg.starts_with("test.toml: not valid TOML"), "{msg}");
    }

    #[test]
    fn unknown_and_missing_keys_are_rejected() {
        let msg = invalid(&one_block(
            r#"{ cost_amount = 1, cost_type = "run", cost_filter = {}, cost_per = 2 }"#,
        ));
        assert!(msg.ends_with("entry 2 of 2: unknown key `cost_per` (expected cost_amount, cost_type, cost_divisor, cost_filter)"), "{msg}");
        let msg = invalid(&one_block(
            r#"{ cost_amount = 1, cost_type = "run", cost_filter = {}, cost_divisor = 2 }"#,
        ));
        assert!(
            msg.ends_with(
                "entry 2 of 2: cost_divisor: only `second` and `items` entries take a divisor"
            ),
            "{msg}"
        );
        let msg = invalid(&one_block(
            r#"{ cost_amount = 1, cost_type = "items", cost_filter = {}, cost_divisor = 0 }"#,
        ));
        assert!(
            msg.ends_with("entry 2 of 2: cost_divisor: must be ≥ 1, got 0"),
            "{msg}"
        );
        let msg = invalid(&one_block(
            r#"{ cost_amount = 1, cost_type = "tokens", cost_filter = {} }"#,
        ));
        assert!(msg.ends_with("entry 2 of 2: cost_filter.model: a `tokens` entry needs the model its token rates are for"), "{msg}");
        let msg = invalid(&one_block(r#"{ cost_amount = 1, cost_type = "run" }"#));
        assert!(msg.contains("entry 2 of 2: cost_filter: missing"), "{msg}");
        let msg = invalid(&one_block(
            r#"{ cost_amount = 1, cost_type = "run", cost_filter = "model" }"#,
        ));
        assert!(
            msg.ends_with("entry 2 of 2: cost_filter: expected a table, got string"),
            "{msg}"
        );
        let msg = invalid("[[block]]\nid = \"b\"\nname = \"N\"\ncost = []\n");
        assert_eq!(
            msg,
            "test.toml: block b (N): unknown key `cost` (expected id, name, costs, costs_from)"
        );
        let msg = invalid("[[blocks]]\nid = \"b\"\n");
        assert_eq!(
            msg,
            "test.toml: top level: unknown key `blocks` (expected `block`, `lists` or `token_rates`)"
        );
        let msg = invalid("[[block]]\nid = \"b\"\n");
        assert!(
            msg.ends_with("block b: missing `costs` (or `costs_from`)"),
            "{msg}"
        );
    }

    #[test]
    fn block_ids_must_be_present_non_empty_and_unique() {
        let dup =
            "[[block]]\nid = \"x\"\nname = \"A\"\ncosts = []\n[[block]]\nid = \"y\"\ncosts = []\n\
                   [[block]]\nid = \"x\"\nname = \"B\"\ncosts = []\n";
        assert_eq!(
            invalid(dup),
            "test.toml: block x (B): duplicate block id (first defined by block #1 of 3)"
        );
        assert_eq!(
            invalid("[[block]]\nid = \"\"\ncosts = []\n"),
            "test.toml: block #1 of 1: id: must not be empty"
        );
        assert_eq!(
            invalid("[[block]]\nname = \"n\"\ncosts = []\n"),
            "test.toml: block #1 of 1: id: missing"
        );
        assert_eq!(
            invalid("[[block]]\nid = 5\ncosts = []\n"),
            "test.toml: block #1 of 1: id: expected a string, got integer"
        );
    }

    #[test]
    fn shared_lists() {
        let t = table(
            "[lists]\nllm = [{ cost_amount = 2, cost_type = \"run\", cost_filter = { model = \"m\" } }]\n\
             [[block]]\nid = \"a\"\ncosts_from = \"llm\"\n[[block]]\nid = \"b\"\ncosts_from = \"llm\"\n",
        );
        assert_eq!(t.block_count(), 2);
        assert_eq!(cost(&t, "b", json!({"model": "m"}), Stats::default()), 2);
        let msg = invalid("[[block]]\nid = \"a\"\nname = \"A\"\ncosts_from = \"llm\"\n");
        assert_eq!(
            msg,
            "test.toml: block a (A): costs_from: no list `llm` under [lists]"
        );
        let msg = invalid(
            "[lists]\nllm = [{ cost_amount = 2, cost_type = \"hour\", cost_filter = {} }]\n",
        );
        assert!(
            msg.starts_with(
                "test.toml: list `llm` entry 1 of 1: cost_type: unknown variant `hour`"
            ),
            "{msg}"
        );
        let msg =
            invalid("[lists]\nllm = []\n[[block]]\nid = \"a\"\ncosts = []\ncosts_from = \"llm\"\n");
        assert!(
            msg.ends_with("block a: give either `costs` or `costs_from`, not both"),
            "{msg}"
        );
    }

    #[test]
    fn filters_convert_to_json() {
        let t = table(
            "[[block]]\nid = \"b\"\ncosts = [{ cost_amount = 1, cost_type = \"run\", \
             cost_filter = { n = 1.0, l = [1, \"a\"], o = { f = false } } }]\n",
        );
        assert_eq!(
            cost(
                &t,
                "b",
                json!({"n": 1, "l": [1, "a"], "o": {"g": 1}}),
                Stats::default()
            ),
            1
        );
        let msg = invalid("[[block]]\nid = \"b\"\ncosts = [{ cost_amount = 1, cost_type = \"run\", cost_filter = { d = 1979-05-27 } }]\n");
        assert!(
            msg.contains("entry 1 of 1: cost_filter.d: TOML dates"),
            "{msg}"
        );
        let msg = invalid("[[block]]\nid = \"b\"\ncosts = [{ cost_amount = 1, cost_type = \"run\", cost_filter = { x = [nan] } }]\n");
        assert!(
            msg.contains("cost_filter.x[0]: NaN has no JSON equivalent"),
            "{msg}"
        );
    }

    #[test]
    fn syntax_and_read_errors_name_the_origin() {
        assert!(invalid("[[block]\n").starts_with("test.toml: not valid TOML: "));
        let path = Path::new("/nonexistent/block_costs.toml");
        let msg = CostTable::load(path)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            msg.starts_with("/nonexistent/block_costs.toml: cannot read: "),
            "{msg}"
        );
    }

    #[test]
    fn load_reads_a_file() {
        let dir = std::env::temp_dir().join(format!("cost-table-test-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join("costs.toml");
        let written = std::fs::write(&path, BUILTIN_TABLE);
        assert!(written.is_ok());
        let t = CostTable::load(&path).map(|t| t.block_count());
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(t.ok(), Some(115));
    }

    // ---- properties -------------------------------------------------------------------------

    /// An independent model of Python semantics: bools and numbers become f64 (exact for the
    /// small values generated), and derived equality is Python's `==` on the result.
    #[derive(Debug, PartialEq)]
    enum Py {
        None,
        Num(f64),
        Str(String),
        List(Vec<Py>),
        Dict(std::collections::BTreeMap<String, Py>),
    }

    fn py(v: &Value) -> Py {
        match v {
            Value::Null => Py::None,
            Value::Bool(b) => Py::Num(if *b { 1.0 } else { 0.0 }),
            Value::Number(n) => Py::Num(n.as_f64().unwrap_or(f64::NAN)),
            Value::String(s) => Py::Str(s.clone()),
            Value::Array(a) => Py::List(a.iter().map(py).collect()),
            Value::Object(o) => Py::Dict(o.iter().map(|(k, v)| (k.clone(), py(v))).collect()),
        }
    }

    fn truthy(p: Option<&Py>) -> bool {
        match p {
            None | Some(Py::None) => false,
            Some(Py::Num(n)) => *n != 0.0,
            Some(Py::Str(s)) => !s.is_empty(),
            Some(Py::List(l)) => !l.is_empty(),
            Some(Py::Dict(d)) => !d.is_empty(),
        }
    }

    fn model_match(f: &Py, i: &Py) -> bool {
        match (f, i) {
            (Py::Dict(f), Py::Dict(i)) => f.iter().all(|(k, fv)| match i.get(k) {
                iv if !truthy(iv) => !truthy(Some(fv)),
                Some(iv) => model_match(fv, iv),
                None => false,
            }),
            _ => f == i,
        }
    }

    fn small_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(json!(null)),
            any::<bool>().prop_map(Value::Bool),
            (-2i64..3).prop_map(Value::from),
            prop::sample::select(vec![0.0, -0.0, 1.0, 1.5, 2.0, -2.0]).prop_map(|f| json!(f)),
            prop::sample::select(vec!["", "a", "b"]).prop_map(Value::from),
        ];
        leaf.prop_recursive(3, 24, 3, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..3).prop_map(Value::Array),
                prop::collection::btree_map(prop::sample::select(vec!["a", "b", "c"]), inner, 0..3)
                    .prop_map(|m| Value::Object(
                        m.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()
                    )),
            ]
        })
    }

    /// Pairs that often match: independent, identical, or the filter's keys with random values.
    fn filter_and_input() -> impl Strategy<Value = (Value, Value)> {
        prop_oneof![
            (small_json(), small_json()),
            small_json().prop_map(|v| (v.clone(), v)),
            (small_json(), prop::collection::vec(small_json(), 3)).prop_map(|(f, vals)| {
                let input = match &f {
                    Value::Object(o) => Value::Object(o.keys().cloned().zip(vals).collect()),
                    _ => vals.into_iter().next().unwrap_or(Value::Null),
                };
                (f, input)
            }),
        ]
    }

    proptest! {
        #[test]
        fn filter_matches_agrees_with_model((f, i) in filter_and_input()) {
            prop_assert_eq!(filter_matches(&f, &i), model_match(&py(&f), &py(&i)));
        }

        #[test]
        fn is_falsy_agrees_with_model(v in small_json()) {
            prop_assert_eq!(is_falsy(Some(&v)), !truthy(Some(&py(&v))));
        }

        #[test]
        fn objects_match_themselves(v in small_json()) {
            prop_assert!(filter_matches(&v, &v));
        }

        #[test]
        fn floor_mul_is_floor_of_the_f64_product(x in 0.0f64..1e6, n in 0i64..1_000_000) {
            let got = floor_mul(x, n);
            prop_assert_eq!(got, Some((x * n as f64).floor() as i64));
        }
    }
}

/// Every cost type against the figures of AutoGPT's own tests (its newest
/// `block_usage_cost_test.py` and `billing_reconciliation_test.py`), in the same f64
/// arithmetic as its Python.
#[cfg(test)]
mod autogpt_figures {
    use super::*;
    use serde_json::json;

    const TABLE: &str = r#"
        [token_rates]
        "gpt-4o-mini" = { input = 1000, output = 2000 }
        "claude-sonnet-4-6" = { input = 450, output = 2250, cache_read = 45, cache_creation = 563 }
        "gpt-5" = { input = 188, output = 1500 }

        [[block]]
        id = "e2b"
        costs = [{ cost_amount = 1, cost_type = "second", cost_divisor = 10, cost_filter = {} }]
        [[block]]
        id = "sec3"
        costs = [{ cost_amount = 1, cost_type = "second", cost_divisor = 3, cost_filter = {} }]
        [[block]]
        id = "fal"
        costs = [{ cost_amount = 15, cost_type = "second", cost_filter = {} }]
        [[block]]
        id = "items10"
        costs = [{ cost_amount = 1, cost_type = "items", cost_divisor = 10, cost_filter = {} }]
        [[block]]
        id = "items2"
        costs = [{ cost_amount = 1, cost_type = "items", cost_divisor = 2, cost_filter = {} }]
        [[block]]
        id = "usd100"
        costs = [{ cost_amount = 100, cost_type = "cost_usd", cost_filter = {} }]
        [[block]]
        id = "usd150"
        costs = [{ cost_amount = 150, cost_type = "cost_usd", cost_filter = {} }]
        [[block]]
        id = "llm"
        costs = [
          { cost_amount = 1, cost_type = "tokens", cost_filter = { model = "gpt-4o-mini" } },
          { cost_amount = 1, cost_type = "tokens", cost_filter = { model = "llama3.2" } },
          { cost_amount = 9, cost_type = "tokens", cost_filter = { model = "claude-sonnet-4-6" } },
          { cost_amount = 2, cost_type = "tokens", cost_filter = { model = "gpt-5" } },
        ]
        [[block]]
        id = "run7"
        costs = [{ cost_amount = 7, cost_type = "run", cost_filter = {} }]
        [[block]]
        id = "byte3"
        costs = [{ cost_amount = 3, cost_type = "byte", cost_filter = {} }]
    "#;

    fn table() -> CostTable {
        let estimates = Estimates::from_json_str(
            r#"{"estimates": {"e2b": {"mean_credits": 2.6}, "usd100": {"mean_credits": 4}}}"#,
            "test",
        )
        .unwrap();
        CostTable::from_toml_str(TABLE, "test")
            .unwrap()
            .with_estimates(estimates)
    }

    fn post(block: &str, inputs: serde_json::Value, stats: Stats) -> i64 {
        let Value::Object(inputs) = inputs else {
            panic!("inputs")
        };
        table().price(block, &inputs, Some(&stats)).unwrap().cost
    }

    fn pre(block: &str, inputs: serde_json::Value) -> i64 {
        let Value::Object(inputs) = inputs else {
            panic!("inputs")
        };
        table().price(block, &inputs, None).unwrap().cost
    }

    fn walltime(s: f64) -> Stats {
        Stats {
            walltime: s,
            ..Stats::default()
        }
    }

    fn provider(cost: f64, kind: Option<&str>) -> Stats {
        Stats {
            provider_cost: Some(cost),
            provider_cost_type: kind.map(str::to_owned),
            ..Stats::default()
        }
    }

    pub(super) fn tokens(input: u64, output: u64, cache_read: u64) -> Stats {
        Stats {
            input_token_count: input,
            output_token_count: output,
            cache_read_token_count: cache_read,
            ..Stats::default()
        }
    }

    #[test]
    fn second_bills_each_started_divisor_unit() {
        assert_eq!(post("e2b", json!({}), walltime(25.0)), 3);
        assert_eq!(post("e2b", json!({}), walltime(45.0)), 5);
        assert_eq!(post("sec3", json!({}), walltime(1.0)), 1);
        assert_eq!(post("fal", json!({}), walltime(8.0)), 120);
        assert_eq!(post("e2b", json!({}), walltime(0.0)), 0);
        // Pre-flight: the block's estimate (2.6 ⇒ 3), or 0 without one.
        assert_eq!(pre("e2b", json!({})), 3);
        assert_eq!(pre("fal", json!({})), 0);
    }

    #[test]
    fn items_count_only_items_reports() {
        assert_eq!(post("items10", json!({}), provider(45.0, Some("items"))), 5);
        assert_eq!(post("items2", json!({}), provider(1.0, Some("items"))), 1);
        assert_eq!(post("items2", json!({}), provider(20.0, Some("items"))), 10);
        assert_eq!(post("items2", json!({}), provider(20.9, Some("items"))), 10);
        assert_eq!(post("items2", json!({}), provider(0.0, Some("items"))), 0);
        assert_eq!(
            post("items10", json!({}), provider(0.05, Some("cost_usd"))),
            0
        );
        assert_eq!(pre("items10", json!({})), 0);
    }

    #[test]
    fn cost_usd_rounds_up_in_f64_like_python() {
        assert_eq!(
            post("usd100", json!({}), provider(0.023, Some("cost_usd"))),
            3
        );
        assert_eq!(
            post("usd100", json!({}), provider(0.05, Some("cost_usd"))),
            5
        );
        assert_eq!(post("usd100", json!({}), provider(0.207, None)), 21);
        // 0.07 × 100 = 7.000000000000001 and 0.14 × 100 = 14.000000000000002 in IEEE doubles.
        assert_eq!(
            post("usd100", json!({}), provider(0.07, Some("cost_usd"))),
            8
        );
        assert_eq!(
            post("usd100", json!({}), provider(0.14, Some("cost_usd"))),
            15
        );
        assert_eq!(
            post("usd150", json!({}), provider(0.05, Some("cost_usd"))),
            8
        );
        assert_eq!(
            post("usd150", json!({}), provider(0.023, Some("cost_usd"))),
            4
        );
        assert_eq!(post("usd100", json!({}), provider(45.0, Some("items"))), 0);
        assert_eq!(post("usd100", json!({}), Stats::default()), 0);
        assert_eq!(pre("usd100", json!({})), 4);
        assert_eq!(pre("usd150", json!({})), 0);
    }

    #[test]
    fn tokens_use_the_models_rates_per_million() {
        let mini = json!({"model": "gpt-4o-mini"});
        assert_eq!(post("llm", mini.clone(), tokens(500_000, 250_000, 0)), 1000);
        assert_eq!(pre("llm", mini), 1);
        let sonnet = json!({"model": "claude-sonnet-4-6"});
        assert_eq!(
            post("llm", sonnet.clone(), tokens(200_000, 50_000, 100_000)),
            207
        );
        assert_eq!(pre("llm", sonnet), 9);
        // No rates for the model: its flat amount, before and after.
        let ollama = json!({"model": "llama3.2"});
        assert_eq!(post("llm", ollama, tokens(10_000, 10_000, 0)), 1);
        // One token in and out of GPT-5 costs 1 (pre-flight 2: a refund of 1 later).
        let gpt5 = json!({"model": "gpt-5"});
        assert_eq!(post("llm", gpt5.clone(), tokens(1, 1, 0)), 1);
        assert_eq!(post("llm", gpt5.clone(), tokens(0, 0, 0)), 0);
        assert_eq!(pre("llm", gpt5), 2);
    }

    #[test]
    fn a_price_fits_an_i64_or_is_refused() {
        // 2^63 − 1024, the largest double below 2^63, fits; 2^63 does not.
        assert_eq!(
            ceil_i64(9_223_372_036_854_774_784.0),
            Some(9_223_372_036_854_774_784)
        );
        assert_eq!(ceil_i64(9_223_372_036_854_775_808.0), None);
        assert_eq!(ceil_i64(f64::NAN), None);
        assert_eq!(ceil_i64(-3.5), Some(0));
        assert_eq!(ceil_i64(0.000_1), Some(1));
    }

    #[test]
    fn cache_creation_tokens_have_their_own_rate() {
        let sonnet = json!({"model": "claude-sonnet-4-6"});
        let written = Stats {
            cache_creation_token_count: 1_000_000,
            ..Stats::default()
        };
        assert_eq!(post("llm", sonnet.clone(), written), 563);
        // Beside the other three: 200k × 450 + 50k × 2250 + 100k × 45 + 40k × 563 per million.
        let mut all = tokens(200_000, 50_000, 100_000);
        all.cache_creation_token_count = 40_000;
        assert_eq!(post("llm", sonnet, all), 230);
    }

    #[test]
    fn an_empty_provider_cost_type_is_dollars() {
        assert_eq!(post("usd100", json!({}), provider(0.05, Some(""))), 5);
    }

    #[test]
    fn byte_truncates_the_input_size_times_the_amount_and_costs_nothing_before() {
        let size = |input_size: f64| Stats {
            input_size,
            ..Stats::default()
        };
        assert_eq!(post("byte3", json!({}), size(2.5)), 7);
        assert_eq!(post("byte3", json!({}), size(100.0)), 300);
        assert_eq!(post("byte3", json!({}), Stats::default()), 0);
        assert_eq!(pre("byte3", json!({})), 0);
    }

    #[test]
    fn run_ignores_stats() {
        let mut s = tokens(1_000_000, 1_000_000, 0);
        s.walltime = 999.0;
        assert_eq!(post("run7", json!({}), s), 7);
        assert_eq!(pre("run7", json!({})), 7);
    }

    #[test]
    fn token_rates_are_validated_with_the_model_named() {
        let err = |t: &str| {
            CostTable::from_toml_str(t, "t.toml")
                .unwrap_err()
                .to_string()
        };
        assert_eq!(
            err("[token_rates]\n\"m\" = { input = 1 }\n"),
            "t.toml: token_rates.m: output: missing"
        );
        assert_eq!(
            err("[token_rates]\n\"m\" = { input = 1, output = -2 }\n"),
            "t.toml: token_rates.m: output: expected a number ≥ 0, got -2"
        );
        assert_eq!(
            err("[token_rates]\n\"m\" = { input = 1, output = 2, cached = 3 }\n"),
            "t.toml: token_rates.m: unknown key `cached` (expected input, output, cache_read, cache_creation)"
        );
    }
}
