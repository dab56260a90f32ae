//! The compiled policy: rules and posture requirements after parsing and validation.
//!
//! Owns: the in-memory shape of a policy set and the canonical text form of every field
//! (used by `diff` and `explain`). Must not touch: files, the clock or any I/O; the parser
//! (`file.rs`) is the only way to build these values from text.

use std::fmt;
use std::time::Duration;

use ipnet::IpNet;
use jiff::tz::TimeZone;

/// A parsed and validated policy file.
#[derive(Debug, Clone)]
pub struct PolicySet {
    /// Rules in file order (evaluation order of allow rules).
    pub rules: Vec<Rule>,
    /// Posture requirements by name, in file order.
    pub requirements: Vec<Requirement>,
}

impl PolicySet {
    /// The requirement called `name`, if the file defines it.
    pub fn requirement(&self, name: &str) -> Option<&Requirement> {
        self.requirements.iter().find(|r| r.name == name)
    }

    /// The rule called `name`, if the file defines it.
    pub fn rule(&self, name: &str) -> Option<&Rule> {
        self.rules.iter().find(|r| r.name == name)
    }
}

/// Allow or deny.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    /// Grants the app when every condition of the rule holds.
    Allow,
    /// Refuses the app when the rule's subjects, networks and windows match (deny wins).
    Deny,
}

impl fmt::Display for Effect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Effect::Allow => "allow",
            Effect::Deny => "deny",
        })
    }
}

/// How the gateway holds the access open once granted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionMode {
    /// The device may knock for the length of the lease (DESIGN §7 "lease").
    Lease,
    /// Every knock is a fresh verdict (fwknop-style: one short opening per knock).
    Verdict,
}

impl fmt::Display for SessionMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SessionMode::Lease => "lease",
            SessionMode::Verdict => "verdict",
        })
    }
}

/// One `[[rule]]` entry.
#[derive(Debug, Clone)]
pub struct Rule {
    /// Unique name (errors, explain, diff and decisions refer to it).
    pub name: String,
    /// Allow or deny.
    pub effect: Effect,
    /// App names; `"*"` matches every app.
    pub apps: Vec<String>,
    /// User names; `"*"` matches every user.
    pub users: Vec<String>,
    /// Group names; the rule applies when the user is in any of them.
    pub groups: Vec<String>,
    /// Names of requirements (allow rules only) that must all pass.
    pub posture: Vec<String>,
    /// Maximum age of the last MFA (allow rules only).
    pub mfa_max_age: Option<Duration>,
    /// Time windows, all in `time_zone`; empty means any time.
    pub windows: Vec<Window>,
    /// The IANA time zone of the windows.
    pub time_zone: Option<Zone>,
    /// Source networks; empty means from anywhere.
    pub source_networks: Vec<IpNet>,
    /// Highest risk score still allowed (allow rules only).
    pub max_risk: Option<u8>,
    /// Lease length granted (allow rules; default 1h).
    pub lease: Duration,
    /// Session mode granted (allow rules; default lease).
    pub session_mode: SessionMode,
}

impl Rule {
    /// Whether the rule names this app (or `"*"`).
    pub fn covers_app(&self, app: &str) -> bool {
        self.apps.iter().any(|a| a == "*" || a == app)
    }

    /// The canonical text of every field, in a fixed order (for diff).
    pub fn fields(&self) -> Vec<(&'static str, String)> {
        vec![
            ("effect", self.effect.to_string()),
            ("apps", list(&self.apps)),
            ("users", list(&self.users)),
            ("groups", list(&self.groups)),
            ("posture", list(&self.posture)),
            (
                "mfa_max_age",
                self.mfa_max_age.map_or("none".into(), format_duration),
            ),
            (
                "time_zone",
                self.time_zone
                    .as_ref()
                    .map_or("none".into(), |z| z.name.clone()),
            ),
            (
                "windows",
                list(
                    &self
                        .windows
                        .iter()
                        .map(|w| w.to_string())
                        .collect::<Vec<_>>(),
                ),
            ),
            (
                "source_networks",
                list(
                    &self
                        .source_networks
                        .iter()
                        .map(|n| n.to_string())
                        .collect::<Vec<_>>(),
                ),
            ),
            (
                "max_risk",
                self.max_risk.map_or("none".into(), |r| r.to_string()),
            ),
            ("lease", format_duration(self.lease)),
            ("session_mode", self.session_mode.to_string()),
        ]
    }
}

/// An IANA time zone with its name (the bundled tzdb resolves it; no file is read).
#[derive(Debug, Clone)]
pub struct Zone {
    /// The IANA name as written in the file, e.g. `Europe/Berlin`.
    pub name: String,
    /// The resolved zone with its DST transitions.
    pub tz: TimeZone,
}

/// A weekly window in local wall-clock time: `days` at `start..end` minutes after midnight.
///
/// When `end <= start` the window crosses midnight: it starts on a listed day and ends on
/// the next day (which need not be listed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Window {
    /// Monday = index 0 … Sunday = index 6.
    pub days: [bool; 7],
    /// Minutes after local midnight, inclusive (0..1440).
    pub start: u16,
    /// Minutes after local midnight, exclusive (1..=1440).
    pub end: u16,
}

/// Day names in the file, Monday first.
pub const DAY_NAMES: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];

impl Window {
    /// Whether local weekday `day` (Monday = 0) at `minute` after midnight is inside.
    pub fn contains(&self, day: usize, minute: u16) -> bool {
        let day = day % 7;
        let previous = (day + 6) % 7;
        if self.start < self.end {
            self.days[day] && self.start <= minute && minute < self.end
        } else {
            (self.days[day] && minute >= self.start) || (self.days[previous] && minute < self.end)
        }
    }
}

