use super::filter::*;
use super::*;
use proptest::prelude::*;
use serde_json::json;

const OPENAI: &str = "53c25cb8-e3ee-465c-a4d1-e75a4c899c2a";
const TEXT_GEN: &str = "1f292d4a-41a4-4977-9684-7c8d560b9f91";
const LLM_BLOCKS: [&str; 7] = [
    "553ec5b8-6c45-4299-8d75-b394d05f72ff",
    "3b191d9f-356f-482d-8238-ba04b6d18381",
    "32a87eab-381e-4dd4-bdb8-4c47151be35a",
    "1f292d4a-41a4-4977-9684-7c8d560b9f91",
    "ed55ac19-356e-4243-a6cb-bc599e9b716f",
    "a0a69be1-4528-491c-a85a-a4ab6873e3f0",
    "9c0b0450-d199-458b-a731-072189dd6593",
];

fn obj(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m,
        other => panic!("test input is not an object: {other}"),
    }
}

fn table(text: &str) -> CostTable {
    match CostTable::from_toml_str(text, "test.toml") {
        Ok(t) => t,
        Err(e) => panic!("{e}"),
    }
}

fn invalid(text: &str) -> String {
    match CostTable::from_toml_str(text, "test.toml") {
        Ok(_) => panic!("accepted an invalid table:\n{text}"),
        Err(e) => e.to_string(),
    }
}

fn builtin() -> CostTable {
    match CostTable::builtin() {
        Ok(t) => t,
        Err(e) => panic!("{e}"),
    }
}

fn cost(t: &CostTable, block: &str, inputs: Value, stats: Stats) -> i64 {
    match t.price(block, &obj(inputs), Some(&stats)) {
        Ok(p) => p.cost,
        Err(e) => panic!("{e}"),
    }
}

fn m(filter: Value, input: Value) -> bool {
    filter_matches(&filter, &input)
}

// ---- filter rules -----------------------------------------------------------------------

#[test]
fn first_matching_entry_wins() {
    let t = table(
        r#"
        [[block]]
        id = "b"
        costs = [
          { cost_amount = 7, cost_type = "run", cost_filter = { model = "x" } },
          { cost_amount = 3, cost_type = "run", cost_filter = {} },
          { cost_amount = 9, cost_type = "run", cost_filter = { model = "x" } },
        ]"#,
    );
    assert_eq!(cost(&t, "b", json!({"model": "x"}), Stats::default()), 7);
    assert_eq!(cost(&t, "b", json!({"model": "y"}), Stats::default()), 3);
    let p = t.price("b", &obj(json!({"model": "y"})), None).ok();
    assert_eq!(p.and_then(|p| p.matched_filter), Some(json!({})));
}

#[test]
fn extra_input_keys_are_ignored() {
    let filter = json!({"model": "m", "credentials": {"id": "c", "type": "api_key"}});
    let input = json!({"model": "m", "prompt": "hi",
                       "credentials": {"id": "c", "type": "api_key", "title": "Mine"}});
    assert!(m(filter.clone(), input));
    // ... but every filter key must be there.
    assert!(!m(
        filter,
        json!({"model": "m", "credentials": {"id": "c"}})
    ));
}

#[test]
fn falsy_filter_values_match_every_falsy_input() {
    let falsy = [
        json!(null),
        json!(""),
        json!(0),
        json!(0.0),
        json!(-0.0),
        json!(false),
        json!({}),
        json!([]),
    ];
    for f in &falsy {
        assert!(m(json!({"k": f}), json!({})), "filter {f} vs missing key");
        for i in &falsy {
            assert!(
                m(json!({"k": f}), json!({"k": i})),
                "filter {f} vs input {i}"
            );
        }
    }
}

#[test]
fn truthy_filter_never_matches_a_missing_or_falsy_input() {
    for f in [
        json!("a"),
        json!(1),
        json!(true),
        json!({"x": 1}),
        json!([0]),
        json!(0.5),
    ] {
        assert!(!m(json!({"k": f}), json!({})), "filter {f} vs missing key");
        assert!(
            !m(json!({"k": f}), json!({"k": null})),
            "filter {f} vs null"
        );
        assert!(!m(json!({"k": f}), json!({"k": 0})), "filter {f} vs 0");
    }
}

#[test]
fn falsy_filter_does_not_match_a_truthy_input() {
    assert!(!m(
        json!({"raw_content": false}),
        json!({"raw_content": true})
    ));
    assert!(!m(json!({"n": 0}), json!({"n": 5})));
    assert!(!m(json!({"s": ""}), json!({"s": "x"})));
    // Except an empty-object filter: a truthy object input then matches it as a subset
    // (Python gives the same: all() over no keys is true).
    assert!(m(json!({"o": {}}), json!({"o": {"a": 1}})));
    assert!(!m(json!({"l": []}), json!({"l": [0]})));
    assert!(!m(json!({"z": null}), json!({"z": "x"})));
}

#[test]
fn nested_objects_match_recursively() {
    let f = json!({"a": {"b": {"c": 1, "d": false}}});
    assert!(m(f.clone(), json!({"a": {"b": {"c": 1, "e": 2}}})));
    assert!(m(f.clone(), json!({"a": {"b": {"c": 1.0, "d": null}}})));
    assert!(!m(f.clone(), json!({"a": {"b": {"c": 2}}})));
    assert!(!m(f.clone(), json!({"a": {"b": "c"}})));
    assert!(!m(f, json!({"a": {}})));
}

