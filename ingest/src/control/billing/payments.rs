//! Payment settings, top-up prices and paid top-ups.
//!
//! A top-up is charged first and granted only after the charge succeeded. Its charge id derives
//! from the idempotency key, and the charge row is written before the first attempt, so a
//! repeated request (or a retry after a timeout) charges the same `charge_id` again, which the
//! receiver answers without charging twice; the grant id derives from the charge id.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use shared::billing::charge::ChargeOutcome;
use shared::billing::{self, ChargeRow, CHARGE_COLS};
use shared::webhook::address::{check_url, UrlError};
use shared::webhook::sign::new_secret;

use super::{currency, dec, Money};
use crate::auth::Tenant;
use crate::control::grants::issue_grant;
use crate::credit_type::require_credit_type;
use crate::error::replies::{BadRequest, Conflict, Invalid, NotFound, Unauthorized, Unavailable};
use crate::error::{ApiError, ApiResult, Body, ErrorReply};
use crate::grant::{grant_json, settled_grant, GrantView};
use crate::validate;
use crate::AppState;
use utoipa::ToSchema;

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PaymentSettings {
    /// Where charges are sent (http or https; private addresses only where the operator
    /// allows them).
    charge_url: String,
}

/// Where charges go, and the secret that signs them.
#[derive(Serialize, ToSchema)]
pub struct Payments {
    charge_url: String,
    /// Issued on the first save and kept after.
    secret: String,
}

/// `PUT /v1/settings/payments`: the secret is issued on the first save and kept after.
#[utoipa::path(put, path = "/v1/settings/payments", tag = "billing",
    security(("api_key" = [])),
    request_body(content = PaymentSettings, content_type = "application/json"),
    responses((status = 200, description = "the payment settings", body = Payments), BadRequest, Unauthorized, Invalid, Unavailable)
)]
pub async fn put_settings(
    t: Tenant,
    State(s): State<Arc<AppState>>,
    Body(b): Body<PaymentSettings>,
) -> ApiResult<Json<Payments>> {
    let url = check_url(&b.charge_url, s.config.webhooks.allow_private).map_err(|e| {
        let code = match e {
            UrlError::Private(_) => "private_address",
            UrlError::Scheme => "unsupported_scheme",
            _ => "invalid_url",
        };
        ApiError::invalid("charge_url", code, e.to_string())
    })?;
    let (charge_url, secret): (String, String) = sqlx::query_as(
        "INSERT INTO payment_settings (tenant_id, charge_url, secret) VALUES ($1, $2, $3)
         ON CONFLICT (tenant_id) DO UPDATE SET charge_url = EXCLUDED.charge_url, updated_at = now()
         RETURNING charge_url, secret",
    )
    .bind(&t.id)
    .bind(url.as_str())
    .bind(new_secret())
    .fetch_one(&s.pg.control)
    .await?;
    Ok(Json(Payments { charge_url, secret }))
}

