//! Identity tests on real SQLite files: users, groups, device rename/delete/risk, the audit
//! trail, and TOTP (good, wrong, replayed, malformed codes; the persistent lockout), plus
//! the `user`, `group`, `audit` and `device rename|delete|risk` commands through the binary.
//!
//! Owns: tests only. Must not touch: files outside the per-test tempdir.
#![allow(clippy::unwrap_used)]

mod common;

use common::{key, ok, tempdir};
use postern_controller::audit::AuditRow;
use postern_controller::identity::{TotpError, MAX_TOTP_FAILURES, TOTP_WINDOW_SECS};
use postern_controller::proto::keys::DevicePublicKey;
use postern_controller::proto::snapshot::DeviceRecord;
use postern_controller::registry::{Registry, RegistryError};

/// A time at the start of a TOTP step (1_800_000_000 / 30 is whole).
const T0: u64 = 1_800_000_000;

fn open(db: &std::path::Path) -> Registry {
    Registry::open(db).expect("opening the test registry")
}

fn pubkey(i: u32) -> DevicePublicKey {
    DevicePublicKey::from_text(&key(i)).expect("test keys are valid")
}

/// The RFC 6238 code (SHA-1, 6 digits, 30 s) of `secret_b32` at `unix`, computed by
/// totp-rs independently of the controller's code path.
fn code_at(secret_b32: &str, unix: u64) -> String {
    let secret = totp_rs::Secret::try_from_base32(secret_b32).expect("enrollment secret is base32");
    totp_rs::Builder::new()
        .with_secret(secret.as_ref())
        .build()
        .expect("RFC-compliant TOTP parameters")
        .generate(unix)
        .to_string()
}

/// A six-digit code that is valid at none of the steps `unix` accepts (±1).
fn wrong_code(secret_b32: &str, unix: u64) -> String {
    let valid: Vec<String> = [unix - 30, unix, unix + 30]
        .iter()
        .map(|&t| code_at(secret_b32, t))
        .collect();
    (0..10u32)
        .map(|i| {
            format!(
                "{:06}",
                (valid[1].parse::<u32>().unwrap() + 1 + i) % 1_000_000
            )
        })
        .find(|c| !valid.contains(c))
        .expect("some code among ten is wrong")
}

/// A registry with user alice (TOTP enrolled) and device laptop; returns its id and secret.
fn enrolled(db: &std::path::Path) -> (Registry, String, String) {
    let mut reg = open(db);
    let dev = reg.add_device("laptop", "alice", &pubkey(1)).unwrap();
    let e = reg.enroll_totp("alice", T0).unwrap();
    assert!(
        e.uri.starts_with("otpauth://totp/Postern:alice?"),
        "{}",
        e.uri.as_str()
    );
    assert!(e
        .uri
        .contains(&format!("secret={}", e.secret_base32.as_str())));
    assert!(e.uri.contains("issuer=Postern"));
    let secret = e.secret_base32.to_string();
    (reg, dev.id, secret)
}

fn audit_actions(reg: &Registry) -> Vec<String> {
    reg.list_audit(10_000)
        .unwrap()
        .into_iter()
        .map(|r| r.action)
        .collect()
}

