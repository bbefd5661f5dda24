//! `GET /openapi.json`: the API described with utoipa. Each route of the router has a path
//! entry here (a test checks that none is missing), request bodies and replies have schemas,
//! and every status a route can answer is listed; a schemathesis run against the live stack
//! (deploy/local/api-check, run by .ci/run) checks that the server does what this says.

#![allow(dead_code)]

use serde_json::Value;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi, ToSchema};

/// `{"error": {code, message, field}}`.
#[derive(ToSchema)]
pub struct Error {
    error: ErrorDetail,
}

#[derive(ToSchema)]
pub struct ErrorDetail {
    /// snake_case, stable.
    code: String,
    message: String,
    /// The path of the offending field, when one is to blame.
    field: Option<String>,
}

/// A refused batch of events: none was accepted.
#[derive(ToSchema)]
pub struct EventErrors {
    error: ErrorDetail,
    errors: Option<Vec<EventError>>,
}

#[derive(ToSchema)]
pub struct EventError {
    index: u64,
    code: String,
    message: String,
    field: String,
}

#[derive(ToSchema)]
pub struct NewTenant {
    /// 1-200 characters.
    name: String,
}

#[derive(ToSchema)]
pub struct TenantCreated {
    tenant_id: String,
    name: String,
    /// Shown once; stored hashed.
    api_key: String,
}

#[derive(ToSchema)]
pub struct ApiKeyCreated {
    api_key: String,
}

#[derive(ToSchema)]
pub struct TenantLimits {
    /// Default 5000.
    events_per_second: u32,
}

#[derive(ToSchema)]
pub struct NewCreditType {
    /// 1-128 characters of `[A-Za-z0-9._:@-]`.
    id: String,
    name: String,
    unit_singular: String,
    unit_plural: String,
    /// 0-9, default 2.
    decimals: Option<u8>,
    /// "hard" (default) or "soft".
    limit: Option<String>,
}

#[derive(ToSchema)]
pub struct CreditType {
    id: String,
    name: String,
    unit_singular: String,
    unit_plural: String,
    decimals: u8,
    limit: String,
}

#[derive(ToSchema)]
pub struct PutMapping {
    credit_type: String,
    /// A decimal string, e.g. "0.01".
    credits_per_unit: String,
    /// A numeric dimension that gives the quantity (else 1).
    quantity_dimension: Option<String>,
    /// RFC 3339; default now.
    effective_at: Option<String>,
}

/// One event: `{customer_id, event_name, idempotency_key, timestamp?, resource_id?, dimensions?}`.
#[derive(ToSchema, serde::Serialize)]
pub struct Event {
    customer_id: String,
    event_name: String,
    idempotency_key: String,
    /// RFC 3339; within the dedupe window and at most 5 minutes ahead. Default now.
    timestamp: Option<String>,
    resource_id: Option<String>,
    /// A flat object of strings and numbers.
    #[schema(value_type = Option<Object>)]
    dimensions: Option<Value>,
}

/// One event, or `{"events": [...]}` with at most 1000.
#[derive(ToSchema, serde::Serialize)]
#[serde(untagged)]
pub enum EventsBody {
    One(Event),
    Many(Batch),
}

#[derive(ToSchema, serde::Serialize)]
pub struct Batch {
    events: Vec<Event>,
}

#[derive(ToSchema)]
pub struct Accepted {
    accepted: u64,
}

#[derive(ToSchema)]
pub struct EventStatus {
    /// pending, settled, denied, unpriced or dead_lettered.
    status: String,
    idempotency_key: String,
    duplicates: i64,
    /// Why it was denied, unpriced or dead-lettered.
    reason: Option<String>,
    /// When a consumer dead-lettered it (status dead_lettered).
    dead_lettered_at: Option<String>,
    #[schema(value_type = Option<Object>)]
    event: Option<Value>,
    credit_type: Option<String>,
    cost: Option<String>,
    ledger_entries: Option<Vec<LedgerEntry>>,
}

#[derive(ToSchema)]
pub struct CostBody {
    amount: String,
    currency: String,
}

#[derive(ToSchema)]
pub struct NewGrant {
    customer_id: String,
    credit_type: String,
    /// A decimal string with at most the credit type's decimal places.
    amount: String,
    display_name: String,
    resource_id: Option<String>,
    description: Option<String>,
    /// "paid" (default) or "promo".
    category: Option<String>,
    /// 0-1000, default 100; lower is consumed first.
    priority: Option<i64>,
    effective_at: Option<String>,
    expires_at: Option<String>,
    cost: Option<CostBody>,
    #[schema(value_type = Option<Object>)]
    metadata: Option<Value>,
    idempotency_key: Option<String>,
}

