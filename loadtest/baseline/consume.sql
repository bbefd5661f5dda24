-- The in-house baseline: one usage event = one Postgres transaction that locks the customer's
-- grants in consumption order (priority, sooner expiry with never last, promo before paid,
-- effective_at, created_at, id) with FOR UPDATE, takes the cost from the first grant that
-- covers it, and appends one ledger row with the pool balance after it. Run by ./run with
-- pgbench -M prepared; :customers comes from -D. Customers are Zipf-skewed like the load
-- generator's (exponent 1.1); a cost is 1..500 tokens at 0.01 credits.
\set c random_zipfian(0, :customers - 1, 1.1)
\set tokens random(1, 500)
BEGIN;
SELECT sum(remaining) AS bal FROM (
    SELECT remaining FROM grants
     WHERE tenant_id = 'bench' AND customer_id = 'c-' || :c AND credit_type = 'ai-tokens'
       AND resource_id = '' AND status = 'active'
     ORDER BY priority, expires_at NULLS LAST, (category = 'paid'), effective_at, created_at, id
       FOR UPDATE) AS locked \gset
UPDATE grants SET remaining = remaining - :tokens * 0.01
 WHERE tenant_id = 'bench' AND id = (
    SELECT id FROM grants
     WHERE tenant_id = 'bench' AND customer_id = 'c-' || :c AND credit_type = 'ai-tokens'
       AND resource_id = '' AND status = 'active' AND remaining >= :tokens * 0.01
     ORDER BY priority, expires_at NULLS LAST, (category = 'paid'), effective_at, created_at, id
     LIMIT 1)
RETURNING id AS gid \gset
INSERT INTO ledger_entries (tenant_id, customer_id, resource_id, credit_type, ts, type, source, source_id,
    entry_idx, grant_id, amount, end_balance, actor)
VALUES ('bench', 'c-' || :c, '', 'ai-tokens', now(), 'consume', 'usage', gen_random_uuid()::text,
    0, CAST(:gid AS uuid), -(:tokens * 0.01), :bal - :tokens * 0.01, 'system');
COMMIT;
