//! The dark ruleset of `table inet <table>` and the `nft` subprocess.
//!
//! Owns: the text of postern's table (sets `sessions`, maps `pinholes4`,
//! `pinholes6`, `forwards4` and `forwards6`, chains `input`, `output`,
//! `fwd_mark`, `fwd_dnat`, `forward` and, with `forward_snat`, `fwd_snat`), its
//! atomic (re)creation with `nft -f -`, and its removal.
//!
//! Forward mode (connector): a knock for an app with a forward target adds,
//! next to its pinhole, an element `client . proto . port : target . tport` to
//! `forwards4`/`forwards6` with the pinhole's timeout. A new connection from
//! the client to that port on this host is stamped with the pinhole's session
//! mark (`fwd_mark`, before NAT), DNATed to the target (`fwd_dnat`), and
//! crosses `forward` (policy drop) only while it carries a live session mark
//! and was DNATed; replies match the same conntrack entry. With SNAT it is
//! masqueraded on the way out (`fwd_snat`), so the app needs no route back.
//! Revoking is the same single session-element delete as for local apps. TCP
//! loose pickup: `forward` admits new TCP flows only on a bare SYN; a picked-up
//! packet of a revoked flow from the app side either reaches `input` (SNAT:
//! addressed to this host, no pinhole: dropped) or `forward` with mark 0 and no
//! DNAT (dropped). The chains never change sysctls: IP forwarding is the
//! gateway's to enable.
//! Must not touch: any other table (the script only names `inet <table>`),
//! set elements at runtime (that is the netlink hot path).
//!
//! ICMP errors (packet too big, unreachable, time exceeded) need no rule of
//! their own: conntrack classifies them RELATED to their flow, so they carry
//! the flow's mark (session flows) or match `ct state established,related`
//! (the host's own flows). Neighbour discovery is accepted with hop limit 255
//! before `ct state invalid drop`.
//!
//! `nft` runs as a child of the calling thread, so it works in that thread's
//! network namespace (tests rely on this: they call `install` from a thread
//! that entered the namespace with setns).

use std::{
    io::Write,
    process::{Command, Stdio},
};

use crate::{error::FirewallError, AppProto, FirewallConfig};

/// Name of the session set.
pub const SESSIONS: &str = "sessions";
/// Name of the IPv4 pinhole map.
pub const PINHOLES4: &str = "pinholes4";
/// Name of the IPv6 pinhole map.
pub const PINHOLES6: &str = "pinholes6";
/// Name of the IPv4 forward map (forward mode: `client . proto . port : target . port`).
pub const FORWARDS4: &str = "forwards4";
/// Name of the IPv6 forward map.
pub const FORWARDS6: &str = "forwards6";

/// Table names are spliced into an nft script: keep them to a safe alphabet.
pub(crate) fn check_table_name(table: &str) -> Result<(), FirewallError> {
    let ok = !table.is_empty()
        && table.len() <= 64
        && table
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        && table.as_bytes()[0].is_ascii_alphabetic();
    if ok {
        Ok(())
    } else {
        Err(FirewallError::Invalid(format!(
            "table name {table:?}: use 1-64 characters [A-Za-z0-9_-], starting with a letter"
        )))
    }
}

