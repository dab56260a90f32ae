//! Wire format v1 of the SPA knock: building ([`seal`]) and reading ([`precheck`],
//! [`open`], [`OpenedKnock::verify`], [`check_freshness`]) one datagram.
//!
//! Owns: the byte layout (see `docs/protocol.md`), the key schedule (X25519 →
//! HKDF-SHA256 → ChaCha20-Poly1305), the ed25519 signature message, strict parsing of
//! the inner plaintext and the stable error codes ([`OpenError::reason`]).
//!
//! Must not touch: sockets, the clock, randomness sources, the registry or policy.
//! The caller passes the current time, the ephemeral secret ([`SealRandomness`]) and
//! the knock nonce in; the caller looks up the device key (by [`OpenedKnock::device`])
//! and decides what to do with a verified [`Knock`]. No function here panics on any
//! input: every read is bounds-checked and every failure is an error value.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ed25519_dalek::{Signature, Signer as _};
use ring::{aead, hkdf};
use x25519_dalek::{PublicKey as XPublicKey, StaticSecret};
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use crate::keys::{
    DeviceId, DevicePublicKey, DeviceSigningKey, GatewayKeyId, GatewayPublicKey, GatewaySecret,
};

/// Protocol version carried in byte 0.
pub const VERSION: u8 = 1;
/// Hard ceiling for any Postern datagram (any version/type): never fragments on the Internet.
pub const MAX_PACKET_LEN: usize = 1200;
/// Longest app name, in bytes.
pub const MAX_APP_LEN: usize = 64;

/// Flag bits of [`Knock::flags`].
pub mod flags {
    /// Open a pinhole/session for the app.
    pub const KNOCK: u8 = 1;
    /// Renew an existing lease.
    pub const RENEW: u8 = 2;
    /// Close the session.
    pub const CLOSE: u8 = 4;
    /// Ask for a signed reply to an admitted knock too (an allow acknowledgement with the
    /// session length, docs/protocol.md §11). A modifier: only with KNOCK, RENEW or CLOSE.
    pub const ACK: u8 = 8;
    /// The bits that ask for something (at least one must be set).
    pub const ACTIONS: u8 = KNOCK | RENEW | CLOSE;
    /// All bits defined in v1; any other bit is refused.
    pub const ALL: u8 = KNOCK | RENEW | CLOSE | ACK;
}

/// Packet type byte: client → gateway knock.
pub const TYPE_KNOCK: u8 = 1;
/// Packet type byte: gateway → client reply (see the `reply` module).
pub const TYPE_REPLY: u8 = 2;

/// Clear header length: version(1) + type(1) + gateway key id(8) + ephemeral public(32).
pub const HEADER_LEN: usize = 42;
/// Poly1305 tag length.
pub const TAG_LEN: usize = 16;
/// ed25519 signature length.
pub const SIGNATURE_LEN: usize = 64;
/// HKDF salt.
pub const HKDF_SALT: &[u8] = b"postern spa v1";
/// Domain-separation prefix of the signature message (18 bytes).
pub const SIGNATURE_CONTEXT: &[u8] = b"postern spa v1 sig";

/// Fixed part of the inner plaintext: device id 16 + timestamp 8 + nonce 16 + flags 1 +
/// app_len 1 + addr_family 1 + posture 32 + signature 64 (app and address bytes excluded).
const INNER_FIXED_LEN: usize = 16 + 8 + 16 + 1 + 1 + 1 + 32 + SIGNATURE_LEN;
/// Shortest possible inner plaintext (1-byte app, no address).
pub const MIN_INNER_LEN: usize = INNER_FIXED_LEN + 1;
/// Longest possible inner plaintext (64-byte app, IPv6 address).
pub const MAX_INNER_LEN: usize = INNER_FIXED_LEN + MAX_APP_LEN + 16;
/// Shortest valid v1 knock datagram (198 bytes).
pub const MIN_KNOCK_LEN: usize = HEADER_LEN + MIN_INNER_LEN + TAG_LEN;
/// Longest valid v1 knock datagram (277 bytes).
pub const MAX_KNOCK_LEN: usize = HEADER_LEN + MAX_INNER_LEN + TAG_LEN;

const ADDR_NONE: u8 = 0;
const ADDR_V4: u8 = 4;
const ADDR_V6: u8 = 6;

