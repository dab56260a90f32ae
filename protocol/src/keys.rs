//! Key types of the Postern SPA protocol and their text encodings.
//!
//! Owns: device identity keys (ed25519, [`DeviceSigningKey`] / [`DevicePublicKey`]),
//! the gateway's static key agreement key (X25519, [`GatewaySecret`] / [`GatewayPublicKey`]),
//! the identifiers derived from public keys ([`DeviceId`], [`GatewayKeyId`]) and the
//! text forms used in key files, the CLI and the registry snapshot.
//!
//! Must not touch: files, the clock or any randomness source. Callers generate the
//! 32 secret bytes (OS RNG in the binaries, fixed bytes in tests) and write/read the
//! text themselves. Secrets live only inside zeroize-on-drop types and their text form
//! is returned as `Zeroizing<String>`; `Debug` never prints secret material.
//!
//! Text encodings (all base64 is the RFC 4648 standard alphabet with `=` padding):
//! - device secret:  `postern-device-secret:v1:<base64 32-byte ed25519 seed>\n`
//! - device public:  `ed25519:<base64 32-byte ed25519 public key>`
//! - gateway secret: `postern-gateway-secret:v1:<base64 32-byte x25519 secret>\n`
//! - gateway public: `x25519:<base64 32-byte x25519 public key>`
//! - device id:      32 lowercase hex digits (16 bytes)
//!
//! Parsers trim surrounding ASCII whitespace (so a key file's trailing newline is fine)
//! and are otherwise strict: exact prefix, canonical base64, exact length.

use std::fmt;
use std::str::FromStr;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use ed25519_dalek::{SigningKey, VerifyingKey};
use ring::digest;
use x25519_dalek::{PublicKey as XPublicKey, StaticSecret};
use zeroize::Zeroizing;

/// Text prefix of a device secret key file.
pub const DEVICE_SECRET_PREFIX: &str = "postern-device-secret:v1:";
/// Text prefix of a device public key.
pub const DEVICE_PUBLIC_PREFIX: &str = "ed25519:";
/// Text prefix of a gateway secret key file.
pub const GATEWAY_SECRET_PREFIX: &str = "postern-gateway-secret:v1:";
/// Text prefix of a gateway public key.
pub const GATEWAY_PUBLIC_PREFIX: &str = "x25519:";

/// Errors from parsing key text or key bytes. Each variant names what was wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// The text does not start with the expected prefix.
    #[error("{what}: expected text starting with {expected:?}")]
    MissingPrefix {
        /// Which kind of key was being parsed.
        what: &'static str,
        /// The prefix that was expected.
        expected: &'static str,
    },
    /// The part after the prefix is not valid standard base64.
    #[error("{what}: invalid base64 after the prefix")]
    BadBase64 {
        /// Which kind of key was being parsed.
        what: &'static str,
    },
    /// The text is not valid hex.
    #[error("{what}: invalid hex (expected {expected} hex digits)")]
    BadHex {
        /// Which kind of value was being parsed.
        what: &'static str,
        /// Expected number of hex digits.
        expected: usize,
    },
    /// The decoded value has the wrong number of bytes.
    #[error("{what}: expected {expected} bytes, got {got}")]
    WrongLength {
        /// Which kind of key was being parsed.
        what: &'static str,
        /// Expected length in bytes.
        expected: usize,
        /// Actual decoded length in bytes.
        got: usize,
    },
    /// The 32 bytes are not a valid ed25519 public key (not a curve point).
    #[error("device public key: not a valid ed25519 point")]
    InvalidPoint,
    /// The ed25519 public key is of small order (a "weak" key anyone could sign for).
    #[error("device public key: weak (small-order) ed25519 key refused")]
    WeakKey,
}

fn sha256(data: &[u8]) -> [u8; 32] {
    let d = digest::digest(&digest::SHA256, data);
    let mut out = [0u8; 32];
    // SHA-256 output is always 32 bytes, so the lengths match.
    out.copy_from_slice(d.as_ref());
    out
}

/// Parse `prefix + base64(32 bytes)` (surrounding whitespace trimmed) into a zeroizing buffer.
fn decode_prefixed_32(
    s: &str,
    prefix: &'static str,
    what: &'static str,
) -> Result<Zeroizing<[u8; 32]>, KeyError> {
    let body = s
        .trim()
        .strip_prefix(prefix)
        .ok_or(KeyError::MissingPrefix {
            what,
            expected: prefix,
        })?;
    let decoded = Zeroizing::new(
        B64.decode(body.as_bytes())
            .map_err(|_| KeyError::BadBase64 { what })?,
    );
    if decoded.len() != 32 {
        return Err(KeyError::WrongLength {
            what,
            expected: 32,
            got: decoded.len(),
        });
    }
    let mut out = Zeroizing::new([0u8; 32]);
    out.copy_from_slice(&decoded);
    Ok(out)
}

