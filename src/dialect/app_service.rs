//! The App Service dialect at `GET /msi/token` (and `/msi/token/`), in its two versions:
//! - **2019-08-01** and later: `X-IDENTITY-HEADER: <secret>` (what `IDENTITY_ENDPOINT` +
//!   `IDENTITY_HEADER` point clients at). `Metadata` is not required (Go omits it).
//! - **2017-09-01** (App Service 2017, and Azure ML compute: `MSI_ENDPOINT` + `MSI_SECRET`): the secret in
//!   a `secret` header, and `clientid` (no underscore) selects a user-assigned identity. Errors keep the
//!   App Service shape; the success body is the same superset (Azure ML's clients parse `expires_on` as
//!   epoch seconds — MSAL only that way — so the App Service 2017 date form is never sent).
//!
//! The secret is accepted in either header with either version (it is the same secret; clients send
//! the one their version names), exactly once, compared in constant time; missing or wrong is a 401.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;

use super::{
    Asker, Dialect, Params, RequestError, TokenQuery, answer, answer_now, check_api_version, parse_params, parse_query,
};
use crate::broker::Broker;

/// The path `IDENTITY_ENDPOINT` (and `MSI_ENDPOINT`) names.
pub(crate) const PATH: &str = "/msi/token";
/// The same with a trailing slash.
pub(crate) const PATH_SLASH: &str = "/msi/token/";
/// What msrestazure's App Service 2017 GET asks for when `MSI_ENDPOINT` ends in a slash (as App Service's
/// own value did): it appends `/?resource=…` to the variable. Served like the other two, POST included.
pub(crate) const PATH_DOUBLE_SLASH: &str = "/msi/token//";
/// Oldest api-version accepted with `X-IDENTITY-HEADER`.
pub(crate) const MIN_API_VERSION: &str = "2019-08-01";
/// The one older api-version served: App Service 2017 / Azure ML, with the `secret` header.
pub(crate) const API_VERSION_2017: &str = "2017-09-01";
/// The header carrying the secret (2019).
pub(crate) const HEADER: &str = "x-identity-header";
/// The header carrying the secret (2017 / Azure ML).
pub(crate) const HEADER_2017: &str = "secret";

/// The handler.
pub(crate) async fn token(State(broker): State<Arc<Broker>>, asker: Asker, req: Request) -> Response {
    let (dialect, checked) = checks(&broker, req.headers(), req.uri().query());
    match answer(&broker, &asker, dialect, checked).await {
        Ok(r) => r,
        Err(e) => e.into_response(dialect),
    }
}

/// The handler's answer and its dialect if it needs no waiting (see [`answer_now`]); `None` if it
/// must wait.
pub(crate) fn token_now(
    broker: &Broker,
    asker: &Asker,
    headers: &HeaderMap,
    query: Option<&str>,
) -> Option<(Dialect, Response)> {
    let (dialect, checked) = checks(broker, headers, query);
    Some((dialect, answer_now(broker, asker, dialect, &checked)?.unwrap_or_else(|e| e.into_response(dialect))))
}

/// The dialect (the version decides it; a query that does not parse is answered by the 2019 rules) and
/// the checked query, or why the request fails that dialect's checks.
fn checks<'q>(
    broker: &Broker,
    headers: &HeaderMap,
    query: Option<&'q str>,
) -> (Dialect, Result<TokenQuery<'q>, RequestError>) {
    let parsed = parse_query(query);
    let is_2017 = parsed.as_ref().is_ok_and(|q| q.api_version.as_deref() == Some(API_VERSION_2017));
    if is_2017 {
        (Dialect::AzureMl, check_2017(broker, headers, query))
    } else {
        (Dialect::AppService, check(broker, headers, parsed))
    }
}

fn unauthorized(description: String) -> RequestError {
    RequestError { status: StatusCode::UNAUTHORIZED, code: "unauthorized", description, retry_after: None }
}

/// The secret, given exactly once in `X-IDENTITY-HEADER` or `secret`, matches the identity header
/// secret. Messages name the header (and variable) of the request's version.
fn check_secret(broker: &Broker, headers: &HeaderMap, is_2017: bool) -> Result<(), RequestError> {
    let (shown, env) = if is_2017 { ("secret", "MSI_SECRET") } else { ("X-IDENTITY-HEADER", "IDENTITY_HEADER") };
    let mut presented = headers.get_all(HEADER).iter().chain(headers.get_all(HEADER_2017).iter());
    match (presented.next(), presented.next()) {
        (None, _) => Err(unauthorized(format!("header {shown} is missing"))),
        (Some(_), Some(_)) => {
            Err(unauthorized(format!("the secret is given more than once; send it once, in header {shown}")))
        }
        (Some(v), None) if !broker.identity_header_matches(v.as_bytes()) => {
            Err(unauthorized(format!("header {shown} does not match {env}")))
        }
        (Some(_), None) => Ok(()),
    }
}

/// The 2019 checks: exactly one matching `X-IDENTITY-HEADER`, a valid (`parsed`) query and api-version.
fn check<'q>(
    broker: &Broker,
    headers: &HeaderMap,
    parsed: Result<TokenQuery<'q>, RequestError>,
) -> Result<TokenQuery<'q>, RequestError> {
    check_secret(broker, headers, false)?;
    let q = parsed?;
    check_api_version(q.api_version.as_deref(), MIN_API_VERSION).map_err(|mut e| {
        e.description.push_str(&format!(" (or {API_VERSION_2017} with header secret)"));
        e
    })?;
    Ok(q)
}

/// The 2017 / Azure ML checks: exactly one matching `secret` header, a valid query (`clientid` allowed).
fn check_2017<'q>(
    broker: &Broker,
    headers: &HeaderMap,
    query: Option<&'q str>,
) -> Result<TokenQuery<'q>, RequestError> {
    check_secret(broker, headers, true)?;
    parse_params(query, Params::Query2017)
}
