//! The outbox writer: called inside the settle transaction, after the ledger rows, grant
//! remainders and pool balances of the batch are written and before the commit. A message
//! therefore exists if and only if the rows that caused it do.
//!
//! - Grant facts give `credits.granted`, `credits.grant.updated` and `credits.expired` with ids
//!   derived from the grant, so a redelivered batch inserts nothing new.
//! - Pools and grants the transaction moved are run through [`threshold::cross`]: the level
//!   before is the level after minus what the transaction's new ledger rows moved, against the
//!   fired set (and funding level) stored in `alert_state`, written only when they change. A
//!   redelivered batch moves nothing and fires nothing.
//! - Denied and unpriced events inserted by this transaction are counted per pool and window in
//!   `webhook_rejections`; the sender turns each closed window into one message.
//!
//! Messages are fanned out to endpoints later, by the sender ([`dispatch`]): a tenant with
//! 100 endpoints writes one row per message here, not 100. Only tenants with at least one
//! endpoint pay for any of this: the rest cost one indexed query per batch.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde_json::{json, Value};
use shared::model::{GrantChange, LedgerMsg, Outcome, PoolId};
use shared::webhook::threshold::{cross, cross_path, Crossing, Level, Threshold};
use shared::webhook::{self as wh};
use sqlx::PgConnection;
use uuid::Uuid;

use crate::metric as m;
use crate::settle::GrantMove;

/// Namespace of message ids derived from what caused them.
const MSG_NS: Uuid = Uuid::from_u128(0x1b7e_52c4_0f3a_4e19_9c6d_2a85_e4f1_7b30);

/// The pools the outbox works on, in (tenant, customer, resource, credit type) order.
type PoolKey = PoolId;

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

fn dec(d: Decimal) -> String {
    d.normalize().to_string()
}

fn pool_json(p: &PoolKey, balance: Option<Decimal>) -> serde_json::Map<String, Value> {
    let mut m = serde_json::Map::new();
    m.insert("customer_id".into(), json!(p.customer_id));
    m.insert("credit_type".into(), json!(p.credit_type));
    m.insert(
        "resource_id".into(),
        if p.resource_id.is_empty() {
            Value::Null
        } else {
            json!(p.resource_id)
        },
    );
    m.insert("balance".into(), json!(balance.map(dec)));
    m
}

