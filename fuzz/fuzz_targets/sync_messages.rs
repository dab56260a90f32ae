//! Both sides of the controller sync protocol: the request the controller parses and the
//! snapshot the gateway parses and indexes.
#![no_main]
use libfuzzer_sys::fuzz_target;
use postern_controller::sync::SyncRequest;
use postern_gateway::registry::RegistryView;
use postern_protocol::snapshot::Snapshot;

fuzz_target!(|data: &[u8]| {
    let _ = serde_json::from_slice::<SyncRequest>(data);
    if let Ok(snapshot) = serde_json::from_slice::<Snapshot>(data) {
        let _ = RegistryView::from_snapshot(&snapshot);
    }
});
