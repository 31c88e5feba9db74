//! The ledger against the real PostgreSQL: AutoGPT's credit_test.py cases with their numbers,
//! its concurrency cases adapted to our semantics, overflow, idempotency and the sweep.

use chrono::{DateTime, Datelike, TimeZone, Utc};
use credit_worker::cost::CostTable;
use credit_worker::decide::{self, Outcome, Verdict};
use credit_worker::ledger::{HistoryQuery, LedgerError, TxType};
use credit_worker::message;
use credit_worker::refill::{self, Month};
use serde_json::json;
use std::time::Duration;

use crate::fixtures::*;
use crate::helpers::*;

fn at(y: i32, m: u32, d: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(y, m, d, 12, 0, 0).unwrap()
}

async fn spend_entry(env: &TestEnv, v: serde_json::Value, now: DateTime<Utc>) -> Verdict {
    let pricing = env.settings.pricing(CostTable::builtin().unwrap());
    let e = message::decode(&body(&v)).unwrap();
    let mut out = decide::decide_batch(&env.pool, &pricing, &[e], now)
        .await
        .unwrap();
    out.pop().unwrap()
}

#[tokio::test]
async fn block_credit_usage_platform_key_costs_10_own_key_is_free() {
    let env = TestEnv::new().await;
    let ledger = env.ledger();
    let now = Utc::now();
    let u = "usage-user";
    ledger
        .credit(TxType::TopUp, u, 100, Some("TOPUP-1"), None, now)
        .await
        .unwrap();
    let current = ledger.balance(u, now).await.unwrap();
    assert_eq!(current, 1100, "refill 1000 on first use, then +100");

    let v1 = spend_entry(&env, platform_gpt4(u, "test_node_exec"), now).await;
    assert_eq!(
        v1,
        Verdict::Decided {
            outcome: Outcome::Charged,
            cost: 10,
            fee: 0,
            uncollected: 0,
            balance: 1090
        }
    );
    // AutoGPT reuses the node_exec_id here; ours would be a duplicate, so it gets its own.
    let v2 = spend_entry(&env, own_key(u, "test_node_exec_2"), now).await;
    assert_eq!(
        v2,
        Verdict::Decided {
            outcome: Outcome::Free,
            cost: 0,
            fee: 0,
            uncollected: 0,
            balance: 1090
        }
    );
    assert_eq!(ledger.balance(u, now).await.unwrap(), current - 10);
    let usage = env
        .scalar_i64("SELECT count(*) FROM credit.transactions WHERE type = 'USAGE'")
        .await;
    assert_eq!(usage, 1);
    let meta: serde_json::Value = sqlx::query_scalar(
        "SELECT metadata FROM credit.transactions WHERE transaction_key = 'USAGE-test_node_exec'",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!(
        meta["input"],
        json!({"model": "gpt-4-turbo", "credentials": {"id": OPENAI_CRED, "provider": "openai", "type": "api_key"}})
    );
    assert_eq!(meta["block"], "AITextGeneratorBlock");
    env.assert_audit_clean().await;
    env.cleanup().await;
}

#[tokio::test]
async fn block_credit_top_up_adds_100() {
    let env = TestEnv::new().await;
    let ledger = env.ledger();
    let now = Utc::now();
    let before = ledger.balance("topup-user", now).await.unwrap();
    let p = ledger
        .credit(TxType::TopUp, "topup-user", 100, None, None, now)
        .await
        .unwrap();
    assert!(p.applied);
    assert_eq!(p.balance, before + 100);
    assert_eq!(ledger.balance("topup-user", now).await.unwrap(), 1100);
    env.assert_audit_clean().await;
    env.cleanup().await;
}

#[tokio::test]
async fn block_credit_reset_across_three_months() {
    let env = TestEnv::new().await;
    let ledger = env.ledger();
    let u = "reset-user";
    let (m1, m2, m3) = (at(2026, 1, 1), at(2026, 2, 1), at(2026, 3, 1));

    assert_eq!(ledger.balance(u, m1).await.unwrap(), 1000);
    let p = ledger
        .credit(TxType::TopUp, u, 100, Some("TOPUP-M1"), None, m1)
        .await
        .unwrap();
    assert_eq!(p.balance, 1100);

    let rows_before = env
        .scalar_i64("SELECT count(*) FROM credit.transactions")
        .await;
    assert_eq!(ledger.balance(u, m2).await.unwrap(), 1100);
    let rows_after = env
        .scalar_i64("SELECT count(*) FROM credit.transactions")
        .await;
    assert_eq!(rows_before, rows_after, "no refill row at or above target");

    // Forced to 400 through the ledger (AutoGPT writes rows by hand; we spend 700).
    let p = ledger
        .spend(u, 700, "FORCE-400", json!({"reason": "test"}), m2)
        .await
        .unwrap();
    assert_eq!(p.balance, 400);

    assert_eq!(ledger.balance(u, m3).await.unwrap(), 1000);
    let grants: Vec<(String, i64)> = sqlx::query_as(
        "SELECT transaction_key, amount FROM credit.transactions
          WHERE user_id = $1 AND type = 'GRANT' AND transaction_key LIKE 'MONTHLY-CREDIT-TOP-UP-%'
          ORDER BY seq",
    )
    .bind(u)
    .fetch_all(&env.pool)
    .await
    .unwrap();
    assert_eq!(
        grants,
        vec![
            ("MONTHLY-CREDIT-TOP-UP-2026-01".to_owned(), 1000),
            ("MONTHLY-CREDIT-TOP-UP-2026-03".to_owned(), 600)
        ]
    );
    // Once per month: more operations in March grant nothing more.
    ledger
        .spend(u, 500, "MAR-SPEND", json!({}), m3)
        .await
        .unwrap();
    assert_eq!(ledger.balance(u, m3).await.unwrap(), 500);
    env.assert_audit_clean().await;
    env.cleanup().await;
}

#[tokio::test]
async fn credit_refill_new_user_starts_at_target() {
    let env = TestEnv::new().await;
    assert_eq!(
        env.ledger().balance("brand-new", Utc::now()).await.unwrap(),
        1000
    );
    let h = env
        .ledger()
        .history("brand-new", &HistoryQuery::newest(10), Utc::now())
        .await
        .unwrap()
        .transactions;
    assert_eq!(h.len(), 1);
    assert_eq!(
        (h[0].tx_type.as_str(), h[0].amount, h[0].seq),
        ("GRANT", 1000, 1)
    );
    env.cleanup().await;
}

async fn concurrent_spends(env: &TestEnv, user: &str, amounts: &[i64]) -> (usize, usize) {
    let mut tasks = Vec::new();
    for (i, &a) in amounts.iter().enumerate() {
        let ledger = env.ledger();
        let user = user.to_owned();
        tasks.push(tokio::spawn(async move {
            ledger
                .spend(&user, a, &format!("SPEND-{i}"), json!({}), Utc::now())
                .await
        }));
    }
    let (mut ok, mut insufficient) = (0, 0);
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => ok += 1,
            Err(LedgerError::InsufficientBalance { .. }) => insufficient += 1,
            Err(e) => panic!("unexpected error: {e}"),
        }
    }
    (ok, insufficient)
}

#[tokio::test]
async fn concurrent_spends_never_overdraw() {
    let env = TestEnv::with(no_refill).await;
    seed(&env, ["c500"], 500).await;
    assert_eq!(concurrent_spends(&env, "c500", &[100; 10]).await, (5, 5));
    assert_eq!(env.ledger().balance("c500", Utc::now()).await.unwrap(), 0);

    seed(&env, ["c1000"], 1000).await;
    assert_eq!(concurrent_spends(&env, "c1000", &[100; 10]).await, (10, 0));
    assert_eq!(env.ledger().balance("c1000", Utc::now()).await.unwrap(), 0);

    seed(&env, ["c100"], 100).await;
    assert_eq!(concurrent_spends(&env, "c100", &[100, 100]).await, (1, 1));

    seed(&env, ["c150"], 150).await;
    assert_eq!(concurrent_spends(&env, "c150", &[10, 20, 30]).await, (3, 0));
    assert_eq!(env.ledger().balance("c150", Utc::now()).await.unwrap(), 90);
    let running: Vec<i64> = sqlx::query_scalar(
        "SELECT running_balance FROM credit.transactions WHERE user_id = 'c150' AND type = 'USAGE'",
    )
    .fetch_all(&env.pool)
    .await
    .unwrap();
    assert!(
        running.iter().all(|r| (90..=140).contains(r)),
        "{running:?}"
    );
    assert_eq!(running.iter().min(), Some(&90));

    seed(&env, ["c60"], 60).await;
    assert_eq!(concurrent_spends(&env, "c60", &[10, 20, 30]).await, (3, 0));
    assert_eq!(env.ledger().balance("c60", Utc::now()).await.unwrap(), 0);
    env.assert_audit_clean().await;
    env.cleanup().await;
}

