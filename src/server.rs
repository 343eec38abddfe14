//! The HTTP surface: the router, its guards and serving with graceful shutdown.
//!
//! Routes: the two token dialects, `/healthz` (alive) and `/readyz` (every configured resource cached).
//! Guards: only GET (405 otherwise), a `Host` that is a loopback name or address or one of tokend's
//! listen addresses (DNS rebinding), a bounded request time. Errors use the dialect's shape.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower_http::timeout::TimeoutLayer;

use crate::broker::Broker;
use crate::dialect::{Dialect, RequestError, app_service, imds};

/// Longest any request may take; callers are answered within `tokens.max_wait` well before this.
pub(crate) const REQUEST_TIMEOUT: Duration = Duration::from_secs(70);

/// Which `Host` values are accepted besides loopback names and addresses.
#[derive(Debug, Clone, Default)]
pub(crate) struct HostPolicy {
    /// tokend's own listen addresses (e.g. a non-loopback one the operator opted into).
    pub extra: Vec<IpAddr>,
}

impl HostPolicy {
    /// Accepts the listen addresses' IPs.
    pub(crate) fn for_listen(listen: &[SocketAddr]) -> Self {
        Self { extra: listen.iter().map(SocketAddr::ip).filter(|ip| !ip.is_unspecified()).collect() }
    }

    /// Whether a `Host` header value is acceptable.
    pub(crate) fn allows(&self, host: &str) -> bool {
        let name = strip_port(host);
        if name.eq_ignore_ascii_case("localhost") || name.eq_ignore_ascii_case("localhost.") {
            return true;
        }
        let ip = name.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>();
        ip.is_ok_and(|ip| ip.is_loopback() || self.extra.contains(&ip))
    }
}

fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        // [v6]:port or [v6]
        return host.split_once(']').map_or(host, |(h, _)| &host[..h.len() + 1]);
    }
    match host.rsplit_once(':') {
        Some((h, port)) if !h.contains(':') && port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    }
}

/// The application: routes plus guards. Tests drive it with `oneshot`.
pub(crate) fn router(broker: Arc<Broker>, hosts: HostPolicy) -> Router {
    Router::new()
        .route(imds::PATH, get(imds::token))
        // msal-node (and so @azure/identity) canonicalises AZURE_POD_IDENTITY_AUTHORITY_HOST + path with a
        // trailing slash: `/metadata/identity/oauth2/token/`. Same endpoint.
        .route(imds::PATH_SLASH, get(imds::token))
        .route(app_service::PATH, get(app_service::token))
        .route(app_service::PATH_SLASH, get(app_service::token))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(Arc::new(hosts), host_guard))
        .layer(middleware::from_fn(size_guard))
        .layer(TimeoutLayer::with_status_code(StatusCode::SERVICE_UNAVAILABLE, REQUEST_TIMEOUT))
        .with_state(broker)
}

async fn host_guard(State(hosts): State<Arc<HostPolicy>>, req: Request, next: Next) -> Response {
    let path = req.uri().path();
    if let Some(host) = req.headers().get(header::HOST).filter(|_| path != "/healthz" && path != "/readyz") {
        {
            if !host.to_str().is_ok_and(|h| hosts.allows(h)) {
                let shown: String = String::from_utf8_lossy(host.as_bytes()).chars().take(100).collect();
                return RequestError::bad_request(format!(
                    "header Host {shown:?} is not a loopback name or address; tokend only answers requests addressed to this machine"
                ))
                .into_response(Dialect::for_path(path));
            }
        }
    }
    next.run(req).await
}

/// Longest request target answered (real ones are a few hundred bytes).
pub(crate) const MAX_URI_BYTES: usize = 8 * 1024;
/// Largest total of header names and values answered.
pub(crate) const MAX_HEADER_BYTES: usize = 16 * 1024;

