//! End-to-end replay defence: a datagram the gateway accepted once is refused after the
//! gateway restarts (SIGTERM or SIGKILL), after its clock steps backwards, after it comes
//! back in the other capture mode, and when its replay journal was lost.
//!
//! Owns: these scenarios. Each keeps its own gateway key and state directory in a temp dir
//! so "the same gateway" can be restarted. The knocks are crafted in-process and sent from
//! a UDP socket inside the client namespace. Must not touch: anything outside the
//! namespaces and temp directories its lab creates (see `postern_e2e`).

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use postern_e2e::{
    bin, seal_knock, unix_ms, Capture, Controller, Gateway, GatewayOptions, InProcessDevice, Lab,
};
use serde_json::Value;
use tempfile::TempDir;

const APP: &str = "web";
const APP_PORT: u16 = 8080;
const USER: &str = "alice";
const DECISION_TIMEOUT: Duration = Duration::from_secs(5);

/// A lab, a controller with one enrolled in-process device, and the durable identity of a
/// gateway (key file, state dir, clock offset file) that outlives its processes.
struct Setup {
    gw: Option<Gateway>,
    dev: InProcessDevice,
    home: TempDir,
    ctl: Controller,
    lab: Lab,
}

impl Setup {
    fn new() -> Setup {
        let lab = Lab::new();
        let ctl = Controller::start();
        ctl.add_app(APP, "tcp", APP_PORT);
        ctl.grant(APP, USER);
        let dev = InProcessDevice::random("replayer");
        ctl.add_device(&dev.name, USER, &dev.public_text());
        let home = tempfile::Builder::new()
            .prefix("postern-replay-")
            .tempdir()
            .expect("temp dir for the gateway's key and state");
        let out = Command::new(bin("postern-gateway"))
            .arg("keygen")
            .arg("--out")
            .arg(home.path().join("gateway.key"))
            .output()
            .expect("run postern-gateway keygen");
        assert!(out.status.success(), "keygen failed: {out:?}");
        std::fs::write(home.path().join("clock-offset-ms"), "0").expect("write offset file");
        Setup {
            gw: None,
            dev,
            home,
            ctl,
            lab,
        }
    }

    fn state_dir(&self) -> PathBuf {
        self.home.path().join("state")
    }

    fn offset_file(&self) -> PathBuf {
        self.home.path().join("clock-offset-ms")
    }

    /// Steps the gateway's clock to real time + `ms` (read by the gateway per packet).
    fn set_clock_offset(&self, ms: i64) {
        std::fs::write(self.offset_file(), ms.to_string()).expect("write offset file");
    }

    /// Starts the gateway (same key, same state dir) in `mode` with `max_skew_secs`.
    fn start(&mut self, mode: Capture, max_skew_secs: u64) -> &mut Gateway {
        assert!(self.gw.is_none(), "a gateway is already running");
        let mut opts = GatewayOptions::new(mode);
        opts.max_skew_secs = max_skew_secs;
        opts.key_file = Some(self.home.path().join("gateway.key"));
        opts.state_dir = Some(self.state_dir());
        opts.clock_offset_file = Some(self.offset_file());
        self.gw = Some(Gateway::start(&self.lab, &self.ctl, opts));
        self.gw_mut()
    }

    fn gw_mut(&mut self) -> &mut Gateway {
        self.gw.as_mut().expect("gateway running")
    }

    /// SIGTERM (clean) or SIGKILL (crash), then forget the process.
    fn stop(&mut self, kill: bool) {
        let mut gw = self.gw.take().expect("gateway running");
        if kill {
            gw.kill();
        } else {
            let status = gw.stop(Duration::from_secs(5));
            assert!(
                status.is_some_and(|s| s.success()),
                "gateway did not stop cleanly on SIGTERM ({status:?}):\n{}",
                gw.diagnostics()
            );
        }
    }

    fn client_ip(&self) -> IpAddr {
        self.lab.client_addr(false)
    }

    /// A sealed knock with timestamp `ts` and a fresh random nonce.
    fn craft(&self, ts: u64) -> Vec<u8> {
        let gw = self.gw.as_ref().expect("gateway running");
        seal_knock(&self.dev.key, &gw.public_key, APP, ts, self.client_ip())
    }

    /// Sends `datagram` from inside the client namespace.
    fn send(&self, datagram: &[u8]) {
        let gw = self.gw.as_ref().expect("gateway running");
        let to = SocketAddr::new(self.lab.gateway_addr(false), gw.options.spa_port);
        self.lab.run_in(&self.lab.client, || {
            let sock = UdpSocket::bind("0.0.0.0:0").expect("bind a UDP socket in the client ns");
            sock.send_to(datagram, to).expect("send the SPA datagram");
        });
    }

