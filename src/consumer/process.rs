//! One batch of message bodies → one action per message, with no broker types: decode, decide
//! (retrying transient faults, splitting a batch that fails for another reason), and record.
//! The AMQP layer in [`super`] applies the actions: dead-letter with the reason, then ack.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use futures::FutureExt as _;

use crate::clock::Clock;
use serde::Deserialize;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, warn, Span};

use crate::decide::{self, DecideError, Outcome, Pricing, Turn, Verdict};
use crate::ledger::LedgerError;
use crate::message::{self, NodeExecutionEntry};

/// What to do with one delivery once its batch is decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Action {
    /// Decided (or a duplicate): ack.
    Ack,
    /// Cannot be decided: republish to the dead letters with `reason`, then ack.
    DeadLetter { reason: String },
}

/// The ids a message's log lines carry, as far as the body tells them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub(crate) struct MessageIds {
    #[serde(default, deserialize_with = "lenient")]
    pub node_exec_id: Option<String>,
    #[serde(default, deserialize_with = "lenient")]
    pub user_id: Option<String>,
}

/// A string, or nothing for any other JSON value: ids of an invalid body are best-effort.
fn lenient<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    Ok(match serde_json::Value::deserialize(d)? {
        serde_json::Value::String(s) => Some(s),
        _ => None,
    })
}

impl MessageIds {
    /// Reads the ids of a body that may not decode: only an object's fields (serde would
    /// also read an array's elements in order as the fields).
    pub(crate) fn peek(body: &[u8]) -> MessageIds {
        if body.trim_ascii_start().first() != Some(&b'{') {
            return MessageIds::default();
        }
        serde_json::from_slice(body).unwrap_or_default()
    }

    fn of(e: &NodeExecutionEntry) -> MessageIds {
        MessageIds {
            node_exec_id: Some(e.node_exec_id.clone()),
            user_id: Some(e.user_id.clone()),
        }
    }

    /// The span every log line about this message is written in. Ids are cut to their
    /// longest valid length: an invalid body's may be as long as the body.
    pub(crate) fn span(&self) -> Span {
        tracing::info_span!(
            "message",
            node_exec_id = shown(&self.node_exec_id),
            user_id = shown(&self.user_id),
        )
    }
}

/// An id as logged: `?` when absent, else at most [`message::MAX_ID_BYTES`] of it.
fn shown(id: &Option<String>) -> &str {
    id.as_deref()
        .map_or("?", |s| head(s, message::MAX_ID_BYTES))
}

