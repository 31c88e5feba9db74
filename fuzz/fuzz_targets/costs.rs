//! A cost table from configuration (TOML) and an execution: loading never panics; pricing
//! never panics, is ≥ 0, matches the same entry before and after the run, and is monotonic
//! in the run's measurements.
#![no_main]
use credit_worker::cost::{CostTable, Stats};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (toml_part, rest) = match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &b""[..]),
    };
    let Ok(text) = std::str::from_utf8(toml_part) else { return };
    let table = match CostTable::from_toml_str(text, "fuzz.toml") {
        Ok(t) => t,
        Err(e) => {
            let m = e.to_string();
            assert!(m.starts_with("fuzz.toml: "), "{m}");
            return;
        }
    };
    let Ok(e) = credit_worker::message::decode(rest) else { return };
    let pre = table.price(&e.block_id, &e.inputs, None);
    let zero = Stats::default();
    let s = e.stats.clone().unwrap_or_default();
    let post = table.price(&e.block_id, &e.inputs, Some(&s));
    if let Ok(p) = &pre {
        assert!(p.cost >= 0, "negative pre-flight {p:?}");
    }
    if let Ok(p) = &post {
        assert!(p.cost >= 0, "negative post-flight {p:?}");
    }
    if let (Ok(a), Ok(b)) = (&pre, &post) {
        assert_eq!(a.matched_filter, b.matched_filter, "pre/post matched different entries");
        assert_eq!(a.block_name, b.block_name);
    }
    if let (Ok(p), Ok(z)) = (&post, table.price(&e.block_id, &e.inputs, Some(&zero))) {
        assert!(z.cost <= p.cost, "zero stats cost more than {s:?}: {} > {}", z.cost, p.cost);
    }
    // Monotonic: more of every measurement never costs less.
    let more = Stats {
        walltime: s.walltime * 2.0 + 1.0,
        input_size: s.input_size * 2.0 + 1.0,
        input_token_count: s.input_token_count.saturating_mul(2).saturating_add(1),
        output_token_count: s.output_token_count.saturating_mul(2).saturating_add(1),
        cache_read_token_count: s.cache_read_token_count.saturating_mul(2).saturating_add(1),
        cache_creation_token_count: s.cache_creation_token_count.saturating_mul(2).saturating_add(1),
        provider_cost: s.provider_cost.map(|c| c * 2.0 + 1.0),
        provider_cost_type: s.provider_cost_type.clone(),
    };
    if more.walltime.is_finite() && more.input_size.is_finite() && more.provider_cost.is_none_or(f64::is_finite) {
        if let (Ok(p), Ok(q)) = (&post, table.price(&e.block_id, &e.inputs, Some(&more))) {
            assert!(q.cost >= p.cost, "more usage cost less: {s:?} -> {} ; {more:?} -> {}", p.cost, q.cost);
        }
    }
});