#[utoipa::path(get, path = "/v1/settings/payments", tag = "billing",
    security(("api_key" = [])),
    responses((status = 200, description = "the payment settings", body = Payments), Unauthorized, NotFound, Unavailable)
)]
pub async fn get_settings(t: Tenant, State(s): State<Arc<AppState>>) -> ApiResult<Json<Payments>> {
    let row: Option<(String, String)> =
        sqlx::query_as("SELECT charge_url, secret FROM payment_settings WHERE tenant_id = $1")
            .bind(&t.id)
            .fetch_optional(&s.pg.control)
            .await?;
    let (charge_url, secret) = row.ok_or_else(|| ApiError::not_found("payment settings"))?;
    Ok(Json(Payments { charge_url, secret }))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UnitPrice {
    /// The price of one credit: a non-negative decimal string, at most 9 places.
    #[schema(value_type = String)]
    amount: Value,
    /// ISO 4217.
    currency: String,
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TopUpPrice {
    unit_price: UnitPrice,
    /// The fewest credits of one top-up: a positive decimal string.
    #[schema(value_type = String)]
    min: Value,
    /// The most credits of one top-up: a decimal string, at least min.
    #[schema(value_type = String)]
    max: Value,
}

/// A credit type's top-up price and bounds. Amounts are decimal strings.
#[derive(Serialize, ToSchema)]
pub struct TopUpSettings {
    credit_type: String,
    unit_price: Money,
    min: String,
    max: String,
}

#[derive(sqlx::FromRow)]
pub struct PriceRow {
    pub unit_price: Decimal,
    pub currency: String,
    pub min_credits: Decimal,
    pub max_credits: Decimal,
}

fn price_json(credit_type: &str, p: &PriceRow) -> TopUpSettings {
    TopUpSettings {
        credit_type: credit_type.to_owned(),
        unit_price: Money {
            amount: dec(p.unit_price),
            currency: p.currency.clone(),
        },
        min: dec(p.min_credits),
        max: dec(p.max_credits),
    }
}

pub async fn price(s: &AppState, tenant: &str, credit_type: &str) -> ApiResult<Option<PriceRow>> {
    Ok(sqlx::query_as(
        "SELECT unit_price, currency, min_credits, max_credits FROM top_up_prices WHERE tenant_id = $1 AND credit_type = $2",
    )
    .bind(tenant)
    .bind(credit_type)
    .fetch_optional(&s.pg.control)
    .await?)
}

/// `PUT /v1/credit-types/{id}/top-up`: the price of one credit and the bounds of one top-up.
#[utoipa::path(put, path = "/v1/credit-types/{id}/top-up", tag = "billing",
    security(("api_key" = [])),
    params(("id" = String, Path, description = "the credit type")),
    request_body(content = TopUpPrice, content_type = "application/json"),
    responses((status = 200, description = "the top-up settings", body = TopUpSettings), BadRequest, Unauthorized, NotFound, Invalid, Unavailable)
)]
pub async fn put_top_up_price(
    t: Tenant,
    State(s): State<Arc<AppState>>,
    Path(id): Path<String>,
    Body(b): Body<TopUpPrice>,
) -> ApiResult<Json<TopUpSettings>> {
    if !validate::id_ok(&id) {
        return Err(ApiError::not_found("credit type"));
    }
    let ct = crate::credit_type::credit_type(&s.pg.control, &t.id, &id)
        .await?
        .ok_or_else(|| ApiError::not_found("credit type"))?;
    let d = ct.decimals as u32;
    let unit = validate::amount("unit_price.amount", &b.unit_price.amount, 9, true)?;
    currency("unit_price.currency", &b.unit_price.currency)?;
    let min = validate::amount("min", &b.min, d, false)?;
    let max = validate::amount("max", &b.max, d, false)?;
    if max < min {
        return Err(ApiError::invalid("max", "invalid_value", "must be at least min"));
    }
    let p: PriceRow = sqlx::query_as(
        "INSERT INTO top_up_prices (tenant_id, credit_type, unit_price, currency, min_credits, max_credits)
         VALUES ($1, $2, $3, $4, $5, $6)
         ON CONFLICT (tenant_id, credit_type) DO UPDATE SET unit_price = EXCLUDED.unit_price,
            currency = EXCLUDED.currency, min_credits = EXCLUDED.min_credits, max_credits = EXCLUDED.max_credits,
            updated_at = now()
         RETURNING unit_price, currency, min_credits, max_credits",
    )
    .bind(&t.id)
    .bind(&id)
    .bind(unit)
    .bind(&b.unit_price.currency)
    .bind(min)
    .bind(max)
    .fetch_one(&s.pg.control)
    .await?;
    Ok(Json(price_json(&id, &p)))
}

