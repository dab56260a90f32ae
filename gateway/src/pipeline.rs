//! The knock pipeline: from one datagram to one decision, cheapest checks first.
//!
//! Owns the order of checks (DESIGN §3): precheck (size, version, key id) → decrypt →
//! device lookup → freshness → signature → replay → revocation → app and grant →
//! claimed address → session. Pure logic over the registry view, the replay cache and
//! the session table: no sockets, no firewall, no clock reads (time is passed in), so it
//! is unit-testable. Must not touch nftables (the caller applies `Decision::Allow`).

use std::collections::HashMap;
use std::net::IpAddr;

use postern_firewall::{AppProto, Pinhole, SessionId};
use postern_protocol::keys::{DeviceId, GatewayKeyId, GatewaySecret};
use postern_protocol::packet::{self, flags, OpenError};
use postern_protocol::replay::ReplayCache;
use postern_protocol::snapshot::AppProtocol;

use crate::registry::RegistryView;

/// Who an authenticated knock came from and what it asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Who {
    pub device: String,
    pub device_name: String,
    pub user: String,
    pub app: String,
}

/// The outcome of one datagram.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Not authenticated (garbage, wrong key, unknown device, stale, bad signature):
    /// dropped silently, counted and logged.
    Drop { reason: &'static str },
    /// Authenticated but refused (revoked, no grant, unknown app, replay).
    Deny { reason: &'static str, who: Who },
    /// Open (or renew) this pinhole.
    Allow {
        who: Who,
        pinhole: Pinhole,
        renewed: bool,
    },
}

impl Decision {
    pub fn verdict(&self) -> &'static str {
        match self {
            Decision::Drop { .. } => "drop",
            Decision::Deny { .. } => "deny",
            Decision::Allow { .. } => "allow",
        }
    }

    pub fn reason(&self) -> &'static str {
        match self {
            Decision::Drop { reason } | Decision::Deny { reason, .. } => reason,
            Decision::Allow { renewed: true, .. } => "renewed",
            Decision::Allow { .. } => "granted",
        }
    }

    pub fn who(&self) -> Option<&Who> {
        match self {
            Decision::Drop { .. } => None,
            Decision::Deny { who, .. } | Decision::Allow { who, .. } => Some(who),
        }
    }
}

/// Timing knobs of the pipeline.
#[derive(Debug, Clone, Copy)]
pub struct PipelineLimits {
    pub max_skew_ms: u64,
    pub session_ttl_ms: u64,
    pub replay_capacity: usize,
}

/// Live sessions as the gateway remembers them, so a re-knock renews the same session
/// (same conntrack mark) instead of stacking new ones. The kernel's timeouts are the
/// truth; this table only maps (device, app, address) to a session id.
#[derive(Debug, Default)]
struct SessionTable {
    by_key: HashMap<(DeviceId, String, IpAddr), (SessionId, u64)>,
    by_id: HashMap<u32, (DeviceId, String, IpAddr)>,
}

impl SessionTable {
    /// Returns the session for `key` (renewed) or a fresh one from `new_id`.
    fn session(
        &mut self,
        key: (DeviceId, String, IpAddr),
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
            let candidate = new_id();
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

/// The knock pipeline's state: the gateway key, the replay cache and the session table.
pub struct KnockPipeline {
    secret: GatewaySecret,
    key_id: GatewayKeyId,
    replay: ReplayCache,
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
    pub fn new(secret: GatewaySecret, limits: PipelineLimits) -> KnockPipeline {
        let key_id = secret.public_key().key_id();
        KnockPipeline {
            secret,
            key_id,
            // Entries must outlive every timestamp the freshness check still accepts.
            replay: ReplayCache::new(limits.replay_capacity, 2 * limits.max_skew_ms),
            sessions: SessionTable::default(),
            limits,
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
        let drop = |e: OpenError| Decision::Drop { reason: e.reason() };
        if let Err(e) = packet::precheck(datagram, self.key_id) {
            return drop(e);
        }
        let opened = match packet::open(datagram, &self.secret) {
            Ok(o) => o,
            Err(e) => return drop(e),
        };
        let Some(view) = view else {
            return Decision::Drop {
                reason: "no_registry",
            };
        };
        let device_id = opened.device();
        let Some(device) = view.device(&device_id) else {
            return Decision::Drop {
                reason: "unknown_device",
            };
        };
        if let Err(e) =
            packet::check_freshness(opened.knock.timestamp_ms, now_ms, self.limits.max_skew_ms)
        {
            return drop(e);
        }
        let knock = match opened.verify(&device.key) {
            Ok(k) => k,
            Err(e) => return drop(e),
        };
        // From here on the packet is authenticated: it came from this device's key.
        let who = Who {
            device: device_id.to_string(),
            device_name: device.name.clone(),
            user: device.user.clone(),
            app: knock.app.clone(),
        };
        let deny = |reason: &'static str| Decision::Deny {
            reason,
            who: who.clone(),
        };
        if let Err(e) =
            self.replay
                .check_and_insert(device_id, knock.nonce, knock.timestamp_ms, now_ms)
        {
            return deny(e.reason());
        }
        if device.revoked {
            return deny("device_revoked");
        }
        if knock.flags & flags::CLOSE != 0 {
            return deny("close_not_supported");
        }
        let Some(app) = view.app(&knock.app) else {
            return deny("unknown_app");
        };
        if !view.is_granted(&app.name, &device.user) {
            return deny("not_granted");
        }
        if let Some(claimed) = knock.claimed_addr {
            if claimed.to_canonical() != src.to_canonical() {
                return deny("claimed_addr_mismatch");
            }
        }
        let addr = src.to_canonical();
        let (session, renewed) = self.sessions.session(
            (device_id, app.name.clone(), addr),
            now_ms,
            self.limits.session_ttl_ms,
            new_id,
        );
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
            },
            renewed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use postern_protocol::keys::DeviceSigningKey;
    use postern_protocol::packet::{seal, Knock, SealRandomness};
    use postern_protocol::snapshot::{AppRecord, DeviceRecord, GrantRecord, Snapshot};

    const NOW: u64 = 1_800_000_000_000;

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

    fn fixture() -> Fixture {
        let secret = GatewaySecret::from_bytes([7; 32]);
        let gateway = secret.public_key();
        let alice = DeviceSigningKey::from_seed([1; 32]);
        let mallory = DeviceSigningKey::from_seed([2; 32]);
        let snapshot = Snapshot {
            revision: 3,
            devices: vec![
                device_record(&alice, "laptop", "alice", false),
                device_record(&mallory, "stolen", "mallory", true),
            ],
            apps: vec![
                AppRecord {
                    name: "ssh".into(),
                    protocol: AppProtocol::Tcp,
                    port: 22,
                },
                AppRecord {
                    name: "db".into(),
                    protocol: AppProtocol::Tcp,
                    port: 5432,
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
        };
        let (view, warnings) = RegistryView::from_snapshot(&snapshot);
        assert!(warnings.is_empty(), "{warnings:?}");
        let limits = PipelineLimits {
            max_skew_ms: 30_000,
            session_ttl_ms: 60_000,
            replay_capacity: 1000,
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
            app: app.into(),
            claimed_addr: None,
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
}
