//! Access decisions: one (device, app, source, now) against a [`PolicySet`].
//!
//! Owns: the evaluation order and semantics (docs/policy.md "Evaluation"), posture checks
//! of reported facts, and the step-by-step explanation behind `policy explain`. Must not
//! touch: the clock (the caller passes `now`), storage, sockets or the firewall; it
//! neither fetches facts nor records decisions.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::time::Duration;

use jiff::{SignedDuration, Timestamp};

use crate::model::{format_duration, Effect, PolicySet, Requirement, Rule, SessionMode, Version};

/// What the controller knows about a device and its user at decision time.
#[derive(Debug, Clone, PartialEq)]
pub struct Device {
    /// Device id or name (shown in explanations).
    pub id: String,
    /// The user the device belongs to.
    pub user: String,
    /// The user's groups.
    pub groups: Vec<String>,
    /// The device is revoked: nothing is allowed.
    pub revoked: bool,
    /// The device or its user is disabled: nothing is allowed.
    pub disabled: bool,
    /// Risk score 0-100 (admin- or API-set; 0 when never scored).
    pub risk: u8,
    /// When the user last proved MFA on this device.
    pub last_mfa: Option<Timestamp>,
    /// Posture as reported facts or as precomputed verdicts.
    pub posture: Posture,
}

/// The device's posture as the controller holds it.
#[derive(Debug, Clone, PartialEq)]
pub enum Posture {
    /// Nothing reported: every posture requirement fails.
    Unknown,
    /// Signed facts from the client, checked here against each requirement.
    Facts(PostureFacts),
    /// Precomputed pass/fail per requirement name, each with its own expiry.
    Verdicts(BTreeMap<String, Verdict>),
}

/// Facts a client reported. Missing facts fail the checks that need them.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct PostureFacts {
    /// The facts are stale from this instant on (every requirement then fails).
    pub expires: Option<Timestamp>,
    /// e.g. `linux`, `macos`, `windows` (case-insensitive).
    pub os_family: Option<String>,
    /// e.g. `22.04`, `14.2.1`.
    pub os_version: Option<String>,
    /// e.g. `6.1.0-13-amd64`.
    pub kernel: Option<String>,
    /// When packages were last updated.
    pub last_package_update: Option<Timestamp>,
    /// Full-disk encryption is on.
    pub disk_encrypted: bool,
    /// The host firewall is on.
    pub firewall_on: bool,
    /// Names of running processes.
    pub processes: Vec<String>,
    /// The MDM enrollment marker is present.
    pub mdm_enrolled: bool,
    /// Custom named checks and their results.
    pub custom: BTreeMap<String, bool>,
}

/// A precomputed verdict for one requirement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// Whether the requirement passed.
    pub passed: bool,
    /// The verdict is invalid from this instant on.
    pub expires: Timestamp,
    /// Why it failed (shown in denials); may be empty.
    pub detail: String,
}

/// One access question.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    /// The device asking.
    pub device: &'a Device,
    /// The app it wants.
    pub app: &'a str,
    /// Where the knock came from, if known (rules with source_networks need it).
    pub source: Option<IpAddr>,
    /// The decision instant (UTC).
    pub now: Timestamp,
}

/// The answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Access granted.
    Allow(Grant),
    /// Access refused.
    Deny(Denial),
}

impl Decision {
    /// Whether access is granted.
    pub fn is_allow(&self) -> bool {
        matches!(self, Decision::Allow(_))
    }
}

/// A granted access.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// The allow rule that granted it.
    pub rule: String,
    /// The rule's lease length.
    pub lease: Duration,
    /// The rule's session mode.
    pub session_mode: SessionMode,
    /// `now + lease`, cut short by the MFA age limit and the posture verdicts' expiry.
    pub expires_at: Timestamp,
    /// The earliest instant at which this decision can stop holding without any change
    /// to the device, the user or the policy: the MFA age limit running out, the posture
    /// report or a verdict expiring, the package-update age limit passing, the granting
    /// rule's time window closing, or an applicable deny rule's window opening. `None`:
    /// it holds until something changes. The lease is not part of it.
    pub valid_until: Option<Timestamp>,
}

