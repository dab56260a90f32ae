//! The client API: HTTPS (axum on hyper, rustls with the ring provider) for device
//! enrollment, MFA login, posture reports and `whoami`.
//!
//! Endpoints (JSON in and out; errors are `{"error": "..."}`):
//! - `POST /v1/enroll` `{token, public_key, proof}` -> `{device_id, name, user}`
//!   (no request signature: the invite token and the key's proof of possession
//!   authenticate it; see `postern_protocol::api_auth`).
//! - `POST /v1/login` `{code}` -> `{device_id, last_mfa}`
//! - `POST /v1/posture` (body: the posture report JSON) -> `{received_at, expires_at}`
//! - `GET /v1/whoami` -> `{device_id, name, user, last_mfa}`
//! - `GET /v1/time` -> `{unix_ms}` (unsigned: lets a device measure its clock offset)
//!
//! Every endpoint but enroll and time requires the `x-postern-*` request signature by the device's
//! registered key: the device must exist and not be revoked, the timestamp be within 60 s,
//! the nonce unseen (bounded cache; replays get 409).
//!
//! Owns: the listener (its own tokio runtime on its own threads inside `serve`, stopped by
//! the stop flag), TLS termination, limits (64 KiB bodies, 10 s handshake and header read,
//! 30 s per connection, 256 connections), HTTP status mapping and the nonce cache. Must
//! not touch: token, TOTP or posture rules (see `invite`, `identity`, `postern_policy::
//! report`) or the TLS identity files (see `api_identity`). Never logs tokens, codes or
//! signatures.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, FromRequest, Request, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use hyper_util::rt::{TokioIo, TokioTimer};
use postern_protocol::api_auth::{self, ApiAuthError, InviteToken, NonceCache, SignedHeaders};
use rusqlite::OptionalExtension as _;
use serde::Deserialize;
use tracing::{info, warn};

use crate::api_identity::{self, ApiIdentityError};
use crate::invite::{format_unix, InviteError};
use crate::proto::keys::DevicePublicKey;
use crate::proto::snapshot::DeviceRecord;
use crate::registry::{device_from_row, Registry, RegistryError};

/// Largest accepted request body.
pub const MAX_BODY_BYTES: usize = 64 * 1024;
/// TLS handshake deadline.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Deadline for reading a request head.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection is closed after this long, whatever it is doing.
pub const CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);
/// Concurrent connections; more are closed at once.
pub const MAX_CONNECTIONS: usize = 256;
/// Nonces remembered for replay detection (each needs a valid device signature).
pub const NONCE_CACHE_CAPACITY: usize = 100_000;
/// Default lifetime of a posture report (`serve --posture-ttl`).
pub const DEFAULT_POSTURE_TTL: Duration = Duration::from_secs(3600);

/// `serve --api` settings.
#[derive(Debug, Clone)]
pub struct ApiConfig {
    pub db: PathBuf,
    pub listen: SocketAddr,
    pub api_dir: PathBuf,
    pub posture_ttl: Duration,
}

