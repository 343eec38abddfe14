//! `tokend dev`: a built-in local OAuth2 issuer, for development only.
//!
//! It generates an RSA key and a client secret at start, listens on an ephemeral loopback port, checks
//! client credentials like a real IdP (constant-time secret comparison, `grant_type`, `scope=<resource>/.default`
//! or `resource=`) and issues RS256 JWTs with `aud`, `exp`, `iat`, `nbf`, `iss`, `tid`, `appid`, `sub`, `jti`.
//! The broker then talks to it through the normal upstream path ([`crate::idp`]), so `tokend dev`
//! exercises everything but Entra itself. Its tokens are worthless anywhere else. [`run`] is the
//! whole `tokend dev` flow: issuer, broker, banner and the `export` lines.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use aws_lc_rs::encoding::AsDer;
use axum::Router;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use secrecy::{ExposeSecret, SecretString};
use serde::Serialize;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::clock::unix_secs;
use crate::config::{Config, IdentityHeaderSource, ServerConfig, TokensConfig, UpstreamConfig};
use crate::credential::ClientCredential;
use crate::daemon::{self, signal};
use crate::dialect::{EnvDialect, export_lines, imds};
use crate::error::Error;
use crate::identity::{Identity, TokenApi};
use crate::resource::Resource;
use crate::secret::{fingerprint, pem_encode, random_secret};

const BANNER: &str = "\
################################################################################
#  tokend dev: DEVELOPMENT ONLY. Tokens come from a built-in fake issuer with  #
#  a throw-away key; no real service accepts them. Never use this in production.#
################################################################################";

/// `tokend dev`: the issuer, then a broker against it on `listen` (loopback only) until SIGTERM/SIGINT.
/// The `export` lines go to stdout once the broker listens.
pub(crate) async fn run(listen: SocketAddr, resources: Vec<String>, json_logs: bool) -> Result<(), Error> {
    if !listen.ip().is_loopback() {
        return Err(Error::Usage(format!(
            "--listen {listen} is not a loopback address; tokend dev only listens on loopback"
        )));
    }
    daemon::harden()?;
    let (tracker, cancel) = (TaskTracker::new(), CancellationToken::new());
    let issuer = start_issuer(&tracker, &cancel, resources).await?;
    let config = dev_config(&issuer, listen)?;
    let prepared = daemon::prepare(config).map_err(|e| anyhow::anyhow!("{e}"))?;
    let header = prepared.identity_header.clone();
    if json_logs {
        // One structured line instead of the plain-text box, so that a JSON log stays JSON.
        let text = BANNER.replace('#', " ").split_whitespace().collect::<Vec<_>>().join(" ");
        tracing::warn!(banner = %text, "DEVELOPMENT ONLY");
    } else {
        eprintln!("{BANNER}");
    }
    let client_dir = std::env::temp_dir().join(format!("tokend-dev-{}", std::process::id()));
    let client = (client_dir.clone(), issuer.client_id.clone(), issuer.token_url.clone(), issuer.client_secret.clone());
    let on_listening = move |bound: &[SocketAddr]| {
        let addr = bound.first().copied().unwrap_or(listen);
        match write_client_config(&client.0, addr, &header, &client.1, &client.2, &client.3) {
            Ok(path) => println!("# For tokend env / token / check against this broker: --config {}", path.display()),
            Err(e) => tracing::warn!(error = %e, "cannot write the client configuration for tokend env/token/check"),
        }
        println!("# Point Azure SDKs at this broker:");
        print!("{}", export_lines(addr, &header));
        println!(
            "# Code written for Azure ML compute (MSI_ENDPOINT + MSI_SECRET) instead: {}",
            EnvDialect::AzureMl.lines(addr, Some(&header)).lines().collect::<Vec<_>>().join("; ")
        );
        println!("# Then, for example:");
        println!(
            "# curl -s -H Metadata:true 'http://{addr}{}?api-version=2018-02-01&resource={DEV_RESOURCE}'",
            imds::PATH
        );
    };
    let result = daemon::run(prepared, None, tracker, cancel, on_listening, signal::shutdown()).await;
    let _ = std::fs::remove_dir_all(&client_dir);
    result?;
    Ok(())
}

