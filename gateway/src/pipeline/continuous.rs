//! Continuous evaluation of live sessions: the terms each session was granted (session
//! mode, when it opened, its maximum-length cap, when its decision must be re-evaluated)
//! and the time-ordered index that lets the periodic sweep look only at sessions that are
//! due, never at every session.
//!
//! Owns: [`SessionTerms`] per session id, the due index, the session's kernel timeout
//! (lease, verdict or configured length, capped by the maximum session length), and
//! closing sessions whose re-evaluation fails (`access_expired`) or whose maximum length
//! is reached (`max_session_length`). Pure logic: no clock reads, no firewall. Must not
//! touch: the knock checks (pipeline.rs) or lifecycle records and events beyond
//! retiring the sessions it closes (pipeline/lifecycle.rs).

use postern_firewall::SessionId;

use super::{close_reason, KnockPipeline, SessionKey, SessionTable};
use crate::registry::{Hold, Permit, RegistryView};

/// What one live session was granted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct SessionTerms {
    pub(super) hold: Hold,
    pub(super) opened_at_ms: u64,
    /// `opened_at_ms` + the maximum session length: no renewal goes past it.
    pub(super) cap_at_ms: u64,
    /// The latest decision for the session's device, app and source: re-evaluated at its
    /// `valid_until_ms` (`None`: only on a new view). Until then the same view gives the
    /// same decision (the policy engine's contract, see `Grant::valid_until`), so a renewal
    /// re-knock reuses it instead of running the engine again.
    pub(super) permit: Permit,
    /// The view ([`RegistryView::generation`]) `permit` was decided on.
    pub(super) generation: u64,
}

impl SessionTerms {
    /// When the sweep must look at the session next.
    fn due_ms(&self) -> u64 {
        self.permit
            .valid_until_ms
            .map_or(self.cap_at_ms, |v| v.min(self.cap_at_ms))
    }
}

/// The shortest session timeout set in the kernel, unless the cap is nearer.
const MIN_SESSION_TTL_MS: u64 = 1000;

/// The kernel timeout for a session held under `permit` at `now_ms`: the configured
/// length (legacy), the rule's lease (lease mode) or nothing but the cap (verdict mode),
/// never past `cap_at_ms`. What cuts a decision short (a window closing, MFA ageing out,
/// a verdict expiring) is the sweep's job, at the decision's `valid_until`.
pub(super) fn session_ttl_ms(
    permit: &Permit,
    configured_ms: u64,
    now_ms: u64,
    cap_at_ms: u64,
) -> u64 {
    let wanted = match permit.hold {
        Hold::Configured => configured_ms,
        Hold::Lease => permit.lease_ms.unwrap_or(configured_ms),
        Hold::Verdict => u64::MAX,
    };
    wanted
        .max(MIN_SESSION_TTL_MS)
        .min(cap_at_ms.saturating_sub(now_ms))
        .max(1)
}

impl SessionTable {
    /// The session live for `key` at `now_ms`, with its terms.
    fn live_terms(&self, key: &SessionKey, now_ms: u64) -> Option<(SessionId, SessionTerms)> {
        let (id, expires) = self.by_key.get(key)?;
        if now_ms >= *expires {
            return None;
        }
        Some((*id, *self.terms.get(&id.0)?))
    }

    /// When the session for `key` (a knock about to open or renew it at `now_ms`) opened
    /// and when its maximum length runs out. A live session already at its cap is ended
    /// here as `max_session_length` (the kernel's timeout never outlives the cap, so its
    /// flows have stopped already) and the knock opens a new one.
    pub(super) fn opening(
        &mut self,
        key: &SessionKey,
        now_ms: u64,
        max_session_ms: u64,
    ) -> (u64, u64) {
        match self.live_terms(key, now_ms) {
            Some((_, terms)) if now_ms < terms.cap_at_ms => (terms.opened_at_ms, terms.cap_at_ms),
            Some((id, _)) => {
                self.forget(id.0);
                self.retire(id, close_reason::MAX_SESSION_LENGTH, now_ms);
                (now_ms, now_ms.saturating_add(max_session_ms))
            }
            None => (now_ms, now_ms.saturating_add(max_session_ms)),
        }
    }

