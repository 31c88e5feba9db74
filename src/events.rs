//! The events of docs/contract.md §6, built where the ledger decides them and stored in the outbox in the
//! same transaction. `event_id` is derived from the fact itself, so republishing after a crash
//! produces the same id and consumers can deduplicate.

use chrono::{DateTime, SecondsFormat, Utc};
use serde::Serialize;
use serde_json::json;

pub const BALANCE_CHANGED: &str = "balance.changed";
pub const CHARGE_REJECTED: &str = "charge.rejected";
pub const BALANCE_LOW: &str = "balance.low";
pub(crate) const CHARGE_UNCOLLECTED: &str = "charge.uncollected";
pub(crate) const TOP_UP_REQUESTED: &str = "top_up.requested";

/// An event waiting in the outbox.
#[derive(Debug, Clone, PartialEq)]
pub struct NewEvent {
    pub event_id: String,
    pub routing_key: &'static str,
    /// The JSON text stored and published, keys in order.
    pub payload: String,
}

impl NewEvent {
    /// The payload as a JSON value.
    #[cfg(test)]
    pub(crate) fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.payload).unwrap_or_default()
    }
}

/// The node execution a ledger row or event belongs to, when there is one.
#[derive(Debug, Clone, Copy, Default)]
pub struct ExecutionRef<'a> {
    pub node_exec_id: Option<&'a str>,
    pub graph_exec_id: Option<&'a str>,
}

/// The `occurred_at` of every event: RFC 3339, UTC, microseconds.
pub(crate) fn rfc3339(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Micros, true)
}

/// The user part of a `balance.changed` event id: `%` and `:` percent-encoded, so that the id
/// names one (user, key) pair even when both hold colons. Unchanged for a user without either
/// (SQL: `credit.event_user`, migration 0013).
pub(crate) fn event_user(user_id: &str) -> std::borrow::Cow<'_, str> {
    if user_id.contains(['%', ':']) {
        user_id.replace('%', "%25").replace(':', "%3A").into()
    } else {
        user_id.into()
    }
}

/// An event id as AMQP can carry it in `message_id` (at most 255 bytes): `id` itself, or,
/// when longer, `{routing_key}:%sha256:{hex}` of it, as deterministic. A user part never
/// starts with a bare `%` ([`event_user`] encodes it), nor does a `node_exec_id` part
/// ([`execution_part`]), so no id of an event takes that form unhashed. (SQL, for
/// `balance.changed`: `credit.balance_changed_id`, migration 0017.)
pub(crate) fn bounded_id(routing_key: &str, id: String) -> String {
    if id.len() <= MAX_EVENT_ID_BYTES {
        return id;
    }
    use sha2::Digest;
    let digest = sha2::Sha256::digest(id.as_bytes());
    format!("{routing_key}:%sha256:{digest:x}")
}

/// A `node_exec_id` as the part of an event id: a leading `%` encoded (`%25`), so that a
/// producer's id of the form `%sha256:{hex}` cannot take the hashed id of another execution's
/// event. Every other id is as it is.
fn execution_part(node_exec_id: &str) -> std::borrow::Cow<'_, str> {
    match node_exec_id.strip_prefix('%') {
        Some(rest) => format!("%25{rest}").into(),
        None => node_exec_id.into(),
    }
}

/// The id of an event: `{routing_key}:{rest}`, bounded by [`bounded_id`].
fn event_id(routing_key: &str, rest: std::fmt::Arguments<'_>) -> String {
    bounded_id(routing_key, format!("{routing_key}:{rest}"))
}

/// AMQP's bound on `message_id` (a short string).
const MAX_EVENT_ID_BYTES: usize = 255;

/// `balance.changed`: one per ledger row; (user, transaction_key) identifies the row.
#[allow(clippy::too_many_arguments)]
pub fn balance_changed(
    user_id: &str,
    seq: i64,
    amount: i64,
    balance: i64,
    transaction_type: &str,
    transaction_key: &str,
    exec: ExecutionRef<'_>,
    at: DateTime<Utc>,
) -> NewEvent {
    let event_id = event_id(
        BALANCE_CHANGED,
        format_args!("{}:{transaction_key}", event_user(user_id)),
    );
    let payload = BalanceChanged {
        amount,
        balance,
        event_id: &event_id,
        graph_exec_id: exec.graph_exec_id,
        node_exec_id: exec.node_exec_id,
        occurred_at: &rfc3339(at),
        seq,
        transaction_key,
        transaction_type,
        kind: BALANCE_CHANGED,
        user_id,
    }
    .to_json();
    NewEvent {
        event_id,
        routing_key: BALANCE_CHANGED,
        payload,
    }
}

