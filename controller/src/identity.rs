//! Identity: users, groups, device lifecycle (rename, delete, risk) and TOTP second factor.
//!
//! Owns: the `users`, `groups` and `group_members` rows, `devices.last_mfa` and
//! `devices.risk`, TOTP enrollment (RFC 6238: SHA-1, 6 digits, 30 s, ±1 step) and TOTP
//! verification with its replay guard and persistent rate limit. Every write runs in one
//! IMMEDIATE transaction with its audit row and a revision bump.
//! Must not touch: invites and enrollment (see `invite`), the client API (see `api`),
//! policy decisions and posture, the schema (see `schema`).

use rusqlite::{params, Connection, OptionalExtension};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::audit;
use crate::proto::snapshot::DeviceRecord;
use crate::registry::{bump, check_device_name_free, device_from_row, Registry, RegistryError};
use crate::validate;

/// Failed codes allowed per user in one rate-limit window.
pub const MAX_TOTP_FAILURES: u32 = 5;
/// Length of the rate-limit window (and of the lockout that ends it), seconds.
pub const TOTP_WINDOW_SECS: u64 = 15 * 60;
/// TOTP time step, seconds.
pub const TOTP_STEP_SECS: u64 = 30;
/// Issuer shown in authenticator apps.
pub const TOTP_ISSUER: &str = "Postern";
/// Length of a generated TOTP secret (160 bits, as RFC 4226 recommends).
pub const TOTP_SECRET_LEN: usize = 20;

/// A user as listed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserRow {
    pub name: String,
    pub disabled: bool,
    /// A TOTP secret is enrolled.
    pub mfa_enrolled: bool,
    /// Groups the user belongs to, sorted.
    pub groups: Vec<String>,
    pub created_at: String,
}

/// A group as listed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupRow {
    pub name: String,
    /// Member user names, sorted.
    pub members: Vec<String>,
    pub created_at: String,
}

/// A fresh TOTP enrollment: shown once to the admin, never stored in this form.
#[derive(Debug)]
pub struct TotpEnrollment {
    /// The secret, base32 without padding (what authenticator apps accept typed in).
    pub secret_base32: Zeroizing<String>,
    /// `otpauth://totp/Postern:USER?secret=...&issuer=Postern` (contains the secret).
    pub uri: Zeroizing<String>,
}

/// A proven second factor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MfaOutcome {
    /// The device's user.
    pub user: String,
    /// The recorded MFA time (`devices.last_mfa`), unix seconds.
    pub last_mfa: u64,
}

/// Why a TOTP code was refused. Messages are one line, for the device's user.
#[derive(Debug, thiserror::Error)]
pub enum TotpError {
    #[error("unknown device {0:?}: enroll it first")]
    UnknownDevice(String),
    #[error("device {0:?} is revoked: ask an administrator")]
    DeviceRevoked(String),
    #[error("user {0:?} is disabled: ask an administrator")]
    UserDisabled(String),
    #[error("user {0:?} has no TOTP enrolled: ask an administrator to run `postern-controller user mfa {0}`")]
    NotEnrolled(String),
    #[error("too many wrong codes: try again in {retry_after_secs} s")]
    Locked { retry_after_secs: u64 },
    #[error("this code was already used: wait for the next code (30 s) and try again")]
    Replayed,
    #[error("wrong code (6 digits from the authenticator app): {remaining} attempts left before a 15-minute lockout")]
    WrongCode { remaining: u32 },
    #[error(transparent)]
    Registry(#[from] RegistryError),
}

impl From<rusqlite::Error> for TotpError {
    fn from(e: rusqlite::Error) -> Self {
        TotpError::Registry(e.into())
    }
}

/// Inserts `user` if it has no row yet (audited as `user.add` with `"auto": true`), inside
/// the caller's write transaction. Returns whether a row was created. No revision bump:
/// the caller bumps once for its whole change.
pub(crate) fn ensure_user(
    conn: &Connection,
    actor: &str,
    user: &str,
) -> Result<bool, RegistryError> {
    validate::user(user)?;
    let n = conn.execute("INSERT OR IGNORE INTO users (name) VALUES (?1)", [user])?;
    if n == 1 {
        audit::record(
            conn,
            actor,
            "user.add",
            user,
            serde_json::json!({ "auto": true }),
        )?;
    }
    Ok(n == 1)
}

/// The device named `name_or_id` (an exact 32-hex id wins over a name).
fn find_device(conn: &Connection, name_or_id: &str) -> Result<DeviceRecord, RegistryError> {
    conn.query_row(
        "SELECT id, name, user, public_key, revoked FROM devices
         WHERE id = ?1 OR name = ?1 ORDER BY (id = ?1) DESC LIMIT 1",
        [name_or_id],
        device_from_row,
    )
    .optional()?
    .ok_or_else(|| RegistryError::UnknownDevice(name_or_id.to_owned()))
}

fn user_exists(conn: &Connection, user: &str) -> Result<bool, RegistryError> {
    Ok(conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM users WHERE name = ?1)",
        [user],
        |r| r.get(0),
    )?)
}

