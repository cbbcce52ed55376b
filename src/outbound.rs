//! The one way edgegate builds a client for calls it makes with a credential (Stripe, Twilio,
//! the JWKS host, an OTLP collector, `check`, `keys report`).

use std::time::{Duration, SystemTime};

use url::Url;

/// How long making a connection may take (name resolution, TCP and TLS): past it the call fails
/// as a connect error, which proves the request was never written. Shorter than any call's own
/// timeout, which would otherwise end a connect that cannot be made as a call whose outcome is
/// unknown (an SMS Twilio never got marked `unknown`, and never sent by a retry).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(4);

/// A client builder with edgegate's user agent (`purpose` in brackets, if any) that gives up on a
/// connection after [`CONNECT_TIMEOUT`], follows no redirect and sends no Referer: reqwest drops
/// only the standard credential headers on a redirect to another host, so `apikey`, a
/// collector's own headers and a re-posted body (an SMS) went wherever a 3xx pointed. None of
/// the services called redirects; a 3xx is an answer.
///
/// `targets` are the base URLs the client calls. When one is on this machine, the client uses
/// no proxy at all: reqwest sends even a loopback call through `HTTP_PROXY`/`ALL_PROXY` unless
/// `NO_PROXY` names it, and a proxy cannot reach the container's loopback, while an `http://`
/// call (allowed on loopback only) would show it the credential in plain text.
pub fn client_builder(purpose: Option<&str>, targets: &[&Url]) -> reqwest::ClientBuilder {
    let version = env!("CARGO_PKG_VERSION");
    let agent = match purpose {
        Some(purpose) => format!("edgegate/{version} ({purpose})"),
        None => format!("edgegate/{version}"),
    };
    let builder = reqwest::Client::builder()
        .user_agent(agent)
        .redirect(reqwest::redirect::Policy::none())
        .referer(false)
        .connect_timeout(CONNECT_TIMEOUT);
    if targets.iter().any(|target| is_loopback(target)) {
        builder.no_proxy()
    } else {
        builder
    }
}

/// Builds the client `make` describes. Building loads the system's CA certificates (or those of
/// `SSL_CERT_FILE` / `SSL_CERT_DIR` when set) and fails when none can be loaded, as in an image
/// without ca-certificates; the service still starts then (its plain-HTTP routes and health
/// endpoints need no certificate), with a client that trusts no certificate, so each of its
/// HTTPS requests fails on the server's certificate, and says why once. reqwest's own fallback,
/// `Client::new()`, panics on that very error.
pub fn build(make: impl Fn() -> reqwest::ClientBuilder) -> reqwest::Client {
    static SAID: std::sync::Once = std::sync::Once::new();
    match make().build() {
        Ok(client) => client,
        Err(err) => {
            SAID.call_once(|| {
                let causes = crate::error::causes(&err.into());
                // The one failure seen (rustls-platform-verifier's "No CA certificates were
                // loaded from the system"); any other is named as itself.
                let what = if causes.contains("CA certificates") {
                    NO_CA_CERTIFICATES
                } else {
                    "the HTTP clients could not be built as configured"
                };
                tracing::error!(
                    error = causes,
                    "{what}; HTTPS requests (JWKS, Stripe, Twilio, traces) fail until edgegate \
                     is restarted with that fixed"
                );
            });
            make()
                .tls_certs_only(std::iter::empty())
                .build()
                .expect("a client that trusts no certificate loads none")
        }
    }
}

/// What [`build`] and `edgegate check` say when no CA certificate can be loaded.
pub const NO_CA_CERTIFICATES: &str = "no CA certificates could be loaded (the system's bundle, \
     or SSL_CERT_FILE / SSL_CERT_DIR where set)";

/// Why no CA certificate can be loaded, or `None` when some can: `edgegate check`'s question.
pub fn ca_certificates_problem() -> Option<String> {
    reqwest::Client::builder()
        .build()
        .err()
        .map(|err| crate::error::causes(&err.into()))
}

