//! The two-host lab: a client namespace and a gateway namespace joined by a veth pair.
//!
//! Owns: the namespaces it creates (`pst-<pid>-<counter>-c` / `-g`), their veth pair and
//! addresses, the child processes and server threads it starts, and their clean-up on drop
//! (also on panic). Must not touch: the root namespace's interfaces, routes or nftables
//! tables, other processes' namespaces, or any address outside the namespaces it created.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::netns;

/// Tools the lab shells out to, with the Debian package that provides each.
const PREREQS: &[(&str, &str)] = &[
    ("ip", "iproute2"),
    ("ss", "iproute2"),
    ("nft", "nftables"),
    ("conntrack", "conntrack"),
];

/// Checks once per process that the lab can run: root, and `ip`, `ss`, `nft`, `conntrack`
/// on the PATH. Panics with the Debian package to install; never skips.
pub fn check_prerequisites() {
    static CHECKED: OnceLock<Result<(), String>> = OnceLock::new();
    let result = CHECKED.get_or_init(|| {
        let mut missing = Vec::new();
        for (tool, package) in PREREQS {
            if which(tool).is_none() {
                missing.push(format!("`{tool}` (Debian package {package})"));
            }
        }
        let mut problems = Vec::new();
        if !missing.is_empty() {
            let mut pkgs: Vec<&str> = PREREQS
                .iter()
                .filter(|(t, _)| which(t).is_none())
                .map(|(_, p)| *p)
                .collect();
            pkgs.dedup();
            problems.push(format!(
                "missing tools: {}; install them with `apt-get install -y {}` (or run `sudo scripts/test`, which does it)",
                missing.join(", "),
                pkgs.join(" ")
            ));
        }
        match effective_uid() {
            Some(0) => {}
            Some(uid) => problems.push(format!(
                "the end-to-end tests create network namespaces and nftables tables and must run as root (effective uid is {uid}); run `sudo scripts/test`"
            )),
            None => problems.push("cannot read the effective uid from /proc/self/status".into()),
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems.join("\n"))
        }
    });
    if let Err(msg) = result {
        panic!("postern end-to-end lab prerequisites not met:\n{msg}");
    }
}

fn effective_uid() -> Option<u32> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(2)?.parse().ok()
}

/// Finds an executable on the PATH (plus the sbin directories, which a non-login root shell
/// may lack).
pub fn which(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|dir| dir.join(tool))
        .find(|p| p.is_file())
}

/// Locates a workspace binary in target/debug (next to the test executable's `deps/`).
/// Panics with "run `cargo build --workspace --bins` first" when it is missing.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    // target/debug/deps/knock_e2e-HASH -> target/debug
    let mut dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let candidate = dir.join(name);
    if !candidate.is_file() {
        panic!(
            "binary `{name}` not found at {}: run `cargo build --workspace --bins` first",
            candidate.display()
        );
    }
    refuse_stale(&candidate);
    candidate
}

/// `cargo test -p postern-e2e` does not rebuild the binaries it drives: a binary older
/// than any source file of the workspace crates would test yesterday's code. Refuse it.
fn refuse_stale(binary: &Path) {
    let Ok(built) = std::fs::metadata(binary).and_then(|m| m.modified()) else {
        return;
    };
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    // The workspace crates each binary is built from (cargo relinks only these).
    let crates: &[&str] = match binary.file_name().and_then(|n| n.to_str()) {
        Some("postern-gateway") => &["protocol", "firewall", "terminal", "gateway"],
        Some("postern-controller") => &["protocol", "terminal", "controller"],
        Some("postern") => &["protocol", "terminal", "spa-client"],
        _ => &[],
    };
    let mut dirs: Vec<PathBuf> = crates.iter().map(|c| root.join(c).join("src")).collect();
    while let Some(dir) = dirs.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                dirs.push(path);
            } else if let Ok(modified) = entry.metadata().and_then(|m| m.modified()) {
                if modified > built {
                    panic!(
                        "{} is older than {}: run `cargo build --workspace --bins` first",
                        binary.display(),
                        path.display()
                    );
                }
            }
        }
    }
}

