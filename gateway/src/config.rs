//! The gateway's TOML configuration: parsing and validation at load.
//!
//! Owns the `Config` type and every rule about what a valid configuration is; each
//! bad field yields one error line naming the field and the fix. Must not open
//! sockets, touch the firewall or read key material (only checks the key file's mode).

use std::fmt;
use std::net::IpAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use postern_firewall::AppProto;
use serde::Deserialize;

/// How the gateway receives SPA datagrams.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CaptureMode {
    /// AF_PACKET capture: no listening socket at all, the SPA port stays dropped.
    Sniff,
    /// An ordinary bound UDP socket, for hosts that prefer it.
    Udp,
}

impl fmt::Display for CaptureMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CaptureMode::Sniff => "sniff",
            CaptureMode::Udp => "udp",
        })
    }
}

/// The configuration file as written by the admin.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    key_file: PathBuf,
    #[serde(default = "default_capture")]
    capture: CaptureMode,
    #[serde(default = "default_interface")]
    interface: String,
    #[serde(default = "default_spa_port")]
    spa_port: u16,
    #[serde(default = "default_listen")]
    listen: IpAddr,
    #[serde(default)]
    controller_socket: Option<PathBuf>,
    #[serde(default)]
    controller: Option<String>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default = "default_audit_log")]
    audit_log: String,
    #[serde(default = "default_max_skew_secs")]
    max_skew_secs: u64,
    #[serde(default = "default_pinhole_secs")]
    pinhole_secs: u64,
    #[serde(default = "default_session_secs")]
    session_secs: u64,
    #[serde(default)]
    max_session_secs: Option<u64>,
    #[serde(default = "default_table")]
    table: String,
    #[serde(default)]
    open_ports: Vec<String>,
    #[serde(default = "default_state_dir")]
    state_dir: PathBuf,
    #[serde(default = "default_per_source_rate")]
    per_source_rate: u64,
    #[serde(default = "default_per_source_burst")]
    per_source_burst: u64,
    #[serde(default = "default_source_table_size")]
    source_table_size: u64,
    #[serde(default = "default_crypto_queue")]
    crypto_queue: u64,
    #[serde(default = "default_crypto_budget")]
    crypto_budget: u64,
    #[serde(default = "default_crypto_workers")]
    crypto_workers: u64,
    #[serde(default = "default_drop_lines_per_sec")]
    drop_lines_per_sec: u64,
    #[serde(default = "default_true")]
    require_claimed_addr: bool,
    #[serde(default = "default_true")]
    forward_snat: bool,
}

fn default_true() -> bool {
    true
}

fn default_capture() -> CaptureMode {
    CaptureMode::Sniff
}
fn default_interface() -> String {
    "any".to_owned()
}
fn default_spa_port() -> u16 {
    62201
}
fn default_listen() -> IpAddr {
    IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED)
}
fn default_audit_log() -> String {
    "-".to_owned()
}
fn default_max_skew_secs() -> u64 {
    30
}
fn default_pinhole_secs() -> u64 {
    30
}
fn default_session_secs() -> u64 {
    3600
}
/// `max_session_secs` when not set (unless `session_secs` is longer).
pub const DEFAULT_MAX_SESSION_SECS: u64 = 12 * 3600;
fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/postern-gateway")
}
fn default_per_source_rate() -> u64 {
    20
}
fn default_per_source_burst() -> u64 {
    40
}
fn default_source_table_size() -> u64 {
    65_536
}
fn default_crypto_queue() -> u64 {
    1024
}
fn default_crypto_budget() -> u64 {
    4000
}
fn default_crypto_workers() -> u64 {
    2
}
fn default_drop_lines_per_sec() -> u64 {
    20
}
fn default_table() -> String {
    "postern".to_owned()
}

/// Where audit lines go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuditTarget {
    Stdout,
    File(PathBuf),
}

