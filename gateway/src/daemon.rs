//! The gateway daemon's lifecycle: start, the receive loop, and a clean stop.
//!
//! Owns the order of start-up (dark ruleset first, then capture, then sync), the single
//! receive loop that feeds the pipeline and applies its decisions to the firewall, and
//! the stop path: on SIGINT/SIGTERM every pinhole and session is removed while the dark
//! ruleset stays in place (no door open, host still dark). Must not implement checks
//! (pipeline.rs) or ruleset details (firewall crate).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use arc_swap::ArcSwapOption;
use postern_firewall::{AppProto, Firewall, FirewallConfig};
use serde_json::json;

use crate::audit::AuditLog;
use crate::capture::{Capture, BUFFER_LEN};
use crate::config::{CaptureMode, Config};
use crate::keyfile;
use crate::pipeline::{Decision, KnockPipeline, PipelineLimits};
use crate::unix_ms;

/// How often the receive loop wakes up to check for a stop request.
const POLL: Duration = Duration::from_millis(200);

/// Runs the gateway until SIGINT or SIGTERM.
pub fn run(cfg: &Config) -> Result<()> {
    let secret = keyfile::load(&cfg.key_file)?;
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
    })
    .context("install the nftables ruleset")?;
    let result = serve(cfg, &mut firewall, secret, &audit, &stop);
    // Whatever happened, close every door we opened; the dark ruleset stays.
    let flushed = firewall
        .flush()
        .context("remove pinholes and sessions at stop");
    audit.event(
        unix_ms(),
        "stop",
        json!({ "clean": result.is_ok() && flushed.is_ok() }),
    );
    tracing::info!(gateway_key = %public.to_text(), "gateway stopped");
    result.and(flushed)
}

fn serve(
    cfg: &Config,
    firewall: &mut Firewall,
    secret: postern_protocol::keys::GatewaySecret,
    audit: &Arc<AuditLog>,
    stop: &Arc<AtomicBool>,
) -> Result<()> {
    let public = secret.public_key();
    let mut capture =
        Capture::open(cfg, POLL).with_context(|| format!("open {} capture", cfg.capture))?;
    let view: crate::sync::SharedView = Arc::new(ArcSwapOption::empty());
    let sync = crate::sync::spawn(
        cfg.controller_socket.clone(),
        Arc::clone(&view),
        Arc::clone(audit),
        Arc::clone(stop),
    );

    let mut pipeline = KnockPipeline::new(
        secret,
        PipelineLimits {
            max_skew_ms: cfg.max_skew_ms,
            session_ttl_ms: cfg.session_secs * 1000,
            replay_capacity: 1 << 20,
        },
    );
    let pinhole_ttl = Duration::from_secs(cfg.pinhole_secs);
    let session_ttl = Duration::from_secs(cfg.session_secs);
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
        json!({ "capture": cfg.capture.to_string(), "spa_port": cfg.spa_port, "gateway_key": public.to_text() }),
    );
    tracing::info!(capture = %cfg.capture, spa_port = cfg.spa_port, gateway_key = %public.to_text(), "gateway running");

    let mut buf = vec![0u8; BUFFER_LEN];
    let mut result = Ok(());
    while !stop.load(Ordering::Relaxed) {
        let (src, datagram) = match capture.recv(&mut buf) {
            Ok(Some(d)) => d,
            Ok(None) => continue,
            Err(e) => {
                result = Err(e).context("capture failed");
                break;
            }
        };
        let now = unix_ms();
        let current = view.load();
        let decision = pipeline.decide(current.as_deref(), src, datagram, now, &mut new_id);
        let span = tracing::info_span!("knock", %src, device = decision.who().map(|w| w.device.as_str()), app = decision.who().map(|w| w.app.as_str()));
        let _entered = span.enter();
        if let Decision::Allow { pinhole, .. } = &decision {
            if let Err(e) = firewall.open(pinhole, pinhole_ttl, session_ttl) {
                tracing::error!(error = %e, "pinhole could not be opened");
                audit.knock(
                    now,
                    src,
                    &Decision::Drop {
                        reason: "firewall_error",
                    },
                );
                continue;
            }
        }
        tracing::debug!(
            decision = decision.verdict(),
            reason = decision.reason(),
            "knock decided"
        );
        audit.knock(now, src, &decision);
    }
    // The sync thread may be parked in a long-poll for seconds: it sees `stop` when its
    // request returns, and the process exits without waiting for it, so closing the doors
    // (the caller's flush) is never delayed by the controller.
    stop.store(true, Ordering::Relaxed);
    drop(sync);
    result
}
