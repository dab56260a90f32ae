//! Disk encryption (dm-crypt) of the root and home file systems.
//!
//! Method: find the mount of `/` and of `/home` (or `/` when `/home` is not a separate
//! mount) in `proc/self/mountinfo` (device number `MAJOR:MINOR` and source), or in
//! `proc/mounts` (source only) when mountinfo is missing. Map it to a block device name by
//! the `dev` files under `sys/block/` (whole disks and partitions), or by the source
//! (`/dev/mapper/NAME` via `sys/block/dm-*/dm/name`, `/dev/NAME`) when the device number
//! is anonymous (major 0, e.g. btrfs). A device-mapper device whose `dm/uuid` starts with
//! `CRYPT-` is encrypted; any other device-mapper device (LVM, RAID) is encrypted when every
//! device in its `slaves/` is (so LVM on LUKS counts); a plain disk or partition is not.
//! A file system that is not on a block device (overlay, tmpfs, NFS) is unknown.
//!
//! Owns: reading those files under the posture root. Must not touch: anything else.

use std::path::Path;

use super::system::{read_limited, read_small};
use super::{under_root, Probe};

/// Deepest device-mapper stack followed.
const MAX_DEPTH: usize = 8;
/// Longest mount table read.
const MAX_MOUNT_TABLE: u64 = 4 * 1024 * 1024;

/// One mount: device number (if known) and source.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Mount {
    dev: Option<String>,
    source: String,
    fstype: String,
}

/// Encryption of the file system mounted at `/` and at `/home`.
pub fn root_and_home(root: &Path) -> (Probe, Probe) {
    let mounts = mounts(root);
    let Some(mounts) = mounts else {
        let p = Probe::unknown("no proc/self/mountinfo or proc/mounts".into());
        return (p.clone(), p);
    };
    let find = |at: &str| mounts.iter().rev().find(|(mp, _)| mp == at).map(|(_, m)| m);
    let root_probe = match find("/") {
        Some(m) => mount_encrypted(root, m),
        None => Probe::unknown("no mount of / found".into()),
    };
    let home_probe = match find("/home") {
        Some(m) => mount_encrypted(root, m),
        None => Probe {
            state: root_probe.state,
            detail: format!("on the root file system: {}", root_probe.detail),
        },
    };
    (root_probe, home_probe)
}

/// (mount point, mount) in file order; `None` when neither file is readable.
fn mounts(root: &Path) -> Option<Vec<(String, Mount)>> {
    if let Some(text) = read_mount_table(&under_root(root, "proc/self/mountinfo")) {
        return Some(text.lines().filter_map(mountinfo_line).collect());
    }
    let text = read_mount_table(&under_root(root, "proc/mounts"))?;
    Some(
        text.lines()
            .filter_map(|line| {
                let mut w = line.split_whitespace();
                let source = w.next()?;
                let mount_point = unescape(w.next()?);
                let fstype = w.next()?.to_owned();
                Some((
                    mount_point,
                    Mount {
                        dev: None,
                        source: unescape(source),
                        fstype,
                    },
                ))
            })
            .collect(),
    )
}

fn read_mount_table(path: &Path) -> Option<String> {
    read_limited(path, MAX_MOUNT_TABLE)
}

/// `36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw,errors=continue`
fn mountinfo_line(line: &str) -> Option<(String, Mount)> {
    let (head, tail) = line.split_once(" - ")?;
    let head: Vec<&str> = head.split_whitespace().collect();
    let dev = head.get(2)?.to_string();
    let mount_point = unescape(head.get(4)?);
    let mut tail = tail.split_whitespace();
    let fstype = tail.next()?.to_owned();
    let source = unescape(tail.next().unwrap_or("none"));
    Some((
        mount_point,
        Mount {
            dev: Some(dev),
            source,
            fstype,
        },
    ))
}

/// Mount tables escape space, tab, newline and backslash as `\040` etc.
fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('\\') {
        out.push_str(&rest[..i]);
        let code = rest.get(i + 1..i + 4);
        match code.and_then(|c| u8::from_str_radix(c, 8).ok()) {
            Some(b) => {
                out.push(char::from(b));
                rest = &rest[i + 4..];
            }
            None => {
                out.push('\\');
                rest = &rest[i + 1..];
            }
        }
    }
    out.push_str(rest);
    out
}

