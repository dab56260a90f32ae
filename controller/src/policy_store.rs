//! Policy and posture in the registry: the applied policy file, the latest posture report
//! per device, the policy engine's view of a device, and the snapshot's policy part the
//! gateways decide from (docs/policy.md, "Enforcement at the gateway").
//!
//! Owns: reads and writes of the `policies` and `posture_reports` tables (each write in
//! one IMMEDIATE transaction with its revision bump and audit row), the checks done before
//! a policy is stored (apps must exist; unknown users/groups are warnings), building a
//! `postern_policy::Device` from registry rows, and the snapshot's `policy` and
//! `subjects` (posture as per-requirement verdicts: the facts never leave here).
//! Must not touch: the policy semantics (the `postern_policy` crate decides), the CLI's
//! presentation or sockets. Callers pass `now`, except `snapshot_policy`, which evaluates
//! at the current time because a snapshot is "what holds now".

use std::collections::{BTreeSet, HashMap};

use postern_policy::{
    Decision, Device, Explanation, PolicyDiff, PolicySet, Posture, PostureReport, ReportError,
    Request, Requirement, Timestamp,
};
use rusqlite::{params, Connection, OptionalExtension};

use crate::proto::snapshot::{AccessRecord, DenialHint, PolicySubject, PolicyText, PostureVerdict};
use crate::registry::{bump, Registry, RegistryError};

/// How far in the future a report's `collected_at` may be (device clock skew).
pub const MAX_REPORT_SKEW_SECS: u64 = 300;

/// What can go wrong storing or evaluating policy and posture. One line each, naming the
/// input and the fix.
#[derive(Debug, thiserror::Error)]
pub enum PolicyStoreError {
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Policy(#[from] postern_policy::PolicyError),
    #[error("policy file: rule {rule:?} names app {app:?}, which is not registered: add it first with `postern-controller app add {app} --protocol tcp --port N`, or remove it from the rule")]
    UnknownApp { rule: String, app: String },
    #[error(transparent)]
    Report(#[from] ReportError),
    #[error("no device named or with id {0:?}: see `postern-controller device list`")]
    UnknownDevice(String),
    #[error("no app named {0:?}: see `postern-controller app list`")]
    UnknownAppName(String),
    #[error("posture report expiry {expires_at} is not after its receipt {received_at}")]
    BadExpiry { received_at: u64, expires_at: u64 },
    #[error("posture report collected_at is {ahead_secs} s in the future (at most {MAX_REPORT_SKEW_SECS} s accepted): fix the device's clock")]
    ReportFromFuture { ahead_secs: u64 },
    #[error("posture report was collected {age_secs} s ago, older than the posture lifetime ({ttl_secs} s): collect the facts again")]
    StaleReport { age_secs: u64, ttl_secs: u64 },
    #[error("stored policy (sha256 {sha256}) no longer parses: {source}; apply a corrected file with `postern-controller policy apply FILE`")]
    StoredPolicyInvalid {
        sha256: String,
        source: postern_policy::PolicyError,
    },
    #[error("registry corrupt: {0}")]
    Corrupt(String),
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
}

impl PolicyStoreError {
    /// True when the caller's input was rejected (exit code 2).
    pub fn is_validation(&self) -> bool {
        match self {
            PolicyStoreError::Registry(e) => e.is_validation(),
            PolicyStoreError::Policy(_)
            | PolicyStoreError::UnknownApp { .. }
            | PolicyStoreError::Report(_)
            | PolicyStoreError::UnknownDevice(_)
            | PolicyStoreError::UnknownAppName(_)
            | PolicyStoreError::BadExpiry { .. }
            | PolicyStoreError::ReportFromFuture { .. }
            | PolicyStoreError::StaleReport { .. } => true,
            PolicyStoreError::StoredPolicyInvalid { .. }
            | PolicyStoreError::Corrupt(_)
            | PolicyStoreError::Sqlite(_) => false,
        }
    }
}

/// The applied policy file as stored.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct StoredPolicy {
    /// The file text exactly as applied.
    pub source: String,
    /// SHA-256 of `source`, lowercase hex.
    pub sha256: String,
    /// Unix seconds.
    pub applied_at: u64,
}

/// A device's latest posture report as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredReport {
    /// The JSON the client sent.
    pub raw: String,
    /// It, parsed.
    pub report: PostureReport,
    /// Unix seconds.
    pub received_at: u64,
    /// Unix seconds; the facts are stale from then on.
    pub expires_at: u64,
}

