-- PostgreSQL closes edgegate's tables to Supabase's Data API roles in this version; SQLite has
-- no roles and no Data API: nothing to do.
SELECT 1;
