//! Postern's firewall: one nftables table, sessions and pinholes with kernel
//! timeouts, and conntrack cleanup.
//!
//! Owns: the public API ([`Firewall`], [`FirewallConfig`], [`Pinhole`],
//! [`SessionId`], [`LivePinhole`], [`AppProto`]) and the in-memory record of
//! which pinholes belong to which session.
//! Must not touch: any nftables table but `inet <table>`, conntrack entries
//! whose mark is not one of our sessions, the host's own traffic.
//!
//! Mechanism (DESIGN §4): `install` writes the dark ruleset with `nft -f -`;
//! the hot path (`open`, `close_session`, `list`, `flush`) uses ONE long-lived
//! `NETLINK_NETFILTER` socket (see [`netlink`](crate::netlink)).
//!
//! Network namespaces: the socket is bound to the namespace of the thread that
//! calls [`Firewall::install`], and `nft` runs as a child of the thread that
//! calls `install`/`uninstall`, so it sees that thread's namespace too. A
//! caller (the tests) that enters a namespace with `setns` on a dedicated
//! thread and calls `install`/`uninstall` from it gets everything there.
//!
//! Renewal: on kernels >= 6.10 a NEWSETELEM without `NLM_F_EXCL` for an
//! existing element with identical data updates it in place, but only the
//! attributes it carries: with the timeout alone an unchanged timeout is a
//! no-op (measured: the countdown kept running), so every add also sends
//! `NFTA_SET_ELEM_EXPIRATION` = timeout, which restarts the countdown. `open`
//! is one batch of two NEWSETELEMs. A pinhole that must move to
//! another session is destroyed first (DESTROYSETELEM, kernel >= 6.3) in the
//! same batch.
//!
//! Kernel requirements: nftables with per-element timeouts; renewal needs
//! kernel 6.10 or later (timeout/expiration update of an existing element), pinhole
//! takeover needs 6.3 or later (DESTROYSETELEM), the conntrack flush by mark needs
//! CONFIG_NF_CONNTRACK_MARK. Measured on 6.18.
//!
//! Reads on the netlink socket block until the kernel answers every request
//! (it always answers a message flagged NLM_F_ACK); there is no read timeout.

mod conntrack;
mod elements;
mod error;
mod netlink;
pub mod ruleset;

