//! Delivery-status callbacks: Twilio posts `MessageSid`, `MessageStatus` and, on failure,
//! `ErrorCode` to the `StatusCallback` URL, signed with the auth token.

use secrecy::{ExposeSecret as _, SecretString};
use url::Url;

use super::SmsError;
use super::metrics::{SmsMetrics, StatusSource};
use crate::clock::Clock;
use crate::config::Config;
use crate::store::{StatusChange, Store};

/// Where each status stands in a message's life; a status only replaces a lower one. The final
/// outcomes share a rank, so the first to arrive stays. (`read` follows `delivered` on channels
/// that report it.) Statuses outside the table are ignored.
pub const STATUS_RANKS: &[(&str, i64)] = &[
    ("accepted", 0),
    ("scheduled", 0),
    ("queued", 1),
    ("sending", 2),
    ("sent", 3),
    ("delivered", 4),
    ("undelivered", 4),
    ("failed", 4),
    ("canceled", 4),
    ("partially_delivered", 4),
    ("read", 5),
];

pub fn rank(status: &str) -> Option<i64> {
    STATUS_RANKS
        .iter()
        .find(|(name, _)| *name == status)
        .map(|(_, rank)| *rank)
}

/// The largest status callback body taken: Twilio's are well under 1 KiB.
pub const BODY_LIMIT: usize = 64 * 1024;

/// A status callback as it reached us.
#[derive(Debug)]
pub struct Callback<'a> {
    pub signature: Option<&'a str>,
    /// The query string of the request, if any (Twilio signs the whole URL).
    pub query: Option<&'a str>,
    /// The form-encoded body.
    pub body: &'a [u8],
}

/// The header Twilio adds to a callback signed with a shared key rather than the auth token
/// (a public beta: `key=…,algorithm=HMAC_SHA256`). Such signatures are not supported.
pub const SHARED_KEY_SETTINGS: &str = "x-twilio-webhooks-signature-settings";

/// A signature refusal of a callback that carries [`SHARED_KEY_SETTINGS`], saying why: only the
/// auth token's HMAC-SHA1 signature is verified, so every callback of an account that turned
/// shared keys on is refused, and its operator should learn that from Twilio's logs of them.
pub fn shared_key_refusal(err: SmsError) -> SmsError {
    match err {
        SmsError::BadSignature(message) => SmsError::BadSignature(format!(
            "{message}; this callback is signed with a shared key ({SHARED_KEY_SETTINGS} is \
             set), which edgegate does not support: it verifies only the auth token's HMAC-SHA1 \
             signature, so the account's callbacks are refused while shared keys are on"
        )),
        other => other,
    }
}

/// What a callback is refused for before its body is read (the route checks it first, so that
/// an unsigned request does not wait for, or buffer, a body): Twilio or `PUBLIC_URL` not
/// configured, `X-Twilio-Signature` missing or not the base64 of an HMAC-SHA1. Returns the auth
/// token, the public URL and the signature.
pub fn check_before_body<'a>(
    config: &'a Config,
    signature: Option<&'a str>,
) -> Result<(&'a SecretString, &'a Url, &'a str), SmsError> {
    let token = config
        .twilio
        .auth_token
        .as_ref()
        .ok_or(SmsError::NotConfigured("Twilio"))?;
    // The signature covers the URL Twilio called; only PUBLIC_URL says what that was.
    let public_url = config
        .public_url
        .as_ref()
        .ok_or(SmsError::NotConfigured("PUBLIC_URL"))?;
    let signature = signature
        .ok_or_else(|| SmsError::BadSignature("X-Twilio-Signature is missing".to_owned()))?;
    if !super::signature::is_well_formed(signature) {
        return Err(SmsError::BadSignature(
            "X-Twilio-Signature is not a base64 HMAC-SHA1".to_owned(),
        ));
    }
    Ok((token, public_url, signature))
}

