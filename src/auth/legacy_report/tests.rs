use super::*;

const NOW: i64 = 1_796_117_400_000; // 2026-12-01 09:30 UTC
const DAY: Duration = Duration::from_secs(86_400);

fn caller(hours_ago: i64, kind: &str, client: &str, count: i64) -> CallerUsage {
    let hour = hour_of(NOW) - hours_ago * HOUR_MS;
    CallerUsage {
        hour_start_ms: hour,
        source: "legacy_secret".to_owned(),
        kind: kind.to_owned(),
        route: "/functions/v1/jwt-test".to_owned(),
        client: client.to_owned(),
        verified_count: count,
        last_verified_at_ms: hour + 60_000,
    }
}

#[test]
fn thousands_are_separated() {
    assert_eq!(thousands(0), "0");
    assert_eq!(thousands(999), "999");
    assert_eq!(thousands(1_204), "1,204");
    assert_eq!(thousands(1_234_567), "1,234,567");
}

#[test]
fn callers_are_summed_across_rows_and_hours_and_sorted_by_count() {
    let rows = [
        caller(0, "anon_key", "supabase-js/2.47.0", 700),
        caller(0, "anon_key", "supabase-js/2.47.0", 4), // another instance's row
        caller(3, "anon_key", "supabase-js/2.47.0", 500),
        caller(1, "service_role_key", "nightly-export/1.0", 9),
        caller(30, "user_session", "okhttp/4.12.0", 99), // before the window
    ];
    let usage = summarize(&[], &rows, DAY, NOW);
    let listed: Vec<(&str, i64)> = usage
        .legacy_usage
        .iter()
        .map(|row| (row.kind.as_str(), row.count))
        .collect();
    assert_eq!(listed, [("anon_key", 1_204), ("service_role_key", 9)]);
    assert_eq!(usage.legacy_kinds[2].last_seen, None);
    let anon = &usage.hourly.series[0];
    assert_eq!(anon.kind.as_deref(), Some("anon_key"));
    assert_eq!(anon.hourly.len(), 25);
    assert_eq!((anon.hourly[24], anon.hourly[21]), (704, 500));
}

#[test]
fn the_reason_names_the_top_caller_only_when_not_safe() {
    let usage = summarize(
        &[],
        &[caller(0, "anon_key", "supabase-js/2.47.0", 1_204)],
        DAY,
        NOW,
    );
    let mut verdict = LegacyVerdict {
        legacy_revocation_safe: false,
        reason: "1204 verification(s) with the legacy secret in the last 24 h".to_owned(),
    };
    name_top_caller(&mut verdict, &usage.legacy_usage, None, DAY);
    assert_eq!(
        verdict.reason,
        "legacy anon_key still used by supabase-js/2.47.0 on /functions/v1/jwt-test, 1,204 times in the last 24 h; 1,204 verifications with the legacy secret in all, from 1 client"
    );
    let mut safe = LegacyVerdict {
        legacy_revocation_safe: true,
        reason: "the legacy secret is not configured".to_owned(),
    };
    name_top_caller(&mut safe, &usage.legacy_usage, None, DAY);
    assert_eq!(safe.reason, "the legacy secret is not configured");
}

/// `other` holds every client not named, a flood of one-off values among them: it is not a
/// caller to fix, so the reason names the top one that is, and says what `other` holds apart.
#[test]
fn the_reason_never_names_other_nor_counts_it_as_a_caller() {
    let unsafe_verdict = || LegacyVerdict {
        legacy_revocation_safe: false,
        reason: "in use".to_owned(),
    };
    let usage = summarize(
        &[],
        &[
            caller(0, "anon_key", OTHER, 300),
            caller(0, "anon_key", "supabase-js/2.47.0", 20),
            caller(1, "user_session", "okhttp/4.12.0", 1),
        ],
        DAY,
        NOW,
    );
    let mut verdict = unsafe_verdict();
    name_top_caller(&mut verdict, &usage.legacy_usage, None, DAY);
    assert_eq!(
        verdict.reason,
        "legacy anon_key still used by supabase-js/2.47.0 on /functions/v1/jwt-test, 20 times in the last 24 h; 321 verifications with the legacy secret in all, 21 from 2 named clients and 300 from clients not named (counted as other)"
    );
    let usage = summarize(&[], &[caller(0, "anon_key", OTHER, 1)], DAY, NOW);
    let mut verdict = unsafe_verdict();
    name_top_caller(&mut verdict, &usage.legacy_usage, None, DAY);
    assert_eq!(
        verdict.reason,
        "legacy anon_key still used on /functions/v1/jwt-test by clients not named (counted as other), 1 time in the last 24 h; 1 verification with the legacy secret in all, none from a named client"
    );
}

/// A legacy key no secret could verify (beside the credential that counted, after revocation) is
/// listed apart from the legacy callers: it is no verification with the legacy secret, so the
/// reason neither names it nor counts it, and `legacy_kinds` leaves it out.
#[test]
fn unverified_legacy_keys_are_listed_apart_and_never_the_reason() {
    let usage = summarize(
        &[],
        &[
            caller(0, "anon_key_unverified", "supabase-js/2.47.0", 50),
            caller(0, "user_session", "okhttp/4.12.0", 2),
        ],
        DAY,
        NOW,
    );
    let kinds =
        |rows: &[CallerRow]| -> Vec<String> { rows.iter().map(|r| r.kind.clone()).collect() };
    assert_eq!(kinds(&usage.legacy_usage), ["user_session"]);
    assert_eq!(
        kinds(&usage.unverified_legacy_usage),
        ["anon_key_unverified"]
    );
    assert_eq!(usage.unverified_legacy_usage[0].count, 50);
    assert_eq!(usage.legacy_kinds[0].count, 0);
    let mut verdict = LegacyVerdict {
        legacy_revocation_safe: false,
        reason: "in use".to_owned(),
    };
    name_top_caller(&mut verdict, &usage.legacy_usage, None, DAY);
    assert_eq!(
        verdict.reason,
        "legacy user_session still used by okhttp/4.12.0 on /functions/v1/jwt-test, 2 times in the last 24 h; 2 verifications with the legacy secret in all, from 1 client"
    );
}

