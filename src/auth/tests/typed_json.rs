//! The typed, tree-free readers of a token's header and claims against the reference they
//! replaced: the strict `Value` parser followed by map lookups (kept here, as it was). Every
//! input of a generated corpus must get the same answer from both: the same error, or the
//! same algorithm and kid, the same `exp`, `nbf`, `role`, `sub`, and claims that are the same
//! JSON (the typed reader keeps the payload's own text).

use crate::auth::error::{AuthError, Failure};
use crate::auth::json::object_from_slice_strict;
use crate::auth::keys::{Alg, kid_is_well_formed};
use crate::auth::tests::util::Rng;
use crate::auth::verify::{CheckedClaims, Header, VerifySettings, check_payload};
use serde_json::value::RawValue;
use serde_json::{Map, Value};
use std::time::Duration;

const NOW: i64 = 1_700_000_000;

/// What a claims check gives: `exp`, `nbf`, `role`, `sub`, and the claims as JSON.
type Outcome = (i64, Option<i64>, Option<String>, Option<String>, Value);
const ISS: &str = "https://ref.supabase.co/auth/v1";

// ---- the reference: the code before the typed readers, unchanged but for its names ----

fn family_error(alg: Alg, failure: Failure) -> AuthError {
    match alg {
        Alg::HS256 => AuthError::Legacy(failure),
        _ if failure == Failure::UnknownKid => AuthError::UnknownKid,
        _ => AuthError::Asymmetric(failure),
    }
}

fn reference_header(bytes: &[u8]) -> Result<(Alg, Option<String>), AuthError> {
    let header = object_from_slice_strict(bytes).ok_or(AuthError::InvalidFormat(
        "header is not a JSON object without duplicate members",
    ))?;
    let alg = match header.get("alg") {
        None => return Err(AuthError::InvalidFormat("header has no alg")),
        Some(Value::String(s)) => Alg::from_jose(s).ok_or(AuthError::UnsupportedAlgorithm)?,
        Some(_) => return Err(AuthError::UnsupportedAlgorithm),
    };
    if header.contains_key("crit")
        || ["jwk", "jku", "x5u", "x5c"]
            .iter()
            .any(|m| header.contains_key(*m))
    {
        return Err(family_error(alg, Failure::RejectedHeader));
    }
    let kid = match header.get("kid") {
        None => None,
        Some(Value::String(s)) if kid_is_well_formed(s) => Some(s.clone()),
        Some(_) => return Err(family_error(alg, Failure::MalformedKid)),
    };
    Ok((alg, kid))
}

fn optional_string(claims: &Map<String, Value>, name: &str) -> Result<Option<String>, Failure> {
    match claims.get(name) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(Failure::MalformedClaims),
    }
}

/// Fractions are rounded down for `exp` and up for `nbf` and `iat` (the reference floored all
/// three once: a token was valid up to a second before its `nbf`).
fn numeric_date(claims: &Map<String, Value>, name: &str) -> Result<Option<i64>, Failure> {
    match claims.get(name) {
        None => Ok(None),
        Some(Value::Number(n)) => {
            if let Some(i) = n.as_i64() {
                Ok(Some(i))
            } else if let Some(f) = n.as_f64().filter(|f| f.is_finite() && f.abs() < 1e15) {
                let whole = if name == "exp" { f.floor() } else { f.ceil() };
                Ok(Some(whole as i64))
            } else {
                Err(Failure::MalformedClaims)
            }
        }
        Some(_) => Err(Failure::MalformedClaims),
    }
}

