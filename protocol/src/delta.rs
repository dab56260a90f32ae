//! Snapshot deltas: the changes between two registry snapshots, and applying them.
//!
//! Owns: `diff` (controller side), `apply` (gateway side) and the order-independent
//! `digest` both sides compute to prove that an applied delta produced exactly the
//! controller's snapshot. Generic over the snapshot's JSON form, so a field added to
//! `Snapshot` later is carried by deltas without code here.
//!
//! Must not touch: transport, files, the clock (sans-IO).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::snapshot::Snapshot;

/// The changes from snapshot revision `from` to revision `to`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SnapshotDelta {
    pub from: u64,
    pub to: u64,
    /// Per top-level snapshot field that changed (`revision` is never listed).
    pub changes: BTreeMap<String, FieldChange>,
    /// [`digest`] of the snapshot at `to`.
    pub digest: String,
}

/// How one top-level field changed.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum FieldChange {
    /// The field's new value, whole (non-array fields, or arrays that became/stopped
    /// being arrays).
    Set(serde_json::Value),
    /// The field is absent at `to` (an optional field).
    Unset,
    /// An array field (a multiset of records): remove the elements whose element digest is
    /// listed (one occurrence per listing), then append `add`.
    Elements {
        remove: Vec<String>,
        add: Vec<serde_json::Value>,
    },
}

/// Why a delta cannot be applied; the gateway then asks for a full snapshot.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DeltaError {
    #[error("delta starts at revision {from}, the gateway holds {held}")]
    WrongBase { from: u64, held: u64 },
    #[error("delta removes an element the gateway does not hold in field `{field}`")]
    MissingElement { field: String },
    #[error("delta for field `{field}` does not fit its current value")]
    Shape { field: String },
    #[error("applied delta does not give a valid snapshot: {0}")]
    Invalid(String),
    #[error("applied delta's digest {got} differs from the controller's {want}")]
    DigestMismatch { got: String, want: String },
}

/// The changes from `old` to `new`.
pub fn diff(old: &Snapshot, new: &Snapshot) -> SnapshotDelta {
    let old_map = fields(old);
    let new_map = fields(new);
    let mut scratch = Vec::new();
    // Each array's element digests, computed once: the elements' change and the new
    // snapshot's digest both need them.
    let new_digests: HashMap<&str, Vec<ElementDigest>> = new_map
        .iter()
        .filter_map(|(key, value)| match value {
            Value::Array(items) => Some((key.as_str(), digests_of(items, &mut scratch))),
            _ => None,
        })
        .collect();
    let mut changes = BTreeMap::new();
    let keys: BTreeSet<&String> = old_map.keys().chain(new_map.keys()).collect();
    for key in keys {
        if key == REVISION {
            continue;
        }
        let change = match (old_map.get(key), new_map.get(key)) {
            (Some(a), Some(b)) if a == b => continue,
            (_, None) => FieldChange::Unset,
            (Some(Value::Array(a)), Some(Value::Array(b))) => {
                let old_digests = digests_of(a, &mut scratch);
                let new_digests = new_digests.get(key.as_str()).map_or(&[][..], Vec::as_slice);
                elements_change(&old_digests, b, new_digests)
            }
            (_, Some(b)) => FieldChange::Set(b.clone()),
        };
        changes.insert(key.clone(), change);
    }
    SnapshotDelta {
        from: old.revision,
        to: new.revision,
        changes,
        digest: digest_fields(&new_map, &new_digests),
    }
}