/// How the gateway reaches its controller (exactly one of the two config fields).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ControllerLink {
    /// `controller_socket`: the controller's Unix socket on this host.
    Socket(PathBuf),
    /// `controller = "HOST:PORT"`: mutual TLS over TCP (needs `postern-gateway enroll`).
    Tls(String),
}

/// A validated gateway configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub key_file: PathBuf,
    pub capture: CaptureMode,
    pub interface: String,
    pub spa_port: u16,
    pub listen: IpAddr,
    pub controller: ControllerLink,
    /// The name this gateway reports its sessions under on the local (Unix socket)
    /// channel (docs/control-channel.md); `None`: `local`.
    pub name: Option<String>,
    pub audit: AuditTarget,
    pub max_skew_ms: u64,
    pub pinhole_secs: u64,
    /// Session length for legacy grants and for older controllers' access records
    /// (a policy's lease and session mode decide otherwise).
    pub session_secs: u64,
    /// No session outlives its opening by more than this, whatever renews it.
    pub max_session_secs: u64,
    pub table: String,
    pub open_ports: Vec<(AppProto, u16)>,
    /// Where the replay journal lives (mode 0700).
    pub state_dir: PathBuf,
    /// Admission limits before any crypto (see `intake.rs`).
    pub intake: crate::intake::IntakeLimits,
    /// Refuse knocks without a signed claimed address (binds a knock to its sender).
    pub require_claimed_addr: bool,
    /// Forward mode: masquerade forwarded flows so internal apps need no route back.
    pub forward_snat: bool,
}

/// A configuration error: one line naming the file, the field and the fix.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config {path}: field `{field}`: {message}")]
    Field {
        path: PathBuf,
        field: &'static str,
        message: String,
    },
}

