//! CLI tests through the real binary: add/list/--json/revoke, one-line errors and exit
//! codes (2 for rejected input, 1 for runtime failures), help examples.
//!
//! Owns: tests only. Must not touch: files outside the per-test tempdir.
#![allow(clippy::unwrap_used)]

mod common;

use common::{key, ok, tempdir};
use postern_controller::proto::snapshot::{AppRecord, DeviceRecord, GrantRecord};

/// Asserts a failure with exactly one stderr line starting with `prefix`.
fn fails(db: &std::path::Path, args: &[&str], code: i32, prefix: &str) -> String {
    let err = common::fails(db, args, code, prefix);
    assert!(err.starts_with(prefix), "{args:?}: {err}");
    err
}

#[test]
fn device_add_list_json_revoke() {
    let (_dir, db) = tempdir();
    let k = key(1);
    let id = ok(
        &db,
        &["device", "add", "laptop", "--user", "alice", "--key", &k],
    );
    let id = id.trim();
    assert_eq!(id.len(), 32);
    assert!(id
        .bytes()
        .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
    ok(
        &db,
        &["device", "add", "phone", "--user", "bob", "--key", &key(2)],
    );

    let table = ok(&db, &["device", "list"]);
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 3, "{table}");
    assert!(lines[0].starts_with("NAME"));
    // Aligned: the USER column starts at the same offset on every line.
    let col = lines[0].find("USER").unwrap();
    assert_eq!(&lines[1][col..col + 5], "alice");
    assert_eq!(&lines[2][col..col + 3], "bob");
    assert!(lines[1].contains(id) && lines[1].contains("active"));

    let json: Vec<DeviceRecord> =
        serde_json::from_str(&ok(&db, &["device", "list", "--json"])).unwrap();
    assert_eq!(json.len(), 2);
    assert_eq!(json[0].id, id);
    assert_eq!(json[0].public_key, k);
    assert!(!json[0].revoked);

    let out = ok(&db, &["device", "revoke", "laptop"]);
    assert!(out.starts_with("revoked device \"laptop\""), "{out}");
    let out = ok(&db, &["device", "revoke", id]);
    assert!(out.contains("already revoked"), "{out}");
    let json: Vec<DeviceRecord> =
        serde_json::from_str(&ok(&db, &["device", "list", "--json"])).unwrap();
    assert!(json[0].revoked && !json[1].revoked);
    assert!(ok(&db, &["device", "list"]).contains("revoked"));
    fails(
        &db,
        &["device", "revoke", "tablet"],
        2,
        "error: no device named or with id \"tablet\"",
    );
}

#[test]
fn app_and_grant_add_list_json() {
    let (_dir, db) = tempdir();
    let out = ok(
        &db,
        &["app", "add", "web", "--protocol", "tcp", "--port", "443"],
    );
    assert_eq!(out, "added app \"web\" (tcp/443)\n");
    ok(
        &db,
        &["app", "add", "dns", "--protocol", "udp", "--port", "53"],
    );
    let apps: Vec<AppRecord> = serde_json::from_str(&ok(&db, &["app", "list", "--json"])).unwrap();
    assert_eq!(apps.len(), 2);
    assert_eq!(apps[0].name, "dns");
    assert_eq!(apps[0].port, 53);
    let table = ok(&db, &["app", "list"]);
    assert_eq!(
        table,
        "NAME  PROTOCOL  PORT  FORWARD\ndns   udp       53    -\nweb   tcp       443   -\n"
    );

    ok(&db, &["grant", "add", "--app", "web", "--user", "alice"]);
    let again = ok(&db, &["grant", "add", "--app", "web", "--user", "alice"]);
    assert!(again.contains("already has access"), "{again}");
    let grants: Vec<GrantRecord> =
        serde_json::from_str(&ok(&db, &["grant", "list", "--json"])).unwrap();
    assert_eq!(
        grants,
        vec![GrantRecord {
            app: "web".into(),
            user: "alice".into()
        }]
    );
    assert_eq!(ok(&db, &["grant", "list"]), "APP  USER\nweb  alice\n");
    // Empty listings: header only / empty array.
    let (_d2, db2) = tempdir();
    assert_eq!(ok(&db2, &["grant", "list"]), "APP  USER\n");
    assert_eq!(ok(&db2, &["device", "list", "--json"]).trim(), "[]");
}

