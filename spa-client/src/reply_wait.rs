//! Waiting for the gateway's signed reply to a knock (docs/protocol.md §11).
//!
//! Owns: the bounded wait on the knock's socket and the check of each datagram with the
//! knock's [`ReplyKey`]; anything that does not open (stray or forged datagrams) is ignored.
//! Must not touch: what a command prints or its exit status (main.rs), sending knocks
//! (knocker.rs).

use std::net::UdpSocket;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use postern_protocol::reply::{Reply, ReplyKey};

/// At most this many datagrams are looked at during one wait (a flood cannot keep the
/// client busy past its deadline anyway; this bounds the loop by count too).
const MAX_DATAGRAMS: usize = 64;

/// Waits up to `timeout` on `socket` (connected to the gateway) for a reply that opens
/// under `key`. `Ok(None)`: no reply in time (an old gateway, an allow without ack, a lost
/// datagram). A zero timeout does not wait.
pub(crate) fn wait_reply(
    socket: &UdpSocket,
    key: &ReplyKey,
    timeout: Duration,
) -> Result<Option<Reply>> {
    if timeout.is_zero() {
        return Ok(None);
    }
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 2048];
    for _ in 0..MAX_DATAGRAMS {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        socket
            .set_read_timeout(Some(left))
            .context("set the reply wait timeout")?;
        match socket.recv(&mut buf) {
            Ok(n) => {
                if let Ok(reply) = key.open(&buf[..n]) {
                    return Ok(Some(reply));
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                        | std::io::ErrorKind::Interrupted
                ) => {}
            // ICMP port/host unreachable surfaces as ECONNREFUSED on a connected socket:
            // that is "no reply", not a failure of the knock itself.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {}
            Err(e) => return Err(e).context("read the gateway's reply"),
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use postern_protocol::keys::{DeviceSigningKey, GatewaySecret};
    use postern_protocol::packet::{flags, seal, Knock, SealRandomness};
    use postern_protocol::reply::{seal_reply, KnockBinding, ReplyDecision, ReplyRandomness};

    /// A loopback socket pair (client connected to "gateway"), a knock's reply key and
    /// a sealed denial for it.
    fn setup() -> (UdpSocket, UdpSocket, ReplyKey, Vec<u8>) {
        let gateway = UdpSocket::bind("127.0.0.1:0").expect("bind loopback");
        let client = UdpSocket::bind("127.0.0.1:0").expect("bind loopback");
        client
            .connect(gateway.local_addr().expect("addr"))
            .expect("connect");
        let gw = GatewaySecret::from_bytes([2u8; 32]);
        let dev = DeviceSigningKey::from_seed([1u8; 32]);
        let knock = Knock {
            device: dev.public_key().device_id(),
            timestamp_ms: 1,
            nonce: [5u8; 16],
            flags: flags::KNOCK,
            app: postern_protocol::AppName::new("ssh").expect("valid app name"),
            claimed_addr: None,
            posture_digest: [0; 32],
        };
        let d = seal(
            &knock,
            &dev,
            &gw.public_key(),
            SealRandomness {
                ephemeral_secret: [3u8; 32],
            },
        )
        .expect("seal");
        let key = ReplyKey::new([3u8; 32], gw.public_key(), &d, [5u8; 16]).expect("key");
        let reply = Reply {
            decision: ReplyDecision::Deny,
            reason: "not_granted".into(),
            message: "no grant".into(),
            remediation: String::new(),
            session_secs: 0,
        };
        let binding = KnockBinding::from_datagram(&d, [5u8; 16]).expect("binding");
        let wire = seal_reply(&gw, &binding, &reply, ReplyRandomness { salt: [0; 16] })
            .expect("seal reply");
        (gateway, client, key, wire)
    }

    #[test]
    fn stray_datagrams_are_skipped_and_the_reply_is_returned() {
        let (gateway, client, key, wire) = setup();
        let to = client.local_addr().expect("addr");
        gateway.send_to(b"garbage", to).expect("send");
        let mut forged = wire.clone();
        forged[40] ^= 1;
        gateway.send_to(&forged, to).expect("send");
        gateway.send_to(&wire, to).expect("send");
        let r = wait_reply(&client, &key, Duration::from_secs(2))
            .expect("wait")
            .expect("the genuine reply");
        assert_eq!(r.reason, "not_granted");
    }

    #[test]
    fn no_reply_is_none_after_the_wait_and_zero_does_not_wait() {
        let (_gateway, client, key, _) = setup();
        let started = Instant::now();
        assert!(wait_reply(&client, &key, Duration::from_millis(100))
            .expect("wait")
            .is_none());
        assert!(started.elapsed() >= Duration::from_millis(100));
        let started = Instant::now();
        assert!(wait_reply(&client, &key, Duration::ZERO)
            .expect("no wait")
            .is_none());
        assert!(started.elapsed() < Duration::from_millis(50));
    }
}
