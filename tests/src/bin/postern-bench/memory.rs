//! Row 6 of issue 7: gateway resident memory with 100,000 enrolled devices and 100,000
//! live sessions.
//!
//! Owns: a second controller whose SQLite registry lives on tmpfs (`TMPDIR=/dev/shm` while
//! it starts: 100,000 `synchronous=FULL` commits on a disk would measure the disk), the
//! devices it enrolls in bulk through `postern_controller::registry::Registry` (`m<n>`),
//! one sniff-mode gateway, and the knocks it sends: one per device, from the lab's client
//! namespace, each from its own source address in 10.201.0.0/15 (a raw socket writes the
//! IPv4 header, so the source is the address the knock claims and signs; the gateway keeps
//! `require_claimed_addr = true`). Those addresses exist nowhere: the gateway's ICMP replies
//! to them have no route and stay in its namespace. Must not touch: the main controller's
//! registry, anything outside the lab. Every loop is bounded in count and time.
#![allow(unsafe_code)]

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddrV4};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use postern_e2e::{run_in, Capture, Controller, Gateway, GatewayOptions, InProcessDevice, Lab};

use crate::{APP, APP_PORT, SPA_PORT, USER};

/// First spoofed client address; device n knocks from FIRST + n.
const FIRST_SOURCE: Ipv4Addr = Ipv4Addr::new(10, 201, 0, 1);

/// What the memory phase measured.
#[derive(Debug, Default)]
pub struct MemoryResult {
    pub devices: usize,
    pub enroll_secs: f64,
    pub sync_secs: f64,
    /// (VmRSS, VmHWM) in kB just after start, with no device enrolled.
    pub empty_kb: (u64, u64),
    /// (VmRSS, VmHWM) in kB with the devices loaded and no session.
    pub idle_kb: (u64, u64),
    /// Knocks sent (over all passes) and distinct sources allowed (= live sessions: one
    /// device per source, pinholes and sessions last far longer than the run).
    pub knocks_sent: usize,
    pub sessions: usize,
    /// Of `pinholes_sampled` allowed sources (every 5000th device), how many have their
    /// pinhole in the kernel's `pinholes4` map at the end.
    pub pinholes: usize,
    pub pinholes_sampled: usize,
    pub loaded_kb: (u64, u64),
    /// Revocations with the registry and sessions above in place, each in ms from the start
    /// of `device revoke`: to the command's exit, to the gateway's `sync` line of the new
    /// revision (written once the new view is in force and saved), to its `session_closed`
    /// line for the device's session.
    pub revoke_command: Vec<f64>,
    /// Where each revocation's time went (the gateway's `sync` line).
    pub revoke_stages: Vec<RevokeStages>,
    pub revoke_closed: Vec<f64>,
    /// Revocations whose session did not close within [`REVOKE_WAIT`].
    pub revoke_failed: usize,
}

/// One revocation at scale, in ms: `received` and `in_force` from the start of `device
/// revoke` (the controller's work and the transport, then the gateway's), the others how
/// long the gateway's step took.
#[derive(Debug, Clone, Copy)]
pub struct RevokeStages {
    pub received: f64,
    pub parse: f64,
    pub view: f64,
    pub in_force: f64,
    pub persist: f64,
}

/// Revocations measured at the end of the memory phase (one device each, spread over the
/// registry), and how long each may take to close its session.
const REVOKES: usize = 10;
const REVOKE_WAIT: Duration = Duration::from_secs(20);

/// `VmRSS` and `VmHWM` of `pid` in kB.
pub fn rss_kb(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(ok, "kill {sig} {pid} failed");
}

/// Random device keys, generated on two threads.
fn keys(n: usize) -> Vec<InProcessDevice> {
    let half = n / 2;
    std::thread::scope(|sc| {
        let a = sc.spawn(|| {
            (0..half)
                .map(|i| InProcessDevice::random(&format!("m{i}")))
                .collect::<Vec<_>>()
        });
        let mut b: Vec<InProcessDevice> = (half..n)
            .map(|i| InProcessDevice::random(&format!("m{i}")))
            .collect();
        let mut v = a.join().expect("keygen thread");
        v.append(&mut b);
        v
    })
}

fn source(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(FIRST_SOURCE) + i as u32)
}

