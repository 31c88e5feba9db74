//! Any body: decode never panics; a decoded entry always prices or names its error.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match credit_worker::message::decode(data) {
        Ok(entry) => {
            let table = credit_worker::cost::CostTable::builtin().expect("built-in table");
            let _ = table.price(&entry.block_id, &entry.inputs, entry.stats);
        }
        Err(e) => assert!(!e.field().is_empty() && !e.to_string().is_empty()),
    }
});
