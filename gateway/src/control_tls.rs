//! Mutual TLS to the controller's gateway listener (docs/control-channel.md, "Transports").
//!
//! Owns: the client side of the TLS connection (rustls, ring provider only, TLS 1.3
//! only), trusting exactly one controller certificate (`postern_pinning`: SHA-256 of the
//! end-entity DER must equal the pin; handshake signatures are still verified), presenting
//! the gateway's own certificate, and loading that certificate and key from
//! `<state_dir>/control/`. Must not speak the stream protocol (control_stream.rs), write
//! files (control_enrollment.rs) or decide when to reconnect (sync.rs).

use std::fmt;
use std::net::{TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use postern_pinning::PinnedCertVerifier;
use rustls::client::danger::ServerCertVerifier;
use rustls::{ClientConfig, ClientConnection, StreamOwned};
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};

/// A TLS connection to the controller.
pub type ControlTlsStream = StreamOwned<ClientConnection, TcpStream>;

/// Why the TLS connection could not be made. One line each.
#[derive(Debug, thiserror::Error)]
pub enum ControlTlsError {
    #[error("controller address {addr}: {error}: check the `controller` field")]
    Resolve { addr: String, error: std::io::Error },
    #[error("cannot connect to the controller at {addr}: {error}: is `postern-controller serve --gateway-listen` running and reachable?")]
    Connect { addr: String, error: std::io::Error },
    #[error("controller certificate fingerprint mismatch at {addr}: expected sha256 {expected} (pinned at enrollment), the controller presented {presented}; refusing it (if the controller's identity really changed, enroll again with a new token)")]
    PinMismatch {
        addr: String,
        expected: String,
        presented: String,
    },
    #[error("TLS handshake with the controller at {addr} failed: {error}")]
    Handshake { addr: String, error: std::io::Error },
    #[error("TLS setup failed: {0}")]
    Setup(rustls::Error),
    #[error("gateway TLS identity {}: {what}: enroll again with `postern-gateway enroll --force`", path.display())]
    Identity { path: PathBuf, what: String },
}

// Manual: printed in the message, not chained (`{:#}` would repeat it).
impl From<rustls::Error> for ControlTlsError {
    fn from(e: rustls::Error) -> Self {
        ControlTlsError::Setup(e)
    }
}

/// The gateway's client certificate and key.
pub struct ClientIdentity {
    pub cert: CertificateDer<'static>,
    pub key: PrivateKeyDer<'static>,
}

impl fmt::Debug for ClientIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientIdentity").finish_non_exhaustive()
    }
}

impl ClientIdentity {
    /// Reads `cert_path` and `key_path` (PEM).
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<ClientIdentity, ControlTlsError> {
        let bad = |path: &Path, e: rustls_pki_types::pem::Error| ControlTlsError::Identity {
            path: path.to_owned(),
            what: e.to_string(),
        };
        let cert = CertificateDer::from_pem_file(cert_path).map_err(|e| bad(cert_path, e))?;
        let key = PrivateKeyDer::from_pem_file(key_path).map_err(|e| bad(key_path, e))?;
        Ok(ClientIdentity { cert, key })
    }

    fn clone_parts(&self) -> (CertificateDer<'static>, PrivateKeyDer<'static>) {
        (self.cert.clone(), self.key.clone_key())
    }
}

/// Connects to `addr` (`HOST:PORT`), completes the TLS 1.3 handshake presenting
/// `identity` and accepting only the certificate whose DER has SHA-256 `pin`. Each socket
/// operation of the connect and the handshake is bounded by `timeout`.
pub fn connect(
    addr: &str,
    pin: [u8; 32],
    identity: &ClientIdentity,
    timeout: Duration,
) -> Result<ControlTlsStream, ControlTlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = Arc::new(PinnedCertVerifier::new(pin, Arc::clone(&provider)));
    let (cert, key) = identity.clone_parts();
    let config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::clone(&verifier) as Arc<dyn ServerCertVerifier>)
        .with_client_auth_cert(vec![cert], key)?;
    let (host, _) = split_host(addr);
    // The name is not checked (the certificate is pinned) but must be a valid one.
    let server_name =
        ServerName::try_from(host.to_owned()).map_err(|e| ControlTlsError::Resolve {
            addr: addr.to_owned(),
            error: std::io::Error::other(e),
        })?;
    let mut conn = ClientConnection::new(Arc::new(config), server_name)?;

    let addrs: Vec<_> = addr
        .to_socket_addrs()
        .map_err(|error| ControlTlsError::Resolve {
            addr: addr.to_owned(),
            error,
        })?
        .collect();
    let mut last = std::io::Error::new(std::io::ErrorKind::NotFound, "no address found");
    let mut tcp = None;
    for a in addrs {
        match TcpStream::connect_timeout(&a, timeout) {
            Ok(s) => {
                tcp = Some(s);
                break;
            }
            Err(e) => last = e,
        }
    }
    let mut tcp = tcp.ok_or_else(|| ControlTlsError::Connect {
        addr: addr.to_owned(),
        error: last,
    })?;
    let handshake_err = |error: std::io::Error| ControlTlsError::Handshake {
        addr: addr.to_owned(),
        error,
    };
    tcp.set_read_timeout(Some(timeout)).map_err(handshake_err)?;
    tcp.set_write_timeout(Some(timeout))
        .map_err(handshake_err)?;
    tcp.set_nodelay(true).map_err(handshake_err)?;
    while conn.is_handshaking() {
        if let Err(error) = conn.complete_io(&mut tcp) {
            return Err(match verifier.take_mismatch() {
                Some(presented) => ControlTlsError::PinMismatch {
                    addr: addr.to_owned(),
                    expected: hex::encode(pin),
                    presented,
                },
                None => handshake_err(error),
            });
        }
    }
    Ok(StreamOwned::new(conn, tcp))
}

/// `HOST:PORT` / `[V6]:PORT` → (host without brackets, port text).
fn split_host(addr: &str) -> (&str, &str) {
    let (host, port) = addr.rsplit_once(':').unwrap_or((addr, ""));
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    (host, port)
}

/// Lowercase hex SHA-256 of the SubjectPublicKeyInfo (DER) inside a certificate: the key
/// fingerprint the controller registers (survives re-issuing the certificate).
pub fn spki_sha256(spki_der: &[u8]) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, spki_der).as_ref())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_split_handles_v6_literals() {
        assert_eq!(split_host("ctl.example:7443"), ("ctl.example", "7443"));
        assert_eq!(split_host("[::1]:7443"), ("::1", "7443"));
        assert_eq!(split_host("127.0.0.1:1"), ("127.0.0.1", "1"));
    }
}
