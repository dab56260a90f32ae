//! A knock in steady state allocates nothing (issue 7: "no allocation per packet in steady
//! state"), counted per thread by a counting global allocator.
//!
//! Owns this binary's allocator and drives, step by step, the real per-packet code each
//! thread of the daemon runs: the capture thread (precheck, per-source bucket, datagram
//! buffer, fair queue), a crypto worker (queue pop, decrypt and verify, buffer returned)
//! and the decision thread (replay check journaled to a real state directory, decision,
//! reply rule, knock audit line, session lifecycle line, both written to a real file).
//! Steady state means: garbage and unauthenticated datagrams (a flood), and re-knocks that
//! renew live sessions (what `postern session` sends). A first knock allocates its new
//! session's records; the pinhole batch is covered by
//! `firewall/tests/open_allocations.rs` (it needs a namespace). Must not touch sockets.

#[path = "../../firewall/tests/common/counting_alloc.rs"]
mod counting_alloc;

use std::collections::HashMap;
use std::net::IpAddr;

use counting_alloc::{allocations, Counting};
use postern_gateway::admission::{DatagramPool, FairQueue, Pushed, SourceTable};
use postern_gateway::audit::{AuditLog, KnockExtra};
use postern_gateway::capture::Peer;
use postern_gateway::config::AuditTarget;
use postern_gateway::pipeline::{replay_window_ms, Decision, KnockPipeline, PipelineLimits};
use postern_gateway::registry::RegistryView;
use postern_gateway::replay_state::ReplayState;
use postern_gateway::reply::{reply_for, ReplyTarget};
use postern_gateway::session_audit::SessionReporter;
use postern_gateway::session_board::SessionBoard;
use postern_protocol::packet::{self, flags, seal, Knock, SealRandomness};
use postern_protocol::snapshot::{AppProtocol, AppRecord, DeviceRecord, GrantRecord, Snapshot};
use postern_protocol::{AppName, DeviceSigningKey, GatewaySecret};

#[global_allocator]
static GLOBAL: Counting = Counting;

const NOW: u64 = 1_790_000_000_000;
const DEVICES: u32 = 20;
/// Knocks per device before counting (sessions opened, buffers and maps at size).
const WARM_UP: u32 = 50;
/// Knocks per device counted.
const COUNTED: u32 = 100;

fn key(device: u32) -> DeviceSigningKey {
    let mut seed = [9u8; 32];
    seed[..4].copy_from_slice(&device.to_le_bytes());
    DeviceSigningKey::from_seed(seed)
}

fn source(device: u32) -> IpAddr {
    IpAddr::from([10, 1, 0, device as u8 + 1])
}

/// Knock `n` of `device`, stamped `timestamp_ms`: a fresh nonce each time (a renewal after
/// the first).
fn knock(
    device: u32,
    n: u32,
    timestamp_ms: u64,
    gateway: &postern_protocol::GatewayPublicKey,
) -> Vec<u8> {
    let key = key(device);
    let mut nonce = [0u8; 16];
    nonce[..4].copy_from_slice(&n.to_le_bytes());
    nonce[4..8].copy_from_slice(&device.to_le_bytes());
    let k = Knock {
        device: key.public_key().device_id(),
        timestamp_ms,
        nonce,
        flags: if n == 0 { flags::KNOCK } else { flags::RENEW },
        app: AppName::new("ssh").expect("valid app name"),
        claimed_addr: Some(source(device)),
        posture_digest: [0; 32],
    };
    let mut eph = [0u8; 32];
    eph[..4].copy_from_slice(&n.to_le_bytes());
    eph[4..8].copy_from_slice(&device.to_le_bytes());
    eph[31] = 0x40;
    let rnd = SealRandomness {
        ephemeral_secret: eph,
    };
    seal(&k, &key, gateway, rnd).expect("seal")
}

