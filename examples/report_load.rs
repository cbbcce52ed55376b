//! The legacy-usage report over a month of hourly rows, for BENCHMARKS.md ("Legacy-usage report
//! over 30 days").
//!
//! `cargo run --release --example report_load -- DATABASE_URL [DAYS [CALLERS [RUNS]]]`
//!
//! Seeds DATABASE_URL (migrated first; SQLite or PostgreSQL) with DAYS (default 31) days of
//! hours ending 2026-12-01 09:00 UTC, each hour with CALLERS (default 120) caller rows (legacy
//! anon_key, service_role_key and user_session callers, unverified legacy keys, an API key;
//! three routes, a client each) and three key rows; a database that already holds that last
//! hour is taken as seeded and left as it is, so one seeding serves several builds. Then reads
//! the report over a 30-day window at 09:30 as `edgegate keys report` reads it from the
//! database (`commands::report::from_database`), RUNS times (default 7), and prints one line:
//! `RESULT caller_rows_in_window=… runs=… median_ms=… min_ms=… max_ms=…`.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use edgegate::Config;
use edgegate::commands::report::from_database;
use edgegate::store::{CallerUsage, KeyUsage, Store};

/// 2026-12-01 09:30 UTC: the report's now.
const NOW_MS: i64 = 1_796_117_400_000;
const HOUR_MS: i64 = 3_600_000;
const WINDOW: Duration = Duration::from_secs(30 * 86_400);
const ROUTES: [&str; 3] = [
    "/functions/v1/jwt-test",
    "/functions/v1/sync-stripe-products-hardened",
    "/functions/v1/send-sms",
];

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let url = args.first().context(
        "usage: report_load DATABASE_URL [DAYS [CALLERS [RUNS]]] (see the file's header)",
    )?;
    let number = |at: usize, default: i64| -> anyhow::Result<i64> {
        args.get(at)
            .map_or(Ok(default), |text| text.parse())
            .with_context(|| format!("argument {at} must be a number"))
    };
    let (days, callers, runs) = (number(1, 31)?, number(2, 120)?, number(3, 7)?);
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(measure(url, days, callers, runs))
}

async fn measure(url: &str, days: i64, callers: i64, runs: i64) -> anyhow::Result<()> {
    let config = Config::from_lookup(|name| match name {
        "DATABASE_URL" => Some(url.to_owned()),
        "LEGACY_REVOCATION_WINDOW_SECONDS" => Some(WINDOW.as_secs().to_string()),
        _ => None,
    })?;
    let store = Store::connect(&config.database_url).await?;
    store.migrate().await?;
    let last_hour = NOW_MS - NOW_MS % HOUR_MS;
    if store.key_usage_hours_since(last_hour).await?.is_empty() {
        let started = Instant::now();
        // A day of hours a call: each call is one transaction.
        for day in 0..days {
            let (mut keys, mut rows) = (Vec::new(), Vec::new());
            for hour_of_day in 0..24 {
                let hour = last_hour - (day * 24 + hour_of_day) * HOUR_MS;
                keys.extend(hour_keys(hour));
                rows.extend((0..callers).map(|caller| caller_row(hour, caller)));
            }
            store.add_key_usage(&keys).await?;
            store.add_caller_usage(&rows).await?;
        }
        eprintln!(
            "seeded {} caller rows in {:.1} s",
            days * 24 * callers,
            started.elapsed().as_secs_f64()
        );
    }
    // The rows of the window's hours (its first hour straddles its start).
    let first_hour = edgegate::auth::legacy_report::first_hour(WINDOW, NOW_MS);
    let in_window = store.caller_usage_hours_since(first_hour).await?.len();
    store.close().await;

    let mut times = Vec::new();
    for _ in 0..runs {
        let started = Instant::now();
        let view = from_database(&config, None, NOW_MS).await?;
        times.push(started.elapsed().as_secs_f64() * 1000.0);
        anyhow::ensure!(!view.legacy_usage.is_empty(), "the report found no caller");
    }
    times.sort_by(f64::total_cmp);
    println!(
        "RESULT caller_rows_in_window={in_window} runs={runs} median_ms={:.1} min_ms={:.1} \
         max_ms={:.1}",
        times[times.len() / 2],
        times[0],
        times[times.len() - 1]
    );
    Ok(())
}

/// Caller `index` of the hour starting at `hour`: mostly legacy callers, some unverified legacy
/// keys and API-key callers, each with its own client on one of three routes.
fn caller_row(hour: i64, index: i64) -> CallerUsage {
    let (source, kind) = match index % 10 {
        0..=3 => ("legacy_secret", "anon_key"),
        4 | 5 => ("legacy_secret", "service_role_key"),
        6 | 7 => ("legacy_secret", "user_session"),
        8 => ("legacy_secret", "anon_key_unverified"),
        _ => ("api_key", "secret:backend"),
    };
    CallerUsage {
        hour_start_ms: hour,
        source: source.to_owned(),
        kind: kind.to_owned(),
        route: ROUTES[usize::try_from(index % 3).unwrap_or(0)].to_owned(),
        client: format!("client-{index}/1.0"),
        verified_count: 1 + (index * 7 + hour / HOUR_MS) % 50,
        last_verified_at_ms: hour + (index * 29 % 3600) * 1000,
    }
}

fn hour_keys(hour: i64) -> [KeyUsage; 3] {
    let key = |source: &str, kid: &str, alg: &str, count: i64| KeyUsage {
        hour_start_ms: hour,
        source: source.to_owned(),
        kid: kid.to_owned(),
        alg: alg.to_owned(),
        verified_count: count,
        last_verified_at_ms: hour + 3_599_000,
    };
    [
        key("legacy_secret", "", "HS256", 900),
        key("signing_key", "2b9f0c1e", "ES256", 4_000),
        key("api_key", "secret:backend", "opaque", 120),
    ]
}
