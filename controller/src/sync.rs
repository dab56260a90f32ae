//! `serve`: the gateway sync server on a Unix socket (long-poll snapshot protocol).
//!
//! Protocol (one JSON object per line, both directions; the connection is reused):
//! the gateway sends `{"after_revision": N}`; the controller answers `{"snapshot": {...}}`
//! at once if its revision differs from N (or if `after_revision` is absent/null), else
//! holds the request until the revision changes or the hold time (10 s) passes, then
//! answers with the current snapshot (a heartbeat). A malformed or over-long request line
//! is answered with `{"error": "..."}` and the connection is closed.
//! A connection whose first line is a stream-protocol message (`{"hello": …}`,
//! docs/control-channel.md) is handed to `gateway_channel`, which serves it like a TLS
//! gateway (the name is `hello.name`, default `local`).
//!
//! Owns: the socket file (created 0600 without a permission race, stale file removed only
//! if nothing listens on it, removed again on a clean stop), the revision watcher thread
//! and one thread per connection. (Time alone needs no revision bump: gateways evaluate
//! the policy themselves, docs/policy.md.) Must not touch: registry rows (read-only via `Registry`)
//! or signal registration (the binary passes in a stop flag).

use std::fs::{self, DirBuilder, Permissions};
use std::io::{self, BufRead, BufReader, ErrorKind, Read, Write};
use std::net::Shutdown;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};

use crate::admin::{AdminServer, AdminServerConfig};
use crate::gateway_channel::{self, ChannelConfig, ChannelStartError, GatewayChannel, UnixHandoff};
use crate::proto::snapshot::Snapshot;
use crate::registry::{Registry, RegistryError};
use postern_protocol::control::{ChannelError, ControllerMessage, GatewayMessage};

/// Default time a request is held when nothing changes.
pub const DEFAULT_HOLD: Duration = Duration::from_secs(10);
/// How often the watcher reads the revision from the database.
pub const POLL_INTERVAL: Duration = Duration::from_millis(50);
/// Longest accepted request line, newline included.
pub const MAX_REQUEST_LINE: usize = 4096;
/// Concurrent connections beyond this are answered with an error and closed.
pub const MAX_CONNECTIONS: usize = 64;
/// At most this much unread input is discarded before closing a refused connection.
const DRAIN_LIMIT: u64 = 64 * 1024;
/// A connection that sends nothing for this long is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// A response that cannot be written within this time closes the connection.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// `serve` settings.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub db: PathBuf,
    pub socket: PathBuf,
    pub hold: Duration,
    /// The admin socket (see `admin`); `None` serves gateways only.
    pub admin_socket: Option<PathBuf>,
    /// `--gateway-listen`: the TLS control channel for remote gateways.
    pub gateway_listen: Option<std::net::SocketAddr>,
    /// The API identity's directory (the TLS channel's certificate).
    pub api_dir: PathBuf,
    /// A stream gateway silent this long is dropped (`gateway_channel::READ_SILENCE`).
    pub gateway_read_silence: Duration,
}

/// Why the server could not start or had to stop.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error("another controller is already listening on {}: stop it, or pass another --socket / --admin-socket", .0.display())]
    AlreadyRunning(PathBuf),
    #[error("{} exists and is not a socket: remove it, or pass another --socket / --admin-socket", .0.display())]
    NotASocket(PathBuf),
    #[error("socket {}: {source}", path.display())]
    Socket { path: PathBuf, source: io::Error },
    #[error(transparent)]
    Channel(#[from] ChannelStartError),
}

/// A gateway request line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyncRequest {
    /// The revision the gateway already has; absent or null means "none yet".
    #[serde(default)]
    pub after_revision: Option<u64>,
}

impl SyncRequest {
    /// Parses one request line: exactly one JSON object. (Serde's derived parser would
    /// also take an array such as `[5]` as the struct's fields in order.)
    pub fn parse(line: &[u8]) -> Result<SyncRequest, String> {
        if line.trim_ascii_start().first() != Some(&b'{') {
            return Err("a request is one JSON object".to_owned());
        }
        serde_json::from_slice(line).map_err(|e| e.to_string())
    }
}

/// A controller response line: `{"snapshot": ...}` or `{"error": "..."}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SyncResponse {
    Snapshot(Snapshot),
    Error(String),
}

/// Latest revision seen by the watcher; connection threads wait on it, and the gateway
/// channel's tasks (`gateway_channel`) follow it through `notify`.
#[derive(Debug)]
struct Watch {
    state: Mutex<u64>,
    changed: Condvar,
    notify: tokio::sync::watch::Sender<u64>,
}

