//! Darkness proof: nmap, run from the lab's client namespace against the gateway
//! namespace's own addresses, finds nothing open while a gateway runs, and the SPA port
//! answers exactly like an unused port (no answer at all).
//!
//! Each scan has something to find: an app server listens on the app port inside the
//! gateway namespace. A control scan with the gateway stopped and table `inet postern`
//! deleted must find that port open (and the others closed), otherwise the dark scans
//! would prove nothing.
//!
//! What the two capture modes show: `sniff` (the default, the dark one: docs/operations.md)
//! owns no socket and its ruleset accepts nothing unsolicited. In `udp` mode the ruleset
//! accepts the SPA port and a bound socket receives the datagram, so the port is open by
//! design; it still looks like an unused port because the gateway never answers an
//! unauthenticated datagram (nmap: `open|filtered`, `no-response`, exactly as for a dropped
//! port; the gateway's audit log shows it got and dropped the datagrams). The difference
//! shows from inside the gateway namespace (`ss`), and from outside only while the accept
//! rule outlives the socket: never, because the ruleset drops the host's own ICMP
//! port-unreachable, so even after a crash (SIGKILL) the SPA port answers nothing
//! (asserted), and a clean stop restores the fully dark ruleset (asserted).
//!
//! Owns: the scans and probes below. Must not touch: any address outside the namespaces
//! its labs create; nmap only ever runs inside the client namespace (`ip netns exec`) and
//! targets only the lab's gateway addresses.

use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use postern_e2e::{
    knock_cli_ok, poll, record_timing, tcp_connect, Capture, Controller, Device, Gateway,
    GatewayOptions, Lab,
};
use serde_json::Value;

const APP: &str = "web";
const APP_PORT: u16 = 8080;
const USER: &str = "alice";
/// A port nothing listens on and the ruleset does not name: the reference "closed" port.
const UNUSED_PORT: u16 = 40001;
/// How long a probe waits for any answer (veth round trips take microseconds).
const PROBE_WAIT: Duration = Duration::from_millis(400);

/// nmap's path; panics naming the Debian package when it is missing.
fn nmap() -> PathBuf {
    postern_e2e::lab::which("nmap").unwrap_or_else(|| {
        panic!(
            "the darkness test needs `nmap` (Debian package nmap): install it with \
             `apt-get install -y nmap`, or run `sudo scripts/test`, which does it"
        )
    })
}

/// One lab: an app server on the app port in the gateway namespace, a controller granting
/// the app to an enrolled device, and (while `gw` is Some) a running gateway. Fields drop in
/// order: gateway, device, controller (kept alive for the gateway), lab.
struct Setup {
    gw: Option<Gateway>,
    dev: Device,
    ctl: Controller,
    lab: Lab,
}

impl Setup {
    fn new(mode: Capture) -> Setup {
        let nmap_path = nmap();
        assert!(nmap_path.is_file());
        let lab = Lab::new();
        lab.start_echo_server(APP_PORT);
        let ctl = Controller::start();
        ctl.add_app(APP, "tcp", APP_PORT);
        ctl.grant(APP, USER);
        let dev = Device::keygen("scanner-owner");
        dev.enroll(&ctl, USER);
        let gw = Gateway::start(&lab, &ctl, GatewayOptions::new(mode));
        let s = Setup {
            gw: Some(gw),
            dev,
            ctl,
            lab,
        };
        // There is something to find: the app server listens on both families.
        let ss = s.gw().listening_sockets();
        assert!(
            ss.lines()
                .any(|l| l.starts_with("tcp") && l.contains(&format!(":{APP_PORT} "))),
            "the app server must listen on tcp/{APP_PORT} in the gateway namespace:\n{ss}"
        );
        s
    }

    fn gw(&self) -> &Gateway {
        self.gw.as_ref().expect("a running gateway")
    }

    fn gw_mut(&mut self) -> &mut Gateway {
        self.gw.as_mut().expect("a running gateway")
    }

    fn spa_port(&self) -> u16 {
        GatewayOptions::new(Capture::Sniff).spa_port
    }

