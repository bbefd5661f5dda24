//! Webhook endpoints, the delivery log, manual retry, and the alert thresholds that cause
//! balance and grant events. Messages themselves are written by ledger-writer (in the settle
//! transaction) and delivered by its sender; this module only manages what they read.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use shared::webhook::address::{check_url, UrlError};
use shared::webhook::sign::new_secret;
use shared::webhook::EVENT_TYPES;
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use crate::auth::Tenant;
use crate::credit_type::require_credit_type;
use crate::error::replies::{BadRequest, Conflict, Invalid, NotFound, Unauthorized, Unavailable};
use crate::error::{ApiError, ApiResult, Body, Q};
use crate::validate;
use crate::AppState;

/// Namespace of endpoint ids derived from idempotency keys.
const ENDPOINT_NS: Uuid = Uuid::from_u128(0x3d9a_61f0_7c2b_4b8e_a1d4_58e2_0c6f_93b7);
/// Endpoints one tenant may have.
const MAX_ENDPOINTS: i64 = 1000;
/// Thresholds in one list.
const MAX_THRESHOLDS: usize = 20;

/// Webhook settings of ingest (flags or env).
#[derive(clap::Args, Debug, Clone)]
pub struct Settings {
    /// Accept endpoint URLs whose addresses are private, loopback or link-local (local
    /// development and tests only; the ledger-writer's sender has the same setting).
    #[arg(long = "webhook-allow-private", env = "WEBHOOK_ALLOW_PRIVATE")]
    pub allow_private: bool,
}