/// Measures the gateway's memory with `devices` enrolled and up to `devices` sessions,
/// knocks offered at `rate` per second.
pub fn gateway_memory(lab: &Lab, devices: usize, rate: usize) -> MemoryResult {
    let mut r = MemoryResult {
        devices,
        ..MemoryResult::default()
    };
    let old_tmp = std::env::var_os("TMPDIR");
    if Path::new("/dev/shm").is_dir() {
        std::env::set_var("TMPDIR", "/dev/shm");
    }
    let ctl = Controller::start();
    match old_tmp {
        Some(v) => std::env::set_var("TMPDIR", v),
        None => std::env::remove_var("TMPDIR"),
    }
    ctl.add_app(APP, "tcp", APP_PORT);
    ctl.grant(APP, USER);
    eprintln!("(6) generating {devices} device keys");
    let devs = keys(devices);

    let mut options = GatewayOptions::new(Capture::Sniff);
    options.pinhole_secs = 1800;
    options.session_secs = 3600;
    // A short skew keeps the replay cache (2 × skew of knocks) small: at 70,000+ cached
    // entries the gateway's replay journal compacts on every knock (measured; see
    // BENCHMARKS.md), which would measure that bug instead of the memory.
    options.max_skew_secs = 5;
    options.extra_config = "per_source_rate = 100000\nper_source_burst = 100000\n\
         crypto_budget = 1000000\nsource_table_size = 200000\ncrypto_queue = 100000\n"
        .into();
    let mut gw = Gateway::start(lab, &ctl, options);
    // Stopped while the registry grows, so it loads one big snapshot instead of
    // thousands of growing ones.
    let start_rev = gw.synced_revision().unwrap_or(0);
    r.empty_kb = rss_kb(gw.pid());
    signal(gw.pid(), "-STOP");
    let t0 = Instant::now();
    let mut reg =
        postern_controller::registry::Registry::open(ctl.db()).expect("open the bench registry");
    for d in &devs {
        reg.add_device(&d.name, USER, &d.key.public_key())
            .unwrap_or_else(|e| panic!("enroll {}: {e}", d.name));
    }
    let final_rev = reg.revision().expect("registry revision");
    drop(reg);
    r.enroll_secs = t0.elapsed().as_secs_f64();
    eprintln!(
        "(6) enrolled {devices} devices in {:.1} s (revision {start_rev} -> {final_rev})",
        r.enroll_secs
    );
    signal(gw.pid(), "-CONT");
    let t1 = Instant::now();
    let mut rev = start_rev;
    while rev < final_rev && t1.elapsed() < Duration::from_secs(120) {
        rev = gw.wait_sync_after(rev, Duration::from_secs(120));
    }
    assert!(
        rev >= final_rev,
        "the gateway did not load revision {final_rev} within 120 s"
    );
    r.sync_secs = t1.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_secs(1));
    r.idle_kb = rss_kb(gw.pid());
    eprintln!(
        "(6) gateway loaded {devices} devices in {:.1} s: VmRSS {} kB, VmHWM {} kB",
        r.sync_secs, r.idle_kb.0, r.idle_kb.1
    );
    // How the registry arrived (one full snapshot, or deltas first): the resident size
    // after a load has depended on it.
    let loads: Vec<String> = gw
        .audit_events("sync")
        .iter()
        .filter(|v| v["revision"].as_u64().is_some_and(|r| r > start_rev))
        .map(|v| {
            format!(
                "{}{}",
                v["revision"],
                if v["delta"] == true { "Δ" } else { "" }
            )
        })
        .collect();
    eprintln!("(6) revisions applied during the load: {}", loads.join(" "));
    eprintln!(
        "(6) largest resident mappings: {}",
        largest_mappings(gw.pid(), 6)
    );
    if std::env::var_os("POSTERN_BENCH_LOAD_ONLY").is_some() {
        // POSTERN_BENCH_LOAD_ONLY=1: the load alone (no knocks, no revocations), to repeat
        // it quickly when the resident size after a load is in question.
        gw.stop(Duration::from_secs(10));
        crate::drop_postern_table(lab);
        return r;
    }

    // Up to three passes: each seals a fresh knock for every device whose address has no
    // allowed knock yet (a pass at a rate above what the loaded machine serves drops some).
    let gwk = gw.public_key;
    let dst = SocketAddrV4::new(lab.gateway_v4, SPA_PORT);
    let mut open: HashSet<Ipv4Addr> = HashSet::new();
    for pass in 0..3 {
        let todo: Vec<usize> = (0..devices)
            .filter(|&i| !open.contains(&source(i)))
            .collect();
        if todo.is_empty() {
            break;
        }
        eprintln!(
            "(6) pass {pass}: sealing {} knocks from distinct claimed addresses",
            todo.len()
        );
        let seal = |part: &[usize]| {
            part.iter()
                .map(|&i| {
                    let k = postern_e2e::seal_knock(
                        &devs[i].key,
                        &gwk,
                        APP,
                        postern_e2e::unix_ms(),
                        IpAddr::V4(source(i)),
                    );
                    (i, k)
                })
                .collect::<Vec<_>>()
        };
        // Sealed just in time, half a second's worth at a time, so every knock is well
        // inside the 5 s skew when it arrives.
        let chunk = (rate / 2).max(1);
        let pass_start = Instant::now();
        for part in todo.chunks(chunk) {
            if pass_start.elapsed() > Duration::from_secs(180) {
                eprintln!("(6) pass {pass}: 180 s bound reached");
                break;
            }
            let (left, right) = part.split_at(part.len() / 2);
            let knocks: Vec<(usize, Vec<u8>)> = std::thread::scope(|sc| {
                let a = sc.spawn(|| seal(left));
                let mut b = seal(right);
                let mut v = a.join().expect("seal thread");
                v.append(&mut b);
                v
            });
            r.knocks_sent += run_in(lab.client.name(), || {
                let sock = raw::RawUdp::open();
                let t0 = Instant::now();
                let mut sent = 0usize;
                for (n, (i, k)) in knocks.iter().enumerate() {
                    let due = Duration::from_secs_f64(n as f64 / rate as f64);
                    while t0.elapsed() < due {
                        std::hint::spin_loop();
                    }
                    if sock.send(source(*i), dst, k) {
                        sent += 1;
                    }
                }
                sent
            });
        }
        // Drain: stop when the count is stable for 2 s (at most 60 s).
        let drain_start = Instant::now();
        let mut last = (allowed_sources(&gw.audit_log).len(), Instant::now());
        while drain_start.elapsed() < Duration::from_secs(60) {
            std::thread::sleep(Duration::from_millis(500));
            let now = allowed_sources(&gw.audit_log).len();
            if now != last.0 {
                last = (now, Instant::now());
            } else if last.1.elapsed() > Duration::from_secs(2) {
                break;
            }
        }
        open = allowed_sources(&gw.audit_log);
        eprintln!("(6) pass {pass}: {} sources allowed so far", open.len());
    }
    r.sessions = open.len();
    // Every 5000th device: those allowed must have their pinhole in the kernel (each
    // `nft get element` on a 100,000-element map takes about half a second).
    let sample: Vec<Ipv4Addr> = (0..devices)
        .step_by(5000)
        .map(source)
        .filter(|a| open.contains(a))
        .collect();
    r.pinholes_sampled = sample.len();
    r.pinholes = pinholes_present(lab, &sample);
    r.loaded_kb = rss_kb(gw.pid());
    eprintln!(
        "(6) {} knocks sent, {} allowed, {} pinholes: VmRSS {} kB, VmHWM {} kB",
        r.knocks_sent, r.sessions, r.pinholes, r.loaded_kb.0, r.loaded_kb.1
    );
    revoke_at_scale(&ctl, &gw, &devs, &open, &mut r);
    gw.check_alive();
    gw.stop(Duration::from_secs(10));
    crate::drop_postern_table(lab);
    r
}

