//! Criterion micro-benchmark of the gateway's knock decision (issue 7).
//!
//! Owns: `KnockPipeline::decide` for one valid, fresh knock against a `RegistryView` of
//! 100,000 enrolled devices (the whole pure pipeline: precheck, decrypt, lookup, verify,
//! freshness, replay, grant, session). Must not touch sockets, files or nftables.
//! Run: `cargo bench -p postern-gateway --bench pipeline -- --warm-up-time 1 --measurement-time 3`.

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

fn bench_decide(c: &mut Criterion) {
    let secret = GatewaySecret::from_bytes([7; 32]);
    let gateway = secret.public_key();
    let devices: Vec<DeviceRecord> = (0..DEVICES)
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
        .collect();
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
    };
    let (view, warnings) = RegistryView::from_snapshot(&snapshot);
    assert!(warnings.is_empty(), "{warnings:?}");
    assert_eq!(view.device_count(), DEVICES as usize);

    // 4096 distinct pre-sealed knocks from devices spread over the registry.
    let knocks: Vec<Vec<u8>> = (0..4096u32)
        .map(|n| {
            let i = n.wrapping_mul(2_654_435_761) % DEVICES;
            let key = DeviceSigningKey::from_seed(seed(i));
            let mut nonce = [0u8; 16];
            nonce[..4].copy_from_slice(&n.to_le_bytes());
            let k = Knock {
                device: key.public_key().device_id(),
                timestamp_ms: NOW,
                nonce,
                flags: flags::KNOCK,
                app: "ssh".into(),
                claimed_addr: Some(SRC.parse().expect("literal")),
                posture_digest: [0; 32],
            };
            let mut eph = [0u8; 32];
            eph[..4].copy_from_slice(&n.to_le_bytes());
            eph[31] = 0x40;
            seal(
                &k,
                &key,
                &gateway,
                SealRandomness {
                    ephemeral_secret: eph,
                },
            )
            .expect("seal")
        })
        .collect();
    let limits = PipelineLimits {
        max_skew_ms: 30_000,
        session_ttl_ms: 60_000,
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

criterion_group!(benches, bench_decide);
criterion_main!(benches);
