//! `postern-controller` entry point: parses arguments, sets up logging and signals, runs
//! the command and maps failures to one stderr line and an exit code.
//!
//! Owns: exit codes (0 ok, 1 runtime error, 2 usage/validation error), tracing setup,
//! SIGINT/SIGTERM registration. Must not touch: registry logic or output formats
//! (see `cli`, `postern_controller::registry`).

mod cli;
mod cmd_gateway;
mod cmd_identity;
mod cmd_policy;
mod cmd_session;

use std::io::IsTerminal as _;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::Context as _;
use postern_controller::admin;
use postern_controller::backup::BackupError;
use postern_controller::registry::RegistryError;
use postern_controller::sync::SyncError;

fn main() -> ExitCode {
    let parsed: cli::Cli = postern_terminal::parse_args();
    let serving = matches!(parsed.command, cli::Command::Serve(_));
    init_logging(if serving { "info" } else { "warn" });
    if serving && std::env::var_os(admin::DIRECT_ENV).is_some() {
        eprintln!("error: `serve` cannot be run through the admin socket");
        return ExitCode::from(2);
    }
    if !serving && !parsed.direct && std::env::var_os(admin::DIRECT_ENV).is_none() {
        let socket = parsed
            .admin_socket
            .clone()
            .unwrap_or_else(|| admin::default_socket(&parsed.db));
        match admin::call(&socket, &std::env::args_os().skip(1).collect::<Vec<_>>()) {
            Ok(answer) => return relay(&answer),
            // Controller stopped: the CLI works on the database file itself.
            Err(admin::AdminClientError::NotRunning(_)) => {}
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(1);
            }
        }
    }
    match cli::run(parsed, register_stop) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let msg = format!("{e:#}").replace('\n', " ");
            eprintln!("error: {msg}");
            ExitCode::from(exit_code(&e))
        }
    }
}

/// Prints what the controller's run of the command printed and exits like it did.
fn relay(answer: &admin::AdminResponse) -> ExitCode {
    use std::io::Write as _;
    let _ = std::io::stdout().write_all(answer.stdout.as_bytes());
    let _ = std::io::stderr().write_all(answer.stderr.as_bytes());
    ExitCode::from(u8::try_from(answer.exit).unwrap_or(1))
}

fn exit_code(e: &anyhow::Error) -> u8 {
    let validation = e.chain().any(|c| {
        c.downcast_ref::<cli::UsageError>().is_some()
            || c.downcast_ref::<RegistryError>()
                .is_some_and(RegistryError::is_validation)
            || c.downcast_ref::<BackupError>()
                .is_some_and(BackupError::is_validation)
            || matches!(
                c.downcast_ref::<SyncError>(),
                Some(SyncError::Registry(r)) if r.is_validation()
            )
    });
    if validation {
        2
    } else {
        1
    }
}

/// Clap renders several lines (error, usage, tip); keep the substance on one line.
fn init_logging(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

/// First SIGINT/SIGTERM sets the flag (clean stop); a second one exits at once.
fn register_stop() -> anyhow::Result<Arc<AtomicBool>> {
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register_conditional_shutdown(sig, 1, Arc::clone(&stop))
            .context("registering signal handler")?;
        signal_hook::flag::register(sig, Arc::clone(&stop))
            .context("registering signal handler")?;
    }
    Ok(stop)
}
