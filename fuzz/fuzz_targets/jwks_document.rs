//! The JWKS document parser and JWK rules, for a fetched set (from a possibly malicious host)
//! and for the inline `SUPABASE_JWKS`, then a key ring built from the result; and the
//! `Cache-Control` reading that sets the refresh time.
//!
//! Input: one mode byte (bit 0: a bare array is allowed, as for `SUPABASE_JWKS`), then fields
//! split at 0xFF: the document, a `Cache-Control` value.
//!
//! Oracles: a fetched set never yields an HMAC secret; a key with a member name twice is
//! dropped; accepted keys have distinct, well-formed kids and stay within the key limit; the
//! refresh time stays within its bounds.
#![no_main]

use std::sync::OnceLock;
use std::time::Duration;

use edgegate::auth::jwks::{MAX_AGE_BOUNDS, MAX_JWKS_BYTES, freshness};
use edgegate::auth::keyring::FetchedInfo;
use edgegate::auth::keys::{
    MAX_JWKS_KEYS, MAX_KID_LEN, parse_fetched_entries, parse_inline_keys, parse_jwks_document,
};
use edgegate::auth::{KeyRing, KeyRingHandle, verify};
use edgegate_fuzz::{fields, ring};
use libfuzzer_sys::fuzz_target;

const DEFAULT_TTL: Duration = Duration::from_secs(600);

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let [document, cache_control] = fields::<2>(rest);
    if let Ok(value) = http::HeaderValue::from_bytes(cache_control) {
        let mut headers = http::HeaderMap::new();
        headers.insert(http::header::CACHE_CONTROL, value);
        let ttl = freshness(&headers, DEFAULT_TTL);
        let (lo, hi) = MAX_AGE_BOUNDS;
        assert!(ttl == DEFAULT_TTL || (lo..=hi).contains(&ttl), "{ttl:?}");
    }
    // The fetcher stops reading at MAX_JWKS_BYTES; nothing longer reaches the parser.
    if document.len() > MAX_JWKS_BYTES {
        return;
    }
    let Ok(jwks) = parse_jwks_document(document, mode & 1 == 1) else {
        return;
    };
    assert!(jwks.len() <= MAX_JWKS_KEYS);

    let fetched = parse_fetched_entries(&jwks);
    assert!(
        fetched.legacy.is_empty(),
        "a fetched JWKS yielded an HMAC secret"
    );
    let with_duplicates = jwks.iter().filter(|key| key.duplicate.is_some()).count();
    let duplicates_dropped = fetched
        .dropped
        .iter()
        .filter(|key| key.reason.starts_with("duplicate member `"))
        .count();
    assert_eq!(duplicates_dropped, with_duplicates);
    let values: Vec<serde_json::Value> = jwks.iter().map(|key| key.value.clone()).collect();
    let inline = parse_inline_keys(&values);
    for parsed in [&fetched, &inline] {
        assert_eq!(
            parsed.keys.len() + parsed.legacy.len() + parsed.dropped.len(),
            jwks.len()
        );
        let mut kids: Vec<&str> = parsed.keys.iter().map(|k| k.kid()).collect();
        for kid in &kids {
            assert!(!kid.is_empty() && kid.len() <= MAX_KID_LEN);
            assert!(!kid.chars().any(char::is_control));
        }
        kids.sort_unstable();
        let before = kids.len();
        kids.dedup();
        assert_eq!(before, kids.len(), "two accepted keys share a kid");
    }

    // The fetched keys join the fuzz ring; its own tokens must still verify against their
    // inline keys (inline keys win over fetched ones with the same kid).
    let base = ring();
    let current = base.auth.key_ring().load();
    let handle = KeyRingHandle::new(KeyRing::clone(&current));
    handle.replace_fetched(
        fetched.keys,
        FetchedInfo {
            fetched_at: std::time::SystemTime::now(),
            fetched_instant: std::time::Instant::now(),
            etag: None,
            ttl: DEFAULT_TTL,
        },
    );
    let joined = handle.load();
    let _ = joined.listing();
    let _ = KeyRing::new(inline.legacy, inline.keys).listing();
    let now = edgegate::clock::Clock::system().unix_now();
    for (kid, token) in tokens() {
        let verified = verify(&joined, &base.unchecked_iss, token, now)
            .expect("a fetched key displaced an inline key");
        assert_eq!(verified.kid.as_deref(), Some(kid.as_str()));
    }
});

/// One token per signing key of the fuzz ring, valid for a day (signed once: RSA is slow).
fn tokens() -> &'static [(String, String)] {
    static TOKENS: OnceLock<Vec<(String, String)>> = OnceLock::new();
    TOKENS.get_or_init(|| {
        let now = edgegate::clock::Clock::system().unix_now();
        let claims = serde_json::json!({"exp": now + 86_400, "aud": "authenticated",
            "iss": edgegate_fuzz::ISSUER, "role": "authenticated"});
        ring()
            .signers
            .iter()
            .map(|signer| {
                (
                    signer.kid().to_owned(),
                    signer.token(&claims).expect("signing"),
                )
            })
            .collect()
    })
}
