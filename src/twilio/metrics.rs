//! SMS metrics: sends by outcome (`edgegate_sms_sent_total`), delivery statuses applied by status
//! and source (`edgegate_sms_status_total`). Every label value comes from a closed set (a status
//! outside it is `other`): never a SID, a number or Twilio's words. Each series is created, and
//! its handle kept, when the metrics are: a count is one atomic add, with no labels built,
//! hashed or looked up, and every series is there at 0 from the start, so an alert on its
//! increase sees the first one.

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

use super::status::STATUS_RANKS;

/// What a send came to, as `edgegate_sms_sent_total{outcome}` counts it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SendOutcome {
    /// Twilio took the message (it has a SID).
    Accepted,
    /// Twilio refused it (an error answer with a code: the number, the body, our account…).
    Refused,
    /// Twilio throttled every attempt: nothing was sent.
    Throttled,
    /// Twilio could not be reached, or the send ran out of time before calling it: nothing sent.
    NotSent,
    /// Twilio may have the message but did not confirm it (a timeout after sending, an answer
    /// that could not be read): the row is `unknown`, never sent again.
    Unknown,
    /// A send limit (`SMS_MAX_PER_RECIPIENT_PER_HOUR`, `SMS_MAX_PER_MINUTE`) refused it: 429.
    RateLimited,
    /// A repeat of an idempotency key answered with the earlier send's 202, Twilio not called.
    Replayed,
}

impl SendOutcome {
    pub const ALL: [Self; 7] = [
        Self::Accepted,
        Self::Refused,
        Self::Throttled,
        Self::NotSent,
        Self::Unknown,
        Self::RateLimited,
        Self::Replayed,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Self::Accepted => "accepted",
            Self::Refused => "refused",
            Self::Throttled => "throttled",
            Self::NotSent => "not_sent",
            Self::Unknown => "unknown",
            Self::RateLimited => "rate_limited",
            Self::Replayed => "replayed",
        }
    }
}

/// Where an applied status came from, as `edgegate_sms_status_total{source}` counts it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StatusSource {
    /// A signed status callback from Twilio.
    Callback,
    /// The recovery pass, which asks Twilio for statuses whose callbacks were lost.
    Recovery,
}

impl StatusSource {
    pub const ALL: [Self; 2] = [Self::Callback, Self::Recovery];

    pub fn label(self) -> &'static str {
        match self {
            Self::Callback => "callback",
            Self::Recovery => "recovery",
        }
    }
}

/// The `status` label of a status outside [`STATUS_RANKS`].
const OTHER_STATUS: &str = "other";

