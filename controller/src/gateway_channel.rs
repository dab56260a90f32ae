//! The control channel's controller side (docs/control-channel.md): the mutually
//! authenticated TLS listener for remote gateways (`serve --gateway-listen`) and the stream
//! protocol (snapshot, deltas, heartbeats; session reports back) served on it and on the
//! Unix socket (a sync connection whose first line is `hello` is handed over here).
//!
//! Owns: its tokio runtime (own threads, stopped by the stop flag), the TLS server
//! configuration (TLS 1.3 only, ring provider, the API identity as certificate, any
//! self-signed client certificate whose handshake signature verifies), the client key's
//! SHA-256 over its SubjectPublicKeyInfo, the last [`HISTORY`] snapshots by revision with
//! the lines computed from them, the per-connection limits and timers, and closing the
//! channel of a removed gateway within [`KEY_RECHECK`].
//! Must not touch: registry rules (tokens, keys, session rows: see `gateways`), the
//! revision watcher (see `sync`, which feeds revisions in), snapshot contents or how a
//! delta is computed (`postern_protocol::delta`). Never logs tokens.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use postern_protocol::api_auth::{sha256_hex, InviteToken, GATEWAY_TOKEN_PREFIX};
use postern_protocol::control::{
    ChannelError, ControllerMessage, Enrolled, GatewayMessage, Heartbeat, Hello, MAX_GATEWAY_LINE,
};
use postern_protocol::delta;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{oneshot, watch, Semaphore};
use tracing::{debug, info, warn};

use crate::api_identity::{self, ApiIdentityError};
use crate::gateways::{KeyLookup, SessionReportError};
use crate::proto::snapshot::Snapshot;
use crate::registry::{Registry, RegistryError};
use crate::validate;

/// Snapshots kept in memory by revision, to resume a gateway with a delta.
pub const HISTORY: usize = 64;
/// Open stream connections (TLS and Unix socket together); more get `busy`.
pub const MAX_CHANNELS: usize = 256;
/// Connections from keys that are not registered (enrollment, refusals): their own small
/// pool, so unauthenticated peers can never take the registered gateways' slots.
pub const MAX_UNREGISTERED: usize = 16;
/// TLS handshakes in progress at once; a connection beyond it is closed unanswered.
pub const MAX_HANDSHAKES: usize = 64;
/// Sessions reports from one channel are stored at most this often.
pub const REPORT_INTERVAL: Duration = Duration::from_millis(200);
/// A heartbeat is sent after this long without any message to the gateway.
pub const HEARTBEAT_AFTER: Duration = Duration::from_secs(5);
/// A gateway that sends nothing for this long is treated as dead.
pub const READ_SILENCE: Duration = Duration::from_secs(60);
/// The TLS handshake and the first line must arrive within this.
pub const FIRST_LINE_TIMEOUT: Duration = Duration::from_secs(10);
/// A line that cannot be written within this closes the connection.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// How often the registered keys are re-read (a removed gateway's channel closes).
pub const KEY_RECHECK: Duration = Duration::from_millis(250);
/// The name a Unix-socket gateway reports under when its hello names none.
pub const DEFAULT_LOCAL_NAME: &str = "local";
/// Protocol version spoken.
pub const VERSION: u32 = 1;
/// Unread input drained (bounded) before closing a refused connection, so the peer gets
/// the error line instead of a reset.
const DRAIN_LIMIT: u64 = 64 * 1024;
/// Longest first line (`enroll`, `hello`): it arrives before the key is checked, so it is
/// kept small; session reports after `hello` may use [`MAX_GATEWAY_LINE`].
pub const MAX_FIRST_LINE: usize = 64 * 1024;
const DRAIN_TIME: Duration = Duration::from_millis(300);
const STOP_CHECK: Duration = Duration::from_millis(100);

/// Channel settings (from `serve`).
#[derive(Debug, Clone)]
pub struct ChannelConfig {
    pub db: PathBuf,
    /// `--gateway-listen`; `None` serves the Unix-socket stream only.
    pub listen: Option<SocketAddr>,
    /// The API identity's directory: its certificate is the channel's.
    pub api_dir: PathBuf,
    /// A gateway silent this long is dropped ([`READ_SILENCE`]; shorter in tests).
    pub read_silence: Duration,
}

