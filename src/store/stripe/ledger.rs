//! The webhook ledger: each event recorded once, with its effect (catalogue row, customer,
//! checkout session, subscription, invoice) in the same transaction.

use anyhow::Context as _;
use sqlx::{AssertSqlSafe, Transaction};

use super::catalogue::{
    CatalogueRow, Deletion, PriceRow, ProductRow, Tombstone, deletion_mark_sql, tombstone_sql,
    upsert_sql,
};
use crate::store::Store;
use crate::store::engine::{BindExt as _, Engine, Execute as _};

#[derive(Clone, Debug, PartialEq)]
pub struct CustomerRow {
    pub id: String,
    pub email: Option<String>,
    pub name: Option<String>,
    pub livemode: bool,
    pub as_of: i64,
}

#[derive(Clone, Debug, PartialEq)]
pub struct CheckoutSessionRow {
    pub id: String,
    pub customer_id: Option<String>,
    pub customer_email: Option<String>,
    pub client_reference_id: Option<String>,
    pub mode: Option<String>,
    pub status: Option<String>,
    pub payment_status: Option<String>,
    pub subscription_id: Option<String>,
    pub payment_intent_id: Option<String>,
    pub amount_total: Option<i64>,
    pub currency: Option<String>,
    pub metadata: String,
    pub livemode: bool,
    pub stripe_created: i64,
    pub as_of: i64,
}

#[derive(Clone, Debug, PartialEq)]
pub struct SubscriptionRow {
    pub id: String,
    pub customer_id: String,
    pub status: String,
    pub price_id: Option<String>,
    pub product_id: Option<String>,
    pub quantity: Option<i64>,
    pub current_period_end: Option<i64>,
    pub cancel_at_period_end: bool,
    pub canceled_at: Option<i64>,
    pub ended_at: Option<i64>,
    pub metadata: String,
    pub livemode: bool,
    pub stripe_created: i64,
    pub as_of: i64,
}

#[derive(Clone, Debug, PartialEq)]
pub struct InvoiceRow {
    pub id: String,
    pub customer_id: Option<String>,
    pub subscription_id: Option<String>,
    pub status: Option<String>,
    pub amount_due: Option<i64>,
    pub amount_paid: Option<i64>,
    pub currency: Option<String>,
    /// Set by `invoice.paid`; kept when a later event does not say.
    pub paid_at: Option<i64>,
    /// Set by `invoice.payment_failed`; kept when a later event does not say.
    pub payment_failed_at: Option<i64>,
    pub attempt_count: Option<i64>,
    pub livemode: bool,
    pub stripe_created: i64,
    pub as_of: i64,
}

/// What one webhook event changes.
#[derive(Clone, Debug, PartialEq)]
pub enum StripeEffect {
    /// Recorded and acknowledged only.
    None,
    Product(ProductRow),
    Price(PriceRow),
    /// A product or price deleted, its event carrying Stripe's stub rather than the object.
    Deletion(Deletion),
    CheckoutSession {
        session: CheckoutSessionRow,
        customer: Option<CustomerRow>,
    },
    Subscription(SubscriptionRow),
    Invoice(InvoiceRow),
}

/// The ledger row of one webhook event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LedgerEvent {
    pub id: String,
    pub event_type: String,
    pub created_ms: i64,
    pub livemode: bool,
    pub received_at: i64,
}

/// How a webhook event was taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventReceipt {
    Applied,
    /// The ledger already had this id: nothing was changed.
    Duplicate,
    /// The row was last written by an event of the same `created` second, so this event alone
    /// cannot say which state is newer. Nothing was stored (no ledger row either): the caller
    /// fetches the object's current state and applies that with `SameSecond::Overwrite`.
    SameSecond,
}

/// What to do when the row an event writes was last written by an event of the same second.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SameSecond {
    /// Store nothing and answer `EventReceipt::SameSecond`.
    Detect,
    /// Write: the effect holds the object's current state, fetched from Stripe.
    Overwrite,
}

const CUSTOMER_UPSERT: &str = "INSERT INTO stripe_customers (id, email, name, livemode, \
    last_event_created, updated_at) VALUES ($1, $2, $3, $4, $5, $6) \
    ON CONFLICT (id) DO UPDATE SET email = COALESCE(excluded.email, stripe_customers.email), \
    name = COALESCE(excluded.name, stripe_customers.name), livemode = excluded.livemode, \
    last_event_created = excluded.last_event_created, updated_at = excluded.updated_at \
    WHERE stripe_customers.last_event_created IS NULL \
    OR stripe_customers.last_event_created <= excluded.last_event_created";