/// The inner, signed fields of a knock.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Knock {
    /// SHA-256(device ed25519 public key)[..16].
    pub device: DeviceId,
    /// Unix time in milliseconds when the client built the knock.
    pub timestamp_ms: u64,
    /// Random per-knock nonce (replay cache key together with `device`).
    pub nonce: [u8; 16],
    /// Bits from [`flags`]; at least one must be set, no other bit may be.
    pub flags: u8,
    /// App name, 1..=64 bytes of `[a-z0-9._-]`.
    pub app: AppName,
    /// Address the client believes it knocks from (for NAT); `None` = use the source address.
    pub claimed_addr: Option<IpAddr>,
    /// Posture digest; all zeros until posture exists.
    pub posture_digest: [u8; 32],
}

/// An app name as a knock carries it: 1..=64 bytes of `[a-z0-9._-]` (checked by
/// [`AppName::new`]), held inline so that opening a knock allocates nothing (issue 7).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct AppName {
    buf: [u8; MAX_APP_LEN],
    len: u8,
}

impl AppName {
    /// `name` if it is a valid app name, else why not.
    pub fn new(name: &str) -> Result<AppName, &'static str> {
        validate_app(name)?;
        let mut buf = [0u8; MAX_APP_LEN];
        buf[..name.len()].copy_from_slice(name.as_bytes());
        Ok(AppName {
            buf,
            len: name.len() as u8, // at most 64: validate_app
        })
    }

    pub fn as_str(&self) -> &str {
        // Only `new` builds one, from a valid (ASCII) name.
        std::str::from_utf8(&self.buf[..usize::from(self.len)]).unwrap_or("")
    }
}

impl std::ops::Deref for AppName {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl std::fmt::Debug for AppName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self.as_str(), f)
    }
}

impl std::fmt::Display for AppName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl PartialEq<&str> for AppName {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

/// Caller-supplied randomness for [`seal`]: the 32-byte X25519 ephemeral secret.
/// It must be fresh from a CSPRNG for every datagram (fixed only in test vectors).
/// Zeroized on drop; `Debug` is redacted.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct SealRandomness {
    /// X25519 ephemeral secret bytes.
    pub ephemeral_secret: [u8; 32],
}

impl std::fmt::Debug for SealRandomness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SealRandomness { ephemeral_secret: <redacted> }")
    }
}