/// Why the channel could not start. One line each.
#[derive(Debug, thiserror::Error)]
pub enum ChannelStartError {
    #[error(transparent)]
    Identity(#[from] ApiIdentityError),
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error("gateway channel TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    #[error("--gateway-listen {addr}: cannot listen: {cause}: pick a free address and port")]
    Bind { addr: SocketAddr, cause: io::Error },
    #[error("cannot start the gateway channel runtime: {0}")]
    Runtime(io::Error),
}

/// The running channel.
#[derive(Debug)]
pub struct GatewayChannel {
    /// The bound TLS address (the real port when `--gateway-listen` asked for port 0).
    pub local_addr: Option<SocketAddr>,
    handoff: UnixHandoff,
    thread: JoinHandle<()>,
}

/// Hands Unix-socket connections whose first line was `hello` to the channel. Cheap to
/// clone (one per sync connection thread).
#[derive(Debug, Clone)]
pub struct UnixHandoff {
    runtime: tokio::runtime::Handle,
    shared: Arc<Shared>,
}

/// State shared by all connections.
struct Shared {
    /// Writes (session reports, contact times) and key lookups.
    registry: Mutex<Registry>,
    history: Mutex<History>,
    /// The digest of the newest snapshot, by revision (see `newest_digest`).
    digest_memo: Mutex<Option<(u64, Arc<str>)>>,
    /// The newest snapshot (`None` until first read).
    current: watch::Sender<Option<Arc<Snapshot>>>,
    /// Registered, not removed gateways: name -> key SHA-256.
    active_keys: watch::Sender<Arc<HashMap<String, String>>>,
    slots: Arc<Semaphore>,
    /// Slots for connections whose key is not registered ([`MAX_UNREGISTERED`]).
    unregistered_slots: Arc<Semaphore>,
    handshakes: Arc<Semaphore>,
    stop: Arc<AtomicBool>,
    read_silence: Duration,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared").finish_non_exhaustive()
    }
}

/// The last [`HISTORY`] snapshots, and the lines made from the newest (memo: every
/// gateway at the same revision gets the same bytes, computed once).
#[derive(Default)]
struct History {
    snapshots: BTreeMap<u64, Arc<Snapshot>>,
    /// (from revision or None for a full snapshot, to revision) -> line.
    lines: HashMap<(Option<u64>, u64), Arc<[u8]>>,
}

impl History {
    fn insert(&mut self, snap: Arc<Snapshot>) {
        let rev = snap.revision;
        self.snapshots.insert(rev, snap);
        while self.snapshots.len() > HISTORY {
            self.snapshots.pop_first();
        }
        self.lines.retain(|(_, to), _| *to == rev);
    }
}

impl GatewayChannel {
    /// Starts the channel runtime: the snapshot history fed by `revisions`, the key
    /// re-check and, with `cfg.listen`, the TLS listener (logs
    /// `gateway channel listening on ADDR`). Runs until `stop` is set.
    pub fn start(
        cfg: &ChannelConfig,
        revisions: watch::Receiver<u64>,
        stop: Arc<AtomicBool>,
    ) -> Result<GatewayChannel, ChannelStartError> {
        let registry = Registry::open(&cfg.db)?;
        // A starting controller has no channels yet.
        registry.clear_gateway_channels()?;
        let keys = load_keys(&registry)?;
        let snapshot_reader = Registry::open(&cfg.db)?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("gateway-channel")
            .enable_all()
            .build()
            .map_err(ChannelStartError::Runtime)?;
        let listener = match cfg.listen {
            Some(addr) => Some(bind_tls(cfg, addr, &runtime)?),
            None => None,
        };
        let local_addr = listener.as_ref().map(|(_, _, a)| *a);
        let shared = Arc::new(Shared {
            registry: Mutex::new(registry),
            history: Mutex::new(History::default()),
            digest_memo: Mutex::new(None),
            current: watch::Sender::new(None),
            active_keys: watch::Sender::new(Arc::new(keys)),
            slots: Arc::new(Semaphore::new(MAX_CHANNELS)),
            unregistered_slots: Arc::new(Semaphore::new(MAX_UNREGISTERED)),
            handshakes: Arc::new(Semaphore::new(MAX_HANDSHAKES)),
            stop,
            read_silence: cfg.read_silence,
        });
        let handoff = UnixHandoff {
            runtime: runtime.handle().clone(),
            shared: Arc::clone(&shared),
        };
        let thread = std::thread::Builder::new()
            .name("gateway-channel".into())
            .spawn(move || {
                runtime.block_on(async {
                    tokio::spawn(refresh_snapshots(
                        Arc::clone(&shared),
                        snapshot_reader,
                        revisions,
                    ));
                    tokio::spawn(recheck_keys(Arc::clone(&shared)));
                    match listener {
                        Some((listener, acceptor, _)) => {
                            accept_loop(listener, acceptor, Arc::clone(&shared)).await;
                        }
                        None => wait_stop(&shared.stop).await,
                    }
                    // Let open channels see the stop flag and close (bounded).
                    let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
                    while shared.slots.available_permits() < MAX_CHANNELS
                        && tokio::time::Instant::now() < deadline
                    {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                });
                runtime.shutdown_timeout(Duration::from_secs(2));
                info!("gateway channel stopped");
            })
            .map_err(ChannelStartError::Runtime)?;
        Ok(GatewayChannel {
            local_addr,
            handoff,
            thread,
        })
    }

    /// The Unix-socket hand-over.
    pub fn unix_handoff(&self) -> UnixHandoff {
        self.handoff.clone()
    }

    /// Waits for the channel thread (it returns once the stop flag is set).
    pub fn join(self) {
        drop(self.handoff);
        if self.thread.join().is_err() {
            warn!("gateway channel thread panicked");
        }
    }
}

impl UnixHandoff {
    /// Serves the stream on a Unix-socket connection whose first line was `hello`.
    /// `buffered` is what the caller read past that line; `guard` is dropped when the
    /// connection ends (the sync server's connection count).
    pub fn serve(
        &self,
        stream: std::os::unix::net::UnixStream,
        buffered: Vec<u8>,
        hello: Hello,
        guard: impl Send + 'static,
    ) {
        let shared = Arc::clone(&self.shared);
        self.runtime.spawn(async move {
            let _guard = guard;
            if let Err(e) = serve_unix(shared, stream, buffered, hello).await {
                debug!(error = %e, "local gateway connection ended");
            }
        });
    }
}

async fn serve_unix(
    shared: Arc<Shared>,
    stream: std::os::unix::net::UnixStream,
    buffered: Vec<u8>,
    hello: Hello,
) -> io::Result<()> {
    stream.set_read_timeout(None)?;
    stream.set_write_timeout(None)?;
    stream.set_nonblocking(true)?;
    let stream = tokio::net::UnixStream::from_std(stream)?;
    let (read, mut write) = tokio::io::split(stream);
    let reader = tokio::io::BufReader::new(std::io::Cursor::new(buffered).chain(read));
    let name = hello
        .name
        .clone()
        .unwrap_or_else(|| DEFAULT_LOCAL_NAME.to_owned());
    if let Err(e) = validate::gateway_name(&name) {
        return refuse(
            &mut write,
            reader,
            "bad_request",
            &format!("hello.name: {e}"),
        )
        .await;
    }
    let remote = {
        let name = name.clone();
        with_registry(&shared, move |reg| reg.is_remote_gateway(&name)).await?
    };
    if !matches!(remote, Ok(false)) {
        let message = match remote {
            Ok(_) => format!(
                "hello.name {name:?} belongs to a remote gateway (`postern-controller gateway list`): set another `name` in this gateway's config"
            ),
            Err(e) => format!("cannot check hello.name against the registry: {e}"),
        };
        return refuse(&mut write, reader, "bad_request", &message).await;
    }
    let Ok(permit) = Arc::clone(&shared.slots).try_acquire_owned() else {
        return refuse(&mut write, reader, "busy", BUSY_MESSAGE).await;
    };
    let peer = Peer {
        name,
        key: None,
        transport: "unix",
    };
    let outcome = serve_stream(Arc::clone(&shared), reader, write, &peer, hello).await;
    drop(permit);
    outcome
}

const BUSY_MESSAGE: &str = "the controller serves its maximum of gateway connections; retry later";

fn load_keys(registry: &Registry) -> Result<HashMap<String, String>, RegistryError> {
    Ok(registry.active_gateway_keys()?.into_iter().collect())
}

type TlsListener = (
    tokio::net::TcpListener,
    tokio_rustls::TlsAcceptor,
    SocketAddr,
);

fn bind_tls(
    cfg: &ChannelConfig,
    addr: SocketAddr,
    runtime: &tokio::runtime::Runtime,
) -> Result<TlsListener, ChannelStartError> {
    let identity = api_identity::load_or_create(&cfg.api_dir)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = Arc::new(AnySelfSignedClient {
        algorithms: provider.signature_verification_algorithms,
    });
    let tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(vec![identity.cert.clone()], identity.key.clone_key())?;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let bind_err = |cause| ChannelStartError::Bind { addr, cause };
    let std_listener = std::net::TcpListener::bind(addr).map_err(bind_err)?;
    std_listener.set_nonblocking(true).map_err(bind_err)?;
    let local = std_listener.local_addr().map_err(bind_err)?;
    let listener = {
        let _guard = runtime.enter();
        tokio::net::TcpListener::from_std(std_listener).map_err(bind_err)?
    };
    info!(fingerprint = %identity.fingerprint, "gateway channel listening on {local}");
    Ok((listener, acceptor, local))
}

/// Requires a client certificate and checks only that the peer holds its key (the
/// handshake signature); which keys are accepted is decided after the handshake from the
/// registry (the SHA-256 of the certificate's SubjectPublicKeyInfo).
#[derive(Debug)]
struct AnySelfSignedClient {
    algorithms: WebPkiSupportedAlgorithms,
}

impl ClientCertVerifier for AnySelfSignedClient {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        webpki::EndEntityCert::try_from(end_entity).map_err(|_| {
            rustls::Error::InvalidCertificate(rustls::CertificateError::BadEncoding)
        })?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// SHA-256 (hex) of a certificate's SubjectPublicKeyInfo DER: the registered gateway key.
pub fn spki_sha256(cert: &CertificateDer<'_>) -> Option<String> {
    let ee = webpki::EndEntityCert::try_from(cert).ok()?;
    Some(sha256_hex(ee.subject_public_key_info().as_ref()))
}

async fn wait_stop(stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        tokio::time::sleep(STOP_CHECK).await;
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Runs `f` with the shared registry on a blocking thread.
async fn with_registry<T, F>(shared: &Arc<Shared>, f: F) -> io::Result<T>
where
    T: Send + 'static,
    F: FnOnce(&mut Registry) -> T + Send + 'static,
{
    let shared = Arc::clone(shared);
    tokio::task::spawn_blocking(move || {
        let mut reg = shared
            .registry
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        f(&mut reg)
    })
    .await
    .map_err(io::Error::other)
}

/// Reads the snapshot whenever the revision changes; keeps the history and publishes
/// the newest snapshot to every connection.
async fn refresh_snapshots(
    shared: Arc<Shared>,
    reader: Registry,
    mut revisions: watch::Receiver<u64>,
) {
    let reader = Arc::new(Mutex::new(reader));
    let mut failing = false;
    while !shared.stop.load(Ordering::Relaxed) {
        let wanted = *revisions.borrow_and_update();
        let have = shared.current.borrow().as_ref().map(|s| s.revision);
        if have != Some(wanted) {
            let reader = Arc::clone(&reader);
            let read = tokio::task::spawn_blocking(move || {
                reader
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .snapshot()
            })
            .await;
            match read {
                Ok(Ok(snap)) => {
                    failing = false;
                    if have != Some(snap.revision) {
                        let snap = Arc::new(snap);
                        shared
                            .history
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .insert(Arc::clone(&snap));
                        debug!(revision = snap.revision, "gateway channel: new snapshot");
                        shared.current.send_replace(Some(snap));
                    }
                }
                Ok(Err(e)) => {
                    if !failing {
                        warn!(error = %e, "gateway channel cannot read the snapshot; retrying");
                        failing = true;
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
                Err(e) => {
                    warn!(error = %e, "gateway channel snapshot reader failed");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            }
        }
        tokio::select! {
            changed = revisions.changed() => if changed.is_err() { return },
            () = tokio::time::sleep(STOP_CHECK) => {}
        }
    }
}

/// Re-reads the registered keys every [`KEY_RECHECK`]; connections of a gateway that is
/// no longer listed (removed, re-issued) close.
async fn recheck_keys(shared: Arc<Shared>) {
    let mut failing = false;
    while !shared.stop.load(Ordering::Relaxed) {
        tokio::time::sleep(KEY_RECHECK).await;
        match with_registry(&shared, |reg| load_keys(reg)).await {
            Ok(Ok(keys)) => {
                failing = false;
                shared.active_keys.send_if_modified(|cur| {
                    if **cur == keys {
                        false
                    } else {
                        *cur = Arc::new(keys);
                        true
                    }
                });
            }
            Ok(Err(e)) => {
                if !failing {
                    warn!(error = %e, "cannot re-read gateway keys");
                    failing = true;
                }
            }
            Err(e) => warn!(error = %e, "gateway key re-check failed"),
        }
    }
}

async fn accept_loop(
    listener: tokio::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    shared: Arc<Shared>,
) {
    let stopped = wait_stop(&shared.stop);
    tokio::pin!(stopped);
    loop {
        let (tcp, peer) = tokio::select! {
            () = &mut stopped => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    warn!(error = %e, "gateway channel accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(handshake) = Arc::clone(&shared.handshakes).try_acquire_owned() else {
            debug!(%peer, "too many TLS handshakes in progress; closing one unanswered");
            drop(tcp);
            continue;
        };
        let acceptor = acceptor.clone();
        let shared = Arc::clone(&shared);
        tokio::spawn(async move {
            if let Err(e) = serve_tls(shared, acceptor, tcp, peer, handshake).await {
                debug!(%peer, error = %e, "gateway TLS connection ended");
            }
        });
    }
}

async fn serve_tls(
    shared: Arc<Shared>,
    acceptor: tokio_rustls::TlsAcceptor,
    tcp: tokio::net::TcpStream,
    addr: SocketAddr,
    handshake: tokio::sync::OwnedSemaphorePermit,
) -> io::Result<()> {
    let accepted = tokio::time::timeout(FIRST_LINE_TIMEOUT, acceptor.accept(tcp)).await;
    drop(handshake);
    let tls = match accepted {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            info!(peer = %addr, error = %e, "gateway TLS handshake failed");
            return Ok(());
        }
        Err(_) => {
            info!(peer = %addr, "gateway TLS handshake timed out");
            return Ok(());
        }
    };
    let key = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|certs| certs.first())
        .and_then(spki_sha256);
    let (read, mut write) = tokio::io::split(tls);
    let mut reader = tokio::io::BufReader::new(read);
    let Some(key) = key else {
        // The verifier requires a parseable certificate; this is a bug if reached.
        return refuse(&mut write, reader, "bad_request", "no client certificate").await;
    };
    // The key is known from the handshake: only registered, active keys may take one of the
    // gateways' slots (the first line, which may take up to 10 s, comes after).
    let registered = {
        let key = key.clone();
        matches!(
            with_registry(&shared, move |reg| reg.gateway_by_key(&key)).await?,
            Ok(KeyLookup::Active(_))
        )
    };
    let pool = if registered {
        &shared.slots
    } else {
        &shared.unregistered_slots
    };
    let permit = Arc::clone(pool).try_acquire_owned();
    let Ok(_permit) = permit else {
        warn!(peer = %addr, "too many gateway connections; refusing one");
        return refuse(&mut write, reader, "busy", BUSY_MESSAGE).await;
    };
    let first = match first_message(&mut reader).await {
        Ok(m) => m,
        Err(msg) => return refuse(&mut write, reader, "bad_request", &msg).await,
    };
    match first {
        GatewayMessage::Enroll(req) => enroll(&shared, write, reader, &req.token, &key, addr).await,
        GatewayMessage::Hello(hello) => {
            let lookup = {
                let key = key.clone();
                with_registry(&shared, move |reg| reg.gateway_by_key(&key)).await?
            };
            match lookup {
                Ok(KeyLookup::Active(name)) => {
                    // The re-check's map may predate this registration: add it, so a
                    // removal shows up as a change.
                    shared.active_keys.send_if_modified(|cur| {
                        if cur.get(&name) == Some(&key) {
                            return false;
                        }
                        let mut keys = (**cur).clone();
                        keys.insert(name.clone(), key.clone());
                        *cur = Arc::new(keys);
                        true
                    });
                    let peer = Peer {
                        name,
                        key: Some(key),
                        transport: "tls",
                    };
                    serve_stream(shared, reader, write, &peer, hello).await
                }
                Ok(KeyLookup::Removed(name)) => {
                    info!(gateway = %name, peer = %addr, "removed gateway refused");
                    refuse(
                        &mut write,
                        reader,
                        "gateway_removed",
                        &format!("gateway {name:?} was removed from this controller: ask the admin for a new token (`postern-controller gateway add {name} --reissue`) and enroll again"),
                    )
                    .await
                }
                Ok(KeyLookup::Unknown) => {
                    info!(peer = %addr, key_sha256 = %key, "unknown gateway key refused");
                    refuse(
                        &mut write,
                        reader,
                        "unknown_gateway",
                        "this gateway's key is not registered with the controller: run `postern-gateway enroll` with a token from `postern-controller gateway add NAME`",
                    )
                    .await
                }
                Err(e) => {
                    warn!(error = %e, "cannot look up a gateway key");
                    refuse(
                        &mut write,
                        reader,
                        "busy",
                        "the controller cannot read its registry; retry later",
                    )
                    .await
                }
            }
        }
        GatewayMessage::Sessions(_) => {
            refuse(
                &mut write,
                reader,
                "bad_request",
                "the first line must be hello (or enroll)",
            )
            .await
        }
    }
}

/// Reads and parses the first line (within [`FIRST_LINE_TIMEOUT`]).
async fn first_message<R: AsyncBufRead + Unpin>(reader: &mut R) -> Result<GatewayMessage, String> {
    match tokio::time::timeout(FIRST_LINE_TIMEOUT, read_line(reader, MAX_FIRST_LINE)).await {
        Err(_) => Err("no first line within 10 s".to_owned()),
        Ok(Err(e)) => Err(format!("read error: {e}")),
        Ok(Ok(Line::Text(bytes))) => parse_line(&bytes),
        Ok(Ok(other)) => Err(other.describe()),
    }
}

async fn enroll<R, W>(
    shared: &Arc<Shared>,
    mut write: W,
    reader: R,
    token: &str,
    key: &str,
    addr: SocketAddr,
) -> io::Result<()>
where
    R: AsyncBufRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let Ok(token) = InviteToken::parse_with_prefix(token, GATEWAY_TOKEN_PREFIX) else {
        return refuse(
            &mut write,
            reader,
            "bad_token",
            "the token is malformed: expected postern-gateway:v1:<secret>:<certificate sha256> as printed by `postern-controller gateway add`",
        )
        .await;
    };
    let now = now_ms() / 1000;
    let key_owned = key.to_owned();
    let outcome = with_registry(shared, move |reg| {
        reg.register_gateway(token.secret(), &key_owned, now)
    })
    .await?;
    match outcome {
        Ok(Ok(name)) => {
            info!(gateway = %name, peer = %addr, key_sha256 = %key, "gateway registered");
            let line = message_line(&ControllerMessage::Enrolled(Enrolled { name }))?;
            write_line(&mut write, &line).await?;
            close(&mut write, reader).await;
            Ok(())
        }
        Ok(Err(refusal)) => {
            info!(peer = %addr, reason = %refusal, "gateway enrollment refused");
            refuse(&mut write, reader, refusal.code(), &refusal.to_string()).await
        }
        Err(e) => {
            warn!(error = %e, "gateway enrollment failed");
            refuse(
                &mut write,
                reader,
                "busy",
                "the controller cannot write its registry; retry later",
            )
            .await
        }
    }
}

/// Who is on the other end of a stream.
#[derive(Debug)]
struct Peer {
    name: String,
    /// The registered key (TLS); `None` for the Unix socket.
    key: Option<String>,
    transport: &'static str,
}

/// How the reading half ended.
#[derive(Debug)]
enum ReadEnd {
    Eof,
    Silent,
    Bad(String),
    Io(io::Error),
}

/// Serves the stream after `hello` until either side ends it. Generic over the
/// transport (TLS or Unix socket).
async fn serve_stream<R, W>(
    shared: Arc<Shared>,
    reader: R,
    mut write: W,
    peer: &Peer,
    hello: Hello,
) -> io::Result<()>
where
    R: AsyncBufRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin,
{
    if hello.version != VERSION {
        return refuse(
            &mut write,
            reader,
            "bad_request",
            &format!(
                "protocol version {} is not supported: this controller speaks version {VERSION}; upgrade the gateway or the controller",
                hello.version
            ),
        )
        .await;
    }
    let mut current = shared.current.subscribe();
    let Ok(first) = current
        .wait_for(Option::is_some)
        .await
        .map(|s| s.as_ref().map(Arc::clone))
    else {
        return Ok(());
    };
    let Some(mut newest) = first else {
        return Ok(());
    };
    let since = now_ms();
    let held_revision = Arc::new(std::sync::atomic::AtomicU64::new(
        hello.after_revision.unwrap_or(0),
    ));
    let (end_tx, mut end_rx) = oneshot::channel();
    let mut reading = tokio::spawn(read_reports(
        Arc::clone(&shared),
        reader,
        peer.name.clone(),
        Arc::clone(&held_revision),
        end_tx,
    ));
    info!(gateway = %peer.name, transport = peer.transport, after_revision = ?hello.after_revision, revision = newest.revision, "gateway connected");
    {
        let (name, after) = (peer.name.clone(), hello.after_revision);
        let marked = with_registry(&shared, move |reg| {
            reg.mark_gateway_channel(&name, since, true)?;
            reg.record_gateway_seen(&name, since, after)
        })
        .await?;
        if let Err(e) = marked {
            warn!(gateway = %peer.name, error = %e, "cannot record the gateway's connection");
        }
    }
    let (line, mut held) = opening_line(
        &shared,
        hello.after_revision,
        hello.digest.as_deref(),
        &newest,
    )?;
    let mut result = write_line(&mut write, &line).await;
    held_revision.store(held.revision, Ordering::Relaxed);
    let mut last_sent = tokio::time::Instant::now();
    let mut keys = shared.active_keys.subscribe();
    // A receiver starts with the current map marked as seen: a removal between the key
    // lookup and here would never fire `changed()`. Check once at the top of the loop.
    keys.mark_changed();
    let mut reason = "controller stopping".to_owned();
    while result.is_ok() && !shared.stop.load(Ordering::Relaxed) {
        let heartbeat_at = last_sent + HEARTBEAT_AFTER;
        tokio::select! {
            changed = current.changed() => {
                if changed.is_err() {
                    break;
                }
                let Some(snap) = current.borrow_and_update().as_ref().map(Arc::clone) else {
                    continue;
                };
                newest = snap;
                if newest.revision == held.revision {
                    continue;
                }
                let line = match update_line(&shared, &held, &newest) {
                    Ok(l) => l,
                    Err(e) => { result = Err(e); break; }
                };
                result = write_line(&mut write, &line).await;
                held = Arc::clone(&newest);
                held_revision.store(held.revision, Ordering::Relaxed);
                last_sent = tokio::time::Instant::now();
            }
            () = tokio::time::sleep_until(heartbeat_at) => {
                let line = message_line(&ControllerMessage::Heartbeat(Heartbeat {
                    revision: held.revision,
                    at_ms: now_ms(),
                }))?;
                result = write_line(&mut write, &line).await;
                last_sent = tokio::time::Instant::now();
            }
            end = &mut end_rx => {
                match end {
                    Ok(ReadEnd::Bad(msg)) => {
                        reason = format!("bad request: {msg}");
                        let _ = send_error(&mut write, "bad_request", &msg).await;
                    }
                    Ok(ReadEnd::Silent) => {
                        reason = format!("no line from the gateway for {:?}", shared.read_silence);
                    }
                    Ok(ReadEnd::Io(e)) => reason = format!("read error: {e}"),
                    Ok(ReadEnd::Eof) | Err(_) => reason = "closed by the gateway".into(),
                }
                break;
            }
            changed = keys.changed() => {
                if changed.is_err() {
                    break;
                }
                let listed = match &peer.key {
                    None => true,
                    Some(key) => keys.borrow_and_update().get(&peer.name) == Some(key),
                };
                // The map is a hint (it may race a registration); the registry decides.
                if !listed && !still_registered(&shared, peer).await {
                    reason = "gateway removed".into();
                    let _ = send_error(
                        &mut write,
                        "gateway_removed",
                        "this gateway was removed from the controller: ask the admin for a new token and enroll again",
                    )
                    .await;
                    break;
                }
            }
            () = tokio::time::sleep(STOP_CHECK) => {}
        }
    }
    if let Err(e) = &result {
        reason = format!("write failed: {e}");
    }
    let _ = tokio::time::timeout(DRAIN_TIME, write.shutdown()).await;
    // Let the reader see the gateway's close (so unread input does not reset the
    // connection before our last line arrives), then stop it.
    if tokio::time::timeout(DRAIN_TIME, &mut reading)
        .await
        .is_err()
    {
        reading.abort();
    }
    info!(gateway = %peer.name, transport = peer.transport, revision = held.revision, reason = %reason, "gateway disconnected");
    let name = peer.name.clone();
    let cleared = with_registry(&shared, move |reg| {
        reg.mark_gateway_channel(&name, since, false)
    })
    .await;
    if let Ok(Err(e)) = cleared {
        warn!(gateway = %peer.name, error = %e, "cannot record the gateway's disconnection");
    }
    Ok(())
}

/// True when the peer's key still belongs to its gateway and it was not removed (true
/// too when the registry cannot be read: a read error must not drop every gateway).
async fn still_registered(shared: &Arc<Shared>, peer: &Peer) -> bool {
    let Some(key) = peer.key.clone() else {
        return true;
    };
    match with_registry(shared, move |reg| reg.gateway_by_key(&key)).await {
        Ok(Ok(KeyLookup::Active(name))) => name == peer.name,
        Ok(Ok(_)) => false,
        Ok(Err(e)) => {
            warn!(gateway = %peer.name, error = %e, "cannot re-check a gateway key");
            true
        }
        Err(_) => true,
    }
}

/// The first line after `hello`: a heartbeat when the gateway is current, a delta from a
/// revision still in the history, else the full snapshot. Returns the line and the
/// snapshot the gateway holds after it.
fn opening_line(
    shared: &Shared,
    after: Option<u64>,
    digest: Option<&str>,
    newest: &Arc<Snapshot>,
) -> io::Result<(Arc<[u8]>, Arc<Snapshot>)> {
    if after == Some(newest.revision)
        && digest.is_none_or(|d| d == newest_digest(shared, newest).as_ref())
    {
        let line = message_line(&ControllerMessage::Heartbeat(Heartbeat {
            revision: newest.revision,
            at_ms: now_ms(),
        }))?;
        return Ok((line, Arc::clone(newest)));
    }
    let base = after.and_then(|r| {
        shared
            .history
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .snapshots
            .get(&r)
            .cloned()
    });
    let line = match base {
        Some(base) if base.revision < newest.revision => update_line(shared, &base, newest)?,
        _ => full_line(shared, newest)?,
    };
    Ok((line, Arc::clone(newest)))
}

/// `delta::digest` of `newest`, computed once per revision (it reads every record).
fn newest_digest(shared: &Shared, newest: &Snapshot) -> Arc<str> {
    let mut memo = shared
        .digest_memo
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    match &*memo {
        Some((rev, d)) if *rev == newest.revision => Arc::clone(d),
        _ => {
            let d: Arc<str> = delta::digest(newest).into();
            *memo = Some((newest.revision, Arc::clone(&d)));
            d
        }
    }
}

/// A delta from `held` to `newest`, or the full snapshot if `newest` is older (a
/// restored backup). Memoized per (from, to).
fn update_line(shared: &Shared, held: &Snapshot, newest: &Arc<Snapshot>) -> io::Result<Arc<[u8]>> {
    if newest.revision < held.revision {
        return full_line(shared, newest);
    }
    memo_line(shared, Some(held.revision), newest.revision, || {
        let d = delta::diff(held, newest);
        if is_bulk(&d, newest) {
            ControllerMessage::Snapshot(Snapshot::clone(newest))
        } else {
            ControllerMessage::Delta(d)
        }
    })
}

/// A delta changing at least this many records, and more than a quarter of the new
/// snapshot's, is sent as the full snapshot instead: the gateway parses a snapshot
/// straight into records, while applying a delta goes through the whole base as JSON
/// values and re-hashes every record (a bulk enrollment would cost it time and memory).
const BULK_DELTA_RECORDS: usize = 1000;

fn is_bulk(d: &delta::SnapshotDelta, newest: &Snapshot) -> bool {
    let changed: usize = d
        .changes
        .values()
        .map(|c| match c {
            delta::FieldChange::Elements { remove, add } => remove.len() + add.len(),
            delta::FieldChange::Set(_) | delta::FieldChange::Unset => 1,
        })
        .sum();
    let records = newest.devices.len()
        + newest.apps.len()
        + newest.grants.len()
        + newest.access.as_ref().map_or(0, Vec::len)
        + newest.denials.as_ref().map_or(0, Vec::len)
        + newest.kills.as_ref().map_or(0, Vec::len)
        + newest.subjects.as_ref().map_or(0, Vec::len);
    changed >= BULK_DELTA_RECORDS && changed.saturating_mul(4) > records
}

fn full_line(shared: &Shared, newest: &Arc<Snapshot>) -> io::Result<Arc<[u8]>> {
    memo_line(shared, None, newest.revision, || {
        ControllerMessage::Snapshot((**newest).clone())
    })
}

fn memo_line(
    shared: &Shared,
    from: Option<u64>,
    to: u64,
    make: impl FnOnce() -> ControllerMessage,
) -> io::Result<Arc<[u8]>> {
    let key = (from, to);
    if let Some(line) = shared
        .history
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .lines
        .get(&key)
    {
        return Ok(Arc::clone(line));
    }
    // Computed outside the lock; two connections may race to make the same line.
    let line = message_line(&make())?;
    let mut history = shared
        .history
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    if history.snapshots.keys().next_back() == Some(&to) {
        history.lines.insert(key, Arc::clone(&line));
    }
    Ok(line)
}

fn message_line(msg: &ControllerMessage) -> io::Result<Arc<[u8]>> {
    let mut line = serde_json::to_vec(msg).map_err(io::Error::other)?;
    line.push(b'\n');
    Ok(line.into())
}

async fn write_line<W: AsyncWrite + Unpin>(write: &mut W, line: &[u8]) -> io::Result<()> {
    tokio::time::timeout(WRITE_TIMEOUT, async {
        write.write_all(line).await?;
        write.flush().await
    })
    .await
    .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "write timed out"))?
}

async fn send_error<W: AsyncWrite + Unpin>(
    write: &mut W,
    code: &str,
    message: &str,
) -> io::Result<()> {
    let line = message_line(&ControllerMessage::Error(ChannelError {
        code: code.to_owned(),
        message: message.to_owned(),
    }))?;
    write_line(write, &line).await
}

/// Sends `error` and closes: shuts down writing, then drains (bounded) what the peer
/// still sends, so it reads the error instead of a reset.
async fn refuse<R, W>(write: &mut W, reader: R, code: &str, message: &str) -> io::Result<()>
where
    R: AsyncBufRead + Unpin,
    W: AsyncWrite + Unpin,
{
    debug!(code, reason = message, "refusing gateway connection");
    send_error(write, code, message).await?;
    close(write, reader).await;
    Ok(())
}

async fn close<R, W>(write: &mut W, reader: R)
where
    R: AsyncBufRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let _ = tokio::time::timeout(DRAIN_TIME, write.shutdown()).await;
    let mut limited = reader.take(DRAIN_LIMIT);
    let _ = tokio::time::timeout(
        DRAIN_TIME,
        tokio::io::copy(&mut limited, &mut tokio::io::sink()),
    )
    .await;
}

/// Reads the gateway's lines (session reports) until it closes, goes silent for
/// `read_silence` ([`READ_SILENCE`]), or sends something malformed; stores each report.
async fn read_reports<R: AsyncBufRead + Unpin>(
    shared: Arc<Shared>,
    mut reader: R,
    name: String,
    held_revision: Arc<std::sync::atomic::AtomicU64>,
    end: oneshot::Sender<ReadEnd>,
) {
    let mut last_store: Option<tokio::time::Instant> = None;
    let outcome = loop {
        let line = match tokio::time::timeout(
            shared.read_silence,
            read_line(&mut reader, MAX_GATEWAY_LINE),
        )
        .await
        {
            Err(_) => break ReadEnd::Silent,
            Ok(Err(e)) => break ReadEnd::Io(e),
            Ok(Ok(Line::Eof)) => break ReadEnd::Eof,
            Ok(Ok(Line::Text(bytes))) => bytes,
            Ok(Ok(other)) => break ReadEnd::Bad(other.describe()),
        };
        let report = match parse_line(&line) {
            Ok(GatewayMessage::Sessions(report)) => report,
            Ok(GatewayMessage::Hello(_) | GatewayMessage::Enroll(_)) => {
                break ReadEnd::Bad("unexpected message: only sessions reports follow hello".into())
            }
            Err(msg) => break ReadEnd::Bad(msg),
        };
        // At most one stored report per REPORT_INTERVAL per channel (gateways send at most
        // 5 per second): a peer sending faster is slowed down by TCP, not by the database.
        if let Some(at) = last_store {
            tokio::time::sleep_until(at + REPORT_INTERVAL).await;
        }
        last_store = Some(tokio::time::Instant::now());
        let (name2, revision) = (name.clone(), held_revision.load(Ordering::Relaxed));
        let count = report.sessions.len();
        let stored = with_registry(&shared, move |reg| {
            reg.replace_live_sessions(&name2, &report, now_ms(), Some(revision))
        })
        .await;
        match stored {
            Ok(Ok(())) => debug!(gateway = %name, sessions = count, "sessions report stored"),
            Ok(Err(SessionReportError::Registry(e))) => {
                warn!(gateway = %name, error = %e, "cannot store a sessions report");
            }
            Ok(Err(e)) => break ReadEnd::Bad(e.to_string()),
            Err(e) => warn!(gateway = %name, error = %e, "sessions report task failed"),
        }
    };
    let bad = matches!(outcome, ReadEnd::Bad(_));
    let _ = end.send(outcome);
    if bad {
        // Keep reading (bounded) so the peer is not reset before it reads our error.
        let mut limited = (&mut reader).take(DRAIN_LIMIT);
        let _ = tokio::time::timeout(
            DRAIN_TIME,
            tokio::io::copy(&mut limited, &mut tokio::io::sink()),
        )
        .await;
    }
}

/// One line from the gateway.
#[derive(Debug, PartialEq, Eq)]
enum Line {
    Text(Vec<u8>),
    Eof,
    /// Longer than the cap (named).
    TooLong(usize),
    Truncated,
}

impl Line {
    fn describe(&self) -> String {
        match self {
            Line::TooLong(cap) => format!("line longer than {cap} bytes"),
            Line::Truncated => "line not terminated by a newline".to_owned(),
            Line::Eof => "connection closed before the first line".to_owned(),
            Line::Text(_) => "line".to_owned(),
        }
    }
}

/// Reads one `\n`-terminated line of at most `cap` bytes (newline excluded) without ever
/// buffering more than `cap`.
async fn read_line<R: AsyncBufRead + Unpin>(reader: &mut R, cap: usize) -> io::Result<Line> {
    let mut buf = Vec::new();
    loop {
        let available = reader.fill_buf().await?;
        if available.is_empty() {
            return Ok(if buf.is_empty() {
                Line::Eof
            } else {
                Line::Truncated
            });
        }
        if let Some(i) = available.iter().position(|&b| b == b'\n') {
            if buf.len() + i > cap {
                return Ok(Line::TooLong(cap));
            }
            buf.extend_from_slice(&available[..i]);
            reader.consume(i + 1);
            return Ok(Line::Text(buf));
        }
        let n = available.len();
        if buf.len() + n > cap {
            return Ok(Line::TooLong(cap));
        }
        buf.extend_from_slice(available);
        reader.consume(n);
    }
}

/// Parses a gateway line: exactly one JSON object naming one message.
pub fn parse_line(line: &[u8]) -> Result<GatewayMessage, String> {
    if line.trim_ascii_start().first() != Some(&b'{') {
        return Err("a line is one JSON object".to_owned());
    }
    serde_json::from_slice(line).map_err(|e| format!("malformed message: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_devices(revision: u64, n: usize) -> Snapshot {
        let devices = (0..n)
            .map(|i| crate::proto::snapshot::DeviceRecord {
                id: format!("{i:032x}"),
                name: format!("d{i}"),
                user: "u".into(),
                public_key: format!("ed25519:{i}"),
                revoked: false,
            })
            .collect();
        Snapshot {
            revision,
            devices,
            ..Snapshot::default()
        }
    }

    #[test]
    fn bulk_changes_travel_as_a_full_snapshot() {
        // A bulk enrollment onto a small registry: the full snapshot.
        let (old, new) = (with_devices(1, 10), with_devices(2, 5000));
        assert!(is_bulk(&delta::diff(&old, &new), &new));
        // A handful of changes, or many changes in a much larger registry: a delta.
        let (old, new) = (with_devices(1, 10), with_devices(2, 20));
        assert!(!is_bulk(&delta::diff(&old, &new), &new));
        let (old, new) = (with_devices(1, 20_000), with_devices(2, 21_500));
        assert!(!is_bulk(&delta::diff(&old, &new), &new));
    }

    #[tokio::test]
    async fn lines_are_capped_and_terminated() {
        let mut r = tokio::io::BufReader::with_capacity(4, &b"abc\ndefgh\nxy"[..]);
        assert_eq!(
            read_line(&mut r, 8).await.expect("read"),
            Line::Text(b"abc".to_vec())
        );
        assert_eq!(
            read_line(&mut r, 8).await.expect("read"),
            Line::Text(b"defgh".to_vec())
        );
        assert_eq!(read_line(&mut r, 8).await.expect("read"), Line::Truncated);
        assert_eq!(read_line(&mut r, 8).await.expect("read"), Line::Eof);
        let mut r = tokio::io::BufReader::with_capacity(4, &b"123456789\n"[..]);
        assert_eq!(read_line(&mut r, 8).await.expect("read"), Line::TooLong(8));
        let mut r = &b"12345678\n"[..];
        assert_eq!(
            read_line(&mut r, 8).await.expect("read"),
            Line::Text(b"12345678".to_vec())
        );
    }

    #[test]
    fn only_one_keyed_objects_parse() {
        assert!(matches!(
            parse_line(br#"{"hello":{"version":1,"after_revision":null}}"#),
            Ok(GatewayMessage::Hello(_))
        ));
        for bad in [&b"[]"[..], b"", b"{\"hello\":1}", b"{\"after_revision\":3}"] {
            assert!(parse_line(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn history_keeps_the_newest_and_lines_for_the_newest_only() {
        let snap = |revision| {
            Arc::new(Snapshot {
                revision,
                ..Snapshot::default()
            })
        };
        let mut h = History::default();
        for r in 1..=(HISTORY as u64 + 10) {
            h.lines.insert((None, r - 1), Arc::from(&b"x"[..]));
            h.insert(snap(r));
        }
        assert_eq!(h.snapshots.len(), HISTORY);
        assert_eq!(h.snapshots.keys().next(), Some(&11));
        assert!(h.lines.is_empty(), "lines of older revisions are dropped");
    }
}