#[tokio::test]
async fn mixed_spends_top_ups_and_reads_end_exact() {
    let env = TestEnv::with(no_refill).await;
    seed(&env, ["mixed"], 1000).await;
    let mut tasks = Vec::new();
    for i in 0..5 {
        let l = env.ledger();
        tasks.push(tokio::spawn(async move {
            l.spend("mixed", 100, &format!("S{i}"), json!({}), Utc::now())
                .await
                .map(|p| p.balance)
        }));
    }
    for i in 0..3 {
        let l = env.ledger();
        tasks.push(tokio::spawn(async move {
            l.credit(
                TxType::TopUp,
                "mixed",
                200,
                Some(&format!("T{i}")),
                None,
                Utc::now(),
            )
            .await
            .map(|p| p.balance)
        }));
    }
    for _ in 0..10 {
        let l = env.ledger();
        tasks.push(tokio::spawn(
            async move { l.balance("mixed", Utc::now()).await },
        ));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    assert_eq!(
        env.ledger().balance("mixed", Utc::now()).await.unwrap(),
        1100
    );
    env.assert_audit_clean().await;
    env.cleanup().await;
}

#[tokio::test]
async fn stress_random_spends_sum_exactly() {
    let env = TestEnv::with(no_refill).await;
    seed(&env, ["stress"], 10_000).await;
    // Deterministic pseudo-random amounts 1..=50.
    let amounts: Vec<i64> = (0..100u64)
        .map(|i| ((i.wrapping_mul(2654435761) >> 7) % 50 + 1) as i64)
        .collect();
    let mut tasks = Vec::new();
    for (i, &a) in amounts.iter().enumerate() {
        let l = env.ledger();
        tasks.push(tokio::spawn(async move {
            if i % 3 == 0 {
                l.balance("stress", Utc::now()).await.map(|_| 0)
            } else {
                l.spend("stress", a, &format!("R{i}"), json!({}), Utc::now())
                    .await
                    .map(|_| a)
            }
        }));
    }
    let mut spent = 0;
    for t in tasks {
        spent += t.await.unwrap().unwrap();
    }
    let final_balance = env.ledger().balance("stress", Utc::now()).await.unwrap();
    assert_eq!(final_balance, 10_000 - spent);
    assert!(final_balance >= 0);
    env.assert_audit_clean().await;
    env.cleanup().await;
}

#[tokio::test]
async fn concurrent_identical_grants_apply_once() {
    let env = TestEnv::with(no_refill).await;
    let mut tasks = Vec::new();
    for _ in 0..5 {
        let l = env.ledger();
        tasks.push(tokio::spawn(async move {
            l.credit(
                TxType::Grant,
                "reward",
                500,
                Some("REWARD-reward-WELCOME"),
                None,
                Utc::now(),
            )
            .await
        }));
    }
    let mut applied = 0;
    for t in tasks {
        let p = t.await.unwrap().unwrap();
        assert_eq!(p.balance, 500);
        applied += usize::from(p.applied);
    }
    assert_eq!(applied, 1);
    assert_eq!(
        env.scalar_i64("SELECT count(*) FROM credit.transactions WHERE transaction_key = 'REWARD-reward-WELCOME'")
            .await,
        1
    );
    env.assert_audit_clean().await;
    env.cleanup().await;
}

#[tokio::test]
async fn first_writes_of_a_new_user_do_not_race() {
    // AutoGPT #11158: the first transaction of a new user lost its amount.
    let env = TestEnv::with(no_refill).await;
    let mut tasks = Vec::new();
    for i in 0..10 {
        let l = env.ledger();
        tasks.push(tokio::spawn(async move {
            l.credit(
                TxType::TopUp,
                "fresh",
                10,
                Some(&format!("F{i}")),
                None,
                Utc::now(),
            )
            .await
        }));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    assert_eq!(
        env.ledger().balance("fresh", Utc::now()).await.unwrap(),
        100
    );
    assert_eq!(
        env.scalar_i64("SELECT last_seq FROM credit.balances WHERE user_id = 'fresh'")
            .await,
        10
    );
    env.assert_audit_clean().await;
    env.cleanup().await;
}

#[tokio::test]
async fn overflow_is_refused_and_changes_nothing() {
    let env = TestEnv::with(no_refill).await;
    let l = env.ledger();
    l.credit(
        TxType::TopUp,
        "rich",
        i64::MAX - 100,
        Some("BIG"),
        None,
        Utc::now(),
    )
    .await
    .unwrap();
    let err = l
        .credit(TxType::TopUp, "rich", 200, Some("MORE"), None, Utc::now())
        .await
        .unwrap_err();
    assert!(matches!(err, LedgerError::Overflow { .. }), "{err}");
    assert!(err.to_string().starts_with("amount:"), "{err}");
    assert_eq!(l.balance("rich", Utc::now()).await.unwrap(), i64::MAX - 100);
    assert_eq!(
        env.scalar_i64("SELECT count(*) FROM credit.transactions")
            .await,
        1
    );
    for bad in [0, -5] {
        let e = l
            .credit(TxType::Grant, "rich", bad, None, None, Utc::now())
            .await
            .unwrap_err();
        assert!(matches!(e, LedgerError::AmountOutOfRange(_)), "{e}");
    }
    env.assert_audit_clean().await;
    env.cleanup().await;
}

/// A date or time the worker could not read back (±infinity, a year past 9999), which only a
/// write by hand can store, is refused at the write (migration 0020).
#[tokio::test]
async fn times_the_worker_cannot_read_back_are_refused_at_the_write() {
    let env = TestEnv::with(no_refill).await;
    let l = env.ledger();
    l.credit(TxType::TopUp, "u", 10, Some("k"), None, Utc::now())
        .await
        .unwrap();
    for (sql, constraint) in [
        (
            "UPDATE credit.balances SET refill_month = 'infinity'",
            "balances_times_bounded",
        ),
        (
            "UPDATE credit.balances SET fee_day = '10000-01-01'",
            "balances_times_bounded",
        ),
        (
            "UPDATE credit.balances SET auto_requested_at = '-infinity'",
            "balances_times_bounded",
        ),
        (
            "INSERT INTO credit.transactions
                 (user_id, seq, transaction_key, type, amount, running_balance, created_at)
             VALUES ('u', 2, 'k2', 'TOP_UP', 1, 11, 'infinity')",
            "transactions_created_at_bounded",
        ),
        (
            "INSERT INTO credit.outbox (event_id, routing_key, events, payload, created_at)
             VALUES ('e', 'balance.changed', 1, '{}', '10000-01-01 00:00:00+00')",
            "outbox_created_at_bounded",
        ),
    ] {
        let err = sqlx::query(sql).execute(&env.pool).await.unwrap_err();
        let refused_by = err.as_database_error().and_then(|e| e.constraint());
        assert_eq!(refused_by, Some(constraint), "{sql}: {err}");
    }
    assert_eq!(l.balance("u", Utc::now()).await.unwrap(), 10);
    env.assert_audit_clean().await;
    env.cleanup().await;
}

/// An account a build before migration 0020 left with a year-0 refill month (its
/// `sweep --month 0000-01`) could not be written once 0020's check applied; migration 0021
/// moves such values to the nearest bound, after which the account takes credits and its
/// refills as before.
#[tokio::test]
async fn an_account_left_out_of_bounds_by_an_old_build_is_written_again() {
    let env = TestEnv::with(no_refill).await;
    let l = env.ledger();
    l.credit(TxType::TopUp, "old", 10, Some("k1"), None, Utc::now())
        .await
        .unwrap();
    // The row as an old build wrote it, before 0020's check existed.
    let old_row = [
        "ALTER TABLE credit.balances DROP CONSTRAINT balances_times_bounded",
        "UPDATE credit.balances SET refill_month = '0001-01-01 BC' WHERE user_id = 'old'",
        "ALTER TABLE credit.balances ADD CONSTRAINT balances_times_bounded CHECK (
                 refill_month BETWEEN '0001-01-01' AND '9999-12-01'
             AND fee_day BETWEEN '0001-01-01' AND '9999-12-31'
             AND auto_requested_at BETWEEN '0001-01-01 00:00:00+00' AND '9999-12-31 23:59:59+00')
         NOT VALID",
    ];
    for sql in old_row {
        sqlx::query(sql).execute(&env.pool).await.expect(sql);
    }
    let refused = l.credit(TxType::TopUp, "old", 5, Some("k2"), None, Utc::now());
    assert!(refused.await.is_err(), "written before 0021");

    let migration = include_str!("../../migrations/0021_account_times_in_bounds.sql");
    let moved = sqlx::query(migration).execute(&env.pool).await.unwrap();
    assert_eq!(moved.rows_affected(), 1);
    // Only the value out of bounds moves; the nulls stay null.
    let row: (String, Option<String>, Option<String>) = sqlx::query_as(
        "SELECT refill_month::text, fee_day::text, auto_requested_at::text
           FROM credit.balances WHERE user_id = 'old'",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!(row, ("0001-01-01".into(), None, None));
    let credited = l
        .credit(TxType::TopUp, "old", 5, Some("k2"), None, Utc::now())
        .await
        .unwrap();
    assert_eq!(credited.balance, 15);
    sqlx::query("ALTER TABLE credit.balances VALIDATE CONSTRAINT balances_times_bounded")
        .execute(&env.pool)
        .await
        .expect("every row within the bounds");
    env.assert_audit_clean().await;
    env.cleanup().await;
}

#[tokio::test]
async fn same_key_again_is_not_applied() {
    let env = TestEnv::new().await;
    let l = env.ledger();
    let now = Utc::now();
    let a = l
        .credit(TxType::TopUp, "idem", 250, Some("pi_123"), None, now)
        .await
        .unwrap();
    let b = l
        .credit(TxType::TopUp, "idem", 250, Some("pi_123"), None, now)
        .await
        .unwrap();
    assert!(a.applied && !b.applied);
    assert_eq!((a.balance, b.balance), (1250, 1250));
    // The key names that top-up: another amount or type under it is refused.
    for (tx_type, amount) in [(TxType::TopUp, 251), (TxType::Grant, 250)] {
        let e = l
            .credit(tx_type, "idem", amount, Some("pi_123"), None, now)
            .await
            .unwrap_err();
        assert!(
            matches!(e, LedgerError::InvalidArgument { field: "key", .. }),
            "{e}"
        );
    }
    assert_eq!(l.balance("idem", now).await.unwrap(), 1250);
    let e = l
        .spend("idem", 5000, "too-much", json!({}), now)
        .await
        .unwrap_err();
    assert!(matches!(
        e,
        LedgerError::InsufficientBalance {
            balance: 1250,
            needed: 5000,
            ..
        }
    ));
    env.assert_audit_clean().await;
    env.cleanup().await;
}

#[tokio::test]
async fn sweep_refills_each_user_once_even_when_run_twice_at_once() {
    let _sweeps = SWEEPS.share().await;
    let env = TestEnv::with(|s| s.refill.lazy = false).await;
    let l = env.ledger();
    let now = Utc::now();
    // Users below, at and above the target; lazy refill off so they keep these balances.
    for (i, bal) in [0i64, 400, 999, 1000, 1100].iter().enumerate() {
        let u = format!("sw{i}");
        if *bal > 0 {
            l.credit(TxType::TopUp, &u, *bal, Some("SEED"), None, now)
                .await
                .unwrap();
        } else {
            l.balance(&u, now).await.unwrap();
            sqlx::query("INSERT INTO credit.balances (user_id) VALUES ($1) ON CONFLICT DO NOTHING")
                .bind(&u)
                .execute(&env.pool)
                .await
                .unwrap();
        }
    }
    for i in 0..200 {
        sqlx::query("INSERT INTO credit.balances (user_id) VALUES ($1)")
            .bind(format!("bulk{i:04}"))
            .execute(&env.pool)
            .await
            .unwrap();
    }
    let policy = credit_worker::ledger::RefillPolicy { target: 1000 };
    let month: Month = "2026-12".parse().unwrap();
    let (a, b) = tokio::join!(
        refill::sweep(on(&env.pool), policy, month, None, 7, |_| {}),
        refill::sweep(on(&env.pool), policy, month, None, 7, |_| {}),
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(a.users_refilled + b.users_refilled, 3 + 200);
    assert_eq!(
        a.credits_granted + b.credits_granted,
        1000 + 600 + 1 + 200 * 1000
    );
    let again = refill::sweep(on(&env.pool), policy, month, None, 50, |_| {})
        .await
        .unwrap();
    assert_eq!((again.users_refilled, again.credits_granted), (0, 0));
    assert_eq!(
        env.scalar_i64("SELECT count(*) FROM credit.transactions WHERE transaction_key = 'MONTHLY-CREDIT-TOP-UP-2026-12'").await,
        203
    );
    assert_eq!(l.balance("sw4", now).await.unwrap(), 1100);
    // One event per refilled user, each once; the sweep writes a chunk's events as one row.
    let mut refill_events: Vec<String> = stored_events(&env)
        .await
        .into_iter()
        .map(|e| e.0)
        .filter(|id| id.ends_with(":MONTHLY-CREDIT-TOP-UP-2026-12"))
        .collect();
    refill_events.sort();
    let mut expected: Vec<String> = ["sw0", "sw1", "sw2"]
        .into_iter()
        .map(String::from)
        .chain((0..200).map(|i| format!("bulk{i:04}")))
        .map(|u| format!("balance.changed:{u}:MONTHLY-CREDIT-TOP-UP-2026-12"))
        .collect();
    expected.sort();
    assert_eq!(refill_events, expected);
    assert_eq!(
        env.scalar_i64("SELECT count(*) FROM credit.outbox WHERE events = 7")
            .await,
        29,
        "205 users in chunks of 7: the first 29 chunks refill all of theirs, the last none"
    );
    env.assert_audit_clean().await;
    env.cleanup().await;
}

/// A user id whose refill event id is over 255 bytes (with its `sql-`/`rust-` twin prefix).
const LONG_USER: &str = "long-user-id-long-user-id-long-user-id-long-user-id-long-user-id-long-user-id-long-user-id-long-user-id-long-user-id-long-user-id-long-user-id-long-user-id-long-user-id-long-user-id-long-user-id-long-user-id-long-user-id-long-user-id-long-user-i";

/// The sweep's SQL applies the refill rule of `RefillPolicy::grant` and writes what the Rust
/// path (`Account::refill`, used by a single-user refill) writes: for each case a twin swept
/// by each path ends with the same balance row and ledger row, and both events are the text
/// `events::balance_changed` makes, byte for byte (odd user ids included, for the escaping).
#[tokio::test]
async fn sweep_sql_and_the_rust_refill_rule_agree() {
    let _sweeps = SWEEPS.share().await;
    let env = TestEnv::with(|s| s.refill.lazy = false).await;
    let policy = credit_worker::ledger::RefillPolicy { target: 1000 };
    let month: Month = "2026-12".parse().unwrap();
    let day = |m: &str| m.parse::<Month>().unwrap().first_day();
    let cases: Vec<(&str, i64, Option<chrono::NaiveDate>)> = vec![
        ("never", 0, None),
        ("below", 400, Some(day("2026-11"))),
        ("just-below", 999, Some(day("2025-12"))),
        ("equal", 1000, None),
        ("above", 1100, Some(day("2026-11"))),
        ("debt", -250, None),
        // The deepest debt one grant tops up (i64::MAX); a deeper one is refused (below).
        ("deep-debt", -i64::MAX + 1000, None),
        ("richest", i64::MAX, None),
        ("this-month", 10, Some(day("2026-12"))),
        ("later-month", -5, Some(day("2027-01"))),
        ("quote\"back\\slash", 1, None),
        ("ctl\t\n\u{1}\u{7f}", 2, None),
        ("ünï€😀/", 3, None),
        // An event id over 255 bytes: the digest form, in SQL as in Rust.
        (LONG_USER, 4, None),
    ];
    let insert =
        "INSERT INTO credit.balances (user_id, balance, last_seq, refill_month, auto_requested_at)
                  VALUES ($1, $2, 7, $3, now())";
    for (case, balance, evaluated) in &cases {
        for twin in ["sql", "rust"] {
            sqlx::query(insert)
                .bind(format!("{twin}-{case}"))
                .bind(balance)
                .bind(evaluated)
                .execute(&env.pool)
                .await
                .unwrap();
        }
    }
    // The Rust path first, one user at a time; then the sweep of everyone, which finds the
    // rust- twins evaluated already.
    let mut expected = (0, 0i128);
    for (case, balance, evaluated) in &cases {
        let user = format!("rust-{case}");
        let one = refill::sweep_asked(
            on(&env.pool),
            policy,
            Some(month),
            Utc::now(),
            Some(&user),
            1,
            |_| {},
        );
        let one = one.await.unwrap();
        let grant = policy
            .grant(*balance, *evaluated, month)
            .expect("representable");
        assert_eq!(
            one.credits_granted,
            i128::from(grant.unwrap_or(0)),
            "{case}"
        );
        if grant.is_some_and(|g| g > 0) {
            expected = (expected.0 + 1, expected.1 + i128::from(grant.unwrap_or(0)));
        }
    }
    let all = refill::sweep_asked(
        on(&env.pool),
        policy,
        Some(month),
        Utc::now(),
        None,
        3,
        |_| {},
    )
    .await
    .unwrap();
    // The deep debt's grant and the others' together: past what one balance holds, and
    // reported exactly.
    assert!(expected.1 > i128::from(i64::MAX), "{expected:?}");
    assert_eq!((all.users_refilled, all.credits_granted), expected);
    // Every sql- twin but "this-month" and "later-month"; no rust- twin (each evaluated).
    assert_eq!(all.users_evaluated, cases.len() as i64 - 2);
    for (case, _, _) in &cases {
        let sql = swept_state(&env, &format!("sql-{case}")).await;
        let rust = swept_state(&env, &format!("rust-{case}")).await;
        assert_eq!(sql, rust, "{case}");
    }
}

/// A month, once evaluated for a user, is final: naming it again, or an earlier one, grants
/// nothing, whatever the balance has become since (a user at the target when evaluated, or
/// one that did not exist then, would otherwise get "target − the balance now" for a month
/// that was not owed). A user never evaluated for the month is refilled.
#[tokio::test]
async fn a_month_evaluated_for_a_user_is_final() {
    let _sweeps = SWEEPS.share().await;
    let env = TestEnv::with(|s| s.refill.lazy = false).await;
    let policy = credit_worker::ledger::RefillPolicy { target: 1000 };
    let (now, l) = (Utc::now(), env.ledger());
    let month = |m: &str| Some(m.parse::<Month>().unwrap());
    let sweep = |named: &str, user: Option<&'static str>| {
        let pool = env.pool.clone();
        let named = month(named);
        async move {
            let r = refill::sweep_asked(on(&pool), policy, named, now, user, 10, |_| {});
            let r = r.await.unwrap();
            (r.users_refilled, r.credits_granted)
        }
    };
    // "rich" is evaluated for October and November at 1,500; "late" is evaluated for
    // November at 0.
    l.credit(TxType::TopUp, "rich", 1500, Some("pay-1"), None, now)
        .await
        .unwrap();
    assert_eq!(sweep("2026-10", None).await, (0, 0));
    sqlx::query("INSERT INTO credit.balances (user_id) VALUES ('late')")
        .execute(&env.pool)
        .await
        .unwrap();
    assert_eq!(sweep("2026-11", None).await, (1, 1000));
    // Both spend 600; October and November named again, for everyone and for each.
    for user in ["rich", "late"] {
        l.spend(user, 600, &format!("spent-{user}"), json!({}), now)
            .await
            .unwrap();
    }
    for named in ["2026-10", "2026-11"] {
        assert_eq!(sweep(named, None).await, (0, 0), "{named}");
        for user in ["rich", "late"] {
            assert_eq!(sweep(named, Some(user)).await, (0, 0), "{named} {user}");
        }
    }
    // The next month refills both.
    assert_eq!(sweep("2026-12", None).await, (2, 100 + 600));
    let grants = env
        .scalar_i64("SELECT count(*) FROM credit.transactions WHERE type = 'GRANT'")
        .await;
    assert_eq!(grants, 3);
    env.assert_audit_clean().await;
    env.cleanup().await;
}

/// A sweep that meets a row another refill of the same month holds waits for it, and then
/// re-checks it: the other's commit marked the month evaluated, so the sweep skips the user
/// instead of granting twice (or failing on the month's key).
#[tokio::test]
async fn a_sweep_that_waits_for_another_refill_of_the_user_skips_it() {
    let _sweeps = SWEEPS.share().await;
    let env = TestEnv::with(|s| s.refill.lazy = false).await;
    let policy = credit_worker::ledger::RefillPolicy { target: 1000 };
    let november: Month = "2026-11".parse().unwrap();
    sqlx::query("INSERT INTO credit.balances (user_id, balance, last_seq) VALUES ('x', 400, 0)")
        .execute(&env.pool)
        .await
        .unwrap();
    // The other refill, holding the row: its grant, and the month marked.
    let mut other = env.pool.begin().await.unwrap();
    for sql in [
        "SELECT 1 FROM credit.balances WHERE user_id = 'x' FOR UPDATE",
        "INSERT INTO credit.transactions (user_id, seq, transaction_key, type, amount, running_balance)
              VALUES ('x', 1, 'MONTHLY-CREDIT-TOP-UP-2026-11', 'GRANT', 600, 1000)",
        "UPDATE credit.balances SET balance = 1000, last_seq = 1, refill_month = '2026-11-01'
          WHERE user_id = 'x'",
    ] {
        sqlx::query(sql).execute(&mut *other).await.expect(sql);
    }
    let mut other = Some(other);
    // Everyone's sweep, which waits for the row; then the user's own, after the commit.
    for user in [None, Some("x")] {
        let pool = env.pool.clone();
        let sweep = tokio::spawn(async move {
            refill::sweep(on(&pool), policy, november, user, 10, |_| {}).await
        });
        if let Some(held) = other.take() {
            env.wait_for_one_lock_waiter(Duration::from_secs(10), "the sweep waiting for the row")
                .await;
            held.commit().await.unwrap();
        }
        let report = sweep.await.unwrap().expect("the sweep");
        let totals = (report.users_refilled, report.credits_granted);
        assert_eq!(totals, (0, 0), "{user:?}");
    }
    assert_eq!(
        env.scalar_i64("SELECT count(*) FROM credit.transactions WHERE type = 'GRANT'")
            .await,
        1
    );
    env.cleanup().await;
}

/// seq, key, type, amount, running balance, metadata, created_at.
type LedgerRow = (
    i64,
    String,
    String,
    i64,
    i64,
    serde_json::Value,
    DateTime<Utc>,
);

/// A swept user's balance row, ledger rows and events, with the user id taken out; each event
/// checked against the text `events::balance_changed` makes for its ledger row.
async fn swept_state(env: &TestEnv, user: &str) -> Vec<String> {
    let (balance, last_seq, month, pending): (i64, i64, Option<chrono::NaiveDate>, bool) =
        sqlx::query_as(
            "SELECT balance, last_seq, refill_month, auto_requested_at IS NOT NULL
               FROM credit.balances WHERE user_id = $1",
        )
        .bind(user)
        .fetch_one(&env.pool)
        .await
        .unwrap();
    let mut state = vec![format!("{balance} {last_seq} {month:?} {pending}")];
    let rows: Vec<LedgerRow> = sqlx::query_as(
        "SELECT seq, transaction_key, type::text, amount, running_balance, metadata, created_at
               FROM credit.transactions WHERE user_id = $1 ORDER BY seq",
    )
    .bind(user)
    .fetch_all(&env.pool)
    .await
    .unwrap();
    for (seq, key, tx_type, amount, running, metadata, created) in rows {
        let event = credit_worker::events::balance_changed(
            user,
            seq,
            amount,
            running,
            &tx_type,
            &key,
            credit_worker::events::ExecutionRef::default(),
            created,
        );
        let stored = stored_events(env).await;
        let found: Vec<_> = stored.iter().filter(|e| e.0 == event.event_id).collect();
        assert_eq!(found.len(), 1, "{user}: one event {}", event.event_id);
        let (_, routing_key, payload) = found[0];
        assert_eq!(*payload, event.payload.to_string(), "{user}");
        assert_eq!(*routing_key, event.routing_key);
        state.push(format!(
            "{seq} {key} {tx_type} {amount} {running} {metadata}"
        ));
    }
    state
}

/// The ledger, the decisions and the settlements are only ever added to: the schema refuses
/// an UPDATE, a DELETE or a TRUNCATE of any of them.
#[tokio::test]
async fn ledger_rows_decisions_and_settlements_cannot_be_changed() {
    let env = TestEnv::with(no_refill).await;
    seed(&env, ["a"], 100).await;
    spend_entry(&env, platform_gpt4("a", "n-1"), Utc::now()).await;
    for table in ["transactions", "decisions", "settlements"] {
        for sql in [
            format!("UPDATE credit.{table} SET user_id = user_id"),
            format!("DELETE FROM credit.{table}"),
            format!("TRUNCATE credit.{table} CASCADE"),
        ] {
            let err = sqlx::query(&sql).execute(&env.pool).await.expect_err(&sql);
            let code = err.as_database_error().and_then(|e| e.code());
            assert_eq!(code.as_deref(), Some("23001"), "{sql}: {err}");
        }
    }
    assert_eq!(
        env.scalar_i64("SELECT count(*) FROM credit.decisions")
            .await,
        1
    );
    env.cleanup().await;
}

/// The audit names each kind of damage: a balance off its ledger, a broken running-balance
/// chain, a ledger row without its balance row, a charge without its row, a debit without its
/// decision, a settlement without its decision or off it, a row without its event, an event
/// that no longer states its row. (The schema refuses most of these, so the test switches its
/// guards off first.)
#[tokio::test]
async fn audit_reports_every_kind_of_mismatch() {
    let env = TestEnv::with(no_refill).await;
    seed(&env, ["a", "b"], 100).await;
    spend_entry(&env, platform_gpt4("a", "n-1"), Utc::now()).await;
    env.assert_audit_clean().await;
    for sql in [
        "ALTER TABLE credit.transactions DISABLE TRIGGER transactions_append_only",
        "ALTER TABLE credit.transactions DISABLE TRIGGER transactions_have_accounts",
        "UPDATE credit.balances SET balance = balance + 5 WHERE user_id = 'b'",
        "UPDATE credit.transactions SET running_balance = 91 WHERE user_id = 'a' AND seq = 2",
        "INSERT INTO credit.transactions (user_id, seq, transaction_key, type, amount, running_balance)
              VALUES ('ghost', 1, 'G', 'GRANT', 1, 1)",
        "INSERT INTO credit.decisions (node_exec_id, user_id, block_id, graph_exec_id, outcome, cost, transaction_key)
              VALUES ('n-2', 'a', 'x', 'g', 'charged', 10, 'USAGE-n-2')",
        "DELETE FROM credit.outbox WHERE event_id = 'balance.changed:b:SEED'",
        // n-2 charged 10, so its settlement's pre must be 10; n-3 was never decided.
        "INSERT INTO credit.settlements (node_exec_id, user_id, block_id, status, pre, post, delta)
              VALUES ('n-2', 'a', 'x', 'COMPLETED', 0, 0, 0),
                     ('n-3', 'b', 'x', 'COMPLETED', 0, 0, 0)",
        "ALTER TABLE credit.decisions DISABLE TRIGGER decisions_append_only",
        "DELETE FROM credit.decisions WHERE node_exec_id = 'n-1'",
        // A credit under a key of the worker's form, as callers could give before the
        // prefixes were reserved: not the worker's, so no decision is missing.
        "INSERT INTO credit.balances (user_id, balance, last_seq) VALUES ('old', 5, 1)",
        "INSERT INTO credit.transactions (user_id, seq, transaction_key, type, amount, running_balance)
              VALUES ('old', 1, 'USAGE-from-an-old-caller', 'TOP_UP', 5, 5)",
        // Rows whose sum and chain pass an i64: reported exactly, not an error.
        "INSERT INTO credit.balances (user_id, balance, last_seq) VALUES ('huge', 5, 2)",
        "INSERT INTO credit.transactions (user_id, seq, transaction_key, type, amount, running_balance)
              VALUES ('huge', 1, 'H1', 'GRANT', 9223372036854775807, 9223372036854775807),
                     ('huge', 2, 'H2', 'GRANT', 1, 5)",
    ] {
        sqlx::query(sql).execute(&env.pool).await.expect(sql);
    }
    let report = credit_worker::ledger::audit::run(&env.pool)
        .await
        .expect("audit");
    // No relay ran: the events left (a's grant and charge) are after the watermark.
    assert_eq!(report.unpublished_events, 2);
    let mut found: Vec<(String, String)> = report
        .mismatches
        .into_iter()
        .map(|m| (m.user_id, m.problem))
        .collect();
    found.sort();
    let expect = |u: &str, p: &str| (u.to_owned(), p.to_owned());
    assert_eq!(
        found,
        vec![
            expect(
                "a",
                "balance 90 / last_seq 2 vs ledger sum 90 over 2 rows (max seq 2, last running balance 91)"
            ),
            expect("a", "decision n-2 has no matching USAGE row"),
            // Its row's running balance was changed after the event told it.
            expect(
                "a",
                "event balance.changed:a:USAGE-n-1 matches no ledger row (user, seq, amount, balance, type and key)"
            ),
            expect("a", "seq 2 (USAGE) has no decision or settlement naming it"),
            expect("a", "seq 2: running balance 91 but previous + amount = 90"),
            expect(
                "a",
                "settlement n-2 does not match its decision (none, or another user, block or charge)"
            ),
            expect(
                "b",
                "balance 105 / last_seq 1 vs ledger sum 100 over 1 rows (max seq 1, last running balance 100)"
            ),
            expect("b", "seq 1 has no balance.changed event"),
            expect(
                "b",
                "settlement n-3 does not match its decision (none, or another user, block or charge)"
            ),
            expect("ghost", "seq 1 has no balance row"),
            expect("ghost", "seq 1 has no balance.changed event"),
            expect(
                "huge",
                "balance 5 / last_seq 2 vs ledger sum 9223372036854775808 over 2 rows (max seq 2, last running balance 5)"
            ),
            expect("huge", "seq 1 has no balance.changed event"),
            expect("huge", "seq 2 has no balance.changed event"),
            expect(
                "huge",
                "seq 2: running balance 5 but previous + amount = 9223372036854775808"
            ),
            expect("old", "seq 1 has no balance.changed event"),
        ]
    );
    // A watermark past them counts them published.
    sqlx::query(
        "UPDATE credit.outbox_relay SET published_through = (SELECT max(id) FROM credit.outbox)",
    )
    .execute(&env.pool)
    .await
    .expect("move the watermark");
    let report = credit_worker::ledger::audit::run(&env.pool)
        .await
        .expect("audit");
    assert_eq!(report.unpublished_events, 0);
    env.cleanup().await;
}

/// Every ledger row has its account: a statement inserting rows for a user without a balance
/// row is refused whole (naming the user), and no account is ever removed or renamed.
#[tokio::test]
async fn ledger_rows_need_an_account_that_stays() {
    let env = TestEnv::with(no_refill).await;
    seed(&env, ["a"], 100).await;
    let orphan = "INSERT INTO credit.transactions (user_id, seq, transaction_key, type, amount, running_balance)
         VALUES ('a', 2, 'K-a', 'GRANT', 1, 101), ('ghost', 1, 'K-g', 'GRANT', 1, 1)";
    let err = sqlx::query(orphan).execute(&env.pool).await.unwrap_err();
    let db = err.as_database_error().expect("a database error");
    assert_eq!(db.code().as_deref(), Some("23503"));
    assert_eq!(
        db.message(),
        "credit.transactions: user_id ghost has no row in credit.balances"
    );
    for sql in [
        "DELETE FROM credit.balances WHERE user_id = 'a'",
        "TRUNCATE credit.balances CASCADE",
        "UPDATE credit.balances SET user_id = 'b' WHERE user_id = 'a'",
    ] {
        let err = sqlx::query(sql).execute(&env.pool).await.unwrap_err();
        let db = err.as_database_error().expect("a database error");
        assert_eq!(db.code().as_deref(), Some("23001"), "{sql}");
    }
    // Nothing of the refused statements stayed: a's one seeded row, its balance, no ghost.
    let rows: Vec<(String, i64, i64)> = sqlx::query_as(
        "SELECT user_id, seq, running_balance FROM credit.transactions ORDER BY 1, 2",
    )
    .fetch_all(&env.pool)
    .await
    .expect("rows");
    assert_eq!(rows, vec![("a".to_owned(), 1, 100)]);
    let balances: Vec<(String, i64)> =
        sqlx::query_as("SELECT user_id, balance FROM credit.balances ORDER BY 1")
            .fetch_all(&env.pool)
            .await
            .expect("balances");
    assert_eq!(balances, vec![("a".to_owned(), 100)]);
    env.assert_audit_clean().await;
    env.cleanup().await;
}

/// Settlement through the database: an extra charge that leaves a debt, the refund of a
/// cheaper run, a completion that overtook its start, duplicates; the schema accepts the
/// debt only from these rows and the audit stays clean.
#[tokio::test]
async fn settlements_are_stored_once_and_may_leave_a_debt() {
    let env = TestEnv::with(no_refill).await;
    seed(&env, ["s"], 30).await;
    let table = CostTable::from_toml_str(
        r#"
        [token_rates]
        "gpt-4-turbo" = { input = 1500, output = 4500 }
        [[block]]
        id = "llm"
        costs = [{ cost_amount = 10, cost_type = "tokens", cost_filter = { model = "gpt-4-turbo" } }]
        "#,
        "test",
    )
    .unwrap();
    let pricing = env.settings.pricing(table);
    let entry = |id: &str, tokens: Option<(u64, u64)>| {
        let mut v = json!({
            "user_id": "s", "graph_exec_id": "ge", "graph_id": "g", "node_exec_id": id,
            "node_id": "n", "block_id": "llm", "inputs": {"model": "gpt-4-turbo"},
        });
        if let Some((i, o)) = tokens {
            v["phase"] = "completed".into();
            v["stats"] = json!({"input_token_count": i, "output_token_count": o});
        }
        message::decode(&body(&v)).unwrap()
    };
    let now = Utc::now();
    let decide = |entries: Vec<message::NodeExecutionEntry>| {
        let (pool, pricing) = (env.pool.clone(), pricing.clone());
        async move {
            decide::decide_batch(&pool, &pricing, &entries, now)
                .await
                .unwrap()
        }
    };
    // a: start (10) and a completion of 30,000 in / 2,000 out = 45 + 9 = 54 ⇒ 44 more on 20.
    decide(vec![entry("a", None)]).await;
    let v = decide(vec![
        entry("a", Some((30_000, 2_000))),
        entry("a", Some((1, 1))),
    ])
    .await;
    assert_eq!(
        v,
        vec![
            Verdict::Settled {
                pre: 10,
                post: 54,
                delta: 44,
                uncollected: 0,
                balance: -24
            },
            Verdict::Duplicate { conflicting: false }
        ]
    );
    // b: the completion first (decides at 3), then its start (a duplicate).
    let v = decide(vec![entry("b", Some((2_000, 0))), entry("b", None)]).await;
    assert!(
        matches!(
            v[0],
            Verdict::Decided {
                outcome: Outcome::Charged,
                cost: 3,
                ..
            }
        ),
        "{v:?}"
    );
    assert_eq!(v[1], Verdict::Duplicate { conflicting: false });
    assert_eq!(env.ledger().balance("s", now).await.unwrap(), -27);

    let outcome = env.ledger().decision("a").await.unwrap().unwrap();
    let s = outcome.settlement.expect("settled");
    assert_eq!((s.pre, s.post, s.delta, s.uncollected), (10, 54, 44, 0));
    assert_eq!(s.transaction_key.as_deref(), Some("SETTLE-a"));
    // A pre-flight debit can never make a debt: the schema refuses it.
    let refused = sqlx::query(
        "INSERT INTO credit.transactions (user_id, seq, transaction_key, type, amount, running_balance)
              VALUES ('s', 99, 'X', 'USAGE', -1, -28)",
    )
    .execute(&env.pool)
    .await
    .expect_err("a pre-flight debit into debt");
    assert_eq!(
        refused.as_database_error().and_then(|e| e.constraint()),
        Some("transactions_running_balance_check"),
        "{refused}"
    );
    env.assert_audit_clean().await;
    env.cleanup().await;
}

/// The `request_id`s of the `top_up.requested` events in the outbox, in order.
async fn top_up_requests(env: &TestEnv) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT payload->>'request_id' FROM credit.outbox
          WHERE routing_key = 'top_up.requested' ORDER BY id",
    )
    .fetch_all(&env.pool)
    .await
    .unwrap()
}

