//! Token verification against one [`KeyRing`] snapshot: pure, synchronous, no I/O.
//!
//! Order of checks, cheapest and least trusting first: size cap, shape (three base64url
//! parts), strict header JSON, `alg` allow-list, header members, key selection by family
//! (HS256 → legacy secrets whatever the `kid`; others → `kid` → key bound to that `alg`),
//! signature, then strict claims.
//!
//! Header members `jwk`, `jku`, `x5u`, `x5c` (keys or key locations supplied by the token
//! itself) are never used; a token that carries any of them is rejected outright, as is one
//! with `crit` (no extension is understood, so RFC 7515 §4.1.11 requires rejection).

use crate::auth::compact;
use crate::auth::error::{AuthError, Failure};
use crate::auth::json::{ReadShallow, Shallow, Skip, strict_members};
use crate::auth::keyring::{KeyRing, KeySource};
use crate::auth::keys::{Alg, VerifyingKey, kid_is_well_formed};
use crate::auth::metrics::OkCounter;
use aws_lc_rs::digest;
use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::{Map, Value};
use std::borrow::Cow;
use std::fmt;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

/// Largest token accepted, checked before any decoding.
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;

/// The header members verification reads; every other member is only checked by the strict
/// rule. Members that would let the token choose its own key (`jwk`, `jku`, `x5u`, `x5c`) and
/// `crit` make it `rejected`.
#[derive(Default)]
pub(crate) struct Header<'a> {
    alg: Option<Shallow<'a>>,
    kid: Option<Shallow<'a>>,
    rejected: bool,
}

impl<'de> Deserialize<'de> for Header<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(HeaderVisitor)
    }
}

impl Header<'_> {
    /// The algorithm and kid, or why the header is refused.
    pub(crate) fn check(&self) -> Result<(Alg, Option<&str>), AuthError> {
        let alg = match &self.alg {
            None => return Err(AuthError::InvalidFormat("header has no alg")),
            Some(Shallow::Str(s)) => Alg::from_jose(s).ok_or(AuthError::UnsupportedAlgorithm)?,
            Some(_) => return Err(AuthError::UnsupportedAlgorithm),
        };
        if self.rejected {
            return Err(family_error(alg, Failure::RejectedHeader));
        }
        let kid = match &self.kid {
            None => None,
            Some(Shallow::Str(s)) if kid_is_well_formed(s) => Some(&**s),
            Some(_) => return Err(family_error(alg, Failure::MalformedKid)),
        };
        Ok((alg, kid))
    }
}

struct HeaderVisitor;

impl<'de> Visitor<'de> for HeaderVisitor {
    type Value = Header<'de>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JOSE header object")
    }

    fn visit_map<A: MapAccess<'de>>(self, access: A) -> Result<Self::Value, A::Error> {
        let mut header = Header::default();
        strict_members(access, |name, access| {
            match name {
                "alg" => header.alg = Some(access.next_value_seed(ReadShallow)?),
                "kid" => header.kid = Some(access.next_value_seed(ReadShallow)?),
                "crit" | "jwk" | "jku" | "x5u" | "x5c" => {
                    header.rejected = true;
                    access.next_value_seed(Skip)?;
                }
                _ => access.next_value_seed(Skip)?,
            }
            Ok(())
        })?;
        Ok(header)
    }
}

/// The claims verification reads, as their JSON kinds; every other claim is only checked by
/// the strict rule. The checks themselves run afterwards, in [`check_claims`]'s fixed order.
#[derive(Debug, Default)]
pub(crate) struct ClaimSet<'a> {
    exp: Option<Shallow<'a>>,
    nbf: Option<Shallow<'a>>,
    iat: Option<Shallow<'a>>,
    iss: Option<Shallow<'a>>,
    aud: Option<Shallow<'a>>,
    role: Option<Shallow<'a>>,
    sub: Option<Shallow<'a>>,
}

impl<'de> Deserialize<'de> for ClaimSet<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(ClaimSetVisitor)
    }
}

struct ClaimSetVisitor;

