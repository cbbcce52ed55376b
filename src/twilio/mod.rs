//! Twilio SMS: sending (`send`), the REST client (`client`), and delivery-status callbacks
//! (`status`, checked by `signature`). No axum here; `routes::sms` adapts it to HTTP.

pub mod client;
pub mod send;
pub mod signature;
pub mod status;

use url::Url;

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
