//! JWK parsing: each accepted key becomes a [`VerifyingKey`] bound to exactly one algorithm.
//!
//! Rules, strictest for keys fetched from the network:
//! - the algorithm is the JWK's `alg` when present (it must be ES256, RS256 or EdDSA and agree
//!   with `kty`/`crv`), else it follows strictly from `kty`/`crv` (EC P-256 → ES256,
//!   OKP Ed25519 → EdDSA, RSA → RS256);
//! - `use`, when present, must be `sig`; `key_ops`, when present, must hold `verify`;
//! - RSA moduli under 2048 (or over 8192) bits, RSA exponents that are even, under 3 or at
//!   least 2^32, unsupported curves and asymmetric keys without `kid` are dropped;
//! - `oct` keys from a fetched set are always dropped (a remote party must never be able to
//!   hand us an HMAC secret); inline `oct` keys (no `alg`, or `alg: HS256`; `kid` optional and
//!   only listed) of at least 32 bytes are legacy secrets (the configuration refuses shorter);
//! - a fetched key with a member name twice inside it, at any depth, is dropped alone (RFC 7517
//!   §4, §5); a member name twice outside the keys refuses the whole document. The inline set
//!   with a member name twice anywhere stops start-up (the configuration refuses it).
//!
//! Every drop is returned as a [`DroppedKey`] and logged with the kid and the reason: an inline
//! key's at WARN as it is parsed; a fetched key's by the fetcher, at WARN when a fetch first finds
//! it and at DEBUG at each refetch that finds it still published ([`log_dropped`]): the same kid,
//! reason and key material ([`KeyMaterial`]), so another key put under a dropped key's kid is
//! warned of too.

use crate::auth::metrics::OkCounter;
use aws_lc_rs::digest;
use aws_lc_rs::signature::{
    ECDSA_P256_SHA256_FIXED, ED25519, ParsedPublicKey, RSA_PKCS1_2048_8192_SHA256,
    RsaPublicKeyComponents,
};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::DecodingKey;
use serde::Serialize;
use serde_json::{Map, Value};
use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;

/// The algorithms edgegate accepts, and nothing else.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum Alg {
    /// HMAC SHA-256: the legacy Supabase JWT secret.
    HS256,
    /// ECDSA P-256 SHA-256, signature in the 64-byte P1363 form.
    ES256,
    /// RSASSA-PKCS1-v1_5 SHA-256, moduli of 2048 to 8192 bits.
    RS256,
    /// Ed25519.
    EdDSA,
}

impl Alg {
    /// Exact, case-sensitive match of a JOSE `alg` value.
    pub fn from_jose(s: &str) -> Option<Self> {
        match s {
            "HS256" => Some(Self::HS256),
            "ES256" => Some(Self::ES256),
            "RS256" => Some(Self::RS256),
            "EdDSA" => Some(Self::EdDSA),
            _ => None,
        }
    }

    /// The JOSE name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::HS256 => "HS256",
            Self::ES256 => "ES256",
            Self::RS256 => "RS256",
            Self::EdDSA => "EdDSA",
        }
    }

    pub(crate) fn jsonwebtoken(self) -> jsonwebtoken::Algorithm {
        match self {
            Self::HS256 => jsonwebtoken::Algorithm::HS256,
            Self::ES256 => jsonwebtoken::Algorithm::ES256,
            Self::RS256 => jsonwebtoken::Algorithm::RS256,
            Self::EdDSA => jsonwebtoken::Algorithm::EdDSA,
        }
    }
}

/// Where a key came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum KeyOrigin {
    /// `SUPABASE_JWT_SECRET`.
    Env,
    /// `SUPABASE_JWKS` (inline JSON in the configuration).
    Inline,
    /// The fetched JWKS.
    Jwks,
}

impl KeyOrigin {
    /// Lower-case name used in listings.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Env => "env",
            Self::Inline => "inline",
            Self::Jwks => "jwks",
        }
    }
}

/// An asymmetric public key bound to one algorithm.
#[derive(Clone)]
pub struct VerifyingKey {
    /// Shared with every credential it verifies (`Verified::kid`).
    pub(crate) kid: Arc<str>,
    pub(crate) alg: Alg,
    pub(crate) origin: KeyOrigin,
    /// The public key, parsed and validated once when the key set is loaded, bound to the key's
    /// one algorithm (ECDSA P-256 fixed-length signatures, Ed25519, or RSA PKCS#1 v1.5 SHA-256).
    pub(crate) key: ParsedPublicKey,
    /// Canonical public key bytes, to tell whether two key sets are the same.
    pub(crate) fingerprint: Vec<u8>,
    /// Where the credentials this key verifies are counted.
    pub(crate) ok_count: OkCounter,
}

