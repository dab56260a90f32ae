//! Sending reply datagrams back to a knocking client, from the SPA port, without blocking.
//!
//! Owns the send side of both capture modes. UDP mode sends from (a second handle on) the
//! bound SPA socket. Sniff mode has no UDP socket and must not get one (the host stays
//! dark): it sends through send-only raw sockets (`IPPROTO_RAW`, which never receive), with
//! IPv4/IPv6 and UDP headers built here: source = the address and port the knock was sent
//! to, so the reply looks like the answer to the client's datagram and passes its NAT.
//! Every send is non-blocking (`MSG_DONTWAIT`): a full buffer drops the reply. Must not
//! decide whether to reply (reply.rs) or build its payload (protocol crate).
#![allow(unsafe_code)]

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use super::{Capture, Peer};

/// Why a reply was not sent.
#[derive(Debug)]
pub enum SendFailure {
    /// The socket buffer was full (counted as `reply_dropped`).
    WouldBlock,
    /// No usable source address (sniff mode without the knock's destination, or a
    /// multicast/broadcast destination).
    NoRoute,
    /// Any other socket error.
    Io(io::Error),
}

/// The reply sender of one capture mode.
#[derive(Debug)]
pub enum ReplySocket {
    /// A handle on the bound SPA socket; `v6` when it is an IPv6 (dual-stack) socket.
    Udp { socket: UdpSocket, v6: bool },
    /// Send-only raw sockets (either may be missing if the family is unavailable).
    Raw {
        v4: Option<OwnedFd>,
        v6: Option<OwnedFd>,
        spa_port: u16,
    },
}

fn raw_socket(family: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2) call with constant arguments.
    let fd = unsafe {
        libc::socket(
            family,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            libc::IPPROTO_RAW,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

impl ReplySocket {
    /// The sender matching `capture`.
    pub fn for_capture(capture: &Capture, spa_port: u16) -> io::Result<ReplySocket> {
        match capture {
            Capture::Udp(u) => {
                let socket = u.reply_socket()?;
                let v6 = socket.local_addr()?.is_ipv6();
                Ok(ReplySocket::Udp { socket, v6 })
            }
            Capture::Sniff(_) => {
                let v4 = raw_socket(libc::AF_INET).ok();
                let v6 = raw_socket(libc::AF_INET6).ok();
                if v4.is_none() && v6.is_none() {
                    return Err(io::Error::other(
                        "raw reply socket (IPPROTO_RAW) unavailable: needs CAP_NET_RAW",
                    ));
                }
                Ok(ReplySocket::Raw { v4, v6, spa_port })
            }
        }
    }

    /// Sends `payload` to `peer` (its source address and port), never blocking.
    pub fn send(&self, peer: &Peer, payload: &[u8]) -> Result<(), SendFailure> {
        match self {
            ReplySocket::Udp { socket, v6 } => {
                let dst = match (peer.src, *v6) {
                    (IpAddr::V4(a), true) => IpAddr::V6(a.to_ipv6_mapped()),
                    (a, _) => a,
                };
                let to = socket2::SockAddr::from(SocketAddr::new(dst, peer.src_port));
                // SAFETY: `payload` is valid for its length; `to` is a valid sockaddr.
                let n = unsafe {
                    libc::sendto(
                        socket.as_raw_fd(),
                        payload.as_ptr().cast(),
                        payload.len(),
                        libc::MSG_DONTWAIT,
                        to.as_ptr().cast(),
                        to.len(),
                    )
                };
                check_sent(n)
            }
            ReplySocket::Raw { v4, v6, spa_port } => {
                let from = peer.dst.ok_or(SendFailure::NoRoute)?;
                match (from, peer.src) {
                    (IpAddr::V4(from), IpAddr::V4(to)) => {
                        if from.is_multicast() || from.is_broadcast() || from.is_unspecified() {
                            return Err(SendFailure::NoRoute);
                        }
                        let fd = v4.as_ref().ok_or(SendFailure::NoRoute)?;
                        let packet = ipv4_udp(from, to, *spa_port, peer.src_port, payload);
                        send_raw(fd, &SocketAddr::new(IpAddr::V4(to), 0), &packet)
                    }
                    (IpAddr::V6(from), IpAddr::V6(to)) => {
                        if from.is_multicast() || from.is_unspecified() {
                            return Err(SendFailure::NoRoute);
                        }
                        let fd = v6.as_ref().ok_or(SendFailure::NoRoute)?;
                        let packet = ipv6_udp(from, to, *spa_port, peer.src_port, payload);
                        send_raw(fd, &SocketAddr::new(IpAddr::V6(to), 0), &packet)
                    }
                    _ => Err(SendFailure::NoRoute),
                }
            }
        }
    }
}

fn check_sent(n: isize) -> Result<(), SendFailure> {
    if n >= 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    if e.kind() == io::ErrorKind::WouldBlock {
        Err(SendFailure::WouldBlock)
    } else {
        Err(SendFailure::Io(e))
    }
}

fn send_raw(fd: &OwnedFd, to: &SocketAddr, packet: &[u8]) -> Result<(), SendFailure> {
    let to = socket2::SockAddr::from(*to);
    // SAFETY: `packet` is valid for its length; `to` is a valid sockaddr of the fd's family.
    let n = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            packet.as_ptr().cast(),
            packet.len(),
            libc::MSG_DONTWAIT,
            to.as_ptr().cast(),
            to.len(),
        )
    };
    check_sent(n)
}

