//! Who still uses which key, over a window: the callers of the legacy secret (by kind, route and
//! client) and of each API key, each kind's last use, and hourly series per key and kind. Built
//! from hourly rows (the database's, the callers' summed there, plus an instance's unflushed
//! ones), so `GET /admin/signing-keys` and `edgegate keys report` show the same numbers.
//!
//! Counts are kept by the hour, each hour's row with its last use, so a window that does not
//! start on the hour cannot be cut exactly. Every number of an answer (totals, series, callers,
//! per-key counts, the verdict) takes the same rows ([`counts_in`]): an hour whose last use is
//! before the window's start holds no use inside it and is left out; an hour used inside the
//! window counts whole, its use before the start with it, and the answer names that hour
//! (`usage_straddling_hour_ms`). So no use inside the window is ever left out (revoking is never
//! called safe past one), and what comes from before the window is said.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::auth::callers::{LegacyKind, OTHER};
use crate::auth::jwks::JwksStatus;
use crate::auth::keys::KeyOrigin;
use crate::auth::usage::{DroppedUsage, LegacyVerdict, UsageTracker, humanize, legacy_verdict};
use crate::auth::{ApiKeyType, Authenticator, KeySource, parse_api_key_id};
use crate::clock::Clock;
use crate::store::{CallerSums, CallerUsage, KeyUsage, Store};

const HOUR_MS: i64 = 3_600_000;

/// One caller over the window: `kind` is a legacy kind, or the API key's id (`secret:NAME`,
/// `publishable:NAME`; the bare name in rows an earlier release stored).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CallerRow {
    pub kind: String,
    pub route: String,
    pub client: String,
    pub count: i64,
    /// Epoch milliseconds.
    pub last_seen: i64,
}

/// Legacy verifications over the window that the key counts hold and no caller row does: counted
/// with no caller by an edgegate from before caller counts (before 2026-12-01), or by a later
/// one from before 2026-12-07 (it wrote the callers in a transaction of their own, after the key
/// counts) whose caller write failed (the callers lost at a stop, or written at a retry, seconds
/// later), or left out of the per-caller counts in a long database outage
/// (`edgegate_caller_usage_dropped_total`), or, rarely, counted just as a flush began (its key in
/// that flush, its caller in the next, up to a minute later), or by one from before 2026-12-08
/// just as an hour ended (its key counted in that hour, its caller in the next). Their kind,
/// route and client are not known, so they are no `legacy_usage` row.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct WithoutCaller {
    pub count: i64,
    /// Epoch milliseconds: the latest last use of the hours holding them (each was no later).
    pub last_seen: i64,
}

/// One legacy kind over the window.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct KindUse {
    pub kind: String,
    pub count: i64,
    /// Epoch milliseconds; `None` when not seen in the window.
    pub last_seen: Option<i64>,
}

/// Verifications of one key (or one legacy kind) per hour, oldest first.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Series {
    /// `legacy_secret`, `signing_key` or `api_key`.
    pub source: String,
    /// The kid, the API key's id (`secret:NAME`, `publishable:NAME`; the bare name in rows an
    /// earlier release stored), or empty for the legacy secret.
    pub key: String,
    pub alg: String,
    /// For the legacy secret's rows per kind; `None` for a key's total.
    pub kind: Option<String>,
    pub count: i64,
    pub last_seen: i64,
    pub hourly: Vec<i64>,
}

/// The hourly series over the window: column `i` is the hour starting at
/// `first_hour_ms + i * 3600000`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Hourly {
    pub first_hour_ms: i64,
    pub series: Vec<Series>,
}

/// Everything the report shows about usage over one window.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Usage {
    /// The start of the hour holding the window's start, when that hour was used inside the
    /// window and so counts whole (see the module's note).
    pub straddling_hour_ms: Option<i64>,
    /// Legacy callers, most used first.
    pub legacy_usage: Vec<CallerRow>,
    /// Legacy verifications no caller row accounts for; `None` when every one has its caller.
    pub legacy_usage_without_caller: Option<WithoutCaller>,
    /// Legacy API keys sent beside the credential that let a request in while no legacy secret
    /// could verify them (kind `anon_key_unverified`, `service_role_key_unverified`), most used
    /// first: evidence, not verifications.
    pub unverified_legacy_usage: Vec<CallerRow>,
    /// API-key callers (kind: the key's id, `secret:NAME` or `publishable:NAME`), most used first.
    pub api_key_usage: Vec<CallerRow>,
    /// Each legacy kind, in a fixed order.
    pub legacy_kinds: Vec<KindUse>,
    pub hourly: Hourly,
}

