//! The OpenAPI 3.1 document, generated from the handlers' `#[utoipa::path]` attributes and the
//! types they answer with. `ApiDoc`'s `paths(...)` is the one list to extend with a new route;
//! `tests/it/openapi.rs` fails when a route of the router is missing from it, or when
//! `docs/openapi.json` differs from what this module generates.

use std::collections::BTreeMap;
use std::sync::LazyLock;

use axum::http::header;
use axum::response::IntoResponse;
use serde_json::Value;
use utoipa::openapi::header::HeaderBuilder;
use utoipa::openapi::response::{Response, ResponseBuilder};
use utoipa::openapi::schema::{AllOfBuilder, ObjectBuilder, Type};
use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{Content, Header, Ref, RefOr};
use utoipa::{IntoResponses, Modify, OpenApi, ToSchema};

use crate::auth::{JwksStatus, KeyOrigin, KeySource};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "edgegate",
        description = "Supabase Edge Functions (jwt-test, Stripe catalogue sync and webhook, Twilio SMS) \
                       behind one credential layer that accepts the legacy HS256 secret and the JWKS \
                       signing keys at once. Every error is `{\"code\",\"message\"}`; each error \
                       response lists the codes it can carry."
    ),
    paths(
        super::jwt_test::jwt_test,
        super::stripe::sync_products,
        super::stripe::webhook,
        super::sms::send_sms,
        super::sms::twilio_status,
        super::admin::signing_keys,
        super::admin::refresh,
        super::stripe::reconcile,
        openapi_json,
        super::health::healthz,
        super::health::readyz,
        super::health::metrics,
    ),
    components(schemas(ErrorBody)),
    modifiers(&SecuritySchemes, &OperationIds),
    tags(
        (name = "functions", description = "The Edge Functions edgegate takes over"),
        (name = "admin", description = "Key ring and legacy secret evidence (service_role only)"),
        (name = "operations", description = "Health, readiness, metrics and this document"),
    )
)]
pub struct ApiDoc;

/// The document as pretty JSON, as served and as committed in `docs/openapi.json`.
pub fn document_json() -> String {
    let mut json = ApiDoc::openapi()
        .to_pretty_json()
        .expect("the OpenAPI document serializes");
    json.push('\n');
    json
}

static DOCUMENT: LazyLock<String> = LazyLock::new(document_json);

/// This document.
#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "operations",
    responses(
        (status = 200, description = "The OpenAPI 3.1 document of this API", body = Object),
        CommonErrors,
    )
)]
pub async fn openapi_json() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/json")],
        DOCUMENT.as_str(),
    )
}

/// The contract's error body (documentation of `crate::error::ApiError`'s answer).
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct ErrorBody {
    /// A stable code from the contract's error table.
    code: String,
    /// For a person; never holds a secret or a whole token.
    message: String,
}

/// A handler documented for several methods (`jwt-test`'s `method(get, post)`) gives each of
/// them its name as operationId, which OpenAPI requires to be unique (client generators name
/// their methods after it): each such operation gets its method appended (`jwt_test_get`,
/// `jwt_test_post`).
struct OperationIds;

impl Modify for OperationIds {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let mut uses = BTreeMap::<String, usize>::new();
        for item in openapi.paths.paths.values_mut() {
            for (_, id) in operation_ids(item) {
                if let Some(id) = id {
                    *uses.entry(id.clone()).or_default() += 1;
                }
            }
        }
        for item in openapi.paths.paths.values_mut() {
            for (method, id) in operation_ids(item) {
                if let Some(id) = id
                    && uses.get(id.as_str()).is_some_and(|&count| count > 1)
                {
                    *id = format!("{id}_{method}");
                }
            }
        }
    }
}

/// The operationId of each operation of `item`, with its method.
fn operation_ids(
    item: &mut utoipa::openapi::PathItem,
) -> impl Iterator<Item = (&'static str, &mut Option<String>)> {
    [
        ("get", &mut item.get),
        ("put", &mut item.put),
        ("post", &mut item.post),
        ("delete", &mut item.delete),
        ("options", &mut item.options),
        ("head", &mut item.head),
        ("patch", &mut item.patch),
        ("trace", &mut item.trace),
    ]
    .into_iter()
    .filter_map(|(method, operation)| {
        operation
            .as_mut()
            .map(|operation| (method, &mut operation.operation_id))
    })
}

struct SecuritySchemes;

