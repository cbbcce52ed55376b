//! `edgegate keys report`: who still uses which key, as a terminal table with an hourly bar per
//! key and legacy kind, read from a running edgegate (`--url`, with `EDGEGATE_SECRET_KEY`) or
//! straight from the database.

use std::fmt::Write as _;
use std::time::Duration;

use anyhow::Context as _;
use secrecy::{ExposeSecret as _, SecretString};

use crate::auth::legacy_report::{
    self, CallerRow, ReportView, Series, WithoutCaller, thousands, utc,
};
use crate::auth::usage::legacy_verdict;
use crate::config::Config;
use crate::store::Store;

/// Longest window the report covers (the revocation window's own limit).
pub const MAX_WINDOW: Duration = Duration::from_secs(2_592_000);
/// The most of the server's answer that is read: a report of the longest window with many
/// callers is far smaller, and a larger answer is not one.
const MAX_ANSWER_BYTES: usize = 16 * 1024 * 1024;

/// `--window`: `24h`, `90m`, `7d` or seconds, from one second to 30 days.
pub fn parse_window(text: &str) -> Result<Duration, String> {
    let window = super::token::parse_span(text)?;
    if window.is_zero() || window > MAX_WINDOW {
        return Err("must be between 1 second and 30 days (30d)".to_owned());
    }
    Ok(window)
}

/// The report as a running edgegate answers it (`GET /admin/signing-keys` under `base`, a URL
/// [`crate::config::report_url`] accepted: a path in it, a proxy's prefix, is kept).
pub async fn from_api(
    base: &url::Url,
    secret_key: &SecretString,
    window: Option<Duration>,
) -> anyhow::Result<ReportView> {
    let mut endpoint = base.clone();
    endpoint.set_path(&format!(
        "{}/admin/signing-keys",
        base.path().trim_end_matches('/')
    ));
    if let Some(window) = window {
        endpoint
            .query_pairs_mut()
            .append_pair("window_seconds", &window.as_secs().to_string());
    }
    // No redirect: the report comes from `--url` itself, and the key goes nowhere else (nor
    // to a proxy when `--url` is on loopback).
    let client = crate::outbound::build(|| {
        crate::outbound::client_builder(Some("keys report"), &[base])
            .timeout(Duration::from_secs(30))
    });
    // Every message shows the endpoint without its query and fragment, where `--url` may carry
    // a key (`?apikey=sb_secret_…`), and reqwest's errors without their URL.
    let shown = crate::config::shown_url(&endpoint);
    let response = client
        .get(endpoint)
        .header("apikey", secret_key.expose_secret())
        .send()
        .await
        .map_err(reqwest::Error::without_url)
        .with_context(|| format!("{shown} did not answer"))?;
    let status = response.status();
    if status.is_redirection() {
        let location = response
            .headers()
            .get(reqwest::header::LOCATION)
            .and_then(|value| value.to_str().ok())
            .unwrap_or("nowhere");
        anyhow::bail!(
            "{shown} answered {status} to {}: redirects are not followed (the secret key \
             would go with them); give --url the address that answers",
            super::one_line(location)
        );
    }
    let body = crate::outbound::read_capped(response, MAX_ANSWER_BYTES).await;
    if !status.is_success() {
        let body: serde_json::Value = body
            .ok()
            .and_then(|body| serde_json::from_slice(&body).ok())
            .unwrap_or_default();
        // Printed to the operator's terminal: escaped as the report's cells are.
        anyhow::bail!(
            "{shown} answered {status}: {} {}",
            super::one_line(body["code"].as_str().unwrap_or("?")),
            super::one_line(body["message"].as_str().unwrap_or(""))
        );
    }
    let body = body.with_context(|| format!("{shown} did not answer with the report"))?;
    serde_json::from_slice(&body).with_context(|| format!("{shown} did not answer with the report"))
}

