//! [`Validator`]: the raw file → validated types, for `[server]`, `[tokens]` and `[upstream]`, plus the
//! checks across identities. Identities themselves are in `identities.rs`.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::raw::{RawConfig, RawServer, RawTokens, RawUpstream};
use super::{Config, ConfigError, DEFAULT_IDENTITY_HEADER_FILE, DEFAULT_LISTEN, IdentityHeaderSource, ServerConfig};
use super::{TokensConfig, UpstreamConfig};
use crate::identity::Identity;
use crate::net::{host_is_loopback, is_imds_ip};

/// One validation pass over one file: collects warnings and the credential files to watch.
pub(super) struct Validator<'a> {
    /// The file, for messages.
    pub(super) path: String,
    /// Its directory: relative paths resolve against it.
    base: PathBuf,
    /// Environment lookup (tests pass a closure instead of touching the process environment).
    pub(super) env: &'a dyn Fn(&str) -> Option<String>,
    pub(super) warnings: Vec<String>,
    pub(super) watched: Vec<PathBuf>,
}

impl<'a> Validator<'a> {
    pub(super) fn new(path: &Path, env: &'a dyn Fn(&str) -> Option<String>) -> Self {
        Self {
            path: path.display().to_string(),
            base: path.parent().map(Path::to_path_buf).unwrap_or_default(),
            env,
            warnings: Vec::new(),
            watched: Vec::new(),
        }
    }

    pub(super) fn err(&self, key: impl Into<String>, message: impl Into<String>) -> ConfigError {
        ConfigError::Invalid { path: self.path.clone(), key: key.into(), message: message.into() }
    }

    pub(super) fn resolve(&self, p: &Path) -> PathBuf {
        if p.is_absolute() { p.to_path_buf() } else { self.base.join(p) }
    }

    fn duration(
        &self,
        key: &str,
        value: Option<&str>,
        default: Duration,
        range: (Duration, Duration),
    ) -> Result<Duration, ConfigError> {
        let Some(text) = value else { return Ok(default) };
        let d = humantime::parse_duration(text.trim())
            .map_err(|e| self.err(key, format!("{text:?} is not a duration ({e}); write e.g. \"30s\" or \"5m\"")))?;
        if d < range.0 || d > range.1 {
            let (lo, hi) = (humantime::format_duration(range.0), humantime::format_duration(range.1));
            return Err(self.err(key, format!("{text:?} is out of range; use between {lo} and {hi}")));
        }
        Ok(d)
    }

    pub(super) fn validate(mut self, raw: RawConfig) -> Result<Config, ConfigError> {
        let server = self.server(raw.server)?;
        let tokens = self.tokens(&raw.tokens)?;
        let upstream = self.upstream(raw.upstream)?;
        let identities = if raw.identity.is_empty() {
            vec![self.identity_from_env()?]
        } else {
            let mut out = Vec::with_capacity(raw.identity.len());
            for (i, r) in raw.identity.into_iter().enumerate() {
                out.push(self.identity(i, r)?);
            }
            out
        };
        self.check_unambiguous(&identities)?;
        Ok(Config {
            source: self.path,
            server,
            tokens,
            upstream,
            identities,
            warnings: self.warnings,
            watched: self.watched,
        })
    }

    pub(super) fn server(&mut self, raw: RawServer) -> Result<ServerConfig, ConfigError> {
        let allow_non_loopback = raw.allow_non_loopback.unwrap_or(false);
        let texts = raw.listen.unwrap_or_else(|| vec![DEFAULT_LISTEN.to_owned()]);
        if texts.is_empty() {
            return Err(self.err("server.listen", "is empty; give at least one address such as \"127.0.0.1:50342\""));
        }
        let mut listen = Vec::with_capacity(texts.len());
        for (i, text) in texts.iter().enumerate() {
            let key = format!("server.listen[{i}]");
            let addr: SocketAddr = text.parse().map_err(|_| {
                self.err(
                    &key,
                    format!("{text:?} is not an IP:port address (e.g. \"127.0.0.1:50342\" or \"[::1]:50342\")"),
                )
            })?;
            let host_local = addr.ip().is_loopback() || is_imds_ip(addr.ip());
            if !host_local && !allow_non_loopback {
                return Err(self.err(
                    &key,
                    format!(
                        "{addr} is not a loopback address (nor 169.254.169.254, transparent IMDS); anyone who can \
                         connect gets tokens, so tokend refuses it unless server.allow_non_loopback = true"
                    ),
                ));
            }
            if listen.contains(&addr) {
                return Err(self.err(&key, format!("{addr} is listed twice")));
            }
            listen.push(addr);
        }
        let file = raw.identity_header_file.unwrap_or_else(|| PathBuf::from(DEFAULT_IDENTITY_HEADER_FILE));
        Ok(ServerConfig { listen, identity_header: IdentityHeaderSource::File(self.resolve(&file)) })
    }