#[test]
fn numbers_compare_by_value() {
    assert!(m(json!(1), json!(1.0)));
    assert!(m(json!({"n": 1}), json!({"n": 1.0})));
    assert!(m(json!({"n": -3.0}), json!({"n": -3})));
    assert!(!m(json!({"n": 1}), json!({"n": 1.5})));
    assert!(m(json!(u64::MAX), json!(u64::MAX)));
    assert!(!m(json!(i64::MIN), json!(u64::MAX)));
    // Exact, not via f64: 2^53 + 1 is not the double 2^53.
    assert!(!m(
        json!(9_007_199_254_740_993_u64),
        json!(9_007_199_254_740_992.0)
    ));
    assert!(m(
        json!(9_007_199_254_740_992_u64),
        json!(9_007_199_254_740_992.0)
    ));
    assert!(!m(json!(u64::MAX), json!(18_446_744_073_709_551_616.0)));
    assert!(!m(json!("1"), json!(1)));
}

#[test]
fn bools_equal_one_and_zero_like_python() {
    assert!(m(json!(true), json!(1)));
    assert!(m(json!(1.0), json!(true)));
    assert!(m(json!(false), json!(0)));
    assert!(!m(json!(true), json!(2)));
    assert!(m(json!({"flag": true}), json!({"flag": 1})));
    assert!(m(json!({"n": 1}), json!({"n": true})));
    assert!(m(json!([true, 0]), json!([1, false])));
    assert!(!m(json!(true), json!("true")));
}

#[test]
fn lists_compare_deeply_and_in_order() {
    assert!(m(
        json!({"l": [1, "a", [2]]}),
        json!({"l": [1.0, "a", [2]]})
    ));
    assert!(!m(json!({"l": [1, 2]}), json!({"l": [2, 1]})));
    assert!(!m(json!({"l": [1, 2]}), json!({"l": [1, 2, 3]})));
    // Objects inside lists compare by equality (Python ==), not by subset.
    assert!(m(json!([{"a": 1}]), json!([{"a": 1.0}])));
    assert!(!m(json!([{"a": 1}]), json!([{"a": 1, "b": 2}])));
}

#[test]
fn non_objects_use_equality() {
    assert!(m(json!("x"), json!("x")));
    assert!(!m(json!("x"), json!({"x": 1})));
    assert!(!m(json!({"x": 1}), json!("x")));
    assert!(m(json!(null), json!(null)));
    assert!(!m(json!(null), json!(false)));
    // Both objects at the top: subset rules, so the empty filter matches anything.
    assert!(m(json!({}), json!({"a": 1})));
}

#[test]
fn falsiness() {
    for v in [
        json!(null),
        json!(false),
        json!(0),
        json!(0.0),
        json!(""),
        json!([]),
        json!({}),
    ] {
        assert!(is_falsy(Some(&v)), "{v}");
    }
    assert!(is_falsy(None));
    for v in [
        json!(true),
        json!(1),
        json!(-1),
        json!(0.1),
        json!(" "),
        json!([null]),
        json!({"a": null}),
    ] {
        assert!(!is_falsy(Some(&v)), "{v}");
    }
}

// ---- cost types -------------------------------------------------------------------------

const TYPES: &str = r#"
    [[block]]
    id = "run"
    costs = [{ cost_amount = 4, cost_type = "run", cost_filter = {} }]
    [[block]]
    id = "sec"
    name = "Timed"
    costs = [{ cost_amount = 1, cost_type = "second", cost_filter = {} }]
    [[block]]
    id = "byte"
    costs = [{ cost_amount = 2, cost_type = "byte", cost_filter = {} }]
    [[block]]
    id = "sec10"
    costs = [{ cost_amount = 10, cost_type = "second", cost_filter = {} }]
    [[block]]
    id = "huge"
    name = "Huge"
    costs = [{ cost_amount = 9223372036854775807, cost_type = "second", cost_filter = {} }]
"#;

fn stats(walltime: f64, input_size: f64) -> Stats {
    Stats {
        walltime,
        input_size,
        ..Stats::default()
    }
}

#[test]
fn run_second_and_byte_costs() {
    let t = table(TYPES);
    assert_eq!(cost(&t, "run", json!({}), stats(99.0, 99.0)), 4);
    // `second` bills every started second (the newest AutoGPT rounds up).
    assert_eq!(cost(&t, "sec", json!({}), stats(25.9, 0.0)), 26);
    assert_eq!(cost(&t, "sec", json!({}), Stats::default()), 0);
    assert_eq!(cost(&t, "byte", json!({}), stats(0.0, 10.6)), 21);
    assert_eq!(cost(&t, "byte", json!({}), stats(0.0, 4096.0)), 8192);
    assert_eq!(cost(&t, "sec10", json!({}), stats(0.7, 0.0)), 10);
    assert_eq!(cost(&t, "sec10", json!({}), stats(1.29, 0.0)), 20);
    // Whole numbers are exact up to i64::MAX.
    assert_eq!(cost(&t, "huge", json!({}), stats(1.0, 0.0)), i64::MAX);
    assert_eq!(cost(&t, "huge", json!({}), stats(0.0, 0.0)), 0);
}

