//! Live-flow cuts (issue 4): a TCP stream carrying data every 10 ms in both directions is
//! cut by each of the five triggers an admin or a device has, and how long the last byte
//! took to arrive after the trigger started is measured. Shared by `postern-bench --only
//! cut` (50 trials per trigger) and `tests/tests/live_cut_e2e.rs` (2 trials per trigger).
//!
//! The triggers are the real ones, each through the interface a person would use:
//! - `device revoke NAME` (admin CLI, through the running controller's admin socket);
//! - a posture report that fails the policy's requirement, sent by the real client
//!   (`postern posture report --facts FILE`) over the controller's HTTPS API;
//! - `user disable USER` (admin CLI);
//! - `policy apply FILE` of a policy without the rule that grants the app (admin CLI);
//! - `session kill GATEWAY:ID` (admin CLI), the ID from the gateway's `session_opened`
//!   audit line.
//!
//! Owns: one controller (its own registry, client API on 127.0.0.1 in the root namespace),
//! one gateway in the lab's gateway namespace in policy mode, the users `cut-<n>` of group
//! `staff` and their devices (invite → `postern enroll` → TOTP `postern login` → passing
//! `postern posture report`), and one TCP flow at a time from the lab's client namespace to
//! the lab's echo server. Must not touch: anything outside the lab's namespaces, loopback
//! and its temp directories. Every loop is bounded in count and time; failures come back
//! as `Err(text)` so a benchmark can count them and go on.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::fixtures::{knock_cli, Capture, Controller, Device, Gateway, GatewayOptions};
use crate::lab::{bin, poll, run, Lab};

/// The app every cut scenario protects.
pub const APP: &str = "web";
/// The group the policy grants the app to.
const GROUP: &str = "staff";
/// A message on the live flow every this long, each way.
pub const SEND_EVERY: Duration = Duration::from_millis(10);
/// After the cut, the flow must carry nothing for this long.
pub const QUIET_FOR: Duration = Duration::from_secs(1);
/// A flow still carrying data this long after the trigger started was not cut.
pub const CUT_LIMIT: Duration = Duration::from_secs(3);
/// How long the gateway may take to load a snapshot or admit a connection.
const SETTLE: Duration = Duration::from_secs(5);
/// The name a gateway without `name` in its config reports under (for a `session_opened`
/// line without `session_id`).
const GATEWAY_NAME: &str = "local";

/// The policy file: the `disk-encryption` requirement and, when `granting`, the rule that
/// gives group `staff` the app `web` with that requirement and a TOTP login within 12 h.
fn policy_text(granting: bool) -> String {
    let requirement = "[[requirement]]\nname = \"disk-encryption\"\ndisk_encryption = true\n\
                       remediation = \"Turn on full-disk encryption\"\n";
    let rule = "[[rule]]\nname = \"staff-web\"\neffect = \"allow\"\napps = [\"web\"]\n\
                groups = [\"staff\"]\nposture = [\"disk-encryption\"]\nmfa_max_age = \"12h\"\n";
    if granting {
        format!("{requirement}\n{rule}")
    } else {
        requirement.to_owned()
    }
}

/// What cuts the live flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    DeviceRevoke,
    FailingPosture,
    UserDisable,
    PolicyRemoval,
    SessionKill,
}

impl Trigger {
    pub const ALL: [Trigger; 5] = [
        Trigger::DeviceRevoke,
        Trigger::FailingPosture,
        Trigger::UserDisable,
        Trigger::PolicyRemoval,
        Trigger::SessionKill,
    ];

    /// What the benchmark table calls it.
    pub fn label(self) -> &'static str {
        match self {
            Trigger::DeviceRevoke => "`device revoke`",
            Trigger::FailingPosture => "failing posture report (`postern posture report`)",
            Trigger::UserDisable => "`user disable`",
            Trigger::PolicyRemoval => "`policy apply` without the granting rule",
            Trigger::SessionKill => "`session kill GATEWAY:ID`",
        }
    }

    /// Short name for options and logs.
    pub fn key(self) -> &'static str {
        match self {
            Trigger::DeviceRevoke => "revoke",
            Trigger::FailingPosture => "posture",
            Trigger::UserDisable => "disable",
            Trigger::PolicyRemoval => "policy",
            Trigger::SessionKill => "kill",
        }
    }
}

