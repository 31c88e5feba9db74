use super::*;
use serde_json::json;

const TABLE: &str = r#"
    [token_rates]
    "gpt-4o-mini" = { input = 1000, output = 2000 }
    "claude-sonnet-4-6" = { input = 450, output = 2250, cache_read = 45, cache_creation = 563 }
    "gpt-5" = { input = 188, output = 1500 }

    [[block]]
    id = "e2b"
    costs = [{ cost_amount = 1, cost_type = "second", cost_divisor = 10, cost_filter = {} }]
    [[block]]
    id = "sec3"
    costs = [{ cost_amount = 1, cost_type = "second", cost_divisor = 3, cost_filter = {} }]
    [[block]]
    id = "fal"
    costs = [{ cost_amount = 15, cost_type = "second", cost_filter = {} }]
    [[block]]
    id = "items10"
    costs = [{ cost_amount = 1, cost_type = "items", cost_divisor = 10, cost_filter = {} }]
    [[block]]
    id = "items2"
    costs = [{ cost_amount = 1, cost_type = "items", cost_divisor = 2, cost_filter = {} }]
    [[block]]
    id = "usd100"
    costs = [{ cost_amount = 100, cost_type = "cost_usd", cost_filter = {} }]
    [[block]]
    id = "usd150"
    costs = [{ cost_amount = 150, cost_type = "cost_usd", cost_filter = {} }]
    [[block]]
    id = "llm"
    costs = [
      { cost_amount = 1, cost_type = "tokens", cost_filter = { model = "gpt-4o-mini" } },
      { cost_amount = 1, cost_type = "tokens", cost_filter = { model = "llama3.2" } },
      { cost_amount = 9, cost_type = "tokens", cost_filter = { model = "claude-sonnet-4-6" } },
      { cost_amount = 2, cost_type = "tokens", cost_filter = { model = "gpt-5" } },
    ]
    [[block]]
    id = "run7"
    costs = [{ cost_amount = 7, cost_type = "run", cost_filter = {} }]
    [[block]]
    id = "byte3"
    costs = [{ cost_amount = 3, cost_type = "byte", cost_filter = {} }]
"#;

fn table() -> CostTable {
    let estimates = Estimates::from_json_str(
        r#"{"estimates": {"e2b": {"mean_credits": 2.6}, "usd100": {"mean_credits": 4}}}"#,
        "test",
    )
    .unwrap();
    CostTable::from_toml_str(TABLE, "test")
        .unwrap()
        .with_estimates(estimates)
}

fn post(block: &str, inputs: serde_json::Value, stats: Stats) -> i64 {
    let Value::Object(inputs) = inputs else {
        panic!("inputs")
    };
    table().price(block, &inputs, Some(&stats)).unwrap().cost
}

fn pre(block: &str, inputs: serde_json::Value) -> i64 {
    let Value::Object(inputs) = inputs else {
        panic!("inputs")
    };
    table().price(block, &inputs, None).unwrap().cost
}

fn walltime(s: f64) -> Stats {
    Stats {
        walltime: s,
        ..Stats::default()
    }
}

fn provider(cost: f64, kind: Option<&str>) -> Stats {
    Stats {
        provider_cost: Some(cost),
        provider_cost_type: kind.map(str::to_owned),
        ..Stats::default()
    }
}

pub(super) fn tokens(input: u64, output: u64, cache_read: u64) -> Stats {
    Stats {
        input_token_count: input,
        output_token_count: output,
        cache_read_token_count: cache_read,
        ..Stats::default()
    }
}

#[test]
fn second_bills_each_started_divisor_unit() {
    assert_eq!(post("e2b", json!({}), walltime(25.0)), 3);
    assert_eq!(post("e2b", json!({}), walltime(45.0)), 5);
    assert_eq!(post("sec3", json!({}), walltime(1.0)), 1);
    assert_eq!(post("fal", json!({}), walltime(8.0)), 120);
    assert_eq!(post("e2b", json!({}), walltime(0.0)), 0);
    // Pre-flight: the block's estimate (2.6 ⇒ 3), or 0 without one.
    assert_eq!(pre("e2b", json!({})), 3);
    assert_eq!(pre("fal", json!({})), 0);
}

#[test]
fn items_count_only_items_reports() {
    assert_eq!(post("items10", json!({}), provider(45.0, Some("items"))), 5);
    assert_eq!(post("items2", json!({}), provider(1.0, Some("items"))), 1);
    assert_eq!(post("items2", json!({}), provider(20.0, Some("items"))), 10);
    assert_eq!(post("items2", json!({}), provider(20.9, Some("items"))), 10);
    assert_eq!(post("items2", json!({}), provider(0.0, Some("items"))), 0);
    assert_eq!(
        post("items10", json!({}), provider(0.05, Some("cost_usd"))),
        0
    );
    assert_eq!(pre("items10", json!({})), 0);
}

