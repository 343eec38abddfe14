//! The command line: `env`, `token`, `check`, `dev`, config errors (exit 64 before binding) and SIGTERM.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::support::*;

fn tokend(args: &[&str]) -> std::process::Output {
    Command::new(tokend_bin()).args(args).env_remove("HTTPS_PROXY").output().expect("run tokend")
}

#[tokio::test(flavor = "multi_thread")]
async fn env_token_and_check() {
    let idp = Idp::start(3600).await;
    let t = Tokend::start(&Opts::new(&idp)).await;
    let config = t.config.to_str().expect("utf8");

    let out = tokend(&["env", "--config", config]);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).expect("utf8");
    assert!(text.contains(&format!("export IDENTITY_ENDPOINT='http://{}/msi/token'", t.addr)), "{text}");
    assert!(text.contains(&format!("export IDENTITY_HEADER='{}'", t.identity_header())), "{text}");
    assert!(text.contains(&format!("export AZURE_POD_IDENTITY_AUTHORITY_HOST='http://{}'", t.addr)), "{text}");
    // MSI_* are unset, never exported; IMDS_ENDPOINT (the Arc flow) is never mentioned.
    assert!(text.starts_with("unset MSI_ENDPOINT MSI_SECRET\n"), "{text}");
    for never in ["export MSI_ENDPOINT", "export MSI_SECRET", "IMDS_ENDPOINT"] {
        assert!(!text.contains(never), "{text}");
    }
    // Ready for eval: the exported pair reaches a real request.
    let script = format!(
        "eval \"$({} env --config {config})\" && curl -sf -H \"X-IDENTITY-HEADER: $IDENTITY_HEADER\" \"$IDENTITY_ENDPOINT?api-version=2019-08-01&resource=https://storage.azure.com\"",
        tokend_bin()
    );
    let out = Command::new("bash")
        .args(["-c", &script])
        .env("NO_PROXY", "127.0.0.1")
        .output()
        .expect("bash + curl (apt-get install curl)");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).expect("json");

    let out = tokend(&["token", "--config", config, "--resource", "https://storage.azure.com"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(
        String::from_utf8(out.stdout).expect("utf8").trim(),
        v["access_token"].as_str().expect("token"),
        "prints only the token"
    );
    let out =
        tokend(&["token", "--config", config, "--resource", "https://storage.azure.com", "--client-id", "nobody"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no configured identity has client_id"));

    let out = tokend(&["check", "--config", config]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.starts_with("ok") && text.contains("\"default\"") && text.contains("client secret"), "{text}");

    // A wrong secret: check says what failed and exits non-zero.
    std::fs::write(t.dir.path().join("client-secret"), "wrong").expect("write");
    let out = tokend(&["check", "--config", config]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.starts_with("FAIL") && text.contains("invalid_client"), "{text}");
    assert!(!text.contains("wrong"), "{text}");
}

#[test]
fn config_errors_exit_64_before_binding_and_name_file_and_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let base = write_config(dir.path(), port, &Opts::for_url("http://127.0.0.1:9/t/oauth2/v2.0/token"));
    let good = std::fs::read_to_string(&base).expect("read");
    let cases = [
        (good.replace("[tokens]", "[tokens]\nmin_lifetim = \"5m\""), "min_lifetim"),
        (good.replace("127.0.0.1:", "0.0.0.0:"), "allow_non_loopback"),
        (good.replace("client-secret\"", "missing-secret\""), "identity[0].client_secret_file"),
        (good.replace("min_lifetime = \"5s\"", "min_lifetime = \"soon\""), "tokens.min_lifetime"),
        (good.replace("http://127.0.0.1:9", "http://idp.example"), "identity[0].token_url"),
        (good.replace("listen = [", "listen = 5\nx = ["), "listen"),
    ];
    for (text, key) in cases {
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, &text).expect("write");
        let mut child = Command::new(tokend_bin())
            .args(["serve", "--config"])
            .arg(&path)
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn");
        let status = child.wait().expect("wait");
        let mut stderr = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().expect("stderr"), &mut stderr).expect("read");
        assert_eq!(status.code(), Some(64), "{key}: {stderr}");
        assert!(stderr.contains(key) && stderr.contains("bad.toml"), "{key}: {stderr}");
        assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err(), "{key}: nothing was bound");
    }
    // `tokend env` only reads the identity header that `tokend serve` creates.
    let out = tokend(&["env", "--config", base.to_str().expect("utf8")]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("does not exist yet"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = tokend(&["check", "--config", "/nonexistent/tokend.toml"]);
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/tokend.toml"));
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_stops_cleanly() {
    let idp = Idp::start(3600).await;
    let mut t = Tokend::start(&Opts::new(&idp).resources(&["https://storage.azure.com"])).await;
    t.wait_ready(Duration::from_secs(10)).await;
    let started = std::time::Instant::now();
    let status = t.terminate();
    assert!(status.success(), "{status:?}\n{}", t.logs());
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(t.logs().contains("tokend stopped"));
}

#[tokio::test(flavor = "multi_thread")]
async fn dev_mode_prints_exports_and_serves_real_clients() {
    let mut child = Command::new(tokend_bin())
        .args(["dev", "--listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut lines = Vec::new();
    while let Ok(line) = rx.recv_timeout(Duration::from_secs(20)) {
        let done = line.starts_with("# curl");
        lines.push(line);
        if done {
            break;
        }
    }
    let export = |name: &str| {
        lines
            .iter()
            .find_map(|l| l.strip_prefix(&format!("export {name}='")))
            .map(|v| v.trim_end_matches('\'').to_owned())
            .unwrap_or_else(|| panic!("no export {name} in {lines:?}"))
    };
    let (endpoint, header, authority) =
        (export("IDENTITY_ENDPOINT"), export("IDENTITY_HEADER"), export("AZURE_POD_IDENTITY_AUTHORITY_HOST"));
    let header_again = header.clone();
    // One line says how to get the Azure ML variables, with the same endpoint and secret.
    let azureml =
        lines.iter().find(|l| l.starts_with("# Code written for Azure ML compute")).expect("the Azure ML line");
    assert!(
        azureml.contains(&format!("export MSI_ENDPOINT='{endpoint}'"))
            && azureml.contains(&format!("export MSI_SECRET='{header}'"))
            && azureml.contains("unset IDENTITY_ENDPOINT IDENTITY_HEADER"),
        "{azureml}"
    );
    // The printed curl line, run as printed.
    let curl = lines
        .iter()
        .find_map(|l| l.strip_prefix("# ").filter(|l| l.starts_with("curl")))
        .expect("curl line")
        .to_owned();
    let out = Command::new("bash").args(["-c", &curl]).env("NO_PROXY", "127.0.0.1").output().expect("bash + curl");
    let v: Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)));
    let claims = jwt_claims(v["access_token"].as_str().expect("token"));
    assert_eq!(claims["aud"], "https://management.azure.com");
    for claim in ["exp", "iat", "tid", "appid"] {
        assert!(!claims[claim].is_null(), "{claim} in {claims}");
    }
    // A real SDK client with the printed variables.
    let r = python_client(
        &["mi", "https://storage.azure.com"],
        &[("IDENTITY_ENDPOINT", endpoint), ("IDENTITY_HEADER", header)],
    )
    .await;
    assert_eq!(r["ok"], true, "{r}");
    let r = python_client(
        &["mi", "https://storage.azure.com"],
        &[("AZURE_POD_IDENTITY_AUTHORITY_HOST", authority.clone())],
    )
    .await;
    assert_eq!(r["ok"], true, "{r}");
    // The printed client configuration works for env, token and check.
    let client_config = lines
        .iter()
        .find_map(|l| l.strip_prefix("# For tokend env / token / check against this broker: --config "))
        .expect("the client configuration line")
        .to_owned();
    let out = tokend(&["env", "--config", &client_config]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&format!("export IDENTITY_HEADER='{header_again}'")),
        "{out:?}"
    );
    let out = tokend(&["token", "--config", &client_config, "--resource", "https://vault.azure.net"]);
    assert!(out.status.success() && out.stdout.starts_with(b"eyJ"), "{out:?}");
    let out = tokend(&["check", "--config", &client_config]);
    assert!(out.status.success(), "{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    // Like Entra, the dev issuer does not know a misspelt resource: the caller sees invalid_resource.
    let typo = http()
        .get(format!(
            "{authority}/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https://managment.azure.com/"
        ))
        .header("Metadata", "true")
        .send()
        .await
        .expect("request");
    assert_eq!(typo.status(), 400);
    let body: Value = typo.json().await.expect("json");
    assert_eq!(body["error"], "invalid_resource", "{body}");
    let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
    let status = child.wait().expect("wait");
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().expect("stderr"), &mut stderr).expect("read");
    assert!(status.success(), "{stderr}");
    assert!(stderr.contains("DEVELOPMENT ONLY"), "{stderr}");
    assert!(!std::path::Path::new(&client_config).exists(), "removed when tokend dev stops");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restart_is_ready_again_as_fast_as_the_idp_answers() {
    let idp = Idp::start(3600).await;
    let resources = ["https://storage.azure.com", "https://vault.azure.net", "https://management.azure.com/"];
    let mut t = Tokend::start(&Opts::new(&idp).resources(&resources)).await;
    t.wait_ready(Duration::from_secs(10)).await;
    let header = t.identity_header();
    assert!(t.terminate().success());
    let (dir, config, port) =
        (std::mem::replace(&mut t.dir, tempfile::tempdir().expect("tempdir")), t.config.clone(), t.addr.port());
    let started = std::time::Instant::now();
    let again = Tokend::spawn(dir, config, port, &[]).await;
    again.wait_ready(Duration::from_secs(10)).await;
    let took = started.elapsed();
    eprintln!("restart: ready {took:?} after exec (3 configured resources)");
    assert!(took < Duration::from_secs(3), "{took:?}");
    assert_eq!(again.identity_header(), header, "clients' IDENTITY_HEADER survives a restart");
}

/// `--log-format json`: every stderr line is one JSON object (the dev banner too), and structured
/// fields such as the listen addresses are JSON arrays, not strings of Debug text.
#[tokio::test(flavor = "multi_thread")]
async fn json_logs_are_json_with_real_arrays() {
    let mut child = Command::new(tokend_bin())
        .args(["--log-format", "json", "dev", "--listen", "127.0.0.1:0"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let pid = child.id().to_string();
    let mut lines = Vec::new();
    let mut raw = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
        let Ok(line) = rx.recv_timeout(left) else { break };
        raw.push(line.clone());
        let Ok(v) = serde_json::from_str::<Value>(&line) else { break };
        let serving = v["fields"]["message"] == "tokend serving";
        lines.push(v);
        if serving {
            break;
        }
    }
    let _ = Command::new("kill").args(["-TERM", &pid]).status();
    let _ = child.wait();
    assert_eq!(lines.len(), raw.len(), "every line is JSON: {raw:?}");
    assert!(lines.first().is_some_and(|v| v["fields"]["message"] == "DEVELOPMENT ONLY"), "{lines:?}");
    let serving = lines.last().expect("lines");
    assert!(serving["fields"]["listen"].as_array().is_some_and(|a| a.len() == 1 && a[0].is_string()), "{serving}");
    assert_eq!(serving["fields"]["identities"], serde_json::json!(["dev"]));
}

/// `tokend dev --listen localhost:…`: host names are not resolved, and the error says what to write.
#[test]
fn a_host_name_for_listen_gets_a_hint() {
    let out = tokend(&["dev", "--listen", "localhost:50343"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("host names are not resolved, use 127.0.0.1, e.g. 127.0.0.1:50343"), "{stderr}");
}
