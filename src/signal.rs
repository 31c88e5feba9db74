//! Waiting for the operator's stop signal, shared by `run` and the tools.

/// SIGTERM, SIGINT and SIGHUP (a closed terminal, or a supervisor's reload signal, which a
/// worker with nothing to reload takes as a stop), caught from the moment this is made: a
/// signal that arrives before anyone awaits [`StopSignals::recv`] is kept for it instead of
/// ending the process with the default action (which would exit without draining and without
/// an exit code).
pub(crate) struct StopSignals {
    #[cfg(unix)]
    streams: Option<[tokio::signal::unix::Signal; 3]>,
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
                signal(SignalKind::hangup()),
            ) {
                (Ok(term), Ok(int), Ok(hup)) => Some([term, int, hup]),
                _ => None,
            };
            StopSignals { streams }
        }
        #[cfg(not(unix))]
        {
            StopSignals {}
        }
    }

    /// The next SIGTERM, SIGINT or SIGHUP (Ctrl-C where the handlers could not be installed).
    pub(crate) async fn recv(&mut self) {
        #[cfg(unix)]
        if let Some([term, int, hup]) = &mut self.streams {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
                _ = hup.recv() => {}
            }
            return;
        }
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// SIGTERM, SIGINT or SIGHUP, from now on.
pub(crate) async fn wait_for_signal() {
    StopSignals::install().recv().await
}
