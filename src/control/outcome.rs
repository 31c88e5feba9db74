//! `outcome` {node_exec_id} ⇒ {outcome, cost, transaction_key?}; `not_found` before a decision.

use serde_json::Value;

use super::fields::Fields;
use super::{to_result, Context, ControlError};
use crate::message::MAX_ID_BYTES;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub node_exec_id: String,
}

pub fn parse(f: &Fields<'_>) -> Result<Request, ControlError> {
    let node_exec_id = f.string("node_exec_id")?.to_owned();
    if node_exec_id.is_empty() || node_exec_id.len() > MAX_ID_BYTES {
        return Err(ControlError::bad_request(format!(
            "node_exec_id: must be 1 to {MAX_ID_BYTES} bytes"
        )));
    }
    Ok(Request { node_exec_id })
}

pub async fn run(ctx: &Context, req: &Request) -> Result<Value, ControlError> {
    let decision = ctx
        .ledger
        .decision(&req.node_exec_id)
        .await?
        .ok_or_else(|| {
            ControlError::NotFound(format!(
                "node_exec_id: no decision for {:?} yet",
                req.node_exec_id
            ))
        })?;
    to_result(&decision)
}
