//! Where the gateway's CPU goes under a bounded knock load: `perf record -e cpu-clock`
//! (software clock: this VM has no hardware counters) attached to the gateway process for
//! the measured window, then `perf report` summaries by thread and by function.
//!
//! Owns: one `perf record` child (bounded by `-- sleep SECS`) and its data file under
//! `target/postern-bench/`. Must not touch: any process but the gateway it is given.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// A running `perf record` on one process.
pub struct Profiler {
    child: Child,
    pub data: PathBuf,
}

/// Where the bench keeps its perf data: target/postern-bench/ (the binary is in target/release/).
pub fn out_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .map(|p| p.join("postern-bench"))
        .unwrap_or_else(|| PathBuf::from("."));
    let _ = std::fs::create_dir_all(&dir);
    dir
}

impl Profiler {
    /// Starts sampling `pid` (all its threads, user and kernel) for `secs` seconds at 999 Hz.
    pub fn start(pid: u32, secs: u64, name: &str) -> Option<Profiler> {
        let data = out_dir().join(format!("perf-{name}.data"));
        let child = Command::new("perf")
            .args(["record", "-e", "cpu-clock", "-F", "999", "-g", "-p"])
            .arg(pid.to_string())
            .arg("-o")
            .arg(&data)
            .args(["--", "sleep", &secs.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        match child {
            Ok(child) => Some(Profiler { child, data }),
            Err(e) => {
                eprintln!("perf not usable ({e}): apt-get install -y linux-perf");
                None
            }
        }
    }

    /// Waits for `perf record` to finish (it stops itself after its `sleep`) and returns
    /// the summary: the busiest threads and functions (self time, % of samples).
    pub fn finish(mut self, top: usize) -> String {
        let _ = self.child.wait();
        let report = |sort: &str| {
            Command::new("perf")
                .args([
                    "report",
                    "--stdio",
                    "--no-children",
                    "-g",
                    "none",
                    "--sort",
                    sort,
                ])
                .args(["--percent-limit", "0.5", "-i"])
                .arg(&self.data)
                .stdin(Stdio::null())
                .stderr(Stdio::null())
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default()
        };
        let rows = |text: String| {
            text.lines()
                .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
                .take(top)
                .map(|l| {
                    let l: String = l.trim_end().chars().take(150).collect();
                    format!("    {}", l.trim_end())
                })
                .collect::<Vec<_>>()
                .join("\n")
        };
        format!(
            "perf data: {}\n  by thread:\n{}\n  by thread and function (self time):\n{}",
            self.data.display(),
            rows(report("comm")),
            rows(report("comm,dso,symbol"))
        )
    }
}
