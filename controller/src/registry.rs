//! The registry: one SQLite file holding devices, apps, grants and the revision counter.
//!
//! Owns: connection settings (WAL, `synchronous=FULL`, foreign keys, busy timeout), every
//! read and write of registry rows, the revision bump that goes with each write, and the
//! consistent `Snapshot` read. Must not touch: the schema definition (see `schema`),
//! sockets or the CLI's presentation.

use std::fs::{DirBuilder, OpenOptions};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{params, Connection, ErrorCode, OpenFlags, OptionalExtension, TransactionBehavior};

use crate::proto::keys::DevicePublicKey;
use crate::proto::snapshot::{AppProtocol, AppRecord, DeviceRecord, GrantRecord, Snapshot};
use crate::schema::{self, SchemaError};
use crate::validate::{self, InvalidForward, InvalidName};

/// How long a writer waits for another process's lock before giving up.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// Everything that can go wrong in the registry. Each message is one line that names the
/// offending input and how to fix it.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("cannot create database directory {}: {source}: create it or pass another --db", path.display())]
    CreateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot open database {}: {source}: check the path and its permissions", path.display())]
    Open {
        path: PathBuf,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("{} is not a postern registry (not an SQLite database): pass the right --db path; the file was not modified", path.display())]
    NotADatabase { path: PathBuf },
    #[error("database {}: {source}", path.display())]
    Schema { path: PathBuf, source: SchemaError },
    #[error(transparent)]
    InvalidName(#[from] InvalidName),
    #[error(transparent)]
    InvalidForward(#[from] InvalidForward),
    #[error("device name {name:?} already exists: pick another name or revoke the old device")]
    DuplicateDeviceName { name: String },
    #[error("device name {name:?} is still held by revoked device {id}: pick another name")]
    DeviceNameHeldByRevoked { name: String, id: String },
    #[error("--key is already registered to device {name:?} (id {id}): each device needs its own key; run `postern keygen` on the new device")]
    DuplicateDeviceKey { name: String, id: String },
    #[error("no device named or with id {0:?}: see `postern-controller device list`")]
    UnknownDevice(String),
    #[error("app {name:?} already exists: pick another name")]
    DuplicateApp { name: String },
    #[error("--port {port}/{protocol} is already used by app {app:?}: each protocol/port pair maps to exactly one app")]
    PortTaken {
        protocol: AppProtocol,
        port: u16,
        app: String,
    },
    #[error("--port 0 is invalid: use a port number from 1 to 65535")]
    InvalidPort,
    #[error("--app {0:?} is not a registered app: add it first with `postern-controller app add {0} --protocol tcp --port N`")]
    UnknownApp(String),
    #[error("unknown user {0:?}: add it with `postern-controller user add {0}`")]
    UnknownUser(String),
    #[error("user {0:?} already exists: pick another name (see `postern-controller user list`)")]
    DuplicateUser(String),
    #[error("unknown group {0:?}: add it with `postern-controller group add {0}`")]
    UnknownGroup(String),
    #[error("group {0:?} already exists: pick another name (see `postern-controller group list`)")]
    DuplicateGroup(String),
    #[error(
        "user {user:?} is not a member of group {group:?}: see `postern-controller group list`"
    )]
    NotGroupMember { group: String, user: String },
    #[error("risk score {0} is invalid: use a number from 0 (no risk) to 100")]
    InvalidRisk(u32),
    #[error("registry corrupt: {0}")]
    Corrupt(String),
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
}

impl RegistryError {
    /// True when the caller's input was rejected (exit code 2), false for runtime failures.
    pub fn is_validation(&self) -> bool {
        matches!(
            self,
            RegistryError::InvalidName(_)
                | RegistryError::InvalidForward(_)
                | RegistryError::DuplicateDeviceName { .. }
                | RegistryError::DeviceNameHeldByRevoked { .. }
                | RegistryError::DuplicateDeviceKey { .. }
                | RegistryError::UnknownDevice(_)
                | RegistryError::DuplicateApp { .. }
                | RegistryError::PortTaken { .. }
                | RegistryError::InvalidPort
                | RegistryError::UnknownApp(_)
                | RegistryError::UnknownUser(_)
                | RegistryError::DuplicateUser(_)
                | RegistryError::UnknownGroup(_)
                | RegistryError::DuplicateGroup(_)
                | RegistryError::NotGroupMember { .. }
                | RegistryError::InvalidRisk(_)
        )
    }
}

