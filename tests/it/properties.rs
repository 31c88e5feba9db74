//! Property tests: random sequences of ledger operations against an in-memory model (real
//! PostgreSQL), and a large corpus of arbitrary message bodies through decode + price.

use std::collections::HashMap;

use chrono::{TimeZone, Utc};
use credit_worker::cost::CostTable;
use credit_worker::ledger::{LedgerError, TxType};
use proptest::prelude::*;
use serde_json::json;

use crate::helpers::*;

#[derive(Debug, Clone)]
enum Op {
    Credit { user: u8, amount: i64, key: u8 },
    Spend { user: u8, amount: i64, key: u8 },
    Balance { user: u8 },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0u8..3, 1i64..800, 0u8..6).prop_map(|(user, amount, key)| Op::Credit {
            user,
            amount,
            key
        }),
        (0u8..3, 1i64..600, 0u8..6).prop_map(|(user, amount, key)| Op::Spend { user, amount, key }),
        (0u8..3).prop_map(|user| Op::Balance { user }),
    ]
}

/// What the ledger should hold for one user.
#[derive(Debug, Default)]
struct Model {
    balance: i64,
    seq: i64,
    /// Each key's posting: its type and signed amount.
    keys: HashMap<String, (&'static str, i64)>,
    touched: bool,
}

impl Model {
    /// Lazy refill on the first operation of the month: a new user starts at the target.
    fn touch(&mut self) {
        if !self.touched {
            self.touched = true;
            self.balance = 1000;
            self.seq = 1;
            self.keys
                .insert("MONTHLY-CREDIT-TOP-UP-2026-11".into(), ("GRANT", 1000));
        }
    }
}

#[test]
fn ledger_matches_an_in_memory_model() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let env = rt.block_on(TestEnv::new());
    let now = Utc.with_ymd_and_hms(2026, 11, 15, 9, 0, 0).unwrap();
    let case = std::sync::atomic::AtomicU32::new(0);
    let config = ProptestConfig {
        cases: 24,
        ..ProptestConfig::default()
    };
    proptest!(config, |(ops in proptest::collection::vec(op(), 1..30))| {
        let c = case.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let ledger = env.ledger();
        let mut model: HashMap<u8, Model> = HashMap::new();
        let name = |u: u8| format!("case{c}-user{u}");
        for op in &ops {
            match *op {
                Op::Credit { user, amount, key } => {
                    let m = model.entry(user).or_default();
                    m.touch();
                    let key = format!("K{key}");
                    let r = rt.block_on(ledger.credit(TxType::TopUp, &name(user), amount, Some(&key), None, now));
                    match m.keys.get(&key) {
                        // A key names one posting: the same again is not applied, another refused.
                        Some(&posting) if posting == ("TOP_UP", amount) => {
                            let p = r.unwrap();
                            prop_assert!(!p.applied);
                            prop_assert_eq!(p.balance, m.balance);
                        }
                        Some(_) => {
                            let refused = matches!(r, Err(LedgerError::InvalidArgument { field: "key", .. }));
                            prop_assert!(refused);
                        }
                        None => {
                            m.keys.insert(key, ("TOP_UP", amount));
                            m.balance += amount;
                            m.seq += 1;
                            let p = r.unwrap();
                            prop_assert!(p.applied);
                            prop_assert_eq!(p.balance, m.balance);
                        }
                    }
                }
                Op::Spend { user, amount, key } => {
                    let m = model.entry(user).or_default();
                    m.touch();
                    let key = format!("K{key}");
                    let r = rt.block_on(ledger.spend(&name(user), amount, &key, json!({}), now));
                    if let Some(&posting) = m.keys.get(&key) {
                        if posting == ("USAGE", -amount) {
                            prop_assert!(!r.unwrap().applied);
                        } else {
                            let refused = matches!(r, Err(LedgerError::InvalidArgument { field: "key", .. }));
                            prop_assert!(refused);
                        }
                    } else if amount > m.balance {
                        let insufficient = matches!(r, Err(LedgerError::InsufficientBalance { .. }));
                        prop_assert!(insufficient);
                    } else {
                        m.keys.insert(key, ("USAGE", -amount));
                        m.balance -= amount;
                        m.seq += 1;
                        let p = r.unwrap();
                        prop_assert!(p.applied);
                        prop_assert_eq!(p.balance, m.balance);
                    }
                }
                Op::Balance { user } => {
                    let m = model.entry(user).or_default();
                    m.touch();
                    prop_assert_eq!(rt.block_on(ledger.balance(&name(user), now)).unwrap(), m.balance);
                }
            }
        }
        for (user, m) in &model {
            let (balance, last_seq): (i64, i64) = rt.block_on(
                sqlx::query_as("SELECT balance, last_seq FROM credit.balances WHERE user_id = $1")
                    .bind(name(*user))
                    .fetch_one(&env.pool),
            ).unwrap();
            prop_assert_eq!(balance, m.balance);
            prop_assert_eq!(last_seq, m.seq);
            prop_assert!(balance >= 0);
        }
    });
    rt.block_on(env.assert_audit_clean());
    rt.block_on(env.cleanup());
}

