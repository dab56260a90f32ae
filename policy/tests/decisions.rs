//! Table tests of the policy engine: one policy file, one line per (device, app, source,
//! time) case and its expected decision in a compact form:
//!
//! - `allow RULE LEASE MODE`
//! - `deny revoked` | `deny disabled` | `deny no-rule` | `deny rule RULE`
//! - `deny RULE: network|window|risk|mfa-missing|mfa-old|posture REQUIREMENT`

use std::collections::BTreeMap;

use postern_policy::{
    decide, explain, format_duration, parse, Decision, DenyReason, Device, Failure, Outcome,
    Posture, PostureFacts, Request, Timestamp, Verdict,
};

const POLICY: &str = r#"
[[requirement]]
name = "disk"
disk_encryption = true
remediation = "Turn on full-disk encryption (LUKS, FileVault or BitLocker)"

[[requirement]]
name = "edr"
processes = ["falcon-sensor"]
firewall = true
remediation = "Start the EDR agent and turn the host firewall on"

[[requirement]]
name = "modern-linux"
os_family = "linux"
os_min_version = "22.04"
min_kernel = "6.1"
max_days_since_update = 14
remediation = "Run the OS updates (apt full-upgrade) and reboot"

[[rule]]
name = "deny-contractors"
effect = "deny"
apps = ["*"]
groups = ["contractors"]

[[rule]]
name = "deny-db-from-guest-wifi"
effect = "deny"
apps = ["db"]
users = ["*"]
source_networks = ["192.168.100.0/24"]

[[rule]]
name = "wiki-write-strict"
effect = "allow"
apps = ["wiki-write"]
groups = ["eng"]
posture = ["disk", "edr"]
lease = "8h"

[[rule]]
name = "wiki-read-any"
effect = "allow"
apps = ["wiki-read"]
groups = ["eng", "sales"]
users = ["carol"]
lease = "15m"
session_mode = "verdict"

[[rule]]
name = "ssh-prod"
effect = "allow"
apps = ["ssh-prod"]
groups = ["ops"]
posture = ["modern-linux"]
mfa_max_age = "12h"
max_risk = 40
source_networks = ["10.0.0.0/8", "2001:db8::/32"]
lease = "1h"

[[rule]]
name = "db-full"
effect = "allow"
apps = ["db"]
groups = ["eng"]
posture = ["disk"]
lease = "8h"

[[rule]]
name = "db-limited"
effect = "allow"
apps = ["db"]
groups = ["eng"]
mfa_max_age = "1h"
lease = "10m"
session_mode = "verdict"

[[rule]]
name = "payroll-office-hours"
effect = "allow"
apps = ["payroll"]
groups = ["hr"]
time_zone = "Europe/Berlin"
windows = [{ days = ["mon-fri"], hours = "09:00-17:30" }]

[[rule]]
name = "maint-eu"
effect = "allow"
apps = ["maint-eu"]
groups = ["ops"]
time_zone = "Europe/Berlin"
windows = [{ days = ["sun"], hours = "02:00-02:30" }]

[[rule]]
name = "maint-us"
effect = "allow"
apps = ["maint-us"]
groups = ["ops"]
time_zone = "America/New_York"
windows = [{ days = ["sat"], hours = "23:00-03:00" }]
"#;

/// Monday 2026-06-15 12:00 UTC: the default decision time.
const T0: &str = "2026-06-15T12:00:00Z";

fn ts(s: &str) -> Timestamp {
    s.parse()
        .unwrap_or_else(|e| panic!("bad timestamp {s}: {e}"))
}

fn user(name: &str, groups: &[&str]) -> Device {
    Device {
        id: format!("{name}-laptop"),
        user: name.into(),
        groups: groups.iter().map(|g| (*g).to_owned()).collect(),
        revoked: false,
        disabled: false,
        risk: 0,
        last_mfa: None,
        posture: Posture::Unknown,
    }
}

/// Builders that keep the table one line per case.
trait With {
    fn mfa(self, at: &str) -> Device;
    fn risk(self, r: u8) -> Device;
    fn revoked(self) -> Device;
    fn disabled(self) -> Device;
    fn facts(self, f: PostureFacts) -> Device;
    /// (requirement, passed, expires)
    fn verdicts(self, v: &[(&str, bool, &str)]) -> Device;
}

