//! The session board: the decision thread's live sessions, published for the sync thread.
//!
//! Owns: the latest complete list of live sessions and a change counter the sync thread
//! waits on, so the controller's `session list` sees a gateway's sessions within a
//! fraction of a second, and the `sessions` report line made from that list. The list
//! holds the decision thread's own session records (their strings are shared with the
//! registry view, so publishing 100,000 sessions copies no string); the report is
//! serialized from it in one pass, straight into the line, on the sync thread. The
//! decision thread publishes after each change (open, renew, close, expiry); the sync
//! thread reads. Must not decide anything or touch the firewall; publishing never blocks
//! on the reader.

use std::io::Write;
use std::net::IpAddr;
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::Duration;

use postern_protocol::control::{LiveSession, MAX_GATEWAY_LINE, MAX_REPORTED_SESSIONS};
use serde::Serialize;

use crate::pipeline::SessionInfo;

/// One live session on the board: the lifecycle record and how it is held.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BoardSession {
    pub info: SessionInfo,
    /// `lease` or `verdict` (`Hold::as_str`).
    pub mode: &'static str,
}

impl BoardSession {
    /// The protocol record the controller receives for this session.
    pub fn to_live(&self) -> LiveSession {
        let i = &self.info;
        LiveSession {
            session: i.session.0,
            device: i.who.device.to_string(),
            device_name: i.who.device_name.to_string(),
            user: i.who.user.to_string(),
            app: i.who.app.to_string(),
            source: i.source.to_string(),
            mode: self.mode.to_owned(),
            opened_at_ms: i.opened_at_ms,
            renewed_at_ms: i.renewed_at_ms,
            expires_at_ms: i.expires_at_ms,
        }
    }

    fn as_wire(&self) -> WireSession<'_> {
        let i = &self.info;
        WireSession {
            session: i.session.0,
            device: &i.who.device,
            device_name: &i.who.device_name,
            user: &i.who.user,
            app: &i.who.app,
            source: i.source,
            mode: self.mode,
            opened_at_ms: i.opened_at_ms,
            renewed_at_ms: i.renewed_at_ms,
            expires_at_ms: i.expires_at_ms,
        }
    }
}

/// [`LiveSession`]'s JSON, borrowed (an `IpAddr` serializes as its text in JSON).
#[derive(Serialize)]
struct WireSession<'a> {
    session: u32,
    device: &'a str,
    device_name: &'a str,
    user: &'a str,
    app: &'a str,
    source: IpAddr,
    mode: &'a str,
    opened_at_ms: u64,
    renewed_at_ms: u64,
    expires_at_ms: u64,
}

/// The `sessions` line (`GatewayMessage::Sessions`, newline included) for `list`: at most
/// [`MAX_REPORTED_SESSIONS`] sessions and no more bytes than the controller accepts (with
/// room for the envelope); the rest are counted in `omitted`. Each session is serialized
/// once, into the line.
pub fn report_line(list: &[BoardSession], at_ms: u64) -> Vec<u8> {
    let budget = MAX_GATEWAY_LINE - 64 * 1024;
    let mut out = Vec::with_capacity(64 + list.len().min(MAX_REPORTED_SESSIONS) * 256);
    // Writes to a Vec cannot fail; a session that cannot be serialized is left out.
    let _ = write!(out, "{{\"sessions\":{{\"at_ms\":{at_ms},\"sessions\":[");
    let mut kept = 0usize;
    for s in list.iter().take(MAX_REPORTED_SESSIONS) {
        let mark = out.len();
        if kept > 0 {
            out.push(b',');
        }
        if serde_json::to_writer(&mut out, &s.as_wire()).is_err() || out.len() > budget {
            out.truncate(mark);
            break;
        }
        kept += 1;
    }
    let omitted = list.len() - kept;
    let _ = writeln!(out, "],\"omitted\":{omitted}}}}}");
    out
}

/// Latest published live-session list with a change counter.
#[derive(Debug, Default)]
pub struct SessionBoard {
    inner: Mutex<Published>,
    changed: Condvar,
}

#[derive(Debug, Default)]
struct Published {
    generation: u64,
    sessions: Arc<Vec<BoardSession>>,
}

