//! Wycheproof vectors through the same signature layer tokens take.

use super::util::ring;
use crate::auth::keys::{Alg, parse_fetched_keys};
use crate::auth::verify::{signature_ok, verify_signature};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Value, json};
use std::path::PathBuf;

/// Reads a vector file, or returns `None` (skip) when the folder is absent outside CI.
fn load(name: &str) -> Option<Value> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/vectors/wycheproof")
        .join(name);
    if !path.exists() {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!(
                "Wycheproof vectors missing at {} (required when CI=true)",
                path.display()
            );
        }
        // To the process's standard error itself: the harness keeps what `eprintln!` prints
        // from a test that passes to itself, and a skip must be seen.
        use std::io::Write as _;
        let _ = writeln!(
            std::io::stderr().lock(),
            "SKIPPED: Wycheproof vectors not found at {}",
            path.display()
        );
        return None;
    }
    let text = std::fs::read(&path).expect("read vectors");
    Some(serde_json::from_slice(&text).expect("vectors are JSON"))
}

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}

/// The algorithm a group's key is for, if it is one edgegate supports.
fn group_alg(key: &Value) -> Option<Alg> {
    match key.get("alg").and_then(Value::as_str) {
        Some(a) => Alg::from_jose(a),
        None => match (key["kty"].as_str(), key.get("crv").and_then(Value::as_str)) {
            (Some("oct"), _) => Some(Alg::HS256),
            (Some("RSA"), _) => Some(Alg::RS256),
            (Some("EC"), Some("P-256")) => Some(Alg::ES256),
            (Some("OKP"), Some("Ed25519")) => Some(Alg::EdDSA),
            _ => None,
        },
    }
}

/// Cases whose stored text contradicts their label, so no verifier can satisfy both:
/// - 367 and 370 ("invalidBase64Padding…", labelled invalid) are byte-identical to the valid
///   case 357: whatever padding they once had is not in the file.
/// - 372 and 373 ("InvalidCharacterInserted…", labelled valid) contain a `?`, which is not
///   base64url: RFC 7515 compact serialization forbids it and edgegate rejects it.
///
/// The test asserts that exactly these deviate, so a change in behaviour still fails it.
const CONTRADICTORY_JWS_CASES: [u64; 4] = [367, 370, 372, 373];

#[test]
fn json_web_signature_vectors() {
    let Some(doc) = load("json_web_signature_test.json") else {
        return;
    };
    let (mut valid_ok, mut invalid_rejected, mut skipped, mut contradictory) = (0, 0, 0, 0);
    let mut failures = Vec::new();
    for group in doc["testGroups"].as_array().expect("groups") {
        let key = group.get("public").unwrap_or(&group["private"]);
        let tests = group["tests"].as_array().expect("tests");
        let Some(alg) = group_alg(key) else {
            skipped += tests.len();
            continue;
        };
        let ring = if alg == Alg::HS256 {
            let k = URL_SAFE_NO_PAD
                .decode(key["k"].as_str().expect("k"))
                .expect("k b64");
            ring(Some(&k), &[], &[])
        } else {
            ring(None, &[], std::slice::from_ref(key))
        };
        for t in tests {
            let jws = t["jws"]
                .as_str()
                .expect("compact or JSON serialization as a string");
            let result = verify_signature(&ring, jws);
            let id = t["tcId"].as_u64().expect("tcId");
            match (t["result"].as_str(), &result) {
                (Some("valid"), Ok(_)) => valid_ok += 1,
                (Some("invalid"), Err(_)) => invalid_rejected += 1,
                (Some("invalid"), Ok(_)) | (Some("valid"), Err(_))
                    if CONTRADICTORY_JWS_CASES.contains(&id) =>
                {
                    contradictory += 1;
                }
                (expected, got) => failures.push(format!(
                    "tcId {} {:?}: expected {expected:?}, got {got:?}",
                    t["tcId"], t["comment"]
                )),
            }
        }
    }
    println!(
        "wycheproof JWS: {valid_ok} valid accepted, {invalid_rejected} invalid rejected, {contradictory} contradictory (documented), {skipped} skipped (PS*/RS384/RS512/ES512), {} failures",
        failures.len()
    );
    assert_eq!(contradictory, CONTRADICTORY_JWS_CASES.len());
    assert!(failures.is_empty(), "{failures:#?}");
    assert!(
        valid_ok >= 10 && invalid_rejected >= 250,
        "too few cases ran"
    );
}

/// Runs a primitive vector file (raw message and signature) through [`signature_ok`].
fn primitive_file(name: &str, jwk_member: &str, alg: &str) -> Option<(usize, usize, usize)> {
    let doc = load(name)?;
    let (mut valid_ok, mut invalid_rejected, mut acceptable) = (0, 0, 0);
    let mut failures = Vec::new();
    for group in doc["testGroups"].as_array().expect("groups") {
        let mut jwk: Value = match group.get(jwk_member) {
            Some(jwk) => jwk.clone(),
            // A few ECDSA groups carry only the uncompressed point.
            None => {
                let point = hex(group["publicKey"]["uncompressed"]
                    .as_str()
                    .expect("uncompressed point"));
                json!({"kty":"EC","crv":"P-256","x":URL_SAFE_NO_PAD.encode(&point[1..33]),"y":URL_SAFE_NO_PAD.encode(&point[33..])})
            }
        };
        jwk["kid"] = json!("wycheproof");
        jwk["alg"] = json!(alg);
        let parsed = parse_fetched_keys(std::slice::from_ref(&jwk));
        let key = parsed.keys.first();
        for t in group["tests"].as_array().expect("tests") {
            let ok = key.is_some_and(|k| {
                signature_ok(
                    k,
                    &hex(t["msg"].as_str().expect("msg")),
                    &hex(t["sig"].as_str().expect("sig")),
                )
            });
            match (t["result"].as_str(), ok) {
                (Some("valid"), true) => valid_ok += 1,
                (Some("invalid"), false) => invalid_rejected += 1,
                (Some("acceptable"), _) => acceptable += 1,
                (expected, got) => failures.push(format!(
                    "{name} tcId {} {:?}: expected {expected:?}, verified={got}",
                    t["tcId"], t["comment"]
                )),
            }
        }
    }
    println!(
        "wycheproof {name}: {valid_ok} valid accepted, {invalid_rejected} invalid rejected, {acceptable} acceptable, {} failures",
        failures.len()
    );
    assert!(failures.is_empty(), "{failures:#?}");
    Some((valid_ok, invalid_rejected, acceptable))
}

#[test]
fn ecdsa_p256_p1363_vectors() {
    if let Some((valid, invalid, _)) = primitive_file(
        "ecdsa_secp256r1_sha256_p1363_test.json",
        "publicKeyJwk",
        "ES256",
    ) {
        assert!(valid > 100 && invalid > 50);
    }
}

#[test]
fn ed25519_vectors() {
    if let Some((valid, invalid, _)) = primitive_file("ed25519_test.json", "publicKeyJwk", "EdDSA")
    {
        assert!(valid > 50 && invalid > 50);
    }
}

#[test]
fn rsa_2048_sha256_vectors() {
    if let Some((valid, invalid, _)) =
        primitive_file("rsa_signature_2048_sha256_test.json", "keyJwk", "RS256")
    {
        assert!(valid > 5 && invalid > 200);
    }
}