/// What `edgegate keys report` shows; `GET /admin/signing-keys` carries the same fields.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReportView {
    /// The span of the usage below (the revocation window unless asked otherwise).
    pub usage_window_seconds: u64,
    /// Set when the hour holding the usage window's start was used inside the window: counts
    /// are kept by the hour, so that hour counts whole in every number of the usage below, its
    /// use from before the window's start included; this is its start (epoch ms). `None` when
    /// every count is inside the window, and from an edgegate from before it was reported.
    #[serde(default)]
    pub usage_straddling_hour_ms: Option<i64>,
    /// The verdict, always over the revocation window.
    pub legacy_revocation_safe: bool,
    pub reason: String,
    /// Verifications left out of the evidence because an instance's buffer was full; the
    /// verdict is not safe while the last of them is inside the revocation window. Absent from
    /// the answer of an edgegate from before it was reported.
    #[serde(default)]
    pub evidence_dropped: Option<DroppedUsage>,
    pub legacy_usage: Vec<CallerRow>,
    /// As [`Usage::legacy_usage_without_caller`]. Absent from the answer of an edgegate from
    /// before it was reported.
    #[serde(default)]
    pub legacy_usage_without_caller: Option<WithoutCaller>,
    /// As [`Usage::unverified_legacy_usage`]. Absent from the answer of an edgegate from before
    /// it was reported.
    #[serde(default)]
    pub unverified_legacy_usage: Vec<CallerRow>,
    pub api_key_usage: Vec<CallerRow>,
    pub legacy_kinds: Vec<KindUse>,
    pub usage_hourly: Hourly,
}

/// The callers of a report's two windows ending at one instant, each window's summed in the
/// database ([`Store::caller_usage_summed`]) with an instance's unflushed rows added.
#[derive(Clone, Debug)]
pub struct ReportCallers {
    revocation_window: Duration,
    usage_window: Duration,
    now_ms: i64,
    revocation: CallerSums,
    /// `None` when the usage window is the revocation window.
    usage: Option<CallerSums>,
}

impl ReportCallers {
    /// The database's callers of the revocation window and, when it differs, of the usage window
    /// (a second statement: a flush committing between the two shows in the second alone, as one
    /// may between the key rows' read and the callers').
    async fn read(
        store: &Store,
        revocation_window: Duration,
        usage_window: Duration,
        now_ms: i64,
    ) -> anyhow::Result<Self> {
        let summed = |window| {
            store.caller_usage_summed(first_hour(window, now_ms), window_start(window, now_ms))
        };
        let revocation = summed(revocation_window).await?;
        let usage = if usage_window == revocation_window {
            None
        } else {
            Some(summed(usage_window).await?)
        };
        Ok(Self {
            revocation_window,
            usage_window,
            now_ms,
            revocation,
            usage,
        })
    }

    /// No callers (the database's could not be read).
    fn none(revocation_window: Duration, usage_window: Duration, now_ms: i64) -> Self {
        Self {
            revocation_window,
            usage_window,
            now_ms,
            revocation: CallerSums::default(),
            usage: (usage_window != revocation_window).then(CallerSums::default),
        }
    }

    /// Adds hourly rows (an instance's unflushed ones) to each window they count in.
    fn add_rows(&mut self, rows: &[CallerUsage]) {
        let now = self.now_ms;
        add_counted(&mut self.revocation, rows, self.revocation_window, now);
        if let Some(usage) = &mut self.usage {
            add_counted(usage, rows, self.usage_window, now);
        }
    }
}

/// Adds the hourly `rows` that count in the window ending at `now_ms` ([`counts_in`]) to `sums`,
/// and the others of its hours (last used before its start) to `legacy_before_start`.
fn add_counted(sums: &mut CallerSums, rows: &[CallerUsage], window: Duration, now_ms: i64) {
    let counts =
        |row: &&CallerUsage| counts_in(window, now_ms, row.hour_start_ms, row.last_verified_at_ms);
    sums.extend(rows.iter().filter(counts));
    let first = first_hour(window, now_ms);
    sums.extend_before_start(
        rows.iter()
            .filter(|row| row.hour_start_ms >= first && !counts(row)),
    );
}

/// The database's hourly key rows of the hours from the earlier window's first, and the callers
/// of both windows summed there.
pub async fn stored_rows(
    store: &Store,
    revocation_window: Duration,
    usage_window: Duration,
    now_ms: i64,
) -> anyhow::Result<(Vec<KeyUsage>, ReportCallers)> {
    let since = first_hour(revocation_window, now_ms).min(first_hour(usage_window, now_ms));
    let keys = store.key_usage_hours_since(since).await?;
    let callers = ReportCallers::read(store, revocation_window, usage_window, now_ms).await?;
    Ok((keys, callers))
}

