-- Supabase's Data API (PostgREST) serves the tables of the `public` schema to anyone holding
-- the project's publishable (anon) key, and Supabase projects grant `anon` and `authenticated`
-- every privilege on new tables there by default. edgegate's tables hold phone numbers, SMS
-- bodies, the Stripe ledger and the usage evidence: close them to both roles. Row-level
-- security with no policy refuses every row to a role that is not the owner (edgegate connects
-- as the owner, which bypasses it); the grants are revoked too where the roles exist. A table a
-- later migration adds must do the same (tests/it/store.rs checks every table).
DO $$
DECLARE
    t text;
    role text;
BEGIN
    FOREACH t IN ARRAY ARRAY[
        '_sqlx_migrations', 'audit_log', 'caller_usage_hourly', 'key_usage_hourly', 'locks',
        'reconcile_runs', 'sms_messages', 'stripe_checkout_sessions', 'stripe_customers',
        'stripe_events', 'stripe_invoices', 'stripe_prices', 'stripe_products',
        'stripe_subscriptions', 'sync_runs', 'usage_evidence'
    ] LOOP
        EXECUTE format('ALTER TABLE %I ENABLE ROW LEVEL SECURITY', t);
        FOREACH role IN ARRAY ARRAY['anon', 'authenticated'] LOOP
            IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = role) THEN
                EXECUTE format('REVOKE ALL ON TABLE %I FROM %I', t, role);
            END IF;
        END LOOP;
    END LOOP;
END
$$;