/// Revokes [`REVOKES`] devices that hold a live session, one at a time, with the whole
/// registry and session table in place: what a revocation costs at this scale (the
/// controller's new revision and delta, the gateway's new view, the re-evaluation of every
/// live session). Times come from the gateway's audit clock (ms resolution).
fn revoke_at_scale(
    ctl: &Controller,
    gw: &Gateway,
    devs: &[InProcessDevice],
    open: &HashSet<Ipv4Addr>,
    r: &mut MemoryResult,
) {
    let candidates: Vec<usize> = (0..devs.len())
        .filter(|&i| open.contains(&source(i)))
        .collect();
    let step = (candidates.len() / REVOKES).max(1);
    // The view is in force before its `sync` line is written (after the file is saved),
    // so a session can close before the line: a trial's line is the first with a revision
    // above every revision seen before it.
    let mut seen_revision = gw.synced_revision().unwrap_or(0);
    for &i in candidates.iter().step_by(step).take(REVOKES) {
        let offset = std::fs::metadata(&gw.audit_log)
            .map(|m| m.len())
            .unwrap_or(0);
        let src = source(i).to_string();
        let t0 = Instant::now();
        let t0_unix_ms = postern_e2e::unix_ms();
        ctl.revoke(&devs[i].name);
        r.revoke_command.push(t0.elapsed().as_secs_f64() * 1e3);
        let seen = postern_e2e::poll(REVOKE_WAIT, Duration::from_millis(20), || {
            let events = events_after(&gw.audit_log, offset);
            let at = |want: &dyn Fn(&serde_json::Value) -> bool| {
                events
                    .iter()
                    .find(|v| want(v))
                    .and_then(|v| v["ts_ms"].as_u64())
                    .map(|ts| ts.saturating_sub(t0_unix_ms) as f64)
            };
            let closed = at(&|v| v["event"] == "session_closed" && v["source"] == src.as_str())?;
            let sync = events.iter().find(|v| {
                v["event"] == "sync" && v["revision"].as_u64().is_some_and(|r| r > seen_revision)
            })?;
            Some((sync.clone(), closed))
        });
        match seen {
            Some((sync, closed)) => {
                let since_t0 = |field: &str| {
                    sync[field]
                        .as_u64()
                        .map_or(f64::NAN, |ms| ms.saturating_sub(t0_unix_ms) as f64)
                };
                let took = |field: &str| sync[field].as_u64().map_or(f64::NAN, |ms| ms as f64);
                r.revoke_stages.push(RevokeStages {
                    received: since_t0("received_at_ms"),
                    parse: took("parse_ms"),
                    view: took("view_ms"),
                    in_force: since_t0("in_force_at_ms"),
                    persist: took("persist_ms"),
                });
                r.revoke_closed.push(closed);
                seen_revision = events_after(&gw.audit_log, offset)
                    .iter()
                    .filter(|v| v["event"] == "sync")
                    .filter_map(|v| v["revision"].as_u64())
                    .fold(seen_revision, u64::max);
            }
            None => {
                eprintln!(
                    "(6) revoke of {} closed no session within {REVOKE_WAIT:?}",
                    devs[i].name
                );
                r.revoke_failed += 1;
            }
        }
    }
    eprintln!(
        "(6) revoke at scale: session closed after {:?} ms",
        r.revoke_closed
    );
}