/// The verifications every instance left out of the evidence, as the database records them.
pub async fn stored_dropped(store: &Store) -> anyhow::Result<Option<DroppedUsage>> {
    let dropped = store.dropped_usage().await?;
    Ok(dropped.map(|(count, last_dropped_at_ms)| DroppedUsage {
        count,
        last_dropped_at_ms,
    }))
}

/// The report over the usage window of `callers`, with the verdict's reason naming the top
/// legacy caller of the revocation window.
pub fn view(
    keys: &[KeyUsage],
    callers: &ReportCallers,
    verdict: LegacyVerdict,
    evidence_dropped: Option<DroppedUsage>,
) -> ReportView {
    view_naming(keys, callers, verdict, evidence_dropped, true)
}

/// As [`view`], the top legacy caller named in the reason only when `name_caller`: not when the
/// database's counts could not be read, since the reason then says only that, and a caller from
/// this instance's unflushed counts alone is not the legacy secret's use.
fn view_naming(
    keys: &[KeyUsage],
    callers: &ReportCallers,
    mut verdict: LegacyVerdict,
    evidence_dropped: Option<DroppedUsage>,
    name_caller: bool,
) -> ReportView {
    let now_ms = callers.now_ms;
    let revocation_window = callers.revocation_window;
    let revocation = summarize_sums(keys, &callers.revocation, revocation_window, now_ms);
    if name_caller {
        name_top_caller(
            &mut verdict,
            &revocation.legacy_usage,
            revocation.legacy_usage_without_caller,
            revocation_window,
        );
    }
    let usage = match &callers.usage {
        None => revocation,
        Some(sums) => summarize_sums(keys, sums, callers.usage_window, now_ms),
    };
    ReportView {
        usage_window_seconds: callers.usage_window.as_secs(),
        usage_straddling_hour_ms: usage.straddling_hour_ms,
        legacy_revocation_safe: verdict.legacy_revocation_safe,
        reason: verdict.reason,
        evidence_dropped,
        legacy_usage: usage.legacy_usage,
        legacy_usage_without_caller: usage.legacy_usage_without_caller,
        unverified_legacy_usage: usage.unverified_legacy_usage,
        api_key_usage: usage.api_key_usage,
        legacy_kinds: usage.legacy_kinds,
        usage_hourly: usage.hourly,
    }
}

fn hour_of(at_ms: i64) -> i64 {
    at_ms - at_ms.rem_euclid(HOUR_MS)
}

/// The start of the first hour that can hold usage from the window ending at `now_ms`.
pub fn first_hour(window: Duration, now_ms: i64) -> i64 {
    hour_of(window_start(window, now_ms))
}

/// When the window ending at `now_ms` starts.
fn window_start(window: Duration, now_ms: i64) -> i64 {
    now_ms.saturating_sub(i64::try_from(window.as_millis()).unwrap_or(i64::MAX))
}

/// Whether the hourly row of the hour starting at `hour_start_ms`, last used at `last_ms`,
/// counts in the window ending at `now_ms`: its last use is inside the window. The one rule of
/// every number of the report and of the verdict (see the module's note).
pub fn counts_in(window: Duration, now_ms: i64, hour_start_ms: i64, last_ms: i64) -> bool {
    hour_start_ms >= first_hour(window, now_ms) && last_ms >= window_start(window, now_ms)
}

/// The rows of `keys` that count in the window ending at `now_ms` ([`counts_in`]), one per hour
/// and key as they were read: what the verdict judges by.
pub fn window_rows(keys: &[KeyUsage], window: Duration, now_ms: i64) -> Vec<KeyUsage> {
    keys.iter()
        .filter(|row| counts_in(window, now_ms, row.hour_start_ms, row.last_verified_at_ms))
        .cloned()
        .collect()
}

fn source_rank(source: &str) -> u8 {
    match source {
        "legacy_secret" => 0,
        "signing_key" => 1,
        _ => 2,
    }
}

/// Series being summed, by (source, key, alg, kind).
struct SeriesTable {
    columns: usize,
    first: i64,
    by_id: HashMap<(String, String, String, Option<String>), Series>,
}

/// What one hourly row of either table adds to a series: its hour, count and last use.
struct HourCount {
    hour: i64,
    count: i64,
    last: i64,
}

impl From<&KeyUsage> for HourCount {
    fn from(row: &KeyUsage) -> Self {
        Self {
            hour: row.hour_start_ms,
            count: row.verified_count,
            last: row.last_verified_at_ms,
        }
    }
}

