//! End-to-end knock tests: real controller, real gateway (nftables in its own network
//! namespace), real client, real TCP connections from a client namespace.
//!
//! Owns: the knock scenarios of DESIGN §3/§4, each written once as a function taking the
//! capture mode and the address family, and run for {`sniff`, `udp`} x {IPv4, IPv6}
//! (tests `MODE::v4::SCENARIO` and `MODE::v6::SCENARIO`): the client knocks and connects
//! over that family only, and pinholes must land in that family's map (`pinholes4` or
//! `pinholes6`) and nowhere else. Must not touch: anything outside the
//! namespaces and temp directories its lab creates (see `postern_e2e`).

use std::net::{IpAddr, SocketAddr, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use postern_e2e::fixtures::TABLE;
use postern_e2e::{
    echo_roundtrip, knock_cli_ok, poll, record_timing, seal_knock, tcp_connect, unix_ms, Capture,
    Controller, Device, Gateway, GatewayOptions, InProcessDevice, Lab,
};
use postern_protocol::keys::DevicePublicKey;
use serde_json::Value;

const APP: &str = "web";
const APP_PORT: u16 = 8080;
const USER: &str = "alice";
/// A connection attempt to a dark port must fail within this.
const DARK_TIMEOUT: Duration = Duration::from_millis(300);
/// Knock command returned -> TCP connection established: the budget.
const KNOCK_BUDGET: Duration = Duration::from_millis(100);
/// How long the gateway may take to log a decision.
const DECISION_TIMEOUT: Duration = Duration::from_secs(3);

/// One lab with a controller and a running gateway, used over one address family. Fields
/// drop in order: the gateway first (its failure diagnostics need the namespace), then the
/// controller, then the lab.
struct Setup {
    gw: Gateway,
    ctl: Controller,
    lab: Lab,
    /// The scenario's address family: every knock, connection and datagram uses it.
    v6: bool,
}

impl Setup {
    /// Lab + echo server on the app port + controller with app `web` granted to `alice`;
    /// `enroll` adds devices before the gateway starts (so its first snapshot has them).
    fn new(mode: Capture, v6: bool, enroll: impl FnOnce(&Controller)) -> Setup {
        let lab = Lab::new();
        lab.start_echo_server(APP_PORT);
        let ctl = Controller::start();
        ctl.add_app(APP, "tcp", APP_PORT);
        ctl.grant(APP, USER);
        enroll(&ctl);
        let gw = Gateway::start(&lab, &ctl, GatewayOptions::new(mode));
        Setup { gw, ctl, lab, v6 }
    }

    /// "ipv4" or "ipv6", for messages and measurements.
    fn family(&self) -> &'static str {
        family(self.v6)
    }

    /// The gateway's address in the scenario's family.
    fn gw_ip(&self) -> IpAddr {
        self.lab.gateway_addr(self.v6)
    }

    fn app_addr(&self) -> SocketAddr {
        SocketAddr::new(self.gw_ip(), APP_PORT)
    }

    fn client_ip(&self) -> IpAddr {
        self.lab.client_addr(self.v6)
    }

    /// `[mode family]` for measurement lines.
    fn tag(&self) -> String {
        format!("[{} {}]", self.gw.options.capture.as_str(), self.family())
    }

    fn connect(&self, timeout: Duration) -> std::io::Result<TcpStream> {
        tcp_connect(&self.lab.client, self.app_addr(), timeout)
    }

    /// The app port must not accept a connection from the client namespace.
    fn assert_dark(&mut self, when: &str) {
        self.gw.check_alive();
        expect_no_answer(self.connect(DARK_TIMEOUT), self.app_addr(), when);
    }

    /// The app port over the *other* family must not accept a connection: a pinhole is for
    /// the knocking address only.
    fn assert_other_family_dark(&mut self, when: &str) {
        self.gw.check_alive();
        let other = SocketAddr::new(self.lab.gateway_addr(!self.v6), APP_PORT);
        let when = format!("over {} {when}", family(!self.v6));
        expect_no_answer(
            tcp_connect(&self.lab.client, other, DARK_TIMEOUT),
            other,
            &when,
        );
    }

    /// The elements of pinhole map `pinholes4` or `pinholes6`, as (address, protocol, port),
    /// read with `nft -j list map` in the gateway namespace.
    fn pinholes(&self, v6: bool) -> Vec<(IpAddr, String, u16)> {
        let map = if v6 { "pinholes6" } else { "pinholes4" };
        let out = self
            .lab
            .command_in(&self.lab.gateway, "nft")
            .args(["-j", "list", "map", "inet", TABLE, map])
            .output()
            .expect("run nft in the gateway namespace");
        assert!(
            out.status.success(),
            "nft -j list map inet {TABLE} {map}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let json: Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("nft -j list map {map}: not JSON ({e})"));
        let mut found = Vec::new();
        collect_concats(&json, &mut found);
        found
            .into_iter()
            .map(|c| {
                let parsed = (
                    c.first()
                        .and_then(Value::as_str)
                        .and_then(|a| a.parse().ok()),
                    c.get(1).and_then(Value::as_str).map(str::to_owned),
                    c.get(2)
                        .and_then(Value::as_u64)
                        .and_then(|p| u16::try_from(p).ok()),
                );
                match parsed {
                    (Some(a), Some(p), Some(port)) => (a, p, port),
                    _ => panic!("unexpected element {c:?} in map {map}"),
                }
            })
            .collect()
    }

    /// Right after an allowed knock: the client's pinhole is in the scenario family's map
    /// and the other family's map is empty.
    fn assert_pinhole_in_family_map(&self) {
        let want = (self.client_ip(), "tcp".to_owned(), APP_PORT);
        let ours = self.pinholes(self.v6);
        assert!(
            ours.contains(&want),
            "{}: pinhole {want:?} missing from map {}: {ours:?}",
            self.family(),
            if self.v6 { "pinholes6" } else { "pinholes4" }
        );
        let other = self.pinholes(!self.v6);
        assert!(
            other.is_empty(),
            "a {} knock must not add elements to the {} map: {other:?}",
            self.family(),
            family(!self.v6)
        );
    }

    /// Polls new connections until one fails (the pinhole is gone) or `deadline` passes.
    /// Returns when it went dark.
    fn wait_dark(&mut self, deadline: Instant, what: &str) -> Instant {
        loop {
            match self.connect(DARK_TIMEOUT) {
                Err(e) => {
                    expect_no_answer(Err(e), self.app_addr(), what);
                    return Instant::now();
                }
                Ok(stream) => drop(stream),
            }
            if Instant::now() >= deadline {
                panic!("app port still accepts new connections {what}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until new connections fail, at most 1.5 s past the pinhole's timeout counted
    /// from `knocked`, and records how long after the knock that was.
    fn wait_pinhole_expiry(&mut self, knocked: Instant, label: &str) {
        let pinhole = Duration::from_secs(self.gw.options.pinhole_secs);
        let dark_at = self.wait_dark(
            knocked + pinhole + Duration::from_millis(1500),
            &format!("1.5 s after the pinhole expired ({label})"),
        );
        record_timing(&format!(
            "{label} {}: new connections refused {:.2} s after the knock (pinhole_secs {})",
            self.tag(),
            (dark_at - knocked).as_secs_f64(),
            self.gw.options.pinhole_secs
        ));
    }

    /// Waits for the `n`-th knock decision from the client and checks verdict and reason.
    fn expect_decision(&mut self, n: usize, decision: &str, reason: &str) -> Value {
        let line = self.gw.wait_knock(self.client_ip(), n, DECISION_TIMEOUT);
        let got = (
            line.get("decision").and_then(Value::as_str),
            line.get("reason").and_then(Value::as_str),
        );
        if got != (Some(decision), Some(reason)) {
            panic!(
                "knock #{n}: expected decision {decision:?} reason {reason:?}, audit line was {line}"
            );
        }
        line
    }

    /// Sends `datagram` to the gateway's SPA port (scenario family) from a UDP socket
    /// created inside the client namespace.
    fn send_raw(&self, datagram: &[u8]) {
        let to = SocketAddr::new(self.gw_ip(), self.gw.options.spa_port);
        let bind = if self.v6 { "[::]:0" } else { "0.0.0.0:0" };
        self.lab.run_in(&self.lab.client, || {
            let sock = UdpSocket::bind(bind).expect("bind a UDP socket in the client ns");
            let sent = sock.send_to(datagram, to).expect("send the SPA datagram");
            assert_eq!(sent, datagram.len());
        });
    }
}

fn family(v6: bool) -> &'static str {
    if v6 {
        "ipv6"
    } else {
        "ipv4"
    }
}

/// Every `"concat": [...]` array in an `nft -j` document (the keys of map elements).
fn collect_concats(v: &Value, out: &mut Vec<Vec<Value>>) {
    match v {
        Value::Object(map) => {
            for (k, v) in map {
                match (k.as_str(), v) {
                    ("concat", Value::Array(items)) => out.push(items.clone()),
                    _ => collect_concats(v, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|i| collect_concats(i, out)),
        _ => {}
    }
}

/// A dark port gives no answer at all: the connect must time out. A reset ("connection
/// refused") would mean the host answered, and "unreachable" a broken lab: both fail here,
/// so a dark-port check cannot pass for the wrong reason.
fn expect_no_answer(result: std::io::Result<TcpStream>, addr: SocketAddr, when: &str) {
    match result {
        Ok(_) => panic!("app port {addr} is reachable from the client {when}; it must stay dark"),
        Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
        Err(e) => panic!("app port {addr} {when}: expected no answer (a timeout), got {e}"),
    }
}

/// The device id the gateway will log for an `ed25519:...` public key.
fn device_id(public_key: &str) -> String {
    DevicePublicKey::from_text(public_key)
        .unwrap_or_else(|e| panic!("public key {public_key:?}: {e}"))
        .device_id()
        .to_string()
}

/// Knock with the real client over the scenario's family, then connect every ~3 ms from the
/// client namespace. Returns the established stream, the time from starting the knock
/// command to the connection, the instant the knock command returned, and the attempts.
fn knock_and_connect(s: &Setup, dev: &Device) -> (TcpStream, Duration, Instant, u32) {
    let addr = s.app_addr();
    let gw_ip = s.gw_ip();
    s.lab.run_in(&s.lab.client, || {
        let started = Instant::now();
        knock_cli_ok(&s.lab, &s.gw, dev, APP, gw_ip);
        let knocked = Instant::now();
        record_timing(&format!(
            "knock command {}: `ip netns exec C postern knock` ran {:.2} ms",
            s.tag(),
            (knocked - started).as_secs_f64() * 1000.0
        ));
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            match TcpStream::connect_timeout(&addr, Duration::from_millis(3)) {
                // Timed from before the client process started (its start-up and
                // exit included), so the gateway gets no head start in the figure.
                Ok(stream) => return (stream, started.elapsed(), knocked, attempts),
                Err(_) if knocked.elapsed() < Duration::from_secs(2) => {}
                Err(e) => panic!(
                    "no TCP connection to {addr} within 2 s of the knock \
                     ({attempts} attempts, last error {e})"
                ),
            }
        }
    })
}

// ---------------------------------------------------------------------------------------
// Scenarios (each runs for both capture modes over both address families).
// ---------------------------------------------------------------------------------------

/// Dark before the knock; open within 100 ms of the knock; the pinhole (2 s) admits new
/// connections only for its window; the established flow lives until the session (4 s)
/// expires, then stops carrying data. The pinhole lands in the family's map, and the app
/// port stays dark over the other family (the pinhole is for the knocking address only).
fn knock_opens_the_port_until_it_expires(mode: Capture, v6: bool) {
    let dev = Device::keygen("laptop");
    let mut s = Setup::new(mode, v6, |ctl| {
        dev.enroll(ctl, USER);
    });
    s.assert_dark("before any knock");
    s.assert_other_family_dark("before any knock");

    let (mut stream, took, knocked, attempts) = knock_and_connect(&s, &dev);
    record_timing(&format!(
        "knock->connect {}: {:.2} ms ({attempts} connect attempts)",
        s.tag(),
        took.as_secs_f64() * 1000.0
    ));
    assert!(
        took <= KNOCK_BUDGET,
        "connection took {took:?} after the knock returned (budget {KNOCK_BUDGET:?})"
    );
    echo_roundtrip(
        &mut stream,
        b"hello through the pinhole",
        Duration::from_secs(1),
    )
    .expect("the app answers through the pinhole");
    let line = s.expect_decision(1, "allow", "granted");
    assert_eq!(
        line.get("device").and_then(Value::as_str),
        Some(device_id(&dev.public_key).as_str())
    );
    assert_eq!(line.get("app").and_then(Value::as_str), Some(APP));
    assert_eq!(line.get("user").and_then(Value::as_str), Some(USER));
    s.assert_pinhole_in_family_map();
    s.assert_other_family_dark(&format!("after a {} knock", s.family()));

    // Inside the knock window a second new connection is still admitted.
    let mid = knocked + Duration::from_millis(1000);
    std::thread::sleep(mid.saturating_duration_since(Instant::now()));
    s.connect(Duration::from_millis(500))
        .expect("a new connection 1 s after the knock (pinhole 2 s) is admitted");

    // The pinhole expires: new connections fail.
    s.wait_pinhole_expiry(knocked, "pinhole expiry");
    s.assert_dark("after the pinhole expired");

    // The established flow outlives the pinhole while its session lives...
    let session = Duration::from_secs(s.gw.options.session_secs);
    // Never skipped: on a machine too slow to get here inside the session the check
    // would prove nothing, so that is a failure too, not a pass.
    assert!(
        knocked.elapsed() + Duration::from_millis(500) < session,
        "reached the in-session check {:?} after the knock: too late for session_secs {} \
         to mean anything (the machine is overloaded)",
        knocked.elapsed(),
        s.gw.options.session_secs
    );
    echo_roundtrip(&mut stream, b"still in session", Duration::from_millis(500))
        .unwrap_or_else(|e| panic!("established flow stopped before its session expired: {e}"));
    // ...and stops carrying data once the session has expired.
    let after_session = knocked + session + Duration::from_millis(300);
    std::thread::sleep(after_session.saturating_duration_since(Instant::now()));
    if echo_roundtrip(
        &mut stream,
        b"after the session",
        Duration::from_millis(700),
    )
    .is_ok()
    {
        panic!(
            "established flow still carries data after its session (session_secs {}) expired",
            s.gw.options.session_secs
        );
    }
    s.assert_dark("after the session expired");
}

/// A device whose key is not enrolled is dropped as `unknown_device`.
fn unknown_device_is_dropped(mode: Capture, v6: bool) {
    let enrolled = Device::keygen("laptop");
    let stranger = Device::keygen("stranger");
    let mut s = Setup::new(mode, v6, |ctl| {
        enrolled.enroll(ctl, USER);
    });
    s.assert_dark("before any knock");
    knock_cli_ok(&s.lab, &s.gw, &stranger, APP, s.gw_ip());
    s.expect_decision(1, "drop", "unknown_device");
    s.assert_dark("after a knock by an unknown device");
}

/// The same datagram sent twice: the first opens, the second (after the pinhole expired) is
/// refused as `replay` and leaves the port closed.
fn replayed_packet_is_refused(mode: Capture, v6: bool) {
    let dev = InProcessDevice::random("crafted");
    let mut s = Setup::new(mode, v6, |ctl| {
        ctl.add_device(&dev.name, USER, &dev.public_text());
    });
    let datagram = seal_knock(&dev.key, &s.gw.public_key, APP, unix_ms(), s.client_ip());
    s.send_raw(&datagram);
    let sent = Instant::now();
    s.expect_decision(1, "allow", "granted");
    s.assert_pinhole_in_family_map();
    s.connect(Duration::from_millis(500))
        .expect("the original datagram opens the port");
    let pinhole = Duration::from_secs(s.gw.options.pinhole_secs);
    s.wait_dark(
        sent + pinhole + Duration::from_millis(1500),
        "after the pinhole expired",
    );

    s.send_raw(&datagram);
    s.expect_decision(2, "deny", "replay");
    s.assert_dark("after a replayed knock");
    assert!(
        s.pinholes(v6).is_empty(),
        "a replayed knock must not add a pinhole"
    );
}

/// A datagram with one flipped ciphertext byte is dropped as `decrypt`; the untouched
/// original then opens (so the flip alone made the difference).
fn tampered_packet_is_dropped(mode: Capture, v6: bool) {
    let dev = InProcessDevice::random("crafted");
    let mut s = Setup::new(mode, v6, |ctl| {
        ctl.add_device(&dev.name, USER, &dev.public_text());
    });
    let datagram = seal_knock(&dev.key, &s.gw.public_key, APP, unix_ms(), s.client_ip());
    let mut tampered = datagram.clone();
    // Past the 42-byte clear header: inside the encrypted device id.
    tampered[50] ^= 0x01;
    s.send_raw(&tampered);
    s.expect_decision(1, "drop", "decrypt");
    s.assert_dark("after a tampered knock");
    assert!(
        s.pinholes(v6).is_empty(),
        "a tampered knock must not add a pinhole"
    );

    s.send_raw(&datagram);
    s.expect_decision(2, "allow", "granted");
    s.assert_pinhole_in_family_map();
    s.connect(Duration::from_millis(500))
        .expect("the untampered datagram opens the port");
}

/// A knock stamped 5 minutes ago (max skew 30 s) is dropped as `stale`.
fn expired_timestamp_is_dropped(mode: Capture, v6: bool) {
    let dev = InProcessDevice::random("crafted");
    let mut s = Setup::new(mode, v6, |ctl| {
        ctl.add_device(&dev.name, USER, &dev.public_text());
    });
    let old = unix_ms() - 5 * 60 * 1000;
    s.send_raw(&seal_knock(
        &dev.key,
        &s.gw.public_key,
        APP,
        old,
        s.client_ip(),
    ));
    s.expect_decision(1, "drop", "stale");
    s.assert_dark("after a knock with a 5-minute-old timestamp");
}

/// `device revoke` while the gateway runs reaches it without a restart: the device's next
/// knock is refused as `device_revoked`.
fn revoked_device_is_refused_without_restart(mode: Capture, v6: bool) {
    let dev = Device::keygen("phone");
    let mut s = Setup::new(mode, v6, |ctl| {
        dev.enroll(ctl, USER);
    });
    let pid = s.gw.pid();
    // The device works before the revoke...
    knock_cli_ok(&s.lab, &s.gw, &dev, APP, s.gw_ip());
    let knocked = Instant::now();
    s.expect_decision(1, "allow", "granted");
    s.assert_pinhole_in_family_map();

    let before = s.gw.synced_revision().unwrap_or(0);
    let revoked = Instant::now();
    s.ctl.revoke(&dev.name);
    let rev = s.gw.wait_sync_after(before, Duration::from_secs(3));
    record_timing(&format!(
        "revoke->gateway snapshot {}: {:.1} ms (revision {before} -> {rev})",
        s.tag(),
        revoked.elapsed().as_secs_f64() * 1000.0
    ));

    // ...the old pinhole runs out, then the next knock is refused.
    let pinhole = Duration::from_secs(s.gw.options.pinhole_secs);
    s.wait_dark(
        knocked + pinhole + Duration::from_millis(1500),
        "after the pinhole expired",
    );
    knock_cli_ok(&s.lab, &s.gw, &dev, APP, s.gw_ip());
    s.expect_decision(2, "deny", "device_revoked");
    s.assert_dark("after a revoked device knocked");
    assert_eq!(s.gw.pid(), pid, "the gateway was not restarted");
    s.gw.check_alive();
}

/// Sniff mode owns no listening socket; UDP mode owns one on the SPA port that receives the
/// scenario's family (`*` is a dual-stack socket, `0.0.0.0` IPv4 only, `[::]` IPv6 only).
fn listening_sockets_match_the_capture_mode(mode: Capture, v6: bool) {
    let s = Setup::new(mode, v6, |_| {});
    let ss = s.gw.listening_sockets();
    let ours: Vec<&str> = ss
        .lines()
        .filter(|l| l.contains("postern-gateway"))
        .collect();
    let port = s.gw.options.spa_port;
    let local = if v6 {
        [format!("*:{port} "), format!("[::]:{port} ")]
    } else {
        [format!("*:{port} "), format!("0.0.0.0:{port} ")]
    };
    match mode {
        Capture::Sniff => assert!(
            ours.is_empty(),
            "sniff mode must own no listening socket, `ss -lunpt` shows:\n{ss}"
        ),
        Capture::Udp => assert!(
            ours.iter()
                .any(|l| l.starts_with("udp") && local.iter().any(|a| l.contains(a.as_str()))),
            "udp mode must listen on UDP {port} for {} (local address {local:?}), \
             `ss -lunpt` shows:\n{ss}",
            s.family()
        ),
    }
}

/// SIGTERM: the gateway closes every door it opened (pinholes and sessions, so a live flow
/// stops) and exits 0, leaving its dark ruleset in place.
fn clean_stop_closes_every_door(mode: Capture, v6: bool) {
    let dev = Device::keygen("laptop");
    let mut s = Setup::new(mode, v6, |ctl| {
        dev.enroll(ctl, USER);
    });
    let (mut stream, _, knocked, _) = knock_and_connect(&s, &dev);
    echo_roundtrip(&mut stream, b"before stop", Duration::from_secs(1)).expect("echo");
    s.assert_pinhole_in_family_map();

    let asked = Instant::now();
    let status =
        s.gw.stop(Duration::from_secs(15))
            .expect("the gateway exits within 15 s of SIGTERM");
    record_timing(&format!(
        "clean stop {}: SIGTERM -> exit {:.2} s",
        s.tag(),
        asked.elapsed().as_secs_f64()
    ));
    assert!(status.success(), "clean stop must exit 0, got {status}");
    assert!(
        s.gw.table_exists(),
        "a clean stop keeps table inet postern (the host stays dark)"
    );
    let left = s.pinholes(v6);
    assert!(
        left.is_empty(),
        "a clean stop removes its pinholes, {} map still holds {left:?}",
        s.family()
    );
    if s.connect(DARK_TIMEOUT).is_ok() {
        panic!("app port reachable after the gateway stopped: the pinhole was not removed");
    }
    if echo_roundtrip(&mut stream, b"after stop", Duration::from_millis(700)).is_ok() {
        panic!("established flow still carries data after the gateway stopped");
    }
    // The checks above prove the stop closed the doors only if the kernel's timeouts had
    // not closed them already: they must all have run inside the pinhole's window.
    let pinhole = Duration::from_secs(s.gw.options.pinhole_secs);
    assert!(
        knocked.elapsed() < pinhole,
        "the stop checks ended {:?} after the knock, past the {pinhole:?} pinhole: they \
         would pass even if the stop closed nothing",
        knocked.elapsed()
    );
}

/// SIGKILL (a crash): no stop code runs, yet no door outlives its kernel timeout; and a
/// restarted gateway starts from empty sets (it clears what it finds, never widens it).
fn killed_gateway_leaves_no_door_past_its_timeout(mode: Capture, v6: bool) {
    let dev = Device::keygen("laptop");
    let mut s = Setup::new(mode, v6, |ctl| {
        dev.enroll(ctl, USER);
    });

    // 1. Crash with a live pinhole and session: the kernel's timeouts close both.
    let (mut stream, _, knocked, _) = knock_and_connect(&s, &dev);
    s.gw.kill();
    s.assert_pinhole_in_family_map();
    echo_roundtrip(&mut stream, b"after the crash", Duration::from_secs(1))
        .expect("the session (4 s) still carries the flow right after the crash");
    s.wait_pinhole_expiry(knocked, "crash (gateway SIGKILLed)");
    let left = s.pinholes(v6);
    assert!(
        left.is_empty(),
        "the kernel must time out a crashed gateway's pinhole, {} map holds {left:?}",
        s.family()
    );
    let session = Duration::from_secs(s.gw.options.session_secs);
    std::thread::sleep(
        (knocked + session + Duration::from_millis(300)).saturating_duration_since(Instant::now()),
    );
    if echo_roundtrip(
        &mut stream,
        b"after the session",
        Duration::from_millis(700),
    )
    .is_ok()
    {
        panic!("a crashed gateway's flow still carries data after its session expired");
    }

    // 2. Crash with a live pinhole, restart at once: the new gateway clears it.
    s.gw = Gateway::start(&s.lab, &s.ctl, GatewayOptions::new(mode));
    let (mut stream, _, _, _) = knock_and_connect(&s, &dev);
    s.gw.kill();
    s.assert_pinhole_in_family_map();
    s.gw = Gateway::start(&s.lab, &s.ctl, GatewayOptions::new(mode));
    let ruleset = s.gw.ruleset();
    assert!(
        !ruleset.contains("elements"),
        "a restarted gateway must start with empty pinhole and session sets:\n{ruleset}"
    );
    s.assert_dark("right after the restart, inside the old pinhole's window");
    if echo_roundtrip(&mut stream, b"after restart", Duration::from_millis(700)).is_ok() {
        panic!("a flow admitted by the crashed gateway survived the restart");
    }
}

/// The lab itself: the veth pair carries IPv4 and IPv6 between the namespaces (no gateway
/// running, so no ruleset), and drop removes both namespaces. (Nothing is ever sent from the
/// root namespace: the lab's addresses exist only inside its namespaces.)
#[test]
fn lab_namespaces_are_isolated_and_cleaned_up() {
    let names;
    {
        let lab = Lab::new();
        names = (lab.client.name().to_owned(), lab.gateway.name().to_owned());
        assert_ne!(names.0, names.1);
        lab.start_echo_server(APP_PORT);
        // Reachable with no gateway running (no ruleset): proves the lab's wiring.
        let addr = SocketAddr::new(lab.gateway_addr(false), APP_PORT);
        let mut stream = tcp_connect(&lab.client, addr, Duration::from_secs(1))
            .expect("client reaches the gateway namespace over the veth pair");
        echo_roundtrip(&mut stream, b"wiring", Duration::from_secs(1)).expect("echo");
        let addr6 = SocketAddr::new(lab.gateway_addr(true), APP_PORT);
        tcp_connect(&lab.client, addr6, Duration::from_secs(1)).expect("IPv6 wiring");
    }
    let gone = poll(Duration::from_secs(2), Duration::from_millis(20), || {
        let list = std::fs::read_dir("/var/run/netns")
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default();
        (!list.contains(&names.0) && !list.contains(&names.1)).then_some(())
    });
    assert!(gone.is_some(), "lab namespaces {names:?} left behind");
}

/// One test per scenario, capture mode and address family: `sniff::v4::SCENARIO`,
/// `sniff::v6::SCENARIO`, `udp::v4::SCENARIO`, `udp::v6::SCENARIO`.
macro_rules! every_mode_and_family {
    ($($scenario:ident),* $(,)?) => {
        every_mode_and_family!(@mode sniff, Sniff, $($scenario),*);
        every_mode_and_family!(@mode udp, Udp, $($scenario),*);
    };
    (@mode $module:ident, $mode:ident, $($scenario:ident),*) => {
        mod $module {
            mod v4 {
                $(#[test] fn $scenario() { crate::$scenario(crate::Capture::$mode, false) })*
            }
            mod v6 {
                $(#[test] fn $scenario() { crate::$scenario(crate::Capture::$mode, true) })*
            }
        }
    };
}

every_mode_and_family!(
    knock_opens_the_port_until_it_expires,
    unknown_device_is_dropped,
    replayed_packet_is_refused,
    tampered_packet_is_dropped,
    expired_timestamp_is_dropped,
    revoked_device_is_refused_without_restart,
    listening_sockets_match_the_capture_mode,
    clean_stop_closes_every_door,
    killed_gateway_leaves_no_door_past_its_timeout,
);
