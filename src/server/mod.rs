//! The HTTP surface: the router and its guards; [`listen`] binds and serves.
//!
//! Routes: the two token dialects, `/healthz` (alive) and `/readyz` (every configured resource cached).
//! Guards: only GET (and POST on the App Service path; 405 otherwise), a `Host` that is a loopback name or
//! an IP address (DNS rebinding; every route but `/healthz`), a bounded request time. Errors use the
//! dialect's shape. A connection over a connection limit is answered by [`refusal`].

use std::convert::Infallible;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{self as http, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use crate::broker::Broker;
use crate::dialect::{Asker, Dialect, RequestError, app_service, cloud_shell, imds};
use crate::metrics::Route;

mod listen;
mod refusal;

pub(crate) use listen::{Application, Inherited, Limits, Listener, bind, check_unix_path, serve};

/// Longest any request may take; callers are answered within `tokens.max_wait` well before this.
pub(crate) const REQUEST_TIMEOUT: Duration = Duration::from_secs(70);

/// Whether a `Host` header value may be answered: a loopback name (`localhost`, `localhost.`) or any IP
/// address literal, with or without a port. Every other DNS name is refused.
///
/// The guard is against DNS rebinding: a page from `http://attacker.example` re-points its own name at
/// this machine, and the browser, believing it still talks to the page's origin, lets the page read
/// tokend's answers. Such a request necessarily carries the attacker's name in `Host` (a page cannot
/// set `Host`; the browser writes the URL's host). A request whose `Host` is an IP literal was sent to a
/// URL naming that address, so the only page that could read its answer is one served from that same
/// address and port — by tokend itself; no foreign page gets there. So any IP literal is safe to
/// answer, which keeps a listener on a non-loopback or unspecified address reachable the way real
/// clients address it without tokend knowing every address of the host: Prometheus scraping
/// `[metrics] listen = "0.0.0.0:9464"` sends `Host: <node-ip>:9464`, a kubelet `httpGet` probe
/// `Host: <pod-ip>:<port>`, a container `Host: <bridge-ip>:<port>`. (Non-browser clients can send any
/// `Host` at all; for them the guard was never a boundary.) Listen addresses are IP literals too, so
/// they need no list of their own.
pub(crate) fn host_allowed(host: &str) -> bool {
    let name = strip_port(host);
    // What nearly every client sends, without parsing an address.
    if name == "127.0.0.1" || name.eq_ignore_ascii_case("localhost") || name.eq_ignore_ascii_case("localhost.") {
        return true;
    }
    name.strip_prefix('[').and_then(|n| n.strip_suffix(']')).unwrap_or(name).parse::<IpAddr>().is_ok()
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

/// The application as served.
pub(crate) type App = Guarded<Router>;

/// The application: the routes wrapped in [`Guarded`]. Tests drive it with `oneshot`.
pub(crate) fn router(broker: Arc<Broker>) -> App {
    let routes = Router::new()
        .route(imds::PATH, get(imds::token))
        // msal-node (and so @azure/identity) canonicalises AZURE_POD_IDENTITY_AUTHORITY_HOST + path with a
        // trailing slash: `/metadata/identity/oauth2/token/`. Same endpoint.
        .route(imds::PATH_SLASH, get(imds::token))
        // App Service 2019 and 2017 / Azure ML (GET), Cloud Shell and msrestazure (POST): one
        // MSI_ENDPOINT / IDENTITY_ENDPOINT value serves them all.
        .route(app_service::PATH, get(app_service::token).post(cloud_shell::token))
        .route(app_service::PATH_SLASH, get(app_service::token).post(cloud_shell::token))
        .route(app_service::PATH_DOUBLE_SLASH, get(app_service::token).post(cloud_shell::token))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(broker.clone());
    Guarded { inner: routes, broker }
}

/// The guards around the routes, in one service: the size guard, then the Host guard, a bounded request
/// time, and the request metrics (every answer by route, dialect and status — the guards' too).
///
/// One hand-written service rather than `Router::layer`s: a layer on a `Router` wraps every route, and
/// each `from_fn` layer clones and boxes its inner service and its future on every request (the
/// profile in BENCHMARKS.md: 4 layers cost ~30 of the ~74 allocations a cached token took). The timer
/// is armed only when the routes do not answer on their first poll (a cached token never waits, and
/// reads no clock for it), and then bounds the request at [`REQUEST_TIMEOUT`].
#[derive(Debug, Clone)]
pub(crate) struct Guarded<S> {
    inner: S,
    broker: Arc<Broker>,
}

impl Application for App {
    /// A token GET whose token is cached, answered before routing: the guards, the dialect's checks,
    /// the cache hit and the metrics, borrowing the application and the connection's asker (see
    /// `dialect::answer_now`). Anything else (a guard's refusal included) is routed as usual.
    fn answer_now<B>(&self, req: &http::Request<B>, asker: &Asker) -> Option<Response> {
        if req.method() != http::Method::GET {
            return None;
        }
        let route = match req.uri().path() {
            imds::PATH | imds::PATH_SLASH => Route::Imds,
            app_service::PATH | app_service::PATH_SLASH | app_service::PATH_DOUBLE_SLASH => Route::Msi,
            _ => return None,
        };
        if size_guard(req).is_some() || host_guard(req.headers()).is_some() {
            return None;
        }
        let (headers, query) = (req.headers(), req.uri().query());
        let (dialect, answer) = match route {
            Route::Imds => (Dialect::Imds, imds::token_now(&self.broker, asker, headers, query)?),
            _ => app_service::token_now(&self.broker, asker, headers, query)?,
        };
        crate::metrics::get().request(route, dialect.metric_index(), answer.status().as_u16());
        Some(answer)
    }
}

impl<S> tower::Service<Request> for Guarded<S>
where
    S: tower::Service<Request, Response = Response, Error = Infallible>,
{
    type Response = Response;
    type Error = Infallible;
    type Future = GuardFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request) -> Self::Future {
        let path = req.uri().path();
        let route = match path {
            imds::PATH | imds::PATH_SLASH => Route::Imds,
            app_service::PATH | app_service::PATH_SLASH | app_service::PATH_DOUBLE_SLASH => Route::Msi,
            "/healthz" | "/readyz" => Route::Health,
            _ => Route::Other,
        };
        let dialect = Dialect::for_request(req.method(), path);
        // `/healthz` says nothing but "alive", and probes send any Host: it is the one route exempt.
        let refused = size_guard(&req).or_else(|| if path == "/healthz" { None } else { host_guard(req.headers()) });
        if let Some(e) = refused {
            return GuardFuture::Refused { answer: Some(e.into_response(dialect)), route };
        }
        GuardFuture::Routed { inner: self.inner.call(req), timer: None, route, dialect }
    }
}

pin_project_lite::pin_project! {
    /// [`Guarded`]'s future: an answer the guards gave, or the routes' future under the request timer.
    #[project = GuardProj]
    pub(crate) enum GuardFuture<F> {
        /// Refused by a guard.
        Refused { answer: Option<Response>, route: Route },
        /// Passed on to the routes.
        Routed {
            #[pin]
            inner: F,
            #[pin]
            timer: Option<tokio::time::Sleep>,
            route: Route,
            dialect: Dialect,
        },
    }
}

impl<F: Future<Output = Result<Response, Infallible>>> Future for GuardFuture<F> {
    type Output = Result<Response, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let (answer, route) = match self.project() {
            GuardProj::Refused { answer, route } => {
                (answer.take().unwrap_or_else(|| StatusCode::INTERNAL_SERVER_ERROR.into_response()), *route)
            }
            GuardProj::Routed { inner, mut timer, route, dialect } => match inner.poll(cx) {
                Poll::Ready(Ok(answer)) => (answer, *route),
                Poll::Pending => {
                    if timer.is_none() {
                        // From the first poll: microseconds after the request started.
                        timer.set(Some(tokio::time::sleep(REQUEST_TIMEOUT)));
                    }
                    match timer.as_pin_mut().map(|t| t.poll(cx)) {
                        Some(Poll::Ready(())) => (timed_out(*dialect), *route),
                        _ => return Poll::Pending,
                    }
                }
            },
        };
        let dialect =
            answer.extensions().get::<Dialect>().map_or(crate::metrics::DIALECTS.len() - 1, |d| d.metric_index());
        crate::metrics::get().request(route, dialect, answer.status().as_u16());
        Poll::Ready(Ok(answer))
    }
}

