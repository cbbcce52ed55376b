-- Stripe billing state a SaaS reads to grant access (postgres). Times are epoch milliseconds;
-- JSON is TEXT. Each row keeps `last_event_created` (ms) so an older webhook event never
-- overwrites newer state. migrations/sqlite and migrations/postgres hold the same tables.

CREATE TABLE stripe_customers (
    id                  TEXT PRIMARY KEY,
    email               TEXT,
    name                TEXT,
    livemode            BOOLEAN NOT NULL,
    last_event_created  BIGINT,
    updated_at          BIGINT NOT NULL
);

CREATE TABLE stripe_checkout_sessions (
    id                   TEXT PRIMARY KEY,
    customer_id          TEXT,
    customer_email       TEXT,
    -- The SaaS's own user id, passed to Checkout as client_reference_id.
    client_reference_id  TEXT,
    mode                 TEXT,
    status               TEXT,
    payment_status       TEXT,
    subscription_id      TEXT,
    payment_intent_id    TEXT,
    amount_total         BIGINT,
    currency             TEXT,
    metadata             TEXT NOT NULL DEFAULT '{}',
    livemode             BOOLEAN NOT NULL,
    stripe_created       BIGINT NOT NULL,
    last_event_created   BIGINT,
    updated_at           BIGINT NOT NULL
);
CREATE INDEX stripe_checkout_sessions_customer ON stripe_checkout_sessions (customer_id);
CREATE INDEX stripe_checkout_sessions_reference ON stripe_checkout_sessions (client_reference_id);

CREATE TABLE stripe_subscriptions (
    id                    TEXT PRIMARY KEY,
    customer_id           TEXT NOT NULL,
    status                TEXT NOT NULL,
    price_id              TEXT,
    product_id            TEXT,
    quantity              BIGINT,
    current_period_end    BIGINT,
    cancel_at_period_end  BOOLEAN NOT NULL,
    canceled_at           BIGINT,
    ended_at              BIGINT,
    metadata              TEXT NOT NULL DEFAULT '{}',
    livemode              BOOLEAN NOT NULL,
    stripe_created        BIGINT NOT NULL,
    last_event_created    BIGINT,
    updated_at            BIGINT NOT NULL
);
CREATE INDEX stripe_subscriptions_customer ON stripe_subscriptions (customer_id);

CREATE TABLE stripe_invoices (
    id                  TEXT PRIMARY KEY,
    customer_id         TEXT,
    subscription_id     TEXT,
    status              TEXT,
    amount_due          BIGINT,
    amount_paid         BIGINT,
    currency            TEXT,
    paid_at             BIGINT,
    payment_failed_at   BIGINT,
    attempt_count       BIGINT,
    livemode            BOOLEAN NOT NULL,
    stripe_created      BIGINT NOT NULL,
    last_event_created  BIGINT,
    updated_at          BIGINT NOT NULL
);
CREATE INDEX stripe_invoices_customer ON stripe_invoices (customer_id);
CREATE INDEX stripe_invoices_subscription ON stripe_invoices (subscription_id);
