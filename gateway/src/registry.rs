//! The gateway's read-only view of the controller's registry, indexed for the knock path.
//!
//! Owns the conversion of a `Snapshot` (as sent by the controller) into lookup tables:
//! devices by id with parsed public keys, apps by name, grants as (app, user) pairs, and in
//! policy mode the controller's access records by (device, app), or (local decisions) the
//! parsed policy and per-device subjects (local_policy.rs). Built once per snapshot, then
//! shared immutably; answers "may this device open this app from this address now, and
//! how may it hold it". Must not talk to the controller, keep sessions or read the clock.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;

use crate::local_policy::{unix_ms_of, LocalPolicy};
use postern_policy::{Denial, SessionMode};
use postern_protocol::keys::{DeviceId, DevicePublicKey};
use postern_protocol::snapshot::{
    AppRecord, DenialHint, SessionKill, Snapshot, MAX_DENIAL_HINTS, MAX_SESSION_KILLS,
};

/// An enrolled device as the gateway needs it. Compact on purpose (issue 7: 100,000 of
/// these must fit a small gateway): name and user are spans of the view's one text
/// buffer ([`RegistryView::device_name`], [`RegistryView::device_user`]), not one heap
/// block each: 100,000 small blocks left among the freed garbage of a snapshot load would
/// pin that garbage's pages in memory. The parsed key (192 bytes: the point the
/// signature check needs) is most of an entry.
#[derive(Debug, Clone)]
pub struct DeviceEntry {
    name: TextSpan,
    user: TextSpan,
    pub key: DevicePublicKey,
    pub revoked: bool,
}

/// A string stored in [`RegistryView`]'s text buffer.
#[derive(Debug, Clone, Copy)]
struct TextSpan {
    start: u32,
    len: u32,
}

/// Immutable, indexed registry state at one revision.
#[derive(Debug, Default)]
pub struct RegistryView {
    pub revision: u64,
    /// Unique per view built in this process (a restored controller database can repeat a
    /// revision number with other contents): what "the same view" means to caches.
    generation: u64,
    devices: HashMap<DeviceId, DeviceEntry>,
    /// Device names and users, back to back (see [`DeviceEntry`]).
    text: String,
    /// Apps by name, each with its name interned: a session key holds the `Arc`, so a
    /// knock builds its key without copying the name.
    apps: HashMap<String, (AppRecord, Arc<str>)>,
    /// Legacy grants: app -> users (looked up by borrowed names: no allocation per knock).
    grants: HashMap<String, HashSet<String>>,
    /// Policy mode: (device, app) -> `until` (unix seconds; `None` = no limit). `None`
    /// here means legacy mode (the snapshot had no `access`): `grants` decide.
    /// Keyed by app number ([`RegistryView::access_apps`]), so a lookup borrows the name.
    access: Option<HashMap<(DeviceId, u32), Option<u64>>>,
    /// Policy mode: the numbers of the app names access records name.
    access_apps: HashMap<String, u32>,
    /// Policy mode: the controller's denial hints by (device, app), for reply texts.
    denials: HashMap<(DeviceId, String), DenialHint>,
    /// Admin session kills (all gateways; the daemon picks its own name's).
    kills: Vec<SessionKill>,
    /// Local decisions: the snapshot carried `policy`; then it alone decides.
    local: Option<LocalPolicy>,
}

/// How a permitted session may be held open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hold {
    /// Legacy grants or an older controller's access records: the configured
    /// `session_secs`, renewed by re-knocks.
    Configured,
    /// The policy's lease mode: the grant's lease, renewed by re-knocks.
    Lease,
    /// The policy's verdict mode: held while the decision holds (re-evaluated), no
    /// re-knock needed, up to the maximum session length.
    Verdict,
}

impl Hold {
    /// The mode's name in audit lines and session lists.
    pub fn as_str(self) -> &'static str {
        match self {
            Hold::Configured | Hold::Lease => "lease",
            Hold::Verdict => "verdict",
        }
    }
}

/// What [`RegistryView::permit`] grants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Permit {
    pub hold: Hold,
    /// [`Hold::Lease`]: the rule's lease (ms), the session's kernel timeout; what cuts a
    /// grant short (MFA age, posture expiry) is in `valid_until_ms`.
    pub lease_ms: Option<u64>,
    /// When the decision can stop holding without a new view (unix ms): a live session
    /// is re-evaluated then. `None`: only a new view can change it.
    pub valid_until_ms: Option<u64>,
}

