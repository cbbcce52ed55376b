//! Sending one SMS: validate, reserve the row under the shared limits (idempotency included),
//! call Twilio, record its answer.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::SmsError;
use super::client::{CallError, MessageResource, TwilioApi};
use super::metrics::{SendOutcome, SmsMetrics};
use crate::backoff;
use crate::clock::Clock;
use crate::config::{Config, SmsSender, is_e164};
use crate::store::{AuditEntry, NewSms, Reservation, SendResult, SmsLimits, SmsMessage, Store};

/// The longest body Twilio takes.
pub const MAX_BODY_CHARS: usize = 1_600;
pub const MAX_IDEMPOTENCY_KEY_CHARS: usize = 255;
/// Calls per send, the first included; only calls Twilio certainly did not act on are repeated,
/// and only while a whole call still fits the send's budget (`TwilioConfig::send_budget`).
const MAX_ATTEMPTS: u32 = 3;
/// What a send may still need after its budget: storing Twilio's answer and the audit row, each
/// waited for at most `WRITE_WAIT`.
const AFTER_BUDGET: Duration = Duration::from_secs(10);
/// How long the answer waits for one write after Twilio's call (its answer, the audit row).
/// One try of a write can take longer: the pool's wait for a connection, then SQLite's busy
/// timeout, or PostgreSQL's `lock_timeout` (3 s) within its `statement_timeout` (15 s), every
/// pooled session's (`store::LONGEST_WRITE_TRY` in all; a server that stalls with the connection
/// open is bounded by neither), and Twilio's answer is tried again when the database refuses it:
/// past this, the write goes on in its own task and the caller is answered without waiting for
/// it.
const WRITE_WAIT: Duration = Duration::from_secs(5);
const _: () = assert!(2 * WRITE_WAIT.as_secs() <= AFTER_BUDGET.as_secs());
// A send with the default budget is answered inside the route's timeout, with a little to spare
// for reading the request and checking its credential: a 504 would leave the caller without an
// id while the send goes on, and a retry without an idempotency key would text twice.
const _: () = assert!(
    crate::config::DEFAULT_SMS_SEND_BUDGET.as_secs() + AFTER_BUDGET.as_secs() + 2
        <= crate::server::middleware::REQUEST_TIMEOUT.as_secs()
);
// A connection that cannot be made fails as a connect error, before the call's own timeout
// would end it as a call whose outcome is unknown: Twilio never got it, so the send is `failed`,
// a retry with its key sends it, and it counts against no limit.
const _: () = assert!(
    crate::outbound::CONNECT_TIMEOUT.as_secs() < crate::config::DEFAULT_TWILIO_TIMEOUT.as_secs()
);
/// The `Retry-After` of a repeat that finds the first send with its key still under way: a
/// send's calls to Twilio take seconds at most, its retries a few more.
const IN_PROGRESS_RETRY_AFTER: Duration = Duration::from_secs(2);
/// The longest pause a Twilio `Retry-After` may impose on one send. A longer wait is not cut
/// short (Twilio would only throttle the call again): the send ends, nothing sent, and the
/// caller's 502 carries the wait in its own `Retry-After`.
const MAX_RETRY_PAUSE: Duration = Duration::from_secs(5);
/// The longest Twilio wait passed on to the caller; a longer one (no throttling lasts that long)
/// is passed on as this.
const MAX_PASSED_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// Our status for a row not yet handed to Twilio, or whose Twilio answer is not recorded yet
/// (no SID; Twilio's own `accepted`, a Messaging Service's first status, comes with one).
/// `Store::mark_unanswered_sms_unknown` names it (and `STATUS_UNKNOWN`) in its SQL.
const STATUS_ACCEPTED: &str = "accepted";
/// Twilio refused, or certainly never received, the message. Without a SID, Twilio never took
/// it. A refusal keeps Twilio's code: one of the message itself (`REPLAYED_ERRORS`) gets the
/// same answer on a retry with the same idempotency key; after any other, or with no code, the
/// retry sends it (the store's `never_taken` and its send limits name it too).
const STATUS_FAILED: &str = "failed";
/// The request may have reached Twilio, but we do not know: never sent again.
const STATUS_UNKNOWN: &str = "unknown";

/// Twilio errors that mean the `To` number cannot be texted: invalid (21211), not a mobile
/// number (21614), unreachable from this sender (21612), region not enabled (21408), opted out
/// (21610).
const RECIPIENT_ERRORS: [i64; 5] = [21211, 21614, 21612, 21408, 21610];
/// Twilio errors that mean the `Body` cannot be sent as it is: longer than Twilio takes once
/// encoded (21617: a body outside GSM-7 goes as UCS-2, two bytes a character, so fewer than
/// 1,600 characters can be too long), a parameter over its limit (21658: `Body` is the only one
/// edgegate sends that the caller writes), or no body at all (21602; 21619 through a Messaging
/// Service).
const BODY_ERRORS: [i64; 4] = [21617, 21658, 21602, 21619];
/// The refusals a retry with the same idempotency key answers again, without calling Twilio:
/// those of the caller's message. Any other refusal (20003 our credentials, 20404 our account,
/// 21212 or 21606 our sender, 21611 the sender's queue full) is about us or about now: Twilio
/// created nothing, so a retry sends.
const REPLAYED_ERRORS: [i64; 9] = concat(RECIPIENT_ERRORS, BODY_ERRORS);

