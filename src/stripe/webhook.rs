//! Webhook events: check the signature, read the event leniently, turn it into its effect, and
//! store ledger row and effect in one transaction (see `Store::apply_stripe_event`).

use secrecy::SecretString;
use serde::de::DeserializeOwned;

use crate::store::{EventReceipt, LedgerEvent, Store, StripeEffect};
use crate::stripe::objects::{
    CheckoutSession, Event, Invoice, InvoiceOutcome, Price, Product, Subscription, ms,
};
use crate::stripe::signature::{self, SignatureError};

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
}

/// What became of a delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    pub event_type: String,
    pub duplicate: bool,
}

/// Verifies and applies one delivery. `now_ms` is the receiving time (signature age, row stamps).
pub async fn receive(
    store: &Store,
    secrets: &[SecretString],
    signature_header: Option<&str>,
    body: &[u8],
    now_ms: i64,
) -> Result<Delivery, WebhookError> {
    signature::verify(signature_header, body, secrets, now_ms.div_euclid(1000))?;
    let event: Event = serde_json::from_slice(body)
        .map_err(|err| WebhookError::Unreadable(format!("the event cannot be read: {err}")))?;
    check_envelope(&event)?;
    let effect = effect_of(&event, now_ms)?;
    let ledger = LedgerEvent {
        id: event.id.clone(),
        event_type: event.event_type.clone(),
        created_ms: ms(event.created),
        livemode: event.livemode.unwrap_or(false),
        received_at: now_ms,
    };
    let receipt = store
        .apply_stripe_event(&ledger, &effect)
        .await
        .map_err(WebhookError::Store)?;
    Ok(Delivery {
        event_type: event.event_type,
        duplicate: receipt == EventReceipt::Duplicate,
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

fn object<T: DeserializeOwned>(event: &Event) -> Result<T, WebhookError> {
    T::deserialize(&event.data.object).map_err(|err| {
        WebhookError::Unreadable(format!(
            "data.object of {} cannot be read: {err}",
            event.event_type
        ))
    })
}

/// The change an event makes; `as_of` for every row is the event's `created`, so an older event
/// delivered late does not overwrite what a newer one wrote.
pub fn effect_of(event: &Event, now_ms: i64) -> Result<StripeEffect, WebhookError> {
    let as_of = ms(event.created);
    let effect = match event.event_type.as_str() {
        "product.created" | "product.updated" => {
            StripeEffect::Product(object::<Product>(event)?.row(as_of, None))
        }
        "product.deleted" => {
            StripeEffect::Product(object::<Product>(event)?.row(as_of, Some(now_ms)))
        }
        "price.created" | "price.updated" => {
            StripeEffect::Price(object::<Price>(event)?.row(as_of, None))
        }
        "price.deleted" => StripeEffect::Price(object::<Price>(event)?.row(as_of, Some(now_ms))),
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
