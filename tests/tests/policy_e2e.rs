//! End-to-end policy enforcement (issue 3, "Done when"): a real controller with a policy
//! whose app requires disk encryption, a posture report per device (healthy and unhealthy,
//! stored through the controller's registry library as the HTTPS API stores them), a real
//! gateway in its namespace and the real client knocking from the client namespace.
//!
//! The unhealthy device is refused at the gateway (audit reason `policy_denied`, the port
//! stays dark), the healthy one gets through, and `policy explain` / `device posture` name
//! the failing requirement and its remediation. When the unhealthy device reports healthy
//! facts the gateway learns it through the next snapshot and admits it.
//!
//! Owns: this scenario. Must not touch: anything outside the namespaces and temp
//! directories its lab creates.

use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use postern_e2e::{
    echo_roundtrip, knock_cli_ok, record_timing, tcp_connect, Capture, Controller, Device, Gateway,
    GatewayOptions, Lab,
};
use serde_json::Value;

mod disk_policy;
use disk_policy::{apply_policy, now_secs, store_report, store_report_for, REMEDIATION};

const APP: &str = "web";
const APP_PORT: u16 = 8080;
const DECISION_TIMEOUT: Duration = Duration::from_secs(3);
const DARK_TIMEOUT: Duration = Duration::from_millis(300);
/// Probes the live flow every ~100 ms until it stops carrying data; panics after
/// `within`. Returns how long that took.
fn wait_flow_dead(stream: &mut TcpStream, within: Duration, what: &str) -> Duration {
    let started = Instant::now();
    loop {
        if echo_roundtrip(stream, b"x", Duration::from_millis(100)).is_err() {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < within,
            "the live flow still carries data {within:?} after {what}"
        );
    }
}

/// Lab with the echo app, a controller with app `web`, and device `laptop` of alice.
fn one_device_lab() -> (Lab, Controller, Device) {
    let lab = Lab::new();
    lab.start_echo_server(APP_PORT);
    let ctl = Controller::start();
    ctl.add_app(APP, "tcp", APP_PORT);
    let dev = Device::keygen("laptop");
    dev.enroll(&ctl, "alice");
    (lab, ctl, dev)
}

/// Knocks with the real client and connects; the flow must carry data.
fn knock_and_talk(lab: &Lab, gw: &Gateway, dev: &Device, what: &str) -> TcpStream {
    let gw_ip = lab.gateway_addr(false);
    knock_cli_ok(lab, gw, dev, APP, gw_ip);
    let mut stream = connect_after_knock(lab, SocketAddr::new(gw_ip, APP_PORT));
    echo_roundtrip(&mut stream, what.as_bytes(), Duration::from_secs(1))
        .unwrap_or_else(|e| panic!("the flow carries no data {what}: {e}"));
    stream
}

/// The gateway audited a closed session for `reason`; the device's next knock (the
/// `n`-th from the client) is refused by policy.
fn assert_closed_then_denied(lab: &Lab, gw: &mut Gateway, dev: &Device, reason: &str, n: usize) {
    assert!(
        gw.audit_events("session_closed")
            .iter()
            .any(|l| l["reason"] == reason && l["ok"] == true),
        "the gateway audits the closed session ({reason})"
    );
    knock_cli_ok(lab, gw, dev, APP, lab.gateway_addr(false));
    let line = gw.wait_knock(lab.client_addr(false), n, DECISION_TIMEOUT);
    assert_eq!(
        decision(&line),
        (Some("deny"), Some("policy_denied")),
        "{line}"
    );
}

/// A gateway whose sessions outlive every test step (so a flow that stops was closed,
/// not expired).
fn long_session_options() -> GatewayOptions {
    let mut options = GatewayOptions::new(Capture::Udp);
    options.session_secs = 60;
    options
}

fn decision(line: &Value) -> (Option<&str>, Option<&str>) {
    (
        line.get("decision").and_then(Value::as_str),
        line.get("reason").and_then(Value::as_str),
    )
}

/// The app port gives no answer: the connect times out (a reset would mean the host
/// answered, "unreachable" a broken lab).
fn assert_dark(lab: &Lab, addr: SocketAddr, when: &str) {
    match tcp_connect(&lab.client, addr, DARK_TIMEOUT) {
        Ok(_) => panic!("app port {addr} is reachable {when}; it must stay dark"),
        Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
        Err(e) => panic!("app port {addr} {when}: expected a timeout, got {e}"),
    }
}

/// Connects within 2 s of a knock (new connections every ~3 ms), from the client namespace.
fn connect_after_knock(lab: &Lab, addr: SocketAddr) -> TcpStream {
    lab.run_in(&lab.client, || {
        let started = Instant::now();
        loop {
            match TcpStream::connect_timeout(&addr, Duration::from_millis(3)) {
                Ok(stream) => return stream,
                Err(_) if started.elapsed() < Duration::from_secs(2) => {}
                Err(e) => panic!("no TCP connection to {addr} within 2 s of the knock: {e}"),
            }
        }
    })
}

