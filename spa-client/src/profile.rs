//! Named profiles: which gateway (host, port, public key) and controller a command talks to,
//! kept in `profiles.toml` in the config directory (`$XDG_CONFIG_HOME/postern/` or
//! `~/.config/postern/`, mode 0700, beside the device key `device.key` and the enrollment
//! record `controller.json`). The file is written with mode 0600.
//!
//! ```toml
//! default = "work"
//!
//! [profiles.work]
//! gateway = "gw.example.org:62201"
//! gateway_key = "x25519:..."
//! controller = "https://controller.example.org:8443"   # optional
//! ```
//!
//! The controller's pinned certificate and the device id stay in `controller.json` (written
//! by `postern enroll`: one per device key); a profile's `controller` is the URL `enroll`
//! uses when `--controller` is not given.
//!
//! Owns: the file, its validation, and [`resolve_profile`] (flags over profile over
//! default), which every command that knocks calls. Must not touch: the device key, the
//! network.

use std::collections::BTreeMap;
use std::os::unix::fs::DirBuilderExt as _;
use std::path::{Path, PathBuf};

use postern_protocol::keys::GatewayPublicKey;
use serde::{Deserialize, Serialize};

use crate::api_client::ControllerUrl;
use crate::exit::{Fix, USAGE};

/// Name of the profiles file in the config directory.
pub const PROFILES_FILE: &str = "profiles.toml";
/// Longest profile name.
pub const MAX_NAME: usize = 64;
/// Environment variable naming the profile (same as `--profile`).
pub const PROFILE_ENV: &str = "POSTERN_PROFILE";

/// One profile.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    /// `HOST`, `HOST:PORT`, `ADDR`, `[V6]:PORT` (port 62201 when omitted).
    pub gateway: String,
    /// `x25519:...` as printed by `postern-gateway keygen`.
    pub gateway_key: String,
    /// `https://HOST:PORT` of the controller's client API.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub controller: Option<String>,
}

impl Profile {
    /// Checks every field; the error names it.
    pub fn validate(&self) -> Result<(), Fix> {
        let bad = |m: String| Fix::new(USAGE, m);
        if self.gateway.trim().is_empty()
            || self.gateway.chars().any(char::is_whitespace)
            || !gateway_port_ok(&self.gateway)
        {
            return Err(bad(format!(
                "--gateway {:?}: expected HOST, HOST:PORT or [V6]:PORT",
                self.gateway
            )));
        }
        GatewayPublicKey::from_text(&self.gateway_key).map_err(|_| {
            bad(
                "--gateway-key: expected the `x25519:...` line printed by `postern-gateway keygen`"
                    .into(),
            )
        })?;
        if let Some(c) = &self.controller {
            ControllerUrl::parse(c).map_err(|e| bad(e.to_string()))?;
        }
        Ok(())
    }
}

/// A port after the host (`HOST:PORT`, `[V6]:PORT`) must be 1-65535; a bare IPv6 address
/// has none.
fn gateway_port_ok(gateway: &str) -> bool {
    if gateway.parse::<std::net::IpAddr>().is_ok() {
        return true;
    }
    let port = match gateway.strip_prefix('[') {
        Some(v6) => match v6.split_once(']') {
            Some((addr, rest)) if addr.parse::<std::net::Ipv6Addr>().is_ok() => {
                match rest.strip_prefix(':') {
                    Some(p) => p,
                    None => return rest.is_empty(),
                }
            }
            _ => return false,
        },
        None => match gateway.split_once(':') {
            Some((host, p)) => {
                if host.is_empty() {
                    return false;
                }
                p
            }
            None => return true,
        },
    };
    port.parse::<u16>().is_ok_and(|p| p != 0)
}

/// The whole `profiles.toml`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profiles {
    /// The profile used when none is named.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default: Option<String>,
    #[serde(default)]
    pub profiles: BTreeMap<String, Profile>,
}

