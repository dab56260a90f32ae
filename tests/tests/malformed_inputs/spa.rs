//! SPA datagrams: every clear header field wrong, every inner field wrong behind a valid
//! AEAD tag (the plaintext is encrypted to the gateway exactly like `seal` does, so the
//! strict parser and the signature check are what refuse it), lengths and replays. Each
//! must be dropped with the expected reason code in the gateway's check order: precheck →
//! open → device lookup → freshness → signature → replay. The protocol crate's own tests
//! add exhaustive flips and truncations of one knock (protocol/tests/packet.rs).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ed25519_dalek::Signer as _;
use postern_protocol::keys::{DevicePublicKey, DeviceSigningKey, GatewaySecret};
use postern_protocol::packet::{
    self, flags, Knock, SealRandomness, HEADER_LEN, MAX_KNOCK_LEN, MAX_PACKET_LEN, MIN_KNOCK_LEN,
    SIGNATURE_CONTEXT, TAG_LEN,
};
use postern_protocol::replay::ReplayCache;
use ring::{aead, hkdf};

const GATEWAY: [u8; 32] = [0x22; 32];
const DEVICE: [u8; 32] = [0x11; 32];
const NOW_MS: u64 = 1_767_225_600_000;
const MAX_SKEW_MS: u64 = 30_000;

pub struct Case {
    pub name: String,
    pub datagram: Vec<u8>,
    /// The reason the gateway must drop it with.
    pub reason: &'static str,
}

fn gateway() -> GatewaySecret {
    GatewaySecret::from_bytes(GATEWAY)
}

fn device() -> DeviceSigningKey {
    DeviceSigningKey::from_seed(DEVICE)
}

fn knock() -> Knock {
    Knock {
        device: device().public_key().device_id(),
        timestamp_ms: NOW_MS,
        nonce: [0x33; 16],
        flags: flags::KNOCK,
        app: postern_protocol::AppName::new("ssh").expect("valid app name"),
        claimed_addr: Some(IpAddr::V4(Ipv4Addr::new(203, 0, 113, 5))),
        posture_digest: [0; 32],
    }
}

fn sealed(k: &Knock, eph: u8) -> Vec<u8> {
    packet::seal(
        k,
        &device(),
        &gateway().public_key(),
        SealRandomness {
            ephemeral_secret: [eph; 32],
        },
    )
    .expect("sealing a valid knock")
}

/// The inner plaintext fields in wire order; `build` serializes them without any check.
#[derive(Clone)]
struct Inner {
    device: Vec<u8>,
    timestamp: Vec<u8>,
    nonce: Vec<u8>,
    flags: Vec<u8>,
    app_len: Vec<u8>,
    app: Vec<u8>,
    family: Vec<u8>,
    addr: Vec<u8>,
    posture: Vec<u8>,
}

impl Inner {
    fn valid() -> Inner {
        let k = knock();
        Inner {
            device: k.device.0.to_vec(),
            timestamp: k.timestamp_ms.to_be_bytes().to_vec(),
            nonce: k.nonce.to_vec(),
            flags: vec![k.flags],
            app_len: vec![3],
            app: b"ssh".to_vec(),
            family: vec![4],
            addr: vec![203, 0, 113, 5],
            posture: vec![0; 32],
        }
    }

    fn bytes(&self) -> Vec<u8> {
        [
            &self.device[..],
            &self.timestamp[..],
            &self.nonce[..],
            &self.flags[..],
            &self.app_len[..],
            &self.app[..],
            &self.family[..],
            &self.addr[..],
            &self.posture[..],
        ]
        .concat()
    }
}

/// How the signature part of the inner plaintext is produced.
enum Sig {
    /// Signed by the device over context || header || inner, like `seal`.
    Valid,
    /// Signed by another key.
    OtherKey,
    /// Signed over a different message.
    Message(Vec<u8>),
    /// These exact bytes.
    Raw(Vec<u8>),
}

fn raw_ephemeral() -> x25519_dalek::StaticSecret {
    x25519_dalek::StaticSecret::from([0x55u8; 32])
}

/// The clear header `seal_raw` uses (its own ephemeral key).
fn raw_header() -> Vec<u8> {
    let eph_pub = x25519_dalek::PublicKey::from(&raw_ephemeral());
    let mut header = vec![packet::VERSION, packet::TYPE_KNOCK];
    header.extend_from_slice(&gateway().public_key().key_id().0);
    header.extend_from_slice(eph_pub.as_bytes());
    header
}