/// Why the API could not start.
#[derive(Debug, thiserror::Error)]
pub enum ApiStartError {
    #[error(transparent)]
    Identity(#[from] ApiIdentityError),
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    #[error("--api {addr}: cannot listen: {source}: pick a free address and port")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot start the API runtime: {0}")]
    Runtime(std::io::Error),
}

/// The running API server.
#[derive(Debug)]
pub struct ApiServer {
    /// The bound address (the real port when `--api` asked for port 0).
    pub local_addr: SocketAddr,
    thread: JoinHandle<()>,
}

impl ApiServer {
    /// Waits for the server thread (it returns once the stop flag is set).
    pub fn join(self) {
        if self.thread.join().is_err() {
            warn!("API server thread panicked");
        }
    }
}

struct AppState {
    registry: Mutex<Registry>,
    nonces: Mutex<NonceCache>,
    posture_ttl: u64,
}

/// Loads the TLS identity, opens the registry, binds `cfg.listen` and serves on a
/// dedicated thread until `stop` is set. Logs `api listening on ADDR`.
pub fn start(cfg: &ApiConfig, stop: Arc<AtomicBool>) -> Result<ApiServer, ApiStartError> {
    let identity = api_identity::load_or_create(&cfg.api_dir)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(vec![identity.cert.clone()], identity.key.clone_key())?;
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let state = Arc::new(AppState {
        registry: Mutex::new(Registry::open(&cfg.db)?),
        nonces: Mutex::new(NonceCache::new(NONCE_CACHE_CAPACITY)),
        posture_ttl: cfg.posture_ttl.as_secs(),
    });
    let bind_err = |source| ApiStartError::Bind {
        addr: cfg.listen,
        source,
    };
    let std_listener = std::net::TcpListener::bind(cfg.listen).map_err(bind_err)?;
    std_listener.set_nonblocking(true).map_err(bind_err)?;
    let local_addr = std_listener.local_addr().map_err(bind_err)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("api-worker")
        .enable_all()
        .build()
        .map_err(ApiStartError::Runtime)?;
    let listener = {
        let _guard = runtime.enter();
        tokio::net::TcpListener::from_std(std_listener).map_err(bind_err)?
    };
    info!(
        fingerprint = %identity.fingerprint,
        "api listening on {local_addr}"
    );
    let app = router(state);
    let thread = std::thread::Builder::new()
        .name("api".into())
        .spawn(move || {
            runtime.block_on(accept_loop(listener, acceptor, app, &stop));
            runtime.shutdown_timeout(Duration::from_secs(2));
            info!("api stopped");
        })
        .map_err(ApiStartError::Runtime)?;
    Ok(ApiServer { local_addr, thread })
}

fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/enroll", post(enroll))
        .route("/v1/login", post(login))
        .route("/v1/posture", post(posture))
        .route("/v1/whoami", get(whoami))
        .route("/v1/time", get(time_now))
        .fallback(|| async { ApiFailure::new(StatusCode::NOT_FOUND, "no such endpoint") })
        .method_not_allowed_fallback(|| async {
            ApiFailure::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method not allowed on this endpoint",
            )
        })
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

async fn accept_loop(
    listener: tokio::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    app: Router,
    stop: &AtomicBool,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let stopped = async {
        while !stop.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    tokio::pin!(stopped);
    loop {
        let (tcp, _peer) = tokio::select! {
            () = &mut stopped => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    warn!(error = %e, "api accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = Arc::clone(&slots).try_acquire_owned() else {
            warn!("too many API connections; closing one");
            continue;
        };
        let acceptor = acceptor.clone();
        let app = app.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let Ok(Ok(tls)) = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await
            else {
                return;
            };
            let service = hyper_util::service::TowerToHyperService::new(app);
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(TokioIo::new(tls), service);
            let _ = tokio::time::timeout(CONNECTION_TIMEOUT, conn).await;
        });
    }
}

/// An error answer: status plus `{"error": message}`.
#[derive(Debug)]
struct ApiFailure {
    status: StatusCode,
    message: String,
}

impl ApiFailure {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiFailure {
            status,
            message: message.into(),
        }
    }

    fn internal(what: impl std::fmt::Display) -> Self {
        warn!(error = %what, "api internal error");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal error; see the controller log",
        )
    }
}

impl IntoResponse for ApiFailure {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(serde_json::json!({ "error": self.message })),
        )
            .into_response()
    }
}

impl From<RegistryError> for ApiFailure {
    fn from(e: RegistryError) -> Self {
        if e.is_validation() {
            ApiFailure::new(StatusCode::CONFLICT, e.to_string())
        } else {
            ApiFailure::internal(e)
        }
    }
}

impl From<ApiAuthError> for ApiFailure {
    fn from(e: ApiAuthError) -> Self {
        let status = match e {
            ApiAuthError::MissingHeader(_)
            | ApiAuthError::BadHeader(_)
            | ApiAuthError::BadInvite => StatusCode::BAD_REQUEST,
            ApiAuthError::Stale { .. } | ApiAuthError::BadSignature => StatusCode::UNAUTHORIZED,
            ApiAuthError::Replayed => StatusCode::CONFLICT,
            ApiAuthError::CacheFull => StatusCode::TOO_MANY_REQUESTS,
        };
        ApiFailure::new(status, e.to_string())
    }
}