pub fn routes() -> OpenApiRouter<Arc<AppState>> {
    OpenApiRouter::new()
        .routes(routes!(create_endpoint, list_endpoints))
        .routes(routes!(get_endpoint, delete_endpoint))
        .routes(routes!(rotate_secret))
        .routes(routes!(enable_endpoint))
        .routes(routes!(list_messages))
        .routes(routes!(retry_message))
        .routes(routes!(put_alerts, get_alerts))
        .routes(routes!(put_alert_defaults))
        .routes(routes!(delete_alert_defaults))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewEndpoint {
    /// http or https; private addresses only where the operator allows them.
    url: String,
    /// Event types to receive (all when absent).
    event_types: Option<Vec<String>>,
    /// At most 2000 characters.
    description: Option<String>,
    /// The same key again answers with the same endpoint (or 409 if the body differs).
    idempotency_key: Option<String>,
}

/// A webhook endpoint.
#[derive(Serialize, ToSchema)]
pub struct Endpoint {
    id: Uuid,
    url: String,
    description: Option<String>,
    /// The event types it receives; null for all.
    event_types: Option<Vec<String>>,
    /// Whether the sender disabled it (after failing deliveries).
    disabled: bool,
    disabled_at: Option<DateTime<Utc>>,
    disabled_reason: Option<String>,
    secret_rotated_at: Option<DateTime<Utc>>,
    created_at: DateTime<Utc>,
}

/// A new endpoint, with its signing secret.
#[derive(Serialize, ToSchema)]
pub struct EndpointCreated {
    #[serde(flatten)]
    endpoint: Endpoint,
    /// The signing secret (whsec_...).
    secret: String,
}

/// A page of endpoints.
#[derive(Serialize, ToSchema)]
pub struct EndpointPage {
    endpoints: Vec<Endpoint>,
    /// `after` for the next page; null on the last.
    next_cursor: Option<String>,
}

/// A rotated secret.
#[derive(Serialize, ToSchema)]
pub struct SecretRotated {
    /// The endpoint id as given in the path.
    id: String,
    secret: String,
    rotated_at: DateTime<Utc>,
    /// Until then the previous secret signs too (a second signature).
    previous_secret_expires_at: DateTime<Utc>,
}

#[derive(sqlx::FromRow)]
struct EndpointRow {
    id: Uuid,
    url: String,
    description: Option<String>,
    event_types: Option<Vec<String>>,
    secret: String,
    rotated_at: Option<DateTime<Utc>>,
    disabled_at: Option<DateTime<Utc>>,
    disabled_reason: Option<String>,
    created_at: DateTime<Utc>,
}

const ENDPOINT_COLS: &str =
    "id, url, description, event_types, secret, rotated_at, disabled_at, disabled_reason, created_at";

fn endpoint_json(e: &EndpointRow) -> Endpoint {
    Endpoint {
        id: e.id,
        url: e.url.clone(),
        description: e.description.clone(),
        event_types: e.event_types.clone(),
        disabled: e.disabled_at.is_some(),
        disabled_at: e.disabled_at,
        disabled_reason: e.disabled_reason.clone(),
        secret_rotated_at: e.rotated_at,
        created_at: e.created_at,
    }
}

fn with_secret(e: &EndpointRow) -> EndpointCreated {
    EndpointCreated {
        endpoint: endpoint_json(e),
        secret: e.secret.clone(),
    }
}

fn url_error(e: UrlError) -> ApiError {
    let code = match e {
        UrlError::Private(_) => "private_address",
        UrlError::Scheme => "unsupported_scheme",
        _ => "invalid_url",
    };
    ApiError::invalid("url", code, e.to_string())
}

fn endpoint_id(raw: &str) -> ApiResult<Uuid> {
    Uuid::parse_str(raw).map_err(|_| ApiError::not_found("endpoint"))
}

async fn endpoint(s: &AppState, tenant: &str, id: Uuid) -> ApiResult<EndpointRow> {
    sqlx::query_as(&format!(
        "SELECT {ENDPOINT_COLS} FROM webhook_endpoints WHERE tenant_id = $1 AND id = $2"
    ))
    .bind(tenant)
    .bind(id)
    .fetch_optional(&s.pg.control)
    .await?
    .ok_or_else(|| ApiError::not_found("endpoint"))
}

#[utoipa::path(post, path = "/v1/webhooks/endpoints", tag = "webhooks",
    security(("api_key" = [])),
    request_body(content = NewEndpoint, content_type = "application/json"),
    responses((status = 201, description = "the endpoint with its secret (whsec_...)", body = EndpointCreated), (status = 200, description = "the same idempotency key and body: the earlier result", body = EndpointCreated), BadRequest, Unauthorized, Conflict, Invalid, Unavailable)
)]
pub async fn create_endpoint(
    t: Tenant,
    State(s): State<Arc<AppState>>,
    Body(b): Body<NewEndpoint>,
) -> ApiResult<(StatusCode, Json<EndpointCreated>)> {
    let url = check_url(b.url.trim(), s.config.webhooks.allow_private).map_err(url_error)?;
    let types = match &b.event_types {
        None => None,
        Some(v) if v.is_empty() => {
            return Err(ApiError::invalid(
                "event_types",
                "invalid_value",
                "give at least one event type, or leave it out for all",
            ))
        }
        Some(v) => {
            let mut out: Vec<String> = Vec::new();
            for (i, ty) in v.iter().enumerate() {
                if !EVENT_TYPES.contains(&ty.as_str()) {
                    return Err(ApiError::invalid(
                        &format!("event_types[{i}]"),
                        "unknown_event_type",
                        format!("one of {}", EVENT_TYPES.join(", ")),
                    ));
                }
                if !out.contains(ty) {
                    out.push(ty.clone());
                }
            }
            Some(out)
        }
    };
    if b.description.as_ref().is_some_and(|d| d.len() > 2000) {
        return Err(ApiError::invalid(
            "description",
            "invalid_value",
            "at most 2000 characters",
        ));
    }
    let id = match &b.idempotency_key {
        Some(k) => {
            validate::id("idempotency_key", k)?;
            Uuid::new_v5(&ENDPOINT_NS, format!("{}/{k}", t.id).as_bytes())
        }
        None => Uuid::now_v7(),
    };
    if b.idempotency_key.is_some() {
        if let Ok(e) = endpoint(&s, &t.id, id).await {
            let same = e.url == url.as_str() && e.event_types == types && e.description == b.description;
            return if same {
                Ok((StatusCode::OK, Json(with_secret(&e))))
            } else {
                Err(ApiError::conflict("idempotency_key was used with another body").field("idempotency_key"))
            };
        }
    }
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM webhook_endpoints WHERE tenant_id = $1")
        .bind(&t.id)
        .fetch_one(&s.pg.control)
        .await?;
    if count >= MAX_ENDPOINTS {
        return Err(ApiError::invalid(
            "url",
            "too_many_endpoints",
            format!("at most {MAX_ENDPOINTS} endpoints per tenant"),
        ));
    }
    let created: Option<EndpointRow> = sqlx::query_as(&format!(
        "INSERT INTO webhook_endpoints (id, tenant_id, url, description, event_types, secret)
         VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING RETURNING {ENDPOINT_COLS}"
    ))
    .bind(id)
    .bind(&t.id)
    .bind(url.as_str())
    .bind(&b.description)
    .bind(&types)
    .bind(new_secret())
    .fetch_optional(&s.pg.control)
    .await?;
    // Lost a race with the same idempotency key.
    let e =
        created.ok_or_else(|| ApiError::conflict("retry: the endpoint was just created").field("idempotency_key"))?;
    Ok((StatusCode::CREATED, Json(with_secret(&e))))
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct Page {
    /// 1-1000, default 50.
    limit: Option<i64>,
    /// The cursor of the previous page.
    after: Option<String>,
}

use crate::page::{decode_cursor, encode_cursor, limit};

#[utoipa::path(get, path = "/v1/webhooks/endpoints", tag = "webhooks",
    security(("api_key" = [])),
    params(Page),
    responses((status = 200, description = "`{endpoints, next_cursor}`", body = EndpointPage), BadRequest, Unauthorized, Invalid, Unavailable)
)]
pub async fn list_endpoints(t: Tenant, State(s): State<Arc<AppState>>, Q(q): Q<Page>) -> ApiResult<Json<EndpointPage>> {
    let limit = limit(q.limit)?;
    let after: Option<Uuid> = decode_cursor(&q.after)?;
    let rows: Vec<EndpointRow> = sqlx::query_as(&format!(
        "SELECT {ENDPOINT_COLS} FROM webhook_endpoints WHERE tenant_id = $1 AND ($2::uuid IS NULL OR id > $2)
         ORDER BY id LIMIT $3"
    ))
    .bind(&t.id)
    .bind(after)
    .bind(limit + 1)
    .fetch_all(&s.pg.control)
    .await?;
    let more = rows.len() as i64 > limit;
    let page: Vec<Endpoint> = rows.iter().take(limit as usize).map(endpoint_json).collect();
    let next = if more {
        rows.get(limit as usize - 1).map(|e| encode_cursor(e.id))
    } else {
        None
    };
    Ok(Json(EndpointPage {
        endpoints: page,
        next_cursor: next,
    }))
}

