//! systemd integration, all of it a no-op when tokend is not run by systemd (no `NOTIFY_SOCKET`,
//! `WATCHDOG_USEC` or `RUNTIME_DIRECTORY`):
//!
//! - **Readiness**: `READY=1` once every configured resource has a servable token (what `/readyz`
//!   says), with `STATUS=` saying what it waits for, then a short summary while serving.
//! - **Reloads**: `RELOADING=1` + `MONOTONIC_USEC` before a reload, `READY=1` after it, whether it was
//!   applied or rejected; the outcome also goes to `$RUNTIME_DIRECTORY/reload-status`, which `tokend
//!   reload` (the unit's `ExecReload=`) waits for, so that `systemctl reload` fails when the new
//!   configuration is rejected.
//! - **Shutdown**: `STOPPING=1`.
//! - **Watchdog**: `WATCHDOG=1` every half `WATCHDOG_USEC`, only while a request to tokend's own
//!   `/healthz` is answered (the runtime, an accept loop and the HTTP stack work) and every refresher
//!   task is alive; a wedged or stopped process stops pinging and systemd restarts it.
//!
//! The environment is only read, never changed (`std::env::remove_var` is not thread-safe).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use sd_notify::NotifyState;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use crate::broker::Broker;
use crate::token::PinnedState;

/// The file the reload outcome is written to, in `$RUNTIME_DIRECTORY`.
pub(crate) const RELOAD_STATUS_FILE: &str = "reload-status";

/// Sends `states` to systemd if it listens; a failure is logged, never fatal.
pub(crate) fn notify(states: &[NotifyState<'_>]) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!(error = %e, "cannot notify systemd");
    }
}

/// `RELOADING=1` with the time, as `Type=notify-reload` wants it.
pub(crate) fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => notify(&[NotifyState::Reloading, now]),
        Err(_) => notify(&[NotifyState::Reloading]),
    }
}

/// How a reload ended, for `READY=1` and for `tokend reload`.
pub(crate) fn reloaded(seq: u64, reason: &str, applied: bool, message: &str) {
    let status = if applied {
        "serving; configuration reloaded".to_owned()
    } else {
        format!("serving the previous configuration; reload rejected: {message}")
    };
    notify(&[NotifyState::Ready, NotifyState::Status(&status)]);
    if let Some(dir) = runtime_directory() {
        let outcome = if applied { "applied" } else { "rejected" };
        let line =
            format!("{} {seq} {} {outcome} {}\n", std::process::id(), reason.replace(' ', "_"), one_line(message));
        if let Err(e) = write_atomically(&dir.join(RELOAD_STATUS_FILE), &line) {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot write the reload status for `tokend reload`");
        }
    }
}

/// The first directory of `$RUNTIME_DIRECTORY` (systemd's `RuntimeDirectory=`).
pub(crate) fn runtime_directory() -> Option<PathBuf> {
    let dirs = std::env::var_os("RUNTIME_DIRECTORY")?;
    let first = dirs.to_str()?.split(':').next()?.to_owned();
    (!first.is_empty()).then(|| PathBuf::from(first))
}

fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn write_atomically(path: &Path, text: &str) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(tmp, path)
}

/// One reload outcome as `tokend reload` reads it back: `PID SEQ REASON OUTCOME MESSAGE`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ReloadStatus {
    /// The daemon's pid.
    pub(crate) pid: u32,
    /// Its reload counter.
    pub(crate) seq: u64,
    /// What triggered it (`SIGHUP`, or a changed credential file).
    pub(crate) reason: String,
    /// Applied or rejected.
    pub(crate) applied: bool,
    /// The rejection, or a summary.
    pub(crate) message: String,
}

impl ReloadStatus {
    /// Parses the file's one line.
    pub(crate) fn parse(text: &str) -> Option<Self> {
        let mut parts = text.trim_end().splitn(5, ' ');
        let pid = parts.next()?.parse().ok()?;
        let seq = parts.next()?.parse().ok()?;
        let reason = parts.next()?.to_owned();
        let applied = match parts.next()? {
            "applied" => true,
            "rejected" => false,
            _ => return None,
        };
        Some(Self { pid, seq, reason, applied, message: parts.next().unwrap_or("").to_owned() })
    }
}

/// Where the watchdog's self-check sends its request: the first listener.
#[derive(Debug, Clone)]
pub(crate) enum SelfCheck {
    /// A TCP listener.
    Tcp(std::net::SocketAddr),
    /// The unix socket.
    Unix(PathBuf),
    /// Nothing to check (no listener).
    None,
}

/// Keeps `STATUS=` current and sends `READY=1` once every configured resource is cached, until `cancel`.
pub(crate) async fn readiness(broker: Arc<Broker>, listening: String, cancel: CancellationToken) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    let mut ready = false;
    let mut last = String::new();
    loop {
        let states = broker.readiness();
        let becomes_ready = !ready && states.iter().all(|s| s.ready);
        ready |= becomes_ready;
        let text = status_text(&states, ready, &listening);
        if becomes_ready {
            notify(&[NotifyState::Ready, NotifyState::Status(&text)]);
            tracing::info!(status = %text, "ready: systemd notified");
            last = text;
        } else if text != last {
            notify(&[NotifyState::Status(&text)]);
            last = text;
        }
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(Duration::from_millis(250)) => {}
        }
    }
}

