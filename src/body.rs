//! Body extractors whose rejections are the contract's errors, not axum's plain-text ones, and
//! the one budget every buffered request body is taken from.

use std::io::ErrorKind;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use axum::body::HttpBody as _;
use axum::extract::{FromRequest, MatchedPath, Request};
use axum::http::request::Parts;
use axum::http::{Version, header};
use bytes::{Bytes, BytesMut};
use http_body_util::{BodyExt as _, LengthLimitError};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric as _};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use serde::de::DeserializeOwned;

use crate::error::ApiError;
use crate::state::AppState;

/// The request-body bytes buffered at once over every request in flight. Without it the bound
/// was connections × HTTP/2 streams × the route's limit (hundreds of GiB at the defaults); 64
/// MiB is 64 of the largest bodies any route takes, and far more than the ordinary load's
/// (JSON of a few hundred bytes, Stripe's events of a few KiB).
pub const BODY_BUDGET: usize = 64 * 1024 * 1024;

/// Of [`BODY_BUDGET`], what bodies read before their sender is authenticated may hold: those of
/// the signature routes (stripe-webhook, twilio-status), whose signature covers the body and so
/// is checked only once it is read. A well-formed, recent signature header is anyone's to write,
/// so without this share 128 webhook bodies sent but for a byte held the whole budget for the
/// route's 30 s, and every credentialed caller's body was refused 503 meanwhile, again and again.
/// The other half is left to bodies read after a credential was verified.
pub const UNAUTHENTICATED_SHARE: usize = BODY_BUDGET / 2;

/// Request-body bytes buffered at once, over all requests: a body takes its buffer's size as
/// its bytes arrive, and gives it back when the buffer is dropped. A declared length is a
/// promise and takes nothing: when its first 64 KiB were taken up front, 1024 requests that
/// declared 64 KiB and sent nothing (unauthenticated twilio-status callbacks, say) held the whole
/// budget for the route's 30 s. A body that would go over is refused at once, 503. Bodies read
/// before their sender is authenticated also count against their own share of it, half of the
/// limit ([`UNAUTHENTICATED_SHARE`]), so that they can never take what credentialed callers need.
#[derive(Debug)]
pub struct BodyBudget {
    limit: usize,
    taken: AtomicUsize,
    refused: AtomicU64,
    unauthenticated_limit: usize,
    /// Of `taken`, the bytes of unauthenticated bodies.
    unauthenticated: AtomicUsize,
    /// Of `refused`, the unauthenticated bodies.
    unauthenticated_refused: AtomicU64,
}

/// Whose body a reservation is for: it decides the share of the budget the body may hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Sender {
    /// A credential was verified before the body was read: the whole budget.
    Authenticated,
    /// The body is read before its signature can be checked: at most half the budget.
    Unauthenticated,
}

impl BodyBudget {
    /// A budget of `limit` bytes, half of it open to unauthenticated bodies, made once per
    /// [`AppState`] and never freed, so that a buffer holds a plain reference to it: a body costs
    /// two atomic operations on the budget (four for an unauthenticated one) and none on a
    /// reference count.
    pub fn leaked(limit: usize) -> &'static Self {
        Box::leak(Box::new(Self {
            limit,
            taken: AtomicUsize::new(0),
            refused: AtomicU64::new(0),
            unauthenticated_limit: limit / 2,
            unauthenticated: AtomicUsize::new(0),
            unauthenticated_refused: AtomicU64::new(0),
        }))
    }

    /// Exposes the bytes taken and the bodies refused on `/metrics`.
    pub fn register(&'static self, registry: &mut Registry) {
        registry.register_collector(Box::new(BudgetCollector(self)));
    }

    /// The bytes taken now (buffered, or declared and on their way).
    pub fn taken(&self) -> usize {
        self.taken.load(Ordering::Relaxed)
    }

    /// The bytes of unauthenticated bodies taken now.
    pub fn unauthenticated(&self) -> usize {
        self.unauthenticated.load(Ordering::Relaxed)
    }

    fn take(&'static self, bytes: usize, sender: Sender) -> Result<Reservation, ApiError> {
        let mut reservation = Reservation {
            budget: self,
            sender,
            bytes: 0,
        };
        reservation.grow_to(bytes)?;
        Ok(reservation)
    }

    fn refuse(&self, sender: Sender) -> ApiError {
        self.refused.fetch_add(1, Ordering::Relaxed);
        if sender == Sender::Unauthenticated {
            self.unauthenticated_refused.fetch_add(1, Ordering::Relaxed);
        }
        ApiError::Busy(
            "the server holds as many request bodies as it can take; retry shortly".to_owned(),
        )
    }
}