/// Result of `revoke_device`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevokeOutcome {
    pub device: DeviceRecord,
    /// The device was already revoked; nothing changed and the revision was not bumped.
    pub already_revoked: bool,
}

/// Result of `add_grant`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrantOutcome {
    pub grant: GrantRecord,
    /// The grant existed already; nothing changed and the revision was not bumped.
    pub already_granted: bool,
}

/// A device row as listed for humans (the record plus its creation time).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceRow {
    pub record: DeviceRecord,
    pub created_at: String,
    /// Unix time of the last MFA proof from this device (`None`: never).
    pub last_mfa: Option<u64>,
    /// Risk score 0-100 (admin- or API-set; 0 = no known risk).
    pub risk: u8,
}

/// An open registry database. One per thread; SQLite (WAL) arbitrates between processes.
#[derive(Debug)]
pub struct Registry {
    pub(crate) conn: Connection,
    path: PathBuf,
    /// Recorded as the actor of every audit row this handle writes.
    actor: String,
}

impl Registry {
    /// Opens (creating if missing, mode 0600, parent directory 0700) and migrates the
    /// registry at `path`. Refuses files that are not SQLite databases and databases
    /// with a newer schema than this binary knows, without modifying them.
    pub fn open(path: &Path) -> Result<Self, RegistryError> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            if !parent.exists() {
                DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(parent)
                    .map_err(|source| RegistryError::CreateDir {
                        path: parent.to_owned(),
                        source,
                    })?;
            }
        }
        // Create the file ourselves so it gets 0600; SQLite gives -wal/-shm the same mode.
        if !path.exists() {
            OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .open(path)
                .map_err(|e| RegistryError::Open {
                    path: path.to_owned(),
                    source: Box::new(e),
                })?;
        }
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX
            | OpenFlags::SQLITE_OPEN_URI;
        let mut conn = Connection::open_with_flags(path, flags).map_err(|e| open_err(path, e))?;
        conn.busy_timeout(BUSY_TIMEOUT)
            .map_err(|e| open_err(path, e))?;
        // First real read of the file: detects garbage before anything is written.
        let version = schema::current_version(&conn).map_err(|e| open_err(path, e))?;
        if version > schema::LATEST_VERSION {
            return Err(RegistryError::Schema {
                path: path.to_owned(),
                source: SchemaError::TooNew {
                    found: version,
                    supported: schema::LATEST_VERSION,
                },
            });
        }
        let mode: String = conn
            .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))
            .map_err(|e| open_err(path, e))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(RegistryError::Open {
                path: path.to_owned(),
                source: format!("journal_mode is {mode}, WAL could not be enabled").into(),
            });
        }
        conn.execute_batch("PRAGMA synchronous=FULL; PRAGMA foreign_keys=ON;")
            .map_err(|e| open_err(path, e))?;
        schema::migrate(&mut conn).map_err(|source| match source {
            SchemaError::Sqlite(e) => open_err(path, e),
            source => RegistryError::Schema {
                path: path.to_owned(),
                source,
            },
        })?;
        Ok(Self {
            conn,
            path: path.to_owned(),
            actor: crate::audit::DEFAULT_ACTOR.to_owned(),
        })
    }

    /// Sets who the audit rows written through this handle name as actor
    /// (default `admin`; e.g. `admin:uid=0`).
    pub fn set_actor(&mut self, actor: impl Into<String>) {
        self.actor = actor.into();
    }

    /// The actor recorded in audit rows.
    pub fn actor(&self) -> &str {
        &self.actor
    }

    /// The newest `limit` audit rows, oldest first.
    pub fn list_audit(&self, limit: u32) -> Result<Vec<crate::audit::AuditRow>, RegistryError> {
        crate::audit::list(&self.conn, limit)
    }

    /// The database file path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The connection's `(journal_mode, synchronous, foreign_keys)` pragmas, for checks.
    pub fn settings(&self) -> Result<(String, i64, bool), RegistryError> {
        let mode = self
            .conn
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))?;
        let sync = self
            .conn
            .query_row("PRAGMA synchronous", [], |r| r.get(0))?;
        let fk = self
            .conn
            .query_row("PRAGMA foreign_keys", [], |r| r.get(0))?;
        Ok((mode, sync, fk))
    }

    /// The current revision; every committed write increments it by one.
    pub fn revision(&self) -> Result<u64, RegistryError> {
        read_revision(&self.conn)
    }

    /// Registers a device. The id is derived from the key; names and keys are unique.
    pub fn add_device(
        &mut self,
        name: &str,
        user: &str,
        key: &DevicePublicKey,
    ) -> Result<DeviceRecord, RegistryError> {
        validate::device_name(name)?;
        validate::user(user)?;
        let record = DeviceRecord {
            id: key.device_id().to_string(),
            name: name.to_owned(),
            user: user.to_owned(),
            public_key: key.to_text(),
            revoked: false,
        };
        let (tx, actor) = self.write_tx_as()?;
        crate::identity::ensure_user(&tx, actor, user)?;
        insert_device(&tx, &record)?;
        crate::audit::record(
            &tx,
            actor,
            "device.add",
            &record.name,
            serde_json::json!({ "id": record.id, "user": record.user, "public_key": record.public_key }),
        )?;
        bump(&tx)?;
        tx.commit()?;
        Ok(record)
    }

    /// All devices (revoked ones included), ordered by name.
    pub fn list_devices(&self) -> Result<Vec<DeviceRow>, RegistryError> {
        let mut stmt = self.conn.prepare(
            "SELECT id, name, user, public_key, revoked, created_at, last_mfa, risk
             FROM devices ORDER BY name",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok(DeviceRow {
                record: device_from_row(r)?,
                created_at: r.get(5)?,
                last_mfa: r
                    .get::<_, Option<i64>>(6)?
                    .map(|t| u64::try_from(t).unwrap_or(0)),
                risk: r.get(7)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Revokes a device by name or by 32-hex id. Revoking a revoked device is a no-op
    /// reported through `already_revoked`.
    pub fn revoke_device(&mut self, name_or_id: &str) -> Result<RevokeOutcome, RegistryError> {
        let (tx, actor) = self.write_tx_as()?;
        let found = tx
            .query_row(
                "SELECT id, name, user, public_key, revoked FROM devices
                 WHERE id = ?1 OR name = ?1 ORDER BY (id = ?1) DESC LIMIT 1",
                [name_or_id],
                device_from_row,
            )
            .optional()?;
        let Some(mut device) = found else {
            return Err(RegistryError::UnknownDevice(name_or_id.to_owned()));
        };
        if device.revoked {
            return Ok(RevokeOutcome {
                device,
                already_revoked: true,
            });
        }
        tx.execute("UPDATE devices SET revoked = 1 WHERE id = ?1", [&device.id])?;
        crate::audit::record(
            &tx,
            actor,
            "device.revoke",
            &device.name,
            serde_json::json!({ "id": device.id, "user": device.user }),
        )?;
        bump(&tx)?;
        tx.commit()?;
        device.revoked = true;
        Ok(RevokeOutcome {
            device,
            already_revoked: false,
        })
    }

    /// Registers an app. Names follow the knock packet's charset; each (protocol, port)
    /// belongs to one app.
    pub fn add_app(
        &mut self,
        name: &str,
        protocol: AppProtocol,
        port: u16,
    ) -> Result<AppRecord, RegistryError> {
        self.add_app_forward(name, protocol, port, None)
    }

    /// Registers an app, optionally in forward mode: knocks for it open `protocol`/`port`
    /// on the gateway, and the gateway forwards those connections to `forward` on its
    /// internal network (checked with [`validate::forward`]).
    pub fn add_app_forward(
        &mut self,
        name: &str,
        protocol: AppProtocol,
        port: u16,
        forward: Option<std::net::SocketAddr>,
    ) -> Result<AppRecord, RegistryError> {
        validate::app_name(name)?;
        let forward_text = match forward {
            Some(f) => Some(validate::forward(&f.to_string())?.to_string()),
            None => None,
        };
        if port == 0 {
            return Err(RegistryError::InvalidPort);
        }
        let proto_text = protocol.to_string();
        let (tx, actor) = self.write_tx_as()?;
        let exists: bool = tx.query_row(
            "SELECT EXISTS (SELECT 1 FROM apps WHERE name = ?1)",
            [name],
            |r| r.get(0),
        )?;
        if exists {
            return Err(RegistryError::DuplicateApp {
                name: name.to_owned(),
            });
        }
        if let Some(app) = tx
            .query_row(
                "SELECT name FROM apps WHERE protocol = ?1 AND port = ?2",
                params![proto_text, port],
                |r| r.get::<_, String>(0),
            )
            .optional()?
        {
            return Err(RegistryError::PortTaken {
                protocol,
                port,
                app,
            });
        }
        tx.execute(
            "INSERT INTO apps (name, protocol, port, forward) VALUES (?1, ?2, ?3, ?4)",
            params![name, proto_text, port, forward_text],
        )?;
        crate::audit::record(
            &tx,
            actor,
            "app.add",
            name,
            serde_json::json!({ "protocol": proto_text, "port": port, "forward": forward_text }),
        )?;
        bump(&tx)?;
        tx.commit()?;
        Ok(AppRecord {
            name: name.to_owned(),
            protocol,
            port,
            forward,
        })
    }

    /// All apps, ordered by name.
    pub fn list_apps(&self) -> Result<Vec<AppRecord>, RegistryError> {
        list_apps(&self.conn)
    }

    /// Grants `user` access to `app`. Granting twice is a no-op reported through
    /// `already_granted`.
    pub fn add_grant(&mut self, app: &str, user: &str) -> Result<GrantOutcome, RegistryError> {
        validate::user(user)?;
        let grant = GrantRecord {
            app: app.to_owned(),
            user: user.to_owned(),
        };
        let (tx, actor) = self.write_tx_as()?;
        let app_exists: bool = tx.query_row(
            "SELECT EXISTS (SELECT 1 FROM apps WHERE name = ?1)",
            [app],
            |r| r.get(0),
        )?;
        if !app_exists {
            return Err(RegistryError::UnknownApp(app.to_owned()));
        }
        let inserted = tx.execute(
            "INSERT INTO grants (app, user) VALUES (?1, ?2) ON CONFLICT DO NOTHING",
            params![app, user],
        )?;
        if inserted == 0 {
            return Ok(GrantOutcome {
                grant,
                already_granted: true,
            });
        }
        crate::identity::ensure_user(&tx, actor, user)?;
        crate::audit::record(
            &tx,
            actor,
            "grant.add",
            app,
            serde_json::json!({ "user": user }),
        )?;
        bump(&tx)?;
        tx.commit()?;
        Ok(GrantOutcome {
            grant,
            already_granted: false,
        })
    }

    /// All grants, ordered by app then user.
    pub fn list_grants(&self) -> Result<Vec<GrantRecord>, RegistryError> {
        list_grants(&self.conn)
    }

    /// Everything the gateway needs, read in one transaction so the revision matches the rows.
    pub fn snapshot(&mut self) -> Result<Snapshot, RegistryError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Deferred)?;
        let revision = read_revision(&tx)?;
        let devices = {
            let mut stmt = tx
                .prepare("SELECT id, name, user, public_key, revoked FROM devices ORDER BY name")?;
            let rows = stmt.query_map([], device_from_row)?;
            rows.collect::<Result<Vec<_>, _>>()?
        };
        let apps = list_apps(&tx)?;
        // A disabled user's grants do not reach gateways (their sessions close at once);
        // `grant list` still shows them, and `user enable` brings them back.
        let disabled: std::collections::HashSet<String> = {
            let mut stmt = tx.prepare("SELECT name FROM users WHERE disabled = 1")?;
            let rows = stmt.query_map([], |r| r.get(0))?;
            rows.collect::<Result<_, _>>()?
        };
        let mut grants = list_grants(&tx)?;
        grants.retain(|g| !disabled.contains(&g.user));
        let policy = crate::policy_store::snapshot_policy(&tx)?;
        let kills = crate::sessions::snapshot_kills(&tx, unix_secs_now())?;
        tx.finish()?;
        Ok(Snapshot {
            revision,
            devices,
            apps,
            grants,
            access: policy.access,
            denials: policy.denials,
            // Absent when there are none, so a registry without kills sends what it did.
            kills: (!kills.is_empty()).then_some(kills),
            policy: policy.policy,
            subjects: policy.subjects,
        })
    }

    /// A write transaction together with the audit actor (split borrow of `self`).
    pub(crate) fn write_tx_as(
        &mut self,
    ) -> Result<(rusqlite::Transaction<'_>, &str), RegistryError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        Ok((tx, &self.actor))
    }

    pub(crate) fn write_tx(&mut self) -> Result<rusqlite::Transaction<'_>, RegistryError> {
        Ok(self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?)
    }
}