/// A refused access.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denial {
    /// Why.
    pub reason: DenyReason,
    /// The rule behind it: the deny rule, or the first allow rule that applied but failed.
    pub rule: Option<String>,
}

impl Denial {
    /// The failing posture requirement, if that is the reason.
    pub fn requirement(&self) -> Option<&str> {
        match &self.reason {
            DenyReason::Failed(Failure::Posture { requirement, .. }) => Some(requirement),
            _ => None,
        }
    }

    /// The stable code of a reason the device itself can fix (`posture_failed`,
    /// `mfa_too_old`, `mfa_missing`), for denial replies; `None` for the rest (no rule, a
    /// deny rule, revoked, disabled, source network, time window, risk).
    pub fn fixable_code(&self) -> Option<&'static str> {
        match &self.reason {
            DenyReason::Failed(Failure::Posture { .. }) => Some("posture_failed"),
            DenyReason::Failed(Failure::MfaTooOld { .. }) => Some("mfa_too_old"),
            DenyReason::Failed(Failure::MfaMissing) => Some("mfa_missing"),
            _ => None,
        }
    }

    /// The failing requirement's remediation text, if that is the reason.
    pub fn remediation(&self) -> Option<&str> {
        match &self.reason {
            DenyReason::Failed(Failure::Posture { remediation, .. }) => Some(remediation),
            _ => None,
        }
    }
}

impl fmt::Display for Denial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.reason {
            DenyReason::Revoked => f.write_str("device is revoked"),
            DenyReason::Disabled => f.write_str("device or user is disabled"),
            DenyReason::NoRule => f.write_str("no allow rule grants this app to this user"),
            DenyReason::DenyRule => write!(
                f,
                "deny rule {:?} matches",
                self.rule.as_deref().unwrap_or("")
            ),
            DenyReason::Failed(failure) => write!(
                f,
                "rule {:?}: {failure}",
                self.rule.as_deref().unwrap_or("")
            ),
        }
    }
}

/// Why access was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DenyReason {
    /// The device is revoked.
    Revoked,
    /// The device or its user is disabled.
    Disabled,
    /// A deny rule matched (deny wins).
    DenyRule,
    /// No allow rule covers this app for this user (default deny).
    NoRule,
    /// Allow rules applied, but the first one failed this condition (and none passed).
    Failed(Failure),
}

/// The condition an allow rule failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// The source address is unknown or outside the rule's networks.
    SourceNetwork,
    /// `now` is outside every time window of the rule.
    OutsideWindow,
    /// The device's risk score is above the rule's maximum.
    Risk {
        /// The device's score.
        risk: u8,
        /// The rule's maximum.
        max: u8,
    },
    /// The user never proved MFA on this device.
    MfaMissing,
    /// The last MFA is older than the rule allows.
    MfaTooOld {
        /// Its age.
        age: Duration,
        /// The rule's maximum.
        max: Duration,
    },
    /// A posture requirement fails.
    Posture {
        /// Its name.
        requirement: String,
        /// What the user should do.
        remediation: String,
        /// What exactly fails.
        detail: String,
    },
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::SourceNetwork => f.write_str("source address is not in source_networks"),
            Failure::OutsideWindow => f.write_str("outside the rule's time windows"),
            Failure::Risk { risk, max } => write!(f, "risk score {risk} is above max_risk {max}"),
            Failure::MfaMissing => f.write_str("no MFA on record; run `postern login`"),
            Failure::MfaTooOld { age, max } => write!(
                f,
                "last MFA {} ago is older than mfa_max_age {}; run `postern login`",
                format_duration(*age),
                format_duration(*max)
            ),
            Failure::Posture {
                requirement,
                remediation,
                detail,
            } => write!(
                f,
                "posture requirement {requirement:?} fails ({detail}); remediation: {remediation}"
            ),
        }
    }
}

/// How a step went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The rule does not apply (other app or other user).
    Skip,
    /// A check passed / the rule granted.
    Pass,
    /// A check failed / the rule refused.
    Fail,
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Outcome::Skip => "skip",
            Outcome::Pass => "pass",
            Outcome::Fail => "fail",
        })
    }
}

/// One line of an explanation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// `device` or `rule "name"`.
    pub subject: String,
    /// How it went.
    pub outcome: Outcome,
    /// Why, in words.
    pub why: String,
}

