//! The admin socket: how the `postern-controller` CLI reaches a running controller.
//!
//! Owns: the socket's location (`<db>.admin.sock` unless `--admin-socket` says otherwise),
//! its wire format (one JSON request line, one JSON answer line), who may connect (root or
//! the controller's own user: mode 0600 plus a peer-credential check), and the rule that
//! admin commands run one at a time, each in a child process of the controller
//! (`postern-controller` itself, on the controller's database, with the caller's working
//! directory and arguments). The child is the same code path as a direct CLI call, so
//! validation, output and exit codes are identical either way; running it under the
//! controller serializes admin writes and lets the controller push the new revision to
//! gateways the moment the command returns.
//!
//! Must not touch: registry logic or command parsing (the child does both), the gateway
//! sync protocol (see `sync`).

use std::ffi::OsString;
use std::io::{self, BufRead, BufReader, ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::sync::{bind, SyncError};

/// Set in the child's environment: run the command on the database directly.
pub const DIRECT_ENV: &str = "POSTERN_ADMIN_DIRECT";
/// Set in the child's environment: who asked (recorded as the audit actor).
pub const ACTOR_ENV: &str = "POSTERN_ADMIN_ACTOR";
/// Longest accepted request line.
pub const MAX_REQUEST: usize = 256 * 1024;
/// A command running longer than this is killed and reported as failed.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a client waits for its command's answer (queueing included).
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(300);
const POLL: Duration = Duration::from_millis(20);

/// Where the admin socket of the controller serving `db` lives by default.
pub fn default_socket(db: &Path) -> PathBuf {
    let mut s = db.as_os_str().to_owned();
    s.push(".admin.sock");
    PathBuf::from(s)
}

/// One admin command, as the CLI was called.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AdminRequest {
    /// The CLI arguments after the program name, unchanged.
    pub argv: Vec<String>,
    /// The caller's working directory (relative paths in `argv` are resolved there).
    pub cwd: PathBuf,
}

/// What the command printed and how it exited.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AdminResponse {
    pub exit: i32,
    pub stdout: String,
    pub stderr: String,
}

impl AdminResponse {
    fn refused(msg: &str) -> Self {
        Self {
            exit: 1,
            stdout: String::new(),
            stderr: format!("error: {msg}\n"),
        }
    }
}

impl AdminRequest {
    /// Parses one request line; the error is a sentence for the caller.
    pub fn parse(line: &[u8]) -> Result<AdminRequest, String> {
        let req: AdminRequest = serde_json::from_slice(line)
            .map_err(|e| format!("admin request is not valid JSON of the expected shape: {e}"))?;
        if req.argv.first().is_some_and(|a| a == "serve") {
            return Err("`serve` cannot be run through the admin socket".into());
        }
        if !req.cwd.is_absolute() {
            return Err("admin request cwd must be an absolute path".into());
        }
        Ok(req)
    }
}

/// Why the CLI could not use the admin socket.
#[derive(Debug, thiserror::Error)]
pub enum AdminClientError {
    /// No controller is listening: the caller may work on the database directly.
    #[error("no controller is listening on {0}")]
    NotRunning(PathBuf),
    #[error("cannot use the controller's admin socket {path}: permission denied; run as root (the socket is 0600)")]
    PermissionDenied { path: PathBuf },
    #[error("admin socket {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("admin socket {path}: bad answer from the controller: {detail}")]
    BadAnswer { path: PathBuf, detail: String },
}

