//! Access tokens, the single-flight cache and the background refresher.
//!
//! - [`AccessToken`]: a cached token; `Debug` never shows it, logs use [`AccessToken::fingerprint`].
//! - [`refresh`]: the pure refresh policy and retry delays.
//! - [`cache`]: [`TokenCache`], one refresher task per (identity, resource).

pub mod cache;
pub mod refresh;

use std::fmt;
use std::time::{Duration, SystemTime};

use secrecy::{ExposeSecret, SecretString};
use tokio::time::Instant;

pub use cache::{TokenCache, TokenSource};

use crate::idp::IssuedToken;

/// A cached bearer token with its expiry on both clocks: monotonic for decisions, wall for the wire.
pub struct AccessToken {
    secret: SecretString,
    expires_on: u64,
    ext_expires_on: u64,
    not_before: u64,
    expires_at: Instant,
    refresh_due: Instant,
    fingerprint: String,
}

impl AccessToken {
    /// Builds a cache entry from what the IdP issued; `requested` is when the request was sent and
    /// `refresh_after` comes from [`refresh::refresh_after`].
    pub fn new(issued: IssuedToken, requested: Instant, refresh_after: Duration) -> Self {
        let base = unix_secs(issued.requested_at);
        let lifetime = issued.expires_in.as_secs();
        let fingerprint = fingerprint(issued.access_token.expose_secret());
        Self {
            expires_on: base + lifetime,
            ext_expires_on: base + issued.ext_expires_in.map_or(lifetime, |d| d.as_secs()),
            not_before: base,
            expires_at: requested + issued.expires_in,
            refresh_due: requested + refresh_after,
            fingerprint,
            secret: issued.access_token,
        }
    }

    /// The bearer token itself. Only the dialect responses call this.
    pub fn secret(&self) -> &str {
        self.secret.expose_secret()
    }

    /// Expiry, seconds since the Unix epoch.
    pub fn expires_on(&self) -> u64 {
        self.expires_on
    }

    /// Extended expiry, seconds since the Unix epoch.
    pub fn ext_expires_on(&self) -> u64 {
        self.ext_expires_on
    }

    /// Issuance time, seconds since the Unix epoch.
    pub fn not_before(&self) -> u64 {
        self.not_before
    }

    /// Time left before expiry.
    pub fn remaining(&self, now: Instant) -> Duration {
        self.expires_at.saturating_duration_since(now)
    }

    /// When the refresher replaces it.
    pub fn refresh_due(&self) -> Instant {
        self.refresh_due
    }

    /// A short SHA-256 prefix that identifies the token in logs.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }
}

impl fmt::Debug for AccessToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AccessToken")
            .field("fingerprint", &self.fingerprint)
            .field("expires_on", &self.expires_on)
            .finish_non_exhaustive()
    }
}

/// Seconds since the Unix epoch.
pub fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// `sha256:` + the first 12 hex digits of the token's SHA-256: enough to correlate, useless to replay.
pub fn fingerprint(token: &str) -> String {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, token.as_bytes());
    let hex: String = digest.as_ref().iter().take(6).map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

/// Why a caller gets no token. The dialects map these to status codes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
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
    /// Any other failure that will not go away by retrying soon (5xx).
    #[error("identity {identity:?}: {cause}")]
    Failed {
        /// Identity name.
        identity: String,
        /// What failed.
        cause: String,
    },
}
