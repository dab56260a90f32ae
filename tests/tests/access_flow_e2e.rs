//! Issue 3's "Done when", from the CLI alone: an admin creates users and a group, gives the
//! users TOTP, registers an app, writes the policy in a file (dry run, then apply), invites
//! two devices; each device enrolls over the HTTPS client API with its own key, logs in
//! with a TOTP code and reports its posture with the real `postern` client; the admin asks
//! the controller to explain. The gateway (its own namespace, real nftables) then admits
//! the healthy device and refuses the unhealthy one (`policy_denied`), and the controller
//! names the failing requirement with its remediation text.
//!
//! The API runs on the controller's loopback (127.0.0.1, root namespace); knocks and app
//! traffic stay inside the lab's namespaces.
//!
//! Owns: this scenario. Must not touch: anything outside its lab and temp directories.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use postern_e2e::{
    bin, echo_roundtrip, knock_cli_ok, tcp_connect, Capture, Controller, Device, Gateway,
    GatewayOptions, Lab,
};
use serde_json::Value;

const APP_PORT: u16 = 8080;
const REMEDIATION: &str = "Turn on full-disk encryption: see https://wiki.example/luks";
const POLICY: &str = r#"
[[requirement]]
name = "disk-encryption"
disk_encryption = true
remediation = "Turn on full-disk encryption: see https://wiki.example/luks"

[[rule]]
name = "staff-web"
effect = "allow"
apps = ["web"]
groups = ["staff"]
posture = ["disk-encryption"]
mfa_max_age = "12h"
"#;

fn json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

fn run(cmd: &mut Command) -> Output {
    let what = format!("{cmd:?}");
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}"))
}

