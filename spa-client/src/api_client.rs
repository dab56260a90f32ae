//! Client of the controller's HTTPS API (`/v1/enroll`, `/v1/login`, `/v1/posture`,
//! `/v1/whoami`, `/v1/time`): a small blocking HTTP/1.1 client over rustls (ring provider) that trusts
//! exactly one pinned certificate, and the `controller.json` file written at enrollment.
//!
//! Owns: URL parsing (`https://HOST[:PORT]`), trusting only the pinned certificate
//! (`postern_pinning`: SHA-256 of the end-entity DER must equal the pin; handshake
//! signatures are still verified with ring), request signing with the device key (fresh timestamp and random nonce per
//! request, see `postern_protocol::api_auth`), and `controller.json` (mode 0600).
//!
//! Must not touch: the command line and its messages (see `main.rs`), the device key file
//! format (`postern_protocol::keys`).

use std::io::{Read, Write};
use std::net::{IpAddr, TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use postern_pinning::PinnedCertVerifier;
use postern_protocol::api_auth::{self, SignedHeaders};
use postern_protocol::keys::DeviceSigningKey;
use rustls::client::danger::ServerCertVerifier;
use rustls::{ClientConfig, ClientConnection, StreamOwned};
use rustls_pki_types::ServerName;
use serde::{Deserialize, Serialize};

/// Connect timeout to the controller.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Read/write timeout of one request.
pub const IO_TIMEOUT: Duration = Duration::from_secs(20);
/// Largest accepted response (headers and body).
pub const MAX_RESPONSE_BYTES: usize = 1024 * 1024;
/// File name of the controller settings, beside the device key.
pub const CONTROLLER_FILE: &str = "controller.json";

/// What went wrong talking to the controller. Each message is one line.
#[derive(Debug, thiserror::Error)]
pub enum ApiClientError {
    #[error(
        "--controller {0:?}: expected https://HOST:PORT (e.g. https://controller.example.org:8443)"
    )]
    BadUrl(String),
    #[error("cannot resolve or connect to the controller at {addr}: {error}")]
    Connect { addr: String, error: std::io::Error },
    #[error("controller certificate fingerprint mismatch: pinned sha256 {pinned}, controller presented {presented}; refusing to talk to it (ask the admin for a new invite if the controller's API identity changed)")]
    PinMismatch { pinned: String, presented: String },
    #[error("TLS/HTTP exchange with the controller failed: {0}")]
    Io(std::io::Error),
    #[error("TLS setup failed: {0}")]
    Tls(rustls::Error),
    #[error("unexpected answer from the controller: {0}")]
    BadResponse(String),
    #[error("controller refused the request (HTTP {status}): {message}")]
    Status { status: u16, message: String },
    #[error("system clock is before 1970")]
    Clock,
    #[error("cannot read the OS random number generator: {0}")]
    Random(getrandom::Error),
}

// Manual `From`s: the wrapped error is printed in the message, not chained as a source
// (anyhow's `{:#}` would print it twice).
impl From<std::io::Error> for ApiClientError {
    fn from(e: std::io::Error) -> Self {
        ApiClientError::Io(e)
    }
}

impl From<rustls::Error> for ApiClientError {
    fn from(e: rustls::Error) -> Self {
        ApiClientError::Tls(e)
    }
}

/// `controller.json`: where this device's controller is and how to recognize it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControllerConfig {
    /// `https://HOST:PORT`.
    pub url: String,
    /// Lowercase hex SHA-256 of the controller API certificate (DER).
    pub cert_sha256: String,
    /// This device's id as registered.
    pub device_id: String,
}

impl ControllerConfig {
    /// `controller.json` beside the device key file.
    pub fn path_beside(key_file: &Path) -> PathBuf {
        match key_file.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir.join(CONTROLLER_FILE),
            _ => PathBuf::from(CONTROLLER_FILE),
        }
    }

    /// Writes the file with mode 0600 (replacing an older one, never following a symlink).
    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        let mut text = serde_json::to_string_pretty(self).map_err(std::io::Error::other)?;
        text.push('\n');
        crate::private_file::write_private(path, text.as_bytes())
    }

    /// Reads the file written at enrollment.
    pub fn read(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            format!(
                "cannot read {}: {e}: enroll this device first with `postern enroll --controller URL --token TOKEN`",
                path.display()
            )
        })?;
        serde_json::from_str(&text)
            .map_err(|e| format!("{} is not a postern controller file: {e}", path.display()))
    }

    /// The pinned fingerprint as bytes.
    pub fn pin(&self) -> Result<[u8; 32], String> {
        let mut pin = [0u8; 32];
        hex::decode_to_slice(&self.cert_sha256, &mut pin).map_err(|_| {
            format!(
                "cert_sha256 {:?} in controller.json is not 64 hex digits",
                self.cert_sha256
            )
        })?;
        Ok(pin)
    }
}

