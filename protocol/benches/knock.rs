//! Criterion micro-benchmarks of the knock's protocol work (issue 7).
//!
//! Owns: `open` + `verify` of one knock, the crypto bound (one X25519 agreement and one
//! ed25519 `verify_strict`, the two public-key operations every valid knock costs), `seal`
//! (the client side), replay-cache inserts and the signed reply (`seal_reply` on the
//! gateway, `ReplyKey::open` on the client). Must not touch sockets or files.
//! Run: `cargo bench -p postern-protocol --bench knock -- --warm-up-time 1 --measurement-time 3`.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use postern_protocol::packet::{flags, open, seal, Knock, SealRandomness};
use postern_protocol::reply::{
    seal_reply, KnockBinding, Reply, ReplyDecision, ReplyKey, ReplyRandomness,
};
use postern_protocol::{DeviceSigningKey, GatewaySecret, ReplayCache};
use x25519_dalek::{PublicKey as XPublicKey, StaticSecret};

const NOW: u64 = 1_790_000_000_000;

fn knock(device: &DeviceSigningKey, nonce: u8) -> Knock {
    Knock {
        device: device.public_key().device_id(),
        timestamp_ms: NOW,
        nonce: [nonce; 16],
        flags: flags::KNOCK,
        app: postern_protocol::AppName::new("ssh").expect("valid app name"),
        claimed_addr: Some("10.1.1.1".parse().expect("literal")),
        posture_digest: [0; 32],
    }
}

fn bench_open_verify(c: &mut Criterion) {
    let gateway = GatewaySecret::from_bytes([7; 32]);
    let device = DeviceSigningKey::from_seed([1; 32]);
    let public = device.public_key();
    let dgram = seal(
        &knock(&device, 1),
        &device,
        &gateway.public_key(),
        SealRandomness {
            ephemeral_secret: [9; 32],
        },
    )
    .expect("seal");
    c.bench_function("open+verify one knock", |b| {
        b.iter(|| {
            let opened = open(black_box(&dgram), &gateway).expect("open");
            opened.verify(&public).expect("verify")
        })
    });
    c.bench_function("seal one knock (client)", |b| {
        let k = knock(&device, 2);
        b.iter(|| {
            seal(
                black_box(&k),
                &device,
                &gateway.public_key(),
                SealRandomness {
                    ephemeral_secret: [9; 32],
                },
            )
            .expect("seal")
        })
    });
}

/// The signed denial reply: sealed on the gateway's decision thread, opened by the client.
fn bench_reply(c: &mut Criterion) {
    let gateway = GatewaySecret::from_bytes([7; 32]);
    let device = DeviceSigningKey::from_seed([1; 32]);
    let k = knock(&device, 3);
    let dgram = seal(
        &k,
        &device,
        &gateway.public_key(),
        SealRandomness {
            ephemeral_secret: [9; 32],
        },
    )
    .expect("seal");
    let binding = KnockBinding::from_datagram(&dgram, k.nonce).expect("binding");
    let key = ReplyKey::new([9; 32], gateway.public_key(), &dgram, k.nonce).expect("key");
    let reply = Reply {
        decision: ReplyDecision::Deny,
        reason: "policy_denied".into(),
        message: "disk-encryption required".into(),
        remediation: "Turn on full-disk encryption (LUKS, FileVault or BitLocker)".into(),
        session_secs: 0,
    };
    let sealed = || {
        seal_reply(
            &gateway,
            &binding,
            &reply,
            ReplyRandomness { salt: [4; 16] },
        )
        .expect("seal")
    };
    let wire = sealed();
    c.bench_function("seal one reply (gateway)", |b| b.iter(sealed));
    c.bench_function("open one reply (client)", |b| {
        b.iter(|| key.open(black_box(&wire)).expect("open"))
    });
}

/// The floor under `open + verify`: the two public-key operations, nothing else.
fn bench_crypto_bound(c: &mut Criterion) {
    let ours = StaticSecret::from([7; 32]);
    let theirs = XPublicKey::from(&StaticSecret::from([9; 32]));
    c.bench_function("bound: x25519 agreement", |b| {
        b.iter(|| ours.diffie_hellman(black_box(&theirs)))
    });
    let sk = SigningKey::from_bytes(&[1; 32]);
    let vk: VerifyingKey = sk.verifying_key();
    let msg = [0x5a_u8; 160];
    let sig = sk.sign(&msg);
    c.bench_function("bound: ed25519 verify_strict", |b| {
        b.iter(|| vk.verify_strict(black_box(&msg), &sig).expect("verify"))
    });
}

fn bench_replay(c: &mut Criterion) {
    let device = DeviceSigningKey::from_seed([1; 32])
        .public_key()
        .device_id();
    // Steady state: a cache already holding 100,000 entries, one more insert per iteration.
    c.bench_function("replay insert (100k entries)", |b| {
        let mut cache = ReplayCache::new(200_000, 60_000);
        let mut n: u64 = 0;
        let nonce = |n: u64| {
            let mut x = [0u8; 16];
            x[..8].copy_from_slice(&n.to_le_bytes());
            x
        };
        while n < 100_000 {
            cache
                .check_and_insert(device, nonce(n), NOW, NOW)
                .expect("insert");
            n += 1;
        }
        b.iter_batched(
            || {
                n += 1;
                nonce(n)
            },
            |x| cache.check_and_insert(device, x, NOW, NOW),
            BatchSize::SmallInput,
        )
    });
}

criterion_group!(
    benches,
    bench_open_verify,
    bench_crypto_bound,
    bench_replay,
    bench_reply
);
criterion_main!(benches);
