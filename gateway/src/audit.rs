//! The audit trail: one JSON line per decision, written to stdout or an append-only file.
//!
//! Owns the line format (stable field names, documented in docs/operations.md) and the
//! writer. Never writes key material. Must not make decisions.

use std::fs::OpenOptions;
use std::io::{self, Write};
use std::net::IpAddr;
use std::path::Path;
use std::sync::Mutex;

use serde_json::{json, Value};

use crate::config::AuditTarget;
use crate::pipeline::Decision;

/// Thread-safe JSON-lines audit writer.
pub struct AuditLog {
    out: Mutex<Box<dyn Write + Send>>,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AuditLog")
    }
}

impl AuditLog {
    pub fn open(target: &AuditTarget) -> io::Result<AuditLog> {
        let out: Box<dyn Write + Send> = match target {
            AuditTarget::Stdout => Box::new(io::stdout()),
            AuditTarget::File(p) => Box::new(open_append(p)?),
        };
        Ok(AuditLog {
            out: Mutex::new(out),
        })
    }

    /// Records one knock decision.
    pub fn knock(&self, ts_ms: u64, src: IpAddr, decision: &Decision) {
        self.knock_with(ts_ms, src, decision, Value::Null);
    }

    /// Records one knock decision with extra fields (an object), e.g. `suppressed`: how
    /// many drop lines the rate limit left out before this one.
    pub fn knock_with(&self, ts_ms: u64, src: IpAddr, decision: &Decision, extra: Value) {
        let mut line = json!({
            "ts_ms": ts_ms,
            "event": "knock",
            "decision": decision.verdict(),
            "reason": decision.reason(),
            "src": src.to_string(),
        });
        if let (Some(k), Value::Object(map)) = (decision.who(), &mut line) {
            map.insert("device".into(), json!(&*k.device));
            map.insert("device_name".into(), json!(&*k.device_name));
            map.insert("user".into(), json!(&*k.user));
            map.insert("app".into(), json!(&*k.app));
        }
        if let (
            Decision::Allow {
                pinhole, renewed, ..
            },
            Value::Object(map),
        ) = (decision, &mut line)
        {
            map.insert("session".into(), json!(pinhole.session.0));
            map.insert("renewed".into(), json!(renewed));
            map.insert("port".into(), json!(pinhole.port));
        }
        if let (Decision::Close { session, .. }, Value::Object(map)) = (decision, &mut line) {
            map.insert("session".into(), json!(session.0));
        }
        // A local policy denial says why (the failing rule and check; never sent to the
        // device) and, when the device can fix it, the failing requirement.
        if let (
            Decision::Deny {
                policy: Some(policy),
                ..
            },
            Value::Object(map),
        ) = (decision, &mut line)
        {
            map.insert("policy".into(), json!(policy.why));
            if let Some(req) = policy.hint.as_ref().and_then(|h| h.requirement.as_ref()) {
                map.insert("requirement".into(), json!(req));
            }
        }
        if let (Value::Object(map), Value::Object(extra)) = (&mut line, extra) {
            map.extend(extra);
        }
        self.write(&line);
    }

    /// Records any other event (sync, start, stop, firewall failure).
    pub fn event(&self, ts_ms: u64, event: &str, fields: Value) {
        let mut line = json!({ "ts_ms": ts_ms, "event": event });
        if let (Value::Object(map), Value::Object(extra)) = (&mut line, fields) {
            map.extend(extra);
        }
        self.write(&line);
    }

    fn write(&self, line: &Value) {
        // Rendered whole first: formatting straight into the unbuffered file would issue
        // one write(2) per JSON token, and a line must reach the file in one piece (one
        // O_APPEND write) so concurrent writers and a crash never interleave or tear it.
        let mut bytes = line.to_string().into_bytes();
        bytes.push(b'\n');
        let mut out = match self.out.lock() {
            Ok(o) => o,
            Err(poisoned) => poisoned.into_inner(),
        };
        // An audit line that cannot be written is reported on stderr; the decision stands.
        if let Err(e) = out.write_all(&bytes).and_then(|()| out.flush()) {
            tracing::error!(error = %e, "audit log write failed");
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
