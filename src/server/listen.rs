//! Listening and serving: [`bind`] every listener (loopback TCP and an optional unix socket) before
//! anything is served, then [`serve`] — tokend's own HTTP/1 accept loop (hyper): header-read timeout
//! against slowloris, per-listener and per-caller connection limits (a connection beyond one is
//! answered by [`super::refusal`]) and a graceful drain bounded by `Limits::drain`. Each connection's
//! [`Caller`] is resolved here, once, before its first request is read, and handed to the handlers as a
//! request extension.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use axum::extract::Request;
use axum::response::Response;
use hyper::body::Incoming;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio_util::sync::CancellationToken;

use crate::caller::{Caller, TcpCallers};
use crate::config::{ServerConfig, UnixSocketConfig};
use crate::dialect::Asker;
use crate::process::ProcessLookup;

use super::refusal::{Limit, Refusals};

/// A bound listener.
#[derive(Debug)]
pub(crate) enum Listener {
    /// A TCP address.
    Tcp(TcpListener),
    /// A unix socket, with its path and inode (to remove it at shutdown only if it is still ours).
    Unix(UnixListener, PathBuf, u64),
}

impl Listener {
    /// What it listens on, for logs: `127.0.0.1:50342` or `unix:/run/tokend/tokend.sock`.
    pub(crate) fn describe(&self) -> String {
        match self {
            Self::Tcp(l) => l.local_addr().map_or_else(|e| format!("tcp (unknown: {e})"), |a| a.to_string()),
            Self::Unix(_, path, _) => format!("unix:{}", path.display()),
        }
    }

    /// The TCP address, if it is one.
    pub(crate) fn tcp_addr(&self) -> Option<SocketAddr> {
        match self {
            Self::Tcp(l) => l.local_addr().ok(),
            Self::Unix(..) => None,
        }
    }
}

/// Listening sockets passed by systemd (socket activation), by address.
#[derive(Debug, Default)]
pub(crate) struct Inherited {
    tcp: Vec<(SocketAddr, std::net::TcpListener)>,
    unix: Vec<(PathBuf, std::os::unix::net::UnixListener)>,
}

impl Inherited {
    /// Takes the sockets systemd passed this process (`LISTEN_FDS`, `LISTEN_PID`), once, at start-up. The
    /// environment is left as it is (changing it is not thread-safe).
    pub(crate) fn from_systemd() -> io::Result<Self> {
        let mut out = Self::default();
        for fd in sd_notify::listen_fds()? {
            let fd = take_fd(fd);
            let tcp = std::net::TcpListener::from(fd);
            match tcp.local_addr() {
                Ok(addr) => out.tcp.push((addr, tcp)),
                Err(_) => {
                    let unix = std::os::unix::net::UnixListener::from(std::os::fd::OwnedFd::from(tcp));
                    let path = unix.local_addr()?.as_pathname().map(Path::to_path_buf).ok_or_else(|| {
                        io::Error::new(
                            io::ErrorKind::InvalidInput,
                            "systemd passed a socket that is neither TCP nor a unix socket with a path",
                        )
                    })?;
                    out.unix.push((path, unix));
                }
            }
        }
        Ok(out)
    }

    /// Whether systemd passed a socket for `addr`.
    pub(crate) fn has_tcp(&self, addr: &SocketAddr) -> bool {
        self.tcp.iter().any(|(a, _)| a == addr)
    }

    /// What systemd passed that the configuration does not name: a configuration error.
    pub(crate) fn unclaimed(&self, server: &ServerConfig) -> Vec<String> {
        let tcp = self.tcp.iter().filter(|(a, _)| !server.listen.contains(a)).map(|(a, _)| a.to_string());
        let unix = self
            .unix
            .iter()
            .filter(|(p, _)| server.unix_socket.as_ref().is_none_or(|u| &u.path != p))
            .map(|(p, _)| format!("unix:{}", p.display()));
        tcp.chain(unix).collect()
    }
}

/// Owns a descriptor systemd passed. `sd_notify::listen_fds` checked `LISTEN_PID` and the range
/// (3 .. 3 + `LISTEN_FDS`) and set `O_CLOEXEC`; this is called once per descriptor, at start-up.
#[allow(unsafe_code)]
fn take_fd(fd: std::os::fd::RawFd) -> std::os::fd::OwnedFd {
    use std::os::fd::FromRawFd;
    // SAFETY: systemd's socket-activation protocol hands this process descriptors 3 .. 3+LISTEN_FDS
    // (validated by listen_fds against LISTEN_PID); nothing else in tokend opens or owns them, and each
    // is taken exactly once (Inherited::from_systemd runs once, before anything else uses descriptors).
    unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) }
}

