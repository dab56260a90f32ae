//! Exit statuses of `postern` and the error type that carries one (documented in
//! docs/client.md). Any command may return a [`Fix`] inside an `anyhow::Error`; `main`
//! finds it in the error chain and exits with its status; every other error exits 1.
//!
//! Owns: the numbers and the one-line "what to do" messages for the common cases. Must not
//! touch: the commands themselves.

use std::fmt;

/// Success.
pub const OK: u8 = 0;
/// Any other failure (network, I/O, a controller refusal without a more specific status).
pub const FAILURE: u8 = 1;
/// Bad command line, bad flag value or bad configuration file.
pub const USAGE: u8 = 2;
/// This device has no key or is not enrolled with a controller.
pub const NOT_ENROLLED: u8 = 3;
/// The controller has no recent enough second factor for this device.
pub const MFA_REQUIRED: u8 = 4;
/// No profile (or no gateway) to knock with.
pub const NO_PROFILE: u8 = 5;
/// The controller could not be reached or did not prove its pinned identity.
pub const CONTROLLER_UNREACHABLE: u8 = 6;
/// The local posture check found failing facts (`postern posture --check`).
pub const POSTURE_FAILING: u8 = 7;
/// The gateway answered the knock with a signed denial (`postern knock` printed the
/// reason and the fix).
pub const DENIED: u8 = 8;
/// `postern knock` waited for the gateway's answer and got none (unknown device, wrong
/// gateway key, clock skew, or the datagram was lost): the message says what to check.
pub const NO_ANSWER: u8 = 9;

/// An error with its exit status; the message is one line and says what to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fix {
    pub status: u8,
    pub message: String,
}

impl fmt::Display for Fix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Fix {}

impl Fix {
    pub fn new(status: u8, message: impl Into<String>) -> Self {
        Fix {
            status,
            message: message.into(),
        }
    }

    /// Not enrolled: names the file that is missing.
    pub fn not_enrolled(what: &str) -> Self {
        Fix::new(
            NOT_ENROLLED,
            format!("this device is not enrolled ({what}): run `postern enroll --controller URL --token TOKEN` with the invite from your admin"),
        )
    }

    /// No MFA yet, or too old.
    pub fn mfa_required(why: &str) -> Self {
        Fix::new(
            MFA_REQUIRED,
            format!("{why}: run `postern login` and enter the code from your authenticator app"),
        )
    }

    /// No profile to use.
    pub fn no_profile(why: &str) -> Self {
        Fix::new(
            NO_PROFILE,
            format!("{why}: run `postern profile add NAME --gateway HOST[:PORT] --gateway-key x25519:...` (or pass --gateway and --gateway-key)"),
        )
    }
}

/// The exit status for an error: the first [`Fix`] in its chain, else 1.
pub fn status_of(error: &anyhow::Error) -> u8 {
    error
        .chain()
        .find_map(|e| e.downcast_ref::<Fix>())
        .map_or(FAILURE, |f| f.status)
}