/// Local decisions: the gateway runs the policy engine on every knock.
const POLICY: &str = r#"
[[rule]]
name = "ssh"
effect = "allow"
apps = ["ssh"]
users = ["alice"]
lease = "1h"
"#;

/// `DEVICES` laptops of alice, app ssh; legacy grants, or with `policy` local decisions.
fn snapshot(policy: bool) -> Snapshot {
    let subjects = (0..DEVICES)
        .map(|d| postern_protocol::snapshot::PolicySubject {
            device: key(d).public_key().device_id().to_string(),
            user: "alice".into(),
            groups: vec![],
            disabled: false,
            risk: 0,
            last_mfa: None,
            posture: None,
        })
        .collect();
    let digest = ring::digest::digest(&ring::digest::SHA256, POLICY.as_bytes());
    Snapshot {
        revision: 1,
        devices: (0..DEVICES)
            .map(|d| {
                let public = key(d).public_key();
                DeviceRecord {
                    id: public.device_id().to_string(),
                    name: format!("laptop{d}"),
                    user: "alice".into(),
                    public_key: public.to_text(),
                    revoked: false,
                }
            })
            .collect(),
        apps: vec![AppRecord {
            name: "ssh".into(),
            protocol: AppProtocol::Tcp,
            port: 22,
            forward: None,
        }],
        grants: vec![GrantRecord {
            app: "ssh".into(),
            user: "alice".into(),
        }],
        access: policy.then(Vec::new),
        denials: None,
        kills: None,
        policy: policy.then(|| postern_protocol::snapshot::PolicyText {
            text: POLICY.into(),
            sha256: hex::encode(digest),
        }),
        subjects: policy.then_some(subjects),
    }
}

