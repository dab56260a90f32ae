//! `postern profile add|list|remove`, and the `--profile NAME` choice every command sees.
//!
//! Owns: the command-line side of profiles and the process-wide selected profile (set once
//! by `main` from `--profile` / `POSTERN_PROFILE`). Must not touch: the file format and
//! resolution rules (see `postern_client::profile`).

use std::sync::OnceLock;

use anyhow::{Context as _, Result};
use clap::Subcommand;
use postern_client::profile::{config_dir, resolve_profile, GatewayTarget, Profile, Profiles};

static SELECTED: OnceLock<Option<String>> = OnceLock::new();

/// Records `--profile` (call once, before running a command).
pub(crate) fn set_selected(profile: Option<String>) {
    let _ = SELECTED.set(profile);
}

/// The profile named by `--profile` / `POSTERN_PROFILE`, if any.
pub(crate) fn selected() -> Option<&'static str> {
    SELECTED.get().and_then(|p| p.as_deref())
}

/// Gateway and key for a command: its flags, else the selected or default profile.
pub(crate) fn resolve_gateway(
    gateway_flag: Option<&str>,
    gateway_key_flag: Option<&str>,
) -> Result<GatewayTarget> {
    Ok(resolve_profile(selected(), gateway_flag, gateway_key_flag)?)
}

/// The controller URL of the selected or default profile (for `enroll` without
/// `--controller`).
pub(crate) fn controller_url() -> Result<String> {
    let profiles = Profiles::load(&config_dir()?)?;
    let (name, p) = profiles.pick(selected())?;
    p.controller.clone().ok_or_else(|| {
        postern_client::exit::Fix::new(
            postern_client::exit::USAGE,
            format!("--controller is missing and profile {name:?} has no controller URL: pass --controller https://HOST:PORT"),
        )
        .into()
    })
}

#[derive(Debug, Subcommand)]
pub(crate) enum ProfileCommand {
    /// Add a named profile (the first one added becomes the default).
    ///
    /// Example: postern profile add work --gateway gw.example.org --gateway-key x25519:AbC...= --controller https://controller.example.org:8443
    Add {
        /// Profile name: letters, digits, '_', '.', '-'.
        name: String,
        /// Gateway host or address, optionally with :PORT (default port 62201).
        #[arg(long, value_name = "HOST[:PORT]")]
        gateway: String,
        /// The gateway's public key, as printed by `postern-gateway keygen`.
        #[arg(long, value_name = "x25519:KEY")]
        gateway_key: String,
        /// The controller's client API, https://HOST:PORT (used by `postern enroll`).
        #[arg(long, value_name = "URL")]
        controller: Option<String>,
        /// Make this the default profile.
        #[arg(long)]
        default: bool,
    },
    /// List the profiles (the default one is marked with *).
    ///
    /// Example: postern profile list --json
    List {
        /// Print {default, profiles: {NAME: {gateway, gateway_key, controller}}} as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Remove a profile (if it was the default, the first remaining one by name becomes it).
    ///
    /// Example: postern profile remove work
    Remove {
        /// The profile to remove.
        name: String,
    },
}

pub(crate) fn run(command: ProfileCommand) -> Result<()> {
    let dir = config_dir()?;
    let mut profiles = Profiles::load(&dir)?;
    let save = |p: &Profiles| {
        p.save(&dir)
            .with_context(|| format!("write {}", dir.join("profiles.toml").display()))
    };
    match command {
        ProfileCommand::Add {
            name,
            gateway,
            gateway_key,
            controller,
            default,
        } => {
            let profile = Profile {
                gateway,
                gateway_key,
                controller: controller.map(|c| c.trim_end_matches('/').to_owned()),
            };
            profiles.add(&name, profile, default)?;
            save(&profiles)?;
            let is_default = profiles.default.as_deref() == Some(name.as_str());
            eprintln!(
                "added profile {name}{}",
                if is_default { " (default)" } else { "" }
            );
        }
        ProfileCommand::List { json } => {
            if json {
                println!("{}", serde_json::to_string(&profiles)?);
            } else if profiles.profiles.is_empty() {
                eprintln!("no profiles: add one with `postern profile add NAME --gateway HOST --gateway-key x25519:...`");
            } else {
                for (name, p) in &profiles.profiles {
                    let mark = if profiles.default.as_deref() == Some(name) {
                        "*"
                    } else {
                        " "
                    };
                    println!(
                        "{mark} {name}  gateway {}  key {}  controller {}",
                        p.gateway,
                        p.gateway_key,
                        p.controller.as_deref().unwrap_or("-")
                    );
                }
            }
        }
        ProfileCommand::Remove { name } => {
            profiles.remove(&name)?;
            save(&profiles)?;
            eprintln!(
                "removed profile {name}; default is now {}",
                profiles.default.as_deref().unwrap_or("none")
            );
        }
    }
    Ok(())
}
