//! End-to-end: the TLS control channel between a remote gateway and the controller
//! (issue 4, docs/control-channel.md).
//!
//! Scenarios: (1) `gateway add` → `postern-gateway enroll` → the gateway runs with
//! `controller = "127.0.0.1:PORT"`, a granted knock opens the app, a registry change
//! arrives as a delta, the controller's `session list` shows the gateway's session, the
//! controller is killed (the open flow and a new knock still work), restarted (the gateway
//! resyncs). (2) refusals: a used or bogus token enrolls nothing, a gateway presenting an
//! unregistered key is refused (`unknown_gateway`), and a controller presenting another
//! certificate is refused by the gateway (fingerprint mismatch, never connected).
//!
//! The controller runs INSIDE the lab's gateway namespace and listens on that namespace's
//! 127.0.0.1: all control traffic stays on that loopback; knocks and app traffic only
//! between the lab's client and gateway namespaces. Owns: these scenarios. Must not touch
//! anything outside the lab's namespaces and temp directories.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use postern_e2e::lab::run;
use postern_e2e::{
    bin, echo_roundtrip, knock_cli_ok, poll, record_timing, tcp_connect, Capture, Controller,
    Device, Gateway, GatewayOptions, InProcessDevice, Lab,
};
use serde_json::Value;

const APP: &str = "web";
const APP_PORT: u16 = 8080;
const USER: &str = "alice";
/// The controller's gateway listener, on the gateway namespace's loopback.
const LISTEN: &str = "127.0.0.1:7443";
/// A restarted controller is found again within the backoff cap (10 s) plus a connect.
const RESYNC_TIMEOUT: Duration = Duration::from_secs(15);
/// Devices added besides the one that knocks (registry size for the delta measurement).
const EXTRA_DEVICES: usize = 50;

/// `postern-gateway status --config CONFIG --json`: (exit code, parsed JSON).
fn status(config: &Path) -> (i32, Value) {
    postern_e2e::gateway_status(config)
}

/// Polls `status` until `want` holds (the daemon rewrites the file every second).
fn wait_status(
    config: &Path,
    timeout: Duration,
    what: &str,
    want: impl Fn(i32, &Value) -> bool,
) -> Value {
    let mut last = None;
    let got = poll(timeout, Duration::from_millis(50), || {
        let (code, json) = status(config);
        let ok = want(code, &json);
        last = Some((code, json.clone()));
        ok.then_some(json)
    });
    got.unwrap_or_else(|| panic!("`postern-gateway status` never showed {what}; last: {last:?}"))
}

/// Knocks with the real client and opens a TCP connection carrying data; returns it.
fn knock_and_talk(lab: &Lab, gw: &Gateway, dev: &Device, what: &str) -> std::net::TcpStream {
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
    stream
}

/// A lab with the app, a granted enrolled device, and the controller serving the TLS
/// gateway channel inside the gateway namespace.
fn setup() -> (Lab, Controller, Device) {
    let lab = Lab::new();
    lab.start_echo_server(APP_PORT);
    let ctl = Controller::start_in_namespace_with_gateway_listen(&lab.gateway, LISTEN);
    ctl.add_app(APP, "tcp", APP_PORT);
    ctl.grant(APP, USER);
    let dev = Device::keygen("laptop");
    dev.enroll(&ctl, USER);
    (lab, ctl, dev)
}

fn tls_options(token: Option<String>, state_dir: &Path) -> GatewayOptions {
    let mut options = GatewayOptions::new(Capture::Udp);
    // Long enough that the flow opened before the controller dies is still live after.
    options.session_secs = 60;
    options.pinhole_secs = 5;
    options.state_dir = Some(state_dir.to_owned());
    options.controller_tls = Some(LISTEN.to_owned());
    options.enroll_token = token;
    options
}

