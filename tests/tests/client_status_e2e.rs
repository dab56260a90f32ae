//! The client's controller-facing commands end to end (issue 5): a real controller with
//! its HTTPS API on loopback, the real `postern` binary with HOME in a temporary
//! directory, posture collected from a fixture tree.
//!
//! enroll → `status` says no MFA (exit 4, next step `postern login`) and shows the measured
//! clock offset (`GET /v1/time`) → login → `status` exit 0 → `posture report` collected
//! from the tree is accepted and `device posture` shows it → controller gone → `status`
//! exit 6.
//!
//! Owns: this scenario. Must not touch: anything outside its temporary directories.

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::process::{Command, Output};

use postern_e2e::{bin, Controller};

fn postern(home: &Path, args: &[&str]) -> Output {
    Command::new(bin("postern"))
        .args(args)
        .env("HOME", home)
        .env_remove("XDG_CONFIG_HOME")
        .env_remove("POSTERN_PROFILE")
        .output()
        .expect("run the postern binary (cargo build --workspace --bins first)")
}

fn write(root: &Path, rel: &str, text: &str) {
    let path = root.join(rel);
    std::fs::create_dir_all(path.parent().expect("fixture path has a parent")).expect("mkdir");
    std::fs::write(&path, text).expect("write fixture");
}

/// A tree whose every posture fact passes.
fn healthy_tree(r: &Path) {
    write(r, "etc/os-release", "ID=debian\nVERSION_ID=12\n");
    write(r, "proc/sys/kernel/osrelease", "6.1.0-13-amd64\n");
    let today = std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M:%S"])
        .output()
        .expect("date");
    write(
        r,
        "var/log/dpkg.log",
        &format!(
            "{} upgrade openssl:amd64 1 2\n",
            String::from_utf8_lossy(&today.stdout).trim()
        ),
    );
    write(
        r,
        "proc/self/mountinfo",
        "22 1 253:0 / / rw - ext4 /dev/mapper/root rw\n",
    );
    write(r, "sys/block/dm-0/dev", "253:0\n");
    write(r, "sys/block/dm-0/dm/uuid", "CRYPT-LUKS2-00-root\n");
    write(
        r,
        "usr/sbin/nft",
        "#!/bin/sh\nprintf 'table inet f {\\n chain input {\\n  type filter hook input priority 0; policy drop;\\n }\\n}\\n'\n",
    );
    std::fs::set_permissions(
        r.join("usr/sbin/nft"),
        std::fs::Permissions::from_mode(0o755),
    )
    .expect("chmod");
    write(r, "etc/postern/mdm-enrolled", "yes\n");
}

fn json(o: &Output) -> serde_json::Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}): {}\nstderr: {}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    })
}

fn last_error_line(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr)
        .lines()
        .last()
        .unwrap_or_default()
        .to_owned()
}

#[test]
fn enroll_status_login_report_and_unreachable_controller() {
    let ctl = Controller::start_with_api();
    let url = ctl.api_url();
    ctl.admin(&["user", "add", "alice"]);
    let invite: serde_json::Value = serde_json::from_str(
        &ctl.admin(&["device", "invite", "laptop", "--user", "alice", "--json"]),
    )
    .expect("invite json");
    let token = invite["token"]
        .as_str()
        .expect("token in invite json")
        .to_owned();
    let home = tempfile::tempdir().expect("tempdir");
    let h = home.path();
    let tree = tempfile::tempdir().expect("tempdir");
    healthy_tree(tree.path());
    let root = tree.path().to_str().expect("utf-8 temp path");

    let o = postern(
        h,
        &[
            "enroll",
            "--controller",
            &url,
            "--token",
            &token,
            "--generate",
            "--json",
        ],
    );
    assert!(
        o.status.success(),
        "enroll: {}",
        String::from_utf8_lossy(&o.stderr)
    );

    // No MFA yet: exit 4, the last line says `postern login`; the clock offset is measured.
    let o = postern(
        h,
        &[
            "status",
            "--json",
            "--root",
            root,
            "--process",
            "none-needed",
        ],
    );
    assert_eq!(
        o.status.code(),
        Some(4),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        last_error_line(&o).contains("postern login"),
        "{}",
        last_error_line(&o)
    );
    let v = json(&o);
    assert_eq!(v["enrolled"], true);
    assert_eq!(v["user"], "alice");
    assert_eq!(v["last_mfa"], serde_json::Value::Null);
    let offset = v["clock_offset_ms"]
        .as_i64()
        .expect("clock_offset_ms measured");
    let rtt = v["clock_rtt_ms"].as_i64().expect("clock_rtt_ms");
    assert!(offset.abs() < 1_000, "same machine, offset {offset} ms");
    eprintln!("measured clock offset {offset} ms, round trip {rtt} ms");
    assert_eq!(v["posture"]["pass"], true, "{}", v["posture"]);

    // MFA, then status is all well.
    let mfa: serde_json::Value =
        serde_json::from_str(&ctl.admin(&["user", "mfa", "alice", "--json"])).expect("mfa json");
    let uri = ["otpauth_uri", "uri", "otpauth"]
        .iter()
        .find_map(|k| mfa[k].as_str())
        .expect("otpauth URI in `user mfa --json`");
    let totp = totp_rs::Totp::from_url_unchecked(uri).expect("otpauth URI parses");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs();
    let code = totp.generate(now).to_string();
    let o = postern(h, &["login", "--code", &code]);
    assert!(
        o.status.success(),
        "login: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let o = postern(h, &["status", "--root", root]);
    assert!(
        o.status.success(),
        "status: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains("last MFA") && text.contains("clock       controller is"),
        "{text}"
    );

    // The collected report is accepted and the controller shows it.
    let o = postern(h, &["posture", "report", "--root", root, "--json"]);
    assert!(
        o.status.success(),
        "report: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(json(&o)["expires_at"].is_string());
    let shown = ctl.admin(&["device", "posture", "laptop"]);
    assert!(shown.contains("6.1.0-13-amd64"), "{shown}");
    let o = postern(h, &["status", "--json", "--root", root]);
    assert!(
        o.status.success(),
        "status: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let v = json(&o);
    assert!(
        v["posture"]["last_accepted"]["expires_at"].is_string(),
        "status remembers the accepted report: {}",
        v["posture"]
    );

    // Controller gone: exit 6, one line naming what to check.
    drop(ctl);
    let o = postern(h, &["status", "--root", root]);
    assert_eq!(
        o.status.code(),
        Some(6),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        last_error_line(&o).contains("check the network"),
        "{}",
        last_error_line(&o)
    );
}
