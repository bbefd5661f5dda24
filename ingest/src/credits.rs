//! Credits: grants (applied through the input topic so "grant, then use" keeps its order),
//! the real-time balance (from the hot pool in Redis) and the settled ledger (Postgres).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use base64::Engine;
use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use shared::amount::from_fixed;
use shared::model::{Category, Cost, GrantCmd, GrantRefCmd, GrantSpec, InputMsg, LimitCmd, LimitKind};
use uuid::Uuid;

use crate::auth::Tenant;
use crate::catalogue::require_credit_type;
use crate::error::{ApiError, ApiResult, Body, Q};
use crate::events::produce;
use crate::validate;
use crate::AppState;

/// Namespace for grant ids derived from idempotency keys.
const GRANT_NS: Uuid = Uuid::from_u128(0x6a1f_3c5e_9b1d_4c47_8e2f_5a0b_7d3c_1e29);

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewGrant {
    customer_id: String,
    credit_type: String,
    amount: Value,
    display_name: String,
    resource_id: Option<String>,
    description: Option<String>,
    category: Option<String>,
    priority: Option<i64>,
    effective_at: Option<Value>,
    expires_at: Option<Value>,
    cost: Option<NewCost>,
    metadata: Option<Value>,
    idempotency_key: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewCost {
    amount: Value,
    currency: String,
}

#[derive(Serialize, sqlx::FromRow)]
pub struct Grant {
    pub id: Uuid,
    pub customer_id: String,
    pub credit_type: String,
    pub resource_id: Option<String>,
    pub amount: Decimal,
    pub remaining: Decimal,
    pub status: String,
    pub category: String,
    pub priority: i32,
    pub cost_amount: Option<Decimal>,
    pub cost_currency: Option<String>,
    pub effective_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
    pub display_name: String,
    pub description: Option<String>,
    pub metadata: Option<Value>,
    pub source: String,
    pub created_at: DateTime<Utc>,
    pub voided_at: Option<DateTime<Utc>>,
}

const GRANT_COLS: &str = "id, customer_id, credit_type, NULLIF(resource_id, '') AS resource_id, amount, remaining,
    CASE WHEN status = 'voided' THEN 'voided'
         WHEN expires_at IS NOT NULL AND expires_at <= now() THEN 'expired'
         WHEN status = 'depleted' THEN 'depleted'
         WHEN effective_at > now() THEN 'scheduled' ELSE status END AS status,
    category, priority, cost_amount, cost_currency, effective_at, expires_at, display_name, description, metadata,
    source, created_at, voided_at";

pub fn grant_json(g: &Grant) -> Value {
    json!({
        "id": g.id, "customer_id": g.customer_id, "credit_type": g.credit_type, "resource_id": g.resource_id,
        "amount": g.amount.normalize().to_string(), "remaining": g.remaining.normalize().to_string(),
        "status": g.status, "category": g.category, "priority": g.priority,
        "cost": g.cost_amount.map(|a| json!({"amount": a.normalize().to_string(), "currency": g.cost_currency})),
        "effective_at": g.effective_at, "expires_at": g.expires_at, "display_name": g.display_name,
        "description": g.description, "metadata": g.metadata, "source": g.source, "created_at": g.created_at,
        "voided_at": g.voided_at,
    })
}

fn spec_json(s: &GrantSpec, remaining: Option<Decimal>, status: &str) -> Value {
    json!({
        "id": s.id, "customer_id": s.customer_id, "credit_type": s.credit_type,
        "resource_id": if s.resource_id.is_empty() { None } else { Some(&s.resource_id) },
        "amount": s.amount.normalize().to_string(),
        "remaining": remaining.map(|r| r.normalize().to_string()),
        "status": status,
        "category": match s.category { Category::Paid => "paid", Category::Promo => "promo" },
        "priority": s.priority,
        "cost": s.cost.as_ref().map(|c| json!({"amount": c.amount.normalize().to_string(), "currency": c.currency})),
        "effective_at": s.effective_at, "expires_at": s.expires_at, "display_name": s.display_name,
        "description": s.description, "metadata": s.metadata, "source": s.source, "created_at": s.created_at,
        "voided_at": null,
    })
}

pub async fn settled_grant(s: &AppState, tenant: &str, id: Uuid) -> Result<Option<Grant>, ApiError> {
    Ok(sqlx::query_as(&format!(
        "SELECT {GRANT_COLS} FROM grants WHERE tenant_id = $1 AND id = $2"
    ))
    .bind(tenant)
    .bind(id)
    .fetch_optional(&s.db)
    .await?)
}

/// Wait until the pool hash in Redis shows `field` (the rater applied the command).
async fn applied(s: &AppState, pool_key: &str, field: &str) -> Result<Option<i64>, ApiError> {
    let deadline = Instant::now() + Duration::from_millis(s.config.apply_wait_ms);
    let mut con = s.redis.clone();
    loop {
        let (present, remaining): (bool, Option<i64>) = redis::pipe()
            .hexists(pool_key, field)
            .hget(pool_key, format!("r:{}", &field[2..]))
            .query_async(&mut con)
            .await?;
        if present {
            return Ok(Some(remaining.unwrap_or(0)));
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

pub async fn create_grant(
    t: Tenant,
    State(s): State<Arc<AppState>>,
    Body(b): Body<NewGrant>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    validate::id("customer_id", &b.customer_id)?;
    if let Some(r) = &b.resource_id {
        validate::id("resource_id", r)?;
    }
    let ct = require_credit_type(&s, &t.id, &b.credit_type, "credit_type").await?;
    let decimals = ct.decimals as u32;
    let amount = validate::amount("amount", &b.amount, decimals, false)?;
    if b.display_name.trim().is_empty() || b.display_name.len() > 200 {
        return Err(ApiError::invalid(
            "display_name",
            "invalid_value",
            "must be 1-200 characters",
        ));
    }
    if b.description.as_ref().is_some_and(|d| d.len() > 2000) {
        return Err(ApiError::invalid(
            "description",
            "invalid_value",
            "at most 2000 characters",
        ));
    }
    let category = match b.category.as_deref() {
        None | Some("paid") => Category::Paid,
        Some("promo") => Category::Promo,
        Some(_) => {
            return Err(ApiError::invalid(
                "category",
                "invalid_value",
                "must be \"paid\" or \"promo\"",
            ))
        }
    };
    let priority = b.priority.unwrap_or(100);
    if !(0..=i64::from(shared::hot_pool::MAX_PRIORITY)).contains(&priority) {
        return Err(ApiError::invalid(
            "priority",
            "out_of_range",
            "must be between 0 and 1000",
        ));
    }
    let now = Utc::now();
    let effective_at = match &b.effective_at {
        None | Some(Value::Null) => now,
        Some(v) => validate::timestamp("effective_at", v)?,
    };
    let expires_at = match &b.expires_at {
        None | Some(Value::Null) => None,
        Some(v) => Some(validate::timestamp("expires_at", v)?),
    };
    if expires_at.is_some_and(|e| e <= effective_at) {
        return Err(ApiError::invalid(
            "expires_at",
            "invalid_value",
            "must be after effective_at",
        ));
    }
    let cost = match &b.cost {
        None => None,
        Some(c) => {
            let amount = validate::amount("cost.amount", &c.amount, 9, true)?;
            if c.currency.len() != 3 || !c.currency.bytes().all(|x| x.is_ascii_uppercase()) {
                return Err(ApiError::invalid(
                    "cost.currency",
                    "invalid_value",
                    "an ISO 4217 code such as USD",
                ));
            }
            Some(Cost {
                amount,
                currency: c.currency.clone(),
            })
        }
    };
    if b.metadata.as_ref().is_some_and(|m| !m.is_object() && !m.is_null()) {
        return Err(ApiError::invalid("metadata", "invalid_value", "must be an object"));
    }
    let id = match &b.idempotency_key {
        Some(k) => {
            validate::id("idempotency_key", k)?;
            Uuid::new_v5(&GRANT_NS, format!("{}/{k}", t.id).as_bytes())
        }
        None => Uuid::now_v7(),
    };
    let spec = GrantSpec {
        id,
        customer_id: b.customer_id.clone(),
        resource_id: b.resource_id.clone().unwrap_or_default(),
        credit_type: b.credit_type.clone(),
        decimals,
        amount,
        category,
        priority: priority as u32,
        cost,
        effective_at,
        expires_at,
        display_name: b.display_name.clone(),
        description: b.description.clone(),
        metadata: b.metadata.clone().filter(|m| !m.is_null()),
        source: if category == Category::Promo {
            "promo".into()
        } else {
            "manual".into()
        },
        created_at: now,
    };
    // The same idempotency key again: the same grant, or 409 if the body differs.
    if b.idempotency_key.is_some() {
        if let Some(g) = settled_grant(&s, &t.id, id).await? {
            let same = g.customer_id == spec.customer_id
                && g.credit_type == spec.credit_type
                && g.amount == spec.amount
                && g.resource_id.clone().unwrap_or_default() == spec.resource_id
                && g.display_name == spec.display_name;
            return if same {
                Ok((StatusCode::OK, Json(grant_json(&g))))
            } else {
                Err(ApiError::conflict("idempotency_key was used with another body").field("idempotency_key"))
            };
        }
    }
    issue_grant(&s, &t.id, spec, "api").await
}

/// Produce a grant to the input topic and wait until the rater applied it: 201 `{grant}`, or
/// 202 with status "pending" if that takes longer than `INGEST_APPLY_WAIT_MS`. The grant id is
/// the caller's; the rater applies an id once, so issuing the same grant again is harmless.
/// Also used by billing (top-ups, plan periods).
pub async fn issue_grant(
    s: &AppState,
    tenant: &str,
    spec: GrantSpec,
    actor: &str,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let pool_key = s
        .keys
        .pool(tenant, &spec.customer_id, &spec.credit_type, &spec.resource_id);
    produce(
        s,
        std::iter::once(InputMsg::Grant(GrantCmd {
            tenant_id: tenant.to_owned(),
            grant: spec.clone(),
            actor: actor.into(),
        })),
    )
    .await?;
    metrics::counter!(crate::metric::COMMANDS, "kind" => "grant").increment(1);
    let status = if spec.effective_at > Utc::now() {
        "scheduled"
    } else {
        "active"
    };
    match applied(s, &pool_key, &format!("o:{}", spec.id)).await? {
        Some(rem) => Ok((
            StatusCode::CREATED,
            Json(json!({"grant": spec_json(&spec, Some(from_fixed(rem, spec.decimals)), status)})),
        )),
        None => Ok((
            StatusCode::ACCEPTED,
            Json(json!({"grant": spec_json(&spec, None, "pending")})),
        )),
    }
}

#[derive(Deserialize)]
pub struct GrantQuery {
    customer_id: Option<String>,
    credit_type: Option<String>,
    resource_id: Option<String>,
    status: Option<String>,
    limit: Option<i64>,
    after: Option<String>,
}

/// The page size of a list: 50 by default, 1 to 1000.
pub(crate) fn limit(l: Option<i64>) -> Result<i64, ApiError> {
    match l {
        None => Ok(50),
        Some(n) if (1..=1000).contains(&n) => Ok(n),
        Some(_) => Err(ApiError::invalid("limit", "out_of_range", "must be between 1 and 1000")),
    }
}

/// An opaque cursor (`after`) back into the key it encodes.
pub(crate) fn decode_cursor<T: std::str::FromStr>(c: &Option<String>) -> Result<Option<T>, ApiError> {
    let Some(c) = c else { return Ok(None) };
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(c)
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
        .and_then(|s| s.parse().ok())
        .map(Some)
        .ok_or_else(|| ApiError::invalid("after", "invalid_cursor", "not a cursor this API returned"))
}

/// The opaque cursor of a list's last key.
pub(crate) fn encode_cursor(v: impl ToString) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
}

pub async fn list_grants(t: Tenant, State(s): State<Arc<AppState>>, Q(q): Q<GrantQuery>) -> ApiResult<Json<Value>> {
    let limit = limit(q.limit)?;
    let after: Option<Uuid> = decode_cursor(&q.after)?;
    let rows: Vec<Grant> = sqlx::query_as(&format!(
        "SELECT * FROM (SELECT {GRANT_COLS} FROM grants WHERE tenant_id = $1
            AND ($2::text IS NULL OR customer_id = $2) AND ($3::text IS NULL OR credit_type = $3)
            AND ($4::text IS NULL OR resource_id = $4) AND ($6::uuid IS NULL OR id > $6)) g
         WHERE ($5::text IS NULL OR status = $5) ORDER BY id LIMIT $7"
    ))
    .bind(&t.id)
    .bind(&q.customer_id)
    .bind(&q.credit_type)
    .bind(&q.resource_id)
    .bind(&q.status)
    .bind(after)
    .bind(limit + 1)
    .fetch_all(&s.db)
    .await?;
    let more = rows.len() as i64 > limit;
    let page: Vec<Value> = rows.iter().take(limit as usize).map(grant_json).collect();
    let next = if more {
        rows.get(limit as usize - 1).map(|g| encode_cursor(g.id))
    } else {
        None
    };
    Ok(Json(json!({"grants": page, "next_cursor": next})))
}

pub async fn void_grant(t: Tenant, State(s): State<Arc<AppState>>, Path(id): Path<String>) -> ApiResult<Json<Value>> {
    let id = Uuid::parse_str(&id).map_err(|_| ApiError::not_found("grant"))?;
    let g = settled_grant(&s, &t.id, id)
        .await?
        .ok_or_else(|| ApiError::not_found("grant"))?;
    if g.status != "voided" {
        let ct = require_credit_type(&s, &t.id, &g.credit_type, "credit_type").await?;
        let resource = g.resource_id.clone().unwrap_or_default();
        let cmd = GrantRefCmd {
            tenant_id: t.id.clone(),
            customer_id: g.customer_id.clone(),
            resource_id: resource.clone(),
            credit_type: g.credit_type.clone(),
            decimals: ct.decimals as u32,
            grant_id: id,
            at: Utc::now(),
            actor: "api".into(),
        };
        produce(&s, std::iter::once(InputMsg::Void(cmd))).await?;
        metrics::counter!(crate::metric::COMMANDS, "kind" => "void").increment(1);
        let pool_key = s.keys.pool(&t.id, &g.customer_id, &g.credit_type, &resource);
        applied(&s, &pool_key, &format!("x:{id}")).await?;
    }
    let mut v = grant_json(&g);
    v["status"] = json!("voided");
    v["remaining"] = json!("0");
    Ok(Json(json!({ "grant": v })))
}

#[derive(Deserialize)]
pub struct PoolQuery {
    customer_id: String,
    credit_type: String,
    resource_id: Option<String>,
}

/// The real-time balance, computed from the hot pool the way apply.lua spends it.
/// The hot pool's (spendable balance, scheduled) in fixed point, computed the way apply.lua
/// spends it: a grant counts once effective and until it expires; overdraft is subtracted.
async fn hot_balance(
    s: &AppState,
    tenant: &str,
    customer: &str,
    credit_type: &str,
    resource: &str,
) -> ApiResult<(i64, i64, Option<String>)> {
    let mut con = s.redis.clone();
    let h: HashMap<String, String> = redis::cmd("HGETALL")
        .arg(s.keys.pool(tenant, customer, credit_type, resource))
        .query_async(&mut con)
        .await?;
    let pool = shared::hot_pool::HotPool::from_hash(&h);
    let b = pool.balance_at(Utc::now().timestamp_millis());
    Ok((b.spendable, b.scheduled, pool.limit))
}

/// The real-time balance, from the hot pool.
pub async fn balance(t: Tenant, State(s): State<Arc<AppState>>, Q(q): Q<PoolQuery>) -> ApiResult<Json<Value>> {
    validate::id("customer_id", &q.customer_id)?;
    let ct = require_credit_type(&s, &t.id, &q.credit_type, "credit_type").await?;
    let resource = q.resource_id.unwrap_or_default();
    let d = ct.decimals as u32;
    let (bal, scheduled, lim) = hot_balance(&s, &t.id, &q.customer_id, &q.credit_type, &resource).await?;
    let limit = lim.unwrap_or(ct.limit);
    Ok(Json(json!({
        "customer_id": q.customer_id,
        "credit_type": q.credit_type,
        "resource_id": if resource.is_empty() { None } else { Some(resource) },
        "balance": from_fixed(bal, d).normalize().to_string(),
        "scheduled": from_fixed(scheduled, d).normalize().to_string(),
        "has_access": bal > 0 || limit == "soft",
        "limit": limit,
        "as_of": Utc::now(),
    })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckBody {
    customer_id: String,
    credit_type: Option<String>,
    resource_id: Option<String>,
    event_name: Option<String>,
    quantity: Option<Value>,
    amount: Option<Value>,
}

/// Would this usage be allowed now? The cost comes from the mapping in force now (or `amount`),
/// the balance from the hot pool: the pre-check of the hard-limit flow. It reserves nothing.
pub async fn check(t: Tenant, State(s): State<Arc<AppState>>, Body(b): Body<CheckBody>) -> ApiResult<Json<Value>> {
    validate::id("customer_id", &b.customer_id)?;
    let resource = b.resource_id.clone().unwrap_or_default();
    if !resource.is_empty() {
        validate::id("resource_id", &resource)?;
    }
    let (credit_type, cost) = match (&b.event_name, &b.amount) {
        (Some(name), None) => {
            validate::id("event_name", name)?;
            #[allow(clippy::type_complexity)] // one row of the query below
            let rows: Vec<(DateTime<Utc>, String, Decimal, Option<String>, i16)> = sqlx::query_as(
                "SELECT m.effective_at, m.credit_type, m.credits_per_unit, m.quantity_dimension, ct.decimals
                 FROM feature_mappings m JOIN credit_types ct ON ct.tenant_id = m.tenant_id AND ct.id = m.credit_type
                 WHERE m.tenant_id = $1 AND m.event_name = $2 ORDER BY m.effective_at",
            )
            .bind(&t.id)
            .bind(name)
            .fetch_all(&s.db)
            .await?;
            let versions: Vec<shared::pricing::MappingVersion> = rows
                .into_iter()
                .map(|(effective_at, credit_type, credits_per_unit, quantity_dimension, d)| {
                    shared::pricing::MappingVersion {
                        effective_at,
                        credit_type,
                        credits_per_unit,
                        quantity_dimension,
                        decimals: d as u32,
                    }
                })
                .collect();
            let mut dims = serde_json::Map::new();
            let now = Utc::now();
            let dim = versions
                .iter()
                .rev()
                .find(|v| v.effective_at <= now)
                .and_then(|v| v.quantity_dimension.clone());
            if let (Some(dim), Some(q)) = (dim, &b.quantity) {
                if !q.is_number() {
                    return Err(ApiError::invalid("quantity", "invalid_value", "must be a number"));
                }
                dims.insert(dim, q.clone());
            }
            match shared::pricing::price(&versions, now, &dims) {
                shared::pricing::Price::Priced { credit_type, cost, .. } => (credit_type.to_owned(), cost),
                shared::pricing::Price::Unpriced(reason) => {
                    return Err(ApiError::invalid(
                        "event_name",
                        reason,
                        format!("{name} cannot be priced now: {reason}"),
                    ))
                }
            }
        }
        (None, Some(a)) => {
            let ct = b
                .credit_type
                .clone()
                .ok_or_else(|| ApiError::invalid("credit_type", "required", "credit_type is required with amount"))?;
            let c = require_credit_type(&s, &t.id, &ct, "credit_type").await?;
            (ct, validate::amount("amount", a, c.decimals as u32, true)?)
        }
        _ => {
            return Err(ApiError::invalid(
                "event_name",
                "invalid_value",
                "give exactly one of event_name or amount",
            ))
        }
    };
    if b.credit_type.as_ref().is_some_and(|c| *c != credit_type) {
        return Err(ApiError::invalid(
            "credit_type",
            "mismatch",
            format!("the event is priced in {credit_type}"),
        ));
    }
    let ct = require_credit_type(&s, &t.id, &credit_type, "credit_type").await?;
    let d = ct.decimals as u32;
    let (bal, _, lim) = hot_balance(&s, &t.id, &b.customer_id, &credit_type, &resource).await?;
    let limit = lim.unwrap_or(ct.limit);
    let balance = from_fixed(bal, d);
    Ok(Json(json!({
        "allowed": limit == "soft" || cost <= balance,
        "cost": cost.normalize().to_string(),
        "balance": balance.normalize().to_string(),
        "credit_type": credit_type,
        "limit": limit,
    })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitBody {
    customer_id: String,
    credit_type: String,
    resource_id: Option<String>,
    /// "hard", "soft", or null to follow the credit type's limit again.
    limit: Option<String>,
}

/// Override the credit type's limit for one pool. The override travels through the input
/// topic, so every event accepted after this answer is decided under it, and every event
/// accepted before it under the limit it replaced.
pub async fn set_limit(t: Tenant, State(s): State<Arc<AppState>>, Body(b): Body<LimitBody>) -> ApiResult<Json<Value>> {
    validate::id("customer_id", &b.customer_id)?;
    let resource = b.resource_id.clone().unwrap_or_default();
    if !resource.is_empty() {
        validate::id("resource_id", &resource)?;
    }
    let ct = require_credit_type(&s, &t.id, &b.credit_type, "credit_type").await?;
    let kind = match b.limit.as_deref() {
        None => None,
        Some("hard") => Some(LimitKind::Hard),
        Some("soft") => Some(LimitKind::Soft),
        Some(_) => {
            return Err(ApiError::invalid(
                "limit",
                "invalid_value",
                "limit must be \"hard\", \"soft\" or null",
            ))
        }
    };
    // The rater applies it in order with the pool's usage and the ledger-writer stores it when
    // that settles: Postgres never holds a limit ahead of the events accepted before it.
    let cmd = LimitCmd {
        tenant_id: t.id.clone(),
        customer_id: b.customer_id.clone(),
        resource_id: resource.clone(),
        credit_type: b.credit_type.clone(),
        decimals: ct.decimals as u32,
        limit: kind,
        at: Utc::now(),
    };
    produce(&s, std::iter::once(InputMsg::SetLimit(cmd))).await?;
    metrics::counter!(crate::metric::COMMANDS, "kind" => "limit").increment(1);
    Ok(Json(json!({
        "customer_id": b.customer_id,
        "credit_type": b.credit_type,
        "resource_id": if resource.is_empty() { None } else { Some(resource) },
        "limit": kind.map_or(ct.limit.as_str(), |k| k.as_str()),
        "overridden": kind.is_some(),
    })))
}

#[derive(Serialize, sqlx::FromRow)]
pub struct LedgerEntry {
    pub id: String,
    pub timestamp: DateTime<Utc>,
    #[serde(rename = "type")]
    pub kind: String,
    pub source: String,
    pub source_id: String,
    pub grant_id: Option<Uuid>,
    #[serde(with = "rust_decimal::serde::str")]
    pub amount: Decimal,
    #[serde(with = "rust_decimal::serde::str")]
    pub end_balance: Decimal,
    pub actor: String,
    pub customer_id: String,
    pub credit_type: String,
    /// The pool's resource (`null` for the customer's default pool): `end_balance` is that
    /// pool's balance.
    pub resource_id: Option<String>,
}

pub const LEDGER_COLS: &str = "id::text AS id, ts AS timestamp, type AS kind, source, source_id, grant_id,
    amount, end_balance, actor, customer_id, credit_type, NULLIF(resource_id, '') AS resource_id";

#[derive(Deserialize)]
pub struct LedgerQuery {
    customer_id: String,
    credit_type: Option<String>,
    resource_id: Option<String>,
    #[serde(rename = "type")]
    kind: Option<String>,
    from: Option<DateTime<Utc>>,
    to: Option<DateTime<Utc>>,
    limit: Option<i64>,
    after: Option<String>,
}

/// The settled ledger of one pool per credit type, newest first; the cursor is the last entry's
/// id (ids only grow). An omitted `resource_id` means the default pool, as for the balance and
/// usage (each pool's `end_balance` chain is its own: mixing pools would interleave chains).
pub async fn ledger(t: Tenant, State(s): State<Arc<AppState>>, Q(q): Q<LedgerQuery>) -> ApiResult<Json<Value>> {
    validate::id("customer_id", &q.customer_id)?;
    let limit = limit(q.limit)?;
    let after: Option<i64> = decode_cursor(&q.after)?;
    if let Some(k) = &q.kind {
        if !["grant", "consume", "expire", "void", "adjust", "deny"].contains(&k.as_str()) {
            return Err(ApiError::invalid(
                "type",
                "invalid_value",
                "one of grant, consume, expire, void, adjust, deny",
            ));
        }
    }
    let rows: Vec<LedgerEntry> = sqlx::query_as(&format!(
        "SELECT {LEDGER_COLS} FROM ledger_entries WHERE tenant_id = $1 AND customer_id = $2
            AND ($3::text IS NULL OR credit_type = $3) AND resource_id = $4
            AND ($5::text IS NULL OR type = $5) AND ($6::timestamptz IS NULL OR ts >= $6)
            AND ($7::timestamptz IS NULL OR ts < $7) AND ($8::bigint IS NULL OR id < $8)
         ORDER BY ledger_entries.id DESC LIMIT $9"
    ))
    .bind(&t.id)
    .bind(&q.customer_id)
    .bind(&q.credit_type)
    .bind(q.resource_id.as_deref().unwrap_or(""))
    .bind(&q.kind)
    .bind(q.from)
    .bind(q.to)
    .bind(after)
    .bind(limit + 1)
    .fetch_all(&s.db)
    .await?;
    let more = rows.len() as i64 > limit;
    let page: Vec<&LedgerEntry> = rows.iter().take(limit as usize).collect();
    let next = if more {
        page.last().map(|e| encode_cursor(&e.id))
    } else {
        None
    };
    Ok(Json(json!({"entries": page, "next_cursor": next})))
}
