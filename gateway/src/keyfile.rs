//! The gateway's static key on disk: create (mode 0600, never overwriting by accident)
//! and load. Owns only file handling; the key format belongs to the protocol crate.
//! Must never log or print the secret.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use anyhow::{bail, Context, Result};
use postern_protocol::keys::GatewaySecret;
use zeroize::Zeroizing;

/// Generates a new gateway key at `path` (0600) and returns it.
pub fn generate(path: &Path, force: bool) -> Result<GatewaySecret> {
    let mut bytes = Zeroizing::new([0u8; 32]);
    getrandom::getrandom(bytes.as_mut()).context("read the OS random number generator")?;
    let secret = GatewaySecret::from_bytes(*bytes);
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
            "create key file {} (it may already exist: pass --force to replace it)",
            path.display()
        )
    })?;
    // A replaced file keeps its old mode: force 0600 again.
    file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    file.write_all(secret.to_text().as_bytes())
        .with_context(|| format!("write key file {}", path.display()))?;
    file.sync_all()?;
    Ok(secret)
}

/// Loads the gateway key from `path`, refusing a file readable by others.
pub fn load(path: &Path) -> Result<GatewaySecret> {
    let meta =
        std::fs::metadata(path).with_context(|| format!("read key file {}", path.display()))?;
    if meta.permissions().mode() & 0o077 != 0 {
        bail!(
            "key file {} is readable by others: run `chmod 600 {}`",
            path.display(),
            path.display()
        );
    }
    let text = Zeroizing::new(
        std::fs::read_to_string(path)
            .with_context(|| format!("read key file {}", path.display()))?,
    );
    GatewaySecret::from_text(&text)
        .with_context(|| format!("key file {} is not a gateway key", path.display()))
}
