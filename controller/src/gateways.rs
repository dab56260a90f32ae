//! The gateway registry: remote gateways' one-time enrollment tokens, their registered
//! TLS client keys, removal, and what each connected gateway last reported (live sessions,
//! last contact, revision held). docs/control-channel.md, "Enrollment" and "Sessions".
//!
//! Owns: the `gateways` and `live_sessions` tables (only hex(SHA-256(secret)) of a token
//! is stored, never the secret) and the rules: a token works once, until it expires; a name
//! is re-issued only when it never registered or was removed; a key belongs to one gateway.
//! Every admin change and every registration commits together with its audit row.
//! Session reports are not registry data: they never bump the revision and are not audited
//! (a gateway sends one at least every 30 s).
//! Must not touch: the channel itself (see `gateway_channel`), the TLS identity (the caller
//! passes the certificate fingerprint in), `session_kills` (see the `session` commands) or
//! the audit table's layout (see `audit`).

use rusqlite::{params, OptionalExtension as _};
use serde::Serialize;

use crate::invite::format_unix;
use crate::registry::{Registry, RegistryError};
use crate::{audit, validate};
use postern_protocol::api_auth::{sha256_hex, InviteToken, GATEWAY_TOKEN_PREFIX};
use postern_protocol::control::{SessionReport, MAX_REPORTED_SESSIONS};

/// A channel whose gateway was not heard from for this long is not "connected" in
/// `gateway list` (the controller closes such a channel itself).
pub const CONNECTED_SILENCE_MS: u64 = 60_000;
/// Longest text field in a reported session.
pub const MAX_SESSION_FIELD: usize = 256;

/// Why a gateway command was refused. One line each, naming the fix.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("gateway {0:?} already exists: pick another name, or pass --reissue for a new token if it never registered or was removed")]
    Exists(String),
    #[error("gateway {0:?} is registered and active: --reissue works only for a gateway that never registered or was removed (`postern-controller gateway remove {0}` first)")]
    ActiveReissue(String),
    #[error("no gateway named {0:?}: see `postern-controller gateway list`")]
    Unknown(String),
    #[error("cannot read the OS random number generator: {0}")]
    Random(String),
    #[error(transparent)]
    Registry(#[from] RegistryError),
}

impl GatewayError {
    /// True when the caller's input was refused (exit code 2).
    pub fn is_validation(&self) -> bool {
        match self {
            GatewayError::Random(_) => false,
            GatewayError::Registry(r) => r.is_validation(),
            _ => true,
        }
    }
}

/// A freshly created gateway token: shown once, never stored.
#[derive(Debug)]
pub struct CreatedGatewayToken {
    pub token: InviteToken,
    pub name: String,
    /// Unix seconds.
    pub expires_at: u64,
}

impl CreatedGatewayToken {
    /// `postern-gateway:v1:<secret>:<cert sha256>`.
    pub fn text(&self) -> zeroize::Zeroizing<String> {
        self.token.to_text_with_prefix(GATEWAY_TOKEN_PREFIX)
    }
}

/// Why an `enroll` was refused; `code` is the channel's error code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnrollRefusal {
    #[error("the gateway token is not known to this controller: check that the whole token was copied, or make a new one with `postern-controller gateway add NAME --reissue`")]
    BadToken,
    #[error("the gateway token was already used (gateway {0:?} is registered): make a new one with `postern-controller gateway remove {0}` and `gateway add {0} --reissue`")]
    TokenUsed(String),
    #[error("the gateway token expired at {0}: make a new one with `postern-controller gateway add NAME --reissue`")]
    TokenExpired(String),
    #[error("gateway {0:?} was removed: make a new token with `postern-controller gateway add {0} --reissue`")]
    GatewayRemoved(String),
    #[error("this client key is already registered to gateway {0:?}: enroll with a new key (delete the gateway's control/ directory)")]
    KeyInUse(String),
}

impl EnrollRefusal {
    /// The stable error code on the channel.
    pub fn code(&self) -> &'static str {
        match self {
            EnrollRefusal::BadToken => "bad_token",
            EnrollRefusal::TokenUsed(_) => "token_used",
            EnrollRefusal::TokenExpired(_) => "token_expired",
            EnrollRefusal::GatewayRemoved(_) => "gateway_removed",
            EnrollRefusal::KeyInUse(_) => "bad_request",
        }
    }
}