/// Why an answer's body was not read.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    /// It declared, or brought, more than the cap.
    #[error("an answer larger than {cap} bytes")]
    TooLarge { cap: usize },
    /// The connection failed before its end (the error without its URL).
    #[error("answer cut short")]
    CutShort(#[source] reqwest::Error),
}

/// The answer's body, read chunk by chunk up to `cap` bytes: one that declares a longer
/// `Content-Length`, or goes on past the cap, is dropped (its connection with it) without being
/// buffered whole, so a server cannot make edgegate hold an answer of any size in memory.
pub async fn read_capped(
    mut response: reqwest::Response,
    cap: usize,
) -> Result<Vec<u8>, BodyError> {
    if response
        .content_length()
        .is_some_and(|length| length > cap as u64)
    {
        return Err(BodyError::TooLarge { cap });
    }
    let mut body = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|err| BodyError::CutShort(err.without_url()))?
    {
        if body.len() + chunk.len() > cap {
            return Err(BodyError::TooLarge { cap });
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// The wait an answer's `Retry-After` asks for, in either of its forms (RFC 9110 §10.2.3):
/// seconds, or an HTTP date (one already past asks for none). `None` when there is none, or it
/// cannot be read.
pub fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    retry_after_at(headers, SystemTime::now())
}

fn retry_after_at(headers: &reqwest::header::HeaderMap, now: SystemTime) -> Option<Duration> {
    let value = headers
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// Whether `url` names this machine: a loopback address or `localhost`.
pub fn is_loopback(url: &Url) -> bool {
    match url.host() {
        Some(url::Host::Domain(domain)) => domain.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read as _, Write as _};
    use std::net::TcpListener;

    #[test]
    fn retry_after_reads_seconds_and_http_dates() {
        use reqwest::header::{HeaderMap, HeaderValue, RETRY_AFTER};
        use std::time::{Duration, SystemTime};

        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_445_412_480);
        let read = |value: &'static str| {
            let mut headers = HeaderMap::new();
            headers.insert(RETRY_AFTER, HeaderValue::from_static(value));
            super::retry_after_at(&headers, now)
        };
        assert_eq!(read("120"), Some(Duration::from_secs(120)));
        assert_eq!(read(" 7 "), Some(Duration::from_secs(7)));
        // 2015-10-21 07:28:00 UTC is `now`.
        assert_eq!(
            read("Wed, 21 Oct 2015 07:29:30 GMT"),
            Some(Duration::from_secs(90))
        );
        assert_eq!(read("Wed, 21 Oct 2015 07:00:00 GMT"), Some(Duration::ZERO));
        assert_eq!(read("-5"), None);
        assert_eq!(read("soon"), None);
        assert_eq!(super::retry_after_at(&HeaderMap::new(), now), None);
    }

    /// A 307 is the answer: nothing goes to where it points.
    #[tokio::test]
    async fn a_redirect_is_an_answer_and_is_not_followed() {
        let elsewhere = TcpListener::bind("127.0.0.1:0").unwrap();
        elsewhere.set_nonblocking(true).unwrap();
        let target = format!(
            "http://localhost:{}/",
            elsewhere.local_addr().unwrap().port()
        );
        let redirecting = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!(
            "http://127.0.0.1:{}/",
            redirecting.local_addr().unwrap().port()
        );
        let server = std::thread::spawn(move || {
            let (mut stream, _) = redirecting.accept().unwrap();
            let _ = stream.read(&mut [0u8; 4096]);
            let answer = format!(
                "HTTP/1.1 307 Temporary Redirect\r\nLocation: {target}\r\nContent-Length: 0\r\n\r\n"
            );
            stream.write_all(answer.as_bytes()).unwrap();
        });
        // Bounded: a followed redirect waits on a listener that never answers.
        let client = super::client_builder(Some("test"), &[])
            .timeout(std::time::Duration::from_secs(5))
            .build()
            .unwrap();
        let response = client.post(url).body("secret").send().await.unwrap();
        server.join().unwrap();
        assert_eq!(response.status(), 307);
        assert!(elsewhere.accept().is_err(), "the redirect was followed");
    }
}
