-- Billing: payments (where charges go), top-ups, auto-recharge, plans, add-ons and
-- subscriptions. Written by ingest (settings, catalogue, subscriptions, top-up charges) and by
-- the ledger-writer's billing tasks (period grants, auto-recharge charges). Credits always enter
-- a pool as a grant through the input topic; these tables only decide when and why.

-- Where the tenant's billing system takes charges, and the secret they are signed with
-- (Standard Webhooks, like webhooks).
CREATE TABLE payment_settings (
    tenant_id  TEXT PRIMARY KEY REFERENCES tenants (id),
    charge_url TEXT NOT NULL,
    secret     TEXT NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- The price of one credit of a credit type, and the bounds of one top-up (in credits).
CREATE TABLE top_up_prices (
    tenant_id   TEXT NOT NULL,
    credit_type TEXT NOT NULL,
    unit_price  NUMERIC NOT NULL CHECK (unit_price >= 0),
    currency    TEXT NOT NULL,
    min_credits NUMERIC NOT NULL,
    max_credits NUMERIC NOT NULL,
    updated_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, credit_type),
    FOREIGN KEY (tenant_id, credit_type) REFERENCES credit_types (tenant_id, id)
);

-- Every charge sent (or about to be sent). id is the charge_id the receiver sees: its
-- idempotency key, so a retry after a timeout is never charged twice. Credits are granted only
-- once status = 'succeeded'; the grant id derives from the charge id, so granting twice is
-- harmless, and granted_at records that the grant command was acknowledged by Kafka.
CREATE TABLE charges (
    tenant_id         TEXT NOT NULL,
    id                TEXT NOT NULL,
    reason            TEXT NOT NULL CHECK (reason IN ('top_up', 'auto_recharge')),
    customer_id       TEXT NOT NULL,
    resource_id       TEXT NOT NULL DEFAULT '',
    credit_type       TEXT NOT NULL,
    credits           NUMERIC NOT NULL,
    amount            NUMERIC NOT NULL,
    currency          TEXT NOT NULL,
    payment_method_id TEXT NOT NULL,
    -- Top-ups: the client's idempotency key. Auto-recharge: NULL.
    idempotency_key   TEXT,
    -- Auto-recharge: expiry of the grant, in days from the grant.
    grant_expiration_days INTEGER,
    status            TEXT NOT NULL DEFAULT 'pending'
                      CHECK (status IN ('pending', 'unknown', 'succeeded', 'failed')),
    failure_reason    TEXT,
    attempts          INTEGER NOT NULL DEFAULT 0,
    -- Due time of the next attempt; also a lease while an attempt is running.
    next_attempt_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    grant_id          UUID NOT NULL,
    granted_at        TIMESTAMPTZ,
    -- When the charge counts against a spend period: the billing clock (now, unless
    -- BILLING_CLOCK_OFFSET_S moves it in tests).
    billed_at         TIMESTAMPTZ NOT NULL DEFAULT now(),
    created_at        TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at        TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, id)
);
CREATE UNIQUE INDEX charges_idempotency ON charges (tenant_id, idempotency_key) WHERE idempotency_key IS NOT NULL;
CREATE INDEX charges_spend ON charges (tenant_id, customer_id, credit_type, resource_id, billed_at)
    WHERE reason = 'auto_recharge';
CREATE INDEX charges_ungranted ON charges (updated_at) WHERE status = 'succeeded' AND granted_at IS NULL;

