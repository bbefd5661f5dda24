//! The settled ledger as the query plane reads it: one row type and one column list for every
//! read of `ledger_entries` (the ledger page, an event's status), and `GET /v1/credits/ledger`.

use std::sync::Arc;

use axum::extract::State;
use axum::Json;
use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use crate::auth::Tenant;
use crate::error::replies::{BadRequest, Invalid, Unauthorized};
use crate::error::{ApiError, ApiResult, Q};
use crate::page::{decode_cursor, encode_cursor, limit};
use crate::validate;
use crate::AppState;

/// One settled ledger entry. Amounts are decimal strings.
#[derive(Serialize, sqlx::FromRow, ToSchema)]
pub struct LedgerEntry {
    pub id: String,
    pub timestamp: DateTime<Utc>,
    /// grant, consume, expire, void, adjust or deny.
    #[serde(rename = "type")]
    pub kind: String,
    pub source: String,
    pub source_id: String,
    pub grant_id: Option<Uuid>,
    #[serde(with = "rust_decimal::serde::str")]
    #[schema(value_type = String)]
    pub amount: Decimal,
    /// The balance of the entry's pool (credit type and resource) after the entry.
    #[serde(with = "rust_decimal::serde::str")]
    #[schema(value_type = String)]
    pub end_balance: Decimal,
    pub actor: String,
    pub customer_id: String,
    pub credit_type: String,
    /// The pool's resource (`null` for the customer's default pool): `end_balance` is that
    /// pool's balance.
    pub resource_id: Option<String>,
}

pub const LEDGER_COLS: &str = "id::text AS id, ts AS timestamp, type AS kind, source, source_id, grant_id,
    amount, end_balance, actor, customer_id, credit_type, NULLIF(resource_id, '') AS resource_id";

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct LedgerQuery {
    customer_id: String,
    credit_type: Option<String>,
    /// The pool's resource; omitted = the default pool.
    resource_id: Option<String>,
    /// grant, consume, expire, void, adjust or deny.
    #[serde(rename = "type")]
    kind: Option<String>,
    /// RFC 3339: entries at or after.
    from: Option<DateTime<Utc>>,
    /// RFC 3339: entries before.
    to: Option<DateTime<Utc>>,
    /// 1-1000, default 50.
    limit: Option<i64>,
    /// The cursor of the previous page.
    after: Option<String>,
}

/// A page of ledger entries, newest first.
#[derive(Serialize, ToSchema)]
pub struct LedgerPage {
    entries: Vec<LedgerEntry>,
    /// `after` for the next page; null on the last.
    next_cursor: Option<String>,
}

/// The settled ledger of one pool per credit type, newest first; the cursor is the last entry's
/// id (ids only grow). An omitted `resource_id` means the default pool, as for the balance and
/// usage (each pool's `end_balance` chain is its own: mixing pools would interleave chains).
#[utoipa::path(get, path = "/v1/credits/ledger", tag = "credits",
    security(("api_key" = [])),
    params(LedgerQuery),
    responses((status = 200, description = "newest first", body = LedgerPage), BadRequest, Unauthorized, Invalid)
)]
pub async fn ledger(t: Tenant, State(s): State<Arc<AppState>>, Q(q): Q<LedgerQuery>) -> ApiResult<Json<LedgerPage>> {
    validate::id("customer_id", &q.customer_id)?;
    let limit = limit(q.limit)?;
    let after: Option<i64> = decode_cursor(&q.after)?;
    if let Some(k) = &q.kind {
        if !["grant", "consume", "expire", "void", "adjust", "deny"].contains(&k.as_str()) {
            return Err(ApiError::invalid(
                "type",
                "invalid_value",
                "one of grant, consume, expire, void, adjust, deny",
            ));
        }
    }
    let mut rows: Vec<LedgerEntry> = sqlx::query_as(&format!(
        "SELECT {LEDGER_COLS} FROM ledger_entries WHERE tenant_id = $1 AND customer_id = $2
            AND ($3::text IS NULL OR credit_type = $3) AND resource_id = $4
            AND ($5::text IS NULL OR type = $5) AND ($6::timestamptz IS NULL OR ts >= $6)
            AND ($7::timestamptz IS NULL OR ts < $7) AND ($8::bigint IS NULL OR id < $8)
         ORDER BY ledger_entries.id DESC LIMIT $9"
    ))
    .bind(&t.id)
    .bind(&q.customer_id)
    .bind(&q.credit_type)
    .bind(q.resource_id.as_deref().unwrap_or(""))
    .bind(&q.kind)
    .bind(q.from)
    .bind(q.to)
    .bind(after)
    .bind(limit + 1)
    .fetch_all(&s.pg.query)
    .await?;
    let more = rows.len() as i64 > limit;
    rows.truncate(limit as usize);
    let next = if more {
        rows.last().map(|e| encode_cursor(&e.id))
    } else {
        None
    };
    Ok(Json(LedgerPage {
        entries: rows,
        next_cursor: next,
    }))
}
