//! The token cache: one entry and one refresher task per (identity, resource).
//!
//! - **Single flight.** Only an entry's refresher calls the IdP; a cache hit reads the entry's current
//!   token ([`TokenCache::hit`]: no lock, no shared write); on a miss a caller reads the entry's
//!   [`Slot`] through a `watch` channel and waits for the refresher's next publication.
//! - **Serve while refreshing.** The refresher replaces the token in one publication; a caller
//!   never waits on the IdP while a servable token (more than `min_lifetime` left) is cached.
//! - **Bounded waits.** A caller waits at most `tokens.max_wait`; when the next attempt is further away
//!   than that it gets [`TokenError::Unavailable`] at once, with the time of that attempt.
//! - **Never dies.** Each IdP call runs in its own task, so even a panic there is just a failed attempt.
//! - **One live configuration.** Entries are keyed by identity *name* and hold no identity: each attempt
//!   resolves the identity from the current [`Snapshot`], so no entry can keep a superseded credential.
//!   Whether an entry is configured (pinned) and the token policy are read from the snapshot too.
//! - **Lifetimes.** Pinned entries (configured resources) live for ever; on-demand ones are dropped after
//!   `tokens.idle_timeout` without a caller. A dropped entry's channel closes and waiting callers re-look-up.

mod refresher;

/// `Retry-After` for a caller over its on-demand limit: entries idle out, so try again later.
const FULL_RETRY_AFTER: Duration = Duration::from_secs(60);

#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use arc_swap::{ArcSwap, ArcSwapOption};
use parking_lot::{Mutex, MutexGuard};
use tokio::sync::{Notify, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{AccessToken, FailureClass, HeldToken, Served, TokenError, TokenSource};
use crate::access::{Buckets, Rate};
use crate::caller::Caller;
use crate::identity::Identity;
use crate::resource::Resource;
use crate::snapshot::{Live, Snapshot};
use refresher::{Failure, refresher};

/// What an entry currently holds.
#[derive(Debug, Clone, Default)]
struct Slot {
    token: Option<Arc<AccessToken>>,
    failure: Option<Arc<Failure>>,
}

#[derive(Debug, Clone)]
struct Key {
    identity: String,
    resource: Resource,
}

/// An entry's key as two borrowed names: the map is searched with one of these, so a request builds
/// no key (a `Key` borrows as a `dyn KeyView`, and both hash and compare through [`KeyView::parts`]).
trait KeyView {
    /// The identity name and the resource.
    fn parts(&self) -> (&str, &str);
}

impl KeyView for Key {
    fn parts(&self) -> (&str, &str) {
        (&self.identity, self.resource.as_str())
    }
}

impl KeyView for (&str, &str) {
    fn parts(&self) -> (&str, &str) {
        *self
    }
}

impl<'a> std::borrow::Borrow<dyn KeyView + 'a> for Key {
    fn borrow(&self) -> &(dyn KeyView + 'a) {
        self
    }
}

impl std::hash::Hash for dyn KeyView + '_ {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.parts().hash(state);
    }
}

impl PartialEq for dyn KeyView + '_ {
    fn eq(&self, other: &Self) -> bool {
        self.parts() == other.parts()
    }
}

impl Eq for dyn KeyView + '_ {}

impl std::hash::Hash for Key {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.parts().hash(state);
    }
}

impl PartialEq for Key {
    fn eq(&self, other: &Self) -> bool {
        self.parts() == other.parts()
    }
}

impl Eq for Key {}

#[derive(Debug)]
struct Entry {
    slot: watch::Receiver<Slot>,
    /// The token in `slot`, for the cache hit's path: read without a lock or a reference-count write
    /// (a receiver's `borrow` takes a read lock, and every core would write that lock's word).
    /// Written only by [`publish`] with the slot.
    current: ArcSwapOption<AccessToken>,
    wake: Notify,
    /// Milliseconds since `created` at the last caller: an atomic, so the hot path takes no lock for it.
    last_used_ms: AtomicU64,
    created: Instant,
    /// Set with a wake-up when the identity's credential changed: retry now, forgetting the backoff.
    reset: AtomicBool,
    /// Stops this entry's refresher (identity removed, or shutdown).
    cancel: CancellationToken,
    /// The caller an on-demand entry counts against (`None`: configured when created).
    owner: Option<Owner>,
    /// Whether its refresher task is running (set at creation, cleared when the task ends).
    alive: AtomicBool,
}

