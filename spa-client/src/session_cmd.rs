//! `postern connect` and `postern ssh-proxy`: a gateway session that lives exactly as long as
//! a command (connect) or one TCP connection (ssh-proxy).
//!
//! Owns: the session lifecycle on the client: KNOCK to open, RENEW re-knocks on a timer
//! (with the posture-refresh call site before each), CLOSE at the end (command exit,
//! connection end, SIGINT/SIGTERM/SIGHUP); running the command with the user's stdio and
//! passing its exit code on; for ssh-proxy, waiting for the port and splicing stdin/stdout
//! to the TCP connection. Must not touch: packet building (`knocker.rs`), the controller API
//! (`controller_cmd.rs`), the key file format (`main.rs`).

use std::io::{Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use postern_client::exit::{Fix, DENIED};
use postern_protocol::packet::flags;
use postern_protocol::reply::{Reply, ReplyDecision};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use crate::knocker::{Knocker, Sent};

/// Default seconds between RENEW re-knocks (see [`SessionArgs::renew_secs`]).
const DEFAULT_RENEW_SECS: u64 = 20;
/// The app `ssh-proxy` opens when `--app` is not given.
const DEFAULT_SSH_APP: &str = "ssh";
/// ssh-proxy: pause between two connection attempts while the pinhole opens.
const CONNECT_RETRY_PAUSE: Duration = Duration::from_millis(5);
/// ssh-proxy: first per-attempt connect timeout; doubles per attempt up to the cap, so a
/// slow path (long RTT) still connects while a dropped SYN on a dark port is retried fast.
const CONNECT_ATTEMPT_FIRST: Duration = Duration::from_millis(50);
const CONNECT_ATTEMPT_CAP: Duration = Duration::from_secs(1);

/// Gateway and session flags shared by `connect` and `ssh-proxy`.
#[derive(Debug, clap::Args)]
pub(crate) struct SessionArgs {
    /// The gateway's public key, as printed by `postern-gateway keygen` (default: from the
    /// profile).
    #[arg(long, value_name = "x25519:KEY")]
    gateway_key: Option<String>,
    /// Device key file (default: ~/.config/postern/device.key).
    #[arg(long, value_name = "FILE")]
    key: Option<PathBuf>,
    /// Claim this address in the signed knocks instead of this host's own source address
    /// (for NAT; the gateway decides whether it may differ).
    #[arg(long, value_name = "ADDR")]
    allow_ip: Option<IpAddr>,
    /// Seconds between RENEW re-knocks that keep the session alive. Default: a third of
    /// the session length the gateway states in its acknowledgement, else 20. Must be
    /// shorter than the gateway's `session_secs` (default 3600), or flows stop between
    /// renewals.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=86_400))]
    renew_secs: Option<u64>,
}

/// `postern connect APP [-- COMMAND...]`.
#[derive(Debug, clap::Args)]
#[command(after_help = "\
Examples:
  postern connect web --gateway gw.example.org --gateway-key x25519:AbC...= -- curl http://gw.example.org:8080/
  postern connect db --gateway gw.example.org --gateway-key x25519:AbC...=     (holds the session until Ctrl-C)

The session is opened with a KNOCK (a signed denial ends postern with status 8),
renewed with a RENEW re-knock every --renew-secs (default: a third of the session length
in the gateway's acknowledgement, else 20 s) and closed with a CLOSE knock as soon as
COMMAND exits or postern gets SIGINT, SIGTERM or SIGHUP (passed on to COMMAND first).
When the device is enrolled with a controller (controller.json beside the key), a fresh
posture report is sent before each renewal.

Exit status: COMMAND's exit status (128+N if a signal N ended it); without COMMAND, 0
after Ctrl-C; 8 if the gateway denied the knock; 5 without a profile or --gateway and
--gateway-key; 1 if the session could not be opened (bad key, no route) or COMMAND could
not be started; 2 for bad usage.")]
pub(crate) struct ConnectArgs {
    /// The app to open, as named by the admin (e.g. `web`).
    app: String,
    /// Gateway host or address, optionally with :PORT (default port 62201; default: from
    /// the profile).
    #[arg(long, value_name = "HOST[:PORT]")]
    gateway: Option<String>,
    /// Wait this many milliseconds after the knock for the gateway's signed reply (a
    /// denial, or an acknowledgement stating the session length) before running COMMAND.
    #[arg(long, value_name = "MS", default_value_t = 500)]
    wait_reply: u64,
    #[command(flatten)]
    session: SessionArgs,
    /// The command to run while the session is open (after `--`).
    #[arg(last = true, value_name = "COMMAND")]
    command: Vec<String>,
}

/// `postern ssh-proxy HOST PORT [--app APP]`.
#[derive(Debug, clap::Args)]
#[command(after_help = "\
Example ~/.ssh/config entry:
  Host gw.example.org
      ProxyCommand postern ssh-proxy %h %p --app ssh --gateway-key x25519:AbC...=

Knocks for APP (default `ssh`) at --gateway (default: the profile's gateway, else HOST), waits up to --wait-ms
(default 3000) for HOST:PORT to accept, then copies stdin to the connection and the
connection to stdout until either side closes. The session is renewed every --renew-secs
while the connection lives and closed with a CLOSE knock at the end (also on SIGHUP,
which ssh sends when it exits, SIGINT and SIGTERM).

Exit status: 0 when the connection ended; 1 if the port did not accept in time (check
the app name, the gateway key and the clock) or the knock could not be sent; 2 for bad
usage.")]
pub(crate) struct SshProxyArgs {
    /// The host ssh connects to (%h).
    host: String,
    /// The port ssh connects to (%p).
    port: u16,
    /// The app to open (default `ssh`).
    #[arg(long, value_name = "APP", default_value = DEFAULT_SSH_APP)]
    app: String,
    /// Gateway host or address, optionally with :PORT (default: the profile's, else HOST;
    /// port 62201).
    #[arg(long, value_name = "HOST[:PORT]")]
    gateway: Option<String>,
    /// How long to wait for HOST:PORT to accept after the knock, in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 3000,
          value_parser = clap::value_parser!(u64).range(1..=60_000))]
    wait_ms: u64,
    #[command(flatten)]
    session: SessionArgs,
}

/// A live session: opened with a KNOCK, renewed by a background thread, closed by
/// [`Session::close`].
#[derive(Debug)]
struct Session {
    knocker: Arc<Knocker>,
    app: String,
    /// The opening KNOCK (its reply key opens the gateway's answer).
    opened: Sent,
    key_file: PathBuf,
    stop_renewing: Option<mpsc::Sender<()>>,
    renewer: Option<JoinHandle<()>>,
}

impl Session {
    /// Sends the KNOCK, asking for an acknowledgement (`ACK`: an allow is answered with
    /// the session length, which times the renewals). No renewals yet: see
    /// [`Session::renew_every`].
    fn knock(knocker: Knocker, app: &str, key_file: &Path) -> Result<Self> {
        let opened = knocker.send(app, flags::KNOCK | flags::ACK)?;
        Ok(Session {
            knocker: Arc::new(knocker),
            app: app.to_owned(),
            opened,
            key_file: key_file.to_owned(),
            stop_renewing: None,
            renewer: None,
        })
    }

    /// Waits up to `wait` for the gateway's signed reply to the opening KNOCK.
    fn reply(&self, wait: Duration) -> Result<Option<Reply>> {
        crate::reply_wait::wait_reply(self.knocker.socket(), &self.opened.reply_key, wait)
    }

    /// Starts renewing every `every` (a fresh posture report first, when enrolled).
    fn renew_every(&mut self, every: Duration) -> Result<()> {
        let (stop_renewing, stop) = mpsc::channel::<()>();
        let knocker = Arc::clone(&self.knocker);
        let app = self.app.clone();
        let key_file = self.key_file.clone();
        let renewer = std::thread::Builder::new()
            .name("renew".into())
            .spawn(move || {
                // Any message or a dropped sender ends the loop; only a timeout renews.
                while let Err(mpsc::RecvTimeoutError::Timeout) = stop.recv_timeout(every) {
                    refresh_posture(&key_file);
                    if let Err(e) = knocker.send(&app, flags::RENEW) {
                        eprintln!("warning: renewing the session for {app} failed: {e:#}");
                    }
                }
            })
            .context("start the renewal thread")?;
        self.stop_renewing = Some(stop_renewing);
        self.renewer = Some(renewer);
        Ok(())
    }

    /// Stops renewing and sends the CLOSE knock.
    fn close(mut self) -> Result<()> {
        // The renewer may be inside a send; joining first means no RENEW can follow the
        // CLOSE (which would open a new session right after it).
        drop(self.stop_renewing.take());
        if let Some(renewer) = self.renewer.take() {
            let _ = renewer.join();
        }
        self.knocker
            .send(&self.app, flags::CLOSE)
            .with_context(|| format!("close the session for {}", self.app))?;
        Ok(())
    }
}

/// The renewal interval: `--renew-secs`, else a third of the session length the gateway
/// acknowledged (at least 1 s), else [`DEFAULT_RENEW_SECS`].
fn renew_interval(flag: Option<u64>, reply: Option<&Reply>) -> Duration {
    let acknowledged = reply
        .filter(|r| r.decision == ReplyDecision::Allow && r.session_secs > 0)
        .map(|r| (u64::from(r.session_secs) / 3).max(1));
    Duration::from_secs(flag.or(acknowledged).unwrap_or(DEFAULT_RENEW_SECS))
}

/// A signed denial as an error with exit status 8: the gateway's sentence and its fix.
fn denial(app: &str, reply: &Reply) -> anyhow::Error {
    let fix = if reply.remediation.is_empty() {
        String::new()
    } else {
        format!("; fix: {}", reply.remediation)
    };
    Fix::new(
        DENIED,
        format!(
            "the gateway denied {app} ({}): {}{fix}",
            reply.reason, reply.message
        ),
    )
    .into()
}

/// POSTURE REFRESH CALL SITE (before every renewal). When this device is enrolled with a
/// controller (`controller.json` beside the key), a fresh posture report (collected as
/// `postern posture report` does, with posture.toml's settings) reaches the controller
/// before the RENEW, so the gateway judges the renewal on current posture. A failure is a
/// warning on stderr (never stdout: it belongs to the command or the ssh channel); the
/// renewal is still sent and the gateway decides.
fn refresh_posture(key_file: &Path) {
    let enrolled = postern_client::api_client::ControllerConfig::path_beside(key_file).is_file();
    if !enrolled {
        return;
    }
    let collect = crate::posture_cmd::CollectArgs {
        // The same hidden test hook as `postern posture --root` (a fixture tree).
        root: std::env::var_os("POSTERN_POSTURE_ROOT").map(PathBuf::from),
        processes: Vec::new(),
        mdm_marker: None,
        checks_dir: None,
    };
    let sent = collect.collect().and_then(|c| {
        let body = c
            .report_bytes()
            .context("the collected report does not pass the controller's checks")?;
        crate::controller_cmd::post_posture(&body, key_file)
    });
    if let Err(e) = sent {
        eprintln!("warning: fresh posture report before the renewal failed: {e:#}");
    }
}

/// Resolves the gateway (flags, else profile; ssh-proxy falls back to its HOST), loads the
/// key and sends the opening KNOCK.
fn knock_session(
    gateway_flag: Option<&str>,
    fallback_host: Option<&str>,
    app: &str,
    args: &SessionArgs,
) -> Result<Session> {
    let key_flag = args.gateway_key.as_deref();
    let target = match (
        crate::profile_cmd::resolve_gateway(gateway_flag, key_flag),
        fallback_host,
    ) {
        (Ok(t), _) => t,
        (Err(_), Some(host)) if gateway_flag.is_none() => {
            crate::profile_cmd::resolve_gateway(Some(host), key_flag)?
        }
        (Err(e), _) => return Err(e),
    };
    let key_file = crate::key_path(args.key.clone())?;
    let knocker = Knocker::new(
        &target.gateway,
        &target.gateway_key,
        &key_file,
        args.allow_ip,
    )?;
    Session::knock(knocker, app, &key_file)
}

/// The signals that end a session (and are passed on to a running command).
fn session_signals() -> Result<Signals> {
    Signals::new([SIGINT, SIGTERM, SIGHUP]).context("install the SIGINT/SIGTERM/SIGHUP handlers")
}

/// `postern connect`: returns the exit status to end the process with.
pub(crate) fn connect(args: ConnectArgs) -> Result<i32> {
    // Handlers first: a Ctrl-C right after the knock must still close the session.
    let mut signals = session_signals()?;
    let mut session = knock_session(args.gateway.as_deref(), None, &args.app, &args.session)?;
    let reply = session.reply(Duration::from_millis(args.wait_reply))?;
    if let Some(r) = reply.as_ref().filter(|r| r.decision == ReplyDecision::Deny) {
        return Err(denial(&args.app, r));
    }
    let every = renew_interval(args.session.renew_secs, reply.as_ref());
    session.renew_every(every)?;
    let code = match args.command.split_first() {
        None => {
            eprintln!(
                "session for {} open; renewing every {} s; Ctrl-C closes it",
                args.app,
                every.as_secs()
            );
            // Blocks until one of the registered signals arrives.
            let _ = signals.forever().next();
            0
        }
        Some((program, rest)) => match run_command(program, rest, signals) {
            Ok(code) => code,
            Err(e) => {
                let closed = session.close();
                if let Err(c) = closed {
                    eprintln!("warning: {c:#}");
                }
                return Err(e);
            }
        },
    };
    session.close()?;
    Ok(code)
}

/// Runs `program rest...` with this process's stdin/stdout/stderr, passing on the session
/// signals, and returns its exit status (128+N when signal N ended it).
fn run_command(program: &str, rest: &[String], mut signals: Signals) -> Result<i32> {
    let mut child = Command::new(program)
        .args(rest)
        .spawn()
        .with_context(|| format!("start {program:?} (is it installed and on PATH?)"))?;
    let pid = rustix::process::Pid::from_raw(child.id() as i32)
        .context("the child's pid is a positive number")?;
    let handle = signals.handle();
    // Signals for us are meant for the command: pass them on; the session closes when the
    // command exits.
    let forwarder = std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            for sig in signals.forever() {
                if let Some(signal) = rustix::process::Signal::from_named_raw(sig) {
                    let _ = rustix::process::kill_process(pid, signal);
                }
            }
        })
        .context("start the signal thread")?;
    let status = child
        .wait()
        .with_context(|| format!("wait for {program:?}"));
    handle.close();
    let _ = forwarder.join();
    let status = status?;
    Ok(exit_code(status))
}

