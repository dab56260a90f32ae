//! Postern client library: the parts of the `postern` client that tests and other tools
//! reuse.
//!
//! Owns: module wiring only. Must not touch: the command line (see `main.rs`).

pub mod api_client;
pub mod exit;
pub mod posture;
pub mod private_file;
pub mod profile;
