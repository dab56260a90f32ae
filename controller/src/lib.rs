//! Postern controller library: the SQLite registry and the gateway sync server, shared by
//! the `postern-controller` binary and its tests.
//!
//! Owns: module wiring only. Must not touch: argument parsing or process exit codes
//! (those belong to the binary).

pub mod proto;
pub mod registry;
pub mod schema;
pub mod sync;
pub mod validate;
