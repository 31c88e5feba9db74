//! Any control body: parse never panics; a command's amounts are > 0; an error is a bad
//! request or an amount out of range whose message names its field (or the JSON).
#![no_main]
use credit_worker::control::{Command, ControlError};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match Command::parse(data) {
        Ok(Command::Credit(r)) => assert!(r.amount > 0, "{r:?}"),
        Ok(Command::Refund(r)) => assert!(r.amount > 0, "{r:?}"),
        Ok(Command::AutoTopUp(r)) => {
            if let Some((threshold, amount)) = r.config {
                assert!(threshold > 0 && amount > 0, "{r:?}");
            }
        }
        Ok(_) => {}
        Err(e) => {
            assert!(
                matches!(e, ControlError::BadRequest(_) | ControlError::AmountOutOfRange(_)),
                "{e:?}"
            );
            let message = e.to_string();
            let field = message.split(": ").next().unwrap_or_default();
            assert!(
                message.contains(": ") && !field.is_empty(),
                "the error names no field: {message:?}"
            );
        }
    }
});