/// Writes a configuration (mode 0700 directory, 0600 secrets) that points `tokend env`, `token` and
/// `check` at this broker and its issuer; removed when `tokend dev` stops.
fn write_client_config(
    dir: &std::path::Path,
    addr: SocketAddr,
    header: &SecretString,
    client_id: &str,
    token_url: &reqwest::Url,
    secret: &SecretString,
) -> std::io::Result<std::path::PathBuf> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    std::fs::DirBuilder::new().mode(0o700).recursive(true).create(dir)?;
    let write = |name: &str, text: &str, mode: u32| -> std::io::Result<()> {
        let mut f =
            std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(mode).open(dir.join(name))?;
        std::io::Write::write_all(&mut f, text.as_bytes())
    };
    write("identity-header", header.expose_secret(), 0o600)?;
    write("client-secret", secret.expose_secret(), 0o600)?;
    let toml = format!(
        "# Written by tokend dev for `tokend env|token|check --config`; removed when it stops.\n\
         [server]\nlisten = [\"{addr}\"]\nidentity_header_file = \"identity-header\"\n\n\
         [[identity]]\nname = \"dev\"\nclient_id = \"{client_id}\"\ntoken_url = \"{token_url}\"\n\
         client_secret_file = \"client-secret\"\nresources = [\"{DEV_RESOURCE}\"]\n"
    );
    write("tokend.toml", &toml, 0o644)?;
    Ok(dir.join("tokend.toml"))
}

/// Tenant id the dev issuer answers for.
pub(crate) const DEV_TENANT: &str = "dev-tenant";
/// Lifetime of dev tokens.
pub(crate) const DEV_TOKEN_LIFETIME: Duration = Duration::from_secs(3600);
/// Resource fetched at start, so that `tokend dev` is warm at once.
pub(crate) const DEV_RESOURCE: &str = "https://management.azure.com";

/// A running dev issuer.
#[derive(Debug)]
pub(crate) struct DevIssuer {
    /// Its token endpoint.
    pub token_url: reqwest::Url,
    /// The one registered client.
    pub client_id: String,
    /// That client's secret.
    pub client_secret: SecretString,
}

struct IssuerState {
    client_id: String,
    client_secret: SecretString,
    key: jsonwebtoken::EncodingKey,
    kid: String,
    issuer: String,
    /// Resources accepted besides the well-known ones (`tokend dev --resource`).
    extra: Vec<String>,
}

/// Well-known Azure resource hosts (with or without a trailing slash): what the dev issuer accepts
/// besides `api://…` and GUID app ids, like Entra with the first-party resources every tenant has.
const KNOWN_RESOURCE_HOSTS: &[&str] = &[
    "management.azure.com",
    "management.core.windows.net",
    "storage.azure.com",
    "vault.azure.net",
    "graph.microsoft.com",
    "database.windows.net",
    "ossrdbms-aad.database.windows.net",
    "cognitiveservices.azure.com",
    "servicebus.azure.net",
    "eventhubs.azure.net",
    "monitor.azure.com",
    "batch.core.windows.net",
    "datalake.azure.net",
    "api.loganalytics.io",
    "redis.azure.com",
    "ml.azure.com",
    "help.kusto.windows.net",
];

/// Whether Entra would know `resource` (the dev issuer's approximation): a well-known Azure resource,
/// a storage or key vault account URL, an `api://` URI, a GUID, or one given with `--resource`.
fn known_resource(resource: &str, extra: &[String]) -> bool {
    if extra.iter().any(|e| e.trim_end_matches('/') == resource.trim_end_matches('/')) {
        return true;
    }
    if resource.starts_with("api://") || uuid::Uuid::parse_str(resource).is_ok() {
        return true;
    }
    let Some(host) = resource.strip_prefix("https://").map(|h| h.trim_end_matches('/')) else { return false };
    KNOWN_RESOURCE_HOSTS.contains(&host)
        || [
            ".blob.core.windows.net",
            ".queue.core.windows.net",
            ".table.core.windows.net",
            ".dfs.core.windows.net",
            ".vault.azure.net",
        ]
        .iter()
        .any(|suffix| host.strip_suffix(suffix).is_some_and(|a| !a.is_empty() && !a.contains('.') && !a.contains('/')))
}