/// A credit posted before request ids were reserved, under one never issued, answers its
/// retry as it always did: already applied.
#[tokio::test]
async fn an_earlier_credit_under_a_request_id_is_still_found_applied() {
    let env = TestEnv::with(no_refill).await;
    for sql in [
        "INSERT INTO credit.balances (user_id, balance, last_seq) VALUES ('old', 50, 1)",
        "INSERT INTO credit.transactions (user_id, seq, transaction_key, type, amount, running_balance)
              VALUES ('old', 1, 'AUTO-TOP-UP-old-1', 'TOP_UP', 50, 50)",
    ] {
        sqlx::query(sql).execute(&env.pool).await.expect(sql);
    }
    let posting = env
        .ledger()
        .credit(
            TxType::TopUp,
            "old",
            50,
            Some("AUTO-TOP-UP-old-1"),
            None,
            Utc::now(),
        )
        .await
        .expect("the same credit again");
    assert_eq!((posting.applied, posting.balance), (false, 50));
    env.cleanup().await;
}

/// Auto top-up requests against the database: made in the debit's transaction, one at a time
/// per user even when debits race, fulfilled once by a top-up keyed by the request id.
#[tokio::test]
async fn auto_top_up_requests_once_and_is_fulfilled_once() {
    let env = TestEnv::with(no_refill).await;
    seed(&env, ["a"], 1000).await;
    let ledger = env.ledger();
    let now = Utc::now();
    // Bad configurations are refused with the field named.
    let e = ledger
        .set_auto_top_up("a", Some((0, 5)), now)
        .await
        .unwrap_err();
    assert!(matches!(e, LedgerError::AmountOutOfRange(_)), "{e:?}");
    assert_eq!(e.to_string(), "threshold: 0 must be greater than 0");
    let e = ledger
        .set_auto_top_up("a", Some((5, -1)), now)
        .await
        .unwrap_err();
    assert_eq!(e.to_string(), "amount: -1 must be greater than 0");
    // Above the threshold: nothing yet.
    let r = ledger
        .set_auto_top_up("a", Some((900, 500)), now)
        .await
        .unwrap();
    assert!(!r.requested);
    // The id of a request not made yet is no caller's key: its fulfilment would be refused.
    let e = ledger
        .credit(TxType::TopUp, "a", 50, Some("AUTO-TOP-UP-a-1"), None, now)
        .await
        .unwrap_err();
    assert!(
        e.to_string()
            .starts_with("key: AUTO-TOP-UP-a-1 has the form"),
        "{e}"
    );
    // Twenty debits of 10 at once, from as many tasks: the balance crosses 900 once.
    let spends = (0..20).map(|i| {
        let ledger = ledger.clone();
        async move {
            ledger
                .spend("a", 10, &format!("S-{i}"), json!({}), now)
                .await
                .unwrap()
        }
    });
    futures::future::join_all(spends).await;
    assert_eq!(top_up_requests(&env).await, vec!["AUTO-TOP-UP-a-1"]);
    // The payment side fulfils it twice (a retry): applied once.
    for _ in 0..2 {
        ledger
            .credit(TxType::TopUp, "a", 500, Some("AUTO-TOP-UP-a-1"), None, now)
            .await
            .unwrap();
    }
    assert_eq!(ledger.balance("a", now).await.unwrap(), 1000 - 200 + 500);
    // Raised above the balance: requested at once; again while outstanding: not.
    let r = ledger
        .set_auto_top_up("a", Some((2000, 300)), now)
        .await
        .unwrap();
    assert!(r.requested);
    let r = ledger
        .set_auto_top_up("a", Some((2000, 300)), now)
        .await
        .unwrap();
    assert!(!r.requested);
    assert_eq!(
        top_up_requests(&env).await,
        vec!["AUTO-TOP-UP-a-1", "AUTO-TOP-UP-a-2"]
    );
    let r = ledger.set_auto_top_up("a", None, now).await.unwrap();
    assert_eq!((r.threshold, r.amount, r.requested), (None, None, false));
    ledger
        .spend("a", 10, "S-after-off", json!({}), now)
        .await
        .unwrap();
    assert_eq!(top_up_requests(&env).await.len(), 2);
    env.assert_audit_clean().await;
    env.cleanup().await;
}