impl From<InviteError> for ApiFailure {
    fn from(e: InviteError) -> Self {
        let status = match &e {
            InviteError::UnknownToken => StatusCode::UNAUTHORIZED,
            InviteError::AlreadyUsed(_) => StatusCode::CONFLICT,
            InviteError::Expired(_) => StatusCode::GONE,
            InviteError::UnknownUser(_) | InviteError::DisabledUser(_) => StatusCode::FORBIDDEN,
            InviteError::BadExpiry(_) | InviteError::BadPublicKey(_) => StatusCode::BAD_REQUEST,
            InviteError::Registry(r) if r.is_validation() => StatusCode::CONFLICT,
            InviteError::Registry(_) | InviteError::Random(_) => {
                return ApiFailure::internal(e);
            }
        };
        ApiFailure::new(status, e.to_string())
    }
}

fn unix_now() -> Result<u64, ApiFailure> {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .map_err(|_| ApiFailure::internal("system clock is before 1970"))
}

/// Runs `f` with the registry on a blocking thread.
async fn with_registry<T, F>(state: &Arc<AppState>, f: F) -> Result<T, ApiFailure>
where
    T: Send + 'static,
    F: FnOnce(&mut Registry) -> Result<T, ApiFailure> + Send + 'static,
{
    let state = Arc::clone(state);
    tokio::task::spawn_blocking(move || {
        let mut reg = state
            .registry
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let result = f(&mut reg);
        drop(reg);
        // Enrollment, MFA and posture writes change what gateways must enforce: have
        // the revision watcher look now instead of at its next poll.
        crate::sync::wake_revision_watcher();
        result
    })
    .await
    .map_err(ApiFailure::internal)?
}

/// The request body, or the extractor's refusal (413 over [`MAX_BODY_BYTES`]) as JSON.
fn body_bytes(body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiFailure> {
    body.map_err(|r| {
        let message = if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            format!("request body over {MAX_BODY_BYTES} bytes")
        } else {
            r.body_text()
        };
        ApiFailure::new(r.status(), message)
    })
}

/// Parses a JSON body into `T` (unknown fields refused), answering 400 on failure.
fn json_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiFailure> {
    if body.trim_ascii_start().first() != Some(&b'{') {
        return Err(ApiFailure::new(
            StatusCode::BAD_REQUEST,
            "request body must be a JSON object",
        ));
    }
    serde_json::from_slice(body).map_err(|e| {
        ApiFailure::new(
            StatusCode::BAD_REQUEST,
            format!("invalid request body: {e}"),
        )
    })
}

/// A device row plus its last MFA time.
#[derive(Debug, Clone)]
struct DeviceStatus {
    record: DeviceRecord,
    last_mfa: Option<u64>,
}

impl Registry {
    /// The device with this id, with its last MFA time (None if unknown).
    fn device_status(&self, id: &str) -> Result<Option<DeviceStatus>, RegistryError> {
        Ok(self
            .conn
            .query_row(
                "SELECT id, name, user, public_key, revoked, last_mfa FROM devices WHERE id = ?1",
                [id],
                |r| {
                    Ok(DeviceStatus {
                        record: device_from_row(r)?,
                        last_mfa: r
                            .get::<_, Option<i64>>(5)?
                            .map(|t| u64::try_from(t).unwrap_or(0)),
                    })
                },
            )
            .optional()?)
    }
}