    fn family(v6: bool) -> &'static str {
        if v6 {
            "ipv6"
        } else {
            "ipv4"
        }
    }

    /// Runs nmap inside the client namespace against the gateway address of the family,
    /// with `args` (scan type and ports) plus the common bounded options; returns the
    /// parsed XML report and records how long it took.
    fn nmap(&self, v6: bool, label: &str, args: &[&str]) -> Scan {
        let target = self.lab.gateway_addr(v6).to_string();
        let mut cmd = self.lab.command_in(&self.lab.client, nmap());
        cmd.args(args)
            .args([
                "-Pn",
                "-n",
                "--reason",
                "--max-retries",
                "1",
                "--initial-rtt-timeout",
                "200ms",
                "--max-rtt-timeout",
                "500ms",
                "--host-timeout",
                "120s",
                "-oX",
                "-",
            ])
            .args(if v6 { &["-6"][..] } else { &[][..] })
            .arg(&target);
        let started = Instant::now();
        let out = cmd
            .output()
            .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
        let took = started.elapsed();
        let xml = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        if !out.status.success() {
            panic!("nmap failed ({}): {cmd:?}\n{stderr}\n{xml}", out.status);
        }
        let scan = Scan::parse(&xml).unwrap_or_else(|e| {
            panic!("cannot read nmap's XML report ({e}): {cmd:?}\n{stderr}\n{xml}")
        });
        record_timing(&format!(
            "darkness nmap {label} {} [{}]: {:.2} s wall ({} s by nmap), {}",
            Setup::family(v6),
            self.mode_label(),
            took.as_secs_f64(),
            scan.elapsed,
            scan.summary()
        ));
        scan
    }

    fn mode_label(&self) -> &'static str {
        match &self.gw {
            Some(gw) => gw.options.capture.as_str(),
            None => "no gateway, no ruleset",
        }
    }

    /// Full TCP SYN scan: returns the report after checking it covers all 65,535 ports.
    fn tcp_all(&self, v6: bool) -> Scan {
        let scan = self.nmap(
            v6,
            "-sS -p- (65535 tcp)",
            &["-sS", "-p-", "--min-rate", "20000"],
        );
        scan.assert_covers("tcp", 65535);
        scan
    }

    /// UDP scan of nmap's 100 most common UDP ports.
    fn udp_top(&self, v6: bool) -> Scan {
        let scan = self.nmap(
            v6,
            "-sU --top-ports 100",
            &["-sU", "--top-ports", "100", "--min-rate", "2000"],
        );
        scan.assert_covers("udp", 100);
        scan
    }

    /// TCP and UDP scan of just the SPA port and the unused port.
    fn spa_vs_unused(&self, v6: bool) -> Scan {
        let ports = format!(
            "T:{spa},{UNUSED_PORT},U:{spa},{UNUSED_PORT}",
            spa = self.spa_port()
        );
        let scan = self.nmap(v6, "SPA port vs unused port", &["-sS", "-sU", "-p", &ports]);
        scan.assert_covers("tcp", 2);
        scan.assert_covers("udp", 2);
        scan
    }

    /// Our own TCP probe from the client namespace.
    fn tcp_probe(&self, v6: bool, port: u16) -> Answer {
        let addr = SocketAddr::new(self.lab.gateway_addr(v6), port);
        match tcp_connect(&self.lab.client, addr, PROBE_WAIT) {
            Ok(stream) => {
                drop::<TcpStream>(stream);
                Answer::Connected
            }
            Err(e) => match e.kind() {
                std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock => Answer::Nothing,
                std::io::ErrorKind::ConnectionRefused => Answer::Refused,
                _ => Answer::Other(e.to_string()),
            },
        }
    }

    /// Our own UDP probe: `payload` from a connected socket in the client namespace, then
    /// waits for a reply datagram or an ICMP error (reported as ECONNREFUSED on recv).
    fn udp_probe(&self, v6: bool, port: u16, payload: &[u8]) -> Answer {
        let addr = SocketAddr::new(self.lab.gateway_addr(v6), port);
        self.lab.run_in(&self.lab.client, || {
            let bind: SocketAddr = if v6 {
                "[::]:0".parse().expect("literal")
            } else {
                "0.0.0.0:0".parse().expect("literal")
            };
            let sock = UdpSocket::bind(bind).expect("bind a UDP socket in the client ns");
            sock.connect(addr).expect("connect the UDP socket");
            sock.set_read_timeout(Some(PROBE_WAIT))
                .expect("set_read_timeout");
            sock.send(payload).expect("send the probe");
            let mut buf = [0u8; 2048];
            match sock.recv(&mut buf) {
                Ok(n) => Answer::Data(n),
                Err(e) => match e.kind() {
                    std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock => {
                        Answer::Nothing
                    }
                    std::io::ErrorKind::ConnectionRefused => Answer::Refused,
                    _ => Answer::Other(e.to_string()),
                },
            }
        })
    }

    /// The SPA port and the unused port must answer the same way, and that way is no answer
    /// at all: nmap (TCP and UDP) and our own probes (TCP connect, UDP garbage).
    fn assert_spa_port_looks_unused(&self, v6: bool) {
        let spa = self.spa_port();
        let fam = Setup::family(v6);
        let scan = self.spa_vs_unused(v6);
        for (proto, expected) in [("tcp", "filtered"), ("udp", "open|filtered")] {
            let at_spa = scan.state_of(proto, spa);
            let at_unused = scan.state_of(proto, UNUSED_PORT);
            assert_eq!(
                at_spa, at_unused,
                "{fam} {proto}: nmap tells the SPA port {spa} apart from unused port \
                 {UNUSED_PORT}\n{}",
                scan.xml
            );
            assert_eq!(
                at_spa,
                Some((expected.to_owned(), "no-response".to_owned())),
                "{fam} {proto}/{spa}: nmap must get no answer at all\n{}",
                scan.xml
            );
        }
        let tcp = (self.tcp_probe(v6, spa), self.tcp_probe(v6, UNUSED_PORT));
        assert_eq!(
            tcp,
            (Answer::Nothing, Answer::Nothing),
            "{fam} TCP connect to (SPA port {spa}, unused port {UNUSED_PORT}) must get no answer"
        );
        let garbage = b"\x01not a knock, just garbage from a scanner \x00\xff";
        let udp = (
            self.udp_probe(v6, spa, garbage),
            self.udp_probe(v6, UNUSED_PORT, garbage),
        );
        assert_eq!(
            udp,
            (Answer::Nothing, Answer::Nothing),
            "{fam} UDP garbage to (SPA port {spa}, unused port {UNUSED_PORT}) must get no \
             reply and no ICMP error"
        );
        record_timing(&format!(
            "darkness probes {fam} [{}]: SPA port {spa} and unused port {UNUSED_PORT}: nmap tcp {:?}, \
             udp {:?}; own TCP connect {:?}, UDP garbage {:?}",
            self.mode_label(),
            scan.state_of("tcp", spa),
            scan.state_of("udp", spa),
            tcp.0,
            udp.0
        ));
    }

    /// Every knock decision the gateway logged from the client (either family) is a drop:
    /// the scanners' datagrams reached it (at least one decision) and opened nothing.
    fn assert_scanner_datagrams_dropped(&mut self) {
        let client4 = self.lab.client_addr(false);
        let client6 = self.lab.client_addr(true);
        let gw = self.gw_mut();
        gw.check_alive();
        // Our own garbage probes are the last datagrams sent; wait for the gateway to log
        // at least one from each family.
        gw.wait_knock(client4, 1, Duration::from_secs(3));
        gw.wait_knock(client6, 1, Duration::from_secs(3));
        let mut decisions = gw.knocks_from(client4);
        decisions.extend(gw.knocks_from(client6));
        for line in &decisions {
            assert_eq!(
                line.get("decision").and_then(Value::as_str),
                Some("drop"),
                "a scanner's datagram must be dropped, audit line was {line}"
            );
        }
        let reasons: Vec<&str> = decisions
            .iter()
            .filter_map(|l| l.get("reason").and_then(Value::as_str))
            .collect();
        record_timing(&format!(
            "darkness audit [{}]: {} datagrams from the scanner reached the gateway, all \
             dropped (reasons {reasons:?})",
            gw.options.capture.as_str(),
            decisions.len()
        ));
    }
}

