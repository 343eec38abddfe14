//! Every limit answers with a reason: a real local user over `server.max_connections_per_caller` reads a
//! 429 with `Retry-After` on every connection beyond it (never a reset); the Host guard against DNS
//! rebinding covers `/readyz` and the metrics listener while probes and scrapers that address tokend
//! by an IP literal keep working; and a `metrics.listen` address that cannot be bound fails start-up
//! before any call to the identity provider.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::callers::{config_with, test_user};
use crate::support::*;

const Q: &str = "api-version=2018-02-01&resource=https://storage.azure.com";

/// A parallel test runner as an unprivileged user: 24 workers at once (curl `--parallel-immediate`, one
/// connection each) against a cap of 4, while the first 4 wait on a slow IdP. Every worker reads a
/// whole HTTP answer — a 200, or a 429 with `Retry-After: 1` whose body names the cap, its value and
/// the caller — and none a reset; with curl's `--retry`, which honours `Retry-After` as the Azure SDKs
/// do, every worker gets its token. Another user is served meanwhile.
#[tokio::test(flavor = "multi_thread")]
async fn a_parallel_runner_over_its_connection_cap_reads_429_on_every_extra_connection() {
    let idp = Idp::start(3600).await;
    let uid = test_user("tokendcaller");
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let config = config_with(dir.path(), port, &Opts::new(&idp), "max_connections_per_caller = 4\n");
    let t = Tokend::spawn(dir, config, port, &[]).await;
    // The first connections wait for an on-demand token the IdP is slow to give: they hold the cap.
    idp.fault(serde_json::json!({"delay_ms": 2500})).await;
    let url = t.imds_url("https://vault.azure.net");
    let started = Instant::now();
    let workers = parallel_curl_as("tokendcaller", &url, false).await;
    let took = started.elapsed();
    let mut refused = 0;
    for (line, body) in &workers {
        if line.starts_with("200 0 ") {
            assert!(body["access_token"].is_string(), "{body}");
            continue;
        }
        assert_eq!(
            line, "429 0 retry-after=1",
            "a 200 or a 429 with Retry-After, never a reset (curl 52/56): {workers:?}"
        );
        let description = body["error_description"].as_str().unwrap_or_default();
        assert!(
            body["error"] == "too_many_requests"
                && description.contains(&format!("uid {uid} "))
                && description.contains("server.max_connections_per_caller is 4"),
            "{body}"
        );
        refused += 1;
    }
    assert!(refused >= 20, "the 20 workers beyond the cap of 4 are refused: {workers:?}");
    assert!(took < Duration::from_secs(10), "{took:?}");
    assert!(t.logs().contains("per-caller connection limit reached"), "{}", t.logs());
    // Another caller is not held up by this one's cap.
    assert_eq!(t.imds(Q).await.status(), 200);

    // Told to come back in a second, the retrying runner gets every token.
    let workers = parallel_curl_as("tokendcaller", &url, true).await;
    assert!(
        workers.iter().all(|(line, body)| line.starts_with("200 0 ") && body["access_token"].is_string()),
        "{workers:?}"
    );
}

/// 24 GETs of `url` (IMDS, `Metadata: true`) by `user` at once: curl `--parallel --parallel-immediate`,
/// a connection each; per transfer `<status> <curl exit code> retry-after=<header>` and the JSON body.
async fn parallel_curl_as(user: &str, url: &str, retry: bool) -> Vec<(String, serde_json::Value)> {
    use std::os::unix::fs::PermissionsExt;
    let out_dir = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(out_dir.path(), std::fs::Permissions::from_mode(0o777)).expect("chmod");
    let mut args: Vec<String> = ["-u", user, "--", "curl", "-s", "--no-progress-meter", "--max-time", "30"]
        .into_iter()
        .map(str::to_owned)
        .collect();
    args.extend(
        ["--parallel", "--parallel-immediate", "--parallel-max", "24", "-H", "Metadata: true"].map(str::to_owned),
    );
    if retry {
        args.extend(["--retry", "10"].map(str::to_owned));
    }
    args.extend(
        ["-w", "%{http_code} %{exitcode} retry-after=%header{retry-after} %{filename_effective}\\n"].map(str::to_owned),
    );
    for i in 0..24 {
        args.extend([url.to_owned(), "-o".to_owned(), out_dir.path().join(format!("{i}.json")).display().to_string()]);
    }
    let run = move || Command::new("runuser").args(&args).output().expect("runuser (util-linux) and curl are required");
    let out = tokio::task::spawn_blocking(run).await.expect("join");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let workers: Vec<(String, serde_json::Value)> = stdout
        .lines()
        .map(|l| {
            let (line, file) = l.rsplit_once(' ').unwrap_or((l, ""));
            let body = std::fs::read_to_string(file).ok().and_then(|b| serde_json::from_str(&b).ok());
            (line.to_owned(), body.unwrap_or_default())
        })
        .collect();
    assert_eq!(workers.len(), 24, "one line per worker: {stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    workers
}

/// `GET path` with `Host: host` on a new connection to `addr`: the status and the body.
async fn get_with_host(addr: std::net::SocketAddr, path: &str, host: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let request = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    s.write_all(request.as_bytes()).await.expect("write");
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut answer))
        .await
        .expect("answered in time")
        .expect("read");
    let status = answer.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("{answer:?}"));
    (status, answer.split_once("\r\n\r\n").map_or("", |(_, b)| b).to_owned())
}