#[derive(ToSchema)]
pub struct Grant {
    id: String,
    customer_id: String,
    credit_type: String,
    resource_id: Option<String>,
    amount: String,
    remaining: String,
    /// pending, scheduled, active, depleted, expired or voided.
    status: String,
    category: String,
    priority: i64,
    effective_at: String,
    expires_at: Option<String>,
    display_name: String,
    source: String,
    created_at: String,
}

#[derive(ToSchema)]
pub struct GrantReply {
    grant: Grant,
}

#[derive(ToSchema)]
pub struct Balance {
    customer_id: String,
    credit_type: String,
    resource_id: Option<String>,
    balance: String,
    scheduled: String,
    has_access: bool,
    limit: String,
    as_of: String,
}

#[derive(ToSchema)]
pub struct CheckBody {
    customer_id: String,
    credit_type: Option<String>,
    resource_id: Option<String>,
    /// Give exactly one of event_name (with quantity) or amount.
    event_name: Option<String>,
    quantity: Option<f64>,
    amount: Option<String>,
}

#[derive(ToSchema)]
pub struct CheckReply {
    allowed: bool,
    cost: String,
    balance: String,
    credit_type: String,
    limit: String,
}

#[derive(ToSchema)]
pub struct LimitBody {
    customer_id: String,
    credit_type: String,
    resource_id: Option<String>,
    /// "hard", "soft", or null for the credit type's.
    limit: Option<String>,
}

#[derive(ToSchema)]
pub struct LimitReply {
    customer_id: String,
    credit_type: String,
    resource_id: Option<String>,
    limit: String,
    overridden: bool,
}

#[derive(ToSchema)]
pub struct LedgerEntry {
    id: String,
    timestamp: String,
    /// grant, consume, expire, void, adjust or deny.
    #[schema(rename = "type")]
    kind: String,
    source: String,
    source_id: String,
    grant_id: Option<String>,
    amount: String,
    /// The balance of the entry's pool (credit type and resource) after the entry.
    end_balance: String,
    actor: String,
    customer_id: String,
    credit_type: String,
    /// The pool's resource; `null` for the default pool.
    resource_id: Option<String>,
}

#[derive(ToSchema)]
pub struct LedgerPage {
    entries: Vec<LedgerEntry>,
    next_cursor: Option<String>,
}

#[derive(ToSchema)]
pub struct UsagePoint {
    start: String,
    credits: String,
}

#[derive(ToSchema)]
pub struct UsageSeries {
    /// The feature, or the userId (null for events without one).
    key: Option<String>,
    total: String,
    points: Vec<UsagePoint>,
}

#[derive(ToSchema)]
pub struct UsageReply {
    time_range: String,
    /// hour, day or month.
    bucket: String,
    series: Vec<UsageSeries>,
}

#[utoipa::path(post, path = "/v1/admin/tenants", tag = "operator",
    security(("operator" = [])),
    request_body(content = NewTenant, content_type = "application/json"),
    responses((status = 201, description = "the tenant and its first API key (shown once)", body = TenantCreated), (status = 400, description = "malformed request", body = Error), (status = 401, description = "missing or invalid credentials", body = Error), (status = 422, description = "invalid value; `field` names it", body = Error))
)]
fn create_tenant() {}

#[utoipa::path(post, path = "/v1/admin/tenants/{tenant_id}/api-keys", tag = "operator",
    security(("operator" = [])),
    params(("tenant_id" = String, Path, description = "the tenant")),
    responses((status = 201, description = "a new API key (shown once)", body = ApiKeyCreated), (status = 401, description = "missing or invalid credentials", body = Error), (status = 404, description = "not found (or another tenant's)", body = Error))
)]
fn create_key() {}

#[utoipa::path(delete, path = "/v1/admin/api-keys/{prefix}", tag = "operator",
    security(("operator" = [])),
    params(("prefix" = String, Path, description = "the key's prefix")),
    responses((status = 204, description = "revoked"), (status = 401, description = "missing or invalid credentials", body = Error), (status = 404, description = "not found (or another tenant's)", body = Error))
)]
fn revoke_key() {}

#[utoipa::path(put, path = "/v1/admin/tenants/{tenant_id}/limits", tag = "operator",
    security(("operator" = [])),
    params(("tenant_id" = String, Path, description = "the tenant")),
    request_body(content = TenantLimits, content_type = "application/json"),
    responses((status = 200, description = "the limits in force", body = Object), (status = 400, description = "malformed request", body = Error), (status = 401, description = "missing or invalid credentials", body = Error), (status = 404, description = "not found (or another tenant's)", body = Error), (status = 422, description = "invalid value; `field` names it", body = Error))
)]
fn set_tenant_limits() {}