#[test]
fn healthy_device_is_allowed_and_unhealthy_one_denied_with_the_failing_requirement() {
    let lab = Lab::new();
    lab.start_echo_server(APP_PORT);
    let ctl = Controller::start();
    ctl.add_app(APP, "tcp", APP_PORT);
    let healthy = Device::keygen("healthy");
    let unhealthy = Device::keygen("unhealthy");
    healthy.enroll(&ctl, "alice");
    unhealthy.enroll(&ctl, "bob");
    // A legacy grant for bob: once a policy is applied it must not let him in.
    ctl.grant(APP, "bob");
    store_report(&ctl, "healthy", true);
    store_report(&ctl, "unhealthy", false);
    apply_policy(&ctl);

    let mut gw = Gateway::start(&lab, &ctl, GatewayOptions::new(Capture::Udp));
    let gw_ip = lab.gateway_addr(false);
    let client_ip = lab.client_addr(false);
    let addr = SocketAddr::new(gw_ip, APP_PORT);
    assert_dark(&lab, addr, "before any knock");

    // The unhealthy device first (both knock from the same client address, and a pinhole
    // opened for the healthy one would let any connection from it through).
    knock_cli_ok(&lab, &gw, &unhealthy, APP, gw_ip);
    let line = gw.wait_knock(client_ip, 1, DECISION_TIMEOUT);
    assert_eq!(
        decision(&line),
        (Some("deny"), Some("policy_denied")),
        "audit line: {line}"
    );
    assert_dark(&lab, addr, "after the unhealthy device's knock");

    knock_cli_ok(&lab, &gw, &healthy, APP, gw_ip);
    let mut stream = connect_after_knock(&lab, addr);
    let line = gw.wait_knock(client_ip, 2, DECISION_TIMEOUT);
    assert_eq!(
        decision(&line),
        (Some("allow"), Some("granted")),
        "audit line: {line}"
    );
    echo_roundtrip(&mut stream, b"healthy device", Duration::from_secs(1))
        .expect("the app answers the healthy device");
    drop(stream);

    // The admin sees why the unhealthy device is refused.
    let explain = ctl.admin(&["policy", "explain", "--device", "unhealthy", "--app", APP]);
    assert!(explain.contains("=> deny"), "{explain}");
    assert!(
        explain.contains("failing requirement: disk-encryption"),
        "{explain}"
    );
    assert!(
        explain.contains(&format!("remediation: {REMEDIATION}")),
        "{explain}"
    );
    let posture = ctl.admin(&["device", "posture", "unhealthy"]);
    assert!(posture.contains("disk_encrypted:      false"), "{posture}");
    assert!(posture.contains("web: deny"), "{posture}");
    assert!(
        posture.contains("failing requirement: disk-encryption"),
        "{posture}"
    );
    assert!(
        posture.contains(&format!("remediation: {REMEDIATION}")),
        "{posture}"
    );
    let posture = ctl.admin(&["device", "posture", "healthy"]);
    assert!(posture.contains("web: allow"), "{posture}");

    // The unhealthy device fixes its disk and reports again: the gateway learns it from
    // the next snapshot (no admin write) and admits it.
    let before = gw.synced_revision().expect("gateway synced once");
    store_report(&ctl, "unhealthy", true);
    gw.wait_sync_after(before, Duration::from_secs(5));
    knock_cli_ok(&lab, &gw, &unhealthy, APP, gw_ip);
    let line = gw.wait_knock(client_ip, 3, DECISION_TIMEOUT);
    assert_eq!(
        decision(&line),
        (Some("allow"), Some("granted")),
        "audit line: {line}"
    );
}

/// A device whose posture fails while it has a live flow: the controller's next snapshot
/// drops its access record and the gateway closes the session (the flow stops), long
/// before the session would have expired.
#[test]
fn a_live_flow_stops_when_the_devices_posture_fails() {
    let (lab, ctl, dev) = one_device_lab();
    store_report(&ctl, "laptop", true);
    apply_policy(&ctl);
    let mut gw = Gateway::start(&lab, &ctl, long_session_options());
    let mut stream = knock_and_talk(&lab, &gw, &dev, "while the device is healthy");

    let revision = gw.synced_revision().expect("gateway synced once");
    store_report(&ctl, "laptop", false);
    gw.wait_sync_after(revision, Duration::from_secs(5));
    let took = wait_flow_dead(&mut stream, Duration::from_secs(3), "the failing report");
    record_timing(&format!(
        "posture fails -> flow dead: {:.0} ms (report stored to the first failed echo, 100 ms probe)",
        took.as_secs_f64() * 1000.0
    ));
    assert_closed_then_denied(&lab, &mut gw, &dev, "registry_change", 2);
}