/// Bytes taken from a [`BodyBudget`], given back when dropped.
#[derive(Debug)]
struct Reservation {
    budget: &'static BodyBudget,
    sender: Sender,
    bytes: usize,
}

impl Reservation {
    fn grow_to(&mut self, bytes: usize) -> Result<(), ApiError> {
        let Some(more) = bytes.checked_sub(self.bytes).filter(|&more| more > 0) else {
            return Ok(());
        };
        let budget = self.budget;
        let unauthenticated = self.sender == Sender::Unauthenticated;
        // The share first: a body refused for it never counted against the whole budget.
        if unauthenticated {
            let before = budget.unauthenticated.fetch_add(more, Ordering::Relaxed);
            if before.saturating_add(more) > budget.unauthenticated_limit {
                budget.unauthenticated.fetch_sub(more, Ordering::Relaxed);
                return Err(budget.refuse(self.sender));
            }
        }
        let before = budget.taken.fetch_add(more, Ordering::Relaxed);
        if before.saturating_add(more) > budget.limit {
            budget.taken.fetch_sub(more, Ordering::Relaxed);
            if unauthenticated {
                budget.unauthenticated.fetch_sub(more, Ordering::Relaxed);
            }
            return Err(budget.refuse(self.sender));
        }
        self.bytes = bytes;
        Ok(())
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if self.bytes > 0 {
            self.budget.taken.fetch_sub(self.bytes, Ordering::Relaxed);
            if self.sender == Sender::Unauthenticated {
                self.budget
                    .unauthenticated
                    .fetch_sub(self.bytes, Ordering::Relaxed);
            }
        }
    }
}

/// A body's bytes and what they took from the budget, released together.
struct Buffered {
    bytes: BytesMut,
    _reservation: Reservation,
}

impl AsRef<[u8]> for Buffered {
    fn as_ref(&self) -> &[u8] {
        &self.bytes
    }
}

/// Reads the whole body within the route's limit (the body-limit layer's) and `budget`, in the
/// share of it `sender` may hold.
async fn buffer(
    req: Request,
    budget: &'static BodyBudget,
    sender: Sender,
) -> Result<Bytes, ApiError> {
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<usize>().ok());
    let (parts, mut body) = req.into_parts();
    // A request without a body (jwt-test's GET) touches no budget.
    if body.is_end_stream() {
        return Ok(Bytes::new());
    }
    // The declared length is at most the route's limit (the body-limit layer answered 413 to
    // more before the handler was called). Nothing is taken or allocated before a byte comes.
    let mut reservation = budget.take(0, sender)?;
    let mut bytes = BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|err| read_error(err, &parts))?;
        if let Ok(data) = frame.into_data() {
            let needed = bytes.len() + data.len();
            if needed > bytes.capacity() {
                // Doubling, as a Vec grows, but never past the declared length, so that a body
                // that comes as declared takes its length and no more. Taken before it is
                // allocated, and counted by what is allocated.
                let mut capacity = needed.max(2 * bytes.capacity());
                if let Some(declared) = declared.filter(|&declared| declared >= needed) {
                    capacity = capacity.min(declared);
                }
                reservation.grow_to(capacity)?;
                let mut grown = BytesMut::with_capacity(capacity);
                grown.extend_from_slice(&bytes);
                bytes = grown;
                reservation.grow_to(bytes.capacity())?;
            }
            bytes.extend_from_slice(&data);
        }
    }
    if bytes.is_empty() {
        return Ok(Bytes::new());
    }
    Ok(Bytes::from_owner(Buffered {
        bytes,
        _reservation: reservation,
    }))
}

