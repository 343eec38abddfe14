//! The daemon's lifecycle, shared by `tokend serve` and `tokend dev`: **prepare** (every configuration
//! error, before anything is bound), **probe** (transparent IMDS never shadows a real one), **bind**
//! (every listener, the metrics one too, before anything is served or fetched), **serve** (the broker,
//! the reloader), **drain** (on SIGTERM/SIGINT, bounded). systemd notification and the metrics listener
//! belong here.
//!
//! Submodules: [`reload`] (credential files polled, SIGHUP reloads the whole file), [`signal`]
//! (SIGTERM/SIGINT) and [`systemd`] (readiness, status, reload outcome, watchdog).

pub(crate) mod reload;
pub(crate) mod signal;
pub(crate) mod systemd;

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use secrecy::SecretString;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::audit::AuditLog;
use crate::broker::{Broker, load_identity_header};
use crate::config::{Config, ConfigError};
use crate::dialect::Dialect;
use crate::error::Error;
use crate::idp::IdpClient;
use crate::net::is_imds_ip;
use crate::server;
use crate::token::TokenSource;

/// How long in-flight work gets to finish after SIGTERM.
pub(crate) const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// A configuration plus the App Service secret, both validated: nothing can fail as a config error after this.
#[derive(Debug)]
pub(crate) struct Prepared {
    /// The configuration.
    pub(crate) config: Config,
    /// The App Service identity header secret.
    pub(crate) identity_header: SecretString,
    /// The audit log, opened.
    pub(crate) audit: Option<AuditLog>,
    /// Listening sockets systemd passed (socket activation); none for `tokend dev`.
    pub(crate) inherited: server::Inherited,
}

/// Loads (or creates) the identity header, checks that the unix socket path is free or a socket, and
/// logs the configuration's warnings.
pub(crate) fn prepare(mut config: Config) -> Result<Prepared, ConfigError> {
    let identity_header = load_identity_header(&config.server.identity_header, &config.source, &mut config.warnings)?;
    if let Some(unix) = &config.server.unix_socket {
        server::check_unix_path(&unix.path).map_err(|message| ConfigError::Invalid {
            path: config.source.clone(),
            key: "server.unix_socket".to_owned(),
            message,
        })?;
    }
    let audit = match &config.audit {
        None => None,
        Some(a) => Some(AuditLog::open(&a.path, a.on_failure).map_err(|e| ConfigError::Invalid {
            path: config.source.clone(),
            key: "audit.path".to_owned(),
            message: format!("cannot open {}: {e}", a.path.display()),
        })?),
    };
    for w in &config.warnings {
        tracing::warn!("{w}");
    }
    Ok(Prepared { config, identity_header, audit, inherited: server::Inherited::default() })
}

/// Makes the process non-dumpable before it reads a secret: no core dumps, and processes of the same
/// user can no longer ptrace it or read `/proc/<pid>/mem` (the cache holds tokens). Only root (or
/// `CAP_SYS_PTRACE`) still can.
pub(crate) fn harden() -> Result<(), Error> {
    nix::sys::prctl::set_dumpable(false)
        .map_err(|e| Error::Runtime(anyhow::anyhow!("cannot turn off PR_SET_DUMPABLE: {e}")))
}

/// Serves `GET /metrics` (Prometheus text format 0.0.4) on its own listener until `cancel`, behind the
/// token listeners' Host guard (`server::host_guard`: it names identities and configured resources, so a
/// page must not read it through DNS rebinding; Prometheus addresses it by IP or as localhost).
async fn serve_metrics(listener: tokio::net::TcpListener, broker: Arc<Broker>, cancel: CancellationToken) {
    use axum::http::header;
    use axum::response::IntoResponse;
    let scrape = move |headers: axum::http::HeaderMap| {
        let broker = broker.clone();
        async move {
            if let Some(refused) = server::host_guard(&headers) {
                return refused.into_response(Dialect::Imds);
            }
            let text = crate::metrics::get().encode(|s| {
                for t in broker.readiness() {
                    s.token(&t.identity, t.resource.as_str(), t.remaining, t.ready);
                }
                for identity in broker.snapshot().identities.iter() {
                    if let Some(at) = identity.credential.expires() {
                        s.credential_expiry(&identity.name, crate::clock::unix_secs(at));
                    }
                }
                s.on_demand(broker.cache().on_demand());
            });
            ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text).into_response()
        }
    };
    let app = axum::Router::new().route("/metrics", axum::routing::get(scrape));
    let addr = listener.local_addr().map(|a| a.to_string()).unwrap_or_default();
    tracing::info!(%addr, "metrics at http://{addr}/metrics");
    if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(cancel.cancelled_owned()).await {
        tracing::error!(error = %e, "the metrics listener failed");
    }
}

