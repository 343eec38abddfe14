//! Certificate keys that never leave a PKCS#11 token (an HSM, a TPM through `tpm2-pkcs11`, a YubiKey,
//! SoftHSM): the key is named by an RFC 7512 URI ([`KeyUri`]), found and logged into once, and every
//! client assertion is signed on the token (`CKM_SHA256_RSA_PKCS_PSS` with SHA-256, MGF1-SHA256 and a
//! 32-byte salt for PS256; `CKM_SHA256_RSA_PKCS` for RS256).
//!
//! - **One context per module, all calls serialised.** A PKCS#11 session is not thread-safe and a
//!   module may be initialised once per process, so every module (by path) has one [`Module`] for the
//!   life of the process, and every call into it holds that module's lock. Signing happens once per
//!   token fetch, not per request.
//! - **A token that goes away recovers by itself.** When signing on an open session fails, the
//!   session is dropped and the module finalised (`C_Finalize`) and initialised again with the next
//!   attempt: SoftHSM 2.6 answers `CKR_OBJECT_HANDLE_INVALID` / `CKR_GENERAL_ERROR` for new sessions and
//!   new lookups alike once a token's storage vanished under it, even after it is back, until then.
//!   The failure is transient: the caller retries with backoff, cached tokens keep being served.
//! - **A refused PIN is never tried again.** HSMs and TPMs lock after a few wrong PINs. A PIN the token
//!   refused (`CKR_PIN_INCORRECT`, `CKR_PIN_LOCKED`, …) is remembered for the life of the process (a
//!   short hash of it, per token); a later load or signing attempt with the same PIN fails at once
//!   without calling `C_Login`. Login is per token for the whole process: while a key is in use, a
//!   reload with a *different* PIN cannot check it (`C_Login` would answer
//!   `CKR_USER_ALREADY_LOGGED_IN` whatever it is), so that reload is rejected and a new PIN takes a
//!   restart; the same PIN reloads fine.
//! - Sessions are opened without cryptoki's close-on-drop and closed only in the context that opened
//!   them: after a re-initialisation an old session handle may name another key's new session.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::rsa::{PkcsMgfType, PkcsPssParams};
use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use parking_lot::Mutex;
use secrecy::{ExposeSecret, SecretString};

use super::AssertionAlg;
use crate::secret::SecretFileError;

/// Reads a PIN file. Exactly one trailing line ending (`\n` or `\r\n`) is removed — what `echo 1234 >
/// pin` and an editor add, kept by `systemd-creds encrypt` — and nothing else: other whitespace is
/// part of the PIN (a PIN may contain spaces). An empty PIN is refused.
pub(crate) fn read_pin_file(path: &Path) -> Result<SecretString, SecretFileError> {
    let text =
        std::fs::read_to_string(path).map_err(|source| SecretFileError::Read { path: path.to_path_buf(), source })?;
    let pin = text.strip_suffix('\n').map(|t| t.strip_suffix('\r').unwrap_or(t)).unwrap_or(&text);
    if pin.is_empty() {
        return Err(SecretFileError::Empty { path: path.to_path_buf() });
    }
    Ok(pin.to_owned().into())
}

/// A private key on a PKCS#11 token as an RFC 7512 URI names it. Holds no secret: a PIN comes from
/// `pin-source` (`pin-value` is refused).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct KeyUri {
    /// The URI as written, for messages.
    text: String,
    /// `module-path`: the PKCS#11 module (a shared library).
    pub(crate) module: PathBuf,
    /// `pin-source`, as written: `file:PATH`, a path, or `credential:NAME` (a systemd credential).
    pub(crate) pin_source: String,
    token: Option<String>,
    manufacturer: Option<String>,
    serial: Option<String>,
    model: Option<String>,
    slot_id: Option<u64>,
    object: Option<String>,
    id: Option<Vec<u8>>,
}

