//! Test keys generated in-process, token minting, and ring builders.

use crate::auth::Alg;
use crate::auth::keyring::{FetchedInfo, KeyRing, KeyRingHandle};
use crate::auth::keys::{LegacySecret, parse_fetched_keys, parse_inline_keys};
use crate::auth::mint::SigningKey;
use crate::auth::verify::VerifySettings;
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use serde_json::{Value, json};
use std::time::{Duration, Instant, SystemTime};

pub const ISS: &str = "https://ref.supabase.co/auth/v1";
pub const LEGACY_SECRET: &[u8] = b"super-secret-jwt-token-with-at-least-32-characters-long";

pub fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// A private key with its kid, able to sign tokens and export its public JWK (a thin test face
/// over the service's own [`SigningKey`], which panics instead of returning errors).
pub struct TestKey {
    pub kid: String,
    key: SigningKey,
}

impl TestKey {
    fn new(alg: Alg, kid: &str) -> Self {
        Self {
            kid: kid.to_owned(),
            key: SigningKey::generate_with_kid(alg, kid).expect("generate a key"),
        }
    }
    pub fn es256(kid: &str) -> Self {
        Self::new(Alg::ES256, kid)
    }
    pub fn eddsa(kid: &str) -> Self {
        Self::new(Alg::EdDSA, kid)
    }
    pub fn rs256(kid: &str) -> Self {
        Self::new(Alg::RS256, kid)
    }

    pub fn alg(&self) -> &'static str {
        self.key.alg().as_str()
    }

    /// Public JWK the way Supabase publishes it.
    pub fn public_jwk(&self) -> Value {
        self.key.public_jwk()
    }

    /// SubjectPublicKeyInfo DER of the public key.
    pub fn public_der(&self) -> Vec<u8> {
        self.key.public_der().expect("der")
    }

    pub fn public_pem(&self) -> String {
        let body = STANDARD.encode(self.public_der());
        let lines: Vec<&str> = body
            .as_bytes()
            .chunks(64)
            .map(|c| std::str::from_utf8(c).expect("ascii"))
            .collect();
        format!(
            "-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n",
            lines.join("\n")
        )
    }

    /// A token with the standard header `{"alg","kid","typ"}`.
    pub fn token(&self, claims: &Value) -> String {
        self.key.token(claims).expect("token")
    }

    /// A token with exactly these header and claims JSON texts, correctly signed.
    pub fn token_with_header(&self, header: &str, claims: &str) -> String {
        self.key.token_with_header(header, claims).expect("token")
    }
}

pub fn hmac_sign(secret: &[u8], message: &[u8]) -> Vec<u8> {
    let key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, secret);
    aws_lc_rs::hmac::sign(&key, message).as_ref().to_vec()
}

/// An HS256 token with exactly these header and claims texts.
pub fn hs256_token(secret: &[u8], header: &str, claims: &str) -> String {
    let input = format!("{}.{}", b64(header.as_bytes()), b64(claims.as_bytes()));
    let sig = hmac_sign(secret, input.as_bytes());
    format!("{input}.{}", b64(&sig))
}

/// Claims like Supabase Auth's access tokens, valid for an hour from `now`.
pub fn claims(now: i64) -> Value {
    json!({"iss":ISS,"sub":"8f1c2f5e-0000-4000-8000-000000000001","aud":"authenticated",
        "role":"authenticated","iat":now,"exp":now + 3600,"session_id":"s1"})
}

pub fn settings() -> VerifySettings {
    VerifySettings {
        issuers: Some(vec![ISS.to_owned(), "supabase".to_owned()]),
        audiences: vec!["authenticated".to_owned()],
        leeway: Duration::from_secs(30),
    }
}

pub fn now() -> i64 {
    crate::clock::unix_seconds(SystemTime::now())
}

/// A ring with an optional legacy secret, inline JWKs and a fetched JWKS.
pub fn ring(legacy: Option<&[u8]>, inline: &[Value], fetched: &[Value]) -> KeyRing {
    let inline = parse_inline_keys(inline);
    let mut secrets: Vec<LegacySecret> = legacy
        .map(LegacySecret::from_env_secret)
        .into_iter()
        .collect();
    secrets.extend(inline.legacy);
    let handle = KeyRingHandle::new(KeyRing::new(secrets, inline.keys));
    if !fetched.is_empty() {
        let parsed = parse_fetched_keys(fetched);
        handle.replace_fetched(
            parsed.keys,
            FetchedInfo {
                fetched_at: SystemTime::now(),
                fetched_instant: Instant::now(),
                etag: None,
                ttl: Duration::from_secs(600),
            },
        );
    }
    (*handle.load()).clone()
}

/// A small deterministic generator (xorshift64*), so a failure names a reproducible case.
pub(crate) struct Rng(pub(crate) u64);

impl Rng {
    pub(crate) fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let x = self.0.wrapping_mul(0x2545_F491_4F6C_DD1D);
        usize::try_from(x >> 33).unwrap_or(0) % n
    }
    pub(crate) fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len())]
    }
}
