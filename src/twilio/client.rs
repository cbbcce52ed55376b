//! Twilio's REST API (2010-04-01), as much as edgegate uses: create and fetch a Message, read the
//! Account.
//! Calls are classified by what they may have done at Twilio, because that decides whether a
//! retry could text someone twice.

use std::time::Duration;

use secrecy::{ExposeSecret as _, SecretString};
use serde::Deserialize;
use url::Url;

use crate::config::TwilioConfig;

/// Account credentials and where to reach the API. `Debug` redacts the token.
#[derive(Clone, Debug)]
pub struct TwilioApi {
    http: reqwest::Client,
    base: Url,
    account_sid: String,
    auth_token: SecretString,
    timeout: Duration,
}

/// The fields of Twilio's Message resource that edgegate keeps.
#[derive(Clone, Debug, Deserialize)]
pub struct MessageResource {
    pub sid: String,
    pub status: String,
    /// Twilio's error code once the message is `failed` or `undelivered` (a number, else null).
    #[serde(default, deserialize_with = "error_code")]
    pub error_code: Option<i64>,
    /// Twilio's description of that error (a string, else null; often null even with a code).
    #[serde(default, deserialize_with = "error_message")]
    pub error_message: Option<String>,
}

/// `error_code` as Twilio writes it: a number or null (a numeric string is taken too; anything
/// else reads as none rather than making the whole resource unreadable).
fn error_code<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Option<i64>, D::Error> {
    Ok(match serde_json::Value::deserialize(deserializer)? {
        serde_json::Value::Number(number) => number.as_i64(),
        serde_json::Value::String(text) => text.trim().parse().ok(),
        _ => None,
    })
}

/// `error_message` as Twilio writes it: a string or null (anything else reads as none rather
/// than making the whole resource unreadable), kept as [`twilio_text`] has it.
fn error_message<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<String>, D::Error> {
    Ok(match serde_json::Value::deserialize(deserializer)? {
        serde_json::Value::String(text) => twilio_text(&text),
        _ => None,
    })
}

/// The most of a text from Twilio (an error's description) that is kept.
pub const MAX_TWILIO_TEXT_CHARS: usize = 256;

/// A text from Twilio (a message's `error_message`, an error's `message`) as edgegate stores
/// and shows it: one line of words. Whitespace and control characters (a U+0000, which
/// PostgreSQL cannot store, made the row's write fail; an escape sequence would reach an
/// operator's terminal; a line break would join two words) read as a space, runs of them as
/// one, trimmed; invisible formatting characters (bidi overrides, zero-width ones) are dropped.
/// A longer text is cut to [`MAX_TWILIO_TEXT_CHARS`] characters ending in "…", without an
/// accent (combining mark) or a space left before it. None when nothing is left.
pub fn twilio_text(text: &str) -> Option<String> {
    let spaced: String = text
        .chars()
        .filter(|&c| !crate::auth::keys::is_format_char(c))
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let line = spaced.split_whitespace().collect::<Vec<_>>().join(" ");
    if line.is_empty() {
        return None;
    }
    if line.chars().count() <= MAX_TWILIO_TEXT_CHARS {
        return Some(line);
    }
    let mut kept: String = line.chars().take(MAX_TWILIO_TEXT_CHARS - 1).collect();
    let end = kept
        .trim_end_matches(|c: char| is_combining_mark(c) || c.is_whitespace())
        .len();
    kept.truncate(end);
    kept.push('…');
    Some(kept)
}

/// A character that marks the one before it: combining diacritical marks (their blocks for
/// Latin, Greek, Cyrillic and symbols, the kana voicing marks) and variation selectors.
fn is_combining_mark(c: char) -> bool {
    matches!(
        c,
        '\u{0300}'..='\u{036F}'
            | '\u{0483}'..='\u{0489}'
            | '\u{1AB0}'..='\u{1AFF}'
            | '\u{1DC0}'..='\u{1DFF}'
            | '\u{20D0}'..='\u{20FF}'
            | '\u{3099}'..='\u{309A}'
            | '\u{FE00}'..='\u{FE0F}'
            | '\u{FE20}'..='\u{FE2F}'
            | '\u{E0100}'..='\u{E01EF}'
    )
}

/// The fields of Twilio's Account resource that `check` shows.
#[derive(Clone, Debug, Deserialize)]
pub struct AccountResource {
    pub status: Option<String>,
}

/// Twilio's error body: `{"code":21211,"message":"…","more_info":"https://…","status":400}`.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct TwilioErrorBody {
    pub code: Option<i64>,
    pub message: Option<String>,
    pub more_info: Option<String>,
    pub status: Option<u16>,
}

impl TwilioErrorBody {
    /// Twilio's own words for the error: "message (error 21211)". As received: `check` writes
    /// their control characters out; [`Self::describe_stored`] is what a row keeps.
    pub fn describe(&self, http_status: u16) -> String {
        self.described(self.message.clone(), http_status)
    }

    /// As [`Self::describe`], with the message as [`twilio_text`] keeps it: stored with a
    /// refused message (PostgreSQL cannot store a U+0000) and answered to its caller.
    pub fn describe_stored(&self, http_status: u16) -> String {
        let message = self.message.as_deref().and_then(twilio_text);
        self.described(message, http_status)
    }

