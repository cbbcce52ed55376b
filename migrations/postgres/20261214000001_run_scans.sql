-- The statements every reconciliation and catalogue sync starts with read these instead of every
-- run ever kept (postgres); the run tables grow until pruned by hand. Marking the runs a stopped
-- process left `running` reads those alone; the coverage (the newest successful continuous run's
-- `covered_until`, or its `started_at`) is the newest entry of its index, and the runs whose
-- coverage lies ahead of now are read from it by that same expression.
-- migrations/sqlite and migrations/postgres hold the same version and name.
CREATE INDEX reconcile_runs_running ON reconcile_runs (outcome) WHERE outcome = 'running';
CREATE INDEX sync_runs_running ON sync_runs (outcome) WHERE outcome = 'running';
CREATE INDEX reconcile_runs_coverage ON reconcile_runs ((COALESCE(covered_until, started_at)))
    WHERE outcome = 'ok' AND continuous;