/// The `n` mappings of `pid` holding the most resident memory (from /proc/PID/smaps):
/// `start-end name: Rss kB of Size kB` (where a resident size that depends on the run sits:
/// the main heap, an allocator arena, a big mmap'd block).
fn largest_mappings(pid: u32, n: usize) -> String {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
    let mut maps: Vec<(u64, u64, String)> = Vec::new();
    let mut current: Option<(String, u64)> = None;
    for line in smaps.lines() {
        let mut parts = line.split_whitespace();
        let first = parts.next().unwrap_or("");
        if first.contains('-') && !first.ends_with(':') {
            let name = parts.nth(4).unwrap_or("[anon]");
            current = Some((format!("{first} {name}"), 0));
        } else if first == "Size:" {
            if let Some(c) = current.as_mut() {
                c.1 = parts.next().and_then(|v| v.parse().ok()).unwrap_or(0);
            }
        } else if first == "Rss:" {
            let rss: u64 = parts.next().and_then(|v| v.parse().ok()).unwrap_or(0);
            if let Some((name, size)) = current.take() {
                maps.push((rss, size, name));
            }
        }
    }
    maps.sort_by_key(|m| std::cmp::Reverse(m.0));
    maps.iter()
        .take(n)
        .map(|(rss, size, name)| format!("{name}: Rss {rss} kB of {size} kB"))
        .collect::<Vec<_>>()
        .join("; ")
}