impl<'de> Visitor<'de> for ClaimSetVisitor {
    type Value = ClaimSet<'de>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JWT claims object")
    }

    fn visit_map<A: MapAccess<'de>>(self, access: A) -> Result<Self::Value, A::Error> {
        let mut set = ClaimSet::default();
        strict_members(access, |name, access| {
            let slot = match name {
                "exp" => &mut set.exp,
                "nbf" => &mut set.nbf,
                "iat" => &mut set.iat,
                "iss" => &mut set.iss,
                "aud" => &mut set.aud,
                "role" => &mut set.role,
                "sub" => &mut set.sub,
                _ => return access.next_value_seed(Skip),
            };
            *slot = Some(access.next_value_seed(ReadShallow)?);
            Ok(())
        })?;
        Ok(set)
    }
}

/// Claim checks.
#[derive(Debug, Clone, Default)]
pub struct VerifySettings {
    /// Accepted `iss` values; `None` means `iss` is not checked.
    pub issuers: Option<Vec<String>>,
    /// Accepted `aud` values, checked only when the token carries `aud`. An empty list with a
    /// token that carries `aud` fails (nothing to intersect with).
    pub audiences: Vec<String>,
    /// Clock leeway for `exp`, `nbf` and `iat`.
    pub leeway: Duration,
}

/// A credential that passed every check.
#[derive(Debug, Clone, PartialEq)]
pub struct Verified {
    /// What vouched for it.
    pub source: KeySource,
    /// The key's kid (for API keys: the key's configured name, never the key).
    pub kid: Option<Arc<str>>,
    /// The algorithm (`"opaque"` for API keys).
    pub alg: &'static str,
    /// The `role` claim.
    pub role: Option<Arc<str>>,
    /// The `sub` claim.
    pub sub: Option<Arc<str>>,
    /// Every claim.
    pub claims: Claims,
    /// `exp` (for API keys, `i64::MAX`: they do not expire).
    pub exp: i64,
    /// When it becomes valid: `nbf` or `iat`, whichever is later, if the token has either (a
    /// cached token is served only from then, less the leeway, as a fresh check would pass it).
    pub nbf: Option<i64>,
    /// Where the key that vouched for it counts its verifications.
    pub ok_count: OkCounter,
}

/// The claims of a verified credential, kept as the JSON text of their checked object and
/// written out as it is: the cache keeps this text, so answering with a cached token parses
/// and re-serializes nothing (callgrind: about a quarter of a cache hit's instructions).
#[derive(Debug, Clone)]
pub struct Claims(Arc<str>);

static NO_CLAIMS: LazyLock<Claims> = LazyLock::new(|| Claims(Arc::from("{}")));

impl Claims {
    /// The claims of `map`, as `serde_json` writes it (members sorted by name).
    pub fn new(map: &Map<String, Value>) -> Self {
        // A `Map` of `Value`s always serializes (a `Value` holds no non-finite number and
        // its keys are strings); the empty object stands in should that ever change.
        match serde_json::to_string(map) {
            Ok(text) => Self(Arc::from(text)),
            Err(_) => NO_CLAIMS.clone(),
        }
    }

    /// Claims whose JSON text is `object`, as it is: only for a text the strict reading
    /// accepted as one JSON object, without the whitespace around it.
    fn checked(object: &str) -> Self {
        Self(Arc::from(object))
    }

    /// The JSON text (an object).
    pub fn json(&self) -> &str {
        &self.0
    }
}

impl Default for Claims {
    /// No claims: `{}`.
    fn default() -> Self {
        NO_CLAIMS.clone()
    }
}

impl PartialEq for Claims {
    fn eq(&self, other: &Self) -> bool {
        self.json() == other.json()
    }
}

/// What the signature layer established: the header's algorithm and kid, the key family that
/// verified it, and the decoded payload.
#[derive(Debug, Clone)]
pub struct SignedPayload {
    /// The verified algorithm.
    pub alg: Alg,
    /// The header's kid, if any (a signing key's own, shared).
    pub kid: Option<Arc<str>>,
    /// Legacy secret or signing key.
    pub source: KeySource,
    /// The decoded payload bytes (not yet parsed).
    pub payload: Vec<u8>,
    /// Where the key that vouched for it counts its verifications.
    pub ok_count: OkCounter,
}

fn family_error(alg: Alg, failure: Failure) -> AuthError {
    match alg {
        Alg::HS256 => AuthError::Legacy(failure),
        _ if failure == Failure::UnknownKid => AuthError::UnknownKid,
        _ => AuthError::Asymmetric(failure),
    }
}

