//! Session lifecycle: when each live session opened, was renewed and closed, and why.
//!
//! Owns: the per-session record the session table keeps beside its id map (who, source,
//! opened/renewed times), the lifecycle events the daemon turns into `session_opened` /
//! `session_renewed` / `session_closed` audit lines and session-board publications, the
//! expiry sweep, admin kill matching (`Snapshot::kills`) and the live-session list
//! (`session_board::BoardSession`). Pure logic: no clock reads, no firewall, no audit writer.
//! Must not touch: the knock checks (pipeline.rs) or how a session id is chosen.

use std::net::IpAddr;

use crate::session_board::BoardSession;
use postern_firewall::SessionId;
use postern_protocol::snapshot::SessionKill;
use serde::Serialize;

use super::{KnockPipeline, SessionTable, Who};
use crate::registry::RegistryView;

/// Why a session closed (the `reason` of its `session_closed` audit line).
pub mod close_reason {
    /// The device sent a CLOSE knock.
    pub const CLIENT_CLOSE: &str = "client_close";
    /// A new registry revision no longer allows it (device revoked, grant gone...).
    pub const REGISTRY_CHANGE: &str = "registry_change";
    /// Its access record's `until` passed (policy mode, checked every second).
    pub const ACCESS_EXPIRED: &str = "access_expired";
    /// An admin killed it (`postern-controller session kill`).
    pub const KILLED: &str = "killed";
    /// The lease ran out without a renewing knock (noticed by the sweep).
    pub const EXPIRED: &str = "expired";
    /// It reached the maximum session length (`max_session_secs`).
    pub const MAX_SESSION_LENGTH: &str = "max_session_length";
}

/// What the table remembers about one live session besides its key and expiry.
#[derive(Debug, Clone)]
pub(super) struct SessionRecord {
    who: Who,
    source: IpAddr,
    opened_at_ms: u64,
    renewed_at_ms: u64,
}

/// One live session as the lifecycle events and the session list describe it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionInfo {
    pub session: SessionId,
    pub who: Who,
    /// The client address the session admits.
    pub source: IpAddr,
    pub opened_at_ms: u64,
    pub renewed_at_ms: u64,
    /// When it ends unless renewed (for a closed session: when it closed).
    pub expires_at_ms: u64,
}

/// A change in the set of live sessions, in the order it happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionEvent {
    Opened(SessionInfo),
    Renewed(SessionInfo),
    Closed {
        info: SessionInfo,
        /// One of [`close_reason`].
        reason: &'static str,
        closed_at_ms: u64,
    },
}

impl SessionEvent {
    /// The audit event name.
    pub fn name(&self) -> &'static str {
        match self {
            SessionEvent::Opened(_) => "session_opened",
            SessionEvent::Renewed(_) => "session_renewed",
            SessionEvent::Closed { .. } => "session_closed",
        }
    }

    pub fn info(&self) -> &SessionInfo {
        match self {
            SessionEvent::Opened(i) | SessionEvent::Renewed(i) => i,
            SessionEvent::Closed { info, .. } => info,
        }
    }
}

/// A session id as six lowercase hex digits.
#[derive(Debug, Clone, Copy)]
pub struct SessionHex(pub SessionId);

impl std::fmt::Display for SessionHex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:06x}", self.0 .0)
    }
}

impl Serialize for SessionHex {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// The global session ID the controller shows and `session kill` takes: `GATEWAY:HEXID`
/// (six lowercase hex digits), formatted in place.
#[derive(Debug, Clone, Copy)]
pub struct GlobalSessionId<'a>(pub &'a str, pub SessionId);

impl std::fmt::Display for GlobalSessionId<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.0, SessionHex(self.1))
    }
}

impl Serialize for GlobalSessionId<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// [`GlobalSessionId`] as a string.
pub fn global_session_id(gateway: &str, session: SessionId) -> String {
    GlobalSessionId(gateway, session).to_string()
}

impl SessionTable {
    /// Who holds the session `key` names (live or not yet swept).
    pub(super) fn who_of(&self, key: &super::SessionKey) -> Option<&Who> {
        let (id, _) = self.by_key.get(key)?;
        self.records.get(&id.0).map(|r| &r.who)
    }

