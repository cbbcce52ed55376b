//! A small typed Stripe client over the service's one reqwest client, speaking Stripe's wire
//! format: `Authorization: Bearer sk_…`, list pagination with `limit`, `starting_after` and
//! `has_more`, JSON answers read leniently (see `objects`).
//!
//! Why not async-stripe (1.0.0-rc.10, the version crates.io offers): it brings its own hyper-util
//! client and hyper-rustls connector (a second HTTP client stack beside reqwest, which cannot
//! share our client); its backoff is `2^n` seconds with no jitter and cannot be tuned or made
//! fast for tests; without a `Stripe-Should-Retry` header it does not retry a 5xx; and its
//! generated types are strict about fields a differently pinned API version may not send.
//!
//! Retries: a failed attempt (connection error, per-attempt timeout, truncated or unreadable
//! body, 409, 429, 5xx) is tried again after an exponentially growing, jittered delay, up to
//! `RetryPolicy::max_attempts`. `Stripe-Should-Retry: true|false` overrides that judgement.
//! A 429's `Retry-After` (seconds or an HTTP date) is waited out when it is longer than the
//! backoff, at most `MAX_RETRY_AFTER`, and still leaves the call inside
//! `RetryPolicy::worst_case`; when it would not, the call gives up at once rather than retry
//! before Stripe said to.
//! An answer larger than `MAX_ANSWER_BYTES` is refused and not retried; a listing whose next
//! page would start after an object a page already started after (an upstream that ignores
//! `starting_after`) fails instead of looping.

use std::time::Duration;

use secrecy::{ExposeSecret as _, SecretString};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use url::Url;

use crate::backoff;
use crate::config::StripeConfig;

/// Stripe's largest page.
pub const PAGE_SIZE: u32 = 100;

/// The longest `Retry-After` waited for; a longer one ends the call at once.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);

/// The largest answer read. A page of 100 objects is well under a megabyte; an answer past this
/// (a misbehaving upstream or proxy) is refused for good rather than read into memory until the
/// attempt times out, and then again on every retry.
pub const MAX_ANSWER_BYTES: usize = 32 * 1024 * 1024;

/// How hard the client tries before giving up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts per request, the first included.
    pub max_attempts: u32,
    /// The delay before the first retry; each further retry doubles it, up to `max_delay`.
    pub base_delay: Duration,
    pub max_delay: Duration,
    /// How long one attempt may take, answer body included.
    pub attempt_timeout: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 4,
            base_delay: Duration::from_millis(500),
            max_delay: Duration::from_secs(8),
            attempt_timeout: Duration::from_secs(20),
        }
    }
}

impl RetryPolicy {
    /// The wait before retry number `retry` (1-based): "equal jitter", half the exponential step
    /// plus a random part of the other half, so instances that failed together spread out.
    pub fn delay(&self, retry: u32) -> Duration {
        backoff::equal_jitter(backoff::exponential(self.base_delay, retry, self.max_delay))
    }

    /// This policy held to `cap`: each limit the tighter of the two.
    pub fn capped(self, cap: Self) -> Self {
        Self {
            max_attempts: self.max_attempts.min(cap.max_attempts),
            base_delay: self.base_delay.min(cap.base_delay),
            max_delay: self.max_delay.min(cap.max_delay),
            attempt_timeout: self.attempt_timeout.min(cap.attempt_timeout),
        }
    }

    /// The longest a request can take under this policy: every attempt timing out, and every
    /// wait between them at its longest.
    pub fn worst_case(&self) -> Duration {
        let waits: Duration = (1..self.max_attempts)
            .map(|retry| backoff::exponential(self.base_delay, retry, self.max_delay))
            .sum();
        self.attempt_timeout.saturating_mul(self.max_attempts) + waits
    }
}

