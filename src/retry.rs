//! Capped exponential backoff with jitter for reconnects and retried transactions, from
//! `backon` (maintained; `backoff` is unmaintained, RUSTSEC-2025-0012).

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use tokio_util::sync::CancellationToken;

/// 50 ms doubling up to 5 s, with jitter, forever.
pub(crate) fn backoff() -> impl Iterator<Item = Duration> {
    backoff_up_to(Duration::from_secs(5))
}

/// 50 ms doubling up to `max`, with jitter, forever.
pub(crate) fn backoff_up_to(max: Duration) -> impl Iterator<Item = Duration> {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(50))
        .with_max_delay(max)
        .with_jitter()
        .without_max_times()
        .build()
}

/// Sleeps for the next delay of `delays`; false when `cancel` fired first.
pub(crate) async fn pause(
    delays: &mut impl Iterator<Item = Duration>,
    cancel: &CancellationToken,
) -> bool {
    let d = delays.next().unwrap_or(Duration::from_secs(5));
    tokio::select! {
        _ = tokio::time::sleep(d) => true,
        _ = cancel.cancelled() => false,
    }
}