/// The shell's convention: the exit code, or 128+N when signal N ended the process.
fn exit_code(status: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(1)
}

/// `postern ssh-proxy`.
pub(crate) fn ssh_proxy(args: SshProxyArgs) -> Result<()> {
    let signals = session_signals()?;
    let target = resolve_app(&args.host, args.port)?;
    let mut session = knock_session(
        args.gateway.as_deref(),
        Some(&args.host),
        &args.app,
        &args.session,
    )?;
    // No wait for a reply before connecting: the pinhole opens in milliseconds, and an
    // acknowledgement arriving meanwhile waits in the socket until the port accepts.
    let stream = match wait_for_port(target, Duration::from_millis(args.wait_ms)) {
        Ok(s) => s,
        Err(e) => {
            if let Ok(Some(r)) = session.reply(Duration::from_millis(100)) {
                if r.decision == ReplyDecision::Deny {
                    return Err(denial(&args.app, &r));
                }
            }
            if let Err(c) = session.close() {
                eprintln!("warning: {c:#}");
            }
            return Err(e.context(format!(
                "knocked for app {:?} but {target} did not accept within {} ms: check the app \
                 name (--app), the gateway key and this machine's clock",
                args.app, args.wait_ms
            )));
        }
    };
    let reply = session.reply(Duration::from_millis(1))?;
    session.renew_every(renew_interval(args.session.renew_secs, reply.as_ref()))?;
    let result = splice(stream, signals);
    session.close()?;
    result
}