/// Only an auto top-up request's own fulfilment answers it: neither the monthly refill (the
/// sweep's SQL) nor another credit, nor the late payment of a request its TTL superseded, lets
/// a second request go out while the first may still be paid. Each request carries the seq it
/// was made at, and each credit's reply its row's seq.
#[tokio::test]
async fn only_its_fulfilment_answers_an_outstanding_top_up_request() {
    let env = TestEnv::with(no_refill).await;
    seed(&env, ["a"], 100).await;
    let ledger = env.ledger();
    let now = Utc::now();
    let r = ledger
        .set_auto_top_up("a", Some((5000, 500)), now)
        .await
        .unwrap();
    assert!(r.requested);
    let policy = credit_worker::ledger::RefillPolicy { target: 1000 };
    let month: Month = "2031-07".parse().unwrap();
    let swept = refill::sweep(on(&env.pool), policy, month, None, 10, |_| {})
        .await
        .unwrap();
    assert_eq!(swept.credits_granted, 900);
    ledger
        .credit(TxType::TopUp, "a", 5, Some("invoice-1"), None, now)
        .await
        .unwrap();
    ledger
        .credit(TxType::Grant, "a", 5, Some("promo-1"), None, now)
        .await
        .unwrap();
    ledger.spend("a", 10, "S-1", json!({}), now).await.unwrap();
    assert_eq!(top_up_requests(&env).await, vec!["AUTO-TOP-UP-a-1"]);
    ledger
        .credit(TxType::TopUp, "a", 500, Some("AUTO-TOP-UP-a-1"), None, now)
        .await
        .unwrap();
    ledger.spend("a", 10, "S-2", json!({}), now).await.unwrap();
    assert_eq!(
        top_up_requests(&env).await,
        vec!["AUTO-TOP-UP-a-1", "AUTO-TOP-UP-a-2"]
    );
    assert_eq!(
        ledger.balance("a", now).await.unwrap(),
        1000 + 5 + 5 - 10 + 500 - 10
    );
    // Request 2 left unanswered past its TTL (an hour): request 3 is made, at S-3's row. Each
    // request carries the seq of the user's last row when it was made.
    let later = now + chrono::Duration::seconds(3601);
    ledger
        .spend("a", 10, "S-3", json!({}), later)
        .await
        .unwrap();
    let request = |n: i64| format!("AUTO-TOP-UP-a-{n}");
    let made_at = |n: i64| {
        let env = &env;
        async move {
            sqlx::query_scalar::<_, i64>(
                "SELECT (payload->>'seq')::int8 FROM credit.outbox
                  WHERE routing_key = 'top_up.requested' AND payload->>'request_id' = $1",
            )
            .bind(format!("AUTO-TOP-UP-a-{n}"))
            .fetch_one(&env.pool)
            .await
            .unwrap()
        }
    };
    let row_seq = |key: &'static str| {
        let env = &env;
        async move {
            sqlx::query_scalar::<_, i64>(
                "SELECT seq FROM credit.transactions WHERE user_id = 'a' AND transaction_key = $1",
            )
            .bind(key)
            .fetch_one(&env.pool)
            .await
            .unwrap()
        }
    };
    assert!(made_at(1).await < row_seq("MONTHLY-CREDIT-TOP-UP-2031-07").await);
    assert_eq!(made_at(2).await, row_seq("S-2").await);
    assert_eq!(made_at(3).await, row_seq("S-3").await);
    // Request 2 paid late does not answer request 3 (it may be being paid). Its row comes
    // after request 3's seq, which is how a payment side holding request 3 knows not to
    // charge again; the reply carries the row's seq, the same when the payment is repeated.
    let late = ledger
        .credit(TxType::TopUp, "a", 500, Some(&request(2)), None, later)
        .await
        .unwrap();
    assert_eq!((late.applied, late.balance), (true, 1480 + 500));
    assert!(late.seq > made_at(3).await, "{late:?}");
    let again = ledger
        .credit(TxType::TopUp, "a", 500, Some(&request(2)), None, later)
        .await
        .unwrap();
    assert_eq!((again.applied, again.seq), (false, late.seq));
    ledger
        .spend("a", 10, "S-4", json!({}), later)
        .await
        .unwrap();
    assert_eq!(top_up_requests(&env).await.len(), 3);
    // Request 3's own payment answers it: the next debit below the threshold asks anew.
    ledger
        .credit(TxType::TopUp, "a", 500, Some(&request(3)), None, later)
        .await
        .unwrap();
    ledger
        .spend("a", 10, "S-5", json!({}), later)
        .await
        .unwrap();
    assert_eq!(top_up_requests(&env).await.len(), 4);
    assert_eq!(made_at(4).await, row_seq("S-5").await);
    env.assert_audit_clean().await;
    env.cleanup().await;
}

