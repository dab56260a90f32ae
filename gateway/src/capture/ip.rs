//! Parsing of captured network-layer packets down to the SPA UDP payload.
//!
//! Owns the IPv4/IPv6 + UDP header walk used by sniff mode. Pure: no sockets, no
//! allocation; every malformed packet is `None` (a dark gateway drops it), never a panic.
//! Must not decide anything about the SPA payload itself (that is the protocol crate's job).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::ops::Range;

pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86DD;
const IPPROTO_UDP: u8 = 17;
const UDP_HEADER: usize = 8;

/// A UDP datagram addressed to the SPA port, found inside a captured packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpaDatagram {
    pub src: IpAddr,
    /// The sender's UDP source port (where a reply goes).
    pub src_port: u16,
    /// The address the datagram was sent to (a reply's source address).
    pub dst: IpAddr,
    /// Byte range of the UDP payload within the captured packet.
    pub payload: Range<usize>,
}

/// Finds a UDP datagram to `port` in `packet` (starting at the IP header; `ethertype` from
/// the capture address). Fragments, IPv6 extension headers and bad lengths are rejected.
pub fn spa_datagram(packet: &[u8], ethertype: u16, port: u16) -> Option<SpaDatagram> {
    let (src, dst, l4) = match ethertype {
        ETH_P_IP => ipv4(packet)?,
        ETH_P_IPV6 => ipv6(packet)?,
        _ => return None,
    };
    let udp = packet.get(l4.clone())?;
    let src_port = u16::from_be_bytes([*udp.first()?, *udp.get(1)?]);
    let dport = u16::from_be_bytes([*udp.get(2)?, *udp.get(3)?]);
    let udp_len = usize::from(u16::from_be_bytes([*udp.get(4)?, *udp.get(5)?]));
    if dport != port || udp_len < UDP_HEADER || udp_len > udp.len() {
        return None;
    }
    Some(SpaDatagram {
        src,
        src_port,
        dst,
        payload: l4.start + UDP_HEADER..l4.start + udp_len,
    })
}

/// IPv4 header: returns the source, the destination and the byte range of the UDP segment.
fn ipv4(p: &[u8]) -> Option<(IpAddr, IpAddr, Range<usize>)> {
    let first = *p.first()?;
    let ihl = usize::from(first & 0x0f) * 4;
    if first >> 4 != 4 || ihl < 20 || p.len() < ihl {
        return None;
    }
    let total = usize::from(u16::from_be_bytes([p[2], p[3]]));
    let frag = u16::from_be_bytes([p[6], p[7]]);
    // More-fragments flag or a non-zero offset: SPA datagrams never fragment.
    if frag & 0x3fff != 0 || p[9] != IPPROTO_UDP || total < ihl || total > p.len() {
        return None;
    }
    let src = Ipv4Addr::new(p[12], p[13], p[14], p[15]);
    let dst = Ipv4Addr::new(p[16], p[17], p[18], p[19]);
    Some((IpAddr::V4(src), IpAddr::V4(dst), ihl..total))
}

/// IPv6 header without extension headers: source, destination and the UDP segment's range.
fn ipv6(p: &[u8]) -> Option<(IpAddr, IpAddr, Range<usize>)> {
    const HDR: usize = 40;
    if p.len() < HDR || p[0] >> 4 != 6 || p[6] != IPPROTO_UDP {
        return None;
    }
    let payload_len = usize::from(u16::from_be_bytes([p[4], p[5]]));
    let end = HDR + payload_len;
    if end > p.len() {
        return None;
    }
    let mut src = [0u8; 16];
    src.copy_from_slice(&p[8..24]);
    let mut dst = [0u8; 16];
    dst.copy_from_slice(&p[24..40]);
    Some((
        IpAddr::V6(Ipv6Addr::from(src)),
        IpAddr::V6(Ipv6Addr::from(dst)),
        HDR..end,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4_udp(dport: u16, payload: &[u8]) -> Vec<u8> {
        let total = 20 + 8 + payload.len();
        let mut p = vec![
            0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 17, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2,
        ];
        p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        p.extend_from_slice(&40000u16.to_be_bytes());
        p.extend_from_slice(&dport.to_be_bytes());
        p.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
        p.extend_from_slice(&[0, 0]);
        p.extend_from_slice(payload);
        p
    }

    fn v6_udp(dport: u16, payload: &[u8]) -> Vec<u8> {
        let mut p = vec![0x60, 0, 0, 0];
        p.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
        p.extend_from_slice(&[17, 64]);
        let src: [u8; 16] = "fd00::1".parse::<Ipv6Addr>().expect("literal").octets();
        p.extend_from_slice(&src);
        p.extend_from_slice(&[0u8; 16]);
        p.extend_from_slice(&40000u16.to_be_bytes());
        p.extend_from_slice(&dport.to_be_bytes());
        p.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
        p.extend_from_slice(&[0, 0]);
        p.extend_from_slice(payload);
        p
    }

    #[test]
    fn finds_v4_and_v6_payloads() {
        let p = v4_udp(62201, b"hello");
        let d = spa_datagram(&p, ETH_P_IP, 62201).expect("v4 datagram");
        assert_eq!(d.src, "10.0.0.1".parse::<IpAddr>().expect("literal"));
        assert_eq!(d.dst, "10.0.0.2".parse::<IpAddr>().expect("literal"));
        assert_eq!(d.src_port, 40000);
        assert_eq!(&p[d.payload], b"hello");
        let p = v6_udp(62201, b"world!");
        let d = spa_datagram(&p, ETH_P_IPV6, 62201).expect("v6 datagram");
        assert_eq!(d.src, "fd00::1".parse::<IpAddr>().expect("literal"));
        assert_eq!(d.dst, "::".parse::<IpAddr>().expect("literal"));
        assert_eq!(d.src_port, 40000);
        assert_eq!(&p[d.payload], b"world!");
    }

    #[test]
    fn other_ports_fragments_and_garbage_are_ignored() {
        assert!(spa_datagram(&v4_udp(53, b"x"), ETH_P_IP, 62201).is_none());
        let mut frag = v4_udp(62201, b"x");
        frag[6] = 0x20; // more fragments
        assert!(spa_datagram(&frag, ETH_P_IP, 62201).is_none());
        assert!(spa_datagram(&v4_udp(62201, b"x"), 0x0806, 62201).is_none());
        assert!(spa_datagram(&v4_udp(62201, b"x"), ETH_P_IPV6, 62201).is_none());
    }

    #[test]
    fn every_truncation_and_byte_value_is_safe() {
        for p in [v4_udp(62201, b"payload"), v6_udp(62201, b"payload")] {
            let et = if p[0] >> 4 == 4 { ETH_P_IP } else { ETH_P_IPV6 };
            for n in 0..p.len() {
                // A truncated packet never yields a payload past its end.
                if let Some(d) = spa_datagram(&p[..n], et, 62201) {
                    assert!(d.payload.end <= n);
                }
            }
            for i in 0..p.len() {
                for v in [0u8, 0x0f, 0x45, 0x60, 0xff] {
                    let mut q = p.clone();
                    q[i] = v;
                    if let Some(d) = spa_datagram(&q, et, 62201) {
                        assert!(d.payload.end <= q.len() && d.payload.start <= d.payload.end);
                    }
                }
            }
        }
    }
}
