//! The outbox writer: called inside the settle transaction, after the ledger rows, grant
//! remainders and pool balances of the batch are written and before the commit. A message
//! therefore exists if and only if the rows that caused it do.
//!
//! - Grant facts give `credits.granted`, `credits.grant.updated` and `credits.expired` with ids
//!   derived from the grant, so a redelivered batch inserts nothing new.
//! - Pools and grants the transaction moved are run through [`cross`]: the level
//!   before is the level after minus what the transaction's new ledger rows moved, against the
//!   fired set (and funding level) stored in `alert_state`, written only when they change. A
//!   redelivered batch moves nothing and fires nothing.
//! - Denied and unpriced events inserted by this transaction are counted per pool and window in
//!   `webhook_rejections`; the sender turns each closed window into one message.
//!
//! Messages are fanned out to endpoints later, by the sender ([`dispatch`]): a tenant with
//! 100 endpoints writes one row per message here, not 100. Only tenants with at least one
//! endpoint pay for any of this: the rest cost one indexed query per batch.
//!
//! [`plan`] decides every message and state row without I/O; this file reads and writes.
//!
//! [`cross`]: shared::webhook::threshold::cross

mod plan;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde_json::{json, Value};
use shared::model::{LedgerMsg, PoolId};
use shared::webhook::{self as wh};
use sqlx::PgConnection;
use uuid::Uuid;

use self::plan::{
    AlertState, BatchPlan, GrantDetail, GrantEventAt, GrantRead, GrantRow, PoolBatch, PoolRead, PoolRow, Rejected,
};
use crate::metric as m;
use crate::settle::GrantMove;

/// The pools the outbox works on, in (tenant, customer, resource, credit type) order.
type PoolKey = PoolId;

#[derive(Debug)]
pub struct NewMessage {
    pub id: Uuid,
    pub tenant_id: String,
    pub kind: &'static str,
    pub body: String,
}

/// The id receivers see (`webhook-id` and the body's `id`): stable across retries.
pub fn public_id(id: Uuid) -> String {
    format!("msg_{}", id.simple())
}

/// A message body `{id, type, timestamp, data}`, serialized once: these bytes are signed.
pub fn message(id: Uuid, tenant_id: &str, kind: &'static str, at: DateTime<Utc>, data: Value) -> NewMessage {
    let body = json!({"id": public_id(id), "type": kind, "timestamp": at, "data": data}).to_string();
    NewMessage {
        id,
        tenant_id: tenant_id.to_owned(),
        kind,
        body,
    }
}

/// Insert messages (an id already present is skipped). Returns how many were new. The sender
/// fans them out to the endpoints ([`dispatch`]), outside the settle transaction.
pub async fn insert(conn: &mut PgConnection, msgs: &[NewMessage]) -> sqlx::Result<usize> {
    if msgs.is_empty() {
        return Ok(0);
    }
    let ids: Vec<Uuid> = msgs.iter().map(|x| x.id).collect();
    let tenants: Vec<&str> = msgs.iter().map(|x| x.tenant_id.as_str()).collect();
    let kinds: Vec<&str> = msgs.iter().map(|x| x.kind).collect();
    let bodies: Vec<&str> = msgs.iter().map(|x| x.body.as_str()).collect();
    let new: Vec<String> = sqlx::query_scalar(
        "INSERT INTO webhook_messages (id, tenant_id, type, body)
         SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::text[])
         ON CONFLICT (id) DO NOTHING RETURNING type",
    )
    .bind(&ids)
    .bind(&tenants)
    .bind(&kinds)
    .bind(&bodies)
    .fetch_all(&mut *conn)
    .await?;
    for kind in new.iter() {
        metrics::counter!(m::WEBHOOK_MESSAGES, "type" => kind.clone()).increment(1);
    }
    Ok(new.len())
}

