//! Sync requests over the real Unix socket of a running `postern-controller serve`: bad
//! JSON, wrong types, unknown and duplicate fields, over-long and unterminated lines,
//! binary junk. Each connection must get exactly ONE `{"error": "..."}` line and then be
//! closed by the server; the server keeps serving valid requests afterwards.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use postern_e2e::ChildGuard;
use serde_json::Value;

pub struct Case {
    pub name: &'static str,
    /// Bytes sent; the write side is shut down afterwards (end of input).
    pub bytes: Vec<u8>,
    /// Send a valid request first on the same connection (answered with a snapshot).
    pub after_valid: bool,
}

fn case(name: &'static str, bytes: &[u8]) -> Case {
    Case {
        name,
        bytes: bytes.to_vec(),
        after_valid: false,
    }
}

pub fn cases() -> Vec<Case> {
    let mut c = vec![
        case("not JSON", b"garbage\n"),
        case("open brace", b"{\n"),
        // Serde's derived parser would take these as `{"after_revision": N}` in sequence
        // form; the request parser accepts only an object.
        case("empty array", b"[]\n"),
        case("array of a revision", b"[5]\n"),
        case("array of strings", b"[\"after_revision\"]\n"),
        case("null", b"null\n"),
        case("number", b"1\n"),
        case("string", b"\"after_revision\"\n"),
        case("true", b"true\n"),
        case("empty line", b"\n"),
        case("spaces only", b"   \n"),
        case("CRLF only", b"\r\n"),
        case("negative revision", b"{\"after_revision\":-1}\n"),
        case("string revision", b"{\"after_revision\":\"1\"}\n"),
        case("float revision", b"{\"after_revision\":1.5}\n"),
        case("exponent revision", b"{\"after_revision\":1e3}\n"),
        case(
            "revision past u64",
            b"{\"after_revision\":18446744073709551616}\n",
        ),
        case("bool revision", b"{\"after_revision\":true}\n"),
        case("array revision", b"{\"after_revision\":[1]}\n"),
        case("object revision", b"{\"after_revision\":{}}\n"),
        case("unknown field", b"{\"after\":1}\n"),
        case("extra field", b"{\"after_revision\":1,\"x\":2}\n"),
        case(
            "duplicate field",
            b"{\"after_revision\":1,\"after_revision\":2}\n",
        ),
        case("uppercase field", b"{\"AFTER_REVISION\":1}\n"),
        case("two objects", b"{} {}\n"),
        case("trailing comma", b"{\"after_revision\":1,}\n"),
        case("single quotes", b"{'after_revision':1}\n"),
        case("a reply sent back", b"{\"snapshot\":{}}\n"),
        case("an error sent back", b"{\"error\":\"x\"}\n"),
        case("invalid UTF-8", b"\xff\xfe\xfd\n"),
        case("NUL bytes", b"\0\0\0\0\n"),
        case("UTF-8 BOM", b"\xef\xbb\xbf{}\n"),
        case("no newline", b"{}"),
        case("no newline, garbage", b"garbage"),
        case(
            "deep nesting",
            &[b"[".repeat(10_000), b"\n".to_vec()].concat(),
        ),
    ];
    let mut long = br#"{"after_revision":1, "pad":""#.to_vec();
    long.resize(5000, b'a');
    long.extend_from_slice(b"\"}\n");
    c.push(Case {
        name: "line over 4096 bytes",
        bytes: long,
        after_valid: false,
    });
    c.push(Case {
        name: "60 KB without a newline",
        bytes: vec![b'{'; 60_000],
        after_valid: false,
    });
    c.push(Case {
        name: "garbage after a valid request",
        bytes: b"garbage\n".to_vec(),
        after_valid: true,
    });
    c.push(Case {
        name: "unknown field after a valid request",
        bytes: b"{\"after\":1}\n".to_vec(),
        after_valid: true,
    });
    c
}

fn read_all(s: &mut UnixStream, deadline: Instant) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            !left.is_zero(),
            "the server did not close the connection within 10 s"
        );
        s.set_read_timeout(Some(left)).expect("set read timeout");
        match s.read(&mut buf) {
            Ok(0) => return out,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => panic!("reading the reply: {e}"),
        }
    }
}

fn wait_for_socket(path: &std::path::Path, serve: &mut ChildGuard) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while UnixStream::connect(path).is_err() {
        assert!(serve.exited().is_none(), "serve exited before listening");
        assert!(
            Instant::now() < deadline,
            "serve did not listen on {path:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn malformed_sync_requests_get_one_error_line_and_a_close() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("registry.db");
    let sock = dir.path().join("controller.sock");
    let child = Command::new(postern_e2e::bin("postern-controller"))
        .env_remove("POSTERN_DB")
        .env_remove("RUST_LOG")
        .arg("--db")
        .arg(&db)
        .args(["serve", "--hold-ms", "200", "--socket"])
        .arg(&sock)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start postern-controller serve");
    let mut serve = ChildGuard::new(child, "postern-controller serve");
    wait_for_socket(&sock, &mut serve);

    let cases = cases();
    let mut failures = Vec::new();
    for case in &cases {
        let mut s = UnixStream::connect(&sock).expect("connect to serve");
        s.set_write_timeout(Some(Duration::from_secs(10)))
            .expect("set write timeout");
        if case.after_valid {
            s.write_all(b"{}\n").expect("send valid request");
        }
        s.write_all(&case.bytes).expect("send request");
        s.shutdown(std::net::Shutdown::Write)
            .expect("shutdown write");
        let reply = read_all(&mut s, Instant::now() + Duration::from_secs(10));
        let text = String::from_utf8_lossy(&reply);
        let mut lines: Vec<&str> = text.lines().collect();
        if case.after_valid {
            let first: Option<Value> = lines.first().and_then(|l| serde_json::from_str(l).ok());
            if first.is_none_or(|v| v.get("snapshot").is_none()) {
                failures.push(format!(
                    "{}: no snapshot for the valid request: {text}",
                    case.name
                ));
                continue;
            }
            lines.remove(0);
        }
        if lines.len() != 1 || !text.ends_with('\n') {
            failures.push(format!(
                "{}: expected one reply line, got {text:?}",
                case.name
            ));
            continue;
        }
        let v: Value = match serde_json::from_str(lines[0]) {
            Ok(v) => v,
            Err(e) => {
                failures.push(format!(
                    "{}: reply is not JSON ({e}): {}",
                    case.name, lines[0]
                ));
                continue;
            }
        };
        let msg = v.get("error").and_then(Value::as_str);
        match msg {
            Some(m) if v.as_object().is_some_and(|o| o.len() == 1) => {
                super::assert_one_line(case.name, m)
            }
            _ => failures.push(format!("{}: not an error reply: {}", case.name, lines[0])),
        }
    }
    // Still serving.
    let mut s = UnixStream::connect(&sock).expect("connect after the malformed requests");
    s.write_all(b"{\"after_revision\":null}\n").expect("send");
    s.shutdown(std::net::Shutdown::Write)
        .expect("shutdown write");
    let reply = read_all(&mut s, Instant::now() + Duration::from_secs(10));
    let v: Value = serde_json::from_slice(&reply).expect("snapshot reply");
    assert!(v.get("snapshot").is_some(), "{v}");
    assert!(serve.exited().is_none(), "serve died");
    assert!(
        failures.is_empty(),
        "{} of {} sync cases wrong:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}
