//! Signed denial replies: whether an authenticated knock gets an answer, and what it says.
//!
//! Owns the reply rule (docs/protocol.md §11): only a knock that decrypted, verified, was
//! fresh, passed the replay cache and signed a claimed address equal to its source gets a
//! reply, and only for a decision with a known reason; everything else (garbage, unknown
//! key, tampered, replayed, spoofed from another address) gets nothing. Also owns the human
//! sentences and remediation hints per reason, and [`Replier`], which seals
//! ([`postern_protocol::reply::seal_reply`]) and hands the datagram to
//! `capture::ReplySocket` (non-blocking; a full buffer drops the reply, counted). Must not
//! decide on the knock itself (pipeline.rs) or build packets (capture).

use std::net::IpAddr;

use postern_protocol::keys::GatewaySecret;
use postern_protocol::reply::{
    seal_reply, KnockBinding, Reply, ReplyDecision, ReplyRandomness, MAX_TEXT_LEN,
};

use crate::admission::Counters;
use crate::capture::{Peer, ReplySocket, SendFailure};
use crate::pipeline::{Authenticated, Decision};
use crate::registry::RegistryView;

/// What the decision thread keeps of an authenticated knock to answer it after
/// `KnockPipeline::conclude` consumed it.
#[derive(Debug, Clone)]
pub struct ReplyTarget {
    pub binding: KnockBinding,
    pub claimed: Option<IpAddr>,
    /// The knock asked for an acknowledgement of an allow (`flags::ACK`).
    pub wants_ack: bool,
}

impl ReplyTarget {
    pub fn of(auth: &Authenticated) -> ReplyTarget {
        ReplyTarget {
            binding: auth.reply_binding(),
            claimed: auth.claimed_addr(),
            wants_ack: auth.flags() & postern_protocol::packet::flags::ACK != 0,
        }
    }
}

/// Seals and sends replies on the decision thread.
pub struct Replier {
    secret: GatewaySecret,
    socket: Option<ReplySocket>,
}

impl std::fmt::Debug for Replier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replier")
            .field("socket", &self.socket)
            .finish_non_exhaustive()
    }
}

impl Replier {
    /// `socket` is `None` when no reply socket could be opened: then nothing is ever sent.
    pub fn new(secret: GatewaySecret, socket: Option<ReplySocket>) -> Replier {
        Replier { secret, socket }
    }

    /// Answers the knock if the rule says so ([`reply_for`]); true when a reply was sent.
    /// Counters: `reply_sent`, `reply_dropped` (socket buffer full), `reply_failed`.
    pub fn answer(
        &self,
        target: Option<&ReplyTarget>,
        peer: &Peer,
        decision: &Decision,
        view: Option<&RegistryView>,
        counters: &Counters,
    ) -> bool {
        let (Some(socket), Some(target)) = (&self.socket, target) else {
            return false;
        };
        let Some(reply) = reply_for(target, peer, decision, view) else {
            return false;
        };
        let mut salt = [0u8; 16];
        if getrandom::getrandom(&mut salt).is_err() {
            counters.add("reply_failed", 1);
            return false;
        }
        let datagram = match seal_reply(
            &self.secret,
            &target.binding,
            &reply,
            ReplyRandomness { salt },
        ) {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(error = %e, "reply could not be sealed");
                counters.add("reply_failed", 1);
                return false;
            }
        };
        match socket.send(peer, &datagram) {
            Ok(()) => {
                counters.add("reply_sent", 1);
                true
            }
            Err(SendFailure::WouldBlock) => {
                counters.add("reply_dropped", 1);
                false
            }
            Err(e) => {
                tracing::warn!(error = ?e, "reply could not be sent");
                counters.add("reply_failed", 1);
                false
            }
        }
    }
}