/// A page stops short of its limit where its rows' JSON would pass
/// `HISTORY_PAGE_BYTES` (4 MiB), so that no control reply outgrows what the broker accepts; its
/// `next_before_seq` goes on from there and every row is paged once.
#[tokio::test]
async fn a_history_page_of_long_rows_is_cut_at_its_byte_budget() {
    let env = TestEnv::with(no_refill).await;
    let ledger = env.ledger();
    let now = Utc::now();
    let reason = "r".repeat(1_000_000);
    for i in 1..=6 {
        let key = format!("G-{i}");
        ledger
            .credit(TxType::Grant, "long", 1, Some(&key), Some(&reason), now)
            .await
            .unwrap();
    }
    let first = ledger
        .history("long", &HistoryQuery::newest(50), now)
        .await
        .unwrap();
    let seqs: Vec<i64> = first.transactions.iter().map(|t| t.seq).collect();
    assert_eq!((seqs, first.next_before_seq), (vec![6, 5, 4, 3], Some(3)));
    let query = HistoryQuery {
        before_seq: first.next_before_seq,
        ..HistoryQuery::newest(50)
    };
    let rest = ledger.history("long", &query, now).await.unwrap();
    let seqs: Vec<i64> = rest.transactions.iter().map(|t| t.seq).collect();
    assert_eq!((seqs, rest.next_before_seq), (vec![2, 1], None));
    env.cleanup().await;
}