/// The config directory: `$XDG_CONFIG_HOME/postern` or `$HOME/.config/postern`.
pub fn config_dir() -> Result<PathBuf, Fix> {
    let base = match std::env::var_os("XDG_CONFIG_HOME") {
        Some(x) if !x.is_empty() => PathBuf::from(x),
        _ => match std::env::var_os("HOME") {
            Some(h) if !h.is_empty() => PathBuf::from(h).join(".config"),
            _ => {
                return Err(Fix::new(
                    USAGE,
                    "HOME is not set: set HOME or XDG_CONFIG_HOME (or pass --key FILE)",
                ))
            }
        },
    };
    Ok(base.join("postern"))
}

/// Checks a profile name: 1-64 of `A-Za-z0-9_.-`.
pub fn check_name(name: &str) -> Result<(), Fix> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(Fix::new(
            USAGE,
            format!("profile name {name:?}: use 1-{MAX_NAME} letters, digits, '_', '.' or '-'"),
        ))
    }
}

impl Profiles {
    /// Reads `profiles.toml` from `dir` (empty when the file does not exist).
    pub fn load(dir: &Path) -> Result<Self, Fix> {
        let path = dir.join(PROFILES_FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Profiles::default()),
            Err(e) => {
                return Err(Fix::new(
                    USAGE,
                    format!("cannot read {}: {e}", path.display()),
                ))
            }
        };
        let profiles: Profiles = toml::from_str(&text).map_err(|e| {
            Fix::new(
                USAGE,
                format!(
                    "{}: {} (fix or remove the file; see docs/client.md)",
                    path.display(),
                    e.message().trim()
                ),
            )
        })?;
        for (name, p) in &profiles.profiles {
            check_name(name)?;
            p.validate().map_err(|f| {
                Fix::new(
                    USAGE,
                    format!("{} profile {name}: {}", path.display(), f.message),
                )
            })?;
        }
        Ok(profiles)
    }

    /// Writes `profiles.toml` into `dir` (created 0700) with mode 0600, atomically.
    pub fn save(&self, dir: &Path) -> std::io::Result<()> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
        let text = toml::to_string(self).map_err(std::io::Error::other)?;
        crate::private_file::write_private(&dir.join(PROFILES_FILE), text.as_bytes())
    }

    /// Adds a profile; the first one added (or `make_default`) becomes the default.
    pub fn add(&mut self, name: &str, profile: Profile, make_default: bool) -> Result<(), Fix> {
        check_name(name)?;
        profile.validate()?;
        if self.profiles.contains_key(name) {
            return Err(Fix::new(
                USAGE,
                format!("profile {name:?} exists: run `postern profile remove {name}` first"),
            ));
        }
        self.profiles.insert(name.to_owned(), profile);
        if make_default || self.default.is_none() {
            self.default = Some(name.to_owned());
        }
        Ok(())
    }

    /// Removes a profile; when it was the default, the first remaining one (by name) is.
    pub fn remove(&mut self, name: &str) -> Result<Profile, Fix> {
        let p = self.profiles.remove(name).ok_or_else(|| {
            Fix::new(
                super::exit::NO_PROFILE,
                format!("no profile {name:?}: see `postern profile list`"),
            )
        })?;
        if self.default.as_deref() == Some(name) {
            self.default = self.profiles.keys().next().cloned();
        }
        Ok(p)
    }

    /// The named profile, or the default one.
    pub fn pick(&self, selected: Option<&str>) -> Result<(String, &Profile), Fix> {
        let name = match selected {
            Some(n) => n,
            None => self
                .default
                .as_deref()
                .ok_or_else(|| Fix::no_profile("no profile is set up"))?,
        };
        let p = self.profiles.get(name).ok_or_else(|| {
            Fix::no_profile(&format!("no profile {name:?} (see `postern profile list`)"))
        })?;
        Ok((name.to_owned(), p))
    }
}

