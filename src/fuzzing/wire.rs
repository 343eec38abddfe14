//! The HTTP/1 side of the request target, written from the specifications and hyper's documented
//! framing rather than from tokend's code: which request heads in the client's bytes are complete (and so
//! must be answered), where the connection ends, reading the answers off the connection, and the checks
//! on each answer.

use std::net::IpAddr;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt as _};

/// Most headers hyper parses in a request head (its default); more is a 431.
const MAX_HEADERS: usize = 100;
/// `Limits::max_head_bytes`: hyper's read buffer; a head that does not fit is refused.
const MAX_BUF: usize = 64 * 1024;
/// How far past [`MAX_BUF`] a read may take hyper's buffer, and so how near it a head is oversized.
const BUFFER_SLACK: usize = 16 * 1024;
/// Longest request target hyper takes (a 414 beyond).
const MAX_URI: usize = 65534;
/// tokend's own limits on a request (`server::MAX_URI_BYTES`, `server::MAX_HEADER_BYTES`): 414 and 431.
const MAX_TARGET_BYTES: usize = 8 * 1024;
const MAX_HEADER_BYTES: usize = 16 * 1024;
/// The Cloud Shell form body limit (`cloud_shell::MAX_FORM`).
const MAX_FORM: u64 = 4 * 1024;

/// How much of a head an error must lie within for hyper's 400 to be certain (see `expect`).
const READ_CHUNK: usize = 16 * 1024;
/// What an HTTP/2 client sends first.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The statuses tokend documents (docs/openapi.yaml; 404 and 405 in the dialect's shape).
const DOCUMENTED: [u16; 13] = [200, 400, 401, 403, 404, 405, 413, 414, 415, 429, 431, 500, 503];
/// What hyper answers, with an empty body, to a head it cannot parse before closing the connection.
const HYPER_REFUSALS: [u16; 5] = [400, 414, 431, 501, 505];

/// The token paths (IMDS, and App Service / Cloud Shell).
const IMDS_PATHS: [&str; 2] = ["/metadata/identity/oauth2/token", "/metadata/identity/oauth2/token/"];
const MSI_PATHS: [&str; 3] = ["/msi/token", "/msi/token/", "/msi/token//"];

/// What the configuration allows, decided without tokend's code.
pub(super) trait Allowed {
    /// Whether the caller may have this token (by the identity and resource it was issued for).
    fn token(&self, token: &str) -> Result<(), String>;
    /// The identity header secret.
    fn secret(&self) -> &str;
    /// A string in every token and nowhere else.
    fn marker(&self) -> &str;
}

/// A complete request head.
#[derive(Debug)]
pub(super) struct Head {
    method: String,
    path: String,
    query: Option<String>,
    target_len: usize,
    /// Lower-case names, raw values, in order.
    headers: Vec<(String, Vec<u8>)>,
    /// Near or beyond hyper's read buffer: hyper may refuse it with its bare 431 instead.
    oversized: bool,
}

