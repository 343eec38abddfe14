//! The subcommands: `serve`/`dev` (run the broker), `env`, `token` and `check`.

use std::fmt::Write as _;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use secrecy::{ExposeSecret, SecretString};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::broker::{Broker, load_identity_header};
use crate::config::{Config, ConfigError, IdentityHeaderSource, ServerConfig};
use crate::dialect::{app_service, imds};
use crate::idp::IdpClient;
use crate::resource::Resource;
use crate::server::{self, HostPolicy};
use crate::token::TokenSource;

/// How long in-flight requests get to finish after SIGTERM.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// Resource `tokend check` asks for when an identity has none configured.
pub const CHECK_DEFAULT_RESOURCE: &str = "https://management.azure.com/";

/// A configuration plus the App Service secret, both validated: nothing can fail as a config error after this.
#[derive(Debug)]
pub struct Prepared {
    /// The configuration.
    pub config: Config,
    /// The App Service identity header secret.
    pub identity_header: SecretString,
}

/// Loads (or creates) the identity header and logs the configuration's warnings.
pub fn prepare(mut config: Config) -> Result<Prepared, ConfigError> {
    let identity_header = load_identity_header(&config.server.identity_header, &config.source, &mut config.warnings)?;
    for w in &config.warnings {
        tracing::warn!("{w}");
    }
    Ok(Prepared { config, identity_header })
}

/// The `export` lines for a broker listening on `addr` (never `MSI_ENDPOINT`/`MSI_SECRET`/`IMDS_ENDPOINT`).
pub fn export_lines(addr: SocketAddr, identity_header: &SecretString) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "export IDENTITY_ENDPOINT='http://{addr}{}'", app_service::PATH);
    let _ = writeln!(out, "export IDENTITY_HEADER='{}'", identity_header.expose_secret());
    let _ = writeln!(out, "export AZURE_POD_IDENTITY_AUTHORITY_HOST='http://{addr}'");
    out
}

/// `tokend env`: the export lines for the broker of `server`. Only reads the identity header file (it
/// is created by `tokend serve`), so any user who may read that file can run it.
pub fn env(server: &ServerConfig) -> anyhow::Result<String> {
    let header = match &server.identity_header {
        IdentityHeaderSource::File(path) => {
            std::fs::read_to_string(path).map(|s| s.trim().to_owned()).map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => anyhow::anyhow!(
                    "server.identity_header_file {} does not exist yet; `tokend serve` creates it",
                    path.display()
                ),
                _ => anyhow::anyhow!("cannot read server.identity_header_file {}: {e}", path.display()),
            })?
        }
        IdentityHeaderSource::Generated => anyhow::bail!("this configuration has no identity header file"),
    };
    anyhow::ensure!(!header.is_empty(), "server.identity_header_file is empty");
    Ok(export_lines(client_addr(server), &header.into()))
}

/// The address local clients should use: the first loopback listen address, else the first one.
pub fn client_addr(server: &ServerConfig) -> SocketAddr {
    let l = &server.listen;
    l.iter()
        .find(|a| a.ip().is_loopback())
        .or_else(|| l.first())
        .copied()
        .unwrap_or_else(|| crate::config::DEFAULT_LISTEN.parse().expect("DEFAULT_LISTEN is a valid socket address"))
}

