//! Stripe objects read leniently: only the fields edgegate stores, every one optional where any
//! API version could omit or null it, unknown fields ignored. An account pinned to another API
//! version therefore still syncs and delivers webhooks. Stripe's times are seconds; rows hold ms.

use std::borrow::Cow;

use serde::Deserialize;
use serde_json::Value;

use crate::store::{
    CheckoutSessionRow, CustomerRow, InvoiceRow, PriceRow, ProductRow, SubscriptionRow,
};
use crate::stripe::client::Listed;

/// Stripe's JSON with every `\u0000` escape turned into `\uFFFD` (U+FFFD, the replacement
/// character). PostgreSQL stores no U+0000 in text while SQLite does: a name, description,
/// metadata or id carrying one made every write of that object fail on PostgreSQL only (a sync
/// stuck at that page, a webhook refused for all of Stripe's retries). Done on the bytes where
/// Stripe's JSON is read (the API's answers, a webhook's body once its signature is checked),
/// before any field is taken from them, so every text stored is the same on both engines. JSON
/// carries U+0000 only as that escape (a raw control character is invalid), and inside a string
/// every backslash starts an escape, so escapes are stepped over whole: `\\u0000` (a backslash,
/// then `u0000`) stays. Replacement and escape have the same length: a parse error's position
/// stays true.
pub fn without_nul(json: &[u8]) -> Cow<'_, [u8]> {
    const NUL: &[u8] = b"\\u0000";
    if !json.windows(NUL.len()).any(|window| window == NUL) {
        return Cow::Borrowed(json);
    }
    let mut replaced = json.to_vec();
    let mut at = 0;
    while at < replaced.len() {
        if replaced[at] != b'\\' {
            at += 1;
        } else if replaced[at..].starts_with(NUL) {
            replaced[at + 2..at + 6].copy_from_slice(b"FFFD");
            at += NUL.len();
        } else {
            at += 2;
        }
    }
    Cow::Owned(replaced)
}

/// A reference Stripe sends either as an id or, when expanded, as the object itself.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum IdOrObject {
    Id(String),
    Object { id: String },
}

impl IdOrObject {
    pub fn id(&self) -> &str {
        match self {
            Self::Id(id) | Self::Object { id } => id,
        }
    }
}

fn id_of(reference: &Option<IdOrObject>) -> Option<String> {
    reference.as_ref().map(|r| r.id().to_owned())
}

/// Seconds to milliseconds, saturating (a hostile number must not overflow).
pub fn ms(seconds: i64) -> i64 {
    seconds.saturating_mul(1000)
}

/// A JSON value as stored (JSON text, as `metadata`), `None` for null or absent.
fn json_text(value: &Option<Value>) -> Option<String> {
    // serde_json's map is ordered, so equal values give equal text (the sync compares it).
    value
        .as_ref()
        .filter(|value| !value.is_null())
        .map(Value::to_string)
}

fn metadata_text(metadata: &Option<Value>) -> String {
    match metadata {
        // serde_json's map is ordered, so equal metadata gives equal text (the sync compares it).
        Some(value @ Value::Object(_)) => value.to_string(),
        _ => "{}".to_owned(),
    }
}

#[derive(Clone, Debug, Deserialize)]
pub struct Product {
    pub id: String,
    pub active: Option<bool>,
    pub name: Option<String>,
    pub description: Option<String>,
    pub default_price: Option<IdOrObject>,
    /// URLs of the product's images (up to 8).
    pub images: Option<Value>,
    /// `[{name}]`: what a pricing table lists of the product.
    pub marketing_features: Option<Value>,
    /// What one unit is called on receipts and invoices (`seat`).
    pub unit_label: Option<String>,
    pub url: Option<String>,
    pub metadata: Option<Value>,
    pub livemode: Option<bool>,
    pub created: Option<i64>,
    pub updated: Option<i64>,
}

impl Listed for Product {
    fn id(&self) -> &str {
        &self.id
    }
}

impl Product {
    /// Whether this is the object itself rather than Stripe's stub of a deleted one
    /// (`{"id","object","deleted":true}`, which a deletion event may carry): a row needs its
    /// name and creation time, which a stub lacks.
    pub fn is_whole(&self) -> bool {
        self.name.is_some() && self.created.is_some()
    }