/// Binds every TCP address, then the unix socket, before anything is served, so a bad address fails
/// start-up as a whole. Addresses systemd passed a socket for (socket activation) take that socket
/// instead: tokend needs no capability for port 80, and systemd owns the unix socket's mode and group.
pub(crate) async fn bind(server: &ServerConfig, mut inherited: Inherited) -> io::Result<Vec<Listener>> {
    let mut out = Vec::with_capacity(server.listen.len() + 1);
    for addr in &server.listen {
        if let Some(i) = inherited.tcp.iter().position(|(a, _)| a == addr) {
            let (_, l) = inherited.tcp.swap_remove(i);
            l.set_nonblocking(true)?;
            tracing::info!(%addr, "listening on a socket passed by systemd");
            out.push(Listener::Tcp(TcpListener::from_std(l)?));
            continue;
        }
        let l = TcpListener::bind(addr).await.map_err(|e| {
            let hint = match e.kind() {
                io::ErrorKind::AddrNotAvailable if crate::net::is_imds_ip(addr.ip()) => {
                    "; the address is not on this host: run `tokend transparent-imds setup` (or \
                     `ip addr add 169.254.169.254/32 dev lo`) first"
                }
                io::ErrorKind::PermissionDenied if addr.port() < 1024 => {
                    "; ports below 1024 need CAP_NET_BIND_SERVICE (systemd: AmbientCapabilities=CAP_NET_BIND_SERVICE)"
                }
                _ => "",
            };
            io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}{hint}"))
        })?;
        out.push(Listener::Tcp(l));
    }
    if let Some(unix) = &server.unix_socket {
        if let Some(i) = inherited.unix.iter().position(|(p, _)| *p == unix.path) {
            let (path, l) = inherited.unix.swap_remove(i);
            l.set_nonblocking(true)?;
            tracing::info!(path = %path.display(), "listening on a unix socket passed by systemd (its mode and group are the socket unit's)");
            // Inode 0: never removed at shutdown; the socket unit owns it.
            out.push(Listener::Unix(UnixListener::from_std(l)?, path, 0));
        } else {
            out.push(bind_unix(unix).map_err(|e| {
                io::Error::new(e.kind(), format!("cannot listen on server.unix_socket {}: {e}", unix.path.display()))
            })?);
        }
    }
    Ok(out)
}

/// Why a unix socket path cannot be used, found before anything is bound (a configuration error).
pub(crate) fn check_unix_path(path: &Path) -> Result<(), String> {
    let parent = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    if !parent.is_dir() {
        return Err(format!("the directory {} does not exist", parent.display()));
    }
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(format!("cannot inspect {}: {e}", path.display())),
        // A socket, stale or live, is sorted out when binding.
        Ok(m) if m.file_type().is_socket() => Ok(()),
        Ok(_) => Err(format!("{} exists and is not a socket; tokend replaces only a stale socket", path.display())),
    }
}

/// Binds the socket under a temporary name, sets its mode and group, then renames it into place, so it
/// is never reachable with other permissions. A stale socket (nobody accepts on it) is replaced; a live
/// one is an error, as an address in use.
fn bind_unix(config: &UnixSocketConfig) -> io::Result<Listener> {
    let path = &config.path;
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
        match std::os::unix::net::UnixStream::connect(path) {
            Ok(_) => return Err(io::Error::new(io::ErrorKind::AddrInUse, "another process is serving on it")),
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                tracing::info!(path = %path.display(), "replacing a stale socket from an earlier run");
                std::fs::remove_file(path)?;
            }
            Err(e) => return Err(e),
        }
    }
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let staging = path.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
    let _ = std::fs::remove_file(&staging);
    let listener = UnixListener::bind(&staging)?;
    let placed = (|| {
        std::fs::set_permissions(&staging, std::fs::Permissions::from_mode(config.mode))?;
        if let Some(gid) = config.gid {
            std::os::unix::fs::chown(&staging, None, Some(gid)).map_err(|e| {
                io::Error::new(e.kind(), format!("cannot give it group {gid} (server.socket_group): {e}"))
            })?;
        }
        std::fs::rename(&staging, path)?;
        std::fs::symlink_metadata(path).map(|m| m.ino())
    })();
    match placed {
        Ok(ino) => Ok(Listener::Unix(listener, path.clone(), ino)),
        Err(e) => {
            let _ = std::fs::remove_file(&staging);
            Err(e)
        }
    }
}

