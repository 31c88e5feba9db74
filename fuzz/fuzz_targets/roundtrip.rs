//! decode(serialize(decode(x))) == decode(x).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(a) = credit_worker::message::decode(data) else { return };
    let bytes = serde_json::to_vec(&a).expect("serialize");
    let b = match credit_worker::message::decode(&bytes) {
        Ok(b) => b,
        Err(e) => panic!("re-decode failed: {e}; {}", String::from_utf8_lossy(&bytes)),
    };
    let va = serde_json::to_value(&a).unwrap();
    let vb = serde_json::to_value(&b).unwrap();
    assert_eq!(va, vb, "round trip changed the entry");
});