impl With for Device {
    fn mfa(mut self, at: &str) -> Device {
        self.last_mfa = Some(ts(at));
        self
    }
    fn risk(mut self, r: u8) -> Device {
        self.risk = r;
        self
    }
    fn revoked(mut self) -> Device {
        self.revoked = true;
        self
    }
    fn disabled(mut self) -> Device {
        self.disabled = true;
        self
    }
    fn facts(mut self, f: PostureFacts) -> Device {
        self.posture = Posture::Facts(f);
        self
    }
    fn verdicts(mut self, v: &[(&str, bool, &str)]) -> Device {
        let map: BTreeMap<String, Verdict> = v
            .iter()
            .map(|(name, passed, expires)| {
                (
                    (*name).to_owned(),
                    Verdict {
                        passed: *passed,
                        expires: ts(expires),
                        detail: if *passed { "" } else { "reported failing" }.into(),
                    },
                )
            })
            .collect();
        self.posture = Posture::Verdicts(map);
        self
    }
}

/// Linux facts (os version, kernel, last package update), valid until T0 + 1h.
fn linux(os: &str, kernel: &str, updated: &str) -> PostureFacts {
    PostureFacts {
        expires: Some(ts("2026-06-15T13:00:00Z")),
        os_family: Some("linux".into()),
        os_version: Some(os.into()),
        kernel: Some(kernel.into()),
        last_package_update: Some(ts(updated)),
        ..PostureFacts::default()
    }
}

fn with_family(mut f: PostureFacts, family: &str) -> PostureFacts {
    f.os_family = Some(family.into());
    f
}

fn expiring(mut f: PostureFacts, at: &str) -> PostureFacts {
    f.expires = Some(ts(at));
    f
}

/// A healthy ops laptop: modern Linux updated 3 days ago, MFA an hour ago.
fn ops() -> Device {
    user("olga", &["ops"])
        .facts(linux("24.04", "6.8.0-45-generic", "2026-06-12T08:00:00Z"))
        .mfa("2026-06-15T11:00:00Z")
}

const VALID: &str = "2026-06-15T18:00:00Z";

/// An engineer whose disk and EDR verdicts pass (valid until 18:00).
fn eng_ok() -> Device {
    user("erik", &["eng"])
        .verdicts(&[("disk", true, VALID), ("edr", true, VALID)])
        .mfa("2026-06-15T11:30:00Z")
}

/// An engineer with disk encryption off.
fn eng_no_disk() -> Device {
    user("erik", &["eng"])
        .verdicts(&[("disk", false, VALID), ("edr", true, VALID)])
        .mfa("2026-06-15T11:30:00Z")
}

fn summary(d: &Decision) -> String {
    match d {
        Decision::Allow(g) => format!(
            "allow {} {} {}",
            g.rule,
            format_duration(g.lease),
            g.session_mode
        ),
        Decision::Deny(d) => {
            let rule = d.rule.clone().unwrap_or_default();
            match &d.reason {
                DenyReason::Revoked => "deny revoked".into(),
                DenyReason::Disabled => "deny disabled".into(),
                DenyReason::NoRule => "deny no-rule".into(),
                DenyReason::DenyRule => format!("deny rule {rule}"),
                DenyReason::Failed(f) => {
                    let what = match f {
                        Failure::SourceNetwork => "network".into(),
                        Failure::OutsideWindow => "window".into(),
                        Failure::Risk { .. } => "risk".into(),
                        Failure::MfaMissing => "mfa-missing".into(),
                        Failure::MfaTooOld { .. } => "mfa-old".into(),
                        Failure::Posture { requirement, .. } => format!("posture {requirement}"),
                    };
                    format!("deny {rule}: {what}")
                }
            }
        }
    }
}

