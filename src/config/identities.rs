//! `[[identity]]` tables (or the `AZURE_*` variables) → [`Identity`]: the token URL, the resources and
//! the credential. The credential is described first ([`CredentialSpec`]: which kind, which files —
//! exactly one source), then loaded; this is the part that grows with every credential kind.

use std::path::{Path, PathBuf};

use super::raw::RawIdentity;
use super::validate::Validator;
use super::{ConfigError, DEFAULT_AUTHORITY_HOST};
use crate::credential::{
    AssertionAlg, ClientCredential, CredentialSpec, FileSpec, KeyUri, LoadError, SecretSpec, TokenKeySpec,
};
use crate::identity::{Identity, TokenApi};
use crate::resource::Resource;

impl Validator<'_> {
    pub(super) fn identity(&mut self, i: usize, raw: RawIdentity) -> Result<Identity, ConfigError> {
        let k = |field: &str| format!("identity[{i}].{field}");
        let name = match raw.name.clone() {
            Some(n) if n.trim().is_empty() => return Err(self.err(k("name"), "is empty")),
            Some(n) => n,
            None if i == 0 => "default".to_owned(),
            None => return Err(self.err(k("name"), "missing; every identity after the first needs a name")),
        };
        let client_id = nonempty(raw.client_id.clone())
            .ok_or_else(|| self.err(k("client_id"), "missing; set the application (client) id"))?;
        let api = match raw.api.as_deref() {
            None | Some("v2") => TokenApi::V2,
            Some("v1") => TokenApi::V1,
            Some(other) => return Err(self.err(k("api"), format!("{other:?} is not \"v2\" or \"v1\""))),
        };
        let token_url = match (raw.token_url.clone(), raw.authority_host.clone()) {
            (Some(_), Some(_)) => {
                return Err(self.err(k("token_url"), "set either token_url or authority_host, not both"));
            }
            (Some(url), None) => self.token_url(&k("token_url"), &url)?,
            (None, authority) => {
                let tenant = nonempty(raw.tenant_id.clone()).ok_or_else(|| {
                    self.err(k("tenant_id"), "missing; needed to build the token URL from authority_host")
                })?;
                let authority = authority.unwrap_or_else(|| DEFAULT_AUTHORITY_HOST.to_owned());
                self.token_url(&k("authority_host"), &entra_token_url(&authority, &tenant, api))?
            }
        };
        let spec = self.credential_spec(i, &raw)?;
        let credential = self.load(&spec)?;
        let mut resources: Vec<Resource> = Vec::new();
        for (j, text) in raw.resources.iter().enumerate() {
            let r = Resource::parse(text)
                .map_err(|e| self.err(format!("identity[{i}].resources[{j}]"), format!("{text:?}: {e}")))?;
            if resources.contains(&r) {
                return Err(self.err(format!("identity[{i}].resources[{j}]"), format!("{text:?} is listed twice")));
            }
            resources.push(r);
        }
        Ok(Identity {
            name,
            client_id,
            object_id: nonempty(raw.object_id.clone()),
            resource_id: nonempty(raw.resource_id.clone()),
            token_url,
            api,
            credential,
            resources,
        })
    }

    /// Loads a credential, keeping its files to watch and its warnings; errors name the key at fault.
    fn load(&mut self, spec: &CredentialSpec) -> Result<ClientCredential, ConfigError> {
        let loaded = spec.load().map_err(|LoadError { key, cause }| self.err(key, cause.to_string()))?;
        self.watched.extend(loaded.watched);
        self.warnings.extend(loaded.warnings);
        Ok(loaded.credential)
    }

    /// A file named in the configuration: resolved against the file's directory.
    fn file(&self, key: String, path: &Path) -> FileSpec {
        let path = self.resolve(path);
        FileSpec { origin: format!("file {}", path.display()), systemd: self.is_systemd_credential(&path), path, key }
    }

    /// Whether `path` is inside `$CREDENTIALS_DIRECTORY` (compared by components; a path with `..`
    /// never is): such a file is systemd's, whatever setting names it.
    fn is_systemd_credential(&self, path: &Path) -> bool {
        let Some(dir) = nonempty((self.env)("CREDENTIALS_DIRECTORY")) else { return false };
        let lexical = |p: &Path| !p.components().any(|c| matches!(c, std::path::Component::ParentDir));
        let dir = Path::new(&dir);
        dir.is_absolute() && lexical(dir) && lexical(path) && path.starts_with(dir) && path != dir
    }

    /// `$CREDENTIALS_DIRECTORY/NAME` for a systemd credential named by `key`.
    fn systemd_credential(&self, key: String, name: &str) -> Result<FileSpec, ConfigError> {
        if name.is_empty() || name.contains('/') || name == "." || name == ".." {
            return Err(self.err(key, format!("{name:?} is not a credential name")));
        }
        let dir = nonempty((self.env)("CREDENTIALS_DIRECTORY")).ok_or_else(|| {
            self.err(
                &key,
                "CREDENTIALS_DIRECTORY is not set; systemd sets it for units with LoadCredential=/SetCredential=",
            )
        })?;
        Ok(FileSpec {
            path: Path::new(&dir).join(name),
            key,
            origin: format!("systemd credential {name}"),
            systemd: true,
        })
    }

    /// Exactly one credential source per identity; certificate-only settings only with a certificate.
    fn credential_spec(&self, i: usize, raw: &RawIdentity) -> Result<CredentialSpec, ConfigError> {
        let k = |field: &str| format!("identity[{i}].{field}");
        let sources = [
            ("client_secret_file", raw.client_secret_file.is_some()),
            ("client_secret_credential", raw.client_secret_credential.is_some()),
            ("certificate_file", raw.certificate_file.is_some()),
            ("certificate_credential", raw.certificate_credential.is_some()),
            ("federated_token_file", raw.federated_token_file.is_some()),
        ];
        let set: Vec<&str> = sources.iter().filter(|(_, on)| *on).map(|(name, _)| *name).collect();
        let all = sources.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ");
        match set.as_slice() {
            [] => {
                return Err(self.err(
                    k("client_secret_file"),
                    format!("missing; every identity needs a credential: one of {all}"),
                ));
            }
            [_] => {}
            many => {
                return Err(self.err(k(many[1]), format!("conflicts with {}; give exactly one credential", many[0])));
            }
        }
        let cert_only = [
            ("certificate_key", raw.certificate_key.is_some()),
            ("certificate_password_file", raw.certificate_password_file.is_some()),
            ("certificate_password_credential", raw.certificate_password_credential.is_some()),
            ("assertion_alg", raw.assertion_alg.is_some()),
            ("send_certificate_chain", raw.send_certificate_chain.is_some()),
        ];
        let is_cert = raw.certificate_file.is_some() || raw.certificate_credential.is_some();
        if let Some((name, _)) = cert_only.iter().find(|(_, on)| *on).filter(|_| !is_cert) {
            return Err(self.err(
                k(name),
                "only applies to a certificate credential (certificate_file or certificate_credential)",
            ));
        }
        if let Some(p) = &raw.client_secret_file {
            return Ok(CredentialSpec::Secret(SecretSpec::File(self.file(k("client_secret_file"), p))));
        }
        if let Some(name) = &raw.client_secret_credential {
            let file = self.systemd_credential(k("client_secret_credential"), name)?;
            return Ok(CredentialSpec::Secret(SecretSpec::File(file)));
        }
        if let Some(p) = &raw.federated_token_file {
            return Ok(CredentialSpec::Federated(self.file(k("federated_token_file"), p)));
        }
        let file = match (&raw.certificate_file, &raw.certificate_credential) {
            (Some(p), _) => self.file(k("certificate_file"), p),
            (None, Some(name)) => self.systemd_credential(k("certificate_credential"), name)?,
            (None, None) => unreachable!("exactly one credential source was checked above"),
        };
        let alg = match raw.assertion_alg.as_deref() {
            None | Some("PS256") => AssertionAlg::Ps256,
            Some("RS256") => AssertionAlg::Rs256,
            Some(other) => return Err(self.err(k("assertion_alg"), format!("{other:?} is not \"PS256\" or \"RS256\""))),
        };
        let send_chain = raw.send_certificate_chain.unwrap_or(false);
        if let Some(text) = &raw.certificate_key {
            if let Some(p) = [
                ("certificate_password_file", raw.certificate_password_file.is_some()),
                ("certificate_password_credential", raw.certificate_password_credential.is_some()),
            ]
            .iter()
            .find_map(|(name, on)| on.then_some(*name))
            {
                return Err(self.err(
                    k(p),
                    "conflicts with certificate_key: the key is on the token; its PIN comes from pin-source",
                ));
            }
            let key = Box::new(self.token_key(k("certificate_key"), text)?);
            return Ok(CredentialSpec::TokenCertificate { file, key, alg, send_chain });
        }
        let password = match (&raw.certificate_password_file, &raw.certificate_password_credential) {
            (Some(_), Some(_)) => {
                return Err(self.err(k("certificate_password_credential"), "conflicts with certificate_password_file"));
            }
            (Some(p), None) => Some(SecretSpec::File(self.file(k("certificate_password_file"), p))),
            (None, Some(name)) => {
                Some(SecretSpec::File(self.systemd_credential(k("certificate_password_credential"), name)?))
            }
            (None, None) => None,
        };
        Ok(CredentialSpec::Certificate { file, password, alg, send_chain })
    }

    /// `certificate_key`: the RFC 7512 URI, its `pin-source` resolved — `file:PATH` or a bare path
    /// (relative to the configuration file's directory), or `credential:NAME`
    /// (`$CREDENTIALS_DIRECTORY/NAME`, e.g. from `LoadCredentialEncrypted=`).
    fn token_key(&self, key: String, text: &str) -> Result<TokenKeySpec, ConfigError> {
        let uri = KeyUri::parse(text).map_err(|e| self.err(&key, format!("{text:?}: {e}")))?;
        let pin_key = format!("{key} pin-source");
        let pin = if let Some(name) = uri.pin_source.strip_prefix("credential:") {
            self.systemd_credential(pin_key, name)?
        } else {
            let path = uri.pin_source.strip_prefix("file://").or_else(|| uri.pin_source.strip_prefix("file:"));
            let path = path.unwrap_or(&uri.pin_source);
            if path.is_empty() || (uri.pin_source.contains(':') && !uri.pin_source.starts_with("file:")) {
                return Err(self.err(pin_key, format!("{:?} is not file:PATH or credential:NAME", uri.pin_source)));
            }
            self.file(pin_key, Path::new(path))
        };
        Ok(TokenKeySpec { uri, key, pin })
    }

    /// The one identity of a configuration without `[[identity]]`, from the Azure SDK variables.
    pub(super) fn identity_from_env(&mut self) -> Result<Identity, ConfigError> {
        let env = |name: &str| nonempty((self.env)(name));
        let need = |name: &str| -> Result<String, ConfigError> {
            env(name).ok_or_else(|| {
                self.err(
                    "identity",
                    format!(
                        "no [[identity]] is configured and {name} is not set; configure an [[identity]] or set \
                         AZURE_TENANT_ID, AZURE_CLIENT_ID and AZURE_CLIENT_SECRET"
                    ),
                )
            })
        };
        let tenant = need("AZURE_TENANT_ID")?;
        let client_id = need("AZURE_CLIENT_ID")?;
        let from_env = |key: &str, path: String| FileSpec {
            origin: format!("environment {key}"),
            systemd: self.is_systemd_credential(Path::new(&path)),
            path: PathBuf::from(path),
            key: key.to_owned(),
        };
        let spec =
            match (env("AZURE_CLIENT_SECRET"), env("AZURE_CLIENT_CERTIFICATE_PATH"), env("AZURE_FEDERATED_TOKEN_FILE"))
            {
                (Some(secret), _, _) => CredentialSpec::Secret(SecretSpec::Inline(
                    secret.into(),
                    "environment AZURE_CLIENT_SECRET".to_owned(),
                )),
                (None, Some(path), _) => CredentialSpec::Certificate {
                    file: FileSpec {
                        origin: format!("file {path}"),
                        ..from_env("AZURE_CLIENT_CERTIFICATE_PATH", path)
                    },
                    password: env("AZURE_CLIENT_CERTIFICATE_PASSWORD").map(|p| {
                        SecretSpec::Inline(p.into(), "environment AZURE_CLIENT_CERTIFICATE_PASSWORD".to_owned())
                    }),
                    alg: AssertionAlg::Ps256,
                    send_chain: env("AZURE_CLIENT_SEND_CERTIFICATE_CHAIN")
                        .is_some_and(|v| v == "1" || v.eq_ignore_ascii_case("true")),
                },
                (None, None, Some(path)) => CredentialSpec::Federated(from_env("AZURE_FEDERATED_TOKEN_FILE", path)),
                (None, None, None) => {
                    need("AZURE_CLIENT_SECRET")?;
                    unreachable!("need() fails when the variable is unset")
                }
            };
        let credential = self.load(&spec)?;
        let authority = env("AZURE_AUTHORITY_HOST").unwrap_or_else(|| DEFAULT_AUTHORITY_HOST.to_owned());
        let token_url = self.token_url("AZURE_AUTHORITY_HOST", &entra_token_url(&authority, &tenant, TokenApi::V2))?;
        Ok(Identity {
            name: "default".to_owned(),
            client_id,
            object_id: None,
            resource_id: None,
            token_url,
            api: TokenApi::V2,
            credential,
            resources: Vec::new(),
        })
    }
}

fn nonempty(v: Option<String>) -> Option<String> {
    v.map(|s| s.trim().to_owned()).filter(|s| !s.is_empty())
}

/// `{authority}/{tenant}/oauth2/v2.0/token` (v2) or `{authority}/{tenant}/oauth2/token` (v1).
fn entra_token_url(authority: &str, tenant: &str, api: TokenApi) -> String {
    let authority = authority.trim_end_matches('/');
    match api {
        TokenApi::V2 => format!("{authority}/{tenant}/oauth2/v2.0/token"),
        TokenApi::V1 => format!("{authority}/{tenant}/oauth2/token"),
    }
}
