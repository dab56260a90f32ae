//! Sniff mode: an AF_PACKET socket that sees SPA datagrams without any listening socket.
//!
//! Owns the raw packet socket, its classic-BPF filter (UDP to the SPA port, inbound only)
//! and the receive loop's timeout. The SPA port stays dropped by nftables: the kernel's
//! packet tap runs before the netfilter input hook, so the gateway reads the knock while
//! the host never answers it. Must not parse SPA payloads (see `ip.rs` and the protocol crate).
#![allow(unsafe_code)]

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

use super::ip::{spa_datagram, ETH_P_IP, ETH_P_IPV6};
use super::Peer;

const ETH_P_ALL: u16 = 0x0003;
const PACKET_OUTGOING: u32 = 4;
const SKF_AD_OFF: i32 = -0x1000;
const SKF_AD_PROTOCOL: i32 = 0;
const SKF_AD_PKTTYPE: i32 = 4;

/// An AF_PACKET (SOCK_DGRAM, network-layer) capture socket filtered to the SPA port.
#[derive(Debug)]
pub struct SniffSocket {
    fd: OwnedFd,
    port: u16,
}

fn op(code: u16, jt: u8, jf: u8, k: u32) -> libc::sock_filter {
    libc::sock_filter { code, jt, jf, k }
}

/// Inbound IPv4/IPv6 UDP (unfragmented, no v6 extension headers) to `port`; offsets are
/// from the network header because the socket is SOCK_DGRAM.
fn spa_filter(port: u16) -> [libc::sock_filter; 18] {
    const LD_W_ABS: u16 = 0x20;
    const LD_H_ABS: u16 = 0x28;
    const LD_B_ABS: u16 = 0x30;
    const LD_H_IND: u16 = 0x48;
    const LDX_B_MSH: u16 = 0xb1;
    const JEQ: u16 = 0x15;
    const JSET: u16 = 0x45;
    const RET: u16 = 0x06;
    let port = u32::from(port);
    [
        /* 0 */ op(LD_W_ABS, 0, 0, (SKF_AD_OFF + SKF_AD_PKTTYPE) as u32),
        /* 1 */ op(JEQ, 15, 0, PACKET_OUTGOING), // -> 17 drop
        /* 2 */ op(LD_W_ABS, 0, 0, (SKF_AD_OFF + SKF_AD_PROTOCOL) as u32),
        /* 3 */ op(JEQ, 1, 0, u32::from(ETH_P_IP)), // -> 5
        /* 4 */ op(JEQ, 7, 12, u32::from(ETH_P_IPV6)), // -> 12 : 17
        /* 5 */ op(LD_B_ABS, 0, 0, 9),
        /* 6 */ op(JEQ, 0, 10, 17), // udp? : -> 17
        /* 7 */ op(LD_H_ABS, 0, 0, 6),
        /* 8 */ op(JSET, 8, 0, 0x3fff), // fragment -> 17
        /* 9 */ op(LDX_B_MSH, 0, 0, 0),
        /* 10 */ op(LD_H_IND, 0, 0, 2),
        /* 11 */ op(JEQ, 4, 5, port), // -> 16 : 17
        /* 12 */ op(LD_B_ABS, 0, 0, 6),
        /* 13 */ op(JEQ, 0, 3, 17), // udp? : -> 17
        /* 14 */ op(LD_H_ABS, 0, 0, 42),
        /* 15 */ op(JEQ, 0, 1, port), // -> 16 : 17
        /* 16 */ op(RET, 0, 0, 0xffff),
        /* 17 */ op(RET, 0, 0, 0),
    ]
}

/// Receive buffer for the capture socket: a flood must not overflow it during a short
/// scheduling hiccup of the capture thread (valid knocks would be lost with the garbage).
pub(super) const RCVBUF_BYTES: usize = 8 << 20;

