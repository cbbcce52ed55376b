//! The JSON log format: span fields kept as a JSON object that a later `record` extends in
//! place, and event lines that carry that object as it is.
//!
//! tracing-subscriber's own JSON format parses a span's fields and writes them out again each
//! time a field is recorded after the span was made (the credential extractor records two on
//! every authenticated request), and again for every line written inside the span, through a
//! `serde_json` serializer that checks each piece it writes as UTF-8. That was a third of the
//! instructions of a `/healthz` request. [`AppendJsonFields`] writes the same JSON object (the
//! same names and values, each value as `JsonFields` renders it) and appends to it;
//! [`JsonLines`] writes the same lines as `Format<Json>` with `flatten_event(true)` and
//! `with_span_list(false)`, the span's object spliced in as text.

use std::fmt::{self, Write as _};

use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_log::NormalizeEvent as _;
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::format::{FormatEvent, FormatFields, Writer};
use tracing_subscriber::fmt::{FmtContext, FormattedFields};
use tracing_subscriber::registry::LookupSpan;

use crate::json_text::{Escaping, needs_escape, push_json_string};

/// The field formatter of the JSON log format.
#[derive(Debug, Default)]
pub struct AppendJsonFields;

impl<'writer> FormatFields<'writer> for AppendJsonFields {
    fn format_fields<R: RecordFields>(
        &self,
        mut writer: Writer<'writer>,
        fields: R,
    ) -> fmt::Result {
        // Room for a request span's fields at once (they grew through four reallocations).
        let mut object = String::with_capacity(256);
        object.push('{');
        fields.record(&mut Members::span(&mut object));
        object.push('}');
        writer.write_str(&object)
    }

    fn add_fields(
        &self,
        current: &'writer mut FormattedFields<Self>,
        fields: &tracing::span::Record<'_>,
    ) -> fmt::Result {
        let object = &mut current.fields;
        // Only this formatter writes here, always a `{...}` object, or nothing yet.
        if object.pop() != Some('}') {
            object.clear();
            object.push('{');
        }
        let mut members = Members::span(object);
        members.replace = true;
        fields.record(&mut members);
        object.push('}');
        Ok(())
    }
}

/// The event formatter of the JSON log format: `{"timestamp":…,"level":…,<the event's
/// fields>,"target":…,"span":{<its fields>,"name":…}}`, as tracing-subscriber's `Format<Json>`
/// writes it with `flatten_event(true)` and `with_span_list(false)` (the span's members in the
/// order they were recorded rather than sorted by name). Only over [`AppendJsonFields`], whose
/// objects it splices in unread.
#[derive(Debug, Default)]
pub struct JsonLines;

impl<S> FormatEvent<S, AppendJsonFields> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, AppendJsonFields>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        // An event forwarded from the `log` crate, under the level and target its record had.
        let normalized = event.normalized_metadata();
        let meta = normalized.as_ref().unwrap_or_else(|| event.metadata());
        let mut line = String::with_capacity(512);
        line.push_str("{\"timestamp\":\"");
        push_timestamp(&mut line, std::time::SystemTime::now());
        line.push_str("\",\"level\":\"");
        line.push_str(meta.level().as_str());
        line.push('"');
        event.record(&mut Members::event(&mut line));
        line.push_str(",\"target\":");
        push_json_string(&mut line, meta.target());
        let span = event
            .parent()
            .and_then(|id| ctx.span(id))
            .or_else(|| ctx.lookup_current());
        if let Some(span) = span {
            line.push_str(",\"span\":{");
            let extensions = span.extensions();
            let members = extensions
                .get::<FormattedFields<AppendJsonFields>>()
                .and_then(|fields| fields.fields.strip_prefix('{')?.strip_suffix('}'))
                .unwrap_or_default();
            line.push_str(members);
            if !members.is_empty() {
                line.push(',');
            }
            line.push_str("\"name\":");
            push_json_string(&mut line, span.metadata().name());
            line.push('}');
        }
        line.push_str("}\n");
        writer.write_str(&line)
    }
}

