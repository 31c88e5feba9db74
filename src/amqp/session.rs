//! The reconnecting session: run a broker session until it ends cleanly or `stop` fires;
//! after a fault, reconnect with capped exponential backoff (reset once a session has lived a
//! while). The consumer, the outbox relay and the control queue all run this way.

use std::fmt::Display;
use std::future::Future;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

/// A session that lived this long was healthy: the next fault starts the backoff afresh.
const HEALTHY: Duration = Duration::from_secs(30);

/// Why a session ended, as far as reconnecting is concerned.
pub(crate) trait SessionFault: Display {
    /// Whether reconnecting cannot help: the broker refuses what the configuration asks for.
    fn is_permanent(&self) -> bool {
        false
    }

    /// What a permanent fault is, in the log line that ends the session.
    fn why_permanent(&self) -> &'static str {
        crate::amqp::topology::REFUSED_ARGUMENTS
    }

    /// Whether the session ended to begin another at once, as planned: not a fault.
    fn resumes_at_once(&self) -> bool {
        false
    }
}

/// Runs `session` until it returns `Ok` or `stop` fires; `what` names it in logs and metrics.
/// Returns whether it ended cleanly (false when stopped while waiting to reconnect). A
/// permanent fault is logged and ends it too: the caller's task then ends, which stops the
/// process with the reason in the log rather than retrying forever.
pub(crate) async fn reconnecting<F, Fut, E>(
    what: &'static str,
    stop: &CancellationToken,
    mut session: F,
) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), E>>,
    E: SessionFault,
{
    let mut delays = crate::retry::backoff();
    loop {
        if stop.is_cancelled() {
            return false;
        }
        let started = Instant::now();
        match session().await {
            Ok(()) => return true,
            Err(e) if e.is_permanent() => {
                let why = e.why_permanent();
                error!(error = %e, session = what, "{why}; not reconnecting");
                return false;
            }
            // Its work done: at a stop, it ended cleanly.
            Err(e) if e.resumes_at_once() => {
                if stop.is_cancelled() {
                    return true;
                }
                info!(session = what, "{e}; reconnecting");
            }
            // Cut short by the stop (work given up at its bound): not a fault to reconnect
            // from. What it had not finished is taken up again: a delivery it held comes
            // again, an event it had not published stays behind the watermark.
            Err(e) if stop.is_cancelled() => {
                warn!(error = %e, session = what, "session ended at the stop with its work unfinished; it is taken up again at the next start");
                return false;
            }
            Err(e) => {
                metrics::counter!("credit_broker_reconnects_total", "session" => what).increment(1);
                // The relay's sessions end on its database's lasting faults too (a passing
                // one begins another database session only); the error says which.
                warn!(error = %e, session = what, "session ended by a fault; reconnecting");
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
