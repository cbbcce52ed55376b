//! Webhook events: check the signature, read the event leniently, turn it into its effect, and
//! store ledger row and effect in one transaction (see `Store::apply_stripe_event`). `apply` is
//! shared with the reconciliation, so an event is applied once however it arrives.
//!
//! Ordering: each row keeps the `created` of the event that wrote it; an older event changes
//! nothing. Two events of one object in the same second cannot be ordered by `created` (Stripe's
//! times are seconds), so then the object's current state is fetched from Stripe and written.

use std::time::Duration;

use secrecy::SecretString;
use serde::de::DeserializeOwned;

use crate::store::{
    CatalogueObject, Deletion, EventReceipt, LedgerEvent, SameSecond, Store, StripeEffect,
    Tombstone,
};
use crate::stripe::StripeMetrics;
use crate::stripe::client::{RetryPolicy, StripeClient, StripeError};
use crate::stripe::objects::{
    CheckoutSession, Event, Invoice, InvoiceOutcome, Price, Product, Subscription, ThinEvent,
    is_thin_event, ms, rfc3339_ms, without_nul,
};
use crate::stripe::signature::{self, SignatureError};

/// How hard a delivery tries to fetch a same-second event's object: at most 2 attempts of 8 s
/// and a wait of at most 1 s between them (17 s), inside the route's 30 s deadline (which would
/// answer 504 instead of the contract's 502) and Stripe's own delivery timeout. Stripe redelivers
/// a failed event, so trying longer here buys nothing.
pub const SAME_SECOND_RETRY: RetryPolicy = RetryPolicy {
    max_attempts: 2,
    base_delay: Duration::from_millis(500),
    max_delay: Duration::from_secs(1),
    attempt_timeout: Duration::from_secs(8),
};

/// Every event type `effect_of` acts on: reconciliation lists only these (`types[]`, which takes
/// at most 20), not every event of the account. `effect_of` ignores any type not here, so a type
/// given an effect there and not listed here is caught by its own tests, not left unreconciled.
pub const APPLIED_EVENT_TYPES: &[&str] = &[
    "product.created",
    "product.updated",
    "product.deleted",
    "price.created",
    "price.updated",
    "price.deleted",
    "checkout.session.completed",
    "checkout.session.async_payment_succeeded",
    "checkout.session.async_payment_failed",
    "customer.subscription.created",
    "customer.subscription.updated",
    "customer.subscription.deleted",
    "invoice.paid",
    "invoice.payment_failed",
];

#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error(transparent)]
    Signature(#[from] SignatureError),
    /// Signed, yet not an event edgegate can read; nothing was stored.
    #[error("{0}")]
    Unreadable(String),
    /// Applying failed and was rolled back; Stripe retries on the error answer.
    #[error(transparent)]
    Store(anyhow::Error),
    /// A same-second event needs the object's current state and no `STRIPE_SECRET_KEY` is set;
    /// nothing was stored, so Stripe redelivers.
    #[error(
        "event {0} ties with the stored state of its object in the same second; \
         settling it needs STRIPE_SECRET_KEY"
    )]
    NeedsSecretKey(String),
    /// A same-second event's object could not be fetched; nothing was stored.
    #[error("event {event}: the current state of its object could not be fetched: {error}")]
    Upstream { event: String, error: StripeError },
}

impl WebhookError {
    /// The metrics label of a refused delivery.
    pub fn outcome(&self) -> &'static str {
        match self {
            Self::Signature(_) => "invalid_signature",
            Self::Unreadable(_) => "unreadable",
            Self::Store(_) => "error",
            Self::NeedsSecretKey(_) | Self::Upstream { .. } => "same_second_unsettled",
        }
    }
}

/// What became of one event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// New, and its effect written.
    Applied,
    /// New, of a type edgegate does not act on: recorded in the ledger only.
    Ignored,
    /// New, and about objects that are not the platform's (see [`Foreign`]): recorded in the
    /// ledger only, its object neither read, written nor fetched.
    Foreign(Foreign),
    /// Already in the ledger: nothing done.
    Duplicate,
}

impl Outcome {
    /// The metrics label of a delivery with this outcome. A type edgegate does not act on is
    /// counted as `applied` (it is recorded as it should be).
    pub fn label(self) -> &'static str {
        match self {
            Self::Applied | Self::Ignored => "applied",
            Self::Foreign(foreign) => foreign.label(),
            Self::Duplicate => "duplicate",
        }
    }
}

