//! Certificate credentials: PEM or PKCS#12 loaded once, then a fresh RFC 7523 client assertion per
//! request: `aud` = the exact token URL, `iss` = `sub` = client id, a fresh `jti`, `nbf`/`iat` now, `exp`
//! five minutes later; header `alg` PS256 + `x5t#S256` (default) or RS256 + `x5t`, and `x5c` (the chain)
//! when `send_certificate_chain` is set, for subject-name/issuer authentication. The key is in the file
//! (PEM or PKCS#12), or on a PKCS#11 token ([`super::pkcs11`]) with the certificate alone in a PEM file;
//! either way one assertion is signed at load and verified with the certificate's public key, so a
//! key that does not belong to the certificate is a load error, not an IdP rejection later.

use std::fmt;
use std::path::Path;
use std::time::{Duration, SystemTime};

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use secrecy::{ExposeSecret, SecretString};
use serde::Serialize;

use super::pkcs11::{TokenError, TokenKey};
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
    Sign(#[source] SignError),
    /// A test signature that the certificate's public key does not verify.
    #[error(
        "the private key does not belong to the certificate (a test signature does not verify with its public key)"
    )]
    KeyMismatch,
    /// A private key in the certificate file although the key is on a token.
    #[error(
        "the file holds a private key, but certificate_key names the key on a token: keep only the certificate(s) in it"
    )]
    KeyInFile,
}

