//! The answer to a connection beyond a connection limit (`server.max_connections_per_caller`, or a
//! listener's): a 429 (per caller) or 503 (per listener) with `Retry-After` and a JSON body that names
//! the limit, in the dialect's error shape, written before the connection is closed — so a client sees a
//! reason instead of a reset.
//!
//! Answering is kept cheap, so a flood of over-limit connections cannot tie up tasks or memory: at most
//! [`MAX_REFUSALS`] are answered at once (beyond that a connection is closed unanswered), each reads at
//! most [`HEAD_BYTES`] of its request (the request line, which tells the dialect) for at most
//! [`HEAD_TIME`], then is answered, shut for writing, and drained of what the client still sends — at
//! most [`DRAIN_BYTES`] — until the client closes, all within [`REFUSAL_TIME`].
//!
//! Why shut down and drain rather than close (RFC 9112 §9.6, "lingering close"): closing a socket with
//! unread input makes the kernel send a reset instead of a FIN, and a client that gets the reset first
//! reports it instead of the answer (`Connection reset by peer`; the unit test in `listen.rs` sees exactly
//! that when the answer is followed by a plain close). The FIN of the shutdown comes before any reset,
//! so a Linux client reads the answer and then end-of-file; the drain keeps a client that is still
//! sending (a body, a large head) from being reset while it sends, on any stack.

use std::sync::Arc;
use std::time::Duration;

use axum::http::{Method, StatusCode, header};
use axum::response::Response;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::caller::Caller;
use crate::dialect::{Dialect, RequestError};

/// Over-limit connections answered at once, over all listeners; beyond it one is closed unanswered.
pub(super) const MAX_REFUSALS: usize = 128;
/// How much of an over-limit connection's request is read: enough for its request line.
const HEAD_BYTES: usize = 1024;
/// How long an over-limit connection may take to send its request line before it is answered anyway
/// (in IMDS's shape).
const HEAD_TIME: Duration = Duration::from_millis(200);
/// The most input discarded after the answer.
const DRAIN_BYTES: usize = 64 * 1024;
/// The longest an over-limit connection is kept, answer and drain included.
const REFUSAL_TIME: Duration = Duration::from_secs(1);
/// `Retry-After` seconds: connections come and go quickly.
const RETRY_AFTER: u64 = 1;

/// The limit a connection is over.
#[derive(Debug, Clone, Copy)]
pub(super) enum Limit {
    /// `server.max_connections_per_caller`: this caller (uid; unidentified callers together) already
    /// has `max` open connections.
    PerCaller { caller: Caller, max: usize },
    /// The listener already has `max` open connections.
    Listener { max: usize },
}

impl Limit {
    /// The error, naming the limit and its value (and the caller): 429 for a caller over its own cap —
    /// its own doing, and what App Service clients retry after `Retry-After` (5xx only a few times over
    /// ~5 s) —, 503 when the listener as a whole is full.
    fn error(self) -> RequestError {
        let (status, code, description) = match self {
            Self::PerCaller { caller: Caller::Known { uid, .. }, max } => (
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_requests",
                format!(
                    "uid {uid} already has {max} open connections and server.max_connections_per_caller is \
                     {max}; close idle connections or retry after {RETRY_AFTER}s"
                ),
            ),
            Self::PerCaller { caller: Caller::Unknown(_), max } => (
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_requests",
                format!(
                    "unidentified callers together already have {max} open connections and \
                     server.max_connections_per_caller is {max}; retry after {RETRY_AFTER}s"
                ),
            ),
            Self::Listener { max } => (
                StatusCode::SERVICE_UNAVAILABLE,
                "temporarily_unavailable",
                format!(
                    "this listener already has {max} open connections, tokend's limit per listener; retry \
                     after {RETRY_AFTER}s"
                ),
            ),
        };
        RequestError { status, code, description, retry_after: Some(RETRY_AFTER) }
    }
}

/// The over-limit connections being answered, at most [`MAX_REFUSALS`] at once.
#[derive(Debug)]
pub(super) struct Refusals(Arc<tokio::sync::Semaphore>);

impl Default for Refusals {
    fn default() -> Self {
        Self(Arc::new(tokio::sync::Semaphore::new(MAX_REFUSALS)))
    }
}

impl Refusals {
    /// Answers `stream`, over `limit`, on a task of its own; `false` (and `stream` closed unanswered) when
    /// [`MAX_REFUSALS`] are being answered already.
    pub(super) fn refuse<S>(&self, stream: S, limit: Limit) -> bool
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let Ok(permit) = self.0.clone().try_acquire_owned() else {
            return false;
        };
        tokio::spawn(async move {
            if let Err(e) = tokio::time::timeout(REFUSAL_TIME, answer(stream, limit)).await.unwrap_or(Ok(())) {
                tracing::debug!(error = %e, "could not answer an over-limit connection");
            }
            drop(permit);
        });
        true
    }
}