/// `/metrics`: the bytes the budget holds now, and the bodies it refused.
#[derive(Debug)]
struct BudgetCollector(&'static BodyBudget);

impl Collector for BudgetCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let gauge = |bytes: usize| ConstGauge::new(i64::try_from(bytes).unwrap_or(i64::MAX));
        let taken = gauge(self.0.taken());
        taken.encode(encoder.encode_descriptor(
            "http_request_body_bytes_buffered",
            "Request-body bytes buffered now, over every request (at most 64 MiB)",
            None,
            taken.metric_type(),
        )?)?;
        let unauthenticated = gauge(self.0.unauthenticated());
        unauthenticated.encode(encoder.encode_descriptor(
            "http_request_unauthenticated_body_bytes_buffered",
            "Of the request-body bytes buffered now, those read before their sender was \
             authenticated (stripe-webhook and twilio-status bodies, whose signature covers \
             them; at most 32 MiB)",
            None,
            unauthenticated.metric_type(),
        )?)?;
        let refused = ConstCounter::new(self.0.refused.load(Ordering::Relaxed));
        refused.encode(encoder.encode_descriptor(
            "http_request_bodies_refused",
            "Request bodies answered 503 because the buffered bodies were at their budget \
             (64 MiB), or unauthenticated ones at their share of it (32 MiB)",
            None,
            refused.metric_type(),
        )?)?;
        let refused = ConstCounter::new(self.0.unauthenticated_refused.load(Ordering::Relaxed));
        refused.encode(encoder.encode_descriptor(
            "http_request_unauthenticated_bodies_refused",
            "Of the request bodies answered 503 for the budget, those read before their sender \
             was authenticated (stripe-webhook and twilio-status bodies)",
            None,
            refused.metric_type(),
        )?)
    }
}

/// The raw request body of a route whose credential was verified before it (an extractor
/// before this one in the handler's signature), taken from the [`BodyBudget`] until it is
/// dropped.
pub struct RawBody(pub Bytes);

impl FromRequest<AppState> for RawBody {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        buffer(req, state.body_budget, Sender::Authenticated)
            .await
            .map(RawBody)
    }
}

/// The raw request body of a route whose only credential is a signature over it (the exact
/// bytes), so read before its sender is authenticated: it is taken from the budget's share for
/// unauthenticated bodies ([`UNAUTHENTICATED_SHARE`]) until it is dropped.
pub struct SignedBody(pub Bytes);

impl FromRequest<AppState> for SignedBody {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        buffer(req, state.body_budget, Sender::Unauthenticated)
            .await
            .map(SignedBody)
    }
}

/// A body read to its end and dropped frame by frame (jwt-test's, which `functions.invoke` sends
/// and the answer does not use): the request is complete when answered, within the route's limit,
/// and nothing of it is buffered, so it takes nothing from the [`BodyBudget`].
pub struct IgnoredBody;

impl<S: Send + Sync> FromRequest<S> for IgnoredBody {
    type Rejection = ApiError;

    async fn from_request(req: Request, _state: &S) -> Result<Self, Self::Rejection> {
        let (parts, mut body) = req.into_parts();
        while let Some(frame) = body.frame().await {
            frame.map_err(|err| read_error(err, &parts))?;
        }
        Ok(IgnoredBody)
    }
}

/// A JSON body of a route whose credential was verified before it (taken from the
/// [`BodyBudget`] as a [`RawBody`] is), whatever its `Content-Type` says (supabase-js's `functions.invoke` labels a
/// string body `text/plain`; the Edge Functions read it with `req.json()` all the same); one that
/// is not JSON is 400 `INVALID_REQUEST` with serde's description of the problem.
pub struct Json<T>(pub T);

impl<T: DeserializeOwned> FromRequest<AppState> for Json<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        let body = buffer(req, state.body_budget, Sender::Authenticated).await?;
        let mut json = serde_json::Deserializer::from_slice(&body);
        let value = serde_path_to_error::deserialize(&mut json).map_err(|err| {
            let (path, err) = (err.path().to_string(), err.into_inner());
            let problem = match err.classify() {
                serde_json::error::Category::Data => "is not the JSON this route takes",
                _ => "is not JSON",
            };
            // `.` is the path of the whole body: only a field's is worth naming.
            let at = if path == "." {
                String::new()
            } else {
                format!("{path}: ")
            };
            ApiError::InvalidRequest(format!("the request body {problem}: {at}{err}"))
        })?;
        json.end().map_err(|err| {
            ApiError::InvalidRequest(format!("the request body is not JSON: {err}"))
        })?;
        Ok(Json(value))
    }
}

