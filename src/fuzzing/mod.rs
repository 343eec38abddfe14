//! Entry points for the fuzz targets in `fuzz/` and for the replay of their corpus
//! (`tests/fuzz_corpus.rs`); only with the `fuzzing` feature, never in the shipping library. Each
//! function panics when an invariant does not hold: that is the fuzzer's crash.
//!
//! - [`request`]: the bytes as a client sends them, over a real unix-socket and a real loopback TCP
//!   connection, to tokend's own accept loop and hyper connection (`server::serve`), so that every
//!   request meets the real guards, `Application::answer_now` and the router. The broker behind it has
//!   three identities, `[access]` rules, a rate limit and an `[audit]` log in a temporary directory,
//!   and a token source that answers at once with Entra-sized tokens naming the identity and resource
//!   they were issued for. What is checked ([`wire`]): every complete request head gets exactly one
//!   answer (an extra one only for a head hyper could not parse), the status is a documented one, an
//!   error body is JSON in the dialect's shape, a 429 says when to retry, no answer carries a token unless
//!   its request passed the guards and `[access]` allows that identity and resource, and no audit line
//!   carries one.
//! - [`idp_response`]: status, `Retry-After`, content type and body through `idp::parse_response`, and a
//!   parsed token into the cache entry the refresher builds from it. It never panics, and an error holds
//!   no body text but a snake-case error code or a short `token_type` (never a token).

mod wire;

use std::io::{Read as _, Seek as _};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio_util::sync::CancellationToken;

use crate::identity::Identity;
use crate::resource::Resource;
use crate::token::{BoxFuture, FetchError, IssuedToken, TokenSource};

/// The identity header secret (`X-IDENTITY-HEADER`, `secret`) of the fuzzed server.
pub const IDENTITY_HEADER: &str = "fuzz-identity-header-secret";
/// The default identity's client id.
pub const DEFAULT_CLIENT_ID: &str = "11111111-2222-3333-4444-555555555555";
/// The second identity's client id (every resource allowed).
pub const SECOND_CLIENT_ID: &str = "22222222-3333-4444-5555-666666666666";
/// The third identity's client id (no rule allows it).
pub const THIRD_CLIENT_ID: &str = "33333333-4444-5555-6666-777777777777";
/// Requests per second per caller (`[access] rate_limit`).
const RATE: &str = "2000/s";
/// What every issued token contains, and nothing else tokend sends.
const MARKER: &str = "TOKENZnV6ei1pc3N1ZWQtdG9rZW4";
/// The rest of each token: its signature part, Entra-sized.
fn signature() -> String {
    "c2lnbmF0dXJlLW9mLWEtZnV6ei10b2tlbg".chars().cycle().take(342).collect()
}

/// Feeds `data` to the server as one client connection over each transport, and checks the answers.
pub fn request(data: &[u8]) {
    let harness = Harness::get();
    let expected = wire::expect(data);
    for transport in [Transport::Tcp, Transport::Unix] {
        let raw = harness.runtime.block_on(harness.exchange(transport, data, &expected));
        if std::env::var_os("TOKEND_FUZZ_SHOW").is_some() {
            eprintln!("--- {} answers:\n{}", transport.name(), String::from_utf8_lossy(&raw));
        }
        wire::check(data, &expected, &raw, &Oracle, transport.name());
    }
    harness.check_audit(contains(data, MARKER.as_bytes()));
}

/// Runs the request checks over `answers` as if the server had sent them in reply to `request` (for
/// tests of the checks themselves: each must catch what it is there for).
pub fn check_answers(request: &[u8], answers: &[u8]) {
    wire::check(request, &wire::expect(request), answers, &Oracle, "given");
}

/// A token as the fuzzed server issues it for `identity` and `resource`.
pub fn issued_token(identity: &str, resource: &str) -> String {
    token_for(identity, resource)
}

/// `[status hi, status lo, flags, content-type selector, body...]` through `idp::parse_response` (the
/// flags' low bit: a `Retry-After` of the other bits' seconds), then, for a token, into the cache entry
/// the refresher would build (`AccessToken::new`, refreshed at half its lifetime, the latest that
/// `refresh_after` gives).
pub fn idp_response(data: &[u8]) {
    let [hi, lo, flags, ct, body @ ..] = data else { return };
    let status = 100 + u16::from_be_bytes([*hi, *lo]) % 500;
    let retry_after = (flags & 1 == 1).then(|| Duration::from_secs(u64::from(flags >> 1)));
    let content_type =
        ["application/json", "", "text/html; charset=utf-8", "application/json; charset=utf-8"][usize::from(*ct) % 4];
    match crate::idp::parse_response(status, retry_after, content_type, body) {
        Ok(parsed) => {
            assert!((200..300).contains(&status), "HTTP {status} parsed as a token");
            let lifetime = parsed.expires_in;
            let issued = IssuedToken {
                access_token: parsed.access_token,
                expires_in: lifetime,
                ext_expires_in: parsed.ext_expires_in,
                refresh_in: parsed.refresh_in,
                requested_at: SystemTime::now(),
            };
            let token = crate::token::AccessToken::new(issued, tokio::time::Instant::now(), lifetime / 2);
            assert!(token.expires_on() >= token.not_before(), "a token that expires before it was issued");
        }
        Err(e) => check_fetch_error(status, &e),
    }
}

