//! Postern policy engine (DESIGN §7): who may reach which app, from where, when, and on
//! what kind of device.
//!
//! Owns: the policy file format (`docs/policy.md`) and its strict parser, the decision for
//! one (device, app, source, now), the step-by-step explanation of that decision, posture
//! checks of reported facts, and the diff between two policy sets.
//!
//! Must not touch: files, sockets, the clock, storage, the gateway or the firewall
//! (sans-IO). Callers pass the file text and `now` (UTC); time zones come from the tzdb
//! bundled into the binary, so no system file is read and results are reproducible.
//!
//! A separate crate rather than a module of `postern-protocol`: the protocol crate is
//! linked into the SPA client and the gateway's hot path and stays minimal, while this one
//! needs a TOML parser, CIDR matching and a bundled time-zone database (a few hundred KiB).

pub mod diff;
pub mod eval;
pub mod file;
pub mod model;
pub mod report;

pub use diff::{diff, Change, PolicyDiff};
pub use eval::{
    check_requirement, decide, explain, next_window_change, verdict, Decision, Denial, DenyReason,
    Device, Explanation, Failure, Grant, Outcome, Posture, PostureFacts, Request, Step, Verdict,
};
pub use file::{parse, PolicyError, DEFAULT_LEASE};
/// The timestamp type of [`Request::now`] and the posture times.
pub use jiff::Timestamp;
pub use model::{
    format_duration, parse_duration, Effect, PolicySet, Requirement, Rule, SessionMode, Version,
    Window, Zone,
};
pub use report::{PostureReport, ReportError};