    /// The expiry the table holds for `id` (None: not in the id map any more).
    fn expiry_of(&self, id: u32) -> Option<u64> {
        let key = self.by_id.get(&id)?;
        self.by_key
            .get(key)
            .filter(|(sid, _)| sid.0 == id)
            .map(|(_, e)| *e)
    }

    fn info(&self, id: u32, r: &SessionRecord, expires_at_ms: u64) -> SessionInfo {
        SessionInfo {
            session: SessionId(id),
            who: r.who.clone(),
            source: r.source,
            opened_at_ms: r.opened_at_ms,
            renewed_at_ms: r.renewed_at_ms,
            expires_at_ms,
        }
    }

    /// Records an admitted knock for `session`: a renewal of a recorded session, else an
    /// opening.
    pub(super) fn note_admitted(
        &mut self,
        session: SessionId,
        renewed: bool,
        who: &Who,
        source: IpAddr,
        now_ms: u64,
    ) {
        let expires = self.expiry_of(session.0).unwrap_or(now_ms);
        if renewed {
            if let Some(r) = self.records.get_mut(&session.0) {
                r.renewed_at_ms = now_ms;
                let r = r.clone();
                let info = self.info(session.0, &r, expires);
                self.events.push(SessionEvent::Renewed(info));
                return;
            }
        }
        let r = SessionRecord {
            who: who.clone(),
            source,
            opened_at_ms: now_ms,
            renewed_at_ms: now_ms,
        };
        let info = self.info(session.0, &r, expires);
        self.records.insert(session.0, r);
        self.events.push(SessionEvent::Opened(info));
    }

    /// Forgets the record of a session already removed from the id maps and queues its
    /// `Closed` event (nothing if it had no record).
    pub(super) fn retire(&mut self, session: SessionId, reason: &'static str, at_ms: u64) {
        if let Some(r) = self.records.remove(&session.0) {
            let info = self.info(session.0, &r, at_ms);
            self.events.push(SessionEvent::Closed {
                info,
                reason,
                closed_at_ms: at_ms,
            });
        }
    }

    /// Closes (as `expired`) every recorded session whose lease ran out by `now_ms`, and
    /// every recorded session the table replaced or pruned meanwhile (a re-knock after
    /// the lease ended starts a new session). Returns the ids.
    fn sweep_expired(&mut self, now_ms: u64) -> Vec<SessionId> {
        let mut ended: Vec<(u32, u64)> = Vec::new();
        for id in self.records.keys() {
            match self.expiry_of(*id) {
                Some(expires) if now_ms < expires => {}
                Some(expires) => ended.push((*id, expires)),
                None => ended.push((*id, now_ms)),
            }
        }
        ended.sort_unstable();
        ended
            .into_iter()
            .map(|(id, at)| {
                self.forget(id);
                self.retire(SessionId(id), close_reason::EXPIRED, at);
                SessionId(id)
            })
            .collect()
    }

    /// Kills the session `kill` names if it is live and is the one the kill meant: with
    /// the kill's `opened_at_ms` (this gateway's own clock, as it reported the session),
    /// exactly that opening time, so clock skew between hosts does not matter and a
    /// session reusing the id is spared; without it (a `--force` kill of an unlisted
    /// session), opened at or before the kill's `at` (the controller's unix seconds).
    fn kill(&mut self, kill: &SessionKill, now_ms: u64) -> bool {
        let meant = self
            .records
            .get(&kill.session)
            .is_some_and(|r| match kill.opened_at_ms {
                Some(opened_at_ms) => r.opened_at_ms == opened_at_ms,
                None => r.opened_at_ms / 1000 <= kill.at,
            });
        if meant {
            self.forget(kill.session);
            self.retire(SessionId(kill.session), close_reason::KILLED, now_ms);
        }
        meant
    }

    /// Applies every kill for `gateway` (see [`SessionTable::kill`]); returns the killed ids.
    fn kill_matching(
        &mut self,
        kills: &[SessionKill],
        gateway: &str,
        now_ms: u64,
    ) -> Vec<SessionId> {
        kills
            .iter()
            .filter(|k| k.gateway == gateway)
            .filter(|k| self.kill(k, now_ms))
            .map(|k| SessionId(k.session))
            .collect()
    }