impl Watch {
    fn new(rev: u64) -> Self {
        Watch {
            state: Mutex::new(rev),
            changed: Condvar::new(),
            notify: tokio::sync::watch::Sender::new(rev),
        }
    }

    fn publish(&self, rev: u64) {
        let mut cur = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if *cur != rev {
            *cur = rev;
            self.changed.notify_all();
            self.notify.send_replace(rev);
        }
    }

    /// Waits until the watched revision is greater than `after`, `hold` passes or `stop`
    /// is set. Revisions only grow, so "greater" is "changed since the caller's read".
    fn wait_past(&self, after: u64, hold: Duration, stop: &AtomicBool) {
        let deadline = Instant::now() + hold;
        let mut cur = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        while *cur <= after && !stop.load(Ordering::Relaxed) {
            let now = Instant::now();
            if now >= deadline {
                return;
            }
            // Wake at least every poll interval to notice `stop`.
            let wait = (deadline - now).min(POLL_INTERVAL * 4);
            cur = self
                .changed
                .wait_timeout(cur, wait)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }
}

/// The bound socket; removes its file on drop if the file is still this socket.
#[derive(Debug)]
pub(crate) struct BoundSocket {
    pub(crate) listener: UnixListener,
    path: PathBuf,
    ino: (u64, u64),
}

impl Drop for BoundSocket {
    fn drop(&mut self) {
        if let Ok(m) = fs::symlink_metadata(&self.path) {
            if (m.dev(), m.ino()) == self.ino {
                if let Err(e) = fs::remove_file(&self.path) {
                    warn!(path = %self.path.display(), error = %e, "could not remove socket file");
                }
            }
        }
    }
}

/// Runs the sync server until `stop` becomes true, then removes the socket file.
pub fn serve(cfg: &ServeConfig, stop: Arc<AtomicBool>) -> Result<(), SyncError> {
    // Open (and migrate) once up front so a bad --db fails before the socket appears.
    let registry = Registry::open(&cfg.db)?;
    let watch = Arc::new(Watch::new(registry.revision()?));
    // The gateway channel and the admin socket first: once the gateway socket answers,
    // all are up.
    let channel = GatewayChannel::start(
        &ChannelConfig {
            db: cfg.db.clone(),
            listen: cfg.gateway_listen,
            api_dir: cfg.api_dir.clone(),
            read_silence: cfg.gateway_read_silence,
        },
        watch.notify.subscribe(),
        Arc::clone(&stop),
    )?;
    let handoff = channel.unix_handoff();
    let admin = match &cfg.admin_socket {
        Some(path) => match spawn_admin(cfg, path, &watch, &stop) {
            Ok(a) => Some(a),
            Err(e) => {
                stop.store(true, Ordering::Relaxed);
                channel.join();
                return Err(e);
            }
        },
        None => None,
    };
    let bound = match bind(&cfg.socket) {
        Ok(b) => b,
        Err(e) => {
            stop.store(true, Ordering::Relaxed);
            if let Some(admin) = admin {
                let _ = admin.join();
            }
            channel.join();
            return Err(e);
        }
    };
    info!(socket = %cfg.socket.display(), db = %cfg.db.display(), revision = registry.revision()?, "controller serving");

    let watcher = {
        let watch = Arc::clone(&watch);
        let stop = Arc::clone(&stop);
        thread::Builder::new()
            .name("revision-watch".into())
            .spawn(move || watch_revision(registry, &watch, &stop))
            .map_err(|source| SyncError::Socket {
                path: cfg.socket.clone(),
                source,
            })?
    };

    let active = Arc::new(AtomicUsize::new(0));
    while !stop.load(Ordering::Relaxed) {
        match bound.listener.accept() {
            Ok((stream, _)) => {
                let n = active.fetch_add(1, Ordering::SeqCst) + 1;
                let guard = ActiveGuard(Arc::clone(&active));
                if n > MAX_CONNECTIONS {
                    warn!(active = n - 1, "too many sync connections; refusing one");
                    let mut s = stream;
                    let _ = s.set_nonblocking(false);
                    let _ = s.set_write_timeout(Some(Duration::from_secs(1)));
                    let _ =
                        write_response(&mut s, &SyncResponse::Error("too many connections".into()));
                    continue;
                }
                let ctx = ConnCtx {
                    db: cfg.db.clone(),
                    hold: cfg.hold,
                    watch: Arc::clone(&watch),
                    stop: Arc::clone(&stop),
                    channel: handoff.clone(),
                };
                let spawned = thread::Builder::new()
                    .name("sync-conn".into())
                    .spawn(move || handle_connection(stream, &ctx, guard));
                if let Err(e) = spawned {
                    warn!(error = %e, "could not spawn connection thread");
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::Interrupted => {
                thread::sleep(POLL_INTERVAL);
            }
            Err(e) => {
                warn!(error = %e, "accept failed");
                thread::sleep(POLL_INTERVAL);
            }
        }
    }
    info!("stopping: removing socket");
    drop(bound);
    watch.changed.notify_all();
    let _ = watcher.join();
    if let Some(admin) = admin {
        let _ = admin.join();
    }
    drop(handoff);
    channel.join();
    Ok(())
}

/// Binds the admin socket and serves it on its own thread; after every command the new
/// revision is published to waiting gateways at once (not at the next poll).
fn spawn_admin(
    cfg: &ServeConfig,
    path: &Path,
    watch: &Arc<Watch>,
    stop: &Arc<AtomicBool>,
) -> Result<thread::JoinHandle<()>, SyncError> {
    let sock_err = |source: io::Error| SyncError::Socket {
        path: path.to_owned(),
        source,
    };
    let exe = std::env::current_exe().map_err(sock_err)?;
    // Absolute: the commands run in their caller's working directory.
    let db = fs::canonicalize(&cfg.db).map_err(sock_err)?;
    let server = AdminServer::bind(AdminServerConfig {
        socket: path.to_owned(),
        db,
        exe,
    })?;
    let registry = Registry::open(&cfg.db)?;
    let watch = Arc::clone(watch);
    let stop = Arc::clone(stop);
    thread::Builder::new()
        .name("admin".into())
        .spawn(move || {
            server.run(&stop, || {
                if let Ok(rev) = registry.revision() {
                    watch.publish(rev);
                }
            })
        })
        .map_err(sock_err)
}

#[derive(Debug)]
struct ActiveGuard(Arc<AtomicUsize>);
impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Binds `path` with mode 0600 and no window in which it is reachable with wider
/// permissions: bind inside a fresh 0700 directory, chmod, then rename into place.
pub(crate) fn bind(path: &Path) -> Result<BoundSocket, SyncError> {
    let sock_err = |source: io::Error| SyncError::Socket {
        path: path.to_owned(),
        source,
    };
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    };
    if !parent.exists() {
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&parent)
            .map_err(sock_err)?;
    }
    match fs::symlink_metadata(path) {
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => return Err(sock_err(e)),
        Ok(m) if m.file_type().is_socket() => match UnixStream::connect(path) {
            Ok(_) => return Err(SyncError::AlreadyRunning(path.to_owned())),
            Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
                info!(path = %path.display(), "removing stale socket file");
                fs::remove_file(path).map_err(sock_err)?;
            }
            Err(e) => return Err(sock_err(e)),
        },
        Ok(_) => return Err(SyncError::NotASocket(path.to_owned())),
    }
    let staging = parent.join(format!(".postern-controller-bind.{}", std::process::id()));
    if staging.exists() {
        fs::remove_dir_all(&staging).map_err(sock_err)?;
    }
    DirBuilder::new()
        .mode(0o700)
        .create(&staging)
        .map_err(sock_err)?;
    let tmp = staging.join("sock");
    let result = (|| {
        let listener = UnixListener::bind(&tmp)?;
        fs::set_permissions(&tmp, Permissions::from_mode(0o600))?;
        fs::rename(&tmp, path)?;
        listener.set_nonblocking(true)?;
        let m = fs::symlink_metadata(path)?;
        Ok(BoundSocket {
            listener,
            path: path.to_owned(),
            ino: (m.dev(), m.ino()),
        })
    })();
    let _ = fs::remove_file(&tmp);
    let _ = fs::remove_dir(&staging);
    result.map_err(sock_err)
}

