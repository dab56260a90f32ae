//! `session list` and `session kill` against the real binary and real SQLite files: rows
//! as gateways reported them (inserted into `live_sessions`), stale marks, kills that bump
//! the revision, reach snapshots (also through a running controller's admin socket) and
//! are audited, and one-line refusals of malformed and unknown IDs.
//!
//! Owns: tests only. Must not touch: files outside the per-test tempdir.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::process::Command;

use common::{fails, ok, run, spawn_serve, tempdir, Client};
use postern_controller::registry::Registry;
use rusqlite::{params, Connection};
use serde_json::Value;

fn now_ms() -> i64 {
    i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap()
}

/// A migrated registry with two gateways: `edge-1` heard from now with sessions 0x0a1b2c
/// and 0x5, `edge-2` last heard from two minutes ago with session 0x7.
fn seeded(db: &Path) {
    drop(Registry::open(db).unwrap());
    let conn = Connection::open(db).unwrap();
    let now = now_ms();
    for (name, seen) in [("edge-1", now), ("edge-2", now - 120_000)] {
        conn.execute(
            "INSERT INTO gateways (name, last_seen_ms, last_revision) VALUES (?1, ?2, 1)",
            params![name, seen],
        )
        .unwrap();
    }
    for (gw, session, device_name, reported) in [
        ("edge-1", 0x0a1b2c, "alice-laptop", now),
        ("edge-1", 0x5, "bob-phone", now),
        ("edge-2", 0x7, "carol-desktop", now - 120_000),
    ] {
        conn.execute(
            "INSERT INTO live_sessions (gateway, session, device, device_name, user, app,
               source, mode, opened_at_ms, renewed_at_ms, expires_at_ms, reported_at_ms)
             VALUES (?1, ?2, ?3, ?4, 'alice', 'ssh', '10.1.1.1', 'lease', ?5, ?6, ?7, ?8)",
            params![
                gw,
                session,
                "ab".repeat(16),
                device_name,
                now - 65_000,
                now - 5_000,
                now + 55_000,
                reported
            ],
        )
        .unwrap();
    }
}

fn json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

#[test]
fn list_shows_each_reported_session_with_its_global_id_and_stale_gateways_marked() {
    let (_dir, db) = tempdir();
    seeded(&db);
    let rows = json(&ok(&db, &["session", "list", "--json"]));
    let rows = rows.as_array().unwrap();
    let ids: Vec<&str> = rows.iter().map(|r| r["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["edge-1:000005", "edge-1:0a1b2c", "edge-2:000007"]);
    let stale: Vec<bool> = rows.iter().map(|r| r["stale"].as_bool().unwrap()).collect();
    assert_eq!(stale, [false, false, true], "edge-2 is silent for 120 s");
    assert_eq!(rows[1]["device_name"], "alice-laptop");
    assert_eq!(rows[1]["mode"], "lease");

    let table = ok(&db, &["session", "list"]);
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 4, "{table}");
    assert!(
        lines[0].starts_with("ID") && lines[0].contains("EXPIRES IN"),
        "{table}"
    );
    assert!(
        lines[2].contains("edge-1:0a1b2c") && lines[2].contains("alice-laptop"),
        "{table}"
    );
    assert!(lines[2].contains("1m05s"), "age column: {table}");
    assert!(!lines[2].contains("stale"), "{table}");
    assert!(lines[3].contains("(stale)"), "{table}");

    let only = json(&ok(
        &db,
        &["session", "list", "--gateway", "edge-2", "--json"],
    ));
    assert_eq!(only.as_array().unwrap().len(), 1);
    fails(
        &db,
        &["session", "list", "--gateway", "bad name"],
        2,
        "--gateway",
    );
}

#[test]
fn kill_stores_the_kill_bumps_the_revision_reaches_snapshots_and_is_audited() {
    let (_dir, db) = tempdir();
    seeded(&db);
    let before = Registry::open(&db).unwrap().revision().unwrap();
    let listed = json(&ok(&db, &["session", "list", "--json"]));
    let opened_at_ms = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["id"] == "edge-1:0a1b2c")
        .map(|r| r["opened_at_ms"].as_u64().unwrap())
        .unwrap();
    let out = ok(&db, &["session", "kill", "edge-1:0A1B2C"]);
    assert!(
        out.starts_with("killed session edge-1:0a1b2c (device \"alice-laptop\""),
        "{out}"
    );
    let mut reg = Registry::open(&db).unwrap();
    assert_eq!(reg.revision().unwrap(), before + 1);
    let snap = reg.snapshot().unwrap();
    let kills = snap.kills.expect("the snapshot carries the kill");
    assert_eq!(kills.len(), 1);
    assert_eq!(
        (kills[0].gateway.as_str(), kills[0].session),
        ("edge-1", 0x0a1b2c)
    );
    let age = now_ms() / 1000 - i64::try_from(kills[0].at).unwrap();
    assert!((0..=5).contains(&age), "kill time is now: {age} s ago");
    assert_eq!(
        kills[0].opened_at_ms,
        Some(opened_at_ms),
        "the kill carries the listed session's opening time as the gateway reported it"
    );

    let audit = json(&ok(&db, &["audit", "list", "--json"]));
    let row = audit
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["action"] == "session.kill")
        .expect("a session_kill audit row");
    assert_eq!(row["subject"], "edge-1:0a1b2c");
    assert_eq!(row["detail"]["user"], "alice");
    assert_eq!(row["detail"]["listed"], true);

    // JSON output; a second gateway's session.
    let o = json(&ok(&db, &["session", "kill", "edge-2:7", "--json"]));
    assert_eq!(o["id"], "edge-2:000007");
    assert_eq!(o["revision"], before + 2);
    assert!(o["opened_at_ms"].is_u64(), "{o}");
}

