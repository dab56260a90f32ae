//! Test lab: throw-away network namespaces, each with a worker thread living
//! inside it.
//!
//! Owns: `ip netns add/del` of names `pst-fw-<pid>-<n>`, the setns'd worker
//! threads, and small helpers (`nft` inside a namespace, preflight checks).
//! Must not touch: the root namespace's firewall or any namespace it did not
//! create. Every namespace is deleted on drop, even when the test panics.
#![allow(unsafe_code)]
#![allow(dead_code)]

use std::{
    fs::File,
    io::{ErrorKind, Read, Write},
    net::{SocketAddr, TcpStream},
    os::fd::AsRawFd,
    process::Command,
    sync::{
        atomic::{AtomicU32, Ordering},
        mpsc, Once,
    },
    thread,
    time::{Duration, Instant},
};

static COUNTER: AtomicU32 = AtomicU32::new(0);
static PREFLIGHT: Once = Once::new();

type Job = Box<dyn FnOnce() + Send>;

/// Fails with the Debian package to install when a tool is missing.
pub fn preflight() {
    PREFLIGHT.call_once(|| {
        for (bin, pkg) in [
            ("nft", "nftables"),
            ("conntrack", "conntrack"),
            ("ip", "iproute2"),
        ] {
            let found = Command::new(bin).arg("--version").output().is_ok();
            assert!(found, "`{bin}` not found: apt-get install {pkg}");
        }
        assert!(
            unsafe_geteuid() == 0,
            "these tests need root (CAP_NET_ADMIN, CAP_SYS_ADMIN for setns)"
        );
    });
}

fn unsafe_geteuid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// A network namespace plus a worker thread that entered it.
pub struct Netns {
    pub name: String,
    tx: Option<mpsc::Sender<Job>>,
    worker: Option<thread::JoinHandle<()>>,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Netns {
    pub fn new() -> Netns {
        preflight();
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let name = format!("pst-fw-{}-{}", std::process::id(), n);
        ip(&["netns", "add", &name]);
        // From here on, Drop deletes the namespace.
        let mut ns = Netns {
            name: name.clone(),
            tx: None,
            worker: None,
        };
        ip(&["-n", &name, "link", "set", "lo", "up"]);
        let (tx, rx) = mpsc::channel::<Job>();
        let (ready_tx, ready_rx) = mpsc::channel::<Result<(), String>>();
        let path = format!("/var/run/netns/{name}");
        let worker = thread::spawn(move || {
            let entered = File::open(&path)
                .map_err(|e| format!("open {path}: {e}"))
                .and_then(|f| {
                    // SAFETY: `f` is an open namespace file descriptor that
                    // lives across the call; setns only changes this thread's
                    // network namespace.
                    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
                    if rc == 0 {
                        Ok(())
                    } else {
                        Err(format!("setns: {}", std::io::Error::last_os_error()))
                    }
                });
            let ok = entered.is_ok();
            let _ = ready_tx.send(entered);
            if !ok {
                return;
            }
            for job in rx {
                job();
            }
        });
        ns.worker = Some(worker);
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => panic!("entering {name}: {e}"),
            Err(_) => panic!("entering {name}: worker died"),
        }
        ns.tx = Some(tx);
        ns
    }

