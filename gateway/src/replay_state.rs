//! The replay cache made to survive a gateway restart, a reboot and a clock step.
//!
//! Owns the state file `STATE_DIR/replay.log` (an append-only journal compacted at start)
//! and the background thread that makes its *lease* durable. Wraps
//! [`postern_protocol::replay::ReplayCache`], which keeps the in-memory rules (bounded
//! entries, eviction floor, high-water clock). Must not decide on knocks (pipeline.rs) and
//! never fsyncs on the knock path. Why the design is sound: docs/threat-model.md.
//!
//! Journal lines (text, one `write(2)` each, each ending in an FNV-1a checksum of the line):
//! - `boot ID`: the kernel boot id when the journal was compacted;
//! - `seen DEVICE NONCE TS NOW`: an accepted (device, nonce) with its timestamp and the
//!   gateway clock at acceptance (the high-water mark comes back from the largest NOW);
//! - `floor MS`: the cache's eviction floor was raised;
//! - `hw MS`: the high-water clock; `lease MS`: the gateway promises not to accept any
//!   knock while its (high-water) clock is past MS, until a later lease is durable;
//! - `clean`: written and synced at a clean stop.
//!
//! What survives what: every line is written with `write(2)` before the decision is acted
//! on, so a killed process (SIGKILL, panic, OOM) loses nothing: the page cache holds the
//! lines and the next start reads them all (same boot id). A power loss or kernel crash may
//! lose the lines written since the last sync (about one second). The next start sees a new
//! boot id without `clean`, so it raises the floor to `max(now, last durable lease, largest
//! timestamp seen) + max_skew`: every knock the lost lines could have held is refused
//! because the lease bounds the gateway clock at which it was accepted.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use postern_protocol::keys::DeviceId;
use postern_protocol::replay::ReplayCache;

/// The journal's file name inside `state_dir`.
pub const JOURNAL: &str = "replay.log";
/// How far ahead of the clock a lease reaches.
const LEASE_MS: u64 = 5_000;
/// How often the background thread makes the latest lease durable.
const SYNC_EVERY: Duration = Duration::from_millis(1000);
/// Compact the journal when it grows past this many bytes, and past twice its size right
/// after the last compaction (so a cache that is itself bigger than this is not rewritten
/// on every knock: compaction stays amortized O(1) per knock).
const COMPACT_BYTES: u64 = 8 << 20;

/// Whether a journal of `bytes` that measured `compacted` right after its last compaction
/// is due for compaction.
fn compaction_due(bytes: u64, compacted: u64) -> bool {
    bytes > COMPACT_BYTES.max(compacted.saturating_mul(2))
}

/// A state directory or journal problem at start.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("state_dir {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("state_dir {path} is accessible by others (mode {mode:04o}): run `chmod 700 {path}`")]
    Mode { path: PathBuf, mode: u32 },
}

/// What the start found, for the `start` audit event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Restored {
    /// `new` (state_dir created now), `restored` (journal complete), `unclean_reboot`,
    /// `missing` (state_dir exists, journal gone) or `corrupt`.
    pub kind: &'static str,
    /// Entries restored.
    pub entries: usize,
    /// The floor in force after the start (knocks with timestamp <= floor are refused).
    pub floor: Option<u64>,
}

/// The replay cache, optionally journaled to a state directory.
#[derive(Debug)]
pub struct ReplayState {
    cache: ReplayCache,
    journal: Option<Journal>,
}

#[derive(Debug)]
struct Journal {
    dir: PathBuf,
    file: File,
    bytes: u64,
    /// `bytes` right after the last compaction.
    compacted_bytes: u64,
    boot: String,
    written_lease: u64,
    /// The lease value the syncer should make durable next.
    pending: Arc<AtomicU64>,
    /// The largest lease value known to be on disk.
    durable: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    syncer: Option<JoinHandle<()>>,
    /// The knock path's line buffer, reused (no allocation per knock).
    scratch: String,
}

fn fnv(body: &str) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in body.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

fn line(body: &str) -> String {
    let mut out = String::new();
    push_line(&mut out, format_args!("{body}"));
    out
}

