//! Packet capture: where SPA datagrams come from (sniff or UDP mode).
//!
//! Owns the choice of capture mode and hands `(source address, payload)` pairs to the
//! pipeline. Must not decide anything about a knock.

pub mod ip;
mod reply_socket;
mod sniff;
mod udp;

use std::io;
use std::net::IpAddr;
use std::time::Duration;

use crate::config::{CaptureMode, Config};

pub use reply_socket::{ReplySocket, SendFailure};
pub use sniff::SniffSocket;
pub use udp::UdpCapture;

/// Where a captured datagram came from and went to: what a reply needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    /// The sender's address (canonical: IPv4-mapped IPv6 shown as IPv4 in UDP mode).
    pub src: IpAddr,
    /// The sender's UDP source port.
    pub src_port: u16,
    /// The address the datagram was sent to (sniff mode; `None` in UDP mode, where the
    /// kernel picks a reply's source address).
    pub dst: Option<IpAddr>,
}

/// A receive buffer big enough for any SPA datagram plus its IP and UDP headers.
pub const BUFFER_LEN: usize = 2048;

/// The configured capture source.
#[derive(Debug)]
pub enum Capture {
    Sniff(SniffSocket),
    Udp(UdpCapture),
}

impl Capture {
    /// Opens the source named by the config; `timeout` bounds each `recv` so the caller
    /// can notice a stop request.
    pub fn open(cfg: &Config, timeout: Duration) -> io::Result<Capture> {
        Ok(match cfg.capture {
            CaptureMode::Sniff => {
                Capture::Sniff(SniffSocket::open(&cfg.interface, cfg.spa_port, timeout)?)
            }
            CaptureMode::Udp => Capture::Udp(UdpCapture::open(cfg.listen, cfg.spa_port, timeout)?),
        })
    }

    /// The next datagram to the SPA port, or `None` after the timeout.
    pub fn recv<'a>(&mut self, buf: &'a mut [u8]) -> io::Result<Option<(Peer, &'a [u8])>> {
        match self {
            Capture::Sniff(s) => s.recv(buf),
            Capture::Udp(u) => u.recv(buf),
        }
    }
}