/// What a probe got back.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Answer {
    /// No reply and no ICMP error within [`PROBE_WAIT`].
    Nothing,
    /// TCP RST or ICMP port unreachable.
    Refused,
    /// A TCP connection was established.
    Connected,
    /// A UDP reply of this many bytes.
    Data(usize),
    Other(String),
}

/// One port nmap listed individually.
#[derive(Debug, Clone)]
struct Port {
    proto: String,
    port: u16,
    state: String,
    reason: String,
}

/// A group of ports nmap collapsed (`<extraports>` / `<extrareasons>`).
#[derive(Debug, Clone)]
struct Extra {
    proto: String,
    state: String,
    reason: String,
    count: u32,
    /// Inclusive ranges.
    ranges: Vec<(u16, u16)>,
}

/// The parts of nmap's XML report (`-oX -`) the assertions need.
#[derive(Debug)]
struct Scan {
    ports: Vec<Port>,
    extra: Vec<Extra>,
    elapsed: String,
    xml: String,
}

/// Value of attribute `name` in one tag's text (`name="value"`).
fn attr<'a>(tag: &'a str, name: &str) -> Option<&'a str> {
    let key = format!(" {name}=\"");
    let start = tag.find(&key)? + key.len();
    let len = tag[start..].find('"')?;
    Some(&tag[start..start + len])
}