    /// Records the terms of a session just opened or renewed.
    pub(super) fn set_terms(&mut self, session: SessionId, terms: SessionTerms) {
        let due = (terms.due_ms(), session.0);
        if let Some(old) = self.terms.insert(session.0, terms) {
            if old.due_ms() == due.0 && self.due.contains(&due) {
                // A renewal that moves nothing: leave the index alone (re-inserting can
                // split a B-tree node: an allocation per renewal).
                return;
            }
            self.due.remove(&(old.due_ms(), session.0));
        }
        self.due.insert(due);
    }

    /// The decision a renewal of `key` at `now_ms` under the view `generation` would get,
    /// when the session's latest one still holds: same view, before its `valid_until`.
    pub(super) fn decided(&self, key: &SessionKey, generation: u64, now_ms: u64) -> Option<Permit> {
        let (_, terms) = self.live_terms(key, now_ms)?;
        let holds = terms.generation == generation
            && now_ms < terms.cap_at_ms
            && terms
                .permit
                .valid_until_ms
                .is_none_or(|until| now_ms < until);
        holds.then_some(terms.permit)
    }

    /// After a re-evaluation on view `generation` passed: `permit` now holds.
    fn revalidate(&mut self, id: u32, permit: Permit, generation: u64) {
        if let Some(terms) = self.terms.get(&id).copied() {
            self.set_terms(
                SessionId(id),
                SessionTerms {
                    permit,
                    generation,
                    ..terms
                },
            );
        }
    }

    /// Removes `id` from the key and id maps and its terms (no lifecycle event).
    pub(super) fn forget(&mut self, id: u32) {
        if let Some(key) = self.by_id.remove(&id) {
            if self.by_key.get(&key).is_some_and(|(sid, _)| sid.0 == id) {
                self.by_key.remove(&key);
            }
        }
        if let Some(old) = self.terms.remove(&id) {
            self.due.remove(&(old.due_ms(), id));
        }
    }

    /// Whether `view` still permits the session (device, app, source) at `now_ms`, and
    /// until when.
    pub(super) fn evaluate(view: &RegistryView, key: &SessionKey, now_ms: u64) -> Option<Permit> {
        let (device, app, source) = key;
        let d = view.device(device).filter(|d| !d.revoked)?;
        view.app(app)?;
        view.permit(device, view.device_user(d), app, *source, now_ms)
            .ok()
    }

    /// Re-evaluates every session against a new `view` at `now_ms`: forgets and returns
    /// the ones it no longer permits (device unknown or revoked, app gone, grant or access
    /// record withdrawn, or the policy now denies this device, app and source address);
    /// the rest hold until their new `valid_until`.
    pub(super) fn reevaluate_all(&mut self, view: &RegistryView, now_ms: u64) -> Vec<SessionId> {
        let mut closed = Vec::new();
        let mut holding = Vec::new();
        for (key, (id, _)) in &self.by_key {
            match Self::evaluate(view, key, now_ms) {
                Some(permit) => holding.push((id.0, permit)),
                None => closed.push(*id),
            }
        }
        for id in &closed {
            self.forget(id.0);
        }
        for (id, permit) in holding {
            self.revalidate(id, permit, view.generation());
        }
        closed
    }