impl StoredReport {
    /// The facts as the policy engine checks them.
    pub fn posture(&self) -> Posture {
        Posture::Facts(self.report.to_facts(ts(self.expires_at)))
    }
}

/// What `policy apply` (and its dry run) found.
#[derive(Debug, Clone)]
pub struct PolicyPlan {
    /// The parsed new set.
    pub set: PolicySet,
    /// Against the stored set (an empty set when none is stored).
    pub diff: PolicyDiff,
    /// Users and groups the file names that do not exist yet (one line each).
    pub warnings: Vec<String>,
    /// SHA-256 of the new file text.
    pub sha256: String,
    /// The same text is stored already.
    pub unchanged: bool,
}

/// A registry device resolved for policy questions.
#[derive(Debug, Clone)]
pub struct PolicyDevice {
    /// The device's name.
    pub name: String,
    /// What the policy engine evaluates (`id` is the 32-hex device id).
    pub device: Device,
    /// Its stored posture report, if any.
    pub report: Option<StoredReport>,
}

fn ts(unix_secs: u64) -> Timestamp {
    i64::try_from(unix_secs)
        .ok()
        .and_then(|s| Timestamp::from_second(s).ok())
        .unwrap_or(Timestamp::MAX)
}

fn unix_secs(t: Timestamp) -> u64 {
    u64::try_from(t.as_second()).unwrap_or(0)
}

fn sha256_hex(text: &str) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, text.as_bytes()))
}

/// Appends one audit row on the caller's write transaction (see `audit::record`).
fn audit(
    conn: &Connection,
    actor: &str,
    action: &str,
    subject: &str,
    detail: &serde_json::Value,
) -> Result<(), PolicyStoreError> {
    Ok(crate::audit::record(conn, actor, action, subject, detail)?)
}

/// The stored policy text, if one is applied.
fn stored_policy(conn: &Connection) -> Result<Option<StoredPolicy>, PolicyStoreError> {
    Ok(conn
        .query_row(
            "SELECT source, sha256, applied_at FROM policies WHERE id = 1",
            [],
            |r| {
                Ok(StoredPolicy {
                    source: r.get(0)?,
                    sha256: r.get(1)?,
                    applied_at: r.get::<_, i64>(2)?.try_into().unwrap_or(0),
                })
            },
        )
        .optional()?)
}

/// The stored policy, parsed. A stored file that no longer parses (a newer binary wrote
/// it, or it was edited by hand) is an error, never silently "no policy".
fn stored_set(conn: &Connection) -> Result<Option<PolicySet>, PolicyStoreError> {
    let Some(stored) = stored_policy(conn)? else {
        return Ok(None);
    };
    postern_policy::parse(&stored.source)
        .map(Some)
        .map_err(|source| PolicyStoreError::StoredPolicyInvalid {
            sha256: stored.sha256,
            source,
        })
}

