//! Stripe: the API client (`client`), the catalogue sync (`sync`), webhook signatures
//! (`signature`), webhook events (`webhook`) and the reconciliation of missed events
//! (`reconcile`). Nothing here knows axum; `routes::stripe` maps
//! these results to HTTP.
//!
//! The client is a small typed one over the shared reqwest client rather than async-stripe: see
//! `client` for why.

pub mod client;
pub mod metrics;
pub mod objects;
pub mod reconcile;
pub mod signature;
pub mod sync;
pub mod webhook;

pub use client::{RetryPolicy, StripeClient, StripeError};
pub use metrics::StripeMetrics;

use std::future::Future;

use tracing::Instrument as _;

use crate::store::{AuditEntry, Store};

/// A job a caller asked for (the catalogue sync, a reconciliation), run as Twilio's send is: in
/// a task of its own, so a caller that hangs up (or the request timeout) does not cut a run in
/// half. The same task then writes `audit` with the outcome (and, on success, the report) and
/// calls `finish` with the result (the run's metrics): a caller gone before the end (Fly's proxy
/// cuts a connection quiet for 60 s) would otherwise leave the run unaudited and uncounted.
async fn run_for_caller<R, E>(
    store: Store,
    mut audit: AuditEntry,
    job: impl Future<Output = Result<R, E>> + Send + 'static,
    outcome_of: fn(&E) -> &'static str,
    task_failed: fn(anyhow::Error) -> E,
    finish: impl FnOnce(&Result<R, E>) + Send + 'static,
) -> Result<R, E>
where
    R: serde::Serialize + Send + 'static,
    E: Send + 'static,
{
    let action = audit.action.clone();
    let run = async move {
        let result = job.await;
        audit.outcome = result.as_ref().map_or_else(outcome_of, |_| "ok").to_owned();
        if let Ok(report) = &result {
            audit.detail = serde_json::to_string(report).ok();
        }
        crate::audit::record(&store, &audit).await;
        finish(&result);
        result
    };
    // In the request's span, so its logs and its calls to Stripe stay in the request's trace.
    tokio::spawn(run.instrument(tracing::Span::current()))
        .await
        .unwrap_or_else(|err| Err(task_failed(anyhow::anyhow!("{action}: {err}"))))
}

/// The name a run's lock row carries: the request id, which the logs show too.
fn lock_holder(audit: &AuditEntry) -> String {
    audit
        .request_id
        .clone()
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string())
}