#[test]
fn overflow_is_an_error_naming_block_and_stat() {
    let t = table(TYPES);
    for (block, s) in [
        ("huge", stats(2.0, 0.0)),
        ("huge", stats(1.5, 0.0)),
        ("sec", stats(1e300, 0.0)),
        ("byte", stats(0.0, 4.7e18)),
    ] {
        match t.price(block, &Map::new(), Some(&s)) {
            Err(e @ CostError::Overflow { .. }) => {
                let msg = e.to_string();
                assert!(msg.contains(&format!("block {block}")), "{msg}");
                assert!(
                    msg.contains("walltime") || msg.contains("input_size"),
                    "{msg}"
                );
                assert!(msg.contains("entry 1"), "{msg}");
            }
            other => panic!("{block}: expected overflow, got {other:?}"),
        }
    }
    let e = t
        .price("huge", &Map::new(), Some(&stats(2.0, 0.0)))
        .err()
        .map(|e| e.to_string());
    assert_eq!(
        e.as_deref(),
        Some("block huge (Huge) entry 1: cost overflow: walltime 2 at cost_amount 9223372036854775807 exceeds 9223372036854775807")
    );
}

#[test]
fn bad_stats_are_errors() {
    let t = table(TYPES);
    for (s, stat) in [
        (stats(-1.0, 0.0), "walltime"),
        (stats(f64::NAN, 0.0), "walltime"),
        (stats(0.0, f64::INFINITY), "input_size"),
        (stats(0.0, -0.5), "input_size"),
    ] {
        match t.price("run", &Map::new(), Some(&s)) {
            Err(CostError::InvalidStat { stat: got, .. }) => assert_eq!(got, stat),
            other => panic!("{s:?}: {other:?}"),
        }
    }
}

#[test]
fn floor_mul_edges() {
    assert_eq!(floor_mul(0.0, i64::MAX), Some(0));
    assert_eq!(floor_mul(1e300, 0), Some(0));
    assert_eq!(
        floor_mul(4_611_686_018_427_387_904.0, 1),
        Some(4_611_686_018_427_387_904)
    );
    assert_eq!(floor_mul(4_611_686_018_427_387_904.0, 2), None);
    assert_eq!(floor_mul(9_223_372_036_854_775_808.0, 1), None);
    assert_eq!(floor_mul(0.5, 3), Some(1));
    assert_eq!(floor_mul(f64::MIN_POSITIVE, i64::MAX), Some(0));
    assert_eq!(floor_mul(-1.0, 1), None);
    assert_eq!(floor_mul(1.0, -1), None);
}

// ---- the shipped table ------------------------------------------------------------------

fn platform_openai() -> Value {
    json!({"id": OPENAI, "provider": "openai", "type": "api_key", "title": "Use Credits for OpenAI"})
}

#[test]
fn builtin_table_loads() {
    let t = builtin();
    assert_eq!(t.block_count(), 115);
    for id in LLM_BLOCKS {
        // 108 models of AutoGPT's MODEL_COST less its 5 Ollama models.
        assert_eq!(t.blocks.get(id).map(|b| b.entries.len()), Some(103), "{id}");
    }
}

/// Blocks AutoGPT prices outside BLOCK_COSTS: Exa by the SDK's base cost on the platform
/// credentials only, the Ayrshare posts by their decorator on any key.
#[test]
fn exa_and_ayrshare_are_priced_as_in_autogpt() {
    let t = builtin();
    let exa_search = "996cec64-ac40-4dde-982f-b0dc60a5824d";
    let platform = json!({"credentials": {"id": "96153e04-9c6c-4486-895f-5bb683b1ecec",
        "provider": "exa", "type": "api_key", "title": "Use Credits for Exa search"}});
    let own = json!({"credentials": {"id": "my-own-exa-key", "provider": "exa"}});
    let usd = Stats {
        provider_cost: Some(0.05),
        provider_cost_type: Some("cost_usd".into()),
        ..Stats::default()
    };
    let cost = |block: &str, inputs: &Value, stats: Option<&Stats>| {
        t.price(block, &obj(inputs.clone()), stats)
            .map(|p| p.cost)
            .ok()
    };
    assert_eq!(cost(exa_search, &platform, Some(&usd)), Some(5));
    assert_eq!(cost(exa_search, &own, Some(&usd)), Some(0));
    let post_to_x = "9e8f844e-b4a5-4b25-80f2-9e1dd7d67625";
    assert_eq!(cost(post_to_x, &json!({"is_video": true}), None), Some(5));
    assert_eq!(cost(post_to_x, &json!({"post": "hi"}), None), Some(2));
}

#[test]
fn gpt4_turbo_on_platform_credentials_costs_10() {
    let t = builtin();
    let inputs = json!({"prompt": "hi", "model": "gpt-4-turbo", "credentials": platform_openai()});
    let p = t.price(TEXT_GEN, &obj(inputs), None).ok();
    let expected = Price {
        cost: 10,
        matched_filter: Some(json!({"model": "gpt-4-turbo",
            "credentials": {"id": OPENAI, "provider": "openai", "type": "api_key"}})),
        metered: true,
        block_name: Some("AITextGeneratorBlock".into()),
    };
    assert_eq!(p, Some(expected));
}

#[test]
fn own_api_keys_are_free() {
    let t = builtin();
    let p = t
        .price(
            TEXT_GEN,
            &obj(json!({"model": "gpt-4-turbo", "api_key": "owned_api_key"})),
            None,
        )
        .ok();
    assert_eq!(
        p,
        Some(Price {
            cost: 0,
            matched_filter: None,
            metered: false,
            block_name: Some("AITextGeneratorBlock".into())
        })
    );
    let mine = json!({"id": "0f0e0d0c-1111-2222-3333-444455556666", "provider": "openai", "type": "api_key", "title": "My key"});
    assert_eq!(
        cost(
            &t,
            TEXT_GEN,
            json!({"model": "gpt-4-turbo", "credentials": mine}),
            Stats::default()
        ),
        0
    );
    // The platform credential for another provider does not match either.
    let anthropic = json!({"id": "24e5d942-d9e3-4798-8151-90143ee55629", "provider": "anthropic", "type": "api_key"});
    assert_eq!(
        cost(
            &t,
            TEXT_GEN,
            json!({"model": "gpt-4-turbo", "credentials": anthropic}),
            Stats::default()
        ),
        0
    );
}