    fn described(&self, message: Option<String>, http_status: u16) -> String {
        let message = message.unwrap_or_else(|| format!("HTTP {http_status}"));
        match self.code {
            Some(code) => format!("{message} (error {code})"),
            None => message,
        }
    }
}

/// The most of an answer that is read. A Message resource is about 2 KB, an error smaller still:
/// a longer answer is not Twilio's, and is not held in memory.
pub const MAX_ANSWER_BYTES: usize = 1024 * 1024;

/// Twilio's "too many requests" error code (also sent with HTTP 429).
pub const TOO_MANY_REQUESTS: i64 = 20429;

/// A call that did not give a resource.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The connection failed before the request was written: Twilio never saw it.
    #[error("Twilio could not be reached: {0}")]
    NotSent(String),
    /// Twilio refused for load (HTTP 429 or error 20429); nothing was created.
    #[error("Twilio is throttling requests")]
    Throttled { retry_after: Option<Duration> },
    /// Twilio answered with an error; nothing was created.
    #[error("Twilio refused the request: {}", .body.describe(*.http_status))]
    Rejected {
        http_status: u16,
        body: TwilioErrorBody,
    },
    /// The request may have reached Twilio, but its outcome is unknown (timeout, connection
    /// lost after writing, a server error, an unreadable success).
    #[error("Twilio's answer is unknown: {0}")]
    Unconfirmed(String),
}

impl TwilioApi {
    /// `None` when the account SID or the auth token is missing.
    pub fn from_config(http: &reqwest::Client, config: &TwilioConfig) -> Option<Self> {
        Some(Self {
            http: http.clone(),
            base: config.api_base.clone(),
            account_sid: config.account_sid.clone()?,
            auth_token: config.auth_token.clone()?,
            timeout: config.request_timeout,
        })
    }

    pub fn account_sid(&self) -> &str {
        &self.account_sid
    }

    fn account_url(&self, tail: &str) -> String {
        format!(
            "{}/2010-04-01/Accounts/{}{tail}",
            self.base.as_str().trim_end_matches('/'),
            self.account_sid
        )
    }

    /// `POST /Accounts/{sid}/Messages.json` with `form`, once (retrying is the caller's choice).
    pub async fn create_message(
        &self,
        form: &[(&str, &str)],
    ) -> Result<MessageResource, CallError> {
        let body = url::form_urlencoded::Serializer::new(String::new())
            .extend_pairs(form)
            .finish();
        let request = self
            .http
            .post(self.account_url("/Messages.json"))
            .header(
                reqwest::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            )
            .body(body);
        self.call(request).await
    }

    /// `GET /Accounts/{sid}/Messages/{message_sid}.json` (Fetch Message): the message's status
    /// now. `message_sid` is one Twilio gave us; a SID that is not a plain token is refused here
    /// rather than put in the path.
    pub async fn fetch_message(&self, message_sid: &str) -> Result<MessageResource, CallError> {
        if message_sid.is_empty() || !message_sid.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return Err(CallError::Rejected {
                http_status: 404,
                body: TwilioErrorBody::default(),
            });
        }
        let url = self.account_url(&format!("/Messages/{message_sid}.json"));
        self.call(self.http.get(url)).await
    }

    /// `GET /Accounts/{sid}.json`: whether the credentials work.
    pub async fn fetch_account(&self) -> Result<AccountResource, CallError> {
        self.call(self.http.get(self.account_url(".json"))).await
    }

    async fn call<T: serde::de::DeserializeOwned>(
        &self,
        request: reqwest::RequestBuilder,
    ) -> Result<T, CallError> {
        let request = request
            .basic_auth(&self.account_sid, Some(self.auth_token.expose_secret()))
            .header(reqwest::header::ACCEPT, "application/json")
            .timeout(self.timeout);
        let response = crate::telemetry::send(request).await.map_err(|err| {
            // Only a failed connect proves the request never left; anything later (a
            // timeout, a reset while waiting for the answer) may follow a delivered request.
            // A connect that cannot be made in time (a dropped SYN, a TLS handshake never
            // answered: nothing of the request is written before it completes) fails as one
            // too, after the client's `CONNECT_TIMEOUT`, shorter than the call's timeout.
            if err.is_connect() {
                CallError::NotSent(describe(&err))
            } else {
                CallError::Unconfirmed(describe(&err))
            }
        })?;
        let status = response.status();
        let retry_after = crate::outbound::retry_after(response.headers());
        let bytes = crate::outbound::read_capped(response, MAX_ANSWER_BYTES).await;
        if status.is_success() {
            // Twilio may have acted on it: whatever the body, nothing is sent again.
            let bytes = bytes.map_err(|err| {
                CallError::Unconfirmed(match err {
                    crate::outbound::BodyError::CutShort(err) => describe(&err),
                    too_large => too_large.to_string(),
                })
            })?;
            return serde_json::from_slice(&bytes).map_err(|err| {
                CallError::Unconfirmed(format!("Twilio's answer could not be read: {err}"))
            });
        }
        // An error body that cannot be read (cut short, too large) leaves the status alone to
        // classify the answer.
        let body: TwilioErrorBody = bytes
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .unwrap_or_default();
        if status == reqwest::StatusCode::TOO_MANY_REQUESTS || body.code == Some(TOO_MANY_REQUESTS)
        {
            return Err(CallError::Throttled { retry_after });
        }
        if status.is_server_error() {
            // A 5xx does not prove the message was not created.
            return Err(CallError::Unconfirmed(format!("Twilio answered {status}")));
        }
        Err(CallError::Rejected {
            http_status: status.as_u16(),
            body,
        })
    }
}

