//! The event path: `POST /v1/events` (one or a batch of up to 1000; all valid or none
//! accepted; 202 once every one is acked by Kafka). Validate, authenticate, rate-limit,
//! produce: nothing here writes Postgres, and the one read it makes (an API key missing from
//! the cache, in `auth`) goes through its own small pool (`Pools::event`), so no control or
//! query load can queue an event behind it. An event's status is the query plane's
//! (`query::events`).

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use shared::model::{InputMsg, UsageEvent};
use utoipa::ToSchema;

use crate::auth::Tenant;
use crate::error::replies::{BadRequest, Unauthorized, Unavailable};
use crate::error::{parse_json, ApiError, ApiResult, ErrorReply, EventError};
use crate::metric as m;
use crate::produce::produce;
use crate::validate;
use crate::AppState;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

pub const MAX_BATCH: usize = 1000;
const FIELDS: [&str; 6] = [
    "customer_id",
    "event_name",
    "idempotency_key",
    "timestamp",
    "resource_id",
    "dimensions",
];

/// Validate one event; `now` bounds its timestamp.
#[allow(clippy::result_large_err)] // the cold path of a refused event
fn event(tenant: &str, v: &Value, now: DateTime<Utc>, window_s: u64) -> Result<UsageEvent, (String, ApiError)> {
    let err = |f: &str, e: ApiError| (f.to_owned(), e);
    let Value::Object(o) = v else {
        return Err(err(
            "",
            ApiError::invalid("", "invalid_event", "an event is a JSON object"),
        ));
    };
    if let Some(k) = o.keys().find(|k| !FIELDS.contains(&k.as_str())) {
        return Err(err(
            k,
            ApiError::invalid(k, "unknown_field", format!("unknown field {k}")),
        ));
    }
    #[allow(clippy::result_large_err)]
    let text = |f: &str, required: bool| -> Result<Option<String>, (String, ApiError)> {
        match o.get(f) {
            None | Some(Value::Null) if !required => Ok(None),
            None | Some(Value::Null) => Err(err(f, ApiError::invalid(f, "required", format!("{f} is required")))),
            Some(Value::String(s)) => {
                validate::id(f, s).map_err(|e| err(f, e))?;
                Ok(Some(s.clone()))
            }
            Some(_) => Err(err(f, ApiError::invalid(f, "invalid_id", "must be a string"))),
        }
    };
    let customer_id = text("customer_id", true)?.unwrap_or_default();
    let event_name = text("event_name", true)?.unwrap_or_default();
    let idempotency_key = text("idempotency_key", true)?.unwrap_or_default();
    let resource_id = text("resource_id", false)?.unwrap_or_default();
    let timestamp = match o.get("timestamp") {
        None | Some(Value::Null) => now,
        Some(t) => {
            let ts = validate::timestamp("timestamp", t).map_err(|e| err("timestamp", e))?;
            let oldest = now - chrono::Duration::seconds(window_s as i64);
            if ts < oldest || ts > now + chrono::Duration::minutes(5) {
                return Err(err(
                    "timestamp",
                    ApiError::invalid(
                        "timestamp",
                        "timestamp_out_of_range",
                        format!("must lie within the last {window_s} s and at most 5 minutes ahead"),
                    ),
                ));
            }
            ts
        }
    };
    let dimensions = match o.get("dimensions") {
        None | Some(Value::Null) => serde_json::Map::new(),
        Some(d) => validate::dimensions("dimensions", d).map_err(|e| err("dimensions", e))?,
    };
    Ok(UsageEvent {
        tenant_id: tenant.to_owned(),
        event_uid: uuid::Uuid::now_v7(),
        customer_id,
        resource_id,
        event_name,
        idempotency_key,
        timestamp,
        dimensions,
        accepted_at: now,
    })
}

/// Every event valid, or a 422 listing each bad one.
pub fn validate_body(tenant: &str, body: &Value, now: DateTime<Utc>, window_s: u64) -> ApiResult<Vec<UsageEvent>> {
    let (items, batched): (Vec<&Value>, bool) = match body {
        Value::Object(o) if o.contains_key("events") => match &o["events"] {
            Value::Array(a) => (a.iter().collect(), true),
            _ => return Err(ApiError::invalid("events", "invalid_events", "events must be an array")),
        },
        Value::Object(_) => (vec![body], false),
        _ => {
            return Err(ApiError::invalid(
                "",
                "invalid_body",
                "send one event object or {\"events\": [...]}",
            ))
        }
    };
    if items.is_empty() {
        return Err(ApiError::invalid(
            "events",
            "empty_batch",
            "at least one event is required",
        ));
    }
    if items.len() > MAX_BATCH {
        return Err(ApiError::invalid(
            "events",
            "too_many_events",
            format!("at most {MAX_BATCH} events per request"),
        ));
    }
    let mut ok = Vec::with_capacity(items.len());
    let mut errors = Vec::new();
    for (i, v) in items.into_iter().enumerate() {
        match event(tenant, v, now, window_s) {
            Ok(e) => ok.push(e),
            Err((f, e)) => {
                let field = match (batched, f.is_empty()) {
                    (true, true) => format!("events[{i}]"),
                    (true, false) => format!("events[{i}].{}", e.body.field.clone().unwrap_or(f)),
                    (false, _) => e.body.field.clone().unwrap_or(f),
                };
                errors.push(EventError {
                    index: i,
                    code: e.body.code,
                    message: e.body.message,
                    field,
                });
            }
        }
    }
    if errors.is_empty() {
        return Ok(ok);
    }
    let first = errors[0].clone();
    let mut e = ApiError::invalid(
        &first.field,
        &first.code,
        format!("{} invalid event(s); none accepted: {}", errors.len(), first.message),
    );
    e.errors = errors;
    Err(e)
}