/// Appends the journal line `body`, then its checksum and newline, to `out` (no
/// allocation once `out` has room: the knock path reuses one buffer).
fn push_line(out: &mut String, body: std::fmt::Arguments<'_>) {
    use std::fmt::Write as _;
    let start = out.len();
    // Writing to a String cannot fail.
    let _ = out.write_fmt(body);
    let sum = fnv(&out[start..]);
    let _ = writeln!(out, " {sum:08x}");
}

/// The kernel's boot id ("" if unreadable: then every restart counts as a reboot).
fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// What a journal says.
#[derive(Debug, Default)]
struct Parsed {
    boot: String,
    entries: Vec<(DeviceId, [u8; 16], u64)>,
    high_water: u64,
    max_ts: u64,
    lease: u64,
    floor: Option<u64>,
    clean: bool,
    corrupt: bool,
}

fn parse_journal(text: &str) -> Parsed {
    let mut p = Parsed::default();
    let complete = text.ends_with('\n');
    let lines: Vec<&str> = text.lines().collect();
    for (i, raw) in lines.iter().enumerate() {
        let torn_tail = i + 1 == lines.len() && !complete;
        let Some(rec) = check_line(raw) else {
            // A torn last line is what a crash mid-write leaves: harmless, it was never
            // acted on. Anything else is corruption.
            if !torn_tail {
                p.corrupt = true;
            }
            continue;
        };
        let f: Vec<&str> = rec.split(' ').collect();
        let num = |s: &str| s.parse::<u64>().ok();
        let ok = match f.as_slice() {
            ["boot", id] => {
                p.boot = (*id).to_owned();
                true
            }
            ["clean"] => {
                p.clean = true;
                true
            }
            ["hw", v] => num(v).map(|v| p.high_water = p.high_water.max(v)).is_some(),
            ["lease", v] => num(v).map(|v| p.lease = p.lease.max(v)).is_some(),
            ["floor", v] => num(v)
                .map(|v| p.floor = Some(p.floor.map_or(v, |f| f.max(v))))
                .is_some(),
            ["seen", dev, nonce, ts, now] => match (hex16(dev), hex16(nonce), num(ts), num(now)) {
                (Some(d), Some(n), Some(ts), Some(now)) => {
                    p.entries.push((DeviceId(d), n, ts));
                    p.max_ts = p.max_ts.max(ts);
                    p.high_water = p.high_water.max(now);
                    true
                }
                _ => false,
            },
            _ => false,
        };
        if !ok {
            p.corrupt = true;
        }
        // Anything after `clean` means the gateway ran again without compacting: not clean.
        if f.first() != Some(&"clean") {
            p.clean = false;
        }
    }
    p
}

/// The body of a line whose checksum matches.
fn check_line(raw: &str) -> Option<&str> {
    let (body, sum) = raw.rsplit_once(' ')?;
    (sum.len() == 8 && u32::from_str_radix(sum, 16).ok()? == fnv(body)).then_some(body)
}

fn hex16(s: &str) -> Option<[u8; 16]> {
    if s.len() != 32 || !s.is_ascii() {
        return None;
    }
    let mut out = [0u8; 16];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// 16 bytes as 32 lowercase hex digits, formatted in place.
struct Hex<'a>(&'a [u8; 16]);

impl std::fmt::Display for Hex<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl ReplayState {
    /// A cache that lives in memory only (unit tests; forgets everything at exit).
    pub fn in_memory(capacity: usize, window_ms: u64) -> ReplayState {
        ReplayState {
            cache: ReplayCache::new(capacity, window_ms),
            journal: None,
        }
    }

