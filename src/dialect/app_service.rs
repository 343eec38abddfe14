//! The App Service dialect: `GET /msi/token` with `X-IDENTITY-HEADER: <secret>` (what
//! `IDENTITY_ENDPOINT` + `IDENTITY_HEADER` point clients at). `Metadata` is not required (Go omits it).

use std::sync::Arc;

use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;

use super::{Asker, Dialect, RequestError, TokenQuery, answer, check_api_version, parse_query};
use crate::broker::Broker;

/// The path `IDENTITY_ENDPOINT` names.
pub(crate) const PATH: &str = "/msi/token";
/// The same with a trailing slash.
pub(crate) const PATH_SLASH: &str = "/msi/token/";
/// Oldest api-version accepted (the one that uses `X-IDENTITY-HEADER`).
pub(crate) const MIN_API_VERSION: &str = "2019-08-01";
/// The header carrying the secret.
pub(crate) const HEADER: &str = "x-identity-header";

/// The handler.
pub(crate) async fn token(
    State(broker): State<Arc<Broker>>,
    asker: Asker,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Response {
    match handle(&broker, asker, &headers, query.as_deref()).await {
        Ok(r) => r,
        Err(e) => e.into_response(Dialect::AppService),
    }
}

async fn handle(
    broker: &Broker,
    asker: Asker,
    headers: &HeaderMap,
    query: Option<&str>,
) -> Result<Response, RequestError> {
    answer(broker, asker, Dialect::AppService, check(broker, headers, query)).await
}

/// The App Service checks: exactly one matching `X-IDENTITY-HEADER`, a valid query and api-version.
fn check(broker: &Broker, headers: &HeaderMap, query: Option<&str>) -> Result<TokenQuery, RequestError> {
    let unauthorized = |description: &str| RequestError {
        status: StatusCode::UNAUTHORIZED,
        code: "unauthorized",
        description: description.to_owned(),
        retry_after: None,
    };
    let mut presented = headers.get_all(HEADER).iter();
    match (presented.next(), presented.next()) {
        (None, _) => return Err(unauthorized("header X-IDENTITY-HEADER is missing")),
        (Some(_), Some(_)) => return Err(unauthorized("header X-IDENTITY-HEADER is given more than once")),
        (Some(v), None) if !broker.identity_header_matches(v.as_bytes()) => {
            return Err(unauthorized("header X-IDENTITY-HEADER does not match IDENTITY_HEADER"));
        }
        (Some(_), None) => {}
    }
    let q = parse_query(query)?;
    check_api_version(q.api_version.as_deref(), MIN_API_VERSION)?;
    Ok(q)
}
