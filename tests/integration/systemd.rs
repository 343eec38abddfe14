//! tokend under real systemd: a throw-away Debian 12 (systemd 252) and Debian 13 (systemd 257), each
//! booted with `systemd-nspawn -b`, the release binary and the repository's unit files installed as the
//! README says, and the test IdP in the container's network namespace (its loopback is the container's;
//! the test reaches the IdP's admin endpoints over a veth pair). Both versions, because the credential
//! directory's modes changed between them (0440 on 257), which is how a false mode warning slipped
//! through once.
//!
//! Asserted: `systemctl start` returns only once the token is cached (the IdP is slowed down on purpose)
//! while `STATUS=` says what it waits for; `systemctl status` shows the status text; the secret arrives
//! only through credentials — the default identity's encrypted in the container with `systemd-creds
//! encrypt --with-key=host` and loaded with `LoadCredentialEncrypted=`, a second identity's with
//! `LoadCredential=` — and no mode warning is logged for either; curl inside the container gets tokens over TCP, the unix socket of
//! `tokend.socket` and transparent IMDS through `tokend-imds.socket`, with tokend holding no capability;
//! `systemctl reload` of a broken configuration fails while serving continues, a good one applies; a
//! process stopped with SIGSTOP is killed by the watchdog and restarted; `systemd-analyze security`
//! of the installed unit is at most 1.5.
//!
//! Needs root, `systemd-nspawn` (systemd-container), the root file systems `scripts/nspawn-rootfs.sh`
//! builds (mmdebstrap; `TOKEND_TEST_NSPAWN_ROOT_12`, `TOKEND_TEST_NSPAWN_ROOT_13`) and a release build;
//! `scripts/test.sh` provides all three.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::*;

const STORAGE: &str = "https://storage.azure.com";

fn required_path(var: &str, what: &str) -> PathBuf {
    let p = std::env::var_os(var)
        .map(PathBuf::from)
        .unwrap_or_else(|| panic!("{var} is not set: run ./scripts/test.sh, which provides {what}"));
    assert!(p.exists(), "{var}={}: missing; run ./scripts/test.sh, which provides {what}", p.display());
    p
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A network namespace with a veth pair to the host: 10.253.77.1 here, 10.253.77.2 there.
struct Net {
    name: String,
    host_if: String,
}

impl Net {
    fn new() -> Self {
        let name = format!("tokendsd-{}", std::process::id());
        let host_if = format!("tsd{}", std::process::id() % 100_000);
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        run(Command::new("ip").args(["netns", "add", &name]));
        let net = Self { name, host_if };
        let ns_if = format!("{}n", net.host_if);
        run(Command::new("ip").args(["link", "add", &net.host_if, "type", "veth", "peer", "name", &ns_if]));
        run(Command::new("ip").args(["link", "set", &ns_if, "netns", &net.name]));
        run(Command::new("ip").args(["addr", "add", "10.253.77.1/30", "dev", &net.host_if]));
        run(Command::new("ip").args(["link", "set", &net.host_if, "up"]));
        run(Command::new("ip").args(["-n", &net.name, "addr", "add", "10.253.77.2/30", "dev", &ns_if]));
        run(Command::new("ip").args(["-n", &net.name, "link", "set", &ns_if, "up"]));
        run(Command::new("ip").args(["-n", &net.name, "link", "set", "lo", "up"]));
        net
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["link", "del", &self.host_if]).output();
        let _ = Command::new("ip").args(["netns", "del", &self.name]).output();
    }
}

/// A booted container: its systemd is PID 1 of its own PID namespace.
struct Machine {
    nspawn: std::process::Child,
    leader: u32,
    log: PathBuf,
}