use std::{
    collections::HashMap,
    fmt,
    net::{IpAddr, SocketAddr},
    str::FromStr,
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

pub use crate::elements::{MARK_TAG, MARK_TAG_MASK, MAX_SESSION_ID};
pub use crate::error::{errno_name, FirewallError};
use crate::{
    netlink::{ElemOp, NfSocket},
    ruleset::{FORWARDS4, FORWARDS6, PINHOLES4, PINHOLES6, SESSIONS},
};

/// Validates an `open` request; the two timeouts in ms.
fn check_open(
    p: &Pinhole,
    pinhole_ttl: Duration,
    session_ttl: Duration,
) -> Result<(u64, u64), FirewallError> {
    if p.session.0 == 0 || p.session.0 > elements::MAX_SESSION_ID {
        return Err(FirewallError::Invalid(format!(
            "session id {}: use 1..={} (the conntrack mark's top byte is Postern's tag)",
            p.session.0,
            elements::MAX_SESSION_ID
        )));
    }
    if let Some(target) = p.forward {
        check_forward(p.addr, target)?;
    }
    Ok((
        ttl_ms(pinhole_ttl, "pinhole")?,
        ttl_ms(session_ttl, "session")?,
    ))
}

/// Which existing elements of the same key an `open` destroys first.
#[derive(Debug, Clone, Copy, Default)]
struct Replace {
    /// The pinhole (it belongs to another session).
    pinhole: bool,
    /// The forward element (another target, or an owner we did not know about).
    forward: bool,
}

/// The element operations of one `open`: the session element, the removals `replace`
/// asks for, the forward element, the pinhole element.
/// Written into `ops` (cleared first): the firewall reuses one vector for every open.
fn open_ops(
    p: &Pinhole,
    pin_ms: u64,
    ses_ms: u64,
    replace: Replace,
    ops: &mut Vec<(&'static str, ElemOp)>,
) {
    let (map, key) = elements::pinhole_key(p.addr, p.proto, p.port);
    let mark = elements::session_key(p.session.0);
    let fwd_map = elements::forward_map(p.addr);
    ops.clear();
    ops.push((
        SESSIONS,
        ElemOp::Add {
            key: mark,
            data: None,
            timeout_ms: ses_ms,
        },
    ));
    if replace.pinhole {
        ops.push((map, ElemOp::Destroy { key }));
    }
    if replace.forward {
        ops.push((fwd_map, ElemOp::Destroy { key }));
    }
    // The forward element goes in before the pinhole: a connection the
    // pinhole admits is always DNATed, never delivered to this host.
    if let Some(target) = p.forward {
        ops.push((
            fwd_map,
            ElemOp::Add {
                key,
                data: Some(elements::forward_data(target)),
                timeout_ms: pin_ms,
            },
        ));
    }
    ops.push((
        map,
        ElemOp::Add {
            key,
            data: Some(mark),
            timeout_ms: pin_ms,
        },
    ));
}

/// The exact netlink bytes [`Firewall::open`] sends for a pinhole this process does not
/// hold yet: one transaction (BATCH_BEGIN, the session element, the forward element when
/// there is one, the pinhole element, BATCH_END) on `inet <table>`. Pure: no socket, no
/// kernel; for benchmarks (`firewall/benches/encode.rs`) and tests.
pub fn encode_open_batch(
    table: &str,
    p: &Pinhole,
    pinhole_ttl: Duration,
    session_ttl: Duration,
) -> Result<Vec<u8>, FirewallError> {
    let (pin_ms, ses_ms) = check_open(p, pinhole_ttl, session_ttl)?;
    let mut ops = Vec::with_capacity(5);
    open_ops(p, pin_ms, ses_ms, Replace::default(), &mut ops);
    let mut seq = 0;
    Ok(netlink::encode_batch(table, &ops, &mut seq).bytes)
}

/// Transport protocol of an app / pinhole.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AppProto {
    /// TCP (6).
    Tcp,
    /// UDP (17).
    Udp,
}

impl AppProto {
    /// IP protocol number.
    pub fn number(self) -> u8 {
        match self {
            AppProto::Tcp => 6,
            AppProto::Udp => 17,
        }
    }

    /// From an IP protocol number (6 or 17).
    pub fn from_number(n: u8) -> Option<Self> {
        match n {
            6 => Some(AppProto::Tcp),
            17 => Some(AppProto::Udp),
            _ => None,
        }
    }

    /// `"tcp"` or `"udp"` (also the nft keyword).
    pub fn name(self) -> &'static str {
        match self {
            AppProto::Tcp => "tcp",
            AppProto::Udp => "udp",
        }
    }
}

impl fmt::Display for AppProto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for AppProto {
    type Err = FirewallError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "tcp" => Ok(AppProto::Tcp),
            "udp" => Ok(AppProto::Udp),
            _ => Err(FirewallError::Invalid(format!(
                "protocol {s:?}: expected tcp or udp"
            ))),
        }
    }
}

/// A session id, 1..=[`MAX_SESSION_ID`] (24 bits): the conntrack mark of the session's
/// flows is the id with Postern's tag ([`MARK_TAG`]) in the top byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SessionId(pub u32);

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Ruleset parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FirewallConfig {
    /// Name of the `inet` table postern owns (default `"postern"`).
    pub table: String,
    /// Ports left reachable without a knock (e.g. ssh for admins).
    pub open_ports: Vec<(AppProto, u16)>,
    /// Forward mode: masquerade forwarded session flows behind this host's
    /// address on the internal side, so internal apps need no route back to
    /// clients (default true).
    pub forward_snat: bool,
}

impl Default for FirewallConfig {
    fn default() -> Self {
        FirewallConfig {
            table: "postern".to_owned(),
            open_ports: Vec::new(),
            forward_snat: true,
        }
    }
}

