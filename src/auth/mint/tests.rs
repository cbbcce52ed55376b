//! Private JWKs: export in the Supabase CLI's shape, import, and tokens that the real verifier
//! accepts; malformed keys refused without echoing private members.

use super::*;
use crate::auth::KeySource;
use crate::auth::tests::util::{ISS, now, ring, settings};
use secrecy::ExposeSecret as _;

const ALGS: [Alg; 3] = [Alg::ES256, Alg::RS256, Alg::EdDSA];

fn private_value(key: &SigningKey) -> Value {
    serde_json::from_str(key.private_jwk().unwrap().expose_secret()).unwrap()
}

/// The member names of a JSON object text, in the order written.
fn member_order(text: &str) -> Vec<String> {
    let object: Value = serde_json::from_str(text).unwrap();
    let mut names: Vec<(usize, String)> = object
        .as_object()
        .unwrap()
        .keys()
        .map(|name| (text.find(&format!("\"{name}\":")).unwrap(), name.clone()))
        .collect();
    names.sort();
    names.into_iter().map(|(_, name)| name).collect()
}

/// Verifies a token with a ring that trusts exactly `public_jwk`, as the service does.
fn verify_with(public_jwk: &Value, token: &str) -> crate::auth::Verified {
    let ring = ring(None, &[], std::slice::from_ref(public_jwk));
    crate::auth::verify(&ring, &settings(), token, now()).expect("the token verifies")
}

#[test]
fn generate_export_import_sign_and_verify_for_every_algorithm() {
    for alg in ALGS {
        let original = SigningKey::generate(alg).unwrap();
        let loaded = SigningKey::from_private_jwk(&private_value(&original)).unwrap();
        assert_eq!(loaded.kid(), original.kid());
        assert_eq!(loaded.alg(), alg);
        assert_eq!(loaded.public_jwk(), original.public_jwk(), "{alg:?}");

        let claims = user_claims(ISS, "authenticated", "user-1", now(), 3600);
        let verified = verify_with(&original.public_jwk(), &loaded.token(&claims).unwrap());
        assert_eq!(verified.source, KeySource::SigningKey);
        assert_eq!(verified.kid.as_deref(), Some(original.kid()));
        assert_eq!(verified.alg, alg.as_str());
        assert_eq!(verified.sub.as_deref(), Some("user-1"));

        // And the other way: a token from the original key verifies with the loaded public key.
        let token = original.token(&claims).unwrap();
        verify_with(&loaded.public_jwk(), &token);
    }
}

#[test]
fn a_token_from_another_key_with_the_same_kid_is_refused() {
    for alg in ALGS {
        let trusted = SigningKey::generate_with_kid(alg, "same").unwrap();
        let impostor = SigningKey::generate_with_kid(alg, "same").unwrap();
        let token = impostor
            .token(&user_claims(ISS, "authenticated", "u", now(), 3600))
            .unwrap();
        let ring = ring(None, &[], &[trusted.public_jwk()]);
        assert!(crate::auth::verify(&ring, &settings(), &token, now()).is_err());
    }
}