/// A PKCS#11 URI that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum UriError {
    /// Not `pkcs11:…`.
    #[error("is not a PKCS#11 URI (RFC 7512): it must start with \"pkcs11:\"")]
    Scheme,
    /// `name=value` expected.
    #[error("{0:?} is not an attribute (name=value)")]
    Malformed(String),
    /// A bad `%XX` escape or text that is not UTF-8.
    #[error("{0}: bad percent-encoding or not UTF-8")]
    Encoding(String),
    /// An attribute given twice.
    #[error("{0} is given twice")]
    Twice(String),
    /// An attribute tokend does not use: it would be ignored, so it is an error.
    #[error(
        "{0} is not supported; use token, manufacturer, serial, model, slot-id, object, id, type=private \
         and the query attributes module-path and pin-source"
    )]
    Unsupported(String),
    /// `type=` other than `private`.
    #[error("type={0} names no private key; write type=private or leave it out")]
    Type(String),
    /// `slot-id` not a number.
    #[error("slot-id={0} is not a number")]
    SlotId(String),
    /// A PIN inline.
    #[error("pin-value puts the PIN in the configuration; use pin-source=file:PATH or pin-source=credential:NAME")]
    PinValue,
    /// `module-name` (p11-kit's lookup) instead of a path.
    #[error("module-name is not supported; give the module's file as module-path=/usr/lib/…/module.so")]
    ModuleName,
    /// A required query attribute is missing.
    #[error("{0} is missing; {1}")]
    Missing(&'static str, &'static str),
    /// A relative module path.
    #[error("module-path={0} is not an absolute path")]
    RelativeModule(String),
}

impl KeyUri {
    /// Parses `pkcs11:path-attrs?query-attrs` (RFC 7512). Unknown attributes are errors.
    pub(crate) fn parse(text: &str) -> Result<Self, UriError> {
        let rest = text.trim().strip_prefix("pkcs11:").ok_or(UriError::Scheme)?;
        let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
        let mut uri = Self {
            text: text.trim().to_owned(),
            module: PathBuf::new(),
            pin_source: String::new(),
            token: None,
            manufacturer: None,
            serial: None,
            model: None,
            slot_id: None,
            object: None,
            id: None,
        };
        let mut seen = HashSet::new();
        let attrs = path.split(';').map(|a| (a, false)).chain(query.split('&').map(|a| (a, true)));
        for (attr, in_query) in attrs.filter(|(a, _)| !a.is_empty()) {
            let (name, value) = attr.split_once('=').ok_or_else(|| UriError::Malformed(attr.to_owned()))?;
            if !seen.insert(name.to_owned()) {
                return Err(UriError::Twice(name.to_owned()));
            }
            let bytes = percent_decode(value).ok_or_else(|| UriError::Encoding(name.to_owned()))?;
            let text = || String::from_utf8(bytes.clone()).map_err(|_| UriError::Encoding(name.to_owned()));
            match (name, in_query) {
                ("token", false) => uri.token = Some(text()?),
                ("manufacturer", false) => uri.manufacturer = Some(text()?),
                ("serial", false) => uri.serial = Some(text()?),
                ("model", false) => uri.model = Some(text()?),
                ("object", false) => uri.object = Some(text()?),
                ("id", false) => uri.id = Some(bytes),
                ("slot-id", false) => {
                    let v = text()?;
                    uri.slot_id = Some(v.parse().map_err(|_| UriError::SlotId(v.clone()))?);
                }
                ("type", false) => match text()?.as_str() {
                    "private" => {}
                    other => return Err(UriError::Type(other.to_owned())),
                },
                ("module-path", true) => {
                    let v = text()?;
                    if !Path::new(&v).is_absolute() {
                        return Err(UriError::RelativeModule(v));
                    }
                    uri.module = PathBuf::from(v);
                }
                ("pin-source", true) => uri.pin_source = text()?,
                ("pin-value", true) => return Err(UriError::PinValue),
                ("module-name", true) => return Err(UriError::ModuleName),
                _ => return Err(UriError::Unsupported(name.to_owned())),
            }
        }
        if uri.module.as_os_str().is_empty() {
            return Err(UriError::Missing("module-path", "name the PKCS#11 module: ?module-path=/usr/lib/…/module.so"));
        }
        if uri.pin_source.is_empty() {
            return Err(UriError::Missing(
                "pin-source",
                "the key is read and used after a login: &pin-source=file:PATH or &pin-source=credential:NAME",
            ));
        }
        Ok(uri)
    }

