//! The effects of settling a batch: one small function per table, each a single statement over
//! column arrays (UNNEST), inside the batch's transaction.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use shared::model::{Category, LedgerMsg, LimitFact, Outcome, PoolId, UsageFact};
use sqlx::PgConnection;
use uuid::Uuid;

use super::plan::{DuplicateRow, EntryRow, GrantMove, NewEntry, SettledEntries};
use crate::metric as m;
use crate::webhooks::outbox::PoolMove;

/// Insert the usage rows whose (tenant, idempotency key) is new: the key goes into
/// `usage_event_keys` (ON CONFLICT DO NOTHING: the guard of every month's partition) and the
/// row only where its key went in now, in one statement; the uids inserted now.
pub async fn usage_rows(tx: &mut PgConnection, usage: &[&UsageFact]) -> Result<HashSet<Uuid>, sqlx::Error> {
    let mut cols = UsageCols::default();
    for u in usage {
        cols.push(u);
    }
    let inserted: Vec<Uuid> = sqlx::query_scalar(
        "WITH input AS (
            SELECT * FROM UNNEST($1::text[], $2::text[], $3::uuid[], $4::text[], $5::text[], $6::text[],
                $7::timestamptz[], $8::timestamptz[], $9::text[], $10::text[], $11::text[], $12::numeric[], $13::jsonb[])
                AS i(tenant_id, idempotency_key, event_uid, customer_id, resource_id, event_name, ts, accepted_at,
                     status, reason, credit_type, cost, dimensions)
         ), k AS (
            INSERT INTO usage_event_keys (tenant_id, idempotency_key, event_uid, settled_at)
            SELECT tenant_id, idempotency_key, event_uid, clock_timestamp() FROM input
            ON CONFLICT (tenant_id, idempotency_key) DO NOTHING
            RETURNING tenant_id, idempotency_key, event_uid, settled_at
         )
         INSERT INTO usage_events (tenant_id, idempotency_key, event_uid, customer_id, resource_id,
            event_name, ts, accepted_at, status, reason, credit_type, cost, dimensions, settled_at)
         SELECT i.*, k.settled_at FROM input i JOIN k USING (tenant_id, idempotency_key, event_uid)
         RETURNING event_uid",
    )
    .bind(&cols.tenant)
    .bind(&cols.key)
    .bind(&cols.uid)
    .bind(&cols.customer)
    .bind(&cols.resource)
    .bind(&cols.name)
    .bind(&cols.ts)
    .bind(&cols.accepted)
    .bind(&cols.status)
    .bind(&cols.reason)
    .bind(&cols.credit_type)
    .bind(&cols.cost)
    .bind(&cols.dims)
    .fetch_all(&mut *tx)
    .await?;
    metrics::counter!(m::ROWS, "table" => "usage_events").increment(inserted.len() as u64);
    Ok(inserted.into_iter().collect())
}

/// Who holds each of these (tenant, idempotency key)s: (tenant, key) -> event uid.
pub async fn key_holders(
    tx: &mut PgConnection,
    usage: &[&UsageFact],
) -> Result<HashMap<(String, String), Uuid>, sqlx::Error> {
    let tenants: Vec<&str> = usage.iter().map(|u| u.event.tenant_id.as_str()).collect();
    let keys: Vec<&str> = usage.iter().map(|u| u.event.idempotency_key.as_str()).collect();
    let rows: Vec<(String, String, Uuid)> = sqlx::query_as(
        "SELECT u.tenant_id, u.idempotency_key, u.event_uid FROM usage_event_keys u
         JOIN UNNEST($1::text[], $2::text[]) AS k(t, k) ON u.tenant_id = k.t AND u.idempotency_key = k.k",
    )
    .bind(&tenants)
    .bind(&keys)
    .fetch_all(&mut *tx)
    .await?;
    Ok(rows.into_iter().map(|(t, k, u)| ((t, k), u)).collect())
}

/// The settled `consume` entries of these events' keys.
pub async fn settled_consumes(tx: &mut PgConnection, usage: &[&UsageFact]) -> Result<SettledEntries, sqlx::Error> {
    let tenants: Vec<&str> = usage.iter().map(|u| u.event.tenant_id.as_str()).collect();
    let keys: Vec<&str> = usage.iter().map(|u| u.event.idempotency_key.as_str()).collect();
    let rows: Vec<(String, String, i32, Decimal, Decimal)> = sqlx::query_as(
        "SELECT e.tenant_id, e.source_id, e.entry_idx, e.amount, e.end_balance FROM ledger_entries e
         JOIN UNNEST($1::text[], $2::text[]) AS k(t, k) ON e.tenant_id = k.t AND e.type = 'consume' AND e.source_id = k.k",
    )
    .bind(&tenants)
    .bind(&keys)
    .fetch_all(&mut *tx)
    .await?;
    let mut settled = SettledEntries::new();
    for (t, k, i, a, b) in rows {
        settled.entry((t, k)).or_default().push((i, a, b));
    }
    Ok(settled)
}

