//! Process fixtures for the lab: the controller, the gateway and enrolled devices.
//!
//! Owns: one temp directory per fixture (SQLite registry, Unix socket, keys, config, logs),
//! starting the real binaries (`postern-controller`, `postern-gateway`, `postern`) with the
//! CLIs of the cross-crate contract, waiting until they are ready, and reading the gateway's
//! audit log. Must not touch: anything outside its temp directories and the lab's
//! namespaces; the root namespace's firewall (the gateway only ever runs inside the lab's
//! gateway namespace).

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use postern_protocol::keys::{DeviceSigningKey, GatewayPublicKey};
use serde_json::Value;
use tempfile::TempDir;

use crate::lab::{bin, poll, run, run_ok, ChildGuard, Lab};

/// How long a fixture may take to become ready.
const READY_TIMEOUT: Duration = Duration::from_secs(5);

/// The controller daemon (`postern-controller serve`) in the root namespace, with its own
/// SQLite registry. The gateway reaches it through the Unix socket, which works across
/// network namespaces because it lives in the file system.
#[derive(Debug)]
pub struct Controller {
    child: ChildGuard,
    db: PathBuf,
    socket: PathBuf,
    log: PathBuf,
    /// The `serve` arguments after `--socket`, for [`Controller::restart`].
    serve_args: Vec<String>,
    /// The network namespace `serve` runs in (`None`: the test's own).
    netns: Option<String>,
    /// How many times `serve` was started (each logs its own listening line).
    starts: usize,
    dir: TempDir,
}

impl Controller {
    /// Starts `postern-controller --db DIR/registry.db serve --socket DIR/controller.sock`
    /// and waits for the socket to appear.
    pub fn start() -> Controller {
        Controller::start_with(&[])
    }

    /// Like [`Controller::start`], with the HTTPS client API on an ephemeral loopback
    /// port (see [`Controller::api_url`]).
    pub fn start_with_api() -> Controller {
        Controller::start_with(&["--api", "127.0.0.1:0"])
    }

    /// `https://127.0.0.1:PORT` of a controller started with [`Controller::start_with_api`],
    /// read from its `api listening on ADDR` log line.
    pub fn api_url(&self) -> String {
        let addr = poll(READY_TIMEOUT, Duration::from_millis(10), || {
            self.log_text()
                .lines()
                .find_map(|l| l.split("api listening on ").nth(1))
                .map(|rest| rest.split_whitespace().next().unwrap_or("").to_owned())
        })
        .unwrap_or_else(|| {
            panic!(
                "the controller logged no `api listening on ADDR` within {READY_TIMEOUT:?}:\n{}",
                self.log_text()
            )
        });
        format!("https://{addr}")
    }

    /// Starts `serve --gateway-listen LISTEN` inside namespace `ns` (the TLS control
    /// channel for remote gateways listens there, e.g. on that namespace's 127.0.0.1), and
    /// waits for its `gateway channel listening on` log line. The Unix socket and the
    /// registry stay in the temp directory as usual.
    pub fn start_in_namespace_with_gateway_listen(
        ns: &crate::lab::Netns,
        listen: &str,
    ) -> Controller {
        Controller::start_in(Some(ns.name()), &["--gateway-listen", listen])
    }

    fn start_with(serve_args: &[&str]) -> Controller {
        Controller::start_in(None, serve_args)
    }

    fn start_in(netns: Option<&str>, serve_args: &[&str]) -> Controller {
        let dir = tempfile::Builder::new()
            .prefix("postern-ctl-")
            .tempdir()
            .expect("controller temp dir");
        let db = dir.path().join("registry.db");
        let socket = dir.path().join("controller.sock");
        let log = dir.path().join("controller.log");
        let serve_args: Vec<String> = serve_args.iter().map(|a| (*a).to_owned()).collect();
        let netns = netns.map(str::to_owned);
        let child = Controller::spawn_serve(netns.as_deref(), &db, &socket, &log, &serve_args);
        let mut ctl = Controller {
            child,
            db,
            socket,
            log,
            serve_args,
            netns,
            starts: 1,
            dir,
        };
        ctl.wait_serving();
        ctl
    }

