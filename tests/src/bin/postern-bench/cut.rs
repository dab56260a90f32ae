//! Issue 4's measurement: a live TCP flow (a message every 10 ms each way) cut by each of
//! device revoke, a failing posture report, user disable, removal of the granting policy
//! and session kill; p50/p99/max of "trigger start → last byte received" per trigger.
//!
//! Owns: the table rows of this phase. The trials themselves (controller with its client
//! API on loopback, policy-mode sniff gateway in the lab's gateway namespace, devices
//! onboarded with the real CLIs, the flow from the lab's client namespace) live in
//! `postern_e2e::cut`, shared with `tests/tests/live_cut_e2e.rs`. Must not touch: anything
//! outside the lab. Bounded: `trials` per trigger and `TRIGGER_BUDGET` each.

use std::time::Duration;

use postern_e2e::cut::{percentile, CutLab, CutSamples, Trigger};
use postern_e2e::{Capture, Lab};

use crate::APP_PORT;

/// Time budget per trigger (a trial takes about 1.5–2 s: knock, flow, cut, 1 s of
/// silence, restore).
const TRIGGER_BUDGET: Duration = Duration::from_secs(300);

/// Runs `trials` cuts per trigger; returns the table rows.
pub fn live_cut(lab: &Lab, trials: usize) -> Vec<String> {
    let mut cut = CutLab::start(lab, Capture::Sniff, APP_PORT);
    let kill = cut.session_kill_available();
    let mut rows = Vec::new();
    for trigger in Trigger::ALL {
        let what = format!(
            "live flow cut by {} (trigger start → last byte; message every 10 ms each way)",
            trigger.label()
        );
        if trigger == Trigger::SessionKill && !kill {
            rows.push(format!(
                "| {what} | Postern sniff | not measured | | `postern-controller session kill --help` failed: command missing |"
            ));
            eprintln!("{}", rows.last().map(String::as_str).unwrap_or_default());
            continue;
        }
        eprintln!("cut: {} x {trials}", trigger.key());
        let s = CutSamples::measure(&mut cut, trigger, trials, TRIGGER_BUDGET);
        let mut sorted = s.cut_ms.clone();
        sorted.sort_by(f64::total_cmp);
        let list: Vec<String> = sorted.iter().map(|ms| format!("{ms:.1}")).collect();
        eprintln!(
            "cut: {} samples (ms, sorted): {}",
            trigger.key(),
            list.join(" ")
        );
        for (i, f) in s.failures.iter().enumerate().take(5) {
            eprintln!("cut: {} failure {}: {f}", trigger.key(), i + 1);
        }
        let skipped = if s.not_run > 0 {
            format!("; {} not run (budget)", s.not_run)
        } else {
            String::new()
        };
        rows.push(format!(
            "| {what} | Postern sniff | {:.1} ms | {:.1} ms | max {:.1} ms; {} ok, {} failed{skipped}; command start → exit p50 {:.1} ms |",
            percentile(&s.cut_ms, 50.0),
            percentile(&s.cut_ms, 99.0),
            percentile(&s.cut_ms, 100.0),
            s.cut_ms.len(),
            s.failures.len(),
            percentile(&s.command_ms, 50.0),
        ));
        eprintln!("{}", rows.last().map(String::as_str).unwrap_or_default());
    }
    cut.stop();
    crate::drop_postern_table(lab);
    rows
}
