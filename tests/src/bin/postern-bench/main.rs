//! `postern-bench`: the side-by-side measurements of `scripts/bench` (issue 7).
//!
//! Owns: one `postern_e2e::Lab` (two namespaces joined by a veth, removed on drop), the
//! Postern controller and gateway it starts there, an fwknopd it configures and runs in the
//! lab's gateway namespace (own config, access, digest and run files in a temp dir), and
//! the traffic it sends: only from inside the lab's client namespace to the lab's gateway
//! namespace. Every loop is bounded in count and time. Prints one table on stdout.
//! Rows 1-3 live here; rows 4 (`forwarding`), 5 (`revoke`), 6 (`memory`), fwknop's rows 2-3
//! (`fwknop_rate`), the perf profile (`profile`) and issue 4's live-flow cuts (`cut`) in
//! their modules.
//! Must not touch: the root namespace's interfaces, routes or firewall, anything outside
//! its temp directories. Not part of `scripts/test` (CI budget).
#![allow(unsafe_code)] // the sub-millisecond connect probe and sendmmsg (module `sys`).

use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use postern_e2e::{
    bin, run_in, Capture, Controller, Gateway, GatewayOptions, InProcessDevice, Lab,
};
use postern_protocol::keys::GatewayPublicKey;

mod cut;
mod forwarding;
mod fwknop_rate;
mod memory;
mod profile;
mod revoke;

const APP: &str = "web";
const APP_PORT: u16 = 8080;
const FWK_PORT: u16 = 9090;
const SPA_PORT: u16 = 62201;
const USER: &str = "alice";
/// A trial that has not connected after this long counts as failed.
const TRIAL_TIMEOUT: Duration = Duration::from_secs(2);
/// How long one connect attempt waits for the SYN-ACK before a new SYN is tried.
const PROBE_WAIT: Duration = Duration::from_micros(200);

mod sys {
    #![allow(unsafe_code)]
    use std::net::SocketAddrV4;
    use std::time::Duration;

    /// One non-blocking TCP connect to `addr`, waiting at most `wait` (ppoll, ns
    /// resolution) for it to complete. True when the handshake succeeded.
    pub fn connect_once(addr: SocketAddrV4, wait: Duration) -> bool {
        // SAFETY: plain syscalls on a fd we own and close before returning; every pointer
        // passed points at a live local of the right type and size.
        unsafe {
            let fd = libc::socket(
                libc::AF_INET,
                libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                0,
            );
            if fd < 0 {
                return false;
            }
            let mut sin: libc::sockaddr_in = std::mem::zeroed();
            sin.sin_family = libc::AF_INET as libc::sa_family_t;
            sin.sin_port = addr.port().to_be();
            sin.sin_addr.s_addr = u32::from(*addr.ip()).to_be();
            let r = libc::connect(
                fd,
                (&sin as *const libc::sockaddr_in).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            );
            let mut ok = r == 0;
            if !ok && *libc::__errno_location() == libc::EINPROGRESS {
                let mut pfd = libc::pollfd {
                    fd,
                    events: libc::POLLOUT,
                    revents: 0,
                };
                let ts = libc::timespec {
                    tv_sec: wait.as_secs() as libc::time_t,
                    tv_nsec: wait.subsec_nanos() as libc::c_long,
                };
                if libc::ppoll(&mut pfd, 1, &ts, std::ptr::null()) > 0 {
                    let mut err: libc::c_int = 0;
                    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
                    libc::getsockopt(
                        fd,
                        libc::SOL_SOCKET,
                        libc::SO_ERROR,
                        (&mut err as *mut libc::c_int).cast(),
                        &mut len,
                    );
                    ok = err == 0;
                }
            }
            libc::close(fd);
            ok
        }
    }
}

/// Retries `connect_once` until it succeeds or `TRIAL_TIMEOUT` passes; the time since `t0`.
fn first_connect(addr: SocketAddrV4, t0: Instant) -> Option<Duration> {
    let deadline = t0 + TRIAL_TIMEOUT;
    loop {
        if sys::connect_once(addr, PROBE_WAIT) {
            return Some(t0.elapsed());
        }
        if Instant::now() >= deadline {
            return None;
        }
    }
}

fn sealed(dev: &InProcessDevice, gw: &GatewayPublicKey, client: Ipv4Addr) -> Vec<u8> {
    postern_e2e::seal_knock(
        &dev.key,
        gw,
        APP,
        postern_e2e::unix_ms(),
        IpAddr::V4(client),
    )
}

/// Latency samples in ms; `failed` trials never connected.
#[derive(Debug, Default)]
struct Samples {
    ms: Vec<f64>,
    failed: usize,
}