/// A door to open: new connections from `addr` to `proto`/`port` are admitted
/// and stamped with `session`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Pinhole {
    /// Client address (source of the new connections).
    pub addr: IpAddr,
    /// Transport protocol.
    pub proto: AppProto,
    /// Destination port on this host.
    pub port: u16,
    /// Session the admitted flows belong to.
    pub session: SessionId,
    /// Forward mode: the admitted connections are DNATed to this internal
    /// address and port instead of reaching `port` on this host. Its address
    /// family must be the client's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forward: Option<SocketAddr>,
}

/// A pinhole as the kernel holds it right now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LivePinhole {
    /// Client address.
    pub addr: IpAddr,
    /// Transport protocol.
    pub proto: AppProto,
    /// Destination port.
    pub port: u16,
    /// Session (conntrack mark) the pinhole stamps.
    pub session: SessionId,
    /// Forward target, when the pinhole forwards (read from the forward map).
    pub forward: Option<SocketAddr>,
    /// Time left before the kernel removes it.
    pub expires_in: Duration,
}

type PinKey = (IpAddr, AppProto, u16);

/// Postern's table and the one netlink socket that edits it.
#[derive(Debug)]
pub struct Firewall {
    table: String,
    sock: NfSocket,
    /// Sessions we added, with the expiry we asked for.
    sessions: HashMap<SessionId, Instant>,
    /// Pinholes we added: owner session, expiry and forward target.
    pinholes: HashMap<PinKey, (SessionId, Instant, Option<SocketAddr>)>,
    opens: u64,
    /// The element operations of the last open, reused (no allocation per open).
    ops: Vec<(&'static str, ElemOp)>,
}

/// Prune the in-memory maps of expired entries every this many opens.
const PRUNE_EVERY: u64 = 1024;

fn ttl_ms(ttl: Duration, what: &str) -> Result<u64, FirewallError> {
    let ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
    // A zero timeout would mean "never expires" to the kernel: refuse it.
    if ms == 0 {
        return Err(FirewallError::Invalid(format!(
            "{what} ttl {ttl:?}: must be at least 1 ms"
        )));
    }
    // Kernel limit: the timeout in jiffies must fit; ~49 days is far beyond use.
    if ms > u64::from(u32::MAX) {
        return Err(FirewallError::Invalid(format!(
            "{what} ttl {ttl:?}: at most {} ms",
            u32::MAX
        )));
    }
    Ok(ms)
}

/// A forward target must be a usable unicast address of the client's family
/// (nftables cannot DNAT across families) with a nonzero port.
fn check_forward(client: IpAddr, target: SocketAddr) -> Result<(), FirewallError> {
    let ip = target.ip();
    if client.is_ipv4() != ip.is_ipv4() {
        return Err(FirewallError::Invalid(format!(
            "forward target {target} is not of the client's address family ({client}): \
             give the app a forward target of each family its clients knock from"
        )));
    }
    if target.port() == 0 || ip.is_unspecified() || ip.is_multicast() || ip.is_loopback() {
        return Err(FirewallError::Invalid(format!(
            "forward target {target}: use a unicast, non-loopback address and a port 1-65535"
        )));
    }
    Ok(())
}

impl Firewall {
    /// Atomically (re)creates `table inet <table>` with the dark ruleset and
    /// opens the netlink socket. Elements of a previous run are dropped and the
    /// conntrack entries of their sessions deleted. Touches no other table.
    pub fn install(cfg: &FirewallConfig) -> Result<Firewall, FirewallError> {
        let script = ruleset::render(cfg)?;
        let mut sock = NfSocket::open()?;
        // Sessions of a previous run: their flows die with the new table, so
        // free their conntrack entries too.
        let old_marks: Vec<u32> = match sock.dump_set(&cfg.table, SESSIONS) {
            Ok(elems) => elems
                .iter()
                .filter_map(|e| elements::decode_mark(&e.key))
                .collect(),
            Err(_) => Vec::new(),
        };
        ruleset::run_nft(&script, &cfg.table, "installing")?;
        for mark in old_marks {
            conntrack::delete_by_mark(&mut sock, mark)?;
        }
        Ok(Firewall {
            table: cfg.table.clone(),
            sock,
            sessions: HashMap::new(),
            pinholes: HashMap::new(),
            opens: 0,
            ops: Vec::with_capacity(5),
        })
    }

    /// Name of the table this firewall drives.
    pub fn table(&self) -> &str {
        &self.table
    }

