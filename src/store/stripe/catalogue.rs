//! The catalogue: products and prices, written page by page by the sync (only rows that changed)
//! and one at a time by webhooks; rows Stripe stops listing are deactivated, never deleted.

use anyhow::Context as _;
use sqlx::AssertSqlSafe;

use sqlx::Pool;

use crate::store::Store;
use crate::store::engine::{BindExt as _, Engine, Execute as _, Query};

/// A product as stored. `as_of` (ms) is when this state was true: the webhook event's `created`,
/// or for the sync a millisecond before the start of the second before it asked for the page
/// (`sync::page_as_of`), so an event's state of that second is newer than the page's; older
/// state never overwrites newer.
#[derive(Clone, Debug, PartialEq)]
pub struct ProductRow {
    pub id: String,
    pub active: bool,
    pub name: String,
    pub description: Option<String>,
    pub default_price_id: Option<String>,
    /// JSON text, as `metadata`; null where Stripe sends null or nothing.
    pub images: Option<String>,
    /// JSON text, as `images`.
    pub marketing_features: Option<String>,
    pub unit_label: Option<String>,
    pub url: Option<String>,
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
    /// Stripe's decimal string, as sent.
    pub unit_amount_decimal: Option<String>,
    pub billing_scheme: Option<String>,
    pub tiers_mode: Option<String>,
    /// JSON text, as the other JSON columns below; `tiers` and `currency_options` are null
    /// when Stripe did not send them (it sends them only when expanded), and a null one keeps
    /// what the row holds.
    pub tiers: Option<String>,
    pub transform_quantity: Option<String>,
    pub custom_unit_amount: Option<String>,
    pub currency_options: Option<String>,
    pub tax_behavior: Option<String>,
    pub price_type: String,
    pub recurring_interval: Option<String>,
    pub recurring_interval_count: Option<i64>,
    /// `licensed` or `metered`; null for a one-time price.
    pub recurring_usage_type: Option<String>,
    pub recurring_meter: Option<String>,
    pub recurring_trial_period_days: Option<i64>,
    pub lookup_key: Option<String>,
    pub nickname: Option<String>,
    pub metadata: String,
    pub livemode: bool,
    pub stripe_created: i64,
    pub as_of: i64,
    pub deactivated_at: Option<i64>,
}

/// Which catalogue object a deletion names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CatalogueObject {
    Product,
    Price,
}

impl CatalogueObject {
    pub fn table(self) -> &'static str {
        match self {
            Self::Product => ProductRow::TABLE,
            Self::Price => PriceRow::TABLE,
        }
    }
}

/// A product or price a deletion event named by Stripe's stub only (`{"id","object",
/// "deleted":true}`): which object is gone, and nothing else of it. It marks the row deleted as
/// of `as_of` and keeps the rest. With no row yet, `tombstone` (the stub's row: its id, deleted,
/// nothing else known) is written, so that an older event of the object delivered late (Stripe
/// retries for days) does not bring it back.
#[derive(Clone, Debug, PartialEq)]
pub struct Deletion {
    pub object: CatalogueObject,
    pub id: String,
    pub as_of: i64,
    pub deactivated_at: i64,
    pub tombstone: Tombstone,
}

/// The row a stub deletion writes for an object no row holds yet.
#[derive(Clone, Debug, PartialEq)]
pub enum Tombstone {
    Product(Box<ProductRow>),
    Price(Box<PriceRow>),
}

/// How new the state is that the products and prices an earlier build wrote last hold (their
/// `last_event_created`, ms), for the sync that rewrites them to wait for (`None`: no such row
/// has one).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EarlierBuildsAsOf {
    /// The newest of all.
    pub newest: Option<i64>,
    /// The newest at or before the bound asked for.
    pub newest_up_to: Option<i64>,
}

/// The set of catalogue columns this build writes, stored in each row it writes
/// (`written_rev`, beside `written_synced_at`: the `synced_at` it wrote with). A build that
/// writes more columns than the one before it counts one up, so rows the earlier build wrote
/// meanwhile (a rolling deploy, a rollback) are found and rewritten ([`EARLIER_WRITER`]).
pub(crate) const WRITTEN_REV: i64 = 1;

