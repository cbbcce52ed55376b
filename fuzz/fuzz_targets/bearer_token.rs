//! The bearer-token path: `Authorization`/`apikey` header parsing, then the token's header,
//! claims and signature against a fixed key ring (HS256 legacy and inline `oct`, ES256, RS256,
//! EdDSA), through the cache-fronted `Authenticator` and the pure `verify`.
//!
//! Input: one mode byte, then fields split at 0xFF.
//! - mode 0, headers: `Authorization` value, `apikey` value, `Origin` present if non-empty.
//! - mode 1, signed: key index, header JSON, claims JSON. The harness signs them itself, so the
//!   fuzzer explores header and claims handling past the signature check.
//! - mode 2, raw token.
//!
//! Oracles beyond "no panic": a token signed here verifies only as the key that signed it (no
//! algorithm or key confusion); a raw input never verifies with an asymmetric key (its private
//! key exists only in this process); an error message never repeats the token.
#![no_main]

use aws_lc_rs::hmac;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use edgegate::credentials::{Presented, presented};
use edgegate::auth::{AuthError, KeySource, Verified, verify};
use edgegate_fuzz::{INLINE_OCT_K, LEGACY_SECRET, fields, poll_once, ring, text};
use http::{HeaderMap, HeaderValue};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    match mode % 3 {
        0 => headers(rest),
        1 => signed(rest),
        _ => raw(&text(rest)),
    }
});

fn headers(data: &[u8]) {
    let [authorization, apikey, origin] = fields::<3>(data);
    let mut map = HeaderMap::new();
    for (name, value) in [("authorization", authorization), ("apikey", apikey)] {
        // hyper refuses what `HeaderValue` refuses, so such requests never reach the extractor.
        if !value.is_empty()
            && let Ok(value) = HeaderValue::from_bytes(value)
        {
            map.insert(name, value);
        }
    }
    let auth = &ring().auth;
    let result = match presented(&map) {
        Ok(Presented::Jwt(token)) => check_error(token, |t| poll_once(auth.verify_bearer(t))),
        Ok(Presented::LegacyKey(key)) => {
            check_error(key, |k| poll_once(auth.verify_legacy_key(k)))
        }
        Ok(Presented::ApiKey(key)) => {
            check_error(key, |k| auth.verify_api_key(k, !origin.is_empty()))
        }
        Err(err) => Err(err),
    };
    if let Ok(verified) = result
        && verified.source == KeySource::SigningKey
    {
        panic!("a header-supplied token verified with a signing key: {verified:?}");
    }
}

fn signed(data: &[u8]) {
    let [choice, header, claims] = fields::<3>(data);
    let header = text(header);
    let claims = text(claims);
    let ring = ring();
    let input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.as_bytes()),
        URL_SAFE_NO_PAD.encode(claims.as_bytes())
    );
    let index = choice.first().copied().unwrap_or(0) % 5;
    let (signature, expected_source, expected_alg) = match index {
        0 | 1 => {
            // The legacy secret, or the inline `oct` key: both are HS256 secrets.
            let secret = if index == 0 {
                LEGACY_SECRET.as_bytes().to_vec()
            } else {
                URL_SAFE_NO_PAD.decode(INLINE_OCT_K).expect("constant")
            };
            let key = hmac::Key::new(hmac::HMAC_SHA256, &secret);
            let tag = hmac::sign(&key, input.as_bytes()).as_ref().to_vec();
            (tag, KeySource::LegacySecret, "HS256")
        }
        n => {
            let signer = &ring.signers[usize::from(n - 2)];
            let signature = signer.sign(input.as_bytes()).expect("signing");
            (signature, KeySource::SigningKey, signer.alg().as_str())
        }
    };
    let token = format!("{input}.{}", URL_SAFE_NO_PAD.encode(signature));
    let through_cache = check_error(&token, |t| poll_once(ring.auth.verify_bearer(t)));
    let pure = |t: &str| {
        verify(
            ring.auth.key_ring().load().as_ref(),
            &ring.unchecked_iss,
            t,
            edgegate::clock::Clock::system().unix_now(),
        )
    };
    for verified in [through_cache, check_error(&token, pure)]
        .into_iter()
        .flatten()
    {
        assert_eq!(
            verified.source, expected_source,
            "key confusion: {verified:?}"
        );
        assert_eq!(
            verified.alg, expected_alg,
            "algorithm confusion: {verified:?}"
        );
        if expected_source == KeySource::SigningKey {
            let kid = verified.kid.as_deref().expect("a signing key has a kid");
            assert_eq!(
                kid,
                ring.signers[usize::from(index - 2)].kid(),
                "kid confusion"
            );
        }
    }
}

fn raw(token: &str) {
    let ring = ring();
    let result = check_error(token, |t| poll_once(ring.auth.verify_bearer(t)));
    let pure = |t: &str| {
        verify(
            ring.auth.key_ring().load().as_ref(),
            &ring.unchecked_iss,
            t,
            edgegate::clock::Clock::system().unix_now(),
        )
    };
    for verified in [result, check_error(token, pure)].into_iter().flatten() {
        // Only HS256 seeds can be valid: the asymmetric private keys never left this process.
        assert_eq!(
            verified.source,
            KeySource::LegacySecret,
            "forged: {verified:?}"
        );
    }
}

/// An error names what is wrong, never the credential itself. A message that contains the
/// credential only leaks it when the message depends on it: the fuzzer readily spells a token as
/// the message's own prose ("malformed JWT: …"), and such a message stays the same when the
/// credential is framed by other characters, where an echo would change.
fn check_error(
    credential: &str,
    verify: impl Fn(&str) -> Result<Verified, AuthError>,
) -> Result<Verified, AuthError> {
    let result = verify(credential);
    if let Err(err) = &result {
        let message = err.message();
        assert!(!err.code().is_empty());
        if credential.len() >= 12 && message.contains(credential) {
            let framed = |other: String| verify(&other).err().map(|e| e.message());
            let unchanged = framed(format!("Q9{credential}")).as_deref() == Some(message.as_ref())
                && framed(format!("{credential}Q9")).as_deref() == Some(message.as_ref());
            assert!(
                unchanged,
                "the error message repeats the credential: {message}"
            );
        }
    }
    result
}
