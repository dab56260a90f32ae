//! The gateway daemon's lifecycle: start, the receive loop, and a clean stop.
//!
//! Owns the order of start-up (dark ruleset first, then capture, then the persisted
//! snapshot and sync, then the status file), the single
//! receive loop that feeds the pipeline and applies its decisions to the firewall, and
//! the stop path: on SIGINT/SIGTERM every pinhole and session is removed while the dark
//! ruleset stays in place (no door open, host still dark). Must not implement checks
//! (pipeline.rs) or ruleset details (firewall crate).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use arc_swap::ArcSwapOption;
use postern_firewall::{AppProto, Firewall, FirewallConfig};
use serde_json::json;

use crate::admission::Counters;
use crate::audit::AuditLog;
use crate::capture::{Capture, ReplySocket};
use crate::clock::Clock;
use crate::config::{CaptureMode, Config};
use crate::intake::Intake;
use crate::keyfile;
use crate::pipeline::{close_reason, replay_window_ms, Decision, KnockPipeline, PipelineLimits};
use crate::registry::RegistryView;
use crate::replay_state::ReplayState;
use crate::reply::ReplyTarget;
use crate::session_audit::SessionReporter;
use crate::session_board::SessionBoard;
use crate::status::{SnapshotSource, SyncState};
use crate::unix_ms;

/// How often the receive loop wakes up to check for a stop request.
const POLL: Duration = Duration::from_millis(50);
/// How long the decision loop waits for a knock before it looks at the registry view
/// again: a new snapshot (a revocation) is applied at most this late. Idle cost: 200
/// cheap wake-ups per second.
const VIEW_CHECK: Duration = Duration::from_millis(5);
/// How often the drop and decision counters are written as a `stats` audit event.
const STATS_EVERY: Duration = Duration::from_secs(10);
/// How often live sessions whose lease ran out are noticed (`session_closed`, `expired`).
const EXPIRY_SWEEP: Duration = Duration::from_secs(1);

/// Runs the gateway until SIGINT or SIGTERM.
pub fn run(cfg: &Config) -> Result<()> {
    crate::heap::configure();
    let secret = keyfile::load(&cfg.key_file)?;
    // Before the firewall: a TLS gateway that is not enrolled cannot run.
    let transport = crate::sync::Transport::from_config(cfg)?;
    let public = secret.public_key();
    let audit =
        Arc::new(AuditLog::open(&cfg.audit).context("open the audit log (field `audit_log`)")?);

    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, Arc::clone(&stop)).context("install signal handler")?;
    }

    let mut open_ports = cfg.open_ports.clone();
    if cfg.capture == CaptureMode::Udp {
        // UDP mode reads knocks from a bound socket, so the SPA port itself must pass the
        // dark ruleset (sniff mode reads them before the input hook and keeps it dropped).
        open_ports.push((AppProto::Udp, cfg.spa_port));
    }
    let mut firewall = Firewall::install(&FirewallConfig {
        table: cfg.table.clone(),
        open_ports,
        forward_snat: cfg.forward_snat,
    })
    .context("install the nftables ruleset")?;
    let counters = Arc::new(Counters::default());
    let result = serve(
        cfg,
        transport,
        &mut firewall,
        secret,
        &audit,
        &stop,
        &counters,
    );
    // Whatever happened, close every door we opened; the dark ruleset stays.
    let mut flushed = firewall
        .flush()
        .context("remove pinholes and sessions at stop");
    if flushed.is_ok() && cfg.capture == CaptureMode::Udp {
        // The SPA port was open for our socket; with no socket behind it the host would
        // answer probes with ICMP port-unreachable. Back to the fully dark ruleset.
        flushed = Firewall::install(&FirewallConfig {
            table: cfg.table.clone(),
            open_ports: cfg.open_ports.clone(),
            forward_snat: cfg.forward_snat,
        })
        .map(drop)
        .context("close the SPA port at stop");
    }
    audit.event(
        unix_ms(),
        "stop",
        json!({ "clean": result.is_ok() && flushed.is_ok(), "counters": counters.snapshot() }),
    );
    tracing::info!(gateway_key = %public.to_text(), "gateway stopped");
    result.and(flushed)
}