/// Oversized request targets and headers get a 414/431 in the dialect's shape (hyper closes the
/// connection with a bare 431 only beyond `Limits::max_head_bytes`).
async fn size_guard(req: Request, next: Next) -> Response {
    let uri_len = req.uri().path_and_query().map_or(0, |pq| pq.as_str().len());
    let header_len: usize = req.headers().iter().map(|(k, v)| k.as_str().len() + v.len()).sum();
    let (status, description) = if uri_len > MAX_URI_BYTES {
        (StatusCode::URI_TOO_LONG, format!("request URI is {uri_len} bytes; the limit is {MAX_URI_BYTES}"))
    } else if header_len > MAX_HEADER_BYTES {
        (
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            format!("request headers are {header_len} bytes; the limit is {MAX_HEADER_BYTES}"),
        )
    } else {
        return next.run(req).await;
    };
    RequestError { status, code: "invalid_request", description, retry_after: None }
        .into_response(Dialect::for_path(req.uri().path()))
}

async fn healthz() -> impl IntoResponse {
    (StatusCode::OK, axum::Json(serde_json::json!({ "status": "alive" })))
}

async fn readyz(State(broker): State<Arc<Broker>>) -> impl IntoResponse {
    let states = broker.readiness();
    let pending: Vec<String> =
        states.iter().filter(|s| !s.ready).map(|s| format!("{} {}", s.identity, s.resource)).collect();
    let status = if pending.is_empty() { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    let word = if pending.is_empty() { "ready" } else { "not ready" };
    (status, axum::Json(serde_json::json!({ "status": word, "resources": states.len(), "pending": pending })))
}

async fn not_found(req: Request) -> Response {
    let path = req.uri().path();
    let shown: String = path.chars().take(100).collect();
    RequestError {
        status: StatusCode::NOT_FOUND,
        code: "not_found",
        description: format!("no such endpoint {shown:?}; tokens are at {} and {}", imds::PATH, app_service::PATH),
        retry_after: None,
    }
    .into_response(Dialect::for_path(path))
}

async fn method_not_allowed(req: Request) -> Response {
    let method = req.method().clone();
    let mut resp = RequestError {
        status: StatusCode::METHOD_NOT_ALLOWED,
        code: "method_not_allowed",
        description: format!("method {method} is not allowed; use GET"),
        retry_after: None,
    }
    .into_response(Dialect::for_path(req.uri().path()));
    resp.headers_mut().insert(header::ALLOW, header::HeaderValue::from_static("GET, HEAD"));
    resp
}

/// Binds every address before anything is served, so a bad address fails start-up as a whole.
pub(crate) async fn bind(addrs: &[SocketAddr]) -> std::io::Result<Vec<TcpListener>> {
    let mut out = Vec::with_capacity(addrs.len());
    for addr in addrs {
        let l = TcpListener::bind(addr).await.map_err(|e| {
            let hint = match e.kind() {
                std::io::ErrorKind::AddrNotAvailable if crate::net::is_imds_ip(addr.ip()) => {
                    "; the address is not on this host: run `tokend transparent-imds setup` (or \
                     `ip addr add 169.254.169.254/32 dev lo`) first"
                }
                std::io::ErrorKind::PermissionDenied if addr.port() < 1024 => {
                    "; ports below 1024 need CAP_NET_BIND_SERVICE (systemd: AmbientCapabilities=CAP_NET_BIND_SERVICE)"
                }
                _ => "",
            };
            std::io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}{hint}"))
        })?;
        out.push(l);
    }
    Ok(out)
}

/// Limits against hostile or broken clients.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    /// A client must send its whole request head within this (slowloris).
    pub header_read_timeout: Duration,
    /// Open connections per listener; beyond it new connections are closed at once.
    pub max_connections: usize,
    /// Hard cap on a request head (hyper answers a bare 431 beyond it).
    pub max_head_bytes: usize,
    /// Grace for in-flight requests after shutdown starts.
    pub drain: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(5),
            max_connections: 1024,
            max_head_bytes: 64 * 1024,
            drain: Duration::from_secs(10),
        }
    }
}

/// Serves `app` on every listener until `shutdown` is cancelled, then lets in-flight requests finish
/// for at most `limits.drain`.
pub(crate) async fn serve(
    listeners: Vec<TcpListener>,
    app: Router,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    serve_with(listeners, app, shutdown, Limits::default()).await
}