/// One's-complement sum of 16-bit big-endian words (odd tail padded with zero).
fn sum16(mut acc: u32, bytes: &[u8]) -> u32 {
    let mut chunks = bytes.chunks_exact(2);
    for c in &mut chunks {
        acc += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        acc += u32::from(*last) << 8;
    }
    acc
}

fn fold(mut acc: u32) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    !(acc as u16)
}

/// UDP header + payload with the checksum over `pseudo` (the family's pseudo-header).
fn udp_segment(pseudo: &[u8], sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let len = (8 + payload.len()) as u16;
    let mut seg = Vec::with_capacity(usize::from(len));
    seg.extend_from_slice(&sport.to_be_bytes());
    seg.extend_from_slice(&dport.to_be_bytes());
    seg.extend_from_slice(&len.to_be_bytes());
    seg.extend_from_slice(&[0, 0]);
    seg.extend_from_slice(payload);
    let mut sum = fold(sum16(sum16(0, pseudo), &seg));
    if sum == 0 {
        sum = 0xffff; // RFC 768: a computed zero is sent as all ones.
    }
    seg[6..8].copy_from_slice(&sum.to_be_bytes());
    seg
}

/// An IPv4 + UDP packet (payloads are ≤ 1200 bytes, so lengths fit in u16).
pub fn ipv4_udp(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let udp_len = (8 + payload.len()) as u16;
    let mut pseudo = Vec::with_capacity(12);
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&[0, 17]);
    pseudo.extend_from_slice(&udp_len.to_be_bytes());
    let seg = udp_segment(&pseudo, sport, dport, payload);
    let total = (20 + seg.len()) as u16;
    let mut p = Vec::with_capacity(usize::from(total));
    p.extend_from_slice(&[0x45, 0]);
    p.extend_from_slice(&total.to_be_bytes());
    // Identification 0 (the kernel fills it), DF set, TTL 64, UDP.
    p.extend_from_slice(&[0, 0, 0x40, 0, 64, 17, 0, 0]);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    let csum = fold(sum16(0, &p));
    p[10..12].copy_from_slice(&csum.to_be_bytes());
    p.extend_from_slice(&seg);
    p
}

/// An IPv6 + UDP packet (no extension headers).
pub fn ipv6_udp(src: Ipv6Addr, dst: Ipv6Addr, sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let udp_len = (8 + payload.len()) as u32;
    let mut pseudo = Vec::with_capacity(40);
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&udp_len.to_be_bytes());
    pseudo.extend_from_slice(&[0, 0, 0, 17]);
    let seg = udp_segment(&pseudo, sport, dport, payload);
    let mut p = Vec::with_capacity(40 + seg.len());
    p.extend_from_slice(&[0x60, 0, 0, 0]);
    p.extend_from_slice(&(seg.len() as u16).to_be_bytes());
    p.extend_from_slice(&[17, 64]);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(&seg);
    p
}

#[cfg(test)]
mod tests {
    use super::super::ip::{spa_datagram, ETH_P_IP, ETH_P_IPV6};
    use super::*;

    #[test]
    fn built_packets_parse_back_with_valid_checksums() {
        let payload = b"reply!!";
        let p = ipv4_udp(
            Ipv4Addr::new(10, 0, 0, 2),
            Ipv4Addr::new(10, 0, 0, 1),
            62201,
            40000,
            payload,
        );
        assert_eq!(fold(sum16(0, &p[..20])), 0, "IPv4 header checksum");
        let d = spa_datagram(&p, ETH_P_IP, 40000).expect("v4 parses");
        assert_eq!((d.src_port, &p[d.payload]), (62201, &payload[..]));
        let mut pseudo = p[12..20].to_vec();
        pseudo.extend_from_slice(&[0, 17, 0, 15]);
        assert_eq!(
            fold(sum16(sum16(0, &pseudo), &p[20..])),
            0,
            "UDP checksum v4"
        );

        let src: Ipv6Addr = "fd00::2".parse().expect("literal");
        let dst: Ipv6Addr = "fd00::1".parse().expect("literal");
        let p = ipv6_udp(src, dst, 62201, 40000, payload);
        let d = spa_datagram(&p, ETH_P_IPV6, 40000).expect("v6 parses");
        assert_eq!(d.dst, IpAddr::V6(dst));
        let mut pseudo = p[8..40].to_vec();
        pseudo.extend_from_slice(&[0, 0, 0, 15, 0, 0, 0, 17]);
        assert_eq!(
            fold(sum16(sum16(0, &pseudo), &p[40..])),
            0,
            "UDP checksum v6"
        );
    }
}