    /// Opens (creating it, mode 0700, if missing) `dir`, restores the journal, compacts it
    /// and starts the lease syncer. `now_ms` is the gateway clock at start.
    pub fn open(
        dir: &Path,
        capacity: usize,
        window_ms: u64,
        max_skew_ms: u64,
        now_ms: u64,
    ) -> Result<(ReplayState, Restored), StateError> {
        let io_err = |source: io::Error| StateError::Io {
            path: dir.to_owned(),
            source,
        };
        let created = match std::fs::metadata(dir) {
            Ok(meta) => {
                let mode = meta.permissions().mode() & 0o777;
                if mode & 0o077 != 0 {
                    return Err(StateError::Mode {
                        path: dir.to_owned(),
                        mode,
                    });
                }
                false
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(dir)
                    .map_err(io_err)?;
                std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                    .map_err(io_err)?;
                true
            }
            Err(e) => return Err(io_err(e)),
        };
        let boot = boot_id();
        let mut cache = ReplayCache::new(capacity, window_ms);
        cache.observe(now_ms);
        let path = dir.join(JOURNAL);
        let kind = match std::fs::read(&path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                // `postern-gateway enroll` may have made the directory for `control/`
                // before the first run: nothing but that means no gateway ran here.
                if created || holds_only_enrollment(dir) {
                    "new"
                } else {
                    // The directory was there but the journal is gone: whatever it held is
                    // lost. Knocks accepted before had timestamps <= (their time) + skew,
                    // and their time was before now (the clock is all we have).
                    cache.raise_floor(now_ms.saturating_add(max_skew_ms));
                    "missing"
                }
            }
            Err(e) => return Err(io_err(e)),
            Ok(bytes) => {
                let text = String::from_utf8_lossy(&bytes);
                let p = parse_journal(&text);
                cache.observe(p.high_water);
                if let Some(f) = p.floor {
                    cache.raise_floor(f);
                }
                let hw = cache.high_water_ms();
                for (d, n, ts) in &p.entries {
                    // Expired or at/below the floor: refused anyway, not needed.
                    let _ = cache.check_and_insert(*d, *n, *ts, hw);
                }
                let lost_floor = now_ms
                    .max(p.lease)
                    .max(p.high_water)
                    .max(p.max_ts)
                    .saturating_add(max_skew_ms);
                let same_boot = !boot.is_empty() && p.boot == boot;
                if p.corrupt {
                    cache.raise_floor(lost_floor);
                    "corrupt"
                } else if same_boot || p.clean {
                    "restored"
                } else {
                    cache.raise_floor(lost_floor);
                    "unclean_reboot"
                }
            }
        };
        let mut journal = Journal {
            dir: dir.to_owned(),
            // Replaced by compact() right below.
            file: File::open("/dev/null").map_err(io_err)?,
            bytes: 0,
            compacted_bytes: 0,
            boot,
            written_lease: 0,
            pending: Arc::new(AtomicU64::new(0)),
            durable: Arc::new(AtomicU64::new(0)),
            stop: Arc::new(AtomicBool::new(false)),
            syncer: None,
            scratch: String::with_capacity(256),
        };
        journal.compact(&cache).map_err(io_err)?;
        journal.start_syncer().map_err(io_err)?;
        let restored = Restored {
            kind,
            entries: cache.len(),
            floor: cache.floor(),
        };
        Ok((
            ReplayState {
                cache,
                journal: Some(journal),
            },
            restored,
        ))
    }

    /// Refuses a replayed or unrememberable knock (reason `replay` or `stale`), or one whose
    /// acceptance could not be journaled (`state_error`); otherwise remembers it, on disk
    /// too, before returning.
    pub fn check_and_insert(
        &mut self,
        device: DeviceId,
        nonce: [u8; 16],
        timestamp_ms: u64,
        now_ms: u64,
    ) -> Result<(), &'static str> {
        let floor_before = self.cache.floor();
        self.cache
            .check_and_insert(device, nonce, timestamp_ms, now_ms)
            .map_err(|e| e.reason())?;
        let Some(j) = self.journal.as_mut() else {
            return Ok(());
        };
        let hw = self.cache.high_water_ms();
        let mut text = std::mem::take(&mut j.scratch);
        text.clear();
        push_line(
            &mut text,
            format_args!(
                "seen {} {} {timestamp_ms} {hw}",
                Hex(&device.0),
                Hex(&nonce)
            ),
        );
        if let Some(f) = self.cache.floor().filter(|f| Some(*f) != floor_before) {
            push_line(&mut text, format_args!("floor {f}"));
        }
        let written = j.ensure_lease(hw).and_then(|()| j.append(&text));
        j.scratch = text;
        if let Err(e) = written {
            tracing::error!(error = %e, dir = %j.dir.display(), "replay journal write failed: knock refused");
            return Err("state_error");
        }
        Ok(())
    }

    /// Housekeeping, called every few hundred milliseconds: renews the lease ahead of the
    /// clock (the syncer makes it durable) and compacts a journal grown too big.
    pub fn tick(&mut self, now_ms: u64) {
        self.cache.observe(now_ms);
        let hw = self.cache.high_water_ms();
        let Some(j) = self.journal.as_mut() else {
            return;
        };
        let mut result = Ok(());
        if hw.saturating_add(LEASE_MS / 2) > j.written_lease {
            let lease = hw + LEASE_MS;
            result = j.append(&(line(&format!("hw {hw}")) + &line(&format!("lease {lease}"))));
            if result.is_ok() {
                j.written_lease = lease;
                j.pending.fetch_max(lease, Ordering::SeqCst);
            }
        }
        if result.is_ok() && compaction_due(j.bytes, j.compacted_bytes) {
            result = j.compact(&self.cache);
        }
        if let Err(e) = result {
            tracing::error!(error = %e, dir = %j.dir.display(), "replay journal upkeep failed");
        }
    }

    /// Clean stop: writes `clean` and syncs, so even a reboot right after keeps everything.
    pub fn close_clean(&mut self) -> io::Result<()> {
        let Some(j) = self.journal.as_mut() else {
            return Ok(());
        };
        j.stop_syncer();
        j.append(&line("clean"))?;
        j.file.sync_data()
    }

    pub fn len(&self) -> usize {
        self.cache.len()
    }

    pub fn is_empty(&self) -> bool {
        self.cache.is_empty()
    }

    /// The floor in force (see [`ReplayCache::floor`]).
    pub fn floor(&self) -> Option<u64> {
        self.cache.floor()
    }
}

