//! The client credential an identity authenticates with. `Debug` never shows the secret.

use std::fmt;

use secrecy::{ExposeSecret, SecretString};

/// How an identity proves itself to the IdP. Certificates and federated tokens come in a later change.
#[derive(Clone)]
pub enum ClientCredential {
    /// A client secret (`client_secret=` in the token request).
    Secret {
        /// The secret; zeroized on drop, redacted in `Debug`.
        secret: SecretString,
        /// Where it came from, for messages: a file path or an environment variable name.
        origin: String,
    },
}

impl ClientCredential {
    /// A short name of the credential kind, for `tokend check` and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Secret { .. } => "client secret",
        }
    }

    /// Where the credential came from (never the credential itself).
    pub fn origin(&self) -> &str {
        match self {
            Self::Secret { origin, .. } => origin,
        }
    }

    /// The form parameters that authenticate a token request.
    pub(crate) fn form_params(&self) -> Vec<(&'static str, String)> {
        match self {
            Self::Secret { secret, .. } => vec![("client_secret", secret.expose_secret().to_owned())],
        }
    }
}

impl fmt::Debug for ClientCredential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Secret { origin, .. } => {
                f.debug_struct("Secret").field("secret", &"[redacted]").field("origin", origin).finish()
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
}
