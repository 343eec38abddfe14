//! Certificate, federated and systemd credentials against the real IdP (which checks `x5t`/`x5t#S256`
//! like Entra and rejects replayed assertions), certificate expiry warnings and clock-skew detection.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

use base64::Engine;
use rustls_pki_types::pem::PemObject;
use serde_json::{Value, json};

use crate::support::*;

const Q: &str = "api-version=2018-02-01&resource=https://storage.azure.com";

/// A client certificate and its key in every shape the tests need: PEM, three PFX encodings.
struct ClientCert {
    dir: tempfile::TempDir,
}

impl ClientCert {
    fn new(days: u32) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let run = |args: String| {
            let out = Command::new("sh").arg("-c").arg(&args).current_dir(dir.path()).output().expect("sh");
            assert!(out.status.success(), "{args}: {} (openssl is required)", String::from_utf8_lossy(&out.stderr));
        };
        run(format!(
            "openssl req -x509 -newkey rsa:2048 -nodes -keyout client.key -out client.crt -days {days} -subj /CN=tokend-test 2>/dev/null"
        ));
        run("cat client.crt client.key > client.pem".into());
        run("openssl pkcs12 -export -inkey client.key -in client.crt -out client-aes.pfx -passout pass:pfxpass".into());
        run("openssl pkcs12 -export -inkey client.key -in client.crt -out client-3des.pfx -passout pass:pfxpass -certpbe PBE-SHA1-3DES -keypbe PBE-SHA1-3DES -macalg sha1".into());
        run("openssl pkcs12 -export -legacy -inkey client.key -in client.crt -out client-legacy.pfx -passout pass:pfxpass".into());
        std::fs::write(dir.path().join("pfx-password"), "pfxpass\n").expect("write");
        std::fs::write(dir.path().join("wrong-password"), "nope\n").expect("write");
        Self { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

fn identity_with(idp: &Idp, client_id: &str, credential_toml: &str) -> Opts {
    let mut o = Opts::new(idp);
    o.client_id = client_id.into();
    o.secret = String::new();
    o.extra = credential_toml.into();
    o
}

/// Writes a config whose only credential is `credential_toml` (the harness's secret file line removed).
async fn start(o: &Opts, env: &[(&str, &str)]) -> Tokend {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let config = write_config(dir.path(), port, o);
    let text = std::fs::read_to_string(&config).expect("read").replace("client_secret_file = \"client-secret\"\n", "");
    std::fs::write(&config, text).expect("write");
    Tokend::spawn(dir, config, port, env).await
}

/// The JOSE header of the last client assertion the IdP received.
async fn last_assertion_header(idp: &Idp) -> Value {
    let reqs = idp.requests().await;
    let body = reqs.iter().rev().find(|r| r["method"] == "POST").expect("a token request")["body"]
        .as_str()
        .expect("body")
        .to_owned();
    let assertion = form_urlencoded::parse(body.as_bytes())
        .find(|(k, _)| k == "client_assertion")
        .expect("client_assertion")
        .1
        .into_owned();
    let head = assertion.split('.').next().expect("jwt");
    serde_json::from_slice(&base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(head).expect("b64")).expect("json")
}

fn client_of(v: &Value) -> String {
    jwt_claims(v["access_token"].as_str().unwrap_or_else(|| panic!("no token: {v}")))["client_id"]
        .as_str()
        .expect("cid")
        .to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn certificates_pem_and_every_pfx_encoding_with_ps256_and_rs256() {
    let c = ClientCert::new(365);
    let idp = Idp::start_with_cert(3600, &c.path("client.crt")).await;
    let cases = [
        (format!("certificate_file = {:?}\n", c.path("client.pem")), "PS256"),
        (format!("certificate_file = {:?}\nassertion_alg = \"RS256\"\n", c.path("client.pem")), "RS256"),
        (
            format!(
                "certificate_file = {:?}\ncertificate_password_file = {:?}\n",
                c.path("client-aes.pfx"),
                c.path("pfx-password")
            ),
            "PS256",
        ),
        (
            format!(
                "certificate_file = {:?}\ncertificate_password_file = {:?}\n",
                c.path("client-3des.pfx"),
                c.path("pfx-password")
            ),
            "PS256",
        ),
        (
            format!(
                "certificate_file = {:?}\ncertificate_password_file = {:?}\nassertion_alg = \"RS256\"\n",
                c.path("client-legacy.pfx"),
                c.path("pfx-password")
            ),
            "RS256",
        ),
        (format!("certificate_file = {:?}\nsend_certificate_chain = true\n", c.path("client.pem")), "PS256"),
    ];
    for (toml, alg) in cases {
        let t = start(&identity_with(&idp, "broker-cert", &toml), &[]).await;
        let r = t.imds(Q).await;
        assert_eq!(r.status(), 200, "{toml}\n{}", t.logs());
        assert_eq!(client_of(&r.json().await.expect("json")), "broker-cert");
        let h = last_assertion_header(&idp).await;
        assert_eq!(h["alg"], alg, "{toml}");
        let thumb = if alg == "PS256" { "x5t#S256" } else { "x5t" };
        assert!(h[thumb].is_string() && h.as_object().expect("obj").len() <= 4, "{toml}: {h}");
        assert_eq!(h["x5c"].is_array(), toml.contains("send_certificate_chain"), "{h}");
    }
    // Each assertion had a fresh jti: six tokend processes, no replay rejection.
    assert_eq!(idp.token_requests().await, 6);
}

#[test]
fn a_wrong_pfx_password_or_bad_key_is_a_config_error_naming_the_file() {
    let c = ClientCert::new(365);
    let dir = tempfile::tempdir().expect("tempdir");
    let cases = [
        (
            format!(
                "certificate_file = {:?}\ncertificate_password_file = {:?}\n",
                c.path("client-aes.pfx"),
                c.path("wrong-password")
            ),
            "client-aes.pfx",
        ),
        (format!("certificate_file = {:?}\n", c.path("client.crt")), "client.crt"),
        (format!("certificate_file = {:?}\nclient_secret_file = \"x\"\n", c.path("client.pem")), "conflicts"),
        (
            format!("client_secret_file = {:?}\nassertion_alg = \"RS256\"\n", c.path("pfx-password")),
            "only applies to a certificate",
        ),
        (
            format!("certificate_file = {:?}\nassertion_alg = \"ES256\"\n", c.path("client.pem")),
            "identity[0].assertion_alg",
        ),
    ];
    for (toml, needle) in cases {
        let mut o = Opts::for_url("http://127.0.0.1:9/t/oauth2/v2.0/token");
        o.extra = toml.clone();
        let config = write_config(dir.path(), free_port(), &o);
        let text =
            std::fs::read_to_string(&config).expect("read").replace("client_secret_file = \"client-secret\"\n", "");
        std::fs::write(&config, text).expect("write");
        let out = Command::new(tokend_bin()).args(["check", "--config"]).arg(&config).output().expect("run");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{toml}: {stderr}");
        assert!(stderr.contains(needle) && stderr.contains("identity[0]"), "{toml}: {stderr}");
    }
}

fn thumbprint_s256(cert_pem: &Path) -> String {
    let pem = std::fs::read(cert_pem).expect("cert");
    let der = rustls_pki_types::CertificateDer::from_pem_slice(&pem).expect("pem");
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, der.as_ref());
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(digest.as_ref())
}

/// A federated assertion as Kubernetes would project it: signed by the registered key, fresh jti.
fn mint_assertion(c: &ClientCert, token_url: &str) -> String {
    let key = jsonwebtoken::EncodingKey::from_rsa_pem(&std::fs::read(c.path("client.key")).expect("key")).expect("rsa");
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::PS256);
    header.x5t_s256 = Some(thumbprint_s256(&c.path("client.crt")));
    let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).expect("clock").as_secs();
    let claims = json!({ "aud": token_url, "iss": "broker-fed", "sub": "broker-fed", "jti": uuid::Uuid::new_v4().to_string(),
                          "iat": now, "nbf": now, "exp": now + 600 });
    jsonwebtoken::encode(&header, &claims, &key).expect("sign")
}