const CHECKOUT_UPSERT: &str = "INSERT INTO stripe_checkout_sessions (id, customer_id, \
    customer_email, client_reference_id, mode, status, payment_status, subscription_id, \
    payment_intent_id, amount_total, currency, metadata, livemode, stripe_created, \
    last_event_created, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, \
    $13, $14, $15, $16) ON CONFLICT (id) DO UPDATE SET customer_id = excluded.customer_id, \
    customer_email = excluded.customer_email, \
    client_reference_id = excluded.client_reference_id, mode = excluded.mode, \
    status = excluded.status, payment_status = excluded.payment_status, \
    subscription_id = excluded.subscription_id, \
    payment_intent_id = excluded.payment_intent_id, amount_total = excluded.amount_total, \
    currency = excluded.currency, metadata = excluded.metadata, livemode = excluded.livemode, \
    stripe_created = excluded.stripe_created, last_event_created = excluded.last_event_created, \
    updated_at = excluded.updated_at \
    WHERE stripe_checkout_sessions.last_event_created IS NULL \
    OR stripe_checkout_sessions.last_event_created <= excluded.last_event_created";
const SUBSCRIPTION_UPSERT: &str = "INSERT INTO stripe_subscriptions (id, customer_id, status, \
    price_id, product_id, quantity, current_period_end, cancel_at_period_end, canceled_at, \
    ended_at, metadata, livemode, stripe_created, last_event_created, updated_at) \
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15) \
    ON CONFLICT (id) DO UPDATE SET customer_id = excluded.customer_id, \
    status = excluded.status, price_id = excluded.price_id, product_id = excluded.product_id, \
    quantity = excluded.quantity, current_period_end = excluded.current_period_end, \
    cancel_at_period_end = excluded.cancel_at_period_end, canceled_at = excluded.canceled_at, \
    ended_at = excluded.ended_at, metadata = excluded.metadata, livemode = excluded.livemode, \
    stripe_created = excluded.stripe_created, last_event_created = excluded.last_event_created, \
    updated_at = excluded.updated_at \
    WHERE stripe_subscriptions.last_event_created IS NULL \
    OR stripe_subscriptions.last_event_created <= excluded.last_event_created";
const INVOICE_UPSERT: &str = "INSERT INTO stripe_invoices (id, customer_id, subscription_id, \
    status, amount_due, amount_paid, currency, paid_at, payment_failed_at, attempt_count, \
    livemode, stripe_created, last_event_created, updated_at) \
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14) \
    ON CONFLICT (id) DO UPDATE SET customer_id = excluded.customer_id, \
    subscription_id = excluded.subscription_id, status = excluded.status, \
    amount_due = excluded.amount_due, amount_paid = excluded.amount_paid, \
    currency = excluded.currency, \
    paid_at = COALESCE(excluded.paid_at, stripe_invoices.paid_at), \
    payment_failed_at = COALESCE(excluded.payment_failed_at, stripe_invoices.payment_failed_at), \
    attempt_count = excluded.attempt_count, livemode = excluded.livemode, \
    stripe_created = excluded.stripe_created, last_event_created = excluded.last_event_created, \
    updated_at = excluded.updated_at \
    WHERE stripe_invoices.last_event_created IS NULL \
    OR stripe_invoices.last_event_created <= excluded.last_event_created";

/// What an invoice event older than its row still brings: the time its payment was made or
/// failed, which only that event carries. `paid_at` is kept when set (one payment per invoice);
/// `payment_failed_at` is the latest failure. Only where the row is strictly newer: a row of the
/// same second takes the event whole (or, with `strict`, is settled by asking Stripe). Written,
/// with `updated_at`, only when it changes one of the two.
const INVOICE_MERGE: &str = "UPDATE stripe_invoices SET \
    paid_at = COALESCE(stripe_invoices.paid_at, $2), \
    payment_failed_at = CASE WHEN stripe_invoices.payment_failed_at IS NULL \
    OR stripe_invoices.payment_failed_at < $3 THEN $3 \
    ELSE stripe_invoices.payment_failed_at END, updated_at = $5 \
    WHERE id = $1 AND stripe_invoices.last_event_created > $4 \
    AND ((stripe_invoices.paid_at IS NULL AND $2 IS NOT NULL) OR ($3 IS NOT NULL \
    AND (stripe_invoices.payment_failed_at IS NULL OR stripe_invoices.payment_failed_at < $3)))";

/// The main row an effect wrote: its table, id and `as_of`, and how many rows the upsert wrote
/// (0 when the stored state was newer, or as new under `strict`).
type Written<'e> = (&'static str, &'e str, i64, u64);

