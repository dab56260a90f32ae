//! The gateway's read-only view of the controller's registry, indexed for the knock path.
//!
//! Owns the conversion of a `Snapshot` (as sent by the controller) into lookup tables:
//! devices by id with parsed public keys, apps by name, grants as (app, user) pairs.
//! Built once per snapshot, then shared immutably. Must not talk to the controller.

use std::collections::{HashMap, HashSet};

use postern_protocol::keys::{DeviceId, DevicePublicKey};
use postern_protocol::snapshot::{AppRecord, Snapshot};

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
        let view = RegistryView {
            revision: snapshot.revision,
            devices,
            apps,
            grants,
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

    pub fn device_count(&self) -> usize {
        self.devices.len()
    }
}
