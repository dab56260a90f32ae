//! Datagram bursts with `sendmmsg(2)`: how the flood test and the benchmark reach
//! 100k+ packets per second from one thread.
//!
//! Owns the only `sendmmsg` call of the lab. Must not decide what is sent or where: the
//! callers bound every flood in count and time and aim it only at their own namespaces.
#![allow(unsafe_code)]

use std::os::fd::AsRawFd;

/// Sends every buffer in `batch` as one datagram on the connected `sock` with a single
/// `sendmmsg` call; returns how many the kernel took (0 on a transient error).
pub fn send_batch(sock: &std::net::UdpSocket, batch: &mut [Vec<u8>]) -> usize {
    let mut iovs: Vec<libc::iovec> = batch
        .iter_mut()
        .map(|b| libc::iovec {
            iov_base: b.as_mut_ptr().cast(),
            iov_len: b.len(),
        })
        .collect();
    // SAFETY: mmsghdr is plain old data; all-zero is a valid value (no name, no control).
    let mut msgs: Vec<libc::mmsghdr> = iovs
        .iter_mut()
        .map(|iov| {
            let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
            m.msg_hdr.msg_iov = iov as *mut libc::iovec;
            m.msg_hdr.msg_iovlen = 1;
            m
        })
        .collect();
    // SAFETY: `msgs` holds `msgs.len()` valid headers, each pointing at one iovec in
    // `iovs`, which points into a live buffer of `batch`; all outlive the call, and the
    // kernel only reads them. The socket is connected, so no address is needed.
    let n = unsafe {
        libc::sendmmsg(
            sock.as_raw_fd(),
            msgs.as_mut_ptr(),
            msgs.len() as libc::c_uint,
            0,
        )
    };
    usize::try_from(n).unwrap_or(0)
}