/// 100,000 bodies: mutations of a valid entry (byte flips, truncations, splices) and random
/// JSON documents. Each decodes to an entry that prices, or to an error naming its field.
#[test]
fn arbitrary_bodies_never_panic_and_always_get_a_verdict() {
    let n: usize = std::env::var("CREDIT_WORKER_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let table = CostTable::builtin().unwrap();
    let valid = body(&platform_gpt4("fuzz-user", "fuzz-ne"));
    let fields = [
        "user_id",
        "graph_exec_id",
        "graph_id",
        "node_exec_id",
        "node_id",
        "block_id",
        "inputs",
        "stats",
        "graph_version",
        "execution_context",
    ];
    let values = [
        "null",
        "0",
        "-1",
        "1e400",
        "\"\"",
        "\"x\"",
        "[]",
        "{}",
        "true",
        "{\"walltime\":-1}",
        "{\"walltime\":1e308,\"input_size\":1e308}",
        "\"\\u0000\"",
        "18446744073709551616",
    ];
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let (mut decided, mut errors) = (0usize, 0usize);
    for i in 0..n {
        let bytes: Vec<u8> = match i % 4 {
            0 => {
                let mut b = valid.clone();
                for _ in 0..(next() % 4 + 1) {
                    let at = (next() as usize) % b.len();
                    b[at] = next() as u8;
                }
                b
            }
            1 => valid[..(next() as usize) % valid.len()].to_vec(),
            2 => {
                let mut v = platform_gpt4("fuzz-user", &format!("ne-{i}"));
                let f = fields[(next() as usize) % fields.len()];
                let val = values[(next() as usize) % values.len()];
                v[f] = serde_json::from_str(val).unwrap_or(serde_json::Value::Null);
                if next() % 3 == 0 {
                    v.as_object_mut()
                        .unwrap()
                        .remove(fields[(next() as usize) % fields.len()]);
                }
                serde_json::to_vec(&v).unwrap()
            }
            _ => (0..(next() % 64)).map(|_| next() as u8).collect(),
        };
        match credit_worker::message::decode(&bytes) {
            Ok(e) => match table.price(&e.block_id, &e.inputs, e.stats.as_ref()) {
                Ok(p) => {
                    assert!(p.cost >= 0);
                    decided += 1;
                }
                Err(err) => {
                    assert!(!err.to_string().is_empty());
                    errors += 1;
                }
            },
            Err(err) => {
                assert!(!err.field().is_empty(), "{err}");
                assert!(err.to_string().starts_with(err.field()), "{err}");
                errors += 1;
            }
        }
    }
    // The corpus is the same every run: its split is known, and tells that it reaches the
    // pricing path.
    if n == 100_000 {
        assert_eq!((decided, errors), (5298, 94702));
    }
    assert!(
        decided > 0 && errors > 0,
        "{decided} decided, {errors} errors"
    );
}

/// 100,000 control command bodies: each parses into a command or a `bad_request` /
/// `amount_out_of_range` error with a message; nothing panics.
#[test]
fn arbitrary_control_commands_never_panic() {
    use credit_worker::control::Command;
    let n: usize = std::env::var("CREDIT_WORKER_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let commands = [
        "refill", "top_up", "grant", "balance", "history", "outcome", "nope", "",
    ];
    let fields = [
        "user_id",
        "amount",
        "key",
        "reason",
        "month",
        "limit",
        "node_exec_id",
        "command",
    ];
    let values = [
        "null",
        "0",
        "-1",
        "1",
        "5.0",
        "1.5",
        "1e30",
        "99999999999999999999",
        "\"\"",
        "\"u1\"",
        "\"2026-13\"",
        "\"2026-12\"",
        "[]",
        "{}",
        "true",
        "9223372036854775807",
    ];
    let mut state: u64 = 0xD1B5_4A32_D192_ED03;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let (mut parsed, mut refused) = (0usize, 0usize);
    for i in 0..n {
        let bytes: Vec<u8> = if i % 5 == 4 {
            (0..(next() % 48)).map(|_| next() as u8).collect()
        } else {
            let mut obj = serde_json::Map::new();
            obj.insert(
                "command".into(),
                commands[(next() as usize) % commands.len()].into(),
            );
            for _ in 0..(next() % 5) {
                let f = fields[(next() as usize) % fields.len()];
                let v = values[(next() as usize) % values.len()];
                obj.insert(
                    f.into(),
                    serde_json::from_str(v).unwrap_or(serde_json::Value::Null),
                );
            }
            serde_json::to_vec(&obj).unwrap()
        };
        match Command::parse(&bytes) {
            Ok(_) => parsed += 1,
            Err(e) => {
                assert!(
                    matches!(e.code(), "bad_request" | "amount_out_of_range"),
                    "{}",
                    e.code()
                );
                assert!(!e.to_string().is_empty());
                refused += 1;
            }
        }
    }
    // The corpus is the same every run: its split is known, and tells that it reaches
    // valid commands.
    if n == 100_000 {
        assert_eq!((parsed, refused), (6328, 93672));
    }
    assert!(
        parsed > 0 && refused > 0,
        "{parsed} parsed, {refused} refused"
    );
}