impl From<&CallerUsage> for HourCount {
    fn from(row: &CallerUsage) -> Self {
        Self {
            hour: row.hour_start_ms,
            count: row.verified_count,
            last: row.last_verified_at_ms,
        }
    }
}

impl SeriesTable {
    fn add(&mut self, source: &str, key: &str, alg: &str, kind: Option<&str>, row: HourCount) {
        let columns = self.columns;
        let id = (
            source.to_owned(),
            key.to_owned(),
            alg.to_owned(),
            kind.map(str::to_owned),
        );
        let entry = self.by_id.entry(id).or_insert_with(|| Series {
            source: source.to_owned(),
            key: key.to_owned(),
            alg: alg.to_owned(),
            kind: kind.map(str::to_owned),
            count: 0,
            last_seen: 0,
            hourly: vec![0; columns],
        });
        // Rows from an instance whose clock runs ahead land in the newest column.
        let column = usize::try_from((row.hour - self.first) / HOUR_MS)
            .unwrap_or(0)
            .min(columns - 1);
        entry.count += row.count;
        entry.last_seen = entry.last_seen.max(row.last);
        entry.hourly[column] += row.count;
    }
}

/// Sums hourly `keys` and `callers` rows (duplicates of one hour and key are added) over the
/// window ending at `now_ms`. As for the verdict, an hour's row counts when its last use is in the
/// window ([`counts_in`]).
pub fn summarize(
    keys: &[KeyUsage],
    callers: &[CallerUsage],
    window: Duration,
    now_ms: i64,
) -> Usage {
    let mut sums = CallerSums::default();
    add_counted(&mut sums, callers, window, now_ms);
    summarize_sums(keys, &sums, window, now_ms)
}

/// As [`summarize`], with the callers that count in the window already summed (or some of them:
/// duplicates of one caller, or of one kind and hour, are added).
fn summarize_sums(keys: &[KeyUsage], callers: &CallerSums, window: Duration, now_ms: i64) -> Usage {
    let first = first_hour(window, now_ms);
    let columns = usize::try_from((hour_of(now_ms) - first) / HOUR_MS + 1).unwrap_or(1);
    let start = window_start(window, now_ms);
    // Only the first hour can begin before the window does.
    let mut straddling_hour_ms = None;
    let mut note = |hour: i64| {
        if hour < start {
            straddling_hour_ms = Some(hour);
        }
    };

    let mut series = SeriesTable {
        columns,
        first,
        by_id: HashMap::new(),
    };
    // The legacy secret's key count per hour, with its last use.
    let mut legacy_per_hour: BTreeMap<i64, (i64, i64)> = BTreeMap::new();
    for row in keys
        .iter()
        .filter(|row| counts_in(window, now_ms, row.hour_start_ms, row.last_verified_at_ms))
    {
        note(row.hour_start_ms);
        series.add(&row.source, &row.kid, &row.alg, None, row.into());
        if row.source == "legacy_secret" {
            let hour = legacy_per_hour.entry(row.hour_start_ms).or_default();
            hour.0 += row.verified_count;
            hour.1 = hour.1.max(row.last_verified_at_ms);
        }
    }
    let legacy_usage_without_caller = without_caller(&legacy_per_hour, callers);

    // Verifications per hour: a legacy key beside a credential that no secret could verify
    // (`anon_key_unverified`…) is evidence of a client, listed apart, never one of them.
    for row in callers.legacy_hours.iter().filter(|row| {
        row.source == "legacy_secret"
            && LegacyKind::ALL.iter().any(|kind| kind.as_str() == row.kind)
    }) {
        series.add("legacy_secret", "", "HS256", Some(&row.kind), row.into());
    }
    let mut summed: BTreeMap<(&str, &str, &str, &str), CallerRow> = BTreeMap::new();
    for row in &callers.callers {
        note(row.hour_start_ms);
        let entry = summed
            .entry((&row.source, &row.kind, &row.route, &row.client))
            .or_insert_with(|| CallerRow {
                kind: row.kind.clone(),
                route: row.route.clone(),
                client: row.client.clone(),
                count: 0,
                last_seen: 0,
            });
        entry.count += row.verified_count;
        entry.last_seen = entry.last_seen.max(row.last_verified_at_ms);
    }
    let (mut legacy_usage, mut unverified_legacy_usage, mut api_key_usage) =
        (Vec::new(), Vec::new(), Vec::new());
    for ((source, ..), row) in summed {
        if source != "legacy_secret" {
            api_key_usage.push(row);
        } else if LegacyKind::ALL.iter().any(|kind| row.kind == kind.as_str()) {
            legacy_usage.push(row);
        } else {
            // `anon_key_unverified`, `service_role_key_unverified`: no secret verified them.
            unverified_legacy_usage.push(row);
        }
    }
    for rows in [
        &mut legacy_usage,
        &mut unverified_legacy_usage,
        &mut api_key_usage,
    ] {
        rows.sort_by(|a, b| {
            b.count
                .cmp(&a.count)
                .then_with(|| b.last_seen.cmp(&a.last_seen))
                .then_with(|| (&a.kind, &a.route, &a.client).cmp(&(&b.kind, &b.route, &b.client)))
        });
    }
    let legacy_kinds = LegacyKind::ALL
        .iter()
        .map(|kind| {
            let rows = legacy_usage.iter().filter(|row| row.kind == kind.as_str());
            KindUse {
                kind: kind.as_str().to_owned(),
                count: rows.clone().map(|row| row.count).sum(),
                last_seen: rows.map(|row| row.last_seen).max(),
            }
        })
        .collect();
    let mut series: Vec<Series> = series.by_id.into_values().collect();
    // The legacy secret first (its total, then each kind), then signing keys and API keys, the
    // most used first.
    series.sort_by_key(|s| {
        let kind_rank = s.kind.as_deref().map_or(0, |kind| {
            LegacyKind::ALL
                .iter()
                .position(|known| known.as_str() == kind)
                .map_or(usize::MAX, |at| at + 1)
        });
        let by_count = if s.source == "legacy_secret" {
            0
        } else {
            s.count
        };
        (
            source_rank(&s.source),
            kind_rank,
            std::cmp::Reverse(by_count),
            s.key.clone(),
            s.alg.clone(),
        )
    });
    Usage {
        straddling_hour_ms,
        legacy_usage,
        legacy_usage_without_caller,
        unverified_legacy_usage,
        api_key_usage,
        legacy_kinds,
        hourly: Hourly {
            first_hour_ms: first,
            series,
        },
    }
}

