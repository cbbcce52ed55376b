//! JWK parsing rules: one algorithm per key, and every refusal reported with its reason.

use super::util::*;
use crate::auth::keys::{
    Alg, JwksDocError, KeyOrigin, MAX_KID_LEN, is_format_char, kid_is_well_formed,
    parse_fetched_entries, parse_fetched_keys, parse_inline_keys, parse_jwks_document,
};
use crate::auth::{AuthSettings, Authenticator, KeySource};
use secrecy::SecretString;
use serde_json::{Value, json};

fn reason_for(jwk: Value) -> Option<String> {
    let parsed = parse_fetched_keys(&[jwk]);
    assert!(
        parsed.legacy.is_empty(),
        "a fetched set never yields HMAC secrets"
    );
    parsed.dropped.first().map(|d| d.reason.clone())
}

fn with(mut jwk: Value, patch: Value) -> Value {
    for (k, v) in patch.as_object().cloned().unwrap_or_default() {
        if v.is_null() {
            jwk.as_object_mut().map(|m| m.remove(&k));
        } else {
            jwk[k] = v;
        }
    }
    jwk
}

#[test]
fn algorithm_comes_from_alg_or_strictly_from_kty_crv() {
    let es = TestKey::es256("es").public_jwk();
    let ed = TestKey::eddsa("ed").public_jwk();
    let rs = TestKey::rs256("rs").public_jwk();
    let no_alg = |j: &Value| with(j.clone(), json!({"alg": null}));
    let parsed = parse_fetched_keys(&[no_alg(&es), no_alg(&ed), no_alg(&rs)]);
    let algs: Vec<Alg> = parsed.keys.iter().map(|k| k.alg()).collect();
    assert_eq!(algs, vec![Alg::ES256, Alg::EdDSA, Alg::RS256]);
    assert!(parsed.dropped.is_empty());

    assert_eq!(
        reason_for(with(es.clone(), json!({"alg":"RS256"}))).as_deref(),
        Some("alg does not agree with kty/crv")
    );
    assert_eq!(
        reason_for(with(ed.clone(), json!({"alg":"ES256"}))).as_deref(),
        Some("alg does not agree with kty/crv")
    );
    assert_eq!(
        reason_for(with(es.clone(), json!({"alg":"ES384"}))).as_deref(),
        Some("unsupported alg")
    );
    assert_eq!(
        reason_for(with(rs.clone(), json!({"alg":"PS256"}))).as_deref(),
        Some("unsupported alg")
    );
    assert_eq!(
        reason_for(with(rs.clone(), json!({"alg":"HS256"}))).as_deref(),
        Some("unsupported alg")
    );
    assert_eq!(
        reason_for(with(es.clone(), json!({"alg":"es256"}))).as_deref(),
        Some("unsupported alg")
    );
}