/// Why a Stripe call failed, in words for the person who reads the answer or the run row.
/// Messages never hold the API key, and never blame Stripe for what edgegate found itself.
#[derive(Debug, thiserror::Error)]
pub enum StripeError {
    /// Every attempt failed in a way another may not (a 5xx, 409 or 429, no answer, an answer cut
    /// short); `alike` when each failed as the last did.
    #[error("{last}{}{}", tries(*.attempts, *.alike), after_giving_up(.gave_up.as_deref()))]
    Unavailable {
        attempts: u32,
        alike: bool,
        last: Failure,
        /// Why no attempt was left to make, when attempts remained.
        gave_up: Option<String>,
    },
    /// An answer that retrying will not change (a 400, a `Stripe-Should-Retry: false`, an
    /// answer past `MAX_ANSWER_BYTES`).
    #[error("{0}; not retried")]
    Rejected(String),
    /// 401 or 403: the key is wrong, revoked, or (a restricted key) lacks the permission. Every
    /// call of the kind would be refused alike, whatever object it is about.
    #[error("Stripe refused the key: it answered {0}")]
    KeyRefused(String),
    /// 404: the object does not exist (any more).
    #[error("Stripe has no such object: it answered {0}")]
    NotFound(String),
    /// 400 on `starting_after`: the object a listing was to continue after is gone (deleted, or
    /// no longer matching the list's filter, since the page before). Starting over works.
    #[error("Stripe no longer lists the object a page was to start after: it answered {0}")]
    CursorGone(String),
    /// Pages that do not make one listing (a page ending where an earlier one did, an empty page
    /// that says more follow): found by edgegate, not said by Stripe, and as likely a proxy's
    /// doing. Not retried.
    #[error("{0}")]
    BrokenListing(String),
}

/// How often an attempt failed, after the last failure: nothing for one attempt.
fn tries(attempts: u32, alike: bool) -> String {
    match (attempts, alike) {
        (0 | 1, _) => String::new(),
        (n, true) => format!(", {n} times"),
        (n, false) => format!(" (the last of {n} attempts)"),
    }
}

/// Why the call stopped with attempts left, after what the attempts met.
fn after_giving_up(why: Option<&str>) -> String {
    why.map(|why| format!("; {why}")).unwrap_or_default()
}

/// What one failed attempt met.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Failure {
    /// An error status and what Stripe's body says of it: `HTTP 500 (api_error)`.
    #[error("Stripe answered {0}")]
    Answered(String),
    /// No answer: no connection, or none within the attempt's time.
    #[error("Stripe could not be reached ({0})")]
    NoAnswer(String),
    /// An answer that could not be read: cut short, not what was asked for, or too large.
    #[error("Stripe's answer could not be read ({0})")]
    Unreadable(String),
}

impl Failure {
    /// The failure without the words around it: `HTTP 404 (invalid_request_error)`.
    fn detail(&self) -> &str {
        match self {
            Self::Answered(detail) | Self::NoAnswer(detail) | Self::Unreadable(detail) => detail,
        }
    }
}

/// One list page as Stripe answers it. A page without `has_more` is unreadable (and retried):
/// taken for the end, it would end a listing early and deactivate everything after it.
#[derive(Debug, Deserialize)]
pub struct ListPage<T> {
    pub data: Vec<T>,
    pub has_more: bool,
    /// When Stripe answered (epoch ms, whole seconds): its `Date` header, in Stripe's clock,
    /// not ours. `None` when the answer had none that reads as an HTTP date.
    #[serde(skip)]
    pub answered_at: Option<i64>,
}

/// Objects listed by id, so the next page can start after the last one.
pub trait Listed {
    fn id(&self) -> &str;
}

#[derive(Deserialize)]
struct ErrorBody {
    error: ErrorDetail,
}

#[derive(Deserialize)]
struct ErrorDetail {
    #[serde(rename = "type")]
    kind: Option<String>,
    code: Option<String>,
    /// The request parameter the error is about.
    param: Option<String>,
}

