//! Live sessions as gateways report them, and admin session kills.
//!
//! Owns: reading `live_sessions` (joined with `gateways.last_seen_ms`) for `session list`,
//! the global session ID text `GATEWAY:HEXID`, writing `session_kills` rows (audited, with
//! a revision bump, in one transaction) and reading the recent ones into
//! `Snapshot::kills`. Must not touch: how reports arrive or are stored (the control
//! channel, `sync`), the schema (`schema`), CLI presentation (`cmd_session`).

use rusqlite::{params, Connection, OptionalExtension};
use serde::Serialize;

use crate::proto::snapshot::{SessionKill, MAX_SESSION_KILLS};
use crate::registry::{bump, Registry, RegistryError};
use crate::validate;

/// A gateway not heard from for longer than this (ms) has its sessions shown as stale.
pub const STALE_AFTER_MS: u64 = 60_000;
/// Kills travel in snapshots for this long (seconds); older rows are pruned.
pub const KILL_RETENTION_SECS: u64 = 24 * 60 * 60;
/// Largest gateway session id (24 bits: the conntrack mark's low bits).
pub const MAX_SESSION: u32 = 0xFF_FFFF;

/// Why a session command was refused. Every message is one line naming the fix.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("session ID {0:?} is malformed: use GATEWAY:HEXID as `postern-controller session list` shows it, e.g. edge-1:0a1b2c (1-6 hex digits, not 000000)")]
    MalformedId(String),
    #[error("session {0} is not listed (see `postern-controller session list`): check the ID, or pass --force to store the kill anyway")]
    NotListed(String),
    #[error(transparent)]
    Registry(#[from] RegistryError),
}

impl SessionError {
    /// True when the caller's input was refused (exit code 2).
    pub fn is_validation(&self) -> bool {
        match self {
            SessionError::MalformedId(_) | SessionError::NotListed(_) => true,
            SessionError::Registry(e) => e.is_validation(),
        }
    }
}

impl From<rusqlite::Error> for SessionError {
    fn from(e: rusqlite::Error) -> Self {
        SessionError::Registry(e.into())
    }
}

/// A global session ID: the gateway's name and its session id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SessionRef {
    pub gateway: String,
    pub session: u32,
}

impl SessionRef {
    /// Parses `GATEWAY:HEXID` (1-6 hex digits, either case, nonzero).
    pub fn parse(text: &str) -> Result<SessionRef, SessionError> {
        let bad = || SessionError::MalformedId(text.to_owned());
        let (gateway, hex) = text.rsplit_once(':').ok_or_else(bad)?;
        validate::gateway_name(gateway).map_err(|_| bad())?;
        if hex.is_empty() || hex.len() > 6 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad());
        }
        let session = u32::from_str_radix(hex, 16).map_err(|_| bad())?;
        if session == 0 || session > MAX_SESSION {
            return Err(bad());
        }
        Ok(SessionRef {
            gateway: gateway.to_owned(),
            session,
        })
    }
}

impl std::fmt::Display for SessionRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{:06x}", self.gateway, self.session)
    }
}

/// One live session as `session list` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SessionRow {
    /// `GATEWAY:HEXID`, what `session kill` takes.
    pub id: String,
    pub gateway: String,
    pub session: u32,
    pub device: String,
    pub device_name: String,
    pub user: String,
    pub app: String,
    pub source: String,
    pub mode: String,
    pub opened_at_ms: u64,
    pub renewed_at_ms: u64,
    pub expires_at_ms: u64,
    /// When the gateway's report holding this row was made.
    pub reported_at_ms: u64,
    /// When the controller last heard from the gateway (falls back to `reported_at_ms`).
    pub gateway_last_seen_ms: u64,
    /// The gateway has not been heard from for more than [`STALE_AFTER_MS`]: the row may
    /// be out of date.
    pub stale: bool,
}

/// What `session kill` stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KillOutcome {
    pub id: String,
    pub gateway: String,
    pub session: u32,
    /// Unix seconds (the controller's clock): without `opened_at_ms`, sessions opened
    /// after this are not killed.
    pub at: u64,
    /// The listed session's opening time as its gateway reported it (the gateway's
    /// clock): the gateway kills only the session with this id and this opening time.
    /// None for a `--force` kill of an unlisted session.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub opened_at_ms: Option<u64>,
    /// The session was in `live_sessions` (false only with `--force`).
    pub listed: bool,
    /// The same kill was already stored this second; nothing changed.
    pub already_killed: bool,
    /// The registry revision carrying the kill.
    pub revision: u64,
    /// The listed session's device name, user and app (when listed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device_name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub app: Option<String>,
}