/// Checks the signature, then moves the message forward. Nothing is written unless the
/// signature is Twilio's.
pub async fn apply_callback(
    store: &Store,
    config: &Config,
    clock: &Clock,
    metrics: &SmsMetrics,
    callback: Callback<'_>,
) -> Result<(), SmsError> {
    let (token, public_url, signature) = check_before_body(config, callback.signature)?;
    let mut url = super::status_callback_url(public_url);
    if let Some(query) = callback.query.filter(|query| !query.is_empty()) {
        url.push('?');
        url.push_str(query);
    }
    let params: Vec<(String, String)> = url::form_urlencoded::parse(callback.body)
        .into_owned()
        .collect();
    if !super::signature::is_valid(token.expose_secret().as_bytes(), &url, &params, signature) {
        return Err(SmsError::BadSignature(
            "X-Twilio-Signature does not match this request".to_owned(),
        ));
    }

    let field = |name: &str| {
        params
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    };
    let sid = field("MessageSid")
        .ok_or_else(|| SmsError::BadCallback("MessageSid is missing".to_owned()))?;
    let status = field("MessageStatus")
        .ok_or_else(|| SmsError::BadCallback("MessageStatus is missing".to_owned()))?;
    let Some(rank) = rank(status) else {
        tracing::warn!(
            sid,
            status,
            "Twilio status callback with an unknown status ignored"
        );
        return Ok(());
    };
    // Twilio sends an empty or absent ErrorCode when there is none. One that is not a number we
    // can hold (real codes are five digits) is stored as none rather than refusing a signed
    // callback, which Twilio would retry for hours: the status is still applied, and the WARN
    // says what was lost (not the value, which can be of any length).
    let error_code = match field("ErrorCode").map(str::trim) {
        None | Some("") => None,
        Some(code) => {
            let parsed = code.parse::<i64>().ok();
            if parsed.is_none() {
                tracing::warn!(
                    sid,
                    status,
                    "Twilio status callback whose ErrorCode cannot be read (not a number \
                     edgegate can hold): the callback is taken without an error code"
                );
            }
            parsed
        }
    };
    // The message's id, from the callback URL edgegate gave Twilio (signed with it).
    let id = callback.query.and_then(|query| {
        url::form_urlencoded::parse(query.as_bytes())
            .find(|(key, _)| key == "id")
            .map(|(_, id)| id.into_owned())
    });
    match store
        .apply_sms_status(
            (sid, id.as_deref()),
            (status, rank),
            STATUS_RANKS,
            // A status callback carries no description.
            (error_code, None),
            clock.now_ms(),
        )
        .await
        .map_err(|err| {
            SmsError::from_store(
                err,
                "twilio_status",
                "the database is unavailable; the status was not stored",
            )
        })? {
        StatusChange::Applied {
            id: applied,
            previous,
        } => {
            if let Some(named) = id.as_deref().filter(|named| *named != applied) {
                tracing::warn!(
                    id = %applied,
                    callback_id = named,
                    sid,
                    "Twilio status callback whose URL names another message than its \
                     MessageSid: applied to the SID's message"
                );
            }
            status_applied(
                metrics,
                StatusSource::Callback,
                (&applied, sid),
                (&previous, status),
                error_code,
            );
        }
        StatusChange::Stale => tracing::debug!(sid, status, "late SMS status ignored"),
        StatusChange::UnknownSid => {
            tracing::warn!(
                sid,
                status,
                "Twilio status callback for a message we do not know"
            );
        }
    }
    Ok(())
}