#[test]
fn fetched_set_drops_with_reasons() {
    let es = TestKey::es256("es").public_jwk();
    let ed = TestKey::eddsa("ed").public_jwk();
    let rs = TestKey::rs256("rs").public_jwk();
    let mut short_n = vec![0xC0u8];
    short_n.extend([0x55u8; 127]); // 1024-bit modulus
    let cases: Vec<(Value, &str)> = vec![
        (
            json!({"kty":"oct","k":"c2VjcmV0","kid":"hmac"}),
            "oct key in a fetched JWKS (HMAC secrets are never taken from the network)",
        ),
        (
            json!({"kty":"RSA","kid":"small","n":b64(&short_n),"e":"AQAB"}),
            "RSA modulus under 2048 bits",
        ),
        (
            with(rs.clone(), json!({"e":"AQ"})),
            "RSA exponent must be odd, at least 3 and below 2^32",
        ),
        (
            with(rs.clone(), json!({"e":"AAE"})),
            "RSA exponent must be odd, at least 3 and below 2^32",
        ),
        (
            with(rs.clone(), json!({"e":"AQAA"})),
            "RSA exponent must be odd, at least 3 and below 2^32",
        ),
        (with(es.clone(), json!({"use":"enc"})), "use is not sig"),
        (
            with(es.clone(), json!({"key_ops":["sign"]})),
            "key_ops lacks verify",
        ),
        (
            with(es.clone(), json!({"kid":null})),
            "asymmetric key without kid",
        ),
        (
            with(es.clone(), json!({"crv":"P-384","alg":null})),
            "unsupported curve",
        ),
        (
            with(ed.clone(), json!({"crv":"X25519","alg":null})),
            "unsupported curve",
        ),
        (
            json!({"kty":"EC","crv":"secp256k1","kid":"k1","x":"AA","y":"AA"}),
            "unsupported curve",
        ),
        (json!({"kty":"PQ","kid":"pq"}), "unsupported kty"),
        (
            with(es.clone(), json!({"d":"AAAA"})),
            "private key material in a public JWK",
        ),
        (
            with(es.clone(), json!({"x": b64(&[1u8; 31])})),
            "EC coordinates are not 32 bytes",
        ),
        (
            with(es.clone(), json!({"y": b64(&[7u8; 32])})),
            "EC point is not on P-256",
        ),
        (
            with(ed.clone(), json!({"x": b64(&[1u8; 33])})),
            "Ed25519 key is not 32 bytes",
        ),
        (
            with(es.clone(), json!({"kid":"bad\nkid"})),
            "kid is empty, too long or has control characters",
        ),
        (
            with(es.clone(), json!({"kid":"es\u{202e}1"})),
            "kid is empty, too long or has control characters",
        ),
        (
            with(es.clone(), json!({"x": "not base64!"})),
            "x is not base64url: character 4 is none of A-Z, a-z, 0-9, - and _",
        ),
        (
            with(es.clone(), json!({"x": &es["x"].as_str().unwrap()[..41]})),
            "x has the wrong length: 41 characters of base64url are no whole number of bytes \
             (characters are missing or extra)",
        ),
        (
            with(
                es.clone(),
                json!({"y": format!("{}=", es["y"].as_str().unwrap())}),
            ),
            "y is padded with '=': JWK members are base64url without padding",
        ),
        (with(rs.clone(), json!({"n": null})), "n is missing"),
        (json!("a string"), "not a JSON object"),
    ];
    for (jwk, reason) in &cases {
        assert_eq!(reason_for(jwk.clone()).as_deref(), Some(*reason), "{jwk}");
    }
    // use=sig and key_ops with verify among others are fine; absent use/key_ops too.
    assert!(reason_for(with(es.clone(), json!({"key_ops":["verify","sign"]}))).is_none());
    assert!(reason_for(with(es.clone(), json!({"use":null,"key_ops":null}))).is_none());
    // e = 3 is the smallest exponent allowed.
    assert!(reason_for(with(rs.clone(), json!({"e":"Aw"}))).is_none());

    let all: Vec<Value> = cases
        .iter()
        .map(|(j, _)| j.clone())
        .chain([es.clone(), with(es.clone(), json!({}))])
        .collect();
    let parsed = parse_fetched_keys(&all);
    assert_eq!(parsed.keys.len(), 1);
    assert_eq!(
        parsed.dropped.len(),
        cases.len() + 1,
        "the second key with kid 'es' is a duplicate"
    );
    assert_eq!(
        parsed.dropped.last().map(|d| (d.kid.as_deref(), d.origin)),
        Some((Some("es"), KeyOrigin::Jwks))
    );
    assert_eq!(parsed.dropped[1].kid.as_deref(), Some("small"));
}

/// A dropped key's kid is reported (in `check`'s output, the admin listing, the log) with its
/// control and invisible formatting characters written out as escapes: a JWKS host cannot send
/// the operator's terminal escape sequences or reorder what `check` prints.
#[test]
fn a_dropped_kid_is_reported_with_its_control_characters_escaped() {
    let mut jwk = TestKey::es256("es").public_jwk();
    jwk["kid"] = json!("\u{1b}]0;pwned\u{7}\u{1b}[2J\u{202e}gnp.exe");
    let parsed = parse_fetched_keys(&[jwk]);
    assert_eq!(
        parsed.dropped.first().and_then(|d| d.kid.as_deref()),
        Some("\\u{1b}]0;pwned\\u{7}\\u{1b}[2J\\u{202e}gnp.exe")
    );
}

