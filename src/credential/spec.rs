//! A credential as the configuration describes it ([`CredentialSpec`], pure: paths already resolved)
//! and loading it ([`CredentialSpec::load`]: files read, certificates parsed and test-signed).
//! Load errors name the setting at fault and the file.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use secrecy::{ExposeSecret, SecretString};

use super::pkcs11::{KeyUri, TokenKey, read_pin_file};
use super::{AssertionAlg, Certificate, CertificateError, ClientCredential, CredentialError};
use crate::secret::{read_secret_file, readable_warning};

/// A credential file and the setting that names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FileSpec {
    /// The file, resolved.
    pub(crate) path: PathBuf,
    /// The setting that names it, for errors: `identity[0].client_secret_file`, `AZURE_CLIENT_CERTIFICATE_PATH`.
    pub(crate) key: String,
    /// How messages describe it: `file /etc/tokend/secret`, `systemd credential NAME`.
    pub(crate) origin: String,
    /// The file is systemd's (under `$CREDENTIALS_DIRECTORY`: `LoadCredential=`,
    /// `LoadCredentialEncrypted=`): systemd makes it read-only in a directory private to the unit
    /// (mode 0400 on systemd 252, 0440 on 257), so its mode is no warning the operator could act on.
    pub(crate) systemd: bool,
}

impl FileSpec {
    /// A warning when others can read this secret file, unless it is systemd's.
    fn readable_warning(&self) -> Option<String> {
        if self.systemd { None } else { readable_warning(&self.path, 0o077) }
    }
}

/// A secret (client secret or PKCS#12 password): in a file, or given inline by the environment.
#[derive(Debug, Clone)]
pub(crate) enum SecretSpec {
    /// Read from a file.
    File(FileSpec),
    /// Given inline (an `AZURE_*` variable), with where it came from.
    Inline(SecretString, String),
}

/// What the configuration says about one identity's credential.
#[derive(Debug, Clone)]
pub(crate) enum CredentialSpec {
    /// A client secret.
    Secret(SecretSpec),
    /// A PEM or PKCS#12 certificate with its key.
    Certificate {
        /// The certificate file.
        file: FileSpec,
        /// The PKCS#12 password, if any.
        password: Option<SecretSpec>,
        /// Assertion algorithm.
        alg: AssertionAlg,
        /// Send `x5c`.
        send_chain: bool,
    },
    /// A certificate (PEM, public part, chain allowed) whose private key is on a PKCS#11 token.
    TokenCertificate {
        /// The certificate file.
        file: FileSpec,
        /// The key on the token.
        key: Box<TokenKeySpec>,
        /// Assertion algorithm.
        alg: AssertionAlg,
        /// Send `x5c`.
        send_chain: bool,
    },
    /// A federated token file, read on every request (it may not exist yet).
    Federated(FileSpec),
}

/// A private key on a PKCS#11 token: its URI, the setting that names it and the PIN's file.
#[derive(Debug, Clone)]
pub(crate) struct TokenKeySpec {
    /// The RFC 7512 URI.
    pub(crate) uri: KeyUri,
    /// The setting, for errors: `identity[0].certificate_key`.
    pub(crate) key: String,
    /// The PIN file (`pin-source`), a systemd credential or a plain file.
    pub(crate) pin: FileSpec,
}

/// A loaded credential, the files to watch for rotation and what is worth a warning.
#[derive(Debug)]
pub(crate) struct Loaded {
    /// The credential.
    pub(crate) credential: ClientCredential,
    /// Files whose change means a new credential.
    pub(crate) watched: Vec<PathBuf>,
    /// E.g. a secret file others can read, a certificate about to expire.
    pub(crate) warnings: Vec<String>,
}

/// A credential that cannot be loaded: the setting at fault and why.
#[derive(Debug, thiserror::Error)]
#[error("{key}: {cause}")]
pub(crate) struct LoadError {
    /// The setting at fault.
    pub(crate) key: String,
    /// Why.
    #[source]
    pub(crate) cause: CredentialError,
}

