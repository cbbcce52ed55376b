-- What a product and a price mean beside their price (postgres): a product's images and marketing
-- features (JSON text, as metadata is, keys in order), unit label and URL; a recurring price's
-- usage type (licensed or metered: a metered price bills the usage its meter reports, not a
-- quantity), meter and trial days. NULL where Stripe sends null or nothing (a one-time price
-- has no recurring); rows written before this migration get them at the next sync. Columns of
-- existing tables, products before prices (the order edgegate's own transactions take them),
-- closed to the Data API's roles with them (20261205000003). migrations/sqlite and
-- migrations/postgres hold the same version and name.
ALTER TABLE stripe_products ADD COLUMN images TEXT;
ALTER TABLE stripe_products ADD COLUMN marketing_features TEXT;
ALTER TABLE stripe_products ADD COLUMN unit_label TEXT;
ALTER TABLE stripe_products ADD COLUMN url TEXT;
ALTER TABLE stripe_prices ADD COLUMN recurring_usage_type TEXT;
ALTER TABLE stripe_prices ADD COLUMN recurring_meter TEXT;
ALTER TABLE stripe_prices ADD COLUMN recurring_trial_period_days BIGINT;