const fn concat<const A: usize, const B: usize, const C: usize>(
    a: [i64; A],
    b: [i64; B],
) -> [i64; C] {
    assert!(A + B == C);
    let mut out = [0; C];
    let mut i = 0;
    while i < A {
        out[i] = a[i];
        i += 1;
    }
    while i < C {
        out[i] = b[i - A];
        i += 1;
    }
    out
}

/// The body of `send-sms`. Fields are optional here so a missing one is a 422 naming it.
/// The document states the rules `validate` applies, so clients and schemathesis know them.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(expecting = "a JSON object")]
pub struct SendSmsRequest {
    /// An E.164 number: `+` then 2 to 15 digits, the first not 0.
    #[schema(required = true, value_type = String, pattern = r"^\+[1-9][0-9]{1,14}$", example = "+15005550006")]
    pub to: Option<String>,
    /// Any text but U+0000. Twilio may still refuse a body of 1,600 characters or fewer when
    /// it is too long once encoded (characters outside GSM-7 take more room): a 422 naming
    /// `body` too.
    #[schema(
        required = true,
        value_type = String,
        min_length = 1,
        max_length = 1600,
        pattern = r"^[^\x00]*$"
    )]
    pub body: Option<String>,
    /// A repeat with the same key answers the first send instead of texting again (409
    /// `CONFLICT` with `Retry-After` while the first is still under way); after a send
    /// Twilio certainly never took (a 502 because it could not be reached, throttled, or refused
    /// for a reason not in the message, such as our credentials or sender), it sends. No U+0000.
    #[schema(
        required = false,
        value_type = String,
        min_length = 1,
        max_length = 255,
        pattern = r"^[^\x00]*$"
    )]
    pub idempotency_key: Option<String>,
    /// Members the route does not read, ignored as the Edge Function ignored them (a caller
    /// may send its own), except a misspelt idempotency key ([`misspelt_idempotency_key`]).
    #[serde(flatten)]
    #[schema(ignore)]
    pub other: BTreeMap<String, serde::de::IgnoredAny>,
}

/// A member that reads as `idempotency_key` but is not it (`idempotencyKey`,
/// `Idempotency-Key`): ignored, the send it was meant to protect would text twice on a retry.
fn misspelt_idempotency_key(other: &BTreeMap<String, serde::de::IgnoredAny>) -> Option<&str> {
    other.keys().map(String::as_str).find(|name| {
        let mut letters = name
            .chars()
            .filter(|c| !matches!(c, '_' | '-' | ' '))
            .map(|c| c.to_ascii_lowercase());
        "idempotencykey".chars().all(|c| letters.next() == Some(c)) && letters.next().is_none()
    })
}

/// The contract's 202 body.
#[derive(Clone, Debug, Serialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct SmsReceipt {
    pub id: String,
    pub sid: Option<String>,
    pub status: String,
}

impl From<&SmsMessage> for SmsReceipt {
    fn from(message: &SmsMessage) -> Self {
        Self {
            id: message.id.clone(),
            sid: message.twilio_sid.clone(),
            status: message.status.clone(),
        }
    }
}

/// A send that was answered, and whether it repeated an earlier one (same idempotency key).
#[derive(Debug)]
pub struct Sent {
    pub receipt: SmsReceipt,
    pub replayed: bool,
}

fn invalid(field: &str, message: impl Into<String>) -> SmsError {
    SmsError::Invalid {
        field: field.to_owned(),
        message: message.into(),
    }
}

/// U+0000 is in no text message, and PostgreSQL cannot store it: refused, not a 5xx.
const NO_NUL: &str = "must not contain the character U+0000";

struct Valid {
    to: String,
    body: String,
    idempotency_key: Option<String>,
}

fn validate(request: SendSmsRequest, allowed_prefixes: &[String]) -> Result<Valid, SmsError> {
    if let Some(name) = misspelt_idempotency_key(&request.other) {
        return Err(invalid(
            name,
            "is not a field of this route: the idempotency key is `idempotency_key`",
        ));
    }
    let to = request.to.ok_or_else(|| invalid("to", "is required"))?;
    if !is_e164(&to) {
        return Err(invalid(
            "to",
            "must be an E.164 number: + then 2 to 15 digits, the first not 0",
        ));
    }
    if !allowed_prefixes.is_empty() && !allowed_prefixes.iter().any(|p| to.starts_with(p.as_str()))
    {
        return Err(invalid(
            "to",
            format!(
                "this service may only text numbers starting with {}",
                allowed_prefixes.join(", ")
            ),
        ));
    }
    let body = request.body.ok_or_else(|| invalid("body", "is required"))?;
    let length = body.chars().count();
    if !(1..=MAX_BODY_CHARS).contains(&length) {
        return Err(invalid(
            "body",
            format!("must be 1 to {MAX_BODY_CHARS} characters (it has {length})"),
        ));
    }
    if body.contains('\0') {
        return Err(invalid("body", NO_NUL));
    }
    if let Some(key) = &request.idempotency_key
        && !(1..=MAX_IDEMPOTENCY_KEY_CHARS).contains(&key.chars().count())
    {
        return Err(invalid(
            "idempotency_key",
            format!("must be 1 to {MAX_IDEMPOTENCY_KEY_CHARS} characters"),
        ));
    }
    if request
        .idempotency_key
        .as_ref()
        .is_some_and(|key| key.contains('\0'))
    {
        return Err(invalid("idempotency_key", NO_NUL));
    }
    Ok(Valid {
        to,
        body,
        idempotency_key: request.idempotency_key,
    })
}

