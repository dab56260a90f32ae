//! `postern status [--json]`: enrollment, MFA age, local posture verdict, clock offset to
//! the controller, the profile in use, and what is known about live sessions.
//!
//! Owns: gathering those (each part may fail on its own; the rest is still shown) and the
//! exit status: 0 when all is well, else the status of the first problem (3 not enrolled,
//! 6 controller unreachable, 4 no MFA, 7 posture failing) with a one-line next step.
//! Must not touch: HTTP/signing (see `postern_client::api_client`), the collectors.

use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Result;
use clap::Args;
use postern_client::api_client::{ApiClient, ControllerConfig};
use postern_client::exit::{Fix, MFA_REQUIRED, POSTURE_FAILING};
use serde::Deserialize;
use serde_json::json;

use crate::posture_cmd::CollectArgs;

/// Above this clock offset (ms) a knock or a signed request is refused: say so.
const CLOCK_WARN_MS: i64 = 30_000;

#[derive(Debug, Args)]
#[command(
    after_help = "Example: postern status --json\n\nExit status: 0 all well; 3 not enrolled; 6 controller unreachable; 4 no MFA recorded; 7 a posture fact fails locally."
)]
pub(crate) struct StatusArgs {
    /// Device key file (default: ~/.config/postern/device.key).
    #[arg(long, value_name = "FILE")]
    key: Option<PathBuf>,
    /// Print everything as one JSON object.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    collect: CollectArgs,
}

