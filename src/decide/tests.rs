//! The decision rules without a database: a batch decides exactly like one entry at a time.

use chrono::{DateTime, TimeZone, Utc};
use proptest::prelude::*;
use serde_json::json;

use super::*;
use crate::ledger::{RefillPolicy, TxType};
use crate::message::decode;

const OPENAI_CRED: &str = "53c25cb8-e3ee-465c-a4d1-e75a4c899c2a";
const TEXT_GEN: &str = "1f292d4a-41a4-4977-9684-7c8d560b9f91";

fn pricing(fee_every: i64) -> Pricing {
    let table = format!(
        "{}\n[[block]]\nid = \"max\"\ncosts = [{{ cost_amount = {}, cost_type = \"run\", cost_filter = {{}} }}]\n",
        crate::cost::BUILTIN_TABLE,
        i64::MAX
    );
    Pricing {
        costs: CostTable::from_toml_str(&table, "test").unwrap(),
        ledger: LedgerPolicy {
            refill: Some(RefillPolicy { target: 1000 }),
            lazy_refill: true,
            low_balance_threshold: 100,
            auto_top_up_ttl: chrono::Duration::hours(1),
        },
        fee: FeePolicy {
            every: fee_every,
            amount: 1,
        },
        allow_debt: true,
    }
}

/// gpt-4-turbo on the platform credential (10 credits), the user's own key (0), or `max`.
fn entry(user: &str, id: &str, kind: u8) -> NodeExecutionEntry {
    let (block, inputs) = match kind {
        0 => (
            TEXT_GEN,
            json!({"model": "gpt-4-turbo", "credentials": {"id": OPENAI_CRED, "provider": "openai", "type": "api_key"}}),
        ),
        1 => (TEXT_GEN, json!({"model": "gpt-4-turbo", "api_key": "own"})),
        _ => ("max", json!({})),
    };
    let body = json!({
        "user_id": user, "graph_exec_id": format!("ge-{id}"), "graph_id": "g",
        "node_exec_id": id, "node_id": "n", "block_id": block, "inputs": inputs,
    });
    decode(&serde_json::to_vec(&body).unwrap()).unwrap()
}

fn now() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 25, 12, 0, 0).unwrap()
}

fn is_rejected(v: &Verdict) -> bool {
    matches!(
        v,
        Verdict::Decided {
            outcome: Outcome::Rejected,
            ..
        }
    )
}

fn one_at_a_time(p: &Pricing, entries: &[NodeExecutionEntry]) -> (Vec<Verdict>, MemoryLedger) {
    let mut ledger = MemoryLedger::default();
    let verdicts = entries
        .iter()
        .flat_map(|e| ledger.decide(p, std::slice::from_ref(e), now()))
        .collect();
    (verdicts, ledger)
}

#[test]
fn a_batch_decides_exactly_like_one_at_a_time() {
    let p = pricing(4);
    // One hot user running out of funds midway: 1000 / 10 ⇒ 100 charges (less the fees).
    let mut entries: Vec<_> = (0..120)
        .map(|i| entry("hot", &format!("h-{i}"), 0))
        .collect();
    entries.push(entry("hot", "h-5", 0)); // duplicate inside the batch
    entries.push(entry("other", "h-6", 0)); // conflicting duplicate
    entries.push(entry("cold", "c-1", 1));
    entries.push(entry("cold", "c-2", 0));
    entries.insert(50, entry("cold", "c-3", 2)); // costs i64::MAX: rejected
    let mut batched = MemoryLedger::default();
    let verdicts = batched.decide(&p, &entries, now());
    let (single, single_ledger) = one_at_a_time(&p, &entries);
    assert_eq!(verdicts, single);
    assert_eq!(batched, single_ledger);

    let count = |f: &dyn Fn(&Verdict) -> bool| verdicts.iter().filter(|v| f(v)).count();
    let charged = |v: &Verdict| {
        matches!(
            v,
            Verdict::Decided {
                outcome: Outcome::Charged,
                ..
            }
        )
    };
    // 1000 credits: every 4th execution also pays a fee of 1, so 97 charges of 10 + 24
    // fees leave 6 < 10 (the 98th execution is the first rejection).
    assert_eq!(count(&charged), 97 + 1);
    assert_eq!(count(&is_rejected), 23 + 1);
    assert_eq!(batched.accounts["hot"].balance, 6);
    assert_eq!(batched.accounts["cold"].balance, 990);
    assert_eq!(verdicts[121], Verdict::Duplicate { conflicting: false });
    assert_eq!(verdicts[122], Verdict::Duplicate { conflicting: true });
    assert!(is_rejected(&verdicts[50]), "{:?}", verdicts[50]);
}

#[test]
fn an_overflowing_entry_changes_nothing_and_holds_nothing_up() {
    let p = pricing(1);
    let mut ledger = MemoryLedger::default();
    let entries = [entry("u", "a", 0), entry("u", "b", 2), entry("u", "c", 0)];
    let verdicts = ledger.decide(&p, &entries, now());
    let Verdict::Invalid { reason } = &verdicts[1] else {
        panic!("{verdicts:?}");
    };
    assert!(reason.contains("overflows"), "{reason}");
    // Refill 1000, then two charges of 10 + fee 1 each.
    assert_eq!(ledger.accounts["u"].balance, 1000 - 2 * 11);
    assert_eq!(ledger.accounts["u"].fee_count, 2);
    assert_eq!(ledger.transactions.len(), 1 + 4);
    assert!(!ledger.decisions.contains_key("b"));
}

