//! Criterion micro-benchmark of the gateway's knock decision (issue 7).
//!
//! Owns: `KnockPipeline::decide` for one valid, fresh knock against a `RegistryView` of
//! 100,000 enrolled devices (the whole pure pipeline: precheck, decrypt, lookup, verify,
//! freshness, replay, grant, session). Must not touch sockets, files or nftables.
//! Also the local policy decision (`RegistryView::permit`) against 100,000 subjects and
//! building such a view. Run:
//! `cargo bench -p postern-gateway --bench pipeline -- --warm-up-time 1 --measurement-time 3`.

use std::hint::black_box;
use std::net::IpAddr;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use postern_gateway::pipeline::{Decision, KnockPipeline, PipelineLimits};
use postern_gateway::registry::RegistryView;
use postern_protocol::packet::{flags, seal, Knock, SealRandomness};
use postern_protocol::snapshot::{AppProtocol, AppRecord, DeviceRecord, GrantRecord, Snapshot};
use postern_protocol::{DeviceSigningKey, GatewaySecret};

const DEVICES: u32 = 100_000;
const NOW: u64 = 1_790_000_000_000;
const SRC: &str = "10.1.1.1";

fn seed(i: u32) -> [u8; 32] {
    let mut s = [0x42u8; 32];
    s[..4].copy_from_slice(&i.to_le_bytes());
    s
}

/// The registry's 100,000 devices (users `user0`..`user999`).
fn device_records() -> Vec<DeviceRecord> {
    (0..DEVICES)
        .map(|i| {
            let public = DeviceSigningKey::from_seed(seed(i)).public_key();
            DeviceRecord {
                id: public.device_id().to_string(),
                name: format!("dev{i}"),
                user: format!("user{}", i % 1000),
                public_key: public.to_text(),
                revoked: false,
            }
        })
        .collect()
}

/// Knock `n` (its nonce and ephemeral key) of device `i` for ssh from `SRC`, sealed.
fn sealed_knock(i: u32, n: u32, gateway: &postern_protocol::GatewayPublicKey) -> Vec<u8> {
    let key = DeviceSigningKey::from_seed(seed(i));
    let mut nonce = [0u8; 16];
    nonce[..4].copy_from_slice(&n.to_le_bytes());
    let k = Knock {
        device: key.public_key().device_id(),
        timestamp_ms: NOW,
        nonce,
        flags: flags::KNOCK,
        app: postern_protocol::AppName::new("ssh").expect("valid app name"),
        claimed_addr: Some(SRC.parse().expect("literal")),
        posture_digest: [0; 32],
    };
    let mut eph = [0u8; 32];
    eph[..4].copy_from_slice(&n.to_le_bytes());
    eph[31] = 0x40;
    seal(
        &k,
        &key,
        gateway,
        SealRandomness {
            ephemeral_secret: eph,
        },
    )
    .expect("seal")
}

fn bench_decide(c: &mut Criterion) {
    let secret = GatewaySecret::from_bytes([7; 32]);
    let gateway = secret.public_key();
    let devices = device_records();
    let snapshot = Snapshot {
        revision: 1,
        devices,
        apps: vec![AppRecord {
            name: "ssh".into(),
            protocol: AppProtocol::Tcp,
            port: 22,
            forward: None,
        }],
        grants: (0..1000)
            .map(|u| GrantRecord {
                app: "ssh".into(),
                user: format!("user{u}"),
            })
            .collect(),
        access: None,
        denials: None,
        kills: None,
        policy: None,
        subjects: None,
    };
    let (view, warnings) = RegistryView::from_snapshot(&snapshot);
    assert!(warnings.is_empty(), "{warnings:?}");
    assert_eq!(view.device_count(), DEVICES as usize);

    // 4096 distinct pre-sealed knocks from devices spread over the registry.
    let knocks: Vec<Vec<u8>> = (0..4096u32)
        .map(|n| sealed_knock(n.wrapping_mul(2_654_435_761) % DEVICES, n, &gateway))
        .collect();
    let limits = PipelineLimits {
        max_skew_ms: 30_000,
        session_ttl_ms: 60_000,
        max_session_ms: 12 * 3_600_000,
        replay_capacity: 100_000,
        require_claimed_addr: true,
    };
    let src: IpAddr = SRC.parse().expect("literal");

    c.bench_function("decide valid knock (100k devices)", |b| {
        // A fresh pipeline per iteration (setup, not timed) so every knock is new to the
        // replay cache; the knock rotates over 4096 devices of the registry.
        let mut n = 0usize;
        b.iter_batched_ref(
            || {
                n += 1;
                (KnockPipeline::new(secret.clone(), limits), n, 100u32)
            },
            |(pipeline, n, id)| {
                let dgram = &knocks[*n % knocks.len()];
                let mut ids = || {
                    *id += 1;
                    *id
                };
                let d = pipeline.decide(Some(&view), src, black_box(dgram), NOW, &mut ids);
                assert!(matches!(d, Decision::Allow { .. }), "{d:?}");
            },
            BatchSize::NumIterations(1),
        )
    });
    let garbage = vec![0xa5u8; 220];
    let mut pipeline = KnockPipeline::new(secret.clone(), limits);
    c.bench_function("decide garbage datagram", |b| {
        b.iter(|| {
            let mut ids = || 1;
            pipeline.decide(Some(&view), src, black_box(&garbage), NOW, &mut ids)
        })
    });
}

/// A policy with a deny rule, a source-network rule with risk and MFA limits, a window
/// rule and a posture rule: what one local decision evaluates.
const POLICY: &str = r#"
[[requirement]]
name = "disk"
disk_encryption = true
remediation = "Turn on disk encryption"

