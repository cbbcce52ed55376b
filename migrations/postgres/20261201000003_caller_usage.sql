-- Who still uses the legacy secret (and each API key): verifications per caller per hour, summed
-- across instances like key_usage_hourly. migrations/sqlite holds the same version and name.
-- kind: anon_key, service_role_key or user_session for the legacy secret; the key's name for an
-- API key. route: the matched route pattern. client: x-client-info, else the User-Agent product,
-- printable ASCII, at most 64 characters, or "other" past the top 50 per instance per hour.
-- No IP address, token or user id is stored.
CREATE TABLE caller_usage_hourly (
    hour_start        BIGINT NOT NULL,
    source            TEXT NOT NULL,
    kind              TEXT NOT NULL,
    route             TEXT NOT NULL,
    client            TEXT NOT NULL,
    verified_count    BIGINT NOT NULL,
    last_verified_at  BIGINT NOT NULL,
    PRIMARY KEY (hour_start, source, kind, route, client)
);