impl Modify for SecuritySchemes {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        let header = |name: &str, description: &str| {
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::with_description(
                name,
                description,
            )))
        };
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .description(Some(
                        "A JWT signed by the legacy HS256 secret or by a signing key of the JWKS \
                         (ES256, RS256, EdDSA). A Bearer JWT wins over `apikey`.",
                    ))
                    .build(),
            ),
        );
        components.add_security_scheme(
            "apikey",
            header(
                "apikey",
                "A publishable (`sb_publishable_…`) or secret (`sb_secret_…`) API key, or a legacy `anon`/`service_role` key (an HS256 JWT the legacy secret verifies); a secret or service_role key counts as service_role.",
            ),
        );
        components.add_security_scheme(
            "stripe_signature",
            header(
                "Stripe-Signature",
                "Stripe's signature of the raw body with the webhook secret.",
            ),
        );
        components.add_security_scheme(
            "twilio_signature",
            header(
                "X-Twilio-Signature",
                "Twilio's signature of PUBLIC_URL's callback URL and the form parameters: the \
                 base64 HMAC-SHA1 keyed by the account's auth token. Twilio's shared-key \
                 signatures (X-Twilio-Webhooks-Signature-Settings, HMAC_SHA256) are not \
                 supported.",
            ),
        );
    }
}

/// One error status and the codes it can carry.
type Failure = (u16, &'static [&'static str]);

/// What every path answers whatever its route does: 405 to a method it does not take (with
/// `Allow`), 413 to a declared `Content-Length` over the service-wide limit (refused before any
/// handler runs, so on a `GET` too), a caught panic, the request timeout.
const ANY_ROUTE: &[Failure] = &[
    (405, &["METHOD_NOT_ALLOWED"]),
    (413, &["PAYLOAD_TOO_LARGE"]),
    (500, &["INTERNAL_ERROR"]),
    (504, &["TIMEOUT"]),
];
/// A route that reads a body: 503 `NOT_READY` (with `Retry-After`) when the bodies in flight are
/// at their budget.
const BODY: &[Failure] = &[
    (400, &["INVALID_REQUEST"]),
    (413, &["PAYLOAD_TOO_LARGE"]),
    (503, &["NOT_READY"]),
];
const CREDENTIAL: &[Failure] = &[(
    401,
    &[
        "UNAUTHORIZED_NO_AUTH_HEADER",
        "UNAUTHORIZED_INVALID_JWT_FORMAT",
        "UNAUTHORIZED_UNSUPPORTED_TOKEN_ALGORITHM",
        "UNAUTHORIZED_LEGACY_JWT",
        "UNAUTHORIZED_ASYMMETRIC_JWT",
        "UNAUTHORIZED_INVALID_API_KEY",
    ],
)];
const ROLE: &[Failure] = &[(403, &["FORBIDDEN_ROLE"])];

fn description(status: u16) -> &'static str {
    match status {
        400 => "Malformed request",
        401 => "No valid credential",
        403 => "The role is not allowed here",
        405 => "The path does not take this method; `Allow` lists those it takes",
        409 => "Conflict",
        413 => "The body, or its declared length, is over the route's limit",
        422 => "A field breaks a rule; the message names it",
        429 => "A limit is reached; retry after `Retry-After` seconds",
        500 => "Unexpected; the request id identifies it in the logs",
        502 => "The upstream failed after retries",
        503 => "Not configured or not ready",
        504 => "The request took longer than its route allows",
        _ => "Error",
    }
}