/// Logs a status applied to message `id` (Twilio's `sid`), which moved it from `previous` to
/// `status`, at INFO with Twilio's error code when there is one (never the number or the
/// body), and counts it under `source`.
pub(crate) fn status_applied(
    metrics: &SmsMetrics,
    source: StatusSource,
    (id, sid): (&str, &str),
    (previous, status): (&str, &str),
    error_code: Option<i64>,
) {
    tracing::info!(
        id,
        sid,
        previous_status = previous,
        status,
        error_code,
        source = source.label(),
        "SMS status updated"
    );
    metrics.status_applied(status, source);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_status_is_plain_lower_case_words_so_the_store_can_splice_it() {
        for (status, _) in STATUS_RANKS {
            assert!(
                status.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
                "{status}"
            );
        }
    }

    /// A signed callback whose `ErrorCode` is not a number we can hold (real ones are five
    /// digits) is still applied, status and SID, and answered as applied (Twilio would retry a
    /// refusal for hours), but it is not dropped in silence: a WARN names the SID and says the
    /// code could not be read, without the rest of the body (the recipient's number).
    #[tokio::test]
    async fn an_unreadable_error_code_is_logged_and_the_rest_of_the_callback_applied() {
        use crate::store::{NewSms, SendResult, SmsLimits};
        const TOKEN: &str = "f1e2d3c4b5a6978812345678abcdef90";
        const SID: &str = "SM0123456789abcdef0123456789abcdef";
        const TO: &str = "+12025550123";
        let config = Config::from_lookup(|name| {
            let value = match name {
                "DATABASE_URL" => "sqlite::memory:",
                "TWILIO_ACCOUNT_SID" => "AC0123456789abcdef0123456789abcdef",
                "TWILIO_AUTH_TOKEN" => TOKEN,
                "TWILIO_FROM_NUMBER" => "+15005550006",
                "PUBLIC_URL" => "https://edgegate.example.com",
                _ => return None,
            };
            Some(value.to_owned())
        })
        .unwrap();
        let store = Store::connect(&config.database_url).await.unwrap();
        store.migrate().await.unwrap();
        let clock = Clock::manual();
        let new = NewSms {
            id: "sms-1",
            idempotency_key: None,
            to_number: TO,
            body: "hi",
            status: "accepted",
            replayed_error_codes: &[],
        };
        let limits = SmsLimits {
            per_recipient_per_hour: 10,
            per_minute: 10,
        };
        store
            .reserve_sms(new, limits, || clock.now_ms())
            .await
            .unwrap();
        let sent = SendResult {
            status: "queued",
            twilio_sid: Some(SID),
            error_code: None,
            error_message: None,
        };
        store
            .record_sms_send(("sms-1", 1), sent, clock.now_ms())
            .await
            .unwrap();

        let lines = crate::telemetry::LogLines::default();
        let _default = tracing::subscriber::set_default(lines.tracing_subscribers_json());
        let params: Vec<(String, String)> = [
            ("MessageSid", SID),
            ("MessageStatus", "failed"),
            ("ErrorCode", "99999999999999999999"),
            ("To", TO),
        ]
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
        let url = super::super::status_callback_url(config.public_url.as_ref().unwrap());
        let signature = super::super::signature::compute(TOKEN.as_bytes(), &url, &params);
        let body = url::form_urlencoded::Serializer::new(String::new())
            .extend_pairs(&params)
            .finish();
        let callback = Callback {
            signature: Some(&signature),
            query: None,
            body: body.as_bytes(),
        };
        apply_callback(&store, &config, &clock, &SmsMetrics::default(), callback)
            .await
            .unwrap();

        let row = store.sms_message("sms-1").await.unwrap().unwrap();
        assert_eq!(
            (
                row.status.as_str(),
                row.twilio_sid.as_deref(),
                row.error_code
            ),
            ("failed", Some(SID), None)
        );
        let log = lines.text();
        let warned: Vec<&str> = log.lines().filter(|line| line.contains("WARN")).collect();
        assert_eq!(warned.len(), 1, "{log}");
        for wanted in [SID, "ErrorCode", "cannot be read"] {
            assert!(warned[0].contains(wanted), "{wanted} in {}", warned[0]);
        }
        assert!(
            log.contains("SMS status updated") && log.contains(r#""status":"failed""#),
            "{log}"
        );
        assert!(!log.contains("2025550123"), "{log}");
    }

    #[test]
    fn statuses_only_move_forward() {
        assert!(rank("queued") < rank("sent"));
        assert!(rank("sent") < rank("delivered"));
        assert_eq!(rank("delivered"), rank("undelivered"));
        assert_eq!(rank("receiving"), None);
    }
}
