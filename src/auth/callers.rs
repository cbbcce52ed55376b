//! Who still uses the legacy secret: each legacy (HS256) or API-key verification counted per
//! caller, that is per (kind, route, client), in memory, and flushed with the hourly key usage so
//! every instance's counts add up in `caller_usage_hourly`.
//!
//! Bounded on purpose: per instance and hour at most [`MAX_NAMED_CLIENTS`] clients get rows of
//! their own, the rest are counted as [`OTHER`]. A client is not named on arrival: it waits as a
//! candidate (at most [`MAX_CANDIDATES`], kept by the Space-Saving heavy-hitter rule) until the
//! next flush, and is named only if it was seen more often than every client already folded
//! into `other` in that period. So a flood of one-off `User-Agent` values cannot take the slots
//! of the real callers, which repeat; with no flood every client is named, first come first
//! served. Counts are never lost: a client that is not named moves its exact counts to `other`.
//! Across hours, what a database outage holds back is bounded too ([`MAX_HELD_COUNTS`]): the
//! oldest hours' clients are folded into `other`, then the oldest hours dropped and counted.
//! No IP address, token or user id is kept; the client is a product name the caller chose.

use std::borrow::Cow;
use std::collections::HashSet;
use std::hash::{Hash, Hasher};
use std::sync::{Mutex, OnceLock};

use axum::http::{HeaderMap, HeaderName};
use hashbrown::{Equivalent, HashMap};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

use crate::auth::{KeySource, Verified};
use crate::store::{CallerUsage, Store};

/// The tracker's maps. Every legacy verification looks its caller up, so they hash with
/// foldhash (seeded per process) rather than std's SipHash. Client names are the caller's
/// choice, but every map is bounded ([`MAX_NAMED_CLIENTS`], [`MAX_CANDIDATES`], the routes and
/// kinds a client uses), so names made to collide cost at most a scan of a few hundred entries,
/// which a flood of new names already costs in the Space-Saving eviction.
type Map<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

const HOUR_MS: i64 = 3_600_000;

/// Clients with rows of their own, per instance and hour.
pub const MAX_NAMED_CLIENTS: usize = 50;
/// Clients waiting for the next flush to be named (or folded into `other`), per instance and hour.
pub const MAX_CANDIDATES: usize = 200;
/// Counts (one per hour, place and client) held across hours at most while flushes fail, the
/// newest hour's aside (it has its own bounds). About ten thousand hours of a few callers each
/// once their hours are folded into `other`; past it, the oldest hours are dropped and counted in
/// `edgegate_caller_usage_dropped_total`.
pub const MAX_HELD_COUNTS: usize = 10_000;
/// Longest client name kept.
pub const MAX_CLIENT_CHARS: usize = 64;
/// The client every caller past the named ones is counted as.
pub const OTHER: &str = "other";
/// The client of a request that names none.
pub const UNKNOWN: &str = "unknown";

/// The three kinds of legacy credential, told apart by their claims.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LegacyKind {
    /// The legacy anon API key: `role` anon, no `sub`.
    AnonKey,
    /// The legacy service_role API key: `role` service_role, no `sub`.
    ServiceRoleKey,
    /// A user's access token signed with the legacy secret: it has a `sub`.
    UserSession,
}

impl LegacyKind {
    pub const ALL: [Self; 3] = [Self::AnonKey, Self::ServiceRoleKey, Self::UserSession];

    /// Its place in [`LegacyKind::ALL`].
    pub fn index(self) -> usize {
        match self {
            Self::AnonKey => 0,
            Self::ServiceRoleKey => 1,
            Self::UserSession => 2,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::AnonKey => "anon_key",
            Self::ServiceRoleKey => "service_role_key",
            Self::UserSession => "user_session",
        }
    }

    /// The kind a caller row names a legacy key of this kind by when no configured secret could
    /// verify it (`anon_key_unverified`, `service_role_key_unverified`): what it claims to be,
    /// not a verified use.
    pub fn unverified_str(self) -> &'static str {
        match self {
            Self::AnonKey => "anon_key_unverified",
            Self::ServiceRoleKey => "service_role_key_unverified",
            Self::UserSession => "user_session_unverified",
        }
    }

    /// The legacy API key an unverified token's `role` and `sub` make it look like
    /// ([`LegacyKind::of`]'s rule); `None` for anything else (a session, any other role).
    pub fn api_key_by_claims(role: &str, has_sub: bool) -> Option<Self> {
        match (has_sub, role) {
            (false, "anon") => Some(Self::AnonKey),
            (false, "service_role") => Some(Self::ServiceRoleKey),
            _ => None,
        }
    }

    /// Classifies an HS256 verification. A token with no `sub` and a role other than anon or
    /// service_role was minted like a session (for instance `authenticated`), so it counts as one.
    pub fn of(verified: &Verified) -> Self {
        let has_sub = verified.sub.as_deref().is_some_and(|sub| !sub.is_empty());
        match (has_sub, verified.role.as_deref()) {
            (false, Some("anon")) => Self::AnonKey,
            (false, Some("service_role")) => Self::ServiceRoleKey,
            _ => Self::UserSession,
        }
    }
}

