//! `postern-gateway`: the command line of the gateway daemon.
//!
//! Owns argument parsing and exit codes only; everything else lives in the library.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};

use postern_gateway::{config::Config, daemon, keyfile};

/// Postern gateway: keeps every port dark and opens one pinhole per authorized knock.
#[derive(Debug, Parser)]
#[command(name = "postern-gateway", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the gateway: install the dark ruleset, capture knocks, open pinholes.
    ///
    /// Example: postern-gateway run --config /etc/postern/gateway.toml
    Run {
        /// The TOML configuration file.
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Generate the gateway's static X25519 key (file mode 0600) and print its public key.
    ///
    /// Example: postern-gateway keygen --out /etc/postern/gateway.key
    Keygen {
        /// Where to write the secret key.
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
        /// Replace an existing key file (every client then needs the new public key).
        #[arg(long)]
        force: bool,
    },
    /// Enroll this gateway with a remote controller (config `controller = "HOST:PORT"`).
    ///
    /// Generates the gateway's P-256 key and self-signed certificate, connects with mutual
    /// TLS pinned to the controller certificate named in the token, registers the key with
    /// the one-time token from `postern-controller gateway add NAME`, and writes
    /// STATE_DIR/control/ (gateway.key 0600, gateway.crt, controller.json 0600). Nothing is
    /// written if the controller refuses. Exit codes: 0 enrolled; 1 refused or unreachable;
    /// 2 bad token, arguments or configuration.
    #[command(after_help = "Example:
  postern-gateway enroll --config /etc/postern/gateway.toml \
    --token postern-gateway:v1:3q2-7wAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA:5f0c…(64 hex)")]
    Enroll {
        /// The TOML configuration file (`controller` and `state_dir`).
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// The line printed by `postern-controller gateway add NAME`.
        #[arg(long, value_name = "TOKEN")]
        token: String,
        /// Replace an existing enrollment (new key; the old registration stays on the
        /// controller until `gateway remove`).
        #[arg(long)]
        force: bool,
        /// Print one JSON object (name, controller, fingerprints, directory).
        #[arg(long)]
        json: bool,
    },
    /// Print the public key clients need (`postern knock --gateway-key ...`).
    ///
    /// Example: postern-gateway pubkey --config /etc/postern/gateway.toml
    Pubkey {
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Check a configuration file and print one line per problem (none: exit 0).
    ///
    /// Example: postern-gateway check --config /etc/postern/gateway.toml
    Check {
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Show whether the running gateway is connected to the controller, the revision it
    /// enforces, seconds since the last contact, where its snapshot came from, its live
    /// sessions and pid. Reads STATE_DIR/status.json, which the daemon rewrites every second.
    ///
    /// Exit codes: 0 running and connected; 1 running but NOT connected (deciding from its
    /// snapshot); 3 not running (status file missing, its pid gone, or older than 5 s);
    /// 2 bad arguments or configuration.
    #[command(
        after_help = "Examples:\n  postern-gateway status\n  postern-gateway status --config /etc/postern/gateway.toml --json"
    )]
    Status {
        /// The TOML configuration file (for `state_dir`).
        #[arg(long, value_name = "FILE", default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// Print one JSON object (`running`, and when running the status fields).
        #[arg(long)]
        json: bool,
    },
    /// Remove Postern's nftables table (only `inet TABLE`; other tables are untouched).
    ///
    /// Example: postern-gateway uninstall
    Uninstall {
        #[arg(long, default_value = "postern")]
        table: String,
    },
}

/// Where `status` looks for the configuration unless told.
const DEFAULT_CONFIG: &str = "/etc/postern/gateway.toml";

fn main() -> ExitCode {
    let cli: Cli = postern_terminal::parse_args();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    match execute(cli.command) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `postern-gateway status`: see the command's help for the exit codes.
fn status(config: &std::path::Path, json: bool) -> ExitCode {
    use postern_gateway::status::{self, Observed};
    let cfg = match Config::load(config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let observed = status::observe(&cfg.state_dir, postern_gateway::unix_ms());
    let code = match &observed {
        Observed::Running(s) if s.connected => status::EXIT_CONNECTED,
        Observed::Running(_) => status::EXIT_DISCONNECTED,
        Observed::NotRunning(_) => status::EXIT_NOT_RUNNING,
    };
    match (&observed, json) {
        (Observed::Running(s), true) => {
            let mut v = serde_json::to_value(s).unwrap_or_default();
            v["running"] = serde_json::Value::Bool(true);
            println!("{v}");
        }
        (Observed::NotRunning(why), true) => {
            println!("{}", serde_json::json!({ "running": false, "error": why }));
        }
        (Observed::Running(s), false) => println!("{}", status::describe(s)),
        (Observed::NotRunning(why), false) => println!("{why}"),
    }
    ExitCode::from(code)
}

/// `postern-gateway enroll`: see the command's help for the exit codes.
fn enroll(config: &std::path::Path, token: &str, force: bool, json: bool) -> ExitCode {
    use postern_gateway::config::ControllerLink;
    use postern_gateway::control_enrollment::{self, GatewayToken};
    let token = match GatewayToken::parse(token) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: --token: {e}");
            return ExitCode::from(2);
        }
    };
    let cfg = match Config::load(config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    if !matches!(cfg.controller, ControllerLink::Tls(_)) {
        eprintln!("error: config {}: field `controller`: enrollment is for a remote controller: set `controller = \"HOST:PORT\"` instead of `controller_socket`", config.display());
        return ExitCode::from(2);
    }
    match control_enrollment::enroll(&cfg, &token, force) {
        Ok(done) if json => {
            println!("{}", serde_json::to_value(&done).unwrap_or_default());
            ExitCode::SUCCESS
        }
        Ok(done) => {
            println!(
                "enrolled as {:?} with {} (controller certificate sha256 {}, gateway key sha256 {}); files in {}",
                done.name,
                done.controller,
                done.controller_cert_sha256,
                done.key_sha256,
                done.dir.display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn execute(command: Command) -> Result<ExitCode> {
    let done = match command {
        Command::Run { config } => daemon::run(&Config::load(&config)?),
        Command::Keygen { out, force } => {
            let secret = keyfile::generate(&out, force)?;
            println!("{}", secret.public_key().to_text());
            Ok(())
        }
        Command::Pubkey { config } => {
            let cfg = Config::load(&config)?;
            println!("{}", keyfile::load(&cfg.key_file)?.public_key().to_text());
            Ok(())
        }
        Command::Check { config } => {
            let cfg = Config::load(&config)?;
            keyfile::load(&cfg.key_file)?;
            println!("{}: ok", config.display());
            Ok(())
        }
        Command::Enroll {
            config,
            token,
            force,
            json,
        } => return Ok(enroll(&config, &token, force, json)),
        // Its own exit codes (connected / disconnected / not running).
        Command::Status { config, json } => return Ok(status(&config, json)),
        Command::Uninstall { table } => {
            postern_firewall::Firewall::uninstall(&table)?;
            println!("removed table inet {table} (if it existed)");
            Ok(())
        }
    };
    done.map(|()| ExitCode::SUCCESS)
}
