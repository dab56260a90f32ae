//! The client commands that talk to the controller's HTTPS API: `enroll`, `login`,
//! sending a posture report and `whoami`.
//!
//! Owns: their messages and output, reading the TOTP code (flag or terminal prompt), and
//! where `controller.json` lives (beside the key). Must not touch: HTTP/TLS and request
//! signing (see `postern_client::api_client`), the key file format (see `main.rs`).

use std::io::{BufRead as _, IsTerminal as _, Read as _, Write as _};
use std::path::Path;

use anyhow::{bail, Context as _, Result};
use postern_client::api_client::{ApiClient, ApiClientError, ControllerConfig};
use postern_client::exit::{Fix, CONTROLLER_UNREACHABLE};
use postern_protocol::api_auth::InviteToken;
use postern_protocol::keys::DeviceSigningKey;
use serde::Deserialize;
use zeroize::Zeroizing;

use crate::{generate_key, load_key};

/// Where the answer to the last accepted posture report is kept.
const LAST_POSTURE_FILE: &str = "last_posture.json";
/// Largest posture report file sent.
const MAX_FACTS_BYTES: u64 = 64 * 1024;

pub(crate) fn enroll(
    controller: &str,
    token_text: &str,
    key_file: &Path,
    generate: bool,
    json: bool,
) -> Result<()> {
    let token = InviteToken::parse(token_text).context("--token")?;
    let signing = if key_file.exists() {
        load_key(key_file)?
    } else if generate {
        let k = generate_key(key_file, false)?;
        eprintln!("created device key {}", key_file.display());
        k
    } else {
        bail!(
            "no device key at {}: run `postern keygen` first (or pass --generate to create it now)",
            key_file.display()
        );
    };
    let client = ApiClient::new(controller, *token.cert_sha256())?;
    let answer = client.enroll(token_text, &signing)?;
    let expected = signing.public_key().device_id().to_string();
    if answer.device_id != expected {
        bail!(
            "controller registered device id {} but this key's id is {expected}: refusing to save it",
            answer.device_id
        );
    }
    let cfg = ControllerConfig {
        url: controller.trim_end_matches('/').to_owned(),
        cert_sha256: hex::encode(token.cert_sha256()),
        device_id: answer.device_id.clone(),
    };
    let cfg_path = ControllerConfig::path_beside(key_file);
    cfg.write(&cfg_path)
        .with_context(|| format!("write {}", cfg_path.display()))?;
    if json {
        println!("{}", serde_json::to_string(&answer)?);
    } else {
        println!("{}", answer.device_id);
        eprintln!(
            "enrolled as device {:?} of user {:?}; controller settings saved to {}",
            answer.name,
            answer.user,
            cfg_path.display()
        );
    }
    Ok(())
}

/// The key and a client for the controller this device enrolled with.
pub(crate) fn connect(key_file: &Path) -> Result<(DeviceSigningKey, ApiClient)> {
    if !key_file.exists() {
        return Err(Fix::not_enrolled(&format!("no device key at {}", key_file.display())).into());
    }
    let signing = load_key(key_file)?;
    let cfg_path = ControllerConfig::path_beside(key_file);
    if !cfg_path.exists() {
        return Err(Fix::not_enrolled(&format!("no {}", cfg_path.display())).into());
    }
    let cfg = ControllerConfig::read(&cfg_path).map_err(anyhow::Error::msg)?;
    let pin = cfg.pin().map_err(anyhow::Error::msg)?;
    let client = ApiClient::new(&cfg.url, pin)
        .with_context(|| format!("controller url in {}", cfg_path.display()))?;
    Ok((signing, client))
}

#[derive(Debug, Deserialize, serde::Serialize)]
struct LoginAnswer {
    device_id: String,
    last_mfa: Option<String>,
}

pub(crate) fn login(code: Option<String>, key_file: &Path, json: bool) -> Result<()> {
    let code = Zeroizing::new(match code {
        Some(c) => c,
        None => prompt_code()?,
    });
    let code = code.trim();
    if code.is_empty() || code.len() > 10 || !code.bytes().all(|b| b.is_ascii_digit()) {
        bail!("--code: expected the 6-digit code shown by your authenticator app");
    }
    let (signing, client) = connect(key_file)?;
    let body = Zeroizing::new(serde_json::to_vec(&serde_json::json!({ "code": code }))?);
    let answer: LoginAnswer = client
        .signed(&signing, "POST", "/v1/login", &body)
        .and_then(|r| r.into_json())
        .map_err(api_failure)?;
    if json {
        println!("{}", serde_json::to_string(&answer)?);
    } else {
        println!(
            "MFA accepted; last MFA {}",
            answer.last_mfa.as_deref().unwrap_or("unknown")
        );
    }
    Ok(())
}

