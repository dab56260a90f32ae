//! Each posture collector against fixture trees built in a temporary directory (the
//! collectors read everything under their root), and once against the real machine.

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::time::{Duration, Instant};

use postern_client::posture::{collect, Collected, PostureConfig};

fn write(root: &Path, rel: &str, text: &str) {
    let path = root.join(rel);
    std::fs::create_dir_all(path.parent().expect("fixture path has a parent"))
        .expect("create fixture dir");
    std::fs::write(&path, text).expect("write fixture file");
}

fn script(root: &Path, rel: &str, body: &str) {
    write(root, rel, &format!("#!/bin/sh\n{body}\n"));
    std::fs::set_permissions(root.join(rel), std::fs::Permissions::from_mode(0o755))
        .expect("chmod fixture script");
}

fn config(root: &Path) -> PostureConfig {
    PostureConfig {
        root: root.to_path_buf(),
        processes: vec![],
        ..PostureConfig::default()
    }
}

/// The report must be exactly what the controller accepts.
fn checked_report(c: &Collected) -> serde_json::Value {
    let bytes = c
        .report_bytes()
        .expect("report passes postern_policy::PostureReport::parse");
    postern_policy::PostureReport::parse(&bytes).expect("controller parser accepts it");
    serde_json::from_slice(&bytes).expect("report is JSON")
}

#[test]
fn empty_tree_gives_unknowns_and_a_valid_report() {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = collect(&config(dir.path()));
    assert_eq!((c.os_id.as_deref(), c.kernel.as_deref()), (None, None));
    assert_eq!(c.last_package_update, None);
    assert_eq!(c.root_encryption.state, None);
    assert_eq!(c.firewall.state, None);
    assert_eq!(c.mdm.state, Some(false));
    assert!(c.custom.is_empty());
    let r = checked_report(&c);
    assert_eq!(r["os_family"], "linux");
    assert!(r.get("os_version").is_none() && r.get("kernel").is_none());
    assert_eq!(r["disk_encrypted"], false);
    assert_eq!(r["firewall_on"], false);
    assert!(c.table().contains("unknown (FAIL)"));
    // A root that does not exist at all is no different.
    let c = collect(&config(&dir.path().join("missing")));
    checked_report(&c);
}

#[test]
fn os_release_and_kernel() {
    let dir = tempfile::tempdir().expect("tempdir");
    write(
        dir.path(),
        "etc/os-release",
        "PRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\nID=debian\nVERSION_ID=\"12\"\n",
    );
    write(dir.path(), "proc/sys/kernel/osrelease", "6.1.0-13-amd64\n");
    let c = collect(&config(dir.path()));
    assert_eq!(c.os_id.as_deref(), Some("debian"));
    assert_eq!(c.os_version.as_deref(), Some("12"));
    assert_eq!(c.kernel.as_deref(), Some("6.1.0-13-amd64"));
    let r = checked_report(&c);
    assert_eq!(
        (r["os_version"].as_str(), r["kernel"].as_str()),
        (Some("12"), Some("6.1.0-13-amd64"))
    );
    // usr/lib/os-release is the fallback; control characters are dropped.
    let dir = tempfile::tempdir().expect("tempdir");
    write(
        dir.path(),
        "usr/lib/os-release",
        "ID=fedora\nVERSION_ID=40\u{7}\n",
    );
    let c = collect(&config(dir.path()));
    assert_eq!(
        (c.os_id.as_deref(), c.os_version.as_deref()),
        (Some("fedora"), Some("40"))
    );
}

/// sys/block entries: `dev` numbers, device-mapper uuids and slaves.
fn block(root: &Path, name: &str, dev: &str, dm_uuid: Option<&str>, slaves: &[&str]) {
    write(root, &format!("sys/block/{name}/dev"), &format!("{dev}\n"));
    if let Some(uuid) = dm_uuid {
        write(
            root,
            &format!("sys/block/{name}/dm/uuid"),
            &format!("{uuid}\n"),
        );
        write(
            root,
            &format!("sys/block/{name}/dm/name"),
            &format!("{name}-mapped\n"),
        );
    }
    std::fs::create_dir_all(root.join(format!("sys/block/{name}/slaves"))).expect("slaves dir");
    for s in slaves {
        write(root, &format!("sys/block/{name}/slaves/{s}"), "");
    }
}

fn partition(root: &Path, disk: &str, part: &str, dev: &str) {
    write(
        root,
        &format!("sys/block/{disk}/{part}/dev"),
        &format!("{dev}\n"),
    );
    write(root, &format!("sys/block/{disk}/{part}/partition"), "3\n");
}

