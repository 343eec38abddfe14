//! `[access]` → [`Access`]: verdicts, and rules whose users and groups are resolved to uids here, at
//! load and reload, never per request (a group: its primary and listed members, [`PrimaryGroups`]).

use std::path::Path;

use super::ConfigError;
use super::groups::{PASSWD, PrimaryGroups};
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
        // Read once, and only when some rule names a group.
        let primary = match raw.rule.iter().position(|r| !r.groups.is_empty() || !r.gids.is_empty()) {
            None => PrimaryGroups::default(),
            Some(i) => {
                let key = format!("access.rule[{i}].{}", if raw.rule[i].groups.is_empty() { "gids" } else { "groups" });
                PrimaryGroups::read(Path::new(PASSWD)).map_err(|e| {
                    self.err(key, format!("cannot read {PASSWD} for the users whose primary group it is: {e}"))
                })?
            }
        };
        let mut rules = Vec::with_capacity(raw.rule.len());
        for (i, r) in raw.rule.into_iter().enumerate() {
            rules.push(self.rule(i, r, identities, &primary)?);
        }
        let rate_limit = match raw.rate_limit {
            None => None,
            Some(text) => Some(Rate::parse(&text).ok_or_else(|| {
                self.err("access.rate_limit", format!("{text:?} is not a rate like \"20/s\", \"600/m\" or \"1000/h\""))
            })?),
        };
        Ok(Access { default, unknown, rules, rate_limit })
    }

    fn rule(
        &self,
        i: usize,
        raw: RawRule,
        identities: &[Identity],
        primary: &PrimaryGroups,
    ) -> Result<Rule, ConfigError> {
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
        for (j, &gid) in raw.gids.iter().enumerate() {
            // A gid without a group entry still has the users whose primary group it is.
            let listed = match nix::unistd::Group::from_gid(nix::unistd::Gid::from_raw(gid)) {
                Ok(group) => group.map(|g| g.mem).unwrap_or_default(),
                Err(e) => {
                    return Err(self.err(format!("{}[{j}]", k("gids")), format!("cannot look up group {gid}: {e}")));
                }
            };
            uids.extend(primary.members(gid, listed_uids(&listed)));
        }
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
            uids.extend(primary.members(group.gid.as_raw(), listed_uids(&group.mem)));
        }
        uids.sort_unstable();
        uids.dedup();
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
        Ok(Rule { uids, identities, resources })
    }
}

/// The uids of a group's listed members; a name that is no user (a stale entry) is nobody.
fn listed_uids(members: &[String]) -> Vec<u32> {
    members.iter().filter_map(|m| nix::unistd::User::from_name(m).ok().flatten()).map(|u| u.uid.as_raw()).collect()
}
