//! The daemon's lifecycle, shared by `tokend serve` and `tokend dev`: **prepare** (every configuration
//! error, before anything is bound), **probe** (transparent IMDS never shadows a real one), **bind**
//! (every listener, before anything is served), **serve** (the broker, the reloader), **drain** (on
//! SIGTERM/SIGINT, bounded). systemd notification and the metrics listener belong here.
//!
//! Submodules: [`reload`] (credential files polled, SIGHUP reloads the whole file) and [`signal`]
//! (SIGTERM/SIGINT).

pub(crate) mod reload;
pub(crate) mod signal;

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
use crate::error::Error;
use crate::idp::IdpClient;
use crate::net::is_imds_ip;
use crate::server::{self, HostPolicy};
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
    let audit = match &config.audit_path {
        None => None,
        Some(path) => Some(AuditLog::open(path).map_err(|e| ConfigError::Invalid {
            path: config.source.clone(),
            key: "audit.path".to_owned(),
            message: format!("cannot open {}: {e}", path.display()),
        })?),
    };
    for w in &config.warnings {
        tracing::warn!("{w}");
    }
    Ok(Prepared { config, identity_header, audit })
}

/// Makes the process non-dumpable before it reads a secret: no core dumps, and processes of the same
/// user can no longer ptrace it or read `/proc/<pid>/mem` (the cache holds tokens). Only root (or
/// `CAP_SYS_PTRACE`) still can.
pub(crate) fn harden() -> Result<(), Error> {
    nix::sys::prctl::set_dumpable(false)
        .map_err(|e| Error::Runtime(anyhow::anyhow!("cannot turn off PR_SET_DUMPABLE: {e}")))
}

/// `tokend serve`: loads `path`, probes transparent IMDS listeners, then runs until SIGTERM/SIGINT.
pub(crate) async fn serve(path: &Path) -> Result<(), Error> {
    harden()?;
    let prepared = prepare(Config::load(path)?)?;
    // Transparent IMDS: never shadow a metadata service that already answers there.
    for addr in prepared.config.server.listen.iter().filter(|a| is_imds_ip(a.ip())) {
        crate::transparent::probe(*addr).await.map_err(|e| Error::Usage(e.to_string()))?;
    }
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
    let Prepared { config, identity_header, audit } = prepared;
    let source: Arc<dyn TokenSource> =
        Arc::new(IdpClient::new(&config.upstream).context("cannot set up the HTTPS client")?);
    let listeners = server::bind(&config.server).await?;
    let bound: Vec<SocketAddr> = listeners.iter().filter_map(server::Listener::tcp_addr).collect();
    let described: Vec<String> = listeners.iter().map(server::Listener::describe).collect();
    let lookup_processes = audit.is_some();
    let broker = Broker::start(&config, identity_header, audit, source, &tracker, &cancel);
    tracker.spawn(reload::run(reload_from, config.clone(), broker.clone(), cancel.clone()));
    let app = server::router(broker, HostPolicy::for_listen(&bound));
    let limits = server::Limits {
        max_connections_per_caller: config.server.max_connections_per_caller,
        lookup_processes,
        ..server::Limits::default()
    };
    let serving = tracker.spawn(server::serve(listeners, app, cancel.clone(), limits));
    let identities: Vec<&str> = config.identities.iter().map(|i| i.name.as_str()).collect();
    tracing::info!(listen = ?described, identities = ?identities, "tokend serving");
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
