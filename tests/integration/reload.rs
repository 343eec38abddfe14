//! Rotation without restarts: credential files picked up within seconds, SIGHUP reloads under traffic,
//! broken new configurations rejected while the old one keeps serving.

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::*;

const Q: &str = "api-version=2018-02-01&resource=https://storage.azure.com";

async fn wait_for_status(t: &Tokend, query: &str, status: u16, within: Duration) -> Duration {
    let started = Instant::now();
    loop {
        if t.imds(query).await.status() == status {
            return started.elapsed();
        }
        assert!(started.elapsed() < within, "no {status} for {query} within {within:?}:\n{}", t.logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until the background traffic has made at least 10 more successful requests.
async fn traffic_flows(ok: &AtomicUsize) {
    let (start, deadline) = (ok.load(Ordering::SeqCst), Instant::now() + Duration::from_secs(20));
    while ok.load(Ordering::SeqCst) < start + 10 {
        assert!(Instant::now() < deadline, "background traffic stalled");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn hup(t: &Tokend) {
    assert!(Command::new("kill").args(["-HUP", &t.pid().to_string()]).status().expect("kill").success());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wrong_then_fixed_secret_file_is_picked_up_without_restart() {
    let idp = Idp::start(3600).await;
    let mut o = Opts::new(&idp);
    o.secret = "wrong-secret".into();
    let t = Tokend::start(&o).await;
    assert_eq!(t.imds(Q).await.status(), 500);
    let pid = t.pid();
    std::fs::write(t.dir.path().join("client-secret"), SECRET).expect("fix the secret");
    let took = wait_for_status(&t, Q, 200, Duration::from_secs(10)).await;
    eprintln!("fixed secret picked up after {took:?}");
    assert_eq!(t.pid(), pid, "no restart");
    assert!(t.logs().contains("configuration reloaded"), "{}", t.logs());
    assert!(idp.token_requests().await <= 3, "the rejection backoff was reset for the new secret, no loop");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_broken_new_credential_keeps_the_old_one_serving() {
    let idp = Idp::start(3600).await;
    let t = Tokend::start(&Opts::new(&idp)).await;
    assert_eq!(t.imds(Q).await.status(), 200);
    // An empty secret file (a half-written rotation) is refused; the old secret keeps working.
    std::fs::write(t.dir.path().join("client-secret"), "").expect("truncate");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !t.logs().contains("REJECTED") {
        assert!(Instant::now() < deadline, "the broken credential was not reported:\n{}", t.logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(t.logs().contains("is empty"), "{}", t.logs());
    let r = t.imds("api-version=2018-02-01&resource=https://vault.azure.net").await;
    assert_eq!(r.status(), 200, "a new resource is fetched with the old credential:\n{}", t.logs());
    std::fs::write(t.dir.path().join("client-secret"), SECRET).expect("restore");
    let deadline = Instant::now() + Duration::from_secs(10);
    while t.logs().matches("configuration reloaded").count() < 1 {
        assert!(Instant::now() < deadline, "{}", t.logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn sighup_reloads_identities_under_traffic_with_zero_failed_requests() {
    let idp = Idp::start(3600).await;
    let t = Arc::new(Tokend::start(&Opts::new(&idp).resources(&["https://storage.azure.com"])).await);
    t.wait_ready(Duration::from_secs(10)).await;
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let mut traffic = Vec::new();
    for i in 0..3 {
        let (t, stop, ok, failed) = (t.clone(), stop.clone(), ok.clone(), failed.clone());
        traffic.push(tokio::spawn(async move {
            let client = http();
            let header = t.identity_header();
            while !stop.load(Ordering::SeqCst) {
                let r = if i == 0 {
                    client
                        .get(t.url("/msi/token?api-version=2019-08-01&resource=https://storage.azure.com"))
                        .header("X-IDENTITY-HEADER", &header)
                } else {
                    client.get(t.imds_url("https://storage.azure.com")).header("Metadata", "true")
                };
                match r.send().await {
                    Ok(r) if r.status() == 200 => ok.fetch_add(1, Ordering::SeqCst),
                    _ => failed.fetch_add(1, Ordering::SeqCst),
                };
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }));
    }
    let config = std::fs::read_to_string(&t.config).expect("config");
    let s2 = t.dir.path().join("second-secret");
    std::fs::write(&s2, SECRET_2).expect("write");
    let second = format!(
        "\n[[identity]]\nname = \"second\"\nclient_id = \"{CLIENT_ID_2}\"\ntoken_url = \"{}\"\nclient_secret_file = \"second-secret\"\nresources = [\"https://vault.azure.net\"]\n",
        idp.token_url()
    );
    let with_second = format!("{config}{second}").replace("min_lifetime = \"5s\"", "min_lifetime = \"6s\"");
    let selected = format!("{Q}&client_id={CLIENT_ID_2}");
    assert_eq!(t.imds(&selected).await.status(), 400, "not configured yet");

    // Add an identity (and change [tokens]) live.
    std::fs::write(&t.config, &with_second).expect("write");
    hup(&t);
    traffic_flows(&ok).await;
    wait_for_status(&t, &selected, 200, Duration::from_secs(10)).await;
    let v: Value = t.imds(&selected).await.json().await.expect("json");
    assert_eq!(jwt_claims(v["access_token"].as_str().expect("token"))["client_id"], CLIENT_ID_2);
    t.wait_ready(Duration::from_secs(10)).await; // the new configured resource is fetched too

    // A configuration that fails validation is rejected; the running one keeps serving.
    std::fs::write(&t.config, format!("{with_second}\nbogus_key = 1\n")).expect("write");
    hup(&t);
    traffic_flows(&ok).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !t.logs().contains("REJECTED") {
        assert!(Instant::now() < deadline, "{}", t.logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(t.imds(&selected).await.status(), 200, "the previous configuration still serves");

    // Remove the identity again.
    std::fs::write(&t.config, &config).expect("write");
    hup(&t);
    traffic_flows(&ok).await;
    wait_for_status(&t, &selected, 400, Duration::from_secs(10)).await;

    stop.store(true, Ordering::SeqCst);
    for task in traffic {
        task.await.expect("join");
    }
    let (ok, failed) = (ok.load(Ordering::SeqCst), failed.load(Ordering::SeqCst));
    eprintln!("requests during three reloads: {ok} ok, {failed} failed");
    assert_eq!(failed, 0, "zero failed requests across reloads");
    assert!(ok >= 30, "traffic kept flowing through every reload: {ok}");
}
