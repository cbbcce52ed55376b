//! Stripe storage: the catalogue (products, prices) written by the sync and by webhooks, the
//! webhook ledger with its effects in one transaction, sync runs, and the one-sync-at-a-time lock.

use std::time::Duration;

use anyhow::Context as _;
use sqlx::AssertSqlSafe;

use super::{Backend, Store};

/// A product as stored. `as_of` (ms) is when this state was true: the webhook event's `created`,
/// or the time the sync fetched it; older state never overwrites newer.
#[derive(Clone, Debug, PartialEq)]
pub struct ProductRow {
    pub id: String,
    pub active: bool,
    pub name: String,
    pub description: Option<String>,
    pub default_price_id: Option<String>,
    pub metadata: String,
    pub livemode: bool,
    pub stripe_created: i64,
    pub stripe_updated: Option<i64>,
    pub as_of: i64,
    pub deactivated_at: Option<i64>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct PriceRow {
    pub id: String,
    pub product_id: String,
    pub active: bool,
    pub currency: String,
    pub unit_amount: Option<i64>,
    pub price_type: String,
    pub recurring_interval: Option<String>,
    pub recurring_interval_count: Option<i64>,
    pub lookup_key: Option<String>,
    pub nickname: Option<String>,
    pub metadata: String,
    pub livemode: bool,
    pub stripe_created: i64,
    pub as_of: i64,
    pub deactivated_at: Option<i64>,
}

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

/// Counts of one sync run, as stored in `sync_runs`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct SyncCounts {
    pub products_seen: i64,
    pub products_upserted: i64,
    pub products_deactivated: i64,
    pub prices_seen: i64,
    pub prices_upserted: i64,
    pub prices_deactivated: i64,
}

/// Counts of one reconciliation, as answered and stored in `reconcile_runs`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
pub struct ReconcileCounts {
    /// Events Stripe listed.
    pub seen: i64,
    /// New to the ledger, and their effect written.
    pub applied: i64,
    /// Already in the ledger (delivered by webhook or an earlier run): nothing done.
    pub already_applied: i64,
    /// New to the ledger but of a type edgegate does not act on: recorded, nothing else.
    pub ignored: i64,
}

/// One row of `sync_runs`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SyncRun {
    pub id: String,
    pub started_at: i64,
    pub finished_at: Option<i64>,
    pub outcome: String,
    pub counts: SyncCounts,
    pub error: Option<String>,
}

/// A job that runs one at a time across every instance.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Job {
    CatalogueSync,
    Reconcile,
}

impl Job {
    /// PostgreSQL: the advisory lock class (one no other lock uses); the key is the schema, since
    /// advisory locks are per database while the synced tables are per schema.
    fn advisory_class(self) -> i32 {
        match self {
            Self::CatalogueSync => 1_701_079_920,
            Self::Reconcile => 1_701_079_921,
        }
    }

    /// SQLite: the `locks` row name.
    fn lock_name(self) -> &'static str {
        match self {
            Self::CatalogueSync => "stripe_sync",
            Self::Reconcile => "stripe_reconcile",
        }
    }
}

const JOB_LOCK_TRY: &str = "SELECT pg_try_advisory_lock($1, hashtext(current_schema()))";
const JOB_LOCK_RELEASE: &str = "SELECT pg_advisory_unlock($1, hashtext(current_schema()))";

/// The one-job-at-a-time lock (catalogue sync or reconciliation); `release` it when done.
/// Dropped without release, a PostgreSQL lock goes with its connection (closed, not returned to
/// the pool) and a SQLite one expires.
pub struct SyncLock {
    job: Job,
    inner: LockInner,
}

enum LockInner {
    /// The session that holds the advisory lock, taken out of the pool for the lock's lifetime.
    Postgres(sqlx::PgConnection),
    Sqlite {
        pool: sqlx::SqlitePool,
        holder: String,
        ttl: Duration,
    },
}

impl std::fmt::Debug for SyncLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SyncLock")
            .field("job", &self.job)
            .finish_non_exhaustive()
    }
}

fn ttl_ms(ttl: Duration) -> i64 {
    i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX)
}