/// Device identifier: the first 16 bytes of SHA-256 of the device's ed25519 public key.
///
/// `Display` / `FromStr`: 32 hex digits (printed lowercase; parsing accepts either case).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeviceId(pub [u8; 16]);

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DeviceId({self})")
    }
}

impl FromStr for DeviceId {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self, KeyError> {
        let s = s.trim();
        const WHAT: &str = "device id";
        if s.len() != 32 {
            return Err(KeyError::BadHex {
                what: WHAT,
                expected: 32,
            });
        }
        let mut out = [0u8; 16];
        hex::decode_to_slice(s, &mut out).map_err(|_| KeyError::BadHex {
            what: WHAT,
            expected: 32,
        })?;
        Ok(DeviceId(out))
    }
}

/// A device's ed25519 signing key (secret). Zeroized on drop; `Debug` is redacted.
#[derive(Clone)]
pub struct DeviceSigningKey(SigningKey);

impl fmt::Debug for DeviceSigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "DeviceSigningKey {{ public: {}, secret: <redacted> }}",
            self.public_key().to_text()
        )
    }
}

impl DeviceSigningKey {
    /// Build the key from a 32-byte ed25519 seed (RFC 8032 private key).
    pub fn from_seed(seed: [u8; 32]) -> Self {
        let seed = Zeroizing::new(seed);
        DeviceSigningKey(SigningKey::from_bytes(&seed))
    }

    /// The matching public key.
    pub fn public_key(&self) -> DevicePublicKey {
        DevicePublicKey(self.0.verifying_key())
    }

    /// `postern-device-secret:v1:` + base64(seed) + `"\n"`.
    pub fn to_text(&self) -> Zeroizing<String> {
        let seed = Zeroizing::new(self.0.to_bytes());
        let mut s = Zeroizing::new(String::with_capacity(80));
        s.push_str(DEVICE_SECRET_PREFIX);
        B64.encode_string(seed.as_slice(), &mut s);
        s.push('\n');
        s
    }

    /// Parse the text written by [`DeviceSigningKey::to_text`].
    pub fn from_text(s: &str) -> Result<Self, KeyError> {
        let seed = decode_prefixed_32(s, DEVICE_SECRET_PREFIX, "device secret key")?;
        Ok(DeviceSigningKey(SigningKey::from_bytes(&seed)))
    }

    pub(crate) fn signing_key(&self) -> &SigningKey {
        &self.0
    }
}

/// A device's ed25519 public key (always a valid, non-weak curve point).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct DevicePublicKey(VerifyingKey);

impl fmt::Debug for DevicePublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DevicePublicKey({})", self.to_text())
    }
}

impl DevicePublicKey {
    /// Build from the 32 raw bytes; refuses non-points and small-order (weak) keys.
    pub fn from_bytes(bytes: &[u8; 32]) -> Result<Self, KeyError> {
        let vk = VerifyingKey::from_bytes(bytes).map_err(|_| KeyError::InvalidPoint)?;
        if vk.is_weak() {
            return Err(KeyError::WeakKey);
        }
        Ok(DevicePublicKey(vk))
    }

    /// SHA-256(public key bytes)[..16].
    pub fn device_id(&self) -> DeviceId {
        let h = sha256(self.0.as_bytes());
        let mut id = [0u8; 16];
        id.copy_from_slice(&h[..16]);
        DeviceId(id)
    }

    /// `ed25519:` + base64(public key).
    pub fn to_text(&self) -> String {
        let mut s = String::from(DEVICE_PUBLIC_PREFIX);
        B64.encode_string(self.0.as_bytes(), &mut s);
        s
    }

    /// Parse `ed25519:<base64>`; refuses non-points and weak keys.
    pub fn from_text(s: &str) -> Result<Self, KeyError> {
        Self::from_bytes(&Self::text_bytes(s)?)
    }

    /// The 32 bytes of `ed25519:<base64>`, not yet checked to be a usable point (cheap:
    /// no curve arithmetic). Lets a caller that already holds a parsed key for the same
    /// bytes reuse it instead of decompressing the point again (about 4 µs per key).
    pub fn text_bytes(s: &str) -> Result<[u8; 32], KeyError> {
        decode_prefixed_32(s, DEVICE_PUBLIC_PREFIX, "device public key").map(|b| *b)
    }