fn prompt_code() -> Result<String> {
    let stdin = std::io::stdin();
    if !stdin.is_terminal() {
        bail!("no --code given and standard input is not a terminal: pass --code 123456");
    }
    eprint!("TOTP code: ");
    std::io::stderr().flush()?;
    let mut line = String::new();
    stdin.lock().read_line(&mut line).context("read the code")?;
    Ok(line)
}

#[derive(Debug, Deserialize, serde::Serialize)]
pub(crate) struct PostureAnswer {
    received_at: String,
    expires_at: String,
}

/// Reads a posture report file (`--facts`): at most 64 KiB of JSON.
pub(crate) fn read_facts(facts: &Path) -> Result<Vec<u8>> {
    let file = std::fs::File::open(facts)
        .with_context(|| format!("--facts {}: cannot open", facts.display()))?;
    let mut body = Vec::new();
    file.take(MAX_FACTS_BYTES + 1)
        .read_to_end(&mut body)
        .with_context(|| format!("--facts {}: cannot read", facts.display()))?;
    if body.len() as u64 > MAX_FACTS_BYTES {
        bail!(
            "--facts {}: larger than {MAX_FACTS_BYTES} bytes",
            facts.display()
        );
    }
    serde_json::from_slice::<serde_json::Value>(&body).with_context(|| {
        format!(
            "--facts {}: not JSON (see docs/posture.md)",
            facts.display()
        )
    })?;
    Ok(body)
}

/// Sends a posture report, signed by the device key (`POST /v1/posture`).
pub(crate) fn send_posture(body: &[u8], key_file: &Path, json: bool) -> Result<()> {
    let answer = post_posture(body, key_file)?;
    if json {
        println!("{}", serde_json::to_string(&answer)?);
    } else {
        println!(
            "posture report accepted at {}, valid until {}",
            answer.received_at, answer.expires_at
        );
    }
    Ok(())
}

/// Sends a posture report and prints nothing (`postern connect` / `ssh-proxy` renewals,
/// whose stdout belongs to the command or the ssh channel).
/// Remembers the answer in `last_posture.json` beside the key (for `postern status`).
pub(crate) fn post_posture(body: &[u8], key_file: &Path) -> Result<PostureAnswer> {
    let (signing, client) = connect(key_file)?;
    let answer: PostureAnswer = client
        .signed(&signing, "POST", "/v1/posture", body)
        .and_then(|r| r.into_json())
        .map_err(api_failure)?;
    // Best effort: a status display must not fail a report the controller accepted.
    if let Ok(text) = serde_json::to_vec(&answer) {
        let _ = postern_client::private_file::write_private(&last_posture_path(key_file), &text);
    }
    Ok(answer)
}

/// `last_posture.json` beside the key: `{received_at, expires_at}` of the last report the
/// controller accepted.
pub(crate) fn last_posture_path(key_file: &Path) -> std::path::PathBuf {
    ControllerConfig::path_beside(key_file).with_file_name(LAST_POSTURE_FILE)
}

/// The last accepted report's `{received_at, expires_at}`, if any.
pub(crate) fn last_posture(key_file: &Path) -> Option<serde_json::Value> {
    let text = std::fs::read(last_posture_path(key_file)).ok()?;
    serde_json::from_slice(&text).ok()
}

pub(crate) fn whoami(key_file: &Path, json: bool) -> Result<()> {
    #[derive(Debug, Deserialize, serde::Serialize)]
    struct Whoami {
        device_id: String,
        name: String,
        user: String,
        last_mfa: Option<String>,
    }
    let (signing, client) = connect(key_file)?;
    let me: Whoami = client
        .signed(&signing, "GET", "/v1/whoami", b"")
        .and_then(|r| r.into_json())
        .map_err(api_failure)?;
    if json {
        println!("{}", serde_json::to_string(&me)?);
    } else {
        println!(
            "device {:?} ({}) of user {:?}; last MFA {}",
            me.name,
            me.device_id,
            me.user,
            me.last_mfa.as_deref().unwrap_or("never")
        );
    }
    Ok(())
}

/// A failed exchange with the controller as an error with the right exit status: could
/// not connect or prove the pinned identity → 6 with what to check; else as it is.
pub(crate) fn api_failure(e: ApiClientError) -> anyhow::Error {
    match e {
        ApiClientError::Connect { .. }
        | ApiClientError::PinMismatch { .. }
        | ApiClientError::Io(_)
        | ApiClientError::Tls(_) => Fix::new(
            CONTROLLER_UNREACHABLE,
            format!("{e} (check the network and the controller URL in controller.json)"),
        )
        .into(),
        other => other.into(),
    }
}
