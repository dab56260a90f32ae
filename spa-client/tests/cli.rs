//! The `postern` binary: profiles, knocking with a profile, posture output, status and the
//! one-line errors with their exit statuses, completions and man pages. HOME points at a
//! temporary directory; nothing leaves loopback.

use std::net::UdpSocket;
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use postern_protocol::keys::GatewaySecret;

fn postern(home: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_postern"))
        .args(args)
        .env("HOME", home)
        .env_remove("XDG_CONFIG_HOME")
        .env_remove("POSTERN_PROFILE")
        .env_remove("POSTERN_POSTURE_ROOT")
        .output()
        .expect("run the postern binary")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// The error is one line, starts with `error:` and names `fix`; the status is `code`.
fn assert_error(o: &Output, code: i32, fix: &str) {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(code), "stderr: {err}");
    let last = err.lines().last().unwrap_or_default();
    assert!(last.starts_with("error: ") && last.contains(fix), "{err}");
    assert_eq!(
        err.lines().filter(|l| l.starts_with("error")).count(),
        1,
        "{err}"
    );
}

fn gateway_key(seed: u8) -> String {
    GatewaySecret::from_bytes([seed; 32]).public_key().to_text()
}

#[test]
fn profiles_add_list_remove_and_default() {
    let home = tempfile::tempdir().expect("tempdir");
    let h = home.path();
    let o = postern(h, &["profile", "list", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o).trim(), r#"{"profiles":{}}"#);
    let o = postern(
        h,
        &[
            "profile",
            "add",
            "work",
            "--gateway",
            "gw.example.org:62201",
            "--gateway-key",
            &gateway_key(1),
            "--controller",
            "https://ctl.example.org:8443/",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let o = postern(
        h,
        &[
            "profile",
            "add",
            "lab",
            "--gateway",
            "10.0.0.1",
            "--gateway-key",
            &gateway_key(2),
            "--default",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let file = h.join(".config/postern/profiles.toml");
    let mode = std::fs::metadata(&file)
        .expect("profiles.toml")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);
    let o = postern(h, &["profile", "list", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).expect("list json");
    assert_eq!(v["default"], "lab");
    assert_eq!(
        v["profiles"]["work"]["controller"],
        "https://ctl.example.org:8443"
    );
    assert_eq!(v["profiles"]["lab"]["gateway"], "10.0.0.1");
    let o = postern(h, &["profile", "list"]);
    assert!(stdout(&o).contains("* lab"), "{}", stdout(&o));
    // Refusals: duplicate, bad key, bad name, unknown profile.
    assert_error(
        &postern(
            h,
            &[
                "profile",
                "add",
                "lab",
                "--gateway",
                "x",
                "--gateway-key",
                &gateway_key(3),
            ],
        ),
        2,
        "postern profile remove lab",
    );
    assert_error(
        &postern(
            h,
            &[
                "profile",
                "add",
                "x",
                "--gateway",
                "x",
                "--gateway-key",
                "x25519:nope",
            ],
        ),
        2,
        "--gateway-key",
    );
    assert_error(
        &postern(
            h,
            &[
                "profile",
                "add",
                "a b",
                "--gateway",
                "x",
                "--gateway-key",
                &gateway_key(3),
            ],
        ),
        2,
        "profile name",
    );
    assert_error(
        &postern(h, &["profile", "remove", "nope"]),
        5,
        "postern profile list",
    );
    let o = postern(h, &["profile", "remove", "lab"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value =
        serde_json::from_str(&stdout(&postern(h, &["profile", "list", "--json"]))).expect("json");
    assert_eq!(
        v["default"], "work",
        "the remaining profile becomes the default"
    );
    // XDG_CONFIG_HOME wins over HOME.
    let xdg = tempfile::tempdir().expect("tempdir");
    let o = Command::new(env!("CARGO_BIN_EXE_postern"))
        .args([
            "profile",
            "add",
            "x",
            "--gateway",
            "h",
            "--gateway-key",
            &gateway_key(4),
        ])
        .env("HOME", h)
        .env("XDG_CONFIG_HOME", xdg.path())
        .output()
        .expect("run postern");
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(xdg.path().join("postern/profiles.toml").exists());
}

#[test]
fn knock_uses_the_profile_and_flags_override() {
    let home = tempfile::tempdir().expect("tempdir");
    let h = home.path();
    assert_error(&postern(h, &["knock", "ssh"]), 5, "postern profile add");
    let gw = UdpSocket::bind("127.0.0.1:0").expect("bind a loopback UDP socket");
    gw.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let port = gw.local_addr().expect("addr").port();
    let o = postern(h, &["keygen"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = postern(
        h,
        &[
            "profile",
            "add",
            "lab",
            "--gateway",
            &format!("127.0.0.1:{port}"),
            "--gateway-key",
            &gateway_key(9),
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let o = postern(h, &["knock", "ssh", "--json", "--wait-reply", "0"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let mut buf = [0u8; 2048];
    let n = gw
        .recv(&mut buf)
        .expect("the knock arrives at the profile's gateway");
    assert!(n > 0);
    let v: serde_json::Value = serde_json::from_str(stdout(&o).trim()).expect("knock json");
    assert_eq!(v["gateway"], format!("127.0.0.1:{port}"));
    // This "gateway" never answers: the knock says so and what to check, exit 9.
    let o = postern(h, &["knock", "ssh", "--wait-reply", "100"]);
    assert_error(&o, 9, "no answer from the gateway");
    assert!(
        stderr(&o).contains("--gateway-key") && stderr(&o).contains("clock"),
        "{}",
        stderr(&o)
    );
    gw.recv(&mut buf).expect("the second knock arrived too");
    // --profile naming a missing profile, and a flag overriding one field.
    assert_error(
        &postern(h, &["--profile", "nope", "knock", "ssh"]),
        5,
        "postern profile",
    );
    let o = postern(h, &["knock", "ssh", "--gateway-key", "x25519:bad"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("--gateway-key"), "{}", stderr(&o));
}

#[test]
fn posture_json_is_the_report_and_status_says_what_to_do() {
    let home = tempfile::tempdir().expect("tempdir");
    let h = home.path();
    let root = tempfile::tempdir().expect("tempdir");
    let r = root.path();
    std::fs::create_dir_all(r.join("etc")).expect("etc");
    std::fs::write(r.join("etc/os-release"), "ID=debian\nVERSION_ID=12\n").expect("os-release");
    let root_arg = r.to_str().expect("utf-8 temp path");
    let o = postern(h, &["posture", "--json", "--root", root_arg]);
    assert!(o.status.success(), "{}", stderr(&o));
    postern_policy::PostureReport::parse(stdout(&o).trim().as_bytes())
        .expect("controller accepts the report");
    let o = postern(h, &["posture", "--root", root_arg]);
    assert!(stdout(&o).contains("debian 12"), "{}", stdout(&o));
    assert_error(
        &postern(h, &["posture", "--check", "--root", root_arg]),
        7,
        "posture fact(s) fail",
    );
    assert_error(
        &postern(h, &["posture", "--root", "/nonexistent/x"]),
        2,
        "--root",
    );
    // Not enrolled: status shows what it can, then names the next step.
    let o = postern(h, &["status", "--json", "--root", root_arg]);
    assert_error(&o, 3, "postern enroll");
    let v: serde_json::Value = serde_json::from_str(stdout(&o).trim()).expect("status json");
    assert_eq!(v["enrolled"], false);
    assert_eq!(v["posture"]["pass"], false);
    let needs_enrollment: [&[&str]; 3] = [
        &["posture", "report", "--root", root_arg],
        &["login", "--code", "123456"],
        &["whoami"],
    ];
    for args in needs_enrollment {
        assert_error(&postern(h, args), 3, "postern enroll");
    }
    // enroll without --controller and without a profile URL.
    assert_error(
        &postern(h, &["enroll", "--token", "postern-invite:v1:x:y"]),
        5,
        "postern profile add",
    );
    // A bad flag is one line, status 2.
    let o = postern(h, &["posture", "--no-such-flag"]);
    assert_eq!(o.status.code(), Some(2));
    assert_eq!(stderr(&o).lines().count(), 1, "{}", stderr(&o));
}

#[test]
fn completions_and_man_pages() {
    let home = tempfile::tempdir().expect("tempdir");
    let h = home.path();
    for shell in ["bash", "zsh", "fish"] {
        let o = postern(h, &["completions", shell]);
        assert!(o.status.success(), "{shell}: {}", stderr(&o));
        assert!(
            stdout(&o).contains("postern") && stdout(&o).contains("profile"),
            "{shell}"
        );
    }
    assert_eq!(postern(h, &["completions", "tcsh"]).status.code(), Some(2));
    let o = postern(h, &["man"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o).contains(".TH postern"),
        "{}",
        &stdout(&o)[..200.min(stdout(&o).len())]
    );
    let dir = home.path().join("man1");
    let o = postern(h, &["man", "--dir", dir.to_str().expect("utf-8 path")]);
    assert!(o.status.success(), "{}", stderr(&o));
    for page in [
        "postern.1",
        "postern-posture.1",
        "postern-profile-add.1",
        "postern-status.1",
    ] {
        assert!(dir.join(page).exists(), "{page} missing");
    }
}