#[test]
fn validation_errors_are_one_line_with_exit_code_2() {
    let (_dir, db) = tempdir();
    ok(
        &db,
        &[
            "device",
            "add",
            "laptop",
            "--user",
            "alice",
            "--key",
            &key(1),
        ],
    );
    ok(
        &db,
        &["app", "add", "web", "--protocol", "tcp", "--port", "443"],
    );

    let e = fails(
        &db,
        &[
            "device",
            "add",
            "laptop",
            "--user",
            "alice",
            "--key",
            &key(2),
        ],
        2,
        "error: device name \"laptop\" already exists: pick another name or revoke the old device",
    );
    eprintln!("duplicate name: {e}");
    fails(
        &db,
        &[
            "device",
            "add",
            "phone",
            "--user",
            "alice",
            "--key",
            &key(1),
        ],
        2,
        "error: --key is already registered to device \"laptop\"",
    );
    for bad in [
        "ed25519:zz",
        "ssh-ed25519 AAAA",
        "ed25519:",
        "x25519:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
    ] {
        let e = fails(
            &db,
            &["device", "add", "phone", "--user", "alice", "--key", bad],
            2,
            "error: --key",
        );
        assert!(e.contains("postern keygen"), "{e}");
    }
    for bad in ["0", "65536", "70000", "http", "-1"] {
        let e = fails(
            &db,
            &["app", "add", "x", "--protocol", "tcp", "--port", bad],
            2,
            "error:",
        );
        assert!(e.contains("--port") && e.contains("1 to 65535"), "{e}");
    }
    let e = fails(
        &db,
        &["app", "add", "x", "--protocol", "sctp", "--port", "1"],
        2,
        "error:",
    );
    assert!(e.contains("--protocol") && e.contains("tcp or udp"), "{e}");
    fails(
        &db,
        &["app", "add", "Web!", "--protocol", "tcp", "--port", "1"],
        2,
        "error: app name \"Web!\" is invalid",
    );
    fails(
        &db,
        &["app", "add", "web", "--protocol", "tcp", "--port", "80"],
        2,
        "error: app \"web\" already exists",
    );
    fails(
        &db,
        &["app", "add", "www", "--protocol", "tcp", "--port", "443"],
        2,
        "error: --port 443/tcp is already used by app \"web\"",
    );
    fails(
        &db,
        &["grant", "add", "--app", "mail", "--user", "alice"],
        2,
        "error: --app \"mail\" is not a registered app: add it first with",
    );
    fails(
        &db,
        &["grant", "add", "--app", "web", "--user", "a b"],
        2,
        "error: --user \"a b\" is invalid",
    );
    let e = fails(
        &db,
        &["device", "add", "tablet", "--user", "alice"],
        2,
        "error:",
    );
    assert!(e.contains("--key"), "{e}");
    fails(&db, &["frobnicate"], 2, "error:");
    // Nothing above changed the registry.
    let apps: Vec<AppRecord> = serde_json::from_str(&ok(&db, &["app", "list", "--json"])).unwrap();
    assert_eq!(apps.len(), 1);
}

#[test]
fn runtime_errors_exit_1() {
    let (dir, db) = tempdir();
    std::fs::write(&db, "not a database at all\n".repeat(200)).unwrap();
    let e = fails(&db, &["device", "list"], 1, "error: ");
    assert!(
        e.contains(&db.display().to_string()) && e.contains("not an SQLite database"),
        "{e}"
    );
    // A newer schema is refused, also through the CLI.
    let db2 = dir.path().join("newer.db");
    ok(&db2, &["app", "list"]);
    rusqlite::Connection::open(&db2)
        .unwrap()
        .pragma_update(None, "user_version", 999)
        .unwrap();
    let e = fails(&db2, &["app", "list"], 1, "error: ");
    assert!(e.contains("newer than this binary supports"), "{e}");
}

