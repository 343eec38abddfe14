//! The IMDS dialect: `GET /metadata/identity/oauth2/token` with `Metadata: true`.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::HeaderMap;
use axum::response::Response;

use super::{
    Asker, Dialect, RequestError, TokenQuery, answer, answer_now, check_api_version, check_not_proxied, parse_query,
    refuse_unaudited, require_metadata,
};
use crate::broker::Broker;

/// The path every IMDS client calls.
pub(crate) const PATH: &str = "/metadata/identity/oauth2/token";
/// The same with the trailing slash msal-node adds.
pub(crate) const PATH_SLASH: &str = "/metadata/identity/oauth2/token/";
/// Oldest api-version accepted.
pub(crate) const MIN_API_VERSION: &str = "2018-02-01";

/// The handler. A request without `Metadata: true` (DefaultAzureCredential's probe) gets IMDS's 400 at
/// once; so does one that a proxy forwarded (IMDS's SSRF rule).
pub(crate) async fn token(State(broker): State<Arc<Broker>>, asker: Asker, req: Request) -> Response {
    let checked = match checks(req.headers(), req.uri().query()) {
        Ok(checked) => checked,
        Err(probe) => return refuse_unaudited(&broker, &asker, Dialect::Imds, probe),
    };
    match answer(&broker, &asker, Dialect::Imds, checked).await {
        Ok(r) => r,
        Err(e) => e.into_response(Dialect::Imds),
    }
}

/// The handler's answer if it needs no waiting (see [`answer_now`]); `None` if it must wait.
pub(crate) fn token_now(broker: &Broker, asker: &Asker, headers: &HeaderMap, query: Option<&str>) -> Option<Response> {
    let checked = match checks(headers, query) {
        Ok(checked) => checked,
        Err(probe) => return Some(refuse_unaudited(broker, asker, Dialect::Imds, probe)),
    };
    Some(answer_now(broker, asker, Dialect::Imds, &checked)?.unwrap_or_else(|e| e.into_response(Dialect::Imds)))
}

/// `Err`: the availability probe's 400, not audited (DefaultAzureCredential sends it every time it
/// starts). `Ok`: the query, or why the request fails IMDS's other checks (audited).
fn checks<'q>(
    headers: &HeaderMap,
    query: Option<&'q str>,
) -> Result<Result<TokenQuery<'q>, RequestError>, RequestError> {
    require_metadata(headers).inspect_err(|_| {
        tracing::debug!(
            "IMDS request without `Metadata: true` answered 400 (an availability probe, or a misconfigured client)"
        );
    })?;
    Ok(check(headers, query))
}

/// The rest of IMDS's checks: no proxy headers, a valid query and api-version.
fn check<'q>(headers: &HeaderMap, query: Option<&'q str>) -> Result<TokenQuery<'q>, RequestError> {
    check_not_proxied(headers)?;
    let q = parse_query(query)?;
    check_api_version(q.api_version.as_deref(), MIN_API_VERSION)?;
    Ok(q)
}
