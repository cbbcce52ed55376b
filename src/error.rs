//! The one error type of the HTTP API, mapped once to the contract's `{"code","message"}` body.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::auth::AuthError;
use crate::stripe::reconcile::ReconcileError;
use crate::stripe::sync::SyncError;
use crate::stripe::webhook::WebhookError;
use crate::twilio::SmsError;

/// Everything a handler can answer besides success. Internal causes are logged, never sent.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// A 401 with one of the contract's `UNAUTHORIZED_*` codes.
    #[error("{message}")]
    Unauthorized { code: &'static str, message: String },
    #[error("{0}")]
    ForbiddenRole(String),
    #[error("{0}")]
    InvalidSignature(String),
    #[error("{0}")]
    InvalidRequest(String),
    /// The client went away while its request body was being read (an HTTP/1 hang-up, an
    /// HTTP/2 reset): 400 `INVALID_REQUEST` for a client that only half-closed and still reads,
    /// marked [`crate::telemetry::ClientClosed`] so that it is logged and counted as a request
    /// the client cancelled (499), not as an answered 400.
    #[error("{0}")]
    ClientClosed(String),
    #[error("{field}: {message}")]
    ValidationFailed { field: String, message: String },
    /// 409 `SYNC_IN_PROGRESS`: the job's lock is held; `Retry-After` says when to try again
    /// (on SQLite, when the holder's lease can be taken).
    #[error("{message}")]
    SyncInProgress {
        message: String,
        retry_after_secs: u64,
    },
    #[error("{0}")]
    Conflict(String),
    /// 409 `CONFLICT` for a request whose twin is still being answered: try again after
    /// `Retry-After`.
    #[error("{message}")]
    ConflictInProgress {
        message: String,
        retry_after_secs: u64,
    },
    /// The body is over the route's limit; the message says the limit when it is known.
    #[error("{0}")]
    PayloadTooLarge(String),
    #[error("{message}")]
    RateLimited {
        message: String,
        retry_after_secs: u64,
    },
    #[error("{0}")]
    UpstreamUnavailable(String),
    /// 502 `UPSTREAM_UNAVAILABLE` because the upstream is throttling and asked to wait longer
    /// than the request could: `Retry-After` passes its wait on.
    #[error("{message}")]
    UpstreamThrottled {
        message: String,
        retry_after_secs: u64,
    },
    #[error("{0} is not configured")]
    NotConfigured(&'static str),
    #[error("{0}")]
    NotReady(String),
    /// The buffered request bodies of all requests are at their budget (`body::BODY_BUDGET`):
    /// 503 `NOT_READY`, the contract's closest code (it has none for an overloaded server), with
    /// `Retry-After: 1`.
    #[error("{0}")]
    Busy(String),
    /// `/readyz`'s 503: the body carries each dependency's check beside the code and message.
    #[error("a dependency is not ready; see checks")]
    DependenciesNotReady(serde_json::Value),
    #[error("no route for {0}")]
    NotFound(String),
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("the request took longer than {0} seconds")]
    Timeout(u64),
    /// Anything unexpected: logged with its cause chain, answered as an opaque 500.
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    code: &'a str,
    message: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    checks: Option<&'a serde_json::Value>,
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            Self::Unauthorized { .. } => StatusCode::UNAUTHORIZED,
            Self::ForbiddenRole(_) => StatusCode::FORBIDDEN,
            Self::InvalidSignature(_) | Self::InvalidRequest(_) | Self::ClientClosed(_) => {
                StatusCode::BAD_REQUEST
            }
            Self::ValidationFailed { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            Self::SyncInProgress { .. } | Self::Conflict(_) | Self::ConflictInProgress { .. } => {
                StatusCode::CONFLICT
            }
            Self::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::UpstreamUnavailable(_) | Self::UpstreamThrottled { .. } => {
                StatusCode::BAD_GATEWAY
            }
            Self::NotConfigured(_)
            | Self::NotReady(_)
            | Self::Busy(_)
            | Self::DependenciesNotReady(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            Self::Unauthorized { code, .. } => code,
            Self::ForbiddenRole(_) => "FORBIDDEN_ROLE",
            Self::InvalidSignature(_) => "INVALID_SIGNATURE",
            Self::InvalidRequest(_) | Self::ClientClosed(_) => "INVALID_REQUEST",
            Self::ValidationFailed { .. } => "VALIDATION_FAILED",
            Self::SyncInProgress { .. } => "SYNC_IN_PROGRESS",
            Self::Conflict(_) | Self::ConflictInProgress { .. } => "CONFLICT",
            Self::PayloadTooLarge(_) => "PAYLOAD_TOO_LARGE",
            Self::RateLimited { .. } => "RATE_LIMITED",
            Self::UpstreamUnavailable(_) | Self::UpstreamThrottled { .. } => "UPSTREAM_UNAVAILABLE",
            Self::NotConfigured(_) => "NOT_CONFIGURED",
            Self::NotReady(_) | Self::Busy(_) | Self::DependenciesNotReady(_) => "NOT_READY",
            Self::NotFound(_) => "NOT_FOUND",
            Self::MethodNotAllowed => "METHOD_NOT_ALLOWED",
            Self::Timeout(_) => "TIMEOUT",
            Self::Internal(_) => "INTERNAL_ERROR",
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let message = match &self {
            Self::Internal(cause) => {
                tracing::error!(error = crate::error::causes(cause), "internal error");
                "internal error; the request id identifies it in the logs".to_owned()
            }
            other => other.to_string(),
        };
        let status = self.status();
        let code = self.code();
        let mut response = (
            status,
            Json(ErrorBody {
                code,
                message: &message,
                checks: match &self {
                    Self::DependenciesNotReady(checks) => Some(checks),
                    _ => None,
                },
            }),
        )
            .into_response();
        let headers = response.headers_mut();
        match &self {
            Self::Unauthorized { .. } => {
                headers.insert("sb-error-code", HeaderValue::from_static(code));
                headers.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer error=\"invalid_token\""),
                );
            }
            Self::RateLimited {
                retry_after_secs, ..
            }
            | Self::SyncInProgress {
                retry_after_secs, ..
            }
            | Self::ConflictInProgress {
                retry_after_secs, ..
            }
            | Self::UpstreamThrottled {
                retry_after_secs, ..
            } => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(*retry_after_secs));
            }
            Self::Busy(_) => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            Self::ClientClosed(_) => {
                response
                    .extensions_mut()
                    .insert(crate::telemetry::ClientClosed);
            }
            _ => {}
        }
        response
    }
}