/// The report from the database alone: every instance's flushed counts (not what an instance
/// counted in its last minute), and the verdict from them alone: whether the servers still hold
/// the legacy secret is not known here (this process's own environment says nothing of theirs).
pub async fn from_database(
    config: &Config,
    window: Option<Duration>,
    now_ms: i64,
) -> anyhow::Result<ReportView> {
    super::absent_sqlite_database(&config.database_url)?;
    let store = Store::connect(&config.database_url).await?;
    let revocation_window = config.jwt.legacy_revocation_window;
    let usage_window = window.unwrap_or(revocation_window);
    let read = async {
        let evidence_since = store.usage_evidence_since().await?;
        let dropped = legacy_report::stored_dropped(&store).await?;
        let (keys, callers) =
            legacy_report::stored_rows(&store, revocation_window, usage_window, now_ms).await?;
        anyhow::Ok((evidence_since, dropped, keys, callers))
    };
    let read = read.await;
    store.close().await;
    let (evidence_since, dropped, keys, callers) =
        read.context("reading usage (has `edgegate migrate` run on this database?)")?;
    // The verdict takes the report's own rows of the revocation window, so it never contradicts
    // a count the report shows.
    let verdict = legacy_verdict(
        true,
        &legacy_report::window_rows(&keys, revocation_window, now_ms),
        evidence_since,
        dropped,
        revocation_window,
        now_ms,
    );
    Ok(legacy_report::view(&keys, &callers, verdict, dropped))
}

/// The most columns a usage bar takes: a day of hours; a longer window is drawn with several
/// hours to a column (30 days: one column a day), not 720 columns no terminal shows.
const MAX_BAR_COLUMNS: usize = 48;

/// Hours to a bar's column: the fewest of 1, 2, 3, 4, 6, 8, 12 or 24 (so columns start at the
/// same hours each day) that draw `hours` in at most [`MAX_BAR_COLUMNS`].
fn hours_per_column(hours: usize) -> usize {
    [1, 2, 3, 4, 6, 8, 12, 24]
        .into_iter()
        .find(|&step| hours.div_ceil(step) <= MAX_BAR_COLUMNS)
        .unwrap_or(24)
}

/// One character per `step` hours, scaled to the row's busiest column; `·` for none. A column
/// is drawn by its use an hour, so the last one, still filling (one hour of 24 in a 30-day
/// window), is not drawn as if its use had nearly stopped.
fn bar(hourly: &[i64], step: usize) -> String {
    const LEVELS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];
    let step = step.max(1);
    let columns: Vec<i64> = hourly
        .chunks(step)
        .map(|hours| {
            let sum: i64 = hours.iter().sum();
            let hours = i64::try_from(hours.len()).unwrap_or(1);
            // Scaled to a whole column's hours, rounded up so any use still shows.
            (sum.saturating_mul(i64::try_from(step).unwrap_or(1)) + hours - 1) / hours
        })
        .collect();
    let most = columns.iter().copied().max().unwrap_or(0);
    columns
        .iter()
        .map(|&count| {
            if count <= 0 || most <= 0 {
                '·'
            } else {
                // Rounded up, so any use shows at least the lowest block.
                let level = (count * 8 + most - 1) / most;
                LEVELS[usize::try_from(level.clamp(1, 8) - 1).unwrap_or(0)]
            }
        })
        .collect()
}

