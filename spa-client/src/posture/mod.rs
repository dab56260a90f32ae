//! Device posture collection on Linux: every collector reads from a root directory (`/` on
//! a real machine, a fixture tree in tests) and the result becomes the report of
//! docs/posture.md (`POST /v1/posture`).
//!
//! Owns: the collector configuration (`posture.toml` in the config directory, overridden by
//! flags), running the collectors, the report JSON and the human table. Must not touch: the
//! network or the device key (the API client signs and sends; see `api_client`), and
//! nothing outside the root except running the programs found under it (`nft`, custom
//! checks).

mod custom;
mod disk;
mod firewall;
mod packages;
pub mod run;
mod system;

use std::path::{Path, PathBuf};
use std::time::Duration;

use jiff::Timestamp;
use postern_policy::report::{MAX_PROCESSES, MAX_STRING_BYTES};
use serde::{Deserialize, Serialize};

pub use custom::MAX_CHECK_OUTPUT;
pub use firewall::ruleset_verdict;

/// Name of the collector settings file in the config directory.
pub const POSTURE_FILE: &str = "posture.toml";
/// Default MDM marker, relative to the root.
pub const DEFAULT_MDM_MARKER: &str = "etc/postern/mdm-enrolled";
/// Default custom checks directory, relative to the root.
pub const DEFAULT_CHECKS_DIR: &str = "etc/postern/checks.d";
/// Default time limit of one custom check.
pub const DEFAULT_CHECK_TIMEOUT: Duration = Duration::from_secs(5);
/// Process names looked for when none are configured: common EDR and audit agents.
pub const DEFAULT_PROCESSES: [&str; 6] = [
    "falcon-sensor",
    "osqueryd",
    "wazuh-agentd",
    "auditd",
    "clamd",
    "sentinelone",
];

/// What the collectors look at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PostureConfig {
    /// Where the file system starts (`/` on a real machine).
    pub root: PathBuf,
    /// Process names to look for (reported in `processes` when running).
    pub processes: Vec<String>,
    /// MDM marker file, relative to the root.
    pub mdm_marker: PathBuf,
    /// Custom checks directory, relative to the root.
    pub checks_dir: PathBuf,
    /// Time limit of one custom check.
    pub check_timeout: Duration,
}

impl Default for PostureConfig {
    fn default() -> Self {
        PostureConfig {
            root: PathBuf::from("/"),
            processes: DEFAULT_PROCESSES.iter().map(|s| s.to_string()).collect(),
            mdm_marker: PathBuf::from(DEFAULT_MDM_MARKER),
            checks_dir: PathBuf::from(DEFAULT_CHECKS_DIR),
            check_timeout: DEFAULT_CHECK_TIMEOUT,
        }
    }
}

/// `posture.toml`: every key optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostureFile {
    pub processes: Option<Vec<String>>,
    pub mdm_marker: Option<PathBuf>,
    pub checks_dir: Option<PathBuf>,
    pub check_timeout_secs: Option<u64>,
}

impl PostureConfig {
    /// Applies `posture.toml` from `dir` when it exists.
    pub fn with_file(mut self, dir: &Path) -> Result<Self, String> {
        let path = dir.join(POSTURE_FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(self),
            Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
        };
        let file: PostureFile = toml::from_str(&text).map_err(|e| {
            format!(
                "{}: {} (keys: processes, mdm_marker, checks_dir, check_timeout_secs)",
                path.display(),
                e.message()
            )
        })?;
        if let Some(p) = file.processes {
            self.processes = p;
        }
        if let Some(m) = file.mdm_marker {
            self.mdm_marker = m;
        }
        if let Some(c) = file.checks_dir {
            self.checks_dir = c;
        }
        if let Some(t) = file.check_timeout_secs {
            if !(1..=60).contains(&t) {
                return Err(format!(
                    "{}: check_timeout_secs must be 1 to 60",
                    path.display()
                ));
            }
            self.check_timeout = Duration::from_secs(t);
        }
        Ok(self)
    }
}

/// A yes/no fact that may be unknown, with how it was found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Probe {
    /// `None`: could not tell (reported as false).
    pub state: Option<bool>,
    pub detail: String,
}

impl Probe {
    pub(crate) fn yes(detail: String) -> Self {
        Probe {
            state: Some(true),
            detail,
        }
    }
    pub(crate) fn no(detail: String) -> Self {
        Probe {
            state: Some(false),
            detail,
        }
    }
    pub(crate) fn unknown(detail: String) -> Self {
        Probe {
            state: None,
            detail,
        }
    }
}