#[test]
fn unknown_block_is_free() {
    let t = builtin();
    let p = t
        .price(
            "no-such-block",
            &obj(json!({"model": "gpt-4-turbo", "credentials": platform_openai()})),
            None,
        )
        .ok();
    assert_eq!(
        p,
        Some(Price {
            cost: 0,
            matched_filter: None,
            metered: false,
            block_name: None
        })
    );
}

/// Every type but `run` prices the run by what it used, so a start priced 0 on it is
/// still paid; a `run` entry's price is final, 0 included.
#[test]
fn a_price_is_metered_for_every_type_but_run() {
    let table = r#"
        [token_rates]
        "m" = { input = 1, output = 1 }
        [[block]]
        id = "b"
        costs = [
            { cost_amount = 0, cost_type = "run", cost_filter = { t = "run" } },
            { cost_amount = 1, cost_type = "byte", cost_filter = { t = "byte" } },
            { cost_amount = 1, cost_type = "second", cost_filter = { t = "second" } },
            { cost_amount = 1, cost_type = "items", cost_filter = { t = "items" } },
            { cost_amount = 1, cost_type = "cost_usd", cost_filter = { t = "cost_usd" } },
            { cost_amount = 0, cost_type = "tokens", cost_filter = { t = "tokens", model = "m" } },
        ]
    "#;
    let t = CostTable::from_toml_str(table, "test").unwrap();
    let metered = |ty: &str| {
        let p = t
            .price("b", &obj(json!({ "t": ty, "model": "m" })), None)
            .unwrap();
        (p.cost, p.metered)
    };
    assert_eq!(metered("run"), (0, false));
    for ty in ["byte", "second", "items", "cost_usd", "tokens"] {
        assert_eq!(metered(ty), (0, true), "{ty}");
    }
    assert_eq!(metered("none"), (0, false));
}

#[test]
fn every_llm_block_and_model_is_priced_with_its_credential() {
    let t = builtin();
    for id in LLM_BLOCKS {
        let Some(block) = t.blocks.get(id) else {
            panic!("{id} missing")
        };
        for entry in block.entries.iter() {
            assert!(entry.amount > 0);
            let mut inputs = entry.filter.clone();
            inputs.insert("prompt".into(), json!("hello"));
            if let Some(Value::Object(creds)) = inputs.get_mut("credentials") {
                creds.insert("title".into(), json!("Use Credits"));
            }
            if entry.cost_type == CostType::Tokens {
                // Pre-flight is MODEL_COST.
                let p = t.price(id, &inputs, None).ok();
                assert_eq!(
                    p.map(|p| p.cost),
                    Some(entry.amount),
                    "{id} {:?}",
                    entry.filter
                );
            } else {
                // OpenRouter: 150 credits per reported $; $0.01 => ceil(1.5) = 2.
                assert_eq!(entry.cost_type, CostType::CostUsd, "{:?}", entry.filter);
                assert_eq!(entry.amount, 150);
                let usd = Stats {
                    provider_cost: Some(0.01),
                    ..Stats::default()
                };
                let p = t.price(id, &inputs, Some(&usd)).ok();
                assert_eq!(p.map(|p| p.cost), Some(2), "{id} {:?}", entry.filter);
            }
        }
    }
    let groq = json!({"id": "4ec22295-8f97-4dd1-b42b-2c6957a02545", "provider": "groq", "type": "api_key"});
    let llama = json!({"model": "llama-3.3-70b-versatile", "credentials": groq});
    assert_eq!(
        t.price(LLM_BLOCKS[0], &obj(llama.clone()), None)
            .ok()
            .map(|p| p.cost),
        Some(1)
    );
    // 10^6 in + 10^6 out at 89 / 119 per 10^6.
    assert_eq!(
        cost(
            &t,
            LLM_BLOCKS[0],
            llama,
            super::autogpt_figures::tokens(1_000_000, 1_000_000, 0)
        ),
        208
    );
    let anthropic = json!({"id": "24e5d942-d9e3-4798-8151-90143ee55629", "provider": "anthropic", "type": "api_key"});
    let sonnet = json!({"model": "claude-sonnet-4-6", "credentials": anthropic.clone()});
    assert_eq!(
        t.price(LLM_BLOCKS[4], &obj(sonnet.clone()), None)
            .ok()
            .map(|p| p.cost),
        Some(9)
    );
    // AutoGPT's own example: 200k in, 50k out, 100k cache read => 90 + 112.5 + 4.5 = 207.
    assert_eq!(
        cost(
            &t,
            LLM_BLOCKS[4],
            sonnet,
            super::autogpt_figures::tokens(200_000, 50_000, 100_000)
        ),
        207
    );
    // Claude Opus 4.7 has no token rate: post-flight stays MODEL_COST.
    let opus = json!({"model": "claude-opus-4-7", "credentials": anthropic});
    assert_eq!(
        cost(
            &t,
            LLM_BLOCKS[3],
            opus,
            super::autogpt_figures::tokens(5_000_000, 0, 0)
        ),
        14
    );
    // gpt-4-turbo: 10,000 in / 2,000 out => ceil(15 + 9) = 24; GPT-5: 1 in / 1 out => 1.
    let turbo = json!({"model": "gpt-4-turbo", "credentials": platform_openai()});
    assert_eq!(
        cost(
            &t,
            TEXT_GEN,
            turbo,
            super::autogpt_figures::tokens(10_000, 2_000, 0)
        ),
        24
    );
    let gpt5 = json!({"model": "gpt-5-2025-08-07", "credentials": platform_openai()});
    assert_eq!(
        t.price(TEXT_GEN, &obj(gpt5.clone()), None)
            .ok()
            .map(|p| p.cost),
        Some(2)
    );
    assert_eq!(
        cost(&t, TEXT_GEN, gpt5, super::autogpt_figures::tokens(1, 1, 0)),
        1
    );
    // Models that left LlmModel are no longer priced.
    let old = json!({"model": "claude-3-5-sonnet-latest", "credentials": {"id": "24e5d942-d9e3-4798-8151-90143ee55629", "provider": "anthropic", "type": "api_key"}});
    assert_eq!(
        t.price(TEXT_GEN, &obj(old), None).ok().map(|p| p.cost),
        Some(0)
    );
}

