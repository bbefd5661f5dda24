//! Auto-recharge settings per pool. The recharges themselves are made by the ledger-writer
//! (`ledger-writer/src/billing/recharge.rs`) when the settled balance drops below the threshold
//! or events are denied. Saving the settings lifts a pause (`payment_failed` stays until then;
//! `spend_limit_reached` also lifts when the spend period resets) and, if a charge of the pool
//! was left with an unknown outcome, has it retried with its own charge_id.

use std::sync::Arc;

use axum::extract::State;
use axum::Json;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use shared::billing::period::spend_period;
use shared::billing::AutoRechargeSettings;
use utoipa::{IntoParams, ToSchema};

use super::{currency, dec, money, Money};
use crate::auth::Tenant;
use crate::credit_type::require_credit_type;
use crate::error::replies::{BadRequest, Invalid, NotFound, Unauthorized, Unavailable};
use crate::error::{ApiError, ApiResult, Body, Q};
use crate::validate;
use crate::AppState;

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SpendLimit {
    /// A non-negative decimal string, at most 2 places.
    #[schema(value_type = String)]
    amount: Value,
    /// ISO 4217; the credit type's top-up price currency.
    currency: String,
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = AutoRechargeSettings)]
pub struct Settings {
    customer_id: String,
    credit_type: String,
    resource_id: Option<String>,
    enabled: bool,
    /// Recharge when the settled balance drops below this: a decimal string.
    #[schema(value_type = String)]
    threshold: Value,
    /// Recharge up to this balance: a decimal string above threshold.
    #[schema(value_type = String)]
    target_balance: Value,
    monthly_spend_limit: SpendLimit,
    /// The spend limit resets on this day of every month (1-28, 00:00 UTC); default 1.
    spend_limit_reset_day: Option<u32>,
    grant_expiration_days: Option<u32>,
    payment_method_id: String,
}

#[derive(sqlx::FromRow)]
struct Row {
    #[sqlx(flatten)]
    settings: AutoRechargeSettings,
    enabled: bool,
    paused_at: Option<DateTime<Utc>>,
    in_flight_charge: Option<String>,
    last_recharge_at: Option<DateTime<Utc>>,
    updated_at: DateTime<Utc>,
}

const COLS: &str = "customer_id, resource_id, credit_type, enabled, threshold, target_balance, spend_limit, currency,
    reset_day, grant_expiration_days, payment_method_id, paused_reason, paused_at, in_flight_charge, last_recharge_at,
    updated_at";

/// A pool's auto-recharge settings and state. Amounts are decimal strings.
#[derive(Serialize, ToSchema)]
pub struct AutoRecharge {
    customer_id: String,
    credit_type: String,
    resource_id: Option<String>,
    enabled: bool,
    threshold: String,
    target_balance: String,
    monthly_spend_limit: Money,
    /// 1-28.
    spend_limit_reset_day: i16,
    grant_expiration_days: Option<i32>,
    payment_method_id: String,
    /// What recharges charged in the current spend period (succeeded or not yet concluded).
    spent_this_period: Money,
    period_started_at: DateTime<Utc>,
    period_resets_at: DateTime<Utc>,
    paused: bool,
    /// payment_failed or spend_limit_reached.
    paused_reason: Option<String>,
    paused_at: Option<DateTime<Utc>>,
    recharge_in_flight: bool,
    last_recharge_at: Option<DateTime<Utc>>,
    updated_at: DateTime<Utc>,
}

async fn render(s: &AppState, tenant: &str, row: &Row) -> ApiResult<AutoRecharge> {
    let r = &row.settings;
    let (start, end) = spend_period(r.reset_day as u32, s.config.billing.now());
    let key = (
        tenant,
        r.customer_id.as_str(),
        r.credit_type.as_str(),
        r.resource_id.as_str(),
    );
    let spent = shared::billing::recharge::spent_since(&s.pg.control, key, start).await?;
    Ok(AutoRecharge {
        customer_id: r.customer_id.clone(),
        credit_type: r.credit_type.clone(),
        resource_id: if r.resource_id.is_empty() {
            None
        } else {
            Some(r.resource_id.clone())
        },
        enabled: row.enabled,
        threshold: dec(r.threshold),
        target_balance: dec(r.target_balance),
        monthly_spend_limit: Money {
            amount: dec(r.spend_limit),
            currency: r.currency.clone(),
        },
        spend_limit_reset_day: r.reset_day,
        grant_expiration_days: r.grant_expiration_days,
        payment_method_id: r.payment_method_id.clone(),
        spent_this_period: Money {
            amount: dec(spent),
            currency: r.currency.clone(),
        },
        period_started_at: start,
        period_resets_at: end,
        paused: r.paused_reason.is_some(),
        paused_reason: r.paused_reason.clone(),
        paused_at: row.paused_at,
        recharge_in_flight: row.in_flight_charge.is_some(),
        last_recharge_at: row.last_recharge_at,
        updated_at: row.updated_at,
    })
}