fn names(conn: &Connection, sql: &str) -> Result<BTreeSet<String>, PolicyStoreError> {
    let mut stmt = conn.prepare(sql)?;
    let rows = stmt.query_map([], |r| r.get::<_, String>(0))?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Parses `source` and checks it against the registry (see [`Registry::plan_policy`]).
fn plan(conn: &Connection, source: &str) -> Result<PolicyPlan, PolicyStoreError> {
    let set = postern_policy::parse(source)?;
    let apps = names(conn, "SELECT name FROM apps")?;
    for rule in &set.rules {
        if let Some(app) = rule.apps.iter().find(|a| *a != "*" && !apps.contains(*a)) {
            return Err(PolicyStoreError::UnknownApp {
                rule: rule.name.clone(),
                app: app.clone(),
            });
        }
    }
    let users = names(conn, "SELECT name FROM users")?;
    let groups = names(conn, "SELECT name FROM groups")?;
    let mut warnings = Vec::new();
    for rule in &set.rules {
        for u in rule
            .users
            .iter()
            .filter(|u| *u != "*" && !users.contains(*u))
        {
            warnings.push(format!(
                "rule {:?} names user {u:?}, which does not exist yet: it matches nobody until `postern-controller user add {u}`",
                rule.name
            ));
        }
        for g in rule.groups.iter().filter(|g| !groups.contains(*g)) {
            warnings.push(format!(
                "rule {:?} names group {g:?}, which does not exist yet: it matches nobody until `postern-controller group add {g}`",
                rule.name
            ));
        }
    }
    let stored = stored_policy(conn)?;
    let sha256 = sha256_hex(source);
    let unchanged = stored.as_ref().is_some_and(|s| s.sha256 == sha256);
    // A stored file that no longer parses diffs as empty: applying replaces it.
    let old = stored_set(conn).ok().flatten().unwrap_or(PolicySet {
        rules: Vec::new(),
        requirements: Vec::new(),
    });
    Ok(PolicyPlan {
        diff: postern_policy::diff(&old, &set),
        set,
        warnings,
        sha256,
        unchanged,
    })
}

/// The device row with this name or 32-hex id, as the policy engine sees it.
fn policy_device(conn: &Connection, name_or_id: &str) -> Result<PolicyDevice, PolicyStoreError> {
    let row = conn
        .query_row(
            "SELECT d.id, d.name, d.user, d.revoked, d.last_mfa, d.risk, COALESCE(u.disabled, 0)
             FROM devices d LEFT JOIN users u ON u.name = d.user
             WHERE d.id = ?1 OR d.name = ?1 ORDER BY (d.id = ?1) DESC LIMIT 1",
            [name_or_id],
            |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, bool>(3)?,
                    r.get::<_, Option<i64>>(4)?,
                    r.get::<_, i64>(5)?,
                    r.get::<_, bool>(6)?,
                ))
            },
        )
        .optional()?;
    let Some((id, name, user, revoked, last_mfa, risk, disabled)) = row else {
        return Err(PolicyStoreError::UnknownDevice(name_or_id.to_owned()));
    };
    let groups = {
        let mut stmt =
            conn.prepare("SELECT grp FROM group_members WHERE user = ?1 ORDER BY grp")?;
        let rows = stmt.query_map([&user], |r| r.get::<_, String>(0))?;
        rows.collect::<Result<Vec<_>, _>>()?
    };
    let report = posture_report(conn, &id)?;
    let posture = report
        .as_ref()
        .map_or(Posture::Unknown, StoredReport::posture);
    let last_mfa = last_mfa.and_then(|s| Timestamp::from_second(s).ok());
    Ok(PolicyDevice {
        name,
        device: Device {
            id,
            user,
            groups,
            revoked,
            disabled,
            risk: risk_score(risk),
            last_mfa,
            posture,
        },
        report,
    })
}

fn posture_report(
    conn: &Connection,
    device_id: &str,
) -> Result<Option<StoredReport>, PolicyStoreError> {
    let row = conn
        .query_row(
            "SELECT facts, received_at, expires_at FROM posture_reports WHERE device_id = ?1",
            [device_id],
            |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, i64>(2)?,
                ))
            },
        )
        .optional()?;
    let Some((raw, received_at, expires_at)) = row else {
        return Ok(None);
    };
    let report = PostureReport::parse(raw.as_bytes()).map_err(|e| {
        PolicyStoreError::Corrupt(format!("stored posture report of device {device_id}: {e}"))
    })?;
    Ok(Some(StoredReport {
        raw,
        report,
        received_at: received_at.try_into().unwrap_or(0),
        expires_at: expires_at.try_into().unwrap_or(0),
    }))
}

/// What the policy allows with the source address unknown, as older gateways enforced it
/// (`Snapshot::access` before local decisions; `device posture` and tests still use it):
/// `None` without a stored policy; else every (device, app) pair the policy allows at
/// `now`, with `until` = the grant's `valid_until` (rounded down to whole seconds, so a
/// record never outlives its decision). Revoked devices get no record.
pub fn access_records(
    conn: &Connection,
    now: Timestamp,
) -> Result<Option<Vec<AccessRecord>>, PolicyStoreError> {
    let Some(set) = stored_set(conn)? else {
        return Ok(None);
    };
    let apps: Vec<String> = names(conn, "SELECT name FROM apps")?.into_iter().collect();
    let ids: Vec<String> = names(conn, "SELECT id FROM devices WHERE revoked = 0")?
        .into_iter()
        .collect();
    let mut records = Vec::new();
    for id in &ids {
        let device = policy_device(conn, id)?.device;
        for app in &apps {
            let request = Request {
                device: &device,
                app,
                source: None,
                now,
            };
            if let Decision::Allow(grant) = postern_policy::decide(&set, &request) {
                records.push(AccessRecord {
                    device: id.clone(),
                    app: app.clone(),
                    until: grant.valid_until.map(unix_secs),
                });
            }
        }
    }
    records.sort();
    Ok(Some(records))
}

