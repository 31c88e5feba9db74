//! `credit-worker demo`: a short, realistic run against the configured PostgreSQL server and
//! RabbitMQ broker, isolated in a scratch database (`credit_demo_<tag>`) and a scratch AMQP
//! namespace (`demo-<tag>.`), both removed afterwards.
//!
//! It starts the worker in-process, publishes a small stream of node executions the way the
//! graph executor would (several users and blocks, a user's own API key, a user running out of
//! credits, a duplicate delivery and one unparseable body), then the completions of three
//! token-priced LLM calls (an extra charge, a refund, and one that leaves a balance in debt),
//! waits until everything is decided, settled and published, runs next month's refill sweep,
//! and prints balances, decisions, settlements, events, the dead letter and the audit.

use std::collections::HashMap;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{anyhow, Context};
use futures::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicGetOptions, QueueBindOptions};
use lapin::types::{AMQPValue, FieldTable};
use serde::Serialize;
use serde_json::{json, Value};
use sqlx::{PgPool, Row};
use tokio::time::Instant;

use crate::amqp::topology::{self, Names};
use crate::config::Settings;
use crate::ledger::account::RefillPolicy;
use crate::ledger::audit::AuditReport;
use crate::ledger::month::Month;
use crate::ledger::sweep::SweepReport;
use crate::ledger::TxType;
use crate::tools::scratch::Scratch;

/// The demo's monthly allowance: small, so one user runs out within a few executions (a revid
/// video costs 307).
const DEMO_REFILL_TARGET: i64 = 700;
/// The demo's low-balance threshold, below the allowance so a crossing is visible.
const DEMO_LOW_BALANCE: i64 = 150;
/// Longest wait for any one stage (connect, decide, publish events, dead letter).
const STAGE_TIMEOUT: Duration = Duration::from_secs(20);

/// Consumer tag of the event tap.
const TAP_TAG: &str = "demo-tap";

const TEXT_GEN: &str = "1f292d4a-41a4-4977-9684-7c8d560b9f91";
const WEB_SEARCH: &str = "87840993-2053-44b7-8da4-187ad4ee518c";
const SHORT_VIDEO: &str = "361697fb-0c4f-4feb-aed3-8320c88c771b";

/// One node execution of the scripted stream.
struct Step {
    node_exec_id: &'static str,
    user: &'static str,
    graph_exec_id: &'static str,
    block_id: &'static str,
    block: &'static str,
    what: &'static str,
    inputs: Value,
}