/// The rows that an earlier build wrote last, so that columns it does not know may hold an
/// earlier value: one written with fewer columns (a lower `written_rev`), or whose `synced_at`
/// moved without `written_synced_at` (written by a build that knows neither). Rows of a later
/// build are not this build's to rewrite (both would rewrite the catalogue back and forth while
/// they run side by side). Deactivated rows are left out: Stripe no longer lists them, so no
/// sync could rewrite them.
const EARLIER_WRITER: &str = "deactivated_at IS NULL AND (written_rev IS NULL OR written_rev < $1 \
    OR written_synced_at IS DISTINCT FROM synced_at)";

// Columns and statements shared by the sync and the webhook; built from constants only.
const PRODUCT_COLUMNS: (&str, usize) = (
    "INSERT INTO stripe_products (id, active, name, description, default_price_id, metadata, \
     livemode, stripe_created, stripe_updated, last_event_created, synced_at, deactivated_at, \
     images, marketing_features, unit_label, url, written_rev, written_synced_at) VALUES ",
    18,
);
// No upsert moves `synced_at` back (a page's seen stamp may, never below its listing's start),
// and `written_synced_at` follows it (the row stays this build's):
// an event is written with the time it was received, which can be before the start of a sync
// that stamped the row meanwhile (the event's same-second fetch from Stripe, or the write lock,
// came first), and the complete listing would take a row stamped before it for unseen.
const PRODUCT_CONFLICT: &str = " ON CONFLICT (id) DO UPDATE SET active = excluded.active, name = excluded.name, \
    description = excluded.description, default_price_id = excluded.default_price_id, \
    metadata = excluded.metadata, livemode = excluded.livemode, \
    stripe_created = excluded.stripe_created, stripe_updated = excluded.stripe_updated, \
    last_event_created = excluded.last_event_created, \
    synced_at = CASE WHEN stripe_products.synced_at > excluded.synced_at \
    THEN stripe_products.synced_at ELSE excluded.synced_at END, \
    deactivated_at = excluded.deactivated_at, images = excluded.images, \
    marketing_features = COALESCE(excluded.marketing_features, stripe_products.marketing_features), \
    unit_label = excluded.unit_label, \
    url = excluded.url, written_rev = excluded.written_rev, \
    written_synced_at = CASE WHEN stripe_products.synced_at > excluded.synced_at \
    THEN stripe_products.synced_at ELSE excluded.synced_at END \
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
    OR stripe_products.stripe_updated IS DISTINCT FROM excluded.stripe_updated \
    OR stripe_products.images IS DISTINCT FROM excluded.images \
    OR stripe_products.marketing_features \
    IS DISTINCT FROM COALESCE(excluded.marketing_features, stripe_products.marketing_features) \
    OR stripe_products.unit_label IS DISTINCT FROM excluded.unit_label \
    OR stripe_products.url IS DISTINCT FROM excluded.url \
    OR stripe_products.written_rev IS DISTINCT FROM excluded.written_rev \
    OR stripe_products.written_synced_at IS DISTINCT FROM stripe_products.synced_at)";
