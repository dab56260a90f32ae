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
use postern_controller::admin;
use postern_controller::backup;
use postern_controller::proto::keys::DevicePublicKey;
use postern_controller::proto::snapshot::AppProtocol;
use postern_controller::registry::Registry;
use postern_controller::sync::{self, ServeConfig};
use postern_controller::{api, api_identity, invite};

const DEVICE_INVITE_HELP: &str = "Example:\n  postern-controller device invite alice-laptop --user alice --expires 24h\n  (on the device:) postern enroll --controller https://controller.example.org:8443 --token postern-invite:v1:...\n\nToken format: postern-invite:v1:<base64url 32-byte secret>:<hex SHA-256 of the controller's\nAPI certificate>. The client pins that certificate. Only the secret's SHA-256 is stored;\nthe token works once, until it expires. Treat it like a password.";

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

    /// The running controller's admin socket [default: the --db path + ".admin.sock"].
    /// When a controller listens there, every command runs through it (root only) and
    /// gateways see the change at once; when none does, the CLI opens the database itself.
    #[arg(long, global = true, env = "POSTERN_ADMIN_SOCKET", value_name = "PATH")]
    pub admin_socket: Option<PathBuf>,

    /// Open the database directly even if a controller is running (changes still reach
    /// gateways, at the controller's next 50 ms revision poll).
    #[arg(long, global = true)]
    pub direct: bool,

    /// Directory of the client API's TLS identity (cert.pem, key.pem; created 0700 with a
    /// 0600 key if missing) [default: `api/` beside the --db file].
    #[arg(long, global = true, env = "POSTERN_API_DIR", value_name = "DIR")]
    pub api_dir: Option<PathBuf>,

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
    /// Apply, show and explain the access policy (docs/policy.md).
    #[command(
        subcommand,
        after_help = "Example:\n  postern-controller policy apply policy.toml --dry-run\n  postern-controller policy apply policy.toml\n  postern-controller policy explain --device alice-laptop --app wiki"
    )]
    Policy(crate::cmd_policy::PolicyCommand),
    /// Add, list, disable and enable users; enroll them in TOTP.
    #[command(
        subcommand,
        after_help = "Example:\n  postern-controller user add alice\n  postern-controller user mfa alice\n  postern-controller user list --json"
    )]
    User(crate::cmd_identity::UserCommand),
    /// Add and list groups; add and remove members.
    #[command(
        subcommand,
        after_help = "Example:\n  postern-controller group add engineering\n  postern-controller group add-member engineering alice\n  postern-controller group list"
    )]
    Group(crate::cmd_identity::GroupCommand),
    /// Show the audit trail of registry changes and MFA decisions.
    #[command(
        subcommand,
        after_help = "Example:\n  postern-controller audit list --limit 20\n  postern-controller audit list --json"
    )]
    Audit(crate::cmd_identity::AuditCommand),
    /// List the gateways' live sessions; kill one.
    #[command(
        subcommand,
        after_help = "Example:\n  postern-controller session list\n  postern-controller session kill edge-1:0a1b2c"
    )]
    Session(crate::cmd_session::SessionCommand),
    /// Add, list and remove remote gateways (enrollment tokens for the TLS control channel).
    #[command(
        subcommand,
        after_help = "Example:\n  postern-controller gateway add edge-1 --expires 24h\n  postern-controller gateway list --json\n  postern-controller gateway remove edge-1"
    )]
    Gateway(crate::cmd_gateway::GatewayCommand),
    /// Copy the live registry into a new file (online: the controller keeps running).
    #[command(
        after_help = "Example:\n  postern-controller backup /var/backups/postern-$(date +%F).db\n\nThe copy is a complete SQLite database (mode 0600: it holds TOTP secrets), checked with\nPRAGMA integrity_check before the command succeeds. It never overwrites a file.\nRestore: stop the controller, copy the backup over the --db file (remove its -wal\nand -shm files), start the controller."
    )]
    Backup {
        /// The new backup file (must not exist).
        file: PathBuf,
        /// Print the outcome as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Serve registry snapshots to gateways on a Unix socket (runs until SIGINT/SIGTERM).
    #[command(
        after_help = "Example:\n  postern-controller --db /var/lib/postern/registry.db serve --socket /run/postern/controller.sock\n  postern-controller serve --socket /run/postern/controller.sock --api 0.0.0.0:8443 --posture-ttl 1h\n  postern-controller serve --socket /run/postern/controller.sock --gateway-listen 0.0.0.0:7443\n\nWith --api the client HTTPS API (enroll, login, posture; docs/api.md) runs too.\nWith --gateway-listen remote gateways connect over mutual TLS (docs/control-channel.md;\nenroll each with a token from `postern-controller gateway add NAME`).\n\nProtocol: one JSON line per request, {\"after_revision\": N}; answered with {\"snapshot\": {...}} as soon as the revision differs from N, or after 10 s (heartbeat)."
    )]
    Serve(ServeArgs),
}

