//! Making keys and tokens, for `edgegate keys generate`, `edgegate token mint` and tests.
//! Tokens are shaped like Supabase Auth's; private JWKs are shaped like the ones the Supabase
//! CLI (`supabase gen signing-key`) prints and the dashboard imports.

mod der;

use aws_lc_rs::encoding::{AsBigEndian as _, AsDer as _};
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::rsa::{KeyPairComponents, PublicKeyComponents};
use aws_lc_rs::signature::{
    ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, Ed25519KeyPair, KeyPair as _, RSA_PKCS1_SHA256,
};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use secrecy::SecretString;
use secrecy::zeroize::Zeroizing;
use serde_json::{Map, Value, json};

use crate::auth::Alg;
use crate::auth::keys::{kid_is_well_formed, modulus_bits, strip_leading_zeros};

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

enum Material {
    Es256(EcdsaKeyPair),
    EdDsa(Ed25519KeyPair),
    Rs256(aws_lc_rs::rsa::KeyPair),
}

/// A private signing key with its kid. `Debug` shows the kid and algorithm only.
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

/// Why a private JWK could not be loaded. The messages name members, never their values.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("private JWK: {0}")]
pub struct PrivateJwkError(String);

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

    fn kty(&self) -> &'static str {
        match self.material {
            Material::Es256(_) => "EC",
            Material::EdDsa(_) => "OKP",
            Material::Rs256(_) => "RSA",
        }
    }

    /// The members every JWK of this key starts with, in the Supabase CLI's order.
    fn head(&self, key_ops: &[&str]) -> Vec<(&'static str, Value)> {
        vec![
            ("kty", json!(self.kty())),
            ("kid", json!(self.kid)),
            ("use", json!("sig")),
            ("key_ops", json!(key_ops)),
            ("alg", json!(self.alg().as_str())),
            ("ext", json!(true)),
        ]
    }

    fn public_members(&self) -> Vec<(&'static str, Value)> {
        match &self.material {
            Material::Es256(key) => {
                let point = key.public_key().as_ref();
                vec![
                    ("crv", json!("P-256")),
                    ("x", json!(b64(&point[1..33]))),
                    ("y", json!(b64(&point[33..65]))),
                ]
            }
            Material::EdDsa(key) => vec![
                ("crv", json!("Ed25519")),
                ("x", json!(b64(key.public_key().as_ref()))),
            ],
            Material::Rs256(key) => {
                let public = key.public_key();
                vec![
                    (
                        "n",
                        json!(b64(public.modulus().big_endian_without_leading_zero())),
                    ),
                    (
                        "e",
                        json!(b64(public.exponent().big_endian_without_leading_zero())),
                    ),
                ]
            }
        }
    }

    /// The public JWK, as Supabase publishes it in its JWKS.
    pub fn public_jwk(&self) -> Value {
        Value::Object(
            self.head(&["verify"])
                .into_iter()
                .chain(self.public_members())
                .map(|(name, value)| (name.to_owned(), value))
                .collect(),
        )
    }

    /// The public JWKS holding only this key: `{"keys":[public JWK]}`.
    pub fn public_jwks(&self) -> Value {
        json!({ "keys": [self.public_jwk()] })
    }

    /// The private JWK as one line of JSON, member for member what `supabase gen signing-key`
    /// prints and the dashboard imports: `kty, kid, use, key_ops ["sign","verify"], alg, ext`,
    /// then `d, crv, x, y` (EC), `d, crv, x` (OKP) or `n, e, d, p, q, dp, dq, qi` (RSA).
    /// It is a secret, hence the wrapper.
    pub fn private_jwk(&self) -> anyhow::Result<SecretString> {
        let export_failed = |_| anyhow::anyhow!("cannot export the private key");
        let mut members = self.head(&["sign", "verify"]);
        match &self.material {
            Material::Es256(key) => {
                let d = key.private_key().as_be_bytes().map_err(export_failed)?;
                anyhow::ensure!(d.as_ref().len() == 32, "P-256 private key is not 32 bytes");
                members.push(("d", json!(b64(d.as_ref()))));
                members.extend(self.public_members());
            }
            Material::EdDsa(key) => {
                let seed = key.seed().map_err(export_failed)?;
                let seed = seed.as_be_bytes().map_err(export_failed)?;
                members.push(("d", json!(b64(seed.as_ref()))));
                members.extend(self.public_members());
            }
            Material::Rs256(key) => {
                let pkcs8 = key.as_der().map_err(export_failed)?;
                let parts = der::rsa_private_key_from_pkcs8(pkcs8.as_ref())?;
                let public = key.public_key();
                anyhow::ensure!(
                    parts.n == public.modulus().big_endian_without_leading_zero()
                        && parts.e == public.exponent().big_endian_without_leading_zero(),
                    "the exported RSA key does not match its public key"
                );
                members.extend(self.public_members());
                for (name, value) in [
                    ("d", parts.d),
                    ("p", parts.p),
                    ("q", parts.q),
                    ("dp", parts.dp),
                    ("dq", parts.dq),
                    ("qi", parts.qi),
                ] {
                    members.push((name, json!(b64(value))));
                }
            }
        }
        Ok(SecretString::from(ordered_object(&members)))
    }

    /// Loads a private JWK (as printed by [`SigningKey::private_jwk`] or the Supabase CLI).
    /// Errors name the member at fault, never a value.
    pub fn from_private_jwk(jwk: &Value) -> Result<Self, PrivateJwkError> {
        let jwk = jwk
            .as_object()
            .ok_or(PrivateJwkError::new("not a JSON object"))?;
        let kty = str_member(jwk, "kty")?.ok_or(PrivateJwkError::new("no kty"))?;
        // The public half (line 2 of `keys generate`, or a JWKS entry) fails a later rule first,
        // key_ops lacking sign, which does not say what was given.
        let private_member = ["d", "p", "q", "dp", "dq", "qi"]
            .iter()
            .any(|member| jwk.contains_key(*member));
        if matches!(kty, "EC" | "OKP" | "RSA") && !private_member {
            return Err(PrivateJwkError::new(
                "this is a public key (it has no d); the private one is line 1 of \
                 `edgegate keys generate`",
            ));
        }
        let kid = str_member(jwk, "kid")?.ok_or(PrivateJwkError::new(
            "no kid (tokens name their key by kid)",
        ))?;
        if !kid_is_well_formed(kid) {
            return Err(PrivateJwkError::new(
                "kid is empty, too long or has control characters",
            ));
        }
        if str_member(jwk, "use")?.is_some_and(|u| u != "sig") {
            return Err(PrivateJwkError::new("use is not sig"));
        }
        if let Some(ops) = jwk.get("key_ops") {
            let ops = ops
                .as_array()
                .ok_or(PrivateJwkError::new("key_ops is not an array"))?;
            if !ops.iter().any(|op| op.as_str() == Some("sign")) {
                return Err(PrivateJwkError::new("key_ops lacks sign"));
            }
        }
        let implied = match (kty, str_member(jwk, "crv")?) {
            ("EC", Some("P-256")) => Alg::ES256,
            ("OKP", Some("Ed25519")) => Alg::EdDSA,
            ("RSA", _) => Alg::RS256,
            ("oct", _) => {
                return Err(PrivateJwkError::new(
                    "an oct key is a shared secret, not a signing key (HS256 tokens: --legacy)",
                ));
            }
            ("EC", _) => return Err(PrivateJwkError::new("unsupported curve (ES256 is P-256)")),
            ("OKP", _) => {
                return Err(PrivateJwkError::new("unsupported curve (EdDSA is Ed25519)"));
            }
            _ => return Err(PrivateJwkError::new("unsupported kty (EC, RSA or OKP)")),
        };
        if let Some(alg) = str_member(jwk, "alg")?
            && alg != implied.as_str()
        {
            return Err(PrivateJwkError::new(
                "alg is not ES256, RS256 or EdDSA, or does not agree with kty/crv",
            ));
        }
        let material = match implied {
            Alg::ES256 => {
                let d = fixed_member(jwk, "d", 32)?;
                let mut point = Vec::with_capacity(65);
                point.push(0x04);
                point.extend_from_slice(&fixed_member(jwk, "x", 32)?);
                point.extend_from_slice(&fixed_member(jwk, "y", 32)?);
                Material::Es256(
                    EcdsaKeyPair::from_private_key_and_public_key(
                        &ECDSA_P256_SHA256_FIXED_SIGNING,
                        &d,
                        &point,
                    )
                    .map_err(|_| PrivateJwkError::new("d, x and y are not one P-256 key pair"))?,
                )
            }
            Alg::EdDSA => {
                let d = fixed_member(jwk, "d", 32)?;
                let x = fixed_member(jwk, "x", 32)?;
                Material::EdDsa(
                    Ed25519KeyPair::from_seed_and_public_key(&d, &x).map_err(|_| {
                        PrivateJwkError::new("d and x are not one Ed25519 key pair")
                    })?,
                )
            }
            Alg::RS256 => Material::Rs256(rsa_from_jwk(jwk)?),
            Alg::HS256 => unreachable!("no kty implies HS256"),
        };
        Ok(Self {
            kid: kid.to_owned(),
            material,
        })
    }

    /// The raw signature of `message` (P1363 for ES256, PKCS#1 v1.5 for RS256).
    pub fn sign(&self, message: &[u8]) -> anyhow::Result<Vec<u8>> {
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

    /// The public key as SubjectPublicKeyInfo DER.
    pub fn public_der(&self) -> anyhow::Result<Vec<u8>> {
        let der = match &self.material {
            Material::Es256(key) => key.public_key().as_der().map(|d| d.as_ref().to_vec()),
            Material::EdDsa(key) => key.public_key().as_der().map(|d| d.as_ref().to_vec()),
            Material::Rs256(key) => key.public_key().as_der().map(|d| d.as_ref().to_vec()),
        };
        der.map_err(|_| anyhow::anyhow!("cannot encode the public key"))
    }

    /// A compact JWS of `claims` with header `{"alg","kid","typ":"JWT"}`.
    pub fn token(&self, claims: &Value) -> anyhow::Result<String> {
        let header = json!({"alg": self.alg().as_str(), "kid": self.kid, "typ": "JWT"});
        self.token_with_header(&header.to_string(), &claims.to_string())
    }

    /// A compact JWS of exactly these header and claims texts (tests build odd ones).
    pub fn token_with_header(&self, header: &str, claims: &str) -> anyhow::Result<String> {
        let input = format!("{}.{}", b64(header.as_bytes()), b64(claims.as_bytes()));
        let signature = self.sign(input.as_bytes())?;
        Ok(format!("{input}.{}", b64(&signature)))
    }
}

