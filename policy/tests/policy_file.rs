//! The policy file parser on bad files (one table: each case's exact one-line error), the
//! documented example (docs/policy.md must parse), and the diff behind `--dry-run`.

use postern_policy::{diff, parse, Effect, SessionMode};

/// A valid rule body to break one field at a time.
const RULE: &str =
    "[[rule]]\nname = \"r\"\neffect = \"allow\"\napps = [\"ssh\"]\nusers = [\"alice\"]\n";
const REQ: &str =
    "[[requirement]]\nname = \"disk\"\ndisk_encryption = true\nremediation = \"Encrypt\"\n";

#[rustfmt::skip]
fn bad_files() -> Vec<(&'static str, String, &'static str)> {
    vec![
    ("not TOML",                 "[[rule]\n".into(),                              "policy line 1: not valid TOML: "),
    ("unknown top-level key",    "[apps]\nx = 1\n".into(),                        "policy file field apps: unknown top-level key; a policy file holds only [[rule]] and [[requirement]] tables"),
    ("rule as a table",          "[rule]\nname = \"r\"\n".into(),                 "policy file field rule: write each one as a [[rule]] table"),
    ("rule without a name",      "[[rule]]\neffect = \"allow\"\n".into(),         "policy rule #1 field name: missing or unusable; give it a name = \"...\" (1-128 characters, no surrounding spaces)"),
    ("unknown rule field",       format!("{RULE}leese = \"1h\"\n"),               "policy rule \"r\" field leese: unknown field; known fields are name, effect, apps, users, groups, posture, mfa_max_age, windows, time_zone, source_networks, max_risk, lease, session_mode, description"),
    ("bad effect",               RULE.replace("\"allow\"", "\"permit\""),         "policy rule \"r\" field effect: \"permit\" is not an effect; write effect = \"allow\" or \"deny\""),
    ("no effect",                RULE.replace("effect = \"allow\"\n", ""),        "policy rule \"r\" field effect: missing; write effect = \"allow\" or effect = \"deny\""),
    ("no apps",                  RULE.replace("apps = [\"ssh\"]\n", ""),          "policy rule \"r\" field apps: missing or empty; list the apps, e.g. apps = [\"ssh-prod\"] (or [\"*\"] for all)"),
    ("apps not a list",          RULE.replace("[\"ssh\"]", "\"ssh\""),            "policy rule \"r\" field apps: expected a list of strings, e.g. apps = [\"a\", \"b\"]"),
    ("nobody",                   RULE.replace("users = [\"alice\"]\n", ""),       "policy rule \"r\" field users: the rule applies to nobody; give users = [...] and/or groups = [...] (users = [\"*\"] for everyone)"),
    ("duplicate group",          format!("{RULE}groups = [\"eng\", \"eng\"]\n"),  "policy rule \"r\" field groups: \"eng\" is listed twice; list it once"),
    ("undefined requirement",    format!("{RULE}posture = [\"disk\"]\n"),         "policy rule \"r\" field posture: requirement \"disk\" is not defined; add a [[requirement]] with name = \"disk\" or fix the name"),
    ("bad mfa age",              format!("{RULE}mfa_max_age = \"12 hours\"\n"),   "policy rule \"r\" field mfa_max_age: \"12 hours\" is not a duration; write e.g. \"12h\", \"30m\", \"1h30m\" or \"7d\" (more than zero, at most 366d)"),
    ("zero lease",               format!("{RULE}lease = \"0s\"\n"),               "policy rule \"r\" field lease: \"0s\" is not a duration; write e.g. \"12h\", \"30m\", \"1h30m\" or \"7d\" (more than zero, at most 366d)"),
    ("lease as a number",        format!("{RULE}lease = 3600\n"),                 "policy rule \"r\" field lease: expected a string in quotes, found integer"),
    ("risk above 100",           format!("{RULE}max_risk = 101\n"),               "policy rule \"r\" field max_risk: 101 is out of range; use a whole number from 0 to 100"),
    ("negative risk",            format!("{RULE}max_risk = -1\n"),                "policy rule \"r\" field max_risk: -1 is out of range; use a whole number from 0 to 100"),
    ("bad session mode",         format!("{RULE}session_mode = \"fwknop\"\n"),    "policy rule \"r\" field session_mode: \"fwknop\" is not a session mode; write \"lease\" or \"verdict\""),
    ("bad CIDR",                 format!("{RULE}source_networks = [\"10.0.0.0/33\"]\n"), "policy rule \"r\" field source_networks: \"10.0.0.0/33\" is not a CIDR; write e.g. \"10.0.0.0/8\" or \"2001:db8::/32\""),
    ("CIDR with host bits",      format!("{RULE}source_networks = [\"2001:db8::1/32\"]\n"), "policy rule \"r\" field source_networks: \"2001:db8::1/32\" has host bits set; write the network, \"2001:db8::/32\""),
    ("unknown time zone",        format!("{RULE}time_zone = \"Europe/Atlantis\"\nwindows = [{{ days = [\"mon\"], hours = \"09:00-17:00\" }}]\n"), "policy rule \"r\" field time_zone: \"Europe/Atlantis\" is not an IANA time zone; write e.g. \"Europe/Berlin\", \"America/New_York\" or \"UTC\""),
    ("windows without a zone",   format!("{RULE}windows = [{{ days = [\"mon\"], hours = \"09:00-17:00\" }}]\n"), "policy rule \"r\" field time_zone: missing; windows need a zone, e.g. time_zone = \"Europe/Berlin\" (or \"UTC\")"),
    ("zone without windows",     format!("{RULE}time_zone = \"UTC\"\n"),          "policy rule \"r\" field windows: time_zone is set but there are no windows; add windows or remove time_zone"),
    ("bad day",                  format!("{RULE}time_zone = \"UTC\"\nwindows = [{{ days = [\"monday\"], hours = \"09:00-17:00\" }}]\n"), "policy rule \"r\" field windows: \"monday\" is not a day; write mon, tue, wed, thu, fri, sat, sun or a range like \"mon-fri\""),
    ("bad hours",                format!("{RULE}time_zone = \"UTC\"\nwindows = [{{ days = [\"mon\"], hours = \"9-17\" }}]\n"), "policy rule \"r\" field windows: \"9-17\" is not a time range; write \"HH:MM-HH:MM\" (24-hour clock, end 24:00 allowed, e.g. \"22:00-06:00\" crosses midnight)"),
    ("empty window",             format!("{RULE}time_zone = \"UTC\"\nwindows = [{{ days = [\"mon\"], hours = \"09:00-09:00\" }}]\n"), "policy rule \"r\" field windows: \"09:00-09:00\" is not a time range; write \"HH:MM-HH:MM\" (24-hour clock, end 24:00 allowed, e.g. \"22:00-06:00\" crosses midnight)"),
    ("unknown window key",       format!("{RULE}time_zone = \"UTC\"\nwindows = [{{ days = [\"mon\"], hours = \"09:00-10:00\", tz = \"UTC\" }}]\n"), "policy rule \"r\" field windows: unknown key \"tz\" in a window; a window has only days and hours"),
    ("deny with posture",        format!("{REQ}[[rule]]\nname = \"d\"\neffect = \"deny\"\napps = [\"*\"]\nusers = [\"*\"]\nposture = [\"disk\"]\n"), "policy rule \"d\" field posture: a deny rule cannot carry it (it is a condition for granting); move it to an allow rule, or use source_networks/windows to scope the deny"),
    ("deny with lease",          "[[rule]]\nname = \"d\"\neffect = \"deny\"\napps = [\"*\"]\nusers = [\"*\"]\nlease = \"1h\"\n".into(), "policy rule \"d\" field lease: a deny rule cannot carry it (it is a condition for granting); move it to an allow rule, or use source_networks/windows to scope the deny"),
    ("duplicate rule name",      format!("{RULE}{RULE}"),                         "policy rule \"r\" field name: defined twice; give each rule a unique name"),
    ("requirement no remediation", "[[requirement]]\nname = \"disk\"\ndisk_encryption = true\n".into(), "policy requirement \"disk\" field remediation: missing; tell the user what to do when this fails, e.g. remediation = \"Turn on disk encryption\""),
    ("requirement checks nothing", "[[requirement]]\nname = \"x\"\nremediation = \"y\"\n".into(), "policy requirement \"x\" field name: the requirement checks nothing; add a check such as disk_encryption = true"),
    ("requirement switch false", REQ.replace("= true", "= false"),               "policy requirement \"disk\" field disk_encryption: false requires nothing; remove the line (only true is meaningful)"),
    ("version without OS",       format!("{REQ}os_min_version = \"22.04\"\n"),    "policy requirement \"disk\" field os_min_version: a version needs its OS; add os_family = \"linux\" (or macos, windows)"),
    ("bad kernel version",       format!("{REQ}min_kernel = \"6.x\"\n"),          "policy requirement \"disk\" field min_kernel: \"6.x\" is not a version; write dotted numbers, e.g. \"22.04\" or \"6.1\""),
    ("unknown requirement field", format!("{REQ}antivirus = true\n"),             "policy requirement \"disk\" field antivirus: unknown field; known fields are name, remediation, os_family, os_min_version, min_kernel, max_days_since_update, disk_encryption, firewall, processes, mdm, custom, description"),
    ("duplicate requirement",    format!("{REQ}{REQ}"),                           "policy requirement \"disk\" field name: defined twice; give each requirement a unique name"),
    ("update days too large",    format!("{REQ}max_days_since_update = 99999\n"), "policy requirement \"disk\" field max_days_since_update: 99999 is out of range; use a whole number from 0 to 3650"),
    ]
}

