-- Supabase's Data API (PostgREST) serves the tables of the `public` schema to anyone holding
-- the project's publishable (anon) key, and Supabase projects grant `anon` and `authenticated`
-- every privilege on new tables there by default. edgegate's tables hold phone numbers, SMS
-- bodies, the Stripe ledger and the usage evidence: close them to both roles. Their grants are
-- revoked where the roles exist, and row-level security is on with one policy that admits every
-- role but those two (so a serving role that does not own the tables keeps working, and
-- Supabase's advisor finds no table without row-level security). A table a later migration
-- adds must do the same (tests/it/store.rs checks every table).
--
-- Each ALTER TABLE locks its table until the end of this migration: in the order edgegate's own
-- transactions take them (a webhook's ledger row before its object; products before prices), so
-- an old instance still serving during a deploy cannot deadlock with it, and for 10 s at most,
-- after which the migration fails (the deploy stops and can be run again).
SET LOCAL lock_timeout = '10s';

DO $$
DECLARE
    t text;
    role text;
BEGIN
    FOREACH t IN ARRAY ARRAY[
        'stripe_events', 'stripe_products', 'stripe_prices', 'stripe_customers',
        'stripe_checkout_sessions', 'stripe_subscriptions', 'stripe_invoices', 'sync_runs',
        'reconcile_runs', 'sms_messages', 'key_usage_hourly', 'caller_usage_hourly',
        'usage_evidence', 'audit_log', 'locks', '_sqlx_migrations'
    ] LOOP
        EXECUTE format('ALTER TABLE %I ENABLE ROW LEVEL SECURITY', t);
        EXECUTE format(
            'CREATE POLICY edgegate_not_data_api ON %I '
            'USING (current_user NOT IN (''anon'', ''authenticated'')) '
            'WITH CHECK (current_user NOT IN (''anon'', ''authenticated''))',
            t
        );
        FOREACH role IN ARRAY ARRAY['anon', 'authenticated'] LOOP
            IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = role) THEN
                EXECUTE format('REVOKE ALL ON TABLE %I FROM %I', t, role);
            END IF;
        END LOOP;
    END LOOP;
END
$$;