impl Samples {
    fn pct(&self, p: f64) -> f64 {
        postern_e2e::cut::percentile(&self.ms, p)
    }
}

fn sh(lab: &Lab, gateway_ns: bool, args: &[&str]) -> std::process::Output {
    let ns = if gateway_ns {
        &lab.gateway
    } else {
        &lab.client
    };
    let mut cmd = lab.command_in(ns, args[0]);
    cmd.args(&args[1..]);
    cmd.output().unwrap_or_else(|e| panic!("run {args:?}: {e}"))
}

/// Gateway settings for trials with one knock at a time: windows far longer than a trial,
/// no per-source limit in the way of back-to-back trials from one address.
fn one_device_options(mode: Capture) -> GatewayOptions {
    let mut options = GatewayOptions::new(mode);
    options.pinhole_secs = 30;
    options.session_secs = 60;
    options.extra_config = "per_source_rate = 100000\nper_source_burst = 100000\n".into();
    options
}

/// Knock → port usable over `trials` trials, and for the allowed knocks the gateway's own
/// part of it (audit `latency_us`: capture → pinhole committed).
fn postern_knock_latency(
    lab: &Lab,
    ctl: &Controller,
    mode: Capture,
    trials: usize,
) -> (Samples, Samples) {
    let name = format!("lat-{}", mode.as_str());
    let dev = InProcessDevice::random(&name);
    ctl.add_device(&name, USER, &dev.public_text());
    let mut gw = Gateway::start(lab, ctl, one_device_options(mode));
    let app = SocketAddrV4::new(lab.gateway_v4, APP_PORT);
    let spa = SocketAddr::new(IpAddr::V4(lab.gateway_v4), SPA_PORT);
    let mut s = Samples::default();
    let budget = Instant::now() + Duration::from_secs(60);
    for _ in 0..trials {
        if Instant::now() > budget {
            break;
        }
        // Close the door the previous trial opened (the gateway re-adds both elements on
        // a renew, so its own session table does not matter).
        let flush = sh(
            lab,
            true,
            &[
                "nft",
                "flush set inet postern sessions; flush map inet postern pinholes4",
            ],
        );
        assert!(flush.status.success(), "nft flush: {:?}", flush);
        let dgram = sealed(&dev, &gw.public_key, lab.client_v4);
        let r = run_in(lab.client.name(), || {
            let sock = UdpSocket::bind("0.0.0.0:0").expect("udp bind");
            sock.connect(spa).expect("udp connect");
            // Closed door really closed: a connect now must fail.
            let was_open = sys::connect_once(app, Duration::from_millis(2));
            let t0 = Instant::now();
            sock.send(&dgram).expect("send knock");
            (was_open, first_connect(app, t0))
        });
        assert!(
            !r.0,
            "the app port was open before the knock (flush failed)"
        );
        match r.1 {
            Some(d) => s.ms.push(d.as_secs_f64() * 1e3),
            None => s.failed += 1,
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    gw.check_alive();
    let inside = Samples {
        ms: gw
            .audit_events("knock")
            .iter()
            .filter(|v| v["decision"] == "allow")
            .filter_map(|v| v["latency_us"].as_u64())
            .map(|us| us as f64 / 1e3)
            .collect(),
        failed: 0,
    };
    gw.stop(Duration::from_secs(5));
    drop_postern_table(lab);
    (s, inside)
}

/// A stopped gateway leaves its dark table (fail closed); the next phase needs it gone.
fn drop_postern_table(lab: &Lab) {
    let _ = sh(lab, true, &["nft", "delete table inet postern"]);
}

/// What one sustained-knock run measured.
struct Sustained {
    offered: f64,
    allowed: f64,
    fraction: f64,
    flood_pps: f64,
    /// Gateway (VmRSS, VmHWM) in kB at the end of the run.
    rss_kb: (u64, u64),
    /// perf summary, when the run was profiled.
    profile: Option<String>,
}

/// Sustained distinct valid knocks for `secs` seconds at an offered `rate` per second,
/// optionally with a garbage flood and a perf profile of the gateway.
#[allow(clippy::too_many_arguments)]
fn postern_sustained(
    lab: &Lab,
    ctl: &Controller,
    devs: &[InProcessDevice],
    mode: Capture,
    rate: usize,
    secs: u64,
    flood_pps: u64,
    profile: bool,
) -> Sustained {
    let mut options = GatewayOptions::new(mode);
    options.pinhole_secs = 30;
    options.session_secs = 60;
    options.max_skew_secs = 120;
    options.extra_config =
        "per_source_rate = 100000\nper_source_burst = 100000\ncrypto_budget = 1000000\n".into();
    let mut gw = Gateway::start(lab, ctl, options);
    let total = rate * secs as usize;
    // Pre-seal everything on both cores (not timed): sealing costs the client as much as
    // opening costs the gateway, and the two share the machine.
    let gwk = gw.public_key;
    let client = lab.client_v4;
    let half = total / 2;
    let mut knocks: Vec<Vec<u8>> = std::thread::scope(|sc| {
        let a = sc.spawn(|| {
            (0..half)
                .map(|i| sealed(&devs[i % devs.len()], &gwk, client))
                .collect::<Vec<_>>()
        });
        let b = sc.spawn(|| {
            (half..total)
                .map(|i| sealed(&devs[i % devs.len()], &gwk, client))
                .collect::<Vec<_>>()
        });
        let mut v = a.join().expect("seal thread");
        v.extend(b.join().expect("seal thread"));
        v
    });
    let spa = SocketAddr::new(IpAddr::V4(lab.gateway_v4), SPA_PORT);
    let before = count_allows(&gw.audit_log);
    let flood_stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flood = (flood_pps > 0).then(|| {
        let stop = flood_stop.clone();
        postern_e2e::netns::spawn_in_thread(lab.client.name(), move || {
            flood_loop(spa, flood_pps, secs + 1, &stop)
        })
    });
    let profiler = profile
        .then(|| profile::Profiler::start(gw.pid(), secs + 1, mode.as_str()))
        .flatten();
    let sent = run_in(lab.client.name(), || {
        let sock = UdpSocket::bind("0.0.0.0:0").expect("udp bind");
        sock.connect(spa).expect("udp connect");
        let t0 = Instant::now();
        let mut sent = 0usize;
        for chunk in knocks.chunks_mut(16) {
            // Paced: chunk k leaves no earlier than k*16/rate s after t0.
            let due = Duration::from_secs_f64(sent as f64 / rate as f64);
            while t0.elapsed() < due {
                std::hint::spin_loop();
            }
            sent += postern_e2e::burst::send_batch(&sock, chunk);
            if t0.elapsed() > Duration::from_secs(secs + 5) {
                break;
            }
        }
        sent
    });
    flood_stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let flood_rate = flood.map_or(0.0, |h| h.join().expect("flood thread"));
    // Let the gateway drain its queue (bounded).
    std::thread::sleep(Duration::from_secs(2));
    let allowed = count_allows(&gw.audit_log) - before;
    gw.check_alive();
    let rss = memory::rss_kb(gw.pid());
    let profile = profiler.map(|p| p.finish(15));
    gw.stop(Duration::from_secs(5));
    drop_postern_table(lab);
    Sustained {
        offered: sent as f64 / secs as f64,
        allowed: allowed as f64 / secs as f64,
        fraction: allowed as f64 / sent.max(1) as f64,
        flood_pps: flood_rate,
        rss_kb: rss,
        profile,
    }
}

/// Garbage datagrams of knock size at `pps` for at most `secs` s (and 2M packets).
fn flood_loop(spa: SocketAddr, pps: u64, secs: u64, stop: &std::sync::atomic::AtomicBool) -> f64 {
    let sock = UdpSocket::bind("0.0.0.0:0").expect("flood bind");
    sock.connect(spa).expect("flood connect");
    let mut batch: Vec<Vec<u8>> = (0..64).map(|i| vec![0xa5 ^ i as u8; 220]).collect();
    let t0 = Instant::now();
    let mut sent: u64 = 0;
    while sent < 2_000_000 && t0.elapsed() < Duration::from_secs(secs) {
        if stop.load(std::sync::atomic::Ordering::Relaxed) {
            break;
        }
        let due = Duration::from_secs_f64(sent as f64 / pps as f64);
        if t0.elapsed() < due {
            std::thread::sleep(Duration::from_micros(100));
            continue;
        }
        sent += postern_e2e::burst::send_batch(&sock, &mut batch) as u64;
    }
    sent as f64 / t0.elapsed().as_secs_f64()
}

fn count_allows(audit: &Path) -> usize {
    std::fs::read_to_string(audit)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("\"event\":\"knock\"") && l.contains("\"decision\":\"allow\""))
        .count()
}

/// fwknopd in the gateway namespace (UDP server or pcap mode) behind an iptables DROP.
struct Fwknop {
    dir: tempfile::TempDir,
    key: String,
    hmac: String,
    daemon: Option<postern_e2e::ChildGuard>,
}

fn fwknop_setup(lab: &Lab, udp: bool) -> Fwknop {
    let dir = tempfile::Builder::new()
        .prefix("pst-bench-fwknop-")
        .tempdir()
        .expect("tmp");
    let out = Command::new("fwknop")
        .arg("--key-gen")
        .output()
        .expect("fwknop --key-gen (Debian package fwknop-client)");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_owned()))
            .unwrap_or_else(|| panic!("fwknop --key-gen printed no {name}: {text}"))
    };
    let key = field("KEY_BASE64:");
    let hmac = field("HMAC_KEY_BASE64:");
    let d = dir.path();
    let conf = format!(
        "PCAP_INTF {if};\nENABLE_UDP_SERVER {udp};\nUDPSERV_PORT {SPA_PORT};\nPCAP_FILTER udp port {SPA_PORT};\n\
         FWKNOP_RUN_DIR {run};\nFIREWALL_EXE /usr/sbin/iptables;\nENABLE_IPT_FORWARDING N;\nSYSLOG_IDENTITY pst-bench-fwknopd;\n",
        if = postern_e2e::lab::GATEWAY_IF,
        udp = if udp { "Y" } else { "N" },
        run = d.display(),
    );
    std::fs::write(d.join("fwknopd.conf"), conf).expect("write fwknopd.conf");
    let access = format!(
        "SOURCE ANY\nOPEN_PORTS tcp/{FWK_PORT}\nKEY_BASE64 {key}\nHMAC_KEY_BASE64 {hmac}\nFW_ACCESS_TIMEOUT 30\n"
    );
    let ap = d.join("access.conf");
    std::fs::write(&ap, access).expect("write access.conf");
    use std::os::unix::fs::PermissionsExt;
    for f in ["fwknopd.conf", "access.conf"] {
        std::fs::set_permissions(d.join(f), std::fs::Permissions::from_mode(0o600)).expect("chmod");
    }
    std::fs::write(d.join("client.rc"), "").expect("rc");
    std::fs::set_permissions(d.join("client.rc"), std::fs::Permissions::from_mode(0o600))
        .expect("chmod");
    let mut cmd = Command::new("fwknopd");
    cmd.arg("-f")
        .arg("-v")
        .arg("-c")
        .arg(d.join("fwknopd.conf"))
        .arg("-a")
        .arg(&ap)
        .arg("-d")
        .arg(d.join("digest.cache"))
        .arg("-p")
        .arg(d.join("fwknopd.pid"))
        .arg("-i")
        .arg(postern_e2e::lab::GATEWAY_IF);
    let log = d.join("fwknopd.log");
    let daemon = lab.spawn_logged(&lab.gateway, &cmd, &log, &log);
    // Ready when its chain exists; then the dark default for the app port.
    let ready = postern_e2e::poll(Duration::from_secs(10), Duration::from_millis(20), || {
        sh(lab, true, &["iptables", "-S", "FWKNOP_INPUT"])
            .status
            .success()
            .then_some(())
    });
    assert!(
        ready.is_some(),
        "fwknopd did not create FWKNOP_INPUT: {}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    std::thread::sleep(Duration::from_millis(300));
    let drop = sh(
        lab,
        true,
        &[
            "iptables",
            "-A",
            "INPUT",
            "-p",
            "tcp",
            "--dport",
            &FWK_PORT.to_string(),
            "-j",
            "DROP",
        ],
    );
    assert!(drop.status.success(), "iptables DROP: {drop:?}");
    Fwknop {
        dir,
        key,
        hmac,
        daemon: Some(daemon),
    }
}

