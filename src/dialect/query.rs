//! The parameter grammar every dialect shares — in a query string, or in the form body of the Cloud
//! Shell POST: duplicates and bad percent-encoding refused, at most one identity selector, unknown
//! parameters ignored (clients add their own); and the `api-version` check.

use super::RequestError;
use crate::identity::Selector;

/// The parameters of a token request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct TokenQuery {
    /// `api-version`
    pub api_version: Option<String>,
    /// `resource`, decoded, as the caller spelt it.
    pub resource: Option<String>,
    /// At most one identity selector.
    pub selector: Option<Selector>,
}

const SELECTORS: &str = "client_id, object_id, principal_id, msi_res_id, mi_res_id";

/// Where the parameters come from, for error messages; and whether `clientid` selects by client id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Params {
    /// A query string (IMDS, App Service 2019).
    Query,
    /// The query string of the App Service 2017 / Azure ML dialect, which spells `client_id` `clientid`.
    Query2017,
    /// A form body (the Cloud Shell POST).
    Form,
}

impl Params {
    fn what(self) -> &'static str {
        match self {
            Self::Query | Self::Query2017 => "query parameter",
            Self::Form => "form field",
        }
    }
}

/// Parses a query string: rejects duplicates, bad percent-encoding and conflicting selectors; ignores
/// parameters it does not know (clients add their own).
pub(crate) fn parse_query(raw: Option<&str>) -> Result<TokenQuery, RequestError> {
    parse_params(raw, Params::Query)
}

/// [`parse_query`] for parameters from `source`.
pub(crate) fn parse_params(raw: Option<&str>, source: Params) -> Result<TokenQuery, RequestError> {
    let what = source.what();
    let mut q = TokenQuery::default();
    let mut seen: Vec<String> = Vec::new();
    for pair in raw.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let raw_name = pair.split('=').next().unwrap_or("");
        if !percent_encoding_ok(pair) {
            return Err(RequestError::bad_request(format!(
                "{what} {:?} has invalid percent-encoding",
                raw_name.chars().take(64).collect::<String>()
            )));
        }
        let Some((name, value)) = form_urlencoded::parse(pair.as_bytes()).next() else { continue };
        if seen.iter().any(|s| *s == name) {
            return Err(RequestError::bad_request(format!("{what} {name:?} appears more than once")));
        }
        seen.push(name.to_string());
        let value = value.into_owned();
        let selector = match name.as_ref() {
            "api-version" => {
                q.api_version = Some(value);
                continue;
            }
            "resource" => {
                q.resource = Some(value);
                continue;
            }
            _ if value.is_empty() => continue,
            "client_id" => Selector::ClientId(value),
            "clientid" if source == Params::Query2017 => Selector::ClientId(value),
            "object_id" | "principal_id" => Selector::ObjectId(value),
            "msi_res_id" | "mi_res_id" => Selector::ResourceId(value),
            _ => continue,
        };
        if q.selector.is_some() {
            let selectors = if source == Params::Query2017 { "clientid, " } else { "" };
            return Err(RequestError::bad_request(format!(
                "give at most one of the identity selectors {selectors}{SELECTORS}"
            )));
        }
        q.selector = Some(selector);
    }
    Ok(q)
}

fn percent_encoding_ok(s: &str) -> bool {
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = |j: usize| b.get(j).is_some_and(u8::is_ascii_hexdigit);
            if !hex(i + 1) || !hex(i + 2) {
                return false;
            }
            i += 3;
        } else {
            i += 1;
        }
    }
    true
}

/// Checks `api-version`: a date `YYYY-MM-DD` (optionally with a suffix such as `-preview`) not before `min`.
pub(crate) fn check_api_version(v: Option<&str>, min: &str) -> Result<(), RequestError> {
    let Some(v) = v else {
        return Err(RequestError::bad_request(format!("query parameter api-version is required ({min} or later)")));
    };
    let date = v.get(..10).unwrap_or("");
    let b = date.as_bytes();
    let digits = |r: std::ops::Range<usize>| b.get(r).is_some_and(|s| s.iter().all(u8::is_ascii_digit));
    let shape = b.len() == 10 && b[4] == b'-' && b[7] == b'-' && digits(0..4) && digits(5..7) && digits(8..10);
    let month_day_ok =
        shape && (&date[5..7] >= "01" && &date[5..7] <= "12") && (&date[8..10] >= "01" && &date[8..10] <= "31");
    let suffix_ok = v.len() == 10 || (v.len() <= 32 && v.get(10..).is_some_and(|s| s.starts_with('-')));
    if !month_day_ok || !suffix_ok {
        let shown: String = v.chars().take(40).collect();
        return Err(RequestError::bad_request(format!(
            "query parameter api-version {shown:?} is not a version date like {min}"
        )));
    }
    if date < min {
        return Err(RequestError::bad_request(format!(
            "query parameter api-version {v:?} is not supported; use {min} or later"
        )));
    }
    Ok(())
}