#[test]
fn crossing_the_low_balance_threshold_is_reported_once() {
    let p = pricing(0);
    let mut ledger = MemoryLedger::default();
    let entries: Vec<_> = (0..95).map(|i| entry("u", &format!("n{i}"), 0)).collect();
    ledger.decide(&p, &entries, now());
    let lows: Vec<_> = ledger
        .events
        .iter()
        .filter(|e| e.routing_key == crate::events::BALANCE_LOW)
        .collect();
    assert_eq!(lows.len(), 1);
    // 1000 → 100 after 90 charges; the 91st takes it to 90 < 100. Its row is seq 92 (the
    // refill grant is seq 1).
    assert_eq!(lows[0].json()["balance"], 90);
    assert_eq!(lows[0].event_id, "balance.low:u:92");
    assert_eq!(ledger.accounts["u"].balance, 1000 - 950);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// Any split into batches decides like one at a time, and the ledger stays consistent.
    #[test]
    fn batches_of_any_size_decide_like_one_at_a_time(
        picks in prop::collection::vec((0u8..4, 0u8..40, 0u8..3), 1..150),
        cuts in prop::collection::vec(1usize..40, 1..10),
        fee_every in 0i64..4,
    ) {
        let p = pricing(fee_every);
        let entries: Vec<_> = picks
            .iter()
            .map(|(u, n, k)| entry(&format!("u{u}"), &format!("n{n}"), *k))
            .collect();
        let mut batched = MemoryLedger::default();
        let mut verdicts = Vec::new();
        let mut rest = &entries[..];
        for cut in cuts.iter().cycle() {
            if rest.is_empty() {
                break;
            }
            let (head, tail) = rest.split_at((*cut).min(rest.len()));
            verdicts.extend(batched.decide(&p, head, now()));
            rest = tail;
        }
        let (single, single_ledger) = one_at_a_time(&p, &entries);
        prop_assert_eq!(&verdicts, &single);
        prop_assert_eq!(&batched, &single_ledger);
        for a in batched.accounts.values() {
            let rows: Vec<_> = batched.transactions.iter().filter(|t| t.user_id == a.user_id).collect();
            prop_assert!(a.balance >= 0);
            prop_assert_eq!(rows.iter().map(|t| t.amount).sum::<i64>(), a.balance);
            prop_assert_eq!(rows.len() as i64, a.last_seq);
            for (i, t) in rows.iter().enumerate() {
                prop_assert_eq!(t.seq, i as i64 + 1);
                prop_assert!(t.tx_type != TxType::Usage || t.amount < 0);
            }
        }
    }
}

// ---- post-flight settlement ------------------------------------------------------------------

/// A token-priced LLM (gpt-4-turbo: 10 pre-flight, 1500 / 4500 credits per 10⁶ tokens) and a
/// dollar-priced search (100 credits per $, estimate 1).
fn settle_pricing(allow_debt: bool) -> Pricing {
    let table = r#"
        [token_rates]
        "gpt-4-turbo" = { input = 1500, output = 4500 }
        [[block]]
        id = "llm"
        costs = [{ cost_amount = 10, cost_type = "tokens", cost_filter = { model = "gpt-4-turbo" } }]
        [[block]]
        id = "search"
        costs = [{ cost_amount = 100, cost_type = "cost_usd", cost_filter = {} }]
    "#;
    let estimates = crate::cost::Estimates::from_json_str(
        r#"{"estimates": {"search": {"mean_credits": 1}}}"#,
        "test",
    )
    .unwrap();
    Pricing {
        costs: CostTable::from_toml_str(table, "test")
            .unwrap()
            .with_estimates(estimates),
        ledger: LedgerPolicy {
            refill: Some(RefillPolicy { target: 100 }),
            lazy_refill: true,
            low_balance_threshold: 20,
            auto_top_up_ttl: chrono::Duration::hours(1),
        },
        fee: FeePolicy {
            every: 0,
            amount: 0,
        },
        allow_debt,
    }
}

/// A start (`stats` None) or completion of `id` for `user`.
fn run(user: &str, id: &str, block: &str, stats: Option<serde_json::Value>) -> NodeExecutionEntry {
    let mut body = json!({
        "user_id": user, "graph_exec_id": "ge", "graph_id": "g", "node_exec_id": id,
        "node_id": "n", "block_id": block, "inputs": {"model": "gpt-4-turbo"},
    });
    if let Some(s) = stats {
        body["phase"] = "completed".into();
        body["stats"] = s;
    }
    decode(&serde_json::to_vec(&body).unwrap()).unwrap()
}

fn tokens(input: u64, output: u64) -> Option<serde_json::Value> {
    Some(json!({"input_token_count": input, "output_token_count": output}))
}

#[test]
fn a_completion_settles_the_difference_once() {
    let p = settle_pricing(true);
    let mut l = MemoryLedger::default();
    l.decide(&p, &[run("u", "a", "llm", None)], now());
    assert_eq!(l.accounts["u"].balance, 90);
    // 10,000 in + 2,000 out = 15 + 9 = 24 credits: 14 more.
    let v = l.decide(&p, &[run("u", "a", "llm", tokens(10_000, 2_000))], now());
    assert_eq!(
        v,
        vec![Verdict::Settled {
            pre: 10,
            post: 24,
            delta: 14,
            uncollected: 0,
            balance: 76
        }]
    );
    let row = l.transactions.last().unwrap();
    assert_eq!(
        (row.transaction_key.as_str(), row.amount),
        ("SETTLE-a", -14)
    );
    assert_eq!(row.metadata["pre"], 10);
    // The start's row says it was an estimate; the settlement's and the run's own do not.
    let marks: Vec<_> = l
        .transactions
        .iter()
        .map(|t| (t.transaction_key.as_str(), t.metadata.get("estimate")))
        .collect();
    assert_eq!(
        marks,
        [
            ("MONTHLY-CREDIT-TOP-UP-2026-11", None),
            ("USAGE-a", Some(&json!(true))),
            ("SETTLE-a", None)
        ],
        "{:?}",
        l.transactions
    );
    // The same completion again, or another one: nothing.
    let again = l.decide(&p, &[run("u", "a", "llm", tokens(1, 1))], now());
    assert_eq!(again, vec![Verdict::Duplicate { conflicting: false }]);
    assert_eq!(l.accounts["u"].balance, 76);
    // A cheaper run gives credit back.
    l.decide(
        &p,
        &[
            run("u", "b", "llm", None),
            run("u", "b", "llm", tokens(1_000, 0)),
        ],
        now(),
    );
    assert_eq!(l.accounts["u"].balance, 76 - 10 + 8);
    assert_eq!(l.settlements["b"].delta, -8);
}

#[test]
fn a_completion_that_overtakes_its_start_decides_and_the_start_is_a_duplicate() {
    let p = settle_pricing(true);
    let mut l = MemoryLedger::default();
    let v = l.decide(&p, &[run("u", "a", "llm", tokens(10_000, 2_000))], now());
    assert!(
        matches!(
            v[0],
            Verdict::Decided {
                outcome: Outcome::Charged,
                cost: 24,
                ..
            }
        ),
        "{v:?}"
    );
    assert_eq!(l.settlements["a"].delta, 0);
    let v = l.decide(&p, &[run("u", "a", "llm", None)], now());
    assert_eq!(v, vec![Verdict::Duplicate { conflicting: false }]);
    assert_eq!(l.accounts["u"].balance, 100 - 24);
}

