//! Per-caller policy (`[access]`): which local users may get which identities' tokens for which
//! resources. Names (users, groups) are resolved to ids when the configuration is loaded, never per
//! request. Evaluation is pure: [`Access::decide`].
//!
//! A request is allowed when a rule that matches the caller lists both the identity and the resource.
//! When no rule matches the caller, `default` decides; a caller the kernel could not identify gets
//! `unknown`. A caller that some rule matches is limited to what its rules list.

use crate::caller::Caller;
use crate::resource::Resource;

/// Allow or deny.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Allowed.
    Allow,
    /// Denied.
    Deny,
}

/// A list that may be `["*"]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Pattern<T> {
    /// `"*"`: anything.
    Any,
    /// Exactly these.
    Only(Vec<T>),
}

impl<T: PartialEq> Pattern<T> {
    fn allows(&self, value: &T) -> bool {
        match self {
            Self::Any => true,
            Self::Only(list) => list.contains(value),
        }
    }
}

/// One `[[access.rule]]`, names resolved.
///
/// A rule matches callers by **uid alone**, over TCP and the unix socket alike: its `groups` and
/// `gids` are resolved at load to the uids of the users the system puts in them — those whose primary
/// group it is and its listed members (`config/groups.rs`). Over the unix socket the kernel could tell
/// the connecting *process's* gid and groups (`SO_PEERCRED`, `SO_PEERGROUPS`), but those are not the
/// user's: `newgrp`, `sg`, `runuser -g`, a setgid program or a service manager's `Group=` give a process
/// another set, and a session started before `usermod -aG` lacks the new group. Over TCP only the uid
/// can be known. Deciding by the process's groups on one transport would let one user get two answers,
/// and escape a rule that restricts its group by connecting with another gid; deciding by the account
/// gives every transport the same answer, the one the administrator wrote in the group database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Rule {
    /// `uids`, the uids of `users`, and the members of `groups` and `gids` (primary and listed),
    /// sorted, without duplicates.
    pub(crate) uids: Vec<u32>,
    /// Identity names.
    pub(crate) identities: Pattern<String>,
    /// Normalised resources.
    pub(crate) resources: Pattern<Resource>,
}

impl Rule {
    fn matches(&self, uid: u32) -> bool {
        self.uids.binary_search(&uid).is_ok()
    }
}

/// `[access]`, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Access {
    /// When no rule matches the caller.
    pub(crate) default: Verdict,
    /// Callers that could not be identified.
    pub(crate) unknown: Verdict,
    /// The rules, in file order.
    pub(crate) rules: Vec<Rule>,
    /// Requests per caller (uid; unidentified callers share one budget), if limited.
    pub(crate) rate_limit: Option<Rate>,
}

/// `rate_limit = "20/s"`: a token bucket per caller holding `count` requests, refilled at that rate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Rate {
    /// Requests per period, and the burst.
    pub(crate) count: std::num::NonZeroU32,
    /// The period.
    pub(crate) per: std::time::Duration,
}

impl Rate {
    /// Parses `N/s`, `N/m` or `N/h` (N ≥ 1).
    pub(crate) fn parse(text: &str) -> Option<Self> {
        let (n, unit) = text.trim().split_once('/')?;
        let count = n.trim().parse::<u32>().ok().and_then(std::num::NonZeroU32::new)?;
        let secs = match unit.trim() {
            "s" => 1,
            "m" => 60,
            "h" => 3600,
            _ => return None,
        };
        Some(Self { count, per: std::time::Duration::from_secs(secs) })
    }
}

/// One token bucket per key, as [`Rate`] describes.
pub(crate) struct Buckets<K: std::hash::Hash + Eq + Clone> {
    rate: Rate,
    limiter: governor::DefaultKeyedRateLimiter<K>,
}

impl<K: std::hash::Hash + Eq + Clone> Buckets<K> {
    /// Full buckets for `rate`.
    pub(crate) fn new(rate: Rate) -> Self {
        // `per / count` is at least 1 µs for any count a u32 holds and a period of a second or more.
        let replenish = (rate.per / rate.count.get()).max(std::time::Duration::from_nanos(1));
        let quota = governor::Quota::with_period(replenish).unwrap_or_else(|| governor::Quota::per_second(rate.count));
        Self { rate, limiter: governor::RateLimiter::keyed(quota.allow_burst(rate.count)) }
    }

    /// The rate.
    pub(crate) fn rate(&self) -> Rate {
        self.rate
    }

    /// Takes one from `key`'s bucket; `Err` is how long until the next one is there.
    pub(crate) fn take(&self, key: &K) -> Result<(), std::time::Duration> {
        self.limiter.check_key(key).map_err(|not_until| {
            not_until.wait_time_from(governor::clock::Clock::now(&governor::clock::DefaultClock::default()))
        })
    }
}

impl<K: std::hash::Hash + Eq + Clone> std::fmt::Debug for Buckets<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Buckets").field("rate", &self.rate.to_string()).finish_non_exhaustive()
    }
}

impl std::fmt::Display for Rate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let unit = match self.per.as_secs() {
            1 => "s",
            60 => "m",
            _ => "h",
        };
        write!(f, "{}/{unit}", self.count)
    }
}

