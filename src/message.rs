//! Decoding of `NodeExecutionEntry` message bodies (AutoGPT's model; docs/contract.md §2).
//!
//! [`decode`] turns a body into a fully checked [`NodeExecutionEntry`] or a [`DecodeError`]
//! naming the offending field. One pass of serde over the body: no intermediate document,
//! unknown fields are skipped without being built.

use std::collections::{HashMap, HashSet};
use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use crate::cost::Stats;

/// Largest accepted body.
pub(crate) const MAX_BODY_BYTES: usize = 1024 * 1024;
/// Longest accepted id, in UTF-8 bytes.
pub(crate) const MAX_ID_BYTES: usize = 255;

/// A decoded, checked node execution.
#[derive(Debug, Clone, serde::Serialize)]
pub struct NodeExecutionEntry {
    pub user_id: String,
    pub graph_exec_id: String,
    pub graph_id: String,
    pub node_exec_id: String,
    pub node_id: String,
    pub block_id: String,
    pub graph_version: Option<i64>,
    pub inputs: Map<String, Value>,
    pub execution_context: Option<Map<String, Value>>,
    /// The run's measurements; `None` (no `stats`, or `null`) prices the execution pre-flight.
    pub stats: Option<Stats>,
    /// `started` (the decision, before the block runs) or `completed` (the settlement).
    pub phase: Phase,
    /// How the run ended; completions only (`COMPLETED` when not given).
    pub status: RunStatus,
}

impl NodeExecutionEntry {
    /// Drops what billing does not read: the inputs for which `reads(block_id, key)` is
    /// false, and the execution context. A decoded entry waits for its batch's commit, and
    /// inputs are user data (a prompt, a document, an array of numbers) up to the body's
    /// limit, several times that size decoded (a value tree: an array of small integers
    /// takes about 15 times its text), so a batch of such entries would hold gigabytes.
    pub(crate) fn keep_inputs(&mut self, reads: impl Fn(&str, &str) -> bool) {
        let block = &self.block_id;
        self.inputs.retain(|key, _| reads(block, key));
        self.execution_context = None;
    }
}

/// Which message of an execution this is (docs/contract.md §2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    Started,
    Completed,
}

/// How a run ended, as AutoGPT reports it; every status settles the same way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum RunStatus {
    Completed,
    Failed,
    Terminated,
}

impl RunStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Completed => "COMPLETED",
            RunStatus::Failed => "FAILED",
            RunStatus::Terminated => "TERMINATED",
        }
    }
}