/// Counts are kept by the hour: an hour whose last use is before the window's start is in no
/// number; one used inside the window counts whole, and the answer names it.
#[test]
fn an_hour_counts_whole_when_used_inside_the_window_and_not_at_all_otherwise() {
    let window = Duration::from_secs(600); // 09:20 to 09:30
    let used_at = |minute: i64, count: i64| {
        let mut row = caller(0, "anon_key", "supabase-js/2.47.0", count);
        row.last_verified_at_ms = hour_of(NOW) + minute * 60_000;
        row
    };
    let before = summarize(&[], &[used_at(15, 3)], window, NOW);
    assert_eq!(before.legacy_usage, []);
    assert_eq!(before.hourly.series, []);
    assert_eq!(before.legacy_kinds[0].count, 0);
    assert_eq!(before.straddling_hour_ms, None);

    let inside = summarize(&[], &[used_at(25, 3)], window, NOW);
    assert_eq!(inside.legacy_usage[0].count, 3);
    assert_eq!(inside.hourly.series[0].count, 3);
    assert_eq!(inside.legacy_kinds[0].count, 3);
    assert_eq!(inside.straddling_hour_ms, Some(hour_of(NOW)));

    // A window that starts on the hour has no hour straddling it.
    let on_the_hour = summarize(&[], &[used_at(25, 3)], Duration::from_secs(1_800), NOW);
    assert_eq!(on_the_hour.legacy_kinds[0].count, 3);
    assert_eq!(on_the_hour.straddling_hour_ms, None);
}

/// Legacy verifications the key counts hold and no caller row of their hour does (an edgegate
/// from before caller counts wrote the key counts alone) are listed apart, no caller named, and
/// the reason's total counts them; an hour with more callers than key counts takes nothing from
/// another.
#[test]
fn legacy_use_with_no_caller_recorded_is_counted_apart() {
    let key = |hours_ago: i64, count: i64| {
        let hour = hour_of(NOW) - hours_ago * HOUR_MS;
        KeyUsage {
            hour_start_ms: hour,
            source: "legacy_secret".to_owned(),
            kid: String::new(),
            alg: "HS256".to_owned(),
            verified_count: count,
            last_verified_at_ms: hour + 120_000,
        }
    };
    let callers = [
        caller(0, "anon_key", "supabase-js/2.47.0", 20),
        caller(0, "anon_key", OTHER, 300),
        caller(1, "user_session", "okhttp/4.12.0", 6),
    ];
    // 5 more than this hour's callers, 4 in an hour with none, 2 fewer an hour ago.
    let keys = [key(0, 325), key(2, 4), key(1, 4)];
    let usage = summarize(&keys, &callers, DAY, NOW);
    let without = usage.legacy_usage_without_caller.unwrap();
    assert_eq!(
        (without.count, without.last_seen),
        (9, hour_of(NOW) + 120_000)
    );
    assert_eq!(usage.legacy_usage.len(), 3);
    let mut verdict = LegacyVerdict {
        legacy_revocation_safe: false,
        reason: "in use".to_owned(),
    };
    name_top_caller(
        &mut verdict,
        &usage.legacy_usage,
        usage.legacy_usage_without_caller,
        DAY,
    );
    assert_eq!(
        verdict.reason,
        "legacy anon_key still used by supabase-js/2.47.0 on /functions/v1/jwt-test, 20 times in the last 24 h; 335 verifications with the legacy secret in all, 26 from 2 named clients, 300 from clients not named (counted as other) and 9 with no caller recorded (counted by an edgegate from before caller counts, or by a later one from before 2026-12-07 whose caller write failed after its key counts were written, or left out of the per-caller counts in a long database outage, or, rarely, counted just as a flush began, or by one from before 2026-12-08 just as an hour ended)"
    );

    // No caller at all: the verdict's own count, none with its caller.
    let usage = summarize(&[key(2, 4)], &[], DAY, NOW);
    assert_eq!(usage.legacy_usage_without_caller.unwrap().count, 4);
    let mut verdict = LegacyVerdict {
        legacy_revocation_safe: false,
        reason: "4 verification(s) with the legacy secret in the last 24 h".to_owned(),
    };
    name_top_caller(
        &mut verdict,
        &usage.legacy_usage,
        usage.legacy_usage_without_caller,
        DAY,
    );
    assert_eq!(
        verdict.reason,
        "4 verification(s) with the legacy secret in the last 24 h, none with its caller recorded (counted by an edgegate from before caller counts, or by a later one from before 2026-12-07 whose caller write failed after its key counts were written, or left out of the per-caller counts in a long database outage, or, rarely, counted just as a flush began, or by one from before 2026-12-08 just as an hour ended)"
    );

    // Every verification with its caller: nothing apart.
    let usage = summarize(&[key(0, 320)], &callers[..2], DAY, NOW);
    assert_eq!(usage.legacy_usage_without_caller, None);
}
