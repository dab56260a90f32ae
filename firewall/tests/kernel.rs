//! Real-kernel tests of postern-firewall, each in its own network namespace.
//!
//! Owns: namespaces named `pst-fw-<pid>-<n>` (see `common`), deleted on drop.
//! Must not touch: the root namespace's nftables or conntrack tables.

mod common;

use std::{
    io::{ErrorKind, Write},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream},
    thread::sleep,
    time::{Duration, Instant},
};

use common::{exchange, expect_silence, secs, Lab, Netns, CLIENT4, CLIENT6, GATEWAY4, GATEWAY6};
use postern_firewall::{
    AppProto, Firewall, FirewallConfig, FirewallError, LivePinhole, Pinhole, SessionId, MARK_TAG,
};

const T: &str = "postern";

fn cfg() -> FirewallConfig {
    FirewallConfig::default()
}

fn install(ns: &Netns, cfg: FirewallConfig) -> Firewall {
    ns.run(move || Firewall::install(&cfg)).expect("install")
}

fn pin(addr: &str, proto: AppProto, port: u16, session: u32) -> Pinhole {
    Pinhole {
        addr: addr.parse().expect("addr"),
        proto,
        port,
        session: SessionId(session),
        forward: None,
    }
}

fn find<'a>(live: &'a [LivePinhole], addr: &str, port: u16) -> Option<&'a LivePinhole> {
    let a: IpAddr = addr.parse().expect("addr");
    live.iter().find(|l| l.addr == a && l.port == port)
}

#[test]
fn install_keeps_other_tables_and_uninstall_removes_only_ours() {
    let ns = Netns::new();
    ns.nft(&["add", "table", "inet", "other"]);
    ns.nft(&[
        "add",
        "chain",
        "inet",
        "other",
        "c",
        "{ type filter hook input priority 0; policy accept; }",
    ]);
    ns.nft(&[
        "add", "rule", "inet", "other", "c", "tcp", "dport", "1234", "accept",
    ]);
    let before = ns.nft(&["list", "table", "inet", "other"]);

    let fw = install(&ns, cfg());
    assert_eq!(fw.table(), T);
    let ours = ns.nft(&["list", "table", "inet", T]);
    for needle in [
        "set sessions",
        "map pinholes4",
        "map pinholes6",
        "policy drop",
        "tcp flags != syn / syn,ack drop",
    ] {
        assert!(ours.contains(needle), "{needle:?} missing in:\n{ours}");
    }
    assert_eq!(ns.nft(&["list", "table", "inet", "other"]), before);

    // Reinstall is atomic and idempotent.
    drop(fw);
    let _fw = install(&ns, cfg());
    assert_eq!(ns.nft(&["list", "table", "inet", "other"]), before);

    ns.run(|| Firewall::uninstall(T)).expect("uninstall");
    let tables = ns.nft(&["list", "tables"]);
    assert!(!tables.contains("postern"), "{tables}");
    assert!(tables.contains("table inet other"), "{tables}");
    assert_eq!(ns.nft(&["list", "table", "inet", "other"]), before);
    // Missing table: Ok.
    ns.run(|| Firewall::uninstall(T))
        .expect("uninstall of a missing table");
}

#[test]
fn open_ports_are_in_the_ruleset() {
    let ns = Netns::new();
    let c = FirewallConfig {
        table: "pst_open".into(),
        open_ports: vec![
            (AppProto::Tcp, 22),
            (AppProto::Udp, 53),
            (AppProto::Tcp, 2222),
        ],
        ..FirewallConfig::default()
    };
    let _fw = install(&ns, c);
    let text = ns.nft(&["list", "table", "inet", "pst_open"]);
    assert!(text.contains("tcp dport { 22, 2222 } accept"), "{text}");
    assert!(text.contains("udp dport 53 accept"), "{text}");
}

