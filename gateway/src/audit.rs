//! The audit trail: one JSON line per decision, written to stdout or an append-only file.
//!
//! Owns the line format (stable field names, documented in docs/operations.md) and the
//! writer. Never writes key material. Must not make decisions.

use std::fs::OpenOptions;
use std::io::{self, Write};
use std::net::IpAddr;
use std::path::Path;
use std::sync::Mutex;

use serde::Serialize;
use serde_json::{json, Map, Value};

use crate::config::AuditTarget;
use crate::pipeline::Decision;

/// Thread-safe JSON-lines audit writer.
pub struct AuditLog {
    out: Mutex<Writer>,
}

/// The sink and the line buffer it reuses: a line is rendered into `line`, then written
/// whole (no allocation per line once the buffer has grown to the longest line).
struct Writer {
    out: Box<dyn Write + Send>,
    line: Vec<u8>,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AuditLog")
    }
}

/// Fields a knock line may carry besides the decision's own.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct KnockExtra {
    /// Whether a signed reply was sent (authenticated decisions).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reply: Option<bool>,
    /// How many drop lines the rate limit left out before this one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub suppressed: Option<u64>,
    /// Microseconds from the capture thread receiving the datagram to the decision applied
    /// (for an allow: the pinhole committed in the kernel), authenticated decisions only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latency_us: Option<u64>,
}

/// One `knock` line: borrowed from the decision, serialized without a JSON tree.
#[derive(Serialize)]
struct KnockLine<'a> {
    ts_ms: u64,
    event: &'static str,
    decision: &'static str,
    reason: &'static str,
    src: IpAddr,
    #[serde(skip_serializing_if = "Option::is_none")]
    device: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    device_name: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    user: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    app: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    session: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    renewed: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    port: Option<u16>,
    /// A local policy denial says why (the failing rule and check; never sent to the
    /// device) and, when the device can fix it, the failing requirement.
    #[serde(skip_serializing_if = "Option::is_none")]
    policy: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    requirement: Option<&'a str>,
    #[serde(flatten)]
    extra: KnockExtra,
}

impl AuditLog {
    pub fn open(target: &AuditTarget) -> io::Result<AuditLog> {
        let out: Box<dyn Write + Send> = match target {
            AuditTarget::Stdout => Box::new(io::stdout()),
            AuditTarget::File(p) => Box::new(open_append(p)?),
        };
        Ok(AuditLog {
            out: Mutex::new(Writer {
                out,
                line: Vec::with_capacity(512),
            }),
        })
    }

    /// Records one knock decision.
    pub fn knock(&self, ts_ms: u64, src: IpAddr, decision: &Decision) {
        self.knock_with(ts_ms, src, decision, KnockExtra::default());
    }

    /// Records one knock decision with extra fields (`reply`, `suppressed`).
    pub fn knock_with(&self, ts_ms: u64, src: IpAddr, decision: &Decision, extra: KnockExtra) {
        let who = decision.who();
        let (session, renewed, port) = match decision {
            Decision::Allow {
                pinhole, renewed, ..
            } => (Some(pinhole.session.0), Some(*renewed), Some(pinhole.port)),
            Decision::Close { session, .. } => (Some(session.0), None, None),
            _ => (None, None, None),
        };
        let policy = match decision {
            Decision::Deny {
                policy: Some(policy),
                ..
            } => Some(policy),
            _ => None,
        };
        self.write(&KnockLine {
            ts_ms,
            event: "knock",
            decision: decision.verdict(),
            reason: decision.reason(),
            src,
            device: who.map(|w| &*w.device),
            device_name: who.map(|w| &*w.device_name),
            user: who.map(|w| &*w.user),
            app: who.map(|w| &*w.app),
            session,
            renewed,
            port,
            policy: policy.map(|p| p.why.as_str()),
            requirement: policy
                .and_then(|p| p.hint.as_ref())
                .and_then(|h| h.requirement.as_deref()),
            extra,
        });
    }

    /// Records any other event (sync, start, stop, firewall failure).
    pub fn event(&self, ts_ms: u64, event: &str, fields: Value) {
        let mut line = json!({ "ts_ms": ts_ms, "event": event });
        if let (Value::Object(map), Value::Object(extra)) = (&mut line, fields) {
            map.extend(extra);
        }
        self.write(&line);
    }

    /// Records an event whose fields are a borrowed, typed record (`fields` must serialize
    /// as a JSON object; its keys follow `ts_ms` and `event`), plus `more` (e.g. a close's
    /// `revision` and `ok`). Renders straight into the line buffer: the hot-path lines
    /// (session lifecycle) allocate nothing.
    pub fn record<T: Serialize>(
        &self,
        ts_ms: u64,
        event: &str,
        fields: &T,
        more: Option<&Map<String, Value>>,
    ) {
        #[derive(Serialize)]
        struct Line<'a, T> {
            ts_ms: u64,
            event: &'a str,
            #[serde(flatten)]
            fields: &'a T,
            #[serde(flatten, skip_serializing_if = "Option::is_none")]
            more: Option<&'a Map<String, Value>>,
        }
        self.write(&Line {
            ts_ms,
            event,
            fields,
            more,
        });
    }

    fn write<T: Serialize>(&self, line: &T) {
        // Rendered whole first: formatting straight into the unbuffered file would issue
        // one write(2) per JSON token, and a line must reach the file in one piece (one
        // O_APPEND write) so concurrent writers and a crash never interleave or tear it.
        let mut w = match self.out.lock() {
            Ok(o) => o,
            Err(poisoned) => poisoned.into_inner(),
        };
        let Writer { out, line: bytes } = &mut *w;
        bytes.clear();
        if let Err(e) = serde_json::to_writer(&mut *bytes, line) {
            // Only a Serialize impl can fail here (no map with non-string keys is ever
            // written); the decision stands.
            tracing::error!(error = %e, "audit line could not be rendered");
            return;
        }
        bytes.push(b'\n');
        // An audit line that cannot be written is reported on stderr; the decision stands.
        if let Err(e) = out.write_all(bytes).and_then(|()| out.flush()) {
            tracing::error!(error = %e, "audit log write failed");
        }
        // One huge line (a big sync event) does not stay allocated.
        if bytes.capacity() > 64 * 1024 {
            *bytes = Vec::with_capacity(512);
        }
    }
}

fn open_append(path: &Path) -> io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| io::Error::new(e.kind(), format!("audit log {}: {e}", path.display())))
}
