//! Operator tools beside the service core: the benchmark, the demo, their scratch
//! namespace/database, publishing entries, and the dead-letter queue. They are built only on the library's public
//! API, so the service never depends on them.

/// `println!` that returns the write's error instead of panicking, so a report piped into a
/// reader that closes early (`| head`) ends the tool with an error, not a panic.
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout().lock(), $($arg)*)?
    }};
}

pub(crate) mod bench;
pub mod dead_letters;
pub(crate) mod demo;
pub mod publish;
pub(crate) mod rebind;
pub mod republish;
pub(crate) mod restored;
pub mod scratch;

use std::process::ExitCode;
use std::time::Duration;

use crate::ledger::audit::AuditReport;

/// Closes `conn` and waits (up to 2 s) for lapin's I/O thread to end. A tool exits right after
/// its last close; an I/O thread still finishing then would log "error doing IO" against the
/// runtime being shut down, after the tool's report.
pub(crate) async fn close_connection(
    conn: lapin::Connection,
    reason: &str,
) -> Result<(), lapin::Error> {
    let closed = conn.close(200, reason.into()).await;
    let (done, ended) = tokio::sync::oneshot::channel();
    // `run` joins the I/O thread; a plain thread, so a stuck one cannot hold up the runtime.
    std::thread::spawn(move || {
        let _ = conn.run();
        let _ = done.send(());
    });
    let _ = tokio::time::timeout(Duration::from_secs(2), ended).await;
    closed
}

/// A lookup that found nothing (`outcome` before a decision, a namespace without dead
/// letters): `not_found` in a command's JSON.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct NotFound(pub(crate) String);

/// Success when `ok`, failure otherwise.
pub(crate) fn exit_code(ok: bool) -> ExitCode {
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// An audit for a person: the counts, `clean` or the number of mismatches, then one line per
/// mismatch.
pub fn audit_text(report: &AuditReport, clean: &str) -> String {
    let mut out = format!(
        "{} users, {} ledger rows, {} decisions, {} events unpublished: {}",
        report.users,
        report.transactions,
        report.decisions,
        report.unpublished_events,
        if report.is_clean() {
            clean.to_owned()
        } else {
            format!("{} MISMATCHES", report.mismatches.len())
        }
    );
    if report.truncated {
        out.push_str(" (a check found more than the 1,000 it lists)");
    }
    for m in &report.mismatches {
        if m.user_id.is_empty() {
            out.push_str(&format!("\n  outbox: {}", m.problem));
        } else {
            out.push_str(&format!("\n  {}: {}", m.user_id, m.problem));
        }
    }
    out
}
