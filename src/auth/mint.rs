//! Making keys and tokens, for `edgegate keys generate`, `edgegate token mint` and tests.
//! Tokens are shaped like Supabase Auth's.

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{
    ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, Ed25519KeyPair, KeyPair as _, RSA_PKCS1_SHA256,
};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Value, json};

use crate::auth::Alg;

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

enum Material {
    Es256(EcdsaKeyPair),
    EdDsa(Ed25519KeyPair),
    Rs256(aws_lc_rs::rsa::KeyPair),
}

/// A private signing key with its kid.
pub struct SigningKey {
    kid: String,
    material: Material,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey")
            .field("kid", &self.kid)
            .field("alg", &self.alg().as_str())
            .finish_non_exhaustive()
    }
}

impl SigningKey {
    /// A new key pair with a random UUID kid.
    pub fn generate(alg: Alg) -> anyhow::Result<Self> {
        Self::generate_with_kid(alg, &uuid::Uuid::new_v4().to_string())
    }

    pub fn generate_with_kid(alg: Alg, kid: &str) -> anyhow::Result<Self> {
        let material = match alg {
            Alg::ES256 => Material::Es256(
                EcdsaKeyPair::generate(&ECDSA_P256_SHA256_FIXED_SIGNING)
                    .map_err(|_| anyhow::anyhow!("cannot generate a P-256 key"))?,
            ),
            Alg::EdDSA => Material::EdDsa(
                Ed25519KeyPair::generate()
                    .map_err(|_| anyhow::anyhow!("cannot generate an Ed25519 key"))?,
            ),
            Alg::RS256 => Material::Rs256(
                aws_lc_rs::rsa::KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048)
                    .map_err(|_| anyhow::anyhow!("cannot generate an RSA key"))?,
            ),
            Alg::HS256 => anyhow::bail!("HS256 is the legacy secret, not a signing key"),
        };
        Ok(Self {
            kid: kid.to_owned(),
            material,
        })
    }

    pub fn kid(&self) -> &str {
        &self.kid
    }

    pub fn alg(&self) -> Alg {
        match self.material {
            Material::Es256(_) => Alg::ES256,
            Material::EdDsa(_) => Alg::EdDSA,
            Material::Rs256(_) => Alg::RS256,
        }
    }

    /// The public JWK, as Supabase publishes it in its JWKS.
    pub fn public_jwk(&self) -> Value {
        let mut jwk = match &self.material {
            Material::Es256(key) => {
                let point = key.public_key().as_ref();
                json!({"kty": "EC", "crv": "P-256", "x": b64(&point[1..33]), "y": b64(&point[33..65])})
            }
            Material::EdDsa(key) => {
                json!({"kty": "OKP", "crv": "Ed25519", "x": b64(key.public_key().as_ref())})
            }
            Material::Rs256(key) => {
                let public = key.public_key();
                json!({
                    "kty": "RSA",
                    "n": b64(public.modulus().big_endian_without_leading_zero()),
                    "e": b64(public.exponent().big_endian_without_leading_zero()),
                })
            }
        };
        jwk["kid"] = json!(self.kid);
        jwk["alg"] = json!(self.alg().as_str());
        jwk["use"] = json!("sig");
        jwk["key_ops"] = json!(["verify"]);
        jwk["ext"] = json!(true);
        jwk
    }

    fn sign(&self, message: &[u8]) -> anyhow::Result<Vec<u8>> {
        let rng = SystemRandom::new();
        let failed = |_| anyhow::anyhow!("signing failed");
        Ok(match &self.material {
            Material::Es256(key) => key.sign(&rng, message).map_err(failed)?.as_ref().to_vec(),
            Material::EdDsa(key) => key.sign(message).as_ref().to_vec(),
            Material::Rs256(key) => {
                let mut signature = vec![0; key.public_modulus_len()];
                key.sign(&RSA_PKCS1_SHA256, &rng, message, &mut signature)
                    .map_err(failed)?;
                signature
            }
        })
    }

    /// A compact JWS of `claims` with header `{"alg","kid","typ":"JWT"}`.
    pub fn token(&self, claims: &Value) -> anyhow::Result<String> {
        let header = json!({"alg": self.alg().as_str(), "kid": self.kid, "typ": "JWT"});
        let input = format!(
            "{}.{}",
            b64(header.to_string().as_bytes()),
            b64(claims.to_string().as_bytes())
        );
        let signature = self.sign(input.as_bytes())?;
        Ok(format!("{input}.{}", b64(&signature)))
    }
}

/// An HS256 token signed with the legacy secret (`header` lets a test add a `kid`).
pub fn legacy_token(secret: &[u8], claims: &Value, kid: Option<&str>) -> String {
    let mut header = json!({"alg": "HS256", "typ": "JWT"});
    if let Some(kid) = kid {
        header["kid"] = json!(kid);
    }
    let input = format!(
        "{}.{}",
        b64(header.to_string().as_bytes()),
        b64(claims.to_string().as_bytes())
    );
    let key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, secret);
    let signature = aws_lc_rs::hmac::sign(&key, input.as_bytes());
    format!("{input}.{}", b64(signature.as_ref()))
}

/// Claims shaped like a Supabase Auth access token for `role` and `sub`, valid `ttl_secs`.
pub fn user_claims(issuer: &str, role: &str, sub: &str, now: i64, ttl_secs: i64) -> Value {
    json!({
        "iss": issuer,
        "sub": sub,
        "aud": "authenticated",
        "exp": now + ttl_secs,
        "iat": now,
        "role": role,
        "aal": "aal1",
        "amr": [{"method": "password", "timestamp": now}],
        "session_id": uuid::Uuid::new_v4().to_string(),
        "is_anonymous": false,
        "email": "",
        "phone": "",
        "app_metadata": {"provider": "email", "providers": ["email"]},
        "user_metadata": {},
    })
}

/// Claims shaped like a legacy `anon` / `service_role` API key (no `sub`, no `aud`).
pub fn api_key_claims(project_ref: &str, role: &str, now: i64, ttl_secs: i64) -> Value {
    json!({"iss": "supabase", "ref": project_ref, "role": role, "iat": now, "exp": now + ttl_secs})
}
