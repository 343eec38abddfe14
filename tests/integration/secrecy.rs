//! Secrets and tokens never reach the log, at any level, nor the audit log.

use std::time::Duration;

use serde_json::Value;

use crate::support::*;

#[tokio::test(flavor = "multi_thread")]
async fn trace_logs_hold_no_secret_token_or_identity_header() {
    let idp = Idp::start(6).await;
    let mut o = Opts::new(&idp).resources(&["https://storage.azure.com"]);
    o.min_lifetime = "2s".into();
    let dir = tempfile::tempdir().expect("tempdir");
    let bad = dir.path().join("bad-secret");
    std::fs::write(&bad, "Wr0ng~Secret.Value_9").expect("write");
    o.extra = format!(
        "[[identity]]\nname = \"broken\"\nclient_id = \"{CLIENT_ID_2}\"\ntoken_url = \"{}\"\nclient_secret_file = \"{}\"\n[audit]\npath = \"audit.jsonl\"\n",
        idp.token_url(),
        bad.display()
    );
    let t = Tokend::start_with_env(&o, &[("TOKEND_LOG", "trace")]).await;
    t.wait_ready(Duration::from_secs(10)).await;
    let mut tokens = Vec::new();
    for _ in 0..3 {
        let v: Value =
            t.imds("api-version=2018-02-01&resource=https://storage.azure.com").await.json().await.expect("json");
        tokens.push(v["access_token"].as_str().expect("token").to_owned());
        let v: Value =
            t.app_service("api-version=2019-08-01&resource=https://vault.azure.net").await.json().await.expect("json");
        tokens.push(v["access_token"].as_str().expect("token").to_owned());
        tokio::time::sleep(Duration::from_secs(2)).await; // let a refresh or two happen
    }
    let r = t.imds(&format!("api-version=2018-02-01&resource=https://storage.azure.com&client_id={CLIENT_ID_2}")).await;
    assert_eq!(r.status(), 500);
    let _ = http()
        .get(t.url("/msi/token?api-version=2019-08-01&resource=x"))
        .header("X-IDENTITY-HEADER", "guess")
        .send()
        .await;
    let audit_path = t.dir.path().join("audit.jsonl");
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let audit = loop {
        let text = std::fs::read_to_string(&audit_path).unwrap_or_default();
        if text.lines().count() >= 8 || std::time::Instant::now() > deadline {
            break text;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // Six tokens issued, one credential rejected, one wrong X-IDENTITY-HEADER.
    assert_eq!(audit.lines().count(), 8, "every decision audited: {audit}");
    assert!(
        audit.contains("\"decision\":\"denied\",\"dialect\":\"app_service\"") && audit.contains("\"status\":401"),
        "{audit}"
    );
    assert!(audit.contains("\"decision\":\"error\"") && audit.contains("sha256:"), "{audit}");
    // The trace log and the audit log, searched alike.
    let logs = t.logs() + &audit;
    assert!(logs.contains("TRACE") || logs.contains("DEBUG"), "the log was captured at trace level");
    assert!(logs.contains("sha256:"), "tokens are identified by fingerprint");
    assert!(logs.contains("invalid_client"), "the failure is logged");
    for secret in [SECRET, "Wr0ng~Secret.Value_9", "Sup3r", "Wr0ng"] {
        assert!(!logs.contains(secret), "client secret {secret:?} leaked into the log");
    }
    let header = t.identity_header();
    assert!(!logs.contains(&header), "identity header leaked into the log");
    for token in &tokens {
        let signature = token.rsplit('.').next().expect("jwt");
        assert!(!logs.contains(signature), "an access token leaked into the log");
        let payload = token.split('.').nth(1).expect("jwt");
        assert!(!logs.contains(payload), "an access token payload leaked into the log");
    }
}
