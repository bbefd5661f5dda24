//! Credits: grants (applied through the input topic so "grant, then use" keeps its order),
//! the real-time balance (from the hot pool in Redis) and the settled ledger (Postgres).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine;
use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use shared::amount::from_fixed;
use shared::model::{Category, Cost, GrantCmd, GrantRefCmd, GrantSpec, InputMsg, LimitCmd, LimitKind};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use crate::auth::Tenant;
use crate::catalogue::require_credit_type;
use crate::error::{ApiError, ApiResult, Body, ErrorReply, Q};
use crate::ledger::{LedgerEntry, LEDGER_COLS};
use crate::produce::produce;
use crate::validate;
use crate::AppState;

/// Namespace for grant ids derived from idempotency keys.
const GRANT_NS: Uuid = Uuid::from_u128(0x6a1f_3c5e_9b1d_4c47_8e2f_5a0b_7d3c_1e29);

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewGrant {
    customer_id: String,
    credit_type: String,
    /// A positive decimal string (a JSON number is accepted too) with at most the credit
    /// type's decimal places.
    #[schema(value_type = String)]
    amount: Value,
    /// 1-200 characters.
    display_name: String,
    resource_id: Option<String>,
    /// At most 2000 characters.
    description: Option<String>,
    /// "paid" (default) or "promo".
    category: Option<String>,
    /// 0-1000, default 100; lower is consumed first.
    priority: Option<i64>,
    /// RFC 3339; default now.
    #[schema(value_type = Option<String>, format = DateTime)]
    effective_at: Option<Value>,
    /// RFC 3339, after effective_at; default never.
    #[schema(value_type = Option<String>, format = DateTime)]
    expires_at: Option<Value>,
    cost: Option<NewCost>,
    /// Any JSON object.
    #[schema(value_type = Option<std::collections::HashMap<String, serde_json::Value>>)]
    metadata: Option<Value>,
    /// The same key again answers with the same grant (or 409 if the body differs).
    idempotency_key: Option<String>,
}

/// What the grant cost the customer.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewCost {
    /// A non-negative decimal string, at most 9 places.
    #[schema(value_type = String)]
    amount: Value,
    /// ISO 4217, e.g. USD.
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

/// A grant as the API shows it. Amounts are decimal strings.
#[derive(Serialize, ToSchema, Clone)]
#[schema(as = Grant)]
pub struct GrantView {
    pub id: Uuid,
    pub customer_id: String,
    pub credit_type: String,
    /// The pool's resource; null for the default pool.
    pub resource_id: Option<String>,
    pub amount: String,
    /// What is left; null while the grant is pending (not yet applied).
    pub remaining: Option<String>,
    /// pending, scheduled, active, depleted, expired or voided.
    pub status: String,
    /// paid or promo.
    pub category: String,
    pub priority: i64,
    pub cost: Option<CostView>,
    pub effective_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
    pub display_name: String,
    pub description: Option<String>,
    #[schema(value_type = Option<std::collections::HashMap<String, serde_json::Value>>)]
    pub metadata: Option<Value>,
    /// manual, promo, top-up, subscription, auto_recharge...
    pub source: String,
    pub created_at: DateTime<Utc>,
    pub voided_at: Option<DateTime<Utc>>,
}

/// What a grant cost.
#[derive(Serialize, ToSchema, Clone)]
#[schema(as = Cost)]
pub struct CostView {
    /// A decimal string.
    pub amount: String,
    pub currency: Option<String>,
}

/// `{grant}`.
#[derive(Serialize, ToSchema)]
pub struct GrantReply {
    pub grant: GrantView,
}

pub fn grant_json(g: &Grant) -> GrantView {
    GrantView {
        id: g.id,
        customer_id: g.customer_id.clone(),
        credit_type: g.credit_type.clone(),
        resource_id: g.resource_id.clone(),
        amount: g.amount.normalize().to_string(),
        remaining: Some(g.remaining.normalize().to_string()),
        status: g.status.clone(),
        category: g.category.clone(),
        priority: i64::from(g.priority),
        cost: g.cost_amount.map(|a| CostView {
            amount: a.normalize().to_string(),
            currency: g.cost_currency.clone(),
        }),
        effective_at: g.effective_at,
        expires_at: g.expires_at,
        display_name: g.display_name.clone(),
        description: g.description.clone(),
        metadata: g.metadata.clone(),
        source: g.source.clone(),
        created_at: g.created_at,
        voided_at: g.voided_at,
    }
}

