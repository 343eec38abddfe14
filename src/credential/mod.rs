//! The client credential an identity authenticates with. `Debug` never shows a secret or a key.
//!
//! - **Secret**: `client_secret=`.
//! - **Certificate**: a client assertion (RFC 7523) signed with the certificate's RSA key on every
//!   request: `aud` = the exact token URL, `iss` = `sub` = client id, a fresh `jti`, `nbf`/`iat` now,
//!   `exp` five minutes later; header `alg` PS256 + `x5t#S256` (default) or RS256 + `x5t`, and `x5c`
//!   (the chain) when `send_certificate_chain` is set, for subject-name/issuer authentication.
//! - **Federated**: the content of a file (e.g. a Kubernetes projected service-account token) is the
//!   assertion. It rotates, so it is read on every request; a cached copy would go stale or be
//!   rejected as a replay.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use secrecy::{ExposeSecret, SecretString};
use serde::Serialize;

/// The assertion grant type.
pub const ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
/// Lifetime of a client assertion.
const ASSERTION_LIFETIME: Duration = Duration::from_secs(300);

/// How an identity proves itself to the IdP.
#[derive(Clone)]
pub enum ClientCredential {
    /// A client secret.
    Secret {
        /// The secret; zeroized on drop, redacted in `Debug`.
        secret: SecretString,
        /// Where it came from, for messages: a file path or an environment variable name.
        origin: String,
    },
    /// A certificate with its private key.
    Certificate {
        /// The loaded certificate.
        cert: Arc<Certificate>,
        /// Where it came from.
        origin: String,
    },
    /// A federated token file (workload identity).
    Federated {
        /// The file, read on every request.
        path: PathBuf,
        /// Where the setting came from.
        origin: String,
    },
}

impl ClientCredential {
    /// A short name of the credential kind, for `tokend check` and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Secret { .. } => "client secret",
            Self::Certificate { .. } => "certificate",
            Self::Federated { .. } => "federated token",
        }
    }

    /// Where the credential came from (never the credential itself).
    pub fn origin(&self) -> &str {
        match self {
            Self::Secret { origin, .. } | Self::Certificate { origin, .. } | Self::Federated { origin, .. } => origin,
        }
    }

    /// Identifies the credential without revealing it (a SHA-256 prefix of a secret, a certificate's
    /// thumbprint and algorithm, a federated file's path): equal fingerprints, same credential.
    pub fn fingerprint(&self) -> String {
        match self {
            Self::Secret { secret, .. } => crate::token::fingerprint(secret.expose_secret()),
            Self::Certificate { cert, .. } => format!("{}:{:?}:{}", cert.x5t_s256, cert.alg, cert.send_chain),
            Self::Federated { path, .. } => path.display().to_string(),
        }
    }

    /// The form parameters that authenticate one token request to `token_url` as `client_id`.
    /// Certificates mint a fresh assertion; federated credentials read their file now.
    pub(crate) fn form_params(&self, client_id: &str, token_url: &str) -> Result<Vec<(&'static str, String)>, String> {
        match self {
            Self::Secret { secret, .. } => Ok(vec![("client_secret", secret.expose_secret().to_owned())]),
            Self::Certificate { cert, .. } => Ok(vec![
                ("client_assertion_type", ASSERTION_TYPE.to_owned()),
                ("client_assertion", cert.assertion(client_id, token_url)?),
            ]),
            Self::Federated { path, .. } => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| format!("cannot read the federated token file {}: {e}", path.display()))?;
                let token = text.trim();
                if token.is_empty() {
                    return Err(format!("the federated token file {} is empty", path.display()));
                }
                Ok(vec![("client_assertion_type", ASSERTION_TYPE.to_owned()), ("client_assertion", token.to_owned())])
            }
        }
    }
}

impl fmt::Debug for ClientCredential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Secret { origin, .. } => {
                f.debug_struct("Secret").field("secret", &"[redacted]").field("origin", origin).finish()
            }
            Self::Certificate { cert, origin } => {
                f.debug_struct("Certificate").field("cert", cert).field("origin", origin).finish()
            }
            Self::Federated { path, origin } => {
                f.debug_struct("Federated").field("path", path).field("origin", origin).finish()
            }
        }
    }
}