impl VerifyingKey {
    /// The key id.
    pub fn kid(&self) -> &str {
        &self.kid
    }
    /// The one algorithm this key verifies.
    pub fn alg(&self) -> Alg {
        self.alg
    }
    /// Where the key came from.
    pub fn origin(&self) -> KeyOrigin {
        self.origin
    }
}

impl fmt::Debug for VerifyingKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VerifyingKey")
            .field("kid", &self.kid)
            .field("alg", &self.alg)
            .field("origin", &self.origin)
            .finish_non_exhaustive()
    }
}

/// An HS256 secret (the legacy Supabase JWT secret, or an inline `oct` JWK).
#[derive(Clone)]
pub struct LegacySecret {
    pub(crate) kid: Option<String>,
    pub(crate) origin: KeyOrigin,
    pub(crate) key: DecodingKey,
}

impl LegacySecret {
    /// A secret used as its raw bytes, as Supabase Auth does with `SUPABASE_JWT_SECRET`
    /// (the string's UTF-8 bytes, not base64-decoded).
    pub fn from_env_secret(secret: &[u8]) -> Self {
        Self {
            kid: None,
            origin: KeyOrigin::Env,
            key: DecodingKey::from_secret(secret),
        }
    }
    /// The kid of an inline `oct` JWK, if it had one.
    pub fn kid(&self) -> Option<&str> {
        self.kid.as_deref()
    }
    /// Where the secret came from.
    pub fn origin(&self) -> KeyOrigin {
        self.origin
    }
}

impl fmt::Debug for LegacySecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LegacySecret")
            .field("kid", &self.kid)
            .field("origin", &self.origin)
            .field("secret", &"[redacted]")
            .finish()
    }
}

/// A JWK that was not accepted, with the reason.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct DroppedKey {
    /// The JWK's kid (shortened to 64 characters), if it had a string one.
    pub kid: Option<String>,
    /// Why it was dropped.
    pub reason: String,
    /// Where it came from.
    pub origin: KeyOrigin,
    /// A fetched copy of an inline key (same kid, algorithm and public key): the inline key
    /// verifies its tokens, so it is not a key lost.
    #[serde(skip)]
    pub same_as_inline: bool,
    /// Which key it was, to tell a key republished under the same kid from the one dropped
    /// before (never shown).
    #[serde(skip)]
    pub material: KeyMaterial,
}

/// A SHA-256 of a dropped key's material, to tell two keys with one kid apart: of the JWK's key
/// members as published, or of an accepted key's algorithm and canonical public key. Kept in
/// memory only, and never shown (Debug included): an inline `oct` key's `k` is a secret.
#[derive(Clone, Copy, Default, PartialEq, Eq)]
pub struct KeyMaterial([u8; 32]);

impl fmt::Debug for KeyMaterial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("KeyMaterial([redacted])")
    }
}

