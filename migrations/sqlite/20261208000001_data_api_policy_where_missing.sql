-- PostgreSQL creates the Data API policy where an earlier copy of 20261205000003 left it out;
-- SQLite has no roles and no Data API: nothing to do. migrations/sqlite and migrations/postgres
-- hold the same version and name.
SELECT 1;