    /// Re-evaluates the sessions whose decision may have stopped holding or whose maximum
    /// length is reached by `now_ms` (the due index's head only: sessions not due cost
    /// nothing). Closes the failing ones and returns them with their reason.
    fn close_due(&mut self, view: &RegistryView, now_ms: u64) -> Vec<(SessionId, &'static str)> {
        let mut closed = Vec::new();
        while let Some(&(due, id)) = self.due.first() {
            if due > now_ms {
                break;
            }
            self.due.pop_first();
            let Some(terms) = self.terms.get(&id).copied() else {
                continue;
            };
            let mapped = self.by_id.get(&id).and_then(|key| {
                let (sid, expires) = self.by_key.get(key)?;
                (sid.0 == id).then(|| (key.clone(), *expires))
            });
            // Gone, or its kernel timeout passed before the cap (the expiry sweep reports
            // it); a timeout the cap cut short is reported as the cap.
            let Some((key, _)) =
                mapped.filter(|(_, expires)| now_ms < *expires || *expires >= terms.cap_at_ms)
            else {
                self.terms.remove(&id);
                continue;
            };
            let reason = if now_ms >= terms.cap_at_ms {
                close_reason::MAX_SESSION_LENGTH
            } else if let Some(permit) = Self::evaluate(view, &key, now_ms) {
                self.revalidate(id, permit, view.generation());
                continue;
            } else {
                close_reason::ACCESS_EXPIRED
            };
            self.forget(id);
            self.retire(SessionId(id), reason, now_ms);
            closed.push((SessionId(id), reason));
        }
        closed
    }
}

impl KnockPipeline {
    /// Closes the live sessions that are due at `now_ms`: their decision's `valid_until`
    /// passed and re-evaluating it against `view` fails (`access_expired`: a time window
    /// closed, MFA aged out, a posture verdict expired, an access record's `until`
    /// passed), or they reached the maximum session length (`max_session_length`). The
    /// caller closes them in the firewall. Cheap when nothing is due: call it often.
    pub fn close_sessions_due(
        &mut self,
        view: &RegistryView,
        now_ms: u64,
    ) -> Vec<(SessionId, &'static str)> {
        self.sessions.close_due(view, now_ms)
    }

    /// The session mode of live session `id` (`lease` or `verdict`), if known.
    pub fn session_mode(&self, id: SessionId) -> Option<&'static str> {
        self.sessions.terms.get(&id.0).map(|t| t.hold.as_str())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use postern_protocol::keys::{DeviceSigningKey, GatewaySecret};
    use postern_protocol::packet::{flags, seal, Knock, SealRandomness};
    use postern_protocol::snapshot::{
        AppProtocol, AppRecord, DeviceRecord, PolicySubject, PolicyText, PostureVerdict, Snapshot,
    };

    use super::super::{Decision, PipelineLimits};
    use super::*;

    /// 2027-01-15 (a Friday) 08:00:00 UTC.
    const NOW: u64 = 1_800_000_000_000;
    const HOUR: u64 = 3_600_000;
    const LAB: &str = "10.1.1.1";
    const ELSEWHERE: &str = "192.0.2.7";

    const POLICY: &str = r#"
[[requirement]]
name = "disk"
disk_encryption = true
remediation = "Turn on disk encryption"

[[rule]]
name = "ssh-lab"
effect = "allow"
apps = ["ssh"]
users = ["alice"]
source_networks = ["10.1.1.0/24"]
max_risk = 40
lease = "1h"

[[rule]]
name = "web-office-hours"
effect = "allow"
apps = ["web"]
users = ["alice"]
time_zone = "UTC"
windows = [{ days = ["mon-fri"], hours = "08:00-09:00" }]
session_mode = "verdict"

[[rule]]
name = "wiki-verdict"
effect = "allow"
apps = ["wiki"]
users = ["alice"]
posture = ["disk"]
lease = "15m"
session_mode = "verdict"
"#;

    fn alice() -> DeviceSigningKey {
        DeviceSigningKey::from_seed([1; 32])
    }

    fn subject(risk: u8, disk_passed: bool) -> PolicySubject {
        let verdict = PostureVerdict {
            passed: disk_passed,
            expires: NOW / 1000 + 3 * 3600,
        };
        PolicySubject {
            device: alice().public_key().device_id().to_string(),
            user: "alice".into(),
            groups: vec![],
            disabled: false,
            risk,
            last_mfa: None,
            posture: Some(BTreeMap::from([("disk".to_owned(), verdict)])),
        }
    }