/// A start of `id` on `search` that carries stats (priced post-flight, like a completion).
fn start_with(user: &str, id: &str, stats: serde_json::Value) -> NodeExecutionEntry {
    let mut e = run(user, id, "search", Some(stats));
    e.phase = crate::message::Phase::Started;
    e
}

/// A provider cost whose price (100 credits per $) no i64 holds.
fn unpriceable() -> serde_json::Value {
    json!({"provider_cost": 1e300})
}

fn dollars(usd: f64) -> Option<serde_json::Value> {
    Some(json!({ "provider_cost": usd }))
}

#[test]
fn a_repeat_that_cannot_be_priced_is_still_a_duplicate() {
    let p = settle_pricing(true);
    let mut l = MemoryLedger::default();
    // Alone, an unpriceable completion is invalid: it settles nothing.
    l.decide(&p, &[run("u", "a", "search", None)], now());
    let v = l.decide(&p, &[run("u", "a", "search", Some(unpriceable()))], now());
    assert!(
        matches!(&v[0], Verdict::Invalid { reason } if reason.contains("overflow")),
        "{v:?}"
    );
    // Once settled, another completion is a duplicate whatever its stats, as is a start.
    l.decide(&p, &[run("u", "a", "search", dollars(0.05))], now());
    let before = l.clone();
    let repeats = [
        run("u", "a", "search", Some(unpriceable())),
        start_with("u", "a", unpriceable()),
        run("v", "a", "search", Some(unpriceable())),
    ];
    for (e, conflicting) in repeats.iter().zip([false, false, true]) {
        let v = l.decide(&p, std::slice::from_ref(e), now());
        assert_eq!(v, vec![Verdict::Duplicate { conflicting }], "{e:?}");
    }
    assert_eq!(l, before);
    // In one batch with the completion that decides and settles it: the later one is the
    // duplicate; an unpriceable start of another execution stays invalid.
    let v = l.decide(
        &p,
        &[
            run("u", "b", "search", dollars(0.02)),
            run("u", "b", "search", Some(unpriceable())),
            start_with("u", "c", unpriceable()),
        ],
        now(),
    );
    assert!(matches!(v[0], Verdict::Decided { cost: 2, .. }), "{v:?}");
    assert_eq!(v[1], Verdict::Duplicate { conflicting: false });
    assert!(matches!(&v[2], Verdict::Invalid { .. }), "{v:?}");
    assert_eq!(l.accounts["u"].balance, before.accounts["u"].balance - 2);
    assert!(!l.decisions.contains_key("c"));
}

#[test]
fn a_completion_first_whose_cost_and_fee_overflow_is_refused_not_capped() {
    let table = format!(
        r#"[[block]]
        id = "big"
        costs = [{{ cost_amount = {}, cost_type = "run", cost_filter = {{}} }}]"#,
        i64::MAX
    );
    let p = Pricing {
        costs: CostTable::from_toml_str(&table, "test").unwrap(),
        fee: FeePolicy {
            every: 1,
            amount: 1,
        },
        ..settle_pricing(true)
    };
    let mut l = MemoryLedger::default();
    let v = l.decide(&p, &[run("u", "a", "big", Some(json!({})))], now());
    let Verdict::Invalid { reason } = &v[0] else {
        panic!("{v:?}");
    };
    assert!(reason.contains("overflows"), "{reason}");
    assert!(l.decisions.is_empty() && l.settlements.is_empty());
    // The start is refused the same way.
    let v = l.decide(&p, &[run("u", "a", "big", None)], now());
    assert!(matches!(&v[0], Verdict::Invalid { reason } if reason.contains("overflows")));
}

/// A block billed only after its run (a matching entry, no estimate: 0 before it) runs while
/// the balance is above 0 and is rejected at 0 or in debt: its run could only make or deepen
/// a debt. One the user pays nothing for (no match) still runs.
#[test]
fn a_block_billed_after_its_run_is_refused_without_credit() {
    let table = r#"
        [[block]]
        id = "sandbox"
        costs = [
            { cost_amount = 100, cost_type = "cost_usd", cost_filter = { key = "platform" } },
            { cost_amount = 0, cost_type = "run", cost_filter = { key = "free" } },
        ]
    "#;
    let p = Pricing {
        costs: CostTable::from_toml_str(table, "test").unwrap(),
        ..settle_pricing(true)
    };
    let sandbox = |id: &str, key: &str, stats: Option<serde_json::Value>| {
        let mut e = run("u", id, "sandbox", stats);
        e.inputs = json!({"key": key}).as_object().cloned().unwrap_or_default();
        e
    };
    let usd = |cost: f64| Some(json!({"provider_cost": cost, "provider_cost_type": "cost_usd"}));
    let decided = |v: &[Verdict]| match v.first() {
        Some(Verdict::Decided { outcome, cost, .. }) => Some((*outcome, *cost)),
        _ => None,
    };
    let mut l = MemoryLedger::default();
    // The refill's 100: runs (free before, 150 after), leaving a debt of 50.
    let v = l.decide(&p, &[sandbox("a", "platform", None)], now());
    assert_eq!(decided(&v), Some((Outcome::Free, 0)));
    l.decide(&p, &[sandbox("a", "platform", usd(1.5))], now());
    assert_eq!(l.accounts["u"].balance, -50);
    let v = l.decide(&p, &[sandbox("b", "platform", None)], now());
    assert_eq!(decided(&v), Some((Outcome::Rejected, 0)));
    // The user's own key matches no entry: free, debt or not.
    let v = l.decide(&p, &[sandbox("c", "own", None)], now());
    assert_eq!(decided(&v), Some((Outcome::Free, 0)));
    // An entry of 0 credits a run: free, debt or not (not a paid execution).
    let v = l.decide(&p, &[sandbox("d", "free", None)], now());
    assert_eq!(decided(&v), Some((Outcome::Free, 0)));
    assert_eq!(l.accounts["u"].balance, -50);
    use super::apply::refused_for_funds;
    assert!(refused_for_funds(0, true, -1));
    assert!(refused_for_funds(0, true, 0));
    assert!(!refused_for_funds(0, true, 1));
    assert!(!refused_for_funds(0, false, 0));
    assert!(!refused_for_funds(0, false, -5));
    assert!(refused_for_funds(11, false, 10));
    assert!(!refused_for_funds(10, true, 10));
    // AutoGPT's billing_reconciliation_test: cost_usd at 100 credits per $, no estimate, a
    // balance of 0 is refused (no spend); 50 starts, free before the run.
    let mut l = holding(0);
    let v = l.decide(&p, &[sandbox("e", "platform", None)], now());
    assert_eq!(decided(&v), Some((Outcome::Rejected, 0)));
    let v = l.decide(&p, &[sandbox("f", "own", None)], now());
    assert_eq!(decided(&v), Some((Outcome::Free, 0)));
    let mut l = holding(50);
    let v = l.decide(&p, &[sandbox("g", "platform", None)], now());
    assert_eq!(decided(&v), Some((Outcome::Free, 0)));
    assert_eq!(l.accounts["u"].balance, 50);
}

