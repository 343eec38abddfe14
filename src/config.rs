//! Configuration: a TOML file (or, for the identity, the Azure SDK environment variables) validated once.
//!
//! [`RawConfig`] is what serde reads (unknown keys are errors); [`Config`] is what the rest of tokend
//! uses. Every error names the file, the key and the problem. Relative paths in the file are relative
//! to the file's directory.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use std::sync::Arc;
use std::time::SystemTime;

use crate::credential::{AssertionAlg, Certificate, ClientCredential};
use crate::identity::{Identity, TokenApi};
use crate::resource::Resource;

/// Default listen address (the port Azure's own managed-identity tooling uses locally).
pub const DEFAULT_LISTEN: &str = "127.0.0.1:50342";
/// Default App Service identity header file.
pub const DEFAULT_IDENTITY_HEADER_FILE: &str = "/run/tokend/identity-header";
/// Default Entra authority.
pub const DEFAULT_AUTHORITY_HOST: &str = "https://login.microsoftonline.com";

/// A configuration error. Exit code 64 (EX_USAGE).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
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
}

/// The file as written. Every table denies unknown keys.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// `[server]`
    #[serde(default)]
    pub server: RawServer,
    /// `[tokens]`
    #[serde(default)]
    pub tokens: RawTokens,
    /// `[upstream]`
    #[serde(default)]
    pub upstream: RawUpstream,
    /// `[[identity]]`, the first is the default.
    #[serde(default)]
    pub identity: Vec<RawIdentity>,
}

/// `[server]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawServer {
    /// Addresses to listen on (`IP:port`); loopback only unless `allow_non_loopback`.
    pub listen: Option<Vec<String>>,
    /// Explicit opt-in to listening on a non-loopback address.
    pub allow_non_loopback: Option<bool>,
    /// The App Service identity header secret; created (mode 0600) if missing.
    pub identity_header_file: Option<PathBuf>,
}

/// `[tokens]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTokens {
    /// Never hand out a token with less than this left (default `5m`).
    pub min_lifetime: Option<String>,
    /// Longest a caller waits for the IdP when nothing valid is cached (default `8s`), then 503.
    pub max_wait: Option<String>,
    /// An on-demand resource unused this long stops being refreshed and is dropped (default `30m`).
    pub idle_timeout: Option<String>,
}

/// `[upstream]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUpstream {
    /// Timeout of one token request, connect included (default `10s`).
    pub timeout: Option<String>,
    /// Extra CA certificates (PEM) trusted for https token URLs, on top of the system roots.
    pub ca_file: Option<PathBuf>,
}

/// `[[identity]]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawIdentity {
    /// Name in logs and errors (default `default` for the first identity).
    pub name: Option<String>,
    /// Directory (tenant) id; needed with `authority_host`.
    pub tenant_id: Option<String>,
    /// Application (client) id.
    pub client_id: Option<String>,
    /// Object (principal) id, selectable by callers.
    pub object_id: Option<String>,
    /// ARM resource id, selectable by callers with `msi_res_id`/`mi_res_id`.
    pub resource_id: Option<String>,
    /// Entra authority; the token URL is `{authority_host}/{tenant_id}/oauth2/v2.0/token` (v1: `/oauth2/token`).
    pub authority_host: Option<String>,
    /// Any OAuth2 token endpoint, instead of `authority_host`.
    pub token_url: Option<String>,
    /// `"v2"` (default, `scope=<resource>/.default`) or `"v1"` (`resource=<resource>`).
    pub api: Option<String>,
    /// File holding the client secret.
    pub client_secret_file: Option<PathBuf>,
    /// systemd credential (`LoadCredential=`) holding the client secret: `$CREDENTIALS_DIRECTORY/NAME`.
    pub client_secret_credential: Option<String>,
    /// Certificate: PEM (certificate + unencrypted key) or PKCS#12 (`.pfx`/`.p12`).
    pub certificate_file: Option<PathBuf>,
    /// systemd credential holding the certificate.
    pub certificate_credential: Option<String>,
    /// File holding the PKCS#12 password.
    pub certificate_password_file: Option<PathBuf>,
    /// systemd credential holding the PKCS#12 password.
    pub certificate_password_credential: Option<String>,
    /// `"PS256"` (default, header `x5t#S256`) or `"RS256"` (header `x5t`).
    pub assertion_alg: Option<String>,
    /// Send the certificate chain (`x5c`) for subject-name/issuer authentication.
    pub send_certificate_chain: Option<bool>,
    /// Federated token file (workload identity); read on every request.
    pub federated_token_file: Option<PathBuf>,
    /// Resources fetched at start and kept fresh.
    #[serde(default)]
    pub resources: Vec<String>,
}

