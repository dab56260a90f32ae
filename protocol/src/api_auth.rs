//! Authentication of controller client-API requests, and the enrollment invite token.
//!
//! Owns (sans-IO: no sockets, files, clock or randomness; callers pass time and nonces in):
//! - the canonical string a device signs for each API request and its header encoding;
//! - verification of a signed request (clock skew, signature by the device's key);
//! - [`NonceCache`], the bounded replay cache of request nonces;
//! - the enrollment proof message and the invite token text form.
//!
//! Must not touch: HTTP types, the registry or TLS. The controller (`api.rs`) and the
//! client (`postern_client::api_client`) map headers in and out.
//!
//! ## Request signature (`postern-api-v1`)
//! Headers: `x-postern-device` (32 hex device id), `x-postern-timestamp` (unix seconds,
//! decimal), `x-postern-nonce` (32 lowercase hex = 16 random bytes), `x-postern-signature`
//! (128 lowercase hex = ed25519 signature) over the UTF-8 bytes of
//! `"postern-api-v1\n" METHOD "\n" PATH "\n" TIMESTAMP "\n" NONCE "\n" hex(sha256(body))`.
//! The server accepts a request when the device is registered and not revoked, the
//! timestamp is within [`MAX_SKEW_SECS`] of its clock, the signature verifies
//! (strict ed25519) and the (device, nonce) pair was not seen before within the window.
//!
//! ## Invite token (`postern-invite:v1`)
//! `postern-invite:v1:<base64url, no padding, 32-byte secret>:<64 lowercase hex SHA-256 of the
//! controller API certificate (DER)>`. The controller stores only hex(SHA-256(secret)); the
//! client pins the certificate fingerprint for every later connection.
//!
//! ## Enrollment proof
//! ed25519 signature (128 hex) by the new device key over
//! `"postern-enroll-v1\n" TOKEN "\n" PUBLIC_KEY_TEXT`, where TOKEN is the whole token text
//! and PUBLIC_KEY_TEXT is `ed25519:<base64>`: nobody can register a key without its
//! private half, and the proof is bound to one token.

use std::collections::HashMap;
use std::fmt;

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use base64::Engine as _;
use ed25519_dalek::{Signature, Signer as _};
use ring::digest;
use zeroize::Zeroizing;

use crate::keys::{DeviceId, DevicePublicKey, DeviceSigningKey};

/// Domain separator of request signatures.
pub const REQUEST_DOMAIN: &str = "postern-api-v1";
/// Domain separator of enrollment proofs.
pub const ENROLL_DOMAIN: &str = "postern-enroll-v1";
/// Header carrying the device id.
pub const HEADER_DEVICE: &str = "x-postern-device";
/// Header carrying the unix timestamp (seconds).
pub const HEADER_TIMESTAMP: &str = "x-postern-timestamp";
/// Header carrying the request nonce (32 hex).
pub const HEADER_NONCE: &str = "x-postern-nonce";
/// Header carrying the signature (128 hex).
pub const HEADER_SIGNATURE: &str = "x-postern-signature";
/// Largest accepted difference between the request timestamp and the server clock.
pub const MAX_SKEW_SECS: u64 = 60;
/// Text prefix of an invite token.
pub const INVITE_PREFIX: &str = "postern-invite:v1:";
/// Text prefix of a gateway enrollment token (`postern-controller gateway add`); same
/// `<secret>:<certificate sha256>` body as an invite (docs/control-channel.md).
pub const GATEWAY_TOKEN_PREFIX: &str = "postern-gateway:v1:";

