-- Products and prices a deletion event named without the object (postgres): Stripe's stub
-- {"id","object","deleted":true} says which object is gone and nothing else. A row already
-- there is marked deleted and keeps its values; for an id no row holds yet, this keeps when it
-- was deleted (`event_created`, the event's `created`, and `deactivated_at`, both epoch ms), so
-- that an older event of that object delivered later (Stripe retries for days), or a sync page
-- listed before the deletion, writes its row deleted as of the stub instead of bringing it
-- back. Closed to the Data API's roles as every table of edgegate's is (20261205000003).
-- migrations/sqlite and migrations/postgres hold the same version and name.
CREATE TABLE stripe_deletions (
    object          TEXT NOT NULL,
    id              TEXT NOT NULL,
    event_created   BIGINT NOT NULL,
    deactivated_at  BIGINT NOT NULL,
    PRIMARY KEY (object, id)
);

ALTER TABLE stripe_deletions ENABLE ROW LEVEL SECURITY;
CREATE POLICY edgegate_not_data_api ON stripe_deletions
    USING (current_user NOT IN ('anon', 'authenticated'))
    WITH CHECK (current_user NOT IN ('anon', 'authenticated'));

DO $$
DECLARE
    role text;
BEGIN
    FOREACH role IN ARRAY ARRAY['anon', 'authenticated'] LOOP
        IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = role) THEN
            EXECUTE format('REVOKE ALL ON TABLE stripe_deletions FROM %I', role);
        END IF;
    END LOOP;
END
$$;