/// Sets the socket's receive buffer to `bytes`, past `net.core.rmem_max` when privileged
/// (SO_RCVBUFFORCE), else as far as SO_RCVBUF allows. Best effort: a smaller buffer only
/// means more kernel drops under a flood.
pub(super) fn force_rcvbuf(fd: std::os::fd::RawFd, bytes: usize) {
    let val = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    for opt in [libc::SO_RCVBUFFORCE, libc::SO_RCVBUF] {
        // SAFETY: `val` is a valid c_int for the duration of the call; `fd` is an open socket.
        let rc = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                opt,
                (&val as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc == 0 {
            return;
        }
    }
}

fn check(rc: libc::c_int, what: &str) -> io::Result<libc::c_int> {
    if rc < 0 {
        let e = io::Error::last_os_error();
        Err(io::Error::new(e.kind(), format!("{what}: {e}")))
    } else {
        Ok(rc)
    }
}

impl SniffSocket {
    /// Opens the capture on `interface` ("any" for all) for UDP datagrams to `port`.
    pub fn open(interface: &str, port: u16, timeout: Duration) -> io::Result<SniffSocket> {
        let ifindex = if interface == "any" {
            0
        } else {
            let name = CString::new(interface).map_err(|_| {
                io::Error::new(io::ErrorKind::InvalidInput, "interface name has a NUL byte")
            })?;
            // SAFETY: `name` is a valid NUL-terminated string that outlives the call.
            let idx = unsafe { libc::if_nametoindex(name.as_ptr()) };
            if idx == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("interface {interface:?} not found: check `interface` in the config (`ip link` lists them)"),
                ));
            }
            idx as libc::c_int
        };
        // Protocol 0 at creation: no packet is queued before the filter is attached.
        // SAFETY: plain socket(2) call with constant arguments.
        let raw = check(
            unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) },
            "AF_PACKET socket (needs root or CAP_NET_RAW)",
        )?;
        // SAFETY: `raw` is a fresh descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let filter = spa_filter(port);
        let prog = libc::sock_fprog {
            len: filter.len() as u16,
            filter: filter.as_ptr().cast_mut(),
        };
        // SAFETY: `prog` points at `filter`, both alive for the call; the kernel copies them.
        check(
            unsafe {
                libc::setsockopt(
                    fd.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_ATTACH_FILTER,
                    (&prog as *const libc::sock_fprog).cast(),
                    std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
                )
            },
            "attach SPA capture filter",
        )?;
        force_rcvbuf(fd.as_raw_fd(), RCVBUF_BYTES);
        let tv = libc::timeval {
            tv_sec: timeout.as_secs() as libc::time_t,
            tv_usec: timeout.subsec_micros() as libc::suseconds_t,
        };
        // SAFETY: `tv` is a valid timeval for the duration of the call.
        check(
            unsafe {
                libc::setsockopt(
                    fd.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_RCVTIMEO,
                    (&tv as *const libc::timeval).cast(),
                    std::mem::size_of::<libc::timeval>() as libc::socklen_t,
                )
            },
            "set capture receive timeout",
        )?;
        // SAFETY: sockaddr_ll is plain old data; all-zero is a valid starting value.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = ETH_P_ALL.to_be();
        addr.sll_ifindex = ifindex;
        // SAFETY: `addr` is a valid sockaddr_ll and the length matches it.
        check(
            unsafe {
                libc::bind(
                    fd.as_raw_fd(),
                    (&addr as *const libc::sockaddr_ll).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
                )
            },
            "bind AF_PACKET capture",
        )?;
        Ok(SniffSocket { fd, port })
    }

    /// Waits for the next SPA datagram; `Ok(None)` on timeout or a packet that is not one.
    pub fn recv<'a>(&mut self, buf: &'a mut [u8]) -> io::Result<Option<(Peer, &'a [u8])>> {
        // SAFETY: zeroed sockaddr_ll is valid; recvfrom writes at most `len` bytes into it.
        let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
        // SAFETY: `buf` is valid for `buf.len()` bytes; `from`/`len` describe a valid buffer.
        let n = unsafe {
            libc::recvfrom(
                self.fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                0,
                (&mut from as *mut libc::sockaddr_ll).cast(),
                &mut len,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.kind() {
                io::ErrorKind::WouldBlock
                | io::ErrorKind::TimedOut
                | io::ErrorKind::Interrupted => Ok(None),
                _ => Err(e),
            };
        }
        if u32::from(from.sll_pkttype) == PACKET_OUTGOING {
            return Ok(None);
        }
        let packet = &buf[..n as usize];
        let ethertype = u16::from_be(from.sll_protocol);
        Ok(spa_datagram(packet, ethertype, self.port).map(|d| {
            let peer = Peer {
                src: d.src,
                src_port: d.src_port,
                dst: Some(d.dst),
            };
            (peer, &buf[d.payload])
        }))
    }
}
