//! Control channel messages between the controller and its gateways (docs/control-channel.md).
//!
//! Owns: the serde (JSON lines) shape of every message on the gateway ↔ controller stream,
//! whatever carries it (mutually authenticated TLS over TCP, or the controller's local Unix
//! socket), and the live-session record a gateway reports. One message per line, each line
//! one JSON object with exactly one key naming the message.
//!
//! Must not touch: transport, TLS, files, the clock (times are passed in), the snapshot's
//! contents (snapshot.rs) or how a delta is computed (delta.rs).

use serde::{Deserialize, Serialize};

use crate::snapshot::Snapshot;

/// Longest line either side accepts (a full snapshot of a large registry fits).
pub const MAX_LINE: usize = 256 * 1024 * 1024;

/// Longest line a gateway may send (hello, session reports); the controller closes the
/// connection on a longer one.
pub const MAX_GATEWAY_LINE: usize = 16 * 1024 * 1024;

/// At most this many sessions in one report (the rest are left out and counted).
pub const MAX_REPORTED_SESSIONS: usize = 100_000;

/// What a gateway sends.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum GatewayMessage {
    /// First line on a registration connection (TLS only): the one-time token from
    /// `postern-controller gateway add NAME`. The controller binds the connection's client
    /// certificate key to that gateway, answers `enrolled` and closes.
    Enroll(EnrollRequest),
    /// First line on a stream connection: where to resume.
    Hello(Hello),
    /// The gateway's live sessions, complete (replaces the previous report). Sent after
    /// each change (at most 5 per second) and at least every 30 s.
    Sessions(SessionReport),
}

/// `enroll`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct EnrollRequest {
    /// The token text exactly as printed (`postern-gateway:v1:<secret>:<cert sha256>`).
    pub token: String,
}

/// `hello`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Hello {
    /// Protocol version (1).
    pub version: u32,
    /// The revision the gateway holds (persisted or from an earlier connection); `None`:
    /// nothing, send a full snapshot.
    #[serde(default)]
    pub after_revision: Option<u64>,
    /// `delta::digest` of the snapshot held at `after_revision`: the controller answers
    /// "nothing new" (a heartbeat) only when its snapshot at that revision has this digest
    /// (a restored controller may reach the same revision with other content), else it
    /// sends a full snapshot. Absent (old gateways): the revision alone decides.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    /// Local (Unix socket) gateways only: the name they report sessions under (the TLS
    /// channel takes the name from the registered certificate and ignores this).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// `sessions`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(deny_unknown_fields)]
pub struct SessionReport {
    /// When the gateway made the report (unix ms, gateway clock).
    pub at_ms: u64,
    /// Every live session, at most [`MAX_REPORTED_SESSIONS`].
    pub sessions: Vec<LiveSession>,
    /// Live sessions left out of `sessions` because of the cap.
    #[serde(default)]
    pub omitted: u64,
}

/// One live session at a gateway.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
#[serde(deny_unknown_fields)]
pub struct LiveSession {
    /// The gateway's session id (the conntrack mark's low 24 bits, 1..=0xFF_FFFF).
    pub session: u32,
    /// Device id, 32 lowercase hex digits.
    pub device: String,
    pub device_name: String,
    pub user: String,
    pub app: String,
    /// The client address the session admits.
    pub source: String,
    /// `lease` (renewed by re-knocks) or `verdict` (held while the decision holds, up to
    /// the maximum session length).
    pub mode: String,
    pub opened_at_ms: u64,
    pub renewed_at_ms: u64,
    /// When it ends unless renewed (the lease end, capped by the maximum session length).
    pub expires_at_ms: u64,
}

/// What the controller sends.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum ControllerMessage {
    /// Answer to `enroll`: the gateway's registered name.
    Enrolled(Enrolled),
    /// A full snapshot (first answer to a `hello` the controller cannot resume, or after
    /// any doubt).
    Snapshot(Snapshot),
    /// The changes from the revision the gateway holds to a newer one
    /// (`crate::delta`). A gateway that cannot apply it reconnects with
    /// `after_revision: null`.
    Delta(crate::delta::SnapshotDelta),
    /// Nothing changed: sent every 5 s of silence so both sides see the link alive.
    Heartbeat(Heartbeat),
    /// The request is refused (unknown gateway key, bad token, malformed line); the
    /// controller closes the connection after it.
    Error(ChannelError),
}

/// `enrolled`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Enrolled {
    pub name: String,
}

/// `heartbeat`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Heartbeat {
    /// The controller's current revision.
    pub revision: u64,
    /// The controller's clock (unix ms).
    pub at_ms: u64,
}

/// `error`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ChannelError {
    /// Stable code: `unknown_gateway`, `gateway_removed`, `bad_token`, `token_used`,
    /// `token_expired`, `bad_request`, `busy`.
    pub code: String,
    /// One sentence saying what to do.
    pub message: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_one_keyed_objects() {
        let hello = GatewayMessage::Hello(Hello {
            version: 1,
            after_revision: Some(7),
            digest: None,
            name: None,
        });
        let text = serde_json::to_string(&hello).expect("serializable");
        assert_eq!(text, r#"{"hello":{"version":1,"after_revision":7}}"#);
        let back: GatewayMessage = serde_json::from_str(&text).expect("parses");
        assert_eq!(back, hello);

        let hb = ControllerMessage::Heartbeat(Heartbeat {
            revision: 3,
            at_ms: 9,
        });
        let text = serde_json::to_string(&hb).expect("serializable");
        assert_eq!(text, r#"{"heartbeat":{"revision":3,"at_ms":9}}"#);
    }

    #[test]
    fn unknown_messages_and_fields_are_refused() {
        for bad in [
            r#"{"helo":{"version":1}}"#,
            r#"{"hello":{"version":1,"extra":1}}"#,
            r#"{"hello":{"version":1},"sessions":{"at_ms":1,"sessions":[]}}"#,
            r#"[]"#,
        ] {
            assert!(
                serde_json::from_str::<GatewayMessage>(bad).is_err(),
                "{bad} must be refused"
            );
        }
    }
}
