//! Byte encodings of set and map elements.
//!
//! Owns: how a session id, a pinhole (`addr . proto . port : mark`) and a
//! forward (`addr . proto . port : target . tport`) are laid out as nftables
//! keys and data, and the reverse decoding. Fields of a
//! concatenation are each padded to 4 bytes; the mark is a u32 in host byte
//! order, the port in network byte order (as `nft --debug=netlink` shows:
//! `0200000a 00000011 0000bb01 : 00000008` for 10.0.0.2 . udp . 443 : 8).
//! Must not touch: sockets, the ruleset.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::{
    ruleset::{FORWARDS4, FORWARDS6, PINHOLES4, PINHOLES6},
    AppProto,
};

/// The top byte every Postern conntrack mark carries. Marks are shared with the rest of
/// the host (wg-quick, policy routing): the ruleset and the conntrack cleanup only ever
/// act on marks with this tag, so a flow the host marked for its own reasons is neither
/// dropped nor deleted as if it were a Postern session.
pub const MARK_TAG: u32 = 0x5000_0000;
/// The bits of a mark that hold the tag; the other 24 hold the session id.
pub const MARK_TAG_MASK: u32 = 0xff00_0000;
/// The largest session id (24 bits).
pub const MAX_SESSION_ID: u32 = !MARK_TAG_MASK;

/// A set key or map datum, stored inline: the largest is an IPv6 pinhole key (24 bytes),
/// so building one never allocates (issue 7: no allocation per knock).
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) struct ElemBytes {
    buf: [u8; ElemBytes::CAPACITY],
    len: u8,
}

impl ElemBytes {
    const CAPACITY: usize = 24;

    fn new() -> ElemBytes {
        ElemBytes {
            buf: [0; ElemBytes::CAPACITY],
            len: 0,
        }
    }

    /// Appends `bytes`; every caller here appends at most [`ElemBytes::CAPACITY`] in all.
    fn push(&mut self, bytes: &[u8]) {
        let start = usize::from(self.len);
        let end = start + bytes.len();
        assert!(
            end <= ElemBytes::CAPACITY,
            "element encodings are at most 24 bytes (an IPv6 pinhole key)"
        );
        self.buf[start..end].copy_from_slice(bytes);
        self.len = end as u8;
    }

    pub(crate) fn as_slice(&self) -> &[u8] {
        &self.buf[..usize::from(self.len)]
    }
}

impl std::ops::Deref for ElemBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl std::fmt::Debug for ElemBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for b in self.as_slice() {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// The conntrack mark of session `id` (1..=MAX_SESSION_ID).
pub(crate) fn ct_mark(id: u32) -> u32 {
    MARK_TAG | (id & MAX_SESSION_ID)
}

/// Key of a session element (`type mark`): the tagged mark, host byte order.
pub(crate) fn session_key(id: u32) -> ElemBytes {
    let mut key = ElemBytes::new();
    key.push(&ct_mark(id).to_ne_bytes());
    key
}

/// Decodes a `type mark` key or map datum back to the session id; `None` for a mark
/// without Postern's tag.
pub(crate) fn decode_mark(bytes: &[u8]) -> Option<u32> {
    let mark = u32::from_ne_bytes(bytes.get(..4)?.try_into().ok()?);
    (mark & MARK_TAG_MASK == MARK_TAG).then_some(mark & MAX_SESSION_ID)
}

/// The map a pinhole lives in and its key.
pub(crate) fn pinhole_key(addr: IpAddr, proto: AppProto, port: u16) -> (&'static str, ElemBytes) {
    let mut key = ElemBytes::new();
    let set = match addr {
        IpAddr::V4(a) => {
            key.push(&a.octets());
            PINHOLES4
        }
        IpAddr::V6(a) => {
            key.push(&a.octets());
            PINHOLES6
        }
    };
    key.push(&[proto.number(), 0, 0, 0]);
    let p = port.to_be_bytes();
    key.push(&[p[0], p[1], 0, 0]);
    (set, key)
}

/// The forward map of a pinhole (same key layout as the pinhole map).
pub(crate) fn forward_map(addr: IpAddr) -> &'static str {
    match addr {
        IpAddr::V4(_) => FORWARDS4,
        IpAddr::V6(_) => FORWARDS6,
    }
}