/// The send tasks under way: a stop waits for them before it closes the database, or a send
/// whose caller is gone would lose Twilio's answer.
#[derive(Clone, Debug)]
pub struct SendTasks(Arc<tokio::sync::watch::Sender<usize>>);

impl Default for SendTasks {
    fn default() -> Self {
        Self(Arc::new(tokio::sync::watch::Sender::new(0)))
    }
}

impl SendTasks {
    /// Counts a task until the returned guard is dropped.
    fn enter(&self) -> SendTaskGuard {
        self.0.send_modify(|running| *running += 1);
        SendTaskGuard(self.clone())
    }

    /// Resolves once no send task is running.
    pub async fn idle(&self) {
        let mut running = self.0.subscribe();
        // The sender lives in `self`, so the wait cannot end in an error.
        let _ = running.wait_for(|running| *running == 0).await;
    }
}

/// One running send task of [`SendTasks`].
struct SendTaskGuard(SendTasks);

impl Drop for SendTaskGuard {
    fn drop(&mut self) {
        self.0.0.send_modify(|running| *running -= 1);
    }
}

/// A send as its route took it: the message, and when the request reached the route.
#[derive(Debug)]
pub struct Submission {
    pub request: SendSmsRequest,
    /// The send's budget (`TwilioConfig::send_budget`) counts from here: the credential check,
    /// the body's arrival and the row's reservation all leave less time to Twilio.
    pub arrival: tokio::time::Instant,
}

/// Sends the submitted message unless its idempotency key was seen before or a limit is
/// reached, records `audit` (the caller's entry for this action) with the outcome, and counts
/// it in `metrics` (a send Twilio was asked for, refused by a limit, or replayed).
///
/// The work runs in its own task, counted in `tasks`: a caller who hangs up drops this future,
/// and must not leave a reserved row unsent-yet-unrecorded, a Twilio answer unstored, or the
/// audit row unwritten.
// Each part is the app's own, owned by the task (so cloned) or shared with it; a struct of them
// would only be unpacked again here.
#[allow(clippy::too_many_arguments)]
pub async fn send_sms(
    store: Store,
    config: Arc<Config>,
    http: reqwest::Client,
    clock: Clock,
    metrics: SmsMetrics,
    tasks: &SendTasks,
    submission: Submission,
    audit: AuditEntry,
) -> Result<Sent, SmsError> {
    let running = tasks.enter();
    let tasks = tasks.clone();
    let Submission { request, arrival } = submission;
    let work = async move {
        let _running = running;
        let mut progress = Progress::default();
        let deadline = arrival + config.twilio.send_budget;
        let outcome = send_once(
            &store,
            &config,
            &http,
            &clock,
            &tasks,
            request,
            deadline,
            &mut progress,
        )
        .await;
        if let Some(counted) = progress.outcome {
            metrics.sent(counted);
        }
        record_audit(&store, &tasks, audit, &outcome, progress.message_id).await;
        outcome
    };
    // In the request's span: the call to Twilio stays in the request's trace.
    let task = tokio::spawn(tracing::Instrument::instrument(
        work,
        tracing::Span::current(),
    ));
    task.await
        .map_err(|err| SmsError::Internal(anyhow::anyhow!("the SMS send task failed: {err}")))?
}

/// Runs `write` in a task of its own (counted in `tasks`, so a stop still waits for it) and
/// waits for it at most `WRITE_WAIT`; `false` when it is still running then, and goes on. The
/// write logs its own failure, which may come after the answer.
async fn bounded_write(
    tasks: &SendTasks,
    write: impl std::future::Future<Output = ()> + Send + 'static,
) -> bool {
    let running = tasks.enter();
    let task = tokio::spawn(tracing::Instrument::instrument(
        async move {
            let _running = running;
            write.await;
        },
        tracing::Span::current(),
    ));
    tokio::time::timeout(WRITE_WAIT, task).await.is_ok()
}

async fn record_audit(
    store: &Store,
    tasks: &SendTasks,
    mut entry: AuditEntry,
    outcome: &Result<Sent, SmsError>,
    message_id: Option<String>,
) {
    if let Err(SmsError::DatabaseUnavailable(_)) = outcome {
        // The database is away: the row cannot be written, and trying would only hold the
        // answer for another timeout. Nothing was sent.
        tracing::warn!(
            request_id = ?entry.request_id,
            credential = entry.credential_id,
            "send_sms refused while the database is unavailable; no audit row"
        );
        return;
    }
    entry.outcome = match outcome {
        Ok(sent) if sent.replayed => "replayed".to_owned(),
        Ok(_) => "sent".to_owned(),
        Err(err) => err.outcome().to_owned(),
    };
    entry.detail = message_id.map(|id| serde_json::json!({ "sms_id": id }).to_string());
    let store = store.clone();
    let (request_id, credential) = (entry.request_id.clone(), entry.credential_id.clone());
    let write = async move { crate::audit::record(&store, &entry).await };
    if !bounded_write(tasks, write).await {
        tracing::warn!(
            ?request_id,
            credential,
            "send_sms audit row not written within {} s (the database is slow); it is written \
             when the database answers",
            WRITE_WAIT.as_secs()
        );
    }
}