#[derive(Debug, Deserialize)]
struct Whoami {
    name: String,
    user: String,
    last_mfa: Option<String>,
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

pub(crate) fn run(args: StatusArgs) -> Result<()> {
    let key_file = crate::key_path(args.key)?;
    let cfg_path = ControllerConfig::path_beside(&key_file);
    let mut problems: Vec<Fix> = Vec::new();
    let mut out = serde_json::Map::new();

    // Enrollment.
    let key = if key_file.exists() {
        Some(crate::load_key(&key_file)?)
    } else {
        None
    };
    let cfg = ControllerConfig::read(&cfg_path).ok();
    out.insert(
        "device_id".into(),
        json!(key.as_ref().map(|k| k.public_key().device_id().to_string())),
    );
    out.insert("enrolled".into(), json!(key.is_some() && cfg.is_some()));
    out.insert(
        "controller".into(),
        json!(cfg.as_ref().map(|c| c.url.clone())),
    );
    if key.is_none() {
        problems.push(Fix::not_enrolled(&format!(
            "no device key at {}",
            key_file.display()
        )));
    } else if cfg.is_none() {
        problems.push(Fix::not_enrolled(&format!("no {}", cfg_path.display())));
    }

    // Controller: clock offset and whoami.
    let mut offset = None;
    if let (Some(key), Some(cfg)) = (&key, &cfg) {
        let client = cfg
            .pin()
            .and_then(|pin| ApiClient::new(&cfg.url, pin).map_err(|e| e.to_string()));
        match client {
            Err(e) => problems.push(Fix::new(postern_client::exit::USAGE, e)),
            Ok(client) => {
                match client.clock_offset_ms() {
                    Ok((off, rtt)) => {
                        offset = Some(off);
                        out.insert("clock_offset_ms".into(), json!(off));
                        out.insert("clock_rtt_ms".into(), json!(rtt));
                    }
                    Err(e) => {
                        out.insert("clock_error".into(), json!(e.to_string()));
                    }
                }
                match client
                    .signed(key, "GET", "/v1/whoami", b"")
                    .and_then(|r| r.into_json::<Whoami>())
                {
                    Ok(me) => {
                        let age = me.last_mfa.as_deref().and_then(|t| {
                            t.parse::<jiff::Timestamp>()
                                .ok()
                                .map(|ts| now_ms() / 1000 - ts.as_second())
                        });
                        out.insert("name".into(), json!(me.name));
                        out.insert("user".into(), json!(me.user));
                        out.insert("last_mfa".into(), json!(me.last_mfa));
                        out.insert("mfa_age_secs".into(), json!(age));
                        if me.last_mfa.is_none() {
                            problems.push(Fix::mfa_required("no MFA recorded for this device"));
                        }
                    }
                    Err(e) => {
                        let mut msg = e.to_string();
                        if offset.is_some_and(|o| o.abs() > CLOCK_WARN_MS) {
                            msg.push_str(" (this clock is off: fix the time, e.g. enable NTP)");
                        }
                        problems.push(
                            match crate::controller_cmd::api_failure(e).downcast::<Fix>() {
                                Ok(f) => f,
                                Err(_) => Fix::new(postern_client::exit::FAILURE, msg),
                            },
                        );
                    }
                }
            }
        }
    }

    // Local posture, and the last report the controller accepted.
    let collected = args.collect.collect()?;
    let failing = collected.failing();
    let last_report = crate::controller_cmd::last_posture(&key_file);
    out.insert(
        "posture".into(),
        json!({
            "pass": failing.is_empty(),
            "failing": failing,
            "report": collected.report(),
            "last_accepted": last_report,
        }),
    );
    if !failing.is_empty() {
        problems.push(Fix::new(
            POSTURE_FAILING,
            format!(
                "{} posture fact(s) fail locally ({}): fix them, or ask your admin which apps need them",
                failing.len(),
                failing.join("; ")
            ),
        ));
    }

    // Profile.
    let profile = crate::profile_cmd::resolve_gateway(None, None).ok();
    out.insert(
        "profile".into(),
        json!(profile
            .as_ref()
            .map(|p| json!({"name": p.profile, "gateway": p.gateway}))),
    );
    // Sessions: the gateway holds them; the client keeps no session state on disk.
    out.insert("sessions".into(), serde_json::Value::Null);
    out.insert(
        "problems".into(),
        json!(problems
            .iter()
            .map(|p| p.message.clone())
            .collect::<Vec<_>>()),
    );

    if args.json {
        println!("{}", serde_json::Value::Object(out.clone()));
    } else {
        print_human(&out, offset);
    }
    match problems.into_iter().min_by_key(|p| rank(p.status)) {
        Some(first) => Err(first.into()),
        None => Ok(()),
    }
}

/// Which problem to name first: the one to fix first.
fn rank(status: u8) -> u8 {
    match status {
        postern_client::exit::NOT_ENROLLED => 0,
        postern_client::exit::CONTROLLER_UNREACHABLE => 1,
        MFA_REQUIRED => 2,
        POSTURE_FAILING => 4,
        _ => 3,
    }
}

fn print_human(out: &serde_json::Map<String, serde_json::Value>, offset: Option<i64>) {
    let s = |k: &str| match out.get(k) {
        Some(serde_json::Value::String(v)) => v.clone(),
        Some(serde_json::Value::Null) | None => "-".into(),
        Some(v) => v.to_string(),
    };
    println!("device      {}", s("device_id"));
    println!(
        "enrolled    {}{}",
        s("enrolled"),
        if out.get("controller").is_some_and(|c| !c.is_null()) {
            format!(" with {}", s("controller"))
        } else {
            String::new()
        }
    );
    if out.contains_key("user") {
        println!("identity    device {} of user {}", s("name"), s("user"));
        let mfa = match out.get("mfa_age_secs").and_then(|v| v.as_i64()) {
            Some(age) => format!("{} ({})", s("last_mfa"), human_age(age)),
            None => "never".into(),
        };
        println!("last MFA    {mfa}");
    }
    match offset {
        Some(o) => println!(
            "clock       controller is {} ms {} this device (round trip {} ms){}",
            o.abs(),
            if o >= 0 { "ahead of" } else { "behind" },
            s("clock_rtt_ms"),
            if o.abs() > CLOCK_WARN_MS {
                ": too far off, knocks will be refused; fix the time (NTP)"
            } else {
                ""
            }
        ),
        None if out.contains_key("clock_error") => {
            println!("clock       not measured: {}", s("clock_error"))
        }
        None => println!("clock       not measured (not enrolled)"),
    }
    let posture = out.get("posture");
    let failing: Vec<String> = posture
        .and_then(|p| p.get("failing"))
        .and_then(|f| f.as_array())
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    if failing.is_empty() {
        println!("posture     all facts pass locally (the controller decides per app)");
    } else {
        println!("posture     {} fact(s) fail locally:", failing.len());
        for f in failing {
            println!("              {f}");
        }
    }
    let last = posture.and_then(|p| p.get("last_accepted"));
    match last.and_then(|l| {
        Some((
            l.get("received_at")?.as_str()?,
            l.get("expires_at")?.as_str()?,
        ))
    }) {
        Some((received, expires)) => {
            let expired = expires
                .parse::<jiff::Timestamp>()
                .is_ok_and(|t| t.as_second() <= now_ms() / 1000);
            println!(
                "            last report accepted {received}, {} {expires}{}",
                if expired { "expired" } else { "valid until" },
                if expired {
                    ": run `postern posture report`"
                } else {
                    ""
                }
            );
        }
        None => println!("            no report sent yet: run `postern posture report`"),
    }
    match out.get("profile").and_then(|p| p.as_object()) {
        Some(p) => println!(
            "profile     {} (gateway {})",
            p.get("name").and_then(|n| n.as_str()).unwrap_or("-"),
            p.get("gateway").and_then(|n| n.as_str()).unwrap_or("-")
        ),
        None => println!("profile     none (postern profile add)"),
    }
    println!(
        "sessions    not tracked locally (the gateway holds them; `postern connect` shows its own)"
    );
}

fn human_age(secs: i64) -> String {
    match secs {
        s if s < 120 => format!("{s} s ago"),
        s if s < 7200 => format!("{} min ago", s / 60),
        s if s < 172_800 => format!("{} h ago", s / 3600),
        s => format!("{} days ago", s / 86_400),
    }
}
