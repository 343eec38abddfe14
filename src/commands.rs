//! Every subcommand's entry point, what `main` calls: `serve` and `dev` run the daemon ([`crate::daemon`],
//! [`crate::dev`]); `env` and `token` are clients of a running broker that read only `[server]`
//! (`Config::load_server`) and, for `env`, the identity header file — never a secret file; `check`
//! makes one direct request per identity; `transparent-imds` manages the IMDS alias on `lo`.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::Context;

use crate::config::{Config, DEFAULT_LISTEN, IdentityHeaderSource, ServerConfig};
use crate::daemon::systemd;
use crate::dialect::{EnvDialect, imds};
use crate::error::Error;
use crate::idp::{IdpClient, MAX_CLOCK_SKEW};
use crate::resource::Resource;
use crate::secret::read_secret_file;
use crate::transparent::AliasError;

/// Resource `tokend check` asks for when an identity has none configured.
const CHECK_DEFAULT_RESOURCE: &str = "https://management.azure.com/";

/// `tokend serve`: runs the broker configured by `config` until SIGTERM/SIGINT.
pub async fn serve(config: &Path) -> Result<(), Error> {
    crate::daemon::serve(config).await
}

/// `tokend dev`: a built-in issuer and a broker on `listen`, for development only.
pub async fn dev(listen: SocketAddr, resources: Vec<String>, json_logs: bool) -> Result<(), Error> {
    crate::dev::run(listen, resources, json_logs).await
}

/// The `--dialect` values `tokend env` takes; the first is the default.
pub const ENV_DIALECTS: [&str; 4] = EnvDialect::NAMES;

/// `tokend env --dialect NAME`: the `unset` and `export` lines for the broker `config` describes, for one
/// family of clients ([`ENV_DIALECTS`]). Reads only the identity header file (created by `tokend
/// serve`), and only for the dialects that carry the secret, so any user who may read it can run it.
pub fn env(config: &Path, dialect: &str) -> Result<String, Error> {
    let Some(dialect) = EnvDialect::parse(dialect) else {
        return Err(Error::Usage(format!("--dialect {dialect:?}: use one of {}", ENV_DIALECTS.join(", "))));
    };
    let server = Config::load_server(config)?;
    if !dialect.needs_secret() {
        return Ok(dialect.lines(client_addr(&server), None));
    }
    let path = match &server.identity_header {
        IdentityHeaderSource::File(path) => path,
        IdentityHeaderSource::Generated => {
            return Err(anyhow::anyhow!("this configuration has no identity header file").into());
        }
    };
    let header = read_secret_file(path).map_err(|e| {
        if e.is_not_found() {
            anyhow::anyhow!(
                "server.identity_header_file {} does not exist yet; `tokend serve` creates it",
                path.display()
            )
        } else {
            anyhow::anyhow!("server.identity_header_file: {e}")
        }
    })?;
    Ok(dialect.lines(client_addr(&server), Some(&header)))
}

/// The address local clients should use: the first loopback listen address, else the first one.
fn client_addr(server: &ServerConfig) -> SocketAddr {
    let l = &server.listen;
    l.iter()
        .find(|a| a.ip().is_loopback())
        .or_else(|| l.first())
        .copied()
        .unwrap_or_else(|| DEFAULT_LISTEN.parse().expect("DEFAULT_LISTEN is a valid socket address"))
}

