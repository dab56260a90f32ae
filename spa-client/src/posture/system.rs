//! The small collectors: OS id and version (`etc/os-release`), kernel version
//! (`proc/sys/kernel/osrelease`), required processes (`proc/*/comm`) and the MDM marker file.
//!
//! Owns: reading those files under the posture root. Must not touch: anything outside the
//! root, the report format (see `mod.rs`).

use std::collections::BTreeSet;
use std::path::Path;

use super::{clean, under_root, Probe};

/// Longest file read by these collectors.
const MAX_SMALL_FILE: u64 = 64 * 1024;
/// The kernel keeps at most this many bytes of a process name (`TASK_COMM_LEN - 1`).
const COMM_LEN: usize = 15;

/// Reads a small text file, `None` if missing or unreadable.
pub(crate) fn read_small(path: &Path) -> Option<String> {
    read_limited(path, MAX_SMALL_FILE)
}

/// Reads at most `max` bytes of a text file (invalid UTF-8 replaced), `None` if missing or
/// unreadable.
pub(crate) fn read_limited(path: &Path, max: u64) -> Option<String> {
    use std::io::Read as _;
    let file = std::fs::File::open(path).ok()?;
    let mut bytes = Vec::new();
    file.take(max).read_to_end(&mut bytes).ok()?;
    Some(String::from_utf8_lossy(&bytes).into_owned())
}

/// OS id (e.g. `debian`) and version (`VERSION_ID`, e.g. `12`) from `etc/os-release`, or
/// `usr/lib/os-release` when the first is missing.
pub fn os_release(root: &Path) -> (Option<String>, Option<String>) {
    let text = read_small(&under_root(root, "etc/os-release"))
        .or_else(|| read_small(&under_root(root, "usr/lib/os-release")));
    let Some(text) = text else {
        return (None, None);
    };
    let mut id = None;
    let mut version = None;
    for line in text.lines() {
        let Some((key, value)) = line.trim().split_once('=') else {
            continue;
        };
        let value = value.trim().trim_matches(|c| c == '"' || c == '\'');
        match key.trim() {
            "ID" => id = clean(value),
            "VERSION_ID" => version = clean(value),
            _ => {}
        }
    }
    (id, version)
}

/// The running kernel's release string, e.g. `6.1.0-13-amd64`.
pub fn kernel(root: &Path) -> Option<String> {
    clean(&read_small(&under_root(root, "proc/sys/kernel/osrelease"))?)
}

/// For each wanted name, whether a process of that name runs (its `proc/PID/comm`, which
/// the kernel cuts to 15 bytes, so longer names match on their first 15 bytes).
pub fn processes(root: &Path, wanted: &[String]) -> Vec<(String, bool)> {
    let mut running = BTreeSet::new();
    if let Ok(entries) = std::fs::read_dir(under_root(root, "proc")) {
        for entry in entries.flatten() {
            let name = entry.file_name();
            let is_pid = name
                .to_str()
                .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
            if !is_pid {
                continue;
            }
            if let Some(comm) = read_small(&entry.path().join("comm")) {
                running.insert(comm.trim_end_matches('\n').to_owned());
            }
        }
    }
    wanted
        .iter()
        .map(|name| {
            let short = truncate_bytes(name, COMM_LEN);
            (
                name.clone(),
                running.contains(name) || running.contains(short),
            )
        })
        .collect()
}

fn truncate_bytes(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Whether the MDM enrollment marker (a path relative to the root) exists as a file.
pub fn mdm_marker(root: &Path, marker: &Path) -> Probe {
    let path = under_root(root, marker);
    match std::fs::metadata(&path) {
        Ok(m) if m.is_file() => Probe::yes(format!("marker {} present", path.display())),
        Ok(_) => Probe::no(format!("{} is not a regular file", path.display())),
        Err(_) => Probe::no(format!("no marker file {}", path.display())),
    }
}