    fn snapshot(policy: &str, subjects: Vec<PolicySubject>) -> Snapshot {
        let public = alice().public_key();
        let app = |name: &str, port| AppRecord {
            name: name.into(),
            protocol: AppProtocol::Tcp,
            port,
            forward: None,
        };
        let digest = ring::digest::digest(&ring::digest::SHA256, policy.as_bytes());
        Snapshot {
            revision: 1,
            devices: vec![DeviceRecord {
                id: public.device_id().to_string(),
                name: "laptop".into(),
                user: "alice".into(),
                public_key: public.to_text(),
                revoked: false,
            }],
            apps: vec![app("ssh", 22), app("web", 443), app("wiki", 8080)],
            // A legacy grant that must be ignored once a policy decides.
            grants: vec![postern_protocol::snapshot::GrantRecord {
                app: "web".into(),
                user: "alice".into(),
            }],
            access: Some(vec![]),
            policy: Some(PolicyText {
                text: policy.into(),
                sha256: hex::encode(digest),
            }),
            subjects: Some(subjects),
            ..Snapshot::default()
        }
    }

    fn view(risk: u8, disk_passed: bool) -> RegistryView {
        let (view, warnings) =
            RegistryView::from_snapshot(&snapshot(POLICY, vec![subject(risk, disk_passed)]));
        assert!(warnings.is_empty(), "{warnings:?}");
        view
    }

    struct Lab {
        pipeline: KnockPipeline,
        secret: GatewaySecret,
        nonce: u8,
        next_id: u32,
    }

    impl Lab {
        fn new(max_session_ms: u64) -> Lab {
            let secret = GatewaySecret::from_bytes([7; 32]);
            let limits = PipelineLimits {
                max_skew_ms: 30_000,
                session_ttl_ms: 60_000,
                max_session_ms,
                replay_capacity: 1000,
                require_claimed_addr: true,
            };
            Lab {
                pipeline: KnockPipeline::new(secret.clone(), limits),
                secret,
                nonce: 0,
                next_id: 100,
            }
        }

        fn knock(&mut self, view: &RegistryView, app: &str, src: &str, now: u64) -> Decision {
            self.nonce += 1;
            let key = alice();
            let knock = Knock {
                device: key.public_key().device_id(),
                timestamp_ms: now,
                nonce: [self.nonce; 16],
                flags: flags::KNOCK,
                app: postern_protocol::AppName::new(app).expect("valid app name"),
                claimed_addr: Some(src.parse().expect("literal")),
                posture_digest: [0; 32],
            };
            let dgram = seal(
                &knock,
                &key,
                &self.secret.public_key(),
                SealRandomness {
                    ephemeral_secret: [self.nonce; 32],
                },
            )
            .expect("seal a valid knock");
            let next = &mut self.next_id;
            let mut ids = || {
                *next += 1;
                *next
            };
            let src = src.parse().expect("literal");
            self.pipeline.decide(Some(view), src, &dgram, now, &mut ids)
        }

        /// The session and its kernel timeout of an allow, or a panic naming the decision.
        fn allowed(&mut self, view: &RegistryView, app: &str, now: u64) -> (SessionId, u64) {
            match self.knock(view, app, LAB, now) {
                Decision::Allow {
                    pinhole,
                    session_ttl_ms,
                    ..
                } => (pinhole.session, session_ttl_ms),
                other => panic!("expected allow for {app}, got {other:?}"),
            }
        }
    }

    #[test]
    fn source_networks_are_decided_with_the_knocks_address() {
        let v = view(0, true);
        let mut lab = Lab::new(12 * HOUR);
        let (_, ttl) = lab.allowed(&v, "ssh", NOW);
        assert_eq!(ttl, HOUR, "lease mode: the session lasts the rule's lease");
        let d = lab.knock(&v, "ssh", ELSEWHERE, NOW);
        assert_eq!((d.verdict(), d.reason()), ("deny", "policy_denied"));
        // Not a reason the device can fix: no hint; the audit says why.
        let Decision::Deny {
            policy: Some(policy),
            ..
        } = d
        else {
            panic!("expected a local policy denial, got {d:?}")
        };
        assert_eq!(policy.hint, None);
        assert_eq!(
            policy.why,
            "rule \"ssh-lab\": source address is not in source_networks"
        );
    }