impl KeyMaterial {
    /// The members that say which key a JWK is (RFC 7638's: `kty` and the public key, or `k`
    /// for an `oct` key), in that order, each as its name and JSON text whatever its type, so a
    /// key that has one wrong is still told apart; `kid`, `alg`, `use` and the rest are not the
    /// key. A JWK that is no object is taken whole.
    const JWK_MEMBERS: [&'static str; 7] = ["crv", "e", "k", "kty", "n", "x", "y"];

    /// Of a JWK as published.
    pub(crate) fn of_jwk(jwk: &Value) -> Self {
        let mut hash = digest::Context::new(&digest::SHA256);
        match jwk.as_object() {
            Some(members) => {
                for name in Self::JWK_MEMBERS {
                    if let Some(value) = members.get(name) {
                        // JSON text holds no NUL byte: each part ends where its NUL is.
                        hash.update(name.as_bytes());
                        hash.update(b"\0");
                        hash.update(value.to_string().as_bytes());
                        hash.update(b"\0");
                    }
                }
            }
            None => hash.update(jwk.to_string().as_bytes()),
        }
        Self::from_digest(&hash.finish())
    }

    /// Of a key that was parsed and accepted (then overridden): its algorithm and public key.
    pub(crate) fn of_key(key: &VerifyingKey) -> Self {
        let mut hash = digest::Context::new(&digest::SHA256);
        hash.update(key.alg.as_str().as_bytes());
        hash.update(b"\0");
        hash.update(&key.fingerprint);
        Self::from_digest(&hash.finish())
    }

    fn from_digest(digest: &digest::Digest) -> Self {
        let mut bytes = [0; 32];
        bytes.copy_from_slice(digest.as_ref());
        Self(bytes)
    }
}

/// A JWKS document that cannot be used at all.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwksDocError {
    /// Not JSON.
    #[error("JWKS is not valid JSON")]
    NotJson,
    /// A member name twice in one object outside the keys (two `keys` members, say); the name
    /// is shown as a dropped key's kid is. A duplicate inside one key drops that key alone.
    #[error("JWKS has a duplicate member `{0}`")]
    DuplicateMember(String),
    /// Neither `{"keys":[...]}` nor a bare array, where both are allowed (`SUPABASE_JWKS`).
    #[error("JWKS is neither {{\"keys\":[...]}} nor an array of keys")]
    WrongShape,
    /// Not `{"keys":[...]}` where nothing else is allowed (the fetched set): a bare array of keys
    /// is taken inline only, so the message must not list it.
    #[error(
        "a fetched JWKS must be an object with \"keys\": [...] (a bare array of keys is taken in SUPABASE_JWKS only)"
    )]
    NotKeysObject,
    /// More keys than allowed.
    #[error("JWKS holds more than {0} keys")]
    TooManyKeys(usize),
}

/// Most keys accepted from one JWKS document; Supabase publishes a handful.
pub const MAX_JWKS_KEYS: usize = 100;

/// One key of a JWKS document, with the first member name found twice inside it (at any
/// depth), which drops that key alone (RFC 7517 §4 and §5).
pub type JwkEntry = crate::auth::json::Checked;

/// Parses a JWKS document: `{"keys":[...]}`, or a bare array when `allow_bare_array`
/// (the `SUPABASE_JWKS` variable accepts both; the fetched set must be an object). A member
/// name twice in one object refuses the document when it is outside the keys, and is left to
/// [`parse_fetched_entries`] to drop the one key when it is inside one.
pub fn parse_jwks_document(
    bytes: &[u8],
    allow_bare_array: bool,
) -> Result<Vec<JwkEntry>, JwksDocError> {
    let doc = crate::auth::json::key_set_from_slice(bytes).map_err(|_| JwksDocError::NotJson)?;
    if let Some(name) = doc.duplicate {
        return Err(JwksDocError::DuplicateMember(short_kid(&name)));
    }
    let keys = match doc.keys {
        Some(keys) if allow_bare_array || !doc.bare_array => keys,
        _ if allow_bare_array => return Err(JwksDocError::WrongShape),
        _ => return Err(JwksDocError::NotKeysObject),
    };
    if keys.len() > MAX_JWKS_KEYS {
        return Err(JwksDocError::TooManyKeys(MAX_JWKS_KEYS));
    }
    Ok(keys)
}

/// Keys accepted from one source, and those dropped.
#[derive(Debug, Default)]
pub struct ParsedKeys {
    /// Asymmetric keys, each bound to one algorithm.
    pub keys: Vec<VerifyingKey>,
    /// HS256 secrets (only ever from inline keys).
    pub legacy: Vec<LegacySecret>,
    /// What was refused, and why.
    pub dropped: Vec<DroppedKey>,
}

/// Parses keys from the fetched JWKS: `oct` keys are always dropped.
pub fn parse_fetched_keys(jwks: &[Value]) -> ParsedKeys {
    parse_keys(jwks.iter().map(|jwk| (jwk, None)), KeyOrigin::Jwks)
}

/// Parses the keys of a fetched JWKS document ([`parse_jwks_document`]): as
/// [`parse_fetched_keys`], and a key with a member name twice inside it is dropped.
pub fn parse_fetched_entries(entries: &[JwkEntry]) -> ParsedKeys {
    let entries = entries
        .iter()
        .map(|entry| (&entry.value, entry.duplicate.as_deref()));
    parse_keys(entries, KeyOrigin::Jwks)
}