/// Longest body text an error may repeat: an OAuth error code is at most 40 characters (and only `a`–`z`
/// and `_`, so never a JWT); a `token_type` is cut to 32.
const MAX_ECHO: usize = 40;

/// What a [`FetchError`] from `parse_response` may hold: a status, an OAuth error code in snake case (or
/// `-`), or one of the fixed details, where the only body text is a `token_type` of at most 32
/// characters. (A check for runs of the body in the error's text cannot tell an echo from a body that
/// spells the error's own wording, which the fuzzer soon writes.)
fn check_fetch_error(status: u16, e: &FetchError) {
    match e {
        FetchError::CredentialRejected { status: s, error }
        | FetchError::BadResource { status: s, error }
        | FetchError::Rejected { status: s, error } => {
            assert_eq!(*s, status, "{e}");
            let snake = !error.is_empty() && error.bytes().all(|b| b.is_ascii_lowercase() || b == b'_');
            assert!(error == "-" || (snake && error.len() <= MAX_ECHO), "error code {error:?} echoes the body");
        }
        FetchError::Throttled { .. } => assert_eq!(status, 429),
        FetchError::ServerError { status: s, .. } => assert!(*s == status && status >= 500, "{e}"),
        FetchError::Malformed { detail } => {
            assert!((200..300).contains(&status), "{e}");
            let fixed = [
                "no access_token",
                "expires_in is not a number of seconds",
                "expires_on is not a number",
                "neither expires_in nor expires_on",
            ];
            let echoed = detail.strip_prefix("token_type ").and_then(|d| d.strip_suffix(" is not Bearer"));
            let known = fixed.contains(&detail.as_str())
                || detail.starts_with(&format!("HTTP {status} with a body of "))
                || detail.starts_with("a lifetime of ")
                || echoed.is_some_and(|quoted| {
                    serde_json::from_str::<String>(quoted).is_ok_and(|t| t.chars().count() <= 32)
                        || quoted.chars().count() <= 32 * 10 + 2
                });
            assert!(known && detail.len() <= 200, "an unexpected detail: {detail:?}");
        }
        FetchError::Transport { .. } | FetchError::CredentialUnusable { .. } => {
            panic!("parse_response made a {e:?}")
        }
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

/// The token for `identity` and `resource`: Entra-sized, and naming both (hex-encoded) for the oracle.
fn token_for(identity: &str, resource: &str) -> String {
    let hex = |s: &str| s.bytes().map(|b| format!("{b:02x}")).collect::<String>();
    format!("eyJ0eXAiOiJKV1QiLCJhbGciOiJSUzI1NiJ9.{MARKER}{}_{}.{}", hex(identity), hex(resource), signature())
}

/// The identity and resource a token was issued for, from [`token_for`]'s form.
fn issued_for(token: &str) -> Option<(String, String)> {
    let (_, rest) = token.split_once(MARKER)?;
    let (named, _) = rest.split_once('.')?;
    let (identity, resource) = named.split_once('_')?;
    let unhex = |s: &str| {
        let bytes: Option<Vec<u8>> =
            (0..s.len()).step_by(2).map(|i| s.get(i..i + 2).and_then(|h| u8::from_str_radix(h, 16).ok())).collect();
        bytes.and_then(|b| String::from_utf8(b).ok())
    };
    Some((unhex(identity)?, unhex(resource)?))
}

/// Answers at once with [`token_for`] the identity and resource, valid for an hour.
struct AtOnce;

impl TokenSource for AtOnce {
    fn fetch<'a>(
        &'a self,
        identity: &'a Identity,
        resource: &'a Resource,
    ) -> BoxFuture<'a, Result<IssuedToken, FetchError>> {
        let token = token_for(&identity.name, resource.as_str());
        Box::pin(async move {
            Ok(IssuedToken {
                access_token: token.into(),
                expires_in: Duration::from_secs(3600),
                ext_expires_in: None,
                refresh_in: None,
                requested_at: SystemTime::now(),
            })
        })
    }
}

/// What the configuration allows the fuzzing process (the only caller), independently of how tokend
/// decides it: the default identity for two resources, the second for any, the third never.
struct Oracle;