/// Why a signed event is about objects edgegate does not keep, so that applying it would write
/// another account's objects into the platform's tables.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Foreign {
    /// A Connect event (`account` set): it happened in a connected account, and reached edgegate
    /// through a Connect endpoint whose secret is in `STRIPE_WEBHOOK_SECRET`. Its object is that
    /// account's; asked of Stripe with the platform's key it does not exist.
    ConnectedAccount,
    /// An event of the other mode than `STRIPE_SECRET_KEY` (`livemode` is the event's): a live
    /// event with a test key, or the reverse, from an endpoint of the other mode whose secret is
    /// in `STRIPE_WEBHOOK_SECRET`. Its objects are not those the key syncs and fetches.
    OtherMode { livemode: bool },
}

impl Foreign {
    pub fn label(self) -> &'static str {
        match self {
            Self::ConnectedAccount => "connect_account",
            Self::OtherMode { .. } => "livemode_mismatch",
        }
    }
}

/// Whether `event` is about objects that are not the platform's own in the key's mode. Without
/// a key (or one whose prefix does not say its mode), or an event that does not say its own, the
/// mode is not checked.
fn foreign(event: &Event, stripe: Option<&StripeClient>) -> Option<Foreign> {
    if event.account.is_some() {
        return Some(Foreign::ConnectedAccount);
    }
    let key_livemode = stripe.and_then(StripeClient::key_livemode)?;
    let livemode = event.livemode?;
    (livemode != key_livemode).then_some(Foreign::OtherMode { livemode })
}

/// `live` or `test`.
fn mode(livemode: bool) -> &'static str {
    if livemode { "live" } else { "test" }
}

/// Logs, once per event (not for a redelivery), why `event` was recorded and not applied.
fn log_foreign(event: &Event, foreign: Foreign) {
    match foreign {
        Foreign::ConnectedAccount => tracing::warn!(
            event = event.id,
            event_type = event.event_type,
            account = event.account.as_deref().unwrap_or_default(),
            "Stripe event recorded and not applied: it happened in a connected account \
             (Connect), whose objects are not the platform's; send only the platform's own \
             events here (delete the Connect endpoint in Stripe, or point it elsewhere, and \
             remove its secret from STRIPE_WEBHOOK_SECRET)"
        ),
        Foreign::OtherMode { livemode } => tracing::warn!(
            event = event.id,
            event_type = event.event_type,
            event_mode = mode(livemode),
            key_mode = mode(!livemode),
            "Stripe event recorded and not applied: its mode (livemode) is not that of \
             STRIPE_SECRET_KEY; an endpoint of the other mode signs with a secret in \
             STRIPE_WEBHOOK_SECRET (keep there only the secrets of the key's mode)"
        ),
    }
}

/// What became of a delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    pub event_type: String,
    pub duplicate: bool,
    /// The metrics label of the delivery (see [`Outcome::label`]).
    pub outcome: &'static str,
}

/// Verifies and applies one delivery, and counts it in `metrics`. `now_ms` is the receiving time
/// (signature age, row stamps). `stripe` settles same-second events (see `apply`).
pub async fn receive(
    store: &Store,
    stripe: Option<&StripeClient>,
    secrets: &[SecretString],
    signature_header: Option<&str>,
    body: &[u8],
    now_ms: i64,
    metrics: &StripeMetrics,
) -> Result<Delivery, WebhookError> {
    let received: Result<Delivery, WebhookError> = async {
        signature::verify(signature_header, body, secrets, now_ms.div_euclid(1000))?;
        if is_thin_event(body) {
            return receive_thin(store, body, now_ms).await;
        }
        let event = read_event(body)?;
        check_envelope(&event)?;
        let outcome = apply(store, stripe, &event, now_ms).await?;
        Ok(Delivery {
            event_type: event.event_type,
            duplicate: outcome == Outcome::Duplicate,
            outcome: outcome.label(),
        })
    }
    .await;
    match &received {
        Ok(delivery) => metrics.webhook_event(&delivery.event_type, delivery.outcome),
        Err(err) => {
            if let WebhookError::Unreadable(reason) = err {
                // The reason names fields, never their values (`unreadable`).
                tracing::warn!(
                    reason,
                    "Stripe event refused: signed, but it cannot be read; Stripe delivers it \
                     again"
                );
            }
            metrics.webhook_event("unknown", err.outcome());
        }
    }
    received
}

