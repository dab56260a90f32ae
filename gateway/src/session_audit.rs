//! Session lifecycle reporting, on the decision thread: the `session_opened`,
//! `session_renewed` and `session_closed` audit lines, and the live-session list published
//! to the [`SessionBoard`] for the sync thread.
//!
//! Owns: those lines' fields (docs/operations.md, "Audit log") and the publication
//! throttle (the list is rebuilt only after a change, at most every
//! [`PUBLISH_EVERY`] while changes keep coming), and which admin kills this gateway has
//! already applied (each kill is applied once: the first revision that carries it). Must not decide which sessions open or
//! close (pipeline.rs and pipeline/lifecycle.rs), touch the firewall, or send anything to
//! the controller (the sync thread reads the board).

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use postern_protocol::snapshot::SessionKill;
use serde_json::{json, Map, Value};

use crate::audit::AuditLog;
use crate::pipeline::{global_session_id, KnockPipeline, SessionEvent};
use crate::session_board::SessionBoard;

/// Shortest interval between two publications while sessions keep changing.
pub const PUBLISH_EVERY: Duration = Duration::from_millis(200);

/// Writes lifecycle audit lines and publishes the live-session list.
#[derive(Debug)]
pub struct SessionReporter {
    /// The name sessions are reported and killed under (`Config::reporting_name`).
    gateway: String,
    board: Arc<SessionBoard>,
    /// A change happened that the board does not show yet.
    dirty: bool,
    next_publish: Instant,
    /// This gateway's kills already applied (those the latest view still carries).
    applied_kills: BTreeSet<SessionKill>,
}

impl SessionReporter {
    pub fn new(gateway: String, board: Arc<SessionBoard>) -> SessionReporter {
        SessionReporter {
            gateway,
            board,
            dirty: false,
            next_publish: Instant::now(),
            applied_kills: BTreeSet::new(),
        }
    }

    /// The name sessions are reported and killed under.
    pub fn gateway(&self) -> &str {
        &self.gateway
    }

    /// This gateway's kills in `kills` (a new view's) not applied before; remembers them
    /// as applied. Kills the view no longer carries are forgotten (bounded memory).
    pub fn fresh_kills(&mut self, kills: &[SessionKill]) -> Vec<SessionKill> {
        let mine: BTreeSet<&SessionKill> =
            kills.iter().filter(|k| k.gateway == self.gateway).collect();
        self.applied_kills.retain(|k| mine.contains(k));
        let fresh: Vec<SessionKill> = mine
            .into_iter()
            .filter(|k| !self.applied_kills.contains(*k))
            .cloned()
            .collect();
        self.applied_kills.extend(fresh.iter().cloned());
        fresh
    }

    /// Audits every lifecycle event the pipeline queued, each with `extra` fields for its
    /// session id (e.g. `revision`, `ok` of a close), and marks the board out of date.
    pub fn record(
        &mut self,
        audit: &AuditLog,
        pipeline: &mut KnockPipeline,
        extra: &HashMap<u32, Value>,
        ts_ms: u64,
    ) {
        let events = pipeline.take_session_events();
        if events.is_empty() {
            return;
        }
        self.dirty = true;
        for event in &events {
            let mut fields = lifecycle_fields(&self.gateway, event);
            if let Some(Value::Object(more)) = extra.get(&event.info().session.0) {
                fields.extend(more.clone());
            }
            audit.event(ts_ms, event.name(), Value::Object(fields));
        }
    }

    /// Publishes the live-session list if something changed and the last publication is
    /// at least [`PUBLISH_EVERY`] old. Call it on every turn of the decision loop.
    pub fn publish_if_due(&mut self, pipeline: &KnockPipeline, now_ms: u64) {
        if !self.dirty || Instant::now() < self.next_publish {
            return;
        }
        self.dirty = false;
        self.next_publish = Instant::now() + PUBLISH_EVERY;
        self.board.publish(pipeline.live_session_list(now_ms));
    }
}