impl Journal {
    fn append(&mut self, text: &str) -> io::Result<()> {
        // One write(2) per call (O_APPEND): a crash leaves at most one torn last line.
        self.file.write_all(text.as_bytes())?;
        self.bytes += text.len() as u64;
        Ok(())
    }

    /// Before accepting at high-water `hw`, a lease covering `hw` must be on disk: if the
    /// syncer fell behind, write and sync one now (rare: the lease runs 5 s ahead).
    fn ensure_lease(&mut self, hw: u64) -> io::Result<()> {
        if hw <= self.durable.load(Ordering::SeqCst) {
            return Ok(());
        }
        let lease = hw + LEASE_MS;
        self.append(&line(&format!("lease {lease}")))?;
        self.file.sync_data()?;
        self.written_lease = self.written_lease.max(lease);
        self.durable.fetch_max(lease, Ordering::SeqCst);
        Ok(())
    }

    /// Rewrites the journal from the cache (tmp file, fsync, rename, fsync dir) and
    /// reopens it for append. The new journal is durable, lease included.
    fn compact(&mut self, cache: &ReplayCache) -> io::Result<()> {
        let hw = cache.high_water_ms();
        let lease = hw + LEASE_MS;
        let mut text = line(&format!("boot {}", self.boot));
        text.push_str(&line(&format!("hw {hw}")));
        if let Some(f) = cache.floor() {
            text.push_str(&line(&format!("floor {f}")));
        }
        text.push_str(&line(&format!("lease {lease}")));
        for (d, n, ts) in cache.entries() {
            push_line(
                &mut text,
                format_args!("seen {} {} {ts} {hw}", Hex(&d.0), Hex(&n)),
            );
        }
        crate::atomic_file::write_atomic(&self.dir, JOURNAL, text.as_bytes())?;
        let final_path = self.dir.join(JOURNAL);
        self.file = OpenOptions::new().append(true).open(&final_path)?;
        self.bytes = text.len() as u64;
        self.compacted_bytes = self.bytes;
        self.written_lease = lease;
        self.pending.fetch_max(lease, Ordering::SeqCst);
        self.durable.fetch_max(lease, Ordering::SeqCst);
        if self.syncer.is_some() {
            // The syncer holds a clone of the old file: give it the new one.
            self.stop_syncer();
            self.start_syncer()?;
        }
        Ok(())
    }

