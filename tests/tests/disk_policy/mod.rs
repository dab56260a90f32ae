//! The disk-encryption policy scenario shared by `policy_e2e` and `deny_reply_e2e`: the
//! policy (app `web` needs the `disk-encryption` requirement, for alice and bob), posture
//! reports stored through the controller's registry library as `POST /v1/posture` stores
//! them, and applying the policy with the real CLI.
//!
//! Owns: these fixtures only. Must not touch: anything outside the controller's temp dir.
#![allow(dead_code)]

use postern_controller::registry::Registry;
use postern_e2e::Controller;
use postern_policy::Timestamp;

/// The app the policy protects.
pub const APP: &str = "web";
/// The `disk-encryption` requirement's remediation text.
pub const REMEDIATION: &str = "Turn on full-disk encryption (LUKS, FileVault or BitLocker)";

/// `web` for alice and bob, only with the `disk-encryption` requirement met.
pub const POLICY: &str = r#"
[[requirement]]
name = "disk-encryption"
disk_encryption = true
remediation = "Turn on full-disk encryption (LUKS, FileVault or BitLocker)"

[[rule]]
name = "web-needs-healthy-device"
effect = "allow"
apps = ["web"]
users = ["alice", "bob"]
posture = ["disk-encryption"]
"#;

pub fn report(disk_encrypted: bool) -> String {
    format!(
        r#"{{"collected_at":"{}","os_family":"linux","os_version":"24.04","kernel":"6.8.0","disk_encrypted":{disk_encrypted},"firewall_on":true}}"#,
        Timestamp::now()
    )
}

pub fn now_secs() -> u64 {
    u64::try_from(Timestamp::now().as_second()).expect("clock after 1970")
}

/// Stores a report valid for `valid_secs`, as `POST /v1/posture` does.
pub fn store_report_for(ctl: &Controller, device: &str, disk_encrypted: bool, valid_secs: u64) {
    let now = now_secs();
    Registry::open(ctl.db())
        .expect("open the controller's registry")
        .store_posture_report(device, &report(disk_encrypted), now, now + valid_secs)
        .unwrap_or_else(|e| panic!("store the posture report of {device}: {e}"));
}

pub fn store_report(ctl: &Controller, device: &str, disk_encrypted: bool) {
    store_report_for(ctl, device, disk_encrypted, 3600);
}

/// Writes [`POLICY`] next to the controller's database and applies it with the CLI.
pub fn apply_policy(ctl: &Controller) {
    let policy_file = ctl.dir().join("policy.toml");
    std::fs::write(&policy_file, POLICY).expect("write the policy file");
    let policy_path = policy_file.to_str().expect("utf-8 temp path");
    let dry = ctl.admin(&["policy", "apply", policy_path, "--dry-run"]);
    assert!(dry.contains("+ rule \"web-needs-healthy-device\""), "{dry}");
    let applied = ctl.admin(&["policy", "apply", policy_path]);
    assert!(applied.contains("applied policy sha256"), "{applied}");
}