#[test]
fn open_adds_elements_with_timeout_and_mark() {
    let ns = Netns::new();
    let mut fw = install(&ns, cfg());
    fw.open(
        &pin("10.1.2.3", AppProto::Tcp, 443, 7),
        secs(30),
        secs(3600),
    )
    .expect("open");

    let elems = ns.elems("map", T, "pinholes4");
    assert_eq!(elems.len(), 1, "{elems:?}");
    let e = &elems[0];
    assert_eq!(
        e[0]["elem"]["val"]["concat"],
        serde_json::json!(["10.1.2.3", "tcp", 443])
    );
    assert_eq!(e[0]["elem"]["timeout"], 30);
    let exp = e[0]["elem"]["expires"].as_u64().expect("expires");
    assert!((28..=30).contains(&exp), "expires {exp}");
    assert_eq!(e[1], MARK_TAG | 7, "mark: session 7 with Postern's tag");

    let sessions = ns.elems("set", T, "sessions");
    assert_eq!(sessions.len(), 1, "{sessions:?}");
    assert_eq!(sessions[0]["elem"]["val"], MARK_TAG | 7);
    assert_eq!(sessions[0]["elem"]["timeout"], 3600);

    let live = fw.list().expect("list");
    assert_eq!(live.len(), 1);
    let l = find(&live, "10.1.2.3", 443).expect("listed");
    assert_eq!(l.proto, AppProto::Tcp);
    assert_eq!(l.session, SessionId(7));
    assert!(l.expires_in > secs(28) && l.expires_in <= secs(30), "{l:?}");
    let s = fw.list_sessions().expect("sessions");
    assert_eq!(s.len(), 1);
    assert_eq!(s[0].0, SessionId(7));
}

#[test]
fn reopen_renews_the_timeouts() {
    let ns = Netns::new();
    let mut fw = install(&ns, cfg());
    let p = pin("10.1.2.4", AppProto::Udp, 5000, 11);
    fw.open(&p, secs(10), secs(10)).expect("open");
    sleep(Duration::from_millis(1500));
    let before = find(&fw.list().expect("list"), "10.1.2.4", 5000)
        .expect("listed")
        .expires_in;
    assert!(before <= Duration::from_millis(8600), "{before:?}");
    fw.open(&p, secs(10), secs(10)).expect("re-open");
    let after = find(&fw.list().expect("list"), "10.1.2.4", 5000)
        .expect("listed")
        .expires_in;
    assert!(
        after >= Duration::from_millis(9500),
        "pinhole not renewed: {after:?}"
    );
    let (_, ses) = fw.list_sessions().expect("sessions")[0];
    assert!(
        ses >= Duration::from_millis(9500),
        "session not renewed: {ses:?}"
    );
    // nft agrees.
    let e = &ns.elems("map", T, "pinholes4")[0];
    assert!(e[0]["elem"]["expires"].as_u64().expect("expires") >= 9);
    // A longer ttl on renewal is honoured too.
    fw.open(&p, secs(20), secs(20)).expect("re-open longer");
    let after = find(&fw.list().expect("list"), "10.1.2.4", 5000)
        .expect("listed")
        .expires_in;
    assert!(after >= secs(19), "{after:?}");
}

#[test]
fn pinhole_moves_to_a_new_session() {
    let ns = Netns::new();
    let mut fw = install(&ns, cfg());
    fw.open(&pin("10.1.2.5", AppProto::Tcp, 80, 1), secs(30), secs(30))
        .expect("open");
    fw.open(&pin("10.1.2.5", AppProto::Tcp, 80, 2), secs(30), secs(30))
        .expect("re-open for another session");
    let live = fw.list().expect("list");
    assert_eq!(live.len(), 1);
    assert_eq!(live[0].session, SessionId(2));

    // Also when this process did not know the old owner (e.g. another run).
    let mut other = ns.run(|| Firewall::install(&cfg())).expect("second handle");
    // install cleared everything; put an element in with a fresh handle...
    other
        .open(&pin("10.1.2.6", AppProto::Tcp, 80, 3), secs(30), secs(30))
        .expect("open");
    // ...and let `fw`, which never saw it, take it over.
    fw.open(&pin("10.1.2.6", AppProto::Tcp, 80, 4), secs(30), secs(30))
        .expect("take over");
    let live = fw.list().expect("list");
    assert_eq!(
        find(&live, "10.1.2.6", 80).expect("listed").session,
        SessionId(4)
    );
}

#[test]
fn elements_expire_by_kernel_timeout() {
    let ns = Netns::new();
    let mut fw = install(&ns, cfg());
    fw.open(&pin("10.1.2.7", AppProto::Tcp, 22, 5), secs(1), secs(1))
        .expect("open");
    fw.open(&pin("fd00::7", AppProto::Tcp, 22, 5), secs(1), secs(1))
        .expect("open v6");
    assert_eq!(fw.list().expect("list").len(), 2);
    sleep(Duration::from_millis(1500));
    assert!(fw.list().expect("list").is_empty());
    assert!(fw.list_sessions().expect("sessions").is_empty());
    assert!(ns.elems("map", T, "pinholes4").is_empty());
    assert!(ns.elems("map", T, "pinholes6").is_empty());
    assert!(ns.elems("set", T, "sessions").is_empty());
}