    /// Sends `datagram` and returns the `n`-th knock decision of the running gateway as
    /// (decision, reason).
    fn send_and_decide(&mut self, datagram: &[u8], n: usize) -> (String, String) {
        self.send(datagram);
        let src = self.client_ip();
        let line = self.gw_mut().wait_knock(src, n, DECISION_TIMEOUT);
        let field = |k: &str| {
            line.get(k)
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned()
        };
        (field("decision"), field("reason"))
    }

    /// The running gateway's `start` audit event.
    fn start_event(&self) -> Value {
        let gw = self.gw.as_ref().expect("gateway running");
        gw.audit_events("start")
            .into_iter()
            .next()
            .unwrap_or_else(|| panic!("no start event:\n{}", gw.diagnostics()))
    }
}

fn granted(d: &(String, String)) -> bool {
    d.0 == "allow" && d.1 == "granted"
}

fn replay_state_of(start: &Value) -> &str {
    start
        .get("replay_state")
        .and_then(Value::as_str)
        .unwrap_or_default()
}

fn journal(dir: &Path) -> PathBuf {
    dir.join("replay.log")
}

/// Accept a knock, restart the gateway (SIGTERM or SIGKILL), replay the same datagram:
/// refused as `replay` by the restored cache, while a new knock still opens at once.
fn replay_after_restart_is_refused(mode: Capture, kill: bool) {
    let mut s = Setup::new();
    s.start(mode, 30);
    assert_eq!(replay_state_of(&s.start_event()), "new");
    let captured = s.craft(unix_ms());
    let first = s.send_and_decide(&captured, 1);
    assert!(granted(&first), "the original knock: {first:?}");

    s.stop(kill);
    s.start(mode, 30);
    let start = s.start_event();
    assert_eq!(replay_state_of(&start), "restored", "start event {start}");
    assert!(
        start.get("replay_entries").and_then(Value::as_u64) >= Some(1),
        "start event {start}"
    );
    let replayed = s.send_and_decide(&captured, 1);
    assert_eq!(
        replayed,
        ("deny".to_owned(), "replay".to_owned()),
        "the datagram captured before the restart was not refused"
    );
    // A same-boot restart costs honest clients nothing: a new knock opens at once.
    let fresh = s.craft(unix_ms());
    let d = s.send_and_decide(&fresh, 2);
    assert_eq!(d.0, "allow", "a fresh knock after the restart: {d:?}");
}

/// The gateway clock runs ahead (a forward step), a knock moves the replay cache's
/// high-water mark, and the clock steps back: the first datagram, again fresh by the
/// stepped-back clock and forgotten by the cache, is still refused, before and after a
/// SIGKILL restart (the high-water mark is persisted).
fn replay_after_backward_clock_step_is_refused(mode: Capture) {
    let mut s = Setup::new();
    // Skew 30 s: the replay window is 60 s; the clock jumps 90 s ahead, then back.
    s.start(mode, 30);
    let t0 = unix_ms();
    let captured = s.craft(t0);
    let d = s.send_and_decide(&captured, 1);
    assert!(granted(&d), "the original knock: {d:?}");

    s.set_clock_offset(90_000);
    let ahead = s.craft(unix_ms() + 90_000);
    let d = s.send_and_decide(&ahead, 2);
    assert_eq!(d.0, "allow", "a knock by the forward clock: {d:?}");

    s.set_clock_offset(0);
    // By the gateway's clock the captured datagram is fresh again (seconds old)...
    assert!(
        unix_ms() - t0 < 20_000,
        "the test ran too slowly to mean anything"
    );
    let d = s.send_and_decide(&captured, 3);
    // ...but the cache keeps the high-water time: the entry's window has passed, so it
    // refuses the timestamp itself (an authenticated `deny`, not the freshness `drop`).
    assert_eq!(d.0, "deny", "replay after the clock stepped back: {d:?}");
    assert!(d.1 == "stale" || d.1 == "replay", "{d:?}");

    s.stop(true);
    s.start(mode, 30);
    assert_eq!(replay_state_of(&s.start_event()), "restored");
    assert!(
        unix_ms() - t0 < 25_000,
        "the test ran too slowly to mean anything"
    );
    let d = s.send_and_decide(&captured, 1);
    assert_eq!(
        d.0, "deny",
        "replay after a restart with the clock stepped back: {d:?}"
    );
    // The price, documented in docs/threat-model.md: until the clock catches up with the
    // high-water mark (minus the window), honest knocks by the stepped-back clock are
    // refused too.
    let honest = s.craft(unix_ms());
    let d = s.send_and_decide(&honest, 2);
    assert_eq!(
        (d.0.as_str(), d.1.as_str()),
        ("deny", "stale"),
        "honest knock behind the high-water mark"
    );
}