    /// The 32 raw bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        self.0.as_bytes()
    }

    pub(crate) fn verifying_key(&self) -> &VerifyingKey {
        &self.0
    }
}

impl FromStr for DevicePublicKey {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self, KeyError> {
        Self::from_text(s)
    }
}

impl fmt::Display for DevicePublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_text())
    }
}

/// The gateway's static X25519 secret. Zeroized on drop; `Debug` is redacted.
///
/// The public key and key id are computed once at construction (a scalar
/// multiplication) so that `open` does not pay for them per packet.
#[derive(Clone)]
pub struct GatewaySecret {
    secret: StaticSecret,
    public: GatewayPublicKey,
}

impl fmt::Debug for GatewaySecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "GatewaySecret {{ public: {}, secret: <redacted> }}",
            self.public.to_text()
        )
    }
}

impl GatewaySecret {
    /// Build from 32 secret bytes (clamping happens inside X25519, as per RFC 7748).
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        let bytes = Zeroizing::new(bytes);
        let secret = StaticSecret::from(*bytes);
        let public = GatewayPublicKey(XPublicKey::from(&secret).to_bytes());
        GatewaySecret { secret, public }
    }

    /// The matching public key.
    pub fn public_key(&self) -> GatewayPublicKey {
        self.public
    }

    /// `postern-gateway-secret:v1:` + base64(secret) + `"\n"`.
    pub fn to_text(&self) -> Zeroizing<String> {
        let bytes = Zeroizing::new(self.secret.to_bytes());
        let mut s = Zeroizing::new(String::with_capacity(80));
        s.push_str(GATEWAY_SECRET_PREFIX);
        B64.encode_string(bytes.as_slice(), &mut s);
        s.push('\n');
        s
    }

    /// Parse the text written by [`GatewaySecret::to_text`].
    pub fn from_text(s: &str) -> Result<Self, KeyError> {
        let bytes = decode_prefixed_32(s, GATEWAY_SECRET_PREFIX, "gateway secret key")?;
        Ok(Self::from_bytes(*bytes))
    }

    pub(crate) fn static_secret(&self) -> &StaticSecret {
        &self.secret
    }
}

/// The gateway's static X25519 public key (any 32 bytes; low-order keys are refused at seal time).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct GatewayPublicKey(pub [u8; 32]);

impl fmt::Debug for GatewayPublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "GatewayPublicKey({})", self.to_text())
    }
}

impl GatewayPublicKey {
    /// SHA-256(public key bytes)[..8].
    pub fn key_id(&self) -> GatewayKeyId {
        let h = sha256(&self.0);
        let mut id = [0u8; 8];
        id.copy_from_slice(&h[..8]);
        GatewayKeyId(id)
    }

    /// `x25519:` + base64(public key).
    pub fn to_text(&self) -> String {
        let mut s = String::from(GATEWAY_PUBLIC_PREFIX);
        B64.encode_string(self.0, &mut s);
        s
    }

    /// Parse `x25519:<base64>`.
    pub fn from_text(s: &str) -> Result<Self, KeyError> {
        let bytes = decode_prefixed_32(s, GATEWAY_PUBLIC_PREFIX, "gateway public key")?;
        Ok(GatewayPublicKey(*bytes))
    }
}

impl FromStr for GatewayPublicKey {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self, KeyError> {
        Self::from_text(s)
    }
}

impl fmt::Display for GatewayPublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_text())
    }
}

/// Gateway key identifier: SHA-256(gateway X25519 public key)[..8]. Displayed as 16 hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GatewayKeyId(pub [u8; 8]);