impl SyncLock {
    /// Keeps the lock alive across a long run: a SQLite row is extended; a PostgreSQL session is
    /// checked, since a dropped session (idle timeout, proxy restart) took its lock with it.
    /// Errors when the lock was lost, so the run stops instead of racing another one.
    pub async fn renew(&mut self, now: i64) -> anyhow::Result<()> {
        if let LockInner::Postgres(conn) = &mut self.inner {
            use sqlx::Connection as _;
            conn.ping()
                .await
                .context("the sync lock session was lost")?;
        }
        if let LockInner::Sqlite { pool, holder, ttl } = &self.inner {
            let renewed =
                sqlx::query("UPDATE locks SET expires_at = $3 WHERE name = $1 AND holder = $2")
                    .bind(self.job.lock_name())
                    .bind(holder.as_str())
                    .bind(now.saturating_add(ttl_ms(*ttl)))
                    .execute(pool)
                    .await
                    .context("renewing the sync lock")?;
            anyhow::ensure!(
                renewed.rows_affected() == 1,
                "the sync lock expired and was taken"
            );
        }
        Ok(())
    }

    pub async fn release(self) -> anyhow::Result<()> {
        match self.inner {
            LockInner::Postgres(mut conn) => {
                use sqlx::Connection as _;
                sqlx::query(JOB_LOCK_RELEASE)
                    .bind(self.job.advisory_class())
                    .execute(&mut conn)
                    .await
                    .context("releasing the sync lock")?;
                conn.close()
                    .await
                    .context("closing the sync lock session")?;
            }
            LockInner::Sqlite { pool, holder, .. } => {
                sqlx::query("DELETE FROM locks WHERE name = $1 AND holder = $2")
                    .bind(self.job.lock_name())
                    .bind(holder)
                    .execute(&pool)
                    .await
                    .context("releasing the sync lock")?;
            }
        }
        Ok(())
    }
}

// Columns and statements shared by the sync and the webhook; built from constants only.
const PRODUCT_COLUMNS: (&str, usize) = (
    "INSERT INTO stripe_products (id, active, name, description, default_price_id, metadata, \
     livemode, stripe_created, stripe_updated, last_event_created, synced_at, deactivated_at) \
     VALUES ",
    12,
);
const PRODUCT_CONFLICT: &str = " ON CONFLICT (id) DO UPDATE SET active = excluded.active, name = excluded.name, \
    description = excluded.description, default_price_id = excluded.default_price_id, \
    metadata = excluded.metadata, livemode = excluded.livemode, \
    stripe_created = excluded.stripe_created, stripe_updated = excluded.stripe_updated, \
    last_event_created = excluded.last_event_created, synced_at = excluded.synced_at, \
    deactivated_at = excluded.deactivated_at \
    WHERE (stripe_products.last_event_created IS NULL \
    OR stripe_products.last_event_created <= excluded.last_event_created)";
const PRODUCT_CHANGED: &str = " AND (stripe_products.deactivated_at IS NOT NULL \
    OR stripe_products.active IS DISTINCT FROM excluded.active \
    OR stripe_products.name IS DISTINCT FROM excluded.name \
    OR stripe_products.description IS DISTINCT FROM excluded.description \
    OR stripe_products.default_price_id IS DISTINCT FROM excluded.default_price_id \
    OR stripe_products.metadata IS DISTINCT FROM excluded.metadata \
    OR stripe_products.livemode IS DISTINCT FROM excluded.livemode \
    OR stripe_products.stripe_created IS DISTINCT FROM excluded.stripe_created \
    OR stripe_products.stripe_updated IS DISTINCT FROM excluded.stripe_updated)";
const PRICE_COLUMNS: (&str, usize) = (
    "INSERT INTO stripe_prices (id, product_id, active, currency, unit_amount, price_type, \
     recurring_interval, recurring_interval_count, lookup_key, nickname, metadata, livemode, \
     stripe_created, last_event_created, synced_at, deactivated_at) VALUES ",
    16,
);
const PRICE_CONFLICT: &str = " ON CONFLICT (id) DO UPDATE SET product_id = excluded.product_id, \
    active = excluded.active, currency = excluded.currency, unit_amount = excluded.unit_amount, \
    price_type = excluded.price_type, recurring_interval = excluded.recurring_interval, \
    recurring_interval_count = excluded.recurring_interval_count, \
    lookup_key = excluded.lookup_key, nickname = excluded.nickname, \
    metadata = excluded.metadata, livemode = excluded.livemode, \
    stripe_created = excluded.stripe_created, last_event_created = excluded.last_event_created, \
    synced_at = excluded.synced_at, deactivated_at = excluded.deactivated_at \
    WHERE (stripe_prices.last_event_created IS NULL \
    OR stripe_prices.last_event_created <= excluded.last_event_created)";
