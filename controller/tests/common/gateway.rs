//! Test helpers for the control channel (docs/control-channel.md): a controller running
//! `serve --gateway-listen 127.0.0.1:0`, a gateway-side TLS client (rcgen self-signed
//! P-256 client certificate, controller certificate pinned by SHA-256) and JSON-line I/O.
//!
//! Owns: test scaffolding only. Must not touch: anything outside the test's tempdir;
//! traffic goes to 127.0.0.1 only.
#![allow(dead_code, clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use postern_pinning::PinnedCertVerifier;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, StreamOwned};

use super::cmd;

/// SHA-256 as lowercase hex.
pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(postern_pinning::cert_sha256(data))
}

/// A running `serve --socket … --gateway-listen 127.0.0.1:0`; killed on drop.
pub struct ChannelController {
    pub child: Child,
    pub dir: tempfile::TempDir,
    pub db: PathBuf,
    pub socket: PathBuf,
    pub addr: SocketAddr,
    /// Everything the controller logged so far.
    pub log: Arc<Mutex<String>>,
}

impl Drop for ChannelController {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl ChannelController {
    /// Starts the controller in a fresh tempdir and waits for its
    /// `gateway channel listening on ADDR` log line.
    pub fn start() -> ChannelController {
        Self::start_with(&[])
    }

    /// Like [`Self::start`], with more `serve` arguments.
    pub fn start_with(extra: &[&str]) -> ChannelController {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("registry.db");
        let socket = dir.path().join("sync.sock");
        let mut child = cmd(&db)
            .args(["serve", "--socket"])
            .arg(&socket)
            .args(["--gateway-listen", "127.0.0.1:0"])
            .args(extra)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        let log = Arc::new(Mutex::new(String::new()));
        let log_writer = Arc::clone(&log);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                {
                    let mut l = log_writer.lock().unwrap();
                    l.push_str(&line);
                    l.push('\n');
                }
                if let Some(rest) = line.split("gateway channel listening on ").nth(1) {
                    let addr = rest.split_whitespace().next().unwrap_or_default();
                    let _ = tx.send(addr.to_owned());
                }
            }
        });
        let addr: SocketAddr = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("serve logs `gateway channel listening on ADDR` within 30 s")
            .parse()
            .expect("the logged address parses");
        assert!(addr.ip().is_loopback(), "{addr}");
        super::wait_for_socket(&socket);
        ChannelController {
            child,
            dir,
            db,
            socket,
            addr,
            log,
        }
    }

    /// SHA-256 (hex) of the controller's certificate DER (`api/cert.pem`).
    pub fn cert_sha256(&self) -> String {
        cert_sha256(&self.dir.path().join("api/cert.pem"))
    }

    /// `gateway add NAME --json` (plus `extra`); returns the token text.
    pub fn add_gateway(&self, name: &str, extra: &[&str]) -> String {
        let mut args = vec!["gateway", "add", name, "--json"];
        args.extend_from_slice(extra);
        let out = super::ok(&self.db, &args);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        v["token"].as_str().unwrap().to_owned()
    }

    /// Waits (bounded) until the log contains `needle`.
    pub fn wait_log(&self, needle: &str, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if self.log.lock().unwrap().contains(needle) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }
}

/// SHA-256 (hex) of the DER of the first certificate in a PEM file.
pub fn cert_sha256(pem_path: &Path) -> String {
    use rustls::pki_types::pem::PemObject as _;
    let der = CertificateDer::from_pem_file(pem_path).unwrap();
    sha256_hex(der.as_ref())
}

/// A gateway's TLS client identity: a self-signed P-256 certificate (rcgen), as
/// `postern-gateway enroll` makes one.
pub struct GatewayIdentity {
    pub cert: CertificateDer<'static>,
    pub key_pkcs8: Vec<u8>,
    /// SHA-256 (hex) of the SubjectPublicKeyInfo DER: what the controller registers.
    pub spki_sha256: String,
}

impl GatewayIdentity {
    pub fn generate() -> GatewayIdentity {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let params = rcgen::CertificateParams::new(vec!["postern-gateway".to_owned()]).unwrap();
        let cert = params.self_signed(&key).unwrap();
        GatewayIdentity {
            cert: cert.der().clone(),
            key_pkcs8: key.serialize_der(),
            spki_sha256: sha256_hex(&key.public_key_der()),
        }
    }
}

/// A gateway's end of the TLS control channel (blocking, one JSON object per line).
pub struct TlsGateway {
    stream: BufReader<StreamOwned<ClientConnection, TcpStream>>,
}

impl TlsGateway {
    /// Connects to `addr` pinning `fingerprint` and presenting `identity`; completes the
    /// handshake (an error if the pin does not match).
    pub fn connect(
        addr: SocketAddr,
        fingerprint: &str,
        identity: &GatewayIdentity,
    ) -> std::io::Result<TlsGateway> {
        Self::connect_as(addr, fingerprint, Some(identity))
    }

