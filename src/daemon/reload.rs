//! Live reload without restarts or dropped requests.
//!
//! - Credential files (client secrets, certificates, PFX passwords; [`Config::watched`]) are polled every
//!   [`POLL_INTERVAL`]: a changed content triggers a reload, so a rotated secret or certificate is picked
//!   up within seconds.
//! - SIGHUP reloads the whole file the same way, and reopens the audit log (after a rotation moved it).
//! - Either way systemd hears `RELOADING=1` … `READY=1`, and `tokend reload` the outcome ([`super::systemd`]).
//!
//! A reload validates the new configuration completely first ([`Config::load`]: files read, certificates
//! loaded and test-signed). A configuration that fails is rejected, loudly, and the previous one keeps
//! serving. An accepted one is applied live: identities (added, removed, changed credentials — failing
//! keys retry at once, valid tokens are refreshed with the new credential on schedule), configured
//! resources and `[tokens]`. `[server]` and `[upstream]` changes need a restart; a reload says which keys changed.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

use crate::broker::Broker;
use crate::config::Config;
use crate::secret::fingerprint;

/// How long a SIGHUP waits for the audit log's writer to reopen the file.
const REOPEN_WAIT: Duration = Duration::from_secs(2);

/// How often credential files are checked for changes.
pub(crate) const POLL_INTERVAL: Duration = Duration::from_secs(2);

/// Each file's content fingerprint, of its bytes (`None` when unreadable): a change confined to bytes
/// that are not UTF-8, as in a rotated binary PKCS#12 file, is a change.
fn stamps(paths: &[PathBuf]) -> Vec<Option<String>> {
    paths.iter().map(|p| std::fs::read(p).ok().map(|b| fingerprint(&b))).collect()
}

/// Settings a reload cannot apply live.
fn restart_only_changes(old: &Config, new: &Config) -> Vec<&'static str> {
    let mut out = Vec::new();
    if old.server.listen != new.server.listen {
        out.push("server.listen");
    }
    if old.server.identity_header != new.server.identity_header {
        out.push("server.identity_header_file");
    }
    if old.server.unix_socket != new.server.unix_socket {
        out.push("server.unix_socket");
    }
    if old.server.max_connections_per_caller != new.server.max_connections_per_caller {
        out.push("server.max_connections_per_caller");
    }
    if old.audit.as_ref().map(|a| &a.path) != new.audit.as_ref().map(|a| &a.path) {
        out.push("audit.path");
    }
    if old.audit.as_ref().map(|a| a.on_failure) != new.audit.as_ref().map(|a| a.on_failure) {
        out.push("audit.on_failure");
    }
    if old.metrics_listen != new.metrics_listen {
        out.push("metrics.listen");
    }
    if old.upstream.timeout != new.upstream.timeout {
        out.push("upstream.timeout");
    }
    if old.upstream.ca_pem != new.upstream.ca_pem {
        out.push("upstream.ca_file");
    }
    out
}

/// Watches `path`'s credential files and SIGHUP until `cancel`; `None` (tokend dev) only keeps SIGHUP
/// from killing the process.
pub(crate) async fn run(path: Option<PathBuf>, initial: Config, broker: Arc<Broker>, cancel: CancellationToken) {
    let mut hup = match signal(SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::error!(error = %e, "cannot handle SIGHUP; reload by restarting");
            None
        }
    };
    let mut current = initial;
    let mut seen = stamps(&current.watched);
    let mut seq = 0u64;
    let mut tick = tokio::time::interval(POLL_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let hangup = async {
            match hup.as_mut() {
                Some(h) => h.recv().await,
                None => std::future::pending().await,
            }
        };
        let reason = tokio::select! {
            () = cancel.cancelled() => return,
            _ = hangup => {
                // A rotation's postrotate: the audit log is reopened whether or not the file reloads,
                // before the verdict (`tokend reload` returns once the old file is no longer written).
                if let Some(log) = broker.audit() {
                    let ticket = log.reopen();
                    let reopened = async {
                        while !log.reopened(ticket) {
                            tokio::time::sleep(Duration::from_millis(2)).await;
                        }
                    };
                    if tokio::time::timeout(REOPEN_WAIT, reopened).await.is_err() {
                        tracing::warn!("the audit log was not reopened within 2 s; its writer still will");
                    }
                }
                "SIGHUP".to_owned()
            }
            _ = tick.tick() => {
                let now = stamps(&current.watched);
                if now == seen {
                    continue;
                }
                let changed: Vec<String> = current
                    .watched
                    .iter()
                    .zip(now.iter().zip(&seen))
                    .filter(|(_, (a, b))| a != b)
                    .map(|(p, _)| p.display().to_string())
                    .collect();
                seen = now;
                format!("changed: {}", changed.join(", "))
            }
        };
        let Some(path) = path.as_deref() else {
            tracing::warn!("{reason} ignored: tokend dev has no configuration file to reload");
            continue;
        };
        seq += 1;
        super::systemd::reloading();
        match reload(path, &current, &broker, &reason) {
            Ok(new) => {
                crate::metrics::get().reloaded(true);
                let names: Vec<&str> = new.identities.iter().map(|i| i.name.as_str()).collect();
                super::systemd::reloaded(seq, &reason, true, &format!("identities {}", names.join(", ")));
                current = new;
                seen = stamps(&current.watched);
            }
            Err(e) => {
                crate::metrics::get().reloaded(false);
                super::systemd::reloaded(seq, &reason, false, &e);
            }
        }
    }
}

/// Loads and applies `path`; `Err` is why it was rejected (the previous configuration keeps serving).
fn reload(path: &Path, current: &Config, broker: &Broker, reason: &str) -> Result<Config, String> {
    let new = match Config::load(path) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(
                reason,
                error = %e,
                "configuration reload REJECTED; still serving with the previous configuration and credentials"
            );
            return Err(e.to_string());
        }
    };
    for w in &new.warnings {
        tracing::warn!("{w}");
    }
    let restart = restart_only_changes(current, &new);
    if !restart.is_empty() {
        tracing::warn!(keys = ?restart, "these settings changed but only take effect after a restart");
    }
    broker.reload(&new);
    let names: Vec<&str> = new.identities.iter().map(|i| i.name.as_str()).collect();
    tracing::info!(reason, identities = ?names, "configuration reloaded");
    Ok(new)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_see_a_change_in_non_utf8_bytes() {
        let d = tempfile::tempdir().expect("tempdir");
        let (pfx, gone) = (d.path().join("cert.pfx"), d.path().join("missing"));
        std::fs::write(&pfx, b"\x30\x82\xff\x01").expect("write");
        let before = stamps(&[pfx.clone(), gone.clone()]);
        std::fs::write(&pfx, b"\x30\x82\xfe\x01").expect("rotate");
        let after = stamps(&[pfx, gone]);
        assert_ne!(before[0], after[0]);
        assert_eq!((before[1].as_ref(), after[1].as_ref()), (None, None));
    }
}