const PRICE_COLUMNS: (&str, usize) = (
    "INSERT INTO stripe_prices (id, product_id, active, currency, unit_amount, price_type, \
     recurring_interval, recurring_interval_count, lookup_key, nickname, metadata, livemode, \
     stripe_created, last_event_created, synced_at, deactivated_at, unit_amount_decimal, \
     billing_scheme, tiers_mode, tiers, transform_quantity, custom_unit_amount, \
     currency_options, tax_behavior, recurring_usage_type, recurring_meter, \
     recurring_trial_period_days, written_rev, written_synced_at) VALUES ",
    29,
);
// `tiers` and `currency_options` are sent by Stripe only when expanded (the sync asks for both;
// an event's object may lack them): a write without them keeps the row's. A price's tiers never
// change, and Stripe's expanded `currency_options` lists the price's own currency too, so a null
// stands for "not sent", never for a value removed.
const PRICE_CONFLICT: &str = " ON CONFLICT (id) DO UPDATE SET product_id = excluded.product_id, \
    active = excluded.active, currency = excluded.currency, unit_amount = excluded.unit_amount, \
    unit_amount_decimal = excluded.unit_amount_decimal, \
    billing_scheme = excluded.billing_scheme, tiers_mode = excluded.tiers_mode, \
    tiers = COALESCE(excluded.tiers, stripe_prices.tiers), \
    transform_quantity = excluded.transform_quantity, \
    custom_unit_amount = excluded.custom_unit_amount, \
    currency_options = COALESCE(excluded.currency_options, stripe_prices.currency_options), \
    tax_behavior = excluded.tax_behavior, \
    price_type = excluded.price_type, recurring_interval = excluded.recurring_interval, \
    recurring_interval_count = excluded.recurring_interval_count, \
    recurring_usage_type = excluded.recurring_usage_type, \
    recurring_meter = excluded.recurring_meter, \
    recurring_trial_period_days = excluded.recurring_trial_period_days, \
    lookup_key = excluded.lookup_key, nickname = excluded.nickname, \
    metadata = excluded.metadata, livemode = excluded.livemode, \
    stripe_created = excluded.stripe_created, last_event_created = excluded.last_event_created, \
    synced_at = CASE WHEN stripe_prices.synced_at > excluded.synced_at \
    THEN stripe_prices.synced_at ELSE excluded.synced_at END, \
    deactivated_at = excluded.deactivated_at, written_rev = excluded.written_rev, \
    written_synced_at = CASE WHEN stripe_prices.synced_at > excluded.synced_at \
    THEN stripe_prices.synced_at ELSE excluded.synced_at END \
    WHERE (stripe_prices.last_event_created IS NULL \
    OR stripe_prices.last_event_created <= excluded.last_event_created)";
const PRICE_CHANGED: &str = " AND (stripe_prices.deactivated_at IS NOT NULL \
    OR stripe_prices.product_id IS DISTINCT FROM excluded.product_id \
    OR stripe_prices.active IS DISTINCT FROM excluded.active \
    OR stripe_prices.currency IS DISTINCT FROM excluded.currency \
    OR stripe_prices.unit_amount IS DISTINCT FROM excluded.unit_amount \
    OR stripe_prices.unit_amount_decimal IS DISTINCT FROM excluded.unit_amount_decimal \
    OR stripe_prices.billing_scheme IS DISTINCT FROM excluded.billing_scheme \
    OR stripe_prices.tiers_mode IS DISTINCT FROM excluded.tiers_mode \
    OR stripe_prices.tiers IS DISTINCT FROM COALESCE(excluded.tiers, stripe_prices.tiers) \
    OR stripe_prices.transform_quantity IS DISTINCT FROM excluded.transform_quantity \
    OR stripe_prices.custom_unit_amount IS DISTINCT FROM excluded.custom_unit_amount \
    OR stripe_prices.currency_options IS DISTINCT FROM \
    COALESCE(excluded.currency_options, stripe_prices.currency_options) \
    OR stripe_prices.tax_behavior IS DISTINCT FROM excluded.tax_behavior \
    OR stripe_prices.price_type IS DISTINCT FROM excluded.price_type \
    OR stripe_prices.recurring_interval IS DISTINCT FROM excluded.recurring_interval \
    OR stripe_prices.recurring_interval_count IS DISTINCT FROM excluded.recurring_interval_count \
    OR stripe_prices.recurring_usage_type IS DISTINCT FROM excluded.recurring_usage_type \
    OR stripe_prices.recurring_meter IS DISTINCT FROM excluded.recurring_meter \
    OR stripe_prices.recurring_trial_period_days IS DISTINCT FROM \
    excluded.recurring_trial_period_days \
    OR stripe_prices.lookup_key IS DISTINCT FROM excluded.lookup_key \
    OR stripe_prices.nickname IS DISTINCT FROM excluded.nickname \
    OR stripe_prices.metadata IS DISTINCT FROM excluded.metadata \
    OR stripe_prices.livemode IS DISTINCT FROM excluded.livemode \
    OR stripe_prices.stripe_created IS DISTINCT FROM excluded.stripe_created \
    OR stripe_prices.written_rev IS DISTINCT FROM excluded.written_rev \
    OR stripe_prices.written_synced_at IS DISTINCT FROM stripe_prices.synced_at)";

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
pub(super) fn upsert_sql(
    columns: (&str, usize),
    conflict: &str,
    changed_only: &str,
    rows: usize,
) -> String {
    format!(
        "{}{}{conflict}{changed_only}",
        columns.0,
        placeholders(rows, columns.1)
    )
}