    #[test]
    fn a_failing_posture_requirement_is_named_in_the_denial() {
        let v = view(0, false);
        let mut lab = Lab::new(12 * HOUR);
        let Decision::Deny {
            reason,
            policy: Some(policy),
            ..
        } = lab.knock(&v, "wiki", LAB, NOW)
        else {
            panic!("expected a denial with a hint")
        };
        let hint = policy.hint.expect("posture is fixable: a hint");
        assert_eq!(reason, "policy_denied");
        assert_eq!(
            (
                hint.reason.as_str(),
                hint.requirement.as_deref(),
                hint.remediation.as_deref()
            ),
            (
                "posture_failed",
                Some("disk"),
                Some("Turn on disk encryption")
            )
        );
    }

    #[test]
    fn a_raised_risk_closes_the_live_session_on_the_next_view() {
        let mut lab = Lab::new(12 * HOUR);
        let (ssh, _) = lab.allowed(&view(10, true), "ssh", NOW);
        let (wiki, _) = lab.allowed(&view(10, true), "wiki", NOW);
        // Same inputs: nothing closes.
        assert!(lab
            .pipeline
            .sessions_revoked_by(&view(10, true), NOW + 1000)
            .is_empty());
        // Risk 80 is above ssh's max_risk 40; wiki has no risk limit.
        assert_eq!(
            lab.pipeline
                .sessions_revoked_by(&view(80, true), NOW + 2000),
            vec![ssh]
        );
        // The disk verdict turns to failed: wiki closes too.
        assert_eq!(
            lab.pipeline
                .sessions_revoked_by(&view(80, false), NOW + 3000),
            vec![wiki]
        );
    }

    #[test]
    fn the_end_of_a_time_window_closes_the_session_in_the_sweep() {
        let v = view(0, true);
        let mut lab = Lab::new(12 * HOUR);
        // Friday 08:30 UTC, inside mon-fri 08:00-09:00.
        let (web, ttl) = lab.allowed(&v, "web", NOW + HOUR / 2);
        assert_eq!(ttl, 12 * HOUR, "verdict mode: up to the cap");
        let window_end = NOW + HOUR;
        assert!(lab
            .pipeline
            .close_sessions_due(&v, window_end - 1)
            .is_empty());
        assert_eq!(
            lab.pipeline.close_sessions_due(&v, window_end),
            vec![(web, close_reason::ACCESS_EXPIRED)]
        );
        assert!(lab
            .pipeline
            .close_sessions_due(&v, window_end + 1)
            .is_empty());
        // Outside the window a knock is refused.
        let d = lab.knock(&v, "web", LAB, window_end + 1000);
        assert_eq!(d.reason(), "policy_denied");
    }

    #[test]
    fn a_renewal_reuses_a_decision_only_while_it_holds_on_the_same_view() {
        let v = view(0, true);
        let mut lab = Lab::new(12 * HOUR);
        let (web, _) = lab.allowed(&v, "web", NOW + HOUR / 2);
        // Inside the window the renewal is the same session (decision reused).
        let (again, _) = lab.allowed(&v, "web", NOW + HOUR / 2 + 1000);
        assert_eq!(again, web);
        // At the window's end, even before any sweep ran, the engine decides again.
        let d = lab.knock(&v, "web", LAB, NOW + HOUR);
        assert_eq!(d.reason(), "policy_denied", "{d:?}");
        // A new view with the same contents and revision is still a new view: a risk
        // raised past ssh's max_risk (40) is seen by the very next renewal.
        let later = NOW + HOUR + 1000;
        let (ssh, _) = lab.allowed(&v, "ssh", later);
        let (kept, _) = lab.allowed(&v, "ssh", later + 1000);
        assert_eq!(kept, ssh);
        let risky = view(90, true);
        let d = lab.knock(&risky, "ssh", LAB, later + 2000);
        assert_eq!(d.reason(), "policy_denied", "{d:?}");
    }

