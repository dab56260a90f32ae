//! Versioned schema migrations for the registry database, keyed by `PRAGMA user_version`.
//!
//! Owns: the table definitions and the ordered list of migrations, and the rule that a
//! database written by a newer binary is refused (never reset or downgraded).
//! Must not touch: connection settings (journal mode, sync level: see `registry`) or data.

use rusqlite::{Connection, TransactionBehavior};

/// Migration `i` (0-based) moves the schema from `user_version == i` to `i + 1`.
/// Append only: never edit a migration that has shipped.
const MIGRATIONS: &[&str] = &[
    // 1: initial registry.
    r#"
    CREATE TABLE meta (
        id       INTEGER PRIMARY KEY CHECK (id = 1),
        revision INTEGER NOT NULL CHECK (revision >= 0)
    );
    -- Revision starts at 1 so a gateway asking `after_revision: 0` gets an answer at once.
    INSERT INTO meta (id, revision) VALUES (1, 1);

    CREATE TABLE devices (
        id         TEXT PRIMARY KEY CHECK (length(id) = 32 AND id NOT GLOB '*[^0-9a-f]*'),
        name       TEXT NOT NULL UNIQUE CHECK (length(name) BETWEEN 1 AND 64),
        user       TEXT NOT NULL CHECK (length(user) BETWEEN 1 AND 128),
        public_key TEXT NOT NULL UNIQUE,
        revoked    INTEGER NOT NULL DEFAULT 0 CHECK (revoked IN (0, 1)),
        created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%SZ', 'now'))
    );

    CREATE TABLE apps (
        name     TEXT PRIMARY KEY CHECK (length(name) BETWEEN 1 AND 64),
        protocol TEXT NOT NULL CHECK (protocol IN ('tcp', 'udp')),
        port     INTEGER NOT NULL CHECK (port BETWEEN 1 AND 65535),
        UNIQUE (protocol, port)
    );

    CREATE TABLE grants (
        app  TEXT NOT NULL REFERENCES apps (name) ON DELETE CASCADE,
        user TEXT NOT NULL CHECK (length(user) BETWEEN 1 AND 128),
        PRIMARY KEY (app, user)
    );
    "#,
    // 2: forward mode (connector): an app may live on an internal host behind the gateway.
    // `forward` is `IP:PORT` / `[IPv6]:PORT` text as Rust's `SocketAddr` prints it; NULL means
    // the app listens on the gateway host itself.
    r#"
    ALTER TABLE apps ADD COLUMN forward TEXT
        CHECK (forward IS NULL OR length(forward) BETWEEN 9 AND 47);
    "#,
    // 3: identity, MFA, posture and policy (issue 3). Users that devices and grants
    // already name become rows of `users`, so nothing that worked before stops working.
    // Times are unix seconds (INTEGER) unless the column is a human `*_at` TEXT stamp.
    r#"
    CREATE TABLE users (
        name              TEXT PRIMARY KEY CHECK (length(name) BETWEEN 1 AND 128),
        disabled          INTEGER NOT NULL DEFAULT 0 CHECK (disabled IN (0, 1)),
        -- RFC 6238 secret (raw bytes); NULL until `user mfa NAME` enrolls one.
        totp_secret       BLOB CHECK (totp_secret IS NULL OR length(totp_secret) BETWEEN 16 AND 64),
        -- Highest accepted time step: a code of this step or earlier is a replay.
        totp_last_step    INTEGER,
        -- Failed codes in the current window and when the lockout ends (rate limit).
        totp_failures     INTEGER NOT NULL DEFAULT 0 CHECK (totp_failures >= 0),
        totp_window_start INTEGER,
        totp_locked_until INTEGER,
        created_at        TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%SZ', 'now'))
    );
    INSERT OR IGNORE INTO users (name) SELECT DISTINCT user FROM devices;
    INSERT OR IGNORE INTO users (name) SELECT DISTINCT user FROM grants;

    CREATE TABLE groups (
        name       TEXT PRIMARY KEY CHECK (length(name) BETWEEN 1 AND 128),
        created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%SZ', 'now'))
    );
    CREATE TABLE group_members (
        grp  TEXT NOT NULL REFERENCES groups (name) ON DELETE CASCADE,
        user TEXT NOT NULL REFERENCES users (name) ON DELETE CASCADE,
        PRIMARY KEY (grp, user)
    );

    -- When the device's user last proved MFA from this device, and its risk score.
    ALTER TABLE devices ADD COLUMN last_mfa INTEGER;
    ALTER TABLE devices ADD COLUMN risk INTEGER NOT NULL DEFAULT 0 CHECK (risk BETWEEN 0 AND 100);

    -- One-time enrollment tokens. Only the SHA-256 of the token's secret is stored.
    CREATE TABLE invites (
        token_hash  TEXT PRIMARY KEY CHECK (length(token_hash) = 64),
        device_name TEXT NOT NULL CHECK (length(device_name) BETWEEN 1 AND 64),
        user        TEXT NOT NULL REFERENCES users (name) ON DELETE CASCADE,
        expires_at  INTEGER NOT NULL,
        used_at     INTEGER,
        used_by     TEXT,
        created_at  TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%SZ', 'now'))
    );

    -- The latest signed posture report per device, as the client sent it (JSON).
    CREATE TABLE posture_reports (
        device_id   TEXT PRIMARY KEY REFERENCES devices (id) ON DELETE CASCADE,
        facts       TEXT NOT NULL,
        received_at INTEGER NOT NULL,
        expires_at  INTEGER NOT NULL
    );

    -- The applied policy file (one set; `policy apply` replaces it atomically).
    CREATE TABLE policies (
        id         INTEGER PRIMARY KEY CHECK (id = 1),
        source     TEXT NOT NULL,
        sha256     TEXT NOT NULL CHECK (length(sha256) = 64),
        applied_at INTEGER NOT NULL
    );

    -- Every registry change and every API decision, oldest first.
    CREATE TABLE audit (
        id      INTEGER PRIMARY KEY AUTOINCREMENT,
        at      TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
        actor   TEXT NOT NULL,
        action  TEXT NOT NULL,
        subject TEXT NOT NULL,
        detail  TEXT NOT NULL DEFAULT '{}'
    );
    "#,
    // 4: live enforcement (issue 4): registered gateways and their one-time tokens, the
    // live sessions each connected gateway reports, and admin session kills.
    r#"
    CREATE TABLE gateways (
        name         TEXT PRIMARY KEY CHECK (length(name) BETWEEN 1 AND 64),
        -- SHA-256 (hex) of the one-time token's secret (kept after use, so a reused token is
        -- told apart from an unknown one; replaced by `gateway add --reissue`).
        token_hash   TEXT UNIQUE CHECK (token_hash IS NULL OR length(token_hash) = 64),
        token_expires INTEGER,
        -- SHA-256 (hex) of the gateway's TLS client certificate's SubjectPublicKeyInfo;
        -- NULL until the gateway registers with its token.
        key_sha256   TEXT UNIQUE CHECK (key_sha256 IS NULL OR length(key_sha256) = 64),
        registered_at INTEGER,
        removed      INTEGER NOT NULL DEFAULT 0 CHECK (removed IN (0, 1)),
        -- Last time the controller heard from it (unix ms) and the revision it holds.
        last_seen_ms INTEGER,
        last_revision INTEGER,
        -- When its current control channel connected (unix ms); NULL when none is open.
        connected_ms INTEGER,
        created_at   TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%SZ', 'now'))
    );

    -- Live sessions as each gateway last reported them (replaced per gateway per report;
    -- not registry data: writing them never bumps the revision).
    CREATE TABLE live_sessions (
        gateway      TEXT NOT NULL CHECK (length(gateway) BETWEEN 1 AND 64),
        session      INTEGER NOT NULL CHECK (session BETWEEN 1 AND 16777215),
        device       TEXT NOT NULL,
        device_name  TEXT NOT NULL,
        user         TEXT NOT NULL,
        app          TEXT NOT NULL,
        source       TEXT NOT NULL,
        mode         TEXT NOT NULL,
        opened_at_ms INTEGER NOT NULL,
        renewed_at_ms INTEGER NOT NULL,
        expires_at_ms INTEGER NOT NULL,
        reported_at_ms INTEGER NOT NULL,
        PRIMARY KEY (gateway, session)
    );

    -- `session kill`: the gateway named closes that session when it sees the row in a
    -- snapshot (`Snapshot::kills`, rows younger than a day). `opened_at_ms` is the listed
    -- session's opening time as the gateway reported it (its own clock): the gateway
    -- matches on it exactly. NULL for a `--force` kill of an unlisted session (the
    -- gateway then matches on `killed_at`, the controller's clock).
    CREATE TABLE session_kills (
        gateway   TEXT NOT NULL CHECK (length(gateway) BETWEEN 1 AND 64),
        session   INTEGER NOT NULL CHECK (session BETWEEN 1 AND 16777215),
        killed_at INTEGER NOT NULL,
        actor     TEXT NOT NULL,
        opened_at_ms INTEGER CHECK (opened_at_ms IS NULL OR opened_at_ms >= 0),
        PRIMARY KEY (gateway, session, killed_at)
    );
    "#,
];

