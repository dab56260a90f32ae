//! Forward mode (connector) end to end: a client, the gateway, and an internal app host
//! behind it, three network namespaces; real controller, gateway and client binaries.
//!
//! Owns: the forward scenario of issue 6: the forwarded port is dark before the knock; after
//! it the client reaches the internal app through the gateway's address and port (data both
//! ways, the app sees the gateway's internal address: SNAT, the internal host has no route
//! back), and nothing else of the internal network; the pinhole's expiry stops new
//! connections while the live flow goes on; `device revoke` cuts the live forwarded flow
//! both ways, a late write from the app included (TCP loose pickup); the gateway turns IP
//! forwarding on in its namespace only for forward apps and restores it at stop.
//! Must not touch anything outside its lab (see `postern_e2e`).

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use postern_e2e::forward_lab::{accept_within, sysctl, InternalHost};
use postern_e2e::{
    knock_cli_ok, record_timing, tcp_connect, Capture, Controller, Device, Gateway, GatewayOptions,
    Lab,
};
use serde_json::Value;

const APP: &str = "wiki";
const USER: &str = "alice";
/// The port the client knocks for and connects to, on the gateway.
const PUBLIC_PORT: u16 = 8443;
/// The app's port on the internal host, and a second service there.
const APP_PORT: u16 = 80;
const OTHER_PORT: u16 = 9090;
const DARK_TIMEOUT: Duration = Duration::from_millis(300);
const PINHOLE_SECS: u64 = 2;
const SESSION_SECS: u64 = 60;

fn assert_unreachable(lab: &Lab, to: SocketAddr, what: &str) {
    if let Ok(s) = tcp_connect(&lab.client, to, DARK_TIMEOUT) {
        panic!("{what}: {to} accepted a connection ({:?})", s.peer_addr());
    }
}

fn assert_no_accept(l: &TcpListener, what: &str) {
    if let Some((_, peer)) = accept_within(l, Duration::ZERO) {
        panic!("{what}: the internal host accepted a connection from {peer}");
    }
}

fn expect_silence(s: &mut TcpStream, what: &str) {
    s.set_read_timeout(Some(Duration::from_millis(600)))
        .expect("read timeout");
    let mut buf = [0u8; 64];
    match s.read(&mut buf) {
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
        other => panic!("{what}: expected no data, got {other:?}"),
    }
}

/// Client sends, app answers; both must arrive within 2 s.
fn exchange(c: &mut TcpStream, s: &mut TcpStream, what: &str) {
    let mut buf = [0u8; 4];
    c.write_all(b"ping").expect("client write");
    s.set_read_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    s.read_exact(&mut buf)
        .unwrap_or_else(|e| panic!("{what}: the app did not get the client's data: {e}"));
    assert_eq!(&buf, b"ping");
    s.write_all(b"pong").expect("app write");
    c.set_read_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    c.read_exact(&mut buf)
        .unwrap_or_else(|e| panic!("{what}: the client did not get the app's answer: {e}"));
    assert_eq!(&buf, b"pong");
}