#[test]
fn ipv6_pinhole() {
    let ns = Netns::new();
    let mut fw = install(&ns, cfg());
    fw.open(&pin("fd00::5", AppProto::Udp, 53, 99), secs(30), secs(60))
        .expect("open");
    let elems = ns.elems("map", T, "pinholes6");
    assert_eq!(elems.len(), 1, "{elems:?}");
    assert_eq!(
        elems[0][0]["elem"]["val"]["concat"],
        serde_json::json!(["fd00::5", "udp", 53])
    );
    assert_eq!(elems[0][1], MARK_TAG | 99);
    assert!(ns.elems("map", T, "pinholes4").is_empty());
    let live = fw.list().expect("list");
    assert_eq!(
        find(&live, "fd00::5", 53).expect("listed").proto,
        AppProto::Udp
    );
}

#[test]
fn close_session_removes_its_elements_only() {
    let ns = Netns::new();
    let mut fw = install(&ns, cfg());
    fw.open(&pin("10.1.3.1", AppProto::Tcp, 443, 9), secs(30), secs(60))
        .expect("open");
    fw.open(&pin("fd00::31", AppProto::Tcp, 443, 9), secs(30), secs(60))
        .expect("open");
    fw.open(&pin("10.1.3.2", AppProto::Tcp, 443, 10), secs(30), secs(60))
        .expect("open");
    fw.close_session(SessionId(9)).expect("close");
    let live = fw.list().expect("list");
    assert_eq!(live.len(), 1, "{live:?}");
    assert_eq!(live[0].session, SessionId(10));
    let sessions = fw.list_sessions().expect("sessions");
    assert_eq!(sessions.len(), 1);
    assert_eq!(sessions[0].0, SessionId(10));
    assert!(ns.elems("map", T, "pinholes6").is_empty());
    // Closing again (or an unknown session) is fine.
    fw.close_session(SessionId(9)).expect("close again");
    fw.close_session(SessionId(12345)).expect("close unknown");
}

