//! IP forwarding for forward mode (connector apps behind the gateway).
//!
//! Owns: the two sysctls forward mode needs, `net.ipv4.ip_forward` and
//! `net.ipv6.conf.all.forwarding`, in the gateway's own network namespace (the
//! `/proc/sys/net` files always show the namespace of the process). Each is
//! switched on lazily, the first time a knock opens a forward to a target of
//! that family, logged once, and put back to its previous value when the
//! daemon stops. Must not touch: any other sysctl, the ruleset (the `forward`
//! chain of the firewall crate drops everything that is not a live session, so
//! turning forwarding on never makes this host a router for anyone else).

use std::fs;
use std::net::SocketAddr;
use std::path::PathBuf;

const V4: &str = "/proc/sys/net/ipv4/ip_forward";
const V6: &str = "/proc/sys/net/ipv6/conf/all/forwarding";

/// What forward mode changed, so it can be undone.
#[derive(Debug, Default)]
pub struct Forwarding {
    /// For each family: the value found before postern turned it on (None: untouched).
    v4_before: Option<String>,
    v6_before: Option<String>,
    root: Option<PathBuf>,
}

impl Forwarding {
    pub fn new() -> Forwarding {
        Forwarding::default()
    }

    /// For tests: read and write the sysctl files under `root` instead of `/`.
    pub fn with_root(root: PathBuf) -> Forwarding {
        Forwarding {
            root: Some(root),
            ..Forwarding::default()
        }
    }

    fn path(&self, file: &str) -> PathBuf {
        match &self.root {
            Some(r) => r.join(file.trim_start_matches('/')),
            None => PathBuf::from(file),
        }
    }

    /// Makes sure forwarding is on for `target`'s family. Returns Ok(true) when this
    /// call switched it on (the caller logs it), Ok(false) when it already was.
    pub fn ensure(&mut self, target: SocketAddr) -> Result<bool, String> {
        let (file, slot) = match target {
            SocketAddr::V4(_) => (V4, &self.v4_before),
            SocketAddr::V6(_) => (V6, &self.v6_before),
        };
        if slot.is_some() {
            return Ok(false);
        }
        let path = self.path(file);
        let before = fs::read_to_string(&path)
            .map_err(|e| format!("read {}: {e}", path.display()))?
            .trim()
            .to_owned();
        if before != "1" {
            fs::write(&path, "1\n").map_err(|e| {
                format!(
                    "enable forwarding for forward mode: write 1 to {}: {e} (run as root in the gateway's namespace, or set it yourself)",
                    path.display()
                )
            })?;
        }
        let changed = before != "1";
        if changed {
            tracing::warn!(
                sysctl = %path.display(),
                previous = %before,
                "forward mode: enabled IP forwarding in this network namespace (the `forward` chain passes live session flows only; restored at stop)"
            );
        }
        match target {
            SocketAddr::V4(_) => self.v4_before = Some(before),
            SocketAddr::V6(_) => self.v6_before = Some(before),
        }
        Ok(changed)
    }

    /// Puts back what [`Forwarding::ensure`] changed. Errors are returned as text for
    /// the log: the `forward` chain keeps the host from routing anything anyway.
    pub fn restore(&mut self) -> Vec<String> {
        let mut errors = Vec::new();
        for (file, before) in [(V4, self.v4_before.take()), (V6, self.v6_before.take())] {
            let Some(before) = before else { continue };
            if before == "1" {
                continue;
            }
            let path = self.path(file);
            match fs::write(&path, format!("{before}\n")) {
                Ok(()) => {
                    tracing::info!(sysctl = %path.display(), value = %before, "forward mode: IP forwarding restored")
                }
                Err(e) => errors.push(format!("restore {}: {e}", path.display())),
            }
        }
        errors
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ensure_turns_on_once_and_restore_puts_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let v4 = dir.path().join("proc/sys/net/ipv4/ip_forward");
        let v6 = dir.path().join("proc/sys/net/ipv6/conf/all/forwarding");
        for f in [&v4, &v6] {
            fs::create_dir_all(f.parent().expect("parent")).expect("mkdir");
        }
        fs::write(&v4, "0\n").expect("write");
        fs::write(&v6, "1\n").expect("write");
        let mut fwd = Forwarding::with_root(dir.path().to_owned());
        let t4: SocketAddr = "10.0.0.5:80".parse().expect("addr");
        let t6: SocketAddr = "[fd00::5]:80".parse().expect("addr");
        assert_eq!(fwd.ensure(t4), Ok(true));
        assert_eq!(fwd.ensure(t4), Ok(false));
        assert_eq!(fs::read_to_string(&v4).expect("read"), "1\n");
        // Already on: left alone, and not turned off at stop.
        assert_eq!(fwd.ensure(t6), Ok(false));
        assert!(fwd.restore().is_empty());
        assert_eq!(fs::read_to_string(&v4).expect("read"), "0\n");
        assert_eq!(fs::read_to_string(&v6).expect("read"), "1\n");
    }

    #[test]
    fn a_missing_sysctl_is_one_clear_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut fwd = Forwarding::with_root(dir.path().to_owned());
        let e = fwd
            .ensure("10.0.0.5:80".parse().expect("addr"))
            .expect_err("missing file");
        assert!(e.contains("ip_forward") && !e.contains('\n'), "{e}");
    }
}