/// Error responses whose `code` is restricted to the codes each status can carry on this route.
fn error_responses(groups: &[&[Failure]]) -> BTreeMap<String, RefOr<Response>> {
    let mut codes: BTreeMap<u16, Vec<&str>> = BTreeMap::new();
    for &(status, list) in groups.iter().flat_map(|group| group.iter()) {
        let entry = codes.entry(status).or_default();
        for code in list {
            if !entry.contains(code) {
                entry.push(code);
            }
        }
    }
    codes
        .into_iter()
        .map(|(status, list)| {
            let conflict = list.contains(&"CONFLICT");
            let sync_in_progress = list.contains(&"SYNC_IN_PROGRESS");
            let not_ready = list.contains(&"NOT_READY");
            let schema = AllOfBuilder::new()
                .item(Ref::from_schema_name("ErrorBody"))
                .item(
                    ObjectBuilder::new().property(
                        "code",
                        ObjectBuilder::new()
                            .schema_type(Type::String)
                            .enum_values(Some(list)),
                    ),
                );
            let mut response = ResponseBuilder::new()
                .description(description(status))
                .content("application/json", Content::new(Some(schema)));
            let text = || Header::new(ObjectBuilder::new().schema_type(Type::String));
            response = match status {
                401 => response
                    .header("sb-error-code", text())
                    .header("WWW-Authenticate", text()),
                405 => response.header("Allow", text()),
                429 => response.header(
                    "Retry-After",
                    Header::new(ObjectBuilder::new().schema_type(Type::Integer)),
                ),
                // `ApiError::Busy`: only a route that reads a body lists `NOT_READY` here.
                503 if not_ready => response.header(
                    "Retry-After",
                    HeaderBuilder::new()
                        .schema(ObjectBuilder::new().schema_type(Type::Integer))
                        .description(Some(
                            "With NOT_READY when the request bodies in flight are at their \
                             budget: seconds after which to retry",
                        ))
                        .build(),
                ),
                // send-sms's: a repeat whose earlier send with its idempotency key is still
                // under way says when its outcome may be known.
                409 if conflict => response.header(
                    "Retry-After",
                    HeaderBuilder::new()
                        .schema(ObjectBuilder::new().schema_type(Type::Integer))
                        .description(Some(
                            "When the earlier send with this idempotency_key is still under way: \
                             seconds after which its outcome may be known",
                        ))
                        .build(),
                ),
                // The sync's and the reconciliation's: when their lock may be free.
                409 if sync_in_progress => response.header(
                    "Retry-After",
                    HeaderBuilder::new()
                        .schema(ObjectBuilder::new().schema_type(Type::Integer))
                        .description(Some(
                            "Seconds after which to try again: on SQLite, until the holder's \
                             lease on the lock can be taken (a live run renews it; one that \
                             stopped without releasing it, as a killed process's, lets it \
                             expire); on PostgreSQL, where the lock goes with its run, 10",
                        ))
                        .build(),
                ),
                _ => response,
            };
            (status.to_string(), RefOr::T(response.build()))
        })
        .collect()
}

/// Declares a set of error responses for `responses(...)` of `#[utoipa::path]`.
macro_rules! error_set {
    ($($(#[$doc:meta])* $name:ident = [$($group:expr),* $(,)?];)*) => {$(
        $(#[$doc])*
        pub struct $name;
        impl IntoResponses for $name {
            fn responses() -> BTreeMap<String, RefOr<Response>> {
                error_responses(&[$($group),*])
            }
        }
    )*};
}

error_set! {
    /// What any route can answer besides its own ([`ANY_ROUTE`]).
    CommonErrors = [ANY_ROUTE];
    /// A route for any valid credential that reads a body.
    UserErrors = [CREDENTIAL, BODY, ANY_ROUTE];
    /// `sync-stripe-products-hardened`.
    SyncErrors = [
        CREDENTIAL,
        ROLE,
        BODY,
        &[
            (409, &["SYNC_IN_PROGRESS"]),
            (502, &["UPSTREAM_UNAVAILABLE"]),
            (503, &["NOT_CONFIGURED", "NOT_READY"]),
        ],
        ANY_ROUTE,
    ];
    /// `stripe-webhook`.
    WebhookErrors = [
        &[(400, &["INVALID_SIGNATURE"])],
        BODY,
        &[(502, &["UPSTREAM_UNAVAILABLE"]), (503, &["NOT_CONFIGURED", "NOT_READY"])],
        ANY_ROUTE,
    ];
    /// `twilio-status`.
    TwilioStatusErrors = [&[(400, &["INVALID_SIGNATURE"])], BODY, &[(503, &["NOT_CONFIGURED", "NOT_READY"])], ANY_ROUTE];
    /// `GET /admin/signing-keys`.
    SigningKeysErrors = [CREDENTIAL, ROLE, BODY, &[(422, &["VALIDATION_FAILED"])], ANY_ROUTE];
    /// `POST /admin/stripe/reconcile`.
    ReconcileErrors = [
        CREDENTIAL,
        ROLE,
        BODY,
        &[
            (409, &["SYNC_IN_PROGRESS"]),
            (422, &["VALIDATION_FAILED"]),
            (502, &["UPSTREAM_UNAVAILABLE"]),
            (503, &["NOT_CONFIGURED", "NOT_READY"]),
        ],
        ANY_ROUTE,
    ];
    /// `POST /admin/signing-keys/refresh`.
    RefreshErrors = [
        CREDENTIAL,
        ROLE,
        BODY,
        &[(502, &["UPSTREAM_UNAVAILABLE"]), (503, &["NOT_CONFIGURED"])],
        ANY_ROUTE,
    ];
}

/// `send-sms`. Its 502 carries `Retry-After` when Twilio throttled asking for a longer wait
/// than the send could take (`ApiError::UpstreamThrottled`).
pub struct SmsErrors;

impl IntoResponses for SmsErrors {
    fn responses() -> BTreeMap<String, RefOr<Response>> {
        let mut responses = error_responses(&[
            CREDENTIAL,
            ROLE,
            BODY,
            &[
                (409, &["CONFLICT"]),
                (422, &["VALIDATION_FAILED"]),
                (429, &["RATE_LIMITED"]),
                (502, &["UPSTREAM_UNAVAILABLE"]),
                (503, &["NOT_CONFIGURED", "NOT_READY"]),
            ],
            ANY_ROUTE,
        ]);
        if let Some(RefOr::T(bad_gateway)) = responses.get_mut("502") {
            bad_gateway.headers.insert(
                "Retry-After".to_owned(),
                HeaderBuilder::new()
                    .schema(ObjectBuilder::new().schema_type(Type::Integer))
                    .description(Some(
                        "When Twilio was still throttling when the send gave up (its wait \
                         longer than a send may take, or asked on the last attempt) and said how \
                         long to wait: seconds after which to retry (nothing was sent; a retry \
                         with the same idempotency_key sends it)",
                    ))
                    .build(),
            );
        }
        responses
    }
}

// Schemas of answers that handlers build as `json!`: documentation only, kept beside the list
// of paths so a new field is added in one place.

/// `GET /healthz`.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct Health {
    #[schema(example = "ok")]
    status: String,
}

/// `GET /readyz` when ready.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct Ready {
    #[schema(example = "ready")]
    status: String,
    /// `database` and `key_ring`, each with `ok` and its detail.
    #[schema(value_type = Object)]
    checks: Value,
}

