//! The managed-identity wire formats. Only this module (and its children) knows them.
//!
//! - [`imds`]: `GET /metadata/identity/oauth2/token` (Azure VM metadata service).
//! - [`app_service`]: `GET /msi/token` — App Service 2019 (`IDENTITY_ENDPOINT` + `X-IDENTITY-HEADER`)
//!   and, with `api-version=2017-09-01`, App Service 2017 / Azure ML compute (`MSI_ENDPOINT` +
//!   `MSI_SECRET`, in a `secret` header; `clientid`).
//! - [`cloud_shell`]: `POST /msi/token` with a form body and `Metadata: true` (`MSI_ENDPOINT` alone:
//!   Cloud Shell, and msrestazure whenever `MSI_ENDPOINT` is set).
//!
//! All share the parameter grammar, the success body (every number a string of digits, `expires_in`
//! the seconds *remaining*, `expires_on` epoch seconds — the one spelling every client parses) and the
//! mapping from [`TokenError`] to a status code; they differ in the guard headers and in the error
//! body's shape.

pub(crate) mod app_service;
pub(crate) mod cloud_shell;
pub(crate) mod imds;
mod query;

pub(crate) use query::{Params, TokenQuery, check_api_version, parse_params, parse_query};

use std::convert::Infallible;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::SystemTime;

use axum::body::{Body, Bytes};
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use secrecy::{ExposeSecret, SecretString};

use crate::audit::Record;
use crate::broker::Broker;
use crate::caller::{Caller, Unknown};
use crate::clock::unix_secs;
use crate::identity::Identity;
use crate::process::ProcessLookup;
use crate::resource::Resource;
use crate::snapshot::Snapshot;
use crate::token::{AccessToken, HeldToken, Served, TokenError};

/// `Metadata` (IMDS and Cloud Shell require `true`).
const METADATA: header::HeaderName = header::HeaderName::from_static("metadata");

/// Headers a proxy adds: IMDS refuses requests that carry them.
const PROXY_HEADERS: [header::HeaderName; 2] = [header::HeaderName::from_static("x-forwarded-for"), header::FORWARDED];

/// `Metadata: true`, with IMDS's own 400 when it is missing.
fn require_metadata(headers: &HeaderMap) -> Result<(), RequestError> {
    match header_str(headers, &METADATA) {
        Some("true") => Ok(()),
        _ => Err(RequestError::bad_request("Required metadata header not specified")),
    }
}

/// IMDS's checks shared with the Cloud Shell POST: `Metadata: true` and no proxy headers.
fn check_metadata(headers: &HeaderMap) -> Result<(), RequestError> {
    require_metadata(headers)?;
    check_not_proxied(headers)
}

/// No proxy headers (IMDS's SSRF rule).
fn check_not_proxied(headers: &HeaderMap) -> Result<(), RequestError> {
    match PROXY_HEADERS.iter().find(|h| headers.contains_key(*h)) {
        Some(h) => Err(RequestError::bad_request(format!(
            "header {h} is not allowed: the metadata endpoint does not accept proxied requests"
        ))),
        None => Ok(()),
    }
}

/// How long the first answer on a connection waits for the caller's process lookup (audit log only).
const PROCESS_WAIT: std::time::Duration = std::time::Duration::from_millis(250);

/// Which dialect answers: decides the error body's shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dialect {
    /// IMDS: errors `{"error": .., "error_description": ..}`
    Imds,
    /// App Service 2019: errors `{"statusCode": .., "message": .., "correlationId": ..}`
    AppService,
    /// App Service 2017 / Azure ML: errors in the App Service shape.
    AzureMl,
    /// The Cloud Shell POST: errors in the IMDS shape (it is IMDS's protocol over a form body).
    CloudShell,
}

impl Dialect {
    /// The dialect whose error shape fits a request (under `/msi/`: App Service, but Cloud Shell for a
    /// POST to a token path; IMDS elsewhere).
    pub(crate) fn for_request(method: &axum::http::Method, path: &str) -> Self {
        let token_path = [app_service::PATH, app_service::PATH_SLASH, app_service::PATH_DOUBLE_SLASH].contains(&path);
        match (path.starts_with("/msi/"), token_path && *method == axum::http::Method::POST) {
            (true, true) => Self::CloudShell,
            (true, false) => Self::AppService,
            (false, _) => Self::Imds,
        }
    }