#[test]
fn inline_oct_keys_are_legacy_secrets() {
    let inline = parse_inline_keys(&[
        json!({"kty":"oct","k":b64(LEGACY_SECRET)}),
        json!({"kty":"oct","k":b64(LEGACY_SECRET),"kid":"old","alg":"HS256"}),
        json!({"kty":"oct","k":b64(LEGACY_SECRET),"alg":"HS512"}),
        json!({"kty":"oct","k":""}),
        json!({"kty":"oct","k":"c2VjcmV0","kid":"short"}),
        TestKey::es256("in-1").public_jwk(),
    ]);
    assert_eq!(inline.legacy.len(), 2);
    assert_eq!(inline.keys.len(), 1);
    assert_eq!(inline.dropped.len(), 3);
    assert_eq!(
        inline.dropped.last().map(|d| d.reason.as_str()),
        Some("oct key shorter than 32 bytes")
    );
    assert!(
        inline
            .legacy
            .iter()
            .all(|s| s.origin() == KeyOrigin::Inline)
    );
    // A token signed with the inline oct key verifies as legacy.
    let ring = ring(None, &[json!({"kty":"oct","k":b64(LEGACY_SECRET)})], &[]);
    let t = hs256_token(
        LEGACY_SECRET,
        r#"{"alg":"HS256"}"#,
        &claims(now()).to_string(),
    );
    let v = crate::auth::verify(&ring, &settings(), &t, now()).expect("inline legacy secret");
    assert_eq!(v.source, KeySource::LegacySecret);
}

