//! Revocation reaches live flows: a device revoked while it has an established TCP
//! connection loses it at once, long before its pinhole or session would have expired.
//!
//! Owns: the revoke → flow-dead scenario for both capture modes, with a live stream that
//! carries data in both directions (so a reply from the app cannot revive the flow: the
//! TCP loose-pickup pitfall of DESIGN §4). Must not touch anything outside its lab.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use postern_e2e::{
    connect_soon, echo_roundtrip, knock_cli_ok, record_timing, tcp_connect, wait_flow_dead,
    Capture, Controller, Device, Gateway, GatewayOptions, Lab,
};

const APP: &str = "web";
const APP_PORT: u16 = 8080;
const USER: &str = "alice";

/// Long windows, so that nothing but the revocation can end the flow during the test.
const PINHOLE_SECS: u64 = 30;
const SESSION_SECS: u64 = 60;

fn revoke_kills_the_live_flow(mode: Capture) {
    let lab = Lab::new();
    lab.start_echo_server(APP_PORT);
    let ctl = Controller::start();
    ctl.add_app(APP, "tcp", APP_PORT);
    ctl.grant(APP, USER);
    let dev = Device::keygen("laptop");
    dev.enroll(&ctl, USER);
    let bystander = Device::keygen("desktop");
    bystander.enroll(&ctl, USER);
    let mut options = GatewayOptions::new(mode);
    options.pinhole_secs = PINHOLE_SECS;
    options.session_secs = SESSION_SECS;
    let mut gw = Gateway::start(&lab, &ctl, options);
    let gw_ip = lab.gateway_addr(false);
    let app = SocketAddr::new(gw_ip, APP_PORT);

    // Both devices share the client host (same address): the pinhole is per address, so
    // the bystander's own session must survive the other device's revocation.
    knock_cli_ok(&lab, &gw, &dev, APP, gw_ip);
    let mut stream = connect_soon(&lab.client, app);
    echo_roundtrip(&mut stream, b"before the revoke", Duration::from_secs(1))
        .expect("the flow carries data before the revoke");

    let revision = gw.synced_revision().expect("the gateway has a registry");
    let revoked_at = Instant::now();
    ctl.revoke("laptop");
    gw.wait_sync_after(revision, Duration::from_secs(5));

    // The flow must stop within a bounded time; probe until it does.
    let dead_after = wait_flow_dead(&mut stream, revoked_at, Duration::from_secs(3), &|| {
        format!("`device revoke` (pinhole {PINHOLE_SECS} s, session {SESSION_SECS} s not expired)")
    });
    record_timing(&format!(
        "revoke->flow dead [{}]: {:.0} ms (controller write to the first failed echo, 100 ms probe)",
        mode.as_str(),
        dead_after.as_secs_f64() * 1000.0
    ));
    // And it stays dead: neither side's packets pass (writes from the client, replies the
    // server might still send), and a new connection is not admitted either.
    assert!(
        echo_roundtrip(&mut stream, b"still there?", Duration::from_millis(700)).is_err(),
        "a revoked flow came back"
    );
    match tcp_connect(&lab.client, app, Duration::from_millis(300)) {
        Ok(_) => panic!("a revoked device's pinhole still admits new connections"),
        Err(e) => assert_eq!(
            e.kind(),
            std::io::ErrorKind::TimedOut,
            "a dark port gives no answer at all (got {e})"
        ),
    }
    assert!(
        gw.audit_events("session_closed")
            .iter()
            .any(|l| l["reason"] == "registry_change" && l["ok"] == true),
        "the gateway audits the closed session"
    );

    // The revoked device's next knock is refused; the bystander still gets in.
    knock_cli_ok(&lab, &gw, &dev, APP, gw_ip);
    knock_cli_ok(&lab, &gw, &bystander, APP, gw_ip);
    let mut other = connect_soon(&lab.client, app);
    echo_roundtrip(&mut other, b"bystander", Duration::from_secs(1))
        .expect("another enrolled device is unaffected by the revocation");
}

/// Connects from the client namespace, retrying for up to 2 s (the knock is asynchronous).

#[test]
fn sniff_revoke_kills_the_live_flow() {
    revoke_kills_the_live_flow(Capture::Sniff);
}

#[test]
fn udp_revoke_kills_the_live_flow() {
    revoke_kills_the_live_flow(Capture::Udp);
}