    /// The row for this product as it was at `as_of` (ms); `deactivated_at` marks a deletion.
    pub fn row(&self, as_of: i64, deactivated_at: Option<i64>) -> ProductRow {
        ProductRow {
            id: self.id.clone(),
            active: self.active.unwrap_or(false) && deactivated_at.is_none(),
            name: self.name.clone().unwrap_or_default(),
            description: self.description.clone(),
            default_price_id: id_of(&self.default_price),
            images: json_text(&self.images),
            marketing_features: json_text(&self.marketing_features),
            unit_label: self.unit_label.clone(),
            url: self.url.clone(),
            metadata: metadata_text(&self.metadata),
            livemode: self.livemode.unwrap_or(false),
            stripe_created: ms(self.created.unwrap_or(0)),
            stripe_updated: self.updated.map(ms),
            as_of,
            deactivated_at,
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
pub struct Recurring {
    pub interval: Option<String>,
    pub interval_count: Option<i64>,
    /// `licensed` (billed by quantity) or `metered` (billed by the usage its meter reports).
    pub usage_type: Option<String>,
    /// The meter of a metered price.
    pub meter: Option<String>,
    pub trial_period_days: Option<i64>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct Price {
    pub id: String,
    pub product: Option<IdOrObject>,
    pub active: Option<bool>,
    pub currency: Option<String>,
    pub unit_amount: Option<i64>,
    /// The amount as a decimal string (at most 12 decimal places): a sub-cent amount has no
    /// `unit_amount`.
    pub unit_amount_decimal: Option<String>,
    /// `per_unit` or `tiered`.
    pub billing_scheme: Option<String>,
    /// `graduated` or `volume`, for a tiered price.
    pub tiers_mode: Option<String>,
    /// Sent only when asked for (`expand[]=tiers`); the last tier's `up_to` is null (infinity).
    pub tiers: Option<Value>,
    /// `{divide_by, round}`: the quantity is divided before pricing (packages).
    pub transform_quantity: Option<Value>,
    /// `{minimum, maximum, preset}`: the customer chooses the amount (pay what you want).
    pub custom_unit_amount: Option<Value>,
    /// The price in other currencies, by currency; sent only when asked for
    /// (`expand[]=currency_options`).
    pub currency_options: Option<Value>,
    /// `inclusive`, `exclusive` or `unspecified`.
    pub tax_behavior: Option<String>,
    #[serde(rename = "type")]
    pub price_type: Option<String>,
    pub recurring: Option<Recurring>,
    pub lookup_key: Option<String>,
    pub nickname: Option<String>,
    pub metadata: Option<Value>,
    pub livemode: Option<bool>,
    pub created: Option<i64>,
}

impl Listed for Price {
    fn id(&self) -> &str {
        &self.id
    }
}

impl Price {
    /// The fields Stripe sends only when asked for (`expand[]`). Absent from an answer or an
    /// event that did not expand them, they are stored as null and keep what a row holds.
    pub const INCLUDABLE: [&str; 2] = ["tiers", "currency_options"];

    /// Whether this is the object itself rather than Stripe's stub of a deleted one (see
    /// [`Product::is_whole`]): a row needs its product, currency, type and creation time.
    pub fn is_whole(&self) -> bool {
        self.product.is_some()
            && self.currency.is_some()
            && self.price_type.is_some()
            && self.created.is_some()
    }

    pub fn row(&self, as_of: i64, deactivated_at: Option<i64>) -> PriceRow {
        let recurring = self.recurring.as_ref();
        PriceRow {
            id: self.id.clone(),
            product_id: id_of(&self.product).unwrap_or_default(),
            active: self.active.unwrap_or(false) && deactivated_at.is_none(),
            currency: self.currency.clone().unwrap_or_default(),
            unit_amount: self.unit_amount,
            unit_amount_decimal: self.unit_amount_decimal.clone(),
            billing_scheme: self.billing_scheme.clone(),
            tiers_mode: self.tiers_mode.clone(),
            tiers: json_text(&self.tiers),
            transform_quantity: json_text(&self.transform_quantity),
            custom_unit_amount: json_text(&self.custom_unit_amount),
            currency_options: json_text(&self.currency_options),
            tax_behavior: self.tax_behavior.clone(),
            price_type: self.price_type.clone().unwrap_or_else(|| {
                if recurring.is_some() {
                    "recurring"
                } else {
                    "one_time"
                }
                .to_owned()
            }),
            recurring_interval: recurring.and_then(|r| r.interval.clone()),
            recurring_interval_count: recurring.and_then(|r| r.interval_count),
            recurring_usage_type: recurring.and_then(|r| r.usage_type.clone()),
            recurring_meter: recurring.and_then(|r| r.meter.clone()),
            recurring_trial_period_days: recurring.and_then(|r| r.trial_period_days),
            lookup_key: self.lookup_key.clone(),
            nickname: self.nickname.clone(),
            metadata: metadata_text(&self.metadata),
            livemode: self.livemode.unwrap_or(false),
            stripe_created: ms(self.created.unwrap_or(0)),
            as_of,
            deactivated_at,
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
pub struct CustomerDetails {
    pub email: Option<String>,
    pub name: Option<String>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct CheckoutSession {
    pub id: String,
    pub customer: Option<IdOrObject>,
    pub customer_email: Option<String>,
    pub customer_details: Option<CustomerDetails>,
    pub client_reference_id: Option<String>,
    pub mode: Option<String>,
    pub status: Option<String>,
    pub payment_status: Option<String>,
    pub subscription: Option<IdOrObject>,
    pub payment_intent: Option<IdOrObject>,
    pub amount_total: Option<i64>,
    pub currency: Option<String>,
    pub metadata: Option<Value>,
    pub livemode: Option<bool>,
    pub created: Option<i64>,
}

impl CheckoutSession {
    pub fn rows(&self, as_of: i64) -> (CheckoutSessionRow, Option<CustomerRow>) {
        let details = self.customer_details.as_ref();
        let email = details
            .and_then(|d| d.email.clone())
            .or_else(|| self.customer_email.clone());
        let livemode = self.livemode.unwrap_or(false);
        let customer = id_of(&self.customer).map(|id| CustomerRow {
            id,
            email: email.clone(),
            name: details.and_then(|d| d.name.clone()),
            livemode,
            as_of,
        });
        let session = CheckoutSessionRow {
            id: self.id.clone(),
            customer_id: id_of(&self.customer),
            customer_email: email,
            client_reference_id: self.client_reference_id.clone(),
            mode: self.mode.clone(),
            status: self.status.clone(),
            payment_status: self.payment_status.clone(),
            subscription_id: id_of(&self.subscription),
            payment_intent_id: id_of(&self.payment_intent),
            amount_total: self.amount_total,
            currency: self.currency.clone(),
            metadata: metadata_text(&self.metadata),
            livemode,
            stripe_created: ms(self.created.unwrap_or(0)),
            as_of,
        };
        (session, customer)
    }
}

#[derive(Clone, Debug, Deserialize)]
pub struct PriceRef {
    pub id: String,
    pub product: Option<IdOrObject>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct SubscriptionItem {
    pub price: Option<PriceRef>,
    pub quantity: Option<i64>,
    /// Where API versions from 2025-03-31 put the period end.
    pub current_period_end: Option<i64>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct SubscriptionItems {
    #[serde(default)]
    pub data: Vec<SubscriptionItem>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct Subscription {
    pub id: String,
    pub customer: Option<IdOrObject>,
    pub status: Option<String>,
    pub items: Option<SubscriptionItems>,
    /// Where API versions before 2025-03-31 put the period end.
    pub current_period_end: Option<i64>,
    pub cancel_at_period_end: Option<bool>,
    pub canceled_at: Option<i64>,
    pub ended_at: Option<i64>,
    pub metadata: Option<Value>,
    pub livemode: Option<bool>,
    pub created: Option<i64>,
}

impl Subscription {
    pub fn row(&self, as_of: i64) -> SubscriptionRow {
        let first = self.items.as_ref().and_then(|items| items.data.first());
        let price = first.and_then(|item| item.price.as_ref());
        SubscriptionRow {
            id: self.id.clone(),
            customer_id: id_of(&self.customer).unwrap_or_default(),
            status: self.status.clone().unwrap_or_default(),
            price_id: price.map(|p| p.id.clone()),
            product_id: price.and_then(|p| id_of(&p.product)),
            quantity: first.and_then(|item| item.quantity),
            current_period_end: self
                .current_period_end
                .or_else(|| first.and_then(|item| item.current_period_end))
                .map(ms),
            cancel_at_period_end: self.cancel_at_period_end.unwrap_or(false),
            canceled_at: self.canceled_at.map(ms),
            ended_at: self.ended_at.map(ms),
            metadata: metadata_text(&self.metadata),
            livemode: self.livemode.unwrap_or(false),
            stripe_created: ms(self.created.unwrap_or(0)),
            as_of,
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
pub struct SubscriptionDetails {
    pub subscription: Option<IdOrObject>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct InvoiceParent {
    pub subscription_details: Option<SubscriptionDetails>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct StatusTransitions {
    pub paid_at: Option<i64>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct Invoice {
    pub id: String,
    pub customer: Option<IdOrObject>,
    /// Before API version 2025-03-31.
    pub subscription: Option<IdOrObject>,
    /// From API version 2025-03-31.
    pub parent: Option<InvoiceParent>,
    pub status: Option<String>,
    pub amount_due: Option<i64>,
    pub amount_paid: Option<i64>,
    pub currency: Option<String>,
    pub attempt_count: Option<i64>,
    pub status_transitions: Option<StatusTransitions>,
    pub livemode: Option<bool>,
    pub created: Option<i64>,
}

/// What an invoice event says happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InvoiceOutcome {
    Paid,
    PaymentFailed,
}

impl Invoice {
    pub fn row(&self, as_of: i64, outcome: InvoiceOutcome) -> InvoiceRow {
        let subscription = id_of(&self.subscription).or_else(|| {
            self.parent
                .as_ref()
                .and_then(|p| p.subscription_details.as_ref())
                .and_then(|d| id_of(&d.subscription))
        });
        let paid_at = self
            .status_transitions
            .as_ref()
            .and_then(|t| t.paid_at)
            .map(ms)
            .unwrap_or(as_of);
        InvoiceRow {
            id: self.id.clone(),
            customer_id: id_of(&self.customer),
            subscription_id: subscription,
            status: self.status.clone(),
            amount_due: self.amount_due,
            amount_paid: self.amount_paid,
            currency: self.currency.clone(),
            paid_at: (outcome == InvoiceOutcome::Paid).then_some(paid_at),
            payment_failed_at: (outcome == InvoiceOutcome::PaymentFailed).then_some(as_of),
            attempt_count: self.attempt_count,
            livemode: self.livemode.unwrap_or(false),
            stripe_created: ms(self.created.unwrap_or(0)),
            as_of,
        }
    }
}

#[derive(Clone, Debug, Deserialize, utoipa::ToSchema)]
#[schema(as = StripeEventData)]
pub struct EventData {
    /// The Stripe object the event is about; read once its type is known.
    #[schema(value_type = Object)]
    pub object: Value,
}

/// A webhook event: the envelope, with `data.object` kept raw until its type is known.
#[derive(Clone, Debug, Deserialize, utoipa::ToSchema)]
#[schema(as = StripeEvent)]
pub struct Event {
    #[schema(min_length = 1)]
    pub id: String,
    #[serde(rename = "type")]
    #[schema(min_length = 1)]
    pub event_type: String,
    pub created: i64,
    pub livemode: Option<bool>,
    /// The connected account the event happened in (a Connect event); `null` or absent for the
    /// platform's own. edgegate records such an event and applies nothing.
    pub account: Option<String>,
    pub data: EventData,
}

impl Listed for Event {
    fn id(&self) -> &str {
        &self.id
    }
}

/// The `object` of a "thin" event.
pub const THIN_EVENT_OBJECT: &str = "v2.core.event";

/// A "thin" event, as an event destination whose payload style is *thin* sends it: no `data`,
/// only a `related_object` to fetch, and `created` as RFC 3339 text. edgegate records it and
/// applies nothing: it acts on the snapshot events (payload style *snapshot*, or the event list
/// reconciliation reads).
#[derive(Clone, Debug, Deserialize, utoipa::ToSchema)]
#[schema(as = StripeThinEvent)]
pub struct ThinEvent {
    #[schema(min_length = 1)]
    pub id: String,
    /// `v2.core.event`.
    #[schema(pattern = r"^v2\.core\.event$")]
    pub object: String,
    #[serde(rename = "type")]
    #[schema(min_length = 1)]
    pub event_type: String,
    /// RFC 3339, such as `2026-12-01T06:00:00.123Z`.
    #[schema(format = DateTime)]
    pub created: String,
    pub livemode: Option<bool>,
    /// The connected account the event happened in, when it did.
    pub context: Option<String>,
    /// What the event is about: its `id`, `type` and `url`.
    #[schema(value_type = Option<Object>)]
    pub related_object: Option<serde_json::Map<String, Value>>,
}

/// Whether `json` is a thin event (its `object` is [`THIN_EVENT_OBJECT`]); nothing else of it
/// is read.
pub fn is_thin_event(json: &[u8]) -> bool {
    #[derive(Deserialize)]
    struct Head<'a> {
        #[serde(borrow)]
        object: Option<Cow<'a, str>>,
    }
    serde_json::from_slice::<Head>(json)
        .is_ok_and(|head| head.object.as_deref() == Some(THIN_EVENT_OBJECT))
}

/// An RFC 3339 time (`2026-12-01T06:00:00.123Z`, `…+02:00`) in unix milliseconds; digits past
/// the millisecond are dropped. `None` for anything else, or a date that does not exist.
pub fn rfc3339_ms(text: &str) -> Option<i64> {
    let b = text.as_bytes();
    let number = |from: usize, to: usize| -> Option<i64> {
        let part = b.get(from..to)?;
        part.iter()
            .all(u8::is_ascii_digit)
            .then(|| part.iter().fold(0, |n, d| n * 10 + i64::from(d - b'0')))
    };
    let separators = [(4, b'-'), (7, b'-'), (13, b':'), (16, b':')];
    if separators.iter().any(|&(at, c)| b.get(at) != Some(&c))
        || !matches!(b.get(10), Some(b'T' | b't'))
    {
        return None;
    }
    let (year, month, day) = (number(0, 4)?, number(5, 7)?, number(8, 10)?);
    let (hour, minute, second) = (number(11, 13)?, number(14, 16)?, number(17, 19)?);
    // 60: a leap second.
    if !(1..=12).contains(&month)
        || !(1..=days_in_month(year, month)).contains(&day)
        || hour > 23
        || minute > 59
        || second > 60
    {
        return None;
    }
    let mut at = 19;
    let mut millis = 0;
    if b.get(at) == Some(&b'.') {
        let digits = b[at + 1..]
            .iter()
            .take_while(|c| c.is_ascii_digit())
            .count();
        if digits == 0 {
            return None;
        }
        let kept = digits.min(3);
        millis = number(at + 1, at + 1 + kept)? * 10_i64.pow(3 - kept as u32);
        at += 1 + digits;
    }
    let offset = match &b[at..] {
        [b'Z' | b'z'] => 0,
        [sign @ (b'+' | b'-'), _, _, b':', _, _] => {
            let (hours, minutes) = (number(at + 1, at + 3)?, number(at + 4, at + 6)?);
            if hours > 23 || minutes > 59 {
                return None;
            }
            let seconds = hours * 3600 + minutes * 60;
            if *sign == b'-' { -seconds } else { seconds }
        }
        _ => return None,
    };
    let seconds =
        days_from_civil(year, month, day) * 86_400 + hour * 3600 + minute * 60 + second - offset;
    Some(seconds * 1000 + millis)
}

fn days_in_month(year: i64, month: i64) -> i64 {
    let leap = year % 4 == 0 && (year % 100 != 0 || year % 400 == 0);
    match month {
        2 if leap => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's `days_from_civil`).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let day_of_year = (153 * ((month + 9) % 12) + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn reads_any_api_version_leniently() {
        // Expanded references, nulls, missing and unknown fields.
        let product: Product = serde_json::from_value(json!({
            "id": "prod_1", "name": null, "default_price": {"id": "price_9", "object": "price"},
            "created": 2, "brand_new_field": {"x": 1}
        }))
        .unwrap();
        let row = product.row(5, None);
        assert_eq!(row.default_price_id.as_deref(), Some("price_9"));
        assert_eq!(
            (row.name.as_str(), row.active, row.stripe_created),
            ("", false, 2000)
        );
        assert_eq!(row.metadata, "{}");

        // Period end on the item (2025-03-31 and later) or on the subscription (before).
        let new_style: Subscription = serde_json::from_value(json!({
            "id": "sub_1", "customer": {"id": "cus_1"}, "status": "active",
            "items": {"data": [{"price": {"id": "price_1", "product": "prod_1"},
                                "quantity": 2, "current_period_end": 100}]}
        }))
        .unwrap();
        let row = new_style.row(1);
        assert_eq!(row.customer_id, "cus_1");
        assert_eq!(row.product_id.as_deref(), Some("prod_1"));
        assert_eq!(row.current_period_end, Some(100_000));
        let old_style: Subscription =
            serde_json::from_value(json!({"id": "sub_2", "current_period_end": 7})).unwrap();
        assert_eq!(old_style.row(1).current_period_end, Some(7000));

        // The invoice's subscription moved under `parent` in 2025-03-31.
        let invoice: Invoice = serde_json::from_value(json!({
            "id": "in_1",
            "parent": {"subscription_details": {"subscription": "sub_3"}},
            "status_transitions": {"paid_at": 9}
        }))
        .unwrap();
        let row = invoice.row(1, InvoiceOutcome::Paid);
        assert_eq!(row.subscription_id.as_deref(), Some("sub_3"));
        assert_eq!((row.paid_at, row.payment_failed_at), (Some(9000), None));
    }

    #[test]
    fn price_shapes_are_kept_as_json_text_and_null_or_absent_as_none() {
        let tiered: Price = serde_json::from_value(json!({
            "id": "price_1", "billing_scheme": "tiered", "tiers_mode": "volume",
            "unit_amount": null, "unit_amount_decimal": null, "transform_quantity": null,
            "tiers": [{"up_to": 5, "unit_amount": 10}, {"up_to": null, "unit_amount": 8}],
            "custom_unit_amount": {"preset": 1, "minimum": null}
        }))
        .unwrap();
        let row = tiered.row(1, None);
        assert_eq!(
            row.tiers.as_deref(),
            Some(r#"[{"unit_amount":10,"up_to":5},{"unit_amount":8,"up_to":null}]"#)
        );
        assert_eq!(
            row.custom_unit_amount.as_deref(),
            Some(r#"{"minimum":null,"preset":1}"#)
        );
        assert_eq!((row.transform_quantity, row.currency_options), (None, None));
        assert_eq!(row.unit_amount_decimal, None);
    }

    #[test]
    fn u0000_escapes_become_the_replacement_character_and_nothing_else_changes() {
        let plain = br#"{"name":"a\u0001b"}"#;
        assert!(matches!(without_nul(plain), Cow::Borrowed(_)));
        let json = br#"{"name":"a\u0000b","k\u0000":"\\u0000","x":"\\\u0000"}"#;
        let replaced = without_nul(json);
        assert_eq!(replaced.len(), json.len());
        let value: Value = serde_json::from_slice(&replaced).unwrap();
        assert_eq!(
            value,
            json!({"name": "a\u{FFFD}b", "k\u{FFFD}": "\\u0000", "x": "\\\u{FFFD}"})
        );
    }

    #[test]
    fn rfc3339_times_are_read_to_the_millisecond() {
        for (text, ms) in [
            ("1970-01-01T00:00:00Z", Some(0)),
            ("2026-12-01T06:00:00.123Z", Some(1_796_104_800_123)),
            ("2026-12-01T06:00:00.5z", Some(1_796_104_800_500)),
            ("2026-12-01T06:00:00.123456789Z", Some(1_796_104_800_123)),
            ("2026-12-01t08:00:00+02:00", Some(1_796_104_800_000)),
            ("2026-12-01T05:30:00-00:30", Some(1_796_104_800_000)),
            ("2024-02-29T00:00:00Z", Some(1_709_164_800_000)),
            ("1969-12-31T23:59:59Z", Some(-1000)),
            ("2023-02-29T00:00:00Z", None),
            ("2026-13-01T00:00:00Z", None),
            ("2026-12-01T24:00:00Z", None),
            ("2026-12-01T06:00:00", None),
            ("2026-12-01T06:00:00.Z", None),
            ("2026-12-01 06:00:00Z", None),
            ("2026-12-01T06:00:00+0200", None),
            ("yesterday", None),
            ("", None),
            ("+002026-12-01T06:00:00Z", None),
        ] {
            assert_eq!(rfc3339_ms(text), ms, "{text}");
        }
    }

    #[test]
    fn only_a_v2_core_event_object_is_thin() {
        assert!(is_thin_event(br#"{"id":"evt_1","object":"v2.core.event"}"#));
        assert!(is_thin_event(br#"{"object":"v2.core.\u0065vent"}"#));
        for not_thin in [
            &br#"{"id":"evt_1","object":"event","data":{"object":{"object":"v2.core.event"}}}"#[..],
            br#"{"object":7}"#,
            br#"{"object":"v2.core.event"} trailing"#,
            b"not json",
        ] {
            assert!(
                !is_thin_event(not_thin),
                "{}",
                String::from_utf8_lossy(not_thin)
            );
        }
    }

    #[test]
    fn hostile_times_do_not_overflow() {
        assert_eq!(ms(i64::MAX), i64::MAX);
        assert_eq!(ms(i64::MIN), i64::MIN);
    }
}