    fn tokens(&self, raw: &RawTokens) -> Result<TokensConfig, ConfigError> {
        let secs = Duration::from_secs;
        Ok(TokensConfig {
            min_lifetime: self.duration(
                "tokens.min_lifetime",
                raw.min_lifetime.as_deref(),
                secs(300),
                (secs(0), secs(86_400)),
            )?,
            max_wait: self.duration(
                "tokens.max_wait",
                raw.max_wait.as_deref(),
                secs(8),
                (Duration::from_millis(100), secs(60)),
            )?,
            idle_timeout: self.duration(
                "tokens.idle_timeout",
                raw.idle_timeout.as_deref(),
                secs(1800),
                (secs(1), secs(7 * 86_400)),
            )?,
        })
    }

    fn upstream(&mut self, raw: RawUpstream) -> Result<UpstreamConfig, ConfigError> {
        let secs = Duration::from_secs;
        let timeout = self.duration("upstream.timeout", raw.timeout.as_deref(), secs(10), (secs(1), secs(120)))?;
        let ca_pem = match raw.ca_file {
            None => None,
            Some(p) => {
                let p = self.resolve(&p);
                let pem = std::fs::read(&p)
                    .map_err(|e| self.err("upstream.ca_file", format!("cannot read {}: {e}", p.display())))?;
                match reqwest::Certificate::from_pem_bundle(&pem) {
                    Ok(certs) if !certs.is_empty() => {}
                    _ => return Err(self.err("upstream.ca_file", format!("{} holds no PEM certificate", p.display()))),
                }
                Some((p, pem))
            }
        };
        Ok(UpstreamConfig { timeout, ca_pem })
    }

    /// A token URL: https, or http to a loopback host.
    pub(super) fn token_url(&self, key: &str, text: &str) -> Result<url::Url, ConfigError> {
        let url = url::Url::parse(text).map_err(|e| self.err(key, format!("{text:?} is not a URL ({e})")))?;
        match url.scheme() {
            "https" => Ok(url),
            "http" if host_is_loopback(&url) => Ok(url),
            "http" => {
                Err(self.err(key, format!("{text:?}: http:// is accepted only for loopback hosts; use https://")))
            }
            other => Err(self.err(key, format!("{text:?}: scheme {other:?} is not http or https"))),
        }
    }

    /// Unique names, and no selector value shared by two identities.
    fn check_unambiguous(&self, identities: &[Identity]) -> Result<(), ConfigError> {
        let mut names = HashSet::new();
        let mut selectors = HashSet::new();
        for (i, id) in identities.iter().enumerate() {
            if !names.insert(id.name.as_str()) {
                return Err(self.err(format!("identity[{i}].name"), format!("{:?} is used by two identities", id.name)));
            }
            let keys = [
                Some(("client_id", &id.client_id)),
                id.object_id.as_ref().map(|v| ("object_id", v)),
                id.resource_id.as_ref().map(|v| ("resource_id", v)),
            ];
            for (field, value) in keys.into_iter().flatten() {
                if !selectors.insert((field, value.to_ascii_lowercase())) {
                    return Err(self.err(
                        format!("identity[{i}].{field}"),
                        format!("{value:?} is used by two identities, so a caller selecting it would be ambiguous"),
                    ));
                }
            }
        }
        Ok(())
    }
}
