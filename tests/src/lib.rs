//! `postern_e2e`: the end-to-end test lab for Postern (DESIGN §8).
//!
//! Owns: network namespaces and veth pairs the tests create (names `pst-<pid>-<n>-c|g`),
//! the processes it starts in them (controller, gateway, client, app servers) and their
//! temp directories, all removed on drop, even on panic. Traffic goes only to addresses
//! inside those namespaces or to Unix sockets in temp directories.
//! Must not touch: the root namespace's interfaces, routes and nftables tables, other
//! namespaces, or any crate's source (it drives the binaries and uses `postern_protocol`
//! only to craft packets).

pub mod burst;
pub mod cut;
pub mod fixtures;
pub mod forward_lab;
pub mod lab;
pub mod netns;

pub use fixtures::{
    gateway_status, knock_cli, knock_cli_ok, knock_cli_with, seal_knock, seal_knock_with_reply_key,
    Capture, Controller, Device, Gateway, GatewayOptions, InProcessDevice,
};
pub use lab::{
    bin, check_prerequisites, connect_soon, echo_roundtrip, poll, record_timing, tcp_connect,
    unix_ms, wait_flow_dead, ChildGuard, Lab, Netns,
};
pub use netns::run_in;