/// Who an on-demand entry counts against: the uid of the caller that created it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Owner {
    /// A known local user.
    Uid(u32),
    /// Every caller that could not be identified, together.
    Unknown,
}

impl Owner {
    /// The owner for a caller.
    pub(crate) fn of(caller: &Caller) -> Self {
        match caller {
            Caller::Known { uid, .. } => Self::Uid(*uid),
            Caller::Unknown(_) => Self::Unknown,
        }
    }
}

/// On-demand entries per owner and in all, and each owner's budget for adding new ones
/// (`tokens.on_demand_rate`; replaced, full, when the rate changes); changed only under the entries'
/// writers' lock.
#[derive(Debug, Default)]
struct Counts {
    per_owner: HashMap<Owner, usize>,
    total: usize,
    adding: Option<Buckets<Owner>>,
}

/// Why no entry could be had.
enum Refused {
    /// The identity is not in the live snapshot (removed by a reload).
    Gone,
    /// `tokens.max_on_demand_per_caller` (`true`) or `tokens.max_on_demand` (`false`) is reached.
    Full(bool, usize),
    /// The owner adds new entries faster than `tokens.on_demand_rate`; the next one in this long.
    TooFast(Rate, Duration),
}

impl Entry {
    fn touch(&self, now: Instant) {
        let ms = u64::try_from(now.saturating_duration_since(self.created).as_millis()).unwrap_or(u64::MAX);
        // At most once a second (idle timeouts are minutes): a word every core wrote on every request
        // would bounce between them.
        if ms >= self.last_used_ms.load(Ordering::Relaxed).saturating_add(1000) {
            self.last_used_ms.store(ms, Ordering::Relaxed);
        }
    }

    fn last_used(&self) -> Instant {
        self.created + Duration::from_millis(self.last_used_ms.load(Ordering::Relaxed))
    }
}

/// Readiness of one configured (pinned) resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PinnedState {
    /// Identity name.
    pub(crate) identity: String,
    /// The resource.
    pub(crate) resource: Resource,
    /// Whether a servable token is cached.
    pub(crate) ready: bool,
    /// The cached token's remaining lifetime, servable or not.
    pub(crate) remaining: Option<Duration>,
    /// The last attempt's failure, in a few words (`IdP: HTTP 503`), while it stands.
    pub(crate) problem: Option<String>,
}

/// An identity-wide credential rejection: new keys of that identity fail fast instead of each calling
/// the IdP, for as long as the identity keeps the credential that was rejected.
#[derive(Debug)]
struct Rejection {
    /// The identity as it was when its credential was rejected.
    identity: Arc<Identity>,
    failure: Arc<Failure>,
}

/// The entries: read without a lock (a request reads the map through an `arc_swap` guard); changed,
/// rarely, by copying the map under a lock that writers take.
#[derive(Default)]
struct Entries {
    map: ArcSwap<HashMap<Key, Arc<Entry>>>,
    writer: Mutex<()>,
}

impl Entries {
    /// The map as it is now.
    fn read(&self) -> arc_swap::Guard<Arc<HashMap<Key, Arc<Entry>>>> {
        self.map.load()
    }

    /// Exclusive right to change the map (other readers go on reading the current one).
    fn write(&self) -> EntriesWriter<'_> {
        EntriesWriter { entries: self, _lock: self.writer.lock() }
    }
}

/// Held while changing the entries; see [`Entries::write`].
struct EntriesWriter<'a> {
    entries: &'a Entries,
    _lock: MutexGuard<'a, ()>,
}

impl EntriesWriter<'_> {
    /// The map as it is now (no one else can change it while this is held).
    fn current(&self) -> arc_swap::Guard<Arc<HashMap<Key, Arc<Entry>>>> {
        self.entries.map.load()
    }

    fn get(&self, key: &dyn KeyView) -> Option<Arc<Entry>> {
        self.entries.map.load().get(key).cloned()
    }

    fn insert(&mut self, key: Key, entry: Arc<Entry>) {
        let mut map = HashMap::clone(&self.entries.map.load());
        map.insert(key, entry);
        self.entries.map.store(Arc::new(map));
    }

    fn remove(&mut self, key: &Key) -> Option<Arc<Entry>> {
        let mut map = HashMap::clone(&self.entries.map.load());
        let removed = map.remove(key)?;
        self.entries.map.store(Arc::new(map));
        Some(removed)
    }
}