impl fmt::Display for Window {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let days: Vec<&str> = DAY_NAMES
            .iter()
            .zip(self.days)
            .filter(|(_, on)| *on)
            .map(|(n, _)| *n)
            .collect();
        write!(
            f,
            "{} {:02}:{:02}-{:02}:{:02}",
            days.join(","),
            self.start / 60,
            self.start % 60,
            self.end / 60,
            self.end % 60
        )
    }
}

/// One `[[requirement]]` entry: posture checks with a remediation text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Requirement {
    /// Unique name, referred to by rules' `posture`.
    pub name: String,
    /// What the user must do when it fails (shown with every denial).
    pub remediation: String,
    /// Required OS family (compared case-insensitively), e.g. `linux`, `macos`, `windows`.
    pub os_family: Option<String>,
    /// Minimum OS version (dotted numbers), for `os_family`.
    pub os_min_version: Option<Version>,
    /// Minimum kernel version (dotted numbers).
    pub min_kernel: Option<Version>,
    /// Maximum days since the last package update.
    pub max_days_since_update: Option<u32>,
    /// Disk encryption must be on.
    pub disk_encryption: bool,
    /// The host firewall must be on.
    pub firewall: bool,
    /// Processes that must be running (e.g. the EDR agent).
    pub processes: Vec<String>,
    /// The device must carry the MDM enrollment marker.
    pub mdm: bool,
    /// Custom named checks that must report true.
    pub custom: Vec<String>,
}

impl Requirement {
    /// The canonical text of every field, in a fixed order (for diff).
    pub fn fields(&self) -> Vec<(&'static str, String)> {
        let opt = |v: &Option<Version>| v.as_ref().map_or("none".into(), |v| v.to_string());
        vec![
            ("remediation", format!("{:?}", self.remediation)),
            (
                "os_family",
                self.os_family.clone().unwrap_or_else(|| "none".into()),
            ),
            ("os_min_version", opt(&self.os_min_version)),
            ("min_kernel", opt(&self.min_kernel)),
            (
                "max_days_since_update",
                self.max_days_since_update
                    .map_or("none".into(), |d| d.to_string()),
            ),
            ("disk_encryption", self.disk_encryption.to_string()),
            ("firewall", self.firewall.to_string()),
            ("processes", list(&self.processes)),
            ("mdm", self.mdm.to_string()),
            ("custom", list(&self.custom)),
        ]
    }
}

/// A dotted numeric version (`22.04`, `6.1.0`), compared component by component with
/// missing components as zero (`6.1` == `6.1.0`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Version(pub Vec<u64>);

impl Version {
    /// Strict form used in policy files: digits separated by dots, at most 8 parts.
    pub fn parse_strict(s: &str) -> Option<Version> {
        let parts: Option<Vec<u64>> = s
            .split('.')
            .map(|p| {
                if p.is_empty() || p.len() > 9 || !p.bytes().all(|b| b.is_ascii_digit()) {
                    None
                } else {
                    p.parse().ok()
                }
            })
            .collect();
        parts.filter(|p| !p.is_empty() && p.len() <= 8).map(Version)
    }

    /// Lenient form used for reported facts: the leading dotted numbers of strings like
    /// `6.1.0-13-amd64` or `14.2.1 (23C71)`; `None` when it does not start with a digit.
    pub fn parse_reported(s: &str) -> Option<Version> {
        let mut parts = Vec::new();
        for p in s.trim().split('.') {
            let digits: String = p.chars().take_while(|c| c.is_ascii_digit()).collect();
            if digits.is_empty() || digits.len() > 9 || parts.len() == 8 {
                break;
            }
            parts.push(digits.parse().ok()?);
            if digits.len() != p.len() {
                break;
            }
        }
        (!parts.is_empty()).then_some(Version(parts))
    }

    /// `self >= min`, padding the shorter one with zeros.
    pub fn at_least(&self, min: &Version) -> bool {
        let n = self.0.len().max(min.0.len());
        for i in 0..n {
            let a = self.0.get(i).copied().unwrap_or(0);
            let b = min.0.get(i).copied().unwrap_or(0);
            if a != b {
                return a > b;
            }
        }
        true
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self.0.iter().map(|p| p.to_string()).collect();
        f.write_str(&parts.join("."))
    }
}

/// Canonical duration text: `1d2h3m4s` with zero parts left out (`0s` for zero).
pub fn format_duration(d: Duration) -> String {
    let mut s = d.as_secs();
    if s == 0 {
        return "0s".into();
    }
    let mut out = String::new();
    for (unit, len) in [("d", 86_400), ("h", 3_600), ("m", 60), ("s", 1)] {
        if s >= len {
            out.push_str(&format!("{}{unit}", s / len));
            s %= len;
        }
    }
    out
}

/// Parses `12h`, `30m`, `1h30m`, `90s`, `7d` (whole units, at least one part, at most a
/// year). `None` when malformed.
pub fn parse_duration(text: &str) -> Option<Duration> {
    let mut total: u64 = 0;
    let mut digits = String::new();
    let mut parts = 0;
    for c in text.chars() {
        if c.is_ascii_digit() {
            if digits.len() >= 9 {
                return None;
            }
            digits.push(c);
            continue;
        }
        let unit = match c {
            'd' => 86_400,
            'h' => 3_600,
            'm' => 60,
            's' => 1,
            _ => return None,
        };
        if digits.is_empty() {
            return None;
        }
        let n: u64 = digits.parse().ok()?;
        total = total.checked_add(n.checked_mul(unit)?)?;
        digits.clear();
        parts += 1;
    }
    if !digits.is_empty() || parts == 0 || total > 366 * 86_400 {
        return None;
    }
    Some(Duration::from_secs(total))
}

fn list(items: &[String]) -> String {
    format!("[{}]", items.join(", "))
}
