//! Shared helpers for the controller's integration tests: device keys, running the real
//! binary, and talking to `serve` over its Unix socket.
//!
//! Owns: test scaffolding only. Must not touch: anything outside the test's tempdir.
#![allow(dead_code, clippy::unwrap_used)]

pub mod gateway;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use postern_controller::proto::keys::DeviceSigningKey;
use postern_controller::proto::snapshot::Snapshot;

pub const BIN: &str = env!("CARGO_BIN_EXE_postern-controller");

/// A valid `ed25519:...` public key text, distinct per `i`.
pub fn key(i: u32) -> String {
    let mut seed = [7u8; 32];
    seed[..4].copy_from_slice(&i.to_be_bytes());
    DeviceSigningKey::from_seed(seed).public_key().to_text()
}

/// The binary with `--db` set and no inherited `POSTERN_DB`.
pub fn cmd(db: &Path) -> Command {
    let mut c = Command::new(BIN);
    c.env_remove("POSTERN_DB")
        .env_remove("RUST_LOG")
        .arg("--db")
        .arg(db);
    c
}

/// Runs the binary with `args`; returns (exit code, stdout, stderr).
pub fn run(db: &Path, args: &[&str]) -> (i32, String, String) {
    let Output {
        status,
        stdout,
        stderr,
    } = cmd(db).args(args).output().unwrap();
    (
        status.code().unwrap_or(-1),
        String::from_utf8(stdout).unwrap(),
        String::from_utf8(stderr).unwrap(),
    )
}

/// Runs and asserts success; returns stdout.
pub fn ok(db: &Path, args: &[&str]) -> String {
    let (code, out, err) = run(db, args);
    assert_eq!(code, 0, "{args:?} failed: {err}");
    out
}

/// Runs the binary with `args`, which must fail with exit `code`, print nothing on stdout
/// and exactly one `error: ...` line on stderr containing `needle`; returns that line.
pub fn fails(db: &Path, args: &[&str], code: i32, needle: &str) -> String {
    let (c, out, err) = run(db, args);
    assert_eq!(c, code, "{args:?}: stdout={out} stderr={err}");
    assert!(out.is_empty(), "{args:?}: unexpected stdout {out}");
    assert_eq!(
        err.lines().count(),
        1,
        "{args:?}: stderr must be one line: {err}"
    );
    assert!(
        err.starts_with("error: ") && err.contains(needle),
        "{args:?}: {err}"
    );
    err
}

/// Starts `serve` on `socket` and waits until it accepts connections.
pub fn spawn_serve(db: &Path, socket: &Path, hold_ms: u64) -> Child {
    let child = cmd(db)
        .args(["serve", "--socket"])
        .arg(socket)
        .arg("--hold-ms")
        .arg(hold_ms.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_socket(socket);
    child
}

pub fn wait_for_socket(socket: &Path) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while UnixStream::connect(socket).is_err() {
        assert!(
            Instant::now() < deadline,
            "serve did not come up on {socket:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A sync client connection.
pub struct Client {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Client {
    pub fn connect(socket: &Path) -> Self {
        let s = UnixStream::connect(socket).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        Self {
            writer: s.try_clone().unwrap(),
            reader: BufReader::new(s),
        }
    }

    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.writer.write_all(bytes).unwrap();
    }

    /// Like `send_raw`, but reports failure (server gone) instead of panicking.
    pub fn try_send(&mut self, bytes: &[u8]) -> bool {
        self.writer.write_all(bytes).is_ok()
    }

    /// One response line parsed as JSON; `None` at EOF.
    pub fn recv(&mut self) -> Option<serde_json::Value> {
        let mut line = String::new();
        if self.reader.read_line(&mut line).unwrap() == 0 {
            return None;
        }
        assert!(line.ends_with('\n'));
        Some(serde_json::from_str(&line).unwrap())
    }

    /// Like `recv`, but `None` on EOF or a connection error (server killed).
    pub fn try_recv(&mut self) -> Option<serde_json::Value> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(n) if n > 0 && line.ends_with('\n') => serde_json::from_str(&line).ok(),
            _ => None,
        }
    }

    /// Sends `{"after_revision":N}` and returns the snapshot answer.
    pub fn sync(&mut self, after: u64) -> Snapshot {
        self.send_raw(format!("{{\"after_revision\":{after}}}\n").as_bytes());
        let v = self.recv().expect("connection closed");
        serde_json::from_value(v["snapshot"].clone()).unwrap_or_else(|e| panic!("{v}: {e}"))
    }
}

pub fn tempdir() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("registry.db");
    (dir, db)
}
