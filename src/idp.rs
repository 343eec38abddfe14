//! The IdP client: OAuth2 client-credentials grant against Entra ID (v2 or v1) or any token endpoint.
//!
//! This is the only module that talks to an identity provider. It makes exactly one HTTP request per
//! [`IdpClient::fetch`] — retrying and backing off is the refresher's business — and every request is
//! bounded by `upstream.timeout`. Failures are classified by the OAuth `error` code, never by the text
//! of `error_description`.

use std::time::{Duration, SystemTime};

use reqwest::header::{CONTENT_TYPE, RETRY_AFTER};
use secrecy::SecretString;
use secrecy::zeroize::Zeroizing;
use serde::Deserialize;

use crate::config::UpstreamConfig;
use crate::identity::{Identity, TokenApi};
use crate::net::host_is_loopback;
use crate::resource::Resource;
use crate::token::{BoxFuture, FetchError, IssuedToken, TokenSource};

/// Largest token response we read; real ones are a few KiB.
const MAX_BODY: usize = 256 * 1024;

/// Longest lifetime (or hint) taken from an answer: Entra's tokens live hours, other servers' days. A
/// longer one is not a token response: no clock could hold its expiry (`expires_in: 1e19` made the cache
/// entry's `Instant` overflow and panic the refresher; found by the `idp_response` fuzz target).
const MAX_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// The HTTP client for token endpoints.
#[derive(Debug, Clone)]
pub(crate) struct IdpClient {
    /// Honours `HTTPS_PROXY`/`NO_PROXY`; used for remote token URLs.
    proxied: reqwest::Client,
    /// Never proxied; used for loopback token URLs (a proxy cannot reach our loopback).
    direct: reqwest::Client,
    /// The IdP's `Date` minus this host's clock, in seconds, at the last answer.
    last_skew: std::sync::Arc<parking_lot::Mutex<Option<i64>>>,
}

/// Clock skew beyond this is warned about: client assertions are rejected when clocks disagree (AADSTS700024).
pub(crate) const MAX_CLOCK_SKEW: Duration = Duration::from_secs(60);

impl IdpClient {
    /// Builds the clients: system roots plus `upstream.ca_file`, bounded timeouts.
    pub(crate) fn new(upstream: &UpstreamConfig) -> Result<Self, reqwest::Error> {
        let build = |proxy: bool| {
            let mut b = reqwest::Client::builder()
                .timeout(upstream.timeout)
                .connect_timeout(upstream.timeout.min(Duration::from_secs(5)))
                .redirect(reqwest::redirect::Policy::none())
                .user_agent(concat!("tokend/", env!("CARGO_PKG_VERSION")));
            if !proxy {
                b = b.no_proxy();
            }
            if let Some((_, pem)) = &upstream.ca_pem {
                b = b.tls_certs_merge(reqwest::Certificate::from_pem_bundle(pem)?);
            }
            b.build()
        };
        Ok(Self { proxied: build(true)?, direct: build(false)?, last_skew: Default::default() })
    }

    /// The IdP's clock minus ours, in seconds, as of the last answer (any status).
    pub(crate) fn last_clock_skew(&self) -> Option<i64> {
        *self.last_skew.lock()
    }

    /// One client-credentials request for `resource` as `identity`, timed and counted in the metrics
    /// (a credential that cannot be used fails before any request and is counted as an error only).
    pub(crate) async fn fetch(&self, identity: &Identity, resource: &Resource) -> Result<IssuedToken, FetchError> {
        let started = std::time::Instant::now();
        let result = self.request(identity, resource).await;
        let failure = result.as_ref().err().map(|e| match e {
            FetchError::CredentialRejected { .. } => 0,
            FetchError::BadResource { .. } => 1,
            FetchError::Rejected { .. } => 2,
            FetchError::Throttled { .. } => 3,
            FetchError::ServerError { .. } => 4,
            FetchError::Transport { .. } => 5,
            FetchError::CredentialUnusable { .. } => 6,
            FetchError::Malformed { .. } => 7,
        });
        crate::metrics::get().upstream(started.elapsed(), failure);
        result
    }