impl CredentialSpec {
    /// Reads the files and, for a certificate, parses it and signs one assertion.
    pub(crate) fn load(&self) -> Result<Loaded, LoadError> {
        let mut out = Files::default();
        let credential = match self {
            Self::Secret(spec) => {
                let (secret, origin) = out.secret(spec)?;
                ClientCredential::Secret { secret, origin }
            }
            Self::Federated(file) => {
                if !file.path.is_file() {
                    // Not an error: the token may be projected after start; every request reads it anew.
                    out.warnings.push(format!(
                        "{}: federated token file {} does not exist yet",
                        file.key,
                        file.path.display()
                    ));
                }
                ClientCredential::Federated { path: file.path.clone(), origin: file.origin.clone() }
            }
            Self::Certificate { file, password, alg, send_chain } => {
                let password = password.as_ref().map(|p| out.secret(p)).transpose()?.map(|(s, _)| s);
                out.watched.push(file.path.clone());
                let fail = |cause| LoadError { key: file.key.clone(), cause };
                let bytes = std::fs::read(&file.path)
                    .map_err(|source| fail(CredentialError::ReadCertificate { path: file.path.clone(), source }))?;
                let password = password.as_ref().map(|p| p.expose_secret());
                let cert = Certificate::load(&bytes, password, *alg, *send_chain)
                    .map_err(|source| fail(CredentialError::Certificate { path: file.path.clone(), source }))?;
                out.warnings.extend(file.readable_warning());
                out.warnings.extend(cert.expiry_warning(&file.path, SystemTime::now()));
                ClientCredential::Certificate { cert: Arc::new(cert), origin: file.origin.clone() }
            }
            Self::TokenCertificate { file, key, alg, send_chain } => {
                out.watched.push(file.path.clone());
                out.watched.push(key.pin.path.clone());
                let bytes = std::fs::read(&file.path).map_err(|source| LoadError {
                    key: file.key.clone(),
                    cause: CredentialError::ReadCertificate { path: file.path.clone(), source },
                })?;
                let pin = read_pin_file(&key.pin.path)
                    .map_err(|e| LoadError { key: key.pin.key.clone(), cause: e.into() })?;
                out.warnings.extend(key.pin.readable_warning());
                let on_key = |source| LoadError {
                    key: key.key.clone(),
                    cause: CredentialError::TokenKey { uri: key.uri.to_string(), source },
                };
                let token_key = TokenKey::open(key.uri.clone(), pin).map_err(on_key)?;
                let facts = token_key.facts().clone();
                let cert = Certificate::on_token(&bytes, token_key, *alg, *send_chain).map_err(|source| {
                    // The key is at fault when it cannot sign or is not the certificate's.
                    let at_fault = match source {
                        CertificateError::Sign(_) | CertificateError::KeyMismatch => &key.key,
                        _ => &file.key,
                    };
                    LoadError {
                        key: at_fault.clone(),
                        cause: CredentialError::Certificate { path: file.path.clone(), source },
                    }
                })?;
                if facts.extractable || !facts.sensitive {
                    out.warnings.push(format!(
                        "{}: the private key {:?} on PKCS#11 token {:?} is {}: it can be copied off the token; \
                         generate a new key on the token with CKA_SENSITIVE and without CKA_EXTRACTABLE",
                        key.key,
                        facts.label,
                        facts.token,
                        match (facts.extractable, facts.sensitive) {
                            (true, false) => "extractable and not sensitive",
                            (true, true) => "extractable",
                            _ => "not sensitive",
                        }
                    ));
                }
                // The certificate alone is public: no mode warning for it.
                out.warnings.extend(cert.expiry_warning(&file.path, SystemTime::now()));
                ClientCredential::Certificate { cert: Arc::new(cert), origin: file.origin.clone() }
            }
        };
        Ok(Loaded { credential, watched: out.watched, warnings: out.warnings })
    }
}

/// What loading collects besides the credential.
#[derive(Default)]
struct Files {
    watched: Vec<PathBuf>,
    warnings: Vec<String>,
}

impl Files {
    /// A secret and its origin; a file is watched and warned about when others can read it.
    fn secret(&mut self, spec: &SecretSpec) -> Result<(SecretString, String), LoadError> {
        match spec {
            SecretSpec::Inline(secret, origin) => Ok((secret.clone(), origin.clone())),
            SecretSpec::File(file) => {
                self.watched.push(file.path.clone());
                let secret =
                    read_secret_file(&file.path).map_err(|e| LoadError { key: file.key.clone(), cause: e.into() })?;
                self.warnings.extend(file.readable_warning());
                Ok((secret, file.origin.clone()))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(dir: &std::path::Path, name: &str) -> FileSpec {
        FileSpec {
            path: dir.join(name),
            key: format!("identity[0].{name}"),
            origin: format!("file {name}"),
            systemd: false,
        }
    }

    #[test]
    fn loading_names_the_setting_and_the_file() {
        let d = tempfile::tempdir().expect("tempdir");
        let spec = CredentialSpec::Secret(SecretSpec::File(file(d.path(), "client_secret_file")));
        let e = spec.load().expect_err("missing");
        assert_eq!(e.key, "identity[0].client_secret_file");
        assert!(e.to_string().contains("cannot read") && e.to_string().contains("client_secret_file"), "{e}");
        std::fs::write(d.path().join("client_secret_file"), "s3cret\n").expect("write");
        let loaded = spec.load().expect("loads");
        assert_eq!(loaded.watched, vec![d.path().join("client_secret_file")]);
        assert!(!format!("{loaded:?}").contains("s3cret"));
        std::fs::write(d.path().join("cert"), "not a certificate").expect("write");
        let spec = CredentialSpec::Certificate {
            file: file(d.path(), "cert"),
            password: Some(SecretSpec::Inline("pw".to_owned().into(), "environment".into())),
            alg: AssertionAlg::Ps256,
            send_chain: false,
        };
        let e = spec.load().expect_err("garbage");
        assert!(matches!(e.cause, CredentialError::Certificate { .. }), "{e}");
        assert!(e.to_string().starts_with("identity[0].cert: ") && e.to_string().contains("PKCS#12"), "{e}");
    }

    #[test]
    fn a_federated_file_may_appear_later() {
        let d = tempfile::tempdir().expect("tempdir");
        let loaded = CredentialSpec::Federated(file(d.path(), "token")).load().expect("not an error");
        assert!(loaded.watched.is_empty());
        assert!(loaded.warnings[0].contains("does not exist yet"), "{:?}", loaded.warnings);
    }
}