impl SessionBoard {
    pub fn new() -> Arc<SessionBoard> {
        Arc::new(SessionBoard::default())
    }

    /// Replaces the published list (complete, any order) and wakes waiting readers.
    pub fn publish(&self, sessions: Vec<BoardSession>) {
        let sessions = Arc::new(sessions);
        let mut p = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        p.generation += 1;
        let old = std::mem::replace(&mut p.sessions, sessions);
        drop(p);
        self.changed.notify_all();
        drop(old); // freed outside the lock
    }

    /// The current generation and list.
    pub fn current(&self) -> (u64, Arc<Vec<BoardSession>>) {
        let p = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        (p.generation, Arc::clone(&p.sessions))
    }

    /// Waits until the generation differs from `seen` or `timeout` passes; returns the
    /// current generation and list either way.
    pub fn wait_change(&self, seen: u64, timeout: Duration) -> (u64, Arc<Vec<BoardSession>>) {
        let p = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let (p, _) = self
            .changed
            .wait_timeout_while(p, timeout, |p| p.generation == seen)
            .unwrap_or_else(PoisonError::into_inner);
        (p.generation, Arc::clone(&p.sessions))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::pipeline::Who;
    use postern_firewall::SessionId;
    use postern_protocol::control::GatewayMessage;

    /// A board session and the protocol record it must report as.
    pub(crate) fn session(id: u32) -> BoardSession {
        BoardSession {
            info: SessionInfo {
                session: SessionId(id),
                who: Who {
                    device: "0".repeat(32).into(),
                    device_name: "laptop \"x\"\n".into(),
                    user: "alice".into(),
                    app: "ssh".into(),
                },
                source: if id.is_multiple_of(2) {
                    "10.0.0.2".parse().expect("literal")
                } else {
                    "fd00::2".parse().expect("literal")
                },
                opened_at_ms: 1,
                renewed_at_ms: 2,
                expires_at_ms: 3,
            },
            mode: "lease",
        }
    }

    #[test]
    fn a_reader_wakes_on_publish_and_times_out_without() {
        let board = SessionBoard::new();
        let (g0, list) = board.current();
        assert!(list.is_empty());
        let (g, _) = board.wait_change(g0, Duration::from_millis(10));
        assert_eq!(
            g, g0,
            "nothing published: same generation after the timeout"
        );
        let b = Arc::clone(&board);
        let writer = std::thread::spawn(move || b.publish(vec![session(5)]));
        let (g1, list) = board.wait_change(g0, Duration::from_secs(5));
        writer.join().expect("writer thread does not panic");
        assert_ne!(g1, g0);
        assert_eq!(list.as_slice(), &[session(5)]);
    }

    #[test]
    fn the_report_line_is_the_protocol_message() {
        for n in [0u32, 1, 3] {
            let list: Vec<BoardSession> = (1..=n).map(session).collect();
            let line = report_line(&list, 42);
            assert_eq!(line.last(), Some(&b'\n'));
            assert_eq!(line.iter().filter(|&&b| b == b'\n').count(), 1, "one line");
            let parsed: GatewayMessage =
                serde_json::from_slice(&line).expect("the controller's parser accepts it");
            let GatewayMessage::Sessions(report) = parsed else {
                panic!("not a sessions message");
            };
            assert_eq!(report.at_ms, 42);
            assert_eq!(report.omitted, 0);
            assert_eq!(
                report.sessions,
                list.iter().map(BoardSession::to_live).collect::<Vec<_>>()
            );
        }
    }

    #[test]
    fn the_report_stops_at_the_line_budget_and_counts_the_rest() {
        // Long names make each session ~4 KiB: the 16 MiB line holds ~4,000 of them.
        let mut s = session(1);
        s.info.who.device_name = "n".repeat(4000).into();
        let list = vec![s; 5000];
        let line = report_line(&list, 1);
        assert!(line.len() <= MAX_GATEWAY_LINE, "{} bytes", line.len());
        let GatewayMessage::Sessions(report) =
            serde_json::from_slice(&line).expect("a valid message")
        else {
            panic!("not a sessions message");
        };
        assert!(report.omitted > 0 && !report.sessions.is_empty());
        assert_eq!(report.sessions.len() as u64 + report.omitted, 5000);
    }
}
