//! The gateway's TOML config (`postern_gateway::config::Config::parse`, what `run` and
//! `check` load): every field with wrong types and out-of-range values, unknown and
//! duplicate fields, missing required fields, unsafe key files and plain syntax errors.
//! Each must be refused with ONE error line naming the file and the field (syntax errors:
//! the line number).

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use postern_gateway::config::Config;

pub struct Case {
    pub name: String,
    /// Field overrides (`None` removes the field) or, if `raw` is set, the whole file.
    pub set: Vec<(&'static str, Option<String>)>,
    pub raw: Option<String>,
    /// Text the one error line must contain.
    pub needle: String,
}

/// The valid base file, field by field; `{KEY}` is replaced by a 0600 key file.
const BASE: [(&str, &str); 12] = [
    ("key_file", "\"{KEY}\""),
    ("capture", "\"sniff\""),
    ("interface", "\"any\""),
    ("spa_port", "62201"),
    ("listen", "\"::\""),
    ("controller_socket", "\"/run/postern/controller.sock\""),
    ("audit_log", "\"-\""),
    ("max_skew_secs", "30"),
    ("pinhole_secs", "30"),
    ("session_secs", "3600"),
    ("table", "\"postern\""),
    ("open_ports", "[]"),
];

const STRING_FIELDS: [&str; 7] = [
    "key_file",
    "capture",
    "interface",
    "listen",
    "controller_socket",
    "audit_log",
    "table",
];
const INT_FIELDS: [&str; 4] = ["spa_port", "max_skew_secs", "pinhole_secs", "session_secs"];

fn field(name: &str, key: &'static str, value: &str) -> Case {
    Case {
        name: name.to_owned(),
        set: vec![(key, Some(value.to_owned()))],
        raw: None,
        needle: format!("`{key}`"),
    }
}

pub fn cases() -> Vec<Case> {
    let mut c = Vec::new();
    // Wrong TOML types for every field.
    for key in STRING_FIELDS {
        for v in [
            "1",
            "true",
            "1.5",
            "[]",
            "[\"a\"]",
            "{ a = 1 }",
            "1979-05-27T07:32:00Z",
        ] {
            c.push(field(&format!("{key} = {v}"), key, v));
        }
    }
    for key in INT_FIELDS {
        for v in [
            "\"30\"",
            "true",
            "1.5",
            "[1]",
            "{ a = 1 }",
            "-1",
            "nan",
            "inf",
            "1979-05-27",
        ] {
            c.push(field(&format!("{key} = {v}"), key, v));
        }
    }
    for v in [
        "\"tcp/22\"",
        "22",
        "true",
        "[22]",
        "[[\"tcp/22\"]]",
        "{ tcp = 22 }",
        "[\"tcp/22\", 1]",
    ] {
        c.push(field(&format!("open_ports = {v}"), "open_ports", v));
    }
    // Out of range or invalid values.
    for (key, v) in [
        ("spa_port", "0"),
        ("spa_port", "65536"),
        ("spa_port", "99999999999"),
        ("spa_port", "18446744073709551616"),
        ("max_skew_secs", "0"),
        ("max_skew_secs", "601"),
        ("max_skew_secs", "18446744073709551616"),
        ("pinhole_secs", "0"),
        ("pinhole_secs", "86401"),
        ("session_secs", "29"),
        ("session_secs", "0"),
        ("session_secs", "2592001"),
        ("capture", "\"pcap\""),
        ("capture", "\"\""),
        ("capture", "\"SNIFF\""),
        ("capture", "\"Udp\""),
        ("interface", "\"\""),
        ("interface", "\"abcdefghijklmnop\""),
        ("listen", "\"\""),
        ("listen", "\"any\""),
        ("listen", "\"10.0.0.256\""),
        ("listen", "\"::g\""),
        ("listen", "\"10.0.0.1:62201\""),
        ("listen", "\"localhost\""),
        ("table", "\"\""),
        ("table", "\"bad table\""),
        ("table", "\"tablé\""),
        ("table", "\"x;flush ruleset\""),
        ("table", "\"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\""),
        ("audit_log", "\"\""),
        ("key_file", "\"/nonexistent/postern/gateway.key\""),
        ("key_file", "\"{KEY}.missing\""),
        ("key_file", "\"{KEY644}\""),
        ("key_file", "\"{KEY640}\""),
        ("key_file", "\"{KEY604}\""),
    ] {
        c.push(field(&format!("{key} = {v}"), key, v));
    }
    for spec in [
        "tcp/0",
        "sctp/22",
        "tcp",
        "tcp/",
        "/22",
        "tcp/65536",
        "TCP/22",
        "tcp/22/1",
        "tcp/-1",
        " tcp/22",
        "udp/abc",
        "",
        "22/tcp",
        "tcp:22",
    ] {
        c.push(field(
            &format!("open_ports entry {spec:?}"),
            "open_ports",
            &format!("[\"tcp/22\", {spec:?}]"),
        ));
    }
    // Missing required fields.
    for key in ["key_file", "controller_socket"] {
        c.push(Case {
            name: format!("{key} missing"),
            set: vec![(key, None)],
            raw: None,
            needle: format!("`{key}`"),
        });
    }
    // Unknown and duplicate fields.
    for key in [
        "colour",
        "spa-port",
        "SPA_PORT",
        "spaport",
        "open_port",
        "key",
    ] {
        c.push(Case {
            name: format!("unknown field {key}"),
            set: vec![(key, Some("1".into()))],
            raw: None,
            needle: key.to_owned(),
        });
    }
    for key in ["spa_port", "table", "capture"] {
        c.push(Case {
            name: format!("duplicate {key}"),
            set: vec![],
            raw: Some(format!("{{BASE}}{key} = {}\n", base_value(key))),
            needle: key.to_owned(),
        });
    }
    c.push(Case {
        name: "unknown section".into(),
        set: vec![],
        raw: Some("{BASE}[gateway]\nspa_port = 1\n".into()),
        needle: "gateway".into(),
    });
    // Syntax errors: one line with the line number.
    for (name, text) in [
        ("value missing", "{BASE}spa_port =\n"),
        ("key missing", "{BASE}= 1\n"),
        ("no equals sign", "{BASE}spa_port 62201\n"),
        ("open bracket", "{BASE}[\n"),
        ("open array table", "{BASE}[[\n"),
        ("unterminated string", "{BASE}table = \"postern\n"),
        ("unterminated array", "{BASE}open_ports = [\"tcp/22\",\n"),
        ("bad number", "{BASE}spa_port = 0x\n"),
        ("leading zero", "{BASE}spa_port = 062201\n"),
        ("bad escape", "{BASE}table = \"a\\qb\"\n"),
        ("NUL byte", "{BASE}table = \"a\0b\"\n"),
        ("bare word", "{BASE}capture = sniff\n"),
        ("two values on a line", "{BASE}spa_port = 1 2\n"),
        ("lone closing bracket", "{BASE}]\n"),
        ("garbage line", "{BASE}%%%\n"),
        ("binary junk", "{BASE}\u{1}\u{2}\u{3}\n"),
    ] {
        c.push(Case {
            name: format!("syntax: {name}"),
            set: vec![],
            raw: Some(text.to_owned()),
            needle: "line ".into(),
        });
    }
    c.push(Case {
        name: "empty file".into(),
        set: vec![],
        raw: Some(String::new()),
        needle: "key_file".into(),
    });
    c.push(Case {
        name: "array of tables at top".into(),
        set: vec![],
        raw: Some("[[x]]\n".into()),
        needle: "`x`".into(),
    });
    c
}

fn base_value(key: &str) -> &'static str {
    BASE.iter()
        .find(|(k, _)| *k == key)
        .map(|(_, v)| *v)
        .unwrap_or("1")
}

