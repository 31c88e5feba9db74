//! `outcome` {node_exec_id} ⇒ {user_id, block_id, outcome, cost, transaction_key?, fee,
//! fee_transaction_key?, settlement}; `not_found` before a decision.

use serde_json::Value;

use super::fields::Fields;
use super::{to_result, Context, ControlError};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub node_exec_id: String,
}

pub fn parse(f: &Fields<'_>) -> Result<Request, ControlError> {
    let node_exec_id = f.string("node_exec_id")?.to_owned();
    crate::ledger::check_node_exec_id(&node_exec_id)?;
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