/// Checks shape, header and signature of a compact JWS; does not look at the claims.
pub fn verify_signature(ring: &KeyRing, token: &str) -> Result<SignedPayload, AuthError> {
    if token.is_empty() {
        return Err(AuthError::InvalidFormat("empty token"));
    }
    if token.len() > MAX_TOKEN_BYTES {
        return Err(AuthError::InvalidFormat("token is too large"));
    }
    let Some((header_b64, payload_b64, sig_b64, alphabet)) = compact::three_parts(token) else {
        return Err(AuthError::InvalidFormat(
            "expected three dot-separated parts",
        ));
    };
    // An empty payload is a valid JWS (it then fails as claims). An empty signature is judged
    // after `alg`, so that `alg: none` tokens are reported as the unsupported algorithm they are.
    if header_b64.is_empty() {
        return Err(AuthError::InvalidFormat("empty header"));
    }
    if !alphabet {
        return Err(AuthError::InvalidFormat("not base64url"));
    }
    let header_bytes =
        compact::decode(header_b64).ok_or(AuthError::InvalidFormat("header is not base64url"))?;
    let header: Header<'_> = serde_json::from_slice(&header_bytes).map_err(|_| {
        AuthError::InvalidFormat("header is not a JSON object without duplicate members")
    })?;
    let (alg, kid) = header.check()?;
    let payload =
        compact::decode(payload_b64).ok_or(AuthError::InvalidFormat("payload is not base64url"))?;
    let signature =
        compact::decode(sig_b64).ok_or(AuthError::InvalidFormat("signature is not base64url"))?;
    if signature.is_empty() {
        return Err(family_error(alg, Failure::BadSignature));
    }
    let signing_input = &token.as_bytes()[..header_b64.len() + 1 + payload_b64.len()];

    let (source, kid, ok_count) = match alg {
        Alg::HS256 => {
            // Whatever the kid: after a migration legacy tokens may carry a kid that is not
            // (and must not be looked up) in the JWKS.
            let secrets = ring.legacy_secrets();
            if secrets.is_empty() {
                return Err(AuthError::LegacyRevoked);
            }
            // Try every secret so timing does not reveal which one matched. The answer names
            // the one that did (an inline oct key by its kid, SUPABASE_JWT_SECRET by none), not
            // the token's `kid`, which no secret was looked up by.
            let mut matched = None;
            for secret in secrets {
                if check(sig_b64, signing_input, &secret.key, alg) && matched.is_none() {
                    matched = Some(secret);
                }
            }
            let secret = matched.ok_or(AuthError::Legacy(Failure::BadSignature))?;
            (
                KeySource::LegacySecret,
                secret.kid().map(Arc::from),
                ring.legacy_ok().clone(),
            )
        }
        Alg::ES256 | Alg::RS256 | Alg::EdDSA => {
            let kid = kid.ok_or(AuthError::Asymmetric(Failure::MissingKid))?;
            let key = ring.find(kid).ok_or(AuthError::UnknownKid)?;
            if key.alg != alg {
                return Err(AuthError::Asymmetric(Failure::AlgorithmMismatch));
            }
            if !signature_ok(key, signing_input, &signature) {
                return Err(AuthError::Asymmetric(Failure::BadSignature));
            }
            (
                KeySource::SigningKey,
                Some(Arc::clone(&key.kid)),
                key.ok_count.clone(),
            )
        }
    };
    Ok(SignedPayload {
        alg,
        kid,
        source,
        payload,
        ok_count,
    })
}

/// The algorithm a token's header names, read without checking anything else of it: `None`
/// unless it is a well-formed compact JWS of at most [`MAX_TOKEN_BYTES`] whose header is one
/// [`Header::check`] accepts.
pub(crate) fn unverified_alg(token: &str) -> Option<Alg> {
    if token.len() > MAX_TOKEN_BYTES {
        return None;
    }
    let (header_b64, _, _, true) = compact::three_parts(token)? else {
        return None;
    };
    let header_bytes = compact::decode(header_b64)?;
    let header: Header<'_> = serde_json::from_slice(&header_bytes).ok()?;
    Some(header.check().ok()?.0)
}