/// DNS rebinding against what lists identity names and configured resources: a page whose own name
/// now points at this machine (`Host: attacker.example`) cannot read `/readyz` or the metrics. Loopback
/// names and IP literals (a kubelet probe sends the pod IP, Prometheus `<node-ip>:<port>` to a
/// `0.0.0.0` metrics listener) are answered, `/healthz` answers any Host, and `tokend health` works.
#[tokio::test(flavor = "multi_thread")]
async fn readyz_and_the_metrics_listener_refuse_a_rebound_host_name() {
    let idp = Idp::start(3600).await;
    let mut o = Opts::new(&idp).resources(&["https://storage.azure.com"]);
    let metrics_port = free_port();
    // As deploy/kubernetes/daemonset.yaml: every address, for a Prometheus that scrapes the node.
    o.extra.push_str(&format!("[metrics]\nlisten = \"0.0.0.0:{metrics_port}\"\nallow_non_loopback = true\n"));
    let t = Tokend::start(&o).await;
    t.wait_ready(Duration::from_secs(10)).await;
    let metrics = std::net::SocketAddr::from(([127, 0, 0, 1], metrics_port));
    let port = t.addr.port();

    for host in
        ["attacker.example", &format!("attacker.example:{port}"), "localhost.attacker.example", "127.0.0.1.nip.io"]
    {
        let (status, body) = get_with_host(t.addr, "/readyz", host).await;
        assert!(
            status == 400 && body.contains("Host") && !body.contains("storage"),
            "/readyz, Host {host}: {status} {body}"
        );
    }
    for host in ["attacker.example", &format!("attacker.example:{metrics_port}")] {
        let (status, body) = get_with_host(metrics, "/metrics", host).await;
        assert!(
            status == 400 && body.contains("Host") && !body.contains("tokend_"),
            "/metrics, Host {host}: {status} {body}"
        );
    }
    for host in
        [format!("127.0.0.1:{port}"), "localhost".to_owned(), format!("[::1]:{port}"), format!("10.0.0.7:{port}")]
    {
        let (status, body) = get_with_host(t.addr, "/readyz", &host).await;
        assert_eq!(status, 200, "/readyz, Host {host}: {body}");
    }
    for host in [format!("127.0.0.1:{metrics_port}"), "localhost".to_owned(), format!("10.0.0.7:{metrics_port}")] {
        let (status, body) = get_with_host(metrics, "/metrics", &host).await;
        assert!(status == 200 && body.contains("tokend_token_servable"), "/metrics, Host {host}: {status} {body}");
    }
    let (status, body) = get_with_host(t.addr, "/healthz", "attacker.example").await;
    assert_eq!(status, 200, "/healthz reveals nothing and answers probes with any Host: {body}");

    let out = Command::new(tokend_bin()).args(["health", "--config"]).arg(&t.config).output().expect("run");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && stdout.contains("ready"), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
}

/// A `metrics.listen` address that is in use fails start-up like any other listener: quickly, naming
/// `metrics.listen` and the address, and before any token is asked of the identity provider (the
/// metrics listener is bound with the token listeners, before the broker starts).
#[tokio::test(flavor = "multi_thread")]
async fn a_metrics_address_in_use_fails_start_up_before_any_idp_call() {
    let idp = Idp::start(3600).await;
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let taken_addr = taken.local_addr().expect("addr");
    let mut o = Opts::new(&idp).resources(&["https://storage.azure.com", "https://vault.azure.net"]);
    o.extra.push_str(&format!("[metrics]\nlisten = \"{taken_addr}\"\n"));
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(dir.path(), free_port(), &o);
    let started = Instant::now();
    let mut child = Command::new(tokend_bin())
        .args(["serve", "--config"])
        .arg(&config)
        .env("TOKEND_LOG", "info,tokend=debug")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn tokend");
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if started.elapsed() > Duration::from_secs(10) {
            let _ = child.kill();
            panic!("tokend kept running with its metrics address in use");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().expect("stderr"), &mut stderr).expect("read");
    assert!(!status.success(), "{stderr}");
    assert!(stderr.contains("metrics.listen") && stderr.contains(&taken_addr.to_string()), "{stderr}");
    // Anything already sent would have arrived by now.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(idp.token_requests().await, 0, "no token was asked for: {stderr}");
    drop(taken);
}
