//! Grants, voids and limit overrides: commands produced to the input topic, so "grant, then
//! use" keeps its order, each answered once the rater applied it to the live pool.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use shared::amount::from_fixed;
use shared::model::{Category, Cost, GrantCmd, GrantRefCmd, GrantSpec, InputMsg, LimitCmd, LimitKind};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::auth::Tenant;
use crate::credit_type::require_credit_type;
use crate::error::replies::{BadRequest, Conflict, Invalid, NotFound, Unauthorized, Unavailable};
use crate::error::{ApiError, ApiResult, Body};
use crate::grant::{grant_json, settled_grant, spec_json, GrantReply, GrantView};
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
    responses((status = 201, description = "applied to the live pool", body = GrantReply), (status = 202, description = "accepted, not yet applied (status pending)", body = GrantReply), (status = 200, description = "the same idempotency key and body: the earlier grant, as it is now (the grant itself, not wrapped in `{grant}`)", body = GrantView), BadRequest, Unauthorized, NotFound, Conflict, Invalid, Unavailable)
)]
pub async fn create_grant(t: Tenant, State(s): State<Arc<AppState>>, Body(b): Body<NewGrant>) -> ApiResult<Response> {
    validate::id("customer_id", &b.customer_id)?;
    if let Some(r) = &b.resource_id {
        validate::id("resource_id", r)?;
    }
    let ct = require_credit_type(&s.pg.control, &t.id, &b.credit_type, "credit_type").await?;
    let decimals = ct.decimals as u32;
    let spec = grant_spec(&t.id, &b, decimals, Utc::now())?;
    let id = spec.id;
    // The same idempotency key again: the same grant, or 409 if the body differs.
    if b.idempotency_key.is_some() {
        if let Some(g) = settled_grant(&s.pg.control, &t.id, id).await? {
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

/// The grant a request asks for, validated field by field (the first bad field answers 422),
/// without I/O: its id is the tenant's idempotency key's, or new.
fn grant_spec(tenant: &str, b: &NewGrant, decimals: u32, now: DateTime<Utc>) -> Result<GrantSpec, ApiError> {
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
            Uuid::new_v5(&GRANT_NS, format!("{tenant}/{k}").as_bytes())
        }
        None => Uuid::now_v7(),
    };
    Ok(GrantSpec {
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
    })
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

#[utoipa::path(post, path = "/v1/credits/grants/{id}/void", tag = "credits",
    security(("api_key" = [])),
    params(("id" = String, Path, description = "the grant id")),
    responses((status = 200, description = "voided", body = GrantReply), Unauthorized, NotFound)
)]
pub async fn void_grant(
    t: Tenant,
    State(s): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> ApiResult<Json<GrantReply>> {
    let id = Uuid::parse_str(&id).map_err(|_| ApiError::not_found("grant"))?;
    let g = settled_grant(&s.pg.control, &t.id, id)
        .await?
        .ok_or_else(|| ApiError::not_found("grant"))?;
    if g.status != "voided" {
        let ct = require_credit_type(&s.pg.control, &t.id, &g.credit_type, "credit_type").await?;
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
    responses((status = 200, description = "the limit now in force for the pool", body = LimitReply), BadRequest, Unauthorized, NotFound, Invalid, Unavailable)
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
    let ct = require_credit_type(&s.pg.control, &t.id, &b.credit_type, "credit_type").await?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn now() -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000, 0).unwrap()
    }

    fn req(extra: Value) -> NewGrant {
        let mut v = json!({"customer_id": "c", "credit_type": "ct", "amount": "10.5", "display_name": "d"});
        v.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        serde_json::from_value(v).unwrap()
    }

    fn field(r: Result<GrantSpec, ApiError>) -> (String, String) {
        let e = r.unwrap_err();
        (e.body.field.unwrap_or_default(), e.body.code)
    }

    #[test]
    fn defaults_are_filled_in() {
        let g = grant_spec("t", &req(json!({})), 2, now()).unwrap();
        assert_eq!(g.amount, rust_decimal::Decimal::new(1050, 2));
        assert_eq!(
            (g.priority, g.category, g.source.as_str()),
            (100, Category::Paid, "manual")
        );
        assert_eq!((g.effective_at, g.created_at, g.expires_at), (now(), now(), None));
        assert_eq!(g.resource_id, "");
        let promo = grant_spec("t", &req(json!({"category": "promo"})), 2, now()).unwrap();
        assert_eq!((promo.category, promo.source.as_str()), (Category::Promo, "promo"));
    }

    #[test]
    fn an_idempotency_key_names_one_grant_per_tenant() {
        let k = json!({"idempotency_key": "k1"});
        let a = grant_spec("t", &req(k.clone()), 2, now()).unwrap().id;
        assert_eq!(a, grant_spec("t", &req(k.clone()), 2, now()).unwrap().id);
        assert_ne!(a, grant_spec("u", &req(k), 2, now()).unwrap().id);
        assert_ne!(
            grant_spec("t", &req(json!({})), 2, now()).unwrap().id,
            grant_spec("t", &req(json!({})), 2, now()).unwrap().id
        );
    }

    #[test]
    fn the_first_bad_field_is_named() {
        let f = |extra, decimals| field(grant_spec("t", &req(extra), decimals, now()));
        assert_eq!(f(json!({}), 0).0, "amount");
        assert_eq!(f(json!({"display_name": " "}), 2).0, "display_name");
        assert_eq!(f(json!({"category": "gift"}), 2).0, "category");
        assert_eq!(
            f(json!({"priority": 1001}), 2),
            ("priority".into(), "out_of_range".into())
        );
        assert_eq!(
            f(
                json!({"effective_at": "2027-01-02T00:00:00Z", "expires_at": "2027-01-01T00:00:00Z"}),
                2
            )
            .0,
            "expires_at"
        );
        assert_eq!(
            f(json!({"cost": {"amount": "1", "currency": "usd"}}), 2).0,
            "cost.currency"
        );
        assert_eq!(f(json!({"metadata": [1]}), 2).0, "metadata");
        assert_eq!(f(json!({"idempotency_key": "a b"}), 2).0, "idempotency_key");
    }
}
