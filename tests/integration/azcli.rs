//! The real Azure CLI (azure-cli 2.91 from PyPI, `.venv-azcli`) against the real tokend:
//! `az login --identity [--client-id ID]` then `az account get-access-token`, on both routes.
//!
//! After its token, `az login` lists subscriptions at the resource manager. That is
//! tests/clients/azcli/arm_stub.py (HTTPS, private CA), registered as the resource manager of a custom
//! cloud inside each run's own AZURE_CONFIG_DIR by tests/clients/azcli/az_token.sh, so nothing leaves
//! the host.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::support::*;

const ARM: &str = "https://management.azure.com/";

/// The az executable: `$TOKEND_TEST_AZ`, else the one scripts/test.sh installs.
fn az_exe() -> PathBuf {
    let p = std::env::var_os("TOKEND_TEST_AZ").map_or_else(|| repo().join(".venv-azcli/bin/az"), PathBuf::from);
    assert!(
        p.exists(),
        "no Azure CLI at {} (TOKEND_TEST_AZ): run ./scripts/test.sh (it creates .venv-azcli from tests/clients/azcli/requirements.lock)",
        p.display()
    );
    p
}

/// tests/clients/azcli/arm_stub.py on a free port; killed on drop.
struct ArmStub {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl ArmStub {
    fn start(dir: &Path, cert: &Path, key: &Path) -> Self {
        let port = free_port();
        let log = dir.join("arm_stub.log");
        let mut child = Command::new("python3")
            .arg(repo().join("tests/clients/azcli/arm_stub.py"))
            .arg("--port")
            .arg(port.to_string())
            .arg("--cert")
            .arg(cert)
            .arg("--key")
            .arg(key)
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("cannot run `python3`: install it (apt-get install python3)");
        let stdout = child.stdout.take().expect("stdout");
        let stub = Self { child, port, log };
        // The blocking read ends at the latest when the child dies (on drop, if it never says ready).
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx.recv_timeout(Duration::from_secs(20)).unwrap_or_default();
        assert_eq!(line.trim(), "ready", "arm_stub.py did not start; its log:\n{}", stub.logs());
        stub
    }

    fn url(&self) -> String {
        format!("https://127.0.0.1:{}/", self.port)
    }

    fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for ArmStub {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs tests/clients/azcli/az_token.sh (`MODE RESOURCE [--client-id ID]`) in a clean environment with
/// its own HOME and AZURE_CONFIG_DIR, plus `env`. Returns its one JSON line.
async fn az_token(az: &Path, arm: &ArmStub, ca: &Path, args: &[&str], env: &[(&str, String)]) -> Value {
    let home = tempfile::tempdir().expect("home");
    let config = tempfile::tempdir().expect("AZURE_CONFIG_DIR");
    let mut cmd = tokio::process::Command::new("bash");
    cmd.arg(repo().join("tests/clients/azcli/az_token.sh"))
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HOME", home.path())
        .env("AZURE_CONFIG_DIR", config.path())
        .env("REQUESTS_CA_BUNDLE", ca)
        .env("NO_PROXY", "127.0.0.1,localhost")
        .env("TOKEND_AZ", az)
        .env("ARM_URL", arm.url())
        .kill_on_drop(true);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = tokio::time::timeout(Duration::from_secs(120), cmd.output())
        .await
        .unwrap_or_else(|_| panic!("az_token.sh {args:?} timed out"))
        .expect("cannot run bash");
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.lines().last().unwrap_or("")).unwrap_or_else(|e| {
        panic!(
            "az_token.sh {args:?} printed no JSON ({e}); stdout:\n{stdout}\nstderr:\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

fn ok_token(v: &Value, what: &str, arm: &ArmStub) -> String {
    assert_eq!(v["ok"], true, "{what}: az failed: {v}\narm_stub.py log:\n{}", arm.logs());
    v["token"].as_str().expect("token").to_owned()
}

async fn broker_token(t: &Tokend, resource: &str, extra: &str) -> String {
    let v: Value =
        t.imds(&format!("api-version=2018-02-01&resource={resource}{extra}")).await.json().await.expect("json");
    v["access_token"].as_str().unwrap_or_else(|| panic!("no token: {v}")).to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn azure_cli_login_identity_on_both_routes() {
    let az = az_exe();
    let idp = Idp::start(3600).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let o = Opts::new(&idp).with_second_identity(&idp, dir.path());
    let t = Tokend::start(&o).await;
    let (ca, cert, key) = make_tls(dir.path());
    let arm = ArmStub::start(dir.path(), &cert, &key);

    let imds_env = vec![("AZURE_POD_IDENTITY_AUTHORITY_HOST", t.url(""))];
    let app_env = vec![("IDENTITY_ENDPOINT", t.url("/msi/token")), ("IDENTITY_HEADER", t.identity_header())];
    let (imds, app, user_assigned) = tokio::join!(
        az_token(&az, &arm, &ca, &["mi", ARM], &imds_env),
        az_token(&az, &arm, &ca, &["mi", ARM], &app_env),
        az_token(&az, &arm, &ca, &["mi-client-id", ARM, "--client-id", CLIENT_ID_2], &app_env),
    );

    let system = broker_token(&t, ARM, "").await;
    let token = ok_token(&imds, "IMDS route", &arm);
    assert_eq!(jwt_claims(&token)["aud"], ARM);
    assert_eq!(token, system, "IMDS route: tokend's cached token");
    // az computes expires_on from what tokend sent (within a second of the JWT's exp).
    let (got, exp) =
        (imds["expires_on"].as_u64().expect("expires_on"), jwt_claims(&token)["exp"].as_u64().expect("exp"));
    assert!(got.abs_diff(exp) <= 2, "expires_on {got} vs exp {exp}");

    let token = ok_token(&app, "App Service route", &arm);
    assert_eq!(jwt_claims(&token)["aud"], ARM);
    assert_eq!(token, system, "App Service route: tokend's cached token");

    let token = ok_token(&user_assigned, "App Service route, --client-id", &arm);
    let claims = jwt_claims(&token);
    assert_eq!(claims["aud"], ARM);
    assert_eq!(claims["client_id"], CLIENT_ID_2, "--client-id selects the second identity");
    assert_eq!(token, broker_token(&t, ARM, &format!("&client_id={CLIENT_ID_2}")).await, "tokend's cached token");
    assert_eq!(jwt_claims(&system)["client_id"], CLIENT_ID);

    // Each `az login` listed subscriptions at the stub, not at management.azure.com.
    let log = arm.logs();
    assert_eq!(log.matches("\"GET /subscriptions?").count(), 3, "arm_stub.py log:\n{log}");
    // Per identity: the login's token (the cloud's active-directory resource) and the asked one.
    assert_eq!(idp.token_requests().await, 4, "one upstream call per (identity, resource)");
}