#[tokio::test(flavor = "multi_thread")]
async fn federated_token_file_is_read_anew_for_every_request() {
    let c = ClientCert::new(365);
    let idp = Idp::start_with_cert(3600, &c.path("client.crt")).await;
    let fed = c.path("federated-token");
    std::fs::write(&fed, mint_assertion(&c, &idp.token_url())).expect("write");
    let t = start(&identity_with(&idp, "broker-fed", &format!("federated_token_file = {fed:?}\n")), &[]).await;
    let r = t.imds(Q).await;
    assert_eq!(r.status(), 200, "{}", t.logs());
    assert_eq!(client_of(&r.json().await.expect("json")), "broker-fed");
    // The IdP refuses a replayed assertion: a second resource succeeds only because tokend reads the
    // rotated file instead of a cached copy.
    std::fs::write(&fed, mint_assertion(&c, &idp.token_url())).expect("rotate");
    let r = t.imds("api-version=2018-02-01&resource=https://vault.azure.net").await;
    assert_eq!(r.status(), 200, "{}", t.logs());
    assert_eq!(idp.token_requests().await, 2);
}

/// A PKCS#12 file replaced by one with another key (binary, same path and password) is picked up by the
/// credential-file poll: the IdP rejects the old certificate, then accepts the new one, with no restart
/// and no retry loop against the rejection.
#[tokio::test(flavor = "multi_thread")]
async fn a_rotated_pkcs12_certificate_is_picked_up_without_restart() {
    let (old, new) = (ClientCert::new(365), ClientCert::new(365));
    let idp = Idp::start_with_cert(3600, &new.path("client.crt")).await;
    let creds = tempfile::tempdir().expect("tempdir");
    let (pfx, password) = (creds.path().join("cert.pfx"), creds.path().join("cert-password"));
    std::fs::copy(old.path("client-aes.pfx"), &pfx).expect("copy the old certificate");
    std::fs::write(&password, "pfxpass\n").expect("write");
    let toml = format!("certificate_file = {pfx:?}\ncertificate_password_file = {password:?}\n");
    let t = start(&identity_with(&idp, "broker-cert", &toml), &[]).await;
    assert_eq!(t.imds(Q).await.status(), 500, "the IdP does not know the old certificate:\n{}", t.logs());
    assert_eq!(last_assertion_header(&idp).await["x5t#S256"], thumbprint_s256(&old.path("client.crt")));
    let pid = t.pid();

    // Rotate as rotation tools do: write a sibling temp file, then rename it over the watched path, so the
    // poll can never read a half-written PFX (which would be REJECTED once before the complete one loads).
    let staged = creds.path().join(".cert.pfx.tmp");
    std::fs::copy(new.path("client-aes.pfx"), &staged).expect("stage the new certificate");
    std::fs::rename(&staged, &pfx).expect("rename over the old certificate");
    let started = Instant::now();
    let r = loop {
        let r = t.imds(Q).await;
        if r.status() == 200 {
            break r;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "rotation not picked up within 10 s:\n{}", t.logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    eprintln!("rotated certificate picked up after {:?}", started.elapsed());
    assert_eq!(t.pid(), pid, "no restart");
    assert!(t.logs().contains("configuration reloaded"), "{}", t.logs());
    assert_eq!(client_of(&r.json().await.expect("json")), "broker-cert");
    assert_eq!(last_assertion_header(&idp).await["x5t#S256"], thumbprint_s256(&new.path("client.crt")));
    // One rejected assertion and one accepted (2 in practice; 3 leaves room for timing). More is a retry loop.
    let requests = idp.token_requests().await;
    assert!(requests <= 3, "{requests} token requests: the rejection backoff was reset, no loop");
}

#[tokio::test(flavor = "multi_thread")]
async fn systemd_credentials_and_azure_certificate_variables() {
    let c = ClientCert::new(365);
    let idp = Idp::start_with_cert(3600, &c.path("client.crt")).await;
    let creds = tempfile::tempdir().expect("tempdir");
    std::fs::write(creds.path().join("secret"), SECRET).expect("write");
    std::fs::copy(c.path("client-aes.pfx"), creds.path().join("cert")).expect("copy");
    std::fs::write(creds.path().join("cert-password"), "pfxpass").expect("write");
    let dir = creds.path().to_str().expect("utf8");

    let t = start(
        &identity_with(&idp, CLIENT_ID, "client_secret_credential = \"secret\"\n"),
        &[("CREDENTIALS_DIRECTORY", dir)],
    )
    .await;
    assert_eq!(client_of(&t.imds(Q).await.json().await.expect("json")), CLIENT_ID);
    let toml = "certificate_credential = \"cert\"\ncertificate_password_credential = \"cert-password\"\n";
    let t = start(&identity_with(&idp, "broker-cert", toml), &[("CREDENTIALS_DIRECTORY", dir)]).await;
    assert_eq!(client_of(&t.imds(Q).await.json().await.expect("json")), "broker-cert");

    // No [[identity]]: the Azure SDK variables, certificate flavour.
    let tmp = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let config = tmp.path().join("tokend.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = [\"127.0.0.1:{port}\"]\nidentity_header_file = \"h\"\n[tokens]\nmin_lifetime = \"5s\"\n"
        ),
    )
    .expect("write");
    let authority = format!("http://127.0.0.1:{}", idp.port);
    let pfx = c.path("client-3des.pfx");
    let env = [
        ("AZURE_TENANT_ID", TENANT),
        ("AZURE_CLIENT_ID", "broker-cert"),
        ("AZURE_CLIENT_CERTIFICATE_PATH", pfx.to_str().expect("utf8")),
        ("AZURE_CLIENT_CERTIFICATE_PASSWORD", "pfxpass"),
        ("AZURE_AUTHORITY_HOST", authority.as_str()),
    ];
    let t = Tokend::spawn(tmp, config, port, &env).await;
    assert_eq!(client_of(&t.imds(Q).await.json().await.expect("json")), "broker-cert", "{}", t.logs());
}

#[tokio::test(flavor = "multi_thread")]
async fn expiring_certificates_and_clock_skew_are_warned_about() {
    let c = ClientCert::new(10);
    let idp = Idp::start_with_cert(3600, &c.path("client.crt")).await;
    let o = identity_with(&idp, "broker-cert", &format!("certificate_file = {:?}\n", c.path("client.pem")));
    let mut t = start(&o, &[]).await;
    assert!(t.logs().contains("expires in 9 days"), "{}", t.logs());
    let out = Command::new(tokend_bin()).args(["check", "--config"]).arg(&t.config).output().expect("check");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && stdout.contains("warn") && stdout.contains("expires in 9 days"), "{stdout}");

    // The IdP's Date is two hours ahead of ours.
    let date = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(7200));
    // (Retry-After beyond max_wait: the caller gets the 503 at once instead of waiting for a retry.)
    idp.fault(json!({ "status": 503, "count": 1, "headers": { "Date": date, "Retry-After": "30" } })).await;
    assert_eq!(t.imds(Q).await.status(), 503);
    assert!(t.logs().contains("clock skew"), "{}", t.logs());
    let config = t.config.clone();
    let _keep_dir = std::mem::replace(&mut t.dir, tempfile::tempdir().expect("tempdir"));
    drop(t); // its refresher would consume the next fault
    idp.fault(json!({ "status": 503, "count": 1, "headers": { "Date": date } })).await;
    let out = Command::new(tokend_bin()).args(["check", "--config"]).arg(&config).output().expect("check");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("clock differs from this host's by 7"), "{stdout}");
}