struct Inner {
    source: Arc<dyn TokenSource>,
    live: Arc<Live>,
    entries: Entries,
    rejected: Mutex<HashMap<String, Rejection>>,
    counts: Mutex<Counts>,
    tracker: TaskTracker,
    cancel: CancellationToken,
}

/// The cache. Cheap to clone.
#[derive(Clone)]
pub(crate) struct TokenCache {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for TokenCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenCache").field("entries", &self.inner.entries.read().len()).finish()
    }
}

impl TokenCache {
    /// An empty cache that reads the configuration from `live`, runs its refreshers on `tracker` and
    /// stops them on `cancel`. Call [`TokenCache::apply`] to start fetching the configured resources.
    pub(crate) fn new(
        source: Arc<dyn TokenSource>,
        live: Arc<Live>,
        tracker: TaskTracker,
        cancel: CancellationToken,
    ) -> Self {
        let inner = Inner {
            source,
            live,
            entries: Entries::default(),
            rejected: Mutex::new(HashMap::new()),
            counts: Mutex::new(Counts::default()),
            tracker,
            cancel,
        };
        Self { inner: Arc::new(inner) }
    }

    /// Follows a swap of the live snapshot from `old` to the current one (at start, `old` is `None`):
    /// entries of removed identities stop; entries of an identity whose upstream settings or
    /// credential changed forget their backoff and, if they hold a failure, retry at once (a servable
    /// token is kept and refreshed with the new credential on schedule); configured resources start
    /// being fetched. Unconfigured ones become on-demand by themselves (the refresher reads the snapshot).
    pub(crate) fn apply(&self, old: Option<&Snapshot>) {
        let new = self.inner.live.load();
        let changed = |name: &str| {
            let before = old.and_then(|o| o.identities.by_name(name));
            let after = new.identities.by_name(name);
            matches!((before, after), (Some(b), Some(a)) if !b.same_upstream(a))
        };
        self.inner.rejected.lock().retain(|name, _| new.identities.by_name(name).is_some() && !changed(name));
        // Under the writer: an entry being added now is either seen here or sees the new snapshot.
        let mut map = self.inner.entries.write();
        let mut removed = Vec::new();
        for (key, entry) in map.current().iter() {
            if new.identities.by_name(&key.identity).is_none() {
                entry.cancel.cancel();
                removed.push(key.clone());
            } else if changed(&key.identity) {
                entry.reset.store(true, Ordering::SeqCst);
                entry.wake.notify_one();
            }
        }
        for key in &removed {
            if let Some(entry) = map.remove(key) {
                self.inner.forget(&entry);
            }
        }
        drop(map);
        for identity in new.identities.iter() {
            for resource in &identity.resources {
                let _ = self.entry(&identity.name, resource, None);
            }
        }
    }

    /// State of every configured resource; tokend is ready when all are.
    pub(crate) fn pinned(&self) -> Vec<PinnedState> {
        let now = Instant::now();
        let snapshot = self.inner.live.load();
        let min = snapshot.tokens.min_lifetime;
        let entries = self.inner.entries.read();
        let mut out: Vec<PinnedState> = snapshot
            .identities
            .iter()
            .flat_map(|i| i.resources.iter().map(move |r| Key { identity: i.name.clone(), resource: r.clone() }))
            .map(|key| {
                let slot = entries.get(&key).map(|e| e.slot.borrow().clone()).unwrap_or_default();
                let remaining = slot.token.as_ref().map(|t| t.remaining(now));
                PinnedState {
                    ready: remaining.is_some_and(|r| r > min),
                    remaining,
                    problem: slot.failure.as_ref().map(|f| f.short()),
                    identity: key.identity,
                    resource: key.resource,
                }
            })
            .collect();
        out.sort_by(|a, b| (&a.identity, &a.resource).cmp(&(&b.identity, &b.resource)));
        out
    }

