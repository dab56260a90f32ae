//! Registry snapshot: the data the controller pushes and the gateway decides from.
//!
//! Owns: the serde (JSON) shape of devices, apps, grants and policy access records,
//! shared by the controller (producer; also its `--json` listings) and the gateway
//! (consumer), plus small lookup helpers.
//!
//! Must not touch: storage (SQLite is the controller's), transport (the Unix socket sync
//! protocol is the controller's and gateway's), the firewall or any policy decision (the
//! controller computes the access records; this module only carries them).

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::keys::{DeviceId, DevicePublicKey, KeyError};

/// Everything the gateway needs from the registry, at one revision.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct Snapshot {
    /// Monotonic registry revision (bumped by every write).
    pub revision: u64,
    /// Enrolled devices (revoked ones included, flagged).
    pub devices: Vec<DeviceRecord>,
    /// Protected apps.
    pub apps: Vec<AppRecord>,
    /// Which user may reach which app (legacy grants: used only while `access` is absent).
    pub grants: Vec<GrantRecord>,
    /// Policy mode (docs/policy.md, "Enforcement at the gateway"): present once a policy is
    /// applied, and then the only source of truth: a knock is admitted only with a record
    /// for its (device, app) whose `until` has not passed; `grants` are ignored. Absent
    /// (old controllers, no policy applied): `grants` decide.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access: Option<Vec<AccessRecord>>,
    /// Policy mode: why some (device, app) pairs are denied, for pairs denied for a reason
    /// the user can fix (a failing posture requirement, MFA too old). The gateway puts the
    /// requirement and remediation into its signed denial reply. Bounded by the controller
    /// ([`MAX_DENIAL_HINTS`]); absent from old controllers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub denials: Option<Vec<DenialHint>>,
    /// Sessions an admin killed (`postern-controller session kill`) in the last day: the
    /// gateway named closes the session with that id if it is live. Absent from old
    /// controllers. Bounded by the controller ([`MAX_SESSION_KILLS`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kills: Option<Vec<SessionKill>>,
    /// Local decisions (docs/policy.md, "Enforcement at the gateway"): the applied policy
    /// file, which the gateway parses and evaluates itself on every knock, with the knock's
    /// source address. Present: this decides (with `subjects`), and `access`/`denials`/
    /// `grants` are ignored. Absent (old controllers, no policy applied): `access` or
    /// `grants` decide as before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<PolicyText>,
    /// With `policy`: what the policy needs to know about each non-revoked device (its
    /// user, groups, risk, last MFA and precomputed posture verdicts; never the raw
    /// posture facts). A top-level array so a delta carries only the changed devices. A
    /// device without a subject is denied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subjects: Option<Vec<PolicySubject>>,
}

/// The applied policy file as the controller stores it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct PolicyText {
    /// The TOML text exactly as applied (docs/policy.md).
    pub text: String,
    /// SHA-256 of `text`, lowercase hex (which policy a gateway enforces).
    pub sha256: String,
}

/// One device as the policy engine sees it, with posture as verdicts.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct PolicySubject {
    /// Device id, 32 lowercase hex digits.
    pub device: String,
    /// The owning user.
    pub user: String,
    /// The user's groups.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<String>,
    /// The user is disabled (nothing is allowed).
    #[serde(default, skip_serializing_if = "is_false")]
    pub disabled: bool,
    /// Risk score 0-100.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub risk: u8,
    /// When the user last proved MFA on this device (unix seconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_mfa: Option<u64>,
    /// Per posture requirement the policy uses: the controller's verdict on the device's
    /// latest report. Absent: no report (every requirement fails).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub posture: Option<std::collections::BTreeMap<String, PostureVerdict>>,
}

/// The controller's verdict on one posture requirement.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct PostureVerdict {
    /// Whether the requirement passed.
    pub passed: bool,
    /// Unix seconds from which the verdict is invalid (the report's expiry, or earlier
    /// when an age limit such as `max_days_since_update` runs out first).
    pub expires: u64,
}

fn is_false(b: &bool) -> bool {
    !*b
}

fn is_zero(n: &u8) -> bool {
    *n == 0
}

/// At most this many session kills travel in one snapshot.
pub const MAX_SESSION_KILLS: usize = 10_000;

