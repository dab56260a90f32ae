//! `postern`: the user's client: device key generation and knocking.
//!
//! Owns the command line, the device key file (mode 0600) and sending one SPA datagram.
//! Packet construction and crypto belong to the protocol crate.

use std::io::Write;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use postern_protocol::keys::DeviceSigningKey;
use postern_protocol::packet::flags;
use zeroize::Zeroizing;

mod controller_cmd;
mod docs_cmd;
mod knocker;
mod posture_cmd;
mod profile_cmd;
mod reply_wait;
mod session_cmd;
mod status_cmd;

/// The SPA port a gateway listens to (sniffs) when none is given.
const DEFAULT_SPA_PORT: u16 = 62201;

/// Postern client: prove who you are, and a dark server opens one door for you.
#[derive(Debug, Parser)]
#[command(name = "postern", version)]
struct Cli {
    /// Use this profile (gateway, gateway key, controller) instead of the default one.
    #[arg(long, global = true, value_name = "NAME", env = "POSTERN_PROFILE")]
    profile: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create this device's ed25519 key (file mode 0600) and print its public key for the admin.
    ///
    /// Example: postern keygen    (then give the printed `ed25519:...` line to your admin)
    Keygen {
        /// Key file (default: ~/.config/postern/device.key).
        #[arg(long, value_name = "FILE")]
        key: Option<PathBuf>,
        /// Replace an existing key (the admin must enroll the new public key).
        #[arg(long)]
        force: bool,
    },
    /// Print this device's public key and device id.
    ///
    /// Example: postern pubkey --json
    Pubkey {
        #[arg(long, value_name = "FILE")]
        key: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Send one SPA knock asking the gateway to open APP for this device's address.
    ///
    /// Example: postern knock ssh --gateway gw.example.org --gateway-key x25519:AbC...=
    Knock {
        /// The app to open, as named by the admin (e.g. `ssh`).
        app: String,
        /// Gateway host or address, optionally with :PORT (default port 62201; default:
        /// from the profile).
        #[arg(long, value_name = "HOST[:PORT]")]
        gateway: Option<String>,
        /// The gateway's public key, as printed by `postern-gateway keygen` (default: from
        /// the profile).
        #[arg(long, value_name = "x25519:KEY")]
        gateway_key: Option<String>,
        #[arg(long, value_name = "FILE")]
        key: Option<PathBuf>,
        /// Claim this address in the signed knock instead of this host's own source
        /// address (for NAT). Today's gateway refuses a claim that differs from the
        /// packet's source; the policy engine will decide when it may.
        #[arg(long, value_name = "ADDR")]
        allow_ip: Option<IpAddr>,
        /// Wait this many milliseconds for the gateway's signed reply: a denial says why
        /// and what to do (exit status 8); a grant is acknowledged with the session length
        /// (the knock asks for it). 0 = send and exit at once, asking for no reply.
        #[arg(long, value_name = "MS", default_value_t = 500)]
        wait_reply: u64,
        /// Print what was sent as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Open APP and keep the session alive while COMMAND runs; close it when COMMAND exits.
    ///
    /// Example: postern connect web --gateway gw.example.org --gateway-key x25519:AbC...= -- curl http://gw.example.org:8080/
    Connect(session_cmd::ConnectArgs),
    /// ssh ProxyCommand: knock, wait for HOST:PORT, then carry stdin/stdout over TCP.
    ///
    /// Example (~/.ssh/config): ProxyCommand postern ssh-proxy %h %p --app ssh --gateway %h --gateway-key x25519:AbC...=
    SshProxy(session_cmd::SshProxyArgs),
    /// Register this device with the controller using the admin's one-time invite token.
    ///
    /// Example: postern enroll --controller https://controller.example.org:8443 --token postern-invite:v1:...
    ///
    /// Only the public key is sent (with a signature proving this device holds the private
    /// key). The controller's certificate is pinned from the token; the settings are saved
    /// as controller.json beside the key (mode 0600).
    Enroll {
        /// The controller's client API, https://HOST:PORT (default: the profile's).
        #[arg(long, value_name = "URL")]
        controller: Option<String>,
        /// The token printed by `postern-controller device invite`.
        #[arg(
            long,
            value_name = "TOKEN",
            env = "POSTERN_INVITE_TOKEN",
            hide_env_values = true
        )]
        token: String,
        /// Device key file (default: ~/.config/postern/device.key).
        #[arg(long, value_name = "FILE")]
        key: Option<PathBuf>,
        /// Create the device key first if it does not exist yet.
        #[arg(long)]
        generate: bool,
        /// Print {device_id, name, user} as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Prove the second factor (TOTP code from your authenticator app) to the controller.
    ///
    /// Example: postern login --code 123456    (without --code, asks on the terminal)
    Login {
        /// The 6-digit code; asked for on the terminal when omitted.
        #[arg(long, value_name = "CODE")]
        code: Option<String>,
        /// Device key file (default: ~/.config/postern/device.key).
        #[arg(long, value_name = "FILE")]
        key: Option<PathBuf>,
        /// Print {device_id, last_mfa} as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Collect this device's posture and show it (table or --json), or `report` it.
    ///
    /// Example: postern posture --json
    Posture(posture_cmd::PostureArgs),
    /// Manage named profiles (gateway, gateway key, controller URL).
    ///
    /// Example: postern profile add work --gateway gw.example.org --gateway-key x25519:AbC...=
    #[command(subcommand)]
    Profile(profile_cmd::ProfileCommand),
    /// Enrollment, MFA age, posture verdict and clock offset to the controller.
    ///
    /// Example: postern status --json
    Status(status_cmd::StatusArgs),
    /// Print a shell completion script.
    ///
    /// Example: postern completions bash > /etc/bash_completion.d/postern
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
    /// Print the man page (or write one page per command into --dir).
    ///
    /// Example: postern man | man -l -    or    postern man --dir /usr/local/share/man/man1
    Man {
        /// Write postern.1 and postern-COMMAND.1 here instead of printing postern.1.
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
    /// Show how the controller sees this device (name, user, last MFA).
    ///
    /// Example: postern whoami --json
    Whoami {
        /// Device key file (default: ~/.config/postern/device.key).
        #[arg(long, value_name = "FILE")]
        key: Option<PathBuf>,
        /// Print {device_id, name, user, last_mfa} as JSON.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli: Cli = postern_terminal::parse_args();
    profile_cmd::set_selected(cli.profile);
    match execute(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(postern_client::exit::status_of(&e))
        }
    }
}

fn execute(command: Command) -> Result<()> {
    match command {
        Command::Keygen { key, force } => {
            let path = key_path(key)?;
            let signing = generate_key(&path, force)?;
            let public = signing.public_key();
            println!("{}", public.to_text());
            eprintln!(
                "device id {} (key saved to {})",
                public.device_id(),
                path.display()
            );
            Ok(())
        }
        Command::Pubkey { key, json } => {
            let public = load_key(&key_path(key)?)?.public_key();
            if json {
                let v = serde_json::json!({ "public_key": public.to_text(), "device_id": public.device_id().to_string() });
                println!("{v}");
            } else {
                println!("{}", public.to_text());
            }
            Ok(())
        }
        Command::Knock {
            app,
            gateway,
            gateway_key,
            key,
            allow_ip,
            wait_reply,
            json,
        } => {
            let target = profile_cmd::resolve_gateway(gateway.as_deref(), gateway_key.as_deref())?;
            knock(
                &app,
                &target.gateway,
                &target.gateway_key,
                &key_path(key)?,
                allow_ip,
                std::time::Duration::from_millis(wait_reply),
                json,
            )
        }
        Command::Connect(args) => {
            let code = session_cmd::connect(args)?;
            std::process::exit(code)
        }
        Command::SshProxy(args) => session_cmd::ssh_proxy(args),
        Command::Enroll {
            controller,
            token,
            key,
            generate,
            json,
        } => {
            let controller = match controller {
                Some(c) => c,
                None => profile_cmd::controller_url()?,
            };
            controller_cmd::enroll(&controller, &token, &key_path(key)?, generate, json)
        }
        Command::Login { code, key, json } => controller_cmd::login(code, &key_path(key)?, json),
        Command::Posture(args) => posture_cmd::run(args),
        Command::Profile(command) => profile_cmd::run(command),
        Command::Status(args) => status_cmd::run(args),
        Command::Completions { shell } => docs_cmd::completions(shell),
        Command::Man { dir } => docs_cmd::man(dir),
        Command::Whoami { key, json } => controller_cmd::whoami(&key_path(key)?, json),
    }
}

/// The device's clock offset to its controller, when it is enrolled (the gateway refuses
/// knocks more than `max_skew_secs` off its own clock).
fn clock_hint(key_file: &Path) -> String {
    let cfg_path = postern_client::api_client::ControllerConfig::path_beside(key_file);
    let offset = postern_client::api_client::ControllerConfig::read(&cfg_path)
        .ok()
        .and_then(|cfg| {
            let pin = cfg.pin().ok()?;
            let client = postern_client::api_client::ApiClient::new(&cfg.url, pin).ok()?;
            client.clock_offset_ms().ok()
        });
    match offset {
        Some((offset_ms, _rtt)) => format!("the controller's clock is {offset_ms} ms ahead of this device's"),
        None => "compare this device's clock with the gateway's: `postern status` shows the offset when enrolled".to_owned(),
    }
}

fn knock(
    app: &str,
    gateway: &str,
    gateway_key: &str,
    key_file: &Path,
    allow_ip: Option<IpAddr>,
    wait_reply: std::time::Duration,
    json: bool,
) -> Result<()> {
    let knocker = knocker::Knocker::new(gateway, gateway_key, key_file, allow_ip)?;
    let target = knocker.target();
    let claimed = knocker.claimed();
    // While waiting, ask for an acknowledgement of an allow too, so a granted knock
    // returns as soon as the gateway has opened the door instead of after the full wait.
    let ask = if wait_reply.is_zero() {
        flags::KNOCK
    } else {
        flags::KNOCK | flags::ACK
    };
    let sent = knocker.send(app, ask)?;
    let reply = reply_wait::wait_reply(knocker.socket(), &sent.reply_key, wait_reply)?;
    let denied = reply
        .as_ref()
        .filter(|r| r.decision == postern_protocol::reply::ReplyDecision::Deny);
    if json {
        let reply_json = reply.as_ref().map(|r| {
            serde_json::json!({
                "decision": match r.decision {
                    postern_protocol::reply::ReplyDecision::Deny => "deny",
                    postern_protocol::reply::ReplyDecision::Allow => "allow",
                },
                "reason": r.reason, "message": r.message,
                "remediation": (!r.remediation.is_empty()).then_some(&r.remediation),
                "session_secs": (r.session_secs != 0).then_some(r.session_secs),
            })
        });
        let v = serde_json::json!({
            "sent": true, "gateway": target.to_string(), "app": app, "bytes": sent.bytes,
            "device_id": sent.device.to_string(), "claimed_addr": claimed.to_string(),
            "reply": reply_json,
        });
        println!("{v}");
    } else {
        eprintln!("knocked for {app} at {target} ({} bytes)", sent.bytes);
        if let Some(r) = reply
            .as_ref()
            .filter(|r| r.decision == postern_protocol::reply::ReplyDecision::Allow)
        {
            eprintln!("granted: session {} s", r.session_secs);
        }
        if let Some(r) = denied {
            println!("denied: {}", r.message);
            if !r.remediation.is_empty() {
                println!("fix: {}", r.remediation);
            }
        }
    }
    if denied.is_some() {
        std::process::exit(i32::from(postern_client::exit::DENIED));
    }
    if reply.is_none() && !wait_reply.is_zero() {
        // A gateway answers every authenticated knock it can decide on (the knock asked
        // for an acknowledgement); silence means it did not recognise this one.
        return Err(postern_client::exit::Fix::new(
            postern_client::exit::NO_ANSWER,
            format!(
                "no answer from the gateway at {target} within {} ms: check --gateway-key (the gateway prints it with `postern-gateway pubkey`), that this device is enrolled, and the clock ({}); or retry (UDP may be lost)",
                wait_reply.as_millis(),
                clock_hint(key_file)
            ),
        )
        .into());
    }
    Ok(())
}

/// "host", "host:port", "1.2.3.4", "[::1]:62201" → one socket address.
pub(crate) fn resolve(gateway: &str) -> Result<SocketAddr> {
    if let Ok(ip) = gateway.parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, DEFAULT_SPA_PORT));
    }
    let with_port = if gateway
        .rsplit_once(':')
        .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
        && !gateway.ends_with(']')
    {
        gateway.to_owned()
    } else {
        format!(
            "{}:{DEFAULT_SPA_PORT}",
            gateway.trim_start_matches('[').trim_end_matches(']')
        )
    };
    with_port
        .to_socket_addrs()
        .with_context(|| {
            format!("--gateway {gateway:?}: cannot resolve (write HOST, HOST:PORT or [V6]:PORT)")
        })?
        .next()
        .with_context(|| format!("--gateway {gateway:?}: no address found"))
}