/// What the legacy key counts per hour (`legacy_per_hour`: count, last use) hold beyond every
/// legacy caller row of that hour: counted by an edgegate from before caller counts (it wrote
/// the key counts alone) or by an earlier one whose caller write failed after its key counts,
/// or left out of the per-caller counts, or counted just as a flush began (or an hour ended)
/// ([`WithoutCaller`]). Each hour against all of its callers (`legacy_hours`, and
/// `legacy_before_start` for the first), their use before the window's start included, as an
/// hour's key count holds it; an hour with more callers than key counts (a flush committed
/// between the report's reads of the two, or a caller counted in the hour after its key) takes
/// nothing from another.
fn without_caller(
    legacy_per_hour: &BTreeMap<i64, (i64, i64)>,
    callers: &CallerSums,
) -> Option<WithoutCaller> {
    let mut with_caller: HashMap<i64, i64> = HashMap::new();
    let whole_hours = callers
        .legacy_hours
        .iter()
        .chain(&callers.legacy_before_start);
    for row in whole_hours.filter(|row| {
        row.source == "legacy_secret"
            && LegacyKind::ALL.iter().any(|kind| kind.as_str() == row.kind)
    }) {
        *with_caller.entry(row.hour_start_ms).or_default() += row.verified_count;
    }
    let mut without: Option<WithoutCaller> = None;
    for (hour, &(count, last)) in legacy_per_hour {
        let missing = count - with_caller.get(hour).copied().unwrap_or(0);
        if missing > 0 {
            let sum = without.get_or_insert(WithoutCaller {
                count: 0,
                last_seen: last,
            });
            sum.count += missing;
            sum.last_seen = sum.last_seen.max(last);
        }
    }
    without
}

/// `2026-12-01 09:05` (UTC) from epoch milliseconds.
pub fn utc(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let (days, rest) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Howard Hinnant's civil-from-days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}",
        rest / 3600,
        rest % 3600 / 60
    )
}

/// A count with thousands separators: `1,204`.
pub fn thousands(count: i64) -> String {
    let digits = count.unsigned_abs().to_string();
    let mut out = String::new();
    for (at, digit) in digits.chars().enumerate() {
        if at > 0 && (digits.len() - at).is_multiple_of(3) {
            out.push(',');
        }
        out.push(digit);
    }
    if count < 0 { format!("-{out}") } else { out }
}

/// Why legacy verifications have no caller recorded ([`WithoutCaller`]).
const NO_CALLER_RECORDED: &str = "(counted by an edgegate from before caller counts, or by a later \
                                  one from before 2026-12-07 whose caller write failed after its \
                                  key counts were written, or left out of the per-caller counts \
                                  in a long database outage, or, rarely, counted just as a flush \
                                  began, or by one from before 2026-12-08 just as an hour ended)";