    /// Every session whose lease has not run out at `now_ms`, ordered by id.
    fn live_list(&self, now_ms: u64) -> Vec<BoardSession> {
        let mut list: Vec<BoardSession> = self
            .records
            .iter()
            .filter_map(|(id, r)| {
                let expires = self.expiry_of(*id).filter(|e| now_ms < *e)?;
                Some(BoardSession {
                    info: self.info(*id, r, expires),
                    mode: self.terms.get(id).map_or("lease", |t| t.hold.as_str()),
                })
            })
            .collect();
        list.sort_unstable_by_key(|s| s.info.session.0);
        list
    }
}

impl KnockPipeline {
    /// Moves the lifecycle events since the last call to the end of `into` (oldest
    /// first); both vectors keep their capacity (no allocation per knock).
    pub fn move_session_events_into(&mut self, into: &mut Vec<SessionEvent>) {
        into.append(&mut self.sessions.events);
    }

    /// Like [`KnockPipeline::sessions_revoked_by`], and records each closed session as
    /// closed for `reason` ([`close_reason::REGISTRY_CHANGE`] or
    /// [`close_reason::ACCESS_EXPIRED`]).
    pub fn close_sessions_revoked_by(
        &mut self,
        view: &RegistryView,
        now_ms: u64,
        reason: &'static str,
    ) -> Vec<SessionId> {
        let closed = self.sessions_revoked_by(view, now_ms);
        for id in &closed {
            self.sessions.retire(*id, reason, now_ms);
        }
        closed
    }

    /// Closes the sessions whose lease ran out (see the table's sweep); the caller
    /// removes them from the firewall (the kernel's own timeouts normally already did).
    pub fn sweep_expired_sessions(&mut self, now_ms: u64) -> Vec<SessionId> {
        self.sessions.sweep_expired(now_ms)
    }

    /// Closes every live session that one of `kills` names for `gateway` (the same
    /// opening time when the kill carries one, else opened at or before the kill: see
    /// `SessionTable::kill`). Kills for other gateways are ignored; a kill already applied
    /// finds nothing (the session is gone, or its id now belongs to a later session).
    pub fn kill_sessions(
        &mut self,
        kills: &[SessionKill],
        gateway: &str,
        now_ms: u64,
    ) -> Vec<SessionId> {
        self.sessions.kill_matching(kills, gateway, now_ms)
    }