    /// Number of entries (pinned and on demand).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.inner.entries.read().len()
    }

    /// Whether every entry's refresher task is still running (the watchdog's check: a refresher that
    /// died would leave its entry never refreshed again).
    pub(crate) fn refreshers_alive(&self) -> bool {
        self.inner.entries.read().values().all(|e| e.alive.load(Ordering::SeqCst) || e.cancel.is_cancelled())
    }

    /// On-demand entries cached now, all callers together.
    pub(crate) fn on_demand(&self) -> usize {
        self.inner.counts.lock().total
    }

    /// The cached token for `resource` as `identity` if it has more than `min_lifetime` left: what
    /// [`TokenCache::get`] answers without waiting. Nothing is locked and no shared word is written
    /// (but, once a second, the entry's last use): every core serves the same few entries.
    pub(crate) fn hit(&self, snapshot: &Snapshot, identity: &Identity, resource: &Resource) -> Option<Served> {
        let entries = self.inner.entries.read();
        let entry = entries.get(&(identity.name.as_str(), resource.as_str()) as &dyn KeyView)?;
        // One clock read: the entry's last use and the expiry check.
        let now = Instant::now();
        entry.touch(now);
        let token = HeldToken::loaded(entry.current.load())?;
        (token.remaining(now) > snapshot.tokens.min_lifetime).then_some(Served { token, cache_hit: true })
    }

    /// A token for `resource` as `identity` (selected from `snapshot`) with more than `min_lifetime`
    /// left, waiting at most `max_wait` when none is cached.
    /// Whether an entry for `identity` and `resource` exists (configured, or added on demand before).
    pub(crate) fn has(&self, identity: &Identity, resource: &Resource) -> bool {
        self.inner.entries.read().get(&(identity.name.as_str(), resource.as_str()) as &dyn KeyView).is_some()
    }

    pub(crate) async fn get(
        &self,
        snapshot: &Snapshot,
        caller: &Caller,
        identity: &Identity,
        resource: &Resource,
    ) -> Result<Served, TokenError> {
        if let Some(served) = self.hit(snapshot, identity, resource) {
            return Ok(served);
        }
        let policy = snapshot.tokens;
        let mut now = Instant::now();
        let deadline = now + policy.max_wait;
        let mut first_look = true;
        loop {
            let entry = match self.entry(&identity.name, resource, Some(Owner::of(caller))) {
                Ok(entry) => entry,
                Err(Refused::Gone) => {
                    return Err(TokenError::Unavailable {
                        identity: identity.name.clone(),
                        cause: "the identity was removed by a configuration reload".to_owned(),
                        retry_after: Duration::from_secs(1),
                    });
                }
                Err(Refused::Full(per_caller, limit)) => {
                    return Err(TokenError::TooManyResources {
                        who: if per_caller { "this caller" } else { "all callers together" },
                        have: if per_caller { "has" } else { "have" },
                        limit,
                        key: if per_caller { "max_on_demand_per_caller" } else { "max_on_demand" },
                        retry_after: FULL_RETRY_AFTER,
                    });
                }
                Err(Refused::TooFast(rate, retry_after)) => {
                    return Err(TokenError::AddingTooFast { rate: rate.to_string(), retry_after });
                }
            };
            entry.touch(now);
            let mut rx = entry.slot.clone();
            loop {
                {
                    let slot = rx.borrow_and_update();
                    if let Some(t) = slot.token.as_ref().filter(|t| t.remaining(now) > policy.min_lifetime) {
                        return Ok(Served { token: HeldToken::owned(t.clone()), cache_hit: first_look });
                    }
                    if let Some(f) = &slot.failure {
                        // While the backoff lasts, permanent failures are answered at once; transient ones
                        // too when the next attempt is further away than this caller may wait. Once it is
                        // over, the caller wakes the refresher (an on-demand entry nobody asks for is not
                        // retried) and waits.
                        let backing_off = f.retry_at > now;
                        if backing_off && (f.class() != FailureClass::Transient || f.retry_at > deadline) {
                            return Err(f.to_error(identity, resource, now));
                        }
                    }
                }
                first_look = false;
                entry.wake.notify_one();
                let changed = tokio::time::timeout_at(deadline, rx.changed()).await;
                now = Instant::now();
                match changed {
                    Ok(Ok(())) => continue,
                    Ok(Err(_closed)) if self.inner.cancel.is_cancelled() => {
                        return Err(TokenError::Unavailable {
                            identity: identity.name.clone(),
                            cause: "tokend is shutting down".to_owned(),
                            retry_after: Duration::from_secs(1),
                        });
                    }
                    Ok(Err(_closed)) => break, // the entry was dropped: look it up again
                    Err(_elapsed) => {
                        let slot = rx.borrow();
                        return Err(match &slot.failure {
                            Some(f) => f.to_error(identity, resource, now),
                            None => TokenError::Unavailable {
                                identity: identity.name.clone(),
                                cause: format!(
                                    "the identity provider has not answered within tokens.max_wait ({}s)",
                                    policy.max_wait.as_secs_f32()
                                ),
                                retry_after: Duration::from_secs(1),
                            },
                        });
                    }
                }
            }
        }
    }

    /// The entry of (`identity`, `resource`), created with its refresher on first use. A new on-demand
    /// entry counts against `owner` and must fit `tokens.max_on_demand_per_caller` and `max_on_demand`,
    /// and takes one from the owner's `tokens.on_demand_rate` budget.
    /// `Gone` when the live snapshot has no such identity (removed by a reload since it was selected).
    fn entry(&self, identity: &str, resource: &Resource, owner: Option<Owner>) -> Result<Arc<Entry>, Refused> {
        let view = (identity, resource.as_str());
        if let Some(e) = self.inner.entries.read().get(&view as &dyn KeyView) {
            return Ok(e.clone());
        }
        let mut map = self.inner.entries.write();
        if let Some(e) = map.get(&view as &dyn KeyView) {
            return Ok(e);
        }
        // Checked under the entries lock: `apply` runs after the swap and then sees this entry.
        let snapshot = self.inner.live.load();
        if snapshot.identities.by_name(identity).is_none() {
            return Err(Refused::Gone);
        }
        let owner = owner.filter(|_| !snapshot.is_pinned(identity, resource));
        if owner.is_some()
            && let Some(pinned) = snapshot.identities.by_name(identity).and_then(|i| {
                i.resources.iter().find(|p| {
                    let (p, r) = (p.as_str(), resource.as_str());
                    p.strip_suffix('/') == Some(r) || r.strip_suffix('/') == Some(p)
                })
            })
        {
            // Once per entry: the spelling matters (Entra echoes it in `aud`), so this is a cache miss.
            tracing::warn!(
                identity,
                asked = %resource,
                pinned = %pinned,
                "a caller asked for a configured resource spelt with a different trailing slash: a separate \
                 cache entry, fetched on demand; pin the spelling your clients send (add {resource} to resources)"
            );
        }
        if let Some(owner) = owner {
            let mut counts = self.inner.counts.lock();
            let (per_caller, total) = (snapshot.tokens.max_on_demand_per_caller, snapshot.tokens.max_on_demand);
            if counts.per_owner.get(&owner).is_some_and(|n| *n >= per_caller) {
                return Err(Refused::Full(true, per_caller));
            }
            if counts.total >= total {
                return Err(Refused::Full(false, total));
            }
            let rate = snapshot.tokens.on_demand_rate;
            let adding = match &mut counts.adding {
                Some(b) if b.rate() == rate => b,
                slot => slot.insert(Buckets::new(rate)),
            };
            adding.take(&owner).map_err(|wait| Refused::TooFast(rate, wait))?;
            *counts.per_owner.entry(owner).or_default() += 1;
            counts.total += 1;
        }
        let (tx, rx) = watch::channel(Slot::default());
        let entry = Arc::new(Entry {
            slot: rx,
            current: ArcSwapOption::empty(),
            wake: Notify::new(),
            last_used_ms: AtomicU64::new(0),
            created: Instant::now(),
            reset: AtomicBool::new(false),
            cancel: self.inner.cancel.child_token(),
            owner,
            alive: AtomicBool::new(true),
        });
        let key = Key { identity: identity.to_owned(), resource: resource.clone() };
        map.insert(key.clone(), entry.clone());
        drop(map);
        self.inner.tracker.spawn(refresher(self.inner.clone(), key, entry.clone(), tx));
        Ok(entry)
    }
}

impl Inner {
    /// Uncounts a removed entry; call with the entries' writer held.
    fn forget(&self, entry: &Entry) {
        let Some(owner) = entry.owner else { return };
        let mut counts = self.counts.lock();
        counts.total = counts.total.saturating_sub(1);
        if let Some(n) = counts.per_owner.get_mut(&owner) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                counts.per_owner.remove(&owner);
            }
        }
    }
}

/// Publishes a fetched token in an entry: to callers waiting on its channel and to the cache hit's path.
fn publish(entry: &Entry, tx: &watch::Sender<Slot>, token: AccessToken) {
    let token = Arc::new(token);
    entry.current.store(Some(token.clone()));
    tx.send_modify(|s| {
        s.token = Some(token);
        s.failure = None;
    });
}
