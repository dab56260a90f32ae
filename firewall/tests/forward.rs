//! Real-kernel tests of forward mode (connector): a client namespace, the
//! gateway namespace (the firewall under test) and an internal app host behind
//! it, each its own network namespace.
//!
//! Owns: namespaces named `pst-fw-<pid>-<n>` (see `common`), the veth pair to
//! the internal host and the sysctls inside the gateway namespace, all gone
//! when the namespaces are deleted on drop.
//! Must not touch: the root namespace's nftables, conntrack or sysctls.

mod common;

use std::{
    io::{ErrorKind, Write},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream},
    process::Command,
    thread::sleep,
    time::{Duration, Instant},
};

use common::{exchange, expect_silence, secs, Lab, Netns, CLIENT4, CLIENT6, GATEWAY4, GATEWAY6};
use postern_firewall::{
    AppProto, Firewall, FirewallConfig, FirewallError, Pinhole, SessionId, MARK_TAG,
};

const T: &str = "postern";
/// The gateway's address on the internal network.
const GW_INNER4: &str = "10.98.0.1";
const GW_INNER6: &str = "fd98::1";
/// The internal app host.
const APP4: &str = "10.98.0.2";
const APP6: &str = "fd98::2";
/// Port the client knocks for and connects to on the gateway.
const PUBLIC_PORT: u16 = 8443;
/// Port of the app on the internal host, and a second service there that the
/// client must never reach.
const APP_PORT: u16 = 80;
const OTHER_PORT: u16 = 9090;

/// The two-namespace lab plus an internal host behind the gateway. The client
/// has a route to the internal network through the gateway (so it could try
/// to reach it directly); the internal host gets no route back unless asked.
struct ForwardLab {
    lab: Lab,
    internal: Netns,
}

impl ForwardLab {
    fn new(route_back: bool) -> ForwardLab {
        let lab = Lab::new();
        let internal = Netns::new();
        lab.gateway.ip(&[
            "link",
            "add",
            "name",
            "pst-i",
            "type",
            "veth",
            "peer",
            "name",
            "pst-a",
            "netns",
            &internal.name,
        ]);
        lab.gateway
            .ip(&["addr", "add", &format!("{GW_INNER4}/24"), "dev", "pst-i"]);
        lab.gateway.ip(&[
            "addr",
            "add",
            &format!("{GW_INNER6}/64"),
            "dev",
            "pst-i",
            "nodad",
        ]);
        internal.ip(&["addr", "add", &format!("{APP4}/24"), "dev", "pst-a"]);
        internal.ip(&[
            "addr",
            "add",
            &format!("{APP6}/64"),
            "dev",
            "pst-a",
            "nodad",
        ]);
        lab.gateway.ip(&["link", "set", "pst-i", "up"]);
        internal.ip(&["link", "set", "pst-a", "up"]);
        lab.client
            .ip(&["route", "add", "10.98.0.0/24", "via", GATEWAY4]);
        lab.client
            .ip(&["-6", "route", "add", "fd98::/64", "via", GATEWAY6]);
        if route_back {
            internal.ip(&["route", "add", "10.99.0.0/24", "via", GW_INNER4]);
            internal.ip(&["-6", "route", "add", "fd99::/64", "via", GW_INNER6]);
        }
        // What the gateway daemon does when an app has a forward target; the
        // firewall crate itself never changes sysctls.
        for key in ["net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"] {
            let out = Command::new("ip")
                .args(["netns", "exec", &lab.gateway.name, "sysctl", "-qw", key])
                .output()
                .expect("run sysctl (Debian package procps)");
            assert!(
                out.status.success(),
                "sysctl -w {key}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let fl = ForwardLab { lab, internal };
        // The internal link carries packets: the gateway gets a RST from a
        // closed port of the internal host.
        for target in [format!("{APP4}:9"), format!("[{APP6}]:9")] {
            let addr: SocketAddr = target.parse().expect("addr");
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                let r = fl
                    .lab
                    .gateway
                    .run(move || TcpStream::connect_timeout(&addr, Duration::from_millis(200)));
                match r {
                    Err(e) if e.kind() == ErrorKind::ConnectionRefused => break,
                    _ if Instant::now() > deadline => {
                        panic!("internal link to {target} never came up")
                    }
                    _ => sleep(Duration::from_millis(50)),
                }
            }
        }
        fl
    }

    fn listen(&self, addr: SocketAddr) -> TcpListener {
        let l = self
            .internal
            .run(move || TcpListener::bind(addr))
            .expect("listen on the internal host");
        l.set_nonblocking(false).expect("blocking");
        l
    }
}

fn sa(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse::<IpAddr>().expect("ip"), port)
}

fn install(ns: &Netns, cfg: FirewallConfig) -> Firewall {
    ns.run(move || Firewall::install(&cfg)).expect("install")
}

/// Connect from the client namespace; failure expected (300 ms).
fn connect(lab: &Lab, to: SocketAddr) -> std::io::Result<TcpStream> {
    lab.client
        .run(move || TcpStream::connect_timeout(&to, Duration::from_millis(300)))
}