    /// Like [`Self::connect`]; `None` presents no client certificate at all.
    pub fn connect_as(
        addr: SocketAddr,
        fingerprint: &str,
        identity: Option<&GatewayIdentity>,
    ) -> std::io::Result<TlsGateway> {
        Self::connect_pinned(addr, &pin_verifier(fingerprint), identity)
    }

    /// Connects with `verifier` (kept by the caller to read a pin mismatch).
    pub fn connect_pinned(
        addr: SocketAddr,
        verifier: &Arc<PinnedCertVerifier>,
        identity: Option<&GatewayIdentity>,
    ) -> std::io::Result<TlsGateway> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = Arc::clone(verifier);
        let builder = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let config = match identity {
            Some(identity) => builder
                .with_client_auth_cert(
                    vec![identity.cert.clone()],
                    PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(identity.key_pkcs8.clone())),
                )
                .unwrap(),
            None => builder.with_no_client_auth(),
        };
        let mut tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        tcp.set_read_timeout(Some(Duration::from_secs(20)))?;
        tcp.set_write_timeout(Some(Duration::from_secs(20)))?;
        let mut conn = ClientConnection::new(
            Arc::new(config),
            ServerName::try_from("postern-controller").unwrap(),
        )
        .map_err(std::io::Error::other)?;
        while conn.is_handshaking() {
            conn.complete_io(&mut tcp)?;
        }
        Ok(TlsGateway {
            stream: BufReader::new(StreamOwned::new(conn, tcp)),
        })
    }

    /// Sets how long `recv` waits for a line.
    pub fn set_read_timeout(&self, t: Duration) {
        self.stream
            .get_ref()
            .sock
            .set_read_timeout(Some(t))
            .unwrap();
    }

    /// Sends one JSON line.
    pub fn send(&mut self, v: &serde_json::Value) {
        let mut line = serde_json::to_vec(v).unwrap();
        line.push(b'\n');
        self.send_raw(&line);
    }

    /// Like `send`, but reports failure (connection gone) instead of panicking.
    pub fn try_send(&mut self, v: &serde_json::Value) -> bool {
        let mut line = serde_json::to_vec(v).unwrap();
        line.push(b'\n');
        let s = self.stream.get_mut();
        s.write_all(&line).and_then(|()| s.flush()).is_ok()
    }

    pub fn send_raw(&mut self, bytes: &[u8]) {
        let s = self.stream.get_mut();
        s.write_all(bytes).unwrap();
        s.flush().unwrap();
    }

    /// The next line as JSON; `None` when the controller closed the connection (EOF, or a
    /// TLS close / reset after it).
    pub fn try_recv(&mut self) -> Option<serde_json::Value> {
        let mut line = String::new();
        match self.stream.read_line(&mut line) {
            Ok(n) if n > 0 => {
                assert!(line.ends_with('\n'), "unterminated line {line:?}");
                Some(serde_json::from_str(&line).unwrap())
            }
            Ok(_) => None,
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                panic!("no line from the controller within the read timeout")
            }
            Err(_) => None,
        }
    }

    /// The next line; panics at EOF.
    pub fn recv(&mut self) -> serde_json::Value {
        self.try_recv()
            .expect("the controller closed the channel unexpectedly")
    }

    /// `{"hello":{"version":1,"after_revision":…}}`; returns the first answer.
    pub fn hello(&mut self, after: Option<u64>) -> serde_json::Value {
        self.send(&serde_json::json!({"hello": {"version": 1, "after_revision": after}}));
        self.recv()
    }
}

/// A verifier that trusts only the certificate with SHA-256 `fingerprint` (hex).
pub fn pin_verifier(fingerprint: &str) -> Arc<PinnedCertVerifier> {
    let pin: [u8; 32] = hex::decode(fingerprint)
        .expect("fingerprint is hex")
        .try_into()
        .expect("fingerprint is 32 bytes");
    Arc::new(PinnedCertVerifier::new(
        pin,
        Arc::new(rustls::crypto::ring::default_provider()),
    ))
}

/// Connects with a fresh identity and sends `enroll`; returns the identity and answer.
pub fn enroll(
    addr: SocketAddr,
    fingerprint: &str,
    identity: &GatewayIdentity,
    token: &str,
) -> serde_json::Value {
    let mut g = TlsGateway::connect(addr, fingerprint, identity).unwrap();
    g.send(&serde_json::json!({"enroll": {"token": token}}));
    let answer = g.recv();
    assert!(g.try_recv().is_none(), "closed after answering enroll");
    answer
}

/// The error code of an `{"error":{…}}` answer (panics if it is another message).
pub fn error_code(v: &serde_json::Value) -> &str {
    v["error"]["code"]
        .as_str()
        .unwrap_or_else(|| panic!("expected an error, got {v}"))
}