impl Config {
    /// Reads and validates the file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::parse(&text, path)
    }

    /// Parses and validates `text`; `path` only names the file in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            // toml's message spans several lines (with a caret diagram); keep it to one.
            message: located(text, e.span(), e.message()),
        })?;
        let field = |field: &'static str, message: String| ConfigError::Field {
            path: path.to_owned(),
            field,
            message: one_line(&message),
        };
        if raw.spa_port == 0 {
            return Err(field(
                "spa_port",
                "must be 1..=65535 (default 62201)".into(),
            ));
        }
        if raw.interface.is_empty() || raw.interface.len() > 15 {
            return Err(field(
                "interface",
                "must be an interface name (at most 15 bytes) or \"any\"".into(),
            ));
        }
        if !(1..=600).contains(&raw.max_skew_secs) {
            return Err(field(
                "max_skew_secs",
                format!(
                    "{} is out of range: use 1..=600 (default 30)",
                    raw.max_skew_secs
                ),
            ));
        }
        if !(1..=86_400).contains(&raw.pinhole_secs) {
            return Err(field(
                "pinhole_secs",
                format!(
                    "{} is out of range: use 1..=86400 (default 30)",
                    raw.pinhole_secs
                ),
            ));
        }
        if raw.session_secs < raw.pinhole_secs || raw.session_secs > 30 * 86_400 {
            return Err(field(
                "session_secs",
                format!(
                    "{} is out of range: use pinhole_secs ({})..=2592000",
                    raw.session_secs, raw.pinhole_secs
                ),
            ));
        }
        // Default 12 h, or session_secs when that is longer (old configs stay valid).
        let max_session_secs = raw
            .max_session_secs
            .unwrap_or(DEFAULT_MAX_SESSION_SECS.max(raw.session_secs));
        if max_session_secs < raw.session_secs || max_session_secs > 30 * 86_400 {
            return Err(field(
                "max_session_secs",
                format!(
                    "{max_session_secs} is out of range: use session_secs ({})..=2592000 (default 43200)",
                    raw.session_secs
                ),
            ));
        }
        let table_ok = !raw.table.is_empty()
            && raw.table.len() <= 32
            && raw
                .table
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if !table_ok {
            return Err(field(
                "table",
                "must be 1..=32 characters of [A-Za-z0-9_-] (default \"postern\")".into(),
            ));
        }
        let audit = match raw.audit_log.as_str() {
            "" => {
                return Err(field(
                    "audit_log",
                    "must be \"-\" (stdout) or a file path".into(),
                ))
            }
            "-" => AuditTarget::Stdout,
            p => AuditTarget::File(PathBuf::from(p)),
        };
        let mut open_ports = Vec::with_capacity(raw.open_ports.len());
        for entry in &raw.open_ports {
            open_ports.push(parse_port_spec(entry).ok_or_else(|| {
                field(
                    "open_ports",
                    format!("{entry:?} is not PROTO/PORT: write e.g. \"tcp/22\" or \"udp/53\""),
                )
            })?);
        }
        if !raw.state_dir.is_absolute() {
            return Err(field(
                "state_dir",
                format!(
                    "{:?} is not an absolute path: use e.g. \"/var/lib/postern-gateway\"",
                    raw.state_dir.display().to_string()
                ),
            ));
        }
        let ranged = |name: &'static str, v: u64, lo: u64, hi: u64, default: u64| {
            if (lo..=hi).contains(&v) {
                Ok(v)
            } else {
                Err(field(
                    name,
                    format!("{v} is out of range: use {lo}..={hi} (default {default})"),
                ))
            }
        };
        let intake = crate::intake::IntakeLimits {
            per_source_rate: ranged("per_source_rate", raw.per_source_rate, 1, 100_000, 20)? as u32,
            per_source_burst: ranged("per_source_burst", raw.per_source_burst, 1, 100_000, 40)?
                as u32,
            source_table_size: ranged(
                "source_table_size",
                raw.source_table_size,
                16,
                16_777_216,
                65_536,
            )? as usize,
            crypto_queue: ranged("crypto_queue", raw.crypto_queue, 1, 1_000_000, 1024)? as usize,
            crypto_budget: ranged("crypto_budget", raw.crypto_budget, 1, 1_000_000, 4000)? as u32,
            crypto_workers: ranged("crypto_workers", raw.crypto_workers, 1, 64, 2)? as usize,
            drop_lines_per_sec: ranged(
                "drop_lines_per_sec",
                raw.drop_lines_per_sec,
                0,
                1_000_000,
                20,
            )? as u32,
        };
        check_key_file_mode(&raw.key_file).map_err(|m| field("key_file", m))?;
        if let Some(name) = &raw.name {
            check_gateway_name(name).map_err(|m| field("name", m))?;
        }
        let controller = match (raw.controller_socket, raw.controller) {
            (Some(_), Some(_)) => return Err(field(
                "controller",
                "`controller_socket` and `controller` are both set: keep exactly one (`controller_socket` for a controller on this host, `controller = \"HOST:PORT\"` for TLS)".into(),
            )),
            (None, None) => return Err(field(
                "controller_socket",
                "no controller configured: set exactly one of `controller_socket = \"/var/lib/postern/registry.db.sock\"` (same host) or `controller = \"HOST:PORT\"` (TLS, after `postern-gateway enroll`)".into(),
            )),
            (Some(socket), None) => ControllerLink::Socket(socket),
            (None, Some(address)) => {
                check_controller_address(&address).map_err(|m| field("controller", m))?;
                if raw.name.is_some() {
                    return Err(field(
                        "name",
                        "is for `controller_socket` only: a TLS gateway reports under the name it was registered with (`postern-controller gateway add NAME`); remove `name`".into(),
                    ));
                }
                ControllerLink::Tls(address)
            }
        };
        Ok(Config {
            key_file: raw.key_file,
            capture: raw.capture,
            interface: raw.interface,
            spa_port: raw.spa_port,
            listen: raw.listen,
            controller,
            name: raw.name,
            audit,
            max_skew_ms: raw.max_skew_secs * 1000,
            pinhole_secs: raw.pinhole_secs,
            session_secs: raw.session_secs,
            max_session_secs,
            table: raw.table,
            open_ports,
            state_dir: raw.state_dir,
            intake,
            require_claimed_addr: raw.require_claimed_addr,
            forward_snat: raw.forward_snat,
        })
    }
}

