use super::*;
use crate::auth::Claims;

fn verified(source: KeySource, role: Option<&str>, sub: Option<&str>) -> Verified {
    Verified {
        source,
        kid: (source == KeySource::ApiKey).then(|| "backend".into()),
        alg: if source == KeySource::LegacySecret {
            "HS256"
        } else {
            "opaque"
        },
        role: role.map(Into::into),
        sub: sub.map(Into::into),
        claims: Claims::default(),
        exp: 0,
        nbf: None,
        ok_count: Default::default(),
    }
}

/// What an HS256 verification with these claims is counted as.
fn legacy(role: Option<&str>, sub: Option<&str>) -> Option<LegacyKind> {
    match CallerKind::of(&verified(KeySource::LegacySecret, role, sub)) {
        Some(CallerKind::Legacy(kind)) => Some(kind),
        _ => None,
    }
}

#[test]
fn legacy_verifications_are_told_apart_by_role_and_sub() {
    use LegacyKind::*;
    assert_eq!(legacy(Some("anon"), None), Some(AnonKey));
    assert_eq!(legacy(Some("service_role"), None), Some(ServiceRoleKey));
    assert_eq!(
        legacy(Some("authenticated"), Some("8f1c")),
        Some(UserSession)
    );
    // A sub makes it a session whatever the role; an empty sub is no sub.
    assert_eq!(
        legacy(Some("service_role"), Some("8f1c")),
        Some(UserSession)
    );
    assert_eq!(legacy(Some("anon"), Some("")), Some(AnonKey));
    // Neither API-key shape: minted like a session.
    assert_eq!(legacy(Some("authenticated"), None), Some(UserSession));
    assert_eq!(legacy(None, None), Some(UserSession));
}

#[test]
fn api_keys_count_by_name_and_signing_keys_not_at_all() {
    let api = verified(KeySource::ApiKey, Some("service_role"), None);
    assert_eq!(CallerKind::of(&api), Some(CallerKind::ApiKey("backend")));
    let signed = verified(KeySource::SigningKey, Some("authenticated"), Some("u"));
    assert_eq!(CallerKind::of(&signed), None);
}

fn headers(pairs: &[(&str, &[u8])]) -> HeaderMap {
    let mut map = HeaderMap::new();
    for (name, value) in pairs {
        map.insert(
            axum::http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
            axum::http::HeaderValue::from_bytes(value).unwrap(),
        );
    }
    map
}

#[test]
fn the_client_is_x_client_info_else_the_user_agent_product() {
    let both = headers(&[
        ("x-client-info", b"supabase-js/2.47.0"),
        ("user-agent", b"Mozilla/5.0 (X11; Linux x86_64)"),
    ]);
    assert_eq!(client_name(&both), "supabase-js/2.47.0");
    let agent = headers(&[("user-agent", b"nightly-export/1.0 (linux; cron)")]);
    assert_eq!(client_name(&agent), "nightly-export/1.0");
    let blank_info = headers(&[("x-client-info", b"  "), ("user-agent", b"curl/8.5.0")]);
    assert_eq!(client_name(&blank_info), "curl/8.5.0");
    assert_eq!(client_name(&headers(&[])), UNKNOWN);
    assert_eq!(client_name(&headers(&[("user-agent", b" ")])), UNKNOWN);
}

#[test]
fn client_names_are_printable_ascii_and_at_most_64_characters() {
    // HeaderValue itself refuses other control bytes; tab and obs-text bytes get through.
    let hostile = headers(&[("x-client-info", b"evil\tjs/\xff\xfe1.0 ok")]);
    assert_eq!(client_name(&hostile), "eviljs/1.0 ok");
    let long = "a".repeat(300);
    let long = headers(&[("x-client-info", long.as_bytes())]);
    let named = client_name(&long);
    assert_eq!(named.len(), MAX_CLIENT_CHARS);
    assert!(named.bytes().all(|b| (b' '..=b'~').contains(&b)));
    // A User-Agent that needs cleaning still gives its first product only.
    let agent = headers(&[("user-agent", b"\tcron\xff-job/2.0 (linux)")]);
    assert_eq!(client_name(&agent), "cron-job/2.0");
    let padded = headers(&[("x-client-info", b"  supabase-js/2.47.0  ")]);
    assert_eq!(client_name(&padded), "supabase-js/2.47.0");
}