/// HOST PORT → the first address (ssh passes a host name or an address).
fn resolve_app(host: &str, port: u16) -> Result<SocketAddr> {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    (bare, port)
        .to_socket_addrs()
        .with_context(|| format!("HOST {host:?}: cannot resolve"))?
        .next()
        .with_context(|| format!("HOST {host:?}: no address found"))
}

/// Connects to `target`, retrying until `within` has passed: the pinhole opens a few
/// milliseconds after the knock, and until then the dark port drops the SYN.
fn wait_for_port(target: SocketAddr, within: Duration) -> Result<TcpStream> {
    let deadline = Instant::now() + within;
    let mut attempt = CONNECT_ATTEMPT_FIRST;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            bail!("no connection to {target}");
        }
        match TcpStream::connect_timeout(&target, attempt.min(left)) {
            Ok(s) => return Ok(s),
            Err(e) if Instant::now() + CONNECT_RETRY_PAUSE >= deadline => {
                return Err(e).with_context(|| format!("connect to {target}"));
            }
            Err(_) => {
                std::thread::sleep(CONNECT_RETRY_PAUSE);
                attempt = (attempt * 2).min(CONNECT_ATTEMPT_CAP);
            }
        }
    }
}

/// Why the splice ended.
enum SpliceEnd {
    /// The remote side closed (or the connection failed).
    Remote(std::io::Result<()>),
    /// Our stdin reached end of file (the write half is shut down; the read half goes on).
    StdinEof,
    /// A session signal (ssh sends SIGHUP when it exits).
    Signal,
}

