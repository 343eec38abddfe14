//! Test harness: the real test IdP (tests/idp, Node.js + oidc-provider), the real `tokend` binary and
//! real Azure SDK clients (tests/clients, Python venv). Every process is killed on drop. A missing tool
//! fails the test with what to install; nothing is skipped.

#![allow(dead_code)]

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use serde_json::Value;

pub const TENANT: &str = "test-tenant";
pub const CLIENT_ID: &str = "broker-secret";
pub const SECRET: &str = "Sup3r~Secret.Value_1";
pub const CLIENT_ID_2: &str = "broker-secret-2";
pub const SECRET_2: &str = "Second~Secret.Value_2";

/// The repository's root.
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A free loopback port (bound and released; good enough for tests).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free port")
}

/// A reqwest client that never uses a proxy.
pub fn http() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().timeout(Duration::from_secs(60)).build().expect("client")
}

/// The test IdP on a free port.
pub struct Idp {
    child: Child,
    pub port: u16,
    pub log: PathBuf,
    /// The private CA's certificate when the IdP serves HTTPS.
    pub ca: Option<PathBuf>,
    /// Where the test reaches its admin endpoints (127.0.0.1 unless it runs in a network namespace).
    admin_host: String,
    _dir: tempfile::TempDir,
}

/// Generates a private CA and a server certificate for 127.0.0.1/localhost in `dir` with openssl;
/// returns (ca.crt, tls.crt, tls.key).
pub fn make_tls(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let run = |args: &str| {
        let out = Command::new("sh").arg("-c").arg(args).current_dir(dir).output().expect("sh");
        assert!(
            out.status.success(),
            "{args}: {} (openssl is required: apt-get install openssl)",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run("openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days 2 -subj /CN=tokend-test-ca \
         -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign 2>/dev/null");
    run("openssl req -newkey rsa:2048 -nodes -keyout tls.key -out tls.csr -subj /CN=127.0.0.1 2>/dev/null");
    std::fs::write(
        dir.join("san.cnf"),
        "[ext]\nsubjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n",
    )
    .expect("san");
    run(
        "openssl x509 -req -in tls.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out tls.crt -days 2 -extfile san.cnf -extensions ext 2>/dev/null",
    );
    (dir.join("ca.crt"), dir.join("tls.crt"), dir.join("tls.key"))
}

impl Idp {
    pub async fn start(ttl_secs: u64) -> Self {
        Self::start_on(free_port(), ttl_secs).await
    }

    pub async fn start_on(port: u16, ttl_secs: u64) -> Self {
        Self::launch(port, ttl_secs, false, None).await
    }

    /// An IdP inside network namespace `netns` (listening on all its addresses, so that its loopback
    /// serves tokend there and `admin_host`, an address of the namespace reachable from here, serves
    /// the test's admin requests).
    pub async fn start_in_netns(netns: &str, admin_host: &str, ttl_secs: u64) -> Self {
        Self::launch_in(free_port(), ttl_secs, false, None, Some((netns, admin_host))).await
    }

    /// An IdP that also registers the certificate clients `broker-cert` and `broker-fed` with `cert`.
    pub async fn start_with_cert(ttl_secs: u64, cert: &Path) -> Self {
        Self::launch(free_port(), ttl_secs, false, Some(cert)).await
    }

    /// An HTTPS IdP whose certificate is signed by a fresh private CA (`self.ca`).
    pub async fn start_tls(ttl_secs: u64) -> Self {
        Self::launch(free_port(), ttl_secs, true, None).await
    }

    fn scheme(&self) -> &'static str {
        if self.ca.is_some() { "https" } else { "http" }
    }

    fn client(&self) -> reqwest::Client {
        let mut b = reqwest::Client::builder().no_proxy().timeout(Duration::from_secs(60));
        if let Some(ca) = &self.ca {
            let pem = std::fs::read(ca).expect("ca");
            b = b.tls_certs_only(reqwest::Certificate::from_pem_bundle(&pem).expect("pem"));
        }
        b.build().expect("client")
    }

    async fn launch(port: u16, ttl_secs: u64, tls: bool, client_cert: Option<&Path>) -> Self {
        Self::launch_in(port, ttl_secs, tls, client_cert, None).await
    }

    async fn launch_in(
        port: u16,
        ttl_secs: u64,
        tls: bool,
        client_cert: Option<&Path>,
        netns: Option<(&str, &str)>,
    ) -> Self {
        let dir = std::env::var_os("TOKEND_TEST_IDP_DIR").map_or_else(|| repo().join("tests/idp"), PathBuf::from);
        assert!(
            dir.join("node_modules/oidc-provider").is_dir(),
            "the test IdP's npm packages are missing in {}: run ./scripts/test.sh (or `npm ci --prefix tests/idp`); Node.js and npm are required",
            dir.display()
        );
        let tmp = tempfile::tempdir().expect("tempdir");
        let log = tmp.path().join("idp.log");
        let out = std::fs::File::create(&log).expect("log file");
        let mut cmd = match netns {
            Some((ns, _)) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "node"]).env("IDP_HOST", "0.0.0.0");
                c
            }
            None => Command::new("node"),
        };
        cmd.arg("idp.mjs")
            .current_dir(&dir)
            .env("IDP_PORT", port.to_string())
            .env("TOKEN_TTL", ttl_secs.to_string())
            .env("IDP_TENANT", TENANT)
            .stdout(out.try_clone().expect("dup"))
            .stderr(out);
        if let Some(cert) = client_cert {
            cmd.env("CLIENT_CERT", cert);
        }
        let ca = tls.then(|| {
            let (ca, cert, key) = make_tls(tmp.path());
            cmd.env("IDP_TLS_CERT", cert).env("IDP_TLS_KEY", key);
            ca
        });
        let child = cmd.spawn().expect("cannot run `node`: install Node.js (apt-get install nodejs npm)");
        let admin_host = netns.map_or_else(|| "127.0.0.1".to_owned(), |(_, host)| host.to_owned());
        let idp = Self { child, port, log, ca, admin_host, _dir: tmp };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if idp.client().get(idp.admin("stats")).send().await.is_ok_and(|r| r.status().is_success()) {
                return idp;
            }
            assert!(
                Instant::now() < deadline,
                "the test IdP did not start; its log:\n{}",
                std::fs::read_to_string(&idp.log).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn token_url(&self) -> String {
        format!("{}://127.0.0.1:{}/{TENANT}/oauth2/v2.0/token", self.scheme(), self.port)
    }

    fn admin(&self, what: &str) -> String {
        format!("{}://{}:{}/__admin/{what}", self.scheme(), self.admin_host, self.port)
    }

    /// Queues faults for token requests: `{"status":503,"count":2,"headers":{..}}`, `{"delay_ms":..}`, `{"drop":true}`.
    pub async fn fault(&self, fault: Value) {
        let r = self.client().post(self.admin("fault")).json(&fault).send().await.expect("fault");
        assert!(r.status().is_success());
    }

    pub async fn reset(&self) {
        self.client().post(self.admin("reset")).send().await.expect("reset");
    }

    /// Token requests seen since start (or the last reset), faulted ones included.
    pub async fn token_requests(&self) -> u64 {
        let v: Value = self.client().get(self.admin("stats")).send().await.expect("stats").json().await.expect("json");
        v["token_requests"].as_u64().expect("count")
    }

    /// Every request the IdP logged: `{t, method, path, headers, body}`.
    pub async fn requests(&self) -> Vec<Value> {
        self.client().get(self.admin("requests")).send().await.expect("requests").json().await.expect("json")
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Idp {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Options for a broker configuration.
#[derive(Clone)]
pub struct Opts {
    pub token_url: String,
    pub client_id: String,
    pub secret: String,
    pub resources: Vec<String>,
    pub min_lifetime: String,
    pub max_wait: String,
    /// Extra `[tokens]` keys, verbatim.
    pub tokens_extra: String,
    /// Extra TOML appended verbatim (e.g. another [[identity]]).
    pub extra: String,
}

impl Opts {
    pub fn new(idp: &Idp) -> Self {
        Self::for_url(&idp.token_url())
    }

    pub fn for_url(token_url: &str) -> Self {
        Self {
            token_url: token_url.to_owned(),
            client_id: CLIENT_ID.into(),
            secret: SECRET.into(),
            resources: vec![],
            min_lifetime: "5s".into(),
            max_wait: "4s".into(),
            tokens_extra: String::new(),
            extra: String::new(),
        }
    }

    /// Adds a second identity, `second` (`CLIENT_ID_2`), with its secret in a file under `dir`.
    pub fn with_second_identity(mut self, idp: &Idp, dir: &Path) -> Self {
        let secret = dir.join("second-secret");
        std::fs::write(&secret, SECRET_2).expect("write");
        self.extra.push_str(&format!(
            "[[identity]]\nname = \"second\"\nclient_id = \"{CLIENT_ID_2}\"\ntoken_url = \"{}\"\nclient_secret_file = {:?}\n",
            idp.token_url(),
            secret.display().to_string()
        ));
        self
    }

    pub fn resources(mut self, r: &[&str]) -> Self {
        self.resources = r.iter().map(|s| (*s).to_owned()).collect();
        self
    }
}

/// A running `tokend serve`.
pub struct Tokend {
    child: Option<Child>,
    pub addr: SocketAddr,
    pub dir: tempfile::TempDir,
    pub log: PathBuf,
    pub config: PathBuf,
}

pub fn tokend_bin() -> &'static str {
    env!("CARGO_BIN_EXE_tokend")
}

/// Writes a config (and its secret files) into `dir` and returns its path.
pub fn write_config(dir: &Path, port: u16, o: &Opts) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let secret = dir.join("client-secret");
    std::fs::write(&secret, &o.secret).expect("secret");
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let resources: Vec<String> = o.resources.iter().map(|r| format!("{r:?}")).collect();
    let text = format!(
        r#"[server]
listen = ["127.0.0.1:{port}"]
identity_header_file = "identity-header"

[tokens]
min_lifetime = "{min}"
max_wait = "{wait}"
{tokens_extra}
[[identity]]
name = "default"
client_id = "{cid}"
token_url = "{url}"
client_secret_file = "client-secret"
resources = [{res}]
{extra}
"#,
        min = o.min_lifetime,
        wait = o.max_wait,
        tokens_extra = o.tokens_extra,
        cid = o.client_id,
        url = o.token_url,
        res = resources.join(", "),
        extra = o.extra,
    );
    let path = dir.join("tokend.toml");
    std::fs::write(&path, text).expect("config");
    path
}

impl Tokend {
    pub async fn start(o: &Opts) -> Self {
        Self::start_with_env(o, &[]).await
    }

    pub async fn start_with_env(o: &Opts, env: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let config = write_config(dir.path(), port, o);
        Self::spawn(dir, config, port, env).await
    }

    pub async fn spawn(dir: tempfile::TempDir, config: PathBuf, port: u16, env: &[(&str, &str)]) -> Self {
        let log = dir.path().join("tokend.log");
        let out = std::fs::File::create(&log).expect("log");
        let mut cmd = Command::new(tokend_bin());
        cmd.args(["serve", "--config"]).arg(&config).stdout(out.try_clone().expect("dup")).stderr(out);
        cmd.env("TOKEND_LOG", "info,tokend=debug");
        for var in
            ["HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY", "https_proxy", "http_proxy", "all_proxy", "NO_PROXY", "no_proxy"]
        {
            cmd.env_remove(var);
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("spawn tokend");
        let t = Self { child: Some(child), addr: SocketAddr::from(([127, 0, 0, 1], port)), dir, log, config };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if http().get(t.url("/healthz")).send().await.is_ok_and(|r| r.status().is_success()) {
                return t;
            }
            assert!(Instant::now() < deadline, "tokend did not come up; its log:\n{}", t.logs());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn url(&self, path_and_query: &str) -> String {
        format!("http://{}{path_and_query}", self.addr)
    }

    pub fn imds_url(&self, resource: &str) -> String {
        self.url(&format!("/metadata/identity/oauth2/token?api-version=2018-02-01&resource={resource}"))
    }

    /// An IMDS request with `Metadata: true`.
    pub async fn imds(&self, query: &str) -> reqwest::Response {
        http()
            .get(self.url(&format!("/metadata/identity/oauth2/token?{query}")))
            .header("Metadata", "true")
            .send()
            .await
            .expect("request")
    }

    /// An App Service request with the right identity header.
    pub async fn app_service(&self, query: &str) -> reqwest::Response {
        http()
            .get(self.url(&format!("/msi/token?{query}")))
            .header("X-IDENTITY-HEADER", self.identity_header())
            .header("Metadata", "true")
            .send()
            .await
            .expect("request")
    }

    pub fn identity_header(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("identity-header")).expect("identity header").trim().to_owned()
    }

    pub async fn wait_ready(&self, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let r = http().get(self.url("/readyz")).send().await.expect("readyz");
            if r.status() == 200 {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "not ready within {within:?}: {}\n{}",
                r.text().await.unwrap_or_default(),
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
        child.wait().expect("wait")
    }
}

impl Drop for Tokend {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A real Azure SDK client program, each with the same contract: `MODE RESOURCE [--client-id ID] [--twice]`
/// in, one JSON line out (see tests/clients/get_token.py).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Client {
    /// Python azure-identity (tests/clients/get_token.py).
    AzureIdentityPython,
    /// msal-python's ManagedIdentityClient (tests/clients/msal_token.py).
    MsalPython,
    /// msrestazure's MSIAuthentication, Azure ML's v1 SDK (tests/clients/msrest_token.py).
    MsrestazurePython,
    /// The Rust SDK, azure_identity 1.0 (tests/clients/rust, its own crate).
    AzureIdentityRust,
    /// JavaScript @azure/identity (tests/clients/js/get_token.mjs).
    AzureIdentityJs,
}

fn client_program(client: Client) -> (PathBuf, Vec<PathBuf>) {
    let python = || {
        let p =
            std::env::var_os("TOKEND_TEST_PYTHON").map_or_else(|| repo().join(".venv-test/bin/python"), PathBuf::from);
        assert!(
            p.exists(),
            "no Python venv with azure-identity at {}: run ./scripts/test.sh (it creates .venv-test from tests/clients/requirements.lock)",
            p.display()
        );
        p
    };
    match client {
        Client::AzureIdentityPython => (python(), vec![repo().join("tests/clients/get_token.py")]),
        Client::MsalPython => (python(), vec![repo().join("tests/clients/msal_token.py")]),
        Client::MsrestazurePython => (python(), vec![repo().join("tests/clients/msrest_token.py")]),
        Client::AzureIdentityRust => {
            let bin = std::env::var_os("TOKEND_TEST_RUST_SDK")
                .map_or_else(|| repo().join("target/rust-sdk-client/debug/rust_sdk_token"), PathBuf::from);
            assert!(
                bin.exists(),
                "the Rust SDK client {} is missing: run ./scripts/test.sh (or `cargo build --locked --manifest-path tests/clients/rust/Cargo.toml --target-dir target/rust-sdk-client`)",
                bin.display()
            );
            (bin, vec![])
        }
        Client::AzureIdentityJs => {
            let dir =
                std::env::var_os("TOKEND_TEST_JS_DIR").map_or_else(|| repo().join("tests/clients/js"), PathBuf::from);
            assert!(
                dir.join("node_modules/@azure/identity").is_dir(),
                "the JavaScript client's npm packages are missing in {}: run ./scripts/test.sh (or `npm ci --prefix tests/clients/js`)",
                dir.display()
            );
            (PathBuf::from("node"), vec![dir.join("get_token.mjs")])
        }
    }
}

/// Runs a real azure-identity (Python) client; see [`run_client`].
pub async fn python_client(args: &[&str], env: &[(&str, String)]) -> Value {
    run_client(Client::AzureIdentityPython, None, args, env).await
}

/// Runs `client` in a fresh process with a clean environment plus `env` (inside network namespace
/// `netns` when given). Returns its one JSON line.
pub async fn run_client(client: Client, netns: Option<&str>, args: &[&str], env: &[(&str, String)]) -> Value {
    let (program, pre_args) = client_program(client);
    let home = tempfile::tempdir().expect("home");
    let mut cmd = match netns {
        Some(ns) => {
            let mut c = tokio::process::Command::new("ip");
            c.args(["netns", "exec", ns]).arg(&program);
            c
        }
        None => tokio::process::Command::new(&program),
    };
    cmd.args(&pre_args)
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HOME", home.path())
        .env("NO_PROXY", "127.0.0.1,localhost")
        .kill_on_drop(true);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = tokio::time::timeout(Duration::from_secs(90), cmd.output())
        .await
        .unwrap_or_else(|_| panic!("{client:?} timed out"))
        .unwrap_or_else(|e| panic!("cannot run {client:?} ({}): {e}", program.display()));
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.lines().last().unwrap_or("")).unwrap_or_else(|e| {
        panic!("{client:?} printed no JSON ({e}); stdout:\n{stdout}\nstderr:\n{}", String::from_utf8_lossy(&out.stderr))
    })
}

/// Decodes a JWT's claims (no verification: the IdP's signature is its business).
pub fn jwt_claims(token: &str) -> Value {
    use base64::Engine;
    let part = token.split('.').nth(1).expect("a JWT");
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(part).expect("base64url");
    serde_json::from_slice(&bytes).expect("claims")
}