/// What went wrong with one attempt, and whether another may succeed.
struct AttemptFailure {
    retry: bool,
    /// A 404 that no `Stripe-Should-Retry` asked to retry.
    missing: bool,
    /// A 400 about `starting_after` that no `Stripe-Should-Retry` asked to retry.
    cursor_gone: bool,
    /// A 401 or 403 that no `Stripe-Should-Retry` asked to retry.
    key_refused: bool,
    /// A 429's `Retry-After`: how long Stripe asked to wait before the next attempt.
    retry_after: Option<Duration>,
    reason: Failure,
}

impl AttemptFailure {
    /// A failure another attempt may not meet: no answer, or one cut short or unreadable.
    fn transient(reason: Failure) -> Self {
        Self {
            retry: true,
            missing: false,
            cursor_gone: false,
            key_refused: false,
            retry_after: None,
            reason,
        }
    }
}

/// The Stripe API with one secret key.
#[derive(Clone)]
pub struct StripeClient {
    http: reqwest::Client,
    base: Url,
    key: SecretString,
    policy: RetryPolicy,
}

impl std::fmt::Debug for StripeClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StripeClient")
            .field("base", &self.base.as_str())
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

impl StripeClient {
    /// `None` when `STRIPE_SECRET_KEY` is not set.
    pub fn from_config(
        http: reqwest::Client,
        config: &StripeConfig,
        policy: RetryPolicy,
    ) -> Option<Self> {
        let key = config.secret_key.clone()?;
        let mut base = config.api_base.clone();
        // `join` replaces the last segment of a base without a trailing slash.
        if !base.path().ends_with('/') {
            base.set_path(&format!("{}/", base.path()));
        }
        Some(Self {
            http,
            base,
            key,
            policy,
        })
    }

    /// This client, trying no harder than `cap` allows.
    pub fn capped(&self, cap: RetryPolicy) -> Self {
        Self {
            policy: self.policy.capped(cap),
            ..self.clone()
        }
    }

    /// One page of `/v1/{resource}` after `starting_after`, narrowed by `filters` (such as
    /// `created[gte]`). What no filter lists is Stripe's choice: `/v1/prices` lists active
    /// prices only, `/v1/products` every product.
    pub async fn list_page<T: DeserializeOwned>(
        &self,
        resource: &str,
        filters: &[(&str, String)],
        starting_after: Option<&str>,
    ) -> Result<ListPage<T>, StripeError> {
        let mut url = self.url(&format!("v1/{resource}"))?;
        {
            let mut query = url.query_pairs_mut();
            query.append_pair("limit", &PAGE_SIZE.to_string());
            for (name, value) in filters {
                query.append_pair(name, value);
            }
            if let Some(after) = starting_after {
                query.append_pair("starting_after", after);
            }
        }
        let (mut page, answered_at) = self.get_dated::<ListPage<T>>(url).await?;
        page.answered_at = answered_at;
        Ok(page)
    }

    /// One object, `GET /v1/{resource}/{id}`: its current state.
    pub async fn retrieve<T: DeserializeOwned>(
        &self,
        resource: &str,
        id: &str,
    ) -> Result<T, StripeError> {
        self.retrieve_expanded(resource, id, &[]).await
    }

    /// One object with the fields `expand` names (`expand[]=…`), which Stripe otherwise leaves
    /// out of its answer or sends as ids.
    pub async fn retrieve_expanded<T: DeserializeOwned>(
        &self,
        resource: &str,
        id: &str,
        expand: &[&str],
    ) -> Result<T, StripeError> {
        // One path segment: an id from an event must not walk elsewhere in the API.
        let mut url = self.url(&format!("v1/{resource}/"))?;
        url.path_segments_mut()
            .map_err(|()| StripeError::Rejected(format!("bad Stripe URL for {resource}")))?
            .pop_if_empty()
            .push(id);
        if !expand.is_empty() {
            let mut query = url.query_pairs_mut();
            for field in expand {
                query.append_pair("expand[]", field);
            }
        }
        self.get(url).await
    }

