-- Since when verifications have been counted (postgres): the earliest verification any instance
-- flushed to key_usage_hourly (epoch ms), how far back the legacy verdict's evidence goes. One
-- row. For counts flushed before this table, only their hour is known: the evidence then starts
-- at the end of the earliest hour in key_usage_hourly (recording may have begun in its last
-- minute). migrations/sqlite and migrations/postgres hold the same version and name.
CREATE TABLE usage_evidence (
    id                 INTEGER PRIMARY KEY CHECK (id = 1),
    first_verified_at  BIGINT NOT NULL
);
