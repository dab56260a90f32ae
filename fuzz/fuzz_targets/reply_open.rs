//! The client opening arbitrary datagrams as the signed reply to a known-answer knock.
//! The body lives in `fuzz/src/targets.rs`, shared with the corpus replay test.
#![no_main]
use libfuzzer_sys::fuzz_target;

#[path = "../src/targets.rs"]
#[allow(dead_code)]
mod targets;

fuzz_target!(|data: &[u8]| targets::reply_open(data));
