//! Signed denial replies end to end (issue 4 "Signed denial replies", issue 5 "a denied
//! knock prints the remediation text"): a real controller with a policy requiring disk
//! encryption, a real gateway in its namespace (sniff and UDP capture, IPv4 and IPv6) and
//! the real client in the client namespace.
//!
//! Proven with a packet capture (an AF_PACKET socket) in the client namespace that sees
//! every IP packet the gateway sends there:
//! - a posture-failed device's knock gets exactly one datagram back, from the SPA port, and
//!   `postern knock` prints `denied: disk-encryption required` and the policy's
//!   remediation, exit status 8; the reply opens only with the knock's ephemeral secret;
//! - the same knock replayed, a knock from an unknown key, a tampered knock and garbage get
//!   not a single packet back;
//! - sniff mode still has no listening socket after replying;
//! - a granted knock that asks for it (`ACK`, set by `postern knock` while it waits) is
//!   acknowledged with the session length, so the client returns at once.
//!
//! Owns: these scenarios. Must not touch: anything outside the namespaces and temp
//! directories its lab creates.
#![allow(unsafe_code)]

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use postern_e2e::netns::spawn_in_thread;
use postern_e2e::{
    knock_cli_with, record_timing, seal_knock_with_reply_key, unix_ms, Capture, Controller, Device,
    Gateway, GatewayOptions, InProcessDevice, Lab,
};
use postern_protocol::keys::{DeviceSigningKey, GatewayPublicKey};
use postern_protocol::reply::{ReplyDecision, ReplyKey};
use serde_json::Value;

mod disk_policy;
use disk_policy::{apply_policy, store_report, APP, REMEDIATION};

const APP_PORT: u16 = 8080;
const DECISION_TIMEOUT: Duration = Duration::from_secs(3);
/// How long the client-side capture listens for anything from the gateway after a packet
/// that must get no answer.
const SILENCE_WINDOW: Duration = Duration::from_millis(1000);
/// `postern knock`'s exit status for a signed denial (spa-client/src/exit.rs).
const EXIT_DENIED: i32 = 8;

/// One IP packet the gateway sent into the client namespace.
#[derive(Debug)]
struct Seen {
    /// IP protocol (17 = UDP).
    proto: u8,
    /// UDP source port (0 for anything else).
    sport: u16,
    len: usize,
}

/// Captures, in the client namespace, every IP packet from `from` while `action` runs and
/// for `linger` after it returns. IPv6 neighbour discovery is not counted (the kernel's
/// own address resolution, not the gateway daemon). Returns the action's result too.
fn capture_from<T>(
    lab: &Lab,
    from: IpAddr,
    linger: Duration,
    action: impl FnOnce() -> T,
) -> (T, Vec<Seen>) {
    let (ready_tx, ready_rx) = mpsc::channel();
    let (stop_tx, stop_rx) = mpsc::channel::<Instant>();
    let handle = spawn_in_thread(lab.client.name(), move || {
        // SAFETY: plain socket(2); ETH_P_ALL in network byte order.
        let fd = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_DGRAM,
                i32::from((libc::ETH_P_ALL as u16).to_be()),
            )
        };
        assert!(
            fd >= 0,
            "AF_PACKET socket in the client namespace: {} (run as root; Debian package: none, kernel feature)",
            std::io::Error::last_os_error()
        );
        let tv = libc::timeval {
            tv_sec: 0,
            tv_usec: 20_000,
        };
        // SAFETY: `tv` is a valid timeval for the call.
        unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        ready_tx
            .send(())
            .expect("test thread waits for the capture");
        let mut seen = Vec::new();
        let mut deadline: Option<Instant> = None;
        let hard_stop = Instant::now() + Duration::from_secs(30);
        let mut buf = [0u8; 2048];
        while deadline.is_none_or(|d| Instant::now() < d) && Instant::now() < hard_stop {
            if deadline.is_none() {
                deadline = stop_rx.try_recv().ok();
            }
            // SAFETY: zeroed sockaddr_ll is valid; recvfrom writes at most `len` bytes.
            let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            let mut alen = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
            // SAFETY: `buf` and `addr` are valid for the lengths given.
            let n = unsafe {
                libc::recvfrom(
                    fd,
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    0,
                    (&mut addr as *mut libc::sockaddr_ll).cast(),
                    &mut alen,
                )
            };
            if n <= 0 || addr.sll_pkttype == libc::PACKET_OUTGOING {
                continue;
            }
            let p = &buf[..n as usize];
            let parsed = match (u16::from_be(addr.sll_protocol), p.first().map(|b| b >> 4)) {
                (0x0800, Some(4)) if p.len() >= 20 => {
                    let src = IpAddr::from(<[u8; 4]>::try_from(&p[12..16]).expect("4 bytes"));
                    let ihl = usize::from(p[0] & 0x0f) * 4;
                    Some((src, p[9], p.get(ihl..ihl + 2), false))
                }
                (0x86dd, Some(6)) if p.len() >= 40 => {
                    let src = IpAddr::from(<[u8; 16]>::try_from(&p[8..24]).expect("16 bytes"));
                    let nd = p[6] == 58 && p.get(40).is_some_and(|t| (133..=137).contains(t));
                    Some((src, p[6], p.get(40..42), nd))
                }
                _ => None,
            };
            if let Some((src, proto, ports, nd)) = parsed {
                if src == from && !nd {
                    let sport = match (proto, ports) {
                        (17, Some(b)) => u16::from_be_bytes([b[0], b[1]]),
                        _ => 0,
                    };
                    seen.push(Seen {
                        proto,
                        sport,
                        len: p.len(),
                    });
                }
            }
        }
        // SAFETY: `fd` is ours and closed once.
        unsafe { libc::close(fd) };
        seen
    });
    ready_rx
        .recv_timeout(Duration::from_secs(5))
        .expect("the capture thread starts");
    let result = action();
    stop_tx
        .send(Instant::now() + linger)
        .expect("the capture thread is running");
    let seen = handle.join().expect("the capture thread does not panic");
    (result, seen)
}

