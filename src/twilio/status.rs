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
    // Twilio sends an empty or absent ErrorCode when there is none; a garbled one is dropped
    // rather than refusing a signed callback.
    let error_code = field("ErrorCode").and_then(|code| code.trim().parse::<i64>().ok());
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
            error_code,
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

    #[test]
    fn statuses_only_move_forward() {
        assert!(rank("queued") < rank("sent"));
        assert!(rank("sent") < rank("delivered"));
        assert_eq!(rank("delivered"), rank("undelivered"));
        assert_eq!(rank("receiving"), None);
    }
}
