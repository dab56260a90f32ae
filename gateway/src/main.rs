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
    /// Remove Postern's nftables table (only `inet TABLE`; other tables are untouched).
    ///
    /// Example: postern-gateway uninstall
    Uninstall {
        #[arg(long, default_value = "postern")]
        table: String,
    },
}

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
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn execute(command: Command) -> Result<()> {
    match command {
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
        Command::Uninstall { table } => {
            postern_firewall::Firewall::uninstall(&table)?;
            println!("removed table inet {table} (if it existed)");
            Ok(())
        }
    }
}
