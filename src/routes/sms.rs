//! `send-sms` and `twilio-status`: thin adapters over `twilio::send` and `twilio::status`.

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};

use crate::body::{Json, RawBody};
use crate::credentials::ServiceRole;
use crate::error::{ApiError, ApiResult};
use crate::server::middleware::Arrival;
use crate::state::AppState;
use crate::twilio::send::{SendSmsRequest, SmsReceipt, Submission, send_sms as send};
use crate::twilio::status::{Callback, apply_callback};

#[utoipa::path(
    post,
    path = "/functions/v1/send-sms",
    tag = "functions",
    summary = "Send one SMS through Twilio",
    request_body(
        content = SendSmsRequest,
        description = "JSON, whatever the Content-Type says (supabase-js sends a string body as text/plain)"
    ),
    security(("bearer" = []), ("apikey" = [])),
    responses(
        (status = 202, description = "Handed to Twilio (or the earlier send with this idempotency key)", body = SmsReceipt),
        crate::routes::openapi::SmsErrors,
    )
)]
pub async fn send_sms(
    State(app): State<AppState>,
    Arrival(arrival): Arrival,
    ServiceRole(principal): ServiceRole,
    Json(request): Json<SendSmsRequest>,
) -> ApiResult<(StatusCode, axum::Json<SmsReceipt>)> {
    let audit = principal.audit(&app.clock, "send_sms", "pending");
    let sent = send(
        app.store.clone(),
        app.config.clone(),
        app.http.clone(),
        app.clock.clone(),
        &app.sms_sends,
        Submission { request, arrival },
        audit,
    )
    .await?;
    Ok((StatusCode::ACCEPTED, axum::Json(sent.receipt)))
}

#[utoipa::path(
    post,
    path = crate::twilio::STATUS_CALLBACK_PATH,
    tag = "functions",
    summary = "Twilio's message status callback",
    request_body(
        content = crate::routes::openapi::TwilioStatusForm,
        content_type = "application/x-www-form-urlencoded"
    ),
    params(
        ("id" = Option<String>, Query, description = "The message's id, which edgegate puts in the StatusCallback URL it gives Twilio (signed with it)"),
    ),
    security(("twilio_signature" = [])),
    responses(
        (status = 204, description = "Applied (an unknown status is ignored)"),
        crate::routes::openapi::TwilioStatusErrors,
    )
)]
pub async fn twilio_status(
    State(app): State<AppState>,
    headers: HeaderMap,
    uri: Uri,
    RawBody(body): RawBody,
) -> ApiResult<StatusCode> {
    let signature = headers
        .get("x-twilio-signature")
        .map(|value| value.to_str())
        .transpose()
        .map_err(|_| ApiError::InvalidSignature("X-Twilio-Signature is not text".to_owned()))?;
    let callback = Callback {
        signature,
        query: uri.query(),
        body: &body,
    };
    apply_callback(&app.store, &app.config, &app.clock, callback).await?;
    Ok(StatusCode::NO_CONTENT)
}