/// One trial that cut the flow.
#[derive(Debug, Clone, Copy)]
pub struct Cut {
    /// Trigger start (admin command or client report started) → last byte received, ms.
    /// 0 when no byte arrived after the start.
    pub cut_ms: f64,
    /// Trigger start → the command's exit, ms.
    pub command_ms: f64,
}

/// A user with one enrolled device that has logged in and reported a passing posture.
#[derive(Debug)]
struct Subject {
    user: String,
    device: Device,
    facts: PathBuf,
}

/// The controller, gateway and subjects of the cut trials, in one lab.
#[derive(Debug)]
pub struct CutLab<'a> {
    lab: &'a Lab,
    app_port: u16,
    pub ctl: Controller,
    pub gw: Gateway,
    api_url: String,
    users_made: usize,
    /// The subject each restorable trigger reuses (index: position in `Trigger::ALL`).
    kept: [Option<Subject>; 5],
}

/// Runs a command; `Ok(stdout)` when it exits 0, else `Err` with what it said.
fn checked(what: &str, out: Output) -> Result<String, String> {
    if out.status.success() {
        return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
    }
    Err(format!(
        "{what} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout).trim(),
        String::from_utf8_lossy(&out.stderr).trim()
    ))
}

fn json(text: &str) -> Result<Value, String> {
    serde_json::from_str(text).map_err(|e| format!("not JSON ({e}): {text}"))
}

/// The current RFC 6238 code for a base32 secret (what the authenticator app shows).
pub fn totp_now(secret_b32: &str) -> Result<String, String> {
    let secret = totp_rs::Secret::try_from_base32(secret_b32)
        .map_err(|e| format!("TOTP secret is not base32: {e}"))?;
    let totp = totp_rs::Builder::new()
        .with_secret(secret.as_ref())
        .build()
        .map_err(|e| format!("TOTP parameters: {e}"))?;
    Ok(totp.generate(crate::lab::unix_ms() / 1000).to_string())
}

/// Writes a posture report collected now, passing the disk-encryption requirement or not.
fn write_facts(path: &Path, disk_encrypted: bool) -> Result<(), String> {
    let text = format!(
        r#"{{"collected_at":"{}","os_family":"linux","os_version":"12","kernel":"6.1.0","disk_encrypted":{disk_encrypted},"firewall_on":true}}"#,
        postern_policy::Timestamp::now()
    );
    std::fs::write(path, text).map_err(|e| format!("write {}: {e}", path.display()))
}

