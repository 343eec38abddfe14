//! The cache's contract with where tokens come from: [`TokenSource`] (the IdP client in production, a
//! scripted fake in tests), what it returns ([`IssuedToken`]) and how it fails ([`FetchError`], with the
//! [`FailureClass`] that decides the refresher's backoff).

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, SystemTime};

use secrecy::SecretString;

use crate::identity::Identity;
use crate::resource::Resource;

/// A boxed future, so that [`TokenSource`] is object-safe.
pub(crate) type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Where tokens come from.
pub(crate) trait TokenSource: Send + Sync + 'static {
    /// One upstream request for `resource` as `identity`; retrying is the caller's business.
    fn fetch<'a>(
        &'a self,
        identity: &'a Identity,
        resource: &'a Resource,
    ) -> BoxFuture<'a, Result<IssuedToken, FetchError>>;
}

/// A token as the IdP issued it.
pub(crate) struct IssuedToken {
    /// The bearer token.
    pub(crate) access_token: SecretString,
    /// Lifetime from the moment the request was sent.
    pub(crate) expires_in: Duration,
    /// `ext_expires_in` when sent.
    pub(crate) ext_expires_in: Option<Duration>,
    /// `refresh_in` when sent (Entra's hint for proactive refresh).
    pub(crate) refresh_in: Option<Duration>,
    /// Wall-clock time the request was sent (the conservative issuance time).
    pub(crate) requested_at: SystemTime,
}

impl fmt::Debug for IssuedToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IssuedToken")
            .field("access_token", &"[redacted]")
            .field("expires_in", &self.expires_in)
            .field("ext_expires_in", &self.ext_expires_in)
            .field("refresh_in", &self.refresh_in)
            .finish()
    }
}

/// What the refresher does about a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FailureClass {
    /// The credential (or client/tenant) is wrong: no retry loop; remembered for a while.
    Credential,
    /// The resource is unknown or not allowed: the caller's error (400).
    Resource,
    /// Anything else the IdP refused: retried slowly.
    Rejected,
    /// 429, 5xx, transport, malformed answers: retried with exponential backoff.
    Transient,
}

/// A failed token request. Never carries a secret, a token or a response body.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum FetchError {
    /// `invalid_client` / `unauthorized_client`: the IdP rejected the credential.
    #[error("the identity provider rejected the credential ({error}, HTTP {status})")]
    CredentialRejected {
        /// HTTP status.
        status: u16,
        /// OAuth error code.
        error: String,
    },
    /// `invalid_scope` / `invalid_target` / `invalid_resource`.
    #[error("the identity provider rejected the resource ({error}, HTTP {status})")]
    BadResource {
        /// HTTP status.
        status: u16,
        /// OAuth error code.
        error: String,
    },
    /// Another 4xx.
    #[error("the identity provider refused the request ({error}, HTTP {status})")]
    Rejected {
        /// HTTP status.
        status: u16,
        /// OAuth error code, or `-` when the body had none.
        error: String,
    },
    /// 429.
    #[error("the identity provider is throttling requests (HTTP 429)")]
    Throttled {
        /// `Retry-After`, when sent.
        retry_after: Option<Duration>,
    },
    /// A 5xx from the IdP.
    #[error("the identity provider failed (HTTP {status})")]
    ServerError {
        /// HTTP status.
        status: u16,
        /// `Retry-After`, when sent.
        retry_after: Option<Duration>,
    },
    /// Connect failure, reset, TLS failure or timeout.
    #[error("cannot reach the identity provider at {host}: {detail}")]
    Transport {
        /// `host:port` of the token URL.
        host: String,
        /// The error chain.
        detail: String,
    },
    /// The local credential could not be used for a request (e.g. the federated token file is
    /// unreadable); nothing was sent.
    #[error("the credential cannot be used: {detail}")]
    CredentialUnusable {
        /// What failed.
        detail: String,
    },
    /// A 2xx answer that is not a token response (e.g. an HTML proxy page).
    #[error("the identity provider's answer is not a token response: {detail}")]
    Malformed {
        /// What was wrong (never the body itself).
        detail: String,
    },
}

impl FetchError {
    /// How the refresher should treat this failure.
    pub(crate) fn class(&self) -> FailureClass {
        match self {
            Self::CredentialRejected { .. } => FailureClass::Credential,
            Self::BadResource { .. } => FailureClass::Resource,
            Self::Rejected { .. } => FailureClass::Rejected,
            // A federated token file being rotated may be missing for a moment: retry soon.
            Self::Throttled { .. }
            | Self::ServerError { .. }
            | Self::Transport { .. }
            | Self::Malformed { .. }
            | Self::CredentialUnusable { .. } => FailureClass::Transient,
        }
    }

    /// The IdP's `Retry-After`, if it sent one.
    pub(crate) fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Throttled { retry_after } | Self::ServerError { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

impl FetchError {
    /// A few words for status lines and metrics labels: `IdP: HTTP 503`, `IdP: invalid_client`,
    /// `IdP unreachable`.
    pub(crate) fn short(&self) -> String {
        match self {
            Self::CredentialRejected { error, .. } | Self::BadResource { error, .. } | Self::Rejected { error, .. } => {
                format!("IdP: {error}")
            }
            Self::Throttled { .. } => "IdP: HTTP 429".to_owned(),
            Self::ServerError { status, .. } => format!("IdP: HTTP {status}"),
            Self::Transport { .. } => "IdP unreachable".to_owned(),
            Self::CredentialUnusable { .. } => "credential unusable".to_owned(),
            Self::Malformed { .. } => "IdP: malformed answer".to_owned(),
        }
    }
}
