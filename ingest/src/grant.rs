//! A grant as every plane shows it: the settled row, its API view, and the one read of a
//! settled grant.

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::Serialize;
use serde_json::Value;
use shared::model::{Category, GrantSpec};
use sqlx::PgPool;
use utoipa::ToSchema;
use uuid::Uuid;

use crate::error::ApiError;

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

pub(crate) const GRANT_COLS: &str =
    "id, customer_id, credit_type, NULLIF(resource_id, '') AS resource_id, amount, remaining,
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

pub fn spec_json(s: &GrantSpec, remaining: Option<Decimal>, status: &str) -> GrantView {
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

/// The settled grant `id` of the tenant, if any.
pub async fn settled_grant(db: &PgPool, tenant: &str, id: Uuid) -> Result<Option<Grant>, ApiError> {
    Ok(sqlx::query_as(&format!(
        "SELECT {GRANT_COLS} FROM grants WHERE tenant_id = $1 AND id = $2"
    ))
    .bind(tenant)
    .bind(id)
    .fetch_optional(db)
    .await?)
}
