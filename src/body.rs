//! Body extractors whose rejections are the contract's errors, not axum's plain-text ones.

use axum::extract::rejection::BytesRejection;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use bytes::Bytes;
use serde::de::DeserializeOwned;

use crate::error::ApiError;

/// The raw request body (signature checks need the exact bytes).
pub struct RawBody(pub Bytes);

impl<S: Send + Sync> FromRequest<S> for RawBody {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        Bytes::from_request(req, state)
            .await
            .map(RawBody)
            .map_err(body_error)
    }
}

/// A JSON body, whatever its `Content-Type` says (supabase-js's `functions.invoke` labels a
/// string body `text/plain`; the Edge Functions read it with `req.json()` all the same); one that
/// is not JSON is 400 `INVALID_REQUEST` with serde's description of the problem.
pub struct Json<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for Json<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let body = Bytes::from_request(req, state).await.map_err(body_error)?;
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

fn body_error(err: BytesRejection) -> ApiError {
    if err.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::PayloadTooLarge("the request body is larger than this route accepts".to_owned())
    } else {
        ApiError::InvalidRequest(format!(
            "the request body could not be read: {}",
            err.body_text()
        ))
    }
}
