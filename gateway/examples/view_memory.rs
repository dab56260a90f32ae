//! Heap used by each in-memory form of a large registry at the gateway (issue 7, row 6):
//! the parsed `Snapshot` (the delta base), its JSON line, the indexed `RegistryView`, and
//! the transient peak of `delta::apply` and of persisting the snapshot file.
//!
//! `cargo run --release -p postern-gateway --example view_memory -- 100000 [STATE_DIR]`
//! Counts bytes through a global allocator wrapper (live bytes and the peak), so the
//! numbers are the program's own heap, without allocator fragmentation or RSS rounding.

#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use postern_gateway::registry::RegistryView;
use postern_protocol::keys::DeviceSigningKey;
use postern_protocol::snapshot::{AppProtocol, AppRecord, DeviceRecord, GrantRecord, Snapshot};

struct Counting;
static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator unchanged; only counts sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc(layout);
        if !p.is_null() {
            let now = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout);
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

fn mb(b: usize) -> f64 {
    b as f64 / 1e6
}

/// Runs `f`, printing the live bytes it leaves behind and its transient peak.
fn step<T>(what: &str, f: impl FnOnce() -> T) -> T {
    let before = LIVE.load(Ordering::Relaxed);
    PEAK.store(before, Ordering::Relaxed);
    let out = f();
    let after = LIVE.load(Ordering::Relaxed);
    let peak = PEAK.load(Ordering::Relaxed);
    println!(
        "{what:<44} kept {:>8.1} MB   transient peak +{:>7.1} MB",
        mb(after.saturating_sub(before)),
        mb(peak - before)
    );
    out
}

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(100_000);
    let snapshot = step("Snapshot (the parsed records)", || Snapshot {
        revision: 7,
        devices: (0..n)
            .map(|i| {
                let mut seed = [0u8; 32];
                seed[..8].copy_from_slice(&(i as u64).to_le_bytes());
                let key = DeviceSigningKey::from_seed(seed).public_key();
                DeviceRecord {
                    id: key.device_id().to_string(),
                    name: format!("m{i}"),
                    user: "alice".into(),
                    public_key: key.to_text(),
                    revoked: false,
                }
            })
            .collect(),
        apps: vec![AppRecord {
            name: "web".into(),
            protocol: AppProtocol::Tcp,
            port: 8080,
            forward: None,
        }],
        grants: vec![GrantRecord {
            app: "web".into(),
            user: "alice".into(),
        }],
        ..Snapshot::default()
    });
    if let Some(dir) = std::env::args().nth(2) {
        // Second argument: also write DIR/snapshot.json (a gateway state_dir to start
        // from, with the controller down).
        postern_gateway::snapshot_file::save(std::path::Path::new(&dir), &snapshot, 0)
            .expect("write the snapshot file");
        println!("wrote {dir}/snapshot.json");
        return;
    }
    time_decompress(&snapshot);
    let line = step("its JSON line", || {
        serde_json::to_vec(&snapshot).expect("a snapshot serializes")
    });
    println!("  (line is {:.1} MB)", mb(line.len()));
    let parsed = step("parsing the line", || {
        serde_json::from_slice::<Snapshot>(&line).expect("round trip")
    });
    drop(parsed);
    let view = step("RegistryView::from_snapshot", || {
        RegistryView::from_snapshot(&snapshot).0
    });
    let dir = std::env::temp_dir().join(format!("view-memory-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    step("snapshot_file::save", || {
        postern_gateway::snapshot_file::save(&dir, &snapshot, 0).expect("save")
    });
    let _ = std::fs::remove_dir_all(&dir);
    let mut next = snapshot.clone();
    next.revision = 8;
    next.devices[0].revoked = true;
    let d = postern_protocol::delta::diff(&snapshot, &next);
    let applied = step("delta::apply (one device revoked)", || {
        postern_protocol::delta::apply(&snapshot, &d).expect("apply")
    });
    drop(applied);
    let t = std::time::Instant::now();
    postern_gateway::heap::release_free_memory();
    println!(
        "heap::release_free_memory after the load: {:.2} ms",
        t.elapsed().as_secs_f64() * 1e3
    );
    drop(view);
}

/// How long parsing one device key takes (the view rebuild's cost per device).
fn time_decompress(snapshot: &Snapshot) {
    let keys: Vec<[u8; 32]> = snapshot
        .devices
        .iter()
        .take(20_000)
        .map(|d| {
            *postern_protocol::keys::DevicePublicKey::from_text(&d.public_key)
                .expect("key")
                .as_bytes()
        })
        .collect();
    let t = std::time::Instant::now();
    for k in &keys {
        std::hint::black_box(postern_protocol::keys::DevicePublicKey::from_bytes(k).is_ok());
    }
    println!(
        "DevicePublicKey::from_bytes: {:.2} µs each",
        t.elapsed().as_secs_f64() * 1e6 / keys.len() as f64
    );
}
