//! `history` {user_id, limit?, before_seq?, type?, graph_exec_id?} ⇒ {transactions: [...],
//! next_before_seq}: one page, newest first, keyset-paged on `seq`.

use serde_json::Value;

use super::fields::Fields;
use super::{to_result, Context, ControlError};
use crate::ledger::{HistoryQuery, TxType, DEFAULT_HISTORY_LIMIT};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub user_id: String,
    pub query: HistoryQuery,
}

pub fn parse(f: &Fields<'_>) -> Result<Request, ControlError> {
    let user_id = f.string("user_id")?.to_owned();
    crate::ledger::check_user_id(&user_id)?;
    let tx_type = match f.opt_string("type")? {
        None => None,
        Some(name) => Some(
            name.parse::<TxType>()
                .map_err(|e| ControlError::bad_request(format!("type: {e}")))?,
        ),
    };
    let query = HistoryQuery {
        limit: f.opt_integer("limit")?.unwrap_or(DEFAULT_HISTORY_LIMIT),
        before_seq: f.opt_integer("before_seq")?,
        tx_type,
        graph_exec_id: f.opt_string("graph_exec_id")?.map(str::to_owned),
    };
    // Refused here, so a bad page never reaches the database.
    query.check()?;
    Ok(Request { user_id, query })
}

pub async fn run(ctx: &Context, req: &Request) -> Result<Value, ControlError> {
    let page = ctx
        .ledger
        .history(&req.user_id, &req.query, &*ctx.clock)
        .await?;
    to_result(&page)
}

#[cfg(test)]
mod tests {
    use serde_json::{json, Map};

    use super::*;

    fn parse_json(v: Value) -> Result<Request, ControlError> {
        let map: Map<String, Value> = serde_json::from_value(v).expect("object");
        parse(&Fields::new(&map))
    }

    fn error(v: Value) -> String {
        let e = parse_json(v).expect_err("a bad request");
        assert_eq!(e.code(), "bad_request", "{e}");
        e.to_string()
    }

    #[test]
    fn defaults_and_every_field() {
        let r = parse_json(json!({"user_id": "u"})).expect("ok");
        assert_eq!(r.query, HistoryQuery::newest(50));
        let r = parse_json(json!({"user_id": "u", "limit": 1000, "before_seq": 7,
            "type": "USAGE", "graph_exec_id": "g-1"}))
        .expect("ok");
        assert_eq!(
            r.query,
            HistoryQuery {
                limit: 1000,
                before_seq: Some(7),
                tx_type: Some(TxType::Usage),
                graph_exec_id: Some("g-1".into()),
            }
        );
        let r = parse_json(json!({"user_id": "u", "before_seq": null, "type": null})).expect("ok");
        assert_eq!(r.query, HistoryQuery::newest(50));
    }

    #[test]
    fn bad_fields_are_named() {
        let cases = [
            (json!({"limit": 5}), "user_id: missing"),
            (
                json!({"user_id": "u", "limit": 0}),
                "limit: must be between 1 and 1000",
            ),
            (
                json!({"user_id": "u", "limit": 1001}),
                "limit: must be between 1 and 1000",
            ),
            (
                json!({"user_id": "u", "limit": "5"}),
                "limit: expected an integer",
            ),
            (
                json!({"user_id": "u", "before_seq": 0}),
                "before_seq: must be at least 1",
            ),
            (
                json!({"user_id": "u", "before_seq": -3}),
                "before_seq: must be at least 1",
            ),
            (
                json!({"user_id": "u", "before_seq": 2.5}),
                "before_seq: expected an integer (digits, without a fraction or exponent)",
            ),
            (
                json!({"user_id": "u", "type": 3}),
                "type: expected a string",
            ),
            (
                json!({"user_id": "u", "type": "usage"}),
                "type: expected one of TOP_UP, USAGE, GRANT, REFUND, got \"usage\"",
            ),
            (
                json!({"user_id": "u", "graph_exec_id": 9}),
                "graph_exec_id: expected a string",
            ),
        ];
        for (v, expected) in cases {
            assert_eq!(error(v.clone()), expected, "{v}");
        }
    }
}