impl Head {
    fn first(&self, name: &str) -> Option<&[u8]> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_slice())
    }

    fn all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.headers.iter().filter(move |(n, _)| n == name).map(|(_, v)| v.as_slice())
    }

    /// The first value as a string, as a header map's `to_str` reads it (visible ASCII only).
    fn first_str(&self, name: &str) -> Option<&str> {
        self.first(name)
            .filter(|v| v.iter().all(|b| *b == b'\t' || (0x20..0x7f).contains(b)))
            .and_then(|v| std::str::from_utf8(v).ok())
    }

    fn is_imds(&self) -> bool {
        IMDS_PATHS.contains(&self.path.as_str())
    }

    fn is_msi(&self) -> bool {
        MSI_PATHS.contains(&self.path.as_str())
    }

    /// The error body's shape (docs: App Service under `/msi/` but for a Cloud Shell POST; IMDS elsewhere).
    fn app_service_shape(&self) -> bool {
        self.path.starts_with("/msi/") && !(self.is_msi() && self.method == "POST")
    }

    /// Within tokend's documented size limits (else 414/431 before anything else).
    fn within_limits(&self) -> bool {
        let header_bytes: usize = self.headers.iter().map(|(n, v)| n.len() + v.len()).sum();
        self.target_len <= MAX_TARGET_BYTES && header_bytes <= MAX_HEADER_BYTES
    }

    /// No `Host`, or one that names this machine: `localhost` or a loopback address, with an optional port.
    fn host_is_local(&self) -> bool {
        let Some(value) = self.headers.iter().find(|(n, _)| n == "host").map(|(_, v)| v) else { return true };
        let Ok(host) = std::str::from_utf8(value) else { return false };
        let name = match host.strip_prefix('[') {
            Some(v6) => match v6.split_once(']') {
                Some((addr, rest)) if rest.is_empty() || is_port(rest) => addr,
                _ => return false,
            },
            None => match host.rsplit_once(':') {
                Some((name, port)) if !name.contains(':') && port.bytes().all(|b| b.is_ascii_digit()) => name,
                _ => host,
            },
        };
        name.eq_ignore_ascii_case("localhost")
            || name.eq_ignore_ascii_case("localhost.")
            || name.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
    }

    fn metadata_true(&self) -> bool {
        self.first_str("metadata") == Some("true")
    }

    fn not_proxied(&self) -> bool {
        self.first("x-forwarded-for").is_none() && self.first("forwarded").is_none()
    }

    fn form_body(&self) -> bool {
        let ct = self.first_str("content-type").unwrap_or("");
        ct.split(';').next().unwrap_or("").trim().eq_ignore_ascii_case("application/x-www-form-urlencoded")
    }

    /// Whether a token may be given for this head: its dialect's guards, from the documentation (README,
    /// docs/clients.md), not from tokend's code.
    fn passes_guards(&self, secret: &str) -> bool {
        if !self.within_limits() || !self.host_is_local() {
            return false;
        }
        match self.method.as_str() {
            "GET" if self.is_imds() => self.metadata_true() && self.not_proxied(),
            "GET" if self.is_msi() => {
                let mut given = self.all("x-identity-header").chain(self.all("secret"));
                matches!((given.next(), given.next()), (Some(v), None) if v == secret.as_bytes())
            }
            "POST" if self.is_msi() => self.metadata_true() && self.not_proxied() && self.form_body(),
            _ => false,
        }
    }

    /// A Cloud Shell POST whose body tokend reads before answering (all its header checks pass).
    fn reads_body(&self) -> bool {
        self.method == "POST"
            && self.is_msi()
            && self.within_limits()
            && self.host_is_local()
            && self.metadata_true()
            && self.not_proxied()
            && self.query.as_deref().is_none_or(str::is_empty)
            && self.form_body()
    }
}

fn is_port(rest: &str) -> bool {
    rest.strip_prefix(':').is_some_and(|p| p.bytes().all(|b| b.is_ascii_digit()))
}

/// What the client's bytes should get: an answer to each complete head, in order, then hyper's
/// refusal of a head it cannot parse, if there is one; the last of these may be uncertain.
#[derive(Debug, Default)]
pub(super) struct Expected {
    /// The complete heads, in order.
    heads: Vec<Head>,
    /// Whether hyper's refusal of a head it cannot parse follows the heads' answers.
    refusal: bool,
    /// Whether the last answer may or may not come, and if so how long to wait for it before closing
    /// the client's side (zero: it can only come after that, as the answer to a body cut short).
    maybe: Option<Duration>,
    /// Whether more answers (to bytes after an oversized head) may follow, uncounted.
    open: bool,
    /// When set, only the answers to this many heads are certain; later ones may not come (the
    /// connection may close after a body left unread).
    sure: Option<usize>,
}

impl Expected {
    /// Answers there may be.
    fn most(&self) -> usize {
        if self.open { usize::MAX } else { self.heads.len() + usize::from(self.refusal) }
    }

    /// Answers there must be.
    fn need(&self) -> usize {
        let need = if self.open { self.heads.len() } else { self.most() - usize::from(self.maybe.is_some()) };
        self.sure.map_or(need, |sure| need.min(sure))
    }
}

/// How long an answer that may come is waited for.
const MAYBE: Duration = Duration::from_millis(50);