/// What a history row was posted as: seq, type, metadata.graph_exec_id.
type Posted = (i64, &'static str, Option<String>);

/// 400 rows for `user`: a seed top-up, then top-ups, grants and spends; spends carry one of
/// three graph_exec_ids in their metadata.
async fn long_ledger(ledger: &credit_worker::ledger::Ledger, user: &str) -> Vec<Posted> {
    let now = Utc::now();
    ledger
        .credit(TxType::TopUp, user, 100_000, Some("TU-seed"), None, now)
        .await
        .unwrap();
    let mut posted = vec![(1, "TOP_UP", None)];
    for i in 2..=400_i64 {
        let row = match i % 4 {
            0 => {
                let key = format!("TU-{i}");
                ledger
                    .credit(TxType::TopUp, user, 10, Some(&key), None, now)
                    .await
                    .unwrap();
                (i, "TOP_UP", None)
            }
            1 => {
                let key = format!("GR-{i}");
                ledger
                    .credit(TxType::Grant, user, 5, Some(&key), None, now)
                    .await
                    .unwrap();
                (i, "GRANT", None)
            }
            _ => {
                let graph = format!("g-{}", i % 3);
                let meta = json!({ "graph_exec_id": graph });
                ledger
                    .spend(user, 3, &format!("US-{i}"), meta, now)
                    .await
                    .unwrap();
                (i, "USAGE", Some(graph))
            }
        };
        posted.push(row);
    }
    posted
}

/// Every page of `query` (its before_seq ignored), each checked for size and cursor.
async fn all_pages(
    ledger: &credit_worker::ledger::Ledger,
    user: &str,
    mut query: HistoryQuery,
) -> Vec<credit_worker::ledger::Transaction> {
    query.before_seq = None;
    let mut rows = Vec::new();
    loop {
        let page = ledger.history(user, &query, Utc::now()).await.unwrap();
        let n = page.transactions.len() as i64;
        assert!(n <= query.limit, "page of {n} rows");
        // A cursor is given only when rows follow it (SPEC: null on the last page).
        assert!(
            n > 0 || query.before_seq.is_none(),
            "an empty page after a cursor"
        );
        match page.next_before_seq {
            Some(next) => {
                assert_eq!(n, query.limit, "only a full page has a next one");
                assert_eq!(Some(next), page.transactions.last().map(|t| t.seq));
                query.before_seq = Some(next);
                rows.extend(page.transactions);
            }
            None => {
                rows.extend(page.transactions);
                return rows;
            }
        }
    }
}

#[tokio::test]
async fn history_pages_by_seq_and_filters_exactly() {
    let env = TestEnv::with(no_refill).await;
    let ledger = env.ledger();
    let u = "pager";
    let posted = long_ledger(&ledger, u).await;
    let filters: [(Option<TxType>, Option<&str>); 6] = [
        (None, None),
        (Some(TxType::Usage), None),
        (Some(TxType::TopUp), None),
        (None, Some("g-1")),
        (Some(TxType::Usage), Some("g-2")),
        (Some(TxType::Grant), Some("g-0")),
    ];
    for (tx_type, graph) in filters {
        let query = HistoryQuery {
            limit: 37,
            before_seq: None,
            tx_type,
            graph_exec_id: graph.map(str::to_owned),
        };
        let rows = all_pages(&ledger, u, query).await;
        let got: Vec<i64> = rows.iter().map(|t| t.seq).collect();
        let expected: Vec<i64> = posted
            .iter()
            .rev()
            .filter(|(_, t, _)| tx_type.is_none_or(|w| w.as_str() == *t))
            .filter(|(_, _, g)| graph.is_none_or(|w| g.as_deref() == Some(w)))
            .map(|(s, _, _)| *s)
            .collect();
        // Every matching row once, newest first.
        assert_eq!(got, expected, "type {tx_type:?}, graph {graph:?}");
        if let Some(w) = tx_type {
            assert!(rows.iter().all(|t| t.tx_type == w.as_str()));
        }
    }
    assert_eq!(posted.len(), 400);
    env.cleanup().await;
}

#[tokio::test]
async fn history_pages_are_served_by_indexes() {
    let env = TestEnv::with(no_refill).await;
    let ledger = env.ledger();
    long_ledger(&ledger, "pager").await;
    // Many rows besides: 50 000 other users' ledgers, two rows each, so the table is large
    // and the planner sees what it would in production.
    sqlx::query(
        "INSERT INTO credit.balances (user_id, balance, last_seq)
         SELECT 'bulk-' || g, 3, 2 FROM generate_series(1, 50000) g",
    )
    .execute(&env.pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO credit.transactions
             (user_id, seq, transaction_key, type, amount, running_balance, metadata)
         SELECT 'bulk-' || g, s, 'K-' || s, 'TOP_UP', s, s * (s + 1) / 2,
                jsonb_build_object('graph_exec_id', 'bulk-g-' || (g % 100))
           FROM generate_series(1, 50000) g, generate_series(1, 2) s",
    )
    .execute(&env.pool)
    .await
    .unwrap();
    sqlx::query("ANALYZE credit.transactions")
        .execute(&env.pool)
        .await
        .unwrap();
    let cases = [
        (HistoryQuery::newest(37), "transactions_pkey"),
        (
            HistoryQuery {
                before_seq: Some(200),
                graph_exec_id: Some("g-1".into()),
                ..HistoryQuery::newest(37)
            },
            "transactions_graph_exec_idx",
        ),
        (
            HistoryQuery {
                tx_type: Some(TxType::Grant),
                ..HistoryQuery::newest(37)
            },
            "transactions_type_idx",
        ),
    ];
    for (query, index) in cases {
        let plan = ledger.explain_history("pager", &query).await.unwrap();
        let text = plan.join("\n");
        assert!(!text.contains("Seq Scan"), "{query:?}:\n{text}");
        assert!(
            text.contains("Index Scan") && text.contains(index),
            "{query:?} should use {index}:\n{text}"
        );
    }
    // On one connection, page after page: a graph run's page is planned with its own values
    // each time, never from a cached generic plan (which estimates a run's rows from the
    // average run and, for a long run, reads and sorts all of it per page). The plain page's
    // statement is cached, so the check sees the connection's statements.
    let one = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(&env.settings.database.url)
        .await
        .unwrap();
    let paged = credit_worker::ledger::Ledger::new(one.clone(), env.settings.ledger_policy());
    for before in 0..8 {
        for graph in [Some("g-1".to_owned()), None] {
            let query = HistoryQuery {
                before_seq: Some(400 - before * 10),
                graph_exec_id: graph,
                ..HistoryQuery::newest(5)
            };
            paged.history("pager", &query, Utc::now()).await.unwrap();
        }
    }
    let cached: Vec<(String, i64)> = sqlx::query_as(
        "SELECT statement, generic_plans + custom_plans FROM pg_prepared_statements
          WHERE statement LIKE '%FROM credit.transactions%'
            AND statement NOT LIKE '%pg_prepared_statements%'",
    )
    .fetch_all(&one)
    .await
    .unwrap();
    assert_eq!(cached.len(), 1, "{cached:?}");
    assert!(!cached[0].0.contains("graph_exec_id"), "{cached:?}");
    assert_eq!(cached[0].1, 8, "{cached:?}");
    one.close().await;
    env.cleanup().await;
}

/// Holds an uncommitted decision for `id` (user `u-a`) while `entry` (user `u-b`) is decided,
/// commits it once that decision waits on it, and returns what the decision returned.
async fn decide_beside_uncommitted(
    env: &TestEnv,
    id: &str,
    entry: serde_json::Value,
) -> Result<Vec<Verdict>, decide::DecideError> {
    let pricing = env.settings.pricing(CostTable::builtin().unwrap());
    let mut other = env.pool.begin().await.unwrap();
    sqlx::query(
        "INSERT INTO credit.decisions (node_exec_id, user_id, block_id, graph_exec_id, outcome, cost)
         VALUES ($1, 'u-a', 'b', 'ge', 'free', 0)",
    )
    .bind(id)
    .execute(&mut *other)
    .await
    .unwrap();
    let e = message::decode(&body(&entry)).unwrap();
    let pool = env.pool.clone();
    let task =
        tokio::spawn(async move { decide::decide_batch(&pool, &pricing, &[e], Utc::now()).await });
    let what = "the write to wait for the other decision";
    env.wait_for_one_lock_waiter(Duration::from_secs(10), what)
        .await;
    other.commit().await.unwrap();
    task.await.unwrap()
}

#[tokio::test]
async fn a_decision_committed_meanwhile_for_another_user_is_a_duplicate() {
    // A producer sends one node_exec_id for two users: the workers lock different accounts,
    // so neither sees the other's decision before it writes its own.
    let env = TestEnv::new().await;
    let start = platform_gpt4("u-b", "race-1");
    let v = decide_beside_uncommitted(&env, "race-1", start)
        .await
        .unwrap();
    // A start is written without a look-up; the key refuses it, and the look-up finds why.
    assert_eq!(v, vec![Verdict::Duplicate { conflicting: true }]);

    let mut completion = platform_gpt4("u-b", "race-2");
    completion["phase"] = json!("completed");
    let err = decide_beside_uncommitted(&env, "race-2", completion.clone())
        .await
        .unwrap_err();
    // A completion looked before it wrote: the other decision came after, a race to retry.
    assert!(matches!(err, decide::DecideError::Race), "{err:?}");
    let pricing = env.settings.pricing(CostTable::builtin().unwrap());
    let e = message::decode(&body(&completion)).unwrap();
    let again = decide::decide_batch(&env.pool, &pricing, &[e], Utc::now())
        .await
        .unwrap();
    assert_eq!(again, vec![Verdict::Duplicate { conflicting: true }]);

    let loser = "SELECT count(*) FROM credit.transactions WHERE user_id = 'u-b'";
    assert_eq!(env.scalar_i64(loser).await, 0);
    let settled = "SELECT count(*) FROM credit.settlements";
    assert_eq!(env.scalar_i64(settled).await, 0);
    let decisions = "SELECT count(*) FROM credit.decisions WHERE user_id = 'u-a'";
    assert_eq!(env.scalar_i64(decisions).await, 2);
    assert_eq!(
        env.scalar_i64("SELECT count(*) FROM credit.decisions")
            .await,
        2
    );
    env.cleanup().await;
}

/// A repeat of an execution decided and settled before is a duplicate even when its stats
/// cannot be priced (acked, not dead-lettered); a first one is invalid.
#[tokio::test]
async fn a_repeat_that_cannot_be_priced_is_a_duplicate() {
    let env = TestEnv::with(no_refill).await;
    seed(&env, ["dup"], 1_000).await;
    let table = r#"
        [[block]]
        id = "search"
        costs = [{ cost_amount = 100, cost_type = "cost_usd", cost_filter = {} }]
    "#;
    let pricing = env
        .settings
        .pricing(CostTable::from_toml_str(table, "test").unwrap());
    let entry = |id: &str, phase: &str, usd: f64| {
        let v = json!({
            "user_id": "dup", "graph_exec_id": "ge", "graph_id": "g", "node_exec_id": id,
            "node_id": "n", "block_id": "search", "inputs": {}, "phase": phase,
            "stats": {"provider_cost": usd},
        });
        message::decode(&body(&v)).unwrap()
    };
    let decide = |e: message::NodeExecutionEntry| {
        let pricing = pricing.clone();
        let pool = env.pool.clone();
        async move {
            decide::decide_batch(&pool, &pricing, &[e], Utc::now())
                .await
                .unwrap()
        }
    };
    let v = decide(entry("x", "completed", 0.05)).await;
    assert!(matches!(v[0], Verdict::Decided { cost: 5, .. }), "{v:?}");
    let rows = "SELECT count(*) FROM credit.transactions";
    let before = env.scalar_i64(rows).await;
    for phase in ["completed", "started"] {
        let v = decide(entry("x", phase, 1e300)).await;
        assert_eq!(
            v,
            vec![Verdict::Duplicate { conflicting: false }],
            "{phase}"
        );
    }
    let v = decide(entry("y", "started", 1e300)).await;
    assert!(
        matches!(&v[0], Verdict::Invalid { reason } if reason.contains("cost overflow")),
        "{v:?}"
    );
    assert_eq!(env.scalar_i64(rows).await, before);
    assert_eq!(env.ledger().balance("dup", Utc::now()).await.unwrap(), 995);
    env.assert_audit_clean().await;
    env.cleanup().await;
}

#[tokio::test]
async fn redelivered_starts_beside_new_ones_are_duplicates_and_the_new_ones_decided() {
    let env = TestEnv::with(no_refill).await;
    seed(&env, ["r"], 100).await;
    let pricing = env.settings.pricing(CostTable::builtin().unwrap());
    let decode = |id: &str| message::decode(&body(&platform_gpt4("r", id))).unwrap();
    let now = Utc::now();
    let first = [decode("a"), decode("b")];
    decide::decide_batch(&env.pool, &pricing, &first, now)
        .await
        .unwrap();
    // The first write of this batch fails on a's key; the second, with the look-up, decides c.
    let mixed = [decode("a"), decode("c"), decode("b"), decode("c")];
    let v = decide::decide_batch(&env.pool, &pricing, &mixed, now)
        .await
        .unwrap();
    let dup = Verdict::Duplicate { conflicting: false };
    let c = Verdict::Decided {
        outcome: Outcome::Charged,
        cost: 10,
        fee: 0,
        uncollected: 0,
        balance: 70,
    };
    assert_eq!(v, vec![dup.clone(), c, dup.clone(), dup]);
    assert_eq!(env.ledger().balance("r", now).await.unwrap(), 70);
    let rows = "SELECT count(*) FROM credit.transactions WHERE user_id = 'r' AND type = 'USAGE'";
    assert_eq!(env.scalar_i64(rows).await, 3);
    env.assert_audit_clean().await;
    env.cleanup().await;
}

/// A sweep chunk of 2,500 users writes its events 1,000 to an outbox row, in user_id order:
/// rows of 1,000, 1,000 and 500 events, each named by its first event, every user's event
/// once.
#[tokio::test]
async fn a_sweep_chunk_writes_its_events_a_thousand_to_a_row() {
    let _sweeps = SWEEPS.share().await;
    let env = TestEnv::with(|s| s.refill.lazy = false).await;
    sqlx::query(
        "INSERT INTO credit.balances (user_id)
         SELECT 'k' || lpad(g::text, 4, '0') FROM generate_series(1, 2500) g",
    )
    .execute(&env.pool)
    .await
    .unwrap();
    let policy = credit_worker::ledger::RefillPolicy { target: 1000 };
    let month: Month = "2026-12".parse().unwrap();
    let report = refill::sweep(on(&env.pool), policy, month, None, 2500, |_| {})
        .await
        .unwrap();
    assert_eq!(
        (report.users_refilled, report.credits_granted),
        (2500, 2_500_000)
    );
    let rows: Vec<(String, i32, Option<String>)> = sqlx::query_as(
        "SELECT event_id, events, run->0->>'event_id' FROM credit.outbox ORDER BY id",
    )
    .fetch_all(&env.pool)
    .await
    .unwrap();
    let event = |i: usize| format!("balance.changed:k{i:04}:MONTHLY-CREDIT-TOP-UP-2026-12");
    let expected_rows: Vec<(String, i32, Option<String>)> = [(1, 1000), (1001, 1000), (2001, 500)]
        .into_iter()
        .map(|(first, n)| (event(first), n, Some(event(first))))
        .collect();
    assert_eq!(rows, expected_rows);
    let ids: Vec<String> = stored_events(&env).await.into_iter().map(|e| e.0).collect();
    assert_eq!(ids, (1..=2500).map(event).collect::<Vec<_>>());
    env.assert_audit_clean().await;
    env.cleanup().await;
}

/// Two (user, key) pairs that read alike once joined with colons get distinct event ids, in the
/// ledger's writes and in the sweep's, and the audit finds every row's event, also one stored
/// under the id of a user with a colon as it was before ids encoded it.
#[tokio::test]
async fn event_ids_name_one_user_and_key_even_with_colons() {
    // Its sweep counts in `credit_refill_runs_total`.
    let _sweeps = SWEEPS.share().await;
    let env = TestEnv::with(no_refill).await;
    let l = env.ledger();
    let now = Utc::now();
    l.credit(TxType::TopUp, "a", 5, Some("x:y"), None, now)
        .await
        .unwrap();
    let second = l
        .credit(TxType::TopUp, "a:x", 5, Some("y"), None, now)
        .await;
    assert_eq!(second.map(|p| p.balance).ok(), Some(5));
    l.credit(TxType::TopUp, "50%:off", 5, Some("k"), None, now)
        .await
        .unwrap();
    let policy = credit_worker::ledger::RefillPolicy { target: 100 };
    let month: Month = "2026-12".parse().unwrap();
    refill::sweep(on(&env.pool), policy, month, None, 2, |_| {})
        .await
        .unwrap();
    let mut ids: Vec<String> = stored_events(&env).await.into_iter().map(|e| e.0).collect();
    ids.sort();
    assert_eq!(
        ids,
        [
            "balance.changed:50%25%3Aoff:MONTHLY-CREDIT-TOP-UP-2026-12",
            "balance.changed:50%25%3Aoff:k",
            "balance.changed:a%3Ax:MONTHLY-CREDIT-TOP-UP-2026-12",
            "balance.changed:a%3Ax:y",
            "balance.changed:a:MONTHLY-CREDIT-TOP-UP-2026-12",
            "balance.changed:a:x:y",
        ]
    );
    env.assert_audit_clean().await;
    // An id in the form before the encoding, of user `a%3Ax` (the newer form of `a:x`'s),
    // left in the outbox does not stop that user's ledger.
    sqlx::query(
        "INSERT INTO credit.outbox (event_id, routing_key, payload)
         VALUES ('balance.changed:a%3Ax:z', 'balance.changed', '{}')",
    )
    .execute(&env.pool)
    .await
    .unwrap();
    l.credit(TxType::TopUp, "a:x", 5, Some("z"), None, now)
        .await
        .unwrap();
    sqlx::query("DELETE FROM credit.outbox WHERE payload::text = '{}'")
        .execute(&env.pool)
        .await
        .unwrap();
    // A row written before ids encoded the user keeps the id it was published under.
    let legacy = "UPDATE credit.outbox SET event_id = 'balance.changed:50%:off:k'
                   WHERE event_id = 'balance.changed:50%25%3Aoff:k'";
    sqlx::query(legacy).execute(&env.pool).await.unwrap();
    env.assert_audit_clean().await;
    // Under neither id, it is missing.
    let gone = "DELETE FROM credit.outbox WHERE event_id = 'balance.changed:50%:off:k'";
    sqlx::query(gone).execute(&env.pool).await.unwrap();
    let report = credit_worker::ledger::audit::run(&env.pool).await.unwrap();
    let missing: Vec<&str> = report
        .mismatches
        .iter()
        .map(|m| m.user_id.as_str())
        .collect();
    assert_eq!(missing, ["50%:off"]);
    env.cleanup().await;
}

/// A row whose event id is over 255 bytes is published under the bounded id; one written
/// before the bound keeps the id it was published under (migration 0013's, or the one before
/// it), and the audit finds any of them.
#[tokio::test]
async fn the_audit_finds_a_long_rows_event_under_its_bounded_or_earlier_id() {
    let env = TestEnv::with(no_refill).await;
    let key = format!("k:{}", "x".repeat(250));
    env.ledger()
        .credit(TxType::TopUp, "a:b", 5, Some(&key), None, Utc::now())
        .await
        .unwrap();
    let bounded: String = sqlx::query_scalar("SELECT event_id FROM credit.outbox")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert!(bounded.starts_with("balance.changed:%sha256:"), "{bounded}");
    env.assert_audit_clean().await;
    let earlier = format!("balance.changed:a%3Ab:{key}");
    let set_earlier = || {
        sqlx::query("UPDATE credit.outbox SET event_id = $1")
            .bind(&earlier)
            .execute(&env.pool)
    };
    // No row can take such an id now…
    let refused = set_earlier().await.expect_err("an id over 255 bytes");
    assert_eq!(
        refused.as_database_error().and_then(|e| e.constraint()),
        Some("outbox_event_id_bounded")
    );
    // …but one written before the bound (migration 0019 checks only new rows) may remain.
    sqlx::query("ALTER TABLE credit.outbox DROP CONSTRAINT outbox_event_id_bounded")
        .execute(&env.pool)
        .await
        .unwrap();
    set_earlier().await.unwrap();
    env.assert_audit_clean().await;
    // And one written before migration 0013 has the user id as it is.
    sqlx::query("UPDATE credit.outbox SET event_id = $1")
        .bind(format!("balance.changed:a:b:{key}"))
        .execute(&env.pool)
        .await
        .unwrap();
    env.assert_audit_clean().await;
    sqlx::query("UPDATE credit.outbox SET event_id = 'balance.changed:a:b:k'")
        .execute(&env.pool)
        .await
        .unwrap();
    let report = credit_worker::ledger::audit::run(&env.pool).await.unwrap();
    let found: Vec<(&str, &str)> = report
        .mismatches
        .iter()
        .map(|m| (m.user_id.as_str(), m.problem.as_str()))
        .collect();
    assert_eq!(found, [("a:b", "seq 1 has no balance.changed event")]);
    env.cleanup().await;
}

/// Every kept balance.changed event must state its ledger row as it is: an event for a row
/// that does not exist, or one whose figures differ from the row's, is a mismatch.
#[tokio::test]
async fn the_audit_finds_an_event_that_states_no_ledger_row() {
    let env = TestEnv::with(no_refill).await;
    let now = Utc::now();
    for key in ["k1", "k2"] {
        env.ledger()
            .credit(TxType::TopUp, "u", 5, Some(key), None, now)
            .await
            .unwrap();
    }
    env.assert_audit_clean().await;
    // A run of two events, the second claiming a row the ledger does not hold.
    let event = |seq: i64, balance: i64, key: &str| {
        json!({"amount": 5, "balance": balance, "event_id": format!("balance.changed:u:{key}"),
               "occurred_at": "2026-12-06T00:00:00Z", "seq": seq, "transaction_key": key,
               "transaction_type": "TOP_UP", "type": "balance.changed", "user_id": "u"})
    };
    sqlx::query(
        "INSERT INTO credit.outbox (event_id, routing_key, events, run)
         VALUES ('balance.changed:u:k1', 'balance.changed', 2, $1)",
    )
    .bind(json!([event(1, 5, "k1"), event(3, 15, "k3")]))
    .execute(&env.pool)
    .await
    .unwrap();
    // A single event whose balance is not the row's.
    sqlx::query(
        "INSERT INTO credit.outbox (event_id, routing_key, payload)
         VALUES ('balance.changed:u:k2', 'balance.changed', $1)",
    )
    .bind(event(2, 11, "k2"))
    .execute(&env.pool)
    .await
    .unwrap();
    let report = credit_worker::ledger::audit::run(&env.pool).await.unwrap();
    let mut found: Vec<(&str, &str)> = report
        .mismatches
        .iter()
        .map(|m| (m.user_id.as_str(), m.problem.as_str()))
        .collect();
    found.sort();
    let no_row = "matches no ledger row (user, seq, amount, balance, type and key)";
    assert_eq!(
        found,
        [
            ("u", format!("event balance.changed:u:k2 {no_row}").as_str()),
            ("u", format!("event balance.changed:u:k3 {no_row}").as_str()),
        ]
    );
    env.cleanup().await;
}

/// The audit also sees what hides a credit's kind, a debit or events: a purchase relabelled
/// a grant, a refund of no purchase, a second debit of an execution under a key of no
/// decision's, an event moved to another
/// routing key, a relay watermark past every outbox id (events written after it would never
/// go out) and a retention horizon in the future; and it says when a check lists only its
/// first 1,000.
#[tokio::test]
async fn audit_sees_relabelled_credits_foreign_debits_and_hidden_events() {
    let env = TestEnv::with(no_refill).await;
    seed(&env, ["c", "d", "e", "f"], 100).await;
    // A library spend (no decision, no execution named) is no mismatch.
    env.ledger()
        .spend("f", 10, "S-1", json!({"reason": "test"}), Utc::now())
        .await
        .expect("spend");
    env.assert_audit_clean().await;
    for sql in [
        "ALTER TABLE credit.transactions DISABLE TRIGGER transactions_append_only",
        "UPDATE credit.transactions SET type = 'TOP_UP' WHERE user_id = 'c'",
        "UPDATE credit.outbox SET routing_key = 'balance.low'
          WHERE event_id = 'balance.changed:d:SEED'",
        "INSERT INTO credit.transactions (user_id, seq, transaction_key, type, amount, running_balance)
              VALUES ('e', 2, 'refund-1', 'REFUND', -10, 90)",
        "UPDATE credit.balances SET balance = 90, last_seq = 2 WHERE user_id = 'e'",
        // A second debit of an execution, under a key of no decision's.
        "INSERT INTO credit.transactions
              (user_id, seq, transaction_key, type, amount, running_balance, metadata)
              VALUES ('f', 3, 'usage-n-9-retry', 'USAGE', -10, 80, '{\"node_exec_id\": \"n-9\"}')",
        "UPDATE credit.balances SET balance = 80, last_seq = 3 WHERE user_id = 'f'",
    ] {
        sqlx::query(sql).execute(&env.pool).await.expect(sql);
    }
    let found = |report: &credit_worker::ledger::audit::AuditReport| {
        let mut found: Vec<(String, String)> = report
            .mismatches
            .iter()
            .map(|m| (m.user_id.clone(), m.problem.clone()))
            .collect();
        found.sort();
        found
    };
    let expect = |u: &str, p: &str| (u.to_owned(), p.to_owned());
    let report = credit_worker::ledger::audit::run(&env.pool)
        .await
        .expect("audit");
    assert_eq!(
        found(&report),
        vec![
            expect(
                "c",
                "event balance.changed:c:SEED matches no ledger row (user, seq, amount, balance, type and key)"
            ),
            expect("d", "seq 1 has no balance.changed event"),
            expect(
                "e",
                "seq 2 (REFUND) names no TOP_UP of the user with that much to refund"
            ),
            expect("e", "seq 2 has no balance.changed event"),
            expect("f", "seq 3 (USAGE) has no decision or settlement naming it"),
            expect("f", "seq 3 has no balance.changed event"),
        ]
    );
    assert!(!report.truncated);
    let last_id = env
        .scalar_i64("SELECT last_value FROM credit.outbox_id_seq")
        .await;
    sqlx::query(
        "UPDATE credit.outbox_relay
            SET published_through = $1 + 10, pruned_before = '9999-01-01'",
    )
    .bind(last_id)
    .execute(&env.pool)
    .await
    .expect("move the watermark and the horizon");
    let report = credit_worker::ledger::audit::run(&env.pool)
        .await
        .expect("audit");
    let watermark = format!(
        "the relays' watermark {} is past the last outbox id drawn, {last_id}: events \
         written until the outbox's ids pass it are taken as published and never sent",
        last_id + 10
    );
    assert_eq!(
        found(&report),
        vec![
            expect(
                "",
                "the outbox's retention horizon 9999-01-01 00:00:00+00 is in the future: no \
                 ledger row before it is checked for its event"
            ),
            expect("", &watermark),
            expect(
                "c",
                "event balance.changed:c:SEED matches no ledger row (user, seq, amount, balance, type and key)"
            ),
            expect(
                "e",
                "seq 2 (REFUND) names no TOP_UP of the user with that much to refund"
            ),
            expect("f", "seq 3 (USAGE) has no decision or settlement naming it"),
        ]
    );
    let text = credit_worker::tools::audit_text(&report, "clean");
    assert!(text.contains(&format!("\n  outbox: {watermark}")), "{text}");
    // A worker's start mends it, saying so: the sequence moved past the watermark, so that
    // the events written from now on go out.
    let (mut w, _, log) = WorkerProcess::spawn_logged(
        &env.process_env(),
        &["run"],
        "warn,credit_worker::telemetry=info",
    );
    let line = "the outbox's sequence was behind the ids in use";
    let within = Duration::from_secs(30);
    wait_for_line(&log, line, within, "the start moving the sequence on");
    w.sigterm();
    assert_eq!(w.wait_exit(within).await, Some(0));
    let report = credit_worker::ledger::audit::run(&env.pool)
        .await
        .expect("audit");
    assert!(
        !report
            .mismatches
            .iter()
            .any(|m| m.problem.contains("watermark")),
        "{:?}",
        report.mismatches
    );
    // 1,000 balances with no ledger rows: all listed; one more, and the check lists 1,000
    // and says there are more.
    sqlx::query(
        "INSERT INTO credit.balances (user_id, balance, last_seq)
         SELECT 'many-' || i, 1, 0 FROM generate_series(1, 1000) i",
    )
    .execute(&env.pool)
    .await
    .expect("balances without rows");
    let report = credit_worker::ledger::audit::run(&env.pool)
        .await
        .expect("audit");
    assert!(!report.truncated);
    assert_eq!(report.mismatches.len(), 1000 + 4);
    sqlx::query("INSERT INTO credit.balances (user_id, balance, last_seq) VALUES ('many-x', 1, 0)")
        .execute(&env.pool)
        .await
        .expect("one more");
    let report = credit_worker::ledger::audit::run(&env.pool)
        .await
        .expect("audit");
    assert!(report.truncated);
    assert_eq!(report.mismatches.len(), 1000 + 4);
    let text = credit_worker::tools::audit_text(&report, "clean");
    assert!(
        text.contains("1004 MISMATCHES (a check found more than the 1,000 it lists)"),
        "{text}"
    );
    env.cleanup().await;
}

/// An account whose refill fails for good (here a ledger row already holding the month's key)
/// is reported when the sweep ends, after every other account was refilled, those of its own
/// range included.
#[tokio::test]
async fn a_range_that_cannot_be_refilled_holds_up_no_other() {
    let env = TestEnv::with(no_refill).await;
    for i in 0..20 {
        sqlx::query("INSERT INTO credit.balances (user_id) VALUES ($1)")
            .bind(format!("r{i:02}"))
            .execute(&env.pool)
            .await
            .unwrap();
    }
    sqlx::query(
        "INSERT INTO credit.transactions (user_id, seq, transaction_key, type, amount, running_balance)
         VALUES ('r03', 1, 'MONTHLY-CREDIT-TOP-UP-2026-12', 'GRANT', 1, 1)",
    )
    .execute(&env.pool)
    .await
    .unwrap();
    let policy = credit_worker::ledger::RefillPolicy { target: 100 };
    let month: Month = "2026-12".parse().unwrap();
    let swept = refill::sweep(on(&env.pool), policy, month, None, 2, |_| {}).await;
    let e = swept.expect_err("r03's range fails");
    assert_eq!(
        e.to_string(),
        "database: error returned from database: duplicate key value violates unique constraint \"transactions_pkey\""
    );
    // The range (r01, r03] failed as one transaction, then its halves were swept apart:
    // r02 was refilled with the other 18, r03 alone was not.
    let refilled = "SELECT count(*) FROM credit.balances WHERE refill_month = '2026-12-01'";
    assert_eq!(env.scalar_i64(refilled).await, 19);
    let balance = |u: &str| format!("SELECT balance FROM credit.balances WHERE user_id = '{u}'");
    assert_eq!(env.scalar_i64(&balance("r02")).await, 100);
    assert_eq!(env.scalar_i64(&balance("r03")).await, 0);
    env.cleanup().await;
}

/// A debt too deep for one grant to reach the target (target − balance past i64) is refused
/// by the sweep and by a one-user refill alike, never granted less; the others are refilled.
#[tokio::test]
async fn a_debt_too_deep_to_refill_is_refused_not_granted_less() {
    let env = TestEnv::with(no_refill).await;
    for (user, balance) in [("d0", 0), ("d1", -i64::MAX + 999), ("d2", 5)] {
        sqlx::query("INSERT INTO credit.balances (user_id, balance) VALUES ($1, $2)")
            .bind(user)
            .bind(balance)
            .execute(&env.pool)
            .await
            .unwrap();
    }
    let policy = credit_worker::ledger::RefillPolicy { target: 1000 };
    let month: Month = "2026-12".parse().unwrap();
    let swept = refill::sweep(on(&env.pool), policy, month, None, 3, |_| {}).await;
    let e = swept.expect_err("d1 is refused");
    assert_eq!(
        e.to_string(),
        "database: error returned from database: bigint out of range"
    );
    let balance = |u: &str| format!("SELECT balance FROM credit.balances WHERE user_id = '{u}'");
    assert_eq!(env.scalar_i64(&balance("d0")).await, 1000);
    assert_eq!(env.scalar_i64(&balance("d2")).await, 1000);
    assert_eq!(env.scalar_i64(&balance("d1")).await, -i64::MAX + 999);
    let one = refill::sweep_asked(
        on(&env.pool),
        policy,
        Some(month),
        Utc::now(),
        Some("d1"),
        1,
        |_| {},
    );
    let e = one.await.expect_err("d1 is refused alone too");
    assert_eq!(
        e.to_string(),
        "refill: target 1000 − balance -9223372036854774808 of user d1 overflows a 64-bit \
         integer; a top-up must reduce the debt first"
    );
    let rows = "SELECT count(*) FROM credit.transactions WHERE user_id = 'd1'";
    assert_eq!(env.scalar_i64(rows).await, 0);
    env.cleanup().await;

    // With the lazy refill on, an operation on such an account still goes through (the
    // top-up that reduces the debt, say), the refill skipped and the month left unevaluated.
    let env = TestEnv::with(|s| s.refill.target = 1000).await;
    sqlx::query("INSERT INTO credit.balances (user_id, balance) VALUES ('d1', $1)")
        .bind(-i64::MAX + 999)
        .execute(&env.pool)
        .await
        .unwrap();
    let topped = env
        .ledger()
        .credit(TxType::TopUp, "d1", 5, Some("t1"), None, Utc::now())
        .await
        .expect("the top-up goes through");
    assert_eq!(topped.balance, -i64::MAX + 1004);
    let month =
        "SELECT count(*) FROM credit.balances WHERE user_id = 'd1' AND refill_month IS NULL";
    assert_eq!(env.scalar_i64(month).await, 1);
    env.cleanup().await;
}

/// A failed operation for a first-time user leaves no account behind (the sweep would grant
/// it every month).
#[tokio::test]
async fn a_failed_first_operation_leaves_no_account() {
    let env = TestEnv::with(|s| s.refill.enabled = false).await;
    let e = env
        .ledger()
        .spend("nobody", 5, "BUY-1", json!({}), Utc::now())
        .await
        .unwrap_err();
    assert!(
        matches!(e, LedgerError::InsufficientBalance { .. }),
        "{e:?}"
    );
    let accounts = "SELECT count(*) FROM credit.balances WHERE user_id = 'nobody'";
    assert_eq!(env.scalar_i64(accounts).await, 0);
    env.cleanup().await;
}

/// Every writer locks balance rows in user_id order, first-time users included: a batch for
/// {c, m} whose `c` is new lets go of `m` before it waits for `c`, so a transaction that
/// creates `c` and then locks `m` (another replica's batch, a sweep) meets no deadlock.
#[tokio::test]
async fn a_first_time_user_is_locked_in_order_with_the_rest() {
    let env = TestEnv::with(|s| s.refill.enabled = false).await;
    seed(&env, ["m"], 100).await;
    let pricing = env.settings.pricing(CostTable::builtin().unwrap());
    let entries: Vec<_> = [("c", "first-c"), ("m", "first-m")]
        .iter()
        .map(|(u, id)| message::decode(&body(&platform_gpt4(u, id))).unwrap())
        .collect();
    // Another transaction creates `c` first, and commits only after it locked `m`.
    let mut other = env.pool.begin().await.unwrap();
    sqlx::query("INSERT INTO credit.balances (user_id) VALUES ('c')")
        .execute(&mut *other)
        .await
        .unwrap();
    let batch = {
        let (pool, pricing) = (env.pool.clone(), pricing.clone());
        tokio::spawn(
            async move { decide::decide_batch(&pool, &pricing, &entries, Utc::now()).await },
        )
    };
    env.wait_for_one_lock_waiter(Duration::from_secs(30), "the batch waiting for c")
        .await;
    sqlx::query("SELECT 1 FROM credit.balances WHERE user_id = 'm' FOR UPDATE")
        .execute(&mut *other)
        .await
        .unwrap();
    other.commit().await.unwrap();
    let verdicts = batch.await.unwrap().expect("no deadlock");
    let decided = |outcome, cost, balance| Verdict::Decided {
        outcome,
        cost,
        fee: 0,
        uncollected: 0,
        balance,
    };
    assert_eq!(
        verdicts,
        [
            decided(Outcome::Rejected, 10, 0),
            decided(Outcome::Charged, 10, 90)
        ]
    );
    // m pays 10; c, created with nothing and no refill, is refused.
    let balance = |u: &'static str| {
        let ledger = env.ledger();
        async move { ledger.balance(u, Utc::now()).await.unwrap() }
    };
    assert_eq!((balance("c").await, balance("m").await), (0, 90));
    env.cleanup().await;
}