/// The metrics label of a thin event received for the first time (see [`receive_thin`]).
pub const THIN_OUTCOME: &str = "thin";

/// A thin event (see [`ThinEvent`]): answered as received and recorded in the ledger as not
/// applied (so a redelivery is a duplicate), counted as `thin` and logged once. One that is not
/// what Stripe sends (no id or type, `created` not RFC 3339) is unreadable, as a snapshot event
/// without its envelope is.
async fn receive_thin(store: &Store, body: &[u8], now_ms: i64) -> Result<Delivery, WebhookError> {
    let what = "the thin event";
    let body = without_nul(body);
    let thin: ThinEvent =
        serde_path_to_error::deserialize(&mut serde_json::Deserializer::from_slice(&body))
            .map_err(|err| unreadable(what, err))?;
    let empty = if thin.id.is_empty() {
        Some("id")
    } else if thin.event_type.is_empty() {
        Some("type")
    } else {
        None
    };
    if let Some(field) = empty {
        return Err(WebhookError::Unreadable(format!(
            "{what}'s {field} is empty"
        )));
    }
    let created_ms = rfc3339_ms(&thin.created).ok_or_else(|| {
        WebhookError::Unreadable(format!(
            "{what} cannot be read: created: not an RFC 3339 time"
        ))
    })?;
    let ledger = LedgerEvent {
        id: thin.id,
        event_type: thin.event_type,
        created_ms,
        livemode: thin.livemode.unwrap_or(false),
        received_at: now_ms,
    };
    let receipt = store
        .apply_stripe_event(&ledger, &StripeEffect::None, SameSecond::Detect)
        .await
        .map_err(WebhookError::Store)?;
    let duplicate = receipt == EventReceipt::Duplicate;
    if !duplicate {
        tracing::warn!(
            event = ledger.id,
            event_type = ledger.event_type,
            "Stripe thin event recorded and not applied: edgegate applies snapshot events only; \
             set this event destination's payload style to snapshot (reconciliation fetches \
             the snapshot events from /v1/events)"
        );
    }
    Ok(Delivery {
        event_type: ledger.event_type,
        duplicate,
        outcome: if duplicate {
            Outcome::Duplicate.label()
        } else {
            THIN_OUTCOME
        },
    })
}

/// Records one event in the ledger and writes its effect, once. When the row was last written
/// by an event of the same second, the object's current state is fetched from Stripe and
/// written instead; failing that, nothing is stored and the error says why. A [`Foreign`]
/// event is recorded only: its object is neither read nor fetched.
pub async fn apply(
    store: &Store,
    stripe: Option<&StripeClient>,
    event: &Event,
    now_ms: i64,
) -> Result<Outcome, WebhookError> {
    let foreign = foreign(event, stripe);
    let effect = match foreign {
        Some(_) => StripeEffect::None,
        None => effect_of(event, now_ms)?,
    };
    let ledger = LedgerEvent {
        id: event.id.clone(),
        event_type: event.event_type.clone(),
        created_ms: ms(event.created),
        livemode: event.livemode.unwrap_or(false),
        received_at: now_ms,
    };
    let mut receipt = store
        .apply_stripe_event(&ledger, &effect, SameSecond::Detect)
        .await
        .map_err(WebhookError::Store)?;
    if receipt == EventReceipt::SameSecond {
        let Some(client) = stripe else {
            return Err(WebhookError::NeedsSecretKey(event.id.clone()));
        };
        let client = client.capped(SAME_SECOND_RETRY);
        let current = current_effect(&client, &effect, now_ms)
            .await
            .map_err(|error| WebhookError::Upstream {
                event: event.id.clone(),
                error,
            })?;
        receipt = store
            .apply_stripe_event(&ledger, &current, SameSecond::Overwrite)
            .await
            .map_err(WebhookError::Store)?;
    }
    if receipt == EventReceipt::Duplicate {
        return Ok(Outcome::Duplicate);
    }
    if let Some(foreign) = foreign {
        log_foreign(event, foreign);
        return Ok(Outcome::Foreign(foreign));
    }
    Ok(if effect == StripeEffect::None {
        Outcome::Ignored
    } else {
        Outcome::Applied
    })
}

