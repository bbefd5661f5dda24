//! The one place API errors become HTTP responses:
//! `{"error": {"code": "...", "message": "...", "field": "..."}}`. Internals never leak: a
//! storage failure is logged and answered 503 (retry), never with its text.

use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;
use serde::Serialize;
use utoipa::ToSchema;

/// What went wrong.
#[derive(Debug, Clone, Serialize, PartialEq, ToSchema)]
pub struct ErrorBody {
    /// snake_case, stable.
    pub code: String,
    pub message: String,
    /// The path of the offending field, when one is to blame (absent otherwise).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub field: Option<String>,
}

/// One failed event of a batch.
#[derive(Debug, Clone, Serialize, PartialEq, ToSchema)]
pub struct EventError {
    /// The event's index in the batch (0 for a single event).
    pub index: usize,
    pub code: String,
    pub message: String,
    pub field: String,
}

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub body: ErrorBody,
    pub retry_after: Option<u64>,
    pub errors: Vec<EventError>,
}

pub type ApiResult<T> = Result<T, ApiError>;

impl ApiError {
    pub fn new(status: StatusCode, code: &str, message: impl Into<String>) -> Self {
        Self {
            status,
            body: ErrorBody {
                code: code.to_owned(),
                message: message.into(),
                field: None,
            },
            retry_after: None,
            errors: Vec::new(),
        }
    }
    pub fn field(mut self, f: impl Into<String>) -> Self {
        self.body.field = Some(f.into());
        self
    }
    pub fn invalid(field: &str, code: &str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, code, message).field(field)
    }
    pub fn not_found(what: &str) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", format!("{what} not found"))
    }
    pub fn unauthorized() -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", "missing or invalid API key")
    }
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "conflict", message)
    }
    pub fn unavailable(code: &str, message: &str, retry_after: u64) -> Self {
        let mut e = Self::new(StatusCode::SERVICE_UNAVAILABLE, code, message);
        e.retry_after = Some(retry_after);
        e
    }
    /// A dependency failed: log the cause, answer 503 without it.
    pub fn internal(cause: impl std::fmt::Display) -> Self {
        tracing::error!(error = %cause, "dependency failure");
        Self::unavailable("temporarily_unavailable", "a dependency is unavailable, retry later", 1)
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        ApiError::internal(e)
    }
}

impl From<redis::RedisError> for ApiError {
    fn from(e: redis::RedisError) -> Self {
        ApiError::internal(e)
    }
}

/// Every error reply: `{"error": {code, message, field?}}`; a refused batch of events also
/// lists every bad event in `errors` (none was accepted).
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = Error)]
pub struct ErrorReply {
    pub error: ErrorBody,
    /// Only on a refused batch of events (422): each bad event.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    #[schema(required = false)]
    pub errors: Vec<EventError>,
}

/// The error replies most operations share, one type per status, for the `responses(...)` of
/// `#[utoipa::path]`: each status's description is written once, here.
pub mod replies {
    use super::ErrorReply;

    /// 400.
    #[derive(utoipa::IntoResponses)]
    #[response(status = 400, description = "malformed request")]
    pub struct BadRequest(pub ErrorReply);

    /// 401.
    #[derive(utoipa::IntoResponses)]
    #[response(status = 401, description = "missing or invalid credentials")]
    pub struct Unauthorized(pub ErrorReply);

    /// 404.
    #[derive(utoipa::IntoResponses)]
    #[response(status = 404, description = "not found (or another tenant's)")]
    pub struct NotFound(pub ErrorReply);

    /// 409.
    #[derive(utoipa::IntoResponses)]
    #[response(status = 409, description = "conflict")]
    pub struct Conflict(pub ErrorReply);

    /// 422.
    #[derive(utoipa::IntoResponses)]
    #[response(status = 422, description = "invalid value; `field` names it")]
    pub struct Invalid(pub ErrorReply);

    /// 503.
    #[derive(utoipa::IntoResponses)]
    #[response(status = 503, description = "saturated or a dependency is down; see Retry-After")]
    pub struct Unavailable(pub ErrorReply);
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (
            self.status,
            axum::Json(ErrorReply {
                error: self.body,
                errors: self.errors,
            }),
        )
            .into_response();
        if let Some(s) = self.retry_after {
            r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        r
    }
}

/// Parse a JSON body, naming the field that is wrong: syntax errors are 400, wrong types or
/// values 422, an over-large body 413. Text Postgres cannot store (U+0000) and numbers it cannot
/// hold are refused here, for every endpoint, so they never reach a topic (guarantee 7).
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> ApiResult<T> {
    unstorable(bytes)?;
    if bytes.is_empty() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "empty_body",
            "a JSON body is required",
        ));
    }
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let (status, code) = match inner.classify() {
            serde_json::error::Category::Data => (StatusCode::UNPROCESSABLE_ENTITY, "invalid_value"),
            _ => (StatusCode::BAD_REQUEST, "malformed_json"),
        };
        let mut err = ApiError::new(status, code, inner.to_string());
        if path != "." && !path.is_empty() {
            err = err.field(path);
        }
        err
    })
}

/// Refuse a body holding what Postgres `text` and `jsonb` reject, naming where it is: U+0000 in
/// any string or key (JSON can only carry it as the escape `\u0000`, so only bodies holding
/// that escape are walked), and numbers beyond what `numeric` holds (more than 100 characters,
/// or an exponent beyond +-1000).
fn unstorable(bytes: &[u8]) -> ApiResult<()> {
    // A cheap look first (the event path parses each body once more only when it must).
    let has_nul_escape = bytes.windows(6).any(|w| w == b"\\u0000");
    let has_exponent = bytes
        .windows(3)
        .any(|w| w[0].is_ascii_digit() && matches!(w[1], b'e' | b'E') && matches!(w[2], b'0'..=b'9' | b'+' | b'-'));
    let long_digits = bytes
        .split(|b| !b.is_ascii_digit() && *b != b'.')
        .any(|run| run.len() > 90);
    if !has_nul_escape && !has_exponent && !long_digits {
        return Ok(());
    }
    // Malformed JSON is reported by the typed parse.
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(bytes) else {
        return Ok(());
    };
    match crate::validate::unstorable_at(&v, &mut String::new()) {
        None => Ok(()),
        Some((path, what)) => {
            let field = if path.is_empty() { "body".to_owned() } else { path };
            Err(ApiError::invalid(&field, "unstorable_value", what))
        }
    }
}

/// A JSON body parsed with [`parse_json`].
pub struct Body<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for Body<T> {
    type Rejection = ApiError;
    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = axum::body::Bytes::from_request(req, state)
            .await
            .map_err(bytes_rejection)?;
        parse_json(&bytes).map(Body)
    }
}

pub fn bytes_rejection(e: BytesRejection) -> ApiError {
    if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            "request body is over the 5 MB limit",
        )
    } else {
        ApiError::new(StatusCode::BAD_REQUEST, "unreadable_body", e.body_text())
    }
}

/// Query parameters, with errors in the API's shape.
pub struct Q<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for Q<T> {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        // No text column can hold NUL (Postgres refuses it): a filter carrying one is the
        // client's error, never a failed dependency.
        if parts
            .uri
            .query()
            .is_some_and(|q| q.to_ascii_lowercase().contains("%00"))
        {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_query",
                "query parameters may not contain NUL (%00)",
            ));
        }
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|q| Q(q.0))
            .map_err(|e: QueryRejection| ApiError::new(StatusCode::BAD_REQUEST, "invalid_query", e.body_text()))
    }
}
