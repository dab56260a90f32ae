//! Sniff mode's IPv4/IPv6/UDP header walk on arbitrary captured packets.
//! The body lives in `fuzz/src/targets.rs`, shared with the corpus replay test.
#![no_main]
use libfuzzer_sys::fuzz_target;

#[path = "../src/targets.rs"]
#[allow(dead_code)]
mod targets;

fuzz_target!(|data: &[u8]| targets::capture_ip(data));