#[test]
fn cost_usd_rounds_up_in_f64_like_python() {
    assert_eq!(
        post("usd100", json!({}), provider(0.023, Some("cost_usd"))),
        3
    );
    assert_eq!(
        post("usd100", json!({}), provider(0.05, Some("cost_usd"))),
        5
    );
    assert_eq!(post("usd100", json!({}), provider(0.207, None)), 21);
    // 0.07 × 100 = 7.000000000000001 and 0.14 × 100 = 14.000000000000002 in IEEE doubles.
    assert_eq!(
        post("usd100", json!({}), provider(0.07, Some("cost_usd"))),
        8
    );
    assert_eq!(
        post("usd100", json!({}), provider(0.14, Some("cost_usd"))),
        15
    );
    assert_eq!(
        post("usd150", json!({}), provider(0.05, Some("cost_usd"))),
        8
    );
    assert_eq!(
        post("usd150", json!({}), provider(0.023, Some("cost_usd"))),
        4
    );
    assert_eq!(post("usd100", json!({}), provider(45.0, Some("items"))), 0);
    assert_eq!(post("usd100", json!({}), Stats::default()), 0);
    assert_eq!(pre("usd100", json!({})), 4);
    assert_eq!(pre("usd150", json!({})), 0);
}

#[test]
fn tokens_use_the_models_rates_per_million() {
    let mini = json!({"model": "gpt-4o-mini"});
    assert_eq!(post("llm", mini.clone(), tokens(500_000, 250_000, 0)), 1000);
    assert_eq!(pre("llm", mini), 1);
    let sonnet = json!({"model": "claude-sonnet-4-6"});
    assert_eq!(
        post("llm", sonnet.clone(), tokens(200_000, 50_000, 100_000)),
        207
    );
    assert_eq!(pre("llm", sonnet), 9);
    // No rates for the model: its flat amount, before and after.
    let ollama = json!({"model": "llama3.2"});
    assert_eq!(post("llm", ollama, tokens(10_000, 10_000, 0)), 1);
    // One token in and out of GPT-5 costs 1 (pre-flight 2: a refund of 1 later).
    let gpt5 = json!({"model": "gpt-5"});
    assert_eq!(post("llm", gpt5.clone(), tokens(1, 1, 0)), 1);
    assert_eq!(post("llm", gpt5.clone(), tokens(0, 0, 0)), 0);
    assert_eq!(pre("llm", gpt5), 2);
}

#[test]
fn a_price_fits_an_i64_or_is_refused() {
    // 2^63 − 1024, the largest double below 2^63, fits; 2^63 does not.
    assert_eq!(
        ceil_i64(9_223_372_036_854_774_784.0),
        Some(9_223_372_036_854_774_784)
    );
    assert_eq!(ceil_i64(9_223_372_036_854_775_808.0), None);
    assert_eq!(ceil_i64(f64::NAN), None);
    assert_eq!(ceil_i64(-3.5), Some(0));
    assert_eq!(ceil_i64(0.000_1), Some(1));
}

#[test]
fn cache_creation_tokens_have_their_own_rate() {
    let sonnet = json!({"model": "claude-sonnet-4-6"});
    let written = Stats {
        cache_creation_token_count: 1_000_000,
        ..Stats::default()
    };
    assert_eq!(post("llm", sonnet.clone(), written), 563);
    // Beside the other three: 200k × 450 + 50k × 2250 + 100k × 45 + 40k × 563 per million.
    let mut all = tokens(200_000, 50_000, 100_000);
    all.cache_creation_token_count = 40_000;
    assert_eq!(post("llm", sonnet, all), 230);
}

#[test]
fn an_empty_provider_cost_type_is_dollars() {
    assert_eq!(post("usd100", json!({}), provider(0.05, Some(""))), 5);
}

#[test]
fn byte_truncates_the_input_size_times_the_amount_and_costs_nothing_before() {
    let size = |input_size: f64| Stats {
        input_size,
        ..Stats::default()
    };
    assert_eq!(post("byte3", json!({}), size(2.5)), 7);
    assert_eq!(post("byte3", json!({}), size(100.0)), 300);
    assert_eq!(post("byte3", json!({}), Stats::default()), 0);
    assert_eq!(pre("byte3", json!({})), 0);
}

#[test]
fn run_ignores_stats() {
    let mut s = tokens(1_000_000, 1_000_000, 0);
    s.walltime = 999.0;
    assert_eq!(post("run7", json!({}), s), 7);
    assert_eq!(pre("run7", json!({})), 7);
}

#[test]
fn token_rates_are_validated_with_the_model_named() {
    let err = |t: &str| {
        CostTable::from_toml_str(t, "t.toml")
            .unwrap_err()
            .to_string()
    };
    assert_eq!(
        err("[token_rates]\n\"m\" = { input = 1 }\n"),
        "t.toml: token_rates.m: output: missing"
    );
    assert_eq!(
        err("[token_rates]\n\"m\" = { input = 1, output = -2 }\n"),
        "t.toml: token_rates.m: output: expected a number ≥ 0, got -2"
    );
    assert_eq!(
        err("[token_rates]\n\"m\" = { input = 1, output = 2, cached = 3 }\n"),
        "t.toml: token_rates.m: unknown key `cached` (expected input, output, cache_read, cache_creation)"
    );
}
