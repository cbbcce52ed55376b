-- The last note of any instance counting key usage (postgres): when (epoch ms, its wall clock) and
-- which instance, written at every note in usage_writers and by a clean stop once its last
-- counts are written. A clean stop deletes its usage_writers row, so with no instance left
-- running a stop leaves nothing else behind: the instance started next finds the last note by
-- an instance that has no row any more, and when it is older than five minutes the fleet was
-- silent that long (a hole in the evidence: legacy use then was refused, never counted) and it
-- moves usage_evidence.complete_since to its own time. NULL until an instance of this build
-- notes itself on a database with a usage_evidence row. migrations/sqlite and
-- migrations/postgres hold the same version and name.
ALTER TABLE usage_evidence ADD COLUMN last_noted_at BIGINT;
ALTER TABLE usage_evidence ADD COLUMN last_noted_by TEXT;
