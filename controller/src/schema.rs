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
