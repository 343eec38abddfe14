//! Both dialects end to end, and every status code a caller can cause.

use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::Value;

use crate::support::*;

const STORAGE: &str = "https://storage.azure.com/";

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).expect("clock").as_secs()
}

fn digits(v: &Value, field: &str) -> u64 {
    let s = v[field].as_str().unwrap_or_else(|| panic!("{field} must be a string: {v}"));
    assert!(!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()), "{field} = {s:?}");
    s.parse().expect("digits")
}

#[tokio::test(flavor = "multi_thread")]
async fn imds_and_app_service_serve_the_same_cached_token_with_string_numbers() {
    let idp = Idp::start(3600).await;
    let t = Tokend::start(&Opts::new(&idp)).await;

    let r = t.imds("api-version=2018-02-01&resource=https://storage.azure.com/").await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["cache-control"], "no-store");
    let imds: Value = r.json().await.expect("json");
    for f in ["expires_in", "expires_on", "ext_expires_in", "not_before"] {
        digits(&imds, f);
    }
    let expires_in = digits(&imds, "expires_in");
    let expires_on = digits(&imds, "expires_on");
    assert!((3590..=3600).contains(&expires_in), "{imds}");
    assert!(expires_on.abs_diff(now() + expires_in) <= 1, "expires_in is seconds remaining: {imds}");
    assert_eq!(imds["token_type"], "Bearer");
    assert_eq!(imds["resource"], STORAGE);
    assert_eq!(imds["client_id"], CLIENT_ID);
    let token = imds["access_token"].as_str().expect("token");
    let claims = jwt_claims(token);
    assert_eq!(
        claims["aud"], STORAGE,
        "the trailing slash reached the IdP as scope https://storage.azure.com//.default"
    );
    assert_eq!(claims["client_id"], CLIENT_ID);

    // Percent-encoded spelling and the App Service route: same key, same token, no second upstream call.
    let r = t.imds("api-version=2019-08-01&resource=https%3A%2F%2Fstorage.azure.com%2F").await;
    let enc: Value = r.json().await.expect("json");
    assert_eq!(enc["access_token"], imds["access_token"]);
    let r = t.app_service("api-version=2019-08-01&resource=https%3A%2F%2Fstorage.azure.com%2F").await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["cache-control"], "no-store");
    let app: Value = r.json().await.expect("json");
    assert_eq!(app["access_token"], imds["access_token"]);
    assert_eq!(app["resource"], STORAGE);
    for f in ["expires_in", "expires_on", "ext_expires_in", "not_before"] {
        digits(&app, f);
    }
    // `/.default` is stripped: the same key again.
    let r = t.imds("api-version=2018-02-01&resource=https://storage.azure.com//.default").await;
    assert_eq!(r.json::<Value>().await.expect("json")["access_token"], imds["access_token"]);
    assert_eq!(idp.token_requests().await, 1);

    // Without the trailing slash it is another resource (Entra echoes the spelling in aud).
    let r = t.imds("api-version=2018-02-01&resource=https://storage.azure.com").await;
    let other: Value = r.json().await.expect("json");
    assert_eq!(jwt_claims(other["access_token"].as_str().expect("token"))["aud"], "https://storage.azure.com");
    assert_eq!(idp.token_requests().await, 2);
    let form =
        idp.requests().await.iter().map(|r| r["body"].as_str().unwrap_or("").to_owned()).collect::<Vec<_>>().join("\n");
    assert!(form.contains("scope=https%3A%2F%2Fstorage.azure.com%2F%2F.default"), "{form}");
}