/// Label of `edgegate_legacy_verifications_total`: `anon_key`, `service_role_key` or
/// `user_session`. No client label: client names are the caller's choice, so they would grow the
/// label set without bound.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LegacyKindLabels {
    pub kind: &'static str,
}

/// What a verification is counted as: a legacy kind, or an API key by its id (`secret:NAME` or
/// `publishable:NAME`: Supabase names both its default keys `default`).
/// Signing-key verifications are not counted per caller: they are the traffic that is fine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CallerKind<'a> {
    Legacy(LegacyKind),
    /// A legacy API key in `apikey` beside the credential that let the request in, which no
    /// configured secret can verify (the legacy secret is not configured): counted under the
    /// legacy secret as [`LegacyKind::unverified_str`], not in
    /// `edgegate_legacy_verifications_total`.
    UnverifiedLegacy(LegacyKind),
    ApiKey(&'a str),
}

impl<'a> CallerKind<'a> {
    pub fn of(verified: &'a Verified) -> Option<Self> {
        match verified.source {
            KeySource::LegacySecret => Some(Self::Legacy(LegacyKind::of(verified))),
            KeySource::ApiKey => Some(Self::ApiKey(verified.kid.as_deref().unwrap_or_default())),
            KeySource::SigningKey => None,
        }
    }

    fn source(self) -> KeySource {
        match self {
            Self::Legacy(_) | Self::UnverifiedLegacy(_) => KeySource::LegacySecret,
            Self::ApiKey(_) => KeySource::ApiKey,
        }
    }

    fn name(self) -> &'a str {
        match self {
            Self::Legacy(kind) => kind.as_str(),
            Self::UnverifiedLegacy(kind) => kind.unverified_str(),
            Self::ApiKey(name) => name,
        }
    }
}

/// The header supabase-js names itself in.
static X_CLIENT_INFO: HeaderName = HeaderName::from_static("x-client-info");

/// The client a request names: `x-client-info` (what supabase-js sends, e.g.
/// `supabase-js/2.47.0`), else the `User-Agent` product (its first token), reduced to printable
/// ASCII and at most [`MAX_CLIENT_CHARS`] characters; [`UNKNOWN`] when neither says anything.
/// Borrowed from the header when it needs no cleaning, as a well-behaved client's does.
pub fn client_name(headers: &HeaderMap) -> Cow<'_, str> {
    let info = headers
        .get(&X_CLIENT_INFO)
        .map(|value| printable(value.as_bytes()));
    if let Some(info) = info.filter(|info| !info.is_empty()) {
        return info;
    }
    let product = headers.get(axum::http::header::USER_AGENT).map(|value| {
        match printable(value.as_bytes()) {
            Cow::Borrowed(agent) => Cow::Borrowed(first_word(agent)),
            Cow::Owned(agent) => Cow::Owned(first_word(&agent).to_owned()),
        }
    });
    product
        .filter(|product| !product.is_empty())
        .unwrap_or(Cow::Borrowed(UNKNOWN))
}

fn first_word(text: &str) -> &str {
    text.split(' ').next().unwrap_or_default()
}

/// Printable ASCII only (control bytes and non-ASCII dropped), trimmed, at most 64 characters.
fn printable(bytes: &[u8]) -> Cow<'_, str> {
    let is_printable = |byte: &u8| (b' '..=b'~').contains(byte);
    match std::str::from_utf8(bytes) {
        Ok(text) if text.bytes().all(|byte| is_printable(&byte)) => {
            let text = text.trim();
            // ASCII: one byte a character, so any length is a character boundary.
            Cow::Borrowed(&text[..text.len().min(MAX_CLIENT_CHARS)])
        }
        _ => {
            let kept: String = bytes
                .iter()
                .filter(|byte| is_printable(byte))
                .map(|&byte| char::from(byte))
                .collect();
            Cow::Owned(kept.trim().chars().take(MAX_CLIENT_CHARS).collect())
        }
    }
}