/// Limits against hostile or broken clients.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    /// A client must send its whole request head within this (slowloris), give or take half of it; an
    /// idle keep-alive connection is closed after as long.
    pub(crate) header_read_timeout: Duration,
    /// Open connections per listener; beyond it a new connection is answered 503 and closed.
    pub(crate) max_connections: usize,
    /// Open connections per caller (uid; unidentified callers together), over all listeners; beyond it a
    /// new connection is answered 429 and closed.
    pub(crate) max_connections_per_caller: usize,
    /// Hard cap on a request head (hyper answers a bare 431 beyond it).
    pub(crate) max_head_bytes: usize,
    /// Grace for in-flight requests after shutdown starts.
    pub(crate) drain: Duration,
    /// Prepare a lookup of each known caller's process (pid, executable, unit, container) for the
    /// audit log; it runs only when a request needs it, once per connection.
    pub(crate) lookup_processes: bool,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(5),
            max_connections: 1024,
            max_connections_per_caller: 256,
            max_head_bytes: 64 * 1024,
            drain: Duration::from_secs(10),
            lookup_processes: false,
        }
    }
}

/// Serves `app` on every listener until `shutdown` is cancelled, then lets in-flight requests finish
/// for at most `limits.drain`, and removes the unix socket.
pub(crate) async fn serve<A: Application>(
    listeners: Vec<Listener>,
    app: A,
    shutdown: CancellationToken,
    limits: Limits,
) -> io::Result<()> {
    let graceful = Arc::new(hyper_util::server::graceful::GracefulShutdown::new());
    let callers = Arc::new(TcpCallers::default());
    let per_caller = Arc::new(PerCaller::default());
    let refusals = Arc::new(Refusals::default());
    let mut sockets = Vec::new();
    let mut tasks = tokio::task::JoinSet::new();
    for listener in listeners {
        if let Listener::Unix(_, path, ino) = &listener
            && *ino != 0
        {
            sockets.push((path.clone(), *ino));
        }
        let (app, stop, graceful) = (app.clone(), shutdown.clone(), graceful.clone());
        let (callers, per_caller, refusals) = (callers.clone(), per_caller.clone(), refusals.clone());
        tasks.spawn(accept_loop(listener, app, stop, graceful, Shared { callers, per_caller, refusals }, limits));
    }
    let mut result = Ok(());
    while let Some(joined) = tasks.join_next().await {
        if let Err(e) = joined {
            result = Err(io::Error::other(format!("listener task failed: {e}")));
        }
    }
    // New clients get "connection refused" rather than a socket nobody accepts on.
    for (path, ino) in sockets {
        if std::fs::symlink_metadata(&path).is_ok_and(|m| m.ino() == ino) {
            let _ = std::fs::remove_file(&path);
        }
    }
    // The accept loops are done, so this is the last reference.
    if let Ok(graceful) = Arc::try_unwrap(graceful)
        && tokio::time::timeout(limits.drain, graceful.shutdown()).await.is_err()
    {
        tracing::warn!(drain_s = limits.drain.as_secs(), "connections still open after the drain period; closing them");
    }
    result
}

/// What the accept loops of one [`serve`] share.
struct Shared {
    callers: Arc<TcpCallers>,
    per_caller: Arc<PerCaller>,
    refusals: Arc<Refusals>,
}