/// Every step of a decision and the decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Explanation {
    /// The question, in words.
    pub request: String,
    /// Each step in evaluation order.
    pub steps: Vec<Step>,
    /// The answer.
    pub decision: Decision,
}

impl fmt::Display for Explanation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{}", self.request)?;
        for s in &self.steps {
            writeln!(f, "  {:<4} {}: {}", s.outcome, s.subject, s.why)?;
        }
        match &self.decision {
            Decision::Allow(g) => write!(
                f,
                "=> allow by rule {:?}: lease {}, session {}, until {}",
                g.rule,
                format_duration(g.lease),
                g.session_mode,
                g.expires_at
            ),
            Decision::Deny(d) => write!(f, "=> deny: {d}"),
        }
    }
}

/// The decision alone (same evaluation as [`explain`]).
pub fn decide(policy: &PolicySet, req: &Request<'_>) -> Decision {
    explain(policy, req).decision
}

/// Evaluates the request and records every step.
///
/// Order: device revoked/disabled; then every deny rule in file order (one that covers
/// the app and user and whose networks and windows match refuses at once); then every
/// allow rule in file order, checking source network, time window, risk, MFA age and
/// posture; the first that passes grants. None applying is a default deny; some applying
/// but all failing denies with the first one's failure.
pub fn explain(policy: &PolicySet, req: &Request<'_>) -> Explanation {
    let d = req.device;
    let source = req.source.map(|ip| ip.to_canonical());
    let request = format!(
        "device {} (user {}, groups [{}], risk {}) app {} at {} from {}",
        d.id,
        d.user,
        d.groups.join(", "),
        d.risk,
        req.app,
        req.now,
        source.map_or("unknown address".into(), |s| s.to_string())
    );
    let mut steps = Vec::new();
    let done = |steps: Vec<Step>, decision| Explanation {
        request: request.clone(),
        steps,
        decision,
    };
    let device_step = |outcome, why: &str| Step {
        subject: "device".into(),
        outcome,
        why: why.into(),
    };
    if d.revoked {
        steps.push(device_step(Outcome::Fail, "revoked"));
        return done(steps, deny(DenyReason::Revoked, None));
    }
    if d.disabled {
        steps.push(device_step(Outcome::Fail, "device or user disabled"));
        return done(steps, deny(DenyReason::Disabled, None));
    }
    steps.push(device_step(
        Outcome::Pass,
        "enrolled, not revoked, not disabled",
    ));

    let ordered: Vec<&Rule> = policy
        .rules
        .iter()
        .filter(|r| r.effect == Effect::Deny)
        .chain(policy.rules.iter().filter(|r| r.effect == Effect::Allow))
        .collect();
    // Rules after the deciding one are listed too, so an explanation names every rule.
    let not_reached = |steps: &mut Vec<Step>, after: usize| {
        for rule in ordered.iter().skip(after + 1) {
            steps.push(Step {
                subject: format!("{} rule {:?}", rule.effect, rule.name),
                outcome: Outcome::Skip,
                why: "not reached: an earlier rule decided".into(),
            });
        }
    };
    let mut first_failure: Option<(String, Failure)> = None;
    for (index, rule) in ordered.iter().enumerate() {
        let subject = format!("{} rule {:?}", rule.effect, rule.name);
        let mut step = |outcome, why: String| {
            steps.push(Step {
                subject: subject.clone(),
                outcome,
                why,
            })
        };
        if !rule.covers_app(req.app) {
            step(Outcome::Skip, format!("does not cover app {}", req.app));
            continue;
        }
        let Some(who) = covers_subject(rule, d) else {
            step(
                Outcome::Skip,
                format!("user {} is not in its users or groups", d.user),
            );
            continue;
        };
        match rule.effect {
            Effect::Deny => {
                // An unknown source fails closed: a network-scoped deny applies to it.
                if source.is_some() && !in_networks(rule, source) {
                    step(
                        Outcome::Skip,
                        format!("applies to {who}, but the source is outside its networks"),
                    );
                } else if !in_windows(rule, req.now) {
                    step(
                        Outcome::Skip,
                        format!("applies to {who}, but now is outside its windows"),
                    );
                } else {
                    step(Outcome::Fail, format!("applies to {who}: deny wins"));
                    not_reached(&mut steps, index);
                    return done(steps, deny(DenyReason::DenyRule, Some(rule.name.clone())));
                }
            }
            Effect::Allow => match check_allow(policy, rule, req, source) {
                Ok((expires_at, valid_until)) => {
                    step(
                        Outcome::Pass,
                        format!("applies to {who}; every condition holds"),
                    );
                    let grant = Grant {
                        rule: rule.name.clone(),
                        lease: rule.lease,
                        session_mode: rule.session_mode,
                        expires_at,
                        valid_until: earliest(
                            valid_until,
                            deny_windows_open(&ordered[..index], req, source),
                        ),
                    };
                    not_reached(&mut steps, index);
                    return done(steps, Decision::Allow(grant));
                }
                Err(failure) => {
                    step(Outcome::Fail, format!("applies to {who}, but {failure}"));
                    if first_failure.is_none() {
                        first_failure = Some((rule.name.clone(), failure));
                    }
                }
            },
        }
    }
    let decision = match first_failure {
        Some((rule, failure)) => deny(DenyReason::Failed(failure), Some(rule)),
        None => deny(DenyReason::NoRule, None),
    };
    done(steps, decision)
}