/// A platform credential (the user pays in credits): id, provider, name in its title.
type PlatformKey = (&'static str, &'static str, &'static str);

const OPENAI: PlatformKey = ("53c25cb8-e3ee-465c-a4d1-e75a4c899c2a", "openai", "OpenAI");
const ANTHROPIC: PlatformKey = (
    "24e5d942-d9e3-4798-8151-90143ee55629",
    "anthropic",
    "Anthropic",
);
const JINA: PlatformKey = ("7f26de70-ba0d-494e-ba76-238e65e7b45f", "jina", "Jina");
const REVID: PlatformKey = ("fdb7f412-f519-48d1-9b5f-d2f73d0e01fe", "revid", "Revid");

/// A platform credential as the executor passes it in a block's `credentials` input.
fn platform_key((id, provider, name): PlatformKey) -> Value {
    json!({"id": id, "provider": provider,
           "type": "api_key", "title": format!("Use Credits for {name}")})
}

/// The scripted executions, in publish order (before the duplicate and the invalid body).
fn script() -> Vec<Step> {
    let alice_ge = "5c0e2a1d-7b3f-4f7e-9a61-0d2c8e4b9f10";
    let bob_ge = "a8f4c2e6-1d9b-4c3a-8e57-6b2f0c9d1e20";
    let carol_ge = "e1b7d3a9-4c6f-4b2e-a0d8-9f5c3e7a2b30";
    vec![
        Step {
            node_exec_id: "0f6c1a52-3d84-4e1b-9a7c-2b5e8d0f4a01",
            user: "alice",
            graph_exec_id: alice_ge,
            block_id: TEXT_GEN,
            block: "AITextGeneratorBlock",
            what: "gpt-4-turbo, platform OpenAI key",
            inputs: json!({"model": "gpt-4-turbo", "prompt": "Summarise this support ticket",
                           "credentials": platform_key(OPENAI)}),
        },
        Step {
            node_exec_id: "0f6c1a52-3d84-4e1b-9a7c-2b5e8d0f4a02",
            user: "alice",
            graph_exec_id: alice_ge,
            block_id: TEXT_GEN,
            block: "AITextGeneratorBlock",
            what: "gpt-4o, platform OpenAI key",
            inputs: json!({"model": "gpt-4o", "prompt": "Draft a polite reply",
                           "credentials": platform_key(OPENAI)}),
        },
        Step {
            node_exec_id: "7a2d9e4b-5c1f-4d3a-b8e6-1f0a3c5e7b01",
            user: "bob",
            graph_exec_id: bob_ge,
            block_id: TEXT_GEN,
            block: "AITextGeneratorBlock",
            what: "gpt-4o, the user's own OpenAI key",
            inputs: json!({"model": "gpt-4o", "prompt": "Translate to German",
                           "credentials": {"id": "c3d1f0a8-6e2b-4b7c-9d54-8a1e2f3b4c5d",
                                           "provider": "openai", "type": "api_key",
                                           "title": "My OpenAI key"}}),
        },
        Step {
            node_exec_id: "0f6c1a52-3d84-4e1b-9a7c-2b5e8d0f4a03",
            user: "alice",
            graph_exec_id: alice_ge,
            block_id: TEXT_GEN,
            block: "AITextGeneratorBlock",
            what: "claude-sonnet-4-6, platform Anthropic key",
            inputs: json!({"model": "claude-sonnet-4-6", "prompt": "Check the tone",
                           "credentials": platform_key(ANTHROPIC)}),
        },
        Step {
            node_exec_id: "d4e8b1c7-2a6f-4e9d-8c3b-5a7f1e0d2c01",
            user: "carol",
            graph_exec_id: carol_ge,
            block_id: SHORT_VIDEO,
            block: "AIShortformVideoCreatorBlock",
            what: "revid.ai video, platform key",
            inputs: json!({"script": "Three tips for better sleep", "voice": "Lily",
                           "credentials": platform_key(REVID)}),
        },
        Step {
            node_exec_id: "7a2d9e4b-5c1f-4d3a-b8e6-1f0a3c5e7b02",
            user: "bob",
            graph_exec_id: bob_ge,
            block_id: WEB_SEARCH,
            block: "SearchTheWebBlock",
            what: "Jina search, platform key",
            inputs: json!({"query": "rust amqp exactly once", "credentials": platform_key(JINA)}),
        },
        Step {
            node_exec_id: "d4e8b1c7-2a6f-4e9d-8c3b-5a7f1e0d2c02",
            user: "carol",
            graph_exec_id: carol_ge,
            block_id: SHORT_VIDEO,
            block: "AIShortformVideoCreatorBlock",
            what: "revid.ai video, platform key",
            inputs: json!({"script": "Five stretches for the office", "voice": "Lily",
                           "credentials": platform_key(REVID)}),
        },
        Step {
            node_exec_id: "d4e8b1c7-2a6f-4e9d-8c3b-5a7f1e0d2c03",
            user: "carol",
            graph_exec_id: carol_ge,
            block_id: SHORT_VIDEO,
            block: "AIShortformVideoCreatorBlock",
            what: "revid.ai video, platform key",
            inputs: json!({"script": "Why hydration matters", "voice": "Lily",
                           "credentials": platform_key(REVID)}),
        },
        Step {
            node_exec_id: "d4e8b1c7-2a6f-4e9d-8c3b-5a7f1e0d2c04",
            user: "carol",
            graph_exec_id: carol_ge,
            block_id: TEXT_GEN,
            block: "AITextGeneratorBlock",
            what: "gpt-4o, platform OpenAI key",
            inputs: json!({"model": "gpt-4o", "prompt": "Write the video description",
                           "credentials": platform_key(OPENAI)}),
        },
    ]
}

/// The executor's report after a block ran: the same entry with `phase: "completed"` and the
/// token counts the LLM call used.
struct Completion {
    node_exec_id: &'static str,
    input_tokens: u64,
    output_tokens: u64,
    what: &'static str,
}

/// Completions, published after the whole script so each settles a decided execution.
fn completions() -> Vec<Completion> {
    vec![
        Completion {
            // gpt-4-turbo at 1500 / 4500 per 10^6: ceil(15 + 9) = 24 after 10 pre-flight.
            node_exec_id: "0f6c1a52-3d84-4e1b-9a7c-2b5e8d0f4a01",
            input_tokens: 10_000,
            output_tokens: 2_000,
            what: "long ticket: costs more than its pre-flight price",
        },
        Completion {
            // claude-sonnet-4-6 at 450 / 2250: ceil(0.9 + 1.125) = 3 after 9 pre-flight.
            node_exec_id: "0f6c1a52-3d84-4e1b-9a7c-2b5e8d0f4a03",
            input_tokens: 2_000,
            output_tokens: 500,
            what: "short answer: part of the pre-flight price back",
        },
        Completion {
            // gpt-4o at 375 / 1500: ceil(37.5 + 60) = 98 after 3, more than carol has left.
            node_exec_id: "d4e8b1c7-2a6f-4e9d-8c3b-5a7f1e0d2c04",
            input_tokens: 100_000,
            output_tokens: 40_000,
            what: "very long description: the balance goes into debt",
        },
    ]
}

/// A started entry carries no stats: it is priced pre-flight (a token-priced model at its flat
/// MODEL_COST), as the executor does before the block runs.
fn body(step: &Step) -> Vec<u8> {
    entry(step).to_string().into_bytes()
}

fn completion_body(step: &Step, c: &Completion) -> Vec<u8> {
    let mut e = entry(step);
    if let Some(obj) = e.as_object_mut() {
        obj.insert("phase".into(), json!("completed"));
        obj.insert("status".into(), json!("COMPLETED"));
        obj.insert(
            "stats".into(),
            json!({"walltime": 2.5, "input_size": 240,
                   "input_token_count": c.input_tokens, "output_token_count": c.output_tokens}),
        );
    }
    e.to_string().into_bytes()
}

fn entry(step: &Step) -> Value {
    json!({
        "user_id": step.user,
        "graph_exec_id": step.graph_exec_id,
        "graph_id": format!("graph-{}", step.user),
        "graph_version": 3,
        "node_exec_id": step.node_exec_id,
        "node_id": format!("node-{}", &step.node_exec_id[..8]),
        "block_id": step.block_id,
        "inputs": step.inputs,
        "execution_context": {"user_timezone": "UTC"},
    })
}

/// The body that is not JSON at all (a truncated write by a buggy producer).
const INVALID_BODY: &[u8] = b"{\"user_id\": \"dave\", \"node_exec_id\": ";

#[derive(Debug, Serialize)]
struct Published {
    messages: usize,
    node_executions: usize,
    duplicates: usize,
    invalid: usize,
    completions: usize,
}

#[derive(Debug, Serialize)]
struct BalanceRow {
    user_id: String,
    balance: i64,
    ledger_rows: i64,
}

#[derive(Debug, Serialize)]
struct DecisionRow {
    node_exec_id: String,
    user_id: String,
    block: String,
    block_id: String,
    description: String,
    outcome: String,
    cost: i64,
    fee: i64,
    transaction_key: Option<String>,
}

#[derive(Debug, Serialize)]
struct SettlementRow {
    node_exec_id: String,
    user_id: String,
    description: String,
    status: String,
    pre: i64,
    post: i64,
    delta: i64,
    transaction_key: Option<String>,
}

#[derive(Debug, Serialize)]
struct EventRow {
    routing_key: String,
    message_id: String,
    body: Value,
}

#[derive(Debug, Serialize)]
struct DeadLetter {
    body: String,
    #[serde(rename = "x-credit-error")]
    reason: String,
}

/// An auto top-up request the demo's payment side fulfilled (twice: the retry changes nothing).
#[derive(Debug, Serialize)]
struct AutoTopUpRow {
    request_id: String,
    user_id: String,
    amount: i64,
    balance_at_request: i64,
    applied: bool,
    applied_again: bool,
    balance: i64,
}

#[derive(Debug, Serialize)]
struct Report {
    namespace: String,
    database: String,
    settings: Value,
    published: Published,
    /// After every decision and settlement, before the refill.
    balances: Vec<BalanceRow>,
    decisions: Vec<DecisionRow>,
    settlements: Vec<SettlementRow>,
    auto_top_ups: Vec<AutoTopUpRow>,
    refill: SweepReport,
    /// After next month's refill sweep.
    balances_after_refill: Vec<BalanceRow>,
    events: Vec<EventRow>,
    dead_letters: Vec<DeadLetter>,
    audit: AuditReport,
}

pub async fn run(settings: Settings, json: bool) -> anyhow::Result<ExitCode> {
    let scratch = Scratch::new(&settings, "demo")?;
    let db_name = scratch.db_name.clone();
    let mut demo = settings.clone();
    demo.amqp = scratch.amqp.clone();
    demo.database = scratch.database.clone();
    demo.http.listen = None;
    demo.refill.enabled = true;
    demo.refill.lazy = true;
    demo.refill.target = DEMO_REFILL_TARGET;
    demo.low_balance.threshold = DEMO_LOW_BALANCE;
    let names = Names::new(&demo.amqp.namespace);

    if !json {
        outln!(
            "credit-worker demo: namespace {}  database {db_name}",
            demo.amqp.namespace
        );
        outln!(
            "monthly allowance (refill.target) {DEMO_REFILL_TARGET}, low_balance.threshold \
             {DEMO_LOW_BALANCE}, execution fee every {}th execution, built-in cost table\n",
            demo.execution_fee.every
        );
    }
    let outcome = scenario(&demo, &names, &db_name).await;
    // Clean up whatever the scenario got to create, success or not.
    scratch.remove(&[], &[]).await;
    let report = outcome?;
    if json {
        outln!("{}", serde_json::to_string(&report)?);
    } else {
        print_human(&report)?;
    }
    Ok(crate::tools::exit_code(report.audit.is_clean()))
}

async fn scenario(demo: &Settings, names: &Names, db_name: &str) -> anyhow::Result<Report> {
    // Broker first: an unreachable broker fails here, before anything is created, instead of
    // leaving the in-process worker retrying forever.
    let conn = tokio::time::timeout(
        STAGE_TIMEOUT,
        crate::amqp::connect(&demo.amqp, "credit-worker demo"),
    )
    .await
    .map_err(|_| anyhow!("amqp.url: the broker did not answer in time"))?
    .context("amqp.url: cannot connect to the broker")?;
    let ch = conn.create_channel().await?;
    topology::declare(&ch, &demo.amqp).await?;
    // The tap exists before anything is published, so it sees every event.
    let tap = topology::declare_private_queue(&ch).await?;
    ch.queue_bind(
        tap.as_str().into(),
        names.events.as_str().into(),
        "#".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await?;
    let mut events_in = ch
        .basic_consume(
            tap.as_str().into(),
            TAP_TAG.into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;

    // Same reason: fail fast on an unreachable database rather than inside the worker.
    let pool = tokio::time::timeout(
        STAGE_TIMEOUT,
        crate::db::connect_and_migrate(&demo.database),
    )
    .await
    .map_err(|_| anyhow!("database.url: the server did not answer in time"))?
    .context("database.url: cannot create the scratch database")?;

    let worker = crate::service::Worker::start(demo.clone()).await?;
    let result = drive(demo, names, &pool, &ch, &mut events_in, db_name).await;
    let stopped = worker.stop().await;
    pool.close().await;
    // Cancel the tap before closing, so lapin does not deliver into a closing channel.
    let _ = ch
        .basic_cancel(
            TAP_TAG.into(),
            lapin::options::BasicCancelOptions::default(),
        )
        .await;
    let _ = ch.close(200, "demo done".into()).await;
    let _ = crate::tools::close_connection(conn, "demo done").await;
    let report = result?;
    stopped.context("the worker did not stop cleanly")?;
    Ok(report)
}

async fn drive(
    demo: &Settings,
    names: &Names,
    pool: &PgPool,
    ch: &lapin::Channel,
    events_in: &mut lapin::Consumer,
    db_name: &str,
) -> anyhow::Result<Report> {
    let steps = script();
    let done = completions();
    let ledger = crate::ledger::Ledger::new(pool.clone(), demo.ledger_policy());
    // alice asks for 200 credits whenever her balance falls below 690.
    ledger
        .set_auto_top_up("alice", Some((690, 200)), chrono::Utc::now())
        .await?;
    let published = publish_script(demo, &steps, &done).await?;
    wait_until_settled(pool, steps.len(), done.len()).await?;
    let decisions = read_decisions(pool, &steps).await?;
    let settlements = read_settlements(pool, &done).await?;
    let auto_top_ups = fulfil_top_up_requests(&ledger, pool).await?;
    wait_until_settled(pool, steps.len(), done.len()).await?;
    let balances = read_balances(pool).await?;
    let refill = refill_next_month(demo, pool).await?;
    wait_until_settled(pool, steps.len(), done.len()).await?;
    let balances_after_refill = read_balances(pool).await?;
    let events = receive_events(pool, names, events_in).await?;
    let dead_letters = read_dead_letters(ch, &names.dead_queue, 1).await?;
    let audit = crate::ledger::audit::run(pool).await?;

    Ok(Report {
        namespace: demo.amqp.namespace.clone(),
        database: db_name.to_owned(),
        settings: json!({
            "refill.target": demo.refill.target,
            "low_balance.threshold": demo.low_balance.threshold,
            "execution_fee.every": demo.execution_fee.every,
            "execution_fee.amount": demo.execution_fee.amount,
        }),
        published: Published {
            messages: published,
            node_executions: steps.len(),
            duplicates: 1,
            invalid: 1,
            completions: done.len(),
        },
        balances,
        decisions,
        settlements,
        auto_top_ups,
        refill,
        balances_after_refill,
        events,
        dead_letters,
        audit,
    })
}

/// Next month's refill: it tops every account, carol's debt included, back up to the target.
async fn refill_next_month(
    demo: &Settings,
    pool: &PgPool,
) -> Result<crate::ledger::SweepReport, crate::ledger::LedgerError> {
    crate::ledger::sweep::sweep(
        crate::ledger::sweep::Sweeper::new(pool, &demo.database),
        RefillPolicy {
            target: demo.refill.target,
        },
        next_month(),
        None,
        100,
        |_| {},
    )
    .await
}

/// The payment side: every `top_up.requested` is answered with a `top_up` keyed by its
/// `request_id`, twice (a retry), which the key makes harmless.
async fn fulfil_top_up_requests(
    ledger: &crate::ledger::Ledger,
    pool: &PgPool,
) -> anyhow::Result<Vec<AutoTopUpRow>> {
    let requests: Vec<(String, String, i64, i64)> = sqlx::query_as(
        "SELECT payload->>'request_id', payload->>'user_id', (payload->>'amount')::int8,
                (payload->>'balance')::int8
           FROM credit.outbox WHERE routing_key = 'top_up.requested' ORDER BY id",
    )
    .fetch_all(pool)
    .await?;
    let mut rows = Vec::with_capacity(requests.len());
    for (request_id, user_id, amount, balance_at_request) in requests {
        let now = chrono::Utc::now();
        let key = Some(request_id.as_str());
        let first = ledger
            .credit(TxType::TopUp, &user_id, amount, key, None, now)
            .await?;
        let again = ledger
            .credit(TxType::TopUp, &user_id, amount, key, None, now)
            .await?;
        rows.push(AutoTopUpRow {
            request_id,
            user_id,
            amount,
            balance_at_request,
            applied: first.applied,
            applied_again: again.applied,
            balance: again.balance,
        });
    }
    Ok(rows)
}

/// Publishes the script the way the executor would, plus a duplicate delivery and an invalid
/// body; returns the number of messages.
async fn publish_script(
    demo: &Settings,
    steps: &[Step],
    done: &[Completion],
) -> anyhow::Result<usize> {
    let mut bodies: Vec<Vec<u8>> = steps.iter().map(body).collect();
    // A redelivery as the executor would cause it after a lost ack: alice's first execution.
    bodies.insert(4, body(&steps[0]));
    bodies.insert(7, INVALID_BODY.to_vec());
    for c in done {
        let step = steps
            .iter()
            .find(|s| s.node_exec_id == c.node_exec_id)
            .ok_or_else(|| anyhow!("completion of an unknown step {}", c.node_exec_id))?;
        bodies.push(completion_body(step, c));
    }
    crate::tools::publish::publish_entries(demo, &bodies).await
}

/// The month after the current one (UTC).
fn next_month() -> Month {
    let first = Month::of(chrono::Utc::now()).first_day();
    // 32 days after the 1st is always in the next month.
    let later = first + chrono::Duration::days(32);
    Month::of(later.and_time(chrono::NaiveTime::MIN).and_utc())
}

/// Waits until all `node_executions` are decided, all `settled` completions settled and every
/// event is published.
async fn wait_until_settled(
    pool: &PgPool,
    node_executions: usize,
    settled: usize,
) -> anyhow::Result<()> {
    let expected = i64::try_from(node_executions)?;
    wait_until("every node execution is decided", || async {
        scalar(pool, "SELECT count(*) FROM credit.decisions").await >= expected
    })
    .await?;
    let expected = i64::try_from(settled)?;
    wait_until("every completion is settled", || async {
        scalar(pool, "SELECT count(*) FROM credit.settlements").await >= expected
    })
    .await?;
    wait_until("the outbox is published", || async {
        // A failed poll counts as "not yet", as in `scalar`.
        crate::ledger::store::unpublished_events(pool).await.ok() == Some(0)
    })
    .await
}

/// Takes every event the outbox holds off the tap, acking each.
async fn receive_events(
    pool: &PgPool,
    names: &Names,
    events_in: &mut lapin::Consumer,
) -> anyhow::Result<Vec<EventRow>> {
    let total_events = usize::try_from(
        scalar(
            pool,
            "SELECT coalesce(sum(events), 0)::int8 FROM credit.outbox",
        )
        .await,
    )?;
    let mut events = Vec::with_capacity(total_events);
    let deadline = Instant::now() + STAGE_TIMEOUT;
    while events.len() < total_events {
        let d = match tokio::time::timeout_at(deadline, events_in.next()).await {
            Ok(Some(Ok(d))) => d,
            Ok(Some(Err(e))) => return Err(e.into()),
            Ok(None) | Err(_) => anyhow::bail!(
                "only {} of {total_events} events arrived on {}",
                events.len(),
                names.events
            ),
        };
        let body: Value = serde_json::from_slice(&d.data)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&d.data).into_owned()));
        let message_id = d
            .properties
            .message_id()
            .as_ref()
            .map(|s| s.to_string())
            .unwrap_or_default();
        anyhow::ensure!(
            d.ack(BasicAckOptions::default()).await?,
            "event tap channel closed"
        );
        events.push(EventRow {
            routing_key: d.routing_key.to_string(),
            message_id,
            body,
        });
    }
    Ok(events)
}