/// Where a verification happened: its kind and the matched route pattern.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Place {
    source: KeySource,
    kind: String,
    route: String,
}

/// A [`Place`] as a request has it, borrowed: what the maps are searched with, so counting a
/// verification already seen copies no name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct PlaceRef<'a> {
    source: KeySource,
    kind: &'a str,
    route: &'a str,
}

impl Place {
    fn as_ref(&self) -> PlaceRef<'_> {
        PlaceRef {
            source: self.source,
            kind: &self.kind,
            route: &self.route,
        }
    }
}

impl PlaceRef<'_> {
    fn to_place(self) -> Place {
        Place {
            source: self.source,
            kind: self.kind.to_owned(),
            route: self.route.to_owned(),
        }
    }
}

/// Hashed as its borrowed form, so a [`PlaceRef`] finds it.
impl Hash for Place {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.as_ref().hash(state);
    }
}

impl Equivalent<Place> for PlaceRef<'_> {
    fn equivalent(&self, key: &Place) -> bool {
        *self == key.as_ref()
    }
}

/// One client's counts not flushed yet, by place.
type Counts = Map<Place, Count>;

fn add_to(counts: &mut Counts, place: PlaceRef<'_>, count: Count) {
    match counts.get_mut(&place) {
        Some(held) => held.add(count),
        None => {
            counts.insert(place.to_place(), count);
        }
    }
}

fn merge_into(counts: &mut Counts, from: Counts) {
    for (place, count) in from {
        counts.entry(place).or_default().add(count);
    }
}

#[derive(Clone, Copy, Debug, Default)]
struct Count {
    verified: i64,
    last_ms: i64,
}

impl Count {
    fn add(&mut self, other: Count) {
        self.verified += other.verified;
        self.last_ms = self.last_ms.max(other.last_ms);
    }
}

/// A client seen this flush period that is not named yet.
#[derive(Debug, Default)]
struct Candidate {
    /// Space-Saving's estimate: the exact count plus the estimate of the client it replaced, so
    /// a client that keeps coming outranks the one-off values that keep arriving.
    estimate: i64,
    /// Counted exactly since it became a candidate.
    total: i64,
    counts: Counts,
}

/// One hour of one instance.
#[derive(Debug, Default)]
struct HourTable {
    /// Clients with rows of their own this hour (at most `MAX_NAMED_CLIENTS`), each with its
    /// counts not flushed yet. A client stays named until the hour ends, flushes or not.
    named: Map<String, Counts>,
    /// The counts not flushed yet of every client folded into `other`.
    other: Counts,
    /// Clients waiting to be named (at most `MAX_CANDIDATES`).
    candidates: Map<String, Candidate>,
    /// The largest count folded into `other` this period: a candidate must beat it to be named.
    largest_folded: i64,
}

impl HourTable {
    /// Count cells held: named, `other` and candidates.
    fn cells(&self) -> usize {
        self.named.values().map(Map::len).sum::<usize>()
            + self.other.len()
            + self
                .candidates
                .values()
                .map(|candidate| candidate.counts.len())
                .sum::<usize>()
    }

    /// Verifications held.
    fn verified(&self) -> i64 {
        let named = self.named.values().flat_map(Map::values);
        let waiting = self
            .candidates
            .values()
            .flat_map(|candidate| candidate.counts.values());
        named
            .chain(self.other.values())
            .chain(waiting)
            .map(|count| count.verified)
            .sum()
    }

    fn fold_into_other(&mut self, candidate: Candidate) {
        self.largest_folded = self.largest_folded.max(candidate.total);
        merge_into(&mut self.other, candidate.counts);
    }