/// `tokend reload`: sends SIGHUP to the running daemon `pid` (systemd's `$MAINPID`) and waits for its
/// verdict in `state_dir` (`$RUNTIME_DIRECTORY`): `Ok` with a summary when the new configuration was
/// applied, an error with the reason when it was rejected (the daemon keeps serving the previous one).
/// It is the unit's `ExecReload=`, so `systemctl reload` fails on a rejected configuration.
pub async fn reload(pid: Option<u32>, state_dir: Option<&Path>) -> Result<String, Error> {
    let pid = pid.ok_or_else(|| Error::Usage("tokend reload: give --pid (systemd sets $MAINPID)".into()))?;
    let dir = state_dir
        .map(Path::to_path_buf)
        .or_else(systemd::runtime_directory)
        .ok_or_else(|| Error::Usage("tokend reload: give --state-dir (systemd sets $RUNTIME_DIRECTORY)".into()))?;
    let file = dir.join(systemd::RELOAD_STATUS_FILE);
    let read = || std::fs::read_to_string(&file).ok().and_then(|t| systemd::ReloadStatus::parse(&t));
    let before = read().filter(|s| s.pid == pid).map_or(0, |s| s.seq);
    let target = nix::unistd::Pid::from_raw(i32::try_from(pid).map_err(|_| Error::Usage(format!("--pid {pid}")))?);
    nix::sys::signal::kill(target, nix::sys::signal::Signal::SIGHUP)
        .map_err(|e| anyhow::anyhow!("cannot send SIGHUP to tokend (pid {pid}): {e}"))?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(s) = read().filter(|s| s.pid == pid && s.seq > before && s.reason == "SIGHUP") {
            return if s.applied {
                Ok(format!("configuration reloaded: {}", s.message))
            } else {
                Err(anyhow::anyhow!("configuration rejected, still serving the previous one: {}", s.message).into())
            };
        }
        if tokio::time::Instant::now() > deadline {
            return Err(anyhow::anyhow!(
                "tokend (pid {pid}) did not report the reload in {} within 60 s",
                file.display()
            )
            .into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `tokend health`: asks the running broker's `/readyz` (over its first TCP listener, or the unix
/// socket when it has none): `Ok` with one line when every configured resource is cached, an error
/// with one line otherwise; with `live`, only whether `/healthz` answers (a liveness probe). Never
/// prints a token (there is none in either).
pub async fn health(config: &Path, live: bool) -> Result<String, Error> {
    let server = Config::load_server(config)?;
    let target = match (server.listen.is_empty(), &server.unix_socket) {
        (true, Some(unix)) => systemd::SelfCheck::Unix(unix.path.clone()),
        _ => systemd::SelfCheck::Tcp(client_addr(&server)),
    };
    let path = if live { "/healthz" } else { "/readyz" };
    let answer = tokio::time::timeout(Duration::from_secs(10), systemd::local_get(&target, path)).await;
    let (status, body) = match answer {
        Ok(Ok(a)) => a,
        Ok(Err(e)) => return Err(anyhow::anyhow!("unhealthy: cannot reach tokend at {target:?}: {e}").into()),
        Err(_) => return Err(anyhow::anyhow!("unhealthy: tokend at {target:?} did not answer within 10 s").into()),
    };
    if live {
        return match status {
            200 => Ok("alive".to_owned()),
            other => Err(anyhow::anyhow!("unhealthy: /healthz answered HTTP {other}").into()),
        };
    }
    let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    let resources = v["resources"].as_u64().unwrap_or(0);
    match status {
        200 => Ok(format!("ready: {resources} configured tokens cached")),
        503 => {
            let pending: Vec<&str> = v["pending"].as_array().into_iter().flatten().filter_map(|p| p.as_str()).collect();
            Err(anyhow::anyhow!(
                "not ready: {} of {resources} configured tokens pending: {}",
                pending.len(),
                pending.join(", ")
            )
            .into())
        }
        other => Err(anyhow::anyhow!("unhealthy: /readyz answered HTTP {other}").into()),
    }
}

/// `tokend token`: asks the running broker (IMDS route) and returns only the access token.
pub async fn token(config: &Path, resource: &str, client_id: Option<&str>) -> Result<String, Error> {
    let addr = client_addr(&Config::load_server(config)?);
    Ok(ask(addr, resource, client_id).await?)
}

async fn ask(addr: SocketAddr, resource: &str, client_id: Option<&str>) -> anyhow::Result<String> {
    let mut url = reqwest::Url::parse(&format!("http://{addr}{}", imds::PATH))?;
    url.query_pairs_mut().append_pair("api-version", "2018-02-01").append_pair("resource", resource);
    if let Some(id) = client_id {
        url.query_pairs_mut().append_pair("client_id", id);
    }
    let client = reqwest::Client::builder().no_proxy().timeout(Duration::from_secs(30)).build()?;
    let resp = client
        .get(url)
        .header("Metadata", "true")
        .send()
        .await
        .with_context(|| format!("cannot reach tokend at {addr}; is `tokend serve` running?"))?;
    let status = resp.status();
    let body: serde_json::Value =
        resp.json().await.with_context(|| format!("tokend at {addr} answered HTTP {status} without JSON"))?;
    if !status.is_success() {
        let desc = body.get("error_description").and_then(|v| v.as_str()).unwrap_or("no description");
        anyhow::bail!("tokend answered HTTP {status}: {desc}");
    }
    body.get("access_token")
        .and_then(|v| v.as_str())
        .map(str::to_owned)
        .ok_or_else(|| anyhow::anyhow!("tokend's answer has no access_token"))
}

/// `tokend check`: validates `config` and makes one upstream request per identity, straight to the IdP,
/// printing one line each (and the configuration's warnings). `Ok(false)` when any identity failed.
pub async fn check(config: &Path, resource: Option<&str>) -> Result<bool, Error> {
    let config = Config::load(config)?;
    for w in &config.warnings {
        println!("warn  {w}");
    }
    for identity in &config.identities {
        let root_with_slash = |r: &str| {
            let bare = r.strip_suffix('/')?;
            let (_, rest) = bare.split_once("://")?;
            (!rest.is_empty() && !rest.contains('/')).then(|| bare.to_owned())
        };
        for r in identity.resources.iter().filter_map(|r| root_with_slash(r.as_str())) {
            println!(
                "warn  identity {:?} pins {r}/ with a trailing slash; azure-identity, msal and the Rust SDK ask for {r} \
                 (they strip /.default), a separate cache entry: pin {r} too, or instead",
                identity.name
            );
        }
    }
    let idp = IdpClient::new(&config.upstream).context("cannot set up the HTTPS client")?;
    let mut all_ok = true;
    for identity in &config.identities {
        let resource = match resource {
            Some(r) => Resource::parse(r).with_context(|| format!("--resource {r:?}"))?,
            None => match identity.resources.first() {
                Some(r) => r.clone(),
                None => Resource::parse(CHECK_DEFAULT_RESOURCE).context("the default resource")?,
            },
        };
        let what = format!(
            "identity {:?} (client id {}, {} from {}, {})",
            identity.name,
            identity.client_id,
            identity.credential.kind(),
            identity.credential.origin(),
            identity.token_url
        );
        if let Some(location) = identity.credential.key_location() {
            println!("key   identity {:?}: {location}", identity.name);
        }
        match idp.fetch(identity, &resource).await {
            Ok(t) => println!("ok    {what}: token for {resource} valid for {}s", t.expires_in.as_secs()),
            Err(e) => {
                all_ok = false;
                println!("FAIL  {what}: {resource}: {e}");
            }
        }
        if let Some(skew) = idp.last_clock_skew().filter(|s| s.unsigned_abs() > MAX_CLOCK_SKEW.as_secs()) {
            println!(
                "warn  identity {:?}: the identity provider's clock differs from this host's by {skew}s; \
                 client assertions may be rejected (AADSTS700024): fix time synchronisation",
                identity.name
            );
        }
    }
    Ok(all_ok)
}

/// `tokend transparent-imds setup`: refuses (exit 64) when an IMDS already answers, then aliases
/// 169.254.169.254 on `lo`.
pub async fn transparent_imds_setup() -> Result<(), Error> {
    crate::transparent::setup().await.map_err(alias_error)
}

/// `tokend transparent-imds teardown`: removes the alias (absent is fine).
pub fn transparent_imds_teardown() -> Result<(), Error> {
    crate::transparent::teardown().map_err(alias_error)
}

fn alias_error(e: AliasError) -> Error {
    match e {
        AliasError::ImdsPresent(present) => Error::Usage(present.to_string()),
        other => Error::Runtime(other.into()),
    }
}
