//! Who is asking. The unix socket listener: the same routes over `[server] unix_socket` (with
//! `Host: localhost`, as `curl --unix-socket` sends), its mode and group, a stale socket from a crashed
//! run replaced and removed at shutdown, anything else at the path a configuration error before any
//! port is bound. Kernel-verified callers: a real user (`useradd`) over TCP and the unix socket. And a
//! process that even its own user cannot read.

use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::*;

const Q: &str = "api-version=2018-02-01&resource=https://storage.azure.com";

/// One HTTP/1.1 GET over the unix socket at `path`; the status and the JSON body.
async fn unix_get(path: &Path, target: &str, headers: &[(&str, &str)]) -> (u16, Value) {
    let mut stream = tokio::net::UnixStream::connect(path).await.expect("connect to the unix socket");
    let mut request = format!("GET {target} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), stream.read_to_end(&mut answer))
        .await
        .expect("answered in time")
        .expect("read");
    let text = String::from_utf8(answer).expect("utf8");
    let status = text.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("status: {text}"));
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

/// A group of this host other than root's, as (name, gid).
fn some_group() -> (String, u32) {
    let groups = std::fs::read_to_string("/etc/group").expect("/etc/group");
    groups
        .lines()
        .filter_map(|l| {
            let mut f = l.split(':');
            let name = f.next()?.to_owned();
            let gid = f.nth(1)?.parse::<u32>().ok()?;
            Some((name, gid))
        })
        .find(|(_, gid)| *gid != 0)
        .expect("a non-root group in /etc/group")
}

/// Writes a config with `server_extra` added to `[server]`.
pub fn config_with(dir: &Path, port: u16, o: &Opts, server_extra: &str) -> PathBuf {
    let config = write_config(dir, port, o);
    let text = std::fs::read_to_string(&config).expect("read");
    let anchor = "identity_header_file = \"identity-header\"\n";
    std::fs::write(&config, text.replace(anchor, &format!("{anchor}{server_extra}"))).expect("write");
    config
}

#[tokio::test(flavor = "multi_thread")]
async fn the_unix_socket_serves_both_dialects_with_its_mode_and_group() {
    let idp = Idp::start(3600).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("tokend.sock");
    // A stale socket left behind by a crashed run: bound, and nobody accepting on it.
    drop(std::os::unix::net::UnixListener::bind(&socket).expect("bind"));
    let (group, gid) = some_group();
    let port = free_port();
    let config = config_with(
        dir.path(),
        port,
        &Opts::new(&idp),
        &format!("unix_socket = \"tokend.sock\"\nsocket_group = \"{group}\"\n"),
    );
    let mut t = Tokend::spawn(dir, config, port, &[]).await;

    let meta = std::fs::metadata(&socket).expect("the socket exists");
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o660, "default socket_mode");
    assert_eq!(meta.gid(), gid, "socket_group {group}");
    assert!(t.logs().contains("replacing a stale socket"), "{}", t.logs());

    let imds = format!("/metadata/identity/oauth2/token?{Q}");
    let (status, body) = unix_get(&socket, &imds, &[("Metadata", "true")]).await;
    assert_eq!(status, 200, "{body}\n{}", t.logs());
    assert_eq!(jwt_claims(body["access_token"].as_str().expect("token"))["client_id"], CLIENT_ID);
    let (status, body) = unix_get(&socket, &imds, &[]).await;
    assert_eq!((status, body["error"].as_str()), (400, Some("invalid_request")), "the probe still gets its 400");
    let header = t.identity_header();
    let app_service = "/msi/token?api-version=2019-08-01&resource=https://storage.azure.com";
    let (status, body) = unix_get(&socket, app_service, &[("X-IDENTITY-HEADER", &header)]).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(unix_get(&socket, "/healthz", &[]).await.0, 200);
    assert_eq!(t.imds(Q).await.status(), 200, "TCP keeps serving beside it");

    assert!(t.terminate().success());
    assert!(!socket.exists(), "the socket is removed at shutdown");
}

