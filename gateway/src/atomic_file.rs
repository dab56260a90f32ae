//! Crash-safe replacement of a small file in the gateway's `state_dir`.
//!
//! Owns [`write_atomic`] only (used by the persisted snapshot, the status file and the
//! replay journal's compaction). Must not know what the files hold.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Writes `bytes` to `dir/name` so a reader (or a crash) sees the old file or the new one,
/// never a mix: `dir/name.tmp` (mode 0600), fsync, rename, fsync of `dir`.
pub fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> io::Result<()> {
    let tmp = dir.join(format!("{name}.tmp"));
    {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, dir.join(name))?;
    File::open(dir)?.sync_all()
}
