//! What every handler can reach.

use std::sync::Arc;

use crate::config::Config;
use crate::store::Store;
use crate::telemetry::Metrics;

/// Shared application state; cloning it is cheap.
#[derive(Clone, Debug)]
pub struct AppState {
    pub config: Arc<Config>,
    pub store: Store,
    pub metrics: Arc<Metrics>,
}

impl AppState {
    pub fn new(config: Config, store: Store) -> Self {
        Self {
            config: Arc::new(config),
            store,
            metrics: Arc::new(Metrics::new()),
        }
    }
}
