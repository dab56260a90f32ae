//! Controller sync: keeps the gateway's registry view current over the control channel.
//!
//! Owns the sync thread: connecting to the controller (its Unix socket, or mutual TLS to
//! `controller = "HOST:PORT"` with the enrollment in `<state_dir>/control/`), reconnecting
//! with jittered exponential backoff ([`Backoff`]), the `sync_error` audit line (once per
//! distinct error), and the lock-free registry slot the knock path reads. One connection's
//! protocol is control_stream.rs; TLS is control_tls.rs. Must not make knock decisions or
//! touch the firewall.

use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use arc_swap::ArcSwapOption;
use serde_json::json;

use crate::audit::AuditLog;
use crate::config::{Config, ControllerLink};
use crate::control_enrollment::Enrollment;
use crate::control_stream::{self, Held, StreamContext, StreamError, POLL};
use crate::control_tls::{self, ClientIdentity};
use crate::registry::RegistryView;
use crate::session_board::SessionBoard;
use crate::status::SyncState;
use crate::unix_ms;

/// Bound on connecting, the TLS handshake and each write.
const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// The shared, lock-free registry slot: `None` until the first snapshot arrives.
pub type SharedView = Arc<ArcSwapOption<RegistryView>>;

/// How the sync thread reaches the controller.
pub enum Transport {
    /// The controller's Unix socket on this host; `name` goes in `hello`.
    Socket { path: PathBuf, name: String },
    /// Mutual TLS with the enrolled identity, pinned to the enrolled controller certificate.
    Tls {
        address: String,
        pin: [u8; 32],
        identity: ClientIdentity,
    },
}

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

impl Transport {
    /// The transport `cfg` names; for TLS the enrollment must exist ("not enrolled: …").
    pub fn from_config(cfg: &Config) -> Result<Transport> {
        match &cfg.controller {
            ControllerLink::Socket(path) => Ok(Transport::Socket {
                path: path.clone(),
                name: cfg.reporting_name(),
            }),
            ControllerLink::Tls(address) => {
                let enrollment = Enrollment::read(&cfg.state_dir).map_err(|e| anyhow!(e))?;
                if &enrollment.controller != address {
                    tracing::warn!(config = %address, enrolled = %enrollment.controller, "the config's `controller` differs from the address enrolled with; connecting to the config's, pinned to the enrolled certificate");
                }
                Ok(Transport::Tls {
                    address: address.clone(),
                    pin: enrollment.pin().map_err(|e| anyhow!(e))?,
                    identity: Enrollment::identity(&cfg.state_dir)?,
                })
            }
        }
    }

    fn describe(&self) -> String {
        match self {
            Transport::Socket { path, .. } => format!("unix:{}", path.display()),
            Transport::Tls { address, .. } => format!("tls:{address}"),
        }
    }
}

/// What the sync thread works with.
pub struct SyncContext {
    pub transport: Transport,
    /// Where the last snapshot is persisted (`snapshot.json`).
    pub state_dir: PathBuf,
    pub view: SharedView,
    /// The revision loaded from `snapshot.json` at start (already in `view`), if any:
    /// the file stays the delta base.
    pub persisted: Option<u64>,
    pub state: Arc<SyncState>,
    pub audit: Arc<AuditLog>,
    pub stop: Arc<AtomicBool>,
    /// The decision thread's live sessions, reported to the controller.
    pub sessions: Arc<SessionBoard>,
}

impl std::fmt::Debug for SyncContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SyncContext")
            .field("transport", &self.transport)
            .field("state_dir", &self.state_dir)
            .finish_non_exhaustive()
    }
}

/// Reconnect delays: 0.2 s doubling to 10 s, each drawn uniformly from [d/2, d].
#[derive(Debug, Clone)]
pub struct Backoff {
    next: Duration,
}

impl Backoff {
    pub const FIRST: Duration = Duration::from_millis(200);
    pub const CAP: Duration = Duration::from_secs(10);

    pub fn new() -> Backoff {
        Backoff { next: Self::FIRST }
    }

    /// After a connection that delivered a snapshot, delta or heartbeat.
    pub fn reset(&mut self) {
        self.next = Self::FIRST;
    }

    /// The next delay; `random` is a uniformly random u64 (the jitter).
    pub fn next_delay(&mut self, random: u64) -> Duration {
        let d = self.next;
        self.next = (d * 2).min(Self::CAP);
        let low = d / 2;
        let span = (d - low).as_nanos();
        let extra = span * u128::from(random) / u128::from(u64::MAX);
        low + Duration::from_nanos(extra as u64)
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff::new()
    }
}

fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    // Jitter only: a failing RNG leaves the delay at its lower bound.
    let _ = getrandom::getrandom(&mut b);
    u64::from_ne_bytes(b)
}

/// Starts the sync thread; it runs until `ctx.stop` is set.
pub fn spawn(ctx: SyncContext) -> JoinHandle<()> {
    std::thread::Builder::new()
        .name("controller-sync".into())
        .spawn(move || run(ctx))
        .unwrap_or_else(|e| panic!("spawning the sync thread must succeed at start-up: {e}"))
}

fn run(ctx: SyncContext) {
    let mut backoff = Backoff::new();
    let mut held = Held {
        revision: ctx.persisted,
        persisted: ctx.persisted,
        ..Held::default()
    };
    let mut last_error: Option<String> = None;
    while !ctx.stop.load(Ordering::Relaxed) {
        let mut delivered = false;
        let result = connect_and_follow(&ctx, &mut held, &mut delivered);
        if delivered {
            backoff.reset();
            last_error = None;
        }
        let e = match result {
            Ok(()) => return,
            Err(e) => e,
        };
        ctx.state.disconnected();
        let delay = backoff.next_delay(random_u64());
        let text = format!("{e:#}");
        if last_error.as_deref() != Some(text.as_str()) {
            let now = unix_ms();
            let since_contact = ctx.state.since_contact_secs(now);
            let revision = ctx.view.load().as_ref().map(|v| v.revision);
            tracing::warn!(controller = %ctx.transport.describe(), error = %text, retry_ms = delay.as_millis() as u64, connected = false, revision, since_contact_secs = since_contact, "controller sync failed; keeping the last registry view (repeats of this error are not logged)");
            ctx.audit.event(
                now,
                "sync_error",
                json!({ "error": text, "controller": ctx.transport.describe(), "connected": false, "revision": revision, "since_contact_secs": since_contact, "retry_ms": delay.as_millis() as u64 }),
            );
            last_error = Some(text);
        }
        let mut slept = Duration::ZERO;
        while slept < delay && !ctx.stop.load(Ordering::Relaxed) {
            let step = (delay - slept).min(Duration::from_millis(50));
            std::thread::sleep(step);
            slept += step;
        }
    }
}

/// One connection over the configured transport; `Ok` only on a stop request.
fn connect_and_follow(ctx: &SyncContext, held: &mut Held, delivered: &mut bool) -> Result<()> {
    let stream_ctx = |name| StreamContext {
        state_dir: &ctx.state_dir,
        view: &ctx.view,
        state: &ctx.state,
        audit: &ctx.audit,
        stop: &ctx.stop,
        sessions: &ctx.sessions,
        name,
        silence_limit: control_stream::SILENCE_LIMIT,
    };
    let ended = match &ctx.transport {
        Transport::Socket { path, name } => {
            let mut stream = UnixStream::connect(path).with_context(|| {
                format!(
                    "connect to controller socket {}: is `postern-controller serve` running?",
                    path.display()
                )
            })?;
            stream.set_read_timeout(Some(POLL))?;
            stream.set_write_timeout(Some(IO_TIMEOUT))?;
            control_stream::follow(
                &mut stream,
                &stream_ctx(Some(name.clone())),
                held,
                delivered,
            )
        }
        Transport::Tls {
            address,
            pin,
            identity,
        } => {
            let mut stream = control_tls::connect(address, *pin, identity, IO_TIMEOUT)?;
            stream.sock.set_read_timeout(Some(POLL))?;
            control_stream::follow(&mut stream, &stream_ctx(None), held, delivered)
        }
    };
    ended.map_err(|e: StreamError| anyhow!(e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_the_cap_with_jitter_in_the_upper_half() {
        let mut b = Backoff::new();
        let nominal: Vec<u64> = (0..10)
            .map(|_| b.next_delay(u64::MAX).as_millis() as u64)
            .collect();
        assert_eq!(
            nominal,
            [200, 400, 800, 1600, 3200, 6400, 10_000, 10_000, 10_000, 10_000]
        );
        let mut b = Backoff::new();
        assert_eq!(
            b.next_delay(0),
            Duration::from_millis(100),
            "lower bound d/2"
        );
        for _ in 0..1000 {
            let before = b.next;
            let d = b.next_delay(random_u64());
            assert!(
                d >= before / 2 && d <= before,
                "{d:?} outside [{:?}, {before:?}]",
                before / 2
            );
        }
        b.reset();
        assert!(b.next_delay(random_u64()) <= Backoff::FIRST);
    }
}