/// What a client key is registered as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyLookup {
    /// A registered gateway that was not removed.
    Active(String),
    /// A gateway that was removed.
    Removed(String),
    /// No gateway has this key.
    Unknown,
}

/// A malformed session report (the channel answers `bad_request`).
#[derive(Debug, thiserror::Error)]
pub enum SessionReportError {
    #[error("sessions report has {0} sessions; at most {MAX_REPORTED_SESSIONS} (count the rest in `omitted`)")]
    TooMany(usize),
    #[error("sessions report: session id {0} is out of range 1..=16777215")]
    BadSession(u32),
    #[error("sessions report: session {0} is listed twice")]
    Duplicate(u32),
    #[error("sessions report: a field of session {0} is longer than {MAX_SESSION_FIELD} bytes")]
    FieldTooLong(u32),
    #[error(transparent)]
    Registry(#[from] RegistryError),
}

/// One row of `gateway list`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GatewayRow {
    pub name: String,
    /// The gateway registered its key with its token.
    pub registered: bool,
    pub removed: bool,
    /// SHA-256 (hex) of its TLS client certificate's SubjectPublicKeyInfo.
    pub key_sha256: Option<String>,
    /// A control channel is open now (and the gateway was heard from within 60 s).
    pub connected: bool,
    /// Last contact, RFC 3339.
    pub last_seen: Option<String>,
    /// The snapshot revision it holds (as of its last contact).
    pub last_revision: Option<u64>,
    /// When the unused token expires, RFC 3339 (None once registered).
    pub token_expires: Option<String>,
    pub registered_at: Option<String>,
}

/// Result of `remove_gateway`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoveOutcome {
    pub name: String,
    pub already_removed: bool,
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn to_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

fn format_ms(ms: i64) -> String {
    format_unix(to_u64(ms) / 1000)
}

impl Registry {
    /// Creates a one-time token for gateway `name`, valid `ttl_secs` from `now` (unix s).
    /// `reissue` replaces the token of a gateway that never registered or was removed (its
    /// old key is forgotten).
    pub fn add_gateway(
        &mut self,
        name: &str,
        ttl_secs: u64,
        cert_sha256: [u8; 32],
        now: u64,
        reissue: bool,
    ) -> Result<CreatedGatewayToken, GatewayError> {
        validate::gateway_name(name).map_err(RegistryError::from)?;
        let mut secret = zeroize::Zeroizing::new([0u8; 32]);
        getrandom::getrandom(secret.as_mut()).map_err(|e| GatewayError::Random(e.to_string()))?;
        let token = InviteToken::new(*secret, cert_sha256);
        let expires_at = now.saturating_add(ttl_secs);
        let (tx, actor) = self.write_tx_as()?;
        let existing = tx
            .query_row(
                "SELECT registered_at IS NOT NULL, removed FROM gateways WHERE name = ?1",
                [name],
                |r| Ok((r.get::<_, bool>(0)?, r.get::<_, bool>(1)?)),
            )
            .optional()
            .map_err(RegistryError::from)?;
        let action = match existing {
            None => {
                tx.execute(
                    "INSERT INTO gateways (name, token_hash, token_expires) VALUES (?1, ?2, ?3)",
                    params![name, token.secret_hash_hex(), to_i64(expires_at)],
                )
                .map_err(RegistryError::from)?;
                "gateway.add"
            }
            Some(_) if !reissue => return Err(GatewayError::Exists(name.to_owned())),
            Some((true, false)) => return Err(GatewayError::ActiveReissue(name.to_owned())),
            Some(_) => {
                tx.execute(
                    "UPDATE gateways SET token_hash = ?2, token_expires = ?3, key_sha256 = NULL,
                        registered_at = NULL, removed = 0, connected_ms = NULL,
                        last_seen_ms = NULL, last_revision = NULL
                     WHERE name = ?1",
                    params![name, token.secret_hash_hex(), to_i64(expires_at)],
                )
                .map_err(RegistryError::from)?;
                "gateway.reissue"
            }
        };
        audit::record(
            &tx,
            actor,
            action,
            name,
            serde_json::json!({ "expires_at": format_unix(expires_at) }),
        )?;
        tx.commit().map_err(RegistryError::from)?;
        Ok(CreatedGatewayToken {
            token,
            name: name.to_owned(),
            expires_at,
        })
    }