-- Auto-recharge per pool. in_flight_charge is the per-pool guard: set (with a conditional
-- UPDATE) before a charge is sent and cleared only once its grant is settled or the charge
-- failed, so a restart never starts a second recharge for the same pool.
CREATE TABLE auto_recharge (
    tenant_id             TEXT NOT NULL,
    customer_id           TEXT NOT NULL,
    resource_id           TEXT NOT NULL DEFAULT '',
    credit_type           TEXT NOT NULL,
    enabled               BOOLEAN NOT NULL,
    threshold             NUMERIC NOT NULL,
    target_balance        NUMERIC NOT NULL,
    spend_limit           NUMERIC NOT NULL,
    currency              TEXT NOT NULL,
    -- The spend period is a calendar month starting on this day of the month (1-28), at 00:00 UTC.
    reset_day             SMALLINT NOT NULL CHECK (reset_day BETWEEN 1 AND 28),
    grant_expiration_days INTEGER,
    payment_method_id     TEXT NOT NULL,
    paused_reason         TEXT CHECK (paused_reason IN ('spend_limit_reached', 'payment_failed')),
    paused_at             TIMESTAMPTZ,
    -- spend_limit_reached is lifted when the period it happened in is over.
    paused_period_start   TIMESTAMPTZ,
    in_flight_charge      TEXT,
    in_flight_since       TIMESTAMPTZ,
    -- The last deny ledger entry seen: a newer one triggers a recharge even above the threshold.
    deny_seen_id          BIGINT NOT NULL DEFAULT 0,
    last_recharge_at      TIMESTAMPTZ,
    created_at            TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at            TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, customer_id, credit_type, resource_id)
);
CREATE INDEX auto_recharge_active ON auto_recharge (tenant_id) WHERE enabled;

-- Plans and add-ons: entitlements is a JSON array of {credit_type, amount, cadence}.
CREATE TABLE plans (
    tenant_id      TEXT NOT NULL REFERENCES tenants (id),
    id             TEXT NOT NULL,
    name           TEXT NOT NULL,
    billing_period TEXT NOT NULL CHECK (billing_period IN ('monthly', 'yearly')),
    entitlements   JSONB NOT NULL,
    updated_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, id)
);

CREATE TABLE addons (
    tenant_id    TEXT NOT NULL REFERENCES tenants (id),
    id           TEXT NOT NULL,
    name         TEXT NOT NULL,
    behavior     TEXT NOT NULL CHECK (behavior IN ('increment', 'override')),
    entitlements JSONB NOT NULL,
    updated_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, id)
);

-- One subscription per customer. revision grows on every change; grant ids derive from
-- (customer, revision, item, period), so a change issues fresh grants and a repeat of the same
-- period is the same grant.
CREATE TABLE subscriptions (
    tenant_id   TEXT NOT NULL REFERENCES tenants (id),
    customer_id TEXT NOT NULL,
    plan_id     TEXT NOT NULL,
    addons      JSONB NOT NULL,
    start_at    TIMESTAMPTZ NOT NULL,
    revision    INTEGER NOT NULL,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, customer_id)
);

-- What a subscription revision grants, one row per entitlement after add-on behaviour is
-- applied. next_period is the index of the first period not yet granted; next_at its start.
-- The scheduler claims due rows (FOR UPDATE SKIP LOCKED), produces the period's grant, and
-- advances next_period in the same transaction, after Kafka acknowledged the grant.
CREATE TABLE subscription_items (
    tenant_id    TEXT NOT NULL,
    customer_id  TEXT NOT NULL,
    revision     INTEGER NOT NULL,
    item         TEXT NOT NULL,
    source       TEXT NOT NULL CHECK (source IN ('plan', 'add-on')),
    display_name TEXT NOT NULL,
    credit_type  TEXT NOT NULL,
    amount       NUMERIC NOT NULL,
    cadence      TEXT NOT NULL CHECK (cadence IN ('monthly', 'yearly')),
    start_at     TIMESTAMPTZ NOT NULL,
    next_period  INTEGER NOT NULL,
    next_at      TIMESTAMPTZ NOT NULL,
    -- Set when the revision is replaced: the row is never granted again.
    ended_at     TIMESTAMPTZ,
    PRIMARY KEY (tenant_id, customer_id, revision, item)
);
CREATE INDEX subscription_items_due ON subscription_items (next_at) WHERE ended_at IS NULL;