/// What an HS256 token claims to be, read without checking its signature or any other claim:
/// its `role` and whether it has a non-empty `sub`. Only for naming the kind of a legacy key no
/// configured secret can verify (the legacy secret was revoked); never grounds for trust.
/// `None` unless it is a well-formed compact JWS with an accepted HS256 header and a strict JSON
/// claims object whose `role` and `sub`, when present, are strings.
pub(crate) fn unverified_hs256_role(token: &str) -> Option<(String, bool)> {
    if unverified_alg(token)? != Alg::HS256 {
        return None;
    }
    let (_, payload_b64, _, _) = compact::three_parts(token)?;
    let payload = compact::decode(payload_b64)?;
    let text = std::str::from_utf8(&payload).ok()?;
    let set: ClaimSet<'_> = serde_json::from_str(text).ok()?;
    let role = optional_string(set.role.as_ref()).ok()??;
    let sub = optional_string(set.sub.as_ref()).ok()?;
    Some((role.into_owned(), sub.is_some_and(|sub| !sub.is_empty())))
}

/// Verifies a raw signature with an asymmetric key: the same path tokens take.
///
/// Fixed-size signatures are checked first, so a DER-encoded ECDSA signature, or anything
/// truncated or padded, is refused before the crypto layer sees it. The key was parsed once
/// when the key set was loaded (aws-lc-rs, the same backend jsonwebtoken uses), so a token
/// costs only the signature check itself.
///
/// ES256 and RS256 sign SHA-256 of the message: it is taken in one call and the key checks the
/// signature over it, the check `verify_sig` makes, without the digest context that
/// `EVP_DigestVerify` allocates, and copies in its last step, for each message (BENCHMARKS.md,
/// eleventh pass). Ed25519 hashes within the scheme and takes the message itself.
pub fn signature_ok(key: &VerifyingKey, message: &[u8], signature: &[u8]) -> bool {
    match key.alg {
        Alg::ES256 if signature.len() != 64 => false,
        Alg::ES256 | Alg::RS256 => {
            let digest = digest::digest(&digest::SHA256, message);
            key.key.verify_digest_sig(&digest, signature).is_ok()
        }
        Alg::EdDSA => signature.len() == 64 && key.key.verify_sig(message, signature).is_ok(),
        // A legacy secret is never a `VerifyingKey` (keys.rs refuses an HS256 public key).
        Alg::HS256 => false,
    }
}

/// jsonwebtoken's signature primitive, for the legacy secret: HMAC-SHA256 via aws-lc
/// `hmac::verify` (constant time).
fn check(sig_b64: &str, message: &[u8], key: &jsonwebtoken::DecodingKey, alg: Alg) -> bool {
    jsonwebtoken::crypto::verify(sig_b64, message, key, alg.jsonwebtoken()).unwrap_or(false)
}

/// Verifies `token` completely: signature (see [`verify_signature`]) and claims at `now`
/// (seconds since the Unix epoch).
pub fn verify(
    ring: &KeyRing,
    settings: &VerifySettings,
    token: &str,
    now: i64,
) -> Result<Verified, AuthError> {
    let signed = verify_signature(ring, token)?;
    let checked =
        check_payload(&signed.payload, settings, now).map_err(|f| family_error(signed.alg, f))?;
    Ok(Verified {
        source: signed.source,
        kid: signed.kid,
        alg: signed.alg.as_str(),
        role: checked.role,
        sub: checked.sub,
        claims: checked.claims,
        exp: checked.exp,
        nbf: checked.nbf,
        ok_count: signed.ok_count,
    })
}

/// What a token's claims established.
#[derive(Debug, PartialEq)]
pub(crate) struct CheckedClaims {
    pub exp: i64,
    pub nbf: Option<i64>,
    pub role: Option<Arc<str>>,
    pub sub: Option<Arc<str>>,
    /// The payload's JSON text, as the token carries it.
    pub claims: Claims,
}

