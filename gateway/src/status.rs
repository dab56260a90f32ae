//! The running gateway's controller connection state and its status file.
//!
//! Owns [`SyncState`] (what the sync thread knows: connected, last contact, the revision
//! enforced and where it came from), the status writer thread that rewrites
//! `STATE_DIR/status.json` once a second and on each sync change (atomically, mode 0600),
//! and reading that file back for `postern-gateway status`. Must not decide on knocks or
//! talk to the controller; the knock path only stores a session count into an atomic.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::atomic_file::write_atomic;
use crate::unix_ms;

/// The status file's name inside `state_dir`.
pub const STATUS_FILE: &str = "status.json";
/// How often the daemon rewrites the status file.
pub const WRITE_EVERY: Duration = Duration::from_secs(1);
/// A status file older than this means the daemon is not running (or is stuck).
pub const STALE_AFTER_MS: u64 = 5_000;

/// Where the registry view in force came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SnapshotSource {
    /// No snapshot: every knock is denied.
    None,
    /// Loaded from `state_dir/snapshot.json` at start; the controller has not answered yet.
    Persisted,
    /// Received from (or confirmed by) the controller since start.
    Controller,
}

impl SnapshotSource {
    pub fn as_str(self) -> &'static str {
        match self {
            SnapshotSource::None => "none",
            SnapshotSource::Persisted => "persisted",
            SnapshotSource::Controller => "controller",
        }
    }

    fn from_u8(v: u8) -> SnapshotSource {
        match v {
            1 => SnapshotSource::Persisted,
            2 => SnapshotSource::Controller,
            _ => SnapshotSource::None,
        }
    }
}

/// Shared between the sync thread (writer), the status writer and the decision loop.
#[derive(Debug, Default)]
pub struct SyncState {
    connected: AtomicBool,
    /// ms since the epoch of the last controller answer; 0: never since start.
    last_contact_ms: AtomicU64,
    revision: AtomicU64,
    has_revision: AtomicBool,
    source: AtomicU8,
    live_sessions: AtomicU64,
    /// Set on every change so the status writer rewrites the file at once.
    changed: AtomicBool,
}

impl SyncState {
    /// A controller answer arrived (a snapshot or a heartbeat) for `revision`.
    pub fn contact(&self, revision: u64, now_ms: u64) {
        if !self.connected.swap(true, Ordering::SeqCst) {
            // Reconnected (maybe at the same revision): the status file shows it at once.
            self.changed.store(true, Ordering::SeqCst);
        }
        self.last_contact_ms.store(now_ms, Ordering::SeqCst);
        self.set_view(revision, SnapshotSource::Controller);
    }

    /// The connection to the controller failed.
    pub fn disconnected(&self) {
        if self.connected.swap(false, Ordering::SeqCst) {
            self.changed.store(true, Ordering::SeqCst);
        }
    }

    /// The view in force is now `revision` from `source`.
    pub fn set_view(&self, revision: u64, source: SnapshotSource) {
        let old = (
            self.revision.swap(revision, Ordering::SeqCst),
            self.has_revision.swap(true, Ordering::SeqCst),
            self.source.swap(source as u8, Ordering::SeqCst),
        );
        if old != (revision, true, source as u8) {
            self.changed.store(true, Ordering::SeqCst);
        }
    }

    pub fn set_live_sessions(&self, n: usize) {
        self.live_sessions.store(n as u64, Ordering::Relaxed);
    }

    pub fn connected(&self) -> bool {
        self.connected.load(Ordering::SeqCst)
    }

    /// Whole seconds since the last controller answer (`None`: none since start).
    pub fn since_contact_secs(&self, now_ms: u64) -> Option<u64> {
        match self.last_contact_ms.load(Ordering::SeqCst) {
            0 => None,
            t => Some(now_ms.saturating_sub(t) / 1000),
        }
    }

    /// The status as of `now_ms`.
    pub fn status(&self, now_ms: u64) -> GatewayStatus {
        GatewayStatus {
            pid: std::process::id(),
            written_at_ms: now_ms,
            connected: self.connected(),
            revision: self
                .has_revision
                .load(Ordering::SeqCst)
                .then(|| self.revision.load(Ordering::SeqCst)),
            snapshot: SnapshotSource::from_u8(self.source.load(Ordering::SeqCst)),
            since_contact_secs: self.since_contact_secs(now_ms),
            live_sessions: self.live_sessions.load(Ordering::Relaxed),
        }
    }
}

/// The content of `status.json`, and what `postern-gateway status --json` prints.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GatewayStatus {
    pub pid: u32,
    pub written_at_ms: u64,
    pub connected: bool,
    /// The registry revision enforced (`None`: no snapshot, everything denied).
    pub revision: Option<u64>,
    pub snapshot: SnapshotSource,
    /// Seconds since the last controller answer (`None`: none since this start).
    pub since_contact_secs: Option<u64>,
    pub live_sessions: u64,
}