/// Runs a command to completion, panicking (with its output) if it fails to start or exits
/// non-zero. Returns stdout.
pub fn run_ok(cmd: &mut Command) -> String {
    let out = run(cmd);
    if !out.status.success() {
        panic!(
            "command failed ({}): {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            out.status,
            cmd,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a command to completion with stdin closed; panics only if it cannot start.
pub fn run(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

/// Polls `f` every `every` until it returns `Some` or `timeout` passes.
pub fn poll<T>(timeout: Duration, every: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(every);
    }
}

/// A child process that is killed (SIGKILL) and reaped when dropped.
#[derive(Debug)]
pub struct ChildGuard {
    child: Option<Child>,
    what: String,
}

impl ChildGuard {
    pub fn new(child: Child, what: impl Into<String>) -> Self {
        Self {
            child: Some(child),
            what: what.into(),
        }
    }

    pub fn id(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }

    /// `Some(status)` if the process has exited.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// Sends SIGTERM (via kill(1), keeping the lab free of unsafe code beyond setns) and waits
    /// up to `timeout` for the process to exit. Returns its status, or None if it is still
    /// running (it is then killed on drop).
    pub fn terminate(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let pid = self.id();
        let _ = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .stdin(Stdio::null())
            .status();
        poll(timeout, Duration::from_millis(10), || self.exited())
    }

    pub fn what(&self) -> &str {
        &self.what
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if child.try_wait().ok().flatten().is_none() {
                let _ = child.kill();
            }
            let _ = child.wait();
        }
    }
}

/// A network namespace created with `ip netns add`, deleted when dropped.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    pub fn create(name: &str) -> Netns {
        if netns::netns_path(name).exists() {
            // Left over by a killed run whose pid has been reused: it is ours by name.
            let _ = run(Command::new("ip").args(["netns", "del", name]));
        }
        run_ok(Command::new("ip").args(["netns", "add", name]));
        Netns {
            name: name.to_owned(),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip -n NAME ARGS...`
    pub fn ip(&self, args: &[&str]) -> String {
        run_ok(Command::new("ip").arg("-n").arg(&self.name).args(args))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A TCP echo server thread running in a namespace; stopped by the lab on drop.
#[derive(Debug)]
struct ServerThread {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

/// Two hosts joined by a veth pair: `client` (.1 / ::1) and `gateway` (.2 / ::2).
#[derive(Debug)]
pub struct Lab {
    servers: Mutex<Vec<ServerThread>>,
    children: Mutex<Vec<ChildGuard>>,
    pub client: Netns,
    pub gateway: Netns,
    pub client_v4: Ipv4Addr,
    pub gateway_v4: Ipv4Addr,
    pub client_v6: Ipv6Addr,
    pub gateway_v6: Ipv6Addr,
}

/// Name of the veth end in each namespace (the ends live only in their namespaces, so fixed
/// names never collide).
pub const CLIENT_IF: &str = "pst-c";
pub const GATEWAY_IF: &str = "pst-g";

impl Lab {
    /// Builds a fresh lab with names unique to this process and call.
    pub fn new() -> Lab {
        check_prerequisites();
        let pid = std::process::id();
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let base = format!("pst-{pid}-{n}");
        let client = Netns::create(&format!("{base}-c"));
        let gateway = Netns::create(&format!("{base}-g"));

        // Addresses only exist inside these two namespaces; they need not be unique across
        // labs, but distinct values make logs easier to read.
        let x = (100 + pid % 100) as u8;
        let y = (n % 250) as u8;
        let client_v4 = Ipv4Addr::new(10, x, y, 1);
        let gateway_v4 = Ipv4Addr::new(10, x, y, 2);
        let seg = (pid & 0xffff) as u16;
        let client_v6 = Ipv6Addr::new(0xfd00, seg, n as u16, 0, 0, 0, 0, 1);
        let gateway_v6 = Ipv6Addr::new(0xfd00, seg, n as u16, 0, 0, 0, 0, 2);

        run_ok(Command::new("ip").args([
            "link",
            "add",
            CLIENT_IF,
            "netns",
            client.name(),
            "type",
            "veth",
            "peer",
            "name",
            GATEWAY_IF,
            "netns",
            gateway.name(),
        ]));
        for (ns, ifname, v4, v6) in [
            (&client, CLIENT_IF, client_v4, client_v6),
            (&gateway, GATEWAY_IF, gateway_v4, gateway_v6),
        ] {
            ns.ip(&["link", "set", "lo", "up"]);
            ns.ip(&["addr", "add", &format!("{v4}/24"), "dev", ifname]);
            ns.ip(&[
                "-6",
                "addr",
                "add",
                &format!("{v6}/64"),
                "dev",
                ifname,
                "nodad",
            ]);
            ns.ip(&["link", "set", ifname, "up"]);
        }

        // Until the kernel's link watch marks both ends operationally UP, the veth transmits
        // into a no-op qdisc: the first ARP/ND or SYN is lost and TCP retries only after 1 s.
        for (ns, ifname) in [(&client, CLIENT_IF), (&gateway, GATEWAY_IF)] {
            let up = poll(Duration::from_secs(5), Duration::from_millis(5), || {
                ns.ip(&["-o", "link", "show", "dev", ifname])
                    .contains("state UP")
                    .then_some(())
            });
            if up.is_none() {
                panic!("veth {ifname} in {} did not come up within 5 s", ns.name());
            }
        }

        Lab {
            servers: Mutex::new(Vec::new()),
            children: Mutex::new(Vec::new()),
            client,
            gateway,
            client_v4,
            gateway_v4,
            client_v6,
            gateway_v6,
        }
    }

    /// Runs `f` on a fresh thread inside namespace `ns` (see [`netns::run_in`]).
    pub fn run_in<F, T>(&self, ns: &Netns, f: F) -> T
    where
        F: FnOnce() -> T + Send,
        T: Send,
    {
        netns::run_in(ns.name(), f)
    }

    /// Builds `ip netns exec NS PROGRAM` (not started).
    pub fn command_in(&self, ns: &Netns, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns.name()]).arg(program);
        cmd.stdin(Stdio::null());
        cmd
    }

    /// Starts `cmd` inside `ns` via `ip netns exec` (which execs the program, so the child's
    /// pid is the program's). The lab kills it on drop. Returns its pid.
    pub fn spawn_in(&self, ns: &Netns, cmd: &Command) -> u32 {
        let child = self.spawn_guarded(ns, cmd);
        let pid = child.id();
        self.children.lock().expect("children lock").push(child);
        pid
    }

    /// Like [`Lab::spawn_in`] but hands the guard to the caller (killed when it drops).
    /// Output goes to the test's own stdout/stderr.
    pub fn spawn_guarded(&self, ns: &Netns, cmd: &Command) -> ChildGuard {
        let mut full = netns_exec(ns, cmd);
        let what = format!("{full:?}");
        let child = full
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
        ChildGuard::new(child, what)
    }

    /// Like [`Lab::spawn_guarded`], with stdout and stderr appended to files.
    pub fn spawn_logged(
        &self,
        ns: &Netns,
        cmd: &Command,
        stdout: &Path,
        stderr: &Path,
    ) -> ChildGuard {
        let mut full = netns_exec(ns, cmd);
        full.stdout(open_append(stdout)).stderr(open_append(stderr));
        let what = format!("{full:?}");
        let child = full
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
        ChildGuard::new(child, what)
    }

    /// Starts a TCP echo server listening on `[::]:port` (IPv4 and IPv6) in the gateway
    /// namespace. It is stopped when the lab drops.
    pub fn start_echo_server(&self, port: u16) {
        let listener = self.run_in(&self.gateway, || {
            TcpListener::bind((Ipv6Addr::UNSPECIFIED, port))
                .unwrap_or_else(|e| panic!("echo server: bind [::]:{port}: {e}"))
        });
        listener
            .set_nonblocking(true)
            .expect("echo server: set_nonblocking");
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = Arc::clone(&stop);
        // The listener already lives in the gateway namespace; the accept loop can run on any
        // thread.
        let handle = std::thread::Builder::new()
            .name(format!("echo:{port}"))
            .spawn(move || echo_loop(listener, stop2))
            .expect("spawn echo server thread");
        self.servers
            .lock()
            .expect("servers lock")
            .push(ServerThread {
                stop,
                handle: Some(handle),
            });
    }

    /// Opens a TCP connection from inside `ns`.
    pub fn tcp_connect(
        &self,
        ns: &Netns,
        addr: SocketAddr,
        timeout: Duration,
    ) -> std::io::Result<TcpStream> {
        tcp_connect(ns, addr, timeout)
    }

    /// The gateway address of the given family.
    pub fn gateway_addr(&self, v6: bool) -> IpAddr {
        if v6 {
            IpAddr::V6(self.gateway_v6)
        } else {
            IpAddr::V4(self.gateway_v4)
        }
    }

    /// The client address of the given family.
    pub fn client_addr(&self, v6: bool) -> IpAddr {
        if v6 {
            IpAddr::V6(self.client_v6)
        } else {
            IpAddr::V4(self.client_v4)
        }
    }
}

impl Default for Lab {
    fn default() -> Self {
        Lab::new()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if let Ok(mut servers) = self.servers.lock() {
            for s in servers.iter() {
                s.stop.store(true, Ordering::SeqCst);
            }
            for s in servers.iter_mut() {
                if let Some(h) = s.handle.take() {
                    let _ = h.join();
                }
            }
        }
        if let Ok(mut children) = self.children.lock() {
            children.clear(); // ChildGuard::drop kills and reaps
        }
        // The Netns fields drop next and delete the namespaces.
    }
}

/// `ip netns exec NS` + the program, arguments, environment and directory of `cmd`.
fn netns_exec(ns: &Netns, cmd: &Command) -> Command {
    let mut full = Command::new("ip");
    full.args(["netns", "exec", ns.name()])
        .arg(cmd.get_program())
        .args(cmd.get_args());
    for (k, v) in cmd.get_envs() {
        match v {
            Some(v) => full.env(k, v),
            None => full.env_remove(k),
        };
    }
    if let Some(dir) = cmd.get_current_dir() {
        full.current_dir(dir);
    }
    full.stdin(Stdio::null());
    full
}

/// Opens a file for appending (created if missing); panics with its path.
pub fn open_append(p: &Path) -> std::fs::File {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(p)
        .unwrap_or_else(|e| panic!("open {}: {e}", p.display()))
}

/// Opens a TCP connection from inside namespace `ns`, with a connect timeout.
pub fn tcp_connect(ns: &Netns, addr: SocketAddr, timeout: Duration) -> std::io::Result<TcpStream> {
    netns::run_in(ns.name(), || TcpStream::connect_timeout(&addr, timeout))
}

/// Sends `msg` and expects it echoed back within `timeout`.
pub fn echo_roundtrip(
    stream: &mut TcpStream,
    msg: &[u8],
    timeout: Duration,
) -> std::io::Result<()> {
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    stream.write_all(msg)?;
    let mut buf = vec![0u8; msg.len()];
    stream.read_exact(&mut buf)?;
    if buf != msg {
        return Err(std::io::Error::other("echo returned different bytes"));
    }
    Ok(())
}

/// Connects from `ns` to `addr`, retrying for up to 2 s (a pinhole that was just opened
/// may take a moment to reach the kernel).
pub fn connect_soon(ns: &Netns, addr: SocketAddr) -> TcpStream {
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    loop {
        match tcp_connect(ns, addr, Duration::from_millis(50)) {
            Ok(s) => return s,
            Err(e) if std::time::Instant::now() >= deadline => {
                panic!("no connection to {addr} within 2 s: {e}")
            }
            Err(_) => {}
        }
    }
}

/// Probes a live echo flow (100 ms per probe) until a round trip fails, and returns the
/// time from `since` to that failure. Panics after `limit` with `what()` describing the
/// trigger and any diagnostics.
pub fn wait_flow_dead(
    stream: &mut TcpStream,
    since: std::time::Instant,
    limit: Duration,
    what: &dyn Fn() -> String,
) -> Duration {
    loop {
        if echo_roundtrip(stream, b"x", Duration::from_millis(100)).is_err() {
            return since.elapsed();
        }
        assert!(
            since.elapsed() < limit,
            "the live flow still carries data {limit:?} after {}",
            what()
        );
    }
}

fn echo_loop(listener: TcpListener, stop: Arc<AtomicBool>) {
    let mut conns: Vec<JoinHandle<()>> = Vec::new();
    while !stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, _)) => {
                let stop = Arc::clone(&stop);
                if let Ok(h) = std::thread::Builder::new()
                    .name("echo-conn".into())
                    .spawn(move || echo_conn(stream, stop))
                {
                    conns.push(h);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(2)),
        }
    }
    for h in conns {
        let _ = h.join();
    }
}

fn echo_conn(mut stream: TcpStream, stop: Arc<AtomicBool>) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(Duration::from_millis(50)));
    let mut buf = [0u8; 4096];
    while !stop.load(Ordering::SeqCst) {
        match stream.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                if stream.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => return,
        }
    }
}

/// The cargo target directory (parent of `debug/deps/` holding the test executable).
pub fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let mut dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir.pop(); // debug/ or release/
    dir
}

/// Appends a measurement line to `target/postern-e2e/timings.log` (printed by `scripts/test`,
/// since cargo test hides the stdout of passing tests) and prints it.
pub fn record_timing(line: &str) {
    println!("{line}");
    let dir = target_dir().join("postern-e2e");
    if std::fs::create_dir_all(&dir).is_ok() {
        let mut f = open_append(&dir.join("timings.log"));
        // One write(2) per line: parallel tests append to the same O_APPEND file, and
        // `writeln!` may split a line into several writes that interleave.
        let _ = f.write_all(format!("{line}\n").as_bytes());
    }
}

/// Milliseconds since the Unix epoch (the knock timestamp clock).
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