    /// Its index in `metrics::DIALECTS`.
    pub(crate) fn metric_index(self) -> usize {
        match self {
            Self::Imds => 0,
            Self::AppService => 1,
            Self::AzureMl => 2,
            Self::CloudShell => 3,
        }
    }

    /// Its name in logs and audit lines.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Imds => "imds",
            Self::AppService => "app_service",
            Self::AzureMl => "azureml",
            Self::CloudShell => "cloud_shell",
        }
    }
}

/// An error answered to a caller: status, OAuth-style code, human description naming what is at fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RequestError {
    /// HTTP status.
    pub status: StatusCode,
    /// Short code (`invalid_request`, ...), used in the IMDS shape.
    pub code: &'static str,
    /// Description; names the header or parameter at fault. Never a secret.
    pub description: String,
    /// Seconds for `Retry-After` (503 only).
    pub retry_after: Option<u64>,
}

impl RequestError {
    /// A 400 `invalid_request`.
    pub(crate) fn bad_request(description: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            code: "invalid_request",
            description: description.into(),
            retry_after: None,
        }
    }

    /// Renders the error in `dialect`'s shape.
    pub(crate) fn into_response(self, dialect: Dialect) -> Response {
        let body = match dialect {
            Dialect::Imds | Dialect::CloudShell => {
                serde_json::json!({ "error": self.code, "error_description": self.description })
            }
            Dialect::AppService | Dialect::AzureMl => serde_json::json!({
                "statusCode": self.status.as_u16(),
                "message": self.description,
                "correlationId": uuid::Uuid::new_v4().to_string(),
            }),
        };
        let mut resp = (self.status, axum::Json(body)).into_response();
        if let Some(secs) = self.retry_after {
            resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        resp.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        resp.extensions_mut().insert(dialect);
        resp
    }
}

impl From<TokenError> for RequestError {
    fn from(e: TokenError) -> Self {
        let description = e.to_string();
        match e {
            TokenError::Unavailable { retry_after, .. } => Self {
                status: StatusCode::SERVICE_UNAVAILABLE,
                code: "temporarily_unavailable",
                description,
                retry_after: Some(whole_seconds(retry_after)),
            },
            TokenError::CredentialRejected { .. } => Self {
                status: StatusCode::INTERNAL_SERVER_ERROR,
                code: "invalid_client",
                description,
                retry_after: None,
            },
            TokenError::BadResource { .. } => {
                Self { status: StatusCode::BAD_REQUEST, code: "invalid_resource", description, retry_after: None }
            }
            TokenError::TooManyResources { retry_after, .. } | TokenError::AddingTooFast { retry_after, .. } => Self {
                status: StatusCode::TOO_MANY_REQUESTS,
                code: "too_many_requests",
                description,
                retry_after: Some(whole_seconds(retry_after)),
            },
            TokenError::Failed { .. } => Self {
                status: StatusCode::INTERNAL_SERVER_ERROR,
                code: "upstream_error",
                description,
                retry_after: None,
            },
        }
    }
}

/// `Retry-After` seconds: an integer, rounded up, at least 1.
fn whole_seconds(d: std::time::Duration) -> u64 {
    (d.as_secs() + u64::from(d.subsec_nanos() > 0)).max(1)
}

/// Who is asking: the connection's [`Caller`] and, when the audit log wants it, the lookup of its
/// process (both request extensions set by the accept loop).
#[derive(Debug, Clone)]
pub(crate) struct Asker {
    caller: Caller,
    process: Option<Arc<ProcessLookup>>,
}