/// The signature algorithm of client assertions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AssertionAlg {
    /// RSASSA-PSS with SHA-256, header `x5t#S256` (Entra's documented default).
    Ps256,
    /// RSASSA-PKCS1-v1_5 with SHA-256, header `x5t` (SHA-1 thumbprint).
    Rs256,
}

/// A certificate credential: the RSA key (kept only inside `jsonwebtoken`'s key type), thumbprints,
/// the chain and the expiry.
pub struct Certificate {
    key: jsonwebtoken::EncodingKey,
    alg: AssertionAlg,
    x5t: String,
    x5t_s256: String,
    chain: Vec<String>,
    send_chain: bool,
    not_after: SystemTime,
    subject: String,
}

impl fmt::Debug for Certificate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Certificate")
            .field("subject", &self.subject)
            .field("x5t#S256", &self.x5t_s256)
            .field("alg", &self.alg)
            .field("key", &"[redacted]")
            .finish_non_exhaustive()
    }
}

#[derive(Serialize)]
struct AssertionClaims<'a> {
    aud: &'a str,
    iss: &'a str,
    sub: &'a str,
    jti: String,
    nbf: u64,
    iat: u64,
    exp: u64,
}

impl Certificate {
    /// Loads a PEM file (certificate(s) and an unencrypted private key) or a PKCS#12 file (`.pfx`/`.p12`,
    /// AES/PBES2, 3DES or RC2-40), then signs one assertion to prove the key works.
    pub fn load(bytes: &[u8], password: Option<&str>, alg: AssertionAlg, send_chain: bool) -> Result<Self, String> {
        let is_pem = bytes.windows(10).any(|w| w == b"-----BEGIN");
        let (key_pem, certs) = if is_pem { Self::from_pem(bytes)? } else { Self::from_pkcs12(bytes, password)? };
        let leaf = certs.first().ok_or("no certificate found")?;
        let (_, parsed) =
            x509_parser::parse_x509_certificate(leaf).map_err(|e| format!("the certificate cannot be parsed: {e}"))?;
        let not_after = SystemTime::UNIX_EPOCH
            + Duration::from_secs(u64::try_from(parsed.validity().not_after.timestamp()).unwrap_or(0));
        let subject = parsed.subject().to_string();
        let key = jsonwebtoken::EncodingKey::from_rsa_pem(key_pem.expose_secret().as_bytes())
            .map_err(|e| format!("the private key is not a usable RSA key: {e}"))?;
        let sha1 = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA1_FOR_LEGACY_USE_ONLY, leaf);
        let sha256 = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, leaf);
        let cert = Self {
            key,
            alg,
            x5t: URL_SAFE_NO_PAD.encode(sha1.as_ref()),
            x5t_s256: URL_SAFE_NO_PAD.encode(sha256.as_ref()),
            chain: certs.iter().map(|c| STANDARD.encode(c)).collect(),
            send_chain,
            not_after,
            subject,
        };
        cert.assertion("validation", "https://validation.invalid/token")
            .map_err(|e| format!("the private key cannot sign: {e}"))?;
        Ok(cert)
    }

    fn from_pem(bytes: &[u8]) -> Result<(SecretString, Vec<Vec<u8>>), String> {
        let certs: Vec<Vec<u8>> = CertificateDer::pem_slice_iter(bytes)
            .map(|c| c.map(|c| c.as_ref().to_vec()))
            .collect::<Result<_, _>>()
            .map_err(|e| format!("bad PEM certificate: {e}"))?;
        if bytes.windows(29).any(|w| w == b"-----BEGIN ENCRYPTED PRIVATE") {
            return Err(
                "encrypted PEM private keys are not supported; use an unencrypted PEM or a .pfx with a password"
                    .to_owned(),
            );
        }
        let key = PrivateKeyDer::from_pem_slice(bytes).map_err(|e| format!("no private key in the PEM file ({e})"))?;
        let pem = match &key {
            PrivateKeyDer::Pkcs8(k) => pem_encode("PRIVATE KEY", k.secret_pkcs8_der()),
            PrivateKeyDer::Pkcs1(k) => pem_encode("RSA PRIVATE KEY", k.secret_pkcs1_der()),
            _ => return Err("the private key is not an RSA key".to_owned()),
        };
        Ok((pem, certs))
    }

    fn from_pkcs12(bytes: &[u8], password: Option<&str>) -> Result<(SecretString, Vec<Vec<u8>>), String> {
        let store = p12_keystore::KeyStore::from_pkcs12(
            bytes,
            password.unwrap_or(""),
            p12_keystore::Pkcs12ImportPolicy::Strict,
        )
        .map_err(|e| format!("cannot open the PKCS#12 file (wrong password?): {e}"))?;
        let (_, chain) =
            store.private_key_chain().ok_or("the PKCS#12 file holds no private key with its certificate")?;
        let certs = chain.certs().iter().map(|c| c.as_der().to_vec()).collect();
        Ok((pem_encode("PRIVATE KEY", chain.key().as_der()), certs))
    }

    /// A fresh client assertion for `client_id` at `token_url`.
    pub fn assertion(&self, client_id: &str, token_url: &str) -> Result<String, String> {
        let now = crate::token::unix_secs(SystemTime::now());
        let claims = AssertionClaims {
            aud: token_url,
            iss: client_id,
            sub: client_id,
            jti: uuid::Uuid::new_v4().to_string(),
            nbf: now,
            iat: now,
            exp: now + ASSERTION_LIFETIME.as_secs(),
        };
        let mut header = match self.alg {
            AssertionAlg::Ps256 => {
                let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::PS256);
                h.x5t_s256 = Some(self.x5t_s256.clone());
                h
            }
            AssertionAlg::Rs256 => {
                let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
                h.x5t = Some(self.x5t.clone());
                h
            }
        };
        header.typ = Some("JWT".to_owned());
        if self.send_chain {
            header.x5c = Some(self.chain.clone());
        }
        jsonwebtoken::encode(&header, &claims, &self.key).map_err(|e| e.to_string())
    }

    /// When the certificate expires.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// The certificate's subject, for messages.
    pub fn subject(&self) -> &str {
        &self.subject
    }
}

