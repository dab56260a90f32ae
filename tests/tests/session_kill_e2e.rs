//! Session lifecycle and admin kills, end to end: the gateway audits `session_opened`,
//! `session_renewed` and `session_closed` for a knock, a re-knock and a CLOSE knock, and
//! reports its live sessions to the controller (`session list`); `postern-controller
//! session kill GATEWAY:ID` stops a live TCP flow that carries data, long before its
//! pinhole or session would expire, and the kill is applied once (a later session of the
//! same device survives the next revision); a lease that runs out without a renewal is
//! audited as `expired` and leaves the list.
//!
//! Owns: these scenarios in their own lab. Must not touch anything outside its lab
//! (traffic only inside the lab's namespaces).

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use postern_e2e::{
    connect_soon, echo_roundtrip, knock_cli_ok, poll, record_timing, unix_ms, wait_flow_dead,
    Capture, Controller, Device, Gateway, GatewayOptions, InProcessDevice, Lab,
};
use postern_protocol::keys::DeviceSigningKey;
use postern_protocol::packet::{flags, seal, Knock, SealRandomness};
use serde_json::Value;

const APP: &str = "web";
const APP_PORT: u16 = 8080;
const USER: &str = "alice";
/// Long windows: nothing but the kill (or the CLOSE knock) may end a session here.
const PINHOLE_SECS: u64 = 30;
const SESSION_SECS: u64 = 60;
/// The name a gateway on the controller's Unix socket reports under (no `name` set).
const GATEWAY: &str = "local";

fn options(mode: Capture) -> GatewayOptions {
    let mut o = GatewayOptions::new(mode);
    o.pinhole_secs = PINHOLE_SECS;
    o.session_secs = SESSION_SECS;
    o
}

/// The first audit line of `event` for which `pick` holds, waited for up to 3 s.
fn wait_event(gw: &mut Gateway, event: &str, pick: impl Fn(&Value) -> bool) -> Value {
    let got = poll(Duration::from_secs(3), Duration::from_millis(5), || {
        gw.check_alive();
        gw.audit_events(event).into_iter().find(|l| pick(l))
    });
    got.unwrap_or_else(|| panic!("no {event} audit line within 3 s:\n{}", gw.diagnostics()))
}

/// `session list --json` rows, waited for up to 3 s until `pick` finds one (or, with
/// `gone`, until none matches).
fn wait_listed(ctl: &Controller, id: &str, gone: bool) -> Option<Value> {
    let found = poll(Duration::from_secs(3), Duration::from_millis(20), || {
        let rows: Value = serde_json::from_str(&ctl.admin(&["session", "list", "--json"]))
            .expect("session list --json prints JSON");
        let row = rows
            .as_array()
            .expect("an array")
            .iter()
            .find(|r| r["id"] == id)
            .cloned();
        match (row, gone) {
            (Some(r), false) => Some(Some(r)),
            (None, true) => Some(None),
            _ => None,
        }
    });
    found.unwrap_or_else(|| {
        panic!(
            "session {id} {} `session list` within 3 s",
            if gone {
                "did not leave"
            } else {
                "did not appear in"
            }
        )
    })
}

