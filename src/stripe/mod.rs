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