async fn accept_loop<A: Application>(
    listener: Listener,
    app: A,
    stop: CancellationToken,
    graceful: Arc<hyper_util::server::graceful::GracefulShutdown>,
    shared: Shared,
    limits: Limits,
) {
    let Shared { callers, per_caller, refusals } = shared;
    let permits = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    let mut http = hyper::server::conn::http1::Builder::new();
    // The header-read timeout is `head_watchdog`'s, per connection: hyper's arms a timer for every
    // request on a keep-alive connection, which cost ~7% of the throughput (BENCHMARKS.md).
    http.header_read_timeout(None::<Duration>).max_buf_size(limits.max_head_bytes).keep_alive(true);
    let on = listener.describe();
    let (mut listener_full, mut caller_full) = (Throttled::default(), Throttled::default());
    loop {
        let accepted = tokio::select! {
            () = stop.cancelled() => return,
            accepted = accept(&listener) => accepted,
        };
        let (stream, peer, caller) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(listener = %on, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            let answered = refusals.refuse(stream, Limit::Listener { max: limits.max_connections });
            if let Some(more) = listener_full.due() {
                tracing::warn!(%peer, max = limits.max_connections, answered, more_since_last = more, "connection limit reached; refusing new connections (503; logged at most every 10 s)");
            }
            continue;
        };
        // The caller, once per connection, before its first request is read.
        let (caller, inode) = match caller {
            Pending::Tcp { peer, local } => callers.lookup(peer, local),
            Pending::Known(caller) => (caller, None),
        };
        let Some(slot) = per_caller.take(&caller, limits.max_connections_per_caller) else {
            drop(permit);
            let max = limits.max_connections_per_caller;
            let answered = refusals.refuse(stream, Limit::PerCaller { caller, max });
            if let Some(more) = caller_full.due() {
                tracing::warn!(%peer, %caller, max, answered, more_since_last = more, "per-caller connection limit reached; refusing new connections (429; logged at most every 10 s)");
            }
            continue;
        };
        let process = match caller {
            Caller::Known { uid, pid, .. } if limits.lookup_processes => {
                // Started now, while the client is still there; no request waits for it.
                let lookup = Arc::new(ProcessLookup::new(uid, pid, inode));
                if !lookup.start() {
                    crate::metrics::get().process_lookup_skipped();
                }
                Some(lookup)
            }
            _ => None,
        };
        let progress = Arc::new(Progress::default());
        let service = Connection { app: app.clone(), asker: Asker::new(caller, process), progress: progress.clone() };
        let conn = graceful.watch(http.serve_connection(hyper_util::rt::TokioIo::new(stream), service));
        tokio::spawn(async move {
            tokio::select! {
                ended = conn => if let Err(e) = ended {
                    tracing::debug!(%peer, error = %e, "connection ended with an error");
                },
                () = head_watchdog(&progress, limits.header_read_timeout) => {
                    tracing::debug!(%peer, "no request head within the header-read timeout; connection closed");
                }
            }
            drop((permit, slot));
        });
    }
}

/// A warning a flood would repeat per connection, written at most once per [`Throttled::EVERY`].
#[derive(Debug, Default)]
struct Throttled {
    last: Option<tokio::time::Instant>,
    suppressed: u64,
}

impl Throttled {
    const EVERY: Duration = Duration::from_secs(10);

    /// `Some(how many were not logged since the last one)` when this one is to be logged.
    fn due(&mut self) -> Option<u64> {
        let now = tokio::time::Instant::now();
        if self.last.is_some_and(|last| now.duration_since(last) < Self::EVERY) {
            self.suppressed += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.suppressed))
    }
}

/// One connection's requests, for [`head_watchdog`]: how many heads have arrived, how many are in flight.
#[derive(Debug, Default)]
struct Progress {
    heads: AtomicU64,
    in_flight: AtomicUsize,
}

/// Ends when a connection has neither received a request head nor had a request in flight for two
/// consecutive half-periods of `timeout`: between `timeout` and 1.5 × `timeout` after its last
/// activity. That is the header-read timeout against slowloris (a head that never completes) and the
/// keep-alive idle timeout, with one timer per connection instead of one per request.
async fn head_watchdog(progress: &Progress, timeout: Duration) {
    let mut seen = progress.heads.load(Ordering::Relaxed);
    let mut idle = 0;
    while idle < 2 {
        tokio::time::sleep(timeout / 2).await;
        let heads = progress.heads.load(Ordering::Relaxed);
        idle = if heads != seen || progress.in_flight.load(Ordering::Relaxed) > 0 { 0 } else { idle + 1 };
        seen = heads;
    }
}

/// The application for one connection: each request gets the connection's [`Asker`] and is counted in
/// its [`Progress`].
#[derive(Debug, Clone)]
struct Connection<A> {
    app: A,
    asker: Asker,
    progress: Arc<Progress>,
}

impl<A: Application> hyper::service::Service<hyper::Request<Incoming>> for Connection<A> {
    type Response = Response;
    type Error = Infallible;
    type Future = Counted<Answer<tower::util::Oneshot<A, Request>>>;

    fn call(&self, req: hyper::Request<Incoming>) -> Self::Future {
        self.progress.heads.fetch_add(1, Ordering::Relaxed);
        self.progress.in_flight.fetch_add(1, Ordering::Relaxed);
        let _in_flight = InFlight(self.progress.clone());
        if let Some(answer) = self.app.answer_now(&req, &self.asker) {
            return Counted { inner: Answer::Now { answer: Some(answer) }, _in_flight };
        }
        let mut req = req.map(axum::body::Body::new);
        req.extensions_mut().insert(self.asker.clone());
        Counted { inner: Answer::Routed { inner: tower::ServiceExt::oneshot(self.app.clone(), req) }, _in_flight }
    }
}