    /// The token and key the URI asks for, for messages: `token="tokend" object="sp-key"`.
    fn wanted(&self) -> String {
        let mut parts = Vec::new();
        for (name, v) in [
            ("token", &self.token),
            ("manufacturer", &self.manufacturer),
            ("serial", &self.serial),
            ("model", &self.model),
            ("object", &self.object),
        ] {
            if let Some(v) = v {
                parts.push(format!("{name}={v:?}"));
            }
        }
        if let Some(s) = self.slot_id {
            parts.push(format!("slot-id={s}"));
        }
        if let Some(id) = &self.id {
            parts.push(format!("id={}", hex(id)));
        }
        if parts.is_empty() { "any".to_owned() } else { parts.join(" ") }
    }
}

impl fmt::Display for KeyUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// `%XX`-decoding (RFC 3986); `None` on a bad escape.
fn percent_decode(s: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(s.len());
    let mut bytes = s.bytes();
    while let Some(b) = bytes.next() {
        if b == b'%' {
            let hi = (bytes.next()? as char).to_digit(16)?;
            let lo = (bytes.next()? as char).to_digit(16)?;
            out.push(u8::try_from(hi * 16 + lo).ok()?);
        } else {
            out.push(b);
        }
    }
    Some(out)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Why the key on a token cannot be used. Names the PKCS#11 function and its `CKR_` code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum TokenError {
    /// The module does not load (missing file, not a PKCS#11 module).
    #[error("cannot load the PKCS#11 module {}: {detail}", path.display())]
    Module {
        /// The module.
        path: PathBuf,
        /// Why.
        detail: String,
    },
    /// A PKCS#11 call failed: `C_Login: CKR_PIN_INCORRECT`.
    #[error("{function}: {code}")]
    Call {
        /// The function, `C_Login`.
        function: String,
        /// The return value, `CKR_PIN_INCORRECT`.
        code: String,
    },
    /// No token matches.
    #[error("no token matches {wanted} (tokens present: {present})")]
    NoToken {
        /// What the URI asks for.
        wanted: String,
        /// The labels of the tokens there are.
        present: String,
    },
    /// Several tokens match.
    #[error("{count} tokens match {wanted}; add serial= or slot-id= to the URI")]
    ManyTokens {
        /// How many.
        count: usize,
        /// What the URI asks for.
        wanted: String,
    },
    /// No private key matches.
    #[error("no private key matches {wanted} on token {token:?} (after login)")]
    NoObject {
        /// What the URI asks for.
        wanted: String,
        /// The token's label.
        token: String,
    },
    /// Several private keys match.
    #[error("{count} private keys match {wanted} on token {token:?}; add object= or id= to the URI")]
    ManyObjects {
        /// How many.
        count: usize,
        /// What the URI asks for.
        wanted: String,
        /// The token's label.
        token: String,
    },
    /// Not an RSA key (Entra's assertions are PS256 or RS256).
    #[error("the private key on token {token:?} is not an RSA key")]
    NotRsa {
        /// The token's label.
        token: String,
    },
    /// The token is logged in (for the running key) with another PIN, which cannot be checked now.
    #[error(
        "token {token:?} is logged in with another PIN (the running key's), so this one cannot be checked \
         without logging the running key out; a new PIN takes effect with a restart of tokend"
    )]
    OtherPin {
        /// The token's label.
        token: String,
    },
    /// This PIN was refused before; it is not tried again.
    #[error(
        "C_Login: {code} earlier with this PIN; tokend does not try a refused PIN again (HSMs and TPMs lock \
         after a few wrong PINs): fix the PIN in pin-source (a changed PIN file is picked up by itself)"
    )]
    PinRefused {
        /// The code the token answered then.
        code: String,
    },
}

impl TokenError {
    fn call(e: CkError) -> Self {
        match e {
            CkError::Pkcs11(rv, function) => Self::Call { function: format!("C_{function:?}"), code: ckr(rv) },
            other => Self::Call { function: "PKCS#11".to_owned(), code: other.to_string() },
        }
    }
}

/// `RvError::PinIncorrect` → `CKR_PIN_INCORRECT`: the name operators look up, not the spec's paragraph.
fn ckr(rv: RvError) -> String {
    if matches!(rv, RvError::VendorDefined(_) | RvError::UnknownErrorCode(_)) {
        return rv.to_string();
    }
    let mut out = String::from("CKR");
    for c in format!("{rv:?}").chars() {
        if c.is_ascii_uppercase() {
            out.push('_');
        }
        out.push(c.to_ascii_uppercase());
    }
    out
}

