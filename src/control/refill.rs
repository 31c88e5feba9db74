//! `refill` {month?, user_id?} ⇒ {month, users_refilled, credits_granted}: the monthly sweep on
//! demand, for every user or one.

use serde::Serialize;
use serde_json::Value;
use tracing::info;

use super::fields::Fields;
use super::{to_result, Context, ControlError};
use crate::ledger::RefillPolicy;
use crate::refill::Month;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The month the command named; none: the current UTC month when it runs.
    pub month: Option<Month>,
    pub user_id: Option<String>,
}

#[derive(Debug, Serialize)]
struct Reply {
    month: String,
    users_refilled: i64,
    #[serde(serialize_with = "crate::ledger::total::serialize_total")]
    credits_granted: i128,
}

pub fn parse(f: &Fields<'_>) -> Result<Request, ControlError> {
    let named = f
        .opt_string("month")?
        .map(|m| m.parse::<Month>())
        .transpose()
        .map_err(|e| ControlError::bad_request(e.to_string()))?;
    let user_id = f.opt_string("user_id")?.map(str::to_owned);
    if let Some(u) = &user_id {
        crate::ledger::check_user_id(u)?;
    }
    Ok(Request {
        month: named,
        user_id,
    })
}

pub async fn run(ctx: &Context, req: &Request) -> Result<Value, ControlError> {
    let refill = &ctx.settings.refill;
    if !refill.enabled {
        return Err(ControlError::bad_request("refill is disabled"));
    }
    let policy = RefillPolicy {
        target: refill.target,
    };
    let pool = ctx.ledger.pool();
    let (user, chunk) = (req.user_id.as_deref(), refill.chunk_size);
    let now = ctx.clock.now();
    let report = crate::refill::sweep_asked(
        crate::refill::Sweeper::new(pool, &ctx.settings.database),
        policy,
        req.month,
        now,
        user,
        chunk,
        |_| {},
    )
    .await?;
    info!(month = %report.month, users_refilled = report.users_refilled, credits_granted = report.credits_granted, users_evaluated = report.users_evaluated, duration_ms = report.duration_ms, "refill sweep done (control)");
    to_result(&Reply {
        month: report.month,
        users_refilled: report.users_refilled,
        credits_granted: report.credits_granted,
    })
}