#[tokio::test(flavor = "multi_thread")]
async fn selectors_pick_identities_and_unknown_ones_are_400() {
    let idp = Idp::start(3600).await;
    let mut o = Opts::new(&idp);
    let dir = tempfile::tempdir().expect("tempdir");
    let second_secret = dir.path().join("second-secret");
    std::fs::write(&second_secret, SECRET_2).expect("write");
    o.extra = format!(
        "[[identity]]\nname = \"second\"\nclient_id = \"{CLIENT_ID_2}\"\nobject_id = \"0b1ec7-1d\"\nresource_id = \"/subscriptions/s/resourcegroups/g/providers/Microsoft.ManagedIdentity/userAssignedIdentities/second\"\ntoken_url = \"{}\"\nclient_secret_file = \"{}\"\n",
        idp.token_url(),
        second_secret.display()
    );
    let t = Tokend::start(&o).await;
    let client_of = |v: &Value| {
        jwt_claims(v["access_token"].as_str().expect("token"))["client_id"].as_str().expect("cid").to_owned()
    };
    let base = "api-version=2018-02-01&resource=https://vault.azure.net";
    let default: Value = t.imds(base).await.json().await.expect("json");
    assert_eq!(client_of(&default), CLIENT_ID);
    for sel in [
        format!("client_id={CLIENT_ID_2}"),
        "object_id=0B1EC7-1D".to_owned(),
        "principal_id=0b1ec7-1d".to_owned(),
        "msi_res_id=/subscriptions/s/resourcegroups/g/providers/Microsoft.ManagedIdentity/userAssignedIdentities/second".to_owned(),
        "mi_res_id=%2Fsubscriptions%2Fs%2FresourceGroups%2Fg%2Fproviders%2FMicrosoft.ManagedIdentity%2FuserAssignedIdentities%2Fsecond".to_owned(),
    ] {
        let r = t.imds(&format!("{base}&{sel}")).await;
        assert_eq!(r.status(), 200, "{sel}");
        let v: Value = r.json().await.expect("json");
        assert_eq!(client_of(&v), CLIENT_ID_2, "{sel}");
        assert_eq!(v["client_id"], CLIENT_ID_2);
        let r = t.app_service(&format!("api-version=2019-08-01&resource=https://vault.azure.net&{sel}")).await;
        assert_eq!(r.status(), 200, "app service {sel}");
    }
    let r = t.imds(&format!("{base}&client_id={CLIENT_ID}")).await;
    assert_eq!(client_of(&r.json().await.expect("json")), CLIENT_ID);
    let r = t.imds(&format!("{base}&client_id=00000000-dead-beef-0000-000000000000")).await;
    assert_eq!(r.status(), 400, "unknown identity is 400, never 404");
    let v: Value = r.json().await.expect("json");
    assert!(v["error_description"].as_str().expect("desc").contains("client_id"), "{v}");
    let r = t.app_service("api-version=2019-08-01&resource=https://vault.azure.net&principal_id=nobody").await;
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.expect("json");
    assert_eq!(v["statusCode"], 400);
    assert!(v["message"].as_str().expect("message").contains("object_id"), "{v}");
}

async fn expect(resp: reqwest::Response, status: u16, needle: &str) -> Value {
    assert_eq!(resp.status(), status, "expected {status} for {needle}");
    let v: Value = resp.json().await.expect("json error body");
    let text = v.to_string();
    assert!(text.contains(needle), "expected {needle:?} in {text}");
    v
}

