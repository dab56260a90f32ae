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

use std::net::IpAddr;

use postern_protocol::snapshot::SessionKill;
use serde::Serialize;
use serde_json::Value;

use crate::audit::AuditLog;
use crate::pipeline::{GlobalSessionId, KnockPipeline, SessionEvent, SessionHex};
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
    /// The events being recorded, reused (no allocation per knock).
    events: Vec<SessionEvent>,
}

impl SessionReporter {
    pub fn new(gateway: String, board: Arc<SessionBoard>) -> SessionReporter {
        SessionReporter {
            gateway,
            board,
            dirty: false,
            next_publish: Instant::now(),
            applied_kills: BTreeSet::new(),
            events: Vec::new(),
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
        pipeline.move_session_events_into(&mut self.events);
        if self.events.is_empty() {
            return;
        }
        self.dirty = true;
        for event in &self.events {
            let more = extra
                .get(&event.info().session.0)
                .and_then(Value::as_object);
            audit.record(
                ts_ms,
                event.name(),
                &lifecycle_fields(&self.gateway, event),
                more,
            );
        }
        self.events.clear();
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

/// The fields of one lifecycle audit line (without `ts_ms` and `event`), borrowed from the
/// event: rendered straight into the audit line (no JSON tree, no allocation).
#[derive(Debug, Serialize)]
pub struct LifecycleFields<'a> {
    /// Six lowercase hex digits.
    session: SessionHex,
    /// `GATEWAY:HEXID`, what `session kill` takes ([`GlobalSessionId`]).
    session_id: GlobalSessionId<'a>,
    device: &'a str,
    device_name: &'a str,
    user: &'a str,
    app: &'a str,
    source: IpAddr,
    opened_at_ms: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    renewed_at_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    expires_at_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    closed_at_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    duration_ms: Option<u64>,
}

/// The fields of `event`'s audit line, reported under `gateway`'s name.
pub fn lifecycle_fields<'a>(gateway: &'a str, event: &'a SessionEvent) -> LifecycleFields<'a> {
    let info = event.info();
    let mut fields = LifecycleFields {
        session: SessionHex(info.session),
        session_id: GlobalSessionId(gateway, info.session),
        device: &info.who.device,
        device_name: &info.who.device_name,
        user: &info.who.user,
        app: &info.who.app,
        source: info.source,
        opened_at_ms: info.opened_at_ms,
        renewed_at_ms: None,
        expires_at_ms: None,
        reason: None,
        closed_at_ms: None,
        duration_ms: None,
    };
    match event {
        SessionEvent::Opened(_) => fields.expires_at_ms = Some(info.expires_at_ms),
        SessionEvent::Renewed(_) => {
            fields.renewed_at_ms = Some(info.renewed_at_ms);
            fields.expires_at_ms = Some(info.expires_at_ms);
        }
        SessionEvent::Closed {
            reason,
            closed_at_ms,
            ..
        } => {
            fields.reason = Some(reason);
            fields.closed_at_ms = Some(*closed_at_ms);
            fields.duration_ms = Some(closed_at_ms.saturating_sub(info.opened_at_ms));
        }
    }
    fields
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::{close_reason, global_session_id, SessionInfo, Who};
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
        let line = |gateway: &str, event: &SessionEvent| {
            serde_json::to_value(lifecycle_fields(gateway, event)).expect("serializable")
        };
        let opened = line("edge-1", &SessionEvent::Opened(info()));
        assert_eq!(
            global_session_id("edge-1", info().session),
            opened["session_id"],
            "the line's id is what `session kill` takes"
        );
        assert_eq!(opened["session"], "000abc");
        assert_eq!(opened["session_id"], "edge-1:000abc");
        assert_eq!(opened["device_name"], "laptop");
        assert_eq!(opened["source"], "10.1.1.1");
        assert_eq!(opened["expires_at_ms"], 61_500);
        let renewed = line("edge-1", &SessionEvent::Renewed(info()));
        assert_eq!(renewed["renewed_at_ms"], 1_500);
        let closed = line(
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
