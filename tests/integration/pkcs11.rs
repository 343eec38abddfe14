//! Certificate keys on a PKCS#11 token, for real: SoftHSM2 with the key generated on the token as
//! non-extractable (`pkcs11-tool`), the certificate made for it with OpenSSL's PKCS#11 engine, and the
//! test IdP verifying every assertion tokend signs on the token. Both algorithms, every error a
//! configuration can hold (exit 64 naming `certificate_key` and the PKCS#11 cause), a refused PIN never
//! tried twice, and the token taken away and given back under traffic.
//!
//! Each test has its own SoftHSM configuration and token directory (`SOFTHSM2_CONF`), given to the
//! processes it starts; this process never loads SoftHSM itself except in the extraction probe, a
//! child process of this test binary, because SoftHSM reads `SOFTHSM2_CONF` from the environment and
//! tests never call `set_var`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::*;

const SOFTHSM: &str = "/usr/lib/softhsm/libsofthsm2.so";
const PIN: &str = "1234";
const Q: &str = "api-version=2018-02-01&resource=https://storage.azure.com";

/// A SoftHSM token `tokend` with three RSA keys: `sp-key` (id 01; sensitive, never extractable, with
/// its certificate `sp.crt`), `other-key` (id 02, no certificate of its own) and `ext-key` (id 03,
/// created `--extractable`, certificate `ext.crt`).
struct Hsm {
    dir: tempfile::TempDir,
}