    /// Adds or renews the session element and the pinhole element in ONE
    /// netlink batch; both timeouts restart from now. Every ack is checked.
    pub fn open(
        &mut self,
        p: &Pinhole,
        pinhole_ttl: Duration,
        session_ttl: Duration,
    ) -> Result<(), FirewallError> {
        let (pin_ms, ses_ms) = check_open(p, pinhole_ttl, session_ttl)?;
        let now = Instant::now();
        let pk: PinKey = (p.addr, p.proto, p.port);
        // Same key, other mark (or other forward target): the kernel would
        // answer EEXIST; replace it.
        let known = self.pinholes.get(&pk);
        let replace = Replace {
            pinhole: matches!(known, Some((s, _, _)) if *s != p.session),
            forward: matches!(known, Some((_, _, Some(old))) if p.forward != Some(*old)),
        };
        open_ops(p, pin_ms, ses_ms, replace, &mut self.ops);
        match self.sock.batch(&self.table, &self.ops) {
            Ok(()) => {}
            // A pinhole or forward of another owner we did not know about
            // (previous run, other process): destroy and add again, once.
            Err(FirewallError::Kernel { errno, .. }) if errno == libc::EEXIST => {
                let both = Replace {
                    pinhole: true,
                    forward: true,
                };
                open_ops(p, pin_ms, ses_ms, both, &mut self.ops);
                self.sock.batch(&self.table, &self.ops)?;
            }
            Err(e) => return Err(e),
        }
        self.sessions
            .insert(p.session, now + Duration::from_millis(ses_ms));
        self.pinholes.insert(
            pk,
            (p.session, now + Duration::from_millis(pin_ms), p.forward),
        );
        self.opens += 1;
        if self.opens.is_multiple_of(PRUNE_EVERY) {
            self.sessions.retain(|_, exp| *exp > now);
            self.pinholes.retain(|_, (_, exp, _)| *exp > now);
        }
        Ok(())
    }

    /// Removes the session element and all its pinholes (one batch), then
    /// deletes the conntrack entries whose mark is the session id. Established
    /// flows stop at the first packet after the batch; a reply from the app
    /// cannot revive them (output chain guard). Unknown sessions are fine.
    pub fn close_session(&mut self, session: SessionId) -> Result<(), FirewallError> {
        let mut ops: Vec<(&str, ElemOp)> = vec![(
            SESSIONS,
            ElemOp::Destroy {
                key: elements::session_key(session.0),
            },
        )];
        let mine: Vec<PinKey> = self
            .pinholes
            .iter()
            .filter(|(_, (s, _, _))| *s == session)
            .map(|(k, _)| *k)
            .collect();
        for (addr, proto, port) in &mine {
            let (map, key) = elements::pinhole_key(*addr, *proto, *port);
            // Forward or not, the forward element goes too (a missing one is fine).
            let fwd = elements::forward_map(*addr);
            ops.push((fwd, ElemOp::Destroy { key }));
            ops.push((map, ElemOp::Destroy { key }));
        }
        self.sock.batch(&self.table, &ops)?;
        self.sessions.remove(&session);
        for k in &mine {
            self.pinholes.remove(k);
        }
        conntrack::delete_by_mark(&mut self.sock, session.0)
    }

    /// Reads back every live pinhole from the kernel (netlink dump; millisecond
    /// precision), with its forward target if it has one.
    pub fn list(&mut self) -> Result<Vec<LivePinhole>, FirewallError> {
        let mut out = Vec::new();
        for (map, fwd_map) in [(PINHOLES4, FORWARDS4), (PINHOLES6, FORWARDS6)] {
            let mut forwards = HashMap::new();
            for e in self.sock.dump_set(&self.table, fwd_map)? {
                if let Some(target) = e.data.as_deref().and_then(elements::decode_forward) {
                    forwards.insert(e.key, target);
                }
            }
            for e in self.sock.dump_set(&self.table, map)? {
                let decoded = elements::decode_pinhole(&e.key);
                let mark = e.data.as_deref().and_then(elements::decode_mark);
                let (Some((addr, proto, port)), Some(mark)) = (decoded, mark) else {
                    return Err(FirewallError::Protocol {
                        what: format!("listing map {map} of table inet {}", self.table),
                        detail: format!("undecodable element key {:02x?}", e.key),
                    });
                };
                out.push(LivePinhole {
                    addr,
                    proto,
                    port,
                    session: SessionId(mark),
                    forward: forwards.get(&e.key).copied(),
                    expires_in: Duration::from_millis(
                        e.expiration_ms.or(e.timeout_ms).unwrap_or(0),
                    ),
                });
            }
        }
        Ok(out)
    }

