//! The knock pipeline: from one datagram to one decision, cheapest checks first.
//!
//! Owns the order of checks (DESIGN §3): precheck (size, version, key id) → decrypt →
//! device lookup → signature → freshness → replay → revocation → app and grant →
//! claimed address → session. Pure logic over the registry view, the replay cache and
//! the session table: no sockets, no firewall, no clock reads (time is passed in), so it
//! is unit-testable. Must not touch nftables (the caller applies `Decision::Allow`).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use postern_firewall::{AppProto, Pinhole, SessionId};
use postern_protocol::keys::{DeviceId, GatewayKeyId, GatewaySecret};
use postern_protocol::packet::{self, flags, Knock, OpenError};
use postern_protocol::snapshot::AppProtocol;

use crate::local_policy::PolicyDenial;
use crate::registry::{DeviceEntry, Refusal, RegistryView};
use crate::replay_state::ReplayState;

mod continuous;
mod lifecycle;
pub use lifecycle::{
    close_reason, global_session_id, GlobalSessionId, SessionEvent, SessionHex, SessionInfo,
};

/// Who an authenticated knock came from and what it asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Who {
    /// Device id, 32 hex digits. Each field is allocated once per knock; the session
    /// record, its lifecycle events and the session board share them (no copy per
    /// session list publication).
    pub device: Arc<str>,
    pub device_name: Arc<str>,
    pub user: Arc<str>,
    pub app: Arc<str>,
}

/// The outcome of one datagram.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Not authenticated (garbage, wrong key, unknown device, stale, bad signature):
    /// dropped silently, counted and logged.
    Drop { reason: &'static str },
    /// Authenticated but refused (revoked, no grant, unknown app, replay).
    Deny {
        reason: &'static str,
        who: Who,
        /// The gateway's own policy denial (local decisions): why, for the audit line,
        /// and what the denial reply may name (a failing posture requirement, MFA).
        policy: Option<Box<PolicyDenial>>,
    },
    /// Open (or renew) this pinhole.
    Allow {
        who: Who,
        pinhole: Pinhole,
        renewed: bool,
        /// The session's kernel timeout to set: the lease (lease mode), the configured
        /// `session_secs` (legacy grants), never past the maximum session length.
        session_ttl_ms: u64,
    },
    /// A CLOSE knock ended this live session (the pipeline already forgot it): the caller
    /// closes it in the firewall (session element, pinholes, conntrack entries).
    Close { who: Who, session: SessionId },
}

impl Decision {
    pub fn verdict(&self) -> &'static str {
        match self {
            Decision::Drop { .. } => "drop",
            Decision::Deny { .. } => "deny",
            Decision::Allow { .. } => "allow",
            Decision::Close { .. } => "closed",
        }
    }

    pub fn reason(&self) -> &'static str {
        match self {
            Decision::Drop { reason } | Decision::Deny { reason, .. } => reason,
            Decision::Allow { renewed: true, .. } => "renewed",
            Decision::Allow { .. } => "granted",
            Decision::Close { .. } => "client_close",
        }
    }

    pub fn who(&self) -> Option<&Who> {
        match self {
            Decision::Drop { .. } => None,
            Decision::Deny { who, .. }
            | Decision::Allow { who, .. }
            | Decision::Close { who, .. } => Some(who),
        }
    }
}

/// Timing knobs of the pipeline.
#[derive(Debug, Clone, Copy)]
pub struct PipelineLimits {
    pub max_skew_ms: u64,
    /// Session length for legacy grants and older controllers' access records.
    pub session_ttl_ms: u64,
    /// No session outlives its opening by more than this (`max_session_secs`).
    pub max_session_ms: u64,
    pub replay_capacity: usize,
    /// Refuse knocks that carry no signed claimed address (default on).
    pub require_claimed_addr: bool,
}

/// How long the replay cache remembers a knock after its timestamp: a knock is fresh for
/// `max_skew` on either side of the gateway clock, so twice the skew covers every
/// timestamp the freshness check can still accept.
pub fn replay_window_ms(limits: &PipelineLimits) -> u64 {
    2 * limits.max_skew_ms
}

/// What names a session: device, app (the view's interned name, so building a key copies
/// nothing) and client address.
type SessionKey = (DeviceId, Arc<str>, IpAddr);

