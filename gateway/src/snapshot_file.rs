//! The gateway's persisted registry snapshot and the atomic writer for `state_dir` files.
//!
//! Owns `STATE_DIR/snapshot.json` (the last snapshot the controller sent, written by the
//! sync thread, read once at start so the gateway can decide while the controller is down)
//! written with [`write_atomic`]. Must not decide on knocks, talk to the controller, or
//! touch the replay journal (replay_state.rs).
//!
//! No age bound is applied to a persisted snapshot: a policy-mode snapshot is honoured
//! only through its access records' `until` (each device fails closed when its verdict
//! expires); a legacy-grant snapshot has no expiry and is honoured until the controller
//! answers again (docs/operations.md, "Controller down").

use std::io;
use std::path::{Path, PathBuf};

use postern_protocol::snapshot::Snapshot;
use serde::{Deserialize, Serialize};

use crate::atomic_file::write_atomic;

/// The persisted snapshot's file name inside `state_dir`.
pub const SNAPSHOT_FILE: &str = "snapshot.json";
/// The file format this gateway writes and reads.
const FORMAT: u32 = 1;
/// Largest snapshot file read at start (same bound as a controller answer).
const MAX_BYTES: u64 = 256 * 1024 * 1024;

/// Why a persisted snapshot was refused at start.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotFileError {
    #[error("persisted snapshot {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("persisted snapshot {path} is larger than {MAX_BYTES} bytes")]
    TooLarge { path: PathBuf },
    #[error("persisted snapshot {path} is corrupt: {source}")]
    Corrupt {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("persisted snapshot {path} has format {found}, this gateway reads format {FORMAT}")]
    Format { path: PathBuf, found: u32 },
}

/// The file's content: the snapshot plus when it was saved. `S` is `Snapshot` when read
/// and `&Snapshot` when written (a clone would double the registry's heap for the length
/// of the write).
#[derive(Debug, Serialize, Deserialize)]
struct SnapshotFile<S> {
    format: u32,
    saved_at_ms: u64,
    snapshot: S,
}

/// A snapshot read back from `state_dir`.
#[derive(Debug)]
pub struct Persisted {
    pub snapshot: Snapshot,
    /// When the sync thread wrote it (ms since the epoch, gateway clock).
    pub saved_at_ms: u64,
}

/// Persists `snapshot` as `dir/snapshot.json` (see [`write_atomic`]).
pub fn save(dir: &Path, snapshot: &Snapshot, now_ms: u64) -> io::Result<()> {
    let file = SnapshotFile {
        format: FORMAT,
        saved_at_ms: now_ms,
        snapshot,
    };
    let bytes = serde_json::to_vec(&file).map_err(io::Error::other)?;
    write_atomic(dir, SNAPSHOT_FILE, &bytes)
}

/// Reads `dir/snapshot.json`: `Ok(None)` when there is none, an error when it cannot be
/// trusted (unreadable, too large, not the expected JSON). Never panics on the content.
pub fn load(dir: &Path) -> Result<Option<Persisted>, SnapshotFileError> {
    let path = dir.join(SNAPSHOT_FILE);
    let io_err = |source| SnapshotFileError::Io {
        path: path.clone(),
        source,
    };
    let meta = match std::fs::metadata(&path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(e)),
    };
    if meta.len() > MAX_BYTES {
        return Err(SnapshotFileError::TooLarge { path });
    }
    let bytes = std::fs::read(&path).map_err(io_err)?;
    let file: SnapshotFile<Snapshot> =
        serde_json::from_slice(&bytes).map_err(|source| SnapshotFileError::Corrupt {
            path: path.clone(),
            source,
        })?;
    if file.format != FORMAT {
        return Err(SnapshotFileError::Format {
            path,
            found: file.format,
        });
    }
    Ok(Some(Persisted {
        snapshot: file.snapshot,
        saved_at_ms: file.saved_at_ms,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn snapshot(revision: u64) -> Snapshot {
        Snapshot {
            revision,
            ..Snapshot::default()
        }
    }

    #[test]
    fn a_saved_snapshot_reads_back_identical_with_mode_0600() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(load(dir.path()).expect("no file is not an error").is_none());
        save(dir.path(), &snapshot(7), 1234).expect("save");
        save(dir.path(), &snapshot(8), 5678).expect("save again (replaces)");
        let back = load(dir.path()).expect("load").expect("a snapshot");
        assert_eq!(back.snapshot, snapshot(8));
        assert_eq!(back.saved_at_ms, 5678);
        let path = dir.path().join(SNAPSHOT_FILE);
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(!dir.path().join(format!("{SNAPSHOT_FILE}.tmp")).exists());
    }

    #[test]
    fn a_corrupt_or_foreign_file_is_refused_not_a_panic() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(SNAPSHOT_FILE);
        save(dir.path(), &snapshot(3), 1).expect("save");
        let text = std::fs::read_to_string(&path).expect("read");
        // Torn in the middle, as a broken disk might leave it.
        std::fs::write(&path, &text[..text.len() / 2]).expect("truncate");
        let err = load(dir.path()).expect_err("torn file refused");
        assert!(matches!(err, SnapshotFileError::Corrupt { .. }), "{err}");
        for junk in [&b""[..], b"\xff\xfe\x00", b"null", b"{\"format\":1}"] {
            std::fs::write(&path, junk).expect("write junk");
            assert!(load(dir.path()).is_err(), "{junk:?} must be refused");
        }
        std::fs::write(&path, text.replace("\"format\":1", "\"format\":9")).expect("write");
        let err = load(dir.path()).expect_err("unknown format refused");
        assert!(
            matches!(err, SnapshotFileError::Format { found: 9, .. }),
            "{err}"
        );
        // A directory where the file should be: unreadable, refused.
        std::fs::remove_file(&path).expect("rm");
        std::fs::create_dir(&path).expect("mkdir");
        assert!(load(dir.path()).is_err());
    }
}
