//! The audit log under rotation: the real `logrotate` runs deploy/README.md's snippet against a real
//! tokend while requests are served, several times; every served token has exactly one line across
//! the rotated files.

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::{Idp, Opts, Tokend, http, repo, tokend_bin};

/// The logrotate block of deploy/README.md's "Audit log rotation" section.
fn documented_snippet() -> String {
    let readme = std::fs::read_to_string(repo().join("deploy/README.md")).expect("deploy/README.md");
    let section = readme.split("## Audit log rotation").nth(1).expect("an \"Audit log rotation\" section");
    let block = section.split("```").nth(1).expect("a code block in it");
    block.trim_start_matches(|c| c != '\n').trim_start().to_owned()
}

/// Every line of the audit log and its rotations (`.N`, `.N.gz`), parsed, and the files read.
fn all_lines(dir: &std::path::Path) -> (Vec<Value>, Vec<(String, usize)>) {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .expect("read the directory")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("audit.jsonl"))
        .collect();
    files.sort();
    let mut lines = Vec::new();
    let mut per_file = Vec::new();
    for name in files {
        let path = dir.join(&name);
        let text = if name.ends_with(".gz") {
            let out = Command::new("gzip").arg("-dc").arg(&path).output().expect("gzip (Debian package gzip)");
            assert!(out.status.success(), "gzip -dc {name}");
            String::from_utf8(out.stdout).expect("utf-8")
        } else {
            std::fs::read_to_string(&path).expect("read")
        };
        assert!(text.is_empty() || text.ends_with('\n'), "{name} ends in a whole line");
        for l in text.lines() {
            lines.push(serde_json::from_str(l).unwrap_or_else(|e| panic!("{name}: not a JSON line ({e}): {l}")));
        }
        per_file.push((name, text.lines().count()));
    }
    (lines, per_file)
}

/// deploy/README.md's logrotate snippet, run by the real `logrotate` five times while two clients ask
/// for tokens as fast as they can: no line lost, none written twice, every rotated file whole JSON
/// lines, and the new file created 0640.
///
/// What the test substitutes, and why: the log's path (a temporary directory); `create 0640 root root`
/// for `tokend tokend` (the test runs as root, with no tokend user); and for `systemctl reload tokend`,
/// what that runs — the unit's `ExecReload=`, `tokend reload` with systemd's `$MAINPID` and
/// `$RUNTIME_DIRECTORY` given as `--pid` and `--state-dir` (there is no systemd here).
#[tokio::test(flavor = "multi_thread")]
async fn logrotate_loses_no_line_under_load() {
    let have = Command::new("logrotate").arg("--version").output();
    assert!(
        have.is_ok_and(|o| o.status.success()),
        "the real logrotate is required: apt-get install logrotate (scripts/test.sh installs it)"
    );
    let idp = Idp::start(3600).await;
    let mut o = Opts::new(&idp);
    o.extra.push_str("[audit]\npath = \"audit.jsonl\"\n");
    let run = tempfile::tempdir().expect("tempdir");
    let run_dir = run.path().to_str().expect("utf-8 path").to_owned();
    let t = Tokend::start_with_env(&o, &[("RUNTIME_DIRECTORY", run_dir.as_str())]).await;
    t.wait_ready(Duration::from_secs(10)).await;
    let log = t.dir.path().join("audit.jsonl");
    // One token before the load: its line is counted with the rest.
    assert_eq!(t.imds("api-version=2018-02-01&resource=https://storage.azure.com").await.status(), 200);

    let snippet = documented_snippet();
    for needed in ["/var/log/tokend/audit.jsonl", "create 0640 tokend tokend", "systemctl reload tokend"] {
        assert!(snippet.contains(needed), "the snippet has {needed:?}:\n{snippet}");
    }
    let conf = snippet
        .replace("/var/log/tokend/audit.jsonl", log.to_str().expect("utf-8 path"))
        .replace("create 0640 tokend tokend", "create 0640 root root")
        .replace(
            "systemctl reload tokend",
            &format!("{} reload --pid {} --state-dir {run_dir}", tokend_bin(), t.pid()),
        );
    let conf_path = t.dir.path().join("logrotate.conf");
    std::fs::write(&conf_path, &conf).expect("write the logrotate configuration");

    let stop = Arc::new(AtomicBool::new(false));
    let served = Arc::new(AtomicU64::new(1));
    let url = t.imds_url("https://storage.azure.com");
    let clients: Vec<_> = (0..2)
        .map(|_| {
            let (stop, served, url) = (stop.clone(), served.clone(), url.clone());
            tokio::spawn(async move {
                let client = http();
                let mut failed = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    match client.get(&url).header("Metadata", "true").send().await {
                        Ok(r) if r.status() == 200 => {
                            served.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(r) => failed.push(format!("status {}", r.status())),
                        Err(e) => failed.push(format!("{e:?}")),
                    }
                }
                failed
            })
        })
        .collect();
    for _ in 0..5 {
        // Some load between rotations (a new connection's first answer waits for its process lookup).
        let (since, deadline) = (served.load(Ordering::Relaxed), Instant::now() + Duration::from_secs(20));
        while served.load(Ordering::Relaxed) < since + 200 {
            assert!(Instant::now() < deadline, "no load: {}", t.logs());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let before = served.load(Ordering::Relaxed);
        let out = Command::new("logrotate")
            .args(["--force", "--verbose", "--state"])
            .arg(t.dir.path().join("logrotate.state"))
            .arg(&conf_path)
            .output()
            .expect("run logrotate");
        assert!(
            out.status.success(),
            "logrotate failed:\n{}\n{}\ntokend:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            t.logs()
        );
        assert!(
            served.load(Ordering::Relaxed) > before,
            "requests are served while logrotate runs:\n{}\n{}\ntokend:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            t.logs()
        );
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        let failed = c.await.expect("client");
        assert!(failed.is_empty(), "every request answered: {failed:?}\ntokend:\n{}", t.logs());
    }
    let served = served.load(Ordering::Relaxed);
    let deadline = Instant::now() + Duration::from_secs(10);
    let (lines, files) = loop {
        let (lines, files) = all_lines(t.dir.path());
        let issued = lines.iter().filter(|l| l["decision"] == "issued").count() as u64;
        if issued >= served || Instant::now() > deadline {
            break (lines, files);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    eprintln!("{served} tokens served; audit files {files:?}");
    let issued = lines.iter().filter(|l| l["decision"] == "issued").count() as u64;
    assert_eq!(issued, served, "one line per served token across {files:?}");
    assert_eq!(lines.len() as u64, issued, "nothing but issued tokens was asked for");
    assert!(files.len() >= 6, "the file and five rotations: {files:?}");
    assert!(files.iter().filter(|(_, n)| *n > 0).count() >= 5, "lines in every rotated file: {files:?}");
    assert!(files.iter().any(|(n, _)| n.ends_with(".gz")), "compressed rotations: {files:?}");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&log).expect("the current file").permissions().mode() & 0o777, 0o640);
    assert!(t.logs().contains("audit log reopened"), "{}", t.logs());
}