    /// Whether the key is a live-mode one (`None`: unknown), asked of `GET /v1/products?limit=1`,
    /// which a restricted key with the read access docs/OPERATIONS.md lists can call (not so
    /// `/v1/balance`). Stripe's own `livemode` of the product listed; with none listed, the key's
    /// prefix (`sk_live_`, `rk_test_`…).
    pub async fn livemode(&self) -> Result<Option<bool>, StripeError> {
        #[derive(Deserialize)]
        struct Object {
            livemode: Option<bool>,
        }
        #[derive(Deserialize)]
        struct Page {
            data: Vec<Object>,
        }
        let mut url = self.url("v1/products")?;
        url.query_pairs_mut().append_pair("limit", "1");
        let page: Page = self.get(url).await?;
        let listed = page.data.first().and_then(|object| object.livemode);
        Ok(listed.or_else(|| key_livemode(self.key.expose_secret())))
    }

    /// The key's mode by its prefix alone (`sk_live_`, `rk_test_`…), asking Stripe nothing:
    /// `Some(true)` for live mode, `None` for a prefix that does not say.
    pub fn key_livemode(&self) -> Option<bool> {
        key_livemode(self.key.expose_secret())
    }

    /// Lists one event (`GET /v1/events?limit=1`): the reconciliation reads nothing else, and a
    /// restricted key may read products without reading events.
    pub async fn can_list_events(&self) -> Result<(), StripeError> {
        let mut url = self.url("v1/events")?;
        url.query_pairs_mut().append_pair("limit", "1");
        let _: serde_json::Value = self.get(url).await?;
        Ok(())
    }

    fn url(&self, path: &str) -> Result<Url, StripeError> {
        self.base
            .join(path)
            .map_err(|err| StripeError::Rejected(format!("bad Stripe URL for {path}: {err}")))
    }

    async fn get<T: DeserializeOwned>(&self, url: Url) -> Result<T, StripeError> {
        self.get_dated(url).await.map(|(value, _)| value)
    }

    /// As `get`, with the time (epoch ms) of the answer's `Date` header, when it has one.
    async fn get_dated<T: DeserializeOwned>(
        &self,
        url: Url,
    ) -> Result<(T, Option<i64>), StripeError> {
        let started = tokio::time::Instant::now();
        let mut attempt = 0;
        // A Retry-After was waited out: the backoff alone no longer keeps the call inside its
        // longest time, so every later retry must fit it too.
        let mut waited_out = false;
        // Whether every attempt so far failed as the last one did, for the message.
        let mut alike = true;
        let mut previous: Option<Failure> = None;
        loop {
            attempt += 1;
            let failure = match self.attempt(&url, attempt - 1).await {
                Ok(value) => return Ok(value),
                Err(failure) => failure,
            };
            if failure.missing {
                return Err(StripeError::NotFound(failure.reason.detail().to_owned()));
            }
            if failure.cursor_gone {
                return Err(StripeError::CursorGone(failure.reason.detail().to_owned()));
            }
            if failure.key_refused {
                return Err(StripeError::KeyRefused(failure.reason.detail().to_owned()));
            }
            if !failure.retry {
                return Err(StripeError::Rejected(failure.reason.to_string()));
            }
            alike &= previous
                .as_ref()
                .is_none_or(|before| *before == failure.reason);
            previous = Some(failure.reason.clone());
            if attempt >= self.policy.max_attempts {
                return Err(StripeError::Unavailable {
                    attempts: attempt,
                    alike,
                    last: failure.reason,
                    gave_up: None,
                });
            }
            let mut delay = self.policy.delay(attempt);
            if let Some(asked) = failure.retry_after {
                delay = delay.max(asked.min(MAX_RETRY_AFTER));
                waited_out = true;
            }
            // Another attempt after the wait must still fit the call's longest time, and a
            // wait longer than edgegate waits is not cut short.
            let beyond_max = failure
                .retry_after
                .is_some_and(|asked| asked > MAX_RETRY_AFTER);
            if beyond_max
                || waited_out
                    && started.elapsed() + delay + self.policy.attempt_timeout
                        > self.policy.worst_case()
            {
                let gave_up = match failure.retry_after {
                    Some(asked) if beyond_max => format!(
                        "its Retry-After {} s is longer than edgegate waits ({} s)",
                        asked.as_secs(),
                        MAX_RETRY_AFTER.as_secs()
                    ),
                    Some(asked) => format!(
                        "waiting its Retry-After {} s would run past this call's deadline",
                        asked.as_secs()
                    ),
                    None => "another attempt would run past this call's deadline".to_owned(),
                };
                return Err(StripeError::Unavailable {
                    attempts: attempt,
                    alike,
                    last: failure.reason,
                    gave_up: Some(gave_up),
                });
            }
            tracing::warn!(
                path = url.path(),
                attempt,
                reason = %failure.reason,
                delay_ms = delay.as_millis() as u64,
                "Stripe request failed; retrying"
            );
            tokio::time::sleep(delay).await;
        }
    }