/// The `status` label for `status`: itself when it is one of [`STATUS_RANKS`], else `other`.
pub fn status_label(status: &str) -> &'static str {
    STATUS_RANKS
        .iter()
        .map(|(name, _)| *name)
        .find(|name| *name == status)
        .unwrap_or(OTHER_STATUS)
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SentLabels {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabels {
    status: &'static str,
    source: &'static str,
}

/// The SMS counters, registered by [`SmsMetrics::register`]; clones share them.
#[derive(Clone, Debug)]
pub struct SmsMetrics(Arc<Series>);

#[derive(Debug)]
struct Series {
    sent_family: Family<SentLabels, Counter>,
    status_family: Family<StatusLabels, Counter>,
    /// `sent_family`'s series, in [`SendOutcome::ALL`]'s order.
    sent: Vec<Counter>,
    /// `status_family`'s series: for each status label ([`STATUS_RANKS`]' then `other`), one
    /// per source in [`StatusSource::ALL`]'s order.
    statuses: Vec<(&'static str, [Counter; 2])>,
}

impl Default for SmsMetrics {
    fn default() -> Self {
        let sent_family = Family::<SentLabels, Counter>::default();
        let status_family = Family::<StatusLabels, Counter>::default();
        let sent = SendOutcome::ALL
            .iter()
            .map(|outcome| {
                sent_family
                    .get_or_create(&SentLabels {
                        outcome: outcome.label(),
                    })
                    .clone()
            })
            .collect();
        let statuses = STATUS_RANKS
            .iter()
            .map(|(status, _)| *status)
            .chain([OTHER_STATUS])
            .map(|status| {
                let series = StatusSource::ALL.map(|source| {
                    status_family
                        .get_or_create(&StatusLabels {
                            status,
                            source: source.label(),
                        })
                        .clone()
                });
                (status, series)
            })
            .collect();
        Self(Arc::new(Series {
            sent_family,
            status_family,
            sent,
            statuses,
        }))
    }
}

impl SmsMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "sms_sent",
            "SMS sends, by outcome: accepted (Twilio took it), refused (Twilio refused it), \
             throttled or not_sent (Twilio never took it), unknown (Twilio may have it; not \
             confirmed), rate_limited (a send limit refused it), replayed (an idempotency key's \
             earlier 202 answered again)",
            self.0.sent_family.clone(),
        );
        registry.register(
            "sms_status",
            "SMS delivery statuses applied (a message's status moved forward), by status \
             (Twilio's, other for one outside the known set) and source (callback, recovery)",
            self.0.status_family.clone(),
        );
    }

    pub fn sent(&self, outcome: SendOutcome) {
        // `ALL` is in declaration order.
        self.0.sent[outcome as usize].inc();
    }

    /// Counts `status` applied to a message, from `source`.
    pub fn status_applied(&self, status: &str, source: StatusSource) {
        let label = status_label(status);
        if let Some((_, series)) = self.0.statuses.iter().find(|(name, _)| *name == label) {
            // `ALL` is in declaration order.
            series[source as usize].inc();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(metrics: &SmsMetrics) -> String {
        let mut registry = Registry::default();
        metrics.register(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        text
    }

    #[test]
    fn statuses_outside_the_known_set_are_other() {
        assert_eq!(status_label("delivered"), "delivered");
        assert_eq!(status_label("partially_delivered"), "partially_delivered");
        for outside in [
            "receiving",
            "DELIVERED",
            "",
            "SM0123",
            "30007",
            "+12025550123",
        ] {
            assert_eq!(status_label(outside), "other", "{outside:?}");
        }
    }

    #[test]
    fn every_series_is_there_at_zero_and_counts_under_its_own_labels() {
        let metrics = SmsMetrics::default();
        let before = text(&metrics);
        for outcome in SendOutcome::ALL {
            let line = format!("sms_sent_total{{outcome=\"{}\"}} 0", outcome.label());
            assert!(before.lines().any(|l| l == line), "{line} in {before}");
        }
        assert!(
            before.contains(r#"sms_status_total{status="other",source="recovery"} 0"#),
            "{before}"
        );
        metrics.sent(SendOutcome::Accepted);
        metrics.sent(SendOutcome::Accepted);
        metrics.sent(SendOutcome::RateLimited);
        metrics.status_applied("undelivered", StatusSource::Callback);
        metrics.status_applied("delivered", StatusSource::Recovery);
        metrics.status_applied("receiving", StatusSource::Callback);
        let after = text(&metrics);
        for line in [
            r#"sms_sent_total{outcome="accepted"} 2"#,
            r#"sms_sent_total{outcome="rate_limited"} 1"#,
            r#"sms_sent_total{outcome="refused"} 0"#,
            r#"sms_status_total{status="undelivered",source="callback"} 1"#,
            r#"sms_status_total{status="undelivered",source="recovery"} 0"#,
            r#"sms_status_total{status="delivered",source="recovery"} 1"#,
            r#"sms_status_total{status="other",source="callback"} 1"#,
        ] {
            assert!(after.lines().any(|l| l == line), "{line} in {after}");
        }
    }

    #[test]
    fn all_is_in_declaration_order() {
        for (at, outcome) in SendOutcome::ALL.into_iter().enumerate() {
            assert_eq!(outcome as usize, at);
        }
        for (at, source) in StatusSource::ALL.into_iter().enumerate() {
            assert_eq!(source as usize, at);
        }
    }

    #[test]
    fn the_help_names_every_outcome_counted() {
        let help = text(&SmsMetrics::default());
        let help = help
            .lines()
            .find(|line| line.starts_with("# HELP sms_sent"))
            .unwrap();
        for outcome in SendOutcome::ALL {
            assert!(
                help.contains(outcome.label()),
                "{} in {help}",
                outcome.label()
            );
        }
    }
}