/// Reads a decoded payload strictly (an object, no duplicate member at any depth) and checks
/// its claims at `now`, building no JSON tree: only the claims the checks need are kept.
pub(crate) fn check_payload(
    payload: &[u8],
    settings: &VerifySettings,
    now: i64,
) -> Result<CheckedClaims, Failure> {
    // UTF-8 checked once here; the strings inside are then not checked again one by one.
    let text = std::str::from_utf8(payload).map_err(|_| Failure::MalformedClaims)?;
    let set: ClaimSet<'_> = serde_json::from_str(text).map_err(|_| Failure::MalformedClaims)?;
    let (exp, nbf) = check_claims(&set, settings, now)?;
    let role = optional_string(set.role.as_ref())?;
    let sub = optional_string(set.sub.as_ref())?;
    // The checked payload is the answer's claims as the token carries them: the strict reading
    // above accepted the text as one object with nothing but JSON whitespace around it.
    let object = text.trim_matches(|c| matches!(c, ' ' | '\t' | '\n' | '\r'));
    Ok(CheckedClaims {
        exp,
        nbf,
        role: role.as_deref().map(Arc::from),
        sub: sub.as_deref().map(Arc::from),
        claims: Claims::checked(object),
    })
}

fn optional_string<'a>(value: Option<&Shallow<'a>>) -> Result<Option<Cow<'a, str>>, Failure> {
    match value {
        None => Ok(None),
        Some(Shallow::Str(s)) => Ok(Some(s.clone())),
        Some(_) => Err(Failure::MalformedClaims),
    }
}

/// A NumericDate must be a JSON number (a string is not accepted). It may have a fraction (RFC
/// 7519 §2), which `round` takes to whole seconds: down for `exp`, up for `nbf` and `iat`, so a
/// token is never taken as valid sooner or longer than it says (floored, `nbf` n + 0.5 passed
/// at n, before it was valid).
fn numeric_date(
    value: Option<&Shallow<'_>>,
    round: fn(f64) -> f64,
) -> Result<Option<i64>, Failure> {
    match value {
        None => Ok(None),
        Some(Shallow::Int(i)) => Ok(Some(*i)),
        // Bounded, so the cast of the rounded value is exact (never saturated).
        Some(Shallow::Float(f)) if f.is_finite() && f.abs() < 1e15 => Ok(Some(round(*f) as i64)),
        Some(_) => Err(Failure::MalformedClaims),
    }
}

/// Checks time, issuer and audience claims; returns `exp` and the time before which the token
/// is not valid: `nbf` or `iat`, whichever is later (the same leeway applies to both), each in
/// whole seconds rounded as [`numeric_date`] does, so a cache hit re-checks the same times.
fn check_claims(
    claims: &ClaimSet<'_>,
    settings: &VerifySettings,
    now: i64,
) -> Result<(i64, Option<i64>), Failure> {
    let leeway = i64::try_from(settings.leeway.as_secs()).unwrap_or(i64::MAX);
    let exp = numeric_date(claims.exp.as_ref(), f64::floor)?.ok_or(Failure::MissingExp)?;
    let nbf = numeric_date(claims.nbf.as_ref(), f64::ceil)?;
    let iat = numeric_date(claims.iat.as_ref(), f64::ceil)?;
    check_times(exp, nbf, now, leeway)?;
    if iat.is_some_and(|iat| iat > now.saturating_add(leeway)) {
        return Err(Failure::IssuedInFuture);
    }
    let not_before = nbf.max(iat);

    let iss = optional_string(claims.iss.as_ref())?;
    if let Some(issuers) = &settings.issuers {
        match iss {
            Some(iss) if issuers.iter().any(|i| *i == iss) => {}
            _ => return Err(Failure::WrongIssuer),
        }
    }

    let accepted = |aud: &str| settings.audiences.iter().any(|a| a == aud);
    match &claims.aud {
        None => {}
        Some(Shallow::Str(aud)) if !accepted(aud) => return Err(Failure::WrongAudience),
        Some(Shallow::Str(_)) => {}
        Some(Shallow::Strings(auds)) if !auds.iter().any(|aud| accepted(aud)) => {
            return Err(Failure::WrongAudience);
        }
        Some(Shallow::Strings(_)) => {}
        Some(_) => return Err(Failure::MalformedClaims),
    }
    Ok((exp, not_before))
}

/// `exp` and `nbf` against `now` with `leeway`; also used on every cache hit.
pub(crate) fn check_times(
    exp: i64,
    nbf: Option<i64>,
    now: i64,
    leeway: i64,
) -> Result<(), Failure> {
    if now >= exp.saturating_add(leeway) {
        return Err(Failure::Expired);
    }
    if nbf.is_some_and(|nbf| nbf > now.saturating_add(leeway)) {
        return Err(Failure::NotYetValid);
    }
    Ok(())
}