// The send's parts, each borrowed from `send_sms`'s task; a struct of them would only be
// unpacked again here.
#[allow(clippy::too_many_arguments)]
async fn send_once(
    store: &Store,
    config: &Config,
    http: &reqwest::Client,
    clock: &Clock,
    tasks: &SendTasks,
    request: SendSmsRequest,
    deadline: tokio::time::Instant,
    progress: &mut Progress,
) -> Result<Sent, SmsError> {
    // A slow reservation, too, leaves less time to Twilio, not more to the request.
    let api =
        TwilioApi::from_config(http, &config.twilio).ok_or(SmsError::NotConfigured("Twilio"))?;
    let sender = config
        .twilio
        .sender
        .as_ref()
        .ok_or(SmsError::NotConfigured("the Twilio sender"))?;
    let valid = validate(request, &config.sms.allowed_prefixes)?;

    let id = uuid::Uuid::now_v7().to_string();
    let limits = SmsLimits {
        per_recipient_per_hour: config.sms.max_per_recipient_per_hour,
        per_minute: config.sms.max_per_minute,
    };
    let new = NewSms {
        id: &id,
        idempotency_key: valid.idempotency_key.as_deref(),
        to_number: &valid.to,
        body: &valid.body,
        status: STATUS_ACCEPTED,
        replayed_error_codes: &REPLAYED_ERRORS,
    };
    let reserved = store
        .reserve_sms(new, limits, || clock.now_ms())
        .await
        .map_err(|err| {
            // Nothing was reserved, so nothing can be sent: a retry later is safe.
            SmsError::from_store(
                err,
                "send_sms",
                "the database is unavailable; the message was not sent, try again later",
            )
        })?;
    let message = match reserved {
        Reservation::Created(message) | Reservation::Reopened(message) => message,
        Reservation::Existing(message) => {
            progress.message_id = Some(message.id.clone());
            if message.to_number != valid.to || message.body != valid.body {
                return Err(SmsError::IdempotencyConflict(
                    "idempotency_key was already used for a different message".to_owned(),
                ));
            }
            if let Some(refusal) = earlier_refusal(&message) {
                return Err(refusal);
            }
            let mut receipt = SmsReceipt::from(&message);
            if message.status == STATUS_ACCEPTED && message.twilio_sid.is_none() {
                // Reserved, Twilio's answer not recorded yet: the first send is still under way
                // (its outcome unknown, it may yet fail), unless it is older than any send can
                // be, when its sender is gone and the sweeper marks it `unknown` (as it does
                // with the same cutoff); that answer, then, without waiting for the sweep.
                let age_ms = clock.now_ms().saturating_sub(message.created_at_ms);
                let deadline_ms =
                    i64::try_from(send_deadline(config.twilio.send_budget).as_millis())
                        .unwrap_or(i64::MAX);
                if age_ms < deadline_ms {
                    return Err(SmsError::InProgress {
                        message: "a send with this idempotency_key is still in progress; retry \
                                  after Retry-After seconds for its outcome"
                            .to_owned(),
                        retry_after_secs: IN_PROGRESS_RETRY_AFTER.as_secs(),
                    });
                }
                STATUS_UNKNOWN.clone_into(&mut receipt.status);
            }
            tracing::info!(
                id = %receipt.id,
                sid = receipt.sid.as_deref(),
                status = %receipt.status,
                "SMS send replayed: the idempotency key's earlier send answered again"
            );
            progress.outcome = Some(SendOutcome::Replayed);
            return Ok(Sent {
                receipt,
                replayed: true,
            });
        }
        Reservation::Limited { retry_after_ms } => {
            progress.outcome = Some(SendOutcome::RateLimited);
            let retry_after_secs = u64::try_from(retry_after_ms).unwrap_or(1).div_ceil(1000);
            return Err(SmsError::RateLimited {
                message: "the SMS send limit is reached; try again later".to_owned(),
                retry_after_secs: retry_after_secs.max(1),
            });
        }
    };

    progress.message_id = Some(message.id.clone());
    // The message's id in the URL: a status Twilio sends before its SID is stored here still
    // finds its row.
    let callback = config
        .public_url
        .as_ref()
        .map(|url| format!("{}?id={}", super::status_callback_url(url), message.id));
    let mut form: Vec<(&str, &str)> = vec![("To", &valid.to), ("Body", &valid.body)];
    form.push(match sender {
        SmsSender::From(number) => ("From", number),
        SmsSender::MessagingService(sid) => ("MessagingServiceSid", sid),
    });
    if let Some(callback) = &callback {
        form.push(("StatusCallback", callback));
    }
    let attempts = Attempts {
        base_delay: config.twilio.retry_base_delay,
        call_timeout: config.twilio.request_timeout,
        deadline,
    };
    let reservation = (message.id.as_str(), message.attempt);
    let (outcome, counted) = deliver(store, clock, tasks, &api, &form, reservation, attempts).await;
    progress.outcome = Some(counted);
    outcome
}

