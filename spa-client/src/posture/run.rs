//! Running a helper program (a custom check, `nft`) with a time limit and bounded output.
//!
//! Owns: spawning in its own process group, the deadline, killing the whole group when the
//! deadline passes, and reading at most a fixed number of bytes of stdout and stderr. Must
//! not touch: what the output means (the callers decide).

use std::io::Read as _;
use std::os::unix::process::CommandExt as _;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// How often the deadline loop looks at the child.
const POLL: Duration = Duration::from_millis(10);
/// Extra attempts to start a program that is busy being written.
const SPAWN_RETRIES: u32 = 5;
/// How long to wait for the output readers after the child has exited or been killed.
const DRAIN_WAIT: Duration = Duration::from_secs(1);

/// What became of one run.
#[derive(Debug)]
pub enum RunOutcome {
    /// The program exited in time.
    Exited {
        status: ExitStatus,
        stdout: Vec<u8>,
        stderr: Vec<u8>,
        /// stdout was longer than the limit (and was cut).
        stdout_overflow: bool,
    },
    /// The deadline passed; the process group was killed.
    TimedOut,
    /// The program could not be started.
    SpawnFailed(std::io::Error),
}

/// Runs `command` (stdin from /dev/null) for at most `timeout`, keeping at most `max_output`
/// bytes of stdout and of stderr.
pub fn run_bounded(command: &mut Command, timeout: Duration, max_output: usize) -> RunOutcome {
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let mut tries = 0;
    let mut child = loop {
        match command.spawn() {
            Ok(c) => break c,
            // Another thread's fork may briefly hold a just-written program open for
            // writing ("text file busy"): try again a few times.
            Err(e)
                if e.kind() == std::io::ErrorKind::ExecutableFileBusy && tries < SPAWN_RETRIES =>
            {
                tries += 1;
                std::thread::sleep(POLL * 5);
            }
            Err(e) => return RunOutcome::SpawnFailed(e),
        }
    };
    let stdout = child.stdout.take().map(|s| spawn_reader(s, max_output));
    let stderr = child.stderr.take().map(|s| spawn_reader(s, max_output));
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(POLL),
            Ok(None) | Err(_) => break None,
        }
    };
    let Some(status) = status else {
        kill_group(&child);
        let _ = child.kill();
        let _ = child.wait();
        return RunOutcome::TimedOut;
    };
    // A grandchild may still hold the pipes open: end the group, then collect what was read.
    kill_group(&child);
    let collect = |rx: Option<mpsc::Receiver<(Vec<u8>, bool)>>| {
        rx.and_then(|rx| rx.recv_timeout(DRAIN_WAIT).ok())
            .unwrap_or_default()
    };
    let (stdout, stdout_overflow) = collect(stdout);
    let (stderr, _) = collect(stderr);
    RunOutcome::Exited {
        status,
        stdout,
        stderr,
        stdout_overflow,
    }
}

fn kill_group(child: &std::process::Child) {
    if let Some(pid) = rustix::process::Pid::from_raw(child.id() as i32) {
        let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
    }
}

/// Reads up to `max` bytes on a thread; sends (bytes, overflowed). Discards the rest so the
/// writer never blocks on a full pipe.
fn spawn_reader(
    mut source: impl std::io::Read + Send + 'static,
    max: usize,
) -> mpsc::Receiver<(Vec<u8>, bool)> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut kept = Vec::new();
        let _ = (&mut source).take(max as u64).read_to_end(&mut kept);
        let mut rest = [0u8; 4096];
        let mut overflow = false;
        while let Ok(n) = source.read(&mut rest) {
            if n == 0 {
                break;
            }
            overflow = true;
        }
        let _ = tx.send((kept, overflow));
    });
    rx
}
