//! The client API's signed-request headers and the enrollment invite token.
//! The body lives in `fuzz/src/targets.rs`, shared with the corpus replay test.
#![no_main]
use libfuzzer_sys::fuzz_target;

#[path = "../src/targets.rs"]
#[allow(dead_code)]
mod targets;

fuzz_target!(|data: &[u8]| targets::api_auth(data));