#[test]
fn users_groups_crud_and_errors() {
    let (_dir, db) = tempdir();
    let mut reg = open(&db);
    let rev = reg.revision().unwrap();
    reg.add_user("alice").unwrap();
    reg.add_user("bob@example.com").unwrap();
    assert_eq!(reg.revision().unwrap(), rev + 2);

    let e = reg.add_user("alice").unwrap_err();
    assert!(matches!(e, RegistryError::DuplicateUser(_)) && e.is_validation());
    let e = reg.add_user("bad name").unwrap_err();
    assert!(e.is_validation());
    assert!(
        e.to_string()
            .starts_with("user name \"bad name\" is invalid"),
        "{e}"
    );
    assert!(reg.add_user("").unwrap_err().is_validation());

    reg.add_group("eng").unwrap();
    reg.add_group("ops").unwrap();
    assert!(matches!(
        reg.add_group("eng").unwrap_err(),
        RegistryError::DuplicateGroup(_)
    ));
    assert!(reg.add_group("a@b").unwrap_err().is_validation());

    assert!(reg.add_group_member("eng", "alice").unwrap());
    assert!(reg.add_group_member("ops", "alice").unwrap());
    assert!(reg.add_group_member("eng", "bob@example.com").unwrap());
    let rev = reg.revision().unwrap();
    assert!(
        !reg.add_group_member("eng", "alice").unwrap(),
        "second add is a no-op"
    );
    assert_eq!(reg.revision().unwrap(), rev, "no-op does not bump");

    let e = reg.add_group_member("eng", "carol").unwrap_err();
    assert_eq!(
        e.to_string(),
        "unknown user \"carol\": add it with `postern-controller user add carol`"
    );
    assert!(e.is_validation());
    let e = reg.add_group_member("nope", "alice").unwrap_err();
    assert_eq!(
        e.to_string(),
        "unknown group \"nope\": add it with `postern-controller group add nope`"
    );

    let users = reg.list_users().unwrap();
    assert_eq!(users.len(), 2);
    assert_eq!(users[0].name, "alice");
    assert_eq!(users[0].groups, vec!["eng", "ops"]);
    assert!(!users[0].disabled && !users[0].mfa_enrolled);
    assert_eq!(users[1].groups, vec!["eng"]);

    let groups = reg.list_groups().unwrap();
    assert_eq!(groups[0].name, "eng");
    assert_eq!(groups[0].members, vec!["alice", "bob@example.com"]);
    assert_eq!(groups[1].members, vec!["alice"]);

    reg.remove_group_member("eng", "alice").unwrap();
    let e = reg.remove_group_member("eng", "alice").unwrap_err();
    assert!(matches!(e, RegistryError::NotGroupMember { .. }) && e.is_validation());
    assert_eq!(
        reg.list_groups().unwrap()[0].members,
        vec!["bob@example.com"]
    );

    assert!(reg.set_user_disabled("alice", true).unwrap());
    assert!(!reg.set_user_disabled("alice", true).unwrap());
    assert!(reg.list_users().unwrap()[0].disabled);
    assert!(reg.set_user_disabled("alice", false).unwrap());
    assert!(matches!(
        reg.set_user_disabled("zed", true).unwrap_err(),
        RegistryError::UnknownUser(_)
    ));
    // The enrollment of an unknown user is refused, not auto-created.
    assert!(matches!(
        reg.enroll_totp("zed", T0).unwrap_err(),
        RegistryError::UnknownUser(_)
    ));
}

#[test]
fn device_add_auto_creates_user_and_device_rename_delete_risk() {
    let (_dir, db) = tempdir();
    let mut reg = open(&db);
    let a = reg.add_device("laptop", "alice", &pubkey(1)).unwrap();
    reg.add_device("phone", "alice", &pubkey(2)).unwrap();
    let users = reg.list_users().unwrap();
    assert_eq!(users.len(), 1, "device add created user alice once");
    assert_eq!(
        audit_actions(&reg),
        vec!["user.add", "device.add", "device.add"]
    );
    let first = &reg.list_audit(1_000).unwrap()[0];
    assert_eq!(first.detail["auto"], true);

    // Rename by name, then by id; clashes are refused.
    let rev = reg.revision().unwrap();
    let d = reg.rename_device("laptop", "laptop2").unwrap();
    assert_eq!((d.id.as_str(), d.name.as_str()), (a.id.as_str(), "laptop2"));
    assert_eq!(reg.revision().unwrap(), rev + 1);
    reg.rename_device(&a.id, "laptop3").unwrap();
    assert!(matches!(
        reg.rename_device("laptop3", "phone").unwrap_err(),
        RegistryError::DuplicateDeviceName { .. }
    ));
    assert!(reg
        .rename_device("laptop3", "bad name")
        .unwrap_err()
        .is_validation());
    assert!(matches!(
        reg.rename_device("tablet", "x").unwrap_err(),
        RegistryError::UnknownDevice(_)
    ));

    // Risk.
    reg.set_device_risk("laptop3", 80).unwrap();
    let e = reg.set_device_risk("laptop3", 101).unwrap_err();
    assert!(matches!(e, RegistryError::InvalidRisk(101)) && e.is_validation());
    let rows = reg.list_devices().unwrap();
    let laptop = rows.iter().find(|r| r.record.id == a.id).unwrap();
    assert_eq!((laptop.risk, laptop.last_mfa), (80, None));
    let rev = reg.revision().unwrap();
    reg.set_device_risk("laptop3", 80).unwrap();
    assert_eq!(reg.revision().unwrap(), rev, "same risk is a no-op");

    // Delete frees the name and the key.
    let gone = reg.delete_device("laptop3").unwrap();
    assert_eq!(gone.id, a.id);
    assert_eq!(reg.list_devices().unwrap().len(), 1);
    assert!(matches!(
        reg.delete_device("laptop3").unwrap_err(),
        RegistryError::UnknownDevice(_)
    ));
    reg.add_device("laptop3", "alice", &pubkey(1)).unwrap();

    let actions = audit_actions(&reg);
    for a in ["device.rename", "device.risk", "device.delete"] {
        assert!(actions.iter().any(|x| x == a), "{a} missing in {actions:?}");
    }
    // Snapshot (what gateways see) follows: laptop3 is the re-added device.
    let snap = reg.snapshot().unwrap();
    assert_eq!(snap.devices.len(), 2);
}