/// The schema version this binary writes and understands.
pub const LATEST_VERSION: u32 = MIGRATIONS.len() as u32;

/// What `migrate` found and did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MigrationOutcome {
    pub from: u32,
    pub to: u32,
}

/// Why the schema could not be brought up to date.
#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    #[error("database schema version {found} is newer than this binary supports ({supported}): upgrade postern-controller; the database was left untouched")]
    TooNew { found: u32, supported: u32 },
    #[error(transparent)]
    Sqlite(#[from] rusqlite::Error),
}

/// Reads `PRAGMA user_version`.
pub fn current_version(conn: &Connection) -> rusqlite::Result<u32> {
    conn.query_row("PRAGMA user_version", [], |r| r.get(0))
}

/// Applies every pending migration, each in its own IMMEDIATE transaction together with
/// the `user_version` bump, so a crash leaves the schema at a whole version.
pub fn migrate(conn: &mut Connection) -> Result<MigrationOutcome, SchemaError> {
    let from = current_version(conn)?;
    if from > LATEST_VERSION {
        return Err(SchemaError::TooNew {
            found: from,
            supported: LATEST_VERSION,
        });
    }
    for (idx, sql) in MIGRATIONS.iter().enumerate().skip(from as usize) {
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        // Re-check under the write lock: another process may have migrated meanwhile.
        let now = current_version(&tx)?;
        if now > idx as u32 {
            tx.commit()?;
            continue;
        }
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", idx as u32 + 1)?;
        tx.commit()?;
    }
    Ok(MigrationOutcome {
        from,
        to: LATEST_VERSION,
    })
}