impl<'a> CutLab<'a> {
    /// Starts a controller with its client API, registers `web` on `app_port` (the lab's
    /// echo server must listen there), applies the granting policy and starts a gateway in
    /// `mode` whose sessions outlive every trial (so a flow that stops was cut, not expired).
    pub fn start(lab: &'a Lab, mode: Capture, app_port: u16) -> CutLab<'a> {
        let ctl = Controller::start_with_api();
        let api_url = ctl.api_url();
        ctl.add_app(APP, "tcp", app_port);
        ctl.admin(&["group", "add", GROUP]);
        let mut options = GatewayOptions::new(mode);
        options.pinhole_secs = 30;
        options.session_secs = 120;
        options.extra_config = "per_source_rate = 100000\nper_source_burst = 100000\n".into();
        let gw = Gateway::start(lab, &ctl, options);
        let cut = CutLab {
            lab,
            app_port,
            ctl,
            gw,
            api_url,
            users_made: 0,
            kept: Default::default(),
        };
        if let Err(e) = cut.apply_policy(true) {
            panic!("cut lab: {e}");
        }
        cut
    }

    /// `postern-controller --db DB ARGS...`, Err unless it exits 0.
    fn admin(&self, args: &[&str]) -> Result<String, String> {
        checked(
            &format!("postern-controller {}", args.join(" ")),
            self.ctl.try_admin(args),
        )
    }

    /// The real client in the root namespace: it reaches the API on loopback.
    fn client(&self, dev: &Device, args: &[&str]) -> Result<String, String> {
        let out = run(Command::new(bin("postern"))
            .args(args)
            .arg("--key")
            .arg(&dev.key_file));
        checked(&format!("postern {}", args.join(" ")), out)
    }

    /// `policy apply FILE` of [`policy_text`]`(granting)`.
    fn apply_policy(&self, granting: bool) -> Result<(), String> {
        let file = if granting {
            "granting.toml"
        } else {
            "without-grant.toml"
        };
        let path = self.ctl.dir().join(file);
        std::fs::write(&path, policy_text(granting))
            .map_err(|e| format!("write {}: {e}", path.display()))?;
        let path = path.to_str().ok_or("temp path is not UTF-8")?;
        self.admin(&["policy", "apply", path]).map(drop)
    }

    /// A new user in `staff` with TOTP, and a device that enrolls with an invite, logs in
    /// and reports a passing posture, all through the real CLIs.
    fn onboard(&mut self) -> Result<Subject, String> {
        self.users_made += 1;
        let user = format!("cut-{}", self.users_made);
        self.admin(&["user", "add", &user])?;
        self.admin(&["group", "add-member", GROUP, &user])?;
        let mfa = json(&self.admin(&["user", "mfa", &user, "--json"])?)?;
        let secret = mfa["secret"]
            .as_str()
            .ok_or_else(|| format!("`user mfa --json` has no secret: {mfa}"))?
            .to_owned();
        let device = Device::keygen(&format!("{user}-laptop"));
        let invite =
            json(&self.admin(&["device", "invite", &device.name, "--user", &user, "--json"])?)?;
        let token = invite["token"]
            .as_str()
            .ok_or_else(|| format!("`device invite --json` has no token: {invite}"))?;
        self.client(
            &device,
            &["enroll", "--controller", &self.api_url, "--token", token],
        )?;
        // A new user per device: each user's TOTP code is accepted once per 30 s step.
        self.client(&device, &["login", "--code", &totp_now(&secret)?])?;
        let facts = device.key_file.with_extension("facts.json");
        let subject = Subject {
            user,
            device,
            facts,
        };
        self.report(&subject, true)?;
        Ok(subject)
    }

    /// `postern posture report --facts FILE` with a fresh report.
    fn report(&self, subject: &Subject, passing: bool) -> Result<(), String> {
        write_facts(&subject.facts, passing)?;
        let facts = subject.facts.to_str().ok_or("temp path is not UTF-8")?;
        self.client(&subject.device, &["posture", "report", "--facts", facts])
            .map(drop)
    }

    /// Undoes `trigger` for a kept subject, so its device is allowed again.
    fn restore(&self, trigger: Trigger, subject: &Subject) -> Result<(), String> {
        match trigger {
            // A revoked device stays revoked: the next trial onboards a new one.
            Trigger::DeviceRevoke | Trigger::SessionKill => Ok(()),
            Trigger::FailingPosture => self.report(subject, true),
            Trigger::UserDisable => self.admin(&["user", "enable", &subject.user]).map(drop),
            Trigger::PolicyRemoval => self.apply_policy(true),
        }
    }

    /// Fires `trigger` at `subject` (whose live session has the global id `session`);
    /// returns when the command has exited.
    fn fire(&self, trigger: Trigger, subject: &Subject, session: &str) -> Result<(), String> {
        match trigger {
            Trigger::DeviceRevoke => self
                .admin(&["device", "revoke", &subject.device.name])
                .map(drop),
            Trigger::FailingPosture => self.report(subject, false),
            Trigger::UserDisable => self.admin(&["user", "disable", &subject.user]).map(drop),
            Trigger::PolicyRemoval => self.apply_policy(false),
            Trigger::SessionKill => self.admin(&["session", "kill", session]).map(drop),
        }
    }

    /// Waits until the gateway has loaded a snapshot newer than `after`.
    fn settle_after(&self, after: u64) -> Result<u64, String> {
        poll(SETTLE, Duration::from_millis(5), || {
            self.gw.synced_revision().filter(|&r| r > after)
        })
        .ok_or_else(|| {
            format!("the gateway loaded no snapshot after revision {after} within {SETTLE:?}")
        })
    }

    /// The global id (`GATEWAY:HEXID`) in the newest `session_opened` audit line, which
    /// must come after the first `skip` such lines; then waits until `session list` shows
    /// it (gateways report their sessions at most 5 times a second), as an admin would see
    /// it before killing it.
    fn opened_session(&self, skip: usize) -> Result<String, String> {
        let found = poll(SETTLE, Duration::from_millis(5), || {
            self.gw
                .audit_events("session_opened")
                .into_iter()
                .skip(skip)
                .last()
        })
        .ok_or_else(|| format!("the gateway logged no new `session_opened` within {SETTLE:?}"))?;
        let id = match (&found["session_id"], &found["session"]) {
            (Value::String(global), _) => global.clone(),
            (_, Value::String(hex)) => format!("{GATEWAY_NAME}:{hex}"),
            _ => {
                return Err(format!(
                    "`session_opened` audit line without an id: {found}"
                ))
            }
        };
        let listed = poll(SETTLE, Duration::from_millis(20), || {
            let list = self.admin(&["session", "list", "--json"]).ok()?;
            list.contains(&format!("\"{id}\"")).then_some(())
        });
        listed
            .map(|()| id.clone())
            .ok_or_else(|| format!("`session list` did not show {id} within {SETTLE:?}"))
    }

    /// Stops the gateway (its dark table stays, fail closed) and the controller.
    pub fn stop(mut self) {
        self.gw.stop(Duration::from_secs(5));
    }

    /// Whether `postern-controller session kill --help` works (engineer D's command).
    pub fn session_kill_available(&self) -> bool {
        self.ctl
            .try_admin(&["session", "kill", "--help"])
            .status
            .success()
    }

    /// One trial: the subject's device knocks (real client, client namespace), a flow to the
    /// app carries a message every 10 ms each way, `trigger` fires, and the flow must stop
    /// within [`CUT_LIMIT`] and stay silent for [`QUIET_FOR`]. Restores the preconditions
    /// for the next trial of the same trigger before returning.
    pub fn trial(&mut self, trigger: Trigger) -> Result<Cut, String> {
        let slot = Trigger::ALL
            .iter()
            .position(|t| *t == trigger)
            .unwrap_or_default();
        let subject = match (trigger, self.kept[slot].take()) {
            (Trigger::DeviceRevoke, _) | (_, None) => self.onboard()?,
            (_, Some(kept)) => kept,
        };
        let mut fired = false;
        let result = self.cut_once(trigger, &subject, &mut fired);
        let restored = if fired {
            self.restore_settled(trigger, &subject)
        } else {
            Ok(())
        };
        self.kept[slot] = Some(subject);
        let cut = result?;
        restored?;
        Ok(cut)
    }

    /// [`CutLab::restore`], then waits until the gateway has the change.
    fn restore_settled(&self, trigger: Trigger, subject: &Subject) -> Result<(), String> {
        let before = self.gw.synced_revision().unwrap_or(0);
        self.restore(trigger, subject)?;
        if matches!(trigger, Trigger::DeviceRevoke | Trigger::SessionKill) {
            return Ok(());
        }
        self.settle_after(before).map(drop)
    }

    /// Knock, flow, trigger, cut; `fired` tells the caller whether the trigger ran (and so
    /// needs undoing).
    fn cut_once(
        &self,
        trigger: Trigger,
        subject: &Subject,
        fired: &mut bool,
    ) -> Result<Cut, String> {
        let opened_before = self.gw.audit_events("session_opened").len();
        let flow = self.open_flow(&subject.device)?;
        let session = if trigger == Trigger::SessionKill {
            self.opened_session(opened_before)?
        } else {
            String::new()
        };
        // Live: a few round trips have come back, the last one just now.
        let live = poll(Duration::from_secs(1), Duration::from_millis(2), || {
            (flow.received() >= 5 && flow.silent_for() < SEND_EVERY * 3).then_some(())
        });
        if live.is_none() {
            return Err(format!(
                "the flow was not live before the trigger ({} echoes received)",
                flow.received()
            ));
        }
        let revision = self.gw.synced_revision().unwrap_or(0);
        let t0 = Instant::now();
        *fired = true;
        self.fire(trigger, subject, &session)?;
        let command_ms = t0.elapsed().as_secs_f64() * 1e3;
        // Cut: the last byte is at least QUIET_FOR old, and it came within CUT_LIMIT.
        let deadline = t0 + CUT_LIMIT + QUIET_FOR;
        let quiet = poll(
            deadline.saturating_duration_since(Instant::now()),
            Duration::from_millis(10),
            || (flow.silent_for() >= QUIET_FOR).then_some(()),
        );
        let last = flow.last_received();
        flow.close();
        if quiet.is_none() {
            return Err(format!(
                "{}: the flow still carries data {:?} after the trigger",
                trigger.key(),
                CUT_LIMIT
            ));
        }
        // The next trial starts from a gateway that has the change (every trigger bumps
        // the registry revision; a session kill travels to the gateway that way too).
        self.settle_after(revision)?;
        let cut_ms = last
            .and_then(|l| l.checked_duration_since(t0))
            .map_or(0.0, |d| d.as_secs_f64() * 1e3);
        if cut_ms > CUT_LIMIT.as_secs_f64() * 1e3 {
            return Err(format!(
                "{}: the flow stopped only after {cut_ms:.0} ms",
                trigger.key()
            ));
        }
        Ok(Cut { cut_ms, command_ms })
    }

    /// Knocks for `dev` with the real client and connects from the client namespace; knocks
    /// again every 500 ms, up to 6 times (a change just made may not have reached the
    /// gateway yet, and a knock it refused opens nothing). Starts the flow.
    fn open_flow(&self, dev: &Device) -> Result<LiveFlow, String> {
        let gw_ip = self.lab.gateway_addr(false);
        let addr = SocketAddr::new(gw_ip, self.app_port);
        let mut last_error = String::new();
        for _ in 0..6 {
            checked(
                "postern knock",
                knock_cli(self.lab, &self.gw, dev, APP, gw_ip),
            )?;
            let stream = self.lab.run_in(&self.lab.client, || {
                let started = Instant::now();
                loop {
                    match TcpStream::connect_timeout(&addr, Duration::from_millis(20)) {
                        Ok(s) => return Ok(s),
                        Err(_) if started.elapsed() < Duration::from_millis(500) => {}
                        Err(e) => return Err(e),
                    }
                }
            });
            match stream {
                Ok(s) => return LiveFlow::start(s),
                Err(e) => last_error = e.to_string(),
            }
        }
        let knock = self
            .gw
            .knocks_from(self.lab.client_addr(false))
            .pop()
            .unwrap_or_default();
        Err(format!(
            "no connection to {addr} after 6 knocks ({last_error}); last knock decision: {knock}"
        ))
    }
}

/// A TCP flow to an echo server: a writer thread sends 8 bytes every [`SEND_EVERY`], a
/// reader thread notes when each echoed byte arrives.
#[derive(Debug)]
pub struct LiveFlow {
    stop: Arc<AtomicBool>,
    received: Arc<AtomicU64>,
    last: Arc<Mutex<Option<Instant>>>,
    threads: Vec<JoinHandle<()>>,
}

impl LiveFlow {
    /// Starts both threads on `stream`.
    pub fn start(stream: TcpStream) -> Result<LiveFlow, String> {
        let err = |e: std::io::Error| format!("set up the flow's socket: {e}");
        stream.set_nodelay(true).map_err(err)?;
        stream
            .set_read_timeout(Some(Duration::from_millis(20)))
            .map_err(err)?;
        stream
            .set_write_timeout(Some(Duration::from_millis(100)))
            .map_err(err)?;
        let mut reader = stream.try_clone().map_err(err)?;
        let mut writer = stream;
        let stop = Arc::new(AtomicBool::new(false));
        let received = Arc::new(AtomicU64::new(0));
        let last = Arc::new(Mutex::new(None));
        let (stop_w, stop_r) = (Arc::clone(&stop), Arc::clone(&stop));
        let (received_r, last_r) = (Arc::clone(&received), Arc::clone(&last));
        let spawn = |name: &str, f: Box<dyn FnOnce() + Send>| {
            std::thread::Builder::new()
                .name(name.into())
                .spawn(f)
                .map_err(|e| format!("spawn {name}: {e}"))
        };
        let write_thread = spawn(
            "flow-send",
            Box::new(move || {
                let mut seq = 0u64;
                let mut next = Instant::now();
                // Bounded by the stop flag, which close() sets, and by 10 minutes.
                while !stop_w.load(Ordering::SeqCst) && seq < 60_000 {
                    seq += 1;
                    // A dead flow's writes fill the socket buffer only after hours at
                    // 800 B/s; a failed write ends the sender.
                    if writer.write_all(&seq.to_be_bytes()).is_err() {
                        return;
                    }
                    next += SEND_EVERY;
                    if let Some(wait) = next.checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                }
            }),
        )?;
        let read_thread = spawn(
            "flow-recv",
            Box::new(move || {
                let mut buf = [0u8; 512];
                let started = Instant::now();
                while !stop_r.load(Ordering::SeqCst) && started.elapsed() < Duration::from_secs(600)
                {
                    match reader.read(&mut buf) {
                        Ok(0) => return,
                        Ok(n) => {
                            *last_r.lock().unwrap_or_else(PoisonError::into_inner) =
                                Some(Instant::now());
                            received_r.fetch_add(n as u64 / 8, Ordering::SeqCst);
                        }
                        Err(e)
                            if e.kind() == std::io::ErrorKind::WouldBlock
                                || e.kind() == std::io::ErrorKind::TimedOut => {}
                        Err(_) => return,
                    }
                }
            }),
        )?;
        Ok(LiveFlow {
            stop,
            received,
            last,
            threads: vec![write_thread, read_thread],
        })
    }

