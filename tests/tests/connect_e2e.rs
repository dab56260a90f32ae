//! `postern connect` and `postern ssh-proxy` end to end: sessions that live as long as a
//! command or an ssh connection, renewed by RENEW re-knocks and closed by a CLOSE knock.
//!
//! Owns: (a) `postern connect APP -- CMD` keeping a short-lived gateway session alive for
//! more than three session lengths while CMD streams through the app, and the session
//! closing (a second live flow dies, the gateway audits `closed`) within a second of CMD
//! exiting; (b) a real OpenSSH session (Debian's sshd started inside the gateway
//! namespace with its own temp config and keys) carried by plain `ssh` with
//! `ProxyCommand=postern ssh-proxy ...` from the client namespace, the port dark before;
//! (c) SIGTERM/SIGINT passed on to CMD and closing the session; (d) on loopback only, with
//! a test-held gateway key and a controller API, the exact KNOCK, RENEW..., CLOSE sequence
//! and a fresh posture report sent with the renewals.
//! Must not touch anything outside its lab: sshd listens only on the gateway namespace's
//! lab address, and no sshd in the root namespace is used.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use postern_e2e::lab::which;
use postern_e2e::{
    bin, echo_roundtrip, poll, record_timing, tcp_connect, unix_ms, Capture, Controller, Device,
    Gateway, GatewayOptions, Lab,
};
use serde_json::Value;

const USER: &str = "alice";
/// Short gateway timeouts: without renewals a session dies after SESSION_SECS.
const PINHOLE_SECS: u64 = 1;
const SESSION_SECS: u64 = 2;
/// `--renew-secs` for the client: half the session.
const RENEW_SECS: u64 = 1;

/// The SPA target `postern` knocks at.
fn spa_target(gw: &Gateway, addr: IpAddr) -> String {
    SocketAddr::new(addr, gw.options.spa_port).to_string()
}