/// Live sessions as the gateway remembers them, so a re-knock renews the same session
/// (same conntrack mark) instead of stacking new ones. The kernel's timeouts are the
/// truth; this table only maps (device, app, address) to a session id.
#[derive(Debug, Default)]
struct SessionTable {
    by_key: HashMap<SessionKey, (SessionId, u64)>,
    by_id: HashMap<u32, SessionKey>,
    /// Per live session: who, source, opened/renewed times (pipeline/lifecycle.rs).
    records: HashMap<u32, lifecycle::SessionRecord>,
    /// Lifecycle events not yet taken by the daemon (pipeline/lifecycle.rs).
    events: Vec<SessionEvent>,
    /// Per session: mode, opening, cap, re-evaluation time (pipeline/continuous.rs).
    terms: HashMap<u32, continuous::SessionTerms>,
    /// (due ms, session id), earliest first: what the periodic sweep looks at.
    due: std::collections::BTreeSet<(u64, u32)>,
}

impl SessionTable {
    /// Returns the session for `key` (renewed) or a fresh one from `new_id`.
    fn session(
        &mut self,
        key: SessionKey,
        now_ms: u64,
        ttl_ms: u64,
        new_id: &mut dyn FnMut() -> u32,
    ) -> (SessionId, bool) {
        if self.by_key.len() >= 4096 {
            self.prune(now_ms);
        }
        if let Some((id, expires)) = self.by_key.get_mut(&key) {
            if now_ms < *expires {
                *expires = now_ms + ttl_ms;
                return (*id, true);
            }
        }
        let id = loop {
            // Session ids are 24 bits: the conntrack mark's top byte is Postern's tag.
            let candidate = new_id() & postern_firewall::MAX_SESSION_ID;
            if candidate != 0 && !self.by_id.contains_key(&candidate) {
                break candidate;
            }
        };
        if let Some((old, _)) = self
            .by_key
            .insert(key.clone(), (SessionId(id), now_ms + ttl_ms))
        {
            self.by_id.remove(&old.0);
        }
        self.by_id.insert(id, key);
        (SessionId(id), false)
    }

    /// Forgets and returns the live session for `key`, if there is one at `now_ms`.
    fn close(&mut self, key: &SessionKey, now_ms: u64) -> Option<SessionId> {
        let (id, expires) = self.by_key.remove(key)?;
        self.by_id.remove(&id.0);
        (now_ms < expires).then_some(id)
    }

    /// Sessions not yet past their expiry at `now_ms`.
    fn live(&self, now_ms: u64) -> usize {
        self.by_key.values().filter(|(_, e)| now_ms < *e).count()
    }

    fn prune(&mut self, now_ms: u64) {
        let by_id = &mut self.by_id;
        self.by_key.retain(|_, (id, expires)| {
            let live = now_ms < *expires;
            if !live {
                by_id.remove(&id.0);
            }
            live
        });
    }
}

/// A knock that decrypted, whose signature verified against the enrolled key of its
/// device, and whose timestamp is fresh. Only [`Opener::authenticate`] makes one.
#[derive(Debug, Clone)]
pub struct Authenticated {
    device_id: DeviceId,
    knock: Knock,
    /// The knock's clear header: a reply is bound to it (reply.rs).
    header: [u8; packet::HEADER_LEN],
}

impl Authenticated {
    /// The knock's timestamp (ms since the epoch, by the device's clock).
    pub fn timestamp_ms(&self) -> u64 {
        self.knock.timestamp_ms
    }

    /// The signed claimed address (where a reply may go).
    pub fn claimed_addr(&self) -> Option<IpAddr> {
        self.knock.claimed_addr
    }

    /// The knock's flag bits.
    pub fn flags(&self) -> u8 {
        self.knock.flags
    }

    /// What a reply to this knock is bound to: its header and nonce.
    pub fn reply_binding(&self) -> postern_protocol::reply::KnockBinding {
        postern_protocol::reply::KnockBinding {
            header: self.header,
            nonce: self.knock.nonce,
        }
    }
}

/// The stateless, expensive half of the pipeline: precheck → decrypt → device lookup →
/// signature → freshness. Holds the gateway secret; cloned into each crypto worker, so
/// decryption runs in parallel while the stateful half stays on one thread.
#[derive(Clone)]
pub struct Opener {
    secret: GatewaySecret,
    key_id: GatewayKeyId,
    max_skew_ms: u64,
}

impl std::fmt::Debug for Opener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Opener")
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

impl Opener {
    pub fn new(secret: GatewaySecret, max_skew_ms: u64) -> Opener {
        let key_id = secret.public_key().key_id();
        Opener {
            secret,
            key_id,
            max_skew_ms,
        }
    }

    /// The gateway key id the cheap precheck compares against.
    pub fn key_id(&self) -> GatewayKeyId {
        self.key_id
    }