#[test]
fn debt_is_taken_then_rejects_paid_runs_and_a_refill_clears_it() {
    let p = settle_pricing(true);
    let mut l = MemoryLedger::default();
    // $1.50 of search at 100 credits per $: 150, on 100 credits less the estimate of 1.
    l.decide(&p, &[run("u", "s", "search", None)], now());
    let stats = Some(json!({"provider_cost": 1.5, "provider_cost_type": "cost_usd"}));
    l.decide(&p, &[run("u", "s", "search", stats)], now());
    assert_eq!(l.accounts["u"].balance, -50);
    let v = l.decide(&p, &[run("u", "t", "llm", None)], now());
    assert!(is_rejected(&v[0]), "{v:?}");
    // Next month's refill tops the debt up to the target: a grant of 150.
    let next = Utc.with_ymd_and_hms(2026, 12, 1, 0, 0, 1).unwrap();
    l.decide(&p, &[run("u", "t2", "llm", None)], next);
    let grant = l
        .transactions
        .iter()
        .rev()
        .find(|t| t.tx_type == TxType::Grant)
        .unwrap();
    assert_eq!(grant.amount, 150);
    assert_eq!(l.accounts["u"].balance, 90);
}

/// The executor does not wait for the decision: a rejected start whose completion comes
/// means the block ran, and its whole post-flight price is owed (SPEC §4.2, `pre` = 0).
#[test]
fn the_completion_of_a_rejected_start_charges_its_post_flight_price() {
    let p = settle_pricing(true);
    let mut l = MemoryLedger::default();
    // 100 credits: the search's debt of 50 leaves -50, and the next run is rejected.
    l.decide(&p, &[run("u", "s", "search", None)], now());
    let stats = Some(json!({"provider_cost": 1.5, "provider_cost_type": "cost_usd"}));
    l.decide(&p, &[run("u", "s", "search", stats)], now());
    let v = l.decide(&p, &[run("u", "t", "llm", None)], now());
    assert!(is_rejected(&v[0]), "{v:?}");
    // 10,000 in + 2,000 out = 24 credits.
    let v = l.decide(&p, &[run("u", "t", "llm", tokens(10_000, 2_000))], now());
    assert_eq!(
        v,
        vec![Verdict::Settled {
            pre: 0,
            post: 24,
            delta: 24,
            uncollected: 0,
            balance: -74
        }]
    );
}

#[test]
fn without_debt_the_rest_is_reported_uncollected() {
    let p = settle_pricing(false);
    let mut l = MemoryLedger::default();
    l.decide(&p, &[run("u", "s", "search", None)], now());
    let stats = Some(json!({"provider_cost": 1.5, "provider_cost_type": "cost_usd"}));
    let v = l.decide(&p, &[run("u", "s", "search", stats)], now());
    assert_eq!(
        v,
        vec![Verdict::Settled {
            pre: 1,
            post: 150,
            delta: 149,
            uncollected: 50,
            balance: 0
        }]
    );
    // The row moved 99 of the 149: its metadata says what stayed behind.
    let row = l.transactions.last().unwrap();
    assert_eq!(
        (row.transaction_key.as_str(), row.amount),
        ("SETTLE-s", -99)
    );
    assert_eq!(
        (&row.metadata["delta"], &row.metadata["uncollected"]),
        (&json!(149), &json!(50))
    );
    let ev = l
        .events
        .iter()
        .find(|e| e.routing_key == crate::events::CHARGE_UNCOLLECTED);
    assert_eq!(ev.map(|e| e.json()["amount"].clone()), Some(json!(50)));
}

/// Without debt, a charge left wholly uncollected (nothing left to take) asks for a top-up as
/// a run refused for funds does: the user owes more than the balance holds.
#[test]
fn without_debt_a_charge_left_wholly_uncollected_asks_for_a_top_up() {
    let p = settle_pricing(false);
    let mut l = MemoryLedger::default();
    let starts = [run("u", "a", "llm", None), run("u", "b", "llm", None)];
    l.decide(&p, &starts, now());
    // 100,000 in + 10,000 out = 150 + 45 = 195 credits: 185 more, 80 of them taken.
    let v = l.decide(&p, &[run("u", "a", "llm", tokens(100_000, 10_000))], now());
    assert!(
        matches!(
            v[0],
            Verdict::Settled {
                uncollected: 105,
                balance: 0,
                ..
            }
        ),
        "{v:?}"
    );
    if let Some(a) = l.accounts.get_mut("u") {
        a.auto_threshold = Some(50);
        a.auto_amount = Some(500);
    }
    // 24 credits: 14 more, none of them taken.
    let v = l.decide(&p, &[run("u", "b", "llm", tokens(10_000, 2_000))], now());
    assert!(
        matches!(
            v[0],
            Verdict::Settled {
                uncollected: 14,
                balance: 0,
                ..
            }
        ),
        "{v:?}"
    );
    assert_eq!(requests(&l), vec![("AUTO-TOP-UP-u-1".into(), 0)]);
}

