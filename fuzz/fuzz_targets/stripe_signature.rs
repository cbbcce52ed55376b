//! `Stripe-Signature` parsing and verification, and the event reader behind it.
//!
//! Input: one mode byte, then fields split at 0xFF.
//! - mode 0, raw: `Stripe-Signature` header, body. The header is verified against two webhook
//!   secrets; the body is read as an event and turned into its effect whatever the signature
//!   says (a leaked webhook secret lets anyone reach that reader).
//! - mode 1, signed: timestamp text, extra header items, body. The harness signs the body as
//!   Stripe does; verification must then accept it exactly when the timestamp is recent,
//!   whatever items follow (Stripe adds schemes over time; unknown ones are ignored).
#![no_main]

use edgegate::stripe::objects::Event;
use edgegate::stripe::signature::{SignatureError, TOLERANCE_SECONDS, sign, verify};
use edgegate::stripe::webhook::effect_of;
use edgegate_fuzz::{fields, text};
use libfuzzer_sys::fuzz_target;
use secrecy::SecretString;

/// A fixed "now" (2027-01-15), so a crash reproduces whenever it is replayed.
const NOW: i64 = 1_800_000_000;
const SECRETS: [&str; 2] = ["whsec_fuzz_current", "whsec_fuzz_previous"];

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let secrets: Vec<SecretString> = SECRETS.iter().map(|s| SecretString::from(*s)).collect();
    if mode % 2 == 0 {
        let [header, body] = fields::<2>(rest);
        let header = text(header);
        let _ = verify(Some(&header), body, &secrets, NOW);
        read_event(body);
    } else {
        let [timestamp, extra, body] = fields::<3>(rest);
        // A timestamp within a day of NOW most of the time, anything else sometimes.
        let timestamp = match std::str::from_utf8(timestamp)
            .ok()
            .and_then(|t| t.parse().ok())
        {
            Some(t) => t,
            None => NOW - i64::from(u16::from_le_bytes(pad(timestamp))),
        };
        let mut header = sign(body, SECRETS[1], timestamp);
        let extra = text(extra);
        if !extra.is_empty() {
            header.push(',');
            header.push_str(&extra);
        }
        let expected = if timestamp < NOW - TOLERANCE_SECONDS {
            Err(SignatureError::TooOld)
        } else {
            Ok(timestamp)
        };
        assert_eq!(
            verify(Some(&header), body, &secrets, NOW),
            expected,
            "{header}"
        );
        read_event(body);
    }
});

fn pad(bytes: &[u8]) -> [u8; 2] {
    let mut out = [0; 2];
    for (slot, byte) in out.iter_mut().zip(bytes) {
        *slot = *byte;
    }
    out
}

/// What the webhook does with a signed body before storing it.
fn read_event(body: &[u8]) {
    if let Ok(event) = serde_json::from_slice::<Event>(body) {
        let _ = effect_of(&event, NOW * 1000);
    }
}