#[test]
fn other_blocks_charge_on_platform_credentials() {
    let t = builtin();
    let cred = |id: &str, provider: &str| json!({"id": id, "provider": provider, "type": "api_key", "title": "t"});
    let jina = cred("7f26de70-ba0d-494e-ba76-238e65e7b45f", "jina");
    let replicate = cred("6b9fc200-4726-4973-86c9-cd526f5ce5db", "replicate");
    let e2b = cred("78d19fd7-4d59-4a16-8277-3ce310acf2b7", "e2b");
    let apollo = cred("544c62b5-1d0f-4156-8fb4-9525f11656eb", "apollo");
    let usd = |dollars: f64| Stats {
        provider_cost: Some(dollars),
        provider_cost_type: Some("cost_usd".into()),
        ..Stats::default()
    };
    let items = |n: f64| Stats {
        provider_cost: Some(n),
        provider_cost_type: Some("items".into()),
        ..Stats::default()
    };
    let walltime = |secs: f64| Stats {
        walltime: secs,
        ..Stats::default()
    };
    // (block, credentials, post-flight stats, credits), per AutoGPT's BLOCK_COSTS.
    let cases = [
        (
            "98c6f503-8c47-4b1c-a96d-351fc7c87dab",
            cred("7f7b0654-c36b-4565-8fa7-9a52575dfae2", "d_id"),
            Stats::default(),
            100,
        ),
        // Jina search: $0.01 at 150 per $ => ceil(1.5) = 2.
        (
            "87840993-2053-44b7-8da4-187ad4ee518c",
            jina.clone(),
            usd(0.01),
            2,
        ),
        (
            "436c3984-57fd-4b85-8e9a-459b356883bd",
            jina.clone(),
            Stats::default(),
            1,
        ),
        (
            "6ab085e2-20b3-4055-bc3e-08036e01eca6",
            cred("760f84fc-b270-42de-91f6-08efe1b512d0", "ideogram"),
            Stats::default(),
            12,
        ),
        (
            "361697fb-0c4f-4feb-aed3-8320c88c771b",
            cred("fdb7f412-f519-48d1-9b5f-d2f73d0e01fe", "revid"),
            Stats::default(),
            307,
        ),
        (
            "90f8c45e-e983-4644-aa0b-b4ebe2f531bc",
            replicate.clone(),
            Stats::default(),
            10,
        ),
        // Replicate: 0.05 x 150 = 7.5 => 8.
        (
            "c40d75a2-d0ea-44c9-a4f6-634bb3bdab1a",
            replicate.clone(),
            usd(0.05),
            8,
        ),
        (
            "44f6c8ad-d75c-4ae1-8209-aad1c0326928",
            replicate,
            Stats::default(),
            11,
        ),
        (
            "7c56b3ab-62e7-43a2-a2dc-4ec4245660b6",
            jina.clone(),
            Stats::default(),
            12,
        ),
        (
            "4ff1ff6d-cc40-4caa-ae69-011daa20c378",
            cred("66f20754-1b81-48e4-91d0-f4f0dd82145f", "unreal_speech"),
            usd(0.2),
            30,
        ),
        // E2B: 45 s at 1 per started 10 s => 5 (AutoGPT's test).
        (
            "0b02b072-abe7-11ef-8372-fb5d162dd712",
            e2b.clone(),
            walltime(45.0),
            5,
        ),
        (
            "ff0861c9-1726-4aec-9e5b-bf53f3622112",
            e2b.clone(),
            walltime(1.0),
            1,
        ),
        (
            "82b59b8e-ea10-4d57-9161-8b169b0adba6",
            e2b,
            walltime(20.0),
            2,
        ),
        // FAL video: 8 s at 15 per s => 120 (AutoGPT's test).
        (
            "530cf046-2ce0-4854-ae2c-659db17c7a46",
            cred("6c0f5bd0-9008-4638-9d79-4b40b631803e", "fal"),
            walltime(8.0),
            120,
        ),
        // Apollo organisations: 45 records at 1 per 2 => 23.
        (
            "3d71270d-599e-4148-9b95-71b35d2f44f0",
            apollo,
            items(45.0),
            23,
        ),
        (
            "e3950439-fa0b-40e8-b19f-e0dca0bf5853",
            cred("63a6e279-2dc2-448e-bf57-85776f7176dc", "zerobounce"),
            usd(0.023),
            4,
        ),
    ];
    for (id, creds, stats, amount) in cases {
        assert_eq!(
            cost(&t, id, json!({"credentials": creds}), stats.clone()),
            amount,
            "{id}"
        );
        assert_eq!(
            cost(&t, id, json!({}), stats),
            0,
            "{id} without credentials"
        );
    }
    // Apollo people: 2 per person with e-mail enrichment, else 1.
    let people = "c2adb3aa-5aae-488d-8a6e-4eb8c23e2ed6";
    let apollo = cred("544c62b5-1d0f-4156-8fb4-9525f11656eb", "apollo");
    let enriched = json!({"enrich_info": true, "credentials": apollo.clone()});
    assert_eq!(cost(&t, people, enriched, items(10.0)), 20);
    let plain = json!({"enrich_info": false, "credentials": apollo});
    assert_eq!(cost(&t, people, plain, items(10.0)), 10);
    // Pinecone insert runs on the user's own key and still pays 1 per item.
    assert_eq!(
        cost(
            &t,
            "477f2168-cd91-475a-8146-9499a5982434",
            json!({}),
            items(7.0)
        ),
        7
    );
    // ExtractWebsiteContent: a raw scrape does not use Jina and is free.
    let extract = "436c3984-57fd-4b85-8e9a-459b356883bd";
    assert_eq!(
        cost(
            &t,
            extract,
            json!({"raw_content": false, "credentials": jina.clone()}),
            Stats::default()
        ),
        1
    );
    assert_eq!(
        cost(
            &t,
            extract,
            json!({"raw_content": true, "credentials": jina}),
            Stats::default()
        ),
        0
    );
}