/// Why a request's authentication headers or an invite token were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiAuthError {
    #[error("missing header {0}")]
    MissingHeader(&'static str),
    #[error("header {0} is malformed")]
    BadHeader(&'static str),
    #[error("request timestamp is {skew} s away from the controller clock (limit {MAX_SKEW_SECS} s): check the device clock")]
    Stale { skew: u64 },
    #[error("request signature does not verify with the device's registered key")]
    BadSignature,
    #[error("request nonce was already used (replayed request refused)")]
    Replayed,
    #[error("too many recent requests to track replays; retry in a minute")]
    CacheFull,
    #[error("invite token is malformed: expected postern-invite:v1:<secret>:<certificate sha256> as printed by `postern-controller device invite`")]
    BadInvite,
}

/// The four authentication header values of one signed request.
#[derive(Clone, PartialEq, Eq)]
pub struct SignedHeaders {
    pub device: DeviceId,
    pub timestamp: u64,
    pub nonce: [u8; 16],
    pub signature: [u8; 64],
}

impl fmt::Debug for SignedHeaders {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "SignedHeaders {{ device: {}, timestamp: {}, nonce: {} }}",
            self.device,
            self.timestamp,
            hex::encode(self.nonce)
        )
    }
}

fn sha256(data: &[u8]) -> [u8; 32] {
    let d = digest::digest(&digest::SHA256, data);
    let mut out = [0u8; 32];
    // SHA-256 output is always 32 bytes.
    out.copy_from_slice(d.as_ref());
    out
}

/// Lowercase hex of SHA-256 of `data` (certificate fingerprints, stored token hashes).
pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(sha256(data))
}

/// The exact bytes a device signs for one request.
pub fn canonical_request(
    method: &str,
    path: &str,
    timestamp: u64,
    nonce: &[u8; 16],
    body: &[u8],
) -> String {
    format!(
        "{REQUEST_DOMAIN}\n{method}\n{path}\n{timestamp}\n{}\n{}",
        hex::encode(nonce),
        sha256_hex(body)
    )
}

/// Signs one request (the caller supplies the clock reading and 16 random bytes).
pub fn sign_request(
    key: &DeviceSigningKey,
    method: &str,
    path: &str,
    body: &[u8],
    timestamp: u64,
    nonce: [u8; 16],
) -> SignedHeaders {
    let msg = canonical_request(method, path, timestamp, &nonce, body);
    SignedHeaders {
        device: key.public_key().device_id(),
        timestamp,
        nonce,
        signature: key.signing_key().sign(msg.as_bytes()).to_bytes(),
    }
}

fn decode_hex<const N: usize>(s: &str, name: &'static str) -> Result<[u8; N], ApiAuthError> {
    // Lowercase only: one canonical spelling per value.
    if s.len() != 2 * N || s.bytes().any(|b| b.is_ascii_uppercase()) {
        return Err(ApiAuthError::BadHeader(name));
    }
    let mut out = [0u8; N];
    hex::decode_to_slice(s, &mut out).map_err(|_| ApiAuthError::BadHeader(name))?;
    Ok(out)
}

impl SignedHeaders {
    /// Parses the header values (each `None` when the header is absent). Strict: exact
    /// lengths, lowercase hex, a decimal timestamp without sign or leading zeros.
    pub fn parse(
        device: Option<&str>,
        timestamp: Option<&str>,
        nonce: Option<&str>,
        signature: Option<&str>,
    ) -> Result<Self, ApiAuthError> {
        let device = device.ok_or(ApiAuthError::MissingHeader(HEADER_DEVICE))?;
        let timestamp = timestamp.ok_or(ApiAuthError::MissingHeader(HEADER_TIMESTAMP))?;
        let nonce = nonce.ok_or(ApiAuthError::MissingHeader(HEADER_NONCE))?;
        let signature = signature.ok_or(ApiAuthError::MissingHeader(HEADER_SIGNATURE))?;
        let device = DeviceId(decode_hex::<16>(device, HEADER_DEVICE)?);
        let canonical_ts = !timestamp.is_empty()
            && timestamp.len() <= 20
            && timestamp.bytes().all(|b| b.is_ascii_digit())
            && (timestamp == "0" || !timestamp.starts_with('0'));
        if !canonical_ts {
            return Err(ApiAuthError::BadHeader(HEADER_TIMESTAMP));
        }
        let timestamp = timestamp
            .parse::<u64>()
            .map_err(|_| ApiAuthError::BadHeader(HEADER_TIMESTAMP))?;
        Ok(SignedHeaders {
            device,
            timestamp,
            nonce: decode_hex::<16>(nonce, HEADER_NONCE)?,
            signature: decode_hex::<64>(signature, HEADER_SIGNATURE)?,
        })
    }