#[test]
fn private_jwks_have_the_supabase_cli_members_in_its_order() {
    let expected: [(Alg, &[&str]); 3] = [
        (Alg::ES256, &["d", "crv", "x", "y"]),
        (Alg::RS256, &["n", "e", "d", "p", "q", "dp", "dq", "qi"]),
        (Alg::EdDSA, &["d", "crv", "x"]),
    ];
    for (alg, private_members) in expected {
        let key = SigningKey::generate(alg).unwrap();
        let text = key.private_jwk().unwrap();
        let text = text.expose_secret();
        assert!(!text.contains('\n'), "one line");
        let mut want = vec!["kty", "kid", "use", "key_ops", "alg", "ext"];
        want.extend_from_slice(private_members);
        assert_eq!(member_order(text), want, "{alg:?}");

        let jwk: Value = serde_json::from_str(text).unwrap();
        assert_eq!(jwk["use"], "sig");
        assert_eq!(jwk["key_ops"], json!(["sign", "verify"]));
        assert_eq!(jwk["alg"], alg.as_str());
        assert_eq!(jwk["ext"], true);
        let kid = uuid::Uuid::parse_str(jwk["kid"].as_str().unwrap()).unwrap();
        assert_eq!(kid.get_version_num(), 4);
        let len = |name: &str| {
            URL_SAFE_NO_PAD
                .decode(jwk[name].as_str().unwrap())
                .unwrap()
                .len()
        };
        match alg {
            Alg::ES256 => {
                assert_eq!(jwk["kty"], "EC");
                assert_eq!(jwk["crv"], "P-256");
                assert_eq!((len("d"), len("x"), len("y")), (32, 32, 32));
            }
            Alg::EdDSA => {
                assert_eq!(jwk["kty"], "OKP");
                assert_eq!(jwk["crv"], "Ed25519");
                assert_eq!((len("d"), len("x")), (32, 32));
            }
            Alg::RS256 => {
                assert_eq!(jwk["kty"], "RSA");
                assert_eq!(jwk["e"], "AQAB");
                // n of a 2048-bit key always has its top bit set; d, like every other member,
                // is minimal (RFC 7518 §6.3.2) and so one key in 256 or so has a 255-byte d.
                assert_eq!(len("n"), 256);
                assert!((250..=256).contains(&len("d")), "d: {} bytes", len("d"));
                for name in ["d", "p", "q", "dp", "dq", "qi"] {
                    let bytes = URL_SAFE_NO_PAD.decode(jwk[name].as_str().unwrap()).unwrap();
                    let most = if name == "d" { 256 } else { 128 };
                    assert!(bytes.len() <= most && bytes[0] != 0, "{name}: minimal");
                }
            }
            Alg::HS256 => unreachable!(),
        }
    }
}

#[test]
fn public_jwks_carry_no_private_member() {
    for alg in ALGS {
        let key = SigningKey::generate(alg).unwrap();
        let jwks = key.public_jwks();
        let public = jwks["keys"][0].as_object().unwrap();
        for private in ["d", "p", "q", "dp", "dq", "qi", "oth", "k"] {
            assert!(!public.contains_key(private), "{alg:?} {private}");
        }
        assert_eq!(public["key_ops"], json!(["verify"]));
        assert_eq!(jwks["keys"].as_array().unwrap().len(), 1);
    }
}

/// RFC 8037 A.1 and A.4: Ed25519 is deterministic, so the signature must be the RFC's.
#[test]
fn the_rfc_8037_ed25519_key_loads_and_signs_as_the_rfc_says() {
    let key = SigningKey::from_private_jwk(&json!({
        "kty": "OKP", "crv": "Ed25519", "kid": "rfc8037",
        "d": "nWGxne_9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A",
        "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo",
    }))
    .unwrap();
    assert_eq!(key.alg(), Alg::EdDSA);
    let signature = key
        .sign(b"eyJhbGciOiJFZERTQSJ9.RXhhbXBsZSBvZiBFZDI1NTE5IHNpZ25pbmc")
        .unwrap();
    assert_eq!(
        b64(&signature),
        "hgyY0il_MGCjP0JzlnLWG1PPOt7-09PGcvMg3AIbQR6dWbhijcNR4ki4iylGjg5BhVsPt9g7sVvpAr_MuM0KAg"
    );
}

fn patched(jwk: &Value, patch: Value) -> Value {
    let mut jwk = jwk.clone();
    for (name, value) in patch.as_object().unwrap() {
        if value.is_null() {
            jwk.as_object_mut().unwrap().remove(name);
        } else {
            jwk[name] = value.clone();
        }
    }
    jwk
}

/// Loads `jwk` expecting a refusal whose message holds `reason` and none of the private members.
fn refused(jwk: &Value, reason: &str) {
    let err = SigningKey::from_private_jwk(jwk).expect_err(reason);
    let message = err.to_string();
    assert!(message.contains(reason), "{message:?} lacks {reason:?}");
    assert!(message.starts_with("private JWK: "), "{message}");
    for name in ["d", "p", "q", "dp", "dq", "qi"] {
        if let Some(secret) = jwk.get(name).and_then(Value::as_str)
            && secret.len() > 8
        {
            assert!(!message.contains(secret), "{name} leaked: {message}");
            assert!(
                !format!("{err:?}").contains(secret),
                "{name} leaked in Debug"
            );
        }
    }
}

