//! `send-sms` and `twilio-status`: thin adapters over `twilio::send` and `twilio::status`.

use axum::extract::{FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::{StatusCode, Uri};

use crate::body::{Json, SignedBody};
use crate::credentials::ServiceRole;
use crate::error::{ApiError, ApiResult};
use crate::routes::DatabaseReady;
use crate::server::middleware::Arrival;
use crate::state::AppState;
use crate::twilio::send::{SendSmsRequest, SmsReceipt, Submission, send_sms as send};
use crate::twilio::status::{
    Callback, SHARED_KEY_SETTINGS, apply_callback, check_before_body, shared_key_refusal,
};

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
    _: DatabaseReady,
    Json(request): Json<SendSmsRequest>,
) -> ApiResult<(StatusCode, axum::Json<SmsReceipt>)> {
    let audit = principal.audit(&app.clock, "send_sms", "pending");
    let sent = send(
        app.store.clone(),
        app.config.clone(),
        app.twilio_http.clone(),
        app.clock.clone(),
        app.sms_metrics.clone(),
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
    TwilioSignature {
        signature,
        shared_key,
    }: TwilioSignature,
    uri: Uri,
    _: DatabaseReady,
    SignedBody(body): SignedBody,
) -> ApiResult<StatusCode> {
    let callback = Callback {
        signature: Some(&signature),
        query: uri.query(),
        body: &body,
    };
    apply_callback(
        &app.store,
        &app.config,
        &app.clock,
        &app.sms_metrics,
        callback,
    )
    .await
    .map_err(|err| {
        if shared_key {
            shared_key_refusal(err)
        } else {
            err
        }
    })?;
    Ok(StatusCode::NO_CONTENT)
}

/// A status callback's `X-Twilio-Signature`, checked before its body is read, as a webhook's
/// `Stripe-Signature` is: Twilio and `PUBLIC_URL` are configured (503 `NOT_CONFIGURED`) and the
/// header is there and well-formed (400 `INVALID_SIGNATURE`). Read first, a body kept an unsigned
/// request waiting, and holding its share of the body budget, for the route's 30 s. The signature
/// itself is verified over the body afterwards.
pub struct TwilioSignature {
    signature: String,
    /// Whether the callback says it is signed with a shared key ([`SHARED_KEY_SETTINGS`]), which
    /// a refusal then names.
    shared_key: bool,
}

impl FromRequestParts<AppState> for TwilioSignature {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let signature = parts
            .headers
            .get("x-twilio-signature")
            .map(|value| value.to_str())
            .transpose()
            .map_err(|_| ApiError::InvalidSignature("X-Twilio-Signature is not text".to_owned()))?;
        let shared_key = parts.headers.contains_key(SHARED_KEY_SETTINGS);
        let (_, _, signature) = check_before_body(&state.config, signature).map_err(|err| {
            if shared_key {
                shared_key_refusal(err)
            } else {
                err
            }
        })?;
        Ok(Self {
            signature: signature.to_owned(),
            shared_key,
        })
    }
}