#[derive(Debug, Subcommand)]
pub enum DeviceCommand {
    /// Show a device's posture facts and the policy's verdict for every app.
    #[command(
        after_help = "Example:\n  postern-controller device posture alice-laptop\n  postern-controller device posture alice-laptop --json\n\nFor each app: allow, or deny with the failing requirement and its remediation text."
    )]
    Posture(crate::cmd_policy::PostureArgs),
    /// Create a one-time enrollment token for a new device; prints the token once.
    #[command(after_help = DEVICE_INVITE_HELP)]
    Invite {
        /// Name the device will get (1-64 of A-Z a-z 0-9 . _ -); must not exist yet.
        #[arg(value_name = "NAME")]
        name: String,
        /// User who will own the device (must exist: `postern-controller user add U`).
        #[arg(long, value_name = "USER")]
        user: String,
        /// How long the token stays valid: 1m to 30d (e.g. 30m, 24h, 7d).
        #[arg(long, value_name = "DURATION", default_value = "24h")]
        expires: String,
        /// Print {token, device_name, user, expires_at, cert_sha256} as JSON.
        #[arg(long)]
        json: bool,
    },
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
    #[command(flatten)]
    Identity(crate::cmd_identity::DeviceIdentityCommand),
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
    /// Do not open the admin socket (admin commands then write the database directly).
    #[arg(long)]
    pub no_admin_socket: bool,
    /// Also serve the client HTTPS API (enroll, login, posture) on this address, e.g.
    /// 127.0.0.1:8443 or [::]:8443 (port 0 picks a free port; the log line
    /// `api listening on ADDR` names it).
    #[arg(long, value_name = "ADDR")]
    pub api: Option<std::net::SocketAddr>,
    /// How long a device's posture report stays valid: 1m to 30d.
    #[arg(long, value_name = "DURATION", default_value = "1h", value_parser = parse_duration)]
    pub posture_ttl: u64,
    /// Also serve the TLS control channel for remote gateways on this address, e.g.
    /// 0.0.0.0:7443 (port 0 picks a free port; the log line `gateway channel listening on
    /// ADDR` names it). Gateways enroll with a token from `gateway add`.
    #[arg(long, value_name = "ADDR")]
    pub gateway_listen: Option<std::net::SocketAddr>,
    /// How long a stream gateway may stay silent before it is dropped (tests only).
    #[arg(long, hide = true, value_name = "MS", default_value_t = 60_000,
          value_parser = clap::value_parser!(u64).range(100..=3_600_000))]
    pub gateway_silence_ms: u64,
}

/// The user's input was rejected (exit code 2).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