/// Record the duplicates (ON CONFLICT DO NOTHING) and count them by where they were caught.
pub async fn duplicates(tx: &mut PgConnection, rows: &[DuplicateRow<'_>]) -> Result<(), sqlx::Error> {
    if rows.is_empty() {
        return Ok(());
    }
    let t: Vec<&str> = rows.iter().map(|r| r.tenant_id).collect();
    let uid: Vec<Uuid> = rows.iter().map(|r| r.event_uid).collect();
    let key: Vec<&str> = rows.iter().map(|r| r.idempotency_key).collect();
    let by: Vec<&str> = rows.iter().map(|r| r.caught_by.as_str()).collect();
    let n = sqlx::query(
        "INSERT INTO duplicate_events (tenant_id, event_uid, idempotency_key, caught_by)
         SELECT * FROM UNNEST($1::text[], $2::uuid[], $3::text[], $4::text[]) ON CONFLICT DO NOTHING",
    )
    .bind(&t)
    .bind(&uid)
    .bind(&key)
    .bind(&by)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    metrics::counter!(m::ROWS, "table" => "duplicate_events").increment(n);
    for b in by {
        metrics::counter!(m::DUPLICATES, "caught_by" => b).increment(1);
    }
    Ok(())
}

/// Insert the batch's grants (ON CONFLICT DO NOTHING); the overdraft each grant inserted now
/// repaid, per pool.
pub async fn grants(tx: &mut PgConnection, facts: &[&LedgerMsg]) -> Result<HashMap<PoolId, Decimal>, sqlx::Error> {
    let mut repaid: HashMap<PoolId, Decimal> = HashMap::new();
    for f in facts {
        let LedgerMsg::Grant(g) = f else { continue };
        let s = &g.grant;
        let inserted = sqlx::query(
            "INSERT INTO grants (tenant_id, id, customer_id, resource_id, credit_type, amount, remaining,
                status, category, priority, cost_amount, cost_currency, effective_at, expires_at,
                display_name, description, metadata, source, created_at, activated)
             VALUES ($1,$2,$3,$4,$5,$6,$7,'active',$8,$9,$10,$11,$12,$13,$14,$15,$16,$17,$18,$19)
             ON CONFLICT DO NOTHING",
        )
        .bind(&g.tenant_id)
        .bind(s.id)
        .bind(&s.customer_id)
        .bind(&s.resource_id)
        .bind(&s.credit_type)
        .bind(s.amount)
        .bind(g.remaining)
        .bind(match s.category {
            Category::Paid => "paid",
            Category::Promo => "promo",
        })
        .bind(s.priority as i32)
        .bind(s.cost.as_ref().map(|c| c.amount))
        .bind(s.cost.as_ref().map(|c| c.currency.clone()))
        .bind(s.effective_at)
        .bind(s.expires_at)
        .bind(&s.display_name)
        .bind(&s.description)
        .bind(&s.metadata)
        .bind(&s.source)
        .bind(s.created_at)
        .bind(!s.scheduled())
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if inserted == 1 && g.remaining < s.amount {
            let pool = PoolId {
                tenant_id: g.tenant_id.clone(),
                customer_id: s.customer_id.clone(),
                resource_id: s.resource_id.clone(),
                credit_type: s.credit_type.clone(),
            };
            *repaid.entry(pool).or_default() += s.amount - g.remaining;
        }
    }
    Ok(repaid)
}