/// Starts the thread that rewrites `dir/status.json` every [`WRITE_EVERY`] and within
/// 100 ms of a sync change; it removes the file when `stop` is set.
pub fn spawn_writer(dir: PathBuf, state: Arc<SyncState>, stop: Arc<AtomicBool>) -> JoinHandle<()> {
    std::thread::Builder::new()
        .name("status-writer".into())
        .spawn(move || {
            let mut next = std::time::Instant::now();
            let mut failing = false;
            while !stop.load(Ordering::Relaxed) {
                let due = std::time::Instant::now() >= next;
                if due || state.changed.swap(false, Ordering::SeqCst) {
                    next = std::time::Instant::now() + WRITE_EVERY;
                    match write(&dir, &state.status(unix_ms())) {
                        Ok(()) => failing = false,
                        Err(e) if !failing => {
                            failing = true;
                            tracing::warn!(error = %e, "status file could not be written");
                        }
                        Err(_) => {}
                    }
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = std::fs::remove_file(dir.join(STATUS_FILE));
        })
        .unwrap_or_else(|e| panic!("spawning the status thread must succeed at start-up: {e}"))
}

fn write(dir: &Path, status: &GatewayStatus) -> std::io::Result<()> {
    let bytes = serde_json::to_vec(status).map_err(std::io::Error::other)?;
    write_atomic(dir, STATUS_FILE, &bytes)
}

/// What `postern-gateway status` found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Observed {
    /// A fresh status file of a live process.
    Running(GatewayStatus),
    /// No daemon: the file is missing, unreadable, its pid is gone, or it is stale.
    NotRunning(String),
}

/// Exit codes of `postern-gateway status` (documented in docs/operations.md).
pub const EXIT_CONNECTED: u8 = 0;
pub const EXIT_DISCONNECTED: u8 = 1;
pub const EXIT_NOT_RUNNING: u8 = 3;

/// Reads `dir/status.json` and judges whether the daemon that wrote it is alive.
pub fn observe(dir: &Path, now_ms: u64) -> Observed {
    let path = dir.join(STATUS_FILE);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Observed::NotRunning(format!(
                "gateway not running: no status file {}",
                path.display()
            ))
        }
        Err(e) => {
            return Observed::NotRunning(format!(
                "gateway status unknown: cannot read {}: {e}",
                path.display()
            ))
        }
    };
    let status: GatewayStatus = match serde_json::from_slice(&bytes) {
        Ok(s) => s,
        Err(e) => {
            return Observed::NotRunning(format!(
                "gateway status unknown: {} is not a status file: {e}",
                path.display()
            ))
        }
    };
    if !Path::new(&format!("/proc/{}", status.pid)).exists() {
        return Observed::NotRunning(format!(
            "gateway not running: pid {} from {} is gone",
            status.pid,
            path.display()
        ));
    }
    let age = now_ms.saturating_sub(status.written_at_ms);
    if age > STALE_AFTER_MS {
        return Observed::NotRunning(format!(
            "gateway not running or stuck: {} was last written {} s ago (pid {})",
            path.display(),
            age / 1000,
            status.pid
        ));
    }
    Observed::Running(status)
}

/// The one-line human form.
pub fn describe(status: &GatewayStatus) -> String {
    let revision = status
        .revision
        .map_or("none (denying everything)".to_owned(), |r| r.to_string());
    let contact = status
        .since_contact_secs
        .map_or("never since start".to_owned(), |s| format!("{s} s ago"));
    format!(
        "gateway running (pid {}): controller {}, revision {revision} (snapshot from {}), last contact {contact}, {} live sessions",
        status.pid,
        if status.connected { "connected" } else { "NOT connected" },
        status.snapshot.as_str(),
        status.live_sessions,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: u64 = 1_800_000_000_000;

    #[test]
    fn state_tracks_contact_and_source() {
        let s = SyncState::default();
        let st = s.status(T);
        assert_eq!(
            (st.connected, st.revision, st.snapshot),
            (false, None, SnapshotSource::None)
        );
        s.set_view(4, SnapshotSource::Persisted);
        assert_eq!(s.status(T).snapshot, SnapshotSource::Persisted);
        s.contact(5, T);
        s.disconnected();
        let st = s.status(T + 7_500);
        assert_eq!(
            (
                st.connected,
                st.revision,
                st.snapshot,
                st.since_contact_secs
            ),
            (false, Some(5), SnapshotSource::Controller, Some(7))
        );
    }

    #[test]
    fn observe_reports_missing_dead_stale_and_fresh() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(
            matches!(observe(dir.path(), T), Observed::NotRunning(m) if m.contains("no status file"))
        );
        let s = SyncState::default();
        s.contact(9, T);
        let mut st = s.status(T);
        write(dir.path(), &st).expect("write");
        assert_eq!(observe(dir.path(), T + 1000), Observed::Running(st.clone()));
        assert!(
            matches!(observe(dir.path(), T + STALE_AFTER_MS + 1), Observed::NotRunning(m) if m.contains("last written"))
        );
        st.pid = u32::MAX; // no such process
        write(dir.path(), &st).expect("write");
        assert!(matches!(observe(dir.path(), T), Observed::NotRunning(m) if m.contains("is gone")));
        std::fs::write(dir.path().join(STATUS_FILE), "{").expect("junk");
        assert!(
            matches!(observe(dir.path(), T), Observed::NotRunning(m) if m.contains("not a status file"))
        );
    }
}