/// Whether the token refused the PIN itself (as opposed to being unreachable).
fn is_pin_refusal(rv: RvError) -> bool {
    matches!(
        rv,
        RvError::PinIncorrect | RvError::PinLocked | RvError::PinExpired | RvError::PinInvalid | RvError::PinLenRange
    )
}

/// What the token says about the key, for `tokend check` and the start-up warnings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct KeyFacts {
    /// The token's label.
    pub(crate) token: String,
    /// The token's model and manufacturer, `SoftHSM v2 (SoftHSM project)`.
    pub(crate) model: String,
    /// The token's serial number.
    pub(crate) serial: String,
    /// The key's `CKA_LABEL`.
    pub(crate) label: String,
    /// The key's `CKA_ID`, hex.
    pub(crate) id: String,
    /// `CKA_SENSITIVE`: the key's value is never revealed in plaintext.
    pub(crate) sensitive: bool,
    /// `CKA_EXTRACTABLE`: the key can be wrapped (exported) off the token.
    pub(crate) extractable: bool,
    /// `CKA_NEVER_EXTRACTABLE`: the key was never extractable.
    pub(crate) never_extractable: bool,
}

/// One PKCS#11 module (shared library) for the life of the process.
#[derive(Debug)]
struct Module {
    state: Mutex<ModuleState>,
}

struct ModuleState {
    /// The initialised context, `None` after a failure until the next attempt.
    ctx: Option<Pkcs11>,
    /// Counts re-initialisations: a session opened under an older one is gone.
    generation: u64,
    /// (token serial and label, PIN hash) the token refused → the code it answered.
    refused: HashMap<(String, String), String>,
    /// Token serial and label → the hash of the PIN it is logged in with. Login is per token for
    /// the whole process, so while a key is in use a second `C_Login` answers
    /// `CKR_USER_ALREADY_LOGGED_IN` whatever the PIN: a different PIN cannot be checked then.
    logged_in: HashMap<String, String>,
}

impl fmt::Debug for ModuleState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ModuleState").field("generation", &self.generation).finish_non_exhaustive()
    }
}

impl Module {
    /// The process's one `Module` for `path` (canonicalised when it exists: two spellings of one
    /// library share its single initialisation).
    fn get(path: &Path) -> Arc<Self> {
        static MODULES: OnceLock<Mutex<HashMap<PathBuf, Arc<Module>>>> = OnceLock::new();
        let key = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
        let mut map = MODULES.get_or_init(Mutex::default).lock();
        Arc::clone(map.entry(key).or_insert_with(|| {
            Arc::new(Module {
                state: Mutex::new(ModuleState {
                    ctx: None,
                    generation: 0,
                    refused: HashMap::new(),
                    logged_in: HashMap::new(),
                }),
            })
        }))
    }
}

impl ModuleState {
    /// The context, loading and initialising the module if needed.
    fn context(&mut self, path: &Path) -> Result<Pkcs11, TokenError> {
        if let Some(ctx) = &self.ctx {
            return Ok(ctx.clone());
        }
        let ctx = Pkcs11::new(path).map_err(|e| TokenError::Module {
            path: path.to_path_buf(),
            detail: match e {
                CkError::LibraryLoading(e) => e.to_string(),
                other => other.to_string(),
            },
        })?;
        match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
            Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
            Err(e) => return Err(TokenError::call(e)),
        }
        self.ctx = Some(ctx.clone());
        Ok(ctx)
    }

    /// Finalises the context; the next attempt initialises a new one.
    fn reset(&mut self) {
        if let Some(ctx) = self.ctx.take()
            && let Err(e) = ctx.finalize()
        {
            tracing::debug!("C_Finalize: {e}");
        }
        self.logged_in.clear();
        self.generation += 1;
    }
}

/// An open session with the key found in it.
struct Open {
    generation: u64,
    session: Session,
    key: ObjectHandle,
}

/// A private key on a token, logged into, that signs client assertions. `Debug` shows no PIN.
pub(crate) struct TokenKey {
    uri: KeyUri,
    pin: SecretString,
    module: Arc<Module>,
    /// Locked only while holding the module's lock.
    open: Mutex<Option<Open>>,
    facts: KeyFacts,
}

impl fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenKey")
            .field("uri", &self.uri.text)
            .field("pin", &"[redacted]")
            .field("facts", &self.facts)
            .finish_non_exhaustive()
    }
}