    /// Authenticates `datagram` at `now_ms`, or says why it is dropped (never a `Deny` or an
    /// `Allow`: nothing here is authenticated yet).
    // The Err is only ever the small `Decision::Drop`; the enum is large because `Allow`
    // carries a `Pinhole` (with its optional forward target).
    #[allow(clippy::result_large_err)]
    pub fn authenticate(
        &self,
        view: Option<&RegistryView>,
        datagram: &[u8],
        now_ms: u64,
    ) -> Result<Authenticated, Decision> {
        let drop = |e: OpenError| Decision::Drop { reason: e.reason() };
        packet::precheck(datagram, self.key_id).map_err(drop)?;
        let opened = packet::open(datagram, &self.secret).map_err(drop)?;
        let Some(view) = view else {
            return Err(Decision::Drop {
                reason: "no_registry",
            });
        };
        let device_id = opened.device();
        let Some(device) = view.device(&device_id) else {
            return Err(Decision::Drop {
                reason: "unknown_device",
            });
        };
        let knock = opened.verify(&device.key).map_err(drop)?;
        // From here on the packet is authenticated: it came from this device's key.
        // Freshness after the signature (docs/protocol.md §7): only verified knocks are
        // judged on their timestamp and then fed to the replay cache.
        packet::check_freshness(knock.timestamp_ms, now_ms, self.max_skew_ms).map_err(drop)?;
        let mut header = [0u8; packet::HEADER_LEN];
        header.copy_from_slice(datagram.get(..packet::HEADER_LEN).ok_or(Decision::Drop {
            reason: "too_short",
        })?);
        Ok(Authenticated {
            device_id,
            knock,
            header,
        })
    }
}

/// The knock pipeline's state: the opener, the replay cache and the session table.
pub struct KnockPipeline {
    opener: Opener,
    replay: ReplayState,
    sessions: SessionTable,
    limits: PipelineLimits,
}

impl std::fmt::Debug for KnockPipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KnockPipeline")
            .field("replay_entries", &self.replay.len())
            .field("sessions", &self.sessions.by_key.len())
            .finish_non_exhaustive()
    }
}

impl KnockPipeline {
    /// A pipeline whose replay cache lives in memory only (see [`KnockPipeline::with_replay`]).
    pub fn new(secret: GatewaySecret, limits: PipelineLimits) -> KnockPipeline {
        // Entries must outlive every timestamp the freshness check still accepts.
        let replay = ReplayState::in_memory(limits.replay_capacity, replay_window_ms(&limits));
        KnockPipeline::with_replay(secret, limits, replay)
    }

    /// A pipeline over `replay` (built with a window of [`replay_window_ms`]), e.g. one
    /// journaled to the state directory.
    pub fn with_replay(
        secret: GatewaySecret,
        limits: PipelineLimits,
        replay: ReplayState,
    ) -> KnockPipeline {
        KnockPipeline {
            opener: Opener::new(secret, limits.max_skew_ms),
            replay,
            sessions: SessionTable::default(),
            limits,
        }
    }

    /// The stateless half, for the crypto workers.
    pub fn opener(&self) -> &Opener {
        &self.opener
    }

    /// The replay state (for housekeeping and the clean stop).
    pub fn replay_mut(&mut self) -> &mut ReplayState {
        &mut self.replay
    }

    /// Forgets and returns the live sessions that `view` no longer allows at `now_ms`
    /// (device revoked or deleted, app removed, grant withdrawn; in policy mode the access
    /// record gone or past its `until`): the caller closes them in the firewall, which
    /// stops their flows at once. Called on every new snapshot and, in policy mode,
    /// periodically, so access that runs out closes even with the controller away.
    pub fn sessions_revoked_by(&mut self, view: &RegistryView, now_ms: u64) -> Vec<SessionId> {
        self.sessions.reevaluate_all(view, now_ms)
    }

    /// How many sessions the gateway remembers as live at `now_ms` (for `status`).
    pub fn live_sessions(&self, now_ms: u64) -> usize {
        self.sessions.live(now_ms)
    }