#[utoipa::path(post, path = "/v1/credit-types", tag = "catalogue",
    security(("api_key" = [])),
    request_body(content = NewCreditType, content_type = "application/json"),
    responses((status = 201, description = "created", body = CreditType), (status = 400, description = "malformed request", body = Error), (status = 401, description = "missing or invalid credentials", body = Error), (status = 409, description = "conflict", body = Error), (status = 422, description = "invalid value; `field` names it", body = Error))
)]
fn create_credit_type() {}

#[utoipa::path(get, path = "/v1/credit-types", tag = "catalogue",
    security(("api_key" = [])),
    responses((status = 200, description = "`{credit_types: [...]}`", body = Object), (status = 401, description = "missing or invalid credentials", body = Error))
)]
fn list_credit_types() {}

#[utoipa::path(put, path = "/v1/features/{event_name}/credit-mapping", tag = "catalogue",
    security(("api_key" = [])),
    params(("event_name" = String, Path, description = "the event name")),
    request_body(content = PutMapping, content_type = "application/json"),
    responses((status = 200, description = "the mapping version created", body = Object), (status = 400, description = "malformed request", body = Error), (status = 401, description = "missing or invalid credentials", body = Error), (status = 404, description = "not found (or another tenant's)", body = Error), (status = 422, description = "invalid value; `field` names it", body = Error))
)]
fn put_mapping() {}

#[utoipa::path(get, path = "/v1/features/{event_name}/credit-mapping", tag = "catalogue",
    security(("api_key" = [])),
    params(("event_name" = String, Path, description = "the event name")),
    responses((status = 200, description = "the mapping in force and its history", body = Object), (status = 401, description = "missing or invalid credentials", body = Error), (status = 404, description = "not found (or another tenant's)", body = Error), (status = 422, description = "invalid value; `field` names it", body = Error))
)]
fn get_mapping() {}

#[utoipa::path(post, path = "/v1/events", tag = "events",
    security(("api_key" = [])),
    request_body(content = EventsBody, content_type = "application/json"),
    responses((status = 202, description = "every event is durable in Kafka", body = Accepted), (status = 400, description = "malformed request", body = Error), (status = 401, description = "missing or invalid credentials", body = Error), (status = 413, description = "body over 5 MB", body = Error), (status = 422, description = "invalid value; `field` names it", body = EventErrors), (status = 429, description = "over the tenant's rate; see Retry-After", body = Error), (status = 503, description = "saturated or a dependency is down; see Retry-After", body = Error))
)]
fn post_events() {}

#[utoipa::path(get, path = "/v1/events/{idempotency_key}", tag = "events",
    security(("api_key" = [])),
    params(("idempotency_key" = String, Path, description = "the event's idempotency key"), ("customer_id" = Option<String>, Query, description = "lets an in-flight event answer `pending`")),
    responses((status = 200, description = "the event's fate", body = EventStatus), (status = 400, description = "malformed request", body = Error), (status = 401, description = "missing or invalid credentials", body = Error), (status = 404, description = "not found (or another tenant's)", body = Error), (status = 422, description = "invalid value; `field` names it", body = Error))
)]
fn get_event() {}

#[utoipa::path(post, path = "/v1/credits/grants", tag = "credits",
    security(("api_key" = [])),
    request_body(content = NewGrant, content_type = "application/json"),
    responses((status = 201, description = "applied to the live pool", body = GrantReply), (status = 202, description = "accepted, not yet applied (status pending)", body = GrantReply), (status = 200, description = "the same idempotency key and body: the earlier result", body = GrantReply), (status = 400, description = "malformed request", body = Error), (status = 401, description = "missing or invalid credentials", body = Error), (status = 404, description = "not found (or another tenant's)", body = Error), (status = 409, description = "conflict", body = Error), (status = 422, description = "invalid value; `field` names it", body = Error), (status = 503, description = "saturated or a dependency is down; see Retry-After", body = Error))
)]
fn create_grant() {}

#[utoipa::path(get, path = "/v1/credits/grants", tag = "credits",
    security(("api_key" = [])),
    params(("customer_id" = Option<String>, Query, description = ""), ("credit_type" = Option<String>, Query, description = ""), ("resource_id" = Option<String>, Query, description = ""), ("status" = Option<String>, Query, description = "scheduled, active, depleted, expired or voided"), ("limit" = Option<i64>, Query, description = "1-1000, default 50"), ("after" = Option<String>, Query, description = "cursor")),
    responses((status = 200, description = "`{grants, next_cursor}`", body = Object), (status = 400, description = "malformed request", body = Error), (status = 401, description = "missing or invalid credentials", body = Error), (status = 422, description = "invalid value; `field` names it", body = Error))
)]
fn list_grants() {}

