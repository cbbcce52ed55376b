//! Stripe webhook deliveries for `bench/stripe.sh`, and a load client that sends each of them once.
//!
//! `webhook_load generate FILE FIXTURES_JSON WHSEC K DUP_PERCENT` writes K distinct events plus
//! K*DUP_PERCENT/100 re-sends of earlier ones (interleaved: after every `100/DUP_PERCENT`-th
//! event, one event already written comes again), one delivery a line: `Stripe-Signature`, a
//! tab, the body. Event `i` (`evt_W0000000`…) is, by `i % 3`, a `product.updated` of product
//! `prod_W<i>`, a `price.updated` of price `price_W<i>` or an `invoice.paid` of invoice
//! `in_W<i>`, shaped from Stripe's example `event`, `product`, `price` and `invoice` of the
//! fixtures. Every delivery is signed now with `edgegate::stripe::signature::sign` (edgegate
//! refuses signatures older than 300 s, so send soon after).
//!
//! `webhook_load send FILE URL CONCURRENCY` posts every line of FILE once, in order, with at
//! most CONCURRENCY requests in flight, and prints one line:
//! `RESULT requests=… duration_us=… p50_us=… p99_us=… ok=… duplicates=… failed=…`.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use edgegate::stripe::signature::sign;
use serde_json::{Value, json};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["generate", file, fixtures, secret, k, dup] => generate(
            Path::new(file),
            Path::new(fixtures),
            secret,
            k.parse().context("K")?,
            dup.parse().context("DUP_PERCENT")?,
        ),
        ["send", file, url, concurrency] => {
            let concurrency: usize = concurrency.parse().context("CONCURRENCY")?;
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
                .block_on(send(Path::new(file), url, concurrency.max(1)))
        }
        _ => anyhow::bail!(
            "usage: webhook_load generate FILE FIXTURES_JSON WHSEC K DUP_PERCENT\n       \
             webhook_load send FILE URL CONCURRENCY"
        ),
    }
}

fn event_body(fixtures: &Value, i: usize, created: i64) -> String {
    let resources = &fixtures["resources"];
    let (kind, object) = match i % 3 {
        0 => {
            let mut product = resources["product"].clone();
            product["id"] = json!(format!("prod_W{i:07}"));
            product["name"] = json!(format!("Webhook product {i}"));
            product["default_price"] = Value::Null;
            ("product.updated", product)
        }
        1 => {
            let mut price = resources["price"].clone();
            price["id"] = json!(format!("price_W{i:07}"));
            price["product"] = json!(format!("prod_W{:07}", i - 1));
            price["unit_amount"] = json!(100 + i);
            ("price.updated", price)
        }
        _ => {
            let mut invoice = resources["invoice"].clone();
            invoice["id"] = json!(format!("in_W{i:07}"));
            invoice["customer"] = json!(format!("cus_W{:04}", i % 1000));
            ("invoice.paid", invoice)
        }
    };
    let mut event = resources["event"].clone();
    event["id"] = json!(format!("evt_W{i:07}"));
    event["type"] = json!(kind);
    event["created"] = json!(created);
    event["data"] = json!({ "object": object });
    event.to_string()
}

fn generate(
    file: &Path,
    fixtures: &Path,
    secret: &str,
    k: usize,
    dup_percent: usize,
) -> anyhow::Result<()> {
    let fixtures: Value = serde_json::from_slice(
        &std::fs::read(fixtures).with_context(|| format!("reading {}", fixtures.display()))?,
    )?;
    let now = i64::try_from(SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs())?;
    let every = 100usize
        .checked_div(dup_percent)
        .map_or(usize::MAX, |n| n.max(1));
    let mut bodies: Vec<String> = Vec::with_capacity(k);
    let mut out = String::new();
    let mut duplicates = 0;
    let mut line = |body: &str| {
        out.push_str(&sign(body.as_bytes(), secret, now));
        out.push('\t');
        out.push_str(body);
        out.push('\n');
    };
    for i in 0..k {
        // Events created in the last hour, in order.
        let created = now - 3600 + i64::try_from(i * 3600 / k.max(1))?;
        bodies.push(event_body(&fixtures, i, created));
        line(&bodies[i]);
        if (i + 1) % every == 0 {
            // A re-send of an earlier event: one of the last 500, spread by a fixed stride.
            let back = (i * 7919) % (i + 1).min(500);
            line(&bodies[i - back]);
            duplicates += 1;
        }
    }
    std::fs::write(file, out).with_context(|| format!("writing {}", file.display()))?;
    eprintln!(
        "{k} events and {duplicates} duplicates written to {}",
        file.display()
    );
    Ok(())
}

/// What one delivery got.
#[derive(Clone, Copy, Default)]
struct Outcome {
    latency_us: u64,
    ok: bool,
    duplicate: bool,
}

async fn send(file: &Path, url: &str, concurrency: usize) -> anyhow::Result<()> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let deliveries: Arc<Vec<(String, String)>> = Arc::new(
        text.lines()
            .filter(|line| !line.is_empty())
            .map(|line| {
                let (signature, body) = line.split_once('\t').context("no tab in a line")?;
                Ok((signature.to_owned(), body.to_owned()))
            })
            .collect::<anyhow::Result<_>>()?,
    );
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .pool_max_idle_per_host(concurrency)
        .build()?;
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut workers = Vec::with_capacity(concurrency);
    for _ in 0..concurrency {
        let (client, deliveries, next, url) = (
            client.clone(),
            deliveries.clone(),
            next.clone(),
            url.to_owned(),
        );
        workers.push(tokio::spawn(async move {
            let mut outcomes = Vec::new();
            loop {
                let index = next.fetch_add(1, Ordering::Relaxed);
                let Some((signature, body)) = deliveries.get(index) else {
                    break;
                };
                let sent = Instant::now();
                let answer = client
                    .post(&url)
                    .header("content-type", "application/json")
                    .header("stripe-signature", signature)
                    .body(body.clone())
                    .send()
                    .await;
                let mut outcome = Outcome::default();
                if let Ok(response) = answer {
                    let ok = response.status().is_success();
                    let text = response.text().await.unwrap_or_default();
                    outcome.ok = ok;
                    outcome.duplicate = ok && text.contains("\"duplicate\":true");
                    if !ok {
                        eprintln!("delivery {index}: {text}");
                    }
                }
                outcome.latency_us = u64::try_from(sent.elapsed().as_micros()).unwrap_or(u64::MAX);
                outcomes.push(outcome);
            }
            outcomes
        }));
    }
    let mut outcomes = Vec::with_capacity(deliveries.len());
    for worker in workers {
        outcomes.extend(worker.await?);
    }
    let duration = started.elapsed();
    let mut latencies: Vec<u64> = outcomes.iter().map(|o| o.latency_us).collect();
    latencies.sort_unstable();
    let percentile = |p: usize| {
        latencies
            .get((latencies.len() * p / 100).min(latencies.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0)
    };
    let ok = outcomes.iter().filter(|o| o.ok).count();
    println!(
        "RESULT requests={} duration_us={} p50_us={} p99_us={} ok={ok} duplicates={} failed={}",
        outcomes.len(),
        duration.as_micros(),
        percentile(50),
        percentile(99),
        outcomes.iter().filter(|o| o.duplicate).count(),
        outcomes.len() - ok,
    );
    Ok(())
}
