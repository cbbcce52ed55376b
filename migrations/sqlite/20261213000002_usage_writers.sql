-- The instances counting key usage (sqlite): each notes its id and the time (epoch ms, its clock)
-- of its last write of counts here, after every flush, and deletes its row once a clean stop
-- has written its last counts. A row that stops being noted is an instance that ended without
-- writing what it held (killed, crashed, out of memory), or a database restored from a backup
-- taken while instances ran (their counts since the backup are gone): another instance then
-- moves usage_evidence.complete_since to its own time and deletes the row, so the legacy
-- verdict waits a whole window instead of reading counts with a hole in them.
-- migrations/sqlite and migrations/postgres hold the same version and name.
CREATE TABLE usage_writers (
    id       TEXT PRIMARY KEY,
    seen_at  BIGINT NOT NULL
);