    /// `(name, value)` pairs to send.
    pub fn to_headers(&self) -> [(&'static str, String); 4] {
        [
            (HEADER_DEVICE, self.device.to_string()),
            (HEADER_TIMESTAMP, self.timestamp.to_string()),
            (HEADER_NONCE, hex::encode(self.nonce)),
            (HEADER_SIGNATURE, hex::encode(self.signature)),
        ]
    }

    /// Checks skew and signature against the device's registered key (not the nonce:
    /// see [`NonceCache`], consulted only after this succeeds).
    pub fn verify(
        &self,
        key: &DevicePublicKey,
        method: &str,
        path: &str,
        body: &[u8],
        now: u64,
    ) -> Result<(), ApiAuthError> {
        let skew = now.abs_diff(self.timestamp);
        if skew > MAX_SKEW_SECS {
            return Err(ApiAuthError::Stale { skew });
        }
        if key.device_id() != self.device {
            return Err(ApiAuthError::BadSignature);
        }
        let msg = canonical_request(method, path, self.timestamp, &self.nonce, body);
        key.verifying_key()
            .verify_strict(msg.as_bytes(), &Signature::from_bytes(&self.signature))
            .map_err(|_| ApiAuthError::BadSignature)
    }
}

/// Remembers (device, nonce) pairs of accepted requests for the skew window, bounded in
/// size. A full cache refuses new requests (fails closed) instead of forgetting early.
#[derive(Debug)]
pub struct NonceCache {
    seen: HashMap<(DeviceId, [u8; 16]), u64>,
    capacity: usize,
}

impl NonceCache {
    /// A cache holding at most `capacity` nonces.
    pub fn new(capacity: usize) -> Self {
        NonceCache {
            seen: HashMap::new(),
            capacity,
        }
    }

    /// Records the nonce of a verified request; refuses a replay within the window.
    pub fn check_and_insert(
        &mut self,
        device: DeviceId,
        nonce: [u8; 16],
        timestamp: u64,
        now: u64,
    ) -> Result<(), ApiAuthError> {
        if self.seen.contains_key(&(device, nonce)) {
            return Err(ApiAuthError::Replayed);
        }
        if self.seen.len() >= self.capacity {
            // A nonce older than twice the window can never be accepted again: forget it.
            let horizon = now.saturating_sub(2 * MAX_SKEW_SECS);
            self.seen.retain(|_, ts| *ts >= horizon);
            if self.seen.len() >= self.capacity {
                return Err(ApiAuthError::CacheFull);
            }
        }
        self.seen.insert((device, nonce), timestamp);
        Ok(())
    }

    /// Number of remembered nonces.
    pub fn len(&self) -> usize {
        self.seen.len()
    }

    /// True when nothing is remembered.
    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }
}

/// A parsed invite token. The secret is zeroized on drop; `Debug` does not print it.
#[derive(Clone, PartialEq, Eq)]
pub struct InviteToken {
    secret: Zeroizing<[u8; 32]>,
    cert_sha256: [u8; 32],
}

impl fmt::Debug for InviteToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "InviteToken {{ secret: <redacted>, cert_sha256: {} }}",
            hex::encode(self.cert_sha256)
        )
    }
}

impl InviteToken {
    /// A token from a fresh random secret and the controller's certificate fingerprint.
    pub fn new(secret: [u8; 32], cert_sha256: [u8; 32]) -> Self {
        InviteToken {
            secret: Zeroizing::new(secret),
            cert_sha256,
        }
    }

    /// Parses `postern-invite:v1:<base64url secret>:<hex sha256>` (whitespace trimmed).
    pub fn parse(text: &str) -> Result<Self, ApiAuthError> {
        Self::parse_with_prefix(text, INVITE_PREFIX)
    }

