//! Twilio's request signature: base64 HMAC-SHA1, keyed by the auth token, over the full URL
//! Twilio requested followed by every POST parameter sorted by name, name then value.

use aws_lc_rs::{constant_time, hmac};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use url::Url;

/// The signature Twilio would send for a POST of `params` to `url`.
pub fn compute(auth_token: &[u8], url: &str, params: &[(String, String)]) -> String {
    let mut sorted: Vec<&(String, String)> = params.iter().collect();
    // By name; a repeated name's values in order too, as Twilio's own validators do.
    sorted.sort();
    let mut data = url.to_owned();
    for (name, value) in sorted {
        data.push_str(name);
        data.push_str(value);
    }
    let key = hmac::Key::new(hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, auth_token);
    STANDARD.encode(hmac::sign(&key, data.as_bytes()).as_ref())
}

/// Whether `signature` could be one at all: the standard base64 of a 20-byte HMAC-SHA1.
pub fn is_well_formed(signature: &str) -> bool {
    // 28 characters encode 20 bytes; anything longer is refused before it is decoded.
    signature.len() == 28 && STANDARD.decode(signature).is_ok_and(|mac| mac.len() == 20)
}

/// Whether `signature` is Twilio's for this request. Twilio is inconsistent about writing the
/// default port, so (as its own libraries do) the URL is tried as given, without a port and
/// with one. The variants are re-serialized by the `url` crate, which re-encodes some
/// characters, so the URL as given must stay a candidate.
pub fn is_valid(
    auth_token: &[u8],
    url: &str,
    params: &[(String, String)],
    signature: &str,
) -> bool {
    let mut valid = false;
    for candidate in std::iter::once(url.to_owned()).chain(url_variants(url)) {
        let expected = compute(auth_token, &candidate, params);
        // Every candidate is compared, so timing does not tell which one matched.
        valid |= constant_time::verify_slices_are_equal(expected.as_bytes(), signature.as_bytes())
            .is_ok();
    }
    valid
}

/// `url` without its port and with its port (the scheme's default when none is written).
fn url_variants(url: &str) -> Vec<String> {
    let Ok(parsed) = Url::parse(url) else {
        return vec![url.to_owned()];
    };
    let (Some(host), Some(port)) = (parsed.host_str(), parsed.port_or_known_default()) else {
        return vec![url.to_owned()];
    };
    let mut rest = parsed.path().to_owned();
    if let Some(query) = parsed.query() {
        rest.push('?');
        rest.push_str(query);
    }
    let credentials = match (parsed.username(), parsed.password()) {
        ("", None) => String::new(),
        (user, None) => format!("{user}@"),
        (user, Some(password)) => format!("{user}:{password}@"),
    };
    let scheme = parsed.scheme();
    vec![
        format!("{scheme}://{credentials}{host}{rest}"),
        format!("{scheme}://{credentials}{host}:{port}{rest}"),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    /// The example in Twilio's security documentation.
    fn documented() -> (&'static str, Vec<(String, String)>) {
        (
            "https://mycompany.com/myapp.php?foo=1&bar=2",
            params(&[
                ("Digits", "1234"),
                ("To", "+18005551212"),
                ("From", "+12349013030"),
                ("Caller", "+12349013030"),
                ("CallSid", "CA1234567890ABCDE"),
            ]),
        )
    }

    #[test]
    fn matches_twilios_documented_example() {
        let (url, params) = documented();
        assert_eq!(
            compute(b"12345", url, &params),
            "0/KCTR6DLpKmkAf8muzZqo1nDgQ="
        );
        assert!(is_valid(
            b"12345",
            url,
            &params,
            "0/KCTR6DLpKmkAf8muzZqo1nDgQ="
        ));
    }

    #[test]
    fn refuses_another_token_a_changed_parameter_or_a_truncated_signature() {
        let (url, mut params) = documented();
        assert!(!is_valid(
            b"54321",
            url,
            &params,
            "0/KCTR6DLpKmkAf8muzZqo1nDgQ="
        ));
        assert!(!is_valid(
            b"12345",
            url,
            &params,
            "0/KCTR6DLpKmkAf8muzZqo1nDgQ"
        ));
        params[0].1 = "1235".to_owned();
        assert!(!is_valid(
            b"12345",
            url,
            &params,
            "0/KCTR6DLpKmkAf8muzZqo1nDgQ="
        ));
    }

    /// Found by the `twilio_signature` fuzz target: a query the `url` crate re-encodes (non-ASCII,
    /// `"`, `'`) made both port variants differ from the URL Twilio signed, so a genuine
    /// signature was refused. Twilio's own validators try the URL as given too.
    #[test]
    fn accepts_a_url_the_url_crate_would_re_encode() {
        let params = params(&[("MessageSid", "SM1"), ("MessageStatus", "sent")]);
        for url in [
            "https://edge.example.com/cb?\u{fffd}82",
            "https://edge.example.com/cb?note=\"hi\"",
            "https://edge.example.com/cb?it's",
            "https://edge.example.com:443/cb?caf\u{e9}",
        ] {
            let signature = compute(b"t", url, &params);
            assert!(is_valid(b"t", url, &params, &signature), "{url}");
        }
    }

    #[test]
    fn only_a_base64_hmac_sha1_is_well_formed() {
        let (url, params) = documented();
        assert!(is_well_formed(&compute(b"12345", url, &params)));
        for malformed in [
            "",
            "x",
            "0/KCTR6DLpKmkAf8muzZqo1nDgQ",
            "0/KCTR6DLpKmkAf8muzZqo1nDgQ==",
            "0/KCTR6DLpKmkAf8muzZqo1nDg!=",
            "0_KCTR6DLpKmkAf8muzZqo1nDgQ=",
        ] {
            assert!(!is_well_formed(malformed), "{malformed:?}");
        }
        assert!(!is_well_formed(&"A".repeat(100_000)));
    }

    #[test]
    fn accepts_the_url_with_or_without_the_default_port() {
        let params = params(&[("MessageSid", "SM1"), ("MessageStatus", "sent")]);
        let ours = "https://edge.example.com/cb";
        let cases = [
            ("https://edge.example.com:443/cb", true),
            ("https://edge.example.com/cb", true),
            ("https://edge.example.com/other", false),
            ("http://edge.example.com/cb", false),
        ];
        for (signed_url, accepted) in cases {
            let signature = compute(b"t", signed_url, &params);
            assert_eq!(
                is_valid(b"t", ours, &params, &signature),
                accepted,
                "{signed_url}"
            );
        }
    }
}
