//! The policy file parser: TOML text in, a validated [`PolicySet`] or one error line out.
//!
//! Owns: the file format (`docs/policy.md`), strictness (unknown fields refused, types and
//! values checked, references resolved) and the wording of every error, which names the
//! rule or requirement, the field and the fix. Must not touch: files (the caller passes the
//! text), the clock, or evaluation. Never panics on any input.

use std::collections::BTreeSet;
use std::time::Duration;

use ipnet::IpNet;
use toml::{Table, Value};

use crate::model::{
    parse_duration, Effect, PolicySet, Requirement, Rule, SessionMode, Version, Window, Zone,
    DAY_NAMES,
};

/// Largest accepted policy file; bigger files are refused before parsing.
pub const MAX_FILE_LEN: usize = 1 << 20;
/// Most rules, requirements, or list entries per field.
pub const MAX_ENTRIES: usize = 10_000;

/// Default lease when an allow rule gives none.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(3_600);

/// One line: where (`rule "x"`, `requirement "y"`, `line 3`), which field, what and the fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("policy {location}{}: {message}", field.as_ref().map(|f| format!(" field {f}")).unwrap_or_default())]
pub struct PolicyError {
    /// `rule "name"`, `rule #3` (when it has no usable name), `requirement "name"` or `file`.
    pub location: String,
    /// The field at fault, if one is.
    pub field: Option<String>,
    /// What is wrong and how to fix it (no newline).
    pub message: String,
}

impl PolicyError {
    fn new(location: &str, field: Option<&str>, message: impl Into<String>) -> PolicyError {
        let message: String = message.into();
        PolicyError {
            location: location.to_owned(),
            field: field.map(str::to_owned),
            message: one_line(&message),
        }
    }
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

const RULE_FIELDS: [&str; 14] = [
    "name",
    "effect",
    "apps",
    "users",
    "groups",
    "posture",
    "mfa_max_age",
    "windows",
    "time_zone",
    "source_networks",
    "max_risk",
    "lease",
    "session_mode",
    "description",
];

const REQUIREMENT_FIELDS: [&str; 12] = [
    "name",
    "remediation",
    "os_family",
    "os_min_version",
    "min_kernel",
    "max_days_since_update",
    "disk_encryption",
    "firewall",
    "processes",
    "mdm",
    "custom",
    "description",
];

/// Parses and validates a policy file's text.
pub fn parse(text: &str) -> Result<PolicySet, PolicyError> {
    if text.len() > MAX_FILE_LEN {
        return Err(PolicyError::new(
            "file",
            None,
            format!(
                "{} bytes is larger than the {MAX_FILE_LEN}-byte limit; split the policy",
                text.len()
            ),
        ));
    }
    let table: Table = text.parse().map_err(|e: toml::de::Error| {
        let at = e
            .span()
            .map(|s| {
                let upto = text.get(..s.start).unwrap_or(text);
                let line = upto.matches('\n').count() + 1;
                format!("line {line}")
            })
            .unwrap_or_else(|| "file".into());
        PolicyError::new(
            &at,
            None,
            format!("not valid TOML: {}", e.message().trim_end_matches('.')),
        )
    })?;
    for key in table.keys() {
        if key != "rule" && key != "requirement" {
            return Err(PolicyError::new(
                "file",
                Some(key),
                "unknown top-level key; a policy file holds only [[rule]] and [[requirement]] tables",
            ));
        }
    }
    let requirements = match table.get("requirement") {
        None => Vec::new(),
        Some(v) => entries(v, "requirement")?
            .iter()
            .enumerate()
            .map(|(i, t)| requirement(t, i))
            .collect::<Result<Vec<_>, _>>()?,
    };
    let mut seen = BTreeSet::new();
    for r in &requirements {
        if !seen.insert(r.name.as_str()) {
            return Err(PolicyError::new(
                &format!("requirement {:?}", r.name),
                Some("name"),
                "defined twice; give each requirement a unique name",
            ));
        }
    }
    let rules = match table.get("rule") {
        None => Vec::new(),
        Some(v) => entries(v, "rule")?
            .iter()
            .enumerate()
            .map(|(i, t)| rule(t, i, &requirements))
            .collect::<Result<Vec<_>, _>>()?,
    };
    let mut seen = BTreeSet::new();
    for r in &rules {
        if !seen.insert(r.name.as_str()) {
            return Err(PolicyError::new(
                &format!("rule {:?}", r.name),
                Some("name"),
                "defined twice; give each rule a unique name",
            ));
        }
    }
    Ok(PolicySet {
        rules,
        requirements,
    })
}

fn entries<'a>(v: &'a Value, kind: &str) -> Result<Vec<&'a Table>, PolicyError> {
    let fix = format!("write each one as a [[{kind}]] table");
    let Value::Array(items) = v else {
        return Err(PolicyError::new("file", Some(kind), fix));
    };
    if items.len() > MAX_ENTRIES {
        return Err(PolicyError::new(
            "file",
            Some(kind),
            format!("more than {MAX_ENTRIES} entries; split the policy"),
        ));
    }
    items
        .iter()
        .map(|i| match i {
            Value::Table(t) => Ok(t),
            _ => Err(PolicyError::new("file", Some(kind), fix.clone())),
        })
        .collect()
}