/// Runs the broker until `shutdown` resolves. `on_listening` gets the bound addresses once every
/// listener is up (before the first token is fetched, so probes are answered at once).
/// Every task runs on `tracker` and stops when `cancel` is cancelled (which `run` does on `shutdown`).
pub async fn run(
    prepared: Prepared,
    reload_from: Option<std::path::PathBuf>,
    tracker: TaskTracker,
    cancel: CancellationToken,
    on_listening: impl FnOnce(&[SocketAddr]),
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let Prepared { config, identity_header } = prepared;
    let source: Arc<dyn TokenSource> =
        Arc::new(IdpClient::new(&config.upstream).context("cannot set up the HTTPS client")?);
    let listeners = server::bind(&config.server.listen).await?;
    let bound: Vec<SocketAddr> = listeners.iter().filter_map(|l| l.local_addr().ok()).collect();
    let broker = Broker::start(&config, identity_header, source, &tracker, &cancel);
    tracker.spawn(crate::reload::run(reload_from, config.clone(), broker.clone(), cancel.clone()));
    let app = server::router(broker, HostPolicy::for_listen(&bound));
    let serving = tracker.spawn(server::serve(listeners, app, cancel.clone()));
    let identities: Vec<&str> = config.identities.iter().map(|i| i.name.as_str()).collect();
    tracing::info!(listen = ?bound, identities = ?identities, "tokend serving");
    on_listening(&bound);
    tokio::select! {
        () = shutdown => {}
        joined = serving => {
            cancel.cancel();
            return match joined {
                Ok(Ok(())) => Err(anyhow::anyhow!("the listeners stopped unexpectedly")),
                Ok(Err(e)) => Err(e.into()),
                Err(e) => Err(anyhow::anyhow!("the server task failed: {e}")),
            };
        }
    }
    cancel.cancel();
    tracker.close();
    if tokio::time::timeout(SHUTDOWN_GRACE, tracker.wait()).await.is_err() {
        tracing::warn!(grace_s = SHUTDOWN_GRACE.as_secs(), "in-flight work did not finish within the grace period");
    }
    tracing::info!("tokend stopped");
    Ok(())
}

/// `tokend token`: asks the running broker (IMDS route) and returns only the access token.
pub async fn token(server: &ServerConfig, resource: &str, client_id: Option<&str>) -> anyhow::Result<String> {
    let addr = client_addr(server);
    let mut url = reqwest::Url::parse(&format!("http://{addr}{}", imds::PATH))?;
    url.query_pairs_mut().append_pair("api-version", "2018-02-01").append_pair("resource", resource);
    if let Some(id) = client_id {
        url.query_pairs_mut().append_pair("client_id", id);
    }
    let client = reqwest::Client::builder().no_proxy().timeout(Duration::from_secs(30)).build()?;
    let resp = client
        .get(url)
        .header("Metadata", "true")
        .send()
        .await
        .with_context(|| format!("cannot reach tokend at {addr}; is `tokend serve` running?"))?;
    let status = resp.status();
    let body: serde_json::Value =
        resp.json().await.with_context(|| format!("tokend at {addr} answered HTTP {status} without JSON"))?;
    if !status.is_success() {
        let desc = body.get("error_description").and_then(|v| v.as_str()).unwrap_or("no description");
        anyhow::bail!("tokend answered HTTP {status}: {desc}");
    }
    body.get("access_token")
        .and_then(|v| v.as_str())
        .map(str::to_owned)
        .ok_or_else(|| anyhow::anyhow!("tokend's answer has no access_token"))
}

/// One line of `tokend check`.
#[derive(Debug)]
pub struct CheckLine {
    /// Whether a token was obtained.
    pub ok: bool,
    /// The line to print.
    pub text: String,
}

/// `tokend check`: one upstream request per identity, straight to the IdP.
pub async fn check(config: &Config, resource: Option<&str>) -> anyhow::Result<Vec<CheckLine>> {
    let idp = IdpClient::new(&config.upstream).context("cannot set up the HTTPS client")?;
    let mut lines = Vec::new();
    for identity in &config.identities {
        let resource = match resource {
            Some(r) => Resource::parse(r).with_context(|| format!("--resource {r:?}"))?,
            None => identity.resources.first().cloned().unwrap_or(Resource::parse(CHECK_DEFAULT_RESOURCE)?),
        };
        let what = format!(
            "identity {:?} (client id {}, {} from {}, {})",
            identity.name,
            identity.client_id,
            identity.credential.kind(),
            identity.credential.origin(),
            identity.token_url
        );
        let line = match idp.fetch(identity, &resource).await {
            Ok(t) => CheckLine {
                ok: true,
                text: format!("ok    {what}: token for {resource} valid for {}s", t.expires_in.as_secs()),
            },
            Err(e) => CheckLine { ok: false, text: format!("FAIL  {what}: {resource}: {e}") },
        };
        lines.push(line);
        if let Some(skew) = idp.last_clock_skew().filter(|s| s.unsigned_abs() > crate::idp::MAX_CLOCK_SKEW.as_secs()) {
            lines.push(CheckLine {
                ok: true,
                text: format!(
                    "warn  identity {:?}: the identity provider's clock differs from this host's by {skew}s; \
                     client assertions may be rejected (AADSTS700024): fix time synchronisation",
                    identity.name
                ),
            });
        }
    }
    Ok(lines)
}