/// Parses keys from `SUPABASE_JWKS`: `oct` entries become legacy HS256 secrets.
pub fn parse_inline_keys(jwks: &[Value]) -> ParsedKeys {
    parse_keys(jwks.iter().map(|jwk| (jwk, None)), KeyOrigin::Inline)
}

/// Parses each key, given with the first member name found twice inside it, if any.
fn parse_keys<'a>(
    jwks: impl Iterator<Item = (&'a Value, Option<&'a str>)>,
    origin: KeyOrigin,
) -> ParsedKeys {
    let mut out = ParsedKeys::default();
    for (jwk, duplicate) in jwks {
        // Of two `kid` members, the first is reported (the reason names `kid`).
        let kid = jwk.get("kid").and_then(Value::as_str).map(short_kid);
        if let Some(name) = duplicate {
            // RFC 7517 §4: a JWK with a member name twice is rejected; §5: the rest of the set
            // is still used. The name is shown as a kid is, escaped and shortened.
            let reason = format!("duplicate member `{}`", short_kid(name));
            drop_key(&mut out, jwk, kid, &reason, origin);
            continue;
        }
        match parse_one(jwk, origin) {
            Ok(Parsed::Asymmetric(key)) => {
                if out.keys.iter().any(|k| k.kid == key.kid) {
                    drop_key(
                        &mut out,
                        jwk,
                        kid,
                        "duplicate kid (the first key with it is kept)",
                        origin,
                    );
                } else {
                    out.keys.push(key);
                }
            }
            Ok(Parsed::Legacy(secret)) => out.legacy.push(secret),
            Err(reason) => drop_key(&mut out, jwk, kid, &reason, origin),
        }
    }
    out
}

/// Drops a key; an inline key's drop is warned of here, once at start. A fetched key's is logged
/// by the fetcher, which knows whether the set held it before.
fn drop_key(
    out: &mut ParsedKeys,
    jwk: &Value,
    kid: Option<String>,
    reason: &str,
    origin: KeyOrigin,
) {
    let dropped = dropped_key(kid, reason, origin, KeyMaterial::of_jwk(jwk));
    if origin == KeyOrigin::Inline {
        log_dropped(&dropped, true);
    }
    out.dropped.push(dropped);
}

/// Logs a key not taken with its kid (as text, and no field when it has none), the reason and
/// the origin: at WARN, or at DEBUG when `warn` is false (a refetched set that still holds a key
/// warned of before, the same key material under the same kid: the same WARN at every refetch
/// would say nothing new). The key material is never logged.
pub(crate) fn log_dropped(key: &DroppedKey, warn: bool) {
    let (kid, reason, origin) = (key.kid.as_deref(), key.reason.as_str(), key.origin.as_str());
    if warn {
        tracing::warn!(kid, reason, origin, "JWK dropped");
    } else {
        tracing::debug!(kid, reason, origin, "JWK dropped");
    }
}

/// A key that is not taken, with its kid and the reason; logged by the caller ([`log_dropped`]).
pub(crate) fn dropped_key(
    kid: Option<String>,
    reason: &str,
    origin: KeyOrigin,
    material: KeyMaterial,
) -> DroppedKey {
    DroppedKey {
        kid,
        reason: reason.to_owned(),
        origin,
        same_as_inline: false,
        material,
    }
}

/// A dropped key's kid as it is reported: its first 64 characters, control and invisible
/// formatting ones written out (`\u{1b}`), since it was dropped perhaps for having them and is
/// printed to an operator's terminal by `check`. A duplicate member's name is shown so too.
pub(crate) fn short_kid(kid: &str) -> String {
    let mut short = String::with_capacity(kid.len().min(64));
    for c in kid.chars().take(64) {
        if c.is_control() || is_format_char(c) {
            short.extend(c.escape_unicode());
        } else {
            short.push(c);
        }
    }
    short
}

enum Parsed {
    Asymmetric(VerifyingKey),
    Legacy(LegacySecret),
}

/// Longest kid accepted on a key or in a token header.
pub const MAX_KID_LEN: usize = 256;