fn deny(reason: DenyReason, rule: Option<String>) -> Decision {
    Decision::Deny(Denial { reason, rule })
}

fn covers_subject(rule: &Rule, d: &Device) -> Option<String> {
    if rule.users.iter().any(|u| u == "*" || *u == d.user) {
        return Some(format!("user {}", d.user));
    }
    rule.groups
        .iter()
        .find(|g| d.groups.contains(g))
        .map(|g| format!("group {g}"))
}

fn in_networks(rule: &Rule, source: Option<IpAddr>) -> bool {
    if rule.source_networks.is_empty() {
        return true;
    }
    source.is_some_and(|ip| rule.source_networks.iter().any(|n| n.contains(&ip)))
}

fn in_windows(rule: &Rule, now: Timestamp) -> bool {
    let Some(zone) = &rule.time_zone else {
        return true;
    };
    if rule.windows.is_empty() {
        return true;
    }
    let local = now.to_zoned_datetime(zone.tz.clone());
    let day = usize::from(local.weekday().to_monday_zero_offset().unsigned_abs());
    let minute =
        u16::try_from(i32::from(local.hour()) * 60 + i32::from(local.minute())).unwrap_or(0);
    rule.windows.iter().any(|w| w.contains(day, minute))
}

fn secs(d: Duration) -> SignedDuration {
    SignedDuration::from_secs(i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

fn plus(t: Timestamp, d: Duration) -> Timestamp {
    t.checked_add(secs(d)).unwrap_or(Timestamp::MAX)
}

fn earliest(a: Option<Timestamp>, b: Option<Timestamp>) -> Option<Timestamp> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// The earliest instant one of these deny rules (all evaluated before the grant and
/// skipped) starts to apply because its time window opens.
fn deny_windows_open(
    rules: &[&Rule],
    req: &Request<'_>,
    source: Option<IpAddr>,
) -> Option<Timestamp> {
    rules
        .iter()
        .filter(|r| r.effect == Effect::Deny && r.covers_app(req.app))
        .filter(|r| covers_subject(r, req.device).is_some())
        .filter(|r| source.is_none() || in_networks(r, source))
        .filter_map(|r| next_window_change(r, req.now))
        .min()
}

/// The first instant after `now` at which `in_windows(rule, _)` differs from its value at
/// `now`, looking at most nine days ahead; `None` for a rule without windows or when
/// nothing changes within that horizon.
///
/// Candidates are every window start and end on the local days around `now` (a local
/// time that falls into a DST gap maps forward, as jiff's compatible disambiguation does)
/// and every UTC-offset transition of the zone; each is verified with `in_windows`, so a
/// wrong candidate can only be skipped, never reported.
pub fn next_window_change(rule: &Rule, now: Timestamp) -> Option<Timestamp> {
    let zone = rule.time_zone.as_ref()?;
    if rule.windows.is_empty() {
        return None;
    }
    let horizon = now.checked_add(SignedDuration::from_hours(9 * 24)).ok()?;
    let today = now.to_zoned_datetime(zone.tz.clone()).date();
    let mut candidates: Vec<Timestamp> = Vec::new();
    for offset in -1i64..=9 {
        let Ok(day) = today.checked_add(SignedDuration::from_hours(offset * 24)) else {
            continue;
        };
        for w in &rule.windows {
            for (minute, next_day) in [(w.start, false), (w.end, w.end <= w.start)] {
                let base = if next_day {
                    day.tomorrow().ok()
                } else {
                    Some(day)
                };
                let Some(base) = base else { continue };
                let (h, m) = (minute / 60, minute % 60);
                let dt = if h >= 24 {
                    base.tomorrow().ok().map(|d| d.at(0, 0, 0, 0))
                } else {
                    i8::try_from(h)
                        .ok()
                        .zip(i8::try_from(m).ok())
                        .map(|(h, m)| base.at(h, m, 0, 0))
                };
                if let Some(t) = dt.and_then(|dt| zone.tz.to_timestamp(dt).ok()) {
                    candidates.push(t);
                }
            }
        }
    }
    candidates.extend(
        zone.tz
            .following(now)
            .take_while(|t| t.timestamp() <= horizon)
            .map(|t| t.timestamp()),
    );
    candidates.retain(|t| *t > now && *t <= horizon);
    candidates.sort();
    candidates.dedup();
    let inside = in_windows(rule, now);
    candidates
        .into_iter()
        .find(|t| in_windows(rule, *t) != inside)
}

/// All conditions of an allow rule; on success, when the grant must end (lease cut short)
/// and when the decision can stop holding (see [`Grant::valid_until`]).
fn check_allow(
    policy: &PolicySet,
    rule: &Rule,
    req: &Request<'_>,
    source: Option<IpAddr>,
) -> Result<(Timestamp, Option<Timestamp>), Failure> {
    let d = req.device;
    if !in_networks(rule, source) {
        return Err(Failure::SourceNetwork);
    }
    if !in_windows(rule, req.now) {
        return Err(Failure::OutsideWindow);
    }
    if let Some(max) = rule.max_risk {
        if d.risk > max {
            return Err(Failure::Risk { risk: d.risk, max });
        }
    }
    let mut expires_at = plus(req.now, rule.lease);
    let mut valid_until = next_window_change(rule, req.now);
    if let Some(max) = rule.mfa_max_age {
        let Some(last) = d.last_mfa else {
            return Err(Failure::MfaMissing);
        };
        let age = req.now.duration_since(last);
        let age = Duration::from_secs(u64::try_from(age.as_secs()).unwrap_or(0));
        if age > max {
            return Err(Failure::MfaTooOld { age, max });
        }
        expires_at = expires_at.min(plus(last, max).max(req.now));
        // `age > max` compares whole seconds: the first failing instant is a second later.
        let mfa_end = plus(last, max + Duration::from_secs(1));
        valid_until = earliest(valid_until, Some(mfa_end));
    }
    for name in &rule.posture {
        // The parser resolved every name; a set built by hand may not have.
        let Some(requirement) = policy.requirement(name) else {
            return Err(Failure::Posture {
                requirement: name.clone(),
                remediation: "ask the administrator: the policy names an undefined requirement"
                    .into(),
                detail: "requirement not defined".into(),
            });
        };
        let fail = |detail: String| Failure::Posture {
            requirement: name.clone(),
            remediation: requirement.remediation.clone(),
            detail,
        };
        match &d.posture {
            Posture::Unknown => return Err(fail("no posture reported".into())),
            Posture::Facts(facts) => {
                check_requirement(requirement, facts, req.now).map_err(fail)?;
                if let Some(e) = facts.expires {
                    expires_at = expires_at.min(e);
                }
                valid_until = earliest(valid_until, requirement_holds_until(requirement, facts));
            }
            Posture::Verdicts(verdicts) => {
                let Some(v) = verdicts.get(name) else {
                    return Err(fail("no verdict for this requirement".into()));
                };
                if req.now >= v.expires {
                    return Err(fail(format!(
                        "verdict expired at {}; the client must report posture again",
                        v.expires
                    )));
                }
                if !v.passed {
                    let detail = if v.detail.is_empty() {
                        "failed".into()
                    } else {
                        v.detail.clone()
                    };
                    return Err(fail(detail));
                }
                expires_at = expires_at.min(v.expires);
                valid_until = earliest(valid_until, Some(v.expires));
            }
        }
    }
    Ok((expires_at, valid_until))
}

/// When facts that pass `req` now stop passing with time alone: the report's expiry and
/// the package-update age limit (`age > days` in whole seconds fails a second after).
fn requirement_holds_until(req: &Requirement, facts: &PostureFacts) -> Option<Timestamp> {
    let update_limit = req.max_days_since_update.and_then(|days| {
        let last = facts.last_package_update?;
        Some(plus(
            last,
            Duration::from_secs(u64::from(days) * 86_400 + 1),
        ))
    });
    earliest(facts.expires, update_limit)
}

/// The precomputed [`Verdict`] on `facts` for one requirement at `now`, as the controller
/// ships it to gateways (so the facts themselves never leave the controller). A passing
/// verdict expires when the facts would stop passing with time alone (the report's expiry
/// or the package-update age limit, whichever comes first); a failing one when the report
/// expires (time alone never makes a failing requirement pass). No expiry at all:
/// [`Timestamp::MAX`]. Deciding with the verdicts at any instant before they expire gives
/// the same allow or deny as deciding with the facts.
pub fn verdict(req: &Requirement, facts: &PostureFacts, now: Timestamp) -> Verdict {
    match check_requirement(req, facts, now) {
        Ok(()) => Verdict {
            passed: true,
            expires: requirement_holds_until(req, facts).unwrap_or(Timestamp::MAX),
            detail: String::new(),
        },
        Err(detail) => Verdict {
            passed: false,
            expires: facts.expires.unwrap_or(Timestamp::MAX),
            detail,
        },
    }
}

/// Checks reported facts against one requirement at `now`; `Err` says what fails.
///
/// The controller uses this to precompute [`Verdict`]s; [`explain`] uses it for
/// [`Posture::Facts`].
pub fn check_requirement(
    req: &Requirement,
    facts: &PostureFacts,
    now: Timestamp,
) -> Result<(), String> {
    if let Some(e) = facts.expires {
        if now >= e {
            return Err(format!(
                "posture report expired at {e}; the client must report again"
            ));
        }
    }
    if let Some(family) = &req.os_family {
        match &facts.os_family {
            None => return Err("OS family not reported".into()),
            Some(f) if !f.eq_ignore_ascii_case(family) => {
                return Err(format!("OS family is {f}, {family} required"))
            }
            Some(_) => {}
        }
    }
    if let Some(min) = &req.os_min_version {
        version_at_least("OS version", facts.os_version.as_deref(), min)?;
    }
    if let Some(min) = &req.min_kernel {
        version_at_least("kernel", facts.kernel.as_deref(), min)?;
    }
    if let Some(days) = req.max_days_since_update {
        let Some(last) = facts.last_package_update else {
            return Err("last package update not reported".into());
        };
        let age = now.duration_since(last).as_secs();
        if age > i64::from(days) * 86_400 {
            return Err(format!(
                "packages last updated {} days ago, at most {days} allowed",
                age / 86_400
            ));
        }
    }
    if req.disk_encryption && !facts.disk_encrypted {
        return Err("disk encryption is off".into());
    }
    if req.firewall && !facts.firewall_on {
        return Err("host firewall is off".into());
    }
    if req.mdm && !facts.mdm_enrolled {
        return Err("not enrolled in MDM".into());
    }
    if let Some(p) = req.processes.iter().find(|p| !facts.processes.contains(p)) {
        return Err(format!("process {p} is not running"));
    }
    if let Some(c) = req
        .custom
        .iter()
        .find(|c| facts.custom.get(*c) != Some(&true))
    {
        return Err(format!("custom check {c} does not pass"));
    }
    Ok(())
}

fn version_at_least(what: &str, reported: Option<&str>, min: &Version) -> Result<(), String> {
    let Some(text) = reported else {
        return Err(format!("{what} not reported"));
    };
    match Version::parse_reported(text) {
        None => Err(format!("{what} {text:?} is not a version")),
        Some(v) if !v.at_least(min) => Err(format!("{what} {v} is below {min}")),
        Some(_) => Ok(()),
    }
}
