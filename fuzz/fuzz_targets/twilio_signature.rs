//! The `twilio-status` callback's form body and `X-Twilio-Signature`, checked as
//! `twilio::status::apply_callback` does before it touches the database.
//!
//! Input: one mode byte, then fields split at 0xFF: query string, form body, signature.
//! - mode 0, raw: the signature is checked as sent.
//! - mode 1, signed: the harness signs the request as Twilio would; it must then be accepted,
//!   and refused once the signature loses its last character.
#![no_main]

use edgegate::twilio::signature::{compute, is_valid};
use edgegate::twilio::status::rank;
use edgegate::twilio::status_callback_url;
use edgegate_fuzz::{fields, text};
use libfuzzer_sys::fuzz_target;

const AUTH_TOKEN: &[u8] = b"fuzz-twilio-auth-token";

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let [query, body, signature] = fields::<3>(rest);
    let public_url = url::Url::parse("https://edge.fuzz.example/").expect("constant");
    let mut url = status_callback_url(&public_url);
    // hyper hands the handler only a query it could parse as part of a URI.
    let query = text(query);
    if !query.is_empty() {
        if http::uri::PathAndQuery::try_from(format!("/?{query}")).is_err() {
            return;
        }
        url.push('?');
        url.push_str(&query);
    }
    let params: Vec<(String, String)> = url::form_urlencoded::parse(body).into_owned().collect();
    if mode % 2 == 0 {
        let _ = is_valid(AUTH_TOKEN, &url, &params, &text(signature));
    } else {
        let signature = compute(AUTH_TOKEN, &url, &params);
        assert!(is_valid(AUTH_TOKEN, &url, &params, &signature), "{url}");
        assert!(!is_valid(
            AUTH_TOKEN,
            &url,
            &params,
            &signature[..signature.len() - 1]
        ));
    }
    for (name, value) in &params {
        if name == "MessageStatus" {
            let _ = rank(value);
        }
    }
});