impl TokenKey {
    /// Loads the module, finds the token, logs in with `pin`, finds the one RSA private key the URI
    /// names and reads its attributes. Test-signing is the certificate's job.
    pub(crate) fn open(uri: KeyUri, pin: SecretString) -> Result<Self, TokenError> {
        let module = Module::get(&uri.module);
        let mut state = module.state.lock();
        let connected = connect(&uri, &pin, &mut state);
        let (open, facts) = match connected {
            Ok(v) => v,
            Err(e) => {
                if !matches!(e, TokenError::PinRefused { .. }) {
                    state.reset();
                }
                return Err(e);
            }
        };
        drop(state);
        Ok(Self { uri, pin, open: Mutex::new(Some(open)), module, facts })
    }

    /// What the token says about the key.
    pub(crate) fn facts(&self) -> &KeyFacts {
        &self.facts
    }

    /// The URI naming the key.
    pub(crate) fn uri(&self) -> &KeyUri {
        &self.uri
    }

    /// Signs `data` on the token. An open session that fails is given up with its context and one
    /// fresh attempt is made (the token may be back already); a failure of that is returned, and the
    /// next call starts afresh again.
    pub(crate) fn sign(&self, alg: AssertionAlg, data: &[u8]) -> Result<Vec<u8>, TokenError> {
        let mechanism = match alg {
            AssertionAlg::Ps256 => Mechanism::Sha256RsaPkcsPss(PkcsPssParams {
                hash_alg: MechanismType::SHA256,
                mgf: PkcsMgfType::MGF1_SHA256,
                s_len: 32.into(),
            }),
            AssertionAlg::Rs256 => Mechanism::Sha256RsaPkcs,
        };
        let mut state = self.module.state.lock();
        let mut open = self.open.lock();
        // A session of an older context is gone with it: it is dropped, its handle never closed in
        // this one.
        if let Some(o) = open.take()
            && o.generation == state.generation
            && state.ctx.is_some()
        {
            match o.session.sign(&mechanism, o.key, data) {
                Ok(signature) => {
                    *open = Some(o);
                    return Ok(signature);
                }
                Err(e) => {
                    tracing::warn!(
                        key = %self.uri,
                        "signing on PKCS#11 token {:?} failed ({}); reconnecting with a new PKCS#11 context",
                        self.facts.token,
                        TokenError::call(e)
                    );
                    // Finalising its context closes the session.
                    state.reset();
                }
            }
        }
        let attempt = connect(&self.uri, &self.pin, &mut state).and_then(|(o, _)| {
            match o.session.sign(&mechanism, o.key, data) {
                Ok(signature) => Ok((o, signature)),
                Err(e) => Err(TokenError::call(e)),
            }
        });
        match attempt {
            Ok((o, signature)) => {
                *open = Some(o);
                Ok(signature)
            }
            Err(e) => {
                if !matches!(e, TokenError::PinRefused { .. }) {
                    state.reset();
                }
                Err(e)
            }
        }
    }
}

impl Drop for TokenKey {
    fn drop(&mut self) {
        let state = self.module.state.lock();
        if let Some(o) = self.open.lock().take()
            && o.generation == state.generation
            && state.ctx.is_some()
            && let Err(e) = o.session.close()
        {
            tracing::debug!("C_CloseSession: {e}");
        }
    }
}

/// Finds the token, logs in (unless the PIN was refused before), finds the key and reads its facts.
fn connect(uri: &KeyUri, pin: &SecretString, state: &mut ModuleState) -> Result<(Open, KeyFacts), TokenError> {
    let ctx = state.context(&uri.module)?;
    let (slot, token) = find_token(&ctx, uri)?;
    let token_id = format!("{}/{}", token.serial, token.token);
    let pin_hash = crate::secret::fingerprint(pin.expose_secret().as_bytes());
    let refusal = (token_id.clone(), pin_hash.clone());
    if let Some(code) = state.refused.get(&refusal) {
        return Err(TokenError::PinRefused { code: code.clone() });
    }
    let session = ctx.open_ro_session_no_drop(slot).map_err(TokenError::call)?;
    let logged_in = match session.login(UserType::User, Some(pin)) {
        Ok(()) => {
            state.logged_in.insert(token_id, pin_hash);
            Ok(())
        }
        Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => match state.logged_in.get(&token_id) {
            Some(hash) if *hash != pin_hash => Err(TokenError::OtherPin { token: token.token.clone() }),
            _ => Ok(()),
        },
        Err(CkError::Pkcs11(rv, f)) if is_pin_refusal(rv) => {
            let e = TokenError::call(CkError::Pkcs11(rv, f));
            state.refused.insert(refusal, ckr(rv));
            Err(e)
        }
        Err(e) => Err(TokenError::call(e)),
    };
    match logged_in.and_then(|()| find_key(&session, uri, &token)) {
        Ok((key, facts)) => Ok((Open { generation: state.generation, session, key }, facts)),
        Err(e) => {
            if let Err(e) = session.close() {
                tracing::debug!("C_CloseSession: {e}");
            }
            Err(e)
        }
    }
}

