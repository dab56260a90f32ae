//! CLI for identity: `user`, `group`, `audit` and the `device rename|delete|risk` commands,
//! plus the device listing's table and JSON.
//!
//! Owns: these commands' flags, help texts, output (tables, JSON, the TOTP QR code).
//! Must not touch: SQL (goes through `Registry`), exit codes (see `main`), other commands.

use std::io::Write;

use anyhow::Context as _;
use clap::{Args, Subcommand};
use postern_controller::audit::AuditRow;
use postern_controller::proto::snapshot::DeviceRecord;
use postern_controller::registry::{DeviceRow, Registry};
use qrcode::render::unicode::Dense1x2;
use qrcode::QrCode;
use serde::Serialize;

use crate::cli::{print_json, print_table, ListArgs};

type Open<'a> = &'a dyn Fn() -> anyhow::Result<Registry>;

#[derive(Debug, Subcommand)]
pub enum UserCommand {
    /// Add a user (devices and grants name users; policies name users and groups).
    #[command(after_help = "Example:\n  postern-controller user add alice")]
    Add {
        /// User name (1-128 of A-Z a-z 0-9 . _ - @ +).
        #[arg(value_name = "NAME")]
        name: String,
    },
    /// List users with their state, MFA enrollment and groups.
    #[command(
        after_help = "Example:\n  postern-controller user list\n  postern-controller user list --json"
    )]
    List(ListArgs),
    /// Disable a user: its devices fail MFA and policy checks until re-enabled.
    #[command(after_help = "Example:\n  postern-controller user disable alice")]
    Disable {
        #[arg(value_name = "NAME")]
        name: String,
    },
    /// Re-enable a disabled user.
    #[command(after_help = "Example:\n  postern-controller user enable alice")]
    Enable {
        #[arg(value_name = "NAME")]
        name: String,
    },
    /// Enroll (or re-enroll) a user in TOTP: prints the otpauth URI and a QR code once.
    #[command(
        after_help = "Example:\n  postern-controller user mfa alice\n  postern-controller user mfa alice --json\n\nScan the QR code with an authenticator app (RFC 6238, SHA-1, 6 digits, 30 s).\nA new enrollment replaces the old secret. The secret is shown only now: keep the\noutput private."
    )]
    Mfa {
        #[arg(value_name = "NAME")]
        name: String,
        /// Print {"user", "uri", "secret"} as JSON instead of the QR code.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum GroupCommand {
    /// Add a group.
    #[command(after_help = "Example:\n  postern-controller group add engineering")]
    Add {
        /// Group name (1-128 of A-Z a-z 0-9 . _ -).
        #[arg(value_name = "NAME")]
        name: String,
    },
    /// List groups with their members.
    #[command(
        after_help = "Example:\n  postern-controller group list\n  postern-controller group list --json"
    )]
    List(ListArgs),
    /// Add a user to a group.
    #[command(after_help = "Example:\n  postern-controller group add-member engineering alice")]
    AddMember {
        #[arg(value_name = "GROUP")]
        group: String,
        #[arg(value_name = "USER")]
        user: String,
    },
    /// Remove a user from a group.
    #[command(after_help = "Example:\n  postern-controller group remove-member engineering alice")]
    RemoveMember {
        #[arg(value_name = "GROUP")]
        group: String,
        #[arg(value_name = "USER")]
        user: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// List the newest audit rows (oldest first).
    #[command(
        after_help = "Example:\n  postern-controller audit list\n  postern-controller audit list --limit 500 --json"
    )]
    List(AuditListArgs),
}

#[derive(Debug, Args)]
pub struct AuditListArgs {
    /// How many of the newest rows to show.
    #[arg(long, value_name = "N", default_value_t = 50,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub limit: u32,
    /// Print the rows as a JSON array.
    #[arg(long)]
    pub json: bool,
}

