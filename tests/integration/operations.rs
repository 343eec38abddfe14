//! Operations outside systemd (the real systemd runs in `systemd.rs`): the sd_notify protocol seen by a
//! notify socket of the test's own, `tokend reload` and `tokend health`, socket activation through
//! `systemd-socket-activate`, and the Prometheus metrics checked value by value and by `promtool`.

use std::os::unix::net::UnixDatagram;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::*;

const STORAGE: &str = "https://storage.azure.com";

/// Datagrams received on `sock` within `within`, until one contains `until`.
fn notifications(sock: &UnixDatagram, until: &str, within: Duration) -> Vec<String> {
    let deadline = Instant::now() + within;
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        sock.set_read_timeout(Some(Duration::from_millis(100))).expect("timeout");
        if let Ok(n) = sock.recv(&mut buf) {
            let text = String::from_utf8_lossy(&buf[..n]).into_owned();
            let done = text.contains(until);
            out.push(text);
            if done {
                break;
            }
        }
    }
    out
}

fn tokend(args: &[&str]) -> std::process::Output {
    Command::new(tokend_bin()).args(args).output().expect("run tokend")
}

/// READY=1 only once the configured token is cached, STATUS= saying what it waits for; RELOADING=1 with
/// MONOTONIC_USEC then READY=1 around a reload; WATCHDOG=1 while healthy; STOPPING=1 at SIGTERM. And
/// `tokend reload` reports the verdict: applied (exit 0) or rejected (exit 1, still serving).
#[tokio::test(flavor = "multi_thread")]
async fn tokend_speaks_sd_notify_and_tokend_reload_reports_the_verdict() {
    let idp = Idp::start(3600).await;
    idp.fault(serde_json::json!({"delay_ms": 1500, "count": 1})).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let notify_path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&notify_path).expect("notify socket");
    let runtime = dir.path().join("run");
    std::fs::create_dir(&runtime).expect("run dir");
    let o = Opts::new(&idp).resources(&[STORAGE]);
    let notify = notify_path.to_str().expect("utf8").to_owned();
    let run = runtime.to_str().expect("utf8").to_owned();
    let env = [("NOTIFY_SOCKET", notify.as_str()), ("WATCHDOG_USEC", "600000"), ("RUNTIME_DIRECTORY", run.as_str())];
    let mut t = Tokend::start_with_env(&o, &env).await;

    let start = notifications(&sock, "READY=1", Duration::from_secs(15));
    let ready_at = start.iter().position(|m| m.contains("READY=1")).expect("READY=1");
    assert!(
        start[..ready_at].iter().any(|m| m.contains(
            "STATUS=waiting for 1 of 1 tokens: https://storage.azure.com for identity default (first request in flight)"
        )),
        "STATUS says what start-up waits for: {start:?}"
    );
    assert!(start[ready_at].contains("STATUS=serving on 127.0.0.1:"), "{start:?}");
    assert_eq!(idp.token_requests().await, 1, "READY=1 came after the (delayed) token");
    let pings = notifications(&sock, "never", Duration::from_millis(1300));
    assert!(pings.iter().filter(|m| m.contains("WATCHDOG=1")).count() >= 2, "a ping every 300 ms: {pings:?}");

    // A good reload: exit 0, RELOADING=1 + MONOTONIC_USEC, then READY=1.
    let pid = t.pid().to_string();
    let out = tokend(&["reload", "--pid", &pid, "--state-dir", &run]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("configuration reloaded"), "{out:?}");
    let around = notifications(&sock, "READY=1", Duration::from_secs(5));
    let reloading = around.iter().find(|m| m.contains("RELOADING=1")).expect("RELOADING=1");
    assert!(reloading.contains("MONOTONIC_USEC="), "{reloading}");
    assert!(around.last().is_some_and(|m| m.contains("READY=1")), "{around:?}");

    // A broken configuration: rejected, exit 1 with the reason, and tokend keeps serving.
    let good = std::fs::read_to_string(&t.config).expect("config");
    std::fs::write(&t.config, format!("{good}\n[tokens]\nbogus = 1\n")).expect("break it");
    let out = tokend(&["reload", "--pid", &pid, "--state-dir", &run]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("configuration rejected") && stderr.contains("tokend.toml"), "{stderr}");
    assert_eq!(t.imds(&format!("api-version=2018-02-01&resource={STORAGE}")).await.status(), 200);
    let after = notifications(&sock, "READY=1", Duration::from_secs(5));
    assert!(after.iter().any(|m| m.contains("reload rejected")), "STATUS says so: {after:?}");
    std::fs::write(&t.config, good).expect("restore");

    // Without a pid or state directory: a usage error.
    let out = Command::new(tokend_bin()).args(["reload"]).env_remove("MAINPID").output().expect("run");
    assert_eq!(out.status.code(), Some(64), "{}", String::from_utf8_lossy(&out.stderr));

    assert!(t.terminate().success());
    let end = notifications(&sock, "STOPPING=1", Duration::from_secs(5));
    assert!(end.iter().any(|m| m.contains("STOPPING=1")), "{end:?}");
}