/// Insert the ledger entries in one statement, in their order, each with its key in
/// `ledger_entry_keys` (the idempotency guard across the monthly partitions); `checked` skips
/// entries whose key exists and returns what was inserted, else every key and row goes in (a
/// conflict is an error) and all are new.
pub async fn entries(
    tx: &mut PgConnection,
    rows: &[EntryRow<'_>],
    checked: bool,
) -> Result<Vec<NewEntry>, sqlx::Error> {
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    const INPUT: &str = "UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::timestamptz[], $6::text[],
            $7::text[], $8::text[], $9::int4[], $10::uuid[], $11::numeric[], $12::numeric[], $13::text[])";
    const COLS: &str = "tenant_id, customer_id, resource_id, credit_type, ts, type, source, source_id, entry_idx,
            grant_id, amount, end_balance, actor";
    fn col<'r>(rows: &'r [EntryRow<'_>], f: impl Fn(&'r EntryRow<'_>) -> &'r str) -> Vec<&'r str> {
        rows.iter().map(f).collect()
    }
    let (tenant, customer) = (col(rows, |r| r.pool.tenant_id), col(rows, |r| r.pool.customer_id));
    let (resource, credit_type) = (col(rows, |r| r.pool.resource_id), col(rows, |r| r.pool.credit_type));
    let (kind, source) = (col(rows, |r| r.kind.as_str()), col(rows, |r| r.source));
    let (source_id, actor) = (col(rows, |r| &r.source_id), col(rows, |r| r.actor));
    let ts: Vec<DateTime<Utc>> = rows.iter().map(|r| r.ts).collect();
    let idx: Vec<i32> = rows.iter().map(|r| r.idx).collect();
    let grant_id: Vec<Option<Uuid>> = rows.iter().map(|r| r.grant_id).collect();
    let amount: Vec<Decimal> = rows.iter().map(|r| r.amount).collect();
    let end_balance: Vec<Decimal> = rows.iter().map(|r| r.end_balance).collect();
    macro_rules! bind_all {
        ($q:expr) => {
            $q.bind(&tenant)
                .bind(&customer)
                .bind(&resource)
                .bind(&credit_type)
                .bind(&ts)
                .bind(&kind)
                .bind(&source)
                .bind(&source_id)
                .bind(&idx)
                .bind(&grant_id)
                .bind(&amount)
                .bind(&end_balance)
                .bind(&actor)
        };
    }
    let new = if checked {
        // The first copy of a key in the batch wins (as the insert's order would have it), and
        // the rows go in in fact order so ids follow each pool's chain.
        let sql = format!(
            "WITH input AS (SELECT * FROM {INPUT} WITH ORDINALITY AS i({COLS}, ord)),
             k AS (
                INSERT INTO ledger_entry_keys (tenant_id, type, source_id, entry_idx, settled_at)
                SELECT tenant_id, type, source_id, entry_idx, now() FROM input ORDER BY ord
                ON CONFLICT (tenant_id, type, source_id, entry_idx) DO NOTHING
                RETURNING tenant_id, type, source_id, entry_idx
             )
             INSERT INTO ledger_entries ({COLS})
             SELECT {COLS} FROM (
                SELECT DISTINCT ON (tenant_id, type, source_id, entry_idx) i.*
                FROM input i JOIN k USING (tenant_id, type, source_id, entry_idx)
                ORDER BY tenant_id, type, source_id, entry_idx, ord) d
             ORDER BY ord
             RETURNING tenant_id, customer_id, resource_id, credit_type, type, grant_id, amount, source_id"
        );
        bind_all!(sqlx::query_as::<_, NewEntry>(&sql))
            .fetch_all(&mut *tx)
            .await?
    } else {
        let sql = format!(
            "WITH k AS (
                INSERT INTO ledger_entry_keys (tenant_id, type, source_id, entry_idx, settled_at)
                SELECT *, now() FROM UNNEST($1::text[], $6::text[], $8::text[], $9::int4[])
             )
             INSERT INTO ledger_entries ({COLS}) SELECT * FROM {INPUT}"
        );
        bind_all!(sqlx::query(&sql)).execute(&mut *tx).await?;
        rows.iter().map(NewEntry::from).collect()
    };
    metrics::counter!(m::ROWS, "table" => "ledger_entries").increment(new.len() as u64);
    Ok(new)
}

/// Store per-pool limit overrides in fact order (the last one of a pool wins); None deletes.
pub async fn limits(tx: &mut PgConnection, limits: &[&LimitFact]) -> Result<(), sqlx::Error> {
    for l in limits {
        let p = &l.pool;
        match l.limit {
            Some(k) => {
                sqlx::query(
                    "INSERT INTO pool_limits (tenant_id, customer_id, resource_id, credit_type, limit_kind)
                     VALUES ($1, $2, $3, $4, $5)
                     ON CONFLICT (tenant_id, customer_id, credit_type, resource_id)
                     DO UPDATE SET limit_kind = EXCLUDED.limit_kind, updated_at = now()",
                )
                .bind(&p.tenant_id)
                .bind(&p.customer_id)
                .bind(&p.resource_id)
                .bind(&p.credit_type)
                .bind(k.as_str())
                .execute(&mut *tx)
                .await?;
            }
            None => {
                sqlx::query(
                    "DELETE FROM pool_limits WHERE tenant_id = $1 AND customer_id = $2 AND resource_id = $3
                        AND credit_type = $4",
                )
                .bind(&p.tenant_id)
                .bind(&p.customer_id)
                .bind(&p.resource_id)
                .bind(&p.credit_type)
                .execute(&mut *tx)
                .await?;
            }
        }
        metrics::counter!(m::ROWS, "table" => "pool_limits").increment(1);
    }
    Ok(())
}

