//! Postern controller library: the SQLite registry and the gateway sync server, shared by
//! the `postern-controller` binary and its tests.
//!
//! Owns: module wiring only. Must not touch: argument parsing or process exit codes
//! (those belong to the binary).

pub mod admin;
pub mod api;
pub mod api_identity;
pub mod audit;
pub mod backup;
pub mod gateway_channel;
pub mod gateways;
pub mod identity;
pub mod invite;
pub mod policy_store;
pub mod proto;
pub mod registry;
pub mod schema;
pub mod sessions;
pub mod sync;
pub mod validate;