/// Fan up to `limit` undispatched messages out to one pending delivery per enabled endpoint of
/// the tenant that subscribes to the type, and mark them dispatched, in one statement (replicas
/// skip each other's rows). Returns how many messages it took.
pub async fn dispatch(db: &sqlx::PgPool, limit: i64) -> sqlx::Result<u64> {
    let n: i64 = sqlx::query_scalar(
        "WITH m AS (
            SELECT id, tenant_id, type FROM webhook_messages WHERE NOT dispatched
            ORDER BY created_at LIMIT $1 FOR UPDATE SKIP LOCKED),
         fan AS (
            INSERT INTO webhook_deliveries (message_id, endpoint_id, tenant_id)
            SELECT m.id, e.id, e.tenant_id FROM m
            JOIN webhook_endpoints e ON e.tenant_id = m.tenant_id AND e.disabled_at IS NULL
                AND (e.event_types IS NULL OR m.type = ANY (e.event_types))
            ON CONFLICT DO NOTHING),
         done AS (
            UPDATE webhook_messages w SET dispatched = true FROM m WHERE w.id = m.id RETURNING 1)
         SELECT count(*) FROM done",
    )
    .bind(limit)
    .fetch_one(db)
    .await?;
    Ok(n as u64)
}

/// What one settle transaction's new ledger rows did to one pool.
#[derive(Default)]
pub struct PoolMove {
    pub balance: Decimal,
    pub overdraft: Decimal,
    /// Its new entries in ledger order, as (balance moved, funding moved by a grant or
    /// activation entry): thresholds are crossed along this path, not only between its ends.
    pub steps: Vec<(Decimal, Decimal)>,
}

/// What one settle transaction moved, from the ledger rows it inserted (a redelivered fact
/// inserts nothing and moves nothing), and the usage rows it inserted.
pub struct Moved<'a> {
    /// Pool -> what its new ledger rows moved.
    pub pools: &'a HashMap<PoolKey, PoolMove>,
    /// (tenant, grant) -> its move, as the settle path applies it.
    pub grants: &'a HashMap<(String, Uuid), GrantMove>,
    pub new_usage: &'a HashSet<Uuid>,
}

/// Write the outbox rows of one settled batch (inside its transaction); denied and unpriced
/// events are counted into windows of `rejected_window_s`.
pub async fn record(
    tx: &mut PgConnection,
    facts: &[&LedgerMsg],
    moved: &Moved<'_>,
    rejected_window_s: u32,
) -> anyhow::Result<()> {
    let with = tenants_with_endpoints(tx, facts).await?;
    if with.is_empty() {
        return Ok(());
    }
    let plan = BatchPlan::new(facts, &with, moved);
    let mut msgs: Vec<NewMessage> = Vec::new();
    let now = Utc::now();
    let balances = pool_thresholds(tx, &plan.pools, moved.pools, now, &mut msgs).await?;
    grant_thresholds(tx, &plan.consumed, &balances, now, &mut msgs).await?;
    grant_messages(tx, &plan.grant_events, &balances, &mut msgs).await?;
    count_rejections(tx, &plan.rejected, rejected_window_s).await?;
    insert(tx, &msgs).await?;
    Ok(())
}

/// The tenants of the batch that have at least one endpoint (none of the batch's: no query).
async fn tenants_with_endpoints(tx: &mut PgConnection, facts: &[&LedgerMsg]) -> sqlx::Result<HashSet<String>> {
    let tenants: BTreeSet<&str> = facts.iter().map(|f| plan::tenant_of(f)).collect();
    if tenants.is_empty() {
        return Ok(HashSet::new());
    }
    let tenants: Vec<&str> = tenants.into_iter().collect();
    let with: Vec<String> =
        sqlx::query_scalar("SELECT DISTINCT tenant_id FROM webhook_endpoints WHERE tenant_id = ANY ($1)")
            .bind(&tenants)
            .fetch_all(&mut *tx)
            .await?;
    Ok(with.into_iter().collect())
}

