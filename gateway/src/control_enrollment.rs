//! Gateway enrollment with a remote controller (`postern-gateway enroll`) and the files it
//! leaves in `<state_dir>/control/` (docs/control-channel.md, "Enrollment").
//!
//! Owns: parsing the one-time token (`postern-gateway:v1:<secret>:<controller cert
//! sha256>`), generating the gateway's P-256 key and self-signed certificate (rcgen),
//! the registration exchange (`enroll` → `enrolled`), and `control/` itself: the directory
//! (0700), `gateway.key` (0600), `gateway.crt`, and `controller.json` (0600: address,
//! pinned certificate SHA-256, registered name). Nothing is written unless the
//! controller accepted the token. Must not run the stream protocol (control_stream.rs)
//! or reconnect (sync.rs).

use std::fmt;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use base64::Engine as _;
use postern_protocol::control::{ControllerMessage, EnrollRequest, GatewayMessage};
use serde::{Deserialize, Serialize};
use zeroize::{Zeroize as _, Zeroizing};

use crate::atomic_file::write_atomic;
use crate::config::{Config, ControllerLink};
use crate::control_tls::{self, ClientIdentity};

/// The directory inside `state_dir`.
pub const CONTROL_DIR: &str = "control";
/// The gateway's private key (PEM, PKCS#8, mode 0600).
pub const KEY_FILE: &str = "gateway.key";
/// The gateway's self-signed certificate (PEM).
pub const CERT_FILE: &str = "gateway.crt";
/// What enrollment recorded (mode 0600).
pub const CONTROLLER_FILE: &str = "controller.json";
/// Bound on each network step of the registration exchange.
const ENROLL_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest answer read during registration.
const MAX_ANSWER: u64 = 64 * 1024;
const TOKEN_PREFIX: &str = "postern-gateway";

/// Why a token was refused before any connection. One line each, saying what to do.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("the token does not start with `postern-gateway:`: paste the whole line printed by `postern-controller gateway add NAME`")]
    NotAGatewayToken,
    #[error("the token has version {0:?}, this gateway reads `v1`: create a token with a matching controller")]
    Version(String),
    #[error("the token has {0} `:`-separated parts, expected 4 (postern-gateway:v1:SECRET:FINGERPRINT): paste the whole line")]
    Parts(usize),
    #[error("the token's secret is not 32 bytes of base64url: paste the whole line, unchanged")]
    Secret,
    #[error(
        "the token's controller fingerprint is not 64 hex digits: paste the whole line, unchanged"
    )]
    Fingerprint,
}

/// A parsed enrollment token (the text is kept to send it; it is a secret).
pub struct GatewayToken {
    text: Zeroizing<String>,
    /// SHA-256 of the controller's certificate (DER).
    pub cert_sha256: [u8; 32],
}

impl fmt::Debug for GatewayToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "GatewayToken(pin {})", hex::encode(self.cert_sha256))
    }
}

impl GatewayToken {
    /// Parses `postern-gateway:v1:<secret: 32 bytes base64url, no padding>:<64 hex>`
    /// (surrounding whitespace ignored).
    pub fn parse(text: &str) -> Result<GatewayToken, TokenError> {
        let text = text.trim();
        let parts: Vec<&str> = text.split(':').collect();
        if parts.first() != Some(&TOKEN_PREFIX) {
            return Err(TokenError::NotAGatewayToken);
        }
        if parts.len() >= 2 && parts[1] != "v1" {
            return Err(TokenError::Version(parts[1].chars().take(16).collect()));
        }
        let [_, _, secret, fingerprint] = parts.as_slice() else {
            return Err(TokenError::Parts(parts.len()));
        };
        let secret = Zeroizing::new(
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(secret)
                .map_err(|_| TokenError::Secret)?,
        );
        if secret.len() != 32 {
            return Err(TokenError::Secret);
        }
        let mut cert_sha256 = [0u8; 32];
        if fingerprint.len() != 64 {
            return Err(TokenError::Fingerprint);
        }
        hex::decode_to_slice(fingerprint.to_ascii_lowercase(), &mut cert_sha256)
            .map_err(|_| TokenError::Fingerprint)?;
        Ok(GatewayToken {
            text: Zeroizing::new(text.to_owned()),
            cert_sha256,
        })
    }

