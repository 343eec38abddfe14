//! Configuration: a TOML file (or, for the identity, the Azure SDK environment variables) validated once.
//!
//! [`raw`] is what serde reads (unknown keys are errors); [`Config`] is what the rest of tokend uses.
//! [`validate`] checks `[server]`, `[tokens]` and `[upstream]`; [`identities`] builds identities and
//! their credential specs, then loads the credentials. Every error names the file, the key and the
//! problem. Relative paths in the file are relative to the file's directory.

mod access;
mod groups;
mod identities;
mod raw;
#[cfg(test)]
mod tests;
mod validate;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::access::{Access, Rate};
use crate::audit::OnFailure;
use crate::identity::Identity;
use raw::RawConfig;
use validate::Validator;

/// Default listen address (the port Azure's own managed-identity tooling uses locally).
pub const DEFAULT_LISTEN: &str = "127.0.0.1:50342";
/// Default App Service identity header file.
pub(crate) const DEFAULT_IDENTITY_HEADER_FILE: &str = "/run/tokend/identity-header";
/// Default Entra authority.
pub(crate) const DEFAULT_AUTHORITY_HOST: &str = "https://login.microsoftonline.com";

/// A configuration error. Exit code 64 (EX_USAGE).
#[derive(Debug, thiserror::Error)]
pub(crate) enum ConfigError {
    /// The file could not be read.
    #[error("{path}: cannot read: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Not valid TOML, an unknown key or a value of the wrong type (toml's message names the key and line).
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: String,
        /// toml's message.
        message: String,
    },
    /// A value that parsed but is not acceptable.
    #[error("{path}: {key}: {message}")]
    Invalid {
        /// The file (or `environment`).
        path: String,
        /// The key at fault, e.g. `identity[0].client_secret_file`.
        key: String,
        /// What is wrong and how to fix it.
        message: String,
    },
    /// More than one problem, one per independent part of the file (each section, each identity).
    #[error("{} problems:\n{}", .0.len(), .0.iter().map(|e| format!("  - {e}")).collect::<Vec<_>>().join("\n"))]
    Several(Vec<ConfigError>),
}

/// `[server]`, validated.
#[derive(Debug, Clone)]
pub(crate) struct ServerConfig {
    /// Listen addresses.
    pub(crate) listen: Vec<SocketAddr>,
    /// Where the App Service identity header comes from.
    pub(crate) identity_header: IdentityHeaderSource,
    /// A unix socket to serve on as well.
    pub(crate) unix_socket: Option<UnixSocketConfig>,
    /// Open connections per caller (uid), over all listeners.
    pub(crate) max_connections_per_caller: usize,
}

/// `[server] unix_socket` with its mode and group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct UnixSocketConfig {
    /// The socket's path.
    pub(crate) path: PathBuf,
    /// Its permission bits (default 0660).
    pub(crate) mode: u32,
    /// Its group id, if `socket_group` is set.
    pub(crate) gid: Option<u32>,
}

/// The default `socket_mode`: the owner and the socket's group may connect.
pub(crate) const DEFAULT_SOCKET_MODE: u32 = 0o660;

/// `tokens.on_demand_rate` by default: a burst as large as `max_on_demand_per_caller`'s default, then
/// about one new resource a second.
pub(crate) const DEFAULT_ON_DEMAND_RATE: Rate =
    Rate { count: std::num::NonZeroU32::new(64).expect("non-zero"), per: Duration::from_secs(60) };

/// Where the App Service identity header secret lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum IdentityHeaderSource {
    /// A file, created with mode 0600 if missing.
    File(PathBuf),
    /// Generated in memory for this process (`tokend dev`).
    Generated,
}