/// One custom check's outcome.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CheckResult {
    pub name: String,
    pub pass: bool,
    pub detail: String,
}

/// Everything collected, with details for the table.
#[derive(Debug, Clone, PartialEq)]
pub struct Collected {
    pub collected_at: Timestamp,
    pub os_id: Option<String>,
    pub os_version: Option<String>,
    pub kernel: Option<String>,
    pub last_package_update: Option<Timestamp>,
    pub package_detail: String,
    pub root_encryption: Probe,
    pub home_encryption: Probe,
    pub firewall: Probe,
    /// (configured name, running).
    pub processes: Vec<(String, bool)>,
    pub mdm: Probe,
    pub custom: Vec<CheckResult>,
}

/// Runs every collector.
pub fn collect(config: &PostureConfig) -> Collected {
    let root = config.root.as_path();
    let (os_id, os_version) = system::os_release(root);
    let (last_package_update, package_detail) = packages::last_update(root);
    let (root_encryption, home_encryption) = disk::root_and_home(root);
    let wanted: Vec<String> = config
        .processes
        .iter()
        .filter_map(|p| clean(p))
        .take(MAX_PROCESSES)
        .collect();
    Collected {
        collected_at: Timestamp::from_second(Timestamp::now().as_second())
            .unwrap_or_else(|_| Timestamp::now()),
        os_id,
        os_version,
        kernel: system::kernel(root),
        last_package_update,
        package_detail,
        root_encryption,
        home_encryption,
        firewall: firewall::firewall(root),
        processes: system::processes(root, &wanted),
        mdm: system::mdm_marker(root, &config.mdm_marker),
        custom: custom::run_checks(root, &config.checks_dir, config.check_timeout),
    }
}

impl Collected {
    /// Both the root and the home file system are on dm-crypt.
    pub fn disk_encrypted(&self) -> bool {
        self.root_encryption.state == Some(true) && self.home_encryption.state == Some(true)
    }

    /// The report of docs/posture.md (unknown facts are left out or false).
    pub fn report(&self) -> serde_json::Value {
        let mut report = serde_json::Map::new();
        report.insert("collected_at".into(), self.collected_at.to_string().into());
        report.insert("os_family".into(), "linux".into());
        if let Some(v) = &self.os_version {
            report.insert("os_version".into(), v.clone().into());
        }
        if let Some(k) = &self.kernel {
            report.insert("kernel".into(), k.clone().into());
        }
        if let Some(t) = self.last_package_update {
            report.insert("last_package_update".into(), t.to_string().into());
        }
        report.insert("disk_encrypted".into(), self.disk_encrypted().into());
        report.insert(
            "firewall_on".into(),
            (self.firewall.state == Some(true)).into(),
        );
        let running: Vec<serde_json::Value> = self
            .processes
            .iter()
            .filter(|(_, r)| *r)
            .map(|(n, _)| n.clone().into())
            .collect();
        report.insert("processes".into(), running.into());
        report.insert("mdm_enrolled".into(), (self.mdm.state == Some(true)).into());
        let custom: serde_json::Map<String, serde_json::Value> = self
            .custom
            .iter()
            .map(|c| (c.name.clone(), c.pass.into()))
            .collect();
        report.insert("custom".into(), custom.into());
        serde_json::Value::Object(report)
    }

    /// The report as bytes, checked with the controller's own parser first.
    pub fn report_bytes(&self) -> Result<Vec<u8>, postern_policy::ReportError> {
        let bytes = serde_json::to_vec(&self.report()).map_err(|e| {
            postern_policy::ReportError::Malformed(format!("cannot encode the report: {e}"))
        })?;
        postern_policy::PostureReport::parse(&bytes)?;
        Ok(bytes)
    }

