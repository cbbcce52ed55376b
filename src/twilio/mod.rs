//! Twilio SMS: sending (`send`), the REST client (`client`), delivery-status callbacks
//! (`status`, checked by `signature`), and recovering statuses whose callbacks were lost
//! (`recover`), counted in `metrics`. No axum here; `routes::sms` adapts it to HTTP.

pub mod client;
pub mod metrics;
pub mod recover;
pub mod send;
pub mod signature;
pub mod status;

use url::Url;

/// Why a send or a status callback was refused; `error.rs` maps it to the contract's answers.
#[derive(Debug, thiserror::Error)]
pub enum SmsError {
    /// The request breaks one of `send-sms`'s rules; `field` names the member.
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
    #[error("{0} is not configured")]
    NotConfigured(&'static str),
    /// The database did not answer; nothing was reserved or sent.
    #[error("{0}")]
    DatabaseUnavailable(String),
    /// The idempotency key was used for a different message.
    #[error("{0}")]
    IdempotencyConflict(String),
    /// A send with the idempotency key is still under way: its outcome is not known yet.
    #[error("{message}")]
    InProgress {
        message: String,
        retry_after_secs: u64,
    },
    #[error("{message}")]
    RateLimited {
        message: String,
        retry_after_secs: u64,
    },
    /// Twilio refused, throttled past the retries, or did not confirm the message.
    #[error("{0}")]
    Upstream(String),
    /// Twilio throttled, asking for a wait longer than the send could take: nothing was sent,
    /// and the caller is told to wait as long.
    #[error("{message}")]
    Throttled {
        message: String,
        retry_after_secs: u64,
    },
    /// A status callback whose `X-Twilio-Signature` is missing, malformed or wrong.
    #[error("{0}")]
    BadSignature(String),
    /// A signed status callback without the members it needs.
    #[error("{0}")]
    BadCallback(String),
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

impl SmsError {
    /// A store error: `DatabaseUnavailable` with `message` when the database could not be
    /// reached (nothing was written, the caller may retry), else `Internal`.
    pub fn from_store(err: anyhow::Error, what: &str, message: &str) -> Self {
        if crate::store::is_unavailable(&err) {
            tracing::warn!(
                error = crate::error::causes(&err),
                "{what}: database unavailable"
            );
            Self::DatabaseUnavailable(message.to_owned())
        } else {
            Self::Internal(err)
        }
    }

    /// The audit row's outcome: the contract's code, in lower case.
    pub fn outcome(&self) -> &'static str {
        match self {
            Self::Invalid { .. } => "validation_failed",
            Self::NotConfigured(_) => "not_configured",
            Self::DatabaseUnavailable(_) => "not_ready",
            Self::IdempotencyConflict(_) | Self::InProgress { .. } => "conflict",
            Self::RateLimited { .. } => "rate_limited",
            Self::Upstream(_) | Self::Throttled { .. } => "upstream_unavailable",
            Self::BadSignature(_) => "invalid_signature",
            Self::BadCallback(_) => "invalid_request",
            Self::Internal(_) => "internal_error",
        }
    }
}

/// The path Twilio posts delivery statuses to.
pub const STATUS_CALLBACK_PATH: &str = "/functions/v1/twilio-status";

/// The URL handed to Twilio as `StatusCallback`, and so the one its signatures cover.
pub fn status_callback_url(public_url: &Url) -> String {
    format!(
        "{}{STATUS_CALLBACK_PATH}",
        public_url.as_str().trim_end_matches('/')
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_callback_url_keeps_a_base_path_and_never_doubles_the_slash() {
        let bare = Url::parse("https://edge.example.com").unwrap();
        assert_eq!(
            status_callback_url(&bare),
            "https://edge.example.com/functions/v1/twilio-status"
        );
        let sub = Url::parse("https://example.com/edge/").unwrap();
        assert_eq!(
            status_callback_url(&sub),
            "https://example.com/edge/functions/v1/twilio-status"
        );
    }
}
