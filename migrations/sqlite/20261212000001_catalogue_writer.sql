-- Which build last wrote each catalogue row (sqlite). A rolling deploy runs the build before this
-- one beside it, and a rollback runs it alone, on this schema: it writes products and prices
-- without the columns it does not know (images, unit_label, url, marketing_features, the
-- recurring usage columns), which then keep an earlier value, or none, while the row looks
-- current. `written_rev` is the set of catalogue columns the row's writer knew (1 for this
-- build, NULL before); `written_synced_at` the `synced_at` it wrote with. A build that knows
-- neither leaves both as they were and moves `synced_at`: the two no longer match, and the
-- next build's check (at start and after each periodic reconciliation) runs the catalogue sync,
-- which rewrites such rows from Stripe. Rows from before this migration have NULL and are
-- rewritten by the first such sync. migrations/sqlite and migrations/postgres hold the same
-- version and name.
ALTER TABLE stripe_products ADD COLUMN written_rev INTEGER;
ALTER TABLE stripe_products ADD COLUMN written_synced_at BIGINT;
ALTER TABLE stripe_prices ADD COLUMN written_rev INTEGER;
ALTER TABLE stripe_prices ADD COLUMN written_synced_at BIGINT;
