//! IdP outages, throttling, hangs and a wrong secret: what callers see and how many upstream calls.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::support::*;

const Q: &str = "api-version=2018-02-01&resource=https://storage.azure.com";

fn retry_after(r: &reqwest::Response) -> u64 {
    let v = r.headers().get("retry-after").expect("Retry-After on 503").to_str().expect("ascii");
    v.parse().unwrap_or_else(|_| panic!("Retry-After must be an integer: {v:?}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn idp_down_at_start_then_ready_by_itself_when_it_returns() {
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}/{TENANT}/oauth2/v2.0/token");
    let t = Tokend::start(&Opts::for_url(&url).resources(&["https://storage.azure.com"])).await;
    assert_eq!(http().get(t.url("/healthz")).send().await.expect("send").status(), 200, "alive");
    assert_eq!(http().get(t.url("/readyz")).send().await.expect("send").status(), 503, "not ready");
    let started = Instant::now();
    let r = t.imds(Q).await;
    assert_eq!(r.status(), 503);
    let ra = retry_after(&r);
    assert!((1..=30).contains(&ra), "{ra}");
    assert!(started.elapsed() <= Duration::from_secs(5), "answered within max_wait: {:?}", started.elapsed());
    let v: Value = r.json().await.expect("json");
    assert!(
        v["error_description"].as_str().expect("desc").contains(&format!("127.0.0.1:{port}")),
        "names the host: {v}"
    );

    let idp = Idp::start_on(port, 3600).await;
    let back = Instant::now();
    t.wait_ready(Duration::from_secs(35)).await;
    eprintln!("ready {:?} after the IdP returned", back.elapsed());
    assert_eq!(t.imds(Q).await.status(), 200);
    assert_eq!(idp.token_requests().await, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn idp_down_while_warm_serves_cache_until_the_floor_then_503_then_recovers() {
    let port = free_port();
    let mut idp = Idp::start_on(port, 10).await;
    let mut o = Opts::new(&idp).resources(&["https://storage.azure.com"]);
    o.min_lifetime = "4s".into();
    let t = Tokend::start(&o).await;
    t.wait_ready(Duration::from_secs(10)).await;
    let first: Value = t.imds(Q).await.json().await.expect("json");
    idp.kill();
    // The cached token stays servable until 4 s before its expiry (~6 s after issue).
    let r = t.imds(Q).await;
    assert_eq!(r.status(), 200, "cached token served while the IdP is down");
    assert_eq!(r.json::<Value>().await.expect("json")["access_token"], first["access_token"]);
    // Past the floor: 503 with an integer Retry-After, answered quickly.
    tokio::time::sleep(Duration::from_secs(7)).await;
    let started = Instant::now();
    let r = t.imds(Q).await;
    assert_eq!(r.status(), 503, "{}", t.logs());
    assert!((1..=30).contains(&retry_after(&r)));
    assert!(started.elapsed() <= Duration::from_secs(5));
    assert_eq!(http().get(t.url("/readyz")).send().await.expect("send").status(), 503);
    // Backoff, not a hot loop: the log shows a handful of failed attempts, not hundreds.
    let failures = t.logs().matches("token request failed").count();
    assert!((1..=8).contains(&failures), "{failures} failed attempts in ~8 s");
    let idp = Idp::start_on(port, 10).await;
    let back = Instant::now();
    t.wait_ready(Duration::from_secs(35)).await;
    eprintln!("serving again {:?} after the IdP returned", back.elapsed());
    assert_eq!(t.imds(Q).await.status(), 200);
    assert!(idp.token_requests().await <= 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn throttling_retry_after_is_honoured() {
    let idp = Idp::start(3600).await;
    idp.fault(
        json!({ "status": 429, "count": 1, "headers": { "Retry-After": "2" }, "body": { "error": "throttled" } }),
    )
    .await;
    let t = Tokend::start(&Opts::new(&idp)).await;
    // 2 s is within max_wait (4 s): the caller waits for the retry and gets a token.
    let started = Instant::now();
    let r = t.imds(Q).await;
    assert_eq!(r.status(), 200);
    assert!(started.elapsed() >= Duration::from_secs(2), "{:?}", started.elapsed());
    let times: Vec<i64> =
        idp.requests().await.iter().filter(|r| r["method"] == "POST").map(|r| r["t"].as_i64().expect("t")).collect();
    assert_eq!(times.len(), 2);
    assert!(times[1] - times[0] >= 2000, "retried after Retry-After: {}ms", times[1] - times[0]);

    // A Retry-After beyond max_wait: 503 at once, with the IdP's Retry-After.
    idp.fault(json!({ "status": 429, "count": 1, "headers": { "Retry-After": "30" } })).await;
    let started = Instant::now();
    let r = t.imds("api-version=2018-02-01&resource=https://vault.azure.net").await;
    assert_eq!(r.status(), 503);
    let ra = retry_after(&r);
    assert!((28..=30).contains(&ra), "{ra}");
    assert!(started.elapsed() < Duration::from_secs(2));
    for _ in 0..10 {
        assert_eq!(t.imds("api-version=2018-02-01&resource=https://vault.azure.net").await.status(), 503);
    }
    assert_eq!(idp.token_requests().await, 3, "callers do not hammer a throttling IdP");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hanging_idp_never_holds_a_caller_past_max_wait() {
    let idp = Idp::start(3600).await;
    idp.fault(json!({ "delay_ms": 30000 })).await;
    let t = Tokend::start(&Opts::new(&idp)).await;
    let started = Instant::now();
    let r = t.imds(Q).await;
    let elapsed = started.elapsed();
    assert_eq!(r.status(), 503);
    assert!(retry_after(&r) >= 1);
    assert!(elapsed >= Duration::from_secs(3) && elapsed <= Duration::from_secs(6), "max_wait is 4 s: {elapsed:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wrong_secret_is_a_clear_error_with_one_upstream_call() {
    let idp = Idp::start(3600).await;
    let mut o = Opts::new(&idp);
    o.secret = "not-the-secret".into();
    let t = Tokend::start(&o).await;
    let mut tasks = Vec::new();
    for i in 0..30 {
        let url = t.imds_url(if i % 2 == 0 { "https://storage.azure.com" } else { "https://vault.azure.net" });
        tasks.push(tokio::spawn(async move { http().get(url).header("Metadata", "true").send().await.expect("send") }));
    }
    for task in tasks {
        let r = task.await.expect("join");
        assert_eq!(r.status(), 500);
        let v: Value = r.json().await.expect("json");
        let d = v["error_description"].as_str().expect("desc");
        assert!(d.contains("invalid_client") && d.contains("\"default\""), "names the cause and identity: {d}");
        assert!(!d.contains("not-the-secret"));
    }
    let r = t.app_service("api-version=2019-08-01&resource=https://storage.azure.com").await;
    assert_eq!(r.status(), 500);
    assert!(r.json::<Value>().await.expect("json")["message"].as_str().expect("msg").contains("invalid_client"));
    // Two resources asked for at the same instant may each make the first call; after that the
    // identity's rejection is remembered and no caller reaches the IdP.
    let first = idp.token_requests().await;
    assert!((1..=2).contains(&first), "{first}");
    for r in ["https://storage.azure.com", "https://vault.azure.net", "https://graph.microsoft.com"] {
        assert_eq!(t.imds(&format!("api-version=2018-02-01&resource={r}")).await.status(), 500);
    }
    assert_eq!(idp.token_requests().await, first, "bounded upstream calls however many callers and resources");
}

/// Waits until `query` answers 200; returns how long it took.
async fn recovers(t: &Tokend, query: &str, within: Duration) -> Duration {
    let started = Instant::now();
    loop {
        let r = t.imds(query).await;
        if r.status() == 200 {
            return started.elapsed();
        }
        assert_eq!(r.status(), 503, "only 503 while the IdP misbehaves");
        assert!(r.headers().contains_key("retry-after"));
        assert!(started.elapsed() < within, "not recovered within {within:?}:\n{}", t.logs());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn bursts_of_5xx_resets_and_html_pages_are_retried_with_backoff() {
    let idp = Idp::start(3600).await;
    let t = Tokend::start(&Opts::new(&idp)).await;
    // (fault, how many, what the caller may see meanwhile)
    let cases = [
        (json!({ "status": 503, "count": 3 }), 3, "https://a.example"),
        (
            json!({ "status": 500, "count": 2, "body": "<html>upstream error</html>", "headers": { "content-type": "text/html" } }),
            2,
            "https://b.example",
        ),
        (json!({ "drop": true, "count": 2 }), 2, "https://c.example"),
        (
            json!({ "status": 200, "count": 2, "body": "<html><body>Proxy login required</body></html>", "headers": { "content-type": "text/html" } }),
            2,
            "https://d.example",
        ),
    ];
    for (fault, n, resource) in cases {
        idp.reset().await;
        idp.fault(fault.clone()).await;
        let q = format!("api-version=2018-02-01&resource={resource}");
        let took = recovers(&t, &q, Duration::from_secs(30)).await;
        let calls = idp.token_requests().await;
        eprintln!("{fault}: recovered after {took:?} with {calls} upstream calls");
        assert_eq!(calls, n + 1, "{fault}: one call per failure plus the success, no hot loop");
    }
    let logs = t.logs();
    assert!(logs.contains("not a JSON token response"), "the HTML page is named as such");
    assert!(!logs.contains("Proxy login required"), "bodies are not logged");
}
