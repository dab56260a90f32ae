//! Known-answer tests: `tests/vectors/knock_v1.json` was produced by an independent
//! implementation (`tests/vectors/gen_knock_v1.py`, Python `cryptography`); the crate must
//! reproduce every datagram byte for byte and open + verify it back to the same knock.

use std::net::IpAddr;

use postern_protocol::{
    open, precheck, seal, DeviceId, DevicePublicKey, DeviceSigningKey, GatewayPublicKey,
    GatewaySecret, Knock, SealRandomness,
};
use serde_json::Value;

const VECTORS: &str = include_str!("vectors/knock_v1.json");

fn s<'a>(v: &'a Value, k: &str) -> &'a str {
    v[k].as_str()
        .unwrap_or_else(|| panic!("vector field {k} must be a string"))
}

fn arr<const N: usize>(v: &Value, k: &str) -> [u8; N] {
    let mut out = [0u8; N];
    hex::decode_to_slice(s(v, k), &mut out)
        .unwrap_or_else(|e| panic!("vector field {k} must be {N} bytes of hex: {e}"));
    out
}

#[test]
fn knock_v1_vectors() {
    let doc: Value = serde_json::from_str(VECTORS).expect("vector file is valid JSON");
    let vectors = doc["vectors"].as_array().expect("vectors array");
    assert!(vectors.len() >= 3);
    for v in vectors {
        let name = s(v, "name");
        let dev = DeviceSigningKey::from_seed(arr(v, "device_seed"));
        let gw = GatewaySecret::from_bytes(arr(v, "gateway_secret"));
        assert_eq!(dev.public_key().to_text(), s(v, "device_public"), "{name}");
        assert_eq!(
            DevicePublicKey::from_text(s(v, "device_public")).expect("device public parses"),
            dev.public_key()
        );
        assert_eq!(
            dev.public_key().device_id().to_string(),
            s(v, "device_id"),
            "{name}"
        );
        assert_eq!(gw.public_key().to_text(), s(v, "gateway_public"), "{name}");
        assert_eq!(
            GatewayPublicKey::from_text(s(v, "gateway_public")).expect("gateway public parses"),
            gw.public_key()
        );
        assert_eq!(
            gw.public_key().key_id().to_string(),
            s(v, "gateway_key_id"),
            "{name}"
        );

        let claimed_addr = match &v["claimed_addr"] {
            Value::Null => None,
            Value::String(a) => Some(a.parse::<IpAddr>().expect("vector address parses")),
            other => panic!("claimed_addr must be null or a string, got {other}"),
        };
        let knock = Knock {
            device: s(v, "device_id")
                .parse::<DeviceId>()
                .expect("device id parses"),
            timestamp_ms: v["timestamp_ms"].as_u64().expect("timestamp_ms u64"),
            nonce: arr(v, "nonce"),
            flags: u8::try_from(v["flags"].as_u64().expect("flags")).expect("flags fit u8"),
            app: postern_protocol::AppName::new(s(v, "app")).expect("vectors name valid apps"),
            claimed_addr,
            posture_digest: arr(v, "posture_digest"),
        };
        let datagram = seal(
            &knock,
            &dev,
            &gw.public_key(),
            SealRandomness {
                ephemeral_secret: arr(v, "ephemeral_secret"),
            },
        )
        .expect("seal");
        assert_eq!(
            hex::encode(&datagram),
            s(v, "datagram"),
            "{name}: seal output"
        );
        assert_eq!(
            datagram.len() as u64,
            v["datagram_len"].as_u64().expect("datagram_len"),
            "{name}"
        );
        assert_eq!(
            hex::encode(&datagram[10..42]),
            s(v, "ephemeral_public"),
            "{name}"
        );

        let expected = hex::decode(s(v, "datagram")).expect("datagram hex");
        precheck(&expected, gw.public_key().key_id()).expect("precheck");
        let opened = open(&expected, &gw).expect("open");
        assert_eq!(opened.device(), knock.device);
        assert_eq!(
            opened.verify(&dev.public_key()).expect("verify"),
            knock,
            "{name}"
        );
    }
}