fn reference_claims(
    payload: &[u8],
    settings: &VerifySettings,
    now: i64,
) -> Result<Outcome, Failure> {
    let claims = object_from_slice_strict(payload).ok_or(Failure::MalformedClaims)?;
    let leeway = i64::try_from(settings.leeway.as_secs()).unwrap_or(i64::MAX);
    let exp = numeric_date(&claims, "exp")?.ok_or(Failure::MissingExp)?;
    let nbf = numeric_date(&claims, "nbf")?;
    let iat = numeric_date(&claims, "iat")?;
    if now >= exp.saturating_add(leeway) {
        return Err(Failure::Expired);
    }
    if nbf.is_some_and(|nbf| nbf > now.saturating_add(leeway)) {
        return Err(Failure::NotYetValid);
    }
    if iat.is_some_and(|iat| iat > now.saturating_add(leeway)) {
        return Err(Failure::IssuedInFuture);
    }
    let iss = optional_string(&claims, "iss")?;
    if let Some(issuers) = &settings.issuers {
        match iss {
            Some(iss) if issuers.contains(&iss) => {}
            _ => return Err(Failure::WrongIssuer),
        }
    }
    match claims.get("aud") {
        None => {}
        Some(Value::String(aud)) if !settings.audiences.contains(aud) => {
            return Err(Failure::WrongAudience);
        }
        Some(Value::String(_)) => {}
        Some(Value::Array(auds)) => {
            let mut matched = false;
            for aud in auds {
                let aud = aud.as_str().ok_or(Failure::MalformedClaims)?;
                matched |= settings.audiences.iter().any(|a| a == aud);
            }
            if !matched {
                return Err(Failure::WrongAudience);
            }
        }
        Some(_) => return Err(Failure::MalformedClaims),
    }
    let role = optional_string(&claims, "role")?;
    let sub = optional_string(&claims, "sub")?;
    // The later of `nbf` and `iat`: what a cached token is served from.
    Ok((exp, nbf.max(iat), role, sub, Value::Object(claims)))
}

// ---- the corpus ----

/// Values of every kind the readers tell apart, including the edges of a NumericDate.
const VALUES: &[&str] = &[
    "1700000100",
    "1699999000",
    "1700000029.5",
    "1700000030.5",
    "1700001000",
    "-5",
    "0",
    "1.5",
    "1e3",
    "1E-2",
    "-0.0",
    "999999999999999.9",
    "1e15",
    "-1e15",
    "9223372036854775807",
    "9223372036854775808",
    "-9223372036854775808",
    "18446744073709551616",
    "123456789012345678901234567890",
    "\"x\"",
    "\"authenticated\"",
    "\"service_role\"",
    "\"https://ref.supabase.co/auth/v1\"",
    "\"\\u0061uthenticated\"",
    "\"caf\\u00e9 \\ud83d\\ude00 \\u2028\"",
    "\"\"",
    "[]",
    "[\"authenticated\"]",
    "[\"a\",\"authenticated\"]",
    "[\"a\",\"b\"]",
    "[\"authenticated\",1]",
    "[1]",
    "[[\"authenticated\"]]",
    "null",
    "true",
    "false",
    "{}",
    "{\"a\":1,\"b\":[1,{\"c\":null}]}",
    "{\"a\":1,\"a\":2}",
    "[{\"a\":1,\"\\u0061\":1}]",
    "{\"x\":{\"y\":{\"z\":{\"y\":1,\"y\":1}}}}",
];

const CLAIM_NAMES: &[&str] = &[
    "exp",
    "nbf",
    "iat",
    "iss",
    "aud",
    "role",
    "sub",
    "\\u0065xp",
    "r\\u006fle",
    "app_metadata",
    "email",
    "",
];

const HEADER_NAMES: &[&str] = &[
    "alg",
    "kid",
    "typ",
    "crit",
    "jwk",
    "jku",
    "x5u",
    "x5c",
    "\\u0061lg",
    "ki\\u0064",
    "cty",
];

const HEADER_VALUES: &[&str] = &[
    "\"ES256\"",
    "\"RS256\"",
    "\"EdDSA\"",
    "\"HS256\"",
    "\"none\"",
    "\"es256\"",
    "\"k1\"",
    "\"\"",
    "\"k\\u0000\"",
    "\"k\\u200e\"",
    "\"JWT\"",
    "[\"exp\"]",
    "{}",
    "1",
    "null",
    "{\"a\":1,\"a\":1}",
];

