-- edgegate's initial schema (PostgreSQL). Times are epoch milliseconds; JSON is TEXT.
-- migrations/sqlite holds the same version with the same name and the same tables.

CREATE TABLE stripe_products (
    id                  TEXT PRIMARY KEY,
    active              BOOLEAN NOT NULL,
    name                TEXT NOT NULL,
    description         TEXT,
    default_price_id    TEXT,
    metadata            TEXT NOT NULL DEFAULT '{}',
    livemode            BOOLEAN NOT NULL,
    stripe_created      BIGINT NOT NULL,
    stripe_updated      BIGINT,
    -- `created` of the newest event applied to this row; an older event never overwrites it.
    last_event_created  BIGINT,
    synced_at           BIGINT NOT NULL,
    deactivated_at      BIGINT
);

CREATE TABLE stripe_prices (
    id                        TEXT PRIMARY KEY,
    product_id                TEXT NOT NULL,
    active                    BOOLEAN NOT NULL,
    currency                  TEXT NOT NULL,
    unit_amount               BIGINT,
    price_type                TEXT NOT NULL,
    recurring_interval        TEXT,
    recurring_interval_count  BIGINT,
    lookup_key                TEXT,
    nickname                  TEXT,
    metadata                  TEXT NOT NULL DEFAULT '{}',
    livemode                  BOOLEAN NOT NULL,
    stripe_created            BIGINT NOT NULL,
    last_event_created        BIGINT,
    synced_at                 BIGINT NOT NULL,
    deactivated_at            BIGINT
);
CREATE INDEX stripe_prices_product ON stripe_prices (product_id);

-- The webhook ledger: one row per Stripe event id, written in the same transaction as its effects.
CREATE TABLE stripe_events (
    id            TEXT PRIMARY KEY,
    event_type    TEXT NOT NULL,
    created       BIGINT NOT NULL,
    livemode      BOOLEAN NOT NULL,
    received_at   BIGINT NOT NULL,
    applied       BOOLEAN NOT NULL
);

CREATE TABLE sync_runs (
    id                    TEXT PRIMARY KEY,
    started_at            BIGINT NOT NULL,
    finished_at           BIGINT,
    outcome               TEXT NOT NULL,
    products_seen         BIGINT NOT NULL DEFAULT 0,
    products_upserted     BIGINT NOT NULL DEFAULT 0,
    products_deactivated  BIGINT NOT NULL DEFAULT 0,
    prices_seen           BIGINT NOT NULL DEFAULT 0,
    prices_upserted       BIGINT NOT NULL DEFAULT 0,
    prices_deactivated    BIGINT NOT NULL DEFAULT 0,
    error                 TEXT
);
CREATE INDEX sync_runs_started ON sync_runs (started_at);

-- One row per named lock; used on SQLite only (Postgres uses advisory locks); kept here so both schemas match.
CREATE TABLE locks (
    name         TEXT PRIMARY KEY,
    holder       TEXT NOT NULL,
    acquired_at  BIGINT NOT NULL,
    expires_at   BIGINT NOT NULL
);

CREATE TABLE sms_messages (
    id               TEXT PRIMARY KEY,
    idempotency_key  TEXT UNIQUE,
    to_number        TEXT NOT NULL,
    body             TEXT NOT NULL,
    status           TEXT NOT NULL,
    twilio_sid       TEXT UNIQUE,
    error_code       BIGINT,
    error_message    TEXT,
    created_at       BIGINT NOT NULL,
    updated_at       BIGINT NOT NULL
);
CREATE INDEX sms_messages_recipient_created ON sms_messages (to_number, created_at);
CREATE INDEX sms_messages_created ON sms_messages (created_at);

-- Verifications per key per hour, summed across instances; the evidence for revoking the legacy secret.
CREATE TABLE key_usage_hourly (
    hour_start        BIGINT NOT NULL,
    source            TEXT NOT NULL,
    kid               TEXT NOT NULL,
    alg               TEXT NOT NULL,
    verified_count    BIGINT NOT NULL,
    last_verified_at  BIGINT NOT NULL,
    PRIMARY KEY (hour_start, source, kid, alg)
);

-- Privileged actions: who (which credential) did what, when, and how it ended.
CREATE TABLE audit_log (
    id                 TEXT PRIMARY KEY,
    at                 BIGINT NOT NULL,
    request_id         TEXT,
    credential_source  TEXT NOT NULL,
    credential_id      TEXT NOT NULL,
    action             TEXT NOT NULL,
    outcome            TEXT NOT NULL,
    detail             TEXT
);
CREATE INDEX audit_log_at ON audit_log (at);