#[test]
fn audit_records_every_change_and_never_the_totp_secret() {
    let (_dir, db) = tempdir();
    let mut reg = open(&db);
    reg.set_actor("admin:uid=0");
    reg.add_user("bob").unwrap();
    reg.add_device("laptop", "alice", &pubkey(1)).unwrap();
    reg.revoke_device("laptop").unwrap();
    reg.revoke_device("laptop").unwrap(); // no-op: not audited
    reg.add_app(
        "web",
        postern_controller::proto::snapshot::AppProtocol::Tcp,
        443,
    )
    .unwrap();
    reg.add_grant("web", "carol").unwrap(); // creates user carol
    reg.add_grant("web", "carol").unwrap(); // no-op
    reg.add_group("eng").unwrap();
    reg.add_group_member("eng", "bob").unwrap();
    reg.remove_group_member("eng", "bob").unwrap();
    reg.set_user_disabled("bob", true).unwrap();
    reg.set_user_disabled("bob", false).unwrap();
    let e1 = reg.enroll_totp("bob", T0).unwrap();
    let e2 = reg.enroll_totp("bob", T0).unwrap();
    assert_ne!(
        e1.secret_base32.as_str(),
        e2.secret_base32.as_str(),
        "fresh secret each time"
    );
    // A failed change writes no audit row (the transaction rolls back).
    reg.add_user("bob").unwrap_err();

    let rows: Vec<AuditRow> = reg.list_audit(1_000).unwrap();
    let got: Vec<(&str, &str)> = rows
        .iter()
        .map(|r| (r.action.as_str(), r.subject.as_str()))
        .collect();
    assert_eq!(
        got,
        vec![
            ("user.add", "bob"),
            ("user.add", "alice"),
            ("device.add", "laptop"),
            ("device.revoke", "laptop"),
            ("app.add", "web"),
            ("user.add", "carol"),
            ("grant.add", "web"),
            ("group.add", "eng"),
            ("group.add_member", "eng"),
            ("group.remove_member", "eng"),
            ("user.disable", "bob"),
            ("user.enable", "bob"),
            ("user.mfa_enroll", "bob"),
            ("user.mfa_enroll", "bob"),
        ]
    );
    assert!(rows.iter().all(|r| r.actor == "admin:uid=0"));
    assert!(rows.windows(2).all(|w| w[0].id < w[1].id), "oldest first");
    // `limit` keeps the newest rows.
    let last2 = reg.list_audit(2).unwrap();
    assert_eq!(last2.len(), 2);
    assert_eq!(last2[1].id, rows.last().unwrap().id);

    // The secret is nowhere in the audit table, in any encoding we print.
    let raw: Vec<String> = {
        let conn = rusqlite::Connection::open(&db).unwrap();
        let mut stmt = conn
            .prepare("SELECT actor || action || subject || detail FROM audit")
            .unwrap();
        let rows = stmt.query_map([], |r| r.get(0)).unwrap();
        rows.collect::<Result<_, _>>().unwrap()
    };
    for e in [&e1, &e2] {
        let secret = e.secret_base32.as_str();
        assert!(raw
            .iter()
            .all(|r| !r.contains(secret) && !r.contains("otpauth")));
    }
}

