//! What the fuzz targets share: the input framing, a fixed key ring, and a poll-once executor.
//!
//! Inputs are plain bytes split into fields at `0xFF`, a byte that never occurs in UTF-8, so
//! seeds written by `seeds.py` stay readable and the fuzzer can still merge or split fields.

use std::future::Future;
use std::sync::OnceLock;
use std::task::{Context, Poll, Waker};

use edgegate::auth::mint::SigningKey;
use edgegate::auth::{Alg, AuthSettings, Authenticator, VerifySettings};
use edgegate::clock::Clock;
use secrecy::SecretString;
use serde_json::{Value, json};

/// Separates the fields of one fuzz input.
pub const SEPARATOR: u8 = 0xFF;

/// The first `N` fields of `data`; missing fields are empty, the last one keeps any further
/// separators.
pub fn fields<const N: usize>(data: &[u8]) -> [&[u8]; N] {
    let mut out = [&[][..]; N];
    for (slot, part) in out.iter_mut().zip(data.splitn(N, |b| *b == SEPARATOR)) {
        *slot = part;
    }
    out
}

/// A field as text, the way a lenient reader would take it.
pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Runs a future that never waits on I/O (nothing in these targets does: there is no JWKS URL,
/// no database). A `Pending` would mean a hidden wait on the network and is a finding itself.
pub fn poll_once<F: Future>(future: F) -> F::Output {
    let mut future = std::pin::pin!(future);
    let mut context = Context::from_waker(Waker::noop());
    match future.as_mut().poll(&mut context) {
        Poll::Ready(output) => output,
        Poll::Pending => panic!("a credential check waited, but no I/O is configured"),
    }
}

/// The legacy HS256 secret of the fuzz ring (`seeds.py` signs HS256 seeds with it).
pub const LEGACY_SECRET: &str = "fuzz-legacy-secret-0123456789abcdef";
/// An inline `oct` JWK's secret, base64url (32 bytes).
pub const INLINE_OCT_K: &str = "Zm0tZnV6ei1pbmxpbmUtb2N0LXNlY3JldC0zMi1ieXRl";
/// The issuer the ring accepts, beside `supabase`.
pub const ISSUER: &str = "https://fuzz.supabase.co/auth/v1";
/// API keys the ring knows.
pub const SECRET_API_KEY: &str = "sb_secret_fuzzfuzzfuzzfuzzfuzzfuzz";
pub const PUBLISHABLE_API_KEY: &str = "sb_publishable_fuzzfuzzfuzzfuzzfuzz";
/// The kids of the signing keys (`seeds.py` names them in token headers).
pub const KIDS: [(&str, Alg); 3] = [
    ("fuzz-es256", Alg::ES256),
    ("fuzz-rs256", Alg::RS256),
    ("fuzz-eddsa", Alg::EdDSA),
];

/// One key ring for the whole run: the legacy secret, an inline `oct` key, and one signing key
/// per asymmetric algorithm. The private keys are made fresh per process, so no input can
/// carry a valid asymmetric signature except one this process made.
pub struct Ring {
    /// Verifies bearer tokens and API keys (cache on, no JWKS URL, a clock that stands still).
    pub auth: Authenticator,
    /// The same checks without an issuer list (`iss` unchecked).
    pub unchecked_iss: VerifySettings,
    /// ES256, RS256, EdDSA in the order of [`KIDS`].
    pub signers: Vec<SigningKey>,
}

/// The ring, built on first use.
pub fn ring() -> &'static Ring {
    static RING: OnceLock<Ring> = OnceLock::new();
    RING.get_or_init(|| {
        let signers: Vec<SigningKey> = KIDS
            .iter()
            .map(|(kid, alg)| SigningKey::generate_with_kid(*alg, kid).expect("key generation"))
            .collect();
        let mut inline_jwks: Vec<Value> = signers.iter().map(SigningKey::public_jwk).collect();
        inline_jwks.push(json!({"kty":"oct","kid":"fuzz-oct","alg":"HS256","k":INLINE_OCT_K}));
        let settings = AuthSettings {
            legacy_secrets: vec![SecretString::from(LEGACY_SECRET)],
            inline_jwks,
            issuers: Some(vec![ISSUER.to_owned(), "supabase".to_owned()]),
            secret_api_keys: vec![("default".to_owned(), SECRET_API_KEY.into())],
            publishable_api_keys: vec![("default".to_owned(), PUBLISHABLE_API_KEY.into())],
            ..AuthSettings::default()
        };
        let auth = Authenticator::with_clock(settings, reqwest::Client::new(), Clock::manual());
        assert!(
            auth.inline_dropped().is_empty(),
            "every fuzz key must be accepted"
        );
        Ring {
            auth,
            unchecked_iss: VerifySettings {
                issuers: None,
                audiences: vec!["authenticated".to_owned()],
                leeway: std::time::Duration::from_secs(30),
            },
            signers,
        }
    })
}
