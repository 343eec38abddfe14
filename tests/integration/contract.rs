//! docs/openapi.yaml is the contract of tokend's HTTP surface, and schemathesis (PyPI, `.venv-contract`
//! from tests/contract/requirements.lock) holds the real tokend to it: every response to its generated
//! requests, valid and invalid ones, must have a documented status, content type, headers and body.
//!
//! Three tokends, so that the 5xx answers are seen too: one healthy (200, 400, 401, and 414 for long
//! generated requests), one whose identity provider is unreachable (503 with `Retry-After`, `/readyz`
//! 503) and one whose secret the identity provider rejects (500). Settings (fixed seed, 40 examples per
//! operation, checks) are in tests/contract/schemathesis.toml. tests/contract/check_fallbacks.py then
//! checks what schemathesis does not reach or validate (404, 405, a foreign `Host`, 414, 431, HEAD)
//! against the same file.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use crate::support::*;

const ARM: &str = "https://management.azure.com/";
const QUERY: &str = "api-version=2018-02-01&resource=https://management.azure.com/";
/// Per schemathesis run; a healthy run takes well under 15 s.
const RUN_LIMIT: Duration = Duration::from_secs(240);

/// The schemathesis CLI: `$TOKEND_TEST_SCHEMATHESIS`, else the one scripts/test.sh installs.
fn schemathesis_exe() -> PathBuf {
    let p = std::env::var_os("TOKEND_TEST_SCHEMATHESIS")
        .map_or_else(|| repo().join(".venv-contract/bin/st"), PathBuf::from);
    assert!(
        p.exists(),
        "no schemathesis at {} (TOKEND_TEST_SCHEMATHESIS): run ./scripts/test.sh (it creates .venv-contract from tests/contract/requirements.lock)",
        p.display()
    );
    p
}

/// Runs `program args` in a clean environment (no proxy, a throw-away HOME and working directory, so
/// nothing is written into the repository), with `TOKEND_IDENTITY_HEADER` set to `t`'s secret.
async fn run(program: &Path, args: &[&str], t: &Tokend, what: &str) -> (Output, Duration) {
    let scratch = tempfile::tempdir().expect("tempdir");
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .current_dir(scratch.path())
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HOME", scratch.path())
        .env("NO_PROXY", "127.0.0.1,localhost")
        .env("PYTHONIOENCODING", "utf-8")
        .env("COLUMNS", "120")
        .env("TOKEND_IDENTITY_HEADER", t.identity_header())
        .kill_on_drop(true);
    let started = Instant::now();
    let out = tokio::time::timeout(RUN_LIMIT, cmd.output())
        .await
        .unwrap_or_else(|_| panic!("{what}: not done within {RUN_LIMIT:?}; tokend's log:\n{}", t.logs()))
        .unwrap_or_else(|e| panic!("{what}: cannot run {}: {e}", program.display()));
    (out, started.elapsed())
}

/// schemathesis against `t` with docs/openapi.yaml and tests/contract/schemathesis.toml, plus `extra`.
async fn schemathesis(st: &Path, t: &Tokend, what: &str, extra: &[&str]) -> (Output, Duration) {
    let config = repo().join("tests/contract/schemathesis.toml");
    let spec = repo().join("docs/openapi.yaml");
    let url = t.url("");
    let mut args = vec![
        "--config-file",
        config.to_str().expect("utf-8 path"),
        "run",
        spec.to_str().expect("utf-8 path"),
        "--url",
        url.as_str(),
        "--request-timeout",
        "10",
    ];
    args.extend_from_slice(extra);
    run(st, &args, t, what).await
}

/// Asserts a run exited 0; prints its summary (schemathesis' from the SUMMARY line on), or on failure
/// all its output and the end of tokend's log.
fn assert_passed(what: &str, (out, took): &(Output, Duration), t: &Tokend) {
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let summary =
        text.find("= SUMMARY =").and_then(|i| text[..i].rfind('\n')).map_or(text.as_str(), |i| &text[i + 1..]);
    println!("==> {what}: {} in {:.1} s\n{summary}", out.status, took.as_secs_f32());
    let log = t.logs();
    let lines: Vec<&str> = log.lines().collect();
    assert!(
        out.status.success(),
        "{what}: tokend does not answer as docs/openapi.yaml says ({}); the output:\n{text}\nthe end of tokend's log:\n{}",
        out.status,
        lines[lines.len().saturating_sub(40)..].join("\n")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn tokend_answers_as_docs_openapi_yaml_says() {
    let st = schemathesis_exe();
    let idp = Idp::start(3600).await;

    let healthy = Tokend::start(&Opts::new(&idp).resources(&[ARM])).await;
    // Nothing listens on the token URL: every uncached resource is a 503 at once.
    let mut o =
        Opts::for_url(&format!("http://127.0.0.1:{}/{TENANT}/oauth2/v2.0/token", free_port())).resources(&[ARM]);
    o.max_wait = "100ms".into();
    let unreachable = Tokend::start(&o).await;
    // The identity provider rejects the secret: every token request is a 500.
    let mut o = Opts::new(&idp).resources(&[ARM]);
    o.secret = "not-the-secret".into();
    o.max_wait = "100ms".into();
    let rejected = Tokend::start(&o).await;

    healthy.wait_ready(Duration::from_secs(10)).await;
    // Each tokend is in the state its run is meant to cover.
    assert_eq!(healthy.imds(QUERY).await.status(), 200, "{}", healthy.logs());
    assert_eq!(unreachable.imds(QUERY).await.status(), 503, "{}", unreachable.logs());
    assert_eq!(rejected.imds(QUERY).await.status(), 500, "{}", rejected.logs());
    for t in [&unreachable, &rejected] {
        assert_eq!(http().get(t.url("/readyz")).send().await.expect("readyz").status(), 503);
    }

    // Where the identity provider fails, valid requests are refused too (not a "positive data" failure),
    // and 5xx is the documented answer. Warnings other than a refused secret are the healthy run's to
    // give (it is the same spec); schemathesis would warn here that most valid requests fail.
    let failing = [
        "--exclude-checks",
        "not_a_server_error,positive_data_acceptance",
        "--max-examples",
        "15",
        "--warnings",
        "missing_auth",
    ];
    let started = Instant::now();
    let (healthy_run, unreachable_run, rejected_run) = tokio::join!(
        schemathesis(&st, &healthy, "schemathesis, healthy tokend", &[]),
        schemathesis(&st, &unreachable, "schemathesis, identity provider unreachable", &failing),
        schemathesis(&st, &rejected, "schemathesis, credential rejected", &failing),
    );
    println!("schemathesis: three runs in {:.1} s", started.elapsed().as_secs_f32());
    assert_passed("schemathesis, healthy tokend", &healthy_run, &healthy);
    assert_passed("schemathesis, identity provider unreachable", &unreachable_run, &unreachable);
    assert_passed("schemathesis, credential rejected", &rejected_run, &rejected);

    // What schemathesis does not reach or validate: 404, 405, a foreign Host, 414, 431, HEAD.
    let python = std::fs::canonicalize(&st).expect("schemathesis path").with_file_name("python");
    let (script, spec) = (repo().join("tests/contract/check_fallbacks.py"), repo().join("docs/openapi.yaml"));
    let address = healthy.addr.to_string();
    let args = [script.to_str().expect("utf-8 path"), spec.to_str().expect("utf-8 path"), address.as_str()];
    let fallbacks = run(&python, &args, &healthy, "check_fallbacks.py").await;
    assert_passed("check_fallbacks.py", &fallbacks, &healthy);
}