#[test]
fn lvm_on_luks_root_with_plain_home_partition() {
    let dir = tempfile::tempdir().expect("tempdir");
    let r = dir.path();
    write(
        r,
        "proc/self/mountinfo",
        "22 1 253:1 / / rw,relatime shared:1 - ext4 /dev/mapper/vg-root rw\n\
         23 22 0:21 / /proc rw - proc proc rw\n\
         30 22 8:4 / /home rw,relatime - ext4 /dev/sda4 rw\n",
    );
    block(r, "sda", "8:0", None, &[]);
    partition(r, "sda", "sda3", "8:3");
    partition(r, "sda", "sda4", "8:4");
    block(
        r,
        "dm-0",
        "253:0",
        Some("CRYPT-LUKS2-0123456789abcdef-sda3_crypt"),
        &["sda3"],
    );
    block(r, "dm-1", "253:1", Some("LVM-abcdef"), &["dm-0"]);
    let c = collect(&config(r));
    assert_eq!(
        c.root_encryption.state,
        Some(true),
        "{}",
        c.root_encryption.detail
    );
    assert!(
        c.root_encryption.detail.contains("dm-crypt"),
        "{}",
        c.root_encryption.detail
    );
    assert_eq!(
        c.home_encryption.state,
        Some(false),
        "{}",
        c.home_encryption.detail
    );
    assert_eq!(
        checked_report(&c)["disk_encrypted"],
        false,
        "home is not encrypted"
    );

    // /home on the (encrypted) root file system: both count as encrypted.
    write(
        r,
        "proc/self/mountinfo",
        "22 1 253:1 / / rw,relatime shared:1 - ext4 /dev/mapper/vg-root rw\n",
    );
    let c = collect(&config(r));
    assert_eq!(
        c.home_encryption.state,
        Some(true),
        "{}",
        c.home_encryption.detail
    );
    assert_eq!(checked_report(&c)["disk_encrypted"], true);
}

/// Writes `mountinfo` and collects: the root file system's encryption state.
fn root_state(r: &Path, mountinfo: &str) -> Option<bool> {
    write(r, "proc/self/mountinfo", mountinfo);
    let c = collect(&config(r));
    eprintln!("root: {}", c.root_encryption.detail);
    c.root_encryption.state
}

#[test]
fn unencrypted_and_unknown_roots() {
    let dir = tempfile::tempdir().expect("tempdir");
    let r = dir.path();
    block(r, "sda", "8:0", None, &[]);
    partition(r, "sda", "sda2", "8:2");
    block(r, "dm-5", "253:5", Some("LVM-xyz"), &["sda2"]);
    block(r, "dm-7", "253:7", Some("CRYPT-LUKS2-aa-root"), &["sda2"]);
    let cases = [
        (
            "plain partition",
            "22 1 8:2 / / rw - ext4 /dev/sda2 rw\n",
            Some(false),
        ),
        (
            "LVM straight on a partition",
            "22 1 253:5 / / rw - ext4 /dev/mapper/vg-root rw\n",
            Some(false),
        ),
        (
            "btrfs (anonymous device number) found by its /dev/mapper source",
            "22 1 0:31 / / rw - btrfs /dev/mapper/dm-7-mapped rw\n",
            Some(true),
        ),
        (
            "a container's overlay root is not a block device",
            "500 400 0:52 / / rw - overlay overlay rw\n",
            None,
        ),
        ("garbage", "\u{0}\u{1} garbage\n\n - - -\n", None),
    ];
    for (what, mountinfo, want) in cases {
        assert_eq!(root_state(r, mountinfo), want, "{what}");
    }
    assert_eq!(
        checked_report(&collect(&config(r)))["disk_encrypted"],
        false,
        "unknown is reported as not encrypted"
    );
    // proc/mounts when mountinfo is missing.
    std::fs::remove_file(r.join("proc/self/mountinfo")).expect("rm");
    write(r, "proc/mounts", "/dev/mapper/dm-7-mapped / btrfs rw 0 0\n");
    assert_eq!(collect(&config(r)).root_encryption.state, Some(true));
}

fn days_ago(c: &Collected) -> i64 {
    let t = c.last_package_update.expect("an update time");
    (c.collected_at.as_second() - t.as_second()) / 86_400
}