/// `effect` rewritten with its object's state as Stripe reports it now, at the same `as_of`.
/// An object Stripe no longer has is written as deleted (products, prices) or left as stored.
async fn current_effect(
    client: &StripeClient,
    effect: &StripeEffect,
    now_ms: i64,
) -> Result<StripeEffect, StripeError> {
    // Gone: Stripe answers 404, or the stub of a deleted object (`None` below).
    let gone =
        |result: Result<Option<StripeEffect>, StripeError>, deleted: StripeEffect| match result {
            Ok(Some(effect)) => Ok(effect),
            Ok(None) | Err(StripeError::NotFound(_)) => Ok(deleted),
            Err(err) => Err(err),
        };
    Ok(match effect {
        StripeEffect::None => StripeEffect::None,
        StripeEffect::Product(row) => {
            let fetched = client
                .retrieve::<Product>("products", &row.id)
                .await
                .map(|p| {
                    p.is_whole()
                        .then(|| StripeEffect::Product(p.row(row.as_of, None)))
                });
            let mut deleted = row.clone();
            deleted.active = false;
            deleted.deactivated_at = Some(deleted.deactivated_at.unwrap_or(now_ms));
            gone(fetched, StripeEffect::Product(deleted))?
        }
        StripeEffect::Price(row) => {
            let fetched = client
                .retrieve_expanded::<Price>("prices", &row.id, &Price::INCLUDABLE)
                .await
                .map(|p| {
                    p.is_whole()
                        .then(|| StripeEffect::Price(p.row(row.as_of, None)))
                });
            let mut deleted = row.clone();
            deleted.active = false;
            deleted.deactivated_at = Some(deleted.deactivated_at.unwrap_or(now_ms));
            gone(fetched, StripeEffect::Price(deleted))?
        }
        StripeEffect::Deletion(deletion) => {
            let fetched = match deletion.object {
                CatalogueObject::Product => client
                    .retrieve::<Product>("products", &deletion.id)
                    .await
                    .map(|p| {
                        p.is_whole()
                            .then(|| StripeEffect::Product(p.row(deletion.as_of, None)))
                    }),
                CatalogueObject::Price => client
                    .retrieve_expanded::<Price>("prices", &deletion.id, &Price::INCLUDABLE)
                    .await
                    .map(|p| {
                        p.is_whole()
                            .then(|| StripeEffect::Price(p.row(deletion.as_of, None)))
                    }),
            };
            gone(fetched, effect.clone())?
        }
        StripeEffect::CheckoutSession { session, .. } => {
            let fetched = client
                .retrieve::<CheckoutSession>("checkout/sessions", &session.id)
                .await
                .map(|s| {
                    let (session, customer) = s.rows(session.as_of);
                    StripeEffect::CheckoutSession { session, customer }
                });
            gone(fetched.map(Some), StripeEffect::None)?
        }
        StripeEffect::Subscription(row) => {
            let fetched = client
                .retrieve::<Subscription>("subscriptions", &row.id)
                .await
                .map(|s| StripeEffect::Subscription(s.row(row.as_of)));
            gone(fetched.map(Some), StripeEffect::None)?
        }
        StripeEffect::Invoice(row) => {
            let outcome = if row.payment_failed_at.is_some() {
                InvoiceOutcome::PaymentFailed
            } else {
                InvoiceOutcome::Paid
            };
            let fetched = client
                .retrieve::<Invoice>("invoices", &row.id)
                .await
                .map(|i| StripeEffect::Invoice(i.row(row.as_of, outcome)));
            gone(fetched.map(Some), StripeEffect::None)?
        }
    })
}

/// Stripe always sends an id, a type and an object; an event without them would enter the
/// ledger under an empty id and make later ones look like duplicates.
fn check_envelope(event: &Event) -> Result<(), WebhookError> {
    let missing = if event.id.is_empty() {
        "id"
    } else if event.event_type.is_empty() {
        "type"
    } else if !event.data.object.is_object() {
        return Err(WebhookError::Unreadable(
            "the event's data.object is not an object".to_owned(),
        ));
    } else {
        return Ok(());
    };
    Err(WebhookError::Unreadable(format!(
        "the event's {missing} is empty"
    )))
}