/// `https://HOST[:PORT]` split into host and port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControllerUrl {
    pub host: String,
    pub port: u16,
}

impl ControllerUrl {
    /// Parses `https://HOST[:PORT][/]` (IPv6 literals in brackets). Default port 443.
    pub fn parse(url: &str) -> Result<Self, ApiClientError> {
        let bad = || ApiClientError::BadUrl(url.to_owned());
        let rest = url.strip_prefix("https://").ok_or_else(bad)?;
        let authority = rest.strip_suffix('/').unwrap_or(rest);
        if authority.is_empty() || authority.contains(['/', '?', '#', '@']) {
            return Err(bad());
        }
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (host, after) = v6.split_once(']').ok_or_else(bad)?;
            host.parse::<std::net::Ipv6Addr>().map_err(|_| bad())?;
            match after {
                "" => (host, None),
                p => (host, Some(p.strip_prefix(':').ok_or_else(bad)?)),
            }
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (authority, None),
            }
        };
        let port = match port {
            None => 443,
            Some(p) => p.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(bad)?,
        };
        if host.is_empty() {
            return Err(bad());
        }
        Ok(ControllerUrl {
            host: host.to_owned(),
            port,
        })
    }

    fn host_header(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// One HTTP answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiResponse {
    pub status: u16,
    pub body: Vec<u8>,
}

impl ApiResponse {
    /// The body as JSON when the status is 2xx, else the controller's `{"error": ...}`
    /// message as [`ApiClientError::Status`].
    pub fn into_json<T: serde::de::DeserializeOwned>(self) -> Result<T, ApiClientError> {
        if !(200..300).contains(&self.status) {
            return Err(ApiClientError::Status {
                status: self.status,
                message: self.error_message(),
            });
        }
        serde_json::from_slice(&self.body)
            .map_err(|e| ApiClientError::BadResponse(format!("invalid JSON body: {e}")))
    }

    /// The `error` field of a JSON error body (or the raw body, shortened).
    pub fn error_message(&self) -> String {
        #[derive(Deserialize)]
        struct ErrorBody {
            error: String,
        }
        match serde_json::from_slice::<ErrorBody>(&self.body) {
            Ok(b) => b.error,
            Err(_) => String::from_utf8_lossy(&self.body)
                .chars()
                .take(200)
                .collect(),
        }
    }
}

/// Answer of `POST /v1/enroll`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrollResponse {
    pub device_id: String,
    pub name: String,
    pub user: String,
}

/// A connection factory for one controller, pinned to one certificate.
#[derive(Debug, Clone)]
pub struct ApiClient {
    url: ControllerUrl,
    pin: [u8; 32],
    verifier: Arc<PinnedCertVerifier>,
    tls: Arc<ClientConfig>,
}

impl ApiClient {
    /// A client for `url` trusting only the certificate whose DER has SHA-256 `pin`.
    pub fn new(url: &str, pin: [u8; 32]) -> Result<Self, ApiClientError> {
        let url = ControllerUrl::parse(url)?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = Arc::new(PinnedCertVerifier::new(pin, Arc::clone(&provider)));
        let tls = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .dangerous()
            .with_custom_certificate_verifier(Arc::clone(&verifier) as Arc<dyn ServerCertVerifier>)
            .with_no_client_auth();
        Ok(ApiClient {
            url,
            pin,
            verifier,
            tls: Arc::new(tls),
        })
    }

    /// The controller's clock minus this device's, in ms, and the round trip in ms, from
    /// `GET /v1/time` (unsigned): offset = controller time - the request's midpoint.
    pub fn clock_offset_ms(&self) -> Result<(i64, i64), ApiClientError> {
        #[derive(Deserialize)]
        struct TimeAnswer {
            unix_ms: i64,
        }
        let now_ms = || -> Result<i64, ApiClientError> {
            Ok(SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_err(|_| ApiClientError::Clock)?
                .as_millis() as i64)
        };
        let t0 = now_ms()?;
        let answer: TimeAnswer = self.exchange("GET", "/v1/time", &[], b"")?.into_json()?;
        let t1 = now_ms()?;
        Ok((answer.unix_ms - (t0 + t1) / 2, t1 - t0))
    }