impl PrivateJwkError {
    fn new(reason: &'static str) -> Self {
        Self(reason.into())
    }
}

/// A JSON object with its members in this order (`serde_json` here sorts them).
fn ordered_object(members: &[(&str, Value)]) -> String {
    let members: Vec<String> = members
        .iter()
        .map(|(name, value)| format!("{}:{value}", Value::from(*name)))
        .collect();
    format!("{{{}}}", members.join(","))
}

fn str_member<'a>(
    jwk: &'a Map<String, Value>,
    name: &'static str,
) -> Result<Option<&'a str>, PrivateJwkError> {
    match jwk.get(name) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(PrivateJwkError(format!("{name} is not a string"))),
    }
}

/// A base64url member, decoded into memory that is wiped when dropped.
fn bytes_member(
    jwk: &Map<String, Value>,
    name: &'static str,
) -> Result<Zeroizing<Vec<u8>>, PrivateJwkError> {
    let text = str_member(jwk, name)?.ok_or_else(|| PrivateJwkError(format!("no {name}")))?;
    URL_SAFE_NO_PAD
        .decode(text)
        .map(Zeroizing::new)
        .map_err(|_| PrivateJwkError(format!("{name} is not base64url")))
}

/// A member that must decode to exactly `len` bytes (RFC 7518: EC and OKP members are
/// full length, leading zeros included).
fn fixed_member(
    jwk: &Map<String, Value>,
    name: &'static str,
    len: usize,
) -> Result<Zeroizing<Vec<u8>>, PrivateJwkError> {
    let bytes = bytes_member(jwk, name)?;
    if bytes.len() != len {
        return Err(PrivateJwkError(format!("{name} is not {len} bytes")));
    }
    Ok(bytes)
}

