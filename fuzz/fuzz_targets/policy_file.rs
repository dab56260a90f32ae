//! The policy file parser and the decision engine on arbitrary text.
//! The body lives in `fuzz/src/targets.rs`, shared with the corpus replay test.
#![no_main]
use libfuzzer_sys::fuzz_target;

#[path = "../src/targets.rs"]
#[allow(dead_code)]
mod targets;

fuzz_target!(|data: &[u8]| targets::policy_file(data));
