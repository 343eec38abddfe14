//! A caller from another network namespace is *unknown*, whatever source port it picks. tokend listens
//! (`server.allow_non_loopback`) on the host end of a veth pair whose other end is in a namespace the
//! test creates; the attacker there — a container's root can bind any source port — connects from the
//! port of a wildcard listener of the host owned by a local user, or by root. For a 4-tuple that no
//! connected socket of tokend's namespace has, the kernel's `sock_diag` exact lookup answers with that
//! *listening* socket (its owner's uid); tokend must not take the listener's owner for the caller.
//! IPv4, IPv6, and IPv4 through a dual-stack `[::]` listener (v4-mapped addresses). Needs root, iproute2,
//! curl, runuser and perl (perl-base, for the listeners); a missing one fails the test saying so.

use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::*;

static NEXT: AtomicUsize = AtomicUsize::new(0);

const TOKEN_PATH: &str = "/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https://storage.azure.com";

fn ip(args: &[&str]) -> std::process::Output {
    Command::new("ip").args(args).output().expect("cannot run `ip`: install iproute2")
}

fn run_ip(args: &[&str]) {
    let out = ip(args);
    assert!(out.status.success(), "ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
}

/// How the attacker reaches tokend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    /// IPv4 to an IPv4 listener.
    V4,
    /// IPv6 to an IPv6 listener.
    V6,
    /// IPv4 to tokend's dual-stack `[::]` listener: tokend sees v4-mapped IPv6 addresses.
    Mapped,
}

/// A network namespace joined to this one by a veth pair with a private subnet of its own (IPv4
/// 10.251.a.b/30 and IPv6 fd00:251:a:b::/64); deleted on drop (its end of the pair goes with it).
struct Link {
    ns: String,
    host_if: String,
    /// This (the host's) end.
    host_v4: String,
    host_v6: String,
}

impl Link {
    fn new() -> Self {
        let (pid, n) = (std::process::id(), NEXT.fetch_add(1, Ordering::SeqCst) % 60);
        // Names begin with "hc", this helper's prefix; interface names stay under 16 bytes.
        let ns = format!("hc-tokend-{pid}-{n}");
        let host_if = format!("hc{}v{n}h", pid % 100_000);
        let ns_if = format!("hc{}v{n}c", pid % 100_000);
        let a = pid % 250;
        let (host_v4, ns_v4) = (format!("10.251.{a}.{}", n * 4 + 1), format!("10.251.{a}.{}", n * 4 + 2));
        let (host_v6, ns_v6) = (format!("fd00:251:{a:x}:{n:x}::1"), format!("fd00:251:{a:x}:{n:x}::2"));
        let out = ip(&["netns", "add", &ns]);
        assert!(
            out.status.success(),
            "cannot create a network namespace (`ip netns add {ns}`): {}; these tests need root (or \
             CAP_SYS_ADMIN) and iproute2",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        let link = Self { ns, host_if, host_v4, host_v6 };
        run_ip(&["link", "add", &link.host_if, "type", "veth", "peer", "name", &ns_if]);
        run_ip(&["link", "set", &ns_if, "netns", &link.ns]);
        run_ip(&["addr", "add", &format!("{}/30", link.host_v4), "dev", &link.host_if]);
        run_ip(&["addr", "add", &format!("{}/64", link.host_v6), "dev", &link.host_if, "nodad"]);
        run_ip(&["link", "set", &link.host_if, "up"]);
        run_ip(&["-n", &link.ns, "link", "set", "lo", "up"]);
        run_ip(&["-n", &link.ns, "addr", "add", &format!("{ns_v4}/30"), "dev", &ns_if]);
        run_ip(&["-n", &link.ns, "addr", "add", &format!("{ns_v6}/64"), "dev", &ns_if, "nodad"]);
        run_ip(&["-n", &link.ns, "link", "set", &ns_if, "up"]);
        link
    }

    /// `curl` inside the namespace from source port `local_port`; (HTTP status, body).
    fn curl_from_port(&self, local_port: u16, url: &str, host: &str) -> (u16, String) {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.ns, "curl", "-s", "--max-time", "20", "-o", "-", "-w", "\n%{http_code}"])
            .args(["--local-port", &local_port.to_string(), "-H", "Metadata: true", "-H", &format!("Host: {host}")])
            .arg(url)
            .output()
            .expect("curl (apt-get install curl)");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
        (code.trim().parse().unwrap_or(0), body.to_owned())
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.ns]);
        let _ = ip(&["link", "del", &self.host_if]);
    }
}