/// Copies stdin → `stream` and `stream` → stdout until the remote closes or a signal
/// arrives. Unflushed output never waits: every chunk is flushed as it comes.
fn splice(stream: TcpStream, mut signals: Signals) -> Result<()> {
    let (tx, rx) = mpsc::channel::<SpliceEnd>();
    let mut upstream = stream.try_clone().context("clone the TCP socket")?;
    let mut downstream = stream;
    {
        let tx = tx.clone();
        std::thread::Builder::new()
            .name("stdin".into())
            .spawn(move || {
                let stdin = std::io::stdin();
                let copied = pump(&mut stdin.lock(), &mut upstream);
                let _ = upstream.shutdown(Shutdown::Write);
                let _ = tx.send(match copied {
                    Ok(()) => SpliceEnd::StdinEof,
                    Err(e) => SpliceEnd::Remote(Err(e)),
                });
            })
            .context("start the stdin thread")?;
    }
    {
        let tx = tx.clone();
        std::thread::Builder::new()
            .name("stdout".into())
            .spawn(move || {
                let stdout = std::io::stdout();
                let copied = pump(&mut downstream, &mut stdout.lock());
                let _ = tx.send(SpliceEnd::Remote(copied));
            })
            .context("start the stdout thread")?;
    }
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if signals.forever().next().is_some() {
                let _ = tx.send(SpliceEnd::Signal);
            }
        })
        .context("start the signal thread")?;
    // Threads still blocked in read() end with the process.
    loop {
        match rx.recv() {
            Ok(SpliceEnd::StdinEof) => continue,
            Ok(SpliceEnd::Remote(result)) => return result.context("the connection failed"),
            Ok(SpliceEnd::Signal) | Err(_) => return Ok(()),
        }
    }
}

