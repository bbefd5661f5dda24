-- A ledger that can grow for years: `usage_events` and `ledger_entries` partitioned by month,
-- idempotency kept exact across partitions, and what `ledger-writer retention` needs.
--
-- Partition key: `settled_at`, the time Postgres settled the row (usage_events already had it,
-- DEFAULT clock_timestamp(); ledger_entries gains it, DEFAULT now(), the settle transaction's
-- start). Not `ts`: an event's own timestamp is chosen by the client (a backfill is years old),
-- and a fact's `ts` (a sweeper expiry at the grant's expires_at, a late event) can be far behind
-- the moment it is written, so month M of `ts` would keep receiving rows after M is dropped,
-- and dropping M would cut entries out of the middle of a pool's chain. `settled_at` grows with
-- the ledger ids of a pool (one writer per pool, batches settle in order), so dropping every
-- month before some instant drops a prefix of each pool's ledger: what was dropped is carried
-- forward as an opening balance (`ledger_archived_totals`) and `reconcile` stays exact.
--
-- Idempotency: Postgres requires a partitioned table's unique constraints to include the
-- partition key, and `settled_at` is not deterministic across redelivery (a redelivered fact
-- is written again later, maybe in the next month; the rater re-deciding after a crash stamps
-- reversals and voids with a new time). So the guards live in two small unpartitioned key
-- tables written in the same statement (and transaction) as the rows they guard:
--   usage_event_keys  (tenant_id, idempotency_key) PK -> event_uid, settled_at
--   ledger_entry_keys (tenant_id, type, source_id, entry_idx) PK -> settled_at
-- The settle path inserts the key first (ON CONFLICT DO NOTHING on the key table, or a plain
-- insert on the fast path, where a conflict is an error and the batch is retried checked) and
-- the row only for keys inserted now, so a key is settled once whatever month it arrives in.
-- `settled_at` on a key row is its row's, so retention can drop the keys of dropped months.
--
-- Partitions: `<table>_yYYYYmMM` (UTC months), created ahead by the ledger-writer
-- (`credits_month_partition`, idempotent, on `migrate` and every hour: this month and the
-- next two) and a `<table>_default` partition that catches anything outside them (rows there
-- move into their month's partition when it is created). Indexes are declared on the parent.
--
-- Retention (`ledger-writer retention --keep-months N`) drops whole months that ended more
-- than max(N months, the longest dedupe window: 35 days) ago: the key rows of those months go
-- too (beyond every dedupe window a repeat key is new, as it already is in Redis), and each
-- pool's dropped entries are summed into `ledger_archived_totals` in the drop's transaction.
--
-- This conversion rewrites both tables in one transaction, holding ACCESS EXCLUSIVE locks
-- until it commits: minutes per ten million rows, during which nothing settles (the pipeline
-- waits, Kafka keeps the facts). On a large production ledger do it online instead: create the
-- partitioned tables under new names, attach the old table as one partition covering
-- everything before the switch (its CHECK constraint added NOT VALID, then validated, so the
-- attach does not scan), backfill the key tables in batches, swap names in a short
-- transaction; or let pg_partman's `partition_data_proc` move the rows batch by batch.

-- The month partition of `parent` that holds `at`; true when it was created now. Idempotent
-- and safe to call from several ledger-writers at once (an advisory lock per partition).
CREATE FUNCTION credits_month_partition(parent text, at timestamptz) RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    m timestamp := date_trunc('month', at AT TIME ZONE 'UTC');
    lo timestamptz := m AT TIME ZONE 'UTC';
    hi timestamptz := (m + interval '1 month') AT TIME ZONE 'UTC';
    part text := format('%s_y%sm%s', parent, to_char(m, 'YYYY'), to_char(m, 'MM'));
    caught boolean;
BEGIN
    IF parent NOT IN ('usage_events', 'ledger_entries') THEN
        RAISE EXCEPTION 'credits_month_partition: % is not a partitioned ledger table', parent;
    END IF;
    PERFORM pg_advisory_xact_lock(hashtext('credits_month_partition'), hashtext(part));
    IF to_regclass(part) IS NOT NULL THEN
        RETURN false;
    END IF;
    EXECUTE format('SELECT EXISTS (SELECT 1 FROM %I WHERE settled_at >= $1 AND settled_at < $2)', parent || '_default')
        INTO caught USING lo, hi;
    IF NOT caught THEN
        EXECUTE format('CREATE TABLE %I PARTITION OF %I FOR VALUES FROM (%L) TO (%L)', part, parent, lo, hi);
    ELSE
        -- The default partition caught rows of this month (no partition was made in time):
        -- they move into the new partition, which is then attached.
        EXECUTE format('CREATE TABLE %I (LIKE %I INCLUDING DEFAULTS INCLUDING CONSTRAINTS)', part, parent);
        EXECUTE format('WITH moved AS (DELETE FROM %I WHERE settled_at >= $1 AND settled_at < $2 RETURNING *)
                        INSERT INTO %I SELECT * FROM moved', parent || '_default', part) USING lo, hi;
        EXECUTE format('ALTER TABLE %I ATTACH PARTITION %I FOR VALUES FROM (%L) TO (%L)', parent, part, lo, hi);
    END IF;
    RETURN true;
END $$;

-- The exactly-once guard of usage events (guarantee 2's Postgres backstop).
CREATE TABLE usage_event_keys (
    tenant_id       TEXT NOT NULL,
    idempotency_key TEXT NOT NULL,
    event_uid       UUID NOT NULL,
    -- The usage row's settled_at (its partition).
    settled_at      TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (tenant_id, idempotency_key)
);
CREATE INDEX usage_event_keys_settled ON usage_event_keys USING brin (settled_at);

-- The idempotency guard of ledger entries: one per (tenant, type, source, index).
CREATE TABLE ledger_entry_keys (
    tenant_id  TEXT NOT NULL,
    type       TEXT NOT NULL,
    source_id  TEXT NOT NULL,
    entry_idx  INTEGER NOT NULL,
    -- The entry's settled_at (its partition).
    settled_at TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (tenant_id, type, source_id, entry_idx)
);
CREATE INDEX ledger_entry_keys_settled ON ledger_entry_keys USING brin (settled_at);

-- Per pool, what retention dropped: the opening balance of the entries that remain (their
-- sum plus `amount` is the pool's balance) and the last id dropped.
CREATE TABLE ledger_archived_totals (
    tenant_id   TEXT NOT NULL,
    customer_id TEXT NOT NULL,
    resource_id TEXT NOT NULL,
    credit_type TEXT NOT NULL,
    amount      NUMERIC NOT NULL,
    entries     BIGINT NOT NULL,
    through_id  BIGINT NOT NULL,
    -- The end of the last month dropped.
    through     TIMESTAMPTZ NOT NULL,
    updated_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, customer_id, credit_type, resource_id)
);

-- usage_events.
ALTER TABLE usage_events RENAME TO usage_events_unpartitioned;
ALTER TABLE usage_events_unpartitioned RENAME CONSTRAINT usage_events_pkey TO usage_events_unpartitioned_pkey;

-- One row per settled (tenant, idempotency key); usage_event_keys holds the key's uniqueness.
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
    status          TEXT NOT NULL CONSTRAINT usage_events_status_check CHECK (status IN ('settled', 'denied', 'unpriced')),
    reason          TEXT,
    credit_type     TEXT,
    cost            NUMERIC,
    dimensions      JSONB
) PARTITION BY RANGE (settled_at);
CREATE TABLE usage_events_default PARTITION OF usage_events DEFAULT;
SELECT credits_month_partition('usage_events', m)
FROM (SELECT DISTINCT date_trunc('month', settled_at AT TIME ZONE 'UTC') AT TIME ZONE 'UTC' AS m
        FROM usage_events_unpartitioned
      UNION SELECT now() + make_interval(months => i) FROM generate_series(0, 2) i) months
ORDER BY m;
INSERT INTO usage_events (tenant_id, idempotency_key, event_uid, customer_id, resource_id, event_name, ts,
    accepted_at, settled_at, status, reason, credit_type, cost, dimensions)
SELECT tenant_id, idempotency_key, event_uid, customer_id, resource_id, event_name, ts,
    accepted_at, settled_at, status, reason, credit_type, cost, dimensions
FROM usage_events_unpartitioned;
INSERT INTO usage_event_keys (tenant_id, idempotency_key, event_uid, settled_at)
SELECT tenant_id, idempotency_key, event_uid, settled_at FROM usage_events_unpartitioned;
DROP TABLE usage_events_unpartitioned;
-- The partition key completes it; usage_event_keys is what makes (tenant, key) unique.
ALTER TABLE usage_events ADD PRIMARY KEY (tenant_id, idempotency_key, settled_at);

-- ledger_entries.
ALTER TABLE ledger_entries RENAME TO ledger_entries_unpartitioned;
ALTER TABLE ledger_entries_unpartitioned RENAME CONSTRAINT ledger_entries_pkey TO ledger_entries_unpartitioned_pkey;
ALTER TABLE ledger_entries_unpartitioned
    RENAME CONSTRAINT ledger_entries_tenant_id_type_source_id_entry_idx_key TO ledger_entries_unpartitioned_key;
ALTER INDEX ledger_entries_pool RENAME TO ledger_entries_unpartitioned_pool;

-- Append-only; ledger_entry_keys makes every settle idempotent. The id sequence is the old
-- table's (owned by the new column), so ids keep increasing.
CREATE TABLE ledger_entries (
    id          BIGINT NOT NULL DEFAULT nextval('ledger_entries_id_seq'),
    tenant_id   TEXT NOT NULL,
    customer_id TEXT NOT NULL,
    resource_id TEXT NOT NULL DEFAULT '',
    credit_type TEXT NOT NULL,
    ts          TIMESTAMPTZ NOT NULL,
    type        TEXT NOT NULL CONSTRAINT ledger_entries_type_check CHECK (type IN ('grant', 'consume', 'expire', 'void', 'adjust', 'deny')),
    source      TEXT NOT NULL,
    source_id   TEXT NOT NULL,
    entry_idx   INTEGER NOT NULL,
    grant_id    UUID,
    amount      NUMERIC NOT NULL,
    end_balance NUMERIC NOT NULL,
    actor       TEXT NOT NULL,
    settled_at  TIMESTAMPTZ NOT NULL DEFAULT now()
) PARTITION BY RANGE (settled_at);
ALTER SEQUENCE ledger_entries_id_seq OWNED BY ledger_entries.id;
CREATE TABLE ledger_entries_default PARTITION OF ledger_entries DEFAULT;

-- Entries written before this migration have no settle time: the running maximum of `ts` in
-- id order (never after now) stands in for it. It never decreases along the ids, so the months
-- retention drops stay a prefix of every pool's ledger.
CREATE TEMP TABLE ledger_entries_settled ON COMMIT DROP AS
SELECT id, LEAST(max(ts) OVER (ORDER BY id ROWS UNBOUNDED PRECEDING), now()) AS settled_at
FROM ledger_entries_unpartitioned;
SELECT credits_month_partition('ledger_entries', m)
FROM (SELECT DISTINCT date_trunc('month', settled_at AT TIME ZONE 'UTC') AT TIME ZONE 'UTC' AS m
        FROM ledger_entries_settled
      UNION SELECT now() + make_interval(months => i) FROM generate_series(0, 2) i) months
ORDER BY m;
INSERT INTO ledger_entries (id, tenant_id, customer_id, resource_id, credit_type, ts, type, source, source_id,
    entry_idx, grant_id, amount, end_balance, actor, settled_at)
SELECT e.id, e.tenant_id, e.customer_id, e.resource_id, e.credit_type, e.ts, e.type, e.source, e.source_id,
    e.entry_idx, e.grant_id, e.amount, e.end_balance, e.actor, s.settled_at
FROM ledger_entries_unpartitioned e JOIN ledger_entries_settled s ON s.id = e.id;
INSERT INTO ledger_entry_keys (tenant_id, type, source_id, entry_idx, settled_at)
SELECT tenant_id, type, source_id, entry_idx, settled_at FROM ledger_entries;
DROP TABLE ledger_entries_unpartitioned;
ALTER TABLE ledger_entries ADD PRIMARY KEY (id, settled_at);
-- The ledger page and reconcile walk a pool by id.
CREATE INDEX ledger_entries_pool ON ledger_entries (tenant_id, customer_id, credit_type, resource_id, id DESC);
-- An event's entries (GET /v1/events/{key}), a grant's own entry (reconcile), a redelivered
-- event's settled charge (settle): by source.
CREATE INDEX ledger_entries_source ON ledger_entries (tenant_id, source_id, type, entry_idx);
