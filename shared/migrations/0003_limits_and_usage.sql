-- Per-pool limit overrides (the credit type's limit applies where there is no row). Written by
-- ingest before the override command goes to the input topic; read by the rater when it
-- rebuilds a pool from Postgres.
CREATE TABLE pool_limits (
    tenant_id   TEXT NOT NULL,
    customer_id TEXT NOT NULL,
    resource_id TEXT NOT NULL DEFAULT '',
    credit_type TEXT NOT NULL,
    limit_kind  TEXT NOT NULL CHECK (limit_kind IN ('hard', 'soft')),
    updated_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, customer_id, credit_type, resource_id)
);

-- Credits consumed per pool, bucket and group, maintained by ledger-writer in the same
-- transaction as the usage rows (only rows inserted then, so a redelivered batch adds nothing).
-- granularity: 'hour', 'day' or 'month' (UTC); dim: 'feature' (key = event name)
-- or 'user' (key = the userId dimension, '' when absent). Times are the events' own timestamps.
CREATE TABLE usage_rollups (
    tenant_id    TEXT NOT NULL,
    customer_id  TEXT NOT NULL,
    resource_id  TEXT NOT NULL DEFAULT '',
    credit_type  TEXT NOT NULL,
    granularity  TEXT NOT NULL CHECK (granularity IN ('hour', 'day', 'month')),
    dim          TEXT NOT NULL CHECK (dim IN ('feature', 'user')),
    bucket_start TIMESTAMPTZ NOT NULL,
    key          TEXT NOT NULL,
    credits      NUMERIC NOT NULL,
    events       BIGINT NOT NULL,
    PRIMARY KEY (tenant_id, customer_id, credit_type, resource_id, granularity, dim, bucket_start, key)
);