    /// The token text exactly as it is sent to the controller.
    pub fn text(&self) -> &str {
        &self.text
    }
}

/// `controller.json`: what enrollment recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Enrollment {
    /// `HOST:PORT` enrolled with (the config's `controller` at enrollment).
    pub controller: String,
    /// Lowercase hex SHA-256 of the controller's certificate (DER): the pin.
    pub cert_sha256: String,
    /// The name the controller registered this gateway under.
    pub name: String,
    /// Lowercase hex SHA-256 of this gateway's SubjectPublicKeyInfo (what the controller stores).
    pub key_sha256: String,
    pub enrolled_at_ms: u64,
}

/// `<state_dir>/control`.
pub fn control_dir(state_dir: &Path) -> PathBuf {
    state_dir.join(CONTROL_DIR)
}

impl Enrollment {
    /// Reads `<state_dir>/control/controller.json`; the error is one line saying what to do.
    pub fn read(state_dir: &Path) -> Result<Enrollment, String> {
        let path = control_dir(state_dir).join(CONTROLLER_FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(format!(
                    "not enrolled: run postern-gateway enroll --config FILE --token TOKEN (no {})",
                    path.display()
                ))
            }
            Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
        };
        serde_json::from_str(&text).map_err(|e| {
            format!(
                "{} is not an enrollment file ({e}): enroll again with postern-gateway enroll --force",
                path.display()
            )
        })
    }

    /// The pinned fingerprint as bytes.
    pub fn pin(&self) -> Result<[u8; 32], String> {
        let mut pin = [0u8; 32];
        hex::decode_to_slice(&self.cert_sha256, &mut pin).map_err(|_| {
            format!(
                "cert_sha256 {:?} in controller.json is not 64 hex digits: enroll again with --force",
                self.cert_sha256
            )
        })?;
        Ok(pin)
    }

    /// The gateway's TLS identity from the same directory.
    pub fn identity(state_dir: &Path) -> Result<ClientIdentity, control_tls::ControlTlsError> {
        let dir = control_dir(state_dir);
        ClientIdentity::load(&dir.join(CERT_FILE), &dir.join(KEY_FILE))
    }
}

/// What a successful enrollment did.
#[derive(Debug, Clone, Serialize)]
pub struct EnrollOutcome {
    pub name: String,
    pub controller: String,
    pub controller_cert_sha256: String,
    pub key_sha256: String,
    pub dir: PathBuf,
}

/// A fresh key pair and self-signed certificate, still in memory.
struct NewIdentity {
    key_pem: Zeroizing<String>,
    cert_pem: String,
    key_sha256: String,
    identity: ClientIdentity,
}

fn new_identity() -> Result<NewIdentity> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .context("generate the gateway's P-256 key")?;
    let mut params = rcgen::CertificateParams::new(vec!["postern-gateway".to_owned()])
        .context("certificate parameters")?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "postern-gateway");
    // Far in the future: the controller pins the key, not the validity period.
    params.not_before = rcgen::date_time_ymd(2024, 1, 1);
    params.not_after = rcgen::date_time_ymd(4000, 1, 1);
    let cert = params
        .self_signed(&key)
        .context("self-sign the gateway certificate")?;
    let key_pem = Zeroizing::new(key.serialize_pem());
    let key_der = rustls_pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
    Ok(NewIdentity {
        key_sha256: control_tls::spki_sha256(&key.public_key_der()),
        cert_pem: cert.pem(),
        identity: ClientIdentity {
            cert: cert.der().clone(),
            key: key_der,
        },
        key_pem,
    })
}

