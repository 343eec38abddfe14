//! The running configuration as one immutable [`Snapshot`], held by [`Live`] and replaced by a reload
//! in one swap. Request handling and the token cache read the same snapshot, so nothing can combine
//! an identity from one configuration with a credential from another.

use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::access::Access;
use crate::config::{Config, TokensConfig};
use crate::identity::Identities;
use crate::resource::Resource;

/// What requests and refreshers act on: the identities, the token policy and the caller policy.
#[derive(Debug)]
pub(crate) struct Snapshot {
    /// The identities, default first.
    pub(crate) identities: Identities,
    /// `[tokens]`
    pub(crate) tokens: TokensConfig,
    /// `[access]`, if configured.
    pub(crate) access: Option<Access>,
}

impl Snapshot {
    /// The parts of a validated configuration that a reload applies live.
    pub(crate) fn new(config: &Config) -> Self {
        Self {
            identities: Identities::new(config.identities.clone()),
            tokens: config.tokens,
            access: config.access.clone(),
        }
    }

    /// Whether `resource` is configured (kept fresh for ever) for the identity called `identity`.
    pub(crate) fn is_pinned(&self, identity: &str, resource: &Resource) -> bool {
        self.identities.by_name(identity).is_some_and(|i| i.resources.contains(resource))
    }
}

/// The current snapshot, as a request holds it: read without a lock or a reference-count write (a
/// request on every core reads it, and a shared counter written by each would bounce between them).
pub(crate) type Current = arc_swap::Guard<Arc<Snapshot>>;

/// The current snapshot. Readers take a [`Current`] and keep it for as long as they work on one request.
#[derive(Debug)]
pub(crate) struct Live(ArcSwap<Snapshot>);

impl Live {
    /// Starts with `first`.
    pub(crate) fn new(first: Snapshot) -> Self {
        Self(ArcSwap::from_pointee(first))
    }

    /// The current snapshot.
    pub(crate) fn load(&self) -> Current {
        self.0.load()
    }

    /// Makes `next` current and returns the one it replaces.
    pub(crate) fn swap(&self, next: Snapshot) -> Arc<Snapshot> {
        self.0.swap(Arc::new(next))
    }
}