/// Without debt, a completion that overtook its start takes its fee first, then what the
/// balance still holds of its cost; a fee the balance cannot hold is not taken either, and is
/// reported in `charge.uncollected` with the rest of the cost.
#[test]
fn without_debt_a_fee_not_taken_is_reported_uncollected_too() {
    let p = Pricing {
        fee: FeePolicy {
            every: 1,
            amount: 5,
        },
        ..settle_pricing(false)
    };
    let mut l = MemoryLedger::default();
    let usd = |cost: f64| Some(json!({"provider_cost": cost, "provider_cost_type": "cost_usd"}));
    // The refill's 100: a fee of 5, then 95 of 150.
    let v = l.decide(&p, &[run("u", "s1", "search", usd(1.5))], now());
    assert!(
        matches!(
            v[0],
            Verdict::Decided {
                cost: 95,
                fee: 5,
                uncollected: 55,
                balance: 0,
                ..
            }
        ),
        "{v:?}"
    );
    // Its charge keeps what priced it, and what of the price it could not take.
    let usage = l
        .transactions
        .iter()
        .find(|t| t.transaction_key == "USAGE-s1");
    let metadata = usage.map(|t| t.metadata.clone()).unwrap_or_default();
    assert_eq!(metadata["stats"]["provider_cost"], json!(1.5), "{metadata}");
    assert_eq!(
        (
            &metadata["status"],
            &metadata["uncollected"],
            &metadata["phase"]
        ),
        (&json!("COMPLETED"), &json!(55), &json!("completed"))
    );
    // Nothing left: neither the fee of 5 nor the cost of 2.
    let v = l.decide(&p, &[run("u", "s2", "search", usd(0.02))], now());
    assert!(
        matches!(
            v[0],
            Verdict::Decided {
                cost: 0,
                fee: 0,
                uncollected: 7,
                balance: 0,
                ..
            }
        ),
        "{v:?}"
    );
    let amounts: Vec<serde_json::Value> = l
        .events
        .iter()
        .filter(|e| e.routing_key == crate::events::CHARGE_UNCOLLECTED)
        .map(|e| e.json()["amount"].clone())
        .collect();
    assert_eq!(amounts, [json!(55), json!(7)]);
    // The fee not taken is kept with the settlement, so the database accounts for all 7.
    let s2 = &l.settlements["s2"];
    assert_eq!((s2.post, s2.uncollected, s2.fee_uncollected), (2, 2, 5));
    assert_eq!(l.settlements["s1"].fee_uncollected, 0);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// Whatever the order, duplication and batching of starts and completions, each
    /// execution's block cost in total is its post-flight price, charged once, and the
    /// books balance.
    #[test]
    fn every_execution_costs_its_post_flight_price_once(
        runs in prop::collection::vec((0u8..3, 0u64..20_000, 0u64..5_000), 1..12),
        order in prop::collection::vec((0usize..100, any::<bool>(), 0u8..3), 1..60),
        cuts in prop::collection::vec(1usize..8, 1..6),
    ) {
        let p = settle_pricing(true);
        // Messages: each execution's start and completion, each possibly more than once,
        // in an order picked by the strategy.
        let mut msgs = Vec::new();
        for (k, (pick, completed, _)) in order.iter().enumerate() {
            let i = pick % runs.len();
            let (user, input, output) = runs[i];
            let user = format!("u{user}");
            let id = format!("x{i}");
            let stats = completed.then(|| tokens(input, output)).flatten();
            msgs.push((k, run(&user, &id, "llm", stats)));
        }
        let entries: Vec<_> = msgs.into_iter().map(|(_, e)| e).collect();
        let mut l = MemoryLedger::default();
        let mut rest = &entries[..];
        for cut in cuts.iter().cycle() {
            if rest.is_empty() { break; }
            let (head, tail) = rest.split_at((*cut).min(rest.len()));
            l.decide(&p, head, now());
            rest = tail;
        }
        // Each execution: its charge rows sum to the post-flight price once completed.
        for (id, s) in &l.settlements {
            let charged: i64 = l.transactions.iter()
                .filter(|t| t.transaction_key == format!("USAGE-{id}") || t.transaction_key == format!("SETTLE-{id}"))
                .map(|t| -t.amount)
                .sum();
            prop_assert_eq!(charged, s.post, "{}", id);
        }
        for a in l.accounts.values() {
            let rows: Vec<_> = l.transactions.iter().filter(|t| t.user_id == a.user_id).collect();
            prop_assert_eq!(rows.iter().map(|t| t.amount).sum::<i64>(), a.balance);
            prop_assert_eq!(rows.len() as i64, a.last_seq);
        }
        // Batching never changes the outcome.
        let (single, single_ledger) = one_at_a_time(&p, &entries);
        let mut batched = MemoryLedger::default();
        let mut all = Vec::new();
        let mut rest = &entries[..];
        for cut in cuts.iter().cycle() {
            if rest.is_empty() { break; }
            let (head, tail) = rest.split_at((*cut).min(rest.len()));
            all.extend(batched.decide(&p, head, now()));
            rest = tail;
        }
        prop_assert_eq!(all, single);
        prop_assert_eq!(batched, single_ledger);
    }
}

#[test]
fn a_completion_for_another_user_settles_nothing() {
    let p = settle_pricing(true);
    let mut l = MemoryLedger::default();
    l.decide(&p, &[run("u", "a", "llm", None)], now());
    let v = l.decide(&p, &[run("v", "a", "llm", tokens(100_000, 0))], now());
    assert_eq!(v, vec![Verdict::Duplicate { conflicting: true }]);
    assert!(l.settlements.is_empty());
    // The real completion still settles.
    let v = l.decide(&p, &[run("u", "a", "llm", tokens(0, 0))], now());
    assert!(matches!(v[0], Verdict::Settled { delta: -10, .. }), "{v:?}");
}

#[test]
fn failed_runs_settle_like_completed_ones_and_an_extra_charge_can_cross_low_balance() {
    let p = settle_pricing(true);
    let mut l = MemoryLedger::default();
    l.decide(&p, &[run("u", "a", "llm", None)], now());
    let mut failed = run("u", "a", "llm", tokens(40_000, 0));
    failed.status = crate::message::RunStatus::Failed;
    // 90 before; 60 credits of input tokens, 50 more: 40, still above the threshold of 20.
    let v = l.decide(&p, &[failed], now());
    assert!(
        matches!(
            v[0],
            Verdict::Settled {
                delta: 50,
                balance: 40,
                ..
            }
        ),
        "{v:?}"
    );
    assert_eq!(l.settlements["a"].status, "FAILED");
    assert!(l
        .events
        .iter()
        .all(|e| e.routing_key != crate::events::BALANCE_LOW));
    // The next start leaves 30; its extra charge of 20 crosses the threshold, on the SETTLE row.
    l.decide(
        &p,
        &[
            run("u", "b", "llm", None),
            run("u", "b", "llm", tokens(20_000, 0)),
        ],
        now(),
    );
    let low: Vec<_> = l
        .events
        .iter()
        .filter(|e| e.routing_key == crate::events::BALANCE_LOW)
        .collect();
    assert_eq!(low.len(), 1);
    assert_eq!(low[0].json()["balance"], 10);
    assert_eq!(l.transactions.last().unwrap().transaction_key, "SETTLE-b");
}