fn fwknop_teardown(lab: &Lab, mut f: Fwknop) {
    if let Some(mut d) = f.daemon.take() {
        d.terminate(Duration::from_secs(5));
    }
    let port = FWK_PORT.to_string();
    let _ = sh(
        lab,
        true,
        &[
            "iptables", "-D", "INPUT", "-p", "tcp", "--dport", &port, "-j", "DROP",
        ],
    );
    let _ = sh(lab, true, &["iptables", "-F"]);
    let _ = sh(lab, true, &["iptables", "-X"]);
}

fn fwknop_client(lab: &Lab, f: &Fwknop) -> Command {
    let mut cmd = lab.command_in(&lab.client, "fwknop");
    cmd.args([
        "-A",
        &format!("tcp/{FWK_PORT}"),
        "-D",
        &lab.gateway_v4.to_string(),
    ])
    .args([
        "-a",
        &lab.client_v4.to_string(),
        "-p",
        &SPA_PORT.to_string(),
    ])
    .args([
        "--use-hmac",
        "--key-base64-rijndael",
        &f.key,
        "--key-base64-hmac",
        &f.hmac,
    ])
    .arg("--rc-file")
    .arg(f.dir.path().join("client.rc"))
    .arg("--no-save-args")
    .env("HOME", f.dir.path());
    cmd
}

