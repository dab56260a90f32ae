//! `postern`: the user's client: device key generation and knocking.
//!
//! Owns the command line, the device key file (mode 0600) and sending one SPA datagram.
//! Packet construction and crypto belong to the protocol crate.

use std::io::Write;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs, UdpSocket};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use postern_protocol::keys::{DeviceSigningKey, GatewayPublicKey};
use postern_protocol::packet::{self, flags, Knock, SealRandomness};
use zeroize::Zeroizing;

mod controller_cmd;

/// The SPA port a gateway listens to (sniffs) when none is given.
const DEFAULT_SPA_PORT: u16 = 62201;

/// Postern client: prove who you are, and a dark server opens one door for you.
#[derive(Debug, Parser)]
#[command(name = "postern", version)]
struct Cli {
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
        /// Gateway host or address, optionally with :PORT (default port 62201).
        #[arg(long, value_name = "HOST[:PORT]")]
        gateway: String,
        /// The gateway's public key, as printed by `postern-gateway keygen`.
        #[arg(long, value_name = "x25519:KEY")]
        gateway_key: String,
        #[arg(long, value_name = "FILE")]
        key: Option<PathBuf>,
        /// Claim this address in the signed knock instead of this host's own source
        /// address (for NAT). Today's gateway refuses a claim that differs from the
        /// packet's source; the policy engine will decide when it may.
        #[arg(long, value_name = "ADDR")]
        allow_ip: Option<IpAddr>,
        /// Print what was sent as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Register this device with the controller using the admin's one-time invite token.
    ///
    /// Example: postern enroll --controller https://controller.example.org:8443 --token postern-invite:v1:...
    ///
    /// Only the public key is sent (with a signature proving this device holds the private
    /// key). The controller's certificate is pinned from the token; the settings are saved
    /// as controller.json beside the key (mode 0600).
    Enroll {
        /// The controller's client API, https://HOST:PORT.
        #[arg(long, value_name = "URL")]
        controller: String,
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
    /// Device posture commands.
    #[command(subcommand)]
    Posture(PostureCommand),
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

#[derive(Debug, Subcommand)]
enum PostureCommand {
    /// Send a posture report (signed by the device key) to the controller.
    ///
    /// Example: postern posture report --facts facts.json
    ///
    /// The file is the JSON report described in docs/posture.md, e.g.
    /// {"collected_at":"2026-11-23T10:00:00Z","os_family":"linux","disk_encrypted":true}.
    Report {
        /// The report file (at most 64 KiB).
        #[arg(long, value_name = "FILE.json")]
        facts: PathBuf,
        /// Device key file (default: ~/.config/postern/device.key).
        #[arg(long, value_name = "FILE")]
        key: Option<PathBuf>,
        /// Print {received_at, expires_at} as JSON.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli: Cli = postern_terminal::parse_args();
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
            json,
        } => knock(
            &app,
            &gateway,
            &gateway_key,
            &key_path(key)?,
            allow_ip,
            json,
        ),
        Command::Enroll {
            controller,
            token,
            key,
            generate,
            json,
        } => controller_cmd::enroll(&controller, &token, &key_path(key)?, generate, json),
        Command::Login { code, key, json } => controller_cmd::login(code, &key_path(key)?, json),
        Command::Posture(PostureCommand::Report { facts, key, json }) => {
            controller_cmd::posture_report(&facts, &key_path(key)?, json)
        }
        Command::Whoami { key, json } => controller_cmd::whoami(&key_path(key)?, json),
    }
}

fn knock(
    app: &str,
    gateway: &str,
    gateway_key: &str,
    key_file: &Path,
    allow_ip: Option<IpAddr>,
    json: bool,
) -> Result<()> {
    let gateway_key = GatewayPublicKey::from_text(gateway_key).context(
        "--gateway-key: expected the `x25519:...` line printed by `postern-gateway keygen`",
    )?;
    let signing = load_key(key_file)?;
    let target = resolve(gateway)?;
    let bind: SocketAddr = if target.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    }
    .parse()
    .context("literal wildcard address")?;
    let socket = UdpSocket::bind(bind).context("open a UDP socket")?;
    // Connecting picks the route and so the source address the gateway will see; the knock
    // claims (and signs) it, so a copy replayed from elsewhere opens nothing.
    socket
        .connect(target)
        .with_context(|| format!("no route to the gateway {target}"))?;
    let claimed = match allow_ip {
        Some(ip) => ip,
        None => socket
            .local_addr()
            .context("read the knock's source address")?
            .ip(),
    };
    let mut nonce = [0u8; 16];
    getrandom::getrandom(&mut nonce).context("read the OS random number generator")?;
    let mut ephemeral = Zeroizing::new([0u8; 32]);
    getrandom::getrandom(ephemeral.as_mut()).context("read the OS random number generator")?;
    let knock = Knock {
        device: signing.public_key().device_id(),
        timestamp_ms: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .context("system clock is before 1970")?
            .as_millis() as u64,
        nonce,
        flags: flags::KNOCK,
        app: app.to_owned(),
        claimed_addr: Some(claimed),
        posture_digest: [0; 32],
    };
    let datagram = packet::seal(
        &knock,
        &signing,
        &gateway_key,
        SealRandomness {
            ephemeral_secret: *ephemeral,
        },
    )
    .with_context(|| format!("build the knock for app {app:?}"))?;
    socket
        .send(&datagram)
        .with_context(|| format!("send the knock to {target}"))?;
    if json {
        let v = serde_json::json!({
            "sent": true, "gateway": target.to_string(), "app": app, "bytes": datagram.len(),
            "device_id": knock.device.to_string(), "claimed_addr": claimed.to_string(),
        });
        println!("{v}");
    } else {
        eprintln!("knocked for {app} at {target} ({} bytes)", datagram.len());
    }
    Ok(())
}

/// "host", "host:port", "1.2.3.4", "[::1]:62201" → one socket address.
fn resolve(gateway: &str) -> Result<SocketAddr> {
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
fn key_path(flag: Option<PathBuf>) -> Result<PathBuf> {
    if let Some(p) = flag {
        return Ok(p);
    }
    let base = match std::env::var_os("XDG_CONFIG_HOME") {
        Some(x) if !x.is_empty() => PathBuf::from(x),
        _ => PathBuf::from(std::env::var_os("HOME").context("HOME is not set: pass --key FILE")?)
            .join(".config"),
    };
    Ok(base.join("postern").join("device.key"))
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
