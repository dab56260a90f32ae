//! Command-line interface: argument definitions (clap derive) and the commands' output.
//!
//! Owns: flag names, help texts with examples, table/JSON rendering of listings and the
//! one-line messages printed on success. Must not touch: SQL (goes through `Registry`),
//! process exit codes and logging setup (see `main`).

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use postern_controller::proto::keys::DevicePublicKey;
use postern_controller::proto::snapshot::AppProtocol;
use postern_controller::registry::Registry;
use postern_controller::sync::{self, ServeConfig};

const DEVICE_ADD_EXAMPLE: &str = "Example:\n  postern-controller device add alice-laptop --user alice --key ed25519:3f1Vb0F8...=\n\nThe key is the line printed by `postern keygen` on the device. Prints the device id.";

/// Postern controller: device/app/grant registry and gateway sync.
#[derive(Debug, Parser)]
#[command(
    name = "postern-controller",
    version,
    after_help = "Examples:\n  postern-controller --db /var/lib/postern/registry.db device list\n  POSTERN_DB=./registry.db postern-controller app add web --protocol tcp --port 443\n  postern-controller serve --socket /run/postern/controller.sock"
)]
pub struct Cli {
    /// Registry database file (created with its directory if missing).
    #[arg(
        long,
        global = true,
        env = "POSTERN_DB",
        value_name = "PATH",
        default_value = "/var/lib/postern/registry.db"
    )]
    pub db: PathBuf,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Register, list and revoke devices.
    #[command(
        subcommand,
        after_help = "Example:\n  postern-controller device add alice-laptop --user alice --key ed25519:...\n  postern-controller device list --json\n  postern-controller device revoke alice-laptop"
    )]
    Device(DeviceCommand),
    /// Register and list apps (a protocol/port behind the gateway).
    #[command(
        subcommand,
        after_help = "Example:\n  postern-controller app add web --protocol tcp --port 443\n  postern-controller app list"
    )]
    App(AppCommand),
    /// Grant users access to apps.
    #[command(
        subcommand,
        after_help = "Example:\n  postern-controller grant add --app web --user alice\n  postern-controller grant list --json"
    )]
    Grant(GrantCommand),
    /// Serve registry snapshots to gateways on a Unix socket (runs until SIGINT/SIGTERM).
    #[command(
        after_help = "Example:\n  postern-controller --db /var/lib/postern/registry.db serve --socket /run/postern/controller.sock\n\nProtocol: one JSON line per request, {\"after_revision\": N}; answered with {\"snapshot\": {...}} as soon as the revision differs from N, or after 10 s (heartbeat)."
    )]
    Serve(ServeArgs),
}

#[derive(Debug, Subcommand)]
pub enum DeviceCommand {
    /// Register a device's public key for a user; prints the device id.
    #[command(after_help = DEVICE_ADD_EXAMPLE)]
    Add {
        /// Device name, unique (1-64 of A-Z a-z 0-9 . _ -).
        #[arg(value_name = "NAME")]
        name: String,
        /// User who owns the device.
        #[arg(long, value_name = "USER")]
        user: String,
        /// Device public key, "ed25519:BASE64" as printed by `postern keygen`.
        #[arg(long, value_name = "ed25519:BASE64")]
        key: String,
    },
    /// List devices (revoked ones included).
    #[command(
        after_help = "Example:\n  postern-controller device list\n  postern-controller device list --json"
    )]
    List(ListArgs),
    /// Revoke a device by name or id; its knocks are refused from the next sync on.
    #[command(
        after_help = "Example:\n  postern-controller device revoke alice-laptop\n  postern-controller device revoke 0123456789abcdef0123456789abcdef"
    )]
    Revoke {
        /// Device name or 32-hex device id.
        #[arg(value_name = "NAME_OR_ID")]
        name_or_id: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum AppCommand {
    /// Register an app: a name knocks refer to and the protocol/port it opens.
    #[command(
        after_help = "Example:\n  postern-controller app add web --protocol tcp --port 443\n  postern-controller app add dns --protocol udp --port 53\n  postern-controller app add wiki --protocol tcp --port 8443 --forward 10.0.0.5:80\n\nWith --forward the app lives on an internal host: after a knock the client connects to\nthe gateway's address and --port, and the gateway forwards that connection (only it)\nto HOST:PORT. See docs/operations.md, \"Forward mode\"."
    )]
    Add {
        /// App name as used in knocks (1-64 of a-z 0-9 . _ -).
        #[arg(value_name = "NAME")]
        name: String,
        /// Transport protocol.
        #[arg(long, value_name = "tcp|udp", value_parser = parse_protocol)]
        protocol: AppProtocol,
        /// Port number, 1-65535.
        #[arg(long, value_name = "N", value_parser = parse_port, allow_hyphen_values = true)]
        port: u16,
        /// Forward mode: the internal host and port the gateway forwards to (IPv4
        /// `10.0.0.5:80` or IPv6 `[fd00::5]:80`; literals only).
        #[arg(long, value_name = "HOST:PORT")]
        forward: Option<String>,
    },
    /// List apps.
    #[command(after_help = "Example:\n  postern-controller app list --json")]
    List(ListArgs),
}

