//! Re-exports of the protocol types the controller needs (snapshot records, device keys).
//!
//! Owns: nothing but the import path. Must not touch: the types themselves; they live in
//! `postern-protocol` and are shared with the gateway.

pub mod snapshot {
    //! The registry snapshot records (`postern-protocol` crate, `snapshot` module; the dependency is named `protocol`).
    pub use ::postern_protocol::snapshot::*;
}

pub mod keys {
    //! Device key types (`postern-protocol` crate, `keys` module).
    pub use ::postern_protocol::keys::*;
}

/// The knock packet's app-name limit; the controller's app-name rule must match it.
pub use ::postern_protocol::MAX_APP_LEN;