    fn spawn_serve(
        netns: Option<&str>,
        db: &Path,
        socket: &Path,
        log: &Path,
        serve_args: &[String],
    ) -> ChildGuard {
        let mut cmd = match netns {
            // `ip netns exec` execs the program: the child's pid stays the controller's.
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(bin("postern-controller"));
                c
            }
            None => Command::new(bin("postern-controller")),
        };
        cmd.arg("--db")
            .arg(db)
            .arg("serve")
            .arg("--socket")
            .arg(socket)
            .args(serve_args)
            .stdin(std::process::Stdio::null())
            .stdout(crate::lab::open_append(log))
            .stderr(crate::lab::open_append(log));
        let what = format!("{cmd:?}");
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
        ChildGuard::new(child, what)
    }

    /// Waits until the socket accepts a connection (a stale socket file left by a killed
    /// controller does not count) and, with `--gateway-listen`, until this start logged
    /// `gateway channel listening on`.
    fn wait_serving(&mut self) {
        self.wait_socket();
        if self.serve_args.iter().any(|a| a == "--gateway-listen") {
            let starts = self.starts;
            let ready = poll(READY_TIMEOUT, Duration::from_millis(10), || {
                (self
                    .log_text()
                    .matches("gateway channel listening on")
                    .count()
                    >= starts)
                    .then_some(())
            });
            if ready.is_none() {
                panic!(
                    "postern-controller logged no `gateway channel listening on` within {READY_TIMEOUT:?}:\n{}",
                    self.log_text()
                );
            }
        }
    }

    fn wait_socket(&mut self) {
        let ready = poll(READY_TIMEOUT, Duration::from_millis(10), || {
            if let Some(status) = self.child.exited() {
                panic!(
                    "postern-controller serve exited early ({status}):\n{}",
                    self.log_text()
                );
            }
            std::os::unix::net::UnixStream::connect(&self.socket)
                .ok()
                .map(drop)
        });
        if ready.is_none() {
            panic!(
                "postern-controller serve did not accept on {} within {READY_TIMEOUT:?}:\n{}",
                self.socket.display(),
                self.log_text()
            );
        }
    }

    /// SIGKILL, as a crash would; waits until the process is gone. The registry and the
    /// (now stale) socket file stay for [`Controller::restart`].
    pub fn kill(&mut self) {
        run_ok(Command::new("kill").args(["-9", &self.child.id().to_string()]));
        let gone = poll(Duration::from_secs(5), Duration::from_millis(10), || {
            self.child.exited()
        });
        assert!(
            gone.is_some(),
            "postern-controller survived SIGKILL for 5 s"
        );
    }

    /// Starts `serve` again on the same registry and socket (after [`Controller::kill`])
    /// and waits until it accepts connections.
    pub fn restart(&mut self) {
        assert!(
            self.child.exited().is_some(),
            "Controller::restart: the controller is still running (kill it first)"
        );
        self.starts += 1;
        self.child = Controller::spawn_serve(
            self.netns.as_deref(),
            &self.db,
            &self.socket,
            &self.log,
            &self.serve_args,
        );
        self.wait_serving();
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub fn db(&self) -> &Path {
        &self.db
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The controller daemon's stdout+stderr so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Runs an admin command (`postern-controller --db DB ARGS...`), returning its output
    /// whatever the exit status.
    pub fn try_admin(&self, args: &[&str]) -> Output {
        run(Command::new(bin("postern-controller"))
            .arg("--db")
            .arg(&self.db)
            .args(args))
    }

    /// Runs an admin command that must succeed; returns its stdout.
    pub fn admin(&self, args: &[&str]) -> String {
        run_ok(
            Command::new(bin("postern-controller"))
                .arg("--db")
                .arg(&self.db)
                .args(args),
        )
    }

    /// `device add NAME --user USER --key PUBLIC`; returns the printed device id.
    pub fn add_device(&self, name: &str, user: &str, public_key: &str) -> String {
        self.admin(&["device", "add", name, "--user", user, "--key", public_key])
            .trim()
            .to_owned()
    }

    /// `app add NAME --protocol PROTO --port PORT`.
    pub fn add_app(&self, name: &str, protocol: &str, port: u16) {
        self.admin(&[
            "app",
            "add",
            name,
            "--protocol",
            protocol,
            "--port",
            &port.to_string(),
        ]);
    }

    /// `grant add --app APP --user USER`.
    pub fn grant(&self, app: &str, user: &str) {
        self.admin(&["grant", "add", "--app", app, "--user", user]);
    }

    /// `device revoke NAME_OR_ID`.
    pub fn revoke(&self, name_or_id: &str) {
        self.admin(&["device", "revoke", name_or_id]);
    }

    /// `gateway add NAME --json`: the one-time enrollment token for a remote gateway.
    pub fn gateway_token(&self, name: &str) -> String {
        let out = self.admin(&["gateway", "add", name, "--json"]);
        let json: Value = serde_json::from_str(out.trim()).unwrap_or_else(|e| {
            panic!("`gateway add {name} --json` printed no JSON ({e}): {out:?}")
        });
        json["token"]
            .as_str()
            .unwrap_or_else(|| panic!("`gateway add {name} --json` has no token: {json}"))
            .to_owned()
    }
}

/// A device key made by the real client (`postern keygen --key FILE`).
#[derive(Debug)]
pub struct Device {
    pub name: String,
    pub key_file: PathBuf,
    /// `ed25519:...`
    pub public_key: String,
    _dir: TempDir,
}

impl Device {
    /// Runs `postern keygen --key DIR/NAME.key` and keeps the printed public key.
    pub fn keygen(name: &str) -> Device {
        let dir = tempfile::Builder::new()
            .prefix("postern-dev-")
            .tempdir()
            .expect("device temp dir");
        let key_file = dir.path().join(format!("{name}.key"));
        let out = run_ok(
            Command::new(bin("postern"))
                .arg("keygen")
                .arg("--key")
                .arg(&key_file),
        );
        let public_key = out
            .lines()
            .map(str::trim)
            .find(|l| l.starts_with("ed25519:"))
            .unwrap_or_else(|| panic!("`postern keygen` printed no ed25519:... line: {out:?}"))
            .to_owned();
        Device {
            name: name.to_owned(),
            key_file,
            public_key,
            _dir: dir,
        }
    }

    /// Enrolls this device for `user` and grants `app` (which must exist) to `user`.
    pub fn enroll(&self, ctl: &Controller, user: &str) -> String {
        ctl.add_device(&self.name, user, &self.public_key)
    }
}

/// A device key held in the test process, for crafting packets with
/// `postern_protocol::packet::seal`.
#[derive(Debug)]
pub struct InProcessDevice {
    pub name: String,
    pub key: DeviceSigningKey,
}

impl InProcessDevice {
    pub fn random(name: &str) -> InProcessDevice {
        let mut seed = [0u8; 32];
        getrandom::getrandom(&mut seed).expect("OS randomness");
        InProcessDevice {
            name: name.to_owned(),
            key: DeviceSigningKey::from_seed(seed),
        }
    }

    pub fn public_text(&self) -> String {
        self.key.public_key().to_text()
    }
}

/// A sealed, signed knock for `app` at `timestamp_ms`, claiming (and signing) the source
/// address `claimed` as the real client does, with a fresh random nonce and ephemeral key.
/// The one place the lab builds knocks in-process (tests that send exact bytes: replays,
/// tampering, old timestamps, floods, benchmarks).
pub fn seal_knock(
    key: &DeviceSigningKey,
    gateway: &GatewayPublicKey,
    app: &str,
    timestamp_ms: u64,
    claimed: IpAddr,
) -> Vec<u8> {
    seal_knock_with_reply_key(key, gateway, app, timestamp_ms, claimed).0
}

/// [`seal_knock`], also returning the key that opens the gateway's signed reply to it
/// (the real client keeps the same one while it waits).
pub fn seal_knock_with_reply_key(
    key: &DeviceSigningKey,
    gateway: &GatewayPublicKey,
    app: &str,
    timestamp_ms: u64,
    claimed: IpAddr,
) -> (Vec<u8>, postern_protocol::reply::ReplyKey) {
    use postern_protocol::packet::{flags, seal, Knock, SealRandomness};
    let mut nonce = [0u8; 16];
    let mut ephemeral = [0u8; 32];
    getrandom::getrandom(&mut nonce).expect("OS randomness");
    getrandom::getrandom(&mut ephemeral).expect("OS randomness");
    let knock = Knock {
        device: key.public_key().device_id(),
        timestamp_ms,
        nonce,
        flags: flags::KNOCK,
        app: postern_protocol::AppName::new(app).expect("a valid app name"),
        claimed_addr: Some(claimed),
        posture_digest: [0; 32],
    };
    let datagram = seal(
        &knock,
        key,
        gateway,
        SealRandomness {
            ephemeral_secret: ephemeral,
        },
    )
    .expect("seal a valid knock");
    let reply_key = postern_protocol::reply::ReplyKey::new(ephemeral, *gateway, &datagram, nonce)
        .expect("a sealed knock binds a reply key");
    (datagram, reply_key)
}

/// How the gateway receives knocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Capture {
    /// AF_PACKET capture, no listening socket.
    Sniff,
    /// A bound UDP socket.
    Udp,
}