/// Field readers bound to one entry, so every error names it.
struct Entry<'a> {
    table: &'a Table,
    at: String,
}

impl Entry<'_> {
    fn err(&self, field: &str, message: impl Into<String>) -> PolicyError {
        PolicyError::new(&self.at, Some(field), message)
    }

    fn check_fields(&self, known: &[&str]) -> Result<(), PolicyError> {
        for key in self.table.keys() {
            if !known.contains(&key.as_str()) {
                return Err(self.err(
                    key,
                    format!("unknown field; known fields are {}", known.join(", ")),
                ));
            }
        }
        Ok(())
    }

    fn string(&self, field: &str) -> Result<Option<&str>, PolicyError> {
        match self.table.get(field) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.as_str())),
            Some(v) => Err(self.err(
                field,
                format!("expected a string in quotes, found {}", v.type_str()),
            )),
        }
    }

    fn strings(&self, field: &str) -> Result<Vec<String>, PolicyError> {
        let Some(v) = self.table.get(field) else {
            return Ok(Vec::new());
        };
        let fix = format!("expected a list of strings, e.g. {field} = [\"a\", \"b\"]");
        let Value::Array(items) = v else {
            return Err(self.err(field, fix));
        };
        if items.len() > MAX_ENTRIES {
            return Err(self.err(field, format!("more than {MAX_ENTRIES} entries")));
        }
        let mut out = Vec::with_capacity(items.len());
        for i in items {
            let Value::String(s) = i else {
                return Err(self.err(field, fix));
            };
            if s.trim().is_empty() || s.trim() != s || s.chars().any(char::is_control) {
                return Err(self.err(
                    field,
                    format!(
                        "{s:?} is not a usable name; remove empty names and surrounding spaces"
                    ),
                ));
            }
            if out.contains(s) {
                return Err(self.err(field, format!("{s:?} is listed twice; list it once")));
            }
            out.push(s.clone());
        }
        Ok(out)
    }

    fn integer(&self, field: &str, max: u32) -> Result<Option<u32>, PolicyError> {
        match self.table.get(field) {
            None => Ok(None),
            Some(Value::Integer(n)) if (0..=i64::from(max)).contains(n) => {
                Ok(u32::try_from(*n).ok())
            }
            Some(Value::Integer(n)) => Err(self.err(
                field,
                format!("{n} is out of range; use a whole number from 0 to {max}"),
            )),
            Some(v) => Err(self.err(
                field,
                format!(
                    "expected a whole number from 0 to {max}, found {}",
                    v.type_str()
                ),
            )),
        }
    }

    /// A `true`-only switch: `false` requires nothing and is refused as misleading.
    fn switch(&self, field: &str) -> Result<bool, PolicyError> {
        match self.table.get(field) {
            None => Ok(false),
            Some(Value::Boolean(true)) => Ok(true),
            Some(Value::Boolean(false)) => Err(self.err(
                field,
                "false requires nothing; remove the line (only true is meaningful)",
            )),
            Some(v) => Err(self.err(field, format!("expected true, found {}", v.type_str()))),
        }
    }

    fn duration(&self, field: &str) -> Result<Option<Duration>, PolicyError> {
        let Some(s) = self.string(field)? else {
            return Ok(None);
        };
        match parse_duration(s) {
            Some(d) if !d.is_zero() => Ok(Some(d)),
            _ => Err(self.err(
                field,
                format!("{s:?} is not a duration; write e.g. \"12h\", \"30m\", \"1h30m\" or \"7d\" (more than zero, at most 366d)"),
            )),
        }
    }

    fn version(&self, field: &str) -> Result<Option<Version>, PolicyError> {
        let Some(s) = self.string(field)? else {
            return Ok(None);
        };
        Version::parse_strict(s).map(Some).ok_or_else(|| {
            self.err(
                field,
                format!("{s:?} is not a version; write dotted numbers, e.g. \"22.04\" or \"6.1\""),
            )
        })
    }
}