impl Asker {
    /// A connection's caller and, when the audit log wants it, the lookup of its process.
    pub(crate) fn new(caller: Caller, process: Option<Arc<ProcessLookup>>) -> Self {
        Self { caller, process }
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Asker {
    type Rejection = Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Infallible> {
        // The accept loop sets it on every request; it is missing only in router unit tests: treat that
        // as a failed lookup.
        Ok(parts.extensions.get::<Self>().cloned().unwrap_or(Self::new(Caller::Unknown(Unknown::LookupFailed), None)))
    }
}

/// Answers a checked query (or passes on why the request failed its dialect's checks) with a token or
/// an error; either way one audit line. A cached token is answered without waiting ([`answer_now`]);
/// only a cache miss, or the first request of a connection whose process the audit log looks up, waits.
pub(crate) async fn answer(
    broker: &Broker,
    asker: &Asker,
    dialect: Dialect,
    checked: Result<TokenQuery<'_>, RequestError>,
) -> Result<Response, RequestError> {
    let result = match answer_now(broker, asker, dialect, &checked) {
        Some(now) => now,
        // Boxed: the waiting path's state stays out of every request's future.
        None => Box::pin(answer_waiting(broker, asker, dialect, checked)).await,
    };
    result.map(|mut resp| {
        resp.extensions_mut().insert(dialect);
        resp
    })
}

/// The answer to a checked query if it needs no waiting: a cached token, or an error. `None` when it
/// must wait (a cache miss, or the first request of a connection whose process the audit log looks up),
/// and then nothing has been done: no audit line, no metric, no rate-limit budget taken.
///
/// This is the whole of a cached token's answer: the server calls it for each token GET before routing
/// (`server::Application::answer_now`), borrowing the connection's [`Asker`], so that a cached token costs
/// no clone of anything shared, no future and no allocation but the answer's.
pub(crate) fn answer_now(
    broker: &Broker,
    asker: &Asker,
    dialect: Dialect,
    checked: &Result<TokenQuery<'_>, RequestError>,
) -> Option<Result<Response, RequestError>> {
    let audit = broker.audit();
    if audit.is_some() && asker.process.as_ref().is_some_and(|p| !p.claimed()) {
        return None;
    }
    let started = audit.map(|_| std::time::Instant::now());
    let snapshot = broker.snapshot();
    let mut seen = Seen::default();
    let result = match checked {
        Ok(q) => decide_now(broker, &snapshot, &asker.caller, dialect, q, &mut seen)?,
        Err(e) => Err(e.clone()),
    };
    if let (Some(log), Some(started)) = (audit, started) {
        let resource = checked.as_ref().ok().and_then(|q| q.resource.as_deref());
        // STUB(coordinator): the request path's answer to `Err` (503 with `refuses()`) is the coordinator's.
        let _ =
            log.record(&asker.caller, asker.process.clone(), &audit_record(dialect, resource, &seen, &result, started));
    }
    Some(result)
}

/// The rest of [`answer`]: the caller's process looked up (once per connection, on a blocking thread,
/// alongside the decision: the first answer on a connection waits for it, at most [`PROCESS_WAIT`],
/// because a client that has its answer may close and exit at once, and then there is nothing left to
/// look up) and the token waited for.
async fn answer_waiting(
    broker: &Broker,
    asker: &Asker,
    dialect: Dialect,
    checked: Result<TokenQuery<'_>, RequestError>,
) -> Result<Response, RequestError> {
    let Asker { caller, process } = asker;
    let audit = broker.audit();
    let process = process.as_ref().filter(|_| audit.is_some());
    let lookup = process.filter(|p| p.claim()).map(|p| {
        let p = p.clone();
        tokio::task::spawn_blocking(move || p.resolve().map(|_| ()))
    });
    let started = audit.map(|_| std::time::Instant::now());
    let snapshot = broker.snapshot();
    let mut seen = Seen::default();
    let (result, raw_resource) = match &checked {
        Ok(q) => (decide(broker, &snapshot, caller, dialect, q, &mut seen).await, q.resource.as_deref()),
        Err(e) => (Err(e.clone()), None),
    };
    if let Some(lookup) = lookup
        && tokio::time::timeout(PROCESS_WAIT, lookup).await.is_err()
    {
        tracing::debug!(%caller, "the caller's process lookup is slow; answering without waiting for it");
    }
    if let (Some(log), Some(started)) = (audit, started) {
        // STUB(coordinator): see `answer_now`.
        let _ = log.record(caller, process.cloned(), &audit_record(dialect, raw_resource, &seen, &result, started));
    }
    result
}

/// The audit line of an answer.
fn audit_record<'r>(
    dialect: Dialect,
    resource: Option<&'r str>,
    seen: &'r Seen<'_>,
    result: &'r Result<Response, RequestError>,
    started: std::time::Instant,
) -> Record<'r> {
    let (decision, status, reason) = match result {
        Ok(_) => ("issued", 200, None),
        Err(e) if matches!(e.status, StatusCode::FORBIDDEN | StatusCode::UNAUTHORIZED) => {
            ("denied", e.status.as_u16(), Some(e.description.as_str()))
        }
        Err(e) if seen.rate_limited => ("rate_limited", e.status.as_u16(), Some(e.description.as_str())),
        Err(e) => ("error", e.status.as_u16(), Some(e.description.as_str())),
    };
    Record {
        dialect: dialect.name(),
        identity: seen.identity,
        resource,
        decision,
        rule: seen.rule,
        cache: seen.cache_hit.map(|hit| if hit { "hit" } else { "fetch" }),
        on_demand: false,
        status,
        latency_ms: started.elapsed().as_secs_f64() * 1000.0,
        token: seen.token.as_deref().map(AccessToken::fingerprint),
        reason,
    }
}

