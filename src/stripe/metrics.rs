//! Stripe metrics: sync runs by outcome, webhook events by type and outcome.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SyncLabels {
    pub outcome: &'static str,
}

/// `event_type` comes only from signature-checked bodies, so only Stripe chooses it.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WebhookLabels {
    pub event_type: String,
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Default)]
pub struct StripeMetrics {
    pub sync_runs: Family<SyncLabels, Counter>,
    pub webhook_events: Family<WebhookLabels, Counter>,
}

impl StripeMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "stripe_sync_runs",
            "Catalogue syncs, by outcome (ok, in_progress, upstream_error, error)",
            self.sync_runs.clone(),
        );
        registry.register(
            "stripe_webhook_events",
            "Signed webhook events, by type and outcome (applied, duplicate, error)",
            self.webhook_events.clone(),
        );
    }

    pub fn sync_run(&self, outcome: &'static str) {
        self.sync_runs.get_or_create(&SyncLabels { outcome }).inc();
    }

    pub fn webhook_event(&self, event_type: &str, outcome: &'static str) {
        self.webhook_events
            .get_or_create(&WebhookLabels {
                event_type: event_type.to_owned(),
                outcome,
            })
            .inc();
    }
}
