//! The dark ruleset of `table inet <table>` and the `nft` subprocess.
//!
//! Owns: the text of postern's table (sets `sessions`, maps `pinholes4` and
//! `pinholes6`, chains `input` and `output`), its atomic (re)creation with
//! `nft -f -`, and its removal.
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
    Ok(format!(
        r#"table inet {t} {{}}
delete table inet {t}
table inet {t} {{
  set {SESSIONS} {{ type mark; flags timeout; }}
  map {PINHOLES4} {{ type ipv4_addr . inet_proto . inet_service : mark; flags timeout; }}
  map {PINHOLES6} {{ type ipv6_addr . inet_proto . inet_service : mark; flags timeout; }}
  chain input {{
    type filter hook input priority filter - 10; policy drop;
    iif "lo" accept
    ct mark != 0 ct mark @{SESSIONS} accept
    ct mark != 0 drop comment "session gone: its flows die"
    ct state established,related accept comment "the host's own outbound traffic"
    icmpv6 type {{ nd-router-solicit, nd-router-advert, nd-neighbor-solicit, nd-neighbor-advert, nd-redirect }} ip6 hoplimit 255 accept
    ct state invalid drop
    ct state new ct mark set ip saddr . meta l4proto . th dport map @{PINHOLES4}
    ct state new ct mark set ip6 saddr . meta l4proto . th dport map @{PINHOLES6}
    ct mark != 0 ct mark @{SESSIONS} accept
{open}    counter drop
  }}
  chain output {{
    type filter hook output priority filter - 10; policy accept;
    oif "lo" accept
    ct mark != 0 ct mark != @{SESSIONS} drop comment "session gone"
    ct state new tcp flags & (syn | ack) != syn drop comment "no TCP loose pickup from our side"
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