#[utoipa::path(post, path = "/v1/credits/grants/{id}/void", tag = "credits",
    security(("api_key" = [])),
    params(("id" = String, Path, description = "the grant id")),
    responses((status = 200, description = "voided", body = GrantReply), (status = 401, description = "missing or invalid credentials", body = Error), (status = 404, description = "not found (or another tenant's)", body = Error))
)]
fn void_grant() {}

#[utoipa::path(get, path = "/v1/credits/balance", tag = "credits",
    security(("api_key" = [])),
    params(("customer_id" = String, Query, description = ""), ("credit_type" = String, Query, description = ""), ("resource_id" = Option<String>, Query, description = "")),
    responses((status = 200, description = "the real-time balance", body = Balance), (status = 400, description = "malformed request", body = Error), (status = 401, description = "missing or invalid credentials", body = Error), (status = 404, description = "not found (or another tenant's)", body = Error), (status = 422, description = "invalid value; `field` names it", body = Error))
)]
fn balance() {}

#[utoipa::path(post, path = "/v1/credits/check", tag = "credits",
    security(("api_key" = [])),
    request_body(content = CheckBody, content_type = "application/json"),
    responses((status = 200, description = "would it be allowed now", body = CheckReply), (status = 400, description = "malformed request", body = Error), (status = 401, description = "missing or invalid credentials", body = Error), (status = 404, description = "not found (or another tenant's)", body = Error), (status = 422, description = "invalid value; `field` names it", body = Error))
)]
fn check() {}

#[utoipa::path(put, path = "/v1/credits/limits", tag = "credits",
    security(("api_key" = [])),
    request_body(content = LimitBody, content_type = "application/json"),
    responses((status = 200, description = "the limit now in force for the pool", body = LimitReply), (status = 400, description = "malformed request", body = Error), (status = 401, description = "missing or invalid credentials", body = Error), (status = 404, description = "not found (or another tenant's)", body = Error), (status = 422, description = "invalid value; `field` names it", body = Error), (status = 503, description = "saturated or a dependency is down; see Retry-After", body = Error))
)]
fn set_pool_limit() {}

#[utoipa::path(get, path = "/v1/credits/ledger", tag = "credits",
    security(("api_key" = [])),
    params(("customer_id" = String, Query, description = ""), ("credit_type" = Option<String>, Query, description = ""), ("resource_id" = Option<String>, Query, description = "the pool's resource; omitted = the default pool"), ("type" = Option<String>, Query, description = "grant, consume, expire, void, adjust or deny"), ("from" = Option<String>, Query, description = "RFC 3339"), ("to" = Option<String>, Query, description = "RFC 3339"), ("limit" = Option<i64>, Query, description = "1-1000, default 50"), ("after" = Option<String>, Query, description = "cursor")),
    responses((status = 200, description = "newest first", body = LedgerPage), (status = 400, description = "malformed request", body = Error), (status = 401, description = "missing or invalid credentials", body = Error), (status = 422, description = "invalid value; `field` names it", body = Error))
)]
fn ledger() {}

#[utoipa::path(get, path = "/v1/credits/usage", tag = "credits",
    security(("api_key" = [])),
    params(("customer_id" = String, Query, description = ""), ("credit_type" = String, Query, description = ""), ("resource_id" = Option<String>, Query, description = ""), ("time_range" = Option<String>, Query, description = "LAST_DAY, LAST_WEEK, LAST_MONTH (default) or LAST_YEAR"), ("group_by" = Option<String>, Query, description = "feature (default) or user")),
    responses((status = 200, description = "credits consumed per bucket", body = UsageReply), (status = 400, description = "malformed request", body = Error), (status = 401, description = "missing or invalid credentials", body = Error), (status = 404, description = "not found (or another tenant's)", body = Error), (status = 422, description = "invalid value; `field` names it", body = Error))
)]
fn usage() {}

#[derive(ToSchema)]
pub struct NewEndpoint {
    /// http or https; private addresses only where the operator allows them.
    url: String,
    /// Event types to receive (all when absent).
    event_types: Option<Vec<String>>,
    description: Option<String>,
    idempotency_key: Option<String>,
}

#[derive(ToSchema)]
pub struct AlertBody {
    /// Absent at /defaults (the tenant default).
    customer_id: Option<String>,
    credit_type: String,
    resource_id: Option<String>,
    /// Percent of the granted total used, e.g. [80, 90, 100].
    usage_percent: Option<Vec<u32>>,
    /// Balance levels, decimal strings.
    balance_below: Option<Vec<String>>,
    grant_usage_percent: Option<Vec<u32>>,
}

#[utoipa::path(post, path = "/v1/webhooks/endpoints", tag = "webhooks",
    security(("api_key" = [])),
    request_body(content = NewEndpoint, content_type = "application/json"),
    responses((status = 201, description = "the endpoint with its secret (whsec_...)", body = Object), (status = 200, description = "the same idempotency key and body: the earlier result", body = Object), (status = 400, description = "malformed request", body = Error), (status = 401, description = "missing or invalid credentials", body = Error), (status = 409, description = "conflict", body = Error), (status = 422, description = "invalid value; `field` names it", body = Error), (status = 503, description = "saturated or a dependency is down; see Retry-After", body = Error))
)]
fn wh_create_endpoint() {}