fn kill_stops_the_live_flow(mode: Capture) {
    let lab = Lab::new();
    lab.start_echo_server(APP_PORT);
    let ctl = Controller::start();
    ctl.add_app(APP, "tcp", APP_PORT);
    ctl.grant(APP, USER);
    let dev = Device::keygen("laptop");
    dev.enroll(&ctl, USER);
    let mut gw = Gateway::start(&lab, &ctl, options(mode));
    let gw_ip = lab.gateway_addr(false);
    let app = SocketAddr::new(gw_ip, APP_PORT);

    knock_cli_ok(&lab, &gw, &dev, APP, gw_ip);
    let mut stream = connect_soon(&lab.client, app);
    echo_roundtrip(&mut stream, b"before the kill", Duration::from_secs(1))
        .expect("the flow carries data before the kill");
    let opened = wait_event(&mut gw, "session_opened", |_| true);
    let id = opened["session_id"]
        .as_str()
        .expect("session_opened names the global ID")
        .to_owned();
    assert!(
        id.starts_with("local:") && id.len() == GATEWAY.len() + 7,
        "{opened}"
    );
    assert_eq!(opened["device_name"], "laptop", "{opened}");
    // The gateway reports it: `session list` shows the same ID.
    let row = wait_listed(&ctl, &id, false).expect("listed");
    assert_eq!(
        (&row["user"], &row["app"]),
        (&Value::from(USER), &Value::from(APP))
    );
    assert_eq!(row["stale"], false, "{row}");

    let revision = gw.synced_revision().expect("the gateway has a registry");
    let killed_at = Instant::now();
    let out = ctl.admin(&["session", "kill", &id]);
    assert!(out.starts_with(&format!("killed session {id}")), "{out}");
    gw.wait_sync_after(revision, Duration::from_secs(5));
    let dead_after = wait_flow_dead(&mut stream, killed_at, Duration::from_secs(3), &|| {
        format!(
            "`session kill` (pinhole {PINHOLE_SECS} s, session {SESSION_SECS} s):\n{}",
            gw.diagnostics()
        )
    });
    record_timing(&format!(
        "session kill->flow dead [{}]: {:.0} ms (command start to the first failed echo, 100 ms probe)",
        mode.as_str(),
        dead_after.as_secs_f64() * 1000.0
    ));
    assert!(
        echo_roundtrip(&mut stream, b"still there?", Duration::from_millis(500)).is_err(),
        "a killed flow came back"
    );
    let closed = wait_event(&mut gw, "session_closed", |l| {
        l["session_id"] == id.as_str()
    });
    assert_eq!(closed["reason"], "killed", "{closed}");
    assert_eq!(closed["ok"], true, "{closed}");
    let duration = closed["duration_ms"].as_u64().expect("duration_ms");
    let opened_at = opened["opened_at_ms"].as_u64().expect("opened_at_ms");
    assert_eq!(
        closed["closed_at_ms"].as_u64().expect("closed_at_ms") - opened_at,
        duration
    );
    assert!(duration < 30_000, "{closed}");
    wait_listed(&ctl, &id, true);

    // The device may knock again: a new session, which the kill (still in every
    // snapshot for a day) does not touch, also after the next revision.
    knock_cli_ok(&lab, &gw, &dev, APP, gw_ip);
    let again = wait_event(&mut gw, "session_opened", |l| {
        l["opened_at_ms"].as_u64() > Some(opened_at)
    });
    let mut fresh = connect_soon(&lab.client, app);
    let revision = gw.synced_revision().expect("revision");
    ctl.add_app("other", "tcp", APP_PORT + 1);
    gw.wait_sync_after(revision, Duration::from_secs(5));
    echo_roundtrip(
        &mut fresh,
        b"after the next revision",
        Duration::from_secs(1),
    )
    .unwrap_or_else(|e| panic!("the new session {again} was closed too: {e}"));
    let killed: Vec<Value> = gw
        .audit_events("session_closed")
        .into_iter()
        .filter(|l| l["reason"] == "killed")
        .collect();
    assert_eq!(killed.len(), 1, "the kill is applied once: {killed:?}");
}

#[test]
fn sniff_session_kill_stops_the_live_flow() {
    kill_stops_the_live_flow(Capture::Sniff);
}

#[test]
fn udp_session_kill_stops_the_live_flow() {
    kill_stops_the_live_flow(Capture::Udp);
}

/// A sealed knock (`flags::KNOCK` or `flags::CLOSE`) for [`APP`] claiming `claimed`.
fn sealed(
    key: &DeviceSigningKey,
    gateway: &postern_protocol::keys::GatewayPublicKey,
    flag: u8,
    claimed: IpAddr,
) -> Vec<u8> {
    let mut nonce = [0u8; 16];
    let mut ephemeral = [0u8; 32];
    getrandom::getrandom(&mut nonce).expect("OS randomness");
    getrandom::getrandom(&mut ephemeral).expect("OS randomness");
    let knock = Knock {
        device: key.public_key().device_id(),
        timestamp_ms: unix_ms(),
        nonce,
        flags: flag,
        app: postern_protocol::AppName::new(APP).expect("valid app name"),
        claimed_addr: Some(claimed),
        posture_digest: [0; 32],
    };
    seal(
        &knock,
        key,
        gateway,
        SealRandomness {
            ephemeral_secret: ephemeral,
        },
    )
    .expect("seal a valid knock")
}