/// When revoking is not safe because the legacy secret is still used, the reason names the top
/// caller, so the operator knows whom to fix first. `other` is no caller: it holds every client
/// not named (a flood of one-off values among them), so it is never named and never counted as
/// one; what it holds is said apart, as are the verifications with no caller recorded
/// (`without_caller`).
///
/// The totals are verifications, not requests: one request may carry two legacy credentials
/// (the legacy anon key in `apikey`, a legacy session as its Bearer), each counted. And a client
/// is counted once, however many kinds and routes its rows hold.
pub fn name_top_caller(
    verdict: &mut LegacyVerdict,
    legacy_usage: &[CallerRow],
    without_caller: Option<WithoutCaller>,
    window: Duration,
) {
    if verdict.legacy_revocation_safe {
        return;
    }
    let not_recorded = without_caller.map_or(0, |without| without.count);
    if legacy_usage.is_empty() {
        // The verdict's reason already says how many; none has its caller.
        if not_recorded > 0 {
            verdict.reason = format!(
                "{}, none with its caller recorded {NO_CALLER_RECORDED}",
                verdict.reason
            );
        }
        return;
    }
    let plural = |count: i64| if count == 1 { "" } else { "s" };
    let (other, named): (Vec<&CallerRow>, Vec<&CallerRow>) =
        legacy_usage.iter().partition(|row| row.client == OTHER);
    let unnamed: i64 = other.iter().map(|row| row.count).sum();
    let named_total: i64 = named.iter().map(|row| row.count).sum();
    let total = named_total + unnamed + not_recorded;
    let clients = named
        .iter()
        .map(|row| row.client.as_str())
        .collect::<std::collections::HashSet<_>>()
        .len();
    let used = match named.first() {
        Some(top) => format!(
            "legacy {} still used by {} on {}, {} time{} in the last {}",
            top.kind,
            top.client,
            top.route,
            thousands(top.count),
            plural(top.count),
            humanize(window),
        ),
        // Every use came from clients not named; the largest share still tells where.
        None => {
            let top = other[0];
            format!(
                "legacy {} still used on {} by clients not named (counted as other), {} time{} \
                 in the last {}",
                top.kind,
                top.route,
                thousands(top.count),
                plural(top.count),
                humanize(window),
            )
        }
    };
    let clients_plural = if clients == 1 { "" } else { "s" };
    let from = match (clients, unnamed, not_recorded) {
        (_, 0, 0) => format!("from {clients} client{clients_plural}"),
        (0, _, 0) => "none from a named client".to_owned(),
        (_, _, 0) => format!(
            "{} from {clients} named client{clients_plural} and {} from clients not named \
             (counted as other)",
            thousands(named_total),
            thousands(unnamed),
        ),
        _ => {
            let mut parts = Vec::new();
            if clients > 0 {
                let named = if unnamed > 0 { "named " } else { "" };
                parts.push(format!(
                    "{} from {clients} {named}client{clients_plural}",
                    thousands(named_total)
                ));
            }
            if unnamed > 0 {
                parts.push(format!(
                    "{} from clients not named (counted as other)",
                    thousands(unnamed)
                ));
            }
            let last = format!(
                "{} with no caller recorded {NO_CALLER_RECORDED}",
                thousands(not_recorded)
            );
            format!("{} and {last}", parts.join(", "))
        }
    };
    verdict.reason = format!(
        "{used}; {} verification{} with the legacy secret in all, {from}",
        thousands(total),
        plural(total),
    );
}

/// `GET /admin/signing-keys`: every trusted key and API key with its use over the revocation
/// window, the legacy secret's, the evidence behind the verdict, the report, and the JWKS state.
#[derive(Clone, Debug, Serialize)]
pub struct KeyReport {
    pub keys: Vec<KeyUse>,
    pub api_keys: Vec<ApiKeyUse>,
    pub legacy_secret: LegacySecretUse,
    /// The revocation window.
    pub window_seconds: u64,
    /// As `usage_straddling_hour_ms`, for the revocation window of the per-key counts and the
    /// verdict.
    pub window_straddling_hour_ms: Option<i64>,
    /// The first verification edgegate counted (epoch ms): how far back the evidence goes.
    pub evidence_since_ms: Option<i64>,
    #[serde(flatten)]
    pub report: ReportView,
    pub jwks: Option<JwksStatus>,
    /// Set when the database's usage counts could not be read (an outage): the keys and the
    /// JWKS state are listed, the counts are this instance's unflushed ones only, and revoking
    /// is not called safe.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage_unavailable: Option<String>,
}

