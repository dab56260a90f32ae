//! The gateway's wall clock, with an optional test-only offset.
//!
//! Owns the one place the knock path reads the time of day. In production it is
//! `SystemTime::now()`. For tests only, the environment variable
//! [`OFFSET_ENV`] may name a file holding a signed offset in milliseconds (e.g. `-60000`),
//! read at every call, so an end-to-end test can step the gateway's clock backwards
//! without touching the host clock. Must not be used for timeouts or rate limits (those use
//! the monotonic clock).

use std::path::PathBuf;

/// Test-only: a file whose content (signed milliseconds) is added to the wall clock.
pub const OFFSET_ENV: &str = "POSTERN_GATEWAY_CLOCK_OFFSET_FILE";

/// Milliseconds since the Unix epoch, plus the test offset if one is configured.
#[derive(Debug, Clone, Default)]
pub struct Clock {
    offset_file: Option<PathBuf>,
}

impl Clock {
    /// The system clock, with the test offset file named by [`OFFSET_ENV`] if it is set.
    pub fn from_env() -> Clock {
        Clock {
            offset_file: std::env::var_os(OFFSET_ENV)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from),
        }
    }

    /// True when a test offset file is in use (logged at start).
    pub fn is_offset(&self) -> bool {
        self.offset_file.is_some()
    }

    /// Now, in ms since the epoch. An unreadable or malformed offset file counts as 0.
    pub fn now_ms(&self) -> u64 {
        let base = crate::unix_ms();
        let Some(path) = &self.offset_file else {
            return base;
        };
        let offset: i64 = std::fs::read_to_string(path)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        base.saturating_add_signed(offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offset_file_moves_the_clock() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("offset");
        let clock = Clock {
            offset_file: Some(path.clone()),
        };
        let real = crate::unix_ms();
        // Missing file: no offset.
        assert!(clock.now_ms().abs_diff(real) < 5_000);
        std::fs::write(&path, "-3600000\n").expect("write");
        assert!(clock.now_ms().abs_diff(real - 3_600_000) < 5_000);
        std::fs::write(&path, "garbage").expect("write");
        assert!(clock.now_ms().abs_diff(real) < 5_000);
        assert!(!Clock::default().is_offset());
    }
}
