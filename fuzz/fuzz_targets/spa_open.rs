//! The gateway's SPA path on arbitrary datagrams: precheck, open, verify, freshness.
#![no_main]
use libfuzzer_sys::fuzz_target;
use postern_protocol::keys::{DeviceSigningKey, GatewaySecret};
use postern_protocol::packet;

fuzz_target!(|data: &[u8]| {
    let secret = GatewaySecret::from_bytes([7; 32]);
    let _ = packet::precheck(data, secret.public_key().key_id());
    if let Ok(opened) = packet::open(data, &secret) {
        let _ = packet::check_freshness(opened.knock.timestamp_ms, 1_800_000_000_000, 30_000);
        let key = DeviceSigningKey::from_seed([1; 32]).public_key();
        let _ = opened.verify(&key);
    }
});