impl Config {
    /// The name this gateway's sessions are reported and killed under
    /// (`postern-controller session list/kill`). Unix socket: the configured `name`, else
    /// `local`. TLS: the registered name from `<state_dir>/control/controller.json`
    /// (written by `postern-gateway enroll`); before enrollment, `local` (`run` refuses
    /// to start without the file anyway).
    pub fn reporting_name(&self) -> String {
        match &self.controller {
            ControllerLink::Socket(_) => self.name.clone().unwrap_or_else(|| "local".to_owned()),
            ControllerLink::Tls(_) => crate::control_enrollment::Enrollment::read(&self.state_dir)
                .map(|e| e.name)
                .unwrap_or_else(|_| "local".to_owned()),
        }
    }
}

/// A gateway name: 1..=64 bytes of `[a-z0-9._-]` (the controller's rule for names).
fn check_gateway_name(name: &str) -> Result<(), String> {
    let ok = (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{name:?} is not a gateway name: use 1-64 characters from a-z, 0-9, '.', '_', '-'"
        ))
    }
}

/// `HOST:PORT` (`[v6]:PORT` for an IPv6 literal), port 1..=65535.
pub fn check_controller_address(address: &str) -> Result<(u16, &str), String> {
    let bad = || {
        format!("{address:?} is not HOST:PORT: write e.g. \"controller.example.net:7443\" or \"[2001:db8::1]:7443\"")
    };
    let (host, port) = address.rsplit_once(':').ok_or_else(bad)?;
    let port: u16 = port.parse().map_err(|_| bad())?;
    let host = match host.strip_prefix('[') {
        Some(v6) => v6.strip_suffix(']').ok_or_else(bad)?,
        None if host.contains(':') => return Err(bad()),
        None => host,
    };
    if port == 0 || host.is_empty() || host.chars().any(|c| c.is_whitespace() || c == '/') {
        return Err(bad());
    }
    Ok((port, host))
}

/// One line: "field `KEY` (line N): MESSAGE", naming the key written on the line the
/// error points at (toml's own message does not always name it).
fn located(text: &str, span: Option<std::ops::Range<usize>>, message: &str) -> String {
    let message = message.trim().replace('\n', "; ");
    let message = message.as_str();
    let Some(r) = span else {
        return message.to_owned();
    };
    let before = text.get(..r.start).unwrap_or("");
    let line_no = before.bytes().filter(|&b| b == b'\n').count() + 1;
    let line = text.lines().nth(line_no - 1).unwrap_or("");
    match line.split_once('=') {
        Some((key, _)) if !key.trim().is_empty() && !message.contains(key.trim()) => {
            format!("field `{}` (line {line_no}): {message}", key.trim())
        }
        _ => format!("{message} (line {line_no})"),
    }
}