const PRICE_CHANGED: &str = " AND (stripe_prices.deactivated_at IS NOT NULL \
    OR stripe_prices.product_id IS DISTINCT FROM excluded.product_id \
    OR stripe_prices.active IS DISTINCT FROM excluded.active \
    OR stripe_prices.currency IS DISTINCT FROM excluded.currency \
    OR stripe_prices.unit_amount IS DISTINCT FROM excluded.unit_amount \
    OR stripe_prices.price_type IS DISTINCT FROM excluded.price_type \
    OR stripe_prices.recurring_interval IS DISTINCT FROM excluded.recurring_interval \
    OR stripe_prices.recurring_interval_count IS DISTINCT FROM excluded.recurring_interval_count \
    OR stripe_prices.lookup_key IS DISTINCT FROM excluded.lookup_key \
    OR stripe_prices.nickname IS DISTINCT FROM excluded.nickname \
    OR stripe_prices.metadata IS DISTINCT FROM excluded.metadata \
    OR stripe_prices.livemode IS DISTINCT FROM excluded.livemode \
    OR stripe_prices.stripe_created IS DISTINCT FROM excluded.stripe_created)";

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

/// Binds a `ProductRow` to the next `PRODUCT_COLUMNS.1` parameters of `$query`.
macro_rules! bind_product {
    ($query:expr, $row:expr, $now:expr) => {
        $query
            .bind(&$row.id)
            .bind($row.active)
            .bind(&$row.name)
            .bind(&$row.description)
            .bind(&$row.default_price_id)
            .bind(&$row.metadata)
            .bind($row.livemode)
            .bind($row.stripe_created)
            .bind($row.stripe_updated)
            .bind($row.as_of)
            .bind($now)
            .bind($row.deactivated_at)
    };
}

/// Binds a `PriceRow` to the next `PRICE_COLUMNS.1` parameters of `$query`.
macro_rules! bind_price {
    ($query:expr, $row:expr, $now:expr) => {
        $query
            .bind(&$row.id)
            .bind(&$row.product_id)
            .bind($row.active)
            .bind(&$row.currency)
            .bind($row.unit_amount)
            .bind(&$row.price_type)
            .bind(&$row.recurring_interval)
            .bind($row.recurring_interval_count)
            .bind(&$row.lookup_key)
            .bind(&$row.nickname)
            .bind(&$row.metadata)
            .bind($row.livemode)
            .bind($row.stripe_created)
            .bind($row.as_of)
            .bind($now)
            .bind($row.deactivated_at)
    };
}

