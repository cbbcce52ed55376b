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
//! No IP address, token or user id is kept; the client is a product name the caller chose.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use axum::http::HeaderMap;

use crate::auth::{KeySource, Verified};
use crate::store::{CallerUsage, Store};

const HOUR_MS: i64 = 3_600_000;

/// Clients with rows of their own, per instance and hour.
pub const MAX_NAMED_CLIENTS: usize = 50;
/// Clients waiting for the next flush to be named (or folded into `other`), per instance and hour.
pub const MAX_CANDIDATES: usize = 200;
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

    pub fn as_str(self) -> &'static str {
        match self {
            Self::AnonKey => "anon_key",
            Self::ServiceRoleKey => "service_role_key",
            Self::UserSession => "user_session",
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

/// What a verification is counted as: a legacy kind, or an API key by its configured name.
/// Signing-key verifications are not counted per caller: they are the traffic that is fine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CallerKind {
    Legacy(LegacyKind),
    ApiKey(String),
}

impl CallerKind {
    pub fn of(verified: &Verified) -> Option<Self> {
        match verified.source {
            KeySource::LegacySecret => Some(Self::Legacy(LegacyKind::of(verified))),
            KeySource::ApiKey => Some(Self::ApiKey(
                verified.kid.as_deref().unwrap_or_default().to_owned(),
            )),
            KeySource::SigningKey => None,
        }
    }

    fn source(&self) -> KeySource {
        match self {
            Self::Legacy(_) => KeySource::LegacySecret,
            Self::ApiKey(_) => KeySource::ApiKey,
        }
    }

    fn name(&self) -> &str {
        match self {
            Self::Legacy(kind) => kind.as_str(),
            Self::ApiKey(name) => name,
        }
    }
}

/// The client a request names: `x-client-info` (what supabase-js sends, e.g.
/// `supabase-js/2.47.0`), else the `User-Agent` product (its first token), reduced to printable
/// ASCII and at most [`MAX_CLIENT_CHARS`] characters; [`UNKNOWN`] when neither says anything.
pub fn client_name(headers: &HeaderMap) -> String {
    let info = headers
        .get("x-client-info")
        .map(|value| printable(value.as_bytes()));
    if let Some(info) = info.filter(|info| !info.is_empty()) {
        return info;
    }
    headers
        .get(axum::http::header::USER_AGENT)
        .map(|value| printable(value.as_bytes()))
        .and_then(|agent| agent.split(' ').next().map(str::to_owned))
        .filter(|product| !product.is_empty())
        .unwrap_or_else(|| UNKNOWN.to_owned())
}

/// Printable ASCII only (control bytes and non-ASCII dropped), trimmed, at most 64 characters.
fn printable(bytes: &[u8]) -> String {
    let kept: String = bytes
        .iter()
        .filter(|byte| (b' '..=b'~').contains(*byte))
        .map(|&byte| char::from(byte))
        .collect();
    kept.trim().chars().take(MAX_CLIENT_CHARS).collect()
}

/// Where a verification happened: its kind and the matched route pattern.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Place {
    source: KeySource,
    kind: String,
    route: String,
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
    counts: HashMap<Place, Count>,
}

/// One hour of one instance.
#[derive(Debug, Default)]
struct HourTable {
    /// Clients with rows of their own this hour (at most `MAX_NAMED_CLIENTS`).
    named: HashSet<String>,
    /// Counts not flushed yet, for named clients and `other`.
    pending: HashMap<(Place, String), Count>,
    /// Clients waiting to be named (at most `MAX_CANDIDATES`).
    candidates: HashMap<String, Candidate>,
    /// The largest count folded into `other` this period: a candidate must beat it to be named.
    largest_folded: i64,
}

impl HourTable {
    fn fold_into_other(&mut self, candidate: Candidate) {
        self.largest_folded = self.largest_folded.max(candidate.total);
        for (place, count) in candidate.counts {
            self.pending
                .entry((place, OTHER.to_owned()))
                .or_default()
                .add(count);
        }
    }

    fn record(&mut self, place: Place, client: String, at_ms: i64) {
        let one = Count {
            verified: 1,
            last_ms: at_ms,
        };
        if client == OTHER || self.named.contains(&client) {
            self.pending.entry((place, client)).or_default().add(one);
            return;
        }
        if let Some(candidate) = self.candidates.get_mut(&client) {
            candidate.estimate += 1;
            candidate.total += 1;
            candidate.counts.entry(place).or_default().add(one);
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
            counts: HashMap::new(),
        };
        candidate.counts.insert(place, one);
        self.candidates.insert(client, candidate);
    }

