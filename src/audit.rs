//! The audit log's one writer. A row that cannot be written is logged, not answered: the action
//! it records has already happened (or been refused).

use crate::store::{AuditEntry, Store};

pub async fn record(store: &Store, entry: &AuditEntry) {
    if let Err(err) = store.record_audit(entry).await {
        tracing::error!(
            error = crate::error::causes(&err),
            action = entry.action,
            "audit row not written"
        );
    }
}