#[utoipa::path(get, path = "/v1/webhooks/endpoints/{id}", tag = "webhooks",
    security(("api_key" = [])),
    params(("id" = String, Path, description = "the endpoint id")),
    responses((status = 200, description = "the endpoint", body = Endpoint), Unauthorized, NotFound, Unavailable)
)]
pub async fn get_endpoint(
    t: Tenant,
    State(s): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> ApiResult<Json<Endpoint>> {
    let e = endpoint(&s, &t.id, endpoint_id(&id)?).await?;
    Ok(Json(endpoint_json(&e)))
}

#[utoipa::path(delete, path = "/v1/webhooks/endpoints/{id}", tag = "webhooks",
    security(("api_key" = [])),
    params(("id" = String, Path, description = "the endpoint id")),
    responses((status = 204, description = "deleted"), Unauthorized, NotFound, Unavailable)
)]
pub async fn delete_endpoint(
    t: Tenant,
    State(s): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    let n = sqlx::query("DELETE FROM webhook_endpoints WHERE tenant_id = $1 AND id = $2")
        .bind(&t.id)
        .bind(endpoint_id(&id)?)
        .execute(&s.pg.control)
        .await?
        .rows_affected();
    if n == 0 {
        return Err(ApiError::not_found("endpoint"));
    }
    Ok(StatusCode::NO_CONTENT)
}