#[test]
fn errors_are_clean_for_a_missing_table_and_bad_input() {
    let ns = Netns::new();
    let mut fw = install(&ns, cfg());
    ns.run(|| Firewall::uninstall(T)).expect("uninstall");
    let err = fw
        .open(&pin("10.1.4.1", AppProto::Tcp, 80, 1), secs(30), secs(30))
        .expect_err("table is gone");
    assert!(matches!(err, FirewallError::TableMissing { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains("table inet postern") && msg.contains("install"),
        "{msg}"
    );
    let err = fw.list().expect_err("table is gone");
    assert!(matches!(err, FirewallError::TableMissing { .. }), "{err:?}");
    let err = fw.close_session(SessionId(1)).expect_err("table is gone");
    assert!(matches!(err, FirewallError::TableMissing { .. }), "{err:?}");

    let mut fw = install(&ns, cfg());
    let err = fw
        .open(&pin("10.1.4.1", AppProto::Tcp, 80, 0), secs(30), secs(30))
        .expect_err("session 0");
    assert!(matches!(err, FirewallError::Invalid(_)), "{err:?}");
    let err = fw
        .open(
            &pin("10.1.4.1", AppProto::Tcp, 80, 1),
            Duration::ZERO,
            secs(30),
        )
        .expect_err("ttl 0");
    assert!(matches!(err, FirewallError::Invalid(_)), "{err:?}");
    let bad = FirewallConfig {
        table: "x; flush ruleset".into(),
        open_ports: vec![],
        ..FirewallConfig::default()
    };
    let err = ns
        .run(move || Firewall::install(&bad))
        .expect_err("bad name");
    assert!(matches!(err, FirewallError::Invalid(_)), "{err:?}");
}

/// Connects from the client namespace with a 300 ms timeout.
fn connect(lab: &Lab, to: SocketAddr) -> std::io::Result<TcpStream> {
    lab.client
        .run(move || TcpStream::connect_timeout(&to, Duration::from_millis(300)))
}

/// Connects from the client namespace when success is expected (2 s).
fn connect_ok(lab: &Lab, to: SocketAddr) -> std::io::Result<TcpStream> {
    lab.client
        .run(move || TcpStream::connect_timeout(&to, secs(2)))
}

#[test]
fn tcp_flow_lives_and_dies_with_its_session() {
    let lab = Lab::new();
    let listener = lab
        .gateway
        .run(|| TcpListener::bind((GATEWAY4, 8080)))
        .expect("listen");
    let mut fw = install(&lab.gateway, cfg());
    let to: SocketAddr = (GATEWAY4.parse::<IpAddr>().expect("ip"), 8080).into();

    // Dark: the SYN is dropped, no RST.
    let t0 = Instant::now();
    let err = connect(&lab, to).expect_err("dark before open");
    assert!(
        matches!(err.kind(), ErrorKind::TimedOut | ErrorKind::WouldBlock),
        "{err:?}"
    );
    assert!(t0.elapsed() >= Duration::from_millis(250));

    // Another source is not admitted by a pinhole for the client.
    fw.open(
        &pin("10.99.0.77", AppProto::Tcp, 8080, 42),
        secs(30),
        secs(60),
    )
    .expect("open other");
    connect(&lab, to).expect_err("pinhole for another address");

    fw.open(&pin(CLIENT4, AppProto::Tcp, 8080, 42), secs(30), secs(60))
        .expect("open");
    let mut c = connect_ok(&lab, to).expect("reachable after open");
    let (mut s, peer) = listener.accept().expect("accept");
    assert_eq!(peer.ip().to_string(), CLIENT4);
    exchange(&mut c, &mut s);
    let ct = lab
        .gateway
        .conntrack(&["-L", "-m", &(MARK_TAG | 42).to_string()]);
    assert!(
        ct.contains("dport=8080"),
        "conntrack entry of session 42: {ct}"
    );

    let t = Instant::now();
    fw.close_session(SessionId(42)).expect("close");
    eprintln!("close_session with a live flow: {:?}", t.elapsed());

    // The server speaks first: its packet must not re-create the flow
    // (TCP loose pickup), then the client tries too.
    s.write_all(b"late").expect("server write is buffered");
    expect_silence(&mut c, "client after close");
    c.write_all(b"more").expect("client write is buffered");
    expect_silence(&mut s, "server after close");
    let ct = lab
        .gateway
        .conntrack(&["-L", "-m", &(MARK_TAG | 42).to_string()]);
    assert!(
        !ct.contains("dport=8080"),
        "no conntrack entry revived: {ct}"
    );
    // And no new connection without a new knock.
    connect(&lab, to).expect_err("dark again after close");
}

#[test]
fn ipv6_tcp_with_neighbour_discovery_and_host_outbound_unaffected() {
    let lab = Lab::new();
    let listener = lab
        .gateway
        .run(|| TcpListener::bind((GATEWAY6, 8443)))
        .expect("listen");
    // A server on the client side, for the gateway's own outbound traffic.
    let outside = lab
        .client
        .run(|| TcpListener::bind("[::]:9000"))
        .expect("listen outside");
    let mut fw = install(&lab.gateway, cfg());
    // Forget the neighbours learnt while the lab was checked, so neighbour
    // discovery has to cross the dark ruleset.
    lab.client.ip(&["neigh", "flush", "dev", "pst-c"]);
    lab.gateway.ip(&["neigh", "flush", "dev", "pst-g"]);
    let to: SocketAddr = (GATEWAY6.parse::<IpAddr>().expect("ip"), 8443).into();
    connect(&lab, to).expect_err("dark before open");

    fw.open(&pin(CLIENT6, AppProto::Tcp, 8443, 6), secs(30), secs(60))
        .expect("open");
    let mut c = connect_ok(&lab, to).expect("reachable after open (ND works)");
    let (mut s, _) = listener.accept().expect("accept");
    exchange(&mut c, &mut s);

    // The gateway host's own outbound connections and their replies pass,
    // over IPv4 and IPv6.
    for target in [format!("{CLIENT4}:9000"), format!("[{CLIENT6}]:9000")] {
        let addr: SocketAddr = target.parse().expect("addr");
        let mut out = lab
            .gateway
            .run(move || TcpStream::connect_timeout(&addr, secs(2)))
            .expect("outbound from the gateway");
        let (mut inner, _) = outside.accept().expect("accept outside");
        exchange(&mut out, &mut inner);
    }

    // flush: every door shut, flows dead, ruleset kept.
    fw.flush().expect("flush");
    assert!(fw.list().expect("list").is_empty());
    assert!(fw.list_sessions().expect("sessions").is_empty());
    s.write_all(b"late").expect("buffered");
    expect_silence(&mut c, "client after flush");
    let text = lab.gateway.nft(&["list", "table", "inet", T]);
    assert!(text.contains("policy drop"), "{text}");
    connect(&lab, to).expect_err("dark after flush");
}

/// The host marks some of its own flows (wg-quick, policy routing): such a flow must keep
/// working beside Postern, and a session's conntrack cleanup must not delete it. Only
/// marks with Postern's tag are sessions. (Before the tag, `ct mark != 0` dropped it.)
#[test]
fn host_flows_with_their_own_marks_are_left_alone() {
    let lab = Lab::new();
    let outside = lab
        .client
        .run(|| TcpListener::bind("0.0.0.0:9001"))
        .expect("listen outside");
    // Another table of the host marks every new outbound connection, as wg-quick does.
    lab.gateway.nft(&["add table inet hostmarks"]);
    lab.gateway.nft(&[
        "add chain inet hostmarks out { type filter hook output priority mangle; policy accept; }",
    ]);
    lab.gateway
        .nft(&["add rule inet hostmarks out ct state new ct mark set 0x2a"]);
    let mut fw = install(&lab.gateway, cfg());
    let addr: SocketAddr = format!("{CLIENT4}:9001").parse().expect("addr");
    let mut out = lab
        .gateway
        .run(move || TcpStream::connect_timeout(&addr, secs(2)))
        .expect("a host flow with its own mark connects through the dark ruleset");
    let (mut inner, _) = outside.accept().expect("accept outside");
    exchange(&mut out, &mut inner);
    let ct = lab.gateway.conntrack(&["-L", "-m", "42"]);
    assert!(
        ct.contains("dport=9001"),
        "the host's flow carries mark 42: {ct}"
    );

    // A Postern session whose id equals the host's mark value: closing it must delete
    // only the tagged entries, not the host's flow.
    fw.open(&pin(CLIENT4, AppProto::Tcp, 8080, 42), secs(30), secs(60))
        .expect("open");
    fw.close_session(SessionId(42)).expect("close");
    let ct = lab.gateway.conntrack(&["-L", "-m", "42"]);
    assert!(
        ct.contains("dport=9001"),
        "the host's flow survived the cleanup: {ct}"
    );
    exchange(&mut out, &mut inner);
    fw.flush().expect("flush");
    exchange(&mut out, &mut inner);
}

#[test]
fn session_ids_outside_24_bits_are_refused() {
    let ns = Netns::new();
    let mut fw = install(&ns, cfg());
    let err = fw
        .open(
            &pin(CLIENT4, AppProto::Tcp, 8080, 0x0100_0000),
            secs(30),
            secs(60),
        )
        .expect_err("a 25-bit id would collide with the tag byte");
    assert!(matches!(err, FirewallError::Invalid(_)), "{err}");
}

#[test]
fn latency_of_open_and_close_session() {
    let ns = Netns::new();
    let mut fw = install(&ns, cfg());
    let n = 500u32;
    let t = Instant::now();
    for i in 0..n {
        let ip = format!("10.2.{}.{}", i / 250, i % 250 + 1);
        fw.open(&pin(&ip, AppProto::Tcp, 443, i + 1), secs(60), secs(600))
            .expect("open");
    }
    let open_us = t.elapsed().as_secs_f64() * 1e6 / f64::from(n);
    let t = Instant::now();
    for i in 0..n {
        let ip = format!("10.2.{}.{}", i / 250, i % 250 + 1);
        fw.open(&pin(&ip, AppProto::Tcp, 443, i + 1), secs(60), secs(600))
            .expect("renew");
    }
    let renew_us = t.elapsed().as_secs_f64() * 1e6 / f64::from(n);
    assert_eq!(fw.list().expect("list").len(), n as usize);
    let t = Instant::now();
    for i in 0..n {
        fw.close_session(SessionId(i + 1)).expect("close");
    }
    let close_us = t.elapsed().as_secs_f64() * 1e6 / f64::from(n);
    assert!(fw.list().expect("list").is_empty());
    println!(
        "postern-firewall latency: open {open_us:.1} us, renew {renew_us:.1} us, \
         close_session (incl. conntrack delete by mark) {close_us:.1} us, n={n}"
    );
    eprintln!(
        "postern-firewall latency: open {open_us:.1} us, renew {renew_us:.1} us, close_session {close_us:.1} us"
    );
}