/// The decisions in queue order (the order they were decided in), each with its step's block
/// and description.
async fn read_decisions(pool: &PgPool, steps: &[Step]) -> anyhow::Result<Vec<DecisionRow>> {
    let order: HashMap<&str, (usize, &Step)> = steps
        .iter()
        .enumerate()
        .map(|(i, s)| (s.node_exec_id, (i, s)))
        .collect();
    let mut decisions = Vec::new();
    for r in sqlx::query(
        "SELECT node_exec_id, user_id, block_id, outcome, cost, fee, transaction_key
           FROM credit.decisions",
    )
    .fetch_all(pool)
    .await?
    {
        let node_exec_id: String = r.try_get("node_exec_id")?;
        let step = order.get(node_exec_id.as_str()).map(|(_, s)| s);
        decisions.push(DecisionRow {
            block: step.map_or("?", |s| s.block).to_owned(),
            description: step.map_or("", |s| s.what).to_owned(),
            node_exec_id,
            user_id: r.try_get("user_id")?,
            block_id: r.try_get("block_id")?,
            outcome: r.try_get("outcome")?,
            cost: r.try_get("cost")?,
            fee: r.try_get("fee")?,
            transaction_key: r.try_get("transaction_key")?,
        });
    }
    decisions.sort_by_key(|d| {
        order
            .get(d.node_exec_id.as_str())
            .map_or(usize::MAX, |(i, _)| *i)
    });
    Ok(decisions)
}