/// Why [`RegistryView::permit`] refuses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// Legacy mode: no grant for the device's user.
    NotGranted,
    /// Policy mode: no access record for (device, app), or its `until` has passed.
    PolicyDenied,
    /// Local decisions: the policy denies (`None`: no usable policy, or no subject for
    /// the device).
    LocalDenied(Option<Box<Denial>>),
}

impl Refusal {
    /// The audit reason.
    pub fn reason(self) -> &'static str {
        match self {
            Refusal::NotGranted => "not_granted",
            Refusal::PolicyDenied | Refusal::LocalDenied(_) => "policy_denied",
        }
    }
}

impl RegistryView {
    /// Indexes `snapshot`. Records that cannot be used (a bad key, an id that does not
    /// match its key) are left out and described in the returned warnings: a device the
    /// gateway cannot verify can never be let in.
    pub fn from_snapshot(snapshot: &Snapshot) -> (RegistryView, Vec<String>) {
        RegistryView::from_snapshot_after(snapshot, None)
    }

    /// [`RegistryView::from_snapshot`], reusing `previous`'s parsed key for every device
    /// whose id and key bytes are unchanged: a new revision of a big registry then costs
    /// no curve arithmetic for the devices it did not change (decompressing 100,000 keys
    /// took ~0.4 s, the larger part of applying one revision at that size).
    pub fn from_snapshot_after(
        snapshot: &Snapshot,
        previous: Option<&RegistryView>,
    ) -> (RegistryView, Vec<String>) {
        let mut warnings = Vec::new();
        let mut devices = HashMap::with_capacity(snapshot.devices.len());
        let mut text = String::new();
        let mut users: HashMap<&str, TextSpan> = HashMap::new();
        // A snapshot is bounded far below 4 GiB (MAX_LINE), so offsets fit in u32; past
        // that a name would read as empty, never as another device's.
        let store = |text: &mut String, s: &str| {
            let span = TextSpan {
                start: u32::try_from(text.len()).unwrap_or(u32::MAX),
                len: u32::try_from(s.len()).unwrap_or(0),
            };
            if span.start != u32::MAX {
                text.push_str(s);
            }
            span
        };
        for d in &snapshot.devices {
            // Exactly the canonical form (32 lowercase hex digits) names a device.
            let claimed: Option<DeviceId> = (d.id.len() == 32
                && !d.id.bytes().any(|b| b.is_ascii_uppercase()))
            .then(|| d.id.parse().ok())
            .flatten();
            // The previous view holds this id only with a key that derives it (checked when
            // that view was built), so equal bytes mean an equally valid key and id.
            let parsed = DevicePublicKey::text_bytes(&d.public_key).and_then(|bytes| {
                let known = claimed.and_then(|id| {
                    let e = previous?.devices.get(&id)?;
                    (*e.key.as_bytes() == bytes).then_some((e.key, id))
                });
                known.map_or_else(
                    || DevicePublicKey::from_bytes(&bytes).map(|k| (k, k.device_id())),
                    Ok,
                )
            });
            let (key, id) = match parsed {
                Ok(parsed) => parsed,
                Err(e) => {
                    warnings.push(format!("device {:?}: unusable public key: {e}", d.name));
                    continue;
                }
            };
            if claimed != Some(id) {
                warnings.push(format!(
                    "device {:?}: id {} does not match its key (expected {id})",
                    d.name, d.id
                ));
                continue;
            }
            devices.insert(
                id,
                DeviceEntry {
                    name: store(&mut text, &d.name),
                    user: *users
                        .entry(d.user.as_str())
                        .or_insert_with(|| store(&mut text, &d.user)),
                    key,
                    revoked: d.revoked,
                },
            );
        }
        let apps = snapshot
            .apps
            .iter()
            .map(|a| (a.name.clone(), (a.clone(), Arc::from(a.name.as_str()))))
            .collect();
        let mut grants: HashMap<String, HashSet<String>> = HashMap::new();
        for g in &snapshot.grants {
            grants
                .entry(g.app.clone())
                .or_default()
                .insert(g.user.clone());
        }
        let mut access_apps: HashMap<String, u32> = HashMap::new();
        let access = snapshot.access.as_ref().map(|records| {
            let mut access = HashMap::with_capacity(records.len());
            for r in records {
                match r.device.parse::<DeviceId>() {
                    // Two records for one pair: the later `until` (none = unlimited) wins.
                    Ok(id) => {
                        let next = u32::try_from(access_apps.len()).unwrap_or(u32::MAX);
                        let app = *access_apps.entry(r.app.clone()).or_insert(next);
                        let until = access.entry((id, app)).or_insert(r.until);
                        *until = match (*until, r.until) {
                            (Some(a), Some(b)) => Some(a.max(b)),
                            _ => None,
                        };
                    }
                    Err(e) => warnings.push(format!(
                        "access record for app {:?}: unusable device id {:?}: {e}",
                        r.app, r.device
                    )),
                }
            }
            access
        });
        let denials = snapshot
            .denials
            .iter()
            .flatten()
            .take(MAX_DENIAL_HINTS)
            .filter_map(|h| Some(((h.device.parse().ok()?, h.app.clone()), h.clone())))
            .collect();
        let local = snapshot
            .policy
            .as_ref()
            .map(|text| LocalPolicy::new(text, snapshot.subjects.as_deref(), &mut warnings));
        text.shrink_to_fit();
        static GENERATION: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let view = RegistryView {
            generation: GENERATION.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            text,
            local,
            revision: snapshot.revision,
            devices,
            apps,
            grants,
            access,
            access_apps,
            denials,
            kills: snapshot
                .kills
                .iter()
                .flatten()
                .take(MAX_SESSION_KILLS)
                .cloned()
                .collect(),
        };
        (view, warnings)
    }