    /// Parses `<prefix><base64url secret>:<hex sha256>` (whitespace trimmed): the same
    /// token body under another prefix, e.g. [`GATEWAY_TOKEN_PREFIX`].
    pub fn parse_with_prefix(text: &str, prefix: &str) -> Result<Self, ApiAuthError> {
        let body = text
            .trim()
            .strip_prefix(prefix)
            .ok_or(ApiAuthError::BadInvite)?;
        let (secret_b64, cert_hex) = body.split_once(':').ok_or(ApiAuthError::BadInvite)?;
        let decoded = Zeroizing::new(
            B64URL
                .decode(secret_b64.as_bytes())
                .map_err(|_| ApiAuthError::BadInvite)?,
        );
        if decoded.len() != 32 {
            return Err(ApiAuthError::BadInvite);
        }
        let mut secret = Zeroizing::new([0u8; 32]);
        secret.copy_from_slice(&decoded);
        let cert_sha256 =
            decode_hex::<32>(cert_hex, "invite").map_err(|_| ApiAuthError::BadInvite)?;
        Ok(InviteToken {
            secret,
            cert_sha256,
        })
    }

    /// The token text (shown once to the admin).
    pub fn to_text(&self) -> Zeroizing<String> {
        self.to_text_with_prefix(INVITE_PREFIX)
    }

    /// The token text under another prefix (see [`Self::parse_with_prefix`]).
    pub fn to_text_with_prefix(&self, prefix: &str) -> Zeroizing<String> {
        let mut s = Zeroizing::new(String::from(prefix));
        B64URL.encode_string(self.secret.as_slice(), &mut s);
        s.push(':');
        s.push_str(&hex::encode(self.cert_sha256));
        s
    }

    /// The 32-byte secret.
    pub fn secret(&self) -> &[u8; 32] {
        &self.secret
    }

    /// hex(SHA-256(secret)): what the controller stores.
    pub fn secret_hash_hex(&self) -> String {
        sha256_hex(self.secret.as_slice())
    }

    /// The pinned controller certificate fingerprint (SHA-256 of the DER).
    pub fn cert_sha256(&self) -> &[u8; 32] {
        &self.cert_sha256
    }
}

/// The message an enrolling device signs to prove it holds the private key.
pub fn enroll_message(token_text: &str, public_key_text: &str) -> String {
    format!(
        "{ENROLL_DOMAIN}\n{}\n{}",
        token_text.trim(),
        public_key_text.trim()
    )
}

/// Signs the enrollment proof (128 hex).
pub fn sign_enroll(key: &DeviceSigningKey, token_text: &str) -> String {
    let msg = enroll_message(token_text, &key.public_key().to_text());
    hex::encode(key.signing_key().sign(msg.as_bytes()).to_bytes())
}