// ---- validation -------------------------------------------------------------------------

fn one_block(entries: &str) -> String {
    format!(
        "[[block]]\nid = \"1f292d4a\"\nname = \"AITextGeneratorBlock\"\ncosts = [\n  \
         {{ cost_amount = 1, cost_type = \"run\", cost_filter = {{}} }},\n  {entries}\n]\n"
    )
}

#[test]
fn bad_cost_type_names_block_and_entry() {
    let msg = invalid(&one_block(
        r#"{ cost_amount = 1, cost_type = "minute", cost_filter = {} }"#,
    ));
    assert_eq!(
        msg,
        "test.toml: block 1f292d4a (AITextGeneratorBlock) entry 2 of 2: cost_type: unknown variant `minute`, \
         expected one of `run`, `second`, `byte`, `items`, `cost_usd`, `tokens`"
    );
}

#[test]
fn bad_amounts_are_rejected() {
    let msg = invalid(&one_block(
        r#"{ cost_amount = -1, cost_type = "run", cost_filter = {} }"#,
    ));
    assert!(
        msg.ends_with(
            "block 1f292d4a (AITextGeneratorBlock) entry 2 of 2: cost_amount: must be ≥ 0, got -1"
        ),
        "{msg}"
    );
    let msg = invalid(&one_block(
        r#"{ cost_amount = 1.5, cost_type = "run", cost_filter = {} }"#,
    ));
    assert!(
        msg.ends_with("entry 2 of 2: cost_amount: expected an integer, got float"),
        "{msg}"
    );
    let msg = invalid(&one_block(
        r#"{ cost_amount = "3", cost_type = "run", cost_filter = {} }"#,
    ));
    assert!(
        msg.ends_with("entry 2 of 2: cost_amount: expected an integer, got string"),
        "{msg}"
    );
    // Beyond i64: the TOML parser itself refuses it.
    let msg = invalid(&one_block(
        r#"{ cost_amount = 9223372036854775808, cost_type = "run", cost_filter = {} }"#,
    ));
    assert!(msg.starts_with("test.toml: not valid TOML"), "{msg}");
}