fn read_event(body: &[u8]) -> Result<Event, WebhookError> {
    let what = "the event";
    if let Some(reason) = not_an_object(body) {
        return Err(WebhookError::Unreadable(format!(
            "{what} cannot be read: {reason}"
        )));
    }
    let body = without_nul(body);
    let mut json = serde_json::Deserializer::from_slice(&body);
    let event = serde_path_to_error::deserialize(&mut json).map_err(|err| unreadable(what, err))?;
    json.end()
        .map_err(|err| WebhookError::Unreadable(format!("{what} cannot be read: {err}")))?;
    Ok(event)
}

/// Why a body that does not start as a JSON object does (whitespace aside) cannot be an event:
/// what JSON it is, or that it is not JSON. Read as an event, serde described an array's first
/// element (`[0]: invalid type: integer, expected a string`) or named our type (`expected
/// struct Event`). `None` for a body that starts as an object, or as nothing JSON can.
fn not_an_object(body: &[u8]) -> Option<String> {
    let first = body
        .iter()
        .find(|b| !matches!(b, b' ' | b'\t' | b'\n' | b'\r'))?;
    let kind = match first {
        b'[' => "an array",
        b'"' => "a string",
        b'-' | b'0'..=b'9' => "a number",
        b't' | b'f' => "a boolean",
        b'n' => "null",
        _ => return None,
    };
    Some(
        match serde_json::from_slice::<serde::de::IgnoredAny>(body) {
            Ok(_) => format!("the body is {kind}, not a JSON object"),
            // Syntax errors quote no values.
            Err(err) => format!("the body is not JSON: {err}"),
        },
    )
}

fn object<T: DeserializeOwned>(event: &Event) -> Result<T, WebhookError> {
    serde_path_to_error::deserialize(&event.data.object)
        .map_err(|err| unreadable(&format!("data.object of {}", event.event_type), err))
}

/// Why `what` cannot be read, by the path of the field and the kind of problem. The reason is
/// logged (reconcile's `listed event skipped`), and serde quotes the offending value, which can
/// be a customer's email or name: the value is left out.
fn unreadable(what: &str, err: serde_path_to_error::Error<serde_json::Error>) -> WebhookError {
    let path = err.path().to_string();
    let err = err.into_inner();
    // `.` is the path of the whole document: only a field's is worth naming.
    let at = if path == "." {
        String::new()
    } else {
        format!("{path}: ")
    };
    WebhookError::Unreadable(format!(
        "{what} cannot be read: {at}{}",
        without_values(&err.to_string())
    ))
}

/// serde's description of a problem without the values it quotes: `invalid type: string
/// "alice@example.com", expected i64` becomes `invalid type: string, expected i64`, and
/// `unknown variant `x`, expected one of …` loses the `x`. Values come before `, expected`;
/// what follows is the type's own description, with the line and column. Field names
/// (`missing field `id``) are kept: they are the type's, not the sender's.
fn without_values(text: &str) -> String {
    let (head, tail) = match text.find(", expected ") {
        Some(at) => text.split_at(at),
        None => (text, ""),
    };
    let mut kept = String::with_capacity(text.len());
    let mut chars = head.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => {
                // A Debug-quoted string, its inner quotes escaped.
                let mut escaped = false;
                for inner in chars.by_ref() {
                    match inner {
                        '\\' if !escaped => escaped = true,
                        '"' if !escaped => break,
                        _ => escaped = false,
                    }
                }
                trim_space(&mut kept);
            }
            '`' if kept.ends_with("field ") => {
                kept.push(c);
                for inner in chars.by_ref() {
                    kept.push(inner);
                    if inner == '`' {
                        break;
                    }
                }
            }
            '`' => {
                chars.by_ref().find(|&inner| inner == '`');
                trim_space(&mut kept);
            }
            _ => kept.push(c),
        }
    }
    kept.push_str(tail);
    kept
}

fn trim_space(text: &mut String) {
    if text.ends_with(' ') {
        text.pop();
    }
}

