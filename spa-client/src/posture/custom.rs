//! Custom checks: every executable file in the checks directory (default
//! `etc/postern/checks.d` under the posture root) runs with a time limit; it passes when it
//! exits 0, and when its stdout is a JSON object (`{"pass": bool, "detail": ...}`) only if
//! `pass` is also true. Malformed JSON (stdout starting with `{`), a time-out, too much
//! output or a failure to start fail the check. Other stdout is a free-text detail.
//!
//! The check's name is its file name without the extension (the whole file name when two
//! files share a stem), with characters other than `A-Za-z0-9_.-` replaced by `_`.
//! Hidden files, directories and non-executable files are skipped; at most 64 checks run.
//!
//! Owns: finding and running the checks. Must not touch: anything the check itself does.

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use postern_policy::report::{MAX_CUSTOM_CHECKS, MAX_STRING_BYTES};

use super::run::{run_bounded, RunOutcome};
use super::{clean, under_root, CheckResult};

/// Most stdout bytes kept from a check.
pub const MAX_CHECK_OUTPUT: usize = 4096;

/// Runs every check in `dir` (relative to `root`) with `timeout` each, in name order.
pub fn run_checks(root: &Path, dir: &Path, timeout: Duration) -> Vec<CheckResult> {
    let dir = under_root(root, dir);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut files: Vec<_> = entries
        .flatten()
        .filter(|e| {
            let hidden = e.file_name().to_string_lossy().starts_with('.');
            let exec = e
                .metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0);
            !hidden && exec
        })
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    let mut results: Vec<CheckResult> = Vec::new();
    for file in files.into_iter().take(MAX_CUSTOM_CHECKS) {
        let stem = file.rsplit_once('.').map_or(file.as_str(), |(s, _)| s);
        let mut name = check_name(if stem.is_empty() { &file } else { stem });
        if results.iter().any(|r| r.name == name) {
            name = check_name(&file);
        }
        if results.iter().any(|r| r.name == name) {
            continue;
        }
        let (pass, detail) = run_one(&dir.join(&file), root, timeout);
        results.push(CheckResult { name, pass, detail });
    }
    results
}

fn check_name(raw: &str) -> String {
    let name: String = raw
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "_.-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .take(MAX_STRING_BYTES)
        .collect();
    name
}

fn run_one(path: &Path, root: &Path, timeout: Duration) -> (bool, String) {
    let mut cmd = Command::new(path);
    cmd.env("POSTERN_POSTURE_ROOT", root);
    match run_bounded(&mut cmd, timeout, MAX_CHECK_OUTPUT) {
        RunOutcome::SpawnFailed(e) => (false, format!("cannot run: {e}")),
        RunOutcome::TimedOut => (
            false,
            format!("timed out after {} ms (killed)", timeout.as_millis()),
        ),
        RunOutcome::Exited {
            stdout_overflow: true,
            ..
        } => (
            false,
            format!("printed more than {MAX_CHECK_OUTPUT} bytes on stdout"),
        ),
        RunOutcome::Exited { status, stdout, .. } => {
            let text = String::from_utf8_lossy(&stdout);
            let text = text.trim();
            let exited_ok = status.success();
            let status_text = match status.code() {
                Some(c) => format!("exit status {c}"),
                None => "killed by a signal".to_owned(),
            };
            if text.starts_with('{') {
                #[derive(serde::Deserialize)]
                struct Answer {
                    pass: bool,
                    #[serde(default)]
                    detail: Option<serde_json::Value>,
                }
                match serde_json::from_str::<Answer>(text) {
                    Ok(a) => {
                        let detail = match a.detail {
                            Some(serde_json::Value::String(s)) => s,
                            Some(v) => v.to_string(),
                            None => status_text,
                        };
                        (
                            exited_ok && a.pass,
                            clean(&detail).unwrap_or_else(|| "no detail".into()),
                        )
                    }
                    Err(e) => (
                        false,
                        format!("stdout is not the JSON {{\"pass\": bool, \"detail\": ...}}: {e}"),
                    ),
                }
            } else {
                let detail = text.lines().next().and_then(clean).unwrap_or(status_text);
                (exited_ok, detail)
            }
        }
    }
}