/// Runs the real `postern` client (root namespace; it talks to the API on loopback).
fn client(args: &[&str], key: &Path) -> String {
    let out = run(Command::new(bin("postern"))
        .args(args)
        .arg("--key")
        .arg(key));
    assert!(
        out.status.success(),
        "`postern {args:?}` failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn totp_now(secret_b32: &str) -> String {
    let secret =
        totp_rs::Secret::try_from_base32(secret_b32).expect("`user mfa --json` secret is base32");
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs();
    totp_rs::Builder::new()
        .with_secret(secret.as_ref())
        .build()
        .expect("RFC 6238 parameters")
        .generate(now)
        .to_string()
}

/// Invite, enroll (HTTPS, pinned), TOTP login and a posture report, all through the CLIs.
fn onboard(ctl: &Controller, dev: &Device, user: &str, secret: &str, disk_encrypted: bool) {
    let invite = json(&ctl.admin(&["device", "invite", &dev.name, "--user", user, "--json"]));
    let token = invite["token"].as_str().expect("invite --json has a token");
    let url = ctl.api_url();
    let enrolled = client(
        &["enroll", "--controller", &url, "--token", token],
        &dev.key_file,
    );
    let id = enrolled.trim();
    let listed = json(&ctl.admin(&["device", "list", "--json"]));
    assert!(
        listed
            .as_array()
            .expect("device list --json is an array")
            .iter()
            .any(|d| d["id"] == id && d["name"] == dev.name.as_str() && d["user"] == user),
        "enroll printed {id:?}, not a registered device of {user}: {listed}"
    );
    // A second use of the same token is refused.
    let reuse = run(Command::new(bin("postern"))
        .args(["enroll", "--controller", &url, "--token", token, "--key"])
        .arg(&dev.key_file));
    assert!(!reuse.status.success());
    assert!(
        String::from_utf8_lossy(&reuse.stderr).contains("already used"),
        "{}",
        String::from_utf8_lossy(&reuse.stderr)
    );

    client(&["login", "--code", &totp_now(secret)], &dev.key_file);
    let facts = dev.key_file.with_extension("facts.json");
    std::fs::write(
        &facts,
        format!(
            r#"{{"collected_at":"{}","os_family":"linux","os_version":"12","kernel":"6.1.0","disk_encrypted":{disk_encrypted},"firewall_on":true}}"#,
            jiff_now()
        ),
    )
    .expect("write the facts file");
    client(
        &[
            "posture",
            "report",
            "--facts",
            facts.to_str().expect("utf-8 path"),
        ],
        &dev.key_file,
    );
}

fn jiff_now() -> String {
    postern_policy::Timestamp::now().to_string()
}

#[test]
fn admin_cli_alone_onboards_devices_and_the_policy_decides_at_the_gateway() {
    let lab = Lab::new();
    lab.start_echo_server(APP_PORT);
    let ctl = Controller::start_with_api();

    // Identity: users, a group, TOTP.
    for user in ["alice", "bob"] {
        ctl.admin(&["user", "add", user]);
    }
    ctl.admin(&["group", "add", "staff"]);
    ctl.admin(&["group", "add-member", "staff", "alice"]);
    ctl.admin(&["group", "add-member", "staff", "bob"]);
    let secret = |user: &str| {
        let v = json(&ctl.admin(&["user", "mfa", user, "--json"]));
        assert!(v["uri"]
            .as_str()
            .is_some_and(|u| u.starts_with("otpauth://totp/")));
        v["secret"].as_str().expect("secret").to_owned()
    };
    let (alice_secret, bob_secret) = (secret("alice"), secret("bob"));

    // The app and the policy file: dry run changes nothing, apply commits.
    ctl.admin(&[
        "app",
        "add",
        "web",
        "--protocol",
        "tcp",
        "--port",
        &APP_PORT.to_string(),
    ]);
    let file = ctl.dir().join("policy.toml");
    std::fs::write(&file, POLICY).expect("write policy file");
    let file = file.to_str().expect("utf-8 path");
    let dry = ctl.admin(&["policy", "apply", file, "--dry-run"]);
    assert!(dry.contains("staff-web"), "{dry}");
    let shown = ctl.try_admin(&["policy", "show"]);
    assert!(!String::from_utf8_lossy(&shown.stdout).contains("staff-web"));
    ctl.admin(&["policy", "apply", file]);

    // Devices onboard themselves with the invite tokens.
    let healthy = Device::keygen("alice-laptop");
    let unhealthy = Device::keygen("bob-laptop");
    onboard(&ctl, &healthy, "alice", &alice_secret, true);
    onboard(&ctl, &unhealthy, "bob", &bob_secret, false);

    // The controller explains both decisions.
    let explain = |dev: &str| {
        json(&ctl.admin(&[
            "policy", "explain", "--device", dev, "--app", "web", "--json",
        ]))
    };
    let ok = explain("alice-laptop");
    let denied = explain("bob-laptop");
    let (ok_text, denied_text) = (ok.to_string(), denied.to_string());
    assert!(
        ok_text.contains("allow") && !ok_text.contains(REMEDIATION),
        "{ok_text}"
    );
    assert!(
        denied_text.contains("disk-encryption") && denied_text.contains(REMEDIATION),
        "explain must name the failing requirement and its remediation: {denied_text}"
    );
    let human = ctl.admin(&[
        "policy",
        "explain",
        "--device",
        "bob-laptop",
        "--app",
        "web",
    ]);
    assert!(
        human.contains("disk-encryption") && human.contains(REMEDIATION),
        "{human}"
    );
    let posture = ctl.admin(&["device", "posture", "bob-laptop"]);
    assert!(
        posture.contains("disk-encryption") && posture.contains(REMEDIATION),
        "{posture}"
    );

    // The gateway enforces it: the unhealthy device first (same client address).
    let mut gw = Gateway::start(&lab, &ctl, GatewayOptions::new(Capture::Sniff));
    let gw_ip = lab.gateway_addr(false);
    let client_ip = lab.client_addr(false);
    let addr = SocketAddr::new(gw_ip, APP_PORT);
    knock_cli_ok(&lab, &gw, &unhealthy, "web", gw_ip);
    let line = gw.wait_knock(client_ip, 1, Duration::from_secs(3));
    assert_eq!(line["decision"], "deny", "{line}");
    assert_eq!(line["reason"], "policy_denied", "{line}");
    match tcp_connect(&lab.client, addr, Duration::from_millis(300)) {
        Ok(_) => panic!("the unhealthy device reached the app"),
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::TimedOut, "{e}"),
    }

    knock_cli_ok(&lab, &gw, &healthy, "web", gw_ip);
    let line = gw.wait_knock(client_ip, 2, Duration::from_secs(3));
    assert_eq!(line["decision"], "allow", "{line}");
    let mut stream = lab.run_in(&lab.client, || {
        let started = std::time::Instant::now();
        loop {
            match std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(5)) {
                Ok(s) => return s,
                Err(_) if started.elapsed() < Duration::from_secs(2) => {}
                Err(e) => panic!("no connection within 2 s of the healthy knock: {e}"),
            }
        }
    });
    echo_roundtrip(&mut stream, b"healthy", Duration::from_secs(1))
        .expect("the healthy device's flow carries data");

    // Everything the admin did is in the audit trail, the TOTP secrets are not.
    let audit = ctl.admin(&["audit", "list", "--limit", "200", "--json"]);
    for action in [
        "user.add",
        "device.invite",
        "device.enroll",
        "mfa.ok",
        "policy.apply",
    ] {
        assert!(
            audit.contains(action),
            "audit trail lacks {action}: {audit}"
        );
    }
    assert!(!audit.contains(&alice_secret) && !audit.contains(&bob_secret));
}