/// The policy part of a snapshot (docs/policy.md, "Enforcement at the gateway").
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SnapshotPolicy {
    /// `Snapshot::access`: empty (nothing allowed) whenever a policy is applied, so a
    /// gateway too old to read `policy` fails closed instead of falling back to grants.
    pub access: Option<Vec<AccessRecord>>,
    /// `Snapshot::denials`: never sent with `policy` (the gateway's own decision names the
    /// failing requirement); empty when the stored policy cannot be evaluated.
    pub denials: Option<Vec<DenialHint>>,
    /// `Snapshot::policy`: the applied file.
    pub policy: Option<PolicyText>,
    /// `Snapshot::subjects`: every non-revoked device, with posture verdicts.
    pub subjects: Option<Vec<PolicySubject>>,
}

/// The policy part of `Registry::snapshot` at `now`: nothing without a stored policy
/// (legacy grants decide); else the file and [`policy_subjects`]. Database errors fail
/// the snapshot; a stored policy that does not parse fails closed (empty `access`, no
/// `policy`: gateways admit nothing) rather than falling back to the legacy grants.
pub fn snapshot_policy_at(
    conn: &Connection,
    now: Timestamp,
) -> Result<SnapshotPolicy, RegistryError> {
    let stored = stored_policy(conn).map_err(into_registry_error)?;
    let Some(stored) = stored else {
        return Ok(SnapshotPolicy::default());
    };
    let set = match postern_policy::parse(&stored.source) {
        Ok(set) => set,
        Err(e) => {
            tracing::warn!(sha256 = %stored.sha256, error = %e, "the stored policy does not parse: gateways admit nothing");
            return Ok(SnapshotPolicy {
                access: Some(Vec::new()),
                denials: Some(Vec::new()),
                policy: None,
                subjects: None,
            });
        }
    };
    let subjects = policy_subjects(conn, &set, now).map_err(into_registry_error)?;
    Ok(SnapshotPolicy {
        access: Some(Vec::new()),
        denials: None,
        policy: Some(PolicyText {
            text: stored.source,
            sha256: stored.sha256,
        }),
        subjects: Some(subjects),
    })
}

/// [`snapshot_policy_at`] now (a snapshot is "what holds now").
pub(crate) fn snapshot_policy(conn: &Connection) -> Result<SnapshotPolicy, RegistryError> {
    snapshot_policy_at(conn, Timestamp::now())
}

fn into_registry_error(e: PolicyStoreError) -> RegistryError {
    match e {
        PolicyStoreError::Sqlite(e) => RegistryError::Sqlite(e),
        PolicyStoreError::Registry(e) => e,
        other => RegistryError::Corrupt(other.to_string()),
    }
}

/// The names of the requirements some allow rule of `set` needs, in file order.
fn used_requirements(set: &PolicySet) -> Vec<&Requirement> {
    set.requirements
        .iter()
        .filter(|r| set.rules.iter().any(|rule| rule.posture.contains(&r.name)))
        .collect()
}