/// `postern-gateway enroll`: registers a new key with the controller named by the config's
/// `controller` and, only when it accepted, writes `control/`. An existing enrollment is
/// kept unless `force`.
pub fn enroll(cfg: &Config, token: &GatewayToken, force: bool) -> Result<EnrollOutcome> {
    let ControllerLink::Tls(address) = &cfg.controller else {
        bail!("field `controller`: enrollment is for a remote controller: set `controller = \"HOST:PORT\"` instead of `controller_socket` in the config");
    };
    let dir = control_dir(&cfg.state_dir);
    if !force {
        if let Ok(old) = Enrollment::read(&cfg.state_dir) {
            bail!(
                "already enrolled as {:?} with {} ({}): pass --force to replace that enrollment (a new key; the old registration stays until `postern-controller gateway remove`)",
                old.name,
                old.controller,
                dir.join(CONTROLLER_FILE).display()
            );
        }
    }
    let fresh = new_identity()?;
    let mut tls =
        control_tls::connect(address, token.cert_sha256, &fresh.identity, ENROLL_TIMEOUT)?;
    let mut request = GatewayMessage::Enroll(EnrollRequest {
        token: token.text().to_owned(),
    });
    // Sized up front so the secret is not left behind by a reallocation.
    let mut line = Zeroizing::new(Vec::with_capacity(token.text().len() + 64));
    serde_json::to_writer(&mut *line, &request).context("encode the enroll request")?;
    if let GatewayMessage::Enroll(r) = &mut request {
        r.token.zeroize();
    }
    tls.write_all(&line)
        .and_then(|()| tls.write_all(b"\n"))
        .and_then(|()| tls.flush())
        .with_context(|| format!("send the enroll request to {address}"))?;
    let mut answer = String::new();
    BufReader::new(&mut tls)
        .take(MAX_ANSWER)
        .read_line(&mut answer)
        .with_context(|| format!("read the controller's answer from {address} (did it refuse this gateway's certificate?)"))?;
    if answer.trim().is_empty() {
        bail!("the controller at {address} closed the connection without an answer");
    }
    let name = match serde_json::from_str::<ControllerMessage>(answer.trim()) {
        Ok(ControllerMessage::Enrolled(e)) => e.name,
        Ok(ControllerMessage::Error(e)) => {
            bail!(
                "the controller refused the enrollment ({}): {}",
                e.code,
                e.message
            )
        }
        Ok(_) => bail!(
            "the controller at {address} answered the enroll request with an unexpected message"
        ),
        Err(e) => {
            bail!("the controller at {address} sent an answer that is not a control message: {e}")
        }
    };
    let outcome = EnrollOutcome {
        name: name.clone(),
        controller: address.clone(),
        controller_cert_sha256: hex::encode(token.cert_sha256),
        key_sha256: fresh.key_sha256.clone(),
        dir: dir.clone(),
    };
    write_enrollment(&cfg.state_dir, &fresh, &outcome)?;
    Ok(outcome)
}

/// Creates `dir` (and parents) with mode 0700 if missing, and makes it 0700 if it exists.
fn private_dir(dir: &Path) -> Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("create {}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("chmod 700 {}", dir.display()))
}

