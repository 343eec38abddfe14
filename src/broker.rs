//! The broker: identities, the token cache and the App Service secret, shared by every request.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::Path;
use std::sync::Arc;

use base64::Engine;
use secrecy::{ExposeSecret, SecretString};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Config, ConfigError, IdentityHeaderSource, readable_warning};
use crate::identity::{Identities, Identity, Selector, UnknownIdentity};
use crate::token::TokenSource;
use crate::token::cache::{PinnedState, TokenCache};

/// Everything a request handler needs.
#[derive(Debug)]
pub struct Broker {
    /// Replaced as a whole by a reload.
    identities: parking_lot::RwLock<Identities>,
    cache: TokenCache,
    identity_header: SecretString,
}

impl Broker {
    /// Builds the broker and starts fetching every configured resource.
    pub fn start(
        config: &Config,
        identity_header: SecretString,
        source: Arc<dyn TokenSource>,
        tracker: &TaskTracker,
        cancel: &CancellationToken,
    ) -> Arc<Self> {
        let identities = Identities::new(config.identities.clone());
        let cache = TokenCache::new(source, config.tokens, tracker.clone(), cancel.clone());
        cache.apply(&identities.iter().cloned().collect::<Vec<_>>());
        Arc::new(Self { identities: parking_lot::RwLock::new(identities), cache, identity_header })
    }

    /// The identity a caller selected, or the default one.
    pub fn select(&self, selector: Option<&Selector>) -> Result<Arc<Identity>, UnknownIdentity> {
        self.identities.read().select(selector).cloned()
    }

    /// Applies a reloaded configuration's identities and token policy, without dropping a request:
    /// requests in flight keep the identity they selected; the cache switches refreshers over.
    pub fn reload(&self, config: &Config) {
        let identities = Identities::new(config.identities.clone());
        self.cache.set_policy(config.tokens);
        self.cache.apply(&identities.iter().cloned().collect::<Vec<_>>());
        *self.identities.write() = identities;
    }

    /// The token cache.
    pub fn cache(&self) -> &TokenCache {
        &self.cache
    }

    /// Compares a presented `X-IDENTITY-HEADER` with the secret in constant time.
    pub fn identity_header_matches(&self, presented: &[u8]) -> bool {
        aws_lc_rs::constant_time::verify_slices_are_equal(presented, self.identity_header.expose_secret().as_bytes())
            .is_ok()
    }

    /// The configured resources and whether each has a servable token.
    pub fn readiness(&self) -> Vec<PinnedState> {
        self.cache.pinned()
    }
}

/// A fresh random secret: 32 bytes from the system RNG, base64url.
pub fn random_secret() -> SecretString {
    let mut bytes = [0u8; 32];
    aws_lc_rs::rand::fill(&mut bytes).expect("the system random number generator is available");
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes).into()
}

/// Reads the App Service identity header secret, creating the file (mode 0600, parent 0700) with a
/// random secret when it does not exist. Errors name `server.identity_header_file`.
pub fn load_identity_header(
    source: &IdentityHeaderSource,
    config_path: &str,
    warnings: &mut Vec<String>,
) -> Result<SecretString, ConfigError> {
    let path = match source {
        IdentityHeaderSource::Generated => return Ok(random_secret()),
        IdentityHeaderSource::File(p) => p,
    };
    let err = |message: String| ConfigError::Invalid {
        path: config_path.to_owned(),
        key: "server.identity_header_file".to_owned(),
        message,
    };
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let secret = text.trim();
            if secret.is_empty() {
                return Err(err(format!("{} is empty; delete it to have tokend create a new secret", path.display())));
            }
            // Sharing it with a group of client users (mode 0640) is intended; readable by anyone is not.
            if let Some(w) = readable_warning(path, 0o007) {
                warnings.push(w);
            }
            Ok(secret.to_owned().into())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => create_identity_header(path).map_err(|e| {
            err(format!("cannot create {}: {e}; point server.identity_header_file at a writable path", path.display()))
        }),
        Err(e) => Err(err(format!("cannot read {}: {e}", path.display()))),
    }
}

fn create_identity_header(path: &Path) -> std::io::Result<SecretString> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(parent)?;
    }
    let secret = random_secret();
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)?;
    f.write_all(secret.expose_secret().as_bytes())?;
    f.write_all(b"\n")?;
    Ok(secret)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn identity_header_is_created_0600_and_then_reused() {
        let d = tempfile::tempdir().expect("tempdir");
        let path = d.path().join("run/tokend/identity-header");
        let src = IdentityHeaderSource::File(path.clone());
        let mut w = Vec::new();
        let a = load_identity_header(&src, "t.toml", &mut w).expect("created");
        assert_eq!(std::fs::metadata(&path).expect("exists").permissions().mode() & 0o777, 0o600);
        let b = load_identity_header(&src, "t.toml", &mut w).expect("read");
        assert_eq!(a.expose_secret(), b.expose_secret());
        assert!(a.expose_secret().len() >= 43);
        assert!(w.is_empty());
    }

    #[test]
    fn identity_header_errors_name_the_key() {
        let src = IdentityHeaderSource::File("/proc/definitely/not/writable".into());
        let e = load_identity_header(&src, "t.toml", &mut Vec::new()).expect_err("error").to_string();
        assert!(e.contains("server.identity_header_file") && e.contains("t.toml"), "{e}");
    }
}
