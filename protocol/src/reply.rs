//! Wire format v1 of the gateway's reply to an authenticated knock: building
//! ([`seal_reply`], gateway side) and reading ([`ReplyKey::open`], client side) one datagram.
//!
//! The reply is "the knock's construction in the other direction": the AEAD key comes from
//! X25519(gateway static secret, the knock's ephemeral public key), so only the gateway can
//! produce a reply the client accepts and only the client that knocked (the one holder of the
//! ephemeral secret) can read it. A distinct HKDF salt keeps reply keys apart from knock
//! keys; the knock's header and nonce are mixed into the key and the AAD, so a reply is bound
//! to exactly one knock.
//!
//! Owns: the reply byte layout (docs/protocol.md §11), its key schedule, strict parsing and
//! the stable error codes ([`ReplyError::reason`]). Must not touch: sockets, the clock,
//! randomness sources or the decision of *whether* to reply (the gateway's job). No function
//! here panics on any input.

use ring::{aead, hkdf};
use x25519_dalek::{PublicKey as XPublicKey, StaticSecret};
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use crate::keys::{GatewayPublicKey, GatewaySecret};
use crate::packet::{HEADER_LEN, MAX_PACKET_LEN, TAG_LEN, TYPE_REPLY, VERSION};

/// Reply header: version(1) + type(1) + gateway key id(8) + reply salt(16).
pub const REPLY_HEADER_LEN: usize = 26;
/// HKDF salt of reply keys (distinct from the knock's `postern spa v1`).
pub const REPLY_HKDF_SALT: &[u8] = b"postern spa v1 reply";
/// Longest reason code, in bytes (`[a-z0-9_]`).
pub const MAX_REASON_LEN: usize = 32;
/// Longest message or remediation text, in bytes (UTF-8, no control characters).
pub const MAX_TEXT_LEN: usize = 400;
/// Inner plaintext without the three variable fields: decision 1 + reason_len 1 +
/// message_len 2 + remediation_len 2 + session_secs 4.
const INNER_FIXED_LEN: usize = 1 + 1 + 2 + 2 + 4;
/// Shortest valid reply datagram (1-byte reason, empty texts): 53 bytes.
pub const MIN_REPLY_LEN: usize = REPLY_HEADER_LEN + INNER_FIXED_LEN + 1 + TAG_LEN;
/// Longest valid reply datagram: 884 bytes.
pub const MAX_REPLY_LEN: usize =
    REPLY_HEADER_LEN + INNER_FIXED_LEN + MAX_REASON_LEN + 2 * MAX_TEXT_LEN + TAG_LEN;
/// Length of the knock nonce the reply is bound to.
pub const KNOCK_NONCE_LEN: usize = 16;

/// What the gateway decided about the knock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyDecision {
    /// The knock was refused (wire value 1).
    Deny,
    /// The knock was admitted; an acknowledgement (wire value 2).
    Allow,
}

impl ReplyDecision {
    fn wire(self) -> u8 {
        match self {
            ReplyDecision::Deny => 1,
            ReplyDecision::Allow => 2,
        }
    }
}

/// The inner fields of a reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub decision: ReplyDecision,
    /// Stable reason code (e.g. `policy_denied`), 1..=32 bytes of `[a-z0-9_]`.
    pub reason: String,
    /// One human sentence, at most 400 bytes of UTF-8 without control characters.
    pub message: String,
    /// What to do about it (empty = none), same rules as `message`.
    pub remediation: String,
    /// Allow: seconds the session/lease lasts; 0 = not stated (always 0 for a deny).
    pub session_secs: u32,
}

/// Caller-supplied randomness for [`seal_reply`]: a fresh 16-byte salt per reply, so two
/// replies never share an AEAD key even if the gateway answered one knock twice.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct ReplyRandomness {
    pub salt: [u8; 16],
}

impl std::fmt::Debug for ReplyRandomness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ReplyRandomness { salt: <redacted> }")
    }
}

