//! The posture report wire format (docs/posture.md): a full report, defaults, and every
//! way a field can be refused, each error naming its field.

use postern_policy::report::{
    MAX_CUSTOM_CHECKS, MAX_PROCESSES, MAX_REPORT_BYTES, MAX_STRING_BYTES,
};
use postern_policy::{PostureReport, ReportError, Timestamp};

const FULL: &str = r#"{
  "collected_at": "2026-11-23T13:00:00Z",
  "os_family": "linux",
  "os_version": "24.04",
  "kernel": "6.8.0-49-generic",
  "last_package_update": "2026-11-20T08:15:00+01:00",
  "disk_encrypted": true,
  "firewall_on": true,
  "processes": ["falcon-sensor", "sshd"],
  "mdm_enrolled": false,
  "custom": {"screen_lock": true, "usb_storage_blocked": false}
}"#;

fn ts(s: &str) -> Timestamp {
    s.parse().expect("test timestamp")
}

fn err(json: &str) -> String {
    match PostureReport::parse(json.as_bytes()) {
        Ok(r) => panic!("expected an error for {json}, got {r:?}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn full_report_parses_and_converts_to_facts() {
    let report = PostureReport::parse(FULL.as_bytes()).expect("full report");
    assert_eq!(report.collected_at, ts("2026-11-23T13:00:00Z"));
    assert_eq!(report.facts.expires, None);
    let r = &report.facts;
    assert_eq!(r.os_family.as_deref(), Some("linux"));
    assert_eq!(r.kernel.as_deref(), Some("6.8.0-49-generic"));
    assert_eq!(r.last_package_update, Some(ts("2026-11-20T07:15:00Z")));
    assert!(r.disk_encrypted && r.firewall_on && !r.mdm_enrolled);
    assert_eq!(r.processes, vec!["falcon-sensor", "sshd"]);
    assert_eq!(r.custom.get("screen_lock"), Some(&true));
    assert_eq!(r.custom.get("usb_storage_blocked"), Some(&false));
    let expires = ts("2026-11-23T14:00:00Z");
    let f = report.to_facts(expires);
    assert_eq!(f.expires, Some(expires));
    assert_eq!(f.os_version.as_deref(), Some("24.04"));
    assert!(f.disk_encrypted && f.firewall_on);
    assert_eq!(f.processes, r.processes);
    assert_eq!(f.custom, r.custom);
}

#[test]
fn only_collected_at_is_required_and_missing_facts_are_false_or_absent() {
    let r = PostureReport::parse(br#"{"collected_at":"2026-11-23T13:00:00Z"}"#)
        .expect("minimal report")
        .facts;
    assert_eq!(r.os_family, None);
    assert_eq!(r.last_package_update, None);
    assert!(!r.disk_encrypted && !r.firewall_on && !r.mdm_enrolled);
    assert!(r.processes.is_empty() && r.custom.is_empty());
    assert!(err("{}").contains("collected_at"), "{}", err("{}"));
}

#[test]
fn every_bad_field_is_refused_with_its_name() {
    let base = |extra: &str| format!(r#"{{"collected_at":"2026-11-23T13:00:00Z",{extra}}}"#);
    let long = "x".repeat(MAX_STRING_BYTES + 1);
    let cases: Vec<(String, &str)> = vec![
        (r#"{"collected_at":"yesterday"}"#.into(), "collected_at"),
        (
            r#"{"collected_at":"2026-11-23 13:00"}"#.into(),
            "collected_at",
        ),
        (r#"{"collected_at":1700000000}"#.into(), "collected_at"),
        (
            base(r#""last_package_update":"2026-13-01T00:00:00Z""#),
            "last_package_update",
        ),
        (base(r#""os_family":"""#), "os_family"),
        (base(&format!(r#""os_version":"{long}""#)), "os_version"),
        (base(r#""kernel":"6.1\n""#), "kernel"),
        (base(r#""kernel":7"#), "kernel"),
        (base(r#""disk_encrypted":"yes""#), "disk_encrypted"),
        (base(r#""firewall_on":1"#), "firewall_on"),
        (base(r#""mdm_enrolled":null"#), "mdm_enrolled"),
        (base(r#""processes":"sshd""#), "processes"),
        (base(r#""processes":["ok",""]"#), "processes[1]"),
        (base(r#""custom":{"a":"true"}"#), "custom"),
        (base(r#""custom":{"a":true,"a":false}"#), "repeated"),
        (base(&format!(r#""custom":{{"{long}":true}}"#)), "custom"),
        (base(r#""antivirus":true"#), "antivirus"),
        (
            base(r#""os_family":"linux","os_family":"macos""#),
            "os_family",
        ),
    ];
    for (json, field) in cases {
        let e = err(&json);
        assert!(
            e.contains(field),
            "error for {json} should name {field}: {e}"
        );
        assert!(!e.contains('\n'), "one line: {e}");
    }
}

#[test]
fn counts_and_size_are_capped() {
    let procs: Vec<String> = (0..=MAX_PROCESSES).map(|i| format!("\"p{i}\"")).collect();
    let json = format!(
        r#"{{"collected_at":"2026-11-23T13:00:00Z","processes":[{}]}}"#,
        procs.join(",")
    );
    assert!(err(&json).contains("processes"), "{}", err(&json));
    let checks: Vec<String> = (0..=MAX_CUSTOM_CHECKS)
        .map(|i| format!("\"c{i}\":true"))
        .collect();
    let json = format!(
        r#"{{"collected_at":"2026-11-23T13:00:00Z","custom":{{{}}}}}"#,
        checks.join(",")
    );
    assert!(err(&json).contains("custom"), "{}", err(&json));
    let big = vec![b' '; MAX_REPORT_BYTES + 1];
    assert_eq!(
        PostureReport::parse(&big),
        Err(ReportError::TooLarge(MAX_REPORT_BYTES + 1))
    );
    // Exactly at the caps is fine.
    let procs: Vec<String> = (0..MAX_PROCESSES).map(|i| format!("\"p{i}\"")).collect();
    let json = format!(
        r#"{{"collected_at":"2026-11-23T13:00:00Z","processes":[{}]}}"#,
        procs.join(",")
    );
    assert_eq!(
        PostureReport::parse(json.as_bytes())
            .expect("at the cap")
            .facts
            .processes
            .len(),
        MAX_PROCESSES
    );
}

#[test]
fn not_json_or_not_an_object_is_malformed() {
    for bad in [
        &b""[..],
        b"null",
        b"[]",
        b"\"x\"",
        b"{",
        b"\xff\xfe",
        b"{\"collected_at\":\"2026-11-23T13:00:00Z\"} trailing",
    ] {
        assert!(
            matches!(PostureReport::parse(bad), Err(ReportError::Malformed(_))),
            "{bad:?}"
        );
    }
}