fn rsa_from_jwk(jwk: &Map<String, Value>) -> Result<aws_lc_rs::rsa::KeyPair, PrivateJwkError> {
    if jwk.contains_key("oth") {
        return Err(PrivateJwkError::new(
            "multi-prime RSA keys (oth) are not supported",
        ));
    }
    let n = bytes_member(jwk, "n")?;
    let e = bytes_member(jwk, "e")?;
    let (n, e) = (strip_leading_zeros(&n), strip_leading_zeros(&e));
    if !(2048..=8192).contains(&modulus_bits(n)) {
        return Err(PrivateJwkError::new(
            "n is not an RSA modulus of 2048 to 8192 bits",
        ));
    }
    let private = |name| {
        bytes_member(jwk, name).map_err(|_| {
            PrivateJwkError::new("an RSA private JWK needs d, p, q, dp, dq and qi, each base64url")
        })
    };
    let (d, p, q) = (private("d")?, private("p")?, private("q")?);
    let (dp, dq, qi) = (private("dp")?, private("dq")?, private("qi")?);
    let components = KeyPairComponents {
        public_key: PublicKeyComponents { n, e },
        d: d.as_slice(),
        p: p.as_slice(),
        q: q.as_slice(),
        dP: dp.as_slice(),
        dQ: dq.as_slice(),
        qInv: qi.as_slice(),
    };
    // aws-lc checks the whole key (RSA_check_key), so a wrong d or CRT value fails here.
    aws_lc_rs::rsa::KeyPair::from_components(&components)
        .map_err(|_| PrivateJwkError::new("n, e, d, p, q, dp, dq and qi are not one RSA key"))
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

#[cfg(test)]
mod tests;