#[derive(Debug, Subcommand)]
pub enum GrantCommand {
    /// Allow a user's devices to knock for an app.
    #[command(after_help = "Example:\n  postern-controller grant add --app web --user alice")]
    Add {
        /// A registered app name.
        #[arg(long, value_name = "APP")]
        app: String,
        /// User to grant.
        #[arg(long, value_name = "USER")]
        user: String,
    },
    /// List grants.
    #[command(after_help = "Example:\n  postern-controller grant list --json")]
    List(ListArgs),
}

#[derive(Debug, Args)]
pub struct ListArgs {
    /// Print the records as a JSON array instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Unix socket path to listen on (created 0600).
    #[arg(long, value_name = "PATH")]
    pub socket: PathBuf,
    /// How long to hold a request when nothing changes (tests only).
    #[arg(long, hide = true, value_name = "MS", default_value_t = 10_000,
          value_parser = clap::value_parser!(u64).range(1..=3_600_000))]
    pub hold_ms: u64,
}

/// The user's input was rejected (exit code 2).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

fn parse_port(s: &str) -> Result<u16, String> {
    match s.parse::<u32>() {
        Ok(n) if (1..=65535).contains(&n) => Ok(n as u16),
        _ => Err("use a port number from 1 to 65535".into()),
    }
}

fn parse_protocol(s: &str) -> Result<AppProtocol, String> {
    match s {
        "tcp" => Ok(AppProtocol::Tcp),
        "udp" => Ok(AppProtocol::Udp),
        _ => Err("use tcp or udp".into()),
    }
}