/// `tokend health`: one line, exit 0 when every configured token is cached, 1 otherwise or when nothing
/// answers; never a token.
#[tokio::test(flavor = "multi_thread")]
async fn tokend_health_answers_for_scripts_and_healthchecks() {
    let idp = Idp::start(3600).await;
    let t = Tokend::start(&Opts::new(&idp).resources(&[STORAGE])).await;
    t.wait_ready(Duration::from_secs(10)).await;
    let config = t.config.to_str().expect("utf8");
    let out = tokend(&["health", "--config", config]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(stdout, "ready: 1 configured tokens cached\n");
    let out = tokend(&["health", "--live", "--config", config]);
    assert_eq!((out.status.code(), String::from_utf8_lossy(&out.stdout).as_ref()), (Some(0), "alive\n"));

    // Not ready: the IdP refuses every request for a second identity's resource.
    let idp2 = Idp::start(3600).await;
    idp2.fault(serde_json::json!({"status": 503, "count": 1000})).await;
    let t2 = Tokend::start(&Opts::new(&idp2).resources(&[STORAGE])).await;
    let out = tokend(&["health", "--config", t2.config.to_str().expect("utf8")]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("not ready: 1 of 1 configured tokens pending: default https://storage.azure.com"),
        "{stderr}"
    );
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    let live = tokend(&["health", "--live", "--config", t2.config.to_str().expect("utf8")]);
    assert!(live.status.success(), "alive even when not ready: {live:?}");
    drop(t2);
    let out = tokend(&["health", "--config", &format!("{}", t.dir.path().join("missing.toml").display())]);
    assert_eq!(out.status.code(), Some(64), "a missing config is a usage error");
}

/// Socket activation: a socket passed by the service manager (here `systemd-socket-activate`, which
/// speaks the same LISTEN_FDS protocol) is served instead of binding; one the configuration does not
/// name is a configuration error (exit 64).
#[tokio::test(flavor = "multi_thread")]
async fn sockets_passed_by_systemd_are_served_and_unnamed_ones_refused() {
    let idp = Idp::start(3600).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (port, passed) = (free_port(), free_port());
    let config = write_config(dir.path(), port, &Opts::new(&idp));
    let text = std::fs::read_to_string(&config).expect("config");
    let both = text.replace(
        &format!("listen = [\"127.0.0.1:{port}\"]"),
        &format!("listen = [\"127.0.0.1:{port}\", \"127.0.0.1:{passed}\"]"),
    );
    std::fs::write(&config, both).expect("config");
    let log = dir.path().join("tokend.log");
    let out = std::fs::File::create(&log).expect("log");
    let mut child = Command::new("systemd-socket-activate")
        .args(["-l", &format!("127.0.0.1:{passed}"), tokend_bin(), "serve", "--config"])
        .arg(&config)
        .env("TOKEND_LOG", "info")
        .stdout(out.try_clone().expect("dup"))
        .stderr(out)
        .spawn()
        .expect("systemd-socket-activate (Debian package systemd) is required");
    // The first connection to the passed socket starts tokend, which then answers it.
    let deadline = Instant::now() + Duration::from_secs(15);
    let body: Value = loop {
        let r = http()
            .get(format!(
                "http://127.0.0.1:{passed}/metadata/identity/oauth2/token?api-version=2018-02-01&resource={STORAGE}"
            ))
            .header("Metadata", "true")
            .send()
            .await;
        if let Ok(r) = r {
            break r.json().await.expect("json");
        }
        assert!(Instant::now() < deadline, "{}", std::fs::read_to_string(&log).unwrap_or_default());
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(body["access_token"].is_string(), "{body}");
    let logs = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(logs.contains("listening on a socket passed by systemd"), "{logs}");
    let _ = child.kill();
    let _ = child.wait();

    // A passed socket the configuration does not name.
    let other = free_port();
    let mut child = Command::new("systemd-socket-activate")
        .args(["-l", &format!("127.0.0.1:{other}"), tokend_bin(), "serve", "--config"])
        .arg(&config)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("systemd-socket-activate");
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        // Knocks until systemd-socket-activate listens; the first connection starts tokend.
        let _ = std::net::TcpStream::connect(("127.0.0.1", other));
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        assert!(Instant::now() < deadline, "tokend did not refuse the unnamed socket");
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().expect("stderr"), &mut stderr).expect("read");
    assert_eq!(status.code(), Some(64), "{stderr}");
    assert!(stderr.contains(&format!("127.0.0.1:{other}")) && stderr.contains("server.listen"), "{stderr}");
}

/// `[metrics]`: Prometheus text on its own listener, values that match known traffic, and `promtool
/// check metrics` accepts it.
#[tokio::test(flavor = "multi_thread")]
async fn metrics_count_known_traffic_and_promtool_accepts_them() {
    let idp = Idp::start(3600).await;
    let mut o = Opts::new(&idp).resources(&[STORAGE]);
    let metrics_port = free_port();
    o.extra.push_str(&format!("[metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n"));
    let t = Tokend::start(&o).await;
    t.wait_ready(Duration::from_secs(10)).await;
    for _ in 0..3 {
        assert_eq!(t.imds(&format!("api-version=2018-02-01&resource={STORAGE}")).await.status(), 200);
    }
    assert_eq!(t.imds("api-version=2018-02-01&resource=https://vault.azure.net").await.status(), 200);
    assert_eq!(t.app_service("api-version=2019-08-01&resource=https://vault.azure.net").await.status(), 200);
    assert_eq!(
        http().get(t.url("/msi/token?api-version=2019-08-01&resource=x")).send().await.expect("req").status(),
        401
    );
    assert_eq!(http().get(t.url("/nope")).send().await.expect("req").status(), 404);
    let forbidden = t.imds("api-version=2018-02-01&resource=https://forbidden-1.example").await;
    assert_eq!(forbidden.status(), 400);

    let text = http()
        .get(format!("http://127.0.0.1:{metrics_port}/metrics"))
        .send()
        .await
        .expect("scrape")
        .text()
        .await
        .expect("text");
    let value = |series: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')))
            .unwrap_or_else(|| panic!("{series} missing from\n{text}"))
            .parse()
            .expect("a number")
    };
    assert_eq!(value("tokend_requests_total{route=\"imds\",dialect=\"imds\",status=\"200\"}"), 4.0);
    assert_eq!(value("tokend_requests_total{route=\"imds\",dialect=\"imds\",status=\"400\"}"), 1.0);
    assert_eq!(value("tokend_requests_total{route=\"msi\",dialect=\"app_service\",status=\"200\"}"), 1.0);
    assert_eq!(value("tokend_requests_total{route=\"msi\",dialect=\"app_service\",status=\"401\"}"), 1.0);
    assert_eq!(value("tokend_requests_total{route=\"other\",dialect=\"imds\",status=\"404\"}"), 1.0);
    assert_eq!(value("tokend_token_requests_total{result=\"hit\"}"), 4.0, "3 configured + 1 cached vault");
    assert_eq!(value("tokend_token_requests_total{result=\"fetch\"}"), 1.0, "vault, the first time");
    assert_eq!(value("tokend_upstream_request_duration_seconds_count"), 3.0, "storage, vault, forbidden");
    assert_eq!(value("tokend_upstream_errors_total{kind=\"bad_resource\"}"), 1.0);
    assert_eq!(value("tokend_refresh_failures_total{identity=\"default\"}"), 1.0);
    assert_eq!(value("tokend_token_servable{identity=\"default\",resource=\"https://storage.azure.com\"}"), 1.0);
    let remaining =
        value("tokend_token_remaining_seconds{identity=\"default\",resource=\"https://storage.azure.com\"}");
    assert!(remaining > 3000.0 && remaining <= 3600.0, "{remaining}");
    assert_eq!(value("tokend_on_demand_entries"), 2.0, "vault and the forbidden one");
    assert!(!text.contains("vault.azure.net"), "on-demand resources never become label values");
    assert!(!text.contains("eyJ"), "no token");

    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus) is required; scripts/test.sh installs it");
    std::io::Write::write_all(&mut promtool.stdin.take().expect("stdin"), text.as_bytes()).expect("write");
    let out = promtool.wait_with_output().expect("promtool");
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // The token listener does not serve metrics.
    assert_eq!(http().get(t.url("/metrics")).send().await.expect("req").status(), 404);
}

/// A caller asking for a configured resource spelt with a different trailing slash is a separate cache
/// entry: tokend says so in its log, and `tokend check` warns about a pinned `https://host/`.
#[tokio::test(flavor = "multi_thread")]
async fn a_trailing_slash_mismatch_with_a_pinned_resource_is_named() {
    let idp = Idp::start(3600).await;
    let t = Tokend::start(&Opts::new(&idp).resources(&["https://storage.azure.com/"])).await;
    t.wait_ready(Duration::from_secs(10)).await;
    assert_eq!(t.imds(&format!("api-version=2018-02-01&resource={STORAGE}")).await.status(), 200);
    let logs = t.logs();
    assert!(
        logs.contains("different trailing slash") && logs.contains("add https://storage.azure.com to resources"),
        "{logs}"
    );
    let out = tokend(&["check", "--config", t.config.to_str().expect("utf8")]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("warn  identity \"default\" pins https://storage.azure.com/ with a trailing slash"),
        "{stdout}"
    );
}