    /// Redeems a gateway token: binds `key_sha256` (the client certificate's SPKI hash) to
    /// the token's gateway and marks the token used, with its audit row, in one
    /// transaction. Returns the gateway's name, or why it was refused.
    pub fn register_gateway(
        &mut self,
        secret: &[u8; 32],
        key_sha256: &str,
        now: u64,
    ) -> Result<Result<String, EnrollRefusal>, RegistryError> {
        let hash = sha256_hex(secret);
        let tx = self.write_tx()?;
        let row = tx
            .query_row(
                "SELECT name, token_expires, registered_at IS NOT NULL, removed
                 FROM gateways WHERE token_hash = ?1",
                [&hash],
                |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, Option<i64>>(1)?,
                        r.get::<_, bool>(2)?,
                        r.get::<_, bool>(3)?,
                    ))
                },
            )
            .optional()?;
        let Some((name, expires, registered, removed)) = row else {
            return Ok(Err(EnrollRefusal::BadToken));
        };
        if removed {
            return Ok(Err(EnrollRefusal::GatewayRemoved(name)));
        }
        if registered {
            return Ok(Err(EnrollRefusal::TokenUsed(name)));
        }
        let expires = expires.unwrap_or(0);
        if to_i64(now) >= expires {
            return Ok(Err(EnrollRefusal::TokenExpired(format_unix(to_u64(
                expires,
            )))));
        }
        let holder = tx
            .query_row(
                "SELECT name FROM gateways WHERE key_sha256 = ?1",
                [key_sha256],
                |r| r.get::<_, String>(0),
            )
            .optional()?;
        if let Some(holder) = holder {
            return Ok(Err(EnrollRefusal::KeyInUse(holder)));
        }
        tx.execute(
            "UPDATE gateways SET key_sha256 = ?2, registered_at = ?3 WHERE name = ?1",
            params![name, key_sha256, to_i64(now)],
        )?;
        audit::record(
            &tx,
            &format!("gateway:{name}"),
            "gateway.register",
            &name,
            serde_json::json!({ "key_sha256": key_sha256 }),
        )?;
        tx.commit()?;
        Ok(Ok(name))
    }

    /// Which gateway holds the client key `key_sha256`.
    pub fn gateway_by_key(&self, key_sha256: &str) -> Result<KeyLookup, RegistryError> {
        let row = self
            .conn
            .query_row(
                "SELECT name, removed FROM gateways WHERE key_sha256 = ?1",
                [key_sha256],
                |r| Ok((r.get::<_, String>(0)?, r.get::<_, bool>(1)?)),
            )
            .optional()?;
        Ok(match row {
            None => KeyLookup::Unknown,
            Some((name, false)) => KeyLookup::Active(name),
            Some((name, true)) => KeyLookup::Removed(name),
        })
    }

    /// Whether `name` belongs to a remote gateway (`gateway add`, removed or not): a local
    /// (Unix socket) gateway may not report under it.
    pub fn is_remote_gateway(&self, name: &str) -> Result<bool, RegistryError> {
        Ok(self
            .conn
            .query_row("SELECT 1 FROM gateways WHERE name = ?1", [name], |_| Ok(()))
            .optional()?
            .is_some())
    }

    /// Every registered, not removed gateway's (name, key SHA-256): what the channel may
    /// keep open.
    pub fn active_gateway_keys(&self) -> Result<Vec<(String, String)>, RegistryError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT name, key_sha256 FROM gateways WHERE removed = 0 AND key_sha256 IS NOT NULL",
        )?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Marks gateway `name` removed (its channel is closed and never accepted again) and
    /// forgets its live sessions; audited.
    pub fn remove_gateway(&mut self, name: &str) -> Result<RemoveOutcome, GatewayError> {
        validate::gateway_name(name).map_err(RegistryError::from)?;
        let (tx, actor) = self.write_tx_as()?;
        let removed = tx
            .query_row(
                "SELECT removed FROM gateways WHERE name = ?1",
                [name],
                |r| r.get::<_, bool>(0),
            )
            .optional()
            .map_err(RegistryError::from)?;
        let Some(already_removed) = removed else {
            return Err(GatewayError::Unknown(name.to_owned()));
        };
        if !already_removed {
            tx.execute(
                "UPDATE gateways SET removed = 1, connected_ms = NULL WHERE name = ?1",
                [name],
            )
            .map_err(RegistryError::from)?;
            tx.execute("DELETE FROM live_sessions WHERE gateway = ?1", [name])
                .map_err(RegistryError::from)?;
            audit::record(&tx, actor, "gateway.remove", name, serde_json::json!({}))?;
        }
        tx.commit().map_err(RegistryError::from)?;
        Ok(RemoveOutcome {
            name: name.to_owned(),
            already_removed,
        })
    }

    /// Every gateway, by name. `now_ms` decides "connected" (see [`CONNECTED_SILENCE_MS`]).
    pub fn list_gateways(&self, now_ms: u64) -> Result<Vec<GatewayRow>, RegistryError> {
        let mut stmt = self.conn.prepare(
            "SELECT name, key_sha256, registered_at, removed, last_seen_ms, last_revision,
                    connected_ms, token_expires
             FROM gateways ORDER BY name",
        )?;
        let rows = stmt.query_map([], |r| {
            let registered_at: Option<i64> = r.get(2)?;
            let last_seen_ms: Option<i64> = r.get(4)?;
            let connected_ms: Option<i64> = r.get(6)?;
            let token_expires: Option<i64> = r.get(7)?;
            let removed: bool = r.get(3)?;
            let recent = last_seen_ms
                .is_some_and(|s| to_u64(s).saturating_add(CONNECTED_SILENCE_MS) >= now_ms);
            Ok(GatewayRow {
                name: r.get(0)?,
                registered: registered_at.is_some(),
                removed,
                key_sha256: r.get(1)?,
                connected: !removed && connected_ms.is_some() && recent,
                last_seen: last_seen_ms.map(format_ms),
                last_revision: r.get::<_, Option<i64>>(5)?.map(to_u64),
                token_expires: if registered_at.is_none() {
                    token_expires.map(|t| format_unix(to_u64(t)))
                } else {
                    None
                },
                registered_at: registered_at.map(|t| format_unix(to_u64(t))),
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Records contact with gateway `name` (no-op for a name without a row, such as a
    /// local gateway on the Unix socket): last seen now, and the revision it holds.
    pub fn record_gateway_seen(
        &self,
        name: &str,
        now_ms: u64,
        revision: Option<u64>,
    ) -> Result<(), RegistryError> {
        self.conn.execute(
            "UPDATE gateways SET last_seen_ms = ?2,
                    last_revision = COALESCE(?3, last_revision) WHERE name = ?1",
            params![name, to_i64(now_ms), revision.map(to_i64)],
        )?;
        Ok(())
    }

    /// Marks gateway `name`'s channel open since `connected_ms` (`Some`), or closed
    /// (`None`: only if the open mark is still `since`, so a newer channel's mark stays).
    pub fn mark_gateway_channel(
        &self,
        name: &str,
        since: u64,
        open: bool,
    ) -> Result<(), RegistryError> {
        if open {
            self.conn.execute(
                "UPDATE gateways SET connected_ms = ?2, last_seen_ms = ?2 WHERE name = ?1",
                params![name, to_i64(since)],
            )?;
        } else {
            self.conn.execute(
                "UPDATE gateways SET connected_ms = NULL WHERE name = ?1 AND connected_ms = ?2",
                params![name, to_i64(since)],
            )?;
        }
        Ok(())
    }

    /// Forgets every open-channel mark (a controller starting has no channels yet).
    pub fn clear_gateway_channels(&self) -> Result<(), RegistryError> {
        self.conn.execute(
            "UPDATE gateways SET connected_ms = NULL WHERE connected_ms IS NOT NULL",
            [],
        )?;
        Ok(())
    }

    /// Replaces gateway `name`'s live sessions with `report` and records the contact
    /// (`now_ms`, controller clock; also each row's `reported_at_ms`) in one transaction.
    /// No revision bump, no audit row.
    pub fn replace_live_sessions(
        &mut self,
        name: &str,
        report: &SessionReport,
        now_ms: u64,
        revision: Option<u64>,
    ) -> Result<(), SessionReportError> {
        check_report(report)?;
        let tx = self.write_tx()?;
        // A removed gateway's channel may still deliver a report before it is closed: its
        // rows stay deleted (`remove_gateway` cleared them).
        let removed: bool = tx
            .query_row(
                "SELECT removed FROM gateways WHERE name = ?1",
                [name],
                |r| r.get(0),
            )
            .optional()
            .map_err(RegistryError::from)?
            .unwrap_or(false);
        if removed {
            return Ok(());
        }
        tx.execute("DELETE FROM live_sessions WHERE gateway = ?1", [name])
            .map_err(RegistryError::from)?;
        {
            let mut insert = tx
                .prepare_cached(
                    "INSERT INTO live_sessions (gateway, session, device, device_name, user, app,
                        source, mode, opened_at_ms, renewed_at_ms, expires_at_ms, reported_at_ms)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
                )
                .map_err(RegistryError::from)?;
            for s in &report.sessions {
                insert
                    .execute(params![
                        name,
                        s.session,
                        s.device,
                        s.device_name,
                        s.user,
                        s.app,
                        s.source,
                        s.mode,
                        to_i64(s.opened_at_ms),
                        to_i64(s.renewed_at_ms),
                        to_i64(s.expires_at_ms),
                        to_i64(now_ms),
                    ])
                    .map_err(RegistryError::from)?;
            }
        }
        tx.execute(
            "UPDATE gateways SET last_seen_ms = ?2,
                    last_revision = COALESCE(?3, last_revision) WHERE name = ?1",
            params![name, to_i64(now_ms), revision.map(to_i64)],
        )
        .map_err(RegistryError::from)?;
        tx.commit().map_err(RegistryError::from)?;
        Ok(())
    }
}

fn check_report(report: &SessionReport) -> Result<(), SessionReportError> {
    if report.sessions.len() > MAX_REPORTED_SESSIONS {
        return Err(SessionReportError::TooMany(report.sessions.len()));
    }
    let mut seen = std::collections::HashSet::with_capacity(report.sessions.len());
    for s in &report.sessions {
        if !(1..=0xFF_FFFF).contains(&s.session) {
            return Err(SessionReportError::BadSession(s.session));
        }
        if !seen.insert(s.session) {
            return Err(SessionReportError::Duplicate(s.session));
        }
        let fields = [
            &s.device,
            &s.device_name,
            &s.user,
            &s.app,
            &s.source,
            &s.mode,
        ];
        if fields.iter().any(|f| f.len() > MAX_SESSION_FIELD) {
            return Err(SessionReportError::FieldTooLong(s.session));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use postern_protocol::control::LiveSession;

    const NOW: u64 = 1_795_000_000;

    fn registry() -> (tempfile::TempDir, Registry) {
        let dir = tempfile::tempdir().expect("tempdir");
        let reg = Registry::open(&dir.path().join("r.db")).expect("open");
        (dir, reg)
    }

    fn session(id: u32) -> LiveSession {
        LiveSession {
            session: id,
            device: "0".repeat(32),
            device_name: "laptop".into(),
            user: "alice".into(),
            app: "web".into(),
            source: "192.0.2.1".into(),
            mode: "lease".into(),
            opened_at_ms: 1,
            renewed_at_ms: 2,
            expires_at_ms: 3,
        }
    }

    #[test]
    fn token_registers_once_and_binds_the_key() {
        let (_d, mut reg) = registry();
        let t = reg
            .add_gateway("edge-1", 3600, [1; 32], NOW, false)
            .expect("add");
        let stored: String = reg
            .conn
            .query_row("SELECT token_hash FROM gateways", [], |r| r.get(0))
            .expect("row");
        assert_eq!(stored, sha256_hex(t.token.secret()), "only the hash");
        assert!(t.text().starts_with("postern-gateway:v1:"));
        let key = "ab".repeat(32);
        assert_eq!(
            reg.register_gateway(t.token.secret(), &key, NOW + 1)
                .expect("db"),
            Ok("edge-1".to_owned())
        );
        assert_eq!(
            reg.gateway_by_key(&key).expect("db"),
            KeyLookup::Active("edge-1".into())
        );
        assert_eq!(
            reg.register_gateway(t.token.secret(), &"cd".repeat(32), NOW + 2)
                .expect("db"),
            Err(EnrollRefusal::TokenUsed("edge-1".into()))
        );
        assert_eq!(
            reg.register_gateway(&[9; 32], &key, NOW).expect("db"),
            Err(EnrollRefusal::BadToken)
        );
        let e = reg
            .add_gateway("edge-1", 60, [1; 32], NOW, false)
            .expect_err("exists");
        assert!(
            e.is_validation() && e.to_string().contains("--reissue"),
            "{e}"
        );
        let e = reg
            .add_gateway("edge-1", 60, [1; 32], NOW, true)
            .expect_err("active");
        assert!(matches!(e, GatewayError::ActiveReissue(_)), "{e}");
        let rev = reg.revision().expect("rev");
        reg.remove_gateway("edge-1").expect("remove");
        assert_eq!(reg.revision().expect("rev"), rev, "no revision bump");
        assert_eq!(
            reg.gateway_by_key(&key).expect("db"),
            KeyLookup::Removed("edge-1".into())
        );
        let again = reg
            .add_gateway("edge-1", 60, [1; 32], NOW, true)
            .expect("reissue after removal");
        assert_eq!(
            reg.register_gateway(again.token.secret(), &key, NOW + 60)
                .expect("db"),
            Err(EnrollRefusal::TokenExpired(format_unix(NOW + 60)))
        );
        let actions: Vec<String> = reg
            .list_audit(10)
            .expect("audit")
            .into_iter()
            .map(|a| a.action)
            .collect();
        assert_eq!(
            actions,
            [
                "gateway.add",
                "gateway.register",
                "gateway.remove",
                "gateway.reissue"
            ]
        );
    }

    #[test]
    fn names_are_validated_and_remove_needs_a_known_gateway() {
        let (_d, mut reg) = registry();
        let e = reg
            .add_gateway("edge:1", 60, [1; 32], NOW, false)
            .expect_err("colon");
        assert!(
            e.is_validation() && e.to_string().contains("gateway name"),
            "{e}"
        );
        let e = reg.remove_gateway("nope").expect_err("unknown");
        assert!(matches!(e, GatewayError::Unknown(_)), "{e}");
    }

    #[test]
    fn session_reports_replace_rows_without_a_bump() {
        let (_d, mut reg) = registry();
        reg.add_gateway("edge-1", 60, [1; 32], NOW, false)
            .expect("add");
        let rev = reg.revision().expect("rev");
        let report = SessionReport {
            at_ms: 10,
            sessions: vec![session(1), session(2)],
            omitted: 0,
        };
        reg.replace_live_sessions("edge-1", &report, 5_000, Some(rev))
            .expect("store");
        let report = SessionReport {
            at_ms: 11,
            sessions: vec![session(3)],
            omitted: 0,
        };
        reg.replace_live_sessions("edge-1", &report, 6_000, Some(rev))
            .expect("store");
        let ids: Vec<u32> = reg
            .conn
            .prepare("SELECT session FROM live_sessions WHERE gateway = 'edge-1'")
            .expect("prepare")
            .query_map([], |r| r.get(0))
            .expect("query")
            .collect::<Result<_, _>>()
            .expect("rows");
        assert_eq!(ids, [3]);
        assert_eq!(reg.revision().expect("rev"), rev);
        let row = &reg.list_gateways(6_000).expect("list")[0];
        assert_eq!(row.last_revision, Some(rev));
        assert!(!row.connected, "no channel mark");
        for bad in [vec![session(0)], vec![session(1), session(1)]] {
            let report = SessionReport {
                at_ms: 1,
                sessions: bad,
                omitted: 0,
            };
            assert!(reg
                .replace_live_sessions("edge-1", &report, 1, None)
                .is_err());
        }
    }
}