/// The `STATUS=` line: what start-up waits for, or a summary while serving.
pub(crate) fn status_text(states: &[PinnedState], ready: bool, listening: &str) -> String {
    let pending: Vec<&PinnedState> = states.iter().filter(|s| !s.ready).collect();
    let list = |pending: &[&PinnedState]| {
        let mut parts: Vec<String> = pending
            .iter()
            .take(3)
            .map(|s| {
                let why = s.problem.as_deref().unwrap_or("first request in flight");
                format!("{} for identity {} ({why})", s.resource, s.identity)
            })
            .collect();
        if pending.len() > 3 {
            parts.push(format!("and {} more", pending.len() - 3));
        }
        parts.join(", ")
    };
    match (ready, pending.is_empty()) {
        (false, false) => format!("waiting for {} of {} tokens: {}", pending.len(), states.len(), list(&pending)),
        (_, true) => format!("serving on {listening}; {} configured tokens cached", states.len()),
        (true, false) => format!(
            "serving on {listening}; {} of {} configured tokens not servable: {}",
            pending.len(),
            states.len(),
            list(&pending)
        ),
    }
}

/// Pings the systemd watchdog every half `WATCHDOG_USEC` while tokend is healthy, until `cancel`.
pub(crate) async fn watchdog(broker: Arc<Broker>, check: SelfCheck, cancel: CancellationToken) {
    let Some(timeout) = sd_notify::watchdog_enabled() else { return };
    let period = timeout / 2;
    let limit = (timeout / 4).min(Duration::from_secs(5));
    tracing::info!(watchdog_s = timeout.as_secs_f32(), "systemd watchdog enabled");
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let answered = tokio::time::timeout(limit, self_check(&check)).await;
        let alive = broker.cache().refreshers_alive();
        match (answered, alive) {
            (Ok(Ok(())), true) => notify(&[NotifyState::Watchdog]),
            (answered, alive) => {
                let why = match answered {
                    Err(_) => format!("/healthz not answered within {limit:?}"),
                    Ok(Err(e)) => format!("/healthz: {e}"),
                    Ok(Ok(())) => String::new(),
                };
                tracing::error!(healthz = %why, refreshers_alive = alive, "health self-check failed; not pinging the systemd watchdog");
            }
        }
    }
}

/// `GET /healthz` on tokend's own listener; `Ok` on a 200.
async fn self_check(check: &SelfCheck) -> std::io::Result<()> {
    if matches!(check, SelfCheck::None) {
        return Ok(());
    }
    match local_get(check, "/healthz").await? {
        (200, _) => Ok(()),
        (status, _) => Err(std::io::Error::other(format!("answered HTTP {status}"))),
    }
}

/// One `GET path` to a local tokend listener (no proxy, `Connection: close`): the status and the body.
/// Used by the watchdog and by `tokend health`.
pub(crate) async fn local_get(target: &SelfCheck, path: &str) -> std::io::Result<(u16, String)> {
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    let mut answer = Vec::new();
    match target {
        SelfCheck::Tcp(addr) => {
            let mut s = tokio::net::TcpStream::connect(addr).await?;
            s.write_all(request.as_bytes()).await?;
            s.read_to_end(&mut answer).await?;
        }
        SelfCheck::Unix(path) => {
            let mut s = tokio::net::UnixStream::connect(path).await?;
            s.write_all(request.as_bytes()).await?;
            s.read_to_end(&mut answer).await?;
        }
        SelfCheck::None => return Err(std::io::Error::other("no listener to ask")),
    }
    let text = String::from_utf8_lossy(&answer);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other("not an HTTP answer"))?;
    // `Connection: close` answers are not chunked by hyper when the length is known; strip a chunked
    // frame anyway so the body is the JSON.
    let body = if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        body.split("\r\n").nth(1).unwrap_or("").to_owned()
    } else {
        body.to_owned()
    };
    Ok((status, body))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resource::Resource;

    fn state(resource: &str, ready: bool, problem: Option<&str>) -> PinnedState {
        PinnedState {
            identity: "default".into(),
            resource: Resource::parse(resource).expect("resource"),
            ready,
            remaining: None,
            problem: problem.map(str::to_owned),
        }
    }

    #[test]
    fn status_lines_say_what_start_up_waits_for() {
        let states = [
            state("https://storage.azure.com", true, None),
            state("https://vault.azure.net", false, Some("IdP: HTTP 503")),
            state("https://graph.microsoft.com", false, None),
        ];
        assert_eq!(
            status_text(&states, false, "127.0.0.1:50342"),
            "waiting for 2 of 3 tokens: https://vault.azure.net for identity default (IdP: HTTP 503), \
             https://graph.microsoft.com for identity default (first request in flight)"
        );
        assert_eq!(
            status_text(&states[..1], true, "127.0.0.1:50342"),
            "serving on 127.0.0.1:50342; 1 configured tokens cached"
        );
        assert!(status_text(&states, true, "x").starts_with("serving on x; 2 of 3 configured tokens not servable"));
    }

    #[test]
    fn reload_status_round_trips() {
        let line = "4242 3 SIGHUP rejected tokend.toml: identity[0].client_id: missing\n";
        let s = ReloadStatus::parse(line).expect("parses");
        assert_eq!((s.pid, s.seq, s.reason.as_str(), s.applied), (4242, 3, "SIGHUP", false));
        assert_eq!(s.message, "tokend.toml: identity[0].client_id: missing");
        assert_eq!(ReloadStatus::parse("garbage"), None);
    }
}
