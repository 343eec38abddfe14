//! Single flight and proactive refresh against the real IdP.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::support::*;

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_cold_callers_make_one_upstream_call() {
    let idp = Idp::start(3600).await;
    // Slow the one upstream call down so that every caller arrives while it is in flight.
    idp.fault(json!({ "delay_ms": 1000 })).await;
    let t = Tokend::start(&Opts::new(&idp)).await;
    let header = t.identity_header();
    let mut tasks = Vec::new();
    for i in 0..60 {
        let c = http();
        let url = match i % 3 {
            0 => t.url("/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https://storage.azure.com"),
            1 => {
                t.url("/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https%3A%2F%2Fstorage.azure.com")
            }
            _ => t.url("/msi/token?api-version=2019-08-01&resource=https://storage.azure.com/.default"),
        };
        let header = header.clone();
        tasks.push(tokio::spawn(async move {
            let r =
                c.get(url).header("Metadata", "true").header("X-IDENTITY-HEADER", header).send().await.expect("send");
            assert_eq!(r.status(), 200);
            r.json::<Value>().await.expect("json")["access_token"].as_str().expect("token").to_owned()
        }));
    }
    let mut tokens = HashSet::new();
    for task in tasks {
        tokens.insert(task.await.expect("join"));
    }
    assert_eq!(tokens.len(), 1, "every caller got the same token");
    assert_eq!(idp.token_requests().await, 1, "60 concurrent cold callers, one upstream call");
}

/// Polls IMDS every `every` for `total`; returns (latencies, distinct tokens, min expires_in seen).
async fn poll(t: &Tokend, resource: &str, total: Duration, every: Duration) -> (Vec<Duration>, HashSet<String>, u64) {
    let (mut lat, mut tokens, mut min_left) = (Vec::new(), HashSet::new(), u64::MAX);
    let end = Instant::now() + total;
    while Instant::now() < end {
        let started = Instant::now();
        let r = t.imds(&format!("api-version=2018-02-01&resource={resource}")).await;
        let elapsed = started.elapsed();
        assert_eq!(r.status(), 200, "{}", t.logs());
        let v: Value = r.json().await.expect("json");
        lat.push(elapsed);
        tokens.insert(v["access_token"].as_str().expect("token").to_owned());
        min_left = min_left.min(v["expires_in"].as_str().expect("string").parse().expect("digits"));
        tokio::time::sleep(every).await;
    }
    (lat, tokens, min_left)
}

#[tokio::test(flavor = "multi_thread")]
async fn proactive_refresh_never_makes_a_caller_wait() {
    // 14 s tokens, 4 s floor: servable for 10 s, refreshed after ~6.3–7 s (half-life), which leaves
    // room for a slow IdP before the floor.
    let idp = Idp::start(14).await;
    let mut o = Opts::new(&idp).resources(&["https://storage.azure.com"]);
    o.min_lifetime = "4s".into();
    let t = Tokend::start(&o).await;
    t.wait_ready(Duration::from_secs(10)).await;
    // Every refresh from now on takes 1.5 s upstream: a caller that waited on one would show it.
    idp.fault(json!({ "delay_ms": 1500, "count": 10 })).await;
    let (lat, tokens, min_left) =
        poll(&t, "https://storage.azure.com", Duration::from_secs(18), Duration::from_millis(40)).await;
    let mut sorted = lat.clone();
    sorted.sort();
    let (median, max) = (sorted[sorted.len() / 2], sorted[sorted.len() - 1]);
    eprintln!("refresh under load: {} requests, median {median:?}, max {max:?}, {} tokens", lat.len(), tokens.len());
    // tokend logs whether each answer came from the cache at first look (no waiting at all).
    let logs = t.logs();
    assert_eq!(logs.matches("cache_hit=false").count(), 0, "a caller waited for a token");
    assert!(logs.matches("cache_hit=true").count() >= lat.len());
    assert!(tokens.len() >= 3, "refreshed in the background about every 7 s: {} tokens", tokens.len());
    assert!(min_left >= 3, "never served with less than min_lifetime (4 s, whole seconds) left: {min_left}");
    let calls = idp.token_requests().await;
    assert!((3..=6).contains(&calls), "one upstream call per refresh, not per caller: {calls}");
}

#[tokio::test(flavor = "multi_thread")]
async fn tokens_living_less_than_twice_the_floor_are_served_and_refreshed_before_the_floor() {
    // 8 s tokens, 5 s floor (8 < 2 × 5): each token is servable for 3 s and refreshed after ~2.5 s.
    let idp = Idp::start(8).await;
    let t = Tokend::start(&Opts::new(&idp).resources(&["https://storage.azure.com"])).await;
    t.wait_ready(Duration::from_secs(10)).await;
    let (_, tokens, min_left) =
        poll(&t, "https://storage.azure.com", Duration::from_secs(9), Duration::from_millis(100)).await;
    assert!(min_left >= 4, "served with at least the floor left (whole seconds): {min_left}");
    assert!(tokens.len() >= 3, "{} tokens in 9 s", tokens.len());
    let calls = idp.token_requests().await;
    assert!((4..=7).contains(&calls), "about one upstream call per 2.5 s: {calls}");
}

#[tokio::test(flavor = "multi_thread")]
async fn tokens_that_never_clear_the_floor_are_a_clear_5xx() {
    let idp = Idp::start(4).await;
    let t = Tokend::start(&Opts::new(&idp)).await;
    let r = t.imds("api-version=2018-02-01&resource=https://storage.azure.com").await;
    assert_eq!(r.status(), 500);
    let v: Value = r.json().await.expect("json");
    let d = v["error_description"].as_str().expect("desc");
    assert!(d.contains("tokens.min_lifetime") && d.contains("4s"), "{d}");
    for _ in 0..5 {
        assert_eq!(t.imds("api-version=2018-02-01&resource=https://storage.azure.com").await.status(), 500);
    }
    assert_eq!(idp.token_requests().await, 1, "remembered, not retried per caller");
}
