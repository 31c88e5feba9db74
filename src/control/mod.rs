//! The control queue `credit.control` (SPEC §8).

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::config::Settings;
use crate::ledger::Ledger;

/// Answers control commands until `stop` fires.
pub async fn serve(_settings: Arc<Settings>, _ledger: Ledger, stop: CancellationToken) {
    stop.cancelled().await;
}