/// Every non-revoked device as the policy engine needs it, from three bulk reads (no
/// per-device query, no per-(device, app) evaluation): user, groups, disabled, risk, last
/// MFA and, when it has a posture report, one [`PostureVerdict`] per requirement the
/// policy uses ([`postern_policy::verdict`] at `now`). The facts themselves stay here. A
/// stored report that no longer parses counts as no report (its requirements fail), with
/// a warning. Sorted by device id.
pub fn policy_subjects(
    conn: &Connection,
    set: &PolicySet,
    now: Timestamp,
) -> Result<Vec<PolicySubject>, PolicyStoreError> {
    let requirements = used_requirements(set);
    let mut groups: HashMap<String, Vec<String>> = HashMap::new();
    {
        let mut stmt = conn.prepare("SELECT user, grp FROM group_members ORDER BY user, grp")?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
        for row in rows {
            let (user, grp) = row?;
            groups.entry(user).or_default().push(grp);
        }
    }
    let mut reports: HashMap<String, (String, i64)> = HashMap::new();
    if !requirements.is_empty() {
        let mut stmt = conn.prepare("SELECT device_id, facts, expires_at FROM posture_reports")?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                (r.get::<_, String>(1)?, r.get::<_, i64>(2)?),
            ))
        })?;
        for row in rows {
            let (id, report) = row?;
            reports.insert(id, report);
        }
    }
    let mut stmt = conn.prepare(
        "SELECT d.id, d.user, d.last_mfa, d.risk, COALESCE(u.disabled, 0)
         FROM devices d LEFT JOIN users u ON u.name = d.user
         WHERE d.revoked = 0 ORDER BY d.id",
    )?;
    let rows = stmt.query_map([], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, Option<i64>>(2)?,
            r.get::<_, i64>(3)?,
            r.get::<_, bool>(4)?,
        ))
    })?;
    let mut subjects = Vec::new();
    for row in rows {
        let (id, user, last_mfa, risk, disabled) = row?;
        let posture = reports.remove(&id).and_then(|(raw, expires_at)| {
            match PostureReport::parse(raw.as_bytes()) {
                Ok(report) => {
                    let facts = report.to_facts(ts(u64::try_from(expires_at).unwrap_or(0)));
                    Some(
                        requirements
                            .iter()
                            .map(|req| {
                                let v = postern_policy::verdict(req, &facts, now);
                                let verdict = PostureVerdict {
                                    passed: v.passed,
                                    expires: unix_secs(v.expires),
                                };
                                (req.name.clone(), verdict)
                            })
                            .collect(),
                    )
                }
                Err(e) => {
                    tracing::warn!(device = %id, error = %e, "stored posture report does not parse: its posture requirements fail");
                    None
                }
            }
        });
        subjects.push(PolicySubject {
            groups: groups.get(&user).cloned().unwrap_or_default(),
            device: id,
            user,
            disabled,
            risk: risk_score(risk),
            last_mfa: last_mfa.and_then(|s| u64::try_from(s).ok()),
            posture,
        });
    }
    Ok(subjects)
}

/// The stored risk score as the engine takes it (clamped to 0..=100).
fn risk_score(risk: i64) -> u8 {
    u8::try_from(risk.clamp(0, 100)).unwrap_or(100)
}

impl Registry {
    /// Stores `raw_json` (a posture report, checked with [`PostureReport::parse`]) as the
    /// latest report of `device_id` (32-hex id, or a device name), replacing an older one,
    /// with its receipt and expiry (unix seconds); bumps the revision and audits, in one
    /// transaction. The caller (the API) has already authenticated the report.
    pub fn store_posture_report(
        &mut self,
        device_id: &str,
        raw_json: &str,
        received_at: u64,
        expires_at: u64,
    ) -> Result<StoredReport, PolicyStoreError> {
        let report = PostureReport::parse(raw_json.as_bytes())?;
        if expires_at <= received_at {
            return Err(PolicyStoreError::BadExpiry {
                received_at,
                expires_at,
            });
        }
        // Facts are as old as their collection, not their upload: a report collected
        // before the lifetime it would get is refused, and so is one from the future.
        let collected = u64::try_from(report.collected_at.as_second()).unwrap_or(0);
        if collected > received_at.saturating_add(MAX_REPORT_SKEW_SECS) {
            return Err(PolicyStoreError::ReportFromFuture {
                ahead_secs: collected - received_at,
            });
        }
        let ttl_secs = expires_at - received_at;
        if received_at.saturating_sub(collected) >= ttl_secs {
            return Err(PolicyStoreError::StaleReport {
                age_secs: received_at - collected,
                ttl_secs,
            });
        }
        let as_i64 = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        let tx = self.write_tx()?;
        let id: String = tx
            .query_row(
                "SELECT id FROM devices WHERE id = ?1 OR name = ?1 ORDER BY (id = ?1) DESC LIMIT 1",
                [device_id],
                |r| r.get(0),
            )
            .optional()?
            .ok_or_else(|| PolicyStoreError::UnknownDevice(device_id.to_owned()))?;
        tx.execute(
            "INSERT INTO posture_reports (device_id, facts, received_at, expires_at)
             VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (device_id) DO UPDATE SET
               facts = excluded.facts, received_at = excluded.received_at,
               expires_at = excluded.expires_at",
            params![id, raw_json, as_i64(received_at), as_i64(expires_at)],
        )?;
        bump(&tx)?;
        audit(
            &tx,
            &format!("device:{id}"),
            "posture.report",
            &id,
            &serde_json::json!({
                "collected_at": report.collected_at.to_string(),
                "received_at": received_at,
                "expires_at": expires_at,
            }),
        )?;
        tx.commit()?;
        Ok(StoredReport {
            raw: raw_json.to_owned(),
            report,
            received_at,
            expires_at,
        })
    }

