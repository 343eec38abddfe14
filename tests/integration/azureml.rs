//! Azure ML compute and the older managed-identity dialects, with real clients in fresh processes with
//! clean environments: msrestazure (Azure ML's v1 SDK), azure-identity's Azure ML and Cloud Shell paths,
//! and the curl lines of docs/azureml.md. The route each took is read from tokend's audit log.

use std::time::Duration;

use serde_json::Value;

use crate::support::*;

fn ok_token(v: &Value) -> String {
    assert_eq!(v["ok"], true, "client failed: {v}");
    v["token"].as_str().expect("token").to_owned()
}

/// The audit log's lines once it has `n`.
async fn audit_lines(t: &Tokend, n: usize) -> Vec<Value> {
    let path = t.dir.path().join("audit.jsonl");
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        if text.lines().count() >= n || std::time::Instant::now() > deadline {
            return text.lines().map(|l| serde_json::from_str(l).expect("a JSON line")).collect();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The routes of the audit lines `from..`, as `dialect identity decision`.
fn routes(lines: &[Value], from: usize) -> Vec<String> {
    lines[from..].iter().map(|l| format!("{} {} {}", l["dialect"], l["identity"], l["decision"])).collect()
}

async fn start(idp: &Idp, dir: &std::path::Path) -> Tokend {
    let mut o = Opts::new(idp).with_second_identity(idp, dir);
    o.extra.push_str("[audit]\npath = \"audit.jsonl\"\n");
    Tokend::start(&o).await
}

#[tokio::test(flavor = "multi_thread")]
async fn training_code_written_for_azure_ml_runs_unchanged() {
    let idp = Idp::start(3600).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let t = start(&idp, dir.path()).await;
    let endpoint = t.url("/msi/token");
    let azureml = vec![("MSI_ENDPOINT", endpoint.clone()), ("MSI_SECRET", t.identity_header())];
    let cloud_shell = vec![("MSI_ENDPOINT", endpoint.clone())];
    let mut webapp = azureml.clone();
    webapp.push(("APPSETTING_WEBSITE_SITE_NAME", "training".to_owned()));
    let storage = "https://storage.azure.com";
    let msrest = Client::MsrestazurePython;

    // One client at a time, so that each audit line belongs to the client before it.
    type Env = Vec<(&'static str, String)>;
    let cases: Vec<(&str, Client, Vec<&str>, &Env, &str)> = vec![
        (
            "msrestazure, MSI_ENDPOINT set",
            msrest,
            vec!["msi", storage],
            &azureml,
            "\"cloud_shell\" \"default\" \"issued\"",
        ),
        (
            "msrestazure, MSI_ENDPOINT only",
            msrest,
            vec!["msi", storage],
            &cloud_shell,
            "\"cloud_shell\" \"default\" \"issued\"",
        ),
        (
            "msrestazure, user-assigned",
            msrest,
            vec!["msi", storage, "--client-id", CLIENT_ID_2],
            &azureml,
            "\"cloud_shell\" \"second\" \"issued\"",
        ),
        ("msrestazure, App Service 2017", msrest, vec!["msi", storage], &webapp, "\"azureml\" \"default\" \"issued\""),
        (
            "msrestazure, App Service 2017, user-assigned",
            msrest,
            vec!["msi", storage, "--client-id", CLIENT_ID_2],
            &webapp,
            "\"azureml\" \"second\" \"issued\"",
        ),
        (
            "azure-identity, Azure ML",
            Client::AzureIdentityPython,
            vec!["mi", storage],
            &azureml,
            "\"azureml\" \"default\" \"issued\"",
        ),
        (
            "azure-identity, Azure ML, user-assigned",
            Client::AzureIdentityPython,
            vec!["mi-client-id", storage, "--client-id", CLIENT_ID_2],
            &azureml,
            "\"azureml\" \"second\" \"issued\"",
        ),
        (
            "azure-identity, Cloud Shell",
            Client::AzureIdentityPython,
            vec!["mi", "https://vault.azure.net"],
            &cloud_shell,
            "\"cloud_shell\" \"default\" \"issued\"",
        ),
    ];
    let mut seen = 0;
    for (name, client, args, env, route) in cases {
        let v = run_client(client, None, &args, env).await;
        let token = ok_token(&v);
        let expected_client = if args.contains(&CLIENT_ID_2) { CLIENT_ID_2 } else { CLIENT_ID };
        assert_eq!(jwt_claims(&token)["client_id"], expected_client, "{name}: {v}");
        let lines = audit_lines(&t, seen + 1).await;
        let took = routes(&lines, seen);
        eprintln!("{name}: {took:?}");
        assert_eq!(took, vec![route.to_owned()], "{name}: one request, on the expected route");
        seen = lines.len();
    }
    assert_eq!(idp.token_requests().await, 3, "one upstream call per (identity, resource)");
}

/// The curl lines of docs/azureml.md, run verbatim by `sh` with the Azure ML variables set.
#[tokio::test(flavor = "multi_thread")]
async fn the_guides_curl_lines_work() {
    let idp = Idp::start(3600).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let t = start(&idp, dir.path()).await;
    let guide = std::fs::read_to_string(repo().join("docs/azureml.md")).expect("docs/azureml.md");
    let lines: Vec<&str> = guide.lines().filter(|l| l.starts_with("curl ")).collect();
    assert_eq!(lines.len(), 2, "the 2017 GET and the POST: {lines:?}");
    for line in &lines {
        let out = tokio::process::Command::new("sh")
            .args(["-c", line])
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("MSI_ENDPOINT", t.url("/msi/token"))
            .env("MSI_SECRET", t.identity_header())
            .output()
            .await
            .expect("sh and curl are required");
        let body: Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{line}: {e}: {}", String::from_utf8_lossy(&out.stdout)));
        assert!(body["access_token"].is_string(), "{line}: {body}");
        let expires_on = body["expires_on"].as_str().expect("a string");
        assert!(expires_on.parse::<u64>().is_ok(), "epoch seconds: {body}");
    }
    let took = routes(&audit_lines(&t, 2).await, 0);
    assert_eq!(took, ["\"azureml\" \"default\" \"issued\"", "\"cloud_shell\" \"default\" \"issued\""]);
}

/// What a misconfigured training script gets: a clear 4xx in the dialect's shape, never a 404.
#[tokio::test(flavor = "multi_thread")]
async fn misconfigured_requests_get_clear_errors() {
    let idp = Idp::start(3600).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let t = start(&idp, dir.path()).await;
    let get_2017 = |secret: Option<&str>, extra: &str| {
        let mut r =
            http().get(t.url(&format!("/msi/token?api-version=2017-09-01&resource=https://storage.azure.com{extra}")));
        if let Some(s) = secret {
            r = r.header("secret", s);
        }
        r.send()
    };
    let header = t.identity_header();
    for (resp, status, needle) in [
        (get_2017(None, "").await, 401, "header secret is missing"),
        (get_2017(Some("wrong"), "").await, 401, "does not match MSI_SECRET"),
        (get_2017(Some(&header), "&clientid=00000000-0000-0000-0000-000000000000").await, 400, "Identity not found"),
    ] {
        let resp = resp.expect("request");
        assert_eq!(resp.status(), status);
        let body: Value = resp.json().await.expect("json");
        assert_eq!(body["statusCode"], status, "the App Service shape: {body}");
        assert!(body["message"].as_str().is_some_and(|m| m.contains(needle)), "{needle}: {body}");
    }
    let post = |metadata: bool, content_type: &str, body: String| {
        let mut r = http().post(t.url("/msi/token")).header("Content-Type", content_type).body(body);
        if metadata {
            r = r.header("Metadata", "true");
        }
        r.send()
    };
    let form = "application/x-www-form-urlencoded";
    let resource = "resource=https://storage.azure.com".to_owned();
    for (resp, status, needle) in [
        (post(false, form, resource.clone()).await, 400, "Required metadata header"),
        (
            post(true, "application/json", r#"{"resource":"https://storage.azure.com"}"#.into()).await,
            415,
            "Content-Type",
        ),
        (post(true, form, format!("{resource}&pad={}", "x".repeat(8192))).await, 413, "larger than"),
        (
            post(true, form, format!("{resource}&client_id=00000000-0000-0000-0000-000000000000")).await,
            400,
            "Identity not found",
        ),
    ] {
        let resp = resp.expect("request");
        assert_eq!(resp.status(), status);
        let body: Value = resp.json().await.expect("json");
        assert!(
            body["error_description"].as_str().is_some_and(|m| m.contains(needle)),
            "the IMDS shape, {needle}: {body}"
        );
    }
    assert_eq!(idp.token_requests().await, 0, "no refused request reached the IdP");
}

/// `tokend env --dialect`: each family's variables, the others unset; only the dialects that carry the
/// secret read the identity header file.
#[tokio::test(flavor = "multi_thread")]
async fn env_prints_each_dialects_variables() {
    let idp = Idp::start(3600).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let t = start(&idp, dir.path()).await;
    let env = |dialect: &str| {
        let out = std::process::Command::new(tokend_bin())
            .args(["env", "--config", t.config.to_str().expect("utf8"), "--dialect", dialect])
            .output()
            .expect("tokend env");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let endpoint = t.url("/msi/token");
    let (code, azureml, _) = env("azureml");
    assert_eq!(code, Some(0));
    assert_eq!(
        azureml,
        format!(
            "unset IDENTITY_ENDPOINT IDENTITY_HEADER AZURE_POD_IDENTITY_AUTHORITY_HOST\nexport MSI_ENDPOINT='{endpoint}'\nexport MSI_SECRET='{}'\n",
            t.identity_header()
        )
    );
    let (_, cloud_shell, _) = env("cloud-shell");
    assert!(
        cloud_shell.ends_with(&format!("export MSI_ENDPOINT='{endpoint}'\n")) && !cloud_shell.contains("MSI_SECRET='"),
        "{cloud_shell}"
    );
    let (_, imds, _) = env("imds");
    assert!(imds.contains("unset IDENTITY_ENDPOINT IDENTITY_HEADER MSI_ENDPOINT MSI_SECRET\n"), "{imds}");
    let (_, default, _) = env("app-service");
    assert!(
        default.contains("export IDENTITY_HEADER=") && default.starts_with("unset MSI_ENDPOINT MSI_SECRET\n"),
        "{default}"
    );
    let (code, _, stderr) = env("vm");
    assert_eq!(code, Some(2), "clap rejects an unknown dialect: {stderr}");
    assert!(stderr.contains("azureml") && stderr.contains("cloud-shell"), "{stderr}");
    // The eval'd azureml lines make the client take the Azure ML route.
    let mut vars = Vec::new();
    for line in azureml.lines().filter_map(|l| l.strip_prefix("export ")) {
        let (k, v) = line.split_once('=').expect("k=v");
        vars.push((k, v.trim_matches('\'').to_owned()));
    }
    let v = run_client(Client::AzureIdentityPython, None, &["mi", "https://storage.azure.com"], &vars).await;
    ok_token(&v);
    assert_eq!(routes(&audit_lines(&t, 1).await, 0), ["\"azureml\" \"default\" \"issued\""]);
}
