//! The refresher: one task per cache entry that keeps its token fresh, and the one place that calls
//! the [`TokenSource`]. It sleeps until the refresh is due, the retry time arrives, the entry goes
//! idle or a caller wakes it; each attempt runs in its own tracked task, so a panic is one failed
//! attempt. Every decision reads the live snapshot: the identity (by name), the policy, whether the
//! entry is configured.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::sync::watch;
use tokio::time::Instant;

use super::{Entry, Inner, Key, Rejection, Slot};
use crate::identity::Identity;
use crate::resource::Resource;
use crate::token::refresh::{RetryDelays, TooShortLived, refresh_after};
use crate::token::{AccessToken, FailureClass, FetchError, TokenError};

/// Why the last attempt failed and when the next one is due.
#[derive(Debug, Clone)]
pub(super) struct Failure {
    cause: Cause,
    pub(super) retry_at: Instant,
}

#[derive(Debug, Clone)]
enum Cause {
    Fetch(FetchError),
    TooShortLived(TooShortLived),
    Panicked,
}

impl Cause {
    /// How the refresher treats it: the one mapping, used for backoff and for callers.
    fn class(&self) -> FailureClass {
        match self {
            Self::Fetch(e) => e.class(),
            Self::TooShortLived(_) => FailureClass::Rejected,
            Self::Panicked => FailureClass::Transient,
        }
    }
}

impl Failure {
    pub(super) fn class(&self) -> FailureClass {
        self.cause.class()
    }

    /// A few words for status lines (`IdP: HTTP 503`).
    pub(super) fn short(&self) -> String {
        match &self.cause {
            Cause::Fetch(e) => e.short(),
            Cause::TooShortLived(_) => "tokens too short-lived".to_owned(),
            Cause::Panicked => "internal error".to_owned(),
        }
    }

    fn describe(&self) -> String {
        match &self.cause {
            Cause::Fetch(e) => e.to_string(),
            Cause::TooShortLived(e) => e.to_string(),
            Cause::Panicked => "internal error while requesting a token (see log)".to_owned(),
        }
    }