/// Encrypts `inner` + signature + `trailing` to the gateway behind a valid tag.
fn seal_raw(inner: &[u8], sig: Sig, trailing: &[u8]) -> Vec<u8> {
    let gw_pub = gateway().public_key();
    let shared = raw_ephemeral().diffie_hellman(&x25519_dalek::PublicKey::from(gw_pub.0));
    let mut header = raw_header();
    let message = [SIGNATURE_CONTEXT, &header, inner].concat();
    let signature = match sig {
        Sig::Valid => ed25519_dalek::SigningKey::from_bytes(&DEVICE)
            .sign(&message)
            .to_bytes()
            .to_vec(),
        Sig::OtherKey => ed25519_dalek::SigningKey::from_bytes(&[0x77; 32])
            .sign(&message)
            .to_bytes()
            .to_vec(),
        Sig::Message(m) => ed25519_dalek::SigningKey::from_bytes(&DEVICE)
            .sign(&m)
            .to_bytes()
            .to_vec(),
        Sig::Raw(b) => b,
    };
    let mut body = [inner, &signature, trailing].concat();
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, packet::HKDF_SALT).extract(shared.as_bytes());
    let info = [header.as_slice(), gw_pub.0.as_slice()];
    let okm = prk.expand(&info, &aead::CHACHA20_POLY1305).expect("hkdf");
    aead::LessSafeKey::new(aead::UnboundKey::from(okm))
        .seal_in_place_append_tag(
            aead::Nonce::assume_unique_for_key([0; 12]),
            aead::Aad::from(&header[..]),
            &mut body,
        )
        .expect("aead seal");
    header.extend_from_slice(&body);
    header
}

fn inner_case(name: &str, f: impl FnOnce(&mut Inner), reason: &'static str) -> Case {
    let mut inner = Inner::valid();
    f(&mut inner);
    Case {
        name: format!("inner: {name}"),
        datagram: seal_raw(&inner.bytes(), Sig::Valid, &[]),
        reason,
    }
}

const LOW_ORDER_POINTS: [&str; 7] = [
    "0000000000000000000000000000000000000000000000000000000000000000",
    "0100000000000000000000000000000000000000000000000000000000000000",
    "e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800",
    "5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157",
    "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
    "edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
    "eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
];