/// Errors from [`seal_reply`] and [`ReplyKey::open`]. [`ReplyError::reason`] is stable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ReplyError {
    #[error("reply datagram too short")]
    TooShort,
    #[error("reply datagram too long")]
    TooLong,
    #[error("unsupported reply version {0}")]
    BadVersion(u8),
    #[error("unexpected packet type {0} (want a reply)")]
    BadType(u8),
    #[error("reply is from another gateway key")]
    WrongGateway,
    #[error("key is a low-order point")]
    LowOrderPoint,
    #[error("reply decryption failed")]
    Decrypt,
    #[error("malformed reply: {0}")]
    Malformed(&'static str),
    /// `seal_reply` was given fields the format cannot carry.
    #[error("invalid reply field: {0}")]
    Invalid(&'static str),
    /// The knock datagram given to bind to is not a knock header.
    #[error("not a knock datagram")]
    NotAKnock,
    #[error("crypto failure: {0}")]
    Crypto(&'static str),
}

impl ReplyError {
    /// Stable snake_case code for logs and metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            ReplyError::TooShort => "too_short",
            ReplyError::TooLong => "too_long",
            ReplyError::BadVersion(_) => "bad_version",
            ReplyError::BadType(_) => "bad_type",
            ReplyError::WrongGateway => "wrong_gateway",
            ReplyError::LowOrderPoint => "low_order_point",
            ReplyError::Decrypt => "decrypt",
            ReplyError::Malformed(_) => "malformed",
            ReplyError::Invalid(_) => "invalid",
            ReplyError::NotAKnock => "not_a_knock",
            ReplyError::Crypto(_) => "crypto",
        }
    }
}

/// The knock a reply answers: its 42-byte clear header and its 16-byte nonce.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KnockBinding {
    pub header: [u8; HEADER_LEN],
    pub nonce: [u8; KNOCK_NONCE_LEN],
}

impl KnockBinding {
    /// Takes the header from the first 42 bytes of a knock `datagram` (version 1, type knock).
    pub fn from_datagram(
        datagram: &[u8],
        nonce: [u8; KNOCK_NONCE_LEN],
    ) -> Result<KnockBinding, ReplyError> {
        let h = datagram.get(..HEADER_LEN).ok_or(ReplyError::NotAKnock)?;
        if h[0] != VERSION || h[1] != crate::packet::TYPE_KNOCK {
            return Err(ReplyError::NotAKnock);
        }
        let mut header = [0u8; HEADER_LEN];
        header.copy_from_slice(h);
        Ok(KnockBinding { header, nonce })
    }

    fn ephemeral_public(&self) -> [u8; 32] {
        let mut e = [0u8; 32];
        e.copy_from_slice(&self.header[10..42]);
        e
    }
}

/// reply header || knock header || knock nonce: the AAD, and (with the gateway public key)
/// the HKDF info.
fn associated_data(reply_header: &[u8], knock: &KnockBinding) -> Vec<u8> {
    let mut a = Vec::with_capacity(REPLY_HEADER_LEN + HEADER_LEN + KNOCK_NONCE_LEN);
    a.extend_from_slice(reply_header);
    a.extend_from_slice(&knock.header);
    a.extend_from_slice(&knock.nonce);
    a
}

fn derive_key(
    shared: &[u8; 32],
    aad: &[u8],
    gateway_public: &[u8; 32],
) -> Option<aead::LessSafeKey> {
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, REPLY_HKDF_SALT).extract(shared);
    let info = [aad, gateway_public.as_slice()];
    let okm = prk.expand(&info, &aead::CHACHA20_POLY1305).ok()?;
    Some(aead::LessSafeKey::new(aead::UnboundKey::from(okm)))
}

fn valid_reason(r: &str) -> bool {
    !r.is_empty()
        && r.len() <= MAX_REASON_LEN
        && r.bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'_')
}