/// Runs one parsed command.
pub fn run(cli: Cli, stop: impl FnOnce() -> anyhow::Result<Arc<AtomicBool>>) -> anyhow::Result<()> {
    let db = cli.db;
    let open = || Registry::open(&db).map_err(anyhow::Error::from);
    let mut out = std::io::stdout().lock();
    match cli.command {
        Command::Device(DeviceCommand::Add { name, user, key }) => {
            let key = DevicePublicKey::from_text(&key).map_err(|e| {
                UsageError(format!(
                    "--key {key:?} is not a device public key ({e}): pass the \"ed25519:...\" line printed by `postern keygen`"
                ))
            })?;
            let rec = open()?.add_device(&name, &user, &key)?;
            writeln!(out, "{}", rec.id)?;
        }
        Command::Device(DeviceCommand::List(args)) => {
            let rows = open()?.list_devices()?;
            if args.json {
                let recs: Vec<_> = rows.into_iter().map(|r| r.record).collect();
                print_json(&mut out, &recs)?;
            } else {
                let rows = rows
                    .into_iter()
                    .map(|r| {
                        vec![
                            r.record.name,
                            r.record.user,
                            r.record.id,
                            if r.record.revoked {
                                "revoked"
                            } else {
                                "active"
                            }
                            .to_owned(),
                            r.created_at,
                            r.record.public_key,
                        ]
                    })
                    .collect();
                print_table(
                    &mut out,
                    &["NAME", "USER", "ID", "STATUS", "CREATED", "PUBLIC KEY"],
                    rows,
                )?;
            }
        }
        Command::Device(DeviceCommand::Revoke { name_or_id }) => {
            let o = open()?.revoke_device(&name_or_id)?;
            if o.already_revoked {
                writeln!(
                    out,
                    "device {:?} (id {}) was already revoked; nothing changed",
                    o.device.name, o.device.id
                )?;
            } else {
                writeln!(
                    out,
                    "revoked device {:?} (id {})",
                    o.device.name, o.device.id
                )?;
            }
        }
        Command::App(AppCommand::Add {
            name,
            protocol,
            port,
            forward,
        }) => {
            let forward = match forward {
                Some(text) => Some(
                    postern_controller::validate::forward(&text)
                        .map_err(|e| UsageError(e.to_string()))?,
                ),
                None => None,
            };
            let app = open()?.add_app_forward(&name, protocol, port, forward)?;
            match app.forward {
                Some(target) => writeln!(
                    out,
                    "added app {:?} ({}/{} forwarded to {target})",
                    app.name, app.protocol, app.port
                )?,
                None => writeln!(
                    out,
                    "added app {:?} ({}/{})",
                    app.name, app.protocol, app.port
                )?,
            }
        }
        Command::App(AppCommand::List(args)) => {
            let apps = open()?.list_apps()?;
            if args.json {
                print_json(&mut out, &apps)?;
            } else {
                let rows = apps
                    .into_iter()
                    .map(|a| {
                        let forward = a.forward.map_or_else(|| "-".to_owned(), |f| f.to_string());
                        vec![a.name, a.protocol.to_string(), a.port.to_string(), forward]
                    })
                    .collect();
                print_table(&mut out, &["NAME", "PROTOCOL", "PORT", "FORWARD"], rows)?;
            }
        }
        Command::Grant(GrantCommand::Add { app, user }) => {
            let o = open()?.add_grant(&app, &user)?;
            if o.already_granted {
                writeln!(
                    out,
                    "user {user:?} already has access to app {app:?}; nothing changed"
                )?;
            } else {
                writeln!(out, "granted user {user:?} access to app {app:?}")?;
            }
        }
        Command::Grant(GrantCommand::List(args)) => {
            let grants = open()?.list_grants()?;
            if args.json {
                print_json(&mut out, &grants)?;
            } else {
                let rows = grants.into_iter().map(|g| vec![g.app, g.user]).collect();
                print_table(&mut out, &["APP", "USER"], rows)?;
            }
        }
        Command::Serve(args) => {
            drop(out);
            let cfg = ServeConfig {
                db: db.clone(),
                socket: args.socket,
                hold: Duration::from_millis(args.hold_ms),
            };
            let stop = stop()?;
            sync::serve(&cfg, stop)?;
        }
    }
    Ok(())
}

fn print_json<T: serde::Serialize>(out: &mut impl Write, records: &[T]) -> anyhow::Result<()> {
    serde_json::to_writer_pretty(&mut *out, records).context("writing JSON")?;
    writeln!(out)?;
    Ok(())
}

/// Left-aligned columns separated by two spaces; the last column is not padded.
fn print_table(
    out: &mut impl Write,
    headers: &[&str],
    rows: Vec<Vec<String>>,
) -> std::io::Result<()> {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |out: &mut dyn Write, cells: &[&str]| -> std::io::Result<()> {
        let mut s = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                s.push_str(cell);
            } else {
                s.push_str(cell);
                let pad = widths[i] - cell.chars().count() + 2;
                s.extend(std::iter::repeat_n(' ', pad));
            }
        }
        writeln!(out, "{}", s.trim_end())
    };
    line(out, headers)?;
    for row in &rows {
        let cells: Vec<&str> = row.iter().map(String::as_str).collect();
        line(out, &cells)?;
    }
    Ok(())
}
