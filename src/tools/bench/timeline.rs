//! `bench --timeline`: a run's latency second by second, so that a stall (a slow commit, the
//! kernel writing back dirty pages, a checkpoint) shows at the time it happened and can be
//! matched against the database's and the system's logs.

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use chrono::{DateTime, SecondsFormat, Utc};

use super::traffic::Latency;

/// The messages sent (or due, open loop) within one second of a run, and their latency.
#[derive(Debug, Clone)]
pub(crate) struct Second {
    /// Seconds from the run's first message.
    pub offset_s: usize,
    /// The wall-clock time the second began.
    pub at: DateTime<Utc>,
    pub latency: Latency,
}

/// Groups each message by the second it was sent in, from the earliest send time.
/// Messages without an event are left out (the run reports them as problems); seconds
/// without any message are skipped. `now` pairs a monotonic instant with the wall clock at
/// the same moment, to date the seconds.
pub(crate) fn by_second(
    sent: impl Fn(usize) -> Instant,
    received: &[Option<Instant>],
    now: (Instant, DateTime<Utc>),
) -> Vec<Second> {
    // The earliest send, not message 0's: with pairs an execution counts at its later
    // message, which for execution 0 is not the run's first.
    let Some(first) = (0..received.len()).map(&sent).min() else {
        return Vec::new();
    };
    let mut buckets: Vec<Vec<f64>> = Vec::new();
    for (i, r) in received.iter().enumerate() {
        let Some(r) = r else { continue };
        let s = sent(i);
        let second = s.saturating_duration_since(first).as_secs() as usize;
        if buckets.len() <= second {
            buckets.resize_with(second + 1, Vec::new);
        }
        buckets[second].push(r.saturating_duration_since(s).as_secs_f64() * 1e3);
    }
    let start = wall(first, now);
    buckets
        .iter_mut()
        .enumerate()
        .filter_map(|(offset_s, ms)| {
            Latency::of_ms(ms).map(|latency| Second {
                offset_s,
                at: start + chrono::Duration::seconds(offset_s as i64),
                latency,
            })
        })
        .collect()
}

/// The wall-clock time of `t`, given an instant and wall-clock time taken together.
fn wall(t: Instant, (now, now_wall): (Instant, DateTime<Utc>)) -> DateTime<Utc> {
    let ago = now.saturating_duration_since(t);
    let ahead = t.saturating_duration_since(now);
    let d = |d: Duration| chrono::Duration::from_std(d).unwrap_or(chrono::Duration::zero());
    now_wall - d(ago) + d(ahead)
}

/// Writes the seconds as CSV: `second,utc,messages,p50_ms,p99_ms,max_ms`.
pub(crate) fn write_csv(path: &Path, seconds: &[Second]) -> std::io::Result<()> {
    let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
    writeln!(out, "second,utc,messages,p50_ms,p99_ms,max_ms")?;
    for s in seconds {
        writeln!(
            out,
            "{},{},{},{:.2},{:.2},{:.2}",
            s.offset_s,
            s.at.to_rfc3339_opts(SecondsFormat::Millis, true),
            s.latency.samples,
            s.latency.p50_ms,
            s.latency.p99_ms,
            s.latency.max_ms
        )?;
    }
    out.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_fall_into_the_second_they_were_sent_in() {
        let t0 = Instant::now();
        // Message i sent at 0.4 s × i; its event 10 ms later, except message 3 (250 ms) and
        // message 5 (no event).
        let sent = |i: usize| t0 + Duration::from_millis(400 * i as u64);
        let received: Vec<Option<Instant>> = (0..8)
            .map(|i| match i {
                3 => Some(sent(i) + Duration::from_millis(250)),
                5 => None,
                _ => Some(sent(i) + Duration::from_millis(10)),
            })
            .collect();
        let wall0 = DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let seconds = by_second(sent, &received, (t0, wall0));
        // Sent at 0, 0.4, 0.8 | 1.2, 1.6 | 2.0 (no event), 2.4 | 2.8.
        let rows: Vec<(usize, usize, f64)> = seconds
            .iter()
            .map(|s| (s.offset_s, s.latency.samples, s.latency.max_ms.round()))
            .collect();
        assert_eq!(rows, vec![(0, 3, 10.0), (1, 2, 250.0), (2, 2, 10.0)]);
        assert_eq!(seconds[1].at, wall0 + chrono::Duration::seconds(1));
    }

    #[test]
    fn a_gap_in_sending_skips_its_seconds() {
        let t0 = Instant::now();
        let sent = |i: usize| t0 + Duration::from_secs(3 * i as u64);
        let received = vec![Some(sent(0)), Some(sent(1) + Duration::from_millis(5))];
        let seconds = by_second(sent, &received, (t0, Utc::now()));
        let offsets: Vec<usize> = seconds.iter().map(|s| s.offset_s).collect();
        assert_eq!(offsets, vec![0, 3]);
        assert!(by_second(sent, &[], (t0, Utc::now())).is_empty());
    }

    #[test]
    fn the_wall_clock_follows_the_instant_either_side_of_now() {
        let now = Instant::now();
        let w = Utc::now();
        let before = now.checked_sub(Duration::from_secs(2)).unwrap_or(now);
        if before != now {
            assert_eq!(wall(before, (now, w)), w - chrono::Duration::seconds(2));
        }
        assert_eq!(
            wall(now + Duration::from_secs(3), (now, w)),
            w + chrono::Duration::seconds(3)
        );
    }

    #[test]
    fn the_csv_has_a_header_and_one_row_per_second() {
        let t0 = Instant::now();
        let wall0 = DateTime::parse_from_rfc3339("2026-12-05T11:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let sent = |i: usize| t0 + Duration::from_millis(600 * i as u64);
        let received: Vec<Option<Instant>> = (0..3)
            .map(|i| Some(sent(i) + Duration::from_millis(20)))
            .collect();
        let dir = std::env::temp_dir().join(format!("timeline-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.csv");
        write_csv(&path, &by_second(sent, &received, (t0, wall0))).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(
            text,
            "second,utc,messages,p50_ms,p99_ms,max_ms\n\
             0,2026-12-05T11:00:00.000Z,2,20.00,20.00,20.00\n\
             1,2026-12-05T11:00:01.000Z,1,20.00,20.00,20.00\n"
        );
    }
}