#[test]
fn malformed_private_jwks_are_refused_with_the_member_at_fault() {
    let es = private_value(&SigningKey::generate(Alg::ES256).unwrap());
    let ed = private_value(&SigningKey::generate(Alg::EdDSA).unwrap());
    let rs = private_value(&SigningKey::generate(Alg::RS256).unwrap());
    let other_es = private_value(&SigningKey::generate(Alg::ES256).unwrap());
    let other_ed = private_value(&SigningKey::generate(Alg::EdDSA).unwrap());
    let other_rs = private_value(&SigningKey::generate(Alg::RS256).unwrap());

    let cases = [
        (json!([]), "not a JSON object"),
        (patched(&es, json!({"kty": null})), "no kty"),
        (patched(&es, json!({"kty": 1})), "kty is not a string"),
        (patched(&es, json!({"kid": null})), "no kid"),
        (patched(&es, json!({"kid": ""})), "kid is empty"),
        (patched(&es, json!({"use": "enc"})), "use is not sig"),
        (
            patched(&es, json!({"key_ops": ["verify"]})),
            "key_ops lacks sign",
        ),
        (
            patched(&es, json!({"key_ops": "sign"})),
            "key_ops is not an array",
        ),
        (patched(&es, json!({"alg": "RS256"})), "does not agree"),
        (patched(&es, json!({"alg": "HS256"})), "does not agree"),
        (patched(&es, json!({"crv": "P-384"})), "unsupported curve"),
        (patched(&ed, json!({"crv": "X25519"})), "unsupported curve"),
        (
            patched(&es, json!({"kty": "oct", "k": "c2VjcmV0"})),
            "--legacy",
        ),
        (patched(&es, json!({"kty": "DSA"})), "unsupported kty"),
        (patched(&es, json!({"d": null})), "this is a public key"),
        (patched(&ed, json!({"d": null})), "this is a public key"),
        (
            patched(
                &rs,
                json!({"d": null, "p": null, "q": null, "dp": null, "dq": null, "qi": null}),
            ),
            "line 1 of `edgegate keys generate`",
        ),
        (
            patched(&es, json!({"d": "not base64url!"})),
            "d is not base64url",
        ),
        (patched(&es, json!({"d": "AAAA"})), "d is not 32 bytes"),
        (patched(&es, json!({"y": null})), "no y"),
        (
            patched(&es, json!({"d": other_es["d"]})),
            "not one P-256 key pair",
        ),
        (
            patched(&es, json!({"x": other_es["x"]})),
            "not one P-256 key pair",
        ),
        (
            patched(&ed, json!({"d": other_ed["d"]})),
            "not one Ed25519 key pair",
        ),
        (patched(&ed, json!({"x": null})), "no x"),
        (
            patched(&rs, json!({"p": null})),
            "needs d, p, q, dp, dq and qi",
        ),
        (
            patched(&rs, json!({"qi": "***"})),
            "needs d, p, q, dp, dq and qi",
        ),
        (
            patched(&rs, json!({"d": other_rs["d"]})),
            "are not one RSA key",
        ),
        (
            patched(&rs, json!({"dq": other_rs["dq"]})),
            "are not one RSA key",
        ),
        (
            patched(&rs, json!({"n": other_rs["n"]})),
            "are not one RSA key",
        ),
        (
            patched(&rs, json!({"n": b64(&[0xff; 128])})),
            "2048 to 8192 bits",
        ),
        (patched(&rs, json!({"oth": []})), "multi-prime"),
    ];
    for (jwk, reason) in &cases {
        refused(jwk, reason);
    }
}

#[test]
fn a_private_jwk_without_alg_or_key_ops_gets_its_algorithm_from_kty_and_crv() {
    for alg in ALGS {
        let key = SigningKey::generate(alg).unwrap();
        let bare = patched(
            &private_value(&key),
            json!({"alg": null, "key_ops": null, "use": null, "ext": null}),
        );
        assert_eq!(SigningKey::from_private_jwk(&bare).unwrap().alg(), alg);
    }
}

#[test]
fn debug_and_errors_never_show_private_material() {
    for alg in ALGS {
        let key = SigningKey::generate(alg).unwrap();
        let private = key.private_jwk().unwrap();
        let jwk: Value = serde_json::from_str(private.expose_secret()).unwrap();
        let d = jwk["d"].as_str().unwrap();
        for shown in [
            format!("{key:?}"),
            format!("{private:?}"),
            format!("{:?}", SigningKey::from_private_jwk(&jwk).unwrap()),
        ] {
            assert!(!shown.contains(d), "{alg:?}: {shown}");
            assert!(!shown.contains("\"d\""), "{alg:?}: {shown}");
        }
        assert!(format!("{key:?}").contains(key.kid()));
    }
}