/// `[server]`, validated.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Listen addresses.
    pub listen: Vec<SocketAddr>,
    /// Where the App Service identity header comes from.
    pub identity_header: IdentityHeaderSource,
}

/// Where the App Service identity header secret lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdentityHeaderSource {
    /// A file, created with mode 0600 if missing.
    File(PathBuf),
    /// Generated in memory for this process (`tokend dev`).
    Generated,
}

/// `[tokens]`, validated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokensConfig {
    /// Floor on the remaining lifetime of a served token.
    pub min_lifetime: Duration,
    /// Longest a caller waits on the IdP.
    pub max_wait: Duration,
    /// Idle time after which an on-demand resource is dropped.
    pub idle_timeout: Duration,
}

impl Default for TokensConfig {
    fn default() -> Self {
        Self {
            min_lifetime: Duration::from_secs(300),
            max_wait: Duration::from_secs(8),
            idle_timeout: Duration::from_secs(1800),
        }
    }
}

/// `[upstream]`, validated.
#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    /// Timeout of one token request.
    pub timeout: Duration,
    /// Extra trusted CA certificates (PEM bytes) and the file they came from.
    pub ca_pem: Option<(PathBuf, Vec<u8>)>,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        Self { timeout: Duration::from_secs(10), ca_pem: None }
    }
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where it came from (a path), for messages.
    pub source: String,
    /// `[server]`
    pub server: ServerConfig,
    /// `[tokens]`
    pub tokens: TokensConfig,
    /// `[upstream]`
    pub upstream: UpstreamConfig,
    /// Identities, default first; never empty.
    pub identities: Vec<Identity>,
    /// Things worth a warning that are not errors (e.g. a secret file others can read).
    pub warnings: Vec<String>,
    /// Credential files (secrets, certificates, passwords) whose change triggers a reload.
    pub watched: Vec<PathBuf>,
}

impl Config {
    /// Reads and validates `path`, taking the Azure SDK variables from the process environment.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.display().to_string(), source })?;
        Self::from_toml(&text, path, &|name| std::env::var(name).ok())
    }

    /// Validates TOML text as if read from `path`; `env` looks up environment variables.
    pub fn from_toml(text: &str, path: &Path, env: &dyn Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let shown = path.display().to_string();
        let raw: RawConfig =
            toml::from_str(text).map_err(|e| ConfigError::Parse { path: shown.clone(), message: e.to_string() })?;
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        Validator { path: shown, base, env, warnings: Vec::new(), watched: Vec::new() }.validate(raw)
    }

    /// Reads only what a *client* of tokend needs (`tokend env`, `tokend token`): the whole file is
    /// parsed (unknown keys are still errors) but only `[server]` is validated, so no secret file is
    /// read and an unprivileged user can run these commands.
    pub fn load_server(path: &Path) -> Result<ServerConfig, ConfigError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: shown.clone(), source })?;
        let raw: RawConfig =
            toml::from_str(&text).map_err(|e| ConfigError::Parse { path: shown.clone(), message: e.to_string() })?;
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        Validator { path: shown, base, env: &|_| None, warnings: Vec::new(), watched: Vec::new() }.server(raw.server)
    }
}

struct Validator<'a> {
    path: String,
    base: PathBuf,
    env: &'a dyn Fn(&str) -> Option<String>,
    warnings: Vec<String>,
    watched: Vec<PathBuf>,
}