#[test]
fn totp_good_code_accepted_sets_last_mfa_and_bumps() {
    let (_dir, db) = tempdir();
    let (mut reg, id, secret) = enrolled(&db);
    let now = T0 + 7;
    let rev = reg.revision().unwrap();
    let outcome = reg.verify_totp(&id, &code_at(&secret, now), now).unwrap();
    assert_eq!(outcome.user, "alice");
    assert_eq!(outcome.last_mfa, now);
    assert_eq!(reg.revision().unwrap(), rev + 1);
    let row = reg.list_devices().unwrap().remove(0);
    assert_eq!(row.last_mfa, Some(now));
    assert!(reg.list_users().unwrap()[0].mfa_enrolled);
    let last = reg.list_audit(1).unwrap().remove(0);
    assert_eq!(
        (last.action.as_str(), last.subject.as_str()),
        ("mfa.ok", "alice")
    );
    assert_eq!(last.actor, format!("device:{id}"));

    // ±1 step skew: the previous step's code is accepted once, at the next step.
    let later = T0 + 95; // step T0/30 + 3
    let prev_code = code_at(&secret, later - 30);
    reg.verify_totp(&id, &prev_code, later).unwrap();
    // The next step's code (clock ahead) is accepted too.
    let next_code = code_at(&secret, later + 30);
    reg.verify_totp(&id, &next_code, later).unwrap();
    // Two steps old is outside the window.
    let stale = code_at(&secret, T0 + 300 - 60);
    assert!(matches!(
        reg.verify_totp(&id, &stale, T0 + 300).unwrap_err(),
        TotpError::WrongCode { .. }
    ));
}

#[test]
fn totp_wrong_and_replayed_codes_refused() {
    let (_dir, db) = tempdir();
    let (mut reg, id, secret) = enrolled(&db);
    let now = T0 + 3;
    let e = reg
        .verify_totp(&id, &wrong_code(&secret, now), now)
        .unwrap_err();
    assert!(
        matches!(e, TotpError::WrongCode { remaining } if remaining == MAX_TOTP_FAILURES - 1),
        "{e}"
    );
    assert!(e.to_string().contains("4 attempts left"), "{e}");
    assert_eq!(reg.list_devices().unwrap()[0].last_mfa, None);

    let good = code_at(&secret, now);
    reg.verify_totp(&id, &good, now).unwrap();
    // Same code again, in the same step and in the next one: replay.
    let e = reg.verify_totp(&id, &good, now + 1).unwrap_err();
    assert!(matches!(e, TotpError::Replayed), "{e}");
    let e = reg.verify_totp(&id, &good, now + 30).unwrap_err();
    assert!(matches!(e, TotpError::Replayed), "{e}");
    // An older step's code is a replay too (step <= last accepted).
    let e = reg
        .verify_totp(&id, &code_at(&secret, now - 30), now)
        .unwrap_err();
    assert!(matches!(e, TotpError::Replayed), "{e}");
    // The next step's fresh code works.
    reg.verify_totp(&id, &code_at(&secret, now + 30), now + 30)
        .unwrap();
    // Replays survive reopening (persisted last step).
    drop(reg);
    let mut reg = open(&db);
    let e = reg
        .verify_totp(&id, &code_at(&secret, now + 30), now + 31)
        .unwrap_err();
    assert!(matches!(e, TotpError::Replayed), "{e}");

    let fails: Vec<AuditRow> = reg
        .list_audit(100)
        .unwrap()
        .into_iter()
        .filter(|r| r.action == "mfa.fail")
        .collect();
    let reasons: Vec<&str> = fails
        .iter()
        .map(|r| r.detail["reason"].as_str().unwrap())
        .collect();
    assert_eq!(
        reasons,
        vec!["wrong_code", "replayed", "replayed", "replayed", "replayed"]
    );
    assert!(fails
        .iter()
        .all(|r| r.subject == "alice" && r.detail["device"] == id.as_str()));
}

