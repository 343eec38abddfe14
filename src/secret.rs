//! Secret material: short fingerprints, secret files, random secrets and PEM encoding of keys.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use secrecy::SecretString;

/// `bytes` as `Bytes` that are zeroed when the last reference to them goes (an HTTP body holding a
/// secret: the request body to the IdP, a token answer).
pub(crate) fn wiped_bytes(bytes: Vec<u8>) -> bytes::Bytes {
    bytes::Bytes::from_owner(Wiped(bytes))
}

/// Bytes that are zeroed when the last reference to them goes. With one `memset` that
/// `std::hint::black_box` keeps the compiler from dropping as a dead store, rather than `zeroize`'s
/// byte-at-a-time volatile writes: a token answer is ~1.5 KB and this runs for every answer
/// (BENCHMARKS.md: rendering an answer took 550 ns with `Zeroizing`, most of it the wipe).
struct Wiped(Vec<u8>);

impl AsRef<[u8]> for Wiped {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl Drop for Wiped {
    fn drop(&mut self) {
        self.0.fill(0);
        std::hint::black_box(&mut self.0);
    }
}

/// `sha256:` + the first 12 hex digits of the bytes' SHA-256: enough to correlate, useless to replay.
pub(crate) fn fingerprint(bytes: &[u8]) -> String {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, bytes);
    let mut out = String::from("sha256:");
    for b in digest.as_ref().iter().take(6) {
        let _ = write!(out, "{b:02x}");
    }
    out
}

/// A secret file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SecretFileError {
    /// Missing, unreadable or not UTF-8.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Nothing but whitespace.
    #[error("{} is empty", path.display())]
    Empty {
        /// The file.
        path: PathBuf,
    },
}

impl SecretFileError {
    /// Whether the file does not exist.
    pub(crate) fn is_not_found(&self) -> bool {
        matches!(self, Self::Read { source, .. } if source.kind() == std::io::ErrorKind::NotFound)
    }
}

/// Reads a secret file, trims surrounding whitespace (editors add a newline) and refuses an empty one.
pub(crate) fn read_secret_file(path: &Path) -> Result<SecretString, SecretFileError> {
    let text =
        std::fs::read_to_string(path).map_err(|source| SecretFileError::Read { path: path.to_path_buf(), source })?;
    let secret = text.trim();
    if secret.is_empty() {
        return Err(SecretFileError::Empty { path: path.to_path_buf() });
    }
    Ok(secret.to_owned().into())
}

/// A warning when `path`'s mode has any bit of `mask` set (0o077: group or others; 0o007: others).
pub(crate) fn readable_warning(path: &Path, mask: u32) -> Option<String> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path).ok()?.permissions().mode();
    (mode & mask != 0).then(|| {
        format!(
            "secret file {} can be read by {} (mode {:04o}); run chmod {} on it",
            path.display(),
            if mask & 0o070 != 0 { "users other than its owner" } else { "any user" },
            mode & 0o7777,
            if mask & 0o070 != 0 { "600" } else { "o-rwx" }
        )
    })
}

/// A fresh random secret: 32 bytes from the system RNG, base64url.
pub(crate) fn random_secret() -> SecretString {
    let mut bytes = [0u8; 32];
    // The kernel's generator directly: aws-lc's first `rand::fill` seeds its own DRBG, which took
    // ~30 ms of tokend's start-up (BENCHMARKS.md).
    getrandom::fill(&mut bytes).expect("the system random number generator is available");
    URL_SAFE_NO_PAD.encode(bytes).into()
}

/// Compares a presented secret with the expected one in constant time.
pub(crate) fn constant_time_eq(presented: &[u8], expected: &[u8]) -> bool {
    aws_lc_rs::constant_time::verify_slices_are_equal(presented, expected).is_ok()
}

/// PEM-encodes DER bytes under `label` (the result may hold a private key, hence a secret).
pub(crate) fn pem_encode(label: &str, der: &[u8]) -> SecretString {
    let b64 = STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    let _ = writeln!(out, "-----END {label}-----");
    out.into()
}

#[cfg(test)]
mod tests {
    use secrecy::ExposeSecret;

    use super::*;

    #[test]
    fn fingerprints_tell_bytes_apart_that_lossy_utf8_would_merge() {
        // Two binary files (say, PKCS#12) that differ only in invalid UTF-8 bytes.
        let (a, b) = (b"PFX\xff\x00\x01", b"PFX\xfe\x00\x01");
        assert_eq!(String::from_utf8_lossy(a), String::from_utf8_lossy(b), "the old, lossy view merges them");
        assert_ne!(fingerprint(a), fingerprint(b));
        assert_eq!(fingerprint(b"x"), fingerprint(b"x"));
        assert_eq!(fingerprint(b"x").len(), "sha256:".len() + 12);
    }

    #[test]
    fn secret_files_are_trimmed_and_must_not_be_empty() {
        let d = tempfile::tempdir().expect("tempdir");
        let p = d.path().join("s");
        let e = read_secret_file(&p).expect_err("missing");
        assert!(e.is_not_found() && e.to_string().starts_with("cannot read"), "{e}");
        std::fs::write(&p, " value\n").expect("write");
        assert_eq!(read_secret_file(&p).expect("read").expose_secret(), "value");
        std::fs::write(&p, " \n").expect("write");
        let e = read_secret_file(&p).expect_err("empty");
        assert!(!e.is_not_found() && e.to_string().ends_with("is empty"), "{e}");
    }

    #[test]
    fn constant_time_comparison() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"ab", b"abc"));
    }
}
