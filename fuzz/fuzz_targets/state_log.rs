//! The state-log reader (`storage::state_log::parse`) and the subscription state replay on
//! arbitrary file bytes: never a panic; the valid prefix lies within the input; where the
//! strict reading (`--durability sync`) accepts a file, it reads what the lenient one reads.
//!
//! Input: the bytes of a state file.

#![no_main]

use corebus::storage::state_log::parse;
use corebus::subscription::SubState;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(lenient) = parse(data, false) else {
        // A group whose checksum holds over bad records is refused in both modes.
        assert!(parse(data, true).is_err());
        return;
    };
    assert!(lenient.1 <= data.len());
    if let Ok(strict) = parse(data, true) {
        assert_eq!(strict, lenient);
    }
    let _ = SubState::replay(lenient.0.iter().copied());
});
