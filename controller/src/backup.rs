//! Online backup of the registry (`postern-controller backup FILE`).
//!
//! Owns: copying a consistent snapshot of the live database into a new file with SQLite's
//! online backup API (readers and writers may keep going meanwhile), the new file's mode
//! (0600: it holds TOTP secrets), and checking the copy before calling it done.
//! Must not touch: the live database's contents or settings, existing files (a backup
//! never overwrites anything).

use std::fs::OpenOptions;
use std::io::ErrorKind;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::backup::Backup;
use rusqlite::{Connection, OpenFlags};

use crate::registry::{Registry, RegistryError};

/// What a finished backup holds.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct BackupOutcome {
    pub path: PathBuf,
    pub revision: u64,
    pub schema_version: u32,
    pub bytes: u64,
}

/// Why a backup failed. The partial file, if any, is removed.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("backup file {0} already exists: choose a new name (a backup never overwrites)")]
    Exists(PathBuf),
    #[error("creating backup file {path}: {source}")]
    Create {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("backing up into {path}: {source}")]
    Sqlite {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("the backup in {path} failed its integrity check ({detail}); it was removed")]
    Integrity { path: PathBuf, detail: String },
    #[error(transparent)]
    Registry(#[from] RegistryError),
}

impl BackupError {
    /// The caller asked for something impossible (exit code 2) rather than the machine failing.
    pub fn is_validation(&self) -> bool {
        matches!(self, BackupError::Exists(_))
    }
}

/// Copies the registry into `dest` (a new file, mode 0600) and verifies the copy.
pub fn backup(registry: &Registry, dest: &Path) -> Result<BackupOutcome, BackupError> {
    match OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(dest)
    {
        Ok(_) => {}
        Err(e) if e.kind() == ErrorKind::AlreadyExists => {
            return Err(BackupError::Exists(dest.to_owned()))
        }
        Err(source) => {
            return Err(BackupError::Create {
                path: dest.to_owned(),
                source,
            })
        }
    }
    let result = copy_and_check(registry, dest);
    if result.is_err() {
        let _ = std::fs::remove_file(dest);
    }
    result
}

fn copy_and_check(registry: &Registry, dest: &Path) -> Result<BackupOutcome, BackupError> {
    let sql = |source| BackupError::Sqlite {
        path: dest.to_owned(),
        source,
    };
    let mut out =
        Connection::open_with_flags(dest, OpenFlags::SQLITE_OPEN_READ_WRITE).map_err(sql)?;
    {
        let step = Backup::new(&registry.conn, &mut out).map_err(sql)?;
        // 1024 pages per step, no pause: the live database is locked only per step.
        step.run_to_completion(1024, Duration::ZERO, None)
            .map_err(sql)?;
    }
    // The copy is a rollback-journal database file on its own (no -wal beside it).
    let mode: String = out
        .query_row("PRAGMA journal_mode=DELETE", [], |r| r.get(0))
        .map_err(sql)?;
    let check: String = out
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .map_err(sql)?;
    if check != "ok" {
        return Err(BackupError::Integrity {
            path: dest.to_owned(),
            detail: check,
        });
    }
    let revision: i64 = out
        .query_row("SELECT revision FROM meta WHERE id = 1", [], |r| r.get(0))
        .map_err(sql)?;
    let schema_version: u32 = out
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(sql)?;
    drop(out);
    debug_assert!(mode.eq_ignore_ascii_case("delete"), "journal mode {mode}");
    let file = std::fs::File::open(dest).map_err(|source| BackupError::Create {
        path: dest.to_owned(),
        source,
    })?;
    file.sync_all().map_err(|source| BackupError::Create {
        path: dest.to_owned(),
        source,
    })?;
    let bytes = file.metadata().map(|m| m.len()).unwrap_or(0);
    Ok(BackupOutcome {
        path: dest.to_owned(),
        revision: u64::try_from(revision).unwrap_or(0),
        schema_version,
        bytes,
    })
}
