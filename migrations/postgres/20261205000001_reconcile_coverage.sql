-- Which reconciliation runs extend the unbroken coverage of Stripe's event list (postgres).
-- A run is continuous when its window reached back to Stripe's 30-day retention, or to an hour
-- before the start of the newest continuous run that succeeded before it. The default window
-- of the next run starts an hour before the newest successful continuous run, so a run over a
-- narrow window (a manual since) cannot hide an earlier gap. Runs from before this column
-- count as not continuous: the first default run after it lists the whole retention once.
-- migrations/sqlite and migrations/postgres hold the same version and name.
ALTER TABLE reconcile_runs ADD COLUMN continuous BOOLEAN NOT NULL DEFAULT FALSE;
