//! The README's quick start, verbatim: `tokend dev` on its default address and the README's curl lines.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::support::*;

/// The README's shell lines that start with `curl` and call `url_prefix`.
pub fn readme_curl_lines(url_prefix: &str) -> Vec<String> {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).expect("README.md");
    readme
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("curl ") && l.contains(url_prefix))
        .map(str::to_owned)
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn quick_start_curl_lines_work_against_tokend_dev() {
    let lines = readme_curl_lines("http://127.0.0.1:50342/");
    assert!(!lines.is_empty(), "the README shows a curl line for the quick start");
    let mut child = start_dev();
    for line in &lines {
        let out = Command::new("bash")
            .args(["-c", line])
            .env("NO_PROXY", "127.0.0.1")
            .output()
            .expect("bash + curl (apt-get install curl)");
        let v: Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{line}: {e} ({}): {}", out.status, String::from_utf8_lossy(&out.stdout)));
        assert!(v["access_token"].is_string(), "{line}: {v}");
        assert_eq!(v["resource"], "https://management.azure.com");
    }
    let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
    assert!(child.wait().expect("wait").success());
}

/// `tokend dev` on its default address, serving once it has printed the export lines. The port is
/// fixed (the README's), so a client socket elsewhere in the suite can hold it as its ephemeral local
/// port for a moment: on "Address already in use" it is tried again, a few times; any other early
/// exit fails with what tokend printed.
fn start_dev() -> std::process::Child {
    for attempt in 1..=5 {
        let mut child =
            Command::new(tokend_bin()).arg("dev").stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        // Drained all along, so that tokend never blocks on a full pipe.
        let stderr = child.stderr.take().expect("stderr");
        let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Ok(mut log) = sink.lock() {
                    log.push_str(&line);
                    log.push('\n');
                }
            }
        });
        // Serving once the export lines are printed (tokend dev prints them after binding).
        while let Ok(line) = rx.recv_timeout(Duration::from_secs(20)) {
            if line.starts_with("# curl") {
                return child;
            }
        }
        let _ = child.kill();
        let status = child.wait().expect("wait");
        std::thread::sleep(Duration::from_millis(100));
        let stderr = log.lock().map(|l| l.clone()).unwrap_or_default();
        assert!(
            stderr.contains("Address already in use") && attempt < 5,
            "tokend dev did not start serving (attempt {attempt}, {status}): {stderr}"
        );
        std::thread::sleep(Duration::from_secs(1));
    }
    unreachable!("the loop returns or fails")
}