/// The payload of `balance.changed`, one per ledger row, so written without building a JSON
/// value first. Fields in key order, as `serde_json` writes an object (and the sweep's SQL).
#[derive(Serialize)]
struct BalanceChanged<'a> {
    amount: i64,
    balance: i64,
    event_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    graph_exec_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    node_exec_id: Option<&'a str>,
    occurred_at: &'a str,
    seq: i64,
    transaction_key: &'a str,
    transaction_type: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    user_id: &'a str,
}

impl BalanceChanged<'_> {
    fn to_json(&self) -> String {
        // Strings and integers only: serialising cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// `charge.rejected`: the decision for a node execution, so one per `node_exec_id`.
pub(crate) fn charge_rejected(
    user_id: &str,
    node_exec_id: &str,
    graph_exec_id: &str,
    cost: i64,
    balance: i64,
    at: DateTime<Utc>,
) -> NewEvent {
    let event_id = event_id(
        CHARGE_REJECTED,
        format_args!("{}", execution_part(node_exec_id)),
    );
    NewEvent {
        payload: json!({
            "event_id": event_id,
            "type": CHARGE_REJECTED,
            "user_id": user_id,
            "occurred_at": rfc3339(at),
            "node_exec_id": node_exec_id,
            "graph_exec_id": graph_exec_id,
            "cost": cost,
            "balance": balance,
        })
        .to_string(),
        event_id,
        routing_key: CHARGE_REJECTED,
    }
}

/// `balance.low`: the debit whose ledger row has `seq` crossed the threshold.
pub(crate) fn balance_low(
    user_id: &str,
    seq: i64,
    balance: i64,
    threshold: i64,
    at: DateTime<Utc>,
) -> NewEvent {
    let event_id = event_id(BALANCE_LOW, format_args!("{user_id}:{seq}"));
    NewEvent {
        payload: json!({
            "event_id": event_id,
            "type": BALANCE_LOW,
            "user_id": user_id,
            "occurred_at": rfc3339(at),
            "balance": balance,
            "threshold": threshold,
        })
        .to_string(),
        event_id,
        routing_key: BALANCE_LOW,
    }
}

/// `charge.uncollected`: the part of a settlement's extra charge not taken because debt is
/// not allowed; one per node execution.
pub(crate) fn charge_uncollected(
    user_id: &str,
    node_exec_id: &str,
    graph_exec_id: &str,
    amount: i64,
    balance: i64,
    at: DateTime<Utc>,
) -> NewEvent {
    let event_id = event_id(
        CHARGE_UNCOLLECTED,
        format_args!("{}", execution_part(node_exec_id)),
    );
    NewEvent {
        payload: json!({
            "event_id": event_id,
            "type": CHARGE_UNCOLLECTED,
            "user_id": user_id,
            "occurred_at": rfc3339(at),
            "node_exec_id": node_exec_id,
            "graph_exec_id": graph_exec_id,
            "amount": amount,
            "balance": balance,
        })
        .to_string(),
        event_id,
        routing_key: CHARGE_UNCOLLECTED,
    }
}

/// `top_up.requested`: the payment side is asked to add `amount`; it answers with a `top_up`
/// keyed by `request_id`, so the fulfilment is applied once. `seq` is the user's last ledger
/// row when the request was made: a payment whose row comes after it was not seen by it.
pub(crate) fn top_up_requested(
    user_id: &str,
    request_id: &str,
    seq: i64,
    amount: i64,
    balance: i64,
    threshold: i64,
    at: DateTime<Utc>,
) -> NewEvent {
    let event_id = event_id(TOP_UP_REQUESTED, format_args!("{request_id}"));
    NewEvent {
        payload: json!({
            "event_id": event_id,
            "type": TOP_UP_REQUESTED,
            "user_id": user_id,
            "occurred_at": rfc3339(at),
            "request_id": request_id,
            "seq": seq,
            "amount": amount,
            "balance": balance,
            "threshold": threshold,
        })
        .to_string(),
        event_id,
        routing_key: TOP_UP_REQUESTED,
    }
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;

    use super::*;

    #[test]
    fn an_event_id_over_255_bytes_is_its_routing_key_and_digest() {
        let at = Utc.with_ymd_and_hms(2026, 12, 5, 0, 0, 0).unwrap();
        let changed = |user: &str| {
            balance_changed(user, 1, 5, 5, "TOP_UP", "K", Default::default(), at).event_id
        };
        // 16 + 237 + 2 = 255 bytes: as it is.
        let fits = "u".repeat(237);
        assert_eq!(changed(&fits), format!("balance.changed:{fits}:K"));
        let id = changed(&"u".repeat(238));
        assert_eq!(id.len(), "balance.changed:%sha256:".len() + 64);
        assert!(id.starts_with("balance.changed:%sha256:"), "{id}");
        assert_eq!(id, changed(&"u".repeat(238)));
        assert_ne!(id, changed(&"v".repeat(238)));
        // The digest of the id it would have been (SHA-256 of "a" × 300, by Python's hashlib).
        assert_eq!(
            bounded_id("x", "a".repeat(300)),
            "x:%sha256:9835fa6bf4e20a9b9ea812506302e98982721a6cf8d2cae67af57129bf21ae90"
        );
        let rejected = charge_rejected("u", &"n".repeat(255), "g", 1, 0, at).event_id;
        assert!(
            rejected.starts_with("charge.rejected:%sha256:"),
            "{rejected}"
        );
    }

    /// What `balance_changed` wrote when it built a JSON value: the same text, byte for byte.
    fn as_value(user: &str, key: &str, exec: ExecutionRef<'_>, at: DateTime<Utc>) -> String {
        let mut v = json!({
            "event_id": format!("{BALANCE_CHANGED}:{}:{key}", event_user(user)),
            "type": BALANCE_CHANGED, "user_id": user, "occurred_at": rfc3339(at),
            "amount": -10, "balance": 90, "seq": 7,
            "transaction_type": "USAGE", "transaction_key": key,
        });
        if let Some(id) = exec.node_exec_id {
            v["node_exec_id"] = id.into();
        }
        if let Some(id) = exec.graph_exec_id {
            v["graph_exec_id"] = id.into();
        }
        v.to_string()
    }

    #[test]
    fn balance_changed_is_the_text_of_its_json_object() {
        let at = Utc.with_ymd_and_hms(2026, 11, 25, 12, 0, 0).unwrap();
        let user = "u \"quoted\" \\ é 🙂\n";
        let key = "USAGE-n\u{1}";
        let execs = [
            ExecutionRef::default(),
            ExecutionRef {
                node_exec_id: Some("n\"1"),
                graph_exec_id: Some("g/1"),
            },
            ExecutionRef {
                node_exec_id: None,
                graph_exec_id: Some("g"),
            },
        ];
        for exec in execs {
            let e = balance_changed(user, 7, -10, 90, "USAGE", key, exec, at);
            assert_eq!(e.payload, as_value(user, key, exec, at));
            assert_eq!(e.event_id, format!("balance.changed:{user}:{key}"));
        }
    }

    #[test]
    fn a_balance_changed_id_names_one_user_and_key() {
        let at = Utc.with_ymd_and_hms(2026, 11, 25, 12, 0, 0).unwrap();
        let id = |user, key| {
            balance_changed(user, 1, 5, 5, "TOP_UP", key, Default::default(), at).event_id
        };
        assert_eq!(id("a", "x:y"), "balance.changed:a:x:y");
        assert_eq!(id("a:x", "y"), "balance.changed:a%3Ax:y");
        assert_eq!(id("a%3Ax", "y"), "balance.changed:a%253Ax:y");
        assert_eq!(id("alice", "USAGE-n1"), "balance.changed:alice:USAGE-n1");
    }

    /// A producer's `node_exec_id` shaped like a hashed id does not take the id of the event
    /// of the execution whose id hashes to it.
    #[test]
    fn an_execution_id_cannot_take_a_hashed_event_id() {
        let at = Utc.with_ymd_and_hms(2026, 12, 6, 0, 0, 0).unwrap();
        let long = "x".repeat(250);
        let rejected = |n: &str| charge_rejected("u", n, "g", 1, 0, at).event_id;
        let uncollected = |n: &str| charge_uncollected("u", n, "g", 1, 0, at).event_id;
        for (id, key) in [
            (rejected(&long), CHARGE_REJECTED),
            (uncollected(&long), CHARGE_UNCOLLECTED),
        ] {
            let hashed = id.strip_prefix(&format!("{key}:")).unwrap_or_default();
            assert!(hashed.starts_with("%sha256:"), "{id}");
            let crafted = if key == CHARGE_REJECTED {
                rejected(hashed)
            } else {
                uncollected(hashed)
            };
            assert_ne!(crafted, id);
            assert_eq!(crafted, format!("{key}:%25{}", &hashed[1..]));
        }
        assert_eq!(rejected("n-1"), "charge.rejected:n-1");
        assert_eq!(rejected("a%b"), "charge.rejected:a%b");
    }
}
