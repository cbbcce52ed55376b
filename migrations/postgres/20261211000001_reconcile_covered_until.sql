-- How far each reconciliation's listing reached, in Stripe's time (postgres): the time (epoch ms,
-- whole seconds) of the `Date` header of Stripe's answer to the run's first events-list request.
-- Stripe lists events newest first and every later page goes back in time, so a run lists every
-- event Stripe had created by then; `created[gte]` is in Stripe's time too. The default window
-- starts an hour before the newest covering run's `covered_until`, not its `started_at`, which
-- is our wall clock: a run made while it ran a day ahead (since set right) claimed a day it
-- never listed. NULL for runs from before this column and for answers without a readable
-- `Date`: their `started_at` stands for it. migrations/sqlite and migrations/postgres hold the
-- same version and name.
ALTER TABLE reconcile_runs ADD COLUMN covered_until BIGINT;