fn entry_name<'a>(
    table: &'a Table,
    kind: &str,
    index: usize,
) -> Result<Entry<'a>, (Entry<'a>, String)> {
    match table.get("name") {
        Some(Value::String(s))
            if !s.trim().is_empty()
                && s.trim() == s
                && s.len() <= 128
                && !s.chars().any(char::is_control) =>
        {
            Ok(Entry {
                table,
                at: format!("{kind} {s:?}"),
            })
        }
        _ => {
            let e = Entry {
                table,
                at: format!("{kind} #{}", index + 1),
            };
            Err((e, NAME_FIX.to_owned()))
        }
    }
}

const NAME_FIX: &str =
    "missing or unusable; give it a name = \"...\" (1-128 characters, no surrounding spaces)";

fn requirement(table: &Table, index: usize) -> Result<Requirement, PolicyError> {
    let e = entry_name(table, "requirement", index).map_err(|(e, fix)| e.err("name", fix))?;
    e.check_fields(&REQUIREMENT_FIELDS)?;
    let name = e.string("name")?.unwrap_or_default().to_owned();
    let _ = e.string("description")?;
    let remediation = match e.string("remediation")? {
        Some(r) if !r.trim().is_empty() => one_line(r),
        _ => {
            return Err(e.err(
                "remediation",
                "missing; tell the user what to do when this fails, e.g. remediation = \"Turn on disk encryption\"",
            ))
        }
    };
    let os_family = e.string("os_family")?.map(|s| s.to_ascii_lowercase());
    if os_family.as_deref().is_some_and(|f| f.trim().is_empty()) {
        return Err(e.err(
            "os_family",
            "empty; write e.g. \"linux\", \"macos\" or \"windows\"",
        ));
    }
    let os_min_version = e.version("os_min_version")?;
    if os_min_version.is_some() && os_family.is_none() {
        return Err(e.err(
            "os_min_version",
            "a version needs its OS; add os_family = \"linux\" (or macos, windows)",
        ));
    }
    let r = Requirement {
        name,
        remediation,
        os_family,
        os_min_version,
        min_kernel: e.version("min_kernel")?,
        max_days_since_update: e.integer("max_days_since_update", 3_650)?,
        disk_encryption: e.switch("disk_encryption")?,
        firewall: e.switch("firewall")?,
        processes: e.strings("processes")?,
        mdm: e.switch("mdm")?,
        custom: e.strings("custom")?,
    };
    let checks_something = r.os_family.is_some()
        || r.min_kernel.is_some()
        || r.max_days_since_update.is_some()
        || r.disk_encryption
        || r.firewall
        || !r.processes.is_empty()
        || r.mdm
        || !r.custom.is_empty();
    if !checks_something {
        return Err(e.err(
            "name",
            "the requirement checks nothing; add a check such as disk_encryption = true",
        ));
    }
    Ok(r)
}

