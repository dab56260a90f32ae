//! Postern gateway: the policy enforcement point of one host.
//!
//! Receives SPA knocks (sniff or UDP capture), decides each one locally from the
//! controller's latest registry snapshot, opens pinholes through the firewall crate and
//! writes one audit line per decision. The binary (`main.rs`) is a thin CLI over this.

pub mod admission;
pub mod atomic_file;
pub mod audit;
pub mod capture;
pub mod clock;
pub mod config;
pub mod control_enrollment;
pub mod control_stream;
pub mod control_tls;
pub mod daemon;
pub mod forwarding;
pub mod heap;
pub mod intake;
pub mod keyfile;
pub mod local_policy;
pub mod pipeline;
pub mod registry;
pub mod replay_state;
pub mod reply;
pub mod session_audit;
pub mod session_board;
pub mod snapshot_file;
pub mod status;
pub mod sync;

/// Milliseconds since the Unix epoch (0 if the clock is before 1970).
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