/// reqwest's error with its causes (the URL holds the account SID, no secret; the token travels
/// in a header reqwest marks sensitive).
fn describe(err: &reqwest::Error) -> String {
    let mut text = err.to_string();
    let mut source = std::error::Error::source(err);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_the_auth_token() {
        let mut config = crate::config::Config::defaults().twilio;
        config.account_sid = Some("AC0123456789abcdef0123456789abcdef".to_owned());
        config.auth_token = Some("tok-that-must-not-leak".to_owned().into());
        let api = TwilioApi::from_config(&reqwest::Client::new(), &config).unwrap();
        let shown = format!("{api:?} {config:?}");
        assert!(shown.contains("AC0123456789abcdef0123456789abcdef"));
        assert!(!shown.contains("tok-that-must-not-leak"), "{shown}");
    }

    #[test]
    fn an_error_reads_as_twilio_wrote_it() {
        let body = TwilioErrorBody {
            code: Some(21211),
            message: Some("The 'To' number 123 is not a valid phone number.".to_owned()),
            ..TwilioErrorBody::default()
        };
        assert_eq!(
            body.describe(400),
            "The 'To' number 123 is not a valid phone number. (error 21211)"
        );
        assert_eq!(TwilioErrorBody::default().describe(401), "HTTP 401");
    }

    /// A description that is not a string, or is blank, reads as none: the status is still
    /// stored.
    #[test]
    fn a_message_resource_keeps_twilios_error_message_and_reads_an_odd_one_as_none() {
        let read = |error_message: serde_json::Value| {
            let resource: MessageResource = serde_json::from_value(serde_json::json!({
                "sid": "SM1", "status": "undelivered", "error_code": 30003,
                "error_message": error_message,
            }))
            .unwrap();
            resource.error_message
        };
        assert_eq!(
            read("Unreachable destination handset".into()).as_deref(),
            Some("Unreachable destination handset")
        );
        for odd in [
            serde_json::Value::Null,
            "  ".into(),
            30003.into(),
            "\u{0}\r\n\u{1b}".into(),
        ] {
            assert_eq!(read(odd), None);
        }
        // Line breaks, tabs and other control characters read as a space between words (runs of
        // them as one), trimmed; invisible formatting ones (bidi overrides, zero-width) dropped.
        assert_eq!(
            read("\tNo\u{0} route\u{1b}[0m\n ".into()).as_deref(),
            Some("No route [0m")
        );
        assert_eq!(
            read("The number\nis not valid".into()).as_deref(),
            Some("The number is not valid")
        );
        assert_eq!(
            read("Un\u{202E}known\u{200B} de\u{200D}stination\u{2028}\r\nhandset\u{85}.".into())
                .as_deref(),
            Some("Unknown destination handset .")
        );
        assert_eq!(read("\u{202E}\u{200B} \u{2028}".into()), None);
        // At most MAX_TWILIO_TEXT_CHARS characters, on a character boundary, "…" ending one cut.
        let whole = format!("{}€", "a".repeat(MAX_TWILIO_TEXT_CHARS - 1));
        assert_eq!(read(whole.clone().into()), Some(whole));
        let cut = read(format!("{}€ and more", "a".repeat(MAX_TWILIO_TEXT_CHARS - 2)).into());
        assert_eq!(
            cut,
            Some(format!("{}€…", "a".repeat(MAX_TWILIO_TEXT_CHARS - 2)))
        );
        // A cut between a letter and its accent drops the accent rather than leave it over "…";
        // a cut after a space drops the space.
        let accent =
            read(format!("{}e\u{301}\u{301}z", "a".repeat(MAX_TWILIO_TEXT_CHARS - 3)).into());
        assert_eq!(
            accent,
            Some(format!("{}e…", "a".repeat(MAX_TWILIO_TEXT_CHARS - 3)))
        );
        let space = read(format!("{} bc", "a".repeat(MAX_TWILIO_TEXT_CHARS - 2)).into());
        assert_eq!(
            space,
            Some(format!("{}…", "a".repeat(MAX_TWILIO_TEXT_CHARS - 2)))
        );
        assert_eq!(
            read("é".repeat(5_000).into()).unwrap().chars().count(),
            MAX_TWILIO_TEXT_CHARS
        );
        let resource: MessageResource =
            serde_json::from_str(r#"{"sid":"SM1","status":"sent"}"#).unwrap();
        assert_eq!(resource.error_message, None);
    }
}