#[tokio::test(flavor = "multi_thread")]
async fn every_caller_error_gets_its_status_and_shape() {
    let idp = Idp::start(3600).await;
    let t = Tokend::start(&Opts::new(&idp)).await;
    let c = http();
    let ok_query = "api-version=2018-02-01&resource=https://storage.azure.com";

    // IMDS: the header-less probe is answered at once with IMDS's 400.
    let v = expect(
        c.get(t.url(&format!("/metadata/identity/oauth2/token?{ok_query}"))).send().await.expect("send"),
        400,
        "Required metadata header not specified",
    )
    .await;
    assert_eq!(v["error"], "invalid_request");
    expect(c.get(t.url("/metadata/identity/oauth2/token")).send().await.expect("send"), 400, "metadata").await;
    let r = c
        .get(t.url(&format!("/metadata/identity/oauth2/token?{ok_query}")))
        .header("Metadata", "true")
        .header("X-Forwarded-For", "10.0.0.1")
        .send()
        .await
        .expect("send");
    expect(r, 400, "x-forwarded-for").await;
    let r = c
        .get(t.url(&format!("/metadata/identity/oauth2/token?{ok_query}")))
        .header("Metadata", "true")
        .header("Forwarded", "for=1.2.3.4")
        .send()
        .await
        .expect("send");
    expect(r, 400, "forwarded").await;
    expect(t.imds("resource=https://storage.azure.com").await, 400, "api-version").await;
    expect(t.imds("api-version=2017-09-01&resource=https://storage.azure.com").await, 400, "api-version").await;
    expect(t.imds("api-version=banana&resource=https://storage.azure.com").await, 400, "api-version").await;
    expect(t.imds("api-version=2018-02-01").await, 400, "resource is required").await;
    expect(t.imds(&format!("{ok_query}&resource=https://vault.azure.net")).await, 400, "more than once").await;
    expect(t.imds(&format!("{ok_query}&client_id=a&object_id=b")).await, 400, "at most one").await;
    expect(t.imds("api-version=2018-02-01&resource=https%3A%2").await, 400, "percent-encoding").await;
    // The IdP refuses the resource: the caller's error.
    expect(t.imds("api-version=2018-02-01&resource=https://forbidden.example").await, 400, "invalid_target").await;

    // App Service: the identity header.
    let app = |h: Option<&str>| {
        let mut r = c.get(t.url("/msi/token?api-version=2019-08-01&resource=https://storage.azure.com"));
        if let Some(h) = h {
            r = r.header("X-IDENTITY-HEADER", h);
        }
        r.send()
    };
    let v = expect(app(None).await.expect("send"), 401, "X-IDENTITY-HEADER").await;
    assert_eq!(v["statusCode"], 401);
    assert!(v["correlationId"].is_string());
    expect(app(Some("wrong")).await.expect("send"), 401, "does not match").await;
    let header = t.identity_header();
    assert_eq!(
        app(Some(&header)).await.expect("send").status(),
        200,
        "no Metadata header needed on the App Service route"
    );
    expect(t.app_service("resource=https://storage.azure.com").await, 400, "api-version").await;
    expect(t.app_service("api-version=2019-08-01").await, 400, "resource").await;

    // Only GET.
    let r = c
        .post(t.url(&format!("/metadata/identity/oauth2/token?{ok_query}")))
        .header("Metadata", "true")
        .send()
        .await
        .expect("send");
    assert_eq!(r.headers()["allow"], "GET, HEAD");
    expect(r, 405, "method POST").await;
    let v =
        expect(c.put(t.url("/msi/token")).header("X-IDENTITY-HEADER", &header).send().await.expect("send"), 405, "GET")
            .await;
    assert_eq!(v["statusCode"], 405);

    // Unknown paths, DNS rebinding.
    expect(
        c.get(t.url("/metadata/instance")).header("Metadata", "true").send().await.expect("send"),
        404,
        "no such endpoint",
    )
    .await;
    let r = c
        .get(t.url(&format!("/metadata/identity/oauth2/token?{ok_query}")))
        .header("Metadata", "true")
        .header("Host", "attacker.example")
        .send()
        .await
        .expect("send");
    expect(r, 400, "Host").await;
    let r = c
        .get(t.url(&format!("/metadata/identity/oauth2/token?{ok_query}")))
        .header("Metadata", "true")
        .header("Host", format!("localhost:{}", t.addr.port()))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200);

    // Health.
    assert_eq!(c.get(t.url("/healthz")).send().await.expect("send").status(), 200);
    assert_eq!(c.get(t.url("/readyz")).send().await.expect("send").status(), 200, "no configured resources: ready");
}

#[tokio::test(flavor = "multi_thread")]
async fn readiness_waits_for_configured_resources() {
    let idp = Idp::start(3600).await;
    idp.fault(serde_json::json!({ "delay_ms": 1500 })).await;
    let t =
        Tokend::start(&Opts::new(&idp).resources(&["https://management.azure.com/", "https://vault.azure.net"])).await;
    assert_eq!(http().get(t.url("/readyz")).send().await.expect("send").status(), 503, "not ready while fetching");
    t.wait_ready(std::time::Duration::from_secs(10)).await;
    let r = t.imds("api-version=2018-02-01&resource=https://management.azure.com/").await;
    assert_eq!(r.status(), 200);
    assert_eq!(idp.token_requests().await, 2, "configured resources are fetched at start, once each");
}
