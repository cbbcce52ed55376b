//! What every handler can reach.

use std::ops::Deref;
use std::sync::Arc;

use crate::auth::usage::UsageTracker;
use crate::auth::{Authenticator, settings_from};
use crate::body::{BODY_BUDGET, BodyBudget};
use crate::clock::Clock;
use crate::config::Config;
use crate::store::Store;
use crate::stripe::reconcile::ReconcileMetrics;
use crate::stripe::{RetryPolicy, StripeMetrics};
use crate::telemetry::Metrics;
use crate::twilio::metrics::SmsMetrics;
use crate::twilio::send::SendTasks;

/// Shared application state behind one reference count: cloning it is one atomic increment.
/// The router clones a route's stack, the state in it, for every request; a struct of a dozen
/// reference-counted members cost a dozen atomic increments and as many decrements each time.
#[derive(Clone, Debug)]
pub struct AppState(Arc<Shared>);

/// What [`AppState`] shares; its members are reached through `Deref`.
#[derive(Clone, Debug)]
pub struct Shared {
    pub config: Arc<Config>,
    pub store: Store,
    pub metrics: Arc<Metrics>,
    pub auth: Arc<Authenticator>,
    pub usage: Arc<UsageTracker>,
    /// The HTTP client for calls to Stripe.
    pub stripe_http: reqwest::Client,
    /// The HTTP client for calls to Twilio: apart from Stripe's, so that a Stripe base on this
    /// machine (which takes no proxy) does not take the proxy away from Twilio's calls.
    pub twilio_http: reqwest::Client,
    pub stripe_metrics: StripeMetrics,
    pub reconcile_metrics: ReconcileMetrics,
    pub sms_metrics: SmsMetrics,
    /// How the Stripe client retries; tests shorten the delays.
    pub stripe_retry: RetryPolicy,
    /// The one clock the credential layer reads; tests inject a manual one.
    pub clock: Clock,
    /// SMS sends under way, waited for at shutdown.
    pub sms_sends: SendTasks,
    /// What every buffered request body is taken from (`body::BODY_BUDGET`).
    pub body_budget: &'static BodyBudget,
}

impl AppState {
    pub fn new(config: Config, store: Store) -> Self {
        Self::with_clock(config, store, Clock::system())
    }

    /// As [`AppState::new`], reading time from `clock`.
    pub fn with_clock(config: Config, store: Store, clock: Clock) -> Self {
        let client = |base: &url::Url| {
            crate::outbound::build(|| crate::outbound::client_builder(None, &[base]))
        };
        let stripe_http = client(&config.stripe.api_base);
        let twilio_http = client(&config.twilio.api_base);
        let auth = Arc::new(Authenticator::with_clock(
            settings_from(&config),
            crate::auth::jwks::http_client(config.jwt.jwks_url.as_ref()),
            clock.clone(),
        ));
        let mut metrics = Metrics::new();
        crate::auth::metrics::register(metrics.registry_mut(), auth.clone());
        let stripe_metrics = StripeMetrics::default();
        stripe_metrics.register(metrics.registry_mut());
        let usage = Arc::new(UsageTracker::default());
        usage.register(metrics.registry_mut());
        let reconcile_metrics = ReconcileMetrics::default();
        reconcile_metrics.register(metrics.registry_mut());
        let sms_metrics = SmsMetrics::default();
        sms_metrics.register(metrics.registry_mut());
        let body_budget = BodyBudget::leaked(BODY_BUDGET);
        body_budget.register(metrics.registry_mut());
        Self(Arc::new(Shared {
            config: Arc::new(config),
            store,
            metrics: Arc::new(metrics),
            auth,
            usage,
            stripe_http,
            twilio_http,
            stripe_metrics,
            reconcile_metrics,
            sms_metrics,
            stripe_retry: RetryPolicy::default(),
            clock,
            sms_sends: SendTasks::default(),
            body_budget,
        }))
    }

    /// The same state with Stripe's retries timed by `retry` (tests shorten the delays).
    pub fn with_stripe_retry(mut self, retry: RetryPolicy) -> Self {
        Arc::make_mut(&mut self.0).stripe_retry = retry;
        self
    }
}

impl Deref for AppState {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}