impl Machine {
    fn boot(root: &Path, netns: &str, log: PathBuf) -> Self {
        let out = std::fs::File::create(&log).expect("log");
        let nspawn = Command::new("systemd-nspawn")
            .args(["-b", "--register=no", "--keep-unit", "--console=passive", "-q"])
            // As root on a real host: transparent-imds setup adds the address to lo.
            .arg("--capability=CAP_NET_ADMIN")
            .arg(format!("--network-namespace-path=/run/netns/{netns}"))
            .arg("-D")
            .arg(root)
            .stdout(out.try_clone().expect("dup"))
            .stderr(out)
            .spawn()
            .expect("systemd-nspawn (Debian package systemd-container) is required");
        let nspawn_pid = nspawn.id();
        let deadline = Instant::now() + Duration::from_secs(30);
        let leader = loop {
            let children =
                std::fs::read_to_string(format!("/proc/{nspawn_pid}/task/{nspawn_pid}/children")).unwrap_or_default();
            if let Some(pid) = children.split_whitespace().next().and_then(|p| p.parse::<u32>().ok())
                && std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "systemd")
            {
                break pid;
            }
            assert!(
                Instant::now() < deadline,
                "the container did not boot: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        };
        let m = Self { nspawn, leader, log };
        // Until its manager answers at all, then until it has booted.
        loop {
            let state = m.exec("systemctl is-system-running --wait");
            let state = String::from_utf8_lossy(&state.stdout).trim().to_owned();
            if ["running", "degraded"].contains(&state.as_str()) {
                return m;
            }
            assert!(
                Instant::now() < deadline && !["maintenance", "stopping", "offline"].contains(&state.as_str()),
                "the container's systemd is {state:?}; failed units:\n{}",
                String::from_utf8_lossy(
                    &m.exec("systemctl --failed --no-pager; journalctl -b --no-pager | tail -50").stdout
                )
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Runs `sh -c script` inside the container (all its namespaces); its output and status.
    fn exec(&self, script: &str) -> Output {
        Command::new("nsenter")
            .args(["-t", &self.leader.to_string(), "-a", "--", "sh", "-c", script])
            .output()
            .expect("nsenter (util-linux) is required")
    }

    /// [`Machine::exec`] that must succeed; its stdout.
    fn sh(&self, script: &str) -> String {
        let out = self.exec(script);
        assert!(
            out.status.success(),
            "in the container: {script}\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn journal(&self) -> String {
        String::from_utf8_lossy(
            &self.exec("journalctl -b --no-pager -u tokend -u tokend.socket -u tokend-imds.socket | tail -80").stdout,
        )
        .into_owned()
    }

    fn main_pid(&self) -> u32 {
        self.sh("systemctl show -P MainPID tokend").trim().parse().expect("a pid")
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        let _ = self.exec("systemctl poweroff");
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if self.nspawn.try_wait().ok().flatten().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!("the container did not power off; killing it (its log: {})", self.log.display());
        let _ = self.nspawn.kill();
        let _ = self.nspawn.wait();
    }
}

/// Copies the cached root file system and installs tokend as the README's "Running for real" says:
/// the release binary, the three unit files, the configuration, the secret (root-only; tokend gets it
/// as a credential) and the clients' group. A drop-in shortens the watchdog for the test.
fn install(cached: &Path, dest: &Path, idp: &Idp) {
    run(Command::new("cp").args(["-a", "--reflink=auto"]).arg(cached).arg(dest));
    let bin = required_path("TOKEND_TEST_RELEASE_BIN", "the release binary (cargo build --release)");
    // The README's install lines, run as written from the repository, with the container's root as the
    // destination prefix (and the static release build as target/release/tokend).
    let readme = std::fs::read_to_string(repo().join("README.md")).expect("README.md");
    let lines: Vec<&str> = readme
        .lines()
        .map(str::trim)
        .filter(|l| {
            l.starts_with("sudo install -m 0755 target/release/tokend")
                || l.starts_with("sudo install -m 0644 systemd/")
        })
        .collect();
    assert!(lines.len() >= 3, "the README installs the binary and the unit files: {lines:?}");
    for line in lines {
        let line = line
            .trim_start_matches("sudo ")
            .split(" #")
            .next()
            .unwrap_or_default()
            .replace("target/release/tokend", bin.to_str().expect("utf8"))
            .replace(" /usr/local/bin/", &format!(" {}/usr/local/bin/", dest.display()))
            .replace(" /etc/systemd/system/", &format!(" {}/etc/systemd/system/", dest.display()));
        run(Command::new("bash").args(["-c", &line]).current_dir(repo()));
    }
    for unit in ["tokend.service", "tokend.socket", "tokend-imds.socket"] {
        assert!(dest.join("etc/systemd/system").join(unit).exists(), "{unit} installed by the README's lines");
    }
    let dropin = dest.join("etc/systemd/system/tokend.service.d");
    std::fs::create_dir_all(&dropin).expect("drop-in dir");
    // A short watchdog, and no 15 s wait for a core dump of the stopped process before SIGKILL.
    std::fs::write(
        dropin.join("test.conf"),
        "[Service]\nWatchdogSec=3s\nTimeoutAbortSec=2s\nEnvironment=TOKEND_LOG=info,tokend=debug\n",
    )
    .expect("drop-in");
    // The encrypted credential of the unit file's comment; the file is encrypted in the booted
    // container (its host key is made there), before tokend starts.
    std::fs::write(
        dropin.join("encrypted.conf"),
        "[Service]\nLoadCredentialEncrypted=client-secret-enc:/etc/tokend/client-secret.cred\n",
    )
    .expect("drop-in");
    std::fs::create_dir_all(dest.join("etc/tokend")).expect("etc/tokend");
    std::fs::write(dest.join("etc/tokend/tokend.toml"), config(idp, &[STORAGE])).expect("config");
    for (name, value) in [("client-secret", SECRET), ("client-secret-2", SECRET_2)] {
        let secret = dest.join("etc/tokend").join(name);
        std::fs::write(&secret, value).expect("secret");
        std::fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o600)).expect("chmod");
    }
    // useradd --system tokend
    for (file, line) in [
        ("etc/passwd", "tokend:x:991:991:tokend:/nonexistent:/usr/sbin/nologin\n"),
        ("etc/group", "tokend:x:991:\n"),
        ("etc/shadow", "tokend:!:20000::::::\n"),
    ] {
        let text = std::fs::read_to_string(dest.join(file)).expect(file);
        std::fs::write(dest.join(file), format!("{text}{line}")).expect(file);
    }
}

fn config(idp: &Idp, resources: &[&str]) -> String {
    let resources: Vec<String> = resources.iter().map(|r| format!("{r:?}")).collect();
    format!(
        "[server]\nlisten = [\"127.0.0.1:50342\", \"169.254.169.254:80\"]\nunix_socket = \"/run/tokend/tokend.sock\"\n\n\
         [[identity]]\nname = \"default\"\nclient_id = \"{CLIENT_ID}\"\ntoken_url = \"{}\"\n\
         client_secret_credential = \"client-secret\"\nresources = [{}]\n\n         [[identity]]\nname = \"sealed\"\nclient_id = \"{CLIENT_ID_2}\"\ntoken_url = \"{}\"\n         client_secret_credential = \"client-secret-enc\"\n",
        idp.token_url(),
        resources.join(", "),
        idp.token_url(),
    )
}

fn token_via(m: &Machine, curl_args: &str) -> Value {
    let out = m.sh(&format!("curl -s -m 20 -H Metadata:true {curl_args}"));
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{curl_args}: {e}: {out}\n{}", m.journal()))
}

#[tokio::test(flavor = "multi_thread")]
async fn tokend_runs_properly_under_real_systemd_252_debian_12() {
    tokend_under_real_systemd("TOKEND_TEST_NSPAWN_ROOT_12", "systemd 252").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn tokend_runs_properly_under_real_systemd_257_debian_13() {
    tokend_under_real_systemd("TOKEND_TEST_NSPAWN_ROOT_13", "systemd 257").await;
}

/// One container at a time: they share the veth addresses, the namespace name and two cores.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn tokend_under_real_systemd(root_var: &str, systemd: &str) {
    let _one = ONE_AT_A_TIME.lock().await;
    let cached = required_path(root_var, "the Debian root file system (scripts/nspawn-rootfs.sh)");
    let net = Net::new();
    let idp = Idp::start_in_netns(&net.name, "10.253.77.2", 3600).await;
    let scratch = tempfile::tempdir().expect("tempdir");
    let root = scratch.path().join("root");
    install(&cached, &root, &idp);
    let m = Machine::boot(&root, &net.name, scratch.path().join("nspawn.log"));
    let manager = m.sh("systemctl --version");
    assert!(manager.starts_with(&format!("{systemd} ")), "{root_var} boots {systemd}: {manager}");
    // The secret encrypted with the container's host key (no TPM in a container), as an operator would.
    m.sh("systemd-creds encrypt --with-key=host --name=client-secret-enc /etc/tokend/client-secret-2 \
         /etc/tokend/client-secret.cred && chmod 600 /etc/tokend/client-secret.cred && rm /etc/tokend/client-secret-2");
    assert!(!m.sh("cat /etc/tokend/client-secret.cred").contains(SECRET_2), "encrypted");
    let version = m.sh("tokend --version");
    assert!(version.starts_with("tokend 0.1.0 (commit ") && !version.contains("unknown"), "{version}");

    // The installed unit's exposure: at most 1.5 (systemd-analyze's threshold is in tenths).
    let security = m.exec("systemd-analyze security --threshold=15 --no-pager tokend.service");
    let text = String::from_utf8_lossy(&security.stdout).into_owned();
    let overall = text.lines().find(|l| l.contains("Overall exposure")).unwrap_or_default().to_owned();
    eprintln!("systemd-analyze security tokend.service: {overall}");
    assert!(security.status.success(), "exposure above 1.5: {text}");

    // `systemctl start` returns only once the token is cached; the IdP takes 3 s to answer.
    idp.fault(serde_json::json!({"delay_ms": 3000, "count": 1})).await;
    m.sh("systemctl start tokend.socket tokend-imds.socket");
    let watcher = std::thread::spawn({
        let leader = m.leader;
        move || {
            let mut seen = Vec::new();
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                let out = Command::new("nsenter")
                    .args(["-t", &leader.to_string(), "-a", "--", "systemctl", "show", "-P", "StatusText", "tokend"])
                    .output()
                    .expect("nsenter");
                let status = String::from_utf8_lossy(&out.stdout).trim().to_owned();
                if !status.is_empty() && seen.last() != Some(&status) {
                    seen.push(status.clone());
                }
                if status.starts_with("serving") {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            seen
        }
    });
    let started = Instant::now();
    let out = m.exec("systemctl start tokend.service");
    let took = started.elapsed();
    assert!(out.status.success(), "systemctl start: {}\n{}", String::from_utf8_lossy(&out.stderr), m.journal());
    let statuses = watcher.join().expect("watcher");
    eprintln!("systemctl start took {took:?}; STATUS= seen: {statuses:?}");
    assert!(took >= Duration::from_millis(2500), "start returned before the token was cached ({took:?})");
    assert_eq!(idp.token_requests().await, 1);
    assert!(
        statuses
            .iter()
            .any(|s| s.starts_with("waiting for 1 of 1 tokens: https://storage.azure.com for identity default")),
        "{statuses:?}"
    );
    let status = m.sh("systemctl status --no-pager tokend || true");
    assert!(
        status.contains("Status: \"serving on 127.0.0.1:50342, 169.254.169.254:80, unix:/run/tokend/tokend.sock"),
        "{status}"
    );

    // Tokens over TCP, the unix socket and transparent IMDS; tokend holds no capability at all.
    let q = format!("/metadata/identity/oauth2/token?api-version=2018-02-01&resource={STORAGE}");
    let tcp = token_via(&m, &format!("'http://127.0.0.1:50342{q}'"));
    let unix = token_via(&m, &format!("--unix-socket /run/tokend/tokend.sock 'http://localhost{q}'"));
    let imds = token_via(&m, &format!("'http://169.254.169.254{q}'"));
    assert!(
        tcp["access_token"].is_string()
            && tcp["access_token"] == unix["access_token"]
            && tcp["access_token"] == imds["access_token"],
        "{tcp} {unix} {imds}"
    );
    let pid = m.main_pid();
    let caps = m.sh(&format!("grep ^Cap /proc/{pid}/status"));
    for line in caps.lines().filter(|l| !l.starts_with("CapAmb")) {
        assert!(line.ends_with("0000000000000000"), "tokend has a capability: {caps}");
    }
    let socket = m.sh("stat -c '%a %G' /run/tokend/tokend.sock");
    assert_eq!(socket.trim(), "660 tokend", "tokend.socket's mode and group");
    // The secret reached tokend only as a credential: its own user cannot read the file.
    let user = m.sh(&format!("stat -c %U /proc/{pid}")).trim().to_owned();
    assert!(
        m.exec(&format!("setpriv --reuid={user} --regid={user} --clear-groups cat /etc/tokend/client-secret"))
            .status
            .code()
            != Some(0)
    );
    assert_eq!(
        m.sh("ls /run/credentials/tokend.service/").split_whitespace().collect::<Vec<_>>(),
        ["client-secret", "client-secret-enc"],
        "LoadCredential= and LoadCredentialEncrypted= handed them over"
    );
    // systemd's files in systemd's private directory: not the operator's to chmod, so no warning.
    let modes = m.sh("stat -c '%a %U %n' /run/credentials/tokend.service /run/credentials/tokend.service/*");
    eprintln!("{systemd} credential modes:\n{modes}");
    let sealed = token_via(&m, &format!("'http://127.0.0.1:50342{q}&client_id={CLIENT_ID_2}'"));
    let claims = jwt_claims(sealed["access_token"].as_str().unwrap_or_else(|| panic!("{sealed}\n{}", m.journal())));
    assert_eq!(claims["client_id"], CLIENT_ID_2, "the encrypted secret authenticated its identity");
    let journal = m.sh("journalctl -b --no-pager -u tokend");
    assert!(!journal.contains("can be read by"), "a false mode warning under {systemd}: {journal}");

    // A broken configuration is rejected by `systemctl reload`, and serving continues; a good one applies.
    m.sh(
        "cp /etc/tokend/tokend.toml /root/good.toml && printf '\\n[tokens]\\nbogus = 1\\n' >> /etc/tokend/tokend.toml",
    );
    let reload = m.exec("systemctl reload tokend");
    assert!(!reload.status.success(), "a broken configuration must fail the reload");
    assert!(m.journal().contains("configuration rejected"), "{}", m.journal());
    assert!(token_via(&m, &format!("'http://127.0.0.1:50342{q}'"))["access_token"].is_string(), "still serving");
    std::fs::write(root.join("etc/tokend/tokend.toml"), config(&idp, &[STORAGE, "https://vault.azure.net"]))
        .expect("config");
    let reload = m.exec("systemctl reload tokend");
    assert!(reload.status.success(), "{}\n{}", String::from_utf8_lossy(&reload.stderr), m.journal());
    assert_eq!(m.main_pid(), pid, "reloaded in place");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !m.sh("systemctl show -P StatusText tokend").contains("2 configured tokens cached") {
        assert!(
            Instant::now() < deadline,
            "the new resource is fetched: {}",
            m.sh("systemctl show -P StatusText tokend")
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // A stopped (wedged) process stops pinging: the watchdog (3 s here) kills it, systemd restarts it.
    m.sh(&format!("kill -STOP {pid}"));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let now = m.exec("systemctl show -P MainPID tokend");
        let now: u32 = String::from_utf8_lossy(&now.stdout).trim().parse().unwrap_or(0);
        if now != 0 && now != pid && m.sh("systemctl is-active tokend || true").trim() == "active" {
            break;
        }
        assert!(Instant::now() < deadline, "not restarted by the watchdog: {}", m.journal());
        std::thread::sleep(Duration::from_millis(200));
    }
    let journal = m.journal();
    assert!(journal.contains("Watchdog timeout"), "{journal}");
    assert!(token_via(&m, &format!("'http://169.254.169.254{q}'"))["access_token"].is_string(), "serving again");
    assert_eq!(m.sh("systemctl show -P NRestarts tokend").trim(), "1");
}