/// A refund asked again in a new month brings that month's lazy refill with it, as any
/// operation does, and answers the balance stored.
#[tokio::test]
async fn a_repeated_refund_in_a_new_month_keeps_the_refill_it_answers_with() {
    let env = TestEnv::new().await;
    let ledger = env.ledger();
    let dec = Utc.with_ymd_and_hms(2031, 12, 10, 0, 0, 0).unwrap();
    let jan = Utc.with_ymd_and_hms(2032, 1, 5, 0, 0, 0).unwrap();
    let keys = ("re_1", "pi_1");
    let top_up = ledger.credit(TxType::TopUp, "r", 300, Some("pi_1"), None, dec);
    assert_eq!(top_up.await.expect("top-up").balance, 1300);
    let first = ledger
        .refund("r", 300, keys, None, dec)
        .await
        .expect("refund");
    assert_eq!((first.applied, first.balance), (true, 1000));
    ledger
        .spend("r", 900, "S-1", json!({}), dec)
        .await
        .expect("spend");
    let again = ledger
        .refund("r", 300, keys, None, jan)
        .await
        .expect("again");
    assert_eq!((again.applied, again.seq, again.balance), (false, 3, 1000));
    let stored = env
        .scalar_i64("SELECT balance FROM credit.balances WHERE user_id = 'r'")
        .await;
    assert_eq!(stored, 1000);
    env.assert_audit_clean().await;
    env.cleanup().await;
}