/// Splits the client's bytes into request heads as HTTP/1.1 frames them (RFC 9112), with hyper's
/// limits and refusals.
pub(super) fn expect(data: &[u8]) -> Expected {
    let mut out = Expected::default();
    let mut pos = 0;
    while pos < data.len() {
        let rest = &data[pos..];
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut headers);
        let n = match req.parse(rest) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) => {
                // Waits for the rest of the head, unless it cannot fit (then refused as soon as it
                // overflows the buffer, or not at all if the buffer had room for more).
                out.refusal = data.len() + BUFFER_SLACK > MAX_BUF;
                out.maybe = out.refusal.then_some(MAYBE);
                return out;
            }
            Err(_) => {
                // hyper answers 400 (431 for too many headers), except to the HTTP/2 preface, which it
                // recognises only when all of it has been read at once.
                // Not understood, and left uncertain: a head whose error lies beyond its first 16 KiB
                // was once closed without hyper's 400 (fuzz/regressions/request/
                // bad-byte-beyond-16-kib-closed-without-an-answer).
                let mut first = [httparse::EMPTY_HEADER; MAX_HEADERS];
                let late = rest.len() > READ_CHUNK
                    && matches!(
                        httparse::Request::new(&mut first).parse(&rest[..READ_CHUNK]),
                        Ok(httparse::Status::Partial)
                    );
                out.refusal = true;
                out.maybe = (rest.starts_with(H2_PREFACE) || late).then_some(MAYBE);
                return out;
            }
        };
        let (Some(method), Some(target), Some(version)) = (req.method, req.path, req.version) else {
            out.refusal = true;
            return out;
        };
        let uri = target.parse::<axum::http::Uri>();
        let method_ok = axum::http::Method::from_bytes(method.as_bytes()).is_ok();
        if target.len() > MAX_URI || !method_ok || uri.is_err() {
            out.refusal = true;
            return out;
        }
        let Ok(uri) = uri else { return out };
        // hyper's buffer limit is approximate (a read may take it past the limit): a head near it is
        // answered, by tokend or by hyper's bare 431, and what follows is not modelled.
        let oversized = pos + n + BUFFER_SLACK > MAX_BUF;
        let head = Head {
            method: method.to_owned(),
            path: uri.path().to_owned(),
            query: uri.query().map(str::to_owned),
            target_len: uri.path_and_query().map_or(0, |pq| pq.as_str().len()),
            headers: req.headers.iter().map(|h| (h.name.to_ascii_lowercase(), h.value.to_vec())).collect(),
            oversized,
        };
        if oversized {
            out.heads.push(head);
            out.open = true;
            return out;
        }
        let Some(framing) = framing(&head, version == 1) else {
            out.refusal = true;
            return out;
        };
        let body_start = pos + n;
        match framing.body {
            Body::Chunked => {
                // Not followed further: it may or may not be answered, and what follows (hyper's 400 to
                // a bad chunk, or more answers) is not counted.
                out.heads.push(head);
                out.sure = Some(out.sure.unwrap_or(usize::MAX).min(out.heads.len() - 1));
                out.open = true;
                return out;
            }
            Body::Length(len) if (data.len() - body_start) as u64 >= len => {
                // A body tokend may leave unread (any but a Cloud Shell form it takes whole): hyper
                // may close the connection after the answer instead of reading past it.
                let unread = len > 0 && !(head.reads_body() && len <= MAX_FORM);
                out.heads.push(head);
                if unread && out.sure.is_none() {
                    out.sure = Some(out.heads.len());
                }
                pos = body_start + len as usize;
                if !framing.keep_alive {
                    return out;
                }
            }
            Body::Length(len) => {
                // The body is incomplete: answered without it unless tokend reads it (a Cloud Shell
                // POST that passes its header checks), and then perhaps once the client's side closes,
                // or as soon as more than the form limit has come.
                if head.reads_body() {
                    out.maybe = Some(if len > MAX_FORM { MAYBE } else { Duration::ZERO });
                }
                out.heads.push(head);
                return out;
            }
        }
    }
    out
}

enum Body {
    Length(u64),
    Chunked,
}

struct Framing {
    body: Body,
    keep_alive: bool,
}

/// The body and persistence of a request (RFC 9112 §6.3, §9.3); `None` when it must be refused (400).
fn framing(head: &Head, http11: bool) -> Option<Framing> {
    let text = |v: &[u8]| {
        std::str::from_utf8(v)
            .ok()
            .filter(|_| v.iter().all(|b| *b == b'\t' || (0x20..0x7f).contains(b)))
            .map(str::to_owned)
    };
    let has_token =
        |v: &[u8], token: &str| text(v).is_some_and(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)));
    let mut keep_alive = http11;
    let mut closed = false;
    let (mut length, mut te, mut chunked, mut cl) = (None::<u64>, false, false, false);
    for (name, value) in &head.headers {
        match name.as_str() {
            "transfer-encoding" => {
                if !http11 {
                    return None;
                }
                te = true;
                length = None;
                chunked = text(value)
                    .is_some_and(|s| s.rsplit(',').next().is_some_and(|e| e.trim().eq_ignore_ascii_case("chunked")));
            }
            "content-length" => {
                cl = true;
                if te {
                    continue;
                }
                let n = digits(value)?;
                if length.is_some_and(|prev| prev != n) || n > u64::MAX - 2 {
                    return None;
                }
                length = Some(n);
            }
            "connection" => {
                if closed || has_token(value, "close") {
                    closed = true;
                    keep_alive = false;
                } else if !keep_alive {
                    keep_alive = has_token(value, "keep-alive");
                }
            }
            _ => {}
        }
    }
    if te && !chunked {
        return None;
    }
    if te && cl {
        keep_alive = false;
    }
    let body = if chunked { Body::Chunked } else { Body::Length(length.unwrap_or(0)) };
    Some(Framing { body, keep_alive })
}