fn rule(table: &Table, index: usize, requirements: &[Requirement]) -> Result<Rule, PolicyError> {
    let e = entry_name(table, "rule", index).map_err(|(e, fix)| e.err("name", fix))?;
    e.check_fields(&RULE_FIELDS)?;
    let name = e.string("name")?.unwrap_or_default().to_owned();
    let _ = e.string("description")?;
    let effect = match e.string("effect")? {
        Some("allow") => Effect::Allow,
        Some("deny") => Effect::Deny,
        Some(other) => {
            return Err(e.err(
                "effect",
                format!("{other:?} is not an effect; write effect = \"allow\" or \"deny\""),
            ))
        }
        None => {
            return Err(e.err(
                "effect",
                "missing; write effect = \"allow\" or effect = \"deny\"",
            ))
        }
    };
    let apps = e.strings("apps")?;
    if apps.is_empty() {
        return Err(e.err(
            "apps",
            "missing or empty; list the apps, e.g. apps = [\"ssh-prod\"] (or [\"*\"] for all)",
        ));
    }
    let users = e.strings("users")?;
    let groups = e.strings("groups")?;
    if users.is_empty() && groups.is_empty() {
        return Err(e.err(
            "users",
            "the rule applies to nobody; give users = [...] and/or groups = [...] (users = [\"*\"] for everyone)",
        ));
    }
    let posture = e.strings("posture")?;
    for p in &posture {
        if !requirements.iter().any(|r| &r.name == p) {
            return Err(e.err(
                "posture",
                format!("requirement {p:?} is not defined; add a [[requirement]] with name = {p:?} or fix the name"),
            ));
        }
    }
    let time_zone = match e.string("time_zone")? {
        None => None,
        Some(name) => match jiff::tz::db().get(name) {
            Ok(tz) => Some(Zone {
                name: name.to_owned(),
                tz,
            }),
            Err(_) => {
                return Err(e.err(
                    "time_zone",
                    format!("{name:?} is not an IANA time zone; write e.g. \"Europe/Berlin\", \"America/New_York\" or \"UTC\""),
                ))
            }
        },
    };
    let windows = windows(&e)?;
    if !windows.is_empty() && time_zone.is_none() {
        return Err(e.err(
            "time_zone",
            "missing; windows need a zone, e.g. time_zone = \"Europe/Berlin\" (or \"UTC\")",
        ));
    }
    if windows.is_empty() && time_zone.is_some() {
        return Err(e.err(
            "windows",
            "time_zone is set but there are no windows; add windows or remove time_zone",
        ));
    }
    let mut source_networks = Vec::new();
    for s in e.strings("source_networks")? {
        let net: IpNet = s.parse().map_err(|_| {
            e.err(
                "source_networks",
                format!("{s:?} is not a CIDR; write e.g. \"10.0.0.0/8\" or \"2001:db8::/32\""),
            )
        })?;
        if net.trunc() != net {
            return Err(e.err(
                "source_networks",
                format!(
                    "{s:?} has host bits set; write the network, {:?}",
                    net.trunc().to_string()
                ),
            ));
        }
        source_networks.push(net);
    }
    let max_risk = e
        .integer("max_risk", 100)?
        .map(|r| u8::try_from(r).unwrap_or(100));
    let mfa_max_age = e.duration("mfa_max_age")?;
    let lease = e.duration("lease")?;
    let session_mode = match e.string("session_mode")? {
        None => None,
        Some("lease") => Some(SessionMode::Lease),
        Some("verdict") => Some(SessionMode::Verdict),
        Some(other) => {
            return Err(e.err(
                "session_mode",
                format!("{other:?} is not a session mode; write \"lease\" or \"verdict\""),
            ))
        }
    };
    if effect == Effect::Deny {
        for field in [
            "posture",
            "mfa_max_age",
            "max_risk",
            "lease",
            "session_mode",
        ] {
            if table.contains_key(field) {
                return Err(e.err(
                    field,
                    "a deny rule cannot carry it (it is a condition for granting); move it to an allow rule, or use source_networks/windows to scope the deny",
                ));
            }
        }
    }
    Ok(Rule {
        name,
        effect,
        apps,
        users,
        groups,
        posture,
        mfa_max_age,
        windows,
        time_zone,
        source_networks,
        max_risk,
        lease: lease.unwrap_or(DEFAULT_LEASE),
        session_mode: session_mode.unwrap_or(SessionMode::Lease),
    })
}