/// Errors from [`seal`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    /// The app name is empty, longer than 64 bytes or has a byte outside `[a-z0-9._-]`.
    #[error("invalid app name: {0}")]
    InvalidApp(&'static str),
    /// No flag set, or a bit outside [`flags::ALL`].
    #[error("invalid flags {0:#04x}: {1}")]
    InvalidFlags(u8, &'static str),
    /// The gateway public key is a low-order point (shared secret would be all zeros).
    #[error("gateway public key is a low-order point")]
    LowOrderGatewayKey,
    /// Internal crypto failure (HKDF/AEAD length limits; unreachable with v1 sizes).
    #[error("crypto failure: {0}")]
    Crypto(&'static str),
}

/// Errors from [`precheck`], [`open`], [`OpenedKnock::verify`], [`check_freshness`] and the
/// replay cache. [`OpenError::reason`] gives a stable snake_case code for audit lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    /// Shorter than the smallest valid datagram.
    #[error("datagram too short")]
    TooShort,
    /// Longer than the largest valid datagram.
    #[error("datagram too long")]
    TooLong,
    /// Unknown protocol version byte.
    #[error("unsupported version {0}")]
    BadVersion(u8),
    /// Packet type is not a knock.
    #[error("unexpected packet type {0}")]
    BadType(u8),
    /// Gateway key id does not match this gateway.
    #[error("datagram is for another gateway key")]
    WrongGateway,
    /// The ephemeral key is a low-order point (all-zero shared secret).
    #[error("ephemeral key is a low-order point")]
    LowOrderPoint,
    /// AEAD authentication failed.
    #[error("decryption failed")]
    Decrypt,
    /// The decrypted plaintext is not a valid v1 knock.
    #[error("malformed knock: {0}")]
    Malformed(&'static str),
    /// The ed25519 signature does not verify under the device key (or the key is not the device's).
    #[error("bad signature")]
    BadSignature,
    /// Timestamp outside the allowed skew; `skew_ms` = timestamp - now (positive = in the future).
    #[error("stale knock (timestamp - now = {skew_ms} ms)")]
    Stale {
        /// timestamp - now, in milliseconds.
        skew_ms: i64,
    },
    /// Nonce already seen for this device (or too old for the replay cache to vouch for it).
    #[error("replayed knock")]
    Replay,
}

impl OpenError {
    /// Stable snake_case code for audit lines and metrics. Never changes for a variant.
    pub fn reason(&self) -> &'static str {
        match self {
            OpenError::TooShort => "too_short",
            OpenError::TooLong => "too_long",
            OpenError::BadVersion(_) => "bad_version",
            OpenError::BadType(_) => "bad_type",
            OpenError::WrongGateway => "wrong_gateway",
            OpenError::LowOrderPoint => "low_order_point",
            OpenError::Decrypt => "decrypt",
            OpenError::Malformed(_) => "malformed",
            OpenError::BadSignature => "bad_signature",
            OpenError::Stale { .. } => "stale",
            OpenError::Replay => "replay",
        }
    }
}

/// A decrypted knock whose signature has NOT been checked yet.
///
/// Look the device key up by [`OpenedKnock::device`], then call [`OpenedKnock::verify`].
/// Do not act on `knock` before `verify` succeeds.
#[derive(Debug, Clone)]
pub struct OpenedKnock {
    /// The parsed (unverified) fields.
    pub knock: Knock,
    /// SIGNATURE_CONTEXT || header || inner plaintext without the signature.
    signed: SignedMessage,
    signature: [u8; SIGNATURE_LEN],
}

impl OpenedKnock {
    /// The claimed device id (unverified until [`OpenedKnock::verify`]).
    pub fn device(&self) -> DeviceId {
        self.knock.device
    }

    /// Verify the signature with `verify_strict` under `key`, and that `key` is the key of
    /// the claimed device id. Returns the knock on success, [`OpenError::BadSignature`] otherwise.
    pub fn verify(self, key: &DevicePublicKey) -> Result<Knock, OpenError> {
        if key.device_id() != self.knock.device {
            return Err(OpenError::BadSignature);
        }
        let sig = Signature::from_bytes(&self.signature);
        key.verifying_key()
            .verify_strict(self.signed.as_slice(), &sig)
            .map_err(|_| OpenError::BadSignature)?;
        Ok(self.knock)
    }
}

fn validate_app(app: &str) -> Result<(), &'static str> {
    let b = app.as_bytes();
    if b.is_empty() {
        return Err("app name is empty");
    }
    if b.len() > MAX_APP_LEN {
        return Err("app name longer than 64 bytes");
    }
    if !b.iter().all(|&c| {
        c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'.' || c == b'_' || c == b'-'
    }) {
        return Err("app name has a byte outside [a-z0-9._-]");
    }
    Ok(())
}

fn validate_flags(f: u8) -> Result<(), &'static str> {
    if f & !flags::ALL != 0 {
        return Err("unknown flag bits");
    }
    if f & flags::ACTIONS == 0 {
        return Err("no flag set");
    }
    Ok(())
}

/// HKDF-SHA256(salt = "postern spa v1", ikm = shared, info = header || gateway public)
/// → ChaCha20-Poly1305 key.
fn derive_key(
    shared: &[u8; 32],
    header: &[u8],
    gateway_public: &[u8; 32],
) -> Option<aead::LessSafeKey> {
    let salt = hkdf::Salt::new(hkdf::HKDF_SHA256, HKDF_SALT);
    let prk = salt.extract(shared);
    let info = [header, gateway_public.as_slice()];
    let okm = prk.expand(&info, &aead::CHACHA20_POLY1305).ok()?;
    Some(aead::LessSafeKey::new(aead::UnboundKey::from(okm)))
}

fn build_header(key_id: GatewayKeyId, ephemeral_public: &[u8; 32]) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[0] = VERSION;
    h[1] = TYPE_KNOCK;
    h[2..10].copy_from_slice(&key_id.0);
    h[10..42].copy_from_slice(ephemeral_public);
    h
}

/// The longest signed message: context, header, inner plaintext without the signature.
const MAX_SIGNED_LEN: usize = SIGNATURE_CONTEXT.len() + HEADER_LEN + MAX_INNER_LEN;

/// `SIGNATURE_CONTEXT || header || inner plaintext without the signature`, held inline so
/// opening a knock allocates nothing (issue 7).
#[derive(Clone)]
struct SignedMessage {
    buf: [u8; MAX_SIGNED_LEN],
    len: usize,
}