#[test]
fn package_updates_fresh_stale_and_missing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let r = dir.path();
    let now = jiff::Timestamp::now();
    let fmt = |t: jiff::Timestamp| t.strftime("%Y-%m-%d %H:%M:%S").to_string();
    let stale = now - jiff::SignedDuration::from_hours(24 * 200);
    let fresh = now - jiff::SignedDuration::from_hours(24 * 2 + 1);
    write(
        r,
        "var/log/dpkg.log",
        &format!(
            "{} startup archives unpack\n{} upgrade openssl:amd64 3.0.1 3.0.2\n{} status half-installed x 1\n",
            fmt(fresh),
            fmt(stale),
            fmt(fresh)
        ),
    );
    let c = collect(&config(r));
    assert_eq!(
        days_ago(&c),
        200,
        "only install/upgrade/status installed count"
    );
    write(
        r,
        "var/log/apt/history.log",
        &format!(
            "Start-Date: {}\nCommandline: apt upgrade\nEnd-Date: {}\n",
            fmt(fresh),
            fmt(fresh).replacen(' ', "  ", 1)
        ),
    );
    let c = collect(&config(r));
    assert_eq!(days_ago(&c), 2);
    let rep = checked_report(&c);
    assert!(rep["last_package_update"]
        .as_str()
        .is_some_and(|s| s.ends_with('Z')));
    // Missing logs: unknown and absent from the report.
    let empty = tempfile::tempdir().expect("tempdir");
    let c = collect(&config(empty.path()));
    assert!(
        c.package_detail.contains("no dpkg or apt log"),
        "{}",
        c.package_detail
    );
    assert!(checked_report(&c).get("last_package_update").is_none());
}

#[test]
fn rpm_install_times_count_where_rpm_is_installed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let r = dir.path();
    let now = jiff::Timestamp::now().as_second();
    let ten_days = now - 10 * 86_400;
    let old = now - 400 * 86_400;
    script(
        r,
        "usr/bin/rpm",
        &format!("[ \"$1\" = -qa ] || exit 9\nprintf '{old}\\n{ten_days}\\n(none)\\n'"),
    );
    let c = collect(&config(r));
    assert_eq!(days_ago(&c), 10, "{}", c.package_detail);
    assert!(c.package_detail.contains("rpm"), "{}", c.package_detail);
    // A failing rpm is no date, not an error.
    script(r, "usr/bin/rpm", "exit 1");
    assert_eq!(collect(&config(r)).last_package_update, None);
}

#[test]
fn package_log_times_use_the_root_time_zone() {
    let zone = Path::new("/usr/share/zoneinfo/Asia/Kolkata");
    assert!(
        zone.exists(),
        "missing {}: install the Debian package tzdata",
        zone.display()
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let r = dir.path();
    write(
        r,
        "var/log/dpkg.log",
        "2026-01-10 12:00:00 install foo:amd64 <none> 1\n",
    );
    std::fs::create_dir_all(r.join("etc")).expect("etc");
    std::fs::copy(zone, r.join("etc/localtime")).expect("copy zone");
    let c = collect(&config(r));
    assert_eq!(
        c.last_package_update.map(|t| t.to_string()).as_deref(),
        Some("2026-01-10T06:30:00Z"),
        "12:00 in +05:30"
    );
}

#[test]
fn firewall_from_nft_or_ufw() {
    let dir = tempfile::tempdir().expect("tempdir");
    let r = dir.path();
    script(
        r,
        "usr/sbin/nft",
        "cat <<'X'\ntable inet filter {\n\tchain input {\n\t\ttype filter hook input priority filter; policy drop;\n\t\tct state established,related accept\n\t}\n}\nX",
    );
    let c = collect(&config(r));
    assert_eq!(c.firewall.state, Some(true), "{}", c.firewall.detail);
    assert_eq!(checked_report(&c)["firewall_on"], true);
    script(r, "usr/sbin/nft", "echo 'table inet filter {'; echo '}'");
    assert_eq!(collect(&config(r)).firewall.state, Some(false));
    // nft fails (not root): the ufw setting is used, and says so.
    script(
        r,
        "usr/sbin/nft",
        "echo 'Operation not permitted' >&2; exit 1",
    );
    write(
        r,
        "etc/ufw/ufw.conf",
        "# comment\nENABLED=yes\nLOGLEVEL=low\n",
    );
    let c = collect(&config(r));
    assert_eq!(c.firewall.state, Some(true));
    assert!(
        c.firewall.detail.contains("Operation not permitted"),
        "{}",
        c.firewall.detail
    );
    write(r, "etc/ufw/ufw.conf", "ENABLED=no\n");
    assert_eq!(collect(&config(r)).firewall.state, Some(false));
    std::fs::remove_file(r.join("etc/ufw/ufw.conf")).expect("rm");
    assert_eq!(collect(&config(r)).firewall.state, None);
}

#[test]
fn required_processes_from_proc_comm() {
    let dir = tempfile::tempdir().expect("tempdir");
    let r = dir.path();
    write(r, "proc/1/comm", "systemd\n");
    write(r, "proc/812/comm", "falcon-sensor\n");
    // The kernel keeps 15 bytes of a name.
    write(r, "proc/900/comm", "long-agent-name\n");
    write(r, "proc/self/comm", "postern\n");
    write(r, "proc/abc/comm", "osqueryd\n");
    let mut cfg = config(r);
    cfg.processes = vec![
        "falcon-sensor".into(),
        "long-agent-name-daemon".into(),
        "osqueryd".into(),
        "postern".into(),
    ];
    let c = collect(&cfg);
    let running: Vec<_> = c
        .processes
        .iter()
        .filter(|(_, r)| *r)
        .map(|(n, _)| n.as_str())
        .collect();
    assert_eq!(running, ["falcon-sensor", "long-agent-name-daemon"]);
    assert_eq!(
        checked_report(&c)["processes"],
        serde_json::json!(["falcon-sensor", "long-agent-name-daemon"])
    );
}

#[test]
fn mdm_marker_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let r = dir.path();
    assert_eq!(collect(&config(r)).mdm.state, Some(false));
    write(r, "etc/postern/mdm-enrolled", "enrolled by example-mdm\n");
    let c = collect(&config(r));
    assert_eq!(c.mdm.state, Some(true));
    assert_eq!(checked_report(&c)["mdm_enrolled"], true);
    let mut cfg = config(r);
    cfg.mdm_marker = "/var/lib/mdm/enrolled".into();
    assert_eq!(
        collect(&cfg).mdm.state,
        Some(false),
        "absolute marker paths stay under the root"
    );
    std::fs::create_dir_all(r.join("var/lib/mdm/enrolled")).expect("dir");
    assert_eq!(
        collect(&cfg).mdm.state,
        Some(false),
        "a directory is not a marker"
    );
}