/// Runs `cmd` with piped output, killing it if it runs longer than `limit`.
fn run_bounded(cmd: &mut Command, limit: Duration) -> Output {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
    let pid = child.id();
    let watchdog = std::thread::spawn(move || {
        let deadline = Instant::now() + limit;
        // Bounded: polls until the deadline or until the process is gone.
        while Instant::now() < deadline {
            if !Path::new(&format!("/proc/{pid}")).exists() {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status();
        true
    });
    let out = child
        .wait_with_output()
        .unwrap_or_else(|e| panic!("wait for {cmd:?}: {e}"));
    // The process is reaped: the watchdog sees /proc/PID gone (or already fired).
    let killed = watchdog.join().unwrap_or(false);
    assert!(
        !killed,
        "{cmd:?} ran longer than {limit:?} and was killed\n--- stdout ---\n{}\n--- stderr ---\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Knock decisions from the client with the given `decision`.
fn decisions(gw: &Gateway, src: IpAddr, decision: &str) -> Vec<Value> {
    gw.knocks_from(src)
        .into_iter()
        .filter(|l| l["decision"] == decision)
        .collect()
}

/// A controller with the TCP `app` on `port` granted to alice's enrolled laptop, and a
/// gateway with the short pinhole and session timeouts of these tests.
fn start_gateway(
    lab: &Lab,
    capture: Capture,
    app: &str,
    port: u16,
) -> (Controller, Device, Gateway) {
    let ctl = Controller::start();
    ctl.add_app(app, "tcp", port);
    ctl.grant(app, USER);
    let dev = Device::keygen("laptop");
    dev.enroll(&ctl, USER);
    let mut options = GatewayOptions::new(capture);
    options.pinhole_secs = PINHOLE_SECS;
    options.session_secs = SESSION_SECS;
    let gw = Gateway::start(lab, &ctl, options);
    (ctl, dev, gw)
}

/// `postern connect APP --gateway G --gateway-key K --key F [--renew-secs N] [-- COMMAND]`
/// in the client namespace (not started).
fn postern_connect(
    lab: &Lab,
    (target, gateway_key): (&str, &str),
    dev: &Device,
    app: &str,
    renew_secs: Option<u64>,
    command: &[&str],
) -> Command {
    let mut cmd = lab.command_in(&lab.client, bin("postern"));
    cmd.arg("connect")
        .arg(app)
        .args(["--gateway", target, "--gateway-key", gateway_key, "--key"])
        .arg(&dev.key_file);
    if let Some(secs) = renew_secs {
        cmd.arg("--renew-secs").arg(secs.to_string());
    }
    if !command.is_empty() {
        cmd.arg("--").args(command);
    }
    cmd
}

#[test]
fn connect_keeps_the_session_alive_while_the_command_runs_and_closes_it_at_exit() {
    const APP: &str = "web";
    const APP_PORT: u16 = 8080;
    let lab = Lab::new();
    lab.start_echo_server(APP_PORT);
    let (_ctl, dev, mut gw) = start_gateway(&lab, Capture::Sniff, APP, APP_PORT);
    let gw_ip = lab.gateway_addr(false);
    let client_ip = lab.client_addr(false);
    let app = SocketAddr::new(gw_ip, APP_PORT);

    // CMD streams a line every 200 ms over ONE connection for 3.5 session lengths.
    let stream_ms = SESSION_SECS * 3500;
    // No --renew-secs: the interval comes from the session length in the gateway's
    // acknowledgement (a third of 2 s, at least 1 s); the 20 s fallback would let the
    // session die.
    let mut cmd = postern_connect(
        &lab,
        (&spa_target(&gw, gw_ip), &gw.public_key_text),
        &dev,
        APP,
        None,
        &[
            env!("CARGO_BIN_EXE_postern-lab-stream"),
            &app.to_string(),
            &stream_ms.to_string(),
            "200",
        ],
    );
    let logs = tempfile::Builder::new()
        .prefix("postern-connect-")
        .tempdir()
        .expect("log temp dir");
    let (out_log, err_log) = (logs.path().join("stdout"), logs.path().join("stderr"));
    cmd.stdout(postern_e2e::lab::open_append(&out_log))
        .stderr(postern_e2e::lab::open_append(&err_log));
    let started = Instant::now();
    let connect = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
    let mut connect = postern_e2e::ChildGuard::new(connect, "postern connect");

    // A second flow of the same session, opened by the test while the session is live: it
    // must keep working until CMD exits, then die with the session.
    let mut probe = poll(Duration::from_secs(2), Duration::from_millis(5), || {
        tcp_connect(&lab.client, app, Duration::from_millis(50)).ok()
    })
    .unwrap_or_else(|| panic!("no connection to {app} after `postern connect` knocked"));
    // Probe every 20 ms until the flow dies; note when each probe was sent.
    let probe_deadline = Instant::now() + Duration::from_millis(stream_ms + 10_000);
    let mut last_ok_ms = unix_ms();
    let dead_ms = loop {
        assert!(
            Instant::now() < probe_deadline,
            "the session's flow still carried data {:?} after `postern connect` started \
             (CMD streams for {stream_ms} ms)",
            started.elapsed()
        );
        let sent_at = unix_ms();
        if echo_roundtrip(&mut probe, b"probe", Duration::from_millis(500)).is_err() {
            break sent_at;
        }
        last_ok_ms = sent_at;
        std::thread::sleep(Duration::from_millis(20));
    };
    let status = poll(Duration::from_secs(3), Duration::from_millis(5), || {
        connect.exited()
    })
    .unwrap_or_else(|| {
        panic!(
            "the session's flow died after {:?} but `postern connect` did not exit within 3 s",
            started.elapsed()
        )
    });
    let out = std::fs::read_to_string(&out_log).unwrap_or_default();
    let err = std::fs::read_to_string(&err_log).unwrap_or_default();
    assert!(
        status.success(),
        "postern connect / CMD failed ({status})\n--- stdout ---\n{out}\n--- stderr ---\n{err}"
    );
    let summary: Value = serde_json::from_str(out.trim())
        .unwrap_or_else(|e| panic!("CMD printed no JSON summary ({e}): {out:?} / {err}"));
    let elapsed_ms = summary["elapsed_ms"].as_u64().expect("elapsed_ms");
    let done_ms = summary["done_ms"].as_u64().expect("done_ms");
    let lines = summary["lines"].as_u64().expect("lines");
    assert!(
        elapsed_ms >= 3 * SESSION_SECS * 1000,
        "CMD's one connection carried data for {elapsed_ms} ms: not three session lengths"
    );

    // The gateway: one grant, renewals, one close, all the same session.
    let closed = poll(Duration::from_secs(2), Duration::from_millis(10), || {
        decisions(&gw, client_ip, "closed").into_iter().next()
    })
    .unwrap_or_else(|| {
        panic!(
            "the gateway audited no `closed` decision\n{}",
            gw.diagnostics()
        )
    });
    gw.check_alive();
    assert_eq!(closed["reason"], "client_close");
    assert_eq!(closed["app"], APP);
    let granted = decisions(&gw, client_ip, "allow");
    assert!(
        granted.len() as u64 >= 3 * SESSION_SECS / RENEW_SECS,
        "expected a grant and renewals, got {} allow lines",
        granted.len()
    );
    assert!(
        granted.iter().all(|l| l["session"] == closed["session"]),
        "renewals kept ONE session: {granted:?} vs {closed}"
    );
    assert!(granted.iter().skip(1).all(|l| l["renewed"] == true));

    let close_ms = closed["ts_ms"]
        .as_u64()
        .expect("ts_ms")
        .saturating_sub(done_ms);
    assert!(
        last_ok_ms + 50 >= done_ms,
        "the session's flow died {} ms before CMD exited",
        done_ms.saturating_sub(last_ok_ms)
    );
    let flow_dead_ms = dead_ms.saturating_sub(done_ms);
    assert!(
        close_ms < 1000 && flow_dead_ms < 1000,
        "the session closed {close_ms} ms (audit) / the flow died {flow_dead_ms} ms after CMD exited"
    );
    // And new connections are not admitted: the port is dark again.
    match tcp_connect(&lab.client, app, Duration::from_millis(300)) {
        Ok(_) => panic!("the closed session's pinhole still admits new connections"),
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::TimedOut, "dark port: {e}"),
    }
    record_timing(&format!(
        "connect: session kept alive {:.1} s ({:.1} session lengths of {SESSION_SECS} s, {lines} echoed lines over one connection, {} allow lines); \
         CMD exit -> gateway `closed` {close_ms} ms, -> flow dead {flow_dead_ms} ms (20 ms probe)",
        elapsed_ms as f64 / 1000.0,
        elapsed_ms as f64 / (SESSION_SECS * 1000) as f64,
        granted.len(),
    ));
}

/// Tools of this test, with their Debian packages.
const SSH_PREREQS: &[(&str, &str)] = &[
    ("sshd", "openssh-server"),
    ("ssh", "openssh-client"),
    ("ssh-keygen", "openssh-client"),
];

fn ssh_tool(tool: &str) -> PathBuf {
    which(tool).unwrap_or_else(|| {
        let missing: Vec<String> = SSH_PREREQS
            .iter()
            .filter(|(t, _)| which(t).is_none())
            .map(|(t, p)| format!("`{t}` (Debian package {p})"))
            .collect();
        panic!(
            "missing {}: install them with `apt-get install -y openssh-server openssh-client` \
             (or run `sudo scripts/test`, which does it)",
            missing.join(", ")
        )
    })
}

fn keygen(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(name);
    let out = run_bounded(
        Command::new(ssh_tool("ssh-keygen"))
            .args(["-q", "-t", "ed25519", "-N", "", "-C", name, "-f"])
            .arg(&path),
        Duration::from_secs(10),
    );
    assert!(out.status.success(), "ssh-keygen: {}", text(&out.stderr));
    path
}

#[test]
fn ssh_proxy_carries_a_real_openssh_session_and_renews_it() {
    const APP: &str = "ssh";
    for (tool, _) in SSH_PREREQS {
        ssh_tool(tool);
    }
    let lab = Lab::new();
    let (_ctl, dev, gw) = start_gateway(&lab, Capture::Sniff, APP, 22);
    let gw_ip = lab.gateway_addr(false);
    let client_ip = lab.client_addr(false);

    // sshd in the gateway namespace, on the lab address only, with its own keys and config.
    let dir = tempfile::Builder::new()
        .prefix("postern-sshd-")
        .tempdir()
        .expect("sshd temp dir");
    let host_key = keygen(dir.path(), "host_key");
    let client_key = keygen(dir.path(), "client_key");
    let authorized = dir.path().join("authorized_keys");
    std::fs::copy(client_key.with_extension("pub"), &authorized).expect("authorized_keys");
    let config = dir.path().join("sshd_config");
    std::fs::write(
        &config,
        format!(
            "# written by connect_e2e\n\
             AuthorizedKeysFile {}\n\
             StrictModes no\n\
             PidFile none\n\
             UsePAM no\n\
             PasswordAuthentication no\n\
             KbdInteractiveAuthentication no\n\
             PermitRootLogin prohibit-password\n",
            authorized.display()
        ),
    )
    .expect("write sshd_config");
    // sshd's privilege separation directory (a path in the file system, no network).
    std::fs::create_dir_all("/run/sshd").expect("create /run/sshd");
    let sshd_log = dir.path().join("sshd.log");
    let mut sshd = Command::new(ssh_tool("sshd"));
    sshd.arg("-D")
        .arg("-e")
        .arg("-f")
        .arg(&config)
        .arg("-h")
        .arg(&host_key)
        .args(["-p", "22", "-o"])
        .arg(format!("ListenAddress={gw_ip}"));
    let mut sshd = lab.spawn_logged(&lab.gateway, &sshd, &sshd_log, &sshd_log);
    let listening = poll(Duration::from_secs(5), Duration::from_millis(10), || {
        if let Some(status) = sshd.exited() {
            panic!(
                "sshd exited ({status}):\n{}",
                std::fs::read_to_string(&sshd_log).unwrap_or_default()
            );
        }
        gw.listening_sockets()
            .contains(&format!("{gw_ip}:22"))
            .then_some(())
    });
    assert!(
        listening.is_some(),
        "sshd did not listen on {gw_ip}:22 in the gateway namespace within 5 s:\n{}",
        std::fs::read_to_string(&sshd_log).unwrap_or_default()
    );

    // Dark before the knock: the SYN gets no answer at all.
    match tcp_connect(
        &lab.client,
        SocketAddr::new(gw_ip, 22),
        Duration::from_millis(300),
    ) {
        Ok(_) => panic!("port 22 accepted a connection before any knock"),
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::TimedOut, "dark port: {e}"),
    }

    // Plain ssh, the proxy command as a user would write it in ~/.ssh/config. The remote
    // command outlives two session lengths, so only renewals keep the connection alive.
    let proxy = format!(
        "{} ssh-proxy %h %p --app {APP} --gateway-key {} --key {} --renew-secs {RENEW_SECS}",
        bin("postern").display(),
        gw.public_key_text,
        dev.key_file.display()
    );
    let hold_secs = 2 * SESSION_SECS + 1;
    let mut ssh = lab.command_in(&lab.client, ssh_tool("ssh"));
    ssh.args(["-F", "/dev/null", "-o"])
        .arg(format!("ProxyCommand={proxy}"))
        .args([
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "BatchMode=yes",
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "LogLevel=ERROR",
            "-i",
        ])
        .arg(&client_key)
        .arg(format!("root@{gw_ip}"))
        .arg(format!("echo hello; sleep {hold_secs}; echo still-here"));
    let started = Instant::now();
    let out = run_bounded(&mut ssh, Duration::from_secs(hold_secs + 20));
    let took = started.elapsed();
    assert!(
        out.status.success(),
        "ssh via ssh-proxy failed ({})\n--- stdout ---\n{}\n--- stderr ---\n{}\n--- sshd ---\n{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr),
        std::fs::read_to_string(&sshd_log).unwrap_or_default()
    );
    assert_eq!(text(&out.stdout), "hello\nstill-here\n");

    // The gateway saw a grant, renewals and the CLOSE at the end.
    let closed = poll(Duration::from_secs(2), Duration::from_millis(10), || {
        decisions(&gw, client_ip, "closed").into_iter().next()
    })
    .unwrap_or_else(|| {
        panic!(
            "the gateway audited no `closed` decision\n{}",
            gw.diagnostics()
        )
    });
    assert_eq!(
        (closed["app"].as_str(), closed["reason"].as_str()),
        (Some(APP), Some("client_close"))
    );
    let allowed = decisions(&gw, client_ip, "allow");
    assert!(
        allowed.len() >= 3 && allowed.iter().skip(1).all(|l| l["renewed"] == true),
        "expected a grant then renewals: {allowed:?}"
    );
    match tcp_connect(
        &lab.client,
        SocketAddr::new(gw_ip, 22),
        Duration::from_millis(300),
    ) {
        Ok(_) => panic!("port 22 still admits connections after ssh-proxy closed the session"),
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::TimedOut, "dark port: {e}"),
    }
    record_timing(&format!(
        "ssh-proxy: OpenSSH session of {:.1} s ({} allow lines, session {SESSION_SECS} s) carried and closed",
        took.as_secs_f64(),
        allowed.len()
    ));
}

#[test]
fn connect_passes_signals_on_and_closes_the_session() {
    const APP: &str = "web";
    const APP_PORT: u16 = 8080;
    let lab = Lab::new();
    lab.start_echo_server(APP_PORT);
    let (_ctl, dev, mut gw) = start_gateway(&lab, Capture::Udp, APP, APP_PORT);
    let gw_ip = lab.gateway_addr(true);
    let client_ip = lab.client_addr(true);
    let (target, gateway_key) = (spa_target(&gw, gw_ip), gw.public_key_text.clone());
    let connect = |command: &[&str]| {
        let mut cmd = postern_connect(
            &lab,
            (&target, &gateway_key),
            &dev,
            APP,
            Some(RENEW_SECS),
            command,
        );
        let what = format!("{cmd:?}");
        let child = cmd
            .stdout(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
        postern_e2e::ChildGuard::new(child, what)
    };

    // SIGTERM goes to COMMAND (sleep dies of it: 128+15), then the session closes.
    let mut with_command = connect(&["sleep", "30"]);
    gw.wait_knock(client_ip, 1, Duration::from_secs(3));
    let status = with_command
        .terminate(Duration::from_secs(3))
        .expect("postern connect exits after SIGTERM");
    assert_eq!(
        status.code(),
        Some(128 + 15),
        "COMMAND's status is passed on"
    );
    let closed = poll(Duration::from_secs(2), Duration::from_millis(10), || {
        let c = decisions(&gw, client_ip, "closed");
        (c.len() == 1).then_some(())
    });
    assert!(
        closed.is_some(),
        "no `closed` after SIGTERM\n{}",
        gw.diagnostics()
    );

    // Without COMMAND: Ctrl-C (SIGINT) closes the session and exits 0.
    let mut holding = connect(&[]);
    let before = gw.knocks_from(client_ip).len();
    gw.wait_knock(client_ip, before + 1, Duration::from_secs(3));
    std::thread::sleep(Duration::from_millis(100));
    Command::new("kill")
        .args(["-INT", &holding.id().to_string()])
        .status()
        .expect("kill -INT");
    let status = poll(Duration::from_secs(3), Duration::from_millis(10), || {
        holding.exited()
    })
    .expect("postern connect exits after SIGINT");
    assert_eq!(status.code(), Some(0));
    let closed = poll(Duration::from_secs(2), Duration::from_millis(10), || {
        (decisions(&gw, client_ip, "closed").len() == 2).then_some(())
    });
    assert!(
        closed.is_some(),
        "no `closed` after SIGINT\n{}",
        gw.diagnostics()
    );
    assert!(
        decisions(&gw, client_ip, "deny").is_empty(),
        "every CLOSE found its session: {:?}",
        gw.knocks_from(client_ip)
    );
}

/// Runs on loopback only (no lab): the "gateway" is a UDP socket of this test holding a
/// gateway key, so it can open every datagram `postern connect` sends; the controller's
/// HTTPS API is on 127.0.0.1 too.
#[test]
fn connect_sends_knock_renews_with_fresh_posture_and_close() {
    use postern_protocol::keys::{DevicePublicKey, GatewaySecret};
    use postern_protocol::packet::{self, flags};

    let ctl = Controller::start_with_api();
    let url = ctl.api_url();
    ctl.admin(&["user", "add", USER]);
    let invite: Value =
        serde_json::from_str(&ctl.admin(&["device", "invite", "laptop", "--user", USER, "--json"]))
            .expect("invite json");
    let token = invite["token"].as_str().expect("token in invite json");
    let home = tempfile::tempdir().expect("home temp dir");
    let postern = |args: &[&str]| {
        let mut cmd = Command::new(bin("postern"));
        cmd.args(args)
            .env("HOME", home.path())
            .env_remove("XDG_CONFIG_HOME")
            .env_remove("POSTERN_PROFILE");
        cmd
    };
    let out = run_bounded(
        &mut postern(&[
            "enroll",
            "--controller",
            &url,
            "--token",
            token,
            "--generate",
        ]),
        Duration::from_secs(20),
    );
    assert!(out.status.success(), "enroll: {}", text(&out.stderr));
    let out = run_bounded(&mut postern(&["pubkey"]), Duration::from_secs(10));
    let device = DevicePublicKey::from_text(text(&out.stdout).trim()).expect("device public key");
    let posture_report = || -> Value {
        serde_json::from_str::<Value>(&ctl.admin(&["device", "posture", "laptop", "--json"]))
            .expect("device posture json")["report"]
            .clone()
    };
    assert_eq!(posture_report(), Value::Null, "no report before connect");

    let mut seed = [0u8; 32];
    getrandom::getrandom(&mut seed).expect("OS randomness");
    let gateway = GatewaySecret::from_bytes(seed);
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind a loopback UDP socket");
    socket
        .set_read_timeout(Some(Duration::from_millis(100)))
        .expect("read timeout");
    let target = socket.local_addr().expect("local addr").to_string();
    let started_secs = unix_ms() / 1000;
    let mut connect = postern(&[
        "connect",
        "web",
        "--gateway",
        &target,
        "--gateway-key",
        &gateway.public_key().to_text(),
        "--renew-secs",
        "1",
        "--wait-reply",
        "0",
        "--",
        "sleep",
        "2.5",
    ]);
    let what = format!("{connect:?}");
    let child = connect
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
    let mut child = postern_e2e::ChildGuard::new(child, what);

    // Every datagram until `postern connect` has exited and a last read timed out.
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut buf = [0u8; 2048];
    loop {
        assert!(Instant::now() < deadline, "postern connect ran past 15 s");
        match socket.recv(&mut buf) {
            Ok(n) => {
                let knock = packet::open(&buf[..n], &gateway)
                    .and_then(|o| o.verify(&device))
                    .expect("every datagram is a knock signed by the device");
                assert_eq!(knock.app, "web");
                seen.push(knock.flags);
            }
            Err(_) if child.exited().is_some() => break,
            Err(_) => {}
        }
    }
    let status = child.exited().expect("exited");
    assert!(status.success(), "postern connect: {status}");
    let renewals = seen.iter().filter(|&&f| f == flags::RENEW).count();
    assert!(
        seen.first() == Some(&(flags::KNOCK | flags::ACK))
            && seen.last() == Some(&flags::CLOSE)
            && renewals >= 2
            && renewals + 2 == seen.len(),
        "expected KNOCK|ACK, RENEW x2 or more, CLOSE; got flags {seen:?}"
    );
    // A fresh posture report reached the controller before the renewals.
    let report = posture_report();
    let received = report["received_at"].as_str().unwrap_or_default();
    assert!(
        !report.is_null(),
        "the renewals sent no posture report to the controller"
    );
    record_timing(&format!(
        "connect (loopback): flags {seen:?} over 2.5 s with --renew-secs 1; posture report received at {received} (connect started at unix {started_secs})"
    ));
}