    /// This view's unique number (see the field).
    pub fn generation(&self) -> u64 {
        self.generation
    }

    pub fn device(&self, id: &DeviceId) -> Option<&DeviceEntry> {
        self.devices.get(id)
    }

    /// `device`'s name.
    pub fn device_name(&self, device: &DeviceEntry) -> &str {
        self.span(device.name)
    }

    /// The user `device` is enrolled to.
    pub fn device_user(&self, device: &DeviceEntry) -> &str {
        self.span(device.user)
    }

    fn span(&self, s: TextSpan) -> &str {
        let start = s.start as usize;
        self.text.get(start..start + s.len as usize).unwrap_or("")
    }

    pub fn app(&self, name: &str) -> Option<&AppRecord> {
        self.apps.get(name).map(|(record, _)| record)
    }

    /// `name`'s app record and its interned name (shared by the session keys).
    pub fn app_entry(&self, name: &str) -> Option<(&AppRecord, &Arc<str>)> {
        self.apps.get(name).map(|(record, name)| (record, name))
    }

    pub fn is_granted(&self, app: &str, user: &str) -> bool {
        self.grants
            .get(app)
            .is_some_and(|users| users.contains(user))
    }

    /// True when a policy is applied (local decisions, or an older controller's access
    /// records): grants are ignored.
    pub fn policy_mode(&self) -> bool {
        self.local.is_some() || self.access.is_some()
    }

    /// The local policy, when the snapshot carried one (it then decides alone).
    pub fn local_policy(&self) -> Option<&LocalPolicy> {
        self.local.as_ref()
    }