impl SignedMessage {
    /// `None` when the parts are longer than any valid knock's (callers bound them first).
    fn new(header: &[u8], inner_unsigned: &[u8]) -> Option<SignedMessage> {
        let mut m = SignedMessage {
            buf: [0; MAX_SIGNED_LEN],
            len: 0,
        };
        for part in [SIGNATURE_CONTEXT, header, inner_unsigned] {
            let end = m.len.checked_add(part.len())?;
            m.buf.get_mut(m.len..end)?.copy_from_slice(part);
            m.len = end;
        }
        Some(m)
    }

    fn as_slice(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl std::fmt::Debug for SignedMessage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SignedMessage({} bytes)", self.len)
    }
}

/// Build, sign and encrypt one knock datagram to `gateway`.
///
/// Validates the knock first (app name, flags) so that `seal` never produces a datagram
/// the gateway would refuse as malformed.
pub fn seal(
    knock: &Knock,
    device_key: &DeviceSigningKey,
    gateway: &GatewayPublicKey,
    rnd: SealRandomness,
) -> Result<Vec<u8>, SealError> {
    validate_app(&knock.app).map_err(SealError::InvalidApp)?;
    validate_flags(knock.flags).map_err(|e| SealError::InvalidFlags(knock.flags, e))?;

    let eph = StaticSecret::from(rnd.ephemeral_secret);
    drop(rnd);
    let eph_pub = XPublicKey::from(&eph).to_bytes();
    let shared = eph.diffie_hellman(&XPublicKey::from(gateway.0));
    if !shared.was_contributory() {
        return Err(SealError::LowOrderGatewayKey);
    }
    let header = build_header(gateway.key_id(), &eph_pub);

    // Inner plaintext (without signature).
    let app = knock.app.as_bytes();
    let mut inner = Vec::with_capacity(MAX_INNER_LEN + TAG_LEN);
    inner.extend_from_slice(&knock.device.0);
    inner.extend_from_slice(&knock.timestamp_ms.to_be_bytes());
    inner.extend_from_slice(&knock.nonce);
    inner.push(knock.flags);
    // validate_app guarantees 1..=64 bytes, so the length fits in a u8.
    inner.push(
        u8::try_from(app.len())
            .map_err(|_| SealError::InvalidApp("app name longer than 64 bytes"))?,
    );
    inner.extend_from_slice(app);
    match knock.claimed_addr {
        None => inner.push(ADDR_NONE),
        Some(IpAddr::V4(a)) => {
            inner.push(ADDR_V4);
            inner.extend_from_slice(&a.octets());
        }
        Some(IpAddr::V6(a)) => {
            inner.push(ADDR_V6);
            inner.extend_from_slice(&a.octets());
        }
    }
    inner.extend_from_slice(&knock.posture_digest);

    // validate_app bounds the inner plaintext, so this cannot fail with v1 sizes.
    let msg = SignedMessage::new(&header, &inner).ok_or(SealError::Crypto(
        "signed message longer than a knock allows",
    ))?;
    let sig = device_key.signing_key().sign(msg.as_slice());
    inner.extend_from_slice(&sig.to_bytes());

    let key = derive_key(shared.as_bytes(), &header, &gateway.0)
        .ok_or(SealError::Crypto("hkdf expand"))?;
    drop(shared);
    key.seal_in_place_append_tag(
        aead::Nonce::assume_unique_for_key([0u8; 12]),
        aead::Aad::from(&header[..]),
        &mut inner,
    )
    .map_err(|_| SealError::Crypto("aead seal"))?;

    let mut out = Vec::with_capacity(HEADER_LEN + inner.len());
    out.extend_from_slice(&header);
    out.extend_from_slice(&inner);
    Ok(out)
}

/// Cheap checks only (length, version, type, key id); no crypto. Used before any key agreement.
///
/// Order: over [`MAX_PACKET_LEN`] → `TooLong`; shorter than the header → `TooShort`;
/// version → `BadVersion`; type → `BadType`; outside the v1 knock length range
/// ([`MIN_KNOCK_LEN`]..=[`MAX_KNOCK_LEN`]) → `TooShort`/`TooLong`; key id → `WrongGateway`.
pub fn precheck(datagram: &[u8], expected: GatewayKeyId) -> Result<(), OpenError> {
    if datagram.len() > MAX_PACKET_LEN {
        return Err(OpenError::TooLong);
    }
    let header = datagram.get(..HEADER_LEN).ok_or(OpenError::TooShort)?;
    if header[0] != VERSION {
        return Err(OpenError::BadVersion(header[0]));
    }
    if header[1] != TYPE_KNOCK {
        return Err(OpenError::BadType(header[1]));
    }
    if datagram.len() < MIN_KNOCK_LEN {
        return Err(OpenError::TooShort);
    }
    if datagram.len() > MAX_KNOCK_LEN {
        return Err(OpenError::TooLong);
    }
    if header[2..10] != expected.0 {
        return Err(OpenError::WrongGateway);
    }
    Ok(())
}

