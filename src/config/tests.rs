//! Configuration unit tests: every error names the file, the key and the problem.

use super::*;
use crate::identity::TokenApi;

fn no_env(_: &str) -> Option<String> {
    None
}

struct Dir(tempfile::TempDir);
impl Dir {
    fn new() -> Self {
        let d = tempfile::tempdir().expect("tempdir");
        std::fs::write(d.path().join("secret"), "s3cret-value\n").expect("write");
        Self(d)
    }
    fn load(&self, text: &str) -> Result<Config, ConfigError> {
        Config::from_toml(text, &self.0.path().join("tokend.toml"), &no_env)
    }
}

const MINIMAL: &str = r#"
        [[identity]]
        tenant_id = "t"
        client_id = "c"
        client_secret_file = "secret"
    "#;

fn message(r: Result<Config, ConfigError>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn minimal_config_gets_defaults() {
    let d = Dir::new();
    let c = d.load(MINIMAL).expect("valid");
    assert_eq!(c.server.listen, vec!["127.0.0.1:50342".parse().expect("addr")]);
    assert_eq!(c.tokens, TokensConfig::default());
    let id = &c.identities[0];
    assert_eq!(id.name, "default");
    assert_eq!(id.token_url.as_str(), "https://login.microsoftonline.com/t/oauth2/v2.0/token");
    assert_eq!(id.api, TokenApi::V2);
}

#[test]
fn shipped_example_parses() {
    let d = Dir::new();
    let text = include_str!("../../config/tokend.example.toml");
    // The example points at /etc paths; rewrite the secret path to the temp dir's file.
    let text = text.replace("/etc/tokend/client-secret", "secret");
    let c = d.load(&text).expect("example config is valid");
    assert!(!c.identities.is_empty());
    // The commented [audit] table, as documented, is valid too.
    let audit = "# [audit]\n# path = \"/var/log/tokend/audit.jsonl\"\n# on_failure";
    assert!(text.contains(audit), "the example documents [audit] on_failure");
    let c = d.load(&text.replace(audit, "[audit]\npath = \"audit.jsonl\"\non_failure")).expect("valid");
    assert_eq!(c.audit.map(|a| a.on_failure), Some(crate::audit::OnFailure::Drop));
    // The commented token key, uncommented, is spelled as tokend reads it: the load gets as far as
    // the (here absent) PKCS#11 module.
    let mut token = text.replace("\nclient_secret_file = \"secret\"", "\n");
    for line in ["# certificate_file = \"/etc/tokend/sp.crt\"", "# certificate_key = \"pkcs11:"] {
        token = token.replace(line, line.trim_start_matches("# "));
    }
    let creds = d.0.path().to_str().expect("utf8").to_owned();
    std::fs::write(d.0.path().join("hsm-pin"), "1234\n").expect("write");
    let env = move |name: &str| (name == "CREDENTIALS_DIRECTORY").then(|| creds.clone());
    std::fs::write(d.0.path().join("sp.crt"), "read; parsed only once the key is found").expect("write");
    let token = token.replace("/usr/lib/softhsm/libsofthsm2.so", "/nonexistent/libsofthsm2.so");
    let token = token.replace("/etc/tokend/sp.crt", "sp.crt");
    let m = message(Config::from_toml(&token, &d.0.path().join("tokend.toml"), &env));
    assert!(m.contains("identity[0].certificate_key") && m.contains("cannot load the PKCS#11 module"), "{m}");
}

#[test]
fn unknown_keys_are_errors_naming_file_and_key() {
    let d = Dir::new();
    let m = message(d.load(&format!("[server]\nlisten = [\"127.0.0.1:1\"]\nlisen = 1\n{MINIMAL}")));
    assert!(m.contains("tokend.toml") && m.contains("lisen"), "{m}");
    let m = message(d.load(&format!("{MINIMAL}\nclient_secret = \"x\"\n")));
    assert!(m.contains("client_secret"), "{m}");
}

#[test]
fn invalid_values_name_the_key() {
    let d = Dir::new();
    let cases = [
        ("[server]\nlisten = [\"0.0.0.0:50342\"]\n", "server.listen[0]", "allow_non_loopback"),
        ("[server]\nlisten = [\"localhost:1\"]\n", "server.listen[0]", "IP:port"),
        ("[server]\nlisten = []\n", "server.listen", "empty"),
        ("[tokens]\nmin_lifetime = \"5 parsecs\"\n", "tokens.min_lifetime", "not a duration"),
        ("[tokens]\nmax_wait = \"5m\"\n", "tokens.max_wait", "out of range"),
        ("[upstream]\nca_file = \"missing.pem\"\n", "upstream.ca_file", "cannot read"),
    ];
    for (prefix, key, what) in cases {
        let m = message(d.load(&format!("{prefix}{MINIMAL}")));
        assert!(m.contains(key) && m.contains(what) && m.contains("tokend.toml"), "{prefix}: {m}");
    }
    let id_cases = [
        ("client_id = \"c\"\ntenant_id = \"t\"\n", "identity[0].client_secret_file", "missing"),
        (
            "client_id = \"c\"\ntenant_id = \"t\"\nclient_secret_file = \"nope\"\n",
            "identity[0].client_secret_file",
            "cannot read",
        ),
        ("tenant_id = \"t\"\nclient_secret_file = \"secret\"\n", "identity[0].client_id", "missing"),
        ("client_id = \"c\"\nclient_secret_file = \"secret\"\n", "identity[0].tenant_id", "missing"),
        (
            "client_id = \"c\"\nclient_secret_file = \"secret\"\ntoken_url = \"http://idp.example/token\"\n",
            "identity[0].token_url",
            "loopback",
        ),
        (
            "client_id = \"c\"\nclient_secret_file = \"secret\"\ntoken_url = \"http://127.0.0.1:9/token\"\napi = \"v3\"\n",
            "identity[0].api",
            "v3",
        ),
        (
            "client_id = \"c\"\ntenant_id = \"t\"\nclient_secret_file = \"secret\"\nresources = [\"a b\"]\n",
            "identity[0].resources[0]",
            "whitespace",
        ),
    ];
    for (body, key, what) in id_cases {
        let m = message(d.load(&format!("[[identity]]\n{body}")));
        assert!(m.contains(key) && m.contains(what), "{body}: {m}");
    }
}

#[test]
fn ambiguous_identities_are_rejected() {
    let d = Dir::new();
    let two = format!(
        "{MINIMAL}\n[[identity]]\nname = \"b\"\ntenant_id = \"t\"\nclient_id = \"C\"\nclient_secret_file = \"secret\"\n"
    );
    let m = message(d.load(&two));
    assert!(m.contains("identity[1].client_id") && m.contains("ambiguous"), "{m}");
}

#[test]
fn v1_and_token_url_and_loopback_http() {
    let d = Dir::new();
    let c = d
            .load("[[identity]]\ntenant_id = \"t\"\nclient_id = \"c\"\nclient_secret_file = \"secret\"\napi = \"v1\"\nauthority_host = \"https://login.example/\"\n")
            .expect("valid");
    assert_eq!(c.identities[0].token_url.as_str(), "https://login.example/t/oauth2/token");
    let c = d
            .load("[[identity]]\nclient_id = \"c\"\nclient_secret_file = \"secret\"\ntoken_url = \"http://localhost:9400/x/token\"\n")
            .expect("valid");
    assert_eq!(c.identities[0].token_url.as_str(), "http://localhost:9400/x/token");
}

#[test]
fn identity_from_azure_environment() {
    let env = |name: &str| match name {
        "AZURE_TENANT_ID" => Some("tid".to_owned()),
        "AZURE_CLIENT_ID" => Some("cid".to_owned()),
        "AZURE_CLIENT_SECRET" => Some("env-secret".to_owned()),
        "AZURE_AUTHORITY_HOST" => Some("https://login.microsoftonline.us".to_owned()),
        _ => None,
    };
    let c = Config::from_toml("", Path::new("/x/tokend.toml"), &env).expect("valid");
    assert_eq!(c.identities[0].client_id, "cid");
    assert_eq!(c.identities[0].token_url.as_str(), "https://login.microsoftonline.us/tid/oauth2/v2.0/token");
    assert!(!format!("{c:?}").contains("env-secret"));
    let m = message(Config::from_toml("", Path::new("/x/tokend.toml"), &no_env));
    assert!(m.contains("AZURE_TENANT_ID") && m.contains("[[identity]]"), "{m}");
}

#[test]
fn federated_and_systemd_credentials() {
    let env = |name: &str| match name {
        "AZURE_TENANT_ID" => Some("tid".to_owned()),
        "AZURE_CLIENT_ID" => Some("cid".to_owned()),
        "AZURE_FEDERATED_TOKEN_FILE" => Some("/var/run/secrets/azure/tokens/token".to_owned()),
        _ => None,
    };
    let c = Config::from_toml("", Path::new("/x/tokend.toml"), &env).expect("valid");
    assert_eq!(c.identities[0].credential.kind(), "federated token");
    let d = Dir::new();
    let m = message(d.load("[[identity]]\ntenant_id = \"t\"\nclient_id = \"c\"\nclient_secret_credential = \"s\"\n"));
    assert!(m.contains("identity[0].client_secret_credential") && m.contains("CREDENTIALS_DIRECTORY"), "{m}");
    let creds = d.0.path().to_str().expect("utf8").to_owned();
    let with_dir = move |name: &str| (name == "CREDENTIALS_DIRECTORY").then(|| creds.clone());
    let text = "[[identity]]\ntenant_id = \"t\"\nclient_id = \"c\"\nclient_secret_credential = \"secret\"\n";
    let c = Config::from_toml(text, &d.0.path().join("tokend.toml"), &with_dir).expect("valid");
    assert_eq!(c.identities[0].credential.origin(), "systemd credential secret");
    assert_eq!(c.watched, vec![d.0.path().join("secret")]);
    let m =
        message(d.load("[[identity]]\ntenant_id = \"t\"\nclient_id = \"c\"\nclient_secret_credential = \"../x\"\n"));
    assert!(m.contains("not a credential name"), "{m}");
    let m = message(d.load("[[identity]]\ntenant_id = \"t\"\nclient_id = \"c\"\n"));
    assert!(m.contains("certificate_file") && m.contains("federated_token_file"), "lists every credential kind: {m}");
}

#[test]
fn readable_secret_file_warns_and_debug_redacts() {
    use std::os::unix::fs::PermissionsExt;
    let d = Dir::new();
    let p = d.0.path().join("secret");
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let c = d.load(MINIMAL).expect("valid");
    assert!(c.warnings.iter().any(|w| w.contains("chmod 600")), "{:?}", c.warnings);
    assert!(!format!("{c:?}").contains("s3cret-value"));
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    assert!(d.load(MINIMAL).expect("valid").warnings.is_empty());
}

#[test]
fn access_policy_is_validated_and_names_resolved() {
    let d = Dir::new();
    let rule = |body: &str| format!("{MINIMAL}\n[access]\n[[access.rule]]\n{body}\n");
    let c = d
        .load(&rule("users = [\"root\"]\nidentities = [\"*\"]\nresources = [\"https://storage.azure.com/.default\"]"))
        .expect("valid");
    let access = c.access.expect("[access]");
    assert_eq!(access.rules[0].uids, vec![0], "root resolved at load");
    assert_eq!((access.default, access.unknown), (crate::access::Verdict::Allow, crate::access::Verdict::Deny));
    assert!(d.load(MINIMAL).expect("valid").access.is_none(), "no [access], no policy");
    // A group is its primary members too: root's group lists nobody, yet root is in it.
    for who in ["groups = [\"root\"]", "gids = [0]"] {
        let c = d.load(&rule(&format!("{who}\nidentities = [\"*\"]\nresources = [\"*\"]"))).expect("valid");
        let uids = &c.access.expect("[access]").rules[0].uids;
        assert!(uids.contains(&0) && uids.is_sorted(), "{who}: {uids:?}");
    }
    // A gid no group has is still the primary group of whoever has it (here: nobody).
    let c = d.load(&rule("uids = [5]\ngids = [4242421]\nidentities = [\"*\"]\nresources = [\"*\"]")).expect("valid");
    assert_eq!(c.access.expect("[access]").rules[0].uids, vec![5]);
    let cases = [
        (rule("users = [\"no-such-user-here\"]\nidentities = [\"*\"]\nresources = [\"*\"]"), "access.rule[0].users[0]"),
        (rule("uids = [1]\nidentities = [\"nope\"]\nresources = [\"*\"]"), "access.rule[0].identities[0]"),
        (rule("uids = [1]\nidentities = [\"*\"]\nresources = [\"a b\"]"), "access.rule[0].resources[0]"),
        (rule("uids = [1]\nresources = [\"*\"]"), "access.rule[0].identities"),
        (rule("identities = [\"*\"]\nresources = [\"*\"]"), "matches nobody"),
        (
            rule("groups = [\"no-such-group-here\"]\nidentities = [\"*\"]\nresources = [\"*\"]"),
            "access.rule[0].groups[0]",
        ),
        (rule("uids = [1]\nidentities = [\"*\"]\nresources = [\"*\"]\nrate = 1"), "rate"),
        (format!("{MINIMAL}\n[access]\ndefault = \"maybe\"\n"), "access.default"),
    ];
    for (text, needle) in cases {
        let m = message(d.load(&text));
        assert!(m.contains(needle) && m.contains("tokend.toml"), "{needle}: {m}");
    }
}

#[test]
fn rate_limit_is_validated() {
    let d = Dir::new();
    let c = d.load(&format!("{MINIMAL}\n[access]\nrate_limit = \"20/s\"\n")).expect("valid");
    assert_eq!(c.access.and_then(|a| a.rate_limit).map(|r| r.to_string()), Some("20/s".to_owned()));
    let m = message(d.load(&format!("{MINIMAL}\n[access]\nrate_limit = \"fast\"\n")));
    assert!(m.contains("access.rate_limit") && m.contains("20/s"), "{m}");
}

#[test]
fn on_demand_rate_is_validated() {
    let d = Dir::new();
    let c = d.load(MINIMAL).expect("valid");
    assert_eq!(c.tokens.on_demand_rate.to_string(), "64/m", "the default");
    let c = d.load(&format!("[tokens]\non_demand_rate = \"2/s\"\n{MINIMAL}")).expect("valid");
    assert_eq!(c.tokens.on_demand_rate.to_string(), "2/s");
    let m = message(d.load(&format!("[tokens]\non_demand_rate = \"0/s\"\n{MINIMAL}")));
    assert!(m.contains("tokens.on_demand_rate") && m.contains("64/m"), "{m}");
}

#[test]
fn audit_path_is_resolved_and_required() {
    let d = Dir::new();
    let c = d.load(&format!("{MINIMAL}\n[audit]\npath = \"audit.jsonl\"\n")).expect("valid");
    let audit = c.audit.expect("[audit]");
    assert_eq!(audit.path, d.0.path().join("audit.jsonl"));
    assert_eq!(audit.on_failure, crate::audit::OnFailure::Drop, "the default");
    let m = message(d.load(&format!("{MINIMAL}\n[audit]\n")));
    assert!(m.contains("audit.path") && m.contains("missing"), "{m}");
}

#[test]
fn audit_on_failure_is_drop_or_refuse() {
    let d = Dir::new();
    let with = |v: &str| d.load(&format!("{MINIMAL}\n[audit]\npath = \"audit.jsonl\"\non_failure = {v}\n"));
    let refuse = with("\"refuse\"").expect("valid").audit.expect("[audit]");
    assert_eq!(refuse.on_failure, crate::audit::OnFailure::Refuse);
    assert_eq!(with("\"drop\"").expect("valid").audit.map(|a| a.on_failure), Some(crate::audit::OnFailure::Drop));
    for bad in ["\"block\"", "\"Refuse\"", "\"\""] {
        let m = message(with(bad));
        assert!(m.contains("audit.on_failure") && m.contains("refuse"), "{bad}: {m}");
    }
    let m = message(with("true"));
    assert!(m.contains("on_failure"), "{m}");
}

#[test]
fn the_likeliest_slips_get_a_hint_or_just_work() {
    let d = Dir::new();
    // `[identity]` where `[[identity]]` is meant.
    let m = message(d.load("[identity]\ntenant_id = \"t\"\nclient_id = \"c\"\nclient_secret_file = \"secret\"\n"));
    assert!(m.contains("hint: write [[identity]] (double brackets)"), "{m}");
    let m = message(d.load(&format!("{MINIMAL}\n[access]\n[access.rule]\nuids = [1]\n")));
    assert!(m.contains("hint: write [[access.rule]]"), "{m}");
    // One listen address as a plain string is a list of one.
    let c = d.load(&format!("[server]\nlisten = \"127.0.0.1:50999\"\n{MINIMAL}")).expect("a string is accepted");
    assert_eq!(c.server.listen, vec!["127.0.0.1:50999".parse().expect("addr")]);
    let m = message(d.load(&format!("[server]\nlisten = 5\n{MINIMAL}")));
    assert!(m.contains("expected an address \"IP:port\" or a list of them"), "{m}");
}

#[test]
fn every_independent_problem_is_reported_at_once() {
    let d = Dir::new();
    let text = "[server]\nlisten = [\"nowhere\"]\n[tokens]\nmin_lifetime = \"soon\"\n\
                [[identity]]\ntenant_id = \"t\"\nclient_secret_file = \"secret\"\n\
                [[identity]]\nname = \"b\"\ntenant_id = \"t\"\nclient_id = \"c2\"\nclient_secret_file = \"missing\"\n";
    let m = message(d.load(text));
    assert!(m.starts_with("4 problems:"), "{m}");
    for key in ["server.listen[0]", "tokens.min_lifetime", "identity[0]", "identity[1].client_secret_file"] {
        assert!(m.contains(key), "{key} in {m}");
    }
    // One problem reads as before.
    let m = message(d.load(&format!("[tokens]\nmin_lifetime = \"soon\"\n{MINIMAL}")));
    assert!(!m.contains("problems:") && m.contains("tokens.min_lifetime"), "{m}");
}

/// systemd creates `LoadCredential=` files read-only in a directory private to the unit (257: mode
/// 0440, 252: 0400); the operator cannot chmod them, so a mode warning there is noise that teaches
/// operators to ignore warnings. Any other file keeps the warning.
#[test]
fn systemd_credentials_get_no_mode_warning_other_files_do() {
    use std::os::unix::fs::PermissionsExt;
    let d = Dir::new();
    let creds = d.0.path().join("credentials");
    std::fs::create_dir(&creds).expect("mkdir");
    std::fs::write(creds.join("client-secret"), "s3cret-value\n").expect("write");
    std::fs::set_permissions(creds.join("client-secret"), std::fs::Permissions::from_mode(0o440)).expect("chmod");
    let dir = creds.to_str().expect("utf8").to_owned();
    let env = move |name: &str| (name == "CREDENTIALS_DIRECTORY").then(|| dir.clone());
    let path = d.0.path().join("tokend.toml");
    let by_name = "[[identity]]\ntenant_id = \"t\"\nclient_id = \"c\"\nclient_secret_credential = \"client-secret\"\n";
    let c = Config::from_toml(by_name, &path, &env).expect("valid");
    assert!(c.warnings.is_empty(), "a systemd credential is systemd's: {:?}", c.warnings);
    // The same file named by its path is still systemd's.
    let by_path = format!(
        "[[identity]]\ntenant_id = \"t\"\nclient_id = \"c\"\nclient_secret_file = \"{}\"\n",
        creds.join("client-secret").display()
    );
    let c = Config::from_toml(&by_path, &path, &env).expect("valid");
    assert!(c.warnings.is_empty(), "under $CREDENTIALS_DIRECTORY: {:?}", c.warnings);
    // A path that only looks as if it were inside, and any file elsewhere, keep the warning.
    let escaping = format!(
        "[[identity]]\ntenant_id = \"t\"\nclient_id = \"c\"\nclient_secret_file = \"{}/../secret\"\n",
        creds.display()
    );
    std::fs::set_permissions(d.0.path().join("secret"), std::fs::Permissions::from_mode(0o440)).expect("chmod");
    let c = Config::from_toml(&escaping, &path, &env).expect("valid");
    assert!(c.warnings.iter().any(|w| w.contains("chmod 600")), "{:?}", c.warnings);
    let c = Config::from_toml(MINIMAL, &path, &env).expect("valid");
    assert!(c.warnings.iter().any(|w| w.contains("chmod 600")), "{:?}", c.warnings);
}