/// Verifies an enrollment proof for `key` and `token_text`.
pub fn verify_enroll(
    key: &DevicePublicKey,
    token_text: &str,
    proof_hex: &str,
) -> Result<(), ApiAuthError> {
    let sig = decode_hex::<64>(proof_hex, "proof").map_err(|_| ApiAuthError::BadSignature)?;
    let msg = enroll_message(token_text, &key.to_text());
    key.verifying_key()
        .verify_strict(msg.as_bytes(), &Signature::from_bytes(&sig))
        .map_err(|_| ApiAuthError::BadSignature)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(b: u8) -> DeviceSigningKey {
        DeviceSigningKey::from_seed([b; 32])
    }

    const NOW: u64 = 1_795_000_000;

    fn signed() -> (DeviceSigningKey, SignedHeaders) {
        let k = key(7);
        let h = sign_request(&k, "POST", "/v1/login", b"{\"code\":\"1\"}", NOW, [9; 16]);
        (k, h)
    }

    fn header_text(h: &SignedHeaders) -> [String; 4] {
        h.to_headers().map(|(_, v)| v)
    }

    fn reparse(v: &[String; 4]) -> Result<SignedHeaders, ApiAuthError> {
        SignedHeaders::parse(Some(&v[0]), Some(&v[1]), Some(&v[2]), Some(&v[3]))
    }

    #[test]
    fn canonical_string_is_exact() {
        let s = canonical_request("POST", "/v1/posture", 17, &[0xab; 16], b"");
        assert_eq!(
            s,
            "postern-api-v1\nPOST\n/v1/posture\n17\nabababababababababababababababab\ne3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn signed_request_verifies_and_round_trips_headers() {
        let (k, h) = signed();
        let back = reparse(&header_text(&h)).expect("headers round-trip");
        assert_eq!(back, h);
        back.verify(
            &k.public_key(),
            "POST",
            "/v1/login",
            b"{\"code\":\"1\"}",
            NOW + 5,
        )
        .expect("valid signature");
    }

    #[test]
    fn tampering_with_any_field_fails() {
        let (k, h) = signed();
        let pk = k.public_key();
        let body = b"{\"code\":\"1\"}".as_slice();
        assert_eq!(
            h.verify(&pk, "GET", "/v1/login", body, NOW),
            Err(ApiAuthError::BadSignature),
            "method"
        );
        assert_eq!(
            h.verify(&pk, "POST", "/v1/posture", body, NOW),
            Err(ApiAuthError::BadSignature),
            "path"
        );
        assert_eq!(
            h.verify(&pk, "POST", "/v1/login", b"{\"code\":\"2\"}", NOW),
            Err(ApiAuthError::BadSignature),
            "body"
        );
        let mut t = h.clone();
        t.timestamp += 1;
        assert_eq!(
            t.verify(&pk, "POST", "/v1/login", body, NOW),
            Err(ApiAuthError::BadSignature),
            "timestamp"
        );
        let mut n = h.clone();
        n.nonce[0] ^= 1;
        assert_eq!(
            n.verify(&pk, "POST", "/v1/login", body, NOW),
            Err(ApiAuthError::BadSignature),
            "nonce"
        );
        let mut s = h.clone();
        s.signature[10] ^= 1;
        assert_eq!(
            s.verify(&pk, "POST", "/v1/login", body, NOW),
            Err(ApiAuthError::BadSignature),
            "signature"
        );
        // Another device's key, and a header naming another device.
        assert_eq!(
            h.verify(&key(8).public_key(), "POST", "/v1/login", body, NOW),
            Err(ApiAuthError::BadSignature),
            "wrong key"
        );
        let mut d = h.clone();
        d.device = key(8).public_key().device_id();
        assert_eq!(
            d.verify(&pk, "POST", "/v1/login", body, NOW),
            Err(ApiAuthError::BadSignature),
            "device id"
        );
    }

    #[test]
    fn skew_limit_is_inclusive_both_ways() {
        let (k, h) = signed();
        let pk = k.public_key();
        let body = b"{\"code\":\"1\"}".as_slice();
        for now in [NOW - MAX_SKEW_SECS, NOW + MAX_SKEW_SECS] {
            h.verify(&pk, "POST", "/v1/login", body, now)
                .expect("edge of window accepted");
        }
        assert_eq!(
            h.verify(&pk, "POST", "/v1/login", body, NOW + MAX_SKEW_SECS + 1),
            Err(ApiAuthError::Stale { skew: 61 })
        );
        assert!(matches!(
            h.verify(&pk, "POST", "/v1/login", body, NOW - MAX_SKEW_SECS - 1),
            Err(ApiAuthError::Stale { .. })
        ));
    }

    #[test]
    fn header_parser_is_strict() {
        let (_, h) = signed();
        let good = header_text(&h);
        assert_eq!(
            SignedHeaders::parse(None, Some("1"), Some("a"), Some("b")),
            Err(ApiAuthError::MissingHeader(HEADER_DEVICE))
        );
        let cases: [(usize, &str, &'static str); 8] = [
            (0, "zz", HEADER_DEVICE),
            (1, "", HEADER_TIMESTAMP),
            (1, "+5", HEADER_TIMESTAMP),
            (1, "0017", HEADER_TIMESTAMP),
            (1, "99999999999999999999", HEADER_TIMESTAMP),
            (2, "ABABABABABABABABABABABABABABABAB", HEADER_NONCE),
            (2, "abab", HEADER_NONCE),
            (3, "00", HEADER_SIGNATURE),
        ];
        for (idx, value, name) in cases {
            let mut v = good.clone();
            v[idx] = value.to_owned();
            assert_eq!(reparse(&v), Err(ApiAuthError::BadHeader(name)), "{value:?}");
        }
    }

    #[test]
    fn nonce_cache_refuses_replays_and_stays_bounded() {
        let dev = key(1).public_key().device_id();
        let mut c = NonceCache::new(2);
        c.check_and_insert(dev, [1; 16], NOW, NOW).expect("first");
        assert_eq!(
            c.check_and_insert(dev, [1; 16], NOW, NOW),
            Err(ApiAuthError::Replayed)
        );
        c.check_and_insert(dev, [2; 16], NOW, NOW).expect("second");
        assert_eq!(
            c.check_and_insert(dev, [3; 16], NOW, NOW),
            Err(ApiAuthError::CacheFull),
            "full within the window: fail closed"
        );
        // Once the old entries fall out of the window, room is made.
        c.check_and_insert(dev, [3; 16], NOW + 200, NOW + 200)
            .expect("pruned");
        assert_eq!(c.len(), 1);
    }

    #[test]
    fn gateway_token_uses_its_own_prefix() {
        let t = InviteToken::new([5; 32], [0xcd; 32]);
        let text = t.to_text_with_prefix(GATEWAY_TOKEN_PREFIX);
        assert!(text.starts_with("postern-gateway:v1:BQUF"), "{}", *text);
        assert!(
            text.ends_with(&format!(":{}", "cd".repeat(32))),
            "{}",
            *text
        );
        let back = InviteToken::parse_with_prefix(&text, GATEWAY_TOKEN_PREFIX).expect("parse");
        assert_eq!(back, t);
        assert_eq!(
            InviteToken::parse(&text),
            Err(ApiAuthError::BadInvite),
            "a gateway token is not a device invite"
        );
    }

    #[test]
    fn invite_token_round_trips_and_rejects_garbage() {
        let t = InviteToken::new([5; 32], [0xcd; 32]);
        let text = t.to_text();
        assert!(text.starts_with("postern-invite:v1:BQUF"), "{}", *text);
        let back = InviteToken::parse(&format!("  {}\n", *text)).expect("parse");
        assert_eq!(back, t);
        assert_eq!(back.secret_hash_hex(), sha256_hex(&[5; 32]));
        for bad in [
            "",
            "postern-invite:v1:",
            "postern-invite:v2:BQUF:00",
            &text.replace(':', ";"),
            &text[..text.len() - 1],
            &text.to_uppercase(),
        ] {
            assert_eq!(
                InviteToken::parse(bad),
                Err(ApiAuthError::BadInvite),
                "{bad:?}"
            );
        }
        assert!(!format!("{t:?}").contains("BQUF"), "Debug hides the secret");
    }

    #[test]
    fn enroll_proof_binds_key_and_token() {
        let k = key(3);
        let token = InviteToken::new([5; 32], [1; 32]).to_text();
        let proof = sign_enroll(&k, &token);
        verify_enroll(&k.public_key(), &token, &proof).expect("valid proof");
        assert_eq!(
            verify_enroll(&key(4).public_key(), &token, &proof),
            Err(ApiAuthError::BadSignature)
        );
        let other = InviteToken::new([6; 32], [1; 32]).to_text();
        assert_eq!(
            verify_enroll(&k.public_key(), &other, &proof),
            Err(ApiAuthError::BadSignature)
        );
        assert_eq!(
            verify_enroll(&k.public_key(), &token, "nothex"),
            Err(ApiAuthError::BadSignature)
        );
    }
}