#[test]
fn db_from_env_and_parent_dir_created_0700() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("var/lib/postern/registry.db");
    let out = std::process::Command::new(common::BIN)
        .env("POSTERN_DB", &db)
        .args(["app", "add", "web", "--protocol", "tcp", "--port", "443"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(db.exists());
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(db.parent().unwrap())
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o700);
}

#[test]
fn every_command_help_has_an_example() {
    let (_dir, db) = tempdir();
    let cmds: &[&[&str]] = &[
        &[],
        &["device"],
        &["device", "add"],
        &["device", "list"],
        &["device", "revoke"],
        &["app"],
        &["app", "add"],
        &["app", "list"],
        &["grant"],
        &["grant", "add"],
        &["grant", "list"],
        &["serve"],
    ];
    for c in cmds {
        let mut args: Vec<&str> = c.to_vec();
        args.push("--help");
        let out = ok(&db, &args);
        assert!(
            out.contains("Example"),
            "{args:?} help lacks an example:\n{out}"
        );
        assert!(out.contains("postern-controller "), "{args:?}");
        assert!(!out.contains("hold-ms"), "hidden flag leaked into help");
    }
}

#[test]
fn app_add_forward_is_validated_listed_and_in_json() {
    let (_dir, db) = tempdir();
    let out = ok(
        &db,
        &[
            "app",
            "add",
            "wiki",
            "--protocol",
            "tcp",
            "--port",
            "8443",
            "--forward",
            "10.0.0.5:80",
        ],
    );
    assert_eq!(
        out,
        "added app \"wiki\" (tcp/8443 forwarded to 10.0.0.5:80)\n"
    );
    ok(
        &db,
        &[
            "app",
            "add",
            "db6",
            "--protocol",
            "tcp",
            "--port",
            "5432",
            "--forward",
            "[fd00::7]:5432",
        ],
    );
    ok(
        &db,
        &["app", "add", "web", "--protocol", "tcp", "--port", "443"],
    );
    let table = ok(&db, &["app", "list"]);
    assert!(
        table.lines().next().unwrap().ends_with("FORWARD"),
        "{table}"
    );
    assert!(
        table.contains("[fd00::7]:5432") && table.contains("10.0.0.5:80"),
        "{table}"
    );
    let json = ok(&db, &["app", "list", "--json"]);
    let apps: Vec<AppRecord> = serde_json::from_str(&json).unwrap();
    assert_eq!(apps[1].name, "web");
    assert_eq!(apps[1].forward, None);
    assert_eq!(apps[2].forward, Some("10.0.0.5:80".parse().unwrap()));
    assert_eq!(apps[0].forward, Some("[fd00::7]:5432".parse().unwrap()));
    // No `forward` key at all for an app without one (older readers are unaffected).
    let raw: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert!(raw[1].get("forward").is_none(), "{json}");
    assert_eq!(raw[2]["forward"], "10.0.0.5:80");

    for bad in [
        "db.internal:80",
        "10.0.0.5",
        "10.0.0.5:0",
        "127.0.0.1:80",
        "[::1]:22",
    ] {
        fails(
            &db,
            &[
                "app",
                "add",
                "bad",
                "--protocol",
                "tcp",
                "--port",
                "9000",
                "--forward",
                bad,
            ],
            2,
            &format!("error: --forward {bad:?} is invalid"),
        );
    }
    let apps: Vec<AppRecord> = serde_json::from_str(&ok(&db, &["app", "list", "--json"])).unwrap();
    assert_eq!(apps.len(), 3, "rejected input changed nothing");
}
