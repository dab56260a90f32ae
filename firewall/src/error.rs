//! Errors of the firewall crate.
//!
//! Owns: the [`FirewallError`] enum and the errno → text mapping used in its
//! messages. Every variant names the object involved (table, set, element,
//! conntrack mark) and, where there is one, the fix.
//! Must not touch: the kernel, sockets or subprocesses.

use std::io;

/// Everything that can go wrong while driving postern's nftables table.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FirewallError {
    /// The `nft` binary is not installed.
    #[error("nft not found: apt-get install nftables")]
    NftMissing,

    /// The caller lacks CAP_NET_ADMIN.
    #[error("permission denied while {what}: run as root (CAP_NET_ADMIN)")]
    PermissionDenied {
        /// What was being attempted.
        what: String,
    },

    /// `nft -f -` refused the ruleset or a command.
    #[error("nft failed on table inet {table} ({action}): {stderr}")]
    Nft {
        /// Table name.
        table: String,
        /// What postern asked nft to do.
        action: &'static str,
        /// nft's own explanation.
        stderr: String,
    },

    /// The table (or one of its sets) does not exist.
    #[error(
        "set {set} of table inet {table} not found: install the ruleset first (Firewall::install)"
    )]
    TableMissing {
        /// Table name.
        table: String,
        /// Set or map name.
        set: String,
    },

    /// The kernel refused a set-element operation.
    #[error("kernel refused {op} on set {set} of table inet {table}: {} (errno {errno})", errno_name(*errno))]
    Kernel {
        /// `add element`, `delete element`, `flush set`, `list set` ...
        op: &'static str,
        /// Table name.
        table: String,
        /// Set or map name.
        set: String,
        /// Positive errno returned by the kernel.
        errno: i32,
    },

    /// ctnetlink refused the conntrack delete.
    #[error("conntrack delete of entries with mark {mark} failed: {} (errno {errno})", errno_name(*errno))]
    Conntrack {
        /// The mark (session id) whose entries were being deleted.
        mark: u32,
        /// Positive errno returned by the kernel.
        errno: i32,
    },

    /// Socket-level failure on the NETLINK_NETFILTER socket or a subprocess.
    #[error("{what}: {source}")]
    Io {
        /// What was being attempted.
        what: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },

    /// The kernel answered something postern could not decode.
    #[error("unexpected answer while {what}: {detail}")]
    Protocol {
        /// What was being attempted.
        what: String,
        /// What was wrong with the answer.
        detail: String,
    },

    /// Caller error: a value the firewall cannot represent.
    #[error("invalid argument: {0}")]
    Invalid(String),
}

impl FirewallError {
    /// Maps a kernel errno from a set operation to the most helpful variant.
    pub(crate) fn from_set_errno(op: &'static str, table: &str, set: &str, errno: i32) -> Self {
        match errno {
            libc::EPERM | libc::EACCES => FirewallError::PermissionDenied {
                what: format!("{op} on set {set} of table inet {table}"),
            },
            libc::ENOENT => FirewallError::TableMissing {
                table: table.to_owned(),
                set: set.to_owned(),
            },
            _ => FirewallError::Kernel {
                op,
                table: table.to_owned(),
                set: set.to_owned(),
                errno,
            },
        }
    }

    pub(crate) fn io(what: impl Into<String>, source: io::Error) -> Self {
        if source.kind() == io::ErrorKind::PermissionDenied {
            return FirewallError::PermissionDenied { what: what.into() };
        }
        FirewallError::Io {
            what: what.into(),
            source,
        }
    }
}

/// Symbolic name and text of the errnos the kernel returns for nftables and
/// ctnetlink requests.
pub fn errno_name(errno: i32) -> &'static str {
    match errno {
        libc::EPERM => "EPERM (operation not permitted: run as root / CAP_NET_ADMIN)",
        libc::ENOENT => "ENOENT (no such table, set or element)",
        libc::EEXIST => "EEXIST (element exists with different data)",
        libc::EINVAL => "EINVAL (invalid argument)",
        libc::ENOSPC => "ENOSPC (set is full)",
        libc::EBUSY => "EBUSY (object busy)",
        libc::ERANGE => "ERANGE (value out of range, e.g. timeout too large)",
        libc::EOPNOTSUPP => "EOPNOTSUPP (kernel lacks the feature)",
        libc::ENOBUFS => "ENOBUFS (netlink buffer full)",
        libc::ENOMEM => "ENOMEM (out of memory)",
        libc::EAGAIN => "EAGAIN (retry)",
        libc::E2BIG => "E2BIG (too big)",
        _ => "unknown errno",
    }
}