    /// The signed claimed address binds the knock to its sender: a copy replayed first
    /// from another address (an on-path race) is refused instead of opening (or closing)
    /// a door there.
    fn claimed_addr_refusal(&self, knock: &Knock, src: IpAddr) -> Option<&'static str> {
        match knock.claimed_addr {
            Some(claimed) if claimed.to_canonical() != src.to_canonical() => {
                Some("claimed_addr_mismatch")
            }
            None if self.limits.require_claimed_addr => Some("no_claimed_addr"),
            _ => None,
        }
    }

    /// A CLOSE knock (authenticated, fresh, not replayed, device not revoked): ends the
    /// device's live session for the app from `src`. The claimed address must be `src`
    /// (a copy replayed from elsewhere closes nothing). No grant is needed to close: a
    /// session the grant no longer allows was closed when the grant went.
    fn close(
        &mut self,
        knock: &Knock,
        key: Option<SessionKey>,
        src: IpAddr,
        now_ms: u64,
        who: Who,
    ) -> Decision {
        if let Some(reason) = self.claimed_addr_refusal(knock, src) {
            return Decision::Deny {
                reason,
                who,
                policy: None,
            };
        }
        // An app the view no longer has has no live session (closed with the app).
        let closed = key.and_then(|key| self.sessions.close(&key, now_ms));
        match closed {
            Some(session) => {
                self.sessions
                    .retire(session, close_reason::CLIENT_CLOSE, now_ms);
                Decision::Close { who, session }
            }
            None => Decision::Deny {
                reason: "no_session",
                who,
                policy: None,
            },
        }
    }

    /// Who knocked: a knock for a live session reuses that session's names (no allocation
    /// per renewal) unless the view renamed the device or moved it to another user.
    fn who(
        &self,
        view: &RegistryView,
        device: &DeviceEntry,
        device_id: DeviceId,
        app: &str,
        key: Option<&SessionKey>,
    ) -> Who {
        let (name, user) = (view.device_name(device), view.device_user(device));
        if let Some(known) = key.and_then(|k| self.sessions.who_of(k)) {
            if *known.device_name == *name && *known.user == *user {
                return known.clone();
            }
        }
        Who {
            device: device_id.to_string().into(),
            device_name: name.into(),
            user: user.into(),
            app: key.map_or_else(|| app.into(), |k| Arc::clone(&k.1)),
        }
    }

    /// Decides what to do with `datagram` from `src` at `now_ms`. `new_id` supplies
    /// random nonzero session ids.
    pub fn decide(
        &mut self,
        view: Option<&RegistryView>,
        src: IpAddr,
        datagram: &[u8],
        now_ms: u64,
        new_id: &mut dyn FnMut() -> u32,
    ) -> Decision {
        match self.opener.authenticate(view, datagram, now_ms) {
            Ok(auth) => self.conclude(view, src, auth, now_ms, new_id),
            Err(decision) => decision,
        }
    }

    /// The stateful half, on the one thread that owns the firewall: replay → revocation →
    /// app and grant → claimed address → session. `view` is the latest registry (it may be
    /// newer than the one `auth` was checked against).
    pub fn conclude(
        &mut self,
        view: Option<&RegistryView>,
        src: IpAddr,
        auth: Authenticated,
        now_ms: u64,
        new_id: &mut dyn FnMut() -> u32,
    ) -> Decision {
        let Authenticated {
            device_id, knock, ..
        } = auth;
        let Some(view) = view else {
            return Decision::Drop {
                reason: "no_registry",
            };
        };
        let Some(device) = view.device(&device_id) else {
            return Decision::Drop {
                reason: "unknown_device",
            };
        };
        let addr = src.to_canonical();
        let app = view.app_entry(&knock.app);
        let key = app.map(|(_, name)| (device_id, Arc::clone(name), addr));
        let who = self.who(view, device, device_id, &knock.app, key.as_ref());
        let deny = |reason: &'static str| Decision::Deny {
            reason,
            who: who.clone(),
            policy: None,
        };
        if let Err(reason) =
            self.replay
                .check_and_insert(device_id, knock.nonce, knock.timestamp_ms, now_ms)
        {
            return deny(reason);
        }
        if device.revoked {
            return deny("device_revoked");
        }
        if knock.flags & flags::CLOSE != 0 {
            return self.close(&knock, key, src, now_ms, who);
        }
        let (Some((app, _)), Some(key)) = (app, key) else {
            return deny("unknown_app");
        };
        // A renewal under the same view, before its decision's `valid_until`, reuses that
        // decision (the policy engine is not run again; see SessionTerms::decided).
        let decided = self
            .sessions
            .decided(&key, view.generation(), now_ms)
            .map(Ok);
        let permit = match decided
            .unwrap_or_else(|| view.permit(&device_id, &who.user, &app.name, addr, now_ms))
        {
            Ok(permit) => permit,
            Err(refusal) => {
                let policy = match &refusal {
                    Refusal::LocalDenied(d) => Some(Box::new(PolicyDenial::new(
                        &device_id,
                        &app.name,
                        d.as_deref(),
                    ))),
                    _ => None,
                };
                return Decision::Deny {
                    reason: refusal.reason(),
                    who,
                    policy,
                };
            }
        };
        if let Some(reason) = self.claimed_addr_refusal(&knock, src) {
            return deny(reason);
        }
        let (opened_at_ms, cap_at_ms) =
            self.sessions
                .opening(&key, now_ms, self.limits.max_session_ms);
        let session_ttl_ms =
            continuous::session_ttl_ms(&permit, self.limits.session_ttl_ms, now_ms, cap_at_ms);
        let (session, renewed) = self.sessions.session(key, now_ms, session_ttl_ms, new_id);
        self.sessions.set_terms(
            session,
            continuous::SessionTerms {
                hold: permit.hold,
                opened_at_ms,
                cap_at_ms,
                permit,
                generation: view.generation(),
            },
        );
        self.sessions
            .note_admitted(session, renewed, &who, addr, now_ms);
        let proto = match app.protocol {
            AppProtocol::Tcp => AppProto::Tcp,
            AppProtocol::Udp => AppProto::Udp,
        };
        Decision::Allow {
            who,
            pinhole: Pinhole {
                addr,
                proto,
                port: app.port,
                session,
                forward: app.forward,
            },
            renewed,
            session_ttl_ms,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use postern_protocol::keys::DeviceSigningKey;
    use postern_protocol::packet::{seal, Knock, SealRandomness};
    use postern_protocol::snapshot::{
        AccessRecord, AppRecord, DeviceRecord, GrantRecord, Snapshot,
    };

    const NOW: u64 = 1_800_000_000_000;
    const SRC: &str = "10.1.1.1";

    struct Fixture {
        pipeline: KnockPipeline,
        gateway: postern_protocol::keys::GatewayPublicKey,
        alice: DeviceSigningKey,
        view: RegistryView,
        next: u32,
    }

    fn device_record(
        key: &DeviceSigningKey,
        name: &str,
        user: &str,
        revoked: bool,
    ) -> DeviceRecord {
        let public = key.public_key();
        DeviceRecord {
            id: public.device_id().to_string(),
            name: name.into(),
            user: user.into(),
            public_key: public.to_text(),
            revoked,
        }
    }

    fn alice_key() -> DeviceSigningKey {
        DeviceSigningKey::from_seed([1; 32])
    }

    /// Alice's laptop and mallory's revoked device; apps ssh (local) and db (forwarded);
    /// ssh granted to both users (legacy mode: no access records).
    fn fixture_snapshot() -> Snapshot {
        let mallory = DeviceSigningKey::from_seed([2; 32]);
        Snapshot {
            revision: 3,
            devices: vec![
                device_record(&alice_key(), "laptop", "alice", false),
                device_record(&mallory, "stolen", "mallory", true),
            ],
            apps: vec![
                AppRecord {
                    name: "ssh".into(),
                    protocol: AppProtocol::Tcp,
                    port: 22,
                    forward: None,
                },
                AppRecord {
                    name: "db".into(),
                    protocol: AppProtocol::Tcp,
                    port: 5432,
                    forward: Some("10.20.0.5:5432".parse().expect("literal")),
                },
            ],
            grants: vec![
                GrantRecord {
                    app: "ssh".into(),
                    user: "alice".into(),
                },
                GrantRecord {
                    app: "ssh".into(),
                    user: "mallory".into(),
                },
            ],
            access: None,
            denials: None,
            kills: None,
            policy: None,
            subjects: None,
        }
    }

    fn fixture() -> Fixture {
        let secret = GatewaySecret::from_bytes([7; 32]);
        let gateway = secret.public_key();
        let alice = alice_key();
        let (view, warnings) = RegistryView::from_snapshot(&fixture_snapshot());
        assert!(warnings.is_empty(), "{warnings:?}");
        let limits = PipelineLimits {
            max_skew_ms: 30_000,
            session_ttl_ms: 60_000,
            max_session_ms: 12 * 3_600_000,
            replay_capacity: 1000,
            require_claimed_addr: true,
        };
        Fixture {
            pipeline: KnockPipeline::new(secret, limits),
            gateway,
            alice,
            view,
            next: 100,
        }
    }

    fn knock(key: &DeviceSigningKey, app: &str, ts: u64, nonce: u8) -> Knock {
        Knock {
            device: key.public_key().device_id(),
            timestamp_ms: ts,
            nonce: [nonce; 16],
            flags: flags::KNOCK,
            app: postern_protocol::AppName::new(app).expect("valid app name"),
            claimed_addr: Some(SRC.parse().expect("literal")),
            posture_digest: [0; 32],
        }
    }

    impl Fixture {
        fn run(&mut self, k: &Knock, key: &DeviceSigningKey, now: u64) -> Decision {
            let dgram = seal(
                k,
                key,
                &self.gateway,
                SealRandomness {
                    ephemeral_secret: [k.nonce[0]; 32],
                },
            )
            .expect("seal a valid knock");
            self.send(&dgram, now)
        }
        fn send(&mut self, dgram: &[u8], now: u64) -> Decision {
            let next = &mut self.next;
            let mut ids = || {
                *next += 1;
                *next
            };
            let src: IpAddr = "10.1.1.1".parse().expect("literal");
            self.pipeline
                .decide(Some(&self.view), src, dgram, now, &mut ids)
        }
    }

    #[test]
    fn granted_device_gets_a_pinhole_and_a_reknock_renews_it() {
        let mut f = fixture();
        let alice = f.alice.clone();
        let d = f.run(&knock(&alice, "ssh", NOW, 1), &alice, NOW);
        let Decision::Allow {
            pinhole,
            renewed: false,
            ..
        } = d
        else {
            panic!("expected allow, got {d:?}")
        };
        assert_eq!(
            (pinhole.port, pinhole.proto, pinhole.session),
            (22, AppProto::Tcp, SessionId(101))
        );
        let d = f.run(&knock(&alice, "ssh", NOW + 1000, 2), &alice, NOW + 1000);
        let Decision::Allow {
            pinhole: again,
            renewed: true,
            ..
        } = d
        else {
            panic!("expected renew, got {d:?}")
        };
        assert_eq!(again.session, pinhole.session);
        // After the session ttl a knock starts a new session.
        let later = NOW + 120_000;
        let d = f.run(&knock(&alice, "ssh", later, 3), &alice, later);
        let Decision::Allow {
            pinhole: fresh,
            renewed: false,
            ..
        } = d
        else {
            panic!("expected new, got {d:?}")
        };
        assert_ne!(fresh.session, pinhole.session);
    }

    #[test]
    fn refusals_carry_the_right_reason() {
        let mut f = fixture();
        let alice = f.alice.clone();
        let k = knock(&alice, "ssh", NOW, 9);
        let dgram = seal(
            &k,
            &alice,
            &f.gateway,
            SealRandomness {
                ephemeral_secret: [9; 32],
            },
        )
        .expect("seal");
        assert_eq!(f.send(&dgram, NOW).verdict(), "allow");
        assert_eq!(f.send(&dgram, NOW + 10).reason(), "replay");
        assert_eq!(
            f.run(&knock(&alice, "db", NOW, 10), &alice, NOW).reason(),
            "not_granted"
        );
        assert_eq!(
            f.run(&knock(&alice, "nope", NOW, 11), &alice, NOW).reason(),
            "unknown_app"
        );
        assert_eq!(
            f.run(&knock(&alice, "ssh", NOW - 31_000, 12), &alice, NOW)
                .reason(),
            "stale"
        );
        assert_eq!(
            f.run(&knock(&alice, "ssh", NOW + 31_000, 13), &alice, NOW)
                .reason(),
            "stale"
        );
        let mallory = DeviceSigningKey::from_seed([2; 32]);
        assert_eq!(
            f.run(&knock(&mallory, "ssh", NOW, 14), &mallory, NOW)
                .reason(),
            "device_revoked"
        );
        let stranger = DeviceSigningKey::from_seed([3; 32]);
        assert_eq!(
            f.run(&knock(&stranger, "ssh", NOW, 15), &stranger, NOW)
                .reason(),
            "unknown_device"
        );
        // Signed by another key while claiming alice's id: never authenticated.
        assert_eq!(
            f.run(&knock(&alice, "ssh", NOW, 16), &stranger, NOW)
                .reason(),
            "bad_signature"
        );
        let mut claimed = knock(&alice, "ssh", NOW, 17);
        claimed.claimed_addr = Some("192.0.2.9".parse().expect("literal"));
        assert_eq!(
            f.run(&claimed, &alice, NOW).reason(),
            "claimed_addr_mismatch"
        );
    }

    #[test]
    fn garbage_tampering_and_missing_registry_are_dropped() {
        let mut f = fixture();
        let alice = f.alice.clone();
        assert_eq!(f.send(b"", NOW).verdict(), "drop");
        assert_eq!(f.send(&[0u8; 300], NOW).verdict(), "drop");
        let k = knock(&alice, "ssh", NOW, 20);
        let dgram = seal(
            &k,
            &alice,
            &f.gateway,
            SealRandomness {
                ephemeral_secret: [20; 32],
            },
        )
        .expect("seal");
        for i in 0..dgram.len() {
            let mut t = dgram.clone();
            t[i] ^= 0x01;
            assert_eq!(
                f.send(&t, NOW).verdict(),
                "drop",
                "flipped byte {i} was not dropped"
            );
        }
        let mut ids = || 1;
        let src: IpAddr = "10.1.1.1".parse().expect("literal");
        let d = f.pipeline.decide(None, src, &dgram, NOW, &mut ids);
        assert_eq!(d.reason(), "no_registry");
    }
    #[test]
    fn a_close_knock_ends_the_session_and_a_second_close_finds_none() {
        let mut f = fixture();
        let alice = f.alice.clone();
        let close = |nonce: u8, ts: u64| {
            let mut k = knock(&alice, "ssh", ts, nonce);
            k.flags = flags::CLOSE;
            k
        };
        // No session yet: nothing to close.
        let d = f.run(&close(70, NOW), &alice, NOW);
        assert_eq!((d.verdict(), d.reason()), ("deny", "no_session"));
        let Decision::Allow { pinhole, .. } = f.run(&knock(&alice, "ssh", NOW, 71), &alice, NOW)
        else {
            panic!("expected allow")
        };
        // From another claimed address: refused, the session stays.
        let mut elsewhere = close(72, NOW + 10);
        elsewhere.claimed_addr = Some("192.0.2.9".parse().expect("literal"));
        assert_eq!(
            f.run(&elsewhere, &alice, NOW + 10).reason(),
            "claimed_addr_mismatch"
        );
        let d = f.run(&close(73, NOW + 20), &alice, NOW + 20);
        assert_eq!((d.verdict(), d.reason()), ("closed", "client_close"));
        let Decision::Close { session, who } = d else {
            panic!("expected close, got {d:?}")
        };
        assert_eq!((session, &*who.app), (pinhole.session, "ssh"));
        // Forgotten: a second close finds nothing, and the next knock is a new session.
        assert_eq!(
            f.run(&close(74, NOW + 30), &alice, NOW + 30).reason(),
            "no_session"
        );
        let d = f.run(&knock(&alice, "ssh", NOW + 40, 75), &alice, NOW + 40);
        let Decision::Allow {
            pinhole: fresh,
            renewed: false,
            ..
        } = d
        else {
            panic!("expected a new session, got {d:?}")
        };
        assert_ne!(fresh.session, pinhole.session);
        // An expired session cannot be closed (the kernel already ended it).
        let later = NOW + 40 + 61_000;
        assert_eq!(
            f.run(&close(76, later), &alice, later).reason(),
            "no_session"
        );
        // A replayed close is refused as a replay; a revoked device's close is refused.
        let dgram = seal(
            &close(78, later),
            &alice,
            &f.gateway,
            SealRandomness {
                ephemeral_secret: [78; 32],
            },
        )
        .expect("seal");
        assert_eq!(f.send(&dgram, later).reason(), "no_session");
        assert_eq!(f.send(&dgram, later + 1).reason(), "replay");
        let mallory = DeviceSigningKey::from_seed([2; 32]);
        let mut k = knock(&mallory, "ssh", later, 77);
        k.flags = flags::CLOSE;
        assert_eq!(f.run(&k, &mallory, later).reason(), "device_revoked");
    }

    #[test]
    fn a_knock_without_a_claimed_address_is_refused() {
        let mut f = fixture();
        let alice = f.alice.clone();
        let mut k = knock(&alice, "ssh", NOW, 30);
        k.claimed_addr = None;
        assert_eq!(f.run(&k, &alice, NOW).reason(), "no_claimed_addr");
    }

    #[test]
    fn a_new_registry_closes_the_sessions_it_no_longer_allows() {
        let mut f = fixture();
        let alice = f.alice.clone();
        let bob = DeviceSigningKey::from_seed([4; 32]);
        let mut snapshot = Snapshot {
            revision: 4,
            devices: vec![
                device_record(&alice, "laptop", "alice", false),
                device_record(&bob, "desktop", "bob", false),
            ],
            apps: vec![AppRecord {
                name: "ssh".into(),
                protocol: AppProtocol::Tcp,
                port: 22,
                forward: None,
            }],
            grants: vec![
                GrantRecord {
                    app: "ssh".into(),
                    user: "alice".into(),
                },
                GrantRecord {
                    app: "ssh".into(),
                    user: "bob".into(),
                },
            ],
            access: None,
            denials: None,
            kills: None,
            policy: None,
            subjects: None,
        };
        f.view = RegistryView::from_snapshot(&snapshot).0;
        let session_of = |d: Decision| match d {
            Decision::Allow { pinhole, .. } => pinhole.session,
            other => panic!("expected allow, got {other:?}"),
        };
        let a = session_of(f.run(&knock(&alice, "ssh", NOW, 31), &alice, NOW));
        let b = session_of(f.run(&knock(&bob, "ssh", NOW, 32), &bob, NOW));
        // Nothing changed: nothing to close.
        assert!(f.pipeline.sessions_revoked_by(&f.view, NOW).is_empty());
        // Alice's device revoked: only her session closes, once.
        snapshot.devices[0].revoked = true;
        let view = RegistryView::from_snapshot(&snapshot).0;
        assert_eq!(f.pipeline.sessions_revoked_by(&view, NOW), vec![a]);
        assert!(f.pipeline.sessions_revoked_by(&view, NOW).is_empty());
        // Bob's grant withdrawn: his closes too.
        snapshot.grants.pop();
        let view = RegistryView::from_snapshot(&snapshot).0;
        assert_eq!(f.pipeline.sessions_revoked_by(&view, NOW), vec![b]);
    }

    /// The fixture's registry in policy mode: `access` replaces the grants (which still
    /// name alice for ssh, and must now be ignored).
    fn policy_view(access: Vec<AccessRecord>) -> RegistryView {
        let mut snapshot = fixture_snapshot();
        snapshot.revision = 9;
        snapshot.access = Some(access);
        let (view, warnings) = RegistryView::from_snapshot(&snapshot);
        assert!(warnings.is_empty(), "{warnings:?}");
        assert!(view.policy_mode());
        view
    }

    fn record(key: &DeviceSigningKey, app: &str, until: Option<u64>) -> AccessRecord {
        AccessRecord {
            device: key.public_key().device_id().to_string(),
            app: app.into(),
            until,
        }
    }

    #[test]
    fn legacy_mode_without_access_records_uses_grants() {
        let mut f = fixture();
        assert!(!f.view.policy_mode());
        let alice = f.alice.clone();
        assert_eq!(
            f.run(&knock(&alice, "ssh", NOW, 41), &alice, NOW).reason(),
            "granted"
        );
        assert_eq!(
            f.run(&knock(&alice, "db", NOW, 42), &alice, NOW).reason(),
            "not_granted"
        );
    }

    #[test]
    fn policy_mode_admits_only_devices_with_a_live_access_record() {
        let mut f = fixture();
        let alice = f.alice.clone();
        let now_secs = NOW / 1000;
        // ssh granted by the legacy grant but no access record: denied by policy.
        f.view = policy_view(vec![record(&alice, "db", Some(now_secs + 60))]);
        let d = f.run(&knock(&alice, "ssh", NOW, 51), &alice, NOW);
        assert_eq!((d.verdict(), d.reason()), ("deny", "policy_denied"));
        let d = f.run(&knock(&alice, "db", NOW, 52), &alice, NOW);
        assert_eq!((d.verdict(), d.reason()), ("allow", "granted"));
        // At `until` the record no longer admits, with no new snapshot.
        let at_until = (now_secs + 60) * 1000;
        let d = f.run(&knock(&alice, "db", at_until, 53), &alice, at_until);
        assert_eq!(d.reason(), "policy_denied");
        // No `until`: no time limit. An empty list is policy mode with nothing allowed.
        f.view = policy_view(vec![record(&alice, "ssh", None)]);
        assert_eq!(
            f.run(&knock(&alice, "ssh", NOW, 54), &alice, NOW).reason(),
            "granted"
        );
        f.view = policy_view(vec![]);
        assert_eq!(
            f.run(&knock(&alice, "ssh", NOW, 55), &alice, NOW).reason(),
            "policy_denied"
        );
    }

    #[test]
    fn policy_mode_closes_sessions_whose_access_record_disappeared() {
        let mut f = fixture();
        let alice = f.alice.clone();
        f.view = policy_view(vec![
            record(&alice, "ssh", None),
            record(&alice, "db", None),
        ]);
        let session_of = |d: Decision| match d {
            Decision::Allow { pinhole, .. } => pinhole.session,
            other => panic!("expected allow, got {other:?}"),
        };
        let ssh = session_of(f.run(&knock(&alice, "ssh", NOW, 61), &alice, NOW));
        let db = session_of(f.run(&knock(&alice, "db", NOW, 62), &alice, NOW));
        assert!(f.pipeline.sessions_revoked_by(&f.view, NOW).is_empty());
        // The db record is gone (the grant for ssh is irrelevant in policy mode).
        let view = policy_view(vec![record(&alice, "ssh", Some(NOW / 1000 + 5))]);
        assert_eq!(f.pipeline.sessions_revoked_by(&view, NOW), vec![db]);
        // The same view later: the ssh record's `until` has passed, with no new snapshot.
        assert!(f
            .pipeline
            .sessions_revoked_by(&view, NOW + 4_999)
            .is_empty());
        assert_eq!(
            f.pipeline.sessions_revoked_by(&view, NOW + 5_000),
            vec![ssh]
        );
        // A legacy grant does not keep a session open in policy mode.
        let ssh = session_of(f.run(&knock(&alice, "ssh", NOW, 63), &alice, NOW));
        let view = policy_view(vec![]);
        assert_eq!(f.pipeline.sessions_revoked_by(&view, NOW), vec![ssh]);
    }
}