/// [`serve`] with explicit limits.
pub(crate) async fn serve_with(
    listeners: Vec<TcpListener>,
    app: Router,
    shutdown: CancellationToken,
    limits: Limits,
) -> std::io::Result<()> {
    let graceful = Arc::new(hyper_util::server::graceful::GracefulShutdown::new());
    let mut tasks = tokio::task::JoinSet::new();
    for listener in listeners {
        let (app, stop, graceful) = (app.clone(), shutdown.clone(), graceful.clone());
        tasks.spawn(accept_loop(listener, app, stop, graceful, limits));
    }
    let mut result = Ok(());
    while let Some(joined) = tasks.join_next().await {
        if let Err(e) = joined {
            result = Err(std::io::Error::other(format!("listener task failed: {e}")));
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

async fn accept_loop(
    listener: TcpListener,
    app: Router,
    stop: CancellationToken,
    graceful: Arc<hyper_util::server::graceful::GracefulShutdown>,
    limits: Limits,
) {
    let permits = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_head_bytes)
        .keep_alive(true);
    loop {
        let (stream, peer) = tokio::select! {
            () = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            tracing::warn!(%peer, max = limits.max_connections, "connection limit reached; closing a new connection");
            continue;
        };
        let _ = stream.set_nodelay(true);
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        let conn = http.serve_connection(hyper_util::rt::TokioIo::new(stream), service);
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
            drop(permit);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use axum::body::Body;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    use crate::token::{BoxFuture, FetchError, IssuedToken, TokenSource};

    /// Issues `fixed-token` for an hour.
    struct Fixed;

    impl TokenSource for Fixed {
        fn fetch<'a>(
            &'a self,
            _: &'a crate::identity::Identity,
            _: &'a crate::resource::Resource,
        ) -> BoxFuture<'a, Result<IssuedToken, FetchError>> {
            Box::pin(async {
                Ok(IssuedToken {
                    access_token: "fixed-token".to_owned().into(),
                    expires_in: Duration::from_secs(3600),
                    ext_expires_in: None,
                    refresh_in: None,
                    requested_at: std::time::SystemTime::now(),
                })
            })
        }
    }

    fn app() -> (Router, tempfile::TempDir) {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("secret"), "s").expect("write");
        let text = "[[identity]]\nclient_id = \"cid\"\ntoken_url = \"http://127.0.0.1:9/t\"\nclient_secret_file = \"secret\"\n";
        let config = crate::config::Config::from_toml(text, &dir.path().join("t.toml"), &|_| None).expect("config");
        let broker = Broker::start(
            &config,
            "header-secret".to_owned().into(),
            Arc::new(Fixed),
            &tokio_util::task::TaskTracker::new(),
            &CancellationToken::new(),
        );
        (router(broker, HostPolicy::default()), dir)
    }

    async fn call(
        app: &Router,
        req: axum::http::Request<Body>,
    ) -> (StatusCode, axum::http::HeaderMap, serde_json::Value) {
        let resp = app.clone().oneshot(req).await.expect("infallible");
        let (parts, body) = resp.into_parts();
        let bytes = body.collect().await.expect("body").to_bytes();
        (parts.status, parts.headers, serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null))
    }

    fn request(uri: &str) -> axum::http::request::Builder {
        axum::http::Request::get(uri).header(header::HOST, "127.0.0.1:50342")
    }

    #[tokio::test]
    async fn router_answers_every_case_in_the_right_shape() {
        let (app, _dir) = app();
        let q = "/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https://storage.azure.com";
        let (status, headers, body) =
            call(&app, request(q).header("Metadata", "true").body(Body::empty()).expect("req")).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(headers[header::CACHE_CONTROL], "no-store");
        assert_eq!(body["access_token"], "fixed-token");
        assert_eq!(body["client_id"], "cid");
        for f in ["expires_in", "expires_on", "ext_expires_in", "not_before"] {
            assert!(body[f].as_str().is_some_and(|v| v.bytes().all(|b| b.is_ascii_digit())), "{f}: {body}");
        }
        let (status, _, body) = call(&app, request(q).body(Body::empty()).expect("req")).await;
        assert_eq!(
            (status, body["error_description"].as_str()),
            (StatusCode::BAD_REQUEST, Some("Required metadata header not specified"))
        );
        let (status, _, body) = call(
            &app,
            request("/msi/token?api-version=2019-08-01&resource=r")
                .header("X-IDENTITY-HEADER", "nope")
                .body(Body::empty())
                .expect("req"),
        )
        .await;
        assert_eq!((status, body["statusCode"].as_u64()), (StatusCode::UNAUTHORIZED, Some(401)));
        let (status, _, body) = call(
            &app,
            request("/msi/token?api-version=2019-08-01&resource=r")
                .header("X-IDENTITY-HEADER", "header-secret")
                .body(Body::empty())
                .expect("req"),
        )
        .await;
        assert_eq!((status, body["access_token"].as_str()), (StatusCode::OK, Some("fixed-token")));
        let post = axum::http::Request::post(q)
            .header(header::HOST, "localhost")
            .header("Metadata", "true")
            .body(Body::empty())
            .expect("req");
        let (status, headers, body) = call(&app, post).await;
        assert_eq!(
            (status, &headers[header::ALLOW]),
            (StatusCode::METHOD_NOT_ALLOWED, &header::HeaderValue::from_static("GET, HEAD"))
        );
        assert_eq!(body["error"], "method_not_allowed");
        let (status, _, body) = call(&app, request("/nope").body(Body::empty()).expect("req")).await;
        assert_eq!((status, body["error"].as_str()), (StatusCode::NOT_FOUND, Some("not_found")));
        let evil = axum::http::Request::get(q)
            .header(header::HOST, "evil.example")
            .header("Metadata", "true")
            .body(Body::empty())
            .expect("req");
        let (status, _, body) = call(&app, evil).await;
        assert!(
            status == StatusCode::BAD_REQUEST && body["error_description"].as_str().is_some_and(|d| d.contains("Host")),
            "{body}"
        );
        let long = format!("{q}&x={}", "a".repeat(MAX_URI_BYTES));
        let (status, _, body) =
            call(&app, request(&long).header("Metadata", "true").body(Body::empty()).expect("req")).await;
        assert_eq!((status, body["error"].as_str()), (StatusCode::URI_TOO_LONG, Some("invalid_request")));
        let (status, _, body) = call(&app, request("/readyz").body(Body::empty()).expect("req")).await;
        assert_eq!((status, body["status"].as_str()), (StatusCode::OK, Some("ready")));
    }

    #[tokio::test]
    async fn connections_beyond_the_limit_are_closed_and_the_limit_frees_up() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let app = Router::new().route("/healthz", get(healthz));
        let stop = CancellationToken::new();
        let limits = Limits { max_connections: 3, ..Limits::default() };
        let server = tokio::spawn(serve_with(vec![listener], app, stop.clone(), limits));
        let mut idle = Vec::new();
        for _ in 0..3 {
            idle.push(tokio::net::TcpStream::connect(addr).await.expect("connect"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut extra = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let _ = extra.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").await;
        let mut buf = [0u8; 64];
        let n = tokio::time::timeout(Duration::from_secs(2), extra.read(&mut buf)).await.expect("closed at once");
        assert!(matches!(n, Ok(0) | Err(_)), "the fourth connection is closed, not served");
        idle.clear();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut ok = tokio::net::TcpStream::connect(addr).await.expect("connect");
        ok.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").await.expect("write");
        let mut answer = String::new();
        ok.read_to_string(&mut answer).await.expect("read");
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        stop.cancel();
        server.await.expect("join").expect("serve");
    }

    #[test]
    fn host_policy() {
        let p = HostPolicy::for_listen(&["10.1.2.3:80".parse().expect("addr")]);
        for ok in [
            "127.0.0.1",
            "127.0.0.1:50342",
            "localhost",
            "LOCALHOST:1",
            "localhost.",
            "[::1]:50342",
            "[::1]",
            "127.9.9.9:1",
            "10.1.2.3",
        ] {
            assert!(p.allows(ok), "{ok}");
        }
        for bad in [
            "evil.example",
            "evil.example:50342",
            "localhost.evil.example",
            "10.1.2.4",
            "[::2]:1",
            "",
            "127.0.0.1.nip.io",
        ] {
            assert!(!p.allows(bad), "{bad}");
        }
    }
}