/// Why one client assertion could not be signed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SignError {
    /// `jsonwebtoken` (a key in a file) failed.
    #[error(transparent)]
    Jwt(#[from] jsonwebtoken::errors::Error),
    /// The token failed (it names the PKCS#11 call and code).
    #[error("{0}")]
    Token(#[from] TokenError),
}

/// Where the private key is and what signs with it.
enum Signer {
    /// In memory, from the PEM or PKCS#12 file (kept only inside `jsonwebtoken`'s key type).
    File(jsonwebtoken::EncodingKey),
    /// On a PKCS#11 token; never in this process.
    Token(Box<TokenKey>),
}

/// A certificate credential: what signs (the RSA key, or its token), thumbprints, the chain and the
/// expiry.
pub(crate) struct Certificate {
    signer: Signer,
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
            .field(
                "key",
                match &self.signer {
                    Signer::File(_) => &"[redacted]" as &dyn fmt::Debug,
                    Signer::Token(key) => key,
                },
            )
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
        let key = jsonwebtoken::EncodingKey::from_rsa_pem(key_pem.expose_secret().as_bytes())
            .map_err(CertificateError::Key)?;
        Self::build(Signer::File(key), &certs, alg, send_chain)
    }

    /// Loads a PEM file of certificate(s) only, for `key` on a PKCS#11 token, then signs one assertion
    /// on the token and verifies it with the certificate's public key.
    pub(crate) fn on_token(
        bytes: &[u8],
        key: TokenKey,
        alg: AssertionAlg,
        send_chain: bool,
    ) -> Result<Self, CertificateError> {
        if bytes.windows(17).any(|w| w.ends_with(b"PRIVATE KEY-----")) {
            return Err(CertificateError::KeyInFile);
        }
        let certs = Self::pem_certificates(bytes)?;
        Self::build(Signer::Token(Box::new(key)), &certs, alg, send_chain)
    }

    /// The leaf (first) certificate's facts, then one assertion signed and verified.
    fn build(signer: Signer, certs: &[Vec<u8>], alg: AssertionAlg, send_chain: bool) -> Result<Self, CertificateError> {
        let leaf = certs.first().ok_or(CertificateError::NoCertificate)?;
        let (_, parsed) =
            x509_parser::parse_x509_certificate(leaf).map_err(|e| CertificateError::X509(e.to_string()))?;
        let not_after = SystemTime::UNIX_EPOCH
            + Duration::from_secs(u64::try_from(parsed.validity().not_after.timestamp()).unwrap_or(0));
        let subject = parsed.subject().to_string();
        let public_key = parsed.public_key().subject_public_key.data.to_vec();
        let sha1 = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA1_FOR_LEGACY_USE_ONLY, leaf);
        let sha256 = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, leaf);
        let cert = Self {
            signer,
            alg,
            x5t: URL_SAFE_NO_PAD.encode(sha1.as_ref()),
            x5t_s256: URL_SAFE_NO_PAD.encode(sha256.as_ref()),
            chain: certs.iter().map(|c| STANDARD.encode(c)).collect(),
            send_chain,
            not_after,
            subject,
        };
        let jwt = cert.assertion("validation", "https://validation.invalid/token").map_err(CertificateError::Sign)?;
        cert.verify(&jwt, &public_key)?;
        Ok(cert)
    }

    /// Verifies a signed assertion with the certificate's public key (PKCS#1 `RSAPublicKey` DER).
    fn verify(&self, jwt: &str, public_key: &[u8]) -> Result<(), CertificateError> {
        let (signed, signature) = jwt.rsplit_once('.').ok_or(CertificateError::KeyMismatch)?;
        let signature = URL_SAFE_NO_PAD.decode(signature).map_err(|_| CertificateError::KeyMismatch)?;
        let alg: &dyn aws_lc_rs::signature::VerificationAlgorithm = match self.alg {
            AssertionAlg::Ps256 => &aws_lc_rs::signature::RSA_PSS_2048_8192_SHA256,
            AssertionAlg::Rs256 => &aws_lc_rs::signature::RSA_PKCS1_2048_8192_SHA256,
        };
        aws_lc_rs::signature::UnparsedPublicKey::new(alg, public_key)
            .verify(signed.as_bytes(), &signature)
            .map_err(|_| CertificateError::KeyMismatch)
    }

    /// The certificates of a PEM file, in order.
    fn pem_certificates(bytes: &[u8]) -> Result<Vec<Vec<u8>>, CertificateError> {
        CertificateDer::pem_slice_iter(bytes)
            .map(|c| c.map(|c| c.as_ref().to_vec()))
            .collect::<Result<_, _>>()
            .map_err(|e| CertificateError::Pem(e.to_string()))
    }

    fn from_pem(bytes: &[u8]) -> Result<(SecretString, Vec<Vec<u8>>), CertificateError> {
        let certs = Self::pem_certificates(bytes)?;
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
    pub(crate) fn assertion(&self, client_id: &str, token_url: &str) -> Result<String, SignError> {
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
        match &self.signer {
            Signer::File(key) => Ok(jsonwebtoken::encode(&header, &claims, key)?),
            Signer::Token(key) => {
                // What `jsonwebtoken::encode` does, with the signature made on the token.
                let signed = format!("{}.{}", b64_json(&header)?, b64_json(&claims)?);
                let signature = key.sign(self.alg, signed.as_bytes())?;
                Ok(format!("{signed}.{}", URL_SAFE_NO_PAD.encode(signature)))
            }
        }
    }

    /// The key on a PKCS#11 token, if that is where it is.
    pub(crate) fn token_key(&self) -> Option<&TokenKey> {
        match &self.signer {
            Signer::Token(key) => Some(key),
            Signer::File(_) => None,
        }
    }

    /// Identifies the certificate and how it is used, without revealing the key.
    pub(crate) fn fingerprint(&self) -> String {
        match &self.signer {
            Signer::File(_) => format!("{}:{:?}:{}", self.x5t_s256, self.alg, self.send_chain),
            Signer::Token(key) => format!("{}:{:?}:{}:{}", self.x5t_s256, self.alg, self.send_chain, key.uri()),
        }
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

/// base64url of the JSON of `value`: a JWT part.
fn b64_json<T: Serialize>(value: &T) -> Result<String, SignError> {
    let json = serde_json::to_vec(value).map_err(jsonwebtoken::errors::Error::from)?;
    Ok(URL_SAFE_NO_PAD.encode(json))
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
