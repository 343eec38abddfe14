//! Real Azure SDK clients (Python azure-identity 1.27 / msal 1.39) against the real tokend.

use serde_json::Value;

use crate::support::*;

/// tokend's `expires_on` (a string on the wire) for a cached resource, as a number.
async fn broker_expires_on(t: &Tokend, resource: &str) -> u64 {
    let v: Value = t.imds(&format!("api-version=2018-02-01&resource={resource}")).await.json().await.expect("json");
    v["expires_on"].as_str().expect("a string").parse().expect("digits")
}

async fn broker_token(t: &Tokend, resource: &str, extra: &str) -> String {
    let v: Value =
        t.imds(&format!("api-version=2018-02-01&resource={resource}{extra}")).await.json().await.expect("json");
    v["access_token"].as_str().unwrap_or_else(|| panic!("no token: {v}")).to_owned()
}

fn ok_token(v: &Value) -> String {
    assert_eq!(v["ok"], true, "client failed: {v}");
    v["token"].as_str().expect("token").to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn azure_identity_managed_identity_credential_on_both_routes() {
    let idp = Idp::start(3600).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let o = Opts::new(&idp).with_second_identity(&idp, dir.path());
    let t = Tokend::start(&o).await;
    let app_env = vec![("IDENTITY_ENDPOINT", t.url("/msi/token")), ("IDENTITY_HEADER", t.identity_header())];
    let imds_env = vec![("AZURE_POD_IDENTITY_AUTHORITY_HOST", t.url(""))];

    let (app, imds, user_assigned, cli_resource, default_cred) = tokio::join!(
        python_client(&["mi", "https://storage.azure.com", "--twice"], &app_env),
        python_client(&["mi", "https://vault.azure.net"], &imds_env),
        python_client(&["mi-client-id", "https://storage.azure.com", "--client-id", CLIENT_ID_2], &app_env),
        python_client(&["mi", "https://management.core.windows.net/"], &app_env),
        python_client(&["default", "https://graph.microsoft.com"], &imds_env),
    );

    let token = ok_token(&app);
    assert_eq!(app["second_equal"], true, "the second get_token is served from the client's cache");
    assert_eq!(
        token,
        broker_token(&t, "https://storage.azure.com", "").await,
        "App Service route: tokend's cached token"
    );
    let expires_on = app["expires_on"].as_u64().expect("expires_on");
    assert_eq!(
        expires_on,
        broker_expires_on(&t, "https://storage.azure.com").await,
        "expires_on parsed from the string"
    );

    let token = ok_token(&imds);
    assert_eq!(token, broker_token(&t, "https://vault.azure.net", "").await, "IMDS route: tokend's cached token");

    let token = ok_token(&user_assigned);
    assert_eq!(jwt_claims(&token)["client_id"], CLIENT_ID_2, "client_id selects the second identity");

    let token = ok_token(&cli_resource);
    assert_eq!(jwt_claims(&token)["aud"], "https://management.core.windows.net/", "trailing slash kept");

    let token = ok_token(&default_cred);
    assert_eq!(jwt_claims(&token)["aud"], "https://graph.microsoft.com");
    assert_eq!(idp.token_requests().await, 5, "one upstream call per (identity, resource): 5 keys");
}

#[tokio::test(flavor = "multi_thread")]
async fn rust_sdk_managed_identity_credential_via_app_service_variables() {
    let idp = Idp::start(3600).await;
    let t = Tokend::start(&Opts::new(&idp)).await;
    let env = vec![("IDENTITY_ENDPOINT", t.url("/msi/token")), ("IDENTITY_HEADER", t.identity_header())];
    let (system, user) = tokio::join!(
        run_client(Client::AzureIdentityRust, None, &["mi", "https://storage.azure.com"], &env),
        run_client(
            Client::AzureIdentityRust,
            None,
            &["mi-client-id", "https://storage.azure.com", "--client-id", CLIENT_ID],
            &env
        ),
    );
    let token = ok_token(&system);
    assert_eq!(token, broker_token(&t, "https://storage.azure.com", "").await);
    assert_eq!(
        system["expires_on"].as_u64(),
        Some(broker_expires_on(&t, "https://storage.azure.com").await),
        "expires_on parsed from the string"
    );
    assert_eq!(ok_token(&user), token, "client_id of the default identity selects it");
    // A client id no identity has: the SDK reports the 400 as an unassigned identity, without retrying for a minute.
    let started = std::time::Instant::now();
    let r = run_client(
        Client::AzureIdentityRust,
        None,
        &["mi-client-id", "https://storage.azure.com", "--client-id", "nobody"],
        &env,
    )
    .await;
    assert_eq!(r["ok"], false);
    assert!(r["error"].as_str().expect("error").contains("has not been assigned"), "{r}");
    assert!(started.elapsed() < std::time::Duration::from_secs(10));
}

#[tokio::test(flavor = "multi_thread")]
async fn javascript_and_msal_python_on_both_routes() {
    let idp = Idp::start(3600).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let o = Opts::new(&idp).with_second_identity(&idp, dir.path());
    let t = Tokend::start(&o).await;
    let app = vec![("IDENTITY_ENDPOINT", t.url("/msi/token")), ("IDENTITY_HEADER", t.identity_header())];
    let imds = vec![("AZURE_POD_IDENTITY_AUTHORITY_HOST", t.url(""))];
    const STORAGE: &str = "https://storage.azure.com";
    let user = ["mi-client-id", STORAGE, "--client-id", CLIENT_ID_2];
    let (js_app, js_imds, js_default, js_user, msal_app, msal_imds, msal_user) = tokio::join!(
        run_client(Client::AzureIdentityJs, None, &["mi", STORAGE, "--twice"], &app),
        // msal-node requests `/metadata/identity/oauth2/token/` (trailing slash) on this route.
        run_client(Client::AzureIdentityJs, None, &["mi", STORAGE], &imds),
        run_client(Client::AzureIdentityJs, None, &["default", STORAGE], &imds),
        run_client(Client::AzureIdentityJs, None, &user, &app),
        run_client(Client::MsalPython, None, &["mi", STORAGE, "--twice"], &app),
        run_client(Client::MsalPython, None, &["mi", "https://management.core.windows.net/"], &imds),
        run_client(Client::MsalPython, None, &user, &imds),
    );
    let system = broker_token(&t, STORAGE, "").await;
    for (name, r) in [
        ("js app service", &js_app),
        ("js imds", &js_imds),
        ("js default", &js_default),
        ("msal app service", &msal_app),
    ] {
        assert_eq!(ok_token(r), system, "{name}: tokend's cached token");
        // Clients that compute expires_on from expires_in (msal-node on IMDS) may land a second off.
        let exp = jwt_claims(&system)["exp"].as_u64().expect("exp");
        let got = r["expires_on"].as_u64().expect("expires_on");
        assert!(got.abs_diff(exp) <= 2, "{name}: expires_on {got} vs exp {exp}");
    }
    assert_eq!(js_app["second_equal"], true);
    assert_eq!(msal_app["second_equal"], true);
    assert_eq!(jwt_claims(&ok_token(&msal_imds))["aud"], "https://management.core.windows.net/");
    for (name, r) in [("js user-assigned", &js_user), ("msal user-assigned", &msal_user)] {
        assert_eq!(jwt_claims(&ok_token(r))["client_id"], CLIENT_ID_2, "{name}");
    }
}

/// The resource spelling each client sends for a scope, recorded from tokend's audit log: what
/// docs/clients.md's spelling table says, and why `resources` should pin `https://management.azure.com`.
#[tokio::test(flavor = "multi_thread")]
async fn the_resource_each_client_sends_is_recorded() {
    let idp = Idp::start(3600).await;
    let mut o = Opts::new(&idp);
    o.extra.push_str("[audit]\npath = \"audit.jsonl\"\n");
    let t = Tokend::start(&o).await;
    let app = vec![("IDENTITY_ENDPOINT", t.url("/msi/token")), ("IDENTITY_HEADER", t.identity_header())];
    // Each client is asked for "https://management.azure.com" the way its users ask: SDKs with the scope
    // "https://management.azure.com/.default", msal with the resource itself.
    let clients = [
        ("Python azure-identity", Client::AzureIdentityPython),
        ("JavaScript @azure/identity", Client::AzureIdentityJs),
        ("Rust azure_identity", Client::AzureIdentityRust),
        ("Python msal", Client::MsalPython),
    ];
    let mut sent = Vec::new();
    let path = t.dir.path().join("audit.jsonl");
    for (name, client) in clients {
        let r = run_client(client, None, &["mi", "https://management.azure.com"], &app).await;
        ok_token(&r);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let line = loop {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            if let Some(l) = text.lines().nth(sent.len()) {
                break serde_json::from_str::<Value>(l).expect("json");
            }
            assert!(std::time::Instant::now() < deadline, "{name}: no audit line");
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        };
        let resource = line["resource"].as_str().expect("resource").to_owned();
        eprintln!("{name}: scope https://management.azure.com/.default -> resource {resource}");
        sent.push((name, resource));
    }
    for (name, resource) in &sent {
        assert_eq!(resource, "https://management.azure.com", "{name} strips /.default and nothing else");
    }
}