#[test]
fn jwks_document_shapes() {
    let k = TestKey::eddsa("e").public_jwk();
    let obj = json!({"keys":[k.clone()]}).to_string();
    let arr = json!([k.clone()]).to_string();
    assert_eq!(
        parse_jwks_document(obj.as_bytes(), false).map(|v| v.len()),
        Ok(1)
    );
    assert_eq!(
        parse_jwks_document(arr.as_bytes(), true).map(|v| v.len()),
        Ok(1)
    );
    assert_eq!(
        parse_jwks_document(arr.as_bytes(), false),
        Err(JwksDocError::NotKeysObject)
    );
    assert_eq!(
        parse_jwks_document(br#"{"keys":{}}"#, false),
        Err(JwksDocError::NotKeysObject)
    );
    assert_eq!(
        parse_jwks_document(br#"{"keys":{}}"#, true),
        Err(JwksDocError::WrongShape)
    );
    assert_eq!(
        parse_jwks_document(br#"{"keys":[],"keys":[]}"#, true),
        Err(JwksDocError::DuplicateMember("keys".into()))
    );
    assert_eq!(
        parse_jwks_document(br#"{"keys":[1,"#, false),
        Err(JwksDocError::NotJson)
    );
    let many = json!({"keys": vec![k; 101]}).to_string();
    assert_eq!(
        parse_jwks_document(many.as_bytes(), false),
        Err(JwksDocError::TooManyKeys(100))
    );
}

#[test]
fn listing_and_debug_never_show_secrets() {
    let secret = "legacy-secret-value-0123456789abcdef";
    let api = "sb_secret_abcdefghijklmnopqrstuvwxyz012345";
    let inline = TestKey::eddsa("inline-1").public_jwk();
    let settings = AuthSettings {
        legacy_secrets: vec![SecretString::from(secret.to_owned())],
        inline_jwks: vec![
            inline,
            json!({"kty":"oct","k":b64(b"inline-oct-secret-0123456789abcdef"),"kid":"oct-1"}),
            json!({"kty":"oct"}),
        ],
        secret_api_keys: vec![("default".into(), SecretString::from(api.to_owned()))],
        ..AuthSettings::default()
    };
    let debug_settings = format!("{settings:?}");
    let auth = Authenticator::new(settings, reqwest::Client::new());
    let ring = auth.key_ring().load();
    for text in [
        debug_settings,
        format!("{auth:?}"),
        format!("{ring:?}"),
        format!("{:?}", ring.listing()),
    ] {
        assert!(
            !text.contains(secret)
                && !text.contains(api)
                && !text.contains(&b64(b"inline-oct-secret-0123456789abcdef")),
            "{text}"
        );
    }
    let listing: Vec<(&str, Option<&str>, &str, &str)> = ring
        .listing()
        .iter()
        .map(|k| {
            (
                k.source.as_str(),
                k.kid.as_deref(),
                k.alg,
                k.origin.as_str(),
            )
        })
        .map(|(s, kid, alg, o)| (s, kid.map(|k| &*k.to_owned().leak()), alg, o))
        .collect();
    assert_eq!(
        listing,
        vec![
            ("legacy_secret", None, "HS256", "env"),
            ("legacy_secret", Some("oct-1"), "HS256", "inline"),
            ("signing_key", Some("inline-1"), "EdDSA", "inline"),
        ]
    );
    assert_eq!(auth.inline_dropped().len(), 1);
    assert!(ring.can_verify());
    let json = serde_json::to_value(ring.listing()).expect("serialize");
    assert_eq!(
        json[2],
        json!({"source":"signing_key","kid":"inline-1","alg":"EdDSA","origin":"inline"})
    );
}

/// The kid rule as written: no control and no invisible format character, judged char by char.
fn kid_rule(kid: &str) -> bool {
    !kid.is_empty()
        && kid.len() <= MAX_KID_LEN
        && !kid.chars().any(|c| c.is_control() || is_format_char(c))
}

#[test]
fn kid_check_agrees_with_the_rule_for_every_character() {
    // Each character of the Basic Multilingual Plane and a sample beyond it, alone and between
    // printable ASCII (the byte-by-byte path must hand every other byte to the char walk).
    let chars = (0..=0xFFFF_u32)
        .chain((0x1_0000..=0x10_FFFF).step_by(0x101))
        .chain([0xE_0001, 0xE_007F, 0x10_FFFF])
        .filter_map(char::from_u32);
    let mut refused = 0;
    for c in chars {
        for kid in [
            c.to_string(),
            format!("es-{c}-1"),
            format!("{c}es-1"),
            format!("es-1{c}"),
        ] {
            assert_eq!(kid_is_well_formed(&kid), kid_rule(&kid), "{kid:?}");
            refused += usize::from(!kid_rule(&kid));
        }
    }
    // The rule refuses C0, DEL, C1 and the format characters in each of the four shapes.
    assert_eq!(refused, 4 * (32 + 1 + 32 + 1 + 1 + 1 + 5 + 5 + 16 + 1 + 3));
    for kid in ["", "a".repeat(MAX_KID_LEN + 1).as_str()] {
        assert!(!kid_is_well_formed(kid), "{} bytes", kid.len());
    }
    assert!(kid_is_well_formed(&"a".repeat(MAX_KID_LEN)));
    assert!(kid_is_well_formed("0f6c4b8e-3a49-4d8a-9c0e-6b1f2d7a9e15"));
    assert!(kid_is_well_formed("ключ-2026"));
}

/// RSA exponents of 2^32 and more are dropped (aws-lc takes none that large), and the reason
/// says so: they are odd and at least 3, which the reason used to deny ("RSA exponent is not an
/// odd number of at least 3" for e = 2^32 + 1). 2^32 − 1 is the largest exponent taken.
#[test]
fn rsa_exponents_from_2_to_the_32_are_dropped_with_a_true_reason() {
    let rs = TestKey::rs256("rs").public_jwk();
    let rule = "RSA exponent must be odd, at least 3 and below 2^32";
    let mut e_4095 = vec![0xFFu8; 512];
    e_4095[0] = 0x7F; // 4095 bits, odd
    let too_large = [
        ("2^32 + 1", "AQAAAAE".to_owned()),
        ("2^33 − 1", b64(&[0x01, 0xFF, 0xFF, 0xFF, 0xFF])),
        ("2^40 + 1", b64(&[0x01, 0, 0, 0, 0, 0x01])),
        (
            "2^32 + 1 with a leading zero",
            b64(&[0, 0x01, 0, 0, 0, 0x01]),
        ),
        ("a 4095-bit odd exponent", b64(&e_4095)),
    ];
    for (what, e) in &too_large {
        assert_eq!(
            reason_for(with(rs.clone(), json!({ "e": e }))).as_deref(),
            Some(rule),
            "{what}"
        );
    }
    // Even, or under 3: the same rule, still true.
    for e in ["AQ", "AAE", "AQAA", "Ag", "AA"] {
        assert_eq!(
            reason_for(with(rs.clone(), json!({ "e": e }))).as_deref(),
            Some(rule),
            "e = {e}"
        );
    }
    // The largest exponent taken, and the usual one.
    for e in [b64(&[0xFF; 4]), "AQAB".to_owned()] {
        assert_eq!(
            reason_for(with(rs.clone(), json!({ "e": e }))),
            None,
            "e = {e}"
        );
    }
}

/// A member name twice inside one key drops that key alone, naming the member (RFC 7517 §4,
/// §5); twice outside the keys, the document is refused and says so. The whole document used to
/// be refused as "not valid JSON" for either.
#[test]
fn a_duplicate_member_drops_its_key_alone_and_outside_the_keys_the_document() {
    let es = TestKey::es256("es").public_jwk().to_string();
    let dm = TestKey::es256("dm").public_jwk().to_string();
    let inside = |extra: &str| dm.replacen('{', &format!("{{{extra},"), 1);
    for (entry, member) in [
        (inside(r#""kty":"EC""#), "kty"),
        // The same name spelt with an escape.
        (inside(r#""\u006bty":"EC""#), "kty"),
        (inside(r#""ext":{"a":1,"a":1}"#), "a"),
        (inside(r#""x5c":[{"b":[{"c":1,"c":2}]}]"#), "c"),
        (inside(r#""\u001b[2J":1,"\u001b[2J":2"#), "\\u{1b}[2J"),
    ] {
        for (doc, bare) in [
            (format!(r#"{{"keys":[{es},{entry}]}}"#), false),
            (format!("[{entry},{es}]"), true),
        ] {
            let entries = parse_jwks_document(doc.as_bytes(), bare).expect(&doc);
            assert_eq!(entries.len(), 2, "{doc}");
            let parsed = parse_fetched_entries(&entries);
            assert_eq!(parsed.keys.len(), 1, "{doc}");
            assert_eq!(parsed.keys[0].kid(), "es");
            let dropped: Vec<_> = parsed
                .dropped
                .iter()
                .map(|d| (d.kid.as_deref(), d.reason.as_str(), d.origin))
                .collect();
            let reason = format!("duplicate member `{member}`");
            assert_eq!(
                dropped,
                [(Some("dm"), reason.as_str(), KeyOrigin::Jwks)],
                "{doc}"
            );
        }
    }
    // Of two kids, the first is reported.
    let two_kids = dm.replacen('{', r#"{"kid":"first","#, 1);
    let entries = parse_jwks_document(format!("[{two_kids}]").as_bytes(), true).unwrap();
    let dropped = &parse_fetched_entries(&entries).dropped[0];
    assert_eq!(
        (dropped.kid.as_deref(), dropped.reason.as_str()),
        (Some("first"), "duplicate member `kid`")
    );
    // A key without duplicates parses as it does from a value.
    let entries = parse_jwks_document(format!("[{es}]").as_bytes(), true).unwrap();
    assert_eq!(entries[0].duplicate, None);
    assert_eq!(
        entries[0].value,
        serde_json::from_str::<Value>(&es).unwrap()
    );

    // Outside the keys: the whole document, whatever the keys hold.
    for (doc, member) in [
        (format!(r#"{{"keys":[{es}],"keys":[{es}]}}"#), "keys"),
        (format!(r#"{{"keys":[{es}],"x":1,"x":2}}"#), "x"),
        (
            format!(r#"{{"meta":{{"a":[{{"b":1,"b":1}}]}},"keys":[{es}]}}"#),
            "b",
        ),
        (r#"{"keys":{"a":1,"a":2}}"#.to_owned(), "a"),
    ] {
        let err = parse_jwks_document(doc.as_bytes(), false).expect_err(&doc);
        assert_eq!(err, JwksDocError::DuplicateMember(member.into()), "{doc}");
        assert_eq!(
            err.to_string(),
            format!("JWKS has a duplicate member `{member}`")
        );
    }
    // Not JSON after a duplicate is still not JSON.
    assert_eq!(
        parse_jwks_document(br#"{"keys":[{"a":1,"a":2}],"#, false),
        Err(JwksDocError::NotJson)
    );
}
