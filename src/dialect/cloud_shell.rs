//! The Cloud Shell dialect: `POST /msi/token` (and `/msi/token/`) with a form body `resource=…` (and
//! optionally `client_id`, `object_id`, `msi_res_id`), guarded by `Metadata: true` like IMDS. It is what
//! `MSI_ENDPOINT` alone means to azure-identity (its Cloud Shell path), and what msrestazure's
//! `MSIAuthentication` sends whenever `MSI_ENDPOINT` is set — on Azure ML compute too.
//!
//! Errors are in the IMDS shape. The body is bounded ([`MAX_FORM`]: 413 beyond it); a body that is not
//! `application/x-www-form-urlencoded` is a 415; parameters belong in the body, so a query string is a 400.

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::Response;

use super::{Asker, Dialect, Params, RequestError, TokenQuery, answer, check_metadata, header_str, parse_params};
use crate::broker::Broker;

/// Largest form body read (real ones are a resource URI and perhaps one selector).
pub(crate) const MAX_FORM: usize = 4 * 1024;

/// The handler.
pub(crate) async fn token(State(broker): State<Arc<Broker>>, asker: Asker, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let form = read_form(&parts.headers, parts.uri.query(), body).await;
    let checked = match &form {
        Ok(bytes) => parse_form(bytes),
        Err(e) => Err(e.clone()),
    };
    match answer(&broker, &asker, Dialect::CloudShell, checked).await {
        Ok(r) => r,
        Err(e) => e.into_response(Dialect::CloudShell),
    }
}

/// The header checks, then the form body (bounded).
async fn read_form(headers: &HeaderMap, query: Option<&str>, body: Body) -> Result<Bytes, RequestError> {
    check_metadata(headers)?;
    if query.is_some_and(|q| !q.is_empty()) {
        return Err(RequestError::bad_request(
            "a POST carries its parameters in an application/x-www-form-urlencoded body, not in the query string",
        ));
    }
    let content_type = header_str(headers, header::CONTENT_TYPE).unwrap_or("");
    let essence = content_type.split(';').next().unwrap_or("").trim();
    if !essence.eq_ignore_ascii_case("application/x-www-form-urlencoded") {
        let shown: String = content_type.chars().take(64).collect();
        return Err(RequestError {
            status: StatusCode::UNSUPPORTED_MEDIA_TYPE,
            code: "invalid_request",
            description: format!(
                "header Content-Type {shown:?}: the body must be application/x-www-form-urlencoded (resource=...)"
            ),
            retry_after: None,
        });
    }
    axum::body::to_bytes(body, MAX_FORM).await.map_err(|_| RequestError {
        status: StatusCode::PAYLOAD_TOO_LARGE,
        code: "invalid_request",
        description: format!("the form body is larger than {MAX_FORM} bytes"),
        retry_after: None,
    })
}

/// The form's parameters; `resource` is required.
fn parse_form(bytes: &[u8]) -> Result<TokenQuery<'_>, RequestError> {
    let text = std::str::from_utf8(bytes).map_err(|_| RequestError::bad_request("the form body is not UTF-8"))?;
    let q = parse_params(Some(text.trim_end_matches(['\r', '\n'])), Params::Form)?;
    if q.resource.is_none() {
        return Err(RequestError::bad_request("form field resource is required"));
    }
    Ok(q)
}
