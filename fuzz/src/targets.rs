//! The bodies of the fuzz targets, one plain function per target.
//!
//! This file is compiled twice, verbatim: by each `fuzz/fuzz_targets/<target>.rs` (through
//! `#[path]`) and by the normal suite's corpus replay test (`tests/tests/fuzz_corpus.rs`),
//! so the regression test runs exactly the code the fuzzer ran. It may use only crates both
//! sides depend on: `postern-protocol`, `postern-gateway`, `postern-controller`,
//! `postern-policy`, `serde_json`.
//!
//! Owns: what each target feeds its input to and the properties it asserts (beyond "no
//! panic"). Must not touch: files, sockets, the clock or randomness (targets are pure, so a
//! crash replays deterministically).

use std::path::Path;
use std::sync::OnceLock;

use postern_controller::sync::{SyncRequest, SyncResponse};
use postern_gateway::capture::ip::{spa_datagram, ETH_P_IP, ETH_P_IPV6};
use postern_gateway::config::Config;
use postern_gateway::registry::RegistryView;
use postern_protocol::keys::{
    DeviceId, DevicePublicKey, DeviceSigningKey, GatewayKeyId, GatewayPublicKey, GatewaySecret,
};
use postern_protocol::packet::{self, OpenError};
use postern_protocol::reply::{self, KnockBinding, ReplyKey, ReplyRandomness};
use postern_protocol::snapshot::Snapshot;

/// A target body: takes one input, panics on a bug.
pub type Target = fn(&[u8]);

/// Every target by name, as `cargo fuzz` and `fuzz/corpus/<name>/` know it.
pub const TARGETS: [(&str, Target); 10] = [
    ("spa_open", spa_open),
    ("capture_ip", capture_ip),
    ("gateway_config", gateway_config),
    ("sync_messages", sync_messages),
    ("key_text", key_text),
    ("policy_file", policy_file),
    ("api_auth", api_auth),
    ("posture_report", posture_report),
    ("reply_open", reply_open),
    ("control_messages", control_messages),
];

/// The SPA port sniff mode looks for in `capture_ip`.
pub const SPA_PORT: u16 = 62201;

/// (gateway secret, device seed, knock timestamp) of the three known-answer vectors in
/// `protocol/tests/vectors/knock_v1.json`: the corpus holds their datagrams, so the fuzzer
/// starts from knocks that pass precheck, decrypt and verify under these keys.
const KAT: [([u8; 32], [u8; 32], u64); 3] = [
    (seq(0x20), seq(0x00), 1_767_225_600_000),
    (seq(0xa0), seq(0x80), 1_767_225_612_345),
    (seq(0x25), seq(0x05), 0),
];

const fn seq(start: u8) -> [u8; 32] {
    let mut a = [0u8; 32];
    let mut i = 0;
    while i < 32 {
        a[i] = start.wrapping_add(i as u8);
        i += 1;
    }
    a
}

struct KatKeys {
    gateway: GatewaySecret,
    key_id: GatewayKeyId,
    device: DevicePublicKey,
    device_id: DeviceId,
    now_ms: u64,
}

fn kat_keys() -> &'static [KatKeys] {
    static KEYS: OnceLock<Vec<KatKeys>> = OnceLock::new();
    KEYS.get_or_init(|| {
        KAT.iter()
            .map(|(gw, dev, now_ms)| {
                let gateway = GatewaySecret::from_bytes(*gw);
                let device = DeviceSigningKey::from_seed(*dev).public_key();
                KatKeys {
                    key_id: gateway.public_key().key_id(),
                    gateway,
                    device_id: device.device_id(),
                    device,
                    now_ms: *now_ms,
                }
            })
            .collect()
    })
}

/// The gateway's SPA path in the pipeline's order: precheck (cheap, before any crypto),
/// open (X25519, HKDF, AEAD, strict parsing), device lookup, freshness, signature.
pub fn spa_open(data: &[u8]) {
    for kat in kat_keys() {
        let pre = packet::precheck(data, kat.key_id);
        let opened = packet::open(data, &kat.gateway);
        match (&pre, &opened) {
            // open runs precheck first, so it can never get further than precheck allows.
            (Err(p), Err(o)) => assert_eq!(p, o, "open and precheck disagree"),
            (Err(p), Ok(_)) => panic!("open accepted a datagram precheck refused ({p})"),
            (Ok(()), _) => {}
        }
        let Ok(opened) = opened else { continue };
        assert!(
            (packet::MIN_KNOCK_LEN..=packet::MAX_KNOCK_LEN).contains(&data.len()),
            "opened a {}-byte datagram",
            data.len()
        );
        let knock = &opened.knock;
        assert!(!knock.app.is_empty() && knock.app.len() <= packet::MAX_APP_LEN);
        assert!(knock.flags != 0 && knock.flags & !packet::flags::ALL == 0);
        let _ = packet::check_freshness(knock.timestamp_ms, kat.now_ms, 30_000);
        if opened.device() == kat.device_id {
            let _ = opened.verify(&kat.device);
        } else {
            // Any other key must be refused (the id does not match it).
            assert_eq!(
                opened.verify(&kat.device).err(),
                Some(OpenError::BadSignature)
            );
        }
    }
}