#[test]
fn custom_checks_pass_fail_json_timeout() {
    let dir = tempfile::tempdir().expect("tempdir");
    let r = dir.path();
    let d = "etc/postern/checks.d";
    let checks = [
        ("a_exit0.sh", "exit 0"),
        ("b_exit1", "echo 'disk too full'; exit 1"),
        (
            "c_json_pass",
            "echo '{\"pass\": true, \"detail\": \"screen lock 5 min\"}'",
        ),
        (
            "d_json_fail",
            "echo '{\"pass\": false, \"detail\": {\"why\": 1}}'",
        ),
        ("e_bad_json", "echo '{not json'"),
        ("f_slow", "sleep 30; exit 0"),
        ("g_chatty", "yes y | head -c 100000; exit 0"),
        ("h_json_exit1", "echo '{\"pass\": true}'; exit 3"),
    ];
    for (file, body) in checks {
        script(r, &format!("{d}/{file}"), body);
    }
    script(r, &format!("{d}/.hidden"), "exit 0");
    write(r, &format!("{d}/not_executable"), "#!/bin/sh\nexit 0\n");
    let mut cfg = config(r);
    cfg.check_timeout = Duration::from_millis(500);
    let started = Instant::now();
    let c = collect(&cfg);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the slow check was not cut off"
    );
    let got: Vec<(&str, bool)> = c.custom.iter().map(|c| (c.name.as_str(), c.pass)).collect();
    assert_eq!(
        got,
        [
            ("a_exit0", true),
            ("b_exit1", false),
            ("c_json_pass", true),
            ("d_json_fail", false),
            ("e_bad_json", false),
            ("f_slow", false),
            ("g_chatty", false),
            ("h_json_exit1", false),
        ]
    );
    let detail = |n: &str| {
        c.custom
            .iter()
            .find(|c| c.name == n)
            .map(|c| c.detail.clone())
            .unwrap_or_default()
    };
    assert_eq!(detail("b_exit1"), "disk too full");
    assert_eq!(detail("c_json_pass"), "screen lock 5 min");
    assert!(
        detail("e_bad_json").contains("not the JSON"),
        "{}",
        detail("e_bad_json")
    );
    assert!(
        detail("f_slow").contains("timed out"),
        "{}",
        detail("f_slow")
    );
    assert!(
        detail("g_chatty").contains("more than"),
        "{}",
        detail("g_chatty")
    );
    let rep = checked_report(&c);
    assert_eq!(rep["custom"]["a_exit0"], true);
    assert_eq!(rep["custom"]["f_slow"], false);
    assert_eq!(rep["custom"].as_object().map(|o| o.len()), Some(8));
}

#[test]
fn real_machine_collects_plausible_facts() {
    let c = collect(&PostureConfig::default());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").expect("read osrelease");
    assert_eq!(c.kernel.as_deref(), Some(kernel.trim()));
    assert!(c.os_id.is_some(), "no ID in /etc/os-release");
    let rep = checked_report(&c);
    assert_eq!(rep["os_family"], "linux");
    assert!(!c.table().is_empty());
}