#[utoipa::path(get, path = "/v1/webhooks/endpoints", tag = "webhooks",
    security(("api_key" = [])),
    params(("limit" = Option<i64>, Query, description = "1-1000, default 50"), ("after" = Option<String>, Query, description = "cursor")),
    responses((status = 200, description = "`{endpoints, next_cursor}`", body = Object), (status = 400, description = "malformed request", body = Error), (status = 401, description = "missing or invalid credentials", body = Error), (status = 422, description = "invalid value; `field` names it", body = Error), (status = 503, description = "saturated or a dependency is down; see Retry-After", body = Error))
)]
fn wh_list_endpoints() {}

#[utoipa::path(get, path = "/v1/webhooks/endpoints/{id}", tag = "webhooks",
    security(("api_key" = [])),
    params(("id" = String, Path, description = "the endpoint id")),
    responses((status = 200, description = "the endpoint", body = Object), (status = 401, description = "missing or invalid credentials", body = Error), (status = 404, description = "not found (or another tenant's)", body = Error), (status = 503, description = "saturated or a dependency is down; see Retry-After", body = Error))
)]
fn wh_get_endpoint() {}

#[utoipa::path(delete, path = "/v1/webhooks/endpoints/{id}", tag = "webhooks",
    security(("api_key" = [])),
    params(("id" = String, Path, description = "the endpoint id")),
    responses((status = 204, description = "deleted"), (status = 401, description = "missing or invalid credentials", body = Error), (status = 404, description = "not found (or another tenant's)", body = Error), (status = 503, description = "saturated or a dependency is down; see Retry-After", body = Error))
)]
fn wh_delete_endpoint() {}

#[utoipa::path(post, path = "/v1/webhooks/endpoints/{id}/rotate-secret", tag = "webhooks",
    security(("api_key" = [])),
    params(("id" = String, Path, description = "the endpoint id")),
    responses((status = 200, description = "the new secret; the old one still signs for 24 h", body = Object), (status = 401, description = "missing or invalid credentials", body = Error), (status = 404, description = "not found (or another tenant's)", body = Error), (status = 503, description = "saturated or a dependency is down; see Retry-After", body = Error))
)]
fn wh_rotate_secret() {}

#[utoipa::path(post, path = "/v1/webhooks/endpoints/{id}/enable", tag = "webhooks",
    security(("api_key" = [])),
    params(("id" = String, Path, description = "the endpoint id")),
    responses((status = 200, description = "enabled again", body = Object), (status = 401, description = "missing or invalid credentials", body = Error), (status = 404, description = "not found (or another tenant's)", body = Error), (status = 503, description = "saturated or a dependency is down; see Retry-After", body = Error))
)]
fn wh_enable_endpoint() {}

#[utoipa::path(get, path = "/v1/webhooks/messages", tag = "webhooks",
    security(("api_key" = [])),
    params(("endpoint_id" = Option<String>, Query, description = ""), ("status" = Option<String>, Query, description = "pending, delivered or failed"), ("type" = Option<String>, Query, description = "event type"), ("limit" = Option<i64>, Query, description = "1-1000, default 50"), ("after" = Option<String>, Query, description = "cursor")),
    responses((status = 200, description = "the delivery log with attempts", body = Object), (status = 400, description = "malformed request", body = Error), (status = 401, description = "missing or invalid credentials", body = Error), (status = 422, description = "invalid value; `field` names it", body = Error), (status = 503, description = "saturated or a dependency is down; see Retry-After", body = Error))
)]
fn wh_list_messages() {}

#[utoipa::path(post, path = "/v1/webhooks/messages/{id}/retry", tag = "webhooks",
    security(("api_key" = [])),
    params(("id" = String, Path, description = "the message id"), ("endpoint_id" = Option<String>, Query, description = "only this endpoint's delivery")),
    responses((status = 202, description = "queued for delivery again", body = Object), (status = 400, description = "malformed request", body = Error), (status = 401, description = "missing or invalid credentials", body = Error), (status = 404, description = "not found (or another tenant's)", body = Error), (status = 422, description = "invalid value; `field` names it", body = Error), (status = 503, description = "saturated or a dependency is down; see Retry-After", body = Error))
)]
fn wh_retry_message() {}