#[test]
fn an_enrolled_gateway_syncs_over_tls_by_delta_and_outlives_a_controller_restart() {
    let (lab, mut ctl, dev) = setup();
    // A registry of some size, so the delta-vs-snapshot numbers mean something.
    for i in 0..EXTRA_DEVICES {
        let name = format!("filler-{i}");
        ctl.add_device(&name, "bob", &InProcessDevice::random(&name).public_text());
    }
    let token = ctl.gateway_token("edge-1");
    let keep = tempfile::tempdir().expect("temp dir for the gateway state");
    let state_dir = keep.path().join("state");
    let mut gw = Gateway::start(&lab, &ctl, tls_options(Some(token), &state_dir));

    // Enrollment left the files with their modes.
    let control = state_dir.join("control");
    for (file, mode) in [("gateway.key", 0o600), ("controller.json", 0o600)] {
        let meta = std::fs::metadata(control.join(file)).expect("enrollment file exists");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(meta.permissions().mode() & 0o777, mode, "{file}");
    }
    let enrolled: Value = serde_json::from_str(
        &std::fs::read_to_string(control.join("controller.json")).expect("controller.json"),
    )
    .expect("controller.json is JSON");
    assert_eq!(enrolled["name"], "edge-1", "{enrolled}");

    let first = gw.audit_events("sync").pop().expect("a first sync line");
    assert_eq!(
        first["delta"], false,
        "the first answer is a full snapshot: {first}"
    );
    let full_bytes = first["bytes"].as_u64().expect("sync line has bytes");
    let st = wait_status(&gw.config, Duration::from_secs(5), "connected", |c, j| {
        c == 0 && j["connected"] == true
    });
    assert_eq!(st["snapshot"], "controller", "{st}");
    let mut flow = knock_and_talk(&lab, &gw, &dev, "over the TLS-synced registry");

    // The controller's `session list` shows the session under the registered name.
    let listed = poll(Duration::from_secs(5), Duration::from_millis(100), || {
        let out = ctl.admin(&["session", "list", "--gateway", "edge-1", "--json"]);
        let rows: Value = serde_json::from_str(out.trim()).ok()?;
        rows.as_array()
            .filter(|r| r.iter().any(|s| s["app"] == APP && s["user"] == USER))
            .map(|_| rows.clone())
    });
    assert!(
        listed.is_some(),
        "the gateway's session never showed in `session list --gateway edge-1`"
    );

    // A registry change travels as a delta.
    let revision = gw.synced_revision().expect("synced");
    ctl.add_app("ssh", "tcp", 2222);
    let advanced = gw.wait_sync_after(revision, Duration::from_secs(5));
    let line = gw.audit_events("sync").pop().expect("sync line");
    assert_eq!(line["delta"], true, "{line}");
    assert_eq!(
        (line["from"].as_u64(), line["to"].as_u64()),
        (Some(revision), Some(advanced)),
        "{line}"
    );
    let delta_bytes = line["bytes"].as_u64().expect("bytes");
    record_timing(&format!(
        "control_channel: full snapshot ({} devices) {full_bytes} bytes, delta (one app added) {delta_bytes} bytes",
        EXTRA_DEVICES + 1
    ));
    assert!(
        delta_bytes < full_bytes,
        "a one-app delta ({delta_bytes} B) is smaller than the snapshot ({full_bytes} B)"
    );

    // The controller dies: the open flow continues, a new knock still opens.
    ctl.kill();
    wait_status(
        &gw.config,
        Duration::from_secs(5),
        "not connected",
        |c, j| c == 1 && j["connected"] == false && j["revision"] == advanced,
    );
    echo_roundtrip(&mut flow, b"controller down", Duration::from_secs(1))
        .expect("the flow opened before the controller died still carries data");
    drop(knock_and_talk(&lab, &gw, &dev, "with the controller down"));

    // Restarted, the controller is found again; a change after that arrives.
    let restarted = Instant::now();
    ctl.restart();
    let serving = Instant::now();
    wait_status(&gw.config, RESYNC_TIMEOUT, "connected again", |c, j| {
        c == 0 && j["connected"] == true && j["revision"].as_u64() >= Some(advanced)
    });
    let resync_ms = restarted.elapsed().as_millis();
    let after_serving_ms = serving.elapsed().as_millis();
    record_timing(&format!(
        "control_channel: controller restart -> gateway connected again in {resync_ms} ms ({after_serving_ms} ms after the controller listened; the gateway's jittered backoff dominates)"
    ));
    let now_rev = gw.synced_revision().expect("synced");
    ctl.add_app("dns", "udp", 53);
    let later = gw.wait_sync_after(now_rev.max(advanced), Duration::from_secs(5));
    assert!(later > advanced);
    drop(knock_and_talk(
        &lab,
        &gw,
        &dev,
        "after the controller came back",
    ));
    gw.check_alive();
}

/// A copy of `config` with another `state_dir`.
fn config_with_state_dir(config: &Path, state_dir: &Path, out: &Path) {
    let text = std::fs::read_to_string(config).expect("read gateway config");
    let replaced: Vec<String> = text
        .lines()
        .map(|l| {
            if l.starts_with("state_dir") {
                format!("state_dir = {:?}", state_dir.display().to_string())
            } else {
                l.to_owned()
            }
        })
        .collect();
    std::fs::write(out, replaced.join("\n")).expect("write config copy");
}

