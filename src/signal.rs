//! Waiting for the operator's stop signal, shared by `run` and the tools.

/// SIGTERM and SIGINT, caught from the moment this is made: a signal that arrives before
/// anyone awaits [`StopSignals::recv`] is kept for it instead of ending the process with
/// the default action (which would exit without draining and without an exit code).
pub(crate) struct StopSignals {
    #[cfg(unix)]
    streams: Option<(tokio::signal::unix::Signal, tokio::signal::unix::Signal)>,
}

impl StopSignals {
    /// Installs the handlers now. Must be called within the runtime.
    pub(crate) fn install() -> StopSignals {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            let streams = match (
                signal(SignalKind::terminate()),
                signal(SignalKind::interrupt()),
            ) {
                (Ok(term), Ok(int)) => Some((term, int)),
                _ => None,
            };
            StopSignals { streams }
        }
        #[cfg(not(unix))]
        {
            StopSignals {}
        }
    }

    /// The next SIGTERM or SIGINT (Ctrl-C where the handlers could not be installed).
    pub(crate) async fn recv(&mut self) {
        #[cfg(unix)]
        if let Some((term, int)) = &mut self.streams {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            return;
        }
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// SIGTERM or SIGINT, from now on.
pub(crate) async fn wait_for_signal() {
    StopSignals::install().recv().await
}
