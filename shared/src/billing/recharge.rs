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
