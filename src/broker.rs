//! The broker: the live configuration snapshot, the token cache and the App Service secret, shared
//! by every request; and the identity header file (created 0600, kept if present).

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use secrecy::{ExposeSecret, SecretString};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::access::{Buckets, Rate};
use crate::audit::AuditLog;
use crate::caller::Caller;
use crate::config::{Config, ConfigError, IdentityHeaderSource};
use crate::secret::{SecretFileError, constant_time_eq, random_secret, read_secret_file, readable_warning};
use crate::snapshot::{Current, Live, Snapshot};
use crate::token::{PinnedState, TokenCache, TokenSource};

/// Per-caller request budgets: one token bucket per uid (`None`: unidentified callers, together).
type Limiter = Buckets<Option<u32>>;

/// Everything a request handler needs.
pub(crate) struct Broker {
    /// The running configuration; a reload replaces it in one swap.
    live: Arc<Live>,
    cache: TokenCache,
    identity_header: SecretString,
    /// `access.rate_limit` and its buckets; replaced (buckets reset) only when the rate changes.
    limiter: ArcSwapOption<Limiter>,
    /// `[audit]`, if configured.
    audit: Option<AuditLog>,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let rate = self.limiter.load().as_ref().map(|b| b.rate().to_string());
        f.debug_struct("Broker").field("cache", &self.cache).field("rate_limit", &rate).finish_non_exhaustive()
    }
}

fn limiter(config: &Config) -> Option<Arc<Limiter>> {
    Some(Arc::new(Buckets::new(config.access.as_ref()?.rate_limit?)))
}

impl Broker {
    /// Builds the broker and starts fetching every configured resource.
    pub(crate) fn start(
        config: &Config,
        identity_header: SecretString,
        audit: Option<AuditLog>,
        source: Arc<dyn TokenSource>,
        tracker: &TaskTracker,
        cancel: &CancellationToken,
    ) -> Arc<Self> {
        let live = Arc::new(Live::new(Snapshot::new(config)));
        let cache = TokenCache::new(source, live.clone(), tracker.clone(), cancel.clone());
        cache.apply(None);
        Arc::new(Self { live, cache, identity_header, limiter: ArcSwapOption::new(limiter(config)), audit })
    }

    /// The current configuration snapshot: a request takes it once and works on it throughout.
    pub(crate) fn snapshot(&self) -> Current {
        self.live.load()
    }

    /// Applies a reloaded configuration's identities and token policy without dropping a request: one
    /// swap of the snapshot, then the cache follows (requests in flight finish on the snapshot they took).
    pub(crate) fn reload(&self, config: &Config) {
        let old = self.live.swap(Snapshot::new(config));
        self.cache.apply(Some(&old));
        let rate = config.access.as_ref().and_then(|a| a.rate_limit);
        // Reloads run one at a time.
        if self.limiter.load().as_ref().map(|b| b.rate()) != rate {
            self.limiter.store(limiter(config));
        }
    }

    /// Takes one request from `caller`'s budget; `Err` is how long until the next one is allowed.
    pub(crate) fn check_rate(&self, caller: &Caller) -> Result<(), (Rate, Duration)> {
        let limiter = self.limiter.load();
        let Some(limiter) = limiter.as_ref() else { return Ok(()) };
        let key = match caller {
            Caller::Known { uid, .. } => Some(*uid),
            Caller::Unknown(_) => None,
        };
        limiter.take(&key).map_err(|wait| (limiter.rate(), wait))
    }

    /// The audit log, if configured.
    pub(crate) fn audit(&self) -> Option<&AuditLog> {
        self.audit.as_ref()
    }

    /// The token cache.
    pub(crate) fn cache(&self) -> &TokenCache {
        &self.cache
    }

    /// Compares a presented `X-IDENTITY-HEADER` with the secret in constant time.
    pub(crate) fn identity_header_matches(&self, presented: &[u8]) -> bool {
        constant_time_eq(presented, self.identity_header.expose_secret().as_bytes())
    }

    /// The configured resources and whether each has a servable token.
    pub(crate) fn readiness(&self) -> Vec<PinnedState> {
        self.cache.pinned()
    }
}

/// Reads the App Service identity header secret, creating the file (mode 0600, parent 0700) with a
/// random secret when it does not exist. Errors name `server.identity_header_file`.
pub(crate) fn load_identity_header(
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
    match read_secret_file(path) {
        Ok(secret) => {
            // Sharing it with a group of client users (mode 0640) is intended; readable by anyone is not.
            warnings.extend(readable_warning(path, 0o007));
            Ok(secret)
        }
        Err(e) if e.is_not_found() => create_identity_header(path).map_err(|e| {
            err(format!("cannot create {}: {e}; point server.identity_header_file at a writable path", path.display()))
        }),
        Err(e @ SecretFileError::Empty { .. }) => {
            Err(err(format!("{e}; delete it to have tokend create a new secret")))
        }
        Err(e) => Err(err(e.to_string())),
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