/// The answer to a request still unanswered after [`REQUEST_TIMEOUT`].
fn timed_out(dialect: Dialect) -> Response {
    RequestError {
        status: StatusCode::SERVICE_UNAVAILABLE,
        code: "temporarily_unavailable",
        description: format!("the request was not answered within {}s", REQUEST_TIMEOUT.as_secs()),
        retry_after: Some(1),
    }
    .into_response(dialect)
}

/// The refusal of a request whose `Host` is a DNS name other than a loopback one ([`host_allowed`]:
/// DNS rebinding), as a 400; `None` when it may be answered (or carries no `Host`, as HTTP/1.0 allows).
/// The token listeners apply it to every route but `/healthz`; the metrics listener to `/metrics`.
pub(crate) fn host_guard(headers: &http::HeaderMap) -> Option<RequestError> {
    let host = headers.get(header::HOST)?;
    if host.to_str().is_ok_and(host_allowed) {
        return None;
    }
    let shown: String = String::from_utf8_lossy(host.as_bytes()).chars().take(100).collect();
    Some(RequestError::bad_request(format!(
        "header Host {shown:?} is not an IP address or a loopback name; tokend only answers requests addressed to \
         this machine by address or as localhost"
    )))
}

/// Longest request target answered (real ones are a few hundred bytes).
pub(crate) const MAX_URI_BYTES: usize = 8 * 1024;
/// Largest total of header names and values answered.
pub(crate) const MAX_HEADER_BYTES: usize = 16 * 1024;

