//! The log's writer: lines queue for a thread of their own that writes them to stderr, so a
//! log reader that stalls (a pipe nobody reads, a log shipper that stopped reading) holds up
//! no task, the stop included, and one that is gone (a closed pipe) costs the lines, not the
//! process. Up to [`QUEUE_LINES`] wait; later ones are dropped. Both losses are counted
//! ([`lines_lost`]), and [`flush`] waits a bounded time for what is queued.

use std::fs::File;
use std::io::Write;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};

/// Lines that may wait for a stalled stderr: about 2 MiB of lines of a few hundred bytes.
const QUEUE_LINES: usize = 8_192;

/// The longest the process's last steps wait for the lines queued before them.
const FLUSH_WAIT: Duration = Duration::from_secs(1);

enum Msg {
    Line(Vec<u8>),
    /// Answered once every line queued before it is written.
    Flush(Sender<()>),
}

/// The queue to the writing thread; None where no thread could be started (lines are then
/// written by their caller).
static QUEUE: OnceLock<Option<Sender<Msg>>> = OnceLock::new();
/// Lines dropped: the queue was full.
static DROPPED: AtomicU64 = AtomicU64::new(0);
/// Lines stderr refused.
static REFUSED: AtomicU64 = AtomicU64::new(0);

fn queue() -> Option<&'static Sender<Msg>> {
    QUEUE
        .get_or_init(|| {
            let (tx, rx) = crossbeam_channel::bounded(QUEUE_LINES);
            let spawned = std::thread::Builder::new()
                .name("log-writer".into())
                .spawn(move || write_lines(&rx));
            spawned.ok().map(|_| tx)
        })
        .as_ref()
}

/// The writing thread: on a copy of the stderr descriptor, so a write that blocks holds no
/// lock another writer to stderr would wait for.
fn write_lines(rx: &Receiver<Msg>) {
    let mut out: Box<dyn Write> = match std::io::stderr().as_fd().try_clone_to_owned() {
        Ok(fd) => Box::new(File::from(fd)),
        Err(_) => Box::new(std::io::stderr()),
    };
    for msg in rx {
        match msg {
            Msg::Line(line) => {
                if out.write_all(&line).is_err() {
                    REFUSED.fetch_add(1, Ordering::Relaxed);
                }
            }
            Msg::Flush(done) => {
                let _ = done.send(());
            }
        }
    }
}

/// A log line's writer for the subscriber (which writes each line whole, once): queued,
/// or dropped when the queue is full.
pub(crate) struct Line;

impl Write for Line {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match queue() {
            Some(q) => {
                if q.try_send(Msg::Line(buf.to_vec())).is_err() {
                    DROPPED.fetch_add(1, Ordering::Relaxed);
                }
                Ok(buf.len())
            }
            None => std::io::stderr().write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A line for a person watching (a command's progress), in order with the log's: dropped, as
/// a log line is, when the queue is full.
pub(crate) fn line(text: String) {
    let _ = Line.write(text.as_bytes());
}

/// The process's last line (its exit's reason), after every line queued before it: waits up
/// to [`FLUSH_WAIT`] for room rather than dropping it.
pub(crate) fn last_line(line: String) {
    match queue() {
        Some(q) => {
            if q.send_timeout(Msg::Line(line.into_bytes()), FLUSH_WAIT)
                .is_err()
            {
                DROPPED.fetch_add(1, Ordering::Relaxed);
            }
        }
        None => {
            let _ = std::io::stderr().write_all(line.as_bytes());
        }
    }
}

/// Waits, at most [`FLUSH_WAIT`] in all, until the lines queued so far are written: for the
/// process's last steps. A stderr that takes nothing holds it up no longer than that.
pub(crate) fn flush() {
    let Some(q) = QUEUE.get().and_then(Option::as_ref) else {
        return;
    };
    let deadline = Instant::now() + FLUSH_WAIT;
    let (done, written) = crossbeam_channel::bounded(1);
    if q.send_deadline(Msg::Flush(done), deadline).is_ok() {
        let _ = written.recv_deadline(deadline);
    }
}

/// Log lines lost so far: dropped while the queue was full, or refused by stderr.
pub(crate) fn lines_lost() -> u64 {
    DROPPED.load(Ordering::Relaxed) + REFUSED.load(Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    /// A line queued before a flush is written (or refused) by the time the flush returns.
    #[test]
    fn a_flush_returns_once_the_lines_before_it_are_written() {
        use std::io::Write;
        let lost = super::lines_lost();
        super::Line
            .write_all(b"logs: a test line\n")
            .expect("queued");
        let started = std::time::Instant::now();
        super::flush();
        assert!(started.elapsed() < super::FLUSH_WAIT, "the writer answered");
        assert_eq!(super::lines_lost(), lost);
    }
}