/// A kid must be short and printable: it ends up in logs, admin listings and metric labels.
/// Control characters and invisible formatting characters (bidi overrides, zero-width marks)
/// are refused, so a kid always reads as what it is.
///
/// A kid of printable ASCII (every kid Supabase issues) is judged byte by byte; only a kid with
/// other bytes is decoded into chars (1.0k to 1.5k instructions less a fresh token in
/// callgrind, BENCHMARKS.md's fourteenth pass).
pub(crate) fn kid_is_well_formed(kid: &str) -> bool {
    !kid.is_empty()
        && kid.len() <= MAX_KID_LEN
        && (kid.bytes().all(|b| matches!(b, 0x20..=0x7e))
            || !kid.chars().any(|c| c.is_control() || is_format_char(c)))
}

/// Unicode's invisible format characters (category Cf) that can reorder or hide text.
pub(crate) fn is_format_char(c: char) -> bool {
    matches!(
        c,
        '\u{00AD}'
            | '\u{061C}'
            | '\u{180E}'
            | '\u{200B}'..='\u{200F}'
            | '\u{202A}'..='\u{202E}'
            | '\u{2060}'..='\u{206F}'
            | '\u{FEFF}'
            | '\u{FFF9}'..='\u{FFFB}'
    )
}

fn str_member<'a>(
    jwk: &'a Map<String, Value>,
    name: &str,
) -> Result<Option<&'a str>, &'static str> {
    match jwk.get(name) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err("a member has the wrong JSON type"),
    }
}

/// Why a key is dropped: most reasons are fixed text, some name a member.
type Reason = Cow<'static, str>;

fn b64_member(jwk: &Map<String, Value>, name: &str) -> Result<Vec<u8>, Reason> {
    let s = str_member(jwk, name)?.ok_or_else(|| format!("{name} is missing"))?;
    URL_SAFE_NO_PAD
        .decode(s)
        .map_err(|err| b64_reason(name, s, &err).into())
}

/// What is wrong with member `name`'s base64url text `s`, naming the member: a value cut short
/// or run long is a different mistake from a character outside the alphabet. Only positions
/// and lengths are told, never the text (an inline `oct` key's `k` is a secret).
fn b64_reason(name: &str, s: &str, err: &base64::DecodeError) -> String {
    use base64::DecodeError;
    match err {
        DecodeError::InvalidLength(_) => format!(
            "{name} has the wrong length: {} characters of base64url are no whole number of \
             bytes (characters are missing or extra)",
            s.chars().count()
        ),
        DecodeError::InvalidLastSymbol(..) => format!(
            "{name} has the wrong length or last character: its last character leaves bits \
             over (characters are missing or extra, or the last one is wrong)"
        ),
        DecodeError::InvalidPadding => {
            format!("{name} is padded with '=': JWK members are base64url without padding")
        }
        DecodeError::InvalidByte(offset, _) => format!(
            "{name} is not base64url: character {} is none of A-Z, a-z, 0-9, - and _",
            s.get(..*offset)
                .map_or(offset + 1, |before| before.chars().count() + 1)
        ),
    }
}