/// Rows of cells, each column padded to its widest cell; `numeric` columns right-aligned. A cell
/// may be what a server answered (a client's name, a kid): its control characters are written
/// out ([`super::one_line`]), so it can neither move the cursor nor print a line of its own.
fn table(out: &mut String, header: &[&str], rows: &[Vec<String>], numeric: &[usize]) {
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|row| row.iter().map(|cell| super::one_line(cell)).collect())
        .collect();
    let mut widths: Vec<usize> = header.iter().map(|cell| cell.chars().count()).collect();
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let header: Vec<String> = header.iter().map(|cell| (*cell).to_owned()).collect();
    for row in std::iter::once(&header).chain(&rows) {
        let mut line = String::new();
        for (at, (cell, width)) in row.iter().zip(&widths).enumerate() {
            if at > 0 {
                line.push_str("  ");
            }
            let pad = " ".repeat(width - cell.chars().count());
            if numeric.contains(&at) {
                line.push_str(&pad);
                line.push_str(cell);
            } else {
                line.push_str(cell);
                if at + 1 < row.len() {
                    line.push_str(&pad);
                }
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
}

fn key_name(series: &Series) -> String {
    match series.source.as_str() {
        "legacy_secret" => "legacy secret (HS256)".to_owned(),
        "api_key" => api_key_name(&series.key),
        _ => format!("signing key {} ({})", series.key, series.alg),
    }
}

/// An API key as the report names it: `api key secret:NAME` or `api key publishable:NAME`, as
/// metrics and the API do. Rows an earlier release stored under the bare name hold the
/// publishable and the secret key of that name together, and say so.
fn api_key_name(id: &str) -> String {
    match crate::auth::parse_api_key_id(id) {
        (Some(_), _) => format!("api key {id}"),
        (None, name) => format!("api key {name} (secret or publishable)"),
    }
}

fn last_seen(ms: i64) -> String {
    if ms > 0 { utc(ms) } else { "-".to_owned() }
}

fn caller_cells(kind: String, row: &CallerRow) -> Vec<String> {
    vec![
        kind,
        row.route.clone(),
        row.client.clone(),
        thousands(row.count),
        last_seen(row.last_seen),
    ]
}

/// The client cell of the legacy verifications no caller row accounts for.
const NO_CALLER_RECORDED: &str = "(no caller recorded)";

/// The callers row of the legacy verifications no caller row accounts for: no kind, route or
/// client is known.
fn without_caller_cells(without: &WithoutCaller) -> Vec<String> {
    vec![
        "-".to_owned(),
        "-".to_owned(),
        NO_CALLER_RECORDED.to_owned(),
        thousands(without.count),
        last_seen(without.last_seen),
    ]
}

/// The report as text: the keys with hourly bars, the callers, the verdict.
pub fn render(view: &ReportView, now_ms: i64) -> String {
    let window = Duration::from_secs(view.usage_window_seconds);
    let hours = view
        .usage_hourly
        .series
        .iter()
        .map(|series| series.hourly.len())
        .max()
        .unwrap_or(0);
    let step = hours_per_column(hours);
    let (column, per) = if step == 1 {
        ("HOURLY".to_owned(), "hour".to_owned())
    } else {
        (format!("PER {step} H"), format!("{step} hours"))
    };
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Key usage over the last {} ({} to {} UTC); {column} has one column per {per} from {} UTC, oldest first",
        crate::auth::usage::humanize(window),
        utc(now_ms - i64::try_from(window.as_millis()).unwrap_or(0)),
        utc(now_ms),
        utc(view.usage_hourly.first_hour_ms),
    );
    if let Some(hour) = view.usage_straddling_hour_ms {
        let _ = writeln!(
            out,
            "Counted by the hour: the hour from {} UTC was used in the window and counts whole, its \
             use before the window's start included; an hour last used before it is left out.",
            utc(hour),
        );
    }
    out.push('\n');
    if view.usage_hourly.series.is_empty() {
        out.push_str("No verification recorded in the window.\n");
    } else {
        let rows: Vec<Vec<String>> = view
            .usage_hourly
            .series
            .iter()
            .map(|series| {
                vec![
                    key_name(series),
                    series.kind.clone().unwrap_or_else(|| "all".to_owned()),
                    thousands(series.count),
                    last_seen(series.last_seen),
                    bar(&series.hourly, step),
                ]
            })
            .collect();
        table(
            &mut out,
            &["KEY", "KIND", "COUNT", "LAST SEEN", &column],
            &rows,
            &[2],
        );
    }
    out.push('\n');
    // The legacy verifications with no caller recorded take their place by count among the
    // legacy callers.
    let mut legacy: Vec<(i64, Vec<String>)> = view
        .legacy_usage
        .iter()
        .map(|row| (row.count, caller_cells(row.kind.clone(), row)))
        .collect();
    if let Some(without) = &view.legacy_usage_without_caller {
        let at = legacy
            .iter()
            .position(|(count, _)| *count < without.count)
            .unwrap_or(legacy.len());
        legacy.insert(at, (without.count, without_caller_cells(without)));
    }
    let callers: Vec<Vec<String>> = legacy
        .into_iter()
        .map(|(_, cells)| cells)
        .chain(
            view.unverified_legacy_usage
                .iter()
                .map(|row| caller_cells(row.kind.clone(), row)),
        )
        .chain(
            view.api_key_usage
                .iter()
                .map(|row| caller_cells(api_key_name(&row.kind), row)),
        )
        .collect();
    if view.legacy_usage.is_empty() && view.legacy_usage_without_caller.is_none() {
        out.push_str("No legacy caller in the window.\n");
    }
    if !callers.is_empty() {
        out.push_str("Callers, legacy first, most used first:\n");
        table(
            &mut out,
            &["KIND", "ROUTE", "CLIENT", "COUNT", "LAST SEEN"],
            &callers,
            &[3],
        );
    }
    if view.legacy_usage_without_caller.is_some() {
        let _ = writeln!(
            out,
            "{NO_CALLER_RECORDED}: legacy verifications counted with no caller, by an edgegate from \
             before caller counts (before 2026-12-01), or by a later one from before 2026-12-07 \
             whose caller write failed after its key counts were written, or left out of the \
             per-caller counts in a long database outage (edgegate_caller_usage_dropped_total), \
             or, rarely, counted just as a flush began, or by one from before 2026-12-08 just as \
             an hour ended; their last use is that of the hours holding them."
        );
    }
    out.push('\n');
    if let Some(dropped) = view.evidence_dropped {
        let _ = writeln!(
            out,
            "Left out of the evidence (buffer full while the database was away): {} verification{}, the last at {} UTC.",
            thousands(dropped.count),
            if dropped.count == 1 { "" } else { "s" },
            utc(dropped.last_dropped_at_ms),
        );
    }
    let _ = writeln!(
        out,
        "Revoking the legacy secret: {}. {}",
        if view.legacy_revocation_safe {
            "safe"
        } else {
            "NOT SAFE"
        },
        super::one_line(&view.reason)
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_dates_are_civil_dates() {
        assert_eq!(utc(0), "1970-01-01 00:00");
        assert_eq!(utc(951_782_400_000), "2000-02-29 00:00");
        assert_eq!(utc(1_764_581_400_000), "2025-12-01 09:30");
        assert_eq!(utc(1_798_761_599_000), "2026-12-31 23:59");
    }

    #[test]
    fn bars_scale_to_the_busiest_hour_and_show_any_use() {
        assert_eq!(bar(&[0, 1, 4, 8, 1000], 1), "·▁▁▁█");
        assert_eq!(bar(&[0, 0], 1), "··");
        assert_eq!(bar(&[2, 4, 6, 8], 1), "▂▄▆█");
        // Two hours to a column: each column its use an hour, a short last one too.
        assert_eq!(bar(&[1, 1, 0, 0, 4, 4, 3], 2), "▂·█▆");
        assert_eq!(bar(&[1, 1, 1, 1, 2], 2), "▄▄█");
    }

    /// 30 days are drawn a column a day (31 with the hour now running), not 721 columns.
    #[test]
    fn long_windows_take_several_hours_to_a_column() {
        let cases = [(0, 1), (25, 1), (48, 1), (49, 2), (169, 4), (721, 24)];
        for (hours, step) in cases {
            assert_eq!(hours_per_column(hours), step, "{hours} hours");
        }
        let month = vec![1; 721];
        assert_eq!(
            bar(&month, hours_per_column(month.len())).chars().count(),
            31
        );
    }

    #[test]
    fn windows_are_at_most_thirty_days() {
        assert_eq!(parse_window("24h"), Ok(Duration::from_secs(86_400)));
        assert_eq!(parse_window("30d"), Ok(MAX_WINDOW));
        // The window's own bounds, not those of token mint --ttl, which parses the same units.
        let bounds = Err("must be between 1 second and 30 days (30d)".to_owned());
        assert_eq!(parse_window("31d"), bounds);
        assert_eq!(parse_window("0"), bounds);
    }
}