/// One admin session kill.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct SessionKill {
    /// The gateway's name (as registered, or a local gateway's configured name).
    pub gateway: String,
    /// The gateway's session id (1..=0xFF_FFFF).
    pub session: u32,
    /// When the kill was ordered (unix seconds, the controller's clock). Used to match
    /// only when `opened_at_ms` is absent: a session opened after it is not killed
    /// (session ids are reused).
    pub at: u64,
    /// The killed session's `opened_at_ms` as the gateway itself reported it (the
    /// gateway's clock), when the session was listed. When present the gateway kills
    /// only the session with this id AND exactly this opening time: independent of clock
    /// skew between hosts, and a later session reusing the id is spared. Absent for a
    /// `--force` kill of an unlisted session (and in snapshots from older controllers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub opened_at_ms: Option<u64>,
}

/// At most this many denial hints travel in one snapshot.
pub const MAX_DENIAL_HINTS: usize = 10_000;

/// Why the policy denies one (device, app) pair, and what would fix it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct DenialHint {
    /// Device id, 32 lowercase hex digits.
    pub device: String,
    /// App name.
    pub app: String,
    /// Stable code: `posture_failed`, `posture_unknown`, `posture_expired`, `mfa_too_old`.
    pub reason: String,
    /// The failing requirement in words (e.g. `disk encryption`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requirement: Option<String>,
    /// The policy's remediation text for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remediation: Option<String>,
}

/// One (device, app) pair the controller's policy allows, computed without the knock's
/// source address (rules restricted to source networks grant nothing here).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct AccessRecord {
    /// Device id, 32 lowercase hex digits.
    pub device: String,
    /// App name.
    pub app: String,
    /// Unix seconds from which the record no longer admits (the decision may stop
    /// holding then: MFA age, posture expiry, time window end). Absent: no time limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<u64>,
}

impl AccessRecord {
    /// Whether the record admits at `now_secs` (unix seconds).
    pub fn admits_at(&self, now_secs: u64) -> bool {
        self.until.is_none_or(|u| u > now_secs)
    }
}

/// One enrolled device.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct DeviceRecord {
    /// Device id, 32 lowercase hex digits.
    pub id: String,
    /// Unique device name.
    pub name: String,
    /// Owning user.
    pub user: String,
    /// `ed25519:<base64>`.
    pub public_key: String,
    /// Revoked devices are refused.
    pub revoked: bool,
}

impl DeviceRecord {
    /// Parse `public_key` (`ed25519:<base64>`). Whether it matches `id` is the caller's check
    /// (`parsed_key()?.device_id() == parsed_id()?`).
    pub fn parsed_key(&self) -> Result<DevicePublicKey, KeyError> {
        DevicePublicKey::from_text(&self.public_key)
    }

    /// Parse `id`.
    pub fn parsed_id(&self) -> Result<DeviceId, KeyError> {
        self.id.parse()
    }
}

/// One protected app.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct AppRecord {
    /// App name (`[a-z0-9._-]`, 1..=64 bytes).
    pub name: String,
    /// Transport protocol.
    pub protocol: AppProtocol,
    /// Destination port on the gateway host.
    pub port: u16,
    /// Forward mode (connector): the app really lives on an internal host behind the
    /// gateway, at this address and port; the gateway DNATs the client's admitted
    /// connections to `port` there. Absent: the app listens on the gateway host itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forward: Option<SocketAddr>,
}

/// Transport protocol of an app. JSON/Display: `"tcp"` / `"udp"`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum AppProtocol {
    /// TCP (IP protocol 6).
    Tcp,
    /// UDP (IP protocol 17).
    Udp,
}

impl AppProtocol {
    /// IP protocol number: 6 for TCP, 17 for UDP.
    pub fn number(self) -> u8 {
        match self {
            AppProtocol::Tcp => 6,
            AppProtocol::Udp => 17,
        }
    }
}

impl fmt::Display for AppProtocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AppProtocol::Tcp => "tcp",
            AppProtocol::Udp => "udp",
        })
    }
}

/// Error from parsing an [`AppProtocol`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown protocol {0:?}: expected \"tcp\" or \"udp\"")]
pub struct ParseAppProtocolError(pub String);

impl FromStr for AppProtocol {
    type Err = ParseAppProtocolError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "tcp" => Ok(AppProtocol::Tcp),
            "udp" => Ok(AppProtocol::Udp),
            other => Err(ParseAppProtocolError(other.to_owned())),
        }
    }
}

/// A grant: `user` may reach `app`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct GrantRecord {
    /// App name.
    pub app: String,
    /// User name.
    pub user: String,
}

impl Snapshot {
    /// The device record with this id (ids compare as parsed bytes, so case does not matter).
    pub fn device(&self, id: &DeviceId) -> Option<&DeviceRecord> {
        self.devices
            .iter()
            .find(|d| d.parsed_id().is_ok_and(|x| x == *id))
    }

