//! `Grant::valid_until`: the earliest instant a granted decision can stop holding with no
//! change to device, user or policy. The controller turns it into the gateway's access
//! record `until`, so each case checks both the instant and that the decision really flips
//! there (and not a second earlier).

use std::collections::BTreeMap;

use postern_policy::{
    decide, next_window_change, parse, Decision, Device, Posture, PostureFacts, Request, Timestamp,
};

fn ts(s: &str) -> Timestamp {
    s.parse().expect("test timestamp")
}

fn device(mfa: Option<&str>, posture: Posture) -> Device {
    Device {
        id: "d1".into(),
        user: "alice".into(),
        groups: vec!["eng".into()],
        revoked: false,
        disabled: false,
        risk: 0,
        last_mfa: mfa.map(ts),
        posture,
    }
}

fn decide_at(policy: &str, d: &Device, app: &str, now: Timestamp) -> Decision {
    let set = parse(policy).expect("test policy parses");
    decide(
        &set,
        &Request {
            device: d,
            app,
            source: None,
            now,
        },
    )
}

fn until(policy: &str, d: &Device, app: &str, now: &str) -> Option<Timestamp> {
    match decide_at(policy, d, app, ts(now)) {
        Decision::Allow(g) => g.valid_until,
        Decision::Deny(den) => panic!("expected allow at {now}, got deny: {den}"),
    }
}

/// The decision allows just before `t` and denies at `t`.
fn flips_at(policy: &str, d: &Device, app: &str, t: Timestamp) {
    let before = t
        .checked_sub(jiff::SignedDuration::from_secs(1))
        .expect("in range");
    assert!(
        decide_at(policy, d, app, before).is_allow(),
        "allowed at {before}"
    );
    assert!(!decide_at(policy, d, app, t).is_allow(), "denied at {t}");
}

const PLAIN: &str = r#"
[[rule]]
name = "wiki"
effect = "allow"
apps = ["wiki"]
groups = ["eng"]
lease = "1h"
"#;

#[test]
fn a_plain_rule_holds_until_something_changes() {
    let d = device(None, Posture::Unknown);
    assert_eq!(until(PLAIN, &d, "wiki", "2026-06-15T12:00:00Z"), None);
}

const MFA: &str = r#"
[[rule]]
name = "ssh"
effect = "allow"
apps = ["ssh"]
users = ["alice"]
mfa_max_age = "12h"
lease = "1h"
"#;

#[test]
fn mfa_age_limit_ends_validity() {
    let d = device(Some("2026-06-15T00:00:00Z"), Posture::Unknown);
    let t = until(MFA, &d, "ssh", "2026-06-15T10:00:00Z").expect("limited by MFA");
    assert_eq!(t, ts("2026-06-15T12:00:01Z"));
    flips_at(MFA, &d, "ssh", t);
}

const POSTURE: &str = r#"
[[requirement]]
name = "patched"
max_days_since_update = 7
disk_encryption = true
remediation = "Run the updates"

[[rule]]
name = "db"
effect = "allow"
apps = ["db"]
groups = ["eng"]
posture = ["patched"]
"#;

fn facts(expires: &str, updated: &str) -> Posture {
    Posture::Facts(PostureFacts {
        expires: Some(ts(expires)),
        last_package_update: Some(ts(updated)),
        disk_encrypted: true,
        custom: BTreeMap::new(),
        ..PostureFacts::default()
    })
}

#[test]
fn report_expiry_and_update_age_end_validity_whichever_is_first() {
    // Report expires first.
    let d = device(None, facts("2026-06-15T13:00:00Z", "2026-06-14T00:00:00Z"));
    let t = until(POSTURE, &d, "db", "2026-06-15T12:00:00Z").expect("limited");
    assert_eq!(t, ts("2026-06-15T13:00:00Z"));
    flips_at(POSTURE, &d, "db", t);
    // The 7-day update limit runs out first.
    let d = device(None, facts("2026-06-30T00:00:00Z", "2026-06-08T12:30:00Z"));
    let t = until(POSTURE, &d, "db", "2026-06-15T12:00:00Z").expect("limited");
    assert_eq!(t, ts("2026-06-15T12:30:01Z"));
    flips_at(POSTURE, &d, "db", t);
}

const WINDOW: &str = r#"
[[rule]]
name = "office"
effect = "allow"
apps = ["erp"]
groups = ["eng"]
time_zone = "Europe/Berlin"
windows = [{ days = ["mon-fri"], hours = "08:00-18:00" }]
"#;

#[test]
fn window_end_ends_validity_in_local_time() {
    let d = device(None, Posture::Unknown);
    // Monday 2026-06-15, 14:00 Berlin (CEST, UTC+2): the window ends 18:00 = 16:00Z.
    let t = until(WINDOW, &d, "erp", "2026-06-15T12:00:00Z").expect("window");
    assert_eq!(t, ts("2026-06-15T16:00:00Z"));
    flips_at(WINDOW, &d, "erp", t);
    // In winter (CET, UTC+1) the same window ends at 17:00Z.
    let t = until(WINDOW, &d, "erp", "2026-12-14T12:00:00Z").expect("window");
    assert_eq!(t, ts("2026-12-14T17:00:00Z"));
}