pub fn cases() -> Vec<Case> {
    let valid = sealed(&knock(), 0x44);
    let mut cases = Vec::new();
    let mut header = |name: String, f: &dyn Fn(&mut Vec<u8>), reason: &'static str| {
        let mut d = valid.clone();
        f(&mut d);
        cases.push(Case {
            name: format!("header: {name}"),
            datagram: d,
            reason,
        });
    };
    // Clear header, byte by byte.
    for v in [0u8, 2, 3, 0x7f, 0xff] {
        header(format!("version {v}"), &|d| d[0] = v, "bad_version");
    }
    for t in [0u8, packet::TYPE_REPLY, 3, 0xff] {
        header(format!("type {t}"), &|d| d[1] = t, "bad_type");
    }
    for i in 2..10 {
        header(
            format!("key id byte {}", i - 2),
            &|d| d[i] ^= 0x01,
            "wrong_gateway",
        );
    }
    header(
        "key id of another gateway".into(),
        &|d| {
            let other = GatewaySecret::from_bytes([0x99; 32]).public_key().key_id();
            d[2..10].copy_from_slice(&other.0);
        },
        "wrong_gateway",
    );
    for (n, p) in LOW_ORDER_POINTS.iter().enumerate() {
        header(
            format!("low-order ephemeral point {n}"),
            &|d| hex::decode_to_slice(p, &mut d[10..42]).expect("constant hex"),
            "low_order_point",
        );
    }
    header(
        "another ephemeral key".into(),
        &|d| d[10..42].copy_from_slice(&[0x09; 32]),
        "decrypt",
    );
    // Ciphertext and tag.
    header(
        "first ciphertext byte".into(),
        &|d| d[HEADER_LEN] ^= 0x80,
        "decrypt",
    );
    header(
        "tag zeroed".into(),
        &|d| {
            let n = d.len();
            d[n - TAG_LEN..].fill(0);
        },
        "decrypt",
    );
    header(
        "last tag byte".into(),
        &|d| {
            let n = d.len();
            d[n - 1] ^= 1;
        },
        "decrypt",
    );
    header(
        "body of another knock".into(),
        &|d| {
            let other = sealed(&knock(), 0x45);
            d.truncate(HEADER_LEN);
            d.extend_from_slice(&other[HEADER_LEN..]);
        },
        "decrypt",
    );
    header("one byte appended".into(), &|d| d.push(0), "decrypt");
    header(
        "one byte removed".into(),
        &|d| {
            d.pop();
        },
        "decrypt",
    );
    // Lengths.
    for len in [
        0usize,
        1,
        2,
        10,
        HEADER_LEN - 1,
        HEADER_LEN,
        MIN_KNOCK_LEN - 1,
    ] {
        header(format!("{len} bytes"), &|d| d.truncate(len), "too_short");
    }
    for len in [
        MAX_KNOCK_LEN + 1,
        500,
        MAX_PACKET_LEN,
        MAX_PACKET_LEN + 1,
        9000,
        65_507,
    ] {
        header(format!("{len} bytes"), &|d| d.resize(len, 0xa5), "too_long");
    }

    // Inner fields behind a valid tag.
    let c = &mut cases;
    c.push(inner_case(
        "unknown device id",
        |i| i.device = vec![0xee; 16],
        "unknown_device",
    ));
    c.push(inner_case(
        "device id of 15 bytes",
        |i| i.device.truncate(15),
        "malformed",
    ));
    for (name, ts) in [
        ("timestamp 0", 0u64),
        ("timestamp u64::MAX", u64::MAX),
        ("timestamp 31 s old", NOW_MS - MAX_SKEW_MS - 1_000),
        ("timestamp 31 s ahead", NOW_MS + MAX_SKEW_MS + 1_000),
        ("timestamp 1 ms past the skew", NOW_MS - MAX_SKEW_MS - 1),
        ("timestamp a day old", NOW_MS - 86_400_000),
    ] {
        c.push(inner_case(
            name,
            |i| i.timestamp = ts.to_be_bytes().to_vec(),
            "stale",
        ));
    }
    // 8 is ACK alone (a modifier that asks for nothing); 0x18 adds an unknown bit to it.
    for f in [0u8, 8, 0x18, 0x10, 0x40, 0x80, 0xf0, 0xff] {
        c.push(inner_case(
            &format!("flags {f:#04x}"),
            |i| i.flags = vec![f],
            "malformed",
        ));
    }
    c.push(inner_case(
        "close flag (signed, but no session to close)",
        |i| {
            i.flags = vec![flags::CLOSE];
            i.nonce = vec![0x34; 16];
        },
        "no_session",
    ));
    for (name, app, len) in [
        ("empty app", b"".to_vec(), 0u8),
        ("uppercase app", b"SSH".to_vec(), 3),
        ("space in app", b"s h".to_vec(), 3),
        ("slash in app", b"a/b".to_vec(), 3),
        ("NUL in app", b"ss\0".to_vec(), 3),
        ("newline in app", b"ss\n".to_vec(), 3),
        ("invalid UTF-8 app", b"ss\xff".to_vec(), 3),
        ("non-ASCII app", "é".as_bytes().to_vec(), 2),
        ("65-byte app", vec![b'a'; 65], 65),
        ("255-byte app", vec![b'a'; 255], 255),
    ] {
        c.push(inner_case(
            name,
            |i| {
                i.app = app;
                i.app_len = vec![len];
            },
            // 255 bytes of app make the datagram longer than any v1 knock.
            if len == 255 { "too_long" } else { "malformed" },
        ));
    }
    c.push(inner_case(
        "app length past the end",
        |i| i.app_len = vec![200],
        "malformed",
    ));
    c.push(inner_case(
        "app length one short",
        |i| i.app_len = vec![2],
        "malformed",
    ));
    c.push(inner_case(
        "app length one long",
        |i| i.app_len = vec![4],
        "malformed",
    ));
    for fam in [1u8, 2, 3, 5, 7, 0x46, 0xff] {
        c.push(inner_case(
            &format!("address family {fam}"),
            |i| i.family = vec![fam],
            "malformed",
        ));
    }
    c.push(inner_case(
        "IPv4 address of 3 bytes",
        |i| i.addr.truncate(3),
        "malformed",
    ));
    c.push(inner_case(
        "IPv4 address of 5 bytes",
        |i| i.addr.push(9),
        "malformed",
    ));
    c.push(inner_case(
        "IPv6 family with 4 address bytes",
        |i| i.family = vec![6],
        "malformed",
    ));
    c.push(inner_case(
        "IPv6 address of 15 bytes",
        |i| {
            i.family = vec![6];
            i.addr = Ipv6Addr::LOCALHOST.octets()[..15].to_vec();
        },
        "malformed",
    ));
    c.push(inner_case(
        "no family with address bytes",
        |i| i.family = vec![0],
        "malformed",
    ));
    c.push(inner_case(
        "posture digest of 31 bytes",
        |i| i.posture.truncate(31),
        "malformed",
    ));
    c.push(inner_case(
        "posture digest of 33 bytes",
        |i| i.posture.push(0),
        "malformed",
    ));
    // The signature.
    let inner = Inner::valid().bytes();
    let sig_case = |name: &str, sig: Sig, trailing: &[u8], reason: &'static str| Case {
        name: format!("signature: {name}"),
        datagram: seal_raw(&inner, sig, trailing),
        reason,
    };
    c.push(sig_case(
        "by another key",
        Sig::OtherKey,
        &[],
        "bad_signature",
    ));
    c.push(sig_case(
        "over another message",
        Sig::Message(b"postern spa v1 sig".to_vec()),
        &[],
        "bad_signature",
    ));
    c.push(sig_case(
        "without the context prefix",
        Sig::Message([&raw_header()[..], &inner[..]].concat()),
        &[],
        "bad_signature",
    ));
    c.push(sig_case(
        "all zeros",
        Sig::Raw(vec![0; 64]),
        &[],
        "bad_signature",
    ));
    c.push(sig_case(
        "all 0xff",
        Sig::Raw(vec![0xff; 64]),
        &[],
        "bad_signature",
    ));
    c.push(sig_case(
        "63 bytes",
        Sig::Raw(vec![1; 63]),
        &[],
        "malformed",
    ));
    c.push(sig_case("one trailing byte", Sig::Valid, &[0], "malformed"));
    c.push(sig_case(
        "16 trailing bytes",
        Sig::Valid,
        &[0; 16],
        "malformed",
    ));
    {
        // Non-canonical S (S + L): verify_strict must refuse the malleated signature.
        let message = [SIGNATURE_CONTEXT, &raw_header()[..], &inner[..]].concat();
        let mut s = ed25519_dalek::SigningKey::from_bytes(&DEVICE)
            .sign(&message)
            .to_bytes();
        add_group_order(&mut s[32..]);
        c.push(sig_case(
            "non-canonical S",
            Sig::Raw(s.to_vec()),
            &[],
            "bad_signature",
        ));
    }
    // A knock that passes everything once is a replay the second time.
    c.push(Case {
        name: "replayed valid knock".into(),
        datagram: valid.clone(),
        reason: "replay",
    });
    cases
}