pin_project_lite::pin_project! {
    /// A request's answer: given at once ([`Application::answer_now`]), or the application's future.
    #[project = AnswerProj]
    pub(crate) enum Answer<F> {
        Now { answer: Option<Response> },
        Routed { #[pin] inner: F },
    }
}

impl<F: std::future::Future<Output = Result<Response, Infallible>>> std::future::Future for Answer<F> {
    type Output = Result<Response, Infallible>;

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Self::Output> {
        match self.project() {
            // Taken on the first poll; a future is not polled again once it has answered.
            AnswerProj::Now { answer } => {
                answer.take().map_or(std::task::Poll::Pending, |a| std::task::Poll::Ready(Ok(a)))
            }
            AnswerProj::Routed { inner } => inner.poll(cx),
        }
    }
}

/// A request in flight until dropped (answered, or abandoned with its connection).
struct InFlight(Arc<Progress>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

pin_project_lite::pin_project! {
    /// A request's future, counted in flight while it lives.
    struct Counted<F> {
        #[pin]
        inner: F,
        _in_flight: InFlight,
    }
}

impl<F: std::future::Future> std::future::Future for Counted<F> {
    type Output = F::Output;

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<F::Output> {
        self.project().inner.poll(cx)
    }
}

/// What [`serve`] serves: the application ([`super::App`]) or, in tests, any router.
pub(crate) trait Application:
    tower::Service<Request, Response = Response, Error = Infallible, Future: Send> + Clone + Send + 'static
{
    /// The answer to `req` if the application can give it at once, without routing (a cached token),
    /// borrowing itself and the connection's asker: nothing shared is cloned, no future is made.
    fn answer_now<B>(&self, req: &hyper::Request<B>, asker: &Asker) -> Option<Response>;
}

#[cfg(test)]
impl Application for axum::Router {
    fn answer_now<B>(&self, _: &hyper::Request<B>, _: &Asker) -> Option<Response> {
        None
    }
}

/// Open connections per caller; a [`Slot`] gives its place back when the connection ends.
#[derive(Debug, Default)]
struct PerCaller(parking_lot::Mutex<std::collections::HashMap<Option<u32>, usize>>);

/// One caller's open connection, counted until dropped.
struct Slot(Arc<PerCaller>, Option<u32>);

impl PerCaller {
    fn take(self: &Arc<Self>, caller: &Caller, max: usize) -> Option<Slot> {
        let key = match caller {
            Caller::Known { uid, .. } => Some(*uid),
            Caller::Unknown(_) => None,
        };
        let mut open = self.0.lock();
        let n = open.entry(key).or_default();
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(Slot(self.clone(), key))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self.0.0.lock();
        if let Some(n) = open.get_mut(&self.1) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.1);
            }
        }
    }
}

/// A byte stream of either kind.
trait Stream: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Stream for T {}

/// What is needed to know the caller of an accepted connection.
enum Pending {
    /// A TCP connection: look the client's socket up.
    Tcp { peer: SocketAddr, local: SocketAddr },
    /// Already known (`SO_PEERCRED`).
    Known(Caller),
}

/// One accepted connection, its peer for logs, and how to know its caller.
async fn accept(listener: &Listener) -> io::Result<(Box<dyn Stream>, String, Pending)> {
    match listener {
        Listener::Tcp(l) => {
            let (stream, peer) = l.accept().await?;
            let _ = stream.set_nodelay(true);
            let local = stream.local_addr()?;
            Ok((Box::new(stream), peer.to_string(), Pending::Tcp { peer, local }))
        }
        Listener::Unix(l, path, _) => {
            let (stream, _) = l.accept().await?;
            let caller = Caller::of_unix(&stream);
            Ok((Box::new(stream), format!("unix:{}", path.display()), Pending::Known(caller)))
        }
    }
}

#[cfg(test)]
mod tests {
    use axum::Router;
    use axum::routing::get;

    use super::*;

    /// One exchange on a new connection: the whole answer up to the server's close, as (status line and
    /// headers, body). A reset instead of an answer fails the test.
    async fn exchange(addr: SocketAddr, request: &[u8]) -> (String, String) {
        exchange_late(addr, request, Duration::ZERO, b"").await
    }