#[test]
fn anything_but_a_socket_at_the_path_is_a_configuration_error_before_binding() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("tokend.sock"), "not a socket").expect("write");
    let port = free_port();
    let o = Opts::for_url("http://127.0.0.1:9/t/oauth2/v2.0/token");
    let cases = [
        ("unix_socket = \"tokend.sock\"\n", "not a socket"),
        ("unix_socket = \"missing/tokend.sock\"\n", "does not exist"),
        ("unix_socket = \"other.sock\"\nsocket_mode = \"0999\"\n", "server.socket_mode"),
        ("unix_socket = \"other.sock\"\nsocket_group = \"no-such-group-here\"\n", "server.socket_group"),
        ("socket_mode = \"0600\"\n", "only applies with server.unix_socket"),
    ];
    for (toml, needle) in cases {
        let config = config_with(dir.path(), port, &o, toml);
        let out = Command::new(tokend_bin()).args(["serve", "--config"]).arg(&config).output().expect("run");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{toml}: {stderr}");
        assert!(stderr.contains(needle) && stderr.contains("tokend.toml"), "{toml}: {stderr}");
        assert!(std::net::TcpListener::bind(("127.0.0.1", port)).is_ok(), "{toml}: no port was bound");
    }
    assert_eq!(std::fs::read_to_string(dir.path().join("tokend.sock")).expect("kept"), "not a socket");
}