fn watch_revision(registry: Registry, watch: &Watch, stop: &AtomicBool) {
    let mut failing = false;
    while !stop.load(Ordering::Relaxed) {
        match registry.revision() {
            Ok(rev) => {
                if failing {
                    info!("registry readable again");
                    failing = false;
                }
                watch.publish(rev);
            }
            Err(e) => {
                if !failing {
                    warn!(error = %e, "cannot read registry revision");
                    failing = true;
                }
            }
        }
        let woken = WATCHER_WAKE
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let (mut woken, _) = WATCHER_WAKE
            .1
            .wait_timeout_while(woken, POLL_INTERVAL, |w| !*w)
            .unwrap_or_else(PoisonError::into_inner);
        *woken = false;
    }
}

/// Set by [`wake_revision_watcher`]; the revision watcher waits on it between polls.
static WATCHER_WAKE: (Mutex<bool>, Condvar) = (Mutex::new(false), Condvar::new());

/// Makes the revision watcher read the revision now rather than at its next poll (up to
/// [`POLL_INTERVAL`] later): called by writers in this process that are not admin
/// commands (the client API's enrollment, MFA and posture writes).
pub fn wake_revision_watcher() {
    *WATCHER_WAKE
        .0
        .lock()
        .unwrap_or_else(PoisonError::into_inner) = true;
    WATCHER_WAKE.1.notify_all();
}

