-- Usage on its way into usage_rollups. The settle transaction appends one row per (pool, hour,
-- feature, user) of the usage it settled (no arbiter, one narrow index) instead of upserting
-- six rollup rows per event; the ledger-writer's rollup compactor moves the pending rows into
-- usage_rollups (hour, day and month x feature and user) in one transaction of its own, a
-- DELETE ... RETURNING feeding the upsert, so each row is counted exactly once. Reads add the
-- pending rows of their customer, so usage stays exact between compactions.
CREATE TABLE usage_rollup_pending (
    tenant_id   TEXT NOT NULL,
    customer_id TEXT NOT NULL,
    resource_id TEXT NOT NULL,
    credit_type TEXT NOT NULL,
    hour_start  TIMESTAMPTZ NOT NULL,
    feature     TEXT NOT NULL,
    user_key    TEXT NOT NULL,
    credits     NUMERIC NOT NULL,
    events      BIGINT NOT NULL
);
CREATE INDEX usage_rollup_pending_customer ON usage_rollup_pending (tenant_id, customer_id);