/// `base` with `delta` applied, checked against `delta.digest`. Array fields keep the
/// order of their kept elements and get the added ones at the end (the order carries no
/// meaning: [`digest`] compares arrays as multisets).
pub fn apply(base: &Snapshot, delta: &SnapshotDelta) -> Result<Snapshot, DeltaError> {
    if delta.from != base.revision {
        return Err(DeltaError::WrongBase {
            from: delta.from,
            held: base.revision,
        });
    }
    if delta.to <= delta.from {
        return Err(DeltaError::Invalid(format!(
            "revision goes from {} to {}: deltas only move forward",
            delta.from, delta.to
        )));
    }
    let mut map = fields(base);
    for (field, change) in &delta.changes {
        if field == REVISION {
            return Err(DeltaError::Shape {
                field: field.clone(),
            });
        }
        match change {
            FieldChange::Set(value) => {
                map.insert(field.clone(), value.clone());
            }
            FieldChange::Unset => {
                map.remove(field);
            }
            FieldChange::Elements { remove, add } => {
                let Some(Value::Array(items)) = map.get_mut(field) else {
                    return Err(DeltaError::Shape {
                        field: field.clone(),
                    });
                };
                remove_elements(items, remove).map_err(|()| DeltaError::MissingElement {
                    field: field.clone(),
                })?;
                items.extend(add.iter().cloned());
            }
        }
    }
    map.insert(REVISION.to_owned(), Value::from(delta.to));
    let snapshot: Snapshot = serde_json::from_value(Value::Object(map.into_iter().collect()))
        .map_err(|e| DeltaError::Invalid(e.to_string()))?;
    // The digest of the snapshot the gateway will hold, not of the patched JSON: an added
    // element with a field the snapshot type drops or normalizes (an explicit `null`, an
    // unknown key) must not pass (found by the `control_messages` fuzz target).
    let got = digest(&snapshot);
    if got != delta.digest {
        return Err(DeltaError::DigestMismatch {
            got,
            want: delta.digest.clone(),
        });
    }
    Ok(snapshot)
}

/// Order-independent SHA-256 (hex) of a snapshot: arrays are compared as multisets,
/// objects by key, so two snapshots that index to the same registry view have the same
/// digest whatever order the controller listed their records in.
pub fn digest(snapshot: &Snapshot) -> String {
    digest_fields(&fields(snapshot), &HashMap::new())
}

const REVISION: &str = "revision";

/// The snapshot's top-level fields (absent optional fields are absent keys).
fn fields(snapshot: &Snapshot) -> BTreeMap<String, Value> {
    match serde_json::to_value(snapshot) {
        Ok(Value::Object(map)) => map.into_iter().collect(),
        // `Snapshot` is a struct of plain data: serde_json always makes an object of it.
        _ => BTreeMap::new(),
    }
}

/// An element's digest: the first 128 bits of the SHA-256 of its canonical JSON. On the
/// wire as 32 lowercase hex digits (sorting the bytes sorts the hex the same way).
type ElementDigest = [u8; 16];

fn digests_of(items: &[Value], scratch: &mut Vec<u8>) -> Vec<ElementDigest> {
    items.iter().map(|i| element_digest(i, scratch)).collect()
}

/// `new`'s elements that `old_digests` does not account for (as a multiset) are added;
/// the digests of `old`'s elements that `new_digests` does not account for are removed.
fn elements_change(
    old_digests: &[ElementDigest],
    new: &[Value],
    new_digests: &[ElementDigest],
) -> FieldChange {
    let mut old_counts: HashMap<ElementDigest, usize> = HashMap::new();
    for d in old_digests {
        *old_counts.entry(*d).or_default() += 1;
    }
    let mut add = Vec::new();
    for (item, d) in new.iter().zip(new_digests) {
        match old_counts.get_mut(d) {
            Some(n) if *n > 0 => *n -= 1,
            _ => add.push(item.clone()),
        }
    }
    let mut remove: Vec<ElementDigest> = old_counts
        .into_iter()
        .flat_map(|(d, n)| std::iter::repeat_n(d, n))
        .collect();
    remove.sort_unstable();
    FieldChange::Elements {
        remove: remove.iter().map(hex::encode).collect(),
        add,
    }
}

/// Removes one element per listed digest; `Err` if one is not there.
fn remove_elements(items: &mut Vec<Value>, remove: &[String]) -> Result<(), ()> {
    if remove.is_empty() {
        return Ok(());
    }
    let mut wanted: HashMap<ElementDigest, usize> = HashMap::new();
    for hex_digest in remove {
        let mut d = [0u8; 16];
        // A digest that is not 32 hex digits names no element.
        hex::decode_to_slice(hex_digest, &mut d).map_err(|_| ())?;
        *wanted.entry(d).or_default() += 1;
    }
    let mut left = remove.len();
    let mut scratch = Vec::new();
    items.retain(|item| {
        if left == 0 {
            return true;
        }
        match wanted.get_mut(&element_digest(item, &mut scratch)) {
            Some(n) if *n > 0 => {
                *n -= 1;
                left -= 1;
                false
            }
            _ => true,
        }
    });
    if left == 0 {
        Ok(())
    } else {
        Err(())
    }
}