/// The reply for `decision` on the knock `target` that came from `peer`, or `None` when
/// the rule says silence. An acknowledged allow states the session's length (its kernel
/// timeout: the lease, the configured length or the maximum session length).
pub fn reply_for(
    target: &ReplyTarget,
    peer: &Peer,
    decision: &Decision,
    view: Option<&RegistryView>,
) -> Option<Reply> {
    // The reply goes only to the address the device signed.
    let claimed = target.claimed?;
    if claimed.to_canonical() != peer.src.to_canonical() {
        return None;
    }
    if let Decision::Allow { session_ttl_ms, .. } = decision {
        let session_secs = u32::try_from(session_ttl_ms / 1000).unwrap_or(u32::MAX);
        return target.wants_ack.then(|| Reply {
            decision: ReplyDecision::Allow,
            reason: decision.reason().to_owned(),
            message: String::new(),
            remediation: String::new(),
            session_secs,
        });
    }
    let Decision::Deny {
        reason,
        who,
        policy,
    } = decision
    else {
        return None;
    };
    let app = &*who.app;
    let (message, remediation) = match *reason {
        "device_revoked" => (
            "this device has been revoked".to_owned(),
            "ask your administrator to enroll this device again".to_owned(),
        ),
        "unknown_app" => (
            format!("no app named {app} on this gateway"),
            "check the app name with your administrator".to_owned(),
        ),
        "not_granted" => (
            format!("user {} has no grant for {app}", who.user),
            format!("ask your administrator for access to {app}"),
        ),
        "policy_denied" => match policy.as_ref().and_then(|p| p.hint.as_ref()) {
            Some(hint) => hint_text(
                &hint.reason,
                hint.requirement.as_deref(),
                hint.remediation.as_deref(),
                app,
            ),
            None => policy_denied_text(view, &who.device, app),
        },
        // Replay, stale, address and anything not listed here: no reply.
        _ => return None,
    };
    Some(Reply {
        decision: ReplyDecision::Deny,
        reason: (*reason).to_owned(),
        message: clip(message),
        remediation: clip(remediation),
        session_secs: 0,
    })
}

/// Policy mode without a local denial hint: an older controller's denial hint for (device,
/// app) when it sent one, else a generic sentence (e.g. a deny rule, a time window, an
/// access record whose `until` passed since the last snapshot).
fn policy_denied_text(view: Option<&RegistryView>, device: &str, app: &str) -> (String, String) {
    if let Some(hint) = view.and_then(|v| v.denial_hint(device, app)) {
        return hint_text(
            &hint.reason,
            hint.requirement.as_deref(),
            hint.remediation.as_deref(),
            app,
        );
    }
    (
        format!("the access policy does not allow {app} for this device now"),
        "run `postern login` if your MFA may be too old, and `postern posture` to check this device; otherwise ask your administrator".to_owned(),
    )
}

/// The sentence and fix for a controller denial hint.
pub fn hint_text(
    reason: &str,
    requirement: Option<&str>,
    remediation: Option<&str>,
    app: &str,
) -> (String, String) {
    let message = match (reason, requirement) {
        ("mfa_too_old", _) => "MFA too old".to_owned(),
        ("mfa_missing", _) => "no MFA on record for this device".to_owned(),
        (_, Some(req)) => format!("{req} required"),
        ("posture_unknown", None) => "no posture report from this device".to_owned(),
        ("posture_expired", None) => "this device's posture report has expired".to_owned(),
        (other, None) => format!("{app} denied by policy ({other})"),
    };
    let fix = match (reason, remediation) {
        (_, Some(r)) if !r.is_empty() => r.to_owned(),
        ("mfa_too_old" | "mfa_missing", _) => "run `postern login`".to_owned(),
        ("posture_unknown" | "posture_expired", _) => {
            "report posture again (`postern posture`), then knock".to_owned()
        }
        _ => String::new(),
    };
    (message, fix)
}

