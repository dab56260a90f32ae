//! CLI for live sessions: `session list` and `session kill`.
//!
//! Owns: these commands' flags, help texts and output (table, JSON, one-line messages),
//! and turning refused input into a usage error (exit 2). Must not touch: SQL (goes
//! through `postern_controller::sessions`), exit codes (see `main`), other commands.

use std::io::Write;

use anyhow::Context as _;
use clap::{Args, Subcommand};
use postern_controller::registry::Registry;
use postern_controller::sessions::{SessionError, SessionRef, SessionRow};

use crate::cli::{print_json, print_table, UsageError};

type Open<'a> = &'a dyn Fn() -> anyhow::Result<Registry>;

#[derive(Debug, Subcommand)]
pub enum SessionCommand {
    /// List the live sessions the gateways report (stale rows: gateway silent for > 60 s).
    #[command(
        after_help = "Example:\n  postern-controller session list\n  postern-controller session list --gateway edge-1 --json\n\nID is GATEWAY:HEXID, what `session kill` takes. Gateways report after every change\n(at most 5 times a second) and at least every 30 s."
    )]
    List(SessionListArgs),
    /// Close a live session now: the gateway drops its flows at its next sync.
    #[command(
        after_help = "Example:\n  postern-controller session kill edge-1:0a1b2c\n  postern-controller session kill edge-1:0a1b2c --force\n\nThe kill travels to gateways in the registry (revision bump) for a day; the named\ngateway closes that session if it opened before the kill (ids are reused later).\nThe device may knock again: revoke it or change the policy to keep it out."
    )]
    Kill(SessionKillArgs),
}

#[derive(Debug, Args)]
pub struct SessionListArgs {
    /// Only this gateway's sessions.
    #[arg(long, value_name = "NAME")]
    pub gateway: Option<String>,
    /// Print the sessions as a JSON array.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct SessionKillArgs {
    /// The session's global ID as `session list` shows it: GATEWAY:HEXID.
    #[arg(value_name = "GATEWAY:HEXID")]
    pub id: String,
    /// Store the kill even though the session is not listed (its gateway has not
    /// reported it, e.g. it is disconnected).
    #[arg(long)]
    pub force: bool,
    /// Print the outcome as JSON.
    #[arg(long)]
    pub json: bool,
}

fn usage(e: SessionError) -> anyhow::Error {
    if e.is_validation() {
        UsageError(e.to_string()).into()
    } else {
        e.into()
    }
}

fn unix_now_ms() -> anyhow::Result<u64> {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .context("system clock is before 1970")?;
    Ok(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// `3s`, `4m05s`, `2h03m`, `3d04h`; `-` for a negative span.
pub fn span(ms: i128) -> String {
    if ms < 0 {
        return "-".to_owned();
    }
    let s = ms / 1000;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        3600..=86_399 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{:02}h", s / 86_400, s % 86_400 / 3600),
    }
}

fn table_row(r: SessionRow, now_ms: u64) -> Vec<String> {
    let now = i128::from(now_ms);
    let seen = format!(
        "{} ago{}",
        span(now - i128::from(r.gateway_last_seen_ms)),
        if r.stale { " (stale)" } else { "" }
    );
    vec![
        r.id,
        r.device_name,
        r.user,
        r.app,
        r.source,
        r.mode,
        span(now - i128::from(r.opened_at_ms)),
        span(i128::from(r.expires_at_ms) - now),
        seen,
    ]
}

pub fn run(cmd: SessionCommand, open: Open<'_>, mut out: &mut dyn Write) -> anyhow::Result<()> {
    match cmd {
        SessionCommand::List(args) => {
            if let Some(g) = &args.gateway {
                postern_controller::validate::gateway_name(g)
                    .map_err(|e| UsageError(format!("--gateway: {e}")))?;
            }
            let now_ms = unix_now_ms()?;
            let rows = open()?.list_sessions(args.gateway.as_deref(), now_ms)?;
            if args.json {
                print_json(&mut out, &rows)?;
            } else {
                let rows = rows.into_iter().map(|r| table_row(r, now_ms)).collect();
                print_table(
                    &mut out,
                    &[
                        "ID",
                        "DEVICE",
                        "USER",
                        "APP",
                        "SOURCE",
                        "MODE",
                        "AGE",
                        "EXPIRES IN",
                        "GATEWAY SEEN",
                    ],
                    rows,
                )?;
            }
        }
        SessionCommand::Kill(args) => {
            let target = SessionRef::parse(&args.id).map_err(usage)?;
            let now_secs = unix_now_ms()? / 1000;
            let o = open()?
                .kill_session(&target, args.force, now_secs)
                .map_err(usage)?;
            if args.json {
                serde_json::to_writer_pretty(&mut *out, &o).context("writing JSON")?;
                writeln!(out)?;
            } else if o.already_killed {
                writeln!(
                    out,
                    "session {} was already killed this second; nothing changed",
                    o.id
                )?;
            } else {
                let what = match (&o.device_name, &o.user, &o.app) {
                    (Some(d), Some(u), Some(a)) => {
                        format!(" (device {d:?}, user {u:?}, app {a:?})")
                    }
                    _ => " (not listed: stored because of --force)".to_owned(),
                };
                writeln!(
                    out,
                    "killed session {}{what} at revision {}; gateway {:?} closes it when it receives that revision",
                    o.id, o.revision, o.gateway
                )?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::span;

    #[test]
    fn spans_are_short_and_human() {
        assert_eq!(span(-1), "-");
        assert_eq!(span(999), "0s");
        assert_eq!(span(61_000), "1m01s");
        assert_eq!(span(3_723_000), "1h02m");
        assert_eq!(span(90_000_000), "1d01h");
    }
}