/// Store the fired set (and the pool's funding level) of keys whose state changed, creating
/// rows as needed. Rows go in key order (callers pass BTreeMap order); a state row is only
/// written while the pool or grant row it belongs to is locked by this transaction (the settle
/// transaction moved it), so two ledger-writers never race on one.
async fn save_state(tx: &mut PgConnection, rows: &[AlertState]) -> sqlx::Result<()> {
    if rows.is_empty() {
        return Ok(());
    }
    let (mut t, mut c, mut r, mut ct, mut g, mut b, mut gr, mut f) =
        (vec![], vec![], vec![], vec![], vec![], vec![], vec![], vec![]);
    for s in rows {
        t.push(s.pool.tenant_id.as_str());
        c.push(s.pool.customer_id.as_str());
        r.push(s.pool.resource_id.as_str());
        ct.push(s.pool.credit_type.as_str());
        g.push(s.grant);
        b.push(s.level.balance);
        gr.push(s.level.granted);
        f.push(s.fired.iter().cloned().collect::<Vec<_>>().join(","));
    }
    sqlx::query(
        "INSERT INTO alert_state AS s (tenant_id, customer_id, resource_id, credit_type, grant_id, balance, granted, fired)
         SELECT t, c, r, ct, g, b, gr, CASE WHEN f = '' THEN '{}'::text[] ELSE string_to_array(f, ',') END
         FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::uuid[], $6::numeric[], $7::numeric[], $8::text[])
            WITH ORDINALITY AS k(t, c, r, ct, g, b, gr, f, n) ORDER BY n
         ON CONFLICT (tenant_id, customer_id, credit_type, resource_id, grant_id) DO UPDATE
         SET balance = EXCLUDED.balance, granted = EXCLUDED.granted, fired = EXCLUDED.fired, updated_at = now()",
    )
    .bind(&t)
    .bind(&c)
    .bind(&r)
    .bind(&ct)
    .bind(&g)
    .bind(&b)
    .bind(&gr)
    .bind(&f)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// Balance thresholds of every pool the batch moved ([`plan::pool_alerts`]). Returns each
/// pool's settled balance.
///
/// A batch reads one row per pool and writes `alert_state` only when a threshold fires or
/// recovers or the funding changes, not for every pool it touches. No lock is taken here: the
/// settle transaction already holds the pool's row (it moved its balance), which orders two
/// transactions on one pool.
async fn pool_thresholds(
    tx: &mut PgConnection,
    pools: &BTreeMap<PoolKey, PoolBatch>,
    moved: &HashMap<PoolKey, PoolMove>,
    now: DateTime<Utc>,
    msgs: &mut Vec<NewMessage>,
) -> anyhow::Result<HashMap<PoolKey, Decimal>> {
    if pools.is_empty() {
        return Ok(HashMap::new());
    }
    let rows = read_pools(tx, pools).await?;
    let alerts = plan::pool_alerts(rows, pools, moved, now);
    save_state(tx, &alerts.states).await?;
    msgs.extend(alerts.msgs);
    Ok(alerts.balances)
}

/// Each pool's balance, funding, stored alert state and configured thresholds, in key order.
async fn read_pools(tx: &mut PgConnection, pools: &BTreeMap<PoolKey, PoolBatch>) -> sqlx::Result<Vec<PoolRead>> {
    let (mut t, mut c, mut r, mut ct) = (vec![], vec![], vec![], vec![]);
    for pk in pools.keys() {
        t.push(pk.tenant_id.as_str());
        c.push(pk.customer_id.as_str());
        r.push(pk.resource_id.as_str());
        ct.push(pk.credit_type.as_str());
    }
    let rows: Vec<PoolRow> = sqlx::query_as(
        "SELECT k.t, k.c, k.r, k.ct, s.granted, s.fired,
            COALESCE(p.balance, 0),
            COALESCE((SELECT sum(g.amount) FROM grants g WHERE g.tenant_id = k.t AND g.customer_id = k.c
                AND g.credit_type = k.ct AND g.resource_id = k.r AND g.status IN ('active', 'depleted')
                AND g.activated), 0),
            COALESCE(a.usage_percent, d.usage_percent, '{}'),
            COALESCE(a.balance_below, d.balance_below, '{}')
         FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[]) WITH ORDINALITY AS k(t, c, r, ct, n)
         LEFT JOIN alert_state s ON s.tenant_id = k.t AND s.customer_id = k.c AND s.resource_id = k.r
            AND s.credit_type = k.ct AND s.grant_id = '00000000-0000-0000-0000-000000000000'
         LEFT JOIN pools p ON p.tenant_id = k.t AND p.customer_id = k.c AND p.resource_id = k.r AND p.credit_type = k.ct
         LEFT JOIN credit_alerts a ON a.tenant_id = k.t AND a.customer_id = k.c AND a.resource_id = k.r
            AND a.credit_type = k.ct
         LEFT JOIN credit_alerts d ON d.tenant_id = k.t AND d.customer_id = '' AND d.resource_id = ''
            AND d.credit_type = k.ct
         ORDER BY k.n",
    )
    .bind(&t)
    .bind(&c)
    .bind(&r)
    .bind(&ct)
    .fetch_all(&mut *tx)
    .await?;
    Ok(rows.into_iter().map(PoolRead::from).collect())
}