#[test]
fn a_clean_client_name_is_read_in_place() {
    let clean = [
        headers(&[("x-client-info", b" supabase-js/2.47.0 ")]),
        headers(&[("user-agent", b"nightly-export/1.0 (linux; cron)")]),
        headers(&[("x-client-info", "a".repeat(300).as_bytes())]),
        headers(&[]),
    ];
    for headers in &clean {
        assert!(
            matches!(client_name(headers), Cow::Borrowed(_)),
            "{headers:?}"
        );
    }
    let dirty = headers(&[("x-client-info", b"js\t/1.0")]);
    assert_eq!(client_name(&dirty), Cow::<str>::Owned("js/1.0".to_owned()));
}

impl CallerTracker {
    /// The rows a flush takes, written: no longer in flight.
    fn take_written(&self) -> Vec<CallerUsage> {
        let rows = self.take();
        self.written();
        rows
    }
}

const ROUTE: &str = "/functions/v1/jwt-test";
const T0: i64 = 1_764_576_000_000; // an hour boundary

fn anon() -> CallerKind<'static> {
    CallerKind::Legacy(LegacyKind::AnonKey)
}

/// Rows taken from the tracker, summed per client.
fn by_client(rows: &[CallerUsage]) -> HashMap<String, i64> {
    let mut sums = HashMap::new();
    for row in rows {
        *sums.entry(row.client.clone()).or_default() += row.verified_count;
    }
    sums
}

#[test]
fn with_no_pressure_every_client_is_named_with_exact_counts() {
    let tracker = CallerTracker::default();
    for i in 0..5 {
        tracker.record(anon(), ROUTE, "supabase-js/2.47.0", T0 + i);
    }
    tracker.record(
        CallerKind::Legacy(LegacyKind::ServiceRoleKey),
        "/functions/v1/sync-stripe-products-hardened",
        "nightly-export/1.0",
        T0 + 10,
    );
    let rows = tracker.take_written();
    assert_eq!(rows.len(), 2, "{rows:?}");
    let js = rows
        .iter()
        .find(|row| row.client == "supabase-js/2.47.0")
        .unwrap();
    assert_eq!(
        (js.source.as_str(), js.kind.as_str(), js.route.as_str()),
        ("legacy_secret", "anon_key", ROUTE)
    );
    assert_eq!((js.verified_count, js.last_verified_at_ms), (5, T0 + 4));
    assert_eq!(js.hour_start_ms, T0);
    let cron = rows
        .iter()
        .find(|row| row.client == "nightly-export/1.0")
        .unwrap();
    assert_eq!(cron.kind, "service_role_key");
    assert_eq!(cron.verified_count, 1);
    assert!(tracker.take_written().is_empty(), "taken once");
}

#[test]
fn past_fifty_clients_an_hour_the_rest_is_other() {
    let tracker = CallerTracker::default();
    for period in 0..2 {
        for client in 0..60 {
            tracker.record(anon(), ROUTE, &format!("client-{client:02}"), T0 + period);
        }
        let sums = by_client(&tracker.take_written());
        assert_eq!(sums.values().sum::<i64>(), 60, "nothing lost");
        assert_eq!(sums.len(), MAX_NAMED_CLIENTS + 1, "{sums:?}");
        assert_eq!(sums[OTHER], 10);
        // The same fifty stay named for the rest of the hour.
        assert!(sums.contains_key("client-00") && !sums.contains_key("client-59"));
    }
    // A new hour starts naming over.
    tracker.record(anon(), ROUTE, "client-59", T0 + HOUR_MS);
    assert_eq!(by_client(&tracker.take_written())["client-59"], 1);
}