/// Why a request is refused; names no identity but the one asked for.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum Denied {
    /// The caller could not be identified and `access.unknown = "deny"`.
    #[error("access denied by policy: the caller could not be identified ({0}) and access.unknown is \"deny\"")]
    Unknown(String),
    /// No rule matches the caller and `access.default = "deny"`.
    #[error("access denied by policy: no access.rule matches {0} and access.default is \"deny\"")]
    NoRule(String),
    /// Rules match the caller, but none lists this identity and resource.
    #[error(
        "access denied by policy: {caller} is limited by access.rule{rules} to other identities or resources than identity {identity:?} and resource {resource:?}"
    )]
    NotListed {
        /// The caller.
        caller: String,
        /// The matching rules' indexes, e.g. `[0]` or `[0, 2]`.
        rules: String,
        /// The identity asked for.
        identity: String,
        /// The resource asked for.
        resource: String,
    },
}

impl Access {
    /// Whether `caller` may get `identity`'s token for `resource`; `Ok` names the deciding rule, if any.
    pub(crate) fn decide(&self, caller: &Caller, identity: &str, resource: &Resource) -> Result<Option<usize>, Denied> {
        let uid = match caller {
            Caller::Known { uid, .. } => *uid,
            Caller::Unknown(_) => {
                return match self.unknown {
                    Verdict::Allow => Ok(None),
                    Verdict::Deny => Err(Denied::Unknown(caller.to_string())),
                };
            }
        };
        let matching: Vec<usize> = (0..self.rules.len()).filter(|&i| self.rules[i].matches(uid)).collect();
        if matching.is_empty() {
            return match self.default {
                Verdict::Allow => Ok(None),
                Verdict::Deny => Err(Denied::NoRule(caller.to_string())),
            };
        }
        let identity_owned = identity.to_owned();
        matching
            .iter()
            .copied()
            .find(|&i| self.rules[i].identities.allows(&identity_owned) && self.rules[i].resources.allows(resource))
            .map(Some)
            .ok_or_else(|| Denied::NotListed {
                caller: caller.to_string(),
                rules: format!("{matching:?}"),
                identity: identity.to_owned(),
                resource: resource.to_string(),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::caller::{Transport, Unknown};

    #[test]
    fn rates() {
        let r = Rate::parse(" 20/s ").expect("rate");
        assert_eq!((r.count.get(), r.per.as_secs(), r.to_string()), (20, 1, "20/s".to_owned()));
        assert_eq!(Rate::parse("600/m").map(|r| r.to_string()), Some("600/m".to_owned()));
        for bad in ["0/s", "20", "20/d", "x/s", "-1/s"] {
            assert!(Rate::parse(bad).is_none(), "{bad}");
        }
    }

    fn user(uid: u32, gid: Option<u32>) -> Caller {
        Caller::Known { uid, gid, pid: None, transport: Transport::Tcp }
    }

    fn res(s: &str) -> Resource {
        Resource::parse(s).expect("resource")
    }

    fn policy(default: Verdict) -> Access {
        Access {
            default,
            unknown: Verdict::Deny,
            rate_limit: None,
            rules: vec![
                Rule {
                    uids: vec![1001],
                    identities: Pattern::Only(vec!["default".into()]),
                    resources: Pattern::Only(vec![res("https://storage.azure.com/")]),
                },
                // A group's members, resolved at load (config/groups.rs).
                Rule { uids: vec![1002, 1003], identities: Pattern::Any, resources: Pattern::Any },
            ],
        }
    }

    #[test]
    fn decisions() {
        let storage = res("https://storage.azure.com/");
        let vault = res("https://vault.azure.net");
        for default in [Verdict::Allow, Verdict::Deny] {
            let p = policy(default);
            assert_eq!(p.decide(&user(1001, None), "default", &storage), Ok(Some(0)));
            let e = p.decide(&user(1001, None), "default", &vault).expect_err("not listed");
            assert!(e.to_string().contains("access.rule[0]") && e.to_string().contains("vault"), "{e}");
            assert!(matches!(p.decide(&user(1001, None), "other", &storage), Err(Denied::NotListed { .. })));
            assert_eq!(p.decide(&user(1002, None), "other", &vault), Ok(Some(1)));
            assert_eq!(p.decide(&user(1003, None), "other", &vault), Ok(Some(1)), "a group member");
            // The process's gid is not the user's groups: the same answer as without it, over any transport.
            let unix = Caller::Known { uid: 1003, gid: Some(4242), pid: Some(1), transport: Transport::Unix };
            assert_eq!(p.decide(&unix, "other", &vault), Ok(Some(1)), "a member with another gid");
            let outsider = Caller::Known { uid: 4242, gid: Some(1003), pid: Some(1), transport: Transport::Unix };
            let verdict = p.decide(&outsider, "other", &vault);
            assert!(verdict == Ok(None) || matches!(verdict, Err(Denied::NoRule(_))), "no rule: {verdict:?}");
            let unknown = Caller::Unknown(Unknown::NotFound);
            assert!(matches!(p.decide(&unknown, "default", &storage), Err(Denied::Unknown(_))));
        }
        assert_eq!(policy(Verdict::Allow).decide(&user(7, None), "default", &vault), Ok(None));
        let e = policy(Verdict::Deny).decide(&user(7, None), "default", &vault).expect_err("no rule");
        assert_eq!(
            e.to_string(),
            "access denied by policy: no access.rule matches uid 7 and access.default is \"deny\""
        );
        let open = Access { unknown: Verdict::Allow, ..policy(Verdict::Deny) };
        assert_eq!(open.decide(&Caller::Unknown(Unknown::Gone), "default", &vault), Ok(None));
    }
}