/// What `decide` got to, for the audit line (borrowed: nothing is copied on the request path).
#[derive(Debug, Default)]
struct Seen<'s> {
    identity: Option<&'s str>,
    rule: Option<usize>,
    rate_limited: bool,
    cache_hit: Option<bool>,
    token: Option<HeldToken>,
}

/// [`decide`] for a cached token: `None`, having done nothing, when the token is not cached.
fn decide_now<'s>(
    broker: &Broker,
    snapshot: &'s Snapshot,
    caller: &Caller,
    dialect: Dialect,
    q: &TokenQuery<'_>,
    seen: &mut Seen<'s>,
) -> Option<Result<Response, RequestError>> {
    let (identity, resource) = match prepare(snapshot, caller, dialect, q, seen) {
        Ok(found) => found,
        Err(e) => return Some(Err(e)),
    };
    let served = broker.cache().hit(snapshot, identity, &resource)?;
    Some(
        allow(broker, snapshot, caller, identity, &resource, dialect, seen)
            .map(|()| serve(served, caller, identity, q, &resource, dialect, seen)),
    )
}

/// Resolves the identity and resource of a checked query and answers with a token (waiting for one
/// when none is cached) or an error.
async fn decide<'s>(
    broker: &Broker,
    snapshot: &'s Snapshot,
    caller: &Caller,
    dialect: Dialect,
    q: &TokenQuery<'_>,
    seen: &mut Seen<'s>,
) -> Result<Response, RequestError> {
    let (identity, resource) = prepare(snapshot, caller, dialect, q, seen)?;
    allow(broker, snapshot, caller, identity, &resource, dialect, seen)?;
    let served = broker.cache().get(snapshot, caller, identity, &resource).await.map_err(|e| {
        tracing::info!(%caller, identity = %identity.name, %resource, ?dialect, error = %e, "token request refused");
        if matches!(e, TokenError::TooManyResources { .. } | TokenError::AddingTooFast { .. }) {
            crate::metrics::get().on_demand_refused();
        }
        RequestError::from(e)
    })?;
    Ok(serve(served, caller, identity, q, &resource, dialect, seen))
}

/// The resource and identity a query names, if the access policy lets the caller have them. Changes
/// nothing but a denial's log line and metric.
fn prepare<'s>(
    snapshot: &'s Snapshot,
    caller: &Caller,
    dialect: Dialect,
    q: &TokenQuery<'_>,
    seen: &mut Seen<'s>,
) -> Result<(&'s Identity, Resource), RequestError> {
    let raw_resource =
        q.resource.as_deref().ok_or_else(|| RequestError::bad_request("query parameter resource is required"))?;
    let resource = Resource::parse(raw_resource)
        .map_err(|e| RequestError::bad_request(format!("query parameter resource: {e}")))?;
    let identity = snapshot
        .identities
        .select(q.selector.as_ref())
        .map_err(|e| RequestError::bad_request(format!("Identity not found: {e}")))?;
    seen.identity = Some(&identity.name);
    if let Some(access) = &snapshot.access {
        seen.rule = access.decide(caller, &identity.name, &resource).map_err(|denied| {
            crate::metrics::get().denied();
            tracing::info!(%caller, identity = %identity.name, %resource, ?dialect, reason = %denied, "token request denied");
            RequestError {
                status: StatusCode::FORBIDDEN,
                code: "access_denied",
                description: denied.to_string(),
                retry_after: None,
            }
        })?;
    }
    Ok((identity, resource))
}

