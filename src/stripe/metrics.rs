//! Stripe metrics: sync runs by who started them and outcome, webhook events by type and outcome.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

use super::reconcile::Trigger;

/// `started_by`: `manual` (a caller's request) or `periodic` (the periodic task's sync of the
/// rows an earlier build wrote, `sync::RewriteOfEarlierBuilds`), as a reconciliation's.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SyncLabels {
    pub started_by: &'static str,
    pub outcome: &'static str,
}

/// `event_type` is one of [`event_type_label`]'s labels: the raw type comes from a body
/// (signed, but whoever holds a webhook secret chooses it), so it never becomes a label as is.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WebhookLabels {
    pub event_type: &'static str,
    pub outcome: &'static str,
}

/// The label for `event_type`: itself when it is one edgegate applies
/// ([`super::webhook::APPLIED_EVENT_TYPES`]) or `unknown` (a delivery whose type could not be
/// read), else `other`.
pub fn event_type_label(event_type: &str) -> &'static str {
    super::webhook::APPLIED_EVENT_TYPES
        .iter()
        .chain(&["unknown"])
        .find(|known| **known == event_type)
        .copied()
        .unwrap_or("other")
}

/// The outcomes of a run (a sync, a reconciliation): `ok` or `SyncError::outcome`'s,
/// `ReconcileError::outcome`'s.
pub const SYNC_OUTCOMES: [&str; 4] = ["ok", "in_progress", "upstream_error", "error"];

#[derive(Clone, Debug, Default)]
pub struct StripeMetrics {
    pub sync_runs: Family<SyncLabels, Counter>,
    pub webhook_events: Family<WebhookLabels, Counter>,
}

impl StripeMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "stripe_sync_runs",
            "Catalogue syncs, by who started them (manual: a request; periodic: the periodic \
             task, to rewrite rows an earlier build wrote) and outcome (ok, in_progress, \
             upstream_error, error)",
            self.sync_runs.clone(),
        );
        registry.register(
            "stripe_webhook_events",
            "Webhook deliveries, by event type (unknown for a refused delivery) and outcome: \
             applied (new; one of a type edgegate does not act on is recorded only), duplicate, \
             connect_account (a connected account's event: recorded, not applied), \
             livemode_mismatch (an event of the other mode than STRIPE_SECRET_KEY: recorded, \
             not applied), thin (a thin event: answered, recorded where it can be, not \
             applied), \
             invalid_signature, unreadable, same_second_unsettled or error (these four not \
             stored; Stripe delivers them again)",
            self.webhook_events.clone(),
        );
        // Every series whose labels are known in advance, at 0 from the start: Prometheus'
        // `increase()` and `rate()` do not count a series' first sample, so a series made by
        // its first event hid that event.
        for started_by in [Trigger::Manual, Trigger::Periodic] {
            for outcome in SYNC_OUTCOMES {
                drop(self.sync_runs.get_or_create(&SyncLabels {
                    started_by: started_by.as_str(),
                    outcome,
                }));
            }
        }
        for event_type in super::webhook::APPLIED_EVENT_TYPES.iter().chain(&["other"]) {
            for outcome in [
                "applied",
                "duplicate",
                "connect_account",
                "livemode_mismatch",
            ] {
                drop(self.webhook_events.get_or_create(&WebhookLabels {
                    event_type,
                    outcome,
                }));
            }
        }
        // A thin event's type (`v1.…`) is none edgegate applies.
        drop(self.webhook_events.get_or_create(&WebhookLabels {
            event_type: "other",
            outcome: super::webhook::THIN_OUTCOME,
        }));
        // A refused delivery's type is never read.
        for outcome in [
            "invalid_signature",
            "unreadable",
            "same_second_unsettled",
            "error",
        ] {
            drop(self.webhook_events.get_or_create(&WebhookLabels {
                event_type: "unknown",
                outcome,
            }));
        }
    }

    pub fn sync_run(&self, started_by: Trigger, outcome: &'static str) {
        self.sync_runs
            .get_or_create(&SyncLabels {
                started_by: started_by.as_str(),
                outcome,
            })
            .inc();
    }

    pub fn webhook_event(&self, event_type: &str, outcome: &'static str) {
        self.webhook_events
            .get_or_create(&WebhookLabels {
                event_type: event_type_label(event_type),
                outcome,
            })
            .inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stripe::signature::SignatureError;
    use crate::stripe::webhook::{Foreign, Outcome, THIN_OUTCOME, WebhookError};

    #[test]
    fn the_webhook_help_names_every_outcome_counted() {
        let mut registry = Registry::default();
        let metrics = StripeMetrics::default();
        metrics.register(&mut registry);
        // A family is written only once it has a series.
        metrics.webhook_event("invoice.paid", "applied");
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        let help = text
            .lines()
            .find(|line| line.starts_with("# HELP stripe_webhook_events"))
            .unwrap_or_else(|| panic!("no HELP line in {text}"));
        let words: Vec<&str> = help
            .split(|c: char| !(c.is_ascii_lowercase() || c == '_'))
            .collect();
        let refused = [
            WebhookError::Signature(SignatureError::Missing),
            WebhookError::Unreadable(String::new()),
            WebhookError::Store(anyhow::anyhow!("rolled back")),
            WebhookError::NeedsSecretKey(String::new()),
        ];
        let taken = [
            Outcome::Applied,
            Outcome::Duplicate,
            Outcome::Foreign(Foreign::ConnectedAccount),
            Outcome::Foreign(Foreign::OtherMode { livemode: true }),
        ];
        for outcome in taken
            .into_iter()
            .map(Outcome::label)
            .chain([THIN_OUTCOME])
            .chain(refused.iter().map(WebhookError::outcome))
        {
            assert!(words.contains(&outcome), "{outcome} not in {help}");
        }
    }

    /// Every outcome a delivery of a known type (or `other`) can be counted under is there at
    /// 0 before the first: the Connect and other-mode outcomes, which OPERATIONS.md tells
    /// operators to watch with `increase()`, were made by their first event, which it missed.
    #[test]
    fn every_outcome_of_a_taken_delivery_is_there_at_zero() {
        let mut registry = Registry::default();
        StripeMetrics::default().register(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        let taken = [
            Outcome::Applied,
            Outcome::Duplicate,
            Outcome::Foreign(Foreign::ConnectedAccount),
            Outcome::Foreign(Foreign::OtherMode { livemode: false }),
        ];
        let types = crate::stripe::webhook::APPLIED_EVENT_TYPES
            .iter()
            .chain(&["other"]);
        // A thin event's type (`v1.…`) is none edgegate applies.
        let series = types
            .flat_map(|event_type| taken.map(|outcome| (*event_type, outcome.label())))
            .chain([("other", THIN_OUTCOME)]);
        for (event_type, outcome) in series {
            let line = format!(
                r#"stripe_webhook_events_total{{event_type="{event_type}",outcome="{outcome}"}} 0"#
            );
            assert!(text.lines().any(|l| l == line), "no {line} in:\n{text}");
        }
    }

    #[test]
    fn event_types_outside_the_known_set_are_other() {
        assert_eq!(event_type_label("invoice.paid"), "invoice.paid");
        assert_eq!(event_type_label("unknown"), "unknown");
        for outside in [
            "charge.refunded",
            "invoice.paid\u{202e}",
            "x\ny",
            "",
            "INVOICE.PAID",
        ] {
            assert_eq!(event_type_label(outside), "other", "{outside:?}");
        }
    }
}