fn windows(e: &Entry<'_>) -> Result<Vec<Window>, PolicyError> {
    let Some(v) = e.table.get("windows") else {
        return Ok(Vec::new());
    };
    let fix = "expected a list like windows = [{ days = [\"mon-fri\"], hours = \"09:00-17:30\" }]";
    let Value::Array(items) = v else {
        return Err(e.err("windows", fix));
    };
    if items.len() > MAX_ENTRIES {
        return Err(e.err("windows", format!("more than {MAX_ENTRIES} entries")));
    }
    let mut out = Vec::new();
    for item in items {
        let Value::Table(t) = item else {
            return Err(e.err("windows", fix));
        };
        for key in t.keys() {
            if key != "days" && key != "hours" {
                return Err(e.err(
                    "windows",
                    format!("unknown key {key:?} in a window; a window has only days and hours"),
                ));
            }
        }
        let days = match t.get("days") {
            Some(Value::Array(ds)) if !ds.is_empty() => {
                let mut days = [false; 7];
                for d in ds {
                    let Value::String(d) = d else {
                        return Err(e.err("windows", fix));
                    };
                    mark_days(d, &mut days).ok_or_else(|| {
                        e.err(
                            "windows",
                            format!("{d:?} is not a day; write mon, tue, wed, thu, fri, sat, sun or a range like \"mon-fri\""),
                        )
                    })?;
                }
                days
            }
            _ => return Err(e.err("windows", format!("a window needs days; {fix}"))),
        };
        let Some(Value::String(hours)) = t.get("hours") else {
            return Err(e.err("windows", format!("a window needs hours; {fix}")));
        };
        let (start, end) = parse_hours(hours).ok_or_else(|| {
            e.err(
                "windows",
                format!("{hours:?} is not a time range; write \"HH:MM-HH:MM\" (24-hour clock, end 24:00 allowed, e.g. \"22:00-06:00\" crosses midnight)"),
            )
        })?;
        out.push(Window { days, start, end });
    }
    Ok(out)
}

fn day_index(d: &str) -> Option<usize> {
    DAY_NAMES.iter().position(|n| *n == d)
}

fn mark_days(spec: &str, days: &mut [bool; 7]) -> Option<()> {
    let spec = spec.to_ascii_lowercase();
    match spec.split_once('-') {
        None => days[day_index(&spec)?] = true,
        Some((a, b)) => {
            let (mut i, end) = (day_index(a)?, day_index(b)?);
            loop {
                days[i] = true;
                if i == end {
                    break;
                }
                i = (i + 1) % 7;
            }
        }
    }
    Some(())
}

fn parse_hours(s: &str) -> Option<(u16, u16)> {
    let (a, b) = s.split_once('-')?;
    let start = parse_clock(a, false)?;
    let end = parse_clock(b, true)?;
    // Equal ends would be either empty or all day: refused ("00:00-24:00" is all day).
    (start != end).then_some((start, end))
}

fn parse_clock(s: &str, end: bool) -> Option<u16> {
    let (h, m) = s.split_once(':')?;
    if h.len() != 2 || m.len() != 2 || !h.bytes().chain(m.bytes()).all(|b| b.is_ascii_digit()) {
        return None;
    }
    let (h, m): (u16, u16) = (h.parse().ok()?, m.parse().ok()?);
    match (h, m) {
        (24, 0) if end => Some(1440),
        (0..=23, 0..=59) => Some(h * 60 + m),
        _ => None,
    }
}
