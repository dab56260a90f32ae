//! How long `delta::diff`, `delta::apply` and `delta::digest` take on a big registry
//! (issue 7: what a revocation costs at 100,000 devices). Run:
//! `cargo run --release -p postern-protocol --example delta_cost -- 100000`.

use std::time::Instant;

use postern_protocol::delta;
use postern_protocol::snapshot::{DeviceRecord, Snapshot};

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(100_000);
    let devices: Vec<DeviceRecord> = (0..n)
        .map(|i| DeviceRecord {
            id: format!("{i:032x}"),
            name: format!("m{i}"),
            user: "alice".into(),
            public_key: format!("ed25519:{:0>43}=", i),
            revoked: false,
        })
        .collect();
    let old = Snapshot {
        revision: 1,
        devices,
        ..Snapshot::default()
    };
    let mut new = old.clone();
    new.revision = 2;
    new.devices[n / 2].revoked = true;
    let time = |what: &str, f: &mut dyn FnMut()| {
        let t = Instant::now();
        f();
        println!("{what}: {:.1} ms", t.elapsed().as_secs_f64() * 1e3);
    };
    let mut d = None;
    time("diff", &mut || d = Some(delta::diff(&old, &new)));
    let d = d.expect("diffed");
    time("apply", &mut || {
        delta::apply(&old, &d).expect("applies");
    });
    time("digest", &mut || {
        delta::digest(&new);
    });
    time("serialize (to_vec)", &mut || {
        serde_json::to_vec(&new).expect("serializable");
    });
    let text = serde_json::to_vec(&new).expect("serializable");
    time("parse (from_slice)", &mut || {
        let _: Snapshot = serde_json::from_slice(&text).expect("parses");
    });
}
