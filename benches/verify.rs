//! Micro-benchmarks of the token verification path (issue 6).
//!
//! Per algorithm (HS256, ES256, RS256, EdDSA):
//! - `raw/aws_lc_verify` (ES256, RS256, EdDSA): aws-lc-rs `ParsedPublicKey::verify_sig` with a
//!   key parsed once, the bare signature check and the in-process limit `bench/load.sh` divides by;
//! - `raw/crypto_verify`: jsonwebtoken 11's signature primitive alone (aws-lc-rs; it parses the
//!   public key again on every call);
//! - `raw/decode`: jsonwebtoken's `decode` with a `DecodingKey` and the same claim checks;
//! - `verify`: `edgegate::auth::verify`, everything edgegate checks for one token;
//! - `verify_bearer_miss`: `Authenticator::verify_bearer` with the token cache off (every call
//!   hashes, misses and verifies);
//!
//! and `verify_bearer_hit`: an ES256 token answered from the verified-token cache;
//! `HS256/one_shot/cache_full`: `verify_bearer` with the cache full, under a stream of tokens each
//! seen once (every call misses, verifies, evicts the oldest entry and inserts its own), against
//! `HS256/one_shot/cache_off`, the same tokens with the cache off: what a token seen once pays
//! for the cache.
//!
//! Every benchmark first asserts that its tokens verify, so a broken setup cannot time a fast
//! failure. Run with `cargo bench --bench verify`.

use std::hint::black_box;
use std::time::Duration;

use aws_lc_rs::rsa::PublicKeyComponents;
use aws_lc_rs::signature::{
    ECDSA_P256_SHA256_FIXED, ED25519, ParsedPublicKey, RSA_PKCS1_2048_8192_SHA256,
};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use criterion::{Criterion, criterion_group, criterion_main};
use edgegate::auth::keyring::KeyRing;
use edgegate::auth::keys::{LegacySecret, parse_inline_keys};
use edgegate::auth::mint::{SigningKey, legacy_token, user_claims};
use edgegate::auth::{Alg, AuthSettings, Authenticator, KeySource, VerifySettings, verify};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use secrecy::SecretString;
use serde_json::Value;

const ISSUER: &str = "https://bench.supabase.co/auth/v1";
const SECRET: &str = "super-secret-jwt-token-with-at-least-32-characters-long";
/// Distinct tokens per algorithm, cycled through by each benchmark.
const TOKENS: usize = 64;

struct Fixture {
    ring: KeyRing,
    settings: VerifySettings,
    inline_jwks: Vec<Value>,
    /// (alg, tokens, jsonwebtoken's key for them, aws-lc-rs's parsed key for asymmetric ones)
    sets: Vec<(Alg, Vec<String>, DecodingKey, Option<ParsedPublicKey>)>,
}

fn now() -> i64 {
    edgegate::clock::Clock::system().unix_now()
}

fn str_of<'a>(jwk: &'a Value, member: &str) -> &'a str {
    jwk[member].as_str().expect("JWK member")
}

fn decoding_key(jwk: &Value) -> DecodingKey {
    match str_of(jwk, "kty") {
        "EC" => DecodingKey::from_ec_components(str_of(jwk, "x"), str_of(jwk, "y")),
        "RSA" => DecodingKey::from_rsa_components(str_of(jwk, "n"), str_of(jwk, "e")),
        "OKP" => DecodingKey::from_ed_components(str_of(jwk, "x")),
        other => panic!("unexpected kty {other}"),
    }
    .expect("a valid public JWK")
}

fn fixture() -> Fixture {
    let now = now();
    let claims = |i: usize| user_claims(ISSUER, "authenticated", &format!("user-{i}"), now, 3600);
    let mut sets = Vec::new();
    let mut inline_jwks = Vec::new();
    let hs = (0..TOKENS)
        .map(|i| legacy_token(SECRET.as_bytes(), &claims(i), None))
        .collect();
    sets.push((
        Alg::HS256,
        hs,
        DecodingKey::from_secret(SECRET.as_bytes()),
        None,
    ));
    for alg in [Alg::ES256, Alg::RS256, Alg::EdDSA] {
        let key = SigningKey::generate(alg).expect("generate a key");
        let jwk = key.public_jwk();
        let tokens = (0..TOKENS)
            .map(|i| key.token(&claims(i)).expect("sign"))
            .collect();
        sets.push((
            alg,
            tokens,
            decoding_key(&jwk),
            Some(parsed_public_key(&jwk)),
        ));
        inline_jwks.push(jwk);
    }
    let parsed = parse_inline_keys(&inline_jwks);
    assert!(parsed.dropped.is_empty(), "{:?}", parsed.dropped);
    let ring = KeyRing::new(
        vec![LegacySecret::from_env_secret(SECRET.as_bytes())],
        parsed.keys,
    );
    let settings = VerifySettings {
        issuers: Some(vec![ISSUER.to_owned()]),
        audiences: vec!["authenticated".to_owned()],
        leeway: Duration::from_secs(30),
    };
    Fixture {
        ring,
        settings,
        inline_jwks,
        sets,
    }
}