#[test]
fn next_window_change_finds_the_opening_across_a_weekend_and_a_dst_change() {
    let set = parse(WINDOW).expect("parses");
    let rule = set.rule("office").expect("rule");
    // Friday 2026-10-23 20:00 Berlin; DST ends Sunday 2026-10-25; opens Monday 08:00 CET.
    let t = next_window_change(rule, ts("2026-10-23T18:00:00Z")).expect("opens");
    assert_eq!(t, ts("2026-10-26T07:00:00Z"));
    // A rule without windows never changes.
    let plain = parse(PLAIN).expect("parses");
    assert_eq!(
        next_window_change(
            plain.rule("wiki").expect("rule"),
            ts("2026-10-23T18:00:00Z")
        ),
        None
    );
}

const OVERNIGHT_DENY: &str = r#"
[[rule]]
name = "no-nights"
effect = "deny"
apps = ["erp"]
users = ["*"]
time_zone = "America/New_York"
windows = [{ days = ["mon-sun"], hours = "22:00-06:00" }]

[[rule]]
name = "erp"
effect = "allow"
apps = ["erp"]
groups = ["eng"]
"#;

#[test]
fn an_applicable_deny_window_opening_ends_validity() {
    let d = device(None, Posture::Unknown);
    // 12:00 New York (EDT, UTC-4) on 2026-06-15: the deny window opens at 22:00 = 02:00Z.
    let t = until(OVERNIGHT_DENY, &d, "erp", "2026-06-15T16:00:00Z").expect("deny opens");
    assert_eq!(t, ts("2026-06-16T02:00:00Z"));
    flips_at(OVERNIGHT_DENY, &d, "erp", t);
    // Inside the deny window nothing is granted; after it closes it holds until 22:00.
    assert!(!decide_at(OVERNIGHT_DENY, &d, "erp", ts("2026-06-16T05:00:00Z")).is_allow());
    let t = until(OVERNIGHT_DENY, &d, "erp", "2026-06-16T10:30:00Z").expect("deny opens");
    assert_eq!(t, ts("2026-06-17T02:00:00Z"));
}

const SOURCE_ONLY: &str = r#"
[[rule]]
name = "vpn-only"
effect = "allow"
apps = ["ssh"]
users = ["alice"]
source_networks = ["10.0.0.0/8"]
"#;

#[test]
fn source_restricted_rules_grant_nothing_without_a_source() {
    let d = device(None, Posture::Unknown);
    assert!(!decide_at(SOURCE_ONLY, &d, "ssh", ts("2026-06-15T12:00:00Z")).is_allow());
}

const PATCHED: &str = r#"
[[requirement]]
name = "patched"
max_days_since_update = 14
remediation = "apt full-upgrade"

[[requirement]]
name = "disk"
disk_encryption = true
remediation = "turn on LUKS"

[[rule]]
name = "wiki"
effect = "allow"
apps = ["wiki"]
groups = ["eng"]
posture = ["patched", "disk"]
"#;

/// Verdicts precomputed from facts (`postern_policy::verdict`, what the controller ships to
/// gateways) decide exactly like the facts, at every instant up to and past their expiry.
#[test]
fn verdicts_computed_from_facts_decide_like_the_facts() {
    let set = parse(PATCHED).expect("test policy parses");
    let computed_at = ts("2026-06-15T12:00:00Z");
    for disk in [true, false] {
        let facts = PostureFacts {
            expires: Some(ts("2026-06-20T00:00:00Z")),
            last_package_update: Some(ts("2026-06-03T12:00:00Z")),
            disk_encrypted: disk,
            ..PostureFacts::default()
        };
        let verdicts: BTreeMap<String, postern_policy::Verdict> = set
            .requirements
            .iter()
            .map(|r| {
                (
                    r.name.clone(),
                    postern_policy::verdict(r, &facts, computed_at),
                )
            })
            .collect();
        // patched: 14 days after the update, plus the whole-second rule.
        assert_eq!(verdicts["patched"].expires, ts("2026-06-17T12:00:01Z"));
        assert_eq!(verdicts["disk"].passed, disk);
        assert_eq!(verdicts["disk"].expires, ts("2026-06-20T00:00:00Z"));
        let by_facts = device(None, Posture::Facts(facts.clone()));
        let by_verdicts = device(None, Posture::Verdicts(verdicts));
        for now in [
            "2026-06-15T12:00:00Z",
            "2026-06-17T12:00:00Z",
            "2026-06-17T12:00:01Z",
            "2026-06-19T23:59:59Z",
            "2026-06-20T00:00:00Z",
        ] {
            let a = decide_at(PATCHED, &by_facts, "wiki", ts(now));
            let b = decide_at(PATCHED, &by_verdicts, "wiki", ts(now));
            assert_eq!(a.is_allow(), b.is_allow(), "disk {disk} at {now}");
            if let (Decision::Allow(a), Decision::Allow(b)) = (&a, &b) {
                assert_eq!(a.valid_until, b.valid_until, "at {now}");
            }
        }
    }
}