    /// Whether `device` (owned by `user`) may open `app` from `source` at `now_ms` (unix
    /// ms), and how the session may be held. Local decisions: `postern_policy::decide`
    /// on the snapshot's policy (every check, source networks included). Else, with
    /// access records: only a record for (device, app) whose `until` is absent or later
    /// than now admits. Else (legacy): a grant for `user`.
    pub fn permit(
        &self,
        device: &DeviceId,
        user: &str,
        app: &str,
        source: IpAddr,
        now_ms: u64,
    ) -> Result<Permit, Refusal> {
        if let Some(local) = &self.local {
            let grant = local
                .decide(device, app, Some(source), now_ms)
                .map_err(|denial| Refusal::LocalDenied(denial.map(Box::new)))?;
            let valid_until_ms = grant.valid_until.map(unix_ms_of);
            return Ok(match grant.session_mode {
                SessionMode::Lease => Permit {
                    hold: Hold::Lease,
                    lease_ms: Some(u64::try_from(grant.lease.as_millis()).unwrap_or(u64::MAX)),
                    valid_until_ms,
                },
                SessionMode::Verdict => Permit {
                    hold: Hold::Verdict,
                    lease_ms: None,
                    valid_until_ms,
                },
            });
        }
        let configured = |valid_until_ms| Permit {
            hold: Hold::Configured,
            lease_ms: None,
            valid_until_ms,
        };
        match &self.access {
            Some(access) => match self
                .access_apps
                .get(app)
                .and_then(|n| access.get(&(*device, *n)))
            {
                Some(until) if until.is_none_or(|u| u.saturating_mul(1000) > now_ms) => {
                    Ok(configured(until.map(|u| u.saturating_mul(1000))))
                }
                _ => Err(Refusal::PolicyDenied),
            },
            None if self.is_granted(app, user) => Ok(configured(None)),
            None => Err(Refusal::NotGranted),
        }
    }

    /// How many (device, app) access records the view holds (0 in legacy mode).
    pub fn access_count(&self) -> usize {
        self.access.as_ref().map_or(0, HashMap::len)
    }

    /// The controller's reason for denying `device` (id text) the `app`, if it sent one
    /// (older controllers' `denials`; local decisions carry their own, see
    /// [`local_policy::hint_of`](crate::local_policy::hint_of)).
    pub fn denial_hint(&self, device: &str, app: &str) -> Option<&DenialHint> {
        let id: DeviceId = device.parse().ok()?;
        self.denials.get(&(id, app.to_owned()))
    }

    /// The admin session kills the snapshot carried (every gateway's).
    pub fn kills(&self) -> &[SessionKill] {
        &self.kills
    }

    pub fn device_count(&self) -> usize {
        self.devices.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use postern_protocol::keys::DeviceSigningKey;
    use postern_protocol::snapshot::DeviceRecord;

    fn record(seed: u8, name: &str, revoked: bool) -> DeviceRecord {
        let public = DeviceSigningKey::from_seed([seed; 32]).public_key();
        DeviceRecord {
            id: public.device_id().to_string(),
            name: name.into(),
            user: "alice".into(),
            public_key: public.to_text(),
            revoked,
        }
    }

    fn snapshot(devices: Vec<DeviceRecord>) -> Snapshot {
        Snapshot {
            revision: 1,
            devices,
            ..Snapshot::default()
        }
    }

    #[test]
    fn a_view_built_after_another_checks_every_record_like_a_first_one() {
        let (a, b) = (record(1, "a", false), record(2, "b", false));
        let (previous, warnings) =
            RegistryView::from_snapshot(&snapshot(vec![a.clone(), b.clone()]));
        assert!(warnings.is_empty(), "{warnings:?}");
        // a revoked and renamed (reused key), b's id now paired with c's key (never
        // reused: the bytes differ), an uppercase id, and a new device.
        let c = record(3, "c", false);
        let mut swapped = b.clone();
        swapped.public_key = c.public_key.clone();
        let mut upper = c.clone();
        upper.id = upper.id.to_uppercase();
        let mut renamed = a.clone();
        renamed.name = "a2".into();
        renamed.revoked = true;
        let next = snapshot(vec![renamed, swapped, upper, record(4, "d", false)]);
        let (after, warnings) = RegistryView::from_snapshot_after(&next, Some(&previous));
        let (fresh, fresh_warnings) = RegistryView::from_snapshot(&next);
        assert_eq!(warnings, fresh_warnings);
        assert_eq!(warnings.len(), 2, "{warnings:?}");
        assert!(warnings
            .iter()
            .all(|w| w.contains("does not match its key")));
        assert_eq!(after.device_count(), 2);
        assert_eq!(fresh.device_count(), 2);
        let id_a: DeviceId = a.id.parse().expect("id");
        let entry = after.device(&id_a).expect("a kept");
        assert!(entry.revoked, "flags come from the new record");
        assert_eq!(after.device_name(entry), "a2");
        let b_id: DeviceId = b.id.parse().expect("id");
        assert!(
            after.device(&b_id).is_none(),
            "b's id with another key is refused"
        );
    }
}