fn require_user(conn: &Connection, user: &str) -> Result<(), RegistryError> {
    if user_exists(conn, user)? {
        Ok(())
    } else {
        Err(RegistryError::UnknownUser(user.to_owned()))
    }
}

fn require_group(conn: &Connection, group: &str) -> Result<(), RegistryError> {
    let exists: bool = conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM groups WHERE name = ?1)",
        [group],
        |r| r.get(0),
    )?;
    if exists {
        Ok(())
    } else {
        Err(RegistryError::UnknownGroup(group.to_owned()))
    }
}

fn to_i64(secs: u64) -> i64 {
    i64::try_from(secs).unwrap_or(i64::MAX)
}

fn to_u64(secs: i64) -> u64 {
    u64::try_from(secs).unwrap_or(0)
}

/// Builds the RFC 6238 generator for `user` with `secret`.
fn totp_for(user: &str, secret: &[u8]) -> Result<totp_rs::Totp, RegistryError> {
    totp_rs::Builder::new()
        .with_algorithm(totp_rs::Algorithm::SHA1)
        .with_digits(6)
        .with_skew(1)
        .with_step_duration(TOTP_STEP_SECS)
        .with_secret(secret)
        .with_issuer(Some(TOTP_ISSUER))
        .with_account_name(user)
        .build()
        .map_err(|e| RegistryError::Corrupt(format!("TOTP for user {user:?}: {e}")))
}

/// Exactly six ASCII digits.
fn is_six_digits(code: &str) -> bool {
    code.len() == 6 && code.bytes().all(|b| b.is_ascii_digit())
}

impl Registry {
    /// Adds a user. Names use 1-128 of `A-Z a-z 0-9 . _ - @ +`.
    pub fn add_user(&mut self, name: &str) -> Result<(), RegistryError> {
        validate::user_name(name)?;
        let (tx, actor) = self.write_tx_as()?;
        if user_exists(&tx, name)? {
            return Err(RegistryError::DuplicateUser(name.to_owned()));
        }
        tx.execute("INSERT INTO users (name) VALUES (?1)", [name])?;
        audit::record(&tx, actor, "user.add", name, serde_json::json!({}))?;
        bump(&tx)?;
        tx.commit()?;
        Ok(())
    }