/// `GET /readyz` when a dependency is not ready: the error body plus the checks.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct NotReady {
    #[schema(value_type = String, pattern = "^NOT_READY$")]
    code: String,
    message: String,
    #[schema(value_type = Object)]
    checks: Value,
}

/// `stripe-webhook`'s body: a snapshot event, which edgegate applies, or a thin one (an event
/// destination whose payload style is thin), which it records only.
#[derive(ToSchema, serde::Deserialize)]
#[serde(untagged)]
#[allow(dead_code)]
pub enum WebhookBody {
    Snapshot(crate::stripe::objects::Event),
    Thin(crate::stripe::objects::ThinEvent),
}

/// `stripe-webhook`'s answer.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct WebhookReceipt {
    received: bool,
    /// The event id was already recorded (applied or not): nothing was written again.
    duplicate: bool,
}

/// A Twilio status callback (form-encoded; other Twilio parameters are allowed and signed too).
#[derive(ToSchema)]
#[allow(dead_code, non_snake_case)]
pub struct TwilioStatusForm {
    MessageSid: String,
    MessageStatus: String,
}

/// One trusted key in `GET /admin/signing-keys`.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct TrustedKey {
    source: KeySource,
    kid: Option<String>,
    alg: String,
    origin: KeyOrigin,
    last_verified_at_ms: Option<i64>,
    verified_count: i64,
}

/// Use of one API key over the revocation window: every configured key (count 0 and
/// `last_verified_at_ms` null when unused), then any other that verified in the window (removed
/// from the configuration since, or recorded by an earlier release under its bare name).
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct ApiKeyUse {
    /// The key's name in `SUPABASE_SECRET_KEYS` / `SUPABASE_PUBLISHABLE_KEYS`. Supabase names
    /// both its default keys `default`: `type` tells them apart.
    name: String,
    /// `null` for usage an earlier release recorded under the bare name, the publishable and
    /// the secret key of that name together (it did not record which).
    #[schema(rename = "type")]
    key_type: Option<crate::auth::ApiKeyType>,
    /// The key as metrics (`kid` label), log lines, the audit log, `jwt-test`, `api_key_usage`
    /// and `edgegate keys report` name it: `secret:NAME` or `publishable:NAME`, or the bare name
    /// of an earlier release's rows.
    kid: String,
    /// Whether the service trusts the key now.
    configured: bool,
    last_verified_at_ms: Option<i64>,
    verified_count: i64,
}

/// The legacy secret's use over the window.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct LegacySecretUse {
    configured: bool,
    verified_count: i64,
    last_verified_at_ms: Option<i64>,
}

