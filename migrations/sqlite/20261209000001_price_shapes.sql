-- What prices a price beside a plain per-unit amount (sqlite): Stripe's billing scheme, its
-- decimal amount (a string, as Stripe sends it: a sub-cent amount has no unit_amount), tiers
-- mode and tiers, quantity transform, pay-what-you-want bounds, prices in other currencies, and
-- tax behaviour. The JSON columns hold Stripe's value as JSON text (as metadata does), keys in
-- order; a tier's up_to is null for infinity, as Stripe sends it. NULL where Stripe sends null
-- or nothing; rows written before this migration get them at the next sync. Columns of an
-- existing table, closed to the Data API's roles with it (20261205000003). migrations/sqlite
-- and migrations/postgres hold the same version and name.
ALTER TABLE stripe_prices ADD COLUMN billing_scheme TEXT;
ALTER TABLE stripe_prices ADD COLUMN unit_amount_decimal TEXT;
ALTER TABLE stripe_prices ADD COLUMN tiers_mode TEXT;
ALTER TABLE stripe_prices ADD COLUMN tiers TEXT;
ALTER TABLE stripe_prices ADD COLUMN transform_quantity TEXT;
ALTER TABLE stripe_prices ADD COLUMN custom_unit_amount TEXT;
ALTER TABLE stripe_prices ADD COLUMN currency_options TEXT;
ALTER TABLE stripe_prices ADD COLUMN tax_behavior TEXT;
