//! Client API tests against a real `postern-controller serve --api 127.0.0.1:0` process with
//! a temporary SQLite file, over real TLS on loopback, driven by the client library
//! (`postern_client::api_client`: pinned HTTPS and signed requests).
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{cmd, fails, ok};
use postern_client::api_client::{ApiClient, ApiClientError, ApiResponse};
use postern_controller::registry::Registry;
use postern_protocol::api_auth::{self, InviteToken};
use postern_protocol::keys::DeviceSigningKey;

/// A posture report collected now (the controller refuses facts older than their lifetime).
fn report_now() -> String {
    format!(
        r#"{{"collected_at":"{}","os_family":"linux","os_version":"12","kernel":"6.1.0-13-amd64","last_package_update":"2026-11-20T08:00:00Z","disk_encrypted":true,"firewall_on":true,"processes":["falcon-sensor"],"mdm_enrolled":false,"custom":{{"screen-lock":true}}}}"#,
        postern_policy::Timestamp::now()
    )
}

/// A running controller with the API on a loopback port; killed on drop.
struct Controller {
    child: Child,
    /// Kept until drop (taken by `restart`).
    dir: Option<tempfile::TempDir>,
    db: PathBuf,
    url: String,
    fingerprint: [u8; 32],
    /// Everything the controller logged so far.
    log: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Drop for Controller {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Controller {
    fn start() -> Controller {
        Controller::start_in(tempfile::tempdir().unwrap())
    }

    /// Stops this controller (SIGKILL) and starts a new one on the same files.
    fn restart(mut self) -> Controller {
        let dir = self.dir.take().unwrap();
        drop(self);
        Controller::start_in(dir)
    }

    fn start_in(dir: tempfile::TempDir) -> Controller {
        let db = dir.path().join("registry.db");
        // The API identity is created by the first `device invite` or by `serve`.
        let mut child = cmd(&db)
            .args(["serve", "--socket"])
            .arg(dir.path().join("sync.sock"))
            .args(["--api", "127.0.0.1:0"])
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let log_writer = std::sync::Arc::clone(&log);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                log_writer.lock().unwrap().push_str(&line);
                log_writer.lock().unwrap().push('\n');
                if let Some(rest) = line.split("api listening on ").nth(1) {
                    let addr = rest.split_whitespace().next().unwrap_or_default();
                    let _ = tx.send(addr.to_owned());
                }
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("serve --api logs `api listening on ADDR` within 30 s");
        assert!(addr.starts_with("127.0.0.1:"), "{addr}");
        let cert = std::fs::read_to_string(dir.path().join("api/cert.pem")).unwrap();
        let der = pem_to_der(&cert);
        let digest = ring_sha256(&der);
        Controller {
            child,
            db,
            url: format!("https://{addr}"),
            fingerprint: digest,
            log,
            dir: Some(dir),
        }
    }

    fn client(&self) -> ApiClient {
        ApiClient::new(&self.url, self.fingerprint).unwrap()
    }

    /// `device invite NAME --user alice --json` through the CLI; returns the token text.
    fn invite(&self, name: &str, extra: &[&str]) -> String {
        let mut args = vec!["device", "invite", name, "--user", "alice", "--json"];
        args.extend_from_slice(extra);
        let out = ok(&self.db, &args);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["device_name"], name);
        assert_eq!(v["cert_sha256"], hex::encode(self.fingerprint));
        v["token"].as_str().unwrap().to_owned()
    }
}

fn pem_to_der(pem: &str) -> Vec<u8> {
    use base64::Engine as _;
    let b64: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    base64::engine::general_purpose::STANDARD
        .decode(b64)
        .unwrap()
}

fn ring_sha256(data: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    hex::decode_to_slice(api_auth::sha256_hex(data), &mut out).unwrap();
    out
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn device_key(b: u8) -> DeviceSigningKey {
    DeviceSigningKey::from_seed([b; 32])
}

fn status_of(r: Result<ApiResponse, ApiClientError>) -> (u16, String) {
    let r = r.unwrap();
    (r.status, r.error_message())
}

fn enroll_status(c: &ApiClient, token: &str, key: &DeviceSigningKey) -> (u16, String) {
    match c.enroll(token, key) {
        Ok(_) => (200, String::new()),
        Err(ApiClientError::Status { status, message }) => (status, message),
        Err(e) => panic!("transport error: {e}"),
    }
}

/// Starts a controller with user alice and one enrolled device (key seed 1).
fn enrolled() -> (Controller, DeviceSigningKey) {
    let ctl = Controller::start();
    ok(&ctl.db, &["user", "add", "alice"]);
    let token = ctl.invite("laptop", &[]);
    let key = device_key(1);
    let answer = ctl.client().enroll(&token, &key).unwrap();
    assert_eq!(answer.device_id, key.public_key().device_id().to_string());
    (ctl, key)
}

#[test]
fn enroll_once_then_reused_unknown_and_expired_tokens_are_refused() {
    let ctl = Controller::start();
    ok(&ctl.db, &["user", "add", "alice"]);
    let c = ctl.client();
    let token = ctl.invite("laptop", &["--expires", "1h"]);
    let key = device_key(1);
    let answer = c.enroll(&token, &key).unwrap();
    assert_eq!(
        (answer.name.as_str(), answer.user.as_str()),
        ("laptop", "alice")
    );
    let listed = ok(&ctl.db, &["device", "list", "--json"]);
    assert!(listed.contains(&answer.device_id), "{listed}");

    // Reuse, even with another key.
    let (status, msg) = enroll_status(&c, &token, &device_key(2));
    assert_eq!(status, 409, "{msg}");
    assert!(msg.starts_with("invite already used at 20"), "{msg}");
    assert!(msg.contains("ask the admin for a new one"), "{msg}");

    // Unknown token (right format, right pin, never issued).
    let unknown = InviteToken::new([0x42; 32], ctl.fingerprint).to_text();
    let (status, msg) = enroll_status(&c, &unknown, &device_key(3));
    assert_eq!(status, 401, "{msg}");
    assert!(msg.contains("not known"), "{msg}");

    // Expired: an invite created (through the library, on the same file) an hour ago for 1m.
    let expired = Registry::open(&ctl.db)
        .unwrap()
        .create_invite("old-laptop", "alice", 60, ctl.fingerprint, now() - 3600)
        .unwrap()
        .token
        .to_text();
    let (status, msg) = enroll_status(&c, &expired, &device_key(4));
    assert_eq!(status, 410, "{msg}");
    assert!(msg.starts_with("invite expired at"), "{msg}");

    // A proof made by another key than the one being registered.
    let token2 = ctl.invite("phone", &[]);
    let thief = device_key(5);
    let body = serde_json::json!({
        "token": token2,
        "public_key": device_key(6).public_key().to_text(),
        "proof": api_auth::sign_enroll(&thief, &token2),
    });
    let (status, msg) =
        status_of(c.exchange("POST", "/v1/enroll", &[], body.to_string().as_bytes()));
    assert_eq!(status, 401, "{msg}");
    assert!(msg.contains("proof does not verify"), "{msg}");
    // The invite was not consumed by the failed attempt.
    c.enroll(&token2, &device_key(6)).unwrap();

    // Audit trail has the invite and the enrollment.
    let conn = rusqlite::Connection::open(&ctl.db).unwrap();
    let actions: Vec<String> = conn
        .prepare("SELECT action FROM audit ORDER BY id")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert!(
        actions.iter().filter(|a| *a == "device.enroll").count() == 2,
        "{actions:?}"
    );
    assert!(actions.iter().any(|a| a == "device.invite"), "{actions:?}");

    // Tokens (and their secrets) never reach the log.
    std::thread::sleep(Duration::from_millis(200));
    let log = ctl.log.lock().unwrap().clone();
    assert!(log.contains("device enrolled"), "{log}");
    for t in [token.as_str(), token2.as_str(), expired.as_str()] {
        let secret = t.split(':').nth(2).unwrap();
        assert!(!log.contains(secret), "token secret logged: {log}");
    }
}

#[test]
fn invite_cli_refuses_bad_input_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("r.db");
    let api_dir = dir.path().join("api");
    let api = api_dir.to_str().unwrap();
    let invite = [
        "--api-dir",
        api,
        "device",
        "invite",
        "laptop",
        "--user",
        "bob",
    ];
    fails(&db, &invite, 2, "postern-controller user add bob");
    fails(
        &db,
        &[&invite[..], &["--expires", "31d"]].concat(),
        2,
        "--expires",
    );
    ok(&db, &["user", "add", "alice"]);
    let token = ok(
        &db,
        &[
            "--api-dir",
            api,
            "device",
            "invite",
            "laptop",
            "--user",
            "alice",
        ],
    );
    let parsed = InviteToken::parse(token.trim()).unwrap();
    let der = pem_to_der(&std::fs::read_to_string(api_dir.join("cert.pem")).unwrap());
    assert_eq!(
        *parsed.cert_sha256(),
        ring_sha256(&der),
        "token pins the API cert"
    );
    let stored: String = rusqlite::Connection::open(&db)
        .unwrap()
        .query_row("SELECT token_hash FROM invites", [], |r| r.get(0))
        .unwrap();
    assert_eq!(stored, parsed.secret_hash_hex());
    assert!(!stored.contains(&token), "only the hash is stored");
}

#[test]
fn posture_requires_a_fresh_signature_by_the_registered_key() {
    let (ctl, key) = enrolled();
    let c = ctl.client();
    let report = report_now();
    let body = report.as_bytes();

    let r = c.signed(&key, "POST", "/v1/posture", body).unwrap();
    assert_eq!(r.status, 200, "{}", r.error_message());
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert!(v["expires_at"].as_str().unwrap().starts_with("20"), "{v}");

    // Signed by another key, claiming to be the enrolled device.
    let mut forged =
        api_auth::sign_request(&device_key(9), "POST", "/v1/posture", body, now(), [1; 16]);
    forged.device = key.public_key().device_id();
    let (status, msg) = status_of(c.send_signed(&forged, "POST", "/v1/posture", body));
    assert_eq!(status, 401, "{msg}");
    assert!(msg.contains("signature"), "{msg}");

    // Signed by a key that was never enrolled.
    let (status, msg) = status_of(c.signed(&device_key(9), "POST", "/v1/posture", body));
    assert_eq!(status, 401, "{msg}");
    assert!(msg.contains("unknown device"), "{msg}");

    // Exact replay of an accepted request.
    let once = api_auth::sign_request(&key, "POST", "/v1/posture", body, now(), [2; 16]);
    let (status, msg) = status_of(c.send_signed(&once, "POST", "/v1/posture", body));
    assert_eq!(status, 200, "{msg}");
    let (status, msg) = status_of(c.send_signed(&once, "POST", "/v1/posture", body));
    assert_eq!(status, 409, "{msg}");
    assert!(msg.contains("replayed"), "{msg}");

    // Stale and future timestamps.
    for ts in [now() - 120, now() + 120] {
        let h = api_auth::sign_request(&key, "POST", "/v1/posture", body, ts, [3; 16]);
        let (status, msg) = status_of(c.send_signed(&h, "POST", "/v1/posture", body));
        assert_eq!(status, 401, "{msg}");
        assert!(msg.contains("device clock"), "{msg}");
    }

    // No signature at all (a leaked invite token is not a credential here).
    let (status, msg) = status_of(c.exchange("POST", "/v1/posture", &[], body));
    assert_eq!(status, 400, "{msg}");
    assert!(msg.contains("missing header x-postern-device"), "{msg}");

    // A signed but malformed report is refused with the field named.
    let (status, msg) =
        status_of(c.signed(&key, "POST", "/v1/posture", br#"{"os_family":"linux"}"#));
    assert_eq!(status, 400, "{msg}");
    assert!(msg.contains("collected_at"), "{msg}");

    // Oversized bodies are refused before anything else.
    let big = vec![b' '; 70 * 1024];
    let (status, msg) = status_of(c.signed(&key, "POST", "/v1/posture", &big));
    assert_eq!(status, 413, "{msg}");
    assert!(msg.contains("over 65536 bytes"), "{msg}");
    let (status, msg) = status_of(c.exchange("GET", "/v1/posture", &[], b""));
    assert_eq!(status, 405, "{msg}");
    let (status, msg) = status_of(c.exchange("GET", "/v2/nothing", &[], b""));
    assert_eq!(status, 404, "{msg}");

    // Revoked devices are refused.
    ok(&ctl.db, &["device", "revoke", "laptop"]);
    let (status, msg) = status_of(c.signed(&key, "POST", "/v1/posture", body));
    assert_eq!(status, 403, "{msg}");
}

#[test]
fn whoami_reports_the_enrolled_device() {
    let (ctl, key) = enrolled();
    let r = ctl.client().signed(&key, "GET", "/v1/whoami", b"").unwrap();
    assert_eq!(r.status, 200, "{}", r.error_message());
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(v["name"], "laptop");
    assert_eq!(v["user"], "alice");
    assert_eq!(v["last_mfa"], serde_json::Value::Null);
}

#[test]
fn client_refuses_a_controller_whose_certificate_does_not_match_the_pin() {
    let ctl = Controller::start();
    let wrong = [0x11; 32];
    let c = ApiClient::new(&ctl.url, wrong).unwrap();
    let err = c.exchange("GET", "/v1/whoami", &[], b"").unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, ApiClientError::PinMismatch { .. }), "{msg}");
    assert!(msg.contains("fingerprint mismatch"), "{msg}");
    assert!(msg.contains(&hex::encode(wrong)), "{msg}");
    assert!(msg.contains(&hex::encode(ctl.fingerprint)), "{msg}");
}

/// Enrolls MFA for alice with `user mfa alice --json` and returns her TOTP generator
/// (built from the printed otpauth URI).
fn mfa_totp(db: &Path) -> totp_rs::Totp {
    let out = ok(db, &["user", "mfa", "alice", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let uri = ["otpauth_uri", "uri", "otpauth"]
        .iter()
        .find_map(|k| v[k].as_str())
        .unwrap_or_else(|| panic!("no otpauth URI in {out}"));
    totp_rs::Totp::from_url_unchecked(uri).unwrap()
}

#[test]
fn login_accepts_a_good_code_once_and_refuses_bad_and_replayed_codes() {
    let (ctl, key) = enrolled();
    let totp = mfa_totp(&ctl.db);
    let c = ctl.client();
    let login = |code: &str| {
        let body = serde_json::json!({ "code": code }).to_string();
        status_of(c.signed(&key, "POST", "/v1/login", body.as_bytes()))
    };
    let t = now();
    let good = totp.generate(t).to_string();
    let bad = format!("{:06}", (good.parse::<u32>().unwrap() + 1) % 1_000_000);
    let (status, msg) = login(&bad);
    assert_eq!(status, 401, "{msg}");
    let (status, msg) = login(&good);
    assert_eq!(status, 200, "{msg}");
    let (status, msg) = login(&good);
    assert!(
        status == 401 || status == 409,
        "replayed code: {status} {msg}"
    );
    let r = c.signed(&key, "GET", "/v1/whoami", b"").unwrap();
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert!(v["last_mfa"].as_str().unwrap().starts_with("20"), "{v}");
    // A login signed by another key does not count, whatever the code.
    let body = serde_json::json!({ "code": totp.generate(t + 30).to_string() }).to_string();
    let (status, _) = status_of(c.signed(&device_key(9), "POST", "/v1/login", body.as_bytes()));
    assert_eq!(status, 401);
}

#[test]
fn api_stops_with_the_controller() {
    let mut ctl = Controller::start();
    let pid = ctl.child.id();
    // SIGTERM: serve and the API thread stop on the same flag.
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(s) = ctl.child.try_wait().unwrap() {
            assert!(s.success(), "clean exit: {s}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "controller did not stop within 20 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let err = ctl
        .client()
        .exchange("GET", "/v1/whoami", &[], b"")
        .unwrap_err();
    assert!(matches!(err, ApiClientError::Connect { .. }), "{err}");
}

/// The `postern` client binary (another package): built by `cargo build --workspace --bins`.
/// Refuses a binary older than the client's sources (it would test yesterday's code).
fn postern_bin() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let mut dir = exe.parent().unwrap().to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let bin = dir.join("postern");
    assert!(
        bin.is_file(),
        "the `postern` client binary is not at {}: run `cargo build --workspace --bins` first",
        bin.display()
    );
    let built = std::fs::metadata(&bin).unwrap().modified().unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    for src in ["spa-client/src", "protocol/src"] {
        for entry in std::fs::read_dir(root.join(src)).unwrap().flatten() {
            let modified = entry.metadata().unwrap().modified().unwrap();
            assert!(
                modified <= built,
                "{} is older than {}: run `cargo build --workspace --bins` first",
                bin.display(),
                entry.path().display()
            );
        }
    }
    bin
}

/// Runs `postern ARGS` with stdin closed; returns (success, stdout, stderr).
fn postern(args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(postern_bin())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

#[test]
fn postern_client_binary_enrolls_logs_in_and_reports_posture() {
    use std::os::unix::fs::PermissionsExt as _;
    let ctl = Controller::start();
    ok(&ctl.db, &["user", "add", "alice"]);
    let token = ctl.invite("laptop", &[]);
    let home = tempfile::tempdir().unwrap();
    let key = home.path().join("device.key");
    let key_s = key.to_str().unwrap();
    let url = ctl.url.as_str();

    let (ok_, _, err) = postern(&[
        "enroll",
        "--controller",
        url,
        "--token",
        &token,
        "--key",
        key_s,
    ]);
    assert!(!ok_, "no key, no --generate");
    assert!(err.contains("postern keygen"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");

    let (ok_, out, err) = postern(&[
        "enroll",
        "--controller",
        url,
        "--token",
        &token,
        "--key",
        key_s,
        "--generate",
    ]);
    assert!(ok_, "{err}");
    let device_id = out.trim().to_owned();
    assert_eq!(device_id.len(), 32, "{out}");
    let cfg_path = home.path().join("controller.json");
    let mode = std::fs::metadata(&cfg_path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    assert_eq!(cfg["device_id"], device_id.as_str());
    assert_eq!(cfg["cert_sha256"], hex::encode(ctl.fingerprint));

    let (ok_, _, err) = postern(&["login", "--key", key_s]);
    assert!(!ok_);
    assert!(err.contains("pass --code"), "{err}");
    let totp = mfa_totp(&ctl.db);
    let code = totp.generate(now()).to_string();
    let (ok_, out, err) = postern(&["login", "--key", key_s, "--code", &code, "--json"]);
    assert!(ok_, "{err}");
    assert!(out.contains("\"last_mfa\":\"20"), "{out}");

    let facts = home.path().join("facts.json");
    std::fs::write(&facts, report_now()).unwrap();
    let (ok_, out, err) = postern(&[
        "posture",
        "report",
        "--facts",
        facts.to_str().unwrap(),
        "--key",
        key_s,
        "--json",
    ]);
    assert!(ok_, "{err}");
    assert!(out.contains("expires_at"), "{out}");

    let (ok_, out, err) = postern(&["whoami", "--key", key_s, "--json"]);
    assert!(ok_, "{err}");
    let me: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(me["name"], "laptop");
    assert!(me["last_mfa"].as_str().unwrap().starts_with("20"), "{me}");

    // A controller.json pinned to another certificate: refused, naming the mismatch.
    let mut bad = cfg.clone();
    bad["cert_sha256"] = serde_json::Value::String("00".repeat(32));
    std::fs::write(&cfg_path, bad.to_string()).unwrap();
    let (ok_, _, err) = postern(&["whoami", "--key", key_s]);
    assert!(!ok_);
    assert!(err.contains("fingerprint mismatch"), "{err}");
}

#[test]
fn api_identity_and_enrollment_survive_a_restart() {
    let (ctl, key) = enrolled();
    let before = ctl.fingerprint;
    let ctl = ctl.restart();
    assert_eq!(
        ctl.fingerprint, before,
        "the API certificate is reused, not recreated"
    );
    let r = ApiClient::new(&ctl.url, before)
        .unwrap()
        .signed(&key, "GET", "/v1/whoami", b"")
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.error_message());
}