/// Applies one webhook effect inside the ledger's transaction. With `strict` a row last written
/// by an event of the same `created` is left alone (see `SameSecond`). `None` for no effect.
async fn apply_effect<'e, DB: Engine>(
    tx: &mut Transaction<'_, DB>,
    effect: &'e StripeEffect,
    now: i64,
    strict: bool,
) -> Result<Option<Written<'e>>, sqlx::Error> {
    let upsert = |sql: String| sqlx::query::<DB>(AssertSqlSafe(conflict_rule(sql, strict)));
    let written = match effect {
        StripeEffect::None => return Ok(None),
        StripeEffect::Product(row) => catalogue_upsert(tx, row, now, strict).await?,
        StripeEffect::Price(row) => catalogue_upsert(tx, row, now, strict).await?,
        StripeEffect::Deletion(deletion) => {
            let table = deletion.object.table();
            let mut written = mark_deleted(tx, deletion, strict).await?;
            if written == 0 {
                // No row, or a newer one. The tombstone is written only where no row is; a row
                // another transaction wrote meanwhile (committed by now: the insert waited on
                // it) is marked instead, if not newer.
                written = match &deletion.tombstone {
                    Tombstone::Product(row) => tombstone(tx, row.as_ref(), now).await?,
                    Tombstone::Price(row) => tombstone(tx, row.as_ref(), now).await?,
                };
                if written == 0 {
                    written = mark_deleted(tx, deletion, strict).await?;
                }
            }
            (table, deletion.id.as_str(), deletion.as_of, written)
        }
        StripeEffect::CheckoutSession { session, customer } => {
            if let Some(customer) = customer {
                let query = sqlx::query::<DB>(CUSTOMER_UPSERT)
                    .bind_value(&customer.id)
                    .bind_value(&customer.email)
                    .bind_value(&customer.name)
                    .bind_value(customer.livemode)
                    .bind_value(customer.as_of)
                    .bind_value(now);
                query.execute(tx.executor()).await?;
            }
            let query = upsert(CHECKOUT_UPSERT.to_owned())
                .bind_value(&session.id)
                .bind_value(&session.customer_id)
                .bind_value(&session.customer_email)
                .bind_value(&session.client_reference_id)
                .bind_value(&session.mode)
                .bind_value(&session.status)
                .bind_value(&session.payment_status)
                .bind_value(&session.subscription_id)
                .bind_value(&session.payment_intent_id)
                .bind_value(session.amount_total)
                .bind_value(&session.currency)
                .bind_value(&session.metadata)
                .bind_value(session.livemode)
                .bind_value(session.stripe_created)
                .bind_value(session.as_of)
                .bind_value(now);
            let done = query.execute(tx.executor()).await?;
            let table = "stripe_checkout_sessions";
            (
                table,
                session.id.as_str(),
                session.as_of,
                DB::rows_affected(&done),
            )
        }
        StripeEffect::Subscription(row) => {
            let query = upsert(SUBSCRIPTION_UPSERT.to_owned())
                .bind_value(&row.id)
                .bind_value(&row.customer_id)
                .bind_value(&row.status)
                .bind_value(&row.price_id)
                .bind_value(&row.product_id)
                .bind_value(row.quantity)
                .bind_value(row.current_period_end)
                .bind_value(row.cancel_at_period_end)
                .bind_value(row.canceled_at)
                .bind_value(row.ended_at)
                .bind_value(&row.metadata)
                .bind_value(row.livemode)
                .bind_value(row.stripe_created)
                .bind_value(row.as_of)
                .bind_value(now);
            let done = query.execute(tx.executor()).await?;
            let table = "stripe_subscriptions";
            (table, row.id.as_str(), row.as_of, DB::rows_affected(&done))
        }
        StripeEffect::Invoice(row) => {
            let query = upsert(INVOICE_UPSERT.to_owned())
                .bind_value(&row.id)
                .bind_value(&row.customer_id)
                .bind_value(&row.subscription_id)
                .bind_value(&row.status)
                .bind_value(row.amount_due)
                .bind_value(row.amount_paid)
                .bind_value(&row.currency)
                .bind_value(row.paid_at)
                .bind_value(row.payment_failed_at)
                .bind_value(row.attempt_count)
                .bind_value(row.livemode)
                .bind_value(row.stripe_created)
                .bind_value(row.as_of)
                .bind_value(now);
            let done = query.execute(tx.executor()).await?;
            let written = DB::rows_affected(&done);
            if written == 0 && (row.paid_at.is_some() || row.payment_failed_at.is_some()) {
                // Refused as older: its payment's time is still news. Not counted as written, so
                // a refusal still reads as one.
                sqlx::query::<DB>(INVOICE_MERGE)
                    .bind_value(&row.id)
                    .bind_value(row.paid_at)
                    .bind_value(row.payment_failed_at)
                    .bind_value(row.as_of)
                    .bind_value(now)
                    .execute(tx.executor())
                    .await?;
            }
            ("stripe_invoices", row.id.as_str(), row.as_of, written)
        }
    };
    Ok(Some(written))
}

