//! The gateway's read-only view of the controller's registry, indexed for the knock path.
//!
//! Owns the conversion of a `Snapshot` (as sent by the controller) into lookup tables:
//! devices by id with parsed public keys, apps by name, grants as (app, user) pairs, and in
//! policy mode the controller's access records by (device, app). Built once per snapshot,
//! then shared immutably. Must not talk to the controller or evaluate policy (the
//! controller computes every decision; the gateway only looks them up).

use std::collections::{HashMap, HashSet};

use postern_protocol::keys::{DeviceId, DevicePublicKey};
use postern_protocol::snapshot::{AppRecord, DenialHint, Snapshot, MAX_DENIAL_HINTS};

/// An enrolled device as the gateway needs it.
#[derive(Debug, Clone)]
pub struct DeviceEntry {
    pub name: String,
    pub user: String,
    pub key: DevicePublicKey,
    pub revoked: bool,
}

/// Immutable, indexed registry state at one revision.
#[derive(Debug, Default)]
pub struct RegistryView {
    pub revision: u64,
    devices: HashMap<DeviceId, DeviceEntry>,
    apps: HashMap<String, AppRecord>,
    grants: HashSet<(String, String)>,
    /// Policy mode: (device, app) -> `until` (unix seconds; `None` = no limit). `None`
    /// here means legacy mode (the snapshot had no `access`): `grants` decide.
    access: Option<HashMap<(DeviceId, String), Option<u64>>>,
    /// Policy mode: the controller's denial hints by (device, app), for reply texts.
    denials: HashMap<(DeviceId, String), DenialHint>,
}

/// Why [`RegistryView::permits`] refuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Legacy mode: no grant for the device's user.
    NotGranted,
    /// Policy mode: no access record for (device, app), or its `until` has passed.
    PolicyDenied,
}

impl Refusal {
    /// The audit reason.
    pub fn reason(self) -> &'static str {
        match self {
            Refusal::NotGranted => "not_granted",
            Refusal::PolicyDenied => "policy_denied",
        }
    }
}

impl RegistryView {
    /// Indexes `snapshot`. Records that cannot be used (a bad key, an id that does not
    /// match its key) are left out and described in the returned warnings: a device the
    /// gateway cannot verify can never be let in.
    pub fn from_snapshot(snapshot: &Snapshot) -> (RegistryView, Vec<String>) {
        let mut warnings = Vec::new();
        let mut devices = HashMap::with_capacity(snapshot.devices.len());
        for d in &snapshot.devices {
            let key = match DevicePublicKey::from_text(&d.public_key) {
                Ok(k) => k,
                Err(e) => {
                    warnings.push(format!("device {:?}: unusable public key: {e}", d.name));
                    continue;
                }
            };
            let id = key.device_id();
            if id.to_string() != d.id {
                warnings.push(format!(
                    "device {:?}: id {} does not match its key (expected {id})",
                    d.name, d.id
                ));
                continue;
            }
            devices.insert(
                id,
                DeviceEntry {
                    name: d.name.clone(),
                    user: d.user.clone(),
                    key,
                    revoked: d.revoked,
                },
            );
        }
        let apps = snapshot
            .apps
            .iter()
            .map(|a| (a.name.clone(), a.clone()))
            .collect();
        let grants = snapshot
            .grants
            .iter()
            .map(|g| (g.app.clone(), g.user.clone()))
            .collect();
        let access = snapshot.access.as_ref().map(|records| {
            let mut access = HashMap::with_capacity(records.len());
            for r in records {
                match r.device.parse::<DeviceId>() {
                    // Two records for one pair: the later `until` (none = unlimited) wins.
                    Ok(id) => {
                        let until = access.entry((id, r.app.clone())).or_insert(r.until);
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
        let view = RegistryView {
            revision: snapshot.revision,
            devices,
            apps,
            grants,
            access,
            denials,
        };
        (view, warnings)
    }

    pub fn device(&self, id: &DeviceId) -> Option<&DeviceEntry> {
        self.devices.get(id)
    }

    pub fn app(&self, name: &str) -> Option<&AppRecord> {
        self.apps.get(name)
    }

    pub fn is_granted(&self, app: &str, user: &str) -> bool {
        self.grants.contains(&(app.to_owned(), user.to_owned()))
    }

    /// True when the snapshot carried access records (a policy is applied).
    pub fn policy_mode(&self) -> bool {
        self.access.is_some()
    }

    /// Whether `device` (owned by `user`) may open `app` at `now_secs` (unix seconds).
    /// Policy mode: only an access record for (device, app) whose `until` is absent or
    /// later than `now_secs` admits; grants are ignored. Legacy mode: a grant for `user`.
    pub fn permits(
        &self,
        device: &DeviceId,
        user: &str,
        app: &str,
        now_secs: u64,
    ) -> Result<(), Refusal> {
        match &self.access {
            Some(access) => match access.get(&(*device, app.to_owned())) {
                Some(until) if until.is_none_or(|u| u > now_secs) => Ok(()),
                _ => Err(Refusal::PolicyDenied),
            },
            None if self.is_granted(app, user) => Ok(()),
            None => Err(Refusal::NotGranted),
        }
    }

    /// How many (device, app) access records the view holds (0 in legacy mode).
    pub fn access_count(&self) -> usize {
        self.access.as_ref().map_or(0, HashMap::len)
    }

    /// The controller's reason for denying `device` (id text) the `app`, if it sent one.
    pub fn denial_hint(&self, device: &str, app: &str) -> Option<&DenialHint> {
        let id: DeviceId = device.parse().ok()?;
        self.denials.get(&(id, app.to_owned()))
    }

    pub fn device_count(&self) -> usize {
        self.devices.len()
    }
}