fn digits(v: &[u8]) -> Option<u64> {
    if v.is_empty() {
        return None;
    }
    v.iter().try_fold(
        0u64,
        |n, b| if b.is_ascii_digit() { n.checked_mul(10)?.checked_add(u64::from(b - b'0')) } else { None },
    )
}

/// One answer read off the connection.
#[derive(Debug)]
struct Answer {
    status: u16,
    headers: Vec<(String, Vec<u8>)>,
    body: Vec<u8>,
    raw: Vec<u8>,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_slice())
    }
}

/// The answers in `raw` as far as they are complete: the answers (1xx interim ones left out), and the
/// bytes used. A HEAD's answer has no body whatever its `Content-Length`.
fn parse_answers(raw: &[u8], heads: &[Head]) -> (Vec<Answer>, usize) {
    let mut out = Vec::new();
    let mut pos = 0;
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut resp = httparse::Response::new(&mut headers);
        let n = match resp.parse(&raw[pos..]) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) => return (out, pos),
            Err(e) => panic!("an answer that is not HTTP ({e}): {:?}", String::from_utf8_lossy(&raw[pos..])),
        };
        let status = resp.code.unwrap_or(0);
        let headers: Vec<(String, Vec<u8>)> =
            resp.headers.iter().map(|h| (h.name.to_ascii_lowercase(), h.value.to_vec())).collect();
        if (100..200).contains(&status) {
            pos += n;
            continue;
        }
        let head_method = heads.get(out.len()).map(|h| h.method.as_str());
        let len = if head_method == Some("HEAD") {
            0
        } else {
            let cl = headers.iter().find(|(n, _)| n == "content-length").map(|(_, v)| v.as_slice());
            let cl = cl.and_then(digits);
            let cl = cl.unwrap_or_else(|| {
                panic!("an answer without Content-Length: {:?}", String::from_utf8_lossy(&raw[pos..pos + n]))
            });
            usize::try_from(cl).unwrap_or(usize::MAX)
        };
        if raw.len() - pos - n < len {
            return (out, pos);
        }
        let body = raw[pos + n..pos + n + len].to_vec();
        let whole = raw[pos..pos + n + len].to_vec();
        out.push(Answer { status, headers, body, raw: whole });
        pos += n + len;
    }
}

/// Reads answers into `raw` until all that are expected have come, or the server closed (then `true`).
/// When the last answer may or may not come, it is waited for 50 ms. A connection that stays silent
/// with an answer missing fails after 10 s (tokend's header-read timeout closes it before).
pub(super) async fn read_answers<R: AsyncRead + Unpin>(rd: &mut R, expected: &Expected, raw: &mut Vec<u8>) -> bool {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let (answers, _) = parse_answers(raw, &expected.heads);
        let got = answers.len();
        if got >= expected.most() {
            return false;
        }
        let patience = match expected.maybe {
            Some(wait) if got >= expected.need() => wait,
            None if (expected.open || expected.sure.is_some()) && got >= expected.need() => MAYBE,
            _ => Duration::from_secs(10),
        };
        if patience.is_zero() {
            return false;
        }
        match tokio::time::timeout(patience, rd.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => return true,
            Ok(Ok(n)) => raw.extend_from_slice(&buf[..n]),
            Err(_) if got >= expected.need() => return false,
            Err(_) => panic!("no answer {} of {} within 10 s; heads: {:?}", got + 1, expected.need(), expected.heads),
        }
    }
}