/// A stub deletion's mark on the row, if there is one and it is not newer: `active` false,
/// `deactivated_at` and the event's `created`, every other column as it was. `newer_only` for
/// strictly newer (see `SameSecond`).
pub(super) fn deletion_mark_sql(table: &str, newer_only: bool) -> String {
    let op = if newer_only { "<" } else { "<=" };
    format!(
        "UPDATE {table} SET active = FALSE, deactivated_at = $2, last_event_created = $3 \
         WHERE id = $1 AND (last_event_created IS NULL OR last_event_created {op} $3)"
    )
}

/// A stub deletion's row for an object no row holds yet ([`Tombstone`]); nothing when a row is
/// there, written meanwhile by another transaction (then marked by `deletion_mark_sql`).
pub(super) fn tombstone_sql<R: CatalogueRow>() -> String {
    upsert_sql(R::COLUMNS, " ON CONFLICT (id) DO NOTHING", "", 1)
}

/// A row type the sync writes a page at a time: its table, its upsert, and how it binds.
pub(crate) trait CatalogueRow {
    const TABLE: &str;
    /// The `INSERT … VALUES ` head and the number of parameters a row takes.
    const COLUMNS: (&str, usize);
    const CONFLICT: &str;
    /// The condition that limits the sync's upsert to rows whose content differs.
    const CHANGED: &str;
    fn id(&self) -> &str;
    /// When this state was true (ms).
    fn as_of(&self) -> i64;
    /// Binds the row to the next `COLUMNS.1` parameters of `query`.
    fn bind<'q, DB: Engine>(&self, query: Query<'q, DB>, now: i64) -> Query<'q, DB>;
}

impl CatalogueRow for ProductRow {
    const TABLE: &str = "stripe_products";
    const COLUMNS: (&str, usize) = PRODUCT_COLUMNS;
    const CONFLICT: &str = PRODUCT_CONFLICT;
    const CHANGED: &str = PRODUCT_CHANGED;

    fn id(&self) -> &str {
        &self.id
    }

    fn as_of(&self) -> i64 {
        self.as_of
    }

    fn bind<'q, DB: Engine>(&self, query: Query<'q, DB>, now: i64) -> Query<'q, DB> {
        query
            .bind_value(&self.id)
            .bind_value(self.active)
            .bind_value(&self.name)
            .bind_value(&self.description)
            .bind_value(&self.default_price_id)
            .bind_value(&self.metadata)
            .bind_value(self.livemode)
            .bind_value(self.stripe_created)
            .bind_value(self.stripe_updated)
            .bind_value(self.as_of)
            .bind_value(now)
            .bind_value(self.deactivated_at)
            .bind_value(&self.images)
            .bind_value(&self.marketing_features)
            .bind_value(&self.unit_label)
            .bind_value(&self.url)
            .bind_value(WRITTEN_REV)
            .bind_value(now)
    }
}

impl CatalogueRow for PriceRow {
    const TABLE: &str = "stripe_prices";
    const COLUMNS: (&str, usize) = PRICE_COLUMNS;
    const CONFLICT: &str = PRICE_CONFLICT;
    const CHANGED: &str = PRICE_CHANGED;

    fn id(&self) -> &str {
        &self.id
    }

    fn as_of(&self) -> i64 {
        self.as_of
    }