/// The settlements, in the completions' order.
async fn read_settlements(
    pool: &PgPool,
    done: &[Completion],
) -> anyhow::Result<Vec<SettlementRow>> {
    let mut rows = Vec::new();
    for r in sqlx::query(
        "SELECT node_exec_id, user_id, status, pre, post, delta, transaction_key
           FROM credit.settlements",
    )
    .fetch_all(pool)
    .await?
    {
        let node_exec_id: String = r.try_get("node_exec_id")?;
        let description = done
            .iter()
            .find(|c| c.node_exec_id == node_exec_id)
            .map_or("", |c| c.what)
            .to_owned();
        rows.push(SettlementRow {
            node_exec_id,
            user_id: r.try_get("user_id")?,
            description,
            status: r.try_get("status")?,
            pre: r.try_get("pre")?,
            post: r.try_get("post")?,
            delta: r.try_get("delta")?,
            transaction_key: r.try_get("transaction_key")?,
        });
    }
    rows.sort_by_key(|s| {
        done.iter()
            .position(|c| c.node_exec_id == s.node_exec_id)
            .unwrap_or(usize::MAX)
    });
    Ok(rows)
}

async fn read_balances(pool: &PgPool) -> anyhow::Result<Vec<BalanceRow>> {
    let mut balances = Vec::new();
    for r in sqlx::query("SELECT user_id, balance, last_seq FROM credit.balances ORDER BY user_id")
        .fetch_all(pool)
        .await?
    {
        balances.push(BalanceRow {
            user_id: r.try_get("user_id")?,
            balance: r.try_get("balance")?,
            ledger_rows: r.try_get("last_seq")?,
        });
    }
    Ok(balances)
}