/// A trusted key and its verifications over the revocation window.
#[derive(Clone, Debug, Serialize)]
pub struct KeyUse {
    pub source: &'static str,
    pub kid: Option<String>,
    pub alg: &'static str,
    pub origin: KeyOrigin,
    pub last_verified_at_ms: Option<i64>,
    pub verified_count: i64,
}

/// An API key and its verifications over the revocation window: every configured one (count 0
/// when unused), then any other that verified in the window (removed from the configuration
/// since, or recorded by an earlier release under its bare name).
#[derive(Clone, Debug, Serialize)]
pub struct ApiKeyUse {
    /// Its name in `SUPABASE_SECRET_KEYS` / `SUPABASE_PUBLISHABLE_KEYS`.
    pub name: String,
    /// `secret` or `publishable`; `None` for usage an earlier release recorded under the bare
    /// name, the two kinds of one name together.
    #[serde(rename = "type")]
    pub key_type: Option<ApiKeyType>,
    /// What metrics, log lines, `api_key_usage` and `edgegate keys report` name it by:
    /// `secret:NAME`, `publishable:NAME`, or the bare name of an earlier release's rows.
    pub kid: String,
    /// Whether the service trusts it now.
    pub configured: bool,
    pub last_verified_at_ms: Option<i64>,
    pub verified_count: i64,
}

#[derive(Clone, Debug, Serialize)]
pub struct LegacySecretUse {
    pub configured: bool,
    pub verified_count: i64,
    pub last_verified_at_ms: Option<i64>,
}

/// Builds the key report from the database, this instance's unflushed counts and its key ring;
/// `usage_window` is the span of the usage lists and hourly series (the verdict always covers
/// the revocation window).
pub async fn key_report(
    store: &Store,
    tracker: &UsageTracker,
    auth: &Authenticator,
    clock: &Clock,
    revocation_window: Duration,
    usage_window: Duration,
) -> anyhow::Result<KeyReport> {
    let now = clock.now_ms();
    let since = first_hour(revocation_window, now).min(first_hour(usage_window, now));
    // This instance's counts are read before the database's. A flush that commits between the
    // two reads then shows its counts twice; the other way round it would show them nowhere
    // (the database read before the commit, memory after the batch was cleared), and legacy use
    // could slip between the two. Otherwise each count shows once.
    let unflushed = tracker.unflushed_since(since);
    // The key listing and the JWKS state are in memory: a database outage (or one not yet
    // migrated) costs the counts, not the whole answer.
    let stored = stored_usage(store, revocation_window, usage_window, now).await;
    let (stored, usage_unavailable) = match stored {
        Ok(stored) => (stored, None),
        Err(err) if !store.is_ready() || crate::store::is_unavailable(&err) => {
            tracing::warn!(
                error = crate::error::causes(&err),
                "key report without the stored usage counts"
            );
            let unavailable = "the database's usage counts cannot be read now; the counts are \
                               this instance's unflushed ones only";
            let nothing = StoredUsage {
                evidence_bounds: (None, None),
                dropped: None,
                hourly_keys: Vec::new(),
                callers: ReportCallers::none(revocation_window, usage_window, now),
            };
            (nothing, Some(unavailable.to_owned()))
        }
        Err(err) => return Err(err),
    };
    let (mut hourly_keys, mut callers) = (stored.hourly_keys, stored.callers);
    hourly_keys.extend(unflushed.keys);
    callers.add_rows(&unflushed.callers);
    // The per-key counts and the verdict take the report's rows of the revocation window.
    let window_rows = window_rows(&hourly_keys, revocation_window, now);
    let usage = merge_usage(&window_rows);
    // This instance's first count held back is evidence too, but none before the counts are
    // complete (`complete_since`): a hole that was found lies before that.
    let (first, complete) = stored.evidence_bounds;
    let evidence_since = match (first, unflushed.first_verification) {
        (Some(stored), Some(pending)) => Some(stored.min(pending)),
        (stored, pending) => stored.or(pending),
    }
    .map(|since| complete.map_or(since, |complete| since.max(complete)));
    let dropped = DroppedUsage::sum(stored.dropped, unflushed.dropped);
    let ring = auth.key_ring().load();
    let find = |source: &str, kid: &str| {
        usage
            .iter()
            .find(|u| u.source == source && u.kid == kid)
            .map_or((0, None), |u| {
                (u.verified_count, Some(u.last_verified_at_ms))
            })
    };
    let keys = ring
        .listing()
        .into_iter()
        .map(|key| {
            let (verified_count, last_verified_at_ms) = match key.source {
                KeySource::LegacySecret => find("legacy_secret", ""),
                source => find(source.as_str(), key.kid.as_deref().unwrap_or_default()),
            };
            KeyUse {
                source: key.source.as_str(),
                kid: key.kid,
                alg: key.alg,
                origin: key.origin,
                last_verified_at_ms,
                verified_count,
            }
        })
        .collect();
    let configured_api_keys = auth.api_key_listing();
    let mut api_keys: Vec<ApiKeyUse> = configured_api_keys
        .iter()
        .map(|key| {
            let (verified_count, last_verified_at_ms) = find("api_key", &key.id);
            ApiKeyUse {
                name: key.name.clone(),
                key_type: Some(key.key_type),
                kid: key.id.clone(),
                configured: true,
                last_verified_at_ms,
                verified_count,
            }
        })
        .collect();
    // Used in the window but not trusted now: removed since, or an earlier release's bare name.
    api_keys.extend(
        usage
            .iter()
            .filter(|u| u.source == "api_key")
            .filter(|u| !configured_api_keys.iter().any(|key| key.id == u.kid))
            .map(|u| {
                let (key_type, name) = parse_api_key_id(&u.kid);
                ApiKeyUse {
                    name: name.to_owned(),
                    key_type,
                    kid: u.kid.clone(),
                    configured: false,
                    last_verified_at_ms: Some(u.last_verified_at_ms),
                    verified_count: u.verified_count,
                }
            }),
    );
    let configured = !ring.legacy_secrets().is_empty();
    let (verified_count, last_verified_at_ms) = find("legacy_secret", "");
    let mut verdict = legacy_verdict(
        configured,
        &window_rows,
        evidence_since,
        dropped,
        revocation_window,
        now,
    );
    if configured && usage_unavailable.is_some() {
        verdict = LegacyVerdict {
            legacy_revocation_safe: false,
            reason: "the database's usage counts cannot be read now, so the legacy secret's use \
                     is not known: ask again once the database answers"
                .to_owned(),
        };
    }
    let report = view_naming(
        &hourly_keys,
        &callers,
        verdict,
        dropped,
        usage_unavailable.is_none(),
    );
    Ok(KeyReport {
        keys,
        api_keys,
        legacy_secret: LegacySecretUse {
            configured,
            verified_count,
            last_verified_at_ms,
        },
        window_seconds: revocation_window.as_secs(),
        window_straddling_hour_ms: window_rows
            .iter()
            .map(|row| row.hour_start_ms)
            .find(|&hour| hour < window_start(revocation_window, now)),
        evidence_since_ms: evidence_since,
        report,
        jwks: auth.fetcher().map(|fetcher| fetcher.status()),
        usage_unavailable,
    })
}