/// The fields of one lifecycle audit line (without `ts_ms` and `event`).
pub fn lifecycle_fields(gateway: &str, event: &SessionEvent) -> Map<String, Value> {
    let info = event.info();
    let mut map = Map::new();
    let mut put = |k: &str, v: Value| {
        map.insert(k.to_owned(), v);
    };
    put("session", json!(format!("{:06x}", info.session.0)));
    put(
        "session_id",
        json!(global_session_id(gateway, info.session)),
    );
    put("device", json!(&*info.who.device));
    put("device_name", json!(&*info.who.device_name));
    put("user", json!(&*info.who.user));
    put("app", json!(&*info.who.app));
    put("source", json!(info.source.to_string()));
    put("opened_at_ms", json!(info.opened_at_ms));
    match event {
        SessionEvent::Opened(_) => {
            map.insert("expires_at_ms".into(), json!(info.expires_at_ms));
        }
        SessionEvent::Renewed(_) => {
            map.insert("renewed_at_ms".into(), json!(info.renewed_at_ms));
            map.insert("expires_at_ms".into(), json!(info.expires_at_ms));
        }
        SessionEvent::Closed {
            reason,
            closed_at_ms,
            ..
        } => {
            map.insert("reason".into(), json!(reason));
            map.insert("closed_at_ms".into(), json!(closed_at_ms));
            map.insert(
                "duration_ms".into(),
                json!(closed_at_ms.saturating_sub(info.opened_at_ms)),
            );
        }
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::{close_reason, SessionInfo, Who};
    use postern_firewall::SessionId;

    fn info() -> SessionInfo {
        SessionInfo {
            session: SessionId(0x00_0a_bc),
            who: Who {
                device: "ab".repeat(16).into(),
                device_name: "laptop".into(),
                user: "alice".into(),
                app: "ssh".into(),
            },
            source: "10.1.1.1".parse().expect("literal"),
            opened_at_ms: 1_000,
            renewed_at_ms: 1_500,
            expires_at_ms: 61_500,
        }
    }

    #[test]
    fn each_kill_is_fresh_once_and_only_for_this_gateway() {
        let mut r = SessionReporter::new("edge-1".into(), SessionBoard::new());
        let kill = |gateway: &str, session: u32| SessionKill {
            gateway: gateway.into(),
            session,
            at: 100,
            opened_at_ms: Some(99_000),
        };
        let view = vec![kill("edge-1", 5), kill("edge-2", 5), kill("edge-1", 6)];
        let fresh = r.fresh_kills(&view);
        assert_eq!(fresh, vec![kill("edge-1", 5), kill("edge-1", 6)]);
        assert!(r.fresh_kills(&view).is_empty(), "applied once");
        let later = vec![kill("edge-1", 6), kill("edge-1", 7)];
        assert_eq!(r.fresh_kills(&later), vec![kill("edge-1", 7)]);
        assert_eq!(
            r.applied_kills.len(),
            2,
            "kills the view dropped are forgotten"
        );
    }

    #[test]
    fn lines_name_the_session_both_ways_and_closed_lines_carry_the_duration() {
        let opened = lifecycle_fields("edge-1", &SessionEvent::Opened(info()));
        assert_eq!(opened["session"], "000abc");
        assert_eq!(opened["session_id"], "edge-1:000abc");
        assert_eq!(opened["device_name"], "laptop");
        assert_eq!(opened["source"], "10.1.1.1");
        assert_eq!(opened["expires_at_ms"], 61_500);
        let renewed = lifecycle_fields("edge-1", &SessionEvent::Renewed(info()));
        assert_eq!(renewed["renewed_at_ms"], 1_500);
        let closed = lifecycle_fields(
            "edge-1",
            &SessionEvent::Closed {
                info: info(),
                reason: close_reason::KILLED,
                closed_at_ms: 4_250,
            },
        );
        assert_eq!(closed["reason"], "killed");
        assert_eq!(closed["duration_ms"], 3_250);
        assert!(closed.get("expires_at_ms").is_none());
    }
}