/// Generates the key and secret, binds `127.0.0.1:0` and serves until `cancel`.
async fn start_issuer(
    tracker: &TaskTracker,
    cancel: &CancellationToken,
    extra: Vec<String>,
) -> anyhow::Result<DevIssuer> {
    let key = aws_lc_rs::rsa::KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048)
        .map_err(|_| anyhow::anyhow!("cannot generate an RSA key"))?;
    let der = AsDer::<aws_lc_rs::encoding::Pkcs8V1Der>::as_der(&key)
        .map_err(|_| anyhow::anyhow!("cannot encode the RSA key"))?;
    let pem = pem_encode("PRIVATE KEY", der.as_ref());
    let encoding_key = jsonwebtoken::EncodingKey::from_rsa_pem(pem.expose_secret().as_bytes())?;
    let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
    let addr = listener.local_addr()?;
    let client_id = uuid::Uuid::new_v4().to_string();
    let client_secret = random_secret();
    let state = Arc::new(IssuerState {
        client_id: client_id.clone(),
        client_secret: client_secret.clone(),
        key: encoding_key,
        kid: fingerprint(client_id.as_bytes()).trim_start_matches("sha256:").to_owned(),
        issuer: format!("http://{addr}/{DEV_TENANT}/v2.0"),
        extra,
    });
    // Sign once now, so a broken key fails start-up rather than the first request.
    issue(&state, "https://management.azure.com")?;
    let app = Router::new().route("/{tenant}/oauth2/v2.0/token", post(token)).with_state(state);
    let stop = cancel.clone();
    tracker.spawn(async move {
        if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(stop.cancelled_owned()).await {
            tracing::error!(error = %e, "dev issuer stopped");
        }
    });
    let token_url = reqwest::Url::parse(&format!("http://{addr}/{DEV_TENANT}/oauth2/v2.0/token"))?;
    Ok(DevIssuer { token_url, client_id, client_secret })
}

/// The broker configuration `tokend dev` runs with: one identity against the dev issuer.
fn dev_config(issuer: &DevIssuer, listen: SocketAddr) -> anyhow::Result<Config> {
    let identity = Identity {
        name: "dev".to_owned(),
        client_id: issuer.client_id.clone(),
        object_id: None,
        resource_id: None,
        token_url: issuer.token_url.clone(),
        api: TokenApi::V2,
        credential: ClientCredential::Secret {
            secret: issuer.client_secret.clone(),
            origin: "generated by tokend dev".into(),
        },
        resources: vec![Resource::parse(DEV_RESOURCE)?],
    };
    Ok(Config {
        source: "tokend dev".to_owned(),
        server: ServerConfig {
            listen: vec![listen],
            identity_header: IdentityHeaderSource::Generated,
            unix_socket: None,
            max_connections_per_caller: 256,
        },
        tokens: TokensConfig::default(),
        upstream: UpstreamConfig::default(),
        identities: vec![identity],
        access: None,
        audit: None,
        metrics_listen: None,
        warnings: Vec::new(),
        watched: Vec::new(),
    })
}

#[derive(Serialize)]
struct Claims<'a> {
    aud: &'a str,
    iss: &'a str,
    sub: &'a str,
    appid: &'a str,
    azp: &'a str,
    tid: &'a str,
    iat: u64,
    nbf: u64,
    exp: u64,
    jti: String,
}