/// Appends `"name":value` members to an object whose closing brace is not written yet.
struct Members<'a> {
    out: &'a mut String,
    /// Whether names are written as `JsonFields` writes a span's (`r#type` as `type`) rather
    /// than as an event's line has them (as they are).
    span: bool,
    /// Whether a name already in the object is taken out first, so that the object holds each
    /// name once, with its last value (a span field recorded again).
    replace: bool,
}

impl<'a> Members<'a> {
    fn span(out: &'a mut String) -> Self {
        Self {
            out,
            span: true,
            replace: false,
        }
    }

    /// Members after others (an event's fields follow the line's level).
    fn event(out: &'a mut String) -> Self {
        Self {
            out,
            span: false,
            replace: false,
        }
    }

    fn member(&mut self, name: &str, value: impl FnOnce(&mut String)) {
        let name = if self.span {
            name.strip_prefix("r#").unwrap_or(name)
        } else {
            name
        };
        // A name that appears nowhere in the object cannot be a member of it (most records
        // fill in a field for the first time); only a name written as it is can be looked for
        // so, one that needs escaping always takes the full search.
        if self.replace && (needs_escape(name) || self.out.contains(name)) {
            let mut quoted = String::with_capacity(name.len() + 2);
            push_json_string(&mut quoted, name);
            remove_member(self.out, &quoted);
        }
        if !self.out.ends_with('{') {
            self.out.push(',');
        }
        push_json_string(self.out, name);
        self.out.push(':');
        value(self.out);
    }
}

/// Takes the member named `quoted` (a JSON string, quotes included) out of `object`, an object
/// whose closing brace is not written yet, if it is there.
fn remove_member(object: &mut String, quoted: &str) {
    // A `"` inside a string of the object is always escaped, so a `{` or `,` followed by the
    // quoted name and `:` can only be where a member starts.
    let bytes = object.as_bytes();
    let name = quoted.as_bytes();
    let start = memchr::memchr_iter(b'"', bytes).find_map(|at| {
        (at > 0
            && matches!(bytes[at - 1], b'{' | b',')
            && bytes[at..].starts_with(name)
            && bytes.get(at + name.len()) == Some(&b':'))
        .then(|| at - 1)
    });
    let Some(start) = start else {
        return;
    };
    let value = start + 1 + quoted.len() + 1;
    let mut values =
        serde_json::Deserializer::from_str(&object[value..]).into_iter::<serde::de::IgnoredAny>();
    if !matches!(values.next(), Some(Ok(_))) {
        return;
    }
    let end = value + values.byte_offset();
    if object.as_bytes()[start] == b'{' {
        // The first member: its comma is the one after it, if another member follows.
        let end = if object.as_bytes().get(end) == Some(&b',') {
            end + 1
        } else {
            end
        };
        object.replace_range(start + 1..end, "");
    } else {
        object.replace_range(start..end, "");
    }
}

/// `time` as tracing-subscriber's `SystemTime` timer writes it, RFC 3339 in UTC with
/// microseconds (`2026-12-01T21:24:14.123456Z`), without going through `fmt` (which cost a
/// sixth of a `/healthz` request's log line).
fn push_timestamp(out: &mut String, time: std::time::SystemTime) {
    // Seconds and nanoseconds since the epoch, floored (as tracing-subscriber does before it).
    let (secs, nanos) = match time.duration_since(std::time::UNIX_EPOCH) {
        Ok(d) => (
            i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
            d.subsec_nanos(),
        ),
        Err(e) => {
            let d = e.duration();
            let secs = i64::try_from(d.as_secs()).unwrap_or(i64::MAX);
            match d.subsec_nanos() {
                0 => (-secs, 0),
                n => (-secs - 1, 1_000_000_000 - n),
            }
        }
    };
    let (days, second_of_day) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (year, month, day) = civil_from_days(days);
    if (0..=9999).contains(&year) {
        push_digits(out, year, 4);
    } else if year > 9999 {
        let _ = write!(out, "+{year}");
    } else {
        let _ = write!(out, "{year:05}");
    }
    out.push('-');
    push_digits(out, month, 2);
    out.push('-');
    push_digits(out, day, 2);
    out.push('T');
    push_digits(out, second_of_day / 3600, 2);
    out.push(':');
    push_digits(out, second_of_day / 60 % 60, 2);
    out.push(':');
    push_digits(out, second_of_day % 60, 2);
    out.push('.');
    push_digits(out, i64::from(nanos / 1_000), 6);
    out.push('Z');
}