    /// One attempt, within `attempt_timeout` (answer body included). The HTTP client's own timer
    /// ends it, not one around it: an attempt cut off from outside left its client span with no
    /// status and no `error.type`, where one the client times out says `timeout`.
    async fn attempt<T: DeserializeOwned>(
        &self,
        url: &Url,
        resends: u32,
    ) -> Result<(T, Option<i64>), AttemptFailure> {
        let timeout = self.policy.attempt_timeout;
        let request = self
            .http
            .get(url.clone())
            .bearer_auth(self.key.expose_secret())
            .timeout(timeout);
        let sent = tokio::time::Instant::now();
        let response = crate::telemetry::send_again(request, resends)
            .await
            .map_err(|err| {
                // A timeout (the attempt's, or the connect's) is no connection failure; other
                // errors with their causes (`…: tcp connect error: Connection refused`): reqwest's
                // own message alone ("error sending request") does not say what failed.
                AttemptFailure::transient(Failure::NoAnswer(if err.is_timeout() {
                    no_answer_within(sent.elapsed().min(timeout))
                } else {
                    crate::error::causes(&anyhow::Error::new(err.without_url()))
                }))
            })?;
        let status = response.status();
        let should_retry = response
            .headers()
            .get("stripe-should-retry")
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.parse::<bool>().ok());
        let retry_after =
            crate::outbound::retry_after(response.headers()).filter(|_| status.as_u16() == 429);
        let answered_at = answer_date(response.headers());
        let body = read_capped(response, MAX_ANSWER_BYTES, timeout).await?;
        let body = crate::stripe::objects::without_nul(&body);
        if status.is_success() {
            return serde_json::from_slice(&body)
                .map(|value| (value, answered_at))
                .map_err(|err| {
                    AttemptFailure::transient(Failure::Unreadable(format!(
                        "HTTP {}: {err}",
                        status.as_u16()
                    )))
                });
        }
        let error = serde_json::from_slice::<ErrorBody>(&body).ok();
        let param = error.as_ref().and_then(|body| body.error.param.clone());
        // `(invalid_request_error, resource_missing, on starting_after)`: Stripe's type, code
        // and parameter, those it gave.
        let detail = error
            .map(|body| {
                let said: Vec<String> = [
                    body.error.kind,
                    body.error.code,
                    body.error.param.map(|param| format!("on {param}")),
                ]
                .into_iter()
                .flatten()
                .filter(|said| !said.is_empty())
                .collect();
                said
            })
            .filter(|said| !said.is_empty())
            .map(|said| format!(" ({})", said.join(", ")))
            .unwrap_or_default();
        let transient =
            status.as_u16() == 409 || status.as_u16() == 429 || status.is_server_error();
        let retry = should_retry.unwrap_or(transient);
        Err(AttemptFailure {
            retry,
            missing: status.as_u16() == 404 && !retry,
            cursor_gone: status.as_u16() == 400
                && !retry
                && param.as_deref() == Some("starting_after"),
            key_refused: matches!(status.as_u16(), 401 | 403) && !retry,
            retry_after,
            reason: Failure::Answered(format!("HTTP {}{detail}", status.as_u16())),
        })
    }
}