/// Grant-level thresholds and depletion of every grant the batch consumed from
/// ([`plan::grant_alerts`]). As for pools, the grant's row is locked by the settle transaction,
/// and state is written only when the fired set changes.
async fn grant_thresholds(
    tx: &mut PgConnection,
    consumed: &BTreeMap<(String, Uuid), (PoolKey, Decimal)>,
    balances: &HashMap<PoolKey, Decimal>,
    now: DateTime<Utc>,
    msgs: &mut Vec<NewMessage>,
) -> anyhow::Result<()> {
    if consumed.is_empty() {
        return Ok(());
    }
    let rows = read_grants(tx, consumed).await?;
    let (fired, states) = plan::grant_alerts(rows, consumed, balances, now);
    msgs.extend(fired);
    save_state(tx, &states).await?;
    Ok(())
}

/// Each consumed grant's amount, remaining, status, stored fired set and usage thresholds.
async fn read_grants(
    tx: &mut PgConnection,
    consumed: &BTreeMap<(String, Uuid), (PoolKey, Decimal)>,
) -> sqlx::Result<Vec<GrantRead>> {
    let t: Vec<&str> = consumed.keys().map(|(t, _)| t.as_str()).collect();
    let g: Vec<Uuid> = consumed.keys().map(|(_, g)| *g).collect();
    let rows: Vec<GrantRow> = sqlx::query_as(
        "SELECT k.t, k.g, gr.amount, gr.remaining, gr.status, s.fired,
            COALESCE(a.grant_usage_percent, d.grant_usage_percent, '{}')
         FROM UNNEST($1::text[], $2::uuid[]) WITH ORDINALITY AS k(t, g, n)
         JOIN grants gr ON gr.tenant_id = k.t AND gr.id = k.g
         LEFT JOIN alert_state s ON s.tenant_id = k.t AND s.customer_id = gr.customer_id
            AND s.resource_id = gr.resource_id AND s.credit_type = gr.credit_type AND s.grant_id = k.g
         LEFT JOIN credit_alerts a ON a.tenant_id = k.t AND a.customer_id = gr.customer_id
            AND a.resource_id = gr.resource_id AND a.credit_type = gr.credit_type
         LEFT JOIN credit_alerts d ON d.tenant_id = k.t AND d.customer_id = '' AND d.resource_id = ''
            AND d.credit_type = gr.credit_type
         ORDER BY k.n",
    )
    .bind(&t)
    .bind(&g)
    .fetch_all(&mut *tx)
    .await?;
    Ok(rows.into_iter().map(GrantRead::from).collect())
}

/// credits.granted, credits.grant.updated and credits.expired ([`plan::grant_messages`]).
async fn grant_messages(
    tx: &mut PgConnection,
    events: &[GrantEventAt],
    balances: &HashMap<PoolKey, Decimal>,
    msgs: &mut Vec<NewMessage>,
) -> anyhow::Result<()> {
    if events.is_empty() {
        return Ok(());
    }
    let t: Vec<&str> = events.iter().map(|e| e.tenant.as_str()).collect();
    let g: Vec<Uuid> = events.iter().map(|e| e.grant).collect();
    let rows: Vec<GrantDetail> = sqlx::query_as(
        "SELECT DISTINCT ON (gr.tenant_id, gr.id) gr.tenant_id, gr.id, gr.customer_id, gr.resource_id, gr.credit_type,
            gr.amount, gr.remaining, gr.status, gr.category, gr.priority, gr.cost_amount, gr.cost_currency,
            gr.effective_at, gr.expires_at, gr.display_name, gr.description, gr.metadata, gr.source, gr.created_at,
            gr.voided_at
         FROM UNNEST($1::text[], $2::uuid[]) AS k(t, g) JOIN grants gr ON gr.tenant_id = k.t AND gr.id = k.g",
    )
    .bind(&t)
    .bind(&g)
    .fetch_all(&mut *tx)
    .await?;
    msgs.extend(plan::grant_messages(events, rows, balances, Utc::now()));
    Ok(())
}