/// `GET /admin/signing-keys`.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct SigningKeys {
    keys: Vec<TrustedKey>,
    api_keys: Vec<ApiKeyUse>,
    legacy_secret: LegacySecretUse,
    /// `LEGACY_REVOCATION_WINDOW_SECONDS`.
    window_seconds: u64,
    /// As `usage_straddling_hour_ms`, for the revocation window: the per-key counts, the legacy
    /// secret's and the verdict.
    window_straddling_hour_ms: Option<i64>,
    /// How far back the evidence goes, epoch milliseconds: the first verification counted, or,
    /// once counting began more than 31 days ago, the start of the first hour a pass deleting
    /// usage hours kept (31 days before it, rounded up to the hour; the latest of them; see
    /// docs/OPERATIONS.md, "Database size"), or, after an instance ended holding counts it had
    /// not written, when another found that out (docs/OPERATIONS.md, "Crashes"), whichever is
    /// latest; `null` before any verification was counted.
    evidence_since_ms: Option<i64>,
    legacy_revocation_safe: bool,
    reason: String,
    /// Verifications left out of the usage evidence because an instance's buffer was full (a
    /// long database outage), on every instance since counting began; `null` when none was.
    /// Revoking is not called safe while the last of them is inside the revocation window.
    evidence_dropped: Option<crate::auth::usage::DroppedUsage>,
    /// The JWKS fetcher's state, when a JWKS URL is configured.
    jwks: Option<JwksStatus>,
    /// Present only when the database's usage counts could not be read (an outage): the keys
    /// and the JWKS state are still listed, the counts are this instance's unflushed ones only,
    /// and revoking is not called safe.
    #[schema(required = false)]
    usage_unavailable: Option<String>,
    /// Legacy-secret verifications per (kind, route, client) over the usage window, most used
    /// first; `kind` is `anon_key`, `service_role_key` or `user_session`.
    legacy_usage: Vec<crate::auth::legacy_report::CallerRow>,
    /// Legacy-secret verifications over the usage window that the key counts hold and no
    /// `legacy_usage` row accounts for, their kind, route and client not being known: counted by
    /// an edgegate from before caller counts (before 2026-12-01), which recorded no caller, or by
    /// a later one from before 2026-12-07 whose caller write failed after its key counts were
    /// written, or left out of the per-caller counts in a long database outage
    /// (`edgegate_caller_usage_dropped_total`), or, rarely, counted just as a flush began (its
    /// caller written with the next flush, up to a minute later), or by one from before
    /// 2026-12-08 just as an hour ended (its caller counted in the next hour). `last_seen` is
    /// the latest last use of the hours holding them. `null` when every one has its caller. In
    /// the verdict's `reason` total.
    legacy_usage_without_caller: Option<crate::auth::legacy_report::WithoutCaller>,
    /// Legacy API keys sent in `apikey` beside the credential that let a request in while no
    /// legacy secret was configured, so none could verify them, per (kind, route, client) over
    /// the usage window, most used first; `kind` is `anon_key_unverified` or
    /// `service_role_key_unverified` (what the key's claims say). Evidence of a client that still
    /// ships a legacy key, not verifications: not in `legacy_kinds` nor in the verdict.
    unverified_legacy_usage: Vec<crate::auth::legacy_report::CallerRow>,
    /// API-key verifications per (key, route, client) over the usage window; `kind` is the key's
    /// `secret:NAME` or `publishable:NAME` (the bare name in rows an earlier release stored).
    api_key_usage: Vec<crate::auth::legacy_report::CallerRow>,
    /// Each legacy kind's count and last use over the usage window.
    legacy_kinds: Vec<crate::auth::legacy_report::KindUse>,
    /// The span of the usage lists (`?window_seconds=`, default the revocation window).
    usage_window_seconds: u64,
    /// Counts are kept by the hour, each with its last use: an hour last used before the usage
    /// window's start is left out of every count; one used inside the window counts whole. Set,
    /// to the start of the hour holding the window's start, when that hour is counted, so its use
    /// from before the window is in the counts; `null` when every count is inside the window.
    usage_straddling_hour_ms: Option<i64>,
    /// Verifications per hour over the usage window, per key and legacy kind.
    usage_hourly: crate::auth::legacy_report::Hourly,
}

/// `POST /admin/signing-keys/refresh`.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct Refreshed {
    refreshed: bool,
    /// Always `false`: the refresh asks for the whole set (no `If-None-Match`), so that a host
    /// whose ETag did not change with its set cannot keep a removed key with a 304.
    not_modified: bool,
    /// Keys now in the fetched set.
    keys: u64,
    /// Keys of the set that are not used, with the reason (as `jwks.dropped` of
    /// `GET /admin/signing-keys`).
    dropped: Vec<crate::auth::DroppedKey>,
    generation: u64,
    ttl_seconds: u64,
}