fn valid_text(t: &str) -> bool {
    t.len() <= MAX_TEXT_LEN && !t.chars().any(char::is_control)
}

/// Gateway side: encrypts `reply` to the knocking client. `knock` is the authenticated
/// knock's binding; `gateway` the gateway's static secret. The reply header carries the
/// gateway key id (so the client can tell it apart from stray datagrams cheaply).
pub fn seal_reply(
    gateway: &GatewaySecret,
    knock: &KnockBinding,
    reply: &Reply,
    rnd: ReplyRandomness,
) -> Result<Vec<u8>, ReplyError> {
    if !valid_reason(&reply.reason) {
        return Err(ReplyError::Invalid(
            "reason must be 1..=32 bytes of [a-z0-9_]",
        ));
    }
    if !valid_text(&reply.message) || !valid_text(&reply.remediation) {
        return Err(ReplyError::Invalid(
            "message and remediation must be at most 400 bytes without control characters",
        ));
    }
    if reply.decision == ReplyDecision::Deny && reply.session_secs != 0 {
        return Err(ReplyError::Invalid("a deny carries no session length"));
    }
    let public = gateway.public_key();
    let mut header = [0u8; REPLY_HEADER_LEN];
    header[0] = VERSION;
    header[1] = TYPE_REPLY;
    header[2..10].copy_from_slice(&public.key_id().0);
    header[10..26].copy_from_slice(&rnd.salt);
    drop(rnd);
    let shared = gateway
        .static_secret()
        .diffie_hellman(&XPublicKey::from(knock.ephemeral_public()));
    if !shared.was_contributory() {
        return Err(ReplyError::LowOrderPoint);
    }
    let aad = associated_data(&header, knock);
    let key = derive_key(shared.as_bytes(), &aad, &public.0).ok_or(ReplyError::Crypto("hkdf"))?;
    drop(shared);

    let mut inner = Vec::with_capacity(MAX_REPLY_LEN);
    inner.push(reply.decision.wire());
    // Lengths were validated above (≤ 32, ≤ 400), so they fit.
    inner.push(reply.reason.len() as u8);
    inner.extend_from_slice(reply.reason.as_bytes());
    for text in [&reply.message, &reply.remediation] {
        inner.extend_from_slice(&(text.len() as u16).to_be_bytes());
        inner.extend_from_slice(text.as_bytes());
    }
    inner.extend_from_slice(&reply.session_secs.to_be_bytes());
    key.seal_in_place_append_tag(
        aead::Nonce::assume_unique_for_key([0u8; 12]),
        aead::Aad::from(&aad[..]),
        &mut inner,
    )
    .map_err(|_| ReplyError::Crypto("aead seal"))?;
    let mut out = Vec::with_capacity(REPLY_HEADER_LEN + inner.len());
    out.extend_from_slice(&header);
    out.extend_from_slice(&inner);
    Ok(out)
}

/// Client side: what it keeps after sending a knock, to read the gateway's reply. Holds
/// the knock's ephemeral secret (zeroized on drop; `Debug` is redacted).
pub struct ReplyKey {
    ephemeral_secret: Zeroizing<[u8; 32]>,
    gateway: GatewayPublicKey,
    knock: KnockBinding,
}

impl std::fmt::Debug for ReplyKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplyKey")
            .field("gateway", &self.gateway.key_id())
            .finish_non_exhaustive()
    }
}

impl ReplyKey {
    /// `ephemeral_secret` is the one passed to `packet::seal` in
    /// [`crate::packet::SealRandomness`] for the knock `datagram` with nonce `knock_nonce`.
    pub fn new(
        ephemeral_secret: [u8; 32],
        gateway: GatewayPublicKey,
        datagram: &[u8],
        knock_nonce: [u8; KNOCK_NONCE_LEN],
    ) -> Result<ReplyKey, ReplyError> {
        Ok(ReplyKey {
            ephemeral_secret: Zeroizing::new(ephemeral_secret),
            gateway,
            knock: KnockBinding::from_datagram(datagram, knock_nonce)?,
        })
    }