impl fmt::Display for GatewayKeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for GatewayKeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "GatewayKeyId({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_secret_text_round_trip() {
        let k = DeviceSigningKey::from_seed([7u8; 32]);
        let t = k.to_text();
        assert!(t.starts_with(DEVICE_SECRET_PREFIX));
        assert!(t.ends_with('\n'));
        let k2 = DeviceSigningKey::from_text(&t).expect("round trip");
        assert_eq!(k.public_key(), k2.public_key());
        // without the trailing newline too
        let k3 = DeviceSigningKey::from_text(t.trim_end()).expect("no newline");
        assert_eq!(k.public_key(), k3.public_key());
    }

    #[test]
    fn device_public_text_round_trip() {
        let p = DeviceSigningKey::from_seed([9u8; 32]).public_key();
        let t = p.to_text();
        assert!(t.starts_with("ed25519:"));
        assert_eq!(DevicePublicKey::from_text(&t), Ok(p));
        assert_eq!(t.parse::<DevicePublicKey>(), Ok(p));
    }

    #[test]
    fn gateway_text_round_trips() {
        let s = GatewaySecret::from_bytes([3u8; 32]);
        let t = s.to_text();
        assert!(t.starts_with(GATEWAY_SECRET_PREFIX));
        let s2 = GatewaySecret::from_text(&t).expect("round trip");
        assert_eq!(s.public_key(), s2.public_key());
        let p = s.public_key();
        assert_eq!(GatewayPublicKey::from_text(&p.to_text()), Ok(p));
    }

    #[test]
    fn device_id_text_round_trip() {
        let id = DeviceSigningKey::from_seed([1u8; 32])
            .public_key()
            .device_id();
        let t = id.to_string();
        assert_eq!(t.len(), 32);
        assert!(t
            .chars()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
        assert_eq!(t.parse::<DeviceId>(), Ok(id));
        assert_eq!(t.to_uppercase().parse::<DeviceId>(), Ok(id));
    }

    #[test]
    fn bad_text_errors_name_the_problem() {
        let e = DevicePublicKey::from_text("x25519:AAAA").expect_err("wrong prefix");
        assert!(matches!(
            e,
            KeyError::MissingPrefix {
                expected: "ed25519:",
                ..
            }
        ));
        assert!(e.to_string().contains("device public key"));

        let e = DevicePublicKey::from_text("ed25519:!!!!").expect_err("bad base64");
        assert_eq!(
            e,
            KeyError::BadBase64 {
                what: "device public key"
            }
        );

        let e = DevicePublicKey::from_text("ed25519:AAAA").expect_err("short");
        assert_eq!(
            e,
            KeyError::WrongLength {
                what: "device public key",
                expected: 32,
                got: 3
            }
        );
        assert!(e.to_string().contains("expected 32 bytes, got 3"));

        // identity point: valid encoding but small order
        let mut ident = [0u8; 32];
        ident[0] = 1;
        let t = format!("ed25519:{}", B64.encode(ident));
        assert_eq!(DevicePublicKey::from_text(&t), Err(KeyError::WeakKey));

        // y = 2 is not on the curve
        let mut bad = [0u8; 32];
        bad[0] = 2;
        let t = format!("ed25519:{}", B64.encode(bad));
        assert_eq!(DevicePublicKey::from_text(&t), Err(KeyError::InvalidPoint));

        let e = GatewaySecret::from_text("postern-device-secret:v1:AAAA").expect_err("prefix");
        assert!(matches!(
            e,
            KeyError::MissingPrefix {
                what: "gateway secret key",
                ..
            }
        ));

        let e = DeviceSigningKey::from_text(&format!(
            "{DEVICE_SECRET_PREFIX}{}",
            B64.encode([0u8; 31])
        ))
        .expect_err("31 bytes");
        assert!(matches!(e, KeyError::WrongLength { got: 31, .. }));

        let e = GatewayPublicKey::from_text("x25519:").expect_err("empty");
        assert!(matches!(e, KeyError::WrongLength { got: 0, .. }));

        assert!(matches!(
            "zz".repeat(16).parse::<DeviceId>(),
            Err(KeyError::BadHex { .. })
        ));
        assert!(matches!(
            "ab".parse::<DeviceId>(),
            Err(KeyError::BadHex { .. })
        ));
    }

    #[test]
    fn debug_is_redacted() {
        let k = DeviceSigningKey::from_seed([0x42u8; 32]);
        let d = format!("{k:?}");
        assert!(d.contains("redacted"));
        assert!(!d.contains(&B64.encode([0x42u8; 32])));
        let g = GatewaySecret::from_bytes([0x42u8; 32]);
        let d = format!("{g:?}");
        assert!(d.contains("redacted"));
        assert!(!d.contains(&B64.encode([0x42u8; 32])));
    }

    #[test]
    fn rfc8032_test1_public_key() {
        // RFC 8032 section 7.1, TEST 1.
        let seed: [u8; 32] =
            hex_32("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60");
        let pk = DeviceSigningKey::from_seed(seed).public_key();
        assert_eq!(
            hex::encode(pk.as_bytes()),
            "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a"
        );
    }

    #[test]
    fn rfc7748_public_key() {
        // RFC 7748 section 6.1, Alice.
        let sk = hex_32("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a");
        let pk = GatewaySecret::from_bytes(sk).public_key();
        assert_eq!(
            hex::encode(pk.0),
            "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a"
        );
    }

    fn hex_32(s: &str) -> [u8; 32] {
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).expect("test constant is 64 hex digits");
        out
    }
}