impl wire::Allowed for Oracle {
    fn token(&self, token: &str) -> Result<(), String> {
        let (identity, resource) = issued_for(token).ok_or("an answer carries a token tokend never issued")?;
        let allowed = match identity.as_str() {
            "default" => ["https://storage.azure.com", "https://vault.azure.net/"].contains(&resource.as_str()),
            "second" => true,
            _ => false,
        };
        if allowed { Ok(()) } else { Err(format!("[access] does not allow {identity} {resource}")) }
    }

    fn secret(&self) -> &str {
        IDENTITY_HEADER
    }

    fn marker(&self) -> &str {
        MARKER
    }
}

/// Which connection the bytes are sent over.
#[derive(Debug, Clone, Copy)]
enum Transport {
    /// Loopback TCP (the caller from `sock_diag`; no process lookup, so a first request can be answered
    /// before routing).
    Tcp,
    /// The unix socket (the caller from `SO_PEERCRED`; the audit log's process lookup, so a first request
    /// is routed and waits for it).
    Unix,
}

impl Transport {
    fn name(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Unix => "unix",
        }
    }
}

/// The server, started once per process.
struct Harness {
    runtime: tokio::runtime::Runtime,
    tcp: SocketAddr,
    unix: PathBuf,
    audit: Mutex<Audit>,
}

/// The audit log, read as it grows.
struct Audit {
    path: PathBuf,
    offset: u64,
    tail: Vec<u8>,
    runs: u64,
    echoed: bool,
}

impl Harness {
    fn get() -> &'static Self {
        static HARNESS: OnceLock<Harness> = OnceLock::new();
        HARNESS.get_or_init(Self::start)
    }

    #[allow(clippy::expect_used)] // Set-up: the fuzzer cannot run without it.
    fn start() -> Self {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a Tokio runtime");
        remove_stale_dirs();
        let dir = std::env::temp_dir().join(format!("tokend-fuzz-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create a temporary directory");
        std::fs::write(dir.join("secret"), "s").expect("write the secret file");
        let uid = nix::unistd::geteuid().as_raw();
        let text = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nunix_socket = \"{sock}\"\n\n\
             [[identity]]\nname = \"default\"\nclient_id = \"{DEFAULT_CLIENT_ID}\"\n\
             token_url = \"http://127.0.0.1:9/t/oauth2/v2.0/token\"\nclient_secret_file = \"secret\"\n\
             resources = [\"https://storage.azure.com\"]\n\n\
             [[identity]]\nname = \"second\"\nclient_id = \"{SECOND_CLIENT_ID}\"\n\
             object_id = \"44444444-5555-6666-7777-888888888888\"\n\
             token_url = \"http://127.0.0.1:9/t/oauth2/v2.0/token\"\nclient_secret_file = \"secret\"\n\n\
             [[identity]]\nname = \"third\"\nclient_id = \"{THIRD_CLIENT_ID}\"\n\
             token_url = \"http://127.0.0.1:9/t/oauth2/v2.0/token\"\nclient_secret_file = \"secret\"\n\n\
             [access]\ndefault = \"deny\"\nunknown = \"deny\"\nrate_limit = \"{RATE}\"\n\n\
             [[access.rule]]\nuids = [{uid}]\nidentities = [\"default\"]\n\
             resources = [\"https://storage.azure.com\", \"https://vault.azure.net/\"]\n\n\
             [[access.rule]]\nuids = [{uid}]\nidentities = [\"second\"]\nresources = [\"*\"]\n\n\
             [audit]\npath = \"audit.log\"\n",
            sock = dir.join("tokend.sock").display(),
        );
        let config =
            crate::config::Config::from_toml(&text, &dir.join("tokend.toml"), &|_| None).expect("the configuration");
        let audit_config = config.audit.clone().expect("[audit] path");
        let (tcp, unix) = runtime.block_on(async {
            let audit =
                crate::audit::AuditLog::open(&audit_config.path, audit_config.on_failure).expect("open the audit log");
            let broker = crate::broker::Broker::start(
                &config,
                IDENTITY_HEADER.to_owned().into(),
                Some(audit),
                Arc::new(AtOnce),
                &tokio_util::task::TaskTracker::new(),
                &CancellationToken::new(),
            );
            while !broker.readiness().iter().all(|s| s.ready) {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            let listeners = crate::server::bind(&config.server, crate::server::Inherited::default())
                .await
                .expect("bind the listeners");
            let tcp = listeners.iter().find_map(crate::server::Listener::tcp_addr).expect("a TCP listener");
            let app = crate::server::router(broker);
            let (tcp_listener, unix_listener): (Vec<_>, Vec<_>) =
                listeners.into_iter().partition(|l| l.tcp_addr().is_some());
            // As the daemon serves them, but for the process lookup: the TCP connection without it (so
            // that its first request can be answered before routing), the unix one with it.
            let limits = crate::server::Limits {
                max_connections_per_caller: config.server.max_connections_per_caller,
                ..crate::server::Limits::default()
            };
            let stop = CancellationToken::new();
            tokio::spawn(crate::server::serve(tcp_listener, app.clone(), stop.clone(), limits));
            let with_lookup = crate::server::Limits { lookup_processes: true, ..limits };
            tokio::spawn(crate::server::serve(unix_listener, app, stop, with_lookup));
            (tcp, dir.join("tokend.sock"))
        });
        let audit = Audit { path: audit_config.path.clone(), offset: 0, tail: Vec::new(), runs: 0, echoed: false };
        Self { runtime, tcp, unix, audit: Mutex::new(audit) }
    }

    /// Sends `data` over a new connection and reads what comes back, as [`wire::read_answers`] decides.
    async fn exchange(&self, transport: Transport, data: &[u8], expected: &wire::Expected) -> Vec<u8> {
        match transport {
            Transport::Tcp => {
                let stream = tokio::net::TcpStream::connect(self.tcp).await;
                let stream = stream.unwrap_or_else(|e| panic!("connect to {}: {e}", self.tcp));
                let _ = stream.set_nodelay(true);
                exchange_over(stream, data, expected).await
            }
            Transport::Unix => {
                let stream = tokio::net::UnixStream::connect(&self.unix).await;
                let stream = stream.unwrap_or_else(|e| panic!("connect to {}: {e}", self.unix.display()));
                exchange_over(stream, data, expected).await
            }
        }
    }

    /// Every 64 runs: the audit lines written since the last check are JSON objects without a token
    /// (unless a request since then spelt the token's marker itself, `echoed`, which its line may repeat).
    fn check_audit(&self, echoed: bool) {
        let Ok(mut audit) = self.audit.lock() else { return };
        audit.runs += 1;
        audit.echoed |= echoed;
        if audit.runs % 64 != 0 {
            return;
        }
        let marker = if audit.echoed { None } else { Some(MARKER) };
        audit.check(marker);
        audit.echoed = false;
    }
}