/// Decrypts; does NOT verify the signature (the device key comes from the registry by device id).
///
/// Runs [`precheck`] first (against `gateway`'s own key id), then X25519 (refusing an
/// all-zero shared secret), HKDF, AEAD open, and strict parsing of the plaintext.
pub fn open(datagram: &[u8], gateway: &GatewaySecret) -> Result<OpenedKnock, OpenError> {
    let gateway_public = gateway.public_key();
    precheck(datagram, gateway_public.key_id())?;
    let (header, body) = datagram
        .split_at_checked(HEADER_LEN)
        .ok_or(OpenError::TooShort)?;

    let mut eph = [0u8; 32];
    eph.copy_from_slice(header.get(10..42).ok_or(OpenError::TooShort)?);
    let shared = gateway
        .static_secret()
        .diffie_hellman(&XPublicKey::from(eph));
    if !shared.was_contributory() {
        return Err(OpenError::LowOrderPoint);
    }
    let key = derive_key(shared.as_bytes(), header, &gateway_public.0).ok_or(OpenError::Decrypt)?;
    drop(shared);

    // precheck bounds the datagram, so the body fits (no allocation per knock).
    let mut buf = Zeroizing::new([0u8; MAX_INNER_LEN + TAG_LEN]);
    let in_out = buf.get_mut(..body.len()).ok_or(OpenError::TooLong)?;
    in_out.copy_from_slice(body);
    let plain = key
        .open_in_place(
            aead::Nonce::assume_unique_for_key([0u8; 12]),
            aead::Aad::from(header),
            in_out,
        )
        .map_err(|_| OpenError::Decrypt)?;
    parse_inner(header, plain)
}

/// Bounds-checked reader over the plaintext.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], OpenError> {
        let end = self.pos.checked_add(n).ok_or(OpenError::Malformed(what))?;
        let s = self
            .buf
            .get(self.pos..end)
            .ok_or(OpenError::Malformed(what))?;
        self.pos = end;
        Ok(s)
    }
    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], OpenError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N, what)?);
        Ok(a)
    }
    fn u8(&mut self, what: &'static str) -> Result<u8, OpenError> {
        Ok(self.array::<1>(what)?[0])
    }
}

fn parse_inner(header: &[u8], plain: &[u8]) -> Result<OpenedKnock, OpenError> {
    let mut r = Reader { buf: plain, pos: 0 };
    let device = DeviceId(r.array::<16>("truncated device id")?);
    let timestamp_ms = u64::from_be_bytes(r.array::<8>("truncated timestamp")?);
    let nonce = r.array::<16>("truncated nonce")?;
    let flags = r.u8("truncated flags")?;
    validate_flags(flags).map_err(OpenError::Malformed)?;
    let app_len = r.u8("truncated app length")?;
    let app_bytes = r.take(usize::from(app_len), "truncated app name")?;
    let app = std::str::from_utf8(app_bytes)
        .map_err(|_| OpenError::Malformed("app name is not UTF-8"))?;
    let claimed_addr = match r.u8("truncated address family")? {
        ADDR_NONE => None,
        ADDR_V4 => Some(IpAddr::V4(Ipv4Addr::from(
            r.array::<4>("truncated IPv4 address")?,
        ))),
        ADDR_V6 => Some(IpAddr::V6(Ipv6Addr::from(
            r.array::<16>("truncated IPv6 address")?,
        ))),
        _ => return Err(OpenError::Malformed("unknown address family")),
    };
    let posture_digest = r.array::<32>("truncated posture digest")?;
    let unsigned_len = r.pos;
    let signature = r.array::<SIGNATURE_LEN>("truncated signature")?;
    if r.pos != plain.len() {
        return Err(OpenError::Malformed("trailing bytes after signature"));
    }
    let unsigned = plain
        .get(..unsigned_len)
        .ok_or(OpenError::Malformed("truncated"))?;
    Ok(OpenedKnock {
        knock: Knock {
            device,
            timestamp_ms,
            nonce,
            flags,
            app: AppName::new(app).map_err(OpenError::Malformed)?,
            claimed_addr,
            posture_digest,
        },
        signed: SignedMessage::new(header, unsigned).ok_or(OpenError::TooLong)?,
        signature,
    })
}