/// Takes `expect` messages off the dead-letter queue, acking them.
async fn read_dead_letters(
    ch: &lapin::Channel,
    queue: &str,
    expect: usize,
) -> anyhow::Result<Vec<DeadLetter>> {
    let deadline = Instant::now() + STAGE_TIMEOUT;
    let mut out = Vec::new();
    while out.len() < expect {
        match ch
            .basic_get(queue.into(), BasicGetOptions::default())
            .await
            .context("reading the dead-letter queue")?
        {
            Some(m) => {
                let reason = m
                    .delivery
                    .properties
                    .headers()
                    .as_ref()
                    .and_then(|h| h.inner().get(crate::consumer::ERROR_HEADER).cloned())
                    .map(|v| match v {
                        AMQPValue::LongString(s) => s.to_string(),
                        other => format!("{other:?}"),
                    })
                    .unwrap_or_default();
                anyhow::ensure!(
                    m.delivery.ack(BasicAckOptions::default()).await?,
                    "dead-letter channel closed"
                );
                out.push(DeadLetter {
                    body: String::from_utf8_lossy(&m.delivery.data).into_owned(),
                    reason,
                });
            }
            None if Instant::now() >= deadline => {
                anyhow::bail!("no dead letter arrived on {queue}")
            }
            None => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    Ok(out)
}

async fn scalar(pool: &PgPool, sql: &str) -> i64 {
    // A failed poll counts as "not yet"; the stage timeout reports a persistent failure.
    sqlx::query_scalar::<_, i64>(sql)
        .fetch_one(pool)
        .await
        .unwrap_or(-1)
}

async fn wait_until<F, Fut>(what: &str, mut cond: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + STAGE_TIMEOUT;
    while !cond().await {
        if Instant::now() >= deadline {
            anyhow::bail!("timed out waiting until {what}");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    Ok(())
}

fn print_human(r: &Report) -> std::io::Result<()> {
    outln!(
        "published {} messages: {} node executions, {} duplicate delivery, {} invalid body, \
         {} completions\n",
        r.published.messages,
        r.published.node_executions,
        r.published.duplicates,
        r.published.invalid,
        r.published.completions
    );

    outln!("Balances after the run (a negative balance is debt from a post-flight charge)");
    print_balances(&r.balances)?;

    print_decisions(r)?;
    print_settlements(r)?;
    print_top_ups_and_refill(r)?;
    print_events_and_audit(r)
}

fn print_decisions(r: &Report) -> std::io::Result<()> {
    outln!("\nDecisions (queue order; the duplicate delivery made no second decision)");
    outln!(
        "  {:<36}  {:<6} {:<29} {:<42} {:<9} {:>4}",
        "node_exec_id",
        "user",
        "block",
        "what",
        "outcome",
        "cost"
    );
    for d in &r.decisions {
        outln!(
            "  {:<36}  {:<6} {:<29} {:<42} {:<9} {:>4}",
            d.node_exec_id,
            d.user_id,
            d.block,
            d.description,
            d.outcome,
            d.cost
        );
    }

    Ok(())
}

fn print_settlements(r: &Report) -> std::io::Result<()> {
    outln!("\nSettlements (completions: block cost settled to the post-flight price)");
    outln!(
        "  {:<36}  {:<6} {:<50} {:>4} {:>4} {:>6}",
        "node_exec_id",
        "user",
        "what",
        "pre",
        "post",
        "delta"
    );
    for s in &r.settlements {
        outln!(
            "  {:<36}  {:<6} {:<50} {:>4} {:>4} {:>+6}",
            s.node_exec_id,
            s.user_id,
            s.description,
            s.pre,
            s.post,
            s.delta
        );
    }

    Ok(())
}

/// What was published, dead-lettered, and what the audit found.
fn print_events_and_audit(r: &Report) -> std::io::Result<()> {
    outln!("\nEvents on {}credit.events", r.namespace);
    outln!("  {:<16} {:<6} summary", "routing key", "user");
    for e in &r.events {
        let user = e.body.get("user_id").and_then(Value::as_str).unwrap_or("?");
        outln!(
            "  {:<16} {:<6} {}",
            e.routing_key,
            user,
            event_summary(&e.routing_key, &e.body)
        );
    }

    outln!("\nDead-lettered ({}node_execution.dead)", r.namespace);
    for d in &r.dead_letters {
        outln!("  body:           {}", d.body);
        outln!("  x-credit-error: {}", d.reason);
    }

    outln!(
        "\nAudit: {}",
        crate::tools::audit_text(
            &r.audit,
            "clean (Σ amount = balance = last running balance for every user)"
        )
    );
    outln!("\nscratch database and namespace removed");
    Ok(())
}

/// The payment side's answers to auto top-up requests, then next month's refill.
fn print_top_ups_and_refill(r: &Report) -> std::io::Result<()> {
    outln!("\nAuto top-up (alice: 200 credits when below 690; the payment side answers twice)");
    for t in &r.auto_top_ups {
        outln!(
            "  {}  {} requested {} at balance {}: applied {}, again {}, balance now {}",
            t.request_id,
            t.user_id,
            t.amount,
            t.balance_at_request,
            t.applied,
            t.applied_again,
            t.balance
        );
    }

    outln!(
        "\nRefill sweep for {}: {} users topped up to {}, {} credits granted",
        r.refill.month,
        r.refill.users_refilled,
        r.settings
            .get("refill.target")
            .and_then(Value::as_i64)
            .unwrap_or_default(),
        r.refill.credits_granted
    );
    outln!("Balances after the refill");
    print_balances(&r.balances_after_refill)?;
    Ok(())
}

fn print_balances(rows: &[BalanceRow]) -> std::io::Result<()> {
    outln!("  {:<8} {:>8} {:>12}", "user", "balance", "ledger rows");
    for b in rows {
        outln!("  {:<8} {:>8} {:>12}", b.user_id, b.balance, b.ledger_rows);
    }
    Ok(())
}

fn event_summary(routing_key: &str, body: &Value) -> String {
    let num = |k: &str| body.get(k).and_then(Value::as_i64).unwrap_or_default();
    let text = |k: &str| body.get(k).and_then(Value::as_str).unwrap_or("").to_owned();
    match routing_key {
        crate::events::BALANCE_CHANGED => {
            let key = text("transaction_key");
            // A SETTLE row's sign says which way the post-flight price went.
            let note = match (key.starts_with("SETTLE-"), num("amount") < 0) {
                (true, true) => " settlement: extra charge",
                (true, false) => " settlement: refund",
                _ => "",
            };
            format!(
                "{} {:+} → balance {} (seq {}, {key}){note}",
                text("transaction_type"),
                num("amount"),
                num("balance"),
                num("seq"),
            )
        }
        crate::events::CHARGE_REJECTED => format!(
            "{} needs {}, balance {}",
            text("node_exec_id"),
            num("cost"),
            num("balance")
        ),
        crate::events::BALANCE_LOW => format!(
            "balance {} fell below threshold {}",
            num("balance"),
            num("threshold")
        ),
        crate::events::TOP_UP_REQUESTED => format!(
            "{}: {} credits asked for, balance {} below {}",
            text("request_id"),
            num("amount"),
            num("balance"),
            num("threshold")
        ),
        crate::events::CHARGE_UNCOLLECTED => format!(
            "{}: {} credits not collected, balance {}",
            text("node_exec_id"),
            num("amount"),
            num("balance")
        ),
        _ => body.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_script_is_well_formed() {
        let steps = script();
        let mut ids: Vec<_> = steps.iter().map(|s| s.node_exec_id).collect();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), steps.len());
        for s in &steps {
            crate::message::decode(&body(s)).unwrap();
        }
        assert!(crate::message::decode(INVALID_BODY).is_err());
        for c in completions() {
            let step = steps.iter().find(|s| s.node_exec_id == c.node_exec_id);
            let step = step.expect("a completion of a scripted step");
            let e = crate::message::decode(&completion_body(step, &c)).unwrap();
            assert_eq!(e.phase, crate::message::Phase::Completed);
        }
    }

    #[test]
    fn next_month_follows_this_one() {
        let now = Month::of(chrono::Utc::now()).first_day();
        let next = next_month().first_day();
        assert!(next > now);
        assert!(next - now <= chrono::Duration::days(31));
    }
}