    /// Live session ids and their remaining time, read from the kernel.
    pub fn list_sessions(&mut self) -> Result<Vec<(SessionId, Duration)>, FirewallError> {
        Ok(self
            .sock
            .dump_set(&self.table, SESSIONS)?
            .iter()
            .filter_map(|e| {
                let m = elements::decode_mark(&e.key)?;
                let left = e.expiration_ms.or(e.timeout_ms).unwrap_or(0);
                Some((SessionId(m), Duration::from_millis(left)))
            })
            .collect())
    }

    /// Clean stop: removes every session and pinhole (one batch) and deletes
    /// the conntrack entries of every session we know of or find in the
    /// kernel. The dark ruleset stays: the host stays dark.
    pub fn flush(&mut self) -> Result<(), FirewallError> {
        let mut marks: Vec<u32> = self.sessions.keys().map(|s| s.0).collect();
        for e in self.sock.dump_set(&self.table, SESSIONS)? {
            if let Some(m) = elements::decode_mark(&e.key) {
                marks.push(m);
            }
        }
        marks.extend(self.pinholes.values().map(|(s, _, _)| s.0));
        marks.sort_unstable();
        marks.dedup();
        let ops = [
            (SESSIONS, ElemOp::Flush),
            (PINHOLES4, ElemOp::Flush),
            (PINHOLES6, ElemOp::Flush),
            (FORWARDS4, ElemOp::Flush),
            (FORWARDS6, ElemOp::Flush),
        ];
        self.sock.batch(&self.table, &ops)?;
        self.sessions.clear();
        self.pinholes.clear();
        for m in marks {
            conntrack::delete_by_mark(&mut self.sock, m)?;
        }
        Ok(())
    }

    /// Deletes only `table inet <table>`; a missing table is Ok.
    pub fn uninstall(table: &str) -> Result<(), FirewallError> {
        ruleset::uninstall(table)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn firewall_can_move_to_another_thread() {
        fn is_send<T: Send>() {}
        is_send::<Firewall>();
        is_send::<FirewallError>();
    }

    #[test]
    fn ruleset_names_only_our_table() {
        let cfg = FirewallConfig {
            table: "pst_x".into(),
            open_ports: vec![(AppProto::Tcp, 22), (AppProto::Udp, 500)],
            forward_snat: true,
        };
        let text = ruleset::render(&cfg).expect("render");
        for line in text.lines().filter(|l| l.contains("table ")) {
            assert!(line.contains("table inet pst_x"), "{line}");
        }
        assert!(text.contains("tcp dport { 22 } accept"));
        assert!(text.contains("udp dport { 500 } accept"));
        assert!(text.contains("policy drop"));
    }

    #[test]
    fn table_names_are_checked() {
        for bad in ["", "1abc", "a b", "x;flush ruleset", "a}"] {
            let cfg = FirewallConfig {
                table: bad.into(),
                open_ports: vec![],
                forward_snat: false,
            };
            assert!(
                matches!(ruleset::render(&cfg), Err(FirewallError::Invalid(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn ttls_are_checked() {
        assert!(ttl_ms(Duration::ZERO, "x").is_err());
        assert!(ttl_ms(Duration::from_micros(10), "x").is_err());
        assert_eq!(ttl_ms(Duration::from_secs(30), "x").ok(), Some(30_000));
    }

    #[test]
    fn proto_text_round_trips() {
        for p in [AppProto::Tcp, AppProto::Udp] {
            assert_eq!(p.to_string().parse::<AppProto>().ok(), Some(p));
            assert_eq!(AppProto::from_number(p.number()), Some(p));
        }
        assert!("icmp".parse::<AppProto>().is_err());
    }
}