/// A knock for APP claiming `claimed`, and the reply key the real client would keep.
fn knock_with_reply_key(
    key: &DeviceSigningKey,
    gateway: &GatewayPublicKey,
    claimed: IpAddr,
) -> (Vec<u8>, ReplyKey) {
    seal_knock_with_reply_key(key, gateway, APP, unix_ms(), claimed)
}

fn audit_reply(line: &Value) -> (Option<&str>, Option<&str>, Option<bool>) {
    (
        line.get("decision").and_then(Value::as_str),
        line.get("reason").and_then(Value::as_str),
        line.get("reply").and_then(Value::as_bool),
    )
}

fn denial_reaches_only_the_signed_client(mode: Capture, v6: bool) {
    let lab = Lab::new();
    let ctl = Controller::start();
    ctl.add_app(APP, "tcp", APP_PORT);
    let laptop = Device::keygen("laptop");
    laptop.enroll(&ctl, "bob");
    let script = InProcessDevice::random("script");
    ctl.add_device("script", "bob", &script.public_text());
    let healthy = Device::keygen("healthy");
    healthy.enroll(&ctl, "bob");
    store_report(&ctl, "laptop", false);
    store_report(&ctl, "script", false);
    store_report(&ctl, "healthy", true);
    apply_policy(&ctl);
    let mut gw = Gateway::start(&lab, &ctl, GatewayOptions::new(mode));
    let gw_ip = lab.gateway_addr(v6);
    let client_ip = lab.client_addr(v6);
    let spa = SocketAddr::new(gw_ip, gw.options.spa_port);
    let tag = format!("[{} {}]", mode.as_str(), if v6 { "ipv6" } else { "ipv4" });
    let diag = |gw: &Gateway| gw.diagnostics();

    // 1. The real client: denied, with the failing requirement and its remediation.
    let (out, seen) = capture_from(&lab, gw_ip, Duration::from_millis(200), || {
        knock_cli_with(&lab, &gw, &laptop, APP, gw_ip, &["--wait-reply", "2000"])
    });
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(EXIT_DENIED),
        "{tag} postern knock exit status\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}\n{}",
        diag(&gw)
    );
    assert!(
        stdout.contains("denied: disk-encryption required\n"),
        "{tag} {stdout}"
    );
    assert!(
        stdout.contains(&format!("fix: {REMEDIATION}\n")),
        "{tag} {stdout}"
    );
    assert_eq!(seen.len(), 1, "{tag} exactly one reply datagram: {seen:?}");
    let first_reply_len = seen[0].len;
    assert_eq!(
        (seen[0].proto, seen[0].sport),
        (17, gw.options.spa_port),
        "{tag} the reply is UDP from the SPA port: {seen:?}"
    );
    let line = gw.wait_knock(client_ip, 1, DECISION_TIMEOUT);
    assert_eq!(
        audit_reply(&line),
        (Some("deny"), Some("policy_denied"), Some(true)),
        "{tag} {line}"
    );

    // 2. In-process knock: the reply opens with this knock's ephemeral secret only; the
    //    very same datagram replayed gets nothing.
    let (datagram, reply_key) = knock_with_reply_key(&script.key, &gw.public_key, client_ip);
    let (other, other_key) = knock_with_reply_key(&script.key, &gw.public_key, client_ip);
    let bind = if v6 { "[::]:0" } else { "0.0.0.0:0" };
    let (sock, reply, latency) = lab.run_in(&lab.client, || {
        let sock = UdpSocket::bind(bind).expect("bind a UDP socket in the client ns");
        sock.connect(spa).expect("connect to the SPA address");
        sock.set_read_timeout(Some(Duration::from_secs(2)))
            .expect("set a read timeout");
        let started = Instant::now();
        sock.send(&datagram).expect("send the knock");
        let mut buf = [0u8; 2048];
        let n = sock.recv(&mut buf).expect("a reply within 2 s");
        (sock, buf[..n].to_vec(), started.elapsed())
    });
    let opened = reply_key
        .open(&reply)
        .expect("the reply opens with the knock's key");
    assert_eq!(opened.decision, ReplyDecision::Deny, "{tag}");
    assert_eq!(opened.reason, "policy_denied", "{tag}");
    assert_eq!(opened.message, "disk-encryption required", "{tag}");
    assert_eq!(opened.remediation, REMEDIATION, "{tag}");
    assert!(
        other_key.open(&reply).is_err(),
        "{tag} another knock's key must not open the reply"
    );
    drop(other);
    record_timing(&format!(
        "deny_reply {tag}: knock sent -> reply received {} us, reply {} bytes",
        latency.as_micros(),
        reply.len()
    ));
    gw.wait_knock(client_ip, 2, DECISION_TIMEOUT);

    // 3. Silence: the replay, an unknown key, a tampered knock, garbage.
    let stranger = InProcessDevice::random("stranger");
    let (unknown, _) = knock_with_reply_key(&stranger.key, &gw.public_key, client_ip);
    let (mut tampered, _) = knock_with_reply_key(&script.key, &gw.public_key, client_ip);
    tampered[120] ^= 0x01;
    let garbage = vec![0x01u8; 204];
    let ((), seen) = capture_from(&lab, gw_ip, SILENCE_WINDOW, || {
        // From the socket that just got a reply: the gateway's conntrack entry for that
        // reply makes these packets "established" at its input hook, and still nothing,
        // not even an ICMP port-unreachable, comes back.
        lab.run_in(&lab.client, || {
            for d in [&datagram, &unknown, &tampered, &garbage] {
                sock.send(d).expect("send");
                // Space them out so the per-source token bucket admits each one.
                std::thread::sleep(Duration::from_millis(50));
            }
        });
    });
    assert!(
        seen.is_empty(),
        "{tag} the gateway sent {} packet(s) to the client for a replay, an unknown key, a tampered knock or garbage: {seen:?}\n{}",
        seen.len(),
        diag(&gw)
    );
    let replay = gw.wait_knock(client_ip, 3, DECISION_TIMEOUT);
    assert_eq!(
        audit_reply(&replay),
        (Some("deny"), Some("replay"), Some(false)),
        "{tag} {replay}"
    );
    let reasons: Vec<String> = gw
        .knocks_from(client_ip)
        .iter()
        .filter_map(|l| l.get("reason").and_then(Value::as_str).map(str::to_owned))
        .collect();
    for want in ["unknown_device", "decrypt"] {
        assert!(
            reasons.iter().any(|r| r == want),
            "{tag} audit has a {want} drop: {reasons:?}"
        );
    }

    // 4. Sniff mode replied through a send-only raw socket: still nothing listening.
    if mode == Capture::Sniff {
        let ss = gw.listening_sockets();
        assert!(
            !ss.contains(&format!(":{}", gw.options.spa_port)),
            "{tag} sniff mode must not listen on the SPA port:\n{ss}"
        );
    }
    record_timing(&format!(
        "deny_reply {tag}: `postern knock` denial: IP packet {wire} bytes",
        wire = first_reply_len
    ));

    // 5. ACK: `postern knock` asks for an acknowledgement while it waits, so a granted
    //    knock returns as soon as the door is open, with the session length (the policy
    //    rule's lease: 1 h by default).
    let started = Instant::now();
    let out = knock_cli_with(&lab, &gw, &healthy, APP, gw_ip, &["--wait-reply", "2000"]);
    let took = started.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{tag} granted knock: {stderr}");
    assert!(stderr.contains("granted: session 3600 s"), "{tag} {stderr}");
    assert!(
        took < Duration::from_millis(1500),
        "{tag} the acknowledged knock took {took:?} (waits up to 2 s without a reply)"
    );
    let line = gw.wait_knock(client_ip, 7, DECISION_TIMEOUT);
    assert_eq!(
        audit_reply(&line),
        (Some("allow"), Some("granted"), Some(true)),
        "{tag} {line}"
    );
    record_timing(&format!(
        "deny_reply {tag}: acknowledged `postern knock` (process start to exit) {} ms",
        took.as_millis()
    ));
}

mod sniff {
    #[test]
    fn v4() {
        crate::denial_reaches_only_the_signed_client(crate::Capture::Sniff, false);
    }
    #[test]
    fn v6() {
        crate::denial_reaches_only_the_signed_client(crate::Capture::Sniff, true);
    }
}

mod udp {
    #[test]
    fn v4() {
        crate::denial_reaches_only_the_signed_client(crate::Capture::Udp, false);
    }
    #[test]
    fn v6() {
        crate::denial_reaches_only_the_signed_client(crate::Capture::Udp, true);
    }
}