/// Sniff mode's IPv4/IPv6/UDP header walk on an arbitrary captured packet.
pub fn capture_ip(data: &[u8]) {
    for ethertype in [ETH_P_IP, ETH_P_IPV6] {
        if let Some(d) = spa_datagram(data, ethertype, SPA_PORT) {
            assert!(d.payload.start <= d.payload.end && d.payload.end <= data.len());
            // The payload sits behind at least an IP header and a UDP header.
            assert!(
                d.payload.start >= 20 + 8,
                "payload starts at {}",
                d.payload.start
            );
        }
    }
}

/// The gateway's TOML configuration parser and validator: every error is one line.
pub fn gateway_config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Err(e) = Config::parse(text, Path::new("fuzz.toml")) {
        let line = e.to_string();
        assert!(!line.contains('\n'), "multi-line error: {line:?}");
        assert!(
            line.starts_with("config fuzz.toml: "),
            "unnamed file: {line:?}"
        );
    }
}

/// Both sides of the controller sync protocol (the control channel): the request line the
/// controller parses, the reply line the gateway parses, and the snapshot the gateway
/// indexes. Whatever parses must survive a serialize/parse round trip unchanged.
pub fn sync_messages(data: &[u8]) {
    if let Ok(req) = SyncRequest::parse(data) {
        let again = serde_json::to_vec(&req).expect("a parsed request serializes");
        let back: SyncRequest = serde_json::from_slice(&again).expect("round trip parses");
        assert_eq!(back, req);
    }
    if let Ok(resp) = serde_json::from_slice::<SyncResponse>(data) {
        let again = serde_json::to_vec(&resp).expect("a parsed response serializes");
        let back: SyncResponse = serde_json::from_slice(&again).expect("round trip parses");
        assert_eq!(back, resp);
        if let SyncResponse::Snapshot(s) = &resp {
            index(s);
        }
    }
    if let Ok(snapshot) = serde_json::from_slice::<Snapshot>(data) {
        index(&snapshot);
    }
}

fn index(snapshot: &Snapshot) {
    let (view, warnings) = RegistryView::from_snapshot(snapshot);
    // Every device is either indexed or explained by a warning (duplicates collapse).
    assert!(view.device_count() + warnings.len() <= snapshot.devices.len());
    assert!(view.device_count() <= snapshot.devices.len());
    for w in &warnings {
        assert!(!w.is_empty());
    }
}

/// The text forms of every key type (key files, CLI flags, snapshots): whatever parses
/// prints back to a text that parses to the same key.
pub fn key_text(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(k) = DevicePublicKey::from_text(s) {
        assert_eq!(DevicePublicKey::from_text(&k.to_text()).ok(), Some(k));
    }
    if let Ok(k) = DeviceSigningKey::from_text(s) {
        let back = DeviceSigningKey::from_text(&k.to_text()).expect("printed key parses");
        assert_eq!(back.public_key(), k.public_key());
    }
    if let Ok(k) = GatewayPublicKey::from_text(s) {
        assert_eq!(GatewayPublicKey::from_text(&k.to_text()).ok(), Some(k));
    }
    if let Ok(k) = GatewaySecret::from_text(s) {
        let back = GatewaySecret::from_text(&k.to_text()).expect("printed key parses");
        assert_eq!(back.public_key(), k.public_key());
    }
    if let Ok(id) = s.parse::<DeviceId>() {
        assert_eq!(id.to_string().parse::<DeviceId>().ok(), Some(id));
    }
}

