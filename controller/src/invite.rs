//! One-time enrollment invites: `device invite` creates one, `POST /v1/enroll` redeems it.
//!
//! Owns: the `invites` table (only hex(SHA-256(secret)) is stored, never the secret),
//! the `--expires` syntax (1m..30d), and the redeem transaction: the device row, the
//! invite's `used_at`, the revision bump and the audit record commit together or not at
//! all. The token text format is `postern_protocol::api_auth::InviteToken`.
//! Must not touch: HTTP (see `api`), the TLS identity (see `api_identity`; the caller
//! passes the certificate fingerprint in) or the audit table's layout (see `audit`).

use rusqlite::{params, OptionalExtension as _};

use crate::proto::keys::DevicePublicKey;
use crate::proto::snapshot::DeviceRecord;
use crate::registry::{bump, check_device_name_free, insert_device, Registry, RegistryError};
use crate::{audit, validate};
use postern_protocol::api_auth::{sha256_hex, InviteToken};

/// Shortest accepted invite lifetime, seconds.
pub const MIN_EXPIRY_SECS: u64 = 60;
/// Longest accepted invite lifetime, seconds (30 days).
pub const MAX_EXPIRY_SECS: u64 = 30 * 24 * 3600;
/// Default invite lifetime (`--expires 24h`).
pub const DEFAULT_EXPIRY_SECS: u64 = 24 * 3600;

/// Why an invite could not be created or redeemed. One line each, naming the fix.
#[derive(Debug, thiserror::Error)]
pub enum InviteError {
    #[error("--expires {0:?}: use a duration from 1m to 30d such as 30m, 24h or 7d")]
    BadExpiry(String),
    #[error("user {0:?} does not exist: add it first with `postern-controller user add {0}`")]
    UnknownUser(String),
    #[error("user {0:?} is disabled: enable the user or invite a device for another user")]
    DisabledUser(String),
    #[error("invite token is not known to this controller: check that the whole token was copied, or ask the admin for a new one")]
    UnknownToken,
    #[error("invite already used at {0}; ask the admin for a new one")]
    AlreadyUsed(String),
    #[error("invite expired at {0}; ask the admin for a new one")]
    Expired(String),
    #[error("public_key {0:?} is not a device public key: send the \"ed25519:...\" key printed by `postern keygen`")]
    BadPublicKey(String),
    #[error("cannot read the OS random number generator: {0}")]
    Random(String),
    #[error(transparent)]
    Registry(#[from] RegistryError),
}

impl InviteError {
    /// True when the caller's input was refused (exit code 2 / an HTTP 4xx), false for
    /// runtime failures.
    pub fn is_validation(&self) -> bool {
        match self {
            InviteError::Random(_) => false,
            InviteError::Registry(r) => r.is_validation(),
            _ => true,
        }
    }
}

/// A freshly created invite. The token is shown once and never stored.
#[derive(Debug)]
pub struct CreatedInvite {
    pub token: InviteToken,
    pub device_name: String,
    pub user: String,
    /// Unix seconds.
    pub expires_at: u64,
}

/// Parses `--expires`: a positive whole number followed by `m`, `h` or `d`, 1m..30d.
pub fn parse_expiry(text: &str) -> Result<u64, InviteError> {
    let bad = || InviteError::BadExpiry(text.to_owned());
    let (digits, unit) = text.split_at(text.len().saturating_sub(1));
    let unit_secs = match unit {
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(bad()),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) || digits.len() > 6 {
        return Err(bad());
    }
    let n: u64 = digits.parse().map_err(|_| bad())?;
    let secs = n * unit_secs;
    if !(MIN_EXPIRY_SECS..=MAX_EXPIRY_SECS).contains(&secs) {
        return Err(bad());
    }
    Ok(secs)
}

/// RFC 3339 UTC text of a unix time (for messages and JSON).
pub fn format_unix(secs: u64) -> String {
    i64::try_from(secs)
        .ok()
        .and_then(|s| jiff::Timestamp::from_second(s).ok())
        .map_or_else(|| format!("unix {secs}"), |t| t.to_string())
}

impl Registry {
    /// Creates a one-time invite for a new device `name` owned by `user`, valid for
    /// `ttl_secs` from `now`. `cert_sha256` is the API certificate fingerprint the token
    /// carries for pinning.
    pub fn create_invite(
        &mut self,
        name: &str,
        user: &str,
        ttl_secs: u64,
        cert_sha256: [u8; 32],
        now: u64,
    ) -> Result<CreatedInvite, InviteError> {
        validate::device_name(name).map_err(RegistryError::from)?;
        validate::user(user).map_err(RegistryError::from)?;
        let mut secret = zeroize::Zeroizing::new([0u8; 32]);
        getrandom::getrandom(secret.as_mut()).map_err(|e| InviteError::Random(e.to_string()))?;
        let token = InviteToken::new(*secret, cert_sha256);
        let expires_at = now.saturating_add(ttl_secs);
        let (tx, actor) = self.write_tx_as()?;
        check_user(&tx, user)?;
        check_device_name_free(&tx, name)?;
        tx.execute(
            "INSERT INTO invites (token_hash, device_name, user, expires_at) VALUES (?1, ?2, ?3, ?4)",
            params![token.secret_hash_hex(), name, user, to_i64(expires_at)],
        )
        .map_err(RegistryError::from)?;
        audit::record(
            &tx,
            actor,
            "device.invite",
            name,
            serde_json::json!({ "user": user, "expires_at": format_unix(expires_at) }),
        )?;
        tx.commit().map_err(RegistryError::from)?;
        Ok(CreatedInvite {
            token,
            device_name: name.to_owned(),
            user: user.to_owned(),
            expires_at,
        })
    }

