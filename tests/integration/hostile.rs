//! Hostile and broken input: slowloris, oversized requests, garbage — always a 4xx in the dialect's
//! shape (or a closed connection), never a crash, a hang or starved real callers.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::*;

const Q: &str = "api-version=2018-02-01&resource=https://storage.azure.com";

#[tokio::test(flavor = "multi_thread")]
async fn slowloris_connections_do_not_starve_real_callers_and_are_cut_off() {
    let idp = Idp::start(3600).await;
    // The attacker and the real callers are one uid here (this test's), so lift the per-caller
    // connection cap above the attack: this test is about the header-read timeout. (Across uids the cap
    // itself protects others: callers::one_caller_cannot_hold_every_connection.)
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let config = write_config(dir.path(), port, &Opts::new(&idp).resources(&["https://storage.azure.com"]));
    let text = std::fs::read_to_string(&config).expect("read");
    let anchor = "identity_header_file = \"identity-header\"\n";
    std::fs::write(&config, text.replace(anchor, &format!("{anchor}max_connections_per_caller = 1000\n")))
        .expect("write");
    let t = Tokend::spawn(dir, config, port, &[]).await;
    t.wait_ready(Duration::from_secs(10)).await;
    // 300 connections that never finish their request head.
    let mut slow = Vec::new();
    for _ in 0..300 {
        let mut s = TcpStream::connect(t.addr).expect("connect");
        s.write_all(b"GET /metadata/identity/oauth2/token HTTP/1.1\r\nHost: 127.0.0.1\r\nMetadata: tr").expect("write");
        slow.push(s);
    }
    // Real callers are answered at once meanwhile.
    for _ in 0..20 {
        let started = Instant::now();
        assert_eq!(t.imds(Q).await.status(), 200);
        assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());
    }
    // The header-read timeout (5 s) closes them.
    tokio::time::sleep(Duration::from_secs(7)).await;
    let mut still_open = 0;
    for s in &mut slow {
        s.set_read_timeout(Some(Duration::from_millis(200))).expect("timeout");
        let mut buf = [0u8; 512];
        // Closed: EOF or a reset, possibly after hyper's 408. Still open: the read times out.
        loop {
            match s.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => assert!(buf[..n].starts_with(b"HTTP/1.1 4"), "{:?}", String::from_utf8_lossy(&buf[..n])),
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                    still_open += 1;
                    break;
                }
                Err(_) => break,
            }
        }
    }
    assert_eq!(still_open, 0, "half-open connections outlived the header-read timeout");
    assert_eq!(t.imds(Q).await.status(), 200, "still serving");
}

fn raw(addr: std::net::SocketAddr, request: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    let _ = s.write_all(request);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn oversized_and_garbage_requests_get_4xx_in_the_dialect_shape() {
    let idp = Idp::start(3600).await;
    let t = Tokend::start(&Opts::new(&idp)).await;
    let c = http();

    let long = format!("{}&x={}", t.imds_url("https://storage.azure.com"), "a".repeat(9000));
    let r = c.get(&long).header("Metadata", "true").send().await.expect("send");
    assert_eq!(r.status(), 414);
    let v: Value = r.json().await.expect("IMDS error shape");
    assert_eq!(v["error"], "invalid_request");

    let r = c
        .get(t.url("/msi/token?api-version=2019-08-01&resource=r"))
        .header("X-Junk", "b".repeat(20_000))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 431);
    let v: Value = r.json().await.expect("App Service error shape");
    assert_eq!(v["statusCode"], 431);

    // Beyond the hard cap hyper refuses the head itself.
    let huge = format!("GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Junk: {}\r\n\r\n", "c".repeat(100_000));
    let answer = raw(t.addr, huge.as_bytes());
    assert!(answer.is_empty() || answer.starts_with("HTTP/1.1 431"), "{answer:.80}");

    for garbage in [
        &b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"[..], // a TLS ClientHello
        b"GET\r\n\r\n",
        b"GET /metadata/identity/oauth2/token?%ZZ HTTP/1.1\r\nHost: 127.0.0.1\r\nMetadata: true\r\n\r\n",
        b"POST /msi/token HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 5\r\n\r\nhello",
        b"GET /metadata/identity/oauth2/token?api-version=99999-99-99&resource=x HTTP/1.1\r\nHost: 127.0.0.1\r\nMetadata: true\r\n\r\n",
        b"GET /../../etc/passwd HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
    ] {
        let answer = raw(t.addr, garbage);
        let status: u16 = answer.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
        assert!(answer.is_empty() || (400..500).contains(&status), "{garbage:?} -> {answer:.120}");
    }
    assert_eq!(t.imds(Q).await.status(), 200, "still serving");
    assert_eq!(c.get(t.url("/healthz")).send().await.expect("send").status(), 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_answers_in_flight_requests_and_exits_within_the_grace_period() {
    let idp = Idp::start(3600).await;
    idp.fault(serde_json::json!({ "delay_ms": 3000 })).await;
    let mut t = Tokend::start(&Opts::new(&idp)).await;
    // An idle keep-alive connection must not hold the exit up.
    let _idle = TcpStream::connect(t.addr).expect("connect");
    let url = t.imds_url("https://storage.azure.com");
    let in_flight = tokio::spawn(async move { http().get(url).header("Metadata", "true").send().await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let started = Instant::now();
    let status = tokio::task::spawn_blocking(move || {
        let s = t.terminate();
        (s, t)
    })
    .await
    .expect("join");
    assert!(status.0.success(), "{:?}\n{}", status.0, status.1.logs());
    assert!(started.elapsed() < Duration::from_secs(11), "{:?}", started.elapsed());
    let r = in_flight.await.expect("join").expect("the in-flight request was answered, not dropped");
    assert_eq!(r.status(), 503, "no token yet, shutting down: 503 + Retry-After");
    assert!(r.headers().contains_key("retry-after"));
}
