//! End-to-end knock tests: real controller, real gateway (nftables in its own network
//! namespace), real client, real TCP connections from a client namespace.
//!
//! Owns: the knock scenarios of DESIGN §3/§4, each written once as a function taking the
//! capture mode and run for both `sniff` and `udp`. Must not touch: anything outside the
//! namespaces and temp directories its lab creates (see `postern_e2e`).

use std::net::{IpAddr, SocketAddr, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use postern_e2e::{
    echo_roundtrip, knock_cli_ok, poll, record_timing, tcp_connect, unix_ms, Capture, Controller,
    Device, Gateway, GatewayOptions, InProcessDevice, Lab,
};
use postern_protocol::keys::DevicePublicKey;
use postern_protocol::packet::{flags, seal, Knock, SealRandomness};
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

/// One lab with a controller and a running gateway. Fields drop in order: the gateway
/// first (its failure diagnostics need the namespace), then the controller, then the lab.
struct Setup {
    gw: Gateway,
    ctl: Controller,
    lab: Lab,
}

impl Setup {
    /// Lab + echo server on the app port + controller with app `web` granted to `alice`;
    /// `enroll` adds devices before the gateway starts (so its first snapshot has them).
    fn new(mode: Capture, enroll: impl FnOnce(&Controller)) -> Setup {
        let lab = Lab::new();
        lab.start_echo_server(APP_PORT);
        let ctl = Controller::start();
        ctl.add_app(APP, "tcp", APP_PORT);
        ctl.grant(APP, USER);
        enroll(&ctl);
        let gw = Gateway::start(&lab, &ctl, GatewayOptions::new(mode));
        Setup { gw, ctl, lab }
    }

    fn app_addr(&self) -> SocketAddr {
        SocketAddr::new(self.lab.gateway_addr(false), APP_PORT)
    }

    fn client_ip(&self) -> IpAddr {
        self.lab.client_addr(false)
    }

    fn connect(&self, timeout: Duration) -> std::io::Result<TcpStream> {
        tcp_connect(&self.lab.client, self.app_addr(), timeout)
    }

    /// The app port must not accept a connection from the client namespace.
    fn assert_dark(&mut self, when: &str) {
        self.gw.check_alive();
        if let Ok(stream) = self.connect(DARK_TIMEOUT) {
            drop(stream);
            panic!(
                "app port {} is reachable from the client {when}; it must stay dark",
                self.app_addr()
            );
        }
    }

    /// Polls new connections until one fails (the pinhole is gone) or `deadline` passes.
    /// Returns when it went dark.
    fn wait_dark(&mut self, deadline: Instant, what: &str) -> Instant {
        loop {
            match self.connect(DARK_TIMEOUT) {
                Err(_) => return Instant::now(),
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
            "{label} [{}]: new connections refused {:.2} s after the knock (pinhole_secs {})",
            self.gw.options.capture.as_str(),
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

    /// Sends `datagram` to the gateway's SPA port from a UDP socket created inside the
    /// client namespace.
    fn send_raw(&self, datagram: &[u8]) {
        let to = SocketAddr::new(self.lab.gateway_addr(false), self.gw.options.spa_port);
        self.lab.run_in(&self.lab.client, || {
            let sock = UdpSocket::bind("0.0.0.0:0").expect("bind a UDP socket in the client ns");
            let sent = sock.send_to(datagram, to).expect("send the SPA datagram");
            assert_eq!(sent, datagram.len());
        });
    }
}

/// The device id the gateway will log for an `ed25519:...` public key.
fn device_id(public_key: &str) -> String {
    DevicePublicKey::from_text(public_key)
        .unwrap_or_else(|e| panic!("public key {public_key:?}: {e}"))
        .device_id()
        .to_string()
}

/// A sealed knock for `app` from an in-process device, at `timestamp_ms`.
fn craft(dev: &InProcessDevice, gw: &Gateway, app: &str, timestamp_ms: u64) -> Vec<u8> {
    let mut nonce = [0u8; 16];
    let mut ephemeral = [0u8; 32];
    getrandom::getrandom(&mut nonce).expect("OS randomness");
    getrandom::getrandom(&mut ephemeral).expect("OS randomness");
    let knock = Knock {
        device: dev.key.public_key().device_id(),
        timestamp_ms,
        nonce,
        flags: flags::KNOCK,
        app: app.to_owned(),
        claimed_addr: None,
        posture_digest: [0; 32],
    };
    seal(
        &knock,
        &dev.key,
        &gw.public_key,
        SealRandomness {
            ephemeral_secret: ephemeral,
        },
    )
    .expect("seal a valid knock")
}

/// Knock with the real client, then connect every ~3 ms from the client namespace.
/// Returns the established stream and the time from the knock command's return to the
/// connection.
fn knock_and_connect(s: &Setup, dev: &Device, v6: bool) -> (TcpStream, Duration, Instant, u32) {
    let addr = SocketAddr::new(s.lab.gateway_addr(v6), APP_PORT);
    let gw_ip = s.lab.gateway_addr(v6);
    s.lab.run_in(&s.lab.client, || {
        let started = Instant::now();
        knock_cli_ok(&s.lab, &s.gw, dev, APP, gw_ip);
        let knocked = Instant::now();
        record_timing(&format!(
            "knock command [{}] {}: `ip netns exec C postern knock` ran {:.2} ms",
            s.gw.options.capture.as_str(),
            if v6 { "ipv6" } else { "ipv4" },
            (knocked - started).as_secs_f64() * 1000.0
        ));
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            match TcpStream::connect_timeout(&addr, Duration::from_millis(3)) {
                Ok(stream) => return (stream, knocked.elapsed(), knocked, attempts),
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
// Scenarios (each runs for both capture modes).
// ---------------------------------------------------------------------------------------

/// Dark before the knock; open within 100 ms of the knock; the pinhole (2 s) admits new
/// connections only for its window; the established flow lives until the session (4 s)
/// expires, then stops carrying data.
fn knock_opens_the_port_until_it_expires(mode: Capture) {
    let dev = Device::keygen("laptop");
    let mut s = Setup::new(mode, |ctl| {
        dev.enroll(ctl, USER);
    });
    s.assert_dark("before any knock");

    let (mut stream, took, knocked, attempts) = knock_and_connect(&s, &dev, false);
    record_timing(&format!(
        "knock->connect [{}] ipv4: {:.2} ms ({attempts} connect attempts)",
        mode.as_str(),
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
    if knocked.elapsed() + Duration::from_millis(500) < session {
        echo_roundtrip(&mut stream, b"still in session", Duration::from_millis(500))
            .unwrap_or_else(|e| panic!("established flow stopped before its session expired: {e}"));
    }
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
fn unknown_device_is_dropped(mode: Capture) {
    let enrolled = Device::keygen("laptop");
    let stranger = Device::keygen("stranger");
    let mut s = Setup::new(mode, |ctl| {
        enrolled.enroll(ctl, USER);
    });
    s.assert_dark("before any knock");
    knock_cli_ok(&s.lab, &s.gw, &stranger, APP, s.lab.gateway_addr(false));
    s.expect_decision(1, "drop", "unknown_device");
    s.assert_dark("after a knock by an unknown device");
}

/// The same datagram sent twice: the first opens, the second (after the pinhole expired) is
/// refused as `replay` and leaves the port closed.
fn replayed_packet_is_refused(mode: Capture) {
    let dev = InProcessDevice::random("crafted");
    let mut s = Setup::new(mode, |ctl| {
        ctl.add_device(&dev.name, USER, &dev.public_text());
    });
    let datagram = craft(&dev, &s.gw, APP, unix_ms());
    s.send_raw(&datagram);
    let sent = Instant::now();
    s.expect_decision(1, "allow", "granted");
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
}

/// A datagram with one flipped ciphertext byte is dropped as `decrypt`; the untouched
/// original then opens (so the flip alone made the difference).
fn tampered_packet_is_dropped(mode: Capture) {
    let dev = InProcessDevice::random("crafted");
    let mut s = Setup::new(mode, |ctl| {
        ctl.add_device(&dev.name, USER, &dev.public_text());
    });
    let datagram = craft(&dev, &s.gw, APP, unix_ms());
    let mut tampered = datagram.clone();
    // Past the 42-byte clear header: inside the encrypted device id.
    tampered[50] ^= 0x01;
    s.send_raw(&tampered);
    s.expect_decision(1, "drop", "decrypt");
    s.assert_dark("after a tampered knock");

    s.send_raw(&datagram);
    s.expect_decision(2, "allow", "granted");
    s.connect(Duration::from_millis(500))
        .expect("the untampered datagram opens the port");
}

/// A knock stamped 5 minutes ago (max skew 30 s) is dropped as `stale`.
fn expired_timestamp_is_dropped(mode: Capture) {
    let dev = InProcessDevice::random("crafted");
    let mut s = Setup::new(mode, |ctl| {
        ctl.add_device(&dev.name, USER, &dev.public_text());
    });
    let old = unix_ms() - 5 * 60 * 1000;
    s.send_raw(&craft(&dev, &s.gw, APP, old));
    s.expect_decision(1, "drop", "stale");
    s.assert_dark("after a knock with a 5-minute-old timestamp");
}

/// `device revoke` while the gateway runs reaches it without a restart: the device's next
/// knock is refused as `device_revoked`.
fn revoked_device_is_refused_without_restart(mode: Capture) {
    let dev = Device::keygen("phone");
    let mut s = Setup::new(mode, |ctl| {
        dev.enroll(ctl, USER);
    });
    let pid = s.gw.pid();
    // The device works before the revoke...
    knock_cli_ok(&s.lab, &s.gw, &dev, APP, s.lab.gateway_addr(false));
    let knocked = Instant::now();
    s.expect_decision(1, "allow", "granted");

    let before = s.gw.synced_revision().unwrap_or(0);
    let revoked = Instant::now();
    s.ctl.revoke(&dev.name);
    let rev = s.gw.wait_sync_after(before, Duration::from_secs(3));
    record_timing(&format!(
        "revoke->gateway snapshot [{}]: {:.1} ms (revision {before} -> {rev})",
        mode.as_str(),
        revoked.elapsed().as_secs_f64() * 1000.0
    ));

    // ...the old pinhole runs out, then the next knock is refused.
    let pinhole = Duration::from_secs(s.gw.options.pinhole_secs);
    s.wait_dark(
        knocked + pinhole + Duration::from_millis(1500),
        "after the pinhole expired",
    );
    knock_cli_ok(&s.lab, &s.gw, &dev, APP, s.lab.gateway_addr(false));
    s.expect_decision(2, "deny", "device_revoked");
    s.assert_dark("after a revoked device knocked");
    assert_eq!(s.gw.pid(), pid, "the gateway was not restarted");
    s.gw.check_alive();
}

/// Sniff mode owns no listening socket; UDP mode owns one on the SPA port.
fn listening_sockets_match_the_capture_mode(mode: Capture) {
    let s = Setup::new(mode, |_| {});
    let ss = s.gw.listening_sockets();
    let ours: Vec<&str> = ss
        .lines()
        .filter(|l| l.contains("postern-gateway"))
        .collect();
    match mode {
        Capture::Sniff => assert!(
            ours.is_empty(),
            "sniff mode must own no listening socket, `ss -lunpt` shows:\n{ss}"
        ),
        Capture::Udp => assert!(
            ours.iter()
                .any(|l| l.contains(&format!(":{}", s.gw.options.spa_port))),
            "udp mode must listen on UDP {}, `ss -lunpt` shows:\n{ss}",
            s.gw.options.spa_port
        ),
    }
}

/// The same knock over IPv6: the pinhole lands in the IPv6 map and admits the client.
fn ipv6_knock_opens_the_port(mode: Capture) {
    let dev = Device::keygen("laptop6");
    let mut s = Setup::new(mode, |ctl| {
        dev.enroll(ctl, USER);
    });
    let addr6 = SocketAddr::new(s.lab.gateway_addr(true), APP_PORT);
    if tcp_connect(&s.lab.client, addr6, DARK_TIMEOUT).is_ok() {
        panic!("IPv6 app port reachable before any knock");
    }
    let (mut stream, took, _, attempts) = knock_and_connect(&s, &dev, true);
    record_timing(&format!(
        "knock->connect [{}] ipv6: {:.2} ms ({attempts} connect attempts)",
        mode.as_str(),
        took.as_secs_f64() * 1000.0
    ));
    assert!(
        took <= KNOCK_BUDGET,
        "IPv6 connection took {took:?} after the knock returned (budget {KNOCK_BUDGET:?})"
    );
    echo_roundtrip(&mut stream, b"v6", Duration::from_secs(1)).expect("echo over IPv6");
    let line =
        s.gw.wait_knock(s.lab.client_addr(true), 1, DECISION_TIMEOUT);
    assert_eq!(line.get("decision").and_then(Value::as_str), Some("allow"));
    // IPv4 stays dark: the pinhole is for the knocking address only.
    s.assert_dark("over IPv4 after an IPv6 knock");
}

/// SIGTERM: the gateway closes every door it opened (pinholes and sessions, so a live flow
/// stops) and exits 0, leaving its dark ruleset in place.
fn clean_stop_closes_every_door(mode: Capture) {
    let dev = Device::keygen("laptop");
    let mut s = Setup::new(mode, |ctl| {
        dev.enroll(ctl, USER);
    });
    let (mut stream, _, _, _) = knock_and_connect(&s, &dev, false);
    echo_roundtrip(&mut stream, b"before stop", Duration::from_secs(1)).expect("echo");

    let asked = Instant::now();
    let status =
        s.gw.stop(Duration::from_secs(15))
            .expect("the gateway exits within 15 s of SIGTERM");
    record_timing(&format!(
        "clean stop [{}]: SIGTERM -> exit {:.2} s",
        mode.as_str(),
        asked.elapsed().as_secs_f64()
    ));
    assert!(status.success(), "clean stop must exit 0, got {status}");
    assert!(
        s.gw.table_exists(),
        "a clean stop keeps table inet postern (the host stays dark)"
    );
    if s.connect(DARK_TIMEOUT).is_ok() {
        panic!("app port reachable after the gateway stopped: the pinhole was not removed");
    }
    if echo_roundtrip(&mut stream, b"after stop", Duration::from_millis(700)).is_ok() {
        panic!("established flow still carries data after the gateway stopped");
    }
}

/// SIGKILL (a crash): no stop code runs, yet no door outlives its kernel timeout; and a
/// restarted gateway starts from empty sets (it clears what it finds, never widens it).
fn killed_gateway_leaves_no_door_past_its_timeout(mode: Capture) {
    let dev = Device::keygen("laptop");
    let mut s = Setup::new(mode, |ctl| {
        dev.enroll(ctl, USER);
    });

    // 1. Crash with a live pinhole and session: the kernel's timeouts close both.
    let (mut stream, _, knocked, _) = knock_and_connect(&s, &dev, false);
    s.gw.kill();
    echo_roundtrip(&mut stream, b"after the crash", Duration::from_secs(1))
        .expect("the session (4 s) still carries the flow right after the crash");
    s.wait_pinhole_expiry(knocked, "crash (gateway SIGKILLed)");
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
    let (mut stream, _, _, _) = knock_and_connect(&s, &dev, false);
    s.gw.kill();
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

macro_rules! both_modes {
    ($($scenario:ident),* $(,)?) => {
        mod sniff {
            $(#[test] fn $scenario() { super::$scenario(super::Capture::Sniff) })*
        }
        mod udp {
            $(#[test] fn $scenario() { super::$scenario(super::Capture::Udp) })*
        }
    };
}

both_modes!(
    knock_opens_the_port_until_it_expires,
    unknown_device_is_dropped,
    replayed_packet_is_refused,
    tampered_packet_is_dropped,
    expired_timestamp_is_dropped,
    revoked_device_is_refused_without_restart,
    listening_sockets_match_the_capture_mode,
    ipv6_knock_opens_the_port,
    clean_stop_closes_every_door,
    killed_gateway_leaves_no_door_past_its_timeout,
);
