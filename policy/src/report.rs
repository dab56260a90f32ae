//! The posture report wire format: the JSON document a client sends to the controller
//! (docs/posture.md). The API layer authenticates it (device-key signature); this module
//! only parses and bounds it.
//!
//! Owns: the strict parser (unknown fields, duplicate keys, oversize documents, long
//! strings, long lists and malformed timestamps are refused with an error naming the
//! field) and the conversion into [`PostureFacts`]. Must not touch: the clock, storage or
//! the network; the caller decides when a report expires.

use std::collections::BTreeMap;
use std::fmt;

use jiff::Timestamp;
use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::Deserialize;

use crate::eval::PostureFacts;

/// Largest accepted report, in bytes.
pub const MAX_REPORT_BYTES: usize = 16 * 1024;
/// Longest accepted string value (os_family, versions, a process or check name), in bytes.
pub const MAX_STRING_BYTES: usize = 128;
/// Most entries in `processes`.
pub const MAX_PROCESSES: usize = 128;
/// Most entries in `custom`.
pub const MAX_CUSTOM_CHECKS: usize = 64;

/// A parsed posture report, exactly as the client sent it.
#[derive(Debug, Clone, PartialEq)]
pub struct PostureReport {
    /// When the client collected the facts.
    pub collected_at: Timestamp,
    /// The reported facts (`expires` is `None`: the controller sets it, see
    /// [`PostureReport::to_facts`]). Missing booleans are false.
    pub facts: PostureFacts,
}

/// Why a report was refused. The message names the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReportError {
    /// Over [`MAX_REPORT_BYTES`].
    #[error("posture report is {0} bytes, at most {MAX_REPORT_BYTES} allowed")]
    TooLarge(usize),
    /// Not valid JSON of the expected shape (serde's message names the field).
    #[error("posture report is malformed: {0}")]
    Malformed(String),
    /// A field's value is out of bounds.
    #[error("posture report field {field}: {problem}")]
    Field {
        /// The field name (`processes[3]`, `custom.edr`, ...).
        field: String,
        /// What is wrong.
        problem: String,
    },
}

/// The raw JSON shape; everything is validated after deserialization.
#[derive(Default)]
struct Wire {
    collected_at: Option<String>,
    os_family: Option<String>,
    os_version: Option<String>,
    kernel: Option<String>,
    last_package_update: Option<String>,
    disk_encrypted: bool,
    firewall_on: bool,
    processes: Vec<String>,
    mdm_enrolled: bool,
    custom: UniqueMap,
}

/// The accepted top-level fields, in documentation order.
const FIELDS: [&str; 10] = [
    "collected_at",
    "os_family",
    "os_version",
    "kernel",
    "last_package_update",
    "disk_encrypted",
    "firewall_on",
    "processes",
    "mdm_enrolled",
    "custom",
];

impl<'de> Deserialize<'de> for Wire {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Wire;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a posture report object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Wire, A::Error> {
                let mut w = Wire::default();
                let mut seen: Vec<String> = Vec::new();
                while let Some(key) = map.next_key::<String>()? {
                    if !FIELDS.contains(&key.as_str()) {
                        return Err(de::Error::custom(format!(
                            "unknown field {key:?}; the fields are {}",
                            FIELDS.join(", ")
                        )));
                    }
                    if seen.contains(&key) {
                        return Err(de::Error::custom(format!("field {key} is repeated")));
                    }
                    // Every type error names its field (serde's own message does not).
                    let named = |e: A::Error| de::Error::custom(format!("field {key}: {e}"));
                    match key.as_str() {
                        "collected_at" => w.collected_at = Some(map.next_value().map_err(named)?),
                        "os_family" => w.os_family = map.next_value().map_err(named)?,
                        "os_version" => w.os_version = map.next_value().map_err(named)?,
                        "kernel" => w.kernel = map.next_value().map_err(named)?,
                        "last_package_update" => {
                            w.last_package_update = map.next_value().map_err(named)?
                        }
                        "disk_encrypted" => w.disk_encrypted = map.next_value().map_err(named)?,
                        "firewall_on" => w.firewall_on = map.next_value().map_err(named)?,
                        "processes" => w.processes = map.next_value().map_err(named)?,
                        "mdm_enrolled" => w.mdm_enrolled = map.next_value().map_err(named)?,
                        _ => w.custom = map.next_value().map_err(named)?,
                    }
                    seen.push(key);
                }
                Ok(w)
            }
        }
        deserializer.deserialize_map(V)
    }
}

