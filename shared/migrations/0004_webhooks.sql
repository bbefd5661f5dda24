-- Webhooks (Standard Webhooks signing) and credit alerts.
--
-- Messages are written to an outbox (webhook_messages) by ledger-writer in the same
-- transaction as the ledger rows that caused them. The ledger-writer's sender fans each out to
-- one webhook_deliveries row per subscribed endpoint and delivers from there (claims with SKIP
-- LOCKED and a lease, so two replicas never send the same delivery at once).

CREATE TABLE webhook_endpoints (
    id              UUID PRIMARY KEY,
    tenant_id       TEXT NOT NULL REFERENCES tenants (id),
    url             TEXT NOT NULL,
    description     TEXT,
    -- NULL: every event type.
    event_types     TEXT[],
    -- whsec_ + base64. After a rotation the previous one also signs for 24 hours.
    secret          TEXT NOT NULL,
    previous_secret TEXT,
    rotated_at      TIMESTAMPTZ,
    -- Set when a message exhausted its retries with no success to the endpoint meanwhile.
    disabled_at     TIMESTAMPTZ,
    disabled_reason TEXT,
    last_success_at TIMESTAMPTZ,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX webhook_endpoints_tenant ON webhook_endpoints (tenant_id, id);

CREATE TABLE webhook_messages (
    id         UUID PRIMARY KEY,
    tenant_id  TEXT NOT NULL,
    type       TEXT NOT NULL,
    -- The exact bytes that are signed and sent: {id, type, timestamp, data}.
    body       TEXT NOT NULL,
    -- Fanned out to the subscribed endpoints (by the sender, not the settle transaction, so a
    -- tenant's endpoint count never slows settlement down).
    dispatched BOOLEAN NOT NULL DEFAULT false,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX webhook_messages_undispatched ON webhook_messages (created_at) WHERE NOT dispatched;

CREATE TABLE webhook_deliveries (
    seq              BIGSERIAL UNIQUE,
    message_id       UUID NOT NULL REFERENCES webhook_messages (id) ON DELETE CASCADE,
    endpoint_id      UUID NOT NULL REFERENCES webhook_endpoints (id) ON DELETE CASCADE,
    tenant_id        TEXT NOT NULL,
    status           TEXT NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'delivered', 'failed')),
    attempts         INTEGER NOT NULL DEFAULT 0,
    -- NULL: 1 + the retry schedule's length; a manual retry allows one more attempt.
    max_attempts     INTEGER,
    -- Due time while pending; while a sender holds the lease, when the lease runs out.
    next_attempt_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    lease            UUID,
    first_attempt_at TIMESTAMPTZ,
    last_attempt_at  TIMESTAMPTZ,
    created_at       TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (message_id, endpoint_id)
);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_at) WHERE status = 'pending';
CREATE INDEX webhook_deliveries_tenant ON webhook_deliveries (tenant_id, seq);
CREATE INDEX webhook_deliveries_endpoint ON webhook_deliveries (endpoint_id, seq);

-- The delivery log: every attempt and how it ended.
CREATE TABLE webhook_attempts (
    id          BIGSERIAL PRIMARY KEY,
    message_id  UUID NOT NULL,
    endpoint_id UUID NOT NULL,
    attempt     INTEGER NOT NULL,
    at          TIMESTAMPTZ NOT NULL DEFAULT now(),
    -- success, http_error, timeout, connect, refused_address, error
    outcome     TEXT NOT NULL,
    status_code INTEGER,
    duration_ms INTEGER NOT NULL,
    -- The first 1 KiB of the receiver's answer, or what went wrong.
    response    TEXT,
    FOREIGN KEY (message_id, endpoint_id) REFERENCES webhook_deliveries (message_id, endpoint_id) ON DELETE CASCADE
);
CREATE INDEX webhook_attempts_delivery ON webhook_attempts (message_id, endpoint_id, id);

-- Alert thresholds per pool; customer_id '' (and resource_id '') holds the tenant default for
-- the credit type. A NULL column inherits the default; an empty array means none.
CREATE TABLE credit_alerts (
    tenant_id           TEXT NOT NULL,
    customer_id         TEXT NOT NULL,
    resource_id         TEXT NOT NULL DEFAULT '',
    credit_type         TEXT NOT NULL,
    usage_percent       INTEGER[],
    balance_below       NUMERIC[],
    grant_usage_percent INTEGER[],
    updated_at          TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, customer_id, credit_type, resource_id)
);

-- Threshold arm state: the level last evaluated and which thresholds have fired and not yet
-- recovered, per pool (grant_id = the nil UUID) and per grant.
CREATE TABLE alert_state (
    tenant_id   TEXT NOT NULL,
    customer_id TEXT NOT NULL,
    resource_id TEXT NOT NULL,
    credit_type TEXT NOT NULL,
    grant_id    UUID NOT NULL,
    balance     NUMERIC NOT NULL,
    granted     NUMERIC NOT NULL,
    fired       TEXT[] NOT NULL DEFAULT '{}',
    updated_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, customer_id, credit_type, resource_id, grant_id)
);

-- Denied and unpriced events per pool and window, turned into one credits.event.rejected
-- message when the window has closed. credit_type '' for events that could not be priced.
CREATE TABLE webhook_rejections (
    tenant_id    TEXT NOT NULL,
    customer_id  TEXT NOT NULL,
    resource_id  TEXT NOT NULL,
    credit_type  TEXT NOT NULL,
    window_start TIMESTAMPTZ NOT NULL,
    denied       BIGINT NOT NULL DEFAULT 0,
    unpriced     BIGINT NOT NULL DEFAULT 0,
    -- A few of the idempotency keys (at most 10).
    samples      TEXT[] NOT NULL DEFAULT '{}',
    PRIMARY KEY (tenant_id, customer_id, credit_type, resource_id, window_start)
);
CREATE INDEX webhook_rejections_window ON webhook_rejections (window_start);
