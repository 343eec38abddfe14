//! Process signals: SIGTERM and SIGINT start a graceful shutdown. SIGHUP (whose default action would
//! kill the process) is caught and logged: live reload is not implemented yet.

use tokio::signal::unix::{SignalKind, signal};

/// Resolves at the first SIGTERM or SIGINT.
pub async fn shutdown() {
    let (Ok(mut term), Ok(mut int), Ok(mut hup)) =
        (signal(SignalKind::terminate()), signal(SignalKind::interrupt()), signal(SignalKind::hangup()))
    else {
        tracing::error!("cannot install signal handlers; stop tokend with SIGKILL");
        std::future::pending::<()>().await;
        return;
    };
    loop {
        tokio::select! {
            _ = term.recv() => return tracing::info!("SIGTERM received, shutting down"),
            _ = int.recv() => return tracing::info!("SIGINT received, shutting down"),
            _ = hup.recv() => tracing::warn!("SIGHUP received: live reload is not supported yet; restart tokend to apply a new configuration"),
        }
    }
}