    /// The latest posture report of `device_id` (32-hex id), if any.
    pub fn posture_report(
        &self,
        device_id: &str,
    ) -> Result<Option<StoredReport>, PolicyStoreError> {
        posture_report(&self.conn, device_id)
    }

    /// The applied policy, if any.
    pub fn stored_policy(&self) -> Result<Option<StoredPolicy>, PolicyStoreError> {
        stored_policy(&self.conn)
    }

    /// The applied policy, parsed; `None` when none is applied.
    pub fn policy_set(&self) -> Result<Option<PolicySet>, PolicyStoreError> {
        stored_set(&self.conn)
    }

    /// What applying `source` would do, changing nothing (`policy apply --dry-run`): the
    /// file must parse and every app a rule names must be registered; users and groups
    /// that do not exist yet are warnings (they may be added after the policy).
    pub fn plan_policy(&self, source: &str) -> Result<PolicyPlan, PolicyStoreError> {
        plan(&self.conn, source)
    }

    /// Checks `source` like [`Registry::plan_policy`] and, unless the same text is stored
    /// already, stores it with its SHA-256 and `now_unix`, bumps the revision and audits
    /// (as the handle's actor), in one
    /// IMMEDIATE transaction (the check runs under the write lock too).
    pub fn apply_policy(
        &mut self,
        source: &str,
        now_unix: u64,
    ) -> Result<PolicyPlan, PolicyStoreError> {
        let (tx, actor) = self.write_tx_as()?;
        let plan = plan(&tx, source)?;
        if plan.unchanged {
            return Ok(plan);
        }
        tx.execute(
            "INSERT INTO policies (id, source, sha256, applied_at) VALUES (1, ?1, ?2, ?3)
             ON CONFLICT (id) DO UPDATE SET
               source = excluded.source, sha256 = excluded.sha256, applied_at = excluded.applied_at",
            params![
                source,
                plan.sha256,
                i64::try_from(now_unix).unwrap_or(i64::MAX)
            ],
        )?;
        bump(&tx)?;
        audit(
            &tx,
            actor,
            "policy.apply",
            "policy",
            &serde_json::json!({
                "sha256": plan.sha256,
                "rules": plan.set.rules.len(),
                "requirements": plan.set.requirements.len(),
                "diff": plan.diff.to_string(),
            }),
        )?;
        tx.commit()?;
        Ok(plan)
    }

    /// The device (by name or 32-hex id) as the policy engine sees it.
    pub fn policy_device(&self, name_or_id: &str) -> Result<PolicyDevice, PolicyStoreError> {
        policy_device(&self.conn, name_or_id)
    }

    /// Explains the decision for `device` (name or id) and `app` at `now` from `source`
    /// against the applied policy (`None` when none is applied).
    pub fn explain(
        &self,
        device: &str,
        app: &str,
        now: Timestamp,
        source: Option<std::net::IpAddr>,
    ) -> Result<Option<(PolicyDevice, Explanation)>, PolicyStoreError> {
        let exists: bool = self.conn.query_row(
            "SELECT EXISTS (SELECT 1 FROM apps WHERE name = ?1)",
            [app],
            |r| r.get(0),
        )?;
        if !exists {
            return Err(PolicyStoreError::UnknownAppName(app.to_owned()));
        }
        let pd = policy_device(&self.conn, device)?;
        let Some(set) = stored_set(&self.conn)? else {
            return Ok(None);
        };
        let explanation = postern_policy::explain(
            &set,
            &Request {
                device: &pd.device,
                app,
                source,
                now,
            },
        );
        Ok(Some((pd, explanation)))
    }

    /// `Snapshot::access` at `now` (see [`access_records`]).
    pub fn access_records(
        &self,
        now: Timestamp,
    ) -> Result<Option<Vec<AccessRecord>>, PolicyStoreError> {
        access_records(&self.conn, now)
    }
}