#[test]
fn totp_lockout_after_five_failures_survives_reopen_and_ends_with_window() {
    let (_dir, db) = tempdir();
    let (mut reg, id, secret) = enrolled(&db);
    let start = T0 + 10;
    for i in 0..MAX_TOTP_FAILURES {
        let now = start + u64::from(i);
        let e = reg
            .verify_totp(&id, &wrong_code(&secret, now), now)
            .unwrap_err();
        assert!(
            matches!(e, TotpError::WrongCode { remaining } if remaining == MAX_TOTP_FAILURES - 1 - i),
            "attempt {i}: {e}"
        );
    }
    // Locked: even the correct code is refused, and says how long to wait.
    let now = start + 20;
    let e = reg
        .verify_totp(&id, &code_at(&secret, now), now)
        .unwrap_err();
    let window_end = start + TOTP_WINDOW_SECS;
    assert!(
        matches!(e, TotpError::Locked { retry_after_secs } if retry_after_secs == window_end - now),
        "{e}"
    );
    assert!(e.to_string().contains("try again in"), "{e}");
    // The lock is in the database, not in memory.
    drop(reg);
    let mut reg = open(&db);
    let now = window_end - 1;
    let e = reg
        .verify_totp(&id, &code_at(&secret, now), now)
        .unwrap_err();
    assert!(
        matches!(
            e,
            TotpError::Locked {
                retry_after_secs: 1
            }
        ),
        "{e}"
    );
    assert_eq!(reg.list_devices().unwrap()[0].last_mfa, None);
    // After the window a correct code works again, and the counter starts over.
    let now = window_end + 40;
    reg.verify_totp(&id, &code_at(&secret, now), now).unwrap();
    let now = now + 60;
    let e = reg
        .verify_totp(&id, &wrong_code(&secret, now), now)
        .unwrap_err();
    assert!(
        matches!(e, TotpError::WrongCode { remaining } if remaining == MAX_TOTP_FAILURES - 1),
        "{e}"
    );
    // Failures spread over more than one window do not add up to a lock.
    let mut now = now + TOTP_WINDOW_SECS;
    for _ in 0..MAX_TOTP_FAILURES - 1 {
        reg.verify_totp(&id, &wrong_code(&secret, now), now)
            .unwrap_err();
        now += 1;
    }
    let now = now + TOTP_WINDOW_SECS;
    reg.verify_totp(&id, &wrong_code(&secret, now), now)
        .unwrap_err();
    reg.verify_totp(&id, &code_at(&secret, now + 30), now + 30)
        .unwrap();
    let reasons: Vec<String> = reg
        .list_audit(1_000)
        .unwrap()
        .into_iter()
        .filter(|r| r.action == "mfa.fail")
        .map(|r| r.detail["reason"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(reasons.iter().filter(|r| *r == "locked").count(), 2);
}

#[test]
fn totp_refused_for_disabled_user_revoked_unknown_device_and_unenrolled() {
    let (_dir, db) = tempdir();
    let (mut reg, id, secret) = enrolled(&db);
    let now = T0 + 1;
    let code = code_at(&secret, now);

    reg.set_user_disabled("alice", true).unwrap();
    let e = reg.verify_totp(&id, &code, now).unwrap_err();
    assert!(
        matches!(e, TotpError::UserDisabled(ref u) if u == "alice"),
        "{e}"
    );
    reg.set_user_disabled("alice", false).unwrap();

    let e = reg.verify_totp(&"0".repeat(32), &code, now).unwrap_err();
    assert!(matches!(e, TotpError::UnknownDevice(_)), "{e}");
    let e = reg.verify_totp("laptop", &code, now).unwrap_err();
    assert!(
        matches!(e, TotpError::UnknownDevice(_)),
        "device names are not ids: {e}"
    );

    let bob = reg.add_device("bob-pc", "bob", &pubkey(2)).unwrap();
    let e = reg.verify_totp(&bob.id, &code, now).unwrap_err();
    assert!(
        matches!(e, TotpError::NotEnrolled(ref u) if u == "bob"),
        "{e}"
    );
    assert!(
        e.to_string().contains("postern-controller user mfa bob"),
        "{e}"
    );

    reg.revoke_device("laptop").unwrap();
    let e = reg.verify_totp(&id, &code, now).unwrap_err();
    assert!(matches!(e, TotpError::DeviceRevoked(_)), "{e}");
    assert_eq!(reg.list_devices().unwrap()[1].last_mfa, None);

    // Refusals before the code check do not count against the rate limit.
    reg.add_device("laptop-new", "alice", &pubkey(3)).unwrap();
    let new_id = reg.list_devices().unwrap()[2].record.id.clone();
    let e = reg
        .verify_totp(&new_id, &wrong_code(&secret, now), now)
        .unwrap_err();
    assert!(
        matches!(e, TotpError::WrongCode { remaining } if remaining == MAX_TOTP_FAILURES - 1),
        "{e}"
    );
}

#[test]
fn totp_malformed_codes_refused_without_panic() {
    let (_dir, db) = tempdir();
    let (first, id, secret) = enrolled(&db);
    drop(first);
    let now = T0 + 12;
    let good = code_at(&secret, now);
    let with_space = format!("{} {}", &good[..3], &good[3..]);
    let padded = format!(" {good}");
    let fullwidth: String = good
        .chars()
        .map(|c| char::from_u32(c as u32 - '0' as u32 + 0xFF10).unwrap())
        .collect();
    for bad in [
        "",
        "12345",
        "1234567",
        "abcdef",
        "١٢٣٤٥٦",
        fullwidth.as_str(),
        "12\u{0}456",
        "-12345",
        with_space.as_str(),
        padded.as_str(),
    ] {
        let mut reg = open(&db);
        // Reset the counter so the lock never hides the outcome.
        reg.enroll_totp("alice", now).unwrap();
        let e = reg.verify_totp(&id, bad, now).unwrap_err();
        assert!(matches!(e, TotpError::WrongCode { .. }), "{bad:?}: {e}");
    }
    // Absurd clocks do not panic either.
    let mut reg = open(&db);
    for t in [0, u64::MAX] {
        let e = reg.verify_totp(&id, &good, t).unwrap_err();
        assert!(matches!(e, TotpError::WrongCode { .. }), "{t}: {e}");
    }
    // And the device still has no MFA recorded.
    assert_eq!(reg.list_devices().unwrap()[0].last_mfa, None);
}

#[test]
fn reenrollment_invalidates_old_secret() {
    let (_dir, db) = tempdir();
    let (mut reg, id, old) = enrolled(&db);
    let new = reg.enroll_totp("alice", T0).unwrap();
    let now = T0 + 60;
    let e = reg.verify_totp(&id, &code_at(&old, now), now);
    // The old secret's code could collide with the new one by chance (1e-6): tolerate only that.
    if code_at(&old, now) != code_at(new.secret_base32.as_str(), now) {
        assert!(matches!(e, Err(TotpError::WrongCode { .. })), "{e:?}");
    }
    reg.verify_totp(
        &id,
        &code_at(new.secret_base32.as_str(), now + 30),
        now + 30,
    )
    .unwrap();
}

// ---- CLI through the real binary ----

/// Asserts a failure with exit code 2 and exactly one stderr line containing `needle`.
fn fails2(db: &std::path::Path, args: &[&str], needle: &str) {
    common::fails(db, args, 2, needle);
}

#[test]
fn cli_users_groups_devices_audit() {
    let (_dir, db) = tempdir();
    let db = db.as_path();
    assert_eq!(ok(db, &["user", "add", "alice"]), "added user \"alice\"\n");
    fails2(
        db,
        &["user", "add", "alice"],
        "user \"alice\" already exists",
    );
    fails2(db, &["user", "add", "a b"], "user name \"a b\" is invalid");
    ok(db, &["group", "add", "eng"]);
    ok(db, &["group", "add-member", "eng", "alice"]);
    fails2(
        db,
        &["group", "add-member", "eng", "bob"],
        "unknown user \"bob\": add it with `postern-controller user add bob`",
    );
    fails2(
        db,
        &["group", "add-member", "nope", "alice"],
        "unknown group \"nope\"",
    );
    fails2(
        db,
        &["group", "remove-member", "eng", "zed"],
        "unknown user \"zed\"",
    );

    let table = ok(db, &["user", "list"]);
    let lines: Vec<&str> = table.lines().collect();
    assert!(
        lines[0].starts_with("NAME") && lines[0].contains("MFA"),
        "{table}"
    );
    assert!(
        lines[1].starts_with("alice") && lines[1].contains("eng"),
        "{table}"
    );
    let users: serde_json::Value =
        serde_json::from_str(&ok(db, &["user", "list", "--json"])).unwrap();
    assert_eq!(users[0]["name"], "alice");
    assert_eq!(users[0]["groups"][0], "eng");
    assert_eq!(users[0]["mfa_enrolled"], false);
    let groups: serde_json::Value =
        serde_json::from_str(&ok(db, &["group", "list", "--json"])).unwrap();
    assert_eq!(groups[0]["members"][0], "alice");
    assert!(ok(db, &["group", "list"]).contains("alice"));
    ok(db, &["group", "remove-member", "eng", "alice"]);

    assert_eq!(
        ok(db, &["user", "disable", "alice"]),
        "disabled user \"alice\"\n"
    );
    assert!(ok(db, &["user", "disable", "alice"]).contains("already disabled"));
    assert!(ok(db, &["user", "list"]).contains("disabled"));
    ok(db, &["user", "enable", "alice"]);
    fails2(db, &["user", "disable", "zed"], "unknown user \"zed\"");

    // device add with a new user creates it; device list keeps its old fields and adds new.
    let id = ok(
        db,
        &["device", "add", "laptop", "--user", "bob", "--key", &key(1)],
    );
    let id = id.trim();
    ok(db, &["device", "risk", "laptop", "70"]);
    fails2(
        db,
        &["device", "risk", "laptop", "101"],
        "use a risk score from 0",
    );
    fails2(
        db,
        &["device", "risk", "tablet", "1"],
        "no device named or with id \"tablet\"",
    );
    let out = ok(db, &["device", "rename", "laptop", "laptop2"]);
    assert!(out.contains("laptop2"), "{out}");
    fails2(
        db,
        &["device", "rename", "laptop2", "no way"],
        "device name \"no way\" is invalid",
    );
    let list = ok(db, &["device", "list", "--json"]);
    let recs: Vec<DeviceRecord> = serde_json::from_str(&list).unwrap();
    assert_eq!(
        (recs[0].id.as_str(), recs[0].name.as_str()),
        (id, "laptop2")
    );
    let json: serde_json::Value = serde_json::from_str(&list).unwrap();
    assert_eq!(json[0]["risk"], 70);
    assert_eq!(json[0]["last_mfa"], serde_json::Value::Null);
    assert_eq!(json[0]["user"], "bob");
    let table = ok(db, &["device", "list"]);
    assert!(
        table.lines().next().unwrap().contains("LAST MFA"),
        "{table}"
    );
    assert!(table.contains("never") && table.contains("70"), "{table}");
    let users = ok(db, &["user", "list"]);
    assert!(users.contains("bob"), "{users}");

    // MFA enrollment: JSON holds the secret once; the audit trail never does.
    let mfa: serde_json::Value =
        serde_json::from_str(&ok(db, &["user", "mfa", "bob", "--json"])).unwrap();
    let secret = mfa["secret"].as_str().unwrap().to_owned();
    assert_eq!(secret.len(), 32, "20 bytes base32 unpadded");
    assert_eq!(mfa["user"], "bob");
    assert!(mfa["uri"]
        .as_str()
        .unwrap()
        .starts_with("otpauth://totp/Postern:bob?secret="));
    let qr = ok(db, &["user", "mfa", "bob"]);
    assert!(
        qr.contains('▀') || qr.contains('▄'),
        "QR rendered with half blocks"
    );
    assert!(qr.contains("otpauth://totp/Postern:bob?secret="));
    fails2(db, &["user", "mfa", "zed"], "unknown user \"zed\"");

    ok(db, &["device", "delete", id]);
    fails2(db, &["device", "delete", id], "no device named or with id");

    let audit = ok(db, &["audit", "list", "--json", "--limit", "1000"]);
    assert!(!audit.contains(&secret) && !audit.contains("otpauth"));
    let rows: Vec<AuditRow> = serde_json::from_str(&audit).unwrap();
    let actions: Vec<&str> = rows.iter().map(|r| r.action.as_str()).collect();
    for a in [
        "user.add",
        "group.add",
        "group.add_member",
        "group.remove_member",
        "user.disable",
        "user.enable",
        "device.add",
        "device.risk",
        "device.rename",
        "user.mfa_enroll",
        "device.delete",
    ] {
        assert!(actions.contains(&a), "{a} missing: {actions:?}");
    }
    assert!(rows.iter().all(|r| r.actor == "admin"));
    let table = ok(db, &["audit", "list", "--limit", "2"]);
    assert_eq!(table.lines().count(), 3, "{table}");
    assert!(table.contains("device.delete"), "{table}");
    fails2(db, &["audit", "list", "--limit", "0"], "--limit");
}

#[test]
fn cli_help_has_examples() {
    let (_dir, db) = tempdir();
    for args in [
        &["user", "--help"][..],
        &["user", "add", "--help"],
        &["user", "list", "--help"],
        &["user", "disable", "--help"],
        &["user", "enable", "--help"],
        &["user", "mfa", "--help"],
        &["group", "--help"],
        &["group", "add", "--help"],
        &["group", "list", "--help"],
        &["group", "add-member", "--help"],
        &["group", "remove-member", "--help"],
        &["device", "rename", "--help"],
        &["device", "delete", "--help"],
        &["device", "risk", "--help"],
        &["audit", "--help"],
        &["audit", "list", "--help"],
    ] {
        let out = ok(&db, args);
        assert!(out.contains("Example"), "{args:?}: {out}");
    }
}

#[test]
fn cli_through_running_controller_records_admin_uid_as_actor() {
    let (dir, db) = tempdir();
    let sock = dir.path().join("g.sock");
    let mut serve = common::spawn_serve(&db, &sock, 60_000);
    let admin = postern_controller::admin::default_socket(&db);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !admin.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "admin socket {admin:?} did not appear"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    ok(&db, &["user", "add", "dana"]);
    ok(&db, &["--direct", "group", "add", "ops"]);
    let rows: Vec<AuditRow> = serde_json::from_str(&ok(&db, &["audit", "list", "--json"])).unwrap();
    let pid = serve.id().to_string();
    std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    serve.wait().unwrap();
    let uid = std::fs::metadata("/proc/self").map(|m| {
        use std::os::unix::fs::MetadataExt as _;
        m.uid()
    });
    let uid = uid.unwrap();
    let actors: Vec<(&str, &str)> = rows
        .iter()
        .map(|r| (r.action.as_str(), r.actor.as_str()))
        .collect();
    assert_eq!(
        actors,
        vec![
            ("user.add", format!("admin:uid={uid}").as_str()),
            ("group.add", "admin"),
        ]
    );
}

#[test]
fn a_disabled_users_grants_leave_the_snapshot_until_enabled() {
    let (_dir, db) = tempdir();
    let mut reg = Registry::open(&db).expect("open registry");
    reg.add_app(
        "web",
        postern_controller::proto::snapshot::AppProtocol::Tcp,
        443,
    )
    .expect("add app");
    reg.add_grant("web", "alice").expect("grant alice");
    reg.add_grant("web", "bob").expect("grant bob");
    let users = |reg: &mut Registry| -> Vec<String> {
        let mut u: Vec<String> = reg
            .snapshot()
            .expect("snapshot")
            .grants
            .into_iter()
            .map(|g| g.user)
            .collect();
        u.sort();
        u
    };
    assert_eq!(users(&mut reg), ["alice", "bob"]);
    let before = reg.revision().expect("revision");
    assert!(reg.set_user_disabled("bob", true).expect("disable bob"));
    assert!(
        reg.revision().expect("revision") > before,
        "gateways must hear of it"
    );
    assert_eq!(users(&mut reg), ["alice"]);
    assert_eq!(
        reg.list_grants().expect("grants").len(),
        2,
        "the grant itself stays"
    );
    assert!(reg.set_user_disabled("bob", false).expect("enable bob"));
    assert_eq!(users(&mut reg), ["alice", "bob"]);
}
