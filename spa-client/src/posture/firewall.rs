//! Host firewall: is a packet filter on the input path active?
//!
//! Method: run `nft list ruleset` from the posture root (`usr/sbin/nft`, `sbin/nft`; a
//! fixture tree may hold a script that prints a ruleset) with a 5 s limit and look for a
//! chain with `hook input` whose policy is `drop` or that holds a `drop`/`reject` rule
//! (iptables-nft and ufw rules show up there too). Reading the live ruleset needs root
//! (CAP_NET_ADMIN); when `nft` is missing or fails, `etc/ufw/ufw.conf` `ENABLED=yes|no` is
//! used instead (the configured state, not verified against the kernel); otherwise the
//! state is unknown.
//!
//! Owns: finding and reading the ruleset. Must not touch: the firewall itself.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use super::run::{run_bounded, RunOutcome};
use super::system::read_small;
use super::{under_root, Probe};

/// Time limit of `nft list ruleset`.
const NFT_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest ruleset read.
const MAX_RULESET: usize = 4 * 1024 * 1024;

/// The firewall state under `root`.
pub fn firewall(root: &Path) -> Probe {
    let nft = ["usr/sbin/nft", "sbin/nft"]
        .iter()
        .map(|rel| under_root(root, rel))
        .find(|p| p.is_file());
    let mut why_not_nft = "nft is not installed".to_owned();
    if let Some(nft) = nft {
        match run_bounded(
            Command::new(&nft).args(["list", "ruleset"]),
            NFT_TIMEOUT,
            MAX_RULESET,
        ) {
            RunOutcome::Exited {
                status,
                stdout,
                stdout_overflow: false,
                ..
            } if status.success() => {
                return ruleset_verdict(&String::from_utf8_lossy(&stdout));
            }
            RunOutcome::Exited { stderr, .. } => {
                let first = String::from_utf8_lossy(&stderr);
                why_not_nft = format!(
                    "`{} list ruleset` failed ({}; reading the ruleset needs root)",
                    nft.display(),
                    first.lines().next().unwrap_or("no message").trim()
                );
            }
            RunOutcome::TimedOut => why_not_nft = "`nft list ruleset` timed out".into(),
            RunOutcome::SpawnFailed(e) => why_not_nft = format!("cannot run nft: {e}"),
        }
    }
    let ufw = read_small(&under_root(root, "etc/ufw/ufw.conf")).and_then(|text| {
        text.lines().find_map(|l| {
            let v = l.trim().strip_prefix("ENABLED=")?;
            Some(
                v.trim_matches(|c| c == '"' || c == '\'')
                    .eq_ignore_ascii_case("yes"),
            )
        })
    });
    match ufw {
        Some(on) => Probe {
            state: Some(on),
            detail: format!(
                "ufw ENABLED={} in etc/ufw/ufw.conf (configured state; {why_not_nft})",
                if on { "yes" } else { "no" }
            ),
        },
        None => Probe::unknown(why_not_nft),
    }
}

/// Whether an `nft list ruleset` text has an input-hook chain that drops or rejects.
pub fn ruleset_verdict(ruleset: &str) -> Probe {
    let mut chain: Option<(String, bool, bool)> = None; // (name, input hook, drops)
    let mut input_chains = 0usize;
    for line in ruleset.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("chain ") {
            let name = rest.trim_end_matches('{').trim().to_owned();
            chain = Some((name, false, false));
            continue;
        }
        let Some((name, input, drops)) = chain.as_mut() else {
            continue;
        };
        if line == "}" {
            if *input {
                input_chains += 1;
                if *drops {
                    return Probe::yes(format!(
                        "nftables input chain {name:?} drops or rejects traffic"
                    ));
                }
            }
            chain = None;
            continue;
        }
        if line.contains("hook input") {
            *input = true;
            if line.contains("policy drop") {
                *drops = true;
            }
        } else if line
            .split_whitespace()
            .any(|w| w == "drop" || w == "reject" || w.starts_with("reject"))
        {
            *drops = true;
        }
    }
    if input_chains == 0 {
        Probe::no("no nftables chain hooks input".into())
    } else {
        Probe::no("nftables input chains accept everything".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rulesets_are_judged() {
        let drop_policy = "table inet filter {\n\tchain input {\n\t\ttype filter hook input priority filter; policy drop;\n\t\tct state established accept\n\t}\n}\n";
        assert_eq!(ruleset_verdict(drop_policy).state, Some(true));
        let reject_rule = "table ip filter {\n chain INPUT {\n  type filter hook input priority filter; policy accept;\n  tcp dport 22 reject with icmp port-unreachable\n }\n}\n";
        assert_eq!(ruleset_verdict(reject_rule).state, Some(true));
        let accept_all = "table inet filter {\n chain input {\n  type filter hook input priority filter; policy accept;\n }\n chain output {\n  type filter hook output priority filter; policy drop;\n }\n}\n";
        assert_eq!(ruleset_verdict(accept_all).state, Some(false));
        assert_eq!(ruleset_verdict("").state, Some(false));
    }
}