/// What a send got to, for its audit row and its count: the message it reserved or found, and
/// what it came to when that is counted (`edgegate_sms_sent_total`).
#[derive(Debug, Default)]
struct Progress {
    message_id: Option<String>,
    outcome: Option<SendOutcome>,
}

/// How often rows left `accepted` by a crash or an outage are looked for.
const SWEEP_INTERVAL: Duration = Duration::from_secs(60);

/// The longest a send may still store Twilio's answer after its row was reserved: every call to
/// Twilio ends within the send's budget (counted from before the reservation), the answer's
/// write is then tried for `RECORD_RETRY_FOR` while the database refuses it, and its last try
/// takes at most `LONGEST_WRITE_TRY`; with room for clocks that differ between instances. A row
/// still `accepted` after this has no sender left: a retry with its key is answered `unknown`
/// instead of 409, and the sweep marks it so. Any sooner, a failure the database took late (its
/// caller answered 502, the text never sent) would have been answered `unknown` to a retry, and
/// the caller would have stopped there.
fn send_deadline(send_budget: Duration) -> Duration {
    send_budget + RECORD_RETRY_FOR + crate::store::LONGEST_WRITE_TRY + CLOCKS_APART
}

/// How far apart two instances' clocks may be for `send_deadline`: a row stamped by one is aged
/// by another's.
const CLOCKS_APART: Duration = Duration::from_secs(20);

/// Marks messages whose sender died mid-send (SIGKILL, a crash, the database lost before the
/// answer was stored) as `unknown`, so no row claims a send is still to come: every
/// `SWEEP_INTERVAL` (the first at start, or once the schema is in place), rows older than a send can take. Not every row reserved
/// before this process began, on either engine: those include another process's sends still
/// waiting for Twilio during a rolling restart (instances on a shared PostgreSQL, or two
/// processes on one SQLite file for a moment). Runs until the handle is aborted.
pub fn spawn_unanswered_sweeper(
    store: Store,
    clock: Clock,
    send_budget: Duration,
) -> tokio::task::JoinHandle<()> {
    let deadline_ms = i64::try_from(send_deadline(send_budget).as_millis()).unwrap_or(i64::MAX);
    tokio::spawn(async move {
        let reason = "the sender stopped before Twilio's answer was recorded; Twilio may have \
                      the message, so it is not sent again";
        // No table to sweep before then; a database migrated late is swept at once.
        store.wait_until_ready().await;
        let mut tick = tokio::time::interval(SWEEP_INTERVAL);
        loop {
            tick.tick().await;
            // Rows stamped by a clock since set back, first: one left `accepted` is then old.
            if let Err(err) = store.restamp_sms_stamped_ahead(clock.now_ms()).await {
                tracing::warn!(
                    error = crate::error::causes(&err),
                    "SMS rows stamped ahead not restamped"
                );
            }
            let cutoff = clock.now_ms().saturating_sub(deadline_ms);
            match store
                .mark_unanswered_sms_unknown(cutoff, reason, clock.now_ms())
                .await
            {
                Ok(marked) => {
                    if marked > 0 {
                        tracing::warn!(marked, "unanswered SMS marked unknown");
                    }
                }
                Err(err) => tracing::warn!(
                    error = crate::error::causes(&err),
                    "unanswered SMS not swept"
                ),
            }
        }
    })
}

/// How a send's calls to Twilio are paced and bounded.
#[derive(Clone, Copy, Debug)]
struct Attempts {
    /// The first pause before a repeat; it doubles.
    base_delay: Duration,
    /// How long one call may take (the client's own timeout).
    call_timeout: Duration,
    /// Every call ends by then: none is started that could end later.
    deadline: tokio::time::Instant,
}

impl Attempts {
    /// Whether a call started after `pause` would end by the deadline.
    fn fits_after(&self, pause: Duration) -> bool {
        tokio::time::Instant::now() + pause + self.call_timeout <= self.deadline
    }
}

/// Why no call gave a resource, and how many calls were made.
struct NotCreated {
    err: CallError,
    calls: u32,
}

/// Hands the reserved message `id` to Twilio and records what came of it for that reservation
/// (`attempt`, [`SmsMessage::attempt`]); returns the answer and what the send came to.
async fn deliver(
    store: &Store,
    clock: &Clock,
    tasks: &SendTasks,
    api: &TwilioApi,
    form: &[(&str, &str)],
    (id, attempt): (&str, i64),
    attempts: Attempts,
) -> (Result<Sent, SmsError>, SendOutcome) {
    match create_with_retries(api, form, attempts).await {
        Ok(created) => {
            // Never the number or the body.
            tracing::info!(id, sid = %created.sid, status = %created.status, "SMS sent");
            // The text is on its way; failing the request now, or letting a stalled database
            // hold it until the route's 504, would invite a resend: the caller gets the SID
            // whatever the write comes to. A row left without it is found by a status callback
            // (by the id in its URL, when PUBLIC_URL is set), by this write when the database
            // answers (it is tried again while the database refuses it), or else marked
            // `unknown` by the sweeper.
            let write = {
                let (store, now) = (store.clone(), clock.now_ms());
                let (id, created) = (id.to_owned(), created.clone());
                async move {
                    let result = SendResult {
                        status: &created.status,
                        twilio_sid: Some(&created.sid),
                        error_code: None,
                        error_message: None,
                    };
                    if let Err(err) =
                        record_answer(&store, (id.as_str(), attempt), result, now).await
                    {
                        tracing::error!(%id, sid = %created.sid, error = crate::error::causes(&err),
                            "SMS sent but its SID was not stored");
                    }
                }
            };
            if !bounded_write(tasks, write).await {
                tracing::error!(%id, sid = %created.sid,
                    "SMS sent but its SID not stored within {} s (the database is slow or \
                     unavailable); the write goes on", WRITE_WAIT.as_secs());
            }
            let sent = Sent {
                receipt: SmsReceipt {
                    id: id.to_owned(),
                    sid: Some(created.sid),
                    status: created.status,
                },
                replayed: false,
            };
            (Ok(sent), SendOutcome::Accepted)
        }
        Err(failure) => {
            let (answer, outcome) =
                record_failure(store, clock, tasks, (id, attempt), failure).await;
            (Err(answer), outcome)
        }
    }
}

