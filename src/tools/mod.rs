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
    // Ids (and the keys a problem quotes) come from producers: a line break or a terminal
    // escape in one must not forge a line of the report.
    for m in &report.mismatches {
        let problem = dead_letters::printable(&m.problem);
        if m.user_id.is_empty() {
            out.push_str(&format!("\n  outbox: {problem}"));
        } else {
            let user = dead_letters::printable(&m.user_id);
            out.push_str(&format!("\n  {user}: {problem}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::audit::Mismatch;

    #[test]
    fn an_id_cannot_forge_a_line_of_the_audit() {
        let report = AuditReport {
            users: 1,
            transactions: 2,
            decisions: 2,
            unpublished_events: 0,
            mismatches: vec![Mismatch {
                user_id: "eve\n  outbox: all good\u{1b}[2K".into(),
                problem: "balance 1 but the ledger sums to 0".into(),
            }],
            truncated: false,
        };
        assert_eq!(
            audit_text(&report, "clean"),
            "1 users, 2 ledger rows, 2 decisions, 0 events unpublished: 1 MISMATCHES\n  \
             eve\\n  outbox: all good\\u{1b}[2K: balance 1 but the ledger sums to 0"
        );
    }
}
