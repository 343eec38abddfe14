//! A real Rust Azure SDK client (`azure_identity` 1.0 `ManagedIdentityCredential`), used by the
//! compatibility tests the way an application would use it. The environment decides the route:
//! `IDENTITY_ENDPOINT` + `IDENTITY_HEADER` (App Service), or nothing at all, in which case the SDK calls
//! IMDS at 169.254.169.254 (tokend's transparent mode).
//!
//! It is its own crate in tests/clients/rust (own workspace and Cargo.lock), so the SDK is not compiled
//! into tokend's builds. scripts/test.sh builds it with
//! `cargo build --locked --manifest-path tests/clients/rust/Cargo.toml --target-dir target/rust-sdk-client`
//! and passes the binary to the tests in `TOKEND_TEST_RUST_SDK`.
//!
//! Usage: `rust_sdk_token MODE RESOURCE [--client-id ID]`, MODE `mi` or `mi-client-id`. Prints one JSON
//! line, `{"ok":true,"token":..,"expires_on":..}` or `{"ok":false,"error_type":..,"error":..}`; exits 2 on
//! a usage error.

use azure_core::credentials::TokenCredential;
use azure_identity::{ManagedIdentityCredential, ManagedIdentityCredentialOptions, UserAssignedId};

fn usage() -> ! {
    eprintln!("usage: rust_sdk_token mi|mi-client-id RESOURCE [--client-id ID]");
    std::process::exit(2)
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (mode, resource) = match (args.first(), args.get(1)) {
        (Some(m), Some(r)) => (m.as_str(), r.as_str()),
        _ => usage(),
    };
    let client_id = match (args.get(2).map(String::as_str), args.get(3)) {
        (Some("--client-id"), Some(id)) => Some(id.clone()),
        (None, _) => None,
        _ => usage(),
    };
    let options = match (mode, client_id) {
        ("mi", None) => None,
        ("mi-client-id", Some(id)) => Some(ManagedIdentityCredentialOptions {
            user_assigned_id: Some(UserAssignedId::ClientId(id)),
            ..Default::default()
        }),
        _ => usage(),
    };
    let scope = format!("{resource}/.default");
    let result = match ManagedIdentityCredential::new(options) {
        Ok(credential) => credential.get_token(&[scope.as_str()], None).await,
        Err(e) => Err(e),
    };
    let line = match result {
        Ok(t) => serde_json::json!({
            "ok": true,
            "token": t.token.secret(),
            "expires_on": t.expires_on.unix_timestamp(),
            "second_equal": null,
        }),
        Err(e) => {
            serde_json::json!({ "ok": false, "error_type": format!("{:?}", e.kind()), "error": format!("{e:#}") })
        }
    };
    println!("{line}");
}
