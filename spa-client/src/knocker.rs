//! Sending SPA datagrams: one UDP socket connected to the gateway, the device key and the
//! gateway key, and a `send(app, flags)` that builds, signs, seals and sends one knock.
//!
//! Owns: the socket's source address (the claimed address the knock signs), nonces and
//! ephemeral secrets (fresh from the OS RNG per datagram). Used by `postern knock`,
//! `postern connect` and `postern ssh-proxy`. Must not touch: packet layout and crypto
//! (the protocol crate), what a command prints, reading replies (reply_wait.rs).

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use postern_protocol::keys::{DeviceId, DeviceSigningKey, GatewayPublicKey};
use postern_protocol::packet::{self, Knock, SealRandomness};
use postern_protocol::reply::ReplyKey;
use zeroize::Zeroizing;

/// A knock sender for one gateway and one device.
pub(crate) struct Knocker {
    socket: UdpSocket,
    target: SocketAddr,
    signing: DeviceSigningKey,
    gateway_key: GatewayPublicKey,
    claimed: IpAddr,
}

impl std::fmt::Debug for Knocker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Knocker")
            .field("target", &self.target)
            .field("claimed", &self.claimed)
            .finish_non_exhaustive()
    }
}

/// What one [`Knocker::send`] put on the wire.
#[derive(Debug)]
pub(crate) struct Sent {
    pub bytes: usize,
    pub device: DeviceId,
    /// Holds this knock's ephemeral secret, to open the gateway's reply (reply_wait.rs).
    pub reply_key: ReplyKey,
}

impl Knocker {
    /// Parses the gateway key, loads the device key, resolves `gateway` (HOST[:PORT]) and
    /// connects a UDP socket to it. `allow_ip` replaces the socket's own source address as
    /// the signed claimed address (NAT).
    pub(crate) fn new(
        gateway: &str,
        gateway_key: &str,
        key_file: &Path,
        allow_ip: Option<IpAddr>,
    ) -> Result<Knocker> {
        let gateway_key = GatewayPublicKey::from_text(gateway_key).context(
            "--gateway-key: expected the `x25519:...` line printed by `postern-gateway keygen`",
        )?;
        let signing = crate::load_key(key_file)?;
        let target = crate::resolve(gateway)?;
        let bind: SocketAddr = if target.is_ipv4() {
            "0.0.0.0:0"
        } else {
            "[::]:0"
        }
        .parse()
        .context("literal wildcard address")?;
        let socket = UdpSocket::bind(bind).context("open a UDP socket")?;
        // Connecting picks the route and so the source address the gateway will see; the
        // knock claims (and signs) it, so a copy replayed from elsewhere opens nothing.
        socket
            .connect(target)
            .with_context(|| format!("no route to the gateway {target}"))?;
        let claimed = match allow_ip {
            Some(ip) => ip,
            None => socket
                .local_addr()
                .context("read the knock's source address")?
                .ip(),
        };
        Ok(Knocker {
            socket,
            target,
            signing,
            gateway_key,
            claimed,
        })
    }

    /// The gateway's SPA address.
    pub(crate) fn target(&self) -> SocketAddr {
        self.target
    }

    /// The address the knocks claim (and sign).
    pub(crate) fn claimed(&self) -> IpAddr {
        self.claimed
    }

    /// The connected socket (replies from the gateway arrive here).
    pub(crate) fn socket(&self) -> &UdpSocket {
        &self.socket
    }

    /// Builds and sends one knock for `app` with `flags` (see `packet::flags`).
    pub(crate) fn send(&self, app: &str, flags: u8) -> Result<Sent> {
        let mut nonce = [0u8; 16];
        getrandom::getrandom(&mut nonce).context("read the OS random number generator")?;
        let mut ephemeral = Zeroizing::new([0u8; 32]);
        getrandom::getrandom(ephemeral.as_mut()).context("read the OS random number generator")?;
        let device = self.signing.public_key().device_id();
        let knock = Knock {
            device,
            timestamp_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .context("system clock is before 1970")?
                .as_millis() as u64,
            nonce,
            flags,
            app: packet::AppName::new(app)
                .map_err(packet::SealError::InvalidApp)
                .with_context(|| format!("build the knock for app {app:?}"))?,
            claimed_addr: Some(self.claimed),
            posture_digest: [0; 32],
        };
        let datagram = packet::seal(
            &knock,
            &self.signing,
            &self.gateway_key,
            SealRandomness {
                ephemeral_secret: *ephemeral,
            },
        )
        .with_context(|| format!("build the knock for app {app:?}"))?;
        let reply_key = ReplyKey::new(*ephemeral, self.gateway_key, &datagram, nonce)
            .context("keep the knock's reply key")?;
        self.socket
            .send(&datagram)
            .with_context(|| format!("send the knock to {}", self.target))?;
        Ok(Sent {
            bytes: datagram.len(),
            device,
            reply_key,
        })
    }
}