    fn record(&mut self, place: PlaceRef<'_>, client: &str, at_ms: i64) {
        let one = Count {
            verified: 1,
            last_ms: at_ms,
        };
        if client == OTHER {
            add_to(&mut self.other, place, one);
            return;
        }
        if let Some(counts) = self.named.get_mut(client) {
            add_to(counts, place, one);
            return;
        }
        if let Some(candidate) = self.candidates.get_mut(client) {
            candidate.estimate += 1;
            candidate.total += 1;
            add_to(&mut candidate.counts, place, one);
            return;
        }
        let mut estimate = 1;
        if self.candidates.len() >= MAX_CANDIDATES {
            // Space-Saving: the candidate with the lowest estimate makes room (under a flood, a
            // one-off value); the newcomer inherits its estimate, its exact count starts at one.
            let least = self
                .candidates
                .iter()
                .min_by(|a, b| a.1.estimate.cmp(&b.1.estimate).then_with(|| a.0.cmp(b.0)))
                .map(|(name, _)| name.clone());
            if let Some(evicted) = least.and_then(|name| self.candidates.remove(&name)) {
                estimate += evicted.estimate;
                self.fold_into_other(evicted);
            }
        }
        let mut candidate = Candidate {
            estimate,
            total: 1,
            counts: Counts::default(),
        };
        candidate.counts.insert(place.to_place(), one);
        self.candidates.insert(client.to_owned(), candidate);
    }

    /// The candidates that earned a name: most seen first, while names are free, each seen more
    /// often than every client folded into `other` this period (one folded for want of a free
    /// name included). One named already (a failed flush put its rows back while it waited
    /// again) keeps its name. What [`HourTable::settle`] names, and what the report shows
    /// under a name before then.
    fn earned_names(&self) -> HashSet<&str> {
        let mut candidates: Vec<(&str, i64)> = self
            .candidates
            .iter()
            .map(|(client, candidate)| (client.as_str(), candidate.total))
            .collect();
        candidates.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(b.0)));
        let mut free = MAX_NAMED_CLIENTS.saturating_sub(self.named.len());
        let mut largest_folded = self.largest_folded;
        let mut names = HashSet::new();
        for (client, total) in candidates {
            if self.named.contains_key(client) {
                names.insert(client);
            } else if free > 0 && total > largest_folded {
                free -= 1;
                names.insert(client);
            } else {
                largest_folded = largest_folded.max(total);
            }
        }
        names
    }

    /// Names the candidates that earned it, folds the rest into `other`, and hands out every
    /// pending count.
    fn settle(&mut self, hour_start_ms: i64) -> Vec<CallerUsage> {
        let earned: HashSet<String> = self.earned_names().into_iter().map(str::to_owned).collect();
        let candidates: Vec<(String, Candidate)> = self.candidates.drain().collect();
        for (client, candidate) in candidates {
            if earned.contains(&client) {
                merge_into(self.named.entry(client).or_default(), candidate.counts);
            } else {
                self.fold_into_other(candidate);
            }
        }
        self.largest_folded = 0;
        let mut rows = Vec::new();
        for (client, counts) in &mut self.named {
            rows.extend(
                counts
                    .drain()
                    .map(|(place, count)| usage_row(hour_start_ms, place, client.clone(), count)),
            );
        }
        rows.extend(
            self.other
                .drain()
                .map(|(place, count)| usage_row(hour_start_ms, place, OTHER.to_owned(), count)),
        );
        rows
    }
}

fn usage_row(hour_start_ms: i64, place: Place, client: String, count: Count) -> CallerUsage {
    CallerUsage {
        hour_start_ms,
        source: place.source.as_str().to_owned(),
        kind: place.kind,
        route: place.route,
        client,
        verified_count: count.verified,
        last_verified_at_ms: count.last_ms,
    }
}

/// How much the tracker holds, for the test that proves it bounded.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Footprint {
    pub hours: usize,
    pub named_clients: usize,
    pub candidate_clients: usize,
    /// Count cells held, named, `other` and candidates together, and rows being written.
    pub counters: usize,
}

/// What a tracker holds until the database has it.
#[derive(Debug, Default)]
pub(crate) struct Held {
    hours: Map<i64, HourTable>,
    /// The rows a flush is writing: still this instance's to report until the write commits or
    /// fails (then they are back in `hours`).
    flushing: Vec<CallerUsage>,
}

/// Counts callers since the last flush, per hour, and legacy verifications by kind.
#[derive(Debug)]
pub struct CallerTracker {
    held: Mutex<Held>,
    /// One flush at a time, so there is one batch in flight.
    flush_turn: tokio::sync::Mutex<()>,
    /// Counts held across hours at most, the newest hour's aside.
    max_held: usize,
    /// Verifications left out of the per-caller counts because too many hours were held.
    dropped: Counter,
    /// `edgegate_legacy_verifications_total`.
    legacy: Family<LegacyKindLabels, Counter>,
    /// Its series by [`LegacyKind::index`], each looked up in the family once, on first use (so
    /// a kind never verified has none): the family's own lookup takes a lock and a SipHash.
    legacy_series: [OnceLock<Counter>; LegacyKind::ALL.len()],
}

