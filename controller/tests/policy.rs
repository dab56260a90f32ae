//! Policy and posture in the controller (`policy_store`, `policy ...` and
//! `device posture` commands) against real SQLite files: storing reports, applying
//! policies (dry run, unknown apps, warnings, unchanged), the snapshot's access records
//! and their `until`, the periodic re-evaluation, and the CLI through the real binary.
//!
//! Owns: tests only. Must not touch: files outside the per-test tempdir.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;

use common::{fails, key, ok, spawn_serve, tempdir, Client};
use postern_controller::policy_store::{AccessWatch, PolicyStoreError};
use postern_controller::proto::keys::DevicePublicKey;
use postern_controller::proto::snapshot::{AccessRecord, AppProtocol};
use postern_controller::registry::Registry;
use postern_policy::Timestamp;

const POLICY: &str = r#"
[[requirement]]
name = "disk"
disk_encryption = true
remediation = "Turn on full-disk encryption (LUKS, FileVault or BitLocker)"

[[rule]]
name = "web-healthy"
effect = "allow"
apps = ["web"]
groups = ["eng"]
posture = ["disk"]

[[rule]]
name = "ssh-admins"
effect = "allow"
apps = ["ssh"]
users = ["alice"]
mfa_max_age = "1h"

[[rule]]
name = "db-office"
effect = "allow"
apps = ["db"]
users = ["*"]
source_networks = ["10.0.0.0/8"]
"#;

/// Now, as the tests see it: the reports below expire relative to it.
fn now_secs() -> u64 {
    u64::try_from(Timestamp::now().as_second()).unwrap()
}

fn report(disk: bool) -> String {
    format!(
        r#"{{"collected_at":"{}","os_family":"linux","kernel":"6.8.0","disk_encrypted":{disk},"processes":["sshd"]}}"#,
        Timestamp::now()
    )
}

/// Registry with apps web/ssh/db, devices good (alice) and bad (bob), both in group eng.
fn setup(db: &Path) -> (Registry, String, String) {
    let mut reg = Registry::open(db).unwrap();
    reg.add_app("web", AppProtocol::Tcp, 443).unwrap();
    reg.add_app("ssh", AppProtocol::Tcp, 22).unwrap();
    reg.add_app("db", AppProtocol::Tcp, 5432).unwrap();
    let good = reg
        .add_device(
            "good",
            "alice",
            &DevicePublicKey::from_text(&key(1)).unwrap(),
        )
        .unwrap()
        .id;
    let bad = reg
        .add_device("bad", "bob", &DevicePublicKey::from_text(&key(2)).unwrap())
        .unwrap()
        .id;
    reg.add_group("eng").unwrap();
    reg.add_group_member("eng", "alice").unwrap();
    reg.add_group_member("eng", "bob").unwrap();
    (reg, good, bad)
}