/// A new secret; the previous one keeps signing (a second signature) for 24 hours.
#[utoipa::path(post, path = "/v1/webhooks/endpoints/{id}/rotate-secret", tag = "webhooks",
    security(("api_key" = [])),
    params(("id" = String, Path, description = "the endpoint id")),
    responses((status = 200, description = "the new secret; the old one still signs for 24 h", body = SecretRotated), Unauthorized, NotFound, Unavailable)
)]
pub async fn rotate_secret(
    t: Tenant,
    State(s): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> ApiResult<Json<SecretRotated>> {
    let row: Option<(String, DateTime<Utc>)> = sqlx::query_as(
        "UPDATE webhook_endpoints SET previous_secret = secret, secret = $3, rotated_at = now()
         WHERE tenant_id = $1 AND id = $2 RETURNING secret, rotated_at",
    )
    .bind(&t.id)
    .bind(endpoint_id(&id)?)
    .bind(new_secret())
    .fetch_optional(&s.pg.control)
    .await?;
    let (secret, at) = row.ok_or_else(|| ApiError::not_found("endpoint"))?;
    Ok(Json(SecretRotated {
        id,
        secret,
        rotated_at: at,
        previous_secret_expires_at: at + chrono::Duration::hours(24),
    }))
}

/// Re-enable an endpoint the sender disabled; its pending deliveries resume.
#[utoipa::path(post, path = "/v1/webhooks/endpoints/{id}/enable", tag = "webhooks",
    security(("api_key" = [])),
    params(("id" = String, Path, description = "the endpoint id")),
    responses((status = 200, description = "enabled again", body = Endpoint), Unauthorized, NotFound, Unavailable)
)]
pub async fn enable_endpoint(
    t: Tenant,
    State(s): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> ApiResult<Json<Endpoint>> {
    let row: Option<EndpointRow> = sqlx::query_as(&format!(
        "UPDATE webhook_endpoints SET disabled_at = NULL, disabled_reason = NULL
         WHERE tenant_id = $1 AND id = $2 RETURNING {ENDPOINT_COLS}"
    ))
    .bind(&t.id)
    .bind(endpoint_id(&id)?)
    .fetch_optional(&s.pg.control)
    .await?;
    let e = row.ok_or_else(|| ApiError::not_found("endpoint"))?;
    Ok(Json(endpoint_json(&e)))
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct MessageQuery {
    endpoint_id: Option<String>,
    /// pending, delivered or failed.
    status: Option<String>,
    /// The event type.
    #[serde(rename = "type")]
    kind: Option<String>,
    /// 1-1000, default 50.
    limit: Option<i64>,
    /// The cursor of the previous page.
    after: Option<String>,
}

/// One message to one endpoint, with every attempt.
#[derive(Serialize, ToSchema)]
pub struct Message {
    /// msg_...
    id: String,
    /// The event type.
    #[serde(rename = "type")]
    kind: String,
    created_at: DateTime<Utc>,
    endpoint_id: Uuid,
    /// pending, delivered or failed.
    status: String,
    attempt_count: i32,
    /// When the next attempt is due (pending only; null otherwise).
    next_attempt_at: Option<DateTime<Utc>>,
    /// Every attempt, oldest first.
    #[schema(value_type = Vec<Attempt>)]
    attempts: Value,
    /// The message body as sent (the event); null if unreadable.
    #[schema(value_type = Option<std::collections::HashMap<String, serde_json::Value>>)]
    payload: Value,
}

/// One delivery attempt (as Postgres renders it: `at` carries a UTC offset).
#[derive(ToSchema)]
#[allow(dead_code)] // describes the JSON Postgres builds
pub struct Attempt {
    attempt: i32,
    #[schema(format = DateTime)]
    at: String,
    /// success, http_error, timeout, connect, refused_address or error.
    outcome: String,
    /// The receiver's HTTP status, if it answered.
    status_code: Option<i32>,
    duration_ms: i32,
    /// The first 1 KiB of the receiver's answer, or what went wrong.
    response: Option<String>,
}

/// A page of the delivery log, newest first.
#[derive(Serialize, ToSchema)]
pub struct MessagePage {
    messages: Vec<Message>,
    /// `after` for the next page; null on the last.
    next_cursor: Option<String>,
}

#[derive(sqlx::FromRow)]
struct DeliveryRow {
    seq: i64,
    message_id: Uuid,
    endpoint_id: Uuid,
    status: String,
    attempts: i32,
    next_attempt_at: DateTime<Utc>,
    kind: String,
    created_at: DateTime<Utc>,
    body: String,
    log: Value,
}

/// The delivery log: one row per message and endpoint, newest first, with every attempt.
#[utoipa::path(get, path = "/v1/webhooks/messages", tag = "webhooks",
    security(("api_key" = [])),
    params(MessageQuery),
    responses((status = 200, description = "the delivery log with attempts", body = MessagePage), BadRequest, Unauthorized, Invalid, Unavailable)
)]
pub async fn list_messages(
    t: Tenant,
    State(s): State<Arc<AppState>>,
    Q(q): Q<MessageQuery>,
) -> ApiResult<Json<MessagePage>> {
    let limit = limit(q.limit)?;
    let after: Option<i64> = decode_cursor(&q.after)?;
    let endpoint = match &q.endpoint_id {
        None => None,
        Some(e) => {
            Some(Uuid::parse_str(e).map_err(|_| ApiError::invalid("endpoint_id", "invalid_id", "not an endpoint id"))?)
        }
    };
    if let Some(st) = &q.status {
        if !["pending", "delivered", "failed"].contains(&st.as_str()) {
            return Err(ApiError::invalid(
                "status",
                "invalid_value",
                "one of pending, delivered, failed",
            ));
        }
    }
    let rows: Vec<DeliveryRow> = sqlx::query_as(
        "SELECT d.seq, d.message_id, d.endpoint_id, d.status, d.attempts, d.next_attempt_at, m.type AS kind,
            m.created_at, m.body,
            COALESCE((SELECT json_agg(json_build_object('attempt', a.attempt, 'at', a.at, 'outcome', a.outcome,
                        'status_code', a.status_code, 'duration_ms', a.duration_ms, 'response', a.response)
                      ORDER BY a.id)
                      FROM webhook_attempts a WHERE a.message_id = d.message_id AND a.endpoint_id = d.endpoint_id),
                     '[]'::json) AS log
         FROM webhook_deliveries d JOIN webhook_messages m ON m.id = d.message_id
         WHERE d.tenant_id = $1 AND ($2::uuid IS NULL OR d.endpoint_id = $2) AND ($3::text IS NULL OR d.status = $3)
            AND ($4::text IS NULL OR m.type = $4) AND ($5::bigint IS NULL OR d.seq < $5)
         ORDER BY d.seq DESC LIMIT $6",
    )
    .bind(&t.id)
    .bind(endpoint)
    .bind(&q.status)
    .bind(&q.kind)
    .bind(after)
    .bind(limit + 1)
    .fetch_all(&s.pg.control)
    .await?;
    let more = rows.len() as i64 > limit;
    let page: Vec<Message> = rows
        .iter()
        .take(limit as usize)
        .map(|d| Message {
            id: format!("msg_{}", d.message_id.simple()),
            kind: d.kind.clone(),
            created_at: d.created_at,
            endpoint_id: d.endpoint_id,
            status: d.status.clone(),
            attempt_count: d.attempts,
            next_attempt_at: if d.status == "pending" {
                Some(d.next_attempt_at)
            } else {
                None
            },
            attempts: d.log.clone(),
            payload: serde_json::from_str::<Value>(&d.body).unwrap_or(Value::Null),
        })
        .collect();
    let next = if more {
        rows.get(limit as usize - 1).map(|d| encode_cursor(d.seq))
    } else {
        None
    };
    Ok(Json(MessagePage {
        messages: page,
        next_cursor: next,
    }))
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct RetryQuery {
    /// Only this endpoint's delivery.
    endpoint_id: Option<String>,
}

/// A message queued for delivery again.
#[derive(Serialize, ToSchema)]
pub struct Retried {
    /// The message id as given in the path.
    id: String,
    /// Deliveries queued (one per endpoint).
    retried: u64,
}

/// Send a message again now (one more attempt per endpoint, or to one endpoint), whatever its
/// state, unless an attempt is in flight.
#[utoipa::path(post, path = "/v1/webhooks/messages/{id}/retry", tag = "webhooks",
    security(("api_key" = [])),
    params(("id" = String, Path, description = "the message id"), RetryQuery),
    responses((status = 202, description = "queued for delivery again", body = Retried), BadRequest, Unauthorized, NotFound, Invalid, Unavailable)
)]
pub async fn retry_message(
    t: Tenant,
    State(s): State<Arc<AppState>>,
    Path(id): Path<String>,
    Q(q): Q<RetryQuery>,
) -> ApiResult<(StatusCode, Json<Retried>)> {
    let mid = Uuid::parse_str(id.strip_prefix("msg_").unwrap_or(&id)).map_err(|_| ApiError::not_found("message"))?;
    let endpoint = match &q.endpoint_id {
        None => None,
        Some(e) => {
            Some(Uuid::parse_str(e).map_err(|_| ApiError::invalid("endpoint_id", "invalid_id", "not an endpoint id"))?)
        }
    };
    let exists: Option<i64> = sqlx::query_scalar(
        "SELECT count(*) FROM webhook_deliveries WHERE tenant_id = $1 AND message_id = $2
            AND ($3::uuid IS NULL OR endpoint_id = $3) HAVING count(*) > 0",
    )
    .bind(&t.id)
    .bind(mid)
    .bind(endpoint)
    .fetch_optional(&s.pg.control)
    .await?;
    if exists.is_none() {
        return Err(ApiError::not_found("message"));
    }
    let n = sqlx::query(
        "UPDATE webhook_deliveries SET status = 'pending', next_attempt_at = now(), max_attempts = attempts + 1,
            lease = NULL
         WHERE tenant_id = $1 AND message_id = $2 AND ($3::uuid IS NULL OR endpoint_id = $3)
            AND (lease IS NULL OR next_attempt_at < now())",
    )
    .bind(&t.id)
    .bind(mid)
    .bind(endpoint)
    .execute(&s.pg.control)
    .await?
    .rows_affected();
    if n == 0 {
        return Err(ApiError::conflict(
            "an attempt of this message is in flight; retry when it ends",
        ));
    }
    Ok((StatusCode::ACCEPTED, Json(Retried { id, retried: n })))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AlertBody {
    /// Required at /v1/credits/alerts; absent at /defaults (the tenant default).
    customer_id: Option<String>,
    credit_type: String,
    /// Absent at /defaults.
    resource_id: Option<String>,
    /// Whole percents (1-100) of the granted total used, e.g. [80, 90, 100]; at most 20.
    /// Left out: the tenant default; `[]`: none.
    #[schema(value_type = Option<Vec<u32>>)]
    usage_percent: Option<Vec<Value>>,
    /// Balance levels, decimal strings; at most 20.
    #[schema(value_type = Option<Vec<String>>)]
    balance_below: Option<Vec<Value>>,
    /// Whole percents (1-100) of one grant used; at most 20.
    #[schema(value_type = Option<Vec<u32>>)]
    grant_usage_percent: Option<Vec<Value>>,
}

/// Alert thresholds (sorted, without repeats). A null list inherits the tenant default.
#[derive(Serialize, ToSchema)]
pub struct Alerts {
    /// Null for the tenant default.
    customer_id: Option<String>,
    credit_type: String,
    resource_id: Option<String>,
    usage_percent: Option<Vec<i32>>,
    /// Decimal strings.
    balance_below: Option<Vec<String>>,
    grant_usage_percent: Option<Vec<i32>>,
}

fn percents(field: &str, v: &Option<Vec<Value>>) -> ApiResult<Option<Vec<i32>>> {
    let Some(v) = v else { return Ok(None) };
    if v.len() > MAX_THRESHOLDS {
        return Err(ApiError::invalid(
            field,
            "too_many",
            format!("at most {MAX_THRESHOLDS} thresholds"),
        ));
    }
    let mut out = Vec::new();
    for (i, x) in v.iter().enumerate() {
        match x.as_u64() {
            Some(p) if (1..=100).contains(&p) => out.push(p as i32),
            _ => {
                return Err(ApiError::invalid(
                    &format!("{field}[{i}]"),
                    "out_of_range",
                    "a whole percent from 1 to 100",
                ))
            }
        }
    }
    out.sort_unstable();
    out.dedup();
    Ok(Some(out))
}

fn amounts(field: &str, v: &Option<Vec<Value>>, decimals: u32) -> ApiResult<Option<Vec<Decimal>>> {
    let Some(v) = v else { return Ok(None) };
    if v.len() > MAX_THRESHOLDS {
        return Err(ApiError::invalid(
            field,
            "too_many",
            format!("at most {MAX_THRESHOLDS} thresholds"),
        ));
    }
    let mut out = Vec::new();
    for (i, x) in v.iter().enumerate() {
        out.push(validate::amount(&format!("{field}[{i}]"), x, decimals, true)?);
    }
    out.sort_unstable();
    out.dedup();
    Ok(Some(out))
}

fn alert_json(
    customer: Option<&str>,
    credit_type: &str,
    resource: &str,
    usage: &Option<Vec<i32>>,
    below: &Option<Vec<Decimal>>,
    grant: &Option<Vec<i32>>,
) -> Alerts {
    Alerts {
        customer_id: customer.map(str::to_owned),
        credit_type: credit_type.to_owned(),
        resource_id: if resource.is_empty() {
            None
        } else {
            Some(resource.to_owned())
        },
        usage_percent: usage.clone(),
        balance_below: below
            .as_ref()
            .map(|b| b.iter().map(|d| d.normalize().to_string()).collect::<Vec<_>>()),
        grant_usage_percent: grant.clone(),
    }
}

async fn store_alerts(s: &AppState, tenant: &str, customer: &str, resource: &str, b: &AlertBody) -> ApiResult<Alerts> {
    let ct = require_credit_type(&s.pg.control, tenant, &b.credit_type, "credit_type").await?;
    let usage = percents("usage_percent", &b.usage_percent)?;
    let below = amounts("balance_below", &b.balance_below, ct.decimals as u32)?;
    let grant = percents("grant_usage_percent", &b.grant_usage_percent)?;
    sqlx::query(
        "INSERT INTO credit_alerts (tenant_id, customer_id, resource_id, credit_type, usage_percent, balance_below,
            grant_usage_percent)
         VALUES ($1, $2, $3, $4, $5, $6, $7)
         ON CONFLICT (tenant_id, customer_id, credit_type, resource_id) DO UPDATE
         SET usage_percent = EXCLUDED.usage_percent, balance_below = EXCLUDED.balance_below,
             grant_usage_percent = EXCLUDED.grant_usage_percent, updated_at = now()",
    )
    .bind(tenant)
    .bind(customer)
    .bind(resource)
    .bind(&b.credit_type)
    .bind(&usage)
    .bind(&below)
    .bind(&grant)
    .execute(&s.pg.control)
    .await?;
    let c = if customer.is_empty() { None } else { Some(customer) };
    Ok(alert_json(c, &b.credit_type, resource, &usage, &below, &grant))
}