fn mount_encrypted(root: &Path, mount: &Mount) -> Probe {
    let by_dev = mount
        .dev
        .as_deref()
        .filter(|d| !d.starts_with("0:"))
        .and_then(|d| block_by_dev(root, d));
    let Some(block) = by_dev.or_else(|| block_by_source(root, &mount.source)) else {
        return Probe::unknown(format!(
            "{} ({}) is not a block device found under sys/block",
            mount.source, mount.fstype
        ));
    };
    let mut chain = Vec::new();
    let encrypted = block_encrypted(root, &block, 0, &mut chain);
    Probe {
        state: Some(encrypted),
        detail: chain.join(", "),
    }
}

/// The block device (whole disk or partition) whose `dev` file holds `MAJOR:MINOR`.
fn block_by_dev(root: &Path, dev: &str) -> Option<String> {
    let sys_block = under_root(root, "sys/block");
    for disk in std::fs::read_dir(&sys_block).ok()?.flatten() {
        let disk_name = disk.file_name().to_string_lossy().into_owned();
        if read_small(&disk.path().join("dev")).is_some_and(|d| d.trim() == dev) {
            return Some(disk_name);
        }
        let Ok(parts) = std::fs::read_dir(disk.path()) else {
            continue;
        };
        for part in parts.flatten() {
            let p = part.path();
            if p.join("partition").exists()
                && read_small(&p.join("dev")).is_some_and(|d| d.trim() == dev)
            {
                return Some(part.file_name().to_string_lossy().into_owned());
            }
        }
    }
    None
}

/// `/dev/mapper/NAME` (by `dm/name`), `/dev/dm-N`, `/dev/sda2` → block device name.
fn block_by_source(root: &Path, source: &str) -> Option<String> {
    if let Some(name) = source.strip_prefix("/dev/mapper/") {
        for dm in std::fs::read_dir(under_root(root, "sys/block"))
            .ok()?
            .flatten()
        {
            if read_small(&dm.path().join("dm/name")).is_some_and(|n| n.trim() == name) {
                return Some(dm.file_name().to_string_lossy().into_owned());
            }
        }
        return None;
    }
    let name = source.strip_prefix("/dev/")?;
    (!name.is_empty() && !name.contains('/')).then(|| name.to_owned())
}

/// Whether `block` is dm-crypt, or device-mapper over only dm-crypt devices. Appends a
/// description of each device visited to `chain`.
fn block_encrypted(root: &Path, block: &str, depth: usize, chain: &mut Vec<String>) -> bool {
    if depth > MAX_DEPTH {
        chain.push(format!("{block}: device stack deeper than {MAX_DEPTH}"));
        return false;
    }
    let dir = under_root(root, "sys/block").join(block);
    let Some(uuid) = read_small(&dir.join("dm/uuid")) else {
        chain.push(format!(
            "{block}: not device-mapper (plain disk or partition)"
        ));
        return false;
    };
    let uuid = uuid.trim();
    let kind = uuid.split('-').next().unwrap_or("dm");
    if uuid.starts_with("CRYPT-") {
        chain.push(format!("{block}: dm-crypt ({kind})"));
        return true;
    }
    let slaves: Vec<String> = std::fs::read_dir(dir.join("slaves"))
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    chain.push(format!("{block}: device-mapper {kind} over {slaves:?}"));
    if slaves.is_empty() {
        return false;
    }
    let mut all = true;
    for slave in slaves {
        all &= block_encrypted(root, &slave, depth + 1, chain);
    }
    all
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_lines_parse() {
        let (mp, m) = mountinfo_line(
            "29 1 253:1 / / rw,relatime shared:1 - ext4 /dev/mapper/vg-root rw,errors=remount-ro",
        )
        .expect("line");
        assert_eq!(mp, "/");
        assert_eq!(m.dev.as_deref(), Some("253:1"));
        assert_eq!(m.source, "/dev/mapper/vg-root");
        let (mp, _) =
            mountinfo_line("30 29 8:2 / /my\\040home rw - ext4 /dev/sda2 rw").expect("escaped");
        assert_eq!(mp, "/my home");
        assert!(mountinfo_line("garbage").is_none());
        assert_eq!(unescape("a\\0"), "a\\0");
    }
}