/// The caller's rate limit, once the request is going to be served (this takes from its budget).
fn allow(
    broker: &Broker,
    snapshot: &Snapshot,
    caller: &Caller,
    identity: &Identity,
    resource: &Resource,
    dialect: Dialect,
    seen: &mut Seen<'_>,
) -> Result<(), RequestError> {
    if snapshot.access.is_some() {
        tracing::debug!(%caller, identity = %identity.name, %resource, rule = ?seen.rule, "allowed by access policy");
    }
    let Err((rate, wait)) = broker.check_rate(caller) else { return Ok(()) };
    tracing::info!(%caller, identity = %identity.name, %resource, ?dialect, "token request rate-limited");
    seen.rate_limited = true;
    crate::metrics::get().rate_limited();
    let secs = whole_seconds(wait);
    Err(RequestError {
        status: StatusCode::TOO_MANY_REQUESTS,
        code: "too_many_requests",
        description: format!("{caller} exceeds access.rate_limit ({rate}); retry in {secs}s"),
        retry_after: Some(secs),
    })
}

/// The token answer.
fn serve(
    Served { token, cache_hit }: Served,
    caller: &Caller,
    identity: &Identity,
    q: &TokenQuery<'_>,
    resource: &Resource,
    dialect: Dialect,
    seen: &mut Seen<'_>,
) -> Response {
    tracing::debug!(%caller, identity = %identity.name, %resource, ?dialect, cache_hit, token = token.fingerprint(), "token served");
    seen.cache_hit = Some(cache_hit);
    crate::metrics::get().served(cache_hit);
    let raw_resource = q.resource.as_deref().unwrap_or(resource.as_str());
    let body = token_body(&token, &identity.client_id, raw_resource, unix_secs(SystemTime::now()));
    seen.token = Some(token);
    let mut resp = Response::new(Body::from(body));
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

/// The success body: the superset every SDK accepts, every number a string of digits, in the field
/// order `serde_json` gave it before (a unit test pins the two equal). Written straight into one buffer
/// of the right size: the token's JSON string form is kept with the token, so only the numbers, the
/// client id and the caller's resource spelling are rendered per request. The buffer is zeroed when
/// hyper is done with it (it holds the token).
pub(crate) fn token_body(token: &AccessToken, client_id: &str, resource: &str, now: u64) -> Bytes {
    let token_json = token.json_string();
    // Room for the worst case (every character of the two strings escaped as `\\u00XX`), so that no
    // reallocation leaves an unwiped copy of the token behind.
    let capacity = token_json.len() + 6 * (client_id.len() + resource.len()) + 320;
    let mut out = Vec::with_capacity(capacity);
    out.extend_from_slice(b"{\"access_token\":");
    out.extend_from_slice(token_json.as_bytes());
    out.extend_from_slice(b",\"client_id\":");
    json_string(&mut out, client_id);
    let numbers = [
        ("expires_in", token.expires_on().saturating_sub(now)),
        ("expires_on", token.expires_on()),
        ("ext_expires_in", token.ext_expires_on().saturating_sub(now)),
        ("not_before", token.not_before()),
    ];
    for (name, value) in numbers {
        out.extend_from_slice(b",\"");
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b"\":\"");
        push_digits(&mut out, value);
        out.push(b'"');
    }
    out.extend_from_slice(b",\"refresh_token\":\"\",\"resource\":");
    json_string(&mut out, resource);
    out.extend_from_slice(b",\"token_type\":\"Bearer\"}");
    debug_assert_eq!(out.capacity(), capacity, "the token body outgrew its buffer");
    crate::secret::wiped_bytes(out)
}

/// Appends `n` in decimal.
fn push_digits(out: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut start = digits.len();
    loop {
        start -= 1;
        digits[start] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[start..]);
}

/// Appends `s` as a JSON string, as `serde_json` writes it.
fn json_string(out: &mut Vec<u8>, s: &str) {
    // Nothing to escape (a client id, a resource URL: the usual case): copied as it is.
    if s.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\') {
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
        return;
    }
    // A `&str` always serialises.
    let _ = serde_json::to_writer(&mut *out, s);
}

/// Which clients `tokend env` prints the variables for. Each output first unsets the other dialects'
/// variables, because SDKs pick a route by which variables are set (azure-identity prefers
/// `IDENTITY_ENDPOINT` over `MSI_ENDPOINT`; `MSI_ENDPOINT` alone means Cloud Shell; msrestazure reads only
/// `MSI_ENDPOINT`) and a leftover one silently changes the route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum EnvDialect {
    /// `IDENTITY_ENDPOINT` + `IDENTITY_HEADER` (and `AZURE_POD_IDENTITY_AUTHORITY_HOST` for msal-node):
    /// every current SDK.
    AppService,
    /// `MSI_ENDPOINT` + `MSI_SECRET`, as on Azure ML compute.
    AzureMl,
    /// `AZURE_POD_IDENTITY_AUTHORITY_HOST` only (the IMDS route of azure-identity, msal, the Azure CLI).
    Imds,
    /// `MSI_ENDPOINT` only (Cloud Shell's POST; msrestazure).
    CloudShell,
}

