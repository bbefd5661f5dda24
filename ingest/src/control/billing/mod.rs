//! Billing API: where charges go (`/v1/settings/payments`), top-up prices and paid top-ups,
//! auto-recharge settings, plans, add-ons and subscriptions. Credits always enter a pool as a
//! grant through the input topic (`credits::issue_grant`), with ids derived from what paid for
//! them (a charge, a subscription period), so a repeat is the same grant.
//!
//! Top-ups are charged here, inside the request; auto-recharges and plan periods are driven by
//! the ledger-writer's billing tasks (`ledger-writer/src/billing/`), which also finish a top-up
//! whose answer was lost (retry the charge with the same `charge_id`, grant once it succeeded).

pub mod payments;
pub mod plans;
pub mod recharge;

use std::sync::Arc;

use serde::Serialize;
use serde_json::Value;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::error::ApiError;
use crate::AppState;

/// Billing settings of ingest (flags or env). Charge URLs follow `WEBHOOK_ALLOW_PRIVATE`.
#[derive(clap::Args, Debug, Clone)]
pub struct Settings {
    /// How long the tenant's billing system has to answer one charge attempt, in milliseconds.
    #[arg(
        long = "billing-charge-timeout-ms",
        env = "BILLING_CHARGE_TIMEOUT_MS",
        default_value_t = 10_000
    )]
    pub charge_timeout_ms: u64,
    /// Attempts of one top-up charge inside the request while its outcome is unknown (a
    /// timeout, 5xx); every attempt carries the same charge_id.
    #[arg(long = "billing-charge-attempts", env = "BILLING_CHARGE_ATTEMPTS", default_value_t = 3,
          value_parser = clap::value_parser!(u32).range(1..=10))]
    pub charge_attempts: u32,
    /// Tests only: the billing clock runs this many seconds ahead (which spend period of
    /// auto-recharge is current); the ledger-writer has the same setting.
    #[arg(long = "billing-clock-offset-s", env = "BILLING_CLOCK_OFFSET_S", default_value_t = 0)]
    pub clock_offset_s: i64,
}

impl Settings {
    /// The billing clock.
    pub fn now(&self) -> chrono::DateTime<chrono::Utc> {
        chrono::Utc::now() + chrono::Duration::seconds(self.clock_offset_s)
    }
}

pub fn routes() -> OpenApiRouter<Arc<AppState>> {
    OpenApiRouter::new()
        .routes(routes!(payments::put_settings, payments::get_settings))
        .routes(routes!(payments::put_top_up_price, payments::get_top_up_price))
        .routes(routes!(payments::top_up))
        .routes(routes!(recharge::put_settings, recharge::get_settings))
        .routes(routes!(plans::put_plan, plans::get_plan))
        .routes(routes!(plans::put_addon, plans::get_addon))
        .routes(routes!(plans::put_subscription, plans::get_subscription))
}

/// A money amount: a decimal string and its currency.
#[derive(Serialize, ToSchema)]
pub struct Money {
    /// A decimal string.
    pub amount: String,
    /// ISO 4217.
    pub currency: String,
}

/// An ISO 4217 currency code.
pub fn currency(field: &str, c: &str) -> Result<(), ApiError> {
    if c.len() == 3 && c.bytes().all(|x| x.is_ascii_uppercase()) {
        Ok(())
    } else {
        Err(ApiError::invalid(
            field,
            "invalid_value",
            "an ISO 4217 code such as USD",
        ))
    }
}

/// A money amount: a decimal string with at most 2 places, >= 0.
pub fn money(field: &str, v: &Value) -> Result<rust_decimal::Decimal, ApiError> {
    crate::validate::amount(field, v, 2, true)
}

/// A name of 1-200 characters.
pub fn name(field: &str, n: &str) -> Result<(), ApiError> {
    if n.trim().is_empty() || n.len() > 200 {
        Err(ApiError::invalid(field, "invalid_value", "must be 1-200 characters"))
    } else {
        Ok(())
    }
}

pub fn dec(d: rust_decimal::Decimal) -> String {
    d.normalize().to_string()
}