fn fwknop_knock_latency(lab: &Lab, udp: bool, trials: usize) -> Samples {
    let f = fwknop_setup(lab, udp);
    let app = SocketAddrV4::new(lab.gateway_v4, FWK_PORT);
    let mut s = Samples::default();
    let budget = Instant::now() + Duration::from_secs(120);
    for _ in 0..trials {
        if Instant::now() > budget {
            break;
        }
        let _ = sh(lab, true, &["iptables", "-F", "FWKNOP_INPUT"]);
        let was_open = run_in(lab.client.name(), || {
            sys::connect_once(app, Duration::from_millis(2))
        });
        assert!(!was_open, "fwknop's port was open before the knock");
        let out = fwknop_client(lab, &f).output().expect("run fwknop client");
        // The client has sent its packet when it exits: the clock starts there.
        let t0 = Instant::now();
        assert!(
            out.status.success(),
            "fwknop client failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        match run_in(lab.client.name(), || first_connect(app, t0)) {
            Some(d) => s.ms.push(d.as_secs_f64() * 1e3),
            None => s.failed += 1,
        }
        if s.ms.is_empty() && s.failed >= 3 {
            let log = std::fs::read_to_string(f.dir.path().join("fwknopd.log")).unwrap_or_default();
            eprintln!("fwknop never opened the port in 3 trials; fwknopd log:\n{log}");
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    fwknop_teardown(lab, f);
    s
}

/// The command line: `--name NUMBER` options and `--only PHASE,...`.
struct Args {
    raw: Vec<String>,
}

const USAGE: &str =
    "usage: postern-bench [--trials 50] [--secs 10] [--rate 15000] [--devices 200] \
[--flood-pps 120000] [--revoke-trials 50] [--pinholes 100000] [--iperf-secs 5] \
[--mem-devices 100000] [--mem-rate 4000] [--fwknop-rate 300] [--fwknop-secs 5] \
[--cut-trials 50] [--only latency,sustained,flood,fwknop,profile,forwarding,revoke,memory,cut]";

const PHASES: &[&str] = &[
    "latency",
    "sustained",
    "flood",
    "fwknop",
    "profile",
    "forwarding",
    "revoke",
    "memory",
    "cut",
];

fn usage_error(msg: &str) -> ! {
    eprintln!("postern-bench: {msg}\n{USAGE}");
    std::process::exit(2);
}

impl Args {
    fn parse() -> Args {
        let raw: Vec<String> = std::env::args().skip(1).collect();
        let known = [
            "--trials",
            "--secs",
            "--rate",
            "--devices",
            "--flood-pps",
            "--revoke-trials",
            "--pinholes",
            "--iperf-secs",
            "--mem-devices",
            "--mem-rate",
            "--fwknop-rate",
            "--fwknop-secs",
            "--cut-trials",
            "--only",
        ];
        let mut i = 0;
        while i < raw.len() {
            if raw[i] == "--help" || raw[i] == "-h" {
                println!("{USAGE}\nExample: sudo scripts/bench --secs 2 --trials 20 --only latency,revoke");
                std::process::exit(0);
            }
            if !known.contains(&raw[i].as_str()) {
                usage_error(&format!("unknown option {:?}", raw[i]));
            }
            if raw.get(i + 1).is_none() {
                usage_error(&format!("{} needs a value", raw[i]));
            }
            i += 2;
        }
        Args { raw }
    }

    fn value(&self, name: &str) -> Option<&str> {
        self.raw
            .iter()
            .position(|a| a == name)
            .and_then(|i| self.raw.get(i + 1))
            .map(String::as_str)
    }

    fn num(&self, name: &str, default: u64) -> u64 {
        match self.value(name) {
            None => default,
            Some(v) => match v.parse::<u64>() {
                Ok(n) if n > 0 => n,
                _ => usage_error(&format!("{name}: expected a positive number, got {v:?}")),
            },
        }
    }

    /// Phases to run (`--only`), all by default.
    fn phases(&self) -> Vec<&'static str> {
        match self.value("--only") {
            None => PHASES.to_vec(),
            Some(list) => list
                .split(',')
                .map(|p| {
                    PHASES
                        .iter()
                        .copied()
                        .find(|k| *k == p.trim())
                        .unwrap_or_else(|| {
                            usage_error(&format!(
                                "--only: unknown phase {p:?} (use {})",
                                PHASES.join(",")
                            ))
                        })
                })
                .collect(),
        }
    }
}

fn main() {
    let args = Args::parse();
    let trials = args.num("--trials", 50) as usize;
    let secs = args.num("--secs", 10);
    let rate = args.num("--rate", 15_000) as usize;
    let devices = args.num("--devices", 200) as usize;
    let flood_pps = args.num("--flood-pps", 120_000);
    let revoke_trials = args.num("--revoke-trials", 50) as usize;
    let pinholes = args.num("--pinholes", 100_000) as usize;
    let iperf_secs = args.num("--iperf-secs", 5);
    let mem_devices = args.num("--mem-devices", 100_000) as usize;
    let mem_rate = args.num("--mem-rate", 4000) as usize;
    let fwknop_rate = args.num("--fwknop-rate", 300) as usize;
    let fwknop_secs = args.num("--fwknop-secs", 5);
    let cut_trials = args.num("--cut-trials", 50) as usize;
    let phases = args.phases();
    let run = |p: &str| phases.contains(&p);
    for (tool, pkg) in [
        ("fwknopd", "fwknop-server"),
        ("fwknop", "fwknop-client"),
        ("iptables", "iptables"),
        ("iperf3", "iperf3"),
        ("perf", "linux-perf"),
    ] {
        if postern_e2e::lab::which(tool).is_none() {
            eprintln!("postern-bench: `{tool}` not found: apt-get install -y {pkg}");
            std::process::exit(2);
        }
    }
    let _ = bin("postern-gateway");
    let lab = Lab::new();
    eprintln!("lab: {} / {}", lab.client.name(), lab.gateway.name());
    lab.start_echo_server(APP_PORT);
    lab.start_echo_server(FWK_PORT);
    let ctl = Controller::start();
    ctl.add_app(APP, "tcp", APP_PORT);
    ctl.grant(APP, USER);

    let mut rows: Vec<String> = Vec::new();
    let mut notes: Vec<String> = Vec::new();
    let lat = |what: &str, name: &str, s: &Samples| {
        format!(
            "| {what} | {name} | {:.3} ms | {:.3} ms | {} ok, {} failed |",
            s.pct(50.0),
            s.pct(99.0),
            s.ms.len(),
            s.failed
        )
    };
    if run("latency") {
        eprintln!("(1) knock -> port usable, {trials} trials each");
        let what = "knock → port usable";
        let inside_what =
            "… of which inside the gateway (capture → pinhole committed, audit `latency_us`)";
        let (ps, ps_inside) = postern_knock_latency(&lab, &ctl, Capture::Sniff, trials);
        eprintln!("{}", lat(what, "Postern sniff", &ps));
        let (pu, pu_inside) = postern_knock_latency(&lab, &ctl, Capture::Udp, trials);
        eprintln!("{}", lat(what, "Postern udp", &pu));
        let fu = fwknop_knock_latency(&lab, true, trials);
        eprintln!("{}", lat(what, "fwknop UDP server", &fu));
        let fp = fwknop_knock_latency(&lab, false, trials);
        eprintln!("{}", lat(what, "fwknop pcap", &fp));
        rows.push(lat(what, "Postern sniff", &ps));
        rows.push(lat(inside_what, "Postern sniff", &ps_inside));
        rows.push(lat(what, "Postern udp", &pu));
        rows.push(lat(inside_what, "Postern udp", &pu_inside));
        rows.push(lat(what, "fwknop UDP server", &fu));
        rows.push(lat(what, "fwknop pcap", &fp));
        rows.push(format!(
            "| ratio p50 fwknop UDP / Postern sniff | | {:.1}× | {:.1}× (p99) | |",
            fu.pct(50.0) / ps.pct(50.0),
            fu.pct(99.0) / ps.pct(99.0)
        ));
        rows.push(format!(
            "| ratio p50 fwknop pcap / Postern sniff | | {:.1}× | {:.1}× (p99) | |",
            fp.pct(50.0) / ps.pct(50.0),
            fp.pct(99.0) / ps.pct(99.0)
        ));
    }

    let devs: Vec<InProcessDevice> = if run("sustained") || run("flood") || run("profile") {
        let devs: Vec<InProcessDevice> = (0..devices)
            .map(|i| InProcessDevice::random(&format!("b{i}")))
            .collect();
        for d in &devs {
            ctl.add_device(&d.name, USER, &d.public_text());
        }
        devs
    } else {
        Vec::new()
    };
    let mut best_sustained = 0.0f64;
    let mut best_flood = 0.0f64;
    if run("sustained") {
        eprintln!(
            "(2) sustained distinct valid knocks, {devices} devices, {rate}/s offered, {secs} s"
        );
        for mode in [Capture::Sniff, Capture::Udp] {
            let r = postern_sustained(&lab, &ctl, &devs, mode, rate, secs, 0, false);
            best_sustained = best_sustained.max(r.allowed);
            rows.push(format!(
                "| sustained valid knocks/s | Postern {} | {:.0}/s allowed | offered {:.0}/s | {:.1}% opened; gateway VmRSS {} kB |",
                mode.as_str(),
                r.allowed,
                r.offered,
                r.fraction * 100.0,
                r.rss_kb.0
            ));
            eprintln!("{}", rows.last().map(String::as_str).unwrap_or_default());
        }
    }
    if run("flood") {
        eprintln!("(3) the same under a garbage flood of {flood_pps} pps");
        for mode in [Capture::Sniff, Capture::Udp] {
            let r = postern_sustained(&lab, &ctl, &devs, mode, rate / 2, secs, flood_pps, false);
            best_flood = best_flood.max(r.allowed);
            rows.push(format!(
                "| valid knocks/s under flood ({:.0} pps reached) | Postern {} | {:.0}/s allowed | offered {:.0}/s | {:.1}% opened |",
                r.flood_pps,
                mode.as_str(),
                r.allowed,
                r.offered,
                r.fraction * 100.0
            ));
            eprintln!("{}", rows.last().map(String::as_str).unwrap_or_default());
        }
    }
    if run("fwknop") {
        eprintln!("(2/3) fwknop UDP server: {fwknop_rate}/s offered for {fwknop_secs} s, alone and under {flood_pps} pps");
        let (off, ok, frac, _) = fwknop_rate::fwknop_sustained(&lab, fwknop_rate, fwknop_secs, 0);
        rows.push(format!(
            "| sustained valid knocks/s | fwknop UDP server | {ok:.0}/s served | offered {off:.0}/s | {:.1}% served ({fwknop_secs} s) |",
            frac * 100.0
        ));
        eprintln!("{}", rows.last().map(String::as_str).unwrap_or_default());
        if best_sustained > 0.0 {
            rows.push(format!(
                "| ratio sustained Postern (best mode) / fwknop | | {:.0}× | | |",
                best_sustained / ok
            ));
        }
        let (off, okf, frac, fl) =
            fwknop_rate::fwknop_sustained(&lab, fwknop_rate, fwknop_secs, flood_pps);
        rows.push(format!(
            "| valid knocks/s under flood ({fl:.0} pps reached) | fwknop UDP server | {okf:.0}/s served | offered {off:.0}/s | {:.1}% served ({fwknop_secs} s) |",
            frac * 100.0
        ));
        eprintln!("{}", rows.last().map(String::as_str).unwrap_or_default());
        if best_flood > 0.0 {
            rows.push(format!(
                "| ratio under flood Postern (best mode) / fwknop | | {:.0}× | | |",
                best_flood / okf
            ));
        }
    }
    if run("profile") {
        eprintln!("(profile) perf record on the sniff gateway at {rate}/s offered for {secs} s");
        let r = postern_sustained(&lab, &ctl, &devs, Capture::Sniff, rate, secs, 0, true);
        rows.push(format!(
            "| sustained valid knocks/s, under perf | Postern sniff | {:.0}/s allowed | offered {:.0}/s | {:.1}% opened |",
            r.allowed,
            r.offered,
            r.fraction * 100.0
        ));
        if let Some(p) = r.profile {
            notes.push(format!(
                "profile of the sniff gateway ({rate}/s offered, {secs} s):\n{p}"
            ));
        }
    }
    if run("forwarding") {
        eprintln!(
            "(4) iperf3 through the ruleset, 1 vs {pinholes}+1 pinholes, {iperf_secs} s each"
        );
        let f = forwarding::forwarding(&lab, pinholes, iperf_secs, 3);
        let list = |v: &[f64]| {
            v.iter()
                .map(|x| format!("{x:.2}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let (empty, full) = (forwarding::median(&f.empty), forwarding::median(&f.full));
        rows.push(format!(
            "| delivery throughput to the app (iperf3 TCP, {iperf_secs} s, median of {}) | Postern ruleset, 1 pinhole | {empty:.2} Gbit/s | | rounds: {} |",
            f.empty.len(),
            list(&f.empty)
        ));
        rows.push(format!(
            "| delivery throughput to the app (iperf3 TCP, {iperf_secs} s, median of {}) | Postern ruleset, {}+1 pinholes | {full:.2} Gbit/s | | {:.1}% of the empty case; rounds: {} |",
            f.full.len(),
            f.pinholes,
            100.0 * full / empty,
            list(&f.full)
        ));
        let inst = forwarding::median(&f.install_secs);
        rows.push(format!(
            "| install {} pinholes (Firewall::open: one netlink batch of 2 elements each, acked) | postern_firewall | {inst:.2} s (median) | {:.1} µs/pinhole | rounds: {} s |",
            f.pinholes,
            inst * 1e6 / f.pinholes.max(1) as f64,
            list(&f.install_secs)
        ));
    }
    if run("revoke") {
        eprintln!("(5) revoke -> live flow dead, {revoke_trials} trials per mode");
        for mode in [Capture::Sniff, Capture::Udp] {
            let r = revoke::revoke_flow_dead(&lab, &ctl, mode, revoke_trials);
            let name = format!("Postern {}", mode.as_str());
            rows.push(lat(
                "revoke → live flow dead (echo every 10 ms)",
                &name,
                &r.dead,
            ));
            rows.push(lat(
                "… `device revoke` command start → exit",
                &name,
                &r.command,
            ));
            rows.push(lat(
                "… command start → gateway `sync` audit line (snapshot loaded)",
                &name,
                &r.synced,
            ));
            rows.push(lat(
                "… command start → gateway `session_closed` audit line",
                &name,
                &r.closed,
            ));
            eprintln!("{}", rows.last().map(String::as_str).unwrap_or_default());
        }
    }
    if run("memory") {
        eprintln!("(6) gateway memory, {mem_devices} devices, knocks at {mem_rate}/s");
        let m = memory::gateway_memory(&lab, mem_devices, mem_rate);
        rows.push(format!(
            "| gateway memory, 0 devices, 0 sessions (just started) | Postern sniff | VmRSS {:.1} MB | VmHWM {:.1} MB | |",
            m.empty_kb.0 as f64 / 1024.0,
            m.empty_kb.1 as f64 / 1024.0,
        ));
        rows.push(format!(
            "| gateway memory, {} devices, 0 sessions | Postern sniff | VmRSS {:.1} MB | VmHWM {:.1} MB | enrolled in {:.1} s, loaded in {:.1} s |",
            m.devices,
            m.idle_kb.0 as f64 / 1024.0,
            m.idle_kb.1 as f64 / 1024.0,
            m.enroll_secs,
            m.sync_secs
        ));
        rows.push(format!(
            "| gateway memory, {} devices, {} live sessions | Postern sniff | VmRSS {:.1} MB | VmHWM {:.1} MB | {} knocks sent (up to 3 passes, one source address per device); sampled pinholes in the kernel: {}/{} |",
            m.devices,
            m.sessions,
            m.loaded_kb.0 as f64 / 1024.0,
            m.loaded_kb.1 as f64 / 1024.0,
            m.knocks_sent,
            m.pinholes,
            m.pinholes_sampled
        ));
        let closed = Samples {
            ms: m.revoke_closed.clone(),
            failed: m.revoke_failed,
        };
        let stage = |f: fn(&memory::RevokeStages) -> f64| {
            Samples {
                ms: m.revoke_stages.iter().map(f).collect(),
                failed: 0,
            }
            .pct(50.0)
        };
        let command = Samples {
            ms: m.revoke_command.clone(),
            failed: 0,
        };
        rows.push(format!(
            "| revoke → session closed, {} devices, {} live sessions | Postern sniff | {:.1} ms | {:.1} ms (max of {}) | {} failed; p50 of the steps (gateway audit clock, ms): `device revoke` exits {:.1}, the delta line reaches the gateway {:.1}, parsed and applied to the base in {:.1}, view built in {:.1}, in force {:.1}; snapshot.json saved in {:.1} |",
            m.devices,
            m.sessions,
            closed.pct(50.0),
            closed.pct(99.0),
            closed.ms.len(),
            closed.failed,
            command.pct(50.0),
            stage(|s| s.received),
            stage(|s| s.parse),
            stage(|s| s.view),
            stage(|s| s.in_force),
            stage(|s| s.persist),
        ));
        eprintln!("{}", rows.last().map(String::as_str).unwrap_or_default());
    }
    if run("cut") {
        eprintln!("(issue 4) live flow cut by each trigger, {cut_trials} trials per trigger");
        rows.extend(cut::live_cut(&lab, cut_trials));
    }

    println!("| measurement | system | p50 / rate | p99 / offered | notes |");
    println!("|---|---|---|---|---|");
    for r in rows {
        println!("{r}");
    }
    for n in notes {
        println!("\n{n}");
    }
}