/// The policy file parser, and the engine on whatever parses: every error is one line
/// naming where; every app the file names gets a decision whose explanation lists every
/// rule; a policy diffed against itself is empty.
pub fn policy_file(data: &[u8]) {
    use postern_policy::{Decision, Device, Posture, Request, Timestamp};
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let policy = match postern_policy::parse(text) {
        Ok(p) => p,
        Err(e) => {
            let line = e.to_string();
            assert!(!line.contains('\n'), "multi-line error: {line:?}");
            assert!(line.starts_with("policy "), "unnamed error: {line:?}");
            return;
        }
    };
    assert!(postern_policy::diff(&policy, &policy).is_empty());
    let device = Device {
        id: "fuzz".into(),
        user: "alice".into(),
        groups: vec!["eng".into(), "ops".into()],
        revoked: false,
        disabled: false,
        risk: 50,
        last_mfa: Timestamp::from_second(1_781_500_000).ok(),
        posture: Posture::Unknown,
    };
    let now = Timestamp::from_second(1_781_524_800).unwrap_or(Timestamp::UNIX_EPOCH);
    let apps: Vec<&str> = policy
        .rules
        .iter()
        .flat_map(|r| r.apps.iter().map(String::as_str))
        .take(16)
        .collect();
    for app in apps {
        for source in [
            None,
            Some("10.1.2.3".parse().ok()),
            Some("2001:db8::1".parse().ok()),
        ] {
            let req = Request {
                device: &device,
                app,
                source: source.flatten(),
                now,
            };
            let e = postern_policy::explain(&policy, &req);
            assert_eq!(e.steps.len(), 1 + policy.rules.len(), "{e}");
            assert_eq!(postern_policy::decide(&policy, &req), e.decision);
            if let Decision::Allow(g) = &e.decision {
                assert!(g.expires_at >= now, "{e}");
            }
        }
    }
}

/// The client API's request-signature headers and the invite token: whatever parses
/// prints back to exactly the input (one spelling per value) and re-parses to the same
/// value; verification of anything that parses returns instead of panicking.
pub fn api_auth(data: &[u8]) {
    use postern_protocol::api_auth::{InviteToken, SignedHeaders};
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut lines = text.split('\n');
    let fields: [Option<&str>; 4] = std::array::from_fn(|_| lines.next());
    if let Ok(h) = SignedHeaders::parse(fields[0], fields[1], fields[2], fields[3]) {
        let printed = h.to_headers().map(|(_, v)| v);
        for (p, f) in printed.iter().zip(fields) {
            assert_eq!(Some(p.as_str()), f, "accepted header values are canonical");
        }
        let key = DeviceSigningKey::from_seed([1; 32]).public_key();
        let _ = h.verify(&key, "POST", "/v1/posture", data, h.timestamp);
    }
    if let Ok(t) = InviteToken::parse(text) {
        let again = InviteToken::parse(&t.to_text()).expect("printed token parses");
        assert_eq!(again, t);
    }
}

/// The posture report parser (docs/posture.md): every error is one line; whatever parses
/// stays inside the documented caps, converts to facts field for field, and can be
/// checked against a requirement that looks at every fact.
pub fn posture_report(data: &[u8]) {
    use postern_policy::report::{
        MAX_CUSTOM_CHECKS, MAX_PROCESSES, MAX_REPORT_BYTES, MAX_STRING_BYTES,
    };
    use postern_policy::{PostureFacts, PostureReport, Requirement, Timestamp, Version};
    let report = match PostureReport::parse(data) {
        Ok(r) => r,
        Err(e) => {
            let line = e.to_string();
            assert!(!line.contains('\n'), "multi-line error: {line:?}");
            assert!(
                line.starts_with("posture report"),
                "unnamed error: {line:?}"
            );
            return;
        }
    };
    assert!(data.len() <= MAX_REPORT_BYTES);
    let reported = &report.facts;
    assert_eq!(reported.expires, None);
    assert!(reported.processes.len() <= MAX_PROCESSES);
    assert!(reported.custom.len() <= MAX_CUSTOM_CHECKS);
    for s in [&reported.os_family, &reported.os_version, &reported.kernel]
        .into_iter()
        .flatten()
        .chain(&reported.processes)
        .chain(reported.custom.keys())
    {
        assert!(!s.is_empty() && s.len() <= MAX_STRING_BYTES, "{s:?}");
        assert!(!s.chars().any(char::is_control), "{s:?}");
    }
    let expires = Timestamp::from_second(1_781_528_400).unwrap_or(Timestamp::MAX);
    let facts = report.to_facts(expires);
    assert_eq!(facts.expires, Some(expires));
    assert_eq!(
        PostureFacts {
            expires: None,
            ..facts.clone()
        },
        *reported
    );
    let every_fact = Requirement {
        name: "all".into(),
        remediation: "fix it".into(),
        os_family: Some("linux".into()),
        os_min_version: Some(Version(vec![22, 4])),
        min_kernel: Some(Version(vec![6, 1])),
        max_days_since_update: Some(14),
        disk_encryption: true,
        firewall: true,
        processes: vec!["falcon-sensor".into()],
        mdm: true,
        custom: vec!["screen_lock".into()],
    };
    let now = Timestamp::from_second(1_781_524_800).unwrap_or(Timestamp::UNIX_EPOCH);
    if let Err(why) = postern_policy::check_requirement(&every_fact, &facts, now) {
        assert!(!why.contains('\n'), "{why:?}");
    }
}

