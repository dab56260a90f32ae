//! The `policy apply|show|explain` and `device posture` commands: their clap arguments
//! and their text/JSON output.
//!
//! Owns: flag names, help texts and output formats of these commands. Must not touch:
//! SQL or policy semantics (through `postern_controller::policy_store` and
//! `postern_policy`), exit codes (validation failures become `cli::UsageError`, exit 2).

use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Subcommand};
use postern_controller::policy_store::{PolicyDevice, PolicyPlan, PolicyStoreError};
use postern_controller::registry::Registry;
use postern_policy::{
    format_duration, Decision, Explanation, PolicyDiff, PolicySet, Request, Timestamp,
};
use serde_json::{json, Value};

use crate::cli::UsageError;

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Check a policy file and store it (atomically; gateways get it at once).
    #[command(
        after_help = "Example:\n  postern-controller policy apply /etc/postern/policy.toml --dry-run\n  postern-controller policy apply /etc/postern/policy.toml\n\nThe file format is in docs/policy.md. Every app a rule names must be registered\n(`app add`); users and groups that do not exist yet only warn. --dry-run prints the\ndiff against the applied policy and changes nothing. Once a policy is applied it alone\ndecides access: the legacy grants (`grant add`) are ignored."
    )]
    Apply {
        /// The policy file (TOML).
        #[arg(value_name = "FILE")]
        file: PathBuf,
        /// Print the diff and change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Print {applied, unchanged, sha256, warnings, diff} as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print the applied policy file.
    #[command(
        after_help = "Example:\n  postern-controller policy show\n  postern-controller policy show --json"
    )]
    Show {
        /// Print {sha256, applied_at, source} as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Explain the decision for one device and app, step by step.
    #[command(
        after_help = "Example:\n  postern-controller policy explain --device alice-laptop --app wiki\n  postern-controller policy explain --device alice-laptop --app ssh --at 2026-11-23T22:30:00+01:00 --from 192.0.2.7\n\nWithout --from the source address is unknown, as for the access the gateway enforces:\nallow rules with source_networks then fail (see docs/policy.md)."
    )]
    Explain {
        /// Device name or 32-hex id.
        #[arg(long, value_name = "DEVICE")]
        device: String,
        /// App name.
        #[arg(long, value_name = "APP")]
        app: String,
        /// The decision time, RFC 3339 [default: now].
        #[arg(long, value_name = "RFC3339")]
        at: Option<String>,
        /// The knock's source address (IPv4 or IPv6).
        #[arg(long, value_name = "IP")]
        from: Option<String>,
        /// Print {request, steps, decision} as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// `device posture NAME`.
#[derive(Debug, Args)]
pub struct PostureArgs {
    /// Device name or 32-hex id.
    #[arg(value_name = "NAME_OR_ID")]
    pub name: String,
    /// Print {device, report, apps} as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Validation failures (bad file, unknown app/device) exit 2 with their one line.
fn usage(e: PolicyStoreError) -> anyhow::Error {
    if e.is_validation() {
        UsageError(e.to_string()).into()
    } else {
        e.into()
    }
}

fn now_unix() -> u64 {
    u64::try_from(Timestamp::now().as_second()).unwrap_or(0)
}

fn read_policy_file(path: &Path) -> anyhow::Result<String> {
    let bytes = std::fs::read(path).map_err(|e| {
        UsageError(format!(
            "cannot read policy file {}: {e}: check the path",
            path.display()
        ))
    })?;
    String::from_utf8(bytes).map_err(|_| {
        UsageError(format!(
            "policy file {} is not UTF-8 text: save it as UTF-8",
            path.display()
        ))
        .into()
    })
}

/// Runs one `policy` subcommand.
pub fn run(
    cmd: PolicyCommand,
    open: &dyn Fn() -> anyhow::Result<Registry>,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    match cmd {
        PolicyCommand::Apply {
            file,
            dry_run,
            json,
        } => {
            let source = read_policy_file(&file)?;
            let mut registry = open()?;
            let plan = if dry_run {
                registry.plan_policy(&source)
            } else {
                registry.apply_policy(&source, now_unix())
            }
            .map_err(usage)?;
            for w in &plan.warnings {
                eprintln!("warning: {w}");
            }
            print_apply(out, &plan, dry_run, json, &registry)?;
        }
        PolicyCommand::Show { json } => {
            let registry = open()?;
            let stored = registry.stored_policy().map_err(usage)?;
            match (stored, json) {
                (None, true) => writeln!(out, "null")?,
                (None, false) => writeln!(
                    out,
                    "no policy applied: gateways admit by the legacy grants (`grant list`); apply one with `postern-controller policy apply FILE`"
                )?,
                (Some(p), true) => {
                    serde_json::to_writer_pretty(&mut *out, &p).context("writing JSON")?;
                    writeln!(out)?;
                }
                (Some(p), false) => {
                    writeln!(
                        out,
                        "# sha256 {} applied at {}",
                        p.sha256,
                        stamp(p.applied_at)
                    )?;
                    write!(out, "{}", p.source)?;
                    if !p.source.ends_with('\n') {
                        writeln!(out)?;
                    }
                }
            }
        }
        PolicyCommand::Explain {
            device,
            app,
            at,
            from,
            json,
        } => {
            let now = match at {
                Some(text) => text.parse::<Timestamp>().map_err(|_| {
                    UsageError(format!(
                        "--at {text:?} is not an RFC 3339 time: use e.g. 2026-11-23T14:00:00Z or 2026-11-23T15:00:00+01:00"
                    ))
                })?,
                None => Timestamp::now(),
            };
            let source = match from {
                Some(text) => Some(text.parse::<IpAddr>().map_err(|_| {
                    UsageError(format!(
                        "--from {text:?} is not an IP address: use e.g. 192.0.2.7 or 2001:db8::7"
                    ))
                })?),
                None => None,
            };
            let registry = open()?;
            let Some((_, explanation)) = registry
                .explain(&device, &app, now, source)
                .map_err(usage)?
            else {
                return Err(UsageError(
                    "no policy is applied: apply one with `postern-controller policy apply FILE`"
                        .into(),
                )
                .into());
            };
            if json {
                serde_json::to_writer_pretty(&mut *out, &explanation_json(&explanation))
                    .context("writing JSON")?;
                writeln!(out)?;
            } else {
                writeln!(out, "{explanation}")?;
                if let Decision::Deny(d) = &explanation.decision {
                    if let (Some(req), Some(fix)) = (d.requirement(), d.remediation()) {
                        writeln!(out, "failing requirement: {req}")?;
                        writeln!(out, "remediation: {fix}")?;
                    }
                }
            }
        }
    }
    Ok(())
}

fn stamp(unix: u64) -> String {
    i64::try_from(unix)
        .ok()
        .and_then(|s| Timestamp::from_second(s).ok())
        .map_or_else(|| unix.to_string(), |t| t.to_string())
}

fn print_apply(
    out: &mut dyn Write,
    plan: &PolicyPlan,
    dry_run: bool,
    json: bool,
    registry: &Registry,
) -> anyhow::Result<()> {
    let applied = !dry_run && !plan.unchanged;
    if json {
        let v = json!({
            "dry_run": dry_run,
            "applied": applied,
            "unchanged": plan.unchanged,
            "sha256": plan.sha256,
            "rules": plan.set.rules.len(),
            "requirements": plan.set.requirements.len(),
            "warnings": plan.warnings,
            "diff": diff_json(&plan.diff),
        });
        serde_json::to_writer_pretty(&mut *out, &v).context("writing JSON")?;
        writeln!(out)?;
        return Ok(());
    }
    write!(out, "{}", plan.diff)?;
    let counts = format!(
        "{} rules, {} requirements",
        plan.set.rules.len(),
        plan.set.requirements.len()
    );
    if plan.unchanged {
        writeln!(out, "policy unchanged (sha256 {}, {counts})", plan.sha256)?;
    } else if dry_run {
        writeln!(
            out,
            "dry run: nothing changed; `policy apply` without --dry-run would store sha256 {} ({counts})",
            plan.sha256
        )?;
    } else {
        writeln!(
            out,
            "applied policy sha256 {} ({counts}); revision {}",
            plan.sha256,
            registry.revision()?
        )?;
    }
    Ok(())
}

fn diff_json(d: &PolicyDiff) -> Value {
    let changes = |cs: &[postern_policy::Change]| -> Value {
        cs.iter()
            .map(|c| {
                json!({
                    "name": c.name,
                    "fields": c.fields.iter().map(|(f, a, b)| json!({"field": f, "old": a, "new": b})).collect::<Vec<_>>(),
                })
            })
            .collect()
    };
    json!({
        "rules_added": d.rules_added,
        "rules_removed": d.rules_removed,
        "rules_changed": changes(&d.rules_changed),
        "requirements_added": d.requirements_added,
        "requirements_removed": d.requirements_removed,
        "requirements_changed": changes(&d.requirements_changed),
        "rule_order_changed": d.rule_order_changed,
    })
}

fn decision_json(decision: &Decision) -> Value {
    match decision {
        Decision::Allow(g) => json!({
            "verdict": "allow",
            "rule": g.rule,
            "lease": format_duration(g.lease),
            "session_mode": g.session_mode.to_string(),
            "expires_at": g.expires_at.to_string(),
            "valid_until": g.valid_until.map(|t| t.to_string()),
        }),
        Decision::Deny(d) => json!({
            "verdict": "deny",
            "rule": d.rule,
            "reason": d.to_string(),
            "requirement": d.requirement(),
            "remediation": d.remediation(),
        }),
    }
}

fn explanation_json(e: &Explanation) -> Value {
    json!({
        "request": e.request,
        "steps": e.steps.iter().map(|s| json!({
            "subject": s.subject,
            "outcome": s.outcome.to_string(),
            "why": s.why,
        })).collect::<Vec<_>>(),
        "decision": decision_json(&e.decision),
    })
}

/// Per-app verdicts for `device` at `now` (source unknown, as the gateway enforces).
fn verdicts(
    set: &PolicySet,
    pd: &PolicyDevice,
    apps: &[String],
    now: Timestamp,
) -> Vec<(String, Decision)> {
    apps.iter()
        .map(|app| {
            let req = Request {
                device: &pd.device,
                app,
                source: None,
                now,
            };
            (app.clone(), postern_policy::decide(set, &req))
        })
        .collect()
}

fn age(from: u64, to: u64) -> String {
    format_duration(Duration::from_secs(to.saturating_sub(from)))
}

/// Runs `device posture NAME`.
pub fn posture(
    args: PostureArgs,
    open: &dyn Fn() -> anyhow::Result<Registry>,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let registry = open()?;
    let pd = registry.policy_device(&args.name).map_err(usage)?;
    let set = registry.policy_set().map_err(usage)?;
    let apps: Vec<String> = registry.list_apps()?.into_iter().map(|a| a.name).collect();
    let now = Timestamp::now();
    let now_secs = u64::try_from(now.as_second()).unwrap_or(0);
    let verdicts = set
        .as_ref()
        .map(|set| verdicts(set, &pd, &apps, now))
        .unwrap_or_default();
    let d = &pd.device;
    if args.json {
        let report = pd.report.as_ref().map(|r| {
            json!({
                "received_at": stamp(r.received_at),
                "expires_at": stamp(r.expires_at),
                "expired": now_secs >= r.expires_at,
                "facts": serde_json::from_str::<Value>(&r.raw).unwrap_or(Value::Null),
            })
        });
        let v = json!({
            "device": pd.name,
            "id": d.id,
            "user": d.user,
            "groups": d.groups,
            "revoked": d.revoked,
            "disabled": d.disabled,
            "risk": d.risk,
            "last_mfa": d.last_mfa.map(|t| t.to_string()),
            "report": report,
            "policy_applied": set.is_some(),
            "apps": verdicts.iter().map(|(app, dec)| {
                let mut v = decision_json(dec);
                v["app"] = json!(app);
                v
            }).collect::<Vec<_>>(),
        });
        serde_json::to_writer_pretty(&mut *out, &v).context("writing JSON")?;
        writeln!(out)?;
        return Ok(());
    }
    writeln!(
        out,
        "device {} (id {}, user {}, groups [{}], risk {}{}{})",
        pd.name,
        d.id,
        d.user,
        d.groups.join(", "),
        d.risk,
        if d.revoked { ", revoked" } else { "" },
        if d.disabled { ", disabled" } else { "" },
    )?;
    match d.last_mfa {
        Some(t) => writeln!(
            out,
            "last MFA: {t} ({} ago)",
            age(u64::try_from(t.as_second()).unwrap_or(0), now_secs)
        )?,
        None => writeln!(out, "last MFA: never")?,
    }
    match &pd.report {
        None => writeln!(
            out,
            "posture: nothing reported (every posture requirement fails until the client reports)"
        )?,
        Some(r) => {
            let freshness = if now_secs >= r.expires_at {
                format!("EXPIRED {} ago", age(r.expires_at, now_secs))
            } else {
                format!("expires in {}", age(now_secs, r.expires_at))
            };
            writeln!(
                out,
                "posture report: received {} ({} ago), {freshness}",
                stamp(r.received_at),
                age(r.received_at, now_secs)
            )?;
            let f = &r.report.facts;
            let opt = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
            writeln!(out, "  collected_at:        {}", r.report.collected_at)?;
            writeln!(out, "  os_family:           {}", opt(&f.os_family))?;
            writeln!(out, "  os_version:          {}", opt(&f.os_version))?;
            writeln!(out, "  kernel:              {}", opt(&f.kernel))?;
            writeln!(
                out,
                "  last_package_update: {}",
                f.last_package_update
                    .map_or_else(|| "-".into(), |t| t.to_string())
            )?;
            writeln!(out, "  disk_encrypted:      {}", f.disk_encrypted)?;
            writeln!(out, "  firewall_on:         {}", f.firewall_on)?;
            writeln!(out, "  mdm_enrolled:        {}", f.mdm_enrolled)?;
            writeln!(out, "  processes:           [{}]", f.processes.join(", "))?;
            let custom: Vec<String> = f.custom.iter().map(|(k, v)| format!("{k}={v}")).collect();
            writeln!(out, "  custom:              [{}]", custom.join(", "))?;
        }
    }
    if set.is_none() {
        writeln!(
            out,
            "no policy applied: access follows the legacy grants (`grant list`)"
        )?;
        return Ok(());
    }
    writeln!(
        out,
        "verdict per app (source address unknown, as the gateway enforces):"
    )?;
    for (app, decision) in &verdicts {
        match decision {
            Decision::Allow(g) => writeln!(
                out,
                "  {app}: allow by rule {:?}{}",
                g.rule,
                g.valid_until
                    .map_or_else(String::new, |t| format!(" until {t}"))
            )?,
            Decision::Deny(den) => {
                writeln!(out, "  {app}: deny: {den}")?;
                if let (Some(req), Some(fix)) = (den.requirement(), den.remediation()) {
                    writeln!(out, "    failing requirement: {req}")?;
                    writeln!(out, "    remediation: {fix}")?;
                }
            }
        }
    }
    Ok(())
}
