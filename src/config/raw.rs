//! The file as written: what serde reads. Every table denies unknown keys, so a typo is an error.

use std::path::PathBuf;

use serde::Deserialize;

/// The file as written. Every table denies unknown keys.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
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
    /// `[access]`: per-caller policy; absent, every local caller may get every token.
    pub access: Option<RawAccess>,
    /// `[audit]`
    pub audit: Option<RawAudit>,
    /// `[metrics]`
    pub metrics: Option<RawMetrics>,
}

/// `[metrics]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawMetrics {
    /// The Prometheus listener, e.g. `127.0.0.1:9464`.
    pub listen: Option<String>,
    /// Allow a non-loopback metrics address (metrics name identities and resources, never tokens).
    pub allow_non_loopback: Option<bool>,
}

/// `[audit]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAudit {
    /// The JSON-lines file, appended to (created with mode 0640).
    pub path: Option<PathBuf>,
    /// `"drop"` (default) or `"refuse"`: what a request whose line cannot be audited gets.
    pub on_failure: Option<String>,
}

/// `[access]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAccess {
    /// `"allow"` (default) or `"deny"` when no rule matches the caller.
    pub default: Option<String>,
    /// `"deny"` (default) or `"allow"` for callers the kernel could not identify.
    pub unknown: Option<String>,
    /// Requests per caller: `"20/s"`, `"600/m"`, `"1000/h"`.
    pub rate_limit: Option<String>,
    /// `[[access.rule]]`
    #[serde(default)]
    pub rule: Vec<RawRule>,
}

/// `[[access.rule]]`: who (any of uids, users, gids, groups) may get what (identities × resources).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRule {
    /// User ids.
    #[serde(default)]
    pub uids: Vec<u32>,
    /// User names, resolved at load.
    #[serde(default)]
    pub users: Vec<String>,
    /// Group ids: their members (primary and listed), resolved at load.
    #[serde(default)]
    pub gids: Vec<u32>,
    /// Group names: their members (primary and listed), resolved at load.
    #[serde(default)]
    pub groups: Vec<String>,
    /// Identity names, or `["*"]`.
    #[serde(default)]
    pub identities: Vec<String>,
    /// Resources, or `["*"]`.
    #[serde(default)]
    pub resources: Vec<String>,
}

/// A list, or one string standing for a list of one (`listen = "127.0.0.1:50342"`).
fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Vec<String>>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(
        match OneOrMany::deserialize(d)
            .map_err(|_| serde::de::Error::custom("expected an address \"IP:port\" or a list of them"))?
        {
            OneOrMany::One(s) => Some(vec![s]),
            OneOrMany::Many(v) => Some(v),
        },
    )
}

/// `[server]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawServer {
    /// Addresses to listen on (`IP:port`); loopback only unless `allow_non_loopback`. One address may
    /// be given as a plain string.
    #[serde(default, deserialize_with = "one_or_many")]
    pub listen: Option<Vec<String>>,
    /// Explicit opt-in to listening on a non-loopback address.
    pub allow_non_loopback: Option<bool>,
    /// The App Service identity header secret; created (mode 0600) if missing.
    pub identity_header_file: Option<PathBuf>,
    /// A unix socket to serve on as well, e.g. `/run/tokend/tokend.sock`.
    pub unix_socket: Option<PathBuf>,
    /// The socket's mode, octal (default `"0660"`).
    pub socket_mode: Option<String>,
    /// The socket's group: a name or a numeric id, resolved when the configuration is loaded.
    pub socket_group: Option<String>,
    /// Open connections per caller (uid), over all listeners (default 256).
    pub max_connections_per_caller: Option<usize>,
}

/// `[tokens]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTokens {
    /// Never hand out a token with less than this left (default `5m`).
    pub min_lifetime: Option<String>,
    /// Longest a caller waits for the IdP when nothing valid is cached (default `8s`), then 503.
    pub max_wait: Option<String>,
    /// An on-demand resource unused this long stops being refreshed and is dropped (default `30m`).
    pub idle_timeout: Option<String>,
    /// On-demand resources one caller (uid) may have cached at once (default 64).
    pub max_on_demand_per_caller: Option<usize>,
    /// On-demand resources cached at once, all callers together (default 1024).
    pub max_on_demand: Option<usize>,
    /// How fast one caller may add new on-demand resources, `N/s|m|h` (default `64/m`).
    pub on_demand_rate: Option<String>,
}

/// `[upstream]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawUpstream {
    /// Timeout of one token request, connect included (default `10s`).
    pub timeout: Option<String>,
    /// Extra CA certificates (PEM) trusted for https token URLs, on top of the system roots.
    pub ca_file: Option<PathBuf>,
}

/// `[[identity]]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawIdentity {
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
    /// Certificate: PEM (certificate + unencrypted key) or PKCS#12 (`.pfx`/`.p12`); with
    /// `certificate_key`, a PEM of the certificate (chain allowed) alone.
    pub certificate_file: Option<PathBuf>,
    /// The certificate's private key on a PKCS#11 token, as an RFC 7512 URI with `module-path` and
    /// `pin-source` (`file:PATH` or `credential:NAME`): each assertion is signed on the token.
    pub certificate_key: Option<String>,
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