/// The key file: the flag, or ~/.config/postern/device.key.
pub(crate) fn key_path(flag: Option<PathBuf>) -> Result<PathBuf> {
    if let Some(p) = flag {
        return Ok(p);
    }
    Ok(postern_client::profile::config_dir()?.join("device.key"))
}

pub(crate) fn generate_key(path: &Path, force: bool) -> Result<DeviceSigningKey> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("create directory {}", dir.display()))?;
    }
    let mut seed = Zeroizing::new([0u8; 32]);
    getrandom::getrandom(seed.as_mut()).context("read the OS random number generator")?;
    let signing = DeviceSigningKey::from_seed(*seed);
    let mut opts = std::fs::OpenOptions::new();
    // O_NOFOLLOW: a symlink planted at the key path must not redirect the secret.
    opts.write(true).mode(0o600).custom_flags(libc::O_NOFOLLOW);
    if force {
        opts.create(true).truncate(true);
    } else {
        opts.create_new(true);
    }
    let mut file = opts.open(path).with_context(|| {
        format!(
            "create key file {} (if it exists, pass --force to replace it)",
            path.display()
        )
    })?;
    file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    file.write_all(signing.to_text().as_bytes())?;
    file.sync_all()?;
    Ok(signing)
}

pub(crate) fn load_key(path: &Path) -> Result<DeviceSigningKey> {
    let meta = std::fs::metadata(path).with_context(|| {
        format!(
            "no device key at {}: run `postern keygen` first",
            path.display()
        )
    })?;
    if meta.permissions().mode() & 0o077 != 0 {
        bail!(
            "device key {} is readable by others: run `chmod 600 {}`",
            path.display(),
            path.display()
        );
    }
    let text = Zeroizing::new(
        std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?,
    );
    DeviceSigningKey::from_text(&text)
        .with_context(|| format!("{} is not a postern device key", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gateway_addresses_resolve_with_default_port() {
        assert_eq!(
            resolve("127.0.0.1").expect("v4").to_string(),
            "127.0.0.1:62201"
        );
        assert_eq!(
            resolve("127.0.0.1:9").expect("v4 port").to_string(),
            "127.0.0.1:9"
        );
        assert_eq!(resolve("::1").expect("v6").to_string(), "[::1]:62201");
        assert_eq!(resolve("[::1]:9").expect("v6 port").to_string(), "[::1]:9");
        assert_eq!(
            resolve("[::1]").expect("v6 bracket").to_string(),
            "[::1]:62201"
        );
    }

    #[test]
    fn key_file_is_private_and_round_trips() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("sub/device.key");
        let k = generate_key(&path, false).expect("generate");
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(
            load_key(&path).expect("load").public_key().to_text(),
            k.public_key().to_text()
        );
        assert!(
            generate_key(&path, false).is_err(),
            "must not overwrite without --force"
        );
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let err = load_key(&path).expect_err("0644 refused").to_string();
        assert!(err.contains("chmod 600"), "{err}");
    }
}