#[utoipa::path(put, path = "/v1/credits/alerts", tag = "alerts",
    security(("api_key" = [])),
    request_body(content = AlertBody, content_type = "application/json"),
    responses((status = 200, description = "the thresholds now in force for the pool", body = Object), (status = 400, description = "malformed request", body = Error), (status = 401, description = "missing or invalid credentials", body = Error), (status = 404, description = "not found (or another tenant's)", body = Error), (status = 422, description = "invalid value; `field` names it", body = Error), (status = 503, description = "saturated or a dependency is down; see Retry-After", body = Error))
)]
fn wh_put_alerts() {}

#[utoipa::path(get, path = "/v1/credits/alerts", tag = "alerts",
    security(("api_key" = [])),
    params(("customer_id" = String, Query, description = ""), ("credit_type" = String, Query, description = ""), ("resource_id" = Option<String>, Query, description = "")),
    responses((status = 200, description = "the thresholds in force (the pool's or the tenant default)", body = Object), (status = 400, description = "malformed request", body = Error), (status = 401, description = "missing or invalid credentials", body = Error), (status = 404, description = "not found (or another tenant's)", body = Error), (status = 422, description = "invalid value; `field` names it", body = Error), (status = 503, description = "saturated or a dependency is down; see Retry-After", body = Error))
)]
fn wh_get_alerts() {}

#[utoipa::path(put, path = "/v1/credits/alerts/defaults", tag = "alerts",
    security(("api_key" = [])),
    request_body(content = AlertBody, content_type = "application/json"),
    responses((status = 200, description = "the tenant default for the credit type", body = Object), (status = 400, description = "malformed request", body = Error), (status = 401, description = "missing or invalid credentials", body = Error), (status = 404, description = "not found (or another tenant's)", body = Error), (status = 422, description = "invalid value; `field` names it", body = Error), (status = 503, description = "saturated or a dependency is down; see Retry-After", body = Error))
)]
fn wh_put_alert_defaults() {}

#[utoipa::path(delete, path = "/v1/credits/alerts/defaults/{credit_type}", tag = "alerts",
    security(("api_key" = [])),
    params(("credit_type" = String, Path, description = "")),
    responses((status = 204, description = "removed"), (status = 401, description = "missing or invalid credentials", body = Error), (status = 404, description = "not found (or another tenant's)", body = Error), (status = 422, description = "invalid value; `field` names it", body = Error), (status = 503, description = "saturated or a dependency is down; see Retry-After", body = Error))
)]
fn wh_delete_alert_defaults() {}

// Billing (issue 8): bodies described loosely until their schemas are typed.
#[utoipa::path(put, path = "/v1/settings/payments", tag = "billing",
    security(("api_key" = [])),
    request_body(content = Object, content_type = "application/json"),
    responses((status = 200, description = "`{charge_url, secret}`", body = Object), (status = 400, description = "malformed request", body = Error), (status = 401, description = "missing or invalid credentials", body = Error), (status = 422, description = "invalid value; `field` names it", body = Error), (status = 503, description = "saturated or a dependency is down; see Retry-After", body = Error))
)]
fn b_put_payments() {}

#[utoipa::path(get, path = "/v1/settings/payments", tag = "billing",
    security(("api_key" = [])),
    responses((status = 200, description = "the payment settings", body = Object), (status = 401, description = "missing or invalid credentials", body = Error), (status = 404, description = "not found (or another tenant's)", body = Error), (status = 503, description = "saturated or a dependency is down; see Retry-After", body = Error))
)]
fn b_get_payments() {}

#[utoipa::path(put, path = "/v1/credit-types/{id}/top-up", tag = "billing",
    security(("api_key" = [])),
    params(("id" = String, Path, description = "the credit type")),
    request_body(content = Object, content_type = "application/json"),
    responses((status = 200, description = "the top-up settings", body = Object), (status = 400, description = "malformed request", body = Error), (status = 401, description = "missing or invalid credentials", body = Error), (status = 404, description = "not found (or another tenant's)", body = Error), (status = 422, description = "invalid value; `field` names it", body = Error), (status = 503, description = "saturated or a dependency is down; see Retry-After", body = Error))
)]
fn b_put_topup() {}

#[utoipa::path(get, path = "/v1/credit-types/{id}/top-up", tag = "billing",
    security(("api_key" = [])),
    params(("id" = String, Path, description = "the credit type")),
    responses((status = 200, description = "the top-up settings", body = Object), (status = 401, description = "missing or invalid credentials", body = Error), (status = 404, description = "not found (or another tenant's)", body = Error), (status = 422, description = "invalid value; `field` names it", body = Error), (status = 503, description = "saturated or a dependency is down; see Retry-After", body = Error))
)]
fn b_get_topup() {}

