//! The admin socket and online backup, against a real running `serve` and real SQLite
//! files: commands go through the running controller (and gateways see the change at
//! once), only root may use the socket, the CLI works on the file when the controller is
//! stopped, and `backup` copies a live database into a checked 0600 file.
//!
//! Owns: tests only. Must not touch: files outside the per-test tempdir.
#![allow(clippy::unwrap_used)]

mod common;

use std::fs;
use std::io::Read as _;
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{cmd, key, ok, run, spawn_serve, tempdir, Client};
use postern_controller::admin::default_socket;
use postern_controller::registry::Registry;

/// Stops `serve` with SIGTERM and returns what it logged.
fn stop_and_log(mut serve: Child) -> String {
    let pid = serve.id().to_string();
    Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    serve.wait().unwrap();
    let mut log = String::new();
    serve
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut log)
        .unwrap();
    log
}

#[test]
fn commands_run_through_the_controller_and_reach_gateways_at_once() {
    let (dir, db) = tempdir();
    let sock = dir.path().join("g.sock");
    // A long hold: a gateway's answer can only come from the write being published.
    let serve = spawn_serve(&db, &sock, 60_000);
    let admin = default_socket(&db);
    let meta = fs::symlink_metadata(&admin).unwrap();
    assert_eq!(meta.mode() & 0o777, 0o600, "admin socket must be 0600");
    assert_eq!(
        meta.uid(),
        0,
        "tests run as root: the socket belongs to root"
    );

    let mut gateway = Client::connect(&sock);
    let first = gateway.sync(0);
    gateway.send_raw(format!("{{\"after_revision\":{}}}\n", first.revision).as_bytes());

    let started = Instant::now();
    ok(
        &db,
        &["app", "add", "web", "--protocol", "tcp", "--port", "443"],
    );
    let answer = gateway.recv().expect("gateway answered");
    let pushed = started.elapsed();
    assert_eq!(answer["snapshot"]["revision"], first.revision + 1);
    assert_eq!(answer["snapshot"]["apps"][0]["name"], "web");
    println!("admin write -> gateway snapshot: {} ms", pushed.as_millis());
    assert!(pushed < Duration::from_secs(2), "took {pushed:?}");

    // Validation errors keep their one line and exit code through the socket.
    let (code, out, err) = run(
        &db,
        &["app", "add", "web", "--protocol", "tcp", "--port", "443"],
    );
    assert_eq!(code, 2, "{err}");
    assert!(out.is_empty());
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("already exists"), "{err}");

    // Relative paths in arguments are the caller's, not the controller's.
    let (code, _, err) = cmd(&db)
        .current_dir(dir.path())
        .args(["backup", "rel-backup.db"])
        .output()
        .map(|o| {
            (
                o.status.code().unwrap(),
                (),
                String::from_utf8(o.stderr).unwrap(),
            )
        })
        .unwrap();
    assert_eq!(code, 0, "{err}");
    assert!(dir.path().join("rel-backup.db").exists());

    let log = stop_and_log(serve);
    assert_eq!(
        log.matches("admin command").count(),
        3,
        "every command ran through the controller:\n{log}"
    );
    assert!(!admin.exists(), "clean stop removes the admin socket");
}

#[test]
fn only_root_may_use_the_admin_socket() {
    let (dir, db) = tempdir();
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let sock = dir.path().join("g.sock");
    let serve = spawn_serve(&db, &sock, 200);
    let admin = default_socket(&db);
    let as_nobody = || {
        let out = Command::new("setpriv")
            .args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                common::BIN,
                "--db",
            ])
            .arg(&db)
            .args(["app", "list"])
            .env_remove("POSTERN_DB")
            .stdin(Stdio::null())
            .output()
            .expect("setpriv (Debian package util-linux) must be installed");
        (
            out.status.code().unwrap(),
            String::from_utf8(out.stderr).unwrap(),
        )
    };
    // Mode 0600: the kernel refuses the connection.
    let (code, err) = as_nobody();
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("permission denied") && err.contains("run as root"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");

    // Even with the mode widened by mistake, the controller checks the peer's uid.
    fs::set_permissions(&admin, fs::Permissions::from_mode(0o666)).unwrap();
    let (code, err) = as_nobody();
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("only root may use the admin socket"), "{err}");
    let log = stop_and_log(serve);
    assert!(log.contains("neither root nor the controller's"), "{log}");
}

#[test]
fn with_the_controller_stopped_the_cli_works_on_the_file() {
    let (dir, db) = tempdir();
    let sock = dir.path().join("g.sock");
    let mut serve = spawn_serve(&db, &sock, 200);
    ok(
        &db,
        &["device", "add", "d1", "--user", "u", "--key", &key(1)],
    );
    serve.kill().unwrap(); // SIGKILL: the socket file stays behind, nobody listens
    serve.wait().unwrap();
    assert!(default_socket(&db).exists());
    ok(
        &db,
        &["device", "add", "d2", "--user", "u", "--key", &key(2)],
    );
    let listed = ok(&db, &["device", "list", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&listed).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 2);
    // A restarted controller replaces the stale socket and serves what was written meanwhile.
    let serve = spawn_serve(&db, &sock, 200);
    assert_eq!(Client::connect(&sock).sync(0).devices.len(), 2);
    ok(
        &db,
        &["device", "add", "d3", "--user", "u", "--key", &key(3)],
    );
    let log = stop_and_log(serve);
    assert_eq!(log.matches("admin command").count(), 1, "{log}");
}

#[test]
fn backup_copies_a_live_database_into_a_checked_0600_file() {
    let (dir, db) = tempdir();
    let sock = dir.path().join("g.sock");
    let serve = spawn_serve(&db, &sock, 200);
    for i in 0..20u32 {
        ok(
            &db,
            &[
                "device",
                "add",
                &format!("d{i}"),
                "--user",
                "u",
                "--key",
                &key(i),
            ],
        );
    }
    let revision = Registry::open(&db).unwrap().revision().unwrap();
    let file = dir.path().join("b.db");
    let out = ok(&db, &["backup", file.to_str().unwrap(), "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["revision"], revision);
    assert_eq!(
        fs::metadata(&file).unwrap().mode() & 0o777,
        0o600,
        "a backup holds secrets"
    );
    // Never overwrites: one line, exit 2, the old backup untouched.
    let before = fs::read(&file).unwrap();
    let (code, _, err) = run(&db, &["backup", file.to_str().unwrap()]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("already exists"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert_eq!(fs::read(&file).unwrap(), before);
    // The copy is a complete registry on its own.
    drop(stop_and_log(serve));
    assert_copy_matches(&db, &file);
}

fn assert_copy_matches(db: &Path, copy: &Path) {
    let mut original = Registry::open(db).unwrap();
    let mut restored = Registry::open(copy).unwrap();
    assert_eq!(restored.snapshot().unwrap(), original.snapshot().unwrap());
}
