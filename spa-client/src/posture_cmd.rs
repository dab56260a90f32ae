//! `postern posture [--json] [--check]` (collect and show) and `postern posture report`
//! (collect, or read `--facts FILE`, and send it signed to the controller).
//!
//! Owns: the collector flags and their precedence (flags over `posture.toml` over
//! defaults), the table and the messages. Must not touch: the collectors (see
//! `postern_client::posture`), HTTP and signing (see `controller_cmd`).

use std::path::PathBuf;

use anyhow::{Context as _, Result};
use clap::{Args, Subcommand};
use postern_client::exit::{Fix, POSTURE_FAILING, USAGE};
use postern_client::posture::{self, Collected, PostureConfig};
use postern_client::profile::config_dir;

/// Where and what the collectors look at.
#[derive(Debug, Clone, Args)]
pub(crate) struct CollectArgs {
    /// Read the machine's files under DIR instead of / (tests point it at a fixture tree).
    #[arg(long, value_name = "DIR", env = "POSTERN_POSTURE_ROOT", hide = true)]
    pub root: Option<PathBuf>,
    /// A process that must be running (repeat the flag; replaces the list from
    /// posture.toml and the default EDR list).
    #[arg(long = "process", value_name = "NAME")]
    pub processes: Vec<String>,
    /// MDM enrollment marker file (default etc/postern/mdm-enrolled).
    #[arg(long, value_name = "PATH")]
    pub mdm_marker: Option<PathBuf>,
    /// Directory of custom check programs (default etc/postern/checks.d).
    #[arg(long, value_name = "DIR")]
    pub checks_dir: Option<PathBuf>,
}

impl CollectArgs {
    /// The collector settings: these flags, then `posture.toml`, then the defaults.
    pub(crate) fn config(&self) -> Result<PostureConfig> {
        let mut cfg = PostureConfig::default();
        if let Ok(dir) = config_dir() {
            cfg = cfg.with_file(&dir).map_err(|m| Fix::new(USAGE, m))?;
        }
        if let Some(r) = &self.root {
            if !r.is_dir() {
                return Err(Fix::new(
                    USAGE,
                    format!(
                        "--root {}: not a directory (give the root of a file system tree)",
                        r.display()
                    ),
                )
                .into());
            }
            cfg.root = r.clone();
        }
        if !self.processes.is_empty() {
            cfg.processes = self.processes.clone();
        }
        if let Some(m) = &self.mdm_marker {
            cfg.mdm_marker = m.clone();
        }
        if let Some(c) = &self.checks_dir {
            cfg.checks_dir = c.clone();
        }
        Ok(cfg)
    }

    pub(crate) fn collect(&self) -> Result<Collected> {
        Ok(posture::collect(&self.config()?))
    }
}

/// `postern posture`.
#[derive(Debug, Args)]
#[command(
    args_conflicts_with_subcommands = true,
    after_help = "Examples:\n  postern posture            # table of every fact and how it was found\n  postern posture --json     # the exact report sent to the controller\n  postern posture report     # collect and send it (signed by the device key)"
)]
pub(crate) struct PostureArgs {
    #[command(subcommand)]
    pub command: Option<PostureCommand>,
    #[command(flatten)]
    pub collect: CollectArgs,
    /// Print the report JSON (docs/posture.md) instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Exit with status 7 when a fact fails locally (unknown counts as failing).
    #[arg(long)]
    pub check: bool,
}

#[derive(Debug, Subcommand)]
pub(crate) enum PostureCommand {
    /// Collect the posture and send it, signed by the device key, to the controller.
    ///
    /// Example: postern posture report    (or: postern posture report --facts facts.json)
    ///
    /// With --facts the file is sent instead (the JSON report of docs/posture.md, e.g.
    /// {"collected_at":"2026-11-23T10:00:00Z","os_family":"linux","disk_encrypted":true}).
    Report {
        /// Send this report file (at most 64 KiB) instead of collecting.
        #[arg(long, value_name = "FILE.json")]
        facts: Option<PathBuf>,
        #[command(flatten)]
        collect: CollectArgs,
        /// Device key file (default: ~/.config/postern/device.key).
        #[arg(long, value_name = "FILE")]
        key: Option<PathBuf>,
        /// Print {received_at, expires_at} as JSON.
        #[arg(long)]
        json: bool,
    },
}

pub(crate) fn run(args: PostureArgs) -> Result<()> {
    match args.command {
        Some(PostureCommand::Report {
            facts,
            collect,
            key,
            json,
        }) => {
            let key = crate::key_path(key)?;
            let body = match facts {
                Some(path) => crate::controller_cmd::read_facts(&path)?,
                None => collect
                    .collect()?
                    .report_bytes()
                    .context("the collected report does not pass the controller's checks")?,
            };
            crate::controller_cmd::send_posture(&body, &key, json)
        }
        None => {
            let collected = args.collect.collect()?;
            if args.json {
                println!("{}", collected.report());
            } else {
                print!("{}", collected.table());
            }
            let failing = collected.failing();
            if args.check && !failing.is_empty() {
                return Err(Fix::new(
                    POSTURE_FAILING,
                    format!(
                        "{} posture fact(s) fail: {}",
                        failing.len(),
                        failing.join("; ")
                    ),
                )
                .into());
            }
            Ok(())
        }
    }
}
