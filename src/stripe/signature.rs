//! `Stripe-Signature` checked exactly as Stripe signs: `t=<unix seconds>` and one or more
//! `v1=<hex HMAC-SHA256>` (a secret roll sends one per secret; `v0` and unknown schemes are
//! ignored). The MAC is keyed with the whole `whsec_…` string, over `"{t}.{raw body}"`.

use aws_lc_rs::{constant_time, hmac};
use secrecy::{ExposeSecret as _, SecretString};

/// How old a signature may be (Stripe's own libraries use the same default).
pub const TOLERANCE_SECONDS: i64 = 300;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("the Stripe-Signature header is missing")]
    Missing,
    #[error("the Stripe-Signature header has no timestamp or no v1 signature")]
    Malformed,
    #[error("the Stripe-Signature timestamp is more than {TOLERANCE_SECONDS} s old")]
    TooOld,
    #[error("no v1 signature matches the body with any configured webhook secret")]
    NoMatch,
}

struct Parsed<'a> {
    timestamp_text: &'a str,
    timestamp: i64,
    signatures: Vec<Vec<u8>>,
}

fn parse(header: &str) -> Result<Parsed<'_>, SignatureError> {
    let mut timestamp = None;
    let mut signatures = Vec::new();
    for item in header.split(',') {
        let Some((key, value)) = item.split_once('=') else {
            continue;
        };
        match key.trim() {
            // The first `t` counts, as in Stripe's libraries.
            "t" if timestamp.is_none() => {
                let text = value.trim();
                let parsed = text.parse::<i64>().map_err(|_| SignatureError::Malformed)?;
                timestamp = Some((text, parsed));
            }
            // A v1 that is not hex cannot match; skip it rather than reject the others.
            "v1" => signatures.extend(decode_hex(value.trim())),
            _ => {}
        }
    }
    let (timestamp_text, timestamp) = timestamp.ok_or(SignatureError::Malformed)?;
    if signatures.is_empty() {
        return Err(SignatureError::Malformed);
    }
    Ok(Parsed {
        timestamp_text,
        timestamp,
        signatures,
    })
}

fn decode_hex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

/// The header parsed, when it has a timestamp within [`TOLERANCE_SECONDS`] of `now`.
fn fresh(header: Option<&str>, now: i64) -> Result<Parsed<'_>, SignatureError> {
    let parsed = parse(header.ok_or(SignatureError::Missing)?)?;
    if parsed.timestamp < now.saturating_sub(TOLERANCE_SECONDS) {
        return Err(SignatureError::TooOld);
    }
    Ok(parsed)
}

/// What can be checked before the body is read: `header` is there, with a timestamp and a v1
/// signature, and the timestamp is within [`TOLERANCE_SECONDS`] of `now`. Not a verification:
/// anyone can write such a header, so [`verify`] over the body is still the check; this one
/// keeps a client without even that from making the service read its body.
pub fn check_header(header: Option<&str>, now: i64) -> Result<(), SignatureError> {
    fresh(header, now).map(|_| ())
}

/// Checks `header` against `body` with each of `secrets` at time `now` (unix seconds); returns
/// the signed timestamp. Every comparison is constant-time.
pub fn verify(
    header: Option<&str>,
    body: &[u8],
    secrets: &[SecretString],
    now: i64,
) -> Result<i64, SignatureError> {
    let parsed = fresh(header, now)?;
    for secret in secrets {
        let key = hmac::Key::new(hmac::HMAC_SHA256, secret.expose_secret().as_bytes());
        let mut context = hmac::Context::with_key(&key);
        context.update(parsed.timestamp_text.as_bytes());
        context.update(b".");
        context.update(body);
        let expected = context.sign();
        if parsed.signatures.iter().any(|candidate| {
            constant_time::verify_slices_are_equal(expected.as_ref(), candidate).is_ok()
        }) {
            return Ok(parsed.timestamp);
        }
    }
    Err(SignatureError::NoMatch)
}

/// A `Stripe-Signature` header for `body` (the fake Stripe and local tooling sign with it).
pub fn sign(body: &[u8], secret: &str, timestamp: i64) -> String {
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret.as_bytes());
    let mut context = hmac::Context::with_key(&key);
    context.update(timestamp.to_string().as_bytes());
    context.update(b".");
    context.update(body);
    let tag = context.sign();
    let hex: String = tag.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    format!("t={timestamp},v1={hex}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secrets(list: &[&str]) -> Vec<SecretString> {
        list.iter().map(|s| SecretString::from(*s)).collect()
    }

    #[test]
    fn header_shapes() {
        let body = br#"{"id":"evt_1"}"#;
        let good = sign(body, "whsec_a", 1000);
        let ok = |h: &str| verify(Some(h), body, &secrets(&["whsec_a"]), 1000);
        assert_eq!(ok(&good), Ok(1000));
        let v1 = good.split_once(",v1=").unwrap().1;
        assert_eq!(ok(&format!("t=1000,v0=abcd,v1=zz,v1={v1},x=1")), Ok(1000));
        assert_eq!(ok(&format!("v1={v1}")), Err(SignatureError::Malformed));
        assert_eq!(ok("t=1000"), Err(SignatureError::Malformed));
        assert_eq!(
            ok(&format!("t=abc,v1={v1}")),
            Err(SignatureError::Malformed)
        );
        assert_eq!(ok(&format!("t=1001,v1={v1}")), Err(SignatureError::NoMatch));
        assert_eq!(
            verify(Some(&good), body, &secrets(&["whsec_a"]), 1301),
            Err(SignatureError::TooOld)
        );
        assert_eq!(
            verify(Some(&good), body, &secrets(&["whsec_a"]), 1300),
            Ok(1000)
        );
        assert_eq!(
            verify(None, body, &secrets(&["whsec_a"]), 1000),
            Err(SignatureError::Missing)
        );
        assert_eq!(check_header(Some(&good), 1300), Ok(()));
        assert_eq!(check_header(Some(&good), 1301), Err(SignatureError::TooOld));
        assert_eq!(
            check_header(Some("t=1000"), 1000),
            Err(SignatureError::Malformed)
        );
        assert_eq!(check_header(None, 1000), Err(SignatureError::Missing));
        assert_eq!(
            verify(Some(&good), body, &secrets(&["whsec_b", "whsec_a"]), 1000),
            Ok(1000)
        );
    }
}