/// `Ok` iff |now_ms - timestamp_ms| <= max_skew_ms; otherwise `Stale { skew_ms: timestamp - now }`.
pub fn check_freshness(timestamp_ms: u64, now_ms: u64, max_skew_ms: u64) -> Result<(), OpenError> {
    if timestamp_ms.abs_diff(now_ms) <= max_skew_ms {
        return Ok(());
    }
    let skew = i128::from(timestamp_ms) - i128::from(now_ms);
    let skew_ms = i64::try_from(skew).unwrap_or(if skew < 0 { i64::MIN } else { i64::MAX });
    Err(OpenError::Stale { skew_ms })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn knock(dev: &DeviceSigningKey) -> Knock {
        Knock {
            device: dev.public_key().device_id(),
            timestamp_ms: 1_700_000_000_000,
            nonce: [5u8; 16],
            flags: flags::KNOCK,
            app: AppName::new("ssh").expect("valid app name"),
            claimed_addr: Some(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7))),
            posture_digest: [0u8; 32],
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(MIN_KNOCK_LEN, 198);
        assert_eq!(MAX_KNOCK_LEN, 277);
        const { assert!(MAX_KNOCK_LEN <= MAX_PACKET_LEN) };
        assert_eq!(SIGNATURE_CONTEXT.len(), 18);
    }

    #[test]
    fn round_trip() {
        let dev = DeviceSigningKey::from_seed([1u8; 32]);
        let gw = GatewaySecret::from_bytes([2u8; 32]);
        let k = knock(&dev);
        let d = seal(
            &k,
            &dev,
            &gw.public_key(),
            SealRandomness {
                ephemeral_secret: [3u8; 32],
            },
        )
        .expect("seal");
        assert_eq!(d.len(), 42 + 16 + 8 + 16 + 1 + 1 + 3 + 1 + 4 + 32 + 64 + 16);
        precheck(&d, gw.public_key().key_id()).expect("precheck");
        let o = open(&d, &gw).expect("open");
        assert_eq!(o.device(), k.device);
        assert_eq!(o.verify(&dev.public_key()).expect("verify"), k);
    }

    #[test]
    fn seal_refuses_bad_knocks() {
        let dev = DeviceSigningKey::from_seed([1u8; 32]);
        let gw = GatewaySecret::from_bytes([2u8; 32]).public_key();
        let r = || SealRandomness {
            ephemeral_secret: [3u8; 32],
        };
        let mut k = knock(&dev);
        // An invalid name cannot be put in a knock at all.
        for bad in ["SSH", "", &"a".repeat(65), "s h", "é"] {
            assert!(AppName::new(bad).is_err(), "{bad:?} accepted");
        }
        k.app = AppName::new(&"a".repeat(64)).expect("64 bytes is the limit");
        assert!(seal(&k, &dev, &gw, r()).is_ok());
        k.flags = 16;
        assert!(matches!(
            seal(&k, &dev, &gw, r()),
            Err(SealError::InvalidFlags(16, _))
        ));
        k.flags = flags::ACK;
        assert!(matches!(
            seal(&k, &dev, &gw, r()),
            Err(SealError::InvalidFlags(flags::ACK, _))
        ));
        k.flags = 0;
        assert!(matches!(
            seal(&k, &dev, &gw, r()),
            Err(SealError::InvalidFlags(0, _))
        ));
        k.flags = flags::ALL;
        // low-order gateway public key (zero point)
        assert_eq!(
            seal(&k, &dev, &GatewayPublicKey([0u8; 32]), r()),
            Err(SealError::LowOrderGatewayKey)
        );
    }

    #[test]
    fn reasons_are_stable() {
        let all = [
            (OpenError::TooShort, "too_short"),
            (OpenError::TooLong, "too_long"),
            (OpenError::BadVersion(2), "bad_version"),
            (OpenError::BadType(9), "bad_type"),
            (OpenError::WrongGateway, "wrong_gateway"),
            (OpenError::LowOrderPoint, "low_order_point"),
            (OpenError::Decrypt, "decrypt"),
            (OpenError::Malformed("x"), "malformed"),
            (OpenError::BadSignature, "bad_signature"),
            (OpenError::Stale { skew_ms: 1 }, "stale"),
            (OpenError::Replay, "replay"),
        ];
        for (e, code) in all {
            assert_eq!(e.reason(), code);
        }
    }
}