fn spec_json(s: &GrantSpec, remaining: Option<Decimal>, status: &str) -> GrantView {
    GrantView {
        id: s.id,
        customer_id: s.customer_id.clone(),
        credit_type: s.credit_type.clone(),
        resource_id: if s.resource_id.is_empty() {
            None
        } else {
            Some(s.resource_id.clone())
        },
        amount: s.amount.normalize().to_string(),
        remaining: remaining.map(|r| r.normalize().to_string()),
        status: status.to_owned(),
        category: match s.category {
            Category::Paid => "paid",
            Category::Promo => "promo",
        }
        .to_owned(),
        priority: i64::from(s.priority),
        cost: s.cost.as_ref().map(|c| CostView {
            amount: c.amount.normalize().to_string(),
            currency: Some(c.currency.clone()),
        }),
        effective_at: s.effective_at,
        expires_at: s.expires_at,
        display_name: s.display_name.clone(),
        description: s.description.clone(),
        metadata: s.metadata.clone(),
        source: s.source.clone(),
        created_at: s.created_at,
        voided_at: None,
    }
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

#[utoipa::path(post, path = "/v1/credits/grants", tag = "credits",
    security(("api_key" = [])),
    request_body(content = NewGrant, content_type = "application/json"),
    responses((status = 201, description = "applied to the live pool", body = GrantReply), (status = 202, description = "accepted, not yet applied (status pending)", body = GrantReply), (status = 200, description = "the same idempotency key and body: the earlier grant, as it is now (the grant itself, not wrapped in `{grant}`)", body = GrantView), (status = 400, description = "malformed request", body = ErrorReply), (status = 401, description = "missing or invalid credentials", body = ErrorReply), (status = 404, description = "not found (or another tenant's)", body = ErrorReply), (status = 409, description = "conflict", body = ErrorReply), (status = 422, description = "invalid value; `field` names it", body = ErrorReply), (status = 503, description = "saturated or a dependency is down; see Retry-After", body = ErrorReply))
)]
pub async fn create_grant(t: Tenant, State(s): State<Arc<AppState>>, Body(b): Body<NewGrant>) -> ApiResult<Response> {
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
                Ok((StatusCode::OK, Json(grant_json(&g))).into_response())
            } else {
                Err(ApiError::conflict("idempotency_key was used with another body").field("idempotency_key"))
            };
        }
    }
    Ok(issue_grant(&s, &t.id, spec, "api").await?.into_response())
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
) -> ApiResult<(StatusCode, Json<GrantReply>)> {
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
            Json(GrantReply {
                grant: spec_json(&spec, Some(from_fixed(rem, spec.decimals)), status),
            }),
        )),
        None => Ok((
            StatusCode::ACCEPTED,
            Json(GrantReply {
                grant: spec_json(&spec, None, "pending"),
            }),
        )),
    }
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct GrantQuery {
    customer_id: Option<String>,
    credit_type: Option<String>,
    resource_id: Option<String>,
    /// scheduled, active, depleted, expired or voided.
    status: Option<String>,
    /// 1-1000, default 50.
    limit: Option<i64>,
    /// The cursor of the previous page.
    after: Option<String>,
}

/// A page of grants.
#[derive(Serialize, ToSchema)]
pub struct GrantPage {
    grants: Vec<GrantView>,
    /// `after` for the next page; null on the last.
    next_cursor: Option<String>,
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

#[utoipa::path(get, path = "/v1/credits/grants", tag = "credits",
    security(("api_key" = [])),
    params(GrantQuery),
    responses((status = 200, description = "a page of grants, by id", body = GrantPage), (status = 400, description = "malformed request", body = ErrorReply), (status = 401, description = "missing or invalid credentials", body = ErrorReply), (status = 422, description = "invalid value; `field` names it", body = ErrorReply))
)]
pub async fn list_grants(t: Tenant, State(s): State<Arc<AppState>>, Q(q): Q<GrantQuery>) -> ApiResult<Json<GrantPage>> {
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
    let page: Vec<GrantView> = rows.iter().take(limit as usize).map(grant_json).collect();
    let next = if more {
        rows.get(limit as usize - 1).map(|g| encode_cursor(g.id))
    } else {
        None
    };
    Ok(Json(GrantPage {
        grants: page,
        next_cursor: next,
    }))
}

