//! Criterion micro-benchmark of the pinhole batch encoding (issue 7).
//!
//! Owns: `encode_open_batch`, the exact netlink transaction `Firewall::open` sends for one
//! pinhole (BATCH_BEGIN, session element, pinhole element, BATCH_END; with a forward
//! target one element more). Must not touch sockets or the kernel: the send and the acks
//! are measured end to end by `scripts/bench` (row 4, "install 100000 pinholes").
//! Run: `cargo bench -p postern-firewall --bench encode -- --warm-up-time 1 --measurement-time 3`.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use postern_firewall::{encode_open_batch, AppProto, Pinhole, SessionId};

fn encode(c: &mut Criterion) {
    let ttl = Duration::from_secs(30);
    let mut p = Pinhole {
        addr: "10.0.0.2".parse().expect("literal"),
        proto: AppProto::Tcp,
        port: 443,
        session: SessionId(7),
        forward: None,
    };
    c.bench_function("encode_open_batch ipv4", |b| {
        b.iter(|| encode_open_batch(black_box("postern"), black_box(&p), ttl, ttl))
    });
    p.addr = "2001:db8::2".parse().expect("literal");
    c.bench_function("encode_open_batch ipv6", |b| {
        b.iter(|| encode_open_batch(black_box("postern"), black_box(&p), ttl, ttl))
    });
    p.addr = "10.0.0.2".parse().expect("literal");
    p.forward = Some("10.9.0.5:8443".parse().expect("literal"));
    c.bench_function("encode_open_batch ipv4 + forward", |b| {
        b.iter(|| encode_open_batch(black_box("postern"), black_box(&p), ttl, ttl))
    });
}

criterion_group!(benches, encode);
criterion_main!(benches);