fn threshold_json(t: &Threshold) -> Value {
    match t {
        Threshold::UsagePercent(p) => json!({"type": "usage_percent", "value": p}),
        Threshold::BalanceBelow(b) => json!({"type": "balance_below", "value": dec(*b)}),
        Threshold::Depleted => json!({"type": "depleted"}),
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

/// What the batch did to one pool.
#[derive(Default)]
struct PoolBatch {
    /// What this transaction moved the balance by (set from [`Moved`]).
    moved: Decimal,
    /// Grant amounts that entered the pool in this batch (new active grants, activations).
    granted: Decimal,
    /// The batch has grant facts for the pool: its funding may change without its balance
    /// moving (a depleted grant voided or expired), so it is evaluated even if nothing moved.
    grant_facts: bool,
}

enum GrantEvent {
    Granted,
    Changed(GrantChange, Decimal),
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

/// Write the outbox rows of one settled batch (inside its transaction).
pub async fn record(tx: &mut PgConnection, facts: &[&LedgerMsg], moved: &Moved<'_>) -> anyhow::Result<()> {
    let tenants: BTreeSet<&str> = facts.iter().map(|f| tenant_of(f)).collect();
    if tenants.is_empty() {
        return Ok(());
    }
    let tenants: Vec<&str> = tenants.into_iter().collect();
    let with: Vec<String> =
        sqlx::query_scalar("SELECT DISTINCT tenant_id FROM webhook_endpoints WHERE tenant_id = ANY ($1)")
            .bind(&tenants)
            .fetch_all(&mut *tx)
            .await?;
    if with.is_empty() {
        return Ok(());
    }
    let with: HashSet<String> = with.into_iter().collect();

    let mut pools: BTreeMap<PoolKey, PoolBatch> = BTreeMap::new();
    // (tenant, grant) -> (pool, sum of consumption entries)
    let mut consumed: BTreeMap<(String, Uuid), (PoolKey, Decimal)> = BTreeMap::new();
    let mut grant_events: Vec<(String, Uuid, DateTime<Utc>, GrantEvent)> = Vec::new();
    // (pool with credit type '' when unpriced, key, uid, denied?)
    let mut rejected: Vec<(PoolKey, &str, Uuid, bool)> = Vec::new();
    for f in facts.iter().filter(|f| with.contains(tenant_of(f))) {
        match f {
            LedgerMsg::Usage(u) => {
                let ev = &u.event;
                let key = |ct: &str| PoolId {
                    tenant_id: ev.tenant_id.clone(),
                    customer_id: ev.customer_id.clone(),
                    resource_id: ev.resource_id.clone(),
                    credit_type: ct.to_owned(),
                };
                match &u.outcome {
                    Outcome::Settled {
                        credit_type, entries, ..
                    } => {
                        let pk = key(credit_type);
                        pools.entry(pk.clone()).or_default();
                        for e in entries {
                            if let Some(g) = e.grant_id {
                                consumed
                                    .entry((ev.tenant_id.clone(), g))
                                    .or_insert_with(|| (pk.clone(), Decimal::ZERO))
                                    .1 += e.amount;
                            }
                        }
                    }
                    Outcome::Denied { credit_type, .. } => {
                        pools.entry(key(credit_type)).or_default();
                        rejected.push((key(credit_type), &ev.idempotency_key, ev.event_uid, true));
                    }
                    Outcome::Unpriced { .. } => {
                        rejected.push((key(""), &ev.idempotency_key, ev.event_uid, false));
                    }
                    Outcome::Duplicate => {}
                }
            }
            LedgerMsg::Grant(g) => {
                let s = &g.grant;
                let pk = PoolId {
                    tenant_id: g.tenant_id.clone(),
                    customer_id: s.customer_id.clone(),
                    resource_id: s.resource_id.clone(),
                    credit_type: s.credit_type.clone(),
                };
                let p = pools.entry(pk).or_default();
                p.grant_facts = true;
                if !s.scheduled() {
                    p.granted += s.amount;
                }
                grant_events.push((g.tenant_id.clone(), s.id, s.created_at, GrantEvent::Granted));
            }
            // A give-back moves the pool: its thresholds are evaluated (a recovery); so does a
            // dead-lettered event's charge (its give-back follows).
            LedgerMsg::Reversal(v) | LedgerMsg::DeadLetteredCharge(v) => {
                pools.entry(v.pool.clone()).or_default();
            }
            // A limit change moves no balance.
            LedgerMsg::Limit(_) => {}
            LedgerMsg::GrantChange(v) => {
                let pk = v.pool.clone();
                let moved: Decimal = v.entries.iter().map(|e| e.amount).sum();
                let p = pools.entry(pk).or_default();
                p.grant_facts = true;
                if v.change == GrantChange::Activate {
                    p.granted += moved + v.repaid;
                }
                grant_events.push((
                    v.pool.tenant_id.clone(),
                    v.grant_id,
                    v.at,
                    GrantEvent::Changed(v.change, -moved),
                ));
            }
        }
    }

    // Thresholds see only what this transaction moved, exactly; pools and grants it did not move
    // (a redelivery) were evaluated by the transaction that did.
    pools.retain(|k, p| match moved.pools.get(k) {
        Some(m) => {
            p.moved = m.balance;
            true
        }
        None => p.grant_facts,
    });
    consumed.retain(|k, (_, m)| match moved.grants.get(k) {
        Some(g) => {
            *m = g.delta;
            true
        }
        None => false,
    });
    rejected.retain(|r| moved.new_usage.contains(&r.2));

    let mut msgs: Vec<NewMessage> = Vec::new();
    let now = Utc::now();
    let balances = pool_thresholds(tx, &pools, moved.pools, now, &mut msgs).await?;
    grant_thresholds(tx, &consumed, &balances, now, &mut msgs).await?;
    grant_messages(tx, &grant_events, &balances, &mut msgs).await?;
    count_rejections(tx, &rejected).await?;
    insert(tx, &msgs).await?;
    Ok(())
}

fn tenant_of(f: &LedgerMsg) -> &str {
    match f {
        LedgerMsg::Usage(u) => &u.event.tenant_id,
        LedgerMsg::Grant(g) => &g.tenant_id,
        LedgerMsg::GrantChange(v) => &v.pool.tenant_id,
        LedgerMsg::Reversal(v) | LedgerMsg::DeadLetteredCharge(v) => &v.pool.tenant_id,
        LedgerMsg::Limit(v) => &v.pool.tenant_id,
    }
}

/// Store the fired set (and the pool's funding level) of keys whose state changed, creating
/// rows as needed. Rows go in key order (callers pass BTreeMap order); a state row is only
/// written while the pool or grant row it belongs to is locked by this transaction (the settle
/// transaction moved it), so two ledger-writers never race on one.
async fn save_state(tx: &mut PgConnection, rows: &[(&PoolKey, Uuid, Level, BTreeSet<String>)]) -> sqlx::Result<()> {
    if rows.is_empty() {
        return Ok(());
    }
    let (mut t, mut c, mut r, mut ct, mut g, mut b, mut gr, mut f) =
        (vec![], vec![], vec![], vec![], vec![], vec![], vec![], vec![]);
    for (pk, gid, l, fired) in rows {
        t.push(pk.tenant_id.as_str());
        c.push(pk.customer_id.as_str());
        r.push(pk.resource_id.as_str());
        ct.push(pk.credit_type.as_str());
        g.push(*gid);
        b.push(l.balance);
        gr.push(l.granted);
        f.push(fired.iter().cloned().collect::<Vec<_>>().join(","));
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

type PoolRow = (
    String,
    String,
    String,
    String,
    Option<Decimal>,
    Option<Vec<String>>,
    Decimal,
    Decimal,
    Vec<i32>,
    Vec<Decimal>,
);

/// Balance thresholds of every pool the batch moved. Returns each pool's settled balance.
///
/// The level before the batch is the level after it minus what this transaction moved (exact:
/// taken from the ledger rows it inserted); the funding level before it is the stored one (it
/// is stored whenever it changes). So a batch reads one row per pool and writes `alert_state`
/// only when a threshold fires or recovers or the funding changes, not for every pool it
/// touches. No lock is taken here: the settle transaction already holds the pool's row (it
/// moved its balance), which orders two transactions on one pool.
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
    let mut balances = HashMap::new();
    let mut states = Vec::new();
    let mut emitted = Vec::new();
    for (t, c, r, ct, stored_granted, fired, balance, granted, usage, below) in rows {
        let pk = PoolId {
            tenant_id: t,
            customer_id: c,
            resource_id: r,
            credit_type: ct,
        };
        let after = Level { balance, granted };
        let batch = &pools[&pk];
        let before = Level {
            balance: balance - batch.moved,
            // Never stored: what the batch's grants added is all that changed it.
            granted: stored_granted.unwrap_or(granted - batch.granted),
        };
        let mut th: Vec<Threshold> = usage.iter().map(|p| Threshold::UsagePercent(*p as u32)).collect();
        th.extend(below.iter().map(|b| Threshold::BalanceBelow(*b)));
        th.push(Threshold::Depleted);
        let fired: BTreeSet<String> = fired.unwrap_or_default().into_iter().collect();
        // The levels after each of the batch's entries, ending exactly at `after` (a grant
        // and the usage that drains it in one batch still cross every threshold between).
        let mut path = Vec::new();
        let mut l = before;
        for (b, g) in moved.get(&pk).map(|m| m.steps.as_slice()).unwrap_or_default() {
            l.balance += b;
            l.granted += g;
            path.push(l);
        }
        match path.last_mut() {
            Some(last) => *last = after,
            None => path.push(after),
        }
        let (crossings, next) = cross_path(&before, &path, &th, &fired);
        for x in crossings {
            let (kind, t) = match &x {
                Crossing::Fired(t @ Threshold::Depleted) => (wh::BALANCE_DEPLETED, t),
                Crossing::Fired(t) => (wh::BALANCE_USAGE_LOW, t),
                Crossing::Recovered(t) => (wh::BALANCE_RECOVERED, t),
            };
            let mut data = pool_json(&pk, Some(balance));
            data.insert("granted".into(), json!(dec(granted)));
            data.insert("threshold".into(), threshold_json(t));
            emitted.push(message(Uuid::now_v7(), &pk.tenant_id, kind, now, Value::Object(data)));
        }
        balances.insert(pk.clone(), balance);
        if next != fired || stored_granted != Some(granted) {
            states.push((pk, after, next));
        }
    }
    let refs: Vec<(&PoolKey, Uuid, Level, BTreeSet<String>)> =
        states.iter().map(|(k, l, f)| (k, Uuid::nil(), *l, f.clone())).collect();
    save_state(tx, &refs).await?;
    msgs.extend(emitted);
    Ok(balances)
}

type GrantRow = (String, Uuid, Decimal, Decimal, String, Option<Vec<String>>, Vec<i32>);

/// Grant-level thresholds (grant_usage_percent) and depletion of every grant the batch consumed
/// from. As for pools: the remaining before is the remaining after minus what this transaction
/// moved, the grant's row is locked by the settle transaction, and state is written only when
/// the fired set changes.
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
    let mut states = Vec::new();
    for (tenant, gid, amount, remaining, status, fired, usage) in rows {
        let (pk, moved) = &consumed[&(tenant.clone(), gid)];
        let after = Level {
            balance: remaining,
            granted: amount,
        };
        let before = Level {
            balance: remaining - moved,
            granted: amount,
        };
        let mut th: Vec<Threshold> = usage.iter().map(|p| Threshold::UsagePercent(*p as u32)).collect();
        th.push(Threshold::Depleted);
        let fired: BTreeSet<String> = fired.unwrap_or_default().into_iter().collect();
        let (crossings, next) = cross(&before, &after, &th, &fired);
        // A voided or expired grant is not "used up"; its thresholds stay quiet.
        if status != "voided" && status != "expired" {
            for x in crossings {
                let Crossing::Fired(t) = x else { continue };
                let kind = if t == Threshold::Depleted {
                    wh::GRANT_DEPLETED
                } else {
                    wh::GRANT_USAGE_LOW
                };
                let mut data = pool_json(pk, balances.get(pk).copied());
                data.insert(
                    "grant".into(),
                    json!({"id": gid, "amount": dec(amount), "remaining": dec(remaining), "status": status}),
                );
                data.insert("threshold".into(), threshold_json(&t));
                msgs.push(message(Uuid::now_v7(), &tenant, kind, now, Value::Object(data)));
            }
        }
        if next != fired {
            states.push((pk, gid, after, next));
        }
    }
    save_state(tx, &states).await?;
    Ok(())
}

#[derive(sqlx::FromRow)]
struct GrantDetail {
    tenant_id: String,
    id: Uuid,
    customer_id: String,
    resource_id: String,
    credit_type: String,
    amount: Decimal,
    remaining: Decimal,
    status: String,
    category: String,
    priority: i32,
    cost_amount: Option<Decimal>,
    cost_currency: Option<String>,
    effective_at: DateTime<Utc>,
    expires_at: Option<DateTime<Utc>>,
    display_name: String,
    description: Option<String>,
    metadata: Option<Value>,
    source: String,
    created_at: DateTime<Utc>,
    voided_at: Option<DateTime<Utc>>,
}

/// credits.granted, credits.grant.updated and credits.expired, with ids derived from the grant.
async fn grant_messages(
    tx: &mut PgConnection,
    events: &[(String, Uuid, DateTime<Utc>, GrantEvent)],
    balances: &HashMap<PoolKey, Decimal>,
    msgs: &mut Vec<NewMessage>,
) -> anyhow::Result<()> {
    if events.is_empty() {
        return Ok(());
    }
    let t: Vec<&str> = events.iter().map(|e| e.0.as_str()).collect();
    let g: Vec<Uuid> = events.iter().map(|e| e.1).collect();
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
    let by_id: HashMap<(String, Uuid), GrantDetail> =
        rows.into_iter().map(|r| ((r.tenant_id.clone(), r.id), r)).collect();
    for (tenant, gid, at, ev) in events {
        let Some(r) = by_id.get(&(tenant.clone(), *gid)) else {
            continue;
        };
        let pk = PoolId {
            tenant_id: r.tenant_id.clone(),
            customer_id: r.customer_id.clone(),
            resource_id: r.resource_id.clone(),
            credit_type: r.credit_type.clone(),
        };
        let status = if r.status == "active" && r.effective_at > Utc::now() {
            "scheduled"
        } else {
            r.status.as_str()
        };
        let grant = json!({
            "id": r.id, "customer_id": r.customer_id, "credit_type": r.credit_type,
            "resource_id": if r.resource_id.is_empty() { None } else { Some(&r.resource_id) },
            "amount": dec(r.amount), "remaining": dec(r.remaining), "status": status, "category": r.category,
            "priority": r.priority,
            "cost": r.cost_amount.map(|a| json!({"amount": dec(a), "currency": r.cost_currency})),
            "effective_at": r.effective_at, "expires_at": r.expires_at, "display_name": r.display_name,
            "description": r.description, "metadata": r.metadata, "source": r.source, "created_at": r.created_at,
            "voided_at": r.voided_at,
        });
        let mut data = pool_json(&pk, balances.get(&pk).copied());
        data.insert("grant".into(), grant);
        match ev {
            GrantEvent::Granted => {
                let id = Uuid::new_v5(&MSG_NS, format!("{}/{tenant}/{gid}", wh::GRANTED).as_bytes());
                msgs.push(message(id, tenant, wh::GRANTED, *at, Value::Object(data)));
            }
            GrantEvent::Changed(change, left) => {
                let name = match change {
                    GrantChange::Void => "voided",
                    GrantChange::Expire => "expired",
                    GrantChange::Activate => "activated",
                };
                if *change == GrantChange::Expire {
                    let mut d = data.clone();
                    d.insert("expired_amount".into(), json!(dec(*left)));
                    let id = Uuid::new_v5(&MSG_NS, format!("{}/{tenant}/{gid}", wh::EXPIRED).as_bytes());
                    msgs.push(message(id, tenant, wh::EXPIRED, *at, Value::Object(d)));
                }
                data.insert("change".into(), json!(name));
                let id = Uuid::new_v5(
                    &MSG_NS,
                    format!("{}/{name}/{tenant}/{gid}", wh::GRANT_UPDATED).as_bytes(),
                );
                msgs.push(message(id, tenant, wh::GRANT_UPDATED, *at, Value::Object(data)));
            }
        }
    }
    Ok(())
}

/// Count the denied and unpriced events this transaction inserted (the caller keeps only those:
/// a redelivered one was counted by the transaction that inserted it) into their pool's window.
async fn count_rejections(tx: &mut PgConnection, rejected: &[(PoolKey, &str, Uuid, bool)]) -> anyhow::Result<()> {
    if rejected.is_empty() {
        return Ok(());
    }
    let mut per: BTreeMap<&PoolKey, (i64, i64, Vec<&str>)> = BTreeMap::new();
    for (pk, key, _, denied) in rejected {
        let e = per.entry(pk).or_default();
        if *denied {
            e.0 += 1;
        } else {
            e.1 += 1;
        }
        if e.2.len() < 10 {
            e.2.push(key);
        }
    }
    if per.is_empty() {
        return Ok(());
    }
    let (mut t, mut c, mut r, mut ct, mut d, mut un, mut s) = (vec![], vec![], vec![], vec![], vec![], vec![], vec![]);
    for (pk, (dn, up, samples)) in per {
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
    .bind(f64::from(super::rejected_window_s()))
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
