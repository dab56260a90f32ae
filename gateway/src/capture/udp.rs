//! UDP mode: an ordinary bound UDP socket on the SPA port.
//!
//! Owns the socket's creation (dual-stack when bound to `::`) and its receive timeout.
//! The port then shows as listening (`ss -lun`); sniff mode is the dark default.
//! Must not parse SPA payloads.

use std::io;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};

use super::Peer;

/// A UDP socket bound to the SPA port.
#[derive(Debug)]
pub struct UdpCapture {
    socket: UdpSocket,
}

impl UdpCapture {
    pub fn open(listen: IpAddr, port: u16, timeout: Duration) -> io::Result<UdpCapture> {
        let addr = SocketAddr::new(listen, port);
        let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
        if let IpAddr::V6(v6) = listen {
            if v6.is_unspecified() {
                socket.set_only_v6(false)?;
            }
        }
        socket
            .bind(&addr.into())
            .map_err(|e| io::Error::new(e.kind(), format!("bind UDP {addr}: {e}")))?;
        socket.set_read_timeout(Some(timeout))?;
        super::sniff::force_rcvbuf(
            std::os::fd::AsRawFd::as_raw_fd(&socket),
            super::sniff::RCVBUF_BYTES,
        );
        Ok(UdpCapture {
            socket: socket.into(),
        })
    }

    /// A second handle on the bound socket, non-blocking, for sending replies from the SPA
    /// port (the receive side keeps its timeout).
    pub fn reply_socket(&self) -> io::Result<UdpSocket> {
        let s = self.socket.try_clone()?;
        // O_NONBLOCK is per open file description, shared by both handles: send with
        // MSG_DONTWAIT instead (the reply module does) and keep the receive timeout.
        Ok(s)
    }

    /// Waits for the next datagram; `Ok(None)` on timeout.
    pub fn recv<'a>(&mut self, buf: &'a mut [u8]) -> io::Result<Option<(Peer, &'a [u8])>> {
        match self.socket.recv_from(buf) {
            Ok((n, from)) => {
                let peer = Peer {
                    src: from.ip().to_canonical(),
                    src_port: from.port(),
                    dst: None,
                };
                Ok(Some((peer, &buf[..n])))
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) =>
            {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }
}