/// Move grant remainders (and end voided or expired grants) by the batch's moves.
pub async fn grant_moves(tx: &mut PgConnection, moves: &HashMap<(String, Uuid), GrantMove>) -> Result<(), sqlx::Error> {
    if moves.is_empty() {
        return Ok(());
    }
    let t: Vec<&str> = moves.keys().map(|k| k.0.as_str()).collect();
    let ids: Vec<Uuid> = moves.keys().map(|k| k.1).collect();
    let ds: Vec<Decimal> = moves.values().map(|g| g.delta).collect();
    let ends: Vec<Option<&str>> = moves.values().map(|g| g.ended.map(|e| e.as_str())).collect();
    let acts: Vec<bool> = moves.values().map(|g| g.activated).collect();
    sqlx::query(
        "UPDATE grants g SET remaining = CASE WHEN d.ended IS NOT NULL THEN 0 ELSE g.remaining + d.delta END,
            status = CASE WHEN d.ended IS NOT NULL THEN d.ended
                          WHEN g.status IN ('voided', 'expired') THEN g.status
                          WHEN g.remaining + d.delta <= 0 THEN 'depleted' ELSE 'active' END,
            voided_at = CASE WHEN d.ended = 'voided' THEN now() ELSE g.voided_at END,
            activated = g.activated OR d.activated
         FROM UNNEST($1::text[], $2::uuid[], $3::numeric[], $4::text[], $5::bool[])
            AS d(tenant_id, id, delta, ended, activated)
         WHERE g.tenant_id = d.tenant_id AND g.id = d.id",
    )
    .bind(&t)
    .bind(&ids)
    .bind(&ds)
    .bind(&ends)
    .bind(&acts)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// Move pool balances and overdraft by the batch's moves (a pool's first entry creates its row).
pub async fn pool_moves(tx: &mut PgConnection, moves: &HashMap<PoolId, PoolMove>) -> Result<(), sqlx::Error> {
    if moves.is_empty() {
        return Ok(());
    }
    let col = |f: fn(&PoolId) -> &str| moves.keys().map(f).collect::<Vec<&str>>();
    let (t, c) = (col(|p| &p.tenant_id), col(|p| &p.customer_id));
    let (r, ct) = (col(|p| &p.resource_id), col(|p| &p.credit_type));
    let b: Vec<Decimal> = moves.values().map(|mv| mv.balance).collect();
    let o: Vec<Decimal> = moves.values().map(|mv| mv.overdraft).collect();
    sqlx::query(
        "INSERT INTO pools AS p (tenant_id, customer_id, resource_id, credit_type, balance, overdraft)
         SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::numeric[], $6::numeric[])
         ON CONFLICT (tenant_id, customer_id, credit_type, resource_id) DO UPDATE
         SET balance = p.balance + EXCLUDED.balance, overdraft = p.overdraft + EXCLUDED.overdraft, updated_at = now()",
    )
    .bind(&t)
    .bind(&c)
    .bind(&r)
    .bind(&ct)
    .bind(&b)
    .bind(&o)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// Column vectors for one multi-row insert into usage_events.
#[derive(Default)]
struct UsageCols {
    tenant: Vec<String>,
    key: Vec<String>,
    uid: Vec<Uuid>,
    customer: Vec<String>,
    resource: Vec<String>,
    name: Vec<String>,
    ts: Vec<DateTime<Utc>>,
    accepted: Vec<DateTime<Utc>>,
    status: Vec<&'static str>,
    reason: Vec<Option<String>>,
    credit_type: Vec<Option<String>>,
    cost: Vec<Option<Decimal>>,
    dims: Vec<serde_json::Value>,
}

impl UsageCols {
    fn push(&mut self, u: &UsageFact) {
        let e = &u.event;
        self.tenant.push(e.tenant_id.clone());
        self.key.push(e.idempotency_key.clone());
        self.uid.push(e.event_uid);
        self.customer.push(e.customer_id.clone());
        self.resource.push(e.resource_id.clone());
        self.name.push(e.event_name.clone());
        self.ts.push(e.timestamp);
        self.accepted.push(e.accepted_at);
        self.status.push(u.outcome.status());
        let (reason, ct, cost) = match &u.outcome {
            Outcome::Settled { credit_type, cost, .. } => (None, Some(credit_type.clone()), Some(*cost)),
            Outcome::Denied {
                credit_type,
                cost,
                reason,
                ..
            } => (Some(reason.clone()), Some(credit_type.clone()), Some(*cost)),
            Outcome::Unpriced { reason } => (Some(reason.clone()), None, None),
            Outcome::Duplicate => (None, None, None),
        };
        self.reason.push(reason);
        self.credit_type.push(ct);
        self.cost.push(cost);
        self.dims.push(serde_json::Value::Object(e.dimensions.clone()));
    }
}