/// Oversized request targets and headers get a 414/431 in the dialect's shape (hyper closes the
/// connection with a bare 431 only beyond `Limits::max_head_bytes`).
fn size_guard<B>(req: &http::Request<B>) -> Option<RequestError> {
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
        return None;
    };
    Some(RequestError { status, code: "invalid_request", description, retry_after: None })
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
    .into_response(Dialect::for_request(req.method(), path))
}

async fn method_not_allowed(req: Request) -> Response {
    let method = req.method().clone();
    let msi = req.uri().path().starts_with("/msi/");
    let (allow, hint) =
        if msi { ("GET, HEAD, POST", "use GET, or POST with a form body") } else { ("GET, HEAD", "use GET") };
    let mut resp = RequestError {
        status: StatusCode::METHOD_NOT_ALLOWED,
        code: "method_not_allowed",
        description: format!("method {method} is not allowed; {hint}"),
        retry_after: None,
    }
    .into_response(Dialect::for_request(req.method(), req.uri().path()));
    resp.headers_mut().insert(header::ALLOW, header::HeaderValue::from_static(allow));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    use axum::body::Body;
    use http_body_util::BodyExt;
    use tokio_util::sync::CancellationToken;
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

    fn app() -> (App, tempfile::TempDir) {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("secret"), "s").expect("write");
        let text = "[[identity]]\nclient_id = \"cid\"\ntoken_url = \"http://127.0.0.1:9/t\"\nclient_secret_file = \"secret\"\n";
        let config = crate::config::Config::from_toml(text, &dir.path().join("t.toml"), &|_| None).expect("config");
        let broker = Broker::start(
            &config,
            "header-secret".to_owned().into(),
            None,
            Arc::new(Fixed),
            &tokio_util::task::TaskTracker::new(),
            &CancellationToken::new(),
        );
        (router(broker), dir)
    }

    async fn call(app: &App, req: axum::http::Request<Body>) -> (StatusCode, axum::http::HeaderMap, serde_json::Value) {
        let resp = app.clone().oneshot(req).await.expect("infallible");
        let (parts, body) = resp.into_parts();
        let bytes = body.collect().await.expect("body").to_bytes();
        (parts.status, parts.headers, serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null))
    }

    fn request(uri: &str) -> axum::http::request::Builder {
        axum::http::Request::get(uri).header(header::HOST, "127.0.0.1:50342")
    }

    /// What the server answers before routing (`Application::answer_now`) is what the routes answer,
    /// byte for byte but for the per-answer parts (App Service's correlation id, the seconds left); a
    /// cache miss, a guard's refusal and anything but a token GET are left to the routes, untouched.
    #[tokio::test]
    async fn answered_at_once_exactly_as_routed() {
        let (app, _dir) = app();
        let asker = Asker::new(crate::caller::Caller::Unknown(crate::caller::Unknown::LookupFailed), None);
        let imds = "/metadata/identity/oauth2/token?api-version=2018-02-01&resource=";
        let msi = "/msi/token?api-version=2019-08-01&resource=";
        let build = |uri: &str, headers: &[(&str, &str)]| {
            let mut b = request(uri);
            for (k, v) in headers {
                b = b.header(*k, *v);
            }
            b.body(Body::empty()).expect("req")
        };
        let comparable = |mut body: serde_json::Value| {
            if let Some(o) = body.as_object_mut() {
                for per_answer in ["correlationId", "expires_in", "ext_expires_in"] {
                    o.remove(per_answer);
                }
            }
            body
        };
        // Not cached yet: left to the routes, which fetch it; then it is answered at once.
        let cold = format!("{imds}https://vault.azure.net");
        assert!(app.answer_now(&build(&cold, &[("Metadata", "true")]), &asker).is_none(), "a miss waits");
        assert_eq!(call(&app, build(&cold, &[("Metadata", "true")])).await.0, StatusCode::OK);
        assert!(app.answer_now(&build(&cold, &[("Metadata", "true")]), &asker).is_some(), "then cached");
        let storage = "https://storage.azure.com";
        let at_once: Vec<(String, Vec<(&str, &str)>)> = vec![
            (format!("{imds}{storage}"), vec![("Metadata", "true")]),
            (format!("{imds}{storage}"), vec![]),
            (format!("{imds}{storage}"), vec![("Metadata", "true"), ("X-Forwarded-For", "10.0.0.1")]),
            (
                format!("/metadata/identity/oauth2/token?api-version=2017-01-01&resource={storage}"),
                vec![("Metadata", "true")],
            ),
            (format!("{imds}{storage}&client_id=nobody"), vec![("Metadata", "true")]),
            ("/metadata/identity/oauth2/token?api-version=2018-02-01".to_owned(), vec![("Metadata", "true")]),
            (format!("{imds}not%20a%20url"), vec![("Metadata", "true")]),
            (format!("{msi}{storage}"), vec![("X-IDENTITY-HEADER", "header-secret")]),
            (format!("{msi}{storage}"), vec![("X-IDENTITY-HEADER", "nope")]),
            (format!("{msi}{storage}"), vec![]),
            (
                format!("/msi/token?api-version=2017-09-01&resource={storage}&clientid=cid"),
                vec![("secret", "header-secret")],
            ),
            (format!("/msi/token/?api-version=2017-09-01&resource={storage}"), vec![("secret", "nope")]),
        ];
        // The routes' first answer for storage fetches it; answer_now must then match them all.
        assert_eq!(call(&app, build(&at_once[0].0, &at_once[0].1)).await.0, StatusCode::OK);
        for (uri, headers) in &at_once {
            let now = app.answer_now(&build(uri, headers), &asker).unwrap_or_else(|| panic!("{uri} answered at once"));
            let (parts, body) = now.into_parts();
            let exact = axum::body::HttpBody::size_hint(&body).exact();
            let bytes = body.collect().await.expect("body").to_bytes();
            let now_body = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
            let (status, mut routed_headers, routed_body) = call(&app, build(uri, headers)).await;
            // axum sets Content-Length itself; hyper does on the wire, from the body's exact size.
            let length = routed_headers.remove(header::CONTENT_LENGTH);
            assert_eq!(exact.map(|n| n.to_string()), length.map(|v| v.to_str().unwrap_or_default().to_owned()));
            assert_eq!((parts.status, &parts.headers), (status, &routed_headers), "{uri} {headers:?}");
            assert_eq!(comparable(now_body), comparable(routed_body), "{uri} {headers:?}");
        }
        let routed_only = [
            axum::http::Request::get(format!("{imds}{storage}"))
                .header(header::HOST, "evil.example")
                .header("Metadata", "true"),
            axum::http::Request::post("/msi/token").header(header::HOST, "localhost").header("Metadata", "true"),
            request("/healthz"),
            request("/nope"),
        ];
        for b in routed_only {
            let req = b.body(Body::empty()).expect("req");
            assert!(app.answer_now(&req, &asker).is_none(), "{} {} is routed", req.method(), req.uri());
        }
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
        // DNS rebinding: /readyz names identities and resources, so it is guarded; /healthz says nothing.
        let rebound =
            |path: &str| axum::http::Request::get(path).header(header::HOST, "attacker.example").body(Body::empty());
        let (status, _, body) = call(&app, rebound("/readyz").expect("req")).await;
        assert!(
            status == StatusCode::BAD_REQUEST && body["error_description"].as_str().is_some_and(|d| d.contains("Host")),
            "{status} {body}"
        );
        let (status, _, body) = call(&app, rebound("/healthz").expect("req")).await;
        assert_eq!((status, body["status"].as_str()), (StatusCode::OK, Some("alive")));
        for host in ["10.1.2.3:50342", "[fd00::1]:50342", "localhost:50342"] {
            let req = axum::http::Request::get("/readyz").header(header::HOST, host).body(Body::empty()).expect("req");
            assert_eq!(call(&app, req).await.0, StatusCode::OK, "{host}");
        }
    }

    /// App Service 2017 / Azure ML (`secret`, `clientid`) and the Cloud Shell POST, at the App Service path.
    #[tokio::test]
    async fn the_older_dialects_at_the_app_service_path() {
        let (app, _dir) = app();
        let get_2017 = |query: &str, secret: Option<&str>| {
            let mut r =
                request(&format!("/msi/token/?resource=https://storage.azure.com&api-version=2017-09-01{query}"));
            if let Some(s) = secret {
                r = r.header("secret", s);
            }
            r.body(Body::empty()).expect("req")
        };
        let (status, _, body) = call(&app, get_2017("&clientid=cid", Some("header-secret"))).await;
        assert_eq!((status, body["access_token"].as_str()), (StatusCode::OK, Some("fixed-token")), "{body}");
        // msrestazure with MSI_ENDPOINT ending in a slash, as App Service's own value did.
        let double = request("/msi/token//?resource=https://storage.azure.com&api-version=2017-09-01")
            .header("secret", "header-secret")
            .body(Body::empty())
            .expect("req");
        assert_eq!(call(&app, double).await.0, StatusCode::OK);
        assert!(body["expires_on"].as_str().is_some_and(|v| v.bytes().all(|b| b.is_ascii_digit())), "epoch: {body}");
        assert_eq!(
            (body["resource"].as_str(), body["token_type"].as_str()),
            (Some("https://storage.azure.com"), Some("Bearer"))
        );
        for (secret, needle) in [(None, "header secret is missing"), (Some("nope"), "does not match MSI_SECRET")] {
            let (status, _, body) = call(&app, get_2017("", secret)).await;
            assert_eq!((status, body["statusCode"].as_u64()), (StatusCode::UNAUTHORIZED, Some(401)), "{body}");
            assert!(body["message"].as_str().is_some_and(|m| m.contains(needle)), "{body}");
        }
        // Either header carries the secret with either version, but only once.
        let other_header = request("/msi/token?resource=https://storage.azure.com&api-version=2017-09-01")
            .header("X-IDENTITY-HEADER", "header-secret")
            .body(Body::empty())
            .expect("req");
        assert_eq!(call(&app, other_header).await.0, StatusCode::OK);
        let both = request("/msi/token?resource=https://storage.azure.com&api-version=2019-08-01")
            .header("X-IDENTITY-HEADER", "header-secret")
            .header("secret", "header-secret")
            .body(Body::empty())
            .expect("req");
        assert_eq!(call(&app, both).await.0, StatusCode::UNAUTHORIZED);
        let (status, _, body) = call(&app, get_2017("&clientid=nobody", Some("header-secret"))).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "an unknown clientid is a 400, never a 404: {body}");

        let post = |content_type: &str, body: &str, metadata: bool| {
            let mut r = axum::http::Request::post("/msi/token").header(header::HOST, "localhost");
            if metadata {
                r = r.header("Metadata", "true");
            }
            r.header(header::CONTENT_TYPE, content_type).body(Body::from(body.to_owned())).expect("req")
        };
        let form = "application/x-www-form-urlencoded";
        let (status, _, body) =
            call(&app, post(form, "resource=https%3A%2F%2Fvault.azure.net&client_id=cid", true)).await;
        assert_eq!((status, body["access_token"].as_str()), (StatusCode::OK, Some("fixed-token")), "{body}");
        assert_eq!(body["resource"], "https://vault.azure.net");
        let cases = [
            (post(form, "resource=r", false), StatusCode::BAD_REQUEST, "Required metadata header"),
            (post("application/json", r#"{"resource":"r"}"#, true), StatusCode::UNSUPPORTED_MEDIA_TYPE, "Content-Type"),
            (post(form, &format!("resource=r&x={}", "a".repeat(5000)), true), StatusCode::PAYLOAD_TOO_LARGE, "4096"),
            (post(form, "client_id=cid", true), StatusCode::BAD_REQUEST, "form field resource is required"),
            (
                post(form, "resource=r&resource=s", true),
                StatusCode::BAD_REQUEST,
                "form field \"resource\" appears more than once",
            ),
            (post(form, "resource=r&object_id=nobody", true), StatusCode::BAD_REQUEST, "Identity not found"),
        ];
        for (req, expected, needle) in cases {
            let (status, _, body) = call(&app, req).await;
            assert_eq!(status, expected, "{body}");
            assert!(body["error_description"].as_str().is_some_and(|d| d.contains(needle)), "{needle}: {body}");
        }
        let with_query = axum::http::Request::post("/msi/token?resource=r")
            .header(header::HOST, "localhost")
            .header("Metadata", "true")
            .header(header::CONTENT_TYPE, form)
            .body(Body::from("resource=r"))
            .expect("req");
        assert_eq!(call(&app, with_query).await.0, StatusCode::BAD_REQUEST);
        let put =
            axum::http::Request::put("/msi/token").header(header::HOST, "localhost").body(Body::empty()).expect("req");
        let (status, headers, _) = call(&app, put).await;
        assert_eq!(
            (status, &headers[header::ALLOW]),
            (StatusCode::METHOD_NOT_ALLOWED, &header::HeaderValue::from_static("GET, HEAD, POST"))
        );
    }

    /// The request timer: armed only when the answer is not ready at once, it answers a request that
    /// outlives REQUEST_TIMEOUT with a 503 in the route's dialect (time is paused and auto-advanced).
    #[tokio::test(start_paused = true)]
    async fn a_request_that_outlives_the_timer_gets_a_503_in_its_dialect() {
        let never = Router::new().fallback(std::future::pending::<Response>);
        let (app, _dir) = app();
        let guarded = Guarded { inner: never, broker: app.broker };
        let started = tokio::time::Instant::now();
        let (status, headers, body) =
            call(&guarded, request("/msi/token?resource=r").body(Body::empty()).expect("req")).await;
        assert_eq!((status, headers[header::RETRY_AFTER].to_str().ok()), (StatusCode::SERVICE_UNAVAILABLE, Some("1")));
        assert_eq!(body["statusCode"].as_u64(), Some(503), "App Service shape: {body}");
        assert_eq!(started.elapsed(), REQUEST_TIMEOUT);
        let (status, _, body) =
            call(&guarded, request("/metadata/identity/oauth2/token").body(Body::empty()).expect("req")).await;
        assert_eq!(
            (status, body["error"].as_str()),
            (StatusCode::SERVICE_UNAVAILABLE, Some("temporarily_unavailable"))
        );
    }

    #[test]
    fn host_names_and_addresses() {
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
            "10.1.2.4:9464",
            "[fd00::2]:1",
            "169.254.169.254",
            "0.0.0.0:50342",
        ] {
            assert!(host_allowed(ok), "{ok}");
        }
        for bad in [
            "evil.example",
            "evil.example:50342",
            "localhost.evil.example",
            "",
            "127.0.0.1.nip.io",
            "10.1.2.3.nip.io:80",
            "[evil.example]",
            "0x7f.1",
            "2130706433",
            "[fe80::1%25eth0]",
        ] {
            assert!(!host_allowed(bad), "{bad}");
        }
    }
}