/// The identity part of `device`, flattened into `cli::DeviceCommand`.
#[derive(Debug, Subcommand)]
pub enum DeviceIdentityCommand {
    /// Rename a device (by name or id).
    #[command(
        after_help = "Example:\n  postern-controller device rename alice-laptop alice-laptop-old"
    )]
    Rename {
        /// Device name or 32-hex device id.
        #[arg(value_name = "NAME_OR_ID")]
        name_or_id: String,
        /// New name, unique (1-64 of A-Z a-z 0-9 . _ -).
        #[arg(value_name = "NEW_NAME")]
        new_name: String,
    },
    /// Delete a device (by name or id) with its posture report; its name and key become free.
    #[command(
        after_help = "Example:\n  postern-controller device delete alice-laptop\n\nTo lock a device out but keep its record, use `device revoke` instead."
    )]
    Delete {
        /// Device name or 32-hex device id.
        #[arg(value_name = "NAME_OR_ID")]
        name_or_id: String,
    },
    /// Set a device's risk score (0 = no known risk ... 100), compared with policy thresholds.
    #[command(after_help = "Example:\n  postern-controller device risk alice-laptop 80")]
    Risk {
        /// Device name or 32-hex device id.
        #[arg(value_name = "NAME_OR_ID")]
        name_or_id: String,
        /// Risk score, 0-100.
        #[arg(value_name = "SCORE", value_parser = parse_risk, allow_hyphen_values = true)]
        score: u8,
    },
}

fn parse_risk(s: &str) -> Result<u8, String> {
    match s.parse::<u32>() {
        Ok(n) if n <= 100 => Ok(n as u8),
        _ => Err("use a risk score from 0 (no risk) to 100".into()),
    }
}

pub fn run_user(cmd: UserCommand, open: Open<'_>, mut out: &mut dyn Write) -> anyhow::Result<()> {
    match cmd {
        UserCommand::Add { name } => {
            open()?.add_user(&name)?;
            writeln!(out, "added user {name:?}")?;
        }
        UserCommand::List(args) => {
            let users = open()?.list_users()?;
            if args.json {
                print_json(&mut out, &users)?;
            } else {
                let rows = users
                    .into_iter()
                    .map(|u| {
                        vec![
                            u.name,
                            if u.disabled { "disabled" } else { "active" }.to_owned(),
                            if u.mfa_enrolled { "yes" } else { "no" }.to_owned(),
                            dash_if_empty(u.groups.join(",")),
                            u.created_at,
                        ]
                    })
                    .collect();
                print_table(
                    &mut out,
                    &["NAME", "STATUS", "MFA", "GROUPS", "CREATED"],
                    rows,
                )?;
            }
        }
        UserCommand::Disable { name } => set_disabled(open, out, &name, true)?,
        UserCommand::Enable { name } => set_disabled(open, out, &name, false)?,
        UserCommand::Mfa { name, json } => {
            let enrollment = open()?.enroll_totp(&name, unix_now()?)?;
            if json {
                // Borrowed fields: the secret is serialized straight from its zeroizing buffer.
                let value = MfaJson {
                    user: &name,
                    uri: enrollment.uri.as_str(),
                    secret: enrollment.secret_base32.as_str(),
                };
                serde_json::to_writer_pretty(&mut *out, &value).context("writing JSON")?;
                writeln!(out)?;
            } else {
                let qr = QrCode::new(enrollment.uri.as_bytes())
                    .context("rendering the otpauth URI as a QR code")?;
                // Light modules are drawn as blocks (the terminal's text colour), so the code
                // scans on the usual light-text-on-dark terminal; the quiet zone frames it.
                let image = qr
                    .render::<Dense1x2>()
                    .dark_color(Dense1x2::Light)
                    .light_color(Dense1x2::Dark)
                    .quiet_zone(true)
                    .build();
                writeln!(
                    out,
                    "TOTP enrolled for user {name:?}; scan this code with an authenticator app:"
                )?;
                writeln!(out, "{image}")?;
                writeln!(out, "{}", enrollment.uri.as_str())?;
                writeln!(
                    out,
                    "secret (type-in): {}\nThis secret is shown only now; any older enrollment of {name:?} no longer works.",
                    enrollment.secret_base32.as_str()
                )?;
            }
        }
    }
    Ok(())
}

fn set_disabled(
    open: Open<'_>,
    out: &mut dyn Write,
    name: &str,
    disabled: bool,
) -> anyhow::Result<()> {
    let changed = open()?.set_user_disabled(name, disabled)?;
    let state = if disabled { "disabled" } else { "enabled" };
    if changed {
        writeln!(out, "{state} user {name:?}")?;
    } else {
        writeln!(out, "user {name:?} was already {state}; nothing changed")?;
    }
    Ok(())
}

