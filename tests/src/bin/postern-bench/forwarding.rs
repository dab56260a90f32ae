//! Row 4 of issue 7: delivery throughput to the app through Postern's nftables ruleset
//! with 100,000 pinholes installed versus an (almost) empty set, and the time to install
//! 100,000 pinholes.
//!
//! Owns: Postern's dark table `inet postern` in the lab's gateway namespace, installed and
//! filled through `postern_firewall::Firewall` (the gateway's own API and netlink socket)
//! on a thread that entered that namespace, an `iperf3 -s -1` in the gateway namespace and
//! `iperf3 -c` in the client namespace. The 100,000 extra pinholes are for addresses in
//! 10.203.0.0/15 that exist nowhere (set elements only, no traffic). Must not touch:
//! anything outside the lab. Every loop is bounded in count and time.

use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use postern_e2e::{run_in, Lab};
use postern_firewall::{AppProto, Firewall, FirewallConfig, Pinhole, SessionId};

const IPERF_PORT: u16 = 5201;
const PINHOLE_TTL: Duration = Duration::from_secs(1800);
const SESSION_TTL: Duration = Duration::from_secs(3600);

#[derive(Debug, Default)]
pub struct ForwardResult {
    /// Gbit/s received by the app per round: 1 pinhole, `pinholes` + 1.
    pub empty: Vec<f64>,
    pub full: Vec<f64>,
    pub pinholes: usize,
    /// Seconds to install the pinholes, per round.
    pub install_secs: Vec<f64>,
}

fn pinhole(addr: Ipv4Addr, session: u32) -> Pinhole {
    Pinhole {
        addr: IpAddr::V4(addr),
        proto: AppProto::Tcp,
        port: IPERF_PORT,
        session: SessionId(session),
        forward: None,
    }
}

/// One `iperf3` TCP transfer of `secs` seconds from the client namespace; Gbit/s received.
fn iperf(lab: &Lab, secs: u64) -> f64 {
    let log = std::env::temp_dir().join(format!("pst-bench-iperf3-{}.log", std::process::id()));
    let mut guard = lab.spawn_logged(&lab.gateway, &server_cmd(), &log, &log);
    // Wait until the server listens (bounded).
    let up = postern_e2e::poll(Duration::from_secs(5), Duration::from_millis(20), || {
        let out = crate::sh(lab, true, &["ss", "-ltn"]);
        String::from_utf8_lossy(&out.stdout)
            .contains(&format!(":{IPERF_PORT}"))
            .then_some(())
    });
    assert!(up.is_some(), "iperf3 server did not listen within 5 s");
    let out = crate::sh(
        lab,
        false,
        &[
            "timeout",
            &(secs + 15).to_string(),
            "iperf3",
            "-c",
            &lab.gateway_v4.to_string(),
            "-p",
            &IPERF_PORT.to_string(),
            "-t",
            &secs.to_string(),
            "-J",
        ],
    );
    guard.terminate(Duration::from_secs(2));
    let _ = std::fs::remove_file(&log);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    let bps = v["end"]["sum_received"]["bits_per_second"].as_f64();
    match bps {
        Some(b) => b / 1e9,
        None => {
            eprintln!(
                "iperf3 gave no result: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            f64::NAN
        }
    }
}

fn server_cmd() -> std::process::Command {
    let mut c = std::process::Command::new("iperf3");
    c.args(["-s", "-1", "-p", &IPERF_PORT.to_string()]);
    c
}

/// Installs postern's table in the gateway namespace (from a thread inside it) with only
/// the client's pinhole; the firewall's netlink socket stays bound to that namespace.
fn fresh_table(lab: &Lab) -> Firewall {
    let mut fw = run_in(lab.gateway.name(), || {
        Firewall::install(&FirewallConfig::default()).expect("install postern's table")
    });
    fw.open(&pinhole(lab.client_v4, 1), PINHOLE_TTL, SESSION_TTL)
        .expect("open the client's pinhole");
    fw
}

/// Median of the finite values.
pub fn median(v: &[f64]) -> f64 {
    let mut v: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Measures iperf3 through the ruleset with 1 and `count` + 1 pinholes, alternating
/// `rounds` times (a fresh table each time: `Firewall::flush` of 100,000 sessions deletes
/// conntrack entries per session and takes about a minute).
pub fn forwarding(lab: &Lab, count: usize, secs: u64, rounds: usize) -> ForwardResult {
    let mut r = ForwardResult {
        pinholes: count,
        ..ForwardResult::default()
    };
    let first = u32::from(Ipv4Addr::new(10, 203, 0, 1));
    for round in 0..rounds {
        let mut fw = fresh_table(lab);
        let empty = iperf(lab, secs);
        eprintln!("(4) round {round}: iperf3, 1 pinhole: {empty:.2} Gbit/s");
        r.empty.push(empty);
        let t0 = Instant::now();
        for i in 0..count {
            if t0.elapsed() > Duration::from_secs(300) {
                eprintln!("(4) install stopped after {i} pinholes (300 s bound)");
                r.pinholes = i;
                break;
            }
            let addr = Ipv4Addr::from(first + i as u32);
            fw.open(&pinhole(addr, 2 + i as u32), PINHOLE_TTL, SESSION_TTL)
                .unwrap_or_else(|e| panic!("pinhole {i} ({addr}): {e}"));
        }
        let took = t0.elapsed().as_secs_f64();
        r.install_secs.push(took);
        eprintln!(
            "(4) round {round}: {} pinholes installed in {took:.2} s ({:.1} µs each)",
            r.pinholes,
            took * 1e6 / r.pinholes.max(1) as f64
        );
        let full = iperf(lab, secs);
        eprintln!(
            "(4) round {round}: iperf3, {} + 1 pinholes: {full:.2} Gbit/s",
            r.pinholes
        );
        r.full.push(full);
        drop(fw);
    }
    run_in(lab.gateway.name(), || {
        Firewall::uninstall("postern").expect("remove postern's table")
    });
    r
}