// ---- auto top-up requests ---------------------------------------------------------------------

fn requests(l: &MemoryLedger) -> Vec<(String, i64)> {
    l.events
        .iter()
        .filter(|e| e.routing_key == crate::events::TOP_UP_REQUESTED)
        .map(|e| {
            let json = e.json();
            let id = json["request_id"].as_str().unwrap_or_default().to_owned();
            (id, json["balance"].as_i64().unwrap_or_default())
        })
        .collect()
}

/// The ledger `seq` each `top_up.requested` in `l` was made at, in order.
fn request_seqs(l: &MemoryLedger) -> Vec<i64> {
    l.events
        .iter()
        .filter(|e| e.routing_key == crate::events::TOP_UP_REQUESTED)
        .map(|e| e.json()["seq"].as_i64().unwrap_or(-1))
        .collect()
}

/// The seq of the decided ledger row under `key`.
fn seq_of(l: &MemoryLedger, key: &str) -> i64 {
    let row = l.transactions.iter().find(|t| t.transaction_key == key);
    row.map_or(-1, |t| t.seq)
}

/// A credit of 5 to user `u` under `key`, as the payment side's or an operator's lands; its
/// row's seq.
fn credit(l: &mut MemoryLedger, tx_type: TxType, key: &str, at: DateTime<Utc>) -> i64 {
    let a = l.accounts.get_mut("u").unwrap();
    let mut changes = crate::ledger::Changes::default();
    let exec = crate::events::ExecutionRef::default();
    let entry = crate::ledger::Entry {
        tx_type,
        key: key.into(),
        amount: 5,
        metadata: json!({}),
        exec,
        at,
    };
    a.post(&mut changes, entry).unwrap()
}

/// A ledger whose user `u` made one run (990 left) and then set an auto top-up.
fn with_auto_top_up(p: &Pricing, threshold: i64, amount: i64) -> MemoryLedger {
    let mut l = MemoryLedger::default();
    l.decide(p, &[entry("u", "a", 0)], now());
    if let Some(a) = l.accounts.get_mut("u") {
        a.auto_threshold = Some(threshold);
        a.auto_amount = Some(amount);
    }
    l
}

#[test]
fn a_debit_below_the_threshold_requests_one_top_up_until_credits_land() {
    let p = pricing(0);
    let mut l = with_auto_top_up(&p, 975, 500);
    // 990 ⇒ 980 ⇒ 970 (crosses 975: request 1) ⇒ 960 (outstanding: none).
    let es: Vec<_> = (0..3).map(|i| entry("u", &format!("b{i}"), 0)).collect();
    l.decide(&p, &es, now());
    assert_eq!(requests(&l), vec![("AUTO-TOP-UP-u-1".into(), 970)]);
    // The payment side's top-up lands: the next debit below the threshold asks again.
    let paid = credit(&mut l, TxType::TopUp, "AUTO-TOP-UP-u-1", now());
    assert_eq!(l.accounts["u"].auto_requested_at, None);
    l.decide(&p, &[entry("u", "c", 0)], now());
    assert_eq!(
        requests(&l),
        vec![
            ("AUTO-TOP-UP-u-1".into(), 970),
            ("AUTO-TOP-UP-u-2".into(), 955)
        ]
    );
    // Each request names the row it was made at, the debit that crossed: request 2 comes after
    // the payment's row, so the payment side knows it is a need of its own.
    let seqs = request_seqs(&l);
    assert_eq!(seqs, vec![seq_of(&l, "USAGE-b1"), seq_of(&l, "USAGE-c")]);
    assert!(seqs[0] < paid && paid < seqs[1], "{seqs:?} {paid}");
}

/// Only the outstanding request's own fulfilment answers it: the late fulfilment of a request
/// its TTL superseded, the user's own purchase or a grant leave it outstanding, so the payment
/// side never holds two of one user's requests at once. The late payment's row comes after
/// request 2's seq, so the payment side can tell that request 2 was made before it landed.
#[test]
fn only_the_outstanding_requests_fulfilment_answers_it() {
    let p = pricing(0);
    let mut l = with_auto_top_up(&p, 2000, 500);
    l.decide(&p, &[entry("u", "b", 0)], now());
    let hour = now() + chrono::Duration::hours(1);
    l.decide(&p, &[entry("u", "c", 0)], hour);
    assert_eq!(requests(&l).len(), 2);
    let others = [
        (TxType::TopUp, "AUTO-TOP-UP-u-1"),
        (TxType::TopUp, "invoice-9"),
        (TxType::Grant, "MONTHLY-CREDIT-TOP-UP-2027-01"),
    ];
    let mut late = None;
    for (tx_type, key) in others {
        let seq = credit(&mut l, tx_type, key, hour);
        late = late.or(Some(seq));
        l.decide(&p, &[entry("u", &format!("after {key}"), 0)], hour);
        assert_eq!(requests(&l).len(), 2, "{key} answered request 2");
    }
    let request_2 = request_seqs(&l)[1];
    assert_eq!(request_2, seq_of(&l, "USAGE-c"));
    assert!(late.is_some_and(|late| late > request_2), "{late:?}");
    credit(&mut l, TxType::TopUp, "AUTO-TOP-UP-u-2", hour);
    l.decide(&p, &[entry("u", "d", 0)], hour);
    let last = requests(&l).last().map(|r| r.0.clone());
    assert_eq!(last.as_deref(), Some("AUTO-TOP-UP-u-3"));
    assert_eq!(request_seqs(&l)[2], seq_of(&l, "USAGE-d"));
}

#[test]
fn an_unanswered_request_is_made_again_after_its_ttl_not_before() {
    let p = pricing(0);
    let mut l = with_auto_top_up(&p, 2000, 500);
    l.decide(&p, &[entry("u", "b", 0)], now());
    let later = now() + chrono::Duration::minutes(59);
    l.decide(&p, &[entry("u", "c", 0)], later);
    assert_eq!(requests(&l).len(), 1);
    // The payment failed and nothing landed: an hour on, the user is asked for again.
    let hour = now() + chrono::Duration::hours(1);
    l.decide(&p, &[entry("u", "d", 0)], hour);
    assert_eq!(requests(&l).len(), 2);
    assert_eq!(requests(&l)[1].0, "AUTO-TOP-UP-u-2");
    // Each request names the debit's row it was made at.
    let made_at = vec![seq_of(&l, "USAGE-b"), seq_of(&l, "USAGE-d")];
    assert_eq!(request_seqs(&l), made_at);
}