/// `($1, …, $width), ($width+1, …)`: the placeholders of a multi-row VALUES list.
fn placeholders(rows: usize, width: usize) -> String {
    (0..rows)
        .map(|row| {
            let fields: Vec<String> = (1..=width)
                .map(|f| format!("${}", row * width + f))
                .collect();
            format!("({})", fields.join(", "))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The upsert of `rows` rows; statements are built from the constants above and placeholders.
fn upsert_sql(columns: (&str, usize), conflict: &str, changed_only: &str, rows: usize) -> String {
    format!(
        "{}{}{conflict}{changed_only}",
        columns.0,
        placeholders(rows, columns.1)
    )
}

/// Writes one page of the listing in one transaction, in two statements: every listed id is
/// stamped as seen (`synced_at`), then one multi-row upsert writes only rows whose content
/// differs (or that were deactivated). Returns how many rows that upsert wrote.
macro_rules! sync_page {
    ($store:expr, $rows:expr, $now:expr, $bind:ident, $columns:expr, $conflict:expr, $changed:expr, $table:literal) => {{
        let rows = $rows;
        if rows.is_empty() {
            return Ok(0);
        }
        let seen = format!(
            "UPDATE {} SET synced_at = $1 WHERE id IN ({})",
            $table,
            (2..rows.len() + 2)
                .map(|i| format!("${i}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let upsert = upsert_sql($columns, $conflict, $changed, rows.len());
        let upserted: Result<u64, sqlx::Error> = with_pool!($store, |pool| {
            let mut tx = pool.begin().await?;
            // Not a cached prepared statement: PostgreSQL would soon run it on a generic plan
            // made while the table was small (a sequential scan), which stays as the table grows
            // until the next ANALYZE, making a 40,000-object sync several times slower.
            let mut stamp = sqlx::query(AssertSqlSafe(seen.as_str()))
                .persistent(false)
                .bind($now);
            for row in rows {
                stamp = stamp.bind(&row.id);
            }
            stamp.execute(&mut *tx).await?;
            let mut write = sqlx::query(AssertSqlSafe(upsert.as_str()));
            for row in rows {
                write = $bind!(write, row, $now);
            }
            let upserted = write.execute(&mut *tx).await?.rows_affected();
            tx.commit().await?;
            Ok(upserted)
        });
        upserted.context(concat!("writing a page of ", $table))
    }};
}

/// Applies one webhook effect inside the ledger's transaction `$tx`. With `$strict` a row last
/// written by an event of the same `created` is left alone (see `SameSecond`). Evaluates to the
/// effect's main row, `Some((table, id, as_of, rows written))`, or `None` for no effect.
macro_rules! apply_effect {
    ($tx:expr, $effect:expr, $now:expr, $strict:expr) => {
        match $effect {
            StripeEffect::None => None,
            StripeEffect::Product(row) => {
                let sql = conflict_rule(
                    upsert_sql(PRODUCT_COLUMNS, PRODUCT_CONFLICT, "", 1),
                    $strict,
                );
                let written = bind_product!(sqlx::query(AssertSqlSafe(sql)), row, $now)
                    .execute(&mut *$tx)
                    .await?
                    .rows_affected();
                Some(("stripe_products", &row.id, row.as_of, written))
            }
            StripeEffect::Price(row) => {
                let sql = conflict_rule(upsert_sql(PRICE_COLUMNS, PRICE_CONFLICT, "", 1), $strict);
                let written = bind_price!(sqlx::query(AssertSqlSafe(sql)), row, $now)
                    .execute(&mut *$tx)
                    .await?
                    .rows_affected();
                Some(("stripe_prices", &row.id, row.as_of, written))
            }
            StripeEffect::CheckoutSession { session, customer } => {
                if let Some(customer) = customer {
                    sqlx::query(CUSTOMER_UPSERT)
                        .bind(&customer.id)
                        .bind(&customer.email)
                        .bind(&customer.name)
                        .bind(customer.livemode)
                        .bind(customer.as_of)
                        .bind($now)
                        .execute(&mut *$tx)
                        .await?;
                }
                let sql = conflict_rule(CHECKOUT_UPSERT.to_owned(), $strict);
                let written = sqlx::query(AssertSqlSafe(sql))
                    .bind(&session.id)
                    .bind(&session.customer_id)
                    .bind(&session.customer_email)
                    .bind(&session.client_reference_id)
                    .bind(&session.mode)
                    .bind(&session.status)
                    .bind(&session.payment_status)
                    .bind(&session.subscription_id)
                    .bind(&session.payment_intent_id)
                    .bind(session.amount_total)
                    .bind(&session.currency)
                    .bind(&session.metadata)
                    .bind(session.livemode)
                    .bind(session.stripe_created)
                    .bind(session.as_of)
                    .bind($now)
                    .execute(&mut *$tx)
                    .await?
                    .rows_affected();
                Some((
                    "stripe_checkout_sessions",
                    &session.id,
                    session.as_of,
                    written,
                ))
            }
            StripeEffect::Subscription(row) => {
                let sql = conflict_rule(SUBSCRIPTION_UPSERT.to_owned(), $strict);
                let written = sqlx::query(AssertSqlSafe(sql))
                    .bind(&row.id)
                    .bind(&row.customer_id)
                    .bind(&row.status)
                    .bind(&row.price_id)
                    .bind(&row.product_id)
                    .bind(row.quantity)
                    .bind(row.current_period_end)
                    .bind(row.cancel_at_period_end)
                    .bind(row.canceled_at)
                    .bind(row.ended_at)
                    .bind(&row.metadata)
                    .bind(row.livemode)
                    .bind(row.stripe_created)
                    .bind(row.as_of)
                    .bind($now)
                    .execute(&mut *$tx)
                    .await?
                    .rows_affected();
                Some(("stripe_subscriptions", &row.id, row.as_of, written))
            }
            StripeEffect::Invoice(row) => {
                let sql = conflict_rule(INVOICE_UPSERT.to_owned(), $strict);
                let written = sqlx::query(AssertSqlSafe(sql))
                    .bind(&row.id)
                    .bind(&row.customer_id)
                    .bind(&row.subscription_id)
                    .bind(&row.status)
                    .bind(row.amount_due)
                    .bind(row.amount_paid)
                    .bind(&row.currency)
                    .bind(row.paid_at)
                    .bind(row.payment_failed_at)
                    .bind(row.attempt_count)
                    .bind(row.livemode)
                    .bind(row.stripe_created)
                    .bind(row.as_of)
                    .bind($now)
                    .execute(&mut *$tx)
                    .await?
                    .rows_affected();
                Some(("stripe_invoices", &row.id, row.as_of, written))
            }
        }
    };
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

/// The `finished_at`, `outcome` and `error` columns of a run row, finished or still running.
fn run_end<'a>(
    finished: Option<(i64, &'a str, Option<&'a str>)>,
) -> (Option<i64>, &'a str, Option<&'a str>) {
    match finished {
        Some((at, outcome, error)) => (Some(at), outcome, error),
        None => (None, "running", None),
    }
}

type SyncRunRow = (
    String,
    i64,
    Option<i64>,
    String,
    i64,
    i64,
    i64,
    i64,
    i64,
    i64,
    Option<String>,
);

impl Store {
    /// Runs `body` holding `job`'s lock, then releases it: `None` (and `body` not run) while
    /// that job runs elsewhere. A failed release is logged; the lock then expires.
    pub async fn with_job_lock<T>(
        &self,
        job: Job,
        holder: &str,
        now: i64,
        ttl: Duration,
        body: impl AsyncFnOnce(&mut SyncLock) -> T,
    ) -> anyhow::Result<Option<T>> {
        let Some(mut lock) = self.try_lock_job(job, holder, now, ttl).await? else {
            return Ok(None);
        };
        let result = body(&mut lock).await;
        if let Err(err) = lock.release().await {
            tracing::warn!(
                error = format!("{err:#}"),
                ?job,
                "lock not released; it expires"
            );
        }
        Ok(Some(result))
    }

    /// Takes `job`'s lock if no one holds it: `None` while that job runs, on any instance.
    /// PostgreSQL: a session advisory lock on a connection of its own. SQLite: a `locks` row
    /// that expires after `ttl` unless renewed, so a crashed holder cannot block the job forever.
    pub async fn try_lock_job(
        &self,
        job: Job,
        holder: &str,
        now: i64,
        ttl: Duration,
    ) -> anyhow::Result<Option<SyncLock>> {
        match &self.backend {
            Backend::Postgres(pool) => {
                // Detached: a session that dies (or a guard dropped unreleased) closes instead of
                // going back to the pool with the lock still held.
                let mut conn = pool
                    .acquire()
                    .await
                    .context("opening the sync lock session")?
                    .detach();
                let locked: bool = sqlx::query_scalar(JOB_LOCK_TRY)
                    .bind(job.advisory_class())
                    .fetch_one(&mut conn)
                    .await
                    .context("taking the sync lock")?;
                if !locked {
                    use sqlx::Connection as _;
                    conn.close()
                        .await
                        .context("closing the sync lock session")?;
                    return Ok(None);
                }
                Ok(Some(SyncLock {
                    job,
                    inner: LockInner::Postgres(conn),
                }))
            }
            Backend::Sqlite(pool) => {
                let taken = sqlx::query(
                    "INSERT INTO locks (name, holder, acquired_at, expires_at) \
                     VALUES ($1, $2, $3, $4) ON CONFLICT (name) DO UPDATE SET \
                     holder = excluded.holder, acquired_at = excluded.acquired_at, \
                     expires_at = excluded.expires_at WHERE locks.expires_at < excluded.acquired_at",
                )
                .bind(job.lock_name())
                .bind(holder)
                .bind(now)
                .bind(now.saturating_add(ttl_ms(ttl)))
                .execute(pool)
                .await
                .context("taking the sync lock")?;
                Ok((taken.rows_affected() == 1).then(|| SyncLock {
                    job,
                    inner: LockInner::Sqlite {
                        pool: pool.clone(),
                        holder: holder.to_owned(),
                        ttl,
                    },
                }))
            }
        }
    }

    pub async fn start_sync_run(&self, id: &str, started_at: i64) -> anyhow::Result<()> {
        let sql = "INSERT INTO sync_runs (id, started_at, outcome) VALUES ($1, $2, 'running')";
        with_pool!(self, |pool| sqlx::query(sql)
            .bind(id)
            .bind(started_at)
            .execute(pool)
            .await
            .map(|_| ()))
        .context("recording the sync run")?;
        Ok(())
    }

    /// Records a run's counts so far; with `finished` (at, outcome, error) it closes the run.
    pub async fn record_sync_run(
        &self,
        id: &str,
        counts: &SyncCounts,
        finished: Option<(i64, &str, Option<&str>)>,
    ) -> anyhow::Result<()> {
        let (finished_at, outcome, error) = run_end(finished);
        let sql = "UPDATE sync_runs SET products_seen = $2, products_upserted = $3, \
                   products_deactivated = $4, prices_seen = $5, prices_upserted = $6, \
                   prices_deactivated = $7, finished_at = $8, outcome = $9, error = $10 \
                   WHERE id = $1";
        with_pool!(self, |pool| sqlx::query(sql)
            .bind(id)
            .bind(counts.products_seen)
            .bind(counts.products_upserted)
            .bind(counts.products_deactivated)
            .bind(counts.prices_seen)
            .bind(counts.prices_upserted)
            .bind(counts.prices_deactivated)
            .bind(finished_at)
            .bind(outcome)
            .bind(error)
            .execute(pool)
            .await
            .map(|_| ()))
        .context("recording the sync run")?;
        Ok(())
    }

    /// The newest sync runs, newest first.
    pub async fn recent_sync_runs(&self, limit: i64) -> anyhow::Result<Vec<SyncRun>> {
        let sql = "SELECT id, started_at, finished_at, outcome, products_seen, \
                   products_upserted, products_deactivated, prices_seen, prices_upserted, \
                   prices_deactivated, error FROM sync_runs \
                   ORDER BY started_at DESC, id DESC LIMIT $1";
        let rows: Vec<SyncRunRow> = with_pool!(self, |pool| sqlx::query_as(sql)
            .bind(limit)
            .fetch_all(pool)
            .await)
        .context("reading sync runs")?;
        Ok(rows
            .into_iter()
            .map(|r| SyncRun {
                id: r.0,
                started_at: r.1,
                finished_at: r.2,
                outcome: r.3,
                counts: SyncCounts {
                    products_seen: r.4,
                    products_upserted: r.5,
                    products_deactivated: r.6,
                    prices_seen: r.7,
                    prices_upserted: r.8,
                    prices_deactivated: r.9,
                },
                error: r.10,
            })
            .collect())
    }

    /// Writes one listed page of products; returns how many were new or changed.
    pub async fn sync_products_page(&self, rows: &[ProductRow], now: i64) -> anyhow::Result<u64> {
        sync_page!(
            self,
            rows,
            now,
            bind_product,
            PRODUCT_COLUMNS,
            PRODUCT_CONFLICT,
            PRODUCT_CHANGED,
            "stripe_products"
        )
    }

    /// Writes one listed page of prices; returns how many were new or changed.
    pub async fn sync_prices_page(&self, rows: &[PriceRow], now: i64) -> anyhow::Result<u64> {
        sync_page!(
            self,
            rows,
            now,
            bind_price,
            PRICE_COLUMNS,
            PRICE_CONFLICT,
            PRICE_CHANGED,
            "stripe_prices"
        )
    }

    /// After a complete listing that started at `run_started`: marks every active row it did not
    /// return as deactivated (never deleted). Returns (products, prices) deactivated.
    pub async fn deactivate_unseen(
        &self,
        run_started: i64,
        now: i64,
    ) -> anyhow::Result<(u64, u64)> {
        let products = "UPDATE stripe_products SET active = FALSE, deactivated_at = $1 \
                        WHERE deactivated_at IS NULL AND synced_at < $2";
        let prices = "UPDATE stripe_prices SET active = FALSE, deactivated_at = $1 \
                      WHERE deactivated_at IS NULL AND synced_at < $2";
        let counts: Result<(u64, u64), sqlx::Error> = with_pool!(self, |pool| {
            let mut tx = pool.begin().await?;
            let products = sqlx::query(products)
                .bind(now)
                .bind(run_started)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            let prices = sqlx::query(prices)
                .bind(now)
                .bind(run_started)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            tx.commit().await?;
            Ok((products, prices))
        });
        counts.context("deactivating rows Stripe no longer lists")
    }

    /// Records a webhook event in the ledger and applies its effect, in one transaction. The
    /// ledger row goes first: a concurrent delivery of the same id waits on its unique key and
    /// then finds it, so an event is applied once however many instances receive it. Any error
    /// rolls the whole transaction back, so Stripe's retry finds no ledger row.
    ///
    /// An event strictly older than the row changes nothing but is recorded; one of the same
    /// second as the row is handled as `same_second` says.
    pub async fn apply_stripe_event(
        &self,
        event: &LedgerEvent,
        effect: &StripeEffect,
        same_second: SameSecond,
    ) -> anyhow::Result<EventReceipt> {
        let ledger = "INSERT INTO stripe_events (id, event_type, created, livemode, received_at, \
                      applied) VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (id) DO NOTHING";
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
                if let Some((table, id, as_of, 0)) = apply_effect!(tx, effect, now, strict)
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

    pub async fn start_reconcile_run(
        &self,
        id: &str,
        started_by: &str,
        since: i64,
        started_at: i64,
    ) -> anyhow::Result<()> {
        let sql = "INSERT INTO reconcile_runs (id, started_by, since, started_at, outcome) \
                   VALUES ($1, $2, $3, $4, 'running')";
        with_pool!(self, |pool| sqlx::query(sql)
            .bind(id)
            .bind(started_by)
            .bind(since)
            .bind(started_at)
            .execute(pool)
            .await
            .map(|_| ()))
        .context("recording the reconcile run")?;
        Ok(())
    }

    /// Records a run's counts and the last event it handled; with `finished` (at, outcome,
    /// error) it closes the run.
    pub async fn record_reconcile_run(
        &self,
        id: &str,
        counts: &ReconcileCounts,
        last_event_id: Option<&str>,
        finished: Option<(i64, &str, Option<&str>)>,
    ) -> anyhow::Result<()> {
        let (finished_at, outcome, error) = run_end(finished);
        let sql = "UPDATE reconcile_runs SET events_seen = $2, events_applied = $3, \
                   events_already_applied = $4, events_ignored = $5, last_event_id = $6, \
                   finished_at = $7, outcome = $8, error = $9 WHERE id = $1";
        with_pool!(self, |pool| sqlx::query(sql)
            .bind(id)
            .bind(counts.seen)
            .bind(counts.applied)
            .bind(counts.already_applied)
            .bind(counts.ignored)
            .bind(last_event_id)
            .bind(finished_at)
            .bind(outcome)
            .bind(error)
            .execute(pool)
            .await
            .map(|_| ()))
        .context("recording the reconcile run")?;
        Ok(())
    }

    /// The newest `created` (ms) in the webhook ledger.
    pub async fn newest_stripe_event_created(&self) -> anyhow::Result<Option<i64>> {
        let sql = "SELECT MAX(created) FROM stripe_events";
        let newest: Option<i64> =
            with_pool!(self, |pool| sqlx::query_scalar(sql).fetch_one(pool).await)
                .context("reading the newest ledger event")?;
        Ok(newest)
    }

    /// What earlier reconciliations leave to the next: the start (ms) of the last successful
    /// one, and the earliest `since` (s) of any run after it that did not finish (failed or
    /// crashed), whose older events may still be missing.
    pub async fn reconcile_history(&self) -> anyhow::Result<(Option<i64>, Option<i64>)> {
        let last_ok = "SELECT MAX(started_at) FROM reconcile_runs WHERE outcome = 'ok'";
        let unfinished = "SELECT MIN(since) FROM reconcile_runs \
                          WHERE outcome <> 'ok' AND started_at > $1";
        let history: Result<(Option<i64>, Option<i64>), sqlx::Error> = with_pool!(self, |pool| {
            let last_ok: Option<i64> = sqlx::query_scalar(last_ok).fetch_one(pool).await?;
            let unfinished: Option<i64> = sqlx::query_scalar(unfinished)
                .bind(last_ok.unwrap_or(i64::MIN))
                .fetch_one(pool)
                .await?;
            Ok((last_ok, unfinished))
        });
        history.context("reading earlier reconcile runs")
    }
}