    /// What a caller of `identity` asking for `resource` is told.
    pub(super) fn to_error(&self, identity: &Identity, resource: &Resource, now: Instant) -> TokenError {
        match (&self.cause, self.class()) {
            (Cause::Fetch(FetchError::CredentialRejected { error, .. }), _) => TokenError::CredentialRejected {
                identity: identity.name.clone(),
                client_id: identity.client_id.clone(),
                error: error.clone(),
            },
            (Cause::Fetch(FetchError::BadResource { error, .. }), _) => {
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

/// What woke the refresher up.
enum Wake {
    Cancelled,
    Timer,
    Caller,
}

pub(super) async fn refresher(inner: Arc<Inner>, key: Key, entry: Arc<Entry>, tx: watch::Sender<Slot>) {
    /// Marks the entry's refresher dead when this task ends, however it ends.
    struct Alive(Arc<Entry>);
    impl Drop for Alive {
        fn drop(&mut self) {
            self.0.alive.store(false, Ordering::SeqCst);
        }
    }
    let _alive = Alive(entry.clone());
    let mut delays = RetryDelays::new();
    loop {
        let snapshot = inner.live.load();
        let min = snapshot.tokens.min_lifetime;
        if entry.reset.swap(false, Ordering::SeqCst) {
            // The credential changed: forget the backoff and the failure, try again now.
            delays = RetryDelays::new();
            tx.send_modify(|s| s.failure = None);
        }
        let now = Instant::now();
        let exists = snapshot.identities.by_name(&key.identity).is_some();
        let pinned = snapshot.is_pinned(&key.identity, &key.resource);
        let idle_at = (!pinned).then(|| entry.last_used() + snapshot.tokens.idle_timeout);
        drop(snapshot);
        if !exists || idle_at.is_some_and(|t| now >= t) {
            let mut map = inner.entries.write();
            if map.get(&key).is_some_and(|e| Arc::ptr_eq(&e, &entry)) {
                map.remove(&key);
                inner.forget(&entry);
            }
            tracing::debug!(identity = %key.identity, resource = %key.resource, "dropped idle or removed resource");
            return; // dropping `tx` closes the channel for any straggler
        }
        let (due, servable, retry_at) = {
            let slot = tx.borrow();
            let servable = slot.token.as_ref().is_some_and(|t| t.remaining(now) > min);
            match (&slot.failure, &slot.token) {
                (Some(f), _) => (f.retry_at, servable, Some(f.retry_at)),
                (None, Some(t)) => (t.refresh_due(), servable, None),
                (None, None) => (now, false, None),
            }
        };
        // A failed on-demand entry that nobody is waiting on is not retried: it waits for a caller (after
        // its backoff) or idles out. Configured entries, and entries callers wait on, retry on schedule.
        let waiting = tx.receiver_count() > 1; // the entry's own receiver plus one per waiting caller
        let parked = !pinned && retry_at.is_some() && !servable && !waiting;
        let due = match (parked, idle_at) {
            (true, Some(idle)) => idle,
            _ => due,
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
                // Asked again once the backoff is over: retry now.
                Wake::Caller if parked && retry_at.is_some_and(|r| Instant::now() >= r) => {}
                // A caller found nothing servable. Fetch now unless we are backing off after a failure
                // (callers must not be able to hammer the IdP through us) or a servable token appeared.
                Wake::Caller if servable || tx.borrow().failure.is_some() => continue,
                Wake::Caller => {}
            }
        }
        // Resolved right before the attempt, from the snapshot current now: never a superseded credential.
        let Some(identity) = inner.live.load().identities.by_name(&key.identity).cloned() else {
            continue; // removed by a reload meanwhile: dropped at the top
        };
        let failure = match rejected_credential(&inner, &identity, Instant::now()) {
            Some(f) => f,
            None => match attempt(&inner, &entry, &key, &identity).await {
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
                    super::publish(&entry, &tx, token);
                    continue;
                }
                Some(Err(cause)) => {
                    let class = cause.class();
                    let retry_after = match &cause {
                        Cause::Fetch(e) => e.retry_after(),
                        _ => None,
                    };
                    let delay = delays.next(class, retry_after);
                    let failure = Arc::new(Failure { cause, retry_at: Instant::now() + delay });
                    crate::metrics::get().refresh_failed(&key.identity);
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
                        let rejection = Rejection { identity: identity.clone(), failure: failure.clone() };
                        inner.rejected.lock().insert(key.identity.clone(), rejection);
                    }
                    failure
                }
            },
        };
        tx.send_modify(|s| s.failure = Some(failure));
    }
}

/// The identity-wide credential rejection, while it lasts and while the identity still has the
/// credential that was rejected.
fn rejected_credential(inner: &Inner, identity: &Identity, now: Instant) -> Option<Arc<Failure>> {
    let map = inner.rejected.lock();
    map.get(&identity.name)
        .filter(|r| r.failure.retry_at > now && r.identity.same_upstream(identity))
        .map(|r| r.failure.clone())
}

/// One upstream attempt in its own task (a panic there cannot kill the refresher). `None` when cancelled.
async fn attempt(
    inner: &Arc<Inner>,
    entry: &Arc<Entry>,
    key: &Key,
    identity: &Arc<Identity>,
) -> Option<Result<AccessToken, Cause>> {
    let (source, identity, resource) = (inner.source.clone(), identity.clone(), key.resource.clone());
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
            let min_lifetime = inner.live.load().tokens.min_lifetime;
            match refresh_after(lifetime, issued.refresh_in, min_lifetime, fastrand::f64()) {
                Ok(after) => Ok(AccessToken::new(issued, requested, after)),
                Err(e) => Err(Cause::TooShortLived(e)),
            }
        }
        Ok(Err(e)) => Err(Cause::Fetch(e)),
        Err(join) => {
            tracing::error!(identity = %key.identity, resource = %key.resource, panicked = join.is_panic(), "token request task failed");
            Err(Cause::Panicked)
        }
    })
}