    /// Checks, decrypts and strictly parses one reply datagram.
    pub fn open(&self, datagram: &[u8]) -> Result<Reply, ReplyError> {
        if datagram.len() > MAX_PACKET_LEN {
            return Err(ReplyError::TooLong);
        }
        let header = datagram
            .get(..REPLY_HEADER_LEN)
            .ok_or(ReplyError::TooShort)?;
        if header[0] != VERSION {
            return Err(ReplyError::BadVersion(header[0]));
        }
        if header[1] != TYPE_REPLY {
            return Err(ReplyError::BadType(header[1]));
        }
        if datagram.len() < MIN_REPLY_LEN {
            return Err(ReplyError::TooShort);
        }
        if datagram.len() > MAX_REPLY_LEN {
            return Err(ReplyError::TooLong);
        }
        if header[2..10] != self.gateway.key_id().0 {
            return Err(ReplyError::WrongGateway);
        }
        let secret = StaticSecret::from(*self.ephemeral_secret);
        let shared = secret.diffie_hellman(&XPublicKey::from(self.gateway.0));
        if !shared.was_contributory() {
            return Err(ReplyError::LowOrderPoint);
        }
        let aad = associated_data(header, &self.knock);
        let key =
            derive_key(shared.as_bytes(), &aad, &self.gateway.0).ok_or(ReplyError::Decrypt)?;
        drop(shared);
        let mut buf = Zeroizing::new(datagram[REPLY_HEADER_LEN..].to_vec());
        let plain = key
            .open_in_place(
                aead::Nonce::assume_unique_for_key([0u8; 12]),
                aead::Aad::from(&aad[..]),
                &mut buf,
            )
            .map_err(|_| ReplyError::Decrypt)?;
        parse_inner(plain)
    }
}

