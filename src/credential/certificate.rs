//! Certificate credentials: PEM or PKCS#12 loaded once, then a fresh RFC 7523 client assertion per
//! request: `aud` = the exact token URL, `iss` = `sub` = client id, a fresh `jti`, `nbf`/`iat` now, `exp`
//! five minutes later; header `alg` PS256 + `x5t#S256` (default) or RS256 + `x5t`, and `x5c` (the chain)
//! when `send_certificate_chain` is set, for subject-name/issuer authentication.

use std::fmt;
use std::path::Path;
use std::time::{Duration, SystemTime};

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use secrecy::{ExposeSecret, SecretString};
use serde::Serialize;

use crate::clock::unix_secs;
use crate::secret::pem_encode;

/// Lifetime of a client assertion.
const ASSERTION_LIFETIME: Duration = Duration::from_secs(300);
/// Certificates expiring within this are warned about (log and `tokend check`).
pub(crate) const EXPIRY_WARNING: Duration = Duration::from_secs(30 * 86_400);

/// The signature algorithm of client assertions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AssertionAlg {
    /// RSASSA-PSS with SHA-256, header `x5t#S256` (Entra's documented default).
    Ps256,
    /// RSASSA-PKCS1-v1_5 with SHA-256, header `x5t` (SHA-1 thumbprint).
    Rs256,
}

/// Why certificate bytes are not a usable credential. Never carries key material.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CertificateError {
    /// A PEM certificate block that does not decode.
    #[error("bad PEM certificate: {0}")]
    Pem(String),
    /// An encrypted PEM private key.
    #[error("encrypted PEM private keys are not supported; use an unencrypted PEM or a .pfx with a password")]
    EncryptedPemKey,
    /// A PEM file without a private key.
    #[error("no private key in the PEM file ({0})")]
    NoPemKey(String),
    /// A key that is not RSA.
    #[error("the private key is not an RSA key")]
    NotRsa,
    /// A PKCS#12 file that does not open.
    #[error("cannot open the PKCS#12 file (wrong password?): {0}")]
    Pkcs12(String),
    /// A PKCS#12 file without a key and its certificate.
    #[error("the PKCS#12 file holds no private key with its certificate")]
    Pkcs12NoKey,
    /// No certificate at all.
    #[error("no certificate found")]
    NoCertificate,
    /// A certificate that does not parse as X.509.
    #[error("the certificate cannot be parsed: {0}")]
    X509(String),
    /// A key that `jsonwebtoken` refuses.
    #[error("the private key is not a usable RSA key: {0}")]
    Key(#[source] jsonwebtoken::errors::Error),
    /// A key that cannot sign.
    #[error("the private key cannot sign: {0}")]
    Sign(#[source] jsonwebtoken::errors::Error),
}

/// A certificate credential: the RSA key (kept only inside `jsonwebtoken`'s key type), thumbprints,
/// the chain and the expiry.
pub(crate) struct Certificate {
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
    pub(crate) fn load(
        bytes: &[u8],
        password: Option<&str>,
        alg: AssertionAlg,
        send_chain: bool,
    ) -> Result<Self, CertificateError> {
        let is_pem = bytes.windows(10).any(|w| w == b"-----BEGIN");
        let (key_pem, certs) = if is_pem { Self::from_pem(bytes)? } else { Self::from_pkcs12(bytes, password)? };
        let leaf = certs.first().ok_or(CertificateError::NoCertificate)?;
        let (_, parsed) =
            x509_parser::parse_x509_certificate(leaf).map_err(|e| CertificateError::X509(e.to_string()))?;
        let not_after = SystemTime::UNIX_EPOCH
            + Duration::from_secs(u64::try_from(parsed.validity().not_after.timestamp()).unwrap_or(0));
        let subject = parsed.subject().to_string();
        let key = jsonwebtoken::EncodingKey::from_rsa_pem(key_pem.expose_secret().as_bytes())
            .map_err(CertificateError::Key)?;
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
        cert.assertion("validation", "https://validation.invalid/token").map_err(CertificateError::Sign)?;
        Ok(cert)
    }

    fn from_pem(bytes: &[u8]) -> Result<(SecretString, Vec<Vec<u8>>), CertificateError> {
        let certs: Vec<Vec<u8>> = CertificateDer::pem_slice_iter(bytes)
            .map(|c| c.map(|c| c.as_ref().to_vec()))
            .collect::<Result<_, _>>()
            .map_err(|e| CertificateError::Pem(e.to_string()))?;
        if bytes.windows(29).any(|w| w == b"-----BEGIN ENCRYPTED PRIVATE") {
            return Err(CertificateError::EncryptedPemKey);
        }
        let key = PrivateKeyDer::from_pem_slice(bytes).map_err(|e| CertificateError::NoPemKey(e.to_string()))?;
        let pem = match &key {
            PrivateKeyDer::Pkcs8(k) => pem_encode("PRIVATE KEY", k.secret_pkcs8_der()),
            PrivateKeyDer::Pkcs1(k) => pem_encode("RSA PRIVATE KEY", k.secret_pkcs1_der()),
            _ => return Err(CertificateError::NotRsa),
        };
        Ok((pem, certs))
    }

    fn from_pkcs12(bytes: &[u8], password: Option<&str>) -> Result<(SecretString, Vec<Vec<u8>>), CertificateError> {
        let store = p12_keystore::KeyStore::from_pkcs12(
            bytes,
            password.unwrap_or(""),
            p12_keystore::Pkcs12ImportPolicy::Strict,
        )
        .map_err(|e| CertificateError::Pkcs12(e.to_string()))?;
        let (_, chain) = store.private_key_chain().ok_or(CertificateError::Pkcs12NoKey)?;
        let certs = chain.certs().iter().map(|c| c.as_der().to_vec()).collect();
        Ok((pem_encode("PRIVATE KEY", chain.key().as_der()), certs))
    }

    /// A fresh client assertion for `client_id` at `token_url`.
    pub(crate) fn assertion(&self, client_id: &str, token_url: &str) -> Result<String, jsonwebtoken::errors::Error> {
        let now = unix_secs(SystemTime::now());
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
        jsonwebtoken::encode(&header, &claims, &self.key)
    }

    /// Identifies the certificate and how it is used, without revealing the key.
    pub(crate) fn fingerprint(&self) -> String {
        format!("{}:{:?}:{}", self.x5t_s256, self.alg, self.send_chain)
    }

    /// When the certificate expires (its `notAfter`).
    pub(crate) fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// A warning when the certificate (read from `path`) expires within [`EXPIRY_WARNING`] of `now`, or has expired.
    pub(crate) fn expiry_warning(&self, path: &Path, now: SystemTime) -> Option<String> {
        let when = httpdate::fmt_http_date(self.not_after);
        match self.not_after.duration_since(now) {
            Err(_) => Some(format!("certificate {} ({}) expired on {when}", path.display(), self.subject)),
            Ok(left) if left < EXPIRY_WARNING => Some(format!(
                "certificate {} ({}) expires in {} days, on {when}; renew it",
                path.display(),
                self.subject,
                left.as_secs() / 86_400
            )),
            Ok(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_is_not_a_certificate() {
        let e = Certificate::load(
            b"-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n",
            None,
            AssertionAlg::Ps256,
            false,
        )
        .expect_err("garbage");
        assert!(!e.to_string().is_empty());
        assert!(matches!(
            Certificate::load(b"\x30\x03\x02\x01\x03", Some("pw"), AssertionAlg::Ps256, false),
            Err(CertificateError::Pkcs12(_))
        ));
    }
}