/// `message` with every control character escaped (`\n` → `\\n`), so a value quoted
/// back from the file (a path with a newline, say) cannot break the one-line error or
/// forge a second log line.
fn one_line(message: &str) -> String {
    if !message.chars().any(char::is_control) {
        return message.to_owned();
    }
    message
        .chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// "tcp/22" -> (Tcp, 22).
fn parse_port_spec(s: &str) -> Option<(AppProto, u16)> {
    let (proto, port) = s.split_once('/')?;
    let proto = match proto {
        "tcp" => AppProto::Tcp,
        "udp" => AppProto::Udp,
        _ => return None,
    };
    let port: u16 = port.parse().ok()?;
    (port != 0).then_some((proto, port))
}

/// The key file must exist and be readable by its owner only.
fn check_key_file_mode(path: &Path) -> Result<(), String> {
    let meta = std::fs::metadata(path).map_err(|e| {
        format!(
            "{}: {e}: create it with `postern-gateway keygen --out {}`",
            path.display(),
            path.display()
        )
    })?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(format!(
            "{} is readable by others (mode {mode:04o}): run `chmod 600 {}`",
            path.display(),
            path.display()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key_file(dir: &Path) -> PathBuf {
        let p = dir.join("gw.key");
        std::fs::write(&p, "x").expect("write temp key file");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600))
            .expect("chmod temp key file");
        p
    }

    fn parse(extra: &str) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = key_file(dir.path());
        let text = format!(
            "key_file = {:?}\ncontroller_socket = \"/run/c.sock\"\n{extra}",
            key.display().to_string()
        );
        Config::parse(&text, Path::new("gw.toml"))
    }

    #[test]
    fn defaults_are_safe() {
        let c = parse("").expect("minimal config is valid");
        assert_eq!(c.capture, CaptureMode::Sniff);
        assert_eq!(c.spa_port, 62201);
        assert_eq!(c.pinhole_secs, 30);
        assert!(c.open_ports.is_empty());
        assert_eq!(c.audit, AuditTarget::Stdout);
        assert_eq!(c.state_dir, PathBuf::from("/var/lib/postern-gateway"));
        assert_eq!((c.intake.per_source_rate, c.intake.crypto_workers), (20, 2));
    }

    #[test]
    fn each_bad_field_is_named() {
        let cases = [
            ("spa_port = 0", "spa_port"),
            ("capture = \"pcap\"", "capture"),
            ("max_skew_secs = 0", "max_skew_secs"),
            ("pinhole_secs = 0", "pinhole_secs"),
            ("pinhole_secs = 10\nsession_secs = 5", "session_secs"),
            ("table = \"bad table\"", "table"),
            ("open_ports = [\"tcp/0\"]", "open_ports"),
            ("open_ports = [\"sctp/22\"]", "open_ports"),
            ("interface = \"\"", "interface"),
            ("colour = \"blue\"", "colour"),
            ("audit_log = \"\"", "audit_log"),
            ("spa_port = \"x\"", "spa_port"),
            ("state_dir = \"relative/dir\"", "state_dir"),
            ("per_source_rate = 0", "per_source_rate"),
            ("per_source_burst = 0", "per_source_burst"),
            ("source_table_size = 1", "source_table_size"),
            ("crypto_queue = 0", "crypto_queue"),
            ("crypto_budget = 0", "crypto_budget"),
            ("crypto_workers = 0", "crypto_workers"),
            ("drop_lines_per_sec = -1", "drop_lines_per_sec"),
            ("max_session_secs = 60", "max_session_secs"),
            ("max_session_secs = 2592001", "max_session_secs"),
        ];
        for (extra, field) in cases {
            let err = parse(extra).expect_err(extra).to_string();
            assert!(err.contains(field), "{extra:?} gave {err:?}");
            assert!(
                !err.contains('\n'),
                "{extra:?} gave a multi-line error {err:?}"
            );
        }
    }

    #[test]
    fn max_session_secs_defaults_to_12h_or_session_secs_when_longer() {
        assert_eq!(parse("").expect("defaults").max_session_secs, 43_200);
        // An old config with a session longer than 12 h stays valid.
        let c = parse("session_secs = 86400").expect("old config");
        assert_eq!((c.session_secs, c.max_session_secs), (86_400, 86_400));
        let c = parse("max_session_secs = 7200").expect("explicit");
        assert_eq!(c.max_session_secs, 7200);
        let err = parse("session_secs = 7200\nmax_session_secs = 3600")
            .expect_err("shorter than session_secs")
            .to_string();
        assert!(
            err.contains("field `max_session_secs`") && err.contains("session_secs (7200)"),
            "{err}"
        );
    }

    #[test]
    fn syntax_errors_are_one_line() {
        // Found by the gateway_config fuzz target: toml's message spans two lines here.
        for text in ["[S\nY", "key_file = \"x\"\n[[", "= 1", "a = [1,"] {
            let err = Config::parse(text, Path::new("gw.toml"))
                .expect_err(text)
                .to_string();
            assert!(
                !err.contains('\n'),
                "{text:?} gave a multi-line error {err:?}"
            );
        }
    }

    #[test]
    fn quoted_values_cannot_break_the_line() {
        // Found by the gateway_config fuzz target (CI): a key_file path with a newline
        // was echoed verbatim into the error.
        let text = "key_file = \"a\\nb\\u001b[31m\"\ncontroller_socket = \"/c\"";
        let err = Config::parse(text, Path::new("gw.toml"))
            .expect_err("no such key file")
            .to_string();
        assert!(
            !err.chars().any(char::is_control),
            "control character in {err:?}"
        );
        assert!(err.contains("a\\nb\\u{1b}[31m"), "{err}");
    }

    #[test]
    fn missing_required_field_is_named() {
        let err = Config::parse("capture = \"udp\"", Path::new("gw.toml"))
            .expect_err("key_file is required")
            .to_string();
        assert!(err.contains("key_file"), "{err}");
    }

    #[test]
    fn world_readable_key_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = key_file(dir.path());
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let text = format!(
            "key_file = {:?}\ncontroller_socket = \"/c\"\n",
            key.display().to_string()
        );
        let err = Config::parse(&text, Path::new("gw.toml"))
            .expect_err("0644 key refused")
            .to_string();
        assert!(err.contains("chmod 600"), "{err}");
    }

    #[test]
    fn exactly_one_controller_link_is_required() {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = key_file(dir.path());
        let with = |lines: &str| {
            let text = format!("key_file = {:?}\n{lines}", key.display().to_string());
            Config::parse(&text, Path::new("gw.toml"))
        };
        let both = with("controller_socket = \"/c\"\ncontroller = \"ctl:7443\"")
            .expect_err("both refused")
            .to_string();
        assert!(
            both.contains("`controller_socket`")
                && both.contains("`controller`")
                && !both.contains('\n'),
            "{both}"
        );
        let neither = with("").expect_err("neither refused").to_string();
        assert!(
            neither.contains("controller_socket") && neither.contains("controller = "),
            "{neither}"
        );
        let unix = with("controller_socket = \"/c\"").expect("socket alone");
        assert_eq!(unix.controller, ControllerLink::Socket(PathBuf::from("/c")));
        assert_eq!(unix.reporting_name(), "local");
        for good in ["ctl.example.net:7443", "127.0.0.1:1", "[::1]:7443"] {
            let c = with(&format!("controller = {good:?}")).expect(good);
            assert_eq!(c.controller, ControllerLink::Tls(good.to_owned()));
        }
        for bad in [
            "ctl",
            "ctl:0",
            "ctl:99999",
            ":7443",
            "::1:7443",
            "[::1:7443",
            "a b:1",
        ] {
            let err = with(&format!("controller = {bad:?}"))
                .expect_err(bad)
                .to_string();
            assert!(
                err.contains("field `controller`") && err.contains("HOST:PORT"),
                "{bad}: {err}"
            );
        }
        let err = with("controller = \"ctl:7443\"\nname = \"edge-1\"")
            .expect_err("name is Unix-socket only")
            .to_string();
        assert!(err.contains("field `name`"), "{err}");
    }

    #[test]
    fn open_ports_parse() {
        let c = parse("open_ports = [\"tcp/22\", \"udp/53\"]").expect("valid");
        assert_eq!(c.open_ports, vec![(AppProto::Tcp, 22), (AppProto::Udp, 53)]);
    }
}