/// The invariants over one connection's answers.
pub(super) fn check(data: &[u8], expected: &Expected, raw: &[u8], allowed: &dyn Allowed, transport: &str) {
    let (answers, used) = parse_answers(raw, &expected.heads);
    let shown = || String::from_utf8_lossy(&data[..data.len().min(2000)]).into_owned();
    assert_eq!(
        used,
        raw.len(),
        "{transport}: an incomplete answer at the end: {:?}",
        String::from_utf8_lossy(&raw[used..])
    );
    assert!(
        answers.len() >= expected.need() && answers.len() <= expected.most(),
        "{transport}: {} answers; expected {}..={} for {:?}\nrequest: {}\nanswers: {:?}",
        answers.len(),
        expected.need(),
        expected.most(),
        expected.heads.iter().map(|h| format!("{} {}", h.method, h.path)).collect::<Vec<_>>(),
        shown(),
        String::from_utf8_lossy(raw),
    );
    let marker = allowed.marker().as_bytes();
    let echoed = super::contains(data, marker);
    for (i, answer) in answers.iter().enumerate() {
        let fail = |why: String| -> ! {
            panic!(
                "{transport}: answer {} {why}\nrequest: {}\nanswer: {}",
                i + 1,
                shown(),
                String::from_utf8_lossy(&answer.raw)
            )
        };
        let refusal = HYPER_REFUSALS.contains(&answer.status) && answer.body.is_empty() && i + 1 == answers.len();
        let head = match expected.heads.get(i) {
            Some(head) if head.oversized && refusal => continue,
            Some(head) => head,
            None if refusal || expected.open => continue,
            None => fail(format!("to an unparsable head must be hyper's last, empty refusal, not {}", answer.status)),
        };
        if !DOCUMENTED.contains(&answer.status) {
            fail(format!("has status {}, which is not documented", answer.status));
        }
        if answer.status == 429 && answer.header("retry-after").and_then(digits).is_none() {
            fail("is a 429 without a Retry-After in seconds".to_owned());
        }
        let carries_token = super::contains(&answer.raw, marker);
        if !echoed && carries_token && (answer.status != 200 || !head.passes_guards(allowed.secret())) {
            fail(format!("carries a token, but its request ({} {}) did not pass the guards", head.method, head.path));
        }
        if head.method == "HEAD" {
            continue;
        }
        let json: Option<serde_json::Value> = serde_json::from_slice(&answer.body).ok();
        let health = head.path == "/healthz" || head.path == "/readyz";
        if answer.status == 200 {
            if head.is_imds() || head.is_msi() {
                let token = json.as_ref().and_then(|j| j["access_token"].as_str());
                let Some(token) = token else { fail("is a 200 to a token request without access_token".to_owned()) };
                if let (false, Err(why)) = (echoed, allowed.token(token)) {
                    fail(why);
                }
            } else if !health {
                fail(format!("is a 200 to {} {}", head.method, head.path));
            }
            continue;
        }
        let Some(json) = json else { fail("is an error whose body is not JSON".to_owned()) };
        let imds_shape = json["error"].is_string() && json["error_description"].is_string();
        let app_service_shape = json["statusCode"].as_u64() == Some(u64::from(answer.status))
            && json["message"].is_string()
            && json["correlationId"].is_string();
        let ok = if health {
            json["status"].is_string() || imds_shape
        } else if head.app_service_shape() {
            app_service_shape
        } else {
            imds_shape
        };
        if !ok {
            fail("is an error body not in the dialect's shape".to_owned());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pipelined_heads_are_counted_and_a_close_ends_them() {
        let two =
            b"GET /healthz HTTP/1.1\r\n\r\nGET /readyz HTTP/1.1\r\nConnection: close\r\n\r\nGET / HTTP/1.1\r\n\r\n";
        let e = expect(two);
        assert_eq!((e.heads.len(), e.need(), e.refusal, e.maybe), (2, 2, false, None));
        let partial = b"GET /healthz HTTP/1.1\r\n\r\nGET /readyz HTTP/1.1\r\nHost: x";
        assert_eq!(expect(partial).need(), 1);
        let bad = b"GET /healthz HTTP/1.1\r\n\r\nG\x01T / HTTP/1.1\r\n\r\n";
        let e = expect(bad);
        assert_eq!((e.need(), e.refusal), (2, true));
        let body = b"POST /msi/token HTTP/1.1\r\nContent-Length: 3\r\n\r\nabcGET / HTTP/1.1\r\n\r\n";
        assert_eq!(expect(body).need(), 2);
        let differing = b"POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd";
        assert!(expect(differing).refusal);
    }

    #[test]
    fn the_host_oracle() {
        let head = |host: &str| Head {
            method: "GET".into(),
            path: "/".into(),
            query: None,
            target_len: 1,
            headers: vec![("host".into(), host.as_bytes().to_vec())],
            oversized: false,
        };
        for ok in ["127.0.0.1", "127.0.0.1:50342", "localhost", "LOCALHOST:80", "[::1]:8080", "[::1]", "127.8.9.1"] {
            assert!(head(ok).host_is_local(), "{ok}");
        }
        for bad in ["evil.com", "127.0.0.1.evil.com", "[::1]x", "10.0.0.1", "localhost.evil", ""] {
            assert!(!head(bad).host_is_local(), "{bad}");
        }
    }
}
