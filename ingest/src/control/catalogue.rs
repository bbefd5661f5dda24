//! The tenant's catalogue: credit types and feature-to-credit mappings (versioned by
//! effective_at). Written straight to Postgres; the rater reads it (see rater::catalogue).

use std::str::FromStr;
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

use crate::auth::Tenant;
use crate::credit_type::{credit_type, require_credit_type, CreditType, CT_COLS};
use crate::error::replies::{BadRequest, Conflict, Invalid, NotFound, Unauthorized};
use crate::error::{ApiError, ApiResult, Body};
use crate::validate;
use crate::AppState;

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewCreditType {
    /// 1-128 characters of `[A-Za-z0-9._:@-]`.
    id: String,
    /// 1-200 characters.
    name: String,
    unit_singular: String,
    unit_plural: String,
    /// 0-9, default 2.
    #[serde(default = "two")]
    decimals: i64,
    /// "hard" (default) or "soft".
    #[serde(default = "hard")]
    limit: String,
}

fn two() -> i64 {
    2
}
fn hard() -> String {
    "hard".into()
}

#[utoipa::path(post, path = "/v1/credit-types", tag = "catalogue",
    security(("api_key" = [])),
    request_body(content = NewCreditType, content_type = "application/json"),
    responses((status = 201, description = "created", body = CreditType), (status = 200, description = "the same definition again: the existing credit type", body = CreditType), BadRequest, Unauthorized, Conflict, Invalid)
)]
pub async fn create_credit_type(
    t: Tenant,
    State(s): State<Arc<AppState>>,
    Body(b): Body<NewCreditType>,
) -> ApiResult<(StatusCode, Json<CreditType>)> {
    validate::id("id", &b.id)?;
    for (f, v) in [
        ("name", &b.name),
        ("unit_singular", &b.unit_singular),
        ("unit_plural", &b.unit_plural),
    ] {
        if v.trim().is_empty() || v.len() > 200 {
            return Err(ApiError::invalid(f, "invalid_value", "must be 1-200 characters"));
        }
    }
    if !(0..=9).contains(&b.decimals) {
        return Err(ApiError::invalid("decimals", "out_of_range", "must be between 0 and 9"));
    }
    if b.limit != "hard" && b.limit != "soft" {
        return Err(ApiError::invalid(
            "limit",
            "invalid_value",
            "must be \"hard\" or \"soft\"",
        ));
    }
    let created: Option<CreditType> = sqlx::query_as(&format!(
        "INSERT INTO credit_types (tenant_id, id, name, unit_singular, unit_plural, decimals, limit_kind)
         VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT DO NOTHING RETURNING {CT_COLS}"
    ))
    .bind(&t.id)
    .bind(&b.id)
    .bind(&b.name)
    .bind(&b.unit_singular)
    .bind(&b.unit_plural)
    .bind(b.decimals as i16)
    .bind(&b.limit)
    .fetch_optional(&s.pg.control)
    .await?;
    if let Some(c) = created {
        return Ok((StatusCode::CREATED, Json(c)));
    }
    // Idempotent: the same definition again is answered with what exists.
    let existing = credit_type(&s.pg.control, &t.id, &b.id)
        .await?
        .ok_or_else(|| ApiError::conflict("credit type exists"))?;
    if existing.name == b.name
        && existing.unit_singular == b.unit_singular
        && existing.unit_plural == b.unit_plural
        && i64::from(existing.decimals) == b.decimals
        && existing.limit == b.limit
    {
        Ok((StatusCode::OK, Json(existing)))
    } else {
        Err(ApiError::conflict(format!("credit type {} exists with another definition", b.id)).field("id"))
    }
}

#[derive(Serialize, ToSchema)]
pub struct CreditTypes {
    credit_types: Vec<CreditType>,
}

