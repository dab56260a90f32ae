//! The audit trail: one row per registry change or API decision in the `audit` table.
//!
//! Owns: writing audit rows (always inside the caller's write transaction, so a change and
//! its audit row commit together or not at all) and reading them back for `audit list`.
//! Must not touch: what is audited (callers decide) or the table's layout (see `schema`).
//! Never pass a secret (TOTP secret, invite token, private key) in `detail`.

use rusqlite::{params, Connection};
use serde::{Deserialize, Serialize};

use crate::registry::RegistryError;

/// The actor recorded for admin CLI changes when nobody said otherwise.
pub const DEFAULT_ACTOR: &str = "admin";

/// One audit row as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditRow {
    /// Monotonic row id (oldest first).
    pub id: i64,
    /// UTC time with milliseconds, `YYYY-MM-DDTHH:MM:SS.sssZ`.
    pub at: String,
    /// Who did it: `admin`, `admin:uid=N`, `device:<id>`, `api`...
    pub actor: String,
    /// What was done: `device.add`, `user.disable`, `mfa.ok`...
    pub action: String,
    /// What it was done to (a device, user, group or app name).
    pub subject: String,
    /// Structured detail (never a secret).
    pub detail: serde_json::Value,
}

/// Detail accepted by [`record`]: a JSON value, or JSON text (text that is not JSON is
/// stored as `{"text": ...}` so the column always holds JSON).
pub trait AuditDetail {
    /// The JSON text to store.
    fn into_json_text(self) -> String;
}

impl AuditDetail for serde_json::Value {
    fn into_json_text(self) -> String {
        self.to_string()
    }
}

impl AuditDetail for &serde_json::Value {
    fn into_json_text(self) -> String {
        self.to_string()
    }
}

impl AuditDetail for &str {
    fn into_json_text(self) -> String {
        match serde_json::from_str::<serde_json::Value>(self) {
            Ok(v) => v.to_string(),
            Err(_) => serde_json::json!({ "text": self }).to_string(),
        }
    }
}

impl AuditDetail for &String {
    fn into_json_text(self) -> String {
        self.as_str().into_json_text()
    }
}

/// Appends one audit row. Call it on the write transaction that makes the change.
pub fn record(
    conn: &Connection,
    actor: &str,
    action: &str,
    subject: &str,
    detail: impl AuditDetail,
) -> Result<(), RegistryError> {
    conn.execute(
        "INSERT INTO audit (actor, action, subject, detail) VALUES (?1, ?2, ?3, ?4)",
        params![actor, action, subject, detail.into_json_text()],
    )?;
    Ok(())
}

/// The newest `limit` rows, returned oldest first.
pub fn list(conn: &Connection, limit: u32) -> Result<Vec<AuditRow>, RegistryError> {
    let mut stmt = conn.prepare(
        "SELECT id, at, actor, action, subject, detail FROM
           (SELECT * FROM audit ORDER BY id DESC LIMIT ?1)
         ORDER BY id",
    )?;
    let rows = stmt.query_map([limit], |r| {
        Ok((
            r.get::<_, i64>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, String>(2)?,
            r.get::<_, String>(3)?,
            r.get::<_, String>(4)?,
            r.get::<_, String>(5)?,
        ))
    })?;
    let mut out = Vec::new();
    for row in rows {
        let (id, at, actor, action, subject, detail) = row?;
        let detail = serde_json::from_str(&detail).map_err(|e| {
            RegistryError::Corrupt(format!("audit row {id} detail is not JSON: {e}"))
        })?;
        out.push(AuditRow {
            id,
            at,
            actor,
            action,
            subject,
            detail,
        });
    }
    Ok(out)
}