/// Accepted by a sniff-mode gateway; the same host restarts in UDP mode with the same key
/// and state directory: the datagram is refused.
fn replay_across_capture_modes_is_refused(first: Capture, second: Capture) {
    let mut s = Setup::new();
    s.start(first, 30);
    let captured = s.craft(unix_ms());
    let d = s.send_and_decide(&captured, 1);
    assert!(
        granted(&d),
        "the original knock ({}): {d:?}",
        first.as_str()
    );
    s.stop(false);
    s.start(second, 30);
    let d = s.send_and_decide(&captured, 1);
    assert_eq!(
        d,
        ("deny".to_owned(), "replay".to_owned()),
        "accepted in {} mode, replayed in {} mode",
        first.as_str(),
        second.as_str()
    );
}

/// The journal is deleted (or corrupted) while the gateway is down: the next start refuses
/// every timestamp up to its start time + max skew, so the captured datagram is refused;
/// once the clock has passed that floor, new knocks open again.
fn lost_journal_refuses_old_timestamps(mode: Capture, corrupt: bool) {
    const SKEW_SECS: u64 = 5;
    let mut s = Setup::new();
    s.start(mode, SKEW_SECS);
    let captured = s.craft(unix_ms());
    let d = s.send_and_decide(&captured, 1);
    assert!(granted(&d), "the original knock: {d:?}");
    s.stop(false);
    let path = journal(&s.state_dir());
    if corrupt {
        let text = std::fs::read_to_string(&path).expect("read the journal");
        let mangled: String = text
            .lines()
            .enumerate()
            .map(|(i, l)| {
                if i == 1 {
                    format!("{}x\n", &l[..l.len() / 2])
                } else {
                    format!("{l}\n")
                }
            })
            .collect();
        std::fs::write(&path, mangled).expect("corrupt the journal");
    } else {
        std::fs::remove_file(&path).expect("delete the journal");
    }

    s.start(mode, SKEW_SECS);
    let start = s.start_event();
    let want = if corrupt { "corrupt" } else { "missing" };
    assert_eq!(replay_state_of(&start), want, "start event {start}");
    let floor = start
        .get("replay_floor_ms")
        .and_then(Value::as_u64)
        .unwrap_or_else(|| panic!("no replay_floor_ms in {start}"));
    let d = s.send_and_decide(&captured, 1);
    assert_eq!(d.0, "deny", "replay after the journal was lost: {d:?}");
    // Honest knocks are refused until the floor, then served.
    let early = s.craft(unix_ms());
    let d = s.send_and_decide(&early, 2);
    assert_eq!(
        d,
        ("deny".to_owned(), "replay".to_owned()),
        "knock below the floor"
    );
    let wait = (floor + 50).saturating_sub(unix_ms());
    std::thread::sleep(Duration::from_millis(wait));
    let late = s.craft(unix_ms());
    let d = s.send_and_decide(&late, 3);
    assert!(granted(&d), "knock after the floor: {d:?}");
}

mod sniff {
    use super::Capture;
    #[test]
    fn replay_after_sigterm_restart_is_refused() {
        super::replay_after_restart_is_refused(Capture::Sniff, false)
    }
    #[test]
    fn replay_after_sigkill_restart_is_refused() {
        super::replay_after_restart_is_refused(Capture::Sniff, true)
    }
    #[test]
    fn replay_after_backward_clock_step_is_refused() {
        super::replay_after_backward_clock_step_is_refused(Capture::Sniff)
    }
    #[test]
    fn replay_is_refused_after_restart_in_udp_mode() {
        super::replay_across_capture_modes_is_refused(Capture::Sniff, Capture::Udp)
    }
    #[test]
    fn missing_journal_refuses_old_timestamps() {
        super::lost_journal_refuses_old_timestamps(Capture::Sniff, false)
    }
}

mod udp {
    use super::Capture;
    #[test]
    fn replay_after_sigterm_restart_is_refused() {
        super::replay_after_restart_is_refused(Capture::Udp, false)
    }
    #[test]
    fn replay_after_sigkill_restart_is_refused() {
        super::replay_after_restart_is_refused(Capture::Udp, true)
    }
    #[test]
    fn replay_after_backward_clock_step_is_refused() {
        super::replay_after_backward_clock_step_is_refused(Capture::Udp)
    }
    #[test]
    fn replay_is_refused_after_restart_in_sniff_mode() {
        super::replay_across_capture_modes_is_refused(Capture::Udp, Capture::Sniff)
    }
    #[test]
    fn corrupt_journal_refuses_old_timestamps() {
        super::lost_journal_refuses_old_timestamps(Capture::Udp, true)
    }
}