    fn start_syncer(&mut self) -> io::Result<()> {
        let file = self.file.try_clone()?;
        let stop = Arc::new(AtomicBool::new(false));
        self.stop = Arc::clone(&stop);
        let pending = Arc::clone(&self.pending);
        let durable = Arc::clone(&self.durable);
        let handle = std::thread::Builder::new()
            .name("replay-sync".into())
            .spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    // Parked, not slept: `stop_syncer` unparks it, so a clean stop (which
                    // closes the doors right after) never waits out the sync interval.
                    std::thread::park_timeout(SYNC_EVERY);
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let want = pending.load(Ordering::SeqCst);
                    if want > durable.load(Ordering::SeqCst) {
                        match file.sync_data() {
                            Ok(()) => {
                                durable.fetch_max(want, Ordering::SeqCst);
                            }
                            Err(e) => tracing::error!(error = %e, "replay journal sync failed"),
                        }
                    }
                }
            })?;
        self.syncer = Some(handle);
        Ok(())
    }

    fn stop_syncer(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.syncer.take() {
            h.thread().unpark();
            let _ = h.join();
        }
    }
}

impl Drop for Journal {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod compaction_tests {
    use super::*;

    #[test]
    fn compaction_is_amortized_when_the_live_cache_is_big() {
        // Small journals are left alone, big ones compacted once...
        assert!(!compaction_due(COMPACT_BYTES, 0));
        assert!(compaction_due(COMPACT_BYTES + 1, 0));
        // ...and a cache whose compacted form is already 12 MiB (about 100k entries) is
        // not rewritten again until the journal doubles: the regression behind issue 7's
        // collapse to a few knocks/s was compacting on every knock past 8 MiB.
        let big = 12 << 20;
        assert!(!compaction_due(big + 1, big));
        assert!(!compaction_due(2 * big, big));
        assert!(compaction_due(2 * big + 1, big));
    }
}

/// `dir` holds nothing but the enrollment directory (`control/`, control_enrollment.rs).
fn holds_only_enrollment(dir: &Path) -> bool {
    std::fs::read_dir(dir).is_ok_and(|entries| {
        let names: Vec<_> = entries
            .filter_map(|e| e.ok().map(|e| e.file_name()))
            .collect();
        names.len() == 1 && names[0] == crate::control_enrollment::CONTROL_DIR
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SKEW: u64 = 30_000;
    const T: u64 = 1_800_000_000_000;

    fn open(dir: &Path, now: u64) -> (ReplayState, Restored) {
        ReplayState::open(dir, 1000, 2 * SKEW, SKEW, now).expect("open state")
    }

    fn dev(i: u8) -> DeviceId {
        DeviceId([i; 16])
    }

    #[test]
    fn first_start_is_new_and_a_restart_restores() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("state");
        let (mut s, r) = open(&dir, T);
        assert_eq!((r.kind, r.entries, r.floor), ("new", 0, None));
        let mode = std::fs::metadata(&dir).expect("dir").permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        s.check_and_insert(dev(1), [1; 16], T, T).expect("accept");
        s.tick(T + 100);
        // Simulated SIGKILL: no close_clean, the writes are in the file already.
        drop(s);
        let (mut s, r) = open(&dir, T + 1000);
        assert_eq!((r.kind, r.entries, r.floor), ("restored", 1, None));
        assert_eq!(
            s.check_and_insert(dev(1), [1; 16], T, T + 1000),
            Err("replay")
        );
        // No penalty for an honest knock after a same-boot restart.
        assert_eq!(
            s.check_and_insert(dev(1), [2; 16], T + 900, T + 1000),
            Ok(())
        );
    }

    #[test]
    fn a_dir_holding_only_the_enrollment_is_a_first_start() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("state");
        std::fs::create_dir_all(dir.join(crate::control_enrollment::CONTROL_DIR)).expect("mkdir");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).expect("chmod");
        let (_, r) = open(&dir, T);
        assert_eq!((r.kind, r.floor), ("new", None));
    }

