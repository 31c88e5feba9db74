//! The HTTP endpoints' connections, each bounded: how many are open, how long a client may take
//! to send a request's head, and how long a connection lives. axum's own `serve` waits on a
//! client for ever, so clients that connect and say nothing (or never read their response)
//! could hold the worker's files and keep every probe out while billing went on.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::throttle::Throttle;

/// Connections open at once. A new one beyond this closes the oldest, so a probe is served
/// however many connections other clients hold, and the worker's open files stay within the
/// margin its start checks (`database.max_connections` + 64).
pub(crate) const MAX_CONNECTIONS: usize = 32;

/// How long a client has to send a request's head, also while a kept-alive connection waits
/// for its next request: a scraper reconnects, a silent client is closed.
pub(crate) const HEAD_WITHIN: Duration = Duration::from_secs(5);

/// A connection's longest life: then it is asked to close after the request in progress.
const LIFETIME: Duration = Duration::from_secs(60);

/// How long a connection asked to close (its lifetime over, or the worker stopping) may take
/// to finish its request, so that a client that never reads its response cannot hold it.
const GRACE: Duration = Duration::from_secs(2);

/// The connections open, oldest first.
#[derive(Default)]
struct Open {
    next: u64,
    cuts: BTreeMap<u64, CancellationToken>,
}

/// A connection let in: its id, the token that cuts it, and the oldest connection's token when
/// this one takes its place.
struct Admitted {
    id: u64,
    cut: CancellationToken,
    displaced: Option<CancellationToken>,
}

impl Open {
    fn admit(&mut self, cap: usize) -> Admitted {
        let displaced = match self.cuts.len() >= cap {
            true => self.cuts.pop_first().map(|(_, cut)| cut),
            false => None,
        };
        let (id, cut) = (self.next, CancellationToken::new());
        self.next += 1;
        self.cuts.insert(id, cut.clone());
        Admitted { id, cut, displaced }
    }

    fn close(&mut self, id: u64) {
        self.cuts.remove(&id);
    }
}

/// A warning that the cap displaced connections, at most every minute.
static AT_CAP: Throttle = Throttle::new(Duration::from_secs(60));
/// A warning that accepting failed (out of files, say), at most every minute.
static ACCEPT_FAILED: Throttle = Throttle::new(Duration::from_secs(60));

/// Serves `app` on `listener` until `stop` fires, then waits for the connections open to finish
/// their requests (at most [`GRACE`]).
pub(crate) async fn serve(listener: TcpListener, app: axum::Router, stop: CancellationToken) {
    let open = Arc::new(Mutex::new(Open::default()));
    let tasks = TaskTracker::new();
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    if ACCEPT_FAILED.ready() {
                        tracing::warn!(error = %e, "http: cannot accept a connection");
                    }
                    // EMFILE and the like last a while; do not spin on them.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = stop.cancelled() => break,
        };
        let admitted = lock(&open).admit(MAX_CONNECTIONS);
        if let Some(oldest) = admitted.displaced {
            oldest.cancel();
            if AT_CAP.ready() {
                tracing::warn!(
                    cap = MAX_CONNECTIONS,
                    "http: connections at the cap; the oldest closed for a new one"
                );
            }
        }
        let (app, open, stop) = (app.clone(), open.clone(), stop.clone());
        tasks.spawn(async move {
            serve_one(stream, app, &admitted.cut, &stop).await;
            lock(&open).close(admitted.id);
        });
    }
    tasks.close();
    tasks.wait().await;
}

fn lock(open: &Mutex<Open>) -> std::sync::MutexGuard<'_, Open> {
    open.lock().unwrap_or_else(PoisonError::into_inner)
}

/// One connection, HTTP/1.1, until the client closes it, it is cut for a newer one, or it is
/// asked to close (its lifetime over, or `stop`) and has finished or had its [`GRACE`].
async fn serve_one(
    stream: TcpStream,
    app: axum::Router,
    cut: &CancellationToken,
    stop: &CancellationToken,
) {
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(HEAD_WITHIN);
    let conn = http.serve_connection(TokioIo::new(stream), TowerToHyperService::new(app));
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => return,
        _ = cut.cancelled() => return,
        _ = stop.cancelled() => {}
        _ = tokio::time::sleep(LIFETIME) => {}
    }
    conn.as_mut().graceful_shutdown();
    tokio::select! {
        _ = tokio::time::timeout(GRACE, conn) => {}
        _ = cut.cancelled() => {}
    }
}

#[cfg(test)]
mod tests {
    use super::Open;

    /// Under the cap nothing is displaced; at it, each new connection displaces the oldest
    /// still open, and a closed one frees its place.
    #[test]
    fn the_oldest_connection_makes_room_at_the_cap() {
        let mut open = Open::default();
        let a = open.admit(2);
        let b = open.admit(2);
        assert!(a.displaced.is_none() && b.displaced.is_none());
        let c = open.admit(2);
        c.displaced.expect("at the cap").cancel();
        assert!(a.cut.is_cancelled(), "the oldest, a, made room");
        assert!(!b.cut.is_cancelled());
        open.close(b.id);
        let d = open.admit(2);
        assert!(d.displaced.is_none(), "b's place was free");
        let e = open.admit(2);
        e.displaced.expect("at the cap again").cancel();
        assert!(c.cut.is_cancelled(), "c, now the oldest, made room");
        assert!(!d.cut.is_cancelled() && !e.cut.is_cancelled());
        assert_eq!((a.id, b.id, c.id, d.id, e.id), (0, 1, 2, 3, 4));
    }
}