fn enroll_in(lab: &Lab, config: &Path, token: &str) -> std::process::Output {
    let mut cmd = lab.command_in(&lab.gateway, bin("postern-gateway"));
    cmd.arg("enroll")
        .arg("--config")
        .arg(config)
        .arg("--token")
        .arg(token);
    run(&mut cmd)
}

#[test]
fn used_tokens_unregistered_keys_and_a_foreign_controller_certificate_are_refused() {
    let (lab, mut ctl, _dev) = setup();
    let token = ctl.gateway_token("edge-1");
    let keep = tempfile::tempdir().expect("temp dir for the gateway state");
    let state_dir = keep.path().join("state");
    let mut gw = Gateway::start(&lab, &ctl, tls_options(Some(token.clone()), &state_dir));

    // The used token, and a well-formed token nobody issued, enroll nothing.
    let other_state = keep.path().join("other");
    let other_config = keep.path().join("other.toml");
    config_with_state_dir(&gw.config, &other_state, &other_config);
    let out = enroll_in(&lab, &other_config, &token);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("token_used"), "{err}");
    assert!(!other_state.join("control/controller.json").exists());
    let pin = token.rsplit(':').next().expect("token has a fingerprint");
    let bogus = format!("postern-gateway:v1:{}:{pin}", "A".repeat(43));
    let out = enroll_in(&lab, &other_config, &bogus);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("bad_token"), "{err}");
    let out = enroll_in(&lab, &other_config, "postern-gateway:v1:short");
    assert_eq!(
        out.status.code(),
        Some(2),
        "a malformed token is a usage error"
    );

    // A gateway presenting a key the controller never registered is refused.
    let stopped = gw.stop(Duration::from_secs(5));
    assert!(stopped.is_some_and(|s| s.success()), "{stopped:?}");
    drop(gw);
    let foreign_state = keep.path().join("foreign");
    let foreign_control = foreign_state.join("control");
    std::fs::create_dir_all(&foreign_control).expect("mkdir");
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&foreign_state, std::fs::Permissions::from_mode(0o700))
            .expect("chmod 700 the state dir");
    }
    std::fs::copy(
        state_dir.join("control/controller.json"),
        foreign_control.join("controller.json"),
    )
    .expect("copy controller.json");
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("P-256 key");
    let cert = rcgen::CertificateParams::new(vec!["postern-gateway".to_owned()])
        .expect("params")
        .self_signed(&key)
        .expect("self-signed cert");
    std::fs::write(foreign_control.join("gateway.key"), key.serialize_pem()).expect("write key");
    std::fs::write(foreign_control.join("gateway.crt"), cert.pem()).expect("write cert");
    let mut options = tls_options(None, &foreign_state);
    options.wait_for_sync = false;
    let mut foreign = Gateway::start(&lab, &ctl, options);
    let refused = poll(Duration::from_secs(5), Duration::from_millis(50), || {
        foreign.check_alive();
        foreign.audit_events("sync_error").into_iter().find(|l| {
            l["error"]
                .as_str()
                .is_some_and(|e| e.contains("unknown_gateway"))
        })
    });
    assert!(
        refused.is_some(),
        "no sync_error naming unknown_gateway: {:?}",
        foreign.audit_events("sync_error")
    );
    assert!(
        foreign.audit_events("sync").is_empty(),
        "an unregistered key got a snapshot"
    );
    let (code, st) = status(&foreign.config);
    assert_eq!((code, &st["connected"]), (1, &Value::Bool(false)), "{st}");
    foreign.stop(Duration::from_secs(5));
    drop(foreign);

    // The controller's certificate changes (a new API identity): the gateway refuses it.
    ctl.kill();
    let api = ctl.dir().join("api");
    std::fs::rename(&api, ctl.dir().join("api.old")).expect("move the API identity away");
    ctl.restart();
    let mut options = tls_options(None, &state_dir);
    options.wait_for_sync = false;
    let mut gw = Gateway::start(&lab, &ctl, options);
    let mismatch = poll(Duration::from_secs(5), Duration::from_millis(50), || {
        gw.check_alive();
        gw.audit_events("sync_error").into_iter().find(|l| {
            l["error"]
                .as_str()
                .is_some_and(|e| e.contains("fingerprint mismatch") && e.contains(pin))
        })
    });
    assert!(
        mismatch.is_some(),
        "no sync_error naming the fingerprint mismatch: {:?}",
        gw.audit_events("sync_error")
    );
    std::thread::sleep(Duration::from_secs(2));
    let (code, st) = status(&gw.config);
    assert_eq!((code, &st["connected"]), (1, &Value::Bool(false)), "{st}");
    assert!(
        gw.audit_events("sync").is_empty(),
        "a foreign controller was trusted"
    );
}