/// Checks the request signature headers; returns the authenticated, active device.
async fn authenticate(
    state: &Arc<AppState>,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<DeviceStatus, ApiFailure> {
    let header = |name: &'static str| -> Result<Option<&str>, ApiFailure> {
        headers
            .get(name)
            .map(|v| v.to_str().map_err(|_| ApiAuthError::BadHeader(name).into()))
            .transpose()
    };
    let signed = SignedHeaders::parse(
        header(api_auth::HEADER_DEVICE)?,
        header(api_auth::HEADER_TIMESTAMP)?,
        header(api_auth::HEADER_NONCE)?,
        header(api_auth::HEADER_SIGNATURE)?,
    )?;
    let id = signed.device.to_string();
    let device = {
        let id = id.clone();
        with_registry(state, move |reg| Ok(reg.device_status(&id)?)).await?
    };
    let Some(device) = device else {
        warn!(device = %id, path = uri.path(), "api request from an unknown device");
        return Err(ApiFailure::new(
            StatusCode::UNAUTHORIZED,
            "unknown device: enroll it first with `postern enroll`",
        ));
    };
    if device.record.revoked {
        warn!(device = %id, path = uri.path(), "api request from a revoked device");
        return Err(ApiFailure::new(StatusCode::FORBIDDEN, "device is revoked"));
    }
    let key = DevicePublicKey::from_text(&device.record.public_key).map_err(|e| {
        ApiFailure::internal(format!("device {id} has a bad key in the registry: {e}"))
    })?;
    let now = unix_now()?;
    if let Err(e) = signed.verify(&key, method.as_str(), uri.path(), body, now) {
        warn!(device = %id, path = uri.path(), reason = %e, "api request refused");
        return Err(e.into());
    }
    state
        .nonces
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .check_and_insert(signed.device, signed.nonce, signed.timestamp, now)
        .inspect_err(
            |e| warn!(device = %id, path = uri.path(), reason = %e, "api request refused"),
        )?;
    Ok(device)
}

/// A request whose signature headers verified (see [`authenticate`]), with its body.
#[derive(Debug)]
struct Signed {
    device: DeviceStatus,
    body: Bytes,
}

impl FromRequest<Arc<AppState>> for Signed {
    type Rejection = ApiFailure;