fn open_err(path: &Path, e: rusqlite::Error) -> RegistryError {
    if e.sqlite_error_code() == Some(ErrorCode::NotADatabase) {
        RegistryError::NotADatabase {
            path: path.to_owned(),
        }
    } else {
        RegistryError::Open {
            path: path.to_owned(),
            source: Box::new(e),
        }
    }
}

/// The wall clock in unix seconds (0 if it reads before 1970).
fn unix_secs_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn read_revision(conn: &Connection) -> Result<u64, RegistryError> {
    let rev: i64 = conn.query_row("SELECT revision FROM meta WHERE id = 1", [], |r| r.get(0))?;
    u64::try_from(rev).map_err(|_| RegistryError::Corrupt(format!("negative revision {rev}")))
}

pub(crate) fn bump(conn: &Connection) -> Result<(), RegistryError> {
    let n = conn.execute("UPDATE meta SET revision = revision + 1 WHERE id = 1", [])?;
    if n != 1 {
        return Err(RegistryError::Corrupt("meta row missing".into()));
    }
    Ok(())
}

/// Inserts a device row inside the caller's write transaction after checking that its name
/// and key are free (no revision bump: the caller bumps once per transaction).
pub(crate) fn insert_device(tx: &Connection, record: &DeviceRecord) -> Result<(), RegistryError> {
    check_device_name_free(tx, &record.name)?;
    if let Some((name, id)) = tx
        .query_row(
            "SELECT name, id FROM devices WHERE public_key = ?1 OR id = ?2",
            params![record.public_key, record.id],
            |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)),
        )
        .optional()?
    {
        return Err(RegistryError::DuplicateDeviceKey { name, id });
    }
    tx.execute(
        "INSERT INTO devices (id, name, user, public_key, revoked) VALUES (?1, ?2, ?3, ?4, 0)",
        params![record.id, record.name, record.user, record.public_key],
    )?;
    Ok(())
}

