//! How a transaction's events are laid out in the outbox (migration 0009): consecutive events
//! with the same routing key share a row, up to [`EVENTS_PER_ROW`] of them. A row per event
//! cost every event a heap tuple, two index entries and its WAL; a row per run costs that once.
//! The relay publishes a run one message per element, in order, so what goes out is the same.

use std::borrow::Cow;

use crate::events::NewEvent;

/// Most events in one outbox row: a run of this many is a few hundred KiB of JSON for the
/// relay to read (about 2 MiB with the longest user ids and keys the ledger allows).
pub(crate) const EVENTS_PER_ROW: usize = 1000;

/// One outbox row: a single event (its object), or a run (a JSON array of the events).
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Run<'a> {
    /// The first event's id.
    pub event_id: &'a str,
    pub routing_key: &'static str,
    pub events: i32,
    pub payload: Cow<'a, str>,
}

/// The rows of `events`, in order.
pub(crate) fn runs(events: &[NewEvent]) -> Vec<Run<'_>> {
    let mut out = Vec::new();
    let mut rest = events;
    while let Some(first) = rest.first() {
        let same = rest
            .iter()
            .take(EVENTS_PER_ROW)
            .take_while(|e| e.routing_key == first.routing_key)
            .count();
        let (run, after) = rest.split_at(same);
        out.push(Run {
            event_id: &first.event_id,
            routing_key: first.routing_key,
            events: same as i32,
            payload: payload(run),
        });
        rest = after;
    }
    out
}

fn payload(run: &[NewEvent]) -> Cow<'_, str> {
    if let [one] = run {
        return Cow::Borrowed(&one.payload);
    }
    let len = run.iter().map(|e| e.payload.len() + 1).sum::<usize>() + 1;
    let mut text = String::with_capacity(len);
    text.push('[');
    for (i, e) in run.iter().enumerate() {
        if i > 0 {
            text.push(',');
        }
        text.push_str(&e.payload);
    }
    text.push(']');
    Cow::Owned(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(id: usize, routing_key: &'static str) -> NewEvent {
        NewEvent {
            event_id: format!("e{id}"),
            routing_key,
            payload: format!(r#"{{"event_id":"e{id}"}}"#),
        }
    }

    #[test]
    fn consecutive_events_of_one_routing_key_share_a_row() {
        let events = [
            event(0, "balance.changed"),
            event(1, "balance.changed"),
            event(2, "balance.low"),
            event(3, "balance.changed"),
        ];
        let rows = runs(&events);
        let shape: Vec<_> = rows
            .iter()
            .map(|r| (r.event_id, r.routing_key, r.events, r.payload.as_ref()))
            .collect();
        assert_eq!(
            shape,
            vec![
                (
                    "e0",
                    "balance.changed",
                    2,
                    r#"[{"event_id":"e0"},{"event_id":"e1"}]"#
                ),
                ("e2", "balance.low", 1, r#"{"event_id":"e2"}"#),
                ("e3", "balance.changed", 1, r#"{"event_id":"e3"}"#),
            ]
        );
        assert!(matches!(rows[1].payload, Cow::Borrowed(_)));
        assert!(runs(&[]).is_empty());
    }

    #[test]
    fn a_run_holds_at_most_events_per_row() {
        let events: Vec<_> = (0..2 * EVENTS_PER_ROW + 1)
            .map(|i| event(i, "balance.changed"))
            .collect();
        let rows = runs(&events);
        let sizes: Vec<_> = rows.iter().map(|r| (r.event_id, r.events)).collect();
        assert_eq!(sizes, vec![("e0", 1000), ("e1000", 1000), ("e2000", 1)]);
        let parsed: Vec<serde_json::Value> = serde_json::from_str(&rows[1].payload).unwrap();
        assert_eq!(parsed.len(), EVENTS_PER_ROW);
        assert_eq!(parsed[999]["event_id"], "e1999");
    }
}