fn authenticator(fixture: &Fixture, cache_capacity: usize) -> Authenticator {
    let settings = AuthSettings {
        legacy_secrets: vec![SecretString::from(SECRET)],
        inline_jwks: fixture.inline_jwks.clone(),
        issuers: fixture.settings.issuers.clone(),
        audiences: fixture.settings.audiences.clone(),
        leeway: fixture.settings.leeway,
        token_cache_capacity: cache_capacity,
        ..AuthSettings::default()
    };
    Authenticator::new(settings, reqwest::Client::new())
}

fn b64_of(jwk: &Value, member: &str) -> Vec<u8> {
    URL_SAFE_NO_PAD
        .decode(str_of(jwk, member))
        .expect("a base64url JWK member")
}

/// The public key of `jwk` parsed once by aws-lc-rs, as a verifier keeps it.
fn parsed_public_key(jwk: &Value) -> ParsedPublicKey {
    match str_of(jwk, "kty") {
        "EC" => {
            let mut point = vec![0x04];
            point.extend(b64_of(jwk, "x"));
            point.extend(b64_of(jwk, "y"));
            ParsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, point)
        }
        "OKP" => ParsedPublicKey::new(&ED25519, b64_of(jwk, "x")),
        "RSA" => PublicKeyComponents {
            n: b64_of(jwk, "n"),
            e: b64_of(jwk, "e"),
        }
        .to_parsed_public_key(&RSA_PKCS1_2048_8192_SHA256),
        other => panic!("unexpected kty {other}"),
    }
    .expect("a valid public key")
}

fn jsonwebtoken_alg(alg: Alg) -> Algorithm {
    match alg {
        Alg::HS256 => Algorithm::HS256,
        Alg::ES256 => Algorithm::ES256,
        Alg::RS256 => Algorithm::RS256,
        Alg::EdDSA => Algorithm::EdDSA,
    }
}

/// (signature, signing input) of a compact JWS.
fn split(token: &str) -> (&str, &[u8]) {
    let dot = token.rfind('.').expect("a compact JWS");
    (&token[dot + 1..], &token.as_bytes()[..dot])
}

fn expected_source(alg: Alg) -> KeySource {
    if alg == Alg::HS256 {
        KeySource::LegacySecret
    } else {
        KeySource::SigningKey
    }
}

/// Cycles through `items` one per call.
struct Cycle<'a, T> {
    items: &'a [T],
    next: usize,
}

impl<'a, T> Cycle<'a, T> {
    fn new(items: &'a [T]) -> Self {
        Self { items, next: 0 }
    }
    fn next(&mut self) -> &'a T {
        let item = &self.items[self.next];
        self.next = (self.next + 1) % self.items.len();
        item
    }
}