#[rustfmt::skip]
fn cases() -> Vec<(&'static str, Device, &'static str, &'static str, &'static str, &'static str)> {
    vec![
    // (case, device, app, from ("" = unknown), at, expected)
    // -- groups and users
    ("group member gets the app",             user("sam", &["sales"]),          "wiki-read", "",            T0, "allow wiki-read-any 15m verdict"),
    ("second listed group also matches",      user("erik", &["eng"]),           "wiki-read", "",            T0, "allow wiki-read-any 15m verdict"),
    ("user listed by name, in no group",      user("carol", &[]),               "wiki-read", "",            T0, "allow wiki-read-any 15m verdict"),
    ("user in an unrelated group",            user("hank", &["hr"]),            "wiki-read", "",            T0, "deny no-rule"),
    ("user in no group at all",               user("nobody", &[]),              "wiki-read", "",            T0, "deny no-rule"),
    // -- default deny
    ("app no rule mentions",                  eng_ok(),                         "unknown-app", "",          T0, "deny no-rule"),
    ("app name is case-sensitive",            eng_ok(),                         "Wiki-Read", "",            T0, "deny no-rule"),
    // -- deny wins over allow
    ("contractor also in eng: deny wins",     user("cid", &["eng", "contractors"]), "wiki-read", "",        T0, "deny rule deny-contractors"),
    ("deny on * covers every app",            user("cid", &["contractors"]),    "payroll", "",              T0, "deny rule deny-contractors"),
    ("deny scoped to guest wifi applies",     eng_ok(),                         "db", "192.168.100.7",      T0, "deny rule deny-db-from-guest-wifi"),
    ("same device from the office: allowed",  eng_ok(),                         "db", "10.20.0.7",          T0, "allow db-full 8h lease"),
    ("unknown source: network deny applies",  eng_ok(),                         "db", "",                   T0, "deny rule deny-db-from-guest-wifi"),
    ("deny network edge outside /24",         eng_ok(),                         "db", "192.168.101.1",      T0, "allow db-full 8h lease"),
    // -- revoked and disabled
    ("revoked device, otherwise healthy",     eng_ok().revoked(),               "wiki-read", "",            T0, "deny revoked"),
    ("disabled device or user",               eng_ok().disabled(),              "wiki-read", "",            T0, "deny disabled"),
    ("revoked beats a deny rule",             user("cid", &["contractors"]).revoked(), "db", "",            T0, "deny revoked"),
    // -- posture verdicts
    ("all verdicts pass and are fresh",       eng_ok(),                         "wiki-write", "",           T0, "allow wiki-write-strict 8h lease"),
    ("verdict expires exactly now",           user("erik", &["eng"]).verdicts(&[("disk", true, T0), ("edr", true, VALID)]), "wiki-write", "", T0, "deny wiki-write-strict: posture disk"),
    ("verdict expires one second later",      user("erik", &["eng"]).verdicts(&[("disk", true, "2026-06-15T12:00:01Z"), ("edr", true, VALID)]), "wiki-write", "", T0, "allow wiki-write-strict 8h lease"),
    ("second requirement fails",              user("erik", &["eng"]).verdicts(&[("disk", true, VALID), ("edr", false, VALID)]), "wiki-write", "", T0, "deny wiki-write-strict: posture edr"),
    ("verdict missing for a requirement",     user("erik", &["eng"]).verdicts(&[("disk", true, VALID)]), "wiki-write", "", T0, "deny wiki-write-strict: posture edr"),
    ("no posture reported at all",            user("erik", &["eng"]),           "wiki-write", "",           T0, "deny wiki-write-strict: posture disk"),
    // -- graduated access
    ("disk off: strict app refused",          eng_no_disk(),                    "wiki-write", "",           T0, "deny wiki-write-strict: posture disk"),
    ("disk off: read-only app still granted", eng_no_disk(),                    "wiki-read", "",            T0, "allow wiki-read-any 15m verdict"),
    ("disk off: same app, limited rule",      eng_no_disk(),                    "db", "10.20.0.7",          T0, "allow db-limited 10m verdict"),
    ("disk off and MFA stale: first failure", eng_no_disk().mfa("2026-06-15T10:59:59Z"), "db", "10.20.0.7", T0, "deny db-full: posture disk"),
    // -- MFA age edges (ssh-prod: 12h)
    ("MFA exactly 12h ago",                   ops().mfa("2026-06-15T00:00:00Z"), "ssh-prod", "10.1.2.3",    T0, "allow ssh-prod 1h lease"),
    ("MFA 12h and one second ago",            ops().mfa("2026-06-14T23:59:59Z"), "ssh-prod", "10.1.2.3",    T0, "deny ssh-prod: mfa-old"),
    ("MFA never done",                        { let mut d = ops(); d.last_mfa = None; d }, "ssh-prod", "10.1.2.3", T0, "deny ssh-prod: mfa-missing"),
    ("MFA clock skew: in the future",         ops().mfa("2026-06-15T12:00:30Z"), "ssh-prod", "10.1.2.3",    T0, "allow ssh-prod 1h lease"),
    // -- risk threshold (ssh-prod: max 40)
    ("risk exactly at max",                   ops().risk(40),                   "ssh-prod", "10.1.2.3",     T0, "allow ssh-prod 1h lease"),
    ("risk one above max",                    ops().risk(41),                   "ssh-prod", "10.1.2.3",     T0, "deny ssh-prod: risk"),
    ("risk 100",                              ops().risk(100),                  "ssh-prod", "10.1.2.3",     T0, "deny ssh-prod: risk"),
    // -- source networks v4 and v6
    ("v4 inside 10/8",                        ops(),                            "ssh-prod", "10.255.255.255", T0, "allow ssh-prod 1h lease"),
    ("v4 just outside 10/8",                  ops(),                            "ssh-prod", "11.0.0.0",     T0, "deny ssh-prod: network"),
    ("v6 inside 2001:db8::/32",               ops(),                            "ssh-prod", "2001:db8:ffff::1", T0, "allow ssh-prod 1h lease"),
    ("v6 just outside",                       ops(),                            "ssh-prod", "2001:db9::1",  T0, "deny ssh-prod: network"),
    ("v4-mapped v6 address matches the v4 net", ops(),                          "ssh-prod", "::ffff:10.0.0.5", T0, "allow ssh-prod 1h lease"),
    ("source unknown with networks set",      ops(),                            "ssh-prod", "",             T0, "deny ssh-prod: network"),
    // -- posture facts (modern-linux: linux >= 22.04, kernel >= 6.1, updated <= 14 days)
    ("facts: OS too old",                     ops().facts(linux("20.04", "6.8.0", "2026-06-12T08:00:00Z")), "ssh-prod", "10.1.2.3", T0, "deny ssh-prod: posture modern-linux"),
    ("facts: kernel 6.1.0-13 is enough",      ops().facts(linux("22.04", "6.1.0-13-amd64", "2026-06-12T08:00:00Z")), "ssh-prod", "10.1.2.3", T0, "allow ssh-prod 1h lease"),
    ("facts: kernel 5.15 too old",            ops().facts(linux("22.04", "5.15.0-91", "2026-06-12T08:00:00Z")), "ssh-prod", "10.1.2.3", T0, "deny ssh-prod: posture modern-linux"),
    ("facts: updated exactly 14 days ago",    ops().facts(linux("24.04", "6.8", "2026-06-01T12:00:00Z")), "ssh-prod", "10.1.2.3", T0, "allow ssh-prod 1h lease"),
    ("facts: updated 14 days and 1s ago",     ops().facts(linux("24.04", "6.8", "2026-06-01T11:59:59Z")), "ssh-prod", "10.1.2.3", T0, "deny ssh-prod: posture modern-linux"),
    ("facts: wrong OS family",                ops().facts(with_family(linux("24.04", "6.8", "2026-06-12T08:00:00Z"), "macos")), "ssh-prod", "10.1.2.3", T0, "deny ssh-prod: posture modern-linux"),
    ("facts: report expired",                 ops().facts(expiring(linux("24.04", "6.8", "2026-06-12T08:00:00Z"), T0)), "ssh-prod", "10.1.2.3", T0, "deny ssh-prod: posture modern-linux"),
    // -- time windows, Europe/Berlin office hours mon-fri 09:00-17:30
    ("Berlin summer: 09:00 CEST opens",       user("hank", &["hr"]),            "payroll", "", "2026-06-15T07:00:00Z", "allow payroll-office-hours 1h lease"),
    ("Berlin summer: 08:59:59 CEST closed",   user("hank", &["hr"]),            "payroll", "", "2026-06-15T06:59:59Z", "deny payroll-office-hours: window"),
    ("Berlin summer: 17:29 open",             user("hank", &["hr"]),            "payroll", "", "2026-06-19T15:29:59Z", "allow payroll-office-hours 1h lease"),
    ("Berlin summer: 17:30 closes (end excl)", user("hank", &["hr"]),           "payroll", "", "2026-06-19T15:30:00Z", "deny payroll-office-hours: window"),
    ("Berlin winter: 09:00 CET is 08:00Z",    user("hank", &["hr"]),            "payroll", "", "2026-01-12T08:00:00Z", "allow payroll-office-hours 1h lease"),
    ("Berlin winter: 07:30Z is 08:30 CET",    user("hank", &["hr"]),            "payroll", "", "2026-01-12T07:30:00Z", "deny payroll-office-hours: window"),
    ("Berlin Saturday closed",                user("hank", &["hr"]),            "payroll", "", "2026-06-20T10:00:00Z", "deny payroll-office-hours: window"),
    // -- DST in Europe/Berlin, window sun 02:00-02:30
    ("Berlin ordinary Sunday 02:15 CET",      ops(),                            "maint-eu", "", "2026-03-22T01:15:00Z", "allow maint-eu 1h lease"),
    ("Berlin spring gap: 01:59:59 CET",       ops(),                            "maint-eu", "", "2026-03-29T00:59:59Z", "deny maint-eu: window"),
    ("Berlin spring gap: next second 03:00",  ops(),                            "maint-eu", "", "2026-03-29T01:00:00Z", "deny maint-eu: window"),
    ("Berlin fall-back: first 02:15 (CEST)",  ops(),                            "maint-eu", "", "2026-10-25T00:15:00Z", "allow maint-eu 1h lease"),
    ("Berlin fall-back: 02:45 CEST closed",   ops(),                            "maint-eu", "", "2026-10-25T00:45:00Z", "deny maint-eu: window"),
    ("Berlin fall-back: repeated 02:15 (CET)", ops(),                           "maint-eu", "", "2026-10-25T01:15:00Z", "allow maint-eu 1h lease"),
    ("Berlin fall-back: 02:30 CET closed",    ops(),                            "maint-eu", "", "2026-10-25T01:30:00Z", "deny maint-eu: window"),
    // -- America/New_York window sat 23:00-03:00 (crosses midnight into Sunday)
    ("NY Saturday 22:59 EDT closed",          ops(),                            "maint-us", "", "2026-06-21T02:59:00Z", "deny maint-us: window"),
    ("NY Saturday 23:00 EDT opens",           ops(),                            "maint-us", "", "2026-06-21T03:00:00Z", "allow maint-us 1h lease"),
    ("NY Sunday 02:59 EDT after midnight",    ops(),                            "maint-us", "", "2026-06-21T06:59:00Z", "allow maint-us 1h lease"),
    ("NY Sunday 03:00 EDT closes",            ops(),                            "maint-us", "", "2026-06-21T07:00:00Z", "deny maint-us: window"),
    ("NY Friday 23:30 (day not listed)",      ops(),                            "maint-us", "", "2026-06-20T03:30:00Z", "deny maint-us: window"),
    ("NY Sunday 23:30 (day not listed)",      ops(),                            "maint-us", "", "2026-06-22T03:30:00Z", "deny maint-us: window"),
    ("NY spring-forward: 01:59:59 EST open",  ops(),                            "maint-us", "", "2026-03-08T06:59:59Z", "allow maint-us 1h lease"),
    ("NY spring-forward: next second 03:00 EDT", ops(),                         "maint-us", "", "2026-03-08T07:00:00Z", "deny maint-us: window"),
    ("NY fall-back: first 01:30 (EDT)",       ops(),                            "maint-us", "", "2026-11-01T05:30:00Z", "allow maint-us 1h lease"),
    ("NY fall-back: repeated 01:30 (EST)",    ops(),                            "maint-us", "", "2026-11-01T06:30:00Z", "allow maint-us 1h lease"),
    ("NY fall-back: 02:59 EST still open",    ops(),                            "maint-us", "", "2026-11-01T07:59:00Z", "allow maint-us 1h lease"),
    ("NY fall-back: 03:00 EST closes",        ops(),                            "maint-us", "", "2026-11-01T08:00:00Z", "deny maint-us: window"),
    ]
}