fn object(rng: &mut Rng, names: &[&str], values: &[&str], always: &[(&str, &str)]) -> String {
    let mut members: Vec<String> = always
        .iter()
        .filter(|_| rng.below(8) != 0)
        .map(|(n, v)| format!("\"{n}\":{v}"))
        .collect();
    for _ in 0..rng.below(7) {
        members.push(format!("\"{}\":{}", rng.pick(names), rng.pick(values)));
    }
    // Shuffle, so that order (and which duplicate comes last) varies.
    for i in (1..members.len()).rev() {
        members.swap(i, rng.below(i + 1));
    }
    let spacing = [",", " , ", ",\n"][rng.below(3)];
    let text = format!("{{{}}}", members.join(spacing));
    match rng.below(20) {
        0 => format!(" {text}\n"),
        1 => format!("{text}x"),
        2 => format!("[{text}]"),
        3 => text[..text.len() / 2].to_owned(),
        _ => text,
    }
}

fn settings(with_issuer: bool) -> VerifySettings {
    VerifySettings {
        issuers: with_issuer.then(|| vec![ISS.to_owned()]),
        audiences: vec!["authenticated".to_owned()],
        leeway: Duration::from_secs(30),
    }
}

fn typed_claims(payload: &[u8], settings: &VerifySettings) -> Result<Outcome, Failure> {
    let CheckedClaims {
        exp,
        nbf,
        role,
        sub,
        claims,
    } = check_payload(payload, settings, NOW)?;
    // The text kept is the one serde_json's raw reading gives (the object, without the
    // whitespace around it), which the answer carried before it was kept as plain text.
    let raw: &RawValue = serde_json::from_slice(payload).expect("an accepted payload is JSON");
    assert_eq!(claims.json(), raw.get());
    let json: Value = serde_json::from_str(claims.json()).expect("the claims text is JSON");
    let owned = |s: Option<std::sync::Arc<str>>| s.as_deref().map(str::to_owned);
    Ok((exp, nbf, owned(role), owned(sub), json))
}

#[test]
fn typed_claims_reader_agrees_with_the_tree_reader() {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let always = [
        ("exp", "1700000100"),
        ("iss", "\"https://ref.supabase.co/auth/v1\""),
        ("aud", "\"authenticated\""),
        ("role", "\"authenticated\""),
        ("sub", "\"user-1\""),
    ];
    let spaces = ["", "", " ", "\n", "\t\r "];
    let mut accepted = 0;
    for case in 0..30_000 {
        // JSON whitespace around the object now and then, and once in a while a stray byte
        // after it (refused).
        let payload = format!(
            "{}{}{}{}",
            rng.pick(&spaces),
            object(&mut rng, CLAIM_NAMES, VALUES, &always),
            rng.pick(&spaces),
            if rng.below(20) == 0 { "x" } else { "" }
        );
        let settings = settings(case % 2 == 0);
        let expected = reference_claims(payload.as_bytes(), &settings, NOW);
        let got = typed_claims(payload.as_bytes(), &settings);
        assert_eq!(got, expected, "case {case}: {payload}");
        accepted += usize::from(got.is_ok());
    }
    // The corpus reaches both sides: enough tokens pass, enough fail.
    assert!(
        (3_000..27_000).contains(&accepted),
        "{accepted} of 30,000 accepted"
    );
}

#[test]
fn typed_header_reader_agrees_with_the_tree_reader() {
    let mut rng = Rng(0xD1B5_4A32_D192_ED03);
    let always = [("alg", "\"ES256\""), ("kid", "\"k1\""), ("typ", "\"JWT\"")];
    let mut accepted = 0;
    for case in 0..30_000 {
        let text = object(&mut rng, HEADER_NAMES, HEADER_VALUES, &always);
        let expected = reference_header(text.as_bytes());
        let got = serde_json::from_slice::<Header<'_>>(text.as_bytes())
            .map_err(|_| {
                AuthError::InvalidFormat("header is not a JSON object without duplicate members")
            })
            .and_then(|header| {
                header
                    .check()
                    .map(|(alg, kid)| (alg, kid.map(str::to_owned)))
            });
        assert_eq!(got, expected, "case {case}: {text}");
        accepted += usize::from(got.is_ok());
    }
    assert!(
        (3_000..27_000).contains(&accepted),
        "{accepted} of 30,000 accepted"
    );
}

