//! Stripe storage, by concern: the catalogue the sync and webhooks write (`catalogue`), the
//! webhook ledger and its effects (`ledger`), and the runs of the sync and the reconciliation
//! with their one-at-a-time locks (`runs`).

mod catalogue;
mod ledger;
mod runs;

pub use catalogue::{
    CatalogueObject, Deletion, EarlierBuildsAsOf, PriceRow, ProductRow, Tombstone,
};
pub use ledger::{
    CheckoutSessionRow, CustomerRow, EventReceipt, InvoiceRow, LedgerEvent, SameSecond,
    StripeEffect, SubscriptionRow,
};
pub use runs::{Job, LockHeld, LockLost, ReconcileCounts, SyncCounts, SyncLock, SyncRun};