fn hour_of(at_ms: i64) -> i64 {
    at_ms - at_ms.rem_euclid(HOUR_MS)
}

impl Default for CallerTracker {
    fn default() -> Self {
        Self::with_max_held(MAX_HELD_COUNTS)
    }
}

impl CallerTracker {
    /// A tracker that holds at most `max_held` counts across hours, the newest hour's aside.
    pub fn with_max_held(max_held: usize) -> Self {
        Self {
            held: Mutex::default(),
            flush_turn: tokio::sync::Mutex::default(),
            max_held,
            dropped: Counter::default(),
            legacy: Family::default(),
            legacy_series: Default::default(),
        }
    }

    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "legacy_verifications",
            "Credentials verified with the legacy secret, by kind (anon_key, service_role_key, user_session)",
            self.legacy.clone(),
        );
        // At 0 from the start: Prometheus' `increase()` does not count a series' first sample.
        for kind in LegacyKind::ALL {
            drop(self.legacy.get_or_create(&LegacyKindLabels {
                kind: kind.as_str(),
            }));
        }
        registry.register(
            "caller_usage_dropped",
            "Legacy and API-key verifications left out of the per-caller counts because a long \
             database outage held too many hours of them (the key counts are kept apart)",
            self.dropped.clone(),
        );
    }

    /// Verifications dropped so far from the per-caller counts.
    pub fn dropped(&self) -> u64 {
        self.dropped.get()
    }

    /// Counts one verification of `kind` on `route` (a route pattern, never a raw path) by `client`.
    pub fn record(&self, kind: CallerKind<'_>, route: &str, client: &str, at_ms: i64) {
        self.count_kind(kind);
        Self::record_in(&mut self.held(), kind, route, client, at_ms);
    }

    /// Counts a legacy verification in `edgegate_legacy_verifications_total` by its kind.
    pub(crate) fn count_kind(&self, kind: CallerKind<'_>) {
        if let CallerKind::Legacy(legacy) = kind {
            self.legacy_series[legacy.index()]
                .get_or_init(|| {
                    let labels = LegacyKindLabels {
                        kind: legacy.as_str(),
                    };
                    self.legacy.get_or_create(&labels).clone()
                })
                .inc();
        }
    }

    /// The counts, locked.
    fn held(&self) -> std::sync::MutexGuard<'_, Held> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The counts' lock, for a request counting its caller (then its key's verification) and a
    /// flush taking the callers (then the key counts): each takes the key counts' lock while it
    /// holds this one ([`crate::auth::usage::UsageTracker::record_with_caller`]), never the
    /// other way round, and the key counts' lock is not held while this one is waited for.
    pub(crate) fn counts(&self) -> &Mutex<Held> {
        &self.held
    }

    /// Counts one verification of `kind` on `route` by `client` in `held`.
    pub(crate) fn record_in(
        held: &mut Held,
        kind: CallerKind<'_>,
        route: &str,
        client: &str,
        at_ms: i64,
    ) {
        let place = PlaceRef {
            source: kind.source(),
            kind: kind.name(),
            route,
        };
        held.hours
            .entry(hour_of(at_ms))
            .or_default()
            .record(place, client, at_ms);
    }

    /// One flush at a time: held by [`CallerTracker::flush`], and by a flush that writes these
    /// rows with the key counts ([`crate::auth::usage::UsageTracker::flush`]).
    pub(crate) async fn turn(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.flush_turn.lock().await
    }

    /// Settles every hour and takes its rows, kept as the batch in flight; only the newest hour's
    /// named clients are kept, since naming starts over each hour.
    pub(crate) fn take(&self) -> Vec<CallerUsage> {
        Self::take_from(&mut self.held())
    }

    /// [`CallerTracker::take`] from counts already locked.
    pub(crate) fn take_from(held: &mut Held) -> Vec<CallerUsage> {
        let newest = held.hours.keys().copied().max();
        let rows: Vec<CallerUsage> = held
            .hours
            .iter_mut()
            .flat_map(|(hour, table)| table.settle(*hour))
            .collect();
        held.hours.retain(|hour, _| Some(*hour) == newest);
        // `flushing` is empty here unless a flush was cut off mid-write. Whether those rows
        // reached the database is not known, so they are not written again.
        held.flushing.clone_from(&rows);
        rows
    }

    /// The batch in flight is written: the database has it now.
    pub(crate) fn written(&self) {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        held.flushing.clear();
    }

    /// Puts rows back after a failed write, in the same step as they stop being in flight;
    /// their clients stay named, unless the hours held outgrow `max_held`.
    pub(crate) fn restore(&self, rows: Vec<CallerUsage>) {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        held.flushing.clear();
        let hours = &mut held.hours;
        for row in rows {
            let source = match row.source.as_str() {
                "api_key" => KeySource::ApiKey,
                _ => KeySource::LegacySecret,
            };
            let table = hours.entry(row.hour_start_ms).or_default();
            let counts = if row.client == OTHER {
                &mut table.other
            } else {
                table.named.entry(row.client).or_default()
            };
            let place = Place {
                source,
                kind: row.kind,
                route: row.route,
            };
            counts.entry(place).or_default().add(Count {
                verified: row.verified_count,
                last_ms: row.last_verified_at_ms,
            });
        }
        self.bound(hours);
    }

    /// Keeps the counts held across hours within `max_held`, the newest hour aside (it has its
    /// own bounds and is still counting): the oldest hours' clients are folded into `other`
    /// first (their counts kept, their names lost), then the oldest hours are dropped and
    /// counted. Without this, each failed flush put every past hour back, so an outage of H
    /// hours held H tables, which anyone can fill with the public anon key.
    fn bound(&self, hours: &mut Map<i64, HourTable>) {
        let mut older: Vec<i64> = hours.keys().copied().collect();
        older.sort_unstable();
        older.pop();
        let mut held: usize = older.iter().map(|hour| hours[hour].cells()).sum();
        for hour in &older {
            if held <= self.max_held {
                return;
            }
            let table = hours.get_mut(hour).expect("an hour listed");
            let before = table.cells();
            let named: Vec<Counts> = table.named.drain().map(|(_, counts)| counts).collect();
            for counts in named {
                merge_into(&mut table.other, counts);
            }
            held = held - before + table.cells();
        }
        for hour in &older {
            if held <= self.max_held {
                return;
            }
            let table = hours.remove(hour).expect("an hour listed");
            held -= table.cells();
            self.dropped
                .inc_by(u64::try_from(table.verified()).unwrap_or(0));
        }
    }

    /// Writes the counts since the last flush; on failure they are kept for the next one.
    pub async fn flush(&self, store: &Store) -> anyhow::Result<()> {
        let _turn = self.turn().await;
        let rows = self.take();
        if rows.is_empty() {
            return Ok(());
        }
        if let Err(err) = store.add_caller_usage(&rows).await {
            self.restore(rows);
            return Err(err);
        }
        self.written();
        Ok(())
    }

    /// Everything counted here that the database does not have yet (a batch being written
    /// included), per hour and caller, for hours starting at or after `since_ms`. A client
    /// waiting for the flush shows as the flush will count it: under its own name if it earned
    /// one, else in `other` (so a flood of one-off values is not listed by name for a minute).
    pub fn pending_since(&self, since_ms: i64) -> Vec<CallerUsage> {
        let held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        let mut rows: Vec<CallerUsage> = held
            .flushing
            .iter()
            .filter(|row| row.hour_start_ms >= since_ms)
            .cloned()
            .collect();
        for (&hour, table) in held.hours.iter().filter(|(hour, _)| **hour >= since_ms) {
            let earned = table.earned_names();
            let mut other = table.other.clone();
            let mut waiting = Vec::new();
            for (client, candidate) in &table.candidates {
                if earned.contains(client.as_str()) {
                    waiting.push((client.as_str(), &candidate.counts));
                } else {
                    merge_into(&mut other, candidate.counts.clone());
                }
            }
            let named = table
                .named
                .iter()
                .map(|(client, counts)| (client.as_str(), counts));
            let other = std::iter::once((OTHER, &other));
            for (client, counts) in named.chain(waiting).chain(other) {
                rows.extend(counts.iter().map(|(place, count)| {
                    usage_row(hour, place.clone(), client.to_owned(), *count)
                }));
            }
        }
        rows
    }

    pub fn footprint(&self) -> Footprint {
        let held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        held.hours.values().fold(
            Footprint {
                hours: held.hours.len(),
                counters: held.flushing.len(),
                ..Footprint::default()
            },
            |mut sum, table| {
                sum.named_clients += table.named.len();
                sum.candidate_clients += table.candidates.len();
                sum.counters += table.cells();
                sum
            },
        )
    }
}

#[cfg(test)]
mod tests;