#[test]
fn decision_table() {
    let policy = parse(POLICY).expect("the test policy parses");
    let cases = cases();
    let mut failures = Vec::new();
    for (name, device, app, from, at, expected) in &cases {
        let req = Request {
            device,
            app,
            source: if from.is_empty() {
                None
            } else {
                Some(from.parse().expect("test source address"))
            },
            now: ts(at),
        };
        let got = summary(&decide(&policy, &req));
        if got != *expected {
            let why = explain(&policy, &req);
            failures.push(format!("{name}: expected `{expected}`, got `{got}`\n{why}"));
        }
    }
    println!("{} decision cases", cases.len());
    assert!(cases.len() >= 40);
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn denial_names_requirement_and_remediation() {
    let policy = parse(POLICY).expect("parses");
    let device = eng_no_disk();
    let req = Request {
        device: &device,
        app: "wiki-write",
        source: None,
        now: ts(T0),
    };
    let Decision::Deny(d) = decide(&policy, &req) else {
        panic!("expected a denial");
    };
    assert_eq!(d.requirement(), Some("disk"));
    assert_eq!(
        d.remediation(),
        Some("Turn on full-disk encryption (LUKS, FileVault or BitLocker)")
    );
    assert!(
        d.to_string().contains("remediation: Turn on full-disk"),
        "{d}"
    );
}

#[test]
fn grant_ends_with_mfa_and_verdict_expiry() {
    let policy = parse(POLICY).expect("parses");
    // ssh-prod: lease 1h, MFA 12h max done 11:30 ago -> ends at 12:30; facts expire 13:00.
    let device = ops().mfa("2026-06-15T00:30:00Z");
    let req = Request {
        device: &device,
        app: "ssh-prod",
        source: Some("10.0.0.1".parse().expect("ip")),
        now: ts(T0),
    };
    let Decision::Allow(g) = decide(&policy, &req) else {
        panic!("expected a grant");
    };
    assert_eq!(g.expires_at, ts("2026-06-15T12:30:00Z"));
    // wiki-write: lease 8h, verdicts valid until 18:00.
    let device = eng_ok();
    let req = Request {
        device: &device,
        app: "wiki-write",
        source: None,
        now: ts(T0),
    };
    let Decision::Allow(g) = decide(&policy, &req) else {
        panic!("expected a grant");
    };
    assert_eq!(g.expires_at, ts(VALID));
}

#[test]
fn explain_lists_every_rule_considered() {
    let policy = parse(POLICY).expect("parses");
    let device = eng_no_disk();
    let req = Request {
        device: &device,
        app: "db",
        source: Some("10.0.0.9".parse().expect("ip")),
        now: ts(T0),
    };
    let e = explain(&policy, &req);
    // The device step plus one step per rule.
    assert_eq!(e.steps.len(), 1 + policy.rules.len(), "{e}");
    let of = |rule: &str| {
        e.steps
            .iter()
            .find(|s| s.subject.ends_with(&format!("{rule:?}")))
            .unwrap_or_else(|| panic!("no step for {rule}: {e}"))
    };
    assert_eq!(of("deny-contractors").outcome, Outcome::Skip);
    assert_eq!(of("deny-db-from-guest-wifi").outcome, Outcome::Skip);
    assert_eq!(of("wiki-read-any").outcome, Outcome::Skip);
    assert_eq!(of("db-full").outcome, Outcome::Fail);
    assert!(
        of("db-full").why.contains("posture requirement \"disk\""),
        "{e}"
    );
    assert_eq!(of("db-limited").outcome, Outcome::Pass);
    let text = e.to_string();
    assert!(text.ends_with("=> allow by rule \"db-limited\": lease 10m, session verdict, until 2026-06-15T12:10:00Z"), "{text}");
    assert!(!text.contains("\n\n"));
}
