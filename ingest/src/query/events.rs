//! `GET /v1/events/{idempotency_key}`: an event's status, and its ledger entries once settled.

use crate::auth::Tenant;
use crate::error::replies::{BadRequest, Invalid, NotFound, Unauthorized};
use crate::error::{ApiError, ApiResult, Q};
use crate::query::ledger::{LedgerEntry, LEDGER_COLS};
use crate::validate;
use crate::AppState;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::sync::Arc;
use utoipa::{IntoParams, ToSchema};

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct EventQuery {
    /// Lets an in-flight event answer `pending`.
    customer_id: Option<String>,
}

/// The event as it was accepted.
#[derive(Serialize, ToSchema)]
pub struct SettledEvent {
    customer_id: String,
    resource_id: Option<String>,
    event_name: String,
    timestamp: DateTime<Utc>,
    #[schema(value_type = std::collections::HashMap<String, serde_json::Value>)]
    dimensions: Value,
}

/// An event's fate. `pending` carries status, idempotency_key and duplicates only;
/// `dead_lettered` adds reason and dead_lettered_at; a settled event (settled, denied,
/// unpriced) has every field but dead_lettered_at (reason, credit_type and cost may be null).
#[derive(Serialize, ToSchema)]
pub struct EventStatus {
    /// pending, settled, denied, unpriced or dead_lettered.
    status: String,
    idempotency_key: String,
    /// Repeats of the idempotency key that were dropped.
    duplicates: i64,
    /// Why it was denied, unpriced or dead-lettered.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    reason: Option<Option<String>>,
    /// When a consumer dead-lettered it (status dead_lettered).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    dead_lettered_at: Option<DateTime<Utc>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    event: Option<SettledEvent>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    credit_type: Option<Option<String>>,
    /// A decimal string.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    cost: Option<Option<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    accepted_at: Option<DateTime<Utc>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    settled_at: Option<DateTime<Utc>>,
    /// Its consume or deny entries.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    ledger_entries: Option<Vec<LedgerEntry>>,
}

impl EventStatus {
    fn bare(status: &str, key: String, duplicates: i64) -> Self {
        Self {
            status: status.to_owned(),
            idempotency_key: key,
            duplicates,
            reason: None,
            dead_lettered_at: None,
            event: None,
            credit_type: None,
            cost: None,
            accepted_at: None,
            settled_at: None,
            ledger_entries: None,
        }
    }
}

type EventRow = (
    String,
    String,
    String,
    DateTime<Utc>,
    Value,
    String,
    Option<String>,
    Option<String>,
    Option<Decimal>,
    DateTime<Utc>,
    DateTime<Utc>,
);

#[utoipa::path(get, path = "/v1/events/{idempotency_key}", tag = "events",
    security(("api_key" = [])),
    params(("idempotency_key" = String, Path, description = "the event's idempotency key"), EventQuery),
    responses((status = 200, description = "the event's fate", body = EventStatus), BadRequest, Unauthorized, NotFound, Invalid)
)]
pub async fn get_event(
    t: Tenant,
    State(s): State<Arc<AppState>>,
    Path(key): Path<String>,
    Q(q): Q<EventQuery>,
) -> ApiResult<Json<EventStatus>> {
    validate::id("idempotency_key", &key)?;
    let row: Option<EventRow> = sqlx::query_as(
        "SELECT customer_id, resource_id, event_name, ts, dimensions, status, reason, credit_type, cost, accepted_at, settled_at
         FROM usage_events WHERE tenant_id = $1 AND idempotency_key = $2",
    )
    .bind(&t.id)
    .bind(&key)
    .fetch_optional(&s.pg.query)
    .await?;
    let duplicates: i64 =
        sqlx::query_scalar("SELECT count(*) FROM duplicate_events WHERE tenant_id = $1 AND idempotency_key = $2")
            .bind(&t.id)
            .bind(&key)
            .fetch_one(&s.pg.query)
            .await?;
    let Some((
        customer_id,
        resource_id,
        event_name,
        ts,
        dims,
        status,
        reason,
        credit_type,
        cost,
        accepted_at,
        settled_at,
    )) = row
    else {
        // Not settled. Dead-lettered by a consumer (guarantee 7): a terminal status with its reason.
        let dead: Option<(String, DateTime<Utc>)> = sqlx::query_as(
            "SELECT reason, dead_lettered_at FROM dead_letters WHERE tenant_id = $1 AND idempotency_key = $2
             ORDER BY dead_lettered_at DESC LIMIT 1",
        )
        .bind(&t.id)
        .bind(&key)
        .fetch_optional(&s.pg.query)
        .await?;
        if let Some((reason, at)) = dead {
            return Ok(Json(EventStatus {
                reason: Some(Some(reason)),
                dead_lettered_at: Some(at),
                ..EventStatus::bare("dead_lettered", key, duplicates)
            }));
        }
        // With the customer we can tell whether the rater has seen it.
        if let Some(c) = q.customer_id.filter(|c| validate::id_ok(c)) {
            // Ask every set a mark made within the window may be in (one pipelined round trip).
            let member = shared::keys::dedupe_member(&key);
            let now = Utc::now().timestamp_millis();
            let mut pipe = redis::pipe();
            for set in s.keys.dedupe_sets(&t.id, &c, now, s.config.dedupe_window_s) {
                pipe.cmd("SISMEMBER").arg(set).arg(&member[..]);
            }
            let mut con = s.redis.clone();
            let found: Vec<bool> = pipe.query_async(&mut con).await?;
            if found.into_iter().any(|x| x) {
                return Ok(Json(EventStatus::bare("pending", key, duplicates)));
            }
        }
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            "no settled event has this idempotency key (it may still be in flight: pass customer_id to check)",
        ));
    };
    let entries: Vec<LedgerEntry> = sqlx::query_as(&format!(
        "SELECT {LEDGER_COLS} FROM ledger_entries WHERE tenant_id = $1 AND source_id = $2 AND type IN ('consume', 'deny')
         ORDER BY ledger_entries.id"
    ))
    .bind(&t.id)
    .bind(&key)
    .fetch_all(&s.pg.query)
    .await?;
    Ok(Json(EventStatus {
        reason: Some(reason),
        event: Some(SettledEvent {
            customer_id,
            resource_id: if resource_id.is_empty() {
                None
            } else {
                Some(resource_id)
            },
            event_name,
            timestamp: ts,
            dimensions: dims,
        }),
        credit_type: Some(credit_type),
        cost: Some(cost.map(|c| c.normalize().to_string())),
        accepted_at: Some(accepted_at),
        settled_at: Some(settled_at),
        ledger_entries: Some(entries),
        ..EventStatus::bare(&status, key, duplicates)
    }))
}