/// An answer's `Date` (RFC 9110 §6.6.1: when the server made it, by its clock) in epoch ms.
fn answer_date(headers: &reqwest::header::HeaderMap) -> Option<i64> {
    let value = headers.get(reqwest::header::DATE)?.to_str().ok()?;
    let at = httpdate::parse_http_date(value).ok()?;
    let ms = at.duration_since(std::time::UNIX_EPOCH).ok()?.as_millis();
    i64::try_from(ms).ok()
}

/// The answer's body, read up to `cap` bytes. A body cut short is a transient failure like a
/// dropped connection, one still coming when the attempt's `timeout` ends it an answer not
/// given in time; one past the cap is final: another attempt would only read it again.
async fn read_capped(
    response: reqwest::Response,
    cap: usize,
    timeout: Duration,
) -> Result<Vec<u8>, AttemptFailure> {
    let status = response.status().as_u16();
    crate::outbound::read_capped(response, cap)
        .await
        .map_err(|err| match err {
            crate::outbound::BodyError::TooLarge { cap } => AttemptFailure {
                retry: false,
                missing: false,
                cursor_gone: false,
                key_refused: false,
                retry_after: None,
                reason: Failure::Unreadable(format!(
                    "HTTP {status}, larger than {} MiB",
                    cap / (1024 * 1024)
                )),
            },
            crate::outbound::BodyError::CutShort(err) if err.is_timeout() => {
                AttemptFailure::transient(Failure::NoAnswer(no_answer_within(timeout)))
            }
            crate::outbound::BodyError::CutShort(err) => {
                AttemptFailure::transient(Failure::Unreadable(format!("cut short: {err}")))
            }
        })
}

/// The mode a key's prefix names: `sk_live_`/`rk_live_` live, `sk_test_`/`rk_test_` test.
fn key_livemode(key: &str) -> Option<bool> {
    let mode = key
        .strip_prefix("sk_")
        .or_else(|| key.strip_prefix("rk_"))?;
    if mode.starts_with("live_") {
        Some(true)
    } else if mode.starts_with("test_") {
        Some(false)
    } else {
        None
    }
}

/// Every object of a list, one page at a time (never the whole list in memory).
pub struct Pages<'a, T> {
    client: &'a StripeClient,
    resource: &'static str,
    filters: Vec<(&'static str, String)>,
    cursor: Option<String>,
    /// Every cursor a page was asked after, with the page that ended with it: an upstream that
    /// ignores `starting_after` answers a page already walked, and following it would loop for
    /// ever.
    used: std::collections::HashMap<String, usize>,
    /// Pages answered so far.
    page: usize,
    /// When Stripe answered the latest page (`ListPage::answered_at`).
    answered_at: Option<i64>,
    done: bool,
    _item: std::marker::PhantomData<T>,
}

impl<'a, T: DeserializeOwned + Listed> Pages<'a, T> {
    pub fn new(client: &'a StripeClient, resource: &'static str) -> Self {
        Self::filtered(client, resource, Vec::new())
    }