    /// Every live session (lease not run out at `now_ms`), ordered by id.
    pub fn live_session_list(&self, now_ms: u64) -> Vec<BoardSession> {
        self.sessions.live_list(now_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use postern_protocol::keys::DeviceId;

    const T0: u64 = 1_800_000_000_000;
    const TTL: u64 = 60_000;

    fn who(device: u8, app: &str) -> Who {
        Who {
            device: DeviceId([device; 16]).to_string().into(),
            device_name: format!("dev{device}").into(),
            user: "alice".into(),
            app: app.into(),
        }
    }

    /// A knock admitted at `now` for (`device`, `app`) from 10.1.1.1, as `conclude` does it.
    fn admit(t: &mut SessionTable, device: u8, app: &str, now: u64, id: u32) -> (SessionId, bool) {
        let src: IpAddr = "10.1.1.1".parse().expect("literal");
        let mut next = || id;
        let (session, renewed) = t.session(
            (DeviceId([device; 16]), app.into(), src),
            now,
            TTL,
            &mut next,
        );
        t.note_admitted(session, renewed, &who(device, app), src, now);
        (session, renewed)
    }

    fn events(t: &mut SessionTable) -> Vec<SessionEvent> {
        std::mem::take(&mut t.events)
    }

    /// The queued events, which must be exactly one `Closed`.
    fn the_one_close(t: &mut SessionTable) -> (SessionInfo, &'static str, u64) {
        match events(t).as_slice() {
            [SessionEvent::Closed {
                info,
                reason,
                closed_at_ms,
            }] => (info.clone(), *reason, *closed_at_ms),
            other => panic!("expected one closed event, got {other:?}"),
        }
    }

    #[test]
    fn open_renew_and_close_carry_their_timestamps() {
        let mut t = SessionTable::default();
        let (s, renewed) = admit(&mut t, 1, "ssh", T0, 7);
        assert!(!renewed);
        let ev = events(&mut t);
        assert_eq!(ev.len(), 1);
        let SessionEvent::Opened(info) = &ev[0] else {
            panic!("expected opened, got {ev:?}")
        };
        assert_eq!(
            (
                info.session,
                info.opened_at_ms,
                info.renewed_at_ms,
                info.expires_at_ms
            ),
            (s, T0, T0, T0 + TTL)
        );
        assert_eq!(info.who, who(1, "ssh"));

        assert_eq!(admit(&mut t, 1, "ssh", T0 + 2_000, 8), (s, true));
        let ev = events(&mut t);
        let [SessionEvent::Renewed(info)] = ev.as_slice() else {
            panic!("expected renewed, got {ev:?}")
        };
        assert_eq!(
            (info.opened_at_ms, info.renewed_at_ms, info.expires_at_ms),
            (T0, T0 + 2_000, T0 + 2_000 + TTL)
        );
        let live: Vec<_> = t
            .live_list(T0 + 3_000)
            .iter()
            .map(BoardSession::to_live)
            .collect();
        assert_eq!(live.len(), 1);
        assert_eq!(
            (
                live[0].session,
                live[0].opened_at_ms,
                live[0].renewed_at_ms,
                live[0].expires_at_ms
            ),
            (7, T0, T0 + 2_000, T0 + 2_000 + TTL)
        );
        assert_eq!(live[0].source, "10.1.1.1");
        assert_eq!(live[0].mode, "lease");

        // A client close: the table forgets it, the record closes with its duration.
        let src: IpAddr = "10.1.1.1".parse().expect("literal");
        let closed = t.close(&(DeviceId([1; 16]), "ssh".into(), src), T0 + 4_500);
        assert_eq!(closed, Some(s));
        t.retire(s, close_reason::CLIENT_CLOSE, T0 + 4_500);
        let (info, reason, closed_at_ms) = the_one_close(&mut t);
        assert_eq!(
            (reason, closed_at_ms, info.opened_at_ms),
            ("client_close", T0 + 4_500, T0)
        );
        assert!(t.live_list(T0 + 4_600).is_empty());
        assert!(t.records.is_empty());
    }

    #[test]
    fn the_sweep_closes_run_out_leases_as_expired_and_spares_live_ones() {
        let mut t = SessionTable::default();
        let (a, _) = admit(&mut t, 1, "ssh", T0, 1);
        let (b, _) = admit(&mut t, 2, "ssh", T0 + 30_000, 2);
        events(&mut t);
        assert!(t.sweep_expired(T0 + TTL - 1).is_empty());
        assert_eq!(t.sweep_expired(T0 + TTL + 500), vec![a]);
        let (info, reason, closed_at_ms) = the_one_close(&mut t);
        assert_eq!(
            (info.session, reason, closed_at_ms),
            (a, "expired", T0 + TTL),
            "closed at the lease end, not when the sweep noticed"
        );
        // A re-knock after b's lease ran out starts a new session before any sweep: b
        // closes as expired at the next sweep, the new one stays.
        let late = T0 + 30_000 + TTL + 10;
        let (c, renewed) = admit(&mut t, 2, "ssh", late, 3);
        assert!(!renewed && c != b);
        assert_eq!(t.sweep_expired(late + 1), vec![b]);
        let ev = events(&mut t);
        assert_eq!(ev.len(), 2, "{ev:?}");
        assert!(matches!(&ev[0], SessionEvent::Opened(i) if i.session == c));
        assert!(
            matches!(&ev[1], SessionEvent::Closed { info, reason: "expired", .. } if info.session == b)
        );
        assert_eq!(
            t.live_list(late + 1)
                .iter()
                .map(|s| s.info.session.0)
                .collect::<Vec<_>>(),
            vec![3]
        );
    }

    #[test]
    fn forced_kills_close_sessions_opened_before_them_once_and_spare_a_reused_id() {
        let mut t = SessionTable::default();
        let (s, _) = admit(&mut t, 1, "ssh", T0, 0x0a1b2c);
        let (other, _) = admit(&mut t, 2, "ssh", T0, 0x5);
        events(&mut t);
        let at = T0 / 1000 + 10;
        let kill = |gateway: &str, session: u32, at: u64| SessionKill {
            gateway: gateway.into(),
            session,
            at,
            opened_at_ms: None,
        };
        // Another gateway's kill and a kill of an id that is not live: nothing.
        let kills = vec![kill("edge-2", 0x0a1b2c, at), kill("edge-1", 0x9, at)];
        assert!(t.kill_matching(&kills, "edge-1", T0 + 20_000).is_empty());
        // A kill ordered before the session opened spares it.
        let early = vec![kill("edge-1", 0x0a1b2c, T0 / 1000 - 1)];
        assert!(t.kill_matching(&early, "edge-1", T0 + 20_000).is_empty());

        let kills = vec![kill("edge-1", 0x0a1b2c, at)];
        assert_eq!(t.kill_matching(&kills, "edge-1", T0 + 20_000), vec![s]);
        let (info, reason, closed_at_ms) = the_one_close(&mut t);
        assert_eq!(
            (info.session, reason, closed_at_ms),
            (s, "killed", T0 + 20_000)
        );
        assert_eq!(t.live_list(T0 + 20_000).len(), 1, "the other session lives");
        assert!(t.by_id.contains_key(&other.0));

        // Applied once: the same kill list again finds nothing...
        assert!(t.kill_matching(&kills, "edge-1", T0 + 21_000).is_empty());
        // ...and a later session that reuses the id is spared.
        let (reused, renewed) = admit(&mut t, 1, "ssh", T0 + 30_000, 0x0a1b2c);
        assert_eq!((reused, renewed), (s, false));
        assert!(t.kill_matching(&kills, "edge-1", T0 + 31_000).is_empty());
        assert_eq!(t.live_list(T0 + 31_000).len(), 2);
    }

    #[test]
    fn kills_with_an_opening_time_close_exactly_that_session_whatever_the_clocks() {
        // This gateway's clock runs an hour ahead of the controller's: the kill's `at`
        // (controller seconds) is before the session opened by this gateway's clock.
        let ahead = 3_600_000;
        let opened = T0 + ahead;
        let mut t = SessionTable::default();
        let (s, _) = admit(&mut t, 1, "ssh", opened, 0x0a1b2c);
        events(&mut t);
        let kill = |session: u32, opened_at_ms: u64| SessionKill {
            gateway: "edge-1".into(),
            session,
            at: T0 / 1000 + 5,
            opened_at_ms: Some(opened_at_ms),
        };
        // The same id opened at another time (a reuse, even within the same second): spared.
        for other in [opened - 1, opened + 1, opened - 60_000] {
            assert!(t
                .kill_matching(&[kill(0x0a1b2c, other)], "edge-1", opened + 10)
                .is_empty());
        }
        // Another id with the same opening time: spared.
        assert!(t
            .kill_matching(&[kill(0x5, opened)], "edge-1", opened + 10)
            .is_empty());
        assert_eq!(t.live_list(opened + 10).len(), 1);
        // The exact (id, opening time) is killed although the clock is far ahead.
        let exact = [kill(0x0a1b2c, opened)];
        assert_eq!(t.kill_matching(&exact, "edge-1", opened + 20), vec![s]);
        let (info, reason, _) = the_one_close(&mut t);
        assert_eq!((info.session, reason), (s, "killed"));
        // Applied once; a later session reusing the id is spared, even when it opens
        // within the same second as the kill's `at`.
        let (reused, renewed) = admit(&mut t, 1, "ssh", opened + 30, 0x0a1b2c);
        assert_eq!((reused, renewed), (s, false));
        assert!(t.kill_matching(&exact, "edge-1", opened + 40).is_empty());
        assert_eq!(t.live_list(opened + 40).len(), 1);
    }

    #[test]
    fn global_ids_are_gateway_colon_six_hex_digits() {
        assert_eq!(global_session_id("local", SessionId(0x5)), "local:000005");
        assert_eq!(
            global_session_id("edge-1", SessionId(0xff_ffff)),
            "edge-1:ffffff"
        );
    }
}
