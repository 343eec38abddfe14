//! Access tokens, the single-flight cache and the background refresher.
//!
//! - [`AccessToken`]: a cached token; `Debug` never shows it, logs use [`AccessToken::fingerprint`].
//! - [`source`]: the contract with where tokens come from ([`TokenSource`]); `idp` implements it.
//! - [`refresh`]: the pure refresh policy and retry delays.
//! - [`cache`]: [`TokenCache`], one refresher task per (identity, resource).

mod cache;
mod refresh;
mod source;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use tokio::time::Instant;

pub(crate) use cache::{PinnedState, TokenCache};
pub(crate) use source::{BoxFuture, FailureClass, FetchError, IssuedToken, TokenSource};

use crate::clock::unix_secs;
use crate::secret::fingerprint;

/// A cached bearer token with its expiry on both clocks: monotonic for decisions, wall for the wire.
pub(crate) struct AccessToken {
    expires_on: u64,
    ext_expires_on: u64,
    not_before: u64,
    expires_at: Instant,
    refresh_due: Instant,
    fingerprint: String,
    /// The token, kept as a JSON string (quoted and escaped): rendered once, for every answer that
    /// carries it.
    json: SecretString,
}

impl AccessToken {
    /// Builds a cache entry from what the IdP issued; `requested` is when the request was sent and
    /// `refresh_after` comes from [`refresh::refresh_after`].
    pub(crate) fn new(issued: IssuedToken, requested: Instant, refresh_after: Duration) -> Self {
        let base = unix_secs(issued.requested_at);
        let lifetime = issued.expires_in.as_secs();
        let fingerprint = fingerprint(issued.access_token.expose_secret().as_bytes());
        let json = json_string(issued.access_token.expose_secret());
        Self {
            expires_on: base + lifetime,
            ext_expires_on: base + issued.ext_expires_in.map_or(lifetime, |d| d.as_secs()),
            not_before: base,
            expires_at: requested + issued.expires_in,
            refresh_due: requested + refresh_after,
            fingerprint,
            json,
        }
    }

    /// The bearer token itself (decoded from its JSON form).
    #[cfg(test)]
    pub(crate) fn secret(&self) -> String {
        serde_json::from_str(self.json.expose_secret()).expect("a JSON string")
    }

    /// The token as a JSON string: quoted and escaped.
    pub(crate) fn json_string(&self) -> &str {
        self.json.expose_secret()
    }

    /// Expiry, seconds since the Unix epoch.
    pub(crate) fn expires_on(&self) -> u64 {
        self.expires_on
    }

    /// Extended expiry, seconds since the Unix epoch.
    pub(crate) fn ext_expires_on(&self) -> u64 {
        self.ext_expires_on
    }

    /// Issuance time, seconds since the Unix epoch.
    pub(crate) fn not_before(&self) -> u64 {
        self.not_before
    }

    /// Time left before expiry.
    pub(crate) fn remaining(&self, now: Instant) -> Duration {
        self.expires_at.saturating_duration_since(now)
    }

    /// When the refresher replaces it.
    pub(crate) fn refresh_due(&self) -> Instant {
        self.refresh_due
    }

    /// A short SHA-256 prefix that identifies the token in logs.
    pub(crate) fn fingerprint(&self) -> &str {
        &self.fingerprint
    }
}

/// `secret` as a JSON string, in a buffer of exactly its size (measured first), so that neither growing
/// nor shrinking it leaves an unwiped copy behind.
fn json_string(secret: &str) -> SecretString {
    /// Counts what would be written.
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    // Serialising a `&str` cannot fail, and neither can writing to these.
    let _ = serde_json::to_writer(&mut count, secret);
    let mut out = Vec::with_capacity(count.0);
    let _ = serde_json::to_writer(&mut out, secret);
    debug_assert_eq!(out.len(), out.capacity());
    String::from_utf8(out).unwrap_or_default().into()
}

