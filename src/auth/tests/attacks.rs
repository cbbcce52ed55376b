//! Known JWT attacks, each answered with the contract's code.

use super::util::*;
use crate::auth::error::{AuthError, Failure};
use crate::auth::keyring::KeyRing;
use crate::auth::verify::{Verified, verify};
use serde_json::{Value, json};

fn code(r: &Result<Verified, AuthError>) -> &'static str {
    match r {
        Ok(_) => "OK",
        Err(e) => e.code(),
    }
}

struct Fixture {
    es: TestKey,
    ring: KeyRing,
    now: i64,
}

fn fixture() -> Fixture {
    let es = TestKey::es256("es-1");
    let ring = ring(Some(LEGACY_SECRET), &[], &[es.public_jwk()]);
    Fixture {
        es,
        ring,
        now: now(),
    }
}

impl Fixture {
    fn check(&self, token: &str) -> Result<Verified, AuthError> {
        let r = verify(&self.ring, &settings(), token, self.now);
        if let Err(e) = &r {
            // Messages reach clients: never the token or a secret.
            let msg = e.message();
            assert!(
                (token.len() < 4 || !msg.contains(token))
                    && !msg.contains(std::str::from_utf8(LEGACY_SECRET).unwrap_or(""))
            );
            if let Some(sig) = token.rsplit('.').next().filter(|s| s.len() > 8) {
                assert!(!msg.contains(sig));
            }
        }
        r
    }
    fn es_token_with(&self, header: Value, claims: Value) -> String {
        self.es
            .token_with_header(&header.to_string(), &claims.to_string())
    }
}

const ASYM: &str = "UNAUTHORIZED_ASYMMETRIC_JWT";
const LEGACY: &str = "UNAUTHORIZED_LEGACY_JWT";
const FORMAT: &str = "UNAUTHORIZED_INVALID_JWT_FORMAT";
const UNSUPPORTED: &str = "UNAUTHORIZED_UNSUPPORTED_TOKEN_ALGORITHM";

#[test]
fn well_formed_tokens_pass() {
    let f = fixture();
    let ed = TestKey::eddsa("ed-1");
    let rs = TestKey::rs256("rs-1");
    let ring = ring(
        Some(LEGACY_SECRET),
        &[ed.public_jwk()],
        &[f.es.public_jwk(), rs.public_jwk()],
    );
    for key in [&f.es, &ed, &rs] {
        let v = verify(&ring, &settings(), &key.token(&claims(f.now)), f.now).expect("valid token");
        assert_eq!(v.alg, key.alg());
        assert_eq!(v.kid.as_deref(), Some(key.kid.as_str()));
        assert_eq!(v.role.as_deref(), Some("authenticated"));
        assert_eq!(v.exp, f.now + 3600);
    }
    // HS256 goes to the legacy secret whatever its kid, even one that names a JWKS key.
    for header in [
        json!({"alg":"HS256","typ":"JWT"}),
        json!({"alg":"HS256","kid":"es-1"}),
        json!({"alg":"HS256","kid":"gone"}),
    ] {
        let t = hs256_token(
            LEGACY_SECRET,
            &header.to_string(),
            &claims(f.now).to_string(),
        );
        let v = verify(&ring, &settings(), &t, f.now).expect("legacy token");
        assert_eq!(v.source, crate::auth::KeySource::LegacySecret);
    }
}

#[test]
fn alg_none_in_every_casing_is_unsupported() {
    let f = fixture();
    for alg in ["none", "None", "NONE", "nOnE", "NonE"] {
        let header = b64(json!({"alg":alg,"kid":"es-1"}).to_string().as_bytes());
        let body = b64(claims(f.now).to_string().as_bytes());
        for sig in ["", "AAAA"] {
            let r = f.check(&format!("{header}.{body}.{sig}"));
            assert_eq!(code(&r), UNSUPPORTED, "alg {alg} sig {sig:?}");
        }
    }
    // Near misses of allowed names are not allowed either.
    for alg in [
        "hs256", "es256", "ES256 ", "EDDSA", "Ed25519", "PS256", "HS512", "",
    ] {
        let t = f.es_token_with(json!({"alg":alg,"kid":"es-1"}), claims(f.now));
        assert_eq!(code(&f.check(&t)), UNSUPPORTED, "alg {alg:?}");
    }
    let t = f.es_token_with(json!({"alg":["ES256"],"kid":"es-1"}), claims(f.now));
    assert_eq!(code(&f.check(&t)), UNSUPPORTED);
}