/// Count the denied and unpriced events this transaction inserted (the plan keeps only those:
/// a redelivered one was counted by the transaction that inserted it) into their pool's window
/// of `window_s` seconds.
async fn count_rejections(tx: &mut PgConnection, rejected: &[Rejected<'_>], window_s: u32) -> anyhow::Result<()> {
    if rejected.is_empty() {
        return Ok(());
    }
    let (mut t, mut c, mut r, mut ct, mut d, mut un, mut s) = (vec![], vec![], vec![], vec![], vec![], vec![], vec![]);
    for (pk, (dn, up, samples)) in plan::rejection_counts(rejected) {
        t.push(pk.tenant_id.as_str());
        c.push(pk.customer_id.as_str());
        r.push(pk.resource_id.as_str());
        ct.push(pk.credit_type.as_str());
        d.push(dn);
        un.push(up);
        s.push(samples.join(","));
    }
    sqlx::query(
        "INSERT INTO webhook_rejections AS w (tenant_id, customer_id, resource_id, credit_type, window_start, denied,
            unpriced, samples)
         SELECT t, c, r, ct, to_timestamp(floor(extract(epoch FROM now()) / $8) * $8), d, u, string_to_array(s, ',')
         FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::int8[], $6::int8[], $7::text[])
            AS k(t, c, r, ct, d, u, s)
         ON CONFLICT (tenant_id, customer_id, credit_type, resource_id, window_start) DO UPDATE
         SET denied = w.denied + EXCLUDED.denied, unpriced = w.unpriced + EXCLUDED.unpriced,
             samples = (w.samples || EXCLUDED.samples)[1:10]",
    )
    .bind(&t)
    .bind(&c)
    .bind(&r)
    .bind(&ct)
    .bind(&d)
    .bind(&un)
    .bind(&s)
    .bind(f64::from(window_s))
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// Turn every closed rejection window into one credits.event.rejected message. Returns how many.
pub async fn flush_rejections(db: &sqlx::PgPool, window_s: u32) -> anyhow::Result<usize> {
    type Row = (String, String, String, String, DateTime<Utc>, i64, i64, Vec<String>);
    let mut tx = db.begin().await?;
    let rows: Vec<Row> = sqlx::query_as(
        "DELETE FROM webhook_rejections WHERE (tenant_id, customer_id, credit_type, resource_id, window_start) IN (
            SELECT tenant_id, customer_id, credit_type, resource_id, window_start FROM webhook_rejections
            WHERE window_start + make_interval(secs => $1) <= now() - interval '2 seconds'
            LIMIT 1000 FOR UPDATE SKIP LOCKED)
         RETURNING tenant_id, customer_id, resource_id, credit_type, window_start, denied, unpriced, samples",
    )
    .bind(f64::from(window_s))
    .fetch_all(&mut *tx)
    .await?;
    let mut msgs = Vec::new();
    for (t, c, r, ct, start, denied, unpriced, samples) in rows {
        // Random, not derived from the window: a settle transaction that began before the flush
        // and commits after it reopens the window, and those counts deserve a message too.
        let id = Uuid::now_v7();
        let end = start + chrono::Duration::seconds(i64::from(window_s));
        let data = json!({
            "customer_id": c, "credit_type": if ct.is_empty() { None } else { Some(&ct) },
            "resource_id": if r.is_empty() { None } else { Some(&r) },
            "window_start": start, "window_end": end, "denied": denied, "unpriced": unpriced,
            "sample_idempotency_keys": samples,
        });
        msgs.push(message(id, &t, wh::EVENT_REJECTED, end, data));
    }
    let n = insert(&mut tx, &msgs).await?;
    tx.commit().await?;
    Ok(n)
}