/// What the key report reads from the database.
struct StoredUsage {
    /// [`Store::usage_evidence_bounds`].
    evidence_bounds: (Option<i64>, Option<i64>),
    dropped: Option<DroppedUsage>,
    hourly_keys: Vec<KeyUsage>,
    callers: ReportCallers,
}

async fn stored_usage(
    store: &Store,
    revocation_window: Duration,
    usage_window: Duration,
    now_ms: i64,
) -> anyhow::Result<StoredUsage> {
    if !store.is_ready() {
        anyhow::bail!("the database's migrations are not applied yet");
    }
    let evidence_bounds = store.usage_evidence_bounds().await?;
    let dropped = stored_dropped(store).await?;
    let (hourly_keys, callers) =
        stored_rows(store, revocation_window, usage_window, now_ms).await?;
    Ok(StoredUsage {
        evidence_bounds,
        dropped,
        hourly_keys,
        callers,
    })
}

/// Usage per (source, kid, alg): the hourly `rows` of the window (the database's and this
/// instance's unflushed ones) summed.
fn merge_usage(rows: &[KeyUsage]) -> Vec<KeyUsage> {
    let mut merged: BTreeMap<(String, String, String), KeyUsage> = BTreeMap::new();
    for row in rows.iter().cloned() {
        let key = (row.source.clone(), row.kid.clone(), row.alg.clone());
        match merged.get_mut(&key) {
            Some(sum) => {
                sum.verified_count += row.verified_count;
                sum.last_verified_at_ms = sum.last_verified_at_ms.max(row.last_verified_at_ms);
                sum.hour_start_ms = sum.hour_start_ms.min(row.hour_start_ms);
            }
            None => {
                merged.insert(key, row);
            }
        }
    }
    merged.into_values().collect()
}

#[cfg(test)]
mod tests;