/// Copies until end of file, flushing after every chunk.
fn pump(from: &mut impl Read, to: &mut impl Write) -> std::io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => return to.flush(),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        to.write_all(&buf[..n])?;
        to.flush()?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    #[test]
    fn exit_codes_follow_the_shell_convention() {
        let status = |script: &str| {
            Command::new("sh")
                .args(["-c", script])
                .status()
                .expect("sh runs")
        };
        assert_eq!(exit_code(status("exit 0")), 0);
        assert_eq!(exit_code(status("exit 7")), 7);
        assert_eq!(exit_code(status("kill -TERM $$")), 128 + 15);
    }

    #[test]
    fn the_renewal_interval_comes_from_the_flag_then_the_acknowledged_lease() {
        let reply = |decision, session_secs| Reply {
            decision,
            reason: "granted".into(),
            message: String::new(),
            remediation: String::new(),
            session_secs,
        };
        let secs = |d: Duration| d.as_secs();
        assert_eq!(secs(renew_interval(None, None)), DEFAULT_RENEW_SECS);
        assert_eq!(secs(renew_interval(Some(5), None)), 5);
        let ack = reply(ReplyDecision::Allow, 90);
        assert_eq!(secs(renew_interval(None, Some(&ack))), 30);
        assert_eq!(
            secs(renew_interval(Some(5), Some(&ack))),
            5,
            "the flag wins"
        );
        let short = reply(ReplyDecision::Allow, 2);
        assert_eq!(secs(renew_interval(None, Some(&short))), 1, "at least 1 s");
        let unstated = reply(ReplyDecision::Allow, 0);
        assert_eq!(
            secs(renew_interval(None, Some(&unstated))),
            DEFAULT_RENEW_SECS
        );
        let deny = reply(ReplyDecision::Deny, 0);
        assert_eq!(secs(renew_interval(None, Some(&deny))), DEFAULT_RENEW_SECS);
    }

    #[test]
    fn a_denial_carries_status_8_the_reason_and_the_fix() {
        let reply = Reply {
            decision: ReplyDecision::Deny,
            reason: "policy_denied".into(),
            message: "disk encryption required".into(),
            remediation: "enable LUKS".into(),
            session_secs: 0,
        };
        let err = denial("web", &reply);
        assert_eq!(postern_client::exit::status_of(&err), DENIED);
        assert_eq!(
            err.to_string(),
            "the gateway denied web (policy_denied): disk encryption required; fix: enable LUKS"
        );
    }

    #[test]
    fn pump_copies_everything_and_flushes() {
        let data: Vec<u8> = (0..200_000u32).map(|i| i as u8).collect();
        let mut out = Vec::new();
        pump(&mut data.as_slice(), &mut out).expect("copy");
        assert_eq!(out, data);
    }

    #[test]
    fn waiting_for_a_port_connects_once_it_listens_and_gives_up_in_time() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
        let open = listener.local_addr().expect("addr");
        wait_for_port(open, Duration::from_millis(500)).expect("a listening port connects");
        drop(listener);
        // Nothing listens any more: refused, retried, and given up after the bound.
        let started = Instant::now();
        let err = wait_for_port(open, Duration::from_millis(200)).expect_err("closed port");
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(190) && took < Duration::from_secs(2),
            "{took:?}"
        );
        assert!(format!("{err:#}").contains(&open.to_string()), "{err:#}");
    }

    #[test]
    fn app_hosts_resolve_with_and_without_brackets() {
        assert_eq!(
            resolve_app("127.0.0.1", 22).expect("v4").to_string(),
            "127.0.0.1:22"
        );
        assert_eq!(
            resolve_app("[::1]", 22).expect("v6").to_string(),
            "[::1]:22"
        );
        assert_eq!(
            resolve_app("::1", 22).expect("v6 bare").to_string(),
            "[::1]:22"
        );
    }
}