fn benches(c: &mut Criterion) {
    let fixture = fixture();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let uncached = authenticator(&fixture, 0);

    for (alg, tokens, key, parsed) in &fixture.sets {
        let alg = *alg;
        let mut group = c.benchmark_group(alg.as_str());
        let jwt_alg = jsonwebtoken_alg(alg);

        if let Some(parsed) = parsed {
            let signed: Vec<(Vec<u8>, &[u8])> = tokens
                .iter()
                .map(|token| {
                    let (signature, message) = split(token);
                    let signature = URL_SAFE_NO_PAD.decode(signature).expect("base64url");
                    assert!(
                        parsed.verify_sig(message, &signature).is_ok(),
                        "{alg:?}: bare aws-lc-rs check failed"
                    );
                    (signature, message)
                })
                .collect();
            group.bench_function("raw/aws_lc_verify", |b| {
                let mut cycle = Cycle::new(&signed);
                b.iter(|| {
                    let (signature, message) = cycle.next();
                    parsed
                        .verify_sig(black_box(message), black_box(signature))
                        .is_ok()
                });
            });
        }

        for token in tokens {
            let (signature, message) = split(token);
            assert!(
                jsonwebtoken::crypto::verify(signature, message, key, jwt_alg).expect("verify"),
                "{alg:?}: raw signature check failed"
            );
        }
        group.bench_function("raw/crypto_verify", |b| {
            let mut cycle = Cycle::new(tokens);
            b.iter(|| {
                let (signature, message) = split(cycle.next());
                jsonwebtoken::crypto::verify(black_box(signature), black_box(message), key, jwt_alg)
                    .unwrap_or(false)
            });
        });

        let mut validation = Validation::new(jwt_alg);
        validation.set_issuer(&[ISSUER]);
        validation.set_audience(&["authenticated"]);
        validation.leeway = fixture.settings.leeway.as_secs();
        for token in tokens {
            jsonwebtoken::decode::<Value>(token, key, &validation)
                .unwrap_or_else(|e| panic!("{alg:?}: jsonwebtoken::decode failed: {e}"));
        }
        group.bench_function("raw/decode", |b| {
            let mut cycle = Cycle::new(tokens);
            b.iter(|| jsonwebtoken::decode::<Value>(black_box(cycle.next()), key, &validation));
        });

        let now = now();
        for token in tokens {
            let verified = verify(&fixture.ring, &fixture.settings, token, now)
                .unwrap_or_else(|e| panic!("{alg:?}: edgegate verify failed: {e:?}"));
            assert_eq!(verified.source, expected_source(alg));
            assert_eq!(verified.alg, alg.as_str());
        }
        group.bench_function("verify", |b| {
            let mut cycle = Cycle::new(tokens);
            b.iter(|| {
                verify(
                    &fixture.ring,
                    &fixture.settings,
                    black_box(cycle.next()),
                    now,
                )
            });
        });

        for token in tokens {
            let verified = runtime
                .block_on(uncached.verify_bearer(token))
                .unwrap_or_else(|e| panic!("{alg:?}: verify_bearer failed: {e:?}"));
            assert_eq!(verified.source, expected_source(alg));
        }
        assert_eq!(uncached.cache().hits(), 0, "the cache must be off");
        group.bench_function("verify_bearer_miss", |b| {
            let mut cycle = Cycle::new(tokens);
            b.to_async(&runtime)
                .iter(|| uncached.verify_bearer(black_box(cycle.next())));
        });
        group.finish();
    }

    one_shot(c, &runtime, &fixture);

    let cached = authenticator(&fixture, 10_000);
    let (_, es256_tokens, _, _) = fixture
        .sets
        .iter()
        .find(|(alg, _, _, _)| *alg == Alg::ES256)
        .expect("ES256 tokens");
    let token = &es256_tokens[0];
    let first = runtime
        .block_on(cached.verify_bearer(token))
        .expect("the cached token verifies");
    let hits = cached.cache().hits();
    let again = runtime
        .block_on(cached.verify_bearer(token))
        .expect("the cached token verifies again");
    assert_eq!(first, again);
    assert_eq!(cached.cache().hits(), hits + 1, "the second call must hit");
    c.bench_function("ES256/verify_bearer_hit", |b| {
        b.to_async(&runtime)
            .iter(|| cached.verify_bearer(black_box(token)));
    });
}

/// `HS256/one_shot/*` (see the module's documentation). HS256, the cheapest check, so that the
/// cache's share stands out; its entries are shaped like any other token's. Both cycle through
/// the same tokens, more than fit in a CPU cache, so that reading them costs both the same.
fn one_shot(c: &mut Criterion, runtime: &tokio::runtime::Runtime, fixture: &Fixture) {
    // The cache at its default size, and 1.6 times as many one-shot tokens cycled through it
    // (16,000 for 10,000: about 1,000 for each of its 16 shards of 625), so that a token is long
    // evicted when it comes round again.
    let capacity = AuthSettings::default().token_cache_capacity;
    let now = now();
    let tokens: Vec<String> = (0..capacity * 16 / 10)
        .map(|i| {
            let claims = user_claims(ISSUER, "authenticated", &format!("one-shot-{i}"), now, 3600);
            legacy_token(SECRET.as_bytes(), &claims, None)
        })
        .collect();
    let off = authenticator(fixture, 0);
    let full = authenticator(fixture, capacity);
    for token in &tokens {
        for authenticator in [&off, &full] {
            runtime
                .block_on(authenticator.verify_bearer(token))
                .expect("a one-shot token verifies");
        }
    }
    let entries = full.cache().len();
    assert!(
        entries > capacity * 9 / 10 && entries <= capacity,
        "the cache must be full: {entries} entries"
    );
    let mut group = c.benchmark_group("HS256/one_shot");
    for (name, authenticator) in [("cache_off", &off), ("cache_full", &full)] {
        let mut cycle = Cycle::new(&tokens);
        group.bench_function(name, |b| {
            b.to_async(runtime)
                .iter(|| authenticator.verify_bearer(black_box(cycle.next())));
        });
    }
    group.finish();
    assert_eq!(full.cache().hits(), 0, "every call must miss");
}

criterion_group! {
    name = verify_benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = benches
}
criterion_main!(verify_benches);