#[derive(Debug)]
struct ConnCtx {
    db: PathBuf,
    hold: Duration,
    watch: Arc<Watch>,
    stop: Arc<AtomicBool>,
    /// Where a connection that starts with `hello` goes (the stream protocol).
    channel: UnixHandoff,
}

enum Line {
    Request(Vec<u8>),
    Eof,
    TooLong,
    Truncated,
}

fn read_line(reader: &mut impl BufRead) -> io::Result<Line> {
    let mut buf = Vec::new();
    reader
        .take(MAX_REQUEST_LINE as u64 + 1)
        .read_until(b'\n', &mut buf)?;
    if buf.is_empty() {
        return Ok(Line::Eof);
    }
    if buf.last() == Some(&b'\n') {
        if buf.len() > MAX_REQUEST_LINE {
            return Ok(Line::TooLong);
        }
        buf.pop();
        return Ok(Line::Request(buf));
    }
    if buf.len() > MAX_REQUEST_LINE {
        Ok(Line::TooLong)
    } else {
        Ok(Line::Truncated)
    }
}

fn write_response(stream: &mut impl Write, resp: &SyncResponse) -> io::Result<()> {
    let mut line = serde_json::to_vec(resp).map_err(io::Error::other)?;
    line.push(b'\n');
    stream.write_all(&line)?;
    stream.flush()
}

fn handle_connection(stream: UnixStream, ctx: &ConnCtx, guard: ActiveGuard) {
    debug!("sync connection opened");
    match serve_connection(stream, ctx, guard) {
        Ok(()) => debug!("sync connection closed"),
        Err(e) => debug!(error = %e, "sync connection ended"),
    }
}

fn serve_connection(stream: UnixStream, ctx: &ConnCtx, guard: ActiveGuard) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(IDLE_TIMEOUT))?;
    stream.set_write_timeout(Some(WRITE_TIMEOUT))?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    let mut registry: Option<Registry> = None;
    let mut guard = Some(guard);
    let mut first = true;
    loop {
        let is_first = std::mem::replace(&mut first, false);
        let request = match read_line(&mut reader)? {
            Line::Eof => return Ok(()),
            Line::TooLong => {
                return refuse(
                    &mut writer,
                    &mut reader,
                    &format!("request line longer than {MAX_REQUEST_LINE} bytes"),
                )
            }
            Line::Truncated => {
                return refuse(
                    &mut writer,
                    &mut reader,
                    "request line not terminated by a newline",
                )
            }
            // The stream protocol (docs/control-channel.md): served by the gateway channel.
            Line::Request(bytes) if is_first && is_stream_protocol(&bytes) => {
                let hello = match gateway_channel::parse_line(&bytes) {
                    Ok(GatewayMessage::Hello(h)) => h,
                    Ok(_) => {
                        return refuse_stream(
                            &mut writer,
                            &mut reader,
                            "the first line must be hello (enroll is for the TLS channel)",
                        )
                    }
                    Err(e) => return refuse_stream(&mut writer, &mut reader, &e),
                };
                let buffered = reader.buffer().to_vec();
                drop(writer);
                ctx.channel
                    .serve(reader.into_inner(), buffered, hello, guard.take());
                return Ok(());
            }
            Line::Request(bytes) => match SyncRequest::parse(&bytes) {
                Ok(r) => r,
                Err(e) => {
                    return refuse(
                        &mut writer,
                        &mut reader,
                        &format!("malformed request: {e}; expected {{\"after_revision\": N}}"),
                    )
                }
            },
        };
        if registry.is_none() {
            registry = Some(Registry::open(&ctx.db).map_err(io::Error::other)?);
        }
        let Some(reg) = registry.as_mut() else {
            return Ok(());
        };
        if let Some(after) = request.after_revision {
            let current = reg.revision().map_err(io::Error::other)?;
            if current == after {
                ctx.watch.wait_past(after, ctx.hold, &ctx.stop);
            }
        }
        let resp = match reg.snapshot() {
            Ok(s) => {
                debug!(after = ?request.after_revision, revision = s.revision, "sending snapshot");
                SyncResponse::Snapshot(s)
            }
            Err(e) => {
                warn!(error = %e, "cannot read snapshot");
                return refuse(
                    &mut writer,
                    &mut reader,
                    "controller cannot read its registry",
                );
            }
        };
        write_response(&mut writer, &resp)?;
    }
}

