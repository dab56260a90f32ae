//! `serve` tests over a real Unix socket with the real binary: initial snapshot, long-poll
//! delivery of a CLI change from another process (latency measured), heartbeat after the
//! hold time, malformed/over-long requests, socket permissions, stale-socket handling and
//! clean stop on SIGTERM.
//!
//! Owns: tests only. Must not touch: files outside the per-test tempdir.
#![allow(clippy::unwrap_used)]

mod common;

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use common::{key, ok, run, spawn_serve, tempdir, Client};

struct Serve(std::process::Child);
impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn sigterm(child: &std::process::Child) {
    let st = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
}

#[test]
fn snapshot_then_long_poll_delivers_cli_revoke_fast() {
    let (dir, db) = tempdir();
    let sock = dir.path().join("run/controller.sock");
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
    ok(&db, &["grant", "add", "--app", "web", "--user", "alice"]);
    let _serve = Serve(spawn_serve(&db, &sock, 10_000));

    let meta = std::fs::symlink_metadata(&sock).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);

    let mut c = Client::connect(&sock);
    let t = Instant::now();
    let s = c.sync(0);
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "first answer must not be held"
    );
    assert_eq!(s.revision, 4);
    assert_eq!(s.devices.len(), 1);
    assert!(!s.devices[0].revoked);
    assert_eq!(s.apps[0].name, "web");
    assert_eq!(s.grants[0].user, "alice");
    // Absent after_revision: answered at once, too.
    c.send_raw(b"{}\n");
    assert_eq!(c.recv().unwrap()["snapshot"]["revision"], 4);

    let mut worst = Duration::ZERO;
    for round in 0..3 {
        let db2 = db.clone();
        let revoker = thread::spawn(move || {
            thread::sleep(Duration::from_millis(300));
            let dev = format!("dev{round}");
            ok(
                &db2,
                &[
                    "device",
                    "add",
                    &dev,
                    "--user",
                    "bob",
                    "--key",
                    &key(10 + round),
                ],
            );
            let start = Instant::now();
            let (code, _, err) = run(&db2, &["device", "revoke", &dev]);
            assert_eq!(code, 0, "{err}");
            (start, Instant::now())
        });
        let before = c.sync(s.revision + 2 * round as u64);
        // The add arrives first (one long-poll), then the revoke (the next one).
        assert!(before
            .devices
            .iter()
            .any(|d| d.name == format!("dev{round}")));
        let after_rev = before.revision;
        let got = if before
            .devices
            .iter()
            .any(|d| d.name == format!("dev{round}") && d.revoked)
        {
            (before, Instant::now())
        } else {
            let snap = c.sync(after_rev);
            (snap, Instant::now())
        };
        let (spawned, exited) = revoker.join().unwrap();
        let (snap, received) = got;
        assert!(
            snap.devices
                .iter()
                .any(|d| d.name == format!("dev{round}") && d.revoked),
            "revoke not delivered: {snap:?}"
        );
        let from_ack = received.saturating_duration_since(exited);
        let from_spawn = received.saturating_duration_since(spawned);
        println!(
            "round {round}: revoke delivered {} ms after the CLI exited ({} ms after it was spawned)",
            from_ack.as_millis(),
            from_spawn.as_millis()
        );
        assert!(
            from_ack < Duration::from_millis(500),
            "too slow: {from_ack:?}"
        );
        worst = worst.max(from_ack);
    }
    println!("worst revoke delivery latency: {} ms", worst.as_millis());
}

#[test]
fn heartbeat_after_hold_and_connection_reuse() {
    let (dir, db) = tempdir();
    let sock = dir.path().join("c.sock");
    let _serve = Serve(spawn_serve(&db, &sock, 300));
    let mut c = Client::connect(&sock);
    let s = c.sync(0);
    assert_eq!(s.revision, 1);
    for _ in 0..2 {
        let t = Instant::now();
        let hb = c.sync(s.revision);
        let held = t.elapsed();
        println!("heartbeat after {} ms", held.as_millis());
        assert_eq!(hb, s, "heartbeat carries the unchanged snapshot");
        assert!(
            held >= Duration::from_millis(250),
            "answered too early: {held:?}"
        );
        assert!(held < Duration::from_secs(3), "held too long: {held:?}");
    }
    // A gateway that is behind (or ahead, e.g. a reset DB) is answered at once.
    let t = Instant::now();
    assert_eq!(c.sync(99).revision, 1);
    assert!(t.elapsed() < Duration::from_millis(250));
}

