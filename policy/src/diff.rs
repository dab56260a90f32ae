//! The difference between two policy sets, for `policy apply --dry-run`.
//!
//! Owns: matching rules and requirements by name and listing what was added, removed or
//! changed (field by field, in canonical text). Must not touch: files or storage; applying
//! a set is the controller's job.

use std::fmt;

use crate::model::PolicySet;

/// What changed between an old and a new policy set.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PolicyDiff {
    /// Rule names only in the new set (new-file order).
    pub rules_added: Vec<String>,
    /// Rule names only in the old set (old-file order).
    pub rules_removed: Vec<String>,
    /// Rules in both whose fields differ.
    pub rules_changed: Vec<Change>,
    /// Requirement names only in the new set.
    pub requirements_added: Vec<String>,
    /// Requirement names only in the old set.
    pub requirements_removed: Vec<String>,
    /// Requirements in both whose fields differ.
    pub requirements_changed: Vec<Change>,
    /// Allow rules are evaluated in file order: true when the common rules' order changed.
    pub rule_order_changed: bool,
}

/// One changed rule or requirement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// Its name.
    pub name: String,
    /// (field, old text, new text) for each differing field.
    pub fields: Vec<(String, String, String)>,
}

impl PolicyDiff {
    /// Nothing changed.
    pub fn is_empty(&self) -> bool {
        *self == PolicyDiff::default()
    }
}

/// Compares `old` with `new` by name.
pub fn diff(old: &PolicySet, new: &PolicySet) -> PolicyDiff {
    let (rules_added, rules_removed, rules_changed) = compare(
        &old.rules
            .iter()
            .map(|r| (r.name.as_str(), r.fields()))
            .collect::<Vec<_>>(),
        &new.rules
            .iter()
            .map(|r| (r.name.as_str(), r.fields()))
            .collect::<Vec<_>>(),
    );
    let (requirements_added, requirements_removed, requirements_changed) = compare(
        &old.requirements
            .iter()
            .map(|r| (r.name.as_str(), r.fields()))
            .collect::<Vec<_>>(),
        &new.requirements
            .iter()
            .map(|r| (r.name.as_str(), r.fields()))
            .collect::<Vec<_>>(),
    );
    let common = |a: &PolicySet, b: &PolicySet| -> Vec<String> {
        a.rules
            .iter()
            .filter(|r| b.rule(&r.name).is_some())
            .map(|r| r.name.clone())
            .collect()
    };
    PolicyDiff {
        rule_order_changed: common(old, new) != common(new, old),
        rules_added,
        rules_removed,
        rules_changed,
        requirements_added,
        requirements_removed,
        requirements_changed,
    }
}

type Fields = Vec<(&'static str, String)>;

fn compare(
    old: &[(&str, Fields)],
    new: &[(&str, Fields)],
) -> (Vec<String>, Vec<String>, Vec<Change>) {
    let find = |set: &[(&str, Fields)], name: &str| {
        set.iter().find(|(n, _)| *n == name).map(|(_, f)| f.clone())
    };
    let added = new
        .iter()
        .filter(|(n, _)| find(old, n).is_none())
        .map(|(n, _)| (*n).to_owned())
        .collect();
    let removed = old
        .iter()
        .filter(|(n, _)| find(new, n).is_none())
        .map(|(n, _)| (*n).to_owned())
        .collect();
    let mut changed = Vec::new();
    for (name, new_fields) in new {
        let Some(old_fields) = find(old, name) else {
            continue;
        };
        let fields: Vec<(String, String, String)> = old_fields
            .iter()
            .zip(new_fields)
            .filter(|((_, a), (_, b))| a != b)
            .map(|((f, a), (_, b))| ((*f).to_owned(), a.clone(), b.clone()))
            .collect();
        if !fields.is_empty() {
            changed.push(Change {
                name: (*name).to_owned(),
                fields,
            });
        }
    }
    (added, removed, changed)
}

impl fmt::Display for PolicyDiff {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() {
            return writeln!(f, "no changes");
        }
        let groups = [
            (
                "requirement",
                &self.requirements_added,
                &self.requirements_removed,
                &self.requirements_changed,
            ),
            (
                "rule",
                &self.rules_added,
                &self.rules_removed,
                &self.rules_changed,
            ),
        ];
        for (kind, added, removed, changed) in groups {
            for n in added {
                writeln!(f, "+ {kind} {n:?}")?;
            }
            for n in removed {
                writeln!(f, "- {kind} {n:?}")?;
            }
            for c in changed {
                writeln!(f, "~ {kind} {:?}", c.name)?;
                for (field, a, b) in &c.fields {
                    writeln!(f, "    {field}: {a} -> {b}")?;
                }
            }
        }
        if self.rule_order_changed {
            writeln!(
                f,
                "~ rule order changed (allow rules are tried in file order)"
            )?;
        }
        Ok(())
    }
}