#[test]
fn a_flood_of_one_off_clients_stays_bounded_and_does_not_hide_real_callers() {
    let tracker = CallerTracker::default();
    let mut most = Footprint::default();
    // A one-off caller before the flood, then a real client in every tenth request of it.
    tracker.record(anon(), ROUTE, "nightly-export/1.0", T0);
    for i in 0..10_000i64 {
        tracker.record(anon(), ROUTE, &format!("random-{i}/1.0"), T0 + i);
        if i % 10 == 0 {
            tracker.record(anon(), ROUTE, "supabase-js/2.47.0", T0 + i);
        }
        // One that starts mid-flood: Space-Saving's inherited estimate lets it stay long
        // enough to repeat, even though its name sorts before every flood value.
        if i >= 5_000 && i % 20 == 0 {
            tracker.record(anon(), ROUTE, "app/1.0", T0 + i);
        }
        let now = tracker.footprint();
        most.candidate_clients = most.candidate_clients.max(now.candidate_clients);
        most.counters = most.counters.max(now.counters);
    }
    assert_eq!(most.candidate_clients, MAX_CANDIDATES);
    assert!(most.counters <= MAX_CANDIDATES + 1, "{most:?}");
    let rows = tracker.take_written();
    let sums = by_client(&rows);
    assert_eq!(sums.values().sum::<i64>(), 11_251, "nothing lost");
    assert_eq!(sums["supabase-js/2.47.0"], 1_000, "{sums:?}");
    assert_eq!(sums["app/1.0"], 250, "{sums:?}");
    // Under the flood a one-off caller cannot be told from it: it is counted as other.
    assert_eq!(sums[OTHER], 10_001);
    assert_eq!(rows.len(), 3, "one-off values are never named");
    let after = tracker.footprint();
    assert_eq!(
        (after.named_clients, after.candidate_clients, after.counters),
        (2, 0, 0)
    );
}

#[test]
fn pending_counts_show_candidates_under_their_own_name() {
    let tracker = CallerTracker::default();
    tracker.record(anon(), ROUTE, "supabase-js/2.47.0", T0);
    tracker.record(anon(), ROUTE, "supabase-js/2.47.0", T0 + 1);
    let pending = tracker.pending_since(T0);
    assert_eq!(by_client(&pending)["supabase-js/2.47.0"], 2);
    assert!(tracker.pending_since(T0 + HOUR_MS).is_empty());
}

#[test]
fn pending_counts_show_waiting_clients_as_the_flush_will_count_them() {
    let tracker = CallerTracker::default();
    for client in 0..MAX_NAMED_CLIENTS + 2 {
        tracker.record(anon(), ROUTE, &format!("client-{client:02}"), T0);
    }
    tracker.take_written();
    let service = CallerKind::Legacy(LegacyKind::ServiceRoleKey);
    tracker.record(anon(), ROUTE, "client-00", T0 + 1);
    tracker.record(service, ROUTE, "client-00", T0 + 2);
    tracker.record(anon(), ROUTE, OTHER, T0 + 3);
    tracker.record(anon(), ROUTE, "late/1.0", T0 + 4);
    tracker.record(anon(), ROUTE, "late/1.0", T0 + 5);
    let mut pending: Vec<_> = tracker
        .pending_since(T0)
        .into_iter()
        .map(|row| {
            (
                row.client,
                row.kind,
                row.verified_count,
                row.last_verified_at_ms,
            )
        })
        .collect();
    pending.sort();
    assert_eq!(
        pending,
        [
            ("client-00".to_owned(), "anon_key".to_owned(), 1, T0 + 1),
            (
                "client-00".to_owned(),
                "service_role_key".to_owned(),
                1,
                T0 + 2
            ),
            // Every name of the hour is taken: the flush will count it as other, so it shows
            // there now.
            (OTHER.to_owned(), "anon_key".to_owned(), 3, T0 + 5),
        ]
    );
}