/// PEM-encodes DER bytes under `label` (the result may hold a private key, hence a secret).
pub fn pem_encode(label: &str, der: &[u8]) -> SecretString {
    let b64 = STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out.into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_is_redacted() {
        let c = ClientCredential::Secret { secret: "hunter2-very-secret".into(), origin: "file /x".into() };
        let dbg = format!("{c:?} {c:#?}");
        assert!(!dbg.contains("hunter2"), "{dbg}");
        assert!(dbg.contains("[redacted]"));
    }

    #[test]
    fn federated_file_is_read_on_every_request() {
        let d = tempfile::tempdir().expect("tempdir");
        let path = d.path().join("token");
        let c = ClientCredential::Federated { path: path.clone(), origin: "test".into() };
        assert!(c.form_params("cid", "https://x/token").expect_err("missing").contains("cannot read"));
        std::fs::write(&path, "first\n").expect("write");
        assert_eq!(c.form_params("cid", "https://x/token").expect("params")[1].1, "first");
        std::fs::write(&path, "second").expect("write");
        assert_eq!(c.form_params("cid", "https://x/token").expect("params")[1].1, "second");
        std::fs::write(&path, "  \n").expect("write");
        assert!(c.form_params("cid", "https://x/token").expect_err("empty").contains("empty"));
    }

    #[test]
    fn garbage_is_not_a_certificate() {
        let e = Certificate::load(
            b"-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n",
            None,
            AssertionAlg::Ps256,
            false,
        )
        .expect_err("garbage");
        assert!(!e.is_empty());
        assert!(Certificate::load(b"\x30\x03\x02\x01\x03", Some("pw"), AssertionAlg::Ps256, false).is_err());
    }
}