impl Capture {
    pub fn as_str(self) -> &'static str {
        match self {
            Capture::Sniff => "sniff",
            Capture::Udp => "udp",
        }
    }
}

/// Gateway settings a test may change; the defaults are short for fast tests.
#[derive(Debug, Clone)]
pub struct GatewayOptions {
    pub capture: Capture,
    pub spa_port: u16,
    pub pinhole_secs: u64,
    pub session_secs: u64,
    pub max_skew_secs: u64,
    pub open_ports: Vec<String>,
    /// Reuse this gateway key (e.g. to restart "the same gateway") instead of a new one.
    pub key_file: Option<PathBuf>,
    /// The replay state directory; `None`: a fresh `state/` in the gateway's temp dir.
    pub state_dir: Option<PathBuf>,
    /// Test-only clock offset file (`POSTERN_GATEWAY_CLOCK_OFFSET_FILE`): signed ms.
    pub clock_offset_file: Option<PathBuf>,
    /// Extra TOML lines appended to the config (e.g. `crypto_budget = 100`).
    pub extra_config: String,
    /// `true` (default): [`Gateway::start`] waits for a `sync` audit line (a snapshot from
    /// the controller). `false`: only for the `start` line (e.g. the controller is down).
    pub wait_for_sync: bool,
    /// `Some("HOST:PORT")`: the config says `controller = ...` (TLS control channel)
    /// instead of `controller_socket`.
    pub controller_tls: Option<String>,
    /// With `controller_tls`: [`Gateway::start`] runs `postern-gateway enroll --token T`
    /// in the gateway namespace before `run` (`None`: the state dir is already enrolled,
    /// or deliberately not).
    pub enroll_token: Option<String>,
}