#[utoipa::path(get, path = "/v1/credit-types/{id}/top-up", tag = "billing",
    security(("api_key" = [])),
    params(("id" = String, Path, description = "the credit type")),
    responses((status = 200, description = "the top-up settings", body = TopUpSettings), Unauthorized, NotFound, Invalid, Unavailable)
)]
pub async fn get_top_up_price(
    t: Tenant,
    State(s): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> ApiResult<Json<TopUpSettings>> {
    if !validate::id_ok(&id) {
        return Err(ApiError::not_found("top-up price"));
    }
    let p = price(&s, &t.id, &id)
        .await?
        .ok_or_else(|| ApiError::not_found("top-up price"))?;
    Ok(Json(price_json(&id, &p)))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewTopUp {
    customer_id: String,
    credit_type: String,
    resource_id: Option<String>,
    /// Credits to buy: a decimal string within the credit type's top-up min and max.
    #[schema(value_type = String)]
    amount: Value,
    payment_method_id: String,
    /// The charge id derives from it: a repeat never charges twice.
    idempotency_key: String,
}

/// A succeeded charge.
#[derive(Serialize, ToSchema)]
pub struct Charge {
    id: String,
    /// A decimal string.
    amount: String,
    currency: String,
    /// succeeded.
    status: String,
}

/// A paid top-up: the grant and the charge that paid for it.
#[derive(Serialize, ToSchema)]
pub struct TopUp {
    grant: GrantView,
    charge: Charge,
}

fn declined() -> ApiError {
    ApiError::new(
        StatusCode::PAYMENT_REQUIRED,
        "payment_failed",
        "the charge was declined; nothing was granted",
    )
}

fn charge_json(c: &ChargeRow, status: &str) -> Charge {
    Charge {
        id: c.id.clone(),
        amount: dec(c.amount),
        currency: c.currency.clone(),
        status: status.to_owned(),
    }
}

/// `POST /v1/credits/top-ups`: charge, then grant. 201 `{grant, charge}`; 402 when declined
/// (nothing granted); 422 outside min/max; 503 while the charge's outcome is unknown (retry
/// with the same idempotency key: the same charge_id is sent again).
#[utoipa::path(post, path = "/v1/credits/top-ups", tag = "billing",
    security(("api_key" = [])),
    request_body(content = NewTopUp, content_type = "application/json"),
    responses((status = 201, description = "charged, and the grant applied (a repeat of the idempotency key answers the same)", body = TopUp), (status = 202, description = "charged; the grant is not yet applied (status pending)", body = TopUp), BadRequest, Unauthorized, (status = 402, description = "the payment was declined; nothing granted", body = ErrorReply), NotFound, Conflict, Invalid, Unavailable)
)]
pub async fn top_up(
    t: Tenant,
    State(s): State<Arc<AppState>>,
    Body(b): Body<NewTopUp>,
) -> ApiResult<(StatusCode, Json<TopUp>)> {
    validate::id("customer_id", &b.customer_id)?;
    let resource = b.resource_id.clone().unwrap_or_default();
    if !resource.is_empty() {
        validate::id("resource_id", &resource)?;
    }
    validate::id("payment_method_id", &b.payment_method_id)?;
    validate::id("idempotency_key", &b.idempotency_key)?;
    let ct = require_credit_type(&s.pg.control, &t.id, &b.credit_type, "credit_type").await?;
    let d = ct.decimals as u32;
    let credits = validate::amount("amount", &b.amount, d, false)?;
    let p = price(&s, &t.id, &b.credit_type).await?.ok_or_else(|| {
        ApiError::invalid(
            "credit_type",
            "top_up_not_configured",
            "no top-up price for this credit type (PUT /v1/credit-types/{id}/top-up)",
        )
    })?;
    if credits < p.min_credits || credits > p.max_credits {
        return Err(ApiError::invalid(
            "amount",
            "out_of_range",
            format!("a top-up is {} to {} credits", dec(p.min_credits), dec(p.max_credits)),
        ));
    }
    let settings: Option<(String, String)> =
        sqlx::query_as("SELECT charge_url, secret FROM payment_settings WHERE tenant_id = $1")
            .bind(&t.id)
            .fetch_optional(&s.pg.control)
            .await?;
    let (url, secret) = settings.ok_or_else(|| {
        ApiError::new(
            StatusCode::CONFLICT,
            "payments_not_configured",
            "no charge URL (PUT /v1/settings/payments)",
        )
    })?;
    let charge_id = billing::top_up_charge_id(&t.id, &b.idempotency_key);
    let attempts = s.config.billing.charge_attempts;
    // The ledger-writer leaves the charge alone while this request may still be trying it.
    let lease_s = (s.config.billing.charge_timeout_ms * u64::from(attempts) / 1000 + 10) as f64;
    let inserted: Option<ChargeRow> = sqlx::query_as(&format!(
        "INSERT INTO charges (tenant_id, id, reason, customer_id, resource_id, credit_type, credits, amount, currency,
            payment_method_id, idempotency_key, grant_id, next_attempt_at)
         VALUES ($1, $2, 'top_up', $3, $4, $5, $6, $7, $8, $9, $10, $11, now() + make_interval(secs => $12))
         ON CONFLICT DO NOTHING RETURNING {CHARGE_COLS}"
    ))
    .bind(&t.id)
    .bind(&charge_id)
    .bind(&b.customer_id)
    .bind(&resource)
    .bind(&b.credit_type)
    .bind(credits)
    .bind(billing::price(credits, p.unit_price))
    .bind(&p.currency)
    .bind(&b.payment_method_id)
    .bind(&b.idempotency_key)
    .bind(billing::charge_grant_id(&t.id, &charge_id))
    .bind(lease_s)
    .fetch_optional(&s.pg.control)
    .await?;
    let charge = match inserted {
        Some(c) => c,
        None => {
            let c: ChargeRow = sqlx::query_as(&format!(
                "SELECT {CHARGE_COLS} FROM charges WHERE tenant_id = $1 AND id = $2"
            ))
            .bind(&t.id)
            .bind(&charge_id)
            .fetch_one(&s.pg.control)
            .await?;
            let same = c.customer_id == b.customer_id
                && c.credit_type == b.credit_type
                && c.resource_id == resource
                && c.credits == credits
                && c.payment_method_id == b.payment_method_id;
            if !same {
                return Err(ApiError::conflict("idempotency_key was used with another body").field("idempotency_key"));
            }
            match c.status.as_str() {
                "failed" => return Err(declined()),
                "succeeded" => return granted(&s, &t.id, &c, d).await,
                _ => c,
            }
        }
    };
    charge_now(&s, &t.id, &charge, (&url, &secret), d).await
}