/// Allocations of each step, summed over the counted knocks.
#[derive(Debug, Default)]
struct Tally(HashMap<&'static str, u64>);

impl Tally {
    fn add(&mut self, step: &'static str, n: u64) {
        *self.0.entry(step).or_default() += n;
    }
    fn of(&self, step: &str) -> u64 {
        self.0.get(step).copied().unwrap_or(0)
    }
}

#[test]
fn renewals_and_garbage_allocate_nothing_on_any_thread() {
    steady_state(false);
}

#[test]
fn renewals_under_local_policy_decisions_allocate_nothing() {
    steady_state(true);
}

/// Runs the knocks of every device through each thread's steps; asserts that the
/// counted (steady-state) ones allocate nothing.
fn steady_state(policy: bool) {
    let secret = GatewaySecret::from_bytes([7; 32]);
    let gateway = secret.public_key();
    let (view, warnings) = RegistryView::from_snapshot(&snapshot(policy));
    assert_eq!(view.policy_mode(), policy);
    assert!(warnings.is_empty(), "{warnings:?}");
    // A short skew, so replay entries expire as fast as knocks add them (one knock per ms
    // below): the replay cache stays at its steady size, as on a gateway in service.
    let limits = PipelineLimits {
        max_skew_ms: 50,
        session_ttl_ms: 3_600_000,
        max_session_ms: 43_200_000,
        replay_capacity: 1 << 20,
        require_claimed_addr: true,
    };
    let dir = tempfile::tempdir().expect("tempdir");
    // Journaled to disk, as the daemon runs it.
    let (replay, _) = ReplayState::open(
        &dir.path().join("state"),
        limits.replay_capacity,
        replay_window_ms(&limits),
        limits.max_skew_ms,
        NOW,
    )
    .expect("replay state");
    let mut pipeline = KnockPipeline::with_replay(secret, limits, replay);
    let audit = AuditLog::open(&AuditTarget::File(dir.path().join("audit.log"))).expect("audit");
    let mut reporter = SessionReporter::new("gw".into(), SessionBoard::new());
    let no_extra = HashMap::new();
    let mut sources = SourceTable::new(1024, 1_000_000, 1_000_000);
    let mut queue: FairQueue<Vec<u8>> = FairQueue::new(1024);
    let pool = DatagramPool::default();
    let key_id = gateway.key_id();
    let mut next_id = 7u32;
    let mut new_id = || {
        next_id += 1;
        next_id
    };

    let knocks: Vec<(u32, u32, Vec<u8>)> = (0..WARM_UP + COUNTED)
        .flat_map(|n| (0..DEVICES).map(move |d| (d, n)))
        .enumerate()
        .map(|(i, (d, n))| (d, n, knock(d, n, NOW + i as u64, &gateway)))
        .collect();
    let mut tally = Tally::default();
    for (i, (device, n, datagram)) in knocks.iter().enumerate() {
        let now = NOW + i as u64;
        let src = source(*device);
        let peer = Peer {
            src,
            src_port: 40000,
            dst: None,
        };
        let mut steps: Vec<(&'static str, u64)> = Vec::with_capacity(8);
        // Capture thread.
        let (a, queued) = allocations(|| {
            packet::precheck(datagram, key_id).expect("precheck");
            assert!(sources.admit(src, now), "admitted");
            let buf = pool.copy_of(datagram);
            matches!(queue.push(src, buf), Pushed::Queued)
        });
        assert!(queued);
        steps.push(("capture", a));
        // Crypto worker.
        let (a, auth) = allocations(|| {
            let (_, buf) = queue.pop().expect("queued");
            let auth = pipeline.opener().authenticate(Some(&view), &buf, now);
            pool.give_back(buf);
            auth.ok()
        });
        let auth = auth.expect("authenticated");
        steps.push(("crypto", a));
        // Decision thread.
        let target = ReplyTarget::of(&auth);
        let (a, decision) =
            allocations(|| pipeline.conclude(Some(&view), src, auth, now, &mut new_id));
        steps.push(("decide", a));
        let Decision::Allow { renewed, .. } = &decision else {
            panic!("knock {n} of device {device} not allowed: {decision:?}");
        };
        assert_eq!(*renewed, *n > 0, "the first knock opens, the rest renew");
        let (a, ()) = allocations(|| {
            let reply = reply_for(&target, &peer, &decision, Some(&view));
            assert!(reply.is_none(), "a renewal without ACK gets no reply");
            let extra = KnockExtra {
                reply: Some(false),
                ..KnockExtra::default()
            };
            audit.knock_with(now, src, &decision, extra);
            reporter.record(&audit, &mut pipeline, &no_extra, now);
        });
        steps.push(("audit", a));
        if *n >= WARM_UP {
            for (step, a) in steps {
                tally.add(step, a);
            }
        }
    }
    let counted = u64::from(DEVICES * COUNTED);
    eprintln!(
        "allocations over {counted} renewal knocks (policy: {policy}): {:?}",
        tally.0
    );
    for step in ["capture", "crypto", "decide", "audit"] {
        assert_eq!(tally.of(step), 0, "{step}: {:?}", tally.0);
    }

    // Garbage and forgeries: dropped before any state, nothing allocated.
    let mut forged = knocks[0].2.clone();
    forged[60] ^= 1;
    let garbage = vec![0u8; 200];
    let (a, ()) = allocations(|| {
        for _ in 0..1000 {
            assert!(packet::precheck(&garbage, key_id).is_err());
            let auth = pipeline.opener().authenticate(Some(&view), &forged, NOW);
            assert!(matches!(auth, Err(Decision::Drop { .. })));
        }
    });
    assert_eq!(
        a, 0,
        "1,000 garbage and forged datagrams allocated {a} times"
    );
    let lines = std::fs::read_to_string(dir.path().join("audit.log")).expect("audit log");
    assert_eq!(
        lines
            .lines()
            .filter(|l| l.contains("\"reason\":\"renewed\""))
            .count(),
        (DEVICES * (WARM_UP + COUNTED - 1)) as usize,
        "every renewal was audited"
    );
}