/// Audit lines written after byte `offset` of `audit`, parsed.
fn events_after(audit: &Path, offset: u64) -> Vec<serde_json::Value> {
    use std::io::{Read, Seek, SeekFrom};
    let mut tail = String::new();
    if let Ok(mut f) = std::fs::File::open(audit) {
        if f.seek(SeekFrom::Start(offset)).is_ok() {
            let _ = f.read_to_string(&mut tail);
        }
    }
    tail.lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// Distinct sources of allowed knocks in the gateway's audit log.
fn allowed_sources(audit: &Path) -> HashSet<Ipv4Addr> {
    std::fs::read_to_string(audit)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("\"decision\":\"allow\""))
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["src"].as_str().and_then(|a| a.parse().ok()))
        .collect()
}

/// How many of `sample` have a pinhole in `inet postern pinholes4` (point lookups with
/// `nft get element`: listing a 100,000-element map with nft takes minutes).
fn pinholes_present(lab: &Lab, sample: &[Ipv4Addr]) -> usize {
    sample
        .iter()
        .filter(|a| {
            let elem = format!("{{ {a} . tcp . {APP_PORT} }}");
            crate::sh(
                lab,
                true,
                &[
                    "nft",
                    "get",
                    "element",
                    "inet",
                    "postern",
                    "pinholes4",
                    &elem,
                ],
            )
            .status
            .success()
        })
        .count()
}

/// Sends UDP datagrams with a source address of our choice (`IPPROTO_RAW`).
mod raw {
    #![allow(unsafe_code)]
    use std::net::{Ipv4Addr, SocketAddrV4};

    pub struct RawUdp {
        fd: libc::c_int,
    }

    impl RawUdp {
        /// A raw IPv4 socket in the calling thread's namespace (needs CAP_NET_RAW).
        pub fn open() -> RawUdp {
            // SAFETY: plain socket(2); the fd is owned by the returned value.
            let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
            assert!(
                fd >= 0,
                "raw socket: {} (run as root)",
                std::io::Error::last_os_error()
            );
            RawUdp { fd }
        }

        /// One IPv4/UDP datagram from `src` (port 40000) to `dst`; true when sent.
        pub fn send(&self, src: Ipv4Addr, dst: SocketAddrV4, payload: &[u8]) -> bool {
            let total = 20 + 8 + payload.len();
            let mut p = Vec::with_capacity(total);
            p.extend_from_slice(&[0x45, 0]);
            p.extend_from_slice(&(total as u16).to_be_bytes());
            p.extend_from_slice(&[0, 0, 0x40, 0, 64, libc::IPPROTO_UDP as u8, 0, 0]);
            p.extend_from_slice(&src.octets());
            p.extend_from_slice(&dst.ip().octets());
            let mut sum: u32 = p
                .chunks(2)
                .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
                .sum();
            while sum > 0xffff {
                sum = (sum & 0xffff) + (sum >> 16);
            }
            let csum = !(sum as u16);
            p[10..12].copy_from_slice(&csum.to_be_bytes());
            p.extend_from_slice(&40000u16.to_be_bytes());
            p.extend_from_slice(&dst.port().to_be_bytes());
            p.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
            p.extend_from_slice(&[0, 0]); // no UDP checksum (allowed in IPv4)
            p.extend_from_slice(payload);
            // SAFETY: sockaddr_in is plain old data; all-zero is valid before filling in.
            let mut sin: libc::sockaddr_in = unsafe { std::mem::zeroed() };
            sin.sin_family = libc::AF_INET as libc::sa_family_t;
            sin.sin_addr.s_addr = u32::from(*dst.ip()).to_be();
            // SAFETY: `p` and `sin` are live locals of the given lengths for the whole call;
            // the kernel only reads them.
            let n = unsafe {
                libc::sendto(
                    self.fd,
                    p.as_ptr().cast(),
                    p.len(),
                    0,
                    (&sin as *const libc::sockaddr_in).cast(),
                    std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
                )
            };
            n == p.len() as isize
        }
    }

    impl Drop for RawUdp {
        fn drop(&mut self) {
            // SAFETY: closes the fd this value owns, once.
            unsafe { libc::close(self.fd) };
        }
    }
}