/// A JSON object of booleans that refuses duplicate keys (serde's map would keep the last).
#[derive(Default)]
struct UniqueMap(BTreeMap<String, bool>);

impl<'de> Deserialize<'de> for UniqueMap {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = UniqueMap;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an object of check name to true/false")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<UniqueMap, A::Error> {
                let mut out = BTreeMap::new();
                while let Some((k, v)) = map.next_entry::<String, bool>()? {
                    if out.len() >= MAX_CUSTOM_CHECKS {
                        return Err(de::Error::custom(format!(
                            "more than {MAX_CUSTOM_CHECKS} checks"
                        )));
                    }
                    if out.insert(k.clone(), v).is_some() {
                        return Err(de::Error::custom(format!("check {k:?} is repeated")));
                    }
                }
                Ok(UniqueMap(out))
            }
        }
        deserializer.deserialize_map(V)
    }
}

fn field_err(field: impl Into<String>, problem: impl Into<String>) -> ReportError {
    ReportError::Field {
        field: field.into(),
        problem: problem.into(),
    }
}

/// A bounded, printable string (no control characters, not empty).
fn check_text(field: &str, value: &str) -> Result<(), ReportError> {
    if value.is_empty() {
        return Err(field_err(field, "must not be empty"));
    }
    if value.len() > MAX_STRING_BYTES {
        return Err(field_err(
            field,
            format!(
                "is {} bytes, at most {MAX_STRING_BYTES} allowed",
                value.len()
            ),
        ));
    }
    if value.chars().any(char::is_control) {
        return Err(field_err(field, "contains a control character"));
    }
    Ok(())
}

fn check_opt(field: &str, value: &Option<String>) -> Result<(), ReportError> {
    value.as_deref().map_or(Ok(()), |v| check_text(field, v))
}

/// RFC 3339 with a `Z` or numeric offset, e.g. `2026-11-23T13:00:00Z`.
fn timestamp(field: &str, text: &str) -> Result<Timestamp, ReportError> {
    if text.len() > 64 {
        return Err(field_err(field, "is not an RFC 3339 timestamp"));
    }
    text.parse::<Timestamp>().map_err(|_| {
        field_err(
            field,
            format!("{text:?} is not an RFC 3339 timestamp (e.g. 2026-11-23T13:00:00Z)"),
        )
    })
}

impl PostureReport {
    /// Parses and bounds a report. Never panics on any input.
    pub fn parse(bytes: &[u8]) -> Result<PostureReport, ReportError> {
        if bytes.len() > MAX_REPORT_BYTES {
            return Err(ReportError::TooLarge(bytes.len()));
        }
        let wire: Wire =
            serde_json::from_slice(bytes).map_err(|e| ReportError::Malformed(e.to_string()))?;
        let Some(collected_at) = wire.collected_at else {
            return Err(field_err(
                "collected_at",
                "is missing (RFC 3339, e.g. 2026-11-23T13:00:00Z)",
            ));
        };
        let collected_at = timestamp("collected_at", &collected_at)?;
        let last_package_update = wire
            .last_package_update
            .as_deref()
            .map(|t| timestamp("last_package_update", t))
            .transpose()?;
        check_opt("os_family", &wire.os_family)?;
        check_opt("os_version", &wire.os_version)?;
        check_opt("kernel", &wire.kernel)?;
        if wire.processes.len() > MAX_PROCESSES {
            return Err(field_err(
                "processes",
                format!(
                    "has {} entries, at most {MAX_PROCESSES} allowed",
                    wire.processes.len()
                ),
            ));
        }
        for (i, p) in wire.processes.iter().enumerate() {
            check_text(&format!("processes[{i}]"), p)?;
        }
        for name in wire.custom.0.keys() {
            check_text(&format!("custom.{name:?}"), name)?;
        }
        Ok(PostureReport {
            collected_at,
            facts: PostureFacts {
                expires: None,
                os_family: wire.os_family,
                os_version: wire.os_version,
                kernel: wire.kernel,
                last_package_update,
                disk_encrypted: wire.disk_encrypted,
                firewall_on: wire.firewall_on,
                processes: wire.processes,
                mdm_enrolled: wire.mdm_enrolled,
                custom: wire.custom.0,
            },
        })
    }

    /// The facts the policy engine checks, stale from `expires` on.
    pub fn to_facts(&self, expires: Timestamp) -> PostureFacts {
        PostureFacts {
            expires: Some(expires),
            ..self.facts.clone()
        }
    }
}