/// Every variable some dialect sets.
const ENV_VARS: [&str; 5] =
    ["IDENTITY_ENDPOINT", "IDENTITY_HEADER", "AZURE_POD_IDENTITY_AUTHORITY_HOST", "MSI_ENDPOINT", "MSI_SECRET"];

impl EnvDialect {
    /// The names `tokend env --dialect` takes.
    pub(crate) const NAMES: [&'static str; 4] = ["app-service", "azureml", "imds", "cloud-shell"];

    /// Parses one of [`Self::NAMES`].
    pub(crate) fn parse(name: &str) -> Option<Self> {
        match name {
            "app-service" => Some(Self::AppService),
            "azureml" => Some(Self::AzureMl),
            "imds" => Some(Self::Imds),
            "cloud-shell" => Some(Self::CloudShell),
            _ => None,
        }
    }

    /// Whether its variables include the identity header secret.
    pub(crate) fn needs_secret(self) -> bool {
        matches!(self, Self::AppService | Self::AzureMl)
    }

    /// The `unset` and `export` lines for a broker listening on `addr`; `secret` is required when
    /// [`Self::needs_secret`].
    pub(crate) fn lines(self, addr: SocketAddr, secret: Option<&SecretString>) -> String {
        let endpoint = format!("http://{addr}{}", app_service::PATH);
        let host = format!("http://{addr}");
        let secret = secret.map_or("", |s| s.expose_secret());
        let set: Vec<(&str, &str)> = match self {
            Self::AppService => vec![
                ("IDENTITY_ENDPOINT", &endpoint),
                ("IDENTITY_HEADER", secret),
                ("AZURE_POD_IDENTITY_AUTHORITY_HOST", &host),
            ],
            Self::AzureMl => vec![("MSI_ENDPOINT", &endpoint), ("MSI_SECRET", secret)],
            Self::Imds => vec![("AZURE_POD_IDENTITY_AUTHORITY_HOST", &host)],
            Self::CloudShell => vec![("MSI_ENDPOINT", &endpoint)],
        };
        let unset: Vec<&str> = ENV_VARS.into_iter().filter(|v| !set.iter().any(|(name, _)| name == v)).collect();
        let mut out = format!("unset {}\n", unset.join(" "));
        for (name, value) in set {
            let _ = writeln!(out, "export {name}='{value}'");
        }
        out
    }
}

/// The `export` lines that point every current Azure SDK at a broker listening on `addr` (the App
/// Service variables and msal-node's `AZURE_POD_IDENTITY_AUTHORITY_HOST`); never `IMDS_ENDPOINT`.
pub(crate) fn export_lines(addr: SocketAddr, identity_header: &SecretString) -> String {
    EnvDialect::AppService.lines(addr, Some(identity_header))
}

/// A header's value as text, if present and valid.
pub(crate) fn header_str(headers: &HeaderMap, name: impl header::AsHeaderName) -> Option<&str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::Selector;