    #[test]
    fn clock_stepped_back_after_restart_still_refuses() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("state");
        let (mut s, _) = open(&dir, T);
        s.check_and_insert(dev(1), [1; 16], T, T).expect("accept");
        s.tick(T + 3 * SKEW); // the entry's window has passed
        s.close_clean().expect("clean stop");
        drop(s);
        // Restart with the clock stepped back to the knock's time: the persisted high-water
        // mark keeps the forgotten timestamp refused.
        let (mut s, r) = open(&dir, T);
        assert_eq!(r.kind, "restored");
        assert!(s.check_and_insert(dev(1), [1; 16], T, T).is_err());
    }

    #[test]
    fn missing_or_corrupt_journal_refuses_everything_up_to_start_plus_skew() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("state");
        let (mut s, _) = open(&dir, T);
        s.check_and_insert(dev(1), [1; 16], T, T).expect("accept");
        drop(s);
        std::fs::remove_file(dir.join(JOURNAL)).expect("rm journal");
        let (mut s, r) = open(&dir, T + 10);
        assert_eq!((r.kind, r.floor), ("missing", Some(T + 10 + SKEW)));
        assert_eq!(
            s.check_and_insert(dev(1), [1; 16], T, T + 10),
            Err("replay")
        );
        assert_eq!(
            s.check_and_insert(dev(1), [2; 16], T + 10 + SKEW, T + 10 + SKEW),
            Err("replay")
        );
        assert_eq!(
            s.check_and_insert(dev(1), [3; 16], T + 11 + SKEW, T + 11 + SKEW),
            Ok(())
        );
        drop(s);
        // Corrupt a line in the middle.
        let path = dir.join(JOURNAL);
        let text = std::fs::read_to_string(&path).expect("read");
        let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
        lines[1] = lines[1].replace('1', "2");
        std::fs::write(&path, lines.join("\n") + "\n").expect("write");
        let (_, r) = open(&dir, T + 20);
        assert_eq!(r.kind, "corrupt");
        assert!(r.floor.expect("floor") >= T + 20 + SKEW);
    }

    #[test]
    fn unclean_reboot_raises_the_floor_past_the_lease() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("state");
        let (mut s, _) = open(&dir, T);
        s.check_and_insert(dev(1), [1; 16], T, T).expect("accept");
        drop(s);
        // Pretend the journal was written in another boot (a power loss happened).
        let path = dir.join(JOURNAL);
        let text = std::fs::read_to_string(&path).expect("read");
        let body = format!("boot {}", "00000000-0000-0000-0000-000000000000");
        let text = text
            .lines()
            .map(|l| {
                if l.starts_with("boot ") {
                    line(&body)
                } else {
                    format!("{l}\n")
                }
            })
            .collect::<String>();
        std::fs::write(&path, text).expect("write");
        // The clock even stepped back across the reboot.
        let (mut s, r) = open(&dir, T - 60_000);
        assert_eq!(r.kind, "unclean_reboot");
        assert!(r.floor.expect("floor") >= T + LEASE_MS + SKEW);
        assert!(s
            .check_and_insert(dev(2), [2; 16], T + 100, T + 100)
            .is_err());
    }

    #[test]
    fn torn_last_line_is_not_corruption() {
        let p = parse_journal(&(line("hw 5") + "seen 00 1"));
        assert!(!p.corrupt);
        assert_eq!(p.high_water, 5);
        let p = parse_journal(&(line("hw 5") + "garbage\n" + &line("hw 6")));
        assert!(p.corrupt);
    }

    #[test]
    fn loose_state_dir_is_refused() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("state");
        std::fs::create_dir(&dir).expect("mkdir");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let err = ReplayState::open(&dir, 10, 1000, 1000, T).expect_err("0755 refused");
        assert!(err.to_string().contains("chmod 700"), "{err}");
    }
}
