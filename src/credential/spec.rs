//! A credential as the configuration describes it ([`CredentialSpec`], pure: paths already resolved)
//! and loading it ([`CredentialSpec::load`]: files read, certificates parsed and test-signed).
//! Load errors name the setting at fault and the file.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use secrecy::{ExposeSecret, SecretString};

use super::{AssertionAlg, Certificate, ClientCredential, CredentialError};
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
    /// A federated token file, read on every request (it may not exist yet).
    Federated(FileSpec),
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
                out.warnings.extend(readable_warning(&file.path, 0o077));
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
                self.warnings.extend(readable_warning(&file.path, 0o077));
                Ok((secret, file.origin.clone()))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(dir: &std::path::Path, name: &str) -> FileSpec {
        FileSpec { path: dir.join(name), key: format!("identity[0].{name}"), origin: format!("file {name}") }
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
