//! Opening a pinhole allocates nothing once the firewall is warm (issue 7: no allocation
//! per knock in steady state), measured on a real ruleset in a throw-away namespace.
//!
//! Owns: namespaces `pst-fw-<pid>-<n>` (see `common`) and this binary's counting global
//! allocator. Must not touch: the root namespace's nftables.

mod common;
#[path = "common/counting_alloc.rs"]
mod counting_alloc;

use std::time::Duration;

use common::Netns;
use counting_alloc::{allocations, Counting};
use postern_firewall::{AppProto, Firewall, FirewallConfig, Pinhole, SessionId};

#[global_allocator]
static GLOBAL: Counting = Counting;

#[test]
fn renewing_and_reopening_pinholes_allocates_nothing() {
    let ns = Netns::new();
    let mut fw = ns
        .run(|| Firewall::install(&FirewallConfig::default()))
        .expect("install");
    let ttl = Duration::from_secs(30);
    let v4 = Pinhole {
        addr: "10.1.2.3".parse().expect("literal"),
        proto: AppProto::Tcp,
        port: 22,
        session: SessionId(5),
        forward: None,
    };
    let v6 = Pinhole {
        addr: "fd00::3".parse().expect("literal"),
        proto: AppProto::Udp,
        port: 53,
        session: SessionId(6),
        forward: Some("[fd01::5]:5353".parse().expect("literal")),
    };
    // Warm-up: the maps, the operation vector and the batch buffer reach their size.
    for p in [&v4, &v6] {
        fw.open(p, ttl, ttl).expect("first open");
    }
    let (n, result) = allocations(|| {
        for _ in 0..500 {
            fw.open(&v4, ttl, ttl)?;
            fw.open(&v6, ttl, ttl)?;
        }
        Ok::<(), postern_firewall::FirewallError>(())
    });
    result.expect("renewals");
    assert_eq!(
        n, 0,
        "1,000 renewals (one batch each, acks read) allocated {n} times"
    );
    assert_eq!(fw.list().expect("list").len(), 2, "both pinholes live");
}