/// Connect from the client namespace; success expected (2 s).
fn connect_ok(lab: &Lab, to: SocketAddr) -> TcpStream {
    lab.client
        .run(move || TcpStream::connect_timeout(&to, secs(2)))
        .unwrap_or_else(|e| panic!("connect to {to}: {e}"))
}

fn assert_unreachable(lab: &Lab, to: SocketAddr, what: &str) {
    if let Ok(s) = connect(lab, to) {
        panic!("{what}: {to} accepted a connection ({:?})", s.peer_addr());
    }
}

/// Accepts one connection within 2 s.
fn accept(l: &TcpListener) -> (TcpStream, SocketAddr) {
    l.set_nonblocking(true).expect("nonblocking");
    let deadline = Instant::now() + secs(2);
    loop {
        match l.accept() {
            Ok((s, peer)) => {
                s.set_nonblocking(false).expect("blocking");
                return (s, peer);
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock && Instant::now() < deadline => {
                sleep(Duration::from_millis(5));
            }
            Err(e) => panic!("accept on the internal host: {e}"),
        }
    }
}

/// Nothing must have been accepted on `l` (the client never got through).
fn assert_no_accept(l: &TcpListener, what: &str) {
    l.set_nonblocking(true).expect("nonblocking");
    match l.accept() {
        Err(e) if e.kind() == ErrorKind::WouldBlock => {}
        other => panic!("{what}: the internal listener saw {other:?}"),
    }
}

/// Revocation cuts a forwarded flow both ways; a late reply from the app side
/// must not revive it (TCP loose pickup), and nothing new gets through.
fn assert_cut(fl: &ForwardLab, c: &mut TcpStream, s: &mut TcpStream, mark: u32, to: SocketAddr) {
    s.write_all(b"late").expect("app write is buffered");
    expect_silence(c, "client after close_session");
    c.write_all(b"more").expect("client write is buffered");
    expect_silence(s, "app after close_session");
    let ct = fl
        .lab
        .gateway
        .conntrack(&["-L", "-m", &(MARK_TAG | mark).to_string()]);
    assert!(
        !ct.contains(&format!("dport={APP_PORT}")),
        "no conntrack entry revived: {ct}"
    );
    assert_unreachable(&fl.lab, to, "new connection after close_session");
}

#[test]
fn forward_reaches_only_its_target_survives_pinhole_expiry_and_dies_with_the_session() {
    // SNAT on (the default): the internal host has no route back to clients.
    let fl = ForwardLab::new(false);
    let app = fl.listen(sa(APP4, APP_PORT));
    let other = fl.listen(sa(APP4, OTHER_PORT));
    let mut fw = install(&fl.lab.gateway, FirewallConfig::default());
    let public = sa(GATEWAY4, PUBLIC_PORT);

    // Dark before the knock: the public port, the app and the other service.
    assert_unreachable(&fl.lab, public, "before the knock");
    assert_unreachable(&fl.lab, sa(APP4, APP_PORT), "app address directly");
    assert_no_accept(&app, "before the knock");

    let pinhole = Pinhole {
        addr: CLIENT4.parse().expect("ip"),
        proto: AppProto::Tcp,
        port: PUBLIC_PORT,
        session: SessionId(77),
        forward: Some(sa(APP4, APP_PORT)),
    };
    let opened = Instant::now();
    fw.open(&pinhole, secs(2), secs(60)).expect("open");
    let live = fw.list().expect("list");
    assert_eq!(live.len(), 1, "{live:?}");
    assert_eq!(live[0].forward, Some(sa(APP4, APP_PORT)));
    assert_eq!(fl.lab.gateway.elems("map", T, "forwards4").len(), 1);

    let mut c = connect_ok(&fl.lab, public);
    let (mut s, peer) = accept(&app);
    // SNAT: the app sees the gateway's internal address, not the client.
    assert_eq!(peer.ip().to_string(), GW_INNER4);
    exchange(&mut c, &mut s);
    let ct = fl
        .lab
        .gateway
        .conntrack(&["-L", "-m", &(MARK_TAG | 77).to_string()]);
    assert!(
        ct.contains(&format!("dport={PUBLIC_PORT}")) && ct.contains(&format!("sport={APP_PORT}")),
        "a DNATed conntrack entry marked 77: {ct}"
    );

    // Nothing else of the internal network, even with a live session.
    assert_unreachable(&fl.lab, sa(APP4, APP_PORT), "app address directly");
    assert_unreachable(&fl.lab, sa(APP4, OTHER_PORT), "other service directly");
    assert_unreachable(
        &fl.lab,
        sa(GATEWAY4, OTHER_PORT),
        "other port on the gateway",
    );
    assert_unreachable(
        &fl.lab,
        sa(GW_INNER4, OTHER_PORT),
        "gateway's internal address",
    );
    assert_no_accept(&app, "direct attempts");
    assert_no_accept(&other, "the other service");

    // The pinhole expires: no new connection, but the established flow lives
    // on its session.
    let left = (opened + Duration::from_millis(2300)).saturating_duration_since(Instant::now());
    sleep(left);
    assert!(fw.list().expect("list").is_empty());
    assert!(fl.lab.gateway.elems("map", T, "forwards4").is_empty());
    assert_unreachable(&fl.lab, public, "after the pinhole expired");
    assert_no_accept(&app, "after the pinhole expired");
    exchange(&mut c, &mut s);

    let t = Instant::now();
    fw.close_session(SessionId(77)).expect("close");
    eprintln!(
        "close_session with a live forwarded flow: {:?}",
        t.elapsed()
    );
    assert_cut(&fl, &mut c, &mut s, 77, public);
    assert_no_accept(&app, "after close_session");
}

#[test]
fn forward_ipv6_without_snat_sees_the_client_and_is_cut_by_close_session() {
    let fl = ForwardLab::new(true);
    let app = fl.listen(sa(APP6, APP_PORT));
    let cfg = FirewallConfig {
        forward_snat: false,
        ..FirewallConfig::default()
    };
    let mut fw = install(&fl.lab.gateway, cfg);
    let text = fl.lab.gateway.nft(&["list", "table", "inet", T]);
    assert!(!text.contains("masquerade"), "{text}");
    let public = sa(GATEWAY6, PUBLIC_PORT);
    assert_unreachable(&fl.lab, public, "before the knock");

    // A forward target of the other family is refused: nftables cannot DNAT
    // an IPv6 flow to an IPv4 host.
    let mut pinhole = Pinhole {
        addr: CLIENT6.parse().expect("ip"),
        proto: AppProto::Tcp,
        port: PUBLIC_PORT,
        session: SessionId(66),
        forward: Some(sa(APP4, APP_PORT)),
    };
    let err = fw.open(&pinhole, secs(30), secs(60)).expect_err("family");
    assert!(matches!(err, FirewallError::Invalid(_)), "{err:?}");
    assert!(fw.list().expect("list").is_empty());

    pinhole.forward = Some(sa(APP6, APP_PORT));
    fw.open(&pinhole, secs(30), secs(60)).expect("open");
    let mut c = connect_ok(&fl.lab, public);
    let (mut s, peer) = accept(&app);
    assert_eq!(
        peer.ip().to_string(),
        CLIENT6,
        "no SNAT: the app sees the client"
    );
    exchange(&mut c, &mut s);
    assert_unreachable(&fl.lab, sa(APP6, APP_PORT), "app address directly");
    assert_no_accept(&app, "direct attempt");

    fw.close_session(SessionId(66)).expect("close");
    assert!(fl.lab.gateway.elems("map", T, "forwards6").is_empty());
    assert_cut(&fl, &mut c, &mut s, 66, public);
}

#[test]
fn a_pinhole_loses_its_forward_target_and_flush_clears_forwards() {
    let fl = ForwardLab::new(false);
    let app = fl.listen(sa(APP4, APP_PORT));
    // The same port served on the gateway itself, for the non-forward pinhole.
    let local = fl
        .lab
        .gateway
        .run(|| TcpListener::bind((GATEWAY4, PUBLIC_PORT)))
        .expect("listen on the gateway");
    let mut fw = install(&fl.lab.gateway, FirewallConfig::default());
    let public = sa(GATEWAY4, PUBLIC_PORT);
    let mut pinhole = Pinhole {
        addr: CLIENT4.parse().expect("ip"),
        proto: AppProto::Tcp,
        port: PUBLIC_PORT,
        session: SessionId(5),
        forward: Some(sa(APP4, APP_PORT)),
    };
    fw.open(&pinhole, secs(30), secs(60)).expect("open");
    // Renewing with the same target keeps one element.
    fw.open(&pinhole, secs(30), secs(60)).expect("renew");
    assert_eq!(fl.lab.gateway.elems("map", T, "forwards4").len(), 1);
    let c = connect_ok(&fl.lab, public);
    let (_s, _) = accept(&app);
    drop(c);

    // The app stops forwarding (registry change): the next open delivers locally.
    pinhole.forward = None;
    fw.open(&pinhole, secs(30), secs(60))
        .expect("open without forward");
    assert!(fl.lab.gateway.elems("map", T, "forwards4").is_empty());
    let _c = connect_ok(&fl.lab, public);
    local.set_nonblocking(false).expect("blocking");
    let (_l, peer) = local.accept().expect("accept locally");
    assert_eq!(peer.ip().to_string(), CLIENT4);
    assert_no_accept(&app, "after the forward was removed");

    pinhole.forward = Some(sa(APP4, APP_PORT));
    fw.open(&pinhole, secs(30), secs(60))
        .expect("forward again");
    assert_eq!(fl.lab.gateway.elems("map", T, "forwards4").len(), 1);
    fw.flush().expect("flush");
    assert!(fl.lab.gateway.elems("map", T, "forwards4").is_empty());
    assert_unreachable(&fl.lab, public, "after flush");
}