    fn bind<'q, DB: Engine>(&self, query: Query<'q, DB>, now: i64) -> Query<'q, DB> {
        query
            .bind_value(&self.id)
            .bind_value(&self.product_id)
            .bind_value(self.active)
            .bind_value(&self.currency)
            .bind_value(self.unit_amount)
            .bind_value(&self.price_type)
            .bind_value(&self.recurring_interval)
            .bind_value(self.recurring_interval_count)
            .bind_value(&self.lookup_key)
            .bind_value(&self.nickname)
            .bind_value(&self.metadata)
            .bind_value(self.livemode)
            .bind_value(self.stripe_created)
            .bind_value(self.as_of)
            .bind_value(now)
            .bind_value(self.deactivated_at)
            .bind_value(&self.unit_amount_decimal)
            .bind_value(&self.billing_scheme)
            .bind_value(&self.tiers_mode)
            .bind_value(&self.tiers)
            .bind_value(&self.transform_quantity)
            .bind_value(&self.custom_unit_amount)
            .bind_value(&self.currency_options)
            .bind_value(&self.tax_behavior)
            .bind_value(&self.recurring_usage_type)
            .bind_value(&self.recurring_meter)
            .bind_value(self.recurring_trial_period_days)
            .bind_value(WRITTEN_REV)
            .bind_value(now)
    }
}