    /// Runs `f` on the worker thread (inside the namespace) and returns its
    /// result; a panic inside is re-raised here.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let (rtx, rrx) = mpsc::channel();
        let job: Job = Box::new(move || {
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
            let _ = rtx.send(r);
        });
        self.tx
            .as_ref()
            .expect("worker")
            .send(job)
            .expect("worker alive");
        match rrx.recv().expect("worker answered") {
            Ok(v) => v,
            Err(p) => std::panic::resume_unwind(p),
        }
    }

    /// `ip netns exec NS nft ARGS` → stdout; panics on failure.
    pub fn nft(&self, args: &[&str]) -> String {
        let out = self.nft_raw(args);
        assert!(
            out.status.success(),
            "nft {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn nft_raw(&self, args: &[&str]) -> std::process::Output {
        Command::new("ip")
            .args(["netns", "exec", &self.name, "nft"])
            .args(args)
            .output()
            .expect("run ip netns exec nft")
    }

    /// `nft -j list map|set inet TABLE NAME`, parsed.
    pub fn nft_json(&self, kind: &str, table: &str, name: &str) -> serde_json::Value {
        let s = self.nft(&["-j", "list", kind, "inet", table, name]);
        serde_json::from_str(&s).expect("nft json")
    }

    /// Elements of a set/map in nft's JSON (an empty vec when none).
    pub fn elems(&self, kind: &str, table: &str, name: &str) -> Vec<serde_json::Value> {
        let v = self.nft_json(kind, table, name);
        v["nftables"]
            .as_array()
            .expect("array")
            .iter()
            .find_map(|o| o.get(kind))
            .and_then(|m| m.get("elem"))
            .and_then(|e| e.as_array())
            .cloned()
            .unwrap_or_default()
    }

    /// `ip -n NS ARGS`.
    pub fn ip(&self, args: &[&str]) {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        ip(&all);
    }

    /// `ip netns exec NS conntrack ARGS` → stdout (exit status ignored: -D
    /// exits 1 when nothing matched).
    pub fn conntrack(&self, args: &[&str]) -> String {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.name, "conntrack"])
            .args(args)
            .output()
            .expect("run conntrack");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Stop the worker first so nothing holds the namespace busy.
        self.tx.take();
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// Two namespaces joined by a veth pair: `pst-c` = 10.99.0.1/24 + fd99::1/64 in
/// `client`, `pst-g` = 10.99.0.2/24 + fd99::2/64 in `gateway`.
pub struct Lab {
    pub client: Netns,
    pub gateway: Netns,
}

pub const CLIENT4: &str = "10.99.0.1";
pub const GATEWAY4: &str = "10.99.0.2";
pub const CLIENT6: &str = "fd99::1";
pub const GATEWAY6: &str = "fd99::2";

impl Lab {
    pub fn new() -> Lab {
        let client = Netns::new();
        let gateway = Netns::new();
        // Both ends are created inside the namespaces: no name in the root
        // namespace, so parallel labs cannot clash.
        client.ip(&[
            "link",
            "add",
            "name",
            "pst-c",
            "type",
            "veth",
            "peer",
            "name",
            "pst-g",
            "netns",
            &gateway.name,
        ]);
        client.ip(&["addr", "add", "10.99.0.1/24", "dev", "pst-c"]);
        gateway.ip(&["addr", "add", "10.99.0.2/24", "dev", "pst-g"]);
        client.ip(&["addr", "add", "fd99::1/64", "dev", "pst-c", "nodad"]);
        gateway.ip(&["addr", "add", "fd99::2/64", "dev", "pst-g", "nodad"]);
        client.ip(&["link", "set", "pst-c", "up"]);
        gateway.ip(&["link", "set", "pst-g", "up"]);
        // Wait until the link carries packets both ways: a connect to a closed
        // port is refused (RST) once the path and the neighbour work.
        for target in ["10.99.0.2:9", "[fd99::2]:9"] {
            let addr: SocketAddr = target.parse().expect("addr");
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                let r = client
                    .run(move || TcpStream::connect_timeout(&addr, Duration::from_millis(200)));
                match r {
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => break,
                    _ if Instant::now() > deadline => panic!("lab link to {target} never came up"),
                    _ => std::thread::sleep(Duration::from_millis(50)),
                }
            }
        }
        Lab { client, gateway }
    }
}

/// `Duration::from_secs`, short.
pub fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

/// `s` must receive nothing for 600 ms: the flow is dead (or never carried anything).
pub fn expect_silence(s: &mut TcpStream, what: &str) {
    s.set_read_timeout(Some(Duration::from_millis(600)))
        .expect("timeout");
    let mut buf = [0u8; 64];
    match s.read(&mut buf) {
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
        other => panic!("{what}: expected no data, got {other:?}"),
    }
}

/// One round trip over a live flow: the client's "ping" reaches the server side `s`,
/// whose "pong" reaches the client `c`.
pub fn exchange(c: &mut TcpStream, s: &mut TcpStream) {
    let mut buf = [0u8; 4];
    c.write_all(b"ping").expect("client write");
    s.set_read_timeout(Some(secs(2))).expect("timeout");
    s.read_exact(&mut buf).expect("server read");
    assert_eq!(&buf, b"ping");
    s.write_all(b"pong").expect("server write");
    c.set_read_timeout(Some(secs(2))).expect("timeout");
    c.read_exact(&mut buf).expect("client read");
    assert_eq!(&buf, b"pong");
}
