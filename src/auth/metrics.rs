//! The credential layer's metrics: verifications by source, kid, alg and outcome; JWKS fetches
//! by result; key-set age; token-cache hits; refetches suppressed.

use std::sync::{Arc, OnceLock};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

use crate::auth::Authenticator;

/// Labels of one verification. `kid` is a kid the key ring holds (or an API key's id,
/// `secret:NAME` or `publishable:NAME`; `legacy`, `unknown`, `apikey_beside`), never a value the
/// caller chose, so the label set stays bounded.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VerificationLabels {
    pub source: &'static str,
    pub kid: String,
    pub alg: &'static str,
    pub outcome: &'static str,
}

/// Credentials checked, by [`VerificationLabels`].
pub type Verifications = Family<VerificationLabels, Counter>;

/// Where the successful verifications of one key (a signing key, the legacy secrets, an API
/// key) are counted: its series of `edgegate_credential_verifications`, looked up by its labels
/// the first time the key vouches for a credential and kept with the key, so that every later
/// credential it vouches for is counted without building, hashing and looking up the labels.
/// Every [`Verified`](crate::auth::Verified) carries its key's.
#[derive(Clone, Default)]
pub struct OkCounter(Arc<OnceLock<Counter>>);

impl OkCounter {
    /// The key's counter in `family`, looked up under `labels` the first time.
    pub fn get_or_init(
        &self,
        family: &Verifications,
        labels: impl FnOnce() -> VerificationLabels,
    ) -> &Counter {
        self.0
            .get_or_init(|| family.get_or_create(&labels()).clone())
    }
}

impl std::fmt::Debug for OkCounter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OkCounter")
    }
}

/// A handle to a metric, not part of what a credential is: any two are equal.
impl PartialEq for OkCounter {
    fn eq(&self, _other: &Self) -> bool {
        true
    }
}

/// Registers the credential layer's metrics: the verifications `auth` counts, and what its
/// fetcher and cache report at scrape time.
pub fn register(registry: &mut Registry, auth: Arc<Authenticator>) {
    registry.register(
        "credential_verifications",
        "Credentials checked, by source, kid, algorithm and outcome (ok or the error code)",
        auth.verifications().clone(),
    );
    // The refusals' series at 0 from the start: Prometheus' `increase()` does not count a
    // series' first sample. A passing credential's series names its key, known only then.
    for (source, outcome) in crate::credentials::REFUSED_SERIES {
        drop(auth.verifications().get_or_create(&VerificationLabels {
            source,
            kid: "unknown".to_owned(),
            alg: "unknown",
            outcome,
        }));
    }
    // With no legacy secret, a legacy API key beside the credential that counted is counted as
    // unverifiable: its series at 0 from the start too.
    if auth.key_ring().load().legacy_secrets().is_empty() {
        drop(
            auth.verifications()
                .get_or_create(&crate::auth::authenticator::unverifiable_beside_labels()),
        );
    }
    registry.register_collector(Box::new(AuthCollector { auth }));
}

/// Reads the fetcher's and the cache's own counters at scrape time.
#[derive(Debug)]
struct AuthCollector {
    auth: Arc<Authenticator>,
}

fn counter(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: u64,
) -> std::fmt::Result {
    let metric = ConstCounter::new(value);
    metric.encode(encoder.encode_descriptor(name, help, None, metric.metric_type())?)
}

fn gauge(encoder: &mut DescriptorEncoder, name: &str, help: &str, value: i64) -> std::fmt::Result {
    let metric = ConstGauge::new(value);
    metric.encode(encoder.encode_descriptor(name, help, None, metric.metric_type())?)
}

impl Collector for AuthCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        counter(
            &mut encoder,
            "token_cache_hits",
            "Bearer tokens answered from the verified-token cache",
            self.auth.cache().hits(),
        )?;
        let ring = self.auth.key_ring().load();
        gauge(
            &mut encoder,
            "trusted_keys",
            "Keys the key ring holds (legacy secrets, inline and fetched signing keys)",
            i64::try_from(ring.listing().len()).unwrap_or(i64::MAX),
        )?;
        let Some(fetcher) = self.auth.fetcher() else {
            return Ok(());
        };
        let stats = fetcher.status().stats;
        let fetches = ConstCounter::new(0u64);
        let mut family = encoder.encode_descriptor(
            "jwks_fetches",
            "JWKS fetches, by result",
            None,
            fetches.metric_type(),
        )?;
        for (result, value) in [("ok", stats.fetches_ok), ("failed", stats.fetches_failed)] {
            let labels = [("result", result)];
            ConstCounter::new(value).encode(family.encode_family(&labels)?)?;
        }
        counter(
            &mut encoder,
            "jwks_refetches_suppressed",
            "Unknown-kid refetches refused because of the cool-down",
            stats.refetches_suppressed,
        )?;
        counter(
            &mut encoder,
            "jwks_unknown_kid_refetches",
            "JWKS fetches started because a token named an unknown kid",
            stats.unknown_kid_refetches,
        )?;
        gauge(
            &mut encoder,
            "jwks_key_set_age_seconds",
            "Age of the fetched key set (-1 before the first successful fetch)",
            stats.key_set_age_seconds.unwrap_or(-1),
        )?;
        gauge(
            &mut encoder,
            "jwks_stale",
            "1 while the fetched key set is past its freshness, or was never fetched, because fetches fail",
            i64::from(stats.stale),
        )?;
        Ok(())
    }
}