fn audit_actions(db: &Path) -> Vec<(String, String, String)> {
    let conn = rusqlite::Connection::open(db).unwrap();
    let mut stmt = conn
        .prepare("SELECT actor, action, subject FROM audit ORDER BY id")
        .unwrap();
    stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

#[test]
fn posture_reports_are_validated_stored_replaced_and_audited() {
    let (_dir, db) = tempdir();
    let (mut reg, good, _) = setup(&db);
    let now = now_secs();
    assert!(reg.posture_report(&good).unwrap().is_none());
    let rev = reg.revision().unwrap();
    let stored = reg
        .store_posture_report(&good, &report(false), now, now + 3600)
        .unwrap();
    assert!(!stored.report.facts.disk_encrypted);
    assert_eq!(reg.revision().unwrap(), rev + 1);
    // A newer report replaces the old one (by name works too).
    reg.store_posture_report("good", &report(true), now + 1, now + 3601)
        .unwrap();
    let back = reg.posture_report(&good).unwrap().unwrap();
    assert!(back.report.facts.disk_encrypted);
    assert_eq!((back.received_at, back.expires_at), (now + 1, now + 3601));
    assert_eq!(reg.revision().unwrap(), rev + 2);
    let audited: Vec<_> = audit_actions(&db)
        .into_iter()
        .filter(|(_, a, _)| a == "posture.report")
        .collect();
    assert_eq!(audited.len(), 2);
    assert_eq!(audited[0].0, format!("device:{good}"));
    // Refused: bad JSON, unknown device, expiry not after receipt. Nothing changes.
    let e = reg
        .store_posture_report(&good, r#"{"collected_at":"x"}"#, now, now + 1)
        .unwrap_err();
    assert!(
        matches!(e, PolicyStoreError::Report(_)) && e.is_validation(),
        "{e}"
    );
    assert!(e.to_string().contains("collected_at"), "{e}");
    let e = reg
        .store_posture_report("nope", &report(true), now, now + 1)
        .unwrap_err();
    assert!(matches!(e, PolicyStoreError::UnknownDevice(_)), "{e}");
    let e = reg
        .store_posture_report(&good, &report(true), now, now)
        .unwrap_err();
    assert!(matches!(e, PolicyStoreError::BadExpiry { .. }), "{e}");
    // Facts collected more than 5 minutes ahead of receipt (device clock), or before the
    // lifetime they would get, are refused.
    let e = reg
        .store_posture_report(&good, &report(true), now - 301, now + 3600)
        .unwrap_err();
    assert!(
        matches!(e, PolicyStoreError::ReportFromFuture { .. }) && e.is_validation(),
        "{e}"
    );
    assert!(e.to_string().contains("clock"), "{e}");
    reg.store_posture_report(&good, &report(true), now - 200, now + 3600)
        .expect("200 s of device clock skew is accepted");
    let e = reg
        .store_posture_report(&good, &report(true), now + 60, now + 120)
        .unwrap_err();
    assert!(
        matches!(e, PolicyStoreError::StaleReport { .. }) && e.is_validation(),
        "{e}"
    );
    assert!(e.to_string().contains("collect the facts again"), "{e}");
    assert_eq!(reg.revision().unwrap(), rev + 3);
}

#[test]
fn apply_checks_apps_warns_on_unknown_subjects_and_stores_atomically() {
    let (_dir, db) = tempdir();
    let (mut reg, _, _) = setup(&db);
    // A rule naming an unregistered app is refused, naming rule, app and the fix.
    let unknown = POLICY.replace(r#"apps = ["ssh"]"#, r#"apps = ["ssh", "vault"]"#);
    let rev = reg.revision().unwrap();
    let e = reg.apply_policy(&unknown, now_secs()).unwrap_err();
    let msg = e.to_string();
    assert!(e.is_validation(), "{msg}");
    assert!(
        msg.contains("\"ssh-admins\"")
            && msg.contains("\"vault\"")
            && msg.contains("app add vault"),
        "{msg}"
    );
    assert!(reg.stored_policy().unwrap().is_none());
    assert_eq!(reg.revision().unwrap(), rev);
    // A bad file: the parser's one-line error naming rule and field.
    let e = reg
        .apply_policy(
            &POLICY.replace("effect = \"allow\"", "effect = \"maybe\""),
            1,
        )
        .unwrap_err();
    assert!(matches!(e, PolicyStoreError::Policy(_)), "{e}");
    assert!(e.to_string().contains("effect"), "{e}");
    // Unknown users and groups only warn.
    let plan = reg
        .plan_policy(&POLICY.replace(r#"users = ["alice"]"#, r#"users = ["alice", "zoe"]"#))
        .unwrap();
    assert_eq!(plan.warnings.len(), 1, "{:?}", plan.warnings);
    assert!(plan.warnings[0].contains("\"zoe\""), "{:?}", plan.warnings);
    // The plan (dry run) changes nothing; apply stores, bumps once, audits.
    let plan = reg.plan_policy(POLICY).unwrap();
    assert_eq!(plan.diff.rules_added.len(), 3);
    assert!(!plan.unchanged);
    assert_eq!(reg.revision().unwrap(), rev);
    let applied = reg.apply_policy(POLICY, 1_800_000_000).unwrap();
    assert_eq!(reg.revision().unwrap(), rev + 1);
    let stored = reg.stored_policy().unwrap().unwrap();
    assert_eq!(stored.source, POLICY);
    assert_eq!(stored.sha256, applied.sha256);
    assert_eq!(stored.applied_at, 1_800_000_000);
    assert!(audit_actions(&db)
        .iter()
        .any(|(_, a, s)| a == "policy.apply" && s == "policy"));
    // The same text again: unchanged, no bump. A change diffs against the stored set.
    assert!(reg.apply_policy(POLICY, 1).unwrap().unchanged);
    assert_eq!(reg.revision().unwrap(), rev + 1);
    let changed = POLICY.replace("mfa_max_age = \"1h\"", "mfa_max_age = \"2h\"");
    let plan = reg.plan_policy(&changed).unwrap();
    assert_eq!(plan.diff.rules_changed.len(), 1);
    assert_eq!(plan.diff.rules_changed[0].name, "ssh-admins");
}

/// Records an MFA proof for `device` at unix second `at` (as `postern login` does).
fn set_last_mfa(db: &Path, device: &str, at: u64) {
    rusqlite::Connection::open(db)
        .unwrap()
        .execute(
            "UPDATE devices SET last_mfa = ?1 WHERE id = ?2",
            rusqlite::params![i64::try_from(at).unwrap(), device],
        )
        .unwrap();
}

#[test]
fn snapshot_access_follows_policy_posture_mfa_and_time() {
    let (_dir, db) = tempdir();
    let (mut reg, good, bad) = setup(&db);
    // No policy: legacy mode.
    assert_eq!(reg.snapshot().unwrap().access, None);
    let now = now_secs();
    reg.store_posture_report(&good, &report(true), now, now + 600)
        .unwrap();
    reg.store_posture_report(&bad, &report(false), now, now + 600)
        .unwrap();
    // alice proved MFA 30 minutes ago: ssh until 30 minutes from now (+1 s).
    set_last_mfa(&db, &good, now - 1800);
    reg.apply_policy(POLICY, now).unwrap();
    let access = reg.snapshot().unwrap().access.unwrap();
    let want = |device: &str, app: &str, until: u64| AccessRecord {
        device: device.to_owned(),
        app: app.to_owned(),
        until: Some(until),
    };
    let mut expected = vec![
        want(&good, "web", now + 600),
        want(&good, "ssh", now + 1801),
    ];
    expected.sort();
    // bad: disk encryption off -> no web; no MFA -> no ssh; db needs a source network.
    assert_eq!(access, expected);

    // Time alone changes the set: at report expiry web goes, and AccessWatch bumps.
    let mut watch = AccessWatch::default();
    let ts = |s: u64| Timestamp::from_second(i64::try_from(s).unwrap()).unwrap();
    assert!(!watch.check(&mut reg, ts(now + 10)).unwrap());
    let rev = reg.revision().unwrap();
    assert!(!watch.check(&mut reg, ts(now + 20)).unwrap());
    assert_eq!(reg.revision().unwrap(), rev);
    assert!(watch.check(&mut reg, ts(now + 600)).unwrap());
    assert_eq!(reg.revision().unwrap(), rev + 1);
    let later = reg.access_records(ts(now + 600)).unwrap().unwrap();
    assert_eq!(later, vec![want(&good, "ssh", now + 1801)]);

    // A revoked device gets no record; a policy that grants nothing is still policy mode.
    reg.revoke_device("good").unwrap();
    assert_eq!(reg.snapshot().unwrap().access, Some(vec![]));
}

/// Asserts a failure with exit `code` and exactly one stderr line containing `needle`.

#[test]
fn cli_apply_dry_run_show_explain_and_posture() {
    let (dir, db) = tempdir();
    let (mut reg, _, bad) = setup(&db);
    let now = now_secs();
    reg.store_posture_report("good", &report(true), now, now + 3600)
        .unwrap();
    reg.store_posture_report("bad", &report(false), now, now + 3600)
        .unwrap();
    drop(reg);
    let file = dir.path().join("policy.toml");
    std::fs::write(&file, POLICY).unwrap();
    let file = file.to_str().unwrap();

    let out = ok(&db, &["policy", "show"]);
    assert!(out.starts_with("no policy applied"), "{out}");
    // Dry run: the diff, nothing stored.
    let out = ok(&db, &["policy", "apply", file, "--dry-run"]);
    assert!(out.contains("+ rule \"web-healthy\""), "{out}");
    assert!(out.contains("+ requirement \"disk\""), "{out}");
    assert!(out.contains("dry run: nothing changed"), "{out}");
    assert!(ok(&db, &["policy", "show"]).starts_with("no policy applied"));
    let json: serde_json::Value =
        serde_json::from_str(&ok(&db, &["policy", "apply", file, "--dry-run", "--json"])).unwrap();
    assert_eq!(json["applied"], false);
    assert_eq!(json["diff"]["rules_added"].as_array().unwrap().len(), 3);
    // Apply, then show.
    let out = ok(&db, &["policy", "apply", file]);
    assert!(out.contains("applied policy sha256"), "{out}");
    let out = ok(&db, &["policy", "show"]);
    assert!(out.contains("name = \"web-healthy\""), "{out}");
    let json: serde_json::Value =
        serde_json::from_str(&ok(&db, &["policy", "show", "--json"])).unwrap();
    assert_eq!(json["source"], POLICY);
    let out = ok(&db, &["policy", "apply", file]);
    assert!(
        out.contains("no changes") && out.contains("policy unchanged"),
        "{out}"
    );

    // Explain: every step, the failing requirement and its remediation.
    let out = ok(
        &db,
        &["policy", "explain", "--device", "bad", "--app", "web"],
    );
    assert!(out.contains("rule \"web-healthy\""), "{out}");
    assert!(out.contains("=> deny"), "{out}");
    assert!(out.contains("failing requirement: disk"), "{out}");
    assert!(
        out.contains("remediation: Turn on full-disk encryption (LUKS, FileVault or BitLocker)"),
        "{out}"
    );
    let out = ok(
        &db,
        &["policy", "explain", "--device", "good", "--app", "web"],
    );
    assert!(out.contains("=> allow by rule \"web-healthy\""), "{out}");
    // --from evaluates source networks; --at takes RFC 3339.
    let out = ok(
        &db,
        &[
            "policy",
            "explain",
            "--device",
            &bad,
            "--app",
            "db",
            "--from",
            "10.1.2.3",
            "--at",
            "2026-11-23T12:00:00+01:00",
        ],
    );
    assert!(out.contains("=> allow by rule \"db-office\""), "{out}");
    let json: serde_json::Value = serde_json::from_str(&ok(
        &db,
        &[
            "policy", "explain", "--device", "bad", "--app", "web", "--json",
        ],
    ))
    .unwrap();
    assert_eq!(json["decision"]["verdict"], "deny");
    assert_eq!(json["decision"]["requirement"], "disk");
    assert!(json["steps"].as_array().unwrap().len() >= 4);

    // device posture: facts with age, verdict per app with requirement and remediation.
    let out = ok(&db, &["device", "posture", "bad"]);
    assert!(out.contains("disk_encrypted:      false"), "{out}");
    assert!(out.contains("expires in"), "{out}");
    assert!(out.contains("web: deny"), "{out}");
    assert!(out.contains("failing requirement: disk"), "{out}");
    assert!(
        out.contains("remediation: Turn on full-disk encryption"),
        "{out}"
    );
    assert!(out.contains("db: deny"), "{out}");
    let json: serde_json::Value =
        serde_json::from_str(&ok(&db, &["device", "posture", "good", "--json"])).unwrap();
    assert_eq!(json["report"]["facts"]["disk_encrypted"], true);
    let web = json["apps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["app"] == "web")
        .unwrap();
    assert_eq!(web["verdict"], "allow");

    // Validation failures: one line, exit 2.
    let broken = dir.path().join("broken.toml");
    std::fs::write(
        &broken,
        POLICY.replace("posture = [\"disk\"]", "posture = [\"dsk\"]"),
    )
    .unwrap();
    fails(
        &db,
        &["policy", "apply", broken.to_str().unwrap()],
        2,
        "dsk",
    );
    let unknown = dir.path().join("unknown.toml");
    std::fs::write(
        &unknown,
        POLICY.replace("apps = [\"db\"]", "apps = [\"vault\"]"),
    )
    .unwrap();
    fails(
        &db,
        &["policy", "apply", unknown.to_str().unwrap()],
        2,
        "app add vault",
    );
    fails(
        &db,
        &["policy", "apply", "/nonexistent/p.toml"],
        2,
        "cannot read policy file",
    );
    fails(
        &db,
        &["policy", "explain", "--device", "bad", "--app", "nope"],
        2,
        "no app named \"nope\"",
    );
    fails(
        &db,
        &["policy", "explain", "--device", "ghost", "--app", "web"],
        2,
        "ghost",
    );
    fails(
        &db,
        &[
            "policy", "explain", "--device", "bad", "--app", "web", "--at", "noon",
        ],
        2,
        "--at",
    );
    fails(
        &db,
        &[
            "policy", "explain", "--device", "bad", "--app", "web", "--from", "10.0.0",
        ],
        2,
        "--from",
    );
    fails(&db, &["device", "posture", "ghost"], 2, "ghost");
    // The stored policy is still the good one.
    assert!(ok(&db, &["policy", "show"]).contains("db-office"));
}

/// The running sync server re-evaluates the policy by itself: when a posture report
/// expires, a gateway waiting on the current revision gets a new snapshot without the
/// record, with no admin write in between.
#[test]
fn serve_bumps_the_revision_when_a_report_expires() {
    let (dir, db) = tempdir();
    let (mut reg, good, _) = setup(&db);
    let now = now_secs();
    // Expires 3 s from now (whole seconds: 2-3 s of validity).
    reg.store_posture_report(&good, &report(true), now, now + 3)
        .unwrap();
    reg.apply_policy(POLICY, now).unwrap();
    drop(reg);
    let socket = dir.path().join("ctl.sock");
    let mut child = spawn_serve(&db, &socket, 10_000);
    let mut client = Client::connect(&socket);
    let first = client.sync(0);
    let access = first.access.clone().unwrap();
    assert!(
        access
            .iter()
            .any(|r| r.device == good && r.app == "web" && r.until == Some(now + 3)),
        "{access:?}"
    );
    // Long-poll on the current revision: the answer must be a newer revision without the
    // web record, within the expiry + one re-check interval (+ margin).
    let started = std::time::Instant::now();
    let mut latest = first;
    while latest
        .access
        .as_ref()
        .unwrap()
        .iter()
        .any(|r| r.app == "web")
    {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(12),
            "no snapshot without the expired record: {latest:?}"
        );
        latest = client.sync(latest.revision);
    }
    assert!(started.elapsed() < std::time::Duration::from_secs(12));
    child.kill().unwrap();
    child.wait().unwrap();
}

#[test]
fn help_texts_have_examples() {
    let (_dir, db) = tempdir();
    for args in [
        &["policy", "apply", "--help"][..],
        &["policy", "show", "--help"],
        &["policy", "explain", "--help"],
        &["device", "posture", "--help"],
    ] {
        let out = ok(&db, args);
        assert!(out.contains("Example"), "{args:?}: {out}");
    }
}

/// `Snapshot::denials`: a hint only for pairs the device can fix (posture requirement with
/// its remediation, MFA too old), none for "no rule" or source-network rules.
#[test]
fn snapshot_denials_name_the_failing_requirement_and_mfa_age() {
    use postern_controller::proto::snapshot::DenialHint;
    let (_dir, db) = tempdir();
    let (mut reg, good, bad) = setup(&db);
    assert_eq!(
        reg.snapshot().unwrap().denials,
        None,
        "legacy mode: no hints"
    );
    let now = now_secs();
    reg.store_posture_report(&good, &report(true), now, now + 600)
        .unwrap();
    reg.store_posture_report(&bad, &report(false), now, now + 600)
        .unwrap();
    // alice proved MFA 2 hours ago: older than ssh's mfa_max_age of 1 h.
    set_last_mfa(&db, &good, now - 7200);
    reg.apply_policy(POLICY, now).unwrap();
    let denials = reg.snapshot().unwrap().denials.unwrap();
    let mut expected = vec![
        DenialHint {
            device: bad.clone(),
            app: "web".into(),
            reason: "posture_failed".into(),
            requirement: Some("disk".into()),
            remediation: Some("Turn on full-disk encryption (LUKS, FileVault or BitLocker)".into()),
        },
        DenialHint {
            device: good.clone(),
            app: "ssh".into(),
            reason: "mfa_too_old".into(),
            requirement: None,
            remediation: Some("run `postern login`".into()),
        },
    ];
    expected.sort();
    // bob has no ssh rule and db needs a source network: nothing the device can fix.
    assert_eq!(denials, expected);
}