/// How long the write of Twilio's answer is tried again while the database refuses it (no pool
/// connection within its acquire timeout, a SQLite file locked past its busy timeout): a SID
/// stored nowhere else would be lost, its row marked `unknown` and a retry with its key answered
/// without it. A stop waits for it as for the send, within the stop's own deadline. A row is
/// taken for one whose sender is gone only once this has passed (`send_deadline`).
const RECORD_RETRY_FOR: Duration = Duration::from_secs(60);
/// The first pause between two tries of that write; it doubles up to `RECORD_RETRY_MAX_PAUSE`.
const RECORD_RETRY_FIRST_PAUSE: Duration = Duration::from_millis(250);
const RECORD_RETRY_MAX_PAUSE: Duration = Duration::from_secs(5);

/// Stores what Twilio answered for reservation `reservation` of message `id`, trying again with
/// jittered, doubling pauses while the database is unavailable, for at most `RECORD_RETRY_FOR`.
/// The write may be repeated (a try that committed but whose answer was lost): it only fills in
/// the row (a status callback that stored the SID first is kept), and changes nothing once the
/// row was reserved again.
async fn record_answer(
    store: &Store,
    (id, reservation): (&str, i64),
    result: SendResult<'_>,
    now_ms: i64,
) -> anyhow::Result<()> {
    let started = tokio::time::Instant::now();
    let mut attempt = 1;
    loop {
        let err = match store
            .record_sms_send((id, reservation), result, now_ms)
            .await
        {
            Ok(true) => return Ok(()),
            // Not lost silently: the row shows the later send's state, not this one's. A
            // message Twilio took (a SID) is worth a warning; a failure's write repeated after
            // its first try committed (the row then reopened by the caller's retry) is not.
            Ok(false) if result.twilio_sid.is_some() => {
                tracing::warn!(
                    id,
                    reservation,
                    sid = result.twilio_sid,
                    status = result.status,
                    "Twilio took this message but its answer was not stored: its row was \
                     reserved again meanwhile (a retry with the same idempotency key) or no \
                     longer exists"
                );
                return Ok(());
            }
            Ok(false) => {
                tracing::debug!(
                    id,
                    reservation,
                    status = result.status,
                    "this send's outcome was not written: its row was reserved again meanwhile \
                     (an earlier try of this write may have committed) or no longer exists"
                );
                return Ok(());
            }
            Err(err) => err,
        };
        let pause = backoff::equal_jitter(backoff::exponential(
            RECORD_RETRY_FIRST_PAUSE,
            attempt,
            RECORD_RETRY_MAX_PAUSE,
        ));
        if !crate::store::is_unavailable(&err) || started.elapsed() + pause > RECORD_RETRY_FOR {
            return Err(err);
        }
        tracing::warn!(
            id,
            attempt,
            error = crate::error::causes(&err),
            "Twilio's answer not stored yet (the database is unavailable); trying again"
        );
        tokio::time::sleep(pause).await;
        attempt += 1;
    }
}

/// Calls Twilio, repeating only what Twilio certainly did not act on (throttled, or never
/// connected), with doubling, jittered pauses, and starting no call that could end past the
/// deadline.
async fn create_with_retries(
    api: &TwilioApi,
    form: &[(&str, &str)],
    attempts: Attempts,
) -> Result<MessageResource, NotCreated> {
    if !attempts.fits_after(Duration::ZERO) {
        // The reservation took the time (a database slow to answer): Twilio was not called.
        let err = CallError::NotSent("the send ran out of time before Twilio was called".into());
        return Err(NotCreated { err, calls: 0 });
    }
    let mut attempt = 1;
    loop {
        let err = match api.create_message(form).await {
            Ok(created) => return Ok(created),
            Err(err) => err,
        };
        let asked = match &err {
            CallError::Throttled { retry_after } => *retry_after,
            CallError::NotSent(_) => None,
            CallError::Rejected { .. } | CallError::Unconfirmed(_) => {
                return Err(NotCreated {
                    err,
                    calls: attempt,
                });
            }
        };
        let step = backoff::equal_jitter(backoff::exponential(
            attempts.base_delay,
            attempt,
            MAX_RETRY_PAUSE,
        ));
        let pause = asked.map_or(step, |asked| asked.max(step));
        // A wait longer than a send may pause, or that no call after it could end by the
        // deadline, ends the send at once: `record_failure` passes it on to the caller.
        if pause > MAX_RETRY_PAUSE || attempt >= MAX_ATTEMPTS || !attempts.fits_after(pause) {
            return Err(NotCreated {
                err,
                calls: attempt,
            });
        }
        tracing::info!(attempt, pause_ms = pause.as_millis(), reason = %err, "retrying Twilio");
        tokio::time::sleep(pause).await;
        attempt += 1;
    }
}