    /// [`exchange`], sending `late` after `pause` (once an over-limit connection has been answered).
    async fn exchange_late(addr: SocketAddr, request: &[u8], pause: Duration, late: &[u8]) -> (String, String) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
        s.write_all(request).await.expect("write");
        if !late.is_empty() {
            tokio::time::sleep(pause).await;
            s.write_all(late).await.expect("write after the answer: tokend still reads (no reset)");
        }
        let mut answer = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(3), s.read_to_end(&mut answer)).await;
        let read = read.unwrap_or_else(|_| panic!("not closed within 3 s: {:?}", String::from_utf8_lossy(&answer)));
        read.unwrap_or_else(|e| {
            panic!("{e} instead of an answer; read so far: {:?}", String::from_utf8_lossy(&answer))
        });
        let text = String::from_utf8(answer).expect("utf8");
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or_else(|| panic!("not an HTTP answer: {text:?}"));
        (head.to_owned(), body.to_owned())
    }

    /// A header of an answer's head, by lower-case name.
    fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
        head.lines().skip(1).find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }

    /// An over-limit answer: `status`, `Retry-After: 1`, `Connection: close`, the whole JSON body.
    fn refused(head: &str, body: &str, status: &str) -> serde_json::Value {
        assert!(head.starts_with(&format!("HTTP/1.1 {status}")), "{head}");
        assert_eq!(header(head, "retry-after"), Some("1"), "{head}");
        assert_eq!(header(head, "connection"), Some("close"), "{head}");
        assert_eq!(header(head, "content-length"), Some(body.len().to_string().as_str()), "{head}");
        serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"))
    }

    #[tokio::test]
    async fn connections_beyond_the_limit_are_answered_503_and_the_limit_frees_up() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let app = Router::new().route("/healthz", get(|| async { "alive" }));
        let stop = CancellationToken::new();
        let limits = Limits { max_connections: 3, ..Limits::default() };
        let server = tokio::spawn(serve(vec![Listener::Tcp(listener)], app, stop.clone(), limits));
        let mut idle = Vec::new();
        for _ in 0..3 {
            idle.push(tokio::net::TcpStream::connect(addr).await.expect("connect"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        let (head, body) = exchange(addr, b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").await;
        let body = refused(&head, &body, "503");
        assert_eq!(body["error"], "temporarily_unavailable", "{body}");
        assert!(body["error_description"].as_str().is_some_and(|d| d.contains("3 open connections")), "{body}");
        idle.clear();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let (head, _) = exchange(addr, b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        stop.cancel();
        server.await.expect("join").expect("serve");
    }

    /// The attacker's (or a parallel test runner's) view of `max_connections_per_caller`: every
    /// connection over the cap reads a whole 429 in its dialect's shape, naming the cap, its value and
    /// the caller, with `Retry-After` — however it sends its request: at once, in a head larger than
    /// what is read of it (the rest is drained, so the close does not reset the answer away), or not at
    /// all; and tokend closes it even when the client does not.
    #[tokio::test]
    async fn a_caller_over_its_connection_cap_reads_a_429_in_its_dialect_never_a_reset() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let app = Router::new().route("/healthz", get(|| async { "alive" }));
        let stop = CancellationToken::new();
        let limits = Limits { max_connections_per_caller: 2, ..Limits::default() };
        let server = tokio::spawn(serve(vec![Listener::Tcp(listener)], app, stop.clone(), limits));
        let mut idle = Vec::new();
        for _ in 0..2 {
            idle.push(tokio::net::TcpStream::connect(addr).await.expect("connect"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        let names_the_cap = |text: &str| {
            text.contains("server.max_connections_per_caller") && text.contains(" 2") && text.contains("uid ")
        };

        let imds = b"GET /metadata/identity/oauth2/token?api-version=2018-02-01&resource=https://storage.azure.com HTTP/1.1\r\nHost: 127.0.0.1\r\nMetadata: true\r\n\r\n";
        let (head, body) = exchange(addr, imds).await;
        let body = refused(&head, &body, "429");
        assert_eq!(body["error"], "too_many_requests", "{body}");
        assert!(body["error_description"].as_str().is_some_and(names_the_cap), "{body}");

        let msi = b"GET /msi/token?api-version=2019-08-01&resource=https://storage.azure.com HTTP/1.1\r\nHost: 127.0.0.1\r\nX-IDENTITY-HEADER: x\r\n\r\n";
        let (head, body) = exchange(addr, msi).await;
        let body = refused(&head, &body, "429");
        assert_eq!(body["statusCode"], 429, "App Service shape: {body}");
        assert!(body["message"].as_str().is_some_and(names_the_cap), "{body}");
        assert!(body["correlationId"].is_string(), "{body}");

        // Cloud Shell's POST to the App Service path: IMDS's shape, as the router answers it.
        let post = b"POST /msi/token HTTP/1.1\r\nHost: 127.0.0.1\r\nMetadata: true\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: 10\r\n\r\nresource=r";
        let (head, body) = exchange(addr, post).await;
        assert_eq!(refused(&head, &body, "429")["error"], "too_many_requests");

        // A head of 40 KiB, sent at once: far more than is read of it.
        let big = format!(
            "GET /metadata/identity/oauth2/token HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Pad: {}\r\n\r\n",
            "p".repeat(40 * 1024)
        );
        let (head, body) = exchange(addr, big.as_bytes()).await;
        assert_eq!(refused(&head, &body, "429")["error"], "too_many_requests");

        // Still sending once answered (a body that follows its head): what arrives is drained, so
        // closing does not reset the connection and the answer with it.
        let head = b"POST /msi/token HTTP/1.1\r\nHost: 127.0.0.1\r\nMetadata: true\r\nContent-Length: 40000\r\n\r\n";
        let late = vec![b'x'; 40_000];
        let (head, body) = exchange_late(addr, head, Duration::from_millis(300), &late).await;
        assert_eq!(refused(&head, &body, "429")["error"], "too_many_requests");

        // Nothing sent: answered anyway (IMDS's shape) after a short wait for a request line, then closed.
        let started = std::time::Instant::now();
        let (head, body) = exchange(addr, b"").await;
        assert_eq!(refused(&head, &body, "429")["error"], "too_many_requests");
        assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());

        // Many at once, as a parallel test runner opens them.
        let many: Vec<_> = (0..40).map(|_| tokio::spawn(exchange(addr, imds))).collect();
        for one in many {
            let (head, body) = one.await.expect("join");
            assert!(refused(&head, &body, "429")["error_description"].as_str().is_some_and(names_the_cap));
        }

        idle.clear();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let (head, _) = exchange(addr, b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").await;
        assert!(head.starts_with("HTTP/1.1 200"), "the cap frees up: {head}");
        stop.cancel();
        server.await.expect("join").expect("serve");
    }

    /// A flood of over-limit connections that send nothing and never close ties up at most
    /// `MAX_REFUSALS` answers, each for at most a second: the rest are closed at once, unanswered, and
    /// once the second is over the next over-limit connection is answered again though the flood's
    /// connections are all still open.
    #[tokio::test]
    async fn a_flood_of_over_limit_connections_costs_a_bounded_number_of_answers_for_a_bounded_time() {
        use tokio::io::AsyncReadExt;
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let app = Router::new().route("/healthz", get(|| async { "alive" }));
        let stop = CancellationToken::new();
        let limits = Limits { max_connections_per_caller: 1, ..Limits::default() };
        let server = tokio::spawn(serve(vec![Listener::Tcp(listener)], app, stop.clone(), limits));
        let _held = tokio::net::TcpStream::connect(addr).await.expect("connect");
        tokio::time::sleep(Duration::from_millis(100)).await;
        let flood = super::super::refusal::MAX_REFUSALS + 40;
        let mut silent = Vec::new();
        for _ in 0..flood {
            silent.push(tokio::net::TcpStream::connect(addr).await.expect("connect"));
        }
        let started = std::time::Instant::now();
        let waits = silent.into_iter().map(|mut s| {
            tokio::spawn(async move {
                let mut answer = Vec::new();
                let read = tokio::time::timeout(Duration::from_secs(3), s.read_to_end(&mut answer)).await;
                assert!(read.is_ok(), "an over-limit connection still open after 3 s");
                (answer.starts_with(b"HTTP/1.1 429"), s)
            })
        });
        let (mut answered, mut still_open) = (0, Vec::new());
        for wait in waits.collect::<Vec<_>>() {
            let (was_answered, s) = wait.await.expect("join");
            answered += usize::from(was_answered);
            still_open.push(s);
        }
        assert!(started.elapsed() < Duration::from_secs(3), "{:?}", started.elapsed());
        assert!(
            (super::super::refusal::MAX_REFUSALS / 2..=super::super::refusal::MAX_REFUSALS).contains(&answered),
            "{answered} of {flood} answered"
        );
        tokio::time::sleep(Duration::from_millis(1200).saturating_sub(started.elapsed())).await;
        let (head, body) = exchange(addr, b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").await;
        refused(&head, &body, "429");
        drop(still_open);
        stop.cancel();
        server.await.expect("join").expect("serve");
    }

    /// The per-connection header-read timeout: a head that never completes and an idle keep-alive
    /// connection are closed after 1–1.5 × the timeout; a request that takes longer than that to
    /// answer is not cut off, and neither is a connection that keeps sending requests.
    #[tokio::test]
    async fn the_header_read_timeout_closes_stalled_and_idle_connections_only() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let app = Router::new().route("/healthz", get(|| async { "alive" })).route(
            "/slow",
            get(|| async {
                tokio::time::sleep(Duration::from_millis(1500)).await;
                "late"
            }),
        );
        let stop = CancellationToken::new();
        let limits = Limits { header_read_timeout: Duration::from_millis(400), ..Limits::default() };
        let server = tokio::spawn(serve(vec![Listener::Tcp(listener)], app, stop.clone(), limits));
        let closed_within = |mut s: tokio::net::TcpStream, limit: Duration| async move {
            let started = std::time::Instant::now();
            let mut buf = Vec::new();
            let read = tokio::time::timeout(limit, s.read_to_end(&mut buf)).await;
            assert!(read.is_ok(), "still open after {limit:?}");
            started.elapsed()
        };
        let mut stalled = tokio::net::TcpStream::connect(addr).await.expect("connect");
        stalled.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ").await.expect("write");
        let idle = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let (stalled, idle) =
            tokio::join!(closed_within(stalled, Duration::from_secs(2)), closed_within(idle, Duration::from_secs(2)));
        for after in [stalled, idle] {
            assert!(after >= Duration::from_millis(350), "closed too early: {after:?}");
        }
        // A slow answer (1.5 s, more than 3 periods) and a busy keep-alive connection stay up.
        let mut busy = tokio::net::TcpStream::connect(addr).await.expect("connect");
        busy.write_all(b"GET /slow HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").await.expect("write");
        let mut buf = [0u8; 256];
        let n = busy.read(&mut buf).await.expect("read");
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"), "{:?}", String::from_utf8_lossy(&buf[..n]));
        for _ in 0..8 {
            tokio::time::sleep(Duration::from_millis(150)).await;
            busy.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").await.expect("write");
            let n = busy.read(&mut buf).await.expect("read");
            assert!(buf[..n].starts_with(b"HTTP/1.1 200"), "{:?}", String::from_utf8_lossy(&buf[..n]));
        }
        stop.cancel();
        server.await.expect("join").expect("serve");
    }

    fn unix(path: &Path) -> UnixSocketConfig {
        UnixSocketConfig { path: path.to_path_buf(), mode: 0o640, gid: None }
    }

    #[tokio::test]
    async fn a_unix_socket_gets_its_mode_replaces_a_stale_one_and_refuses_a_live_one() {
        let d = tempfile::tempdir().expect("tempdir");
        let path = d.path().join("tokend.sock");
        // A stale socket: bound, then its listener gone.
        drop(std::os::unix::net::UnixListener::bind(&path).expect("bind"));
        let first = bind_unix(&unix(&path)).expect("the stale socket is replaced");
        let meta = std::fs::metadata(&path).expect("socket");
        assert!(meta.file_type().is_socket());
        assert_eq!(meta.permissions().mode() & 0o777, 0o640);
        let e = bind_unix(&unix(&path)).expect_err("a live socket is not replaced");
        assert_eq!(e.kind(), io::ErrorKind::AddrInUse);
        drop(first);
        let leftovers: Vec<_> = std::fs::read_dir(d.path()).expect("dir").flatten().map(|e| e.file_name()).collect();
        assert_eq!(leftovers, vec![std::ffi::OsString::from("tokend.sock")], "no staging file left behind");
    }

    #[test]
    fn unix_paths_that_are_not_sockets_are_refused() {
        let d = tempfile::tempdir().expect("tempdir");
        let file = d.path().join("file");
        std::fs::write(&file, "x").expect("write");
        assert!(check_unix_path(&file).expect_err("a file").contains("not a socket"));
        assert!(check_unix_path(&d.path().join("missing/tokend.sock")).expect_err("no dir").contains("does not exist"));
        assert_eq!(check_unix_path(&d.path().join("tokend.sock")), Ok(()));
    }
}