/// Where to knock: the result of [`resolve_profile`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayTarget {
    /// The profile used, if any (`None` when both flags were given and no profile named).
    pub profile: Option<String>,
    pub gateway: String,
    pub gateway_key: String,
    pub controller: Option<String>,
}

/// Resolves the gateway for a command: explicit flags win field by field over the named
/// profile (`--profile` / `POSTERN_PROFILE`), which wins over the default profile. With both
/// flags and no named profile, no profile file is needed. Reads the config directory
/// ([`config_dir`]).
pub fn resolve_profile(
    selected: Option<&str>,
    gateway_flag: Option<&str>,
    gateway_key_flag: Option<&str>,
) -> Result<GatewayTarget, Fix> {
    resolve_profile_in(&config_dir()?, selected, gateway_flag, gateway_key_flag)
}

/// [`resolve_profile`] with an explicit config directory.
pub fn resolve_profile_in(
    dir: &Path,
    selected: Option<&str>,
    gateway_flag: Option<&str>,
    gateway_key_flag: Option<&str>,
) -> Result<GatewayTarget, Fix> {
    if let (None, Some(g), Some(k)) = (selected, gateway_flag, gateway_key_flag) {
        return Ok(GatewayTarget {
            profile: None,
            gateway: g.to_owned(),
            gateway_key: k.to_owned(),
            controller: None,
        });
    }
    let profiles = Profiles::load(dir)?;
    let (name, p) = profiles.pick(selected).map_err(|f| {
        if gateway_flag.is_some() || gateway_key_flag.is_some() {
            Fix::no_profile(&format!(
                "{} and {} missing",
                f.message.split(':').next().unwrap_or("no profile"),
                if gateway_flag.is_none() {
                    "--gateway"
                } else {
                    "--gateway-key"
                }
            ))
        } else {
            f
        }
    })?;
    Ok(GatewayTarget {
        profile: Some(name),
        gateway: gateway_flag.unwrap_or(&p.gateway).to_owned(),
        gateway_key: gateway_key_flag.unwrap_or(&p.gateway_key).to_owned(),
        controller: p.controller.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "x25519:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";

    fn profile(gw: &str) -> Profile {
        Profile {
            gateway: gw.into(),
            gateway_key: KEY.into(),
            controller: None,
        }
    }

    #[test]
    fn flags_override_profiles_and_default_follows_removal() {
        let dir = tempfile::tempdir().expect("tempdir");
        let err = resolve_profile_in(dir.path(), None, None, None).expect_err("no profile");
        assert_eq!(err.status, crate::exit::NO_PROFILE);
        let mut ps = Profiles::default();
        ps.add("a", profile("gw-a"), false).expect("add a");
        ps.add("b", profile("gw-b:9"), false).expect("add b");
        assert_eq!(ps.default.as_deref(), Some("a"));
        ps.save(dir.path()).expect("save");
        let t = resolve_profile_in(dir.path(), None, None, None).expect("default");
        assert_eq!(
            (t.profile.as_deref(), t.gateway.as_str()),
            (Some("a"), "gw-a")
        );
        let t = resolve_profile_in(dir.path(), Some("b"), Some("other"), None).expect("b");
        assert_eq!(t.gateway, "other");
        assert!(resolve_profile_in(dir.path(), Some("c"), None, None).is_err());
        ps.remove("a").expect("remove");
        assert_eq!(ps.default.as_deref(), Some("b"));
        assert!(ps.add("b", profile("x"), false).is_err(), "duplicate");
        assert!(ps.add("bad name", profile("x"), false).is_err());
        for bad in ["gw:99999", "gw:", ":1", "[::1", "[nope]:1", "gw:1:2"] {
            assert!(ps.add("c", profile(bad), false).is_err(), "{bad}");
        }
        for good in ["gw", "gw:1", "::1", "[::1]", "[::1]:62201", "10.0.0.1"] {
            profile(good).validate().expect(good);
        }
        let mut bad_key = profile("x");
        bad_key.gateway_key = "nope".into();
        assert!(ps.add("c", bad_key, false).is_err());
    }
}
