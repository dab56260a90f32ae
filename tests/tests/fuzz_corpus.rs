//! Replays the committed fuzz corpus (`fuzz/corpus/<target>/`) through the fuzz targets'
//! own bodies in the normal suite: every input the fuzzer ever kept (valid seeds and its
//! interesting finds) must still run without a panic and pass the targets' assertions.
//!
//! The target bodies are not copied: `fuzz/src/targets.rs` is compiled into this test as
//! it is into each `cargo fuzz` binary. Owns: the replay only. Must not touch: the corpus
//! (read-only), sockets or the firewall.

#[path = "../../fuzz/src/targets.rs"]
mod targets;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target)
}

fn inputs(target: &str) -> Vec<PathBuf> {
    let dir = corpus_dir(target);
    let entries = std::fs::read_dir(&dir).unwrap_or_else(|e| {
        panic!(
            "fuzz corpus {} for target {target} is missing ({e}): commit seeds there \
             (python3 fuzz/seeds/make_seeds.py, then scripts/fuzz --update-corpus)",
            dir.display()
        )
    });
    let mut files: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    assert!(
        !files.is_empty(),
        "fuzz corpus {} for target {target} is empty: commit seeds there \
         (python3 fuzz/seeds/make_seeds.py, then scripts/fuzz --update-corpus)",
        dir.display()
    );
    files
}

#[test]
fn every_target_has_a_corpus_directory() {
    for (name, _) in targets::TARGETS {
        let _ = inputs(name);
    }
    // No stray directory for a target that no longer exists.
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus");
    for entry in std::fs::read_dir(&root).expect("fuzz/corpus is readable") {
        let name = entry.expect("corpus entry").file_name();
        let name = name.to_string_lossy();
        assert!(
            targets::TARGETS.iter().any(|(t, _)| *t == name),
            "fuzz/corpus/{name} belongs to no fuzz target"
        );
    }
}

fn replay(target: &str) {
    let (_, body) = targets::TARGETS
        .iter()
        .find(|(t, _)| *t == target)
        .unwrap_or_else(|| panic!("no fuzz target named {target}"));
    let files = inputs(target);
    let mut failures = Vec::new();
    let mut bytes = 0usize;
    for path in &files {
        let data = std::fs::read(path)
            .unwrap_or_else(|e| panic!("cannot read corpus file {}: {e}", path.display()));
        bytes += data.len();
        if let Err(panic) = catch_unwind(AssertUnwindSafe(|| body(&data))) {
            let msg = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_default();
            failures.push(format!("{}: {msg}", path.display()));
        }
    }
    println!(
        "fuzz corpus {target}: {} inputs, {bytes} bytes replayed",
        files.len()
    );
    assert!(
        failures.is_empty(),
        "{} of {} corpus inputs of {target} panic (reproduce with `cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run -O {target} FILE`):\n{}",
        failures.len(),
        files.len(),
        failures.join("\n")
    );
}

#[test]
fn spa_open_corpus() {
    replay("spa_open");
}

#[test]
fn capture_ip_corpus() {
    replay("capture_ip");
}

#[test]
fn gateway_config_corpus() {
    replay("gateway_config");
}

#[test]
fn sync_messages_corpus() {
    replay("sync_messages");
}

#[test]
fn control_messages_corpus() {
    replay("control_messages");
}

#[test]
fn key_text_corpus() {
    replay("key_text");
}

#[test]
fn policy_file_corpus() {
    replay("policy_file");
}

#[test]
fn api_auth_corpus() {
    replay("api_auth");
}

#[test]
fn posture_report_corpus() {
    replay("posture_report");
}

#[test]
fn reply_open_corpus() {
    replay("reply_open");
}

/// The reply seeds were sealed by an independent implementation (fuzz/seeds/make_seeds.py,
/// Python `cryptography`): the client opens each to exactly the fields it was given.
#[test]
fn reply_seeds_open_to_their_fields() {
    use postern_protocol::reply::ReplyDecision;
    let (key, _, _) = targets::reply_kat();
    let expect = [
        (
            "seed-deny-posture",
            ReplyDecision::Deny,
            "policy_denied",
            "disk encryption required",
            "enable LUKS on / and /home, see https://wiki.example.org/luks",
            0,
        ),
        ("seed-deny-minimal", ReplyDecision::Deny, "x", "", "", 0),
        (
            "seed-allow-ack",
            ReplyDecision::Allow,
            "granted",
            "",
            "",
            3600,
        ),
    ];
    for (file, decision, reason, message, remediation, secs) in expect {
        let data = std::fs::read(corpus_dir("reply_open").join(file))
            .unwrap_or_else(|e| panic!("reply seed {file} is missing: {e}"));
        let r = key.open(&data).unwrap_or_else(|e| panic!("{file}: {e}"));
        assert_eq!(
            (
                r.decision,
                r.reason.as_str(),
                r.message.as_str(),
                r.remediation.as_str(),
                r.session_secs
            ),
            (decision, reason, message, remediation, secs),
            "{file}"
        );
    }
}

/// The seeds are real, valid inputs: each known-answer knock opens and verifies under its
/// vector's keys, so the fuzzer (and this replay) reach past the AEAD.
#[test]
fn seeds_are_valid_inputs() {
    use postern_protocol::keys::{DeviceSigningKey, GatewaySecret};
    use postern_protocol::packet;
    let seeds: [(&str, u8, u8); 3] = [
        ("seed-kat0", 0x20, 0x00),
        ("seed-kat1", 0xa0, 0x80),
        ("seed-kat2", 0x25, 0x05),
    ];
    for (file, gw, dev) in seeds {
        let path = corpus_dir("spa_open").join(file);
        let data = std::fs::read(&path)
            .unwrap_or_else(|e| panic!("seed {} is missing: {e}", path.display()));
        let gw = GatewaySecret::from_bytes(std::array::from_fn(|i| gw.wrapping_add(i as u8)));
        let dev = DeviceSigningKey::from_seed(std::array::from_fn(|i| dev.wrapping_add(i as u8)));
        let opened = packet::open(&data, &gw).unwrap_or_else(|e| panic!("{file}: {e}"));
        opened
            .verify(&dev.public_key())
            .unwrap_or_else(|e| panic!("{file}: {e}"));
    }
    for (file, ethertype) in [
        ("seed-v4-kat0", postern_gateway::capture::ip::ETH_P_IP),
        ("seed-v6-kat1", postern_gateway::capture::ip::ETH_P_IPV6),
        (
            "seed-v4-options-kat2",
            postern_gateway::capture::ip::ETH_P_IP,
        ),
    ] {
        let data = std::fs::read(corpus_dir("capture_ip").join(file)).expect("capture seed");
        let d = postern_gateway::capture::ip::spa_datagram(&data, ethertype, targets::SPA_PORT)
            .unwrap_or_else(|| panic!("{file}: no SPA datagram found"));
        assert!(packet::MIN_KNOCK_LEN <= d.payload.len(), "{file}");
    }
}