/// `PUT /v1/credits/auto-recharge`
#[utoipa::path(put, path = "/v1/credits/auto-recharge", tag = "billing",
    security(("api_key" = [])),
    request_body(content = Settings, content_type = "application/json"),
    responses((status = 200, description = "the settings", body = AutoRecharge), BadRequest, Unauthorized, NotFound, Invalid, Unavailable)
)]
pub async fn put_settings(
    t: Tenant,
    State(s): State<Arc<AppState>>,
    Body(b): Body<Settings>,
) -> ApiResult<Json<AutoRecharge>> {
    validate::id("customer_id", &b.customer_id)?;
    let resource = b.resource_id.clone().unwrap_or_default();
    if !resource.is_empty() {
        validate::id("resource_id", &resource)?;
    }
    validate::id("payment_method_id", &b.payment_method_id)?;
    let ct = require_credit_type(&s.pg.control, &t.id, &b.credit_type, "credit_type").await?;
    let d = ct.decimals as u32;
    let threshold = validate::amount("threshold", &b.threshold, d, true)?;
    let target = validate::amount("target_balance", &b.target_balance, d, false)?;
    if target <= threshold {
        return Err(ApiError::invalid(
            "target_balance",
            "invalid_value",
            "must be above threshold",
        ));
    }
    let limit = money("monthly_spend_limit.amount", &b.monthly_spend_limit.amount)?;
    currency("monthly_spend_limit.currency", &b.monthly_spend_limit.currency)?;
    let reset_day = b.spend_limit_reset_day.unwrap_or(1);
    if !(1..=28).contains(&reset_day) {
        return Err(ApiError::invalid(
            "spend_limit_reset_day",
            "out_of_range",
            "must be between 1 and 28",
        ));
    }
    if b.grant_expiration_days.is_some_and(|d| d == 0 || d > 3650) {
        return Err(ApiError::invalid(
            "grant_expiration_days",
            "out_of_range",
            "must be between 1 and 3650",
        ));
    }
    // Recharged credits are priced like top-ups, in the limit's currency.
    let price = super::payments::price(&s, &t.id, &b.credit_type)
        .await?
        .ok_or_else(|| {
            ApiError::invalid(
                "credit_type",
                "top_up_not_configured",
                "recharges are priced by the credit type's top-up price (PUT /v1/credit-types/{id}/top-up)",
            )
        })?;
    if price.currency != b.monthly_spend_limit.currency {
        return Err(ApiError::invalid(
            "monthly_spend_limit.currency",
            "currency_mismatch",
            format!("the credit type is priced in {}", price.currency),
        ));
    }
    let mut tx = s.pg.control.begin().await?;
    // deny_seen_id starts at the pool's newest ledger entry: older denials trigger nothing.
    let row: Row = sqlx::query_as(&format!(
        "INSERT INTO auto_recharge AS a (tenant_id, customer_id, resource_id, credit_type, enabled, threshold,
            target_balance, spend_limit, currency, reset_day, grant_expiration_days, payment_method_id, deny_seen_id)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12,
            (SELECT COALESCE(max(id), 0) FROM ledger_entries WHERE tenant_id = $1 AND customer_id = $2
                AND credit_type = $4 AND resource_id = $3))
         ON CONFLICT (tenant_id, customer_id, credit_type, resource_id) DO UPDATE SET
            enabled = EXCLUDED.enabled, threshold = EXCLUDED.threshold, target_balance = EXCLUDED.target_balance,
            spend_limit = EXCLUDED.spend_limit, currency = EXCLUDED.currency, reset_day = EXCLUDED.reset_day,
            grant_expiration_days = EXCLUDED.grant_expiration_days, payment_method_id = EXCLUDED.payment_method_id,
            paused_reason = NULL, paused_at = NULL, paused_period_start = NULL, updated_at = now()
         RETURNING {COLS}"
    ))
    .bind(&t.id)
    .bind(&b.customer_id)
    .bind(&resource)
    .bind(&b.credit_type)
    .bind(b.enabled)
    .bind(threshold)
    .bind(target)
    .bind(limit)
    .bind(&b.monthly_spend_limit.currency)
    .bind(reset_day as i16)
    .bind(b.grant_expiration_days.map(|d| d as i32))
    .bind(&b.payment_method_id)
    .fetch_one(&mut *tx)
    .await?;
    // A charge left unknown after its attempts: try it again (same charge_id, never a new one).
    if let Some(c) = &row.in_flight_charge {
        sqlx::query(
            "UPDATE charges SET next_attempt_at = now(), attempts = 0 WHERE tenant_id = $1 AND id = $2
                AND status IN ('pending', 'unknown')",
        )
        .bind(&t.id)
        .bind(c)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(Json(render(&s, &t.id, &row).await?))
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PoolQuery {
    customer_id: String,
    credit_type: String,
    resource_id: Option<String>,
}

/// `GET /v1/credits/auto-recharge?customer_id=&credit_type=`
#[utoipa::path(get, path = "/v1/credits/auto-recharge", tag = "billing",
    security(("api_key" = [])),
    params(PoolQuery),
    responses((status = 200, description = "the settings and the spend period", body = AutoRecharge), BadRequest, Unauthorized, NotFound, Invalid, Unavailable)
)]
pub async fn get_settings(
    t: Tenant,
    State(s): State<Arc<AppState>>,
    Q(q): Q<PoolQuery>,
) -> ApiResult<Json<AutoRecharge>> {
    validate::id("customer_id", &q.customer_id)?;
    validate::id("credit_type", &q.credit_type)?;
    let row: Row = sqlx::query_as(&format!(
        "SELECT {COLS} FROM auto_recharge WHERE tenant_id = $1 AND customer_id = $2 AND credit_type = $3
            AND resource_id = $4"
    ))
    .bind(&t.id)
    .bind(&q.customer_id)
    .bind(&q.credit_type)
    .bind(q.resource_id.unwrap_or_default())
    .fetch_optional(&s.pg.control)
    .await?
    .ok_or_else(|| ApiError::not_found("auto-recharge settings"))?;
    Ok(Json(render(&s, &t.id, &row).await?))
}
