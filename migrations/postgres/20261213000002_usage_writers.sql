-- The instances counting key usage (postgres): each notes its id and the time (epoch ms, its clock)
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

-- Closed to Supabase's Data API roles as every other table is (20261205000003).
ALTER TABLE usage_writers ENABLE ROW LEVEL SECURITY;
CREATE POLICY edgegate_not_data_api ON usage_writers
    USING (current_user NOT IN ('anon', 'authenticated'))
    WITH CHECK (current_user NOT IN ('anon', 'authenticated'));
DO $$
DECLARE
    role text;
BEGIN
    FOREACH role IN ARRAY ARRAY['anon', 'authenticated'] LOOP
        IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = role) THEN
            EXECUTE format('REVOKE ALL ON TABLE usage_writers FROM %I', role);
        END IF;
    END LOOP;
END
$$;
