-- Builds from ff2bbff to before bea5447 shipped an earlier 20261205000003: row-level security on
-- with no policy, so a serving role that does not own the tables saw none of their rows and
-- could write none. Its stored checksum is taken over at start (src/store/postgres.rs,
-- EARLIER_COPIES); this creates the policy the shipped 20261205000003 creates, on each table
-- that lacks it, and does nothing on a database that has them all.
--
-- CREATE POLICY locks its table until the end of this migration: in the order of
-- 20261205000003 (edgegate's own), for 10 s at most, after which the migration fails (the
-- deploy stops and can be run again).
SET LOCAL lock_timeout = '10s';

DO $$
DECLARE
    t text;
BEGIN
    FOREACH t IN ARRAY ARRAY[
        'stripe_events', 'stripe_products', 'stripe_prices', 'stripe_customers',
        'stripe_checkout_sessions', 'stripe_subscriptions', 'stripe_invoices', 'sync_runs',
        'reconcile_runs', 'sms_messages', 'key_usage_hourly', 'caller_usage_hourly',
        'usage_evidence', 'audit_log', 'locks', '_sqlx_migrations'
    ] LOOP
        IF NOT EXISTS (
            SELECT 1 FROM pg_policy
            WHERE polrelid = format('%I', t)::regclass AND polname = 'edgegate_not_data_api'
        ) THEN
            EXECUTE format(
                'CREATE POLICY edgegate_not_data_api ON %I '
                'USING (current_user NOT IN (''anon'', ''authenticated'')) '
                'WITH CHECK (current_user NOT IN (''anon'', ''authenticated''))',
                t
            );
        END IF;
    END LOOP;
END
$$;