    /// Only the objects that match `filters`, such as `("created[gte]", "1700000000")`.
    pub fn filtered(
        client: &'a StripeClient,
        resource: &'static str,
        filters: Vec<(&'static str, String)>,
    ) -> Self {
        Self {
            client,
            resource,
            filters,
            cursor: None,
            used: std::collections::HashMap::new(),
            page: 0,
            answered_at: None,
            done: false,
            _item: std::marker::PhantomData,
        }
    }

    /// The next page, or `None` once Stripe said `has_more: false`.
    pub async fn next(&mut self) -> Result<Option<Vec<T>>, StripeError> {
        if self.done {
            return Ok(None);
        }
        let page: ListPage<T> = self
            .client
            .list_page(self.resource, &self.filters, self.cursor.as_deref())
            .await?;
        self.page += 1;
        self.answered_at = page.answered_at;
        match page.data.last() {
            Some(last) if page.has_more => {
                let next = last.id().to_owned();
                if let Some(earlier) = self.used.insert(next.clone(), self.page) {
                    return Err(StripeError::BrokenListing(format!(
                        "the list of {} did not advance: page {} ended with {next}, as page \
                         {earlier} did, and said more follow (as when a proxy drops \
                         starting_after)",
                        self.resource, self.page
                    )));
                }
                self.cursor = Some(next);
            }
            // It has nothing to continue after, and the listing is not complete.
            None if page.has_more => {
                return Err(StripeError::BrokenListing(format!(
                    "the list of {} stopped short: page {} was empty and said more follow",
                    self.resource, self.page
                )));
            }
            _ => self.done = true,
        }
        Ok(Some(page.data))
    }
}

impl<T> Pages<'_, T> {
    /// When Stripe answered the page `next` returned last, by its `Date` (epoch ms); `None`
    /// before the first page, or when that answer had no readable `Date`.
    pub fn answered_at(&self) -> Option<i64> {
        self.answered_at
    }
}