    /// Registers `key` with the invite token (`POST /v1/enroll`).
    pub fn enroll(
        &self,
        token_text: &str,
        key: &DeviceSigningKey,
    ) -> Result<EnrollResponse, ApiClientError> {
        let body = serde_json::json!({
            "token": token_text.trim(),
            "public_key": key.public_key().to_text(),
            "proof": api_auth::sign_enroll(key, token_text),
        });
        let body =
            serde_json::to_vec(&body).map_err(|e| ApiClientError::BadResponse(e.to_string()))?;
        self.exchange("POST", "/v1/enroll", &[], &body)?.into_json()
    }

    /// Sends a request signed by `key` with the current time and a fresh random nonce.
    pub fn signed(
        &self,
        key: &DeviceSigningKey,
        method: &str,
        path: &str,
        body: &[u8],
    ) -> Result<ApiResponse, ApiClientError> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_err(|_| ApiClientError::Clock)?
            .as_secs();
        let mut nonce = [0u8; 16];
        getrandom::getrandom(&mut nonce).map_err(ApiClientError::Random)?;
        let headers = api_auth::sign_request(key, method, path, body, now, nonce);
        self.send_signed(&headers, method, path, body)
    }

    /// Sends a request with the given authentication headers as they are (tests use this
    /// to replay a request or to send a stale one).
    pub fn send_signed(
        &self,
        headers: &SignedHeaders,
        method: &str,
        path: &str,
        body: &[u8],
    ) -> Result<ApiResponse, ApiClientError> {
        let extra: Vec<(&str, String)> = headers.to_headers().into_iter().collect();
        self.exchange(method, path, &extra, body)
    }

    /// One HTTP/1.1 request on a fresh pinned TLS connection (`Connection: close`).
    pub fn exchange(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, String)],
        body: &[u8],
    ) -> Result<ApiResponse, ApiClientError> {
        let addr_text = self.url.host_header();
        let connect_err = |error| ApiClientError::Connect {
            addr: addr_text.clone(),
            error,
        };
        let addrs: Vec<_> = (self.url.host.as_str(), self.url.port)
            .to_socket_addrs()
            .map_err(connect_err)?
            .collect();
        let mut last = std::io::Error::new(std::io::ErrorKind::NotFound, "no address found");
        let mut tcp = None;
        for a in addrs {
            match TcpStream::connect_timeout(&a, CONNECT_TIMEOUT) {
                Ok(s) => {
                    tcp = Some(s);
                    break;
                }
                Err(e) => last = e,
            }
        }
        let tcp = tcp.ok_or_else(|| connect_err(last))?;
        tcp.set_read_timeout(Some(IO_TIMEOUT))?;
        tcp.set_write_timeout(Some(IO_TIMEOUT))?;
        let server_name = match self.url.host.parse::<IpAddr>() {
            Ok(ip) => ServerName::IpAddress(ip.into()),
            Err(_) => ServerName::try_from(self.url.host.clone())
                .map_err(|_| ApiClientError::BadUrl(self.url.host.clone()))?,
        };
        let conn = ClientConnection::new(Arc::clone(&self.tls), server_name)?;
        let mut tls = StreamOwned::new(conn, tcp);
        let mut request = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nUser-Agent: postern/{}\r\nAccept: application/json\r\nConnection: close\r\nContent-Length: {}\r\n",
            self.url.host_header(),
            env!("CARGO_PKG_VERSION"),
            body.len()
        );
        if !body.is_empty() {
            request.push_str("Content-Type: application/json\r\n");
        }
        for (name, value) in headers {
            request.push_str(&format!("{name}: {value}\r\n"));
        }
        request.push_str("\r\n");
        let sent = tls
            .write_all(request.as_bytes())
            .and_then(|()| tls.write_all(body))
            .and_then(|()| tls.flush());
        if let Err(e) = sent {
            return Err(self.pin_error().unwrap_or(ApiClientError::Io(e)));
        }
        read_response(&mut tls).map_err(|e| match e {
            ApiClientError::Io(io) => self.pin_error().unwrap_or(ApiClientError::Io(io)),
            other => other,
        })
    }

    fn pin_error(&self) -> Option<ApiClientError> {
        let presented = self.verifier.take_mismatch()?;
        Some(ApiClientError::PinMismatch {
            pinned: hex::encode(self.pin),
            presented,
        })
    }
}