/// When a new registry revision has arrived, closes every live session it no longer
/// allows (device revoked or deleted, grant or app removed, access record gone): the
/// session element goes, so the flow stops passing packets at once, and its conntrack
/// entries are deleted. On every call (cheap: only sessions that are due are looked at)
/// it also re-evaluates the sessions whose decision's `valid_until` passed and closes the
/// failing ones (`access_expired`: no controller needed, fails closed on its own) and the
/// ones at the maximum session length (`max_session_length`).
/// On a new revision it also closes the sessions an admin killed (`Snapshot::kills` for
/// this gateway's name, opened at or before the kill).
#[allow(clippy::too_many_arguments)]
fn close_revoked_sessions(
    view: &crate::sync::SharedView,
    applied_view: &mut Option<u64>,
    pipeline: &mut KnockPipeline,
    firewall: &mut Firewall,
    audit: &AuditLog,
    reporter: &mut SessionReporter,
    now_ms: u64,
) {
    let current = view.load();
    let Some(registry) = current.as_deref() else {
        return;
    };
    // By view, not revision: a restored controller database can repeat a revision number.
    let changed = *applied_view != Some(registry.generation());
    let mut ended = Vec::new();
    if changed {
        *applied_view = Some(registry.generation());
        ended = pipeline.close_sessions_revoked_by(registry, now_ms, close_reason::REGISTRY_CHANGE);
        let kills = reporter.fresh_kills(registry.kills());
        ended.extend(pipeline.kill_sessions(&kills, reporter.gateway(), now_ms));
    }
    ended.extend(
        pipeline
            .close_sessions_due(registry, now_ms)
            .into_iter()
            .map(|(session, _reason)| session),
    );
    if ended.is_empty() {
        return;
    }
    // Each `session_closed` line also says whether the firewall close worked.
    let mut extra = std::collections::HashMap::new();
    for session in ended {
        let closed = firewall.close_session(session);
        if let Err(e) = &closed {
            tracing::error!(session = session.0, error = %e, "revoked or killed session could not be closed");
        }
        extra.insert(
            session.0,
            json!({ "revision": registry.revision, "ok": closed.is_ok() }),
        );
    }
    reporter.record(audit, pipeline, &extra, unix_ms());
}

/// What the start found in `state_dir/snapshot.json`, for the `start` audit event.
#[derive(Debug)]
struct PersistedAtStart {
    /// `persisted` (loaded and in force) or `none` (missing or refused).
    source: &'static str,
    revision: Option<u64>,
    age_secs: Option<u64>,
    /// Why a file that exists was refused.
    error: Option<String>,
}

/// Loads the persisted snapshot into `view` (see snapshot_file.rs). A missing file leaves
/// the view empty; a corrupt or unreadable one is refused with a warning (no view: every
/// knock is denied until the controller answers), never a panic. No age bound: access
/// records' `until` still apply, legacy grants do not expire (docs/operations.md).
fn load_persisted_snapshot(
    cfg: &Config,
    view: &crate::sync::SharedView,
    state: &SyncState,
) -> PersistedAtStart {
    let none = |error| PersistedAtStart {
        source: SnapshotSource::None.as_str(),
        revision: None,
        age_secs: None,
        error,
    };
    // Parsed in a scratch arena (heap.rs): the records are garbage once the view is built.
    match crate::heap::in_scratch_arena(|| crate::snapshot_file::load(&cfg.state_dir)) {
        Ok(None) => {
            tracing::info!(
                "no persisted registry snapshot: every knock is denied until the controller answers"
            );
            none(None)
        }
        Err(e) => {
            tracing::warn!(error = %e, "persisted registry snapshot refused: every knock is denied until the controller answers");
            none(Some(e.to_string()))
        }
        Ok(Some(p)) => {
            let (registry, warnings) = RegistryView::from_snapshot(&p.snapshot);
            for w in &warnings {
                tracing::warn!(revision = p.snapshot.revision, "persisted snapshot: {w}");
            }
            let age_secs = unix_ms().saturating_sub(p.saved_at_ms) / 1000;
            tracing::info!(
                revision = registry.revision,
                devices = registry.device_count(),
                policy_mode = registry.policy_mode(),
                age_secs,
                "deciding from the persisted registry snapshot until the controller answers"
            );
            state.set_view(registry.revision, SnapshotSource::Persisted);
            let revision = registry.revision;
            view.store(Some(Arc::new(registry)));
            crate::heap::drop_in_scratch_arena(p);
            crate::heap::release_free_memory();
            PersistedAtStart {
                source: SnapshotSource::Persisted.as_str(),
                revision: Some(revision),
                age_secs: Some(age_secs),
                error: None,
            }
        }
    }
}

/// The audit line of a knock whose decision the firewall could not apply.
fn audit_firewall_error(audit: &AuditLog, now_ms: u64, src: std::net::IpAddr) {
    audit.knock(
        now_ms,
        src,
        &Decision::Drop {
            reason: "firewall_error",
        },
    );
}