    #[test]
    fn a_verdict_mode_session_needs_no_renewal_while_the_decision_holds() {
        let v = view(0, true);
        let mut lab = Lab::new(12 * HOUR);
        let (wiki, ttl) = lab.allowed(&v, "wiki", NOW);
        // Not the 15 min lease: the session holds up to the cap.
        assert_eq!(ttl, 12 * HOUR);
        assert_eq!(lab.pipeline.session_mode(wiki), Some("verdict"));
        // Two hours later, no knock in between: the sweep keeps it (the disk verdict
        // is valid for three hours), and a new view with the same inputs too.
        assert!(lab
            .pipeline
            .close_sessions_due(&v, NOW + 2 * HOUR)
            .is_empty());
        assert!(lab
            .pipeline
            .sessions_revoked_by(&view(0, true), NOW + 2 * HOUR)
            .is_empty());
        assert_eq!(lab.pipeline.live_sessions(NOW + 2 * HOUR), 1);
        // At the verdict's expiry the re-evaluation fails.
        assert_eq!(
            lab.pipeline.close_sessions_due(&v, NOW + 3 * HOUR),
            vec![(wiki, close_reason::ACCESS_EXPIRED)]
        );
    }

    #[test]
    fn no_session_outlives_the_maximum_session_length() {
        let v = view(0, true);
        let cap = 10 * 60_000;
        let mut lab = Lab::new(cap);
        // Lease mode (1 h lease): the kernel timeout is cut to the cap ...
        let (ssh, ttl) = lab.allowed(&v, "ssh", NOW);
        assert_eq!(ttl, cap);
        // Verdict mode too.
        let (wiki, ttl) = lab.allowed(&v, "wiki", NOW + 60_000);
        assert_eq!(ttl, cap);
        // A renewal five minutes later does not extend a session past its cap.
        let (renewed, ttl) = lab.allowed(&v, "ssh", NOW + 5 * 60_000);
        assert_eq!((renewed, ttl), (ssh, cap - 5 * 60_000));
        assert!(lab
            .pipeline
            .close_sessions_due(&v, NOW + cap - 1)
            .is_empty());
        assert_eq!(
            lab.pipeline.close_sessions_due(&v, NOW + cap),
            vec![(ssh, close_reason::MAX_SESSION_LENGTH)]
        );
        assert_eq!(
            lab.pipeline.close_sessions_due(&v, NOW + 60_000 + cap),
            vec![(wiki, close_reason::MAX_SESSION_LENGTH)]
        );
        // A knock after the cap opens a new session.
        let (fresh, _) = lab.allowed(&v, "ssh", NOW + cap + 1000);
        assert_ne!(fresh, ssh);
        let mut events = Vec::new();
        lab.pipeline.move_session_events_into(&mut events);
        assert!(events.iter().any(|e| matches!(
            e,
            crate::pipeline::SessionEvent::Closed { reason, info, .. }
                if *reason == close_reason::MAX_SESSION_LENGTH && info.session == ssh
        )));
    }

    #[test]
    fn a_policy_that_cannot_be_used_denies_everything() {
        for (text, sha_ok) in [("[[rule]]\nname = 1\n", true), (POLICY, false)] {
            let mut s = snapshot(text, vec![subject(0, true)]);
            if !sha_ok {
                s.policy.as_mut().expect("policy").sha256 = "00".repeat(32);
            }
            let (v, warnings) = RegistryView::from_snapshot(&s);
            assert_eq!(warnings.len(), 1, "{warnings:?}");
            assert!(
                warnings[0].contains("every knock is denied"),
                "{warnings:?}"
            );
            assert!(v.policy_mode());
            let mut lab = Lab::new(12 * HOUR);
            // The legacy grant for web is ignored.
            assert_eq!(
                lab.knock(&v, "web", LAB, NOW + HOUR / 2).reason(),
                "policy_denied"
            );
        }
        // A device without a subject is denied.
        let (v, _) = RegistryView::from_snapshot(&snapshot(POLICY, vec![]));
        let mut lab = Lab::new(12 * HOUR);
        assert_eq!(lab.knock(&v, "ssh", LAB, NOW).reason(), "policy_denied");
    }
}