/// 413 when the body-limit layer cut the body off at the route's limit; the client gone when it
/// hung up or reset the stream before the body's end (counted as 499, as a hang-up during the
/// handler is, not as a malformed body); 400 otherwise (a chunked body that breaks its encoding).
fn read_error(err: axum::Error, request: &Parts) -> ApiError {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(&err);
    let mut hyper_error = false;
    while let Some(error) = cause {
        if error.is::<LengthLimitError>() {
            // The limit named as the body-limit layer names it for a declared length: the
            // route's own, else the service's.
            let limit = request
                .extensions
                .get::<MatchedPath>()
                .and_then(|pattern| crate::routes::body_limit(pattern.as_str()))
                .unwrap_or(crate::server::middleware::DEFAULT_BODY_LIMIT);
            return ApiError::PayloadTooLarge(format!(
                "the request body is larger than the {limit}-byte limit of this route"
            ));
        }
        if let Some(error) = error.downcast_ref::<hyper::Error>() {
            hyper_error = true;
            if error.is_incomplete_message() || error.is_canceled() || error.is_closed() {
                return client_closed();
            }
        }
        // HTTP/1: the connection ended (or was reset) before the body did. A malformed chunk is
        // `InvalidData` or `InvalidInput`.
        if let Some(error) = error.downcast_ref::<std::io::Error>()
            && matches!(
                error.kind(),
                ErrorKind::UnexpectedEof
                    | ErrorKind::ConnectionReset
                    | ErrorKind::ConnectionAborted
                    | ErrorKind::BrokenPipe
            )
        {
            return client_closed();
        }
        cause = error.source();
    }
    // Over HTTP/2 a body that fails to be read is a stream reset, by the client or by h2 for the
    // client's breach of the protocol, or a connection lost: either way the stream is gone, and
    // with it any answer.
    if hyper_error && request.version >= Version::HTTP_2 {
        return client_closed();
    }
    ApiError::InvalidRequest(format!("the request body could not be read: {err}"))
}

fn client_closed() -> ApiError {
    ApiError::ClientClosed(
        "the client closed the connection or the stream before sending the whole request body"
            .to_owned(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reservation_past_the_limit_is_refused_and_each_is_given_back_when_dropped() {
        let budget = BodyBudget::leaked(100);
        let first = budget.take(60, Sender::Authenticated).unwrap();
        let mut second = budget.take(40, Sender::Authenticated).unwrap();
        assert!(matches!(
            budget.take(1, Sender::Authenticated),
            Err(ApiError::Busy(_))
        ));
        assert!(second.grow_to(41).is_err());
        assert_eq!((budget.taken(), second.bytes), (100, 40));
        drop(first);
        second.grow_to(100).unwrap();
        assert_eq!(budget.taken(), 100);
        drop(second);
        assert_eq!(budget.taken(), 0);
    }

    #[test]
    fn unauthenticated_bodies_hold_at_most_half_and_leave_the_rest_to_authenticated_ones() {
        let budget = BodyBudget::leaked(100);
        let mut unauthenticated = budget.take(40, Sender::Unauthenticated).unwrap();
        assert!(unauthenticated.grow_to(51).is_err(), "past its share");
        assert!(budget.take(11, Sender::Unauthenticated).is_err());
        assert_eq!((budget.taken(), budget.unauthenticated()), (40, 40));
        let authenticated = budget.take(60, Sender::Authenticated).unwrap();
        // Within the share, but past the whole budget.
        assert!(budget.take(1, Sender::Unauthenticated).is_err());
        assert_eq!((budget.taken(), budget.unauthenticated()), (100, 40));
        assert_eq!(budget.refused.load(Ordering::Relaxed), 3);
        assert_eq!(budget.unauthenticated_refused.load(Ordering::Relaxed), 3);
        drop(authenticated);
        unauthenticated.grow_to(50).unwrap();
        assert_eq!((budget.taken(), budget.unauthenticated()), (50, 50));
        drop(unauthenticated);
        assert_eq!((budget.taken(), budget.unauthenticated()), (0, 0));
    }
}