/// The token's facts so far (label, model, serial); the key's are added by [`login_and_find`].
fn find_token(ctx: &Pkcs11, uri: &KeyUri) -> Result<(Slot, KeyFacts), TokenError> {
    let mut present = Vec::new();
    let mut matching = Vec::new();
    for slot in ctx.get_slots_with_initialized_token().map_err(TokenError::call)? {
        let info = ctx.get_token_info(slot).map_err(TokenError::call)?;
        present.push(format!("{:?}", info.label()));
        let is = |want: &Option<String>, have: &str| want.as_deref().is_none_or(|w| w == have);
        if is(&uri.token, info.label())
            && is(&uri.manufacturer, info.manufacturer_id())
            && is(&uri.serial, info.serial_number())
            && is(&uri.model, info.model())
            && uri.slot_id.is_none_or(|s| s == slot.id())
        {
            let facts = KeyFacts {
                token: info.label().to_owned(),
                model: format!("{} ({})", info.model(), info.manufacturer_id()),
                serial: info.serial_number().to_owned(),
                label: String::new(),
                id: String::new(),
                sensitive: false,
                extractable: true,
                never_extractable: false,
            };
            matching.push((slot, facts));
        }
    }
    match matching.len() {
        1 => Ok(matching.remove(0)),
        0 => Err(TokenError::NoToken {
            wanted: uri.wanted(),
            present: if present.is_empty() { "none".to_owned() } else { present.join(", ") },
        }),
        count => Err(TokenError::ManyTokens { count, wanted: uri.wanted() }),
    }
}

