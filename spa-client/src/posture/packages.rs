//! Last package update time from the package manager's logs under the posture root:
//! `var/log/dpkg.log` and `var/log/dpkg.log.1` (lines `YYYY-MM-DD HH:MM:SS install|upgrade
//! ...` and `... status installed ...`) and `var/log/apt/history.log[.1]` (`End-Date:`
//! lines). Log times are local time; they are converted with the zone in `etc/localtime`
//! under the root (UTC when it is missing). Where rpm is installed under the root, the
//! newest `INSTALLTIME` of its database counts too. Compressed rotations (`*.gz`) are not
//! read (see docs/client.md).
//!
//! Owns: parsing those logs. Must not touch: anything outside the root.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use jiff::civil::DateTime;
use jiff::tz::TimeZone;
use jiff::Timestamp;

use super::run::{run_bounded, RunOutcome};
use super::under_root;

/// Longest log file read (the newest lines of a bigger one are not missed: logs append,
/// so only the tail is read).
const MAX_LOG_BYTES: u64 = 8 * 1024 * 1024;
/// Time limit of the rpm query.
const RPM_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest rpm query output (one number per installed package).
const MAX_RPM_OUTPUT: usize = 4 * 1024 * 1024;

/// Reads the time of one log line that records a package install or upgrade.
type LineParser = fn(&str) -> Option<DateTime>;

/// The newest package install/upgrade found, and where it came from.
pub fn last_update(root: &Path) -> (Option<Timestamp>, String) {
    let tz = std::fs::read(under_root(root, "etc/localtime"))
        .ok()
        .and_then(|data| TimeZone::tzif("localtime", &data).ok())
        .unwrap_or(TimeZone::UTC);
    let mut newest: Option<(Timestamp, &str)> = None;
    let sources: [(&str, LineParser); 4] = [
        ("var/log/dpkg.log", dpkg_line),
        ("var/log/dpkg.log.1", dpkg_line),
        ("var/log/apt/history.log", apt_history_line),
        ("var/log/apt/history.log.1", apt_history_line),
    ];
    let mut read_any = false;
    for (rel, parse) in sources {
        let Some(text) = read_tail(&under_root(root, rel)) else {
            continue;
        };
        read_any = true;
        for dt in text.lines().filter_map(parse) {
            let Ok(ts) = tz.to_timestamp(dt) else {
                continue;
            };
            if newest.is_none_or(|(n, _)| ts > n) {
                newest = Some((ts, rel));
            }
        }
    }
    if let Some((ts, rpm)) = rpm_newest_install(root) {
        read_any = true;
        if newest.is_none_or(|(n, _)| ts > n) {
            newest = Some((ts, rpm));
        }
    }
    match newest {
        Some((ts, rel)) => (Some(ts), format!("newest entry in {rel}")),
        None if read_any => (
            None,
            "no install/upgrade entry in the dpkg/apt logs or rpm".into(),
        ),
        None => (None, "no dpkg or apt log under var/log and no rpm".into()),
    }
}

/// The newest `INSTALLTIME` of the rpm database, from `rpm -qa --qf '%{INSTALLTIME}\n'`
/// run from the root (`usr/bin/rpm`, `bin/rpm`), when rpm is there.
fn rpm_newest_install(root: &Path) -> Option<(Timestamp, &'static str)> {
    let rpm = ["usr/bin/rpm", "bin/rpm"]
        .iter()
        .map(|rel| under_root(root, rel))
        .find(|p| p.is_file())?;
    let outcome = run_bounded(
        Command::new(rpm).args(["-qa", "--qf", "%{INSTALLTIME}\\n"]),
        RPM_TIMEOUT,
        MAX_RPM_OUTPUT,
    );
    let RunOutcome::Exited {
        status,
        stdout,
        stdout_overflow: false,
        ..
    } = outcome
    else {
        return None;
    };
    if !status.success() {
        return None;
    }
    String::from_utf8_lossy(&stdout)
        .lines()
        .filter_map(|l| l.trim().parse::<i64>().ok())
        .filter_map(|secs| Timestamp::from_second(secs).ok())
        .max()
        .map(|ts| (ts, "the rpm database (rpm -qa INSTALLTIME)"))
}

fn read_tail(path: &Path) -> Option<String> {
    use std::io::{Read as _, Seek as _, SeekFrom};
    let mut file = std::fs::File::open(path).ok()?;
    let len = file.metadata().ok()?.len();
    if len > MAX_LOG_BYTES {
        file.seek(SeekFrom::Start(len - MAX_LOG_BYTES)).ok()?;
    }
    let mut bytes = Vec::new();
    file.take(MAX_LOG_BYTES).read_to_end(&mut bytes).ok()?;
    Some(String::from_utf8_lossy(&bytes).into_owned())
}

/// `2026-11-20 08:15:00 upgrade openssl:amd64 3.0.1 3.0.2` or `... status installed ...`.
fn dpkg_line(line: &str) -> Option<DateTime> {
    let mut words = line.split_whitespace();
    let (date, time, action) = (words.next()?, words.next()?, words.next()?);
    let counts = match action {
        "install" | "upgrade" => true,
        "status" => words.next() == Some("installed"),
        _ => false,
    };
    if !counts {
        return None;
    }
    civil(date, time)
}

/// `End-Date: 2026-11-20  08:15:42`.
fn apt_history_line(line: &str) -> Option<DateTime> {
    let rest = line.strip_prefix("End-Date:")?;
    let mut words = rest.split_whitespace();
    civil(words.next()?, words.next()?)
}

fn civil(date: &str, time: &str) -> Option<DateTime> {
    DateTime::strptime("%Y-%m-%d %H:%M:%S", format!("{date} {time}")).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_lines_parse() {
        assert!(dpkg_line("2026-11-20 08:15:00 upgrade a:amd64 1 2").is_some());
        assert!(dpkg_line("2026-11-20 08:15:00 status installed a:amd64 2").is_some());
        assert!(dpkg_line("2026-11-20 08:15:00 status half-configured a 2").is_none());
        assert!(dpkg_line("2026-11-20 08:15:00 startup archives unpack").is_none());
        assert!(dpkg_line("garbage").is_none());
        assert!(dpkg_line("2026-13-40 99:00:00 install x").is_none());
        assert!(apt_history_line("End-Date: 2026-11-20  08:15:42").is_some());
        assert!(apt_history_line("Start-Date: 2026-11-20  08:15:42").is_none());
    }
}
