//! Controller sync: keeps the gateway's registry view current.
//!
//! Owns the client side of the controller's long-poll protocol over its Unix socket
//! (`{"after_revision":N}` → `{"snapshot":{...}}`), reconnection with capped backoff,
//! and publishing each new `RegistryView` through an `ArcSwap` so the knock path reads
//! it without locks. Must not make knock decisions or touch the firewall.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use arc_swap::ArcSwapOption;
use postern_protocol::snapshot::Snapshot;
use serde::Deserialize;
use serde_json::json;

use crate::audit::AuditLog;
use crate::registry::RegistryView;
use crate::status::SyncState;
use crate::unix_ms;

/// Longest a single controller answer may take (the controller holds a request ≤ 10 s).
const READ_TIMEOUT: Duration = Duration::from_secs(15);
/// Largest snapshot line accepted from the controller.
const MAX_LINE: u64 = 256 * 1024 * 1024;

#[derive(Deserialize)]
struct Reply {
    snapshot: Option<Snapshot>,
    error: Option<String>,
}

/// The shared, lock-free registry slot: `None` until the first snapshot arrives.
pub type SharedView = Arc<ArcSwapOption<RegistryView>>;

/// What the sync thread works with.
pub struct SyncContext {
    pub socket: PathBuf,
    /// Where the last snapshot is persisted (`snapshot.json`).
    pub state_dir: PathBuf,
    pub view: SharedView,
    pub state: Arc<SyncState>,
    pub audit: Arc<AuditLog>,
    pub stop: Arc<AtomicBool>,
}

impl std::fmt::Debug for SyncContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SyncContext")
            .field("socket", &self.socket)
            .field("state_dir", &self.state_dir)
            .finish_non_exhaustive()
    }
}

/// The sync thread's own memory across reconnects.
#[derive(Default)]
struct Progress {
    /// The controller has answered at least once since start: until then the view (if
    /// any) is the persisted one and the first request asks for a full snapshot.
    answered: bool,
    /// The revision last written to `snapshot.json` by this process.
    persisted: Option<u64>,
}

/// Starts the sync thread; it runs until `ctx.stop` is set.
pub fn spawn(ctx: SyncContext) -> JoinHandle<()> {
    std::thread::Builder::new()
        .name("controller-sync".into())
        .spawn(move || run(&ctx))
        .unwrap_or_else(|e| panic!("spawning the sync thread must succeed at start-up: {e}"))
}

fn run(ctx: &SyncContext) {
    let mut backoff = Duration::from_millis(100);
    let mut progress = Progress::default();
    while !ctx.stop.load(Ordering::Relaxed) {
        match follow(ctx, &mut progress) {
            Ok(()) => return,
            Err(e) => {
                ctx.state.disconnected();
                let now = unix_ms();
                let since_contact = ctx.state.since_contact_secs(now);
                let revision = ctx.view.load().as_ref().map(|v| v.revision);
                tracing::warn!(socket = %ctx.socket.display(), error = %format!("{e:#}"), retry_ms = backoff.as_millis() as u64, connected = false, revision, since_contact_secs = since_contact, "controller sync failed; keeping the last registry view");
                ctx.audit.event(
                    now,
                    "sync_error",
                    json!({ "error": format!("{e:#}"), "connected": false, "revision": revision, "since_contact_secs": since_contact }),
                );
            }
        }
        let mut slept = Duration::ZERO;
        while slept < backoff && !ctx.stop.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(50));
            slept += Duration::from_millis(50);
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// One connection: long-polls until an error or a stop request.
fn follow(ctx: &SyncContext, progress: &mut Progress) -> Result<()> {
    let SyncContext {
        socket,
        state_dir,
        view,
        state,
        audit,
        stop,
    } = ctx;
    let stream = UnixStream::connect(socket).with_context(|| {
        format!(
            "connect to controller socket {}: is `postern-controller serve` running?",
            socket.display()
        )
    })?;
    stream.set_read_timeout(Some(READ_TIMEOUT))?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    while !stop.load(Ordering::Relaxed) {
        let after = match view.load().as_ref() {
            Some(v) if progress.answered => v.revision,
            _ => u64::MAX, // a full snapshot now, even if a persisted one has its revision
        };
        writeln!(writer, "{}", json!({ "after_revision": after }))?;
        line.clear();
        let n = (&mut reader)
            .take(MAX_LINE)
            .read_line(&mut line)
            .context("read controller reply")?;
        if n == 0 {
            return Err(anyhow!("controller closed the connection"));
        }
        let reply: Reply =
            serde_json::from_str(&line).context("controller reply is not valid JSON")?;
        if let Some(err) = reply.error {
            return Err(anyhow!("controller refused the sync request: {err}"));
        }
        let snapshot = reply
            .snapshot
            .ok_or_else(|| anyhow!("controller reply has no snapshot"))?;
        let first_answer = !progress.answered;
        progress.answered = true;
        if !first_answer && Some(snapshot.revision) == view.load().as_ref().map(|v| v.revision) {
            state.contact(snapshot.revision, unix_ms());
            continue; // heartbeat: nothing changed
        }
        let (next, warnings) = RegistryView::from_snapshot(&snapshot);
        for w in &warnings {
            tracing::warn!(revision = snapshot.revision, "{w}");
        }
        tracing::info!(
            revision = next.revision,
            devices = next.device_count(),
            "registry snapshot loaded"
        );
        let revision = next.revision;
        let mut record = json!({ "revision": revision, "devices": next.device_count(), "policy_mode": next.policy_mode(), "access_records": next.access_count(), "warnings": warnings.len(), "connected": true, "since_contact_secs": 0 });
        view.store(Some(Arc::new(next)));
        state.contact(revision, unix_ms());
        // The knock path already has the new view; the disk write comes after it.
        let persisted = persist(state_dir, &snapshot, progress, first_answer);
        record["persisted"] = json!(persisted);
        audit.event(unix_ms(), "sync", record);
    }
    Ok(())
}

/// Writes `snapshot` to `state_dir/snapshot.json` unless this revision is already there
/// (`force`: the first answer since start, whose content may differ from a persisted file
/// of the same revision). Returns whether the file now holds this revision.
fn persist(state_dir: &Path, snapshot: &Snapshot, progress: &mut Progress, force: bool) -> bool {
    if !force && progress.persisted == Some(snapshot.revision) {
        return true;
    }
    match crate::snapshot_file::save(state_dir, snapshot, unix_ms()) {
        Ok(()) => {
            progress.persisted = Some(snapshot.revision);
            true
        }
        Err(e) => {
            // An older file must not outlive a newer view (it may still admit a device
            // revoked since): without a current file a restart starts with no view.
            let removed = std::fs::remove_file(state_dir.join(crate::snapshot_file::SNAPSHOT_FILE));
            tracing::warn!(revision = snapshot.revision, dir = %state_dir.display(), error = %e, old_file_removed = removed.is_ok(), "the snapshot could not be persisted; a restart without the controller would start with no registry view");
            progress.persisted = None;
            false
        }
    }
}