/// One usage event (the body of `POST /v1/events`, alone or in a batch). The handler checks
/// the raw JSON itself (every bad event of a batch is named), so this type only describes it.
#[derive(Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Event {
    customer_id: String,
    event_name: String,
    idempotency_key: String,
    /// RFC 3339; within the dedupe window and at most 5 minutes ahead. Default now.
    #[schema(value_type = Option<String>, format = DateTime)]
    timestamp: Option<String>,
    resource_id: Option<String>,
    /// A flat object of strings and numbers.
    #[schema(value_type = Option<std::collections::HashMap<String, serde_json::Value>>)]
    dimensions: Option<Value>,
}

/// One event, or `{"events": [...]}` with at most 1000.
#[derive(Serialize, ToSchema)]
#[serde(untagged)]
pub enum EventsBody {
    One(Event),
    Many(Batch),
}

#[derive(Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Batch {
    events: Vec<Event>,
}

#[derive(Serialize, ToSchema)]
pub struct Accepted {
    /// How many events were accepted (all of them).
    accepted: usize,
}

#[utoipa::path(post, path = "/v1/events", tag = "events",
    security(("api_key" = [])),
    request_body(content = EventsBody, content_type = "application/json"),
    responses((status = 202, description = "every event is durable in Kafka", body = Accepted), BadRequest, Unauthorized, (status = 413, description = "body over 5 MB", body = ErrorReply), (status = 422, description = "invalid value; `field` names it, `errors` each bad event of the batch", body = ErrorReply), (status = 429, description = "over the tenant's rate; see Retry-After", body = ErrorReply), Unavailable)
)]
pub async fn post_events(
    t: Tenant,
    State(s): State<Arc<AppState>>,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> ApiResult<(StatusCode, Json<Accepted>)> {
    let body = body.map_err(crate::error::bytes_rejection)?;
    let v: Value = parse_json(&body)?;
    let events = validate_body(&t.id, &v, Utc::now(), s.config.dedupe_window_s).inspect_err(|e| {
        metrics::counter!(m::EVENTS_REJECTED, "reason" => "invalid").increment(e.errors.len().max(1) as u64);
    })?;
    let n = events.len();
    if let crate::limit::Verdict::Refused(wait) = s.limiter.check(&t, n).await {
        metrics::counter!(m::RATE_LIMITED).increment(1);
        metrics::counter!(m::EVENTS_REJECTED, "reason" => "rate_limited").increment(n as u64);
        let mut e = ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            match wait {
                Some(_) => format!("over the tenant's limit of {} events/s", t.events_per_second),
                None => format!(
                    "{n} events in one request exceed the tenant's limit of {} events/s: send smaller batches",
                    t.events_per_second
                ),
            },
        );
        e.retry_after = Some(wait.unwrap_or(1));
        return Err(e);
    }
    produce(&s, events.into_iter().map(InputMsg::Usage))
        .await
        .inspect_err(|_| {
            metrics::counter!(m::EVENTS_REJECTED, "reason" => "saturated").increment(n as u64);
        })?;
    metrics::counter!(m::EVENTS_ACCEPTED).increment(n as u64);
    Ok((StatusCode::ACCEPTED, Json(Accepted { accepted: n })))
}

/// The event path's route, with its OpenAPI operation.
pub fn routes() -> OpenApiRouter<Arc<AppState>> {
    OpenApiRouter::new().routes(routes!(post_events))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn now() -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000, 0).unwrap()
    }

    #[test]
    fn one_or_a_batch() {
        let one = json!({"customer_id": "c", "event_name": "e", "idempotency_key": "k"});
        assert_eq!(validate_body("t", &one, now(), 86400).unwrap().len(), 1);
        let batch = json!({"events": [one.clone(), one]});
        assert_eq!(validate_body("t", &batch, now(), 86400).unwrap().len(), 2);
    }

    #[test]
    fn every_bad_event_is_named_and_none_accepted() {
        let good = json!({"customer_id": "c", "event_name": "e", "idempotency_key": "k"});
        let bad_id = json!({"customer_id": "c c", "event_name": "e", "idempotency_key": "k"});
        let old =
            json!({"customer_id": "c", "event_name": "e", "idempotency_key": "k", "timestamp": "2020-01-01T00:00:00Z"});
        let nested =
            json!({"customer_id": "c", "event_name": "e", "idempotency_key": "k", "dimensions": {"a": {"b": 1}}});
        let e = validate_body("t", &json!({"events": [good, bad_id, old, nested]}), now(), 86400).unwrap_err();
        assert_eq!(e.status, StatusCode::UNPROCESSABLE_ENTITY);
        let fields: Vec<_> = e
            .errors
            .iter()
            .map(|x| (x.index, x.field.as_str(), x.code.as_str()))
            .collect();
        assert_eq!(
            fields,
            vec![
                (1, "events[1].customer_id", "invalid_id"),
                (2, "events[2].timestamp", "timestamp_out_of_range"),
                (3, "events[3].dimensions.a", "invalid_dimension"),
            ]
        );
    }

    #[test]
    fn batch_limits() {
        let one = json!({"customer_id": "c", "event_name": "e", "idempotency_key": "k"});
        let many = json!({"events": vec![one; MAX_BATCH + 1]});
        assert_eq!(
            validate_body("t", &many, now(), 86400).unwrap_err().body.code,
            "too_many_events"
        );
        assert_eq!(
            validate_body("t", &json!({"events": []}), now(), 86400)
                .unwrap_err()
                .body
                .code,
            "empty_batch"
        );
        assert_eq!(
            validate_body("t", &json!([1]), now(), 86400).unwrap_err().body.code,
            "invalid_body"
        );
    }
}