#[allow(clippy::too_many_arguments)]
fn serve(
    cfg: &Config,
    transport: crate::sync::Transport,
    firewall: &mut Firewall,
    secret: postern_protocol::keys::GatewaySecret,
    audit: &Arc<AuditLog>,
    stop: &Arc<AtomicBool>,
    counters: &Arc<Counters>,
) -> Result<()> {
    let public = secret.public_key();
    let clock = Clock::from_env();
    if clock.is_offset() {
        tracing::warn!(
            "{} is set: the gateway clock is offset (a test-only setting)",
            crate::clock::OFFSET_ENV
        );
    }
    let capture =
        Capture::open(cfg, POLL).with_context(|| format!("open {} capture", cfg.capture))?;
    let view: crate::sync::SharedView = Arc::new(ArcSwapOption::empty());
    let sync_state = Arc::new(SyncState::default());
    // Live sessions for the controller's `session list`: published here (decision
    // thread), read by the sync thread.
    let session_board = SessionBoard::new();
    let mut reporter = SessionReporter::new(cfg.reporting_name(), Arc::clone(&session_board));
    let no_extra = std::collections::HashMap::new();

    let limits = PipelineLimits {
        max_skew_ms: cfg.max_skew_ms,
        session_ttl_ms: cfg.session_secs * 1000,
        max_session_ms: cfg.max_session_secs * 1000,
        replay_capacity: 1 << 20,
        require_claimed_addr: cfg.require_claimed_addr,
    };
    let (replay, restored) = ReplayState::open(
        &cfg.state_dir,
        limits.replay_capacity,
        replay_window_ms(&limits),
        cfg.max_skew_ms,
        clock.now_ms(),
    )
    .context("open the replay state (field `state_dir`)")?;
    // state_dir exists (0700) now. Decide from the last snapshot until the controller
    // answers; the sync thread asks for a full one first and replaces it.
    let persisted = load_persisted_snapshot(cfg, &view, &sync_state);
    let sync = crate::sync::spawn(crate::sync::SyncContext {
        transport,
        state_dir: cfg.state_dir.clone(),
        view: Arc::clone(&view),
        persisted: persisted.revision,
        state: Arc::clone(&sync_state),
        audit: Arc::clone(audit),
        stop: Arc::clone(stop),
        sessions: Arc::clone(&session_board),
    });
    let status_writer = crate::status::spawn_writer(
        cfg.state_dir.clone(),
        Arc::clone(&sync_state),
        Arc::clone(stop),
    );
    let replier = crate::reply::Replier::new(
        secret.clone(),
        ReplySocket::for_capture(&capture, cfg.spa_port)
            .inspect_err(|e| tracing::warn!(error = %e, "denial replies disabled"))
            .ok(),
    );
    let mut pipeline = KnockPipeline::with_replay(secret, limits, replay);
    let pinhole_ttl = Duration::from_secs(cfg.pinhole_secs);
    let mut new_id = || {
        let mut b = [0u8; 4];
        // The OS RNG failing is not recoverable for a security daemon.
        getrandom::getrandom(&mut b)
            .unwrap_or_else(|e| panic!("the OS random number generator must work: {e}"));
        u32::from_ne_bytes(b)
    };
    audit.event(
        unix_ms(),
        "start",
        json!({
            "capture": cfg.capture.to_string(),
            "spa_port": cfg.spa_port,
            "gateway_key": public.to_text(),
            "replay_state": restored.kind,
            "replay_entries": restored.entries,
            "replay_floor_ms": restored.floor,
            "clock_offset_test_only": clock.is_offset(),
            "snapshot": persisted.source,
            "snapshot_revision": persisted.revision,
            "snapshot_age_secs": persisted.age_secs,
            "snapshot_error": persisted.error,
        }),
    );
    tracing::info!(capture = %cfg.capture, spa_port = cfg.spa_port, gateway_key = %public.to_text(), "gateway running");

    // Capture and crypto run on their own threads (intake.rs); this thread owns the replay
    // cache, the sessions and the firewall, and decides one authenticated knock at a time.
    let intake = Intake::start(
        capture,
        pipeline.opener().clone(),
        Arc::clone(&view),
        clock.clone(),
        Arc::clone(audit),
        Arc::clone(counters),
        Arc::clone(stop),
        cfg.intake,
    )
    .context("start the capture and crypto threads")?;
    let mut result = Ok(());
    let mut applied_view = None;
    let mut next_expiry_sweep = Instant::now() + EXPIRY_SWEEP;
    // Forward mode: IP forwarding is switched on at the first forwarded knock, off at stop.
    let mut forwarding = crate::forwarding::Forwarding::new();
    let mut next_stats = Instant::now() + STATS_EVERY;
    let mut next_status = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        close_revoked_sessions(
            &view,
            &mut applied_view,
            &mut pipeline,
            firewall,
            audit,
            &mut reporter,
            clock.now_ms(),
        );
        if Instant::now() >= next_expiry_sweep {
            next_expiry_sweep = Instant::now() + EXPIRY_SWEEP;
            pipeline.sweep_expired_sessions(clock.now_ms());
        }
        // Also catches the events of a knock whose firewall step failed (`continue`).
        reporter.record(audit, &mut pipeline, &no_extra, clock.now_ms());
        reporter.publish_if_due(&pipeline, clock.now_ms());
        pipeline.replay_mut().tick(clock.now_ms());
        if Instant::now() >= next_status {
            next_status = Instant::now() + crate::status::WRITE_EVERY;
            sync_state.set_live_sessions(pipeline.live_sessions(clock.now_ms()));
        }
        if Instant::now() >= next_stats {
            next_stats = Instant::now() + STATS_EVERY;
            audit.event(clock.now_ms(), "stats", intake.stats());
        }
        let Some(outcome) = intake.recv(VIEW_CHECK) else {
            continue;
        };
        let src = outcome.src;
        let now = clock.now_ms();
        let current = view.load();
        let reply_target = outcome.result.as_ref().ok().map(ReplyTarget::of);
        let decision = match outcome.result {
            Ok(auth) => pipeline.conclude(current.as_deref(), src, auth, now, &mut new_id),
            Err(dropped) => dropped,
        };
        let device = decision.who().map(|w| &*w.device);
        let app = decision.who().map(|w| &*w.app);
        // A debug span: at the default level it costs nothing (an enabled span's fields
        // are formatted into a new string per knock); the warnings below name the knock.
        let span = tracing::debug_span!("knock", %src, device, app);
        let _entered = span.enter();
        if let Decision::Allow {
            pinhole,
            session_ttl_ms,
            ..
        } = &decision
        {
            // The session's timeout comes from the decision (lease, verdict cap or the
            // configured length); the knock window never outlives it.
            let session_ttl = Duration::from_millis(*session_ttl_ms);
            let forwarding_ok = match pinhole.forward.map(|t| forwarding.ensure(t)) {
                Some(Err(e)) => Err(e),
                _ => Ok(()),
            };
            let opened = forwarding_ok.and_then(|()| {
                firewall
                    .open(pinhole, pinhole_ttl.min(session_ttl), session_ttl)
                    .map_err(|e| e.to_string())
            });
            if let Err(e) = opened {
                tracing::error!(%src, device, app, error = %e, "pinhole could not be opened");
                audit_firewall_error(audit, now, src);
                continue;
            }
        }
        if let Decision::Close { session, .. } = &decision {
            // Same path as revocation: session element and pinholes go in one batch,
            // then the session's conntrack entries.
            if let Err(e) = firewall.close_session(*session) {
                tracing::error!(%src, device, app, session = session.0, error = %e, "closed session could not be removed");
                audit_firewall_error(audit, now, src);
                continue;
            }
        }
        tracing::debug!(
            decision = decision.verdict(),
            reason = decision.reason(),
            "knock decided"
        );
        let replied = replier.answer(
            reply_target.as_ref(),
            &outcome.peer,
            &decision,
            current.as_deref(),
            counters,
        );
        let extra = crate::audit::KnockExtra {
            reply: Some(replied),
            latency_us: Some(
                u64::try_from(outcome.received.elapsed().as_micros()).unwrap_or(u64::MAX),
            ),
            ..Default::default()
        };
        intake.record_with(now, src, &decision, extra);
        reporter.record(audit, &mut pipeline, &no_extra, now);
        reporter.publish_if_due(&pipeline, now);
    }
    if let Some(e) = intake.take_capture_error() {
        result = Err(e).context("capture failed");
    }
    audit.event(clock.now_ms(), "stats", intake.stats());
    drop(intake);
    if let Err(e) = pipeline.replay_mut().close_clean() {
        tracing::error!(error = %e, "replay journal could not be closed cleanly");
    }
    // The sync thread may be parked in a long-poll for seconds: it sees `stop` when its
    // request returns, and the process exits without waiting for it, so closing the doors
    // (the caller's flush) is never delayed by the controller.
    stop.store(true, Ordering::Relaxed);
    drop(sync);
    // The status writer sleeps at most 100 ms between checks; it removes the file.
    if status_writer.join().is_err() {
        tracing::warn!("the status writer thread panicked");
    }
    for e in forwarding.restore() {
        tracing::warn!(error = %e, "forward mode: IP forwarding not restored");
    }
    result
}