#[test]
fn hs256_signed_with_a_public_key_is_refused() {
    let f = fixture();
    let jwk = f.es.public_jwk();
    let point = {
        let mut p = vec![4u8];
        p.extend(
            base64::Engine::decode(
                &base64::engine::general_purpose::URL_SAFE_NO_PAD,
                jwk["x"].as_str().unwrap_or(""),
            )
            .unwrap_or_default(),
        );
        p.extend(
            base64::Engine::decode(
                &base64::engine::general_purpose::URL_SAFE_NO_PAD,
                jwk["y"].as_str().unwrap_or(""),
            )
            .unwrap_or_default(),
        );
        p
    };
    let secrets: Vec<(&str, Vec<u8>)> = vec![
        ("pem", f.es.public_pem().into_bytes()),
        ("der", f.es.public_der()),
        ("jwk json", jwk.to_string().into_bytes()),
        ("raw point", point),
    ];
    let no_legacy = ring(None, &[], std::slice::from_ref(&jwk));
    for (what, secret) in secrets {
        let t = hs256_token(
            &secret,
            &json!({"alg":"HS256","kid":"es-1"}).to_string(),
            &claims(f.now).to_string(),
        );
        let r = f.check(&t);
        assert_eq!(r, Err(AuthError::Legacy(Failure::BadSignature)), "{what}");
        assert_eq!(code(&r), LEGACY);
        let r = verify(&no_legacy, &settings(), &t, f.now);
        assert_eq!(r, Err(AuthError::LegacyRevoked), "{what}");
        assert_eq!(code(&r), LEGACY);
    }
}

#[test]
fn es256_zero_signature_is_refused() {
    let f = fixture();
    let good = f.es.token(&claims(f.now));
    assert!(f.check(&good).is_ok());
    let input = good.rsplit_once('.').map(|(i, _)| i).unwrap_or_default();
    let r = f.check(&format!("{input}.{}", b64(&[0u8; 64])));
    assert_eq!(r, Err(AuthError::Asymmetric(Failure::BadSignature)));
    // r = s = 0 padded to any other length is refused too.
    assert_eq!(code(&f.check(&format!("{input}.{}", b64(&[0u8; 8])))), ASYM);
}

/// P1363 (r || s) → ASN.1 DER `SEQUENCE { INTEGER r, INTEGER s }`.
fn p1363_to_der(sig: &[u8]) -> Vec<u8> {
    fn int(mut v: &[u8]) -> Vec<u8> {
        while v.len() > 1 && v[0] == 0 {
            v = &v[1..];
        }
        let mut out = vec![0x02];
        let pad = v[0] & 0x80 != 0;
        out.push((v.len() + usize::from(pad)) as u8);
        if pad {
            out.push(0);
        }
        out.extend_from_slice(v);
        out
    }
    let mut body = int(&sig[..32]);
    body.extend(int(&sig[32..]));
    let mut der = vec![0x30, body.len() as u8];
    der.extend(body);
    der
}

#[test]
fn der_encoded_es256_signature_is_refused() {
    let f = fixture();
    let good = f.es.token(&claims(f.now));
    let (input, sig) = good.rsplit_once('.').expect("three parts");
    let raw = base64::Engine::decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, sig)
        .expect("b64");
    let der = p1363_to_der(&raw);
    // The DER form is a correct signature for an ASN.1 verifier: only the encoding is wrong.
    let point = {
        let jwk = f.es.public_jwk();
        let mut p = vec![4u8];
        for c in ["x", "y"] {
            p.extend(
                base64::Engine::decode(
                    &base64::engine::general_purpose::URL_SAFE_NO_PAD,
                    jwk[c].as_str().unwrap_or(""),
                )
                .expect("b64"),
            );
        }
        p
    };
    aws_lc_rs::signature::UnparsedPublicKey::new(
        &aws_lc_rs::signature::ECDSA_P256_SHA256_ASN1,
        &point,
    )
    .verify(input.as_bytes(), &der)
    .expect("DER form verifies under ASN.1");
    let r = f.check(&format!("{input}.{}", b64(&der)));
    assert_eq!(r, Err(AuthError::Asymmetric(Failure::BadSignature)));
}