    /// Echoed messages received so far.
    pub fn received(&self) -> u64 {
        self.received.load(Ordering::SeqCst)
    }

    /// When the last byte arrived.
    pub fn last_received(&self) -> Option<Instant> {
        *self.last.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// How long since the last byte arrived (or forever, if none did).
    pub fn silent_for(&self) -> Duration {
        self.last_received().map_or(Duration::MAX, |l| l.elapsed())
    }

    /// Stops both threads; the socket closes when they end.
    pub fn close(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for LiveFlow {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// Nearest-rank percentile `p` (0-100) of `v`; NaN when empty.
pub fn percentile(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    let i = ((p / 100.0) * (v.len() - 1) as f64).round() as usize;
    v[i.min(v.len() - 1)]
}

/// Cut latencies of one trigger, in ms, and the trials that failed (with why).
#[derive(Debug, Default)]
pub struct CutSamples {
    pub cut_ms: Vec<f64>,
    pub command_ms: Vec<f64>,
    pub failures: Vec<String>,
    /// Trials not run because the time budget was spent.
    pub not_run: usize,
}

impl CutSamples {
    /// Runs up to `trials` trials of `trigger` within `budget`.
    pub fn measure(
        cut: &mut CutLab<'_>,
        trigger: Trigger,
        trials: usize,
        budget: Duration,
    ) -> CutSamples {
        let mut s = CutSamples::default();
        let until = Instant::now() + budget;
        for n in 0..trials {
            if Instant::now() > until {
                s.not_run = trials - n;
                break;
            }
            match cut.trial(trigger) {
                Ok(c) => {
                    s.cut_ms.push(c.cut_ms);
                    s.command_ms.push(c.command_ms);
                }
                Err(e) => s.failures.push(e),
            }
        }
        s
    }
}