fn parse_duration(s: &str) -> Result<u64, String> {
    postern_controller::invite::parse_expiry(s)
        .map_err(|_| "use a duration from 1m to 30d such as 30m, 1h or 7d".to_owned())
}

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
    let open = || {
        let mut registry = Registry::open(&db)?;
        // Set by the controller when the command came through the admin socket.
        if let Ok(actor) = std::env::var(admin::ACTOR_ENV) {
            registry.set_actor(actor);
        }
        Ok::<_, anyhow::Error>(registry)
    };
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
        Command::Device(DeviceCommand::Invite {
            name,
            user,
            expires,
            json,
        }) => {
            let api_dir = cli
                .api_dir
                .clone()
                .unwrap_or_else(|| api_identity::default_dir(&db));
            invite_device(&mut out, &open, &api_dir, &name, &user, &expires, json)?;
        }
        Command::Device(DeviceCommand::List(args)) => {
            crate::cmd_identity::print_devices(open()?.list_devices()?, args.json, &mut out)?;
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
        Command::Policy(cmd) => crate::cmd_policy::run(cmd, &open, &mut out)?,
        Command::User(cmd) => crate::cmd_identity::run_user(cmd, &open, &mut out)?,
        Command::Group(cmd) => crate::cmd_identity::run_group(cmd, &open, &mut out)?,
        Command::Audit(cmd) => crate::cmd_identity::run_audit(cmd, &open, &mut out)?,
        Command::Gateway(cmd) => {
            let api_dir = cli
                .api_dir
                .clone()
                .unwrap_or_else(|| api_identity::default_dir(&db));
            crate::cmd_gateway::run(cmd, &open, &api_dir, &mut out)?
        }
        Command::Session(cmd) => crate::cmd_session::run(cmd, &open, &mut out)?,
        Command::Device(DeviceCommand::Identity(cmd)) => {
            crate::cmd_identity::run_device(cmd, &open, &mut out)?
        }
        Command::Device(DeviceCommand::Posture(args)) => {
            crate::cmd_policy::posture(args, &open, &mut out)?
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
        Command::Backup { file, json } => {
            let outcome = backup::backup(&open()?, &file)?;
            if json {
                serde_json::to_writer_pretty(&mut out, &outcome).context("writing JSON")?;
                writeln!(out)?;
            } else {
                writeln!(
                    out,
                    "backed up revision {} (schema {}, {} bytes) to {}",
                    outcome.revision,
                    outcome.schema_version,
                    outcome.bytes,
                    outcome.path.display()
                )?;
            }
        }
        Command::Serve(args) => {
            drop(out);
            let cfg = ServeConfig {
                db: db.clone(),
                socket: args.socket,
                hold: Duration::from_millis(args.hold_ms),
                admin_socket: (!args.no_admin_socket).then(|| {
                    cli.admin_socket
                        .clone()
                        .unwrap_or_else(|| admin::default_socket(&db))
                }),
                gateway_listen: args.gateway_listen,
                gateway_read_silence: Duration::from_millis(args.gateway_silence_ms),
                api_dir: cli
                    .api_dir
                    .clone()
                    .unwrap_or_else(|| api_identity::default_dir(&db)),
            };
            let stop = stop()?;
            let api_server = match args.api {
                Some(listen) => Some(
                    api::start(
                        &api::ApiConfig {
                            db: db.clone(),
                            listen,
                            api_dir: cli
                                .api_dir
                                .clone()
                                .unwrap_or_else(|| api_identity::default_dir(&db)),
                            posture_ttl: Duration::from_secs(args.posture_ttl),
                        },
                        Arc::clone(&stop),
                    )
                    .context("starting the client API (--api)")?,
                ),
                None => None,
            };
            let served = sync::serve(&cfg, Arc::clone(&stop));
            if let Some(server) = api_server {
                // The API thread stops on the same flag; make sure it is set on errors too.
                stop.store(true, std::sync::atomic::Ordering::Relaxed);
                server.join();
            }
            served?;
        }
    }
    Ok(())
}

/// `device invite`: loads (or creates) the API identity for its fingerprint, stores the
/// invite and prints the token once.
fn invite_device(
    out: &mut impl Write,
    open: &dyn Fn() -> anyhow::Result<Registry>,
    api_dir: &std::path::Path,
    name: &str,
    user: &str,
    expires: &str,
    json: bool,
) -> anyhow::Result<()> {
    let validation = |e: invite::InviteError| -> anyhow::Error {
        if e.is_validation() {
            UsageError(e.to_string()).into()
        } else {
            e.into()
        }
    };
    let ttl = invite::parse_expiry(expires).map_err(validation)?;
    let identity = api_identity::load_or_create(api_dir)?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .context("system clock is before 1970")?
        .as_secs();
    let created = open()?
        .create_invite(name, user, ttl, identity.fingerprint_bytes(), now)
        .map_err(validation)?;
    let token = created.token.to_text();
    if json {
        let v = serde_json::json!({
            "token": token.as_str(),
            "device_name": created.device_name,
            "user": created.user,
            "expires_at": invite::format_unix(created.expires_at),
            "cert_sha256": identity.fingerprint,
        });
        serde_json::to_writer_pretty(&mut *out, &v).context("writing JSON")?;
        writeln!(out)?;
    } else {
        writeln!(out, "{}", token.as_str())?;
        eprintln!(
            "one-time token for device {:?} (user {:?}), valid until {}; on the device run: postern enroll --controller https://HOST:PORT --token TOKEN",
            created.device_name,
            created.user,
            invite::format_unix(created.expires_at)
        );
    }
    Ok(())
}

pub(crate) fn print_json<T: serde::Serialize>(
    out: &mut impl Write,
    records: &[T],
) -> anyhow::Result<()> {
    serde_json::to_writer_pretty(&mut *out, records).context("writing JSON")?;
    writeln!(out)?;
    Ok(())
}

/// Left-aligned columns separated by two spaces; the last column is not padded.
pub(crate) fn print_table(
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