#[utoipa::path(post, path = "/v1/credits/top-ups", tag = "billing",
    security(("api_key" = [])),
    request_body(content = Object, content_type = "application/json"),
    responses((status = 201, description = "`{grant}` after the charge succeeded", body = Object), (status = 200, description = "the same idempotency key: the earlier result", body = Object), (status = 400, description = "malformed request", body = Error), (status = 401, description = "missing or invalid credentials", body = Error), (status = 402, description = "the payment was declined; nothing granted", body = Error), (status = 404, description = "not found (or another tenant's)", body = Error), (status = 409, description = "conflict", body = Error), (status = 422, description = "invalid value; `field` names it", body = Error), (status = 503, description = "saturated or a dependency is down; see Retry-After", body = Error))
)]
fn b_post_topup() {}

#[utoipa::path(put, path = "/v1/credits/auto-recharge", tag = "billing",
    security(("api_key" = [])),
    request_body(content = Object, content_type = "application/json"),
    responses((status = 200, description = "the settings", body = Object), (status = 400, description = "malformed request", body = Error), (status = 401, description = "missing or invalid credentials", body = Error), (status = 404, description = "not found (or another tenant's)", body = Error), (status = 422, description = "invalid value; `field` names it", body = Error), (status = 503, description = "saturated or a dependency is down; see Retry-After", body = Error))
)]
fn b_put_recharge() {}

#[utoipa::path(get, path = "/v1/credits/auto-recharge", tag = "billing",
    security(("api_key" = [])),
    params(("customer_id" = String, Query, description = ""), ("credit_type" = String, Query, description = "")),
    responses((status = 200, description = "settings plus spent_this_period, period_resets_at, paused, paused_reason", body = Object), (status = 400, description = "malformed request", body = Error), (status = 401, description = "missing or invalid credentials", body = Error), (status = 404, description = "not found (or another tenant's)", body = Error), (status = 422, description = "invalid value; `field` names it", body = Error), (status = 503, description = "saturated or a dependency is down; see Retry-After", body = Error))
)]
fn b_get_recharge() {}

#[utoipa::path(put, path = "/v1/plans/{id}", tag = "billing",
    security(("api_key" = [])),
    params(("id" = String, Path, description = "the plan id")),
    request_body(content = Object, content_type = "application/json"),
    responses((status = 200, description = "the plan", body = Object), (status = 201, description = "the plan", body = Object), (status = 400, description = "malformed request", body = Error), (status = 401, description = "missing or invalid credentials", body = Error), (status = 422, description = "invalid value; `field` names it", body = Error), (status = 503, description = "saturated or a dependency is down; see Retry-After", body = Error))
)]
fn b_put_plan() {}

#[utoipa::path(get, path = "/v1/plans/{id}", tag = "billing",
    security(("api_key" = [])),
    params(("id" = String, Path, description = "the plan id")),
    responses((status = 200, description = "the plan", body = Object), (status = 401, description = "missing or invalid credentials", body = Error), (status = 404, description = "not found (or another tenant's)", body = Error), (status = 422, description = "invalid value; `field` names it", body = Error), (status = 503, description = "saturated or a dependency is down; see Retry-After", body = Error))
)]
fn b_get_plan() {}

#[utoipa::path(put, path = "/v1/addons/{id}", tag = "billing",
    security(("api_key" = [])),
    params(("id" = String, Path, description = "the add-on id")),
    request_body(content = Object, content_type = "application/json"),
    responses((status = 200, description = "the add-on", body = Object), (status = 201, description = "the add-on", body = Object), (status = 400, description = "malformed request", body = Error), (status = 401, description = "missing or invalid credentials", body = Error), (status = 422, description = "invalid value; `field` names it", body = Error), (status = 503, description = "saturated or a dependency is down; see Retry-After", body = Error))
)]
fn b_put_addon() {}

#[utoipa::path(get, path = "/v1/addons/{id}", tag = "billing",
    security(("api_key" = [])),
    params(("id" = String, Path, description = "the add-on id")),
    responses((status = 200, description = "the add-on", body = Object), (status = 401, description = "missing or invalid credentials", body = Error), (status = 404, description = "not found (or another tenant's)", body = Error), (status = 422, description = "invalid value; `field` names it", body = Error), (status = 503, description = "saturated or a dependency is down; see Retry-After", body = Error))
)]
fn b_get_addon() {}

#[utoipa::path(put, path = "/v1/subscriptions/{customer_id}", tag = "billing",
    security(("api_key" = [])),
    params(("customer_id" = String, Path, description = "")),
    request_body(content = Object, content_type = "application/json"),
    responses((status = 200, description = "the subscription and its current grants", body = Object), (status = 201, description = "the subscription and its current grants", body = Object), (status = 400, description = "malformed request", body = Error), (status = 401, description = "missing or invalid credentials", body = Error), (status = 404, description = "not found (or another tenant's)", body = Error), (status = 409, description = "conflict", body = Error), (status = 422, description = "invalid value; `field` names it", body = Error), (status = 503, description = "saturated or a dependency is down; see Retry-After", body = Error))
)]
fn b_put_subscription() {}

