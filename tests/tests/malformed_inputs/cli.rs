//! `postern-controller` arguments through the real binary: bad names, users, keys, ports,
//! protocols, missing and unknown arguments, duplicates and unknown references. Each must
//! exit with status 2, print nothing on stdout and exactly one `error: ...` line on
//! stderr, and change nothing in the registry.

use std::path::Path;
use std::process::{Command, Stdio};

use postern_protocol::keys::DeviceSigningKey;

pub struct Case {
    pub args: Vec<String>,
    /// Text the error line must contain (the argument or value it is about).
    pub needle: String,
}

fn valid_key(i: u8) -> String {
    DeviceSigningKey::from_seed([i; 32]).public_key().to_text()
}

fn b64(bytes: &[u8]) -> String {
    // Standard base64 with padding, enough for test keys.
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(T[(n >> (18 - 6 * i)) as usize & 63]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn case(args: &[&str], needle: &str) -> Case {
    Case {
        args: args.iter().map(|s| (*s).to_owned()).collect(),
        needle: needle.to_owned(),
    }
}

pub fn cases() -> Vec<Case> {
    let key = valid_key(1);
    let mut c = Vec::new();
    // device add: names.
    for name in [
        "",
        "a b",
        "laptop/1",
        "laptop\n",
        "lap:top",
        "é",
        "x;rm",
        &"x".repeat(65),
    ] {
        c.push(case(
            &["device", "add", name, "--user", "alice", "--key", &key],
            "device name",
        ));
    }
    c.push(case(
        &[
            "device",
            "add",
            "laptop",
            "--user",
            "alice",
            "--key",
            &valid_key(9),
        ],
        "laptop",
    ));
    // device add: users.
    for user in ["", "a b", "a\nb", "bob;", "bob/x", "ü", &"u".repeat(129)] {
        c.push(case(
            &["device", "add", "phone", "--user", user, "--key", &key],
            "--user",
        ));
    }
    // device add: keys.
    let weak_identity = format!(
        "ed25519:{}",
        b64(&{
            let mut b = [0u8; 32];
            b[0] = 1;
            b
        })
    );
    for bad in [
        String::new(),
        "ed25519:".into(),
        "ed25519:!!!!".into(),
        "ed25519 :AAAA".into(),
        format!("ed25519:{}", b64(&[7; 31])),
        format!("ed25519:{}", b64(&[7; 33])),
        format!("x25519:{}", b64(&[7; 32])),
        format!("postern-device-secret:v1:{}", b64(&[7; 32])),
        format!("ED25519:{}", &key["ed25519:".len()..]),
        format!("{key}x"),
        key.trim_end_matches('=').to_owned(),
        weak_identity,
        "3f1Vb0F8".into(),
    ] {
        c.push(case(
            &["device", "add", "phone", "--user", "alice", "--key", &bad],
            "--key",
        ));
    }
    c.push(case(
        &[
            "device",
            "add",
            "phone",
            "--user",
            "alice",
            "--key",
            &valid_key(1),
        ],
        "key",
    ));
    c.push(case(
        &["device", "add", "phone", "--user", "alice"],
        "--key",
    ));
    c.push(case(&["device", "add", "phone", "--key", &key], "--user"));
    c.push(case(
        &["device", "add", "--user", "alice", "--key", &key],
        "NAME",
    ));
    // device revoke.
    for name in ["tablet", "", "0123456789abcdef0123456789abcdef", "x y"] {
        c.push(case(&["device", "revoke", name], "device"));
    }
    // app add: names, protocols, ports.
    for name in ["Web", "web/1", "", "a b", "wéb", &"a".repeat(65)] {
        c.push(case(
            &["app", "add", name, "--protocol", "tcp", "--port", "443"],
            "app name",
        ));
    }
    c.push(case(
        &["app", "add", "web", "--protocol", "tcp", "--port", "8443"],
        "web",
    ));
    for proto in ["sctp", "TCP", "", "icmp", "tcp/udp", "6"] {
        c.push(case(
            &["app", "add", "api", "--protocol", proto, "--port", "443"],
            "--protocol",
        ));
    }
    for port in [
        "0",
        "65536",
        "-1",
        "abc",
        "",
        "1.5",
        "0x50",
        "99999999999",
        "443 ",
    ] {
        c.push(case(
            &["app", "add", "api", "--protocol", "tcp", "--port", port],
            "--port",
        ));
    }
    c.push(case(&["app", "add", "api", "--protocol", "tcp"], "--port"));
    c.push(case(&["app", "add", "api", "--port", "443"], "--protocol"));
    // grant add.
    c.push(case(
        &["grant", "add", "--app", "nope", "--user", "alice"],
        "nope",
    ));
    c.push(case(
        &["grant", "add", "--app", "Web", "--user", "alice"],
        "Web",
    ));
    c.push(case(
        &["grant", "add", "--app", "web", "--user", "a b"],
        "--user",
    ));
    c.push(case(
        &["grant", "add", "--app", "web", "--user", ""],
        "--user",
    ));
    c.push(case(&["grant", "add", "--app", "web"], "--user"));
    // Unknown commands, flags and values.
    c.push(case(&["frobnicate"], "frobnicate"));
    c.push(case(&["device", "frob"], "frob"));
    c.push(case(&["device", "list", "--colour"], "--colour"));
    c.push(case(&["app", "list", "--json=1"], "--json"));
    c.push(case(&["grant", "list", "extra"], "extra"));
    c.push(case(&["serve"], "--socket"));
    c.push(case(
        &["serve", "--socket", "/tmp/x.sock", "--hold-ms", "abc"],
        "--hold-ms",
    ));
    c
}

fn run(db: &Path, args: &[String]) -> (Option<i32>, String, String) {
    let out = Command::new(postern_e2e::bin("postern-controller"))
        .env_remove("POSTERN_DB")
        .env_remove("RUST_LOG")
        .arg("--db")
        .arg(db)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run postern-controller");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn admin(db: &Path, args: &[&str]) {
    let args: Vec<String> = args.iter().map(|s| (*s).to_owned()).collect();
    let (code, _, err) = run(db, &args);
    assert_eq!(code, Some(0), "setup {args:?} failed: {err}");
}

#[test]
fn malformed_cli_arguments_exit_2_with_one_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("registry.db");
    admin(
        &db,
        &["app", "add", "web", "--protocol", "tcp", "--port", "443"],
    );
    admin(
        &db,
        &[
            "device",
            "add",
            "laptop",
            "--user",
            "alice",
            "--key",
            &valid_key(1),
        ],
    );
    let before = ["device", "app", "grant"].map(|what| {
        run(
            &db,
            &[what.to_owned(), "list".to_owned(), "--json".to_owned()],
        )
        .1
    });

    let cases = cases();
    let mut failures = Vec::new();
    for case in &cases {
        let (code, out, err) = run(&db, &case.args);
        let name = format!("{:?}", case.args);
        if code != Some(2) || !out.is_empty() {
            failures.push(format!(
                "{name}: exit {code:?}, stdout {out:?}, stderr {err:?}"
            ));
            continue;
        }
        super::assert_one_line(&name, &err);
        if !err.starts_with("error: ") || !err.contains(&case.needle) {
            failures.push(format!(
                "{name}: error line does not name {:?}: {err}",
                case.needle
            ));
        }
    }
    let after = ["device", "app", "grant"].map(|what| {
        run(
            &db,
            &[what.to_owned(), "list".to_owned(), "--json".to_owned()],
        )
        .1
    });
    assert_eq!(before, after, "a refused command changed the registry");
    assert!(
        failures.is_empty(),
        "{} of {} CLI cases wrong:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}