/// A deletion whose event carries Stripe's stub (`{"id","object","deleted":true}`): the row is
/// marked deleted and keeps what it held, instead of being written from a stub that holds none
/// of it; `tombstone`, the stub's row, only where no row is.
fn deletion(object: CatalogueObject, id: String, as_of: i64, tombstone: Tombstone) -> StripeEffect {
    let deactivated_at = match &tombstone {
        Tombstone::Product(row) => row.deactivated_at,
        Tombstone::Price(row) => row.deactivated_at,
    };
    StripeEffect::Deletion(Deletion {
        object,
        id,
        as_of,
        deactivated_at: deactivated_at.unwrap_or(as_of),
        tombstone,
    })
}

/// The change an event makes; `as_of` for every row is the event's `created`, so an older event
/// delivered late does not overwrite what a newer one wrote.
pub fn effect_of(event: &Event, now_ms: i64) -> Result<StripeEffect, WebhookError> {
    if !APPLIED_EVENT_TYPES.contains(&event.event_type.as_str()) {
        return Ok(StripeEffect::None);
    }
    let as_of = ms(event.created);
    let effect = match event.event_type.as_str() {
        "product.created" | "product.updated" => {
            StripeEffect::Product(object::<Product>(event)?.row(as_of, None))
        }
        "product.deleted" => {
            let product = object::<Product>(event)?;
            if product.is_whole() {
                StripeEffect::Product(product.row(as_of, Some(now_ms)))
            } else {
                let tombstone = Tombstone::Product(Box::new(product.row(as_of, Some(now_ms))));
                deletion(CatalogueObject::Product, product.id, as_of, tombstone)
            }
        }
        "price.created" | "price.updated" => {
            StripeEffect::Price(object::<Price>(event)?.row(as_of, None))
        }
        "price.deleted" => {
            let price = object::<Price>(event)?;
            if price.is_whole() {
                StripeEffect::Price(price.row(as_of, Some(now_ms)))
            } else {
                let tombstone = Tombstone::Price(Box::new(price.row(as_of, Some(now_ms))));
                deletion(CatalogueObject::Price, price.id, as_of, tombstone)
            }
        }
        "checkout.session.completed"
        | "checkout.session.async_payment_succeeded"
        | "checkout.session.async_payment_failed" => {
            let (session, customer) = object::<CheckoutSession>(event)?.rows(as_of);
            StripeEffect::CheckoutSession { session, customer }
        }
        "customer.subscription.created"
        | "customer.subscription.updated"
        | "customer.subscription.deleted" => {
            StripeEffect::Subscription(object::<Subscription>(event)?.row(as_of))
        }
        "invoice.paid" => {
            StripeEffect::Invoice(object::<Invoice>(event)?.row(as_of, InvoiceOutcome::Paid))
        }
        "invoice.payment_failed" => StripeEffect::Invoice(
            object::<Invoice>(event)?.row(as_of, InvoiceOutcome::PaymentFailed),
        ),
        _ => StripeEffect::None,
    };
    Ok(effect)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_type_reconciliation_lists_is_one_effect_of_acts_on_and_fits_stripe_s_filter() {
        assert!(
            APPLIED_EVENT_TYPES.len() <= 20,
            "Stripe's types[] takes 20 at most"
        );
        let event = |kind: &str| -> Event {
            serde_json::from_value(serde_json::json!({
                "id": "evt_1", "type": kind, "created": 1, "data": {"object": "not an object"}
            }))
            .unwrap()
        };
        for kind in APPLIED_EVENT_TYPES {
            // Acted on: its object is read (and this one is unreadable), not ignored.
            let effect = effect_of(&event(kind), 0);
            assert!(!matches!(effect, Ok(StripeEffect::None)), "{kind}");
        }
        let ignored = effect_of(&event("payment_intent.created"), 0);
        assert!(matches!(ignored, Ok(StripeEffect::None)));
    }

    #[test]
    fn a_same_second_fetch_ends_well_inside_the_route_deadline() {
        let policy = RetryPolicy::default().capped(SAME_SECOND_RETRY);
        assert_eq!(policy, SAME_SECOND_RETRY);
        assert!(policy.worst_case() <= Duration::from_secs(17));
        assert!(policy.worst_case() < crate::server::middleware::REQUEST_TIMEOUT / 3 * 2);
    }

    /// The reason an unreadable event is refused for is logged (reconcile's `listed event
    /// skipped`), so it names where and what is wrong, never the value, which can be a
    /// customer's email.
    fn assert_names_the_field_not_the_value(reason: &str, field: &str) {
        assert!(reason.contains(field), "{reason}");
        assert!(reason.contains("invalid type"), "{reason}");
        assert!(!reason.contains("alice@example.com"), "{reason}");
    }

    #[test]
    fn serde_descriptions_lose_their_values_and_keep_field_names() {
        for (given, kept) in [
            (
                r#"invalid type: string "a\"b@example.com", expected i64 at line 1 column 9"#,
                "invalid type: string, expected i64 at line 1 column 9",
            ),
            (
                "invalid value: integer `15550000000`, expected a boolean",
                "invalid value: integer, expected a boolean",
            ),
            (
                "unknown variant `bob@example.com`, expected one of `a`, `b`",
                "unknown variant, expected one of `a`, `b`",
            ),
            ("missing field `id`", "missing field `id`"),
            (
                "expected value at line 1 column 2",
                "expected value at line 1 column 2",
            ),
        ] {
            assert_eq!(without_values(given), kept);
        }
    }

    #[test]
    fn an_unreadable_object_is_refused_without_its_value() {
        let event: Event = serde_json::from_value(serde_json::json!({
            "id": "evt_1",
            "type": "product.updated",
            "created": 1,
            "data": {"object": {"id": "prod_1", "active": "alice@example.com"}},
        }))
        .unwrap();
        match effect_of(&event, 0) {
            Err(WebhookError::Unreadable(reason)) => {
                assert_names_the_field_not_the_value(&reason, "active");
            }
            other => panic!("{other:?}"),
        }
    }

    async fn memory_store() -> Store {
        let config = crate::config::Config::from_lookup(|name| {
            (name == "DATABASE_URL").then(|| "sqlite::memory:".to_owned())
        })
        .unwrap();
        let store = Store::connect(&config.database_url).await.unwrap();
        store.migrate().await.unwrap();
        store
    }

    const NOW: i64 = 1_700_000_000;

    /// `body` delivered signed with `whsec_test`, as Stripe would at `NOW`.
    async fn deliver(
        store: &Store,
        stripe: Option<&StripeClient>,
        body: &[u8],
    ) -> Result<Delivery, WebhookError> {
        let header = signature::sign(body, "whsec_test", NOW);
        let secrets = [SecretString::from("whsec_test")];
        let metrics = StripeMetrics::default();
        receive(
            store,
            stripe,
            &secrets,
            Some(&header),
            body,
            NOW * 1000,
            &metrics,
        )
        .await
    }

    #[tokio::test]
    async fn a_connected_accounts_event_is_logged_once_and_not_applied() {
        let store = memory_store().await;
        let lines = crate::telemetry::LogLines::default();
        let _default = tracing::subscriber::set_default(lines.tracing_subscribers_json());
        let body = br#"{"id":"evt_c1","type":"product.created","created":1699999990,"livemode":false,"account":"acct_1Seller","data":{"object":{"id":"prod_c1","name":"alice@example.com"}}}"#;
        for duplicate in [false, true] {
            let delivery = deliver(&store, None, body).await.unwrap();
            assert_eq!(delivery.duplicate, duplicate);
        }
        let log = lines.text();
        let warned: Vec<&str> = log
            .lines()
            .filter(|line| line.contains("connected account"))
            .collect();
        assert_eq!(warned.len(), 1, "{log}");
        for wanted in ["WARN", "evt_c1", "acct_1Seller", "product.created"] {
            assert!(warned[0].contains(wanted), "{wanted} in {}", warned[0]);
        }
        assert!(
            !log.contains("whsec_test") && !log.contains("alice@"),
            "{log}"
        );
    }

    #[tokio::test]
    async fn an_event_of_the_other_mode_is_logged_once_naming_both_modes() {
        let store = memory_store().await;
        let config = crate::config::Config::from_lookup(|name| {
            (name == "STRIPE_SECRET_KEY").then(|| "sk_test_unit0123456789".to_owned())
        })
        .unwrap();
        let http = reqwest::Client::new();
        let client = StripeClient::from_config(http, &config.stripe, RetryPolicy::default());
        let lines = crate::telemetry::LogLines::default();
        let _default = tracing::subscriber::set_default(lines.tracing_subscribers_json());
        let body = br#"{"id":"evt_m1","type":"product.created","created":1699999990,"livemode":true,"data":{"object":{"id":"prod_m1"}}}"#;
        for duplicate in [false, true] {
            let delivery = deliver(&store, client.as_ref(), body).await.unwrap();
            assert_eq!(delivery.duplicate, duplicate);
            assert_eq!(
                delivery.outcome,
                ["livemode_mismatch", "duplicate"][usize::from(duplicate)]
            );
        }
        let log = lines.text();
        let warned: Vec<&str> = log
            .lines()
            .filter(|line| line.contains("livemode"))
            .collect();
        assert_eq!(warned.len(), 1, "{log}");
        for wanted in [
            "WARN",
            "evt_m1",
            r#""event_mode":"live""#,
            r#""key_mode":"test""#,
        ] {
            assert!(warned[0].contains(wanted), "{wanted} in {}", warned[0]);
        }
        assert!(!log.contains("sk_test_unit"), "{log}");
    }

    #[tokio::test]
    async fn an_unreadable_event_is_refused_without_its_value() {
        let store = memory_store().await;
        let lines = crate::telemetry::LogLines::default();
        let _default = tracing::subscriber::set_default(lines.tracing_subscribers_json());
        let body = br#"{"id":"evt_1","type":"customer.updated","created":"alice@example.com","data":{"object":{}}}"#;
        let received = deliver(&store, None, body).await;
        match received {
            Err(WebhookError::Unreadable(reason)) => {
                assert_names_the_field_not_the_value(&reason, "created");
            }
            other => panic!("{other:?}"),
        }
        // The reason is logged too (the answer is all Stripe's dashboard shows), still without
        // the value, and without the secret.
        let log = lines.text();
        let warned: Vec<&str> = log.lines().filter(|line| line.contains("WARN")).collect();
        assert_eq!(warned.len(), 1, "{log}");
        assert_names_the_field_not_the_value(warned[0], "created");
        assert!(warned[0].contains("cannot be read"), "{}", warned[0]);
        assert!(!log.contains("whsec_test"), "{log}");
    }

    #[tokio::test]
    async fn a_thin_event_that_stripe_would_not_send_is_unreadable() {
        let store = memory_store().await;
        let thin = |id: &str, kind: &str, created: &str| {
            serde_json::json!({
                "id": id, "object": "v2.core.event", "type": kind, "created": created,
            })
            .to_string()
        };
        for (body, field) in [
            (thin("", "v1.product.updated", "2023-11-14T22:13:20Z"), "id"),
            (thin("evt_t", "", "2023-11-14T22:13:20Z"), "type"),
            (thin("evt_t", "v1.product.updated", "alice@example.com"), "created"),
            (
                r#"{"id":"evt_t","object":"v2.core.event","type":"x","created":"2023-11-14T22:13:20Z","related_object":"alice@example.com"}"#.to_owned(),
                "related_object",
            ),
        ] {
            match deliver(&store, None, body.as_bytes()).await {
                Err(WebhookError::Unreadable(reason)) => {
                    assert!(reason.contains(field), "{field}: {reason}");
                    assert!(!reason.contains("alice@"), "{reason}");
                }
                other => panic!("{body}: {other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn a_thin_event_is_recorded_and_logged_once_asking_for_snapshot_events() {
        let store = memory_store().await;
        let lines = crate::telemetry::LogLines::default();
        let _default = tracing::subscriber::set_default(lines.tracing_subscribers_json());
        let body = br#"{"id":"evt_test_65R1","object":"v2.core.event","type":"v1.product.updated","livemode":false,"created":"2023-11-14T22:13:20.000Z","related_object":{"id":"prod_1","type":"product","url":"/v1/products/prod_1"}}"#;
        for duplicate in [false, true] {
            let delivery = deliver(&store, None, body).await.unwrap();
            assert_eq!(delivery.duplicate, duplicate);
            assert_eq!(delivery.event_type, "v1.product.updated");
            assert_eq!(
                delivery.outcome,
                ["thin", "duplicate"][usize::from(duplicate)]
            );
        }
        let log = lines.text();
        let warned: Vec<&str> = log.lines().filter(|line| line.contains("thin")).collect();
        assert_eq!(warned.len(), 1, "{log}");
        for wanted in ["WARN", "evt_test_65R1", "payload style to snapshot"] {
            assert!(warned[0].contains(wanted), "{wanted} in {}", warned[0]);
        }
    }
}