#[test]
fn legacy_verifications_are_counted_by_kind_each_kind_from_zero() {
    let tracker = CallerTracker::default();
    let mut registry = Registry::with_prefix("edgegate");
    tracker.register(&mut registry);
    // Each kind's count, as `/metrics` shows it.
    let series = |registry: &Registry| {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, registry).unwrap();
        let mut counts: Vec<(String, u64)> = text
            .lines()
            .filter_map(|line| line.strip_prefix("edgegate_legacy_verifications_total{kind=\""))
            .map(|rest| {
                let (kind, count) = rest.split_once("\"} ").unwrap();
                (kind.to_owned(), count.parse().unwrap())
            })
            .collect();
        counts.sort();
        counts
    };
    // Every kind at 0 before its first: Prometheus' `increase()` misses a series' first sample.
    assert_eq!(
        series(&registry),
        [
            ("anon_key".into(), 0),
            ("service_role_key".into(), 0),
            ("user_session".into(), 0)
        ]
    );
    let session = CallerKind::Legacy(LegacyKind::UserSession);
    for _ in 0..3 {
        tracker.record(anon(), ROUTE, "a/1", T0);
    }
    tracker.record(session, ROUTE, "a/1", T0);
    tracker.record(session, ROUTE, "b/2", T0);
    tracker.record(CallerKind::ApiKey("backend"), ROUTE, "a/1", T0);
    assert_eq!(
        series(&registry),
        [
            ("anon_key".into(), 3),
            ("service_role_key".into(), 0),
            ("user_session".into(), 2)
        ]
    );
    let service = CallerKind::Legacy(LegacyKind::ServiceRoleKey);
    tracker.record(service, ROUTE, "a/1", T0);
    assert_eq!(
        series(&registry),
        [
            ("anon_key".into(), 3),
            ("service_role_key".into(), 1),
            ("user_session".into(), 2)
        ]
    );
}

#[test]
fn rows_put_back_after_a_failed_write_are_written_next_time() {
    let tracker = CallerTracker::default();
    tracker.record(anon(), ROUTE, "supabase-js/2.47.0", T0);
    let rows = tracker.take_written();
    tracker.restore(rows.clone());
    tracker.record(anon(), ROUTE, "supabase-js/2.47.0", T0 + 5);
    let again = tracker.take_written();
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].verified_count, 2);
    assert_eq!(again[0].last_verified_at_ms, T0 + 5);
}

#[test]
fn a_late_count_for_an_hour_already_taken_keeps_its_client_named() {
    let tracker = CallerTracker::default();
    for client in 0..MAX_NAMED_CLIENTS {
        tracker.record(anon(), ROUTE, &format!("client-{client:02}"), T0);
    }
    tracker.record(anon(), ROUTE, "client-00", T0 + HOUR_MS);
    // The older hour's table goes with the take; a count for it that arrives before the failed
    // write's rows come back finds a new table, where the client waits as a candidate.
    let rows = tracker.take_written();
    tracker.record(anon(), ROUTE, "client-00", T0 + 1);
    tracker.restore(rows);
    let hour = |rows: &[CallerUsage]| {
        by_client(
            &rows
                .iter()
                .filter(|row| row.hour_start_ms == T0)
                .cloned()
                .collect::<Vec<_>>(),
        )
    };
    let again = hour(&tracker.take_written());
    assert_eq!(again.len(), MAX_NAMED_CLIENTS, "{again:?}");
    assert_eq!(again["client-00"], 2, "{again:?}");
}

#[test]
fn rows_of_other_put_back_stay_other_and_named_clients_stay_named() {
    let tracker = CallerTracker::default();
    for client in 0..MAX_NAMED_CLIENTS + 10 {
        tracker.record(anon(), ROUTE, &format!("client-{client:02}"), T0);
    }
    let rows = tracker.take_written();
    assert_eq!(by_client(&rows)[OTHER], 10);
    tracker.restore(rows);
    // A client named before the failed write is counted under its name, a new one waits.
    tracker.record(anon(), ROUTE, "client-00", T0 + 1);
    tracker.record(anon(), ROUTE, "client-59", T0 + 1);
    let again = by_client(&tracker.take_written());
    assert_eq!(again.values().sum::<i64>(), MAX_NAMED_CLIENTS as i64 + 12);
    assert_eq!(again.len(), MAX_NAMED_CLIENTS + 1, "{again:?}");
    assert_eq!(again[OTHER], 11);
    assert_eq!(again["client-00"], 2);
    assert_eq!(tracker.footprint().named_clients, MAX_NAMED_CLIENTS);
}