/// A local user of this host for the test, created if missing (the suite runs as root); its uid.
pub fn test_user(name: &str) -> u32 {
    let uid = |name: &str| {
        let out = Command::new("id").args(["-u", name]).output().expect("id");
        out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().parse::<u32>().expect("uid"))
    };
    if let Some(u) = uid(name) {
        return u;
    }
    let out = Command::new("useradd")
        .args(["--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name])
        .output()
        .expect("useradd (passwd package) is required");
    assert!(
        out.status.success(),
        "useradd {name} (the suite must run as root): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    uid(name).expect("the new user")
}

/// `curl ARGS` run as `user` (util-linux runuser); curl's stdout.
pub fn curl_as(user: &str, args: &[&str]) -> String {
    let out = Command::new("runuser")
        .args(["-u", user, "--", "curl", "-s", "--max-time", "20"])
        .args(args)
        .output()
        .expect("runuser (util-linux) and curl are required");
    assert!(out.status.success(), "curl {args:?} as {user}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn tokend_knows_which_local_user_is_asking_over_tcp_and_the_unix_socket() {
    let idp = Idp::start(3600).await;
    let uid = test_user("tokendcaller");
    let dir = tempfile::tempdir().expect("tempdir");
    // Let the test user reach the socket in the temporary directory (the secret file stays 0600).
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711)).expect("chmod");
    let socket = dir.path().join("tokend.sock");
    let port = free_port();
    let config =
        config_with(dir.path(), port, &Opts::new(&idp), "unix_socket = \"tokend.sock\"\nsocket_mode = \"0666\"\n");
    let t = Tokend::spawn(dir, config, port, &[]).await;

    let imds = format!("/metadata/identity/oauth2/token?{Q}");
    let tcp = curl_as("tokendcaller", &["-H", "Metadata: true", &t.url(&imds)]);
    assert!(tcp.contains("access_token"), "{tcp}\n{}", t.logs());
    let socket_arg = socket.to_str().expect("utf8");
    let unix = curl_as(
        "tokendcaller",
        &["--unix-socket", socket_arg, "-H", "Metadata: true", &format!("http://localhost{imds}")],
    );
    assert!(unix.contains("access_token"), "{unix}\n{}", t.logs());
    assert_eq!(t.imds(Q).await.status(), 200);

    let logs = t.logs();
    let served: Vec<&str> = logs.lines().filter(|l| l.contains("token served")).collect();
    assert_eq!(served.len(), 3, "{logs}");
    assert!(
        served[0].contains(&format!("caller=uid {uid} ")) || served[0].ends_with(&format!("caller=uid {uid}")),
        "TCP: {}",
        served[0]
    );
    assert!(served[1].contains(&format!("caller=uid {uid} (pid ")), "unix socket, with the pid: {}", served[1]);
    assert!(served[2].contains("caller=uid 0"), "this test (root) over TCP: {}", served[2]);
}

/// Whether `user` can read `/proc/PID/environ` (as a same-uid process could read `/proc/PID/mem`).
fn can_read_environ(user: &str, pid: u32) -> bool {
    Command::new("runuser")
        .args(["-u", user, "--", "cat", &format!("/proc/{pid}/environ")])
        .output()
        .expect("runuser (util-linux) is required")
        .status
        .success()
}

#[tokio::test(flavor = "multi_thread")]
async fn processes_of_the_same_user_cannot_read_tokends_memory() {
    use std::os::unix::process::CommandExt;
    let uid = test_user("tokendcaller");
    let as_user = |cmd: &mut Command| {
        cmd.uid(uid).gid(uid_gid(uid)).stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null());
    };
    // Control: an ordinary process of that user is readable by the user, so the check can tell.
    let mut sleep = Command::new("sleep");
    as_user(sleep.arg("30"));
    let mut control = sleep.spawn().expect("sleep");
    assert!(can_read_environ("tokendcaller", control.id()), "the control process is readable");
    let _ = control.kill();
    let _ = control.wait();

    let port = free_port();
    let mut dev = Command::new(tokend_bin());
    as_user(dev.args(["dev", "--listen", &format!("127.0.0.1:{port}")]));
    let mut child = dev.spawn().expect("tokend dev");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !http().get(format!("http://127.0.0.1:{port}/healthz")).send().await.is_ok_and(|r| r.status() == 200) {
        assert!(std::time::Instant::now() < deadline, "tokend dev did not come up as {uid}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let readable = can_read_environ("tokendcaller", child.id());
    let _ = child.kill();
    let _ = child.wait();
    assert!(!readable, "tokend is not dumpable: its own user cannot read /proc/<pid>/environ or mem");
}

/// The primary group of `uid`.
fn uid_gid(uid: u32) -> u32 {
    let out = Command::new("id").args(["-g", &uid.to_string()]).output().expect("id");
    String::from_utf8_lossy(&out.stdout).trim().parse().expect("gid")
}

#[tokio::test(flavor = "multi_thread")]
async fn access_rules_allow_and_deny_per_local_user_over_tcp_and_the_unix_socket() {
    let idp = Idp::start(3600).await;
    let (allowed, other) = (test_user("tokendcaller"), test_user("tokendcaller2"));
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711)).expect("chmod");
    let socket = dir.path().join("tokend.sock");
    let port = free_port();
    let mut o = Opts::new(&idp);
    o.extra = "[access]\ndefault = \"deny\"\n[[access.rule]]\nusers = [\"tokendcaller\"]\nidentities = [\"default\"]\nresources = [\"https://storage.azure.com\"]\n".into();
    let config = config_with(dir.path(), port, &o, "unix_socket = \"tokend.sock\"\nsocket_mode = \"0666\"\n");
    let t = Tokend::spawn(dir, config, port, &[]).await;
    let unix_url =
        |q: &str| format!("http://localhost/metadata/identity/oauth2/token?api-version=2018-02-01&resource={q}");
    let socket_arg = socket.to_str().expect("utf8");
    let ask = |user: &str, resource: &str, unix: bool| {
        let mut args = vec!["-H".to_owned(), "Metadata: true".to_owned()];
        if unix {
            args.extend(["--unix-socket".to_owned(), socket_arg.to_owned(), unix_url(resource)]);
        } else {
            args.push(t.imds_url(resource));
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        serde_json::from_str::<Value>(&curl_as(user, &args)).expect("json")
    };
    for unix in [false, true] {
        let v = ask("tokendcaller", "https://storage.azure.com", unix);
        assert!(v["access_token"].is_string(), "unix={unix}: {v}\n{}", t.logs());
        let v = ask("tokendcaller", "https://vault.azure.net", unix);
        assert_eq!(v["error"], "access_denied", "unix={unix}: {v}");
        let d = v["error_description"].as_str().expect("description");
        assert!(d.contains("access.rule[0]") && d.contains(&format!("uid {allowed}")), "{d}");
        let v = ask("tokendcaller2", "https://storage.azure.com", unix);
        assert_eq!(v["error"], "access_denied", "unix={unix}: {v}");
        let d = v["error_description"].as_str().expect("description");
        assert!(d.contains(&format!("no access.rule matches uid {other}")), "{d}");
    }
    // This test runs as root, for which no rule exists either: 403 in each dialect's shape.
    let r = t.imds(Q).await;
    assert_eq!(r.status(), 403);
    let r = t.app_service("api-version=2019-08-01&resource=https://storage.azure.com").await;
    assert_eq!(r.status(), 403);
    assert_eq!(r.json::<Value>().await.expect("json")["statusCode"], 403);
    // Guard headers come first: the header-less probe still gets its 400.
    let probe = http().get(t.imds_url("https://storage.azure.com")).send().await.expect("probe");
    assert_eq!(probe.status(), 400);
    assert_eq!(idp.token_requests().await, 1, "only the allowed request reached the IdP");
}

/// Bounded work per caller, with the default configuration: one uid's burst of 200 distinct resources
/// costs at most `tokens.max_on_demand_per_caller` (64) IdP calls and the rest get 429; 50 resources the
/// IdP rejects cost 50 calls and then none while nobody asks; another uid is served throughout.
#[tokio::test(flavor = "multi_thread")]
async fn one_caller_cannot_make_tokend_do_unbounded_work_upstream() {
    let idp = Idp::start(3600).await;
    test_user("tokendcaller");
    let t = std::sync::Arc::new(Tokend::start(&Opts::new(&idp)).await);
    let burst: Vec<_> = (0..200)
        .map(|i| {
            let t = t.clone();
            tokio::spawn(async move {
                t.imds(&format!("api-version=2018-02-01&resource=https://r{i}.example")).await.status()
            })
        })
        .collect();
    let mut statuses = std::collections::BTreeMap::new();
    for b in burst {
        *statuses.entry(b.await.expect("join").as_u16()).or_insert(0) += 1;
    }
    let calls = idp.token_requests().await;
    eprintln!("200 distinct resources from one uid: {statuses:?}, {calls} IdP calls");
    assert_eq!(statuses.get(&200), Some(&64), "{statuses:?}");
    assert_eq!(statuses.get(&429), Some(&136), "{statuses:?}");
    assert!(calls <= 64, "{calls} IdP calls");
    let served = |user: &str, resource: &str| {
        let url = t.imds_url(resource);
        let v: Value = serde_json::from_str(&curl_as(user, &["-H", "Metadata: true", &url])).expect("json");
        v
    };
    assert!(served("tokendcaller", "https://storage.azure.com")["access_token"].is_string(), "another uid is served");

    for i in 0..50 {
        let v = served("tokendcaller", &format!("https://forbidden-{i}.example"));
        assert_eq!(v["error"], "invalid_resource", "{v}");
    }
    let after_rejections = idp.token_requests().await;
    assert_eq!(after_rejections, calls + 1 + 50, "one call per rejected resource");
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(idp.token_requests().await, after_rejections, "no IdP calls in 60 s without callers");
    assert!(served("tokendcaller", "https://storage.azure.com")["access_token"].is_string(), "still served");
}

/// `tokens.on_demand_rate`: one uid adding new resources faster than the rate gets 429 with an integer
/// `Retry-After` and costs no IdP call, while what it already has is served and another uid adds its own.
#[tokio::test(flavor = "multi_thread")]
async fn one_caller_cannot_churn_through_new_resources() {
    let idp = Idp::start(3600).await;
    test_user("tokendcaller");
    let mut o = Opts::new(&idp);
    o.tokens_extra = "on_demand_rate = \"5/m\"\n".into();
    let t = Tokend::start(&o).await;
    let mut statuses = std::collections::BTreeMap::new();
    let mut retry_after = Vec::new();
    for i in 0..12 {
        let r = t.imds(&format!("api-version=2018-02-01&resource=https://churn{i}.example")).await;
        *statuses.entry(r.status().as_u16()).or_insert(0) += 1;
        if r.status() == 429 {
            retry_after.push(r.headers()["retry-after"].to_str().expect("ascii").parse::<u64>().expect("integer"));
            let body: Value = r.json().await.expect("json");
            assert!(body["error_description"].as_str().is_some_and(|d| d.contains("tokens.on_demand_rate")), "{body}");
        }
    }
    eprintln!("12 new resources from one uid at 5/m: {statuses:?}, Retry-After {retry_after:?}");
    assert_eq!((statuses.get(&200), statuses.get(&429)), (Some(&5), Some(&7)), "{statuses:?}");
    assert!(retry_after.iter().all(|s| (1..=12).contains(s)), "{retry_after:?}");
    assert_eq!(idp.token_requests().await, 5, "refused resources cost no IdP call");
    assert_eq!(t.imds("api-version=2018-02-01&resource=https://churn0.example").await.status(), 200, "what it has");
    let other = curl_as("tokendcaller", &["-H", "Metadata: true", &t.imds_url("https://churn11.example")]);
    assert!(other.contains("access_token"), "another uid adds its own: {other}");
}

/// `access.rate_limit`: one caller's burst gets 429 with an integer `Retry-After` beyond its bucket, while
/// another uid is served.
#[tokio::test(flavor = "multi_thread")]
async fn one_callers_burst_is_rate_limited_while_another_is_served() {
    let idp = Idp::start(3600).await;
    test_user("tokendcaller");
    let mut o = Opts::new(&idp);
    o.extra = "[access]\nrate_limit = \"5/s\"\n".into();
    let t = Tokend::start(&o).await;
    let (mut ok, mut limited) = (0, 0);
    for _ in 0..30 {
        let r = t.imds(Q).await;
        match r.status().as_u16() {
            200 => ok += 1,
            429 => {
                let retry = r.headers()["retry-after"].to_str().expect("ascii").parse::<u64>().expect("integer");
                assert!(retry >= 1, "{retry}");
                assert_eq!(r.json::<Value>().await.expect("json")["error"], "too_many_requests");
                limited += 1;
            }
            other => panic!("unexpected {other}: {}", t.logs()),
        }
    }
    eprintln!("30 back-to-back requests at 5/s: {ok} served, {limited} rate-limited");
    assert!((5..=15).contains(&ok) && limited >= 15, "{ok} served, {limited} limited");
    let other = curl_as("tokendcaller", &["-H", "Metadata: true", &t.imds_url("https://storage.azure.com")]);
    assert!(other.contains("access_token"), "another uid has its own budget: {other}");
}

/// `[audit]`: one JSON line per decision, field by field, and never a token or the secret.
#[tokio::test(flavor = "multi_thread")]
async fn every_decision_is_audited_without_tokens() {
    let idp = Idp::start(3600).await;
    let mut o = Opts::new(&idp);
    o.extra = "[access]\nrate_limit = \"4/m\"\n[[access.rule]]\nuids = [0]\nidentities = [\"default\"]\nresources = [\"https://storage.azure.com\", \"https://forbidden-1.example\"]\n[audit]\npath = \"audit.jsonl\"\n".into();
    let t = Tokend::start(&o).await;
    let issued = t.imds(Q).await.json::<Value>().await.expect("json");
    let token = issued["access_token"].as_str().expect("token").to_owned();
    assert_eq!(t.imds(Q).await.status(), 200);
    assert_eq!(t.imds("api-version=2018-02-01&resource=https://vault.azure.net").await.status(), 403);
    assert_eq!(t.imds("api-version=2018-02-01&resource=https://forbidden-1.example").await.status(), 400);
    assert_eq!(
        t.imds(Q).await.status(),
        429,
        "the fifth request within a minute (4/m; the denied and the invalid one took from the budget too)"
    );
    // Another local user, over TCP with curl: the line names its process, found from the socket.
    let uid = test_user("tokendcaller");
    let other = curl_as("tokendcaller", &["-H", "Metadata: true", &t.imds_url("https://storage.azure.com")]);
    assert!(other.contains("access_token"), "{other}");
    let path = t.dir.path().join("audit.jsonl");
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let text = loop {
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        if text.lines().count() >= 6 || std::time::Instant::now() > deadline {
            break text;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(!text.contains(&token) && !text.contains(SECRET), "no token, no secret in the audit log");
    let lines: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).expect("a JSON line")).collect();
    assert_eq!(lines.len(), 6, "{text}");
    eprintln!("{text}");
    let field = |i: usize, k: &str| lines[i][k].clone();
    let expected = [
        ("issued", 200, Some("fetch")),
        ("issued", 200, Some("hit")),
        ("denied", 403, None),
        ("error", 400, None),
        ("rate_limited", 429, None),
    ];
    for (i, (decision, status, cache)) in expected.into_iter().enumerate() {
        assert_eq!(field(i, "decision"), decision, "line {i}: {}", lines[i]);
        assert_eq!(field(i, "status"), status, "line {i}");
        assert_eq!(field(i, "cache").as_str(), cache, "line {i}");
        // This test process asked (in-process HTTP client): its pid and executable, found from the socket.
        // The process fields are best effort (looked up off the request path, within budgets): when
        // they are there they name this process, and when not the line says why.
        let me = std::env::current_exe().expect("exe");
        let caller = field(i, "caller");
        assert_eq!(
            (&caller["uid"], &caller["user"], &caller["transport"]),
            (&0.into(), &"root".into(), &"tcp".into()),
            "line {i}"
        );
        if caller["pid"].is_null() {
            assert!(
                ["not_looked_up", "late", "not_found"].contains(&caller["process"].as_str().unwrap_or("")),
                "line {i}: {caller}"
            );
        } else {
            assert_eq!((&caller["pid"], caller["exe"].as_str()), (&std::process::id().into(), me.to_str()), "line {i}");
        }
        assert_eq!((field(i, "dialect"), field(i, "identity")), ("imds".into(), "default".into()), "line {i}");
        assert!(field(i, "latency_ms").as_f64().is_some_and(|ms| ms >= 0.0), "line {i}");
        assert!(humantime::parse_rfc3339(field(i, "time").as_str().expect("time")).is_ok(), "line {i}");
        assert_eq!(field(i, "reason").is_string(), decision != "issued", "line {i}");
    }
    assert_eq!(field(0, "rule"), 0);
    assert_eq!(field(0, "resource"), "https://storage.azure.com");
    assert!(field(0, "token").as_str().is_some_and(|f| f.starts_with("sha256:") && f.len() == 19), "{}", lines[0]);
    assert_eq!(field(0, "token"), field(1, "token"), "the same cached token");
    assert!(field(2, "reason").as_str().is_some_and(|r| r.contains("access.rule[0]")), "{}", lines[2]);
    assert!(lines[..5].iter().any(|l| l["caller"]["pid"] == std::process::id()), "this process is named at least once");
    let curl = &lines[5]["caller"];
    assert_eq!((&curl["uid"], &curl["user"]), (&uid.into(), &"tokendcaller".into()), "{curl}");
    if curl["pid"].is_u64() {
        assert_eq!(curl["command"], "curl", "{curl}");
        assert!(curl["exe"].as_str().is_some_and(|e| e.ends_with("/curl")), "{curl}");
    } else {
        eprintln!("curl's process was not looked up in time (best effort): {curl}");
    }
    assert_eq!(lines[5]["decision"], "issued");
}

/// `server.max_connections_per_caller`: one uid's idle connections cannot use up the listener; its next
/// connection is answered 429 at once (tests/integration/limits.rs has the details) while another uid is
/// served, and it gets its place back when one closes.
#[tokio::test(flavor = "multi_thread")]
async fn one_caller_cannot_hold_every_connection() {
    use tokio::net::TcpStream;
    let idp = Idp::start(3600).await;
    test_user("tokendcaller");
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let config = config_with(dir.path(), port, &Opts::new(&idp), "max_connections_per_caller = 3\n");
    let t = Tokend::spawn(dir, config, port, &[]).await;
    // Tokend::spawn's health checks may still hold pooled connections: wait until they idle out.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut idle = Vec::new();
    for _ in 0..3 {
        idle.push(TcpStream::connect(t.addr).await.expect("connect"));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut extra = TcpStream::connect(t.addr).await.expect("connect");
    extra.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").await.expect("write");
    let mut answer = String::new();
    let read = tokio::time::timeout(Duration::from_secs(5), extra.read_to_string(&mut answer)).await;
    read.expect("answered and closed at once").expect("an answer, not a reset");
    assert!(
        answer.starts_with("HTTP/1.1 429") && answer.contains("server.max_connections_per_caller is 3"),
        "the fourth connection of this uid is told why it is not served: {answer}"
    );
    let other = curl_as("tokendcaller", &["-H", "Metadata: true", &t.imds_url("https://storage.azure.com")]);
    assert!(other.contains("access_token"), "another uid is served: {other}");
    idle.pop();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut again = TcpStream::connect(t.addr).await.expect("connect");
    again.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").await.expect("write");
    let mut answer = String::new();
    again.read_to_string(&mut answer).await.expect("read");
    assert!(answer.starts_with("HTTP/1.1 200"), "a freed place is usable again: {answer}");
    assert!(t.logs().contains("per-caller connection limit reached"), "{}", t.logs());
}

/// A group of this host for the test, created if missing; its gid.
fn test_group(name: &str) -> u32 {
    let gid = || {
        let out = Command::new("getent").args(["group", name]).output().expect("getent (libc-bin)");
        let line = String::from_utf8_lossy(&out.stdout).into_owned();
        out.status.success().then(|| line.split(':').nth(2).and_then(|g| g.trim().parse::<u32>().ok()).expect("gid"))
    };
    if let Some(g) = gid() {
        return g;
    }
    let out = Command::new("groupadd").args(["--system", name]).output().expect("groupadd (passwd package)");
    assert!(out.status.success() || gid().is_some(), "groupadd {name}: {}", String::from_utf8_lossy(&out.stderr));
    gid().expect("the new group")
}

/// A user created (if missing) with `useradd ARGS NAME`; its uid.
fn test_user_with(name: &str, args: &[&str]) -> u32 {
    let uid = || {
        let out = Command::new("id").args(["-u", name]).output().expect("id");
        out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().parse::<u32>().expect("uid"))
    };
    if let Some(u) = uid() {
        return u;
    }
    let out = Command::new("useradd")
        .args(["--system", "--no-create-home", "--shell", "/usr/sbin/nologin"])
        .args(args)
        .arg(name)
        .output()
        .expect("useradd (passwd package) is required");
    assert!(out.status.success() || uid().is_some(), "useradd {name}: {}", String::from_utf8_lossy(&out.stderr));
    uid().expect("the new user")
}

/// A group rule is about the users the system says are in the group: those whose primary group it is
/// (who are usually not in its `/etc/group` member list) as well as its listed members, over TCP and
/// the unix socket alike — and over the unix socket whatever gid the connecting process runs with (a
/// process started with another gid, as `runuser -g` or `sg` do, is the same user). With
/// `default = "allow"`, a rule restricting the group limits them all to its resource.
#[tokio::test(flavor = "multi_thread")]
async fn a_group_rule_restricts_the_users_whose_primary_group_it_is_over_both_transports() {
    let idp = Idp::start(3600).await;
    let gid = test_group("hcgroup");
    let other_gid = test_group("hcother");
    let primary = test_user_with("hcprimary", &["-g", "hcgroup"]);
    let listed = test_user_with("hclisted", &["-U", "-G", "hcgroup"]);
    test_user("tokendcaller2");
    let late = test_user_with("hclate", &["-U"]);
    // Not a member when tokend starts: an earlier run added it (when it is not one, gpasswd fails, fine).
    Command::new("gpasswd").args(["-d", "hclate", "hcgroup"]).output().expect("gpasswd (passwd package)");
    let members = std::fs::read_to_string("/etc/group").expect("/etc/group");
    let line = members.lines().find(|l| l.starts_with("hcgroup:")).expect("hcgroup in /etc/group");
    assert!(!line.contains("hcprimary") && line.contains("hclisted"), "the case under test: {line}");
    assert_eq!(uid_gid(primary), gid, "hcprimary's primary group is hcgroup");

    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711)).expect("chmod");
    let socket = dir.path().join("tokend.sock");
    let port = free_port();
    let mut o = Opts::new(&idp);
    o.extra = "[access]\ndefault = \"allow\"\n[[access.rule]]\ngroups = [\"hcgroup\"]\nidentities = [\"default\"]\nresources = [\"https://storage.azure.com\"]\n".into();
    let config = config_with(dir.path(), port, &o, "unix_socket = \"tokend.sock\"\nsocket_mode = \"0666\"\n");
    let t = Tokend::spawn(dir, config, port, &[]).await;
    let socket_arg = socket.to_str().expect("utf8");
    // `runuser -u USER [-g GROUP] -- curl ...`: the JSON answer.
    let ask = |user: &str, group: Option<&str>, resource: &str, unix: bool| {
        let mut cmd = Command::new("runuser");
        cmd.args(["-u", user]);
        if let Some(g) = group {
            cmd.args(["-g", g]);
        }
        cmd.args(["--", "curl", "-s", "--max-time", "20", "-H", "Metadata: true"]);
        if unix {
            cmd.args(["--unix-socket", socket_arg]).arg(format!(
                "http://localhost/metadata/identity/oauth2/token?api-version=2018-02-01&resource={resource}"
            ));
        } else {
            cmd.arg(t.imds_url(resource));
        }
        let out = cmd.output().expect("runuser (util-linux) and curl are required");
        assert!(out.status.success(), "curl as {user}: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice::<Value>(&out.stdout).unwrap_or_else(|e| panic!("{e}: {:?}", out.stdout))
    };
    for unix in [false, true] {
        for (user, uid, group) in
            [("hcprimary", primary, None), ("hclisted", listed, None), ("hcprimary", primary, Some("hcother"))]
        {
            let v = ask(user, group, "https://storage.azure.com", unix);
            assert!(v["access_token"].is_string(), "{user} {group:?} unix={unix}: {v}\n{}", t.logs());
            let v = ask(user, group, "https://vault.azure.net", unix);
            assert_eq!(
                v["error"],
                "access_denied",
                "{user} (gid {}) unix={unix}: the rule for hcgroup limits it: {v}",
                group.map_or(gid, |_| other_gid)
            );
            let d = v["error_description"].as_str().expect("description");
            assert!(d.contains("access.rule[0]") && d.contains(&format!("uid {uid}")), "{d}");
        }
        // Someone else is not limited by the rule (default = "allow").
        let v = ask("tokendcaller2", None, "https://vault.azure.net", unix);
        assert!(v["access_token"].is_string(), "unix={unix}: {v}");
    }

    // Membership is resolved at load and reload: a user added to the group is limited after a reload.
    let v = ask("hclate", None, "https://vault.azure.net", false);
    assert!(v["access_token"].is_string(), "hclate is in no rule yet: {v}");
    let out = Command::new("usermod").args(["-aG", "hcgroup", "hclate"]).output().expect("usermod (passwd package)");
    assert!(out.status.success(), "usermod: {}", String::from_utf8_lossy(&out.stderr));
    let reloads = t.logs().matches("configuration reloaded").count();
    let _ = Command::new("kill").args(["-HUP", &t.pid().to_string()]).status();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while t.logs().matches("configuration reloaded").count() == reloads {
        assert!(std::time::Instant::now() < deadline, "no reload: {}", t.logs());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for unix in [false, true] {
        let v = ask("hclate", None, "https://vault.azure.net", unix);
        assert_eq!(v["error"], "access_denied", "hclate (uid {late}) joined hcgroup, unix={unix}: {v}");
    }
}
