-- The settled side of the credits pipeline. Written by ledger-writer (ledger, grants, pools,
-- usage events) and by ingest (tenants, keys, catalogue). Amounts are NUMERIC, never float.

CREATE TABLE tenants (
    id                TEXT PRIMARY KEY,
    name              TEXT NOT NULL,
    events_per_second INTEGER NOT NULL DEFAULT 5000,
    created_at        TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE api_keys (
    prefix     TEXT PRIMARY KEY,
    tenant_id  TEXT NOT NULL REFERENCES tenants (id),
    key_hash   BYTEA NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    revoked_at TIMESTAMPTZ
);

CREATE TABLE credit_types (
    tenant_id     TEXT NOT NULL REFERENCES tenants (id),
    id            TEXT NOT NULL,
    name          TEXT NOT NULL,
    unit_singular TEXT NOT NULL,
    unit_plural   TEXT NOT NULL,
    decimals      SMALLINT NOT NULL CHECK (decimals BETWEEN 0 AND 9),
    limit_kind    TEXT NOT NULL CHECK (limit_kind IN ('hard', 'soft')),
    created_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, id)
);

-- Versioned by effective_at: an event is priced by the newest version at or before its timestamp.
CREATE TABLE feature_mappings (
    tenant_id          TEXT NOT NULL REFERENCES tenants (id),
    event_name         TEXT NOT NULL,
    effective_at       TIMESTAMPTZ NOT NULL,
    credit_type        TEXT NOT NULL,
    credits_per_unit   NUMERIC NOT NULL CHECK (credits_per_unit >= 0),
    quantity_dimension TEXT,
    created_at         TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, event_name, effective_at),
    FOREIGN KEY (tenant_id, credit_type) REFERENCES credit_types (tenant_id, id)
);

CREATE TABLE grants (
    tenant_id     TEXT NOT NULL,
    id            UUID NOT NULL,
    customer_id   TEXT NOT NULL,
    resource_id   TEXT NOT NULL DEFAULT '',
    credit_type   TEXT NOT NULL,
    amount        NUMERIC NOT NULL,
    remaining     NUMERIC NOT NULL,
    status        TEXT NOT NULL,
    category      TEXT NOT NULL,
    priority      INTEGER NOT NULL,
    cost_amount   NUMERIC,
    cost_currency TEXT,
    effective_at  TIMESTAMPTZ NOT NULL,
    expires_at    TIMESTAMPTZ,
    display_name  TEXT NOT NULL,
    description   TEXT,
    metadata      JSONB,
    source        TEXT NOT NULL,
    created_at    TIMESTAMPTZ NOT NULL,
    voided_at     TIMESTAMPTZ,
    PRIMARY KEY (tenant_id, id)
);
CREATE INDEX grants_pool ON grants (tenant_id, customer_id, credit_type, resource_id);

-- The settled balance of each pool: the sum of every ledger entry settled for it.
CREATE TABLE pools (
    tenant_id   TEXT NOT NULL,
    customer_id TEXT NOT NULL,
    resource_id TEXT NOT NULL DEFAULT '',
    credit_type TEXT NOT NULL,
    balance     NUMERIC NOT NULL DEFAULT 0,
    overdraft   NUMERIC NOT NULL DEFAULT 0,
    updated_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, customer_id, credit_type, resource_id)
);

-- One row per (tenant, idempotency key): the backstop of exactly-once. event_uid is assigned
-- by ingest per accepted request, so a redelivery (same uid) is told apart from a client's
-- repeat (new uid) that slipped past Redis.
CREATE TABLE usage_events (
    tenant_id       TEXT NOT NULL,
    idempotency_key TEXT NOT NULL,
    event_uid       UUID NOT NULL,
    customer_id     TEXT NOT NULL,
    resource_id     TEXT NOT NULL DEFAULT '',
    event_name      TEXT NOT NULL,
    ts              TIMESTAMPTZ NOT NULL,
    accepted_at     TIMESTAMPTZ NOT NULL,
    settled_at      TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp(),
    status          TEXT NOT NULL CHECK (status IN ('settled', 'denied', 'unpriced')),
    reason          TEXT,
    credit_type     TEXT,
    cost            NUMERIC,
    dimensions      JSONB,
    PRIMARY KEY (tenant_id, idempotency_key)
);

-- Repeats of an idempotency key that charged nothing, one row per repeat (keyed by its uid so
-- a redelivered repeat is counted once).
CREATE TABLE duplicate_events (
    tenant_id       TEXT NOT NULL,
    event_uid       UUID NOT NULL,
    idempotency_key TEXT NOT NULL,
    caught_by       TEXT NOT NULL CHECK (caught_by IN ('redis', 'postgres')),
    seen_at         TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, event_uid)
);
CREATE INDEX duplicate_events_key ON duplicate_events (tenant_id, idempotency_key);

-- Append-only. (tenant, type, source_id, entry_idx) makes every settle idempotent.
CREATE TABLE ledger_entries (
    id          BIGSERIAL PRIMARY KEY,
    tenant_id   TEXT NOT NULL,
    customer_id TEXT NOT NULL,
    resource_id TEXT NOT NULL DEFAULT '',
    credit_type TEXT NOT NULL,
    ts          TIMESTAMPTZ NOT NULL,
    type        TEXT NOT NULL CHECK (type IN ('grant', 'consume', 'expire', 'void', 'adjust', 'deny')),
    source      TEXT NOT NULL,
    source_id   TEXT NOT NULL,
    entry_idx   INTEGER NOT NULL,
    grant_id    UUID,
    amount      NUMERIC NOT NULL,
    end_balance NUMERIC NOT NULL,
    actor       TEXT NOT NULL,
    UNIQUE (tenant_id, type, source_id, entry_idx)
);
CREATE INDEX ledger_entries_pool ON ledger_entries (tenant_id, customer_id, credit_type, resource_id, id DESC);
