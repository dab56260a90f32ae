//! The posture report parser (what a client sends to POST /v1/posture) on arbitrary bytes.
//! The body lives in `fuzz/src/targets.rs`, shared with the corpus replay test.
#![no_main]
use libfuzzer_sys::fuzz_target;

#[path = "../src/targets.rs"]
#[allow(dead_code)]
mod targets;

fuzz_target!(|data: &[u8]| targets::posture_report(data));