#[test]
fn knock_renew_and_close_write_the_session_lifecycle_lines() {
    let lab = Lab::new();
    let ctl = Controller::start();
    ctl.add_app(APP, "tcp", APP_PORT);
    ctl.grant(APP, USER);
    let dev = InProcessDevice::random("tablet");
    ctl.add_device(&dev.name, USER, &dev.public_text());
    let mut gw = Gateway::start(&lab, &ctl, options(Capture::Udp));
    let client = lab.client_addr(false);
    let target = SocketAddr::new(lab.gateway_addr(false), gw.options.spa_port);
    let gateway_key = gw.public_key;
    let send = |flag: u8| {
        let dgram = sealed(&dev.key, &gateway_key, flag, client);
        lab.run_in(&lab.client, || {
            let sock = UdpSocket::bind("0.0.0.0:0").expect("bind in the client namespace");
            sock.send_to(&dgram, target).expect("send the knock");
        });
    };

    send(flags::KNOCK);
    let first = gw.wait_knock(client, 1, Duration::from_secs(3));
    assert_eq!(first["reason"], "granted", "{first}");
    let opened = wait_event(&mut gw, "session_opened", |_| true);
    let id = opened["session_id"]
        .as_str()
        .expect("session_id")
        .to_owned();
    let hex = opened["session"].as_str().expect("session as hex");
    assert_eq!(hex.len(), 6, "{opened}");
    assert_eq!(id, format!("{GATEWAY}:{hex}"));
    assert_eq!(
        u64::from_str_radix(hex, 16).ok(),
        first["session"].as_u64(),
        "the knock line's session is the same id: {first} {opened}"
    );
    for (field, want) in [
        ("device_name", "tablet"),
        ("user", USER),
        ("app", APP),
        ("source", &client.to_string()),
    ] {
        assert_eq!(opened[field], want, "{field}: {opened}");
    }
    let listed = wait_listed(&ctl, &id, false).expect("listed");
    assert_eq!(listed["source"], client.to_string());

    std::thread::sleep(Duration::from_millis(50));
    send(flags::KNOCK);
    let second = gw.wait_knock(client, 2, Duration::from_secs(3));
    assert_eq!(second["reason"], "renewed", "{second}");
    let renewed = wait_event(&mut gw, "session_renewed", |_| true);
    assert_eq!(renewed["session_id"], id.as_str(), "{renewed}");
    assert_eq!(renewed["opened_at_ms"], opened["opened_at_ms"]);
    assert!(
        renewed["renewed_at_ms"].as_u64() > opened["opened_at_ms"].as_u64(),
        "{renewed}"
    );

    std::thread::sleep(Duration::from_millis(50));
    send(flags::CLOSE);
    let third = gw.wait_knock(client, 3, Duration::from_secs(3));
    assert_eq!(third["decision"], "closed", "{third}");
    let closed = wait_event(&mut gw, "session_closed", |_| true);
    assert_eq!(closed["session_id"], id.as_str(), "{closed}");
    assert_eq!(closed["reason"], "client_close", "{closed}");
    let duration = closed["duration_ms"].as_u64().expect("duration_ms");
    assert!((100..10_000).contains(&duration), "{closed}");
    wait_listed(&ctl, &id, true);
    record_timing(&format!(
        "session lifecycle lines: opened, renewed, closed (client_close) after {duration} ms"
    ));
}

#[test]
fn an_unrenewed_session_closes_as_expired_and_leaves_the_list() {
    let lab = Lab::new();
    let ctl = Controller::start();
    ctl.add_app(APP, "tcp", APP_PORT);
    ctl.grant(APP, USER);
    let dev = Device::keygen("phone");
    dev.enroll(&ctl, USER);
    let mut o = GatewayOptions::new(Capture::Udp);
    o.pinhole_secs = 1;
    o.session_secs = 2;
    let mut gw = Gateway::start(&lab, &ctl, o);
    knock_cli_ok(&lab, &gw, &dev, APP, lab.gateway_addr(false));
    let opened = wait_event(&mut gw, "session_opened", |_| true);
    let id = opened["session_id"]
        .as_str()
        .expect("session_id")
        .to_owned();
    wait_listed(&ctl, &id, false);
    // The lease (2 s) runs out; the sweep notices it within a second.
    let closed = poll(Duration::from_secs(5), Duration::from_millis(20), || {
        gw.check_alive();
        gw.audit_events("session_closed")
            .into_iter()
            .find(|l| l["session_id"] == id.as_str())
    })
    .unwrap_or_else(|| panic!("no session_closed within 5 s:\n{}", gw.diagnostics()));
    assert_eq!(closed["reason"], "expired", "{closed}");
    assert_eq!(
        closed["closed_at_ms"], opened["expires_at_ms"],
        "closed at the lease end: {closed}"
    );
    assert_eq!(closed["duration_ms"], 2_000, "{closed}");
    wait_listed(&ctl, &id, true);
}