/// Thresholds of one pool. A list left out inherits the tenant default; `[]` means none.
#[utoipa::path(put, path = "/v1/credits/alerts", tag = "alerts",
    security(("api_key" = [])),
    request_body(content = AlertBody, content_type = "application/json"),
    responses((status = 200, description = "the thresholds now in force for the pool", body = Alerts), BadRequest, Unauthorized, NotFound, Invalid, Unavailable)
)]
pub async fn put_alerts(
    t: Tenant,
    State(s): State<Arc<AppState>>,
    Body(b): Body<AlertBody>,
) -> ApiResult<Json<Alerts>> {
    let customer = b
        .customer_id
        .clone()
        .ok_or_else(|| ApiError::invalid("customer_id", "required", "customer_id is required"))?;
    validate::id("customer_id", &customer)?;
    let resource = b.resource_id.clone().unwrap_or_default();
    if !resource.is_empty() {
        validate::id("resource_id", &resource)?;
    }
    Ok(Json(store_alerts(&s, &t.id, &customer, &resource, &b).await?))
}

/// The tenant's default thresholds for a credit type.
#[utoipa::path(put, path = "/v1/credits/alerts/defaults", tag = "alerts",
    security(("api_key" = [])),
    request_body(content = AlertBody, content_type = "application/json"),
    responses((status = 200, description = "the tenant default for the credit type", body = Alerts), BadRequest, Unauthorized, NotFound, Invalid, Unavailable)
)]
pub async fn put_alert_defaults(
    t: Tenant,
    State(s): State<Arc<AppState>>,
    Body(b): Body<AlertBody>,
) -> ApiResult<Json<Alerts>> {
    if b.customer_id.is_some() {
        return Err(ApiError::invalid(
            "customer_id",
            "invalid_value",
            "defaults apply to every customer: use PUT /v1/credits/alerts for one",
        ));
    }
    if b.resource_id.is_some() {
        return Err(ApiError::invalid(
            "resource_id",
            "invalid_value",
            "defaults apply to every resource",
        ));
    }
    Ok(Json(store_alerts(&s, &t.id, "", "", &b).await?))
}

