//! The container image, built from the repository's `Dockerfile` with podman and run as shipped: the
//! build stage is replaced by a locally built static binary (`--build-arg BINARY_FROM=`; nothing can be
//! pulled here), the final `FROM scratch` stage is used exactly as written.
//!
//! The pod shape without Kubernetes: the test IdP, tokend and the application each in their own
//! container, all in one network namespace (the IdP's; nothing is reachable from the host). tokend runs
//! `--read-only` with no tmpfs at all, `--cap-drop=ALL`, `no-new-privileges`, as the image's non-root
//! user, with its configuration and secret mounted read-only. The "application" containers run the
//! host's own file system as an overlay root (`--rootfs /:O`), which gives them curl and the Python
//! venv with azure-identity without pulling an image. Then: `podman kube play` of the classic sidecar
//! manifest, whose app container gets a token.
//!
//! Needs root, podman with runc (tests/containers/containers.conf is passed as CONTAINERS_CONF) and
//! the static release binary `scripts/test.sh` builds (TOKEND_TEST_STATIC_BIN).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::*;

const IMAGE: &str = "localhost/tokend:test";
const STORAGE: &str = "https://storage.azure.com";

fn podman(args: &[&str]) -> Output {
    Command::new("podman")
        .args(args)
        .env("CONTAINERS_CONF", repo().join("tests/containers/containers.conf"))
        .output()
        .expect("podman is required: apt-get install podman runc (scripts/test.sh installs them)")
}

