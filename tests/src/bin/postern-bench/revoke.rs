//! Row 5 of issue 7: revoke → live flow dead, p50/p99 over many trials.
//!
//! Owns: one gateway per capture mode in the lab's gateway namespace, `trials` devices it
//! enrolls (`rv-<mode>-<n>`) and revokes one per trial with the real
//! `postern-controller device revoke`, and one TCP flow per trial from the client namespace
//! to the lab's echo server carrying an echo every 10 ms. Must not touch: other devices,
//! anything outside the lab. Every loop is bounded in count and time.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, SocketAddrV4, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use postern_e2e::{run_in, Capture, Controller, Gateway, InProcessDevice, Lab};

use crate::{sealed, Samples, APP_PORT, SPA_PORT, USER};

/// Gap between two echoes on the live flow.
const ECHO_EVERY: Duration = Duration::from_millis(10);
/// An echo not answered within this long counts as failed (the flow is dead).
const ECHO_WAIT: Duration = Duration::from_millis(100);
/// A flow still alive this long after the revoke counts as a failed trial.
const DEAD_WITHIN: Duration = Duration::from_secs(3);
/// Whole phase budget per mode.
const PHASE_BUDGET: Duration = Duration::from_secs(180);

/// One echo on `stream`: writes 8 bytes, expects them back within `ECHO_WAIT`.
fn echo_once(stream: &mut TcpStream, seq: u64) -> bool {
    let msg = seq.to_be_bytes();
    if stream.write_all(&msg).is_err() {
        return false;
    }
    let mut buf = [0u8; 8];
    stream.read_exact(&mut buf).is_ok() && buf == msg
}

/// Runs `trials` revocations; each sample is the time from the start of
/// `postern-controller device revoke` to the send time of the first echo that got no
/// answer (resolution: one echo period, 10 ms). Also returns how long the command itself
/// took (start to exit), and when the gateway's audit log shows the snapshot loaded and
/// the session closed (ms after the command's start).
pub fn revoke_flow_dead(
    lab: &Lab,
    ctl: &Controller,
    mode: Capture,
    trials: usize,
) -> RevokeSamples {
    let devs: Vec<InProcessDevice> = (0..trials)
        .map(|i| InProcessDevice::random(&format!("rv-{}-{i}", mode.as_str())))
        .collect();
    for d in &devs {
        ctl.add_device(&d.name, USER, &d.public_text());
    }
    let mut gw = Gateway::start(lab, ctl, crate::one_device_options(mode));
    let app = SocketAddrV4::new(lab.gateway_v4, APP_PORT);
    let spa = SocketAddr::new(IpAddr::V4(lab.gateway_v4), SPA_PORT);
    let mut s = Samples::default();
    let mut cli = Samples::default();
    let mut synced = Samples::default();
    let mut closed = Samples::default();
    let budget = Instant::now() + PHASE_BUDGET;
    for dev in &devs {
        if Instant::now() > budget {
            eprintln!(
                "revoke: phase budget spent after {} trials",
                s.ms.len() + s.failed
            );
            break;
        }
        let dgram = sealed(dev, &gw.public_key, lab.client_v4);
        let stream = run_in(lab.client.name(), || {
            let sock = UdpSocket::bind("0.0.0.0:0").expect("udp bind");
            sock.send_to(&dgram, spa).expect("send knock");
            let t0 = Instant::now();
            loop {
                match TcpStream::connect_timeout(&SocketAddr::V4(app), Duration::from_millis(50)) {
                    Ok(st) => break Some(st),
                    Err(_) if t0.elapsed() > Duration::from_secs(2) => break None,
                    Err(_) => {}
                }
            }
        });
        let Some(mut stream) = stream else {
            eprintln!("revoke: {} could not connect after its knock", dev.name);
            s.failed += 1;
            continue;
        };
        stream.set_nodelay(true).expect("TCP_NODELAY");
        stream
            .set_read_timeout(Some(ECHO_WAIT))
            .expect("read timeout");
        stream
            .set_write_timeout(Some(ECHO_WAIT))
            .expect("write timeout");
        // The echo thread: one echo every 10 ms until one fails or the bound passes;
        // returns the send time of the failed echo.
        let revoked_at = std::sync::Arc::new(std::sync::OnceLock::<Instant>::new());
        let seen = revoked_at.clone();
        let echo = std::thread::spawn(move || -> (bool, Option<Instant>) {
            let start = Instant::now();
            let mut live_before = false;
            let mut seq = 0u64;
            while start.elapsed() < DEAD_WITHIN + Duration::from_secs(2) {
                seq += 1;
                let sent = Instant::now();
                if !echo_once(&mut stream, seq) {
                    return (live_before, Some(sent));
                }
                if seen.get().is_none() {
                    live_before = true;
                } else if seen.get().is_some_and(|t| t.elapsed() > DEAD_WITHIN) {
                    return (live_before, None);
                }
                let next = sent + ECHO_EVERY;
                if let Some(wait) = next.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
            }
            (live_before, None)
        });
        // Let the flow carry a few echoes first.
        std::thread::sleep(Duration::from_millis(50));
        let revision = gw.synced_revision().unwrap_or(0);
        let t0 = Instant::now();
        let t0_unix_ms = postern_e2e::unix_ms();
        let _ = revoked_at.set(t0);
        ctl.revoke(&dev.name);
        cli.ms.push(t0.elapsed().as_secs_f64() * 1e3);
        let (was_live, dead) = echo.join().expect("echo thread");
        match dead {
            Some(at) if was_live && at >= t0 => s.ms.push((at - t0).as_secs_f64() * 1e3),
            _ => {
                eprintln!(
                    "revoke: trial {} failed (flow live before: {was_live}, died: {})",
                    dev.name,
                    dead.is_some()
                );
                s.failed += 1;
            }
        }
        // The next trial starts from a settled gateway.
        let new_rev = gw.wait_sync_after(revision, Duration::from_secs(5));
        // Where the time went, from the gateway's audit clock (ms resolution): the sync
        // thread loaded the snapshot, then the main loop closed the session.
        let since = |event: &str| {
            gw.audit_events(event)
                .iter()
                .filter(|v| v["revision"].as_u64() == Some(new_rev))
                .filter_map(|v| v["ts_ms"].as_u64())
                .min()
                .map(|ts| ts.saturating_sub(t0_unix_ms) as f64)
        };
        if let Some(ms) = since("sync") {
            synced.ms.push(ms);
        }
        let closed_at = postern_e2e::poll(Duration::from_secs(2), Duration::from_millis(5), || {
            since("session_closed")
        });
        if let Some(ms) = closed_at {
            closed.ms.push(ms);
        }
    }
    gw.check_alive();
    gw.stop(Duration::from_secs(5));
    crate::drop_postern_table(lab);
    RevokeSamples {
        dead: s,
        command: cli,
        synced,
        closed,
    }
}

/// Per-trial times of the revoke phase, all from the start of `device revoke`.
pub struct RevokeSamples {
    /// To the first failed echo.
    pub dead: Samples,
    /// To the command's exit.
    pub command: Samples,
    /// To the gateway's `sync` audit line for the new revision.
    pub synced: Samples,
    /// To the gateway's `session_closed` audit line.
    pub closed: Samples,
}
