//! End-to-end "controller down" (issue 4): the gateway persists the last registry snapshot
//! and, restarted while the controller is dead, decides from it; `postern-gateway status`
//! tells connected from not connected; a restarted controller is picked up again.
//!
//! Scenario: a gateway syncs a legacy-grant registry and persists it, the controller is
//! killed (SIGKILL), the gateway is stopped and started again: its `start` audit line says
//! `snapshot: "persisted"` with the synced revision, a valid device's knock opens the app,
//! and `status --json` says not connected (exit 1) at that revision. Then the controller
//! restarts on the same registry: the gateway resyncs (status connected, exit 0) and a
//! registry change advances the revision it enforces.
//!
//! Owns: this scenario. Must not touch: anything outside the namespaces and temp
//! directories its lab creates (traffic only between the lab's client and gateway
//! namespaces; `status` reads a file and makes no connection).

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use postern_e2e::{
    echo_roundtrip, knock_cli_ok, poll, tcp_connect, Capture, Controller, Device, Gateway,
    GatewayOptions, Lab,
};
use serde_json::Value;

const APP: &str = "web";
const APP_PORT: u16 = 8080;
const USER: &str = "alice";
const DECISION_TIMEOUT: Duration = Duration::from_secs(3);
/// The gateway retries the controller with a backoff capped at 10 s (jittered).
const RESYNC_TIMEOUT: Duration = Duration::from_secs(12);

/// `postern-gateway status --config CONFIG --json`: (exit code, parsed JSON).
fn status(config: &Path) -> (i32, Value) {
    postern_e2e::gateway_status(config)
}

/// Polls `status` until `want` holds for it (the daemon rewrites the file every second).
fn wait_status(config: &Path, what: &str, want: impl Fn(i32, &Value) -> bool) -> (i32, Value) {
    let mut last = None;
    let got = poll(Duration::from_secs(8), Duration::from_millis(100), || {
        let (code, json) = status(config);
        let ok = want(code, &json);
        last = Some((code, json.clone()));
        ok.then_some((code, json))
    });
    got.unwrap_or_else(|| panic!("`postern-gateway status` never showed {what}; last: {last:?}"))
}

/// Knocks with the real client, connects and exchanges data.
fn knock_and_talk(lab: &Lab, gw: &Gateway, dev: &Device, what: &str) {
    let gw_ip = lab.gateway_addr(false);
    knock_cli_ok(lab, gw, dev, APP, gw_ip);
    let addr = SocketAddr::new(gw_ip, APP_PORT);
    let stream = poll(Duration::from_secs(2), Duration::from_millis(20), || {
        tcp_connect(&lab.client, addr, Duration::from_millis(300)).ok()
    });
    let mut stream =
        stream.unwrap_or_else(|| panic!("no connection to {addr} after the knock {what}"));
    echo_roundtrip(&mut stream, what.as_bytes(), Duration::from_secs(1))
        .unwrap_or_else(|e| panic!("the flow carries no data {what}: {e}"));
}

#[test]
fn a_restarted_gateway_decides_from_its_persisted_snapshot_while_the_controller_is_down() {
    let lab = Lab::new();
    lab.start_echo_server(APP_PORT);
    let mut ctl = Controller::start();
    ctl.add_app(APP, "tcp", APP_PORT);
    ctl.grant(APP, USER);
    let dev = Device::keygen("laptop");
    dev.enroll(&ctl, USER);

    // The gateway's key and state outlive one gateway process.
    let keep = tempfile::tempdir().expect("temp dir for the gateway's key and state");
    let key_file = keep.path().join("gateway.key");
    let state_dir = keep.path().join("state");
    let mut options = GatewayOptions::new(Capture::Udp);
    options.state_dir = Some(state_dir.clone());
    let mut gw = Gateway::start(&lab, &ctl, options.clone());
    std::fs::copy(gw.dir().join("gateway.key"), &key_file).expect("keep the gateway key");
    let synced = gw.synced_revision().expect("the gateway synced once");
    let snapshot_file = state_dir.join("snapshot.json");
    let persisted = poll(Duration::from_secs(3), Duration::from_millis(20), || {
        snapshot_file.exists().then_some(())
    });
    assert!(
        persisted.is_some(),
        "{} was not written",
        snapshot_file.display()
    );
    let (code, st) = wait_status(&gw.config, "connected", |c, j| {
        c == 0 && j["connected"] == true
    });
    assert_eq!(st["revision"], synced, "{st}");
    assert_eq!(st["snapshot"], "controller", "{st}");
    assert_eq!(st["pid"], gw.pid(), "{st}");
    assert_eq!(code, 0);
    knock_and_talk(&lab, &gw, &dev, "with the controller up");

    // The controller dies; then the gateway restarts with it dead.
    ctl.kill();
    wait_status(
        &gw.config,
        "not connected after the controller died",
        |c, j| c == 1 && j["connected"] == false && j["revision"] == synced,
    );
    let stopped = gw.stop(Duration::from_secs(5));
    assert!(
        stopped.is_some_and(|s| s.success()),
        "the gateway did not stop cleanly: {stopped:?}"
    );
    let (code, st) = status(&gw.config);
    assert_eq!((code, &st["running"]), (3, &Value::Bool(false)), "{st}");
    drop(gw);

    options.key_file = Some(key_file);
    options.wait_for_sync = false;
    let mut gw = Gateway::start(&lab, &ctl, options);
    let start = gw.audit_events("start").pop().expect("a start audit line");
    assert_eq!(start["snapshot"], "persisted", "{start}");
    assert_eq!(start["snapshot_revision"], synced, "{start}");
    assert!(
        gw.audit_events("sync").is_empty(),
        "no controller, no sync line"
    );
    knock_and_talk(&lab, &gw, &dev, "from the persisted snapshot");
    let line = gw.wait_knock(lab.client_addr(false), 1, DECISION_TIMEOUT);
    assert_eq!(line["decision"], "allow", "{line}");
    // The session just opened shows within about 2 s (counted and written every second).
    let (code, st) = wait_status(&gw.config, "not connected, persisted, 1 session", |c, j| {
        c == 1 && j["snapshot"] == "persisted" && j["live_sessions"] == 1
    });
    assert_eq!(code, 1);
    assert_eq!(st["connected"], false, "{st}");
    assert_eq!(st["revision"], synced, "{st}");
    assert_eq!(st["pid"], gw.pid(), "{st}");
    assert_eq!(st["since_contact_secs"], Value::Null, "{st}");
    assert!(
        gw.audit_events("sync_error")
            .iter()
            .any(|l| l["connected"] == false && l["revision"] == synced),
        "sync_error lines carry the connection state"
    );

    // The controller comes back on the same registry: the gateway resyncs, and a change
    // advances the revision it enforces.
    ctl.restart();
    let resynced = poll(RESYNC_TIMEOUT, Duration::from_millis(20), || {
        gw.check_alive();
        gw.synced_revision()
    })
    .expect("the gateway resynced after the controller restarted");
    assert!(
        resynced >= synced,
        "revision went back: {resynced} < {synced}"
    );
    let (_, st) = wait_status(&gw.config, "connected again", |c, j| {
        c == 0 && j["connected"] == true && j["snapshot"] == "controller"
    });
    assert!(st["revision"].as_u64().is_some_and(|r| r >= synced), "{st}");
    ctl.add_app("ssh", "tcp", 2222);
    let advanced = gw.wait_sync_after(resynced, Duration::from_secs(5));
    wait_status(&gw.config, "the new revision", |c, j| {
        c == 0 && j["revision"] == advanced
    });
    knock_and_talk(&lab, &gw, &dev, "after the resync");
}