/// The answer to Twilio still throttling after `calls` calls, the last asking to wait `asked`:
/// the caller is told to wait as long (rounded up to whole seconds, at most
/// `MAX_PASSED_RETRY_AFTER`), and that nothing was sent, so a retry with its key sends.
fn throttled(asked: Option<Duration>, calls: u32) -> SmsError {
    let attempts = if calls == 1 { "attempt" } else { "attempts" };
    let message =
        format!("Twilio is throttling requests; nothing was sent after {calls} {attempts}");
    match asked {
        Some(asked) => {
            let millis =
                u64::try_from(asked.min(MAX_PASSED_RETRY_AFTER).as_millis()).unwrap_or(u64::MAX);
            SmsError::Throttled {
                message: format!("{message}: retry after Retry-After seconds, as Twilio asked"),
                retry_after_secs: millis.div_ceil(1000).max(1),
            }
        }
        None => SmsError::Upstream(message),
    }
}

/// The answer to Twilio refusing a message with error `code`, described as `detail`.
fn refusal(code: Option<i64>, detail: &str) -> SmsError {
    match code {
        Some(code) if RECIPIENT_ERRORS.contains(&code) => invalid("to", detail),
        Some(code) if BODY_ERRORS.contains(&code) => invalid("body", detail),
        _ => SmsError::Upstream(format!("Twilio refused the message: {detail}")),
    }
}

/// The first answer again, for a stored message Twilio refused for what it says (its row keeps
/// Twilio's code and description): sending it again would only be refused again. The store
/// reopens a refusal for any other reason, so it does not come here.
fn earlier_refusal(message: &SmsMessage) -> Option<SmsError> {
    let code = message.error_code?;
    (message.status == STATUS_FAILED && message.twilio_sid.is_none()).then(|| {
        refusal(
            Some(code),
            message.error_message.as_deref().unwrap_or_default(),
        )
    })
}