[[requirement]]
name = "patched"
max_days_since_update = 14
remediation = "apt full-upgrade"

[[rule]]
name = "no-guests"
effect = "deny"
apps = ["*"]
groups = ["guests"]

[[rule]]
name = "ssh-office-hours"
effect = "allow"
apps = ["ssh"]
groups = ["ops"]
time_zone = "Europe/Berlin"
windows = [{ days = ["mon-fri"], hours = "07:00-19:00" }]

[[rule]]
name = "ssh-lab"
effect = "allow"
apps = ["ssh"]
groups = ["eng"]
source_networks = ["10.0.0.0/8", "2001:db8::/32"]
max_risk = 40
mfa_max_age = "12h"
posture = ["disk", "patched"]
lease = "8h"
"#;

/// Local decisions: `RegistryView::permit` (one `postern_policy::decide` with the
/// knock's source) against 100,000 subjects, and building the view (parse once + index).
fn bench_local_policy(c: &mut Criterion) {
    use postern_gateway::registry::Hold;
    use postern_protocol::snapshot::{PolicySubject, PolicyText, PostureVerdict};
    let now_s = NOW / 1000;
    let verdict = PostureVerdict {
        passed: true,
        expires: now_s + 3600,
    };
    let ids: Vec<postern_protocol::keys::DeviceId> = (0..DEVICES)
        .map(|i| {
            DeviceSigningKey::from_seed(seed(i))
                .public_key()
                .device_id()
        })
        .collect();
    let subjects: Vec<PolicySubject> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| PolicySubject {
            device: id.to_string(),
            user: format!("user{}", i % 1000),
            groups: vec!["eng".into()],
            disabled: false,
            risk: 10,
            last_mfa: Some(now_s - 600),
            posture: Some(
                [
                    ("disk".to_owned(), verdict),
                    ("patched".to_owned(), verdict),
                ]
                .into_iter()
                .collect(),
            ),
        })
        .collect();
    let bytes = serde_json::to_vec(&subjects).expect("serialize").len();
    println!(
        "subjects: {} bytes of JSON for {DEVICES} devices ({} bytes per device)",
        bytes,
        bytes / DEVICES as usize
    );
    let devices = device_records();
    let digest = ring_digest(POLICY);
    let snapshot = Snapshot {
        revision: 1,
        devices,
        apps: vec![AppRecord {
            name: "ssh".into(),
            protocol: AppProtocol::Tcp,
            port: 22,
            forward: None,
        }],
        access: Some(vec![]),
        policy: Some(PolicyText {
            text: POLICY.into(),
            sha256: digest,
        }),
        subjects: Some(subjects),
        ..Snapshot::default()
    };
    let legacy = Snapshot {
        access: None,
        policy: None,
        subjects: None,
        ..snapshot.clone()
    };
    let started = std::time::Instant::now();
    drop(RegistryView::from_snapshot(&legacy));
    let without = started.elapsed();
    let started = std::time::Instant::now();
    let (view, warnings) = RegistryView::from_snapshot(&snapshot);
    println!(
        "from_snapshot, 100k devices: {without:?} without a policy, {:?} with policy + subjects",
        started.elapsed()
    );
    assert!(warnings.is_empty(), "{warnings:?}");
    let src: IpAddr = SRC.parse().expect("literal");
    let mut n = 0usize;
    c.bench_function("local decision: permit (policy, 100k subjects)", |b| {
        b.iter(|| {
            n = (n + 7919) % ids.len();
            let p = view
                .permit(&ids[n], "user", "ssh", black_box(src), NOW)
                .expect("granted");
            assert_eq!(p.hold, Hold::Lease);
        })
    });
    // Continuous evaluation: a new view re-evaluates every live session once.
    const SESSIONS: u32 = 20_000;
    let limits = PipelineLimits {
        max_skew_ms: 30_000,
        session_ttl_ms: 60_000,
        max_session_ms: 12 * 3_600_000,
        replay_capacity: 100_000,
        require_claimed_addr: true,
    };
    let mut pipeline = KnockPipeline::new(secret_for_bench(), limits);
    let gateway = secret_for_bench().public_key();
    let mut next = 100u32;
    for i in 0..SESSIONS {
        let dgram = sealed_knock(i, i, &gateway);
        let mut ids = || {
            next += 1;
            next
        };
        let d = pipeline.decide(Some(&view), src, &dgram, NOW, &mut ids);
        assert!(matches!(d, Decision::Allow { .. }), "{d:?}");
    }
    let (fresh, _) = RegistryView::from_snapshot(&snapshot);
    let started = std::time::Instant::now();
    let closed = pipeline.sessions_revoked_by(&fresh, NOW + 1000);
    let took = started.elapsed();
    assert!(closed.is_empty());
    println!(
        "new view re-evaluates {SESSIONS} live sessions in {took:?} ({:.2} µs per session)",
        took.as_secs_f64() * 1e6 / f64::from(SESSIONS)
    );
    let started = std::time::Instant::now();
    assert!(pipeline.close_sessions_due(&fresh, NOW + 2000).is_empty());
    println!("periodic sweep with nothing due: {:?}", started.elapsed());

    let mut group = c.benchmark_group("view");
    group.sample_size(10);
    group.bench_function("RegistryView::from_snapshot (policy, 100k devices)", |b| {
        b.iter(|| RegistryView::from_snapshot(black_box(&snapshot)))
    });
    group.finish();
}

fn secret_for_bench() -> GatewaySecret {
    GatewaySecret::from_bytes([7; 32])
}

fn ring_digest(text: &str) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, text.as_bytes()))
}

criterion_group!(benches, bench_decide, bench_local_policy);
criterion_main!(benches);