/// s += L (the ed25519 group order), little-endian.
fn add_group_order(s: &mut [u8]) {
    const L: [u8; 32] = [
        0xed, 0xd3, 0xf5, 0x5c, 0x1a, 0x63, 0x12, 0x58, 0xd6, 0x9c, 0xf7, 0xa2, 0xde, 0xf9, 0xde,
        0x14, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10,
    ];
    let mut carry = 0u16;
    for (b, l) in s.iter_mut().zip(L) {
        let v = u16::from(*b) + u16::from(l) + carry;
        *b = v as u8;
        carry = v >> 8;
    }
}

/// The gateway's checks in its order; Ok(knock) only if every check passes. Unlike the
/// pipeline it stops short of the registry's app/grant decisions except for the flags.
fn gateway_path(
    d: &[u8],
    gw: &GatewaySecret,
    key: &DevicePublicKey,
    replay: &mut ReplayCache,
) -> Result<Knock, String> {
    let reason = |e: packet::OpenError| {
        super::assert_one_line("open error", &e.to_string());
        e.reason().to_owned()
    };
    packet::precheck(d, gw.public_key().key_id()).map_err(reason)?;
    let opened = packet::open(d, gw).map_err(reason)?;
    if opened.device() != key.device_id() {
        return Err("unknown_device".into());
    }
    packet::check_freshness(opened.knock.timestamp_ms, NOW_MS, MAX_SKEW_MS).map_err(reason)?;
    let knock = opened.verify(key).map_err(reason)?;
    replay
        .check_and_insert(knock.device, knock.nonce, knock.timestamp_ms, NOW_MS)
        .map_err(reason)?;
    // The gateway closes the device's live session; this model holds none.
    if knock.flags & flags::CLOSE != 0 {
        return Err("no_session".into());
    }
    Ok(knock)
}

#[test]
fn malformed_spa_datagrams_are_dropped_with_their_reason() {
    let gw = gateway();
    let key = device().public_key();
    let mut replay = ReplayCache::new(1024, 2 * MAX_SKEW_MS);
    // The unmodified knock passes (and is remembered, so the replay case below is refused).
    let valid = sealed(&knock(), 0x44);
    assert_eq!(
        gateway_path(&valid, &gw, &key, &mut replay),
        Ok(knock()),
        "the reference knock must pass"
    );
    let cases = cases();
    let mut failures = Vec::new();
    for case in &cases {
        let got = gateway_path(&case.datagram, &gw, &key, &mut replay);
        match got {
            Err(reason) if reason == case.reason => {}
            other => failures.push(format!(
                "{}: expected drop `{}`, got {other:?}",
                case.name, case.reason
            )),
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} SPA cases wrong:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}