/// `item`'s [`ElementDigest`] (`scratch` holds its canonical text meanwhile).
fn element_digest(item: &Value, scratch: &mut Vec<u8>) -> ElementDigest {
    scratch.clear();
    canonical(item, scratch);
    let mut d = [0u8; 16];
    d.copy_from_slice(&sha256(scratch)[..16]);
    d
}

/// The digest of a snapshot's fields; `known` may hold array fields' element digests
/// already computed.
fn digest_fields(
    map: &BTreeMap<String, Value>,
    known: &HashMap<&str, Vec<ElementDigest>>,
) -> String {
    let mut text = Vec::new();
    let mut scratch = Vec::new();
    let mut hashes: Vec<ElementDigest> = Vec::new();
    for (key, value) in map {
        json_string(key, &mut text);
        match value {
            Value::Array(items) => {
                hashes.clear();
                match known.get(key.as_str()) {
                    Some(digests) => hashes.extend_from_slice(digests),
                    None => hashes.extend(items.iter().map(|i| element_digest(i, &mut scratch))),
                }
                hashes.sort_unstable();
                text.extend_from_slice(b":A[");
                for (i, h) in hashes.iter().enumerate() {
                    if i > 0 {
                        text.push(b',');
                    }
                    let mut hex_text = [0u8; 32];
                    // 16 bytes always fit 32 hex digits.
                    let _ = hex::encode_to_slice(h, &mut hex_text);
                    text.extend_from_slice(&hex_text);
                }
                text.push(b']');
            }
            other => {
                text.extend_from_slice(b":V");
                canonical(other, &mut text);
            }
        }
        text.push(b';');
    }
    hex::encode(sha256(&text))
}

/// `s` as a JSON string (serde_json's escaping).
fn json_string(s: &str, out: &mut Vec<u8>) {
    // Writing to a Vec cannot fail, nor can serializing a str.
    let _ = serde_json::to_writer(&mut *out, s);
}