    async fn request(&self, identity: &Identity, resource: &Resource) -> Result<IssuedToken, FetchError> {
        let url = &identity.token_url;
        let scope = match identity.api {
            TokenApi::V2 => ("scope", resource.scope()),
            TokenApi::V1 => ("resource", resource.as_str().to_owned()),
        };
        let auth = identity
            .credential
            .form_params(&identity.client_id, url.as_str())
            .map_err(|e| FetchError::CredentialUnusable { detail: e.to_string() })?;
        let mut form: Vec<(&str, &str)> =
            vec![("grant_type", "client_credentials"), ("client_id", &identity.client_id), (scope.0, &scope.1)];
        form.extend(auth.iter().map(|(k, v)| (*k, v.as_str())));
        let form = encode_form(&form);
        drop(auth);
        let client = if host_is_loopback(url) { &self.direct } else { &self.proxied };
        let requested_at = SystemTime::now();
        let transport = |e: reqwest::Error| FetchError::Transport { host: host_of(url), detail: error_chain(&e) };
        let mut resp = client
            .post(url.clone())
            .header("accept", "application/json")
            .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body(form)
            .send()
            .await
            .map_err(transport)?;
        let status = resp.status().as_u16();
        if let Some(skew) = clock_skew(resp.headers().get(reqwest::header::DATE), SystemTime::now()) {
            *self.last_skew.lock() = Some(skew);
            crate::metrics::get().clock_skew(skew);
            if skew.unsigned_abs() > MAX_CLOCK_SKEW.as_secs() {
                tracing::warn!(
                    identity = %identity.name,
                    idp = %host_of(url),
                    skew_s = skew,
                    "clock skew: the identity provider's Date differs from this host's clock by more than a minute; \
                     client assertions may be rejected (AADSTS700024): fix time synchronisation"
                );
            }
        }
        let retry_after = resp
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let content_type = resp.headers().get(CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
        // Sized up front, so that growing it leaves no copy of the token behind; wiped when dropped.
        let mut body = Zeroizing::new(Vec::with_capacity(MAX_BODY));
        while let Some(chunk) = resp.chunk().await.map_err(transport)? {
            if body.len() + chunk.len() > MAX_BODY {
                return Err(FetchError::Malformed {
                    detail: format!("HTTP {status} body larger than {MAX_BODY} bytes"),
                });
            }
            body.extend_from_slice(&chunk);
        }
        let parsed = parse_response(status, retry_after, &content_type, &body);
        if let (Err(e), Some(desc)) = (&parsed, error_description(&body)) {
            {
                tracing::warn!(identity = %identity.name, resource = %resource, error = %e, idp_description = %desc, "token request failed");
            }
        }
        let p = parsed?;
        Ok(IssuedToken {
            access_token: p.access_token,
            expires_in: p.expires_in,
            ext_expires_in: p.ext_expires_in,
            refresh_in: p.refresh_in,
            requested_at,
        })
    }
}

impl TokenSource for IdpClient {
    fn fetch<'a>(
        &'a self,
        identity: &'a Identity,
        resource: &'a Resource,
    ) -> BoxFuture<'a, Result<IssuedToken, FetchError>> {
        Box::pin(IdpClient::fetch(self, identity, resource))
    }
}

/// The IdP's `Date` minus `now`, in whole seconds.
fn clock_skew(date: Option<&reqwest::header::HeaderValue>, now: SystemTime) -> Option<i64> {
    let theirs = httpdate::parse_http_date(date?.to_str().ok()?).ok()?;
    let secs = |t: SystemTime| t.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
    Some(secs(theirs) - secs(now))
}

fn host_of(url: &reqwest::Url) -> String {
    match (url.host_str(), url.port_or_known_default()) {
        (Some(h), Some(p)) => format!("{h}:{p}"),
        (Some(h), None) => h.to_owned(),
        _ => url.as_str().to_owned(),
    }
}

/// `e: cause: cause` — reqwest's own Display omits the interesting inner causes.
fn error_chain(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        return "timed out".to_owned();
    }
    let mut out = String::new();
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        let text = err.to_string();
        if !out.contains(&text) {
            if !out.is_empty() {
                out.push_str(": ");
            }
            out.push_str(&text);
        }
        cur = err.source();
    }
    out
}