/// `tokend serve`: loads `path`, probes transparent IMDS listeners, then runs until SIGTERM/SIGINT.
pub(crate) async fn serve(path: &Path) -> Result<(), Error> {
    harden()?;
    let mut prepared = prepare(Config::load(path)?)?;
    let inherited = server::Inherited::from_systemd()
        .map_err(|e| Error::Runtime(anyhow::anyhow!("cannot take the sockets systemd passed: {e}")))?;
    let unclaimed = inherited.unclaimed(&prepared.config.server);
    if !unclaimed.is_empty() {
        return Err(Error::Usage(format!(
            "{}: systemd passed sockets for {} that server.listen / server.unix_socket do not name; add them there",
            prepared.config.source,
            unclaimed.join(", ")
        )));
    }
    // Transparent IMDS: never shadow a metadata service that already answers there. A socket systemd
    // passed was probed by its unit (`tokend transparent-imds setup` in ExecStartPre=).
    for addr in prepared.config.server.listen.iter().filter(|a| is_imds_ip(a.ip()) && !inherited.has_tcp(a)) {
        crate::transparent::probe(*addr).await.map_err(|e| Error::Usage(e.to_string()))?;
    }
    prepared.inherited = inherited;
    let (tracker, cancel) = (TaskTracker::new(), CancellationToken::new());
    run(prepared, Some(path.to_path_buf()), tracker, cancel, |_| {}, signal::shutdown()).await?;
    Ok(())
}

/// Runs the broker until `shutdown` resolves. `on_listening` gets the bound addresses once every
/// listener is up (before the first token is fetched, so probes are answered at once). `reload_from`
/// is the file a reload reads (`None` for `tokend dev`). Every task runs on `tracker` and stops when
/// `cancel` is cancelled (which `run` does on `shutdown`).
pub(crate) async fn run(
    prepared: Prepared,
    reload_from: Option<PathBuf>,
    tracker: TaskTracker,
    cancel: CancellationToken,
    on_listening: impl FnOnce(&[SocketAddr]),
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let Prepared { config, identity_header, audit, inherited } = prepared;
    let source: Arc<dyn TokenSource> =
        Arc::new(IdpClient::new(&config.upstream).context("cannot set up the HTTPS client")?);
    let listeners = server::bind(&config.server, inherited).await?;
    // With the others, before the broker starts: a bad metrics address must fail before any IdP call.
    let metrics = match config.metrics_listen {
        None => None,
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| anyhow::anyhow!("cannot listen on metrics.listen {addr}: {e}"))?,
        ),
    };
    let bound: Vec<SocketAddr> = listeners.iter().filter_map(server::Listener::tcp_addr).collect();
    let described: Vec<String> = listeners.iter().map(server::Listener::describe).collect();
    let lookup_processes = audit.is_some();
    let broker = Broker::start(&config, identity_header, audit, source, &tracker, &cancel);
    tracker.spawn(reload::run(reload_from, config.clone(), broker.clone(), cancel.clone()));
    let check = match (bound.first(), &config.server.unix_socket) {
        (Some(addr), _) => systemd::SelfCheck::Tcp(*addr),
        (None, Some(unix)) => systemd::SelfCheck::Unix(unix.path.clone()),
        (None, None) => systemd::SelfCheck::None,
    };
    tracker.spawn(systemd::readiness(broker.clone(), described.join(", "), cancel.clone()));
    tracker.spawn(systemd::watchdog(broker.clone(), check, cancel.clone()));
    let metrics_broker = broker.clone();
    let app = server::router(broker);
    let limits = server::Limits {
        max_connections_per_caller: config.server.max_connections_per_caller,
        lookup_processes,
        ..server::Limits::default()
    };
    let serving = tracker.spawn(server::serve(listeners, app, cancel.clone(), limits));
    if let Some(metrics) = metrics {
        tracker.spawn(serve_metrics(metrics, metrics_broker, cancel.clone()));
    }
    let identities: Vec<&str> = config.identities.iter().map(|i| i.name.as_str()).collect();
    tracing::info!(listen = ?described, identities = ?identities, "tokend serving");
    on_listening(&bound);
    tokio::select! {
        () = shutdown => systemd::notify(&[sd_notify::NotifyState::Stopping]),
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
