//! [`Validator`]: the raw file → validated types, for `[server]`, `[tokens]` and `[upstream]`, plus the
//! checks across identities. Identities themselves are in `identities.rs`.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::raw::{RawAudit, RawConfig, RawMetrics, RawServer, RawTokens, RawUpstream};
use super::{
    AuditConfig, Config, ConfigError, DEFAULT_IDENTITY_HEADER_FILE, DEFAULT_LISTEN, IdentityHeaderSource, ServerConfig,
};
use super::{DEFAULT_SOCKET_MODE, TokensConfig, UnixSocketConfig, UpstreamConfig};
use crate::access::Rate;
use crate::audit::OnFailure;
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

    /// Validates every independent part of the file (each section, each identity) and reports all
    /// their problems at once; parts that depend on others (`[access]` on the identities) are checked
    /// only when those are valid.
    pub(super) fn validate(mut self, raw: RawConfig) -> Result<Config, ConfigError> {
        let mut problems = Vec::new();
        let server = self.server(raw.server).map_err(|e| problems.push(e)).ok();
        let tokens = self.tokens(&raw.tokens).map_err(|e| problems.push(e)).ok();
        let upstream = self.upstream(raw.upstream).map_err(|e| problems.push(e)).ok();
        let identities: Option<Vec<Identity>> = if raw.identity.is_empty() {
            self.identity_from_env().map_err(|e| problems.push(e)).ok().map(|i| vec![i])
        } else {
            let mut out = Vec::with_capacity(raw.identity.len());
            let mut all = true;
            for (i, r) in raw.identity.into_iter().enumerate() {
                match self.identity(i, r) {
                    Ok(identity) => out.push(identity),
                    Err(e) => {
                        problems.push(e);
                        all = false;
                    }
                }
            }
            all.then_some(out)
        };
        let metrics_listen = match (raw.metrics, &server) {
            (Some(m), Some(server)) => self.metrics(m, server).map_err(|e| problems.push(e)).ok().map(Some),
            (Some(_), None) | (None, _) => Some(None),
        };
        let (Some(server), Some(tokens), Some(upstream), Some(identities), Some(metrics_listen)) =
            (server, tokens, upstream, identities, metrics_listen)
        else {
            return Err(if problems.len() == 1 { problems.remove(0) } else { ConfigError::Several(problems) });
        };
        self.check_unambiguous(&identities)?;
        let access = raw.access.map(|a| self.access(a, &identities)).transpose()?;
        let audit = raw.audit.map(|a| self.audit(a)).transpose()?;
        Ok(Config {
            source: self.path,
            server,
            tokens,
            upstream,
            identities,
            access,
            audit,
            metrics_listen,
            warnings: self.warnings,
            watched: self.watched,
        })
    }

    fn audit(&self, raw: RawAudit) -> Result<AuditConfig, ConfigError> {
        let path = match raw.path {
            Some(p) if !p.as_os_str().is_empty() => self.resolve(&p),
            _ => {
                return Err(
                    self.err("audit.path", "missing; give the audit log's file, e.g. \"/var/log/tokend/audit.jsonl\"")
                );
            }
        };
        let on_failure = match raw.on_failure.as_deref() {
            None => OnFailure::default(),
            Some(text) => OnFailure::parse(text).ok_or_else(|| {
                self.err(
                    "audit.on_failure",
                    format!("{text:?} is not \"drop\" (serve, count the lost line) or \"refuse\" (answer 503)"),
                )
            })?,
        };
        Ok(AuditConfig { path, on_failure })
    }

    fn metrics(&self, raw: RawMetrics, server: &ServerConfig) -> Result<SocketAddr, ConfigError> {
        let Some(text) = raw.listen else {
            return Err(self.err("metrics.listen", "missing; give the Prometheus listener, e.g. \"127.0.0.1:9464\""));
        };
        let addr: SocketAddr = text.parse().map_err(|_| {
            self.err("metrics.listen", format!("{text:?} is not an IP:port address (e.g. \"127.0.0.1:9464\")"))
        })?;
        if !addr.ip().is_loopback() && !raw.allow_non_loopback.unwrap_or(false) {
            return Err(self.err(
                "metrics.listen",
                format!(
                    "{addr} is not a loopback address; set metrics.allow_non_loopback = true to expose the metrics"
                ),
            ));
        }
        if server.listen.iter().any(|l| {
            l.port() == addr.port() && (l.ip() == addr.ip() || l.ip().is_unspecified() || addr.ip().is_unspecified())
        }) {
            return Err(self
                .err("metrics.listen", format!("{addr} is a token listener (server.listen); metrics get their own")));
        }
        Ok(addr)
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
        let unix_socket = self.unix_socket(raw.unix_socket, raw.socket_mode, raw.socket_group)?;
        let max_connections_per_caller =
            self.count("server.max_connections_per_caller", raw.max_connections_per_caller, 256)?;
        Ok(ServerConfig {
            listen,
            identity_header: IdentityHeaderSource::File(self.resolve(&file)),
            unix_socket,
            max_connections_per_caller,
        })
    }

    /// `server.unix_socket`, `socket_mode` and `socket_group`. Whether the path is free is checked when
    /// the daemon prepares (`daemon::prepare`), just before binding.
    fn unix_socket(
        &mut self,
        path: Option<PathBuf>,
        mode: Option<String>,
        group: Option<String>,
    ) -> Result<Option<UnixSocketConfig>, ConfigError> {
        let Some(path) = path else {
            if let Some(key) = [("server.socket_mode", mode.is_some()), ("server.socket_group", group.is_some())]
                .into_iter()
                .find_map(|(key, set)| set.then_some(key))
            {
                return Err(self.err(key, "only applies with server.unix_socket"));
            }
            return Ok(None);
        };
        if path.as_os_str().is_empty() {
            return Err(self.err("server.unix_socket", "is empty; give a path such as \"/run/tokend/tokend.sock\""));
        }
        let path = self.resolve(&path);
        // sun_path holds 108 bytes, the terminating NUL included.
        if path.as_os_str().len() > 107 {
            return Err(self.err("server.unix_socket", format!("{} is longer than 107 bytes", path.display())));
        }
        let mode = match mode {
            None => DEFAULT_SOCKET_MODE,
            Some(text) => {
                let digits = text.trim().trim_start_matches("0o");
                match u32::from_str_radix(digits, 8) {
                    Ok(m) if m <= 0o777 && !digits.is_empty() => m,
                    _ => {
                        return Err(self.err(
                            "server.socket_mode",
                            format!("{text:?} is not an octal mode like \"0660\" (at most 0777)"),
                        ));
                    }
                }
            }
        };
        if mode & 0o002 != 0 {
            self.warnings.push(format!(
                "server.socket_mode {mode:04o} lets any local user connect to {}; use 0660 and server.socket_group",
                path.display()
            ));
        }
        let gid = match group {
            None => None,
            Some(g) => Some(group_id(&g).map_err(|message| self.err("server.socket_group", message))?),
        };
        Ok(Some(UnixSocketConfig { path, mode, gid }))
    }

    fn count(&self, key: &str, value: Option<usize>, default: usize) -> Result<usize, ConfigError> {
        match value {
            None => Ok(default),
            Some(n) if (1..=100_000).contains(&n) => Ok(n),
            Some(n) => Err(self.err(key, format!("{n} is out of range; use between 1 and 100000"))),
        }
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
            max_on_demand_per_caller: self.count(
                "tokens.max_on_demand_per_caller",
                raw.max_on_demand_per_caller,
                64,
            )?,
            max_on_demand: self.count("tokens.max_on_demand", raw.max_on_demand, 1024)?,
            on_demand_rate: match raw.on_demand_rate.as_deref() {
                None => super::DEFAULT_ON_DEMAND_RATE,
                Some(text) => Rate::parse(text).ok_or_else(|| {
                    self.err(
                        "tokens.on_demand_rate",
                        format!("{text:?} is not a rate like \"64/m\", \"2/s\" or \"500/h\""),
                    )
                })?,
            },
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

/// A group name or numeric id → gid. Names are resolved here, at load and reload, never per request.
fn group_id(text: &str) -> Result<u32, String> {
    let text = text.trim();
    if let Ok(gid) = text.parse::<u32>() {
        return Ok(gid);
    }
    match nix::unistd::Group::from_name(text) {
        Ok(Some(group)) => Ok(group.gid.as_raw()),
        Ok(None) => Err(format!("{text:?} is not a group on this host")),
        Err(e) => Err(format!("cannot look up group {text:?}: {e}")),
    }
}