#[test]
fn forward_mode_reaches_only_the_internal_app_and_revocation_cuts_it() {
    let lab = Lab::new();
    let internal = InternalHost::attach(&lab);
    // No route back from the internal host: SNAT (the default) must make that unneeded.
    let app = internal.listen(SocketAddr::new(IpAddr::V4(internal.v4), APP_PORT));
    let other = internal.listen(SocketAddr::new(IpAddr::V4(internal.v4), OTHER_PORT));
    let target = SocketAddr::new(IpAddr::V4(internal.v4), APP_PORT);

    let ctl = Controller::start();
    let added = ctl.admin(&[
        "app",
        "add",
        APP,
        "--protocol",
        "tcp",
        "--port",
        &PUBLIC_PORT.to_string(),
        "--forward",
        &target.to_string(),
    ]);
    assert!(added.contains(&format!("forwarded to {target}")), "{added}");
    ctl.grant(APP, USER);
    let dev = Device::keygen("laptop");
    dev.enroll(&ctl, USER);
    let mut options = GatewayOptions::new(Capture::Sniff);
    options.pinhole_secs = PINHOLE_SECS;
    options.session_secs = SESSION_SECS;
    let mut gw = Gateway::start(&lab, &ctl, options);
    let gw_ip = lab.gateway_addr(false);
    let public = SocketAddr::new(gw_ip, PUBLIC_PORT);
    let forward_before = sysctl(&lab.gateway, "net.ipv4.ip_forward");

    // Dark before the knock: the public port, and the app's own address.
    assert_unreachable(&lab, public, "before the knock");
    assert_unreachable(&lab, target, "the internal app directly, before the knock");
    assert_no_accept(&app, "before the knock");

    // Knock, then connect through the gateway within the pinhole window.
    knock_cli_ok(&lab, &gw, &dev, APP, gw_ip);
    let knocked = Instant::now();
    let mut c = loop {
        match tcp_connect(&lab.client, public, Duration::from_millis(50)) {
            Ok(s) => break s,
            Err(e) if knocked.elapsed() > Duration::from_secs(PINHOLE_SECS) => {
                panic!("no forwarded connection within the pinhole window: {e}")
            }
            Err(_) => {}
        }
    };
    let connected = knocked.elapsed();
    let (mut s, peer) = accept_within(&app, Duration::from_secs(2))
        .expect("the internal app accepts the forwarded connection");
    record_timing(&format!(
        "forward mode: knock -> forwarded TCP connection to the internal app {:.1} ms",
        connected.as_secs_f64() * 1000.0
    ));
    assert_eq!(
        peer.ip(),
        IpAddr::V4(internal.gateway_inner_v4),
        "SNAT: the app sees the gateway's internal address"
    );
    exchange(&mut c, &mut s, "forwarded flow");
    assert_eq!(
        sysctl(&lab.gateway, "net.ipv4.ip_forward"),
        "1",
        "the gateway enabled IPv4 forwarding in its namespace"
    );

    // Nothing else of the internal network, even with a live session.
    let other_addr = SocketAddr::new(IpAddr::V4(internal.v4), OTHER_PORT);
    assert_unreachable(&lab, target, "the internal app's address directly");
    assert_unreachable(&lab, other_addr, "another service of the internal host");
    assert_unreachable(
        &lab,
        SocketAddr::new(gw_ip, OTHER_PORT),
        "another port of the gateway",
    );
    assert_no_accept(&app, "direct attempts");
    assert_no_accept(&other, "the other service");

    // The pinhole expires: new forwarded connections fail, the live flow goes on.
    let deadline = knocked + Duration::from_secs(PINHOLE_SECS) + Duration::from_millis(1500);
    let dark_at = loop {
        match tcp_connect(&lab.client, public, DARK_TIMEOUT) {
            Err(_) => break knocked.elapsed(),
            Ok(extra) => {
                drop(extra);
                let _ = accept_within(&app, Duration::from_millis(100));
            }
        }
        assert!(
            Instant::now() < deadline,
            "new forwarded connections still work 1.5 s after the pinhole expired"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    record_timing(&format!(
        "forward mode: new forwarded connections refused {:.2} s after the knock (pinhole_secs {PINHOLE_SECS})",
        dark_at.as_secs_f64()
    ));
    assert_no_accept(&app, "after the pinhole expired");
    exchange(&mut c, &mut s, "live flow after the pinhole expired");

    // Revocation cuts the live forwarded flow.
    let revision = gw.synced_revision().expect("the gateway has a registry");
    let revoked_at = Instant::now();
    ctl.revoke(&dev.name);
    gw.wait_sync_after(revision, Duration::from_secs(5));
    let closed = postern_e2e::poll(Duration::from_secs(3), Duration::from_millis(5), || {
        gw.audit_events("session_closed").into_iter().next()
    });
    let closed: Value = closed.unwrap_or_else(|| {
        panic!(
            "the gateway logged no session_closed within 3 s of the revoke:\n{}",
            gw.diagnostics()
        )
    });
    record_timing(&format!(
        "forward mode: device revoke -> session closed {:.1} ms ({closed})",
        revoked_at.elapsed().as_secs_f64() * 1000.0
    ));
    // The app speaks first: its packet must not revive the flow (TCP loose pickup).
    s.write_all(b"late").expect("app write is buffered");
    expect_silence(&mut c, "client after the revoke");
    c.write_all(b"more").expect("client write is buffered");
    expect_silence(&mut s, "app after the revoke");
    let ct = String::from_utf8_lossy(
        &std::process::Command::new("ip")
            .args(["netns", "exec", lab.gateway.name(), "conntrack", "-L"])
            .output()
            .expect("run conntrack")
            .stdout,
    )
    .into_owned();
    assert!(
        !ct.lines()
            .any(|l| l.contains(&format!("dport={PUBLIC_PORT}")) && l.contains("ESTABLISHED")),
        "no forwarded conntrack entry revived after the revoke:\n{ct}"
    );
    assert_unreachable(&lab, public, "after the revoke");
    assert_no_accept(&app, "after the revoke");

    // A clean stop puts IP forwarding back as it found it.
    let status = gw.stop(Duration::from_secs(5)).expect("gateway stops");
    assert!(status.success(), "gateway exit status {status}");
    assert_eq!(
        sysctl(&lab.gateway, "net.ipv4.ip_forward"),
        forward_before,
        "IP forwarding restored at stop"
    );
}