/// Reads one response: status line, headers, then `Content-Length` bytes (or to EOF).
fn read_response(stream: &mut impl Read) -> Result<ApiResponse, ApiClientError> {
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = [0u8; 8192];
    let mut head: Option<(usize, u16, Option<usize>)> = None;
    loop {
        if let Some((start, _, Some(len))) = head {
            if buf.len() >= start + len {
                break;
            }
        }
        let n = match stream.read(&mut chunk) {
            Ok(n) => n,
            // A peer that closes without close_notify after a complete response is fine.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && head.is_some() => 0,
            Err(e) => return Err(e.into()),
        };
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.len() > MAX_RESPONSE_BYTES {
            return Err(ApiClientError::BadResponse(format!(
                "response over {MAX_RESPONSE_BYTES} bytes"
            )));
        }
        if head.is_none() {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let (status, len) = parse_head(&buf[..end])?;
                head = Some((end + 4, status, len));
            }
        }
    }
    let (start, status, len) = head
        .ok_or_else(|| ApiClientError::BadResponse("connection closed before a response".into()))?;
    let mut body = buf.split_off(start);
    if let Some(len) = len {
        if body.len() < len {
            return Err(ApiClientError::BadResponse(
                "response body cut short".into(),
            ));
        }
        body.truncate(len);
    }
    Ok(ApiResponse { status, body })
}

/// Status code and Content-Length of a response head (chunked bodies are refused: the
/// controller always sends a length).
fn parse_head(head: &[u8]) -> Result<(u16, Option<usize>), ApiClientError> {
    let text = std::str::from_utf8(head)
        .map_err(|_| ApiClientError::BadResponse("response head is not UTF-8".into()))?;
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .strip_prefix("HTTP/1.1 ")
        .or_else(|| status_line.strip_prefix("HTTP/1.0 "))
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse::<u16>().ok())
        .ok_or_else(|| ApiClientError::BadResponse(format!("bad status line {status_line:?}")))?;
    let mut len = None;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let name = name.trim().to_ascii_lowercase();
        if name == "content-length" {
            len = Some(value.trim().parse::<usize>().map_err(|_| {
                ApiClientError::BadResponse(format!("bad Content-Length {value:?}"))
            })?);
        } else if name == "transfer-encoding" {
            return Err(ApiClientError::BadResponse(
                "chunked responses are not supported".into(),
            ));
        }
    }
    Ok((status, len))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    #[test]
    fn controller_urls_parse() {
        let u = ControllerUrl::parse("https://127.0.0.1:8443").expect("v4");
        assert_eq!((u.host.as_str(), u.port), ("127.0.0.1", 8443));
        let u = ControllerUrl::parse("https://[::1]:9/").expect("v6");
        assert_eq!((u.host.as_str(), u.port), ("::1", 9));
        assert_eq!(u.host_header(), "[::1]:9");
        let u = ControllerUrl::parse("https://ctl.example.org").expect("default port");
        assert_eq!(u.port, 443);
        for bad in [
            "http://127.0.0.1:1",
            "https://",
            "https://h:0",
            "https://h:x",
            "https://h/path",
            "https://[::1",
            "https://u@h:1",
        ] {
            assert!(ControllerUrl::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn response_head_and_body_are_read_by_length() {
        let raw = b"HTTP/1.1 401 Unauthorized\r\ncontent-type: application/json\r\ncontent-length: 14\r\n\r\n{\"error\":\"no\"}extra";
        let r = read_response(&mut &raw[..]).expect("parse");
        assert_eq!(r.status, 401);
        assert_eq!(r.error_message(), "no");
        let chunked = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n";
        assert!(read_response(&mut &chunked[..]).is_err());
        assert!(read_response(&mut &b"garbage"[..]).is_err());
    }

    #[test]
    fn controller_file_is_private() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = ControllerConfig::path_beside(&dir.path().join("device.key"));
        let cfg = ControllerConfig {
            url: "https://127.0.0.1:1".into(),
            cert_sha256: "ab".repeat(32),
            device_id: "00".repeat(16),
        };
        cfg.write(&path).expect("write");
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(ControllerConfig::read(&path).expect("read"), cfg);
        assert_eq!(cfg.pin().expect("pin"), [0xab; 32]);
    }
}