/// Cuts `text` to what the reply format carries (on a char boundary) and replaces control
/// characters, so sealing never fails on policy text.
fn clip(text: String) -> String {
    let mut out = String::with_capacity(text.len().min(MAX_TEXT_LEN));
    for c in text.chars() {
        let c = if c.is_control() { ' ' } else { c };
        if out.len() + c.len_utf8() > MAX_TEXT_LEN {
            break;
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::Who;

    fn target(claimed: Option<&str>) -> ReplyTarget {
        ReplyTarget {
            binding: KnockBinding {
                header: [0; 42],
                nonce: [0; 16],
            },
            claimed: claimed.map(|c| c.parse().expect("literal")),
            wants_ack: false,
        }
    }

    fn peer(src: &str) -> Peer {
        Peer {
            src: src.parse().expect("literal"),
            src_port: 40000,
            dst: None,
        }
    }

    fn deny(reason: &'static str) -> Decision {
        Decision::Deny {
            reason,
            who: Who {
                device: "00".repeat(16).into(),
                device_name: "laptop".into(),
                user: "alice".into(),
                app: "ssh".into(),
            },
            policy: None,
        }
    }

    #[test]
    fn only_signed_matching_addresses_get_a_reply() {
        let d = deny("not_granted");
        assert!(reply_for(&target(Some("10.0.0.1")), &peer("10.0.0.1"), &d, None).is_some());
        assert!(reply_for(
            &target(Some("10.0.0.1")),
            &peer("::ffff:10.0.0.1"),
            &d,
            None
        )
        .is_some());
        assert!(reply_for(&target(Some("10.0.0.2")), &peer("10.0.0.1"), &d, None).is_none());
        assert!(reply_for(&target(None), &peer("10.0.0.1"), &d, None).is_none());
    }

    #[test]
    fn replays_drops_and_unknown_reasons_get_nothing() {
        let t = target(Some("10.0.0.1"));
        let p = peer("10.0.0.1");
        for r in [
            "replay",
            "stale",
            "claimed_addr_mismatch",
            "no_claimed_addr",
            "something_new",
        ] {
            assert!(reply_for(&t, &p, &deny(r), None).is_none(), "{r}");
        }
        assert!(reply_for(&t, &p, &Decision::Drop { reason: "decrypt" }, None).is_none());
    }

    #[test]
    fn an_allow_is_acknowledged_only_when_asked() {
        let allow = Decision::Allow {
            who: Who {
                device: "00".repeat(16).into(),
                device_name: "laptop".into(),
                user: "alice".into(),
                app: "ssh".into(),
            },
            pinhole: postern_firewall::Pinhole {
                addr: "10.0.0.1".parse().expect("literal"),
                proto: postern_firewall::AppProto::Tcp,
                port: 22,
                session: postern_firewall::SessionId(7),
                forward: None,
            },
            renewed: false,
            session_ttl_ms: 300_999,
        };
        let mut t = target(Some("10.0.0.1"));
        let p = peer("10.0.0.1");
        assert!(reply_for(&t, &p, &allow, None).is_none());
        t.wants_ack = true;
        let r = reply_for(&t, &p, &allow, None).expect("ack");
        assert_eq!(
            (r.decision, r.reason.as_str(), r.session_secs),
            (ReplyDecision::Allow, "granted", 300)
        );
        assert!(reply_for(&t, &peer("10.0.0.9"), &allow, None).is_none());
    }

    #[test]
    fn texts() {
        let t = target(Some("10.0.0.1"));
        let r = reply_for(&t, &peer("10.0.0.1"), &deny("policy_denied"), None).expect("reply");
        assert_eq!(r.reason, "policy_denied");
        assert!(r.remediation.contains("postern login"), "{r:?}");
        assert_eq!(
            hint_text(
                "posture_failed",
                Some("disk encryption"),
                Some("enable LUKS"),
                "ssh"
            ),
            ("disk encryption required".into(), "enable LUKS".into())
        );
        assert_eq!(
            hint_text("mfa_too_old", None, None, "ssh"),
            ("MFA too old".into(), "run `postern login`".into())
        );
        assert_eq!(clip("a\u{1b}b".into()), "a b");
        assert_eq!(clip("é".repeat(300)).len(), 400);
    }
}