/// A month's report: the movements by type and direction, and the positions at its start and
/// end, exactly, with the rows of the months around it left out; the CLI prints the same.
#[tokio::test]
async fn a_month_report_adds_up_what_came_in_and_went_out() {
    use credit_worker::ledger::report;
    let env = TestEnv::new().await;
    let ledger = env.ledger();
    let day = |m: u32, d: u32| Utc.with_ymd_and_hms(2025, m, d, 9, 0, 0).unwrap();
    // October: a 1000 (refill) + 300; d 1000 (refill) − 900.
    let a_top_up = ledger.credit(TxType::TopUp, "a", 300, Some("pi_a"), None, day(10, 10));
    assert_eq!(a_top_up.await.expect("a's top-up").balance, 1300);
    ledger
        .spend("d", 900, "S-d1", json!({}), day(10, 12))
        .await
        .expect("d's spend");
    // November: a − 200 (no refill at 1300); d 900 (refill) + 400 − 1300 − 400 (refund):
    // −300; n 1000 (refill) + 25.
    ledger
        .spend("a", 200, "S-a1", json!({}), day(11, 3))
        .await
        .expect("a's spend");
    let d_top_up = ledger.credit(TxType::TopUp, "d", 400, Some("pi_d"), None, day(11, 4));
    assert_eq!(d_top_up.await.expect("d's top-up").balance, 1400);
    ledger
        .spend("d", 1300, "S-d2", json!({}), day(11, 5))
        .await
        .expect("d's spend");
    let refund = ledger.refund("d", 400, ("re_d", "pi_d"), None, day(11, 6));
    assert_eq!(refund.await.expect("d's refund").balance, -300);
    let grant = ledger.credit(
        TxType::Grant,
        "n",
        25,
        Some("G-n"),
        Some("promo"),
        day(11, 30),
    );
    assert_eq!(grant.await.expect("n's grant").balance, 1025);
    // December, after the month: not in it.
    ledger
        .spend("a", 100, "S-a2", json!({}), day(12, 1))
        .await
        .expect("a's spend");

    let november: Month = "2025-11".parse().unwrap();
    let settle = Some(std::time::Duration::from_secs(61));
    let r = report::month(&env.pool, november, Utc::now(), settle)
        .await
        .expect("report");
    let moved: Vec<(&str, &str, i64, i128)> = r
        .movements
        .iter()
        .map(|m| (m.tx_type.as_str(), m.direction, m.rows, m.credits))
        .collect();
    assert_eq!(
        moved,
        vec![
            ("TOP_UP", "in", 1, 400),
            ("GRANT", "in", 3, 1925),
            ("USAGE", "out", 2, -1500),
            ("REFUND", "out", 1, -400),
        ]
    );
    assert_eq!(r.net, 425);
    let held_owed = |p: &report::Position| {
        (
            p.held,
            p.owed,
            p.net,
            p.accounts_in_credit,
            p.accounts_in_debt,
        )
    };
    assert_eq!(held_owed(&r.opening), (1400, 0, 1400, 2, 0));
    assert_eq!(held_owed(&r.closing), (2125, 300, 1825, 2, 1));
    assert_eq!(r.active_accounts, 3);
    assert_eq!(r.from.to_rfc3339(), "2025-11-01T00:00:00+00:00");
    assert_eq!(r.until.to_rfc3339(), "2025-12-01T00:00:00+00:00");
    let final_from = r.final_from.map(|t| t.to_rfc3339());
    assert_eq!(
        (final_from.as_deref(), r.is_final),
        (Some("2025-12-01T00:01:01+00:00"), true)
    );
    // The month under way is not final, nor is one whose writes nothing bounds.
    let current = Month::of(Utc::now());
    let r = report::month(&env.pool, current, Utc::now(), settle)
        .await
        .expect("report");
    assert!(!r.is_final);
    let r = report::month(&env.pool, november, Utc::now(), None)
        .await
        .expect("report");
    assert_eq!((r.final_from, r.is_final), (None, false));

    // The CLI: the same figures, and its text; a month not begun is refused.
    let json = env.cli_json(&["report", "--month", "2025-11"]);
    assert_eq!(json["net"], 425);
    assert_eq!(json["closing"]["owed"], 300);
    assert_eq!(json["final"], true);
    assert_eq!(
        json["movements"][1],
        json!({"type": "GRANT", "direction": "in", "rows": 3, "credits": 1925})
    );
    let out = env.cli(&["report", "--month", "2025-10"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.starts_with(
            "2025-10 (rows from 2025-10-01 00:00 to before 2025-11-01 00:00 UTC), read at "
        ),
        "{text}"
    );
    assert!(
        text.contains("\n  GRANT    in            2                 2000\n"),
        "{text}"
    );
    assert!(
        text.contains("\n  opening: 0 held by 0 accounts, 0 owed by 0 accounts (net 0)\n"),
        "{text}"
    );
    assert!(
        text.contains("\n  closing: 1400 held by 2 accounts, 0 owed by 0 accounts (net 1400)\n"),
        "{text}"
    );
    let next_year = (Utc::now().year() + 1).to_string() + "-01";
    let out = env.cli(&["report", "--month", &next_year, "--json"]);
    assert_eq!(out.status.code(), Some(1));
    let refused: serde_json::Value = serde_json::from_slice(&out.stdout).expect("a JSON error");
    assert_eq!(refused["error"]["code"], "bad_request");
    env.assert_audit_clean().await;
    env.cleanup().await;
}

/// A month's report holds the rows of its first instant and of its last microsecond, and
/// none of the instants either side.
#[tokio::test]
async fn a_month_report_counts_the_rows_of_its_first_and_last_instants() {
    use credit_worker::ledger::report;
    let env = TestEnv::with(no_refill).await;
    let ledger = env.ledger();
    let instant = |text: &str| -> DateTime<Utc> { text.parse().expect("a time") };
    for (at, amount, key) in [
        ("2025-10-31T23:59:59.999999Z", 1, "before"),
        ("2025-11-01T00:00:00Z", 10, "first"),
        ("2025-11-30T23:59:59.999999Z", 100, "last"),
        ("2025-12-01T00:00:00Z", 1000, "after"),
    ] {
        let grant = ledger.credit(TxType::Grant, "edge", amount, Some(key), None, instant(at));
        grant.await.expect(key);
    }
    let november: Month = "2025-11".parse().unwrap();
    let r = report::month(&env.pool, november, Utc::now(), None)
        .await
        .expect("report");
    let moved: Vec<(&str, i64, i128)> = r
        .movements
        .iter()
        .map(|m| (m.tx_type.as_str(), m.rows, m.credits))
        .collect();
    assert_eq!(moved, vec![("GRANT", 2, 110)]);
    assert_eq!(
        (r.opening.held, r.closing.held, r.active_accounts),
        (1, 111, 1)
    );
    env.cleanup().await;
}

/// A sweep on `pool` with no bound on its statements' wait.
fn on(pool: &sqlx::PgPool) -> refill::Sweeper<'_> {
    refill::Sweeper { pool, stall: None }
}
