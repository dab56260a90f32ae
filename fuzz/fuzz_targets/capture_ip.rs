//! Sniff mode's IPv4/IPv6/UDP header walk on arbitrary captured packets.
#![no_main]
use libfuzzer_sys::fuzz_target;
use postern_gateway::capture::ip::{spa_datagram, ETH_P_IP, ETH_P_IPV6};

fuzz_target!(|data: &[u8]| {
    for ethertype in [ETH_P_IP, ETH_P_IPV6] {
        if let Some(d) = spa_datagram(data, ethertype, 62201) {
            assert!(d.payload.start <= d.payload.end && d.payload.end <= data.len());
        }
    }
});