#[test]
fn unknown_and_missing_keys_are_rejected() {
    let msg = invalid(&one_block(
        r#"{ cost_amount = 1, cost_type = "run", cost_filter = {}, cost_per = 2 }"#,
    ));
    assert!(msg.ends_with("entry 2 of 2: unknown key `cost_per` (expected cost_amount, cost_type, cost_divisor, cost_filter)"), "{msg}");
    let msg = invalid(&one_block(
        r#"{ cost_amount = 1, cost_type = "run", cost_filter = {}, cost_divisor = 2 }"#,
    ));
    assert!(
        msg.ends_with(
            "entry 2 of 2: cost_divisor: only `second` and `items` entries take a divisor"
        ),
        "{msg}"
    );
    let msg = invalid(&one_block(
        r#"{ cost_amount = 1, cost_type = "items", cost_filter = {}, cost_divisor = 0 }"#,
    ));
    assert!(
        msg.ends_with("entry 2 of 2: cost_divisor: must be ≥ 1, got 0"),
        "{msg}"
    );
    let msg = invalid(&one_block(
        r#"{ cost_amount = 1, cost_type = "tokens", cost_filter = {} }"#,
    ));
    assert!(msg.ends_with("entry 2 of 2: cost_filter.model: a `tokens` entry needs the model its token rates are for"), "{msg}");
    let msg = invalid(&one_block(r#"{ cost_amount = 1, cost_type = "run" }"#));
    assert!(msg.contains("entry 2 of 2: cost_filter: missing"), "{msg}");
    let msg = invalid(&one_block(
        r#"{ cost_amount = 1, cost_type = "run", cost_filter = "model" }"#,
    ));
    assert!(
        msg.ends_with("entry 2 of 2: cost_filter: expected a table, got string"),
        "{msg}"
    );
    let msg = invalid("[[block]]\nid = \"b\"\nname = \"N\"\ncost = []\n");
    assert_eq!(
        msg,
        "test.toml: block b (N): unknown key `cost` (expected id, name, costs, costs_from)"
    );
    let msg = invalid("[[blocks]]\nid = \"b\"\n");
    assert_eq!(
        msg,
        "test.toml: top level: unknown key `blocks` (expected `block`, `lists` or `token_rates`)"
    );
    let msg = invalid("[[block]]\nid = \"b\"\n");
    assert!(
        msg.ends_with("block b: missing `costs` (or `costs_from`)"),
        "{msg}"
    );
}

#[test]
fn block_ids_must_be_present_non_empty_and_unique() {
    let dup =
        "[[block]]\nid = \"x\"\nname = \"A\"\ncosts = []\n[[block]]\nid = \"y\"\ncosts = []\n\
               [[block]]\nid = \"x\"\nname = \"B\"\ncosts = []\n";
    assert_eq!(
        invalid(dup),
        "test.toml: block x (B): duplicate block id (first defined by block #1 of 3)"
    );
    assert_eq!(
        invalid("[[block]]\nid = \"\"\ncosts = []\n"),
        "test.toml: block #1 of 1: id: must not be empty"
    );
    assert_eq!(
        invalid("[[block]]\nname = \"n\"\ncosts = []\n"),
        "test.toml: block #1 of 1: id: missing"
    );
    assert_eq!(
        invalid("[[block]]\nid = 5\ncosts = []\n"),
        "test.toml: block #1 of 1: id: expected a string, got integer"
    );
    assert_eq!(
        invalid("[[block]]\nid = \" b1\"\ncosts = []\n"),
        r#"test.toml: block #1 of 1: id: " b1" has spaces around it, and would never match"#
    );
}

#[test]
fn a_table_without_blocks_is_refused() {
    assert_eq!(
        invalid(""),
        "test.toml: top level: no [[block]] in the table: every block would run free"
    );
    assert_eq!(
        invalid("block = []\n"),
        "test.toml: block: no block in the table: every block would run free"
    );
}

#[test]
fn shared_lists() {
    let t = table(
        "[lists]\nllm = [{ cost_amount = 2, cost_type = \"run\", cost_filter = { model = \"m\" } }]\n\
         [[block]]\nid = \"a\"\ncosts_from = \"llm\"\n[[block]]\nid = \"b\"\ncosts_from = \"llm\"\n",
    );
    assert_eq!(t.block_count(), 2);
    assert_eq!(cost(&t, "b", json!({"model": "m"}), Stats::default()), 2);
    let msg = invalid("[[block]]\nid = \"a\"\nname = \"A\"\ncosts_from = \"llm\"\n");
    assert_eq!(
        msg,
        "test.toml: block a (A): costs_from: no list `llm` under [lists]"
    );
    let msg =
        invalid("[lists]\nllm = [{ cost_amount = 2, cost_type = \"hour\", cost_filter = {} }]\n");
    assert!(
        msg.starts_with("test.toml: list `llm` entry 1 of 1: cost_type: unknown variant `hour`"),
        "{msg}"
    );
    let msg =
        invalid("[lists]\nllm = []\n[[block]]\nid = \"a\"\ncosts = []\ncosts_from = \"llm\"\n");
    assert!(
        msg.ends_with("block a: give either `costs` or `costs_from`, not both"),
        "{msg}"
    );
}

#[test]
fn filters_convert_to_json() {
    let t = table(
        "[[block]]\nid = \"b\"\ncosts = [{ cost_amount = 1, cost_type = \"run\", \
         cost_filter = { n = 1.0, l = [1, \"a\"], o = { f = false } } }]\n",
    );
    assert_eq!(
        cost(
            &t,
            "b",
            json!({"n": 1, "l": [1, "a"], "o": {"g": 1}}),
            Stats::default()
        ),
        1
    );
    let msg = invalid("[[block]]\nid = \"b\"\ncosts = [{ cost_amount = 1, cost_type = \"run\", cost_filter = { d = 1979-05-27 } }]\n");
    assert!(
        msg.contains("entry 1 of 1: cost_filter.d: TOML dates"),
        "{msg}"
    );
    let msg = invalid("[[block]]\nid = \"b\"\ncosts = [{ cost_amount = 1, cost_type = \"run\", cost_filter = { x = [nan] } }]\n");
    assert!(
        msg.contains("cost_filter.x[0]: NaN has no JSON equivalent"),
        "{msg}"
    );
}

#[test]
fn syntax_and_read_errors_name_the_origin() {
    assert!(invalid("[[block]\n").starts_with("test.toml: not valid TOML: "));
    let path = Path::new("/nonexistent/block_costs.toml");
    let msg = CostTable::load(path)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        msg.starts_with("/nonexistent/block_costs.toml: cannot read: "),
        "{msg}"
    );
}

#[test]
fn load_reads_a_file() {
    let dir = std::env::temp_dir().join(format!("cost-table-test-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let path = dir.join("costs.toml");
    let written = std::fs::write(&path, BUILTIN_TABLE);
    assert!(written.is_ok());
    let t = CostTable::load(&path).map(|t| t.block_count());
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(t.ok(), Some(115));
}

// ---- properties -------------------------------------------------------------------------

/// An independent model of Python semantics: bools and numbers become f64 (exact for the
/// small values generated), and derived equality is Python's `==` on the result.
#[derive(Debug, PartialEq)]
enum Py {
    None,
    Num(f64),
    Str(String),
    List(Vec<Py>),
    Dict(std::collections::BTreeMap<String, Py>),
}

fn py(v: &Value) -> Py {
    match v {
        Value::Null => Py::None,
        Value::Bool(b) => Py::Num(if *b { 1.0 } else { 0.0 }),
        Value::Number(n) => Py::Num(n.as_f64().unwrap_or(f64::NAN)),
        Value::String(s) => Py::Str(s.clone()),
        Value::Array(a) => Py::List(a.iter().map(py).collect()),
        Value::Object(o) => Py::Dict(o.iter().map(|(k, v)| (k.clone(), py(v))).collect()),
    }
}

fn truthy(p: Option<&Py>) -> bool {
    match p {
        None | Some(Py::None) => false,
        Some(Py::Num(n)) => *n != 0.0,
        Some(Py::Str(s)) => !s.is_empty(),
        Some(Py::List(l)) => !l.is_empty(),
        Some(Py::Dict(d)) => !d.is_empty(),
    }
}

fn model_match(f: &Py, i: &Py) -> bool {
    match (f, i) {
        (Py::Dict(f), Py::Dict(i)) => f.iter().all(|(k, fv)| match i.get(k) {
            iv if !truthy(iv) => !truthy(Some(fv)),
            Some(iv) => model_match(fv, iv),
            None => false,
        }),
        _ => f == i,
    }
}

fn small_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(json!(null)),
        any::<bool>().prop_map(Value::Bool),
        (-2i64..3).prop_map(Value::from),
        prop::sample::select(vec![0.0, -0.0, 1.0, 1.5, 2.0, -2.0]).prop_map(|f| json!(f)),
        prop::sample::select(vec!["", "a", "b"]).prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 24, 3, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..3).prop_map(Value::Array),
            prop::collection::btree_map(prop::sample::select(vec!["a", "b", "c"]), inner, 0..3)
                .prop_map(|m| Value::Object(
                    m.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()
                )),
        ]
    })
}