/// Reads the request line (bounded), writes the answer, shuts the connection for writing and drains it.
async fn answer<S: AsyncRead + AsyncWrite + Unpin>(mut stream: S, limit: Limit) -> std::io::Result<()> {
    let mut buf = [0u8; HEAD_BYTES];
    let mut n = 0;
    let _ = tokio::time::timeout(HEAD_TIME, async {
        while n < buf.len() && !buf[..n].contains(&b'\n') {
            match stream.read(&mut buf[n..]).await {
                Ok(0) | Err(_) => break,
                Ok(k) => n += k,
            }
        }
    })
    .await;
    let dialect = dialect_of(&buf[..n]);
    stream.write_all(&encode(limit.error().into_response(dialect)).await).await?;
    stream.shutdown().await?;
    let mut drained = 0;
    while drained < DRAIN_BYTES {
        match stream.read(&mut buf).await? {
            0 => break,
            k => drained += k,
        }
    }
    Ok(())
}

/// The dialect whose error shape fits a request, from (the start of) its request line, as the router
/// decides it ([`Dialect::for_request`]); IMDS's when there is no request line to read.
fn dialect_of(head: &[u8]) -> Dialect {
    let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
    let mut words = line.split(|&b| b == b' ');
    let (Some(method), Some(target)) = (words.next(), words.next()) else {
        return Dialect::Imds;
    };
    let target = target.strip_suffix(b"\r").unwrap_or(target);
    // The absolute form (`http://host/path`) names the same path after its authority.
    let path = if target.starts_with(b"/") {
        target
    } else {
        let after_scheme = target.windows(3).position(|w| w == b"://").map_or(target, |i| &target[i + 3..]);
        after_scheme.iter().position(|&b| b == b'/').map_or(&b"/"[..], |i| &after_scheme[i..])
    };
    let path = path.split(|&b| b == b'?').next().unwrap_or_default();
    let method = Method::from_bytes(method).unwrap_or(Method::GET);
    std::str::from_utf8(path).map_or(Dialect::Imds, |path| Dialect::for_request(&method, path))
}

/// `resp` as HTTP/1.1 bytes, with its length and `Connection: close`.
async fn encode(resp: Response) -> Vec<u8> {
    let (parts, body) = resp.into_parts();
    let body = axum::body::to_bytes(body, HEAD_BYTES).await.unwrap_or_default();
    let mut out = Vec::with_capacity(256 + body.len());
    out.extend_from_slice(format!("HTTP/1.1 {}\r\n", parts.status).as_bytes());
    for (name, value) in
        parts.headers.iter().filter(|(n, _)| **n != header::CONTENT_LENGTH && **n != header::CONNECTION)
    {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(format!("content-length: {}\r\nconnection: close\r\n\r\n", body.len()).as_bytes());
    out.extend_from_slice(&body);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_request_line_picks_the_error_shape() {
        for (head, dialect) in [
            (&b"GET /metadata/identity/oauth2/token?resource=https://x HTTP/1.1\r\nHost: a\r\n"[..], Dialect::Imds),
            (b"GET /msi/token?api-version=2019-08-01&resource=https://x HTTP/1.1\r\n", Dialect::AppService),
            (b"GET /msi/token/?resource=r", Dialect::AppService),
            (b"POST /msi/token HTTP/1.1\r\n", Dialect::CloudShell),
            (b"GET http://127.0.0.1:50342/msi/token?x HTTP/1.1\r\n", Dialect::AppService),
            (b"GET http://127.0.0.1:50342 HTTP/1.1\r\n", Dialect::Imds),
            (b"GET /msi/token\r\n", Dialect::AppService),
            (b"GET /metadata/x?u=http://h/msi/token HTTP/1.1\r\n", Dialect::Imds),
            (b"\x00\xff garbage", Dialect::Imds),
            (b"", Dialect::Imds),
            (b"GET", Dialect::Imds),
        ] {
            assert_eq!(dialect_of(head), dialect, "{:?}", String::from_utf8_lossy(head));
        }
    }

    #[tokio::test]
    async fn the_answer_is_a_whole_http_response_that_names_the_limit() {
        let caller = Caller::Unknown(crate::caller::Unknown::NotFound);
        let bytes = encode(Limit::PerCaller { caller, max: 7 }.error().into_response(Dialect::Imds)).await;
        let text = String::from_utf8(bytes).expect("utf8");
        let (head, body) = text.split_once("\r\n\r\n").expect("head and body");
        assert!(head.starts_with("HTTP/1.1 429 Too Many Requests\r\n"), "{head}");
        for line in ["retry-after: 1", "connection: close", "cache-control: no-store", "content-type: application/json"]
        {
            assert!(head.lines().any(|l| l.eq_ignore_ascii_case(line)), "{line}: {head}");
        }
        assert!(head.lines().any(|l| l == format!("content-length: {}", body.len())), "{head}");
        let body: serde_json::Value = serde_json::from_str(body).expect("json");
        assert_eq!(body["error"], "too_many_requests");
        let description = body["error_description"].as_str().expect("description");
        assert!(description.contains("server.max_connections_per_caller is 7"), "{description}");
        let listener = encode(Limit::Listener { max: 9 }.error().into_response(Dialect::AppService)).await;
        let text = String::from_utf8(listener).expect("utf8");
        assert!(
            text.starts_with("HTTP/1.1 503 Service Unavailable\r\n") && text.contains("\"statusCode\":503"),
            "{text}"
        );
    }
}