fn parse_inner(p: &[u8]) -> Result<Reply, ReplyError> {
    let mut pos = 0usize;
    let mut take = |n: usize, what: &'static str| -> Result<&[u8], ReplyError> {
        let end = pos.checked_add(n).ok_or(ReplyError::Malformed(what))?;
        let s = p.get(pos..end).ok_or(ReplyError::Malformed(what))?;
        pos = end;
        Ok(s)
    };
    let decision = match take(1, "truncated decision")?[0] {
        1 => ReplyDecision::Deny,
        2 => ReplyDecision::Allow,
        _ => return Err(ReplyError::Malformed("unknown decision")),
    };
    let reason_len = usize::from(take(1, "truncated reason length")?[0]);
    let reason = std::str::from_utf8(take(reason_len, "truncated reason")?)
        .map_err(|_| ReplyError::Malformed("reason is not UTF-8"))?
        .to_owned();
    if !valid_reason(&reason) {
        return Err(ReplyError::Malformed(
            "reason outside [a-z0-9_] or bad length",
        ));
    }
    let mut texts = [String::new(), String::new()];
    for text in &mut texts {
        let l = take(2, "truncated text length")?;
        let len = usize::from(u16::from_be_bytes([l[0], l[1]]));
        if len > MAX_TEXT_LEN {
            return Err(ReplyError::Malformed("text longer than 400 bytes"));
        }
        let t = std::str::from_utf8(take(len, "truncated text")?)
            .map_err(|_| ReplyError::Malformed("text is not UTF-8"))?;
        if !valid_text(t) {
            return Err(ReplyError::Malformed("text has control characters"));
        }
        *text = t.to_owned();
    }
    let s = take(4, "truncated session seconds")?;
    let session_secs = u32::from_be_bytes([s[0], s[1], s[2], s[3]]);
    if pos != p.len() {
        return Err(ReplyError::Malformed("trailing bytes"));
    }
    if decision == ReplyDecision::Deny && session_secs != 0 {
        return Err(ReplyError::Malformed("a deny carries no session length"));
    }
    let [message, remediation] = texts;
    Ok(Reply {
        decision,
        reason,
        message,
        remediation,
        session_secs,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::DeviceSigningKey;
    use crate::packet::{flags, seal, Knock, SealRandomness};

    const EPH: [u8; 32] = [3u8; 32];
    const NONCE: [u8; 16] = [5u8; 16];

    fn knock_datagram(gw: &GatewayPublicKey, eph: [u8; 32]) -> Vec<u8> {
        let dev = DeviceSigningKey::from_seed([1u8; 32]);
        let knock = Knock {
            device: dev.public_key().device_id(),
            timestamp_ms: 1_700_000_000_000,
            nonce: NONCE,
            flags: flags::KNOCK,
            app: crate::packet::AppName::new("ssh").expect("valid app name"),
            claimed_addr: None,
            posture_digest: [0; 32],
        };
        seal(
            &knock,
            &dev,
            gw,
            SealRandomness {
                ephemeral_secret: eph,
            },
        )
        .expect("seal")
    }

    fn deny() -> Reply {
        Reply {
            decision: ReplyDecision::Deny,
            reason: "policy_denied".into(),
            message: "disk encryption required".into(),
            remediation: "enable LUKS, see https://wiki.example/luks".into(),
            session_secs: 0,
        }
    }

    fn setup() -> (GatewaySecret, Vec<u8>, ReplyKey) {
        let gw = GatewaySecret::from_bytes([2u8; 32]);
        let d = knock_datagram(&gw.public_key(), EPH);
        let key = ReplyKey::new(EPH, gw.public_key(), &d, NONCE).expect("reply key");
        (gw, d, key)
    }

    fn sealed(gw: &GatewaySecret, d: &[u8], r: &Reply) -> Vec<u8> {
        let b = KnockBinding::from_datagram(d, NONCE).expect("binding");
        seal_reply(gw, &b, r, ReplyRandomness { salt: [9u8; 16] }).expect("seal reply")
    }

    #[test]
    fn sizes() {
        assert_eq!(MIN_REPLY_LEN, 53);
        assert_eq!(MAX_REPLY_LEN, 884);
        const { assert!(MAX_REPLY_LEN < MAX_PACKET_LEN) };
    }

    #[test]
    fn round_trip_deny_and_allow() {
        let (gw, d, key) = setup();
        let r = deny();
        let wire = sealed(&gw, &d, &r);
        assert_eq!(
            wire.len(),
            REPLY_HEADER_LEN
                + INNER_FIXED_LEN
                + r.reason.len()
                + r.message.len()
                + r.remediation.len()
                + TAG_LEN
        );
        assert_eq!(key.open(&wire).expect("open"), r);
        let ack = Reply {
            decision: ReplyDecision::Allow,
            reason: "granted".into(),
            message: String::new(),
            remediation: String::new(),
            session_secs: 3600,
        };
        let wire = sealed(&gw, &d, &ack);
        assert_eq!(wire.len(), MIN_REPLY_LEN - 1 + "granted".len());
        assert_eq!(key.open(&wire).expect("open ack"), ack);
        // Maximum sizes seal and open.
        let big = Reply {
            reason: "a".repeat(MAX_REASON_LEN),
            message: "m".repeat(MAX_TEXT_LEN),
            remediation: "é".repeat(MAX_TEXT_LEN / 2),
            ..deny()
        };
        let wire = sealed(&gw, &d, &big);
        assert_eq!(wire.len(), MAX_REPLY_LEN);
        assert_eq!(key.open(&wire).expect("open max"), big);
    }

    #[test]
    fn every_bit_flip_fails() {
        let (gw, d, key) = setup();
        let wire = sealed(&gw, &d, &deny());
        for i in 0..wire.len() * 8 {
            let mut w = wire.clone();
            w[i / 8] ^= 1 << (i % 8);
            assert!(key.open(&w).is_err(), "bit {i} flipped was accepted");
        }
    }

    #[test]
    fn truncation_and_extension_fail() {
        let (gw, d, key) = setup();
        let wire = sealed(&gw, &d, &deny());
        for n in 0..wire.len() {
            assert!(key.open(&wire[..n]).is_err(), "truncated to {n} accepted");
        }
        let mut longer = wire.clone();
        longer.push(0);
        assert!(key.open(&longer).is_err());
    }

    #[test]
    fn wrong_ephemeral_or_knock_fails() {
        let (gw, d, _) = setup();
        let wire = sealed(&gw, &d, &deny());
        let other = ReplyKey::new([4u8; 32], gw.public_key(), &d, NONCE).expect("key");
        assert_eq!(other.open(&wire), Err(ReplyError::Decrypt));
        let other_nonce = ReplyKey::new(EPH, gw.public_key(), &d, [6u8; 16]).expect("key");
        assert_eq!(other_nonce.open(&wire), Err(ReplyError::Decrypt));
        let d2 = knock_datagram(&gw.public_key(), [7u8; 32]);
        let other_knock = ReplyKey::new(EPH, gw.public_key(), &d2, NONCE).expect("key");
        assert_eq!(other_knock.open(&wire), Err(ReplyError::Decrypt));
        // Another gateway cannot forge one.
        let rogue = GatewaySecret::from_bytes([8u8; 32]);
        let mut forged = sealed(&rogue, &d, &deny());
        assert_eq!(
            ReplyKey::new(EPH, gw.public_key(), &d, NONCE)
                .expect("key")
                .open(&forged),
            Err(ReplyError::WrongGateway)
        );
        forged[2..10].copy_from_slice(&gw.public_key().key_id().0);
        assert_eq!(
            ReplyKey::new(EPH, gw.public_key(), &d, NONCE)
                .expect("key")
                .open(&forged),
            Err(ReplyError::Decrypt)
        );
        // A knock is not a reply.
        assert_eq!(
            ReplyKey::new(EPH, gw.public_key(), &d, NONCE)
                .expect("key")
                .open(&d),
            Err(ReplyError::BadType(1))
        );
    }

    #[test]
    fn low_order_ephemeral_is_refused() {
        let gw = GatewaySecret::from_bytes([2u8; 32]);
        let mut d = knock_datagram(&gw.public_key(), EPH);
        d[10..42].fill(0);
        let b = KnockBinding::from_datagram(&d, NONCE).expect("binding");
        assert_eq!(
            seal_reply(&gw, &b, &deny(), ReplyRandomness { salt: [0; 16] }),
            Err(ReplyError::LowOrderPoint)
        );
        let zero = GatewayPublicKey([0u8; 32]);
        let mut wire = vec![0u8; MIN_REPLY_LEN];
        wire[0] = VERSION;
        wire[1] = TYPE_REPLY;
        wire[2..10].copy_from_slice(&zero.key_id().0);
        assert_eq!(
            ReplyKey::new(EPH, zero, &d, NONCE)
                .expect("key")
                .open(&wire),
            Err(ReplyError::LowOrderPoint)
        );
    }

    #[test]
    fn seal_refuses_bad_fields() {
        let (gw, d, _) = setup();
        let b = KnockBinding::from_datagram(&d, NONCE).expect("binding");
        let rnd = || ReplyRandomness { salt: [0; 16] };
        for bad in [
            Reply {
                reason: String::new(),
                ..deny()
            },
            Reply {
                reason: "Bad".into(),
                ..deny()
            },
            Reply {
                message: "a\x1b[2Jb".into(),
                ..deny()
            },
            Reply {
                remediation: "x".repeat(MAX_TEXT_LEN + 1),
                ..deny()
            },
        ] {
            assert!(matches!(
                seal_reply(&gw, &b, &bad, rnd()),
                Err(ReplyError::Invalid(_))
            ));
        }
        assert_eq!(
            KnockBinding::from_datagram(&[1u8; 10], NONCE),
            Err(ReplyError::NotAKnock)
        );
    }
}