impl Validator<'_> {
    fn err(&self, key: impl Into<String>, message: impl Into<String>) -> ConfigError {
        ConfigError::Invalid { path: self.path.clone(), key: key.into(), message: message.into() }
    }

    fn resolve(&self, p: &Path) -> PathBuf {
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

    fn validate(mut self, raw: RawConfig) -> Result<Config, ConfigError> {
        let server = self.server(raw.server)?;
        let secs = Duration::from_secs;
        let tokens = TokensConfig {
            min_lifetime: self.duration(
                "tokens.min_lifetime",
                raw.tokens.min_lifetime.as_deref(),
                secs(300),
                (secs(0), secs(86_400)),
            )?,
            max_wait: self.duration(
                "tokens.max_wait",
                raw.tokens.max_wait.as_deref(),
                secs(8),
                (Duration::from_millis(100), secs(60)),
            )?,
            idle_timeout: self.duration(
                "tokens.idle_timeout",
                raw.tokens.idle_timeout.as_deref(),
                secs(1800),
                (secs(1), secs(7 * 86_400)),
            )?,
        };
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

    fn server(&mut self, raw: RawServer) -> Result<ServerConfig, ConfigError> {
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
            let host_local = addr.ip().is_loopback() || crate::transparent::is_imds_ip(addr.ip());
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

    fn read_secret_file(&mut self, key: &str, path: &Path) -> Result<String, ConfigError> {
        let path = self.resolve(path);
        self.watched.push(path.clone());
        let text = std::fs::read_to_string(&path)
            .map_err(|e| self.err(key, format!("cannot read {}: {e}", path.display())))?;
        let secret = text.trim().to_owned();
        if secret.is_empty() {
            return Err(self.err(key, format!("{} is empty", path.display())));
        }
        if let Some(w) = world_readable_warning(&path) {
            self.warnings.push(w);
        }
        Ok(secret)
    }

    fn token_url(&self, key: &str, text: &str) -> Result<reqwest::Url, ConfigError> {
        let url = reqwest::Url::parse(text).map_err(|e| self.err(key, format!("{text:?} is not a URL ({e})")))?;
        match url.scheme() {
            "https" => Ok(url),
            "http" if host_is_loopback(&url) => Ok(url),
            "http" => {
                Err(self.err(key, format!("{text:?}: http:// is accepted only for loopback hosts; use https://")))
            }
            other => Err(self.err(key, format!("{text:?}: scheme {other:?} is not http or https"))),
        }
    }

    fn identity(&mut self, i: usize, raw: RawIdentity) -> Result<Identity, ConfigError> {
        let k = |field: &str| format!("identity[{i}].{field}");
        let name = match raw.name.clone() {
            Some(n) if n.trim().is_empty() => return Err(self.err(k("name"), "is empty")),
            Some(n) => n,
            None if i == 0 => "default".to_owned(),
            None => return Err(self.err(k("name"), "missing; every identity after the first needs a name")),
        };
        let client_id = nonempty(raw.client_id.clone())
            .ok_or_else(|| self.err(k("client_id"), "missing; set the application (client) id"))?;
        let api = match raw.api.as_deref() {
            None | Some("v2") => TokenApi::V2,
            Some("v1") => TokenApi::V1,
            Some(other) => return Err(self.err(k("api"), format!("{other:?} is not \"v2\" or \"v1\""))),
        };
        let token_url = match (raw.token_url.clone(), raw.authority_host.clone()) {
            (Some(_), Some(_)) => {
                return Err(self.err(k("token_url"), "set either token_url or authority_host, not both"));
            }
            (Some(url), None) => self.token_url(&k("token_url"), &url)?,
            (None, authority) => {
                let tenant = nonempty(raw.tenant_id.clone()).ok_or_else(|| {
                    self.err(k("tenant_id"), "missing; needed to build the token URL from authority_host")
                })?;
                let authority = authority.unwrap_or_else(|| DEFAULT_AUTHORITY_HOST.to_owned());
                self.token_url(&k("authority_host"), &entra_token_url(&authority, &tenant, api))?
            }
        };
        let credential = self.credential(i, &raw)?;
        let mut resources: Vec<Resource> = Vec::new();
        for (j, text) in raw.resources.iter().enumerate() {
            let r = Resource::parse(text)
                .map_err(|e| self.err(format!("identity[{i}].resources[{j}]"), format!("{text:?}: {e}")))?;
            if resources.contains(&r) {
                return Err(self.err(format!("identity[{i}].resources[{j}]"), format!("{text:?} is listed twice")));
            }
            resources.push(r);
        }
        Ok(Identity {
            name,
            client_id,
            object_id: nonempty(raw.object_id.clone()),
            resource_id: nonempty(raw.resource_id.clone()),
            token_url,
            api,
            credential,
            resources,
        })
    }

    /// `$CREDENTIALS_DIRECTORY/NAME` for a systemd credential named by `key`.
    fn systemd_credential(&self, key: &str, name: &str) -> Result<PathBuf, ConfigError> {
        if name.is_empty() || name.contains('/') || name == "." || name == ".." {
            return Err(self.err(key, format!("{name:?} is not a credential name")));
        }
        let dir = nonempty((self.env)("CREDENTIALS_DIRECTORY")).ok_or_else(|| {
            self.err(
                key,
                "CREDENTIALS_DIRECTORY is not set; systemd sets it for units with LoadCredential=/SetCredential=",
            )
        })?;
        Ok(Path::new(&dir).join(name))
    }

    /// Exactly one credential source per identity.
    fn credential(&mut self, i: usize, raw: &RawIdentity) -> Result<ClientCredential, ConfigError> {
        let k = |field: &str| format!("identity[{i}].{field}");
        let sources = [
            ("client_secret_file", raw.client_secret_file.is_some()),
            ("client_secret_credential", raw.client_secret_credential.is_some()),
            ("certificate_file", raw.certificate_file.is_some()),
            ("certificate_credential", raw.certificate_credential.is_some()),
            ("federated_token_file", raw.federated_token_file.is_some()),
        ];
        let set: Vec<&str> = sources.iter().filter(|(_, on)| *on).map(|(name, _)| *name).collect();
        let all = sources.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ");
        match set.as_slice() {
            [] => {
                return Err(self.err(
                    k("client_secret_file"),
                    format!("missing; every identity needs a credential: one of {all}"),
                ));
            }
            [_] => {}
            many => {
                return Err(self.err(k(many[1]), format!("conflicts with {}; give exactly one credential", many[0])));
            }
        }
        let cert_only = [
            ("certificate_password_file", raw.certificate_password_file.is_some()),
            ("certificate_password_credential", raw.certificate_password_credential.is_some()),
            ("assertion_alg", raw.assertion_alg.is_some()),
            ("send_certificate_chain", raw.send_certificate_chain.is_some()),
        ];
        let is_cert = raw.certificate_file.is_some() || raw.certificate_credential.is_some();
        if let Some((name, _)) = cert_only.iter().find(|(_, on)| *on).filter(|_| !is_cert) {
            return Err(self.err(
                k(name),
                "only applies to a certificate credential (certificate_file or certificate_credential)",
            ));
        }
        if let Some(p) = &raw.client_secret_file {
            let secret = self.read_secret_file(&k("client_secret_file"), p)?;
            return Ok(ClientCredential::Secret {
                secret: secret.into(),
                origin: format!("file {}", self.resolve(p).display()),
            });
        }
        if let Some(name) = &raw.client_secret_credential {
            let path = self.systemd_credential(&k("client_secret_credential"), name)?;
            let secret = self.read_secret_file(&k("client_secret_credential"), &path)?;
            return Ok(ClientCredential::Secret {
                secret: secret.into(),
                origin: format!("systemd credential {name}"),
            });
        }
        if let Some(p) = &raw.federated_token_file {
            let path = self.resolve(p);
            if !path.is_file() {
                // Not an error: the token may be projected after start; every request reads it anew.
                self.warnings.push(format!(
                    "{}: federated token file {} does not exist yet",
                    k("federated_token_file"),
                    path.display()
                ));
            }
            return Ok(ClientCredential::Federated { origin: format!("file {}", path.display()), path });
        }
        let (cert_key, cert_path) = match (&raw.certificate_file, &raw.certificate_credential) {
            (Some(p), _) => (k("certificate_file"), self.resolve(p)),
            (None, Some(name)) => {
                (k("certificate_credential"), self.systemd_credential(&k("certificate_credential"), name)?)
            }
            (None, None) => unreachable!("exactly one credential source was checked above"),
        };
        let password = match (&raw.certificate_password_file, &raw.certificate_password_credential) {
            (Some(_), Some(_)) => {
                return Err(self.err(k("certificate_password_credential"), "conflicts with certificate_password_file"));
            }
            (Some(p), None) => Some(self.read_secret_file(&k("certificate_password_file"), p)?),
            (None, Some(name)) => {
                let path = self.systemd_credential(&k("certificate_password_credential"), name)?;
                Some(self.read_secret_file(&k("certificate_password_credential"), &path)?)
            }
            (None, None) => None,
        };
        let alg = match raw.assertion_alg.as_deref() {
            None | Some("PS256") => AssertionAlg::Ps256,
            Some("RS256") => AssertionAlg::Rs256,
            Some(other) => return Err(self.err(k("assertion_alg"), format!("{other:?} is not \"PS256\" or \"RS256\""))),
        };
        self.certificate(&cert_key, &cert_path, password.as_deref(), alg, raw.send_certificate_chain.unwrap_or(false))
    }

    fn certificate(
        &mut self,
        key: &str,
        path: &Path,
        password: Option<&str>,
        alg: AssertionAlg,
        send_chain: bool,
    ) -> Result<ClientCredential, ConfigError> {
        self.watched.push(path.to_path_buf());
        let bytes = std::fs::read(path).map_err(|e| self.err(key, format!("cannot read {}: {e}", path.display())))?;
        let cert = Certificate::load(&bytes, password, alg, send_chain)
            .map_err(|e| self.err(key, format!("{}: {e}", path.display())))?;
        if let Some(w) = world_readable_warning(path) {
            self.warnings.push(w);
        }
        if let Some(w) = expiry_warning(&cert, path, SystemTime::now()) {
            self.warnings.push(w);
        }
        Ok(ClientCredential::Certificate { cert: Arc::new(cert), origin: format!("file {}", path.display()) })
    }

    fn identity_from_env(&mut self) -> Result<Identity, ConfigError> {
        let need = |name: &str| -> Result<String, ConfigError> {
            nonempty((self.env)(name)).ok_or_else(|| {
                self.err(
                    "identity",
                    format!(
                        "no [[identity]] is configured and {name} is not set; configure an [[identity]] or set \
                         AZURE_TENANT_ID, AZURE_CLIENT_ID and AZURE_CLIENT_SECRET"
                    ),
                )
            })
        };
        let tenant = need("AZURE_TENANT_ID")?;
        let client_id = need("AZURE_CLIENT_ID")?;
        let env = |name: &str| nonempty((self.env)(name));
        let credential =
            match (env("AZURE_CLIENT_SECRET"), env("AZURE_CLIENT_CERTIFICATE_PATH"), env("AZURE_FEDERATED_TOKEN_FILE"))
            {
                (Some(secret), _, _) => {
                    ClientCredential::Secret { secret: secret.into(), origin: "environment AZURE_CLIENT_SECRET".into() }
                }
                (None, Some(path), _) => {
                    let password = env("AZURE_CLIENT_CERTIFICATE_PASSWORD");
                    let send_chain = env("AZURE_CLIENT_SEND_CERTIFICATE_CHAIN")
                        .is_some_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
                    self.certificate(
                        "AZURE_CLIENT_CERTIFICATE_PATH",
                        Path::new(&path),
                        password.as_deref(),
                        AssertionAlg::Ps256,
                        send_chain,
                    )?
                }
                (None, None, Some(path)) => ClientCredential::Federated {
                    path: PathBuf::from(&path),
                    origin: "environment AZURE_FEDERATED_TOKEN_FILE".into(),
                },
                (None, None, None) => {
                    need("AZURE_CLIENT_SECRET")?;
                    unreachable!("need() fails when the variable is unset")
                }
            };
        let authority =
            nonempty((self.env)("AZURE_AUTHORITY_HOST")).unwrap_or_else(|| DEFAULT_AUTHORITY_HOST.to_owned());
        let token_url = self.token_url("AZURE_AUTHORITY_HOST", &entra_token_url(&authority, &tenant, TokenApi::V2))?;
        Ok(Identity {
            name: "default".to_owned(),
            client_id,
            object_id: None,
            resource_id: None,
            token_url,
            api: TokenApi::V2,
            credential,
            resources: Vec::new(),
        })
    }

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

fn nonempty(v: Option<String>) -> Option<String> {
    v.map(|s| s.trim().to_owned()).filter(|s| !s.is_empty())
}

/// `{authority}/{tenant}/oauth2/v2.0/token` (v2) or `{authority}/{tenant}/oauth2/token` (v1).
pub fn entra_token_url(authority: &str, tenant: &str, api: TokenApi) -> String {
    let authority = authority.trim_end_matches('/');
    match api {
        TokenApi::V2 => format!("{authority}/{tenant}/oauth2/v2.0/token"),
        TokenApi::V1 => format!("{authority}/{tenant}/oauth2/token"),
    }
}

/// Whether a URL's host is a loopback name or address.
pub fn host_is_loopback(url: &reqwest::Url) -> bool {
    match url.host() {
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    }
}

/// Certificates expiring within this are warned about (log and `tokend check`).
pub const EXPIRY_WARNING: Duration = Duration::from_secs(30 * 86_400);

/// A warning when `cert` expires within [`EXPIRY_WARNING`] of `now` (or has expired).
pub fn expiry_warning(cert: &Certificate, path: &Path, now: SystemTime) -> Option<String> {
    let when = httpdate::fmt_http_date(cert.not_after());
    match cert.not_after().duration_since(now) {
        Err(_) => Some(format!("certificate {} ({}) expired on {when}", path.display(), cert.subject())),
        Ok(left) if left < EXPIRY_WARNING => Some(format!(
            "certificate {} ({}) expires in {} days, on {when}; renew it",
            path.display(),
            cert.subject(),
            left.as_secs() / 86_400
        )),
        Ok(_) => None,
    }
}

/// A warning when a secret file can be read by its group or others.
pub fn world_readable_warning(path: &Path) -> Option<String> {
    readable_warning(path, 0o077)
}

/// A warning when `path`'s mode has any bit of `mask` set (0o077: group or others; 0o007: others).
pub fn readable_warning(path: &Path, mask: u32) -> Option<String> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path).ok()?.permissions().mode();
    (mode & mask != 0).then(|| {
        format!(
            "secret file {} can be read by {} (mode {:04o}); run chmod {} on it",
            path.display(),
            if mask & 0o070 != 0 { "users other than its owner" } else { "any user" },
            mode & 0o7777,
            if mask & 0o070 != 0 { "600" } else { "o-rwx" }
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    struct Dir(tempfile::TempDir);
    impl Dir {
        fn new() -> Self {
            let d = tempfile::tempdir().expect("tempdir");
            std::fs::write(d.path().join("secret"), "s3cret-value\n").expect("write");
            Self(d)
        }
        fn load(&self, text: &str) -> Result<Config, ConfigError> {
            Config::from_toml(text, &self.0.path().join("tokend.toml"), &no_env)
        }
    }

    const MINIMAL: &str = r#"
        [[identity]]
        tenant_id = "t"
        client_id = "c"
        client_secret_file = "secret"
    "#;

    fn message(r: Result<Config, ConfigError>) -> String {
        match r {
            Ok(_) => panic!("expected an error"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let d = Dir::new();
        let c = d.load(MINIMAL).expect("valid");
        assert_eq!(c.server.listen, vec!["127.0.0.1:50342".parse().expect("addr")]);
        assert_eq!(c.tokens, TokensConfig::default());
        let id = &c.identities[0];
        assert_eq!(id.name, "default");
        assert_eq!(id.token_url.as_str(), "https://login.microsoftonline.com/t/oauth2/v2.0/token");
        assert_eq!(id.api, TokenApi::V2);
    }

    #[test]
    fn shipped_example_parses() {
        let d = Dir::new();
        let text = include_str!("../config/tokend.example.toml");
        // The example points at /etc paths; rewrite the secret path to the temp dir's file.
        let text = text.replace("/etc/tokend/client-secret", "secret");
        let c = d.load(&text).expect("example config is valid");
        assert!(!c.identities.is_empty());
    }

    #[test]
    fn unknown_keys_are_errors_naming_file_and_key() {
        let d = Dir::new();
        let m = message(d.load(&format!("[server]\nlisten = [\"127.0.0.1:1\"]\nlisen = 1\n{MINIMAL}")));
        assert!(m.contains("tokend.toml") && m.contains("lisen"), "{m}");
        let m = message(d.load(&format!("{MINIMAL}\nclient_secret = \"x\"\n")));
        assert!(m.contains("client_secret"), "{m}");
    }

    #[test]
    fn invalid_values_name_the_key() {
        let d = Dir::new();
        let cases = [
            ("[server]\nlisten = [\"0.0.0.0:50342\"]\n", "server.listen[0]", "allow_non_loopback"),
            ("[server]\nlisten = [\"localhost:1\"]\n", "server.listen[0]", "IP:port"),
            ("[server]\nlisten = []\n", "server.listen", "empty"),
            ("[tokens]\nmin_lifetime = \"5 parsecs\"\n", "tokens.min_lifetime", "not a duration"),
            ("[tokens]\nmax_wait = \"5m\"\n", "tokens.max_wait", "out of range"),
            ("[upstream]\nca_file = \"missing.pem\"\n", "upstream.ca_file", "cannot read"),
        ];
        for (prefix, key, what) in cases {
            let m = message(d.load(&format!("{prefix}{MINIMAL}")));
            assert!(m.contains(key) && m.contains(what) && m.contains("tokend.toml"), "{prefix}: {m}");
        }
        let id_cases = [
            ("client_id = \"c\"\ntenant_id = \"t\"\n", "identity[0].client_secret_file", "missing"),
            (
                "client_id = \"c\"\ntenant_id = \"t\"\nclient_secret_file = \"nope\"\n",
                "identity[0].client_secret_file",
                "cannot read",
            ),
            ("tenant_id = \"t\"\nclient_secret_file = \"secret\"\n", "identity[0].client_id", "missing"),
            ("client_id = \"c\"\nclient_secret_file = \"secret\"\n", "identity[0].tenant_id", "missing"),
            (
                "client_id = \"c\"\nclient_secret_file = \"secret\"\ntoken_url = \"http://idp.example/token\"\n",
                "identity[0].token_url",
                "loopback",
            ),
            (
                "client_id = \"c\"\nclient_secret_file = \"secret\"\ntoken_url = \"http://127.0.0.1:9/token\"\napi = \"v3\"\n",
                "identity[0].api",
                "v3",
            ),
            (
                "client_id = \"c\"\ntenant_id = \"t\"\nclient_secret_file = \"secret\"\nresources = [\"a b\"]\n",
                "identity[0].resources[0]",
                "whitespace",
            ),
        ];
        for (body, key, what) in id_cases {
            let m = message(d.load(&format!("[[identity]]\n{body}")));
            assert!(m.contains(key) && m.contains(what), "{body}: {m}");
        }
    }

    #[test]
    fn ambiguous_identities_are_rejected() {
        let d = Dir::new();
        let two = format!(
            "{MINIMAL}\n[[identity]]\nname = \"b\"\ntenant_id = \"t\"\nclient_id = \"C\"\nclient_secret_file = \"secret\"\n"
        );
        let m = message(d.load(&two));
        assert!(m.contains("identity[1].client_id") && m.contains("ambiguous"), "{m}");
    }

    #[test]
    fn v1_and_token_url_and_loopback_http() {
        let d = Dir::new();
        let c = d
            .load("[[identity]]\ntenant_id = \"t\"\nclient_id = \"c\"\nclient_secret_file = \"secret\"\napi = \"v1\"\nauthority_host = \"https://login.example/\"\n")
            .expect("valid");
        assert_eq!(c.identities[0].token_url.as_str(), "https://login.example/t/oauth2/token");
        let c = d
            .load("[[identity]]\nclient_id = \"c\"\nclient_secret_file = \"secret\"\ntoken_url = \"http://localhost:9400/x/token\"\n")
            .expect("valid");
        assert_eq!(c.identities[0].token_url.as_str(), "http://localhost:9400/x/token");
    }

    #[test]
    fn identity_from_azure_environment() {
        let env = |name: &str| match name {
            "AZURE_TENANT_ID" => Some("tid".to_owned()),
            "AZURE_CLIENT_ID" => Some("cid".to_owned()),
            "AZURE_CLIENT_SECRET" => Some("env-secret".to_owned()),
            "AZURE_AUTHORITY_HOST" => Some("https://login.microsoftonline.us".to_owned()),
            _ => None,
        };
        let c = Config::from_toml("", Path::new("/x/tokend.toml"), &env).expect("valid");
        assert_eq!(c.identities[0].client_id, "cid");
        assert_eq!(c.identities[0].token_url.as_str(), "https://login.microsoftonline.us/tid/oauth2/v2.0/token");
        assert!(!format!("{c:?}").contains("env-secret"));
        let m = message(Config::from_toml("", Path::new("/x/tokend.toml"), &no_env));
        assert!(m.contains("AZURE_TENANT_ID") && m.contains("[[identity]]"), "{m}");
    }

    #[test]
    fn federated_and_systemd_credentials() {
        let env = |name: &str| match name {
            "AZURE_TENANT_ID" => Some("tid".to_owned()),
            "AZURE_CLIENT_ID" => Some("cid".to_owned()),
            "AZURE_FEDERATED_TOKEN_FILE" => Some("/var/run/secrets/azure/tokens/token".to_owned()),
            _ => None,
        };
        let c = Config::from_toml("", Path::new("/x/tokend.toml"), &env).expect("valid");
        assert_eq!(c.identities[0].credential.kind(), "federated token");
        let d = Dir::new();
        let m =
            message(d.load("[[identity]]\ntenant_id = \"t\"\nclient_id = \"c\"\nclient_secret_credential = \"s\"\n"));
        assert!(m.contains("identity[0].client_secret_credential") && m.contains("CREDENTIALS_DIRECTORY"), "{m}");
        let creds = d.0.path().to_str().expect("utf8").to_owned();
        let with_dir = move |name: &str| (name == "CREDENTIALS_DIRECTORY").then(|| creds.clone());
        let text = "[[identity]]\ntenant_id = \"t\"\nclient_id = \"c\"\nclient_secret_credential = \"secret\"\n";
        let c = Config::from_toml(text, &d.0.path().join("tokend.toml"), &with_dir).expect("valid");
        assert_eq!(c.identities[0].credential.origin(), "systemd credential secret");
        assert_eq!(c.watched, vec![d.0.path().join("secret")]);
        let m = message(
            d.load("[[identity]]\ntenant_id = \"t\"\nclient_id = \"c\"\nclient_secret_credential = \"../x\"\n"),
        );
        assert!(m.contains("not a credential name"), "{m}");
        let m = message(d.load("[[identity]]\ntenant_id = \"t\"\nclient_id = \"c\"\n"));
        assert!(
            m.contains("certificate_file") && m.contains("federated_token_file"),
            "lists every credential kind: {m}"
        );
    }

    #[test]
    fn readable_secret_file_warns_and_debug_redacts() {
        use std::os::unix::fs::PermissionsExt;
        let d = Dir::new();
        let p = d.0.path().join("secret");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let c = d.load(MINIMAL).expect("valid");
        assert!(c.warnings.iter().any(|w| w.contains("chmod 600")), "{:?}", c.warnings);
        assert!(!format!("{c:?}").contains("s3cret-value"));
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        assert!(d.load(MINIMAL).expect("valid").warnings.is_empty());
    }
}