/// A user whose request's payment failed and who can afford no run makes no debit; a run
/// refused for funds asks again once the request's TTL has passed.
#[test]
fn a_run_refused_for_funds_asks_again_after_the_ttl() {
    let p = pricing(0);
    let mut l = with_auto_top_up(&p, 2000, 500);
    l.decide(&p, &[entry("u", "b", 0)], now());
    assert_eq!(requests(&l), vec![("AUTO-TOP-UP-u-1".into(), 980)]);
    let later = now() + chrono::Duration::minutes(59);
    let v = l.decide(&p, &[entry("u", "c", 2)], later);
    assert!(is_rejected(&v[0]), "{v:?}");
    assert_eq!(requests(&l).len(), 1);
    let hour = now() + chrono::Duration::hours(1);
    l.decide(&p, &[entry("u", "d", 2)], hour);
    assert_eq!(
        requests(&l),
        vec![
            ("AUTO-TOP-UP-u-1".into(), 980),
            ("AUTO-TOP-UP-u-2".into(), 980)
        ]
    );
    // Above the threshold a refusal asks for nothing.
    let mut l = with_auto_top_up(&p, 500, 500);
    l.decide(&p, &[entry("u", "b", 2)], now());
    assert!(requests(&l).is_empty());
}

#[test]
fn without_auto_top_up_nothing_is_requested() {
    let p = pricing(0);
    let mut l = MemoryLedger::default();
    let es: Vec<_> = (0..99).map(|i| entry("u", &format!("n{i}"), 0)).collect();
    l.decide(&p, &es, now());
    assert!(requests(&l).is_empty());
}

/// The keys of the execution fees in `ledger`, in the order they were posted.
fn fee_keys(ledger: &MemoryLedger) -> Vec<&str> {
    ledger
        .transactions
        .iter()
        .map(|t| t.transaction_key.as_str())
        .filter(|k| k.starts_with("EXECUTION-FEE-"))
        .collect()
}