    /// The body as `serde_json` rendered it before [`token_body`] wrote it by hand.
    #[derive(serde::Serialize)]
    struct Reference<'a> {
        access_token: &'a str,
        client_id: &'a str,
        expires_in: String,
        expires_on: String,
        ext_expires_in: String,
        not_before: String,
        refresh_token: &'static str,
        resource: &'a str,
        token_type: &'static str,
    }

    #[test]
    fn the_token_body_is_what_serde_json_wrote_byte_for_byte() {
        let requested_at = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_780_000_000);
        let strings = ["eyJ0eXAi.eyJhdWQi.c2ln", "quote\" back\\slash \u{1} ctl \u{7f} é ☃ 😀 </script>", ""];
        for (i, secret) in strings.iter().enumerate() {
            let issued = crate::token::IssuedToken {
                access_token: (*secret).to_owned().into(),
                expires_in: std::time::Duration::from_secs(3599),
                ext_expires_in: (i == 0).then_some(std::time::Duration::from_secs(7199)),
                refresh_in: None,
                requested_at,
            };
            let token = AccessToken::new(issued, tokio::time::Instant::now(), std::time::Duration::from_secs(1800));
            // Plain, escaped, non-ASCII without escapes (copied as it is), empty.
            let plain = "é ☃ 😀 </script> \u{7f} api://x?y=z&w";
            for (client_id, resource) in
                [("cid", "https://storage.azure.com"), (strings[1], strings[1]), (plain, plain), ("", "")]
            {
                let now = 1_780_000_100;
                let expected = serde_json::to_vec(&Reference {
                    access_token: secret,
                    client_id,
                    expires_in: (1_780_003_599 - now).to_string(),
                    expires_on: "1780003599".to_owned(),
                    ext_expires_in: (if i == 0 { 1_780_007_199 } else { 1_780_003_599 } - now).to_string(),
                    not_before: "1780000000".to_owned(),
                    refresh_token: "",
                    resource,
                    token_type: "Bearer",
                })
                .expect("json");
                let body = token_body(&token, client_id, resource, now);
                assert_eq!(String::from_utf8_lossy(&body), String::from_utf8_lossy(&expected));
            }
            // Past expiry the numbers bottom out at zero rather than wrapping.
            let late = token_body(&token, "c", "r", 1_790_000_000);
            let late: serde_json::Value = serde_json::from_slice(&late).expect("json");
            assert_eq!((late["expires_in"].as_str(), late["ext_expires_in"].as_str()), (Some("0"), Some("0")));
        }
    }

    #[test]
    fn env_lines_set_one_dialect_and_unset_the_others() {
        let addr: SocketAddr = "127.0.0.1:50342".parse().expect("addr");
        let secret: SecretString = "s3cret".to_owned().into();
        let lines = |d: EnvDialect| d.lines(addr, Some(&secret));
        assert_eq!(
            lines(EnvDialect::AzureMl),
            "unset IDENTITY_ENDPOINT IDENTITY_HEADER AZURE_POD_IDENTITY_AUTHORITY_HOST\n\
             export MSI_ENDPOINT='http://127.0.0.1:50342/msi/token'\nexport MSI_SECRET='s3cret'\n"
        );
        assert_eq!(
            lines(EnvDialect::CloudShell),
            "unset IDENTITY_ENDPOINT IDENTITY_HEADER AZURE_POD_IDENTITY_AUTHORITY_HOST MSI_SECRET\n\
             export MSI_ENDPOINT='http://127.0.0.1:50342/msi/token'\n"
        );
        assert_eq!(
            EnvDialect::Imds.lines(addr, None),
            "unset IDENTITY_ENDPOINT IDENTITY_HEADER MSI_ENDPOINT MSI_SECRET\n\
             export AZURE_POD_IDENTITY_AUTHORITY_HOST='http://127.0.0.1:50342'\n"
        );
        let app_service = lines(EnvDialect::AppService);
        assert!(app_service.starts_with("unset MSI_ENDPOINT MSI_SECRET\n"), "{app_service}");
        assert!(app_service.contains("export IDENTITY_HEADER='s3cret'\n"), "{app_service}");
        for name in EnvDialect::NAMES {
            assert!(EnvDialect::parse(name).is_some(), "{name}");
        }
        assert!(!EnvDialect::Imds.needs_secret() && !EnvDialect::CloudShell.needs_secret());
    }

    #[test]
    fn clientid_selects_only_in_the_2017_dialect() {
        let q = parse_params(Some("resource=r&clientid=abc"), Params::Query2017).expect("valid");
        assert_eq!(q.selector, Some(Selector::ClientId("abc".into())));
        assert_eq!(parse_query(Some("resource=r&clientid=abc")).expect("valid").selector, None, "ignored elsewhere");
        let e = parse_params(Some("resource=r&clientid=a&client_id=b"), Params::Query2017).expect_err("two");
        assert!(e.description.contains("clientid"), "{}", e.description);
        let e = parse_params(Some("resource=r&resource=s"), Params::Form).expect_err("dup");
        assert!(e.description.starts_with("form field"), "{}", e.description);
    }

    #[test]
    fn parses_raw_and_encoded_queries() {
        let raw = parse_query(Some("api-version=2018-02-01&resource=https://storage.azure.com/")).expect("valid");
        let enc =
            parse_query(Some("api-version=2018-02-01&resource=https%3A%2F%2Fstorage.azure.com%2F")).expect("valid");
        assert_eq!(raw, enc);
        assert_eq!(raw.resource.as_deref(), Some("https://storage.azure.com/"));
        let q = parse_query(Some("resource=r&client_id=abc&unknown=1")).expect("valid");
        assert_eq!(q.selector, Some(Selector::ClientId("abc".into())));
        let q = parse_query(Some("resource=r&mi_res_id=%2Fsubscriptions%2Fx")).expect("valid");
        assert_eq!(q.selector, Some(Selector::ResourceId("/subscriptions/x".into())));
        assert_eq!(
            parse_query(Some("resource=r&principal_id=p")).expect("valid").selector,
            Some(Selector::ObjectId("p".into()))
        );
        assert_eq!(parse_query(Some("resource=r&client_id=")).expect("valid").selector, None);
        assert_eq!(parse_query(None).expect("valid"), TokenQuery::default());
    }

    #[test]
    fn refuses_duplicates_conflicts_and_bad_encoding() {
        let cases = [
            ("resource=a&resource=b", "appears more than once"),
            ("api-version=2018-02-01&api-version=2019-08-01", "api-version"),
            ("resource=a&client_id=x&object_id=y", "at most one"),
            ("resource=a%2", "percent-encoding"),
            ("resource=a%zz", "percent-encoding"),
            ("resource=%", "percent-encoding"),
        ];
        for (q, what) in cases {
            let e = parse_query(Some(q)).expect_err(q);
            assert_eq!(e.status, StatusCode::BAD_REQUEST);
            assert!(e.description.contains(what), "{q}: {}", e.description);
        }
    }

    #[test]
    fn api_versions() {
        for ok in ["2018-02-01", "2019-08-01", "2021-02-01", "2025-01-01-preview"] {
            assert!(check_api_version(Some(ok), "2018-02-01").is_ok(), "{ok}");
        }
        for bad in [
            None,
            Some("2017-09-01"),
            Some("2018-02-1"),
            Some("latest"),
            Some("9999-99-99"),
            Some(""),
            Some("2018-02-01x"),
        ] {
            assert!(check_api_version(bad, "2018-02-01").is_err(), "{bad:?}");
        }
        assert!(check_api_version(Some("2018-02-01"), "2019-08-01").is_err());
    }

    #[test]
    fn token_errors_map_to_statuses() {
        use std::time::Duration;
        let e = RequestError::from(TokenError::Unavailable {
            identity: "d".into(),
            cause: "x".into(),
            retry_after: Duration::from_millis(1500),
        });
        assert_eq!((e.status, e.retry_after), (StatusCode::SERVICE_UNAVAILABLE, Some(2)));
        let e = RequestError::from(TokenError::Unavailable {
            identity: "d".into(),
            cause: "x".into(),
            retry_after: Duration::ZERO,
        });
        assert_eq!(e.retry_after, Some(1));
        let e = RequestError::from(TokenError::CredentialRejected {
            identity: "default".into(),
            client_id: "c".into(),
            error: "invalid_client".into(),
        });
        assert_eq!(e.status, StatusCode::INTERNAL_SERVER_ERROR);
        assert!(e.description.contains("invalid_client") && e.description.contains("\"default\""), "{}", e.description);
        let e = RequestError::from(TokenError::BadResource { resource: "r".into(), error: "invalid_target".into() });
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
    }
}

