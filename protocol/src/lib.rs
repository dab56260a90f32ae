//! Postern SPA protocol: keys, wire format v1, replay cache and registry snapshot.
//!
//! Owns: everything both ends of a knock must agree on byte for byte, and the registry
//! snapshot shape shared by the controller and the gateway. The byte-level spec is
//! `docs/protocol.md`.
//!
//! Must not touch: sockets, files, the clock, randomness sources, threads or the
//! firewall (sans-IO). Callers pass timestamps, ephemeral secrets and nonces in.

pub mod api_auth;
pub mod control;
pub mod delta;
pub mod keys;
pub mod packet;
pub mod replay;
pub mod reply;
pub mod snapshot;

pub use keys::{
    DeviceId, DevicePublicKey, DeviceSigningKey, GatewayKeyId, GatewayPublicKey, GatewaySecret,
    KeyError,
};
pub use packet::{
    check_freshness, flags, open, precheck, seal, AppName, Knock, OpenError, OpenedKnock,
    SealError, SealRandomness, MAX_APP_LEN, MAX_PACKET_LEN, VERSION,
};
pub use replay::ReplayCache;
pub use snapshot::{
    AppProtocol, AppRecord, DeviceRecord, GrantRecord, ParseAppProtocolError, Snapshot,
};
