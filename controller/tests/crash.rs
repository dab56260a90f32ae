//! Crash-safety smoke: 200 CLI writes from two concurrent writer threads while `serve`
//! long-polls and is killed with SIGKILL midway. The writes go through the controller's
//! admin socket until the kill; the write in flight at the kill gets "outcome unknown",
//! later ones find no controller and write the file directly. Afterwards every
//! acknowledged write is in the database, the database passes `integrity_check`, and a
//! new `serve` starts over the stale sockets and serves it all.
//!
//! Owns: tests only. Must not touch: files outside the per-test tempdir.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::{key, run, spawn_serve, tempdir, Client};
use postern_controller::registry::Registry;

#[test]
fn acknowledged_writes_survive_kill_9_of_serve() {
    let (dir, db) = tempdir();
    let sock = dir.path().join("c.sock");
    let mut serve = spawn_serve(&db, &sock, 200);

    // A gateway-like client long-polling in a loop until the server dies.
    let stop = Arc::new(AtomicBool::new(false));
    let poller = {
        let sock = sock.clone();
        let stop = Arc::clone(&stop);
        thread::spawn(move || {
            let mut c = Client::connect(&sock);
            let mut rev = 0;
            let mut answers = 0u32;
            while !stop.load(Ordering::Relaxed) {
                if !c.try_send(format!("{{\"after_revision\":{rev}}}\n").as_bytes()) {
                    break;
                }
                match c.try_recv() {
                    Some(v) => {
                        rev = v["snapshot"]["revision"].as_u64().unwrap();
                        answers += 1;
                    }
                    None => break,
                }
            }
            answers
        })
    };

    let start = Instant::now();
    let writers: Vec<_> = [0u32, 1]
        .into_iter()
        .map(|w| {
            let db = db.clone();
            thread::spawn(move || {
                let mut acked = Vec::new();
                let mut unknown = Vec::new();
                for i in 0..100u32 {
                    let n = w * 100 + i;
                    let (code, _, err) = if n % 2 == 0 {
                        run(
                            &db,
                            &[
                                "device",
                                "add",
                                &format!("dev{n}"),
                                "--user",
                                "u",
                                "--key",
                                &key(n),
                            ],
                        )
                    } else {
                        let port = (1000 + n).to_string();
                        run(
                            &db,
                            &[
                                "app",
                                "add",
                                &format!("app{n}"),
                                "--protocol",
                                "tcp",
                                "--port",
                                &port,
                            ],
                        )
                    };
                    if code == 0 {
                        acked.push(n);
                    } else {
                        // Only the controller dying under a command may fail it, and the
                        // CLI must say the outcome is unknown rather than claim either.
                        assert!(err.contains("admin socket"), "write {n}: {err}");
                        unknown.push(n);
                    }
                }
                (acked, unknown)
            })
        })
        .collect();

    thread::sleep(Duration::from_millis(300));
    serve.kill().unwrap(); // SIGKILL
    serve.wait().unwrap();
    stop.store(true, Ordering::Relaxed);
    let (mut acked, mut unknown) = (Vec::new(), Vec::new());
    for w in writers {
        let (a, u) = w.join().unwrap();
        acked.extend(a);
        unknown.extend(u);
    }
    let answers = poller.join().unwrap();
    println!(
        "200 writes in {} ms; poller got {answers} answers before the kill",
        start.elapsed().as_millis()
    );
    println!(
        "{} acknowledged, {} with unknown outcome (in flight at the kill)",
        acked.len(),
        unknown.len()
    );
    assert!(
        unknown.len() <= 2,
        "one in-flight command per writer: {unknown:?}"
    );
    assert_eq!(acked.len() + unknown.len(), 200);

    // Reopen: everything acknowledged is there, the counter matches, the file is sound.
    let mut reg = Registry::open(&db).unwrap();
    let snap = reg.snapshot().unwrap();
    let present = snap.devices.len() + snap.apps.len();
    assert!(present >= acked.len() && present <= 200, "{present} rows");
    assert_eq!(
        snap.revision,
        1 + present as u64,
        "one revision per applied write"
    );
    for n in acked {
        if n % 2 == 0 {
            assert!(snap.devices.iter().any(|d| d.name == format!("dev{n}")));
        } else {
            assert!(snap.apps.iter().any(|a| a.name == format!("app{n}")));
        }
    }
    let check: String = rusqlite::Connection::open(&db)
        .unwrap()
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(check, "ok");

    // The killed server left its socket file; a new one replaces it and serves everything.
    assert!(sock.exists());
    let mut serve = spawn_serve(&db, &sock, 200);
    assert_eq!(Client::connect(&sock).sync(0), snap);
    serve.kill().unwrap();
    serve.wait().unwrap();
}