/// `1-8079,8081-65535` -> [(1, 8079), (8081, 65535)].
fn parse_ranges(text: &str) -> Option<Vec<(u16, u16)>> {
    text.split(',')
        .map(|part| match part.split_once('-') {
            Some((a, b)) => Some((a.parse().ok()?, b.parse().ok()?)),
            None => {
                let p = part.parse().ok()?;
                Some((p, p))
            }
        })
        .collect()
}

impl Scan {
    fn parse(xml: &str) -> Result<Scan, String> {
        let mut ports = Vec::new();
        let mut extra = Vec::new();
        let mut elapsed = None;
        let mut hosts = 0;
        let mut extraports_state: Option<String> = None;
        let mut pending_port: Option<(String, u16)> = None;
        for tag in xml.split('<').map(|t| t.split('>').next().unwrap_or("")) {
            let name = tag.split_whitespace().next().unwrap_or("");
            match name {
                "host" => hosts += 1,
                "port" => {
                    let proto = attr(tag, "protocol").ok_or("port without protocol")?;
                    let id = attr(tag, "portid")
                        .and_then(|p| p.parse().ok())
                        .ok_or("port without portid")?;
                    pending_port = Some((proto.to_owned(), id));
                }
                "state" => {
                    let (proto, port) = pending_port.take().ok_or("state outside a port")?;
                    ports.push(Port {
                        proto,
                        port,
                        state: attr(tag, "state").ok_or("state without state")?.to_owned(),
                        reason: attr(tag, "reason").unwrap_or("").to_owned(),
                    });
                }
                "extraports" => {
                    extraports_state = attr(tag, "state").map(str::to_owned);
                }
                "extrareasons" => {
                    let state = extraports_state
                        .clone()
                        .ok_or("extrareasons outside extraports")?;
                    extra.push(Extra {
                        proto: attr(tag, "proto").unwrap_or("").to_owned(),
                        state,
                        reason: attr(tag, "reason").unwrap_or("").to_owned(),
                        count: attr(tag, "count")
                            .and_then(|c| c.parse().ok())
                            .ok_or("extrareasons without count")?,
                        ranges: attr(tag, "ports")
                            .and_then(parse_ranges)
                            .ok_or("extrareasons without a ports list (nmap >= 7.80 needed)")?,
                    });
                }
                "finished" => elapsed = attr(tag, "elapsed").map(str::to_owned),
                _ => {}
            }
        }
        if hosts != 1 {
            return Err(format!("expected one <host>, found {hosts}"));
        }
        Ok(Scan {
            ports,
            extra,
            elapsed: elapsed.ok_or("no <finished elapsed=...>")?,
            xml: xml.to_owned(),
        })
    }

    /// Checks that nmap reported a state for exactly `count` ports of `proto` (a host
    /// timeout or an aborted scan would report fewer).
    fn assert_covers(&self, proto: &str, count: u32) {
        let listed = self.ports.iter().filter(|p| p.proto == proto).count() as u32;
        let collapsed: u32 = self
            .extra
            .iter()
            .filter(|e| e.proto == proto)
            .map(|e| e.count)
            .sum();
        assert_eq!(
            listed + collapsed,
            count,
            "nmap reported {listed} + {collapsed} {proto} ports, expected {count}:\n{}",
            self.xml
        );
    }

    /// (state, reason) nmap gave `port`, listed or collapsed.
    fn state_of(&self, proto: &str, port: u16) -> Option<(String, String)> {
        if let Some(p) = self
            .ports
            .iter()
            .find(|p| p.proto == proto && p.port == port)
        {
            return Some((p.state.clone(), p.reason.clone()));
        }
        self.extra
            .iter()
            .find(|e| e.proto == proto && e.ranges.iter().any(|&(a, b)| (a..=b).contains(&port)))
            .map(|e| (e.state.clone(), e.reason.clone()))
    }