impl Audit {
    fn check(&mut self, marker: Option<&str>) {
        let Ok(mut file) = std::fs::File::open(&self.path) else { return };
        let mut fresh = Vec::new();
        if file.seek(std::io::SeekFrom::Start(self.offset)).is_err() || file.read_to_end(&mut fresh).is_err() {
            return;
        }
        self.offset += fresh.len() as u64;
        self.tail.extend_from_slice(&fresh);
        let complete = self.tail.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
        for line in self.tail[..complete].split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            let text = String::from_utf8_lossy(line);
            let token = marker.is_some_and(|m| contains(line, m.as_bytes()));
            assert!(!token, "an audit line carries a token: {text}");
            let parsed: Result<serde_json::Value, _> = serde_json::from_slice(line);
            assert!(parsed.is_ok_and(|v| v.is_object()), "an audit line that is not a JSON object: {text}");
        }
        self.tail.drain(..complete);
        // Keep the file small over a long run: empty it when it has been read to its end (a line the
        // writer adds meanwhile is lost to the check, not to tokend).
        if self.offset > 16 << 20 && self.tail.is_empty() {
            truncate(&self.path);
            self.offset = 0;
        }
    }
}

/// The temporary directories of earlier runs whose process is gone.
fn remove_stale_dirs() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let pid = name.to_str().and_then(|n| n.strip_prefix("tokend-fuzz-")).and_then(|p| p.parse::<u32>().ok());
        if pid.is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists()) {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

fn truncate(path: &Path) {
    if let Ok(f) = std::fs::OpenOptions::new().write(true).open(path) {
        let _ = f.set_len(0);
    }
}

/// Writes `data` while reading the answers, until [`wire::read_answers`] has what it expects; then closes
/// the client's side and reads what is left until the server closes.
async fn exchange_over<S: AsyncRead + AsyncWrite>(stream: S, data: &[u8], expected: &wire::Expected) -> Vec<u8> {
    let (mut rd, mut wr) = tokio::io::split(stream);
    let write = async {
        // The server may close first (a bad head): that is for the answers to show.
        let _ = wr.write_all(data).await;
    };
    let mut raw = Vec::new();
    let read = wire::read_answers(&mut rd, expected, &mut raw);
    let ((), eof) = tokio::join!(write, read);
    if !eof {
        let _ = wr.shutdown().await;
        let rest = tokio::time::timeout(Duration::from_secs(10), rd.read_to_end(&mut raw)).await;
        assert!(rest.is_ok(), "the connection stayed open 10 s after the client closed its side");
    }
    raw
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_names_what_it_was_issued_for() {
        let t = token_for("default", "https://storage.azure.com");
        assert_eq!(issued_for(&t), Some(("default".to_owned(), "https://storage.azure.com".to_owned())));
        assert!(t.len() > 1000, "Entra-sized");
        assert!(t.contains(MARKER));
    }
}
