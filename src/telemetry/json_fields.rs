//! Span fields for the JSON log format, kept as a JSON object that a later `record` extends in
//! place.
//!
//! tracing-subscriber's own `JsonFields` parses a span's fields and writes them out again each
//! time a field is recorded after the span was made; the credential extractor records two on
//! every authenticated request. This one writes the same JSON object (the same names and
//! values, each recorded value as `JsonFields` renders it) and appends to it instead.

use std::fmt::{self, Write as _};

use tracing::field::{Field, Visit};
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::FormattedFields;
use tracing_subscriber::fmt::format::{FormatFields, Writer};

/// The field formatter of the JSON log format.
#[derive(Debug, Default)]
pub struct AppendJsonFields;

impl<'writer> FormatFields<'writer> for AppendJsonFields {
    fn format_fields<R: RecordFields>(
        &self,
        mut writer: Writer<'writer>,
        fields: R,
    ) -> fmt::Result {
        let mut object = String::from("{");
        fields.record(&mut Members::new(&mut object));
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
        fields.record(&mut Members::new(object));
        object.push('}');
        Ok(())
    }
}

/// Appends `"name":value` members to an object whose closing brace is not written yet. A name
/// recorded twice appears twice; readers (serde_json, the JSON event formatter) keep the last,
/// as `JsonFields` does.
struct Members<'a> {
    out: &'a mut String,
    first: bool,
}

impl<'a> Members<'a> {
    fn new(out: &'a mut String) -> Self {
        let first = out.ends_with('{');
        Self { out, first }
    }

    fn member(&mut self, name: &str, value: impl FnOnce(&mut String)) {
        // As `JsonFields`: `r#type` is logged as `type`.
        let name = name.strip_prefix("r#").unwrap_or(name);
        if !self.first {
            self.out.push(',');
        }
        self.first = false;
        push_json_string(self.out, name);
        self.out.push(':');
        value(self.out);
    }
}

/// `text` as a JSON string (serde_json's escaping, so a value can never end the line or the
/// object early).
fn push_json_string(out: &mut String, text: &str) {
    // Serializing a str cannot fail.
    out.push_str(&serde_json::to_string(text).unwrap_or_default());
}

impl Visit for Members<'_> {
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.member(field.name(), |out| {
            out.push_str(&serde_json::Value::from(value).to_string());
        });
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.member(field.name(), |out| {
            let _ = write!(out, "{value}");
        });
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.member(field.name(), |out| {
            let _ = write!(out, "{value}");
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
            push_json_string(out, &format!("{value:?}"));
        });
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use serde_json::{Value, json};
    use tracing_subscriber::fmt::MakeWriter;

    use super::*;

    #[derive(Clone, Default)]
    struct Lines(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Lines {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Lines {
        type Writer = Lines;
        fn make_writer(&'a self) -> Lines {
            self.clone()
        }
    }

    /// The log lines a closure produces under the service's JSON format with `fields`.
    fn json_lines<N>(fields: N, body: impl FnOnce()) -> Vec<Value>
    where
        N: for<'w> FormatFields<'w> + Send + Sync + 'static,
    {
        let lines = Lines::default();
        let subscriber = tracing_subscriber::fmt()
            .json()
            .flatten_event(true)
            .with_span_list(false)
            .fmt_fields(fields)
            .without_time()
            .with_writer(lines.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, body);
        let text = String::from_utf8(lines.0.lock().unwrap().clone()).unwrap();
        text.lines()
            .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
            .collect()
    }

    fn scenario() {
        let span = tracing::info_span!(
            "request",
            method = %"GET",
            route = "/functions/v1/jwt-test",
            request_id = "r-1",
            n = 7u64,
            neg = -3i64,
            ok = true,
            ratio = 0.5f64,
            quote = "a \"quoted\"\nline\u{1}",
            credential_source = tracing::field::Empty,
            credential_kid = tracing::field::Empty,
        );
        let _entered = span.enter();
        tracing::info!("before");
        span.record("credential_source", "signing_key");
        span.record("credential_kid", "key-1");
        tracing::info!(status = 200u64, "response");
    }

    #[test]
    fn lines_are_those_of_tracing_subscribers_json_fields() {
        let ours = json_lines(AppendJsonFields, scenario);
        let theirs = json_lines(tracing_subscriber::fmt::format::JsonFields::new(), scenario);
        assert_eq!(ours.len(), 2);
        assert_eq!(ours, theirs);
        let span = &ours[1]["span"];
        assert_eq!(span["credential_source"], json!("signing_key"));
        assert_eq!(span["credential_kid"], json!("key-1"));
        assert_eq!(span["quote"], json!("a \"quoted\"\nline\u{1}"));
        assert_eq!(span["ratio"], json!(0.5));
        assert!(ours[0]["span"].get("credential_source").is_none());
    }

    #[test]
    fn a_field_recorded_again_keeps_its_last_value() {
        let ours = json_lines(AppendJsonFields, || {
            let span = tracing::info_span!("request", kid = tracing::field::Empty);
            let _entered = span.enter();
            span.record("kid", "a");
            span.record("kid", "b");
            tracing::info!("line");
        });
        assert_eq!(ours[0]["span"]["kid"], json!("b"));
    }
}
