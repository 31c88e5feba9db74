//! The reconnecting session: run a broker session until it ends cleanly or `stop` fires;
//! after a fault, reconnect with capped exponential backoff (reset once a session has lived a
//! while). The consumer, the outbox relay and the control queue all run this way.

use std::fmt::Display;
use std::future::Future;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tracing::warn;

/// A session that lived this long was healthy: the next fault starts the backoff afresh.
const HEALTHY: Duration = Duration::from_secs(30);

/// Runs `session` until it returns `Ok` or `stop` fires; `what` names it in logs and metrics.
/// Returns whether it ended cleanly (false when stopped while waiting to reconnect).
pub(crate) async fn reconnecting<F, Fut, E>(
    what: &'static str,
    stop: &CancellationToken,
    mut session: F,
) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), E>>,
    E: Display,
{
    let mut delays = crate::retry::backoff();
    loop {
        if stop.is_cancelled() {
            return false;
        }
        let started = Instant::now();
        match session().await {
            Ok(()) => return true,
            Err(e) => {
                metrics::counter!("credit_broker_reconnects_total", "session" => what).increment(1);
                warn!(error = %e, session = what, "broker session ended; reconnecting");
                if started.elapsed() > HEALTHY {
                    delays = crate::retry::backoff();
                }
                if !crate::retry::pause(&mut delays, stop).await {
                    return false;
                }
            }
        }
    }
}
