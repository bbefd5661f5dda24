//! The real-time balance and the pre-check, both read from the hot pool.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::State;
use axum::Json;
use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use shared::amount::from_fixed;
use utoipa::{IntoParams, ToSchema};

use crate::auth::Tenant;
use crate::credit_type::require_credit_type;
use crate::error::replies::{BadRequest, Invalid, NotFound, Unauthorized};
use crate::error::{ApiError, ApiResult, Body, Q};
use crate::validate;
use crate::AppState;

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
    responses((status = 200, description = "the real-time balance", body = Balance), BadRequest, Unauthorized, NotFound, Invalid)
)]
pub async fn balance(t: Tenant, State(s): State<Arc<AppState>>, Q(q): Q<PoolQuery>) -> ApiResult<Json<Balance>> {
    validate::id("customer_id", &q.customer_id)?;
    let ct = require_credit_type(&s.pg.query, &t.id, &q.credit_type, "credit_type").await?;
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
    responses((status = 200, description = "would it be allowed now", body = CheckReply), BadRequest, Unauthorized, NotFound, Invalid)
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
            .fetch_all(&s.pg.query)
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
            let c = require_credit_type(&s.pg.query, &t.id, &ct, "credit_type").await?;
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
    let ct = require_credit_type(&s.pg.query, &t.id, &credit_type, "credit_type").await?;
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
