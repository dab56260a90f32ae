//! The third host of the lab for forward mode: an internal app host behind the gateway.
//!
//! Owns: one namespace `pst-<pid>-f<n>-i` joined to the lab's gateway namespace by a veth
//! pair (`pst-i` on the gateway, 10.250.0.1/24 + fd25::1/64; `pst-a` on the internal host,
//! 10.250.0.2/24 + fd25::2/64), and the client's route to that network through the gateway
//! (so tests can prove the client cannot reach it directly). The internal host gets no
//! route back to the client unless [`InternalHost::add_route_back`] is called. Deleted on
//! drop, also on panic. Must not touch: the root namespace, the lab's own addresses, or the
//! gateway's sysctls (forwarding is the gateway daemon's to switch on).

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::lab::{poll, run_ok, Lab, Netns};
use crate::netns;

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// Veth end in the gateway namespace.
pub const GATEWAY_INNER_IF: &str = "pst-i";
/// Veth end in the internal host's namespace.
pub const INTERNAL_IF: &str = "pst-a";

/// An internal host behind the lab's gateway.
#[derive(Debug)]
pub struct InternalHost {
    pub ns: Netns,
    /// The gateway's address on the internal network.
    pub gateway_inner_v4: Ipv4Addr,
    pub gateway_inner_v6: Ipv6Addr,
    /// The internal host's address.
    pub v4: Ipv4Addr,
    pub v6: Ipv6Addr,
}

impl InternalHost {
    /// Creates the internal host, links it to `lab.gateway`, and routes the client's
    /// traffic for the internal network through the gateway.
    pub fn attach(lab: &Lab) -> InternalHost {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let ns = Netns::create(&format!("pst-{}-f{n}-i", std::process::id()));
        let host = InternalHost {
            ns,
            gateway_inner_v4: Ipv4Addr::new(10, 250, 0, 1),
            gateway_inner_v6: "fd25::1".parse().expect("literal"),
            v4: Ipv4Addr::new(10, 250, 0, 2),
            v6: "fd25::2".parse().expect("literal"),
        };
        run_ok(Command::new("ip").args([
            "link",
            "add",
            GATEWAY_INNER_IF,
            "netns",
            lab.gateway.name(),
            "type",
            "veth",
            "peer",
            "name",
            INTERNAL_IF,
            "netns",
            host.ns.name(),
        ]));
        for (ns, ifname, v4, v6) in [
            (
                &lab.gateway,
                GATEWAY_INNER_IF,
                host.gateway_inner_v4,
                host.gateway_inner_v6,
            ),
            (&host.ns, INTERNAL_IF, host.v4, host.v6),
        ] {
            ns.ip(&["link", "set", "lo", "up"]);
            ns.ip(&["addr", "add", &format!("{v4}/24"), "dev", ifname]);
            ns.ip(&[
                "-6",
                "addr",
                "add",
                &format!("{v6}/64"),
                "dev",
                ifname,
                "nodad",
            ]);
            ns.ip(&["link", "set", ifname, "up"]);
        }
        lab.client.ip(&[
            "route",
            "add",
            "10.250.0.0/24",
            "via",
            &lab.gateway_v4.to_string(),
        ]);
        lab.client.ip(&[
            "-6",
            "route",
            "add",
            "fd25::/64",
            "via",
            &lab.gateway_v6.to_string(),
        ]);
        for (ns, ifname) in [(&lab.gateway, GATEWAY_INNER_IF), (&host.ns, INTERNAL_IF)] {
            let up = poll(Duration::from_secs(5), Duration::from_millis(5), || {
                ns.ip(&["-o", "link", "show", "dev", ifname])
                    .contains("state UP")
                    .then_some(())
            });
            if up.is_none() {
                panic!("veth {ifname} in {} did not come up within 5 s", ns.name());
            }
        }
        host
    }

    /// Gives the internal host a route back to the client network through the gateway
    /// (only needed with `forward_snat = false`).
    pub fn add_route_back(&self, lab: &Lab) {
        self.ns.ip(&[
            "route",
            "add",
            &format!("{}/24", lab.client_v4),
            "via",
            &self.gateway_inner_v4.to_string(),
        ]);
    }

    /// Binds a TCP listener on the internal host (the test accepts on it itself).
    pub fn listen(&self, addr: SocketAddr) -> TcpListener {
        netns::run_in(self.ns.name(), || {
            TcpListener::bind(addr).unwrap_or_else(|e| panic!("internal host: bind {addr}: {e}"))
        })
    }
}

/// Accepts one connection on `listener` within `timeout`, or None.
pub fn accept_within(listener: &TcpListener, timeout: Duration) -> Option<(TcpStream, SocketAddr)> {
    listener.set_nonblocking(true).ok()?;
    let deadline = Instant::now() + timeout;
    loop {
        match listener.accept() {
            Ok((s, peer)) => {
                s.set_nonblocking(false).ok()?;
                return Some((s, peer));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    return None;
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(_) => return None,
        }
    }
}

/// A sysctl of `ns`, read through `ip netns exec` (e.g. `net.ipv4.ip_forward`).
pub fn sysctl(ns: &Netns, key: &str) -> String {
    run_ok(Command::new("ip").args(["netns", "exec", ns.name(), "sysctl", "-n", key]))
        .trim()
        .to_owned()
}
