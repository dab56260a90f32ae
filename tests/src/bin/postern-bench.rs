//! `postern-bench`: the side-by-side measurements of `scripts/bench` (issue 7).
//!
//! Owns: one `postern_e2e::Lab` (two namespaces joined by a veth, removed on drop), the
//! Postern controller and gateway it starts there, an fwknopd it configures and runs in the
//! lab's gateway namespace (own config, access, digest and run files in a temp dir), and
//! the traffic it sends: only from inside the lab's client namespace to the lab's gateway
//! namespace. Every loop is bounded in count and time. Prints one table on stdout.
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
        if self.ms.is_empty() {
            return f64::NAN;
        }
        let mut v = self.ms.clone();
        v.sort_by(f64::total_cmp);
        let i = ((p / 100.0) * (v.len() - 1) as f64).round() as usize;
        v[i.min(v.len() - 1)]
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

fn postern_knock_latency(lab: &Lab, ctl: &Controller, mode: Capture, trials: usize) -> Samples {
    let name = format!("lat-{}", mode.as_str());
    let dev = InProcessDevice::random(&name);
    ctl.add_device(&name, USER, &dev.public_text());
    let mut options = GatewayOptions::new(mode);
    options.pinhole_secs = 30;
    options.session_secs = 60;
    options.extra_config = "per_source_rate = 100000\nper_source_burst = 100000\n".into();
    let mut gw = Gateway::start(lab, ctl, options);
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
    gw.stop(Duration::from_secs(5));
    // A stopped gateway leaves its dark table (fail closed); fwknop's phase needs it gone.
    let _ = sh(lab, true, &["nft", "delete table inet postern"]);
    s
}

/// Sustained distinct valid knocks for `secs` seconds at an offered `rate` per second.
/// Returns (offered/s, allowed/s, fraction allowed, flood pps reached).
fn postern_sustained(
    lab: &Lab,
    ctl: &Controller,
    devs: &[InProcessDevice],
    mode: Capture,
    rate: usize,
    secs: u64,
    flood_pps: u64,
) -> (f64, f64, f64, f64) {
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
    gw.stop(Duration::from_secs(5));
    // A stopped gateway leaves its dark table (fail closed); fwknop's phase needs it gone.
    let _ = sh(lab, true, &["nft", "delete table inet postern"]);
    (
        sent as f64 / secs as f64,
        allowed as f64 / secs as f64,
        allowed as f64 / sent.max(1) as f64,
        flood_rate,
    )
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

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(|v| {
            v.parse()
                .unwrap_or_else(|_| panic!("{name}: expected a number, got {v:?}"))
        })
        .unwrap_or(default)
}

fn main() {
    let trials = arg("--trials", 50) as usize;
    let secs = arg("--secs", 10);
    let rate = arg("--rate", 15_000) as usize;
    let devices = arg("--devices", 200) as usize;
    let flood_pps = arg("--flood-pps", 120_000);
    for (tool, pkg) in [
        ("fwknopd", "fwknop-server"),
        ("fwknop", "fwknop-client"),
        ("iptables", "iptables"),
    ] {
        assert!(
            postern_e2e::lab::which(tool).is_some(),
            "`{tool}` not found: apt-get install -y {pkg}"
        );
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
    let lat = |name: &str, s: &Samples| {
        format!(
            "| knock → port usable | {name} | {:.3} ms | {:.3} ms | {} ok, {} failed |",
            s.pct(50.0),
            s.pct(99.0),
            s.ms.len(),
            s.failed
        )
    };
    eprintln!("(1) knock -> port usable, {trials} trials each");
    let ps = postern_knock_latency(&lab, &ctl, Capture::Sniff, trials);
    eprintln!("{}", lat("Postern sniff", &ps));
    let pu = postern_knock_latency(&lab, &ctl, Capture::Udp, trials);
    eprintln!("{}", lat("Postern udp", &pu));
    let fu = fwknop_knock_latency(&lab, true, trials);
    let fp = fwknop_knock_latency(&lab, false, trials);
    rows.push(lat("Postern sniff", &ps));
    rows.push(lat("Postern udp", &pu));
    rows.push(lat("fwknop UDP server", &fu));
    rows.push(lat("fwknop pcap", &fp));
    for r in &rows {
        eprintln!("{r}");
    }
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

    eprintln!("(2) sustained distinct valid knocks, {devices} devices, {rate}/s offered, {secs} s");
    let devs: Vec<InProcessDevice> = (0..devices)
        .map(|i| InProcessDevice::random(&format!("b{i}")))
        .collect();
    for d in &devs {
        ctl.add_device(&d.name, USER, &d.public_text());
    }
    for mode in [Capture::Sniff, Capture::Udp] {
        let (off, ok, frac, _) = postern_sustained(&lab, &ctl, &devs, mode, rate, secs, 0);
        rows.push(format!(
            "| sustained valid knocks/s | Postern {} | {ok:.0}/s allowed | offered {off:.0}/s | {:.1}% opened |",
            mode.as_str(),
            frac * 100.0
        ));
    }
    eprintln!("(3) the same under a garbage flood of {flood_pps} pps");
    for mode in [Capture::Sniff, Capture::Udp] {
        let (off, ok, frac, fl) =
            postern_sustained(&lab, &ctl, &devs, mode, rate / 2, secs, flood_pps);
        rows.push(format!(
            "| valid knocks/s under flood ({fl:.0} pps reached) | Postern {} | {ok:.0}/s allowed | offered {off:.0}/s | {:.1}% opened |",
            mode.as_str(),
            frac * 100.0
        ));
    }

    println!("| measurement | system | p50 / rate | p99 / offered | notes |");
    println!("|---|---|---|---|---|");
    for r in rows {
        println!("{r}");
    }
}