/// A stub deletion's mark on its row, if there is one and it is not newer: how many rows.
async fn mark_deleted<DB: Engine>(
    tx: &mut Transaction<'_, DB>,
    deletion: &Deletion,
    strict: bool,
) -> Result<u64, sqlx::Error> {
    let mark = deletion_mark_sql(deletion.object.table(), strict);
    let done = sqlx::query::<DB>(AssertSqlSafe(mark))
        .bind_value(&deletion.id)
        .bind_value(deletion.deactivated_at)
        .bind_value(deletion.as_of)
        .execute(tx.executor())
        .await?;
    Ok(DB::rows_affected(&done))
}

/// A stub deletion's [`Tombstone`], where no row is: how many rows it wrote.
async fn tombstone<DB: Engine, R: CatalogueRow>(
    tx: &mut Transaction<'_, DB>,
    row: &R,
    now: i64,
) -> Result<u64, sqlx::Error> {
    let query = row.bind(sqlx::query::<DB>(AssertSqlSafe(tombstone_sql::<R>())), now);
    Ok(DB::rows_affected(&query.execute(tx.executor()).await?))
}

/// A product or price from a webhook: the sync's upsert for one row, without its
/// changed-content filter (the event's state is written even when equal).
async fn catalogue_upsert<'e, DB: Engine, R: CatalogueRow>(
    tx: &mut Transaction<'_, DB>,
    row: &'e R,
    now: i64,
    strict: bool,
) -> Result<Written<'e>, sqlx::Error> {
    let sql = conflict_rule(upsert_sql(R::COLUMNS, R::CONFLICT, "", 1), strict);
    let query = row.bind(sqlx::query::<DB>(AssertSqlSafe(sql)), now);
    let done = query.execute(tx.executor()).await?;
    Ok((R::TABLE, row.id(), row.as_of(), DB::rows_affected(&done)))
}

/// Every upsert above lets state of the same `as_of` overwrite (`<=`); `strict` turns that into
/// strictly newer only (`<`), so a same-second write is refused and can be detected.
fn conflict_rule(sql: String, strict: bool) -> String {
    if strict {
        sql.replace(
            "<= excluded.last_event_created",
            "< excluded.last_event_created",
        )
    } else {
        sql
    }
}

impl Store {
    /// Records a webhook event in the ledger and applies its effect, in one transaction. The
    /// ledger row goes first: a concurrent delivery of the same id waits on its unique key (or
    /// on the unapplied row it marks applied) and then finds it, so an event is applied once
    /// however many instances receive it. Any error rolls the whole transaction back, so
    /// Stripe's retry finds no ledger row (or the unapplied one it found).
    ///
    /// An event strictly older than the row changes nothing but is recorded; one of the same
    /// second as the row is handled as `same_second` says.
    pub async fn apply_stripe_event(
        &self,
        event: &LedgerEvent,
        effect: &StripeEffect,
        same_second: SameSecond,
    ) -> anyhow::Result<EventReceipt> {
        // An event stored as not applied (a release that did not act on its type) is taken as
        // new by one that does: the row is marked applied and the effect applied, instead of
        // the event counting as a duplicate for ever. Applied once it stays applied.
        let ledger = "INSERT INTO stripe_events (id, event_type, created, livemode, received_at, \
                      applied) VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (id) DO UPDATE SET \
                      applied = excluded.applied \
                      WHERE NOT stripe_events.applied AND excluded.applied";
        let applied = !matches!(effect, StripeEffect::None);
        let now = event.received_at;
        let receipt: Result<EventReceipt, sqlx::Error> = with_pool!(self, |pool| {
            let mut tx = pool.begin().await?;
            let inserted = sqlx::query(ledger)
                .bind(&event.id)
                .bind(&event.event_type)
                .bind(event.created_ms)
                .bind(event.livemode)
                .bind(now)
                .bind(applied)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            if inserted == 0 {
                tx.rollback().await?;
                Ok(EventReceipt::Duplicate)
            } else {
                let strict = same_second == SameSecond::Detect;
                let mut tie = false;
                if let Some((table, id, as_of, 0)) =
                    apply_effect(&mut tx, effect, now, strict).await?
                    && strict
                {
                    // Refused: strictly newer state, or a tie (same `as_of`) to settle.
                    let sql = format!("SELECT last_event_created FROM {table} WHERE id = $1");
                    let last: Option<Option<i64>> = sqlx::query_scalar(AssertSqlSafe(sql))
                        .bind(id)
                        .fetch_optional(&mut *tx)
                        .await?;
                    tie = last.flatten() == Some(as_of);
                }
                if tie {
                    tx.rollback().await?;
                    Ok(EventReceipt::SameSecond)
                } else {
                    tx.commit().await?;
                    Ok(EventReceipt::Applied)
                }
            }
        });
        receipt.with_context(|| format!("applying Stripe event {}", event.id))
    }
}
