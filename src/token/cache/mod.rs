//! The token cache: one entry and one refresher task per (identity, resource).
//!
//! - **Single flight.** Only an entry's refresher calls the IdP; callers read the entry's current
//!   [`Slot`] through a `watch` channel and, on a miss, wait for the refresher's next publication.
//! - **Serve while refreshing.** The refresher replaces the token in one `watch` publication; a caller
//!   never waits on the IdP while a servable token (more than `min_lifetime` left) is cached.
//! - **Bounded waits.** A caller waits at most `tokens.max_wait`; when the next attempt is further away
//!   than that it gets [`TokenError::Unavailable`] at once, with the time of that attempt.
//! - **Never dies.** Each IdP call runs in its own task, so even a panic there is just a failed attempt.
//! - **Lifetimes.** Pinned entries (configured resources) live forever; on-demand ones are dropped after
//!   `tokens.idle_timeout` without a caller. A dropped entry's channel closes and waiting callers re-look-up.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::{Mutex, RwLock};
use tokio::sync::{Notify, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::refresh::{RetryDelays, TooShortLived, refresh_after};
use super::{AccessToken, TokenError};
use crate::config::TokensConfig;
use crate::identity::Identity;
use crate::idp::{FailureClass, IdpClient, IdpError, IssuedToken};
use crate::resource::Resource;

/// A boxed future, so that [`TokenSource`] is object-safe.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Where tokens come from: the real [`IdpClient`], or a fake in unit tests.
pub trait TokenSource: Send + Sync + 'static {
    /// One upstream request.
    fn fetch<'a>(
        &'a self,
        identity: &'a Identity,
        resource: &'a Resource,
    ) -> BoxFuture<'a, Result<IssuedToken, IdpError>>;
}

impl TokenSource for IdpClient {
    fn fetch<'a>(
        &'a self,
        identity: &'a Identity,
        resource: &'a Resource,
    ) -> BoxFuture<'a, Result<IssuedToken, IdpError>> {
        Box::pin(IdpClient::fetch(self, identity, resource))
    }
}

/// Why the last attempt failed and when the next one is due.
#[derive(Debug, Clone)]
pub struct Failure {
    cause: Cause,
    retry_at: Instant,
}

#[derive(Debug, Clone)]
enum Cause {
    Idp(IdpError),
    TooShortLived(TooShortLived),
    Panicked,
}

impl Cause {
    /// How the refresher treats it: the one mapping, used for backoff and for callers.
    fn class(&self) -> FailureClass {
        match self {
            Self::Idp(e) => e.class(),
            Self::TooShortLived(_) => FailureClass::Rejected,
            Self::Panicked => FailureClass::Transient,
        }
    }
}

impl Failure {
    fn class(&self) -> FailureClass {
        self.cause.class()
    }

    fn describe(&self) -> String {
        match &self.cause {
            Cause::Idp(e) => e.to_string(),
            Cause::TooShortLived(e) => e.to_string(),
            Cause::Panicked => "internal error while requesting a token (see log)".to_owned(),
        }
    }

    fn to_error(&self, identity: &Identity, resource: &Resource, now: Instant) -> TokenError {
        match (&self.cause, self.class()) {
            (Cause::Idp(IdpError::CredentialRejected { error, .. }), _) => TokenError::CredentialRejected {
                identity: identity.name.clone(),
                client_id: identity.client_id.clone(),
                error: error.clone(),
            },
            (Cause::Idp(IdpError::BadResource { error, .. }), _) => {
                TokenError::BadResource { resource: resource.to_string(), error: error.clone() }
            }
            (_, FailureClass::Transient) => TokenError::Unavailable {
                identity: identity.name.clone(),
                cause: self.describe(),
                retry_after: self.retry_at.saturating_duration_since(now),
            },
            _ => TokenError::Failed { identity: identity.name.clone(), cause: self.describe() },
        }
    }
}

/// What an entry currently holds.
#[derive(Debug, Clone, Default)]
struct Slot {
    token: Option<Arc<AccessToken>>,
    failure: Option<Arc<Failure>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    identity: String,
    resource: Resource,
}

