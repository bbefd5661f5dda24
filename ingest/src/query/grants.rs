//! The grants list.

use std::sync::Arc;

use axum::extract::State;
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use crate::auth::Tenant;
use crate::error::replies::{BadRequest, Invalid, Unauthorized};
use crate::error::{ApiResult, Q};
use crate::grant::{grant_json, Grant, GrantView, GRANT_COLS};
use crate::page::{decode_cursor, encode_cursor, limit};
use crate::AppState;

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct GrantQuery {
    customer_id: Option<String>,
    credit_type: Option<String>,
    resource_id: Option<String>,
    /// scheduled, active, depleted, expired or voided.
    status: Option<String>,
    /// 1-1000, default 50.
    limit: Option<i64>,
    /// The cursor of the previous page.
    after: Option<String>,
}

/// A page of grants.
#[derive(Serialize, ToSchema)]
pub struct GrantPage {
    grants: Vec<GrantView>,
    /// `after` for the next page; null on the last.
    next_cursor: Option<String>,
}

#[utoipa::path(get, path = "/v1/credits/grants", tag = "credits",
    security(("api_key" = [])),
    params(GrantQuery),
    responses((status = 200, description = "a page of grants, by id", body = GrantPage), BadRequest, Unauthorized, Invalid)
)]
pub async fn list_grants(t: Tenant, State(s): State<Arc<AppState>>, Q(q): Q<GrantQuery>) -> ApiResult<Json<GrantPage>> {
    let limit = limit(q.limit)?;
    let after: Option<Uuid> = decode_cursor(&q.after)?;
    let rows: Vec<Grant> = sqlx::query_as(&format!(
        "SELECT * FROM (SELECT {GRANT_COLS} FROM grants WHERE tenant_id = $1
            AND ($2::text IS NULL OR customer_id = $2) AND ($3::text IS NULL OR credit_type = $3)
            AND ($4::text IS NULL OR resource_id = $4) AND ($6::uuid IS NULL OR id > $6)) g
         WHERE ($5::text IS NULL OR status = $5) ORDER BY id LIMIT $7"
    ))
    .bind(&t.id)
    .bind(&q.customer_id)
    .bind(&q.credit_type)
    .bind(&q.resource_id)
    .bind(&q.status)
    .bind(after)
    .bind(limit + 1)
    .fetch_all(&s.pg.query)
    .await?;
    let more = rows.len() as i64 > limit;
    let page: Vec<GrantView> = rows.iter().take(limit as usize).map(grant_json).collect();
    let next = if more {
        rows.get(limit as usize - 1).map(|g| encode_cursor(g.id))
    } else {
        None
    };
    Ok(Json(GrantPage {
        grants: page,
        next_cursor: next,
    }))
}