impl Hsm {
    fn new() -> Self {
        for (tool, package) in
            [(SOFTHSM, "softhsm2"), ("/usr/bin/pkcs11-tool", "opensc"), ("/usr/bin/softhsm2-util", "softhsm2")]
        {
            assert!(
                Path::new(tool).exists(),
                "{tool} is missing: apt-get install {package} (and softhsm2 opensc libengine-pkcs11-openssl; scripts/test.sh does)"
            );
        }
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(dir.path().join("tokens")).expect("mkdir");
        std::fs::write(
            dir.path().join("softhsm2.conf"),
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
                dir.path().join("tokens").display()
            ),
        )
        .expect("conf");
        std::fs::write(dir.path().join("pin"), format!("{PIN}\n")).expect("pin");
        std::fs::write(dir.path().join("wrong-pin"), "9999\n").expect("pin");
        let hsm = Self { dir };
        hsm.run(&format!("softhsm2-util --init-token --free --label tokend --pin {PIN} --so-pin 5678"));
        let tool = format!("pkcs11-tool --module {SOFTHSM} --token-label tokend --login --pin {PIN}");
        hsm.run(&format!("{tool} --keypairgen --key-type rsa:2048 --label sp-key --id 01 --private"));
        hsm.run(&format!("{tool} --keypairgen --key-type rsa:2048 --label other-key --id 02 --private"));
        hsm.run(&format!("{tool} --keypairgen --key-type rsa:2048 --label ext-key --id 03 --extractable"));
        for (key, cert) in [("sp-key", "sp.crt"), ("ext-key", "ext.crt")] {
            // Debian 12's libengine-pkcs11-openssl is an OpenSSL 3 *engine*, not a provider.
            hsm.run(&format!(
                "openssl req -new -x509 -days 365 -subj /CN=tokend-{key} -engine pkcs11 -keyform engine \
                 -key 'pkcs11:token=tokend;object={key};type=private;pin-value={PIN}' -out {cert} 2>&1 | \
                 grep -v '^Engine \"pkcs11\" set' >&2; test -s {cert}"
            ));
        }
        hsm
    }

    fn run(&self, script: &str) -> String {
        let out = Command::new("sh")
            .arg("-c")
            .arg(script)
            .current_dir(self.dir.path())
            .env("SOFTHSM2_CONF", self.conf())
            .output()
            .expect("sh");
        assert!(
            out.status.success(),
            "{script}: {}{} (needs softhsm2, opensc and libengine-pkcs11-openssl)",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn conf(&self) -> PathBuf {
        self.dir.path().join("softhsm2.conf")
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `certificate_file` + `certificate_key` for `object`, PIN from the file `pin`.
    fn credential(&self, cert: &str, path_attrs: &str, pin: &str) -> String {
        format!(
            "certificate_file = {:?}\ncertificate_key = \"pkcs11:token=tokend;{path_attrs};type=private?module-path={SOFTHSM}&pin-source=file:{}\"\n",
            self.path(cert),
            self.path(pin).display()
        )
    }
}

fn config(dir: &Path, idp_url: &str, credential: &str) -> (PathBuf, u16) {
    let port = free_port();
    let mut o = Opts::for_url(idp_url);
    o.client_id = "broker-cert".into();
    o.extra = credential.into();
    let config = write_config(dir, port, &o);
    let text = std::fs::read_to_string(&config).expect("read").replace("client_secret_file = \"client-secret\"\n", "");
    std::fs::write(&config, text).expect("write");
    (config, port)
}

fn check(hsm: &Hsm, config: &Path) -> Output {
    Command::new(tokend_bin())
        .args(["check", "--config"])
        .arg(config)
        .env("SOFTHSM2_CONF", hsm.conf())
        .output()
        .expect("run tokend check")
}

/// The JOSE header of the last client assertion the IdP received.
async fn last_assertion_header(idp: &Idp) -> Value {
    use base64::Engine;
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

/// The attack on the key itself, with the PIN: read its private exponent, wrap it out under a key
/// of one's own. Run as a child process of this test binary (see the module doc); `ext-key`, created
/// extractable, is the control that shows the probe can succeed.
#[test]
fn a_key_generated_on_the_token_cannot_be_read_or_wrapped_off_it_even_with_the_pin() {
    if let Some(conf) = std::env::var_os("TOKEND_TEST_PKCS11_PROBE") {
        let _ = conf; // the child: SOFTHSM2_CONF is set for it
        for label in ["sp-key", "ext-key"] {
            println!("probe {label}: {}", probe(label));
        }
        return;
    }
    let hsm = Hsm::new();
    let out = Command::new(std::env::current_exe().expect("test binary"))
        .args(["--exact", "pkcs11::a_key_generated_on_the_token_cannot_be_read_or_wrapped_off_it_even_with_the_pin"])
        .args(["--nocapture", "--test-threads=1"])
        .env("TOKEND_TEST_PKCS11_PROBE", "1")
        .env("SOFTHSM2_CONF", hsm.conf())
        .output()
        .expect("probe");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    let line = |label: &str| {
        let start = format!("probe {label}: ");
        let at = stdout.find(&start).unwrap_or_else(|| panic!("no probe line for {label}: {stdout}"));
        stdout[at..].lines().next().expect("a line").to_owned()
    };
    assert_eq!(
        line("sp-key"),
        "probe sp-key: sensitive=true extractable=false never_extractable=true exponent=hidden wrap=CKR_KEY_UNEXTRACTABLE"
    );
    assert!(line("ext-key").ends_with("wrap=ok"), "the control: an extractable key is wrapped: {}", line("ext-key"));
}

/// In the child: logs in and tries to take `label` off the token.
fn probe(label: &str) -> String {
    use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
    use cryptoki::mechanism::Mechanism;
    use cryptoki::object::{Attribute, AttributeType, ObjectClass};
    use cryptoki::session::UserType;
    let ctx = Pkcs11::new(SOFTHSM).expect("module");
    ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)).expect("init");
    let slot = ctx.get_slots_with_initialized_token().expect("slots")[0];
    let session = ctx.open_rw_session(slot).expect("session");
    session.login(UserType::User, Some(&PIN.to_owned().into())).expect("login");
    let key = session
        .find_objects(&[Attribute::Class(ObjectClass::PRIVATE_KEY), Attribute::Label(label.as_bytes().to_vec())])
        .expect("find")[0];
    let mut facts = Vec::new();
    let wanted = [
        AttributeType::Sensitive,
        AttributeType::Extractable,
        AttributeType::NeverExtractable,
        AttributeType::PrivateExponent,
    ];
    let attrs = session.get_attributes(key, &wanted).expect("attributes");
    for a in &attrs {
        match a {
            Attribute::Sensitive(b) => facts.push(format!("sensitive={b}")),
            Attribute::Extractable(b) => facts.push(format!("extractable={b}")),
            Attribute::NeverExtractable(b) => facts.push(format!("never_extractable={b}")),
            _ => {}
        }
    }
    let exponent = attrs.iter().any(|a| matches!(a, Attribute::PrivateExponent(d) if !d.is_empty()));
    facts.push(format!("exponent={}", if exponent { "READ" } else { "hidden" }));
    let wrapping = session
        .generate_key(
            &Mechanism::AesKeyGen,
            &[
                Attribute::Token(false),
                Attribute::ValueLen(32.into()),
                Attribute::Wrap(true),
                Attribute::Extractable(true),
            ],
        )
        .expect("an AES key of the attacker's own");
    let wrap = match session.wrap_key(&Mechanism::AesKeyWrapPad, wrapping, key) {
        Ok(_) => "ok".to_owned(),
        Err(cryptoki::error::Error::Pkcs11(rv, _)) => format!("{rv:?}"),
        Err(e) => e.to_string(),
    };
    let wrap = if wrap == "KeyUnextractable" { "CKR_KEY_UNEXTRACTABLE".to_owned() } else { wrap };
    facts.push(format!("wrap={wrap}"));
    facts.join(" ")
}

#[tokio::test(flavor = "multi_thread")]
async fn the_idp_verifies_assertions_signed_on_the_token_ps256_rs256_and_x5c() {
    use std::os::unix::fs::PermissionsExt;
    let hsm = Hsm::new();
    let idp = Idp::start_with_cert(3600, &hsm.path("sp.crt")).await;
    // The certificate alone is public: readable by all, and no warning for it.
    std::fs::set_permissions(hsm.path("sp.crt"), std::fs::Permissions::from_mode(0o644)).expect("chmod");
    std::fs::set_permissions(hsm.path("pin"), std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let conf = hsm.conf();
    let env = [("SOFTHSM2_CONF", conf.to_str().expect("utf8"))];
    let cases = [
        (String::new(), "PS256", "x5t#S256"),
        ("assertion_alg = \"RS256\"\n".to_owned(), "RS256", "x5t"),
        ("send_certificate_chain = true\n".to_owned(), "PS256", "x5c"),
    ];
    for (extra, alg, header) in cases {
        let dir = tempfile::tempdir().expect("tempdir");
        let credential = format!("{}{extra}", hsm.credential("sp.crt", "object=sp-key", "pin"));
        let (config, port) = config(dir.path(), &idp.token_url(), &credential);
        let t = Tokend::spawn(dir, config.clone(), port, &env).await;
        let r = t.imds(Q).await;
        assert_eq!(r.status(), 200, "{alg} {header}: {}", t.logs());
        let v: Value = r.json().await.expect("json");
        let claims = jwt_claims(v["access_token"].as_str().expect("token"));
        assert_eq!(claims["client_id"], "broker-cert", "the IdP authenticated the certificate client");
        let h = last_assertion_header(&idp).await;
        assert_eq!(h["alg"], alg, "{h}");
        assert!(h.get(header).is_some(), "{header} in {h}");
        assert!(!t.logs().contains("can be read by"), "no mode warning for a certificate-only PEM: {}", t.logs());
        // `tokend check` says where the key lives and that it stays there.
        let out = check(&hsm, &config);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
        let key_line = stdout.lines().find(|l| l.starts_with("key   ")).unwrap_or_else(|| panic!("{stdout}"));
        for needle in ["\"sp-key\" (id 01)", "token \"tokend\"", SOFTHSM, "sensitive, not extractable (never was)"] {
            assert!(key_line.contains(needle), "{needle} in {key_line}");
        }
        assert!(!stdout.contains("warn"), "{stdout}");
    }
    // No key material anywhere in tokend's files: the certificate file holds certificates only.
    let pem = std::fs::read_to_string(hsm.path("sp.crt")).expect("read");
    assert!(pem.contains("BEGIN CERTIFICATE") && !pem.contains("PRIVATE KEY"));
}

#[tokio::test(flavor = "multi_thread")]
async fn every_token_problem_is_a_config_error_naming_certificate_key_and_the_cause() {
    let hsm = Hsm::new();
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(hsm.path("with-key.pem"), {
        let mut pem = std::fs::read_to_string(hsm.path("sp.crt")).expect("cert");
        pem.push_str("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n");
        pem
    })
    .expect("write");
    let uri = |attrs: &str, query: &str| {
        format!(
            "certificate_file = {:?}\ncertificate_key = \"pkcs11:token=tokend;{attrs}?{query}\"\n",
            hsm.path("sp.crt")
        )
    };
    let pin = format!("pin-source=file:{}", hsm.path("pin").display());
    let module = format!("module-path={SOFTHSM}");
    let cases = [
        (
            hsm.credential("sp.crt", "object=sp-key", "wrong-pin"),
            "identity[0].certificate_key",
            "C_Login: CKR_PIN_INCORRECT",
        ),
        (
            uri("object=sp-key", &format!("module-path=/usr/lib/nowhere/libnothing.so&{pin}")),
            "identity[0].certificate_key",
            "cannot load the PKCS#11 module /usr/lib/nowhere/libnothing.so",
        ),
        (
            hsm.credential("sp.crt", "object=sp-key", "pin").replace("token=tokend", "token=elsewhere"),
            "identity[0].certificate_key",
            "no token matches token=\"elsewhere\"",
        ),
        (
            hsm.credential("sp.crt", "object=no-such-key", "pin"),
            "identity[0].certificate_key",
            "no private key matches token=\"tokend\" object=\"no-such-key\"",
        ),
        (
            hsm.credential("sp.crt", "object=other-key", "pin"),
            "identity[0].certificate_key",
            "does not belong to the certificate",
        ),
        (
            uri("type=private", &format!("{module}&{pin}")),
            "identity[0].certificate_key",
            "3 private keys match token=\"tokend\" on token \"tokend\"; add object= or id=",
        ),
        (hsm.credential("sp.crt", "object=sp-key", "no-pin-file"), "certificate_key pin-source", "cannot read"),
        (uri("object=sp-key", &format!("{module}&pin-value=1234")), "identity[0].certificate_key", "pin-value"),
        (uri("object=sp-key", &module), "identity[0].certificate_key", "pin-source is missing"),
        (hsm.credential("with-key.pem", "object=sp-key", "pin"), "identity[0].certificate_file", "holds a private key"),
        (
            format!(
                "{}certificate_password_file = {:?}\n",
                hsm.credential("sp.crt", "object=sp-key", "pin"),
                hsm.path("pin")
            ),
            "certificate_password_file",
            "conflicts with certificate_key",
        ),
    ];
    for (credential, key, cause) in cases {
        let (config, port) = config(dir.path(), "http://127.0.0.1:9/t/oauth2/v2.0/token", &credential);
        // `serve`, so that "before any port is bound" is checked too.
        let started = Instant::now();
        let out = Command::new(tokend_bin())
            .args(["serve", "--config"])
            .arg(&config)
            .env("SOFTHSM2_CONF", hsm.conf())
            .output()
            .expect("run");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{credential}: {stderr}");
        assert!(stderr.contains(key) && stderr.contains(cause), "{key} / {cause}: {stderr}");
        assert!(!stderr.contains("listening"), "{stderr}");
        assert!(std::net::TcpListener::bind(("127.0.0.1", port)).is_ok(), "the port was never bound");
        assert!(started.elapsed() < Duration::from_secs(10));
    }
    // An extractable key works, with a warning at start and in `tokend check`.
    let (config, _) = config(
        dir.path(),
        "http://127.0.0.1:9/t/oauth2/v2.0/token",
        &hsm.credential("ext.crt", "object=ext-key", "pin"),
    );
    let out = check(&hsm, &config);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let warn = stdout
        .lines()
        .find(|l| l.starts_with("warn") && l.contains("certificate_key"))
        .unwrap_or_else(|| panic!("{stdout}"));
    assert!(
        warn.contains("\"ext-key\"") && warn.contains("extractable") && warn.contains("copied off the token"),
        "{warn}"
    );
    assert!(stdout.lines().any(|l| l.starts_with("key   ") && l.contains("EXTRACTABLE")), "{stdout}");
}

#[test]
fn a_refused_pin_is_never_tried_twice() {
    // Two identities with the same wrong PIN for one token: the first login is refused, the second
    // identity's is not attempted (HSMs and TPMs lock after a few wrong PINs; SoftHSM does not, so
    // the message is what shows that C_Login was not called).
    let hsm = Hsm::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let wrong = hsm.credential("sp.crt", "object=sp-key", "wrong-pin");
    let second = format!(
        "[[identity]]\nname = \"second\"\nclient_id = \"broker-cert\"\ntoken_url = \"http://127.0.0.1:9/t\"\n{wrong}"
    );
    let (config, _) = config(dir.path(), "http://127.0.0.1:9/t/oauth2/v2.0/token", &format!("{wrong}{second}"));
    let out = check(&hsm, &config);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(
        stderr.contains("identity[0].certificate_key") && stderr.contains("C_Login: CKR_PIN_INCORRECT"),
        "{stderr}"
    );
    assert!(
        stderr.contains("identity[1].certificate_key")
            && stderr.contains("CKR_PIN_INCORRECT earlier with this PIN; tokend does not try a refused PIN again"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rotated_pin_file_is_checked_without_logging_the_running_key_out() {
    let hsm = Hsm::new();
    let idp = Idp::start_with_cert(3600, &hsm.path("sp.crt")).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let pin = dir.path().join("pin");
    std::fs::copy(hsm.path("pin"), &pin).expect("copy");
    let credential = hsm
        .credential("sp.crt", "object=sp-key", "pin")
        .replace(&hsm.path("pin").display().to_string(), &pin.display().to_string());
    let (config, port) = config(dir.path(), &idp.token_url(), &credential);
    let conf = hsm.conf();
    let t = Tokend::spawn(dir, config, port, &[("SOFTHSM2_CONF", conf.to_str().expect("utf8"))]).await;
    assert_eq!(t.imds(Q).await.status(), 200, "{}", t.logs());
    let wait_for = |needle: &'static str, count: usize| {
        let t = &t;
        async move {
            let deadline = Instant::now() + Duration::from_secs(15);
            while t.logs().matches(needle).count() < count {
                assert!(Instant::now() < deadline, "{needle} x{count}: {}", t.logs());
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    // Another PIN in the file: the reload is rejected (a second C_Login cannot check it while the
    // running key is logged in) and the running credential keeps serving.
    std::fs::write(&pin, "9999\n").expect("write");
    wait_for("is logged in with another PIN", 1).await;
    assert!(t.logs().contains("REJECTED"), "{}", t.logs());
    let r = t.imds("api-version=2018-02-01&resource=https://vault.azure.net").await;
    assert_eq!(r.status(), 200, "still signing on the token: {}", t.logs());
    // The same PIN again (the file rewritten): reloaded.
    let reloads = t.logs().matches("configuration reloaded").count();
    std::fs::write(&pin, format!("{PIN}\n")).expect("write");
    wait_for("configuration reloaded", reloads + 1).await;
    let r = t.imds("api-version=2018-02-01&resource=https://management.azure.com").await;
    assert_eq!(r.status(), 200, "{}", t.logs());
}

#[tokio::test(flavor = "multi_thread")]
async fn the_token_taken_away_and_given_back_under_traffic() {
    let hsm = Hsm::new();
    // Short-lived tokens: the refresh falls into the time the token is away.
    let idp = Idp::start_with_cert(12, &hsm.path("sp.crt")).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (config, port) = config(dir.path(), &idp.token_url(), &hsm.credential("sp.crt", "object=sp-key", "pin"));
    std::fs::write(
        &config,
        std::fs::read_to_string(&config)
            .expect("read")
            .replace("resources = []", "resources = [\"https://storage.azure.com\"]")
            .replace("min_lifetime = \"5s\"", "min_lifetime = \"2s\""),
    )
    .expect("write");
    let conf = hsm.conf();
    let t = Tokend::spawn(dir, config, port, &[("SOFTHSM2_CONF", conf.to_str().expect("utf8"))]).await;
    t.wait_ready(Duration::from_secs(10)).await;
    let token = |v: Value| v["access_token"].as_str().expect("token").to_owned();
    let first = token(t.imds(Q).await.json().await.expect("json"));

    // The token's storage vanishes (a device unplugged, an HSM daemon gone).
    let (tokens, away) = (hsm.path("tokens"), hsm.path("tokens-away"));
    std::fs::rename(&tokens, &away).expect("take the token away");
    let requests_before = idp.token_requests().await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while !t.logs().contains("signing on PKCS#11 token \"tokend\" failed") {
        assert!(Instant::now() < deadline, "the refresh while the token is away: {}", t.logs());
        let r = t.imds(Q).await;
        assert_eq!(r.status(), 200, "the cached token keeps being served: {}", t.logs());
        assert_eq!(token(r.json().await.expect("json")), first);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(idp.token_requests().await, requests_before, "nothing reached the IdP without a signature");
    // Still served from the cache while the refresh fails.
    for _ in 0..5 {
        assert_eq!(t.imds(Q).await.status(), 200);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Given back: signing recovers by itself (a new PKCS#11 context) and a new token is served.
    std::fs::rename(&away, &tokens).expect("give the token back");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = t.imds(Q).await;
        assert_eq!(r.status(), 200, "{}", t.logs());
        if token(r.json().await.expect("json")) != first {
            break;
        }
        assert!(Instant::now() < deadline, "no new token after the token came back: {}", t.logs());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(idp.token_requests().await > requests_before);
}

/// A software TPM 2.0 (`swtpm`) behind a resource manager (`tpm2-abrmd` on a D-Bus session bus of its
/// own: without one, `tpm2_ptool` runs the TPM out of object contexts, TPM error 0x902), with a
/// `tpm2-pkcs11` store holding token `tokend` and the non-extractable RSA key `sp-key` made in the TPM.
struct Tpm {
    dir: tempfile::TempDir,
    children: Vec<std::process::Child>,
}

const TPM2_PKCS11: &str = "/usr/lib/x86_64-linux-gnu/pkcs11/libtpm2_pkcs11.so";

impl Tpm {
    fn new() -> Self {
        for (tool, package) in [
            ("/usr/bin/swtpm", "swtpm"),
            ("/usr/sbin/tpm2-abrmd", "tpm2-abrmd"),
            ("/usr/bin/dbus-daemon", "dbus"),
            ("/usr/bin/tpm2_ptool", "libtpm2-pkcs11-tools"),
            (TPM2_PKCS11, "libtpm2-pkcs11-1"),
            ("/usr/bin/pkcs11-tool", "opensc"),
        ] {
            assert!(
                Path::new(tool).exists(),
                "{tool} is missing: apt-get install {package} (scripts/test.sh installs swtpm, tpm2-abrmd, dbus, \
                 libtpm2-pkcs11-1, libtpm2-pkcs11-tools, libtss2-tcti-swtpm0, libtss2-tcti-tabrmd0)"
            );
        }
        let dir = tempfile::tempdir().expect("tempdir");
        for d in ["state", "store"] {
            std::fs::create_dir(dir.path().join(d)).expect("mkdir");
        }
        let mut tpm = Self { dir, children: Vec::new() };
        let (state, bus) = (tpm.path("state"), tpm.path("bus"));
        let spawn = |tpm: &mut Self, program: &str, args: &[String]| {
            let log = std::fs::File::create(tpm.path(&format!("{}.log", program.rsplit('/').next().expect("name"))))
                .expect("log");
            let child = Command::new(program)
                .args(args)
                .envs(tpm.env())
                .stdout(log.try_clone().expect("dup"))
                .stderr(log)
                .spawn()
                .unwrap_or_else(|e| panic!("{program}: {e}"));
            tpm.children.push(child);
        };
        // The swtpm TCTI expects the control channel on the next port: a pair of free ports, tried
        // again when another test took one of them meanwhile.
        let mut port = 0;
        for attempt in 0.. {
            port = free_port();
            if std::net::TcpListener::bind(("127.0.0.1", port + 1)).is_err() {
                continue;
            }
            spawn(
                &mut tpm,
                "swtpm",
                &[
                    "socket".into(),
                    "--tpm2".into(),
                    "--tpmstate".into(),
                    format!("dir={}", state.display()),
                    "--server".into(),
                    format!("type=tcp,port={port},bindaddr=127.0.0.1"),
                    "--ctrl".into(),
                    format!("type=tcp,port={},bindaddr=127.0.0.1", port + 1),
                    "--flags".into(),
                    "not-need-init,startup-clear".into(),
                ],
            );
            let deadline = Instant::now() + Duration::from_secs(10);
            let exited = loop {
                if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    break false;
                }
                let swtpm = tpm.children.last_mut().expect("swtpm");
                if swtpm.try_wait().ok().flatten().is_some() {
                    break true;
                }
                assert!(Instant::now() < deadline, "swtpm did not start: {}", tpm.logs());
                std::thread::sleep(Duration::from_millis(50));
            };
            if !exited {
                break;
            }
            tpm.children.pop();
            assert!(attempt < 5, "swtpm cannot listen: {}", tpm.logs());
        }
        spawn(
            &mut tpm,
            "dbus-daemon",
            &["--session".into(), "--nofork".into(), format!("--address=unix:path={}", bus.display())],
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while !tpm.path("bus").exists() {
            assert!(Instant::now() < deadline, "dbus-daemon did not start: {}", tpm.logs());
            std::thread::sleep(Duration::from_millis(50));
        }
        spawn(
            &mut tpm,
            "tpm2-abrmd",
            &["--session".into(), format!("--tcti=swtpm:host=127.0.0.1,port={port}"), "--allow-root".into()],
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        let store = tpm.path("store").display().to_string();
        while !tpm.try_run(&format!("tpm2_ptool init --path={store}")) {
            assert!(Instant::now() < deadline, "tpm2-abrmd did not come up: {}", tpm.logs());
            std::thread::sleep(Duration::from_millis(200));
        }
        tpm.run(&format!("tpm2_ptool addtoken --path={store} --pid=1 --label=tokend --userpin={PIN} --sopin=5678"));
        tpm.run(&format!(
            "tpm2_ptool addkey --path={store} --label=tokend --key-label=sp-key --userpin={PIN} --algorithm=rsa2048"
        ));
        // Debian 12's OpenSSL engine cannot log into a tpm2-pkcs11 token (C_Login: "General Error" in
        // libp11's p11_slot.c), so the certificate is issued for the TPM key's public key by a
        // throw-away CA (-force_pubkey): the IdP, like Entra, checks the thumbprint and the signature
        // with the certificate's key, not who signed the certificate.
        tpm.run(&format!(
            "pkcs11-tool --module {TPM2_PKCS11} --token-label tokend --login --pin {PIN} --read-object --type pubkey \
             --label sp-key -o pub.der && openssl pkey -pubin -inform DER -in pub.der -out pub.pem && \
             openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days 365 -subj /CN=throwaway-ca \
             2>/dev/null && openssl req -new -key ca.key -subj /CN=tokend-tpm 2>/dev/null | openssl x509 -req \
             -CA ca.crt -CAkey ca.key -force_pubkey pub.pem -days 365 -out tpm.crt 2>/dev/null && rm ca.key"
        ));
        std::fs::write(tpm.path("pin"), format!("{PIN}\n")).expect("pin");
        tpm
    }

    fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("DBUS_SESSION_BUS_ADDRESS", format!("unix:path={}", self.path("bus").display())),
            ("TPM2TOOLS_TCTI", "tabrmd:bus_type=session".to_owned()),
            ("TPM2_PKCS11_TCTI", "tabrmd:bus_type=session".to_owned()),
            ("TPM2_PKCS11_STORE", self.path("store").display().to_string()),
        ]
    }

    fn try_run(&self, script: &str) -> bool {
        Command::new("sh")
            .arg("-c")
            .arg(script)
            .current_dir(self.dir.path())
            .envs(self.env())
            .output()
            .is_ok_and(|o| o.status.success())
    }

    fn run(&self, script: &str) {
        let out = Command::new("sh")
            .arg("-c")
            .arg(script)
            .current_dir(self.dir.path())
            .envs(self.env())
            .output()
            .expect("sh");
        assert!(
            out.status.success(),
            "{script}: {}{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.logs()
        );
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn logs(&self) -> String {
        ["swtpm.log", "dbus-daemon.log", "tpm2-abrmd.log"]
            .iter()
            .map(|l| format!("{l}: {}", std::fs::read_to_string(self.path(l)).unwrap_or_default()))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for Tpm {
    fn drop(&mut self) {
        for child in self.children.iter_mut().rev() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tpm_key_through_tpm2_pkcs11_on_swtpm_signs_for_the_idp() {
    let tpm = Tpm::new();
    let idp = Idp::start_with_cert(3600, &tpm.path("tpm.crt")).await;
    let env = tpm.env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    for alg in ["PS256", "RS256"] {
        let dir = tempfile::tempdir().expect("tempdir");
        let credential = format!(
            "certificate_file = {:?}\ncertificate_key = \"pkcs11:token=tokend;object=sp-key;type=private?module-path={TPM2_PKCS11}&pin-source=file:{}\"\nassertion_alg = \"{alg}\"\n",
            tpm.path("tpm.crt"),
            tpm.path("pin").display()
        );
        let (config, port) = config(dir.path(), &idp.token_url(), &credential);
        let out = Command::new(tokend_bin())
            .args(["check", "--config"])
            .arg(&config)
            .envs(env.iter().copied())
            .output()
            .expect("check");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
        assert!(
            stdout.lines().any(|l| l.starts_with("key   ")
                && l.contains("(IBM)")
                && l.contains("sensitive, not extractable (never was)")),
            "the key is in the (software) TPM: {stdout}"
        );
        let t = Tokend::spawn(dir, config, port, &env).await;
        let r = t.imds(Q).await;
        assert_eq!(r.status(), 200, "{alg}: {}", t.logs());
        let v: Value = r.json().await.expect("json");
        assert_eq!(jwt_claims(v["access_token"].as_str().expect("token"))["client_id"], "broker-cert");
        assert_eq!(last_assertion_header(&idp).await["alg"], alg);
    }
}
