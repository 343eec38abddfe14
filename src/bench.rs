//! Entry points for the benchmarks in `benches/` (not a stable API): the per-connection caller lookups,
//! which are private to the crate otherwise; [`audit`] the audit line's costs.

pub mod audit;

use std::net::SocketAddr;

use crate::caller::{Caller, TcpCallers};
use crate::process::ProcessLookup;

/// The `sock_diag` lookup the accept loop does for every TCP connection.
#[derive(Debug, Default)]
pub struct TcpLookup(TcpCallers);

impl TcpLookup {
    /// The uid and socket inode of the client socket `peer` connected to `local`, if known.
    pub fn lookup(&self, peer: SocketAddr, local: SocketAddr) -> Option<(u32, u32)> {
        match self.0.lookup(peer, local) {
            (Caller::Known { uid, .. }, Some(inode)) => Some((uid, inode)),
            _ => None,
        }
    }
}

/// The pid of `uid`'s process holding socket `inode`, found as the audit log does (one fresh lookup).
pub fn process_of_socket(uid: u32, inode: u32) -> Option<i32> {
    ProcessLookup::new(uid, None, Some(inode)).resolve().map(|p| p.pid)
}

/// What the request path does to the metrics for one served token: count the request and the cache hit.
pub fn count_served_request() {
    let m = crate::metrics::get();
    m.request(crate::metrics::Route::Imds, 0, 200);
    m.served(true);
}

/// A token as long as a real Entra access token (~1.3 KB of base64url and dots).
fn entra_sized_token() -> String {
    let part = |n: usize| "eyJ0eXAiOiJKV1QiLCJhbGciOiJSUzI1NiJ9".chars().cycle().take(n).collect::<String>();
    format!("{}.{}.{}", part(96), part(900), part(342))
}

/// A token source that answers at once with an Entra-sized token valid for an hour.
struct AtOnce;

impl crate::token::TokenSource for AtOnce {
    fn fetch<'a>(
        &'a self,
        _: &'a crate::identity::Identity,
        _: &'a crate::resource::Resource,
    ) -> crate::token::BoxFuture<'a, Result<crate::token::IssuedToken, crate::token::FetchError>> {
        Box::pin(async {
            Ok(crate::token::IssuedToken {
                access_token: entra_sized_token().into(),
                expires_in: std::time::Duration::from_secs(3600),
                ext_expires_in: None,
                refresh_in: None,
                requested_at: std::time::SystemTime::now(),
            })
        })
    }
}

/// The IMDS request the benchmarks send (`curl -H Metadata:true` with `resource` as given).
pub const IMDS_QUERY: &str =
    "/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https://storage.azure.com";

/// tokend's application (routes and guards) over a broker with one identity, one configured
/// resource cached, and a token source that answers at once: the request path without sockets.
#[derive(Debug)]
pub struct App {
    app: crate::server::App,
    asker: crate::dialect::Asker,
    broker: std::sync::Arc<crate::broker::Broker>,
    dir: std::path::PathBuf,
}

impl App {
    /// Builds it and waits until the configured token is cached. Call inside a Tokio runtime.
    pub async fn new() -> Self {
        let dir = std::env::temp_dir().join(format!("tokend-bench-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create a temporary directory");
        std::fs::write(dir.join("secret"), "s").expect("write the secret file");
        let text = "[[identity]]\nclient_id = \"11111111-2222-3333-4444-555555555555\"\n\
                    token_url = \"http://127.0.0.1:9/t/oauth2/v2.0/token\"\nclient_secret_file = \"secret\"\n\
                    resources = [\"https://storage.azure.com\"]\n";
        let config = crate::config::Config::from_toml(text, &dir.join("tokend.toml"), &|_| None).expect("config");
        let broker = crate::broker::Broker::start(
            &config,
            "header-secret".to_owned().into(),
            None,
            std::sync::Arc::new(AtOnce),
            &tokio_util::task::TaskTracker::new(),
            &tokio_util::sync::CancellationToken::new(),
        );
        while !broker.readiness().iter().all(|s| s.ready) {
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        let app = crate::server::router(broker.clone());
        let asker =
            crate::dialect::Asker::new(crate::caller::Caller::Unknown(crate::caller::Unknown::LookupFailed), None);
        Self { app, asker, broker, dir }
    }

    /// Answers one request as the server would (minus the socket): at once if it can, else routed;
    /// the status and body length.
    pub async fn call(&self, mut req: axum::http::Request<axum::body::Body>) -> (u16, usize) {
        let resp = match crate::server::Application::answer_now(&self.app, &req, &self.asker) {
            Some(resp) => resp,
            None => {
                req.extensions_mut().insert(self.asker.clone());
                tower::ServiceExt::oneshot(self.app.clone(), req).await.unwrap_or_else(|e| match e {})
            }
        };
        (resp.status().as_u16(), axum::body::HttpBody::size_hint(resp.body()).exact().unwrap_or(0) as usize)
    }

    /// The cache lookup of a cached token: the snapshot, the default identity, the entry.
    pub async fn cache_lookup(&self, resource: &str) -> bool {
        let resource = crate::resource::Resource::parse(resource).expect("resource");
        let snapshot = self.broker.snapshot();
        let identity = snapshot.identities.select(None).expect("identity");
        let caller = crate::caller::Caller::Unknown(crate::caller::Unknown::LookupFailed);
        self.broker.cache().get(&snapshot, &caller, identity, &resource).await.is_ok_and(|s| s.cache_hit)
    }
}

impl Drop for App {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Parses a token request's query as the IMDS and App Service dialects do; whether it named a resource.
pub fn parse_query(query: &str) -> bool {
    crate::dialect::parse_query(Some(query)).is_ok_and(|q| q.resource.is_some())
}

/// A cached Entra-sized token, to render answers with.
#[derive(Debug)]
pub struct Token(crate::token::AccessToken);

impl Default for Token {
    fn default() -> Self {
        let issued = crate::token::IssuedToken {
            access_token: entra_sized_token().into(),
            expires_in: std::time::Duration::from_secs(3600),
            ext_expires_in: None,
            refresh_in: None,
            requested_at: std::time::SystemTime::now(),
        };
        let now = tokio::time::Instant::now();
        Self(crate::token::AccessToken::new(issued, now, std::time::Duration::from_secs(1800)))
    }
}

impl Token {
    /// Renders the success body for it, as every dialect answers; its length.
    pub fn render(&self, client_id: &str, resource: &str) -> usize {
        crate::dialect::token_body(&self.0, client_id, resource, crate::clock::unix_secs(std::time::SystemTime::now()))
            .len()
    }
}