/// Finds the one RSA private key the URI names, after login, and reads its facts.
fn find_key(session: &Session, uri: &KeyUri, token: &KeyFacts) -> Result<(ObjectHandle, KeyFacts), TokenError> {
    let mut template = vec![Attribute::Class(ObjectClass::PRIVATE_KEY)];
    if let Some(label) = &uri.object {
        template.push(Attribute::Label(label.as_bytes().to_vec()));
    }
    if let Some(id) = &uri.id {
        template.push(Attribute::Id(id.clone()));
    }
    let found = session.find_objects(&template).map_err(TokenError::call)?;
    let key = match found.as_slice() {
        [one] => *one,
        [] => return Err(TokenError::NoObject { wanted: uri.wanted(), token: token.token.clone() }),
        many => {
            return Err(TokenError::ManyObjects {
                count: many.len(),
                wanted: uri.wanted(),
                token: token.token.clone(),
            });
        }
    };
    let wanted = [
        AttributeType::KeyType,
        AttributeType::Label,
        AttributeType::Id,
        AttributeType::Sensitive,
        AttributeType::Extractable,
        AttributeType::NeverExtractable,
    ];
    let mut facts = token.clone();
    let mut rsa = false;
    for attribute in session.get_attributes(key, &wanted).map_err(TokenError::call)? {
        match attribute {
            Attribute::KeyType(t) => rsa = t == KeyType::RSA,
            Attribute::Label(l) => facts.label = String::from_utf8_lossy(&l).into_owned(),
            Attribute::Id(id) => facts.id = hex(&id),
            Attribute::Sensitive(b) => facts.sensitive = b,
            Attribute::Extractable(b) => facts.extractable = b,
            Attribute::NeverExtractable(b) => facts.never_extractable = b,
            _ => {}
        }
    }
    if !rsa {
        return Err(TokenError::NotRsa { token: token.token.clone() });
    }
    Ok((key, facts))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SOFTHSM: &str = "module-path=/usr/lib/softhsm/libsofthsm2.so";

    #[test]
    fn rfc_7512_uris_parse_and_unknown_attributes_are_errors() {
        let uri = KeyUri::parse(&format!(
            "pkcs11:token=tok%20en;object=sp-key;id=%01%ff;type=private?{SOFTHSM}&pin-source=file:/etc/tokend/pin"
        ))
        .expect("valid");
        assert_eq!(uri.token.as_deref(), Some("tok en"));
        assert_eq!(uri.object.as_deref(), Some("sp-key"));
        assert_eq!(uri.id, Some(vec![1, 0xff]));
        assert_eq!(uri.module, Path::new("/usr/lib/softhsm/libsofthsm2.so"));
        assert_eq!(uri.pin_source, "file:/etc/tokend/pin");
        assert_eq!(uri.wanted(), "token=\"tok en\" object=\"sp-key\" id=01ff");
        let err = |text: &str| KeyUri::parse(text).expect_err(text);
        let pin = "pin-source=credential:hsm-pin";
        assert_eq!(err("file:/x"), UriError::Scheme);
        assert_eq!(err(&format!("pkcs11:token=a;tokn=b?{SOFTHSM}&{pin}")), UriError::Unsupported("tokn".into()));
        assert_eq!(err(&format!("pkcs11:token=a;token=b?{SOFTHSM}&{pin}")), UriError::Twice("token".into()));
        assert_eq!(err(&format!("pkcs11:type=cert?{SOFTHSM}&{pin}")), UriError::Type("cert".into()));
        assert_eq!(err(&format!("pkcs11:token=a?{SOFTHSM}&pin-value=1234")), UriError::PinValue);
        assert_eq!(err(&format!("pkcs11:token=a?module-name=softhsm2&{pin}")), UriError::ModuleName);
        assert!(matches!(err(&format!("pkcs11:token=a?{pin}")), UriError::Missing("module-path", _)));
        assert!(matches!(err(&format!("pkcs11:token=a?{SOFTHSM}")), UriError::Missing("pin-source", _)));
        assert_eq!(err(&format!("pkcs11:token=%zz?{SOFTHSM}&{pin}")), UriError::Encoding("token".into()));
        assert_eq!(err(&format!("pkcs11:token?{SOFTHSM}&{pin}")), UriError::Malformed("token".into()));
        assert!(matches!(err(&format!("pkcs11:token=a?module-path=lib.so&{pin}")), UriError::RelativeModule(_)));
        // A path attribute in the query (or the reverse) is not what RFC 7512 means.
        assert!(matches!(err(&format!("pkcs11:module-path=/x.so?token=a&{pin}")), UriError::Unsupported(_)));
    }

    #[test]
    fn return_codes_read_as_their_ckr_names() {
        assert_eq!(ckr(RvError::PinIncorrect), "CKR_PIN_INCORRECT");
        assert_eq!(ckr(RvError::ObjectHandleInvalid), "CKR_OBJECT_HANDLE_INVALID");
        assert_eq!(ckr(RvError::TokenNotPresent), "CKR_TOKEN_NOT_PRESENT");
        assert_eq!(ckr(RvError::GeneralError), "CKR_GENERAL_ERROR");
        let e = TokenError::call(CkError::Pkcs11(RvError::PinIncorrect, cryptoki::context::Function::Login));
        assert_eq!(e.to_string(), "C_Login: CKR_PIN_INCORRECT");
    }

    #[test]
    fn a_pin_file_loses_one_line_ending_and_nothing_else() {
        let d = tempfile::tempdir().expect("tempdir");
        let p = d.path().join("pin");
        for (content, pin) in [("1234\n", "1234"), ("1234", "1234"), ("1234\r\n", "1234"), (" 12 34 \n\n", " 12 34 \n")]
        {
            std::fs::write(&p, content).expect("write");
            assert_eq!(read_pin_file(&p).expect("pin").expose_secret(), pin, "{content:?}");
        }
        std::fs::write(&p, "\n").expect("write");
        assert!(read_pin_file(&p).expect_err("empty").to_string().ends_with("is empty"));
    }

    #[test]
    fn a_missing_module_is_named() {
        let uri =
            KeyUri::parse("pkcs11:token=t?module-path=/nonexistent/libnothing.so&pin-source=file:/x").expect("valid");
        let e = TokenKey::open(uri, "1234".to_owned().into()).expect_err("no module");
        assert!(e.to_string().starts_with("cannot load the PKCS#11 module /nonexistent/libnothing.so"), "{e}");
    }
}