/// Access records carry `until`: when the posture report expires the gateway closes the
/// flow and refuses new knocks by itself, even with the controller gone (fails closed).
#[test]
fn access_ends_at_report_expiry_even_with_the_controller_gone() {
    let (lab, ctl, dev) = one_device_lab();
    apply_policy(&ctl);
    let mut gw = Gateway::start(&lab, &ctl, long_session_options());
    let revision = gw.synced_revision().expect("gateway synced once");
    // Valid for 6 s from now (whole seconds): enough to knock and connect.
    let expires_at = now_secs() + 6;
    store_report_for(&ctl, "laptop", true, 6);
    gw.wait_sync_after(revision, Duration::from_secs(5));
    let mut stream = knock_and_talk(&lab, &gw, &dev, "before the report expires");

    // The controller goes away; the gateway keeps its last snapshot.
    drop(ctl);
    let dead_after = wait_flow_dead(
        &mut stream,
        Duration::from_secs(10),
        "the controller stopped",
    );
    let dead_at = now_secs();
    assert!(
        dead_at >= expires_at,
        "the flow stopped at {dead_at}, before the report expired at {expires_at}"
    );
    assert!(
        dead_at <= expires_at + 2,
        "the flow stopped at {dead_at}, more than 2 s after the report expired at {expires_at}"
    );
    record_timing(&format!(
        "report expiry -> flow dead (controller gone): {:.1} s after the controller stopped",
        dead_after.as_secs_f64()
    ));
    assert_closed_then_denied(&lab, &mut gw, &dev, "access_expired", 2);
}

/// Writes `policy` next to the controller's database and applies it with the CLI.
fn apply_policy_text(ctl: &Controller, policy: &str) {
    let file = ctl.dir().join("policy-source-networks.toml");
    std::fs::write(&file, policy).expect("write the policy file");
    let applied = ctl.admin(&["policy", "apply", file.to_str().expect("utf-8 temp path")]);
    assert!(applied.contains("applied policy sha256"), "{applied}");
}

/// `web` for alice, only from `network`.
fn source_network_policy(network: &str) -> String {
    format!(
        r#"
[[rule]]
name = "web-from-{tag}"
effect = "allow"
apps = ["web"]
users = ["alice"]
source_networks = ["{network}"]
"#,
        tag = if network.starts_with("192.0.2.") {
            "elsewhere"
        } else {
            "lab"
        }
    )
}

/// Source networks are decided at the gateway with the knock's source address (local
/// decisions): a rule allowing only the client's lab subnet admits; after the admin
/// narrows it to another network the live flow stops (the gateway re-evaluates its
/// sessions on the new snapshot) and the next knock is refused with `policy_denied`.
#[test]
fn source_networks_admit_the_lab_subnet_and_refuse_other_sources() {
    let (lab, ctl, dev) = one_device_lab();
    let client_ip = lab.client_addr(false);
    let std::net::IpAddr::V4(v4) = client_ip else {
        panic!("the lab's client v4 address is IPv4: {client_ip}")
    };
    let [a, b, c, _] = v4.octets();
    apply_policy_text(&ctl, &source_network_policy(&format!("{a}.{b}.{c}.0/24")));
    let mut gw = Gateway::start(&lab, &ctl, long_session_options());
    let mut stream = knock_and_talk(&lab, &gw, &dev, "from the allowed lab subnet");
    let line = gw.wait_knock(client_ip, 1, DECISION_TIMEOUT);
    assert_eq!(decision(&line), (Some("allow"), Some("granted")), "{line}");

    let revision = gw.synced_revision().expect("gateway synced once");
    apply_policy_text(&ctl, &source_network_policy("192.0.2.0/24"));
    gw.wait_sync_after(revision, Duration::from_secs(5));
    let took = wait_flow_dead(&mut stream, Duration::from_secs(3), "the narrowed policy");
    record_timing(&format!(
        "source network narrowed -> flow dead: {:.0} ms",
        took.as_secs_f64() * 1000.0
    ));
    assert_closed_then_denied(&lab, &mut gw, &dev, "registry_change", 2);
    // The audit line says which rule and check refused it.
    let line = gw.wait_knock(client_ip, 2, DECISION_TIMEOUT);
    let why = line["policy"].as_str().unwrap_or_default();
    assert!(
        why.contains("web-from-elsewhere") && why.contains("source_networks"),
        "{line}"
    );
    assert_dark(
        &lab,
        SocketAddr::new(lab.gateway_addr(false), APP_PORT),
        "after a knock from outside the allowed network",
    );
}
