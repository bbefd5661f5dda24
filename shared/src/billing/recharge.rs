//! A pool's auto-recharge settings as stored in `auto_recharge`: the columns ingest shows and
//! saves (`PUT /v1/credits/auto-recharge`) and the ledger-writer's charge worker acts on. Each
//! side selects them (`#[sqlx(flatten)]`) beside its own columns.

use rust_decimal::Decimal;

/// The settings columns of an `auto_recharge` row, by their column names.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct AutoRechargeSettings {
    pub customer_id: String,
    /// '' for the customer's pool of no resource.
    pub resource_id: String,
    pub credit_type: String,
    /// Recharge when the settled balance drops below this.
    pub threshold: Decimal,
    /// Recharge up to this balance.
    pub target_balance: Decimal,
    /// Most that recharges may charge per spend period, in `currency`.
    pub spend_limit: Decimal,
    pub currency: String,
    /// The spend period resets on this day of every month (1-28, 00:00 UTC).
    pub reset_day: i16,
    pub grant_expiration_days: Option<i32>,
    pub payment_method_id: String,
    /// payment_failed or spend_limit_reached; None while recharging is not paused.
    pub paused_reason: Option<String>,
}

/// A pool's auto-recharge spend since `start`: every charge that may have moved money
/// (succeeded, and not yet concluded; a failed one did not). The spend limit (ledger-writer)
/// and the settings reply (ingest) both read it here.
pub async fn spent_since<'e>(
    db: impl sqlx::PgExecutor<'e>,
    (tenant, customer, credit_type, resource): (&str, &str, &str, &str),
    start: chrono::DateTime<chrono::Utc>,
) -> sqlx::Result<Decimal> {
    sqlx::query_scalar(
        "SELECT COALESCE(sum(amount), 0) FROM charges WHERE tenant_id = $1 AND customer_id = $2
            AND credit_type = $3 AND resource_id = $4 AND reason = 'auto_recharge' AND status <> 'failed'
            AND billed_at >= $5",
    )
    .bind(tenant)
    .bind(customer)
    .bind(credit_type)
    .bind(resource)
    .bind(start)
    .fetch_one(db)
    .await
}
