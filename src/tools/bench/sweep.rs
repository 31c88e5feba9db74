//! `bench --sweep-users M`: one refill sweep over M users who have never been refilled.

use std::time::Instant;

use chrono::Utc;
use serde::Serialize;

use crate::config::Settings;
use crate::ledger::{seed, RefillPolicy};
use crate::refill::{Month, SweepReport};
use crate::tools::scratch::Scratch;
use sqlx::PgPool;

#[derive(Debug, Serialize)]
pub(crate) struct SweepResult {
    pub sweep_users: u64,
    pub chunk_size: i64,
    pub seconds: f64,
    pub users_per_s: f64,
    pub users_refilled: i64,
    #[serde(serialize_with = "crate::ledger::total::serialize_total")]
    pub credits_granted: i128,
    pub seed_seconds: f64,
    pub verified: bool,
    pub problems: Vec<String>,
}

pub async fn run(
    settings: &Settings,
    scratch: &Scratch,
    users: u64,
) -> anyhow::Result<SweepResult> {
    if !settings.refill.enabled {
        anyhow::bail!("refill.enabled is false");
    }
    let users_i64 = i64::try_from(users)?;
    let pool = crate::db::connect_and_migrate(&scratch.database).await?;
    let seed_seconds = seed_users(&pool, users_i64).await?;

    let policy = RefillPolicy {
        target: settings.refill.target,
    };
    let chunk = settings.refill.chunk_size;
    let bar = super::progress(users, "sweep");
    let started = Instant::now();
    let month = Month::of(Utc::now());
    let report = crate::refill::sweep(
        crate::refill::Sweeper::new(&pool, &settings.database),
        policy,
        month,
        None,
        chunk,
        |r| {
            bar.set_position(u64::try_from(r.users_evaluated).unwrap_or(0));
        },
    )
    .await?;
    let seconds = started.elapsed().as_secs_f64().max(1e-9);
    bar.finish_and_clear();

    let problems = verify(&pool, settings.refill.target, users_i64, &report).await?;
    pool.close().await;
    Ok(SweepResult {
        sweep_users: users,
        chunk_size: chunk,
        seconds,
        users_per_s: users as f64 / seconds,
        users_refilled: report.users_refilled,
        credits_granted: report.credits_granted,
        seed_seconds,
        verified: problems.is_empty(),
        problems,
    })
}

/// Creates `users` accounts never refilled; returns how long it took in seconds.
async fn seed_users(pool: &PgPool, users: i64) -> anyhow::Result<f64> {
    let seeding = Instant::now();
    seed::seed_empty_users(pool, users).await?;
    seed::analyze_balances(pool).await?;
    // The seeding's writes are not the sweep's: a checkpoint they trigger would otherwise
    // land in the timed sweep, in some runs and not others.
    if !seed::checkpoint(pool).await {
        tracing::warn!("CHECKPOINT refused (not a superuser or pg_checkpoint): the sweep may pay for the seeding's writes");
    }
    Ok(seeding.elapsed().as_secs_f64())
}

/// What differs from a sweep that refilled every one of `users` to `target`: the report, the
/// ledger rows, the events, the balances' sum and the audit.
async fn verify(
    pool: &PgPool,
    target: i64,
    users: i64,
    report: &SweepReport,
) -> anyhow::Result<Vec<String>> {
    let mut problems = Vec::new();
    let expect_refilled = if target > 0 { users } else { 0 };
    if report.users_evaluated != users || report.users_refilled != expect_refilled {
        problems.push(format!(
            "{} users evaluated, {} refilled; expected {users} and {expect_refilled}",
            report.users_evaluated, report.users_refilled
        ));
    }
    let (rows, events, total): (i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM credit.transactions),
                (SELECT coalesce(sum(events), 0)::int8 FROM credit.outbox
                  WHERE routing_key = 'balance.changed'),
                (SELECT coalesce(sum(balance), 0)::int8 FROM credit.balances)",
    )
    .fetch_one(pool)
    .await?;
    // None when the expected total does not fit an i64: then no total can match it.
    let expect_total = target.checked_mul(users);
    if rows != expect_refilled
        || events != expect_refilled
        || Some(total) != expect_total
        || report.credits_granted != i128::from(total)
    {
        problems.push(format!(
            "{rows} ledger rows, {events} events, Σ balance {total}, {} credits reported; \
             expected {expect_refilled} rows and events and {expect_total:?}",
            report.credits_granted,
        ));
    }
    let audit = crate::ledger::audit::run(pool).await?;
    for m in audit.mismatches.iter().take(5) {
        problems.push(format!("audit: {}: {}", m.user_id, m.problem));
    }
    Ok(problems)
}

impl SweepResult {
    pub(crate) fn print(&self) -> std::io::Result<()> {
        outln!(
            "refill sweep         {:>9.0} users/s  ({} users in {:.2} s, chunk {}; seeding took {:.1} s)",
            self.users_per_s, self.sweep_users, self.seconds, self.chunk_size, self.seed_seconds
        );
        if self.problems.is_empty() {
            outln!(
                "verification         ok: {} users refilled, {} credits granted, audit clean",
                self.users_refilled,
                self.credits_granted
            );
        } else {
            outln!("verification         FAILED");
            for p in &self.problems {
                outln!("  - {p}");
            }
        }
        Ok(())
    }
}