fn issue(state: &IssuerState, resource: &str) -> anyhow::Result<String> {
    let now = unix_secs(SystemTime::now());
    let claims = Claims {
        aud: resource,
        iss: &state.issuer,
        sub: &state.client_id,
        appid: &state.client_id,
        azp: &state.client_id,
        tid: DEV_TENANT,
        iat: now,
        nbf: now,
        exp: now + DEV_TOKEN_LIFETIME.as_secs(),
        jti: uuid::Uuid::new_v4().to_string(),
    };
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
    header.kid = Some(state.kid.clone());
    header.typ = Some("JWT".to_owned());
    Ok(jsonwebtoken::encode(&header, &claims, &state.key)?)
}

fn oauth_error(status: StatusCode, error: &str, description: &str) -> Response {
    (status, axum::Json(serde_json::json!({ "error": error, "error_description": description }))).into_response()
}

async fn token(State(state): State<Arc<IssuerState>>, Path(tenant): Path<String>, body: String) -> Response {
    if tenant != DEV_TENANT {
        return oauth_error(StatusCode::BAD_REQUEST, "invalid_request", "unknown tenant");
    }
    let form: HashMap<String, String> = form_urlencoded::parse(body.as_bytes()).into_owned().collect();
    let get = |k: &str| form.get(k).map(String::as_str);
    if get("grant_type") != Some("client_credentials") {
        return oauth_error(StatusCode::BAD_REQUEST, "unsupported_grant_type", "only client_credentials is supported");
    }
    let id_ok = get("client_id") == Some(state.client_id.as_str());
    let secret_ok = get("client_secret").is_some_and(|s| {
        aws_lc_rs::constant_time::verify_slices_are_equal(s.as_bytes(), state.client_secret.expose_secret().as_bytes())
            .is_ok()
    });
    if !(id_ok && secret_ok) {
        return oauth_error(StatusCode::UNAUTHORIZED, "invalid_client", "client authentication failed");
    }
    let resource = match (get("scope"), get("resource")) {
        (Some(scope), _) => match scope.split(' ').find_map(|s| s.strip_suffix("/.default")) {
            Some(r) if !r.is_empty() => r.to_owned(),
            _ => return oauth_error(StatusCode::BAD_REQUEST, "invalid_scope", "scope must be <resource>/.default"),
        },
        (None, Some(r)) if !r.is_empty() => r.to_owned(),
        _ => return oauth_error(StatusCode::BAD_REQUEST, "invalid_request", "scope is required"),
    };
    if !known_resource(&resource, &state.extra) {
        // What Entra answers for a resource it does not know (so a typo surfaces in development).
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_resource",
            &format!(
                "AADSTS500011: The resource principal named {resource} was not found in the tenant named {DEV_TENANT}. \
                 (tokend dev accepts well-known Azure resources, api:// URIs, GUIDs and those given with --resource.)"
            ),
        );
    }
    match issue(&state, &resource) {
        Ok(jwt) => {
            let secs = DEV_TOKEN_LIFETIME.as_secs();
            axum::Json(serde_json::json!({
                "token_type": "Bearer",
                "expires_in": secs,
                "ext_expires_in": secs,
                "access_token": jwt,
            }))
            .into_response()
        }
        Err(e) => {
            tracing::error!(error = %e, "dev issuer cannot sign");
            oauth_error(StatusCode::INTERNAL_SERVER_ERROR, "server_error", "signing failed")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_dev_issuer_knows_resources_like_entra_and_refuses_typos() {
        let extra = vec!["https://contoso.example/api".to_owned()];
        for ok in [
            "https://management.azure.com",
            "https://management.azure.com/",
            "https://management.core.windows.net/",
            "https://storage.azure.com",
            "https://myaccount.blob.core.windows.net",
            "https://myvault.vault.azure.net",
            "api://tokend-contract",
            "00000003-0000-0000-c000-000000000000",
            "https://contoso.example/api/",
        ] {
            assert!(known_resource(ok, &extra), "{ok}");
        }
        for typo in [
            "https://managment.azure.com/",
            "management.azure.com",
            "https://a.b.blob.core.windows.net",
            "http://storage.azure.com",
        ] {
            assert!(!known_resource(typo, &extra), "{typo}");
        }
    }
}