    /// Redeems an invite: registers `public_key_text` as the invited device (its user
    /// comes from the invite) and marks the invite used, in one transaction with the
    /// revision bump and the audit record. Unknown, used and expired tokens are refused.
    pub fn redeem_invite(
        &mut self,
        secret: &[u8; 32],
        public_key_text: &str,
        now: u64,
    ) -> Result<DeviceRecord, InviteError> {
        let key = DevicePublicKey::from_text(public_key_text)
            .map_err(|_| InviteError::BadPublicKey(public_key_text.chars().take(80).collect()))?;
        let hash = sha256_hex(secret);
        let tx = self.write_tx()?;
        let row = tx
            .query_row(
                "SELECT device_name, user, expires_at, used_at FROM invites WHERE token_hash = ?1",
                [&hash],
                |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, i64>(2)?,
                        r.get::<_, Option<i64>>(3)?,
                    ))
                },
            )
            .optional()
            .map_err(RegistryError::from)?;
        let Some((name, user, expires_at, used_at)) = row else {
            return Err(InviteError::UnknownToken);
        };
        if let Some(used) = used_at {
            return Err(InviteError::AlreadyUsed(format_unix(to_u64(used))));
        }
        if to_i64(now) >= expires_at {
            return Err(InviteError::Expired(format_unix(to_u64(expires_at))));
        }
        check_user(&tx, &user)?;
        let record = DeviceRecord {
            id: key.device_id().to_string(),
            name,
            user,
            public_key: key.to_text(),
            revoked: false,
        };
        insert_device(&tx, &record)?;
        let marked = tx
            .execute(
                "UPDATE invites SET used_at = ?1, used_by = ?2 WHERE token_hash = ?3 AND used_at IS NULL",
                params![to_i64(now), record.id, hash],
            )
            .map_err(RegistryError::from)?;
        if marked != 1 {
            return Err(
                RegistryError::Corrupt("invite row changed under the write lock".into()).into(),
            );
        }
        bump(&tx)?;
        audit::record(
            &tx,
            &format!("device:{}", record.id),
            "device.enroll",
            &record.name,
            serde_json::json!({ "user": record.user, "device_id": record.id }),
        )?;
        tx.commit().map_err(RegistryError::from)?;
        Ok(record)
    }
}

fn check_user(conn: &rusqlite::Connection, user: &str) -> Result<(), InviteError> {
    let disabled = conn
        .query_row("SELECT disabled FROM users WHERE name = ?1", [user], |r| {
            r.get::<_, bool>(0)
        })
        .optional()
        .map_err(RegistryError::from)?;
    match disabled {
        None => Err(InviteError::UnknownUser(user.to_owned())),
        Some(true) => Err(InviteError::DisabledUser(user.to_owned())),
        Some(false) => Ok(()),
    }
}

