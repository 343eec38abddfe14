//! The parameter grammar every dialect shares — in a query string, or in the form body of the Cloud
//! Shell POST: duplicates and bad percent-encoding refused, at most one identity selector, unknown
//! parameters ignored (clients add their own); and the `api-version` check.

use std::borrow::Cow;

use super::RequestError;
use crate::identity::Selector;

/// The parameters of a token request, borrowed from the request where no decoding was needed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct TokenQuery<'q> {
    /// `api-version`
    pub api_version: Option<Cow<'q, str>>,
    /// `resource`, decoded, as the caller spelt it.
    pub resource: Option<Cow<'q, str>>,
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
pub(crate) fn parse_query(raw: Option<&str>) -> Result<TokenQuery<'_>, RequestError> {
    parse_params(raw, Params::Query)
}

/// [`parse_query`] for parameters from `source`.
pub(crate) fn parse_params(raw: Option<&str>, source: Params) -> Result<TokenQuery<'_>, RequestError> {
    let what = source.what();
    let mut q = TokenQuery::default();
    let mut seen: Vec<Cow<'_, str>> = Vec::new();
    for pair in raw.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        if !percent_encoding_ok(pair) {
            let raw_name = pair.split('=').next().unwrap_or("");
            return Err(RequestError::bad_request(format!(
                "{what} {:?} has invalid percent-encoding",
                raw_name.chars().take(64).collect::<String>()
            )));
        }
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        let (name, value) = (decode(name), decode(value));
        if seen.contains(&name) {
            return Err(RequestError::bad_request(format!("{what} {name:?} appears more than once")));
        }
        seen.push(name);
        let name = seen.last().map_or("", AsRef::as_ref);
        let selector = match name {
            "api-version" => {
                q.api_version = Some(value);
                continue;
            }
            "resource" => {
                q.resource = Some(value);
                continue;
            }
            _ if value.is_empty() => continue,
            "client_id" => Selector::ClientId(value.into_owned()),
            "clientid" if source == Params::Query2017 => Selector::ClientId(value.into_owned()),
            "object_id" | "principal_id" => Selector::ObjectId(value.into_owned()),
            "msi_res_id" | "mi_res_id" => Selector::ResourceId(value.into_owned()),
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

/// Decodes one `application/x-www-form-urlencoded` name or value (`+` is a space, `%XX` a byte; bytes
/// that are not UTF-8 become U+FFFD, as `form_urlencoded` does), borrowing when there is nothing to
/// decode — the common case. `s` has passed [`percent_encoding_ok`]. Not `form_urlencoded::parse`:
/// it re-validates UTF-8 and scans twice even when it borrows (query/parse ~100 ns slower with it).
fn decode(s: &str) -> Cow<'_, str> {
    if !s.bytes().any(|b| b == b'%' || b == b'+') {
        return Cow::Borrowed(s);
    }
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = |c: u8| char::from(c).to_digit(16).unwrap_or(0) as u8;
                out.push(hex(b[i + 1]) << 4 | hex(b[i + 2]));
                i += 2;
            }
            c => out.push(c),
        }
        i += 1;
    }
    Cow::Owned(String::from_utf8_lossy(&out).into_owned())
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

#[cfg(test)]
mod props {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// The borrowing decoder agrees with `form_urlencoded` on every pair it is given (valid
        /// percent-encoding, `+`, `=` in values, bytes that are not UTF-8 once decoded).
        #[test]
        fn decoding_agrees_with_form_urlencoded(pair in "([a-z=+&]|%[0-9a-fA-F]{2}|%[c-f][0-9a-f]|é|☃){0,40}") {
            for pair in pair.split('&').filter(|p| !p.is_empty()) {
                prop_assume!(percent_encoding_ok(pair));
                let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
                let expected = form_urlencoded::parse(pair.as_bytes()).next().expect("one pair");
                prop_assert_eq!((decode(name), decode(value)), expected);
            }
        }
    }
}