/// JSON with object keys sorted, no whitespace.
fn canonical(value: &Value, out: &mut Vec<u8>) {
    match value {
        Value::Object(map) => {
            out.push(b'{');
            let put = |i: usize, key: &String, out: &mut Vec<u8>| {
                if i > 0 {
                    out.push(b',');
                }
                json_string(key, out);
                out.push(b':');
                canonical(&map[key], out);
            };
            // serde_json's map iterates in key order unless its `preserve_order` feature
            // is on somewhere in the build: sort only then.
            if map.keys().is_sorted() {
                for (i, key) in map.keys().enumerate() {
                    put(i, key, out);
                }
            } else {
                let mut keys: Vec<&String> = map.keys().collect();
                keys.sort();
                for (i, key) in keys.into_iter().enumerate() {
                    put(i, key, out);
                }
            }
            out.push(b'}');
        }
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                canonical(item, out);
            }
            out.push(b']');
        }
        // Writing to a Vec cannot fail, nor can serializing a scalar.
        scalar => {
            let _ = serde_json::to_writer(&mut *out, scalar);
        }
    }
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, bytes);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::{
        AccessRecord, AppProtocol, AppRecord, DeviceRecord, GrantRecord, SessionKill,
    };
    use proptest::prelude::*;

    fn device(n: u8, revoked: bool) -> DeviceRecord {
        DeviceRecord {
            id: format!("{n:032x}"),
            name: format!("dev-{n}"),
            user: format!("user-{}", n % 3),
            public_key: format!("ed25519:key{n}"),
            revoked,
        }
    }

    fn app(n: u8) -> AppRecord {
        AppRecord {
            name: format!("app-{n}"),
            protocol: if n.is_multiple_of(2) {
                AppProtocol::Tcp
            } else {
                AppProtocol::Udp
            },
            port: 1000 + u16::from(n),
            forward: None,
        }
    }

    fn base() -> Snapshot {
        Snapshot {
            revision: 10,
            devices: (0..5).map(|n| device(n, false)).collect(),
            apps: (0..3).map(app).collect(),
            grants: vec![GrantRecord {
                app: "app-0".into(),
                user: "user-1".into(),
            }],
            access: None,
            denials: None,
            kills: None,
            policy: None,
            subjects: None,
        }
    }

    /// Arrays sorted by canonical text, so equal multisets compare equal.
    fn normalized(s: &Snapshot) -> BTreeMap<String, Value> {
        let mut map = fields(s);
        for value in map.values_mut() {
            if let Value::Array(items) = value {
                let mut scratch = Vec::new();
                items.sort_by_key(|i| element_digest(i, &mut scratch));
            }
        }
        map
    }

    #[test]
    fn a_revocation_travels_as_one_removed_and_one_added_device() {
        let old = base();
        let mut new = old.clone();
        new.revision = 11;
        new.devices[2].revoked = true;
        let delta = diff(&old, &new);
        assert_eq!(delta.from, 10);
        assert_eq!(delta.to, 11);
        assert_eq!(delta.changes.len(), 1, "{delta:?}");
        let Some(FieldChange::Elements { remove, add }) = delta.changes.get("devices") else {
            panic!("devices must change by elements: {delta:?}");
        };
        assert_eq!(remove.len(), 1);
        assert_eq!(add.len(), 1);
        let applied = apply(&old, &delta).expect("applies");
        assert_eq!(normalized(&applied), normalized(&new));
        assert_eq!(digest(&applied), digest(&new));
        // The wire form is small: one device, not the whole list.
        let wire = serde_json::to_string(&delta).expect("serializable");
        assert!(wire.len() < 400, "{} bytes: {wire}", wire.len());
    }

    #[test]
    fn optional_fields_appear_and_disappear() {
        let old = base();
        let mut new = old.clone();
        new.revision = 12;
        new.access = Some(vec![AccessRecord {
            device: format!("{:032x}", 1),
            app: "app-1".into(),
            until: Some(5),
        }]);
        new.kills = Some(vec![SessionKill {
            gateway: "local".into(),
            session: 7,
            at: 9,
            opened_at_ms: Some(8_500),
        }]);
        let delta = diff(&old, &new);
        assert!(matches!(
            delta.changes.get("access"),
            Some(FieldChange::Set(_))
        ));
        let mid = apply(&old, &delta).expect("applies");
        assert_eq!(mid, new);
        let mut back = new.clone();
        back.revision = 13;
        back.access = None;
        let delta = diff(&new, &back);
        assert_eq!(delta.changes.get("access"), Some(&FieldChange::Unset));
        assert_eq!(apply(&mid, &delta).expect("applies"), back);
    }

    #[test]
    fn a_delta_for_another_base_is_refused() {
        let old = base();
        let mut new = old.clone();
        new.revision = 11;
        new.apps.pop();
        let delta = diff(&old, &new);
        let mut other = old.clone();
        other.revision = 9;
        assert_eq!(
            apply(&other, &delta),
            Err(DeltaError::WrongBase { from: 10, held: 9 })
        );
        // Same revision, different content (a gateway that missed a write): the digest
        // or the removal catches it.
        let mut drifted = old.clone();
        drifted.devices.pop();
        assert!(apply(&drifted, &delta).is_err());
        let mut drifted = old.clone();
        drifted.apps.swap(0, 1);
        drifted.grants.clear();
        assert!(matches!(
            apply(&drifted, &delta),
            Err(DeltaError::DigestMismatch { .. })
        ));
    }

    #[test]
    fn malformed_deltas_are_refused_not_panicking() {
        let old = base();
        let mut changes = BTreeMap::new();
        changes.insert(
            "devices".to_owned(),
            FieldChange::Elements {
                remove: vec!["00".repeat(16)],
                add: vec![],
            },
        );
        let mut delta = SnapshotDelta {
            from: 10,
            to: 11,
            changes,
            digest: String::new(),
        };
        assert!(matches!(
            apply(&old, &delta),
            Err(DeltaError::MissingElement { .. })
        ));
        delta.changes.clear();
        delta
            .changes
            .insert("revision".to_owned(), FieldChange::Set(Value::from(99)));
        assert!(matches!(apply(&old, &delta), Err(DeltaError::Shape { .. })));
        delta.changes.clear();
        delta.changes.insert(
            "apps".to_owned(),
            FieldChange::Set(Value::String("not a list".into())),
        );
        assert!(matches!(apply(&old, &delta), Err(DeltaError::Invalid(_))));
        delta.to = 10;
        assert!(matches!(apply(&old, &delta), Err(DeltaError::Invalid(_))));
    }

    #[test]
    fn digest_ignores_order_but_not_content() {
        let a = base();
        let mut b = a.clone();
        b.devices.reverse();
        assert_eq!(digest(&a), digest(&b));
        b.devices[0].name.push('x');
        assert_ne!(digest(&a), digest(&b));
        let mut c = a.clone();
        c.revision += 1;
        assert_ne!(digest(&a), digest(&c));
    }

    /// A snapshot with every kind of field: strings needing escapes, numbers, booleans,
    /// nulls, nested objects, optional fields present.
    fn rich() -> Snapshot {
        let mut s = base();
        s.devices[1].name = "quote \" back\\slash \u{1} é ✓".into();
        s.apps[1].forward = Some("10.9.0.5:8443".parse().expect("literal"));
        s.access = Some(vec![AccessRecord {
            device: format!("{:032x}", 1),
            app: "app-1".into(),
            until: Some(1_800_000_000),
        }]);
        s.kills = Some(vec![SessionKill {
            gateway: "edge-1".into(),
            session: 7,
            at: 100,
            opened_at_ms: Some(99_000),
        }]);
        s.policy = Some(crate::snapshot::PolicyText {
            text: "[[rule]]\nname = \"x\"\n".into(),
            sha256: "ab".repeat(32),
        });
        s.subjects = Some(vec![crate::snapshot::PolicySubject {
            device: format!("{:032x}", 1),
            user: "user-1".into(),
            groups: vec!["ops".into(), "dev".into()],
            disabled: false,
            risk: 30,
            last_mfa: Some(1_799_999_000),
            posture: Some(BTreeMap::from([(
                "disk".to_owned(),
                crate::snapshot::PostureVerdict {
                    passed: true,
                    expires: 1_800_003_600,
                },
            )])),
        }]);
        s
    }

    /// The digest and element digests are a wire contract between controller and gateway
    /// versions: these values were computed by the first implementation and must never
    /// change.
    #[test]
    fn digests_are_stable_across_versions() {
        const GOLDEN_BASE: &str =
            "77a8cd11728543c994c95bbdb599a2e8299c4edd3f58722f18a50ced0986aa66";
        const GOLDEN_RICH: &str =
            "533678a64710fa6ed03a54cf1bca182f69541ca37ca2873e83d2f9e2650aaf64";
        const GOLDEN_DELTA: &str = r#"{"from":10,"to":11,"changes":{"devices":{"elements":{"remove":["efef1e57de7918f4baabac1e4b044bf1"],"add":[{"id":"00000000000000000000000000000002","name":"dev-2","public_key":"ed25519:key2","revoked":true,"user":"user-2"}]}}},"digest":"8e6bc00b0409628d64763423cb1d47964a4eaa908e7160571d26231dc6602505"}"#;
        assert_eq!(digest(&base()), GOLDEN_BASE);
        assert_eq!(digest(&rich()), GOLDEN_RICH);
        let mut new = rich();
        new.revision = 11;
        new.devices[2].revoked = true;
        let d = diff(&rich(), &new);
        assert_eq!(
            serde_json::to_string(&d).expect("serializable"),
            GOLDEN_DELTA
        );
    }

    fn arb_snapshot() -> impl Strategy<Value = Snapshot> {
        (
            1u64..1000,
            proptest::collection::vec((0u8..12, any::<bool>()), 0..10),
            proptest::collection::vec(0u8..6, 0..6),
            proptest::option::of(proptest::collection::vec((0u8..12, 0u8..6), 0..8)),
        )
            .prop_map(|(revision, devices, apps, access)| Snapshot {
                revision,
                devices: devices.into_iter().map(|(n, r)| device(n, r)).collect(),
                apps: apps.into_iter().map(app).collect(),
                grants: vec![],
                access: access.map(|pairs| {
                    pairs
                        .into_iter()
                        .map(|(d, a)| AccessRecord {
                            device: format!("{d:032x}"),
                            app: format!("app-{a}"),
                            until: None,
                        })
                        .collect()
                }),
                denials: None,
                kills: None,
                policy: None,
                subjects: None,
            })
    }

    proptest! {
        #[test]
        fn apply_of_diff_gives_the_new_snapshot(old in arb_snapshot(), new in arb_snapshot()) {
            let mut new = new;
            new.revision += old.revision + 1;
            let delta = diff(&old, &new);
            let wire = serde_json::to_string(&delta).expect("serializable");
            let delta: SnapshotDelta = serde_json::from_str(&wire).expect("round trip");
            let applied = apply(&old, &delta).expect("a delta applies to its own base");
            prop_assert_eq!(normalized(&applied), normalized(&new));
            prop_assert_eq!(digest(&applied), digest(&new));
        }
    }
}
