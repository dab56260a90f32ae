//! fwknop's rows 2 and 3 of issue 7: sustained distinct valid knocks per second, alone and
//! under the same garbage flood Postern gets.
//!
//! Owns: an fwknopd in UDP-server mode (set up by `fwknop_setup`), SPA packets the real
//! `fwknop` client builds without sending them (`--test -B FILE -b`, several clients in
//! parallel, before the measured window), and the datagrams that replay each packet once
//! from the lab's client namespace at the offered rate. Counts fwknopd's "Added access rule"
//! and "rule_exists() Rule ... already exists" log lines (one per packet that passed
//! decryption, HMAC, digest cache and access checks and reached the firewall step). Must not touch: anything outside the lab. Every loop is bounded
//! in count and time.

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use postern_e2e::{run_in, Lab};

use crate::{flood_loop, fwknop_client, fwknop_setup, fwknop_teardown, SPA_PORT};

/// How many `fwknop --test` clients build packets at once (each mostly waits).
const BUILDERS: usize = 16;

/// (offered/s, served/s, fraction served, flood pps reached).
pub fn fwknop_sustained(lab: &Lab, rate: usize, secs: u64, flood_pps: u64) -> (f64, f64, f64, f64) {
    let f = fwknop_setup(lab, true);
    let total = rate * secs as usize;
    let t0 = Instant::now();
    let per = total.div_ceil(BUILDERS);
    let packets: Vec<Vec<u8>> = std::thread::scope(|sc| {
        let handles: Vec<_> = (0..BUILDERS)
            .map(|w| {
                let f = &f;
                sc.spawn(move || {
                    let file = f.dir.path().join(format!("spa-{w}.txt"));
                    for _ in 0..per {
                        let out = fwknop_client(lab, f)
                            .arg("--test")
                            .arg("-B")
                            .arg(&file)
                            .arg("-b")
                            .output()
                            .expect("run fwknop --test");
                        assert!(
                            out.status.success(),
                            "fwknop --test failed: {}",
                            String::from_utf8_lossy(&out.stderr)
                        );
                    }
                    std::fs::read_to_string(&file)
                        .unwrap_or_default()
                        .lines()
                        .map(|l| l.trim().as_bytes().to_vec())
                        .filter(|l| !l.is_empty())
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("builder thread"))
            .take(total)
            .collect()
    });
    eprintln!(
        "fwknop: built {} SPA packets in {:.1} s",
        packets.len(),
        t0.elapsed().as_secs_f64()
    );
    let log = f.dir.path().join("fwknopd.log");
    let before = served(&log);
    let spa = SocketAddr::new(IpAddr::V4(lab.gateway_v4), SPA_PORT);
    let stop = Arc::new(AtomicBool::new(false));
    let flood = (flood_pps > 0).then(|| {
        let stop = stop.clone();
        postern_e2e::netns::spawn_in_thread(lab.client.name(), move || {
            flood_loop(spa, flood_pps, secs + 1, &stop)
        })
    });
    let sent = run_in(lab.client.name(), || {
        let sock = UdpSocket::bind("0.0.0.0:0").expect("udp bind");
        sock.connect(spa).expect("udp connect");
        let t0 = Instant::now();
        let mut sent = 0usize;
        for p in &packets {
            let due = Duration::from_secs_f64(sent as f64 / rate as f64);
            if let Some(wait) = due.checked_sub(t0.elapsed()) {
                std::thread::sleep(wait);
            }
            if sock.send(p).is_ok() {
                sent += 1;
            }
            if t0.elapsed() > Duration::from_secs(secs + 5) {
                break;
            }
        }
        sent
    });
    stop.store(true, Ordering::Relaxed);
    let flood_rate = flood.map_or(0.0, |h| h.join().expect("flood thread"));
    // Let fwknopd drain its queue for 2 s, the same as Postern's rows.
    std::thread::sleep(Duration::from_secs(2));
    let ok = served(&log) - before;
    if std::env::var_os("PB_DEBUG").is_some() {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        eprintln!("decoded: {}", text.matches("SPA Decode (res=0)").count());
        for l in text
            .lines()
            .filter(|l| l.contains("Added") || l.starts_with("rule_exists() Rule"))
            .take(5)
        {
            eprintln!("{l}");
        }
    }
    if ok == 0 {
        eprintln!(
            "fwknop served no knock; fwknopd log tail:\n{}",
            tail(&std::fs::read_to_string(&log).unwrap_or_default(), 30)
        );
    }
    fwknop_teardown(lab, f);
    (
        sent as f64 / secs as f64,
        ok as f64 / secs as f64,
        ok as f64 / sent.max(1) as f64,
        flood_rate,
    )
}

fn served(log: &std::path::Path) -> usize {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| {
            l.contains("Added access rule")
                || (l.starts_with("rule_exists() Rule") && l.contains("already exists"))
        })
        .count()
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
