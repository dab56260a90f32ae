//! Issue 4: a live TCP stream carrying data every 10 ms (both ways) stops after each of the
//! five triggers: device revoke, a failing posture report, user disable, removal of the
//! granting policy, session kill. Two trials per trigger, each with the real CLIs
//! (`postern-controller`, `postern enroll/login/posture report/knock`), a real gateway in
//! its namespace in policy mode, and the preconditions restored between trials.
//!
//! Asserted: the flow stops, stays silent for 1 s, and the median of the two cuts is under
//! 1 s. The 250 ms claim is measured by `postern-bench --only cut` (50 trials per
//! trigger, BENCHMARKS.md), not here: the project keeps speed in benchmarks, not in timed
//! tests, and these tests share 2 loaded cores with parallel builds and the other e2e tests,
//! where a 250 ms bound on two samples would fail on scheduling noise, not on Postern.
//!
//! Owns: this scenario (through `postern_e2e::cut`). Must not touch: anything outside its
//! lab, loopback and temp directories.

use postern_e2e::cut::{percentile, CutLab, Trigger};
use postern_e2e::{record_timing, Capture, Lab};

const APP_PORT: u16 = 8080;
const TRIALS: usize = 2;
/// Generous: see the module comment.
const MEDIAN_LIMIT_MS: f64 = 1000.0;

fn live_flow_is_cut_by(trigger: Trigger) {
    let lab = Lab::new();
    lab.start_echo_server(APP_PORT);
    let mut cut = CutLab::start(&lab, Capture::Sniff, APP_PORT);
    if trigger == Trigger::SessionKill {
        assert!(
            cut.session_kill_available(),
            "`postern-controller session kill --help` fails: the session kill command is missing"
        );
    }
    let mut ms = Vec::new();
    for n in 1..=TRIALS {
        match cut.trial(trigger) {
            Ok(c) => {
                record_timing(&format!(
                    "live cut [{}] trial {n}: last byte {:.1} ms after the trigger started (command {:.1} ms)",
                    trigger.key(),
                    c.cut_ms,
                    c.command_ms
                ));
                ms.push(c.cut_ms);
            }
            Err(e) => panic!("{} trial {n}: {e}", trigger.label()),
        }
    }
    let median = percentile(&ms, 50.0);
    assert!(
        median < MEDIAN_LIMIT_MS,
        "{}: median cut {median:.0} ms over {TRIALS} trials ({ms:?}), limit {MEDIAN_LIMIT_MS} ms",
        trigger.label()
    );
}

#[test]
fn device_revoke_cuts_the_live_flow() {
    live_flow_is_cut_by(Trigger::DeviceRevoke);
}

#[test]
fn failing_posture_report_cuts_the_live_flow() {
    live_flow_is_cut_by(Trigger::FailingPosture);
}

#[test]
fn user_disable_cuts_the_live_flow() {
    live_flow_is_cut_by(Trigger::UserDisable);
}

#[test]
fn removing_the_granting_policy_cuts_the_live_flow() {
    live_flow_is_cut_by(Trigger::PolicyRemoval);
}

#[test]
fn session_kill_cuts_the_live_flow() {
    live_flow_is_cut_by(Trigger::SessionKill);
}