/// Why a body was rejected. [`DecodeError::field`] names the field ("body" for the body as a
/// whole); the Display text starts with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The body is over [`MAX_BODY_BYTES`] (checked before parsing).
    #[error("body: {size} bytes exceeds the 1 MiB limit ({MAX_BODY_BYTES} bytes)")]
    TooLarge { size: usize },
    /// The body is not UTF-8.
    #[error("body: not UTF-8")]
    NotUtf8,
    /// The body is not JSON (the text is serde_json's, with line and column).
    #[error("body: not valid JSON: {0}")]
    NotJson(String),
    /// The body is JSON but not an object.
    #[error("body: expected a JSON object, got {got}")]
    NotAnObject { got: &'static str },
    /// A required field is absent.
    #[error("{field}: missing")]
    Missing { field: &'static str },
    /// A known field appears twice; which value was meant is unknowable.
    #[error("{field}: given more than once")]
    Duplicate { field: &'static str },
    /// A field has the wrong JSON type.
    #[error("{field}: expected {expected}, got {got}")]
    WrongType {
        field: &'static str,
        expected: &'static str,
        got: &'static str,
    },
    /// An id is the empty string.
    #[error("{field}: empty")]
    Empty { field: &'static str },
    /// An id is over [`MAX_ID_BYTES`] bytes.
    #[error("{field}: longer than {MAX_ID_BYTES} bytes ({len} bytes)")]
    TooLong { field: &'static str, len: usize },
    /// NUL cannot be stored in PostgreSQL text, so such an id could never be recorded.
    #[error("{field}: contains a NUL character")]
    NulByte { field: &'static str },
    /// `graph_version` does not fit an i64.
    #[error("{field}: integer out of range")]
    OutOfRange { field: &'static str },
    /// A stat is negative.
    #[error("{field}: must be a finite number ≥ 0")]
    InvalidStat { field: &'static str },
    /// Not one of the values the field takes.
    #[error("{field}: expected {expected}")]
    Unknown {
        field: &'static str,
        expected: &'static str,
    },
}

impl DecodeError {
    /// The field at fault: `"body"`, a top-level field name, or `"stats.walltime"` /
    /// `"stats.input_size"`.
    pub fn field(&self) -> &str {
        match self {
            DecodeError::TooLarge { .. }
            | DecodeError::NotUtf8
            | DecodeError::NotJson(_)
            | DecodeError::NotAnObject { .. } => "body",
            DecodeError::Missing { field }
            | DecodeError::Duplicate { field }
            | DecodeError::WrongType { field, .. }
            | DecodeError::Empty { field }
            | DecodeError::TooLong { field, .. }
            | DecodeError::NulByte { field }
            | DecodeError::OutOfRange { field }
            | DecodeError::InvalidStat { field }
            | DecodeError::Unknown { field, .. } => field,
        }
    }
}

/// Decodes and checks one message body. Never panics.
pub fn decode(body: &[u8]) -> Result<NodeExecutionEntry, DecodeError> {
    if body.len() > MAX_BODY_BYTES {
        return Err(DecodeError::TooLarge { size: body.len() });
    }
    // Checked up front so the parser can work on &str and skip per-string UTF-8 checks.
    let text = std::str::from_utf8(body).map_err(|_| DecodeError::NotUtf8)?;
    let first = text
        .trim_start_matches([' ', '\t', '\n', '\r'])
        .bytes()
        .next();
    if first != Some(b'{') {
        // Not an object: say what it is when it is valid JSON, else why it is not.
        return Err(match serde_json::from_str::<IgnoredAny>(text) {
            Err(e) => DecodeError::NotJson(e.to_string()),
            Ok(_) => DecodeError::NotAnObject {
                got: json_kind_from_first_byte(first),
            },
        });
    }

    match parse_entry(text, false) {
        // Valid JSON this parser cannot hold (a number past f64, a lone UTF-16 surrogate):
        // in user data (inputs), read around it rather than refuse a run that happened.
        Err(DecodeError::NotJson(why)) if serde_json::from_str::<IgnoredAny>(text).is_ok() => {
            // The tolerant pass's own finding (a field's check) names the fault; only were
            // the body still unreadable would the first pass's reason be the one to give.
            parse_entry(text, true).map_err(|e| match e {
                DecodeError::NotJson(_) => DecodeError::NotJson(why),
                found => found,
            })
        }
        parsed => parsed,
    }
}

/// One pass of serde over `text`; with `tolerant`, inputs and the execution context are read
/// by [`tolerant_value`].
fn parse_entry(text: &str, tolerant: bool) -> Result<NodeExecutionEntry, DecodeError> {
    let mut semantic: Option<DecodeError> = None;
    let mut de = serde_json::Deserializer::from_str(text);
    let parsed = EntrySeed {
        error: &mut semantic,
        tolerant,
    }
    .deserialize(&mut de)
    .and_then(|raw| de.end().map(|()| raw));
    match (parsed, semantic) {
        // A field check failed: the visitor stopped the parse and left the reason here.
        (_, Some(err)) => Err(err),
        (Err(e), None) => Err(DecodeError::NotJson(e.to_string())),
        (Ok(raw), None) => raw.finish(),
    }
}

fn json_kind_from_first_byte(first: Option<u8>) -> &'static str {
    match first {
        Some(b'[') => "array",
        Some(b'"') => "string",
        Some(b't' | b'f') => "boolean",
        Some(b'n') => "null",
        _ => "number",
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// Top-level keys; anything else is skipped unparsed. Escaped keys are compared decoded.
enum Key {
    UserId,
    GraphExecId,
    GraphId,
    NodeExecId,
    NodeId,
    BlockId,
    GraphVersion,
    Inputs,
    ExecutionContext,
    Stats,
    Phase,
    Status,
    Other,
}

impl Key {
    fn named(name: &[u8]) -> Key {
        match name {
            b"user_id" => Key::UserId,
            b"graph_exec_id" => Key::GraphExecId,
            b"graph_id" => Key::GraphId,
            b"node_exec_id" => Key::NodeExecId,
            b"node_id" => Key::NodeId,
            b"block_id" => Key::BlockId,
            b"graph_version" => Key::GraphVersion,
            b"inputs" => Key::Inputs,
            b"execution_context" => Key::ExecutionContext,
            b"stats" => Key::Stats,
            b"phase" => Key::Phase,
            b"status" => Key::Status,
            _ => Key::Other,
        }
    }
}

/// Reads a top-level key. `lossy` (the tolerant pass, once the body is known to be valid
/// JSON): as bytes, unchecked, so a key holding a lone surrogate escape (WTF-8 here) is one
/// no field has, skipped; otherwise as a string, checked, as the rest of the body is.
struct KeySeed {
    lossy: bool,
}

impl<'de> DeserializeSeed<'de> for KeySeed {
    type Value = Key;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Key, D::Error> {
        struct Name;
        impl Visitor<'_> for Name {
            type Value = Key;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a field name")
            }

            fn visit_str<E>(self, v: &str) -> Result<Key, E> {
                Ok(Key::named(v.as_bytes()))
            }

            fn visit_bytes<E>(self, v: &[u8]) -> Result<Key, E> {
                Ok(Key::named(v))
            }
        }
        if self.lossy {
            deserializer.deserialize_bytes(Name)
        } else {
            deserializer.deserialize_str(Name)
        }
    }
}

/// Fields as they arrived, each checked as soon as it is read.
#[derive(Default)]
struct Raw {
    ids: [Option<String>; 6],
    graph_version: Option<Option<i64>>,
    inputs: Option<Map<String, Value>>,
    execution_context: Option<Option<Map<String, Value>>>,
    stats: Option<Option<Stats>>,
    phase: Option<Phase>,
    status: Option<RunStatus>,
}

const ID_FIELDS: [&str; 6] = [
    "user_id",
    "graph_exec_id",
    "graph_id",
    "node_exec_id",
    "node_id",
    "block_id",
];

impl Raw {
    fn finish(self) -> Result<NodeExecutionEntry, DecodeError> {
        let [user_id, graph_exec_id, graph_id, node_exec_id, node_id, block_id] = self.ids;
        let id = |v: Option<String>, i: usize| {
            v.ok_or(DecodeError::Missing {
                field: ID_FIELDS[i],
            })
        };
        Ok(NodeExecutionEntry {
            user_id: id(user_id, 0)?,
            graph_exec_id: id(graph_exec_id, 1)?,
            graph_id: id(graph_id, 2)?,
            node_exec_id: id(node_exec_id, 3)?,
            node_id: id(node_id, 4)?,
            block_id: id(block_id, 5)?,
            graph_version: self.graph_version.flatten(),
            inputs: self
                .inputs
                .ok_or(DecodeError::Missing { field: "inputs" })?,
            execution_context: self.execution_context.flatten(),
            stats: self.stats.flatten(),
            phase: self.phase.unwrap_or(Phase::Started),
            status: self.status.unwrap_or(RunStatus::Completed),
        })
    }
}

/// Drives the parse; a failed field check is stored in `error` and aborts the parse.
struct EntrySeed<'e> {
    error: &'e mut Option<DecodeError>,
    /// Whether user data is read by [`tolerant_value`].
    tolerant: bool,
}

impl<'de> DeserializeSeed<'de> for EntrySeed<'_> {
    type Value = Raw;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Raw, D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for EntrySeed<'_> {
    type Value = Raw;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a NodeExecutionEntry JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Raw, A::Error> {
        let mut raw = Raw::default();
        let lossy = self.tolerant;
        while let Some(key) = map.next_key_seed(KeySeed { lossy })? {
            let checked = match key {
                Key::Other => {
                    map.next_value::<IgnoredAny>()?;
                    Ok(())
                }
                Key::UserId => read_id(&mut map, &mut raw, 0, self.tolerant)?,
                Key::GraphExecId => read_id(&mut map, &mut raw, 1, self.tolerant)?,
                Key::GraphId => read_id(&mut map, &mut raw, 2, self.tolerant)?,
                Key::NodeExecId => read_id(&mut map, &mut raw, 3, self.tolerant)?,
                Key::NodeId => read_id(&mut map, &mut raw, 4, self.tolerant)?,
                Key::BlockId => read_id(&mut map, &mut raw, 5, self.tolerant)?,
                Key::GraphVersion => {
                    let v = field_value(
                        &mut map,
                        self.tolerant,
                        "graph_version",
                        "an integer or null",
                    )?;
                    once(&mut raw.graph_version, "graph_version", || {
                        graph_version(v?)
                    })
                }
                Key::Inputs => {
                    let v = user_data(&mut map, self.tolerant)?;
                    once(&mut raw.inputs, "inputs", || inputs(v))
                }
                Key::ExecutionContext => {
                    let v = user_data(&mut map, self.tolerant)?;
                    once(&mut raw.execution_context, "execution_context", || {
                        execution_context(v)
                    })
                }
                Key::Stats => {
                    let text = map.next_value::<&'de RawValue>()?;
                    once(&mut raw.stats, "stats", || stats(text))
                }
                Key::Phase => {
                    let v = field_value(&mut map, self.tolerant, "phase", PHASES)?;
                    once(&mut raw.phase, "phase", || phase(v?))
                }
                Key::Status => {
                    let v = field_value(&mut map, self.tolerant, "status", STATUSES)?;
                    once(&mut raw.status, "status", || status(v?))
                }
            };
            if let Err(err) = checked {
                *self.error = Some(err);
                return Err(de::Error::custom("field check failed"));
            }
        }
        Ok(raw)
    }
}

const PHASES: &str = "\"started\" or \"completed\"";
const STATUSES: &str = "\"COMPLETED\", \"FAILED\" or \"TERMINATED\"";

/// `inputs`: an object.
fn inputs(v: Value) -> Result<Map<String, Value>, DecodeError> {
    match v {
        Value::Object(m) => Ok(m),
        other => Err(wrong("inputs", "an object", &other)),
    }
}

/// `execution_context`: an object, or null for none.
fn execution_context(v: Value) -> Result<Option<Map<String, Value>>, DecodeError> {
    match v {
        Value::Object(m) => Ok(Some(m)),
        Value::Null => Ok(None),
        other => Err(wrong("execution_context", "an object or null", &other)),
    }
}

/// `phase`; null is the field left out, as for the other optional fields.
fn phase(v: Value) -> Result<Phase, DecodeError> {
    match v {
        Value::Null => Ok(Phase::Started),
        Value::String(s) if s == "started" => Ok(Phase::Started),
        Value::String(s) if s == "completed" => Ok(Phase::Completed),
        _ => Err(DecodeError::Unknown {
            field: "phase",
            expected: PHASES,
        }),
    }
}

fn status(v: Value) -> Result<RunStatus, DecodeError> {
    match v {
        Value::Null => Ok(RunStatus::Completed),
        Value::String(s) if s == "COMPLETED" => Ok(RunStatus::Completed),
        Value::String(s) if s == "FAILED" => Ok(RunStatus::Failed),
        Value::String(s) if s == "TERMINATED" => Ok(RunStatus::Terminated),
        _ => Err(DecodeError::Unknown {
            field: "status",
            expected: STATUSES,
        }),
    }
}

/// Reads id field `i`: a non-empty string of at most [`MAX_ID_BYTES`] bytes without NUL.
fn read_id<'de, A: MapAccess<'de>>(
    map: &mut A,
    raw: &mut Raw,
    i: usize,
    tolerant: bool,
) -> Result<Result<(), DecodeError>, A::Error> {
    let field = ID_FIELDS[i];
    let v = field_value(map, tolerant, field, "a string")?;
    Ok(once(&mut raw.ids[i], field, || match v? {
        Value::String(s) if s.is_empty() => Err(DecodeError::Empty { field }),
        Value::String(s) if s.len() > MAX_ID_BYTES => Err(DecodeError::TooLong {
            field,
            len: s.len(),
        }),
        Value::String(s) if s.contains('\0') => Err(DecodeError::NulByte { field }),
        Value::String(s) => Ok(s),
        other => Err(wrong(field, "a string", &other)),
    }))
}

/// Builds a field's JSON value, at most [`MAX_VALUE_DEPTH`] levels deep. Block inputs are
/// user data, and JSON nested past the parser's own limit (128 levels) is still valid JSON:
/// refused, it would dead-letter an execution that ran, and leave it unbilled. A non-empty
/// array or object at that depth is skipped without being built and kept as the string
/// [`TOO_DEEP`]: truthy, as what it stands for, and equal to no cost filter (a filter that
/// deep would be absurd), so every filter matches as it would the whole value.
#[derive(Clone, Copy)]
struct Bounded {
    /// Levels of arrays and objects still built below this value.
    depth: usize,
}

/// Levels of arrays and objects built in a message field's value, the field's own object or
/// array included (see [`Bounded`]).
const MAX_VALUE_DEPTH: usize = 100;
/// What stands for a non-empty array or object nested deeper than [`MAX_VALUE_DEPTH`].
const TOO_DEEP: &str = "(nested too deeply)";

impl Bounded {
    const MESSAGE: Bounded = Bounded {
        depth: MAX_VALUE_DEPTH,
    };

    /// The seed of a value inside this one's array or object; `None` past the depth.
    fn inner(self) -> Option<Bounded> {
        self.depth.checked_sub(1).map(|depth| Bounded { depth })
    }
}

impl<'de> DeserializeSeed<'de> for Bounded {
    type Value = Value;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Bounded {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let Some(inner) = self.inner() else {
            // Skipped without recursion (serde_json ignores a value with a loop).
            if seq.next_element::<IgnoredAny>()?.is_none() {
                return Ok(Value::Array(Vec::new()));
            }
            while seq.next_element::<IgnoredAny>()?.is_some() {}
            return Ok(Value::String(TOO_DEEP.into()));
        };
        let mut items = Vec::new();
        while let Some(v) = seq.next_element_seed(inner)? {
            items.push(v);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let Some(inner) = self.inner() else {
            if map.next_entry::<IgnoredAny, IgnoredAny>()?.is_none() {
                return Ok(Value::Object(Map::new()));
            }
            while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
            return Ok(Value::String(TOO_DEEP.into()));
        };
        let mut entries = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            entries.insert(key, map.next_value_seed(inner)?);
        }
        Ok(Value::Object(entries))
    }
}

/// A field of user data: built by [`Bounded`], or with `tolerant` by [`tolerant_value`].
fn user_data<'de, A: MapAccess<'de>>(map: &mut A, tolerant: bool) -> Result<Value, A::Error> {
    if !tolerant {
        return map.next_value_seed(Bounded::MESSAGE);
    }
    let raw = map.next_value::<&'de RawValue>()?;
    Ok(tolerant_value(raw.get(), Bounded::MESSAGE, TOLERANT_LEVELS))
}

/// A checked field's value. In the tolerant pass (the body is valid JSON that the first
/// could not read), a value this parser cannot hold is that field's fault, named, rather
/// than the body's.
fn field_value<'de, A: MapAccess<'de>>(
    map: &mut A,
    tolerant: bool,
    field: &'static str,
    expected: &'static str,
) -> Result<Result<Value, DecodeError>, A::Error> {
    if !tolerant {
        return map.next_value_seed(Bounded::MESSAGE).map(Ok);
    }
    let raw = map.next_value::<&'de RawValue>()?;
    let mut de = serde_json::Deserializer::from_str(raw.get());
    Ok(Bounded::MESSAGE
        .deserialize(&mut de)
        .map_err(|_| unreadable(field, expected, raw.get())))
}

/// Why a field's valid JSON `text` cannot be read: a string with a lone UTF-16 surrogate
/// (which PostgreSQL text cannot hold either), a number past f64, or an array or object
/// holding one.
fn unreadable(field: &'static str, expected: &'static str, text: &str) -> DecodeError {
    let got = match text.as_bytes().first() {
        Some(b'"') => "string with a lone surrogate",
        Some(b'[') => "array",
        Some(b'{') => "object",
        _ if field == "graph_version" => return DecodeError::OutOfRange { field },
        _ => "number",
    };
    DecodeError::WrongType {
        field,
        expected,
        got,
    }
}

/// Levels of arrays and objects [`tolerant_value`] opens to find what it cannot hold.
const TOLERANT_LEVELS: usize = 8;
/// What stands for a value this parser cannot hold ([`tolerant_value`]).
const NOT_REPRESENTABLE: &str = "(not representable)";

/// The valid JSON `text` as a value, where a part this parser cannot hold (a number past
/// f64, a string with a lone UTF-16 surrogate), or the array or object holding it below
/// [`TOLERANT_LEVELS`] levels, is the string [`NOT_REPRESENTABLE`]: truthy, as such a part
/// is, and equal to no cost filter, which can hold neither. Each level opened is read again,
/// so only the levels on the way to such a part are, and at most a few.
fn tolerant_value(text: &str, bounded: Bounded, levels: usize) -> Value {
    let mut de = serde_json::Deserializer::from_str(text);
    if let Ok(v) = bounded.deserialize(&mut de) {
        return v;
    }
    let (Some(inner), Some(levels)) = (bounded.inner(), levels.checked_sub(1)) else {
        return Value::String(NOT_REPRESENTABLE.into());
    };
    let part = |raw: &RawValue| tolerant_value(raw.get(), inner, levels);
    if let Ok(items) = serde_json::from_str::<Vec<&RawValue>>(text) {
        return Value::Array(items.into_iter().map(part).collect());
    }
    match serde_json::from_str::<std::collections::BTreeMap<LossyKey, &RawValue>>(text) {
        Ok(entries) => Value::Object(entries.into_iter().map(|(k, v)| (k.0, part(v))).collect()),
        // A scalar.
        Err(_) => Value::String(NOT_REPRESENTABLE.into()),
    }
}

/// An object's key, where a lone surrogate escape (which no cost filter can name) is read as
/// U+FFFD, so the key stays one key of its object instead of sinking the whole object.
#[derive(PartialEq, Eq, PartialOrd, Ord, Hash)]
struct LossyKey(String);

impl std::borrow::Borrow<str> for LossyKey {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl<'de> Deserialize<'de> for LossyKey {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<LossyKey, D::Error> {
        struct Key;
        impl Visitor<'_> for Key {
            type Value = LossyKey;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an object key")
            }

            fn visit_str<E>(self, v: &str) -> Result<LossyKey, E> {
                Ok(LossyKey(v.to_owned()))
            }

            // serde_json hands a string over as bytes unchecked: a lone surrogate as WTF-8.
            fn visit_bytes<E>(self, v: &[u8]) -> Result<LossyKey, E> {
                Ok(LossyKey(String::from_utf8_lossy(v).into_owned()))
            }
        }
        deserializer.deserialize_bytes(Key)
    }
}

/// Stores a field's checked value, refusing a second occurrence of the key (which value a
/// producer meant would be a guess, and this is billing).
fn once<T>(
    slot: &mut Option<T>,
    field: &'static str,
    check: impl FnOnce() -> Result<T, DecodeError>,
) -> Result<(), DecodeError> {
    if slot.is_some() {
        return Err(DecodeError::Duplicate { field });
    }
    *slot = Some(check()?);
    Ok(())
}

fn wrong(field: &'static str, expected: &'static str, got: &Value) -> DecodeError {
    DecodeError::WrongType {
        field,
        expected,
        got: kind(got),
    }
}

fn graph_version(v: Value) -> Result<Option<i64>, DecodeError> {
    match v {
        Value::Null => Ok(None),
        Value::Number(n) if n.is_i64() => Ok(n.as_i64()),
        Value::Number(n) if n.is_u64() => Err(DecodeError::OutOfRange {
            field: "graph_version",
        }),
        // `3.0` is 3, as the executor's own model (pydantic, lax mode) reads it.
        Value::Number(n) => match n.as_f64() {
            Some(f) if f.is_finite() && f.fract() == 0.0 && (-I64_END..I64_END).contains(&f) => {
                // Exact: an integral f64 in [-2^63, 2^63) is an i64.
                Ok(Some(f as i64))
            }
            Some(f) if f.is_finite() && f.fract() == 0.0 => Err(DecodeError::OutOfRange {
                field: "graph_version",
            }),
            _ => Err(DecodeError::WrongType {
                field: "graph_version",
                expected: "an integer or null",
                got: "non-integer number",
            }),
        },
        other => Err(wrong("graph_version", "an integer or null", &other)),
    }
}

/// 2^63, the first integer past `i64::MAX`.
const I64_END: f64 = 9_223_372_036_854_775_808.0;

/// The fields of `stats`, and how an error names each.
const STAT_FIELDS: [(&str, &str); 8] = [
    ("walltime", "stats.walltime"),
    ("input_size", "stats.input_size"),
    ("input_token_count", "stats.input_token_count"),
    ("output_token_count", "stats.output_token_count"),
    ("cache_read_token_count", "stats.cache_read_token_count"),
    (
        "cache_creation_token_count",
        "stats.cache_creation_token_count",
    ),
    ("provider_cost", "stats.provider_cost"),
    ("provider_cost_type", "stats.provider_cost_type"),
];

/// `stats` as sent (JSON text): a stat given twice is refused like a top-level field, since
/// which value prices the run would be a guess.
fn stats(text: &RawValue) -> Result<Option<Stats>, DecodeError> {
    if let Some(field) = repeated_stat(text.get()) {
        return Err(DecodeError::Duplicate { field });
    }
    if !text.get().starts_with('{') {
        let v: Value = serde_json::from_str(text.get())
            .map_err(|_| unreadable("stats", "an object or null", text.get()))?;
        return match v {
            Value::Null => Ok(None),
            other => Err(wrong("stats", "an object or null", &other)),
        };
    }
    // Each value parsed on its own, so a number no f64 holds (1e400) names its stat.
    // Keys read as `tolerant_value` reads them: an unknown one with a lone surrogate escape
    // is skipped, not a fault of the body.
    let raw: HashMap<LossyKey, &RawValue> =
        serde_json::from_str(text.get()).map_err(|e| DecodeError::NotJson(e.to_string()))?;
    let get = |key: &str, field: &'static str| -> Result<Option<Value>, DecodeError> {
        raw.get(key)
            .map(|v| serde_json::from_str(v.get()).map_err(|_| unreadable_stat(field, v.get())))
            .transpose()
    };
    let count = |key: &str, field: &'static str| token_count(get(key, field)?.as_ref(), field);
    let number = |key: &str, field: &'static str| stat(get(key, field)?.as_ref(), field);
    Ok(Some(Stats {
        walltime: number("walltime", "stats.walltime")?,
        input_size: number("input_size", "stats.input_size")?,
        input_token_count: count("input_token_count", "stats.input_token_count")?,
        output_token_count: count("output_token_count", "stats.output_token_count")?,
        cache_read_token_count: count("cache_read_token_count", "stats.cache_read_token_count")?,
        cache_creation_token_count: count(
            "cache_creation_token_count",
            "stats.cache_creation_token_count",
        )?,
        provider_cost: match get("provider_cost", "stats.provider_cost")? {
            None | Some(Value::Null) => None,
            v => Some(stat(v.as_ref(), "stats.provider_cost")?),
        },
        provider_cost_type: match get("provider_cost_type", "stats.provider_cost_type")? {
            None | Some(Value::Null) => None,
            // Kept in the settlement's metadata (jsonb), which cannot hold NUL.
            Some(Value::String(s)) if s.contains('\0') => {
                return Err(DecodeError::NulByte {
                    field: "stats.provider_cost_type",
                })
            }
            Some(Value::String(s)) => Some(s),
            Some(other) => {
                return Err(wrong(
                    "stats.provider_cost_type",
                    "a string or null",
                    &other,
                ))
            }
        },
    }))
}

/// Why a stat's valid JSON `text` cannot be read: a number past f64 (`1e400`), or a string
/// with a lone UTF-16 surrogate, which could not be kept in the ledger's metadata either.
fn unreadable_stat(field: &'static str, text: &str) -> DecodeError {
    if !text.starts_with('"') {
        return DecodeError::InvalidStat { field };
    }
    DecodeError::WrongType {
        field,
        expected: match field {
            "stats.provider_cost_type" => "a string or null",
            "stats.walltime" | "stats.input_size" | "stats.provider_cost" => "a number",
            _ => "an integer ≥ 0",
        },
        got: "string with a lone surrogate",
    }
}

/// The first of [`STAT_FIELDS`] that the object `text` gives more than once, if any (None for
/// anything but an object: its type is checked after).
fn repeated_stat(text: &str) -> Option<&'static str> {
    let key = repeated_key(text.as_bytes(), |k| {
        STAT_FIELDS.iter().any(|(f, _)| *f == k)
    })?;
    STAT_FIELDS
        .iter()
        .find(|(f, _)| *f == key)
        .map(|(_, field)| *field)
}

/// The first key among those `counts` picks that the JSON object `json` gives more than
/// once, if any (None for anything but an object). Of two values, which was meant would be
/// a guess, and JSON readers differ on which they keep.
pub(crate) fn repeated_key(json: &[u8], counts: impl Fn(&str) -> bool) -> Option<String> {
    struct Repeated<F>(F);
    impl<'de, F: Fn(&str) -> bool> Visitor<'de> for Repeated<F> {
        type Value = Option<String>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("an object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Option<String>, A::Error> {
            // A set: a body of 100k distinct keys is a quadratic scan with a list.
            let mut seen: HashSet<String> = HashSet::new();
            let mut repeated = None;
            // Read as `LossyKey`: a key with a lone surrogate escape, which the object's own
            // reading skips, must not end the search for a repeat among the others.
            while let Some(LossyKey(key)) = map.next_key::<LossyKey>()? {
                map.next_value::<IgnoredAny>()?;
                if !(self.0)(&key) {
                    continue;
                }
                if seen.contains(&key) {
                    repeated = repeated.or(Some(key));
                } else {
                    seen.insert(key);
                }
            }
            Ok(repeated)
        }
    }
    serde_json::Deserializer::from_slice(json)
        .deserialize_any(Repeated(counts))
        .ok()
        .flatten()
}

/// A token count: an integer ≥ 0 (absent or null ⇒ 0). A number with no fractional part
/// written as a float (`5.0`) is that integer, as the executor's own model (pydantic's
/// default, lax mode) reads it; `5.5` is not a count.
fn token_count(v: Option<&Value>, field: &'static str) -> Result<u64, DecodeError> {
    let n = match v {
        None | Some(Value::Null) => return Ok(0),
        Some(Value::Number(n)) => n,
        Some(other) => return Err(wrong(field, "an integer ≥ 0", other)),
    };
    if let Some(c) = n.as_u64() {
        return Ok(c);
    }
    match n.as_f64() {
        _ if n.is_i64() => Err(DecodeError::InvalidStat { field }),
        Some(f) if f.is_finite() && f.fract() == 0.0 => {
            if f < 0.0 {
                Err(DecodeError::InvalidStat { field })
            } else if f < U64_END {
                // Exact: an integral f64 below 2^64 is a u64.
                Ok(f as u64)
            } else {
                Err(DecodeError::OutOfRange { field })
            }
        }
        _ => Err(DecodeError::WrongType {
            field,
            expected: "an integer ≥ 0",
            got: "non-integer number",
        }),
    }
}

/// 2^64, the first integer past `u64::MAX`.
const U64_END: f64 = 18_446_744_073_709_551_616.0;

fn stat(v: Option<&Value>, field: &'static str) -> Result<f64, DecodeError> {
    match v {
        None | Some(Value::Null) => Ok(0.0),
        Some(Value::Number(n)) => match n.as_f64() {
            // `+ 0.0` turns -0.0 into 0.0.
            Some(f) if f.is_finite() && f >= 0.0 => Ok(f + 0.0),
            _ => Err(DecodeError::InvalidStat { field }),
        },
        Some(other) => Err(wrong(field, "a number", other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    /// The reference NodeExecutionEntry (AutoGPT shape) with the platform OpenAI credential.
    const AUTOGPT_EXAMPLE: &str = r#"{"user_id":"u-123","graph_exec_id":"ge-1","graph_id":"g-1","graph_version":1,
 "node_exec_id":"ne-1","node_id":"n-1","block_id":"1f292d4a-41a4-4977-9684-7c8d560b9f91",
 "inputs":{"prompt":"hi","model":"gpt-4-turbo",
   "credentials":{"id":"53c25cb8-e3ee-465c-a4d1-e75a4c899c2a","provider":"openai","type":"api_key","title":"Use Credits for OpenAI"}},
 "execution_context":{"user_id":"u-123","graph_id":"g-1","graph_exec_id":"ge-1","graph_version":1,
   "node_id":null,"node_exec_id":null,"human_in_the_loop_safe_mode":true,
   "sensitive_action_safe_mode":false,"dry_run":false,"user_timezone":"UTC",
   "root_execution_id":null,"parent_execution_id":null,"workspace_id":null,"session_id":null}}"#;

    fn minimal() -> Value {
        json!({"user_id": "u", "graph_exec_id": "ge", "graph_id": "g", "node_exec_id": "ne",
               "node_id": "n", "block_id": "b", "inputs": {}})
    }

    fn with(field: &str, value: Value) -> Vec<u8> {
        let mut v = minimal();
        if let Value::Object(m) = &mut v {
            m.insert(field.to_owned(), value);
        }
        v.to_string().into_bytes()
    }

    fn without(field: &str) -> Vec<u8> {
        let mut v = minimal();
        if let Value::Object(m) = &mut v {
            m.remove(field);
        }
        v.to_string().into_bytes()
    }

    fn ok(body: &[u8]) -> NodeExecutionEntry {
        match decode(body) {
            Ok(e) => e,
            Err(e) => panic!("{e}: {}", String::from_utf8_lossy(body)),
        }
    }

    fn err(body: &[u8]) -> DecodeError {
        match decode(body) {
            Ok(e) => panic!("accepted {e:?}"),
            Err(e) => e,
        }
    }

    #[test]
    fn minimal_message() {
        let e = ok(&minimal().to_string().into_bytes());
        assert_eq!(
            (
                e.user_id.as_str(),
                e.graph_exec_id.as_str(),
                e.graph_id.as_str()
            ),
            ("u", "ge", "g")
        );
        assert_eq!(
            (
                e.node_exec_id.as_str(),
                e.node_id.as_str(),
                e.block_id.as_str()
            ),
            ("ne", "n", "b")
        );
        assert_eq!(e.graph_version, None);
        assert!(e.inputs.is_empty());
        assert_eq!(e.execution_context, None);
        assert_eq!(e.stats, None);
    }

    #[test]
    fn autogpt_message_decodes_and_costs_10() {
        let e = ok(AUTOGPT_EXAMPLE.as_bytes());
        assert_eq!(e.user_id, "u-123");
        assert_eq!(e.node_exec_id, "ne-1");
        assert_eq!(e.block_id, "1f292d4a-41a4-4977-9684-7c8d560b9f91");
        assert_eq!(e.graph_version, Some(1));
        assert_eq!(e.inputs.get("model"), Some(&json!("gpt-4-turbo")));
        let ctx = e.execution_context.clone().unwrap_or_default();
        assert_eq!(ctx.get("user_timezone"), Some(&json!("UTC")));
        let price = crate::cost::CostTable::builtin()
            .and_then(|t| t.price(&e.block_id, &e.inputs, e.stats.as_ref()));
        assert_eq!(price.ok().map(|p| p.cost), Some(10));
    }

    #[test]
    fn optional_fields() {
        let body = with(
            "stats",
            json!({"walltime": 2.5, "input_size": 1024, "cpu": "x", "node_count": 3}),
        );
        assert_eq!(
            ok(&body).stats,
            Some(Stats {
                walltime: 2.5,
                input_size: 1024.0,
                ..Stats::default()
            })
        );
        assert_eq!(ok(&with("stats", json!(null))).stats, None);
        assert_eq!(
            ok(&with("stats", json!({"walltime": null}))).stats,
            Some(Stats::default())
        );
        assert_eq!(
            ok(&with("stats", json!({"walltime": -0.0})))
                .stats
                .map(|s| s.walltime.to_bits()),
            Some(0)
        );
        let full = json!({
            "walltime": 1.5, "input_token_count": 500000, "output_token_count": 250000,
            "cache_read_token_count": 3, "cache_creation_token_count": 4,
            "provider_cost": 0.023, "provider_cost_type": "cost_usd", "llm_call_count": 2,
        });
        assert_eq!(
            ok(&with("stats", full)).stats,
            Some(Stats {
                walltime: 1.5,
                input_size: 0.0,
                input_token_count: 500_000,
                output_token_count: 250_000,
                cache_read_token_count: 3,
                cache_creation_token_count: 4,
                provider_cost: Some(0.023),
                provider_cost_type: Some("cost_usd".into()),
            })
        );
        assert_eq!(ok(&with("graph_version", json!(null))).graph_version, None);
        assert_eq!(
            ok(&with("graph_version", json!(-7))).graph_version,
            Some(-7)
        );
        assert_eq!(
            ok(&with("execution_context", json!(null))).execution_context,
            None
        );
        let ctx = ok(&with("execution_context", json!({"a": 1}))).execution_context;
        assert_eq!(ctx.map(|c| c.len()), Some(1));
    }

    #[test]
    fn unknown_fields_are_ignored() {
        let mut v = minimal();
        if let Value::Object(m) = &mut v {
            m.insert("data".into(), json!({"deep": [1, {"x": null}]}));
            m.insert("user_context".into(), json!({"timezone": "UTC"}));
            m.insert("pre_flight_charge".into(), json!(3));
            m.insert("".into(), json!(""));
        }
        let e = ok(v.to_string().as_bytes());
        assert_eq!(e.user_id, "u");
    }

    #[test]
    fn escaped_strings_and_keys() {
        let body =
            br#"{"user\u005fid":"u\u002d1\n","graph_exec_id":"g\u00e9","graph_id":"\ud83d\ude00",
            "node_exec_id":"a\"b","node_id":"\\","block_id":"b","inputs":{"k\u0065y":"v\tw"}}"#;
        let e = ok(body);
        assert_eq!(e.user_id, "u-1\n");
        assert_eq!(e.graph_exec_id, "gé");
        assert_eq!(e.graph_id, "😀");
        assert_eq!(e.node_exec_id, "a\"b");
        assert_eq!(e.node_id, "\\");
        assert_eq!(e.inputs.get("key"), Some(&json!("v\tw")));
    }

    #[test]
    fn body_size_limit() {
        // Pad a valid message with spaces to exactly the limit, then one byte over.
        let base = minimal().to_string();
        let mut body = base.clone().into_bytes();
        body.resize(MAX_BODY_BYTES, b' ');
        assert_eq!(ok(&body).user_id, "u");
        body.push(b' ');
        let e = err(&body);
        assert_eq!(
            e,
            DecodeError::TooLarge {
                size: MAX_BODY_BYTES + 1
            }
        );
        assert_eq!(e.field(), "body");
        assert!(
            e.to_string()
                .starts_with("body: 1048577 bytes exceeds the 1 MiB limit"),
            "{e}"
        );
        // The limit holds before parsing: an oversized non-JSON body is "too large".
        assert_eq!(
            err(&vec![0xff; MAX_BODY_BYTES + 1]),
            DecodeError::TooLarge {
                size: MAX_BODY_BYTES + 1
            }
        );
    }

    #[test]
    fn body_errors() {
        assert_eq!(err(b"{\"user_id\":\"\xff\"}"), DecodeError::NotUtf8);
        assert_eq!(DecodeError::NotUtf8.to_string(), "body: not UTF-8");
        for bad in [
            &b""[..],
            b"  ",
            b"{",
            b"{\"user_id\":}",
            b"{\"a\":1,}",
            b"nul",
            b"[1,",
        ] {
            let e = err(bad);
            assert!(
                matches!(e, DecodeError::NotJson(_)),
                "{:?} -> {e:?}",
                String::from_utf8_lossy(bad)
            );
            assert!(e.to_string().starts_with("body: not valid JSON: "), "{e}");
            assert_eq!(e.field(), "body");
        }
        let trailing = format!("{} x", minimal());
        assert!(matches!(err(trailing.as_bytes()), DecodeError::NotJson(_)));
        for (body, got) in [
            ("[]", "array"),
            ("\"s\"", "string"),
            (" 12.5", "number"),
            ("null", "null"),
            ("true", "boolean"),
        ] {
            let e = err(body.as_bytes());
            assert_eq!(e, DecodeError::NotAnObject { got });
            assert_eq!(
                e.to_string(),
                format!("body: expected a JSON object, got {got}")
            );
        }
    }

    #[test]
    fn deep_nesting_never_overflows_the_stack() {
        let deep = format!(
            "{{\"inputs\":{}{}}}",
            "[".repeat(100_000),
            "]".repeat(100_000)
        );
        assert_eq!(
            err(deep.as_bytes()).to_string(),
            "inputs: expected an object, got array"
        );
    }

    #[test]
    fn required_fields() {
        for field in ID_FIELDS.iter().copied().chain(["inputs"]) {
            let e = err(&without(field));
            assert_eq!(e, DecodeError::Missing { field });
            assert_eq!(e.field(), field);
            assert_eq!(e.to_string(), format!("{field}: missing"));
        }
    }

    #[test]
    fn ids_must_be_strings() {
        for field in ID_FIELDS {
            for (value, got) in [
                (json!(5), "number"),
                (json!(null), "null"),
                (json!(true), "boolean"),
                (json!(["a"]), "array"),
                (json!({}), "object"),
            ] {
                let e = err(&with(field, value));
                assert_eq!(
                    e,
                    DecodeError::WrongType {
                        field,
                        expected: "a string",
                        got
                    }
                );
                assert_eq!(
                    e.to_string(),
                    format!("{field}: expected a string, got {got}")
                );
            }
        }
    }

    #[test]
    fn ids_must_be_non_empty_short_and_nul_free() {
        for field in ID_FIELDS {
            assert_eq!(err(&with(field, json!(""))), DecodeError::Empty { field });
            let e = err(&with(field, json!("x".repeat(256))));
            assert_eq!(e, DecodeError::TooLong { field, len: 256 });
            assert!(
                e.to_string()
                    .starts_with(&format!("{field}: longer than 255 bytes")),
                "{e}"
            );
            assert_eq!(
                err(&with(field, json!("a\u{0}b"))),
                DecodeError::NulByte { field }
            );
        }
        // The limit is in bytes: 85 three-byte characters fit, one more byte does not.
        assert_eq!(
            ok(&with("node_exec_id", json!("€".repeat(85))))
                .node_exec_id
                .len(),
            255
        );
        assert_eq!(
            err(&with("node_exec_id", json!(format!("{}a", "€".repeat(85))))),
            DecodeError::TooLong {
                field: "node_exec_id",
                len: 256
            }
        );
        assert_eq!(
            ok(&with("user_id", json!("x".repeat(255)))).user_id.len(),
            255
        );
    }

    #[test]
    fn inputs_must_be_an_object() {
        for (value, got) in [
            (json!("x"), "string"),
            (json!(null), "null"),
            (json!([]), "array"),
            (json!(1), "number"),
        ] {
            let e = err(&with("inputs", value));
            assert_eq!(
                e,
                DecodeError::WrongType {
                    field: "inputs",
                    expected: "an object",
                    got
                }
            );
        }
        assert_eq!(
            err(&with("inputs", json!("x"))).to_string(),
            "inputs: expected an object, got string"
        );
    }

    #[test]
    fn optional_field_types() {
        let e = err(&with("graph_version", json!(1.5)));
        assert_eq!(e.field(), "graph_version");
        assert!(matches!(e, DecodeError::WrongType { .. }));
        // An integral float is its integer, as pydantic reads it, within an i64.
        assert_eq!(
            ok(&with("graph_version", json!(3.0))).graph_version,
            Some(3)
        );
        assert_eq!(
            ok(&with("graph_version", json!(-2.0))).graph_version,
            Some(-2)
        );
        assert_eq!(
            ok(&with("graph_version", json!(-I64_END))).graph_version,
            Some(i64::MIN)
        );
        assert_eq!(
            err(&with("graph_version", json!(I64_END))),
            DecodeError::OutOfRange {
                field: "graph_version"
            }
        );
        assert_eq!(
            err(&with("graph_version", json!("1"))).field(),
            "graph_version"
        );
        assert_eq!(
            err(&with("graph_version", json!(u64::MAX))),
            DecodeError::OutOfRange {
                field: "graph_version"
            }
        );
        let e = err(&with("execution_context", json!([])));
        assert_eq!(
            e,
            DecodeError::WrongType {
                field: "execution_context",
                expected: "an object or null",
                got: "array"
            }
        );
        assert_eq!(err(&with("stats", json!("fast"))).field(), "stats");
    }

    /// `[[…["x"]…]]` nested `levels` deep.
    fn nested(levels: usize) -> String {
        format!("{}\"x\"{}", "[".repeat(levels), "]".repeat(levels))
    }

    /// Block inputs are user data: valid JSON nested past the parser's limit (128) is decoded
    /// and priced like any other, never dead-lettered (which would leave a run unbilled).
    #[test]
    fn inputs_nested_past_the_parsers_limit_are_decoded_and_priced() {
        let table = crate::cost::CostTable::builtin().unwrap();
        let text_gen = "1f292d4a-41a4-4977-9684-7c8d560b9f91";
        for levels in [1, 99, 100, 101, 126, 127, 128, 200, 100_000] {
            let body = format!(
                r#"{{"user_id":"u","graph_exec_id":"ge","graph_id":"g","node_exec_id":"ne",
                "node_id":"n","block_id":"{text_gen}","inputs":{{"prompt":{deep},
                "model":"gpt-4-turbo","credentials":{{"id":"53c25cb8-e3ee-465c-a4d1-e75a4c899c2a",
                "provider":"openai","type":"api_key","extra":{deep}}}}},
                "execution_context":{{"a":{deep}}}}}"#,
                deep = nested(levels)
            );
            let e = ok(body.as_bytes());
            let price = table.price(&e.block_id, &e.inputs, None).unwrap();
            assert_eq!(price.cost, 10, "{levels}");
        }
        // Built down to the depth; below it a non-empty array or object stands as TOO_DEEP,
        // an empty one as itself.
        let depth_of = |v: &Value| {
            let (mut d, mut v) = (0, v);
            while let Some(inner) = v.as_array().and_then(|a| a.first()) {
                (d, v) = (d + 1, inner);
            }
            (d, v.clone())
        };
        let inputs = |raw: &str| ok(&minimal_with_raw_inputs(raw)).inputs["p"].clone();
        // `inputs` itself is the first level.
        let under = MAX_VALUE_DEPTH - 1;
        let kept = inputs(&nested(under));
        assert_eq!(depth_of(&kept), (under, json!("x")));
        let cut = inputs(&nested(under + 1));
        assert_eq!(depth_of(&cut), (under, json!(TOO_DEEP)));
        let empty = format!("{}{{}}{}", "[".repeat(under), "]".repeat(under));
        assert_eq!(depth_of(&inputs(&empty)), (under, json!({})));
        // Still JSON that must be valid, however deep.
        let broken = format!("{}1{}", "[".repeat(500), "]".repeat(499));
        assert_eq!(err(&minimal_with_raw_inputs(&broken)).field(), "body");
    }

    /// Valid JSON the parser cannot hold (a number past f64, a lone surrogate, which Python's
    /// json module writes) in user data is read around, and the run priced, not refused; in
    /// an id it still makes the message invalid.
    #[test]
    fn inputs_the_parser_cannot_hold_are_read_around_and_priced() {
        let table = crate::cost::CostTable::builtin().unwrap();
        let text_gen = "1f292d4a-41a4-4977-9684-7c8d560b9f91";
        let huge = "9".repeat(401);
        let body = format!(
            r#"{{"user_id":"u","graph_exec_id":"ge","graph_id":"g","node_exec_id":"ne",
            "node_id":"n","block_id":"{text_gen}","inputs":{{"prompt":{huge},
            "model":"gpt-4-turbo","credentials":{{"id":"53c25cb8-e3ee-465c-a4d1-e75a4c899c2a",
            "provider":"openai","type":"api_key","extra":["\ud800",1],"\udc00":2}}}},
            "execution_context":{{"n":1e400}}}}"#
        );
        let e = ok(body.as_bytes());
        assert_eq!(table.price(&e.block_id, &e.inputs, None).unwrap().cost, 10);
        assert_eq!(e.inputs["prompt"], json!(NOT_REPRESENTABLE));
        assert_eq!(
            e.inputs["credentials"]["extra"],
            json!([NOT_REPRESENTABLE, 1])
        );
        assert_eq!(e.inputs["credentials"]["provider"], json!("openai"));
        // A key it cannot hold is one key of its object, not the whole object.
        let credentials = e.inputs["credentials"]
            .as_object()
            .cloned()
            .unwrap_or_default();
        assert_eq!(credentials.len(), 5, "{credentials:?}");
        assert!(
            credentials.values().any(|v| v == &json!(2)),
            "{credentials:?}"
        );
        assert_eq!(
            e.execution_context.unwrap_or_default()["n"],
            json!(NOT_REPRESENTABLE)
        );
        // In an id or another checked field, the message is invalid, the field named; as JSON
        // that is not valid, the body.
        let in_id = minimal().to_string().replace(r#""u""#, r#""\ud800""#);
        assert_eq!(
            err(in_id.as_bytes()).to_string(),
            "user_id: expected a string, got string with a lone surrogate"
        );
        let with = |field: &str| {
            let body = minimal().to_string();
            body.replacen('{', &format!("{{{field},"), 1).into_bytes()
        };
        assert_eq!(
            err(&with(r#""graph_version":1e400"#)).to_string(),
            "graph_version: integer out of range"
        );
        assert_eq!(
            err(&with(r#""phase":"\udc00""#)).to_string(),
            "phase: expected \"started\" or \"completed\", got string with a lone surrogate"
        );
        // A key no field has, or a stat no one prices, is skipped whatever it holds.
        let e = ok(&with(r#""x\ud800":1,"stats":{"y\udc00":2,"walltime":3}"#));
        assert_eq!(e.stats.map(|s| s.walltime), Some(3.0));
        // Which of two values prices the run would still be a guess.
        for stats in [
            r#""stats":{"x\ud800":0,"walltime":10,"walltime":1000}"#,
            r#""stats":{"walltime":10,"walltime":1000,"y\udc00":0}"#,
            r#""stats":{"wall\u0074ime":10,"walltime":1000,"q\ud800":1}"#,
        ] {
            assert_eq!(
                err(&with(stats)).to_string(),
                "stats.walltime: given more than once",
                "{stats}"
            );
        }
        assert_eq!(
            err(&with(r#""stats":"\ud800""#)).to_string(),
            "stats: expected an object or null, got string with a lone surrogate"
        );
        let broken = minimal_with_raw_inputs("[1,}");
        assert!(matches!(err(&broken), DecodeError::NotJson(_)));
        // A field's own fault, found by the pass that reads around such inputs, is named.
        let and = |field: &str| {
            let body = String::from_utf8(minimal_with_raw_inputs("1e400")).unwrap();
            body.replacen('{', &format!("{{{field},"), 1).into_bytes()
        };
        assert_eq!(
            err(&and(r#""graph_version":"7""#)).to_string(),
            "graph_version: expected an integer or null, got string"
        );
        assert_eq!(
            err(&and(r#""stats":{"walltime":-1}"#)).to_string(),
            "stats.walltime: must be a finite number ≥ 0"
        );
        // A stat that is a string no jsonb can hold is named as one.
        assert_eq!(
            err(&and(r#""stats":{"provider_cost_type":"\ud800x"}"#)).to_string(),
            "stats.provider_cost_type: expected a string or null, got string with a lone surrogate"
        );
    }

    /// The minimal message with `inputs` = {"p": `raw`}.
    fn minimal_with_raw_inputs(raw: &str) -> Vec<u8> {
        format!(
            r#"{{"user_id":"u","graph_exec_id":"ge","graph_id":"g","node_exec_id":"ne",
            "node_id":"n","block_id":"b","inputs":{{"p":{raw}}}}}"#
        )
        .into_bytes()
    }

    /// Python writes a sum such as 0.01 + 0.2 with 17 significant digits; read as its nearest
    /// double, as Python reads it back, it prices as AutoGPT does (SPEC §5: IEEE doubles).
    #[test]
    fn a_provider_cost_is_read_as_its_nearest_double() {
        let exa_search = "996cec64-ac40-4dde-982f-b0dc60a5824d";
        let body = |cost: &str| {
            format!(
                r#"{{"user_id":"u","graph_exec_id":"ge","graph_id":"g","node_exec_id":"ne",
                "node_id":"n","block_id":"{exa_search}","phase":"completed",
                "inputs":{{"credentials":{{"id":"96153e04-9c6c-4486-895f-5bb683b1ecec",
                  "provider":"exa","type":"api_key"}}}},
                "stats":{{"provider_cost":{cost},"provider_cost_type":"cost_usd"}}}}"#
            )
        };
        let table = crate::cost::CostTable::builtin().unwrap();
        for (text, credits) in [
            ("0.21000000000000002", 22),
            ("1.1099999999999999", 111),
            ("0.05", 5),
        ] {
            let e = ok(body(text).as_bytes());
            let stats = e.stats.as_ref().unwrap();
            assert_eq!(stats.provider_cost, Some(text.parse::<f64>().unwrap()));
            let price = table.price(exa_search, &e.inputs, Some(stats)).unwrap();
            assert_eq!(price.cost, credits, "{text}");
        }
    }

    #[test]
    fn completions_carry_phase_status_and_the_runs_counts() {
        let e = ok(&with("phase", json!("completed")));
        assert_eq!(
            (e.phase, e.status),
            (Phase::Completed, RunStatus::Completed)
        );
        let mut v: Value = serde_json::from_slice(&with("phase", json!("completed"))).unwrap();
        v["status"] = json!("TERMINATED");
        let e = ok(&serde_json::to_vec(&v).unwrap());
        assert_eq!(e.status, RunStatus::Terminated);
        assert_eq!(ok(AUTOGPT_EXAMPLE.as_bytes()).phase, Phase::Started);
        let e = err(&with("phase", json!("finished")));
        assert_eq!(
            e.to_string(),
            "phase: expected \"started\" or \"completed\""
        );
        let e = err(&with("status", json!("OK")));
        assert_eq!(
            e.to_string(),
            "status: expected \"COMPLETED\", \"FAILED\" or \"TERMINATED\""
        );
        assert_eq!(err(&with("phase", json!(1))).field(), "phase");
        // null is the default, as for the other optional fields.
        let e = ok(&with("phase", Value::Null));
        assert_eq!((e.phase, e.status), (Phase::Started, RunStatus::Completed));
        let mut v: Value = serde_json::from_slice(&with("phase", json!("completed"))).unwrap();
        v["status"] = Value::Null;
        assert_eq!(
            ok(&serde_json::to_vec(&v).unwrap()).status,
            RunStatus::Completed
        );
        let e = err(&with("stats", json!({"input_token_count": -3})));
        assert_eq!(
            e.to_string(),
            "stats.input_token_count: must be a finite number ≥ 0"
        );
        let e = err(&with("stats", json!({"output_token_count": 1.5})));
        assert_eq!(
            e.to_string(),
            "stats.output_token_count: expected an integer ≥ 0, got non-integer number"
        );
        let whole = ok(&with(
            "stats",
            json!({"input_token_count": 5.0, "output_token_count": -0.0}),
        ));
        let stats = whole.stats.as_ref().unwrap();
        assert_eq!((stats.input_token_count, stats.output_token_count), (5, 0));
        let e = err(&with("stats", json!({"cache_read_token_count": -2.0})));
        assert_eq!(
            e.to_string(),
            "stats.cache_read_token_count: must be a finite number ≥ 0"
        );
        let e = err(&with("stats", json!({"input_token_count": 1e20})));
        assert_eq!(
            e.to_string(),
            "stats.input_token_count: integer out of range"
        );
        // The largest double below 2^64 is a count; 2^64 itself is not.
        let below = ok(&with(
            "stats",
            json!({"input_token_count": 18_446_744_073_709_549_568.0_f64}),
        ));
        assert_eq!(
            below.stats.as_ref().unwrap().input_token_count,
            18_446_744_073_709_549_568
        );
        let e = err(&with(
            "stats",
            json!({"input_token_count": 18_446_744_073_709_551_616.0_f64}),
        ));
        assert_eq!(
            e.to_string(),
            "stats.input_token_count: integer out of range"
        );
        let body = String::from_utf8(with("stats", json!({"input_token_count": 7}))).unwrap();
        let body = body.replace(":7", ":100000000000000000000");
        let e = err(body.as_bytes());
        assert_eq!(
            e.to_string(),
            "stats.input_token_count: integer out of range"
        );
        let e = err(&with("stats", json!({"provider_cost_type": "a\u{0}b"})));
        assert_eq!(
            e.to_string(),
            "stats.provider_cost_type: contains a NUL character"
        );
        let e = err(&with("stats", json!({"provider_cost_type": 7})));
        assert_eq!(e.field(), "stats.provider_cost_type");
        let e = err(&with("stats", json!({"provider_cost": -0.01})));
        assert_eq!(e.field(), "stats.provider_cost");
    }

    #[test]
    fn stats_must_be_finite_and_non_negative() {
        let e = err(&with("stats", json!({"walltime": -1})));
        assert_eq!(
            e,
            DecodeError::InvalidStat {
                field: "stats.walltime"
            }
        );
        assert_eq!(e.field(), "stats.walltime");
        assert_eq!(e.to_string(), "stats.walltime: must be a finite number ≥ 0");
        assert_eq!(
            err(&with("stats", json!({"input_size": -0.5}))).field(),
            "stats.input_size"
        );
        let e = err(&with("stats", json!({"walltime": "1"})));
        assert_eq!(
            e,
            DecodeError::WrongType {
                field: "stats.walltime",
                expected: "a number",
                got: "string"
            }
        );
        // A literal no f64 holds names its stat, whichever kind of stat it is.
        for (raw, field) in [
            ("{\"walltime\":1e400}", "stats.walltime"),
            ("{\"provider_cost\": -1e400}", "stats.provider_cost"),
            ("{\"input_token_count\":1e400}", "stats.input_token_count"),
        ] {
            let e = err(&minimal_with_raw("stats", raw));
            assert_eq!(e, DecodeError::InvalidStat { field }, "{raw}");
        }
        // Unknown keys are not parsed, whatever they hold.
        let body = minimal_with_raw("stats", "{\"x\":1e400,\"walltime\":2}");
        assert_eq!(ok(&body).stats.map(|s| s.walltime), Some(2.0));
    }

    fn minimal_with_raw(field: &str, raw: &str) -> Vec<u8> {
        let base = minimal().to_string();
        format!("{},\"{field}\":{raw}}}", &base[..base.len() - 1]).into_bytes()
    }

    #[test]
    fn duplicate_keys_are_rejected() {
        let body = minimal_with_raw("user_id", "\"other\"");
        assert_eq!(err(&body), DecodeError::Duplicate { field: "user_id" });
        assert_eq!(err(&body).to_string(), "user_id: given more than once");
        assert_eq!(
            err(&minimal_with_raw("inputs", "{}")),
            DecodeError::Duplicate { field: "inputs" }
        );
        // Unknown keys may repeat: they are not read.
        let body = minimal_with_raw("x", "1,\"x\":2");
        assert_eq!(ok(&body).user_id, "u");
    }

    #[test]
    fn a_stat_given_twice_is_rejected_naming_it() {
        let body = minimal_with_raw(
            "stats",
            r#"{"provider_cost": 0.01, "provider_cost_type": "cost_usd", "provider_cost": 100}"#,
        );
        assert_eq!(
            err(&body),
            DecodeError::Duplicate {
                field: "stats.provider_cost"
            }
        );
        assert_eq!(
            err(&body).to_string(),
            "stats.provider_cost: given more than once"
        );
        let body = minimal_with_raw("stats", r#"{"walltime": 1, "x": 1, "x": 2, "walltime": 2}"#);
        assert_eq!(err(&body).field(), "stats.walltime");
        // Unknown stats may repeat; known ones once each are fine.
        let body = minimal_with_raw("stats", r#"{"x": 1, "x": 2, "walltime": 2.5}"#);
        assert_eq!(ok(&body).stats.map(|s| s.walltime), Some(2.5));
        // The type is still checked as before.
        assert_eq!(
            err(&minimal_with_raw("stats", "5")).to_string(),
            "stats: expected an object or null, got number"
        );
        assert!(ok(&minimal_with_raw("stats", "null")).stats.is_none());
    }

    #[test]
    fn entries_serialize() {
        let e = ok(AUTOGPT_EXAMPLE.as_bytes());
        let v = serde_json::to_value(&e).ok();
        assert_eq!(
            v.as_ref().and_then(|v| v.get("node_exec_id")),
            Some(&json!("ne-1"))
        );
        assert_eq!(v.as_ref().and_then(|v| v.get("stats")), Some(&json!(null)));
    }

    fn any_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            any::<f64>()
                .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
            ".{0,8}".prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 32, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                prop::collection::btree_map(
                    prop::sample::select(vec![
                        "user_id",
                        "graph_exec_id",
                        "graph_id",
                        "node_exec_id",
                        "node_id",
                        "block_id",
                        "graph_version",
                        "inputs",
                        "execution_context",
                        "stats",
                        "walltime",
                        "input_size",
                        "other",
                    ]),
                    inner,
                    0..6
                )
                .prop_map(|m| Value::Object(
                    m.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()
                )),
            ]
        })
    }

    proptest! {
        #[test]
        fn never_panics_on_bytes(body in prop::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode(&body);
            let mut braced = b"{".to_vec();
            braced.extend_from_slice(&body);
            let _ = decode(&braced);
        }

        #[test]
        fn never_panics_on_json(v in any_json()) {
            let _ = decode(v.to_string().as_bytes());
        }

        #[test]
        fn never_panics_on_entries_with_random_field_values(field in prop::sample::select(vec![
            "user_id", "graph_exec_id", "graph_id", "node_exec_id", "node_id", "block_id",
            "graph_version", "inputs", "execution_context", "stats",
        ]), value in any_json()) {
            let body = with(field, value);
            if let Err(e) = decode(&body) {
                prop_assert!(e.field() == field || e.field().starts_with("stats."), "{} vs {}", e, field);
            }
        }

        #[test]
        fn valid_entries_round_trip(ids in prop::collection::vec("[^\u{0}]{1,40}", 6), inputs in any_json(), version in any::<Option<i64>>(),
                                    walltime in 0.0f64..1e9, input_size in 0u32..u32::MAX) {
            let mut v = json!({"graph_version": version, "stats": {"walltime": walltime, "input_size": input_size}});
            let inputs = match inputs { Value::Object(m) => m, other => Map::from_iter([("v".to_owned(), other)]) };
            if let Value::Object(m) = &mut v {
                for (field, id) in ID_FIELDS.iter().zip(&ids) {
                    m.insert((*field).to_owned(), json!(id));
                }
                m.insert("inputs".into(), Value::Object(inputs.clone()));
            }
            let e = decode(v.to_string().as_bytes());
            prop_assert!(e.is_ok(), "{:?}", e.err());
            if let Ok(e) = e {
                prop_assert_eq!(&e.user_id, &ids[0]);
                prop_assert_eq!(&e.block_id, &ids[5]);
                prop_assert_eq!(e.graph_version, version);
                // Compared with serde_json's own reading of the same text (its default float
                // parser is not always correctly rounded, so the generated floats may differ).
                let expected: Result<Map<String, Value>, _> = serde_json::from_str(&Value::Object(inputs).to_string());
                prop_assert_eq!(Some(&e.inputs), expected.as_ref().ok());
                let stats = e.stats.unwrap_or_default();
                prop_assert_eq!(stats.input_size, f64::from(input_size));
                // serde_json's default float parser may be 1 ulp off the correctly rounded value.
                prop_assert!((stats.walltime - walltime).abs() <= walltime * f64::EPSILON);
            }
        }
    }
}
