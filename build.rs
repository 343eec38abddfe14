//! Records the commit the binary is built from, for `tokend --version`: `git rev-parse` when the
//! source is a git work tree, else `$TOKEND_COMMIT` (e.g. a container build without `.git`), else
//! "unknown".

use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=TOKEND_COMMIT");
    println!("cargo:rerun-if-changed=.git/HEAD");
    if let Ok(head) = std::fs::read_to_string(".git/HEAD")
        && let Some(reference) = head.trim().strip_prefix("ref: ")
    {
        println!("cargo:rerun-if-changed=.git/{reference}");
    }
    let from_git = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .filter(|c| !c.is_empty());
    let commit = from_git.or_else(|| std::env::var("TOKEND_COMMIT").ok()).unwrap_or_else(|| "unknown".to_owned());
    println!("cargo:rustc-env=TOKEND_COMMIT={commit}");
}