/// Stores why the send failed (for reservation `attempt` of message `id`) and maps it to the
/// answer and to what the send came to.
async fn record_failure(
    store: &Store,
    clock: &Clock,
    tasks: &SendTasks,
    (id, attempt): (&str, i64),
    failure: NotCreated,
) -> (SmsError, SendOutcome) {
    let NotCreated { err, calls } = failure;
    let outcome = match &err {
        CallError::Rejected { .. } => SendOutcome::Refused,
        CallError::Throttled { .. } => SendOutcome::Throttled,
        CallError::NotSent(_) => SendOutcome::NotSent,
        CallError::Unconfirmed(_) => SendOutcome::Unknown,
    };
    let (status, code, detail, answer) = match &err {
        CallError::Rejected { http_status, body } => {
            let detail = body.describe_stored(*http_status);
            let answer = refusal(body.code, &detail);
            (STATUS_FAILED, body.code, detail, answer)
        }
        CallError::Throttled { retry_after } => (
            STATUS_FAILED,
            None,
            err.to_string(),
            throttled(*retry_after, calls),
        ),
        CallError::NotSent(_) => (
            STATUS_FAILED,
            None,
            err.to_string(),
            SmsError::Upstream(match calls {
                0 => {
                    "the send ran out of time before Twilio was called; nothing was sent".to_owned()
                }
                1 => "Twilio did not take the message after 1 attempt".to_owned(),
                _ => format!("Twilio did not take the message after {calls} attempts"),
            }),
        ),
        CallError::Unconfirmed(_) => (
            STATUS_UNKNOWN,
            None,
            err.to_string(),
            SmsError::Upstream(
                "Twilio did not confirm the message; it may still be delivered, so it was not \
                 sent again"
                    .to_owned(),
            ),
        ),
    };
    match &err {
        // Twilio's words quote the recipient ("The 'To' number +1… is not a valid phone
        // number"): they are kept in the SMS row, and the log has the code and status only.
        CallError::Rejected { http_status, body } => tracing::warn!(
            id,
            status,
            http_status,
            twilio_error = body.code,
            "SMS not sent: Twilio refused it"
        ),
        _ => tracing::warn!(id, status, error = %detail, "SMS not sent"),
    }
    let write = {
        let (store, now, id) = (store.clone(), clock.now_ms(), id.to_owned());
        async move {
            let result = SendResult {
                status,
                twilio_sid: None,
                error_code: code,
                error_message: Some(&detail),
            };
            if let Err(store_err) = record_answer(&store, (id.as_str(), attempt), result, now).await
            {
                tracing::error!(
                    id,
                    error = crate::error::causes(&store_err),
                    "SMS failure not stored"
                );
            }
        }
    };
    if !bounded_write(tasks, write).await {
        // Until it is, the row stays `accepted`: a retry gets 409, then `unknown`.
        tracing::error!(
            id,
            "SMS failure not stored within {} s (the database is slow or unavailable); the \
             write goes on",
            WRITE_WAIT.as_secs()
        );
    }
    (answer, outcome)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::twilio::client::TwilioErrorBody;

    fn request(to: &str, body: &str, key: Option<&str>) -> SendSmsRequest {
        SendSmsRequest {
            to: Some(to.to_owned()),
            body: Some(body.to_owned()),
            idempotency_key: key.map(str::to_owned),
            other: BTreeMap::new(),
        }
    }

    fn field_of(result: Result<Valid, SmsError>) -> String {
        match result {
            Err(SmsError::Invalid { field, .. }) => field,
            Err(other) => panic!("not a validation failure: {other}"),
            Ok(_) => panic!("accepted"),
        }
    }

    #[test]
    fn each_rule_names_its_field() {
        let none: &[String] = &[];
        assert_eq!(
            field_of(validate(request("12025550123", "hi", None), none)),
            "to"
        );
        assert_eq!(field_of(validate(request("+0123", "hi", None), none)), "to");
        let uk = ["+44".to_owned()];
        assert_eq!(
            field_of(validate(request("+12025550123", "hi", None), &uk)),
            "to"
        );
        assert_eq!(
            field_of(validate(request("+12025550123", "", None), none)),
            "body"
        );
        let long = "é".repeat(MAX_BODY_CHARS + 1);
        assert_eq!(
            field_of(validate(request("+12025550123", &long, None), none)),
            "body"
        );
        let key = "k".repeat(MAX_IDEMPOTENCY_KEY_CHARS + 1);
        assert_eq!(
            field_of(validate(request("+12025550123", "hi", Some(&key)), none)),
            "idempotency_key"
        );
        let missing = SendSmsRequest {
            to: Some("+12025550123".to_owned()),
            body: None,
            idempotency_key: None,
            other: BTreeMap::new(),
        };
        assert_eq!(field_of(validate(missing, none)), "body");
    }

    #[test]
    fn a_default_send_fits_its_budget_and_the_route_timeout() {
        let twilio = Config::defaults().twilio;
        assert!(twilio.request_timeout <= twilio.send_budget);
        assert!(
            twilio.send_budget + AFTER_BUDGET < crate::server::middleware::REQUEST_TIMEOUT,
            "a send could be answered 504 while it goes on"
        );
    }

    /// A row still `accepted` is taken for one whose sender is gone (a retry with its key
    /// answered `unknown`, the sweep marking it so) only once no sender can still store its
    /// answer: the send's budget, then Twilio's answer tried for `RECORD_RETRY_FOR` while the
    /// database refuses it, its last try as long as a write can take, and the clocks' margin.
    /// At 48 s, a failure stored 70 s in turned a retry's 202 `unknown` into a text never sent.
    #[test]
    fn a_row_is_taken_for_abandoned_only_after_its_sender_can_no_longer_store_its_answer() {
        let budget = Config::defaults().twilio.send_budget;
        let last_write_ends = budget + RECORD_RETRY_FOR + crate::store::LONGEST_WRITE_TRY;
        assert!(
            send_deadline(budget) >= last_write_ends + Duration::from_secs(20),
            "{:?} < {last_write_ends:?} and the clocks' margin",
            send_deadline(budget)
        );
        // The number OPERATIONS.md gives (a retry's 409, the sweep): a change here changes it.
        assert_eq!(send_deadline(budget), Duration::from_secs(116));
    }

    #[test]
    fn the_limits_are_inclusive() {
        let none: &[String] = &[];
        let longest = "é".repeat(MAX_BODY_CHARS);
        let key = "k".repeat(MAX_IDEMPOTENCY_KEY_CHARS);
        assert!(
            validate(
                request("+447700900123", &longest, Some(&key)),
                &["+44".to_owned()]
            )
            .is_ok()
        );
        assert!(validate(request("+12025550123", "x", None), none).is_ok());
    }

    #[tokio::test]
    async fn a_refusal_is_logged_by_its_code_without_twilios_words_which_name_the_number() {
        let config = crate::config::Config::from_lookup(|name| {
            (name == "DATABASE_URL").then(|| "sqlite::memory:".to_owned())
        })
        .unwrap();
        let store = Store::connect(&config.database_url).await.unwrap();
        let lines = crate::telemetry::LogLines::default();
        let _default = tracing::subscriber::set_default(lines.tracing_subscribers_json());
        let refusal = NotCreated {
            err: CallError::Rejected {
                http_status: 400,
                body: TwilioErrorBody {
                    code: Some(21211),
                    message: Some(
                        "The 'To' number +15550000000 is not a valid phone number.".to_owned(),
                    ),
                    more_info: None,
                    status: Some(400),
                },
            },
            calls: 1,
        };
        record_failure(
            &store,
            &Clock::manual(),
            &SendTasks::default(),
            ("sms-1", 1),
            refusal,
        )
        .await;
        let log = lines.text();
        let line = log
            .lines()
            .find(|line| line.contains("SMS not sent"))
            .unwrap_or_else(|| panic!("no \"SMS not sent\" line in {log}"));
        assert!(line.contains("21211") && line.contains("400"), "{line}");
        assert!(!line.contains("5550000000"), "{line}");
    }
}