#[test]
fn key_supplying_header_members_are_refused() {
    let f = fixture();
    let attacker = TestKey::es256("es-1");
    for (member, value) in [
        ("jwk", attacker.public_jwk()),
        ("jku", json!("https://attacker.example/jwks.json")),
        ("x5u", json!("https://attacker.example/cert.pem")),
        ("x5c", json!(["MIIB"])),
    ] {
        // Signed by the attacker's key that the header points at…
        let mut header = json!({"alg":"ES256","kid":"es-1"});
        header[member] = value.clone();
        let t = attacker.token_with_header(&header.to_string(), &claims(f.now).to_string());
        assert_eq!(code(&f.check(&t)), ASYM, "{member} attacker-signed");
        // …and even when the signature is ours: such tokens are refused outright.
        let t = f.es_token_with(header, claims(f.now));
        assert_eq!(
            f.check(&t),
            Err(AuthError::Asymmetric(Failure::RejectedHeader)),
            "{member}"
        );
    }
}

#[test]
fn hostile_kids() {
    let f = fixture();
    let t = f.es_token_with(
        json!({"alg":"ES256","kid":"../../../../etc/passwd"}),
        claims(f.now),
    );
    assert_eq!(f.check(&t), Err(AuthError::UnknownKid));
    assert_eq!(code(&f.check(&t)), ASYM);

    let t = f.es_token_with(
        json!({"alg":"ES256","kid":"k".repeat(10 * 1024)}),
        claims(f.now),
    );
    assert_eq!(
        code(&f.check(&t)),
        FORMAT,
        "10 KB kid exceeds the token cap"
    );

    let t = f.es_token_with(json!({"alg":"ES256","kid":"k".repeat(1000)}), claims(f.now));
    assert_eq!(
        f.check(&t),
        Err(AuthError::Asymmetric(Failure::MalformedKid))
    );

    for kid in [
        "es-1\r\nX-Injected: 1",
        "es-1\n",
        "\u{0}es-1",
        "",
        "es-1\u{202e}",
        "\u{200b}es-1",
    ] {
        let t = f.es_token_with(json!({"alg":"ES256","kid":kid}), claims(f.now));
        assert_eq!(
            f.check(&t),
            Err(AuthError::Asymmetric(Failure::MalformedKid)),
            "{kid:?}"
        );
        let t = hs256_token(
            LEGACY_SECRET,
            &json!({"alg":"HS256","kid":kid}).to_string(),
            &claims(f.now).to_string(),
        );
        assert_eq!(code(&f.check(&t)), LEGACY, "{kid:?}");
    }
    let t = f.es_token_with(json!({"alg":"ES256","kid":42}), claims(f.now));
    assert_eq!(code(&f.check(&t)), ASYM);
    let t = f.es_token_with(json!({"alg":"ES256"}), claims(f.now));
    assert_eq!(f.check(&t), Err(AuthError::Asymmetric(Failure::MissingKid)));
}

#[test]
fn crit_is_refused() {
    let f = fixture();
    let t = f.es_token_with(
        json!({"alg":"ES256","kid":"es-1","crit":["exp"],"exp":1}),
        claims(f.now),
    );
    assert_eq!(
        f.check(&t),
        Err(AuthError::Asymmetric(Failure::RejectedHeader))
    );
    let t = hs256_token(
        LEGACY_SECRET,
        r#"{"alg":"HS256","crit":["b64"],"b64":false}"#,
        &claims(f.now).to_string(),
    );
    assert_eq!(code(&f.check(&t)), LEGACY);
}