/// A fee's key carries its ordinal of the day, also when `execution_fee.every` changes
/// during the day (it was the execution count over `every`, which then repeated an ordinal).
#[test]
fn fee_keys_count_the_days_fees_when_every_changes() {
    let mut ledger = MemoryLedger::default();
    let ids: Vec<String> = (1..=8).map(|i| format!("x{i}")).collect();
    let entries: Vec<_> = ids.iter().map(|id| entry("u", id, 0)).collect();
    // Every 2nd execution pays a fee for the first four, every 4th after: fees at 2, 4, 8.
    ledger.decide(&pricing(2), &entries[..4], now());
    ledger.decide(&pricing(4), &entries[4..], now());
    let fees = fee_keys(&ledger);
    assert_eq!(
        fees,
        [
            "EXECUTION-FEE-u-2026-11-25-1",
            "EXECUTION-FEE-u-2026-11-25-2",
            "EXECUTION-FEE-u-2026-11-25-3"
        ]
    );
    assert_eq!(ledger.accounts["u"].fee_n, Some(3));
    // Each fee's metadata names the executions it is for, as AutoGPT's does: the threshold
    // in force (2, 2, 4), not the day's running count (2, 4, 8).
    let fee_rows: Vec<_> = ledger
        .transactions
        .iter()
        .filter(|t| t.transaction_key.starts_with("EXECUTION-FEE-"))
        .map(|t| {
            (
                t.metadata["input"]["execution_count"].clone(),
                t.metadata["reason"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        fee_rows,
        [(2, 2), (2, 4), (4, 8)].map(|(n, x)| (
            serde_json::json!(n),
            format!("Execution Cost for {n} blocks of ex_id:ge-x{x} g_id:g")
        ))
    );
    // A new day starts from 1 again.
    let tomorrow = now() + chrono::Duration::days(1);
    let more: Vec<_> = (9..=12).map(|i| entry("u", &format!("x{i}"), 0)).collect();
    ledger.decide(&pricing(4), &more, tomorrow);
    assert_eq!(
        ledger
            .transactions
            .last()
            .map(|t| t.transaction_key.as_str()),
        Some("EXECUTION-FEE-u-2026-11-26-1")
    );
}

/// A replica whose clock lags behind midnight counts on the day already begun: the day
/// before is not counted again from 1, which would re-issue its fees' keys.
#[test]
fn an_execution_stamped_before_the_counted_day_counts_on_that_day() {
    let mut ledger = MemoryLedger::default();
    let tomorrow = now() + chrono::Duration::days(1);
    let today: Vec<_> = (1..=2).map(|i| entry("u", &format!("t{i}"), 0)).collect();
    let next: Vec<_> = (1..=2).map(|i| entry("u", &format!("n{i}"), 0)).collect();
    ledger.decide(&pricing(1), &today, now());
    ledger.decide(&pricing(1), &next[..1], tomorrow);
    // Stamped a moment before midnight by a lagging clock, after the new day began.
    let lagging = ledger.decide(&pricing(1), &next[1..], now());
    assert!(
        matches!(lagging[0], Verdict::Decided { fee: 1, .. }),
        "{lagging:?}"
    );
    let fees = fee_keys(&ledger);
    assert_eq!(
        fees,
        [
            "EXECUTION-FEE-u-2026-11-25-1",
            "EXECUTION-FEE-u-2026-11-25-2",
            "EXECUTION-FEE-u-2026-11-26-1",
            "EXECUTION-FEE-u-2026-11-26-2"
        ]
    );
    let u = &ledger.accounts["u"];
    assert_eq!((u.fee_day, u.fee_count), (Some(tomorrow.date_naive()), 2));
}

/// A balance row from before fees were counted (`fee_n` NULL) continues from
/// `fee_count / every`, the ordinals its fees took.
#[test]
fn a_row_without_a_fee_count_continues_from_its_executions() {
    let mut ledger = MemoryLedger::default();
    let mut account = crate::ledger::Account::new("u".into());
    account.balance = 1000;
    account.refill_month = Some(chrono::NaiveDate::from_ymd_opt(2026, 11, 1).unwrap());
    account.fee_day = Some(now().date_naive());
    account.fee_count = 5;
    ledger.accounts.insert("u".into(), account);
    ledger.decide(&pricing(3), &[entry("u", "y6", 0)], now());
    assert_eq!(
        ledger
            .transactions
            .last()
            .map(|t| t.transaction_key.as_str()),
        Some("EXECUTION-FEE-u-2026-11-25-2")
    );
    assert_eq!(ledger.accounts["u"].fee_n, Some(2));
}

// ---- boundaries of funds, debt and thresholds -------------------------------------------------

/// A user with `balance`, already refilled this month (so no refill tops it up first).
fn holding(balance: i64) -> MemoryLedger {
    let mut l = MemoryLedger::default();
    let mut a = crate::ledger::Account::new("u".into());
    a.balance = balance;
    a.refill_month = chrono::NaiveDate::from_ymd_opt(2026, 11, 1);
    l.accounts.insert("u".into(), a);
    l
}

fn events_of<'a>(l: &'a MemoryLedger, routing_key: &str) -> Vec<&'a crate::events::NewEvent> {
    l.events
        .iter()
        .filter(|e| e.routing_key == routing_key)
        .collect()
}

#[test]
fn a_rejected_starts_completion_in_the_same_batch_owes_its_whole_price() {
    let p = settle_pricing(true);
    let mut l = MemoryLedger::default();
    // $1.50 of search on a 1-credit estimate: 150 owed, 149 more, a debt of 50.
    l.decide(&p, &[run("u", "s", "search", None)], now());
    let usd = Some(json!({"provider_cost": 1.5, "provider_cost_type": "cost_usd"}));
    l.decide(&p, &[run("u", "s", "search", usd)], now());
    assert_eq!(l.accounts["u"].balance, -50);
    // The start is refused (nothing was taken), so its completion owes all 24.
    let v = l.decide(
        &p,
        &[
            run("u", "t", "llm", None),
            run("u", "t", "llm", tokens(10_000, 2_000)),
        ],
        now(),
    );
    assert!(is_rejected(&v[0]), "{v:?}");
    assert_eq!(
        v[1],
        Verdict::Settled {
            pre: 0,
            post: 24,
            delta: 24,
            uncollected: 0,
            balance: -74
        }
    );
}

#[test]
fn a_balance_that_covers_the_cost_but_not_the_fee_is_rejected() {
    let p = pricing(1);
    let mut l = holding(10);
    let v = l.decide(&p, &[entry("u", "x", 0)], now());
    assert!(is_rejected(&v[0]), "{v:?}");
    assert_eq!(l.accounts["u"].balance, 10);
    let rejected = events_of(&l, crate::events::CHARGE_REJECTED);
    assert_eq!(rejected.len(), 1);
    assert_eq!(rejected[0].json()["cost"], 11);
}

#[test]
fn a_balance_exactly_at_the_auto_top_up_threshold_requests_nothing() {
    let p = pricing(0);
    let mut l = with_auto_top_up(&p, 980, 500);
    // 990 ⇒ 980: at the threshold, not below it.
    l.decide(&p, &[entry("u", "b", 0)], now());
    assert_eq!(requests(&l), vec![]);
    l.decide(&p, &[entry("u", "c", 0)], now());
    assert_eq!(requests(&l), vec![("AUTO-TOP-UP-u-1".into(), 970)]);
}

#[test]
fn without_debt_an_extra_charge_on_a_debt_already_there_moves_nothing() {
    let p = settle_pricing(false);
    let mut l = MemoryLedger::default();
    l.decide(&p, &[run("u", "a", "llm", None)], now());
    // A debt left from when debt was allowed.
    l.accounts.get_mut("u").unwrap().balance = -50;
    let v = l.decide(&p, &[run("u", "a", "llm", tokens(10_000, 2_000))], now());
    assert_eq!(
        v,
        vec![Verdict::Settled {
            pre: 10,
            post: 24,
            delta: 14,
            uncollected: 14,
            balance: -50
        }]
    );
    assert!(!l
        .transactions
        .iter()
        .any(|t| t.transaction_key == "SETTLE-a"));
}

#[test]
fn without_debt_a_completion_first_on_a_debt_takes_nothing() {
    let p = settle_pricing(false);
    let mut l = MemoryLedger::default();
    l.decide(&p, &[run("u", "z", "llm", None)], now());
    l.accounts.get_mut("u").unwrap().balance = -50;
    let v = l.decide(&p, &[run("u", "a", "llm", tokens(10_000, 2_000))], now());
    assert!(
        matches!(
            v[0],
            Verdict::Decided {
                outcome: Outcome::Free,
                cost: 0,
                fee: 0,
                uncollected: 24,
                balance: -50
            }
        ),
        "{v:?}"
    );
    let s = &l.settlements["a"];
    assert_eq!((s.pre, s.uncollected), (0, 24));
}

#[test]
fn a_completion_without_stats_counts_them_as_zero() {
    let p = settle_pricing(true);
    let mut l = MemoryLedger::default();
    l.decide(&p, &[run("u", "a", "llm", None)], now());
    let mut done = run("u", "a", "llm", None);
    done.phase = crate::message::Phase::Completed;
    let v = l.decide(&p, &[done], now());
    assert_eq!(
        v,
        vec![Verdict::Settled {
            pre: 10,
            post: 0,
            delta: -10,
            uncollected: 0,
            balance: 100
        }]
    );
}

#[test]
fn a_fee_alone_that_crosses_the_low_balance_threshold_reports_it() {
    let p = pricing(1);
    let mut l = holding(100);
    // The user's own key: the run is free, the fee of 1 takes 100 ⇒ 99.
    l.decide(&p, &[entry("u", "f", 1)], now());
    assert_eq!(l.accounts["u"].balance, 99);
    let low = events_of(&l, crate::events::BALANCE_LOW);
    assert_eq!(low.len(), 1);
    assert_eq!(low[0].event_id, "balance.low:u:1");
}

#[test]
fn a_fee_of_zero_posts_no_fee_row() {
    let mut p = pricing(1);
    p.fee.amount = 0;
    let mut l = MemoryLedger::default();
    let v = l.decide(&p, &[entry("u", "a", 0), entry("u", "b", 1)], now());
    assert!(
        v.iter()
            .all(|v| matches!(v, Verdict::Decided { fee: 0, .. })),
        "{v:?}"
    );
    assert_eq!(fee_keys(&l), Vec::<&str>::new());
    // The refill to 1000, then gpt-4-turbo's 10: the own-key run costs nothing.
    assert_eq!(l.accounts["u"].balance, 990);
}