#[utoipa::path(post, path = "/v1/credits/grants/{id}/void", tag = "credits",
    security(("api_key" = [])),
    params(("id" = String, Path, description = "the grant id")),
    responses((status = 200, description = "voided", body = GrantReply), (status = 401, description = "missing or invalid credentials", body = ErrorReply), (status = 404, description = "not found (or another tenant's)", body = ErrorReply))
)]
pub async fn void_grant(
    t: Tenant,
    State(s): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> ApiResult<Json<GrantReply>> {
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
    v.status = "voided".into();
    v.remaining = Some("0".into());
    Ok(Json(GrantReply { grant: v }))
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PoolQuery {
    customer_id: String,
    credit_type: String,
    /// The pool's resource; omitted = the default pool.
    resource_id: Option<String>,
}

/// A pool's real-time balance. Amounts are decimal strings.
#[derive(Serialize, ToSchema)]
pub struct Balance {
    customer_id: String,
    credit_type: String,
    resource_id: Option<String>,
    /// Spendable now (negative when overdrawn).
    balance: String,
    /// Granted, not yet effective.
    scheduled: String,
    has_access: bool,
    /// "hard" or "soft".
    limit: String,
    as_of: DateTime<Utc>,
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
#[utoipa::path(get, path = "/v1/credits/balance", tag = "credits",
    security(("api_key" = [])),
    params(PoolQuery),
    responses((status = 200, description = "the real-time balance", body = Balance), (status = 400, description = "malformed request", body = ErrorReply), (status = 401, description = "missing or invalid credentials", body = ErrorReply), (status = 404, description = "not found (or another tenant's)", body = ErrorReply), (status = 422, description = "invalid value; `field` names it", body = ErrorReply))
)]
pub async fn balance(t: Tenant, State(s): State<Arc<AppState>>, Q(q): Q<PoolQuery>) -> ApiResult<Json<Balance>> {
    validate::id("customer_id", &q.customer_id)?;
    let ct = require_credit_type(&s, &t.id, &q.credit_type, "credit_type").await?;
    let resource = q.resource_id.unwrap_or_default();
    let d = ct.decimals as u32;
    let (bal, scheduled, lim) = hot_balance(&s, &t.id, &q.customer_id, &q.credit_type, &resource).await?;
    let limit = lim.unwrap_or(ct.limit);
    Ok(Json(Balance {
        customer_id: q.customer_id,
        credit_type: q.credit_type,
        resource_id: if resource.is_empty() { None } else { Some(resource) },
        balance: from_fixed(bal, d).normalize().to_string(),
        scheduled: from_fixed(scheduled, d).normalize().to_string(),
        has_access: bal > 0 || limit == "soft",
        limit,
        as_of: Utc::now(),
    }))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CheckBody {
    customer_id: String,
    /// Required with amount; with event_name, must match the mapping's if given.
    credit_type: Option<String>,
    resource_id: Option<String>,
    /// Give exactly one of event_name (with quantity) or amount.
    event_name: Option<String>,
    #[schema(value_type = Option<f64>)]
    quantity: Option<Value>,
    /// A decimal string.
    #[schema(value_type = Option<String>)]
    amount: Option<Value>,
}

/// Would the usage be allowed now. Amounts are decimal strings.
#[derive(Serialize, ToSchema)]
pub struct CheckReply {
    allowed: bool,
    cost: String,
    balance: String,
    credit_type: String,
    /// "hard" or "soft".
    limit: String,
}

/// Would this usage be allowed now? The cost comes from the mapping in force now (or `amount`),
/// the balance from the hot pool: the pre-check of the hard-limit flow. It reserves nothing.
#[utoipa::path(post, path = "/v1/credits/check", tag = "credits",
    security(("api_key" = [])),
    request_body(content = CheckBody, content_type = "application/json"),
    responses((status = 200, description = "would it be allowed now", body = CheckReply), (status = 400, description = "malformed request", body = ErrorReply), (status = 401, description = "missing or invalid credentials", body = ErrorReply), (status = 404, description = "not found (or another tenant's)", body = ErrorReply), (status = 422, description = "invalid value; `field` names it", body = ErrorReply))
)]
pub async fn check(t: Tenant, State(s): State<Arc<AppState>>, Body(b): Body<CheckBody>) -> ApiResult<Json<CheckReply>> {
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
    Ok(Json(CheckReply {
        allowed: limit == "soft" || cost <= balance,
        cost: cost.normalize().to_string(),
        balance: balance.normalize().to_string(),
        credit_type,
        limit,
    }))
}

