//! Body extractors whose rejections are the contract's errors, not axum's plain-text ones, and
//! the one budget every buffered request body is taken from.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use axum::body::{Body, HttpBody as _};
use axum::extract::{FromRequest, Request};
use axum::http::header;
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

/// Request-body bytes buffered at once, over all requests: a body takes its buffer's size as
/// its bytes arrive, and gives it back when the buffer is dropped. A declared length is a
/// promise and takes nothing: when its first 64 KiB were taken up front, 1024 requests that
/// declared 64 KiB and sent nothing (unauthenticated twilio-status callbacks, say) held the whole
/// budget for the route's 30 s. A body that would go over is refused at once, 503.
#[derive(Debug)]
pub struct BodyBudget {
    limit: usize,
    taken: AtomicUsize,
    refused: AtomicU64,
}

impl BodyBudget {
    /// A budget of `limit` bytes, made once per [`AppState`] and never freed, so that a buffer
    /// holds a plain reference to it: a body costs two atomic operations on the budget and
    /// none on a reference count.
    pub fn leaked(limit: usize) -> &'static Self {
        Box::leak(Box::new(Self {
            limit,
            taken: AtomicUsize::new(0),
            refused: AtomicU64::new(0),
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

    fn take(&'static self, bytes: usize) -> Result<Reservation, ApiError> {
        let mut reservation = Reservation {
            budget: self,
            bytes: 0,
        };
        reservation.grow_to(bytes)?;
        Ok(reservation)
    }
}

/// Bytes taken from a [`BodyBudget`], given back when dropped.
#[derive(Debug)]
struct Reservation {
    budget: &'static BodyBudget,
    bytes: usize,
}

impl Reservation {
    fn grow_to(&mut self, bytes: usize) -> Result<(), ApiError> {
        let Some(more) = bytes.checked_sub(self.bytes).filter(|&more| more > 0) else {
            return Ok(());
        };
        let before = self.budget.taken.fetch_add(more, Ordering::Relaxed);
        if before.saturating_add(more) > self.budget.limit {
            self.budget.taken.fetch_sub(more, Ordering::Relaxed);
            self.budget.refused.fetch_add(1, Ordering::Relaxed);
            return Err(ApiError::Busy(
                "the server holds as many request bodies as it can take; retry shortly".to_owned(),
            ));
        }
        self.bytes = bytes;
        Ok(())
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if self.bytes > 0 {
            self.budget.taken.fetch_sub(self.bytes, Ordering::Relaxed);
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

/// Reads the whole body within the route's limit (the body-limit layer's) and `budget`.
async fn buffer(req: Request, budget: &'static BodyBudget) -> Result<Bytes, ApiError> {
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<usize>().ok());
    let mut body: Body = req.into_body();
    // A request without a body (jwt-test's GET) touches no budget.
    if body.is_end_stream() {
        return Ok(Bytes::new());
    }
    // The declared length is at most the route's limit (the body-limit layer answered 413 to
    // more before the handler was called). Nothing is taken or allocated before a byte comes.
    let mut reservation = budget.take(0)?;
    let mut bytes = BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(read_error)?;
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
        let taken = ConstGauge::new(i64::try_from(self.0.taken()).unwrap_or(i64::MAX));
        taken.encode(encoder.encode_descriptor(
            "http_request_body_bytes_buffered",
            "Request-body bytes buffered now, over every request (at most 64 MiB)",
            None,
            taken.metric_type(),
        )?)?;
        let refused = ConstCounter::new(self.0.refused.load(Ordering::Relaxed));
        refused.encode(encoder.encode_descriptor(
            "http_request_bodies_refused",
            "Request bodies answered 503 because the buffered bodies were at their budget",
            None,
            refused.metric_type(),
        )?)
    }
}

/// The raw request body (signature checks need the exact bytes), taken from the
/// [`BodyBudget`] until it is dropped.
pub struct RawBody(pub Bytes);

impl FromRequest<AppState> for RawBody {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        buffer(req, state.body_budget).await.map(RawBody)
    }
}

/// A body read to its end and dropped frame by frame (jwt-test's, which `functions.invoke` sends
/// and the answer does not use): the request is complete when answered, within the route's limit,
/// and nothing of it is buffered, so it takes nothing from the [`BodyBudget`].
pub struct IgnoredBody;

impl<S: Send + Sync> FromRequest<S> for IgnoredBody {
    type Rejection = ApiError;

    async fn from_request(req: Request, _state: &S) -> Result<Self, Self::Rejection> {
        let mut body = req.into_body();
        while let Some(frame) = body.frame().await {
            frame.map_err(read_error)?;
        }
        Ok(IgnoredBody)
    }
}

/// A JSON body, whatever its `Content-Type` says (supabase-js's `functions.invoke` labels a
/// string body `text/plain`; the Edge Functions read it with `req.json()` all the same); one that
/// is not JSON is 400 `INVALID_REQUEST` with serde's description of the problem.
pub struct Json<T>(pub T);

impl<T: DeserializeOwned> FromRequest<AppState> for Json<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        let body = buffer(req, state.body_budget).await?;
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

/// 413 when the body-limit layer cut the body off at the route's limit; 400 otherwise.
fn read_error(err: axum::Error) -> ApiError {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(&err);
    while let Some(error) = cause {
        if error.is::<LengthLimitError>() {
            return ApiError::PayloadTooLarge(
                "the request body is larger than this route accepts".to_owned(),
            );
        }
        cause = error.source();
    }
    ApiError::InvalidRequest(format!("the request body could not be read: {err}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reservation_past_the_limit_is_refused_and_each_is_given_back_when_dropped() {
        let budget = BodyBudget::leaked(100);
        let first = budget.take(60).unwrap();
        let mut second = budget.take(40).unwrap();
        assert!(matches!(budget.take(1), Err(ApiError::Busy(_))));
        assert!(second.grow_to(41).is_err());
        assert_eq!((budget.taken(), second.bytes), (100, 40));
        drop(first);
        second.grow_to(100).unwrap();
        assert_eq!(budget.taken(), 100);
        drop(second);
        assert_eq!(budget.taken(), 0);
    }
}