#[derive(Debug)]
struct Entry {
    /// Replaced when a reload changes the identity (e.g. a rotated credential).
    identity: RwLock<Arc<Identity>>,
    slot: watch::Receiver<Slot>,
    wake: Notify,
    /// Milliseconds since `created` at the last caller: an atomic, so the hot path takes no lock for it.
    last_used_ms: AtomicU64,
    created: Instant,
    /// Configured resources are pinned; a reload may unpin them (then they idle out like on-demand ones).
    pinned: AtomicBool,
    /// Set with a wake-up when the identity's credential changed: retry now, forgetting the backoff.
    reset: AtomicBool,
    /// Stops this entry's refresher (identity removed, or shutdown).
    cancel: CancellationToken,
}

impl Entry {
    fn touch(&self) {
        let ms = u64::try_from(self.created.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_used_ms.store(ms, Ordering::Relaxed);
    }

    fn last_used(&self) -> Instant {
        self.created + Duration::from_millis(self.last_used_ms.load(Ordering::Relaxed))
    }
}

/// Readiness of one configured (pinned) resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PinnedState {
    /// Identity name.
    pub identity: String,
    /// The resource.
    pub resource: Resource,
    /// Whether a servable token is cached.
    pub ready: bool,
}

struct Inner {
    source: Arc<dyn TokenSource>,
    policy: RwLock<TokensConfig>,
    entries: RwLock<HashMap<Key, Arc<Entry>>>,
    /// Identities whose credential the IdP rejected, until the failure's `retry_at`: new keys of such an
    /// identity fail fast instead of each calling the IdP.
    rejected: Mutex<HashMap<String, Arc<Failure>>>,
    /// The identities of the last `apply`, to tell what a reload changed.
    known: RwLock<HashMap<String, Arc<Identity>>>,
    tracker: TaskTracker,
    cancel: CancellationToken,
}

/// The cache. Cheap to clone.
#[derive(Clone)]
pub struct TokenCache {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for TokenCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenCache").field("entries", &self.inner.entries.read().len()).finish()
    }
}

impl TokenCache {
    /// An empty cache whose refreshers run on `tracker` and stop on `cancel`.
    pub fn new(
        source: Arc<dyn TokenSource>,
        policy: TokensConfig,
        tracker: TaskTracker,
        cancel: CancellationToken,
    ) -> Self {
        let inner = Inner {
            source,
            policy: RwLock::new(policy),
            entries: RwLock::new(HashMap::new()),
            rejected: Mutex::new(HashMap::new()),
            known: RwLock::new(HashMap::new()),
            tracker,
            cancel,
        };
        Self { inner: Arc::new(inner) }
    }

    /// Starts fetching `resource` for `identity` now and keeps it fresh for as long as tokend runs.
    pub fn pin(&self, identity: &Arc<Identity>, resource: &Resource) {
        let entry = self.entry(identity, resource, true);
        entry.pinned.store(true, Ordering::SeqCst);
    }

    /// Replaces the token policy (a reload); refreshers use it from their next decision on.
    pub fn set_policy(&self, policy: TokensConfig) {
        *self.inner.policy.write() = policy;
    }

    /// Applies a (re)loaded set of identities: entries of removed identities stop; entries of an identity
    /// whose upstream settings or credential changed switch to the new one, forget their backoff and,
    /// if they hold a failure, retry at once (a servable token is kept and refreshed with the new
    /// credential on schedule); configured resources are pinned, no longer configured ones become
    /// on-demand.
    pub fn apply(&self, identities: &[Arc<Identity>]) {
        let by_name: HashMap<String, Arc<Identity>> = identities.iter().map(|i| (i.name.clone(), i.clone())).collect();
        let changed: Vec<String> = {
            let mut known = self.inner.known.write();
            let changed = identities
                .iter()
                .filter(|new| known.get(&new.name).is_some_and(|old| !old.same_upstream(new)))
                .map(|new| new.name.clone())
                .collect();
            known.clone_from(&by_name);
            changed
        };
        self.inner.rejected.lock().retain(|name, _| by_name.contains_key(name) && !changed.contains(name));
        let mut removed = Vec::new();
        for (key, entry) in self.inner.entries.read().iter() {
            let Some(new) = by_name.get(&key.identity) else {
                entry.cancel.cancel();
                removed.push(key.clone());
                continue;
            };
            *entry.identity.write() = Arc::clone(new);
            entry.pinned.store(new.resources.contains(&key.resource), Ordering::SeqCst);
            if changed.contains(&key.identity) {
                entry.reset.store(true, Ordering::SeqCst);
                entry.wake.notify_one();
            }
        }
        if !removed.is_empty() {
            let mut map = self.inner.entries.write();
            for key in &removed {
                map.remove(key);
            }
        }
        for identity in identities {
            for resource in &identity.resources {
                self.pin(identity, resource);
            }
        }
    }

