//! Any body: decode never panics; a decoded entry always prices or names its error, and a
//! body is "not valid JSON" only when it is not.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match credit_worker::message::decode(data) {
        Ok(entry) => {
            let table = credit_worker::cost::CostTable::builtin().expect("built-in table");
            let _ = table.price(&entry.block_id, &entry.inputs, entry.stats.as_ref());
        }
        Err(e) => {
            assert!(!e.field().is_empty() && !e.to_string().is_empty());
            if matches!(e, credit_worker::message::DecodeError::NotJson(_)) {
                let valid = serde_json::from_slice::<serde::de::IgnoredAny>(data).is_ok();
                assert!(!valid, "valid JSON refused as not JSON: {e}");
            }
        }
    }
});