    async fn from_request(req: Request, state: &Arc<AppState>) -> Result<Self, ApiFailure> {
        let (method, uri, headers) = (
            req.method().clone(),
            req.uri().clone(),
            req.headers().clone(),
        );
        let body = body_bytes(Bytes::from_request(req, state).await)?;
        let device = authenticate(state, &method, &uri, &headers, &body).await?;
        Ok(Signed { device, body })
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EnrollRequest {
    token: String,
    public_key: String,
    proof: String,
}

async fn enroll(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiFailure> {
    let req: EnrollRequest = json_body(&body_bytes(body)?)?;
    let token = InviteToken::parse(&req.token)?;
    let key = DevicePublicKey::from_text(&req.public_key).map_err(|e| {
        ApiFailure::new(
            StatusCode::BAD_REQUEST,
            format!("public_key: {e}: send the \"ed25519:...\" key printed by `postern keygen`"),
        )
    })?;
    api_auth::verify_enroll(&key, &req.token, &req.proof).map_err(|_| {
        ApiFailure::new(
            StatusCode::UNAUTHORIZED,
            "proof does not verify: it must be the new device key's signature over the token and the public key",
        )
    })?;
    let now = unix_now()?;
    let public_key = key.to_text();
    let result = with_registry(&state, move |reg| {
        Ok(reg.redeem_invite(token.secret(), &public_key, now))
    })
    .await?;
    match result {
        Ok(device) => {
            info!(device = %device.id, name = %device.name, user = %device.user, "device enrolled");
            Ok(Json(serde_json::json!({
                "device_id": device.id, "name": device.name, "user": device.user,
            }))
            .into_response())
        }
        Err(e) => {
            warn!(reason = %e, "enrollment refused");
            Err(e.into())
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LoginRequest {
    code: String,
}

async fn login(
    State(state): State<Arc<AppState>>,
    Signed { device, body }: Signed,
) -> Result<Response, ApiFailure> {
    let req: LoginRequest = json_body(&body)?;
    let now = unix_now()?;
    let id = device.record.id.clone();
    let last_mfa = with_registry(&state, move |reg| {
        verify_code(reg, &id, &req.code, now)?;
        Ok(reg.device_status(&id)?.and_then(|d| d.last_mfa))
    })
    .await
    .inspect_err(|e| warn!(device = %device.record.id, reason = %e.message, "login refused"))?;
    info!(device = %device.record.id, user = %device.record.user, "mfa login");
    Ok(Json(serde_json::json!({
        "device_id": device.record.id,
        "last_mfa": last_mfa.map(format_unix),
    }))
    .into_response())
}

async fn posture(
    State(state): State<Arc<AppState>>,
    Signed { device, body }: Signed,
) -> Result<Response, ApiFailure> {
    // Parse before touching the database: a malformed report is a 400 naming the field.
    postern_policy::report::PostureReport::parse(&body)
        .map_err(|e| ApiFailure::new(StatusCode::BAD_REQUEST, e.to_string()))?;
    let raw = String::from_utf8(body.to_vec())
        .map_err(|_| ApiFailure::new(StatusCode::BAD_REQUEST, "posture report is not UTF-8"))?;
    let now = unix_now()?;
    let expires_at = now.saturating_add(state.posture_ttl);
    let id = device.record.id.clone();
    with_registry(&state, move |reg| {
        store_report(reg, &id, &raw, now, expires_at)
    })
    .await?;
    info!(device = %device.record.id, "posture report stored");
    Ok(Json(serde_json::json!({
        "received_at": format_unix(now),
        "expires_at": format_unix(expires_at),
    }))
    .into_response())
}

/// `GET /v1/time` -> `{unix_ms}`: the controller's clock, unsigned on purpose (a device
/// whose clock is off by more than the signature window must still be able to measure the
/// offset; `postern status` shows it). Reveals nothing but the time.
async fn time_now() -> Response {
    let unix_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    Json(serde_json::json!({ "unix_ms": unix_ms })).into_response()
}

async fn whoami(Signed { device, .. }: Signed) -> Result<Response, ApiFailure> {
    Ok(Json(serde_json::json!({
        "device_id": device.record.id,
        "name": device.record.name,
        "user": device.record.user,
        "last_mfa": device.last_mfa.map(format_unix),
    }))
    .into_response())
}

/// Checks a TOTP code for the device's user (`identity`), mapping refusals to statuses:
/// wrong code 401, replayed code 409, lockout 429, disabled user or revoked device 403.
fn verify_code(reg: &mut Registry, id: &str, code: &str, now: u64) -> Result<(), ApiFailure> {
    use crate::identity::TotpError;
    match reg.verify_totp(id, code, now) {
        Ok(_) => Ok(()),
        Err(e) => {
            let status = match &e {
                TotpError::WrongCode { .. } => StatusCode::UNAUTHORIZED,
                TotpError::Replayed => StatusCode::CONFLICT,
                TotpError::Locked { .. } => StatusCode::TOO_MANY_REQUESTS,
                TotpError::UnknownDevice(_) => StatusCode::UNAUTHORIZED,
                TotpError::DeviceRevoked(_) | TotpError::UserDisabled(_) => StatusCode::FORBIDDEN,
                TotpError::NotEnrolled(_) => StatusCode::CONFLICT,
                TotpError::Registry(r) if r.is_validation() => StatusCode::BAD_REQUEST,
                TotpError::Registry(_) => return Err(ApiFailure::internal(e)),
            };
            Err(ApiFailure::new(status, e.to_string()))
        }
    }
}

/// Stores the report (`policy_store`, which parses it strictly again) with its expiry.
fn store_report(
    reg: &mut Registry,
    id: &str,
    raw: &str,
    now: u64,
    expires_at: u64,
) -> Result<(), ApiFailure> {
    use crate::policy_store::PolicyStoreError;
    match reg.store_posture_report(id, raw, now, expires_at) {
        Ok(_) => Ok(()),
        Err(
            e @ (PolicyStoreError::Report(_)
            | PolicyStoreError::ReportFromFuture { .. }
            | PolicyStoreError::StaleReport { .. }),
        ) => Err(ApiFailure::new(StatusCode::BAD_REQUEST, e.to_string())),
        Err(e) => Err(ApiFailure::internal(e)),
    }
}