/// The first `max` bytes of `s`, cut back to a character boundary.
fn head(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Why a message from `producer` ([`crate::amqp::producer::producer`]: its broker-verified
/// AMQP `user_id`, or the producer the worker's own user vouches for) is not billed: when
/// `allowed` is not empty, only the producers it names are.
pub(crate) fn producer_refusal(allowed: &[String], producer: Option<&str>) -> Option<String> {
    if allowed.is_empty() {
        return None;
    }
    match producer {
        Some(p) if allowed.iter().any(|a| a == p) => None,
        Some(p) => Some(format!(
            "user_id: producer {p:?} is not in amqp.allowed_producers"
        )),
        None => Some(
            "user_id: the message has no user_id property; amqp.allowed_producers cannot be \
             checked"
                .into(),
        ),
    }
}

/// Decides entries in one transaction (the database in production, memory in tests), in
/// its `turn` among the batches in flight.
pub(crate) trait Decider: Send + Sync {
    /// Trims a decoded entry to what deciding reads, before it waits for its batch.
    fn trim(&self, _entry: &mut NodeExecutionEntry) {}

    fn decide(
        &self,
        entries: &[NodeExecutionEntry],
        turn: Turn,
    ) -> impl Future<Output = Result<Vec<Verdict>, DecideError>> + Send;
}

/// The decider of the running service.
#[derive(Clone)]
pub struct DbDecider {
    pub pool: PgPool,
    pub pricing: Arc<Pricing>,
    /// What "now" is for a decision (its fee day, the lazy refill's month, the rows' stamps).
    pub clock: Arc<dyn Clock>,
    /// How long a batch may wait for the database before it is retried on another
    /// connection (`db::stall_bound`).
    pub stall: Option<std::time::Duration>,
}

impl Decider for DbDecider {
    fn trim(&self, entry: &mut NodeExecutionEntry) {
        entry.keep_inputs(|block, key| self.pricing.costs.reads_input(block, key));
    }

    async fn decide(
        &self,
        entries: &[NodeExecutionEntry],
        turn: Turn,
    ) -> Result<Vec<Verdict>, DecideError> {
        let decided =
            decide::decide_in_turn(&self.pool, &self.pricing, entries, &*self.clock, turn);
        let decided = crate::db::bounded(self.stall, decided).await;
        match &decided {
            Err(DecideError::Db(e)) | Err(DecideError::Ledger(LedgerError::Db(e))) => {
                crate::db::explain_pool_timeout(&self.pool, e)
            }
            _ => {}
        }
        decided
    }
}

/// A batch's bodies after one try at deciding them.
pub(crate) struct Attempt {
    /// Per body, its action when it did not decode.
    undecodable: Vec<Option<(Action, MessageIds)>>,
    /// Where each decoded entry came from.
    positions: Vec<usize>,
    entries: Vec<NodeExecutionEntry>,
    first: Result<Vec<Verdict>, DecideError>,
}

impl Attempt {
    /// Whether the try failed: the batch is decided again by [`finish`], alone.
    pub(crate) fn failed(&self) -> bool {
        self.first.is_err()
    }
}

/// Decodes the bodies and tries once to decide them in `turn`.
pub(crate) async fn attempt(decider: &impl Decider, bodies: &[&[u8]], turn: Turn) -> Attempt {
    let mut undecodable = vec![None; bodies.len()];
    let mut positions = Vec::with_capacity(bodies.len());
    let mut entries = Vec::with_capacity(bodies.len());
    for (i, body) in bodies.iter().enumerate() {
        match message::decode(body) {
            Ok(mut e) => {
                decider.trim(&mut e);
                positions.push(i);
                entries.push(e);
            }
            Err(e) => {
                let reason = e.to_string();
                undecodable[i] = Some((Action::DeadLetter { reason }, MessageIds::peek(body)));
            }
        }
    }
    // Even with nothing to decide, the decider ends the turn (as committed, holding no
    // accounts), so the batches after this one need not roll back for its sake.
    let first = decide_guarded(decider, &entries, turn).await;
    Attempt {
        undecodable,
        positions,
        entries,
        first,
    }
}

/// One action per body of an attempted batch, in order, with the ids its log lines carry.
/// A failed attempt is decided again alone (retrying transient faults, splitting a batch that
/// fails for another reason): the caller lets every later batch in flight end first. `None`
/// when `stop` fired while a transient fault was being retried: nothing was decided, and
/// nothing may be acked.
pub(crate) async fn finish(
    decider: &impl Decider,
    attempt: Attempt,
    stop: &CancellationToken,
) -> Option<Vec<(Action, MessageIds)>> {
    let Attempt {
        mut undecodable,
        positions,
        entries,
        first,
    } = attempt;
    let verdicts = decide_with_retry(decider, &entries, first, stop).await?;
    for ((i, e), v) in positions.into_iter().zip(&entries).zip(verdicts) {
        let ids = MessageIds::of(e);
        let action = ids.span().in_scope(|| record(e, &v));
        undecodable[i] = Some((action, ids));
    }
    Some(
        undecodable
            .into_iter()
            .map(|a| a.unwrap_or((Action::Ack, MessageIds::default())))
            .collect(),
    )
}

/// Processes one batch with nothing else in flight: [`attempt`], then [`finish`].
#[cfg(test)]
pub(crate) async fn process_batch(
    decider: &impl Decider,
    bodies: &[&[u8]],
    stop: &CancellationToken,
) -> Option<Vec<(Action, MessageIds)>> {
    let tried = attempt(decider, bodies, Turn::alone()).await;
    finish(decider, tried, stop).await
}

/// The verdicts of `entries` given the outcome of a `first` try: failed, it is retried on
/// transient faults; a batch that fails for another reason is split so one bad entry cannot
/// block the rest.
async fn decide_with_retry(
    decider: &impl Decider,
    entries: &[NodeExecutionEntry],
    first: Result<Vec<Verdict>, DecideError>,
    stop: &CancellationToken,
) -> Option<Vec<Verdict>> {
    let e = match decide_transient_retry(decider, entries, Some(first), stop).await? {
        Ok(v) if v.len() == entries.len() => return Some(v),
        // Never acked without a verdict: each entry is decided alone instead.
        Ok(v) => format!("{} verdicts for {} entries", v.len(), entries.len()),
        Err(e) => e.to_string(),
    };
    warn!(error = %e, size = entries.len(), "batch failed; deciding its entries one by one");
    let mut out = Vec::with_capacity(entries.len());
    for entry in entries {
        let one = std::slice::from_ref(entry);
        let verdict = match decide_transient_retry(decider, one, None, stop).await? {
            Ok(mut v) if v.len() == 1 => v.remove(0),
            Ok(v) => Verdict::Invalid {
                reason: format!("internal: {} verdicts for one entry", v.len()),
            },
            Err(e) => {
                if matches!(e, DecideError::Defect(_)) {
                    metrics::counter!("credit_defects_total", "stage" => "decide").increment(1);
                }
                MessageIds::of(entry).span().in_scope(|| {
                    error!(error = %e, "entry cannot be decided; dead-lettering");
                });
                Verdict::Invalid {
                    reason: format!("internal: {e}"),
                }
            }
        };
        out.push(verdict);
    }
    Some(out)
}

/// Ok/Err(permanent error); None when stopped during a transient outage. `first` is the
/// outcome of a try already made, if any.
async fn decide_transient_retry(
    decider: &impl Decider,
    entries: &[NodeExecutionEntry],
    first: Option<Result<Vec<Verdict>, DecideError>>,
    stop: &CancellationToken,
) -> Option<Result<Vec<Verdict>, DecideError>> {
    let mut delays = crate::retry::backoff();
    let mut first_try = first.is_some();
    let mut result = match first {
        Some(r) => r,
        None => decide_guarded(decider, entries, Turn::alone()).await,
    };
    loop {
        match result {
            // Rolled back for an earlier batch's sake: nothing is wrong with this one.
            Err(DecideError::Reordered) => {
                metrics::counter!("credit_decide_reordered_total").increment(1);
                debug!(
                    size = entries.len(),
                    "batch decided again after an earlier one"
                );
            }
            // A first try (in a pipeline) that found an earlier decision: alone, the batch looks
            // for them (a redelivery, not a fault).
            Err(DecideError::Race) if first_try => {
                debug!(size = entries.len(), "batch holds decided node executions");
            }
            Err(e) if e.is_transient() => {
                metrics::counter!("credit_decide_retries_total").increment(1);
                // Which messages wait: the batch's first, and how many.
                let first = entries.first().map(|e| e.node_exec_id.as_str());
                warn!(error = %e, size = entries.len(), node_exec_id = first, "decision transaction failed; retrying");
                if !crate::retry::pause(&mut delays, stop).await {
                    return None;
                }
            }
            other => return Some(other),
        }
        first_try = false;
        result = decide_guarded(decider, entries, Turn::alone()).await;
    }
}

/// `decider.decide`, with a panic turned into [`DecideError::Defect`]. A defect that one
/// entry meets is then dead-lettered with that entry alone (a batch that fails for good is
/// split), instead of ending the worker: every message it held would come back with the one
/// that crashes it, until the delivery limit dead-letters them all. Unwinding drops the
/// transaction (rolled back) and the turn (the batches after it decide again), so nothing
/// the attempt did stays; one that panicked after its commit finds its entries decided.
async fn decide_guarded(
    decider: &impl Decider,
    entries: &[NodeExecutionEntry],
    turn: Turn,
) -> Result<Vec<Verdict>, DecideError> {
    match AssertUnwindSafe(decider.decide(entries, turn))
        .catch_unwind()
        .await
    {
        Ok(decided) => {
            // Counted here, as they commit: a batch whose session ends before its ack (a
            // broker gone) comes back and is counted again only as duplicates.
            if let Ok(verdicts) = &decided {
                if verdicts.len() == entries.len() {
                    verdicts.iter().for_each(count);
                }
            }
            decided
        }
        Err(panic) => {
            // Counted where it costs its entry (`decide_with_retry`), not per attempt: a batch's
            // panic is met again by the entry decided alone.
            Err(DecideError::Defect(
                crate::telemetry::panic_text(panic.as_ref()).to_owned(),
            ))
        }
    }
}

/// Counts a committed verdict. An invalid one is counted once its dead letter is confirmed.
fn count(v: &Verdict) {
    match v {
        Verdict::Decided {
            outcome,
            cost,
            fee,
            uncollected,
            ..
        } => {
            metrics::counter!("credit_messages_total", "outcome" => outcome.as_str()).increment(1);
            let charged = if *outcome == Outcome::Charged {
                *cost
            } else {
                0
            } + fee;
            if charged > 0 {
                metrics::counter!("credit_credits_charged_total").increment(charged as u64);
            }
            count_uncollected(*uncollected);
        }
        Verdict::Duplicate { conflicting } => {
            metrics::counter!("credit_messages_total", "outcome" => "duplicate").increment(1);
            if *conflicting {
                metrics::counter!("credit_conflicting_duplicates_total").increment(1);
            }
        }
        Verdict::Settled {
            delta, uncollected, ..
        } => {
            metrics::counter!("credit_messages_total", "outcome" => "settled").increment(1);
            let moved = delta - uncollected;
            if moved > 0 {
                metrics::counter!("credit_credits_charged_total").increment(moved as u64);
            } else if moved < 0 {
                metrics::counter!("credit_credits_refunded_total").increment(moved.unsigned_abs());
            }
            count_uncollected(*uncollected);
        }
        Verdict::Invalid { .. } => {}
    }
}

/// Logs a verdict (inside the message's span); returns what to do with it.
fn record(e: &NodeExecutionEntry, v: &Verdict) -> Action {
    match v {
        Verdict::Decided {
            outcome,
            cost,
            fee,
            uncollected,
            balance,
        } => {
            debug!(
                outcome = outcome.as_str(),
                cost, fee, uncollected, balance, "decided"
            );
            Action::Ack
        }
        Verdict::Duplicate { conflicting } => {
            if *conflicting {
                warn!(block_id = %e.block_id, "conflicting duplicate: the first decision stands");
            } else {
                debug!("duplicate delivery ignored");
            }
            Action::Ack
        }
        Verdict::Settled {
            pre,
            post,
            delta,
            uncollected,
            balance,
        } => {
            debug!(pre, post, delta, uncollected, balance, "settled");
            Action::Ack
        }
        Verdict::Invalid { reason } => Action::DeadLetter {
            reason: reason.clone(),
        },
    }
}

/// Counts what a post-flight charge left uncollected, as its `charge.uncollected` event says.
fn count_uncollected(credits: i64) {
    if credits > 0 {
        metrics::counter!("credit_credits_uncollected_total").increment(credits as u64);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;

    use chrono::TimeZone;
    use serde_json::json;

    use super::*;
    use crate::cost::CostTable;
    use crate::decide::{FeePolicy, MemoryLedger};
    use crate::ledger::{LedgerError, LedgerPolicy, RefillPolicy};

    #[test]
    fn a_logged_id_is_cut_at_a_character_boundary() {
        assert_eq!(head("abc", 2), "ab");
        assert_eq!(head("abc", 9), "abc");
        // "é" is two bytes: cut inside it, the cut goes back before it.
        assert_eq!(head("aé", 2), "a");
        assert_eq!(head(&"x".repeat(300), 255).len(), 255);
    }

    /// Decides in memory; fails the first `transient` calls, and permanently any batch of
    /// more than one entry that contains `poison`, or `poison` alone.
    struct MemoryDecider {
        ledger: Mutex<MemoryLedger>,
        pricing: Pricing,
        transient: AtomicUsize,
        poison: Option<&'static str>,
        calls: AtomicUsize,
    }

    impl MemoryDecider {
        fn new(transient: usize, poison: Option<&'static str>) -> Self {
            MemoryDecider {
                ledger: Mutex::default(),
                pricing: Pricing {
                    costs: CostTable::builtin().unwrap(),
                    ledger: LedgerPolicy {
                        refill: Some(RefillPolicy { target: 1000 }),
                        lazy_refill: true,
                        low_balance_threshold: 0,
                        auto_top_up_ttl: chrono::Duration::hours(1),
                    },
                    fee: FeePolicy {
                        every: 0,
                        amount: 0,
                    },
                    allow_debt: true,
                },
                transient: AtomicUsize::new(transient),
                poison,
                calls: AtomicUsize::new(0),
            }
        }

        fn balance(&self, user: &str) -> i64 {
            self.ledger.lock().unwrap().accounts[user].balance
        }
    }

    impl Decider for MemoryDecider {
        async fn decide(
            &self,
            entries: &[NodeExecutionEntry],
            _turn: Turn,
        ) -> Result<Vec<Verdict>, DecideError> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            if self.transient.load(Ordering::SeqCst) > 0 {
                self.transient.fetch_sub(1, Ordering::SeqCst);
                return Err(DecideError::Race);
            }
            if entries
                .iter()
                .any(|e| Some(e.node_exec_id.as_str()) == self.poison)
            {
                return Err(DecideError::Ledger(LedgerError::InvalidArgument {
                    field: "node_exec_id",
                    reason: "poisoned".into(),
                }));
            }
            let now = chrono::Utc
                .with_ymd_and_hms(2026, 11, 25, 12, 0, 0)
                .unwrap();
            Ok(self
                .ledger
                .lock()
                .unwrap()
                .decide(&self.pricing, entries, now))
        }
    }

    fn gpt4(user: &str, id: &str) -> Vec<u8> {
        serde_json::to_vec(&json!({
            "user_id": user, "graph_exec_id": "ge", "graph_id": "g", "node_exec_id": id,
            "node_id": "n", "block_id": "1f292d4a-41a4-4977-9684-7c8d560b9f91",
            "inputs": {"model": "gpt-4-turbo", "credentials": {
                "id": "53c25cb8-e3ee-465c-a4d1-e75a4c899c2a", "provider": "openai", "type": "api_key"}},
        }))
        .unwrap()
    }

    async fn process(d: &MemoryDecider, bodies: &[Vec<u8>]) -> Option<Vec<(Action, MessageIds)>> {
        let refs: Vec<&[u8]> = bodies.iter().map(Vec::as_slice).collect();
        process_batch(d, &refs, &CancellationToken::new()).await
    }

    fn dead(reason: &str) -> Action {
        Action::DeadLetter {
            reason: reason.into(),
        }
    }

    #[test]
    fn only_allowed_producers_are_billed() {
        let allowed = vec!["executor".to_owned()];
        assert_eq!(producer_refusal(&[], Some("anyone")), None);
        assert_eq!(producer_refusal(&[], None), None);
        assert_eq!(producer_refusal(&allowed, Some("executor")), None);
        assert_eq!(
            producer_refusal(&allowed, Some("mallory")).as_deref(),
            Some("user_id: producer \"mallory\" is not in amqp.allowed_producers")
        );
        assert!(producer_refusal(&allowed, None).is_some());
    }

    #[tokio::test]
    async fn invalid_bodies_are_dead_lettered_with_the_field_named() {
        let d = MemoryDecider::new(0, None);
        let bodies = vec![
            gpt4("u", "a"),
            b"{nope".to_vec(),
            br#"{"node_exec_id": "x", "user_id": 7}"#.to_vec(),
            gpt4("u", "a"),
        ];
        let out = process(&d, &bodies).await.unwrap();
        let actions: Vec<_> = out.iter().map(|(a, _)| a.clone()).collect();
        assert_eq!(actions[0], Action::Ack);
        assert!(
            matches!(&actions[1], Action::DeadLetter { reason } if reason.starts_with("body: not valid JSON"))
        );
        assert_eq!(actions[2], dead("user_id: expected a string, got number"));
        assert_eq!(actions[3], Action::Ack);
        assert_eq!(out[2].1.node_exec_id.as_deref(), Some("x"));
        assert_eq!(out[2].1.user_id, None);
        assert_eq!(out[0].1.user_id.as_deref(), Some("u"));
        assert_eq!(d.balance("u"), 990);
    }

    #[tokio::test]
    async fn transient_faults_are_retried_without_deciding_twice() {
        let d = MemoryDecider::new(2, None);
        let out = process(&d, &[gpt4("u", "a"), gpt4("u", "b")])
            .await
            .unwrap();
        assert!(out.iter().all(|(a, _)| *a == Action::Ack));
        assert_eq!(d.calls.load(Ordering::SeqCst), 3);
        assert_eq!(d.balance("u"), 980);
    }

    #[tokio::test]
    async fn a_batch_that_fails_for_good_is_split_and_only_the_culprit_dead_lettered() {
        let d = MemoryDecider::new(0, Some("bad"));
        let bodies = [gpt4("u", "a"), gpt4("u", "bad"), gpt4("u", "c")];
        let out = process(&d, &bodies).await.unwrap();
        assert_eq!(out[0].0, Action::Ack);
        assert_eq!(out[1].0, dead("internal: node_exec_id: poisoned"));
        assert_eq!(out[2].0, Action::Ack);
        // The whole batch once, then each entry alone.
        assert_eq!(d.calls.load(Ordering::SeqCst), 4);
        assert_eq!(d.balance("u"), 980);
    }

    /// A batch's outcomes are counted as it commits, not at its ack: one whose session ends
    /// first (its ack lost with the broker) is still counted, and its redelivery only as
    /// duplicates. Retried and split batches count each entry once.
    #[tokio::test]
    async fn outcomes_are_counted_when_their_batch_commits() {
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        let _local = metrics::set_default_local_recorder(&recorder);
        let counted = || {
            let text = handle.render();
            let line = |name: &str| {
                text.lines()
                    .find(|l| l.starts_with(name))
                    .and_then(|l| l.rsplit(' ').next())
                    .unwrap_or("-")
                    .to_owned()
            };
            [
                line("credit_messages_total{outcome=\"charged\"}"),
                line("credit_messages_total{outcome=\"duplicate\"}"),
                line("credit_credits_charged_total"),
            ]
        };
        let bodies = |ids: &[&str]| ids.iter().map(|id| gpt4("u", id)).collect::<Vec<_>>();
        let d = MemoryDecider::new(1, Some("bad"));
        // A transient fault: nothing committed, nothing counted until the retry commits.
        let first = bodies(&["a", "b"]);
        let refs: Vec<&[u8]> = first.iter().map(Vec::as_slice).collect();
        let tried = attempt(&d, &refs, Turn::alone()).await;
        assert_eq!(counted(), ["-", "-", "-"]);
        assert!(finish(&d, tried, &CancellationToken::new()).await.is_some());
        assert_eq!(counted(), ["2", "-", "20"]);
        // Committed, and never finished or acked (the session ended): counted all the same.
        let second = bodies(&["c"]);
        let refs: Vec<&[u8]> = second.iter().map(Vec::as_slice).collect();
        drop(attempt(&d, &refs, Turn::alone()).await);
        assert_eq!(counted(), ["3", "-", "30"]);
        // Delivered again beside a poisoned entry: split, and only duplicates counted.
        let out = process(&d, &bodies(&["c", "bad", "a"])).await.unwrap();
        assert_eq!(out[1].0, dead("internal: node_exec_id: poisoned"));
        assert_eq!(counted(), ["3", "2", "30"]);
    }

    /// Answers a batch of several entries with one verdict too few.
    struct OneVerdictShort(MemoryDecider);

    impl Decider for OneVerdictShort {
        async fn decide(
            &self,
            entries: &[NodeExecutionEntry],
            turn: Turn,
        ) -> Result<Vec<Verdict>, DecideError> {
            let mut verdicts = self.0.decide(entries, turn).await?;
            if entries.len() > 1 {
                verdicts.pop();
            }
            Ok(verdicts)
        }
    }

    #[tokio::test]
    async fn an_entry_left_without_a_verdict_is_decided_alone_not_acked() {
        let d = OneVerdictShort(MemoryDecider::new(0, None));
        let bodies = [gpt4("u", "a"), gpt4("u", "b")];
        let refs: Vec<&[u8]> = bodies.iter().map(Vec::as_slice).collect();
        let out = process_batch(&d, &refs, &CancellationToken::new())
            .await
            .unwrap();
        assert_eq!(out.len(), 2);
        assert!(out.iter().all(|(a, _)| *a == Action::Ack));
        // The batch once, then each entry alone (found decided: charged once each).
        assert_eq!(d.0.calls.load(Ordering::SeqCst), 3);
        assert_eq!(d.0.balance("u"), 980);
    }

    /// Panics on any batch holding the node execution `boom`, before deciding anything.
    struct Defective(MemoryDecider);

    impl Decider for Defective {
        async fn decide(
            &self,
            entries: &[NodeExecutionEntry],
            turn: Turn,
        ) -> Result<Vec<Verdict>, DecideError> {
            if entries.iter().any(|e| e.node_exec_id == "boom") {
                panic!("a defect met by {}", entries.len());
            }
            self.0.decide(entries, turn).await
        }
    }

    #[tokio::test]
    async fn a_defect_one_entry_meets_dead_letters_that_entry_alone() {
        let d = Defective(MemoryDecider::new(0, None));
        let bodies = [gpt4("u", "a"), gpt4("u", "boom"), gpt4("v", "c")];
        let refs: Vec<&[u8]> = bodies.iter().map(Vec::as_slice).collect();
        // This thread's own recorder (the test runtime has one thread): other tests' counts
        // stay out of it.
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        let guard = metrics::set_default_local_recorder(&recorder);
        let out = process_batch(&d, &refs, &CancellationToken::new())
            .await
            .unwrap();
        drop(guard);
        // Two panics (the batch's, then the entry's alone), one message lost: counted once.
        let text = handle.render();
        assert!(
            text.contains("credit_defects_total{stage=\"decide\"} 1\n"),
            "{text}"
        );
        let actions: Vec<_> = out.iter().map(|(a, _)| a.clone()).collect();
        assert_eq!(
            actions,
            [
                Action::Ack,
                dead("internal: a defect: a defect met by 1"),
                Action::Ack
            ]
        );
        // The batch panicked before it decided anything; alone, the others are charged once.
        assert_eq!(d.0.calls.load(Ordering::SeqCst), 2);
        assert_eq!((d.0.balance("u"), d.0.balance("v")), (990, 990));
        assert_eq!(d.0.ledger.lock().unwrap().decisions.len(), 2);
    }

    /// Fails every batch as a pool does whose server certificate expired.
    struct CertificateExpired;

    impl Decider for CertificateExpired {
        async fn decide(
            &self,
            _entries: &[NodeExecutionEntry],
            _turn: Turn,
        ) -> Result<Vec<Verdict>, DecideError> {
            Err(DecideError::Db(sqlx::Error::Io(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "invalid peer certificate: Expired",
            ))))
        }
    }

    #[tokio::test]
    async fn a_connection_that_cannot_be_set_up_dead_letters_nothing() {
        let stop = CancellationToken::new();
        stop.cancel();
        let body = gpt4("u", "a");
        let out = process_batch(&CertificateExpired, &[body.as_slice()], &stop).await;
        assert_eq!(out, None);
    }

    #[tokio::test]
    async fn a_stop_during_an_outage_decides_and_acks_nothing() {
        let d = MemoryDecider::new(usize::MAX, None);
        let stop = CancellationToken::new();
        stop.cancel();
        let body = gpt4("u", "a");
        assert_eq!(process_batch(&d, &[body.as_slice()], &stop).await, None);
        assert!(d.ledger.lock().unwrap().decisions.is_empty());
    }
}
