//! A fake Stripe for `bench/stripe.sh`: `/v1/products` (N products), `/v1/prices` (3N prices)
//! and `/v1/events` (E events, newest first, `created[gte]` honoured)
//! paged exactly as Stripe pages them (`limit` 1 to 100, default 10; `starting_after`, 400 when
//! the id is unknown; `has_more`; `{"object":"list","data":[…],"has_more":…,"url":…}`), and
//! `/v1/balance` for `edgegate check`. Objects are Stripe's example `product` and `price` from
//! `fixtures3.json` with id, name, product reference, default price, `unit_amount`, `active` and
//! type varied by their index, as in the test fake (`tests/it/fake_stripe.rs`, which keeps its
//! catalogue in a `Vec` so tests can edit it and inject faults). This one is separate and has no
//! state: a page is built when it is asked for (at most 100 objects), so the catalogue is never
//! held in memory, and the same N gives the same catalogue on every run.
//!
//! Event `i` (0 is the newest) is `evt_B{i:07}`, created `i / 10` seconds before the fake
//! started: a `product.updated` of product `i` (Stripe's example event around that product), and
//! every tenth a `customer.created`, a type edgegate records without acting on.
//!
//! `cargo run --release --example fake_stripe -- PORT N FIXTURES_JSON SECRET_KEY [E]`
//! (binds 127.0.0.1 only; answers 401 to any other key).

use std::sync::Arc;

use anyhow::Context as _;
use axum::Router;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::Deserialize;
use serde_json::{Value, json};

#[path = "../tests/common/stripe_catalogue.rs"]
mod stripe_catalogue;

struct Fake {
    products: usize,
    product: Value,
    price: Value,
    event: Value,
    events: usize,
    /// Unix seconds of the newest event.
    newest: i64,
    key: String,
}

fn product_id(i: usize) -> String {
    format!("prod_B{i:07}")
}

fn price_id(i: usize) -> String {
    format!("price_B{i:07}")
}

fn event_id(i: usize) -> String {
    format!("evt_B{i:07}")
}

/// The index in an id made by `product_id`/`price_id`, if it is one of `count`.
fn index(id: &str, prefix: &str, count: usize) -> Option<usize> {
    let digits = id.strip_prefix(prefix)?;
    let i: usize = digits.parse().ok()?;
    (digits.len() == 7 && i < count).then_some(i)
}

impl Fake {
    fn product(&self, i: usize) -> Value {
        stripe_catalogue::product(&self.product, i, product_id(i), price_id(i * 3))
    }

    fn price(&self, i: usize) -> Value {
        stripe_catalogue::price(&self.price, i, price_id(i), product_id(i / 3))
    }

    fn created(&self, i: usize) -> i64 {
        self.newest - i64::try_from(i / 10).unwrap_or(i64::MAX)
    }

    fn event(&self, i: usize) -> Value {
        let mut event = self.event.clone();
        event["id"] = json!(event_id(i));
        event["created"] = json!(self.created(i));
        if i % 10 == 9 {
            event["type"] = json!("customer.created");
            event["data"] = json!({"object": {"id": format!("cus_B{i:07}"), "object": "customer"}});
        } else {
            event["type"] = json!("product.updated");
            event["data"] = json!({"object": self.product(i)});
        }
        event
    }

    /// How many events (from the newest) were created at `since` or later.
    fn events_since(&self, since: Option<i64>) -> usize {
        match since {
            None => self.events,
            Some(since) if since > self.newest => 0,
            Some(since) => {
                let seconds = usize::try_from(self.newest - since).unwrap_or(usize::MAX);
                self.events
                    .min(seconds.saturating_add(1).saturating_mul(10))
            }
        }
    }

    fn authorized(&self, headers: &HeaderMap) -> bool {
        headers
            .get("authorization")
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("Bearer "))
            .is_some_and(|key| key == self.key)
    }
}

#[derive(Deserialize)]
struct ListQuery {
    limit: Option<String>,
    starting_after: Option<String>,
    #[serde(rename = "created[gte]")]
    created_gte: Option<i64>,
}

fn stripe_error(status: StatusCode, message: &str) -> Response {
    let body = json!({"error": {"type": "invalid_request_error", "message": message}});
    (status, axum::Json(body)).into_response()
}