fn write_enrollment(state_dir: &Path, fresh: &NewIdentity, outcome: &EnrollOutcome) -> Result<()> {
    private_dir(state_dir)?;
    let dir = control_dir(state_dir);
    private_dir(&dir)?;
    let write = |name: &str, bytes: &[u8]| {
        write_atomic(&dir, name, bytes)
            .with_context(|| format!("write {}", dir.join(name).display()))
    };
    write(KEY_FILE, fresh.key_pem.as_bytes())?;
    write(CERT_FILE, fresh.cert_pem.as_bytes())?;
    let record = Enrollment {
        controller: outcome.controller.clone(),
        cert_sha256: outcome.controller_cert_sha256.clone(),
        name: outcome.name.clone(),
        key_sha256: outcome.key_sha256.clone(),
        enrolled_at_ms: crate::unix_ms(),
    };
    let mut text = serde_json::to_string_pretty(&record).map_err(|e| anyhow!("{e}"))?;
    text.push('\n');
    // Last: its presence means the enrollment is complete.
    write(CONTROLLER_FILE, text.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(secret: &str, fp: &str) -> String {
        format!("postern-gateway:v1:{secret}:{fp}")
    }

    const SECRET: &str = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"; // 32 zero bytes
    const FP: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";

    #[test]
    fn a_well_formed_token_parses() {
        let t = GatewayToken::parse(&format!("  {}\n", token(SECRET, FP))).expect("valid token");
        assert_eq!(hex::encode(t.cert_sha256), FP);
        assert_eq!(t.text(), token(SECRET, FP));
        assert!(
            !format!("{t:?}").contains(SECRET),
            "Debug must not show the secret"
        );
        let upper = GatewayToken::parse(&token(SECRET, &FP.to_uppercase())).expect("upper hex");
        assert_eq!(hex::encode(upper.cert_sha256), FP);
    }

    #[test]
    fn malformed_tokens_are_refused_with_the_reason() {
        let cases = [
            ("", TokenError::NotAGatewayToken),
            ("postern-invite:v1:x:y", TokenError::NotAGatewayToken),
            ("postern-gateway:v2:x:y", TokenError::Version("v2".into())),
            ("postern-gateway:v1:x", TokenError::Parts(3)),
            (
                &*format!("{}:extra", token(SECRET, FP)),
                TokenError::Parts(5),
            ),
            (&*token("not base64!", FP), TokenError::Secret),
            (&*token("AAAA", FP), TokenError::Secret),
            (&*token(SECRET, "abc"), TokenError::Fingerprint),
            (&*token(SECRET, &"zz".repeat(32)), TokenError::Fingerprint),
        ];
        for (text, want) in cases {
            assert_eq!(GatewayToken::parse(text).expect_err(text), want, "{text:?}");
            assert!(!want.to_string().contains('\n'));
        }
    }

    fn tls_config(dir: &Path) -> Config {
        use std::os::unix::fs::PermissionsExt as _;
        let key = dir.join("gw.key");
        std::fs::write(&key, "x").expect("write key");
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        // Port 1 on loopback: nothing listens, the connection is refused at once.
        let text = format!(
            "key_file = {:?}\ncontroller = \"127.0.0.1:1\"\nstate_dir = {:?}\n",
            key.display().to_string(),
            dir.join("state").display().to_string()
        );
        Config::parse(&text, Path::new("gw.toml")).expect("valid config")
    }

    #[test]
    fn an_existing_enrollment_is_kept_and_a_failed_one_writes_nothing() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let cfg = tls_config(tmp.path());
        let token = GatewayToken::parse(&token(SECRET, FP)).expect("token");
        let err = enroll(&cfg, &token, false).expect_err("nobody listens");
        assert!(format!("{err:#}").contains("cannot connect"), "{err:#}");
        assert!(
            !control_dir(&cfg.state_dir).exists(),
            "nothing written on failure"
        );

        let record = Enrollment {
            controller: "127.0.0.1:1".into(),
            cert_sha256: FP.into(),
            name: "edge-1".into(),
            key_sha256: FP.into(),
            enrolled_at_ms: 1,
        };
        private_dir(&control_dir(&cfg.state_dir)).expect("mkdir");
        std::fs::write(
            control_dir(&cfg.state_dir).join(CONTROLLER_FILE),
            serde_json::to_vec(&record).expect("json"),
        )
        .expect("write");
        assert_eq!(Enrollment::read(&cfg.state_dir).expect("read back"), record);
        assert_eq!(
            cfg.reporting_name(),
            "edge-1",
            "a TLS gateway reports its registered name"
        );
        let err = enroll(&cfg, &token, false).expect_err("already enrolled");
        assert!(format!("{err:#}").contains("--force"), "{err:#}");
        let err = enroll(&cfg, &token, true).expect_err("--force tries (nobody listens)");
        assert!(format!("{err:#}").contains("cannot connect"), "{err:#}");
        assert_eq!(
            Enrollment::read(&cfg.state_dir).expect("kept"),
            record,
            "a failed --force keeps the old one"
        );
    }

    #[test]
    fn a_new_identity_is_p256_with_a_matching_key_fingerprint() {
        let fresh = new_identity().expect("key generation works");
        assert!(fresh.key_pem.contains("PRIVATE KEY"));
        assert!(fresh.cert_pem.contains("BEGIN CERTIFICATE"));
        assert_eq!(fresh.key_sha256.len(), 64);
        let other = new_identity().expect("key generation works");
        assert_ne!(
            fresh.key_sha256, other.key_sha256,
            "each enrollment makes a new key"
        );
    }
}