/// A number that some servers send as a string (Entra v1) or as a float.
#[derive(Deserialize)]
#[serde(untagged)]
enum Number {
    Int(u64),
    Float(f64),
    Text(String),
}

impl Number {
    fn seconds(&self) -> Option<Duration> {
        match self {
            Self::Int(n) => Some(Duration::from_secs(*n)),
            Self::Float(f) if f.is_finite() && *f >= 0.0 => Some(Duration::from_secs(*f as u64)),
            Self::Float(_) => None,
            Self::Text(s) => s.trim().parse::<u64>().ok().map(Duration::from_secs),
        }
    }
}

#[derive(Deserialize)]
struct SuccessWire {
    access_token: Option<SecretString>,
    token_type: Option<String>,
    expires_in: Option<Number>,
    ext_expires_in: Option<Number>,
    refresh_in: Option<Number>,
    expires_on: Option<Number>,
}

#[derive(Deserialize)]
struct ErrorWire {
    error: Option<String>,
    error_description: Option<String>,
}

fn error_description(body: &[u8]) -> Option<String> {
    let e: ErrorWire = serde_json::from_slice(body).ok()?;
    e.error_description.map(|d| d.chars().take(500).collect())
}

/// A successful response, parsed.
pub(crate) struct Parsed {
    pub(crate) access_token: SecretString,
    pub(crate) expires_in: Duration,
    pub(crate) ext_expires_in: Option<Duration>,
    pub(crate) refresh_in: Option<Duration>,
}

/// The urlencoded request body, with the credential in it: encoded into one buffer sized for the worst
/// case (so no reallocation leaves a copy behind) that is wiped when the HTTP stack drops the body.
/// Copies the HTTP and TLS stacks make while sending are theirs and are not wiped.
fn encode_form(pairs: &[(&str, &str)]) -> reqwest::Body {
    let worst = pairs.iter().map(|(k, v)| 3 * (k.len() + v.len()) + 2).sum();
    let mut out = form_urlencoded::Serializer::new(String::with_capacity(worst));
    for (k, v) in pairs {
        out.append_pair(k, v);
    }
    let encoded = out.finish();
    debug_assert!(encoded.len() <= worst);
    reqwest::Body::from(crate::secret::wiped_bytes(encoded.into_bytes()))
}

