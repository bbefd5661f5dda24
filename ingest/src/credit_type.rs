//! A tenant's credit types as every plane reads them: the row, its columns, and the lookup
//! that answers 422 for an unknown one.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgPool;
use utoipa::ToSchema;

use crate::error::ApiError;
use crate::validate;

#[derive(Serialize, sqlx::FromRow, PartialEq, ToSchema)]
pub struct CreditType {
    pub id: String,
    pub name: String,
    pub unit_singular: String,
    pub unit_plural: String,
    pub decimals: i16,
    /// "hard" or "soft".
    pub limit: String,
    pub created_at: DateTime<Utc>,
}

pub(crate) const CT_COLS: &str = "id, name, unit_singular, unit_plural, decimals, limit_kind AS limit, created_at";

/// The tenant's credit type `id`, if it exists.
pub async fn credit_type(db: &PgPool, tenant: &str, id: &str) -> Result<Option<CreditType>, ApiError> {
    Ok(sqlx::query_as(&format!(
        "SELECT {CT_COLS} FROM credit_types WHERE tenant_id = $1 AND id = $2"
    ))
    .bind(tenant)
    .bind(id)
    .fetch_optional(db)
    .await?)
}

/// The credit type named by `field`, or a 422 naming it.
pub async fn require_credit_type(db: &PgPool, tenant: &str, id: &str, field: &str) -> Result<CreditType, ApiError> {
    validate::id(field, id)?;
    credit_type(db, tenant, id)
        .await?
        .ok_or_else(|| ApiError::invalid(field, "unknown_credit_type", format!("no credit type {id}")))
}
