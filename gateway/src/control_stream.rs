//! One connection of the control-channel stream protocol, over any transport
//! (docs/control-channel.md, "Stream").
//!
//! Owns: the `hello` with the held revision, reading the controller's lines (`snapshot`,
//! `delta`, `heartbeat`, `error`), applying a delta to the snapshot in force (base and
//! digest checked by `delta::apply`; the base is read back from `snapshot.json`, so the
//! registry is held in memory once, as the indexed view), publishing each applied revision (registry view, sync
//! state, `snapshot.json`, the `sync` audit line), the 15 s liveness limit, and sending the
//! session board's list as `sessions` reports (after each change, at most 5 per second,
//! at least every 30 s). Reading and writing share one thread: reads are polled with a
//! short socket timeout ([`POLL`]) and the board is checked between them, so no report
//! waits for a controller line and no read waits for a report. Must not connect,
//! reconnect or back off (sync.rs), nor touch TLS (control_tls.rs).

use std::io::{ErrorKind, Read, Write};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use postern_protocol::control::{ControllerMessage, GatewayMessage, Hello, MAX_LINE};
use postern_protocol::delta;
use postern_protocol::snapshot::Snapshot;
use serde_json::json;

use crate::audit::AuditLog;
use crate::registry::RegistryView;
use crate::session_board::SessionBoard;
use crate::status::SyncState;
use crate::sync::SharedView;
use crate::unix_ms;

/// The socket read timeout the caller sets: how often the loop looks at the session board
/// and the stop flag while the controller is silent.
pub const POLL: Duration = Duration::from_millis(50);
/// No line from the controller for this long: the link is dead.
pub const SILENCE_LIMIT: Duration = Duration::from_secs(15);
/// At most 5 session reports per second.
pub const MIN_REPORT_GAP: Duration = Duration::from_millis(200);
/// A session report at least this often (the controller drops a gateway silent for 60 s).
pub const REPORT_EVERY: Duration = Duration::from_secs(30);

/// Why a connection ended (other than a stop request).
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("control channel I/O: {0}")]
    Io(std::io::Error),
    #[error("the controller closed the connection")]
    Closed,
    #[error("no line from the controller for {} s: treating the link as dead", .0.as_secs())]
    Silent(Duration),
    #[error("the controller refused the connection ({code}): {message}")]
    Refused { code: String, message: String },
    #[error("{0}; asking for a full snapshot")]
    Resync(String),
    #[error("the controller sent {0}")]
    Protocol(String),
}

// Manual: the I/O error is printed in the message, not chained (`{:#}` would repeat it).
impl From<std::io::Error> for StreamError {
    fn from(e: std::io::Error) -> Self {
        StreamError::Io(e)
    }
}

/// What the sync thread holds across connections. Not the snapshot itself: the delta
/// base is `snapshot.json`, read back when a delta arrives (at 100,000 devices a parsed
/// `Snapshot` is ~23 MB of heap that would sit beside the ~36 MB view; BENCHMARKS.md).
#[derive(Debug, Default)]
pub struct Held {
    /// The revision in force (persisted at start, or the last applied).
    pub revision: Option<u64>,
    /// The controller has sent or confirmed a revision since this process started.
    pub answered: bool,
    /// The revision `snapshot.json` holds (written by this process, or loaded at start).
    pub persisted: Option<u64>,
    /// The next `hello` asks for a full snapshot (after a delta could not be applied).
    pub force_full: bool,
}

impl Held {
    /// What `hello.after_revision` says: the revision in force, when a delta can be
    /// applied to it (its file is there and no full snapshot was asked for).
    pub fn after_revision(&self) -> Option<u64> {
        if self.force_full || self.persisted != self.revision {
            None
        } else {
            self.revision
        }
    }

    /// The snapshot in force, read back from `state_dir/snapshot.json` (the delta base).
    /// `Err` says why there is none (the caller then asks for a full snapshot).
    fn base(&self, state_dir: &Path) -> Result<Snapshot, String> {
        let Some(revision) = self.after_revision() else {
            return Err("no snapshot is held to apply it to".into());
        };
        match crate::snapshot_file::load(state_dir) {
            Ok(Some(p)) if p.snapshot.revision == revision => Ok(p.snapshot),
            Ok(Some(p)) => Err(format!(
                "the persisted snapshot holds revision {}, not {revision}",
                p.snapshot.revision
            )),
            Ok(None) => Err("the persisted snapshot is gone".into()),
            Err(e) => Err(e.to_string()),
        }
    }
}