/// `[tokens]`, validated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TokensConfig {
    /// Floor on the remaining lifetime of a served token.
    pub(crate) min_lifetime: Duration,
    /// Longest a caller waits on the IdP.
    pub(crate) max_wait: Duration,
    /// Idle time after which an on-demand resource is dropped.
    pub(crate) idle_timeout: Duration,
    /// On-demand resources one caller (uid) may have cached at once; beyond it, 429.
    pub(crate) max_on_demand_per_caller: usize,
    /// On-demand resources cached at once, all callers together; beyond it, 429.
    pub(crate) max_on_demand: usize,
    /// How fast one caller may add new on-demand resources (a token bucket per caller); beyond it, 429.
    pub(crate) on_demand_rate: Rate,
}

impl Default for TokensConfig {
    fn default() -> Self {
        Self {
            min_lifetime: Duration::from_secs(300),
            max_wait: Duration::from_secs(8),
            idle_timeout: Duration::from_secs(1800),
            max_on_demand_per_caller: 64,
            max_on_demand: 1024,
            on_demand_rate: DEFAULT_ON_DEMAND_RATE,
        }
    }
}

/// `[upstream]`, validated.
#[derive(Debug, Clone)]
pub(crate) struct UpstreamConfig {
    /// Timeout of one token request.
    pub(crate) timeout: Duration,
    /// Extra trusted CA certificates (PEM bytes) and the file they came from.
    pub(crate) ca_pem: Option<(PathBuf, Vec<u8>)>,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        Self { timeout: Duration::from_secs(10), ca_pem: None }
    }
}

/// `[audit]`: the audit log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct AuditConfig {
    /// `path`, resolved.
    pub(crate) path: PathBuf,
    /// `on_failure`.
    pub(crate) on_failure: OnFailure,
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub(crate) struct Config {
    /// Where it came from (a path), for messages.
    pub(crate) source: String,
    /// `[server]`
    pub(crate) server: ServerConfig,
    /// `[tokens]`
    pub(crate) tokens: TokensConfig,
    /// `[upstream]`
    pub(crate) upstream: UpstreamConfig,
    /// Identities, default first; never empty.
    pub(crate) identities: Vec<Identity>,
    /// `[access]`; `None` when the file has none (every local caller may get every token).
    pub(crate) access: Option<Access>,
    /// `[audit]`, if the file has it.
    pub(crate) audit: Option<AuditConfig>,
    /// `[metrics] listen`.
    pub(crate) metrics_listen: Option<SocketAddr>,
    /// Things worth a warning that are not errors (e.g. a secret file others can read).
    pub(crate) warnings: Vec<String>,
    /// Credential files (secrets, certificates, passwords) whose change triggers a reload.
    pub(crate) watched: Vec<PathBuf>,
}

impl Config {
    /// Reads and validates `path`, taking the Azure SDK variables from the process environment.
    pub(crate) fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = read(path)?;
        Self::from_toml(&text, path, &|name| std::env::var(name).ok())
    }

    /// Validates TOML text as if read from `path`; `env` looks up environment variables.
    pub(crate) fn from_toml(
        text: &str,
        path: &Path,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        let raw = parse(text, path)?;
        Validator::new(path, env).validate(raw)
    }

    /// Reads only what a *client* of tokend needs (`tokend env`, `tokend token`): the whole file is
    /// parsed (unknown keys are still errors) but only `[server]` is validated, so no secret file is
    /// read and an unprivileged user can run these commands.
    pub(crate) fn load_server(path: &Path) -> Result<ServerConfig, ConfigError> {
        let raw = parse(&read(path)?, path)?;
        Validator::new(path, &|_| None).server(raw.server)
    }
}

fn read(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.display().to_string(), source })
}

fn parse(text: &str, path: &Path) -> Result<RawConfig, ConfigError> {
    toml::from_str(text).map_err(|e| {
        let mut message = e.to_string();
        // The likeliest slip: a single-bracket table where an array of tables is meant.
        for table in ["identity", "access.rule"] {
            let single = format!("[{table}]");
            if message.contains("expected a sequence") && text.lines().any(|l| l.trim() == single) {
                message.push_str(&format!(
                    "\nhint: write [[{table}]] (double brackets): each one is an entry of a list, and there may be several"
                ));
            }
        }
        ConfigError::Parse { path: path.display().to_string(), message }
    })
}
