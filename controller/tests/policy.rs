//! Policy and posture in the controller (`policy_store`, `policy ...` and
//! `device posture` commands) against real SQLite files: storing reports, applying
//! policies (dry run, unknown apps, warnings, unchanged), the access records (source
//! unknown) and their `until`, the snapshot's policy and subjects (local decisions:
//! verdicts with their expiry, never raw facts), and the CLI through the real binary.
//!
//! Owns: tests only. Must not touch: files outside the per-test tempdir.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;

use common::{fails, key, ok, spawn_serve, tempdir, Client};
use postern_controller::policy_store::PolicyStoreError;
use postern_controller::proto::keys::DevicePublicKey;
use postern_controller::proto::snapshot::{AccessRecord, AppProtocol, PostureVerdict};
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
    let ts = |s: u64| Timestamp::from_second(i64::try_from(s).unwrap()).unwrap();
    let access = reg.access_records(ts(now)).unwrap().unwrap();
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

    // Time alone changes the set: at report expiry web goes.
    let later = reg.access_records(ts(now + 600)).unwrap().unwrap();
    assert_eq!(later, vec![want(&good, "ssh", now + 1801)]);

    // A revoked device gets no record.
    reg.revoke_device("good").unwrap();
    assert_eq!(reg.access_records(ts(now)).unwrap(), Some(vec![]));
}

#[test]
fn snapshot_carries_the_policy_and_verdicts_with_their_expiry_never_facts() {
    let (_dir, db) = tempdir();
    let (mut reg, good, bad) = setup(&db);
    // No policy: legacy mode, nothing policy-related in the snapshot.
    let legacy = reg.snapshot().unwrap();
    assert_eq!(
        (legacy.access, legacy.policy, legacy.subjects),
        (None, None, None)
    );
    let now = now_secs();
    // Packages updated 13 days ago, 14 allowed: that verdict expires in 1 day (+1 s),
    // before the report (in 2 days); the disk verdict lasts as long as the report.
    let updated = Timestamp::from_second(i64::try_from(now - 13 * 86_400).unwrap()).unwrap();
    let facts = format!(
        r#"{{"collected_at":"{}","os_family":"linux","os_version":"24.04","kernel":"6.8.0-secret-build","last_package_update":"{updated}","disk_encrypted":true,"processes":["sshd","secret-agent"],"custom":{{"corp-ca":true}}}}"#,
        Timestamp::now()
    );
    reg.store_posture_report(&good, &facts, now, now + 2 * 86_400)
        .unwrap();
    reg.store_posture_report(&bad, &report(false), now, now + 600)
        .unwrap();
    set_last_mfa(&db, &good, now - 1800);
    reg.set_device_risk("bad", 55).unwrap();
    let policy = format!(
        "{POLICY}\n[[requirement]]\nname = \"patched\"\nmax_days_since_update = 14\nremediation = \"apt full-upgrade\"\n\n[[requirement]]\nname = \"unused\"\nfirewall = true\nremediation = \"ufw enable\"\n\n[[rule]]\nname = \"web-patched\"\neffect = \"allow\"\napps = [\"web\"]\nusers = [\"alice\"]\nposture = [\"patched\"]\n"
    );
    let applied = reg.apply_policy(&policy, now).unwrap();
    let snap = reg.snapshot().unwrap();
    // Older gateways see policy mode with nothing allowed (fail closed); no hints.
    assert_eq!(snap.access, Some(vec![]));
    assert_eq!(snap.denials, None);
    let text = snap.policy.clone().unwrap();
    assert_eq!(
        (text.text.as_str(), text.sha256.as_str()),
        (policy.as_str(), applied.sha256.as_str())
    );
    let subjects = snap.subjects.clone().unwrap();
    assert_eq!(subjects.len(), 2);
    let g = subjects.iter().find(|s| s.device == good).unwrap();
    assert_eq!(
        (g.user.as_str(), g.groups.clone(), g.risk),
        ("alice", vec!["eng".to_owned()], 0)
    );
    assert_eq!(g.last_mfa, Some(now - 1800));
    assert!(!g.disabled);
    let verdicts = g.posture.clone().unwrap();
    // Only requirements some rule uses travel ("unused" does not).
    assert_eq!(verdicts.keys().collect::<Vec<_>>(), ["disk", "patched"]);
    assert_eq!(
        verdicts["disk"],
        PostureVerdict {
            passed: true,
            expires: now + 2 * 86_400
        }
    );
    let patched = verdicts["patched"];
    assert!(patched.passed);
    let collected = now; // the update age counts from `last_package_update`
    assert_eq!(patched.expires, collected - 13 * 86_400 + 14 * 86_400 + 1);
    let b = subjects.iter().find(|s| s.device == bad).unwrap();
    assert_eq!((b.risk, b.last_mfa), (55, None));
    assert_eq!(
        b.posture.clone().unwrap()["disk"],
        PostureVerdict {
            passed: false,
            expires: now + 600
        }
    );
    // No raw fact leaves the controller: not the kernel, versions, processes or checks.
    let json = serde_json::to_string(&snap.subjects).unwrap();
    for fact in [
        "6.8.0",
        "secret",
        "24.04",
        "sshd",
        "corp-ca",
        "linux",
        "disk_encrypted",
    ] {
        assert!(!json.contains(fact), "{fact} leaked: {json}");
    }
    // Compact: bytes per subject.
    assert!(
        json.len() / subjects.len() < 250,
        "{} bytes per subject",
        json.len() / subjects.len()
    );
    // A device without a report carries no posture (its requirements fail); a revoked
    // one carries no subject; a disabled user's device says so.
    reg.revoke_device("bad").unwrap();
    let subjects = reg.snapshot().unwrap().subjects.unwrap();
    assert_eq!(subjects.len(), 1);
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

/// The running sync server sends the policy and the verdicts: a gateway decides from
/// them itself (a verdict that expires needs no new snapshot).
#[test]
fn serve_sends_the_policy_and_verdicts() {
    let (dir, db) = tempdir();
    let (mut reg, good, _) = setup(&db);
    let now = now_secs();
    reg.store_posture_report(&good, &report(true), now, now + 3)
        .unwrap();
    let applied = reg.apply_policy(POLICY, now).unwrap();
    drop(reg);
    let socket = dir.path().join("ctl.sock");
    let mut child = spawn_serve(&db, &socket, 10_000);
    let mut client = Client::connect(&socket);
    let first = client.sync(0);
    assert_eq!(first.policy.as_ref().unwrap().sha256, applied.sha256);
    let subjects = first.subjects.clone().unwrap();
    let g = subjects.iter().find(|s| s.device == good).unwrap();
    assert_eq!(
        g.posture.as_ref().unwrap()["disk"],
        PostureVerdict {
            passed: true,
            expires: now + 3
        }
    );
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