/// What one connection works with.
#[derive(Debug)]
pub struct StreamContext<'a> {
    pub state_dir: &'a Path,
    pub view: &'a SharedView,
    pub state: &'a SyncState,
    pub audit: &'a AuditLog,
    pub stop: &'a AtomicBool,
    pub sessions: &'a SessionBoard,
    /// `hello.name` (Unix socket only).
    pub name: Option<String>,
    /// No line for this long: the link is dead ([`SILENCE_LIMIT`]; shorter in tests).
    pub silence_limit: Duration,
}

/// Lines from a polled reader (partial lines are kept across timeouts).
#[derive(Debug, Default)]
struct LineReader {
    buf: Vec<u8>,
    /// Bytes of `buf` already known to hold no newline.
    scanned: usize,
    /// When bytes last arrived (a long line in transit is not silence).
    last_bytes: Option<Instant>,
}

impl LineReader {
    /// The next complete line (without the newline), `None` when the read timed out.
    fn poll_line(&mut self, r: &mut impl Read) -> Result<Option<Vec<u8>>, StreamError> {
        if let Some(line) = self.take_line() {
            return Ok(Some(line));
        }
        let mut chunk = [0u8; 16 * 1024];
        match r.read(&mut chunk) {
            Ok(0) => Err(StreamError::Closed),
            Ok(n) => {
                self.last_bytes = Some(Instant::now());
                self.buf.extend_from_slice(&chunk[..n]);
                match self.take_line() {
                    Some(line) => Ok(Some(line)),
                    None if self.buf.len() > MAX_LINE => Err(StreamError::Protocol(format!(
                        "a line longer than {MAX_LINE} bytes"
                    ))),
                    None => Ok(None),
                }
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => Ok(None),
            Err(e) if e.kind() == ErrorKind::Interrupted => Ok(None),
            Err(e) if e.kind() == ErrorKind::UnexpectedEof => Err(StreamError::Closed),
            Err(e) => Err(StreamError::Io(e)),
        }
    }

    fn take_line(&mut self) -> Option<Vec<u8>> {
        let Some(found) = self.buf[self.scanned..].iter().position(|&b| b == b'\n') else {
            // Scan each byte once: a long line arriving in many reads stays linear.
            self.scanned = self.buf.len();
            return None;
        };
        let pos = found + self.scanned;
        let rest = self.buf.split_off(pos + 1);
        let mut line = std::mem::replace(&mut self.buf, rest);
        line.truncate(pos);
        self.scanned = 0;
        Some(line)
    }
}

fn send(stream: &mut impl Write, message: &GatewayMessage) -> Result<(), StreamError> {
    let mut line =
        serde_json::to_vec(message).map_err(|e| StreamError::Io(std::io::Error::other(e)))?;
    line.push(b'\n');
    stream.write_all(&line)?;
    stream.flush()?;
    Ok(())
}

/// When the session writer sends next.
#[derive(Debug)]
struct ReportPacer {
    sent_generation: Option<u64>,
    last_sent: Option<Instant>,
}

impl ReportPacer {
    fn due(&self, generation: u64, now: Instant) -> bool {
        match self.last_sent {
            None => true,
            Some(t) if now.duration_since(t) >= REPORT_EVERY => true,
            Some(t) => {
                self.sent_generation != Some(generation) && now.duration_since(t) >= MIN_REPORT_GAP
            }
        }
    }
}

/// Runs one connection until it fails or `ctx.stop` is set (`Ok`). The caller has set the
/// transport's read timeout to [`POLL`] and a bounded write timeout. `delivered` is set
/// once the controller sent a snapshot, a delta or a heartbeat on this connection.
pub fn follow(
    stream: &mut (impl Read + Write),
    ctx: &StreamContext<'_>,
    held: &mut Held,
    delivered: &mut bool,
) -> Result<(), StreamError> {
    // The digest names exactly the base deltas will be applied to; no readable base:
    // ask for a full snapshot.
    let digest = match held.after_revision() {
        None => None,
        Some(_) => {
            let held_now: &Held = held;
            let read = crate::heap::in_scratch_arena(|| {
                held_now
                    .base(ctx.state_dir)
                    .map(|base| delta::digest(&base))
            });
            crate::heap::release_free_memory();
            if read.is_err() {
                held.force_full = true;
            }
            read.ok()
        }
    };
    send(
        stream,
        &GatewayMessage::Hello(Hello {
            version: 1,
            after_revision: held.after_revision(),
            digest,
            name: ctx.name.clone(),
        }),
    )?;
    let mut lines = LineReader::default();
    let mut last_line = Instant::now();
    let mut pacer = ReportPacer {
        sent_generation: None,
        last_sent: None,
    };
    while !ctx.stop.load(Ordering::Relaxed) {
        let (generation, list) = ctx.sessions.current();
        if pacer.due(generation, Instant::now()) {
            let line = crate::session_board::report_line(&list, unix_ms());
            drop(list);
            stream.write_all(&line)?;
            pacer.sent_generation = Some(generation);
            pacer.last_sent = Some(Instant::now());
        }
        let Some(line) = lines.poll_line(stream)? else {
            let heard = lines.last_bytes.map_or(last_line, |t| t.max(last_line));
            if heard.elapsed() >= ctx.silence_limit {
                return Err(StreamError::Silent(ctx.silence_limit));
            }
            continue;
        };
        last_line = Instant::now();
        let arrival = Arrival {
            at_ms: unix_ms(),
            at: last_line,
        };
        // Parsed in a scratch arena (heap.rs): the records of a full snapshot are garbage
        // once the view is built from them.
        let parsed = crate::heap::in_scratch_arena(|| serde_json::from_slice(&line));
        let bytes = line.len();
        drop(line);
        let message: ControllerMessage = parsed.map_err(|e| {
            StreamError::Protocol(format!("a line that is not a control message: {e}"))
        })?;
        match message {
            ControllerMessage::Snapshot(snapshot) => {
                held.force_full = false;
                publish(ctx, held, snapshot, false, bytes, arrival);
                *delivered = true;
            }
            ControllerMessage::Delta(d) => {
                let (from, to) = (d.from, d.to);
                let held_now: &Held = held;
                let applied = crate::heap::in_scratch_arena(|| {
                    let base = held_now
                        .base(ctx.state_dir)
                        .map_err(|e| format!("a delta from revision {from} arrived but {e}"))?;
                    delta::apply(&base, &d)
                        .map_err(|e| format!("delta {from}→{to} not applied: {e}"))
                });
                let next = applied.map_err(|e| {
                    held.force_full = true;
                    StreamError::Resync(e)
                })?;
                publish(ctx, held, next, true, bytes, arrival);
                *delivered = true;
            }
            ControllerMessage::Heartbeat(hb) => {
                *delivered = true;
                confirm(ctx, held, hb.revision);
            }
            ControllerMessage::Error(e) => {
                return Err(StreamError::Refused {
                    code: e.code,
                    message: e.message,
                })
            }
            ControllerMessage::Enrolled(_) => {
                return Err(StreamError::Protocol(
                    "`enrolled` on a stream connection".into(),
                ))
            }
        }
    }
    Ok(())
}

/// A heartbeat: the link is alive. When it names the held revision it also confirms the
/// view (a persisted one becomes the controller's; the first confirmation is audited).
fn confirm(ctx: &StreamContext<'_>, held: &mut Held, revision: u64) {
    let Some(held_revision) = held.revision else {
        return;
    };
    if held_revision != revision && !held.answered {
        return; // a delta or snapshot follows
    }
    ctx.state.contact(held_revision, unix_ms());
    if !held.answered {
        held.answered = true;
        let current = ctx.view.load();
        if let Some(view) = current.as_deref() {
            ctx.audit.event(
                unix_ms(),
                "sync",
                json!({ "revision": held_revision, "devices": view.device_count(), "policy_mode": view.policy_mode(), "access_records": view.access_count(), "warnings": 0, "connected": true, "since_contact_secs": 0, "persisted": held.persisted == Some(held_revision), "delta": false, "confirmed": true, "from": held_revision, "to": held_revision, "bytes": 0 }),
            );
        }
    }
}

/// When a controller line arrived, for the stage times of the `sync` audit line.
#[derive(Debug, Clone, Copy)]
struct Arrival {
    /// Unix ms (comparable with the controller's and an admin's clock on one host).
    at_ms: u64,
    at: Instant,
}

/// Makes `snapshot` the one in force: view first (the knock path sees it at once), then
/// the sync state, the file, the audit line.
fn publish(
    ctx: &StreamContext<'_>,
    held: &mut Held,
    snapshot: Snapshot,
    delta: bool,
    bytes: usize,
    arrival: Arrival,
) {
    let from = held.revision;
    // Parsing the line (and reading the base and applying a delta) took this long.
    let parse_ms = arrival.at.elapsed().as_millis() as u64;
    let view_started = Instant::now();
    let (next, warnings) = {
        let previous = ctx.view.load();
        RegistryView::from_snapshot_after(&snapshot, previous.as_deref())
    };
    let view_ms = view_started.elapsed().as_millis() as u64;
    for w in &warnings {
        tracing::warn!(revision = snapshot.revision, "{w}");
    }
    tracing::info!(
        revision = next.revision,
        from,
        delta,
        bytes,
        devices = next.device_count(),
        "registry revision applied"
    );
    let revision = next.revision;
    let mut record = json!({ "revision": revision, "devices": next.device_count(), "policy_mode": next.policy_mode(), "access_records": next.access_count(), "warnings": warnings.len(), "connected": true, "since_contact_secs": 0, "delta": delta, "from": from, "to": revision, "bytes": bytes, "received_at_ms": arrival.at_ms, "parse_ms": parse_ms, "view_ms": view_ms });
    let replaced = ctx.view.swap(Some(Arc::new(next)));
    record["in_force_at_ms"] = json!(unix_ms());
    ctx.state.contact(revision, unix_ms());
    let first_answer = !held.answered;
    held.answered = true;
    let persist_started = Instant::now();
    let persisted = persist(ctx.state_dir, &snapshot, held, first_answer);
    record["persisted"] = json!(persisted);
    record["persist_ms"] = json!(persist_started.elapsed().as_millis() as u64);
    held.revision = Some(revision);
    // Its records were allocated in the scratch arena: freed there, that arena shrinks.
    crate::heap::drop_in_scratch_arena(snapshot);
    // The knock path may still hold the replaced view for a moment; its big tables are
    // mapped blocks of their own, unmapped whenever the last holder lets go.
    drop(replaced);
    crate::heap::release_free_memory();
    ctx.audit.event(unix_ms(), "sync", record);
}

/// Writes `snapshot` to `state_dir/snapshot.json` unless this revision is already there
/// (`force`: the first answer since start, whose content may differ from a persisted file
/// of the same revision). Returns whether the file now holds this revision.
fn persist(state_dir: &Path, snapshot: &Snapshot, held: &mut Held, force: bool) -> bool {
    if !force && held.persisted == Some(snapshot.revision) {
        return true;
    }
    match crate::snapshot_file::save(state_dir, snapshot, unix_ms()) {
        Ok(()) => {
            held.persisted = Some(snapshot.revision);
            true
        }
        Err(e) => {
            // An older file must not outlive a newer view (it may still admit a device
            // revoked since): without a current file a restart starts with no view.
            let removed = std::fs::remove_file(state_dir.join(crate::snapshot_file::SNAPSHOT_FILE));
            tracing::warn!(revision = snapshot.revision, dir = %state_dir.display(), error = %e, old_file_removed = removed.is_ok(), "the snapshot could not be persisted; a restart without the controller would start with no registry view");
            held.persisted = None;
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_survive_timeouts_and_split_reads() {
        struct Chunks(Vec<Option<&'static [u8]>>);
        impl Read for Chunks {
            fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
                match self.0.remove(0) {
                    Some(c) => {
                        buf[..c.len()].copy_from_slice(c);
                        Ok(c.len())
                    }
                    None => Err(std::io::Error::from(ErrorKind::WouldBlock)),
                }
            }
        }
        let mut r = Chunks(vec![
            Some(b"{\"a\""),
            None,
            Some(b":1}\n{\"b\":2}\n{"),
            None,
            Some(b"}\n"),
            Some(b""),
        ]);
        let mut lines = LineReader::default();
        assert_eq!(lines.poll_line(&mut r).expect("partial"), None);
        // Each byte is scanned once (a long line in many reads stays linear), and bytes
        // without a newline still count as hearing from the controller.
        assert_eq!(lines.scanned, 4);
        assert!(lines.last_bytes.is_some());
        assert_eq!(lines.poll_line(&mut r).expect("timeout"), None);
        assert_eq!(
            lines.poll_line(&mut r).expect("line").as_deref(),
            Some(&b"{\"a\":1}"[..])
        );
        assert_eq!(
            lines.poll_line(&mut r).expect("buffered").as_deref(),
            Some(&b"{\"b\":2}"[..])
        );
        assert_eq!(lines.poll_line(&mut r).expect("timeout"), None);
        assert_eq!(
            lines.poll_line(&mut r).expect("line").as_deref(),
            Some(&b"{}"[..])
        );
        assert!(matches!(lines.poll_line(&mut r), Err(StreamError::Closed)));
    }

    use std::io::{BufRead, BufReader};
    use std::os::unix::net::UnixStream;

    use postern_protocol::control::{ChannelError, Heartbeat};
    use postern_protocol::snapshot::{AppProtocol, AppRecord};

    fn snapshot(revision: u64, apps: &[&str]) -> Snapshot {
        Snapshot {
            revision,
            apps: apps
                .iter()
                .enumerate()
                .map(|(i, name)| AppRecord {
                    name: (*name).to_owned(),
                    protocol: AppProtocol::Tcp,
                    port: 1000 + i as u16,
                    forward: None,
                })
                .collect(),
            ..Snapshot::default()
        }
    }

    fn line(message: &ControllerMessage) -> String {
        format!(
            "{}\n",
            serde_json::to_string(message).expect("serializable")
        )
    }

    struct Harness {
        dir: tempfile::TempDir,
        view: SharedView,
        state: SyncState,
        audit: AuditLog,
        stop: AtomicBool,
        board: Arc<SessionBoard>,
    }

    impl Harness {
        fn new() -> Harness {
            let dir = tempfile::tempdir().expect("tempdir");
            let audit = AuditLog::open(&crate::config::AuditTarget::File(
                dir.path().join("audit.log"),
            ))
            .expect("audit log");
            Harness {
                dir,
                view: Arc::new(arc_swap::ArcSwapOption::empty()),
                state: SyncState::default(),
                audit,
                stop: AtomicBool::new(false),
                board: SessionBoard::new(),
            }
        }

        fn ctx(&self) -> StreamContext<'_> {
            StreamContext {
                state_dir: self.dir.path(),
                view: &self.view,
                state: &self.state,
                audit: &self.audit,
                stop: &self.stop,
                sessions: &self.board,
                name: Some("edge-local".into()),
                silence_limit: Duration::from_millis(400),
            }
        }

        fn sync_lines(&self) -> Vec<serde_json::Value> {
            std::fs::read_to_string(self.dir.path().join("audit.log"))
                .unwrap_or_default()
                .lines()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .filter(|v| v["event"] == "sync")
                .collect()
        }
    }

    /// Runs `follow` against a scripted controller: `script` gets the controller's end
    /// after the hello line (returned too) was read.
    fn converse(
        h: &Harness,
        held: &mut Held,
        script: impl FnOnce(Hello, &mut BufReader<UnixStream>, &mut UnixStream) + Send,
    ) -> (Result<(), StreamError>, bool) {
        let (mut gateway, controller) = UnixStream::pair().expect("socketpair");
        gateway.set_read_timeout(Some(POLL)).expect("timeout");
        let mut delivered = false;
        let result = std::thread::scope(|s| {
            s.spawn(move || {
                let mut writer = controller.try_clone().expect("clone");
                let mut reader = BufReader::new(controller);
                let mut first = String::new();
                reader.read_line(&mut first).expect("hello line");
                let GatewayMessage::Hello(hello) = serde_json::from_str(&first).expect("hello")
                else {
                    panic!("first line is not hello: {first}");
                };
                script(hello, &mut reader, &mut writer);
            });
            let ended = follow(&mut gateway, &h.ctx(), held, &mut delivered);
            drop(gateway); // the scripted controller sees the hang-up before the join
            ended
        });
        (result, delivered)
    }

    #[test]
    fn snapshot_then_delta_then_a_bad_delta_forces_a_full_snapshot() {
        let h = Harness::new();
        let mut held = Held::default();
        let s1 = snapshot(1, &["web"]);
        let s2 = snapshot(2, &["web", "ssh"]);
        let good = delta::diff(&s1, &s2);
        let mut bad = delta::diff(&s2, &snapshot(3, &["dns"]));
        bad.digest = "00".repeat(32);
        let (s1c, s2c) = (s1.clone(), s2.clone());
        let (result, delivered) = converse(&h, &mut held, move |hello, reader, w| {
            assert_eq!(
                (hello.after_revision, hello.name.as_deref()),
                (None, Some("edge-local"))
            );
            // The first sessions report comes right after hello, before any controller line.
            let mut report = String::new();
            reader.read_line(&mut report).expect("report");
            assert!(report.starts_with("{\"sessions\""), "{report}");
            w.write_all(line(&ControllerMessage::Snapshot(s1c)).as_bytes())
                .expect("write");
            w.write_all(line(&ControllerMessage::Delta(good)).as_bytes())
                .expect("write");
            w.write_all(
                line(&ControllerMessage::Heartbeat(Heartbeat {
                    revision: 2,
                    at_ms: 1,
                }))
                .as_bytes(),
            )
            .expect("write");
            w.write_all(line(&ControllerMessage::Delta(bad)).as_bytes())
                .expect("write");
            let _ = s2c;
        });
        assert!(matches!(result, Err(StreamError::Resync(_))), "{result:?}");
        assert!(delivered);
        assert_eq!(held.revision, Some(2), "the good delta was applied");
        assert!(
            held.force_full && held.after_revision().is_none(),
            "next hello asks for a full snapshot"
        );
        assert_eq!(h.view.load().as_ref().map(|v| v.revision), Some(2));
        let persisted = crate::snapshot_file::load(h.dir.path())
            .expect("load")
            .expect("file");
        assert_eq!(
            persisted.snapshot, s2,
            "every applied revision is persisted"
        );
        let syncs = h.sync_lines();
        assert_eq!(syncs.len(), 2, "{syncs:?}");
        assert_eq!(
            (syncs[0]["delta"].clone(), syncs[0]["to"].clone()),
            (json!(false), json!(1))
        );
        assert_eq!(
            (
                syncs[1]["delta"].clone(),
                syncs[1]["from"].clone(),
                syncs[1]["to"].clone()
            ),
            (json!(true), json!(1), json!(2))
        );
    }

    #[test]
    fn resume_from_a_held_revision_and_a_refusal_ends_the_connection() {
        let h = Harness::new();
        let persisted = snapshot(7, &["web"]);
        // As the daemon does at start: the persisted snapshot is in force already.
        h.view
            .store(Some(Arc::new(RegistryView::from_snapshot(&persisted).0)));
        crate::snapshot_file::save(h.dir.path(), &persisted, 1).expect("persist");
        let mut held = Held {
            revision: Some(7),
            persisted: Some(7),
            ..Held::default()
        };
        let want_digest = delta::digest(&persisted);
        let (result, delivered) = converse(&h, &mut held, move |hello, reader, w| {
            assert_eq!(hello.after_revision, Some(7));
            assert_eq!(
                hello.digest,
                Some(want_digest),
                "the digest of the file's snapshot"
            );
            // The report the gateway sends right after its hello is read before the
            // controller's end closes, so that write cannot meet a broken pipe.
            let mut report = String::new();
            reader.read_line(&mut report).expect("first report");
            w.write_all(
                line(&ControllerMessage::Heartbeat(Heartbeat {
                    revision: 7,
                    at_ms: 1,
                }))
                .as_bytes(),
            )
            .expect("write");
            w.write_all(
                line(&ControllerMessage::Error(ChannelError {
                    code: "gateway_removed".into(),
                    message: "ask the admin".into(),
                }))
                .as_bytes(),
            )
            .expect("write");
        });
        let err = result.expect_err("refused").to_string();
        assert!(
            err.contains("gateway_removed") && err.contains("ask the admin"),
            "{err}"
        );
        assert!(delivered, "the heartbeat confirmed the held revision");
        assert!(held.answered);
        let syncs = h.sync_lines();
        assert_eq!(
            syncs.len(),
            1,
            "the confirmation is audited once: {syncs:?}"
        );
        assert_eq!(syncs[0]["confirmed"], true);
    }

    #[test]
    fn without_a_readable_base_file_the_hello_asks_for_a_full_snapshot() {
        // The delta base is snapshot.json: gone, or holding another revision (a failed
        // write removes it), the gateway must not claim a revision it cannot extend.
        for file in [None, Some(snapshot(6, &["web"]))] {
            let h = Harness::new();
            if let Some(s) = &file {
                crate::snapshot_file::save(h.dir.path(), s, 1).expect("persist");
            }
            let mut held = Held {
                revision: Some(7),
                persisted: Some(7),
                ..Held::default()
            };
            let (result, _) = converse(&h, &mut held, |hello, reader, _| {
                assert_eq!((hello.after_revision, hello.digest), (None, None));
                // Read the report that follows the hello before hanging up, so the
                // gateway's write cannot meet a broken pipe.
                let mut report = String::new();
                reader.read_line(&mut report).expect("first report");
            });
            assert!(matches!(result, Err(StreamError::Closed)), "{result:?}");
            assert!(held.force_full, "file {file:?}");
        }
    }

    #[test]
    fn a_session_change_is_reported_while_the_controller_is_silent() {
        let h = Harness::new();
        let mut held = Held::default();
        let board = Arc::clone(&h.board);
        let (result, delivered) = converse(&h, &mut held, move |_, reader, _| {
            let mut first = String::new();
            reader.read_line(&mut first).expect("first report");
            assert!(first.contains("\"sessions\":[]"), "{first}");
            board.publish(vec![crate::session_board::tests::session(5)]);
            let t = Instant::now();
            let mut second = String::new();
            reader.read_line(&mut second).expect("second report");
            assert!(second.contains("\"session\":5"), "{second}");
            assert!(
                t.elapsed() < Duration::from_secs(1),
                "reported within {:?}",
                t.elapsed()
            );
            // Dropping the controller's end closes the connection.
        });
        assert!(matches!(result, Err(StreamError::Closed)), "{result:?}");
        assert!(!delivered);
    }

    #[test]
    fn a_silent_controller_is_a_dead_link() {
        let h = Harness::new();
        let mut held = Held::default();
        let t = Instant::now();
        let (result, _) = converse(&h, &mut held, |_, reader, _| {
            // Read the gateway's lines until it hangs up; never answer.
            let mut sink = String::new();
            while reader.read_line(&mut sink).is_ok_and(|n| n > 0) {}
        });
        assert!(matches!(result, Err(StreamError::Silent(_))), "{result:?}");
        let waited = t.elapsed();
        assert!(
            waited >= Duration::from_millis(400) && waited < Duration::from_secs(2),
            "{waited:?}"
        );
    }

    #[test]
    fn reports_are_paced() {
        let t0 = Instant::now();
        let mut p = ReportPacer {
            sent_generation: None,
            last_sent: None,
        };
        assert!(p.due(0, t0), "the first report goes at once");
        p.sent_generation = Some(0);
        p.last_sent = Some(t0);
        assert!(!p.due(0, t0 + Duration::from_secs(29)), "nothing changed");
        assert!(p.due(0, t0 + REPORT_EVERY), "at least every 30 s");
        assert!(
            !p.due(1, t0 + Duration::from_millis(100)),
            "at most 5 per second"
        );
        assert!(p.due(1, t0 + MIN_REPORT_GAP), "a change goes after 200 ms");
    }
}