impl fmt::Debug for AccessToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AccessToken")
            .field("fingerprint", &self.fingerprint)
            .field("expires_on", &self.expires_on)
            .finish_non_exhaustive()
    }
}

/// A token handed to a caller.
#[derive(Debug)]
pub(crate) struct Served {
    /// The token.
    pub(crate) token: HeldToken,
    /// Whether it was cached when the caller asked (the caller did not wait).
    pub(crate) cache_hit: bool,
}

/// A served token, held for one request. A cache hit takes it without writing its reference count
/// (an `arc_swap` guard): every core serves the same few tokens, and a count each of them writes would
/// bounce between them on every request.
pub(crate) struct HeldToken(arc_swap::Guard<Option<Arc<AccessToken>>>);

impl HeldToken {
    /// Holds what an `ArcSwapOption` had, if it had a token.
    pub(crate) fn loaded(held: arc_swap::Guard<Option<Arc<AccessToken>>>) -> Option<Self> {
        held.is_some().then_some(Self(held))
    }

    /// Holds a token taken elsewhere.
    pub(crate) fn owned(token: Arc<AccessToken>) -> Self {
        Self(arc_swap::Guard::from_inner(Some(token)))
    }

    /// The token, with a reference of its own.
    #[cfg(test)]
    pub(crate) fn into_arc(self) -> Arc<AccessToken> {
        arc_swap::Guard::into_inner(self.0).expect("a HeldToken is made only from a token")
    }
}

impl std::ops::Deref for HeldToken {
    type Target = AccessToken;

    fn deref(&self) -> &AccessToken {
        self.0.as_deref().expect("a HeldToken is made only from a token")
    }
}

impl fmt::Debug for HeldToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&**self, f)
    }
}

/// Why a caller gets no token. The dialects map these to status codes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum TokenError {
    /// Nothing valid is cached and the IdP cannot be reached (or is throttling) right now: 503.
    #[error("no valid token for identity {identity:?} is cached and the identity provider is unavailable: {cause}")]
    Unavailable {
        /// Identity name.
        identity: String,
        /// The last failure, or that the first request is still in flight.
        cause: String,
        /// When the next attempt is due.
        retry_after: Duration,
    },
    /// The IdP rejected the identity's credential: a server-side misconfiguration (5xx).
    #[error(
        "the identity provider answered {error} for identity {identity:?}: its credential (client id {client_id}) was rejected"
    )]
    CredentialRejected {
        /// Identity name.
        identity: String,
        /// Its client id.
        client_id: String,
        /// The OAuth error code.
        error: String,
    },
    /// The IdP does not know or allow the resource: the caller's error (400).
    #[error("the identity provider answered {error} for resource {resource:?}")]
    BadResource {
        /// The resource.
        resource: String,
        /// The OAuth error code.
        error: String,
    },
    /// The caller (or all callers together) already has as many on-demand resources cached as
    /// `[tokens]` allows: 429, so that no caller can make tokend do unbounded work upstream.
    #[error(
        "{who} already {have} {limit} on-demand resources cached (tokens.{key}); a new one can be fetched when one idles out"
    )]
    TooManyResources {
        /// `"this caller"` or `"all callers together"`.
        who: &'static str,
        /// `"has"` or `"have"`.
        have: &'static str,
        /// The limit.
        limit: usize,
        /// The setting.
        key: &'static str,
        /// When to try again.
        retry_after: Duration,
    },
    /// The caller adds new on-demand resources faster than `tokens.on_demand_rate` allows: 429.
    #[error(
        "this caller is adding new on-demand resources faster than tokens.on_demand_rate ({rate}) allows; \
         resources it already has are still served"
    )]
    AddingTooFast {
        /// The rate, as configured.
        rate: String,
        /// When the next one may be added.
        retry_after: Duration,
    },
    /// Any other failure that will not go away by retrying soon (5xx).
    #[error("identity {identity:?}: {cause}")]
    Failed {
        /// Identity name.
        identity: String,
        /// What failed.
        cause: String,
    },
}