/// Datum of a forward element (`ipv4_addr . inet_service` or
/// `ipv6_addr . inet_service`): the address, then the port in network byte
/// order padded to 4 bytes (`nft --debug=netlink`: `0500010a 00005000` for
/// 10.1.0.5 . 80).
pub(crate) fn forward_data(target: SocketAddr) -> ElemBytes {
    let mut data = ElemBytes::new();
    match target.ip() {
        IpAddr::V4(a) => data.push(&a.octets()),
        IpAddr::V6(a) => data.push(&a.octets()),
    }
    let p = target.port().to_be_bytes();
    data.push(&[p[0], p[1], 0, 0]);
    data
}

/// Decodes a forward datum (8 bytes for IPv4, 20 for IPv6).
pub(crate) fn decode_forward(data: &[u8]) -> Option<SocketAddr> {
    let (ip, rest): (IpAddr, &[u8]) = match data.len() {
        8 => {
            let o: [u8; 4] = data[..4].try_into().ok()?;
            (IpAddr::V4(Ipv4Addr::from(o)), &data[4..])
        }
        20 => {
            let o: [u8; 16] = data[..16].try_into().ok()?;
            (IpAddr::V6(Ipv6Addr::from(o)), &data[16..])
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, u16::from_be_bytes([rest[0], rest[1]])))
}

/// Decodes a pinhole key (12 bytes for IPv4, 24 for IPv6).
pub(crate) fn decode_pinhole(key: &[u8]) -> Option<(IpAddr, AppProto, u16)> {
    let (addr, rest): (IpAddr, &[u8]) = match key.len() {
        12 => {
            let o: [u8; 4] = key[..4].try_into().ok()?;
            (IpAddr::V4(Ipv4Addr::from(o)), &key[4..])
        }
        24 => {
            let o: [u8; 16] = key[..16].try_into().ok()?;
            (IpAddr::V6(Ipv6Addr::from(o)), &key[16..])
        }
        _ => return None,
    };
    let proto = AppProto::from_number(rest[0])?;
    let port = u16::from_be_bytes([rest[4], rest[5]]);
    Some((addr, proto, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_key_matches_nft_debug_output() {
        let (set, key) = pinhole_key("10.0.0.2".parse().expect("addr"), AppProto::Udp, 443);
        assert_eq!(set, PINHOLES4);
        assert_eq!(key.as_slice(), [10, 0, 0, 2, 17, 0, 0, 0, 0x01, 0xbb, 0, 0]);
        assert_eq!(
            decode_pinhole(&key),
            Some(("10.0.0.2".parse().expect("addr"), AppProto::Udp, 443))
        );
    }

    #[test]
    fn ipv6_key_is_24_bytes_and_round_trips() {
        let a: IpAddr = "fd00::1".parse().expect("addr");
        let (set, key) = pinhole_key(a, AppProto::Tcp, 8080);
        assert_eq!(set, PINHOLES6);
        assert_eq!(key.len(), 24);
        assert_eq!(decode_pinhole(&key), Some((a, AppProto::Tcp, 8080)));
    }

    #[test]
    fn forward_data_matches_nft_debug_output() {
        let t: SocketAddr = "10.1.0.5:80".parse().expect("addr");
        assert_eq!(forward_data(t).as_slice(), [10, 1, 0, 5, 0, 80, 0, 0]);
        assert_eq!(decode_forward(&forward_data(t)), Some(t));
        let t6: SocketAddr = "[fd01::5]:80".parse().expect("addr");
        let d = forward_data(t6);
        assert_eq!(d.len(), 20);
        assert_eq!(&d[16..], [0, 80, 0, 0]);
        assert_eq!(decode_forward(&d), Some(t6));
        assert_eq!(decode_forward(&[1, 2, 3]), None);
        assert_eq!(forward_map("fd00::1".parse().expect("addr")), FORWARDS6);
    }

    #[test]
    fn mark_is_host_order() {
        assert_eq!(decode_mark(&session_key(0x0002_0304)), Some(0x0002_0304));
        assert_eq!(session_key(7).as_slice(), 0x5000_0007u32.to_ne_bytes());
        // A mark the host set for its own reasons is not a session.
        assert_eq!(decode_mark(&0x0000_0007u32.to_ne_bytes()), None);
        assert_eq!(decode_mark(&0x5100_0007u32.to_ne_bytes()), None);
    }
}