struct Keys {
    _dir: tempfile::TempDir,
    ok: String,
    mode_644: String,
    mode_640: String,
    mode_604: String,
}

fn key_files() -> Keys {
    let dir = tempfile::tempdir().expect("tempdir");
    let make = |name: &str, mode: u32| {
        let p = dir.path().join(name);
        std::fs::write(&p, "postern-gateway-secret:v1:x\n").expect("write key file");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).expect("chmod");
        p.to_str().expect("UTF-8 temp path").to_owned()
    };
    Keys {
        ok: make("gw.key", 0o600),
        mode_644: make("gw644.key", 0o644),
        mode_640: make("gw640.key", 0o640),
        mode_604: make("gw604.key", 0o604),
        _dir: dir,
    }
}

fn render(case: &Case, keys: &Keys) -> String {
    let base: String = BASE
        .iter()
        .filter_map(|(k, v)| {
            let over = case.set.iter().find(|(key, _)| key == k);
            match over {
                Some((_, None)) => None,
                Some((_, Some(v))) => Some(format!("{k} = {v}\n")),
                None => Some(format!("{k} = {v}\n")),
            }
        })
        .collect();
    let extra: String = case
        .set
        .iter()
        .filter(|(k, _)| !BASE.iter().any(|(b, _)| b == k))
        .filter_map(|(k, v)| v.as_ref().map(|v| format!("{k} = {v}\n")))
        .collect();
    let text = match &case.raw {
        Some(raw) => raw.replace("{BASE}", &base),
        None => base + &extra,
    };
    text.replace("{KEY644}", &keys.mode_644)
        .replace("{KEY640}", &keys.mode_640)
        .replace("{KEY604}", &keys.mode_604)
        .replace("{KEY}", &keys.ok)
}

#[test]
fn malformed_gateway_configs_give_one_line_naming_the_field() {
    let keys = key_files();
    // The base file itself is valid.
    let ok = Case {
        name: "base".into(),
        set: vec![],
        raw: None,
        needle: String::new(),
    };
    if let Err(e) = Config::parse(&render(&ok, &keys), Path::new("gw.toml")) {
        panic!("the base config must be valid: {e}");
    }
    let cases = cases();
    let mut failures = Vec::new();
    for case in &cases {
        let text = render(case, &keys);
        match Config::parse(&text, Path::new("gw.toml")) {
            Ok(_) => failures.push(format!("{}: accepted\n{text}", case.name)),
            Err(e) => {
                let line = e.to_string();
                super::assert_one_line(&case.name, &line);
                if !line.starts_with("config gw.toml: ") || !line.contains(&case.needle) {
                    failures.push(format!(
                        "{}: error does not name the file and {:?}: {line}",
                        case.name, case.needle
                    ));
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} config cases wrong:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}