/// Renders the whole ruleset script: create-if-missing, delete, recreate, in
/// one nft transaction (so the host is never without the table once it had it).
pub fn render(cfg: &FirewallConfig) -> Result<String, FirewallError> {
    check_table_name(&cfg.table)?;
    let t = &cfg.table;
    // Only marks with Postern's tag are sessions; the host's own marks pass untouched.
    let (tag, tag_mask) = (crate::MARK_TAG, crate::MARK_TAG_MASK);
    let mut open = String::new();
    for proto in [AppProto::Tcp, AppProto::Udp] {
        let ports: Vec<String> = cfg
            .open_ports
            .iter()
            .filter(|(p, _)| *p == proto)
            .map(|(_, port)| port.to_string())
            .collect();
        if !ports.is_empty() {
            open.push_str(&format!(
                "    {} dport {{ {} }} accept comment \"open_ports\"\n",
                proto.name(),
                ports.join(", ")
            ));
        }
    }
    let snat = if cfg.forward_snat {
        format!(
            r#"  chain fwd_snat {{
    type nat hook postrouting priority srcnat - 10; policy accept;
    ct mark & {tag_mask:#010x} == {tag:#010x} ct status dnat ct mark @{SESSIONS} masquerade comment "forward mode: the app needs no route back"
  }}
"#
        )
    } else {
        String::new()
    };
    Ok(format!(
        r#"table inet {t} {{}}
delete table inet {t}
table inet {t} {{
  set {SESSIONS} {{ type mark; flags timeout; }}
  map {PINHOLES4} {{ type ipv4_addr . inet_proto . inet_service : mark; flags timeout; }}
  map {PINHOLES6} {{ type ipv6_addr . inet_proto . inet_service : mark; flags timeout; }}
  map {FORWARDS4} {{ type ipv4_addr . inet_proto . inet_service : ipv4_addr . inet_service; flags timeout; }}
  map {FORWARDS6} {{ type ipv6_addr . inet_proto . inet_service : ipv6_addr . inet_service; flags timeout; }}
  chain fwd_mark {{
    type filter hook prerouting priority dstnat - 20; policy accept;
    ct state new fib daddr type local ip saddr . meta l4proto . th dport @{FORWARDS4} ct mark set ip saddr . meta l4proto . th dport map @{PINHOLES4}
    ct state new fib daddr type local ip6 saddr . meta l4proto . th dport @{FORWARDS6} ct mark set ip6 saddr . meta l4proto . th dport map @{PINHOLES6}
  }}
  chain fwd_dnat {{
    type nat hook prerouting priority dstnat - 10; policy accept;
    ct mark & {tag_mask:#010x} == {tag:#010x} fib daddr type local dnat ip to ip saddr . meta l4proto . th dport map @{FORWARDS4}
    ct mark & {tag_mask:#010x} == {tag:#010x} fib daddr type local dnat ip6 to ip6 saddr . meta l4proto . th dport map @{FORWARDS6}
  }}
  chain forward {{
    type filter hook forward priority filter - 10; policy drop;
    ct state new tcp flags & (syn | ack) != syn drop comment "no TCP loose pickup of forwarded flows"
    ct mark & {tag_mask:#010x} == {tag:#010x} ct status dnat ct mark @{SESSIONS} accept comment "forward mode: live sessions only"
    counter drop comment "nothing else is forwarded"
  }}
{snat}  chain input {{
    type filter hook input priority filter - 10; policy drop;
    iif "lo" accept
    ct mark & {tag_mask:#010x} == {tag:#010x} ct mark @{SESSIONS} accept
    ct mark & {tag_mask:#010x} == {tag:#010x} drop comment "session gone: its flows die"
    ct state established,related accept comment "the host's own outbound traffic"
    icmpv6 type {{ nd-router-solicit, nd-router-advert, nd-neighbor-solicit, nd-neighbor-advert, nd-redirect }} ip6 hoplimit 255 accept
    ct state invalid drop
    ct state new ct mark set ip saddr . meta l4proto . th dport map @{PINHOLES4}
    ct state new ct mark set ip6 saddr . meta l4proto . th dport map @{PINHOLES6}
    ct mark & {tag_mask:#010x} == {tag:#010x} ct mark @{SESSIONS} accept
{open}    counter drop
  }}
  chain output {{
    type filter hook output priority filter - 10; policy accept;
    oif "lo" accept
    ct mark & {tag_mask:#010x} == {tag:#010x} ct mark != @{SESSIONS} drop comment "session gone"
    ct state new tcp flags & (syn | ack) != syn drop comment "no TCP loose pickup from our side"
    icmp type destination-unreachable icmp code port-unreachable drop comment "dark: a closed UDP port never answers"
    icmpv6 type destination-unreachable icmpv6 code port-unreachable drop comment "dark: a closed UDP port never answers"
  }}
}}
"#
    ))
}

/// Runs `nft -f -` with `script` on stdin.
pub(crate) fn run_nft(
    script: &str,
    table: &str,
    action: &'static str,
) -> Result<(), FirewallError> {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => FirewallError::NftMissing,
            _ => FirewallError::io("running nft", e),
        })?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(script.as_bytes())
            .map_err(|e| FirewallError::io("writing the ruleset to nft", e))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| FirewallError::io("waiting for nft", e))?;
    if out.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
    if stderr.contains("Operation not permitted") {
        return Err(FirewallError::PermissionDenied {
            what: format!("{action} table inet {table}"),
        });
    }
    Err(FirewallError::Nft {
        table: table.to_owned(),
        action,
        stderr,
    })
}

/// Deletes `table inet <table>` only; a missing table is not an error.
pub(crate) fn uninstall(table: &str) -> Result<(), FirewallError> {
    check_table_name(table)?;
    // Declaring the table first makes the delete succeed when it was missing;
    // both happen in one transaction.
    let script = format!("table inet {table} {{}}\ndelete table inet {table}\n");
    run_nft(&script, table, "deleting")
}