    /// Names the candidates that earned it (most seen first), folds the rest into `other`, and
    /// hands out every pending count.
    fn settle(&mut self, hour_start_ms: i64) -> Vec<CallerUsage> {
        let mut candidates: Vec<(String, Candidate)> = self.candidates.drain().collect();
        candidates.sort_by(|a, b| b.1.total.cmp(&a.1.total).then_with(|| a.0.cmp(&b.0)));
        for (client, candidate) in candidates {
            if self.named.len() < MAX_NAMED_CLIENTS && candidate.total > self.largest_folded {
                for (place, count) in candidate.counts {
                    self.pending
                        .entry((place, client.clone()))
                        .or_default()
                        .add(count);
                }
                self.named.insert(client);
            } else {
                self.fold_into_other(candidate);
            }
        }
        self.largest_folded = 0;
        self.pending
            .drain()
            .map(|((place, client), count)| CallerUsage {
                hour_start_ms,
                source: place.source.as_str().to_owned(),
                kind: place.kind,
                route: place.route,
                client,
                verified_count: count.verified,
                last_verified_at_ms: count.last_ms,
            })
            .collect()
    }
}

/// How much the tracker holds, for the test that proves it bounded.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Footprint {
    pub hours: usize,
    pub named_clients: usize,
    pub candidate_clients: usize,
    /// Count cells held, named, `other` and candidates together.
    pub counters: usize,
}

/// Counts callers since the last flush, per hour.
#[derive(Debug, Default)]
pub struct CallerTracker {
    hours: Mutex<HashMap<i64, HourTable>>,
}

fn hour_of(at_ms: i64) -> i64 {
    at_ms - at_ms.rem_euclid(HOUR_MS)
}

impl CallerTracker {
    /// Counts one verification of `kind` on `route` (a route pattern, never a raw path) by `client`.
    pub fn record(&self, kind: &CallerKind, route: &str, client: String, at_ms: i64) {
        let place = Place {
            source: kind.source(),
            kind: kind.name().to_owned(),
            route: route.to_owned(),
        };
        let mut hours = self.hours.lock().unwrap_or_else(|e| e.into_inner());
        hours
            .entry(hour_of(at_ms))
            .or_default()
            .record(place, client, at_ms);
    }

    /// Settles every hour and takes its rows; only the newest hour's named clients are kept,
    /// since naming starts over each hour.
    fn take(&self) -> Vec<CallerUsage> {
        let mut hours = self.hours.lock().unwrap_or_else(|e| e.into_inner());
        let newest = hours.keys().copied().max();
        let rows = hours
            .iter_mut()
            .flat_map(|(hour, table)| table.settle(*hour))
            .collect();
        hours.retain(|hour, _| Some(*hour) == newest);
        rows
    }

    /// Puts rows back after a failed write; their clients stay named.
    fn restore(&self, rows: Vec<CallerUsage>) {
        let mut hours = self.hours.lock().unwrap_or_else(|e| e.into_inner());
        for row in rows {
            let source = match row.source.as_str() {
                "api_key" => KeySource::ApiKey,
                _ => KeySource::LegacySecret,
            };
            let table = hours.entry(row.hour_start_ms).or_default();
            if row.client != OTHER {
                table.named.insert(row.client.clone());
            }
            let place = Place {
                source,
                kind: row.kind,
                route: row.route,
            };
            table
                .pending
                .entry((place, row.client))
                .or_default()
                .add(Count {
                    verified: row.verified_count,
                    last_ms: row.last_verified_at_ms,
                });
        }
    }

    /// Writes the counts since the last flush; on failure they are kept for the next one.
    pub async fn flush(&self, store: &Store) -> anyhow::Result<()> {
        let rows = self.take();
        if rows.is_empty() {
            return Ok(());
        }
        if let Err(err) = store.add_caller_usage(&rows).await {
            self.restore(rows);
            return Err(err);
        }
        Ok(())
    }

    /// Everything counted here and not flushed yet, per hour and caller (candidates under their
    /// own name), for hours starting at or after `since_ms`.
    pub fn pending_since(&self, since_ms: i64) -> Vec<CallerUsage> {
        let hours = self.hours.lock().unwrap_or_else(|e| e.into_inner());
        let mut rows = Vec::new();
        for (&hour, table) in hours.iter().filter(|(hour, _)| **hour >= since_ms) {
            let named = table
                .pending
                .iter()
                .map(|((place, client), count)| (place, client, count));
            let waiting = table.candidates.iter().flat_map(|(client, candidate)| {
                candidate
                    .counts
                    .iter()
                    .map(move |(place, count)| (place, client, count))
            });
            rows.extend(
                named
                    .chain(waiting)
                    .map(|(place, client, count)| CallerUsage {
                        hour_start_ms: hour,
                        source: place.source.as_str().to_owned(),
                        kind: place.kind.clone(),
                        route: place.route.clone(),
                        client: client.clone(),
                        verified_count: count.verified,
                        last_verified_at_ms: count.last_ms,
                    }),
            );
        }
        rows
    }

    pub fn footprint(&self) -> Footprint {
        let hours = self.hours.lock().unwrap_or_else(|e| e.into_inner());
        hours.values().fold(
            Footprint {
                hours: hours.len(),
                ..Footprint::default()
            },
            |mut sum, table| {
                sum.named_clients += table.named.len();
                sum.candidate_clients += table.candidates.len();
                sum.counters += table.pending.len()
                    + table
                        .candidates
                        .values()
                        .map(|candidate| candidate.counts.len())
                        .sum::<usize>();
                sum
            },
        )
    }
}

#[cfg(test)]
mod tests;