    /// Every (proto, state, reason) with its number of ports.
    fn tally(&self) -> Vec<(String, String, String, u32)> {
        let mut out: Vec<(String, String, String, u32)> = Vec::new();
        let all = self
            .ports
            .iter()
            .map(|p| (p.proto.clone(), p.state.clone(), p.reason.clone(), 1))
            .chain(
                self.extra
                    .iter()
                    .map(|e| (e.proto.clone(), e.state.clone(), e.reason.clone(), e.count)),
            );
        for (proto, state, reason, n) in all {
            match out
                .iter_mut()
                .find(|(p, s, r, _)| *p == proto && *s == state && *r == reason)
            {
                Some(entry) => entry.3 += n,
                None => out.push((proto, state, reason, n)),
            }
        }
        out.sort();
        out
    }

    fn summary(&self) -> String {
        let parts: Vec<String> = self
            .tally()
            .iter()
            .map(|(p, s, r, n)| format!("{n} {p} {s} ({r})"))
            .collect();
        let open: Vec<String> = self
            .ports
            .iter()
            .filter(|p| p.state == "open")
            .map(|p| format!("{}/{}", p.proto, p.port))
            .collect();
        format!("{}; open: {open:?}", parts.join(", "))
    }

    /// Ports in state `open` (never `open|filtered`).
    fn open(&self) -> Vec<(String, u16)> {
        self.ports
            .iter()
            .filter(|p| p.state == "open")
            .map(|p| (p.proto.clone(), p.port))
            .collect()
    }

    /// Asserts that every port of the scan got no answer at all: `state` with reason
    /// `no-response`, nothing open and nothing closed (a RST or an ICMP error would already
    /// tell the scanner that a host is there).
    fn assert_all_silent(&self, what: &str, state: &str) {
        assert!(
            self.open().is_empty(),
            "{what}: nmap found open ports {:?}:\n{}",
            self.open(),
            self.xml
        );
        for (proto, s, reason, n) in self.tally() {
            assert!(
                s == state && reason == "no-response",
                "{what}: {n} {proto} ports are {s} ({reason}); every port must be {state} \
                 (no-response):\n{}",
                self.xml
            );
        }
    }
}

/// The dark checks for one capture mode, over IPv4 and IPv6.
fn gateway_is_dark_to_nmap(mode: Capture) {
    let started = Instant::now();
    let mut s = Setup::new(mode);
    let ss = s.gw().listening_sockets();
    let socket = ss
        .lines()
        .any(|l| l.contains("postern-gateway") && l.contains(&format!(":{} ", s.spa_port())));
    assert_eq!(
        socket,
        mode == Capture::Udp,
        "only udp mode owns a socket on the SPA port, `ss -lunpt` shows:\n{ss}"
    );
    for v6 in [false, true] {
        let fam = Setup::family(v6);
        // TCP: a dropped SYN gets nothing back, so nmap says `filtered` (no-response).
        s.tcp_all(v6)
            .assert_all_silent(&format!("{fam} TCP SYN scan of all ports"), "filtered");
        // UDP: nmap cannot tell an open port that stays silent from a dropped one; both are
        // `open|filtered` (no-response). `open` would need a UDP reply and `closed` an ICMP
        // port unreachable: a dark host sends neither.
        s.udp_top(v6).assert_all_silent(
            &format!("{fam} UDP scan of the top 100 ports"),
            "open|filtered",
        );
        s.assert_spa_port_looks_unused(v6);
    }
    s.assert_scanner_datagrams_dropped();
    assert!(
        s.gw().table_exists(),
        "the ruleset must still be in place after the scans"
    );

    // The gateway still works after being scanned: a real knock opens the app port, which
    // proves the scans had a live app server to find.
    let gw_addr = s.lab.gateway_addr(false);
    knock_cli_ok(&s.lab, s.gw(), &s.dev, APP, gw_addr);
    let app = SocketAddr::new(gw_addr, APP_PORT);
    let opened = poll(Duration::from_secs(2), Duration::from_millis(10), || {
        tcp_connect(&s.lab.client, app, Duration::from_millis(50)).ok()
    });
    assert!(
        opened.is_some(),
        "a valid knock after the scans must open {app}"
    );

    if mode == Capture::Udp {
        udp_mode_after_the_daemon_is_gone(&mut s);
    }
    record_timing(&format!(
        "darkness [{}]: whole test {:.1} s",
        mode.as_str(),
        started.elapsed().as_secs_f64()
    ));
}