#[test]
fn duplicate_json_members_are_refused() {
    let f = fixture();
    let body = claims(f.now).to_string();
    let t =
        f.es.token_with_header(r#"{"alg":"ES256","kid":"es-1","alg":"ES256"}"#, &body);
    assert_eq!(code(&f.check(&t)), FORMAT);
    let t =
        f.es.token_with_header(r#"{"alg":"ES256","kid":"nope","kid":"es-1"}"#, &body);
    assert_eq!(code(&f.check(&t)), FORMAT);
    let exp = f.now + 3600;
    let dup_claims = format!(
        r#"{{"iss":"{ISS}","aud":"authenticated","exp":{exp},"role":"authenticated","role":"service_role"}}"#
    );
    let t =
        f.es.token_with_header(r#"{"alg":"ES256","kid":"es-1"}"#, &dup_claims);
    assert_eq!(
        f.check(&t),
        Err(AuthError::Asymmetric(Failure::MalformedClaims))
    );
    let t = hs256_token(LEGACY_SECRET, r#"{"alg":"HS256"}"#, &dup_claims);
    assert_eq!(
        f.check(&t),
        Err(AuthError::Legacy(Failure::MalformedClaims))
    );
    // The same claims without the duplicate pass: the test can fail.
    let ok =
        format!(r#"{{"iss":"{ISS}","aud":"authenticated","exp":{exp},"role":"service_role"}}"#);
    assert!(
        f.check(
            &f.es
                .token_with_header(r#"{"alg":"ES256","kid":"es-1"}"#, &ok)
        )
        .is_ok()
    );
    // Past sixteen members the check sorts the names instead of comparing them pairwise:
    // a duplicate there is refused too, in the header, the claims and a nested object.
    let filler: String = (0..20).map(|i| format!(r#""x{i}":{i},"#)).collect();
    let many_claims = |extra: &str| {
        format!(
            r#"{{{filler}"iss":"{ISS}","aud":"authenticated","exp":{exp},"role":"authenticated"{extra}}}"#
        )
    };
    let header = format!(r#"{{{filler}"alg":"ES256","kid":"es-1"}}"#);
    let nested = format!(r#","app_metadata":{{{filler}"provider":"email"}}"#);
    assert!(
        f.check(&f.es.token_with_header(&header, &many_claims(&nested)))
            .is_ok()
    );
    let t =
        f.es.token_with_header(&header, &many_claims(r#","role":"service_role""#));
    assert_eq!(
        f.check(&t),
        Err(AuthError::Asymmetric(Failure::MalformedClaims))
    );
    let t = f.es.token_with_header(&header, &many_claims(r#","x3":3"#));
    assert_eq!(
        f.check(&t),
        Err(AuthError::Asymmetric(Failure::MalformedClaims))
    );
    let t = f.es.token_with_header(
        &format!(r#"{{{filler}"alg":"ES256","kid":"es-1","x19":0}}"#),
        &many_claims(""),
    );
    assert_eq!(code(&f.check(&t)), FORMAT);
    let nested_twice = format!(r#","app_metadata":{{{filler}"provider":"email","x0":1}}"#);
    let t = f.es.token_with_header(&header, &many_claims(&nested_twice));
    assert_eq!(
        f.check(&t),
        Err(AuthError::Asymmetric(Failure::MalformedClaims))
    );
}

#[test]
fn claim_types_and_times() {
    let f = fixture();
    let n = f.now;
    let with = |patch: Value| {
        let mut c = claims(n);
        for (k, v) in patch.as_object().cloned().unwrap_or_default() {
            if v.is_null() {
                c.as_object_mut().map(|m| m.remove(&k));
            } else {
                c[k] = v;
            }
        }
        f.check(&f.es.token(&c))
    };
    assert_eq!(
        with(json!({"exp": (n + 3600).to_string()})),
        Err(AuthError::Asymmetric(Failure::MalformedClaims))
    );
    assert_eq!(
        with(json!({"exp": null})),
        Err(AuthError::Asymmetric(Failure::MissingExp))
    );
    assert_eq!(
        with(json!({"nbf": "0"})),
        Err(AuthError::Asymmetric(Failure::MalformedClaims))
    );
    assert_eq!(
        with(json!({"iat": true})),
        Err(AuthError::Asymmetric(Failure::MalformedClaims))
    );
    // Leeway is 30 s: just inside passes, just outside fails.
    assert!(with(json!({"exp": n - 29})).is_ok());
    assert_eq!(
        with(json!({"exp": n - 31})),
        Err(AuthError::Asymmetric(Failure::Expired))
    );
    assert!(with(json!({"nbf": n + 29})).is_ok());
    assert_eq!(
        with(json!({"nbf": n + 60})),
        Err(AuthError::Asymmetric(Failure::NotYetValid))
    );
    assert!(with(json!({"iat": n + 29})).is_ok());
    assert_eq!(
        with(json!({"iat": n + 60})),
        Err(AuthError::Asymmetric(Failure::IssuedInFuture))
    );
    assert!(
        with(json!({"exp": (n + 100) as f64 + 0.5})).is_ok(),
        "fractional NumericDate"
    );
    // Issuer and audience.
    assert!(with(json!({"iss": "supabase"})).is_ok());
    assert_eq!(
        with(json!({"iss": "https://evil.supabase.co/auth/v1"})),
        Err(AuthError::Asymmetric(Failure::WrongIssuer))
    );
    assert_eq!(
        with(json!({"iss": null})),
        Err(AuthError::Asymmetric(Failure::WrongIssuer))
    );
    assert_eq!(
        with(json!({"aud": "service"})),
        Err(AuthError::Asymmetric(Failure::WrongAudience))
    );
    assert_eq!(
        with(json!({"aud": ["a", "b"]})),
        Err(AuthError::Asymmetric(Failure::WrongAudience))
    );
    assert!(with(json!({"aud": ["a", "authenticated"]})).is_ok());
    assert!(
        with(json!({"aud": null})).is_ok(),
        "aud is checked only when present"
    );
    assert_eq!(
        with(json!({"aud": 7})),
        Err(AuthError::Asymmetric(Failure::MalformedClaims))
    );
    assert_eq!(
        with(json!({"sub": 7})),
        Err(AuthError::Asymmetric(Failure::MalformedClaims))
    );
    // Legacy tokens fail with the legacy code.
    let mut c = claims(n);
    c["exp"] = json!(n - 100);
    let t = hs256_token(LEGACY_SECRET, r#"{"alg":"HS256"}"#, &c.to_string());
    assert_eq!(f.check(&t), Err(AuthError::Legacy(Failure::Expired)));
}

#[test]
fn alg_is_bound_to_the_key() {
    let f = fixture();
    let ed = TestKey::eddsa("ed-1");
    let ring = ring(None, &[], &[f.es.public_jwk(), ed.public_jwk()]);
    // An EdDSA signature presented under the ES256 key's kid, and vice versa.
    let t = ed.token_with_header(
        r#"{"alg":"EdDSA","kid":"es-1"}"#,
        &claims(f.now).to_string(),
    );
    assert_eq!(
        verify(&ring, &settings(), &t, f.now),
        Err(AuthError::Asymmetric(Failure::AlgorithmMismatch))
    );
    let t = f.es.token_with_header(
        r#"{"alg":"ES256","kid":"ed-1"}"#,
        &claims(f.now).to_string(),
    );
    assert_eq!(
        verify(&ring, &settings(), &t, f.now),
        Err(AuthError::Asymmetric(Failure::AlgorithmMismatch))
    );
}

#[test]
fn oversized_and_malformed_tokens() {
    let f = fixture();
    let big = format!(
        "{}.{}.{}",
        "a".repeat(32 * 1024),
        "b".repeat(32 * 1024),
        "c".repeat(10)
    );
    assert!(big.len() >= 64 * 1024);
    assert_eq!(
        f.check(&big),
        Err(AuthError::InvalidFormat("token is too large"))
    );
    let mut c = claims(f.now);
    c["pad"] = json!("x".repeat(9000));
    assert_eq!(
        code(&f.check(&f.es.token(&c))),
        FORMAT,
        "a correctly signed token over 8 KiB"
    );
    for t in [
        "",
        "abc",
        "a.b",
        "a.b.c.d",
        "e30.e30.e30=",
        "e30 .e30.e30",
        ".e30.e30",
        "e30.e30.e30\n",
    ] {
        assert_eq!(code(&f.check(t)), FORMAT, "{t:?}");
    }
    // Header that is JSON but not an object, or not JSON.
    for header in ["[]", "\"ES256\"", "{", "null"] {
        let t = format!(
            "{}.{}.{}",
            b64(header.as_bytes()),
            b64(b"{}"),
            b64(&[1; 64])
        );
        assert_eq!(code(&f.check(&t)), FORMAT, "{header}");
    }
}

#[tokio::test]
async fn sixty_four_kib_token_through_the_authenticator() {
    let auth = crate::auth::Authenticator::new(
        crate::auth::AuthSettings {
            legacy_secrets: vec![secrecy::SecretString::from(
                std::str::from_utf8(LEGACY_SECRET).unwrap_or("x").to_owned(),
            )],
            ..Default::default()
        },
        reqwest::Client::new(),
    );
    let big = "a".repeat(64 * 1024);
    assert_eq!(
        auth.verify_bearer(&big).await.map_err(|e| e.code()),
        Err(FORMAT)
    );
    assert_eq!(
        auth.verify_bearer("").await.map_err(|e| e.code()),
        Err("UNAUTHORIZED_NO_AUTH_HEADER")
    );
}

/// The verified-token cache finds an entry by its token's signature: a caller who has a
/// victim's signature, with any other header or payload, is verified (and refused), never
/// answered from the victim's entry.
#[tokio::test]
async fn a_cached_tokens_signature_under_another_header_or_payload_is_refused() {
    let es = TestKey::es256("es-1");
    let auth = crate::auth::Authenticator::new(
        crate::auth::AuthSettings {
            legacy_secrets: vec![secrecy::SecretString::from(
                std::str::from_utf8(LEGACY_SECRET).unwrap_or("x").to_owned(),
            )],
            inline_jwks: vec![es.public_jwk()],
            issuers: Some(vec![ISS.to_owned()]),
            ..Default::default()
        },
        reqwest::Client::new(),
    );
    let now = now();
    let victim = claims(now);
    let mut attacker = victim.clone();
    attacker["role"] = json!("service_role");
    let header = json!({"alg": "HS256", "typ": "JWT"}).to_string();
    let cases = [
        (es.token(&victim), es.token(&attacker), ASYM),
        (
            hs256_token(LEGACY_SECRET, &header, &victim.to_string()),
            hs256_token(LEGACY_SECRET, &header, &attacker.to_string()),
            LEGACY,
        ),
    ];
    for (good, other, refused) in cases {
        for _ in 0..2 {
            let verified = auth.verify_bearer(&good).await.map_err(|e| e.code());
            assert_eq!(verified.map(|v| v.role), Ok(Some("authenticated".into())));
        }
        let (rest, signature) = good.rsplit_once('.').expect("three parts");
        let (other_rest, _) = other.rsplit_once('.').expect("three parts");
        let (header_part, _) = rest.split_once('.').expect("three parts");
        for forged in [
            format!("{other_rest}.{signature}"),
            format!("{}.{signature}", rest.replace('.', "")),
            format!("{header_part}.{signature}"),
            format!(".{signature}"),
            signature.to_owned(),
        ] {
            let answer = auth.verify_bearer(&forged).await.map_err(|e| e.code());
            assert!(
                answer.is_err(),
                "{forged} was answered from the cache: {answer:?}"
            );
            if forged.starts_with(other_rest) {
                assert_eq!(answer.err(), Some(refused), "{forged}");
            }
        }
    }
    assert_eq!(
        auth.cache().hits(),
        2,
        "one hit a token, none for a forgery"
    );
}

/// A NumericDate may be fractional (RFC 7519 §2). Flooring every one made `nbf` (and `iat`, a
/// token's start as well) of n + 0.5 read as n, so with no leeway the token passed at n, up to a
/// second before it is valid. `nbf` and `iat` are rounded up and `exp` down: no fraction makes a
/// token valid sooner or longer than it says, afresh or from the cache (which keeps the rounded
/// start). Values out of range stay malformed claims.
#[test]
fn a_fractional_time_never_makes_a_token_valid_sooner_or_longer() {
    let f = fixture();
    let n = f.now;
    let exact = crate::auth::verify::VerifySettings {
        leeway: std::time::Duration::ZERO,
        ..settings()
    };
    let token = |patch: Value| {
        let mut c = claims(n - 100);
        for (k, v) in patch.as_object().cloned().unwrap_or_default() {
            c[k] = v;
        }
        f.es.token(&c)
    };
    let at = |token: &str, now| verify(&f.ring, &exact, token, now);
    let half = |t: i64| t as f64 + 0.5;

    let not_before = token(json!({"nbf": half(n)}));
    assert_eq!(
        at(&not_before, n),
        Err(AuthError::Asymmetric(Failure::NotYetValid)),
        "nbf n + 0.5 at n"
    );
    let issued = token(json!({"iat": half(n)}));
    assert_eq!(
        at(&issued, n),
        Err(AuthError::Asymmetric(Failure::IssuedInFuture)),
        "iat n + 0.5 at n"
    );
    let cache = crate::auth::cache::TokenCache::new(100);
    for token in [&not_before, &issued] {
        let verified = at(token, n + 1).expect("valid from n + 1");
        assert_eq!(verified.nbf, Some(n + 1));
        let key = cache.key(token).expect("a key");
        cache.insert(&key, 1, &verified, n + 1);
        assert!(cache.get(&key, 1, n + 1, 0).is_some());
        assert!(
            cache.get(&key, 1, n, 0).is_none(),
            "served from the cache at n"
        );
    }
    let ending = token(json!({"exp": half(n)}));
    assert!(at(&ending, n - 1).is_ok());
    assert_eq!(
        at(&ending, n),
        Err(AuthError::Asymmetric(Failure::Expired)),
        "exp n + 0.5 at n"
    );
    // Negative and whole fractions round as numbers do; values out of range are refused.
    assert!(at(&token(json!({"nbf": -0.5, "iat": -1.5})), n).is_ok());
    assert_eq!(
        at(&token(json!({"nbf": half(n) - 1.0})), n).map(|v| v.nbf),
        Ok(Some(n))
    );
    for name in ["exp", "nbf", "iat"] {
        for value in [
            json!(1e15),
            json!(-1e15),
            json!(1e300),
            json!(-1e300),
            json!(u64::MAX),
        ] {
            assert_eq!(
                at(&token(json!({ name: value })), n),
                Err(AuthError::Asymmetric(Failure::MalformedClaims)),
                "{name}: {value}"
            );
        }
    }
}

/// A cached token is served only while a fresh check would pass: `iat` as well as `exp` and
/// `nbf`. A token issued "in the future" by a clock that was ahead (accepted then, within the
/// leeway of that clock) was still answered from the cache after the clock was set back, while
/// the same token verified afresh (after a restart, or evicted) was refused as issued in the
/// future: one token, two answers (a black-box tester with libfaketime).
#[test]
fn a_cached_token_is_not_served_before_its_iat() {
    let f = fixture();
    let ahead = f.now + 86_400;
    for (what, token) in [
        ("ES256", f.es.token(&claims(ahead))),
        (
            "HS256",
            hs256_token(
                LEGACY_SECRET,
                &json!({"alg": "HS256", "typ": "JWT"}).to_string(),
                &claims(ahead).to_string(),
            ),
        ),
    ] {
        let verified = verify(&f.ring, &settings(), &token, ahead).expect("valid while ahead");
        let cache = crate::auth::cache::TokenCache::new(100);
        let key = cache.key(&token).expect("a key");
        cache.insert(&key, 1, &verified, ahead);
        assert!(cache.get(&key, 1, ahead, 30).is_some(), "{what}");
        let afresh = verify(&f.ring, &settings(), &token, f.now);
        assert!(
            matches!(
                afresh,
                Err(AuthError::Asymmetric(Failure::IssuedInFuture)
                    | AuthError::Legacy(Failure::IssuedInFuture))
            ),
            "{what}: refused afresh: {afresh:?}"
        );
        assert!(
            cache.get(&key, 1, f.now, 30).is_none(),
            "{what}: served from the cache before its iat"
        );
    }
}