pub fn run_group(cmd: GroupCommand, open: Open<'_>, mut out: &mut dyn Write) -> anyhow::Result<()> {
    match cmd {
        GroupCommand::Add { name } => {
            open()?.add_group(&name)?;
            writeln!(out, "added group {name:?}")?;
        }
        GroupCommand::List(args) => {
            let groups = open()?.list_groups()?;
            if args.json {
                print_json(&mut out, &groups)?;
            } else {
                let rows = groups
                    .into_iter()
                    .map(|g| vec![g.name, dash_if_empty(g.members.join(",")), g.created_at])
                    .collect();
                print_table(&mut out, &["NAME", "MEMBERS", "CREATED"], rows)?;
            }
        }
        GroupCommand::AddMember { group, user } => {
            if open()?.add_group_member(&group, &user)? {
                writeln!(out, "added user {user:?} to group {group:?}")?;
            } else {
                writeln!(
                    out,
                    "user {user:?} already is a member of group {group:?}; nothing changed"
                )?;
            }
        }
        GroupCommand::RemoveMember { group, user } => {
            open()?.remove_group_member(&group, &user)?;
            writeln!(out, "removed user {user:?} from group {group:?}")?;
        }
    }
    Ok(())
}

pub fn run_audit(cmd: AuditCommand, open: Open<'_>, mut out: &mut dyn Write) -> anyhow::Result<()> {
    match cmd {
        AuditCommand::List(args) => {
            let rows: Vec<AuditRow> = open()?.list_audit(args.limit)?;
            if args.json {
                print_json(&mut out, &rows)?;
            } else {
                let rows = rows
                    .into_iter()
                    .map(|r| vec![r.at, r.actor, r.action, r.subject, r.detail.to_string()])
                    .collect();
                print_table(
                    &mut out,
                    &["AT", "ACTOR", "ACTION", "SUBJECT", "DETAIL"],
                    rows,
                )?;
            }
        }
    }
    Ok(())
}

pub fn run_device(
    cmd: DeviceIdentityCommand,
    open: Open<'_>,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    match cmd {
        DeviceIdentityCommand::Rename {
            name_or_id,
            new_name,
        } => {
            let d = open()?.rename_device(&name_or_id, &new_name)?;
            writeln!(out, "device {} is now named {:?}", d.id, d.name)?;
        }
        DeviceIdentityCommand::Delete { name_or_id } => {
            let d = open()?.delete_device(&name_or_id)?;
            writeln!(out, "deleted device {:?} (id {})", d.name, d.id)?;
        }
        DeviceIdentityCommand::Risk { name_or_id, score } => {
            let d = open()?.set_device_risk(&name_or_id, score)?;
            writeln!(
                out,
                "device {:?} (id {}) risk score is {score}",
                d.name, d.id
            )?;
        }
    }
    Ok(())
}

/// `user mfa --json` output.
#[derive(Debug, Serialize)]
struct MfaJson<'a> {
    user: &'a str,
    uri: &'a str,
    secret: &'a str,
}

/// A device as `device list --json` prints it: the record's fields plus identity state.
#[derive(Debug, Serialize)]
struct DeviceListEntry {
    #[serde(flatten)]
    record: DeviceRecord,
    created_at: String,
    /// Unix seconds of the last MFA from this device, or null.
    last_mfa: Option<u64>,
    risk: u8,
}

/// `device list`: a table (or JSON with `--json`) of every device.
pub fn print_devices(
    rows: Vec<DeviceRow>,
    json: bool,
    mut out: &mut dyn Write,
) -> anyhow::Result<()> {
    if json {
        let entries: Vec<DeviceListEntry> = rows
            .into_iter()
            .map(|r| DeviceListEntry {
                record: r.record,
                created_at: r.created_at,
                last_mfa: r.last_mfa,
                risk: r.risk,
            })
            .collect();
        return print_json(&mut out, &entries);
    }
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
                r.last_mfa.map_or_else(
                    || "never".to_owned(),
                    postern_controller::invite::format_unix,
                ),
                r.risk.to_string(),
                r.record.public_key,
            ]
        })
        .collect();
    print_table(
        &mut out,
        &[
            "NAME",
            "USER",
            "ID",
            "STATUS",
            "CREATED",
            "LAST MFA",
            "RISK",
            "PUBLIC KEY",
        ],
        rows,
    )?;
    Ok(())
}

fn dash_if_empty(s: String) -> String {
    if s.is_empty() {
        "-".to_owned()
    } else {
        s
    }
}

fn unix_now() -> anyhow::Result<u64> {
    Ok(std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .context("system clock is before 1970")?
        .as_secs())
}