/// In udp mode the ruleset accepts the SPA port for the gateway's socket. A clean stop puts
/// the fully dark ruleset back (asserted: the SPA port still gets no answer). After a crash
/// (SIGKILL, no stop code) the accept rule stays with no socket behind it, and the kernel's
/// port-unreachable is dropped by the ruleset's output chain: still no answer (asserted).
fn udp_mode_after_the_daemon_is_gone(s: &mut Setup) {
    let spa = s.spa_port();
    let status = s
        .gw_mut()
        .stop(Duration::from_secs(15))
        .expect("the gateway exits within 15 s of SIGTERM");
    assert!(status.success(), "clean stop must exit 0, got {status}");
    for v6 in [false, true] {
        let answers = (
            s.udp_probe(v6, spa, b"garbage"),
            s.udp_probe(v6, UNUSED_PORT, b"garbage"),
        );
        assert_eq!(
            answers,
            (Answer::Nothing, Answer::Nothing),
            "{} after a clean stop in udp mode, UDP to (SPA port {spa}, unused port \
             {UNUSED_PORT}) must get no answer",
            Setup::family(v6)
        );
    }

    let mut gw = Gateway::start(&s.lab, &s.ctl, GatewayOptions::new(Capture::Udp));
    gw.kill();
    for v6 in [false, true] {
        let crashed = (
            s.udp_probe(v6, spa, b"garbage"),
            s.udp_probe(v6, UNUSED_PORT, b"garbage"),
        );
        record_timing(&format!(
            "darkness [udp] {} after SIGKILL (ruleset kept, no socket): UDP garbage to the SPA \
             port {spa} gets {:?}, to unused port {UNUSED_PORT} gets {:?}",
            Setup::family(v6),
            crashed.0,
            crashed.1,
        ));
        // The accept rule outlives the socket, but the ruleset drops the host's own ICMP
        // port-unreachable: the SPA port still answers exactly like an unused one.
        assert_eq!(
            crashed,
            (Answer::Nothing, Answer::Nothing),
            "{} after a crash in udp mode, UDP to (SPA port {spa}, unused port \
             {UNUSED_PORT}) must get no answer",
            Setup::family(v6)
        );
    }
}

/// Control: with the gateway stopped and its table deleted, the same scans find the app
/// port open and the rest closed, and our probes see refusals. Without this the dark
/// results could come from a broken scan.
#[test]
fn control_without_the_ruleset_nmap_finds_the_app_port() {
    let mut s = Setup::new(Capture::Sniff);
    let status = s
        .gw_mut()
        .stop(Duration::from_secs(15))
        .expect("the gateway exits within 15 s of SIGTERM");
    assert!(status.success(), "clean stop must exit 0, got {status}");
    let gw = s.gw.take().expect("gateway");
    let out = s
        .lab
        .command_in(&s.lab.gateway, "nft")
        .args(["delete", "table", "inet", postern_e2e::fixtures::TABLE])
        .output()
        .expect("run nft in the gateway namespace");
    assert!(
        out.status.success(),
        "nft delete table inet postern: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!gw.table_exists(), "table inet postern must be gone");
    drop(gw);

    let spa = s.spa_port();
    for v6 in [false, true] {
        let fam = Setup::family(v6);
        let scan = s.tcp_all(v6);
        assert_eq!(
            scan.open(),
            vec![("tcp".to_owned(), APP_PORT)],
            "{fam} control: without the ruleset nmap must find exactly the app port open:\n{}",
            scan.xml
        );
        assert_eq!(
            scan.state_of("tcp", APP_PORT),
            Some(("open".into(), "syn-ack".into()))
        );
        // The same two ports the dark tests compare now answer, so nmap can tell a closed
        // port from a silent one here.
        let pair = s.spa_vs_unused(v6);
        for port in [spa, UNUSED_PORT] {
            assert_eq!(
                pair.state_of("tcp", port),
                Some(("closed".into(), "reset".into())),
                "{fam} control: tcp/{port} answers with a RST:\n{}",
                pair.xml
            );
            assert_eq!(
                pair.state_of("udp", port),
                Some(("closed".into(), "port-unreach".into())),
                "{fam} control: udp/{port} answers with ICMP port unreachable:\n{}",
                pair.xml
            );
        }
        assert_eq!(s.tcp_probe(v6, APP_PORT), Answer::Connected);
        assert_eq!(s.tcp_probe(v6, UNUSED_PORT), Answer::Refused);
        assert_eq!(s.udp_probe(v6, UNUSED_PORT, b"garbage"), Answer::Refused);
    }
}

#[test]
fn sniff_mode_gateway_is_dark_to_nmap() {
    gateway_is_dark_to_nmap(Capture::Sniff);
}

#[test]
fn udp_mode_gateway_is_dark_to_nmap() {
    gateway_is_dark_to_nmap(Capture::Udp);
}
