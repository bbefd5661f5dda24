//! Operator endpoints under /v1/admin: tenants, API keys, limits.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::auth::{forget, hash, new_key, Operator};
use crate::error::replies::{BadRequest, Invalid, NotFound, Unauthorized};
use crate::error::{ApiError, ApiResult, Body};
use crate::AppState;

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewTenant {
    /// 1-200 characters.
    name: String,
}

#[derive(Serialize, ToSchema)]
pub struct TenantCreated {
    tenant_id: String,
    name: String,
    /// Shown once; stored hashed.
    api_key: String,
}

#[derive(Serialize, ToSchema)]
pub struct ApiKeyCreated {
    /// Shown once; stored hashed.
    api_key: String,
    /// The key's prefix (what `DELETE /v1/admin/api-keys/{prefix}` takes).
    prefix: String,
}

#[derive(Serialize, ToSchema)]
pub struct TenantLimits {
    tenant_id: String,
    events_per_second: i64,
}

#[utoipa::path(post, path = "/v1/admin/tenants", tag = "operator",
    security(("operator" = [])),
    request_body(content = NewTenant, content_type = "application/json"),
    responses((status = 201, description = "the tenant and its first API key (shown once)", body = TenantCreated), BadRequest, Unauthorized, Invalid)
)]
pub async fn create_tenant(
    _: Operator,
    State(s): State<Arc<AppState>>,
    Body(b): Body<NewTenant>,
) -> ApiResult<(StatusCode, Json<TenantCreated>)> {
    if b.name.trim().is_empty() || b.name.len() > 200 {
        return Err(ApiError::invalid("name", "invalid_name", "must be 1-200 characters"));
    }
    let tenant_id = format!("t_{}", uuid::Uuid::new_v4().simple());
    let (key, prefix) = new_key();
    let mut tx = s.pg.control.begin().await?;
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
        Json(TenantCreated {
            tenant_id,
            name: b.name,
            api_key: key,
        }),
    ))
}

#[utoipa::path(post, path = "/v1/admin/tenants/{tenant_id}/api-keys", tag = "operator",
    security(("operator" = [])),
    params(("tenant_id" = String, Path, description = "the tenant")),
    responses((status = 201, description = "a new API key (shown once)", body = ApiKeyCreated), Unauthorized, NotFound)
)]
pub async fn create_key(
    _: Operator,
    State(s): State<Arc<AppState>>,
    Path(tenant_id): Path<String>,
) -> ApiResult<(StatusCode, Json<ApiKeyCreated>)> {
    let exists: Option<String> = sqlx::query_scalar("SELECT id FROM tenants WHERE id = $1")
        .bind(&tenant_id)
        .fetch_optional(&s.pg.control)
        .await?;
    if exists.is_none() {
        return Err(ApiError::not_found("tenant"));
    }
    let (key, prefix) = new_key();
    sqlx::query("INSERT INTO api_keys (prefix, tenant_id, key_hash) VALUES ($1, $2, $3)")
        .bind(&prefix)
        .bind(&tenant_id)
        .bind(hash(&key))
        .execute(&s.pg.control)
        .await?;
    Ok((StatusCode::CREATED, Json(ApiKeyCreated { api_key: key, prefix })))
}

#[utoipa::path(delete, path = "/v1/admin/api-keys/{prefix}", tag = "operator",
    security(("operator" = [])),
    params(("prefix" = String, Path, description = "the key's prefix")),
    responses((status = 204, description = "revoked"), Unauthorized, NotFound)
)]
pub async fn revoke_key(
    _: Operator,
    State(s): State<Arc<AppState>>,
    Path(prefix): Path<String>,
) -> ApiResult<StatusCode> {
    let prefix = prefix.strip_prefix("ck_").unwrap_or(&prefix).to_owned();
    let n = sqlx::query("UPDATE api_keys SET revoked_at = now() WHERE prefix = $1 AND revoked_at IS NULL")
        .bind(&prefix)
        .execute(&s.pg.control)
        .await?
        .rows_affected();
    forget(&s, Some(&prefix), None);
    if n == 0 {
        return Err(ApiError::not_found("api key"));
    }
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// 1-10000000 (default 5000).
    events_per_second: i64,
}

#[utoipa::path(put, path = "/v1/admin/tenants/{tenant_id}/limits", tag = "operator",
    security(("operator" = [])),
    params(("tenant_id" = String, Path, description = "the tenant")),
    request_body(content = Limits, content_type = "application/json"),
    responses((status = 200, description = "the limits in force", body = TenantLimits), BadRequest, Unauthorized, NotFound, Invalid)
)]
pub async fn set_limits(
    _: Operator,
    State(s): State<Arc<AppState>>,
    Path(tenant_id): Path<String>,
    Body(b): Body<Limits>,
) -> ApiResult<Json<TenantLimits>> {
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
        .execute(&s.pg.control)
        .await?
        .rows_affected();
    if n == 0 {
        return Err(ApiError::not_found("tenant"));
    }
    forget(&s, None, Some(&tenant_id));
    Ok(Json(TenantLimits {
        tenant_id,
        events_per_second: b.events_per_second,
    }))
}