    /// All users with their groups, ordered by name.
    pub fn list_users(&self) -> Result<Vec<UserRow>, RegistryError> {
        let mut stmt = self.conn.prepare(
            "SELECT u.name, u.disabled, u.totp_secret IS NOT NULL, u.created_at,
                    (SELECT group_concat(grp, char(10)) FROM
                        (SELECT grp FROM group_members m WHERE m.user = u.name ORDER BY grp))
             FROM users u ORDER BY u.name",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok(UserRow {
                name: r.get(0)?,
                disabled: r.get(1)?,
                mfa_enrolled: r.get(2)?,
                created_at: r.get(3)?,
                groups: split_lines(r.get::<_, Option<String>>(4)?),
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Disables or re-enables a user. Returns false (and writes nothing) when the user
    /// already was in that state.
    pub fn set_user_disabled(&mut self, name: &str, disabled: bool) -> Result<bool, RegistryError> {
        let (tx, actor) = self.write_tx_as()?;
        require_user(&tx, name)?;
        let n = tx.execute(
            "UPDATE users SET disabled = ?2 WHERE name = ?1 AND disabled != ?2",
            params![name, disabled],
        )?;
        if n == 0 {
            return Ok(false);
        }
        let action = if disabled {
            "user.disable"
        } else {
            "user.enable"
        };
        audit::record(&tx, actor, action, name, serde_json::json!({}))?;
        bump(&tx)?;
        tx.commit()?;
        Ok(true)
    }

    /// Adds a group. Names use 1-128 of `A-Z a-z 0-9 . _ -`.
    pub fn add_group(&mut self, name: &str) -> Result<(), RegistryError> {
        validate::group_name(name)?;
        let (tx, actor) = self.write_tx_as()?;
        if require_group(&tx, name).is_ok() {
            return Err(RegistryError::DuplicateGroup(name.to_owned()));
        }
        tx.execute("INSERT INTO groups (name) VALUES (?1)", [name])?;
        audit::record(&tx, actor, "group.add", name, serde_json::json!({}))?;
        bump(&tx)?;
        tx.commit()?;
        Ok(())
    }

    /// All groups with their members, ordered by name.
    pub fn list_groups(&self) -> Result<Vec<GroupRow>, RegistryError> {
        let mut stmt = self.conn.prepare(
            "SELECT g.name, g.created_at,
                    (SELECT group_concat(user, char(10)) FROM
                        (SELECT user FROM group_members m WHERE m.grp = g.name ORDER BY user))
             FROM groups g ORDER BY g.name",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok(GroupRow {
                name: r.get(0)?,
                created_at: r.get(1)?,
                members: split_lines(r.get::<_, Option<String>>(2)?),
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Adds `user` to `group`. Returns false (and writes nothing) if it already was a member.
    pub fn add_group_member(&mut self, group: &str, user: &str) -> Result<bool, RegistryError> {
        let (tx, actor) = self.write_tx_as()?;
        require_group(&tx, group)?;
        require_user(&tx, user)?;
        let n = tx.execute(
            "INSERT OR IGNORE INTO group_members (grp, user) VALUES (?1, ?2)",
            params![group, user],
        )?;
        if n == 0 {
            return Ok(false);
        }
        audit::record(
            &tx,
            actor,
            "group.add_member",
            group,
            serde_json::json!({ "user": user }),
        )?;
        bump(&tx)?;
        tx.commit()?;
        Ok(true)
    }

    /// Removes `user` from `group`; refused when it is not a member.
    pub fn remove_group_member(&mut self, group: &str, user: &str) -> Result<(), RegistryError> {
        let (tx, actor) = self.write_tx_as()?;
        require_group(&tx, group)?;
        require_user(&tx, user)?;
        let n = tx.execute(
            "DELETE FROM group_members WHERE grp = ?1 AND user = ?2",
            params![group, user],
        )?;
        if n == 0 {
            return Err(RegistryError::NotGroupMember {
                group: group.to_owned(),
                user: user.to_owned(),
            });
        }
        audit::record(
            &tx,
            actor,
            "group.remove_member",
            group,
            serde_json::json!({ "user": user }),
        )?;
        bump(&tx)?;
        tx.commit()?;
        Ok(())
    }

    /// Renames a device (by name or id). Renaming to its current name changes nothing.
    pub fn rename_device(
        &mut self,
        name_or_id: &str,
        new_name: &str,
    ) -> Result<DeviceRecord, RegistryError> {
        validate::device_name(new_name)?;
        let (tx, actor) = self.write_tx_as()?;
        let mut device = find_device(&tx, name_or_id)?;
        if device.name == new_name {
            return Ok(device);
        }
        check_device_name_free(&tx, new_name)?;
        tx.execute(
            "UPDATE devices SET name = ?2 WHERE id = ?1",
            params![device.id, new_name],
        )?;
        audit::record(
            &tx,
            actor,
            "device.rename",
            new_name,
            serde_json::json!({ "id": device.id, "from": device.name, "to": new_name }),
        )?;
        bump(&tx)?;
        tx.commit()?;
        device.name = new_name.to_owned();
        Ok(device)
    }

    /// Deletes a device (by name or id) with its posture report; returns what was deleted.
    /// Its name and key become free again.
    pub fn delete_device(&mut self, name_or_id: &str) -> Result<DeviceRecord, RegistryError> {
        let (tx, actor) = self.write_tx_as()?;
        let device = find_device(&tx, name_or_id)?;
        tx.execute("DELETE FROM devices WHERE id = ?1", [&device.id])?;
        audit::record(
            &tx,
            actor,
            "device.delete",
            &device.name,
            serde_json::json!({ "id": device.id, "user": device.user, "revoked": device.revoked }),
        )?;
        bump(&tx)?;
        tx.commit()?;
        Ok(device)
    }

    /// Sets a device's risk score (0 = no known risk, 100 = highest). Setting the
    /// current value changes nothing.
    pub fn set_device_risk(
        &mut self,
        name_or_id: &str,
        score: u8,
    ) -> Result<DeviceRecord, RegistryError> {
        if score > 100 {
            return Err(RegistryError::InvalidRisk(u32::from(score)));
        }
        let (tx, actor) = self.write_tx_as()?;
        let device = find_device(&tx, name_or_id)?;
        let old: u8 = tx.query_row(
            "SELECT risk FROM devices WHERE id = ?1",
            [&device.id],
            |r| r.get(0),
        )?;
        if old == score {
            return Ok(device);
        }
        tx.execute(
            "UPDATE devices SET risk = ?2 WHERE id = ?1",
            params![device.id, score],
        )?;
        audit::record(
            &tx,
            actor,
            "device.risk",
            &device.name,
            serde_json::json!({ "id": device.id, "from": old, "to": score }),
        )?;
        bump(&tx)?;
        tx.commit()?;
        Ok(device)
    }

    /// Enrolls `user` in TOTP with a fresh random 160-bit secret, replacing any old one and
    /// resetting the replay guard and rate limit. The returned secret is shown once; the
    /// audit row does not contain it.
    pub fn enroll_totp(
        &mut self,
        user: &str,
        now_unix: u64,
    ) -> Result<TotpEnrollment, RegistryError> {
        let mut secret = Zeroizing::new([0u8; TOTP_SECRET_LEN]);
        getrandom::getrandom(secret.as_mut_slice())
            .map_err(|e| RegistryError::Corrupt(format!("no randomness for a TOTP secret: {e}")))?;
        let totp = totp_for(user, secret.as_slice())?;
        let uri = Zeroizing::new(
            totp.to_url()
                .map_err(|e| RegistryError::Corrupt(format!("TOTP URI for user {user:?}: {e}")))?,
        );
        let secret_base32 = Zeroizing::new(totp.secret().to_base32());
        let (tx, actor) = self.write_tx_as()?;
        require_user(&tx, user)?;
        let replaced: bool = tx.query_row(
            "SELECT totp_secret IS NOT NULL FROM users WHERE name = ?1",
            [user],
            |r| r.get(0),
        )?;
        tx.execute(
            "UPDATE users SET totp_secret = ?2, totp_last_step = NULL, totp_failures = 0,
                 totp_window_start = NULL, totp_locked_until = NULL
             WHERE name = ?1",
            params![user, secret.as_slice()],
        )?;
        audit::record(
            &tx,
            actor,
            "user.mfa_enroll",
            user,
            serde_json::json!({ "replaced": replaced, "at": now_unix }),
        )?;
        bump(&tx)?;
        tx.commit()?;
        Ok(TotpEnrollment { secret_base32, uri })
    }

    /// Checks a TOTP `code` typed on device `device_id` at `now_unix`.
    ///
    /// Refuses unknown and revoked devices, disabled and unenrolled users; a user with
    /// [`MAX_TOTP_FAILURES`] failed codes in a [`TOTP_WINDOW_SECS`] window is locked until
    /// the window ends (even a correct code is refused); a code whose step is not newer
    /// than the last accepted one is a replay. Anything but exactly six ASCII digits is a
    /// wrong code. On success records `devices.last_mfa = now_unix` and bumps the revision.
    /// Every outcome is audited (`mfa.ok` / `mfa.fail`, actor `device:<id>`), never the code.
    pub fn verify_totp(
        &mut self,
        device_id: &str,
        code: &str,
        now_unix: u64,
    ) -> Result<MfaOutcome, TotpError> {
        // Far-future clocks are clamped so step arithmetic cannot overflow.
        let now_unix = now_unix.min(i64::MAX as u64);
        let tx = self.write_tx()?;
        let actor = format!("device:{device_id}");
        let result = verify_in_tx(&tx, device_id, code, now_unix);
        match &result {
            Ok(outcome) => {
                audit::record(
                    &tx,
                    &actor,
                    "mfa.ok",
                    &outcome.user,
                    serde_json::json!({ "device": device_id }),
                )?;
                bump(&tx)?;
            }
            Err(TotpError::Registry(_)) => return result,
            Err(e) => {
                let user: Option<String> = tx
                    .query_row("SELECT user FROM devices WHERE id = ?1", [device_id], |r| {
                        r.get(0)
                    })
                    .optional()?;
                audit::record(
                    &tx,
                    &actor,
                    "mfa.fail",
                    user.as_deref().unwrap_or(device_id),
                    serde_json::json!({ "device": device_id, "reason": fail_reason(e) }),
                )?;
            }
        }
        // Failures commit too: the rate-limit counters must survive.
        tx.commit()?;
        result
    }
}

/// Short machine-readable reason for an audit row.
fn fail_reason(e: &TotpError) -> &'static str {
    match e {
        TotpError::UnknownDevice(_) => "unknown_device",
        TotpError::DeviceRevoked(_) => "device_revoked",
        TotpError::UserDisabled(_) => "user_disabled",
        TotpError::NotEnrolled(_) => "not_enrolled",
        TotpError::Locked { .. } => "locked",
        TotpError::Replayed => "replayed",
        TotpError::WrongCode { .. } => "wrong_code",
        TotpError::Registry(_) => "error",
    }
}

/// User state read for a TOTP check.
struct TotpState {
    disabled: bool,
    secret: Option<Zeroizing<Vec<u8>>>,
    last_step: Option<i64>,
    failures: u32,
    window_start: Option<i64>,
    locked_until: Option<i64>,
}

fn verify_in_tx(
    tx: &Connection,
    device_id: &str,
    code: &str,
    now_unix: u64,
) -> Result<MfaOutcome, TotpError> {
    let device = tx
        .query_row(
            "SELECT id, name, user, public_key, revoked FROM devices WHERE id = ?1",
            [device_id],
            device_from_row,
        )
        .optional()?
        .ok_or_else(|| TotpError::UnknownDevice(device_id.to_owned()))?;
    if device.revoked {
        return Err(TotpError::DeviceRevoked(device.name));
    }
    let user = device.user;
    let state = tx
        .query_row(
            "SELECT disabled, totp_secret, totp_last_step, totp_failures, totp_window_start,
                    totp_locked_until
             FROM users WHERE name = ?1",
            [&user],
            |r| {
                Ok(TotpState {
                    disabled: r.get(0)?,
                    secret: r.get::<_, Option<Vec<u8>>>(1)?.map(Zeroizing::new),
                    last_step: r.get(2)?,
                    failures: r.get(3)?,
                    window_start: r.get(4)?,
                    locked_until: r.get(5)?,
                })
            },
        )
        .optional()?
        .ok_or_else(|| TotpError::NotEnrolled(user.clone()))?;
    if state.disabled {
        return Err(TotpError::UserDisabled(user));
    }
    let Some(secret) = state.secret else {
        return Err(TotpError::NotEnrolled(user));
    };
    let now = to_i64(now_unix);
    if let Some(until) = state.locked_until.filter(|&u| u > now) {
        return Err(TotpError::Locked {
            retry_after_secs: to_u64(until - now),
        });
    }
    // A window that has ended (or a lock that has expired) starts over.
    let window_open = state
        .window_start
        .is_some_and(|start| now < start.saturating_add(to_i64(TOTP_WINDOW_SECS)));
    let (failures, window_start) = if window_open {
        (state.failures, state.window_start)
    } else {
        (0, None)
    };

    let matched = if is_six_digits(code) {
        totp_for(&user, &secret)?.check(code, now_unix)
    } else {
        None
    };
    let refusal = match matched {
        Some(step) if state.last_step.is_some_and(|last| to_i64(step) <= last) => {
            TotpError::Replayed
        }
        Some(step) => {
            tx.execute(
                "UPDATE users SET totp_last_step = ?2, totp_failures = 0,
                     totp_window_start = NULL, totp_locked_until = NULL
                 WHERE name = ?1",
                params![user, to_i64(step)],
            )?;
            tx.execute(
                "UPDATE devices SET last_mfa = ?2 WHERE id = ?1",
                params![device.id, now],
            )?;
            return Ok(MfaOutcome {
                user,
                last_mfa: now_unix,
            });
        }
        None => TotpError::WrongCode { remaining: 0 },
    };
    // A failed attempt (wrong, malformed or replayed code) counts against the window.
    let failures = failures.saturating_add(1);
    let window_start = window_start.unwrap_or(now);
    let locked_until = (failures >= MAX_TOTP_FAILURES)
        .then(|| window_start.saturating_add(to_i64(TOTP_WINDOW_SECS)));
    tx.execute(
        "UPDATE users SET totp_failures = ?2, totp_window_start = ?3, totp_locked_until = ?4
         WHERE name = ?1",
        params![user, failures, window_start, locked_until],
    )?;
    Err(match refusal {
        TotpError::WrongCode { .. } => TotpError::WrongCode {
            remaining: MAX_TOTP_FAILURES.saturating_sub(failures),
        },
        other => other,
    })
}

fn split_lines(joined: Option<String>) -> Vec<String> {
    joined
        .map(|s| s.split('\n').map(str::to_owned).collect())
        .unwrap_or_default()
}