    /// Rows of (fact, value, how it was found) for the table; failing facts say `FAIL`.
    pub fn rows(&self) -> Vec<(String, String, String)> {
        let opt = |v: &Option<String>| v.clone().unwrap_or_else(|| "unknown".into());
        let probe = |p: &Probe| {
            match p.state {
                Some(true) => "yes",
                Some(false) => "no (FAIL)",
                None => "unknown (FAIL)",
            }
            .to_owned()
        };
        let age = self.last_package_update.map(|t| {
            let days = (self.collected_at.as_second() - t.as_second()).max(0) / 86_400;
            format!("{t} ({days} days ago)")
        });
        let mut rows = vec![
            (
                "os".into(),
                format!("{} {}", opt(&self.os_id), opt(&self.os_version)),
                "etc/os-release ID, VERSION_ID".into(),
            ),
            (
                "kernel".into(),
                opt(&self.kernel),
                "proc/sys/kernel/osrelease".into(),
            ),
            (
                "last package update".into(),
                age.unwrap_or_else(|| "unknown (FAIL)".into()),
                self.package_detail.clone(),
            ),
            (
                "root disk encrypted".into(),
                probe(&self.root_encryption),
                self.root_encryption.detail.clone(),
            ),
            (
                "home disk encrypted".into(),
                probe(&self.home_encryption),
                self.home_encryption.detail.clone(),
            ),
            (
                "firewall".into(),
                probe(&self.firewall),
                self.firewall.detail.clone(),
            ),
        ];
        for (name, running) in &self.processes {
            rows.push((
                format!("process {name}"),
                if *running { "running" } else { "not running" }.into(),
                "proc/*/comm".into(),
            ));
        }
        rows.push((
            "mdm enrolled".into(),
            probe(&self.mdm),
            self.mdm.detail.clone(),
        ));
        for c in &self.custom {
            rows.push((
                format!("check {}", c.name),
                if c.pass { "pass" } else { "FAIL" }.into(),
                c.detail.clone(),
            ));
        }
        rows
    }

    /// The failing facts, one short phrase each (for `postern status`).
    pub fn failing(&self) -> Vec<String> {
        self.rows()
            .into_iter()
            .filter(|(_, v, _)| v.contains("FAIL"))
            .map(|(fact, _, detail)| format!("{fact}: {detail}"))
            .collect()
    }

    /// The table printed by `postern posture`.
    pub fn table(&self) -> String {
        let rows = self.rows();
        let w0 = rows.iter().map(|r| r.0.len()).max().unwrap_or(0);
        let w1 = rows.iter().map(|r| r.1.len()).max().unwrap_or(0);
        let mut out = format!("collected at {}\n", self.collected_at);
        for (fact, value, detail) in rows {
            out.push_str(&format!("{fact:<w0$}  {value:<w1$}  {detail}\n"));
        }
        out
    }
}

/// `rel` under `root` (a leading `/` of `rel` is ignored, so `/etc/x` stays in the root).
pub fn under_root(root: &Path, rel: impl AsRef<Path>) -> PathBuf {
    let rel = rel.as_ref();
    root.join(rel.strip_prefix("/").unwrap_or(rel))
}

/// A report string: trimmed, control characters dropped, at most 128 bytes; `None` if empty.
pub(crate) fn clean(raw: &str) -> Option<String> {
    let mut out = String::new();
    for c in raw.trim().chars().filter(|c| !c.is_control()) {
        if out.len() + c.len_utf8() > MAX_STRING_BYTES {
            break;
        }
        out.push(c);
    }
    let out = out.trim().to_owned();
    (!out.is_empty()).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn posture_file_overrides_defaults_and_refuses_unknown_keys() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = PostureConfig::default()
            .with_file(dir.path())
            .expect("no file is fine");
        assert_eq!(cfg, PostureConfig::default());
        std::fs::write(
            dir.path().join(POSTURE_FILE),
            "processes = [\"edr\"]\nmdm_marker = \"/m\"\ncheck_timeout_secs = 2\n",
        )
        .expect("write");
        let cfg = PostureConfig::default()
            .with_file(dir.path())
            .expect("valid file");
        assert_eq!(cfg.processes, ["edr"]);
        assert_eq!(cfg.mdm_marker, PathBuf::from("/m"));
        assert_eq!(cfg.check_timeout, Duration::from_secs(2));
        assert_eq!(cfg.checks_dir, PathBuf::from(DEFAULT_CHECKS_DIR));
        std::fs::write(dir.path().join(POSTURE_FILE), "proceses = []\n").expect("write");
        let err = PostureConfig::default()
            .with_file(dir.path())
            .expect_err("typo refused");
        assert!(err.contains("proceses") && err.contains("keys:"), "{err}");
        std::fs::write(dir.path().join(POSTURE_FILE), "check_timeout_secs = 0\n").expect("write");
        assert!(PostureConfig::default().with_file(dir.path()).is_err());
    }

    #[test]
    fn report_strings_are_cleaned() {
        assert_eq!(clean("  a\u{7}b \n").as_deref(), Some("ab"));
        assert_eq!(clean("\u{1}\u{2}"), None);
        assert_eq!(clean(&"é".repeat(100)).map(|s| s.len()), Some(128));
        assert_eq!(
            under_root(Path::new("/r"), "/etc/x"),
            PathBuf::from("/r/etc/x")
        );
    }
}
