//! Operator endpoints under /v1/admin: tenants, API keys, limits.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::auth::{forget, hash, new_key, Operator};
use crate::error::{ApiError, ApiResult, Body};
use crate::AppState;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewTenant {
    name: String,
}

pub async fn create_tenant(
    _: Operator,
    State(s): State<Arc<AppState>>,
    Body(b): Body<NewTenant>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    if b.name.trim().is_empty() || b.name.len() > 200 {
        return Err(ApiError::invalid("name", "invalid_name", "must be 1-200 characters"));
    }
    let tenant_id = format!("t_{}", uuid::Uuid::new_v4().simple());
    let (key, prefix) = new_key();
    let mut tx = s.db.begin().await?;
    sqlx::query("INSERT INTO tenants (id, name) VALUES ($1, $2)")
        .bind(&tenant_id)
        .bind(&b.name)
        .execute(&mut *tx)
        .await?;
    sqlx::query("INSERT INTO api_keys (prefix, tenant_id, key_hash) VALUES ($1, $2, $3)")
        .bind(&prefix)
        .bind(&tenant_id)
        .bind(hash(&key))
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({"tenant_id": tenant_id, "name": b.name, "api_key": key})),
    ))
}

pub async fn create_key(
    _: Operator,
    State(s): State<Arc<AppState>>,
    Path(tenant_id): Path<String>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let exists: Option<String> = sqlx::query_scalar("SELECT id FROM tenants WHERE id = $1")
        .bind(&tenant_id)
        .fetch_optional(&s.db)
        .await?;
    if exists.is_none() {
        return Err(ApiError::not_found("tenant"));
    }
    let (key, prefix) = new_key();
    sqlx::query("INSERT INTO api_keys (prefix, tenant_id, key_hash) VALUES ($1, $2, $3)")
        .bind(&prefix)
        .bind(&tenant_id)
        .bind(hash(&key))
        .execute(&s.db)
        .await?;
    Ok((StatusCode::CREATED, Json(json!({"api_key": key, "prefix": prefix}))))
}

pub async fn revoke_key(
    _: Operator,
    State(s): State<Arc<AppState>>,
    Path(prefix): Path<String>,
) -> ApiResult<StatusCode> {
    let prefix = prefix.strip_prefix("ck_").unwrap_or(&prefix).to_owned();
    let n = sqlx::query("UPDATE api_keys SET revoked_at = now() WHERE prefix = $1 AND revoked_at IS NULL")
        .bind(&prefix)
        .execute(&s.db)
        .await?
        .rows_affected();
    forget(&s, Some(&prefix), None);
    if n == 0 {
        return Err(ApiError::not_found("api key"));
    }
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    events_per_second: i64,
}

pub async fn set_limits(
    _: Operator,
    State(s): State<Arc<AppState>>,
    Path(tenant_id): Path<String>,
    Body(b): Body<Limits>,
) -> ApiResult<Json<Value>> {
    if !(1..=10_000_000).contains(&b.events_per_second) {
        return Err(ApiError::invalid(
            "events_per_second",
            "out_of_range",
            "must be between 1 and 10000000",
        ));
    }
    let n = sqlx::query("UPDATE tenants SET events_per_second = $2 WHERE id = $1")
        .bind(&tenant_id)
        .bind(b.events_per_second as i32)
        .execute(&s.db)
        .await?
        .rows_affected();
    if n == 0 {
        return Err(ApiError::not_found("tenant"));
    }
    forget(&s, None, Some(&tenant_id));
    Ok(Json(
        json!({"tenant_id": tenant_id, "events_per_second": b.events_per_second}),
    ))
}