#[derive(Deserialize, ToSchema)]
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
/// The limit in force for a pool.
#[derive(Serialize, ToSchema)]
pub struct LimitReply {
    customer_id: String,
    credit_type: String,
    resource_id: Option<String>,
    /// "hard" or "soft".
    limit: String,
    /// Whether the pool overrides its credit type's limit.
    overridden: bool,
}

#[utoipa::path(put, path = "/v1/credits/limits", tag = "credits",
    security(("api_key" = [])),
    request_body(content = LimitBody, content_type = "application/json"),
    responses((status = 200, description = "the limit now in force for the pool", body = LimitReply), (status = 400, description = "malformed request", body = ErrorReply), (status = 401, description = "missing or invalid credentials", body = ErrorReply), (status = 404, description = "not found (or another tenant's)", body = ErrorReply), (status = 422, description = "invalid value; `field` names it", body = ErrorReply), (status = 503, description = "saturated or a dependency is down; see Retry-After", body = ErrorReply))
)]
pub async fn set_limit(
    t: Tenant,
    State(s): State<Arc<AppState>>,
    Body(b): Body<LimitBody>,
) -> ApiResult<Json<LimitReply>> {
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
    Ok(Json(LimitReply {
        customer_id: b.customer_id,
        credit_type: b.credit_type,
        resource_id: if resource.is_empty() { None } else { Some(resource) },
        limit: kind.map_or(ct.limit.as_str(), |k| k.as_str()).to_owned(),
        overridden: kind.is_some(),
    }))
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct LedgerQuery {
    customer_id: String,
    credit_type: Option<String>,
    /// The pool's resource; omitted = the default pool.
    resource_id: Option<String>,
    /// grant, consume, expire, void, adjust or deny.
    #[serde(rename = "type")]
    kind: Option<String>,
    /// RFC 3339: entries at or after.
    from: Option<DateTime<Utc>>,
    /// RFC 3339: entries before.
    to: Option<DateTime<Utc>>,
    /// 1-1000, default 50.
    limit: Option<i64>,
    /// The cursor of the previous page.
    after: Option<String>,
}

/// A page of ledger entries, newest first.
#[derive(Serialize, ToSchema)]
pub struct LedgerPage {
    entries: Vec<LedgerEntry>,
    /// `after` for the next page; null on the last.
    next_cursor: Option<String>,
}

/// The settled ledger of one pool per credit type, newest first; the cursor is the last entry's
/// id (ids only grow). An omitted `resource_id` means the default pool, as for the balance and
/// usage (each pool's `end_balance` chain is its own: mixing pools would interleave chains).
#[utoipa::path(get, path = "/v1/credits/ledger", tag = "credits",
    security(("api_key" = [])),
    params(LedgerQuery),
    responses((status = 200, description = "newest first", body = LedgerPage), (status = 400, description = "malformed request", body = ErrorReply), (status = 401, description = "missing or invalid credentials", body = ErrorReply), (status = 422, description = "invalid value; `field` names it", body = ErrorReply))
)]
pub async fn ledger(t: Tenant, State(s): State<Arc<AppState>>, Q(q): Q<LedgerQuery>) -> ApiResult<Json<LedgerPage>> {
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
    let mut rows: Vec<LedgerEntry> = sqlx::query_as(&format!(
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
    rows.truncate(limit as usize);
    let next = if more {
        rows.last().map(|e| encode_cursor(&e.id))
    } else {
        None
    };
    Ok(Json(LedgerPage {
        entries: rows,
        next_cursor: next,
    }))
}