#[utoipa::path(get, path = "/v1/subscriptions/{customer_id}", tag = "billing",
    security(("api_key" = [])),
    params(("customer_id" = String, Path, description = "")),
    responses((status = 200, description = "the subscription", body = Object), (status = 401, description = "missing or invalid credentials", body = Error), (status = 404, description = "not found (or another tenant's)", body = Error), (status = 422, description = "invalid value; `field` names it", body = Error), (status = 503, description = "saturated or a dependency is down; see Retry-After", body = Error))
)]
fn b_get_subscription() {}

struct Security;

impl Modify for Security {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let c = openapi.components.get_or_insert_with(Default::default);
        for name in ["api_key", "operator"] {
            c.add_security_scheme(
                name,
                SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
            );
        }
    }
}

#[derive(OpenApi)]
#[openapi(
    info(title = "Credits pipeline API", version = "1", description = "Usage events, prepaid credit pools, ledger."),
    paths(b_put_payments, b_get_payments, b_put_topup, b_get_topup, b_post_topup, b_put_recharge, b_get_recharge, b_put_plan, b_get_plan, b_put_addon, b_get_addon, b_put_subscription, b_get_subscription, wh_create_endpoint, wh_list_endpoints, wh_get_endpoint, wh_delete_endpoint, wh_rotate_secret, wh_enable_endpoint, wh_list_messages, wh_retry_message, wh_put_alerts, wh_get_alerts, wh_put_alert_defaults, wh_delete_alert_defaults, create_tenant, create_key, revoke_key, set_tenant_limits, create_credit_type, list_credit_types, put_mapping, get_mapping, post_events, get_event, create_grant, list_grants, void_grant, balance, check, set_pool_limit, ledger, usage),
    modifiers(&Security)
)]
pub struct ApiDoc;

/// The document, built once.
pub fn json() -> &'static str {
    static DOC: std::sync::LazyLock<String> =
        std::sync::LazyLock::new(|| ApiDoc::openapi().to_json().unwrap_or_else(|_| "{}".to_owned()));
    &DOC
}

pub async fn serve() -> impl axum::response::IntoResponse {
    ([(axum::http::header::CONTENT_TYPE, "application/json")], json())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The route templates registered in the router (and by the modules that add routes).
    fn routes() -> Vec<(String, String)> {
        let mut out = Vec::new();
        for src in [
            include_str!("lib.rs"),
            include_str!("webhooks.rs"),
            include_str!("billing/mod.rs"),
        ] {
            let flat: String = src.split_whitespace().collect::<Vec<_>>().join(" ");
            for part in flat.split(".route(").skip(1) {
                let Some(path) = part.split('"').nth(1) else { continue };
                let rest = part.split_once(',').map_or("", |x| x.1);
                // The handlers chained on this route: get(...).post(...) ...
                let mut depth = 0i32;
                let mut end = rest.len();
                for (i, ch) in rest.char_indices() {
                    match ch {
                        '(' => depth += 1,
                        ')' if depth == 0 => {
                            end = i;
                            break;
                        }
                        ')' => depth -= 1,
                        _ => {}
                    }
                }
                for m in ["get", "post", "put", "delete", "patch"] {
                    let r = &rest[..end];
                    if r.trim_start().starts_with(&format!("{m}("))
                        || r.contains(&format!(".{m}("))
                        || r.contains(&format!("::{m}("))
                    {
                        out.push((m.to_owned(), path.to_owned()));
                    }
                }
            }
        }
        out
    }

    #[test]
    fn every_route_is_documented() {
        let doc: Value = serde_json::from_str(json()).unwrap();
        let routes = routes();
        assert!(routes.len() >= 18, "{routes:?}");
        let mut missing = Vec::new();
        for (m, p) in routes {
            if ["/healthz", "/readyz", "/openapi.json"].contains(&p.as_str()) {
                continue;
            }
            if doc["paths"][&p][&m].is_null() {
                missing.push(format!("{} {p}", m.to_uppercase()));
            }
        }
        assert!(missing.is_empty(), "routes missing from /openapi.json: {missing:?}");
    }

    #[test]
    fn the_document_names_its_schemas_and_security() {
        let doc: Value = serde_json::from_str(json()).unwrap();
        assert_eq!(doc["openapi"].as_str().map(|v| v.starts_with("3.")), Some(true));
        assert!(doc["components"]["schemas"]["Error"].is_object());
        assert!(doc["components"]["securitySchemes"]["api_key"].is_object());
        let post = &doc["paths"]["/v1/events"]["post"];
        assert!(post["responses"]["429"].is_object() && post["responses"]["202"].is_object());
    }
}