pub type ApiResult<T> = Result<T, ApiError>;

// Each domain's own error, mapped to the contract once, here.

impl From<AuthError> for ApiError {
    fn from(err: AuthError) -> Self {
        ApiError::Unauthorized {
            code: err.code(),
            message: err.message(),
        }
    }
}

impl From<SyncError> for ApiError {
    fn from(err: SyncError) -> Self {
        match err {
            SyncError::InProgress(ref held) => in_progress(&err, held),
            SyncError::Upstream { .. } => ApiError::UpstreamUnavailable(err.to_string()),
            SyncError::Internal(cause) => store_failure(cause, "sync"),
        }
    }
}

impl From<ReconcileError> for ApiError {
    fn from(err: ReconcileError) -> Self {
        match err {
            ReconcileError::InProgress(ref held) => in_progress(&err, held),
            ReconcileError::Upstream { .. } => ApiError::UpstreamUnavailable(err.to_string()),
            ReconcileError::Internal(cause) => store_failure(cause, "reconcile"),
        }
    }
}

fn in_progress(err: &impl std::fmt::Display, held: &crate::store::LockHeld) -> ApiError {
    ApiError::SyncInProgress {
        message: err.to_string(),
        retry_after_secs: held.retry_after().as_secs(),
    }
}

/// A failure behind which the database could not be had at all (connection refused or lost,
/// pool exhausted, file locked, lock wait timed out: `store::is_unavailable`) is 503
/// `NOT_READY`, as on the SMS routes: nothing was written, and a retry later may go through. So
/// is a run whose lock was lost (its session ended, its lease taken), saying so. Anything else
/// is a 500.
fn store_failure(cause: anyhow::Error, what: &str) -> ApiError {
    if let Some(lost) = cause.downcast_ref::<crate::store::LockLost>() {
        tracing::warn!(error = causes(&cause), "{what}: its lock was lost");
        ApiError::NotReady(match lost {
            crate::store::LockLost::Session => "the run's lock session was ended (by the \
                database or a pooler), so the run stopped where its row says; run it again"
                .into(),
            crate::store::LockLost::Taken => "the run's lock expired unrenewed (its renewals \
                kept waiting, or the wall clock stepped forward past its lease) and another run \
                took it, so this run stopped where its row says; run it again once that one ends"
                .into(),
        })
    } else if crate::store::is_unavailable(&cause) {
        tracing::warn!(error = causes(&cause), "{what}: database unavailable");
        ApiError::NotReady("the database is unavailable; try again later".into())
    } else {
        ApiError::Internal(cause)
    }
}

impl From<WebhookError> for ApiError {
    fn from(err: WebhookError) -> Self {
        match err {
            WebhookError::Signature(cause) => ApiError::InvalidSignature(cause.to_string()),
            WebhookError::Unreadable(message) => ApiError::InvalidRequest(message),
            WebhookError::Store(cause) => store_failure(cause, "stripe webhook"),
            WebhookError::NeedsSecretKey(_) => {
                tracing::warn!(error = %err, "same-second event refused");
                ApiError::NotConfigured("STRIPE_SECRET_KEY")
            }
            WebhookError::Upstream { .. } => ApiError::UpstreamUnavailable(err.to_string()),
        }
    }
}