/// Property tests ("fuzzing" in bounded mode, run by the test command): request parsing never panics
/// and never loses a resource, whatever the bytes.
#[cfg(test)]
mod props {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1000))]

        #[test]
        fn parse_query_never_panics(raw in ".{0,300}") {
            let _ = parse_query(Some(&raw));
        }

        #[test]
        fn parse_query_bytes_never_panics(raw in proptest::collection::vec(any::<u8>(), 0..300)) {
            let text = String::from_utf8_lossy(&raw);
            let _ = parse_query(Some(&text));
        }

        #[test]
        fn encoded_resources_round_trip(resource in "[a-zA-Z0-9:/._~%+ -]{1,80}", encode in any::<bool>()) {
            let query = if encode {
                form_urlencoded::Serializer::new(String::new()).append_pair("resource", &resource).finish()
            } else {
                format!("resource={}", resource.replace('%', "%25").replace('&', "%26").replace('+', "%2B").replace(' ', "%20"))
            };
            let q = parse_query(Some(&query)).expect("a well-formed query");
            prop_assert_eq!(q.resource.as_deref(), Some(resource.as_str()));
        }

        #[test]
        fn api_version_check_never_panics(v in ".{0,40}") {
            let _ = check_api_version(Some(&v), "2018-02-01");
        }
    }
}