/// Writes one page of the listing in one transaction, in two statements: every listed id is
/// stamped as seen (`synced_at`), then one multi-row upsert writes only rows whose content
/// differs (or that were deactivated). Returns how many rows that upsert wrote.
async fn sync_page<DB: Engine, R: CatalogueRow>(
    pool: &Pool<DB>,
    rows: &[R],
    now: i64,
) -> Result<u64, sqlx::Error> {
    if rows.is_empty() {
        return Ok(0);
    }
    // A row this build wrote keeps its `written_synced_at` beside `synced_at`; one an earlier
    // build wrote stays apart, and is written by the upsert below whatever its content.
    let seen = format!(
        "UPDATE {} SET synced_at = $1, written_synced_at = CASE \
         WHEN written_synced_at = synced_at THEN $1 ELSE written_synced_at END WHERE id IN ({})",
        R::TABLE,
        (2..rows.len() + 2)
            .map(|i| format!("${i}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let upsert = upsert_sql(R::COLUMNS, R::CONFLICT, R::CHANGED, rows.len());
    let mut tx = pool.begin().await?;
    // Not a cached prepared statement: PostgreSQL would soon run it on a generic plan made while
    // the table was small (a sequential scan), which stays as the table grows until the next
    // ANALYZE, making a 40,000-object sync several times slower.
    let mut stamp = sqlx::query(AssertSqlSafe(seen.as_str()))
        .persistent(false)
        .bind_value(now);
    for row in rows {
        stamp = stamp.bind_value(row.id());
    }
    stamp.execute(tx.executor()).await?;
    let mut write = sqlx::query(AssertSqlSafe(upsert.as_str()));
    for row in rows {
        write = row.bind(write, now);
    }
    let upserted = DB::rows_affected(&write.execute(tx.executor()).await?);
    tx.commit().await?;
    Ok(upserted)
}

impl Store {
    /// Writes one listed page of `R`s; returns how many were new or changed.
    pub(crate) async fn sync_catalogue_page<R: CatalogueRow>(
        &self,
        rows: &[R],
        now: i64,
    ) -> anyhow::Result<u64> {
        with_pool!(self, |pool| sync_page(pool, rows, now).await)
            .with_context(|| format!("writing a page of {}", R::TABLE))
    }

    /// How many products and prices an earlier build wrote last ([`EARLIER_WRITER`]): a sync
    /// rewrites them.
    pub async fn catalogue_rows_by_earlier_builds(&self) -> anyhow::Result<i64> {
        let sql = format!(
            "SELECT (SELECT COUNT(*) FROM stripe_products WHERE {EARLIER_WRITER}) \
             + (SELECT COUNT(*) FROM stripe_prices WHERE {EARLIER_WRITER})"
        );
        let rows: Result<i64, sqlx::Error> = with_pool!(self, |pool| {
            sqlx::query_scalar(AssertSqlSafe(sql.as_str()))
                .bind(WRITTEN_REV)
                .fetch_one(pool)
                .await
        });
        rows.context("counting the catalogue rows earlier builds wrote")
    }

    /// The newest `last_event_created` (the as-of of the state they hold) of the products and
    /// prices an earlier build wrote last ([`EARLIER_WRITER`]), of all of them and of those at or
    /// before `up_to`.
    pub async fn newest_as_of_by_earlier_builds(
        &self,
        up_to: i64,
    ) -> anyhow::Result<EarlierBuildsAsOf> {
        let newest = |table: &str| {
            format!(
                "SELECT MAX(last_event_created) AS newest, \
                 MAX(CASE WHEN last_event_created <= $2 THEN last_event_created END) AS newest_up_to \
                 FROM {table} WHERE {EARLIER_WRITER}"
            )
        };
        let sql = format!(
            "SELECT MAX(newest), MAX(newest_up_to) FROM ({} UNION ALL {}) AS earlier",
            newest("stripe_products"),
            newest("stripe_prices")
        );
        let newest: Result<(Option<i64>, Option<i64>), sqlx::Error> = with_pool!(self, |pool| {
            sqlx::query_as(AssertSqlSafe(sql.as_str()))
                .bind(WRITTEN_REV)
                .bind(up_to)
                .fetch_one(pool)
                .await
        });
        let (newest, newest_up_to) =
            newest.context("reading the newest catalogue row earlier builds wrote")?;
        Ok(EarlierBuildsAsOf {
            newest,
            newest_up_to,
        })
    }

    /// The ids of prices not deactivated yet whose last stamp is older than `since`: those a
    /// complete listing stamped from `since` on did not return.
    pub async fn unseen_prices(&self, since: i64) -> anyhow::Result<Vec<String>> {
        let sql = "SELECT id FROM stripe_prices WHERE deactivated_at IS NULL AND synced_at < $1 \
                   ORDER BY id";
        let ids: Result<Vec<String>, sqlx::Error> = with_pool!(self, |pool| {
            sqlx::query_scalar(sql).bind(since).fetch_all(pool).await
        });
        ids.context("listing the prices a sync did not see")
    }

    /// After a complete listing whose products were stamped from `products_since` and prices
    /// from `prices_since` on: marks every row stamped earlier as deactivated (never deleted),
    /// as of `products_as_of` and `prices_as_of` (ms, in the unit of webhook events' `created`:
    /// the page stamp of the time each complete listing began): its `last_event_created` is
    /// raised to it, so an older event delivered late (Stripe retries for days) does not bring
    /// back what the listing found gone. A row holding state newer than that is left: an event
    /// said the object was there after the listing began, which may not have returned an object
    /// that new, and a deletion since then comes as an event of its own. (An event written late
    /// over a row the listing stamped keeps the stamp: no upsert moves `synced_at` back.) Returns
    /// (products, prices) deactivated.
    pub async fn deactivate_unseen(
        &self,
        products_since: i64,
        prices_since: i64,
        now: i64,
        products_as_of: i64,
        prices_as_of: i64,
    ) -> anyhow::Result<(u64, u64)> {
        let products = "UPDATE stripe_products SET active = FALSE, deactivated_at = $1, \
                        last_event_created = $3 \
                        WHERE deactivated_at IS NULL AND synced_at < $2 \
                        AND (last_event_created IS NULL OR last_event_created <= $3)";
        let prices = "UPDATE stripe_prices SET active = FALSE, deactivated_at = $1, \
                      last_event_created = $3 \
                      WHERE deactivated_at IS NULL AND synced_at < $2 \
                      AND (last_event_created IS NULL OR last_event_created <= $3)";
        let counts: Result<(u64, u64), sqlx::Error> = with_pool!(self, |pool| {
            let mut tx = pool.begin().await?;
            let products = sqlx::query(products)
                .bind(now)
                .bind(products_since)
                .bind(products_as_of)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            let prices = sqlx::query(prices)
                .bind(now)
                .bind(prices_since)
                .bind(prices_as_of)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            tx.commit().await?;
            Ok((products, prices))
        });
        counts.context("deactivating rows Stripe no longer lists")
    }
}