#[test]
fn malformed_requests_get_an_error_and_are_closed() {
    let (dir, db) = tempdir();
    let sock = dir.path().join("c.sock");
    let _serve = Serve(spawn_serve(&db, &sock, 300));
    for bad in [
        &b"hello\n"[..],
        b"{\"after_revision\":\"x\"}\n",
        b"{\"after_revision\":-1}\n",
        b"{\"after_revision\":1,\"extra\":2}\n",
        b"[1,2]\n",
        b"\xff\xfe\n",
    ] {
        let mut c = Client::connect(&sock);
        c.send_raw(bad);
        let v = c.recv().unwrap();
        let msg = v["error"].as_str().unwrap_or_else(|| panic!("{v}"));
        assert!(msg.contains("malformed request"), "{msg}");
        assert!(
            c.recv().is_none(),
            "connection must be closed after an error"
        );
    }
    // Over-long line: refused without reading it all.
    let mut c = Client::connect(&sock);
    c.send_raw(&vec![b' '; 10_000]);
    let v = c.recv().unwrap();
    assert!(
        v["error"].as_str().unwrap().contains("longer than 4096"),
        "{v}"
    );
    assert!(c.recv().is_none());
    // Serving continues for well-behaved clients.
    assert_eq!(Client::connect(&sock).sync(0).revision, 1);
}

#[test]
fn stale_socket_is_replaced_live_one_is_not_and_sigterm_cleans_up() {
    let (dir, db) = tempdir();
    let sock = dir.path().join("c.sock");
    // A stale socket file: bound, then the listener went away.
    drop(UnixListener::bind(&sock).unwrap());
    assert!(sock.exists() && UnixStream::connect(&sock).is_err());
    let serve = spawn_serve(&db, &sock, 300);
    assert_eq!(Client::connect(&sock).sync(0).revision, 1);

    // A second controller on the same live socket refuses and leaves it alone.
    let (code, _, err) = run(&db, &["serve", "--socket", sock.to_str().unwrap()]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("already listening"), "{err}");
    assert_eq!(Client::connect(&sock).sync(0).revision, 1);

    // A regular file in the way is not deleted.
    let file = dir.path().join("file");
    std::fs::write(&file, "keep me").unwrap();
    let (code, _, err) = run(
        &db,
        &[
            "serve",
            "--no-admin-socket",
            "--socket",
            file.to_str().unwrap(),
        ],
    );
    assert_eq!(code, 1);
    assert!(err.contains("not a socket"), "{err}");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "keep me");

    // Clean stop: exit 0 and the socket file is gone, even with a held request open.
    let mut held = Client::connect(&sock);
    held.send_raw(b"{\"after_revision\":1}\n");
    thread::sleep(Duration::from_millis(100));
    let mut serve = serve;
    sigterm(&serve);
    let t = Instant::now();
    let status = serve.wait().unwrap();
    assert!(status.success(), "{status:?}");
    assert!(t.elapsed() < Duration::from_secs(3));
    assert!(!sock.exists(), "socket file must be removed on SIGTERM");
    let mut stderr = String::new();
    use std::io::Read;
    serve
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(stderr.contains("controller serving"), "{stderr}");
}

#[test]
fn serve_refuses_a_bad_database_before_binding() {
    let (dir, db) = tempdir();
    std::fs::write(&db, "garbage ".repeat(1000)).unwrap();
    let sock = dir.path().join("c.sock");
    let (code, _, err) = run(&db, &["serve", "--socket", sock.to_str().unwrap()]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.lines()
            .last()
            .unwrap()
            .contains("not an SQLite database"),
        "{err}"
    );
    assert!(!sock.exists());
}