fn podman_ok(args: &[&str]) -> String {
    let out = podman(args);
    assert!(
        out.status.success(),
        "podman {}: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A container's log (tokend logs to stderr).
fn logs(name: &str) -> String {
    let out = podman(&["logs", name]);
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// Builds the image from the repository's Dockerfile, with the static binary in place of the build stage.
fn build_image(scratch: &Path) {
    let bin = std::env::var_os("TOKEND_TEST_STATIC_BIN")
        .map(PathBuf::from)
        .expect("TOKEND_TEST_STATIC_BIN is not set: run ./scripts/test.sh, which builds the static release binary");
    let ctx = scratch.join("binary");
    let out = ctx.join("out");
    std::fs::create_dir_all(&out).expect("mkdir");
    // What the Dockerfile's build stage puts in /out.
    let copy = Command::new("install").args(["-m", "0755", "-s"]).arg(&bin).arg(out.join("tokend")).status();
    assert!(copy.expect("install (coreutils) and strip (binutils)").success());
    std::fs::copy("/etc/ssl/certs/ca-certificates.crt", out.join("ca-certificates.crt"))
        .expect("/etc/ssl/certs/ca-certificates.crt (ca-certificates)");
    std::fs::write(out.join("passwd"), "tokend:x:10001:10001:tokend:/nonexistent:/sbin/nologin\n").expect("passwd");
    std::fs::write(out.join("group"), "tokend:x:10001:\n").expect("group");
    std::fs::write(ctx.join("Containerfile"), "FROM scratch\nCOPY out /out\n").expect("containerfile");
    podman_ok(&["build", "-q", "-t", "localhost/tokend-binary:test", ctx.to_str().expect("utf8")]);
    podman_ok(&[
        "build",
        "-q",
        "--format",
        "docker",
        "--build-arg",
        "BINARY_FROM=localhost/tokend-binary:test",
        "-t",
        IMAGE,
        "-f",
        repo().join("Dockerfile").to_str().expect("utf8"),
        repo().to_str().expect("utf8"),
    ]);
}

/// Containers removed at the end, whatever happens.
struct Containers(Vec<String>);

impl Drop for Containers {
    fn drop(&mut self) {
        for name in &self.0 {
            let _ = podman(&["rm", "-f", "-t", "0", name]);
        }
    }
}

/// The mounted configuration directory: tokend.toml, the secret and a pre-created identity header (the
/// root file system is read-only, so tokend creates nothing).
fn config_dir(dir: &Path, idp_port: u16, port: u16) -> PathBuf {
    use std::os::unix::fs::{PermissionsExt, chown};
    let cfg = dir.join("etc-tokend");
    std::fs::create_dir_all(&cfg).expect("mkdir");
    std::fs::write(
        cfg.join("tokend.toml"),
        format!(
            "[server]\nlisten = [\"127.0.0.1:{port}\"]\nidentity_header_file = \"/etc/tokend/identity-header\"\n\n\
             [[identity]]\nname = \"default\"\nclient_id = \"{CLIENT_ID}\"\n\
             token_url = \"http://127.0.0.1:{idp_port}/{TENANT}/oauth2/v2.0/token\"\n\
             client_secret_file = \"/etc/tokend/client-secret\"\nresources = [\"{STORAGE}\"]\n"
        ),
    )
    .expect("config");
    std::fs::write(cfg.join("client-secret"), SECRET).expect("secret");
    std::fs::write(cfg.join("identity-header"), "container-test-identity-header-0123456789").expect("header");
    for f in ["client-secret", "identity-header"] {
        chown(cfg.join(f), Some(10001), Some(10001)).expect("chown");
        std::fs::set_permissions(cfg.join(f), std::fs::Permissions::from_mode(0o600)).expect("chmod");
    }
    std::fs::set_permissions(&cfg, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    cfg
}

#[tokio::test(flavor = "multi_thread")]
async fn the_image_runs_read_only_without_capabilities_as_a_sidecar() {
    let scratch = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(scratch.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).expect("chmod");
    let started = Instant::now();
    build_image(scratch.path());
    let size: u64 = podman_ok(&["image", "inspect", "-f", "{{.Size}}", IMAGE]).trim().parse().expect("size");
    eprintln!("image {IMAGE}: {:.1} MB (built in {:?})", size as f64 / 1e6, started.elapsed());
    assert!(size <= 15_000_000, "the image is {size} bytes; the target is 15 MB");
    let user = podman_ok(&["image", "inspect", "-f", "{{.Config.User}}", IMAGE]);
    assert_eq!(user.trim(), "10001:10001", "a non-root USER");

    let tag = std::process::id();
    let (idp, tokend, app) = (format!("tkidp-{tag}"), format!("tokend-{tag}"), format!("tkapp-{tag}"));
    let _cleanup = Containers(vec![idp.clone(), tokend.clone(), app.clone()]);
    let (idp_port, port) = (free_port(), free_port());
    let idp_dir = std::env::var_os("TOKEND_TEST_IDP_DIR").map_or_else(|| repo().join("tests/idp"), PathBuf::from);
    // The pod's network namespace belongs to the IdP container (loopback only).
    podman_ok(&[
        "run",
        "-d",
        "--name",
        &idp,
        "--network",
        "none",
        "-w",
        idp_dir.to_str().expect("utf8"),
        "-e",
        &format!("IDP_PORT={idp_port}"),
        "-e",
        &format!("IDP_TENANT={TENANT}"),
        "--rootfs",
        "/:O",
        "node",
        "idp.mjs",
    ]);
    let cfg = config_dir(scratch.path(), idp_port, port);
    let volume = format!("{}:/etc/tokend:ro", cfg.display());
    podman_ok(&[
        "run",
        "-d",
        "--name",
        &tokend,
        "--network",
        &format!("container:{idp}"),
        "--read-only",
        "--read-only-tmpfs=false",
        "--cap-drop=ALL",
        "--security-opt",
        "no-new-privileges",
        "-v",
        &volume,
        IMAGE,
    ]);
    let in_pod = |args: &[&str], env: &[(&str, String)]| {
        let mut full = vec!["run".to_owned(), "--rm".into(), "--network".into(), format!("container:{tokend}")];
        for (k, v) in env {
            full.push("-e".into());
            full.push(format!("{k}={v}"));
        }
        full.extend(["--rootfs".to_owned(), "/:O".to_owned()]);
        full.extend(args.iter().map(|a| (*a).to_owned()));
        let refs: Vec<&str> = full.iter().map(String::as_str).collect();
        podman(&refs)
    };
    let url =
        format!("http://127.0.0.1:{port}/metadata/identity/oauth2/token?api-version=2018-02-01&resource={STORAGE}");
    let deadline = Instant::now() + Duration::from_secs(30);
    let token: Value = loop {
        let out = in_pod(&["curl", "-s", "-m", "5", "-H", "Metadata:true", &url], &[]);
        if let Ok(v) = serde_json::from_slice::<Value>(&out.stdout)
            && v["access_token"].is_string()
        {
            break v;
        }
        assert!(
            Instant::now() < deadline,
            "no token from the sidecar: {}\ntokend's log:\n{}\nIdP's log:\n{}",
            String::from_utf8_lossy(&out.stdout),
            logs(&tokend),
            logs(&idp)
        );
        std::thread::sleep(Duration::from_millis(300));
    };
    // azure-identity in the application container, on both routes.
    let python = std::env::var("TOKEND_TEST_PYTHON")
        .unwrap_or_else(|_| repo().join(".venv-test/bin/python").display().to_string());
    let script = repo().join("tests/clients/get_token.py");
    let script = script.to_str().expect("utf8");
    let home = ("HOME", "/tmp".to_owned());
    for env in [
        vec![("AZURE_POD_IDENTITY_AUTHORITY_HOST", format!("http://127.0.0.1:{port}")), home.clone()],
        vec![
            ("IDENTITY_ENDPOINT", format!("http://127.0.0.1:{port}/msi/token")),
            ("IDENTITY_HEADER", "container-test-identity-header-0123456789".to_owned()),
            home.clone(),
        ],
    ] {
        let out = in_pod(&[&python, script, "mi", STORAGE], &env);
        let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!("{e}: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
        });
        assert_eq!(v["ok"], true, "azure-identity in the app container: {v}");
        assert_eq!(v["token"], token["access_token"], "the sidecar's cached token");
    }

    // The process: the image's user, no capabilities, a read-only root.
    let pid = podman_ok(&["inspect", "-f", "{{.State.Pid}}", &tokend]);
    let status = std::fs::read_to_string(format!("/proc/{}/status", pid.trim())).expect("status");
    assert!(status.lines().any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("10001")), "{status}");
    for cap in ["CapEff", "CapPrm", "CapBnd"] {
        let line = status.lines().find(|l| l.starts_with(cap)).expect("cap line");
        assert!(line.ends_with("0000000000000000"), "{line}");
    }
    assert!(status.lines().any(|l| l.starts_with("NoNewPrivs:") && l.ends_with('1')), "{status}");
    let mounts = std::fs::read_to_string(format!("/proc/{}/mounts", pid.trim())).expect("mounts");
    let root = mounts.lines().find(|l| l.split_whitespace().nth(1) == Some("/")).expect("root mount");
    assert!(root.split_whitespace().nth(3).is_some_and(|o| o.split(',').any(|x| x == "ro")), "{root}");
    assert!(
        !mounts.lines().any(|l| l.split_whitespace().nth(2) == Some("tmpfs")
            && ["/run", "/tmp"].contains(&l.split_whitespace().nth(1).unwrap_or(""))),
        "no tmpfs: {mounts}"
    );

    // HEALTHCHECK (tokend health), and no shell in the image.
    let health = podman(&["healthcheck", "run", &tokend]);
    assert!(health.status.success(), "{}", String::from_utf8_lossy(&health.stderr));
    let shell = podman(&["exec", &tokend, "/bin/sh", "-c", "true"]);
    assert!(!shell.status.success(), "the image has no shell");

    // SIGTERM: drained and exited 0 within the grace period.
    let stop_started = Instant::now();
    podman_ok(&["stop", "-t", "20", &tokend]);
    let took = stop_started.elapsed();
    let code = podman_ok(&["inspect", "-f", "{{.State.ExitCode}}", &tokend]);
    assert_eq!(code.trim(), "0", "{}", logs(&tokend));
    assert!(took < Duration::from_secs(12), "stopped in {took:?}");
    assert!(logs(&tokend).contains("tokend stopped"));

    kube_play_classic_sidecar(scratch.path()).await;
    eprintln!("container steps took {:?}", started.elapsed());
}

/// `podman kube play` of deploy/kubernetes/sidecar-classic.yaml with this image. Test-only changes, all
/// string substitutions of the shipped file: the images (the app container runs `tokend token`, which
/// asks the sidecar like any client), the identity (the test IdP on the host's loopback, so the pod
/// uses the host network with a free port), restartPolicy OnFailure (the app retries until the sidecar
/// answers, then exits 0), and the Secret volume as a hostPath (podman 4.3's kube play crashes on
/// Secret volumes).
async fn kube_play_classic_sidecar(scratch: &Path) {
    let idp = Idp::start(3600).await;
    let port = free_port();
    let credential = scratch.join("kube-credential");
    std::fs::create_dir_all(&credential).expect("mkdir");
    std::fs::write(credential.join("client-secret"), SECRET).expect("secret");
    std::os::unix::fs::chown(credential.join("client-secret"), Some(10001), Some(10001)).expect("chown");
    let shipped = std::fs::read_to_string(repo().join("deploy/kubernetes/sidecar-classic.yaml")).expect("manifest");
    let mut yaml = shipped.clone();
    for (from, to) in [
        ("listen = [\"127.0.0.1:50342\"]".to_owned(), format!("listen = [\"127.0.0.1:{port}\"]")),
        (
            "    tenant_id = \"00000000-0000-0000-0000-000000000000\"\n    client_id = \"11111111-1111-1111-1111-111111111111\"\n".to_owned(),
            format!("    client_id = \"{CLIENT_ID}\"\n    token_url = \"{}\"\n", idp.token_url()),
        ),
        ("ghcr.io/example/tokend:0.1.0".to_owned(), IMAGE.to_owned()),
        (
            "          image: registry.example.com/builder:latest\n".to_owned(),
            format!("          image: {IMAGE}\n          command: [\"/usr/local/bin/tokend\", \"token\", \"--config\", \"/etc/tokend/tokend.toml\", \"--resource\", \"{STORAGE}\"]\n"),
        ),
        (
            "      automountServiceAccountToken: false\n".to_owned(),
            "      automountServiceAccountToken: false\n      hostNetwork: true\n      restartPolicy: OnFailure\n".to_owned(),
        ),
        (
            "          secret:\n            secretName: tokend-credential\n            defaultMode: 0400\n".to_owned(),
            format!("          hostPath:\n            path: {}\n            type: Directory\n", credential.display()),
        ),
    ] {
        assert!(yaml.contains(&from), "the shipped manifest changed: {from:?} is gone");
        yaml = yaml.replace(&from, &to);
    }
    let file = scratch.join("sidecar-classic.test.yaml");
    std::fs::write(&file, yaml).expect("write");
    let file = file.to_str().expect("utf8");
    struct Down<'a>(&'a str);
    impl Drop for Down<'_> {
        fn drop(&mut self) {
            let _ = podman(&["kube", "down", self.0]);
        }
    }
    let _down = Down(file);
    podman_ok(&["kube", "play", file]);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out = podman(&["logs", "builder-pod-0-app"]);
        let printed = String::from_utf8_lossy(&out.stdout).into_owned();
        if let Some(token) = printed.lines().find(|l| l.starts_with("eyJ")) {
            assert_eq!(jwt_claims(token)["aud"], STORAGE, "the app container's token");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the app container got no token: {printed}{}\ntokend: {}",
            String::from_utf8_lossy(&out.stderr),
            logs("builder-pod-0-tokend")
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    assert_eq!(idp.token_requests().await, 1, "one upstream call for the pod");
}

/// Every manifest under deploy/kubernetes passes `kubernetes-validate --strict` for the oldest and the
/// newest Kubernetes it claims; a manifest with an unknown field fails it (the check can fail).
#[test]
fn kubernetes_manifests_validate_strictly() {
    let exe = std::env::var_os("TOKEND_TEST_KUBERNETES_VALIDATE")
        .map_or_else(|| repo().join(".venv-k8s/bin/kubernetes-validate"), PathBuf::from);
    assert!(exe.exists(), "no kubernetes-validate at {}: run ./scripts/test.sh (it creates .venv-k8s)", exe.display());
    let dir = repo().join("deploy/kubernetes");
    let validate = |file: &Path, version: &str| {
        Command::new(&exe).args(["--strict", "--quiet", "-k", version]).arg(file).output().expect("kubernetes-validate")
    };
    for (file, versions) in [
        ("sidecar-native.yaml", ["1.29.0", "1.37.0"]),
        ("sidecar-classic.yaml", ["1.25.0", "1.37.0"]),
        ("daemonset.yaml", ["1.25.0", "1.37.0"]),
    ] {
        for version in versions {
            let out = validate(&dir.join(file), version);
            assert!(
                out.status.success(),
                "{file} on Kubernetes {version}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    let scratch = tempfile::tempdir().expect("tempdir");
    let bad = scratch.path().join("bad.yaml");
    let text = std::fs::read_to_string(dir.join("sidecar-classic.yaml")).expect("manifest");
    std::fs::write(
        &bad,
        text.replace(
            "      automountServiceAccountToken: false\n",
            "      automountServiceAccountToken: false\n      hostNetwrok: true\n",
        ),
    )
    .expect("write");
    assert!(!validate(&bad, "1.37.0").status.success(), "a misspelt field must fail --strict");
}
