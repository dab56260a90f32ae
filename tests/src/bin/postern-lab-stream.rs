//! `postern-lab-stream ADDR DURATION_MS INTERVAL_MS`: the "app user" of the connect
//! end-to-end test (tests/tests/connect_e2e.rs), run as `postern connect APP -- COMMAND`.
//!
//! Owns: one TCP connection to an echo server at ADDR (connect retried for up to 2 s while
//! the pinhole opens), a line every INTERVAL_MS for DURATION_MS, each echo checked within
//! 1 s. Prints one JSON line `{"lines", "connect_ms", "elapsed_ms", "done_ms"}` (done_ms: Unix
//! ms just before exiting) and exits 0; on any failure prints what failed and after how
//! long on stderr and exits 3 (bad usage: 2). Must not touch anything but that connection.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How long the pinhole may take to admit the first connection.
const CONNECT_WITHIN: Duration = Duration::from_secs(2);
/// How long one echo may take.
const ECHO_WITHIN: Duration = Duration::from_secs(1);

fn unix_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let parsed = match args.as_slice() {
        [addr, duration, interval] => (
            addr.parse::<SocketAddr>(),
            duration.parse::<u64>(),
            interval.parse::<u64>(),
        ),
        _ => {
            eprintln!("usage: postern-lab-stream ADDR DURATION_MS INTERVAL_MS");
            return ExitCode::from(2);
        }
    };
    let (Ok(addr), Ok(duration), Ok(interval)) = parsed else {
        eprintln!("postern-lab-stream: ADDR must be IP:PORT, DURATION_MS and INTERVAL_MS numbers");
        return ExitCode::from(2);
    };
    match stream(
        addr,
        Duration::from_millis(duration),
        Duration::from_millis(interval),
    ) {
        Ok(line) => {
            println!("{line}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("postern-lab-stream: {e}");
            ExitCode::from(3)
        }
    }
}

fn stream(addr: SocketAddr, duration: Duration, interval: Duration) -> Result<String, String> {
    let started = Instant::now();
    let conn = loop {
        match TcpStream::connect_timeout(&addr, Duration::from_millis(50)) {
            Ok(s) => break s,
            Err(e) if started.elapsed() >= CONNECT_WITHIN => {
                return Err(format!(
                    "no connection to {addr} within {CONNECT_WITHIN:?}: {e}"
                ))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    };
    let connect_ms = started.elapsed().as_millis();
    let flowing = Instant::now();
    conn.set_read_timeout(Some(ECHO_WITHIN))
        .and_then(|()| conn.set_write_timeout(Some(ECHO_WITHIN)))
        .map_err(|e| format!("socket timeouts: {e}"))?;
    let mut writer = conn.try_clone().map_err(|e| format!("clone socket: {e}"))?;
    let mut reader = BufReader::new(conn);
    let mut lines = 0u64;
    let mut echoed = String::new();
    while flowing.elapsed() < duration {
        let line = format!("line {lines}\n");
        let fail = |what: &str, e: &dyn std::fmt::Display| {
            format!(
                "{what} of line {lines} failed after {} ms of streaming: {e}",
                flowing.elapsed().as_millis()
            )
        };
        writer
            .write_all(line.as_bytes())
            .map_err(|e| fail("write", &e))?;
        echoed.clear();
        reader
            .read_line(&mut echoed)
            .map_err(|e| fail("echo", &e))?;
        if echoed != line {
            return Err(fail("echo", &format!("got {echoed:?}")));
        }
        lines += 1;
        std::thread::sleep(interval);
    }
    Ok(format!(
        "{{\"lines\":{lines},\"connect_ms\":{connect_ms},\"elapsed_ms\":{},\"done_ms\":{}}}",
        flowing.elapsed().as_millis(),
        unix_ms()
    ))
}