fn to_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

impl Registry {
    /// Every reported live session (of `gateway` only, if given), by gateway then id.
    pub fn list_sessions(
        &self,
        gateway: Option<&str>,
        now_ms: u64,
    ) -> Result<Vec<SessionRow>, RegistryError> {
        let mut stmt = self.conn.prepare(
            "SELECT s.gateway, s.session, s.device, s.device_name, s.user, s.app, s.source,
                    s.mode, s.opened_at_ms, s.renewed_at_ms, s.expires_at_ms,
                    s.reported_at_ms, g.last_seen_ms
             FROM live_sessions s LEFT JOIN gateways g ON g.name = s.gateway
             WHERE ?1 IS NULL OR s.gateway = ?1
             ORDER BY s.gateway, s.session",
        )?;
        let rows = stmt.query_map([gateway], |r| {
            let gateway: String = r.get(0)?;
            let session: u32 = r.get(1)?;
            let reported_at_ms = to_u64(r.get(11)?);
            let last_seen = r
                .get::<_, Option<i64>>(12)?
                .map_or(reported_at_ms, to_u64)
                .max(reported_at_ms);
            Ok(SessionRow {
                id: SessionRef {
                    gateway: gateway.clone(),
                    session,
                }
                .to_string(),
                gateway,
                session,
                device: r.get(2)?,
                device_name: r.get(3)?,
                user: r.get(4)?,
                app: r.get(5)?,
                source: r.get(6)?,
                mode: r.get(7)?,
                opened_at_ms: to_u64(r.get(8)?),
                renewed_at_ms: to_u64(r.get(9)?),
                expires_at_ms: to_u64(r.get(10)?),
                reported_at_ms,
                gateway_last_seen_ms: last_seen,
                stale: now_ms.saturating_sub(last_seen) > STALE_AFTER_MS,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Stores a kill of `target` at `now_secs`, audited (`session_kill`) with a revision
    /// bump, so it reaches the gateway in its next snapshot. A session not in
    /// `live_sessions` is refused unless `force`. Also prunes kills older than
    /// [`KILL_RETENTION_SECS`].
    pub fn kill_session(
        &mut self,
        target: &SessionRef,
        force: bool,
        now_secs: u64,
    ) -> Result<KillOutcome, SessionError> {
        let (tx, actor) = self.write_tx_as()?;
        let listed: Option<(String, String, String, i64)> = tx
            .query_row(
                "SELECT device_name, user, app, opened_at_ms FROM live_sessions
                 WHERE gateway = ?1 AND session = ?2",
                params![target.gateway, target.session],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
            .optional()?;
        if listed.is_none() && !force {
            return Err(SessionError::NotListed(target.to_string()));
        }
        prune_kills(&tx, now_secs)?;
        let at = i64::try_from(now_secs).unwrap_or(i64::MAX);
        let opened_at_ms = listed.as_ref().map(|l| l.3);
        let inserted = tx.execute(
            "INSERT OR IGNORE INTO session_kills (gateway, session, killed_at, actor, opened_at_ms)
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![target.gateway, target.session, at, actor, opened_at_ms],
        )?;
        let opened_at_ms = opened_at_ms.map(to_u64);
        let (device_name, user, app) = match listed.clone() {
            Some((d, u, a, _)) => (Some(d), Some(u), Some(a)),
            None => (None, None, None),
        };
        if inserted == 1 {
            crate::audit::record(
                &tx,
                actor,
                "session.kill",
                &target.to_string(),
                serde_json::json!({
                    "gateway": target.gateway,
                    "session": target.session,
                    "at": now_secs,
                    "opened_at_ms": opened_at_ms,
                    "listed": listed.is_some(),
                    "device_name": device_name,
                    "user": user,
                    "app": app,
                }),
            )?;
            bump(&tx)?;
        }
        let revision: i64 =
            tx.query_row("SELECT revision FROM meta WHERE id = 1", [], |r| r.get(0))?;
        tx.commit()?;
        Ok(KillOutcome {
            id: target.to_string(),
            gateway: target.gateway.clone(),
            session: target.session,
            at: now_secs,
            opened_at_ms,
            listed: listed.is_some(),
            already_killed: inserted == 0,
            revision: to_u64(revision),
            device_name,
            user,
            app,
        })
    }
}

/// The kills of the last [`KILL_RETENTION_SECS`] before `now_secs`, newest first, at most
/// [`MAX_SESSION_KILLS`] (for `Snapshot::kills`).
pub(crate) fn snapshot_kills(
    conn: &Connection,
    now_secs: u64,
) -> Result<Vec<SessionKill>, RegistryError> {
    let since = i64::try_from(now_secs.saturating_sub(KILL_RETENTION_SECS)).unwrap_or(i64::MAX);
    let mut stmt = conn.prepare(
        "SELECT gateway, session, killed_at, opened_at_ms FROM session_kills
         WHERE killed_at >= ?1
         ORDER BY killed_at DESC, gateway, session LIMIT ?2",
    )?;
    let limit = i64::try_from(MAX_SESSION_KILLS).unwrap_or(i64::MAX);
    let rows = stmt.query_map(params![since, limit], |r| {
        Ok(SessionKill {
            gateway: r.get(0)?,
            session: r.get(1)?,
            at: to_u64(r.get(2)?),
            opened_at_ms: r.get::<_, Option<i64>>(3)?.map(to_u64),
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Deletes kills older than [`KILL_RETENTION_SECS`] (they no longer travel in snapshots).
fn prune_kills(conn: &Connection, now_secs: u64) -> Result<usize, RegistryError> {
    let before = i64::try_from(now_secs.saturating_sub(KILL_RETENTION_SECS)).unwrap_or(i64::MAX);
    Ok(conn.execute("DELETE FROM session_kills WHERE killed_at < ?1", [before])?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_ids_parse_and_print_as_gateway_colon_six_hex_digits() {
        let r = SessionRef::parse("edge-1:0A1B2C").expect("valid id");
        assert_eq!((r.gateway.as_str(), r.session), ("edge-1", 0x0a1b2c));
        assert_eq!(r.to_string(), "edge-1:0a1b2c");
        assert_eq!(
            SessionRef::parse("local:5").expect("short hex").to_string(),
            "local:000005"
        );
        for bad in [
            "",
            "edge-1",
            "edge-1:",
            ":0a1b2c",
            "edge-1:000000",
            "edge-1:1000000",
            "edge-1:0x1b2c",
            "edge-1:zz",
            "edge 1:0a1b2c",
            "edge-1:+1",
            "edge-1:-1",
        ] {
            assert!(
                matches!(SessionRef::parse(bad), Err(SessionError::MalformedId(_))),
                "{bad:?} must be refused"
            );
        }
    }

    #[test]
    fn kills_travel_for_a_day_newest_first_and_the_old_ones_are_pruned() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut reg = Registry::open(&dir.path().join("r.db")).expect("open");
        let target = |s: u32| SessionRef {
            gateway: "edge-1".into(),
            session: s,
        };
        let day = KILL_RETENTION_SECS;
        let now = 2_000_000_000;
        let rev0 = reg.revision().expect("revision");
        reg.kill_session(&target(1), true, now - day - 1)
            .expect("old kill");
        let again = reg
            .kill_session(&target(1), true, now - day - 1)
            .expect("same");
        assert!(
            again.already_killed,
            "a repeat in the same second changes nothing"
        );
        assert_eq!(reg.revision().expect("revision"), rev0 + 1);
        let o = reg.kill_session(&target(2), true, now - 5).expect("kill");
        assert!(!o.listed && !o.already_killed);
        assert_eq!(o.revision, rev0 + 2);
        reg.kill_session(&target(3), true, now).expect("kill");
        let kills = snapshot_kills(&reg.conn, now).expect("kills");
        assert_eq!(
            kills.iter().map(|k| (k.session, k.at)).collect::<Vec<_>>(),
            vec![(3, now), (2, now - 5)],
            "newest first, the day-old kill left out"
        );
        let left: i64 = reg
            .conn
            .query_row("SELECT COUNT(*) FROM session_kills", [], |r| r.get(0))
            .expect("count");
        assert_eq!(left, 2, "the kill older than a day was pruned");
        // Unlisted without --force: refused, nothing stored.
        assert!(matches!(
            reg.kill_session(&target(4), false, now),
            Err(SessionError::NotListed(_))
        ));
        assert_eq!(reg.revision().expect("revision"), rev0 + 3);
    }
}
