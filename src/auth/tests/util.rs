//! Test keys generated in-process, token minting, and ring builders.

use crate::auth::keyring::{FetchedInfo, KeyRing, KeyRingHandle};
use crate::auth::keys::{LegacySecret, parse_fetched_keys, parse_inline_keys};
use crate::auth::verify::VerifySettings;
use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{
    ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, Ed25519KeyPair, KeyPair, RSA_PKCS1_SHA256,
};
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use serde_json::{Value, json};
use std::time::{Duration, Instant, SystemTime};

pub const ISS: &str = "https://ref.supabase.co/auth/v1";
pub const LEGACY_SECRET: &[u8] = b"super-secret-jwt-token-with-at-least-32-characters-long";

pub fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

pub enum KeyMaterial {
    Es(EcdsaKeyPair),
    Ed(Ed25519KeyPair),
    Rsa(aws_lc_rs::rsa::KeyPair),
}

/// A private key with its kid, able to sign tokens and export its public JWK.
pub struct TestKey {
    pub kid: String,
    pub key: KeyMaterial,
}

impl TestKey {
    pub fn es256(kid: &str) -> Self {
        let key = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_FIXED_SIGNING).expect("generate P-256");
        Self {
            kid: kid.to_owned(),
            key: KeyMaterial::Es(key),
        }
    }
    pub fn eddsa(kid: &str) -> Self {
        let key = Ed25519KeyPair::generate().expect("generate Ed25519");
        Self {
            kid: kid.to_owned(),
            key: KeyMaterial::Ed(key),
        }
    }
    pub fn rs256(kid: &str) -> Self {
        let key = aws_lc_rs::rsa::KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048)
            .expect("generate RSA");
        Self {
            kid: kid.to_owned(),
            key: KeyMaterial::Rsa(key),
        }
    }

    pub fn alg(&self) -> &'static str {
        match self.key {
            KeyMaterial::Es(_) => "ES256",
            KeyMaterial::Ed(_) => "EdDSA",
            KeyMaterial::Rsa(_) => "RS256",
        }
    }

    /// Public JWK the way Supabase publishes it.
    pub fn public_jwk(&self) -> Value {
        let mut jwk = match &self.key {
            KeyMaterial::Es(k) => {
                let point = k.public_key().as_ref();
                json!({"kty":"EC","crv":"P-256","x":b64(&point[1..33]),"y":b64(&point[33..65])})
            }
            KeyMaterial::Ed(k) => {
                json!({"kty":"OKP","crv":"Ed25519","x":b64(k.public_key().as_ref())})
            }
            KeyMaterial::Rsa(k) => {
                let public = k.public_key();
                json!({"kty":"RSA",
                    "n":b64(public.modulus().big_endian_without_leading_zero()),
                    "e":b64(public.exponent().big_endian_without_leading_zero())})
            }
        };
        jwk["kid"] = json!(self.kid);
        jwk["alg"] = json!(self.alg());
        jwk["use"] = json!("sig");
        jwk["key_ops"] = json!(["verify"]);
        jwk
    }

    /// SubjectPublicKeyInfo DER of the public key.
    pub fn public_der(&self) -> Vec<u8> {
        match &self.key {
            KeyMaterial::Es(k) => k.public_key().as_der().expect("der").as_ref().to_vec(),
            KeyMaterial::Ed(k) => k.public_key().as_der().expect("der").as_ref().to_vec(),
            KeyMaterial::Rsa(_) => panic!("not needed"),
        }
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

    pub fn sign(&self, message: &[u8]) -> Vec<u8> {
        let rng = SystemRandom::new();
        match &self.key {
            KeyMaterial::Es(k) => k.sign(&rng, message).expect("sign").as_ref().to_vec(),
            KeyMaterial::Ed(k) => k.sign(message).as_ref().to_vec(),
            KeyMaterial::Rsa(k) => {
                let mut sig = vec![0; k.public_modulus_len()];
                k.sign(&RSA_PKCS1_SHA256, &rng, message, &mut sig)
                    .expect("sign");
                sig
            }
        }
    }

    /// A token with the standard header `{"alg","kid","typ"}`.
    pub fn token(&self, claims: &Value) -> String {
        self.token_with_header(
            &json!({"alg":self.alg(),"kid":self.kid,"typ":"JWT"}).to_string(),
            &claims.to_string(),
        )
    }

    /// A token with exactly these header and claims JSON texts, correctly signed.
    pub fn token_with_header(&self, header: &str, claims: &str) -> String {
        let input = format!("{}.{}", b64(header.as_bytes()), b64(claims.as_bytes()));
        let sig = self.sign(input.as_bytes());
        format!("{input}.{}", b64(&sig))
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
    crate::auth::clock::unix_seconds(SystemTime::now())
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