/// The last `width` decimal digits of `value` (not negative), zero-padded.
fn push_digits(out: &mut String, value: i64, width: u32) {
    let mut divisor = 10_i64.pow(width - 1);
    while divisor > 0 {
        let digit = u8::try_from(value / divisor % 10).unwrap_or(0);
        out.push(char::from(b'0' + digit));
        divisor /= 10;
    }
}

/// Year, month (1–12) and day (1–31) of the proleptic Gregorian calendar, `days` after
/// 1970-01-01 (Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1_460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let shifted_month = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * shifted_month + 2) / 5 + 1;
    let month = if shifted_month < 10 {
        shifted_month + 3
    } else {
        shifted_month - 9
    };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// `value` as serde_json writes an `f64` (`Value::from(value)`): the shortest text that reads
/// back as the same number (zmij's, which serde_json uses), `null` for NaN and the infinities.
fn push_f64(out: &mut String, value: f64) {
    if value.is_finite() {
        out.push_str(zmij::Buffer::new().format_finite(value));
    } else {
        out.push_str("null");
    }
}

impl Visit for Members<'_> {
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.member(field.name(), |out| push_f64(out, value));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.member(field.name(), |out| {
            out.push_str(itoa::Buffer::new().format(value))
        });
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.member(field.name(), |out| {
            out.push_str(itoa::Buffer::new().format(value))
        });
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.member(field.name(), |out| {
            out.push_str(if value { "true" } else { "false" });
        });
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.member(field.name(), |out| push_json_string(out, value));
    }

    fn record_bytes(&mut self, field: &Field, value: &[u8]) {
        self.member(field.name(), |out| {
            out.push_str(&serde_json::Value::from(value).to_string());
        });
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.member(field.name(), |out| {
            out.push('"');
            // Writing into a `String` cannot fail; a `Debug` that fails leaves what it wrote.
            let _ = write!(Escaping(out), "{value:?}");
            out.push('"');
        });
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;
    use crate::telemetry::LogLines;

    /// The log text a closure produces under the service's JSON format.
    fn ours(body: impl FnOnce()) -> String {
        let lines = LogLines::default();
        let subscriber = tracing_subscriber::fmt()
            .fmt_fields(AppendJsonFields)
            .event_format(JsonLines)
            .with_max_level(tracing::Level::TRACE)
            .with_writer(lines.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, body);
        lines.text()
    }

    /// The log text a closure produces under tracing-subscriber's JSON format, as the service
    /// configured it before [`JsonLines`].
    fn theirs(body: impl FnOnce()) -> String {
        let lines = LogLines::default();
        tracing::subscriber::with_default(lines.tracing_subscribers_json(), body);
        lines.text()
    }

    /// Each line parsed, with its timestamp checked for the shape both formats give it
    /// (RFC 3339, UTC, microseconds) and taken out, as it differs from run to run.
    fn parsed(text: &str) -> Vec<Value> {
        assert!(text.ends_with('\n'), "{text:?}");
        text.lines()
            .map(|line| {
                let mut value: Value =
                    serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
                let stamp = value["timestamp"].take();
                let stamp = stamp
                    .as_str()
                    .unwrap_or_else(|| panic!("no timestamp: {line}"));
                assert_eq!(stamp.len(), "2026-12-01T17:30:00.123456Z".len(), "{stamp}");
                assert!(
                    stamp.ends_with('Z') && stamp.as_bytes()[10] == b'T',
                    "{stamp}"
                );
                value.as_object_mut().unwrap().remove("timestamp");
                value
            })
            .collect()
    }

    fn scenario() {
        tracing::warn!(reason = "outside any span", "started");
        let span = tracing::info_span!(
            "request",
            method = %"GET",
            route = "/functions/v1/jwt-test",
            request_id = "r-1",
            n = 7u64,
            neg = -3i64,
            ok = true,
            ratio = 0.5f64,
            quote = "a \"quoted\"\nline\u{1}\u{7f} é \u{2028}😀 \\",
            bytes = &b"ab"[..],
            shown = %"a \"shown\" value\n\u{2}\\",
            debugged = ?"a \"debugged\" value\t\u{1b}",
            credential_source = tracing::field::Empty,
            credential_kid = tracing::field::Empty,
        );
        let _entered = span.enter();
        tracing::info!("before");
        span.record("credential_source", "signing_key");
        span.record("credential_kid", "key-1");
        let inner = tracing::info_span!("inner");
        inner.in_scope(|| {
            tracing::debug!(big = u64::MAX, nan = f64::NAN, "in a span without fields")
        });
        tracing::info!(
            status = 200u64,
            latency_ms = 0.125f64,
            debug = ?Some("x"),
            "response {}",
            "formatted"
        );
        tracing::error!(parent: None, "no parent");
    }

    #[test]
    fn lines_are_those_of_tracing_subscribers_json_format() {
        let ours = parsed(&ours(scenario));
        let theirs = parsed(&theirs(scenario));
        assert_eq!(ours.len(), 5);
        assert_eq!(ours, theirs);
        let span = &ours[3]["span"];
        assert_eq!(span["credential_source"], json!("signing_key"));
        assert_eq!(span["credential_kid"], json!("key-1"));
        assert_eq!(
            span["quote"],
            json!("a \"quoted\"\nline\u{1}\u{7f} é \u{2028}😀 \\")
        );
        assert_eq!(span["ratio"], json!(0.5));
        assert_eq!(span["name"], json!("request"));
        assert!(ours[1]["span"].get("credential_source").is_none());
        assert_eq!(ours[2]["span"], json!({"name": "inner"}));
        assert_eq!(ours[3]["message"], json!("response formatted"));
        assert!(ours[0].get("span").is_none());
    }

    #[test]
    fn a_field_recorded_again_keeps_its_last_value_once() {
        let text = ours(|| {
            let span = tracing::info_span!(
                "request",
                first = tracing::field::Empty,
                kid = tracing::field::Empty,
                last = tracing::field::Empty,
            );
            let _entered = span.enter();
            span.record("kid", "a");
            span.record("kid", r#"b,"kid":"c"#);
            span.record("first", 1);
            span.record("last", 2);
            span.record("first", json!({"n": [1, "]"]}).to_string());
            span.record("last", 3);
            span.record("kid", "d");
            tracing::info!("line");
        });
        let lines = parsed(&text);
        assert_eq!(
            lines[0]["span"],
            json!({"first": "{\"n\":[1,\"]\"]}", "kid": "d", "last": 3, "name": "request"})
        );
        assert_eq!(text.matches(r#""kid":"#).count(), 1, "{text}");
        assert_eq!(text.matches(r#""first":"#).count(), 1, "{text}");
        assert_eq!(text.matches(r#""last":"#).count(), 1, "{text}");
    }

    #[test]
    fn a_field_whose_name_needs_escaping_is_replaced_too() {
        let text = ours(|| {
            let span = tracing::info_span!(
                "request",
                "a \"quoted\" name" = tracing::field::Empty,
                other = "a \"quoted\" name",
            );
            let _entered = span.enter();
            span.record("a \"quoted\" name", 1);
            span.record("a \"quoted\" name", 2);
            tracing::info!("line");
        });
        let lines = parsed(&text);
        assert_eq!(
            lines[0]["span"],
            json!({"other": "a \"quoted\" name", "a \"quoted\" name": 2, "name": "request"})
        );
        assert_eq!(text.matches(r#""a \"quoted\" name":"#).count(), 1, "{text}");
    }

    #[test]
    fn floats_are_written_as_serde_json_writes_them() {
        for value in [
            0.0,
            -0.0,
            0.125,
            1.0 / 3.0,
            -2.5e-7,
            1e21,
            1e300,
            123_456_789.0,
            f64::MAX,
            f64::MIN_POSITIVE,
            5e-324,
            f64::NAN,
            f64::INFINITY,
            f64::NEG_INFINITY,
        ] {
            let mut ours = String::new();
            push_f64(&mut ours, value);
            assert_eq!(
                ours,
                serde_json::Value::from(value).to_string(),
                "{value:?}"
            );
        }
    }

    fn at(secs: i64, micros: u32) -> std::time::SystemTime {
        let epoch = std::time::UNIX_EPOCH;
        let whole = std::time::Duration::from_secs(secs.unsigned_abs());
        let base = if secs >= 0 {
            epoch + whole
        } else {
            epoch - whole
        };
        base + std::time::Duration::from_micros(u64::from(micros))
    }

    fn stamp(time: std::time::SystemTime) -> String {
        let mut out = String::new();
        push_timestamp(&mut out, time);
        out
    }

    #[test]
    fn timestamps_are_those_of_an_independent_calendar() {
        // Expected values from Python's datetime (proleptic Gregorian, UTC); year 1 padded to
        // four digits as tracing-subscriber pads it.
        let cases = [
            (0, 0, "1970-01-01T00:00:00.000000Z"),
            (-1, 0, "1969-12-31T23:59:59.000000Z"),
            (-1, 500_000, "1969-12-31T23:59:59.500000Z"),
            (951_782_400, 0, "2000-02-29T00:00:00.000000Z"),
            (951_868_799, 999_999, "2000-02-29T23:59:59.999999Z"),
            (4_107_542_400, 0, "2100-03-01T00:00:00.000000Z"),
            (1_796_160_000, 123_456, "2026-12-01T21:20:00.123456Z"),
            (253_402_300_799, 999_999, "9999-12-31T23:59:59.999999Z"),
            (-62_135_596_800, 0, "0001-01-01T00:00:00.000000Z"),
            (-11_644_473_600, 1, "1601-01-01T00:00:00.000001Z"),
            // Beyond four digits, tracing-subscriber's sign and width.
            (2_932_897 * 86_400, 0, "+10000-01-01T00:00:00.000000Z"),
        ];
        for (secs, micros, expected) in cases {
            assert_eq!(stamp(at(secs, micros)), expected, "{secs} s {micros} µs");
        }
    }

    #[test]
    fn every_day_of_eight_centuries_follows_the_calendar() {
        // A second, naive calendar walked one day at a time from 1600-01-01.
        let leap = |y: i64| (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
        let month_days = |y: i64, m: i64| match m {
            2 if leap(y) => 29,
            2 => 28,
            4 | 6 | 9 | 11 => 30,
            _ => 31,
        };
        let (mut y, mut m, mut d) = (1600, 1, 1);
        // 1600-01-01 is 135,140 days before 1970-01-01.
        for days in -135_140..157_000 {
            assert_eq!(civil_from_days(days), (y, m, d), "day {days}");
            d += 1;
            if d > month_days(y, m) {
                d = 1;
                m += 1;
                if m > 12 {
                    m = 1;
                    y += 1;
                }
            }
        }
        // 157,000 days after 1970-01-01 (Python: date(1970, 1, 1) + timedelta(days=157000)).
        assert_eq!(
            (y, m, d),
            (2399, 11, 8),
            "the walk ends where the calendar says"
        );
    }

    #[test]
    fn timestamps_match_tracing_subscribers_timer() {
        use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
        for _ in 0..1_000 {
            let before = stamp(std::time::SystemTime::now());
            let mut theirs = String::new();
            SystemTime
                .format_time(&mut Writer::new(&mut theirs))
                .unwrap();
            let after = stamp(std::time::SystemTime::now());
            // Same shape, so the strings order as the instants do.
            assert!(
                before <= theirs && theirs <= after,
                "{before} <= {theirs} <= {after}"
            );
        }
    }
}