fn to_i64(secs: u64) -> i64 {
    i64::try_from(secs).unwrap_or(i64::MAX)
}

fn to_u64(secs: i64) -> u64 {
    u64::try_from(secs).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::keys::DeviceSigningKey;

    const NOW: u64 = 1_795_000_000;

    fn registry() -> (tempfile::TempDir, Registry) {
        let dir = tempfile::tempdir().expect("tempdir");
        let reg = Registry::open(&dir.path().join("r.db")).expect("open");
        reg.conn
            .execute("INSERT INTO users (name) VALUES ('alice')", [])
            .expect("user");
        (dir, reg)
    }

    fn pk(b: u8) -> String {
        DeviceSigningKey::from_seed([b; 32]).public_key().to_text()
    }

    #[test]
    fn expiry_syntax_and_bounds() {
        assert_eq!(parse_expiry("1m").expect("1m"), 60);
        assert_eq!(parse_expiry("24h").expect("24h"), 86_400);
        assert_eq!(parse_expiry("30d").expect("30d"), MAX_EXPIRY_SECS);
        for bad in [
            "", "m", "0m", "31d", "721h", "1s", "-1h", "1.5h", "1 h", "h1", "9999999d",
        ] {
            let e = parse_expiry(bad).expect_err(bad).to_string();
            assert!(e.starts_with("--expires"), "{e}");
        }
    }

    #[test]
    fn invite_redeems_once_and_expires() {
        let (_d, mut reg) = registry();
        let rev0 = reg.revision().expect("rev");
        let inv = reg
            .create_invite("laptop", "alice", 3600, [1; 32], NOW)
            .expect("invite");
        let stored: String = reg
            .conn
            .query_row("SELECT token_hash FROM invites", [], |r| r.get(0))
            .expect("row");
        assert_eq!(
            stored,
            sha256_hex(inv.token.secret()),
            "only the hash is stored"
        );
        let dev = reg
            .redeem_invite(inv.token.secret(), &pk(1), NOW + 10)
            .expect("redeem");
        assert_eq!((dev.name.as_str(), dev.user.as_str()), ("laptop", "alice"));
        assert_eq!(reg.revision().expect("rev"), rev0 + 1);
        let again = reg
            .redeem_invite(inv.token.secret(), &pk(2), NOW + 20)
            .expect_err("reuse");
        assert!(
            again
                .to_string()
                .starts_with("invite already used at 2026-"),
            "{again}"
        );
        let late = reg
            .create_invite("phone", "alice", 60, [1; 32], NOW)
            .expect("invite 2");
        let err = reg
            .redeem_invite(late.token.secret(), &pk(3), NOW + 60)
            .expect_err("expired");
        assert!(matches!(err, InviteError::Expired(_)), "{err}");
        assert!(matches!(
            reg.redeem_invite(&[9; 32], &pk(3), NOW),
            Err(InviteError::UnknownToken)
        ));
    }

    #[test]
    fn invite_needs_a_known_user_and_a_free_name() {
        let (_d, mut reg) = registry();
        let e = reg
            .create_invite("laptop", "bob", 3600, [1; 32], NOW)
            .expect_err("unknown user");
        assert!(
            e.to_string().contains("postern-controller user add bob"),
            "{e}"
        );
        reg.add_device(
            "laptop",
            "alice",
            &DevicePublicKey::from_text(&pk(5)).expect("pk"),
        )
        .expect("device");
        let e = reg
            .create_invite("laptop", "alice", 3600, [1; 32], NOW)
            .expect_err("taken");
        assert!(e.is_validation(), "{e}");
        assert!(e.to_string().contains("already exists"), "{e}");
    }

    #[test]
    fn failed_redeem_leaves_invite_unused() {
        let (_d, mut reg) = registry();
        let inv = reg
            .create_invite("laptop", "alice", 3600, [1; 32], NOW)
            .expect("invite");
        reg.add_device(
            "other",
            "alice",
            &DevicePublicKey::from_text(&pk(1)).expect("pk"),
        )
        .expect("device");
        let e = reg
            .redeem_invite(inv.token.secret(), &pk(1), NOW)
            .expect_err("key already registered");
        assert!(e.to_string().contains("already registered"), "{e}");
        reg.redeem_invite(inv.token.secret(), &pk(2), NOW)
            .expect("the invite still works with a fresh key");
    }
}