/// Classifies and parses a token endpoint answer. Pure, so it is unit-tested and fuzzable.
pub(crate) fn parse_response(
    status: u16,
    retry_after: Option<Duration>,
    content_type: &str,
    body: &[u8],
) -> Result<Parsed, FetchError> {
    if status == 429 {
        return Err(FetchError::Throttled { retry_after });
    }
    if status >= 500 {
        return Err(FetchError::ServerError { status, retry_after });
    }
    if !(200..300).contains(&status) {
        let code =
            serde_json::from_slice::<ErrorWire>(body).ok().and_then(|e| e.error).unwrap_or_else(|| "-".to_owned());
        // OAuth error codes are snake_case words; anything else is not echoed (it could be anything).
        let code = if !code.is_empty() && code.len() <= 40 && code.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
        {
            code
        } else {
            "-".to_owned()
        };
        return Err(match code.as_str() {
            "invalid_client" | "unauthorized_client" => FetchError::CredentialRejected { status, error: code },
            "invalid_scope" | "invalid_target" | "invalid_resource" => FetchError::BadResource { status, error: code },
            _ if status == 401 => FetchError::CredentialRejected { status, error: code },
            _ => FetchError::Rejected { status, error: code },
        });
    }
    let malformed = |detail: String| FetchError::Malformed { detail };
    let wire: SuccessWire = serde_json::from_slice(body).map_err(|_| {
        let ct = if content_type.is_empty() { "no content type" } else { content_type };
        malformed(format!("HTTP {status} with a body of {} bytes ({ct}) that is not a JSON token response", body.len()))
    })?;
    let access_token = wire.access_token.ok_or_else(|| malformed("no access_token".to_owned()))?;
    if let Some(t) = wire.token_type.as_ref().filter(|t| !t.eq_ignore_ascii_case("bearer")) {
        return Err(malformed(format!("token_type {:?} is not Bearer", t.chars().take(32).collect::<String>())));
    }
    let expires_in = match (&wire.expires_in, &wire.expires_on) {
        (Some(n), _) => n.seconds().ok_or_else(|| malformed("expires_in is not a number of seconds".to_owned()))?,
        (None, Some(on)) => {
            let on = on.seconds().ok_or_else(|| malformed("expires_on is not a number".to_owned()))?;
            let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
            on.saturating_sub(now)
        }
        (None, None) => return Err(malformed("neither expires_in nor expires_on".to_owned())),
    };
    if expires_in > MAX_LIFETIME {
        return Err(malformed(format!(
            "a lifetime of {}s is longer than the {}s any token is taken for",
            expires_in.as_secs(),
            MAX_LIFETIME.as_secs()
        )));
    }
    let hint = |n: &Option<Number>| n.as_ref().and_then(Number::seconds).filter(|d| *d <= MAX_LIFETIME);
    Ok(Parsed {
        access_token,
        expires_in,
        ext_expires_in: hint(&wire.ext_expires_in),
        refresh_in: hint(&wire.refresh_in),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::token::FailureClass;
    use secrecy::ExposeSecret;

    fn err(status: u16, body: &str) -> FetchError {
        match parse_response(status, None, "application/json", body.as_bytes()) {
            Ok(_) => panic!("expected an error for {status} {body}"),
            Err(e) => e,
        }
    }

    #[test]
    fn parses_numbers_and_strings() {
        let p = parse_response(200, None, "application/json", br#"{"token_type":"Bearer","expires_in":3599,"ext_expires_in":"3599","refresh_in":1800,"access_token":"eyJ.a.b"}"#)
            .unwrap_or_else(|e| panic!("valid: {e}"));
        assert_eq!(p.access_token.expose_secret(), "eyJ.a.b");
        assert_eq!(p.expires_in, Duration::from_secs(3599));
        assert_eq!(p.ext_expires_in, Some(Duration::from_secs(3599)));
        assert_eq!(p.refresh_in, Some(Duration::from_secs(1800)));
        let v1 = parse_response(200, None, "", br#"{"token_type":"Bearer","expires_in":"3600","access_token":"x"}"#)
            .unwrap_or_else(|e| panic!("v1: {e}"));
        assert_eq!(v1.expires_in, Duration::from_secs(3600));
    }

    #[test]
    fn classifies_errors_by_code() {
        let table = [
            (401, r#"{"error":"invalid_client","error_description":"AADSTS7000215"}"#, FailureClass::Credential),
            (400, r#"{"error":"unauthorized_client"}"#, FailureClass::Credential),
            (400, r#"{"error":"invalid_scope"}"#, FailureClass::Resource),
            (400, r#"{"error":"invalid_target"}"#, FailureClass::Resource),
            (400, r#"{"error":"invalid_resource"}"#, FailureClass::Resource),
            (400, r#"{"error":"invalid_request"}"#, FailureClass::Rejected),
            (401, "not json", FailureClass::Credential),
            (404, "<html>", FailureClass::Rejected),
            (429, "{}", FailureClass::Transient),
            (500, "{}", FailureClass::Transient),
            (503, "<html>busy</html>", FailureClass::Transient),
        ];
        for (status, body, class) in table {
            assert_eq!(err(status, body).class(), class, "{status} {body}");
        }
    }

    #[test]
    fn clock_skew_from_the_date_header() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_000_000);
        let date = |t: SystemTime| reqwest::header::HeaderValue::from_str(&httpdate::fmt_http_date(t)).expect("header");
        assert_eq!(clock_skew(Some(&date(now)), now), Some(0));
        assert_eq!(clock_skew(Some(&date(now + Duration::from_secs(120))), now), Some(120));
        assert_eq!(clock_skew(Some(&date(now - Duration::from_secs(3600))), now), Some(-3600));
        assert_eq!(clock_skew(Some(&reqwest::header::HeaderValue::from_static("yesterday")), now), None);
        assert_eq!(clock_skew(None, now), None);
    }

    #[test]
    fn retry_after_is_kept() {
        let e = parse_response(429, Some(Duration::from_secs(7)), "", b"").err().expect("error");
        assert_eq!(e.retry_after(), Some(Duration::from_secs(7)));
    }

    #[test]
    fn the_form_is_encoded_in_one_buffer_that_round_trips() {
        let pairs =
            [("grant_type", "client_credentials"), ("client_secret", "a+b c&d=e~f/é%"), ("scope", "x/.default")];
        let body = encode_form(&pairs);
        let bytes = body.as_bytes().expect("a buffered body");
        let back: Vec<(String, String)> = form_urlencoded::parse(bytes).into_owned().collect();
        let expected: Vec<(String, String)> = pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        assert_eq!(back, expected);
        assert!(
            std::str::from_utf8(bytes)
                .expect("ascii")
                .starts_with("grant_type=client_credentials&client_secret=a%2Bb+c%26d%3De")
        );
    }

    /// Found by the `idp_response` fuzz target (fuzz/regressions/idp_response/): a lifetime beyond any
    /// clock was accepted, and building its cache entry panicked.
    #[test]
    fn a_lifetime_no_clock_can_hold_is_malformed() {
        for expires in ["1e19", "18446744073709551615", "\"18446744073709551615\"", "315360001"] {
            let body = format!(r#"{{"token_type":"Bearer","expires_in":{expires},"access_token":"a.b.c"}}"#);
            assert!(matches!(err(200, &body), FetchError::Malformed { .. }), "{expires}");
        }
        let far = r#"{"token_type":"Bearer","expires_on":18446744073709551615,"access_token":"a.b.c"}"#;
        assert!(matches!(err(200, far), FetchError::Malformed { .. }));
        let hints =
            r#"{"token_type":"Bearer","expires_in":3599,"ext_expires_in":1e19,"refresh_in":1e19,"access_token":"a"}"#;
        let p = parse_response(200, None, "", hints.as_bytes()).unwrap_or_else(|e| panic!("valid: {e}"));
        assert_eq!((p.ext_expires_in, p.refresh_in), (None, None), "hints beyond any lifetime are dropped");
    }

    #[test]
    fn malformed_success_never_echoes_the_body() {
        let body = "<html>proxy login page with sensitive-looking content</html>";
        let e = err(200, body);
        assert_eq!(e.class(), FailureClass::Transient);
        assert!(!e.to_string().contains("sensitive"), "{e}");
        let e = err(200, r#"{"access_token":"secret-token-value","token_type":"pop","expires_in":1}"#);
        assert!(!e.to_string().contains("secret-token-value"), "{e}");
        assert!(matches!(err(200, r#"{"token_type":"Bearer","expires_in":1}"#), FetchError::Malformed { .. }));
        assert!(matches!(err(200, r#"{"access_token":"x"}"#), FetchError::Malformed { .. }));
    }
}

/// Property tests: parsing whatever an IdP (or a proxy in front of it) answers never panics, and no
/// error message ever carries the body's access token.
#[cfg(test)]
mod props {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1000))]

        #[test]
        fn parse_response_never_panics(status in 100u16..600, body in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = parse_response(status, None, "application/json", &body);
        }

        #[test]
        fn json_shaped_answers_never_panic(
            status in prop::sample::select(vec![200u16, 400, 401, 429, 500, 503]),
            expires in prop_oneof![Just("3599".to_owned()), Just("\"3599\"".to_owned()), Just("-1".to_owned()), Just("1e309".to_owned()), Just("null".to_owned()), "[0-9.\"]{0,12}"],
            token_type in prop_oneof![Just("Bearer"), Just("pop"), Just("")],
            error in prop_oneof![Just("invalid_client"), Just("invalid_scope"), Just("weird\u{0}code"), Just("")],
        ) {
            let body = format!(r#"{{"token_type":"{token_type}","expires_in":{expires},"access_token":"tok","error":"{error}"}}"#);
            let _ = parse_response(status, None, "application/json", body.as_bytes());
        }

        #[test]
        fn errors_never_carry_the_access_token(token in "[A-Za-z0-9_-]{24,64}", status in 200u16..600) {
            let body = format!(r#"{{"token_type":"pop","expires_in":"x","access_token":"{token}","error":"{token}"}}"#);
            if let Err(e) = parse_response(status, None, "application/json", body.as_bytes()) {
                prop_assert!(!e.to_string().contains(&token));
            }
        }
    }
}