#[utoipa::path(get, path = "/v1/credit-types", tag = "catalogue",
    security(("api_key" = [])),
    responses((status = 200, description = "the tenant's credit types", body = CreditTypes), Unauthorized)
)]
pub async fn list_credit_types(t: Tenant, State(s): State<Arc<AppState>>) -> ApiResult<Json<CreditTypes>> {
    let rows: Vec<CreditType> = sqlx::query_as(&format!(
        "SELECT {CT_COLS} FROM credit_types WHERE tenant_id = $1 ORDER BY id"
    ))
    .bind(&t.id)
    .fetch_all(&s.pg.control)
    .await?;
    Ok(Json(CreditTypes { credit_types: rows }))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PutMapping {
    credit_type: String,
    /// A non-negative decimal string (a JSON number is accepted too), at most 12 places, e.g. "0.01".
    #[schema(value_type = String)]
    credits_per_unit: Value,
    /// A numeric dimension that gives the quantity (else 1).
    quantity_dimension: Option<String>,
    /// RFC 3339; default now.
    #[schema(value_type = Option<String>, format = DateTime)]
    effective_at: Option<Value>,
}

#[derive(Serialize, sqlx::FromRow, Clone, ToSchema)]
pub struct Mapping {
    pub event_name: String,
    pub credit_type: String,
    /// A decimal string.
    #[schema(value_type = String)]
    pub credits_per_unit: Decimal,
    pub quantity_dimension: Option<String>,
    pub effective_at: DateTime<Utc>,
    pub created_at: DateTime<Utc>,
}

/// Seconds a new mapping version's `effective_at` may lie in the past (clock skew).
const MAPPING_SKEW_S: i64 = 1;

const MAP_COLS: &str = "event_name, credit_type, credits_per_unit, quantity_dimension, effective_at, created_at";

#[utoipa::path(put, path = "/v1/features/{event_name}/credit-mapping", tag = "catalogue",
    security(("api_key" = [])),
    params(("event_name" = String, Path, description = "the event name")),
    request_body(content = PutMapping, content_type = "application/json"),
    responses((status = 200, description = "the mapping version created", body = Mapping), BadRequest, Unauthorized, NotFound, Invalid)
)]
pub async fn put_mapping(
    t: Tenant,
    State(s): State<Arc<AppState>>,
    Path(event_name): Path<String>,
    Body(b): Body<PutMapping>,
) -> ApiResult<Json<Mapping>> {
    validate::id("event_name", &event_name)?;
    require_credit_type(&s.pg.control, &t.id, &b.credit_type, "credit_type").await?;
    let cpu = match &b.credits_per_unit {
        Value::String(x) => Decimal::from_str(x.trim()).ok(),
        Value::Number(n) => Decimal::from_str(&n.to_string()).ok(),
        _ => None,
    }
    .filter(|d| !d.is_sign_negative() || d.is_zero())
    .filter(|d| d.normalize().scale() <= 12 && *d < Decimal::from(shared::amount::MAX_FIXED))
    .ok_or_else(|| {
        ApiError::invalid(
            "credits_per_unit",
            "invalid_amount",
            "must be a non-negative decimal string, at most 12 places",
        )
    })?;
    if let Some(d) = &b.quantity_dimension {
        if d.is_empty() || d.len() > 128 {
            return Err(ApiError::invalid(
                "quantity_dimension",
                "invalid_value",
                "must be 1-128 characters",
            ));
        }
    }
    let now = Utc::now();
    let effective_at = match &b.effective_at {
        None | Some(Value::Null) => now,
        Some(v) => validate::timestamp("effective_at", v)?,
    };
    // A price is a function of the versions and the event's timestamp only: once a feature has
    // a price in force, a new version may not take effect before it exists, since events
    // stamped since then may be priced already (the same event would cost one price or the
    // other by arrival). Back-dating is refused then; a second of clock skew is allowed (the
    // raters see a new version within a second anyway). A feature's first price may be
    // back-dated (to price a backfill of old events): there was no price to contradict.
    let in_force: Option<DateTime<Utc>> = sqlx::query_scalar(
        "SELECT max(effective_at) FROM feature_mappings WHERE tenant_id = $1 AND event_name = $2 AND effective_at <= now()",
    )
    .bind(&t.id)
    .bind(&event_name)
    .fetch_one(&s.pg.control)
    .await?;
    if in_force.is_some() && effective_at < now - chrono::Duration::seconds(MAPPING_SKEW_S) {
        return Err(ApiError::invalid(
            "effective_at",
            "effective_at_in_past",
            "must not be in the past: a mapping version applies to events at or after its effective_at, and events \
             before now may be priced already; to change a price, set a new version effective now or later",
        ));
    }
    let m: Mapping = sqlx::query_as(&format!(
        "INSERT INTO feature_mappings (tenant_id, event_name, effective_at, credit_type, credits_per_unit, quantity_dimension)
         VALUES ($1, $2, $3, $4, $5, $6)
         ON CONFLICT (tenant_id, event_name, effective_at) DO UPDATE
         SET credit_type = EXCLUDED.credit_type, credits_per_unit = EXCLUDED.credits_per_unit,
             quantity_dimension = EXCLUDED.quantity_dimension
         RETURNING {MAP_COLS}"
    ))
    .bind(&t.id)
    .bind(&event_name)
    .bind(effective_at)
    .bind(&b.credit_type)
    .bind(cpu.normalize())
    .bind(&b.quantity_dimension)
    .fetch_one(&s.pg.control)
    .await?;
    Ok(Json(m))
}

/// A feature's mapping in force and every version, newest first.
#[derive(Serialize, ToSchema)]
pub struct MappingHistory {
    event_name: String,
    /// The version in force now; null when every version lies ahead.
    current: Option<Mapping>,
    history: Vec<Mapping>,
}

#[utoipa::path(get, path = "/v1/features/{event_name}/credit-mapping", tag = "catalogue",
    security(("api_key" = [])),
    params(("event_name" = String, Path, description = "the event name")),
    responses((status = 200, description = "the mapping in force and its history", body = MappingHistory), Unauthorized, NotFound, Invalid)
)]
pub async fn get_mapping(
    t: Tenant,
    State(s): State<Arc<AppState>>,
    Path(event_name): Path<String>,
) -> ApiResult<Json<MappingHistory>> {
    let history: Vec<Mapping> = sqlx::query_as(&format!(
        "SELECT {MAP_COLS} FROM feature_mappings WHERE tenant_id = $1 AND event_name = $2 ORDER BY effective_at DESC"
    ))
    .bind(&t.id)
    .bind(&event_name)
    .fetch_all(&s.pg.control)
    .await?;
    if history.is_empty() {
        return Err(ApiError::not_found("mapping"));
    }
    let now = Utc::now();
    let current = history.iter().find(|m| m.effective_at <= now).cloned();
    Ok(Json(MappingHistory {
        event_name,
        current,
        history,
    }))
}