impl GatewayOptions {
    pub fn new(capture: Capture) -> GatewayOptions {
        GatewayOptions {
            capture,
            spa_port: 62201,
            pinhole_secs: 2,
            session_secs: 4,
            max_skew_secs: 30,
            open_ports: Vec::new(),
            key_file: None,
            state_dir: None,
            clock_offset_file: None,
            extra_config: String::new(),
            wait_for_sync: true,
            controller_tls: None,
            enroll_token: None,
        }
    }
}

/// `postern-gateway status --config CONFIG --json`: (exit code, parsed JSON). Reads the
/// status file only (no connection), so it runs in the test's own namespace.
pub fn gateway_status(config: &Path) -> (i32, Value) {
    let out = Command::new(bin("postern-gateway"))
        .arg("status")
        .arg("--config")
        .arg(config)
        .arg("--json")
        .output()
        .expect("run postern-gateway status");
    let text = String::from_utf8_lossy(&out.stdout);
    let json = serde_json::from_str(text.trim()).unwrap_or_else(|e| {
        panic!(
            "`postern-gateway status --json` printed no JSON ({e}): {text:?} / {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code().unwrap_or(-1), json)
}

/// `postern-gateway run` inside the lab's gateway namespace.
#[derive(Debug)]
pub struct Gateway {
    child: ChildGuard,
    pub options: GatewayOptions,
    pub config: PathBuf,
    pub audit_log: PathBuf,
    pub stderr_log: PathBuf,
    /// `x25519:...`
    pub public_key_text: String,
    pub public_key: GatewayPublicKey,
    ns: String,
    dir: TempDir,
}

/// Name of the gateway's nftables table in the tests.
pub const TABLE: &str = "postern";

impl Gateway {
    /// Generates a gateway key (`postern-gateway keygen`), writes the TOML config, starts
    /// the gateway in the lab's gateway namespace, and waits until its table `inet postern`
    /// exists and it has loaded a registry snapshot (an audit line `"event":"sync"`).
    pub fn start(lab: &Lab, ctl: &Controller, options: GatewayOptions) -> Gateway {
        let dir = tempfile::Builder::new()
            .prefix("postern-gw-")
            .tempdir()
            .expect("gateway temp dir");
        let key_file = options
            .key_file
            .clone()
            .unwrap_or_else(|| dir.path().join("gateway.key"));
        let out = if options.key_file.is_some() {
            // The same line `keygen` prints, from the existing key.
            let text = std::fs::read_to_string(&key_file)
                .unwrap_or_else(|e| panic!("read gateway key {}: {e}", key_file.display()));
            postern_protocol::keys::GatewaySecret::from_text(&text)
                .unwrap_or_else(|e| panic!("gateway key {}: {e}", key_file.display()))
                .public_key()
                .to_text()
        } else {
            run_ok(
                Command::new(bin("postern-gateway"))
                    .arg("keygen")
                    .arg("--out")
                    .arg(&key_file),
            )
        };
        let state_dir = options
            .state_dir
            .clone()
            .unwrap_or_else(|| dir.path().join("state"));
        let public_key_text = out
            .lines()
            .map(str::trim)
            .find(|l| l.starts_with("x25519:"))
            .unwrap_or_else(|| {
                panic!("`postern-gateway keygen` printed no x25519:... line: {out:?}")
            })
            .to_owned();
        let public_key = GatewayPublicKey::from_text(&public_key_text)
            .unwrap_or_else(|e| panic!("gateway public key {public_key_text:?}: {e}"));

        let audit_log = dir.path().join("audit.log");
        let stderr_log = dir.path().join("gateway.log");
        let config = dir.path().join("gateway.toml");
        let open_ports = options
            .open_ports
            .iter()
            .map(|p| format!("{p:?}"))
            .collect::<Vec<_>>()
            .join(", ");
        let toml = format!(
            "# written by postern-e2e\n\
             key_file = {key:?}\n\
             capture = {capture:?}\n\
             interface = \"any\"\n\
             spa_port = {spa_port}\n\
             listen = \"::\"\n\
             {controller}\n\
             audit_log = {audit:?}\n\
             max_skew_secs = {skew}\n\
             pinhole_secs = {pinhole}\n\
             session_secs = {session}\n\
             table = {table:?}\n\
             open_ports = [{open_ports}]\n\
             state_dir = {state:?}\n\
             {extra}\n",
            key = key_file.display().to_string(),
            capture = options.capture.as_str(),
            spa_port = options.spa_port,
            controller = match &options.controller_tls {
                Some(address) => format!("controller = {address:?}"),
                None => format!(
                    "controller_socket = {:?}",
                    ctl.socket().display().to_string()
                ),
            },
            audit = audit_log.display().to_string(),
            skew = options.max_skew_secs,
            pinhole = options.pinhole_secs,
            session = options.session_secs,
            table = TABLE,
            state = state_dir.display().to_string(),
            extra = options.extra_config,
        );
        std::fs::write(&config, toml).expect("write gateway config");
        if let Some(token) = &options.enroll_token {
            let mut enroll = lab.command_in(&lab.gateway, bin("postern-gateway"));
            enroll
                .arg("enroll")
                .arg("--config")
                .arg(&config)
                .arg("--token")
                .arg(token);
            run_ok(&mut enroll);
        }

        // `env` execs the gateway, so the child's pid stays the gateway's.
        let mut cmd = Command::new("env");
        if let Some(offset) = &options.clock_offset_file {
            cmd.arg(format!(
                "POSTERN_GATEWAY_CLOCK_OFFSET_FILE={}",
                offset.display()
            ));
        }
        cmd.arg(bin("postern-gateway"))
            .arg("run")
            .arg("--config")
            .arg(&config);
        let child = lab.spawn_logged(&lab.gateway, &cmd, &stderr_log, &stderr_log);
        let mut gw = Gateway {
            child,
            options,
            config,
            audit_log,
            stderr_log,
            public_key_text,
            public_key,
            ns: lab.gateway.name().to_owned(),
            dir,
        };
        gw.wait_ready();
        gw
    }

    fn wait_ready(&mut self) {
        let started = Instant::now();
        let table = poll(READY_TIMEOUT, Duration::from_millis(10), || {
            self.check_alive();
            self.table_exists().then_some(())
        });
        if table.is_none() {
            panic!("gateway did not create table inet {TABLE} within {READY_TIMEOUT:?}");
        }
        let left = READY_TIMEOUT.saturating_sub(started.elapsed());
        let event = if self.options.wait_for_sync {
            "sync"
        } else {
            "start"
        };
        let synced = poll(left, Duration::from_millis(10), || {
            self.check_alive();
            self.audit_events(event).into_iter().next()
        });
        if synced.is_none() {
            panic!(
                "gateway did not log an audit line with \"event\":\"{event}\" within {READY_TIMEOUT:?} \
                 (\"sync\": a registry snapshot from the controller)"
            );
        }
    }

    /// Panics (with logs) if the gateway process has exited.
    pub fn check_alive(&mut self) {
        if let Some(status) = self.child.exited() {
            panic!("postern-gateway exited unexpectedly ({status})");
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// `ip netns exec G nft list table inet postern` succeeds.
    pub fn table_exists(&self) -> bool {
        run(Command::new("ip").args([
            "netns", "exec", &self.ns, "nft", "list", "table", "inet", TABLE,
        ]))
        .status
        .success()
    }

    /// The gateway's nftables ruleset (for failure messages).
    pub fn ruleset(&self) -> String {
        let out =
            run(Command::new("ip").args(["netns", "exec", &self.ns, "nft", "list", "ruleset"]));
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
    }

    /// `ip netns exec G ss -lunpt`.
    pub fn listening_sockets(&self) -> String {
        run_ok(Command::new("ip").args(["netns", "exec", &self.ns, "ss", "-lunpt"]))
    }

    /// Every audit line parsed as JSON (lines that are not JSON are skipped).
    pub fn audit_lines(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.audit_log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Audit lines whose `"event"` is `event`.
    pub fn audit_events(&self, event: &str) -> Vec<Value> {
        self.audit_lines()
            .into_iter()
            .filter(|v| v.get("event").and_then(Value::as_str) == Some(event))
            .collect()
    }

    /// Highest registry revision the gateway has logged loading.
    pub fn synced_revision(&self) -> Option<u64> {
        self.audit_events("sync")
            .iter()
            .filter_map(|v| v.get("revision").and_then(Value::as_u64))
            .max()
    }

    /// Waits for a registry snapshot newer than `after` (see [`Gateway::synced_revision`]).
    pub fn wait_sync_after(&mut self, after: u64, timeout: Duration) -> u64 {
        let got = poll(timeout, Duration::from_millis(10), || {
            self.check_alive();
            self.synced_revision().filter(|&r| r > after)
        });
        got.unwrap_or_else(|| {
            panic!("gateway did not load a snapshot newer than revision {after} within {timeout:?}")
        })
    }

    /// Knock decisions from `src`, in order.
    pub fn knocks_from(&self, src: IpAddr) -> Vec<Value> {
        let want = src.to_canonical();
        self.audit_events("knock")
            .into_iter()
            .filter(|v| {
                v.get("src")
                    .and_then(Value::as_str)
                    .and_then(|s| s.parse::<IpAddr>().ok())
                    .is_some_and(|a| a.to_canonical() == want)
            })
            .collect()
    }

    /// Waits until the audit log holds at least `count` knock decisions from `src`, and
    /// returns the `count`-th (1-based).
    pub fn wait_knock(&mut self, src: IpAddr, count: usize, timeout: Duration) -> Value {
        let got = poll(timeout, Duration::from_millis(5), || {
            self.check_alive();
            self.knocks_from(src).into_iter().nth(count - 1)
        });
        got.unwrap_or_else(|| {
            panic!("gateway logged no knock decision #{count} from {src} within {timeout:?}")
        })
    }

    /// Logs and state for a failure message.
    pub fn diagnostics(&self) -> String {
        format!(
            "--- gateway stdout/stderr ({}) ---\n{}\n--- audit log ({}) ---\n{}\n--- ruleset in {} ---\n{}",
            self.stderr_log.display(),
            std::fs::read_to_string(&self.stderr_log).unwrap_or_default(),
            self.audit_log.display(),
            std::fs::read_to_string(&self.audit_log).unwrap_or_default(),
            self.ns,
            self.ruleset(),
        )
    }

    /// SIGKILL, as a crash would: no stop code runs. Waits until the process is gone.
    pub fn kill(&mut self) {
        run_ok(Command::new("kill").args(["-9", &self.pid().to_string()]));
        let gone = poll(Duration::from_secs(5), Duration::from_millis(10), || {
            self.child.exited()
        });
        assert!(gone.is_some(), "postern-gateway survived SIGKILL for 5 s");
    }

    /// Sends SIGTERM and waits for a clean exit (status returned), or None after `timeout`.
    pub fn stop(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        self.child.terminate(timeout)
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        // Failure messages stay short; the logs and the ruleset follow them from here.
        if std::thread::panicking() {
            eprintln!(
                "=== postern-e2e: gateway state after the failure ===\n{}",
                self.diagnostics()
            );
        }
    }
}

/// Runs `postern knock APP --gateway ADDR --gateway-key KEY --key FILE --wait-reply 0` in
/// the lab's client namespace and returns its output (whatever the exit status). It does
/// not wait for the gateway's signed reply (so a denied knock still exits 0 here); see
/// [`knock_cli_with`] to wait for one.
pub fn knock_cli(
    lab: &Lab,
    gw: &Gateway,
    device: &Device,
    app: &str,
    gateway_addr: IpAddr,
) -> Output {
    knock_cli_with(lab, gw, device, app, gateway_addr, &["--wait-reply", "0"])
}

/// [`knock_cli`] with `extra` arguments instead of `--wait-reply 0` (e.g.
/// `["--wait-reply", "1000"]` to wait for the gateway's reply).
pub fn knock_cli_with(
    lab: &Lab,
    gw: &Gateway,
    device: &Device,
    app: &str,
    gateway_addr: IpAddr,
    extra: &[&str],
) -> Output {
    let target = match gateway_addr {
        IpAddr::V4(a) => format!("{a}:{}", gw.options.spa_port),
        IpAddr::V6(a) => format!("[{a}]:{}", gw.options.spa_port),
    };
    let mut cmd = lab.command_in(&lab.client, bin("postern"));
    cmd.arg("knock")
        .arg(app)
        .arg("--gateway")
        .arg(target)
        .arg("--gateway-key")
        .arg(&gw.public_key_text)
        .arg("--key")
        .arg(&device.key_file)
        .args(extra);
    run(&mut cmd)
}

/// Like [`knock_cli`], panicking with the command's output unless it exits 0.
pub fn knock_cli_ok(lab: &Lab, gw: &Gateway, device: &Device, app: &str, gateway_addr: IpAddr) {
    let out = knock_cli(lab, gw, device, app, gateway_addr);
    if !out.status.success() {
        panic!(
            "`postern knock {app}` failed ({}):\n--- stdout ---\n{}\n--- stderr ---\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
