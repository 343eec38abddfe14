//! The client credential an identity authenticates with. `Debug` never shows a secret or a key.
//!
//! - **Secret**: `client_secret=`.
//! - **Certificate** ([`certificate`]): a client assertion (RFC 7523) signed with the certificate's key
//!   on every request.
//! - **Federated**: the content of a file (e.g. a Kubernetes projected service-account token) is the
//!   assertion. It rotates, so it is read on every request; a cached copy would go stale or be
//!   rejected as a replay.
//!
//! [`spec`] separates what the configuration says (pure) from loading it (files, PEM/PKCS#12, test-signing).

mod certificate;
mod pkcs11;
mod spec;

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use secrecy::zeroize::Zeroizing;
use secrecy::{ExposeSecret, SecretString};

pub(crate) use certificate::{AssertionAlg, Certificate, CertificateError, SignError};
pub(crate) use pkcs11::{KeyUri, TokenError};
pub(crate) use spec::{CredentialSpec, FileSpec, LoadError, SecretSpec, TokenKeySpec};

use crate::secret::{SecretFileError, read_secret_file};

/// The assertion grant type.
pub(crate) const ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// Why a credential cannot be loaded or used. Never carries secret material.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CredentialError {
    /// A secret, password or federated token file is unreadable or empty.
    #[error(transparent)]
    File(#[from] SecretFileError),
    /// A certificate file is unreadable.
    #[error("cannot read {}: {source}", path.display())]
    ReadCertificate {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A certificate file that is not a usable certificate and key.
    #[error("{}: {source}", path.display())]
    Certificate {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: CertificateError,
    },
    /// The key on a PKCS#11 token cannot be used (the message names the call and its `CKR_` code).
    #[error("PKCS#11 key {uri}: {source}")]
    TokenKey {
        /// The key's URI (it holds no PIN).
        uri: String,
        /// Why.
        #[source]
        source: TokenError,
    },
    /// Signing a client assertion failed.
    #[error("cannot sign a client assertion: {0}")]
    Assertion(#[source] SignError),
}

/// How an identity proves itself to the IdP.
#[derive(Clone)]
pub(crate) enum ClientCredential {
    /// A client secret.
    Secret {
        /// The secret; zeroized on drop, redacted in `Debug`.
        secret: SecretString,
        /// Where it came from, for messages: a file path or an environment variable name.
        origin: String,
    },
    /// A certificate with its private key.
    Certificate {
        /// The loaded certificate.
        cert: Arc<Certificate>,
        /// Where it came from.
        origin: String,
    },
    /// A federated token file (workload identity).
    Federated {
        /// The file, read on every request.
        path: PathBuf,
        /// Where the setting came from.
        origin: String,
    },
}

impl ClientCredential {
    /// A short name of the credential kind, for `tokend check` and logs.
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            Self::Secret { .. } => "client secret",
            Self::Certificate { .. } => "certificate",
            Self::Federated { .. } => "federated token",
        }
    }

    /// Where the credential came from (never the credential itself).
    pub(crate) fn origin(&self) -> &str {
        match self {
            Self::Secret { origin, .. } | Self::Certificate { origin, .. } | Self::Federated { origin, .. } => origin,
        }
    }

    /// Where a certificate's private key lives, when that is on a PKCS#11 token: token, object and
    /// whether the token keeps it (sensitive, not extractable), for `tokend check`.
    pub(crate) fn key_location(&self) -> Option<String> {
        let Self::Certificate { cert, .. } = self else { return None };
        let key = cert.token_key()?;
        let f = key.facts();
        Some(format!(
            "private key {:?} (id {}) on PKCS#11 token {:?} ({}, serial {}), module {}: {}, {}{}",
            f.label,
            if f.id.is_empty() { "none" } else { &f.id },
            f.token,
            f.model,
            f.serial,
            key.uri().module.display(),
            if f.sensitive { "sensitive" } else { "NOT sensitive" },
            if f.extractable { "EXTRACTABLE" } else { "not extractable" },
            if f.never_extractable { " (never was)" } else { "" },
        ))
    }

    /// When the credential stops working, if it says (a certificate's `notAfter`).
    pub(crate) fn expires(&self) -> Option<std::time::SystemTime> {
        match self {
            Self::Certificate { cert, .. } => Some(cert.not_after()),
            Self::Secret { .. } | Self::Federated { .. } => None,
        }
    }

    /// Identifies the credential without revealing it (a SHA-256 prefix of a secret, a certificate's
    /// thumbprint and algorithm, a federated file's path): equal fingerprints, same credential.
    pub(crate) fn fingerprint(&self) -> String {
        match self {
            Self::Secret { secret, .. } => crate::secret::fingerprint(secret.expose_secret().as_bytes()),
            Self::Certificate { cert, .. } => cert.fingerprint(),
            Self::Federated { path, .. } => path.display().to_string(),
        }
    }

    /// The form parameters that authenticate one token request to `token_url` as `client_id`.
    /// Certificates mint a fresh assertion; federated credentials read their file now.
    pub(crate) fn form_params(
        &self,
        client_id: &str,
        token_url: &str,
    ) -> Result<Vec<(&'static str, Zeroizing<String>)>, CredentialError> {
        let plain = |s: &str| Zeroizing::new(s.to_owned());
        match self {
            Self::Secret { secret, .. } => Ok(vec![("client_secret", plain(secret.expose_secret()))]),
            Self::Certificate { cert, .. } => Ok(vec![
                ("client_assertion_type", plain(ASSERTION_TYPE)),
                (
                    "client_assertion",
                    Zeroizing::new(cert.assertion(client_id, token_url).map_err(CredentialError::Assertion)?),
                ),
            ]),
            Self::Federated { path, .. } => {
                let token = read_secret_file(path)?;
                Ok(vec![
                    ("client_assertion_type", plain(ASSERTION_TYPE)),
                    ("client_assertion", plain(token.expose_secret())),
                ])
            }
        }
    }
}

impl fmt::Debug for ClientCredential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Secret { origin, .. } => {
                f.debug_struct("Secret").field("secret", &"[redacted]").field("origin", origin).finish()
            }
            Self::Certificate { cert, origin } => {
                f.debug_struct("Certificate").field("cert", cert).field("origin", origin).finish()
            }
            Self::Federated { path, origin } => {
                f.debug_struct("Federated").field("path", path).field("origin", origin).finish()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_is_redacted() {
        let c = ClientCredential::Secret { secret: "hunter2-very-secret".into(), origin: "file /x".into() };
        let dbg = format!("{c:?} {c:#?}");
        assert!(!dbg.contains("hunter2"), "{dbg}");
        assert!(dbg.contains("[redacted]"));
    }

    #[test]
    fn federated_file_is_read_on_every_request() {
        let d = tempfile::tempdir().expect("tempdir");
        let path = d.path().join("token");
        let c = ClientCredential::Federated { path: path.clone(), origin: "test".into() };
        let e = c.form_params("cid", "https://x/token").expect_err("missing");
        assert!(e.to_string().contains("cannot read") && e.to_string().contains("token"), "{e}");
        std::fs::write(&path, "first\n").expect("write");
        assert_eq!(c.form_params("cid", "https://x/token").expect("params")[1].1.as_str(), "first");
        std::fs::write(&path, "second").expect("write");
        assert_eq!(c.form_params("cid", "https://x/token").expect("params")[1].1.as_str(), "second");
        std::fs::write(&path, "  \n").expect("write");
        assert!(c.form_params("cid", "https://x/token").expect_err("empty").to_string().contains("empty"));
    }
}
