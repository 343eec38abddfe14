//! The upstream client: HTTPS with an extra CA, proxies, the Entra v1 request style.

use std::io::{BufRead, BufReader, Write};
use std::time::Duration;

use serde_json::Value;

use crate::support::*;

const Q: &str = "api-version=2018-02-01&resource=https://storage.azure.com";

#[tokio::test(flavor = "multi_thread")]
async fn https_idp_with_a_private_ca_needs_upstream_ca_file() {
    let idp = Idp::start_tls(3600).await;
    let ca = idp.ca.clone().expect("ca");
    let mut trusted = Opts::new(&idp);
    trusted.extra = format!("\n[upstream]\nca_file = {:?}\n", ca.display().to_string());
    let t = Tokend::start(&trusted).await;
    let r = t.imds(Q).await;
    assert_eq!(r.status(), 200, "{}", t.logs());

    // Without the CA: a clear error that names the host, as a 503 (nothing valid cached).
    let untrusted = Tokend::start(&Opts::new(&idp)).await;
    let r = untrusted.imds(Q).await;
    assert_eq!(r.status(), 503);
    let v: Value = r.json().await.expect("json");
    let d = v["error_description"].as_str().expect("desc");
    assert!(d.contains(&format!("127.0.0.1:{}", idp.port)) && d.to_lowercase().contains("certificate"), "{d}");
    assert_eq!(idp.token_requests().await, 1, "the TLS handshake failed before any request");
}

/// A one-shot fake HTTP proxy: records the first request line of each connection and answers 502.
fn fake_proxy() -> (u16, std::sync::mpsc::Receiver<String>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for stream in listener.incoming().take(20).flatten() {
            let mut line = String::new();
            let _ = BufReader::new(&stream).read_line(&mut line);
            let _ = tx.send(line.trim().to_owned());
            let _ = (&stream).write_all(b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\n\r\n");
        }
    });
    (port, rx)
}

#[tokio::test(flavor = "multi_thread")]
async fn remote_token_urls_go_through_https_proxy_and_no_proxy_is_honoured() {
    let (port, seen) = fake_proxy();
    let proxy = format!("http://127.0.0.1:{port}");
    let o = Opts::for_url("https://login.tokend-test.invalid/tenant/oauth2/v2.0/token");
    let t = Tokend::start_with_env(&o, &[("HTTPS_PROXY", &proxy), ("NO_PROXY", "127.0.0.1,localhost")]).await;
    let r = t.imds(Q).await;
    assert_eq!(r.status(), 503);
    let line = seen.recv_timeout(Duration::from_secs(5)).expect("the proxy was used");
    assert_eq!(line, "CONNECT login.tokend-test.invalid:443 HTTP/1.1");
    drop(t); // its refresher would keep retrying through the proxy
    while seen.recv_timeout(Duration::from_millis(300)).is_ok() {}

    let bypass = Tokend::start_with_env(&o, &[("HTTPS_PROXY", &proxy), ("NO_PROXY", "tokend-test.invalid")]).await;
    assert_eq!(bypass.imds(Q).await.status(), 503);
    assert!(seen.recv_timeout(Duration::from_millis(500)).is_err(), "NO_PROXY bypasses the proxy");

    // Loopback token URLs never use the proxy (it could not reach our loopback anyway).
    let idp = Idp::start(3600).await;
    let local = Tokend::start_with_env(&Opts::new(&idp), &[("HTTPS_PROXY", &proxy), ("HTTP_PROXY", &proxy)]).await;
    assert_eq!(local.imds(Q).await.status(), 200);
    assert!(seen.recv_timeout(Duration::from_millis(200)).is_err());
}

#[tokio::test(flavor = "multi_thread")]
async fn entra_v1_style_sends_resource() {
    let idp = Idp::start(3600).await;
    let mut o = Opts::new(&idp);
    o.extra = "api = \"v1\"\n".into();
    let t = Tokend::start(&o).await;
    let r = t.imds("api-version=2018-02-01&resource=https://vault.azure.net").await;
    assert_eq!(r.status(), 200, "{}", t.logs());
    let v: Value = r.json().await.expect("json");
    assert_eq!(jwt_claims(v["access_token"].as_str().expect("token"))["aud"], "https://vault.azure.net");
    let body = idp.requests().await.iter().find(|r| r["method"] == "POST").expect("request")["body"]
        .as_str()
        .expect("body")
        .to_owned();
    assert!(body.contains("resource=https%3A%2F%2Fvault.azure.net") && !body.contains("scope="), "{body}");
}
