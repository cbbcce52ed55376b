-- Verifications left out of the usage evidence (sqlite): an instance whose buffer filled up
-- during a long database outage dropped them, and legacy use among them would not show. How
-- many in all, and the last one's time (epoch ms), added by each instance's next flush; the
-- legacy verdict is not safe while that time is inside its window. migrations/sqlite and
-- migrations/postgres hold the same version and name.
ALTER TABLE usage_evidence ADD COLUMN dropped_count BIGINT NOT NULL DEFAULT 0;
ALTER TABLE usage_evidence ADD COLUMN last_dropped_at BIGINT;
