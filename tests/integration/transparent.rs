//! Transparent IMDS end to end, inside network namespaces the tests create: IdP, tokend (listening on
//! 127.0.0.1 and on 169.254.169.254:80 aliased on the namespace's `lo`) and clients with **no**
//! environment variables at all. Needs root and iproute2; where namespaces cannot be created the tests
//! fail saying so.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::*;

static NEXT: AtomicUsize = AtomicUsize::new(0);

/// A network namespace with `lo` up; deleted (after its processes are killed) on drop.
struct Netns {
    name: String,
    children: Vec<Child>,
}

fn ip(args: &[&str]) -> std::process::Output {
    Command::new("ip").args(args).output().expect("cannot run `ip`: install iproute2")
}

impl Netns {
    fn new() -> Self {
        let name = format!("tokend-{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::SeqCst));
        let out = ip(&["netns", "add", &name]);
        assert!(
            out.status.success(),
            "cannot create a network namespace (`ip netns add {name}`): {}; the transparent IMDS tests need root \
             (or CAP_SYS_ADMIN) and iproute2",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        let ns = Self { name, children: Vec::new() };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    fn ip(&self, args: &[&str]) {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        let out = ip(&full);
        assert!(out.status.success(), "ip {}: {}", full.join(" "), String::from_utf8_lossy(&out.stderr));
    }

    fn alias_imds(&self) {
        self.ip(&["addr", "add", "169.254.169.254/32", "dev", "lo"]);
    }

    fn cmd(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }

    fn spawn(&mut self, mut cmd: Command, log: &std::path::Path) {
        let out = std::fs::File::create(log).expect("log");
        let child = cmd.stdout(out.try_clone().expect("dup")).stderr(out).spawn().expect("spawn in netns");
        self.children.push(child);
    }

    /// `curl` inside the namespace; returns (HTTP status, body).
    fn curl(&self, args: &[&str]) -> (u16, String) {
        let out = self
            .cmd("curl")
            .args(["-s", "-o", "-", "-w", "\n%{http_code}"])
            .args(args)
            .output()
            .expect("curl (apt-get install curl)");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
        (code.trim().parse().unwrap_or(0), body.to_owned())
    }

    fn wait_http(&self, url: &str, what: &str, log: &std::path::Path) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.curl(&[url]).0 != 200 {
            assert!(
                Instant::now() < deadline,
                "{what} did not come up in {}:\n{}",
                self.name,
                std::fs::read_to_string(log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = ip(&["netns", "del", &self.name]);
    }
}

fn idp_dir() -> PathBuf {
    std::env::var_os("TOKEND_TEST_IDP_DIR")
        .map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/idp"), PathBuf::from)
}

/// A namespace running the IdP (127.0.0.1:9400) and tokend (127.0.0.1:50342 + 169.254.169.254:80).
fn transparent_broker(dir: &std::path::Path) -> Netns {
    let mut ns = Netns::new();
    ns.alias_imds();
    let idp_log = dir.join("idp.log");
    let mut idp = ns.cmd("node");
    idp.arg("idp.mjs")
        .current_dir(idp_dir())
        .env("IDP_PORT", "9400")
        .env("IDP_TENANT", TENANT)
        .env("TOKEN_TTL", "3600");
    ns.spawn(idp, &idp_log);
    ns.wait_http("http://127.0.0.1:9400/__admin/stats", "the test IdP", &idp_log);

    let mut o = Opts::for_url(&format!("http://127.0.0.1:9400/{TENANT}/oauth2/v2.0/token"));
    o.extra = String::new();
    let config = write_config(dir, 50342, &o);
    let text = std::fs::read_to_string(&config)
        .expect("config")
        .replace("listen = [\"127.0.0.1:50342\"]", "listen = [\"127.0.0.1:50342\", \"169.254.169.254:80\"]");
    std::fs::write(&config, text).expect("config");
    let log = dir.join("tokend.log");
    let mut tokend = ns.cmd(tokend_bin());
    tokend.args(["serve", "--config"]).arg(&config).env("TOKEND_LOG", "info,tokend=debug");
    ns.spawn(tokend, &log);
    ns.wait_http("http://127.0.0.1:50342/healthz", "tokend", &log);
    ns
}

fn ok_token(v: &Value) -> String {
    assert_eq!(v["ok"], true, "client failed: {v}");
    v["token"].as_str().expect("token").to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn clients_with_no_environment_get_tokens_from_169_254_169_254() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ns = transparent_broker(dir.path());
    let name = Some(ns.name.as_str());

    // The README's curl line for transparent mode, verbatim.
    let lines = crate::readme::readme_curl_lines("http://169.254.169.254/");
    assert_eq!(lines.len(), 1, "{lines:?}");
    let out = ns.cmd("bash").args(["-c", &lines[0]]).output().expect("bash");
    let body = String::from_utf8_lossy(&out.stdout);
    let v: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{}: {e}: {body}", lines[0]));
    assert_eq!(jwt_claims(v["access_token"].as_str().expect("token"))["aud"], "https://storage.azure.com/");

    // Python DefaultAzureCredential (with its header-less probe), Python ManagedIdentityCredential and
    // the Rust SDK: no environment variables.
    let (py_default, py_mi, rust, js) = tokio::join!(
        run_client(Client::AzureIdentityPython, name, &["default", "https://vault.azure.net"], &[]),
        run_client(Client::AzureIdentityPython, name, &["mi", "https://storage.azure.com/", "--twice"], &[]),
        run_client(Client::AzureIdentityRust, name, &["mi", "https://management.azure.com"], &[]),
        run_client(Client::AzureIdentityJs, name, &["default", "https://graph.microsoft.com"], &[]),
    );
    assert_eq!(jwt_claims(&ok_token(&py_default))["aud"], "https://vault.azure.net");
    assert_eq!(ok_token(&py_mi), v["access_token"].as_str().expect("token"), "the same cached token as curl got");
    assert_eq!(py_mi["second_equal"], true);
    let rust_token = ok_token(&rust);
    assert_eq!(jwt_claims(&rust_token)["aud"], "https://management.azure.com");
    let (got, exp) =
        (rust["expires_on"].as_u64().expect("expires_on"), jwt_claims(&rust_token)["exp"].as_u64().expect("exp"));
    assert!(got.abs_diff(exp) <= 1, "Rust parsed expires_on from the string: {got} vs exp {exp}");

    assert_eq!(jwt_claims(&ok_token(&js))["aud"], "https://graph.microsoft.com");
    let logs = std::fs::read_to_string(dir.path().join("tokend.log")).expect("log");
    assert!(
        logs.contains("without `Metadata: true`"),
        "DefaultAzureCredential's header-less probe was answered 400 first"
    );
    let (_, stats) = ns.curl(&["http://127.0.0.1:9400/__admin/stats"]);
    let stats: Value = serde_json::from_str(&stats).expect("json");
    assert_eq!(stats["token_requests"], 4, "one upstream call per resource");
}

#[test]
fn refuses_to_shadow_an_imds_that_already_answers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut ns = Netns::new();
    ns.alias_imds();
    // Something already serves HTTP at 169.254.169.254:80 (like a cloud VM's metadata service).
    let mut other = ns.cmd("python3");
    other.args(["-m", "http.server", "--bind", "169.254.169.254", "80"]).current_dir(dir.path());
    let other_log = dir.path().join("other.log");
    ns.spawn(other, &other_log);
    let deadline = Instant::now() + Duration::from_secs(10);
    while ns.curl(&["http://169.254.169.254/"]).0 == 0 {
        assert!(Instant::now() < deadline, "the stand-in IMDS did not start");
        std::thread::sleep(Duration::from_millis(100));
    }

    let mut o = Opts::for_url("http://127.0.0.1:9/t/oauth2/v2.0/token");
    o.extra = String::new();
    let config = write_config(dir.path(), 50342, &o);
    let text = std::fs::read_to_string(&config)
        .expect("config")
        .replace("\"127.0.0.1:50342\"", "\"127.0.0.1:50342\", \"169.254.169.254:80\"");
    std::fs::write(&config, text).expect("config");
    let out = ns.cmd(tokend_bin()).args(["serve", "--config"]).arg(&config).stdin(Stdio::null()).output().expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(stderr.contains("already answers as IMDS at 169.254.169.254:80"), "{stderr}");
    assert_eq!(ns.curl(&["http://127.0.0.1:50342/healthz"]).0, 0, "nothing was bound");

    let out = ns.cmd(tokend_bin()).args(["transparent-imds", "setup"]).output().expect("run");
    assert_eq!(out.status.code(), Some(64), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn setup_and_teardown_manage_the_alias() {
    let ns = Netns::new();
    let has_alias = || {
        let out = ns.cmd("ip").args(["-4", "addr", "show", "dev", "lo"]).output().expect("ip");
        String::from_utf8_lossy(&out.stdout).contains("169.254.169.254/32")
    };
    assert!(!has_alias());
    let out = ns.cmd(tokend_bin()).args(["transparent-imds", "setup"]).output().expect("run");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(has_alias());
    let out = ns.cmd(tokend_bin()).args(["transparent-imds", "setup"]).output().expect("run");
    assert!(out.status.success(), "idempotent: {}", String::from_utf8_lossy(&out.stderr));
    let out = ns.cmd(tokend_bin()).args(["transparent-imds", "teardown"]).output().expect("run");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!has_alias());
    // Without the alias, serving there fails with a hint.
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(dir.path(), 50342, &Opts::for_url("http://127.0.0.1:9/t/oauth2/v2.0/token"));
    let text =
        std::fs::read_to_string(&config).expect("config").replace("\"127.0.0.1:50342\"", "\"169.254.169.254:80\"");
    std::fs::write(&config, text).expect("config");
    let out = ns.cmd(tokend_bin()).args(["serve", "--config"]).arg(&config).output().expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("tokend transparent-imds setup"), "{stderr}");
}

/// A caller in another network namespace is *unknown* to tokend (the kernel answers `sock_diag` only
/// for tokend's own namespace) and gets `access.unknown`; it is never taken for root.
#[tokio::test(flavor = "multi_thread")]
async fn a_caller_from_another_network_namespace_is_unknown_and_denied() {
    let idp = Idp::start(3600).await;
    let ns = Netns::new();
    // A veth pair between this (the host's) namespace and the client's: a private /30 of our own.
    let n = NEXT.fetch_add(1, Ordering::SeqCst) % 200 + 20;
    let (host_if, ns_if) =
        (format!("tkd{}{n}h", std::process::id() % 10_000), format!("tkd{}{n}c", std::process::id() % 10_000));
    let (host_ip, ns_ip) = (format!("10.254.{n}.1"), format!("10.254.{n}.2"));
    let run = |args: &[&str]| {
        let out = ip(args);
        assert!(out.status.success(), "ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
    };
    run(&["link", "add", &host_if, "type", "veth", "peer", "name", &ns_if]);
    run(&["link", "set", &ns_if, "netns", &ns.name]);
    run(&["addr", "add", &format!("{host_ip}/30"), "dev", &host_if]);
    run(&["link", "set", &host_if, "up"]);
    ns.ip(&["addr", "add", &format!("{ns_ip}/30"), "dev", &ns_if]);
    ns.ip(&["link", "set", &ns_if, "up"]);

    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let mut o = Opts::new(&idp);
    o.extra = "[access]\nunknown = \"deny\"\n".into();
    let config = write_config(dir.path(), port, &o);
    let text = std::fs::read_to_string(&config).expect("read").replace(
        &format!("listen = [\"127.0.0.1:{port}\"]"),
        &format!("listen = [\"127.0.0.1:{port}\", \"{host_ip}:{port}\"]\nallow_non_loopback = true"),
    );
    std::fs::write(&config, text).expect("write");
    let t = Tokend::spawn(dir, config, port, &[]).await;

    let url = format!(
        "http://{host_ip}:{port}/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https://storage.azure.com"
    );
    let (status, body) = ns.curl(&["-H", "Metadata: true", &url]);
    assert_eq!(status, 403, "{body}\n{}", t.logs());
    assert!(body.contains("could not be identified"), "{body}");
    assert!(t.logs().contains("caller=unknown (NotFound)"), "{}", t.logs());
    assert_eq!(
        t.imds("api-version=2018-02-01&resource=https://storage.azure.com").await.status(),
        200,
        "a local caller is served"
    );
    let _ = ip(&["link", "del", &host_if]);
}