/// A local user for the test, created if missing (the suite runs as root); (uid, primary gid).
fn local_user(name: &str) -> (u32, u32) {
    let id = |flag: &str| {
        let out = Command::new("id").args([flag, name]).output().expect("id");
        out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().parse::<u32>().expect("an id"))
    };
    if id("-u").is_none() {
        let out = Command::new("useradd")
            .args(["--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name])
            .output()
            .expect("useradd (passwd package) is required");
        // Another test may have created it meanwhile.
        assert!(
            out.status.success() || id("-u").is_some(),
            "useradd {name} (the suite must run as root): {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    (id("-u").expect("the user's uid"), id("-g").expect("the user's gid"))
}

/// A listening socket on `addr` port 0 (a wildcard: `0.0.0.0` or `[::]`), in a process of `user` (root
/// when `None`); killed on drop.
struct Listener {
    child: Child,
    port: u16,
}

impl Listener {
    fn start(user: Option<(u32, u32)>, addr: &str) -> Self {
        let script = r#"use IO::Socket::IP; my $s = IO::Socket::IP->new(LocalHost => $ARGV[0], LocalPort => 0, Listen => 8, ReuseAddr => 1) or die "listen: $@"; $| = 1; print $s->sockport, "\n"; sleep 300;"#;
        let mut cmd = Command::new("perl");
        cmd.args(["-e", script, addr]).stdout(Stdio::piped()).stderr(Stdio::inherit());
        if let Some((uid, gid)) = user {
            cmd.uid(uid).gid(gid);
        }
        let mut child = cmd.spawn().expect("perl (perl-base) is required for the test's listeners");
        let mut line = String::new();
        let stdout = child.stdout.take().expect("stdout");
        std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line).expect("the listener's port");
        let port = line.trim().parse().unwrap_or_else(|_| panic!("the listener did not start: {line:?}"));
        Self { child, port }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The audit log's lines, once there are `n` (or after 5 s).
async fn audit_lines(path: &std::path::Path, n: usize) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if text.lines().count() >= n || Instant::now() > deadline {
            return text.lines().map(|l| serde_json::from_str(l).expect("a JSON line")).collect();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The attack: tokend serves user `hcspoofed` and root (and nobody else, unknown callers denied); from
/// the namespace, connections from the ports of a wildcard listener of each must be unknown callers.
async fn spoofed_source_ports_are_unknown_callers(family: Family) {
    let link = Link::new();
    let victim = local_user("hcspoofed");
    let idp = Idp::start(3600).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let mut o = Opts::new(&idp);
    o.extra = format!(
        "[access]\ndefault = \"deny\"\nunknown = \"deny\"\n[[access.rule]]\nuids = [{}, 0]\nidentities = [\"*\"]\nresources = [\"*\"]\n[audit]\npath = \"audit.jsonl\"\n",
        victim.0
    );
    let config = write_config(dir.path(), port, &o);
    let (listen, target, wildcard) = match family {
        Family::V4 => (format!("\"127.0.0.1:{port}\", \"{}:{port}\"", link.host_v4), link.host_v4.clone(), "0.0.0.0"),
        Family::V6 => {
            (format!("\"127.0.0.1:{port}\", \"[{}]:{port}\"", link.host_v6), format!("[{}]", link.host_v6), "::")
        }
        // One dual-stack listener; 127.0.0.1 reaches it too (Tokend::spawn's health checks).
        Family::Mapped => (format!("\"[::]:{port}\""), link.host_v4.clone(), "0.0.0.0"),
    };
    let text = std::fs::read_to_string(&config).expect("read").replace(
        &format!("listen = [\"127.0.0.1:{port}\"]"),
        &format!("listen = [{listen}]\nallow_non_loopback = true"),
    );
    std::fs::write(&config, text).expect("write");
    let t = Tokend::spawn(dir, config, port, &[]).await;
    let url = format!("http://{target}:{port}{TOKEN_PATH}");
    // tokend's Host guard takes its listen addresses; `[::]` is none, so the requests say 127.0.0.1.
    let host = format!("127.0.0.1:{port}");

    // Controls, from this namespace to the same address: root (this test) and the user are served.
    let r = http().get(&url).header("Metadata", "true").header("Host", &host).send().await.expect("request");
    assert_eq!(r.status(), 200, "{family:?}: root is served: {}\n{}", r.text().await.unwrap_or_default(), t.logs());
    let out = Command::new("runuser")
        .args(["-u", "hcspoofed", "--", "curl", "-s", "--max-time", "20", "-H", "Metadata: true"])
        .args(["-H", &format!("Host: {host}"), &url])
        .output()
        .expect("runuser (util-linux) and curl are required");
    let body = String::from_utf8_lossy(&out.stdout);
    assert!(body.contains("access_token"), "{family:?}: the user is served: {body}\n{}", t.logs());

    // The attack: from the other namespace, from the port of the user's listener, then of root's.
    let of_user = Listener::start(Some(victim), wildcard);
    let of_root = Listener::start(None, wildcard);
    for (whose, listener) in [("hcspoofed", &of_user), ("root", &of_root)] {
        let (status, body) = link.curl_from_port(listener.port, &url, &host);
        assert_eq!(
            status,
            403,
            "{family:?}: a caller from another namespace on the port of {whose}'s listener ({}) is served as \
             {whose}: {body}\n{}",
            listener.port,
            t.logs()
        );
        assert!(body.contains("could not be identified"), "{family:?}: {body}");
    }

    let lines = audit_lines(&t.dir.path().join("audit.jsonl"), 4).await;
    assert_eq!(lines.len(), 4, "{family:?}: {lines:?}");
    let callers: Vec<(&Value, &Value, &Value)> =
        lines.iter().map(|l| (&l["decision"], &l["caller"]["uid"], &l["caller"]["unknown"])).collect();
    assert_eq!(
        callers,
        [
            (&"issued".into(), &0.into(), &Value::Null),
            (&"issued".into(), &victim.0.into(), &Value::Null),
            (&"denied".into(), &Value::Null, &"no_such_socket".into()),
            (&"denied".into(), &Value::Null, &"no_such_socket".into()),
        ],
        "{family:?}: the audit log's callers: {lines:?}"
    );
    assert_eq!(idp.token_requests().await, 1, "{family:?}: only the controls' token was fetched");
    drop((of_user, of_root));
}

#[tokio::test(flavor = "multi_thread")]
async fn ipv4_callers_from_another_namespace_are_unknown_whatever_their_source_port() {
    spoofed_source_ports_are_unknown_callers(Family::V4).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn ipv6_callers_from_another_namespace_are_unknown_whatever_their_source_port() {
    spoofed_source_ports_are_unknown_callers(Family::V6).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn v4_mapped_callers_from_another_namespace_are_unknown_whatever_their_source_port() {
    spoofed_source_ports_are_unknown_callers(Family::Mapped).await;
}