#[utoipa::path(delete, path = "/v1/credits/alerts/defaults/{credit_type}", tag = "alerts",
    security(("api_key" = [])),
    params(("credit_type" = String, Path, description = "")),
    responses((status = 204, description = "removed"), Unauthorized, NotFound, Invalid, Unavailable)
)]
pub async fn delete_alert_defaults(
    t: Tenant,
    State(s): State<Arc<AppState>>,
    Path(credit_type): Path<String>,
) -> ApiResult<StatusCode> {
    sqlx::query("DELETE FROM credit_alerts WHERE tenant_id = $1 AND customer_id = '' AND credit_type = $2")
        .bind(&t.id)
        .bind(&credit_type)
        .execute(&s.pg.control)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct AlertQuery {
    customer_id: String,
    credit_type: String,
    /// The pool's resource; omitted = the default pool.
    resource_id: Option<String>,
}

type AlertRow = (Option<Vec<i32>>, Option<Vec<Decimal>>, Option<Vec<i32>>);

/// The thresholds in force for a pool: its own where set, else the tenant default.
#[utoipa::path(get, path = "/v1/credits/alerts", tag = "alerts",
    security(("api_key" = [])),
    params(AlertQuery),
    responses((status = 200, description = "the thresholds in force (the pool's or the tenant default)", body = Alerts), BadRequest, Unauthorized, NotFound, Invalid, Unavailable)
)]
pub async fn get_alerts(t: Tenant, State(s): State<Arc<AppState>>, Q(q): Q<AlertQuery>) -> ApiResult<Json<Alerts>> {
    validate::id("customer_id", &q.customer_id)?;
    require_credit_type(&s.pg.control, &t.id, &q.credit_type, "credit_type").await?;
    let resource = q.resource_id.unwrap_or_default();
    let row = |customer: String, resource: String| {
        let s = s.clone();
        let t = t.id.clone();
        let ct = q.credit_type.clone();
        async move {
            sqlx::query_as::<_, AlertRow>(
                "SELECT usage_percent, balance_below, grant_usage_percent FROM credit_alerts
                 WHERE tenant_id = $1 AND customer_id = $2 AND credit_type = $3 AND resource_id = $4",
            )
            .bind(t)
            .bind(customer)
            .bind(ct)
            .bind(resource)
            .fetch_optional(&s.pg.control)
            .await
        }
    };
    let own = row(q.customer_id.clone(), resource.clone())
        .await?
        .unwrap_or((None, None, None));
    let def = row(String::new(), String::new()).await?.unwrap_or((None, None, None));
    let pick = |a: &Option<Vec<i32>>, b: &Option<Vec<i32>>| a.clone().or_else(|| b.clone()).unwrap_or_default();
    let usage = Some(pick(&own.0, &def.0));
    let below = Some(own.1.clone().or_else(|| def.1.clone()).unwrap_or_default());
    let grant = Some(pick(&own.2, &def.2));
    Ok(Json(alert_json(
        Some(&q.customer_id),
        &q.credit_type,
        &resource,
        &usage,
        &below,
        &grant,
    )))
}
