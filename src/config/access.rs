//! `[access]` → [`Access`]: verdicts, and rules whose user and group names are resolved to ids here, at
//! load and reload, never per request.

use super::ConfigError;
use super::raw::{RawAccess, RawRule};
use super::validate::Validator;
use crate::access::{Access, Pattern, Rate, Rule, Verdict};
use crate::identity::Identity;
use crate::resource::Resource;

impl Validator<'_> {
    pub(super) fn access(&self, raw: RawAccess, identities: &[Identity]) -> Result<Access, ConfigError> {
        let verdict = |key: &str, value: Option<&str>, default: Verdict| match value {
            None => Ok(default),
            Some("allow") => Ok(Verdict::Allow),
            Some("deny") => Ok(Verdict::Deny),
            Some(other) => Err(self.err(key, format!("{other:?} is not \"allow\" or \"deny\""))),
        };
        let default = verdict("access.default", raw.default.as_deref(), Verdict::Allow)?;
        let unknown = verdict("access.unknown", raw.unknown.as_deref(), Verdict::Deny)?;
        let mut rules = Vec::with_capacity(raw.rule.len());
        for (i, r) in raw.rule.into_iter().enumerate() {
            rules.push(self.rule(i, r, identities)?);
        }
        let rate_limit = match raw.rate_limit {
            None => None,
            Some(text) => Some(Rate::parse(&text).ok_or_else(|| {
                self.err("access.rate_limit", format!("{text:?} is not a rate like \"20/s\", \"600/m\" or \"1000/h\""))
            })?),
        };
        Ok(Access { default, unknown, rules, rate_limit })
    }

    fn rule(&self, i: usize, raw: RawRule, identities: &[Identity]) -> Result<Rule, ConfigError> {
        let k = |field: &str| format!("access.rule[{i}].{field}");
        if raw.uids.is_empty() && raw.users.is_empty() && raw.gids.is_empty() && raw.groups.is_empty() {
            return Err(self.err(format!("access.rule[{i}]"), "matches nobody; give uids, users, gids or groups"));
        }
        let mut uids = raw.uids;
        for (j, name) in raw.users.iter().enumerate() {
            match nix::unistd::User::from_name(name) {
                Ok(Some(u)) => uids.push(u.uid.as_raw()),
                Ok(None) => {
                    return Err(
                        self.err(format!("{}[{j}]", k("users")), format!("{name:?} is not a user on this host"))
                    );
                }
                Err(e) => return Err(self.err(format!("{}[{j}]", k("users")), format!("cannot look up {name:?}: {e}"))),
            }
        }
        let mut gids = raw.gids;
        for (j, name) in raw.groups.iter().enumerate() {
            let group = match nix::unistd::Group::from_name(name) {
                Ok(Some(g)) => g,
                Ok(None) => {
                    return Err(
                        self.err(format!("{}[{j}]", k("groups")), format!("{name:?} is not a group on this host"))
                    );
                }
                Err(e) => {
                    return Err(self.err(format!("{}[{j}]", k("groups")), format!("cannot look up {name:?}: {e}")));
                }
            };
            gids.push(group.gid.as_raw());
            // Listed members match over TCP too, where only the uid is known.
            uids.extend(
                group.mem.iter().filter_map(|m| nix::unistd::User::from_name(m).ok().flatten()).map(|u| u.uid.as_raw()),
            );
        }
        let identities = match raw.identities.as_slice() {
            [] => return Err(self.err(k("identities"), "is empty; list identity names, or [\"*\"]")),
            [all] if all == "*" => Pattern::Any,
            names => {
                for (j, name) in names.iter().enumerate() {
                    if !identities.iter().any(|id| &id.name == name) {
                        return Err(self.err(
                            format!("{}[{j}]", k("identities")),
                            format!("{name:?} is not a configured identity"),
                        ));
                    }
                }
                Pattern::Only(names.to_vec())
            }
        };
        let resources = match raw.resources.as_slice() {
            [] => return Err(self.err(k("resources"), "is empty; list resources, or [\"*\"]")),
            [all] if all == "*" => Pattern::Any,
            texts => {
                let mut out = Vec::with_capacity(texts.len());
                for (j, text) in texts.iter().enumerate() {
                    out.push(
                        Resource::parse(text)
                            .map_err(|e| self.err(format!("{}[{j}]", k("resources")), format!("{text:?}: {e}")))?,
                    );
                }
                Pattern::Only(out)
            }
        };
        Ok(Rule { uids, gids, identities, resources })
    }
}
