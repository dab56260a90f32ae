//! The control channel, controller side (docs/control-channel.md), end to end: the real
//! `postern-controller` binary with a real SQLite file, `serve --gateway-listen` on
//! 127.0.0.1 (ephemeral port) with real TLS 1.3, a gateway-side rustls client with an
//! rcgen self-signed certificate, and the Unix socket.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::gateway::{enroll, error_code, ChannelController, GatewayIdentity, TlsGateway};
use common::{ok, Client};
use postern_controller::proto::snapshot::Snapshot;
use postern_protocol::delta::{self, SnapshotDelta};
use serde_json::{json, Value};

fn snapshot_of(v: &Value) -> Snapshot {
    serde_json::from_value(v["snapshot"].clone()).unwrap_or_else(|e| panic!("{v}: {e}"))
}

fn delta_of(v: &Value) -> SnapshotDelta {
    serde_json::from_value(v["delta"].clone()).unwrap_or_else(|e| panic!("{v}: {e}"))
}

fn db(c: &ChannelController) -> rusqlite::Connection {
    let conn = rusqlite::Connection::open(&c.db).unwrap();
    conn.busy_timeout(Duration::from_secs(10)).unwrap();
    conn
}

fn revision(c: &ChannelController) -> u64 {
    db(c)
        .query_row("SELECT revision FROM meta WHERE id = 1", [], |r| r.get(0))
        .unwrap()
}

fn gateway_list(c: &ChannelController) -> Vec<Value> {
    serde_json::from_str(&ok(&c.db, &["gateway", "list", "--json"])).unwrap()
}

/// Adds gateway `name`, enrolls a fresh identity over TLS; returns the identity.
fn enrolled(c: &ChannelController, name: &str) -> GatewayIdentity {
    let token = c.add_gateway(name, &[]);
    let id = GatewayIdentity::generate();
    let answer = enroll(c.addr, &c.cert_sha256(), &id, &token);
    assert_eq!(answer, json!({"enrolled": {"name": name}}));
    id
}

/// Reads lines until a delta arrives (heartbeats in between are skipped; bounded).
fn next_delta(g: &mut TlsGateway) -> SnapshotDelta {
    for _ in 0..5 {
        let v = g.recv();
        if v.get("delta").is_some() {
            return delta_of(&v);
        }
        assert!(v.get("heartbeat").is_some(), "expected a delta, got {v}");
    }
    panic!("no delta after 5 lines");
}

fn session(id: u32) -> Value {
    json!({
        "session": id, "device": "0123456789abcdef0123456789abcdef", "device_name": "laptop",
        "user": "alice", "app": "web", "source": "192.0.2.7", "mode": "lease",
        "opened_at_ms": 1_000, "renewed_at_ms": 2_000, "expires_at_ms": 3_000
    })
}