    /// The app record with this name.
    pub fn app(&self, name: &str) -> Option<&AppRecord> {
        self.apps.iter().find(|a| a.name == name)
    }

    /// True when a grant lets `user` reach `app`.
    pub fn is_granted(&self, app: &str, user: &str) -> bool {
        self.grants.iter().any(|g| g.app == app && g.user == user)
    }

    /// The denial hint for (`device` id text, `app`), if the controller sent one.
    pub fn denial_hint(&self, device: &str, app: &str) -> Option<&DenialHint> {
        self.denials
            .as_ref()?
            .iter()
            .find(|r| r.app == app && r.device.eq_ignore_ascii_case(device))
    }

    /// The access record for (`device` id text, `app`), in policy mode.
    pub fn access_record(&self, device: &str, app: &str) -> Option<&AccessRecord> {
        self.access
            .as_ref()?
            .iter()
            .find(|r| r.app == app && r.device.eq_ignore_ascii_case(device))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::DeviceSigningKey;

    fn sample() -> Snapshot {
        let pk = DeviceSigningKey::from_seed([4u8; 32]).public_key();
        Snapshot {
            revision: 7,
            devices: vec![DeviceRecord {
                id: pk.device_id().to_string(),
                name: "laptop".into(),
                user: "alice".into(),
                public_key: pk.to_text(),
                revoked: false,
            }],
            apps: vec![
                AppRecord {
                    name: "ssh".into(),
                    protocol: AppProtocol::Tcp,
                    port: 22,
                    forward: None,
                },
                AppRecord {
                    name: "dns".into(),
                    protocol: AppProtocol::Udp,
                    port: 53,
                    forward: Some("10.20.0.5:5353".parse().expect("literal")),
                },
            ],
            grants: vec![GrantRecord {
                app: "ssh".into(),
                user: "alice".into(),
            }],
            access: None,
            denials: None,
            kills: None,
            policy: None,
            subjects: None,
        }
    }

    #[test]
    fn access_is_optional_on_the_wire() {
        // A snapshot from a controller without policy has no `access` key and parses.
        let mut s = sample();
        let json = serde_json::to_string(&s).expect("serialize");
        assert!(!json.contains("access"), "{json}");
        s.access = Some(vec![
            AccessRecord {
                device: s.devices[0].id.clone(),
                app: "ssh".into(),
                until: Some(100),
            },
            AccessRecord {
                device: s.devices[0].id.clone(),
                app: "dns".into(),
                until: None,
            },
        ]);
        let json = serde_json::to_string(&s).expect("serialize");
        let back: Snapshot = serde_json::from_str(&json).expect("deserialize");
        assert_eq!(back, s);
        let id = s.devices[0].id.to_uppercase();
        let ssh = back.access_record(&id, "ssh").expect("ssh record");
        assert!(ssh.admits_at(99) && !ssh.admits_at(100));
        assert!(back
            .access_record(&id, "dns")
            .expect("dns")
            .admits_at(u64::MAX));
        assert!(back.access_record(&id, "web").is_none());
        // An empty list is policy mode with nothing allowed, distinct from absent.
        let empty: Snapshot = serde_json::from_str(
            r#"{"revision":1,"devices":[],"apps":[],"grants":[],"access":[]}"#,
        )
        .expect("empty access");
        assert_eq!(empty.access, Some(vec![]));
    }

    #[test]
    fn denials_are_optional_on_the_wire() {
        let mut s = sample();
        let json = serde_json::to_string(&s).expect("serialize");
        assert!(!json.contains("denials"), "{json}");
        s.denials = Some(vec![DenialHint {
            device: s.devices[0].id.clone(),
            app: "ssh".into(),
            reason: "posture_failed".into(),
            requirement: Some("disk-encryption".into()),
            remediation: None,
        }]);
        let json = serde_json::to_string(&s).expect("serialize");
        assert!(
            !json.contains("remediation"),
            "absent fields are left out: {json}"
        );
        let back: Snapshot = serde_json::from_str(&json).expect("deserialize");
        assert_eq!(back, s);
        let id = s.devices[0].id.to_uppercase();
        let hint = back.denial_hint(&id, "ssh").expect("hint");
        assert_eq!(hint.requirement.as_deref(), Some("disk-encryption"));
        assert!(back.denial_hint(&id, "dns").is_none());
    }

    #[test]
    fn policy_and_subjects_are_optional_and_compact_on_the_wire() {
        let mut s = sample();
        let json = serde_json::to_string(&s).expect("serialize");
        assert!(
            !json.contains("policy") && !json.contains("subjects"),
            "{json}"
        );
        s.policy = Some(PolicyText {
            text: "[[rule]]".into(),
            sha256: "ab".repeat(32),
        });
        let verdict = PostureVerdict {
            passed: true,
            expires: 1_795_000_000,
        };
        s.subjects = Some(vec![
            PolicySubject {
                device: s.devices[0].id.clone(),
                user: "alice".into(),
                groups: vec!["eng".into()],
                disabled: false,
                risk: 20,
                last_mfa: Some(1_794_990_000),
                posture: Some([("disk".to_owned(), verdict)].into_iter().collect()),
            },
            PolicySubject {
                device: "00".repeat(16),
                user: "bob".into(),
                groups: vec![],
                disabled: false,
                risk: 0,
                last_mfa: None,
                posture: None,
            },
        ]);
        let json = serde_json::to_string(&s).expect("serialize");
        let back: Snapshot = serde_json::from_str(&json).expect("deserialize");
        assert_eq!(back, s);
        // Defaults are left out: a subject with nothing set is its device and user.
        let bob = serde_json::to_string(&s.subjects.as_ref().expect("set")[1]).expect("bob");
        assert_eq!(
            bob,
            format!(r#"{{"device":"{}","user":"bob"}}"#, "00".repeat(16))
        );
    }

    #[test]
    fn serde_round_trip() {
        let s = sample();
        let json = serde_json::to_string(&s).expect("serialize");
        assert!(json.contains("\"protocol\":\"tcp\""));
        assert!(json.contains("\"protocol\":\"udp\""));
        let back: Snapshot = serde_json::from_str(&json).expect("deserialize");
        assert_eq!(back, s);
    }

    #[test]
    fn forward_is_optional_on_the_wire() {
        // Old JSON (no `forward`) still parses, and an app without one writes none.
        let old = r#"{"name":"ssh","protocol":"tcp","port":22}"#;
        let app: AppRecord = serde_json::from_str(old).expect("old app record");
        assert_eq!(app.forward, None);
        assert_eq!(serde_json::to_string(&app).expect("serialize"), old);
        let v6 = r#"{"name":"web","protocol":"tcp","port":8443,"forward":"[fd00::5]:80"}"#;
        let app: AppRecord = serde_json::from_str(v6).expect("v6 forward");
        assert_eq!(app.forward, Some("[fd00::5]:80".parse().expect("literal")));
        assert!(serde_json::from_str::<AppRecord>(
            r#"{"name":"w","protocol":"tcp","port":1,"forward":"db.internal:80"}"#
        )
        .is_err());
    }

    #[test]
    fn a_kills_opened_at_ms_is_optional_on_the_wire() {
        // Old JSON (no `opened_at_ms`) still parses, and a kill without one writes none.
        let old = r#"{"gateway":"edge-1","session":5,"at":100}"#;
        let kill: SessionKill = serde_json::from_str(old).expect("old session kill");
        assert_eq!(kill.opened_at_ms, None);
        assert_eq!(serde_json::to_string(&kill).expect("serialize"), old);
        let new = r#"{"gateway":"edge-1","session":5,"at":100,"opened_at_ms":99123}"#;
        let kill: SessionKill = serde_json::from_str(new).expect("new session kill");
        assert_eq!(kill.opened_at_ms, Some(99_123));
        assert_eq!(serde_json::to_string(&kill).expect("serialize"), new);
    }

    #[test]
    fn lookups() {
        let s = sample();
        let pk = DeviceSigningKey::from_seed([4u8; 32]).public_key();
        let d = s.device(&pk.device_id()).expect("device present");
        assert_eq!(d.parsed_key(), Ok(pk));
        assert!(s.device(&DeviceId([0u8; 16])).is_none());
        assert_eq!(s.app("ssh").map(|a| a.port), Some(22));
        assert!(s.is_granted("ssh", "alice"));
        assert!(!s.is_granted("dns", "alice"));
    }

    #[test]
    fn app_protocol_text() {
        assert_eq!("tcp".parse::<AppProtocol>(), Ok(AppProtocol::Tcp));
        assert_eq!(AppProtocol::Udp.to_string(), "udp");
        assert_eq!(AppProtocol::Tcp.number(), 6);
        assert_eq!(AppProtocol::Udp.number(), 17);
        assert!("TCP".parse::<AppProtocol>().is_err());
        assert!(serde_json::from_str::<AppProtocol>("\"sctp\"").is_err());
    }
}
