-- From when the usage counts are complete (postgres): the highest cutoff (epoch ms) any pass that
-- deletes hourly usage rows has written; the legacy verdict's evidence starts no earlier. A pass
-- also moves first_verified_at up to its cutoff, but each instance's flush notes its earliest
-- count there (the earliest wins): one landing during the pass, with counts the pass then
-- deletes (a cutoff after them, from a clock weeks ahead), moved the evidence's start back over
-- the hole. No flush writes this column, and no pass lowers it. NULL until a pass has run. A
-- pass on a database where no count was noted yet writes the row with first_verified_at
-- 9223372036854775807 (none yet), which the first count noted replaces. migrations/sqlite and
-- migrations/postgres hold the same version and name.
ALTER TABLE usage_evidence ADD COLUMN complete_since BIGINT;