/// An attempt's failure when Stripe gave no answer in `waited`: whole seconds as such, else
/// to a tenth.
fn no_answer_within(waited: Duration) -> String {
    if waited.subsec_millis() == 0 {
        format!("no answer within {} s", waited.as_secs())
    } else {
        format!("no answer within {:.1} s", waited.as_secs_f64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_prefix_names_its_mode() {
        assert_eq!(key_livemode("sk_live_abc"), Some(true));
        assert_eq!(key_livemode("rk_live_abc"), Some(true));
        assert_eq!(key_livemode("sk_test_abc"), Some(false));
        assert_eq!(key_livemode("rk_test_abc"), Some(false));
        assert_eq!(key_livemode("pk_live_abc"), None);
        assert_eq!(key_livemode("sk_other"), None);
    }

    /// A Stripe on loopback that takes every connection and never answers, a configuration that
    /// points at it, and its base URL; abort the task to close its connections.
    async fn silent_stripe() -> (crate::config::Config, Url, tokio::task::JoinHandle<()>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base: Url = format!("http://{}/", listener.local_addr().unwrap())
            .parse()
            .unwrap();
        let held = tokio::spawn(async move {
            let mut open = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                open.push(socket);
            }
        });
        let config = crate::config::Config::from_lookup(|name| match name {
            "STRIPE_SECRET_KEY" => Some("sk_test_0123456789".to_owned()),
            "STRIPE_API_BASE" => Some(base.to_string()),
            _ => None,
        })
        .unwrap();
        (config, base, held)
    }

    /// A Stripe that takes the connection and never answers is said to have timed out, with
    /// the time waited, whichever timer fires: the HTTP client's own timeout was reported as
    /// "connection failed: error sending request".
    #[tokio::test]
    async fn a_stripe_that_never_answers_is_reported_as_a_timeout() {
        let (config, _, held) = silent_stripe().await;
        let policy = RetryPolicy {
            max_attempts: 1,
            attempt_timeout: Duration::from_secs(1),
            ..RetryPolicy::default()
        };
        for client_timeout in [None, Some(Duration::from_millis(300))] {
            let mut http = reqwest::Client::builder();
            if let Some(timeout) = client_timeout {
                http = http.timeout(timeout);
            }
            let client =
                StripeClient::from_config(http.build().unwrap(), &config.stripe, policy).unwrap();
            let err = client.livemode().await.unwrap_err().to_string();
            assert!(
                err.contains("no answer within") && !err.contains("error sending request"),
                "{client_timeout:?}: {err}"
            );
        }
        held.abort();
    }

    /// An attempt Stripe never answers ends its client span as one the HTTP client timed out
    /// does (JWKS, Twilio): an error status and `error.type` `timeout`. The call was cut off
    /// from outside and the span ended with no status and no `error.type`.
    #[tokio::test]
    async fn an_attempt_stripe_never_answers_ends_its_client_span_as_a_timeout() {
        let (config, _, held) = silent_stripe().await;
        let policy = RetryPolicy {
            max_attempts: 2,
            base_delay: Duration::from_millis(10),
            max_delay: Duration::from_millis(10),
            attempt_timeout: Duration::from_millis(300),
        };
        let client =
            StripeClient::from_config(reqwest::Client::new(), &config.stripe, policy).unwrap();
        let captured = crate::telemetry::testing::capture();
        let err = client.livemode().await.unwrap_err().to_string();
        assert!(err.contains("no answer within 0.3 s), 2 times"), "{err}");
        let spans = captured.ended();
        assert_eq!(spans.len(), 2, "one client span an attempt: {spans:#?}");
        for span in &spans {
            assert_eq!(
                crate::telemetry::testing::attribute(span, "error.type").as_deref(),
                Some("timeout"),
                "{span:#?}"
            );
            assert!(
                matches!(span.status, opentelemetry::trace::Status::Error { .. }),
                "{span:#?}"
            );
        }
        held.abort();
    }

    /// OpenTelemetry's HTTP conventions: a client span has `url.full` (here without its query,
    /// which may carry a cursor or, for another host, a key), and a retry's
    /// `http.request.resend_count`.
    #[tokio::test]
    async fn client_spans_carry_the_url_and_the_resend_count() {
        let (config, base, held) = silent_stripe().await;
        let policy = RetryPolicy {
            max_attempts: 3,
            base_delay: Duration::from_millis(10),
            max_delay: Duration::from_millis(10),
            attempt_timeout: Duration::from_millis(200),
        };
        let client =
            StripeClient::from_config(reqwest::Client::new(), &config.stripe, policy).unwrap();
        let captured = crate::telemetry::testing::capture();
        client.livemode().await.unwrap_err();
        let spans = captured.ended();
        assert_eq!(spans.len(), 3, "{spans:#?}");
        let attribute = |span, key| crate::telemetry::testing::attribute(span, key);
        for (resends, span) in spans.iter().enumerate() {
            assert_eq!(
                attribute(span, "url.full"),
                Some(format!("{base}v1/products?…")),
                "{span:#?}"
            );
            let expected = (resends > 0).then(|| resends.to_string());
            assert_eq!(
                attribute(span, "http.request.resend_count"),
                expected,
                "{span:#?}"
            );
        }
        held.abort();
    }

    #[test]
    fn delays_grow_jittered_and_capped() {
        let policy = RetryPolicy {
            max_attempts: 10,
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_millis(1000),
            attempt_timeout: Duration::from_secs(1),
        };
        for _ in 0..50 {
            let first = policy.delay(1);
            assert!(first >= Duration::from_millis(50) && first <= Duration::from_millis(100));
            let third = policy.delay(3);
            assert!(third >= Duration::from_millis(200) && third <= Duration::from_millis(400));
            let capped = policy.delay(30);
            assert!(capped >= Duration::from_millis(500) && capped <= Duration::from_millis(1000));
        }
        let spread: std::collections::HashSet<_> = (0..50).map(|_| policy.delay(4)).collect();
        assert!(spread.len() > 1, "the delay is jittered");
    }
}