    /// State of every pinned entry; tokend is ready when all are.
    pub fn pinned(&self) -> Vec<PinnedState> {
        let now = Instant::now();
        let min = self.inner.policy.read().min_lifetime;
        let mut out: Vec<PinnedState> = self
            .inner
            .entries
            .read()
            .iter()
            .filter(|(_, e)| e.pinned.load(Ordering::SeqCst))
            .map(|(k, e)| PinnedState {
                identity: k.identity.clone(),
                resource: k.resource.clone(),
                ready: e.slot.borrow().token.as_ref().is_some_and(|t| t.remaining(now) > min),
            })
            .collect();
        out.sort_by(|a, b| (&a.identity, &a.resource).cmp(&(&b.identity, &b.resource)));
        out
    }

    /// Number of entries (pinned and on demand).
    pub fn len(&self) -> usize {
        self.inner.entries.read().len()
    }

    /// Whether the cache has no entry.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A token for `resource` as `identity` with more than `min_lifetime` left, waiting at most
    /// `max_wait` when none is cached. The `bool` is true when it was served from the cache at once.
    pub async fn get(
        &self,
        identity: &Arc<Identity>,
        resource: &Resource,
    ) -> Result<(Arc<AccessToken>, bool), TokenError> {
        let policy = *self.inner.policy.read();
        let deadline = Instant::now() + policy.max_wait;
        let mut first_look = true;
        loop {
            let entry = self.entry(identity, resource, false);
            entry.touch();
            let mut rx = entry.slot.clone();
            loop {
                let now = Instant::now();
                {
                    let slot = rx.borrow_and_update();
                    if let Some(t) = slot.token.as_ref().filter(|t| t.remaining(now) > policy.min_lifetime) {
                        return Ok((t.clone(), first_look));
                    }
                    if let Some(f) = &slot.failure {
                        // Permanent failures are answered at once; transient ones too when the next attempt
                        // is further away than this caller may wait.
                        if f.class() != FailureClass::Transient || f.retry_at > deadline {
                            return Err(f.to_error(identity, resource, now));
                        }
                    }
                }
                first_look = false;
                entry.wake.notify_one();
                match tokio::time::timeout_at(deadline, rx.changed()).await {
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
                        let now = Instant::now();
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

    fn entry(&self, identity: &Arc<Identity>, resource: &Resource, pinned: bool) -> Arc<Entry> {
        let key = Key { identity: identity.name.clone(), resource: resource.clone() };
        if let Some(e) = self.inner.entries.read().get(&key) {
            return e.clone();
        }
        let mut map = self.inner.entries.write();
        if let Some(e) = map.get(&key) {
            return e.clone();
        }
        let (tx, rx) = watch::channel(Slot::default());
        let entry = Arc::new(Entry {
            identity: RwLock::new(identity.clone()),
            slot: rx,
            wake: Notify::new(),
            last_used_ms: AtomicU64::new(0),
            created: Instant::now(),
            pinned: AtomicBool::new(pinned),
            reset: AtomicBool::new(false),
            cancel: self.inner.cancel.child_token(),
        });
        map.insert(key.clone(), entry.clone());
        drop(map);
        self.inner.tracker.spawn(refresher(self.inner.clone(), key, entry.clone(), tx));
        entry
    }
}

/// What woke the refresher up.
enum Wake {
    Cancelled,
    Timer,
    Caller,
}

async fn refresher(inner: Arc<Inner>, key: Key, entry: Arc<Entry>, tx: watch::Sender<Slot>) {
    let mut delays = RetryDelays::new();
    loop {
        let policy = *inner.policy.read();
        let min = policy.min_lifetime;
        if entry.reset.swap(false, Ordering::SeqCst) {
            // The credential changed: forget the backoff and the failure, try again now.
            delays = RetryDelays::new();
            tx.send_modify(|s| s.failure = None);
        }
        let now = Instant::now();
        let idle_at = (!entry.pinned.load(Ordering::SeqCst)).then(|| entry.last_used() + policy.idle_timeout);
        if idle_at.is_some_and(|t| now >= t) {
            let mut map = inner.entries.write();
            if map.get(&key).is_some_and(|e| Arc::ptr_eq(e, &entry)) {
                map.remove(&key);
            }
            tracing::debug!(identity = %key.identity, resource = %key.resource, "dropped idle on-demand resource");
            return; // dropping `tx` closes the channel for any straggler
        }
        let (due, servable) = {
            let slot = tx.borrow();
            let servable = slot.token.as_ref().is_some_and(|t| t.remaining(now) > min);
            match (&slot.failure, &slot.token) {
                (Some(f), _) => (f.retry_at, servable),
                (None, Some(t)) => (t.refresh_due(), servable),
                (None, None) => (now, false),
            }
        };
        if now < due {
            let sleep_until = idle_at.map_or(due, |i| i.min(due));
            let wake = tokio::select! {
                () = entry.cancel.cancelled() => Wake::Cancelled,
                () = tokio::time::sleep_until(sleep_until) => Wake::Timer,
                () = entry.wake.notified() => Wake::Caller,
            };
            match wake {
                Wake::Cancelled => return,
                Wake::Timer => continue,
                Wake::Caller if entry.reset.load(Ordering::SeqCst) => continue,
                // A caller found nothing servable. Fetch now unless we are backing off after a failure
                // (callers must not be able to hammer the IdP through us) or a servable token appeared.
                Wake::Caller if servable || tx.borrow().failure.is_some() => continue,
                Wake::Caller => {}
            }
        }
        let failure = match rejected_credential(&inner, &key.identity, Instant::now()) {
            Some(f) => f,
            None => match attempt(&inner, &entry, &key).await {
                None => return, // cancelled
                Some(Ok(token)) => {
                    delays = RetryDelays::new();
                    inner.rejected.lock().remove(&key.identity);
                    tracing::info!(
                        identity = %key.identity,
                        resource = %key.resource,
                        token = token.fingerprint(),
                        expires_on = token.expires_on(),
                        refresh_in_s = token.refresh_due().saturating_duration_since(Instant::now()).as_secs(),
                        "token fetched"
                    );
                    tx.send_modify(|s| {
                        s.token = Some(Arc::new(token));
                        s.failure = None;
                    });
                    continue;
                }
                Some(Err(cause)) => {
                    let class = cause.class();
                    let retry_after = match &cause {
                        Cause::Idp(e) => e.retry_after(),
                        _ => None,
                    };
                    let delay = delays.next(class, retry_after);
                    let failure = Arc::new(Failure { cause, retry_at: Instant::now() + delay });
                    let still_served = tx.borrow().token.as_ref().is_some_and(|t| t.remaining(Instant::now()) > min);
                    tracing::warn!(
                        identity = %key.identity,
                        resource = %key.resource,
                        error = %failure.describe(),
                        retry_in_s = delay.as_secs_f32(),
                        cached_token_still_served = still_served,
                        "token request failed"
                    );
                    if class == FailureClass::Credential {
                        inner.rejected.lock().insert(key.identity.clone(), failure.clone());
                    }
                    failure
                }
            },
        };
        tx.send_modify(|s| s.failure = Some(failure));
    }
}

/// The identity-wide credential rejection, while it lasts.
fn rejected_credential(inner: &Inner, identity: &str, now: Instant) -> Option<Arc<Failure>> {
    let map = inner.rejected.lock();
    map.get(identity).filter(|f| f.retry_at > now).cloned()
}

/// One upstream attempt in its own task (a panic there cannot kill the refresher). `None` when cancelled.
async fn attempt(inner: &Arc<Inner>, entry: &Arc<Entry>, key: &Key) -> Option<Result<AccessToken, Cause>> {
    let identity = entry.identity.read().clone();
    let (source, resource) = (inner.source.clone(), key.resource.clone());
    let requested = Instant::now();
    let mut task = inner.tracker.spawn(async move { source.fetch(&identity, &resource).await });
    let joined = tokio::select! {
        () = entry.cancel.cancelled() => {
            task.abort();
            return None;
        }
        joined = &mut task => joined,
    };
    Some(match joined {
        Ok(Ok(issued)) => {
            let lifetime = issued.expires_in;
            let min_lifetime = inner.policy.read().min_lifetime;
            match refresh_after(lifetime, issued.refresh_in, min_lifetime, fastrand::f64()) {
                Ok(after) => Ok(AccessToken::new(issued, requested, after)),
                Err(e) => Err(Cause::TooShortLived(e)),
            }
        }
        Ok(Err(e)) => Err(Cause::Idp(e)),
        Err(join) => {
            tracing::error!(identity = %key.identity, resource = %key.resource, panicked = join.is_panic(), "token request task failed");
            Err(Cause::Panicked)
        }
    })
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::SystemTime;

    use super::*;
    use crate::identity::test_identity;

    /// A scripted IdP: each call pops the next answer (the last one repeats), after `delay`.
    struct Fake {
        calls: AtomicUsize,
        delay: Duration,
        answers: Mutex<Vec<Result<u64, IdpError>>>,
    }

    impl Fake {
        fn new(delay: Duration, answers: Vec<Result<u64, IdpError>>) -> Arc<Self> {
            Arc::new(Self { calls: AtomicUsize::new(0), delay, answers: Mutex::new(answers) })
        }
        fn calls(&self) -> usize {
            self.calls.load(Ordering::SeqCst)
        }
    }

    impl TokenSource for Fake {
        fn fetch<'a>(&'a self, _: &'a Identity, _: &'a Resource) -> BoxFuture<'a, Result<IssuedToken, IdpError>> {
            Box::pin(async move {
                let n = self.calls.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(self.delay).await;
                let answer = {
                    let mut a = self.answers.lock();
                    if a.len() > 1 { a.remove(0) } else { a[0].clone() }
                };
                answer.map(|lifetime| IssuedToken {
                    access_token: format!("token-{n}").into(),
                    expires_in: Duration::from_secs(lifetime),
                    ext_expires_in: None,
                    refresh_in: None,
                    requested_at: SystemTime::now(),
                })
            })
        }
    }

    fn cache(source: Arc<Fake>, min_lifetime: u64) -> TokenCache {
        let policy = TokensConfig {
            min_lifetime: Duration::from_secs(min_lifetime),
            max_wait: Duration::from_secs(8),
            idle_timeout: Duration::from_secs(600),
        };
        TokenCache::new(source, policy, TaskTracker::new(), CancellationToken::new())
    }

    fn ident() -> Arc<Identity> {
        Arc::new(test_identity("default", "cid"))
    }

    fn res() -> Resource {
        Resource::parse("https://storage.azure.com").expect("valid")
    }

    fn unavailable() -> IdpError {
        IdpError::Unavailable { status: 503, retry_after: None }
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_cold_misses_make_one_call() {
        let fake = Fake::new(Duration::from_millis(300), vec![Ok(3600)]);
        let c = cache(fake.clone(), 300);
        let id = ident();
        let waits: Vec<_> = (0..50)
            .map(|_| {
                let (c, id) = (c.clone(), id.clone());
                tokio::spawn(async move { c.get(&id, &res()).await })
            })
            .collect();
        for w in waits {
            let (t, _) = w.await.expect("join").expect("token");
            assert_eq!(t.secret(), "token-0");
        }
        assert_eq!(fake.calls(), 1);
        let (_, hit) = c.get(&id, &res()).await.expect("token");
        assert!(hit, "a warm key is a cache hit");
        assert_eq!(fake.calls(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn refreshes_in_the_background_and_serves_meanwhile() {
        let fake = Fake::new(Duration::from_secs(2), vec![Ok(3600)]);
        let c = cache(fake.clone(), 300);
        let id = ident();
        c.pin(&id, &res());
        let (t0, _) = c.get(&id, &res()).await.expect("token");
        assert_eq!(t0.secret(), "token-0");
        // Just after the refresh is due, the old token is still served at once while the new one is fetched.
        tokio::time::sleep_until(t0.refresh_due() + Duration::from_millis(500)).await;
        let (t, hit) = c.get(&id, &res()).await.expect("token");
        assert!(hit);
        assert_eq!(t.secret(), "token-0");
        assert_eq!(fake.calls(), 2);
        tokio::time::sleep(Duration::from_secs(3)).await;
        let (t, hit) = c.get(&id, &res()).await.expect("token");
        assert!(hit);
        assert_eq!(t.secret(), "token-1");
        assert!(c.pinned()[0].ready);
    }

    #[tokio::test(start_paused = true)]
    async fn keeps_serving_through_an_outage_until_the_floor_then_503_then_recovers() {
        // 600 s tokens, 300 s floor: refresh at ~270 s; the IdP then fails for a long while.
        let mut answers = vec![Ok(600)];
        answers.extend(std::iter::repeat_n(Err(unavailable()), 40));
        answers.push(Ok(600));
        let fake = Fake::new(Duration::from_millis(10), answers);
        let c = cache(fake.clone(), 300);
        let id = ident();
        c.pin(&id, &res()); // configured resource: refreshed however long nobody asks
        let (t0, _) = c.get(&id, &res()).await.expect("token");
        tokio::time::sleep(Duration::from_secs(290)).await;
        let (t, hit) = c.get(&id, &res()).await.expect("still served above the floor");
        assert!(hit && t.secret() == "token-0");
        tokio::time::sleep_until(t0.refresh_due() + Duration::from_secs(40)).await;
        // Past the floor (300 s left at 300 s): 503 with the time of the next attempt, answered at once.
        tokio::time::sleep(Duration::from_secs(10)).await;
        let started = Instant::now();
        match c.get(&id, &res()).await {
            Err(TokenError::Unavailable { retry_after, .. }) => {
                assert!(retry_after <= Duration::from_secs(30), "{retry_after:?}")
            }
            other => panic!("expected Unavailable, got {other:?}"),
        }
        assert!(started.elapsed() <= Duration::from_secs(8));
        let calls_during_outage = fake.calls();
        // 40 failures with delays ≤ 30 s: recovered within 40 × 30 s, and never a hot loop.
        tokio::time::sleep(Duration::from_secs(1300)).await;
        let (t, _) = c.get(&id, &res()).await.expect("recovered");
        assert_eq!(t.secret(), format!("token-{}", fake.calls() - 1));
        assert!(calls_during_outage < 40, "no hot loop: {calls_during_outage} calls");
    }

    #[tokio::test(start_paused = true)]
    async fn credential_rejection_is_remembered_across_resources() {
        let rejected = IdpError::CredentialRejected { status: 401, error: "invalid_client".into() };
        let fake = Fake::new(Duration::from_millis(10), vec![Err(rejected)]);
        let c = cache(fake.clone(), 300);
        let id = ident();
        for i in 0..20 {
            let r = Resource::parse(&format!("https://r{}.example", i % 4)).expect("valid");
            match c.get(&id, &r).await {
                Err(TokenError::CredentialRejected { error, .. }) => assert_eq!(error, "invalid_client"),
                other => panic!("expected CredentialRejected, got {other:?}"),
            }
        }
        assert_eq!(fake.calls(), 1, "one upstream call however many callers and resources");
    }

    #[tokio::test(start_paused = true)]
    async fn too_short_lived_tokens_are_a_clear_error() {
        let fake = Fake::new(Duration::from_millis(10), vec![Ok(200)]);
        let c = cache(fake.clone(), 300);
        match c.get(&ident(), &res()).await {
            Err(TokenError::Failed { cause, .. }) => assert!(cause.contains("tokens.min_lifetime"), "{cause}"),
            other => panic!("expected Failed, got {other:?}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn short_tokens_below_twice_the_floor_are_served_and_refreshed_before_the_floor() {
        // 20 s tokens, 15 s floor: servable for 5 s each, refreshed at ~4.5 s; callers always served.
        let fake = Fake::new(Duration::from_millis(50), vec![Ok(20)]);
        let c = cache(fake.clone(), 15);
        let id = ident();
        c.pin(&id, &res());
        c.get(&id, &res()).await.expect("token");
        for _ in 0..60 {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let (t, hit) = c.get(&id, &res()).await.expect("always served");
            assert!(hit);
            assert!(t.remaining(Instant::now()) > Duration::from_secs(15));
        }
        let calls = fake.calls();
        assert!((6..=9).contains(&calls), "about one call per 4–5 s over 30 s: {calls}");
    }

    #[tokio::test(start_paused = true)]
    async fn idle_on_demand_entries_are_dropped_and_pinned_ones_kept() {
        let fake = Fake::new(Duration::from_millis(10), vec![Ok(3600)]);
        let c = cache(fake.clone(), 300);
        let id = ident();
        c.pin(&id, &res());
        c.get(&id, &Resource::parse("https://on-demand.example").expect("valid")).await.expect("token");
        assert_eq!(c.len(), 2);
        tokio::time::sleep(Duration::from_secs(601)).await;
        tokio::task::yield_now().await;
        assert_eq!(c.len(), 1, "the idle on-demand entry is gone");
        c.get(&id, &Resource::parse("https://on-demand.example").expect("valid")).await.expect("fetched again");
    }

    #[tokio::test(start_paused = true)]
    async fn a_hanging_idp_answers_callers_within_max_wait() {
        let fake = Fake::new(Duration::from_secs(3600), vec![Ok(3600)]);
        let c = cache(fake.clone(), 300);
        let started = Instant::now();
        match c.get(&ident(), &res()).await {
            Err(TokenError::Unavailable { retry_after, .. }) => assert!(retry_after >= Duration::from_secs(1)),
            other => panic!("expected Unavailable, got {other:?}"),
        }
        assert_eq!(started.elapsed(), Duration::from_secs(8));
    }

    /// Panics on its first call, then behaves.
    struct Panicky(AtomicUsize);

    impl TokenSource for Panicky {
        fn fetch<'a>(&'a self, _: &'a Identity, _: &'a Resource) -> BoxFuture<'a, Result<IssuedToken, IdpError>> {
            Box::pin(async move {
                if self.0.fetch_add(1, Ordering::SeqCst) == 0 {
                    panic!("simulated bug in the IdP client");
                }
                Ok(IssuedToken {
                    access_token: "after-panic".to_owned().into(),
                    expires_in: Duration::from_secs(3600),
                    ext_expires_in: None,
                    refresh_in: None,
                    requested_at: SystemTime::now(),
                })
            })
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_panic_in_an_attempt_does_not_kill_the_refresher() {
        let policy = TokensConfig { max_wait: Duration::from_secs(8), ..TokensConfig::default() };
        let c = TokenCache::new(
            Arc::new(Panicky(AtomicUsize::new(0))),
            policy,
            TaskTracker::new(),
            CancellationToken::new(),
        );
        let (t, _) = c.get(&ident(), &res()).await.expect("the retry after the panic succeeds within max_wait");
        assert_eq!(t.secret(), "after-panic");
    }

    #[tokio::test(start_paused = true)]
    async fn bad_resource_is_the_callers_error() {
        let fake = Fake::new(
            Duration::from_millis(10),
            vec![Err(IdpError::BadResource { status: 400, error: "invalid_target".into() })],
        );
        let c = cache(fake.clone(), 300);
        for _ in 0..5 {
            assert!(matches!(c.get(&ident(), &res()).await, Err(TokenError::BadResource { .. })));
        }
        assert_eq!(fake.calls(), 1);
    }
}