fn parse_one(jwk: &Value, origin: KeyOrigin) -> Result<Parsed, Reason> {
    let jwk = jwk.as_object().ok_or("not a JSON object")?;
    let kty = str_member(jwk, "kty")?.ok_or("no kty")?;
    let kid = str_member(jwk, "kid")?;
    let alg = str_member(jwk, "alg")?;

    if str_member(jwk, "use")?.is_some_and(|u| u != "sig") {
        return Err("use is not sig".into());
    }
    if let Some(ops) = jwk.get("key_ops") {
        let ops = ops.as_array().ok_or("key_ops is not an array")?;
        if !ops.iter().any(|op| op.as_str() == Some("verify")) {
            return Err("key_ops lacks verify".into());
        }
    }
    if jwk.contains_key("d") || jwk.contains_key("p") {
        // A private key in a public set means a publishing mistake; do not keep secrets around.
        if kty != "oct" {
            return Err("private key material in a public JWK".into());
        }
    }
    if kid.is_some_and(|kid| !kid_is_well_formed(kid)) {
        return Err("kid is empty, too long or has control characters".into());
    }

    if kty == "oct" {
        if origin == KeyOrigin::Jwks {
            return Err(
                "oct key in a fetched JWKS (HMAC secrets are never taken from the network)".into(),
            );
        }
        if alg.is_some_and(|a| a != "HS256") {
            return Err("oct key with an alg other than HS256".into());
        }
        let k = b64_member(jwk, "k")?;
        if k.is_empty() {
            return Err("empty oct key".into());
        }
        if k.len() < crate::config::MIN_HMAC_KEY_BYTES {
            return Err("oct key shorter than 32 bytes".into());
        }
        return Ok(Parsed::Legacy(LegacySecret {
            kid: kid.map(str::to_owned),
            origin,
            key: DecodingKey::from_secret(&k),
        }));
    }

    let crv = str_member(jwk, "crv")?;
    let implied = match (kty, crv) {
        ("EC", Some("P-256")) => Alg::ES256,
        ("OKP", Some("Ed25519")) => Alg::EdDSA,
        ("RSA", _) => Alg::RS256,
        ("EC", _) | ("OKP", _) => return Err("unsupported curve".into()),
        _ => return Err("unsupported kty".into()),
    };
    if let Some(alg) = alg {
        match Alg::from_jose(alg) {
            Some(Alg::HS256) | None => return Err("unsupported alg".into()),
            Some(a) if a != implied => return Err("alg does not agree with kty/crv".into()),
            Some(_) => {}
        }
    }
    let kid = kid.ok_or("asymmetric key without kid")?.to_owned();

    let (key, fingerprint) = match implied {
        Alg::ES256 => {
            let x = b64_member(jwk, "x")?;
            let y = b64_member(jwk, "y")?;
            // RFC 7518 §6.2.1.2: coordinates are full-length, leading zeros included.
            if x.len() != 32 || y.len() != 32 {
                return Err("EC coordinates are not 32 bytes".into());
            }
            let mut point = Vec::with_capacity(65);
            point.push(0x04);
            point.extend_from_slice(&x);
            point.extend_from_slice(&y);
            // The point is checked to be on the curve now, not at every verification.
            let key = ParsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, &point)
                .map_err(|_| "EC point is not on P-256")?;
            (key, point)
        }
        Alg::EdDSA => {
            let x = b64_member(jwk, "x")?;
            if x.len() != 32 {
                return Err("Ed25519 key is not 32 bytes".into());
            }
            let key = ParsedPublicKey::new(&ED25519, &x).map_err(|_| "invalid Ed25519 key")?;
            (key, x)
        }
        Alg::RS256 => {
            // Some publishers keep a leading zero byte; aws-lc wants minimal big-endian.
            let n = strip_leading_zeros(&b64_member(jwk, "n")?).to_vec();
            let e = strip_leading_zeros(&b64_member(jwk, "e")?).to_vec();
            let bits = modulus_bits(&n);
            if bits < 2048 {
                return Err("RSA modulus under 2048 bits".into());
            }
            if bits > 8192 {
                return Err("RSA modulus over 8192 bits".into());
            }
            if !exponent_is_usable(&e) {
                return Err("RSA exponent must be odd, at least 3 and below 2^32".into());
            }
            let key = RsaPublicKeyComponents { n: &n, e: &e }
                .to_parsed_public_key(&RSA_PKCS1_2048_8192_SHA256)
                .map_err(|_| "invalid RSA key")?;
            let mut fp = n.clone();
            fp.extend_from_slice(&e);
            (key, fp)
        }
        Alg::HS256 => return Err("unsupported alg".into()),
    };
    Ok(Parsed::Asymmetric(VerifyingKey {
        kid: kid.into(),
        alg: implied,
        origin,
        key,
        fingerprint,
        ok_count: OkCounter::default(),
    }))
}

/// An RSA public exponent must be odd and at least 3 (RFC 8017 §3.1); `e = 1` would make every
/// "signature" its own message. `e` is minimal big-endian, and longer than 4 bytes (2^32 or
/// more) is refused too: aws-lc takes at most 33 bits, and real keys use 65537.
fn exponent_is_usable(e: &[u8]) -> bool {
    let odd = e.last().is_some_and(|last| last & 1 == 1);
    odd && e.len() <= 4 && (e.len() > 1 || e[0] >= 3)
}

pub(crate) fn strip_leading_zeros(mut bytes: &[u8]) -> &[u8] {
    while let [0, tail @ ..] = bytes {
        bytes = tail;
    }
    bytes
}

/// Bit length of a minimal big-endian unsigned integer.
pub(crate) fn modulus_bits(n: &[u8]) -> usize {
    match n.first() {
        Some(first) => n.len() * 8 - first.leading_zeros() as usize,
        None => 0,
    }
}
