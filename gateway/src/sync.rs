//! Controller sync: keeps the gateway's registry view current.
//!
//! Owns the client side of the controller's long-poll protocol over its Unix socket
//! (`{"after_revision":N}` → `{"snapshot":{...}}`), reconnection with capped backoff,
//! and publishing each new `RegistryView` through an `ArcSwap` so the knock path reads
//! it without locks. Must not make knock decisions or touch the firewall.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
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

/// Starts the sync thread; it runs until `stop` is set.
pub fn spawn(
    socket: PathBuf,
    view: SharedView,
    audit: Arc<AuditLog>,
    stop: Arc<AtomicBool>,
) -> JoinHandle<()> {
    std::thread::Builder::new()
        .name("controller-sync".into())
        .spawn(move || run(&socket, &view, &audit, &stop))
        .unwrap_or_else(|e| panic!("spawning the sync thread must succeed at start-up: {e}"))
}

fn run(socket: &PathBuf, view: &SharedView, audit: &AuditLog, stop: &AtomicBool) {
    let mut backoff = Duration::from_millis(100);
    while !stop.load(Ordering::Relaxed) {
        match follow(socket, view, audit, stop) {
            Ok(()) => return,
            Err(e) => {
                tracing::warn!(socket = %socket.display(), error = %format!("{e:#}"), retry_ms = backoff.as_millis() as u64, "controller sync failed; keeping the last registry view");
                audit.event(
                    unix_ms(),
                    "sync_error",
                    json!({ "error": format!("{e:#}") }),
                );
            }
        }
        let mut slept = Duration::ZERO;
        while slept < backoff && !stop.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(50));
            slept += Duration::from_millis(50);
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// One connection: long-polls until an error or a stop request.
fn follow(socket: &PathBuf, view: &SharedView, audit: &AuditLog, stop: &AtomicBool) -> Result<()> {
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
        let after = view.load().as_ref().map_or(u64::MAX, |v| v.revision);
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
        if Some(snapshot.revision) == view.load().as_ref().map(|v| v.revision) {
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
        audit.event(
            unix_ms(),
            "sync",
            json!({ "revision": next.revision, "devices": next.device_count(), "policy_mode": next.policy_mode(), "access_records": next.access_count(), "warnings": warnings.len() }),
        );
        view.store(Some(Arc::new(next)));
    }
    Ok(())
}