impl From<SmsError> for ApiError {
    fn from(err: SmsError) -> Self {
        match err {
            SmsError::Invalid { field, message } => ApiError::ValidationFailed { field, message },
            SmsError::NotConfigured(what) => ApiError::NotConfigured(what),
            SmsError::DatabaseUnavailable(message) => ApiError::NotReady(message),
            SmsError::IdempotencyConflict(message) => ApiError::Conflict(message),
            SmsError::InProgress {
                message,
                retry_after_secs,
            } => ApiError::ConflictInProgress {
                message,
                retry_after_secs,
            },
            SmsError::RateLimited {
                message,
                retry_after_secs,
            } => ApiError::RateLimited {
                message,
                retry_after_secs,
            },
            SmsError::Upstream(message) => ApiError::UpstreamUnavailable(message),
            SmsError::Throttled {
                message,
                retry_after_secs,
            } => ApiError::UpstreamThrottled {
                message,
                retry_after_secs,
            },
            SmsError::BadSignature(message) => ApiError::InvalidSignature(message),
            SmsError::BadCallback(message) => ApiError::InvalidRequest(message),
            SmsError::Internal(cause) => ApiError::Internal(cause),
        }
    }
}

/// One cause's own text. A PostgreSQL error is its message alone: sqlx's `Display` appends the
/// line of PostgreSQL's C source that raised it (`… due to lock timeout at line 3312`), which
/// tells an operator nothing and differs between server builds.
fn cause_text(cause: &(dyn std::error::Error + 'static)) -> String {
    let text = cause.to_string();
    if let Some(pg) = cause.downcast_ref::<sqlx::postgres::PgDatabaseError>() {
        return pg.message().to_owned();
    }
    if let Some(sqlx::Error::Database(db)) = cause.downcast_ref::<sqlx::Error>()
        && db
            .try_downcast_ref::<sqlx::postgres::PgDatabaseError>()
            .is_some()
    {
        return format!("error returned from database: {}", db.message());
    }
    text
}

/// `text` without the ` at line N` sqlx appends to each of PostgreSQL's `messages` wherever it
/// repeats one (the `sqlx::Error` that carries it, and errors that print their source in their
/// own text, as a failed migration's `MigrateError` does, before it in the chain).
fn without_source_lines(mut text: String, messages: &[String]) -> String {
    for message in messages {
        let marker = format!("{message} at line ");
        let mut out = String::with_capacity(text.len());
        let mut rest = text.as_str();
        while let Some(at) = rest.find(&marker) {
            let after = &rest[at + marker.len()..];
            let digits = after.bytes().take_while(u8::is_ascii_digit).count();
            if digits == 0 {
                out.push_str(&rest[..at + marker.len()]);
            } else {
                out.push_str(&rest[..at + message.len()]);
            }
            rest = &after[digits..];
        }
        out.push_str(rest);
        text = out;
    }
    text
}

/// The messages of the PostgreSQL errors in `err`'s chain.
fn postgres_messages(err: &anyhow::Error) -> Vec<String> {
    err.chain()
        .filter_map(|cause| match cause.downcast_ref::<sqlx::Error>() {
            Some(sqlx::Error::Database(db)) => db
                .try_downcast_ref::<sqlx::postgres::PgDatabaseError>()
                .map(|pg| pg.message().to_owned()),
            _ => None,
        })
        .filter(|message| !message.is_empty())
        .collect()
}

/// An error and its causes, `outer: inner: root`, like `{:#}`, but each cause once: some errors
/// (sqlx's among them) put their source in their own message too, which `{:#}` then repeats
/// (a failed migration printed the database's message three times).
/// PostgreSQL's errors without their source line ([`cause_text`]).
pub fn causes(err: &anyhow::Error) -> String {
    let messages = postgres_messages(err);
    let mut out = String::new();
    let mut last = String::new();
    for cause in err.chain() {
        let text = without_source_lines(cause_text(cause), &messages);
        if !last.is_empty() && last.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
        last = text;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::causes;

    /// An error that prints its source in its own message, as sqlx's do.
    #[derive(Debug, thiserror::Error)]
    #[error("while executing migration 1: {0}")]
    struct Wrapping(#[source] Root);

    #[derive(Debug, thiserror::Error)]
    #[error("relation \"audit_log\" already exists")]
    struct Root;

    #[test]
    fn each_cause_is_printed_once() {
        let err = anyhow::Error::new(Wrapping(Root)).context("applying migrations");
        assert_eq!(
            causes(&err),
            "applying migrations: while executing migration 1: relation \"audit_log\" already exists"
        );
    }

    #[test]
    fn causes_that_do_not_repeat_are_all_kept() {
        let err = anyhow::anyhow!("connection refused")
            .context("connecting to PostgreSQL")
            .context("DATABASE_URL postgres://…");
        assert_eq!(
            causes(&err),
            "DATABASE_URL postgres://…: connecting to PostgreSQL: connection refused"
        );
    }
}
