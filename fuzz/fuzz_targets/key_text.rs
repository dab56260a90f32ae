//! The text forms of every key type (files, CLI flags, snapshots).
#![no_main]
use libfuzzer_sys::fuzz_target;
use postern_protocol::keys::{DevicePublicKey, DeviceSigningKey, GatewayPublicKey, GatewaySecret};

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = DevicePublicKey::from_text(s);
        let _ = DeviceSigningKey::from_text(s);
        let _ = GatewayPublicKey::from_text(s);
        let _ = GatewaySecret::from_text(s);
        let _ = s.parse::<postern_protocol::keys::DeviceId>();
    }
});
