//! Reading a cost table from TOML, strictly: an unknown key, type or value is an error that
//! names its place. The format is documented at the top of `config/block_costs.toml`.

use std::collections::HashMap;
use std::sync::Arc;

use serde_json::{Map, Number, Value};

use super::{Block, CostTable, CostType, Entry, TokenRate};

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

pub(super) fn block_label(id: &str, name: Option<&str>) -> String {
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

pub(super) fn parse_table(mut doc: toml::Table) -> Result<CostTable, Problem> {
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
        // No block priced: every execution would be free, which no operator means.
        None => Err((
            "top level".into(),
            "no [[block]] in the table: every block would run free".into(),
        )),
        Some(toml::Value::Array(blocks)) if blocks.is_empty() => Err((
            "block".into(),
            "no block in the table: every block would run free".into(),
        )),
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
        Some(toml::Value::String(id)) if id.trim().is_empty() => {
            Err("id: must not be empty".into())
        }
        // Ids match exactly: " b1" would be a block no execution names.
        Some(toml::Value::String(id)) if id.trim() != id => Err(format!(
            "id: {id:?} has spaces around it, and would never match"
        )),
        Some(toml::Value::String(id)) => Ok(id),
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
    let amount = cost_amount(table.remove("cost_amount"))?;
    let cost_type = cost_type(table.remove("cost_type"))?;
    let filter = cost_filter(table.remove("cost_filter"))?;
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

/// `cost_amount`: an integer ≥ 0.
fn cost_amount(value: Option<toml::Value>) -> Result<i64, String> {
    match value {
        Some(toml::Value::Integer(n)) if n >= 0 => Ok(n),
        Some(toml::Value::Integer(n)) => Err(format!("cost_amount: must be ≥ 0, got {n}")),
        Some(other) => Err(format!(
            "cost_amount: expected an integer, got {}",
            toml_type(&other)
        )),
        None => Err("cost_amount: missing".into()),
    }
}

/// `cost_type`: one of [`CostType::NAMED`].
fn cost_type(value: Option<toml::Value>) -> Result<CostType, String> {
    match value {
        Some(toml::Value::String(s)) => CostType::named(&s).ok_or_else(|| {
            let names: Vec<String> = CostType::NAMED
                .iter()
                .map(|(name, _)| format!("`{name}`"))
                .collect();
            format!(
                "cost_type: unknown variant `{s}`, expected one of {}",
                names.join(", ")
            )
        }),
        Some(other) => Err(format!(
            "cost_type: expected a string, got {}",
            toml_type(&other)
        )),
        None => Err("cost_type: missing".into()),
    }
}

/// `cost_filter`: a table, `{}` matching every execution.
fn cost_filter(value: Option<toml::Value>) -> Result<Map<String, Value>, String> {
    match value {
        Some(toml::Value::Table(t)) => table_to_json(t, "cost_filter"),
        Some(other) => Err(format!(
            "cost_filter: expected a table, got {}",
            toml_type(&other)
        )),
        None => {
            Err("cost_filter: missing (use `cost_filter = {}` to match every execution)".into())
        }
    }
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