/// Refuses `name` when any device (revoked ones included) holds it.
pub(crate) fn check_device_name_free(conn: &Connection, name: &str) -> Result<(), RegistryError> {
    if let Some((id, revoked)) = conn
        .query_row(
            "SELECT id, revoked FROM devices WHERE name = ?1",
            [name],
            |r| Ok((r.get::<_, String>(0)?, r.get::<_, bool>(1)?)),
        )
        .optional()?
    {
        return Err(if revoked {
            RegistryError::DeviceNameHeldByRevoked {
                name: name.to_owned(),
                id,
            }
        } else {
            RegistryError::DuplicateDeviceName {
                name: name.to_owned(),
            }
        });
    }
    Ok(())
}

pub(crate) fn device_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<DeviceRecord> {
    Ok(DeviceRecord {
        id: r.get(0)?,
        name: r.get(1)?,
        user: r.get(2)?,
        public_key: r.get(3)?,
        revoked: r.get(4)?,
    })
}

fn list_apps(conn: &Connection) -> Result<Vec<AppRecord>, RegistryError> {
    let mut stmt = conn.prepare("SELECT name, protocol, port, forward FROM apps ORDER BY name")?;
    let rows = stmt.query_map([], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, u16>(2)?,
            r.get::<_, Option<String>>(3)?,
        ))
    })?;
    let mut apps = Vec::new();
    for row in rows {
        let (name, proto, port, forward) = row?;
        let protocol = proto
            .parse::<AppProtocol>()
            .map_err(|_| RegistryError::Corrupt(format!("app {name:?} has protocol {proto:?}")))?;
        let forward = match forward {
            Some(text) => Some(validate::forward(&text).map_err(|_| {
                RegistryError::Corrupt(format!("app {name:?} has forward target {text:?}"))
            })?),
            None => None,
        };
        apps.push(AppRecord {
            name,
            protocol,
            port,
            forward,
        });
    }
    Ok(apps)
}

fn list_grants(conn: &Connection) -> Result<Vec<GrantRecord>, RegistryError> {
    let mut stmt = conn.prepare("SELECT app, user FROM grants ORDER BY app, user")?;
    let rows = stmt.query_map([], |r| {
        Ok(GrantRecord {
            app: r.get(0)?,
            user: r.get(1)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}
