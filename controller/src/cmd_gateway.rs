//! CLI for remote gateways: `gateway add`, `gateway list`, `gateway remove`
//! (docs/control-channel.md, "Enrollment").
//!
//! Owns: these commands' flags, help texts and output (the token line shown once, table,
//! JSON, one-line messages) and turning refused input into a usage error (exit 2).
//! Must not touch: SQL (goes through `postern_controller::gateways`), the TLS identity's
//! files (`api_identity`), exit codes (see `main`), other commands.

use std::io::Write;
use std::path::Path;

use anyhow::Context as _;
use clap::{Args, Subcommand};
use postern_controller::gateways::GatewayError;
use postern_controller::registry::Registry;
use postern_controller::{api_identity, invite};

use crate::cli::{print_json, print_table, UsageError};

type Open<'a> = &'a dyn Fn() -> anyhow::Result<Registry>;

const GATEWAY_ADD_HELP: &str = "Example:\n  postern-controller gateway add edge-1 --expires 24h\n  (on the gateway host:) postern-gateway enroll --config /etc/postern/gateway.toml --token postern-gateway:v1:...\n  postern-controller gateway add edge-1 --reissue      (a new token for a gateway that never registered or was removed)\n\nToken format: postern-gateway:v1:<base64url 32-byte secret>:<hex SHA-256 of the\ncontroller's certificate>. The gateway pins that certificate. Only the secret's SHA-256\nis stored; the token works once, until it expires. Treat it like a password.\nThe controller must run `serve --gateway-listen ADDR` for gateways to connect.";

#[derive(Debug, Subcommand)]
pub enum GatewayCommand {
    /// Create a gateway and its one-time enrollment token; prints the token once.
    #[command(after_help = GATEWAY_ADD_HELP)]
    Add(GatewayAddArgs),
    /// List gateways: registered, key, connected now, last seen, revision held.
    #[command(
        after_help = "Example:\n  postern-controller gateway list\n  postern-controller gateway list --json\n\nCONNECTED is yes while a control channel is open and the gateway was heard from within\n60 s. REVISION is the registry revision it holds as of its last contact."
    )]
    List(GatewayListArgs),
    /// Remove a gateway: its channel closes within a second and is never accepted again.
    #[command(
        after_help = "Example:\n  postern-controller gateway remove edge-1\n\nThe gateway keeps enforcing its last snapshot until it is stopped. To bring it back,\nissue a new token with `postern-controller gateway add edge-1 --reissue`."
    )]
    Remove {
        /// The gateway's name.
        #[arg(value_name = "NAME")]
        name: String,
    },
}

#[derive(Debug, Args)]
pub struct GatewayAddArgs {
    /// The gateway's name (1-64 of A-Z a-z 0-9 . _ -).
    #[arg(value_name = "NAME")]
    pub name: String,
    /// How long the token stays valid: 1m to 30d (e.g. 30m, 24h, 7d).
    #[arg(long, value_name = "DURATION", default_value = "24h")]
    pub expires: String,
    /// Issue a new token for an existing gateway that never registered or was removed
    /// (its old token and key stop working).
    #[arg(long)]
    pub reissue: bool,
    /// Print {token, name, expires_at, cert_sha256} as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct GatewayListArgs {
    /// Print the gateways as a JSON array.
    #[arg(long)]
    pub json: bool,
}

fn usage(e: GatewayError) -> anyhow::Error {
    if e.is_validation() {
        UsageError(e.to_string()).into()
    } else {
        e.into()
    }
}

fn now_ms() -> anyhow::Result<u64> {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .context("system clock is before 1970")?;
    Ok(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Runs one `gateway` command. `api_dir` holds the controller's TLS identity (created if
/// missing, so `gateway add` works before `serve` ever ran).
pub fn run(
    cmd: GatewayCommand,
    open: Open<'_>,
    api_dir: &Path,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    match cmd {
        GatewayCommand::Add(args) => add(args, open, api_dir, out),
        GatewayCommand::List(args) => {
            let rows = open()?.list_gateways(now_ms()?)?;
            if args.json {
                return print_json(out, &rows);
            }
            let dash = || "-".to_owned();
            let rows = rows
                .into_iter()
                .map(|g| {
                    let state = if g.removed {
                        "removed"
                    } else if g.registered {
                        "registered"
                    } else {
                        "token issued"
                    };
                    vec![
                        g.name,
                        state.to_owned(),
                        g.key_sha256
                            .map_or_else(dash, |k| format!("{}…", k.get(..16).unwrap_or(&k))),
                        if g.connected { "yes" } else { "no" }.to_owned(),
                        g.last_seen.unwrap_or_else(dash),
                        g.last_revision.map_or_else(dash, |r| r.to_string()),
                    ]
                })
                .collect();
            print_table(
                out,
                &["NAME", "STATE", "KEY", "CONNECTED", "LAST SEEN", "REVISION"],
                rows,
            )?;
            Ok(())
        }
        GatewayCommand::Remove { name } => {
            let outcome = open()?.remove_gateway(&name).map_err(usage)?;
            if outcome.already_removed {
                writeln!(
                    out,
                    "gateway {:?} was already removed; nothing changed",
                    outcome.name
                )?;
            } else {
                writeln!(
                    out,
                    "removed gateway {:?}; its channel closes and it is not accepted again",
                    outcome.name
                )?;
            }
            Ok(())
        }
    }
}

fn add(
    args: GatewayAddArgs,
    open: Open<'_>,
    api_dir: &Path,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let ttl = invite::parse_expiry(&args.expires).map_err(|e| UsageError(e.to_string()))?;
    postern_controller::validate::gateway_name(&args.name)
        .map_err(|e| UsageError(e.to_string()))?;
    let identity = api_identity::load_or_create(api_dir)?;
    let now = now_ms()? / 1000;
    let created = open()?
        .add_gateway(
            &args.name,
            ttl,
            identity.fingerprint_bytes(),
            now,
            args.reissue,
        )
        .map_err(usage)?;
    let token = created.text();
    if args.json {
        let v = serde_json::json!({
            "token": token.as_str(),
            "name": created.name,
            "expires_at": invite::format_unix(created.expires_at),
            "cert_sha256": identity.fingerprint,
        });
        serde_json::to_writer_pretty(&mut *out, &v).context("writing JSON")?;
        writeln!(out)?;
    } else {
        writeln!(out, "{}", token.as_str())?;
        eprintln!(
            "one-time token for gateway {:?}, valid until {}; on the gateway host run: postern-gateway enroll --config FILE --token TOKEN",
            created.name,
            invite::format_unix(created.expires_at)
        );
    }
    Ok(())
}
