//! Local decisions (docs/policy.md, "Enforcement at the gateway"): the controller's policy
//! file and per-device subjects, parsed once per registry view, and the decision for one
//! knock (device, app, source address, now) with `postern_policy::decide`.
//!
//! Owns: turning `Snapshot::policy` and `Snapshot::subjects` into a parsed `PolicySet` and
//! `postern_policy::Device`s (posture as the controller's verdicts), failing closed when
//! the text does not parse or does not match its SHA-256, and the denial hints of the
//! gateway's own denials. Must not touch: sessions, sockets, the clock (time is passed in)
//! or the policy semantics (the `postern_policy` crate decides).

use std::collections::HashMap;
use std::net::IpAddr;

use postern_policy::{Decision, Denial, Device, Grant, PolicySet, Posture, Request, Timestamp};
use postern_protocol::keys::DeviceId;
use postern_protocol::snapshot::{DenialHint, PolicySubject, PolicyText};

/// The applied policy as the gateway evaluates it.
#[derive(Debug)]
pub struct LocalPolicy {
    /// `None`: the text did not parse or did not match its SHA-256: every knock is denied.
    set: Option<PolicySet>,
    /// The SHA-256 the controller stated (which policy this gateway enforces).
    sha256: String,
    /// Per device, what the engine evaluates (revoked devices have no subject).
    subjects: HashMap<DeviceId, Device>,
}

/// Unix milliseconds as a policy timestamp (saturating).
pub fn timestamp_ms(ms: u64) -> Timestamp {
    i64::try_from(ms)
        .ok()
        .and_then(|ms| Timestamp::from_millisecond(ms).ok())
        .unwrap_or(Timestamp::MAX)
}

/// A policy timestamp as unix milliseconds (0 before 1970).
pub fn unix_ms_of(t: Timestamp) -> u64 {
    u64::try_from(t.as_millisecond()).unwrap_or(0)
}

fn timestamp_secs(secs: u64) -> Timestamp {
    i64::try_from(secs)
        .ok()
        .and_then(|s| Timestamp::from_second(s).ok())
        .unwrap_or(Timestamp::MAX)
}

/// The engine's view of one subject: posture as the controller's verdicts (absent: no
/// report, every requirement fails).
fn device_of(subject: &PolicySubject) -> Device {
    let posture = match &subject.posture {
        None => Posture::Unknown,
        Some(verdicts) => Posture::Verdicts(
            verdicts
                .iter()
                .map(|(name, v)| {
                    let verdict = postern_policy::Verdict {
                        passed: v.passed,
                        expires: timestamp_secs(v.expires),
                        detail: String::new(),
                    };
                    (name.clone(), verdict)
                })
                .collect(),
        ),
    };
    Device {
        id: subject.device.clone(),
        user: subject.user.clone(),
        groups: subject.groups.clone(),
        revoked: false,
        disabled: subject.disabled,
        risk: subject.risk.min(100),
        last_mfa: subject.last_mfa.map(timestamp_secs),
        posture,
    }
}

impl LocalPolicy {
    /// Parses `text` once and indexes `subjects`; problems go to `warnings` (a policy that
    /// cannot be used denies everything; a subject with a bad id is left out, so that
    /// device is denied).
    pub fn new(
        text: &PolicyText,
        subjects: Option<&[PolicySubject]>,
        warnings: &mut Vec<String>,
    ) -> LocalPolicy {
        let digest = ring::digest::digest(&ring::digest::SHA256, text.text.as_bytes());
        let set = if !hex::encode(digest).eq_ignore_ascii_case(&text.sha256) {
            warnings.push(format!(
                "policy text does not match its sha256 {}: every knock is denied",
                text.sha256
            ));
            None
        } else {
            match postern_policy::parse(&text.text) {
                Ok(set) => Some(set),
                Err(e) => {
                    warnings.push(format!(
                        "policy {} does not parse here ({e}): every knock is denied",
                        text.sha256
                    ));
                    None
                }
            }
        };
        let mut by_device = HashMap::with_capacity(subjects.map_or(0, <[_]>::len));
        for s in subjects.into_iter().flatten() {
            match s.device.parse::<DeviceId>() {
                Ok(id) => {
                    by_device.insert(id, device_of(s));
                }
                Err(e) => warnings.push(format!(
                    "policy subject of user {:?}: unusable device id {:?}: {e}",
                    s.user, s.device
                )),
            }
        }
        LocalPolicy {
            set,
            sha256: text.sha256.clone(),
            subjects: by_device,
        }
    }

    /// The SHA-256 of the enforced policy text.
    pub fn sha256(&self) -> &str {
        &self.sha256
    }

    /// Whether the text parsed (else every knock is denied).
    pub fn usable(&self) -> bool {
        self.set.is_some()
    }

    /// How many devices have a subject.
    pub fn subject_count(&self) -> usize {
        self.subjects.len()
    }

    /// The decision for `device` asking for `app` from `source` at `now_ms` (unix ms).
    /// `Err(None)`: no usable policy or no subject for the device (fail closed).
    pub fn decide(
        &self,
        device: &DeviceId,
        app: &str,
        source: Option<IpAddr>,
        now_ms: u64,
    ) -> Result<Grant, Option<Denial>> {
        let (Some(set), Some(subject)) = (&self.set, self.subjects.get(device)) else {
            return Err(None);
        };
        let request = Request {
            device: subject,
            app,
            source,
            now: timestamp_ms(now_ms),
        };
        match postern_policy::decide(set, &request) {
            Decision::Allow(grant) => Ok(grant),
            Decision::Deny(denial) => Err(Some(denial)),
        }
    }
}

/// A local policy denial: why in words (for the audit line) and what the device may be
/// told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyDenial {
    /// The engine's denial in words, e.g. `rule "ssh-lab": source address is not in
    /// source_networks`, or that no usable policy or subject exists. Audit only: never
    /// sent to the device.
    pub why: String,
    /// For the signed denial reply, only when the device can fix the reason itself.
    pub hint: Option<DenialHint>,
}

impl PolicyDenial {
    /// `denial` for `device` and `app`; `None`: no usable policy, or no subject.
    pub fn new(device: &DeviceId, app: &str, denial: Option<&Denial>) -> PolicyDenial {
        match denial {
            Some(d) => PolicyDenial {
                why: d.to_string(),
                hint: hint_of(device, app, d),
            },
            None => PolicyDenial {
                why: "no usable policy, or no policy subject for this device".into(),
                hint: None,
            },
        }
    }
}

/// The denial hint for a reply when the device can fix the reason itself (a failing
/// posture requirement, MFA missing or too old); `None` for the rest.
pub fn hint_of(device: &DeviceId, app: &str, denial: &Denial) -> Option<DenialHint> {
    let reason = denial.fixable_code()?;
    let remediation = match denial.remediation() {
        Some(r) => Some(r.to_owned()).filter(|r| !r.is_empty()),
        None => Some("run `postern login`".to_owned()),
    };
    Some(DenialHint {
        device: device.to_string(),
        app: app.to_owned(),
        reason: reason.to_owned(),
        requirement: denial.requirement().map(str::to_owned),
        remediation,
    })
}