/// The client's reply key for known-answer knock 0 (gateway secret `seq(0x20)`, ephemeral
/// secret `seq(0x40)`, nonce `seq(0x60)[..16]`), the gateway secret and the knock binding.
pub fn reply_kat() -> &'static (ReplyKey, GatewaySecret, KnockBinding) {
    static KEY: OnceLock<(ReplyKey, GatewaySecret, KnockBinding)> = OnceLock::new();
    KEY.get_or_init(|| {
        let gateway = GatewaySecret::from_bytes(seq(0x20));
        let ephemeral = seq(0x40);
        // X25519(ephemeral, base point): the same computation as a gateway public key.
        let ephemeral_public = GatewaySecret::from_bytes(ephemeral).public_key().0;
        let mut header = vec![packet::VERSION, packet::TYPE_KNOCK];
        header.extend_from_slice(&gateway.public_key().key_id().0);
        header.extend_from_slice(&ephemeral_public);
        let mut nonce = [0u8; 16];
        nonce.copy_from_slice(&seq(0x60)[..16]);
        let key = ReplyKey::new(ephemeral, gateway.public_key(), &header, nonce)
            .unwrap_or_else(|e| panic!("the KAT knock header is a knock header: {e}"));
        let binding = KnockBinding::from_datagram(&header, nonce)
            .unwrap_or_else(|e| panic!("the KAT knock header is a knock header: {e}"));
        (key, gateway, binding)
    })
}

/// The client opening an arbitrary datagram as the reply to known-answer knock 0. Whatever
/// opens must be within the format's bounds and re-seal to the very same bytes (one reply,
/// one encoding).
pub fn reply_open(data: &[u8]) {
    let (key, gateway, binding) = reply_kat();
    let Ok(opened) = key.open(data) else { return };
    assert!(
        (reply::MIN_REPLY_LEN..=reply::MAX_REPLY_LEN).contains(&data.len()),
        "opened a {}-byte reply",
        data.len()
    );
    let mut salt = [0u8; 16];
    salt.copy_from_slice(&data[10..reply::REPLY_HEADER_LEN]);
    let again = reply::seal_reply(gateway, binding, &opened, ReplyRandomness { salt })
        .unwrap_or_else(|e| panic!("an opened reply does not re-seal: {e}"));
    assert_eq!(again, data, "reply encoding is not canonical");
}

/// Both directions of the control channel (docs/control-channel.md): whatever parses
/// round-trips, and a parsed delta applied to a fixed base either fails cleanly or yields
/// a snapshot whose digest is the delta's.
pub fn control_messages(data: &[u8]) {
    use postern_protocol::control::{ControllerMessage, GatewayMessage};
    use postern_protocol::delta;
    if let Ok(msg) = serde_json::from_slice::<GatewayMessage>(data) {
        let again = serde_json::to_vec(&msg).expect("a parsed gateway message serializes");
        let back: GatewayMessage = serde_json::from_slice(&again).expect("round trip parses");
        assert_eq!(back, msg);
    }
    let delta = match serde_json::from_slice::<ControllerMessage>(data) {
        Ok(ControllerMessage::Delta(d)) => d,
        Ok(ControllerMessage::Snapshot(s)) => {
            index(&s);
            return;
        }
        _ => match serde_json::from_slice::<delta::SnapshotDelta>(data) {
            Ok(d) => d,
            Err(_) => return,
        },
    };
    let base = delta_base();
    if let Ok(applied) = delta::apply(base, &delta) {
        assert_eq!(applied.revision, delta.to);
        assert_eq!(delta::digest(&applied), delta.digest);
        index(&applied);
    }
}

/// The base snapshot control_messages applies deltas to: the sync_messages seed snapshot
/// shape at revision 1 with one device, one app, one grant.
fn delta_base() -> &'static Snapshot {
    static BASE: OnceLock<Snapshot> = OnceLock::new();
    BASE.get_or_init(|| {
        let key = DeviceSigningKey::from_seed([7u8; 32]).public_key();
        serde_json::from_value(serde_json::json!({
            "revision": 1,
            "devices": [{"id": key.device_id().to_string(), "name": "laptop", "user": "alice",
                         "public_key": key.to_text(), "revoked": false}],
            "apps": [{"name": "ssh", "protocol": "tcp", "port": 22}],
            "grants": [{"app": "ssh", "user": "alice"}]
        }))
        .expect("the fixed delta base is a valid snapshot")
    })
}
