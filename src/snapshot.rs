//! The running configuration as one immutable [`Snapshot`], held by [`Live`] and replaced by a reload
//! in one swap. Request handling and the token cache read the same snapshot, so nothing can combine
//! an identity from one configuration with a credential from another.

use std::sync::Arc;

use parking_lot::RwLock;

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

/// The current snapshot. Readers take an `Arc` and keep it for as long as they work on one request.
#[derive(Debug)]
pub(crate) struct Live(RwLock<Arc<Snapshot>>);

impl Live {
    /// Starts with `first`.
    pub(crate) fn new(first: Snapshot) -> Self {
        Self(RwLock::new(Arc::new(first)))
    }

    /// The current snapshot.
    pub(crate) fn load(&self) -> Arc<Snapshot> {
        self.0.read().clone()
    }

    /// Makes `next` current and returns the one it replaces.
    pub(crate) fn swap(&self, next: Snapshot) -> Arc<Snapshot> {
        std::mem::replace(&mut *self.0.write(), Arc::new(next))
    }
}