#[test]
fn bad_files_give_one_line_naming_rule_and_field() {
    let mut failures = Vec::new();
    let cases = bad_files();
    for (name, text, expected) in &cases {
        match parse(text) {
            Ok(_) => failures.push(format!("{name}: parsed, expected `{expected}`")),
            Err(e) => {
                let line = e.to_string();
                if line.contains('\n') || !line.starts_with(expected) {
                    failures.push(format!(
                        "{name}:\n  expected `{expected}`\n  got      `{line}`"
                    ));
                }
            }
        }
    }
    println!("{} bad-file cases", cases.len());
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn empty_file_is_an_empty_policy() {
    let p = parse("").expect("empty parses");
    assert!(p.rules.is_empty() && p.requirements.is_empty());
}

/// The full example in docs/policy.md parses (the first ```toml block).
fn doc_example() -> String {
    let doc = include_str!("../../docs/policy.md");
    let start = doc
        .find("```toml\n")
        .expect("docs/policy.md has a ```toml example")
        + 8;
    let len = doc[start..].find("```").expect("the example block ends");
    doc[start..start + len].to_owned()
}

#[test]
fn documented_example_parses() {
    let p = parse(&doc_example()).unwrap_or_else(|e| panic!("docs/policy.md example: {e}"));
    assert!(p.rules.len() >= 4, "the example shows several rules");
    assert!(p.rules.iter().any(|r| r.effect == Effect::Deny));
    assert!(p
        .rules
        .iter()
        .any(|r| r.session_mode == SessionMode::Verdict));
    assert!(p.rules.iter().any(|r| !r.windows.is_empty()));
}

#[test]
fn diff_reports_added_removed_and_changed_by_name() {
    let old = parse(&format!(
        "{REQ}{RULE}[[rule]]\nname = \"gone\"\neffect = \"allow\"\napps = [\"x\"]\nusers = [\"*\"]\n"
    ))
    .expect("old parses");
    let new = parse(&format!(
        "{}{}[[rule]]\nname = \"fresh\"\neffect = \"deny\"\napps = [\"x\"]\ngroups = [\"g\"]\n",
        REQ.replace("Encrypt", "Encrypt the disk"),
        RULE.replace("[\"ssh\"]", "[\"ssh\", \"db\"]") + "lease = \"90m\"\n",
    ))
    .expect("new parses");
    let d = diff(&old, &new);
    assert_eq!(d.rules_added, ["fresh"]);
    assert_eq!(d.rules_removed, ["gone"]);
    assert_eq!(d.rules_changed.len(), 1);
    assert_eq!(
        d.rules_changed[0].fields,
        [
            ("apps".into(), "[ssh]".into(), "[ssh, db]".into()),
            ("lease".into(), "1h".into(), "1h30m".into()),
        ]
    );
    assert_eq!(d.requirements_changed[0].name, "disk");
    assert!(!d.rule_order_changed);
    let text = d.to_string();
    assert!(text.contains("+ rule \"fresh\"\n"), "{text}");
    assert!(text.contains("- rule \"gone\"\n"), "{text}");
    assert!(text.contains("    lease: 1h -> 1h30m\n"), "{text}");
    assert!(diff(&new, &new).is_empty());
    assert_eq!(diff(&new, &new).to_string(), "no changes\n");
    // Same meaning, different spelling: no change.
    let a = parse(&format!("{RULE}lease = \"60m\"\n")).expect("parses");
    let b = parse(&format!("{RULE}lease = \"1h\"\n")).expect("parses");
    assert!(diff(&a, &b).is_empty());
}

#[test]
fn rule_order_change_is_reported() {
    let two = |a: &str, b: &str| {
        parse(&format!(
            "{}{}",
            RULE.replace("\"r\"", &format!("{a:?}")),
            RULE.replace("\"r\"", &format!("{b:?}"))
        ))
        .expect("parses")
    };
    let d = diff(&two("a", "b"), &two("b", "a"));
    assert!(d.rule_order_changed && d.rules_changed.is_empty());
}

#[test]
fn durations_and_versions() {
    use postern_policy::{format_duration, parse_duration, Version};
    use std::time::Duration;
    #[rustfmt::skip]
    let durations: [(&str, Option<u64>); 12] = [
        ("90s", Some(90)), ("30m", Some(1_800)), ("12h", Some(43_200)), ("7d", Some(604_800)),
        ("1h30m", Some(5_400)), ("366d", Some(31_622_400)), ("367d", None), ("12", None),
        ("h", None), ("1.5h", None), ("", None), ("9999999999s", None),
    ];
    for (text, secs) in durations {
        assert_eq!(
            parse_duration(text),
            secs.map(Duration::from_secs),
            "{text}"
        );
    }
    assert_eq!(format_duration(Duration::from_secs(93_784)), "1d2h3m4s");
    #[rustfmt::skip]
    let versions: [(&str, &str, bool); 7] = [
        ("6.1.0-13-amd64", "6.1", true), ("6.0.99", "6.1", false), ("22.04", "22.04", true),
        ("22.10", "22.04", true), ("14.2.1 (23C71)", "14.2", true), ("10", "10.0.1", false),
        ("6.10", "6.9", true),
    ];
    for (reported, min, ok) in versions {
        let r = Version::parse_reported(reported).expect("reported version");
        let m = Version::parse_strict(min).expect("strict version");
        assert_eq!(r.at_least(&m), ok, "{reported} >= {min}");
    }
    assert_eq!(Version::parse_reported("unknown"), None);
    assert_eq!(Version::parse_strict("6.1-rc1"), None);
}
