-- Stripe reconciliation runs (postgres): each walk of Stripe's event list, what it found, and where
-- it stopped. Times are epoch milliseconds except `since`, which is Stripe's unix seconds.
-- migrations/sqlite and migrations/postgres hold the same tables.

CREATE TABLE reconcile_runs (
    id                      TEXT PRIMARY KEY,
    -- 'manual' (POST /admin/stripe/reconcile) or 'periodic'.
    started_by              TEXT NOT NULL,
    since                   BIGINT NOT NULL,
    started_at              BIGINT NOT NULL,
    finished_at             BIGINT,
    outcome                 TEXT NOT NULL,
    events_seen             BIGINT NOT NULL DEFAULT 0,
    events_applied          BIGINT NOT NULL DEFAULT 0,
    events_already_applied  BIGINT NOT NULL DEFAULT 0,
    events_ignored          BIGINT NOT NULL DEFAULT 0,
    -- The last event handled: the listing resumes after it (Stripe lists newest first).
    last_event_id           TEXT,
    error                   TEXT
);
CREATE INDEX reconcile_runs_started ON reconcile_runs (started_at);

-- The default `since` of a reconciliation starts from the newest event in the ledger.
CREATE INDEX stripe_events_created ON stripe_events (created);