/// Pairs that often match: independent, identical, or the filter's keys with random values.
fn filter_and_input() -> impl Strategy<Value = (Value, Value)> {
    prop_oneof![
        (small_json(), small_json()),
        small_json().prop_map(|v| (v.clone(), v)),
        (small_json(), prop::collection::vec(small_json(), 3)).prop_map(|(f, vals)| {
            let input = match &f {
                Value::Object(o) => Value::Object(o.keys().cloned().zip(vals).collect()),
                _ => vals.into_iter().next().unwrap_or(Value::Null),
            };
            (f, input)
        }),
    ]
}

proptest! {
    #[test]
    fn filter_matches_agrees_with_model((f, i) in filter_and_input()) {
        prop_assert_eq!(filter_matches(&f, &i), model_match(&py(&f), &py(&i)));
    }

    #[test]
    fn is_falsy_agrees_with_model(v in small_json()) {
        prop_assert_eq!(is_falsy(Some(&v)), !truthy(Some(&py(&v))));
    }

    #[test]
    fn objects_match_themselves(v in small_json()) {
        prop_assert!(filter_matches(&v, &v));
    }

    #[test]
    fn floor_mul_is_floor_of_the_f64_product(x in 0.0f64..1e6, n in 0i64..1_000_000) {
        let got = floor_mul(x, n);
        prop_assert_eq!(got, Some((x * n as f64).floor() as i64));
    }
}

#[test]
fn every_cost_type_is_named_once() {
    // A match, so that a new type does not compile here until it has a name.
    let index = |t: CostType| match t {
        CostType::Run => 0,
        CostType::Second => 1,
        CostType::Byte => 2,
        CostType::Items => 3,
        CostType::CostUsd => 4,
        CostType::Tokens => 5,
    };
    let mut named = [0; 6];
    for (name, t) in CostType::NAMED {
        assert_eq!(CostType::named(name), Some(t), "{name}");
        named[index(t)] += 1;
    }
    assert_eq!(named, [1; 6]);
    assert_eq!(CostType::named("Run"), None);
}

/// Only the inputs a block's filters name can change its price: an entry trimmed to them
/// (as the consumer trims what waits for a batch) prices as the whole one, for every entry
/// of the built-in table, with and without stats, among inputs no filter names.
#[test]
fn inputs_no_filter_names_never_change_a_price() {
    let t = builtin();
    let stats = Stats {
        walltime: 3.5,
        input_token_count: 1200,
        output_token_count: 300,
        ..Stats::default()
    };
    let mut checked = 0;
    for (block_id, block) in &t.blocks {
        for entry in block.entries.iter() {
            let mut inputs = entry.filter.clone();
            inputs.insert("prompt".into(), json!("x".repeat(100)));
            inputs.insert("values".into(), json!((0..1000).collect::<Vec<_>>()));
            inputs.insert("nested".into(), json!({"model": "gpt-4o", "deep": [{}]}));
            let mut trimmed = inputs.clone();
            trimmed.retain(|k, _| t.reads_input(block_id, k));
            assert!(!trimmed.contains_key("prompt") || t.reads_input(block_id, "prompt"));
            for s in [None, Some(&stats)] {
                let whole = t.price(block_id, &inputs, s).expect("priced");
                let kept = t.price(block_id, &trimmed, s).expect("priced");
                assert_eq!(
                    (whole.cost, &whole.matched_filter),
                    (kept.cost, &kept.matched_filter),
                    "{block_id}"
                );
            }
            checked += 1;
        }
    }
    assert!(checked > 100, "{checked} entries");
    assert!(t.reads_input(TEXT_GEN, "model"));
    assert!(!t.reads_input(TEXT_GEN, "prompt"));
    assert!(!t.reads_input("no-such-block", "model"));
}