#[test]
fn the_answer_carries_the_claims_as_the_token_does() {
    let payload = br#"{"sub":"u","exp":1700000100,"aud":"authenticated","z":1.0e2,"a":"\u00e9"}"#;
    let checked = check_payload(payload, &settings(false), NOW).expect("valid claims");
    assert_eq!(checked.claims.json().as_bytes(), payload);
    // Surrounding whitespace is not part of the object.
    let spaced = b" \n{\"exp\":1700000100} \t";
    let checked = check_payload(spaced, &settings(false), NOW).expect("valid claims");
    assert_eq!(checked.claims.json(), "{\"exp\":1700000100}");
}

#[test]
fn claims_that_are_not_utf8_are_malformed() {
    // In a member the checks read, in one they skip, in a member name, and outside strings.
    for payload in [
        &b"{\"exp\":1700000100,\"sub\":\"\xff\"}"[..],
        b"{\"exp\":1700000100,\"note\":\"\xc3\x28\"}",
        b"{\"exp\":1700000100,\"\xed\xa0\x80\":1}",
        b"{\"exp\":1700000100}\xff",
    ] {
        assert_eq!(
            check_payload(payload, &settings(false), NOW),
            Err(Failure::MalformedClaims),
            "{payload:?}"
        );
    }
}

/// The answer carries the claims as the token does, so an escape that is no character (a lone
/// UTF-16 surrogate) must be refused wherever it stands: in a member the checks read, in one
/// they skip at any depth, or in a member name. (serde_json's `deserialize_ignored_any` would
/// skip such a string unchecked: the skipping visitors must not use it.)
#[test]
fn lone_surrogates_are_malformed_anywhere_in_the_claims() {
    for payload in [
        r#"{"exp":1700000100,"sub":"\ud800"}"#,
        r#"{"exp":1700000100,"x":"\ud800"}"#,
        r#"{"exp":1700000100,"x":"\udc00"}"#,
        r#"{"exp":1700000100,"\ud800":1}"#,
        r#"{"exp":1700000100,"a":{"b":["\ud83dx"]}}"#,
        r#"{"exp":1700000100,"a":[{"\udfff":true}]}"#,
    ] {
        assert_eq!(
            check_payload(payload.as_bytes(), &settings(false), NOW),
            Err(Failure::MalformedClaims),
            "{payload}"
        );
    }
    // A pair is one character, and kept as the token wrote it.
    let pair = r#"{"exp":1700000100,"x":"\ud83d\ude00"}"#;
    let checked = check_payload(pair.as_bytes(), &settings(false), NOW).expect("valid claims");
    assert_eq!(checked.claims.json(), pair);
}

#[test]
fn no_claims_and_an_empty_map_are_the_empty_object() {
    assert_eq!(crate::auth::Claims::default().json(), "{}");
    assert_eq!(crate::auth::Claims::new(&Map::new()).json(), "{}");
}

#[test]
fn deep_nesting_is_refused_not_overflowed() {
    let deep = format!(
        "{{\"exp\":1700000100,\"x\":{}{}}}",
        "[".repeat(100_000),
        "]".repeat(100_000)
    );
    assert_eq!(
        check_payload(deep.as_bytes(), &settings(false), NOW),
        Err(Failure::MalformedClaims)
    );
    let header = format!("{{\"alg\":\"ES256\",\"x\":{}}}", "{\"a\":".repeat(100_000));
    assert!(serde_json::from_slice::<Header<'_>>(header.as_bytes()).is_err());
}