/// Sends `argv` to the controller listening on `socket` and waits for its answer.
pub fn call(socket: &Path, argv: &[OsString]) -> Result<AdminResponse, AdminClientError> {
    let io_err = |source: io::Error| AdminClientError::Io {
        path: socket.to_owned(),
        source,
    };
    let mut stream = match UnixStream::connect(socket) {
        Ok(s) => s,
        Err(e) if matches!(e.kind(), ErrorKind::NotFound | ErrorKind::ConnectionRefused) => {
            return Err(AdminClientError::NotRunning(socket.to_owned()))
        }
        Err(e) if e.kind() == ErrorKind::PermissionDenied => {
            return Err(AdminClientError::PermissionDenied {
                path: socket.to_owned(),
            })
        }
        Err(e) => return Err(io_err(e)),
    };
    let argv = argv
        .iter()
        .map(|a| {
            a.to_str()
                .map(str::to_owned)
                .ok_or_else(|| AdminClientError::BadAnswer {
                    path: socket.to_owned(),
                    detail: format!("argument {a:?} is not UTF-8"),
                })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let req = AdminRequest {
        argv,
        cwd: std::env::current_dir().map_err(io_err)?,
    };
    let mut line = serde_json::to_vec(&req).map_err(|e| AdminClientError::BadAnswer {
        path: socket.to_owned(),
        detail: e.to_string(),
    })?;
    line.push(b'\n');
    stream
        .set_read_timeout(Some(CLIENT_TIMEOUT))
        .map_err(io_err)?;
    stream.write_all(&line).map_err(io_err)?;
    let mut answer = Vec::new();
    BufReader::new(stream.take(64 * 1024 * 1024))
        .read_until(b'\n', &mut answer)
        .map_err(io_err)?;
    if answer.is_empty() {
        return Err(AdminClientError::BadAnswer {
            path: socket.to_owned(),
            detail: "the controller closed the connection without answering (did it stop?); the command may or may not have been applied: check with a list command".into(),
        });
    }
    serde_json::from_slice(&answer).map_err(|e| AdminClientError::BadAnswer {
        path: socket.to_owned(),
        detail: e.to_string(),
    })
}

/// What the admin server needs.
#[derive(Debug, Clone)]
pub struct AdminServerConfig {
    pub socket: PathBuf,
    pub db: PathBuf,
    /// The `postern-controller` executable to run commands with.
    pub exe: PathBuf,
}

/// A bound admin socket; `run` serves it until the stop flag is set.
#[derive(Debug)]
pub struct AdminServer {
    cfg: AdminServerConfig,
    bound: crate::sync::BoundSocket,
}

impl AdminServer {
    /// Binds the socket (0600, no window with wider permissions).
    pub fn bind(cfg: AdminServerConfig) -> Result<Self, SyncError> {
        let bound = bind(&cfg.socket)?;
        info!(socket = %cfg.socket.display(), "admin socket ready");
        Ok(Self { cfg, bound })
    }

    /// Serves commands one at a time until `stop`; `after_command` runs after each one
    /// (the controller publishes the new revision there).
    pub fn run(self, stop: &AtomicBool, after_command: impl Fn()) {
        let own_uid = rustix::process::geteuid().as_raw();
        while !stop.load(Ordering::Relaxed) {
            match self.bound.listener.accept() {
                Ok((stream, _)) => {
                    self.handle(stream, own_uid);
                    after_command();
                }
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {
                    thread::sleep(POLL);
                }
                Err(e) => {
                    warn!(error = %e, "admin accept failed");
                    thread::sleep(POLL);
                }
            }
        }
    }

    fn handle(&self, mut stream: UnixStream, own_uid: u32) {
        let _ = stream.set_nonblocking(false);
        let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
        let _ = stream.set_write_timeout(Some(Duration::from_secs(10)));
        let uid = match rustix::net::sockopt::socket_peercred(&stream) {
            Ok(cred) => cred.uid.as_raw(),
            Err(e) => {
                warn!(error = %e, "admin peer credentials unavailable; refusing");
                return;
            }
        };
        let resp = if uid != 0 && uid != own_uid {
            warn!(
                uid,
                "admin connection from a user that is neither root nor the controller's; refused"
            );
            AdminResponse::refused("permission denied: only root may use the admin socket")
        } else {
            match read_request(&mut stream) {
                Ok(req) => self.execute(&req, uid),
                Err(msg) => AdminResponse::refused(&msg),
            }
        };
        let mut line = match serde_json::to_vec(&resp) {
            Ok(l) => l,
            Err(e) => {
                warn!(error = %e, "admin answer not serializable");
                return;
            }
        };
        line.push(b'\n');
        if let Err(e) = stream.write_all(&line) {
            warn!(error = %e, "admin answer not delivered (client gone?)");
        }
    }

    fn execute(&self, req: &AdminRequest, uid: u32) -> AdminResponse {
        let started = Instant::now();
        let child = Command::new(&self.cfg.exe)
            .args(&req.argv)
            .current_dir(&req.cwd)
            .env(DIRECT_ENV, "1")
            .env(ACTOR_ENV, format!("admin:uid={uid}"))
            // The fallback `--db` of the child: the caller reached this socket through
            // the database path, so an explicit `--db` in argv names the same file.
            .env("POSTERN_DB", &self.cfg.db)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn();
        let mut child = match child {
            Ok(c) => c,
            Err(e) => {
                return AdminResponse::refused(&format!(
                    "controller could not run the command (cwd {}): {e}",
                    req.cwd.display()
                ))
            }
        };
        let out = child.stdout.take().map(drain);
        let err = child.stderr.take().map(drain);
        let status = loop {
            match child.try_wait() {
                Ok(Some(s)) => break Some(s),
                Ok(None) if started.elapsed() > COMMAND_TIMEOUT => {
                    let _ = child.kill();
                    let _ = child.wait();
                    break None;
                }
                Ok(None) => thread::sleep(Duration::from_millis(2)),
                Err(_) => break None,
            }
        };
        let stdout = out.and_then(|h| h.join().ok()).unwrap_or_default();
        let mut stderr = err.and_then(|h| h.join().ok()).unwrap_or_default();
        let exit = match status.and_then(|s| s.code()) {
            Some(code) => code,
            None => {
                stderr.push_str("error: the command was killed (timeout or signal)\n");
                1
            }
        };
        let words: Vec<&str> = req
            .argv
            .iter()
            .map(String::as_str)
            .filter(|a| !a.starts_with('-'))
            .take(2)
            .collect();
        info!(
            command = words.join(" "),
            uid,
            exit,
            ms = started.elapsed().as_millis() as u64,
            "admin command"
        );
        AdminResponse {
            exit,
            stdout,
            stderr,
        }
    }
}

fn drain(mut r: impl Read + Send + 'static) -> thread::JoinHandle<String> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = r.read_to_end(&mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    })
}

fn read_request(stream: &mut UnixStream) -> Result<AdminRequest, String> {
    let mut line = Vec::new();
    let mut reader = BufReader::new(stream.take(MAX_REQUEST as u64 + 1));
    reader
        .read_until(b'\n', &mut line)
        .map_err(|e| format!("reading the admin request: {e}"))?;
    if line.len() > MAX_REQUEST {
        return Err(format!("admin request longer than {MAX_REQUEST} bytes"));
    }
    AdminRequest::parse(&line)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_socket_sits_beside_the_database() {
        assert_eq!(
            default_socket(Path::new("/var/lib/postern/registry.db")),
            PathBuf::from("/var/lib/postern/registry.db.admin.sock")
        );
    }

    #[test]
    fn requests_are_strict() {
        assert!(AdminRequest::parse(br#"{"argv":["device","list"],"cwd":"/"}"#).is_ok());
        for bad in [
            &br#"{"argv":["serve","--socket","x"],"cwd":"/"}"#[..],
            br#"{"argv":["device","list"],"cwd":"relative"}"#,
            br#"{"argv":["device"],"cwd":"/","extra":1}"#,
            br#"["device"]"#,
            b"",
            b"\xff",
        ] {
            assert!(AdminRequest::parse(bad).is_err(), "{bad:?}");
        }
    }
}