fn live_sessions(c: &ChannelController, gateway: &str) -> Vec<(u32, String)> {
    let conn = db(c);
    let mut stmt = conn
        .prepare("SELECT session, source FROM live_sessions WHERE gateway = ?1 ORDER BY session")
        .unwrap();
    let rows = stmt
        .query_map([gateway], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap();
    rows.collect::<Result<_, _>>().unwrap()
}

/// Polls (bounded) until `gateway`'s live sessions are `want`.
fn wait_sessions(c: &ChannelController, gateway: &str, want: &[(u32, &str)]) {
    let want: Vec<(u32, String)> = want.iter().map(|(i, s)| (*i, (*s).to_owned())).collect();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let got = live_sessions(c, gateway);
        if got == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "live_sessions {got:?}, want {want:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn enrolled_gateway_gets_a_snapshot_then_deltas_and_resumes() {
    let c = ChannelController::start();
    let fp = c.cert_sha256();
    let token = c.add_gateway("edge-1", &[]);
    assert!(
        token.starts_with("postern-gateway:v1:") && token.ends_with(&format!(":{fp}")),
        "the token pins the controller certificate the channel presents: {token}"
    );
    let id = GatewayIdentity::generate();
    assert_eq!(
        enroll(c.addr, &fp, &id, &token),
        json!({"enrolled": {"name": "edge-1"}})
    );
    let list = gateway_list(&c);
    assert_eq!(list[0]["registered"], true);
    assert_eq!(
        list[0]["key_sha256"], id.spki_sha256,
        "registered as SHA-256 of the SPKI"
    );
    assert_eq!(list[0]["connected"], false);

    let mut g = TlsGateway::connect(c.addr, &fp, &id).unwrap();
    let first_snapshot = snapshot_of(&g.hello(None));
    let mut unix = Client::connect(&c.socket);
    assert_eq!(
        unix.sync(0),
        first_snapshot,
        "the same snapshot the long-poll serves"
    );
    let list = gateway_list(&c);
    assert_eq!(list[0]["connected"], true, "{list:?}");
    assert_eq!(list[0]["last_revision"], json!(null));

    // Every write reaches the open channel as a delta that applies to the held snapshot.
    let mut held = first_snapshot.clone();
    let mut latencies = Vec::new();
    for i in 0..5u16 {
        let name = format!("app{i}");
        let port = (8000 + i).to_string();
        let mut args = vec!["app", "add", &name, "--protocol", "tcp", "--port", &port];
        // Through the admin socket (published at once) and directly (the 50 ms poll).
        if i % 2 == 1 {
            args.insert(0, "--direct");
        }
        ok(&c.db, &args);
        let written = Instant::now();
        let d = next_delta(&mut g);
        latencies.push((i % 2 == 1, written.elapsed()));
        assert_eq!(d.from, held.revision);
        held = delta::apply(&held, &d).expect("the delta applies to the held snapshot");
        assert_eq!(
            held,
            unix.sync(0),
            "delta result = the controller's snapshot"
        );
    }
    for (direct, l) in &latencies {
        eprintln!(
            "delta push latency after the CLI returned ({}): {l:?}",
            if *direct { "--direct" } else { "admin socket" }
        );
        assert!(*l < Duration::from_secs(1), "{l:?}");
    }
    drop(g);

    // Resume at the current revision: a heartbeat, not a full snapshot.
    let mut g = TlsGateway::connect(c.addr, &fp, &id).unwrap();
    let v = g.hello(Some(held.revision));
    assert_eq!(v["heartbeat"]["revision"], held.revision, "{v}");
    drop(g);
    // Same revision, same content (the digest says so): a heartbeat too; same revision
    // with other content (a controller restored from a backup that wrote its way back
    // to this revision): a full snapshot, never "nothing new".
    let mut g = TlsGateway::connect(c.addr, &fp, &id).unwrap();
    g.send(
        &json!({"hello": {"version": 1, "after_revision": held.revision,
                              "digest": delta::digest(&held)}}),
    );
    let v = g.recv();
    assert_eq!(v["heartbeat"]["revision"], held.revision, "{v}");
    drop(g);
    let mut g = TlsGateway::connect(c.addr, &fp, &id).unwrap();
    g.send(
        &json!({"hello": {"version": 1, "after_revision": held.revision,
                              "digest": delta::digest(&first_snapshot)}}),
    );
    assert_eq!(snapshot_of(&g.recv()), held);
    drop(g);
    // Resume from an older revision still in memory: a delta from it.
    let mut g = TlsGateway::connect(c.addr, &fp, &id).unwrap();
    let d = delta_of(&g.hello(Some(first_snapshot.revision)));
    assert_eq!((d.from, d.to), (first_snapshot.revision, held.revision));
    assert_eq!(delta::apply(&first_snapshot, &d).unwrap(), held);
    drop(g);
    // A revision the controller does not know (ahead of it): a full snapshot.
    let mut g = TlsGateway::connect(c.addr, &fp, &id).unwrap();
    assert_eq!(snapshot_of(&g.hello(Some(held.revision + 1000))), held);
    assert!(c.wait_log("gateway connected", Duration::from_secs(2)));
    assert!(c.log.lock().unwrap().contains("gateway=edge-1"));
}

#[test]
fn tokens_and_keys_are_refused_when_not_valid() {
    let c = ChannelController::start();
    let fp = c.cert_sha256();
    let token = c.add_gateway("edge-1", &[]);
    let first = GatewayIdentity::generate();
    assert_eq!(
        enroll(c.addr, &fp, &first, &token),
        json!({"enrolled": {"name": "edge-1"}})
    );
    let other = GatewayIdentity::generate();
    let reused = enroll(c.addr, &fp, &other, &token);
    assert_eq!(error_code(&reused), "token_used", "{reused}");

    let expiring = c.add_gateway("edge-2", &["--expires", "1m"]);
    db(&c)
        .execute(
            "UPDATE gateways SET token_expires = 1 WHERE name = 'edge-2'",
            [],
        )
        .unwrap();
    let expired = enroll(c.addr, &fp, &other, &expiring);
    assert_eq!(error_code(&expired), "token_expired", "{expired}");

    let unknown = format!(
        "postern-gateway:v1:{}:{fp}",
        "A".repeat(43) // 32 zero bytes, base64url without padding
    );
    for bad in [
        unknown.as_str(),
        "not a token",
        &token.replace("gateway", "invite"),
    ] {
        let v = enroll(c.addr, &fp, &other, bad);
        assert_eq!(error_code(&v), "bad_token", "{bad}: {v}");
    }

    // A key that never registered cannot open a stream.
    let mut g = TlsGateway::connect(c.addr, &fp, &other).unwrap();
    let v = g.hello(None);
    assert_eq!(error_code(&v), "unknown_gateway", "{v}");
    assert!(g.try_recv().is_none(), "closed after the error");

    // The registered one can; its name is the registered one, not hello.name.
    let mut g = TlsGateway::connect(c.addr, &fp, &first).unwrap();
    g.send(&json!({"hello": {"version": 1, "after_revision": null, "name": "spoofed"}}));
    snapshot_of(&g.recv());
    assert!(c.wait_log("gateway=edge-1", Duration::from_secs(2)));

    let rows = common::ok(&c.db, &["audit", "list", "--json"]);
    assert!(rows.contains("gateway.register"), "{rows}");
}

#[test]
fn a_client_pinning_another_certificate_cannot_connect() {
    let c = ChannelController::start();
    let id = GatewayIdentity::generate();
    let wrong = common::gateway::pin_verifier(&"00".repeat(32));
    assert!(
        TlsGateway::connect_pinned(c.addr, &wrong, Some(&id)).is_err(),
        "the handshake must fail when the pinned fingerprint differs"
    );
    assert_eq!(
        wrong.take_mismatch(),
        Some(c.cert_sha256()),
        "refused for presenting the controller certificate, which is not the pinned one"
    );
    TlsGateway::connect(c.addr, &c.cert_sha256(), &id).expect("the right pin connects");

    // A client certificate is required: without one the controller aborts the handshake
    // (TLS 1.3: the client sees it on its first read) and never answers.
    let mut bare = TlsGateway::connect_as(c.addr, &c.cert_sha256(), None)
        .expect("the client side of the handshake completes");
    let _ = bare.try_send(&json!({"hello": {"version": 1}}));
    assert!(
        bare.try_recv().is_none(),
        "no answer without a client certificate"
    );
    assert!(c.wait_log("gateway TLS handshake failed", Duration::from_secs(2)));
}

#[test]
fn removed_gateway_is_closed_and_refused() {
    let c = ChannelController::start();
    let fp = c.cert_sha256();
    let id = enrolled(&c, "edge-1");
    let mut g = TlsGateway::connect(c.addr, &fp, &id).unwrap();
    snapshot_of(&g.hello(None));
    g.set_read_timeout(Duration::from_secs(5));
    let asked = Instant::now();
    ok(&c.db, &["gateway", "remove", "edge-1"]);
    eprintln!("`gateway remove` took {:?}", asked.elapsed());
    let v = g.recv();
    let closed_after = asked.elapsed();
    assert_eq!(error_code(&v), "gateway_removed", "{v}");
    assert!(g.try_recv().is_none(), "closed after the error");
    eprintln!("removed gateway's channel closed {closed_after:?} after `gateway remove` was run");
    assert!(
        closed_after < Duration::from_millis(1500),
        "{closed_after:?}"
    );

    let mut g = TlsGateway::connect(c.addr, &fp, &id).unwrap();
    let v = g.hello(None);
    assert_eq!(error_code(&v), "gateway_removed", "{v}");
    let list = gateway_list(&c);
    assert_eq!(
        (&list[0]["removed"], &list[0]["connected"]),
        (&json!(true), &json!(false))
    );

    // Re-issued, it enrolls again (same key) and streams.
    let token = c.add_gateway("edge-1", &["--reissue"]);
    assert_eq!(
        enroll(c.addr, &fp, &id, &token),
        json!({"enrolled": {"name": "edge-1"}})
    );
    let mut g = TlsGateway::connect(c.addr, &fp, &id).unwrap();
    snapshot_of(&g.hello(None));
}

#[test]
fn session_reports_are_stored_without_a_revision_bump() {
    let c = ChannelController::start();
    let fp = c.cert_sha256();
    let id = enrolled(&c, "edge-1");
    let mut g = TlsGateway::connect(c.addr, &fp, &id).unwrap();
    let held = snapshot_of(&g.hello(None));
    let idle_since = Instant::now();
    g.send(&json!({"sessions": {"at_ms": 5, "sessions": [session(1), session(2)], "omitted": 0}}));
    wait_sessions(&c, "edge-1", &[(1, "192.0.2.7"), (2, "192.0.2.7")]);
    let mut third = session(3);
    third["source"] = json!("198.51.100.9");
    g.send(&json!({"sessions": {"at_ms": 6, "sessions": [third]}}));
    wait_sessions(&c, "edge-1", &[(3, "198.51.100.9")]);
    assert_eq!(
        revision(&c),
        held.revision,
        "session reports are not registry data"
    );
    let (seen, rev): (Option<i64>, Option<i64>) = db(&c)
        .query_row(
            "SELECT last_seen_ms, last_revision FROM gateways WHERE name = 'edge-1'",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert!(seen.is_some_and(|s| s > 1_700_000_000_000), "{seen:?}");
    assert_eq!(rev, Some(held.revision as i64));

    // Nothing changed, so the next line is a heartbeat after 5 s of silence.
    let v = g.recv();
    let waited = idle_since.elapsed();
    assert_eq!(v["heartbeat"]["revision"], held.revision, "{v}");
    eprintln!("first heartbeat {waited:?} after the snapshot");
    assert!(
        waited >= Duration::from_millis(4500) && waited < Duration::from_secs(8),
        "{waited:?}"
    );

    // A malformed report is refused and the channel closed; the stored rows stay.
    g.send(&json!({"sessions": {"at_ms": 7, "sessions": [session(0)]}}));
    let v = g.recv();
    assert_eq!(error_code(&v), "bad_request", "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("session id 0"),
        "{v}"
    );
    assert!(g.try_recv().is_none());
    assert_eq!(live_sessions(&c, "edge-1").len(), 1);
}

#[test]
fn unix_socket_hello_streams_the_same_protocol() {
    let c = ChannelController::start();
    let mut local = Client::connect(&c.socket);
    local
        .send_raw(b"{\"hello\":{\"version\":1,\"after_revision\":null,\"name\":\"edge-local\"}}\n");
    let v = local.recv().unwrap();
    let mut held = snapshot_of(&v);
    // The long-poll still works beside it.
    let mut poll = Client::connect(&c.socket);
    assert_eq!(poll.sync(0), held);

    ok(
        &c.db,
        &["app", "add", "web", "--protocol", "tcp", "--port", "443"],
    );
    let v = local.recv().unwrap();
    held = delta::apply(&held, &delta_of(&v)).unwrap();
    assert_eq!(held, poll.sync(0));

    local.send_raw(
        format!(
            "{}\n",
            json!({"sessions": {"at_ms": 1, "sessions": [session(9)]}})
        )
        .as_bytes(),
    );
    wait_sessions(&c, "edge-local", &[(9, "192.0.2.7")]);

    // Without a name the gateway reports as "local"; bad lines close with bad_request.
    let mut unnamed = Client::connect(&c.socket);
    unnamed.send_raw(b"{\"hello\":{\"version\":1}}\n");
    snapshot_of(&unnamed.recv().unwrap());
    unnamed.send_raw(
        format!(
            "{}\n",
            json!({"sessions": {"at_ms": 1, "sessions": [session(4)]}})
        )
        .as_bytes(),
    );
    wait_sessions(&c, "local", &[(4, "192.0.2.7")]);
    // A remote gateway's name is not available to a local one (its rows would mix).
    c.add_gateway("edge-remote", &[]);
    let mut squatter = Client::connect(&c.socket);
    squatter.send_raw(b"{\"hello\":{\"version\":1,\"name\":\"edge-remote\"}}\n");
    let v = squatter.recv().unwrap();
    assert_eq!(error_code(&v), "bad_request", "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("belongs to a remote gateway"),
        "{v}"
    );
    unnamed.send_raw(b"{\"hello\":{\"version\":1}}\n");
    let v = unnamed.recv().unwrap();
    assert_eq!(error_code(&v), "bad_request", "{v}");
    assert!(unnamed.try_recv().is_none());

    for (first, needle) in [
        (
            &b"{\"hello\":{\"version\":1,\"name\":\"a:b\"}}\n"[..],
            "gateway name",
        ),
        (b"{\"hello\":{\"version\":2}}\n", "version 2"),
        (b"{\"hello\":{\"version\":1,\"x\":1}}\n", "malformed"),
        (b"{\"enroll\":{\"token\":\"t\"}}\n", "TLS channel"),
    ] {
        let mut c2 = Client::connect(&c.socket);
        c2.send_raw(first);
        let v = c2.recv().unwrap();
        assert_eq!(error_code(&v), "bad_request", "{v}");
        assert!(
            v["error"]["message"].as_str().unwrap().contains(needle),
            "{v}"
        );
        assert!(c2.try_recv().is_none());
    }
}

#[test]
fn an_over_long_line_closes_the_channel() {
    let c = ChannelController::start();
    // Over TLS the first line comes before the key check: capped at 64 KiB.
    let stranger = GatewayIdentity::generate();
    let mut g = TlsGateway::connect(c.addr, &c.cert_sha256(), &stranger).unwrap();
    let _ = g.try_send(&json!({"enroll": {"token": "x".repeat(70 * 1024)}}));
    if let Some(v) = g.try_recv() {
        eprintln!("first-line cap answer: {v}");
        assert_eq!(error_code(&v), "bad_request", "{v}");
        assert!(
            v["error"]["message"].as_str().unwrap().contains("65536"),
            "{v}"
        );
    }
    assert!(g.try_recv().is_none());

    let mut local = Client::connect(&c.socket);
    local.send_raw(b"{\"hello\":{\"version\":1}}\n");
    snapshot_of(&local.recv().unwrap());
    // 16 MiB + 1 without a newline; the controller stops reading at the cap.
    let chunk = vec![b'x'; 1024 * 1024];
    let mut sent_all = true;
    for _ in 0..17 {
        if !local.try_send(&chunk) {
            sent_all = false;
            break;
        }
    }
    // The error line arrives unless the peer's close raced it; either way it closes.
    match local.try_recv() {
        Some(v) => {
            eprintln!("16 MiB cap answer: {v}");
            assert_eq!(error_code(&v), "bad_request", "{v}");
            assert!(
                v["error"]["message"]
                    .as_str()
                    .unwrap()
                    .contains("longer than"),
                "{v}"
            );
        }
        None => assert!(!sent_all, "neither an error nor a closed connection"),
    }
    assert!(local.try_recv().is_none());
}

#[test]
fn a_silent_gateway_is_dropped_and_reports_keep_it() {
    let c = ChannelController::start_with(&["--gateway-silence-ms", "1000"]);
    let fp = c.cert_sha256();
    let id = enrolled(&c, "edge-1");
    let mut g = TlsGateway::connect(c.addr, &fp, &id).unwrap();
    snapshot_of(&g.hello(None));
    // Reports every 300 ms keep the channel past the 1 s silence limit.
    for i in 0..8 {
        g.send(&json!({"sessions": {"at_ms": i, "sessions": []}}));
        std::thread::sleep(Duration::from_millis(300));
    }
    let quiet = Instant::now();
    let end = g.try_recv();
    let after = quiet.elapsed();
    assert!(end.is_none(), "closed, not {end:?}");
    eprintln!("silent gateway dropped {after:?} after its last line (limit 1 s)");
    assert!(
        after >= Duration::from_millis(600) && after < Duration::from_secs(3),
        "{after:?}"
    );
    assert!(c.wait_log("no line from the gateway", Duration::from_secs(2)));
}

#[test]
fn connections_beyond_the_cap_get_busy() {
    let c = ChannelController::start();
    let fp = c.cert_sha256();
    let id = enrolled(&c, "edge-1");
    let started = Instant::now();
    let mut open = Vec::new();
    for _ in 0..256 {
        let mut g = TlsGateway::connect(c.addr, &fp, &id).unwrap();
        snapshot_of(&g.hello(None));
        open.push(g);
    }
    eprintln!("256 channels opened in {:?}", started.elapsed());
    let mut extra = TlsGateway::connect(c.addr, &fp, &id).unwrap();
    let v = extra.hello(None);
    assert_eq!(error_code(&v), "busy", "{v}");
    drop(open.pop());
    // The freed slot is usable once the controller has seen the close (bounded wait).
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut g = TlsGateway::connect(c.addr, &fp, &id).unwrap();
        let v = g.hello(None);
        if v.get("snapshot").is_some() {
            break;
        }
        assert_eq!(error_code(&v), "busy", "{v}");
        assert!(Instant::now() < deadline, "slot not freed");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn unregistered_peers_cannot_take_the_gateways_slots() {
    let c = ChannelController::start();
    let fp = c.cert_sha256();
    let id = enrolled(&c, "edge-1");
    // Peers with keys nobody registered complete the handshake and then say nothing:
    // each holds a slot of the small unregistered pool for up to 10 s.
    let mut idle = Vec::new();
    for _ in 0..16 {
        idle.push(TlsGateway::connect(c.addr, &fp, &GatewayIdentity::generate()).unwrap());
    }
    std::thread::sleep(Duration::from_millis(500));
    let mut extra = TlsGateway::connect(c.addr, &fp, &GatewayIdentity::generate()).unwrap();
    extra.set_read_timeout(Duration::from_secs(5));
    let v = extra.recv();
    assert_eq!(error_code(&v), "busy", "{v}");
    // The registered gateway is not affected.
    let mut g = TlsGateway::connect(c.addr, &fp, &id).unwrap();
    snapshot_of(&g.hello(None));
    drop(idle);
}