/// True when the line is a stream-protocol message (`{"hello":…}` and the like) rather
/// than a long-poll request.
fn is_stream_protocol(line: &[u8]) -> bool {
    match serde_json::from_slice::<serde_json::Value>(line) {
        Ok(serde_json::Value::Object(map)) => map
            .keys()
            .any(|k| matches!(k.as_str(), "hello" | "enroll" | "sessions")),
        _ => false,
    }
}

/// Refuses a stream-protocol first line with the stream's error message and closes.
fn refuse_stream(writer: &mut UnixStream, reader: &mut impl Read, msg: &str) -> io::Result<()> {
    let error = ControllerMessage::Error(ChannelError {
        code: "bad_request".to_owned(),
        message: msg.to_owned(),
    });
    let mut line = serde_json::to_vec(&error).map_err(io::Error::other)?;
    line.push(b'\n');
    writer.write_all(&line)?;
    close_after_refusal(writer, reader)
}

/// Sends `{"error": msg}` and ends the connection. Unread input is drained (bounded) before
/// closing: closing a socket with unread data resets it, and the peer could lose the error.
fn refuse(writer: &mut UnixStream, reader: &mut impl Read, msg: &str) -> io::Result<()> {
    debug!(reason = msg, "refusing request");
    write_response(writer, &SyncResponse::Error(msg.to_owned()))?;
    close_after_refusal(writer, reader)
}

fn close_after_refusal(writer: &mut UnixStream, reader: &mut impl Read) -> io::Result<()> {
    writer.shutdown(Shutdown::Write)?;
    writer.set_read_timeout(Some(Duration::from_millis(200)))?;
    let _ = io::copy(&mut reader.take(DRAIN_LIMIT), &mut io::sink());
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn request_shapes() {
        let r: SyncRequest = serde_json::from_str(r#"{"after_revision":7}"#).unwrap();
        assert_eq!(r.after_revision, Some(7));
        let r: SyncRequest = serde_json::from_str(r#"{}"#).unwrap();
        assert_eq!(r.after_revision, None);
        assert!(serde_json::from_str::<SyncRequest>(r#"{"after":1}"#).is_err());
        assert!(serde_json::from_str::<SyncRequest>(r#"{"after_revision":-1}"#).is_err());
        assert_eq!(
            SyncRequest::parse(br#" {"after_revision":7}"#).map(|r| r.after_revision),
            Ok(Some(7))
        );
        for not_an_object in [&b"[5]"[..], b"[]", b"5", b"\"x\"", b"null", b""] {
            assert!(
                SyncRequest::parse(not_an_object).is_err(),
                "{not_an_object:?}"
            );
        }
    }

    #[test]
    fn response_shapes() {
        let e = serde_json::to_string(&SyncResponse::Error("x".into())).unwrap();
        assert_eq!(e, r#"{"error":"x"}"#);
        let s = SyncResponse::Snapshot(Snapshot {
            revision: 3,
            devices: vec![],
            apps: vec![],
            grants: vec![],
            access: None,
            denials: None,
            kills: None,
            policy: None,
            subjects: None,
        });
        let j = serde_json::to_string(&s).unwrap();
        assert!(j.starts_with(r#"{"snapshot":{"revision":3"#), "{j}");
    }

    #[test]
    fn line_cap() {
        let long = vec![b'a'; MAX_REQUEST_LINE + 10];
        assert!(matches!(read_line(&mut &long[..]).unwrap(), Line::TooLong));
        assert!(matches!(read_line(&mut &b"{}\n"[..]).unwrap(), Line::Request(v) if v == b"{}"));
        assert!(matches!(
            read_line(&mut &b"{}"[..]).unwrap(),
            Line::Truncated
        ));
        assert!(matches!(read_line(&mut &b""[..]).unwrap(), Line::Eof));
    }
}
