//! Replays the fuzz corpus and the regression inputs (`fuzz/corpus/<target>/`, `fuzz/regressions/<target>/`)
//! through the same functions the fuzz targets call, so the test command checks every input the fuzzers
//! kept without cargo-fuzz or a nightly compiler. Needs the `fuzzing` feature:
//! `cargo test --locked --features fuzzing --test fuzz_corpus` (scripts/test.sh runs it).

use std::path::{Path, PathBuf};

/// Every file of `fuzz/corpus/<target>/` and `fuzz/regressions/<target>/`, sorted.
fn inputs(target: &str) -> Vec<PathBuf> {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut out = Vec::new();
    for dir in [fuzz.join("corpus").join(target), fuzz.join("regressions").join(target)] {
        let entries = std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()));
        out.extend(entries.map(|e| e.expect("a directory entry").path()).filter(|p| p.is_file()));
    }
    out.sort();
    out
}

/// Feeds each input to `run`; names the input that fails.
fn replay(target: &str, run: fn(&[u8])) {
    let inputs = inputs(target);
    assert!(inputs.len() >= 10, "fuzz/corpus/{target}/ holds only {} inputs", inputs.len());
    for path in &inputs {
        let data = std::fs::read(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
        if let Err(panic) = std::panic::catch_unwind(|| run(&data)) {
            let why = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()));
            panic!("{} fails: {}", path.display(), why.unwrap_or_default());
        }
    }
}

#[test]
fn the_request_corpus_passes_the_request_checks() {
    replay("request", tokend::fuzzing::request);
}

#[test]
fn the_idp_response_corpus_passes_the_parser_checks() {
    replay("idp_response", tokend::fuzzing::idp_response);
}

/// Whether `check` fails (the checks panic on what they catch).
fn caught(check: impl FnOnce() + std::panic::UnwindSafe) -> bool {
    std::panic::catch_unwind(check).is_err()
}

fn answer(status: &str, body: &str) -> String {
    format!("HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}", body.len())
}

/// The checks themselves, against answers a broken server could give: each must be caught, and the right
/// answer must not be.
#[test]
fn the_request_checks_catch_what_they_are_for() {
    let imds = "GET /metadata/identity/oauth2/token?api-version=2018-02-01&resource=https://storage.azure.com HTTP/1.1\r\nHost: 127.0.0.1\r\n";
    let token = |identity: &str, resource: &str| {
        let t = tokend::fuzzing::issued_token(identity, resource);
        answer("200 OK", &format!("{{\"access_token\":\"{t}\",\"token_type\":\"Bearer\"}}"))
    };
    let storage = token("default", "https://storage.azure.com");
    let imds_error = answer("400 Bad Request", r#"{"error":"invalid_request","error_description":"x"}"#);
    let with_metadata = format!("{imds}Metadata: true\r\n\r\n");
    let without = format!("{imds}\r\n");
    // The right answers pass.
    tokend::fuzzing::check_answers(with_metadata.as_bytes(), storage.as_bytes());
    tokend::fuzzing::check_answers(without.as_bytes(), imds_error.as_bytes());
    // A token to a request without `Metadata: true`, from another host, or one [access] does not allow.
    assert!(caught(|| tokend::fuzzing::check_answers(without.as_bytes(), storage.as_bytes())));
    let rebound = with_metadata.replace("127.0.0.1", "evil.example");
    assert!(caught(|| tokend::fuzzing::check_answers(rebound.as_bytes(), storage.as_bytes())));
    let denied = token("third", "https://storage.azure.com");
    assert!(caught(|| tokend::fuzzing::check_answers(with_metadata.as_bytes(), denied.as_bytes())));
    // No answer, two answers, an answer cut short, an undocumented status, an error in the wrong shape.
    assert!(caught(|| tokend::fuzzing::check_answers(with_metadata.as_bytes(), b"")));
    assert!(caught(|| tokend::fuzzing::check_answers(
        without.as_bytes(),
        format!("{imds_error}{imds_error}").as_bytes()
    )));
    assert!(caught(|| tokend::fuzzing::check_answers(
        without.as_bytes(),
        &imds_error.as_bytes()[..imds_error.len() - 3]
    )));
    let teapot = answer("418 I'm a teapot", r#"{"error":"x","error_description":"x"}"#);
    assert!(caught(|| tokend::fuzzing::check_answers(without.as_bytes(), teapot.as_bytes())));
    let app_service_shape = answer("400 Bad Request", r#"{"statusCode":400,"message":"x","correlationId":"y"}"#);
    assert!(caught(|| tokend::fuzzing::check_answers(without.as_bytes(), app_service_shape.as_bytes())));
    // A 429 without Retry-After.
    let limited = answer("429 Too Many Requests", r#"{"error":"too_many_requests","error_description":"x"}"#);
    assert!(caught(|| tokend::fuzzing::check_answers(with_metadata.as_bytes(), limited.as_bytes())));
}

/// The parser checks catch an error that repeats the body.
#[test]
fn the_idp_response_checks_run_the_parser() {
    // 200 with a token: parsed; a 400 whose error code is long, mixed-case text: not echoed.
    tokend::fuzzing::idp_response(
        b"\x00\x64\x00\x00{\"token_type\":\"Bearer\",\"expires_in\":3599,\"access_token\":\"a.b.c\"}",
    );
    tokend::fuzzing::idp_response(
        b"\x01\x2c\x00\x00{\"error\":\"eyJ0eXAiOiJKV1QiLCJhbGciOiJSUzI1NiJ9.eyJhdWQiOiJodHRwczovL3N0b3JhZ2UifQ.c2ln\"}",
    );
}