/// Try the charge up to `BILLING_CHARGE_ATTEMPTS` times within the request: granted on
/// success, 402 on a decline, and on no answer 503 with the charge left to the ledger-writer's
/// retries (the same charge_id, so never charged twice). No Postgres connection is held while
/// the payment endpoint is called.
async fn charge_now(
    s: &AppState,
    tenant: &str,
    charge: &ChargeRow,
    (url, secret): (&str, &str),
    d: u32,
) -> ApiResult<(StatusCode, Json<TopUp>)> {
    let attempts = s.config.billing.charge_attempts;
    let client = &s.charges;
    let req = charge.request();
    let mut last = String::new();
    for attempt in 0..attempts {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_millis(250 << attempt.min(4))).await;
        }
        let outcome = client.charge(url, secret, &req).await;
        let (status, reason) = match &outcome {
            ChargeOutcome::Succeeded => ("succeeded", None),
            ChargeOutcome::Failed(r) => ("failed", Some(r.clone())),
            ChargeOutcome::Unknown(r) => ("unknown", Some(r.clone())),
        };
        // A concluded charge never goes back to unknown (another attempt may have concluded it).
        sqlx::query(
            "UPDATE charges SET status = CASE WHEN status IN ('succeeded', 'failed') THEN status ELSE $3 END,
                failure_reason = $4, attempts = attempts + 1, updated_at = now()
             WHERE tenant_id = $1 AND id = $2",
        )
        .bind(tenant)
        .bind(&charge.id)
        .bind(status)
        .bind(&reason)
        .execute(&s.pg.control)
        .await?;
        match outcome {
            ChargeOutcome::Succeeded => return granted(s, tenant, charge, d).await,
            ChargeOutcome::Failed(r) => {
                tracing::info!(charge_id = %charge.id, reason = %r, "top-up declined");
                return Err(declined());
            }
            ChargeOutcome::Unknown(r) => {
                tracing::warn!(charge_id = %charge.id, attempt, reason = %r, "top-up charge outcome unknown");
                last = r;
            }
        }
    }
    // Give it to the ledger-writer's retries (same charge_id) from now on.
    sqlx::query(
        "UPDATE charges SET next_attempt_at = now() + interval '5 seconds' WHERE tenant_id = $1 AND id = $2
            AND status IN ('pending', 'unknown')",
    )
    .bind(tenant)
    .bind(&charge.id)
    .execute(&s.pg.control)
    .await?;
    let mut e = ApiError::unavailable(
        "charge_outcome_unknown",
        "the billing system did not answer; retry with the same idempotency_key (it is never charged twice)",
        5,
    );
    e.body.message = format!("{} (last: {last})", e.body.message);
    Err(e)
}

/// The grant of a succeeded charge: issue it (the same id every time) and answer with it.
async fn granted(s: &AppState, tenant: &str, c: &ChargeRow, decimals: u32) -> ApiResult<(StatusCode, Json<TopUp>)> {
    let spec = c.grant(decimals);
    let (status, grant) = match settled_grant(&s.pg.control, tenant, spec.id).await? {
        Some(g) => (StatusCode::CREATED, grant_json(&g)),
        None => {
            let (status, Json(reply)) = issue_grant(s, tenant, spec, "top-up").await?;
            (status, reply.grant)
        }
    };
    sqlx::query("UPDATE charges SET granted_at = now() WHERE tenant_id = $1 AND id = $2 AND granted_at IS NULL")
        .bind(tenant)
        .bind(&c.id)
        .execute(&s.pg.control)
        .await?;
    Ok((
        status,
        Json(TopUp {
            grant,
            charge: charge_json(c, "succeeded"),
        }),
    ))
}