#[test]
fn malformed_and_unlisted_ids_are_refused_with_one_line_unless_forced() {
    let (_dir, db) = tempdir();
    seeded(&db);
    let before = Registry::open(&db).unwrap().revision().unwrap();
    for bad in [
        "edge-1",
        "edge-1:",
        "edge-1:000000",
        "edge-1:1000000",
        "edge-1:xyz",
        ":5",
    ] {
        fails(
            &db,
            &["session", "kill", bad],
            2,
            "is malformed: use GATEWAY:HEXID",
        );
    }
    fails(
        &db,
        &["session", "kill", "edge-1:000006"],
        2,
        "session edge-1:000006 is not listed",
    );
    fails(&db, &["session", "kill", "edge-9:0a1b2c"], 2, "--force");
    assert_eq!(
        Registry::open(&db).unwrap().revision().unwrap(),
        before,
        "nothing was stored"
    );
    let out = ok(&db, &["session", "kill", "edge-1:000006", "--force"]);
    assert!(
        out.contains("not listed: stored because of --force"),
        "{out}"
    );
    assert_eq!(Registry::open(&db).unwrap().revision().unwrap(), before + 1);
    let kills = Registry::open(&db)
        .unwrap()
        .snapshot()
        .unwrap()
        .kills
        .unwrap();
    assert_eq!(
        (kills[0].session, kills[0].opened_at_ms),
        (6, None),
        "a forced kill of an unlisted session has no opening time"
    );
    let (code, _, err) = run(&db, &["session", "kill", "--help"]);
    assert_eq!(code, 0, "{err}");
}

#[test]
fn a_kill_through_the_running_controller_reaches_a_waiting_gateway() {
    let (dir, db) = tempdir();
    seeded(&db);
    let sock = dir.path().join("g.sock");
    let mut serve = spawn_serve(&db, &sock, 60_000);
    let mut gateway = Client::connect(&sock);
    let first = gateway.sync(0);
    assert!(first.kills.is_none(), "no kills yet");
    gateway.send_raw(format!("{{\"after_revision\":{}}}\n", first.revision).as_bytes());
    ok(&db, &["session", "kill", "edge-1:5"]);
    let next = gateway.recv().expect("an answer after the kill");
    let kills = &next["snapshot"]["kills"];
    assert_eq!(kills[0]["gateway"], "edge-1", "{next}");
    assert_eq!(kills[0]["session"], 5, "{next}");
    assert!(kills[0]["opened_at_ms"].is_u64(), "{next}");
    let audit = json(&ok(&db, &["audit", "list", "--json"]));
    let actor = audit
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["action"] == "session.kill")
        .map(|r| r["actor"].as_str().unwrap().to_owned())
        .unwrap();
    assert!(actor.starts_with("admin"), "{actor}");
    Command::new("kill")
        .args(["-TERM", &serve.id().to_string()])
        .status()
        .unwrap();
    serve.wait().unwrap();
}