/// One page of `count` objects named by `prefix`, built by `make`.
fn page(
    fake: &Fake,
    headers: &HeaderMap,
    query: &ListQuery,
    (url, prefix, count): (&str, &str, usize),
    make: fn(&Fake, usize) -> Value,
) -> Response {
    if !fake.authorized(headers) {
        return stripe_error(StatusCode::UNAUTHORIZED, "invalid API key");
    }
    let limit = match query.limit.as_deref().map(str::parse::<usize>) {
        None => 10,
        Some(Ok(limit)) if (1..=100).contains(&limit) => limit,
        Some(_) => return stripe_error(StatusCode::BAD_REQUEST, "limit must be 1 to 100"),
    };
    let start = match query.starting_after.as_deref() {
        None => 0,
        Some(after) => match index(after, prefix, count) {
            Some(i) => i + 1,
            None => return stripe_error(StatusCode::BAD_REQUEST, "no such object"),
        },
    };
    let end = (start + limit).min(count);
    let data: Vec<Value> = (start..end).map(|i| make(fake, i)).collect();
    let body = json!({"object": "list", "data": data, "has_more": end < count, "url": url});
    (
        StatusCode::OK,
        [("content-type", "application/json")],
        body.to_string(),
    )
        .into_response()
}

async fn products(
    State(fake): State<Arc<Fake>>,
    headers: HeaderMap,
    Query(query): Query<ListQuery>,
) -> Response {
    let list = ("/v1/products", "prod_B", fake.products);
    page(&fake, &headers, &query, list, Fake::product)
}

async fn prices(
    State(fake): State<Arc<Fake>>,
    headers: HeaderMap,
    Query(query): Query<ListQuery>,
) -> Response {
    let list = ("/v1/prices", "price_B", fake.products * 3);
    page(&fake, &headers, &query, list, Fake::price)
}

async fn list_events(
    State(fake): State<Arc<Fake>>,
    headers: HeaderMap,
    Query(query): Query<ListQuery>,
) -> Response {
    let list = ("/v1/events", "evt_B", fake.events_since(query.created_gte));
    page(&fake, &headers, &query, list, Fake::event)
}

async fn balance(State(fake): State<Arc<Fake>>, headers: HeaderMap) -> Response {
    if !fake.authorized(&headers) {
        return stripe_error(StatusCode::UNAUTHORIZED, "invalid API key");
    }
    axum::Json(json!({"object": "balance", "available": [], "pending": [], "livemode": false}))
        .into_response()
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let usage = "usage: fake_stripe PORT N FIXTURES_JSON SECRET_KEY [E]";
    let port: u16 = args.next().context(usage)?.parse().context("PORT")?;
    let count: usize = args.next().context(usage)?.parse().context("N")?;
    let fixtures_path = args.next().context(usage)?;
    let key = args.next().context(usage)?;
    let events: usize = match args.next() {
        Some(events) => events.parse().context("E")?,
        None => 0,
    };
    let fixtures: Value = serde_json::from_slice(
        &std::fs::read(&fixtures_path).with_context(|| format!("reading {fixtures_path}"))?,
    )
    .context("fixtures are not JSON")?;
    let fake = Arc::new(Fake {
        products: count,
        product: fixtures["resources"]["product"].clone(),
        price: fixtures["resources"]["price"].clone(),
        event: fixtures["resources"]["event"].clone(),
        events,
        newest: i64::try_from(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_secs(),
        )?,
        key,
    });
    anyhow::ensure!(
        fake.product.is_object() && fake.price.is_object() && fake.event.is_object(),
        "no product, price or event in the fixtures"
    );
    let app = Router::new()
        .route("/v1/products", get(products))
        .route("/v1/prices", get(prices))
        .route("/v1/events", get(list_events))
        .route("/v1/balance", get(balance))
        .with_state(fake);
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .with_context(|| format!("binding 127.0.0.1:{port}"))?;
    eprintln!(
        "fake Stripe on 127.0.0.1:{port}: {count} products, {} prices, {events} events",
        count * 3
    );
    axum::serve(listener, app).await?;
    Ok(())
}
